//! An embedded cluster: one scheduler and N executors in this process, talking
//! real gRPC and Arrow Flight over loopback. Used by the README's first command
//! (the TPC-H runner) and by the integration tests.

use std::time::Duration;

use quiver_executor::ExecutorConfig;
use quiver_scheduler::SchedulerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::context::QuiverContext;
use crate::error::Result;

/// Shape of an embedded cluster.
#[derive(Debug, Clone)]
pub struct StandaloneOptions {
    pub executors: usize,
    pub slots_per_executor: usize,
    /// Memory pool of each executor, in bytes.
    pub memory_limit: usize,
    /// Bytes of small map outputs each executor holds in memory instead of
    /// files; 0 writes them all to files.
    pub shuffle_memory_limit: u64,
    /// Shuffle partitions when a job does not set them.
    pub default_partitions: usize,
    /// Jobs running at once; later ones queue. 0 means no limit.
    pub max_running_jobs: usize,
    /// Where `CREATE TABLE ... AS` writes its tables: a folder or an object
    /// store URL. By default a folder in the cluster's work folder, which
    /// goes when the cluster stops, as its catalog does (it is not stored).
    pub warehouse: Option<String>,
}

impl Default for StandaloneOptions {
    fn default() -> Self {
        Self {
            executors: 2,
            slots_per_executor: 2,
            memory_limit: 2 * 1024 * 1024 * 1024,
            shuffle_memory_limit: quiver_executor::config::DEFAULT_SHUFFLE_MEMORY_LIMIT,
            default_partitions: 4,
            max_running_jobs: 16,
            warehouse: None,
        }
    }
}

/// A running embedded cluster; dropping it stops every component.
#[derive(Debug)]
pub struct StandaloneCluster {
    url: String,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    work_dir: tempfile::TempDir,
}

/// Work folders of embedded clusters are named `<prefix><random>` in the
/// temporary folder.
const WORK_DIR_PREFIX: &str = "quiver-standalone-";

/// The file in a work folder naming the process that owns it.
const OWNER_FILE: &str = "owner.pid";

impl StandaloneCluster {
    pub async fn start(options: StandaloneOptions) -> std::io::Result<Self> {
        // Removing gigabytes of files must not hold up this runtime's threads,
        // and the new cluster does not wait for it.
        tokio::task::spawn_blocking(|| sweep_abandoned_work_dirs(&std::env::temp_dir()));
        let work_dir = tempfile::Builder::new().prefix(WORK_DIR_PREFIX).tempdir()?;
        std::fs::write(
            work_dir.path().join(OWNER_FILE),
            std::process::id().to_string(),
        )?;
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();

        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("quiver://{}", listener.local_addr()?);
        let scheduler_config = SchedulerConfig {
            default_partitions: options.default_partitions,
            max_running_jobs: options.max_running_jobs,
            state_dir: work_dir.path().join("scheduler"),
            warehouse: options.warehouse.clone(),
            ..SchedulerConfig::local()
        };
        let shutdown = wait_for(stopped.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = quiver_scheduler::run(scheduler_config, listener, shutdown).await {
                tracing::error!(%e, "embedded scheduler failed");
            }
        }));

        for index in 0..options.executors {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let mut config = ExecutorConfig::local(
                url.replace("quiver://", "http://"),
                work_dir.path().join(format!("executor-{index}")),
            );
            config.slots = Some(options.slots_per_executor);
            // The executors share this machine's cores: more task threads
            // than cores would only make them take turns.
            let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
            config.task_threads = Some((cores / options.executors.max(1)).max(1));
            config.memory_limit = options.memory_limit;
            config.shuffle_memory_limit = options.shuffle_memory_limit;
            let shutdown = wait_for(stopped.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = quiver_executor::run(config, listener, shutdown).await {
                    tracing::error!(%e, "embedded executor failed");
                }
            }));
        }
        Ok(Self {
            url,
            stop,
            tasks,
            work_dir,
        })
    }

    /// `quiver://127.0.0.1:<port>` of the scheduler.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The folder holding each executor's work dir (`executor-<n>/`).
    pub fn work_dir(&self) -> &std::path::Path {
        self.work_dir.path()
    }

    /// Connects a client, once every executor has registered.
    pub async fn connect(&self, executors: usize) -> Result<QuiverContext> {
        let context = QuiverContext::connect(&self.url).await?;
        wait_for_executors(&context, executors).await?;
        Ok(context)
    }

    /// Stops every component and waits for them.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for StandaloneCluster {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Removes the work folders of embedded clusters whose process is gone. A
/// cluster removes its folder when it stops, but a process killed with
/// SIGKILL cannot, and its shuffle files can take gigabytes. Only folders
/// that name their owner are considered, and only where `/proc` tells which
/// processes are alive; a reused process id keeps a folder, never the reverse.
fn sweep_abandoned_work_dirs(temp: &std::path::Path) {
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(temp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(WORK_DIR_PREFIX) {
            continue;
        }
        let Ok(owner) = std::fs::read_to_string(entry.path().join(OWNER_FILE)) else {
            continue;
        };
        let Ok(pid) = owner.trim().parse::<u32>() else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => tracing::info!(folder = %entry.path().display(), pid,
                    "removed the work folder of an embedded cluster whose process is gone"),
                Err(e) => tracing::warn!(folder = %entry.path().display(), %e,
                    "cannot remove an abandoned work folder"),
            }
        }
    }
}

async fn wait_for(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Waits until `executors` executors have registered and take tasks. Gives up
/// after 30 seconds.
async fn wait_for_executors(context: &QuiverContext, executors: usize) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let registered = context.executors().await;
        match registered {
            Ok(list) if list.iter().filter(|e| !e.draining).count() >= executors => {
                return Ok(());
            }
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(crate::Error::ExecutorsMissing {
                    expected: executors,
                });
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_folders_of_dead_processes_are_swept() {
        let temp = tempfile::tempdir().expect("temp folder");
        let make = |name: &str, owner: Option<String>| {
            let dir = temp.path().join(name);
            std::fs::create_dir(&dir).expect("folder");
            std::fs::write(dir.join("shuffle.data"), b"data").expect("file");
            if let Some(owner) = owner {
                std::fs::write(dir.join(OWNER_FILE), owner).expect("owner");
            }
            dir
        };
        let mut exited = std::process::Command::new("true").spawn().expect("spawn");
        let dead_pid = exited.id();
        exited.wait().expect("wait");
        let dead = make("quiver-standalone-dead", Some(dead_pid.to_string()));
        let alive = make(
            "quiver-standalone-alive",
            Some(std::process::id().to_string()),
        );
        let unmarked = make("quiver-standalone-unmarked", None);
        let other = make("someone-else", Some(dead_pid.to_string()));

        sweep_abandoned_work_dirs(temp.path());

        assert!(!dead.exists(), "the dead process's folder is removed");
        assert!(alive.exists() && unmarked.exists() && other.exists());
    }
}
