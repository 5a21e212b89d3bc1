//! What a restarted scheduler does with the jobs its predecessor left:
//! settling the writes that the restart interrupted (committed or rolled
//! back, with the credentials each job ran with), deleting their durable
//! map outputs, registering the tables of `CREATE TABLE AS` jobs left
//! pending, and recording how each job ended. What the start cannot settle
//! (a store that does not answer) is retried while the scheduler runs
//! ([`SchedulerGrpc::settle_later`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use datafusion::error::DataFusionError;
use quiver_core::storage::{StoreRegistry, redacted_error, store_did_not_answer};
use quiver_core::write::layout::ABANDONED_AFTER;
use quiver_core::write::{FinishOverwrite, JobEnded, Settled};
use quiver_proto::{JobRecord, JobState, PendingTable};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{SchedulerGrpc, remove_durable_outputs, settle_job_write};
use crate::locations::job_stores;
use crate::starting::SilentStores;
use crate::state::event_loop::{InterruptedJob, RESTARTED, unix_millis};
use crate::store::JobRecorder;

impl SchedulerGrpc {
    /// Cleans up after the jobs that a scheduler restart interrupted (see
    /// [`crate::state::event_loop::spawn`]): their durable map outputs, and their
    /// writes, rolled back or, when their manifest was written, finished.
    /// Runs before the scheduler takes jobs, so no other job writes their
    /// tables meanwhile; each job's data that its store does not clean up
    /// within 60 s (`RESTART_CLEAN_UP_TIMEOUT`) is left, with a warning (see
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
        let committed = self.writes_found_committed().await;
        let clean_ups = interrupted.iter().filter_map(|job| {
            let record = &job.record;
            let job_id = &record.status.as_ref()?.job_id;
            let has_data = !record.durable_shuffle.is_empty() || !record.writes_to.is_empty();
            let stores = settling_stores(&shared, job);
            let ended = ended_for(&committed, job_id);
            has_data.then_some(async move {
                let settled = settle_while_starting(
                    &self.handle.recorder,
                    ended,
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
        let committed = self.writes_found_committed().await;
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
                    let (recorder, ended) = (&self.handle.recorder, ended_for(&committed, &job_id));
                    let settling = settle_while_starting(
                        recorder, ended, &stores, &job_id, "", writes_to, silent,
                    );
                    match settling.await {
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

    /// The jobs whose write a settling found committed though they did not
    /// succeed ([`crate::store::StateStore::writes_committed`]), marks
    /// queued so far included: none if they cannot be read, which only
    /// leaves a write whose manifest was retired by mistake to be rolled
    /// back, as before such jobs were marked.
    async fn writes_found_committed(&self) -> HashSet<String> {
        self.handle.recorder.flushed().await;
        match self.planner.writes_committed().await {
            Ok(committed) => committed,
            Err(e) => {
                let e = redacted_error(&e);
                warn!(%e, "cannot read which writes were found committed");
                HashSet::new()
            }
        }
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
            let committed = matches!(settled.get(job_id), Some(Settled::Committed { .. }));
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
            // The error of one left pending says that it committed.
            if let Some(status) = record.status.as_mut() {
                status.write_committed = committed && state != JobState::Succeeded;
            }
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
        let committed = self.writes_found_committed().await;
        let settling = settle_after_restart(
            &self.handle.recorder,
            ended_for(&committed, job_id),
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

/// Settles the write of an ended job (see [`super::settle_job_write`]) after a
/// restart, as its job `ended` ([`ended_for`]), with `stores`, and deletes
/// its durable map outputs meanwhile,
/// each within [`RESTART_CLEAN_UP_TIMEOUT`]: the two may lie on different
/// stores, and one that holds its part up must keep the other from neither
/// being done nor being told.
async fn settle_after_restart(
    recorder: &JobRecorder,
    ended: JobEnded,
    stores: &StoreRegistry,
    job_id: &str,
    durable: &str,
    writes_to: &str,
    finish: FinishOverwrite,
) -> Result<Option<Settled>, NotSettled> {
    let settling = settle_job_write(recorder, stores, job_id, writes_to, ended, finish);
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
        Ok(Ok(settled)) => Ok(settled.map(|(settled, _)| settled)),
        Ok(Err(e)) => Err(NotSettled::Failed(e)),
        Err(_) => {
            warn!(%job_id, timeout_secs = RESTART_CLEAN_UP_TIMEOUT.as_secs(),
                "settling the write of an interrupted job timed out; its data stays");
            Err(NotSettled::TimedOut)
        }
    }
}

/// How a job whose write is settled after a restart ended: as one that
/// succeeded if a settling found its write committed already (`committed`),
/// so that nothing of a committed write is ever rolled back; otherwise as
/// one that did not, which it was (interrupted, or failed).
fn ended_for(committed: &HashSet<String>, job_id: &str) -> JobEnded {
    if committed.contains(job_id) {
        JobEnded::Succeeded
    } else {
        JobEnded::Otherwise
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
    recorder: &JobRecorder,
    ended: JobEnded,
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
    let finish = FinishOverwrite::Yes;
    match settle_after_restart(recorder, ended, stores, job_id, durable, writes_to, finish).await {
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
