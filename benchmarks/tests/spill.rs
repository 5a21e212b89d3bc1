//! A query whose sort, aggregate and shuffle need far more memory than an
//! executor's pool spills to disk and finishes with the right answer.

mod common;

use quiver_benchmarks::runner::Engine;
use quiver_benchmarks::verify::compare;
use quiver_client::StandaloneOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queries_larger_than_the_memory_pool_spill() {
    let tables = common::tpch_tables();
    let options = StandaloneOptions {
        executors: 2,
        slots_per_executor: 1,
        // lineitem at this scale is about 10 MB in memory.
        memory_limit: 6 * 1024 * 1024,
        default_partitions: 2,
        ..StandaloneOptions::default()
    };
    let (cluster, context) = common::start_cluster(options).await;
    // One task sees the whole table, so it cannot fit; the merge reservation
    // must fit the small pool. Settings travel with each job.
    for setting in [
        "SET datafusion.execution.sort_spill_reservation_bytes = 262144",
        "SET datafusion.execution.target_partitions = 1",
    ] {
        context.sql(setting).await.expect("set");
    }
    let quiver = Engine::Quiver(context);
    quiver.register_tables(&tables).await.expect("register");
    let datafusion = common::reference_engine(&tables, 2).await;

    let queries = [
        // A full sort of every row.
        "SELECT * FROM lineitem ORDER BY l_comment DESC, l_orderkey, l_linenumber",
        // A high-cardinality aggregate.
        "SELECT l_orderkey, l_partkey, count(*) AS n, max(l_comment) AS c FROM lineitem \
         GROUP BY l_orderkey, l_partkey ORDER BY l_orderkey, l_partkey",
    ];
    for sql in queries {
        let expected = datafusion.run(sql).await.expect("datafusion");
        let actual = quiver
            .run(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql} failed: {e}"));
        compare(&expected, &actual).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    cluster.shutdown().await;
}
