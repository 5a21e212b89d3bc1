//! The scheduler's event loop. It owns all job and executor state, reacts to
//! events, and hands pending tasks to free executor slots. It never blocks:
//! planning and plan encoding happen before a job reaches it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::error::DataFusionError;
use quiver_core::storage::{StoreRegistry, redacted_error};
use quiver_core::write::{FinishOverwrite, JobEnded, Settled, settle_write};
use quiver_proto::{
    CancelTasks, CommitAnswer, CommitRequest, Drained, ExecutorRegistered, FailureKind,
    HeartbeatAck, JobRecord, JobState, JobStatus, PROTOCOL_VERSION, RemoveJobData,
    SchedulerMessage, StoreConfig, TaskStatus, executor_message, scheduler_message, task_status,
};
use tokio::sync::{mpsc, watch};

use tracing::{debug, info, warn};

use super::executors::{ExecutorEntry, ExecutorRegistry};
use super::job::{DeferredEnd, Job, Outcome};
use super::{
    CancelOutcome, Event, JobDirectory, SchedulerHandle, SettlingJobs, SubmittedJob, is_final,
};
use crate::locations::{job_stores, targets_overlap};
use crate::planner::StagedJob;
use crate::store::{JobRecorder, StateStore, StoreError};

/// Longest time a job may take to be planned again (see
/// [`SchedulerLoop::replan`]) before it fails.
const REPLAN_TIMEOUT: Duration = Duration::from_secs(600);

/// Longest time the scheduler may take to settle the write of a job whose
/// commit was lost (see [`SchedulerLoop::settle_lost_commit`]) before the
/// job ends saying that its write may have committed.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Timing settings of the loop.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub heartbeat_interval: Duration,
    /// An executor silent for this long is considered lost.
    pub executor_timeout: Duration,
    /// How long a finished job's result stays available if the client never releases it.
    pub result_retention: Duration,
    /// Jobs running at once; later ones wait in a queue. 0 means no limit.
    pub max_running_jobs: usize,
    /// How long an allowed commit attempt may act (see
    /// `quiver_core::write::permission`).
    pub commit_timeout: Duration,
}

impl LoopConfig {
    /// How long an executor may run tasks after sending its last heartbeat
    /// that this scheduler acknowledged (see `quiver_core::lease`). A quarter
    /// of the executor timeout is left as the margin for the executor's
    /// cancellations, and any request already in flight, to land before the
    /// tasks run again elsewhere.
    pub fn executor_lease(&self) -> Duration {
        self.executor_timeout - self.executor_timeout / 4
    }

    /// How long after allowing a commit the scheduler takes it as failed:
    /// its time to act, and the lease's margin for a request in flight.
    fn commit_stops_after(&self) -> Duration {
        self.commit_timeout + (self.executor_timeout - self.executor_lease())
    }
}

