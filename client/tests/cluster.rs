//! The embedded cluster end to end: the control protocol refuses what it must,
//! clients share the cluster, tables of every kind work, and a finished job
//! leaves no shuffle data behind.

use std::path::Path;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Int32Type, Int64Type};
use datafusion::functions_aggregate::expr_fn::sum;
use datafusion::prelude::{SessionContext, col, lit};
use quiver_client::job::CancelOutcome;
use quiver_client::{QuiverContext, StandaloneCluster, StandaloneOptions};
use quiver_proto::{
    ExecutorAddress, ExecutorMessage, Heartbeat, JobRequest, JobState, JobStatus, PROTOCOL_VERSION,
    RegisterExecutor, executor_message,
};
use tonic::Code;

async fn cluster() -> (StandaloneCluster, QuiverContext) {
    let cluster = StandaloneCluster::start(StandaloneOptions::default())
        .await
        .expect("start");
    let context = cluster.connect(2).await.expect("connect");
    (cluster, context)
}

fn int64s(batches: &[RecordBatch], column: usize) -> Vec<i64> {
    batches
        .iter()
        .flat_map(|b| {
            b.column(column)
                .as_primitive::<Int64Type>()
                .values()
                .to_vec()
        })
        .collect()
}

async fn query(context: &QuiverContext, sql: &str) -> Vec<RecordBatch> {
    context
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn register_as(context: &QuiverContext, message: executor_message::Kind) -> tonic::Status {
    let mut client = context.scheduler();
    let outbound = futures::stream::iter(vec![ExecutorMessage {
        kind: Some(message),
    }]);
    match client.executor_channel(outbound).await {
        Ok(_) => panic!("the scheduler accepted a bad registration"),
        Err(status) => status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_protocol_refuses_bad_peers() {
    let (cluster, context) = cluster().await;

    let status = register_as(
        &context,
        executor_message::Kind::Register(RegisterExecutor {
            protocol_version: 999,
            address: Some(ExecutorAddress {
                executor_id: "old-executor".into(),
                host: "127.0.0.1".into(),
                flight_port: 1,
            }),
            slots: 1,
        }),
    )
    .await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("999")
            && status.message().contains(&PROTOCOL_VERSION.to_string()),
        "both versions are named: {}",
        status.message()
    );

    let status = register_as(
        &context,
        executor_message::Kind::Heartbeat(Heartbeat {
            running_tasks: 0,
            sequence: 0,
        }),
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");

    let status = register_as(
        &context,
        executor_message::Kind::Register(RegisterExecutor {
            protocol_version: PROTOCOL_VERSION,
            address: Some(ExecutorAddress {
                executor_id: "../../etc".into(),
                host: "127.0.0.1".into(),
                flight_port: 1,
            }),
            slots: 1,
        }),
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");

    let status = context
        .scheduler()
        .get_job_status(JobRequest {
            job_id: "no-such-job".into(),
        })
        .await
        .expect_err("unknown job");
    assert_eq!(status.code(), Code::NotFound);

    // The cluster still works.
    assert_eq!(
        int64s(&query(&context, "SELECT CAST(1 AS BIGINT)").await, 0),
        vec![1]
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_share_the_cluster() {
    let (cluster, first) = cluster().await;
    let second = QuiverContext::connect(cluster.url())
        .await
        .expect("second client");
    let sql = "SELECT sum(CAST(v AS BIGINT)) FROM (SELECT * FROM (VALUES (1),(2),(3),(4)) t(v)) GROUP BY v % 2 ORDER BY 1";
    let jobs: Vec<_> = (0..8)
        .map(|i| {
            let context = if i % 2 == 0 {
                first.clone()
            } else {
                second.clone()
            };
            tokio::spawn(async move { query(&context, sql).await })
        })
        .collect();
    for job in jobs {
        let batches = job.await.expect("job task");
        assert_eq!(int64s(&batches, 0), vec![4, 6]);
    }
    cluster.shutdown().await;
}

fn shuffle_job_dirs(work_dir: &Path) -> Vec<String> {
    let mut dirs = Vec::new();
    for executor in std::fs::read_dir(work_dir).into_iter().flatten().flatten() {
        let shuffle = executor.path().join("shuffle");
        for owner in std::fs::read_dir(shuffle).into_iter().flatten().flatten() {
            for job in std::fs::read_dir(owner.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                dirs.push(job.path().display().to_string());
            }
        }
    }
    dirs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_jobs_leave_no_shuffle_data() {
    let (cluster, context) = cluster().await;
    let batches = query(
        &context,
        "SELECT v % 3 AS k, count(*) AS n FROM (SELECT * FROM (VALUES (1),(2),(3),(4),(5)) t(v)) GROUP BY v % 3 ORDER BY k",
    )
    .await;
    assert_eq!(int64s(&batches, 1), vec![1, 2, 2]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = shuffle_job_dirs(cluster.work_dir());
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "shuffle data left behind: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.shutdown().await;
}

/// `range()` and `generate_series()` run on the executors whatever columns a
/// query reads from them: none at all for `count(*)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn series_functions_run_on_the_cluster() {
    let (cluster, context) = cluster().await;
    let counted = query(&context, "SELECT count(*) AS n FROM range(10)").await;
    assert_eq!(int64s(&counted, 0), vec![10]);
    let summed = query(
        &context,
        "SELECT sum(value) AS total, count(*) AS n FROM generate_series(1, 100)",
    )
    .await;
    assert_eq!(int64s(&summed, 0), vec![5050]);
    assert_eq!(int64s(&summed, 1), vec![100]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn csv_files_and_hive_partitioned_parquet_folders() {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");

    let csv = dir.path().join("people.csv");
    std::fs::write(&csv, "id,name\n1,ada\n2,grace\n3,edsger\n").expect("write csv");
    context
        .register_csv("people", &csv.display().to_string(), true)
        .await
        .expect("register csv");
    let batches = query(
        &context,
        "SELECT id FROM people WHERE name <> 'grace' ORDER BY id",
    )
    .await;
    assert_eq!(int64s(&batches, 0), vec![1, 3]);

    // Written by single-node DataFusion as hive-style folders k=a/ and k=b/.
    let hive = dir.path().join("hive");
    let local = SessionContext::new();
    local
        .sql(&format!(
            "COPY (SELECT * FROM (VALUES (CAST(1 AS BIGINT), 'a'), (2, 'b'), (3, 'a')) t(x, k)) \
             TO '{}' STORED AS PARQUET PARTITIONED BY (k)",
            hive.display()
        ))
        .await
        .expect("plan copy")
        .collect()
        .await
        .expect("write hive folder");
    assert!(hive.join("k=a").is_dir(), "hive folders were written");
    query(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE sales STORED AS PARQUET LOCATION '{}/'",
            hive.display()
        ),
    )
    .await;
    let batches = query(&context, "SELECT sum(x) FROM sales WHERE k = 'a'").await;
    assert_eq!(int64s(&batches, 0), vec![4]);

    // The DataFrame API builds the plan on the client and runs it on the cluster.
    let frame = context
        .table("sales")
        .await
        .expect("table")
        .filter(col("x").gt(lit(1i64)))
        .expect("filter")
        .aggregate(vec![], vec![sum(col("x")).alias("total")])
        .expect("aggregate");
    assert_eq!(int64s(&frame.collect().await.expect("collect"), 0), vec![5]);

    cluster.shutdown().await;
}

/// A write task starts a new file once the one it writes reaches
/// `quiver.target_file_bytes` as written. The writer's own estimate of a
/// row group counts dictionaries and page buffers before compression, and
/// on compressible data it is several times the file: files rolled by it
/// came out at about a third of the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_roll_over_at_their_target_size_as_written() {
    const TARGET: u64 = 1 << 20;
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    query(
        &context,
        &format!("SET quiver.target_file_bytes = {TARGET}"),
    )
    .await;
    query(
        &context,
        &format!(
            "COPY (SELECT value AS id, value % 7 AS flag, 'a constant note' AS note \
             FROM range(4000000)) TO '{}/' STORED AS PARQUET",
            dir.path().display()
        ),
    )
    .await;
    let mut sizes: Vec<(String, u64)> = std::fs::read_dir(dir.path())
        .expect("list output")
        .map(|entry| entry.expect("entry"))
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".parquet"))
        .map(|entry| {
            let size = entry.metadata().expect("metadata").len();
            (entry.file_name().to_string_lossy().into_owned(), size)
        })
        .collect();
    sizes.sort();
    assert!(sizes.len() >= 3, "the write rolled over: {sizes:?}");
    // Every file but a task's last was finished as full.
    let tasks: std::collections::BTreeSet<String> = sizes
        .iter()
        .map(|(name, _)| name[..name.len() - 12].to_owned())
        .collect();
    for task in tasks {
        let files: Vec<&(String, u64)> = sizes
            .iter()
            .filter(|(name, _)| name.starts_with(&task))
            .collect();
        for (name, size) in &files[..files.len() - 1] {
            assert!(
                (TARGET / 2..=TARGET * 3 / 2).contains(size),
                "{name} has {size} bytes for a target of {TARGET}: {sizes:?}"
            );
        }
    }
    cluster.shutdown().await;
}

/// Null partition values go to `col=__HIVE_DEFAULT_PARTITION__` folders, as
/// Hive and Spark write them, and are read back as nulls in the column's
/// declared type, by filters (which prune by them) and by inserts alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn null_partition_values_are_written_and_read_back_as_nulls() {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("events");
    query(
        &context,
        &format!(
            "COPY (SELECT * FROM (VALUES (1, CAST(2024 AS INT), 'EU'), (2, NULL, 'EU'), \
             (3, 2025, NULL), (4, NULL, NULL), (5, 2024, 'US')) t(id, year, region)) \
             TO '{}/' STORED AS PARQUET PARTITIONED BY (year, region)",
            out.display()
        ),
    )
    .await;
    assert!(
        out.join("year=__HIVE_DEFAULT_PARTITION__/region=EU")
            .is_dir(),
        "a null is written as the marker folder"
    );
    query(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE events (id BIGINT, year INT, region VARCHAR) \
             STORED AS PARQUET PARTITIONED BY (year, region) LOCATION '{}/'",
            out.display()
        ),
    )
    .await;
    let ids = |filter: &'static str| {
        let context = context.clone();
        async move {
            let sql = format!("SELECT id FROM events WHERE {filter} ORDER BY id");
            int64s(&query(&context, &sql).await, 0)
        }
    };
    assert_eq!(ids("year IS NULL").await, vec![2, 4]);
    assert_eq!(ids("year = 2024").await, vec![1, 5]);
    assert_eq!(ids("year > 2024").await, vec![3]);
    assert_eq!(ids("region IS NULL").await, vec![3, 4]);
    assert_eq!(ids("region = 'EU'").await, vec![1, 2]);
    // A null is not unequal to 'EU' either.
    assert_eq!(ids("region <> 'EU'").await, vec![5]);
    assert_eq!(ids("year IS NULL AND region IS NOT NULL").await, vec![2]);

    let grouped = query(
        &context,
        "SELECT year, count(*) AS n FROM events GROUP BY year ORDER BY year NULLS FIRST",
    )
    .await;
    assert_eq!(
        grouped[0].schema().field(0).data_type(),
        &DataType::Int32,
        "the partition column has its declared type"
    );
    let years: Vec<Option<i32>> = grouped
        .iter()
        .flat_map(|batch| {
            batch
                .column(0)
                .as_primitive::<Int32Type>()
                .iter()
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(years, vec![None, Some(2024), Some(2025)]);
    assert_eq!(int64s(&grouped, 1), vec![2, 2, 1]);

    query(&context, "INSERT INTO events VALUES (6, NULL, 'US')").await;
    assert_eq!(ids("year IS NULL").await, vec![2, 4, 6]);
    assert_eq!(ids("year IS NULL AND region = 'US'").await, vec![6]);

    // Without declared types the partition columns are strings, nulls still null.
    query(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE events_inferred STORED AS PARQUET \
             PARTITIONED BY (year, region) LOCATION '{}/'",
            out.display()
        ),
    )
    .await;
    let nulls = query(
        &context,
        "SELECT count(*) AS n FROM events_inferred WHERE year IS NULL",
    )
    .await;
    assert_eq!(int64s(&nulls, 0), vec![3]);
    cluster.shutdown().await;
}

/// Runs for hours unless cancelled: an aggregate over a trillion generated rows.
const ENDLESS_QUERY: &str = "SELECT count(*), sum(value % 7) FROM range(1, 1000000000000)";

async fn wait_for_state(context: &QuiverContext, job_id: &str, state: JobState) -> JobStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = context.job_status(job_id).await.expect("status");
        if status.state() == state {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "job {job_id} never reached {state:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_beyond_the_limit_wait_in_a_visible_queue() {
    let options = StandaloneOptions {
        max_running_jobs: 1,
        ..StandaloneOptions::default()
    };
    let cluster = StandaloneCluster::start(options).await.expect("start");
    let context = cluster.connect(2).await.expect("connect");
    let endless = context.submit_sql(ENDLESS_QUERY).await.expect("submit");
    wait_for_state(&context, &endless.job_id, JobState::Running).await;
    let first = context.submit_sql("SELECT 1 AS one").await.expect("submit");
    let second = context.submit_sql("SELECT 2 AS two").await.expect("submit");
    let queued = wait_for_state(&context, &second.job_id, JobState::Queued).await;
    assert_eq!(queued.queue_position, 1, "one job is ahead of it");
    let first_status = context.job_status(&first.job_id).await.expect("status");
    assert_eq!(first_status.state(), JobState::Queued);
    assert_eq!(first_status.queue_position, 0);
    // A catalog change runs at once, and so does reading its empty result:
    // neither waits behind the queue.
    let created = tokio::time::timeout(Duration::from_secs(60), async {
        context
            .sql("CREATE VIEW numbers AS SELECT 1 AS one")
            .await?
            .collect()
            .await
            .map_err(quiver_client::Error::from)
    })
    .await
    .expect("a catalog change does not queue");
    let rows: usize = created
        .expect("created")
        .iter()
        .map(|batch| batch.num_rows())
        .sum();
    assert_eq!(rows, 0);

    assert_eq!(
        context.cancel_job(&endless.job_id).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    wait_for_state(&context, &first.job_id, JobState::Succeeded).await;
    wait_for_state(&context, &second.job_id, JobState::Succeeded).await;
    let history = context.list_jobs(0).await.expect("list");
    let states: Vec<(String, JobState)> = history
        .into_iter()
        .filter_map(|record| record.status)
        .map(|status| (status.job_id.clone(), status.state()))
        .collect();
    for (job_id, state) in [
        (&endless.job_id, JobState::Cancelled),
        (&first.job_id, JobState::Succeeded),
        (&second.job_id, JobState::Succeeded),
    ] {
        assert!(
            states.contains(&(job_id.clone(), state)),
            "{job_id} is {state:?} in the history: {states:?}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explain_shows_the_stage_dag() {
    let (cluster, context) = cluster().await;
    let sql = "EXPLAIN SELECT v % 3 AS k, count(*) AS n \
               FROM (VALUES (1),(2),(3),(4),(5)) t(v) GROUP BY v % 3 ORDER BY k";
    let batches = query(&context, sql).await;
    let text = rendered(&batches);
    for expected in [
        "logical_plan",
        "distributed_plan",
        "Stage 1 (tasks=",
        "ShuffleWriterExec",
        "ShuffleReaderExec",
    ] {
        assert!(text.contains(expected), "{expected} missing from\n{text}");
    }

    // A write shows the steps that run: write tasks, then the commit, into
    // the table's location, and an overwrite as one.
    let dir = tempfile::tempdir().expect("temp dir");
    let location = format!("{}/explained/", dir.path().display());
    query(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE explained (v BIGINT) STORED AS PARQUET LOCATION '{location}'"
        ),
    )
    .await;
    for (sql, mode) in [
        (
            "EXPLAIN INSERT INTO explained SELECT value FROM range(10)",
            "Insert Into",
        ),
        (
            "EXPLAIN INSERT OVERWRITE explained SELECT value FROM range(10)",
            "Insert Overwrite",
        ),
    ] {
        let batches = query(&context, sql).await;
        let text = rendered(&batches);
        for expected in [
            format!("ParquetCommitExec: location=file://{location}, mode={mode}"),
            format!("ParquetWriteExec: location=file://{location}"),
        ] {
            assert!(
                text.contains(&expected),
                "{sql}: {expected} missing from\n{text}"
            );
        }
        assert!(!text.contains("DataSinkExec"), "{text}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explain_analyze_shows_what_every_stage_did() {
    let (cluster, context) = cluster().await;
    let grouped = "SELECT v % 3 AS k, count(*) AS n \
                   FROM (VALUES (1),(2),(3),(4),(5)) t(v) GROUP BY v % 3 ORDER BY k";
    let batches = query(&context, &format!("EXPLAIN ANALYZE {grouped}")).await;
    let rows: Vec<(String, String)> = batches
        .iter()
        .flat_map(|batch| {
            let kinds = batch.column(0).as_string::<i32>();
            let plans = batch.column(1).as_string::<i32>();
            (0..batch.num_rows())
                .map(|row| (kinds.value(row).to_owned(), plans.value(row).to_owned()))
                .collect::<Vec<_>>()
        })
        .collect();
    let kinds: Vec<&str> = rows.iter().map(|(kind, _)| kind.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"Job"), "{rows:#?}");
    assert!(
        kinds.last().is_some_and(|k| k.ends_with("(final)")),
        "{rows:#?}"
    );
    assert!(rows[0].1.contains("3 result rows"), "{rows:#?}");
    let final_stage = &rows.last().expect("a final stage").1;
    // The final stage's writer wrote the three groups; its readers read
    // what the stages below shuffled.
    let writer = final_stage.lines().nth(1).expect("the writer's line");
    assert!(
        writer.starts_with("ShuffleWriterExec") && writer.contains("output_rows=3"),
        "{final_stage}"
    );
    for expected in [
        "slowest task: partition",
        "elapsed_compute=",
        "shuffle_bytes_read=",
    ] {
        let everywhere: String = rows.iter().map(|(_, text)| text.as_str()).collect();
        assert!(everywhere.contains(expected), "{expected} in {rows:#?}");
    }

    // VERBOSE shows every metric, not only the summary.
    let verbose = query(&context, &format!("EXPLAIN ANALYZE VERBOSE {grouped}")).await;
    let text = rendered(&verbose);
    assert!(text.contains("output_batches="), "{text}");

    // A Parquet scan shows what it read and how many row groups statistics
    // pruned: nine of ten here.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("ids.parquet");
    query(
        &context,
        "SET datafusion.execution.parquet.max_row_group_size = 1000",
    )
    .await;
    query(
        &context,
        &format!(
            "COPY (SELECT value AS id FROM range(0, 10000)) TO '{}'",
            file.display()
        ),
    )
    .await;
    query(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE ids STORED AS PARQUET LOCATION '{}'",
            file.display()
        ),
    )
    .await;
    let pruned = query(
        &context,
        "EXPLAIN ANALYZE SELECT count(*) FROM ids WHERE id BETWEEN 1000 AND 1500",
    )
    .await;
    let text = rendered(&pruned);
    assert!(
        text.contains("row_groups_pruned_statistics_pruned=9"),
        "{text}"
    );
    assert!(text.contains("bytes_scanned="), "{text}");

    // A statement that fails while it runs fails its analysis with its error.
    let error = context
        .sql("EXPLAIN ANALYZE SELECT CAST(v AS INT) FROM (VALUES ('1'), ('x')) t(v)")
        .await
        .expect_err("the cast fails");
    assert!(
        error.to_string().contains("the analyzed job") && error.to_string().contains("'x'"),
        "{error}"
    );
    cluster.shutdown().await;
}

/// A join that DataFusion plans partitioned, because it cannot tell that a
/// filter leaves two rows of its build side, becomes a broadcast join once
/// the build side has run: the probe side is then scanned in the join's stage
/// instead of being shuffled, and the answer stays the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_build_side_found_small_at_run_time_is_broadcast() {
    // The filtered side is estimated at a fifth of its 100 000 rows, far
    // above the broadcast threshold, so the planner joins partitioned.
    let (cluster, context, _dir) = cluster_joining_partitioned().await;
    let join = "SELECT count(*) AS n, sum(f.k) AS total FROM facts f JOIN dims d ON f.k = d.k \
                WHERE d.k % 50000 = 0";
    let report = explain_analyze(&context, join).await;
    assert!(
        report.contains("merged into stage") && report.contains("HashJoinExec: mode=CollectLeft"),
        "{report}"
    );
    assert_eq!(int64s(&query(&context, join).await, 1), vec![50_000]);

    query(&context, "SET quiver.adaptive_joins = false").await;
    let report = explain_analyze(&context, join).await;
    assert!(
        !report.contains("merged into stage") && report.contains("HashJoinExec: mode=Partitioned"),
        "{report}"
    );
    let batches = query(&context, join).await;
    assert_eq!(
        (int64s(&batches, 0), int64s(&batches, 1)),
        (vec![2], vec![50_000])
    );
    cluster.shutdown().await;
}

/// A partitioned join whose build side, estimated smaller, wrote more rows
/// than its probe side builds from the probe side once both have run, and
/// the answer stays the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_builds_from_the_side_that_ran_smaller() {
    let (cluster, context, _dir) = cluster_joining_partitioned().await;
    // DataFusion estimates the `dims` side, under a predicate it cannot
    // analyse, at a fifth of its 100 000 rows, and the `facts` side, from
    // its statistics, at 30 000: `dims` builds. Yet every `dims` row passes.
    let join = "SELECT count(*) AS n, count(f.k) AS matched, sum(f.k) AS total \
                FROM (SELECT k FROM dims WHERE k % 7 <> 7) d \
                LEFT JOIN (SELECT k FROM facts WHERE k < 30000) f ON d.k = f.k";
    let expected = (vec![100_000], vec![30_000], vec![449_985_000]);
    let answer =
        |batches: &[RecordBatch]| (int64s(batches, 0), int64s(batches, 1), int64s(batches, 2));
    let report = explain_analyze(&context, join).await;
    assert!(
        report.contains("build side swapped at run time")
            && report.contains("join_type=Right")
            && report.contains("HashJoinExec: mode=Partitioned"),
        "{report}"
    );
    assert_eq!(answer(&query(&context, join).await), expected);

    query(&context, "SET quiver.adaptive_joins = false").await;
    let report = explain_analyze(&context, join).await;
    assert!(
        !report.contains("build side swapped") && report.contains("join_type=Left"),
        "{report}"
    );
    assert_eq!(answer(&query(&context, join).await), expected);
    cluster.shutdown().await;
}

/// TPC-H Q17's shape: two rows of `dims` compared with an aggregate of all
/// of `facts` grouped by the key. Once the `dims` side has run, its keys
/// filter the `facts` scan below the aggregate, and the answer stays the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_build_side_filters_the_scan_under_an_aggregate() {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    create_facts_and_dims(&context, dir.path()).await;
    let compared = "SELECT count(*) AS n, sum(d.k) AS total FROM dims d \
                    WHERE d.k % 50000 = 0 \
                    AND d.k <= (SELECT max(f.k) FROM facts f WHERE f.k = d.k)";
    let report = explain_analyze(&context, compared).await;
    assert!(
        report.contains("join_type=RightSemi") && report.contains("AggregateExec: mode=Partial"),
        "{report}"
    );
    let expected = (vec![2], vec![50_000]);
    let batches = query(&context, compared).await;
    assert_eq!((int64s(&batches, 0), int64s(&batches, 1)), expected);

    query(&context, "SET quiver.semi_join_reduction = false").await;
    let report = explain_analyze(&context, compared).await;
    assert!(!report.contains("join_type=RightSemi"), "{report}");
    let batches = query(&context, compared).await;
    assert_eq!((int64s(&batches, 0), int64s(&batches, 1)), expected);
    cluster.shutdown().await;
}

/// Writes `select` as the Parquet file `path` with single-node DataFusion.
async fn write_parquet(local: &SessionContext, select: &str, path: &Path) {
    local
        .sql(&format!(
            "COPY ({select}) TO '{}' STORED AS PARQUET",
            path.display()
        ))
        .await
        .expect("plan copy")
        .collect()
        .await
        .expect("write a file");
}

/// What single-node DataFusion answers to `sql` in `local`, as a table.
async fn one_process_answer(local: &SessionContext, sql: &str) -> Vec<RecordBatch> {
    local
        .sql(sql)
        .await
        .expect("plan")
        .collect()
        .await
        .expect("run")
}

/// A table `name` of two Parquet files under `dir` (two tasks read it),
/// file `part` holding the rows of `select(part)`, registered on the cluster
/// and in `local`.
async fn table_of_two_files(
    context: &QuiverContext,
    local: &SessionContext,
    dir: &Path,
    name: &str,
    select: impl Fn(usize) -> String,
) {
    for part in 0..2 {
        let path = dir.join(name).join(format!("part-{part}.parquet"));
        write_parquet(local, &select(part), &path).await;
    }
    let ddl = format!(
        "CREATE EXTERNAL TABLE {name} STORED AS PARQUET LOCATION '{}/'",
        dir.join(name).display()
    );
    query(context, &ddl).await;
    local.sql(&ddl).await.expect("register locally");
}

/// `x NOT IN (subquery)` is split across tasks by its outer rows, each task
/// reading the whole subquery, and keeps SQL's answer when either side
/// holds nulls: a null in the subquery leaves no row, an empty subquery
/// keeps every row (null keys too), and otherwise rows of a null key go.
/// A join so re-planned stays one partition where it was one, and a side
/// under a `LIMIT` keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joins_split_across_tasks_keep_their_answers() {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let local = SessionContext::new();
    // The outer rows in two files (two partitions), every 100th key null.
    for part in 0..2 {
        let (from, to) = (part * 5_000, (part + 1) * 5_000);
        write_parquet(
            &local,
            &format!(
                "SELECT CASE WHEN value % 100 = 0 THEN NULL ELSE value END AS k, value AS v \
                 FROM range({from}, {to})"
            ),
            &dir.path().join(format!("outer/part-{part}.parquet")),
        )
        .await;
    }
    // Multiples of 3 in two files: a subquery read from a stage of its own.
    for part in 0..2 {
        write_parquet(
            &local,
            &format!(
                "SELECT value * 3 AS k FROM range({}, {})",
                part * 1_000,
                (part + 1) * 1_000
            ),
            &dir.path().join(format!("evens/part-{part}.parquet")),
        )
        .await;
    }
    write_parquet(
        &local,
        "SELECT * FROM (VALUES (CAST(7 AS BIGINT)), (NULL)) t(k)",
        &dir.path().join("holed/part-0.parquet"),
    )
    .await;
    for table in ["outer", "evens", "holed"] {
        let location = dir.path().join(table);
        let ddl = format!(
            "CREATE EXTERNAL TABLE {table}_rows STORED AS PARQUET LOCATION '{}/'",
            location.display()
        );
        query(&context, &ddl).await;
        local.sql(&ddl).await.expect("register locally");
    }
    let explained = rendered(
        &query(
            &context,
            "EXPLAIN SELECT v FROM outer_rows WHERE k NOT IN (SELECT k FROM evens_rows)",
        )
        .await,
    );
    let join_stage = explained
        .split("Stage ")
        .find(|stage| stage.contains("HashJoinExec") && stage.contains("null_aware"))
        .unwrap_or_else(|| panic!("a null-aware join in\n{explained}"));
    let tasks: usize = join_stage
        .split("tasks=")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("a task count in\n{join_stage}"));
    assert!(
        tasks > 1
            && join_stage.contains(&format!("ReplicateExec: partitions={tasks}"))
            && join_stage.contains("ShuffleReaderExec"),
        "the join runs in several tasks, each reading the whole subquery's stage:\n{explained}"
    );
    let analyzed = explain_analyze(
        &context,
        "SELECT v FROM outer_rows WHERE k NOT IN (SELECT k FROM evens_rows)",
    )
    .await;
    assert!(
        analyzed.contains("ReplicateExec") && analyzed.contains("null_aware"),
        "{analyzed}"
    );
    let not_in = |subquery: &str| {
        format!(
            "SELECT count(*) AS n, count(k) AS keyed, sum(v) AS total FROM outer_rows \
             WHERE k NOT IN ({subquery})"
        )
    };
    // 9,900 keyed rows and 100 null keys; 1,980 keys are multiples of 3 below 6,000.
    for (sql, rows) in [
        // A re-planned join of one partition (both sides are one file) under
        // an aggregate planned in one step: it must stay one partition.
        (
            "SELECT count(*) AS n, count(h2.k) AS keyed FROM holed_rows h \
             LEFT JOIN holed_rows h2 ON h.k = h2.k"
                .to_owned(),
            2,
        ),
        // A limited outer side: its limit needs all its partitions at once.
        (
            "SELECT count(*) AS n FROM (SELECT k FROM outer_rows WHERE k > 0 LIMIT 3) o \
             LEFT JOIN evens_rows e ON o.k = e.k"
                .to_owned(),
            3,
        ),
        (
            "SELECT count(*) AS n FROM (SELECT k FROM outer_rows WHERE k > 0 LIMIT 3) o \
             WHERE k NOT IN (SELECT k FROM holed_rows WHERE k IS NOT NULL)"
                .to_owned(),
            3,
        ),
        (not_in("SELECT k FROM evens_rows"), 7_920),
        (not_in("SELECT k FROM holed_rows"), 0),
        (not_in("SELECT k FROM evens_rows WHERE k < 0"), 10_000),
        (
            not_in("SELECT k FROM holed_rows WHERE k IS NOT NULL"),
            9_899,
        ),
    ] {
        let expected = local
            .sql(&sql)
            .await
            .expect("plans locally")
            .collect()
            .await
            .expect("runs locally");
        let actual = query(&context, &sql).await;
        assert_eq!(int64s(&actual, 0), vec![rows], "{sql}");
        assert_eq!(rendered(&actual), rendered(&expected), "{sql}");
    }
    cluster.shutdown().await;
}

