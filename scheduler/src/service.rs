//! The scheduler's gRPC service: executors' control streams and clients' job calls.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::datatypes::SchemaRef;
use datafusion::common::ParamValues;
use datafusion::error::DataFusionError;
use futures::Stream;
use quiver_core::ipc::schema_to_bytes;
use quiver_core::shuffle::durable;
use quiver_core::shuffle::layout::validate_identifier;
use quiver_core::storage::registry::ReplacedStore;
use quiver_core::storage::{StoreRegistry, redact_sql, redacted_error, store_did_not_answer};
use quiver_core::write::layout::ABANDONED_AFTER;
use quiver_core::write::{FinishOverwrite, JobEnded, Settled, settle_write};
use quiver_proto::scheduler_service_server::SchedulerService;
use quiver_proto::{
    CancelJobResponse, ExecutorInfo, ExecutorMessage, GetTableRequest, GetTableResponse, JobRecord,
    JobRequest, JobState, JobStatus, ListExecutorsRequest, ListExecutorsResponse, ListJobsRequest,
    ListJobsResponse, PROTOCOL_VERSION, PendingTable, ReleaseJobResponse, SchedulerMessage,
    Setting, SubmitJobRequest, SubmitJobResponse, executor_message, submit_job_request::Query,
};
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::analyze;
use crate::error::Error;
use crate::locations::job_stores;
use crate::planner::{Planned, Planner, StagedJob};
use crate::starting::SilentStores;
use crate::state::event_loop::{InterruptedJob, RESTARTED, unix_millis};
use crate::state::{CancelOutcome, Event, SchedulerHandle, SubmittedJob};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[derive(Debug, Clone)]
pub struct SchedulerGrpc {
    handle: SchedulerHandle,
    planner: Planner,
    connections: Arc<AtomicU64>,
}

impl SchedulerGrpc {
    pub fn new(handle: SchedulerHandle, planner: Planner) -> Self {
        Self {
            handle,
            planner,
            connections: Arc::default(),
        }
    }

    fn send(&self, event: Event) -> Result<(), Status> {
        if self.handle.send(event) {
            Ok(())
        } else {
            Err(Error::ShuttingDown.into())
        }
    }

    /// The planner, whose shared catalog every job sees.
    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    pub fn handle(&self) -> &SchedulerHandle {
        &self.handle
    }

    /// Cancels a job, unless it had already ended or its write is
    /// committing (see [`CancelOutcome`]).
    pub async fn cancel(&self, job_id: &str) -> Result<CancelOutcome, Status> {
        self.job_status(job_id)?;
        if self.handle.settling.contains(job_id) {
            return Ok(CancelOutcome::Settling);
        }
        let (reply, answer) = oneshot::channel();
        self.send(Event::CancelJob {
            job_id: job_id.to_owned(),
            reply,
        })?;
        answer.await.map_err(|_| Status::from(Error::ShuttingDown))
    }

    /// Cancels a job without waiting for the answer: for a caller that is
    /// going away.
    pub fn cancel_in_background(&self, job_id: &str) {
        let (reply, _) = oneshot::channel();
        self.handle.send(Event::CancelJob {
            job_id: job_id.to_owned(),
            reply,
        });
    }

    /// Frees a finished job's result once it has been read.
    pub fn release(&self, job_id: &str) {
        self.handle.send(Event::ReleaseJob {
            job_id: job_id.to_owned(),
        });
    }

    /// Follows a job's status, running or finished.
    pub fn job_status(&self, job_id: &str) -> Result<watch::Receiver<JobStatus>, Status> {
        self.handle
            .directory
            .get(job_id)
            .ok_or_else(|| Error::UnknownJob(job_id.chars().take(80).collect()).into())
    }
}

/// Cancels a job if dropped before the job finished, and releases its
/// result if dropped after: for a caller that waits on a job and may go away.
pub struct JobGuard {
    jobs: SchedulerGrpc,
    job_id: String,
    finished: bool,
}

impl JobGuard {
    pub fn new(jobs: SchedulerGrpc, job_id: &str) -> Self {
        Self {
            jobs,
            job_id: job_id.to_owned(),
            finished: false,
        }
    }

    /// The job has ended: from now on, dropping the guard releases its result.
    pub fn finished(&mut self) {
        self.finished = true;
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        if self.finished {
            self.jobs.release(&self.job_id);
        } else {
            self.jobs.cancel_in_background(&self.job_id);
        }
    }
}

fn new_job_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_owned()
}

pub(crate) fn is_final(state: i32) -> bool {
    JobState::try_from(state).is_ok_and(crate::state::is_final)
}

/// Longest query text kept in the job history.
const MAX_RECORDED_QUERY_BYTES: usize = 16 * 1024;

/// What the job history shows of a query: its text, without secrets.
fn describe_query(query: &Query) -> String {
    match query {
        Query::Sql(sql) if sql.len() <= MAX_RECORDED_QUERY_BYTES => redact_sql(sql),
        Query::Sql(sql) => {
            let mut end = MAX_RECORDED_QUERY_BYTES;
            while !sql.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}...", redact_sql(&sql[..end]))
        }
        Query::LogicalPlan(bytes) => format!("a client-built plan of {} bytes", bytes.len()),
    }
}

/// How long tasks cancelled with a job may go on writing.
const STRAGGLER_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

