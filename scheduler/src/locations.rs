//! The object stores a job touches, and the options its tasks need for them.
//!
//! A location configured with per-table options (`OPTIONS ('aws.region' ...)`)
//! is known only to the scheduler's registry; the options travel with each
//! of the job's tasks so that the executors build the same store. Locations
//! without options are built from each executor's own environment.

use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::datasource::physical_plan::{FileScanConfig, FileSink, FileSinkConfig};
use datafusion::datasource::sink::DataSinkExec;
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::source_as_provider;
use datafusion::error::Result;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::ExecutionPlan;
use quiver_core::storage::{StoreRegistry, redacted_error};
use quiver_core::write::sinks::file_sink_config;
use quiver_core::write::{ParquetCommitExec, ParquetWriteExec};
use quiver_proto::StoreConfig;
use tracing::warn;

use crate::managed::table_folders;

/// The store options of every location that `plan` reads or writes, and of
/// the durable shuffle location, if any: empty for a location configured by
/// no statement.
pub fn store_configs(
    plan: &Arc<dyn ExecutionPlan>,
    shuffle_location: &str,
    registry: &StoreRegistry,
) -> Result<Vec<StoreConfig>> {
    let mut urls = BTreeSet::new();
    if !shuffle_location.is_empty() {
        let url = ListingTableUrl::parse(shuffle_location)?;
        urls.insert(url.object_store());
    }
    plan.apply(|node| {
        if let Some(url) = scanned_location(node) {
            urls.insert(url);
        }
        if let Some(config) = written_location(node) {
            urls.insert(config.object_store_url.clone());
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(urls
        .into_iter()
        .map(|url| {
            // A location without options is sent too, so that an executor
            // drops options that the scheduler has since put back.
            let options = registry.options_for(url.as_ref()).unwrap_or_default();
            StoreConfig {
                url: url.as_str().to_owned(),
                options: options
                    .iter()
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect(),
            }
        })
        .collect())
}

/// The stores that a job's data is settled or deleted with once it ends:
/// those its tasks ran with (its `configs`), not the ones configured then.
/// Its statement's options are put back if it fails, and another statement
/// may configure a bucket anew while it runs, so the registry of the moment
/// may hold other credentials (a reader's, or none) than its writes had.
pub fn job_stores(
    shared: &Arc<StoreRegistry>,
    configs: &[StoreConfig],
    job_id: &str,
) -> Arc<StoreRegistry> {
    match shared.pinned(configs) {
        Ok(pinned) => Arc::new(pinned),
        Err(e) => {
            let e = redacted_error(&e);
            warn!(%job_id, %e, "cannot set up the stores the job ran with; \
                its data is cleaned up with the stores configured now");
            Arc::clone(shared)
        }
    }
}

/// The table folder that `plan` commits a distributed write into, if any.
/// Jobs writing the same folder run one at a time: two commits (an overwrite
/// and anything else) must not interleave their deletes and moves.
pub fn write_target(plan: &Arc<dyn ExecutionPlan>) -> Option<String> {
    let mut target = None;
    plan.apply(|node| {
        if let Some(commit) = node.downcast_ref::<ParquetCommitExec>() {
            target = commit
                .sink()
                .config()
                .table_paths
                .first()
                .map(ToString::to_string);
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .ok()?;
    target
}

/// Whether `plan` reads a table whose files lie in the folder `target`
/// (or around it), subqueries included.
pub fn reads_target(plan: &LogicalPlan, target: &str) -> bool {
    let mut reads = false;
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Ok(table) = source_as_provider(&scan.source)
            && table_folders(&table).is_some_and(|folders| {
                folders
                    .iter()
                    .any(|folder| targets_overlap(folder.as_str(), target))
            })
        {
            reads = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    reads
}

/// The folders of the Parquet tables that `plan` reads, subqueries included.
pub fn read_parquet_folders(plan: &LogicalPlan) -> Vec<ListingTableUrl> {
    let mut folders = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Ok(table) = source_as_provider(&scan.source)
            && let Some(read) = table_folders(&table)
        {
            folders.extend(read.iter().cloned());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    folders
}

/// Whether two write targets may hold the same files: one folder is the
/// other or lies inside it, however its URL is written. Azure's `az://c/`,
/// `abfs://c/` and `abfss://c@account.dfs.core.windows.net/` name one
/// container; `s3a://` is `s3://`, `gcs://` is `gs://`. An account is not
/// compared (`az://` takes it from options), which can only make two
/// writes wait for each other needlessly.
pub fn targets_overlap(left: &str, right: &str) -> bool {
    let (left, right) = (folder_key(left), folder_key(right));
    left.starts_with(&right) || right.starts_with(&left)
}

/// A folder's location as `<store kind>://<bucket>/<path>/`, the same for
/// every way of writing it; the text itself where it is not a URL.
fn folder_key(target: &str) -> String {
    let Ok(url) = url::Url::parse(target) else {
        return format!("{}/", target.trim_end_matches('/'));
    };
    let host = url.host_str().unwrap_or_default();
    let (kind, bucket) = match url.scheme() {
        "az" | "azure" | "abfs" | "abfss" | "adl" => {
            let container = match url.username() {
                "" => host,
                container => container,
            };
            ("azure", container)
        }
        "s3" | "s3a" => ("s3", host),
        "gs" | "gcs" => ("gs", host),
        other => (other, host),
    };
    let path = url.path().trim_matches('/');
    if path.is_empty() {
        format!("{kind}://{bucket}/")
    } else {
        format!("{kind}://{bucket}/{path}/")
    }
}

fn scanned_location(node: &Arc<dyn ExecutionPlan>) -> Option<ObjectStoreUrl> {
    let source = node.downcast_ref::<DataSourceExec>()?;
    let scan = source.data_source().downcast_ref::<FileScanConfig>()?;
    Some(scan.object_store_url.clone())
}

fn written_location(node: &Arc<dyn ExecutionPlan>) -> Option<&FileSinkConfig> {
    if let Some(write) = node.downcast_ref::<ParquetWriteExec>() {
        return Some(write.sink().config());
    }
    if let Some(commit) = node.downcast_ref::<ParquetCommitExec>() {
        return Some(commit.sink().config());
    }
    file_sink_config(node.downcast_ref::<DataSinkExec>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_folder_written_several_ways_is_one_target() {
        for (left, right) in [
            ("az://lake/t/", "abfss://lake@acct.dfs.core.windows.net/t"),
            ("abfs://lake/t/", "azure://lake/t/"),
            ("s3://b/t/", "s3a://b/t"),
            ("gs://b/t/", "gcs://b/t/"),
            ("file:///w/t/", "file:///w/t"),
            // A folder inside another shares its files.
            ("s3://b/t/", "s3://b/t/year=2024/"),
        ] {
            assert!(targets_overlap(left, right), "{left} and {right}");
            assert!(targets_overlap(right, left), "{right} and {left}");
        }
        for (left, right) in [
            ("az://lake/t/", "az://lake2/t/"),
            (
                "abfss://lake@acct.dfs.core.windows.net/t/",
                "abfss://lake2@acct.dfs.core.windows.net/t/",
            ),
            ("s3://b/t/", "s3://b/t2/"),
            ("s3://b/t/", "gs://b/t/"),
        ] {
            assert!(!targets_overlap(left, right), "{left} and {right}");
        }
    }
}