/// A result stream's schema is that of its batches, also where DataFusion
/// computes a type other than the one its logical plan declares: a decimal
/// `sum` beside a `count(DISTINCT ...)` becomes a sum of sums, ten digits
/// wider. Arrow readers (the CLI's Parquet output, Flight SQL clients)
/// refused the mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_streams_batches_of_the_schema_it_declares() {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    write_parquet(
        &SessionContext::new(),
        "SELECT CAST(value AS DECIMAL(10, 2)) AS d, value % 3 AS k FROM range(10)",
        &dir.path().join("amounts/part-0.parquet"),
    )
    .await;
    query(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE amounts STORED AS PARQUET LOCATION '{}/'",
            dir.path().join("amounts").display()
        ),
    )
    .await;
    let stream = context
        .execute_sql(
            "SELECT sum(d) AS total, count(DISTINCT k) AS kinds FROM amounts",
            |_| {},
        )
        .await
        .expect("runs");
    let declared = stream.schema();
    let batches: Vec<RecordBatch> = futures::TryStreamExt::try_collect(stream)
        .await
        .expect("streams");
    let total = batches
        .iter()
        .find(|batch| batch.num_rows() > 0)
        .expect("a row");
    assert_eq!(
        declared.field(0).data_type(),
        total.schema().field(0).data_type()
    );
    assert_eq!(rendered(&batches).lines().nth(3), Some("| 45.00 | 3     |"));
    cluster.shutdown().await;
}

