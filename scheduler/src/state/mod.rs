//! The scheduler's state: jobs, stages, tasks and executors, owned by a single
//! event loop ([`event_loop`]) that nothing else touches. Everything else talks
//! to it through [`SchedulerHandle`], by sending [`Event`]s; job statuses are
//! published through watch channels that clients read without a round trip.

pub mod event_loop;
pub mod executors;
pub mod job;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::bytes::Bytes;
use quiver_core::config::QuiverOptions;
use quiver_proto::{ExecutorAddress, ExecutorInfo, JobStatus, Setting, executor_message};
use tokio::sync::{mpsc, oneshot, watch};

use crate::stages::StagePlan;
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
        reply: oneshot::Sender<bool>,
    },
    ReleaseJob {
        job_id: String,
    },
    ListExecutors {
        reply: oneshot::Sender<Vec<ExecutorInfo>>,
    },
}

/// A planned job, ready to run.
#[derive(Debug)]
pub struct SubmittedJob {
    pub job_id: String,
    pub settings: Vec<Setting>,
    pub limits: JobLimits,
    pub stages: Vec<StagePlan>,
    /// The datafusion-proto bytes of each stage's plan, in stage order.
    pub encoded: Vec<Bytes>,
    /// Publishes the job's status; already in the [`JobDirectory`], so that a
    /// client may watch the job as soon as `SubmitJob` returns.
    pub status: watch::Sender<JobStatus>,
}

/// The limits a job runs under, from its `quiver.*` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// Attempts of a task before the job fails.
    pub max_attempts: u32,
    /// Time from acceptance after which the job fails.
    pub timeout: Option<Duration>,
}

impl JobLimits {
    pub fn from_options(options: &QuiverOptions) -> Self {
        Self {
            max_attempts: u32::try_from(options.max_task_attempts)
                .unwrap_or(u32::MAX)
                .max(1),
            timeout: (options.job_timeout_secs > 0)
                .then(|| Duration::from_secs(options.job_timeout_secs)),
        }
    }
}

impl Default for JobLimits {
    fn default() -> Self {
        Self::from_options(&QuiverOptions::default())
    }
}

/// Latest status of every job the scheduler knows, readable from any task.
#[derive(Debug, Clone, Default)]
pub struct JobDirectory {
    jobs: Arc<Mutex<HashMap<String, watch::Receiver<JobStatus>>>>,
}

impl JobDirectory {
    pub fn insert(&self, job_id: String, status: watch::Receiver<JobStatus>) {
        self.lock().insert(job_id, status);
    }

    pub fn get(&self, job_id: &str) -> Option<watch::Receiver<JobStatus>> {
        self.lock().get(job_id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Receiver<JobStatus>>> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// How the rest of the scheduler talks to the event loop.
#[derive(Debug, Clone)]
pub struct SchedulerHandle {
    events: mpsc::UnboundedSender<Event>,
    pub directory: JobDirectory,
}

impl SchedulerHandle {
    /// Sends an event; false when the loop has stopped.
    pub fn send(&self, event: Event) -> bool {
        self.events.send(event).is_ok()
    }
}
