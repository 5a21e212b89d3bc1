//! Executor leases: how an executor that the scheduler may have declared lost
//! stops changing what others can see.
//!
//! The scheduler declares an executor lost once it has not heard from it for
//! its executor timeout, and then runs that executor's tasks again elsewhere.
//! A paused or cut-off executor cannot know this, and if it carried on, a
//! commit could move files into a table after the scheduler had settled the
//! job. So the executor holds a lease: every heartbeat the scheduler
//! acknowledges extends it to that heartbeat's send time plus a lease shorter
//! than the timeout. The executor stops its tasks when the lease runs out, and
//! steps with effects outside the executor (a commit's moves, deletions and
//! manifest) check it right before they act. By the time the scheduler gives
//! up on an executor, the executor has given up on its tasks.
//!
//! A lease cannot recall a request that is already in flight: the gap between
//! lease and timeout is the margin for one to land.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;

/// The lease of one control session of an executor. Shared with the tasks
/// launched in that session through their session config.
#[derive(Debug)]
pub struct Lease {
    /// When the lease runs out; `None` once revoked.
    expires: Mutex<Option<Instant>>,
}

impl Lease {
    /// A lease that runs until `expires`.
    pub fn until(expires: Instant) -> Arc<Self> {
        Arc::new(Self {
            expires: Mutex::new(Some(expires)),
        })
    }

    /// Moves the expiry to `expires` if that is later. A revoked lease stays revoked.
    pub fn extend_to(&self, expires: Instant) {
        if let Some(current) = self.lock().as_mut() {
            *current = (*current).max(expires);
        }
    }

    /// Ends the lease for good: its session is over.
    pub fn revoke(&self) {
        *self.lock() = None;
    }

    /// When the lease runs out; `None` once revoked.
    pub fn expires(&self) -> Option<Instant> {
        *self.lock()
    }

    /// Whether tasks may still act on the scheduler's behalf.
    pub fn check(&self) -> Result<(), LeaseExpired> {
        let now = Instant::now();
        match self.expires() {
            Some(expires) if now < expires => Ok(()),
            Some(expires) => Err(LeaseExpired {
                ago: Some(now - expires),
            }),
            None => Err(LeaseExpired { ago: None }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.expires.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A task tried to act after its executor's lease ran out.
#[derive(Debug, thiserror::Error)]
#[error(
    "this executor's lease from the scheduler {}: the scheduler may have declared it \
     lost and given its tasks to another executor, so the task stops before changing \
     anything others can see",
    match ago {
        Some(ago) => format!("ran out {}ms ago", ago.as_millis()),
        None => "ended with its control session".to_owned(),
    }
)]
pub struct LeaseExpired {
    /// How long ago the lease ran out; `None` when its session ended.
    pub ago: Option<Duration>,
}

impl From<LeaseExpired> for DataFusionError {
    fn from(expired: LeaseExpired) -> Self {
        DataFusionError::External(Box::new(expired))
    }
}

/// The lease of the executor running a task, if it runs under one (tasks
/// run in-process by tests and by single-node tools have none).
pub fn task_lease(context: &TaskContext) -> Option<Arc<Lease>> {
    context.session_config().get_extension::<Lease>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_holds_until_it_expires_or_is_revoked() {
        let lease = Lease::until(Instant::now() + Duration::from_secs(60));
        assert!(lease.check().is_ok());
        // Never shortened by a late acknowledgement of an older heartbeat.
        lease.extend_to(Instant::now());
        assert!(lease.check().is_ok());
        lease.revoke();
        assert!(lease.check().is_err());
        // Revoked for good.
        lease.extend_to(Instant::now() + Duration::from_secs(60));
        assert!(lease.check().is_err());

        let expired = Lease::until(Instant::now());
        let error = DataFusionError::from(expired.check().expect_err("expired"));
        assert!(error.to_string().contains("ran out"), "{error}");
        assert!(
            error
                .to_string()
                .contains("lease from the scheduler ran out")
        );
        let renewed = Lease::until(Instant::now());
        renewed.extend_to(Instant::now() + Duration::from_secs(60));
        assert!(renewed.check().is_ok());
    }
}
