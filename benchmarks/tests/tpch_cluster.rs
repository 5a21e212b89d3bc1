//! All 22 TPC-H queries on an in-process cluster (1 scheduler, 2 executors,
//! 4 shuffle partitions, real gRPC and Flight on loopback) return exactly what
//! single-node DataFusion returns on the same files.

mod common;

use quiver_benchmarks::queries::{QUERY_COUNT, query};
use quiver_benchmarks::runner::Engine;
use quiver_benchmarks::verify::compare;
use quiver_client::StandaloneOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_matches_single_node_datafusion() {
    let tables = common::tpch_tables();
    let options = StandaloneOptions {
        executors: 2,
        slots_per_executor: 2,
        default_partitions: 4,
        ..StandaloneOptions::default()
    };
    let (cluster, context) = common::start_cluster(options).await;
    let quiver = Engine::Quiver(context);
    quiver
        .register_tables(&tables)
        .await
        .expect("register on quiver");
    let datafusion = common::reference_engine(&tables, 4).await;

    let mut failures = Vec::new();
    for number in 1..=QUERY_COUNT {
        let sql = query(number).expect("query exists");
        let expected = datafusion
            .run(sql)
            .await
            .expect("datafusion runs the query");
        match quiver.run(sql).await {
            Ok(actual) => {
                if let Err(difference) = compare(&expected, &actual) {
                    failures.push(format!("Q{number}: {difference}"));
                }
            }
            Err(e) => failures.push(format!("Q{number} failed: {e}")),
        }
    }
    cluster.shutdown().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
