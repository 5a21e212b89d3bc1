//! DataFusion's own file sinks, which Quiver leaves in place: CSV, JSON and
//! single-file outputs, written by one task that stages nothing.
//!
//! Those sinks report a store's refusal without its cause ("Error
//! encountered while finalizing writes! Partial results may have been
//! written"), so the access to the folder they write in is checked before
//! they run: by the scheduler when it plans the write, and again by the
//! executor that runs it, whose credentials or file permissions may differ.

use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::file_format::csv::CsvSink;
use datafusion::datasource::file_format::json::JsonSink;
use datafusion::datasource::file_format::parquet::ParquetSink;
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::datasource::physical_plan::{FileSink, FileSinkConfig};
use datafusion::datasource::sink::DataSinkExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::physical_plan::ExecutionPlan;
use object_store::path::Path;

use super::commit::check_folder_write_access;
use super::exec::write_failure;

/// The folder that a write through one of DataFusion's own sinks creates
/// files in (a CSV or JSON folder, or a single file's folder), if `plan`
/// has one: such a write stages nothing.
pub fn unstaged_write_folder(plan: &Arc<dyn ExecutionPlan>) -> Option<(String, Path)> {
    let mut folder = None;
    let _ = plan.apply(|node| {
        let config = node
            .downcast_ref::<DataSinkExec>()
            .and_then(file_sink_config);
        if let Some(config) = config
            && let Some(url) = config.table_paths.first()
        {
            let prefix = url.prefix().clone();
            let created_in = if config.file_output_mode.single_file_output(url) {
                let parts: Vec<_> = prefix.parts().collect();
                parts[..parts.len().saturating_sub(1)]
                    .iter()
                    .cloned()
                    .collect()
            } else {
                prefix
            };
            folder = Some((url.to_string(), created_in));
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    folder
}

/// The configuration of one of DataFusion's file sinks: Parquet, CSV, JSON.
pub fn file_sink_config(sink_exec: &DataSinkExec) -> Option<&FileSinkConfig> {
    let sink = sink_exec.sink();
    if let Some(parquet) = sink.downcast_ref::<ParquetSink>() {
        return Some(parquet.config());
    }
    if let Some(csv) = sink.downcast_ref::<CsvSink>() {
        return Some(csv.config());
    }
    sink.downcast_ref::<JsonSink>().map(|json| json.config())
}

/// Checks that this process may create objects in the folder that the
/// DataFusion sink of `plan` writes in, if `plan` has one (see
/// [`check_folder_write_access`]); the error names the location. Spawned:
/// a task cancelled midway must not leave the check's object behind.
pub async fn check_unstaged_write_access(
    plan: &Arc<dyn ExecutionPlan>,
    runtime: &RuntimeEnv,
    job_id: &str,
) -> Result<()> {
    let Some((location, folder)) = unstaged_write_folder(plan) else {
        return Ok(());
    };
    let store = ListingTableUrl::parse(&location)
        .and_then(|url| runtime.object_store(url.object_store()))
        .map_err(|e| write_failure(&location, e))?;
    let job_id = job_id.to_owned();
    let checked =
        tokio::spawn(async move { check_folder_write_access(&store, &folder, &job_id).await })
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
    checked.map_err(|e| write_failure(&location, e))
}
