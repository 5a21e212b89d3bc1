//! The scheduler's state: jobs, stages, tasks and executors, owned by a single
//! event loop ([`event_loop`]) that nothing else touches. Everything else talks
//! to it through [`SchedulerHandle`], by sending [`Event`]s; job statuses are
//! published through watch channels that clients read without a round trip.

pub mod event_loop;
pub mod executors;
pub mod job;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::bytes::Bytes;
use quiver_core::config::QuiverOptions;
use quiver_proto::{
    ExecutorAddress, ExecutorInfo, JobState, JobStatus, Setting, StoreConfig, executor_message,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::adaptive::PendingJoins;
use crate::planner::{Replanner, StagedJob};
use crate::stages::StagePlan;
use crate::store::{JOB_HISTORY_LIMIT, JobRecorder};
use executors::ExecutorSender;

/// Inputs of the event loop.
#[derive(Debug)]
pub enum Event {
    ExecutorConnected {
        address: ExecutorAddress,
        slots: usize,
        connection: u64,
        sender: ExecutorSender,
    },
    ExecutorMessage {
        executor_id: String,
        connection: u64,
        message: executor_message::Kind,
    },
    ExecutorDisconnected {
        executor_id: String,
        connection: u64,
        /// The executor closed its stream itself (a shutdown), rather than the
        /// stream breaking.
        clean: bool,
    },
    JobSubmitted(Box<SubmittedJob>),
    CancelJob {
        job_id: String,
        reply: oneshot::Sender<CancelOutcome>,
    },
    ReleaseJob {
        job_id: String,
    },
    ListExecutors {
        reply: oneshot::Sender<Vec<ExecutorInfo>>,
    },
    /// A job that lost a file it reads was planned again (see
    /// [`Replanner`]).
    JobReplanned {
        job_id: String,
        planned: Box<Result<StagedJob, crate::Error>>,
    },
    /// The write of a job whose commit was lost was settled off the loop
    /// (see [`job::Job::on_write_settled`]); `Err` says why it could not be.
    WriteSettled {
        job_id: String,
        settled: Result<quiver_core::write::Settled, String>,
    },
}

/// What a request to cancel a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job ended, cancelled.
    Cancelled,
    /// The job's write is committing: the job ends when the commit does,
    /// cancelled if the commit fails and succeeded if it commits.
    Committing,
    /// A scheduler restart interrupted the job, and its write is being
    /// settled: it cannot be cancelled, and ends as the write settles.
    Settling,
    /// The job had already ended.
    Ended,
}

/// A planned job, ready to run.
#[derive(Debug)]
pub struct SubmittedJob {
    pub job_id: String,
    /// The SQL text, or a description of a client-built plan, for the history.
    pub query: String,
    pub settings: Vec<Setting>,
    /// Options of the object stores the job uses, for its tasks.
    pub stores: Vec<StoreConfig>,
    /// `quiver.shuffle_location`, or empty.
    pub durable_shuffle: String,
    /// The table folder the job writes: one writer per folder runs at a time.
    pub writes_to: Option<String>,
    pub limits: JobLimits,
    pub stages: Vec<StagePlan>,
    /// The datafusion-proto bytes of each stage's plan, in stage order.
    pub encoded: Vec<Bytes>,
    /// Joins to decide again once their build side has run.
    pub adaptive: PendingJoins,
    /// Publishes the job's status; already in the [`JobDirectory`], so that a
    /// client may watch the job as soon as `SubmitJob` returns.
    pub status: watch::Sender<JobStatus>,
    /// Plans the job again if a file it reads is replaced while it runs.
    pub replanner: Option<Replanner>,
}

/// The limits a job runs under, from its `quiver.*` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// Attempts of a task before the job fails.
    pub max_attempts: u32,
    /// Time from acceptance after which the job fails.
    pub timeout: Option<Duration>,
    /// Largest file list of a write task that comes back with its status;
    /// a larger one is copied into the table's staging folder.
    pub inline_file_list_max_bytes: u64,
}

impl JobLimits {
    pub fn from_options(options: &QuiverOptions) -> Self {
        Self {
            max_attempts: u32::try_from(options.max_task_attempts)
                .unwrap_or(u32::MAX)
                .max(1),
            timeout: (options.job_timeout_secs > 0)
                .then(|| Duration::from_secs(options.job_timeout_secs)),
            inline_file_list_max_bytes: options.inline_file_list_max_bytes,
        }
    }
}

impl Default for JobLimits {
    fn default() -> Self {
        Self::from_options(&QuiverOptions::default())
    }
}

/// Latest status of every job the scheduler knows, readable from any task.
/// It keeps the running jobs and the newest [`JOB_HISTORY_LIMIT`] finished ones.
#[derive(Debug, Clone, Default)]
pub struct JobDirectory {
    jobs: Arc<Mutex<DirectoryEntries>>,
}

#[derive(Debug, Default)]
struct DirectoryEntries {
    by_id: HashMap<String, watch::Receiver<JobStatus>>,
    /// Job ids, oldest first.
    order: VecDeque<String>,
}

impl JobDirectory {
    pub fn insert(&self, job_id: String, status: watch::Receiver<JobStatus>) {
        let mut entries = self.lock();
        if entries.by_id.insert(job_id.clone(), status).is_none() {
            entries.order.push_back(job_id);
        }
        if entries.by_id.len() > 2 * JOB_HISTORY_LIMIT {
            entries.prune(JOB_HISTORY_LIMIT);
        }
    }

