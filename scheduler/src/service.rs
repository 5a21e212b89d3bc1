//! The scheduler's gRPC service: executors' control streams and clients' job calls.

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
use quiver_core::storage::{StoreRegistry, redact_sql, redacted_error};
use quiver_core::write::{FinishOverwrite, JobEnded, Settled, Staging, settle_write_and_staging};
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
use crate::state::event_loop::unix_millis;
use crate::state::{CancelOutcome, Event, SchedulerHandle, SubmittedJob};
use crate::store::JobRecorder;

mod restart;
pub use restart::{LeftPending, SettledWrites};

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
    /// object storage: its durable map outputs ([`remove_durable_outputs`])
    /// and its write's staged files ([`settle_job_write`]). It does so
    /// twice: tasks cancelled with the job may still be writing for a
    /// moment after it ends.
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
        let recorder = self.handle.recorder.clone();
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
                let removed = remove_durable_outputs(&stores, &job_id, &durable).await;
                let settled =
                    settle_job_write(&recorder, &stores, &job_id, &writes_to, ended, finish).await;
                // Cleaned up after the stragglers' grace: the sweep of what
                // clean-ups leave need not look again
                // ([`crate::storage_leftovers`]).
                let write_left = match &settled {
                    Ok(None | Some((_, Staging::Deleted))) => false,
                    Ok(Some((_, Staging::Left))) | Err(_) => true,
                };
                if pass > 0 && removed && !write_left {
                    recorder.storage_cleaned(&job_id);
                }
                let settled = settled.ok().flatten().map(|(settled, _)| settled);
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
}

/// Deletes the durable map outputs of `job_id` under `durable`, if not
/// empty; returns whether none are left. A failure is logged, and the data
/// stays.
async fn remove_durable_outputs(stores: &StoreRegistry, job_id: &str, durable: &str) -> bool {
    if durable.is_empty() {
        return true;
    }
    match durable::remove_job(stores, durable, job_id).await {
        Ok(()) => true,
        Err(e) => {
            let e = redacted_error(&e);
            warn!(%job_id, %e, "cannot remove durable shuffle data");
            false
        }
    }
}

/// Settles the write of `job_id` into `writes_to`, if not empty: deletes
/// its staging folder, rolling back a commit that did not write its
/// manifest ([`settle_write_and_staging`]); returns how the write was
/// settled and whether its staging folder is gone (`None` for no write).
/// A failure is logged and returned: the data stays. A write of a job that
/// did not succeed found committed is noted with what the job left, so that
/// later settlings never roll it back ([`crate::storage_leftovers`]).
async fn settle_job_write(
    recorder: &JobRecorder,
    stores: &StoreRegistry,
    job_id: &str,
    writes_to: &str,
    ended: JobEnded,
    finish: FinishOverwrite,
) -> Result<Option<(Settled, Staging)>, DataFusionError> {
    if writes_to.is_empty() {
        return Ok(None);
    }
    match settle_write_and_staging(stores, writes_to, job_id, ended, finish).await {
        Ok(settled) => {
            debug!(%job_id, ?settled, "settled the job's write");
            recorder.note_settled(job_id, ended, &settled.0);
            Ok(Some(settled))
        }
        Err(e) => {
            let redacted = redacted_error(&e);
            warn!(%job_id, e = %redacted, "cannot settle a write's files");
            Err(e)
        }
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

#[cfg(test)]
mod tests {
    use quiver_proto::JobRecord;

    use super::*;
    use crate::state::JobDirectory;
    use crate::store::StateStore;

    /// A write that a settling finds committed though its job did not
    /// succeed is marked so with what the job left: later settlings take it
    /// as a job that succeeded, and never roll it back. The job's status,
    /// in the history and as the scheduler shows it, says so, once.
    #[tokio::test]
    async fn a_write_found_committed_after_its_job_failed_is_marked() {
        const JOB: &str = "00000000000000a1";
        let folder = tempfile::tempdir().expect("temp");
        let manifests = folder.path().join("t/_manifests");
        std::fs::create_dir_all(&manifests).expect("folder");
        let manifest =
            format!(r#"{{"job_id": "{JOB}", "mode": "Append", "rows": 0, "files": []}}"#);
        std::fs::write(manifests.join(format!("{JOB}.json")), manifest).expect("manifest");
        let url = format!("file://{}/t/", folder.path().display());
        let state = StateStore::in_memory().expect("state");
        let failed = JobStatus {
            job_id: JOB.into(),
            state: JobState::Failed.into(),
            error: "executor lost".into(),
            ..JobStatus::default()
        };
        let record = JobRecord {
            status: Some(failed.clone()),
            finished_at_unix_ms: 1,
            writes_to: url.clone(),
            ..JobRecord::default()
        };
        let directory = JobDirectory::default();
        directory.insert(JOB.into(), watch::channel(failed).1);
        let recorder = JobRecorder::start(state.clone(), directory.clone());
        recorder.record(record.clone());
        recorder.keep_storage_left(JOB, "", &url, &[]);
        let statuses = || {
            let shown = directory.get(JOB).expect("listed").borrow().clone();
            let recorded = state.job(JOB).expect("read").and_then(|r| r.status);
            [shown, recorded.expect("recorded")]
        };
        let stores = StoreRegistry::new();
        for (ended, marked) in [(JobEnded::Succeeded, false), (JobEnded::Otherwise, true)] {
            let finish = FinishOverwrite::No;
            let settled = settle_job_write(&recorder, &stores, JOB, &url, ended, finish)
                .await
                .expect("settled");
            assert!(
                matches!(settled, Some((Settled::Committed { .. }, Staging::Deleted))),
                "{settled:?}"
            );
            recorder.flushed().await;
            let committed = state.writes_committed().expect("marks");
            assert_eq!(committed.contains(JOB), marked, "{ended:?}");
            for status in statuses() {
                assert_eq!(status.state(), JobState::Failed);
                assert_eq!(status.write_committed, marked, "{ended:?}");
                let said = status.error.contains("found its write committed");
                assert_eq!(said, marked, "{}", status.error);
            }
        }
        // Recorded again, or found committed again, it says so once.
        recorder.record(record);
        recorder.write_committed(JOB);
        recorder.flushed().await;
        for status in statuses() {
            assert!(status.write_committed);
            let said = status.error.matches("found its write committed").count();
            assert_eq!(said, 1, "{}", status.error);
        }
    }
}
