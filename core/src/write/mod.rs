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
//! - [`plan`]: swapping DataFusion's sink for the two steps.

pub mod commit;
pub mod exec;
pub mod layout;
pub mod partition;
pub mod plan;

pub use commit::ParquetCommitExec;
pub use exec::ParquetWriteExec;
pub use plan::distribute_parquet_writes;

use datafusion::datasource::listing::ListingTableUrl;
use datafusion::execution::runtime_env::RuntimeEnv;

use crate::storage::delete_prefix;

/// Deletes the staging folder of `job_id` under the table at `table_url`:
/// what its attempts wrote and no commit moved.
pub async fn remove_staging(
    runtime: &RuntimeEnv,
    table_url: &str,
    job_id: &str,
) -> datafusion::error::Result<()> {
    let table = ListingTableUrl::parse(table_url)?;
    let store = runtime.object_store(table.object_store())?;
    let staging = layout::job_staging(table.prefix(), job_id);
    delete_prefix(&store, &staging, table.scheme() == "file").await
}

/// The attempt number of the task running a plan, set by the executor, so
/// that each attempt writes under its own staging folder.
#[derive(Debug, Clone, Copy, Default)]
pub struct TaskAttempt {
    pub attempt: u32,
}