    pub fn get(&self, job_id: &str) -> Option<watch::Receiver<JobStatus>> {
        self.lock().by_id.get(job_id).cloned()
    }

    /// Marks the ended job `job_id` as one whose write committed although it
    /// did not succeed ([`note_write_committed`]), for those who ask after
    /// it; its watchers have seen it end already. A job still running is
    /// marked as it ends, by its own status.
    pub fn note_write_committed(&self, job_id: &str) {
        let mut entries = self.lock();
        let Some(current) = entries.by_id.get_mut(job_id) else {
            return;
        };
        let mut status = current.borrow().clone();
        if note_write_committed(&mut status) {
            *current = watch::channel(status).1;
        }
    }

    /// The latest status of every known job, oldest first.
    pub fn statuses(&self) -> Vec<JobStatus> {
        let entries = self.lock();
        entries
            .order
            .iter()
            .filter_map(|job_id| entries.by_id.get(job_id))
            .map(|status| status.borrow().clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DirectoryEntries> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl DirectoryEntries {
    /// Forgets the oldest finished jobs until at most `keep` finished ones remain.
    fn prune(&mut self, keep: usize) {
        let finished = |status: &watch::Receiver<JobStatus>| is_final(status.borrow().state());
        let finished_count = self.by_id.values().filter(|s| finished(s)).count();
        let mut excess = finished_count.saturating_sub(keep);
        let by_id = &mut self.by_id;
        self.order.retain(|job_id| {
            if excess > 0 && by_id.get(job_id).is_some_and(&finished) {
                by_id.remove(job_id);
                excess -= 1;
                false
            } else {
                true
            }
        });
    }
}

/// Whether a job in `state` has ended.
pub fn is_final(state: JobState) -> bool {
    matches!(
        state,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled
    )
}

/// Marks `status`, of a job that failed or was cancelled, as one whose write
/// had committed: its rows are in the table, and running its statement
/// again would add them twice. Returns whether it changed: a job running,
/// succeeded or marked already is left as it is.
pub fn note_write_committed(status: &mut JobStatus) -> bool {
    let unsuccessful = matches!(status.state(), JobState::Failed | JobState::Cancelled);
    if !unsuccessful || status.write_committed {
        return false;
    }
    status.write_committed = true;
    status.error.push_str(
        "; but the clean-up after it found its write committed: its rows are in the table, \
         so do not run the statement again",
    );
    true
}

/// How the rest of the scheduler talks to the event loop.
#[derive(Debug, Clone)]
pub struct SchedulerHandle {
    events: mpsc::UnboundedSender<Event>,
    pub directory: JobDirectory,
    /// Writes job records to the store.
    pub recorder: JobRecorder,
    pub settling: SettlingJobs,
}

impl SchedulerHandle {
    /// Sends an event; false when the loop has stopped.
    pub fn send(&self, event: Event) -> bool {
        self.events.send(event).is_ok()
    }
}

/// The jobs whose writes a restart left unsettled, until this start has
/// settled them: their statuses show them running, and their watchers
/// learn how they ended.
#[derive(Debug, Clone, Default)]
pub struct SettlingJobs {
    jobs: Arc<Mutex<HashMap<String, SettlingJob>>>,
}

#[derive(Debug)]
struct SettlingJob {
    published: watch::Sender<JobStatus>,
    /// Its status in the store: how it ended should this start not settle it.
    recorded: JobStatus,
}

impl SettlingJobs {
    /// Publishes the job of `recorded` (its final status in the store) as
    /// running, its write being settled, until [`Self::ended`].
    pub fn insert(&self, recorded: JobStatus) -> watch::Receiver<JobStatus> {
        let shown = JobStatus {
            state: JobState::Running.into(),
            tasks_running: 0,
            error: event_loop::being_settled(),
            ..recorded.clone()
        };
        let (published, receiver) = watch::channel(shown);
        self.lock().insert(
            recorded.job_id.clone(),
            SettlingJob {
                published,
                recorded,
            },
        );
        receiver
    }

    pub fn contains(&self, job_id: &str) -> bool {
        self.lock().contains_key(job_id)
    }

    /// Publishes the job's final status to those who watch it.
    pub fn ended(&self, status: &JobStatus) {
        if let Some(job) = self.lock().remove(&status.job_id) {
            job.published.send_replace(status.clone());
        }
    }

    /// Publishes the status in the store of each job not yet ended: the
    /// start is over, and it settled no more of them.
    pub fn end_the_rest(&self) {
        for (_, job) in self.lock().drain() {
            job.published.send_replace(job.recorded);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SettlingJob>> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(job_id: &str, state: JobState) -> watch::Receiver<JobStatus> {
        watch::channel(JobStatus {
            job_id: job_id.into(),
            state: state.into(),
            ..JobStatus::default()
        })
        .1
    }

    #[test]
    fn pruning_forgets_the_oldest_finished_jobs_only() {
        let mut entries = DirectoryEntries::default();
        for (job_id, state) in [
            ("old-running", JobState::Running),
            ("old-done", JobState::Succeeded),
            ("mid-failed", JobState::Failed),
            ("new-done", JobState::Succeeded),
        ] {
            entries.by_id.insert(job_id.into(), status(job_id, state));
            entries.order.push_back(job_id.into());
        }
        entries.prune(2);
        assert_eq!(
            Vec::from(entries.order.clone()),
            ["old-running", "mid-failed", "new-done"]
        );
        assert!(!entries.by_id.contains_key("old-done"));
    }
}
