//! Tables and writes on a real S3-compatible server (moto, on loopback):
//! the TPC-H queries read from a bucket, distributed Parquet writes with
//! their commit protocol, and clear errors for bad locations, with the
//! credentials never showing. The same reads and writes on Azure Blob
//! Storage (Azurite), and the reads on Google Cloud Storage (fake-gcs-server)
//! and over HTTP (a WebDAV server).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::array::{AsArray, Int64Array, RecordBatch};
use arrow::datatypes::UInt64Type;
use common::azurite::{ACCOUNT_KEY, AzuriteServer};
use common::gcs::GcsServer;
use common::processes::{ClusterArgs, ProcessCluster};
use common::s3::{S3Credentials, S3Server, SECRET_KEY};
use common::webdav::WebDavServer;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use quiver_benchmarks::queries::{QUERY_COUNT, query};
use quiver_benchmarks::runner::Engine;
use quiver_benchmarks::verify::compare;
use quiver_client::{QuiverContext, StandaloneOptions};
use quiver_proto::JobState;

/// What a user who may only read a bucket is allowed. moto checks
/// `s3:ListObjectsV2` for a listing and `s3:HeadObject` for a `HEAD`, where
/// AWS checks `s3:ListBucket` and `s3:GetObject`.
const READS: &[&str] = &[
    "s3:GetObject",
    "s3:HeadObject",
    "s3:ListBucket",
    "s3:ListObjectsV2",
];

fn options() -> StandaloneOptions {
    StandaloneOptions {
        executors: 2,
        slots_per_executor: 2,
        default_partitions: 4,
        ..StandaloneOptions::default()
    }
}

async fn run(context: &QuiverContext, sql: &str) -> Result<Vec<RecordBatch>, String> {
    let frame = context.sql(sql).await.map_err(|e| e.to_string())?;
    frame.collect().await.map_err(|e| e.to_string())
}