/// A window function whose clauses executors would not receive is refused,
/// naming the way around it, instead of answering as if it had none.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn window_clauses_that_executors_would_not_see_are_refused() {
    let (cluster, context) = cluster().await;
    let error = failure(
        &context,
        "SELECT count(*) FILTER (WHERE x > 0) OVER () AS c \
         FROM (VALUES (1), (-1)) t(x)",
    )
    .await;
    assert!(
        error.contains("cannot run on the cluster yet") && error.contains("CASE WHEN"),
        "{error}"
    );
    let batches = query(
        &context,
        "SELECT count(CASE WHEN x > 0 THEN 1 END) OVER () AS c FROM (VALUES (1), (-1)) t(x)",
    )
    .await;
    assert_eq!(int64s(&batches, 0), vec![1, 1]);
    cluster.shutdown().await;
}

/// An uncorrelated scalar subquery that returns several rows fails the
/// statement, as in one process, also when each of its tasks reads one row;
/// with one row or none it gives that row's value or null. Subqueries in an
/// aggregate's arguments run too. Both hold whether the subqueries run first
/// or, as a setting allows, are planned as joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scalar_subquery_of_several_rows_fails_the_statement() {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let local = SessionContext::new();
    // One row in each of two files: two tasks read one row each.
    table_of_two_files(&context, &local, dir.path(), "pairs", |part| {
        format!("SELECT CAST({part} AS BIGINT) AS k, CAST({part} * 10 AS BIGINT) AS v")
    })
    .await;
    // Run first (DataFusion's default), and planned as joins.
    for physical in [true, false] {
        query(
            &context,
            &format!(
                "SET datafusion.optimizer.enable_physical_uncorrelated_scalar_subquery = {physical}"
            ),
        )
        .await;
        for several in [
            "SELECT k, (SELECT v FROM pairs) AS v FROM pairs",
            "SELECT k FROM pairs WHERE v = (SELECT v FROM pairs WHERE k >= 0)",
        ] {
            let error = failure(&context, several).await;
            assert!(error.contains("more than one row"), "{several}: {error}");
        }
        let one = query(
            &context,
            "SELECT k FROM pairs WHERE v = (SELECT v FROM pairs WHERE k = 1)",
        )
        .await;
        assert_eq!(int64s(&one, 0), vec![1]);
        let none = query(
            &context,
            "SELECT k, (SELECT v FROM pairs WHERE k = 5) IS NULL AS empty FROM pairs ORDER BY k",
        )
        .await;
        assert_eq!(int64s(&none, 0), vec![0, 1]);
        assert_eq!(
            rendered(&none).matches("true").count(),
            2,
            "{}",
            rendered(&none)
        );
        // In an aggregate's arguments, where DataFusion's optimizer leaves them.
        let summed = query(
            &context,
            "SELECT sum(k + (SELECT max(v) FROM pairs)) AS s, \
             count(*) FILTER (WHERE v > (SELECT min(v) FROM pairs)) AS c FROM pairs",
        )
        .await;
        assert_eq!(
            (int64s(&summed, 0), int64s(&summed, 1)),
            (vec![21], vec![1])
        );
        // A window partitioned by one: its rows are shuffled on a column
        // computed below it, not on the subquery.
        let windowed = "SELECT k, sum(v) OVER (PARTITION BY k % (SELECT count(*) FROM pairs)) \
                        AS s FROM pairs ORDER BY k";
        assert_eq!(
            rendered(&query(&context, windowed).await),
            rendered(&one_process_answer(&local, windowed).await)
        );
        let error = failure(&context, "SELECT sum((SELECT v FROM pairs)) FROM pairs").await;
        assert!(error.contains("more than one row"), "{error}");
    }
    cluster.shutdown().await;
}

