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
//!
//! Leases run on [`LeaseTime`], a clock that keeps counting while the
//! machine is suspended: on the monotonic clock that `Instant` reads, an
//! executor whose machine slept past its lease would wake to find it still
//! running, and commit after the scheduler had settled its job.

use std::ops::{Add, Sub};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;

/// A moment on the clock that leases run on: the time since the machine
/// booted, suspended time included (Linux's `CLOCK_BOOTTIME`). Elsewhere,
/// the monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LeaseTime(Duration);

impl LeaseTime {
    pub fn now() -> Self {
        Self(since_boot())
    }
}

#[cfg(target_os = "linux")]
fn since_boot() -> Duration {
    use nix::time::{ClockId, clock_gettime};
    // Every Linux since 2.6.39 has this clock.
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(Duration::from)
        .unwrap_or_else(|_| monotonic())
}

#[cfg(not(target_os = "linux"))]
fn since_boot() -> Duration {
    monotonic()
}

/// Time since this process first asked, on the monotonic clock.
fn monotonic() -> Duration {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed()
}

impl Add<Duration> for LeaseTime {
    type Output = Self;
    fn add(self, length: Duration) -> Self {
        Self(self.0.saturating_add(length))
    }
}

impl Sub for LeaseTime {
    type Output = Duration;
    /// The time from `earlier` to `self`; zero if `earlier` is later.
    fn sub(self, earlier: Self) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

/// The lease of one control session of an executor. Shared with the tasks
/// launched in that session through their session config.
#[derive(Debug)]
pub struct Lease {
    /// When the lease runs out; `None` once revoked.
    expires: Mutex<Option<LeaseTime>>,
}

impl Lease {
    /// A lease that runs until `expires`.
    pub fn until(expires: LeaseTime) -> Arc<Self> {
        Arc::new(Self {
            expires: Mutex::new(Some(expires)),
        })
    }

    /// Moves the expiry to `expires` if that is later. A revoked lease stays revoked.
    pub fn extend_to(&self, expires: LeaseTime) {
        if let Some(current) = self.lock().as_mut() {
            *current = (*current).max(expires);
        }
    }

    /// Ends the lease for good: its session is over.
    pub fn revoke(&self) {
        *self.lock() = None;
    }

    /// When the lease runs out; `None` once revoked.
    pub fn expires(&self) -> Option<LeaseTime> {
        *self.lock()
    }

    /// How long the lease still runs; zero once it ran out or was revoked.
    pub fn remaining(&self) -> Duration {
        self.expires()
            .map_or(Duration::ZERO, |expires| expires - LeaseTime::now())
    }

    /// Whether tasks may still act on the scheduler's behalf.
    pub fn check(&self) -> Result<(), LeaseExpired> {
        let now = LeaseTime::now();
        match self.expires() {
            Some(expires) if now < expires => Ok(()),
            Some(expires) => Err(LeaseExpired {
                ago: Some(now - expires),
            }),
            None => Err(LeaseExpired { ago: None }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<LeaseTime>> {
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
        let lease = Lease::until(LeaseTime::now() + Duration::from_secs(60));
        assert!(lease.check().is_ok());
        // Never shortened by a late acknowledgement of an older heartbeat.
        lease.extend_to(LeaseTime::now());
        assert!(lease.check().is_ok());
        lease.revoke();
        assert!(lease.check().is_err());
        // Revoked for good.
        lease.extend_to(LeaseTime::now() + Duration::from_secs(60));
        assert!(lease.check().is_err());

        let expired = Lease::until(LeaseTime::now());
        let error = DataFusionError::from(expired.check().expect_err("expired"));
        assert!(error.to_string().contains("ran out"), "{error}");
        assert!(
            error
                .to_string()
                .contains("lease from the scheduler ran out")
        );
        let renewed = Lease::until(LeaseTime::now());
        renewed.extend_to(LeaseTime::now() + Duration::from_secs(60));
        assert!(renewed.check().is_ok());
        assert!(renewed.remaining() > Duration::from_secs(59));
        assert_eq!(expired.remaining(), Duration::ZERO);
    }

    /// The lease clock counts at least the time a thread sleeps (and
    /// suspended time besides).
    #[test]
    fn the_lease_clock_counts_time_slept() {
        let started = LeaseTime::now();
        std::thread::sleep(Duration::from_millis(20));
        let on_lease_clock = LeaseTime::now() - started;
        assert!(
            on_lease_clock >= Duration::from_millis(20),
            "{on_lease_clock:?}"
        );
    }
}