/// Starts the event loop; it stops when every handle is dropped. The job
/// history in `store` is loaded first: jobs that were running when the
/// previous scheduler stopped are recorded as failed, since their tasks and
/// shuffle data went with it (see ARCHITECTURE.md, "Scheduler restart").
/// Their records are returned, so that what they left in object storage can
/// be cleaned up. `stores` reaches the tables that jobs write, to settle a
/// write whose commit was lost.
pub fn spawn(
    config: LoopConfig,
    store: &StateStore,
    stores: Arc<StoreRegistry>,
) -> Result<(SchedulerHandle, Vec<InterruptedJob>), StoreError> {
    let (events, receiver) = mpsc::unbounded_channel();
    let directory = JobDirectory::default();
    // Taken before the recorder starts: it forgets them with final records.
    let mut kept_stores = store.take_job_stores()?;
    let recorder = JobRecorder::start(store.clone(), directory.clone());
    let settling = SettlingJobs::default();
    let mut interrupted = Vec::new();
    for mut record in store.jobs()? {
        let Some(status) = record.status.as_mut() else {
            continue;
        };
        let job_id = status.job_id.clone();
        let running = !is_final(status.state());
        if running {
            status.state = JobState::Failed.into();
            status.tasks_running = 0;
            // A write is settled once the scheduler has started, and its
            // job recorded again with the outcome.
            status.error = if record.writes_to.is_empty() {
                format!("{RESTARTED}; submit it again")
            } else {
                being_settled()
            };
            record.finished_at_unix_ms = unix_millis();
            record.write_unsettled = !record.writes_to.is_empty();
            warn!(%job_id, "job was interrupted by a scheduler restart");
        }
        // Settled at an earlier start, its write could not be.
        if running || record.write_unsettled {
            let stores = kept_stores.remove(&job_id).unwrap_or_default();
            // Kept until the write is settled, should this start stop too.
            if record.write_unsettled {
                recorder.keep_stores(&job_id, &stores);
            }
            // Already recorded, unless an older version ran the job.
            if running && (!record.durable_shuffle.is_empty() || !record.writes_to.is_empty()) {
                recorder.keep_storage_left(
                    &job_id,
                    &record.durable_shuffle,
                    &record.writes_to,
                    &stores,
                );
            }
            recorder.record(record.clone());
            interrupted.push(InterruptedJob {
                record: record.clone(),
                stores,
            });
        }
        let Some(status) = record.status else {
            continue;
        };
        let published = if record.write_unsettled {
            // Recorded failed, should this start stop too, but shown
            // running: it ends as its write is settled.
            settling.insert(status)
        } else {
            watch::channel(status).1
        };
        directory.insert(job_id, published);
    }
    let state = SchedulerLoop {
        config,
        jobs: HashMap::new(),
        finished: HashMap::new(),
        executors: ExecutorRegistry::default(),
        next_seq: 0,
        recorder: recorder.clone(),
        queue: VecDeque::new(),
        events: events.downgrade(),
        stores,
    };
    tokio::spawn(state.run(receiver));
    let handle = SchedulerHandle {
        events,
        directory,
        recorder,
        settling,
    };
    Ok((handle, interrupted))
}

/// How the error of a job that a scheduler restart interrupted begins.
pub const RESTARTED: &str = "the scheduler restarted while this job was running";

/// What a job whose write a restart interrupted says until it is settled.
pub fn being_settled() -> String {
    format!("{RESTARTED}; its write is being settled")
}

/// A job that was running when the scheduler last stopped.
#[derive(Debug, Clone)]
pub struct InterruptedJob {
    /// Its record, now marked failed.
    pub record: JobRecord,
    /// The stores its tasks ran with, to settle its data with; empty if
    /// none were kept (a job that leaves no data, or one recorded by an
    /// older scheduler).
    pub stores: Vec<StoreConfig>,
}

impl InterruptedJob {
    pub fn id(&self) -> &str {
        self.record
            .status
            .as_ref()
            .map_or("", |status| status.job_id.as_str())
    }
}

/// Why work run off the loop gave no answer.
#[derive(Debug, thiserror::Error)]
enum OffLoopError {
    #[error("panicked: {0}")]
    Panicked(String),
    #[error("took longer than {} s", .0.as_secs())]
    TimedOut(Duration),
}

/// Runs `work` in its own task, so that a panic ends it with an error
/// rather than leave a job waiting for ever; so does work that takes longer
/// than `limit` (a store that never answers), which is then stopped.
async fn off_the_loop<T: Send + 'static>(
    work: impl Future<Output = T> + Send + 'static,
    limit: Duration,
) -> Result<T, OffLoopError> {
    let mut task = tokio::spawn(work);
    match tokio::time::timeout(limit, &mut task).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(panicked)) => Err(OffLoopError::Panicked(panicked.to_string())),
        Err(_) => {
            task.abort();
            Err(OffLoopError::TimedOut(limit))
        }
    }
}

/// Milliseconds since the Unix epoch, for job records.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// A succeeded job whose result the client has not read yet.
struct FinishedJob {
    /// Every executor that may hold files of the job.
    executors: Vec<String>,
    /// Executors holding the result itself.
    result_on: Vec<String>,
    /// When the result is freed if the client never releases it.
    deadline: Instant,
}