/// A `UNION` of inputs each grouped by the same key is interleaved
/// partition by partition (DataFusion's `InterleaveExec`), which needs its
/// children hash-partitioned alike: the shuffle readers that replace their
/// exchanges say so, on the scheduler and on executors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_union_of_inputs_grouped_alike_is_interleaved() {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    create_facts_and_dims(&context, dir.path()).await;
    // Keys 0..1000 and 0..700: 700 keys twice, 300 once.
    let sql = "SELECT n, count(*) AS keys FROM (SELECT k, count(*) AS n FROM (\
               SELECT k % 1000 AS k FROM facts GROUP BY k % 1000 \
               UNION ALL SELECT k % 700 AS k FROM dims GROUP BY k % 700) GROUP BY k) \
               GROUP BY n ORDER BY n";
    let explained = rendered(&query(&context, &format!("EXPLAIN {sql}")).await);
    assert!(explained.contains("InterleaveExec"), "{explained}");
    let counted = query(&context, sql).await;
    assert_eq!(
        (int64s(&counted, 0), int64s(&counted, 1)),
        (vec![1, 2], vec![300, 700])
    );
    cluster.shutdown().await;
}

/// A recursive CTE runs in one task, with its work table in that task's
/// memory, and answers as in one process: over a table of edges read from
/// two files, through joins and aggregates in its terms, and with a column
/// that its recursive term does not read (DataFusion pushes a projection
/// into the work table read).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recursive_ctes_answer_as_in_one_process() {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let local = SessionContext::new();
    // A binary tree of 1,000 nodes: node n has children 2n + 1 and 2n + 2.
    table_of_two_files(&context, &local, dir.path(), "edges", |part| {
        format!(
            "SELECT value AS src, value * 2 + 1 + side AS dst FROM range({}, {}) \
             CROSS JOIN (VALUES (0), (1)) s(side) WHERE value * 2 + 1 + side < 1000",
            part * 500,
            (part + 1) * 500
        )
    })
    .await;
    for sql in [
        "WITH RECURSIVE reach(node, depth) AS (\
           SELECT CAST(0 AS BIGINT) AS node, 0 AS depth \
           UNION ALL \
           SELECT e.dst, r.depth + 1 FROM reach r JOIN edges e ON e.src = r.node) \
         SELECT depth, count(*) AS nodes, sum(node) AS total FROM reach GROUP BY depth ORDER BY depth",
        "WITH RECURSIVE countdown(n, label) AS (\
           SELECT 5 AS n, 'start' AS label \
           UNION ALL \
           SELECT n - 1, 'step' FROM countdown WHERE n > 0) \
         SELECT n, label FROM countdown ORDER BY n",
        "SELECT count(*) FROM edges WHERE dst IN (\
           WITH RECURSIVE left_spine(node) AS (\
             SELECT CAST(0 AS BIGINT) AS node UNION SELECT node * 2 + 1 FROM left_spine WHERE node < 500) \
           SELECT node FROM left_spine)",
    ] {
        let expected = rendered(&one_process_answer(&local, sql).await);
        assert_eq!(rendered(&query(&context, sql).await), expected, "{sql}");
    }
    let explained = rendered(
        &query(
            &context,
            "EXPLAIN WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 3) \
             SELECT n FROM c",
        )
        .await,
    );
    assert!(
        explained.contains("RecursiveQueryExec") && explained.contains("WorkTableExec"),
        "{explained}"
    );
    cluster.shutdown().await;
}

/// Windows of opposite orders share one sort: DataFusion evaluates one of
/// them reversed, which a `lag`, `lead` or `nth_value` sent to executors
/// keeps (they once looked the other way). A literal that spells the flag's
/// `Debug` form reverses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn windows_of_opposite_orders_answer_as_in_one_process() {
    let (cluster, context) = cluster().await;
    let local = SessionContext::new();
    let rows = "(VALUES (1, 10), (2, 20), (3, 30), (4, 40)) t(x, y)";
    for sql in [
        format!(
            "SELECT x, nth_value(y, 2) OVER (ORDER BY x ROWS BETWEEN UNBOUNDED PRECEDING \
             AND UNBOUNDED FOLLOWING) AS second, \
             nth_value(y, 3) OVER (ORDER BY x ROWS BETWEEN 1 PRECEDING AND 2 FOLLOWING) AS third, \
             first_value(y) OVER (ORDER BY x DESC) AS first, \
             row_number() OVER (ORDER BY x DESC) AS n FROM {rows} ORDER BY x"
        ),
        format!(
            "SELECT x, lag(x) OVER (ORDER BY x) AS lg, lead(x) OVER (ORDER BY x DESC) AS ld \
             FROM {rows} ORDER BY x"
        ),
        format!(
            "SELECT x, lead(y, 1, 0) OVER (ORDER BY x) AS ld, \
             lag(y, 2) OVER (ORDER BY x DESC) AS lg, \
             row_number() OVER (ORDER BY x DESC) AS n FROM {rows} ORDER BY x"
        ),
        format!(
            "SELECT x, lag(CAST(y AS VARCHAR), 1, ', is_reversed: true, ignore_nulls: ') \
             OVER (ORDER BY x) AS lg FROM {rows} ORDER BY x"
        ),
    ] {
        let expected = rendered(&one_process_answer(&local, &sql).await);
        assert_eq!(rendered(&query(&context, &sql).await), expected, "{sql}");
    }
    cluster.shutdown().await;
}