impl SchedulerGrpc {
    /// Hands a planned job to the event loop; the returned receiver follows
    /// its status.
    fn start_job(
        &self,
        job_id: String,
        description: String,
        settings: Vec<Setting>,
        mut job: StagedJob,
    ) -> Result<watch::Receiver<JobStatus>, Error> {
        let (status, watcher) = watch::channel(JobStatus {
            job_id: job_id.clone(),
            state: JobState::Queued.into(),
            stages_total: job.stages.len() as u32,
            ..JobStatus::default()
        });
        self.handle
            .directory
            .insert(job_id.clone(), watcher.clone());
        self.clean_up_storage_when_done(&job_id, &job, &watcher);
        self.restore_stores_if_the_job_fails(std::mem::take(&mut job.configured_stores), &watcher);
        let submitted = self.handle.send(Event::JobSubmitted(Box::new(SubmittedJob {
            job_id,
            query: description,
            settings,
            stores: job.stores,
            durable_shuffle: job.durable_shuffle,
            writes_to: job.writes_to,
            limits: job.limits,
            stages: job.stages,
            encoded: job.encoded,
            adaptive: job.adaptive,
            status,
            replanner: job.replanner,
        })));
        if !submitted {
            return Err(Error::ShuttingDown);
        }
        Ok(watcher)
    }

    /// Plans a statement and starts its job; statements that need no
    /// executor (catalog changes) have run when this returns. Returns the
    /// job's id and the schema of its result.
    pub async fn submit(
        &self,
        query: Query,
        parameters: Option<ParamValues>,
        settings: Vec<Setting>,
    ) -> Result<(String, SchemaRef), Error> {
        let job_id = new_job_id();
        let description = describe_query(&query);
        let started = std::time::Instant::now();
        let planned = match parameters {
            None => self.planner.plan(&job_id, query, &settings).await?,
            Some(values) => {
                let Query::Sql(sql) = &query else {
                    return Err(Error::Query(DataFusionError::Plan(
                        "parameters need a SQL statement".into(),
                    )));
                };
                self.planner
                    .plan_with_parameters(&job_id, sql, values, &settings)
                    .await?
            }
        };
        debug!(%job_id, planning_us = started.elapsed().as_micros() as u64, "job planned");
        let schema = match planned {
            Planned::Analyze { job, verbose } => {
                return self
                    .analyze(job_id, description, settings, job, verbose)
                    .await;
            }
            Planned::Done { schema } => {
                let status = JobStatus {
                    job_id: job_id.clone(),
                    state: JobState::Succeeded.into(),
                    elapsed_micros: started.elapsed().as_micros() as u64,
                    ..JobStatus::default()
                };
                let now = unix_millis();
                self.handle.recorder.record(JobRecord {
                    status: Some(status.clone()),
                    query: description,
                    submitted_at_unix_ms: now,
                    finished_at_unix_ms: now,
                    ..JobRecord::default()
                });
                self.handle
                    .directory
                    .insert(job_id.clone(), watch::channel(status).1);
                schema
            }
            Planned::Stages(job) => {
                let schema = Arc::clone(&job.schema);
                self.start_job(job_id.clone(), description, settings, job)?;
                schema
            }
            Planned::CreateTableAs {
                write,
                register,
                managed_key,
            } => {
                // Stored first, so that a scheduler that stops between the
                // commit and the registration registers the table when it
                // starts again (see `register_pending_tables`).
                let pending = PendingTable {
                    job_id: job_id.clone(),
                    statements: register,
                    managed_key,
                    settings: settings.clone(),
                };
                self.planner.put_pending_table(pending.clone()).await?;
                let started = self.start_job(job_id.clone(), description, settings, write);
                let mut watcher = match started {
                    Ok(watcher) => watcher,
                    Err(e) => {
                        self.planner.remove_pending_table(job_id).await?;
                        return Err(e);
                    }
                };
                let planner = self.planner.clone();
                let write_id = job_id.clone();
                // Detached, so that the table is registered even if the client
                // goes away while its write runs.
                let registered = tokio::spawn(async move {
                    let finished = watcher
                        .wait_for(|status| is_final(status.state))
                        .await
                        .map(|status| status.clone())
                        .map_err(|_| Error::ShuttingDown)?;
                    if finished.state() != JobState::Succeeded {
                        planner.remove_pending_table(write_id.clone()).await?;
                        return Err(Error::TableWrite {
                            job_id: write_id,
                            message: finished.error,
                        });
                    }
                    // A failure leaves the table pending: the next start of
                    // the scheduler tries again.
                    planner.register_pending_table(pending).await
                });
                registered.await.map_err(|_| Error::ShuttingDown)??;
                Arc::new(arrow::datatypes::Schema::empty())
            }
        };
        Ok((job_id, schema))
    }

    /// Runs the job under `EXPLAIN ANALYZE` to its end, then starts a job
    /// whose result is the report of what its stages did. Returns that job.
    async fn analyze(
        &self,
        job_id: String,
        description: String,
        settings: Vec<Setting>,
        job: StagedJob,
        verbose: bool,
    ) -> Result<(String, SchemaRef), Error> {
        let stages = job.stages.clone();
        let mut watcher = self.start_job(job_id.clone(), description, settings.clone(), job)?;
        // The analyzed job's own result is not wanted; a caller that goes
        // away cancels it.
        let mut guard = JobGuard::new(self.clone(), &job_id);
        let finished = watcher
            .wait_for(|status| is_final(status.state))
            .await
            .map(|status| status.clone())
            .map_err(|_| Error::ShuttingDown)?;
        guard.finished();
        if finished.state() != JobState::Succeeded {
            return Err(Error::AnalyzedJob {
                job_id,
                message: finished.error,
            });
        }
        let batch = analyze::report(&stages, &finished, verbose)
            .map_err(|e| Error::Query(DataFusionError::from(e)))?;
        let report_id = new_job_id();
        let report = self.planner.stage_result(&report_id, batch).await?;
        let schema = Arc::clone(&report.schema);
        let description = format!("the report of EXPLAIN ANALYZE job {job_id}");
        self.start_job(report_id.clone(), description, settings, report)?;
        Ok((report_id, schema))
    }

