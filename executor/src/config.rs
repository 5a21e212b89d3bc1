//! Executor settings, from flags or `QUIVER_*` environment variables.

use std::path::PathBuf;

use clap::Parser;

/// Default bytes of small map outputs an executor holds in memory.
pub const DEFAULT_SHUFFLE_MEMORY_LIMIT: u64 = 256 * 1024 * 1024;

/// A Quiver executor: runs tasks for the scheduler and serves their shuffle data.
#[derive(Debug, Clone, Parser)]
#[command(name = "quiver-executor", version)]
pub struct ExecutorConfig {
    /// Scheduler address to dial, e.g. `http://scheduler:50050`.
    #[arg(
        long,
        env = "QUIVER_SCHEDULER_URL",
        default_value = "http://127.0.0.1:50050"
    )]
    pub scheduler_url: String,

    /// Address to bind the Arrow Flight data plane to.
    #[arg(long, env = "QUIVER_BIND_HOST", default_value = "127.0.0.1")]
    pub bind_host: String,

    /// Host name that other executors and clients use to reach this one
    /// (defaults to the bind host).
    #[arg(long, env = "QUIVER_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,

    /// Port of the Arrow Flight data plane (0 picks a free port).
    #[arg(long, env = "QUIVER_FLIGHT_PORT", default_value_t = 50051)]
    pub flight_port: u16,

    /// Number of tasks run at once (defaults to the number of cores).
    #[arg(long, env = "QUIVER_SLOTS")]
    pub slots: Option<usize>,

    /// Threads that run tasks (defaults to the number of cores, and never
    /// fewer than the slots). Lower it when several executors share a machine.
    #[arg(long, env = "QUIVER_TASK_THREADS")]
    pub task_threads: Option<usize>,

    /// Memory pool shared by all running tasks, in bytes; operators spill to
    /// disk beyond it.
    #[arg(long, env = "QUIVER_MEMORY_LIMIT", default_value_t = 4 * 1024 * 1024 * 1024)]
    pub memory_limit: usize,

    /// Bytes of small map outputs held in memory rather than in files
    /// (counted in the memory limit); 0 writes every output to a file.
    #[arg(long, env = "QUIVER_SHUFFLE_MEMORY_LIMIT", default_value_t = DEFAULT_SHUFFLE_MEMORY_LIMIT)]
    pub shuffle_memory_limit: u64,

    /// Folder for shuffle files and spills.
    #[arg(long, env = "QUIVER_WORK_DIR", default_value_os_t = std::env::temp_dir().join("quiver-executor"))]
    pub work_dir: PathBuf,

    /// On SIGTERM the executor drains: it takes no new tasks, finishes its
    /// running ones and serves its shuffle data while running jobs need it, for
    /// at most this many seconds, then exits. Keep Kubernetes'
    /// `terminationGracePeriodSeconds` above it. 0 stops at once.
    #[arg(long, env = "QUIVER_DRAIN_GRACE_SECS", default_value_t = 120)]
    pub drain_grace_secs: u64,

    /// Shuffle folders of jobs untouched for this many seconds are removed,
    /// in case the scheduler's request to remove them was lost.
    #[arg(long, env = "QUIVER_SHUFFLE_TTL_SECS", default_value_t = 24 * 3600)]
    pub shuffle_ttl_secs: u64,

    /// Unique id of this executor (defaults to a random one).
    #[arg(long, env = "QUIVER_EXECUTOR_ID", default_value_t = default_executor_id())]
    pub executor_id: String,
}

fn default_executor_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

impl ExecutorConfig {
    /// A configuration for tests and the embedded cluster.
    pub fn local(scheduler_url: impl Into<String>, work_dir: PathBuf) -> Self {
        Self {
            scheduler_url: scheduler_url.into(),
            bind_host: "127.0.0.1".into(),
            advertise_host: None,
            flight_port: 0,
            slots: None,
            task_threads: None,
            memory_limit: 4 * 1024 * 1024 * 1024,
            shuffle_memory_limit: DEFAULT_SHUFFLE_MEMORY_LIMIT,
            work_dir,
            drain_grace_secs: 0,
            shuffle_ttl_secs: 24 * 3600,
            executor_id: default_executor_id(),
        }
    }

    pub fn drain_grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.drain_grace_secs)
    }

    pub fn slots(&self) -> usize {
        self.slots.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
        })
    }

    /// Threads of the task pool: by default the cores, since DataFusion
    /// spreads a task's work over several threads; never fewer than the slots.
    pub fn task_threads(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        self.task_threads.unwrap_or(cores).max(self.slots())
    }

    pub fn advertised_host(&self) -> &str {
        self.advertise_host.as_deref().unwrap_or(&self.bind_host)
    }

    /// Where the shuffle files of every executor sharing the work dir live.
    pub fn shuffle_root(&self) -> PathBuf {
        self.work_dir.join("shuffle")
    }

    /// Where this executor's shuffle files live, one folder per job. Executors
    /// may share a work dir: each has its own folder in it.
    pub fn shuffle_dir(&self) -> PathBuf {
        self.shuffle_root().join(&self.executor_id)
    }

    /// Where this executor's operators spill.
    pub fn spill_dir(&self) -> PathBuf {
        self.work_dir.join("spill").join(&self.executor_id)
    }

    pub fn shuffle_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.shuffle_ttl_secs)
    }
}
