//! The chaos suite: TPC-H queries on a cluster of real processes while
//! executors are killed, paused or drained, jobs are cancelled or time out, and
//! the scheduler restarts. Every result that completes must equal single-node
//! DataFusion's, and nothing may hang: each scenario has a time bound.
//!
//! A fault is injected when the job's status first shows the phase it targets:
//! the map phase (no stage done yet), shuffle reads (a stage reading another's
//! output is running) or the final stage. Status updates can skip a phase on a
//! fast job, so a scenario is repeated until its fault has landed.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::UInt64Type;
use common::processes::{ClusterArgs, ProcessCluster, send_signal};
use quiver_benchmarks::queries::query;
use quiver_benchmarks::runner::Engine;
use quiver_benchmarks::verify::compare;
use quiver_client::QuiverContext;
use quiver_client::job::CancelOutcome;
use quiver_proto::{JobState, JobStatus};

const EXECUTORS: usize = 3;
/// Multi-stage queries: joins across several shuffles, aggregates and sorts.
const QUERIES: [usize; 3] = [3, 9, 18];
/// Bound of one query under faults, recovery included.
const QUERY_TIMEOUT: Duration = Duration::from_secs(90);
/// Attempts at landing a fault in the phase a scenario targets.
const INJECTION_ATTEMPTS: usize = 5;
/// Runs of `cancel_while_committing` until its pause lands in a commit.
const COMMIT_PAUSE_ATTEMPTS: usize = 12;
/// A query that runs for hours: an aggregate over a trillion generated rows.
/// (Not a nested-loop join: DataFusion's computes for seconds without yielding
/// when its filter matches nothing, so cancelling it takes that long to land.)
const LONG_QUERY: &str = "SELECT count(*), sum(value % 7) FROM range(1, 1000000000000)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Map,
    ShuffleRead,
    FinalStage,
}

impl Phase {
    fn reached(self, status: &JobStatus) -> bool {
        let running = status.state() == JobState::Running;
        match self {
            Phase::Map => running && status.stages_done == 0 && status.tasks_running > 0,
            Phase::ShuffleRead => {
                running && status.stages_done >= 1 && status.stages_done + 1 < status.stages_total
            }
            Phase::FinalStage => running && status.stages_done + 1 == status.stages_total,
        }
    }
}