/// CSV written by executors holds dates, times and timestamps as written in
/// one process (the encoding of plans once turned their unset formats into
/// empty ones, and every such value into an empty field), Parquet files keep
/// their key-value metadata, CSV and JSON files keep their format of zoned
/// timestamps and compression level, and gzip CSV and JSON files, which
/// Quiver writes, read back (the encoding once dropped all of these).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn csv_and_json_files_keep_their_values_and_compression() {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let local = SessionContext::new();
    let select = "SELECT 1 AS x, DATE '2024-01-02' AS d, TIMESTAMP '2024-01-02 03:04:05' AS ts, \
                  TIME '01:02:03' AS t";
    for (engine, file) in ["cluster.csv", "local.csv"].iter().enumerate() {
        let copy = format!(
            "COPY ({select}) TO '{}' STORED AS CSV",
            dir.path().join(file).display()
        );
        if engine == 0 {
            query(&context, &copy).await;
        } else {
            one_process_answer(&local, &copy).await;
        }
    }
    let written = std::fs::read_to_string(dir.path().join("cluster.csv")).expect("read");
    assert_eq!(
        written,
        std::fs::read_to_string(dir.path().join("local.csv")).expect("read")
    );
    assert!(written.contains("2024-01-02,"), "{written}");

    // The format of zoned timestamps and the compression level, which the
    // encoding of plans once dropped: the files equal DataFusion's, byte
    // for byte (gzip records the level in its header).
    let zoned = "SELECT 1 AS x, arrow_cast(TIMESTAMP '2024-01-02 03:04:05', \
                 'Timestamp(Nanosecond, Some(\"+02:00\"))') AS tz";
    for (format, options) in [
        ("CSV", "'format.timestamp_tz_format' '%d/%m/%Y %H:%M %z', "),
        ("JSON", ""),
    ] {
        let mut written = Vec::new();
        for engine in ["cluster", "local"] {
            let path = dir.path().join(format!("{engine}-zoned.{format}.gz"));
            let copy = format!(
                "COPY ({zoned}) TO '{}' STORED AS {format} OPTIONS ({options}\
                 'format.compression' 'gzip', 'format.compression_level' '1')",
                path.display()
            );
            if engine == "cluster" {
                query(&context, &copy).await;
            } else {
                one_process_answer(&local, &copy).await;
            }
            written.push(std::fs::read(&path).expect("read"));
        }
        assert_eq!(written[0], written[1], "{format}");
    }

    // Parquet key-value metadata, in a single file and in a folder's files.
    for target in ["single.parquet", "folder/"] {
        let path = dir.path().join(target);
        query(
            &context,
            &format!(
                "COPY ({select}) TO '{}' STORED AS PARQUET \
                 OPTIONS ('format.metadata::owner' 'pipelines')",
                path.display()
            ),
        )
        .await;
        let files: Vec<std::path::PathBuf> = if path.is_dir() {
            std::fs::read_dir(&path)
                .expect("list")
                .map(|entry| entry.expect("entry").path())
                .filter(|file| file.extension().is_some_and(|ext| ext == "parquet"))
                .collect()
        } else {
            vec![path]
        };
        assert!(!files.is_empty(), "{target}");
        for file in files {
            let reader = parquet::file::serialized_reader::SerializedFileReader::new(
                std::fs::File::open(&file).expect("open"),
            )
            .expect("a Parquet file");
            let metadata = parquet::file::reader::FileReader::metadata(&reader)
                .file_metadata()
                .key_value_metadata()
                .cloned()
                .unwrap_or_default();
            assert!(
                metadata
                    .iter()
                    .any(|kv| kv.key == "owner" && kv.value.as_deref() == Some("pipelines")),
                "{}: {metadata:?}",
                file.display()
            );
        }
    }

    for format in ["CSV", "JSON"] {
        let folder = dir.path().join(format!("zipped-{format}"));
        query(
            &context,
            &format!(
                "COPY (SELECT value AS k, value * 2 AS v FROM range(1000)) TO '{}/' \
                 STORED AS {format} OPTIONS ('format.compression' 'gzip')",
                folder.display()
            ),
        )
        .await;
        let header = if format == "CSV" {
            ", 'format.has_header' 'true'"
        } else {
            ""
        };
        query(
            &context,
            &format!(
                "CREATE EXTERNAL TABLE zipped_{format} STORED AS {format} LOCATION '{}/' \
                 OPTIONS ('format.compression' 'gzip'{header})",
                folder.display()
            ),
        )
        .await;
        let summed = query(
            &context,
            &format!("SELECT count(*), sum(k), sum(v) FROM zipped_{format}"),
        )
        .await;
        assert_eq!(
            (int64s(&summed, 0), int64s(&summed, 1), int64s(&summed, 2)),
            (vec![1000], vec![499_500], vec![999_000]),
            "{format}"
        );
    }
    cluster.shutdown().await;
}

/// Grouping sets of no columns return a row each, as in one process (their
/// encoding for executors once lost them, and the answer had no rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grouping_sets_of_no_columns_return_their_rows() {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    create_facts_and_dims(&context, dir.path()).await;
    let local = SessionContext::new();
    for sql in [
        "SELECT count(*) AS n FROM facts GROUP BY GROUPING SETS (())",
        "SELECT count(*) AS n, sum(k) AS s FROM facts GROUP BY GROUPING SETS ((), ())",
        "SELECT count(*) AS n FROM facts WHERE k < 0 GROUP BY GROUPING SETS (())",
        "SELECT 1 AS x GROUP BY GROUPING SETS (())",
    ] {
        let batches = query(&context, sql).await;
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let expected = if sql.contains("((), ())") { 2 } else { 1 };
        assert_eq!(rows, expected, "{sql}: {}", rendered(&batches));
        if sql.contains("FROM facts") {
            let summed = int64s(&batches, 0).iter().sum::<i64>();
            let ones = if sql.contains("k < 0") { 0 } else { 100_000 };
            assert_eq!(summed, ones * expected as i64, "{sql}");
        } else {
            let expected = one_process_answer(&local, sql).await;
            assert_eq!(rendered(&batches), rendered(&expected), "{sql}");
        }
    }
    cluster.shutdown().await;
}

/// An uncorrelated scalar subquery runs first, in stages of its own, and a
/// task that reads its value gets it before it scans: a scan filtered by it
/// prunes by it, as in one process. The keys above the largest but ten are
/// all in the second of two files; the first is not read. An incremental
/// load, which appends the rows above the table's largest key, runs the
/// same way, and its commit waits for nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scalar_subqueries_run_first_and_prune_the_scans_that_read_them() {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    create_facts_and_dims(&context, dir.path()).await;
    let last_ten = "SELECT count(*) AS n FROM facts WHERE k > (SELECT max(k) - 10 FROM dims)";
    assert_eq!(int64s(&query(&context, last_ten).await, 0), vec![10]);
    let analyzed = explain_analyze(&context, last_ten).await;
    let scan = analyzed
        .lines()
        .find(|line| line.contains("DataSourceExec") && line.contains("scalar_subquery"))
        .unwrap_or_else(|| panic!("a scan filtered by the subquery: {analyzed}"));
    let scanned: u64 = scan
        .split("output_rows=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|rows| rows.parse().ok())
        .unwrap_or_else(|| panic!("the scan's rows: {scan}"));
    assert!(scanned < 50_000, "{scanned} rows scanned: {analyzed}");

    let target = dir.path().join("target");
    query(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE target (k BIGINT) STORED AS PARQUET LOCATION '{}/'",
            target.display()
        ),
    )
    .await;
    let load = "INSERT INTO target SELECT k FROM facts \
                WHERE k > (SELECT coalesce(max(k), -1) FROM target)";
    query(&context, &format!("{load} AND k < 60000")).await;
    query(&context, load).await;
    query(&context, load).await;
    let loaded = query(
        &context,
        "SELECT count(*) AS n, count(DISTINCT k) AS keys, max(k) AS top FROM target",
    )
    .await;
    assert_eq!(
        rendered(&loaded),
        rendered(
            &query(
                &context,
                "SELECT count(*) AS n, count(DISTINCT k) AS keys, max(k) AS top FROM facts",
            )
            .await
        )
    );
    cluster.shutdown().await;
}

/// Several `count(DISTINCT ...)` over structs and lists count as in one
/// process, and ordered `array_agg`s of them collect as in one process.
/// DataFusion's own count measured each shuffled struct as the whole
/// message it came in, and asked the memory pool for hundreds of GB.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aggregates_of_nested_values_answer_as_in_one_process() {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let local = SessionContext::new();
    table_of_two_files(&context, &local, dir.path(), "labelled", |part| {
        let first = part * 2_000;
        format!(
            "SELECT CAST(value AS INT) AS a, 's' || CAST(value % 7 AS VARCHAR) AS b \
             FROM generate_series({first}, {})",
            first + 1_999
        )
    })
    .await;
    for sql in [
        "SELECT count(DISTINCT (a, b)) AS pairs, count(DISTINCT b) AS labels FROM labelled",
        "SELECT count(DISTINCT [a % 100, 1]) AS lists, count(DISTINCT (b, a % 3)) AS pairs, \
         count(*) AS n FROM labelled",
        "SELECT b, count(DISTINCT struct(a % 50, b)) AS pairs, count(DISTINCT a % 5) AS fifths \
         FROM labelled GROUP BY b ORDER BY b",
        "SELECT b, array_agg(struct(a, b) ORDER BY a DESC) AS pairs FROM labelled \
         WHERE a % 10 = 0 GROUP BY b ORDER BY b",
        "SELECT cardinality(array_agg([a, a % 3] ORDER BY b, a)) AS n, \
         array_agg(a ORDER BY struct(b, -a)) AS keys FROM labelled WHERE a < 300",
    ] {
        let batches = query(&context, sql).await;
        let expected = one_process_answer(&local, sql).await;
        assert_eq!(rendered(&batches), rendered(&expected), "{sql}");
    }
    cluster.shutdown().await;
}

/// A cluster with `facts` and `dims` (in the returned folder) whose
/// session broadcasts no join side estimated over 64 KiB, at planning time
/// or at run time.
async fn cluster_joining_partitioned() -> (StandaloneCluster, QuiverContext, tempfile::TempDir) {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    create_facts_and_dims(&context, dir.path()).await;
    for setting in [
        "SET datafusion.optimizer.hash_join_single_partition_threshold = 65536",
        "SET datafusion.optimizer.hash_join_single_partition_threshold_rows = 10",
        "SET quiver.broadcast_join_max_bytes = 0",
    ] {
        query(&context, setting).await;
    }
    (cluster, context, dir)
}

/// A table made by `CREATE TABLE ... AS` owns its warehouse folder:
/// dropping it (or its schema, cascading) deletes the folder, replacing it
/// keeps the new data, and an external table's files stay when it is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropping_a_created_table_deletes_its_folder() {
    let warehouse = tempfile::tempdir().expect("warehouse");
    let options = StandaloneOptions {
        warehouse: Some(warehouse.path().display().to_string()),
        ..StandaloneOptions::default()
    };
    let cluster = StandaloneCluster::start(options).await.expect("start");
    let context = cluster.connect(2).await.expect("connect");
    let folder = |schema: &str, table: &str| warehouse.path().join(schema).join(table);

    query(&context, "CREATE TABLE made AS SELECT 1 AS a").await;
    query(&context, "CREATE OR REPLACE TABLE made AS SELECT 2 AS a").await;
    assert_eq!(count(&context, "SELECT sum(a) FROM made").await, 2);
    assert!(folder("public", "made").is_dir());
    query(&context, "DROP TABLE made").await;
    assert!(
        !folder("public", "made").exists(),
        "the dropped table's folder stays"
    );
    query(&context, "CREATE TABLE made AS SELECT 3 AS a").await;
    assert_eq!(count(&context, "SELECT sum(a) FROM made").await, 3);

    query(&context, "CREATE SCHEMA staging").await;
    query(&context, "CREATE TABLE staging.one AS SELECT 1 AS a").await;
    query(&context, "CREATE TABLE staging.two AS SELECT 2 AS a").await;
    query(&context, "DROP SCHEMA staging CASCADE").await;
    assert!(!folder("staging", "one").exists() && !folder("staging", "two").exists());

    let outside = tempfile::tempdir().expect("external folder");
    query(
        &context,
        &format!(
            "COPY (SELECT 1 AS a) TO '{}/' STORED AS PARQUET",
            outside.path().display()
        ),
    )
    .await;
    query(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE declared STORED AS PARQUET LOCATION '{}/'",
            outside.path().display()
        ),
    )
    .await;
    query(&context, "DROP TABLE declared").await;
    let kept = std::fs::read_dir(outside.path())
        .expect("external folder")
        .count();
    assert!(kept > 0, "an external table's files were deleted");
    // An external table is not managed even on its name's warehouse folder,
    // as a lake whose layout the warehouse follows would have it.
    let lake = folder("public", "lake");
    query(
        &context,
        &format!(
            "COPY (SELECT 1 AS a) TO '{}/' STORED AS PARQUET",
            lake.display()
        ),
    )
    .await;
    query(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE lake STORED AS PARQUET LOCATION '{}/'",
            lake.display()
        ),
    )
    .await;
    query(&context, "DROP TABLE lake").await;
    assert!(
        lake.is_dir(),
        "an external table's files in the warehouse were deleted"
    );
    // Another catalog's table of the same name has a folder of its own.
    query(&context, "CREATE DATABASE other").await;
    query(&context, "CREATE SCHEMA other.public").await;
    query(&context, "CREATE TABLE other.public.made AS SELECT 9 AS a").await;
    query(&context, "DROP TABLE other.public.made").await;
    assert_eq!(count(&context, "SELECT sum(a) FROM made").await, 3);
    assert!(
        folder("public", "made").is_dir(),
        "another table's folder went"
    );
    cluster.shutdown().await;
}

