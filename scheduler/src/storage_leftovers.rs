//! What jobs leave in object storage when their clean-up fails.
//!
//! Once a job ends, the scheduler deletes what it left in object storage
//! (see `service.rs::clean_up_storage_when_done`, and `service/restart.rs`
//! after a restart): the map outputs of a job run with
//! `quiver.shuffle_location`, and its write's staging folder, which holds
//! the files of failed and losing attempts and the records of their
//! unfinished uploads (the write is settled: rolled back unless its
//! manifest was written). A store that refuses or does not answer then, or
//! a scheduler that stops first, would leave them for ever, paid for and
//! never read. So each such job is recorded in the state store from its
//! acceptance ([`StorageLeft`]) until a clean-up made after it ended has
//! left nothing, and [`sweep`] makes those clean-ups while the scheduler
//! runs, after a restart as well, trying a store that fails again later and
//! later, for a week.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use quiver_core::shuffle::durable;
use quiver_core::storage::{StoreRegistry, redacted_error};
use quiver_core::write::{FinishOverwrite, JobEnded, Staging, settle_write_and_staging};
use quiver_proto::{JobState, StorageLeft};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::locations::job_stores;
use crate::planner::Planner;
use crate::state::event_loop::unix_millis;
use crate::state::{SchedulerHandle, is_final};
use crate::store::JobRecorder;

/// How often the recorded jobs are looked at.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// The wait before a store that failed a clean-up is tried again, doubled
/// at each failure up to [`LONGEST_RETRY`].
const FIRST_RETRY: Duration = SWEEP_EVERY;
const LONGEST_RETRY: Duration = Duration::from_secs(3600);

/// Age of a job after which a failed clean-up is given up, and its record
/// forgotten: a bucket deleted, or keys revoked for good, would otherwise
/// keep it, its credentials included, for ever. A write's staging folder
/// is then left to a later commit into its table, which settles the
/// writes abandoned for a day.
const GIVE_UP_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// Longest wait for one location of one job's clean-up. A location whose
/// clean-up takes longer is not tried for its other jobs in the same sweep:
/// one store that does not answer holds the sweep up once, not once per
/// job.
const CLEAN_UP_TIMEOUT: Duration = Duration::from_secs(120);

/// Clean-ups made at once.
const CONCURRENT_CLEAN_UPS: usize = 8;

