//! Swaps DataFusion's single-task Parquet sink for a distributed write.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::file_format::parquet::ParquetSink;
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::datasource::physical_plan::{FileSink, FileSinkConfig};
use datafusion::datasource::sink::DataSinkExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::physical_expr::expressions::col;
use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;

use super::{ParquetCommitExec, ParquetWriteExec};

/// Rewrites every Parquet sink that writes a folder into write tasks, one per
/// input partition, and a commit task over their file lists.
///
/// Single-file outputs (one writer by definition) are left as they are: the
/// store makes that one file appear whole (a completed multipart upload, or a
/// rename on local disk).
///
/// An ordered write (a table with a declared sort order, or a `COPY` whose
/// rows come in order: DataFusion then records the order in the files)
/// depends on where the order comes from:
///
/// - A query that sorts its rows (`ORDER BY`) keeps the sink's input, merged
///   into one partition, so one task writes the files in that order.
/// - Rows that are only sorted within each partition, as a sorted table's
///   scan is, are written by a task per partition, each in its partition's
///   order: every file is sorted, as its metadata says, and the files of
///   a table stored in key ranges keep their ranges.
///
/// Both go through the same staging and commit as every other write.
///
/// `overwrite` makes the writes replace the table's files. DataFusion's
/// Parquet sink refuses to plan overwrites, so the caller plans an append
/// and asks for the overwrite here.
pub fn distribute_parquet_writes(
    plan: Arc<dyn ExecutionPlan>,
    job_id: &str,
    overwrite: bool,
) -> Result<Arc<dyn ExecutionPlan>> {
    let distributed = plan.transform_down(|node| {
        let Some(sink_exec) = node.downcast_ref::<DataSinkExec>() else {
            return Ok(Transformed::no(node));
        };
        let Some(parquet) = sink_exec.sink().downcast_ref::<ParquetSink>() else {
            return Ok(Transformed::no(node));
        };
        let config = parquet.config();
        check_write_target(&config.table_paths, overwrite)?;
        let single_file = config
            .table_paths
            .first()
            .is_none_or(|url| config.file_output_mode.single_file_output(url));
        if single_file {
            if overwrite {
                return Err(DataFusionError::NotImplemented(
                    "INSERT OVERWRITE needs a Parquet table on a folder, not a single file".into(),
                ));
            }
            return Ok(Transformed::no(node));
        }
        let mut config = config.clone();
        if overwrite {
            config.insert_op = InsertOp::Overwrite;
        }
        let input = grouped_by_partition_folder(write_tasks_input(sink_exec), sink_exec, &config)?;
        let sink = Arc::new(ParquetSink::new(config, parquet.parquet_options().clone()));
        let write = Arc::new(ParquetWriteExec::new(
            input,
            Arc::clone(&sink),
            job_id.to_owned(),
        ));
        let commit: Arc<dyn ExecutionPlan> = Arc::new(ParquetCommitExec::new(
            Arc::new(CoalescePartitionsExec::new(write)),
            sink,
            job_id.to_owned(),
        ));
        Ok(Transformed::new(commit, true, TreeNodeRecursion::Jump))
    })?;
    if overwrite && !distributed.transformed {
        return Err(DataFusionError::NotImplemented(
            "INSERT OVERWRITE is supported for Parquet tables only".into(),
        ));
    }
    Ok(distributed.data)
}

/// Refuses writes whose files readers of the table would not see as they
/// should: any write to a table on a glob (its files need not match the
/// glob, and an overwrite would delete the glob's whole folder), and an
/// overwrite of a table on several locations (only the first is written).
fn check_write_target(table_paths: &[ListingTableUrl], overwrite: bool) -> Result<()> {
    if let Some(glob) = table_paths.iter().find(|url| url.get_glob().is_some()) {
        return Err(DataFusionError::Plan(format!(
            "cannot write to the table at {}: it is a glob, and a write needs a table on one folder",
            glob.as_str()
        )));
    }
    if overwrite && table_paths.len() > 1 {
        return Err(DataFusionError::Plan(format!(
            "INSERT OVERWRITE needs a table on one folder, not {} locations",
            table_paths.len()
        )));
    }
    Ok(())
}

/// The plan whose partitions the write tasks write. The sink asked for one
/// input partition; the write tasks take them all, unless the merge also
/// applies a LIMIT (`fetch`), which needs the one partition, or the query
/// sorted its rows, which must stay in one order.
fn write_tasks_input(sink_exec: &DataSinkExec) -> Arc<dyn ExecutionPlan> {
    let input = sink_exec.input();
    let ordered = sink_exec.sort_order().is_some();
    if let Some(coalesce) = input.downcast_ref::<CoalescePartitionsExec>()
        && coalesce.fetch().is_none()
        && !ordered
    {
        return Arc::clone(coalesce.input());
    }
    if let Some(merge) = input.downcast_ref::<SortPreservingMergeExec>()
        && merge.fetch().is_none()
        && !sorted_by_the_query(merge.input())
    {
        return Arc::clone(merge.input());
    }
    Arc::clone(input)
}

/// `input` sorted by the partition columns within each partition, as Spark
/// sorts a partitioned write, so that each write task meets each partition
/// folder once: it finishes a folder's file before the next folder begins.
/// Unsorted, a task writing more folders than it keeps files open (64)
/// closes and reopens them over and over, and a write into 300 folders made
/// 11,100 small files. The order that the write asks for, if any (an
/// `ORDER BY`, a sorted table, rows that come in order: DataFusion records
/// it in the files), follows the partition columns, so that every file
/// keeps it. An unpartitioned write is left as it is.
fn grouped_by_partition_folder(
    input: Arc<dyn ExecutionPlan>,
    sink_exec: &DataSinkExec,
    config: &FileSinkConfig,
) -> Result<Arc<dyn ExecutionPlan>> {
    if config.table_partition_cols.is_empty() {
        return Ok(input);
    }
    let schema = input.schema();
    let mut keys: Vec<PhysicalSortExpr> = config
        .table_partition_cols
        .iter()
        .map(|(name, _)| Ok(PhysicalSortExpr::new_default(col(name, &schema)?)))
        .collect::<Result<_>>()?;
    if let Some(order) = sink_exec.sort_order() {
        keys.extend(order.iter().cloned().map(PhysicalSortExpr::from));
    }
    let Some(ordering) = LexOrdering::new(keys) else {
        return Ok(input);
    };
    Ok(Arc::new(
        SortExec::new(ordering, input).with_preserve_partitioning(true),
    ))
}

/// Whether the order of `plan`'s partitions comes from a sort in the query,
/// rather than from its inputs (a table stored sorted).
fn sorted_by_the_query(plan: &Arc<dyn ExecutionPlan>) -> bool {
    if plan.is::<SortExec>() {
        return true;
    }
    match plan.children().as_slice() {
        [child] if plan.maintains_input_order().first() == Some(&true) => {
            sorted_by_the_query(child)
        }
        _ => false,
    }
}