    /// Once a job has ended, however it ended, deletes what it left in
    /// object storage (see [`clean_up_job_storage`]). It does so twice:
    /// tasks cancelled with the job may still be writing for a moment after
    /// it ends.
    fn clean_up_storage_when_done(
        &self,
        job_id: &str,
        job: &StagedJob,
        watcher: &watch::Receiver<JobStatus>,
    ) {
        if job.durable_shuffle.is_empty() && job.writes_to.is_none() {
            return;
        }
        let stores = job_stores(&self.planner.object_stores(), &job.stores, job_id);
        let job_id = job_id.to_owned();
        let durable = job.durable_shuffle.clone();
        let writes_to = job.writes_to.clone().unwrap_or_default();
        let mut watcher = watcher.clone();
        tokio::spawn(async move {
            // An error means the scheduler is stopping; the data stays.
            let succeeded = match watcher.wait_for(|status| is_final(status.state)).await {
                Ok(status) => status.state() == JobState::Succeeded,
                Err(_) => return,
            };
            for pass in 0..2 {
                if pass > 0 {
                    tokio::time::sleep(STRAGGLER_GRACE).await;
                }
                // Another writer of the table may start as soon as this job
                // ends, so an overwrite's deletions are left to its commit.
                let finish = FinishOverwrite::No;
                let ended = if succeeded {
                    JobEnded::Succeeded
                } else {
                    JobEnded::Otherwise
                };
                let settled =
                    clean_up_job_storage(&stores, &job_id, &durable, &writes_to, ended, finish)
                        .await
                        .ok()
                        .flatten();
                if pass == 0 && !succeeded && matches!(settled, Some(Settled::Committed { .. })) {
                    // The event loop settles a write whose commit may have
                    // committed before its job ends; only one it could not
                    // settle (a folded manifest, a store that did not
                    // answer) comes here: the job was told it ended otherwise.
                    warn!(%job_id, table = %writes_to,
                        "the job did not succeed, but its write had committed: its rows are in the table");
                }
            }
        });
    }

    /// Puts back the stores that a job's statement configured once the job
    /// has failed or been cancelled, as for a statement that fails to plan:
    /// a `COPY` with wrong credentials must not leave them to every later
    /// job on that bucket. A location configured again since stays as it is.
    fn restore_stores_if_the_job_fails(
        &self,
        configured: Vec<ReplacedStore>,
        watcher: &watch::Receiver<JobStatus>,
    ) {
        if configured.is_empty() {
            return;
        }
        let stores = self.planner.object_stores();
        let mut watcher = watcher.clone();
        tokio::spawn(async move {
            let Ok(status) = watcher.wait_for(|status| is_final(status.state)).await else {
                return;
            };
            if status.state() != JobState::Succeeded {
                for replaced in configured.into_iter().rev() {
                    stores.restore_if_current(replaced);
                }
            }
        });
    }

    /// Cleans up after the jobs that a scheduler restart interrupted (see
    /// [`crate::state::event_loop::spawn`]): their durable map outputs, and their
    /// writes, rolled back or, when their manifest was written, finished.
    /// Runs before the scheduler takes jobs, so no other job writes their
    /// tables meanwhile; each job's data that its store does not clean up
    /// within [`RESTART_CLEAN_UP_TIMEOUT`] is left, with a warning (see
    /// [`settle_while_starting`]). A write on a store that the start found
    /// `silent` is not tried, and one whose store does not answer now makes
    /// it silent.
    ///
    /// Writes are settled only once `leases_ended` (one executor timeout
    /// after the start began): by then every executor of the previous
    /// scheduler has seen its lease run out and stopped its tasks, so no
    /// commit still moves files in. Returns how each write it could settle
    /// was settled, and which it did not try.
    pub async fn clean_up_interrupted_jobs(
        &self,
        interrupted: &[InterruptedJob],
        leases_ended: tokio::time::Instant,
        silent: &SilentStores,
    ) -> SettledWrites {
        let shared = self.planner.object_stores();
        if interrupted
            .iter()
            .any(|job| !job.record.writes_to.is_empty())
        {
            let wait = leases_ended.saturating_duration_since(tokio::time::Instant::now());
            info!(
                wait_millis = wait.as_millis() as u64,
                "waiting for the previous scheduler's executors to stop their tasks \
                 before settling interrupted writes"
            );
            tokio::time::sleep_until(leases_ended).await;
        }
        let clean_ups = interrupted.iter().filter_map(|job| {
            let record = &job.record;
            let job_id = &record.status.as_ref()?.job_id;
            let has_data = !record.durable_shuffle.is_empty() || !record.writes_to.is_empty();
            let stores = settling_stores(&shared, job);
            has_data.then_some(async move {
                let settled = settle_while_starting(
                    &stores,
                    job_id,
                    &record.durable_shuffle,
                    &record.writes_to,
                    silent,
                )
                .await;
                (job_id.clone(), settled)
            })
        });
        let mut writes = SettledWrites::default();
        for (job_id, attempt) in futures::future::join_all(clean_ups).await {
            match attempt {
                StartAttempt::Settled(Some(settled)) => {
                    writes.settled.insert(job_id, settled);
                }
                StartAttempt::NotTried => {
                    writes.not_tried.insert(job_id);
                }
                StartAttempt::Settled(None) | StartAttempt::Failed => {}
            }
        }
        writes
    }