/// The report of `EXPLAIN ANALYZE sql`, as text.
async fn explain_analyze(context: &QuiverContext, sql: &str) -> String {
    rendered(&query(context, &format!("EXPLAIN ANALYZE {sql}")).await)
}

/// `batches` as a text table.
fn rendered(batches: &[RecordBatch]) -> String {
    arrow::util::pretty::pretty_format_batches(batches)
        .expect("render")
        .to_string()
}

/// Tables `facts` and `dims`, each of the keys 0 to 99 999 in two Parquet
/// files, so that each scan has two partitions.
async fn create_facts_and_dims(context: &QuiverContext, dir: &Path) {
    let local = SessionContext::new();
    for table in ["facts", "dims"] {
        // Two files each, so that each scan has two partitions.
        for part in 0..2 {
            let (from, to) = (part * 50_000, (part + 1) * 50_000);
            let path = dir.join(table).join(format!("part-{part}.parquet"));
            write_parquet(
                &local,
                &format!("SELECT value AS k FROM range({from}, {to})"),
                &path,
            )
            .await;
        }
        let location = dir.join(table);
        query(
            context,
            &format!(
                "CREATE EXTERNAL TABLE {table} STORED AS PARQUET LOCATION '{}/'",
                location.display()
            ),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_to_one_table_run_one_at_a_time() {
    let (cluster, context) = cluster().await;
    let folders = tempfile::tempdir().expect("temp folder");
    for table in ["busy", "other"] {
        let ddl = format!(
            "CREATE EXTERNAL TABLE {table} (value BIGINT) STORED AS PARQUET LOCATION '{}/{table}/'",
            folders.path().display()
        );
        query(&context, &ddl).await;
    }
    // A write that would go on for hours, until cancelled, finishing small
    // files as it goes.
    query(&context, "SET quiver.target_file_bytes = 65536").await;
    let endless = context
        .submit_sql("INSERT INTO busy SELECT value FROM range(1, 1000000000000)")
        .await
        .expect("submit");
    wait_for_state(&context, &endless.job_id, JobState::Running).await;
    let staging = folders.path().join("busy/_temporary").join(&endless.job_id);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !staging.exists() {
        assert!(
            Instant::now() < deadline,
            "the endless write staged nothing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let same_table = context
        .submit_sql("INSERT OVERWRITE busy SELECT 1 AS value")
        .await
        .expect("submit");
    let other_table = context
        .submit_sql("INSERT INTO other SELECT 2 AS value")
        .await
        .expect("submit");
    wait_for_state(&context, &other_table.job_id, JobState::Succeeded).await;
    let waiting = context
        .job_status(&same_table.job_id)
        .await
        .expect("status");
    assert_eq!(
        waiting.state(),
        JobState::Queued,
        "a second writer of a table waits for the first"
    );

    assert_eq!(
        context.cancel_job(&endless.job_id).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    wait_for_state(&context, &same_table.job_id, JobState::Succeeded).await;
    let rows = query(&context, "SELECT value FROM busy").await;
    assert_eq!(rows.iter().map(|batch| batch.num_rows()).sum::<usize>(), 1);

    // The cancelled write's staged files are deleted, stragglers included.
    let deadline = Instant::now() + Duration::from_secs(30);
    while staging.exists() {
        assert!(
            Instant::now() < deadline,
            "a cancelled write left {}",
            staging.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catalog_queries_run_on_the_scheduler() {
    let (cluster, context) = cluster().await;
    let folder = tempfile::tempdir().expect("temp folder");
    let ddl = format!(
        "CREATE EXTERNAL TABLE described (id BIGINT, name VARCHAR) STORED AS PARQUET LOCATION '{}/'",
        folder.path().display()
    );
    query(&context, &ddl).await;
    for (sql, expected) in [
        ("SHOW TABLES", "described"),
        ("SHOW COLUMNS FROM described", "name"),
        ("SHOW CREATE TABLE described", "LOCATION"),
        (
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
            "described",
        ),
    ] {
        let stream = context.execute_sql(sql, |_| {}).await.expect(sql);
        let batches = datafusion::physical_plan::common::collect(stream)
            .await
            .expect(sql);
        let text = rendered(&batches);
        assert!(text.contains(expected), "{sql}:\n{text}");
    }
    cluster.shutdown().await;
}

/// `PREPARE` and `EXECUTE` sent as text (as the CLI sends them) keep their
/// statements in the client's session, and the prepared plan runs on the
/// cluster; the scheduler, which plans each statement it is sent in a
/// session of its own, refuses them rather than forget them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prepared_statements_sent_as_text_run_in_their_session() {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    create_facts_and_dims(&context, dir.path()).await;
    let text = async |sql: &str| {
        let stream = context.execute_sql(sql, |_| {}).await?;
        datafusion::physical_plan::common::collect(stream)
            .await
            .map_err(quiver_client::Error::from)
    };
    text("PREPARE below(BIGINT) AS SELECT count(*) FROM facts WHERE k < $1")
        .await
        .expect("prepare");
    let counted = text("EXECUTE below(1000)").await.expect("execute");
    assert_eq!(int64s(&counted, 0), vec![1000]);
    text("PREPARE copied(BIGINT) AS INSERT INTO facts VALUES ($1)")
        .await
        .expect("prepare a write");
    let write = text("EXECUTE copied(1)")
        .await
        .expect_err("a prepared write");
    assert!(
        write.to_string().contains("prepared queries only"),
        "{write}"
    );
    text("DEALLOCATE below").await.expect("deallocate");
    let gone = text("EXECUTE below(1000)").await.expect_err("deallocated");
    assert!(gone.to_string().contains("does not exist"), "{gone}");

    let refused = context
        .submit_sql("PREPARE p(INT) AS SELECT $1")
        .await
        .expect_err("refused");
    assert!(
        refused
            .to_string()
            .contains("keep nothing between statements"),
        "{refused}"
    );
    cluster.shutdown().await;
}

/// A small result comes back with the final task's status, and a large one
/// stays on the executor to be streamed over Flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_results_come_back_inline() {
    let (cluster, context) = cluster().await;
    for (sql, rows, inline) in [
        ("SELECT 1 AS one", 1, true),
        // About 2.4 MB of IPC: above the 64 KiB inline limit.
        ("SELECT value * 7 AS x FROM range(300000)", 300000, false),
    ] {
        let job_id = std::sync::Mutex::new(String::new());
        let stream = context
            .execute_sql(sql, |status| {
                *job_id.lock().expect("id lock") = status.job_id.clone();
            })
            .await
            .expect(sql);
        let batches = datafusion::physical_plan::common::collect(stream)
            .await
            .expect(sql);
        assert_eq!(
            batches.iter().map(RecordBatch::num_rows).sum::<usize>(),
            rows
        );
        let job_id = job_id.lock().expect("id lock").clone();
        let status = context.job_status(&job_id).await.expect("status");
        assert!(!status.result.is_empty(), "{sql}: no result outputs");
        let inlined = status
            .result
            .iter()
            .any(|output| !output.inline_result.is_empty());
        assert_eq!(inlined, inline, "{sql}");
    }
    cluster.shutdown().await;
}

/// A table stored sorted by its key, in two files of disjoint key ranges,
/// declared `WITH ORDER`: the scan's aggregate streams, yet a query that
/// orders by the key gets its rows in order, though the shuffle between
/// the two aggregates does not keep the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sorted_tables_keep_their_order_across_shuffles() {
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::parquet::arrow::ArrowWriter;

    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let schema = std::sync::Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("v", DataType::Int64, false),
    ]));
    for (file, keys) in [(1, 0..1000_i64), (2, 1000..2000)] {
        // Three rows per key, so the partial aggregate has groups to merge.
        let keys: Vec<i64> = keys.flat_map(|k| [k, k, k]).collect();
        let values: Vec<i64> = keys.iter().map(|k| k % 7).collect();
        let batch = RecordBatch::try_new(
            std::sync::Arc::clone(&schema),
            vec![
                std::sync::Arc::new(Int64Array::from(keys)),
                std::sync::Arc::new(Int64Array::from(values)),
            ],
        )
        .expect("batch");
        let path = dir.path().join(format!("part-{file}.parquet"));
        let mut writer = ArrowWriter::try_new(
            std::fs::File::create(&path).expect("create"),
            batch.schema(),
            None,
        )
        .expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
    }
    query(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE sorted_facts STORED AS PARQUET WITH ORDER (k ASC) LOCATION '{}/'",
            dir.path().display()
        ),
    )
    .await;

    let sql = "SELECT k, sum(v) AS total FROM sorted_facts GROUP BY k ORDER BY k";
    let plan = explain_analyze(&context, sql).await;
    assert!(
        plan.contains("mode=Partial") && plan.contains("ordering_mode=Sorted"),
        "the scan's aggregate streams over the sorted files: {plan}"
    );
    let batches = query(&context, sql).await;
    assert_eq!(int64s(&batches, 0), (0..2000).collect::<Vec<_>>());
    let totals = int64s(&batches, 1);
    assert!(
        (0..2000).all(|k| totals[k as usize] == 3 * (k % 7)),
        "every key's three rows are summed once"
    );

    let first = query(
        &context,
        "SELECT k FROM (SELECT k, count(*) AS n FROM sorted_facts GROUP BY k) ORDER BY k LIMIT 5",
    )
    .await;
    assert_eq!(int64s(&first, 0), vec![0, 1, 2, 3, 4]);
    cluster.shutdown().await;
}

async fn failure(context: &QuiverContext, sql: &str) -> String {
    match context.sql(sql).await {
        Err(error) => error.to_string(),
        Ok(frame) => frame
            .collect()
            .await
            .err()
            .unwrap_or_else(|| panic!("{sql}: must fail"))
            .to_string(),
    }
}

async fn count(context: &QuiverContext, sql: &str) -> i64 {
    int64s(&query(context, sql).await, 0)[0]
}

/// A write into more partition folders than a task keeps files open writes
/// each folder once per task, not a small file each time a folder comes back.
/// The job's status counts the files and bytes it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wide_partitioned_write_makes_one_file_per_folder_and_task() {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    // Every batch holds rows of all 200 folders.
    let copy = format!(
        "COPY (SELECT value AS v, value % 200 AS p FROM range(200000)) TO '{}/' \
         STORED AS PARQUET PARTITIONED BY (p)",
        dir.path().display()
    );
    let mut last_status = None;
    let stream = context
        .execute_sql(&copy, |status| last_status = Some(status.clone()))
        .await
        .expect("submit the COPY");
    datafusion::physical_plan::common::collect(stream)
        .await
        .expect("run the COPY");
    let status = last_status.expect("a status");
    assert_eq!(status.state(), JobState::Succeeded);
    let folders: Vec<std::path::PathBuf> = std::fs::read_dir(dir.path())
        .expect("table folder")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("p="))
        })
        .collect();
    assert_eq!(folders.len(), 200);
    let most = folders
        .iter()
        .map(|folder| std::fs::read_dir(folder).expect("folder").count())
        .max()
        .unwrap_or_default();
    // One file per write task at most (the cluster plans 4 partitions).
    assert!(most <= 4, "a folder holds {most} files");
    let files: Vec<std::fs::Metadata> = folders
        .iter()
        .flat_map(|folder| std::fs::read_dir(folder).expect("folder"))
        .map(|entry| entry.expect("entry").metadata().expect("metadata"))
        .collect();
    assert_eq!(status.table_files_written, files.len() as u64);
    assert_eq!(
        status.table_bytes_written,
        files.iter().map(std::fs::Metadata::len).sum::<u64>()
    );
    query(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE wide STORED AS PARQUET LOCATION '{}/'",
            dir.path().display()
        ),
    )
    .await;
    assert_eq!(count(&context, "SELECT count(*) FROM wide").await, 200_000);
    assert_eq!(
        count(&context, "SELECT count(*) FROM wide WHERE p = 7").await,
        1_000
    );
    cluster.shutdown().await;
}

