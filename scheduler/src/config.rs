//! Scheduler settings, from flags or `QUIVER_*` environment variables.

use std::time::Duration;

use clap::Parser;

/// The Quiver scheduler: plans jobs into stages and runs them on executors.
#[derive(Debug, Clone, Parser)]
#[command(name = "quiver-scheduler", version)]
pub struct SchedulerConfig {
    /// Address to serve gRPC on.
    #[arg(long, env = "QUIVER_BIND_HOST", default_value = "127.0.0.1")]
    pub bind_host: String,

    /// Port to serve gRPC on.
    #[arg(long, env = "QUIVER_PORT", default_value_t = 50050)]
    pub port: u16,

    /// Partitions of each shuffle, unless a job sets
    /// `datafusion.execution.target_partitions`.
    #[arg(long, env = "QUIVER_DEFAULT_PARTITIONS", default_value_t = 4)]
    pub default_partitions: usize,

    /// How often executors send a heartbeat, in milliseconds.
    #[arg(long, env = "QUIVER_HEARTBEAT_INTERVAL_MS", default_value_t = 1000)]
    pub heartbeat_interval_ms: u64,

    /// An executor silent for this many milliseconds is considered lost.
    #[arg(long, env = "QUIVER_EXECUTOR_TIMEOUT_MS", default_value_t = 10_000)]
    pub executor_timeout_ms: u64,

    /// Jobs that run at once; later ones wait in a queue, in order, and show
    /// their place in it. 0 means no limit.
    #[arg(long, env = "QUIVER_MAX_RUNNING_JOBS", default_value_t = 16)]
    pub max_running_jobs: usize,

    /// Largest gRPC message accepted or sent, in bytes: plans of big queries
    /// can be large, but a bigger message is refused with a clear error.
    #[arg(long, env = "QUIVER_MAX_MESSAGE_BYTES", default_value_t = crate::MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// Folder of the embedded store that keeps the catalog and the job history
    /// across restarts. Put it on a persistent volume.
    #[arg(long, env = "QUIVER_STATE_DIR", default_value_os_t = std::env::temp_dir().join("quiver-scheduler"))]
    pub state_dir: std::path::PathBuf,

    /// Where `CREATE TABLE ... AS SELECT` writes its tables, one folder per
    /// table: a local folder or an object store URL (`s3://bucket/warehouse`).
    /// Default: the `warehouse` folder in the state folder.
    #[arg(long, env = "QUIVER_WAREHOUSE")]
    pub warehouse: Option<String>,

    /// Keep the catalog and job history in memory only (lost on restart).
    #[arg(long, env = "QUIVER_EPHEMERAL_STATE")]
    pub ephemeral_state: bool,

    /// How long a finished job's result is kept when the client never reads it, in seconds.
    #[arg(long, env = "QUIVER_RESULT_RETENTION_SECS", default_value_t = 600)]
    pub result_retention_secs: u64,

    /// How long a write's commit may change its table, in seconds (at most
    /// 6 hours). A commit still at it then (a store that stopped answering)
    /// stops, and counts as a failed attempt: another one finishes or redoes
    /// the commit. Leave room for the largest overwrite: moving and deleting
    /// its files.
    #[arg(long, env = "QUIVER_COMMIT_TIMEOUT_SECS", default_value_t = 1800,
        value_parser = clap::value_parser!(u64)
            .range(1..=quiver_core::write::layout::MAX_COMMIT_TIMEOUT_SECS))]
    pub commit_timeout_secs: u64,
}

impl SchedulerConfig {
    /// A configuration for tests and the embedded cluster.
    pub fn local() -> Self {
        Self {
            bind_host: "127.0.0.1".into(),
            port: 0,
            default_partitions: 4,
            heartbeat_interval_ms: 1000,
            executor_timeout_ms: 10_000,
            result_retention_secs: 600,
            commit_timeout_secs: 1800,
            max_running_jobs: 16,
            max_message_bytes: crate::MAX_MESSAGE_BYTES,
            state_dir: std::env::temp_dir().join("quiver-scheduler"),
            warehouse: None,
            ephemeral_state: true,
        }
    }

    /// The warehouse location, as a URL or absolute path ending in `/`.
    pub fn warehouse(&self) -> String {
        let location = match &self.warehouse {
            Some(location) => location.clone(),
            None => self.state_dir.join("warehouse").display().to_string(),
        };
        format!("{}/", location.trim_end_matches('/'))
    }

    /// Opens the embedded store this configuration asks for.
    pub fn open_store(&self) -> Result<crate::store::StateStore, crate::store::StoreError> {
        if self.ephemeral_state {
            crate::store::StateStore::in_memory()
        } else {
            crate::store::StateStore::open(&self.state_dir)
        }
    }

    pub fn loop_config(&self) -> crate::state::event_loop::LoopConfig {
        crate::state::event_loop::LoopConfig {
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms),
            executor_timeout: Duration::from_millis(self.executor_timeout_ms),
            result_retention: Duration::from_secs(self.result_retention_secs),
            max_running_jobs: self.max_running_jobs,
            commit_timeout: Duration::from_secs(self.commit_timeout_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::SchedulerConfig;

    /// A commit's time to act is at least a second and at most six hours:
    /// the sweep of abandoned writes relies on the bound.
    #[test]
    fn a_commit_timeout_out_of_range_is_refused() {
        let parse = |secs: &str| {
            SchedulerConfig::try_parse_from(["quiver-scheduler", "--commit-timeout-secs", secs])
        };
        for refused in ["0", "21601", "99999999999999999"] {
            let error = parse(refused).expect_err(refused).to_string();
            assert!(error.contains("--commit-timeout-secs"), "{error}");
        }
        assert_eq!(
            parse("21600").expect("six hours").commit_timeout_secs,
            21600
        );
    }
}