    /// Registers the tables of `CREATE TABLE ... AS` jobs that a stopped
    /// scheduler left pending: the job had succeeded, or it was interrupted
    /// (`interrupted`) after its write committed (`settled`). A pending
    /// table whose job failed is forgotten, its write rolled back; one whose
    /// write could not be settled, or that cannot be registered now, stays
    /// pending: see [`LeftPending`] for what is done with them while the
    /// scheduler runs ([`SchedulerGrpc::settle_later`]). Neither a write nor
    /// a table on a store that the start found `silent` is tried.
    pub async fn register_pending_tables(
        &self,
        interrupted: &[InterruptedJob],
        settled: &HashMap<String, Settled>,
        silent: &SilentStores,
    ) -> LeftPending {
        let mut left = LeftPending::default();
        let (pending, records) = match self.planner.pending_tables().await {
            Ok(found) => found,
            Err(e) => {
                let e = redacted_error(&e);
                warn!(%e, "cannot read the tables that CREATE TABLE AS jobs left to register");
                // Any of them may have a table to register.
                left.jobs = interrupted.iter().map(|job| job.id().to_owned()).collect();
                return left;
            }
        };
        for table in pending {
            let job_id = table.job_id.clone();
            let record = records
                .iter()
                .find(|record| record.status.as_ref().is_some_and(|s| s.job_id == job_id));
            let was_interrupted = interrupted.iter().any(|job| job.id() == job_id);
            let succeeded = record
                .and_then(|record| record.status.as_ref())
                .is_some_and(|status| status.state() == JobState::Succeeded);
            let writes_to = record.map_or("", |record| record.writes_to.as_str());
            let write = match settled.get(&job_id) {
                Some(settled) => Some(*settled),
                // An earlier start left it pending and recorded its job as
                // failed; settling a write is repeatable.
                None if !succeeded && !was_interrupted && !writes_to.is_empty() => {
                    let stores = self.planner.object_stores();
                    match settle_while_starting(&stores, &job_id, "", writes_to, silent).await {
                        StartAttempt::Settled(settled) => settled,
                        StartAttempt::Failed | StartAttempt::NotTried => None,
                    }
                }
                None => None,
            };
            let registering = succeeded || matches!(write, Some(Settled::Committed { .. }));
            // A write of a job that an earlier start recorded as failed,
            // settled now as committed: its record says so even while its
            // table stays pending.
            let committed_unrecorded = match (record, write) {
                (Some(record), Some(committed @ Settled::Committed { .. }))
                    if !succeeded && !was_interrupted =>
                {
                    Some((record, committed))
                }
                _ => None,
            };
            let store = match registering {
                true => self.store_of_pending(&table).await,
                false => None,
            };
            if let Some(why) = silent.not_tried(store) {
                info!(%job_id, %why, "not registering the table of a CREATE TABLE AS job now; \
                    it stays pending, and is tried again");
                if let Some((record, committed)) = committed_unrecorded {
                    self.record_committed_left_pending(record, committed);
                }
                left.to_register.push(job_id.clone());
                left.jobs.insert(job_id);
                continue;
            }
            let outcome = match write {
                _ if succeeded => self.planner.register_pending_table(table).await,
                Some(Settled::Committed { .. }) => {
                    let registered = self.planner.register_pending_table(table).await;
                    // An interrupted job is recorded with the others.
                    if registered.is_ok()
                        && !was_interrupted
                        && let Some(record) = record
                    {
                        let mut record = record.clone();
                        record.write_unsettled = false;
                        record_written(&mut record, write.as_ref());
                        self.record_ended(record, JobState::Succeeded, String::new());
                    }
                    registered
                }
                // Unsettled: its staging folder may still hold a commit.
                None if !writes_to.is_empty() => {
                    warn!(%job_id, "the write of a CREATE TABLE AS job could not be settled; \
                        its table stays pending until it is");
                    // An interrupted job is retried with the others.
                    if !was_interrupted && let Some(record) = record {
                        left.to_settle.push(InterruptedJob {
                            record: record.clone(),
                            stores: Vec::new(),
                        });
                    }
                    left.jobs.insert(job_id);
                    continue;
                }
                _ => self.planner.remove_pending_table(job_id.clone()).await,
            };
            match outcome {
                Ok(()) => info!(%job_id, "settled the table of a CREATE TABLE AS job left pending"),
                Err(e) => {
                    if store_did_not_answer(&e) {
                        silent.did_not_answer(store, || {
                            format!("when the table of job {job_id} was registered")
                        });
                    }
                    let e = redacted_error(&e);
                    warn!(%job_id, %e, "cannot register the table of a CREATE TABLE AS job; \
                        it stays pending, and is tried again");
                    if registering {
                        left.to_register.push(job_id.clone());
                    }
                    if let Some((record, committed)) = committed_unrecorded {
                        self.record_committed_left_pending(record, committed);
                    }
                    left.jobs.insert(job_id);
                }
            }
        }
        left
    }

    /// Records that the job of `record`, which an earlier start recorded
    /// as failed, committed its write (`committed`, with what it wrote),
    /// and that its table is registered once it can be: the job is then
    /// recorded as succeeded ([`SchedulerGrpc::register_now`]), with these
    /// counts.
    fn record_committed_left_pending(&self, record: &JobRecord, committed: Settled) {
        let job = InterruptedJob {
            record: record.clone(),
            stores: Vec::new(),
        };
        let job_id = job.id().to_owned();
        let settled = SettledWrites::one(job_id.clone(), committed);
        let left_pending = HashSet::from([job_id]);
        self.record_interrupted_writes(std::slice::from_ref(&job), &settled, &left_pending);
    }

    /// The store that the table `pending` creates lies on (see
    /// [`Planner::store_of`]).
    async fn store_of_pending(&self, pending: &PendingTable) -> Option<u64> {
        for sql in &pending.statements {
            if let Some(store) = self.planner.store_of(sql, &pending.settings).await {
                return Some(store);
            }
        }
        None
    }

