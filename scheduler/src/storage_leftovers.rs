//! Durable map outputs that outlive their job's clean-up.
//!
//! A job run with `quiver.shuffle_location` copies its map outputs to object
//! storage, and once it ends the scheduler deletes them (see
//! `service.rs::clean_up_storage_when_done`, and `service/restart.rs` after a
//! restart). A store that refuses or does not answer then, or a scheduler
//! that stops first, would leave them for ever, paid for and never read. So
//! each such job is recorded in the state store from its acceptance
//! ([`DurableLeft`]) until a deletion made after it ended has succeeded, and
//! [`sweep`] makes those deletions while the scheduler runs, after a restart
//! as well, trying a store that fails again later and later, for a week.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use quiver_core::shuffle::durable;
use quiver_core::storage::{StoreRegistry, redacted_error};
use quiver_proto::DurableLeft;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::locations::job_stores;
use crate::planner::Planner;
use crate::state::event_loop::unix_millis;
use crate::state::{SchedulerHandle, is_final};

/// How often the recorded outputs are looked at.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// The wait before a store that failed a deletion is tried again, doubled
/// at each failure up to [`LONGEST_RETRY`].
const FIRST_RETRY: Duration = SWEEP_EVERY;
const LONGEST_RETRY: Duration = Duration::from_secs(3600);

/// Age of a job after which a failed deletion of its outputs is given up,
/// and its record forgotten: a bucket deleted, or keys revoked for good,
/// would otherwise keep it, its credentials included, for ever.
const GIVE_UP_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// Longest wait for one job's deletion. A location whose deletion takes
/// longer is not tried for its other jobs in the same sweep: one store that
/// does not answer holds the sweep up once, not once per job.
const DELETION_TIMEOUT: Duration = Duration::from_secs(120);

/// Deletions made at once.
const CONCURRENT_DELETIONS: usize = 8;

/// Deletes, every 30 s (`SWEEP_EVERY`), the durable map outputs of ended jobs
/// that are still recorded as left, and forgets each once its deletion
/// succeeds. A job is not touched while it runs, nor at the first sweep
/// that finds it ended: its own clean-up, and that of the tasks still
/// writing as it ended, has usually run by the next. Runs until the future
/// is dropped (the scheduler stops).
pub async fn sweep(planner: &Planner, handle: &SchedulerHandle) {
    let mut sweeper = Sweeper::default();
    let mut ticks = tokio::time::interval(SWEEP_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let left = match planner.durable_left().await {
            Ok(left) => left,
            Err(e) => {
                warn!(%e, "cannot read which durable map outputs are left to delete");
                continue;
            }
        };
        let running = |job_id: &str| {
            handle
                .directory
                .get(job_id)
                .is_some_and(|status| !is_final(status.borrow().state()))
        };
        let started = Instant::now();
        let due = sweeper.due(left, running, started);
        if due.is_empty() {
            continue;
        }
        let shared = planner.object_stores();
        let timed_out = Mutex::new(HashSet::new());
        let deletions = futures::stream::iter(due)
            .map(|left| {
                let stores = job_stores(&shared, &left.stores, &left.job_id);
                let timed_out = &timed_out;
                async move {
                    let deleted = delete(&stores, &left, timed_out).await;
                    (left, deleted)
                }
            })
            .buffer_unordered(CONCURRENT_DELETIONS)
            .collect::<Vec<_>>()
            .await;
        for (left, deleted) in deletions {
            let job_id = left.job_id.as_str();
            match deleted {
                Ok(()) => {
                    handle.recorder.durable_removed(job_id);
                    if sweeper.forget(job_id) {
                        info!(%job_id, location = %left.location,
                            "deleted the durable map outputs that the job's clean-up had left");
                    }
                }
                Err(error) if older_than(&left, GIVE_UP_AFTER) => {
                    warn!(%job_id, location = %left.location, %error,
                        days = GIVE_UP_AFTER.as_secs() / 86_400,
                        "gave up deleting the durable map outputs that a job's clean-up left, \
                         after trying for days; delete the job's folder at the location, \
                         if it is still there");
                    handle.recorder.durable_removed(job_id);
                    sweeper.forget(job_id);
                }
                Err(error) => {
                    let retry = sweeper.failed(job_id, started);
                    warn!(%job_id, location = %left.location, %error,
                        retry_secs = retry.as_secs(),
                        "cannot delete durable map outputs that the job's clean-up left; \
                         they are tried again");
                }
            }
        }
    }
}

/// Whether the job of `left` was accepted longer than `age` ago.
fn older_than(left: &DurableLeft, age: Duration) -> bool {
    let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
    unix_millis().saturating_sub(left.recorded_at_unix_ms) > age_ms
}

/// Deletes the durable map outputs of one ended job, unless a deletion at
/// the same location timed out in this sweep (`timed_out`); the error,
/// redacted.
async fn delete(
    stores: &Arc<StoreRegistry>,
    left: &DurableLeft,
    timed_out: &Mutex<HashSet<String>>,
) -> Result<(), String> {
    let locked = || timed_out.lock().unwrap_or_else(PoisonError::into_inner);
    if locked().contains(&left.location) {
        return Err("not tried: a deletion at the same location did not finish in time".into());
    }
    let deleting = durable::remove_job(stores, &left.location, &left.job_id);
    match tokio::time::timeout(DELETION_TIMEOUT, deleting).await {
        Ok(Ok(())) => {
            debug!(job_id = %left.job_id, location = %left.location,
                "the job's durable map outputs are deleted");
            Ok(())
        }
        Ok(Err(e)) => Err(redacted_error(&e).to_string()),
        Err(_) => {
            locked().insert(left.location.clone());
            Err(format!(
                "the store did not finish within {} s",
                DELETION_TIMEOUT.as_secs()
            ))
        }
    }
}

