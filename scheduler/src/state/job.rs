//! The state of one job: its stages, and every task's attempts and output.
//! Pure state machine, driven by the event loop; it never does I/O.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::common::tree_node::TreeNode;
use datafusion::datasource::sink::DataSinkExec;
use datafusion::physical_plan::ExecutionPlan;
use prost::bytes::Bytes;
use quiver_core::metrics::add_operator_metrics;
use quiver_core::storage::redact_store_echoes;
use quiver_core::write::layout::file_lists_location;
use quiver_core::write::{ParquetWriteExec, Settled, write_result_ipc};
use quiver_proto::{
    FailureKind, FetchFailure, JobRecord, JobState, JobStatus, LaunchTask, MapOutput,
    PartitionStats, Setting, StageInput, StageMetrics, StoreConfig, TaskFailed, TaskId,
    TaskSucceeded,
};
use tracing::{info, warn};

use super::JobLimits;
use crate::adaptive::{self, AdaptiveJoin, PendingJoins};
use crate::join_swap;
use crate::planner::{Replanner, StagedJob};
use crate::reduction::{self, Reduction};
use crate::stages::StagePlan;
use quiver_core::write::sinks::file_sink_config;

/// First retry delay; doubled on each further attempt.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);

/// Why a write through a sink that stages nothing fails rather than retry.
const UNREPEATABLE_WRITE: &str = "the write's sink stages nothing (CSV, JSON or Arrow files \
    written into a folder under names of their own), so running it again would write its rows \
    a second time: the job fails instead, and files the attempt wrote may remain where it wrote; \
    write Parquet for retried, exactly-once writes";

/// Largest final-stage output that comes back with its task's status, so
/// that a small result (a point lookup, a count) needs no Flight call.
pub const INLINE_RESULT_MAX_BYTES: u64 = 64 * 1024;

/// Largest sum of the file lists of one stage's write tasks that come back
/// inline: the commit task's launch carries them all, and must stay well
/// under the control stream's message limit (256 MiB). Each task's share
/// is this divided by the stage's tasks, at most
/// `quiver.inline_file_list_max_bytes`; a longer list goes to the table's
/// staging folder.
const INLINE_FILE_LISTS_BUDGET: u64 = 64 * 1024 * 1024;

/// Times a job is planned again because files it reads were replaced while
/// it ran, before it fails: a table rewritten faster than the job can read
/// it would otherwise keep it running for ever.
pub const MAX_REPLANS: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    Pending,
    Running { executor_id: String },
    Done,
}

#[derive(Debug)]
pub struct Task {
    pub state: TaskState,
    /// The current attempt when running; the next one when pending. Every
    /// launch gets a new number, so that a stale attempt's report is ignored.
    pub attempt: u32,
    /// Failed or lost attempts, counted against the attempt limit. Recomputing
    /// a finished output that was lost later does not count.
    pub failures: u32,
    pub output: Option<MapOutput>,
    /// A retry waits until then.
    pub not_before: Instant,
    /// Executor on which the previous attempt failed; avoided when possible.
    pub avoid: Option<String>,
    /// An attempt was allowed to commit (see [`Job::allow_commit`]) and no
    /// attempt has reported since: it, or the lost attempt before it, may
    /// have acted.
    pub committing: bool,
    /// When the running attempt's permission to commit has surely run out
    /// (see [`Job::allow_commit`]); none before it is allowed.
    pub commit_stops_by: Option<Instant>,
}

impl Task {
    /// Makes the task pending again under a new attempt, with its output (if
    /// any) gone, preferring an executor other than `lost_on`.
    fn recompute(&mut self, now: Instant, lost_on: &str) {
        self.state = TaskState::Pending;
        self.output = None;
        self.attempt += 1;
        self.not_before = now;
        self.avoid = Some(lost_on.to_owned());
    }
}

#[derive(Debug)]
pub struct Stage {
    pub id: u32,
    pub plan: Bytes,
    pub inputs: Vec<u32>,
    pub tasks: Vec<Task>,
    /// What its finished task attempts measured.
    pub metrics: StageMetrics,
    /// Whether a task of it was ever launched.
    launched: bool,
}

impl Stage {
    pub fn is_complete(&self) -> bool {
        self.tasks.iter().all(|task| task.state == TaskState::Done)
    }

    fn record_metrics(&mut self, partition: u32, executor_id: String, report: &TaskSucceeded) {
        let metrics = &mut self.metrics;
        metrics.tasks += 1;
        metrics.task_micros_total += report.elapsed_micros;
        if metrics.tasks == 1 || report.elapsed_micros > metrics.slowest_task_micros {
            metrics.slowest_task_micros = report.elapsed_micros;
            metrics.slowest_task_partition = partition;
            metrics.slowest_task_executor = executor_id;
        }
        add_operator_metrics(&mut metrics.operators, &report.operators);
    }
}

/// What a status report did to the job.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Continue,
    Succeeded,
    Failed(String),
    Cancelled,
    /// The job is to end, but a commit of its write was lost and may have
    /// committed: the scheduler settles the write off its loop first, and
    /// ends the job as [`Job::on_write_settled`] says.
    Settle,
    /// A file the job reads was replaced after it was planned: its tasks are
    /// abandoned, and it waits to be planned again ([`Job::install_replan`]).
    Replan(String),
}

#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub seq: u64,
    pub settings: Vec<Setting>,
    /// Options of the object stores the job uses; sent with every task.
    pub stores: Vec<StoreConfig>,
    /// `quiver.shuffle_location`: where map outputs are copied to outlive
    /// their executors; empty to keep them on the executors only.
    pub durable_shuffle: String,
    /// The table folder the job writes, if any: one writer per folder runs.
    pub writes_to: Option<String>,
    pub max_attempts: u32,
    /// Largest file list of a write task that comes back with its status.
    /// Kept by the scheduler, such a list outlives its executor, and so
    /// does a larger one, copied into the table's staging folder: the
    /// commit task can be retried without recomputing the write tasks,
    /// which would read the table again, after an overwrite may have
    /// deleted its files. A list is about 200 bytes per file.
    inline_file_list_max_bytes: u64,
    /// When the job fails for running too long, if it has a timeout.
    pub deadline: Option<Instant>,
    timeout: Option<Duration>,
    /// Jobs ahead of this one while it waits for admission.
    pub queue_position: u32,
    /// Indexed by `stage_id - 1`; the last stage is the final one.
    pub stages: Vec<Stage>,
    /// The stages' plans as they run now, in the same order.
    plans: Vec<StagePlan>,
    /// Joins that become broadcast joins if their build side is small.
    pub adaptive: PendingJoins,
    /// Stages whose joins' build sides were chosen once their inputs ran.
    build_sides_chosen: HashSet<u32>,
    pub running: usize,
    pub started: Instant,
    pub state: JobState,
    pub error: String,
    /// The SQL text or plan description, for the job history.
    pub query: String,
    pub submitted_at_unix_ms: u64,
    /// Every executor a task of this job was launched on: all of them may
    /// hold files of the job and are told to remove them when it ends.
    launched_on: BTreeSet<String>,
    /// Plans the job again when a file it reads is replaced; `None` for a
    /// job that cannot run again from a new plan.
    pub replanner: Option<Replanner>,
    /// Times the job was planned again.
    pub replans: u32,
    /// Waiting for a new plan: nothing of the current one runs.
    replanning: bool,
    /// The attempt number that the current plan's tasks start from.
    first_attempt: u32,
    /// A cancel or timeout that came while the write's commit ran (see
    /// [`Job::committing`]). No task is launched from then on; the job ends
    /// so once no commit task runs, unless the commit succeeded first.
    pub deferred_end: Option<DeferredEnd>,
    /// A commit allowed to act was lost with its executor, which may act
    /// until its lease runs out: until then.
    lost_commit_may_act_until: Option<Instant>,
    /// Whether a commit lost with its executor committed, as far as known.
    lost_commit: LostCommit,
    /// The job is to end (as `deferred_end` says) while a lost commit's
    /// outcome is unknown, and the scheduler reads the table's manifests to
    /// settle it first ([`Job::settle_before_ending`]). Nothing runs.
    settling: bool,
}

/// What is known of a commit that was lost with its executor.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LostCommit {
    /// No commit was lost, or an attempt of it reported since, or the
    /// scheduler found that it had not committed.
    Settled,
    /// A commit allowed to act was lost, or failed, and no attempt of it
    /// has succeeded or found no manifest since: it may have written its
    /// manifest.
    Unknown,
    /// The scheduler could not settle the write: why.
    Unsettled(String),
    /// It had committed, but its manifest no longer holds its row count (a
    /// later write folded it), so the job cannot report its result.
    CommittedUncounted,
}

/// How a job asked to end while its write committed ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeferredEnd {
    Cancel,
    Fail(String),
}

impl Job {
    pub fn new(
        id: String,
        seq: u64,
        settings: Vec<Setting>,
        limits: JobLimits,
        plans: &[StagePlan],
        encoded: Vec<Bytes>,
        now: Instant,
    ) -> Self {
        let stages = new_stages(plans, encoded, now, 0);
        Self {
            id,
            seq,
            settings,
            stores: Vec::new(),
            durable_shuffle: String::new(),
            writes_to: None,
            max_attempts: limits.max_attempts.max(1),
            inline_file_list_max_bytes: limits.inline_file_list_max_bytes,
            deadline: limits.timeout.map(|timeout| now + timeout),
            timeout: limits.timeout,
            queue_position: 0,
            stages,
            plans: plans.to_vec(),
            adaptive: PendingJoins::default(),
            build_sides_chosen: HashSet::new(),
            running: 0,
            started: now,
            state: JobState::Running,
            error: String::new(),
            query: String::new(),
            submitted_at_unix_ms: 0,
            launched_on: BTreeSet::new(),
            replanner: None,
            replans: 0,
            replanning: false,
            deferred_end: None,
            lost_commit_may_act_until: None,
            lost_commit: LostCommit::Settled,
            settling: false,
            first_attempt: 0,
        }
    }

    /// Whether the job may be planned again after `failed` lost a file it
    /// reads: it has a replanner, has not used up its replans, and, if it
    /// writes a table, no attempt of its commit may have committed. The
    /// write tasks only stage files, which the new plan's commit ignores; a
    /// commit may have made its write visible. So the commit stage must not
    /// have started, unless `failed` is the first attempt of that stage's one
    /// task (a commit that scans in its own stage), so that no other attempt
    /// of it ran: it failed reading, most likely, before it could commit. Were
    /// it a failure after its manifest that named a file it had just
    /// deleted, the new plan's commit would still not write twice: its
    /// attempt number is above 0, so it looks for the job's manifest first
    /// and finishes from it (`ParquetCommitExec`'s retry).
    fn may_replan(&self, failed: &TaskId) -> bool {
        let commit_untouched = match self.final_stage() {
            Some(commit) if self.writes_to.is_some() && commit.launched => {
                failed.stage_id == commit.id
                    && failed.attempt == self.first_attempt
                    && commit.tasks.len() == 1
            }
            _ => true,
        };
        self.replanner.is_some() && self.replans < MAX_REPLANS && commit_untouched
    }

    /// Abandons the current plan: every running task is forgotten (the event
    /// loop cancels them), and nothing runs until [`Job::install_replan`].
    fn abandon_plan(&mut self) {
        self.replanning = true;
        for task in self.stages.iter_mut().flat_map(|stage| &mut stage.tasks) {
            if matches!(task.state, TaskState::Running { .. }) {
                task.state = TaskState::Pending;
            }
        }
        self.running = 0;
    }

    /// Whether the job waits for a new plan.
    pub fn is_replanning(&self) -> bool {
        self.replanning
    }

    /// Runs the job from `planned`, its statement planned again, instead of
    /// the plan it abandoned. Every task of the new plan starts at an attempt
    /// above any of the old one, so that no report, map output or staged
    /// file of an abandoned attempt is taken for one of the new plan's.
    pub fn install_replan(&mut self, planned: StagedJob, now: Instant) {
        let first_attempt = self
            .stages
            .iter()
            .flat_map(|stage| &stage.tasks)
            .map(|task| task.attempt)
            .max()
            .unwrap_or(0)
            + 1;
        self.stages = new_stages(&planned.stages, planned.encoded, now, first_attempt);
        self.first_attempt = first_attempt;
        self.plans = planned.stages;
        self.adaptive = planned.adaptive;
        self.build_sides_chosen.clear();
        self.stores = keep_job_options(std::mem::take(&mut self.stores), planned.stores);
        self.replans += 1;
        self.replanning = false;
    }

    /// Holds the job back until the cluster admits it.
    pub fn enqueue(&mut self, position: u32) {
        self.state = JobState::Queued;
        self.queue_position = position;
        self.deadline = None;
    }