/// Cleans up, every 30 s (`SWEEP_EVERY`), what ended jobs still recorded
/// as leaving storage left, and forgets each once nothing is left. A job is
/// not touched while it runs (a write a restart interrupted shows as
/// running while the start settles it; one the start could not settle ends
/// failed, and is settled here beside the start's own retries, the same
/// way), nor at the first sweep that finds it ended: its own clean-up, and
/// that of the tasks still writing as it ended, has usually run by the
/// next. Runs until the future is dropped (the scheduler stops).
pub async fn sweep(planner: &Planner, handle: &SchedulerHandle) {
    let mut sweeper = Sweeper::default();
    let mut ticks = tokio::time::interval(SWEEP_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let left = match planner.storage_left().await {
            Ok(left) => left,
            Err(e) => {
                warn!(%e, "cannot read what jobs left in object storage to clean up");
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
        let committed = match planner.writes_committed().await {
            Ok(committed) => Some(committed),
            Err(e) => {
                warn!(%e, "cannot read which writes were found committed; none is settled now");
                None
            }
        };
        let timed_out = Mutex::new(HashSet::new());
        let clean_ups = futures::stream::iter(due)
            .map(|left| {
                let stores = job_stores(&shared, &left.stores, &left.job_id);
                let (timed_out, committed) = (&timed_out, committed.as_ref());
                async move {
                    let ended = how_it_ended(planner, handle, committed, &left).await;
                    let cleaned =
                        clean_up(&handle.recorder, &stores, &left, ended, timed_out).await;
                    (left, cleaned)
                }
            })
            .buffer_unordered(CONCURRENT_CLEAN_UPS)
            .collect::<Vec<_>>()
            .await;
        for (left, cleaned) in clean_ups {
            let job_id = left.job_id.as_str();
            let (shuffle, writes_to) = (&left.shuffle_location, &left.writes_to);
            match cleaned {
                Ok(()) => {
                    handle.recorder.storage_cleaned(job_id);
                    let retried = sweeper.forget(job_id);
                    info!(%job_id, %shuffle, %writes_to, retried,
                        "cleaned up what the job's clean-up had left in object storage");
                }
                Err(error) if older_than(&left, GIVE_UP_AFTER) => {
                    warn!(%job_id, %shuffle, %writes_to, %error,
                        days = GIVE_UP_AFTER.as_secs() / 86_400,
                        "gave up cleaning up what a job left in object storage, after trying \
                         for days; delete the job's folder at its shuffle location, if it is \
                         still there (a later write into its table settles its write)");
                    handle.recorder.storage_cleaned(job_id);
                    sweeper.forget(job_id);
                }
                Err(error) => {
                    let retry = sweeper.failed(job_id, started);
                    warn!(%job_id, %shuffle, %writes_to, %error,
                        retry_secs = retry.as_secs(),
                        "cannot clean up what the job's clean-up left in object storage; \
                         it is tried again");
                }
            }
        }
    }
}

/// How the ended job of `left` ended, for settling its write: as one that
/// succeeded if a settling found its write committed already (`committed`,
/// `None` if it could not be read; its job may be recorded as failed);
/// else as the scheduler's directory of jobs says, or the job history once
/// the directory has let it go. `None` if that is not known.
async fn how_it_ended(
    planner: &Planner,
    handle: &SchedulerHandle,
    committed: Option<&HashSet<String>>,
    left: &StorageLeft,
) -> Option<JobEnded> {
    if committed?.contains(&left.job_id) {
        return Some(JobEnded::Succeeded);
    }
    if let Some(status) = handle.directory.get(&left.job_id) {
        return Some(ended_as(status.borrow().state()));
    }
    match planner.job_record(&left.job_id).await {
        Ok(record) => record
            .and_then(|record| record.status)
            .map(|status| ended_as(status.state())),
        Err(e) => {
            warn!(job_id = %left.job_id, %e, "cannot read how the job ended");
            None
        }
    }
}

/// How a job that ended as `state` ended, for settling its write.
fn ended_as(state: JobState) -> JobEnded {
    match state {
        JobState::Succeeded => JobEnded::Succeeded,
        _ => JobEnded::Otherwise,
    }
}

/// Whether the job of `left` was accepted longer than `age` ago.
fn older_than(left: &StorageLeft, age: Duration) -> bool {
    let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
    unix_millis().saturating_sub(left.recorded_at_unix_ms) > age_ms
}

/// Cleans up what one ended job left: deletes its durable map outputs and
/// settles its write as the job `ended` (not tried if that is not known),
/// noting a write found committed though the job did not succeed. The two
/// may lie on different stores, so each has its own [`CLEAN_UP_TIMEOUT`],
/// and a location whose clean-up timed out in this sweep (`timed_out`) is
/// not tried. The errors, redacted.
async fn clean_up(
    recorder: &JobRecorder,
    stores: &Arc<StoreRegistry>,
    left: &StorageLeft,
    ended: Option<JobEnded>,
    timed_out: &Mutex<HashSet<String>>,
) -> Result<(), String> {
    let job_id = left.job_id.as_str();
    let deleting = async {
        durable::remove_job(stores, &left.shuffle_location, job_id)
            .await
            .map_err(|e| redacted_error(&e).to_string())
    };
    let settling = async {
        let Some(ended) = ended else {
            return Err("how the job ended is not known, so its write is not settled".into());
        };
        let settling =
            settle_write_and_staging(stores, &left.writes_to, job_id, ended, FinishOverwrite::No);
        match settling.await {
            Ok((settled, staging)) => {
                if recorder.note_settled(job_id, ended, &settled) {
                    warn!(%job_id, writes_to = %left.writes_to,
                        "the job did not succeed, but its write had committed: its rows are \
                         in the table");
                }
                match staging {
                    Staging::Deleted => Ok(()),
                    Staging::Left => Err("its write's staging folder could not be deleted".into()),
                }
            }
            Err(e) => Err(redacted_error(&e).to_string()),
        }
    };
    let (deleted, settled) = tokio::join!(
        within_time(&left.shuffle_location, deleting, timed_out),
        within_time(&left.writes_to, settling, timed_out),
    );
    match (deleted, settled) {
        (Ok(()), Ok(())) => {
            debug!(%job_id, "cleaned up what the job left in object storage");
            Ok(())
        }
        (Err(error), Ok(())) | (Ok(()), Err(error)) => Err(error),
        (Err(deleting), Err(settling)) => Err(format!("{deleting}; {settling}")),
    }
}

/// Runs the clean-up of one `location` (nothing to do if empty) within
/// [`CLEAN_UP_TIMEOUT`], unless a clean-up there timed out in this sweep
/// (`timed_out`), which a timeout adds it to.
async fn within_time(
    location: &str,
    cleaning: impl Future<Output = Result<(), String>>,
    timed_out: &Mutex<HashSet<String>>,
) -> Result<(), String> {
    if location.is_empty() {
        return Ok(());
    }
    let locked = || timed_out.lock().unwrap_or_else(PoisonError::into_inner);
    if locked().contains(location) {
        return Err(format!(
            "{location} not tried: a clean-up there did not finish in time"
        ));
    }
    match tokio::time::timeout(CLEAN_UP_TIMEOUT, cleaning).await {
        Ok(cleaned) => cleaned.map_err(|error| format!("{location}: {error}")),
        Err(_) => {
            locked().insert(location.to_owned());
            Err(format!(
                "{location}: the store did not finish within {} s",
                CLEAN_UP_TIMEOUT.as_secs()
            ))
        }
    }
}

/// Which recorded jobs are due for a clean-up: what the sweeps remember.
#[derive(Debug, Default)]
struct Sweeper {
    /// Jobs found ended by an earlier sweep.
    seen_ended: HashSet<String>,
    /// Jobs whose clean-up failed: when to try again, and the wait that
    /// led there.
    retry_at: HashMap<String, (Instant, Duration)>,
}

impl Sweeper {
    /// The jobs of `left` to clean up after `now`: ended (not `running`)
    /// at an earlier sweep already, and not waiting to be tried again.
    /// Forgets what is no longer recorded.
    fn due(
        &mut self,
        left: Vec<StorageLeft>,
        running: impl Fn(&str) -> bool,
        now: Instant,
    ) -> Vec<StorageLeft> {
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

    /// Forgets `job_id`, whose record goes; returns whether a clean-up of
    /// it had failed before.
    fn forget(&mut self, job_id: &str) -> bool {
        self.seen_ended.remove(job_id);
        self.retry_at.remove(job_id).is_some()
    }

    /// Notes a failed clean-up at `now`; returns the wait until the next.
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

    fn left(job_id: &str) -> StorageLeft {
        StorageLeft {
            job_id: job_id.into(),
            shuffle_location: "s3://shuffle/maps".into(),
            writes_to: "s3://lake/table/".into(),
            stores: Vec::new(),
            recorded_at_unix_ms: 1,
        }
    }

    /// No job runs.
    fn ended(_: &str) -> bool {
        false
    }

    fn ids(due: &[StorageLeft]) -> Vec<&str> {
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
        let accepted = |days_ago: u64| StorageLeft {
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
