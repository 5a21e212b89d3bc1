//! Durable map outputs that outlive their job's clean-up.
//!
//! A job run with `quiver.shuffle_location` copies its map outputs to object
//! storage, and once it ends the scheduler deletes them (see
//! `service.rs::clean_up_storage_when_done`, and the clean-up after a
//! restart). A store that refuses or does not answer then, or a scheduler
//! that stops first, would leave them for ever, paid for and never read. So
//! each such job is recorded in the state store from its acceptance
//! ([`DurableLeft`]) until a deletion made after it ended has succeeded, and
//! [`spawn`] makes those deletions while the scheduler runs, after a restart
//! as well, trying a store that fails again later and later.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use quiver_core::shuffle::durable;
use quiver_core::storage::{StoreRegistry, redacted_error};
use quiver_proto::DurableLeft;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::locations::job_stores;
use crate::planner::Planner;
use crate::state::{SchedulerHandle, is_final};

/// How often the recorded outputs are looked at.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// The wait before a store that failed a deletion is tried again, doubled
/// at each failure up to [`LONGEST_RETRY`].
const FIRST_RETRY: Duration = SWEEP_EVERY;
const LONGEST_RETRY: Duration = Duration::from_secs(3600);

/// Longest wait for one job's deletion: a store that holds it up must not
/// hold up the others' for ever.
const DELETION_TIMEOUT: Duration = Duration::from_secs(120);

/// Deletions made at once.
const CONCURRENT_DELETIONS: usize = 8;

/// Deletes, every [`SWEEP_EVERY`], the durable map outputs of ended jobs
/// that are still recorded as left, and forgets each once its deletion
/// succeeds. A job is not touched while it runs, nor at the first sweep
/// that finds it ended: its own clean-up, and that of the tasks still
/// writing as it ended, has had a sweep's time to run by the next.
pub fn spawn(planner: Planner, handle: SchedulerHandle) {
    tokio::spawn(async move {
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
            let due = sweeper.due(left, running, Instant::now());
            if due.is_empty() {
                continue;
            }
            let shared = planner.object_stores();
            let deletions = futures::stream::iter(due)
                .map(|left| {
                    let stores = job_stores(&shared, &left.stores, &left.job_id);
                    async move {
                        let deleted = delete(&stores, &left).await;
                        (left, deleted)
                    }
                })
                .buffer_unordered(CONCURRENT_DELETIONS)
                .collect::<Vec<_>>()
                .await;
            for (left, deleted) in deletions {
                match deleted {
                    Ok(()) => {
                        handle.recorder.durable_removed(&left.job_id);
                        sweeper.deleted(&left.job_id);
                    }
                    Err(error) => {
                        let retry = sweeper.failed(&left.job_id, Instant::now());
                        warn!(job_id = %left.job_id, location = %left.location, %error,
                            retry_secs = retry.as_secs(),
                            "cannot delete durable map outputs that the job's clean-up left; \
                             they are tried again");
                    }
                }
            }
        }
    });
}

/// Deletes the durable map outputs of one ended job; the error, redacted.
async fn delete(stores: &Arc<StoreRegistry>, left: &DurableLeft) -> Result<(), String> {
    let deleting = durable::remove_job(stores, &left.location, &left.job_id);
    match tokio::time::timeout(DELETION_TIMEOUT, deleting).await {
        Ok(Ok(())) => {
            debug!(job_id = %left.job_id, location = %left.location,
                "the job's durable map outputs are deleted");
            Ok(())
        }
        Ok(Err(e)) => Err(redacted_error(&e).to_string()),
        Err(_) => Err(format!(
            "the store did not finish within {} s",
            DELETION_TIMEOUT.as_secs()
        )),
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
                if running(job_id) || self.seen_ended.insert(job_id.clone()) {
                    return false;
                }
                self.retry_at.get(job_id).is_none_or(|(at, _)| now >= *at)
            })
            .collect()
    }

    fn deleted(&mut self, job_id: &str) {
        if self.retry_at.remove(job_id).is_some() {
            info!(%job_id, "deleted the durable map outputs that the job's clean-up had left");
        }
        self.seen_ended.remove(job_id);
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
        }
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
        let ended = |_: &str| false;
        sweeper.deleted("a");
        assert!(sweeper.due(vec![left("b")], ended, now).is_empty());
        assert_eq!(ids(&sweeper.due(vec![left("b")], ended, now)), ["b"]);
    }

    #[test]
    fn a_failed_deletion_waits_longer_each_time_up_to_an_hour() {
        let mut sweeper = Sweeper::default();
        let start = Instant::now();
        let ended = |_: &str| false;
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
    fn what_is_no_longer_recorded_is_forgotten() {
        let mut sweeper = Sweeper::default();
        let now = Instant::now();
        let ended = |_: &str| false;
        sweeper.due(vec![left("a")], ended, now);
        sweeper.failed("a", now);
        // Its deletion, recorded since, succeeded at a later try.
        assert!(sweeper.due(Vec::new(), ended, now).is_empty());
        assert!(sweeper.seen_ended.is_empty() && sweeper.retry_at.is_empty());
    }
}