/// Readers see a write from its manifest on, whole, and not the files an
/// overwrite replaces, although it deletes them afterwards: the states a
/// commit passes through are planted on disk, then the real thing runs
/// under readers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_see_committed_writes_whole() {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let table = dir.path();
    query(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE snap (k BIGINT, p BIGINT) STORED AS PARQUET \
             PARTITIONED BY (p) LOCATION '{}/'",
            table.display()
        ),
    )
    .await;
    query(
        &context,
        "INSERT INTO snap SELECT value, value % 20 FROM range(200000)",
    )
    .await;
    let totals = "SELECT count(*), sum(k) FROM snap";
    let read = |context: QuiverContext| async move {
        let batches = query(&context, totals).await;
        (int64s(&batches, 0)[0], int64s(&batches, 1)[0])
    };
    let old = (200_000, (0..200_000).sum::<i64>());
    assert_eq!(read(context.clone()).await, old);
    let folder = table.join("p=0");
    let committed: Vec<std::path::PathBuf> = std::fs::read_dir(&folder)
        .expect("folder")
        .map(|entry| entry.expect("entry").path())
        .collect();
    let rows_in_folder = count(&context, "SELECT count(*) FROM snap WHERE p = 0").await;

    // A commit moving its files in: they are not read before its manifest.
    let job = "00000000000000ab";
    let moved = folder.join(format!("part-{job}-00000-000.parquet"));
    std::fs::copy(&committed[0], &moved).expect("copy");
    assert_eq!(read(context.clone()).await, old);
    let manifests = table.join("_manifests");
    std::fs::write(manifests.join(format!("{job}.json")), "{}").expect("manifest");
    let with_copy = read(context.clone()).await;
    assert!(
        with_copy.0 > old.0,
        "a committed write is read: {with_copy:?}"
    );
    // An overwrite of p=0 that committed and has not deleted what it
    // replaces yet: those files are no longer read.
    let replaced: Vec<String> = committed
        .iter()
        .map(|path| format!("p=0/{}", path.file_name().expect("name").to_string_lossy()))
        .collect();
    std::fs::write(
        manifests.join(format!("{job}.replaces")),
        serde_json::to_string(&replaced).expect("list"),
    )
    .expect("list of replaced files");
    assert_eq!(
        count(&context, "SELECT count(*) FROM snap WHERE p = 0").await,
        with_copy.0 - old.0,
        "only the overwrite's own file in p=0"
    );
    std::fs::remove_file(manifests.join(format!("{job}.replaces"))).expect("remove");
    std::fs::remove_file(manifests.join(format!("{job}.json"))).expect("remove");
    std::fs::remove_file(&moved).expect("remove");
    assert_eq!(
        count(&context, "SELECT count(*) FROM snap WHERE p = 0").await,
        rows_in_folder
    );

    // Readers during a real overwrite see the old rows or the new ones. A
    // reader still reading replaced files when the overwrite deletes them
    // is planned again, and reads the new ones.
    let new = (old.0, old.1 + old.0);
    let overwrite = tokio::spawn({
        let context = context.clone();
        async move { query(&context, "INSERT OVERWRITE snap SELECT k + 1, p FROM snap").await }
    });
    let mut seen = Vec::new();
    while !overwrite.is_finished() {
        seen.push(read(context.clone()).await);
    }
    overwrite.await.expect("overwrite");
    eprintln!("{} reads ran during the overwrite", seen.len());
    seen.push(read(context.clone()).await);
    for totals in &seen {
        assert!(*totals == old || *totals == new, "a reader saw {totals:?}");
    }
    assert_eq!(seen.last(), Some(&new));
    // The overwrite rewrote every folder, so the first write's manifest,
    // and the list of replaced files, went with its files; its claim in
    // the order of overwrites stays.
    let left: Vec<_> = manifests
        .read_dir()
        .expect("manifests")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().any(|name| name == "order"), "{left:?}");

    // The first Quiver write into a folder that another engine wrote, and
    // that so has no manifests, is not read while its job stages.
    let foreign = tempfile::tempdir().expect("temp dir");
    let spark_file = foreign
        .path()
        .join("part-00000-5a1c7d0e-c000.snappy.parquet");
    let current = std::fs::read_dir(&folder)
        .expect("folder")
        .next()
        .expect("a file")
        .expect("entry")
        .path();
    std::fs::copy(current, &spark_file).expect("copy");
    query(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE foreign_t (k BIGINT) STORED AS PARQUET LOCATION '{}/'",
            foreign.path().display()
        ),
    )
    .await;
    let spark_rows = count(&context, "SELECT count(*) FROM foreign_t").await;
    std::fs::copy(
        &spark_file,
        foreign.path().join(format!("part-{job}-00000-000.parquet")),
    )
    .expect("copy");
    let staging = foreign.path().join(format!("_temporary/{job}/p0-a0"));
    std::fs::create_dir_all(&staging).expect("staging");
    assert_eq!(
        count(&context, "SELECT count(*) FROM foreign_t").await,
        spark_rows
    );
    std::fs::remove_dir_all(foreign.path().join("_temporary")).expect("remove");
    assert_eq!(
        count(&context, "SELECT count(*) FROM foreign_t").await,
        2 * spark_rows
    );
    cluster.shutdown().await;
}