struct SchedulerLoop {
    config: LoopConfig,
    /// Running jobs, with the sender of their published status.
    jobs: HashMap<String, (Job, watch::Sender<JobStatus>)>,
    /// Succeeded jobs whose result is still held on executors.
    finished: HashMap<String, FinishedJob>,
    executors: ExecutorRegistry,
    next_seq: u64,
    recorder: JobRecorder,
    /// Jobs waiting for admission, oldest first.
    queue: VecDeque<String>,
    /// For the results of work done off the loop (planning a job again,
    /// settling a write); weak, so that the loop still stops when every
    /// handle is dropped.
    events: mpsc::WeakUnboundedSender<Event>,
    /// The object stores of the tables that jobs write.
    stores: Arc<StoreRegistry>,
}

impl SchedulerLoop {
    async fn run(mut self, mut events: mpsc::UnboundedReceiver<Event>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => self.handle(event),
                    None => break,
                },
                _ = tick.tick() => self.on_tick(),
            }
            self.admit_queued();
            self.schedule();
            self.release_drained();
        }
        info!("scheduler event loop stopped");
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::ExecutorConnected {
                address,
                slots,
                connection,
                sender,
            } => self.on_executor_connected(address, slots, connection, sender),
            Event::ExecutorMessage {
                executor_id,
                connection,
                message,
            } => self.on_executor_message(&executor_id, connection, message),
            Event::ExecutorDisconnected {
                executor_id,
                connection,
                clean,
            } => {
                if self
                    .executors
                    .remove_connection(&executor_id, connection)
                    .is_some()
                {
                    if clean {
                        info!(%executor_id, "executor signed off");
                    } else {
                        warn!(%executor_id, "executor connection lost");
                    }
                    self.on_executor_lost(&executor_id);
                }
            }
            Event::JobSubmitted(job) => self.on_job_submitted(*job),
            Event::CancelJob { job_id, reply } => {
                let _ = reply.send(self.cancel_job(&job_id));
            }
            Event::ListExecutors { reply } => {
                let _ = reply.send(self.executors.iter().map(ExecutorEntry::info).collect());
            }
            Event::ReleaseJob { job_id } => {
                if let Some(finished) = self.finished.remove(&job_id) {
                    self.remove_job_data(&job_id, &finished.executors);
                }
            }
            Event::JobReplanned { job_id, planned } => self.on_job_replanned(&job_id, *planned),
            Event::WriteSettled { job_id, settled } => {
                // Whatever the job ends as, no later settling rolls it back.
                if let Ok(Settled::Committed { .. }) = &settled {
                    self.recorder.write_committed(&job_id);
                }
                if let Some((job, _)) = self.jobs.get_mut(&job_id) {
                    let outcome = job.on_write_settled(settled);
                    self.after_outcome(&job_id, outcome);
                }
            }
        }
    }

    fn on_executor_connected(
        &mut self,
        address: quiver_proto::ExecutorAddress,
        slots: usize,
        connection: u64,
        sender: super::executors::ExecutorSender,
    ) {
        let executor_id = address.executor_id.clone();
        let entry = ExecutorEntry {
            address,
            slots,
            running: 0,
            connection,
            sender,
            last_seen: Instant::now(),
            draining: false,
        };
        entry.send(SchedulerMessage {
            kind: Some(scheduler_message::Kind::Registered(ExecutorRegistered {
                protocol_version: PROTOCOL_VERSION,
                heartbeat_interval_millis: self.config.heartbeat_interval.as_millis() as u64,
                lease_millis: self.config.executor_lease().as_millis() as u64,
            })),
        });
        info!(%executor_id, slots, "executor registered");
        if self.executors.insert(entry).is_some() {
            // The executor reconnected: whatever ran on its old stream is gone.
            self.on_executor_lost(&executor_id);
        }
    }

    fn on_executor_message(
        &mut self,
        executor_id: &str,
        connection: u64,
        message: executor_message::Kind,
    ) {
        let Some(executor) = self.executors.get_mut(executor_id) else {
            return;
        };
        if executor.connection != connection {
            return;
        }
        executor.last_seen = Instant::now();
        match message {
            executor_message::Kind::Heartbeat(heartbeat) => {
                executor.send(SchedulerMessage {
                    kind: Some(scheduler_message::Kind::HeartbeatAck(HeartbeatAck {
                        sequence: heartbeat.sequence,
                    })),
                });
            }
            executor_message::Kind::Register(_) => {}
            executor_message::Kind::Draining(_) => {
                if !executor.draining {
                    info!(%executor_id, running = executor.running, "executor draining");
                }
                executor.draining = true;
            }
            executor_message::Kind::TaskStatus(status) => {
                executor.running = executor.running.saturating_sub(1);
                self.on_task_status(status);
            }
            executor_message::Kind::CommitRequest(request) => {
                self.on_commit_request(executor_id, request);
            }
        }
    }

    /// Answers a commit attempt that asks to change its table (see
    /// `quiver_core::write::permission`).
    fn on_commit_request(&mut self, executor_id: &str, request: CommitRequest) {
        let Some(task) = request.task else {
            return;
        };
        let job_id = task.job_id.clone();
        let stops_by = Instant::now() + self.config.commit_stops_after();
        let verdict = match self.jobs.get_mut(&task.job_id) {
            Some((job, _)) => job.allow_commit(&task, executor_id, request.finishes, stops_by),
            None => Err("the job has ended".to_owned()),
        };
        match &verdict {
            Ok(()) => debug!(job_id = %task.job_id, stage = task.stage_id,
                partition = task.partition, attempt = task.attempt, %executor_id,
                "commit allowed"),
            Err(reason) => info!(job_id = %task.job_id, stage = task.stage_id,
                partition = task.partition, attempt = task.attempt, %executor_id, %reason,
                "commit refused"),
        }
        let answer = CommitAnswer {
            task: Some(task),
            allowed: verdict.is_ok(),
            reason: verdict.err().unwrap_or_default(),
            act_for_millis: self.config.commit_timeout.as_millis() as u64,
        };
        if let Some(executor) = self.executors.get_mut(executor_id) {
            executor.send(SchedulerMessage {
                kind: Some(scheduler_message::Kind::CommitAnswer(answer)),
            });
        }
        self.publish(&job_id);
    }

    fn on_task_status(&mut self, status: TaskStatus) {
        let (Some(task), Some(result)) = (status.task, status.result) else {
            return;
        };
        let Some((job, _)) = self.jobs.get_mut(&task.job_id) else {
            return;
        };
        let outcome = match result {
            task_status::Result::Succeeded(mut success) => {
                debug!(job_id = %task.job_id, stage = task.stage_id, partition = task.partition,
                    elapsed_us = success.elapsed_micros, "task succeeded");
                match success.output.take() {
                    Some(output) => job.on_success(&task, output, &success),
                    None => job.fail(format!(
                        "task {}/{} reported no output",
                        task.stage_id, task.partition
                    )),
                }
            }
            task_status::Result::Failed(failure) => {
                if failure.kind() == FailureKind::Cancelled {
                    Outcome::Continue
                } else {
                    job.on_failure(&task, &failure, Instant::now())
                }
            }
        };
        self.after_outcome(&task.job_id, outcome);
    }

    fn on_job_submitted(&mut self, submitted: SubmittedJob) {
        let now = Instant::now();
        let mut job = Job::new(
            submitted.job_id.clone(),
            self.next_seq,
            submitted.settings,
            submitted.limits,
            &submitted.stages,
            submitted.encoded,
            now,
        );
        self.next_seq += 1;
        job.query = submitted.query;
        job.stores = submitted.stores;
        job.durable_shuffle = submitted.durable_shuffle;
        job.writes_to = submitted.writes_to;
        job.adaptive = submitted.adaptive;
        job.replanner = submitted.replanner;
        job.submitted_at_unix_ms = unix_millis();
        if self.at_job_limit() || self.target_busy(job.writes_to.as_deref()) {
            job.enqueue(self.queue.len() as u32);
            self.queue.push_back(submitted.job_id.clone());
            info!(job_id = %submitted.job_id, position = job.queue_position, "job queued");
        } else {
            info!(job_id = %submitted.job_id, stages = job.stages.len(), "job accepted");
        }
        submitted.status.send_replace(job.status());
        // What a restarted scheduler would settle: kept with the job's
        // credentials, which the catalog may not hold (a `COPY`'s options).
        if !job.durable_shuffle.is_empty() || job.writes_to.is_some() {
            self.recorder.keep_stores(&job.id, &job.stores);
            // Until it is cleaned up, whatever ends the job or the scheduler.
            let writes_to = job.writes_to.as_deref().unwrap_or_default();
            self.recorder
                .keep_storage_left(&job.id, &job.durable_shuffle, writes_to, &job.stores);
        }
        self.recorder.record(job.record(0));
        self.jobs.insert(submitted.job_id, (job, submitted.status));
    }

    fn after_outcome(&mut self, job_id: &str, outcome: Outcome) {
        if outcome != Outcome::Continue
            && let Some((job, _)) = self.jobs.get(job_id)
        {
            // A job planned again, or settling its write, is still
            // running: no finish time.
            let finished_at = match outcome {
                Outcome::Replan(_) | Outcome::Settle => 0,
                _ => unix_millis(),
            };
            self.recorder.record(job.record(finished_at));
        }
        match outcome {
            Outcome::Continue => self.publish(job_id),
            Outcome::Succeeded => {
                self.publish(job_id);
                if let Some((job, _)) = self.jobs.remove(job_id) {
                    info!(%job_id, elapsed_ms = job.started.elapsed().as_millis() as u64, "job succeeded");
                    let finished = FinishedJob {
                        executors: job.executors(),
                        result_on: job.result_executors(),
                        deadline: Instant::now() + self.config.result_retention,
                    };
                    self.finished.insert(job_id.to_owned(), finished);
                }
            }
            Outcome::Failed(message) => {
                warn!(%job_id, error = %message, "job failed");
                self.publish(job_id);
                self.end_job(job_id);
            }
            Outcome::Cancelled => {
                info!(%job_id, "job cancelled");
                self.publish(job_id);
                self.end_job(job_id);
            }
            Outcome::Replan(reason) => self.replan(job_id, &reason),
            Outcome::Settle => self.settle_lost_commit(job_id),
        }
    }

    /// Stops the tasks of a job that is to end while a lost commit of its
    /// write may have committed, and settles the write off the loop
    /// ([`settle_write`]): with the job's manifest there, the commit is
    /// finished and the job succeeds; without it, what the commit moved in
    /// is deleted and the job ends as it was asked to. No commit of the job
    /// can act any more, and no other job of this scheduler writes the
    /// table while this one runs, so an overwrite's deletions are finished
    /// too.
    fn settle_lost_commit(&mut self, job_id: &str) {
        let Some((job, _)) = self.jobs.get(job_id) else {
            return;
        };
        let Some(table) = job.writes_to.clone() else {
            return;
        };
        info!(%job_id, %table, "a commit of the job's write was lost with its executor; \
            reading whether it committed before the job ends");
        let executors = job.executors();
        let stores = job_stores(&self.stores, &job.stores, job_id);
        self.cancel_tasks(job_id, &executors);
        self.publish(job_id);
        let id = job_id.to_owned();
        let settling = async move {
            settle_write(
                &stores,
                &table,
                &id,
                JobEnded::Otherwise,
                FinishOverwrite::Yes,
            )
            .await
            .map_err(|e| redacted_error(&e))
        };
        let events = self.events.clone();
        let job_id = job_id.to_owned();
        tokio::spawn(async move {
            let settled = match off_the_loop(settling, SETTLE_TIMEOUT).await {
                Ok(settled) => settled,
                Err(e) => Err(e.to_string()),
            };
            if let Some(events) = events.upgrade() {
                let _ = events.send(Event::WriteSettled { job_id, settled });
            }
        });
    }

    /// Stops the tasks of a job that lost a file it reads, and plans it
    /// again off the loop; [`Self::on_job_replanned`] runs the new plan.
    fn replan(&mut self, job_id: &str, reason: &str) {
        let Some((job, _)) = self.jobs.get(job_id) else {
            return;
        };
        let Some(replanner) = job.replanner.clone() else {
            // Not reached (only a job with a replanner is planned again),
            // but a job must never wait for a plan that nothing makes.
            if let Some((job, _)) = self.jobs.get_mut(job_id) {
                let outcome = job.fail(reason.to_owned());
                self.after_outcome(job_id, outcome);
            }
            return;
        };
        info!(%job_id, replans = job.replans + 1, %reason,
            "a file the job reads was replaced after it was planned; planning it again");
        let executors = job.executors();
        self.cancel_tasks(job_id, &executors);
        self.publish(job_id);
        let events = self.events.clone();
        let job_id = job_id.to_owned();
        tokio::spawn(async move {
            let planned =
                match off_the_loop(async move { replanner.plan().await }, REPLAN_TIMEOUT).await {
                    Ok(planned) => planned,
                    Err(e) => Err(crate::Error::Query(DataFusionError::Execution(format!(
                        "planning the job again {e}"
                    )))),
                };
            if let Some(events) = events.upgrade() {
                let planned = Box::new(planned);
                let _ = events.send(Event::JobReplanned { job_id, planned });
            }
        });
    }

    /// Runs a job from its new plan, or fails it if it could not be planned.
    /// A job cancelled meanwhile is gone, and its plan is dropped.
    fn on_job_replanned(&mut self, job_id: &str, planned: Result<StagedJob, crate::Error>) {
        let Some((job, _)) = self.jobs.get_mut(job_id) else {
            return;
        };
        if !job.is_replanning() {
            return;
        }
        let outcome = match planned {
            Ok(planned) => {
                info!(%job_id, stages = planned.stages.len(), replans = job.replans + 1,
                    "job planned again");
                job.install_replan(planned, Instant::now());
                Outcome::Continue
            }
            Err(error) => job.fail(format!(
                "a file the job reads was replaced while it ran, and planning it again \
                 failed: {error}"
            )),
        };
        self.after_outcome(job_id, outcome);
    }

    fn cancel_job(&mut self, job_id: &str) -> CancelOutcome {
        let Some((job, _)) = self.jobs.get_mut(job_id) else {
            return CancelOutcome::Ended;
        };
        if job.defer_end(DeferredEnd::Cancel, Instant::now()) {
            info!(%job_id, "cancel requested while the job's write commits; \
                it is cancelled if the commit fails, and succeeds if it commits");
            return CancelOutcome::Committing;
        }
        if job.settle_before_ending(DeferredEnd::Cancel) {
            self.settle_lost_commit(job_id);
            return CancelOutcome::Committing;
        }
        if job.state == JobState::Queued {
            self.queue.retain(|queued| queued != job_id);
        }
        job.cancel();
        self.after_outcome(job_id, Outcome::Cancelled);
        CancelOutcome::Cancelled
    }

    /// Ends the jobs asked to end while their writes committed, once no
    /// commit of theirs can act (see `Job::committing`).
    fn end_deferred(&mut self, now: Instant) {
        let ready: Vec<(String, DeferredEnd)> = self
            .jobs
            .values()
            .filter_map(|(job, _)| Some((job, job.deferred_end.clone()?)))
            .filter(|(job, _)| !job.committing(now))
            .map(|(job, end)| (job.id.clone(), end))
            .collect();
        for (job_id, end) in ready {
            match end {
                DeferredEnd::Cancel => {
                    self.cancel_job(&job_id);
                }
                DeferredEnd::Fail(message) => {
                    if let Some((job, _)) = self.jobs.get_mut(&job_id) {
                        let outcome = job.fail(message);
                        self.after_outcome(&job_id, outcome);
                    }
                }
            }
        }
    }

    /// Stops a failed or cancelled job's tasks and frees its data.
    fn end_job(&mut self, job_id: &str) {
        if let Some((job, _)) = self.jobs.remove(job_id) {
            let executors = job.executors();
            self.cancel_tasks(job_id, &executors);
            self.remove_job_data(job_id, &executors);
        }
    }

    /// Stops every running task of a job on `executors`.
    fn cancel_tasks(&mut self, job_id: &str, executors: &[String]) {
        let cancel = CancelTasks {
            job_id: job_id.to_owned(),
        };
        self.send_to(executors, scheduler_message::Kind::CancelTasks(cancel));
    }

    fn remove_job_data(&mut self, job_id: &str, executors: &[String]) {
        let remove = RemoveJobData {
            job_id: job_id.to_owned(),
        };
        self.send_to(executors, scheduler_message::Kind::RemoveJobData(remove));
    }

    /// Sends `message` to each of `executors` still registered.
    fn send_to(&mut self, executors: &[String], message: scheduler_message::Kind) {
        for executor_id in executors {
            if let Some(executor) = self.executors.get_mut(executor_id) {
                executor.send(SchedulerMessage {
                    kind: Some(message.clone()),
                });
            }
        }
    }

    fn publish(&self, job_id: &str) {
        if let Some((job, sender)) = self.jobs.get(job_id) {
            sender.send_replace(job.status());
        }
    }

    fn on_executor_lost(&mut self, executor_id: &str) {
        let now = Instant::now();
        let job_ids: Vec<String> = self.jobs.keys().cloned().collect();
        let lease_end = now + self.config.executor_lease();
        for job_id in job_ids {
            let outcome = match self.jobs.get_mut(&job_id) {
                Some((job, _)) => job.on_executor_lost(executor_id, now, lease_end),
                None => continue,
            };
            self.after_outcome(&job_id, outcome);
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        for executor_id in self.executors.expired(now, self.config.executor_timeout) {
            warn!(%executor_id, "executor missed its heartbeats; dropping it");
            // Dropping the entry closes its control stream.
            self.executors.remove(&executor_id);
            self.on_executor_lost(&executor_id);
        }
        let expired: Vec<String> = self
            .finished
            .iter()
            .filter(|(_, finished)| finished.deadline <= now)
            .map(|(job_id, _)| job_id.clone())
            .collect();
        for job_id in expired {
            if let Some(finished) = self.finished.remove(&job_id) {
                self.remove_job_data(&job_id, &finished.executors);
            }
        }
        let overdue: Vec<(String, Duration)> = self
            .jobs
            .values()
            .filter(|(job, _)| job.deadline.is_some_and(|deadline| deadline <= now))
            .filter(|(job, _)| job.deferred_end.is_none())
            .map(|(job, _)| (job.id.clone(), job.started.elapsed()))
            .collect();
        for (job_id, elapsed) in overdue {
            if let Some((job, _)) = self.jobs.get_mut(&job_id) {
                let message = format!(
                    "job timed out after {:.1} s (quiver.job_timeout_secs)",
                    elapsed.as_secs_f64()
                );
                if job.defer_end(DeferredEnd::Fail(message.clone()), now) {
                    info!(%job_id, "the job's timeout passed while its write commits; \
                        it fails if the commit fails, and succeeds if it commits");
                    continue;
                }
                let outcome = job.fail(message);
                self.after_outcome(&job_id, outcome);
            }
        }
        self.fail_overdue_commits(now);
        self.end_deferred(now);
        let job_ids: Vec<String> = self.jobs.keys().cloned().collect();
        for job_id in job_ids {
            self.publish(&job_id);
        }
    }

    /// Takes the commits that ran past their time to act as failed (see
    /// `Job::fail_overdue_commits`).
    fn fail_overdue_commits(&mut self, now: Instant) {
        let message = format!(
            "the commit did not finish within {} s (--commit-timeout-secs), and was stopped",
            self.config.commit_timeout.as_secs()
        );
        let job_ids: Vec<String> = self.jobs.keys().cloned().collect();
        for job_id in job_ids {
            let outcome = match self.jobs.get_mut(&job_id) {
                Some((job, _)) => job.fail_overdue_commits(now, &message),
                None => continue,
            };
            self.after_outcome(&job_id, outcome);
        }
    }

    fn at_job_limit(&self) -> bool {
        let running = self
            .jobs
            .values()
            .filter(|(job, _)| job.state == JobState::Running)
            .count();
        self.config.max_running_jobs > 0 && running >= self.config.max_running_jobs
    }

    /// Whether a running job writes into the table folder `target`, or into
    /// a folder inside it or around it.
    fn target_busy(&self, target: Option<&str>) -> bool {
        target.is_some_and(|target| {
            self.jobs.values().any(|(job, _)| {
                job.state == JobState::Running
                    && job
                        .writes_to
                        .as_deref()
                        .is_some_and(|running| targets_overlap(running, target))
            })
        })
    }

    /// Starts queued jobs, oldest first, while the job limit allows. A job
    /// whose table folder another running job writes stays queued, in its
    /// place; the jobs behind it may start.
    fn admit_queued(&mut self) {
        let mut admitted = false;
        let mut waiting = VecDeque::new();
        while let Some(job_id) = self.queue.pop_front() {
            if self.at_job_limit() {
                waiting.push_back(job_id);
                continue;
            }
            let target = self
                .jobs
                .get(&job_id)
                .and_then(|(job, _)| job.writes_to.clone());
            if self.target_busy(target.as_deref()) {
                waiting.push_back(job_id);
                continue;
            }
            if let Some((job, _)) = self.jobs.get_mut(&job_id) {
                job.admit(Instant::now());
                info!(%job_id, "job admitted from the queue");
                admitted = true;
            }
        }
        self.queue = waiting;
        if admitted {
            for (position, job_id) in self.queue.iter().enumerate() {
                if let Some((job, _)) = self.jobs.get_mut(job_id) {
                    job.queue_position = position as u32;
                }
            }
            let job_ids: Vec<String> = self.jobs.keys().cloned().collect();
            for job_id in job_ids {
                self.publish(&job_id);
            }
        }
    }

    /// Lets each draining executor go once nothing needs it: no task of it is
    /// running, no running job still needs a map output it holds, and no
    /// finished job's unread result lives on it.
    fn release_drained(&mut self) {
        for executor_id in self.executors.idle_draining() {
            let needed = self
                .jobs
                .values()
                .any(|(job, _)| job.needs_outputs_on(&executor_id))
                || self
                    .finished
                    .values()
                    .any(|finished| finished.result_on.contains(&executor_id));
            if needed {
                continue;
            }
            if let Some(executor) = self.executors.remove(&executor_id) {
                info!(%executor_id, "executor drained");
                for (job, _) in self.jobs.values_mut() {
                    job.read_copies_of(&executor_id);
                }
                executor.send(SchedulerMessage {
                    kind: Some(scheduler_message::Kind::Drained(Drained {})),
                });
            }
        }
    }

    /// Hands runnable tasks to free slots. Each slot goes to the job with the
    /// fewest running tasks (oldest first on ties), so concurrent jobs share
    /// the cluster fairly instead of the first one taking it all.
    fn schedule(&mut self) {
        let now = Instant::now();
        while self.executors.has_free_slot() {
            let candidate = self
                .jobs
                .values()
                .filter(|(job, _)| job.state == JobState::Running)
                .filter_map(|(job, _)| {
                    job.next_runnable(now).map(|(stage, partition, avoid)| {
                        (
                            job.running,
                            job.seq,
                            job.id.clone(),
                            stage,
                            partition,
                            avoid.map(str::to_owned),
                        )
                    })
                })
                .min_by_key(|(running, seq, ..)| (*running, *seq));
            let Some((_, _, job_id, stage_id, partition, avoid)) = candidate else {
                return;
            };
            let Some(executor_id) = self.executors.pick(avoid.as_deref()) else {
                return;
            };
            let Some((job, _)) = self.jobs.get_mut(&job_id) else {
                return;
            };
            let Some(launch) = job.launch(stage_id, partition, &executor_id) else {
                return;
            };
            let Some(executor) = self.executors.get_mut(&executor_id) else {
                return;
            };
            executor.running += 1;
            debug!(%job_id, stage = stage_id, partition, %executor_id, "launching task");
            let sent = executor.send(SchedulerMessage {
                kind: Some(scheduler_message::Kind::LaunchTask(launch)),
            });
            if !sent {
                self.executors.remove(&executor_id);
                self.on_executor_lost(&executor_id);
            }
        }
    }
}
