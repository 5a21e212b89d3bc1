//! Removes shuffle data that nobody will ask for again.
//!
//! The scheduler tells executors to remove a job's data when the job ends, but
//! that message can be lost: the scheduler may crash, or an executor may die
//! with files on disk. So an executor also starts from a clean work dir, and a
//! sweeper removes job folders untouched for longer than a time to live, as
//! long as none of this executor's tasks is still running for that job. Map
//! outputs held in memory are swept by the same rule.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use crate::task::TaskRunner;

/// Removes folders of this executor's own, e.g. at start, where whatever a
/// previous process left belongs to attempts the scheduler already gave up,
/// and after a drain, when no one needs the shuffle data any more. `why` is
/// logged with each.
pub fn remove_own_dirs(dirs: &[PathBuf], why: &str) {
    for dir in dirs {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => info!(dir = %dir.display(), why, "removed folder"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(dir = %dir.display(), why, %e, "cannot remove folder"),
        }
    }
}

/// Sweeps `shuffle_root` (every executor's folder under it) every so often.
pub async fn run(shuffle_root: PathBuf, ttl: Duration, runner: Arc<TaskRunner>) {
    let mut ticker = tokio::time::interval(sweep_interval(ttl));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let running = runner.running_jobs();
        for job_id in runner.outputs().sweep(ttl, &running, Instant::now()) {
            info!(%job_id, ttl_secs = ttl.as_secs(), "dropped orphaned shuffle data held in memory");
        }
        let root = shuffle_root.clone();
        let swept =
            tokio::task::spawn_blocking(move || sweep(&root, ttl, &running, SystemTime::now()))
                .await;
        if let Ok(removed) = swept {
            for dir in removed {
                info!(dir = %dir.display(), ttl_secs = ttl.as_secs(), "swept orphaned shuffle data");
            }
        }
    }
}

fn sweep_interval(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(600))
}

/// Removes every `<executor>/<job>` folder under `root` whose newest file is
/// older than `ttl`, except the folders of jobs in `running`. Returns them.
pub fn sweep(
    root: &Path,
    ttl: Duration,
    running: &HashSet<String>,
    now: SystemTime,
) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for executor_dir in subdirectories(root) {
        for job_dir in subdirectories(&executor_dir) {
            let running_here = job_dir
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|job_id| running.contains(job_id));
            if running_here || !untouched_for(&job_dir, ttl, now) {
                continue;
            }
            match std::fs::remove_dir_all(&job_dir) {
                Ok(()) => removed.push(job_dir),
                Err(e) => warn!(dir = %job_dir.display(), %e, "cannot sweep shuffle data"),
            }
        }
    }
    removed
}

fn subdirectories(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .map(|entry| entry.path())
        .collect()
}

/// Whether nothing in the tree under `path` changed for `ttl`. An unreadable
/// entry counts as recent, so that a sweep never removes what it cannot judge.
fn untouched_for(path: &Path, ttl: Duration, now: SystemTime) -> bool {
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return false;
    };
    let recent = metadata.modified().map_or(true, |modified| {
        now.duration_since(modified).map_or(true, |age| age < ttl)
    });
    if recent {
        return false;
    }
    if !metadata.is_dir() {
        return true;
    }
    match std::fs::read_dir(path) {
        Ok(entries) => entries
            .flatten()
            .all(|entry| untouched_for(&entry.path(), ttl, now)),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age(path: &Path, by: Duration) {
        let file = std::fs::File::open(path).expect("open");
        file.set_modified(SystemTime::now() - by)
            .expect("set mtime");
    }

    #[test]
    fn sweeps_only_old_jobs_that_are_not_running() {
        let root = tempfile::tempdir().expect("tempdir");
        let hour = Duration::from_secs(3600);
        let make = |executor: &str, job: &str, old: bool| {
            let dir = root.path().join(executor).join(job).join("stage-1");
            std::fs::create_dir_all(&dir).expect("mkdir");
            let file = dir.join("0-0.data");
            std::fs::write(&file, b"x").expect("write");
            if old {
                for path in [
                    file.clone(),
                    dir.clone(),
                    dir.parent().expect("job").to_owned(),
                ] {
                    age(&path, 2 * hour);
                }
            }
            dir.parent().expect("job dir").to_owned()
        };
        let stale = make("e1", "stale", true);
        let fresh = make("e1", "fresh", false);
        let running = make("e2", "running", true);
        let removed = sweep(
            root.path(),
            hour,
            &HashSet::from(["running".to_owned()]),
            SystemTime::now(),
        );
        assert_eq!(removed, vec![stale.clone()]);
        assert!(!stale.exists());
        assert!(fresh.exists());
        assert!(running.exists());
    }

    #[test]
    fn one_recent_file_keeps_an_old_job() {
        let root = tempfile::tempdir().expect("tempdir");
        let hour = Duration::from_secs(3600);
        let job = root.path().join("e1").join("job");
        std::fs::create_dir_all(&job).expect("mkdir");
        std::fs::write(job.join("new.data"), b"x").expect("write");
        age(&job, 2 * hour);
        assert!(sweep(root.path(), hour, &HashSet::new(), SystemTime::now()).is_empty());
    }
}