/// Runs `sql`, calling `fault` once when `phase` is reached. Returns the result
/// and whether the fault was injected.
async fn run_with_fault(
    context: &QuiverContext,
    sql: &str,
    phase: Phase,
    fault: impl FnOnce() + Send,
) -> (Result<Vec<RecordBatch>, String>, bool) {
    let injected = Arc::new(AtomicBool::new(false));
    let fault = Mutex::new(Some(fault));
    let seen = Arc::clone(&injected);
    let progress = move |status: &JobStatus| {
        if phase.reached(status)
            && let Some(fault) = fault.lock().expect("fault lock").take()
        {
            fault();
            seen.store(true, Ordering::SeqCst);
        }
    };
    let run = async {
        let stream = context
            .execute_sql(sql, progress)
            .await
            .map_err(|e| e.to_string())?;
        datafusion::physical_plan::common::collect(stream)
            .await
            .map_err(|e| e.to_string())
    };
    let result = tokio::time::timeout(QUERY_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {QUERY_TIMEOUT:?}: the job hung")));
    (result, injected.load(Ordering::SeqCst))
}

async fn register_tables(context: &QuiverContext, tables: &[(String, std::path::PathBuf)]) {
    for (name, dir) in tables {
        let sql = format!(
            "CREATE EXTERNAL TABLE IF NOT EXISTS {name} STORED AS PARQUET LOCATION '{}/'",
            dir.display()
        );
        context
            .execute_sql(&sql, |_| {})
            .await
            .unwrap_or_else(|e| panic!("register {name}: {e}"));
    }
}

struct Suite {
    cluster: ProcessCluster,
    context: QuiverContext,
    reference: Engine,
    passed: Vec<String>,
    failures: Vec<String>,
    /// Names the session setting under test in scenario names, if any.
    variant: String,
}

impl Suite {
    async fn expected(&self, number: usize) -> Vec<RecordBatch> {
        let sql = query(number).expect("query exists");
        self.reference.run(sql).await.expect("datafusion runs it")
    }

    fn check(
        &mut self,
        scenario: String,
        result: Result<Vec<RecordBatch>, String>,
        expected: &[RecordBatch],
    ) {
        match result.and_then(|actual| compare(expected, &actual)) {
            Ok(()) => self.passed.push(scenario),
            Err(e) => self.failures.push(format!("{scenario}: {e}")),
        }
    }

    /// Runs `number`, sending `signal` to executor `victim` when `phase` is
    /// reached, until the signal lands; then checks the answer.
    async fn signal_in_phase(
        &mut self,
        number: usize,
        phase: Phase,
        victim: usize,
        signal: &'static str,
    ) {
        let expected = self.expected(number).await;
        let sql = query(number).expect("query exists");
        for _ in 0..INJECTION_ATTEMPTS {
            let pid = self.cluster.executor_pid(victim).expect("victim runs");
            let (result, injected) =
                run_with_fault(&self.context, sql, phase, move || send_signal(pid, signal)).await;
            if !injected {
                continue;
            }
            let scenario = format!(
                "Q{number}{}: SIG{signal} executor-{victim} in {phase:?}",
                self.variant
            );
            self.check(scenario, result, &expected);
            return;
        }
        self.failures.push(format!(
            "Q{number}: could not land SIG{signal} in {phase:?} in {INJECTION_ATTEMPTS} runs"
        ));
    }

    /// Replaces a killed executor and waits until the cluster is whole again.
    /// Sets this session's durable shuffle location to a new folder, `name`
    /// in the cluster's work folder, and returns that folder.
    async fn use_durable_shuffle(&self, name: &str) -> std::path::PathBuf {
        let folder = self.cluster.work_dir().join(name);
        self.context
            .sql(&format!(
                "SET quiver.shuffle_location = 'file://{}'",
                folder.display()
            ))
            .await
            .expect("set shuffle location");
        folder
    }

    async fn replace_executor(&mut self, index: usize) {
        self.cluster.kill_executor(index);
        self.cluster.start_executor(index);
        self.context = self.cluster.connect(EXECUTORS).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_suite() {
    let tables = common::tpch_tables();
    let args = ClusterArgs {
        scheduler: [
            "--executor-timeout-ms",
            "3000",
            "--heartbeat-interval-ms",
            "300",
        ]
        .map(String::from)
        .to_vec(),
        executor: ["--drain-grace-secs", "30"].map(String::from).to_vec(),
        ..ClusterArgs::default()
    };
    let cluster = ProcessCluster::start(EXECUTORS, args);
    let context = cluster.connect(EXECUTORS).await;
    register_tables(&context, &tables).await;
    let mut suite = Suite {
        cluster,
        context,
        reference: common::reference_engine(&tables, 4).await,
        passed: Vec::new(),
        failures: Vec::new(),
        variant: String::new(),
    };
    let started = Instant::now();

    // Executors killed with SIGKILL in each phase.
    let mut victim = 0;
    for number in QUERIES {
        for phase in [Phase::Map, Phase::ShuffleRead, Phase::FinalStage] {
            suite.signal_in_phase(number, phase, victim, "KILL").await;
            suite.replace_executor(victim).await;
            victim = (victim + 1) % EXECUTORS;
        }
    }

    // An executor that hangs: paused, it misses its heartbeats, and readers'
    // fetches from it time out. Resumed, it registers again by itself.
    suite
        .signal_in_phase(9, Phase::ShuffleRead, 1, "STOP")
        .await;
    suite.cluster.signal_executor(1, "CONT");
    suite.context = suite.cluster.connect(EXECUTORS).await;

    // A graceful drain in the map phase: the job is not disturbed and the
    // executor exits 0 once no running job needs it.
    suite.signal_in_phase(18, Phase::Map, 2, "TERM").await;
    match suite.cluster.wait_executor(2, Duration::from_secs(40)) {
        Some(status) if status.success() => suite.passed.push("drained executor exited 0".into()),
        other => suite.failures.push(format!(
            "drained executor did not exit 0 in time: {other:?}"
        )),
    }
    suite.cluster.start_executor(2);
    suite.context = suite.cluster.connect(EXECUTORS).await;

    writes_under_faults(&mut suite).await;
    overwrite_lost_after_its_manifest(&mut suite, FileLists::Inline).await;
    overwrite_lost_after_its_manifest(&mut suite, FileLists::InStagingFolder).await;
    durable_shuffle(&mut suite).await;
    scale_to_zero(&mut suite).await;
    cancel_and_timeout(&mut suite).await;
    cancel_while_committing(&mut suite).await;
    scheduler_restart(&mut suite).await;
    scheduler_stopped(&mut suite).await;

    eprintln!(
        "chaos suite: {} scenarios passed in {:.1} s:\n  {}",
        suite.passed.len(),
        started.elapsed().as_secs_f64(),
        suite.passed.join("\n  ")
    );
    assert!(
        suite.failures.is_empty(),
        "{}\n{}",
        suite.failures.join("\n"),
        suite.cluster.logs()
    );
}

/// With durable shuffle, map outputs outlive their executor: one killed while
/// readers run costs no recompute, and the job's copies go when it ends.
async fn durable_shuffle(suite: &mut Suite) {
    let folder = suite.use_durable_shuffle("durable-shuffle").await;
    suite.variant = " with durable shuffle".into();
    suite
        .signal_in_phase(9, Phase::ShuffleRead, 0, "KILL")
        .await;
    suite.variant.clear();
    // A new connection: the setting goes with the old session.
    suite.replace_executor(0).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<_> = std::fs::read_dir(&folder)
            .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        if left.is_empty() {
            suite
                .passed
                .push("durable shuffle: no copies left after the job".into());
            break;
        }
        if Instant::now() > deadline {
            suite
                .failures
                .push(format!("durable shuffle copies left behind: {left:?}"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With durable shuffle, the executors can scale to zero between stages.
/// Every executor is drained in the map phase: it finishes its running tasks
/// and exits, because their outputs live on the store and no job needs it.
/// The job waits with no executor at all; new executors finish it, and no
/// stage runs more tasks than it does undisturbed (no output is recomputed).
async fn scale_to_zero(suite: &mut Suite) {
    const NUMBER: usize = 9;
    const DRAIN_BOUND: Duration = Duration::from_secs(40);
    let scenario = format!("Q{NUMBER}: every executor drained in the map phase, new ones started");
    suite.use_durable_shuffle("scale-to-zero").await;
    let sql = query(NUMBER).expect("query exists");
    let expected = suite.expected(NUMBER).await;
    let undisturbed = match final_status(&suite.context, sql).await {
        Ok(status) => tasks_per_stage(&status),
        Err(e) => {
            suite
                .failures
                .push(format!("{scenario}: undisturbed run: {e}"));
            return;
        }
    };
    for _ in 0..INJECTION_ATTEMPTS {
        let pids: Vec<u32> = (0..EXECUTORS)
            .map(|index| suite.cluster.executor_pid(index).expect("executor runs"))
            .collect();
        let drained = Arc::new(AtomicBool::new(false));
        let latest = Arc::new(Mutex::new(JobStatus::default()));
        let progress = {
            let (drained, latest) = (Arc::clone(&drained), Arc::clone(&latest));
            move |status: &JobStatus| {
                if Phase::Map.reached(status) && !drained.swap(true, Ordering::SeqCst) {
                    for pid in &pids {
                        send_signal(*pid, "TERM");
                    }
                }
                *latest.lock().expect("status lock") = status.clone();
            }
        };
        let query_ended = AtomicBool::new(false);
        let (context, cluster) = (&suite.context, &mut suite.cluster);
        let run = async {
            let result = tokio::time::timeout(QUERY_TIMEOUT, async {
                let stream = context.execute_sql(sql, progress).await?;
                datafusion::physical_plan::common::collect(stream)
                    .await
                    .map_err(quiver_client::Error::from)
            })
            .await;
            query_ended.store(true, Ordering::SeqCst);
            match result {
                Ok(batches) => batches.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {QUERY_TIMEOUT:?}: the job hung")),
            }
        };
        // Once every executor has gone, the job must be waiting for new ones.
        let restart = async {
            while !drained.load(Ordering::SeqCst) {
                if query_ended.load(Ordering::SeqCst) {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let deadline = Instant::now() + DRAIN_BOUND;
            let mut running: BTreeSet<usize> = (0..EXECUTORS).collect();
            while !running.is_empty() {
                if Instant::now() > deadline {
                    return Err(format!(
                        "executors {running:?} still ran {DRAIN_BOUND:?} after SIGTERM"
                    ));
                }
                for index in running.clone() {
                    if let Some(status) = cluster.executor_exited(index) {
                        if !status.success() {
                            return Err(format!("drained executor-{index} exited with {status}"));
                        }
                        running.remove(&index);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let waiting = latest.lock().expect("status lock").state() == JobState::Running;
            for index in 0..EXECUTORS {
                cluster.start_executor(index);
            }
            if waiting {
                Ok(())
            } else {
                Err("the job did not wait for executors while there were none".to_owned())
            }
        };
        let (result, restarted) = tokio::join!(run, restart);
        if !drained.load(Ordering::SeqCst) {
            continue;
        }
        suite.context = suite.cluster.connect(EXECUTORS).await;
        let tasks = tasks_per_stage(&latest.lock().expect("status lock"));
        let outcome = restarted
            .and(result)
            .and_then(|actual| compare(&expected, &actual))
            .and_then(|()| {
                if tasks == undisturbed {
                    Ok(())
                } else {
                    Err(format!(
                        "tasks per stage {tasks:?}, {undisturbed:?} undisturbed: outputs were recomputed"
                    ))
                }
            });
        match outcome {
            Ok(()) => suite.passed.push(scenario),
            Err(e) => suite.failures.push(format!("{scenario}: {e}")),
        }
        return;
    }
    suite.context = suite.cluster.connect(EXECUTORS).await;
    suite.failures.push(format!(
        "{scenario}: could not drain in the map phase in {INJECTION_ATTEMPTS} runs"
    ));
}

/// The final status of `sql`, run to its end.
async fn final_status(context: &QuiverContext, sql: &str) -> Result<JobStatus, String> {
    let latest = Arc::new(Mutex::new(JobStatus::default()));
    let seen = Arc::clone(&latest);
    let stream = context
        .execute_sql(sql, move |status| {
            *seen.lock().expect("status lock") = status.clone();
        })
        .await
        .map_err(|e| e.to_string())?;
    datafusion::physical_plan::common::collect(stream)
        .await
        .map_err(|e| e.to_string())?;
    Ok(latest.lock().expect("status lock").clone())
}

/// Each stage's successful task attempts: a recomputed output counts again.
fn tasks_per_stage(status: &JobStatus) -> Vec<(u32, u32)> {
    status
        .stages
        .iter()
        .map(|stage| (stage.stage_id, stage.tasks))
        .collect()
}

/// A distributed write survives an executor killed while the write tasks run
/// and while the commit runs: the output then holds every row exactly once,
/// in the files its manifest names and no others.
async fn writes_under_faults(suite: &mut Suite) {
    let root = suite.cluster.work_dir().join("writes");
    let context = suite.context.clone();
    // Small files: more of them, so the kill lands among rolling writes.
    context
        .sql("SET quiver.target_file_bytes = 131072")
        .await
        .expect("set target file size");
    let totals = "SELECT count(*) AS n, sum(l_quantity) AS q FROM {table}";
    let expected = suite
        .reference
        .run(&totals.replace("{table}", "lineitem"))
        .await
        .expect("datafusion runs it");
    let expected_rows = expected[0]
        .column(0)
        .as_primitive::<arrow::datatypes::Int64Type>()
        .value(0) as u64;
    let mut victim = 1;
    for (index, phase) in [Phase::Map, Phase::FinalStage].into_iter().enumerate() {
        let target = root.join(format!("kill-{index}"));
        let sql = copy_lineitem_to(&target);
        let scenario = format!("COPY: SIGKILL executor-{victim} in {phase:?}");
        let mut landed = false;
        for _ in 0..INJECTION_ATTEMPTS {
            let _ = std::fs::remove_dir_all(&target);
            let pid = suite.cluster.executor_pid(victim).expect("victim runs");
            let (result, injected) =
                run_with_fault(&context, &sql, phase, move || send_signal(pid, "KILL")).await;
            if !injected {
                continue;
            }
            landed = true;
            let written = result.map(|batches| {
                batches
                    .iter()
                    .map(|b| b.column(0).as_primitive::<UInt64Type>().value(0))
                    .sum::<u64>()
            });
            match written.and_then(|rows| committed_exactly_once(&target, rows, expected_rows)) {
                Ok(files) => suite
                    .passed
                    .push(format!("{scenario}: {files} files, rows once")),
                Err(e) => suite.failures.push(format!("{scenario}: {e}")),
            }
            break;
        }
        if !landed {
            suite.failures.push(format!(
                "{scenario}: could not land the kill in {INJECTION_ATTEMPTS} runs"
            ));
        }
        suite.replace_executor(victim).await;
        victim = (victim + 1) % EXECUTORS;
        // Read back through the cluster: the same totals as the source.
        let table = format!("written_{index}");
        let ddl = format!(
            "CREATE EXTERNAL TABLE {table} STORED AS PARQUET LOCATION '{}/'",
            target.display()
        );
        let read_back = async {
            suite.context.sql(&ddl).await.map_err(|e| e.to_string())?;
            let frame = suite
                .context
                .sql(&totals.replace("{table}", &table))
                .await
                .map_err(|e| e.to_string())?;
            frame.collect().await.map_err(|e| e.to_string())
        }
        .await;
        suite.check(format!("{scenario}: read back"), read_back, &expected);
    }
    write_with_paused_executor(suite, &root, expected_rows, victim).await;
    suite
        .context
        .sql("SET quiver.target_file_bytes = 268435456")
        .await
        .expect("reset target file size");
}

fn copy_lineitem_to(target: &std::path::Path) -> String {
    format!(
        "COPY (SELECT l_orderkey, l_quantity, l_returnflag FROM lineitem) TO '{}/' \
         STORED AS PARQUET PARTITIONED BY (l_returnflag)",
        target.display()
    )
}

/// An executor paused during the last stage of a write is declared lost and
/// its tasks (the commit, if it had it) run again elsewhere. Resumed after
/// the job committed, it must find its lease run out and stop its tasks
/// before they touch the output: the folder still holds every row once.
async fn write_with_paused_executor(
    suite: &mut Suite,
    root: &std::path::Path,
    expected_rows: u64,
    victim: usize,
) {
    /// Longer than the lease (3/4 of the 3 s executor timeout): however
    /// fast the job, the paused executor's lease runs out.
    const PAUSE: Duration = Duration::from_secs(4);
    const LEASE_RAN_OUT: &str = "no heartbeat was acknowledged in time";
    let target = root.join("paused");
    let sql = copy_lineitem_to(&target);
    let scenario = format!("COPY: SIGSTOP executor-{victim} in FinalStage, resumed after");
    for _ in 0..INJECTION_ATTEMPTS {
        let _ = std::fs::remove_dir_all(&target);
        let pid = suite.cluster.executor_pid(victim).expect("victim runs");
        let lease_ran_out_before = suite
            .cluster
            .executor_log(victim)
            .matches(LEASE_RAN_OUT)
            .count();
        let paused_at = Arc::new(Mutex::new(None::<Instant>));
        let pause = Arc::clone(&paused_at);
        // Set only if the pause landed.
        let (result, _) = run_with_fault(&suite.context, &sql, Phase::FinalStage, move || {
            send_signal(pid, "STOP");
            *pause.lock().expect("pause lock") = Some(Instant::now());
        })
        .await;
        let Some(paused_at) = *paused_at.lock().expect("pause lock") else {
            continue;
        };
        tokio::time::sleep(PAUSE.saturating_sub(paused_at.elapsed())).await;
        send_signal(pid, "CONT");
        // Back in the cluster: it has noticed its lease and registered again.
        suite.context = suite.cluster.connect(EXECUTORS).await;
        let outcome = result
            .map(|batches| {
                batches
                    .iter()
                    .map(|b| b.column(0).as_primitive::<UInt64Type>().value(0))
                    .sum::<u64>()
            })
            .and_then(|rows| committed_exactly_once(&target, rows, expected_rows))
            .and_then(|files| {
                let log = suite.cluster.executor_log(victim);
                if log.matches(LEASE_RAN_OUT).count() > lease_ran_out_before {
                    Ok(files)
                } else {
                    Err(format!(
                        "the resumed executor did not report its lease running out:\n{log}"
                    ))
                }
            });
        match outcome {
            Ok(files) => suite.passed.push(format!(
                "{scenario}: {files} files, rows once, lease ran out"
            )),
            Err(e) => suite.failures.push(format!("{scenario}: {e}")),
        }
        return;
    }
    suite.failures.push(format!(
        "{scenario}: could not land the pause in {INJECTION_ATTEMPTS} runs"
    ));
}

/// An `INSERT OVERWRITE` of a table from itself whose commit task is lost,
/// with every executor, once it wrote its manifest and began to delete the
/// files it replaces: the write has committed, and files it read are gone. The
/// retried commit must finish from its manifest rather than recompute the
/// write tasks, so the job succeeds and every row is changed exactly once.
async fn overwrite_lost_after_its_manifest(suite: &mut Suite, lists: FileLists) {
    const FINISHED_FROM_MANIFEST: &str = "an earlier attempt of its commit had committed";
    let scenario = match lists {
        FileLists::Inline => {
            "INSERT OVERWRITE from itself: SIGKILL every executor after its manifest"
        }
        FileLists::InStagingFolder => {
            "INSERT OVERWRITE from itself, file lists in the staging folder: SIGKILL every \
             executor after its manifest"
        }
    };
    for attempt in 0..INJECTION_ATTEMPTS {
        if lists == FileLists::InStagingFolder {
            // Each attempt connects anew, without the last session's settings.
            suite
                .context
                .sql("SET quiver.inline_file_list_max_bytes = 0")
                .await
                .expect("set the inline limit");
        }
        let name = format!("self_overwrite_{}_{attempt}", lists as u8);
        let target = suite.cluster.work_dir().join(&name);
        let table = name;
        // 100 partition folders: the overwrite has hundreds of files to
        // delete after its manifest, a window for the kill.
        let setup = [
            format!(
                "CREATE EXTERNAL TABLE {table} (k BIGINT, q BIGINT, bucket BIGINT) \
                 STORED AS PARQUET PARTITIONED BY (bucket) LOCATION '{}/'",
                target.display()
            ),
            format!(
                "INSERT INTO {table} SELECT l_orderkey, CAST(l_quantity AS BIGINT), \
                 l_orderkey % 100 FROM lineitem"
            ),
        ];
        for sql in &setup {
            suite.context.sql(sql).await.expect("set up the table");
        }
        let totals = format!("SELECT count(*), sum(q) FROM {table}");
        let (rows, sum_before) = totals_of(&suite.context, &totals).await;

        let manifests = target.join("_manifests");
        let before = manifests_in(&manifests);
        let pids: Vec<u32> = (0..EXECUTORS)
            .filter_map(|index| suite.cluster.executor_pid(index))
            .collect();
        let context = suite.context.clone();
        let overwrite = format!("INSERT OVERWRITE {table} SELECT k, q + 1, bucket FROM {table}");
        let job = tokio::spawn(async move {
            let stream = context
                .execute_sql(&overwrite, |_| {})
                .await
                .map_err(|e| e.to_string())?;
            datafusion::physical_plan::common::collect(stream)
                .await
                .map_err(|e| e.to_string())
        });
        let finished = job.abort_handle();
        let watched = manifests.clone();
        let count = before.len() + 1;
        let replaced = data_files_below(&target);
        let killed = tokio::task::spawn_blocking(move || {
            kill_once_replacing(&watched, count, &replaced, &pids, || finished.is_finished())
        })
        .await
        .expect("watcher");
        if killed {
            for index in 0..EXECUTORS {
                suite.cluster.kill_executor(index);
                suite.cluster.start_executor(index);
            }
        }
        let result = tokio::time::timeout(QUERY_TIMEOUT, job)
            .await
            .map_err(|_| format!("no answer within {QUERY_TIMEOUT:?}: the job hung"))
            .and_then(|joined| joined.map_err(|e| e.to_string())?);
        suite.context = suite.cluster.connect(EXECUTORS).await;
        let landed = killed
            && (0..EXECUTORS).any(|index| {
                suite
                    .cluster
                    .executor_log(index)
                    .contains(FINISHED_FROM_MANIFEST)
            });
        if !landed && result.is_ok() {
            continue;
        }
        let outcome = async {
            let reported: u64 = result?
                .iter()
                .map(|b| b.column(0).as_primitive::<UInt64Type>().value(0))
                .sum();
            let written: Vec<_> = manifests_in(&manifests)
                .difference(&before)
                .cloned()
                .collect();
            let [manifest] = written.as_slice() else {
                return Err(format!("expected one new manifest, found {written:?}"));
            };
            let files = files_named_by(&target, manifest, rows)?;
            let (rows_after, sum_after) = totals_of(&suite.context, &totals).await;
            if reported != rows || rows_after != rows || sum_after != sum_before + rows {
                return Err(format!(
                    "{rows} rows summing to {sum_before} became {rows_after} summing to \
                     {sum_after}, reported {reported}: each should have grown by one"
                ));
            }
            Ok(files)
        }
        .await;
        match outcome {
            Ok(files) => suite.passed.push(format!(
                "{scenario}: finished from the manifest, {files} files, rows changed once \
                 (kill landed on run {})",
                attempt + 1
            )),
            Err(e) => suite.failures.push(format!("{scenario}: {e}")),
        }
        return;
    }
    suite.failures.push(format!(
        "{scenario}: could not land the kill in {INJECTION_ATTEMPTS} runs"
    ));
}

/// Where the write tasks' file lists outlive their executors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileLists {
    /// With their task's status, in the scheduler.
    Inline,
    /// Copied into the table's staging folder (the inline limit set to 0),
    /// as lists too large to come back inline are.
    InStagingFolder,
}

/// Row count and sum of a `SELECT count(*), sum(..)`.
async fn totals_of(context: &QuiverContext, sql: &str) -> (u64, u64) {
    let batches = context
        .sql(sql)
        .await
        .expect("plan totals")
        .collect()
        .await
        .expect("run totals");
    let batch = &batches[0];
    let value = |column: usize| {
        batch
            .column(column)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0) as u64
    };
    (value(0), value(1))
}

/// Watches `manifests` until it holds `count` files and one of `replaced`
/// is gone, or `done` says the job ended, and then kills `pids` at once (one
/// `kill` for all, to be quick). Returns whether it killed them.
fn kill_once_replacing(
    manifests: &std::path::Path,
    count: usize,
    replaced: &[std::path::PathBuf],
    pids: &[u32],
    done: impl Fn() -> bool,
) -> bool {
    let deadline = Instant::now() + QUERY_TIMEOUT;
    while !done() && Instant::now() < deadline {
        if manifests_in(manifests).len() >= count && replaced.iter().any(|file| !file.exists()) {
            let status = std::process::Command::new("kill")
                .arg("-KILL")
                .args(pids.iter().map(u32::to_string))
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -KILL {pids:?} failed");
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// The data files below `table`: what is not in a `_` folder.
fn data_files_below(table: &std::path::Path) -> Vec<std::path::PathBuf> {
    files_below(table, true)
}

/// The files below `folder`, but for those below a `_` name when
/// `hide_underscored`.
fn files_below(folder: &std::path::Path, hide_underscored: bool) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![folder.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for path in std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
        {
            if hide_underscored
                && path
                    .file_name()
                    .is_some_and(|name| name.to_string_lossy().starts_with('_'))
            {
                continue;
            }
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// The manifests in the folder `manifests`.
fn manifests_in(manifests: &std::path::Path) -> BTreeSet<std::path::PathBuf> {
    std::fs::read_dir(manifests)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect()
}

/// Checks a written folder: the job reported `expected` rows, and the data
/// files are exactly those its manifest names, holding that many rows.
fn committed_exactly_once(
    target: &std::path::Path,
    reported: u64,
    expected: u64,
) -> Result<usize, String> {
    if reported != expected {
        return Err(format!("the job reported {reported} rows, not {expected}"));
    }
    let manifests: Vec<_> = std::fs::read_dir(target.join("_manifests"))
        .map_err(|e| format!("no manifests: {e}"))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    let [manifest] = manifests.as_slice() else {
        return Err(format!("expected one manifest, found {manifests:?}"));
    };
    files_named_by(target, manifest, expected)
}

/// Checks that the data files below `target` are exactly those `manifest`
/// names, and that it counts `expected` rows; returns how many there are.
fn files_named_by(
    target: &std::path::Path,
    manifest: &std::path::Path,
    expected: u64,
) -> Result<usize, String> {
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(manifest).map_err(|e| format!("read manifest: {e}"))?,
    )
    .map_err(|e| format!("manifest is not JSON: {e}"))?;
    let listed: BTreeSet<String> = manifest["files"]
        .as_array()
        .ok_or("manifest lists no files")?
        .iter()
        .filter_map(|file| file["path"].as_str().map(str::to_owned))
        .collect();
    let mut stored = BTreeSet::new();
    let mut pending = vec![target.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| e.to_string())? {
            let path = entry.map_err(|e| e.to_string())?.path();
            let relative = path
                .strip_prefix(target)
                .map_err(|e| e.to_string())?
                .to_string_lossy()
                .into_owned();
            if relative.starts_with("_manifests") {
                continue;
            }
            if relative.starts_with("_temporary") {
                return Err(format!("staged files left behind: {relative}"));
            }
            if path.is_dir() {
                pending.push(path);
            } else {
                stored.insert(relative);
            }
        }
    }
    if listed != stored {
        return Err(format!(
            "the data files differ from the manifest: stored {stored:?}, listed {listed:?}"
        ));
    }
    if manifest["rows"].as_u64() != Some(expected) {
        return Err(format!("the manifest counts {} rows", manifest["rows"]));
    }
    Ok(stored.len())
}

/// A cancel that comes once a write's commit was allowed to change its
/// table waits for that commit, so that the job is never reported cancelled
/// with its rows committed. Every executor is paused as soon as the job says
/// it commits, then the job is cancelled:
/// - resumed at once, the commit finishes: the job succeeds, every row once;
/// - resumed only after their leases ran out, the executors were lost with
///   the commit. Once the lost commit can no longer act, the scheduler
///   settles the write: it finds the manifest if the pause came after it,
///   and the job succeeds with every row once; otherwise the write is
///   rolled back and the job ends cancelled;
/// - resumed only once the job has ended: the same, with no executor left
///   to run anything meanwhile (the job used to wait for one for ever).
///
/// A run whose commit reported before the cancel came is run again, up to
/// [`COMMIT_PAUSE_ATTEMPTS`] times: on a loaded machine the pause can land
/// late.
async fn cancel_while_committing(suite: &mut Suite) {
    suite
        .context
        .sql("SET quiver.target_file_bytes = 32768")
        .await
        .expect("small files: a longer commit");
    let (expected_rows, _) = totals_of(&suite.context, "SELECT count(*), 0 FROM lineitem").await;
    for (pause, lost) in [
        (Some(Duration::from_millis(500)), false),
        // Longer than the 3 s executor timeout.
        (Some(Duration::from_secs(4)), true),
        // Until the job has ended.
        (None, true),
    ] {
        let scenario = match pause {
            None => "COPY: cancelled while committing, executors lost until the job ended",
            Some(_) if lost => "COPY: cancelled while committing, executors lost",
            Some(_) => "COPY: cancelled while committing",
        };
        let mut landed = false;
        for attempt in 0..COMMIT_PAUSE_ATTEMPTS {
            let target = suite.cluster.work_dir().join(format!(
                "cancel-commit-{}-{}-{attempt}",
                u8::from(lost),
                u8::from(pause.is_none())
            ));
            let pids: Vec<u32> = (0..EXECUTORS)
                .filter_map(|index| suite.cluster.executor_pid(index))
                .collect();
            let (paused, job_id) = tokio::sync::oneshot::channel::<String>();
            let paused = Mutex::new(Some(paused));
            let stop = pids.clone();
            let context = suite.context.clone();
            let sql = copy_lineitem_to(&target);
            let job = tokio::spawn(async move {
                let progress = move |status: &JobStatus| {
                    if status.committing
                        && let Some(paused) = paused.lock().expect("pause lock").take()
                    {
                        for pid in &stop {
                            send_signal(*pid, "STOP");
                        }
                        let _ = paused.send(status.job_id.clone());
                    }
                };
                let stream = context
                    .execute_sql(&sql, progress)
                    .await
                    .map_err(|e| e.to_string())?;
                datafusion::physical_plan::common::collect(stream)
                    .await
                    .map_err(|e| e.to_string())
            });
            let Ok(Ok(job_id)) = tokio::time::timeout(QUERY_TIMEOUT, job_id).await else {
                let _ = job.await;
                continue;
            };
            let cancelled = suite.context.cancel_job(&job_id).await;
            tokio::time::sleep(pause.unwrap_or(Duration::from_millis(500))).await;
            let while_paused = suite.context.job_status(&job_id).await;
            if pause.is_some() {
                for pid in &pids {
                    send_signal(*pid, "CONT");
                }
            }
            let result = tokio::time::timeout(QUERY_TIMEOUT, job)
                .await
                .map_err(|_| "the job hung".to_owned())
                .and_then(|joined| joined.map_err(|e| e.to_string()))
                .and_then(|result| result);
            if pause.is_none() {
                for pid in &pids {
                    send_signal(*pid, "CONT");
                }
            }
            if lost {
                // Back in the cluster: they noticed their leases and registered again.
                suite.context = suite.cluster.connect(EXECUTORS).await;
            }
            if !matches!(cancelled, Ok(CancelOutcome::Committing)) {
                continue;
            }
            landed = true;
            let still_running = match &while_paused {
                Ok(status) if status.state() == JobState::Running && status.committing => Ok(()),
                other => Err(format!("while paused, the job was {other:?}")),
            };
            // Lost, the scheduler finds the commit's manifest if the pause
            // came after it (the job succeeds), or rolls it back (cancelled).
            let outcome = still_running.and_then(|()| match &result {
                Ok(batches) => {
                    let rows = batches
                        .iter()
                        .map(|b| b.column(0).as_primitive::<UInt64Type>().value(0))
                        .sum::<u64>();
                    committed_exactly_once(&target, rows, expected_rows)
                        .map(|_| "succeeded, every row once")
                }
                Err(message) if lost && message.contains("cancelled") => {
                    rolled_back(&target, Duration::from_secs(30)).map(|()| "cancelled, rolled back")
                }
                Err(message) => Err(format!("the job failed: {message}")),
            });
            match outcome {
                Ok(ending) => suite.passed.push(format!("{scenario}: {ending}")),
                Err(e) => suite.failures.push(format!("{scenario}: {e}")),
            }
            break;
        }
        if !landed {
            suite.failures.push(format!(
                "{scenario}: could not pause the commit in {COMMIT_PAUSE_ATTEMPTS} runs"
            ));
        }
    }
    suite
        .context
        .sql("SET quiver.target_file_bytes = 268435456")
        .await
        .expect("reset target file size");
}

/// Waits up to `wait` for a write into `target` to be rolled back: no data
/// file and no manifest left.
fn rolled_back(target: &std::path::Path, wait: Duration) -> Result<(), String> {
    let deadline = Instant::now() + wait;
    loop {
        let files = data_files_below(target);
        let manifests = std::fs::read_dir(target.join("_manifests"))
            .map(|entries| entries.count())
            .unwrap_or(0);
        if files.is_empty() && manifests == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not rolled back: {} data files, {manifests} manifests",
                files.len()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A cancelled job and a timed-out job stop their tasks and free their data,
/// and the cluster then runs the next job normally.
async fn cancel_and_timeout(suite: &mut Suite) {
    let context = suite.context.clone();
    let cancel_context = context.clone();
    let job_id = Arc::new(Mutex::new(None::<String>));
    let seen_id = Arc::clone(&job_id);
    let long = tokio::spawn(async move {
        let stream = cancel_context
            .execute_sql(LONG_QUERY, move |status| {
                if status.tasks_running > 0 {
                    seen_id
                        .lock()
                        .expect("id lock")
                        .get_or_insert_with(|| status.job_id.clone());
                }
            })
            .await;
        stream.map(|_| ()).map_err(|e| e.to_string())
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        if let Some(id) = job_id.lock().expect("id lock").clone() {
            break id;
        }
        assert!(Instant::now() < deadline, "the long job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cancelled = context.cancel_job(&id).await.expect("cancel call");
    match tokio::time::timeout(Duration::from_secs(10), long).await {
        Ok(Ok(Err(message)))
            if cancelled == CancelOutcome::Cancelled && message.contains("cancelled") =>
        {
            suite.passed.push("cancel mid-way".into());
        }
        other => suite.failures.push(format!(
            "cancel did not end the job: {cancelled:?} {other:?}"
        )),
    }
    suite.check_no_job_data(&id, "cancel").await;

    context
        .sql("SET quiver.job_timeout_secs = 1")
        .await
        .expect("set timeout");
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        let stream = context.execute_sql(LONG_QUERY, |_| {}).await?;
        datafusion::physical_plan::common::collect(stream).await?;
        Ok::<_, quiver_client::Error>(())
    })
    .await;
    match outcome {
        Ok(Err(e)) if e.to_string().contains("timed out") => suite.passed.push(format!(
            "job timeout of 1 s ended the job after {:.1} s",
            started.elapsed().as_secs_f64()
        )),
        other => suite
            .failures
            .push(format!("the timeout did not fire: {other:?}")),
    }
    context
        .sql("SET quiver.job_timeout_secs = 0")
        .await
        .expect("reset timeout");
    let expected = suite.expected(3).await;
    let (result, _) = run_with_fault(&context, query(3).expect("Q3"), Phase::Map, || {}).await;
    suite.check("Q3 after cancel and timeout".into(), result, &expected);
}

impl Suite {
    /// Checks that no executor holds files of `job_id` a few seconds after it ended.
    async fn check_no_job_data(&mut self, job_id: &str, scenario: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left: Vec<_> = self
                .cluster
                .shuffle_job_dirs()
                .into_iter()
                .filter(|dir| dir.ends_with(job_id))
                .collect();
            if left.is_empty() {
                self.passed
                    .push(format!("{scenario}: no shuffle data left"));
                return;
            }
            if Instant::now() >= deadline {
                self.failures
                    .push(format!("{scenario}: shuffle data left behind: {left:?}"));
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The scheduler is killed while a job runs: the waiting client gets a clear
/// error, the executors register again by themselves with the new scheduler,
/// the catalog is still there, the interrupted job is recorded as failed, and
/// jobs run again. The job was a write with durable shuffle; what such a job
/// leaves in storage when its scheduler dies (durable map outputs, staged
/// files, files of a commit that did not finish) is planted while it runs,
/// and the restarted scheduler must remove it before it takes jobs.
async fn scheduler_restart(suite: &mut Suite) {
    let storage = suite.cluster.work_dir().join("restart");
    let (shuffle, target) = (storage.join("shuffle"), storage.join("out"));
    let context = suite.context.clone();
    context
        .sql(&format!(
            "SET quiver.shuffle_location = 'file://{}'",
            shuffle.display()
        ))
        .await
        .expect("set the shuffle location");
    let write = format!(
        "COPY ({LONG_QUERY}) TO '{}/' STORED AS PARQUET",
        target.display()
    );
    let job_id = Arc::new(Mutex::new(None::<String>));
    let seen_id = Arc::clone(&job_id);
    let waiting = tokio::spawn(async move {
        let stream = context
            .execute_sql(&write, move |status| {
                seen_id
                    .lock()
                    .expect("id lock")
                    .get_or_insert_with(|| status.job_id.clone());
            })
            .await
            .map_err(|e| e.to_string())?;
        datafusion::physical_plan::common::collect(stream)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    // Let the job start, then kill the scheduler under it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let interrupted = job_id.lock().expect("id lock").clone();
    let leftovers = interrupted
        .as_deref()
        .map(|id| plant_leftovers(&shuffle, &target, id))
        .unwrap_or_default();
    suite.cluster.kill_scheduler();
    match tokio::time::timeout(QUERY_TIMEOUT, waiting).await {
        Ok(Ok(Err(message))) if message.contains("lost contact with the scheduler") => {
            suite.passed.push(format!(
                "scheduler killed mid-job: the client got \"{message}\""
            ))
        }
        other => suite.failures.push(format!(
            "scheduler killed mid-job: expected a clear error, got {other:?}"
        )),
    }
    suite.cluster.start_scheduler();
    suite.context = suite.cluster.connect(EXECUTORS).await;
    suite
        .passed
        .push("executors registered again with the restarted scheduler".into());
    // The scheduler serves while it settles the job's storage; the job ends
    // once that is done.
    if let Some(id) = &interrupted {
        let _ = suite.context.wait_for_job(id).await;
    }
    let left: Vec<_> = leftovers.iter().filter(|path| path.exists()).collect();
    let others = target.join("part-earlier-00000-000.parquet");
    if leftovers.is_empty() || !left.is_empty() || !others.exists() {
        suite.failures.push(format!(
            "the restarted scheduler left an interrupted job's storage: {left:?} of \
             {leftovers:?} remain; another job's file remains: {}",
            others.exists()
        ));
    } else {
        suite.passed.push(
            "the restarted scheduler removed the interrupted job's durable shuffle, \
             staged files and half-committed files"
                .into(),
        );
    }
    match interrupted {
        Some(id) => match suite.context.wait_for_job(&id).await {
            Ok(status)
                if status.state() == JobState::Failed
                    && status.error.contains("scheduler restarted") =>
            {
                suite
                    .passed
                    .push("the interrupted job is recorded as failed".into());
            }
            other => suite
                .failures
                .push(format!("interrupted job's status after restart: {other:?}")),
        },
        None => suite
            .failures
            .push("the interrupted job never reported a status".into()),
    }
    // The catalog survived the restart: the tables need no registering again.
    let expected = suite.expected(9).await;
    let (result, _) =
        run_with_fault(&suite.context, query(9).expect("Q9"), Phase::Map, || {}).await;
    suite.check(
        "Q9 on the persisted catalog after a scheduler restart".into(),
        result,
        &expected,
    );
}

/// A scheduler stopped with SIGTERM, as a Kubernetes rollout stops it,
/// while a client watches a job and the executors hold their control
/// streams, none of which closes by itself: it must exit, and the
/// executors must register with the scheduler that replaces it.
async fn scheduler_stopped(suite: &mut Suite) {
    let context = suite.context.clone();
    let sql = query(18).expect("Q18").to_owned();
    let watching = tokio::spawn(async move { context.sql(&sql).await?.collect().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bound = Duration::from_secs(60);
    match suite.cluster.stop_scheduler(bound) {
        Some(status) => suite.passed.push(format!(
            "a scheduler stopped with SIGTERM exited ({status})"
        )),
        None => {
            suite.failures.push(format!(
                "a scheduler stopped with SIGTERM still ran {bound:?} later"
            ));
            suite.cluster.kill_scheduler();
        }
    }
    match tokio::time::timeout(QUERY_TIMEOUT, watching).await {
        Ok(Ok(Err(_))) => suite
            .passed
            .push("the client watching a job was told its scheduler stopped".into()),
        // The query may have finished before the signal.
        Ok(Ok(Ok(_))) => {}
        other => suite.failures.push(format!(
            "a client watching a job when its scheduler stopped: {other:?}"
        )),
    }
    suite.cluster.start_scheduler();
    suite.context = suite.cluster.connect(EXECUTORS).await;
    suite
        .passed
        .push("executors registered with the scheduler that replaced a stopped one".into());
}

/// Writes what a write job with durable shuffle may leave behind when its
/// scheduler dies, and another job's committed file; returns the paths that
/// must go.
fn plant_leftovers(
    shuffle: &std::path::Path,
    target: &std::path::Path,
    job_id: &str,
) -> Vec<std::path::PathBuf> {
    let leftovers = vec![
        shuffle.join(format!("{job_id}/1/0-a0.data")),
        shuffle.join(format!("{job_id}/1/0-a0.index")),
        target.join(format!(
            "_temporary/{job_id}/p0-a0/part-{job_id}-00000-000.parquet"
        )),
        target.join(format!("part-{job_id}-00001-000.parquet")),
    ];
    for path in leftovers
        .iter()
        .chain([&target.join("part-earlier-00000-000.parquet")])
    {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("folder");
        std::fs::write(path, b"leftover").expect("plant");
    }
    leftovers
}

/// A cluster of one executor whose `CREATE TABLE AS` tables go to a
/// warehouse folder of their own, returned with it.
fn cluster_with_a_warehouse() -> (tempfile::TempDir, ProcessCluster) {
    let warehouse = tempfile::tempdir().expect("warehouse");
    let args = ClusterArgs {
        scheduler: vec!["--warehouse".into(), warehouse.path().display().to_string()],
        ..ClusterArgs::default()
    };
    (warehouse, ProcessCluster::start(1, args))
}

/// A table that `CREATE TABLE AS` made keeps owning its folder after the
/// scheduler restarts with another `--warehouse`: dropping it deletes its
/// files there (they stayed, unsaid, before), and a new table of its name
/// goes to the new warehouse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_made_in_an_earlier_warehouse_takes_its_files_when_dropped() {
    let (first, mut cluster) = cluster_with_a_warehouse();
    let folder = |warehouse: &tempfile::TempDir| warehouse.path().join("public").join("moved");
    let run = |context: QuiverContext, sql: &'static str| async move {
        context.sql(sql).await?.collect().await
    };
    let context = cluster.connect(1).await;
    run(context.clone(), "CREATE TABLE moved AS SELECT 1 AS a")
        .await
        .expect("CREATE TABLE AS");
    assert!(folder(&first).is_dir());
    drop(context);
    cluster.kill_scheduler();

    let second = tempfile::tempdir().expect("warehouse");
    cluster.set_scheduler_args(vec![
        "--warehouse".into(),
        second.path().display().to_string(),
    ]);
    cluster.start_scheduler();
    let context = cluster.connect(1).await;
    let rows = run(context.clone(), "SELECT a FROM moved")
        .await
        .expect("read");
    assert_eq!(rows.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    run(context.clone(), "DROP TABLE moved")
        .await
        .expect("drop");
    assert!(!folder(&first).exists(), "{}", cluster.scheduler_log());
    run(context.clone(), "CREATE TABLE moved AS SELECT 2 AS a")
        .await
        .expect("CREATE TABLE AS again");
    assert!(folder(&second).is_dir());
}

/// A scheduler that stops between a `CREATE TABLE ... AS` job's commit and
/// the table's registration (killed, or past its shutdown grace) leaves the
/// table pending in its state store: it registers it when it starts again,
/// and forgets one whose job failed. One it cannot register then (its files
/// are away) keeps its name, and is registered once it can be, with no
/// restart. The state such a stop leaves is made from a real
/// `CREATE TABLE AS`: its catalog entry is taken out again and stored as
/// pending, as it was before the registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_left_pending_by_a_stopped_scheduler_is_registered_when_it_starts() {
    use quiver_proto::PendingTable;
    use quiver_scheduler::store::StateStore;

    let (warehouse, mut cluster) = cluster_with_a_warehouse();
    let context = cluster.connect(1).await;
    let run = |sql: &'static str| {
        let context = context.clone();
        async move { context.sql(sql).await?.collect().await }
    };
    run("CREATE TABLE made AS SELECT value AS v FROM range(1000)")
        .await
        .expect("CREATE TABLE AS");
    run("CREATE TABLE broken AS SELECT 1 / (value - value) AS v FROM range(10)")
        .await
        .expect_err("the write divides by zero");
    for sql in [
        "CREATE TABLE stored AS SELECT value AS v FROM range(10)",
        "CREATE TABLE away AS SELECT value AS v FROM range(20)",
    ] {
        run(sql).await.expect("CREATE TABLE AS");
    }
    let jobs = context.list_jobs(100).await.expect("job list");
    let job_of = |table: &str| {
        jobs.iter()
            .find(|record| record.query.contains(&format!("CREATE TABLE {table} AS")))
            .and_then(|record| record.status.as_ref())
            .map(|status| status.job_id.clone())
            .expect("the job is in the history")
    };
    let (made_job, broken_job, stored_job) = (job_of("made"), job_of("broken"), job_of("stored"));
    let away_job = job_of("away");
    drop(context);
    cluster.kill_scheduler();

    let store = StateStore::open(&cluster.work_dir().join("scheduler-state")).expect("state");
    let key = "table:datafusion.public.made";
    let entry = store
        .catalog_entry(key)
        .expect("read the catalog")
        .expect("the table was registered");
    assert_eq!(
        store.remove_catalog_entries(|k| k == key).expect("remove"),
        1
    );
    store
        .put_pending_table(&PendingTable {
            job_id: made_job,
            statements: vec![entry.sql.clone()],
            managed_key: key.into(),
            settings: Vec::new(),
        })
        .expect("store the pending table");
    store
        .put_pending_table(&PendingTable {
            job_id: broken_job,
            statements: vec![entry.sql.replace("made", "broken")],
            managed_key: "table:datafusion.public.broken".into(),
            settings: Vec::new(),
        })
        .expect("store the pending table");
    // Stopped right after its entry was stored: the table is pending, and
    // its entry says nothing yet of owning its folder.
    let stored_key = "table:datafusion.public.stored";
    let mut stored_entry = store
        .catalog_entry(stored_key)
        .expect("read the catalog")
        .expect("the table was registered");
    stored_entry.kind = "table".into();
    store
        .put_catalog_entry(stored_key, &stored_entry)
        .expect("put the entry back as not owning its folder");
    store
        .put_pending_table(&PendingTable {
            job_id: stored_job,
            statements: vec![stored_entry.sql.clone()],
            managed_key: stored_key.into(),
            settings: Vec::new(),
        })
        .expect("store the pending table");
    let away_key = "table:datafusion.public.away";
    let away_entry = store
        .catalog_entry(away_key)
        .expect("read the catalog")
        .expect("the table was registered");
    store
        .remove_catalog_entries(|k| k == away_key)
        .expect("remove");
    store
        .put_pending_table(&PendingTable {
            job_id: away_job.clone(),
            statements: vec![away_entry.sql],
            managed_key: away_key.into(),
            settings: Vec::new(),
        })
        .expect("store the pending table");
    drop(store);
    let away_folder = warehouse.path().join("public").join("away");
    let moved = cluster.work_dir().join("away-moved");
    std::fs::rename(&away_folder, &moved).expect("move the files away");

    cluster.start_scheduler();
    let context = cluster.connect(1).await;
    let error = context
        .sql("CREATE TABLE away AS SELECT 1 AS v")
        .await
        .map(|_| ())
        .expect_err("the name is the pending table's");
    assert!(
        error.to_string().contains(&format!(
            "is being created by the CREATE TABLE AS job {away_job}"
        )),
        "{error}"
    );
    std::fs::rename(&moved, &away_folder).expect("put the files back");
    let deadline = Instant::now() + Duration::from_secs(90);
    let registered = loop {
        if let Ok(frame) = context.sql("SELECT count(*) AS n FROM away").await
            && let Ok(batches) = frame.collect().await
        {
            break batches;
        }
        assert!(
            Instant::now() < deadline,
            "the table was not registered\n{}",
            cluster.scheduler_log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let column = registered[0]
        .column(0)
        .as_primitive::<arrow::datatypes::Int64Type>();
    assert_eq!(column.value(0), 20);
    let status = context.job_status(&away_job).await.expect("status");
    assert_eq!(status.state(), JobState::Succeeded, "{status:?}");
    let counted = context
        .sql("SELECT count(*) AS n FROM made")
        .await
        .expect("the table is registered again")
        .collect()
        .await
        .expect("count");
    let column = counted[0]
        .column(0)
        .as_primitive::<arrow::datatypes::Int64Type>();
    assert_eq!(column.value(0), 1000);
    let error = context
        .sql("SELECT * FROM broken")
        .await
        .map(|_| ())
        .expect_err("a failed job's table is never registered");
    assert!(error.to_string().contains("broken"), "{error}");
    // Registered once, and owning its folder: dropping it deletes its files.
    let stored_folder = warehouse.path().join("public").join("stored");
    assert!(!data_files_below(&stored_folder).is_empty());
    context
        .sql("DROP TABLE stored")
        .await
        .expect("drop")
        .collect()
        .await
        .expect("dropped");
    assert!(
        data_files_below(&stored_folder).is_empty(),
        "a dropped table's folder stays\n{}",
        cluster.scheduler_log()
    );
    drop(context);
    cluster.kill_scheduler();

    let store = StateStore::open(&cluster.work_dir().join("scheduler-state")).expect("state");
    assert!(
        store.pending_tables().expect("pending").is_empty(),
        "nothing stays pending"
    );
}

/// A scheduler that stops while write jobs run settles their writes when it
/// starts again, and records each job as its write ended: one that
/// committed succeeded (its `CREATE TABLE AS` table is registered), and
/// must not be submitted again; one rolled back failed, and may be. A
/// write that an earlier start could not settle, and a table it left
/// pending, its job recorded as failed, are settled again. The state such stops leave is made
/// from real jobs: their records are put back as running (or failed), and
/// the tables' catalog entries as pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_interrupted_by_a_restart_are_recorded_as_they_settled() {
    use quiver_scheduler::store::{JobEntry, StateStore};

    let (_warehouse, mut cluster) = cluster_with_a_warehouse();
    let copied = cluster.work_dir().join("copied");
    let context = cluster.connect(1).await;
    let run = |sql: String| {
        let context = context.clone();
        async move { context.sql(&sql).await?.collect().await }
    };
    run(format!(
        "COPY (SELECT value AS v FROM range(1000)) TO '{}/' STORED AS PARQUET",
        copied.display()
    ))
    .await
    .expect("COPY");
    for table in ["made", "later"] {
        run(format!(
            "CREATE TABLE {table} AS SELECT value AS v FROM range(500)"
        ))
        .await
        .expect("CREATE TABLE AS");
    }
    run(format!(
        "COPY (SELECT 1 / (value - value) AS v FROM range(10)) TO '{}/' STORED AS PARQUET",
        cluster.work_dir().join("failed").display()
    ))
    .await
    .expect_err("the write divides by zero");
    let jobs = context.list_jobs(100).await.expect("job list");
    let job_of = |text: &str| {
        jobs.iter()
            .find(|record| record.query.contains(text))
            .and_then(|record| record.status.as_ref())
            .map(|status| status.job_id.clone())
            .expect("the job is in the history")
    };
    let (copy_job, made_job, later_job, failed_job) = (
        job_of("range(1000)"),
        job_of("CREATE TABLE made"),
        job_of("CREATE TABLE later"),
        job_of("value - value"),
    );
    drop(context);
    cluster.kill_scheduler();

    let store = StateStore::open(&cluster.work_dir().join("scheduler-state")).expect("state");
    // What each write wrote into its table, as its job's end recorded it.
    let mut written = HashMap::new();
    let running: Vec<JobEntry> = store
        .jobs()
        .expect("jobs")
        .into_iter()
        .filter_map(|mut record| {
            let status = record.status.as_mut()?;
            // A job's record is made at its submission: it holds no counts
            // of files written, which its end adds.
            written.insert(
                status.job_id.clone(),
                (status.table_files_written, status.table_bytes_written),
            );
            (status.table_files_written, status.table_bytes_written) = (0, 0);
            if status.job_id == later_job || status.job_id == copy_job {
                status.state = JobState::Failed.into();
                status.error = "left by an earlier start".into();
                record.write_unsettled = status.job_id == copy_job;
                return Some(JobEntry::Record(record.into()));
            }
            if ![&made_job, &failed_job].contains(&&status.job_id) {
                return None;
            }
            assert!(!record.writes_to.is_empty(), "a write job: {record:?}");
            status.state = JobState::Running.into();
            status.error.clear();
            // Interrupted in its last stage: its write had not committed.
            status.stages_done = status.stages_total.saturating_sub(1);
            record.finished_at_unix_ms = 0;
            Some(JobEntry::Record(record.into()))
        })
        .collect();
    assert_eq!(running.len(), 4);
    store.put_job_entries(&running).expect("put the jobs back");
    // Writes that no start can settle (a location whose store cannot be
    // built): tried again at each start, up to five.
    let unsettleable = |job_id: &str, settle_failures: u32| {
        let mut record = store
            .jobs()
            .expect("jobs")
            .into_iter()
            .find(|record| {
                record
                    .status
                    .as_ref()
                    .is_some_and(|s| s.job_id == failed_job)
            })
            .expect("the failed job's record");
        let status = record.status.as_mut().expect("status");
        status.job_id = job_id.into();
        status.state = JobState::Failed.into();
        record.writes_to = "s3://user:password@lake/t/".into();
        record.write_unsettled = true;
        record.settle_failures = settle_failures;
        JobEntry::Record(record.into())
    };
    store
        .put_job_entries(&[
            unsettleable("00000000000000a1", 0),
            unsettleable("00000000000000a4", 4),
        ])
        .expect("plant unsettleable writes");
    for (table, job_id) in [("made", &made_job), ("later", &later_job)] {
        common::leave_table_pending(&store, table, job_id);
    }
    drop(store);

    cluster.start_scheduler();
    let context = cluster.connect(1).await;
    let status = |job_id: String| {
        let context = context.clone();
        async move { context.wait_for_job(&job_id).await.expect("status") }
    };
    for job_id in [&copy_job, &made_job, &later_job] {
        let settled = status(job_id.clone()).await;
        assert_eq!(
            (settled.state(), settled.error.as_str()),
            (JobState::Succeeded, ""),
            "a committed write's job {job_id}\n{}",
            cluster.scheduler_log()
        );
        assert_eq!(settled.stages_done, settled.stages_total, "{settled:?}");
        assert!(settled.elapsed_micros > 0, "{settled:?}");
        // Its manifest tells how many files it wrote.
        let (files, bytes) = written[job_id];
        assert!(files > 0 && bytes > 0, "{settled:?}");
        assert_eq!(
            (settled.table_files_written, settled.table_bytes_written),
            (files, bytes),
            "{settled:?}"
        );
    }
    let tried_again = status("00000000000000a1".into()).await;
    assert!(
        tried_again
            .error
            .contains("(1 of 5 starts tried; it is tried again while the scheduler runs"),
        "{}",
        tried_again.error
    );
    let given_up = status("00000000000000a4".into()).await;
    assert!(
        given_up
            .error
            .contains("(5 of 5 starts tried; the scheduler gives up"),
        "{}",
        given_up.error
    );
    let records = context.list_jobs(100).await.expect("job list");
    let unsettled = |job_id: &str| {
        records
            .iter()
            .find(|record| record.status.as_ref().is_some_and(|s| s.job_id == job_id))
            .map(|record| record.write_unsettled)
    };
    assert_eq!(
        (unsettled("00000000000000a1"), unsettled("00000000000000a4")),
        (Some(true), Some(false))
    );
    let failed = status(failed_job).await;
    assert_eq!(failed.state(), JobState::Failed);
    assert!(
        failed
            .error
            .contains("restarted while this job was running; its write was rolled back"),
        "{}",
        failed.error
    );
    let count = |sql: String| {
        let context = context.clone();
        async move {
            let batches = context
                .sql(&sql)
                .await
                .expect(&sql)
                .collect()
                .await
                .expect("count");
            batches[0]
                .column(0)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .value(0)
        }
    };
    for table in ["made", "later"] {
        assert_eq!(count(format!("SELECT count(*) FROM {table}")).await, 500);
    }
    context
        .sql(&format!(
            "CREATE EXTERNAL TABLE copied STORED AS PARQUET LOCATION '{}/'",
            copied.display()
        ))
        .await
        .expect("the committed COPY's folder")
        .collect()
        .await
        .expect("registered");
    assert_eq!(count("SELECT count(*) FROM copied".into()).await, 1000);
}

/// A `CREATE TABLE AS` runs its write before the scheduler answers the
/// client, so a client whose scheduler dies meanwhile has no job id yet: it
/// is told that the statement may have run and where to look, and a
/// statement sent while no scheduler runs is told it was not sent. The
/// restarted scheduler answers at once: while it settles the write, the
/// job shows as running, cancelling it says it ends when its write does,
/// and a statement waits for the start to finish. The write is rolled
/// back and recorded so, and leaves no table and no files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_loses_its_scheduler_during_create_table_as_is_told_where_to_look() {
    let warehouse = tempfile::tempdir().expect("warehouse");
    // Settling waits one executor timeout: long enough to watch it.
    let args = ClusterArgs {
        scheduler: vec![
            "--warehouse".into(),
            warehouse.path().display().to_string(),
            "--executor-timeout-ms".into(),
            "30000".into(),
        ],
        ..ClusterArgs::default()
    };
    let mut cluster = ProcessCluster::start(1, args);
    let context = cluster.connect(1).await;
    let writing = {
        let context = context.clone();
        tokio::spawn(async move {
            let sql = format!("CREATE TABLE slow AS {LONG_QUERY}");
            context.sql(&sql).await.map(|_| ())
        })
    };
    let deadline = Instant::now() + QUERY_TIMEOUT;
    let job_id = loop {
        let jobs = context.list_jobs(0).await.expect("job list");
        let running = jobs
            .iter()
            .filter(|record| record.query.contains("CREATE TABLE slow"))
            .filter_map(|record| record.status.as_ref())
            .find(|status| status.tasks_running > 0);
        if let Some(status) = running {
            break status.job_id.clone();
        }
        assert!(Instant::now() < deadline, "the write never ran: {jobs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cluster.kill_scheduler();

    let error = tokio::time::timeout(QUERY_TIMEOUT, writing)
        .await
        .expect("the client is told at once")
        .expect("the client task")
        .expect_err("the scheduler died under the statement");
    assert!(
        matches!(error, quiver_client::Error::StatementLost { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("may have run") && message.contains("`quiver job list`"),
        "{message}"
    );
    let error = context
        .submit_sql("SELECT 1")
        .await
        .expect_err("no scheduler runs");
    assert!(
        matches!(error, quiver_client::Error::StatementNotSent { .. }),
        "{error:?}"
    );
    drop(context);

    cluster.start_scheduler();
    let deadline = Instant::now() + QUERY_TIMEOUT;
    let context = loop {
        match QuiverContext::connect(&cluster.url()).await {
            Ok(context) => break context,
            Err(error) => assert!(Instant::now() < deadline, "{error}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let settling = context.job_status(&job_id).await.expect("status at once");
    assert_eq!(settling.state(), JobState::Running, "{settling:?}");
    assert!(
        settling.error.contains("its write is being settled"),
        "{}",
        settling.error
    );
    assert_eq!(
        context.cancel_job(&job_id).await.expect("cancel"),
        CancelOutcome::Settling
    );
    let waited = context
        .sql("SELECT count(*) FROM range(10)")
        .await
        .expect("a statement waits for the start");
    assert_eq!(waited.collect().await.expect("rows")[0].num_rows(), 1);
    let status = context
        .wait_for_job(&job_id)
        .await
        .expect("the job's status");
    assert_eq!(status.state(), JobState::Failed, "{status:?}");
    assert!(status.error.contains("rolled back"), "{}", status.error);
    let error = context
        .sql("SELECT * FROM slow")
        .await
        .map(|_| ())
        .expect_err("a rolled-back table is not registered");
    assert!(error.to_string().contains("slow"), "{error}");
    let left = files_below(warehouse.path(), false);
    assert!(left.is_empty(), "files of the rolled-back write: {left:?}");
}

/// A stored table that a start cannot recreate (its files are away) stays
/// stored: a statement naming it says why it is missing, no statement may
/// create another of its name, and it is recreated once its files are
/// back, without another restart. A table whose files are gone for good
/// can be dropped, and is then forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_cannot_be_recreated_at_start_is_kept_and_tried_again() {
    let mut cluster = ProcessCluster::start(1, ClusterArgs::default());
    let context = cluster.connect(1).await;
    let work = cluster.work_dir().to_path_buf();
    let folder = |name: &str| work.join(name);
    for table in ["kept", "gone"] {
        let sql = [
            format!(
                "COPY (SELECT value AS v FROM range(100)) TO '{}/' STORED AS PARQUET",
                folder(table).display()
            ),
            format!(
                "CREATE EXTERNAL TABLE {table} STORED AS PARQUET LOCATION '{}/'",
                folder(table).display()
            ),
        ];
        for statement in sql {
            context
                .sql(&statement)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"))
                .collect()
                .await
                .expect("ran");
        }
    }
    drop(context);
    cluster.kill_scheduler();
    std::fs::rename(folder("kept"), folder("kept.away")).expect("move away");
    std::fs::remove_dir_all(folder("gone")).expect("delete");

    cluster.start_scheduler();
    let context = cluster.connect(1).await;
    let run = |sql: &'static str| {
        let context = context.clone();
        async move { context.sql(sql).await?.collect().await.map_err(Into::into) }
    };
    let missing: Result<_, quiver_client::Error> = run("SELECT count(*) FROM kept").await;
    let message = missing.expect_err("its files are away").to_string();
    assert!(
        message.contains(
            "'datafusion.public.kept' is stored in the catalog, but could not be recreated"
        ),
        "{message}"
    );
    let replacing: Result<_, quiver_client::Error> = run("CREATE VIEW kept AS SELECT 1 AS v").await;
    let message = replacing
        .expect_err("it would replace the table")
        .to_string();
    assert!(
        message.contains("drop it before creating another"),
        "{message}"
    );
    run("DROP TABLE gone")
        .await
        .expect("a table gone for good is dropped");

    std::fs::rename(folder("kept.away"), folder("kept")).expect("move back");
    let deadline = Instant::now() + Duration::from_secs(120);
    let rows = loop {
        match run("SELECT count(*) AS n FROM kept").await {
            Ok(batches) => break batches,
            Err(e) => assert!(
                Instant::now() < deadline,
                "never recreated: {e}\n{}",
                cluster.scheduler_log()
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let counted = rows[0]
        .column(0)
        .as_primitive::<arrow::datatypes::Int64Type>();
    assert_eq!(counted.value(0), 100);
    drop(context);
    cluster.kill_scheduler();

    let store =
        quiver_scheduler::store::StateStore::open(&cluster.work_dir().join("scheduler-state"))
            .expect("state");
    let stored: Vec<String> = store
        .catalog_entries()
        .expect("catalog")
        .into_iter()
        .map(|entry| entry.name)
        .collect();
    assert_eq!(stored, ["datafusion.public.kept"]);
}
