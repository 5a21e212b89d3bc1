//! Distributed Parquet writes with a commit protocol.
//!
//! DataFusion writes `COPY ... TO` and `INSERT INTO` through one sink that
//! takes a single input partition. Quiver replaces that with two steps:
//! every task of the last stage writes its own rows ([`ParquetWriteExec`]),
//! and one commit task then makes the winning attempts' files visible
//! ([`ParquetCommitExec`]). See [`layout`] for where files go.
//!
//! - [`layout`]: staging and committed paths.
//! - [`partition`]: hive partition folders.
//! - [`exec`]: the write tasks.
//! - [`commit`]: the commit step.
//! - [`snapshot`]: what readers see of a table: committed writes only.
//! - [`fold`]: many finished manifests kept as one file.
//! - [`order`]: the order of overwrites from writers that share no scheduler.
//! - [`permission`]: the scheduler's permission to commit.
//! - [`plan`]: swapping DataFusion's sink for the two steps.
//! - [`sinks`]: the writes left to DataFusion's own sinks (CSV, JSON, one file).

pub mod commit;
pub mod exec;
pub mod fold;
pub mod layout;
pub mod order;
pub mod partition;
pub mod permission;
pub mod plan;
pub mod sinks;
pub mod snapshot;

pub use commit::{
    FinishOverwrite, JobEnded, ParquetCommitExec, Settled, Staging, Written,
    check_folder_write_access, check_write_access, settle_write, settle_write_and_staging,
    write_result_ipc,
};
pub use exec::{ParquetWriteExec, is_write_failure, write_failure};
pub use plan::distribute_parquet_writes;

/// Where a write goes, as plans show it: the table's location. The sink's
/// `original_url` is empty for an `INSERT` and does not survive
/// serialization.
pub fn shown_location(config: &datafusion::datasource::physical_plan::FileSinkConfig) -> String {
    config
        .table_paths
        .first()
        .map_or_else(|| config.original_url.clone(), ToString::to_string)
}

/// The attempt number of the task running a plan, set by the executor, so
/// that each attempt writes under its own staging folder.
#[derive(Debug, Clone, Copy, Default)]
pub struct TaskAttempt {
    pub attempt: u32,
}
