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

async fn run(context: &QuiverContext, sql: &str) -> Vec<arrow::array::RecordBatch> {
    context
        .sql(sql)
        .await
        .expect("plan")
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn count(context: &QuiverContext, sql: &str) -> i64 {
    let batches = run(context, sql).await;
    arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(batches[0].column(0))
        .value(0)
}

/// Writes that would leave a table unreadable, or put data somewhere else
/// than the statement says, are refused, and the table stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_writes_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let warehouse = dir.path().join("warehouse");
    let options = StandaloneOptions {
        warehouse: Some(format!("{}/", warehouse.display())),
        ..StandaloneOptions::default()
    };
    let (cluster, context) = common::start_cluster(options).await;
    let root = dir.path().display();

    // A null into a NOT NULL column, from a query the planner cannot see
    // through: refused when written, not when every later read fails.
    let create = format!(
        "CREATE EXTERNAL TABLE strict (k BIGINT NOT NULL) STORED AS PARQUET LOCATION '{root}/strict/'"
    );
    run(&context, &create).await;
    run(&context, "INSERT INTO strict VALUES (1)").await;
    let error = error_of(
        &context,
        "INSERT INTO strict SELECT CASE WHEN value > 100 THEN 1 END FROM range(3)",
    )
    .await;
    assert!(
        error.contains("column 'k' of the table is NOT NULL"),
        "null into NOT NULL: {error}"
    );
    assert_eq!(count(&context, "SELECT count(*) FROM strict").await, 1);
    assert_eq!(count(&context, "SELECT sum(k) FROM strict").await, 1);

    // A '#' or '?' would cut the location short, into another folder.
    for cut in ["#backup/", "?v=2"] {
        let sql = format!("COPY (SELECT 1 AS a) TO 'file://{root}/sales{cut}' STORED AS PARQUET");
        let error = error_of(&context, &sql).await;
        assert!(
            error.contains("a URL reads as the end of its path"),
            "{cut}: {error}"
        );
    }
    assert!(!dir.path().join("sales").exists(), "nothing written");

    // A CREATE TABLE AS into a warehouse folder that holds another table's
    // data would replace it.
    let shared = warehouse.join("public/daily");
    let copy = format!(
        "COPY (SELECT 7 AS id) TO '{}/' STORED AS PARQUET",
        shared.display()
    );
    run(&context, &copy).await;
    let external = format!(
        "CREATE EXTERNAL TABLE precious STORED AS PARQUET LOCATION '{}/'",
        shared.display()
    );
    run(&context, &external).await;
    let error = error_of(&context, "CREATE TABLE daily AS SELECT 42 AS answer").await;
    assert!(
        error.contains("already holds data"),
        "non-empty warehouse folder: {error}"
    );
    assert_eq!(count(&context, "SELECT sum(id) FROM precious").await, 7);
    // A managed table may replace its own folder.
    run(&context, "CREATE TABLE fresh AS SELECT 1 AS n").await;
    run(&context, "CREATE OR REPLACE TABLE fresh AS SELECT 2 AS n").await;
    assert_eq!(count(&context, "SELECT sum(n) FROM fresh").await, 2);

    assert_healthy(&context).await;
    cluster.shutdown().await;
}

/// Files that are not Parquet, however they break, get an error naming
/// them, and never a panic that loses the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broken_parquet_files_are_named() {
    let (cluster, context) = common::start_cluster(StandaloneOptions::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");

    // A footer whose metadata length runs past the start of the file.
    let folder = dir.path().join("long_footer");
    std::fs::create_dir(&folder).expect("folder");
    let mut footer = b"PAR1".to_vec();
    footer.extend([0u8; 20]);
    footer.extend(1000u32.to_le_bytes());
    footer.extend(b"PAR1");
    std::fs::write(folder.join("part-1.parquet"), footer).expect("write");
    let error = error_of(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE long_footer STORED AS PARQUET LOCATION '{}/'",
            folder.display()
        ),
    )
    .await;
    assert!(
        error.contains("part-1.parquet"),
        "malformed footer: {error}"
    );
    assert_healthy(&context).await;

    // A file that breaks after its table was created, found while the
    // scheduler gathers the table's statistics.
    let grows = dir.path().join("grows");
    std::fs::create_dir(&grows).expect("folder");
    std::fs::copy(
        common::tpch_tables()[0].1.join("part-1.parquet"),
        grows.join("part-1.parquet"),
    )
    .expect("copy");
    let create = format!(
        "CREATE EXTERNAL TABLE grows STORED AS PARQUET LOCATION '{}/'",
        grows.display()
    );
    run(&context, &create).await;
    std::fs::write(grows.join("part-2.parquet"), b"id,name\n1,csv\n").expect("write");
    let error = error_of(&context, "SELECT count(*) FROM grows").await;
    eprintln!("a file added later: {error}");
    assert!(
        error.contains("part-2.parquet"),
        "a file added later: {error}"
    );
    assert_healthy(&context).await;

    // An empty file is not a table without columns.
    let empty = dir.path().join("empty.parquet");
    std::fs::write(&empty, b"").expect("write");
    let error = error_of(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE empty STORED AS PARQUET LOCATION '{}'",
            empty.display()
        ),
    )
    .await;
    assert!(
        error.contains("empty file (0 bytes)"),
        "empty file: {error}"
    );
    assert_healthy(&context).await;

    cluster.shutdown().await;
}