    /// Records how the writes of the jobs that a restart interrupted were
    /// settled (`writes`). A job whose write committed succeeded: its
    /// rows are in the table, and submitting it again would write them
    /// twice (unless its table stays pending, `left_pending`, which is
    /// said). One rolled back may be submitted again. One not settled may
    /// have committed or not: returned, to be settled while the scheduler
    /// runs ([`SchedulerGrpc::settle_later`]), unless the starts gave up.
    /// A start counts towards giving up only if it tried: one that found
    /// the store silent already (`writes.not_tried`) waited on it for
    /// something else. Once the job is a day old, every start counts.
    pub fn record_interrupted_writes(
        &self,
        interrupted: &[InterruptedJob],
        writes: &SettledWrites,
        left_pending: &HashSet<String>,
    ) -> Vec<InterruptedJob> {
        let settled = &writes.settled;
        let mut unsettled = Vec::new();
        for job in interrupted {
            if job.record.writes_to.is_empty() {
                continue;
            }
            let job_id = job.id();
            let mut record = job.record.clone();
            record.write_unsettled = false;
            record_written(&mut record, settled.get(job_id));
            let (state, error) = match settled.get(job_id) {
                Some(Settled::Committed { .. }) if !left_pending.contains(job_id) => {
                    (JobState::Succeeded, String::new())
                }
                Some(Settled::Committed { .. }) => (
                    JobState::Failed,
                    format!(
                        "{RESTARTED}; its write committed, and its table is registered once \
                         it can be (tried again while the scheduler runs, and at its next \
                         start): do not submit it again"
                    ),
                ),
                Some(Settled::RolledBack { .. }) => (
                    JobState::Failed,
                    format!("{RESTARTED}; its write was rolled back: submit it again"),
                ),
                None => {
                    // The next starts try again, with the job's credentials,
                    // but not for ever: each may wait a minute on the store.
                    if !writes.not_tried.contains(job_id) || left_for_a_day(&record) {
                        record.settle_failures += 1;
                    }
                    record.write_unsettled = record.settle_failures < MOST_SETTLING_STARTS;
                    let next = if record.write_unsettled {
                        unsettled.push(job.clone());
                        "it is tried again while the scheduler runs and at its next start, or \
                         else a write into the table settles it once it is a day old"
                    } else {
                        "the scheduler gives up; a write into the table settles it once it is \
                         a day old"
                    };
                    (
                        JobState::Failed,
                        format!(
                            "{RESTARTED}, and whether its write committed could not be told \
                             ({} of {MOST_SETTLING_STARTS} starts tried; {next}): check its \
                             table before submitting it again",
                            record.settle_failures
                        ),
                    )
                }
            };
            self.record_ended(record, state, error);
        }
        unsettled
    }

    /// Settles, while the scheduler runs, the writes that its start could
    /// not (`unsettled`: their store did not answer), every
    /// [`SETTLE_RETRY`] until each is, and records how each ended. Safe
    /// beside new writers of their tables: a committed overwrite's
    /// deletions are left to later commits ([`FinishOverwrite::No`]), and
    /// the rest deletes only the job's own files, which no running job
    /// writes.
    ///
    /// The tables of `to_register` (`CREATE TABLE AS` jobs whose write
    /// committed, but whose table the start could not register) are
    /// registered likewise.
    pub fn settle_later(&self, unsettled: Vec<InterruptedJob>, to_register: Vec<String>) {
        if unsettled.is_empty() && to_register.is_empty() {
            return;
        }
        let service = self.clone();
        tokio::spawn(async move {
            let (mut unsettled, mut to_register) = (unsettled, to_register);
            while !unsettled.is_empty() || !to_register.is_empty() {
                tokio::time::sleep(SETTLE_RETRY).await;
                let mut left = Vec::new();
                for job in unsettled {
                    match service.settle_now(&job).await {
                        SettledNow::No => left.push(job),
                        SettledNow::Yes => {}
                        SettledNow::TableLeftPending => to_register.push(job.id().to_owned()),
                    }
                }
                unsettled = left;
                let mut left = Vec::new();
                for job_id in to_register {
                    if !service.register_now(&job_id).await {
                        left.push(job_id);
                    }
                }
                to_register = left;
            }
            info!("every write and table that the start left is settled");
        });
    }

    /// Registers the table that the `CREATE TABLE AS` job `job_id` left
    /// pending, its write committed; returns whether it is no longer
    /// pending. Its job, recorded as failed for want of its table, is then
    /// recorded as succeeded.
    async fn register_now(&self, job_id: &str) -> bool {
        // Its record as last recorded (with what its write wrote).
        self.handle.recorder.flushed().await;
        let (tables, records) = match self.planner.pending_tables().await {
            Ok(found) => found,
            Err(_) => return false,
        };
        let Some(table) = tables.into_iter().find(|table| table.job_id == job_id) else {
            return true;
        };
        if let Err(e) = self.planner.register_pending_table(table).await {
            let e = redacted_error(&e);
            debug!(%job_id, %e, "cannot register the table of a CREATE TABLE AS job yet");
            return false;
        }
        let record = records
            .into_iter()
            .find(|record| record.status.as_ref().is_some_and(|s| s.job_id == job_id));
        if let Some(mut record) = record
            && record
                .status
                .as_ref()
                .is_some_and(|status| status.state() != JobState::Succeeded)
        {
            record.write_unsettled = false;
            self.record_ended(record, JobState::Succeeded, String::new());
        }
        info!(%job_id, "registered the table of a CREATE TABLE AS job left pending");
        true
    }

