//! The object stores a job touches, and the options its tasks need for them.
//!
//! A location configured with per-table options (`OPTIONS ('aws.region' ...)`)
//! is known only to the scheduler's registry; the options travel with each
//! of the job's tasks so that the executors build the same store. Locations
//! without options are built from each executor's own environment.

use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::file_format::csv::CsvSink;
use datafusion::datasource::file_format::json::JsonSink;
use datafusion::datasource::file_format::parquet::ParquetSink;
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::datasource::physical_plan::{FileScanConfig, FileSink, FileSinkConfig};
use datafusion::datasource::sink::DataSinkExec;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::Result;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::physical_plan::ExecutionPlan;
use quiver_core::storage::StoreRegistry;
use quiver_core::write::{ParquetCommitExec, ParquetWriteExec};
use quiver_proto::StoreConfig;

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
    let sink = node.downcast_ref::<DataSinkExec>()?.sink();
    if let Some(parquet) = sink.downcast_ref::<ParquetSink>() {
        return Some(parquet.config());
    }
    if let Some(csv) = sink.downcast_ref::<CsvSink>() {
        return Some(csv.config());
    }
    sink.downcast_ref::<JsonSink>().map(|json| json.config())
}
