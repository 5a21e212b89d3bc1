//! The scheduler's permission for a commit attempt to make its write visible.
//!
//! A commit's first change to the table (moving its files in) is where the
//! write stops being the job's private business. Before it, the commit asks
//! whoever runs the job; in a cluster that is the scheduler, over the
//! executor's control stream. The scheduler allows only the running attempt
//! of a job that nobody asked to end, and from then on it does not end the
//! job (a cancel or a timeout waits) until that attempt reports. So a job is
//! never reported cancelled or failed while its commit may still write the
//! manifest, and its write is never settled while a commit still acts on
//! the table. This is the role of Spark's output commit coordinator.
//!
//! An allowed attempt acts only for the time the scheduler gives it,
//! counted from when it asked: a commit that hangs (a store that stopped
//! answering, a bug) would otherwise hold its job forever. Past that time
//! the attempt stops before its next change, and the scheduler, once it
//! surely has, takes the attempt as failed and settles the write with
//! another one.
//!
//! A plan run without a [`CommitPermission`] in its task context (a
//! single-process DataFusion session, the scheduler settling a write)
//! commits without asking, and without a time limit.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;

use crate::lease::LeaseTime;

/// Whoever may allow a commit attempt to act.
#[async_trait]
pub trait CommitAuthority: Send + Sync + Debug {
    /// Waits for the answer: until when the attempt may act (`None`: no
    /// limit), or why it may not commit. `finishes` says that the attempt
    /// found its job's manifest, and only finishes what an earlier attempt
    /// committed.
    async fn allow(&self, finishes: bool) -> std::result::Result<Option<LeaseTime>, String>;
}

/// The task context extension that carries the commit's authority.
#[derive(Debug, Clone)]
pub struct CommitPermission(pub Arc<dyn CommitAuthority>);

/// Asks the authority in `context`, if any, whether this attempt may commit,
/// and until when (see [`CommitAuthority::allow`]).
pub async fn ask_to_commit(
    context: Option<&CommitPermission>,
    location: &str,
    finishes: bool,
) -> Result<Option<LeaseTime>> {
    let Some(CommitPermission(authority)) = context else {
        return Ok(None);
    };
    authority.allow(finishes).await.map_err(|reason| {
        DataFusionError::Execution(format!(
            "the commit of the write to '{location}' was not allowed: {reason}"
        ))
    })
}

/// The commit permission in a task's context, if it has one.
pub fn commit_permission(context: &TaskContext) -> Option<Arc<CommitPermission>> {
    context.session_config().get_extension::<CommitPermission>()
}

/// A commit attempt tried to act after the time the scheduler allowed it.
#[derive(Debug, thiserror::Error)]
#[error(
    "this commit attempt used up the time the scheduler allows a commit to act \
     (--commit-timeout-secs) {}ms ago, and stopped: the scheduler takes it as \
     failed, and another attempt, or the scheduler itself, settles the write",
    ago.as_millis()
)]
pub struct CommitTimeSpent {
    /// How long ago the time ran out.
    pub ago: std::time::Duration,
}

impl CommitTimeSpent {
    /// The error of an attempt whose time to act ran out at `until`.
    pub fn since(until: LeaseTime) -> Self {
        Self {
            ago: LeaseTime::now() - until,
        }
    }
}

impl From<CommitTimeSpent> for DataFusionError {
    fn from(spent: CommitTimeSpent) -> Self {
        DataFusionError::External(Box::new(spent))
    }
}