    /// Tries once to settle the write of `job`, which the start could not,
    /// deletes its durable map outputs, and records its job as it ended. A `CREATE TABLE AS` table it left
    /// pending is registered if the write committed, and forgotten if it
    /// was rolled back.
    async fn settle_now(&self, job: &InterruptedJob) -> SettledNow {
        let job_id = job.id();
        let stores = settling_stores(&self.planner.object_stores(), job);
        // Its durable map outputs too: a start that did not try its
        // silent store left them (deleting them again deletes nothing).
        let settling = settle_after_restart(
            &stores,
            job_id,
            &job.record.durable_shuffle,
            &job.record.writes_to,
            FinishOverwrite::No,
        );
        let Ok(Some(settled)) = settling.await else {
            return SettledNow::No;
        };
        let pending = match self.planner.pending_tables().await {
            Ok((tables, _)) => tables.into_iter().find(|table| table.job_id == job_id),
            Err(e) => {
                let e = redacted_error(&e);
                warn!(%job_id, %e, "cannot read the tables that CREATE TABLE AS jobs left to register");
                return SettledNow::No;
            }
        };
        let mut left_pending = HashSet::new();
        if let Some(table) = pending {
            let outcome = match settled {
                Settled::Committed { .. } => self.planner.register_pending_table(table).await,
                Settled::RolledBack { .. } => {
                    self.planner.remove_pending_table(job_id.to_owned()).await
                }
            };
            if let Err(e) = outcome {
                let e = redacted_error(&e);
                warn!(%job_id, %e, "cannot settle the table of a CREATE TABLE AS job; \
                    it stays pending, and is tried again");
                left_pending.insert(job_id.to_owned());
            }
        }
        let table_left = matches!(settled, Settled::Committed { .. }) && !left_pending.is_empty();
        let settled = SettledWrites::one(job_id.to_owned(), settled);
        self.record_interrupted_writes(std::slice::from_ref(job), &settled, &left_pending);
        info!(%job_id, "settled a write that the start could not");
        if table_left {
            SettledNow::TableLeftPending
        } else {
            SettledNow::Yes
        }
    }

    /// Records, after a restart, how a job whose write was settled ended;
    /// its write stays to be settled if `record` says so.
    fn record_ended(&self, mut record: JobRecord, state: JobState, error: String) {
        let Some(status) = record.status.as_mut() else {
            return;
        };
        status.state = state.into();
        status.error = error;
        // It ended when its write was settled: the time it took counts from
        // its submission to then, the scheduler's stop included.
        record.finished_at_unix_ms = unix_millis();
        let elapsed_ms = record
            .finished_at_unix_ms
            .saturating_sub(record.submitted_at_unix_ms);
        status.elapsed_micros = elapsed_ms.saturating_mul(1000);
        if state == JobState::Succeeded {
            // Every stage ran: the write that its last one made committed.
            status.stages_done = status.stages_total;
        }
        info!(job_id = %status.job_id, state = ?status.state(), %status.error,
            "recorded how a job's write, settled after the restart, ended");
        self.handle.settling.ended(status);
        self.handle
            .directory
            .insert(status.job_id.clone(), watch::channel(status.clone()).1);
        self.handle.recorder.record(record);
    }
}

/// The `CREATE TABLE AS` tables that a start left pending
/// ([`SchedulerGrpc::register_pending_tables`]).
#[derive(Debug, Default)]
pub struct LeftPending {
    /// The jobs whose tables stay pending.
    pub jobs: HashSet<String>,
    /// Those of them whose write committed: their tables are registered
    /// once they can be.
    pub to_register: Vec<String>,
    /// Those of them whose job an earlier start recorded, and whose write
    /// could not be settled now: settled once it can be, with the catalog's
    /// stores, as that start settled it. (Interrupted jobs are not among
    /// them: [`SchedulerGrpc::record_interrupted_writes`] returns those.)
    pub to_settle: Vec<InterruptedJob>,
}

/// Whether the job of `record` was submitted longer ago than a later write
/// into its table waits before it settles the job's write as abandoned:
/// from then on every start counts towards giving up, tried or not, so that
/// a store gone for good is not retried for ever.
fn left_for_a_day(record: &JobRecord) -> bool {
    let age_ms = unix_millis().saturating_sub(record.submitted_at_unix_ms);
    age_ms > ABANDONED_AFTER.num_milliseconds().unsigned_abs()
}

/// How the writes of jobs that a restart interrupted were settled.
#[derive(Debug, Default)]
pub struct SettledWrites {
    /// By job, each write that could be settled.
    pub settled: HashMap<String, Settled>,
    /// The jobs whose write was not tried: the start had found its store
    /// silent.
    pub not_tried: HashSet<String>,
}

impl SettledWrites {
    fn one(job_id: String, settled: Settled) -> Self {
        Self {
            settled: HashMap::from([(job_id, settled)]),
            not_tried: HashSet::new(),
        }
    }
}

/// What the start did with one interrupted job's write.
enum StartAttempt {
    /// Settled, or there was none (`None`).
    Settled(Option<Settled>),
    Failed,
    /// Its store was found silent earlier in the start.
    NotTried,
}

/// Starts of the scheduler that try to settle an interrupted write whose
/// store does not answer before it gives up and leaves it to a later write
/// into the table.
const MOST_SETTLING_STARTS: u32 = 5;

/// The stores to settle the data of `job` with: the job's own credentials,
/// or the catalog's (`shared`) for a job recorded without them.
fn settling_stores(shared: &Arc<StoreRegistry>, job: &InterruptedJob) -> Arc<StoreRegistry> {
    match job.stores.as_slice() {
        [] => Arc::clone(shared),
        kept => job_stores(shared, kept, job.id()),
    }
}

/// Puts in a job's record the files and bytes that its write committed,
/// as its manifest records them: the status recorded while the job ran
/// has none of them, and its executors' reports died with the scheduler.
fn record_written(record: &mut JobRecord, settled: Option<&Settled>) {
    if let (
        Some(status),
        Some(Settled::Committed {
            written: Some(written),
        }),
    ) = (record.status.as_mut(), settled)
    {
        status.table_files_written = written.files;
        status.table_bytes_written = written.bytes;
    }
}

/// What one try of [`SchedulerGrpc::settle_later`] did with a write.
enum SettledNow {
    /// It could not be settled: tried again.
    No,
    Yes,
    /// Settled as committed, but its `CREATE TABLE AS` table could not be
    /// registered: tried again.
    TableLeftPending,
}