    /// Lets a queued job run; its clock and timeout start now.
    pub fn admit(&mut self, now: Instant) {
        self.state = JobState::Running;
        self.queue_position = 0;
        self.started = now;
        self.deadline = self.timeout.map(|timeout| now + timeout);
        for task in self.stages.iter_mut().flat_map(|stage| &mut stage.tasks) {
            task.not_before = now;
        }
    }

    fn stage(&self, stage_id: u32) -> Option<&Stage> {
        self.stages.get(stage_id.checked_sub(1)? as usize)
    }

    fn stage_mut(&mut self, stage_id: u32) -> Option<&mut Stage> {
        self.stages.get_mut(stage_id.checked_sub(1)? as usize)
    }

    fn final_stage(&self) -> Option<&Stage> {
        self.stages.last()
    }

    /// Whether a commit of this job may be changing its table: an attempt
    /// allowed to commit runs, or was lost with an executor whose lease may
    /// not have run out. Such a job must not end: it would be reported
    /// cancelled or failed with its rows committed (a retry of the statement
    /// would write them twice), and settling its write would race the commit.
    ///
    /// A commit lost with its executor may have written its manifest. In a
    /// job that runs on, its next attempt settles that: it finds the
    /// manifest and finishes the commit, or commits anew. A job that is to
    /// end runs no more attempts: the scheduler settles the write itself
    /// before it ends ([`Job::settle_before_ending`]), and meanwhile the job
    /// is committing too.
    pub fn committing(&self, now: Instant) -> bool {
        self.settling
            || self
                .lost_commit_may_act_until
                .is_some_and(|until| now < until)
            || self.stages.iter().any(|stage| {
                stage
                    .tasks
                    .iter()
                    .any(|task| matches!(task.state, TaskState::Running { .. }) && task.committing)
            })
    }

    /// Allows commit attempt `id`, running on `executor_id`, to change the
    /// table, if it is the task's running attempt and nobody asked the job
    /// to end, or it `finishes` a commit made earlier (its job's manifest is
    /// there: ending the job now would report it wrongly); the job then
    /// waits for it before it ends, or until `stops_by`, when the time the
    /// attempt was given to act has surely run out (see
    /// [`Job::fail_overdue_commits`]). `Err` says why not.
    pub fn allow_commit(
        &mut self,
        id: &TaskId,
        executor_id: &str,
        finishes: bool,
        stops_by: Instant,
    ) -> Result<(), String> {
        if self.state != JobState::Running || self.replanning || self.settling {
            return Err("the job is not running".into());
        }
        // An attempt that asks without `finishes` found no manifest: a
        // commit lost earlier had not committed, and can no longer act.
        if !finishes {
            self.lost_commit = LostCommit::Settled;
        }
        match &self.deferred_end {
            _ if finishes => {}
            Some(DeferredEnd::Cancel) => return Err("the job was cancelled".into()),
            Some(DeferredEnd::Fail(message)) => return Err(message.clone()),
            None => {}
        }
        let task = self
            .stage_mut(id.stage_id)
            .and_then(|stage| stage.tasks.get_mut(id.partition as usize))
            .filter(|task| {
                task.attempt == id.attempt
                    && matches!(&task.state, TaskState::Running { executor_id: e } if e == executor_id)
            })
            .ok_or_else(|| format!("attempt {} is no longer the task's current one", id.attempt))?;
        task.committing = true;
        task.commit_stops_by = Some(stops_by);
        Ok(())
    }

    /// Takes each running commit attempt whose time to act has surely run
    /// out as failed, with `message`: it stopped before its next change, or
    /// hangs where it can no longer make one (see
    /// `quiver_core::write::permission`), and its report, if one ever
    /// comes, is stale. Like any failed commit, its next attempt settles
    /// the write, or the scheduler does before the job ends.
    pub fn fail_overdue_commits(&mut self, now: Instant, message: &str) -> Outcome {
        let overdue: Vec<TaskId> = self
            .stages
            .iter()
            .flat_map(|stage| {
                stage
                    .tasks
                    .iter()
                    .enumerate()
                    .map(move |(partition, task)| (stage.id, partition, task))
            })
            .filter(|(_, _, task)| {
                matches!(task.state, TaskState::Running { .. })
                    && task.commit_stops_by.is_some_and(|stops_by| stops_by <= now)
            })
            .map(|(stage_id, partition, task)| TaskId {
                job_id: self.id.clone(),
                stage_id,
                partition: partition as u32,
                attempt: task.attempt,
            })
            .collect();
        for id in overdue {
            warn!(job_id = %id.job_id, stage = id.stage_id, partition = id.partition,
                attempt = id.attempt, %message, "a commit ran past its time");
            let failure = TaskFailed {
                kind: FailureKind::Retryable as i32,
                message: message.to_owned(),
                ..TaskFailed::default()
            };
            let outcome = self.on_failure(&id, &failure, now);
            if outcome != Outcome::Continue {
                return outcome;
            }
        }
        Outcome::Continue
    }

    /// Defers `end` while a commit of this job may be changing its table
    /// (see [`Job::committing`]); returns whether it did. The job then ends
    /// so once no commit can act, unless the commit succeeds first.
    pub fn defer_end(&mut self, end: DeferredEnd, now: Instant) -> bool {
        let committing = self.committing(now);
        if committing {
            // The first reason to end stands: a cancel after a timeout
            // does not turn the failure into a cancel.
            self.deferred_end.get_or_insert(end);
        }
        committing
    }

    /// Whether the stage's tasks write a table's files: in a write job, the
    /// stages that its final stage, the commit, reads.
    fn writes_files(&self, stage_id: u32) -> bool {
        self.writes_to.is_some()
            && self
                .final_stage()
                .is_some_and(|commit| commit.inputs.contains(&stage_id))
    }

    /// Whether the stage's plan writes through a sink that stages nothing
    /// into a folder (CSV, JSON or Arrow files under names of their own), or
    /// into something that is not a file: a second attempt would write its
    /// rows again beside what the first one wrote, so it gets one.
    fn writes_unrepeatably(&self, stage_id: u32) -> bool {
        self.stage_plan_has(stage_id, |node| {
            node.downcast_ref::<DataSinkExec>()
                .is_some_and(|sink| !writes_one_file(sink))
        })
    }

    /// Whether the stage's plan writes a table's Parquet files.
    fn writes_parquet(&self, stage_id: u32) -> bool {
        self.stage_plan_has(stage_id, |node| {
            node.downcast_ref::<ParquetWriteExec>().is_some()
        })
    }

    /// Whether a node of the stage's plan is one that `is` accepts.
    fn stage_plan_has(&self, stage_id: u32, is: impl Fn(&Arc<dyn ExecutionPlan>) -> bool) -> bool {
        self.plans
            .iter()
            .find(|plan| plan.stage_id == stage_id)
            .is_some_and(|plan| {
                let root: Arc<dyn ExecutionPlan> = Arc::clone(&plan.plan) as _;
                root.exists(|node| Ok(is(node))).unwrap_or(false)
            })
    }

    fn inputs_complete(&self, stage: &Stage) -> bool {
        stage
            .inputs
            .iter()
            .all(|input| self.stage(*input).is_some_and(Stage::is_complete))
    }

    /// A pending task whose inputs are all available, earliest stage first;
    /// the probe side of an undecided adaptive join waits. Returns it with the
    /// executor its last attempt failed on.
    pub fn next_runnable(&self, now: Instant) -> Option<(u32, usize, Option<&str>)> {
        // A job that is to end runs nothing more (see `committing`).
        if self.replanning || self.settling || self.deferred_end.is_some() {
            return None;
        }
        self.stages
            .iter()
            .filter(|stage| self.inputs_complete(stage) && !self.adaptive.holds(stage.id))
            .find_map(|stage| {
                stage
                    .tasks
                    .iter()
                    .position(|task| task.state == TaskState::Pending && task.not_before <= now)
                    .map(|partition| {
                        let avoid = stage.tasks[partition].avoid.as_deref();
                        (stage.id, partition, avoid)
                    })
            })
    }

    /// Marks a task running on `executor_id` and builds its launch message.
    pub fn launch(
        &mut self,
        stage_id: u32,
        partition: usize,
        executor_id: &str,
    ) -> Option<LaunchTask> {
        let inputs: Vec<StageInput> = self
            .stage(stage_id)?
            .inputs
            .iter()
            .filter_map(|input| self.stage(*input))
            .map(|input| StageInput {
                stage_id: input.id,
                outputs: input
                    .tasks
                    .iter()
                    .filter_map(|t| t.output.clone())
                    .collect(),
            })
            .collect();
        let job_id = self.id.clone();
        let settings = self.settings.clone();
        let stores = self.stores.clone();
        // The client reads the final stage's output from the executors.
        let is_final = self.final_stage().is_some_and(|stage| stage.id == stage_id);
        let durable_shuffle = if is_final {
            String::new()
        } else {
            self.durable_shuffle.clone()
        };
        let writes_files = self.writes_files(stage_id);
        let inline_result_max_bytes = if is_final {
            INLINE_RESULT_MAX_BYTES
        } else if writes_files {
            // The commit's launch carries every inline list of the stage.
            let tasks = self
                .stage(stage_id)
                .map_or(1, |stage| stage.tasks.len().max(1));
            self.inline_file_list_max_bytes
                .min(INLINE_FILE_LISTS_BUDGET / tasks as u64)
        } else {
            0
        };
        // A file list too large to come back inline outlives its executor
        // in the table's staging folder, unless it is copied anyway. Only a
        // stage that writes the files: the commit may read query rows (a
        // sort before an ordered write), which must not go to the table.
        let large_output_location = match &self.writes_to {
            Some(table) if durable_shuffle.is_empty() && self.writes_parquet(stage_id) => {
                file_lists_location(table)
            }
            _ => String::new(),
        };
        let stage = self.stage_mut(stage_id)?;
        stage.launched = true;
        let plan = stage.plan.clone();
        let task = stage.tasks.get_mut(partition)?;
        task.state = TaskState::Running {
            executor_id: executor_id.to_owned(),
        };
        task.commit_stops_by = None;
        let attempt = task.attempt;
        self.running += 1;
        self.launched_on.insert(executor_id.to_owned());
        Some(LaunchTask {
            task: Some(TaskId {
                job_id,
                stage_id,
                partition: partition as u32,
                attempt,
            }),
            plan,
            inputs,
            settings,
            stores,
            durable_shuffle,
            inline_result_max_bytes,
            large_output_location,
        })
    }

    /// Takes the running task that `id` reports on out of the running state,
    /// if the report is current: a stale attempt's report changes nothing.
    fn finish_running(&mut self, id: &TaskId, succeeded: bool) -> Option<(&mut Task, String)> {
        let task = self
            .stage_mut(id.stage_id)?
            .tasks
            .get_mut(id.partition as usize)?;
        let executor_id = match &task.state {
            TaskState::Running { executor_id } if task.attempt == id.attempt => executor_id.clone(),
            _ => return None,
        };
        task.state = TaskState::Pending;
        let reports_a_commit = std::mem::take(&mut task.committing);
        self.running -= 1;
        if reports_a_commit {
            // A commit that succeeded settled its write; one that failed
            // may have failed after its manifest, and is settled before
            // the job ends.
            self.lost_commit = if succeeded {
                LostCommit::Settled
            } else {
                LostCommit::Unknown
            };
        }
        let task = self
            .stage_mut(id.stage_id)?
            .tasks
            .get_mut(id.partition as usize)?;
        Some((task, executor_id))
    }

    /// A task attempt finished: its output is kept and what it measured
    /// is added to its stage's metrics.
    pub fn on_success(
        &mut self,
        id: &TaskId,
        output: MapOutput,
        report: &TaskSucceeded,
    ) -> Outcome {
        let Some((task, executor_id)) = self.finish_running(id, true) else {
            return Outcome::Continue;
        };
        task.state = TaskState::Done;
        task.output = Some(output);
        if let Some(stage) = self.stage_mut(id.stage_id) {
            stage.record_metrics(id.partition, executor_id, report);
        }
        self.decide_adaptive_joins();
        self.decide_reductions();
        self.choose_build_sides();
        if self.final_stage().is_some_and(Stage::is_complete) {
            self.state = JobState::Succeeded;
            Outcome::Succeeded
        } else {
            Outcome::Continue
        }
    }

