//! All 22 TPC-H queries on an in-process cluster (1 scheduler, 2 executors,
//! 4 shuffle partitions, real gRPC and Flight on loopback) return exactly what
//! single-node DataFusion returns on the same files, and `tpch profile` reads
//! the jobs' metrics.

mod common;

use quiver_benchmarks::profile::profile;
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

/// `tpch profile` splits a query from the job's own metrics: a multi-stage
/// query's shuffle is measured on both sides, and the parts fit in the whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_profile_splits_a_query_from_its_metrics() {
    let tables = common::tpch_tables();
    let options = StandaloneOptions {
        executors: 2,
        slots_per_executor: 1,
        default_partitions: 2,
        ..StandaloneOptions::default()
    };
    let (cluster, context) = common::start_cluster(options).await;
    Engine::Quiver(context.clone())
        .register_tables(&tables)
        .await
        .expect("register on quiver");
    let sql = query(16).expect("Q16");
    let profiled = profile(&context, 16, sql).await.expect("profiled");
    let expected = common::reference_engine(&tables, 2)
        .await
        .run(sql)
        .await
        .expect("datafusion runs Q16");
    cluster.shutdown().await;

    let rows: usize = expected.iter().map(|batch| batch.num_rows()).sum();
    assert_eq!(profiled.rows, rows);
    assert!(profiled.stages > 2, "{profiled:?}");
    assert!(profiled.tasks as usize > profiled.stages, "{profiled:?}");
    assert!(profiled.shuffle_bytes_written > 0, "{profiled:?}");
    for part in [
        profiled.launch_ms,
        profiled.shuffle_write_ms,
        profiled.shuffle_read_ms,
    ] {
        assert!(part > 0.0, "{profiled:?}");
    }
    assert!(
        profiled.flight_read_ms <= profiled.shuffle_read_ms,
        "{profiled:?}"
    );
    assert!(
        profiled.launch_ms + profiled.shuffle_write_ms + profiled.shuffle_read_ms
            <= profiled.task_ms,
        "{profiled:?}"
    );
    assert!(profiled.job_ms <= profiled.client_ms, "{profiled:?}");
    assert!(profiled.submit_ms < profiled.client_ms, "{profiled:?}");
}