/// How often a running scheduler tries again to settle the writes that
/// its start could not.
const SETTLE_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// Longest wait for object storage when cleaning up after a restart.
const RESTART_CLEAN_UP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Deletes what an ended job left in object storage: its durable map
/// outputs (`durable`, if not empty), and for a write into `writes_to` (if
/// not empty) its staging folder, rolling back a commit that did not write
/// its manifest ([`settle_write`]); returns how the write was settled
/// (`None` for no write), or why it could not be. Failures are logged: the
/// data stays, and a failure to delete the map outputs is only logged.
async fn clean_up_job_storage(
    stores: &StoreRegistry,
    job_id: &str,
    durable: &str,
    writes_to: &str,
    ended: JobEnded,
    finish: FinishOverwrite,
) -> Result<Option<Settled>, DataFusionError> {
    remove_durable_outputs(stores, job_id, durable).await;
    settle_job_write(stores, job_id, writes_to, ended, finish).await
}

/// Deletes the durable map outputs of `job_id` under `durable`, if not
/// empty; a failure is logged, and the data stays.
async fn remove_durable_outputs(stores: &StoreRegistry, job_id: &str, durable: &str) {
    if !durable.is_empty()
        && let Err(e) = durable::remove_job(stores, durable, job_id).await
    {
        let e = redacted_error(&e);
        warn!(%job_id, %e, "cannot remove durable shuffle data");
    }
}

/// Settles the write of `job_id` into `writes_to`, if not empty (see
/// [`clean_up_job_storage`]); a failure is logged and returned.
async fn settle_job_write(
    stores: &StoreRegistry,
    job_id: &str,
    writes_to: &str,
    ended: JobEnded,
    finish: FinishOverwrite,
) -> Result<Option<Settled>, DataFusionError> {
    if writes_to.is_empty() {
        return Ok(None);
    }
    match settle_write(stores, writes_to, job_id, ended, finish).await {
        Ok(settled) => {
            debug!(%job_id, ?settled, "settled the job's write");
            Ok(Some(settled))
        }
        Err(e) => {
            let redacted = redacted_error(&e);
            warn!(%job_id, e = %redacted, "cannot settle a write's files");
            Err(e)
        }
    }
}

/// Settles the write of an ended job (see [`clean_up_job_storage`]) after a
/// restart, with `stores`, and deletes its durable map outputs meanwhile,
/// each within [`RESTART_CLEAN_UP_TIMEOUT`]: the two may lie on different
/// stores, and one that holds its part up must keep the other from neither
/// being done nor being told.
async fn settle_after_restart(
    stores: &StoreRegistry,
    job_id: &str,
    durable: &str,
    writes_to: &str,
    finish: FinishOverwrite,
) -> Result<Option<Settled>, NotSettled> {
    let settling = settle_job_write(stores, job_id, writes_to, JobEnded::Otherwise, finish);
    let removing = remove_durable_outputs(stores, job_id, durable);
    let (settled, removed) = tokio::join!(
        tokio::time::timeout(RESTART_CLEAN_UP_TIMEOUT, settling),
        tokio::time::timeout(RESTART_CLEAN_UP_TIMEOUT, removing),
    );
    if removed.is_err() {
        warn!(%job_id, timeout_secs = RESTART_CLEAN_UP_TIMEOUT.as_secs(),
            "removing the durable shuffle data of an interrupted job timed out; it stays");
    }
    match settled {
        Ok(Ok(settled)) => Ok(settled),
        Ok(Err(e)) => Err(NotSettled::Failed(e)),
        Err(_) => {
            warn!(%job_id, timeout_secs = RESTART_CLEAN_UP_TIMEOUT.as_secs(),
                "settling the write of an interrupted job timed out; its data stays");
            Err(NotSettled::TimedOut)
        }
    }
}

/// Why [`settle_after_restart`] could not settle a write.
enum NotSettled {
    Failed(DataFusionError),
    /// Its store answered, or not, too slowly.
    TimedOut,
}

/// Settles, while the scheduler starts, the write of `job_id` into
/// `writes_to` with `stores`, and deletes its durable map outputs
/// (`durable`): see [`settle_after_restart`]. Neither is tried when the
/// write's store is `silent` (the running scheduler's retries do both); a
/// store that does not answer now becomes silent. One that answers, however
/// slowly, does not.
async fn settle_while_starting(
    stores: &StoreRegistry,
    job_id: &str,
    durable: &str,
    writes_to: &str,
    silent: &SilentStores,
) -> StartAttempt {
    let store = stores.identity_of_location(writes_to, None);
    if let Some(why) = silent.not_tried(store) {
        info!(%job_id, %why, "not settling the write of an interrupted job now");
        return StartAttempt::NotTried;
    }
    match settle_after_restart(stores, job_id, durable, writes_to, FinishOverwrite::Yes).await {
        Ok(settled) => StartAttempt::Settled(settled),
        Err(NotSettled::Failed(e)) => {
            if store_did_not_answer(&e) {
                silent.did_not_answer(store, || {
                    format!("when the write of job {job_id} was settled")
                });
            }
            StartAttempt::Failed
        }
        Err(NotSettled::TimedOut) => StartAttempt::Failed,
    }
}

#[tonic::async_trait]
impl SchedulerService for SchedulerGrpc {
    type ExecutorChannelStream = BoxStream<SchedulerMessage>;
    type WatchJobStream = BoxStream<JobStatus>;

