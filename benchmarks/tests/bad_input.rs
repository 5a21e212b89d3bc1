//! Bad input gets the client a clear error naming the cause, and the cluster
//! then serves the next job normally.

mod common;

use quiver_client::{QuiverContext, StandaloneOptions};

async fn error_of(context: &QuiverContext, sql: &str) -> String {
    let outcome = match context.sql(sql).await {
        Ok(frame) => frame.collect().await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    outcome.expect_err(&format!("{sql:?} should fail"))
}

async fn assert_healthy(context: &QuiverContext) {
    let batches = context
        .sql("SELECT 40 + 2 AS answer")
        .await
        .expect("plan")
        .collect()
        .await
        .expect("the cluster still serves jobs");
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_clear_errors() {
    let (cluster, context) = common::start_cluster(StandaloneOptions::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");

    let error = error_of(&context, "SELEC 1").await;
    assert!(error.contains("SELEC"), "malformed SQL: {error}");
    assert_healthy(&context).await;

    let error = error_of(&context, "SELECT * FROM no_such_table").await;
    assert!(error.contains("no_such_table"), "unknown table: {error}");
    assert_healthy(&context).await;

    let missing = dir.path().join("missing.parquet");
    let error = error_of(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE missing STORED AS PARQUET LOCATION '{}'",
            missing.display()
        ),
    )
    .await;
    assert!(error.contains("missing.parquet"), "missing file: {error}");
    assert_healthy(&context).await;

    // A file that is not Parquet at all is refused when the table is created.
    let garbage = dir.path().join("garbage.parquet");
    std::fs::write(&garbage, b"this is not a parquet file at all").expect("write");
    let error = error_of(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE garbage STORED AS PARQUET LOCATION '{}'",
            garbage.display()
        ),
    )
    .await;
    assert!(
        error.to_lowercase().contains("parquet"),
        "corrupt parquet: {error}"
    );
    assert_healthy(&context).await;

    // A file that turns corrupt after the table was registered fails the job on
    // the executor, and the error reaches the client.
    let table = dir.path().join("table.parquet");
    std::fs::copy(common::tpch_tables()[0].1.join("part-1.parquet"), &table).expect("copy");
    context
        .sql(&format!(
            "CREATE EXTERNAL TABLE decays STORED AS PARQUET LOCATION '{}'",
            table.display()
        ))
        .await
        .expect("register");
    let length = std::fs::metadata(&table).expect("stat").len() as usize;
    std::fs::write(&table, vec![7u8; length]).expect("corrupt");
    let error = error_of(&context, "SELECT count(*), sum(n_nationkey) FROM decays").await;
    assert!(
        error.to_lowercase().contains("parquet"),
        "corrupted file: {error}"
    );
    assert_healthy(&context).await;

    cluster.shutdown().await;
}