/// Which recorded jobs are due for a deletion: what the sweeps remember.
#[derive(Debug, Default)]
struct Sweeper {
    /// Jobs found ended by an earlier sweep.
    seen_ended: HashSet<String>,
    /// Jobs whose deletion failed: when to try again, and the wait that
    /// led there.
    retry_at: HashMap<String, (Instant, Duration)>,
}

impl Sweeper {
    /// The jobs of `left` to delete the outputs of `now`: ended (not
    /// `running`) at an earlier sweep already, and not waiting to be tried
    /// again. Forgets what is no longer recorded.
    fn due(
        &mut self,
        left: Vec<DurableLeft>,
        running: impl Fn(&str) -> bool,
        now: Instant,
    ) -> Vec<DurableLeft> {
        let recorded: HashSet<&str> = left.iter().map(|left| left.job_id.as_str()).collect();
        self.seen_ended
            .retain(|job_id| recorded.contains(job_id.as_str()));
        self.retry_at
            .retain(|job_id, _| recorded.contains(job_id.as_str()));
        left.into_iter()
            .filter(|left| {
                let job_id = &left.job_id;
                // Never recorded so: it would name every job's outputs.
                if job_id.is_empty() {
                    return false;
                }
                if running(job_id) || self.seen_ended.insert(job_id.clone()) {
                    return false;
                }
                self.retry_at.get(job_id).is_none_or(|(at, _)| now >= *at)
            })
            .collect()
    }

    /// Forgets `job_id`, whose record goes; returns whether a deletion of
    /// its outputs had failed before.
    fn forget(&mut self, job_id: &str) -> bool {
        self.seen_ended.remove(job_id);
        self.retry_at.remove(job_id).is_some()
    }

    /// Notes a failed deletion at `now`; returns the wait until the next.
    fn failed(&mut self, job_id: &str, now: Instant) -> Duration {
        let wait = match self.retry_at.get(job_id) {
            Some((_, waited)) => (*waited * 2).min(LONGEST_RETRY),
            None => FIRST_RETRY,
        };
        self.retry_at.insert(job_id.to_owned(), (now + wait, wait));
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn left(job_id: &str) -> DurableLeft {
        DurableLeft {
            job_id: job_id.into(),
            location: "s3://shuffle/maps".into(),
            stores: Vec::new(),
            recorded_at_unix_ms: 1,
        }
    }

    /// No job runs.
    fn ended(_: &str) -> bool {
        false
    }

    fn ids(due: &[DurableLeft]) -> Vec<&str> {
        due.iter().map(|left| left.job_id.as_str()).collect()
    }

    #[test]
    fn a_job_is_due_from_the_second_sweep_that_finds_it_ended() {
        let mut sweeper = Sweeper::default();
        let now = Instant::now();
        let running = |job_id: &str| job_id == "b";
        let first = sweeper.due(vec![left("a"), left("b")], running, now);
        assert!(first.is_empty(), "{first:?}");
        let second = sweeper.due(vec![left("a"), left("b")], running, now);
        assert_eq!(ids(&second), ["a"]);
        // "b" ends: due at the sweep after the one that sees it ended.
        sweeper.forget("a");
        assert!(sweeper.due(vec![left("b")], ended, now).is_empty());
        assert_eq!(ids(&sweeper.due(vec![left("b")], ended, now)), ["b"]);
    }

    #[test]
    fn a_failed_deletion_waits_longer_each_time_up_to_an_hour() {
        let mut sweeper = Sweeper::default();
        let start = Instant::now();
        sweeper.due(vec![left("a")], ended, start);
        assert_eq!(ids(&sweeper.due(vec![left("a")], ended, start)), ["a"]);
        let mut waits = Vec::new();
        let mut now = start;
        for _ in 0..9 {
            let wait = sweeper.failed("a", now);
            waits.push(wait.as_secs());
            assert!(
                sweeper.due(vec![left("a")], ended, now).is_empty(),
                "retried before its wait"
            );
            now += wait;
            assert_eq!(ids(&sweeper.due(vec![left("a")], ended, now)), ["a"]);
        }
        assert_eq!(waits, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
    }

    #[test]
    fn an_entry_without_a_job_id_is_never_due() {
        let mut sweeper = Sweeper::default();
        let now = Instant::now();
        for _ in 0..3 {
            assert!(sweeper.due(vec![left("")], ended, now).is_empty());
        }
    }

    #[test]
    fn a_job_is_given_up_on_only_a_week_after_it_was_accepted() {
        let now = unix_millis();
        let accepted = |days_ago: u64| DurableLeft {
            recorded_at_unix_ms: now - days_ago * 86_400_000,
            ..left("a")
        };
        assert!(!older_than(&accepted(6), GIVE_UP_AFTER));
        assert!(older_than(&accepted(8), GIVE_UP_AFTER));
    }

    #[test]
    fn what_is_no_longer_recorded_is_forgotten() {
        let mut sweeper = Sweeper::default();
        let now = Instant::now();
        sweeper.due(vec![left("a")], ended, now);
        sweeper.failed("a", now);
        // Its deletion, recorded since, succeeded at a later try.
        assert!(sweeper.due(Vec::new(), ended, now).is_empty());
        assert!(sweeper.seen_ended.is_empty() && sweeper.retry_at.is_empty());
    }
}