    async fn executor_channel(
        &self,
        request: Request<Streaming<ExecutorMessage>>,
    ) -> Result<Response<Self::ExecutorChannelStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("the control stream closed before registering")
        })?;
        let Some(executor_message::Kind::Register(register)) = first.kind else {
            return Err(Status::invalid_argument(
                "the first message of a control stream must be a registration",
            ));
        };
        if register.protocol_version != PROTOCOL_VERSION {
            warn!(
                executor = register.protocol_version,
                scheduler = PROTOCOL_VERSION,
                "refusing executor with another protocol version"
            );
            return Err(Status::failed_precondition(format!(
                "protocol version mismatch: the executor speaks version {}, the scheduler speaks version {PROTOCOL_VERSION}",
                register.protocol_version
            )));
        }
        let address = register
            .address
            .ok_or_else(|| Status::invalid_argument("registration without an address"))?;
        validate_identifier("executor_id", &address.executor_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if register.slots == 0 {
            return Err(Status::invalid_argument(
                "an executor needs at least one slot",
            ));
        }
        let executor_id = address.executor_id.clone();
        let connection = self.connections.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        self.send(Event::ExecutorConnected {
            address,
            slots: register.slots as usize,
            connection,
            sender,
        })?;
        let handle = self.handle.clone();
        tokio::spawn(async move {
            let clean = loop {
                match inbound.message().await {
                    Ok(Some(ExecutorMessage {
                        kind: Some(message),
                    })) => {
                        let event = Event::ExecutorMessage {
                            executor_id: executor_id.clone(),
                            connection,
                            message,
                        };
                        if !handle.send(event) {
                            return;
                        }
                    }
                    Ok(Some(ExecutorMessage { kind: None })) => {}
                    Ok(None) => break true,
                    Err(status) => {
                        info!(%executor_id, %status, "control stream broke");
                        break false;
                    }
                }
            };
            handle.send(Event::ExecutorDisconnected {
                executor_id,
                connection,
                clean,
            });
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            receiver,
        ))))
    }

    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let request = request.into_inner();
        let query = request.query.ok_or(Error::EmptyQuery)?;
        let (job_id, schema) = self.submit(query, None, request.settings).await?;
        Ok(Response::new(SubmitJobResponse {
            job_id,
            schema: schema_to_bytes(&schema),
        }))
    }

    async fn get_job_status(
        &self,
        request: Request<JobRequest>,
    ) -> Result<Response<JobStatus>, Status> {
        let status = self.job_status(&request.into_inner().job_id)?;
        let current = status.borrow().clone();
        Ok(Response::new(current))
    }

    async fn watch_job(
        &self,
        request: Request<JobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let status = self.job_status(&request.into_inner().job_id)?;
        // The current status goes out at once, then each change as it happens.
        let stream = futures::stream::unfold((Some(status), true), |(state, first)| async move {
            let mut receiver = state?;
            // A dropped sender means the job state is final.
            if !first && receiver.changed().await.is_err() {
                let last = receiver.borrow().clone();
                return Some((Ok(last), (None, false)));
            }
            let mut current = receiver.borrow_and_update().clone();
            if is_final(current.state) {
                return Some((Ok(current), (None, false)));
            }
            // Progress updates go out often; per-stage metrics come with the
            // final one, and from GetJobStatus at any time.
            current.stages.clear();
            Some((Ok(current), (Some(receiver), false)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_job(
        &self,
        request: Request<JobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        let outcome = self.cancel(&request.into_inner().job_id).await?;
        Ok(Response::new(CancelJobResponse {
            cancelled: outcome == CancelOutcome::Cancelled,
            committing: outcome == CancelOutcome::Committing,
            settling: outcome == CancelOutcome::Settling,
        }))
    }

    async fn release_job(
        &self,
        request: Request<JobRequest>,
    ) -> Result<Response<ReleaseJobResponse>, Status> {
        let job_id = request.into_inner().job_id;
        self.job_status(&job_id)?;
        self.send(Event::ReleaseJob { job_id })?;
        Ok(Response::new(ReleaseJobResponse {}))
    }

    async fn list_executors(
        &self,
        _request: Request<ListExecutorsRequest>,
    ) -> Result<Response<ListExecutorsResponse>, Status> {
        let (reply, answer) = oneshot::channel();
        self.send(Event::ListExecutors { reply })?;
        let mut executors = answer
            .await
            .map_err(|_| Status::from(Error::ShuttingDown))?;
        executors.sort_by(|a, b| {
            let id = |info: &ExecutorInfo| info.address.as_ref().map(|a| a.executor_id.clone());
            id(a).cmp(&id(b))
        });
        Ok(Response::new(ListExecutorsResponse { executors }))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => usize::MAX,
            limit => limit as usize,
        };
        // A job that a client saw end may still be on its way to the store.
        self.handle.recorder.flushed().await;
        let store = self.planner.store().clone();
        let mut jobs = tokio::task::spawn_blocking(move || store.jobs())
            .await
            .map_err(|_| Status::from(Error::ShuttingDown))?
            .map_err(Error::from)?;
        // The store has each job as submitted or finished; the directory has
        // the progress of running ones.
        for record in &mut jobs {
            if let Some(status) = record.status.as_mut()
                && let Some(current) = self.handle.directory.get(&status.job_id)
            {
                *status = current.borrow().clone();
            }
        }
        // A listing shows jobs, not their result locations or per-stage metrics.
        for status in jobs.iter_mut().filter_map(|record| record.status.as_mut()) {
            status.result.clear();
            status.stages.clear();
        }
        let skip = jobs.len().saturating_sub(limit);
        Ok(Response::new(ListJobsResponse {
            jobs: jobs.split_off(skip),
        }))
    }

    async fn get_table(
        &self,
        request: Request<GetTableRequest>,
    ) -> Result<Response<GetTableResponse>, Status> {
        let name = request.into_inner().name;
        let schema = self.planner.table_schema(&name).await?;
        Ok(Response::new(GetTableResponse {
            found: schema.is_some(),
            schema: schema.map(|s| schema_to_bytes(&s)).unwrap_or_default(),
        }))
    }
}