    pub fn on_failure(&mut self, id: &TaskId, failure: &TaskFailed, now: Instant) -> Outcome {
        let max_attempts = self.max_attempts;
        let once = self.writes_unrepeatably(id.stage_id);
        let ending = self.deferred_end.is_some();
        let kind = failure.kind();
        let Some((task, executor_id)) = self.finish_running(id, false) else {
            return Outcome::Continue;
        };
        task.attempt += 1;
        if ending {
            // The job ends as it was asked to, now that this commit reported.
            return Outcome::Continue;
        }
        if once && matches!(kind, FailureKind::Retryable | FailureKind::FetchFailed) {
            // Whatever failed, the attempt may have written files already.
            return self.fail(format!("{}; {UNREPEATABLE_WRITE}", failure.message));
        }
        if let (FailureKind::FetchFailed, Some(fetch)) = (kind, &failure.fetch) {
            // The reader is fine; its input is missing. It waits, without using
            // up an attempt, until the scheduler has recomputed that input.
            task.not_before = now;
            return self.recompute_map_output(fetch, &failure.message, now);
        }
        if kind == FailureKind::InputReplaced {
            if self.may_replan(id) {
                self.abandon_plan();
                return Outcome::Replan(failure.message.clone());
            }
            let message = match self.replans {
                0 => failure.message.clone(),
                replans => format!(
                    "the tables this job reads kept being replaced while it ran (it was \
                     planned {} times): {}",
                    replans + 1,
                    failure.message
                ),
            };
            return self.fail(message);
        }
        task.failures += 1;
        let retryable = matches!(kind, FailureKind::Retryable | FailureKind::FetchFailed);
        if !retryable || task.failures >= max_attempts {
            let message = if retryable {
                format!(
                    "task {}/{} failed after {} attempts: {}",
                    id.stage_id, id.partition, task.failures, failure.message
                )
            } else {
                failure.message.clone()
            };
            return self.fail(message);
        }
        task.not_before = now + RETRY_BACKOFF * 2u32.saturating_pow(task.failures - 1);
        task.avoid = Some(executor_id);
        Outcome::Continue
    }

    /// Decides the adaptive joins whose build stage is now complete.
    fn decide_adaptive_joins(&mut self) {
        let Some(policy) = self.adaptive.policy() else {
            return;
        };
        let complete = self.complete_stages();
        for join in self.adaptive.take_ready(|id| complete.contains(&id)) {
            let Some(build_bytes) = self.stage(join.build_stage).map(|s| stage_written(s).bytes)
            else {
                continue;
            };
            let probe_tasks = self
                .stage(join.probe_stage)
                .map_or(0, |stage| stage.tasks.len()) as u64;
            let probe_bytes = adaptive::output_estimate(&self.plans, join.probe_stage);
            if policy.broadcasts(build_bytes, probe_tasks, probe_bytes) {
                self.broadcast_join(join, build_bytes);
            }
        }
    }

    /// Rewrites `join`'s stage to broadcast its build side and run its probe
    /// stage's plan, which then runs no task of its own. A plan that cannot
    /// be rewritten leaves the join partitioned, as planned.
    fn broadcast_join(&mut self, join: AdaptiveJoin, build_bytes: u64) {
        if !self.not_started(join.join_stage)
            || !self.not_started(join.probe_stage)
            || !adaptive::keeps_partitions_valid(&self.plans, &join)
        {
            return;
        }
        let rewritten = adaptive::broadcast_join(&self.plans, &join)
            .map_err(crate::Error::Query)
            .and_then(|plan| plan.encode().map(|bytes| (plan, bytes)));
        let (plan, bytes) = match rewritten {
            Ok(rewritten) => rewritten,
            Err(error) => {
                warn!(job_id = %self.id, stage = join.join_stage, %error, "the join stays partitioned: its broadcast plan failed");
                return;
            }
        };
        info!(
            job_id = %self.id,
            join_stage = join.join_stage,
            build_stage = join.build_stage,
            probe_stage = join.probe_stage,
            build_bytes,
            "broadcasting a join's build side, measured after it ran"
        );
        let now = Instant::now();
        if let Some(probe) = self.stage_mut(join.probe_stage) {
            probe.tasks.clear();
            probe.inputs.clear();
            probe.metrics.merged_into = join.join_stage;
        }
        let partitions = plan.partitions();
        let first_attempt = self.first_attempt;
        if let Some(stage) = self.install_plan(plan, bytes) {
            stage.tasks = pending_tasks(partitions, now, first_attempt);
        }
        self.adaptive.forget_join_stage(join.probe_stage);
        self.adaptive
            .move_reductions(join.probe_stage, join.join_stage);
    }

    /// Decides the semi-join reductions whose key stage is now complete: a
    /// key stage small enough, by the rule of broadcast joins, filters the
    /// scan of a stage not yet started.
    fn decide_reductions(&mut self) {
        let Some(policy) = self.adaptive.reduction_policy() else {
            return;
        };
        let complete = self.complete_stages();
        for reduction in self
            .adaptive
            .take_ready_reductions(|id| complete.contains(&id))
        {
            let Some(key_bytes) = self
                .stage(reduction.key_stage)
                .map(|s| stage_written(s).bytes)
            else {
                continue;
            };
            let scan_tasks = self
                .stage(reduction.scan_stage)
                .map_or(0, |stage| stage.tasks.len()) as u64;
            let scan_bytes = adaptive::output_estimate(&self.plans, reduction.scan_stage);
            if policy.broadcasts(key_bytes, scan_tasks, scan_bytes)
                && self.not_started(reduction.scan_stage)
            {
                self.reduce(reduction);
            }
        }
    }

    /// Rewrites the scan stage of `reduction` to keep only rows whose key its
    /// build stage holds. A plan that cannot be rewritten runs as planned.
    fn reduce(&mut self, reduction: Reduction) {
        let rewritten = reduction::reduce(&self.plans, &reduction)
            .map_err(crate::Error::Query)
            .and_then(|plan| {
                plan.map(|plan| plan.encode().map(|bytes| (plan, bytes)))
                    .transpose()
            });
        let (plan, bytes) = match rewritten {
            Ok(Some(rewritten)) => rewritten,
            Ok(None) => return,
            Err(error) => {
                warn!(job_id = %self.id, stage = reduction.scan_stage, %error, "the scan stays unfiltered: its reduced plan failed");
                return;
            }
        };
        info!(
            job_id = %self.id,
            scan_stage = reduction.scan_stage,
            key_stage = reduction.key_stage,
            join_stage = reduction.join_stage,
            "filtering a scan by the keys of a join's other side, measured after they ran"
        );
        if let Some(stage) = self.install_plan(plan, bytes) {
            stage.metrics.reduced_by = reduction.key_stage;
        }
    }

    /// Lets each stage about to run build its partitioned joins that read two
    /// complete shuffles from the side that wrote fewer rows
    /// ([`join_swap`]). A stage is decided once: when its inputs are all
    /// complete and no pending decision holds it.
    fn choose_build_sides(&mut self) {
        if !self.adaptive.swaps_build_sides() {
            return;
        }
        let ready: Vec<u32> = self
            .stages
            .iter()
            .filter(|stage| {
                !self.build_sides_chosen.contains(&stage.id)
                    && !self.adaptive.holds(stage.id)
                    && self.inputs_complete(stage)
                    && self.not_started(stage.id)
            })
            .map(|stage| stage.id)
            .collect();
        for id in ready {
            self.build_sides_chosen.insert(id);
            let Some(plan) = self.plans.iter().find(|plan| plan.stage_id == id) else {
                continue;
            };
            let written = |input: u32| {
                self.stage(input)
                    .filter(|stage| stage.is_complete())
                    .map(stage_written)
            };
            let chosen = join_swap::choose_build_sides(plan, written)
                .map_err(crate::Error::Query)
                .and_then(|chosen| {
                    chosen
                        .map(|(plan, builds)| plan.encode().map(|bytes| (plan, bytes, builds)))
                        .transpose()
                });
            let (plan, bytes, builds) = match chosen {
                Ok(Some(chosen)) => chosen,
                Ok(None) => continue,
                Err(error) => {
                    warn!(job_id = %self.id, stage = id, %error, "the joins keep their build sides: the swapped plan failed");
                    continue;
                }
            };
            info!(
                job_id = %self.id,
                stage = id,
                ?builds,
                "building joins from their smaller side, measured after both ran"
            );
            if let Some(stage) = self.install_plan(plan, bytes) {
                stage.metrics.swapped_builds = builds;
            }
        }
    }

    /// Ids of the stages whose every task is done.
    fn complete_stages(&self) -> HashSet<u32> {
        self.stages
            .iter()
            .filter(|stage| stage.is_complete())
            .map(|stage| stage.id)
            .collect()
    }

    /// Whether stage `id` has tasks and none of them has started.
    fn not_started(&self, id: u32) -> bool {
        self.stage(id).is_some_and(|stage| {
            !stage.tasks.is_empty() && stage.tasks.iter().all(|t| t.state == TaskState::Pending)
        })
    }

    /// Makes `plan` (encoded as `bytes`) the plan its stage runs from now on.
    fn install_plan(&mut self, plan: StagePlan, bytes: Bytes) -> Option<&mut Stage> {
        let id = plan.stage_id;
        let inputs = plan.inputs.clone();
        if let Some(slot) = self.plans.iter_mut().find(|stage| stage.stage_id == id) {
            *slot = plan;
        }
        let stage = self.stage_mut(id)?;
        stage.plan = bytes;
        stage.inputs = inputs;
        Some(stage)
    }

    /// Makes the map output that a reader could not fetch pending again, so
    /// that exactly that output is recomputed. Each recompute counts as a
    /// failure of the map task, so an output that can never be read fails the
    /// job instead of looping.
    fn recompute_map_output(
        &mut self,
        fetch: &FetchFailure,
        message: &str,
        now: Instant,
    ) -> Outcome {
        let max_attempts = self.max_attempts;
        let once = self.writes_unrepeatably(fetch.stage_id);
        let Some(task) = self
            .stage_mut(fetch.stage_id)
            .and_then(|stage| stage.tasks.get_mut(fetch.map_partition as usize))
        else {
            return self.fail(format!("a task read an unknown map output: {message}"));
        };
        let current = task.state == TaskState::Done
            && task
                .output
                .as_ref()
                .is_some_and(|output| output.attempt == fetch.attempt);
        if !current {
            // Already being recomputed after another reader's report.
            return Outcome::Continue;
        }
        if once {
            return self.fail(format!(
                "map output {}/{} was lost: {message}; {UNREPEATABLE_WRITE}",
                fetch.stage_id, fetch.map_partition
            ));
        }
        task.failures += 1;
        if task.failures >= max_attempts {
            let failures = task.failures;
            return self.fail(format!(
                "map output {}/{} could not be read after {failures} attempts: {message}",
                fetch.stage_id, fetch.map_partition
            ));
        }
        task.recompute(now, &fetch.executor_id);
        Outcome::Continue
    }