async fn count_of(context: &QuiverContext, sql: &str) -> u64 {
    let batches = run(context, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    batches
        .iter()
        .map(|batch| {
            batch
                .column(0)
                .as_primitive::<UInt64Type>()
                .iter()
                .flatten()
                .sum::<u64>()
        })
        .sum()
}

async fn list(store: &Arc<dyn ObjectStore>, prefix: &str) -> Vec<String> {
    store
        .list(Some(&Path::from(prefix)))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .expect("list bucket")
}

/// Asserts that the scheduler of `cluster` logged `text`.
fn assert_scheduler_logged(cluster: &ProcessCluster, text: &str) {
    let log = cluster.scheduler_log();
    assert!(log.contains(text), "{text:?} not logged:\n{log}");
}

/// Waits, up to two minutes, until `prefix` of `store` holds nothing.
async fn emptied(store: &Arc<dyn ObjectStore>, prefix: &str, cluster: &ProcessCluster) {
    use std::time::{Duration, Instant};

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = list(store, prefix).await;
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{left:?} left\n{}",
            cluster.scheduler_log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Bytes the job of `sql` read from object stores.
async fn bytes_read(context: &QuiverContext, sql: &str) -> u64 {
    let last = Arc::new(std::sync::Mutex::new(0));
    let seen = Arc::clone(&last);
    let stream = context
        .execute_sql(sql, move |status| {
            *seen.lock().expect("lock") = status.store_bytes_read;
        })
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    datafusion::physical_plan::common::collect(stream)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    *last.lock().expect("lock")
}

/// Runs TPC-H queries on both engines; describes every difference.
async fn tpch_differences(
    quiver: &Engine,
    datafusion: &Engine,
    numbers: impl IntoIterator<Item = usize>,
    label: &str,
) -> Vec<String> {
    let mut failures = Vec::new();
    for number in numbers {
        let sql = query(number).expect("query exists");
        let expected = datafusion.run(sql).await.expect("datafusion runs");
        match quiver.run(sql).await {
            Ok(actual) => {
                if let Err(difference) = compare(&expected, &actual) {
                    failures.push(format!("Q{number}{label}: {difference}"));
                }
            }
            Err(e) => failures.push(format!("Q{number}{label} failed: {e}")),
        }
    }
    failures
}

/// Registers every TPC-H table at `{prefix}{name}/` with `options`.
async fn register_tpch(
    context: &QuiverContext,
    tables: &[(String, std::path::PathBuf)],
    prefix: &str,
    options: &str,
) {
    for (name, _) in tables {
        let ddl = format!(
            "CREATE EXTERNAL TABLE {name} STORED AS PARQUET LOCATION '{prefix}{name}/' {options}"
        );
        run(context, &ddl)
            .await
            .unwrap_or_else(|e| panic!("register {name} at {prefix}: {e}"));
    }
}

async fn assert_no_secret_in_history(context: &QuiverContext, secret: &str) {
    let jobs = context.list_jobs(1000).await.expect("list jobs");
    assert!(!jobs.is_empty());
    for job in jobs {
        assert!(
            !job.query.contains(secret),
            "the job history shows a secret: {}",
            job.query
        );
        let error = job.status.map(|status| status.error).unwrap_or_default();
        assert!(
            !error.contains(secret),
            "a job's error shows a secret: {error}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_reads_from_s3_match_single_node_datafusion() {
    let s3 = S3Server::start();
    s3.create_bucket("tpch");
    let tables = common::tpch_tables();
    for (name, dir) in &tables {
        s3.upload_dir("tpch", dir, name).await;
    }
    let (cluster, context) = common::start_cluster(options()).await;
    register_tpch(&context, &tables, "s3://tpch/", &s3.sql_options()).await;
    let datafusion = common::reference_engine(&tables, 4).await;
    let quiver = Engine::Quiver(context.clone());
    let mut failures = tpch_differences(&quiver, &datafusion, 1..=QUERY_COUNT, "").await;

    // Durable shuffle: map outputs are copied to the bucket too (read from
    // there once their executor has gone), and are gone once the job ends.
    run(
        &context,
        "SET quiver.shuffle_location = 's3://tpch/_shuffle'",
    )
    .await
    .expect("set shuffle location");
    failures
        .extend(tpch_differences(&quiver, &datafusion, [3, 9, 18], " with durable shuffle").await);
    let bucket = s3.store("tpch");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = list(&bucket, "_shuffle").await;
        if left.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            failures.push(format!("durable shuffle data left behind: {left:?}"));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    assert_no_secret_in_history(&context, SECRET_KEY).await;
    cluster.shutdown().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_reads_and_writes_on_azure_blob_storage() {
    let azure = AzuriteServer::start();
    azure.create_container("lake");
    let tables = common::tpch_tables();
    for (name, dir) in &tables {
        azure.upload_dir("lake", dir, &format!("tpch/{name}")).await;
    }
    let (cluster, context) = common::start_cluster(options()).await;
    let options = azure.sql_options();
    register_tpch(&context, &tables, "az://lake/tpch/", &options).await;
    let datafusion = common::reference_engine(&tables, 4).await;
    let quiver = Engine::Quiver(context.clone());
    let failures = tpch_differences(&quiver, &datafusion, 1..=QUERY_COUNT, " on Azure").await;

    // A distributed, partitioned write into the container, then read back.
    run(
        &context,
        &format!(
            "COPY (SELECT l_orderkey, l_quantity, l_returnflag FROM lineitem) \
             TO 'az://lake/out/' STORED AS PARQUET PARTITIONED BY (l_returnflag) {options}"
        ),
    )
    .await
    .expect("write to Azure");
    let written = list(&azure.store("lake"), "out").await;
    let folders: BTreeSet<&str> = written
        .iter()
        .filter(|path| path.ends_with(".parquet"))
        .filter_map(|path| path.split('/').nth(1))
        .collect();
    assert_eq!(
        folders,
        BTreeSet::from(["l_returnflag=A", "l_returnflag=N", "l_returnflag=R"]),
        "{written:?}"
    );
    assert!(
        written
            .iter()
            .any(|path| path.starts_with("out/_manifests/")),
        "the commit wrote a manifest: {written:?}"
    );
    run(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE copied STORED AS PARQUET LOCATION 'az://lake/out/' {options}"
        ),
    )
    .await
    .expect("register the copy");
    let copied = count_of(
        &context,
        "SELECT CAST(count(*) AS BIGINT UNSIGNED) FROM copied",
    )
    .await;
    let source = count_of(
        &context,
        "SELECT CAST(count(*) AS BIGINT UNSIGNED) FROM lineitem",
    )
    .await;
    assert_eq!(copied, source);
    // An overwrite of one partition claims its place in the table's order
    // with a conditional put, which Azure offers too.
    let overwritten = count_of(
        &context,
        "INSERT OVERWRITE copied SELECT * FROM copied WHERE l_returnflag = 'A'",
    )
    .await;
    let kept = count_of(
        &context,
        "SELECT CAST(count(*) AS BIGINT UNSIGNED) FROM copied",
    )
    .await;
    assert!(overwritten > 0 && kept == source, "{overwritten} {kept}");
    let claims = list(&azure.store("lake"), "out/_manifests/order").await;
    assert_eq!(
        claims,
        vec!["out/_manifests/order/00000000000000000001.claim"]
    );

    // Wrong credentials: Azurite checks the request signature. The error
    // names the location, not the key, and the container's good options stay.
    let wrong_key = "d3Jvbmcta2V5LW9mLXRoZS1yaWdodC1sZW5ndGgtZm9yLWF6dXJl";
    let error = run(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE stolen STORED AS PARQUET LOCATION 'az://lake/tpch/nation/' \
             OPTIONS ('azure.account_name' 'devstoreaccount1', 'azure.access_key' '{wrong_key}', \
             'azure.endpoint' '{}', 'azure.allow_http' 'true')",
            azure.endpoint()
        ),
    )
    .await
    .expect_err("a wrong key is refused");
    assert!(
        error.contains("cannot read the table at 'az://lake/tpch/nation/'")
            && !error.contains(wrong_key),
        "{error}"
    );
    assert_eq!(
        count_of(
            &context,
            "SELECT CAST(count(*) AS BIGINT UNSIGNED) FROM nation"
        )
        .await,
        25,
        "the good options still work"
    );

    // A write task that fails after it has staged blocks discards them:
    // Azure would keep uncommitted blocks, unlisted, for a week.
    for setting in [
        "SET datafusion.execution.parquet.max_row_group_size = 65536",
        "SET datafusion.execution.objectstore_writer_buffer_size = 5242880",
    ] {
        run(&context, setting).await.expect("setting");
    }
    let error = run(
        &context,
        &format!(
            "COPY (SELECT value, md5(CAST(value AS VARCHAR)) AS digest, \
                    1 / CASE WHEN value > 1200000 THEN 0 ELSE 1 END AS fails_late \
                  FROM range(1500000)) \
             TO 'az://lake/failed/' STORED AS PARQUET {options}"
        ),
    )
    .await
    .expect_err("the query divides by zero");
    assert!(error.contains("Divide by zero"), "{error}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (uncommitted, left) = (
            azure.blobs_with_uncommitted_blocks("lake"),
            list(&azure.store("lake"), "failed").await,
        );
        if uncommitted == 0 && left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left behind: {uncommitted} blobs with uncommitted blocks, files {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    assert_no_secret_in_history(&context, ACCOUNT_KEY).await;
    assert_no_secret_in_history(&context, wrong_key).await;
    cluster.shutdown().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_reads_from_google_cloud_storage() {
    let tables = common::tpch_tables();
    let seeds: Vec<_> = tables
        .iter()
        .map(|(name, dir)| ("lake", format!("tpch/{name}"), dir.as_path()))
        .collect();
    let gcs = GcsServer::start(&seeds);
    let (cluster, context) = common::start_cluster(options()).await;
    let options = gcs.sql_options();
    register_tpch(&context, &tables, "gs://lake/tpch/", &options).await;
    let datafusion = common::reference_engine(&tables, 4).await;
    let quiver = Engine::Quiver(context.clone());
    let mut failures = tpch_differences(&quiver, &datafusion, 1..=QUERY_COUNT, " on GCS").await;

    let error = run(
        &context,
        &format!("CREATE EXTERNAL TABLE gone STORED AS PARQUET LOCATION 'gs://no-such-bucket/t/' {options}"),
    )
    .await
    .expect_err("a missing bucket is refused");
    if !error.contains("gs://no-such-bucket/t/") {
        failures.push(format!(
            "the missing bucket's error does not name it: {error}"
        ));
    }
    cluster.shutdown().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_reads_over_http() {
    let tables = common::tpch_tables();
    let root = tables[0].1.parent().expect("the tables share a folder");
    let server = WebDavServer::start(root);
    let (cluster, context) = common::start_cluster(options()).await;
    register_tpch(&context, &tables, &format!("{}/", server.url()), "").await;
    let datafusion = common::reference_engine(&tables, 4).await;
    let quiver = Engine::Quiver(context.clone());
    let mut failures = tpch_differences(&quiver, &datafusion, 1..=QUERY_COUNT, " over HTTP").await;

    // HTTP is for reading: the read-only share refuses a write, and the error
    // names the location.
    let target = format!("{}/out/", server.url());
    match run(
        &context,
        &format!("COPY (SELECT 1 AS x) TO '{target}' STORED AS PARQUET"),
    )
    .await
    {
        Ok(_) => failures.push("a write to a read-only HTTP share succeeded".to_owned()),
        Err(error) if !error.contains(&target) => {
            failures.push(format!("the refused write does not name {target}: {error}"))
        }
        Err(_) => {}
    }
    assert!(!root.join("out").exists(), "nothing was written");
    cluster.shutdown().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// An HTTP server that asks for a user name and password is read with
/// them as the table's options; without them, or with a wrong password, the
/// error names the location and says the server refused, and no password
/// shows anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_reads_with_basic_authentication() {
    const PASSWORD: &str = "quiver-http-pw-7Hq2";
    let root = tempfile::tempdir().expect("shared folder");
    std::fs::create_dir(root.path().join("t")).expect("folder");
    std::fs::write(
        root.path().join("t/part-0.parquet"),
        one_two_three_parquet(),
    )
    .expect("file");
    let server = WebDavServer::start_with_user(root.path(), "alice", PASSWORD);
    let (cluster, context) = common::start_cluster(options()).await;
    let location = format!("{}/t/", server.url());
    let create = |name: &str, options: &str| {
        format!("CREATE EXTERNAL TABLE {name} STORED AS PARQUET LOCATION '{location}' {options}")
    };
    for (name, options) in [
        ("anonymous", String::new()),
        (
            "wrong",
            "OPTIONS ('http.username' 'alice', 'http.password' 'not-it')".to_owned(),
        ),
    ] {
        let error = run(&context, &create(name, &options))
            .await
            .expect_err("the server refuses");
        assert!(
            error.contains(&location) && error.contains("401"),
            "{name}: {error}"
        );
    }
    let options = format!("OPTIONS ('http.username' 'alice', 'http.password' '{PASSWORD}')");
    run(&context, &create("authenticated", &options))
        .await
        .expect("the right password reads");
    assert_eq!(
        count_of(
            &context,
            "SELECT count(*)::bigint unsigned FROM authenticated"
        )
        .await,
        3
    );
    assert_no_secret_in_history(&context, PASSWORD).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distributed_writes_commit_every_file_once() {
    let s3 = S3Server::start();
    s3.create_bucket("lake");
    let bucket = s3.store("lake");
    let tables = common::tpch_tables();
    let (cluster, context) = common::start_cluster(options()).await;
    let quiver = Engine::Quiver(context.clone());
    quiver.register_tables(&tables).await.expect("register");
    let datafusion = common::reference_engine(&tables, 4).await;
    let lineitem_rows = count_of(&context, "SELECT count(*)::bigint unsigned FROM lineitem").await;

    // COPY, hive-partitioned: every task writes its own files.
    let copied = count_of(
        &context,
        &format!(
            "COPY (SELECT l_orderkey, l_quantity, l_returnflag FROM lineitem) \
             TO 's3://lake/copy/' STORED AS PARQUET PARTITIONED BY (l_returnflag) {}",
            s3.sql_options()
        ),
    )
    .await;
    assert_eq!(copied, lineitem_rows);
    let objects = list(&bucket, "copy").await;
    assert!(
        objects.iter().all(|o| !o.contains("_temporary")),
        "staged files left behind: {objects:?}"
    );
    let data_files: Vec<&String> = objects.iter().filter(|o| o.ends_with(".parquet")).collect();
    let folders: BTreeSet<&str> = data_files
        .iter()
        .filter_map(|o| o.split('/').nth(1))
        .collect();
    assert_eq!(
        folders,
        BTreeSet::from(["l_returnflag=A", "l_returnflag=N", "l_returnflag=R"]),
        "{objects:?}"
    );
    // File names carry the writing task's partition: several tasks wrote.
    let writers: BTreeSet<&str> = data_files
        .iter()
        .filter_map(|o| o.rsplit('-').nth(1))
        .collect();
    assert!(writers.len() > 1, "one task wrote everything: {objects:?}");
    // The job's manifest names exactly the committed files.
    let manifests: Vec<&String> = objects
        .iter()
        .filter(|o| o.contains("/_manifests/"))
        .collect();
    assert_eq!(manifests.len(), 1, "{objects:?}");
    let manifest = bucket
        .get(&Path::from(manifests[0].as_str()))
        .await
        .expect("manifest")
        .bytes()
        .await
        .expect("read manifest");
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest is JSON");
    assert_eq!(manifest["rows"].as_u64(), Some(lineitem_rows));
    let listed: BTreeSet<String> = manifest["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter_map(|file| file["path"].as_str())
        .map(|path| format!("copy/{path}"))
        .collect();
    let stored: BTreeSet<String> = data_files.iter().map(|o| o.to_string()).collect();
    assert_eq!(listed, stored);

    // Reading the written folder back gives what DataFusion computes locally.
    run(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE copied STORED AS PARQUET LOCATION 's3://lake/copy/' {}",
            s3.sql_options()
        ),
    )
    .await
    .expect("register the written folder");
    let check = "SELECT CAST(l_returnflag AS VARCHAR) AS flag, count(*) AS n, sum(l_quantity) AS q \
                 FROM {table} GROUP BY 1 ORDER BY 1";
    let expected = datafusion
        .run(&check.replace("{table}", "lineitem"))
        .await
        .expect("datafusion");
    let actual = run(&context, &check.replace("{table}", "copied"))
        .await
        .expect("read back");
    compare(&expected, &actual).expect("written rows equal the source rows");

    // Pruning: what a query reads from the bucket, as its job status counts it.
    let full = bytes_read(&context, "SELECT sum(l_quantity) FROM copied").await;
    let one_partition = bytes_read(
        &context,
        "SELECT sum(l_quantity) FROM copied WHERE l_returnflag = 'A'",
    )
    .await;
    eprintln!("bytes read: full scan {full}, one partition folder {one_partition}");
    assert!(full > 0);
    assert!(
        one_partition * 2 < full,
        "partition pruning: {one_partition} of {full} bytes"
    );

    // INSERT INTO appends; INSERT OVERWRITE replaces.
    let slice = "SELECT l_orderkey, l_quantity FROM lineitem WHERE l_orderkey < 1000";
    let slice_rows = count_of(
        &context,
        "SELECT count(*)::bigint unsigned FROM lineitem WHERE l_orderkey < 1000",
    )
    .await;
    let written = count_of(
        &context,
        &format!(
            "COPY ({slice}) TO 's3://lake/appended/' STORED AS PARQUET {}",
            s3.sql_options()
        ),
    )
    .await;
    assert_eq!(written, slice_rows);
    run(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE appended STORED AS PARQUET LOCATION 's3://lake/appended/' {}",
            s3.sql_options()
        ),
    )
    .await
    .expect("register appended");
    let inserted = count_of(&context, &format!("INSERT INTO appended {slice}")).await;
    assert_eq!(inserted, slice_rows);
    let total = count_of(&context, "SELECT count(*)::bigint unsigned FROM appended").await;
    assert_eq!(total, 2 * slice_rows);

    let smaller = "SELECT l_orderkey, l_quantity FROM lineitem WHERE l_orderkey < 500";
    let smaller_rows = count_of(
        &context,
        "SELECT count(*)::bigint unsigned FROM lineitem WHERE l_orderkey < 500",
    )
    .await;
    let overwritten = count_of(&context, &format!("INSERT OVERWRITE appended {smaller}")).await;
    assert_eq!(overwritten, smaller_rows);
    let total = count_of(&context, "SELECT count(*)::bigint unsigned FROM appended").await;
    assert_eq!(total, smaller_rows, "an overwrite leaves only its own rows");
    let remaining = list(&bucket, "appended").await;
    let job_ids: BTreeSet<String> = remaining
        .iter()
        .filter(|o| o.ends_with(".parquet"))
        .filter_map(|o| o.rsplit('/').next())
        .filter_map(|name| name.strip_prefix("part-"))
        .filter_map(|rest| rest.split('-').next().map(str::to_owned))
        .collect();
    assert_eq!(
        job_ids.len(),
        1,
        "older files survived the overwrite: {remaining:?}"
    );
    let manifests: Vec<&String> = remaining
        .iter()
        .filter(|o| o.starts_with("appended/_manifests/") && !o.ends_with(".claim"))
        .collect();
    assert_eq!(
        manifests.len(),
        1,
        "the overwrite retires the manifests of the writes it replaced: {manifests:?}"
    );
    // Its place in the order of overwrites, made with a conditional put.
    let claims = list(&bucket, "appended/_manifests/order").await;
    assert_eq!(
        claims,
        vec!["appended/_manifests/order/00000000000000000001.claim"]
    );

    // Many appends: their finished manifests are folded into one file, so
    // that every statement's listing of `_manifests/` stays short.
    let appends: u64 = 40;
    for n in 0..appends {
        run(&context, &format!("INSERT INTO appended VALUES ({n}, 1)"))
            .await
            .expect("append");
    }
    let total = count_of(&context, "SELECT count(*)::bigint unsigned FROM appended").await;
    assert_eq!(total, smaller_rows + appends);
    let manifests: Vec<String> = list(&bucket, "appended/_manifests")
        .await
        .into_iter()
        .collect();
    assert!(
        manifests.iter().any(|o| o.contains("/z_folded-")) && manifests.len() < 20,
        "{manifests:?}"
    );
    count_of(&context, &format!("INSERT OVERWRITE appended {smaller}")).await;
    let total = count_of(&context, "SELECT count(*)::bigint unsigned FROM appended").await;
    assert_eq!(total, smaller_rows);
    let manifests = list(&bucket, "appended/_manifests").await;
    assert_eq!(
        manifests.len(),
        2,
        "every folded job was retired, and the first overwrite's claim: {manifests:?}"
    );
    assert!(
        manifests.contains(&"appended/_manifests/order/00000000000000000002.claim".to_owned()),
        "{manifests:?}"
    );

    // Small target files: each task rolls over to new files.
    run(&context, "SET quiver.target_file_bytes = 16384")
        .await
        .expect("set target size");
    let rolled = count_of(
        &context,
        &format!(
            "COPY (SELECT * FROM lineitem) TO 's3://lake/rolled/' STORED AS PARQUET {}",
            s3.sql_options()
        ),
    )
    .await;
    assert_eq!(rolled, lineitem_rows);
    let rolled_files = list(&bucket, "rolled").await;
    assert!(
        rolled_files.iter().any(|o| o.ends_with("-001.parquet")),
        "no task rolled over to a second file: {rolled_files:?}"
    );
    run(&context, "SET quiver.target_file_bytes = 268435456")
        .await
        .expect("reset target size");

    // CREATE TABLE AS SELECT writes a table into the warehouse and registers it.
    run(
        &context,
        "CREATE TABLE flags AS SELECT l_returnflag, count(*) AS n FROM lineitem GROUP BY 1",
    )
    .await
    .expect("create table as select");
    let summed = count_of(&context, "SELECT sum(n)::bigint unsigned FROM flags").await;
    assert_eq!(summed, lineitem_rows);
    let again = run(&context, "CREATE TABLE flags AS SELECT 1 AS x")
        .await
        .expect_err("the table exists");
    assert!(again.contains("already exists"), "{again}");

    assert_no_secret_in_history(&context, SECRET_KEY).await;
    cluster.shutdown().await;
}

/// A write task that fails after its upload has begun aborts that upload:
/// S3 keeps (and bills) the parts of an unfinished multipart upload, where no
/// listing of the bucket shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_that_fails_midway_leaves_no_upload_behind() {
    let s3 = S3Server::start();
    s3.create_bucket("lake");
    let (cluster, context) = common::start_cluster(options()).await;
    // Row groups of 64 Ki rows go to the store as they fill, and uploads
    // start at S3's smallest part, so the task uploads parts before it fails.
    for setting in [
        "SET datafusion.execution.parquet.max_row_group_size = 65536",
        "SET datafusion.execution.objectstore_writer_buffer_size = 5242880",
    ] {
        run(&context, setting).await.expect("setting");
    }
    // An ordered query (`range` is ordered too) is written by one task, in
    // order, through the same staging and commit as any other write.
    run(
        &context,
        &format!(
            "COPY (SELECT value FROM range(100000) ORDER BY value DESC) \
             TO 's3://lake/ordered/' STORED AS PARQUET {}",
            s3.sql_options()
        ),
    )
    .await
    .expect("ordered write");
    let bucket = s3.store("lake");
    let ordered = list(&bucket, "ordered").await;
    assert!(
        ordered
            .iter()
            .any(|path| path.starts_with("ordered/_manifests/"))
            && ordered
                .iter()
                .filter(|path| path.ends_with(".parquet"))
                .count()
                == 1,
        "{ordered:?}"
    );

    let error = run(
        &context,
        &format!(
            "COPY (SELECT value, md5(CAST(value AS VARCHAR)) AS digest, \
                    1 / CASE WHEN value > 1200000 THEN 0 ELSE 1 END AS fails_late \
                  FROM range(1500000)) \
             TO 's3://lake/failed/' STORED AS PARQUET {}",
            s3.sql_options()
        ),
    )
    .await
    .expect_err("the query divides by zero");
    assert!(error.contains("Divide by zero"), "{error}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s3.unfinished_uploads("lake") > 0 || !list(&bucket, "failed").await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "left behind: {} unfinished uploads, files {:?}",
            s3.unfinished_uploads("lake"),
            list(&bucket, "failed").await
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    cluster.shutdown().await;
}

/// Runs the count `sql` on `cluster`, killing (and restarting) its executor
/// as soon as an upload to the bucket `lake` is under way; returns the count.
async fn count_killing_an_uploader(
    s3: &S3Server,
    cluster: &mut ProcessCluster,
    context: &QuiverContext,
    sql: String,
) -> u64 {
    let running = tokio::spawn({
        let context = context.clone();
        async move { count_of(&context, &sql).await }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while s3.unfinished_uploads("lake") == 0 {
        assert!(
            std::time::Instant::now() < deadline && !running.is_finished(),
            "no upload began\n{}",
            cluster.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    cluster.kill_executor(0);
    cluster.start_executor(0);
    tokio::time::timeout(std::time::Duration::from_secs(180), running)
        .await
        .unwrap_or_else(|_| panic!("the job did not finish\n{}", cluster.logs()))
        .expect("the job's task")
}

/// Sets parts of S3's smallest size for `context`'s writes, so that their
/// uploads begin early and last.
async fn upload_in_small_parts(context: &QuiverContext) {
    for setting in [
        "SET datafusion.execution.parquet.max_row_group_size = 65536",
        "SET datafusion.execution.objectstore_writer_buffer_size = 5242880",
    ] {
        run(context, setting).await.expect("setting");
    }
}

/// Runs `copy`, a [`copy_with_uploads`] into `folder` of `bucket`, and
/// kills the scheduler once its first upload has begun; returns its job id.
async fn kill_the_scheduler_during(
    cluster: &mut ProcessCluster,
    context: &QuiverContext,
    bucket: &Arc<dyn ObjectStore>,
    folder: &str,
    copy: String,
) -> String {
    use std::time::{Duration, Instant};

    let running = tokio::spawn({
        let context = context.clone();
        async move { run(&context, &copy).await }
    });
    // moto refuses the unsigned request that counts unfinished uploads:
    // the records of uploads under way show them.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !list(bucket, folder)
        .await
        .iter()
        .any(|key| key.contains("/_uploads/"))
    {
        assert!(
            Instant::now() < deadline && !running.is_finished(),
            "no upload began\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let jobs = context.list_jobs(10).await.expect("job list");
    let job_id = jobs
        .iter()
        .find(|record| record.query.contains(&format!("s3://lake/{folder}/")))
        .and_then(|record| record.status.as_ref())
        .map(|status| status.job_id.clone())
        .expect("the COPY is in the history");
    cluster.kill_scheduler();
    let lost = running.await.expect("the client's task");
    assert!(lost.is_err(), "the COPY finished before the kill: {lost:?}");
    job_id
}

/// `OPTIONS (...)` for moto whose requests time out after `timeout`.
fn options_with_timeout(s3: &S3Server, timeout: &str) -> String {
    let mut options = s3.options_as(&S3Credentials::any());
    options.push(("aws.timeout".into(), timeout.into()));
    let options: Vec<String> = options
        .iter()
        .map(|(key, value)| format!("'{key}' '{value}'"))
        .collect();
    format!("OPTIONS ({})", options.join(", "))
}

/// A `COPY` of `rows` rows of poorly compressible text to
/// `s3://lake/<folder>/`, written as multipart uploads (with
/// [`upload_in_small_parts`]).
fn copy_with_uploads(rows: u64, folder: &str, options: &str) -> String {
    format!(
        "COPY (SELECT value, md5(CAST(value AS VARCHAR)) AS digest FROM range({rows})) \
         TO 's3://lake/{folder}/' STORED AS PARQUET {options}"
    )
}

/// A scheduler killed while a `COPY` writes with credentials of its own
/// (the statement's options) settles the write when it starts again with
/// those credentials, which it kept in its state store: neither its catalog
/// nor its environment (a reader's keys here) may delete the staged files.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_scheduler_settles_a_copy_with_the_copys_credentials() {
    let (s3, users) =
        S3Server::start_with_users("lake", &[("writer", &["s3:*"]), ("reader", READS)]);
    let [writer, reader] = users.as_slice() else {
        panic!("two users");
    };
    let args = ClusterArgs {
        env: s3.env_as(reader),
        ..ClusterArgs::default()
    };
    let mut cluster = ProcessCluster::start(1, args);
    let context = cluster.connect(1).await;
    upload_in_small_parts(&context).await;
    let copy = copy_with_uploads(2_000_000, "interrupted", &s3.sql_options_as(writer));
    let bucket = s3.store_as("lake", writer);
    let job_id =
        kill_the_scheduler_during(&mut cluster, &context, &bucket, "interrupted", copy).await;

    cluster.start_scheduler();
    let context = cluster.connect(1).await;
    let status = context.wait_for_job(&job_id).await.expect("status");
    assert!(
        status.error.contains("its write was rolled back"),
        "{status:?}\n{}",
        cluster.scheduler_log()
    );
    // The upload records are removed once their uploads are aborted.
    assert_eq!(
        list(&bucket, "interrupted").await,
        Vec::<String>::new(),
        "{}",
        cluster.logs()
    );
}

/// An executor whose credentials may not write where the scheduler's may
/// (each process takes its own from its environment) fails a write through
/// one of DataFusion's own sinks (CSV, JSON, one Parquet file) saying
/// where and why, at once: those sinks would say only "Error encountered
/// while finalizing writes", and were retried. A staged Parquet write that
/// the executor may not make blames its output, not the input it read.
/// Nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sink_its_executor_may_not_write_names_its_location() {
    let (s3, users) =
        S3Server::start_with_users("lake", &[("writer", &["s3:*"]), ("reader", READS)]);
    let [writer, reader] = users.as_slice() else {
        panic!("two users");
    };
    let args = ClusterArgs {
        env: s3.env_as(writer),
        executor_env: s3.env_as(reader),
        ..ClusterArgs::default()
    };
    let cluster = ProcessCluster::start(1, args);
    let context = cluster.connect(1).await;
    for (format, target) in [
        ("CSV", "s3://lake/csv/"),
        ("JSON", "s3://lake/json/"),
        ("PARQUET", "s3://lake/one.parquet"),
    ] {
        let sql = format!("COPY (SELECT 1 AS x) TO '{target}' STORED AS {format}");
        let error = run(&context, &sql).await.expect_err(&sql);
        assert!(
            error.contains(&format!("cannot write to '{target}'"))
                && error.contains("cannot create objects there")
                && error.contains("AccessDenied"),
            "{format}: {error}"
        );
        assert!(
            !error.contains("finalizing writes") && !error.contains("attempts"),
            "{format}: {error}"
        );
        assert!(!error.contains(&reader.secret_key), "{error}");
    }
    let bucket = s3.store_as("lake", writer);
    bucket
        .put(&Path::from("data/part-0.parquet"), one_two_three())
        .await
        .expect("upload");
    run(
        &context,
        "CREATE EXTERNAL TABLE source STORED AS PARQUET LOCATION 's3://lake/data/'",
    )
    .await
    .expect("the table");
    let error = run(
        &context,
        "COPY (SELECT * FROM source) TO 's3://lake/staged/' STORED AS PARQUET",
    )
    .await
    .expect_err("the executor may not write");
    assert!(
        error.contains("cannot write to 's3://lake/staged/'") && !error.contains("reading '"),
        "{error}"
    );
    assert_eq!(list(&bucket, "").await, vec!["data/part-0.parquet"]);
}

/// A scheduler that starts while the store of its tables does not answer
/// waits for that store once, not once per table on it: the tables after
/// the first are kept without being tried, and a statement naming one says
/// why. Once the store answers again they are recreated, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_waits_once_for_a_store_that_does_not_answer() {
    use std::time::{Duration, Instant};

    use common::processes::send_signal;

    const TABLES: [&str; 3] = ["first", "second", "third"];
    let s3 = S3Server::start();
    s3.create_bucket("lake");
    let mut cluster = ProcessCluster::start(1, ClusterArgs::default());
    let context = cluster.connect(1).await;
    // A frozen store fails each request after two seconds, not thirty.
    let options = options_with_timeout(&s3, "2s");
    for table in TABLES {
        let location = format!("s3://lake/{table}/");
        for sql in [
            format!(
                "COPY (SELECT value AS v FROM range(10)) TO '{location}' STORED AS PARQUET {options}"
            ),
            format!(
                "CREATE EXTERNAL TABLE {table} STORED AS PARQUET LOCATION '{location}' {options}"
            ),
        ] {
            run(&context, &sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }
    drop(context);
    cluster.kill_scheduler();
    let moto = s3.pid();
    send_signal(moto, "STOP");
    cluster.start_scheduler();
    let context = cluster.connect(1).await;
    let answer = run(&context, "SELECT * FROM third").await;
    let first = run(&context, "SELECT * FROM first").await;
    send_signal(moto, "CONT");
    let error = answer.expect_err("the store did not answer at the start");
    assert!(
        error.contains("not tried: its store did not answer when")
            && error.contains("first' was recreated")
            && !error.contains("External error"),
        "{error}\n{}",
        cluster.scheduler_log()
    );
    let error = first.expect_err("the store did not answer at the start");
    assert!(!error.contains("not tried"), "the first was tried: {error}");

    let deadline = Instant::now() + Duration::from_secs(120);
    for table in TABLES {
        let sql = format!("SELECT count(*)::bigint unsigned FROM {table}");
        while run(&context, &sql).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "{table} was not recreated\n{}",
                cluster.scheduler_log()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(count_of(&context, &sql).await, 10, "{table}");
    }
}

/// A write that a restarted scheduler could not settle, its store frozen,
/// is settled once the store answers, while the scheduler runs: its job,
/// recorded first as unsettled, is then recorded as rolled back, and the
/// write leaves nothing behind, durable map outputs included, with no other
/// restart. The start does not even try to settle it (nor counts it as a
/// try): replaying the catalog found its store silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_the_start_could_not_settle_is_settled_once_its_store_answers() {
    use common::processes::send_signal;

    let s3 = S3Server::start();
    s3.create_bucket("lake");
    let mut cluster = ProcessCluster::start(1, ClusterArgs::default());
    let context = cluster.connect(1).await;
    upload_in_small_parts(&context).await;
    // The job keeps its options, as the table does: settling, and
    // recreating the table, fail within seconds too.
    let options = options_with_timeout(&s3, "2s");
    for statement in [
        format!("COPY (SELECT 1 AS x) TO 's3://lake/earlier/' STORED AS PARQUET {options}"),
        format!(
            "CREATE EXTERNAL TABLE earlier STORED AS PARQUET LOCATION 's3://lake/earlier/' {options}"
        ),
    ] {
        run(&context, &statement).await.expect(&statement);
    }
    run(
        &context,
        "SET quiver.shuffle_location = 's3://lake/_shuffle'",
    )
    .await
    .expect("set the shuffle location");
    let copy = copy_with_uploads(2_000_000, "unsettled", &options);
    let bucket = s3.store("lake");
    let job_id =
        kill_the_scheduler_during(&mut cluster, &context, &bucket, "unsettled", copy).await;
    // A map output that the job's killed tasks left.
    let shuffle = format!("_shuffle/{job_id}");
    bucket
        .put(
            &Path::from(format!("{shuffle}/1/0-a0.data")),
            b"left".to_vec().into(),
        )
        .await
        .expect("plant a map output");

    let moto = s3.pid();
    send_signal(moto, "STOP");
    cluster.start_scheduler();
    let context = cluster.connect(1).await;
    let unsettled = context.wait_for_job(&job_id).await;
    send_signal(moto, "CONT");
    let unsettled = unsettled.expect("the job's status");
    assert!(
        unsettled.error.contains("could not be told")
            && unsettled
                .error
                .contains("tried again while the scheduler runs"),
        "{unsettled:?}\n{}",
        cluster.scheduler_log()
    );
    // The start did not try the write: it does not count towards giving up.
    assert!(
        unsettled.error.contains("(0 of 5 starts tried"),
        "{unsettled:?}"
    );
    let log = cluster.scheduler_log();
    assert!(
        log.contains("not settling the write of an interrupted job now")
            && log.contains(
                "its store did not answer when 'datafusion.public.earlier' was recreated"
            ),
        "{log}"
    );

    let settled = status_once(&context, &cluster, &job_id, "settled", |status| {
        !status.error.contains("could not be told")
    })
    .await;
    assert_eq!(settled.state(), JobState::Failed, "{settled:?}");
    assert!(
        settled.error.contains("its write was rolled back"),
        "{settled:?}"
    );
    for folder in ["unsettled", shuffle.as_str()] {
        assert_eq!(
            list(&bucket, folder).await,
            Vec::<String>::new(),
            "{}",
            cluster.logs()
        );
    }
}

/// A restart whose interrupted job writes to one store and copies its map
/// outputs to another, frozen: the write is settled (rolled back) within
/// the start, and its store is not taken as silent, while deleting the map
/// outputs gives up after 60 s; they are deleted once their store answers
/// again, with no other restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_shuffle_store_holds_up_neither_the_write_nor_its_own_clean_up() {
    use common::processes::send_signal;

    let lake = S3Server::start();
    lake.create_bucket("lake");
    let shuffle_store = S3Server::start();
    shuffle_store.create_bucket("maps");
    let mut cluster = ProcessCluster::start(1, ClusterArgs::default());
    let context = cluster.connect(1).await;
    upload_in_small_parts(&context).await;
    // The write configures the shuffle bucket for the session's statements.
    let seed = format!(
        "COPY (SELECT 1 AS one) TO 's3://maps/seed/' STORED AS PARQUET {}",
        shuffle_store.sql_options()
    );
    run(&context, &seed)
        .await
        .expect("configure the shuffle bucket");
    run(
        &context,
        "SET quiver.shuffle_location = 's3://maps/shuffle'",
    )
    .await
    .expect("set the shuffle location");
    let copy = copy_with_uploads(2_000_000, "interrupted", &lake.sql_options());
    let bucket = lake.store("lake");
    let job_id =
        kill_the_scheduler_during(&mut cluster, &context, &bucket, "interrupted", copy).await;
    // A map output that the job's killed tasks left.
    let maps = shuffle_store.store("maps");
    let map_output = Path::from(format!("shuffle/{job_id}/1/0-a0.data"));
    maps.put(&map_output, b"left".to_vec().into())
        .await
        .expect("plant a map output");

    let frozen = shuffle_store.pid();
    send_signal(frozen, "STOP");
    cluster.start_scheduler();
    let context = cluster.connect(1).await;
    let settled = context.wait_for_job(&job_id).await;
    let log = cluster.scheduler_log();
    send_signal(frozen, "CONT");
    let settled = settled.expect("the job's status");
    assert!(
        settled.error.contains("its write was rolled back"),
        "{settled:?}\n{log}"
    );
    assert!(
        log.contains("removing the durable shuffle data of an interrupted job timed out")
            && !log.contains("not settling the write"),
        "{log}"
    );
    assert_eq!(list(&bucket, "interrupted").await, Vec::<String>::new());

    emptied(&maps, "shuffle", &cluster).await;
}

/// A `CREATE TABLE made AS` of 500 rows into an S3 warehouse, left as an
/// earlier start leaves it when it could not settle the write: the job
/// recorded as failed (with none of what it wrote), the table pending, the
/// scheduler stopped. Returns the job's id and what it wrote.
async fn leave_a_table_pending_by_an_earlier_start(
    s3: &S3Server,
) -> (ProcessCluster, String, (u64, u64)) {
    use quiver_scheduler::store::{JobEntry, StateStore};

    s3.create_bucket("lake");
    let args = ClusterArgs {
        scheduler: vec!["--warehouse".into(), "s3://lake/warehouse/".into()],
        env: s3.env_as(&S3Credentials::any()),
        ..ClusterArgs::default()
    };
    let mut cluster = ProcessCluster::start(1, args);
    let context = cluster.connect(1).await;
    run(
        &context,
        "CREATE TABLE made AS SELECT value AS v FROM range(500)",
    )
    .await
    .expect("CREATE TABLE AS");
    let job_id = context
        .list_jobs(0)
        .await
        .expect("job list")
        .into_iter()
        .filter(|record| record.query.contains("CREATE TABLE made"))
        .find_map(|record| record.status.map(|status| status.job_id))
        .expect("the job is in the history");
    drop(context);
    cluster.kill_scheduler();

    let store = StateStore::open(&cluster.work_dir().join("scheduler-state")).expect("state");
    let mut record = store
        .jobs()
        .expect("jobs")
        .into_iter()
        .find(|record| record.status.as_ref().is_some_and(|s| s.job_id == job_id))
        .expect("the job's record");
    let status = record.status.as_mut().expect("status");
    let written = (status.table_files_written, status.table_bytes_written);
    assert!(written.0 > 0 && written.1 > 0, "{status:?}");
    status.state = JobState::Failed.into();
    status.error = "left by an earlier start".into();
    (status.table_files_written, status.table_bytes_written) = (0, 0);
    record.write_unsettled = false;
    store
        .put_job_entries(&[JobEntry::Record(record.into())])
        .expect("put the job back");
    common::leave_table_pending(&store, "made", &job_id);
    (cluster, job_id, written)
}

/// Waits until the status of the job `job_id` is as `wanted` (`what`, for
/// the failure message), and returns it.
async fn status_once(
    context: &QuiverContext,
    cluster: &ProcessCluster,
    job_id: &str,
    what: &str,
    wanted: impl Fn(&quiver_proto::JobStatus) -> bool,
) -> quiver_proto::JobStatus {
    use std::time::{Duration, Instant};

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = context.job_status(job_id).await.expect("status");
        if wanted(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "never {what}: {status:?}\n{}",
            cluster.scheduler_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the pending table `made` of the job `job_id` is registered:
/// the job is recorded as succeeded, with the files and bytes it `written`,
/// and the table reads its 500 rows.
async fn registered_with(
    context: &QuiverContext,
    cluster: &ProcessCluster,
    job_id: &str,
    written: (u64, u64),
) {
    let settled = status_once(context, cluster, job_id, "succeeded", |status| {
        status.state() == JobState::Succeeded
    })
    .await;
    assert_eq!(settled.error, "", "{settled:?}");
    assert_eq!(
        (settled.table_files_written, settled.table_bytes_written),
        written
    );
    assert_eq!(
        count_of(context, "SELECT count(*)::bigint unsigned FROM made").await,
        500
    );
}

/// Waits until the scheduler that `context` reaches serves statements.
async fn serving(context: &QuiverContext, cluster: &ProcessCluster) {
    use std::time::{Duration, Instant};

    let deadline = Instant::now() + Duration::from_secs(240);
    while run(context, "SELECT 1").await.is_err() {
        assert!(Instant::now() < deadline, "{}", cluster.scheduler_log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The table of a `CREATE TABLE AS` that an earlier start left pending
/// (its job recorded as failed, its write not settled), on a store that is
/// frozen when the scheduler starts again, is registered by the running
/// scheduler once the store answers: its write settles as committed, the
/// table reads, and its job is recorded as succeeded, with what it wrote,
/// and no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pending_table_an_earlier_start_left_is_settled_once_its_store_answers() {
    use common::processes::send_signal;

    let s3 = S3Server::start();
    let (mut cluster, job_id, written) = leave_a_table_pending_by_an_earlier_start(&s3).await;
    let moto = s3.pid();
    send_signal(moto, "STOP");
    cluster.start_scheduler();
    let context = cluster.connect(1).await;
    // Statements are served once the start is over.
    serving(&context, &cluster).await;
    send_signal(moto, "CONT");
    let status = context.job_status(&job_id).await.expect("status");
    assert_eq!(status.error, "left by an earlier start", "not settled yet");

    registered_with(&context, &cluster, &job_id, written).await;
}

/// The table of a `CREATE TABLE AS` that an earlier start left pending,
/// whose write the next start settles as committed but whose table it
/// cannot register (its files do not read as Parquet then): the job is
/// recorded at once as having committed, with what it wrote, and as
/// succeeded, with the same counts, once the running scheduler registers
/// the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pending_table_registered_after_its_start_keeps_what_its_job_wrote() {
    let s3 = S3Server::start();
    let (mut cluster, job_id, written) = leave_a_table_pending_by_an_earlier_start(&s3).await;
    let bucket = s3.store("lake");
    let mut data_files = Vec::new();
    let objects = list(&bucket, "warehouse").await;
    for name in &objects {
        if name.ends_with(".parquet") && !name.contains("/_") {
            let path = Path::from(name.as_str());
            let bytes = bucket.get(&path).await.expect("get").bytes().await;
            data_files.push((path, bytes.expect("read")));
        }
    }
    assert!(!data_files.is_empty(), "{objects:?}");
    for (path, _) in &data_files {
        bucket
            .put(path, PutPayload::from_static(b"not parquet"))
            .await
            .expect("spoil a data file");
    }

    cluster.start_scheduler();
    let context = cluster.connect(1).await;
    serving(&context, &cluster).await;
    let committed = status_once(
        &context,
        &cluster,
        &job_id,
        "recorded as committed",
        |status| status.error.contains("its write committed"),
    )
    .await;
    assert_eq!(committed.state(), JobState::Failed, "{committed:?}");
    assert_eq!(
        (committed.table_files_written, committed.table_bytes_written),
        written
    );

    for (path, bytes) in data_files {
        bucket
            .put(&path, PutPayload::from(bytes))
            .await
            .expect("restore a data file");
    }
    registered_with(&context, &cluster, &job_id, written).await;
}

/// An executor killed while it uploads a file cannot abort the upload, and
/// S3 lists no unfinished upload among the bucket's objects. The write task
/// records each upload's id in the job's staging folder before the first
/// part, so the commit of the retried task aborts the one the kill left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_left_by_a_killed_executor_is_aborted() {
    const ROWS: u64 = 2_000_000;
    let s3 = S3Server::start();
    s3.create_bucket("lake");
    let mut cluster = ProcessCluster::start(1, ClusterArgs::default());
    let context = cluster.connect(1).await;
    upload_in_small_parts(&context).await;
    let copy = copy_with_uploads(ROWS, "killed", &s3.sql_options());
    let written = count_killing_an_uploader(&s3, &mut cluster, &context, copy).await;
    assert_eq!(written, ROWS);
    let bucket = s3.store("lake");
    let objects = list(&bucket, "killed").await;
    assert!(
        objects.iter().all(|o| !o.contains("_temporary")),
        "staging left behind: {objects:?}"
    );
    assert_eq!(
        s3.unfinished_uploads("lake"),
        0,
        "the killed attempt's upload is still open\n{}",
        cluster.logs()
    );
    run(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE killed STORED AS PARQUET LOCATION 's3://lake/killed/' {}",
            s3.sql_options()
        ),
    )
    .await
    .expect("register the written folder");
    let distinct = count_of(
        &context,
        "SELECT count(DISTINCT value)::bigint unsigned FROM killed",
    )
    .await;
    let total = count_of(&context, "SELECT count(*)::bigint unsigned FROM killed").await;
    assert_eq!((distinct, total), (ROWS, ROWS), "every row once");
}

/// A commit whose store stops answering while it changes the table (moto,
/// paused) does not hold its job for ever: once the time the scheduler
/// allowed it to act has run out (`--commit-timeout-secs`), it counts as a
/// failed attempt, and the next attempt commits once the store answers
/// again: every row once. Requests wait for the store (`aws.timeout`), so
/// only the commit's time limit ends the stalled attempt. A run whose
/// commit was over before the pause landed is run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_stalled_past_its_time_counts_as_failed_and_is_retried() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use common::processes::send_signal;

    const ROWS: u64 = 200_000;
    const RUNS: usize = 5;
    // The executor stops the attempt itself; the scheduler would take it
    // as failed a little later, had it not reported.
    let stopped = |cluster: &ProcessCluster| {
        cluster.executor_log(0).contains("--commit-timeout-secs")
            || cluster
                .scheduler_log()
                .contains("a commit ran past its time")
    };
    let s3 = S3Server::start();
    s3.create_bucket("lake");
    let args = ClusterArgs {
        scheduler: ["--commit-timeout-secs", "2"].map(String::from).to_vec(),
        ..ClusterArgs::default()
    };
    let cluster = ProcessCluster::start(1, args);
    let context = cluster.connect(1).await;
    run(&context, "SET quiver.target_file_bytes = 32768")
        .await
        .expect("small files: a longer commit");
    let options = options_with_timeout(&s3, "300s");
    let moto = s3.pid();
    for run_number in 0..RUNS {
        let target = format!("s3://lake/stalled-{run_number}/");
        let copy = format!(
            "COPY (SELECT value FROM range({ROWS})) TO '{target}' STORED AS PARQUET {options}"
        );
        let paused = Arc::new(AtomicBool::new(false));
        let job = tokio::spawn({
            let context = context.clone();
            let paused = Arc::clone(&paused);
            async move {
                let progress = move |status: &quiver_proto::JobStatus| {
                    if status.committing && !paused.swap(true, Ordering::SeqCst) {
                        send_signal(moto, "STOP");
                    }
                };
                let stream = context
                    .execute_sql(&copy, progress)
                    .await
                    .map_err(|e| e.to_string())?;
                datafusion::physical_plan::common::collect(stream)
                    .await
                    .map_err(|e| e.to_string())
            }
        });
        // A bound on the wait only: the store stays paused until then.
        let deadline = Instant::now() + Duration::from_secs(120);
        let overdue = loop {
            if stopped(&cluster) {
                break true;
            }
            if job.is_finished() || Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if paused.load(Ordering::SeqCst) {
            send_signal(moto, "CONT");
        }
        let result = tokio::time::timeout(Duration::from_secs(300), job)
            .await
            .unwrap_or_else(|_| panic!("the job hung\n{}", cluster.logs()))
            .expect("the job's task");
        let batches = result.unwrap_or_else(|e| panic!("the COPY failed: {e}\n{}", cluster.logs()));
        if !overdue {
            continue;
        }
        let written: u64 = batches
            .iter()
            .map(|batch| batch.column(0).as_primitive::<UInt64Type>().value(0))
            .sum();
        assert_eq!(written, ROWS, "the job's count");
        let table = format!("stalled_{run_number}");
        run(
            &context,
            &format!(
                "CREATE EXTERNAL TABLE {table} STORED AS PARQUET LOCATION '{target}' {options}"
            ),
        )
        .await
        .expect("register the written folder");
        let distinct = count_of(
            &context,
            &format!("SELECT count(DISTINCT value)::bigint unsigned FROM {table}"),
        )
        .await;
        let total = count_of(
            &context,
            &format!("SELECT count(*)::bigint unsigned FROM {table}"),
        )
        .await;
        assert_eq!((distinct, total), (ROWS, ROWS), "every row once");
        let objects = list(&s3.store("lake"), &format!("stalled-{run_number}")).await;
        assert!(
            objects.iter().all(|o| !o.contains("_temporary")),
            "staging left behind: {objects:?}"
        );
        return;
    }
    panic!(
        "could not stall a commit in {RUNS} runs\n{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_locations_get_clear_errors_without_secrets() {
    let s3 = S3Server::start();
    s3.create_bucket("lake");
    let bucket = s3.store("lake");
    bucket
        .put(
            &Path::from("text/notes.parquet"),
            PutPayload::from_static(b"this is not a parquet file"),
        )
        .await
        .expect("upload");
    let (cluster, context) = common::start_cluster(options()).await;

    // A folder of Parquet data with markers and checksums beside it, as
    // Hadoop and other writers leave them, registers without its columns.
    let mut data = Vec::new();
    let batch = RecordBatch::try_from_iter([("x", Arc::new(Int64Array::from(vec![1, 2, 3])) as _)])
        .expect("batch");
    let mut writer = ArrowWriter::try_new(&mut data, batch.schema(), None).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
    for (name, bytes) in [
        ("marked/part-1.parquet", data.clone()),
        ("marked/_SUCCESS", b"{\"committed\": true}".to_vec()),
        ("marked/.part-1.parquet.crc", b"crc32 of part-1".to_vec()),
        ("marked_hive/_SUCCESS", b"{\"committed\": true}".to_vec()),
        ("marked_hive/year=2024/part-1.parquet", data.clone()),
        (
            "marked_hive/year=2024/.part-1.parquet.crc",
            b"crc32".to_vec(),
        ),
        ("marked_hive/year=2025/part-1.parquet", data.clone()),
        // Hive's extension-less data file, and a console's folder marker.
        ("hive_named/000000_0", data.clone()),
        ("only_markers/_SUCCESS", Vec::new()),
        ("only_markers/year=2024/empty.parquet", Vec::new()),
    ] {
        bucket
            .put(&Path::from(name), PutPayload::from(bytes))
            .await
            .expect("upload");
    }
    run(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE marked STORED AS PARQUET LOCATION 's3://lake/marked/' {}",
            s3.sql_options()
        ),
    )
    .await
    .expect("a folder with markers registers");
    assert_eq!(
        count_of(&context, "SELECT count(*)::bigint unsigned FROM marked").await,
        3
    );
    // A table whose bucket is deleted after it was created: reading it and
    // writing into it fail naming its location, not only a request.
    s3.create_bucket("fleeting");
    let fleeting = s3.store("fleeting");
    let part = Path::from("t/part-1.parquet");
    fleeting
        .put(&part, PutPayload::from(data.clone()))
        .await
        .expect("upload");
    run(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE fleeting STORED AS PARQUET LOCATION 's3://fleeting/t/' {}",
            s3.sql_options()
        ),
    )
    .await
    .expect("create the table");
    fleeting.delete(&part).await.expect("empty the bucket");
    s3.delete_bucket("fleeting");
    for sql in [
        "SELECT count(*) FROM fleeting",
        "INSERT INTO fleeting VALUES (4)",
    ] {
        let error = run(&context, sql).await.expect_err(sql);
        let named = match sql.starts_with("SELECT") {
            true => "cannot read the table at 's3://fleeting/t/'",
            false => "cannot write to the table at 's3://fleeting/t/'",
        };
        assert!(
            error.contains(named) && error.contains("NoSuchBucket"),
            "{sql}: {error}"
        );
        assert!(!error.contains(SECRET_KEY), "{error}");
    }
    // So does a hive-partitioned one, with its partition column.
    run(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE marked_hive STORED AS PARQUET LOCATION 's3://lake/marked_hive/' {}",
            s3.sql_options()
        ),
    )
    .await
    .expect("a partitioned folder with markers registers");
    assert_eq!(
        count_of(
            &context,
            "SELECT count(*)::bigint unsigned FROM marked_hive WHERE year = '2025'"
        )
        .await,
        3
    );
    // A folder the table would read nothing of is refused, rather than
    // registered to answer with no rows (or no columns).
    for (folder, expected) in [
        ("hive_named", "would read none of its files"),
        ("only_markers", "no Parquet data file"),
    ] {
        let error = run(
            &context,
            &format!(
                "CREATE EXTERNAL TABLE {folder} STORED AS PARQUET LOCATION 's3://lake/{folder}/' {}",
                s3.sql_options()
            ),
        )
        .await
        .expect_err("a folder without data files must be refused");
        assert!(error.contains(expected), "{folder}: {error}");
        assert!(!error.contains(SECRET_KEY), "{error}");
    }

    // A secret shows neither in EXPLAIN nor, however it is quoted, in the
    // job history (checked at the end).
    let explained = run(
        &context,
        &format!(
            "EXPLAIN VERBOSE COPY (SELECT 1 AS x) TO 's3://lake/explained/' STORED AS PARQUET {}",
            s3.sql_options()
        ),
    )
    .await
    .expect("explain");
    let explained = arrow::util::pretty::pretty_format_batches(&explained)
        .expect("format")
        .to_string();
    assert!(explained.contains("CopyTo"), "{explained}");
    assert!(
        !explained.contains(SECRET_KEY),
        "EXPLAIN shows the secret: {explained}"
    );
    run(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE double_quoted STORED AS PARQUET LOCATION 's3://lake/marked/' {}",
            s3.sql_options()
                .replace(&format!("'{SECRET_KEY}'"), &format!("\"{SECRET_KEY}\""))
        ),
    )
    .await
    .expect("a double-quoted secret works");

    let cases = [
        (
            "missing bucket",
            format!(
                "CREATE EXTERNAL TABLE t1 STORED AS PARQUET LOCATION 's3://no-such-bucket/t/' {}",
                s3.sql_options()
            ),
            "no-such-bucket",
        ),
        (
            "not Parquet",
            format!(
                "CREATE EXTERNAL TABLE t2 STORED AS PARQUET LOCATION 's3://lake/text/' {}",
                s3.sql_options()
            ),
            "cannot read the footer of 's3://lake/text/notes.parquet'",
        ),
        (
            "misspelt option",
            format!(
                "CREATE EXTERNAL TABLE t3 STORED AS PARQUET LOCATION 's3://lake/text/' \
                 OPTIONS ('aws.secret_acces_key' '{SECRET_KEY}')"
            ),
            "aws.secret_acces_key",
        ),
        (
            "write to a missing bucket",
            format!(
                "COPY (SELECT 1 AS x) TO 's3://no-such-bucket/out/' STORED AS PARQUET {}",
                s3.sql_options()
            ),
            "no-such-bucket",
        ),
        (
            "a password in an explained location",
            format!(
                "EXPLAIN COPY (SELECT 1 AS x) TO 's3://u:{SECRET_KEY}@lake/out/' STORED AS PARQUET"
            ),
            "'s3://u:***@lake/out/' holds a password",
        ),
        (
            // A URL parser reads no password here, but a port.
            "a password with a slash in a location",
            format!(
                "CREATE EXTERNAL TABLE t4 STORED AS PARQUET \
                 LOCATION 's3://AKIAEX:ab/{SECRET_KEY}@lake/t/'"
            ),
            "'s3://AKIAEX:***@lake/t/' holds a password",
        ),
        (
            // ARROW takes no options: it would be accepted, and kept as written.
            "a store option without its prefix",
            format!(
                "CREATE EXTERNAL TABLE t5 (a INT) STORED AS ARROW LOCATION 's3://lake/arrow/' \
                 OPTIONS ('secret_access_key' '{SECRET_KEY}')"
            ),
            "write it with its store's prefix, as 'aws.secret_access_key'",
        ),
        (
            "an explained store option without its prefix",
            format!(
                "EXPLAIN COPY (SELECT 1 AS x) TO 's3://lake/out/' STORED AS ARROW \
                 OPTIONS ('aws_secret_access_key' '{SECRET_KEY}')"
            ),
            "write it with its store's prefix, as 'aws.secret_access_key'",
        ),
        (
            "a statement DataFusion echoes",
            format!(
                "CREATE TABLE h STORED AS PARQUET LOCATION 's3://lake/h/' \
                 OPTIONS ('aws.secret_access_key' = '{SECRET_KEY}') AS SELECT 1"
            ),
            "Unsupported SQL statement",
        ),
    ];
    for (case, sql, named) in cases {
        let error = run(&context, &sql)
            .await
            .expect_err(&format!("{case} must fail"));
        eprintln!("{case}: {error}");
        assert!(
            error.contains(named),
            "{case}: '{error}' does not name {named}"
        );
        assert!(
            !error.contains(SECRET_KEY),
            "{case}: the error shows the secret: {error}"
        );
    }
    // A COPY that names a dead endpoint fails when planned (a write's
    // access to its folder is checked first, one file's included), which
    // puts its bucket's options back: the table on that bucket still reads.
    // (A job that fails puts them back too: see the IAM test.)
    let dead_endpoint = s3
        .sql_options()
        .replace(&s3.endpoint(), "http://127.0.0.1:1");
    let error = run(
        &context,
        &format!(
            "COPY (SELECT 1 AS x) TO 's3://lake/failed_copy.parquet' STORED AS PARQUET \
             {dead_endpoint}"
        ),
    )
    .await
    .expect_err("the COPY cannot reach its endpoint");
    assert!(
        error.contains("cannot write to 's3://lake/failed_copy.parquet'"),
        "{error}"
    );
    let still_reads = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        count_of(&context, "SELECT count(*)::bigint unsigned FROM marked"),
    )
    .await
    .expect("the table reads: its bucket must not keep the failed COPY's endpoint");
    assert_eq!(still_reads, 3);

    // A durable shuffle location that cannot hold map outputs is refused as
    // a job is planned, naming it, rather than failing each map task four
    // times. `gone` is configured (by a COPY), then deleted.
    s3.create_bucket("gone");
    let seed = format!(
        "COPY (SELECT 1 AS x) TO 's3://gone/seed/' STORED AS PARQUET {}",
        s3.sql_options()
    );
    run(&context, &seed).await.expect("configure the bucket");
    let gone = s3.store("gone");
    for path in list(&gone, "").await {
        gone.delete(&Path::from(path))
            .await
            .expect("empty the bucket");
    }
    s3.delete_bucket("gone");
    let grouping = "SELECT count(*)::bigint unsigned FROM \
                    (SELECT value % 7 AS k FROM range(100) GROUP BY k)";
    for (location, why) in [
        (
            "s3://gone/shuffle",
            "its store refuses to create objects there",
        ),
        ("foo://x/y", "foo://x"),
        ("relative/maps", "it is a relative folder"),
    ] {
        let set = format!("SET quiver.shuffle_location = '{location}'");
        run(&context, &set).await.expect(&set);
        let error = run(&context, grouping).await.expect_err(location);
        let named = format!("quiver.shuffle_location '{location}' cannot hold map outputs");
        assert!(error.contains(&named) && error.contains(why), "{error}");
        assert!(!error.contains(SECRET_KEY), "{error}");
    }
    assert!(!std::path::Path::new("relative").exists());
    run(&context, "SET quiver.shuffle_location = 's3://lake/maps'")
        .await
        .expect("a location that works");
    assert_eq!(count_of(&context, grouping).await, 7);
    run(&context, "SET quiver.shuffle_location = ''")
        .await
        .expect("no durable shuffle");

    // Nothing partial was left, and the cluster serves the next job.
    assert!(list(&bucket, "out").await.is_empty());
    assert_eq!(count_of(&context, "SELECT 1::bigint unsigned").await, 1);
    assert_no_secret_in_history(&context, SECRET_KEY).await;
    cluster.shutdown().await;
}

/// A cluster of processes, one executor, that use the AWS profile `profile`
/// of the files that `files` names by their variables (`AWS_CONFIG_FILE`).
async fn cluster_with_aws_profile(
    files: &[(&str, &std::path::Path)],
    profile: &str,
) -> (ProcessCluster, QuiverContext) {
    let mut env: Vec<(String, String)> = files
        .iter()
        .map(|(name, path)| ((*name).to_owned(), path.display().to_string()))
        .collect();
    env.push(("AWS_PROFILE".to_owned(), profile.to_owned()));
    let processes = ProcessCluster::start(
        1,
        ClusterArgs {
            env,
            ..ClusterArgs::default()
        },
    );
    let context = processes.connect(1).await;
    (processes, context)
}

/// A Parquet file of one column `x` holding 1, 2 and 3.
fn one_two_three() -> PutPayload {
    PutPayload::from(one_two_three_parquet())
}

/// A Parquet file of one column `x`: 1, 2, 3.
fn one_two_three_parquet() -> Vec<u8> {
    let mut data = Vec::new();
    let batch = RecordBatch::try_from_iter([("x", Arc::new(Int64Array::from(vec![1, 2, 3])) as _)])
        .expect("batch");
    let mut writer = ArrowWriter::try_new(&mut data, batch.schema(), None).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
    data
}

/// On an S3 server that checks signatures and permissions as AWS does
/// (moto with IAM): a wrong secret, an unknown key, a user who may only
/// read and a user who may write but not delete each get a clear error that
/// names the location and not the secret, and a write refused so leaves no
/// data file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credentials_and_permissions_are_checked_on_s3() {
    const WRONG_SECRET: &str = "quiver-wrong-secret-K4p8Z";
    let writes_without_delete: &[&str] = &[
        "s3:GetObject",
        "s3:HeadObject",
        "s3:ListBucket",
        "s3:ListObjectsV2",
        "s3:PutObject",
        "s3:AbortMultipartUpload",
        "s3:ListBucketMultipartUploads",
    ];
    // May write, delete and list, but not read: could not check a write's
    // staged files. (moto checks `s3:DeleteObjects` for a multi-object
    // delete, where AWS checks `s3:DeleteObject`.)
    let blind_writes: &[&str] = &[
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:DeleteObjects",
        "s3:ListBucket",
        "s3:ListObjectsV2",
        "s3:AbortMultipartUpload",
        "s3:ListBucketMultipartUploads",
    ];
    // May write and delete but not list: could not find a failed write's
    // staged files to roll it back.
    let writes_without_list: &[&str] = &[
        "s3:GetObject",
        "s3:HeadObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:DeleteObjects",
        "s3:AbortMultipartUpload",
        "s3:ListBucketMultipartUploads",
    ];
    let (s3, users) = S3Server::start_with_users(
        "lake",
        &[
            ("admin", &["s3:*"]),
            ("reader", READS),
            ("writer", writes_without_delete),
            ("blind", blind_writes),
            ("unlisting", writes_without_list),
        ],
    );
    let [admin, reader, writer, blind, unlisting] = users.as_slice() else {
        panic!("five users");
    };
    let bucket = s3.store_as("lake", admin);
    bucket
        .put(&Path::from("data/part-0.parquet"), one_two_three())
        .await
        .expect("the admin uploads");
    let (cluster, context) = common::start_cluster(options()).await;

    run(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE readable STORED AS PARQUET LOCATION 's3://lake/data/' {}",
            s3.sql_options_as(reader)
        ),
    )
    .await
    .expect("the reader may read");
    assert_eq!(
        count_of(&context, "SELECT count(*)::bigint unsigned FROM readable").await,
        3
    );
    // The table's definition is kept without its secret.
    let shown = context
        .sql("SHOW CREATE TABLE readable")
        .await
        .expect("SHOW CREATE TABLE")
        .collect()
        .await
        .expect("definition");
    let shown = arrow::util::pretty::pretty_format_batches(&shown)
        .expect("format")
        .to_string();
    assert!(shown.contains("LOCATION 's3://lake/data/'"), "{shown}");
    assert!(!shown.contains(&reader.secret_key), "{shown}");

    let wrong_secret = S3Credentials {
        access_key: reader.access_key.clone(),
        secret_key: WRONG_SECRET.into(),
    };
    let unknown_key = S3Credentials {
        access_key: "AKIAQUIVERUNKNOWN000".into(),
        secret_key: WRONG_SECRET.into(),
    };
    let cases = [
        (
            "wrong secret",
            format!(
                "CREATE EXTERNAL TABLE t1 STORED AS PARQUET LOCATION 's3://lake/data/' {}",
                s3.sql_options_as(&wrong_secret)
            ),
            ["s3://lake/data", "SignatureDoesNotMatch"],
        ),
        (
            "unknown key",
            format!(
                "CREATE EXTERNAL TABLE t2 STORED AS PARQUET LOCATION 's3://lake/data/' {}",
                s3.sql_options_as(&unknown_key)
            ),
            ["s3://lake/data", "InvalidAccessKeyId"],
        ),
        (
            "a reader writes",
            format!(
                "COPY (SELECT 1 AS x) TO 's3://lake/by_reader/' STORED AS PARQUET {}",
                s3.sql_options_as(reader)
            ),
            ["s3://lake/by_reader", "cannot create objects"],
        ),
        (
            // DataFusion's own CSV sink would say only "Error encountered
            // while finalizing writes".
            "a reader writes CSV",
            format!(
                "COPY (SELECT 1 AS x) TO 's3://lake/csv_by_reader/' STORED AS CSV {}",
                s3.sql_options_as(reader)
            ),
            ["s3://lake/csv_by_reader", "cannot create objects"],
        ),
        (
            "a reader writes one file",
            format!(
                "COPY (SELECT 1 AS x) TO 's3://lake/one/by_reader.parquet' {}",
                s3.sql_options_as(reader)
            ),
            ["s3://lake/one/by_reader.parquet", "cannot create objects"],
        ),
        (
            "a writer that may not delete writes",
            format!(
                "COPY (SELECT x FROM readable) TO 's3://lake/by_writer/' STORED AS PARQUET {}",
                s3.sql_options_as(writer)
            ),
            ["s3://lake/by_writer", "not delete"],
        ),
        (
            "a writer that may not read writes",
            format!(
                "COPY (SELECT 1 AS x) TO 's3://lake/by_blind/' STORED AS PARQUET {}",
                s3.sql_options_as(blind)
            ),
            ["s3://lake/by_blind", "not read"],
        ),
        (
            "a writer that may not list writes",
            format!(
                "COPY (SELECT 1 AS x) TO 's3://lake/by_unlisting/' STORED AS PARQUET {}",
                s3.sql_options_as(unlisting)
            ),
            ["s3://lake/by_unlisting", "not list"],
        ),
        (
            // A CSV export deletes nothing: the right to create is enough.
            "a writer that may not delete writes CSV",
            format!(
                "COPY (SELECT 1 AS x) TO 's3://lake/csv_by_writer/' STORED AS CSV {}",
                s3.sql_options_as(writer)
            ),
            ["", ""],
        ),
        (
            "a writer that may not delete inserts",
            format!(
                "CREATE EXTERNAL TABLE appended (x BIGINT) STORED AS PARQUET \
                 LOCATION 's3://lake/appended/' {}",
                s3.sql_options_as(writer)
            ),
            ["", ""],
        ),
    ];
    for (case, sql, named) in cases {
        let result = run(&context, &sql).await;
        if named[0].is_empty() {
            result.unwrap_or_else(|e| panic!("{case}: {e}"));
            continue;
        }
        let error = result.expect_err(&format!("{case} must fail"));
        eprintln!("{case}: {error}");
        for name in named {
            assert!(
                error.contains(name),
                "{case}: '{error}' does not name {name}"
            );
        }
        for secret in [
            WRONG_SECRET,
            &reader.secret_key,
            &writer.secret_key,
            &blind.secret_key,
            &unlisting.secret_key,
        ] {
            assert!(
                !error.contains(secret),
                "{case}: the error shows a secret: {error}"
            );
        }
    }
    let error = run(&context, "INSERT INTO appended SELECT x FROM readable")
        .await
        .expect_err("an insert without the right to delete must fail");
    assert!(
        error.contains("s3://lake/appended") && error.contains("not delete"),
        "{error}"
    );

    // A COPY whose job fails puts its bucket's options back once its end
    // is seen: a later statement on that bucket runs with the keys of the
    // last statement that succeeded (the writer's), not the COPY's. The
    // files that one of its tasks staged before the other failed are
    // deleted with the COPY's keys all the same: the writer's may not.
    let error = run(
        &context,
        &format!(
            "COPY (SELECT value AS x FROM range(10) UNION ALL \
                   SELECT 10 / (value - 999999) AS x FROM range(1000000)) \
             TO 's3://lake/failed/' STORED AS PARQUET {}",
            s3.sql_options_as(admin)
        ),
    )
    .await
    .expect_err("the COPY divides by zero");
    assert!(
        error.starts_with("job ") && error.contains(" failed: "),
        "the job ran, and failed: {error}"
    );

    // No data file was left where readers look, nor staged: only the check
    // object that a writer who may not delete put. The failed job's files
    // go once its end is seen, which may be a moment after the client's.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let prefixes = [
        "by_reader",
        "by_writer",
        "by_blind",
        "by_unlisting",
        "appended",
        "failed",
    ];
    for prefix in prefixes {
        loop {
            let left: Vec<String> = list(&bucket, prefix)
                .await
                .into_iter()
                .filter(|path| !path.ends_with("/_access_check"))
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{prefix}: {left:?}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    assert_eq!(
        count_of(&context, "SELECT count(*)::bigint unsigned FROM readable").await,
        3
    );
    let error = run(
        &context,
        "COPY (SELECT 1 AS x) TO 's3://lake/after_failure/' STORED AS PARQUET",
    )
    .await
    .expect_err("the bucket's options are the writer's again");
    assert!(error.contains("not delete"), "{error}");
    for secret in [
        WRONG_SECRET,
        &reader.secret_key,
        &writer.secret_key,
        &admin.secret_key,
        &blind.secret_key,
        &unlisting.secret_key,
    ] {
        assert_no_secret_in_history(&context, secret).await;
    }
    cluster.shutdown().await;

    // Processes whose environment names a profile of the AWS CLI's files
    // take its keys, region and endpoint from there: a table given no
    // credentials reads, its requests signed with the profile's keys.
    let aws = tempfile::tempdir().expect("temp dir");
    let credentials = aws.path().join("credentials");
    let config = aws.path().join("config");
    std::fs::write(
        &credentials,
        format!(
            "[default]\naws_access_key_id = AKIAQUIVERUNKNOWN000\naws_secret_access_key = x\n\n\
             [lake]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            reader.access_key, reader.secret_key
        ),
    )
    .expect("write credentials");
    std::fs::write(
        &config,
        format!(
            "[profile lake]\nregion = us-east-1\nendpoint_url = {}\n",
            s3.endpoint()
        ),
    )
    .expect("write config");
    let files = [
        ("AWS_SHARED_CREDENTIALS_FILE", credentials.as_path()),
        ("AWS_CONFIG_FILE", config.as_path()),
    ];
    let (_processes, context) = cluster_with_aws_profile(&files, "lake").await;
    run(
        &context,
        "CREATE EXTERNAL TABLE from_profile STORED AS PARQUET LOCATION 's3://lake/data/' \
         OPTIONS ('aws.allow_http' 'true')",
    )
    .await
    .expect("the profile's keys read the table");
    assert_eq!(
        count_of(
            &context,
            "SELECT count(*)::bigint unsigned FROM from_profile"
        )
        .await,
        3
    );
}

/// Processes whose AWS profile assumes a role, with the keys that another
/// profile's `credential_process` prints, read and write as the role: the
/// keys' own user may only assume it. The STS requests go to moto, which
/// checks them as AWS does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn profiles_that_assume_roles_with_printed_keys_read_and_write_on_s3() {
    let (s3, users, roles) = S3Server::start_with_users_and_roles(
        "lake",
        &[("base", &["sts:AssumeRole"]), ("admin", &["s3:*"])],
        &[("lake-admin", &["s3:*"])],
    );
    let ([base, admin], [role]) = (users.as_slice(), roles.as_slice()) else {
        panic!("two users and a role");
    };
    s3.store_as("lake", admin)
        .put(&Path::from("data/part-0.parquet"), one_two_three())
        .await
        .expect("the admin uploads");

    let aws = tempfile::tempdir().expect("temp dir");
    let printer = aws.path().join("print-keys.sh");
    std::fs::write(
        &printer,
        format!(
            "cat <<'EOF'\n{{\"Version\": 1, \"AccessKeyId\": \"{}\", \
             \"SecretAccessKey\": \"{}\"}}\nEOF\n",
            base.access_key, base.secret_key
        ),
    )
    .expect("write the command");
    let config = aws.path().join("config");
    std::fs::write(
        &config,
        format!(
            "[profile vault]\ncredential_process = sh {}\n\n\
             [profile lake-role]\nrole_arn = {role}\nsource_profile = vault\n\
             region = us-east-1\nendpoint_url = {endpoint}\n\n\
             [profile admin]\naws_access_key_id = {}\naws_secret_access_key = {}\n\n\
             [profile refused-role]\nrole_arn = {role}\nsource_profile = admin\n\
             region = us-east-1\nendpoint_url = {endpoint}\n",
            printer.display(),
            admin.access_key,
            admin.secret_key,
            endpoint = s3.endpoint()
        ),
    )
    .expect("write config");
    let files = [("AWS_CONFIG_FILE", config.as_path())];
    let (processes, context) = cluster_with_aws_profile(&files, "lake-role").await;
    for sql in [
        "CREATE EXTERNAL TABLE source STORED AS PARQUET LOCATION 's3://lake/data/' \
         OPTIONS ('aws.allow_http' 'true')",
        "COPY (SELECT x * 10 AS x FROM source) TO 's3://lake/as_role/' \
         STORED AS PARQUET OPTIONS ('aws.allow_http' 'true')",
        "CREATE EXTERNAL TABLE as_role STORED AS PARQUET LOCATION 's3://lake/as_role/' \
         OPTIONS ('aws.allow_http' 'true')",
    ] {
        run(&context, sql)
            .await
            .unwrap_or_else(|e| panic!("the role reads and writes: {sql}: {e}"));
    }
    assert_eq!(
        count_of(&context, "SELECT sum(x)::bigint unsigned FROM as_role").await,
        60
    );
    assert_no_secret_in_history(&context, &base.secret_key).await;
    drop(processes);

    // The admin may use S3 but not assume roles: STS's refusal is the
    // error, naming the role.
    let (_processes, context) = cluster_with_aws_profile(&files, "refused-role").await;
    let error = run(
        &context,
        "CREATE EXTERNAL TABLE refused STORED AS PARQUET LOCATION 's3://lake/data/' \
         OPTIONS ('aws.allow_http' 'true')",
    )
    .await
    .expect_err("the role is refused");
    assert!(
        error.contains(&format!("assuming the AWS role {role}"))
            && error.contains("AccessDenied")
            && error.contains("user/admin is not authorized to perform: sts:AssumeRole")
            && !error.contains(&admin.secret_key),
        "{error}"
    );
}

/// An S3 server with a bucket `lake`, and stores that reach it.
fn lake_stores() -> (S3Server, Arc<quiver_core::storage::StoreRegistry>) {
    use quiver_core::storage::{StoreOptions, StoreRegistry};

    let s3 = S3Server::start();
    s3.create_bucket("lake");
    let stores = Arc::new(StoreRegistry::new());
    let lake = url::Url::parse("s3://lake").expect("url");
    stores
        .configure(&lake, &StoreOptions::from_pairs(s3.options()))
        .expect("configure the bucket");
    (s3, stores)
}

/// Durable map outputs on S3 read back from the bucket, as readers read them
/// once the executor that wrote them has gone. While it lives, they ask it
/// over Flight, so the TPC-H runs with durable shuffle above read no copy.
/// A map output that the shuffle writer made is uploaded, and each of its
/// partitions read back by byte range: every row comes back once. A copy
/// that is gone is reported missing, by its location.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_map_outputs_are_read_back_from_s3() {
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::execution::TaskContext;
    use datafusion::physical_expr::expressions::col;
    use datafusion::physical_plan::Partitioning;
    use datafusion::physical_plan::common::collect;
    use quiver_core::shuffle::{LocalOutputs, MapOutputId, ShuffleWriterExec, durable};
    use quiver_core::storage::runtime_builder;

    const PARTITIONS: usize = 3;
    let (s3, stores) = lake_stores();
    let runtime = runtime_builder(Arc::clone(&stores))
        .build()
        .expect("runtime");

    let keys: Vec<i64> = (0..100_000).collect();
    let batches: Vec<RecordBatch> = keys
        .chunks(8192)
        .map(|chunk| {
            let column = Arc::new(Int64Array::from(chunk.to_vec()));
            RecordBatch::try_from_iter([("k", column as _)]).expect("batch")
        })
        .collect();
    let schema = batches[0].schema();
    let source =
        MemorySourceConfig::try_new_exec(&[batches], Arc::clone(&schema), None).expect("source");
    let hashed = Partitioning::Hash(vec![col("k", &schema).expect("column")], PARTITIONS);
    let writer = ShuffleWriterExec::new("job", 1, source, Some(hashed));
    let work = tempfile::tempdir().expect("temp dir");
    let outputs = Arc::new(LocalOutputs::on_disk(work.path().to_owned()));
    writer
        .write(0, 0, Arc::new(TaskContext::default()), &outputs)
        .await
        .expect("write the map output");
    let id = MapOutputId::new("job", 1, 0, 0).expect("output id");
    let location = durable::upload(
        &stores,
        &id,
        "s3://lake/maps",
        &id.data_path(work.path()),
        &id.index_path(work.path()),
        None,
    )
    .await
    .expect("upload");

    let mut read: Vec<i64> = Vec::new();
    for partition in 0..PARTITIONS {
        let stream = durable::open_partition(&runtime, &location, partition, Arc::clone(&schema))
            .await
            .expect("open a partition of the copy");
        for batch in collect(stream).await.expect("read the partition") {
            read.extend(
                batch
                    .column(0)
                    .as_primitive::<arrow::datatypes::Int64Type>()
                    .values(),
            );
        }
    }
    read.sort_unstable();
    assert_eq!(read, keys, "every row once");

    s3.store("lake")
        .delete(&Path::from("maps/job/1/0-a0.data"))
        .await
        .expect("delete the data file");
    let missing = durable::open_partition(&runtime, &location, 0, schema).await;
    let error = missing.err().expect("the copy is gone").to_string();
    assert!(
        error.contains("s3://lake/maps/job/1/0-a0") && error.contains("missing"),
        "{error}"
    );
}

/// A durable shuffle upload whose task is cancelled midway aborts its
/// multipart upload, which S3 would otherwise keep and bill unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_shuffle_upload_leaves_no_parts_behind() {
    use quiver_core::shuffle::MapOutputId;
    use quiver_core::shuffle::durable;

    let (s3, stores) = lake_stores();
    // Large enough that its upload is still going when it is cancelled.
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("0.data");
    let index = dir.path().join("0.index");
    std::fs::write(&data, vec![7u8; 256 * 1024 * 1024]).expect("data file");
    std::fs::write(&index, b"index").expect("index file");
    let task = tokio::spawn(async move {
        let id = MapOutputId::new("job", 1, 0, 0).expect("output id");
        durable::upload(&stores, &id, "s3://lake/sh", &data, &index, None).await
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while s3.unfinished_uploads("lake") == 0 {
        assert!(
            !task.is_finished(),
            "the upload finished before it could be cancelled: {:?}",
            task.await
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the upload never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    task.abort();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while s3.unfinished_uploads("lake") > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a cancelled upload was left unfinished"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let left = list(&s3.store("lake"), "sh").await;
    assert!(
        left.iter().all(|path| path.contains("/_uploads/")),
        "a cancelled upload left data: {left:?}"
    );
}

/// Runs a job whose map outputs are copied to `s3://lake/maps`.
async fn group_with_maps_on_the_lake(context: &QuiverContext) {
    run(context, "SET quiver.shuffle_location = 's3://lake/maps'")
        .await
        .expect("set the shuffle location");
    let groups = count_of(
        context,
        "SELECT count(*)::bigint unsigned FROM \
         (SELECT value % 1000 AS k FROM range(200000) GROUP BY k)",
    )
    .await;
    assert_eq!(groups, 1000);
}

/// Durable map outputs that the scheduler may not delete when their job
/// ends (its keys only read the bucket; the executors' write) stay
/// recorded as left, and a later scheduler, started with keys that may
/// delete, deletes them though the job ended before it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durable_map_outputs_a_failed_clean_up_left_are_deleted_later() {
    use std::time::Duration;

    let (s3, users) =
        S3Server::start_with_users("lake", &[("writer", &["s3:*"]), ("reader", READS)]);
    let [writer, reader] = users.as_slice() else {
        panic!("two users");
    };
    let args = ClusterArgs {
        env: s3.env_as(reader),
        executor_env: s3.env_as(writer),
        ..ClusterArgs::default()
    };
    let mut cluster = ProcessCluster::start(1, args);
    let context = cluster.connect(1).await;
    group_with_maps_on_the_lake(&context).await;
    let bucket = s3.store_as("lake", writer);
    // Both of the job's clean-ups (at its end and 10 s later) are refused.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let left = list(&bucket, "maps").await;
    assert!(!left.is_empty(), "{}", cluster.scheduler_log());
    assert_scheduler_logged(&cluster, "cannot remove durable shuffle data");

    drop(context);
    cluster.kill_scheduler();
    cluster.set_env(s3.env_as(writer));
    cluster.start_scheduler();
    emptied(&bucket, "maps", &cluster).await;

    // A job whose own clean-up succeeds is forgotten by it, 10 s after it
    // ends: before the sweep, which waits a sweep (30 s) after it finds a
    // job ended, would have.
    let context = cluster.connect(1).await;
    group_with_maps_on_the_lake(&context).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    drop(context);
    cluster.kill_scheduler();
    let state =
        quiver_scheduler::store::StateStore::open(&cluster.work_dir().join("scheduler-state"))
            .expect("state");
    let left = state.storage_left().expect("durable outputs left");
    assert!(left.is_empty(), "{left:?}");
}

/// A write whose clean-up the store refuses when its job ends (the
/// cluster's keys lose the right to delete as a `COPY` is cancelled) leaves
/// its staging folder, with the records of the uploads its tasks had under
/// way. Once the keys may delete again, the running scheduler's sweep
/// settles the write: nothing of it is left, nor any upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_a_failed_clean_up_left_is_settled_later() {
    use std::time::{Duration, Instant};

    let (s3, users) = S3Server::start_with_users("lake", &[("writer", &["s3:*"])]);
    let [writer] = users.as_slice() else {
        panic!("one user");
    };
    let args = ClusterArgs {
        env: s3.env_as(writer),
        ..ClusterArgs::default()
    };
    let cluster = ProcessCluster::start(1, args);
    let context = cluster.connect(1).await;
    // Uploads start at S3's smallest part, as row groups of 64 Ki rows fill.
    for setting in [
        "SET datafusion.execution.parquet.max_row_group_size = 65536",
        "SET datafusion.execution.objectstore_writer_buffer_size = 5242880",
    ] {
        run(&context, setting).await.expect("setting");
    }
    let copy = "COPY (SELECT value, md5(CAST(value AS VARCHAR)) AS digest \
                FROM range(200000000)) TO 's3://lake/out/' STORED AS PARQUET";
    let job = context.submit_sql(copy).await.expect("submitted");
    let bucket = s3.store_as("lake", writer);
    // An upload is under way: its record is in the staging folder.
    let deadline = Instant::now() + Duration::from_secs(60);
    while list(&bucket, "out/_temporary").await.is_empty() {
        assert!(Instant::now() < deadline, "{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s3.set_user_actions("writer", READS);
    // The tasks' refused uploads may fail the job before it is cancelled.
    let cancelled = context.cancel_job(&job.job_id).await;
    let status = context.wait_for_job(&job.job_id).await.expect("status");
    assert_ne!(
        status.state(),
        JobState::Succeeded,
        "{status:?} {cancelled:?}"
    );

    // Both of the job's clean-ups (at its end and 10 s later) are refused;
    // the sweep comes 30 s after the end at the earliest.
    let refused = format!("cannot settle a write's files job_id={}", job.job_id);
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.scheduler_log().matches(&refused).count() < 2 {
        assert!(Instant::now() < deadline, "{}", cluster.scheduler_log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let staged = list(&bucket, "out/_temporary").await;
    assert!(!staged.is_empty(), "{}", cluster.scheduler_log());
    assert!(s3.unfinished_uploads("lake") > 0, "{staged:?}");

    s3.set_user_actions("writer", &["s3:*"]);
    emptied(&bucket, "out", &cluster).await;
    assert_eq!(s3.unfinished_uploads("lake"), 0);
    assert_scheduler_logged(
        &cluster,
        "cleaned up what the job's clean-up had left in object storage",
    );
}

/// An executor killed while it uploads a durable map output cannot abort the
/// upload. The upload's id is recorded in the job's shuffle folder before its
/// first part, so the scheduler aborts it when the job ends, and the job's
/// answer is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shuffle_upload_left_by_a_killed_executor_is_aborted() {
    const ROWS: u64 = 8_000_000;
    let s3 = S3Server::start();
    s3.create_bucket("lake");
    let mut cluster = ProcessCluster::start(1, ClusterArgs::default());
    let context = cluster.connect(1).await;
    // The write configures the bucket for the session's later statements.
    let seed = format!(
        "COPY (SELECT 1 AS one) TO 's3://lake/seed/' STORED AS PARQUET {}",
        s3.sql_options()
    );
    run(&context, &seed).await.expect("configure the bucket");
    run(
        &context,
        "SET quiver.shuffle_location = 's3://lake/_shuffle'",
    )
    .await
    .expect("set shuffle location");
    // Distinct digests: the shuffle carries every row, tens of MiB per map.
    let query = format!(
        "SELECT count(*)::bigint unsigned FROM (SELECT digest FROM \
         (SELECT md5(CAST(value AS VARCHAR)) AS digest FROM range({ROWS})) GROUP BY digest)"
    );
    let groups = count_killing_an_uploader(&s3, &mut cluster, &context, query).await;
    assert_eq!(groups, ROWS, "every row once");
    let bucket = s3.store("lake");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (unfinished, left) = (
            s3.unfinished_uploads("lake"),
            list(&bucket, "_shuffle").await,
        );
        if unfinished == 0 && left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{unfinished} unfinished uploads and {left:?} left behind\n{}",
            cluster.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Parquet bytes of the column `x` holding 1..=`rows`.
fn parquet_of_rows(rows: i64) -> Vec<u8> {
    let values = Int64Array::from_iter_values(1..=rows);
    let batch = RecordBatch::try_from_iter([("x", Arc::new(values) as _)]).expect("batch");
    let mut data = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut data, batch.schema(), None).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
    data
}

/// A write planned again, because a file it read was replaced, is planned
/// with the credentials it was first planned with. Meanwhile a statement
/// configured its bucket with a reader's keys: planned with those, the new
/// plan's write-access check would be refused and the job would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_planned_again_keeps_the_credentials_it_was_planned_with() {
    let (s3, users) =
        S3Server::start_with_users("lake", &[("writer", &["s3:*"]), ("reader", READS)]);
    let [writer, reader] = users.as_slice() else {
        panic!("two users");
    };
    let bucket = s3.store_as("lake", writer);
    let put = |name: &'static str, rows: i64| {
        let bucket = Arc::clone(&bucket);
        async move {
            bucket
                .put(&Path::from(name), PutPayload::from(parquet_of_rows(rows)))
                .await
                .expect("upload");
        }
    };
    put("src/old.parquet", 1000).await;
    let args = ClusterArgs {
        scheduler: vec!["--max-running-jobs".into(), "1".into()],
        ..ClusterArgs::default()
    };
    let cluster = ProcessCluster::start(1, args);
    let context = cluster.connect(1).await;
    let as_writer = s3.sql_options_as(writer);
    for ddl in [
        format!(
            "CREATE EXTERNAL TABLE src STORED AS PARQUET LOCATION 's3://lake/src/' {as_writer}"
        ),
        format!(
            "CREATE EXTERNAL TABLE dst (x BIGINT) STORED AS PARQUET LOCATION 's3://lake/dst/' \
             {as_writer}"
        ),
    ] {
        run(&context, &ddl).await.expect("create");
    }

    // The write is planned while the cluster is busy, and waits.
    let endless = context
        .submit_sql("SELECT count(*), sum(value % 7) FROM range(1, 1000000000000)")
        .await
        .expect("submit");
    let insert = context
        .submit_sql("INSERT INTO dst SELECT x FROM src")
        .await
        .expect("submit the write");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while context
        .job_status(&insert.job_id)
        .await
        .expect("status")
        .state()
        != JobState::Queued
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the write never queued"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Another statement configures the bucket with a reader's keys...
    run(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE peek STORED AS PARQUET LOCATION 's3://lake/src/' {}",
            s3.sql_options_as(reader)
        ),
    )
    .await
    .expect("a reader may read");
    // ... and another engine replaces the file the write was to read.
    put("src/new.parquet", 2000).await;
    bucket
        .delete(&Path::from("src/old.parquet"))
        .await
        .expect("delete");
    context.cancel_job(&endless.job_id).await.expect("cancel");

    let status = context.wait_for_job(&insert.job_id).await.expect("status");
    assert_eq!(
        (status.state(), status.error.as_str(), status.replans),
        (JobState::Succeeded, "", 1),
        "{status:?}"
    );
    let counted = run(&context, "SELECT count(*) AS n FROM dst")
        .await
        .expect("count");
    let n = counted[0]
        .column(0)
        .as_primitive::<arrow::datatypes::Int64Type>()
        .value(0);
    assert_eq!(n, 2000, "the new file's rows, once");
}