/// Folders that another writer spelled otherwise than Quiver does
/// (`month=01`, as Kafka Connect writes months) are found by the value they
/// hold, and an overwrite that writes that value replaces them rather than
/// leaving their rows beside the new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn folders_spelled_by_other_writers_are_read_and_replaced_by_their_values() {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("padded");
    // Written with a string column, so its folders are spelled as given.
    query(
        &context,
        &format!(
            "COPY (SELECT * FROM (VALUES (1, '01'), (2, '01'), (4, '02')) t(x, month)) \
             TO '{}/' STORED AS PARQUET PARTITIONED BY (month)",
            out.display()
        ),
    )
    .await;
    assert!(out.join("month=01").is_dir());
    query(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE padded (x BIGINT, month INT) \
             STORED AS PARQUET PARTITIONED BY (month) LOCATION '{}/'",
            out.display()
        ),
    )
    .await;
    let total = |filter: &'static str| {
        let context = context.clone();
        async move {
            let sql = format!("SELECT CAST(sum(x) AS BIGINT) FROM padded WHERE {filter}");
            int64s(&query(&context, &sql).await, 0)
        }
    };
    assert_eq!(total("month = 1").await, vec![3]);
    assert_eq!(total("month = 2").await, vec![4]);

    query(
        &context,
        "INSERT OVERWRITE padded SELECT x * 10, month FROM padded WHERE month = 1",
    )
    .await;
    assert_eq!(total("month = 1").await, vec![30]);
    assert_eq!(total("month IN (1, 2)").await, vec![34]);
    let parquet_files = |folder: &str| {
        std::fs::read_dir(out.join(folder))
            .map(|entries| {
                entries
                    .filter(|entry| {
                        let name = entry.as_ref().expect("entry").file_name();
                        name.to_string_lossy().ends_with(".parquet")
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(
        parquet_files("month=01"),
        0,
        "the replaced folder is emptied"
    );
    assert!(parquet_files("month=1") > 0);
    assert!(parquet_files("month=02") > 0, "other folders stay");
    cluster.shutdown().await;
}

/// A statement whose plan is larger than gRPC's default message limit (4
/// MiB) runs: its tasks' launches carry the plan to the executors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plan_larger_than_4_mib_reaches_the_executors() {
    let (cluster, context) = cluster().await;
    let literal = "x".repeat(5 << 20);
    let sql = format!("SELECT length(v) FROM (VALUES ('{literal}'), ('y')) AS t(v) ORDER BY 1");
    let stream = context
        .execute_sql(&sql, |_| {})
        .await
        .expect("the statement runs");
    let batches = datafusion::physical_plan::common::collect(stream)
        .await
        .expect("its result");
    let lengths: Vec<i32> = batches
        .iter()
        .flat_map(|batch| {
            batch
                .column(0)
                .as_primitive::<Int32Type>()
                .values()
                .to_vec()
        })
        .collect();
    assert_eq!(lengths, [1, 5 << 20]);
    cluster.shutdown().await;
}

/// Runs `sql` on the cluster in the background; returns its job's id once
/// it is planned, and the task that ends with its result and final status.
async fn run_in_background(
    context: &QuiverContext,
    sql: &'static str,
) -> (
    String,
    tokio::task::JoinHandle<(Vec<RecordBatch>, JobStatus)>,
) {
    let (planned, mut job_id) = tokio::sync::mpsc::unbounded_channel();
    let context = context.clone();
    let running = tokio::spawn(async move {
        let mut last = JobStatus::default();
        let stream = context
            .execute_sql(sql, |status| {
                let _ = planned.send(status.job_id.clone());
                last = status.clone();
            })
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let batches = datafusion::physical_plan::common::collect(stream)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        (batches, last)
    });
    let job_id = job_id.recv().await.expect("the job was planned");
    (job_id, running)
}

/// A query or a write planned before another engine replaced the files of
/// a table it reads is planned again when its scan finds a file gone, and
/// reads the table as it is now: the query answers from the new files, the
/// write commits the new rows once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_that_lose_their_files_to_a_write_run_again_from_a_new_plan() {
    let options = StandaloneOptions {
        max_running_jobs: 1,
        ..StandaloneOptions::default()
    };
    let cluster = StandaloneCluster::start(options).await.expect("start");
    let context = cluster.connect(2).await.expect("connect");
    let source = tempfile::tempdir().expect("temp dir");
    let target = tempfile::tempdir().expect("temp dir");
    let write_file = |name: &str, rows: i64| {
        let file = source.path().join(name);
        async move {
            SessionContext::new()
                .sql(&format!(
                    "COPY (SELECT value AS x FROM range(1, {})) TO '{}'",
                    rows + 1,
                    file.display()
                ))
                .await
                .expect("copy")
                .collect()
                .await
                .expect("written");
            file
        }
    };
    let old_file = write_file("old.parquet", 1000).await;
    for ddl in [
        format!(
            "CREATE EXTERNAL TABLE src STORED AS PARQUET LOCATION '{}/'",
            source.path().display()
        ),
        format!(
            "CREATE EXTERNAL TABLE dst (x BIGINT) STORED AS PARQUET LOCATION '{}/'",
            target.path().display()
        ),
    ] {
        query(&context, &ddl).await;
    }

    // Both jobs are planned while the cluster is busy, and wait.
    let endless = context.submit_sql(ENDLESS_QUERY).await.expect("submit");
    wait_for_state(&context, &endless.job_id, JobState::Running).await;
    let (reader_id, reader) = run_in_background(&context, "SELECT count(*), sum(x) FROM src").await;
    let (writer_id, writer) =
        run_in_background(&context, "INSERT INTO dst SELECT x FROM src").await;
    wait_for_state(&context, &writer_id, JobState::Queued).await;
    // Another engine rewrites the table meanwhile.
    write_file("new.parquet", 2000).await;
    std::fs::remove_file(&old_file).expect("remove the old file");
    assert_eq!(
        context.cancel_job(&endless.job_id).await.expect("cancel"),
        CancelOutcome::Cancelled
    );

    let new_totals = (2000, (1..=2000).sum::<i64>());
    let (batches, status) = reader.await.expect("reader");
    assert_eq!(
        (int64s(&batches, 0)[0], int64s(&batches, 1)[0]),
        new_totals,
        "{reader_id}"
    );
    assert_eq!(status.replans, 1, "{status:?}");
    let (_, status) = writer.await.expect("writer");
    assert_eq!(status.state(), JobState::Succeeded);
    assert_eq!(status.replans, 1, "{status:?}");
    let written = query(&context, "SELECT count(*), sum(x) FROM dst").await;
    assert_eq!(
        (int64s(&written, 0)[0], int64s(&written, 1)[0]),
        new_totals,
        "the new rows, once"
    );
    let left: Vec<String> = std::fs::read_dir(target.path())
        .expect("target")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.starts_with("_temporary"))
        .collect();
    assert!(left.is_empty(), "staging left behind: {left:?}");
    cluster.shutdown().await;
}

/// A write planned while another write to its table runs waits for it, and
/// must not then replace rows it never read: a second `CREATE TABLE AS` of
/// one name, or an overwrite computed from the table, fails instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_planned_before_another_commits_does_not_replace_its_rows() {
    let (cluster, context) = cluster().await;
    const ROWS: i64 = 3_000_000;
    let first = tokio::spawn({
        let context = context.clone();
        async move {
            query(
                &context,
                &format!("CREATE TABLE raced AS SELECT value AS id FROM range({ROWS})"),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let error = failure(&context, "CREATE TABLE raced AS SELECT 1 AS id").await;
    first.await.expect("the first CREATE TABLE AS");
    // Refused when planned (the first had registered the table, or has yet
    // to, and holds its name) or when committed (planned before the first
    // stored its name): never written over the first's rows.
    assert!(
        error.contains("already exists")
            || error.contains("is being created by the CREATE TABLE AS job")
            || error.contains("changed while this statement waited"),
        "{error}"
    );
    assert_eq!(count(&context, "SELECT count(*) FROM raced").await, ROWS);

    // An overwrite computed from the table, queued behind an append.
    let append = tokio::spawn({
        let context = context.clone();
        async move {
            query(
                &context,
                &format!("INSERT INTO raced SELECT value FROM range({ROWS})"),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let compacted = match context
        .sql("INSERT OVERWRITE raced SELECT id FROM raced WHERE id < 10")
        .await
    {
        Ok(frame) => frame.collect().await.map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    append.await.expect("the append");
    let total = count(&context, "SELECT count(*) FROM raced").await;
    match compacted {
        // It ran after the append had committed: it saw the appended rows.
        Ok(_) => assert_eq!(total, 20),
        Err(error) => {
            let error = error.to_string();
            assert!(
                error.contains("changed while this statement waited"),
                "{error}"
            );
            assert_eq!(total, 2 * ROWS, "the appended rows are kept");
        }
    }
    cluster.shutdown().await;
}

/// Writes whose files readers would miss, or that would touch files outside
/// their table, are refused, and every partition folder is read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_keep_every_row_readable() {
    let (cluster, context) = cluster().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();

    // Partition names and values as Spark writes them: a non-ASCII name and
    // value kept as they are, a ':' escaped.
    query(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE spelled (id BIGINT, ü VARCHAR) STORED AS PARQUET \
             PARTITIONED BY (ü) LOCATION '{}/spelled/'",
            root.display()
        ),
    )
    .await;
    query(
        &context,
        "INSERT INTO spelled VALUES (1, 'ünï'), (2, 'a:b'), (3, 'plain')",
    )
    .await;
    assert!(root.join("spelled/ü=ünï").is_dir());
    assert!(root.join("spelled/ü=a%3Ab").is_dir());
    assert_eq!(count(&context, "SELECT count(*) FROM spelled").await, 3);
    for value in ["ünï", "a:b", "plain"] {
        let sql = format!("SELECT count(*) FROM spelled WHERE ü = '{value}'");
        assert_eq!(count(&context, &sql).await, 1, "{sql}");
    }
    // A folder another writer spelled otherwise is read, filtered and
    // replaced by an overwrite of the same value.
    std::fs::create_dir_all(root.join("spelled/ü=x%2Dy")).expect("folder");
    std::fs::copy(
        std::fs::read_dir(root.join("spelled/ü=plain"))
            .expect("folder")
            .next()
            .expect("a file")
            .expect("entry")
            .path(),
        root.join("spelled/ü=x%2Dy/part-0.parquet"),
    )
    .expect("copy");
    assert_eq!(
        count(&context, "SELECT count(*) FROM spelled WHERE ü = 'x-y'").await,
        1
    );
    query(&context, "INSERT OVERWRITE spelled VALUES (4, 'x-y')").await;
    assert_eq!(
        int64s(
            &query(&context, "SELECT id FROM spelled WHERE ü = 'x-y'").await,
            0
        ),
        vec![4]
    );
    assert_eq!(count(&context, "SELECT count(*) FROM spelled").await, 4);

    // A binary value that is not text fails the write, and leaves nothing.
    let error = failure(
        &context,
        &format!(
            "COPY (SELECT * FROM (VALUES (1, X'FF00')) t(id, p)) TO '{}/binary/' \
             STORED AS PARQUET PARTITIONED BY (p)",
            root.display()
        ),
    )
    .await;
    assert!(error.contains("partition column 'p'"), "{error}");
    assert!(!root.join("binary/p=__HIVE_DEFAULT_PARTITION__").exists());

    // A glob table reads the files it matches and is never written to.
    // Hive names its files without an extension.
    query(
        &context,
        &format!("COPY (SELECT 7 AS a) TO '{}/one.parquet'", root.display()),
    )
    .await;
    std::fs::create_dir_all(root.join("hive")).expect("folder");
    std::fs::rename(root.join("one.parquet"), root.join("hive/000000_0")).expect("move");
    std::fs::write(root.join("hive/notes.txt"), "keep me").expect("notes");
    query(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE globbed STORED AS PARQUET LOCATION '{}/hive/0*'",
            root.display()
        ),
    )
    .await;
    assert_eq!(count(&context, "SELECT a FROM globbed").await, 7);
    for write in [
        "INSERT INTO globbed VALUES (8)",
        "INSERT OVERWRITE globbed VALUES (8)",
    ] {
        let error = failure(&context, write).await;
        assert!(error.contains("glob"), "{write}: {error}");
    }
    assert!(root.join("hive/notes.txt").exists());
    assert_eq!(count(&context, "SELECT a FROM globbed").await, 7);

    // An overwrite of a table on two folders would replace only the first.
    for folder in ["one", "two"] {
        query(
            &context,
            &format!(
                "COPY (SELECT 1 AS a) TO '{}/{folder}/' STORED AS PARQUET",
                root.display()
            ),
        )
        .await;
    }
    query(
        &context,
        &format!(
            "CREATE EXTERNAL TABLE both_folders STORED AS PARQUET \
             LOCATION ('{0}/one/', '{0}/two/')",
            root.display()
        ),
    )
    .await;
    let error = failure(&context, "INSERT OVERWRITE both_folders VALUES (2)").await;
    assert!(error.contains("one folder"), "{error}");
    assert_eq!(
        count(&context, "SELECT count(*) FROM both_folders WHERE a = 1").await,
        2
    );

    // A table name cannot lead its folder out of the warehouse.
    for name in ["\"../victim\"", "\"a/b\""] {
        let error = failure(&context, &format!("CREATE TABLE {name} AS SELECT 1 AS a")).await;
        assert!(error.contains("warehouse folder"), "{name}: {error}");
    }

    // An empty result still makes a table, with its columns.
    query(&context, "CREATE TABLE kept AS SELECT 1 AS a").await;
    query(
        &context,
        "CREATE OR REPLACE TABLE kept AS SELECT 2 AS a WHERE false",
    )
    .await;
    assert_eq!(count(&context, "SELECT count(*) FROM kept").await, 0);
    query(&context, "INSERT INTO kept VALUES (3)").await;
    assert_eq!(count(&context, "SELECT sum(a) FROM kept").await, 3);
    query(
        &context,
        "INSERT OVERWRITE kept SELECT a FROM kept WHERE a > 5",
    )
    .await;
    assert_eq!(count(&context, "SELECT count(*) FROM kept").await, 0);
    cluster.shutdown().await;
}