    /// Reschedules what was lost with an executor: its running tasks, and the map
    /// outputs it held that a stage still needs, recomputed from lineage. Resetting
    /// an output can make an earlier stage's outputs needed again, so this repeats
    /// until nothing changes. A running task lost this way uses up an attempt; a
    /// finished output that has to be recomputed does not.
    /// A commit allowed to act that ran on the executor may act until
    /// `lease_end`, when the executor's lease has surely run out: its next
    /// attempt waits until then, and the job does not end before.
    pub fn on_executor_lost(
        &mut self,
        executor_id: &str,
        now: Instant,
        lease_end: Instant,
    ) -> Outcome {
        self.read_copies_of(executor_id);
        if self.replanning || self.settling {
            // Nothing of the abandoned plan is needed any more, nor of a job
            // that is to end.
            return Outcome::Continue;
        }
        let max_attempts = self.max_attempts;
        let unrepeatable: HashSet<u32> = self
            .stages
            .iter()
            .map(|stage| stage.id)
            .filter(|stage_id| self.writes_unrepeatably(*stage_id))
            .collect();
        let mut exhausted = None;
        let mut lost_write = None;
        let mut lost_commit = false;
        loop {
            let needed = self.needed_stages();
            let mut changed = false;
            for (stage, needed) in self.stages.iter_mut().zip(needed) {
                for (partition, task) in stage.tasks.iter_mut().enumerate() {
                    let lost = match &task.state {
                        TaskState::Running { executor_id: e } => e == executor_id,
                        TaskState::Done => needed && output_on(task, executor_id),
                        TaskState::Pending => false,
                    };
                    if !lost {
                        continue;
                    }
                    if unrepeatable.contains(&stage.id) {
                        lost_write = Some((stage.id, partition));
                    }
                    let running = matches!(task.state, TaskState::Running { .. });
                    if running {
                        self.running -= 1;
                        task.failures += 1;
                        if task.failures >= max_attempts {
                            exhausted = Some((stage.id, partition));
                        }
                    }
                    task.recompute(now, executor_id);
                    if running && task.committing {
                        task.not_before = lease_end;
                        lost_commit = true;
                    }
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        if lost_commit {
            self.lost_commit_may_act_until = Some(lease_end);
            self.lost_commit = LostCommit::Unknown;
        }
        if let Some((stage, partition)) = lost_write {
            return self.fail(format!(
                "task {stage}/{partition} was lost with its executor {executor_id}; \
                 {UNREPEATABLE_WRITE}"
            ));
        }
        let Some((stage, partition)) = exhausted else {
            return Outcome::Continue;
        };
        let message = format!(
            "task {stage}/{partition} was lost with its executor {executor_id} on its last attempt"
        );
        if self.defer_end(DeferredEnd::Fail(message.clone()), now) {
            // Not before the lost commit can no longer act.
            return Outcome::Continue;
        }
        self.fail(message)
    }

    /// `executor_id` has gone: the durable outputs it wrote are read from
    /// their copies from now on. Readers ask the executor that wrote an
    /// output first while the scheduler names it, and would otherwise wait
    /// for a gone one to refuse each of them (up to a connect timeout).
    pub fn read_copies_of(&mut self, executor_id: &str) {
        let outputs = self
            .stages
            .iter_mut()
            .flat_map(|stage| &mut stage.tasks)
            .filter_map(|task| task.output.as_mut());
        for output in outputs {
            let wrote_it = output
                .executor
                .as_ref()
                .is_some_and(|executor| executor.executor_id == executor_id);
            if wrote_it && !output.durable_location.is_empty() {
                output.executor = None;
            }
        }
    }

    /// Whether a map output on `executor_id` is still needed by this job.
    pub fn needs_outputs_on(&self, executor_id: &str) -> bool {
        !self.replanning
            && !self.settling
            && self
                .stages
                .iter()
                .zip(self.needed_stages())
                .filter(|(_, needed)| *needed)
                .flat_map(|(stage, _)| &stage.tasks)
                .any(|task| task.state == TaskState::Done && output_on(task, executor_id))
    }

    /// Executors holding the final stage's output.
    pub fn result_executors(&self) -> Vec<String> {
        let mut executors: Vec<String> = self
            .final_stage()
            .into_iter()
            .flat_map(|stage| &stage.tasks)
            .filter_map(|task| task.output.as_ref()?.executor.as_ref())
            .map(|executor| executor.executor_id.clone())
            .collect();
        executors.sort();
        executors.dedup();
        executors
    }

    /// For each stage, whether its outputs are still needed: it is the final
    /// stage, or a stage that reads it is not complete.
    fn needed_stages(&self) -> Vec<bool> {
        (0..self.stages.len())
            .map(|index| {
                let stage_id = index as u32 + 1;
                index + 1 == self.stages.len()
                    || self
                        .stages
                        .iter()
                        .any(|s| s.inputs.contains(&stage_id) && !s.is_complete())
            })
            .collect()
    }

    /// Fails the job; but while a commit of its write may act, the job
    /// fails only once none can ([`Job::defer_end`]), and if a commit may
    /// have committed, its write is settled first ([`Outcome::Settle`]).
    pub fn fail(&mut self, message: String) -> Outcome {
        // Kept in the job history and shown to clients: a store's refusal
        // may echo the request's credentials.
        let message = redact_store_echoes(&message).into_owned();
        if self.defer_end(DeferredEnd::Fail(message.clone()), Instant::now()) {
            return Outcome::Continue;
        }
        if self.settle_before_ending(DeferredEnd::Fail(message.clone())) {
            return Outcome::Settle;
        }
        let message = format!("{message}{}", self.lost_commit_warning());
        self.state = JobState::Failed;
        self.error.clone_from(&message);
        Outcome::Failed(message)
    }

    pub fn cancel(&mut self) {
        self.state = JobState::Cancelled;
        self.error = format!("job cancelled{}", self.lost_commit_warning());
    }

    /// Holds back `end` if a commit of the job's write was lost with its
    /// executor, or failed, and may have written its manifest; returns
    /// whether it did. Ending the job now would report it failed or
    /// cancelled with its rows possibly committed, and running its statement
    /// again would write them twice. So the scheduler settles the write
    /// first, off its loop (see [`Outcome::Settle`]), and
    /// [`Job::on_write_settled`] ends the job as that finds. Called once no
    /// commit can act any more ([`Job::defer_end`] said no).
    pub fn settle_before_ending(&mut self, end: DeferredEnd) -> bool {
        if self.lost_commit != LostCommit::Unknown || self.writes_to.is_none() || self.settling {
            return false;
        }
        self.deferred_end = Some(end);
        self.settling = true;
        for task in self.stages.iter_mut().flat_map(|stage| &mut stage.tasks) {
            if matches!(task.state, TaskState::Running { .. }) {
                task.state = TaskState::Pending;
            }
        }
        self.running = 0;
        true
    }

    /// Ends a job held back by [`Job::settle_before_ending`], as `settled`
    /// says its write was left: a commit that had written its manifest
    /// makes the job succeed with the row count the manifest records;
    /// otherwise the job ends as it was asked to. `Err` says why the write
    /// could not be settled: the job then says that it may have committed.
    pub fn on_write_settled(&mut self, settled: Result<Settled, String>) -> Outcome {
        if !self.settling {
            return Outcome::Continue;
        }
        self.settling = false;
        let end = self.deferred_end.take().unwrap_or(DeferredEnd::Cancel);
        self.lost_commit = match settled {
            Ok(Settled::Committed {
                written: Some(written),
            }) => {
                self.lost_commit = LostCommit::Settled;
                return self.succeed_with_count(written.rows);
            }
            Ok(Settled::Committed { written: None }) => LostCommit::CommittedUncounted,
            Ok(Settled::RolledBack { .. }) => LostCommit::Settled,
            Err(reason) => LostCommit::Unsettled(reason),
        };
        match end {
            DeferredEnd::Fail(message) => self.fail(message),
            DeferredEnd::Cancel => {
                self.cancel();
                Outcome::Cancelled
            }
        }
    }

    /// Ends the job succeeded, with the result its commit task would have
    /// returned for a write of `rows` rows: the commit's output, inline.
    fn succeed_with_count(&mut self, rows: u64) -> Outcome {
        let result = match write_result_ipc(rows) {
            Ok(result) => result,
            Err(e) => return self.fail(format!("cannot encode the write's row count: {e}")),
        };
        let Some([commit]) = self
            .stages
            .last_mut()
            .map(|stage| stage.tasks.as_mut_slice())
        else {
            return self.fail("a write's commit stage runs more than one task".into());
        };
        commit.state = TaskState::Done;
        commit.output = Some(MapOutput {
            map_partition: 0,
            attempt: commit.attempt,
            partitions: vec![PartitionStats {
                rows: 1,
                bytes: result.len() as u64,
            }],
            inline_result: result.into(),
            ..MapOutput::default()
        });
        self.state = JobState::Succeeded;
        Outcome::Succeeded
    }

    /// What an ending job says when a commit of its write was lost and may
    /// have finished, or had finished; nothing otherwise.
    fn lost_commit_warning(&self) -> String {
        let Some(table) = &self.writes_to else {
            return String::new();
        };
        let unread = match &self.lost_commit {
            LostCommit::Settled => return String::new(),
            LostCommit::CommittedUncounted => {
                return "; but a commit of its write, lost with its executor, had finished: \
                        its rows are in the table, so do not run the statement again"
                    .to_owned();
            }
            LostCommit::Unknown => String::new(),
            LostCommit::Unsettled(reason) => {
                format!(" (the scheduler could not settle the write: {reason})")
            }
        };
        format!(
            "; but a commit of its write was lost with its executor and may have \
             finished{unread}: if {table}_manifests/{}.json exists, its rows are in the \
             table, so check before running the statement again",
            self.id
        )
    }

    /// Executors that may hold or compute data of this job.
    pub fn executors(&self) -> Vec<String> {
        self.launched_on.iter().cloned().collect()
    }

    /// The job's entry in the history; `finished_at_unix_ms` is 0 while it runs.
    pub fn record(&self, finished_at_unix_ms: u64) -> JobRecord {
        let mut status = self.status();
        // Result locations mean nothing once the job's data is gone.
        status.result.clear();
        JobRecord {
            status: Some(status),
            query: self.query.clone(),
            submitted_at_unix_ms: self.submitted_at_unix_ms,
            finished_at_unix_ms,
            durable_shuffle: self.durable_shuffle.clone(),
            writes_to: self.writes_to.clone().unwrap_or_default(),
            write_unsettled: false,
            settle_failures: 0,
        }
    }

    pub fn status(&self) -> JobStatus {
        let result = if self.state == JobState::Succeeded {
            self.final_stage()
                .map(|stage| {
                    stage
                        .tasks
                        .iter()
                        .filter_map(|t| t.output.clone())
                        .collect()
                })
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let written = self.stages.iter().map(stage_written).fold(
            PartitionStats::default(),
            |total, stage| PartitionStats {
                rows: total.rows + stage.rows,
                bytes: total.bytes + stage.bytes,
            },
        );
        JobStatus {
            job_id: self.id.clone(),
            state: self.state.into(),
            stages_total: self.stages.len() as u32,
            stages_done: self.stages.iter().filter(|s| s.is_complete()).count() as u32,
            // An ended job's tasks still stopping are no longer its work.
            tasks_running: if super::is_final(self.state) {
                0
            } else {
                self.running as u32
            },
            error: self.error.clone(),
            result,
            elapsed_micros: self.started.elapsed().as_micros() as u64,
            result_stage: self.final_stage().map_or(0, |stage| stage.id),
            queue_position: self.queue_position,
            rows_written: written.rows,
            bytes_written: written.bytes,
            store_bytes_read: self.outputs().map(|output| output.store_bytes_read).sum(),
            store_requests: self.outputs().map(|output| output.store_requests).sum(),
            stages: self
                .stages
                .iter()
                .map(|stage| stage.metrics.clone())
                .collect(),
            table_files_written: self.metric_total("files_written"),
            table_bytes_written: self.metric_total("bytes_written"),
            replans: self.replans,
            committing: self.committing(Instant::now()),
            // Its error says so too (`lost_commit_warning`).
            write_committed: self.lost_commit == LostCommit::CommittedUncounted,
            result_rows: if self.state == JobState::Succeeded {
                self.final_stage()
                    .map_or(0, |stage| stage_written(stage).rows)
            } else {
                0
            },
        }
    }
}

impl Job {
    /// The sum of the operator metric `name` over every stage: what its
    /// successful task attempts reported.
    fn metric_total(&self, name: &str) -> u64 {
        self.stages
            .iter()
            .flat_map(|stage| &stage.metrics.operators)
            .flat_map(|operator| &operator.metrics)
            .filter(|metric| metric.name == name)
            .map(|metric| metric.value)
            .sum()
    }

    /// The outputs of the finished tasks.
    fn outputs(&self) -> impl Iterator<Item = &MapOutput> {
        self.stages
            .iter()
            .flat_map(|stage| &stage.tasks)
            .filter_map(|task| task.output.as_ref())
    }
}

/// The stores a job planned again runs with: its first plan's, options
/// included, for every location that plan had. Meanwhile another statement
/// may have configured a location anew, or a failed one put its options
/// back, and a job's tasks, commit and clean-up act with one set of
/// credentials from start to end (the new plan was made with them too, see
/// [`crate::planner::Replanner`]). A location new to the plan, which a plan
/// of the same tables has no reason to have, takes the environment's.
fn keep_job_options(first: Vec<StoreConfig>, replanned: Vec<StoreConfig>) -> Vec<StoreConfig> {
    let mut kept: Vec<StoreConfig> = replanned
        .into_iter()
        .filter(|location| !first.iter().any(|known| known.url == location.url))
        .collect();
    kept.splice(0..0, first);
    kept
}

/// The stages of `plans`, encoded as `encoded`, none of them started; their
/// tasks' first attempts are numbered `first_attempt`.
fn new_stages(
    plans: &[StagePlan],
    encoded: Vec<Bytes>,
    now: Instant,
    first_attempt: u32,
) -> Vec<Stage> {
    plans
        .iter()
        .zip(encoded)
        .map(|(stage, plan)| Stage {
            id: stage.stage_id,
            plan,
            inputs: stage.inputs.clone(),
            metrics: StageMetrics {
                stage_id: stage.stage_id,
                ..StageMetrics::default()
            },
            tasks: pending_tasks(stage.partitions(), now, first_attempt),
            launched: false,
        })
        .collect()
}

/// Whether `sink` writes one file, which a second attempt replaces whole.
fn writes_one_file(sink: &DataSinkExec) -> bool {
    let Some(config) = file_sink_config(sink) else {
        return false;
    };
    config
        .table_paths
        .first()
        .is_some_and(|path| config.file_output_mode.single_file_output(path))
}

/// `count` tasks that have not run yet, their first attempt numbered `attempt`.
fn pending_tasks(count: usize, now: Instant, attempt: u32) -> Vec<Task> {
    (0..count)
        .map(|_| Task {
            state: TaskState::Pending,
            attempt,
            failures: 0,
            output: None,
            not_before: now,
            avoid: None,
            committing: false,
            commit_stops_by: None,
        })
        .collect()
}

/// Rows and bytes in the finished outputs of a stage.
fn stage_written(stage: &Stage) -> PartitionStats {
    let mut total = PartitionStats::default();
    for partition in stage
        .tasks
        .iter()
        .filter_map(|task| task.output.as_ref())
        .flat_map(|output| &output.partitions)
    {
        total.rows += partition.rows;
        total.bytes += partition.bytes;
    }
    total
}

/// Whether the task's output lives only on `executor_id`: a durable copy,
/// an output that came back inline, and an empty one outlive the executor.
fn output_on(task: &Task, executor_id: &str) -> bool {
    task.output.as_ref().is_some_and(|output| {
        output.durable_location.is_empty()
            && output.inline_result.is_empty()
            && !is_empty(output)
            && output
                .executor
                .as_ref()
                .is_some_and(|executor| executor.executor_id == executor_id)
    })
}

/// Whether a map output holds no data: readers skip it.
fn is_empty(output: &MapOutput) -> bool {
    !output.partitions.is_empty() && output.partitions.iter().all(|stats| stats.bytes == 0)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_plan::empty::EmptyExec;
    use quiver_core::shuffle::ShuffleWriterExec;
    use quiver_proto::ExecutorAddress;
    use quiver_proto::submit_job_request::Query;

    use super::*;
    use crate::adaptive::AdaptivePolicy;
    use crate::planner::{Planned, Planner};
    use crate::store::StateStore;

    /// A chain of `stages` stages of two tasks each, stage `n` reading stage `n - 1`.
    fn chain(stages: u32) -> Job {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let plans: Vec<StagePlan> = (1..=stages)
            .map(|id| StagePlan {
                stage_id: id,
                plan: Arc::new(ShuffleWriterExec::new(
                    "job",
                    id,
                    Arc::new(EmptyExec::new(Arc::clone(&schema)).with_partitions(2)),
                    None,
                )),
                inputs: if id > 1 { vec![id - 1] } else { vec![] },
            })
            .collect();
        job_of(&plans)
    }

    /// A job of `plans`, allowed two attempts per task.
    fn job_of(plans: &[StagePlan]) -> Job {
        let encoded = vec![Bytes::new(); plans.len()];
        let limits = JobLimits {
            max_attempts: 2,
            ..JobLimits::default()
        };
        Job::new(
            "job".into(),
            0,
            vec![],
            limits,
            plans,
            encoded,
            Instant::now(),
        )
    }

    /// Runs every task of every stage but the last on `executor`; returns
    /// the last stage's id.
    fn run_all_but_last(job: &mut Job, executor: &str) -> u32 {
        let last = job.stages.len() as u32;
        for stage in 1..last {
            for partition in 0..job.stages[stage as usize - 1].tasks.len() {
                run_task(job, stage, partition, executor);
            }
        }
        last
    }

    /// The one stage of a job whose one task scans, writes and commits.
    fn single_task_stage() -> StagePlan {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        StagePlan {
            stage_id: 1,
            plan: Arc::new(ShuffleWriterExec::new(
                "job",
                1,
                Arc::new(EmptyExec::new(schema)),
                None,
            )),
            inputs: vec![],
        }
    }

    fn run_task(job: &mut Job, stage: u32, partition: usize, executor: &str) {
        let launch = job.launch(stage, partition, executor).expect("launchable");
        let output = MapOutput {
            map_partition: partition as u32,
            executor: Some(ExecutorAddress {
                executor_id: executor.into(),
                ..ExecutorAddress::default()
            }),
            attempt: launch.task.as_ref().map_or(0, |t| t.attempt),
            partitions: vec![],
            durable_location: if launch.durable_shuffle.is_empty() {
                String::new()
            } else {
                format!("{}/job/{stage}/{partition}", launch.durable_shuffle)
            },
            ..MapOutput::default()
        };
        job.on_success(
            &launch.task.expect("task id"),
            output,
            &TaskSucceeded::default(),
        );
    }

    fn state(job: &Job, stage: u32, partition: usize) -> &TaskState {
        &job.stages[stage as usize - 1].tasks[partition].state
    }

    #[test]
    fn executor_loss_recomputes_every_needed_output() {
        let mut job = chain(3);
        for stage in 1..=2 {
            run_task(&mut job, stage, 0, "a");
            run_task(&mut job, stage, 1, "b");
        }
        job.launch(3, 0, "b").expect("final stage runs");
        assert_eq!(
            job.on_executor_lost("a", Instant::now(), Instant::now()),
            Outcome::Continue
        );
        // Stage 2's output on `a` is needed by stage 3; recomputing it needs
        // stage 1's output on `a` again, even though stage 2 had been complete.
        assert_eq!(state(&job, 2, 0), &TaskState::Pending);
        assert_eq!(state(&job, 1, 0), &TaskState::Pending);
        assert_eq!(state(&job, 1, 1), &TaskState::Done);
        assert_eq!(
            job.next_runnable(Instant::now()).map(|(s, p, _)| (s, p)),
            Some((1, 0))
        );
    }

    #[test]
    fn durable_outputs_outlive_their_executor() {
        let mut job = chain(3);
        job.durable_shuffle = "s3://bucket/shuffle".into();
        for stage in 1..=2 {
            run_task(&mut job, stage, 0, "a");
            run_task(&mut job, stage, 1, "b");
        }
        let last = job.launch(3, 0, "b").expect("final stage runs");
        assert!(
            last.durable_shuffle.is_empty(),
            "the client reads final outputs from executors"
        );
        assert!(!job.needs_outputs_on("a"), "a may drain at once");
        assert_eq!(
            job.on_executor_lost("a", Instant::now(), Instant::now()),
            Outcome::Continue
        );
        for stage in 1..=2 {
            for partition in 0..2 {
                assert_eq!(state(&job, stage, partition), &TaskState::Done);
            }
        }
        // Readers launched from now on read a's outputs from their copies,
        // and still ask b, which lives, for its own.
        let next = job.launch(3, 1, "b").expect("final stage runs");
        let servers: Vec<Option<&str>> = next.inputs[0]
            .outputs
            .iter()
            .map(|output| output.executor.as_ref().map(|e| e.executor_id.as_str()))
            .collect();
        assert_eq!(servers, [None, Some("b")]);
    }

    /// The commit task of a write lost with its executor is retried without
    /// recomputing the write tasks whose file lists came back inline (or
    /// that wrote nothing): they would read the table again, and an
    /// overwrite that got past its manifest deleted its files.
    #[test]
    fn write_tasks_file_lists_outlive_their_executor() {
        let mut job = chain(2);
        job.writes_to = Some("s3://bucket/table/".into());
        let outputs = [
            MapOutput {
                partitions: vec![PartitionStats {
                    rows: 1,
                    bytes: 300,
                }],
                inline_result: vec![1; 300].into(),
                ..MapOutput::default()
            },
            MapOutput {
                map_partition: 1,
                partitions: vec![PartitionStats { rows: 0, bytes: 0 }],
                ..MapOutput::default()
            },
        ];
        for (partition, mut output) in outputs.into_iter().enumerate() {
            let launch = job.launch(1, partition, "a").expect("write task runs");
            assert_eq!(launch.inline_result_max_bytes, 1024 * 1024);
            assert_eq!(
                launch.large_output_location, "",
                "its plan writes no Parquet: its output is not a file list"
            );
            output.executor = Some(ExecutorAddress {
                executor_id: "a".into(),
                ..ExecutorAddress::default()
            });
            let id = launch.task.expect("task id");
            output.attempt = id.attempt;
            job.on_success(&id, output, &TaskSucceeded::default());
        }
        let commit = job.launch(2, 0, "a").expect("commit runs");
        assert_eq!(commit.inputs[0].outputs[0].inline_result.len(), 300);
        assert!(!job.needs_outputs_on("a"));
        assert_eq!(
            job.on_executor_lost("a", Instant::now(), Instant::now()),
            Outcome::Continue
        );
        assert_eq!(state(&job, 1, 0), &TaskState::Done);
        assert_eq!(state(&job, 1, 1), &TaskState::Done);
        assert_eq!(state(&job, 2, 0), &TaskState::Pending);

        // Other jobs' map outputs stay on their executors.
        let mut query = chain(2);
        let launch = query.launch(1, 0, "a").expect("map task runs");
        assert_eq!(launch.inline_result_max_bytes, 0);
    }

    #[test]
    fn a_task_lost_on_its_last_attempt_fails_the_job() {
        let mut job = chain(1);
        job.launch(1, 0, "a").expect("runs");
        assert_eq!(
            job.on_executor_lost("a", Instant::now(), Instant::now()),
            Outcome::Continue
        );
        job.launch(1, 0, "b").expect("runs again");
        assert!(matches!(
            job.on_executor_lost("b", Instant::now(), Instant::now()),
            Outcome::Failed(_)
        ));
    }

    #[test]
    fn a_stale_attempt_report_changes_nothing() {
        let mut job = chain(1);
        let first = job.launch(1, 0, "a").expect("runs").task.expect("id");
        job.on_executor_lost("a", Instant::now(), Instant::now());
        job.launch(1, 0, "b").expect("runs again");
        let output = MapOutput::default();
        assert_eq!(
            job.on_success(&first, output, &TaskSucceeded::default()),
            Outcome::Continue
        );
        assert!(matches!(state(&job, 1, 0), TaskState::Running { .. }));
    }

    #[test]
    fn a_failed_job_keeps_no_credentials_that_a_store_echoed() {
        let mut job = chain(1);
        let id = job.launch(1, 0, "a").expect("runs").task.expect("id");
        let refused = TaskFailed {
            kind: FailureKind::Fatal.into(),
            message: "cannot write to 's3://lake/out/': 403 Forbidden: <Error>\
                      <Code>SignatureDoesNotMatch</Code><AWSAccessKeyId>AKIAEXAMPLE</AWSAccessKeyId>\
                      <CanonicalRequest>x-amz-security-token:SESSIONTOKEN</CanonicalRequest></Error>"
                .into(),
            fetch: None,
        };
        let Outcome::Failed(message) = job.on_failure(&id, &refused, Instant::now()) else {
            panic!("a fatal failure fails the job");
        };
        for shown in [&message, &job.error] {
            assert!(shown.contains("SignatureDoesNotMatch"), "{shown}");
            assert!(
                !shown.contains("AKIAEXAMPLE") && !shown.contains("SESSIONTOKEN"),
                "{shown}"
            );
        }
    }

    /// Reports a launched task as finished with `bytes` in one partition.
    fn finish_writing(job: &mut Job, launch: LaunchTask, bytes: u64) {
        finish_writing_rows(job, launch, PartitionStats { rows: 1, bytes });
    }

    fn finish_writing_rows(job: &mut Job, launch: LaunchTask, written: PartitionStats) {
        let id = launch.task.expect("task id");
        let output = MapOutput {
            map_partition: id.partition,
            attempt: id.attempt,
            partitions: vec![written],
            ..MapOutput::default()
        };
        job.on_success(&id, output, &TaskSucceeded::default());
    }

    fn run_task_writing(job: &mut Job, stage: u32, partition: usize, bytes: u64) {
        run_task_writing_rows(job, stage, partition, PartitionStats { rows: 1, bytes });
    }

    fn run_task_writing_rows(job: &mut Job, stage: u32, partition: usize, written: PartitionStats) {
        let launch = job.launch(stage, partition, "a").expect("launchable");
        finish_writing_rows(job, launch, written);
    }

    /// The job of [`crate::adaptive::tests::FILTERED_JOIN`]: stage 3 joins
    /// the build side of stage 1 with the probe side of stage 2.
    async fn adaptive_job() -> Job {
        let plans = adaptive::tests::stages_of(adaptive::tests::FILTERED_JOIN).await;
        let mut job = job_of(&plans);
        let policy = AdaptivePolicy {
            always_bytes: 1024,
            max_bytes: 1024,
            swaps_build_sides: true,
        };
        job.adaptive = PendingJoins::new(&plans, Some(policy), None);
        let expected = AdaptiveJoin {
            join_stage: 3,
            build_stage: 1,
            probe_stage: 2,
        };
        assert_eq!(
            adaptive::adaptive_joins(&plans),
            vec![expected],
            "{}",
            crate::stages::display_stages(&plans)
        );
        job
    }

    fn runnable_stage(job: &Job) -> Option<u32> {
        job.next_runnable(Instant::now()).map(|(stage, ..)| stage)
    }

    #[tokio::test]
    async fn a_small_build_side_moves_the_probe_stage_into_a_broadcast_join() {
        let mut job = adaptive_job().await;
        run_task_writing(&mut job, 1, 0, 100);
        let last = job.launch(1, 1, "b").expect("build side first");
        assert_eq!(runnable_stage(&job), None, "the probe side waits");
        finish_writing(&mut job, last, 100);
        let probe = &job.stages[1];
        assert!(probe.tasks.is_empty(), "the probe stage runs no task");
        assert_eq!(probe.metrics.merged_into, 3);
        assert!(probe.is_complete());
        assert_eq!(job.stages[2].inputs, vec![1]);
        assert_eq!(job.stages[2].tasks.len(), 2);
        assert!(
            !job.stages[2].plan.is_empty(),
            "the join stage was encoded again"
        );
        assert_eq!(runnable_stage(&job), Some(3));
    }

    #[tokio::test]
    async fn a_large_build_side_releases_the_probe_stage() {
        let mut job = adaptive_job().await;
        run_task_writing(&mut job, 1, 0, 1000);
        assert_eq!(runnable_stage(&job), Some(1));
        run_task_writing(&mut job, 1, 1, 1000);
        assert_eq!(runnable_stage(&job), Some(2), "2000 bytes: no broadcast");
        assert_eq!(job.stages[1].tasks.len(), 2);
        assert_eq!(job.stages[2].inputs, vec![1, 2]);
        assert!(
            job.stages[2].plan.is_empty(),
            "the join stage is as planned"
        );
    }

    #[tokio::test]
    async fn a_join_builds_from_the_side_that_wrote_fewer_rows() {
        let mut job = adaptive_job().await;
        let wide = PartitionStats {
            rows: 1000,
            bytes: 5000,
        };
        run_task_writing_rows(&mut job, 1, 0, wide);
        run_task_writing_rows(&mut job, 1, 1, wide);
        let narrow = PartitionStats {
            rows: 10,
            bytes: 5000,
        };
        run_task_writing_rows(&mut job, 2, 0, narrow);
        assert!(job.stages[2].plan.is_empty(), "one probe task still runs");
        run_task_writing_rows(&mut job, 2, 1, narrow);
        let join = &job.stages[2];
        assert_eq!(join.metrics.swapped_builds, vec![1]);
        assert!(!join.plan.is_empty(), "the join stage was encoded again");
        assert_eq!(join.inputs.len(), 2);
        assert_eq!(runnable_stage(&job), Some(3));
        let plan = job
            .plans
            .iter()
            .find(|plan| plan.stage_id == 3)
            .expect("stage 3");
        let text = datafusion::physical_plan::displayable(plan.plan.as_ref())
            .indent(false)
            .to_string();
        let (build, probe) = (
            text.find("ShuffleReaderExec: stage=2")
                .expect("reads stage 2"),
            text.find("ShuffleReaderExec: stage=1")
                .expect("reads stage 1"),
        );
        assert!(build < probe, "stage 2 now builds:\n{text}");
    }

    #[tokio::test]
    async fn a_join_keeps_its_build_side_when_that_wrote_fewer_rows() {
        let mut job = adaptive_job().await;
        run_task_writing(&mut job, 1, 0, 1000);
        run_task_writing(&mut job, 1, 1, 1000);
        run_task_writing_rows(&mut job, 2, 0, PartitionStats { rows: 5, bytes: 10 });
        run_task_writing_rows(&mut job, 2, 1, PartitionStats { rows: 5, bytes: 10 });
        assert!(job.stages[2].metrics.swapped_builds.is_empty());
        assert!(
            job.stages[2].plan.is_empty(),
            "the join stage is as planned"
        );
    }

    /// TPC-H Q17's shape: stage 1 is the filtered `dims` (the keys), stage 2
    /// aggregates `facts` (the scan they filter), and stage 3 joins them.
    async fn reduction_job() -> Job {
        let sql = "SELECT sum(d.v) FROM dims d WHERE d.v > 10 \
             AND d.v < (SELECT sum(f.v) FROM facts f WHERE f.k = d.k)";
        let plans = adaptive::tests::stages_of_tables(sql, 50).await;
        let mut job = job_of(&plans);
        let policy = AdaptivePolicy {
            always_bytes: 1024,
            max_bytes: 4096,
            swaps_build_sides: true,
        };
        job.adaptive = PendingJoins::new(&plans, None, Some(policy));
        let expected = Reduction {
            join_stage: 3,
            key_stage: 1,
            scan_stage: 2,
        };
        assert_eq!(
            reduction::reductions(&plans, &[]),
            vec![expected],
            "{}",
            crate::stages::display_stages(&plans)
        );
        job
    }

    #[tokio::test]
    async fn a_small_key_stage_filters_the_scan_that_waited_for_it() {
        let mut job = reduction_job().await;
        run_task_writing(&mut job, 1, 0, 100);
        let last = job.launch(1, 1, "b").expect("the key stage first");
        assert_eq!(runnable_stage(&job), None, "the scan stage waits");
        finish_writing(&mut job, last, 100);
        let scan = &job.stages[1];
        assert_eq!(scan.metrics.reduced_by, 1);
        assert_eq!(scan.inputs, vec![1], "it reads the key stage");
        assert!(!scan.plan.is_empty(), "the scan stage was encoded again");
        assert_eq!(runnable_stage(&job), Some(2));
    }

    #[tokio::test]
    async fn a_key_stage_too_large_to_read_in_every_task_releases_the_scan() {
        let mut job = reduction_job().await;
        run_task_writing(&mut job, 1, 0, 3000);
        run_task_writing(&mut job, 1, 1, 3000);
        let scan = &job.stages[1];
        assert_eq!(scan.metrics.reduced_by, 0, "6000 bytes: over the limit");
        assert!(scan.inputs.is_empty());
        assert!(scan.plan.is_empty(), "the scan stage is as planned");
        assert_eq!(runnable_stage(&job), Some(2));
    }

    fn fetch_failed(stage: u32, map_partition: u32, attempt: u32, executor: &str) -> TaskFailed {
        TaskFailed {
            kind: FailureKind::FetchFailed.into(),
            message: "connection refused".into(),
            fetch: Some(FetchFailure {
                stage_id: stage,
                map_partition,
                attempt,
                executor_id: executor.into(),
            }),
        }
    }

    #[test]
    fn a_fetch_failure_recomputes_exactly_the_missing_output() {
        let mut job = chain(2);
        run_task(&mut job, 1, 0, "a");
        run_task(&mut job, 1, 1, "b");
        let reader = job.launch(2, 0, "b").expect("runs").task.expect("id");
        let outcome = job.on_failure(&reader, &fetch_failed(1, 0, 0, "a"), Instant::now());
        assert_eq!(outcome, Outcome::Continue);
        assert_eq!(state(&job, 1, 0), &TaskState::Pending);
        assert_eq!(state(&job, 1, 1), &TaskState::Done);
        assert_eq!(state(&job, 2, 0), &TaskState::Pending);
        // The reader has not used up an attempt, and waits for its input.
        assert_eq!(job.stages[1].tasks[0].failures, 0);
        let next = job.next_runnable(Instant::now());
        assert_eq!(next, Some((1, 0, Some("a"))));
        // A second reader reporting the same lost output changes nothing more.
        run_task(&mut job, 1, 0, "b");
        assert_eq!(job.stages[0].tasks[0].failures, 1);
        let stale = fetch_failed(1, 0, 0, "a");
        let other = job.launch(2, 1, "b").expect("runs").task.expect("id");
        assert_eq!(
            job.on_failure(&other, &stale, Instant::now()),
            Outcome::Continue
        );
        assert_eq!(state(&job, 1, 0), &TaskState::Done);
    }

    #[test]
    fn an_output_that_can_never_be_read_fails_the_job() {
        let mut job = chain(2);
        run_task(&mut job, 1, 1, "b");
        for _ in 0..job.max_attempts {
            run_task(&mut job, 1, 0, "a");
            let attempt = job.stages[0].tasks[0].attempt;
            let reader = job.launch(2, 0, "b").expect("runs").task.expect("id");
            let outcome =
                job.on_failure(&reader, &fetch_failed(1, 0, attempt, "a"), Instant::now());
            if let Outcome::Failed(message) = outcome {
                assert!(message.contains("could not be read"), "{message}");
                return;
            }
        }
        panic!("the job kept retrying an unreadable output");
    }

    #[test]
    fn retryable_failures_back_off_and_avoid_the_executor_then_fail() {
        let mut job = chain(1);
        let now = Instant::now();
        let failure = TaskFailed {
            kind: FailureKind::Retryable.into(),
            message: "disk full".into(),
            fetch: None,
        };
        run_task(&mut job, 1, 1, "b");
        let first = job.launch(1, 0, "a").expect("runs").task.expect("id");
        assert_eq!(job.on_failure(&first, &failure, now), Outcome::Continue);
        assert_eq!(
            job.next_runnable(now),
            None,
            "the retry waits for its backoff"
        );
        let later = now + RETRY_BACKOFF;
        assert_eq!(job.next_runnable(later), Some((1, 0, Some("a"))));
        let second = job.launch(1, 0, "b").expect("runs").task.expect("id");
        let Outcome::Failed(message) = job.on_failure(&second, &failure, later) else {
            panic!("the attempt limit is 2");
        };
        assert!(message.contains("after 2 attempts: disk full"), "{message}");
    }

    /// A write into a folder through a sink that stages nothing (CSV here)
    /// is not run twice: a failed or lost attempt fails the job. A Parquet
    /// folder's write tasks, whose files only the commit makes visible, and
    /// a single CSV file, which a second attempt replaces whole, retry.
    #[tokio::test]
    async fn a_write_that_stages_nothing_is_not_run_twice() {
        let (_, folder, planner) = counting_job_and_planner().await;
        let out = folder.path().join("out");
        let job_writing = |sql: String| {
            let planner = planner.clone();
            async move {
                let Planned::Stages(planned) = planner
                    .plan("job", Query::Sql(sql), &[])
                    .await
                    .expect("plan")
                else {
                    panic!("a write runs on the executors");
                };
                job_of(&planned.stages)
            }
        };
        let failure = TaskFailed {
            kind: FailureKind::Retryable.into(),
            message: "connection reset".into(),
            fetch: None,
        };
        let now = Instant::now();
        let mut csv = job_writing(format!(
            "COPY (SELECT x FROM t) TO '{}/csv/' STORED AS CSV",
            out.display()
        ))
        .await;
        let last = run_all_but_last(&mut csv, "a");
        let sink = csv.launch(last, 0, "a").expect("runs").task.expect("id");
        let Outcome::Failed(message) = csv.on_failure(&sink, &failure, now) else {
            panic!("a CSV folder write must not be retried");
        };
        assert!(
            message.contains("connection reset") && message.contains("stages nothing"),
            "{message}"
        );

        let mut lost = job_writing(format!(
            "COPY (SELECT x FROM t) TO '{}/lost/' STORED AS CSV",
            out.display()
        ))
        .await;
        run_all_but_last(&mut lost, "a");
        lost.launch(last, 0, "b").expect("runs");
        let Outcome::Failed(message) = lost.on_executor_lost("b", now, now) else {
            panic!("a CSV folder write lost with its executor must not run again");
        };
        assert!(message.contains("stages nothing"), "{message}");

        // Nor when it could not read its input: it may have written files.
        let mut starved = job_writing(format!(
            "COPY (SELECT x FROM t) TO '{}/starved/' STORED AS CSV",
            out.display()
        ))
        .await;
        run_all_but_last(&mut starved, "a");
        let sink = starved
            .launch(last, 0, "b")
            .expect("runs")
            .task
            .expect("id");
        let Outcome::Failed(message) =
            starved.on_failure(&sink, &fetch_failed(last - 1, 0, 0, "a"), now)
        else {
            panic!("a CSV folder write whose input was lost must not run again");
        };
        assert!(message.contains("stages nothing"), "{message}");

        for sql in [
            format!(
                "COPY (SELECT x FROM t) TO '{}/one.csv' STORED AS CSV",
                out.display()
            ),
            format!(
                "COPY (SELECT x FROM t) TO '{}/parquet/' STORED AS PARQUET",
                out.display()
            ),
        ] {
            let mut job = job_writing(sql.clone()).await;
            let last = job.stages.len() as u32;
            for stage in 1..=last {
                let sink = job.launch(stage, 0, "a").expect("runs").task.expect("id");
                assert_eq!(
                    job.on_failure(&sink, &failure, now),
                    Outcome::Continue,
                    "{sql}: stage {stage}"
                );
                for partition in 0..job.stages[stage as usize - 1].tasks.len() {
                    run_task(&mut job, stage, partition, "a");
                }
            }
        }
    }

    #[test]
    fn a_fatal_failure_fails_the_job_with_the_users_message() {
        let mut job = chain(1);
        let failure = TaskFailed {
            kind: FailureKind::Fatal.into(),
            message: "Schema error: no field named x".into(),
            fetch: None,
        };
        let task = job.launch(1, 0, "a").expect("runs").task.expect("id");
        assert_eq!(
            job.on_failure(&task, &failure, Instant::now()),
            Outcome::Failed("Schema error: no field named x".into())
        );
    }

    /// A job of a grouped count over a Parquet folder of two files, planned
    /// by a real planner, which can plan it again; the folder goes with it.
    async fn counting_job() -> (Job, tempfile::TempDir) {
        let (job, folder, _) = counting_job_and_planner().await;
        (job, folder)
    }

    /// [`counting_job`], with the planner that planned it.
    async fn counting_job_and_planner() -> (Job, tempfile::TempDir, Planner) {
        let folder = tempfile::tempdir().expect("temp folder");
        let table = folder.path().display().to_string();
        let context = datafusion::prelude::SessionContext::new();
        for file in ["a", "b"] {
            context
                .sql(&format!("COPY (SELECT 1 AS x) TO '{table}/{file}.parquet'"))
                .await
                .expect("copy")
                .collect()
                .await
                .expect("write");
        }
        let store = StateStore::in_memory().expect("store");
        let planner = Planner::new(2, store, "/tmp/quiver-warehouse/".into()).expect("planner");
        let ddl = format!("CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{table}/'");
        planner
            .plan("ddl", Query::Sql(ddl), &[])
            .await
            .expect("table");
        let sql = Query::Sql("SELECT x, count(*) FROM t GROUP BY x".into());
        let Planned::Stages(planned) = planner.plan("job", sql, &[]).await.expect("plan") else {
            panic!("a query runs on the executors");
        };
        let mut job = job_of(&planned.stages);
        job.stages
            .iter_mut()
            .zip(planned.encoded)
            .for_each(|(stage, encoded)| stage.plan = encoded);
        job.replanner = planned.replanner;
        (job, folder, planner)
    }

    fn input_replaced() -> TaskFailed {
        TaskFailed {
            kind: FailureKind::InputReplaced.into(),
            message: "'file:///t/a.parquet' was deleted after this statement was planned".into(),
            fetch: None,
        }
    }

    /// The job's new plan, as the event loop gets it.
    async fn plan_again(job: &Job) -> StagedJob {
        let replanner = job.replanner.clone().expect("a query can be planned again");
        replanner.plan().await.expect("plan again")
    }

    #[tokio::test]
    async fn a_job_that_lost_a_file_runs_again_from_a_new_plan() {
        let (mut job, _folder) = counting_job().await;
        assert!(job.stages.len() >= 2, "a scan stage and the final counts");
        let now = Instant::now();
        let first = job.launch(1, 0, "a").expect("runs").task.expect("id");
        let other = job.launch(1, 1, "b").expect("runs").task.expect("id");
        assert_eq!(
            job.on_failure(&first, &input_replaced(), now),
            Outcome::Replan(input_replaced().message)
        );
        // Nothing of the abandoned plan runs, or counts once it reports.
        assert_eq!(job.running, 0);
        assert_eq!(job.next_runnable(now), None);
        assert!(!job.needs_outputs_on("b"));
        let output = MapOutput {
            attempt: other.attempt,
            ..MapOutput::default()
        };
        assert_eq!(
            job.on_success(&other, output, &TaskSucceeded::default()),
            Outcome::Continue
        );
        assert_eq!(state(&job, 1, 1), &TaskState::Pending);
        assert_eq!(job.on_executor_lost("b", now, now), Outcome::Continue);

        // The stores the job ran with stay, whatever is configured now.
        let ran_with = vec![StoreConfig {
            url: "file:///".into(),
            options: [("aws.region".into(), "as-first-planned".into())].into(),
        }];
        job.stores = ran_with.clone();
        job.install_replan(plan_again(&job).await, now);
        assert_eq!(job.stores, ran_with);
        assert_eq!(job.replans, 1);
        assert_eq!(job.status().replans, 1);
        let (stage, partition, _) = job.next_runnable(now).expect("the new plan runs");
        let relaunched = job.launch(stage, partition, "b").expect("runs");
        let attempt = relaunched.task.expect("id").attempt;
        assert!(
            attempt > first.attempt && attempt > other.attempt,
            "attempt {attempt} repeats one of the abandoned plan"
        );
        // A late report of the abandoned attempt is not taken for the new one.
        assert_eq!(
            job.on_failure(&first, &input_replaced(), now),
            Outcome::Continue
        );
        assert_eq!(job.running, 1);
    }

    #[tokio::test]
    async fn a_job_whose_files_keep_being_replaced_fails_saying_so() {
        let (mut job, _folder) = counting_job().await;
        let now = Instant::now();
        for _ in 0..MAX_REPLANS {
            let task = job.launch(1, 0, "a").expect("runs").task.expect("id");
            let outcome = job.on_failure(&task, &input_replaced(), now);
            assert!(matches!(outcome, Outcome::Replan(_)), "{outcome:?}");
            job.install_replan(plan_again(&job).await, now);
        }
        let task = job.launch(1, 0, "a").expect("runs").task.expect("id");
        let Outcome::Failed(message) = job.on_failure(&task, &input_replaced(), now) else {
            panic!("planned again without end");
        };
        assert!(
            message.contains("kept being replaced while it ran (it was planned 4 times)")
                && message.contains("was deleted after this statement was planned"),
            "{message}"
        );
    }

    /// A write whose commit started may have made its files visible: it
    /// fails rather than write again from a new plan; unless it is the
    /// commit's own first attempt that failed reading.
    #[tokio::test]
    async fn a_write_is_not_planned_again_once_its_commit_started() {
        let (mut job, _folder) = counting_job().await;
        job.writes_to = Some("file:///tmp/target/".into());
        let last = run_all_but_last(&mut job, "a");
        let commit = job.launch(last, 0, "a").expect("runs").task.expect("id");
        assert_eq!(
            job.on_failure(&commit, &input_replaced(), Instant::now()),
            Outcome::Failed(input_replaced().message)
        );

        // One task scans, writes and commits.
        let single = single_task_stage();
        let mut write = job_of(&[single]);
        write.writes_to = job.writes_to.clone();
        write.replanner = job.replanner.clone();
        let now = Instant::now();
        let lost = write.launch(1, 0, "a").expect("runs").task.expect("id");
        assert_eq!(write.on_executor_lost("a", now, now), Outcome::Continue);
        let retried = write.launch(1, 0, "b").expect("runs").task.expect("id");
        assert!(retried.attempt > lost.attempt);
        assert_eq!(
            write.on_failure(&retried, &input_replaced(), now),
            Outcome::Failed(input_replaced().message),
            "the lost attempt may have committed"
        );
        let mut write = job_of(&write.plans.clone());
        write.writes_to = job.writes_to.clone();
        write.replanner = job.replanner.clone();
        let first = write.launch(1, 0, "a").expect("runs").task.expect("id");
        assert!(matches!(
            write.on_failure(&first, &input_replaced(), now),
            Outcome::Replan(_)
        ));
    }

    /// A new plan reads the tables' files as they are now, but not a table
    /// dropped or defined anew meanwhile with its old definition.
    #[tokio::test]
    async fn a_table_dropped_or_defined_anew_is_not_planned_again() {
        let (job, folder, planner) = counting_job_and_planner().await;
        let replanner = job.replanner.clone().expect("a query can be planned again");
        let run = |sql: String| {
            let planner = planner.clone();
            async move { planner.plan("ddl", Query::Sql(sql), &[]).await.map(|_| ()) }
        };
        replanner.plan().await.expect("the table is unchanged");
        let table = folder.path().display();
        run("DROP TABLE t".into()).await.expect("drop");
        let error = replanner.plan().await.expect_err("dropped");
        assert!(
            error
                .to_string()
                .contains("table 't' was dropped or defined anew"),
            "{error}"
        );
        // Declared again alike: the same table.
        let same = format!("CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{table}/'");
        run(same).await.expect("create");
        replanner.plan().await.expect("defined alike");
        run("DROP TABLE t".into()).await.expect("drop");
        let other = tempfile::tempdir().expect("temp folder");
        let elsewhere = format!(
            "CREATE EXTERNAL TABLE t (x BIGINT) STORED AS PARQUET LOCATION '{}/'",
            other.path().display()
        );
        run(elsewhere).await.expect("create");
        assert!(replanner.plan().await.is_err(), "another folder");

        // A write through a sink that stages nothing is not planned again.
        let copy = format!("COPY (SELECT 1 AS x) TO '{}/out.csv' STORED AS CSV", table);
        let Planned::Stages(copy) = planner
            .plan("copy", Query::Sql(copy), &[])
            .await
            .expect("plan")
        else {
            panic!("a copy runs on the executors");
        };
        assert!(copy.replanner.is_none());
    }

    /// The write tasks of an `INSERT`, and only they, are told where to copy
    /// a file list too large to come back inline.
    #[tokio::test]
    async fn write_tasks_copy_large_file_lists_into_the_staging_folder() {
        let (_, folder, planner) = counting_job_and_planner().await;
        let insert = Query::Sql("INSERT INTO t SELECT x + 1 FROM t ORDER BY x".into());
        let Planned::Stages(planned) = planner.plan("job", insert, &[]).await.expect("plan") else {
            panic!("an insert runs on the executors");
        };
        let mut job = job_of(&planned.stages);
        job.writes_to = planned.writes_to.clone();
        let staging = format!("file://{}/_temporary", folder.path().display());
        let mut told = Vec::new();
        for stage in &planned.stages {
            let launch = job.launch(stage.stage_id, 0, "a").expect("runs");
            told.push((
                job.writes_parquet(stage.stage_id),
                launch.large_output_location,
            ));
        }
        assert!(
            told.iter().any(|(writes, _)| *writes),
            "{}",
            planned.stages.len()
        );
        for (writes, location) in told {
            assert_eq!(
                location,
                if writes {
                    staging.clone()
                } else {
                    String::new()
                }
            );
        }
        let writers = planned
            .stages
            .iter()
            .filter(|stage| job.writes_parquet(stage.stage_id))
            .count();
        assert_eq!(writers, 1, "{}", planned.stages.len());
    }

    /// The time tests give an allowed commit to act.
    const COMMIT_TIME: Duration = Duration::from_secs(1800);

    /// A commit asks before it changes its table: only the running attempt
    /// of a job that nobody asked to end may. The job then counts as
    /// committing until the attempt reports, or until the lease of the
    /// executor it was lost with has run out.
    #[tokio::test]
    async fn only_the_running_attempt_of_a_live_job_may_commit() {
        let (mut job, _folder) = counting_job().await;
        job.writes_to = Some("file:///tmp/target/".into());
        let last = run_all_but_last(&mut job, "a");
        let now = Instant::now();
        let commit = job.launch(last, 0, "c").expect("runs").task.expect("id");
        assert!(!job.committing(now), "not before it is allowed");
        assert!(
            job.allow_commit(&commit, "b", false, Instant::now() + COMMIT_TIME)
                .is_err(),
            "another executor"
        );
        let later = TaskId {
            attempt: commit.attempt + 1,
            ..commit.clone()
        };
        assert!(
            job.allow_commit(&later, "c", false, Instant::now() + COMMIT_TIME)
                .is_err(),
            "another attempt"
        );
        job.allow_commit(&commit, "c", false, Instant::now() + COMMIT_TIME)
            .expect("allowed");
        assert!(job.committing(now));
        assert!(job.status().committing);

        let lease_end = now + Duration::from_secs(3);
        assert_eq!(job.on_executor_lost("c", now, lease_end), Outcome::Continue);
        assert!(job.committing(now), "the lost executor may still commit");
        // No second commit runs beside it: its next attempt waits for the
        // lease to run out.
        let retry = &job.stages[last as usize - 1].tasks[0];
        assert_eq!(retry.state, TaskState::Pending);
        assert_eq!(retry.not_before, lease_end);
        assert_ne!(
            job.next_runnable(now)
                .map(|(stage, partition, _)| (stage, partition)),
            Some((last, 0))
        );
        assert!(!job.committing(lease_end));
        assert_eq!(
            job.next_runnable(lease_end)
                .map(|(stage, partition, _)| (stage, partition)),
            Some((last, 0))
        );

        // Asked to end while it runs, it may only finish a commit made
        // earlier; and nothing else runs.
        let retried = job.launch(last, 0, "b").expect("runs").task.expect("id");
        job.deferred_end = Some(DeferredEnd::Cancel);
        assert_eq!(
            job.allow_commit(&retried, "b", false, Instant::now() + COMMIT_TIME),
            Err("the job was cancelled".to_owned())
        );
        assert_eq!(
            job.allow_commit(&retried, "b", true, Instant::now() + COMMIT_TIME),
            Ok(())
        );
        assert!(job.committing(lease_end));
    }

    /// A write job whose commit, allowed to act on executor `b`, was lost
    /// with it; `max_attempts` for its tasks, if given; the lost executor's
    /// `lease` runs from the loss. Returns it, its folder, its commit stage,
    /// the time of the loss and the end of the lease.
    async fn job_with_a_lost_commit(
        max_attempts: Option<u32>,
        lease: Duration,
    ) -> (Job, tempfile::TempDir, u32, Instant, Instant) {
        let (mut job, folder, commit) =
            job_with_an_allowed_commit(max_attempts, Instant::now() + COMMIT_TIME).await;
        let now = Instant::now();
        let lease_end = now + lease;
        assert_eq!(job.on_executor_lost("b", now, lease_end), Outcome::Continue);
        (job, folder, commit.stage_id, now, lease_end)
    }

    /// A write job whose commit runs on executor `b`, allowed to act until
    /// `stops_by`; `max_attempts` for its tasks, if given. Returns it, its
    /// folder and the commit attempt.
    async fn job_with_an_allowed_commit(
        max_attempts: Option<u32>,
        stops_by: Instant,
    ) -> (Job, tempfile::TempDir, TaskId) {
        let (_, folder, planner) = counting_job_and_planner().await;
        let insert = Query::Sql("INSERT INTO t SELECT x FROM t".into());
        let Planned::Stages(planned) = planner.plan("job", insert, &[]).await.expect("plan") else {
            panic!("an insert runs on the executors");
        };
        let mut job = job_of(&planned.stages);
        job.writes_to = planned.writes_to.clone();
        if let Some(attempts) = max_attempts {
            job.max_attempts = attempts;
        }
        let last = run_all_but_last(&mut job, "a");
        let commit = job.launch(last, 0, "b").expect("runs").task.expect("id");
        job.allow_commit(&commit, "b", false, stops_by)
            .expect("allowed");
        (job, folder, commit)
    }

    /// A commit still running once its time to act has surely run out is
    /// taken as failed: not before, and only its running attempt. Its next
    /// attempt may run at once (this one can no longer act) and settles the
    /// write; the overdue attempt's late report is stale. On the last
    /// attempt, the scheduler settles the write before the job fails.
    #[tokio::test]
    async fn a_commit_past_its_time_to_act_counts_as_a_failed_attempt() {
        let stops_by = Instant::now() + Duration::from_secs(60);
        let (mut job, _folder, commit) = job_with_an_allowed_commit(Some(2), stops_by).await;
        let overdue = "the commit did not finish in time";
        let just_before = stops_by - Duration::from_millis(1);
        assert_eq!(
            job.fail_overdue_commits(just_before, overdue),
            Outcome::Continue
        );
        assert!(job.committing(just_before), "still its time");

        assert_eq!(
            job.fail_overdue_commits(stops_by, overdue),
            Outcome::Continue
        );
        assert!(!job.committing(stops_by));
        assert_eq!(
            job.lost_commit,
            LostCommit::Unknown,
            "it may have committed"
        );
        let retry = &job.stages[commit.stage_id as usize - 1].tasks[0];
        assert_eq!(retry.attempt, commit.attempt + 1);
        assert_eq!(retry.failures, 1);
        assert_eq!(
            job.next_runnable(stops_by + RETRY_BACKOFF)
                .map(|(stage, partition, avoid)| (stage, partition, avoid.map(str::to_owned))),
            Some((commit.stage_id, 0, Some("b".to_owned()))),
            "runs again, elsewhere if it can"
        );
        let stale = TaskFailed {
            kind: FailureKind::Retryable as i32,
            message: "stopped: its time to act ran out".into(),
            ..TaskFailed::default()
        };
        assert_eq!(job.on_failure(&commit, &stale, stops_by), Outcome::Continue);
        assert_eq!(
            job.stages[commit.stage_id as usize - 1].tasks[0].failures,
            1
        );

        // The last attempt, overdue too: the write is settled first.
        let last = job
            .launch(commit.stage_id, 0, "c")
            .expect("runs")
            .task
            .expect("id");
        let stops_by = Instant::now();
        job.allow_commit(&last, "c", false, stops_by)
            .expect("allowed");
        assert_eq!(job.fail_overdue_commits(stops_by, overdue), Outcome::Settle);
        let Some(DeferredEnd::Fail(message)) = job.deferred_end.clone() else {
            panic!("not failing: {:?}", job.deferred_end);
        };
        assert!(message.contains(overdue), "{message}");
        assert!(message.contains("after 2 attempts"), "{message}");
    }

    /// A commit lost on its last attempt, with an executor that may still
    /// act, holds its job until that executor's lease has run out. Then the
    /// scheduler settles the write before the job ends: no further attempt
    /// runs, and none may commit. Rolled back, the job fails as it was to.
    #[tokio::test]
    async fn a_lost_commit_on_its_last_attempt_is_settled_after_the_lease() {
        let (mut job, _folder, last, now, lease_end) =
            job_with_a_lost_commit(Some(1), Duration::from_millis(300)).await;
        let Some(DeferredEnd::Fail(message)) = job.deferred_end.clone() else {
            panic!("not deferred: {:?}", job.deferred_end);
        };
        assert!(message.contains("last attempt"), "{message}");
        assert!(job.committing(now));
        assert!(!job.committing(lease_end));
        assert_eq!(job.next_runnable(lease_end), None, "nothing more runs");

        // A failure meanwhile waits for the lease too.
        assert_eq!(job.fail("another task failed".into()), Outcome::Continue);
        // What `end_deferred` does once the lease ran out.
        tokio::time::sleep(lease_end.saturating_duration_since(Instant::now())).await;
        assert_eq!(job.fail(message.clone()), Outcome::Settle);
        assert!(job.committing(lease_end));
        // A cancel meanwhile does not turn the failure into a cancel.
        assert!(job.defer_end(DeferredEnd::Cancel, lease_end));
        assert_eq!(job.deferred_end, Some(DeferredEnd::Fail(message.clone())));
        assert!(job.status().committing);
        assert_eq!(job.state, JobState::Running);
        job.deferred_end = None;
        assert_eq!(job.next_runnable(lease_end), None, "settling");
        job.deferred_end = Some(DeferredEnd::Fail(message.clone()));
        let commit = &job.stages[last as usize - 1].tasks[0];
        let late = TaskId {
            job_id: job.id.clone(),
            stage_id: last,
            partition: 0,
            attempt: commit.attempt,
        };
        assert!(
            job.allow_commit(&late, "c", true, Instant::now() + COMMIT_TIME)
                .is_err(),
            "settling"
        );

        let outcome = job.on_write_settled(Ok(Settled::RolledBack { files: 2 }));
        assert_eq!(outcome, Outcome::Failed(message.clone()));
        assert_eq!(
            job.error, message,
            "no word of a commit that may have finished"
        );
        assert!(!job.committing(lease_end));
    }

    /// How a write of `rows` rows in one file, its manifest written, settles.
    fn committed(rows: u64) -> Settled {
        Settled::Committed {
            written: Some(quiver_core::write::Written {
                rows,
                files: 1,
                bytes: 100,
            }),
        }
    }

    /// A job to end after a lost commit had written its manifest succeeds,
    /// with the row count the manifest records as its result, as the
    /// commit task would have returned it.
    #[tokio::test]
    async fn a_lost_commit_found_committed_makes_its_job_succeed() {
        use arrow::array::AsArray;
        let (mut job, _folder, _, _, lease_end) =
            job_with_a_lost_commit(None, Duration::ZERO).await;
        assert!(job.settle_before_ending(DeferredEnd::Cancel));
        assert!(!job.settle_before_ending(DeferredEnd::Cancel), "once");
        assert_eq!(job.on_write_settled(Ok(committed(42))), Outcome::Succeeded);
        assert!(!job.committing(lease_end));
        let status = job.status();
        assert_eq!(status.state(), JobState::Succeeded);
        assert_eq!(status.error, "");
        let [result] = status.result.as_slice() else {
            panic!("one result output: {:?}", status.result);
        };
        assert_eq!(result.executor, None, "held by the scheduler");
        let batches: Vec<_> = arrow::ipc::reader::StreamReader::try_new(
            std::io::Cursor::new(result.inline_result.to_vec()),
            None,
        )
        .expect("an IPC stream")
        .collect::<Result<_, _>>()
        .expect("batches");
        let counts: Vec<u64> = batches
            .iter()
            .flat_map(|batch| {
                batch
                    .column(0)
                    .as_primitive::<arrow::datatypes::UInt64Type>()
                    .values()
                    .to_vec()
            })
            .collect();
        assert_eq!(counts, [42]);
    }

    /// A commit that fails once allowed may have failed after its manifest:
    /// a job that then ends is settled first.
    #[tokio::test]
    async fn a_job_whose_allowed_commit_failed_is_settled_before_it_ends() {
        let (_, _folder, planner) = counting_job_and_planner().await;
        let insert = Query::Sql("INSERT INTO t SELECT x FROM t".into());
        let Planned::Stages(planned) = planner.plan("job", insert, &[]).await.expect("plan") else {
            panic!("an insert runs on the executors");
        };
        let mut job = job_of(&planned.stages);
        job.writes_to = planned.writes_to.clone();
        job.max_attempts = 1;
        let last = run_all_but_last(&mut job, "a");
        let commit = job.launch(last, 0, "b").expect("runs").task.expect("id");
        job.allow_commit(&commit, "b", false, Instant::now() + COMMIT_TIME)
            .expect("allowed");
        let failure = TaskFailed {
            kind: FailureKind::Retryable.into(),
            message: "deleting the replaced files failed".into(),
            fetch: None,
        };
        assert_eq!(
            job.on_failure(&commit, &failure, Instant::now()),
            Outcome::Settle
        );
        assert_eq!(job.on_write_settled(Ok(committed(3))), Outcome::Succeeded);
    }

    /// A job that ends after a commit was lost, with its write not settled,
    /// says that the write may have committed, and why it could not tell;
    /// one whose manifest was found folded says that it had committed.
    #[tokio::test]
    async fn a_job_ending_with_its_write_unsettled_says_it_may_have_committed() {
        let (mut job, _folder, _, _, _) = job_with_a_lost_commit(None, Duration::ZERO).await;
        assert!(job.settle_before_ending(DeferredEnd::Cancel));
        let outcome = job.on_write_settled(Err("the store did not answer".into()));
        assert_eq!(outcome, Outcome::Cancelled);
        assert!(!job.status().write_committed);
        let table = job.writes_to.clone().expect("a write");
        let manifest = format!("{table}_manifests/{}.json", job.id);
        assert_eq!(
            job.error,
            format!(
                "job cancelled; but a commit of its write was lost with its executor and \
                 may have finished (the scheduler could not settle the write: the store \
                 did not answer): if {manifest} exists, its rows are in the table, so check \
                 before running the statement again"
            )
        );

        let (mut job, _folder, _, _, _) = job_with_a_lost_commit(None, Duration::ZERO).await;
        assert_eq!(job.fail("timed out".into()), Outcome::Settle);
        let outcome = job.on_write_settled(Ok(Settled::Committed { written: None }));
        let message = "timed out; but a commit of its write, lost with its executor, had \
                       finished: its rows are in the table, so do not run the statement again";
        assert_eq!(outcome, Outcome::Failed(message.into()));
        assert!(job.status().write_committed);
    }

    /// A commit allowed before a cancel came decides how the job ends: it
    /// succeeds if the commit does.
    #[tokio::test]
    async fn a_commit_allowed_before_a_cancel_ends_its_job_as_it_ends() {
        // One task scans, writes and commits.
        let single = single_task_stage();
        let mut job = job_of(&[single]);
        job.writes_to = Some("file:///tmp/target/".into());
        let commit = job.launch(1, 0, "a").expect("runs").task.expect("id");
        job.allow_commit(&commit, "a", false, Instant::now() + COMMIT_TIME)
            .expect("allowed");
        job.deferred_end = Some(DeferredEnd::Cancel);
        let output = MapOutput {
            attempt: commit.attempt,
            ..MapOutput::default()
        };
        assert_eq!(
            job.on_success(&commit, output, &TaskSucceeded::default()),
            Outcome::Succeeded
        );
        assert!(!job.committing(Instant::now()));
    }

    /// A cancelled job whose tasks are still stopping shows none running:
    /// they are no longer its work (`quiver job list` showed them forever).
    #[test]
    fn an_ended_job_runs_no_task() {
        let mut job = job_of(&[single_task_stage()]);
        job.launch(1, 0, "a").expect("runs");
        assert_eq!(job.status().tasks_running, 1);
        job.cancel();
        let status = job.status();
        assert_eq!(status.state(), JobState::Cancelled);
        assert_eq!(status.tasks_running, 0);
    }

    /// The inline file lists of a wide write share one budget: the commit
    /// task's launch carries them all.
    #[test]
    fn a_wide_writes_inline_file_lists_share_one_budget() {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let stage = |id: u32, partitions: usize| StagePlan {
            stage_id: id,
            plan: Arc::new(ShuffleWriterExec::new(
                "job",
                id,
                Arc::new(EmptyExec::new(Arc::clone(&schema)).with_partitions(partitions)),
                None,
            )),
            inputs: if id > 1 { vec![id - 1] } else { vec![] },
        };
        let mut job = job_of(&[stage(1, 200), stage(2, 1)]);
        job.writes_to = Some("s3://bucket/table/".into());
        let launch = job.launch(1, 0, "a").expect("write task runs");
        assert_eq!(
            launch.inline_result_max_bytes,
            INLINE_FILE_LISTS_BUDGET / 200
        );
    }
}
