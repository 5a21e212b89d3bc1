//! Names the files a task read when one of them cannot be decoded.
//!
//! DataFusion's Parquet reader reports a file that is not Parquet, or is
//! cut short or corrupt, without saying which file (`Invalid Parquet file.
//! Corrupt footer`). A table on a folder of thousands of files then leaves
//! its user searching. The task knows the files its scans read: a decoding
//! failure is given them as context. Store errors name their object already.

use std::sync::Arc;

use arrow::error::ArrowError;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::DataFusionError;
use datafusion::parquet::errors::ParquetError;
use datafusion::physical_plan::ExecutionPlan;

/// Files named in an error at most; the rest are counted.
const NAMED_FILES: usize = 3;

/// `error` with the files that `plan`'s scans read for `partition` named,
/// if it is a failure to decode Parquet data; otherwise `error` itself.
pub fn name_scanned_files(
    error: DataFusionError,
    plan: &Arc<dyn ExecutionPlan>,
    partition: usize,
) -> DataFusionError {
    if !is_decoding_failure(&error) {
        return error;
    }
    let files = scanned_files(plan, partition);
    let Some(first) = files.first() else {
        return error;
    };
    let context = match files.len() {
        1 => format!("reading '{first}'"),
        count => {
            let named: Vec<String> = files
                .iter()
                .take(NAMED_FILES)
                .map(|file| format!("'{file}'"))
                .collect();
            let more = count.saturating_sub(NAMED_FILES);
            let rest = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            format!("reading one of {}{rest}", named.join(", "))
        }
    };
    error.context(context)
}

/// Whether `error` comes from decoding Parquet rather than from a store:
/// the Parquet reader's or Arrow's Parquet error, with no store error as
/// its cause.
fn is_decoding_failure(error: &DataFusionError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let mut decoding = false;
    while let Some(current) = cause {
        if current.is::<object_store::Error>() {
            return false;
        }
        decoding |= current.is::<ParquetError>()
            || matches!(
                current.downcast_ref(),
                Some(DataFusionError::ParquetError(_))
            )
            || matches!(current.downcast_ref(), Some(ArrowError::ParquetError(_)));
        cause = current.source();
    }
    decoding
}

/// The files (`<store><path>`) that the scans of `plan` read for
/// `partition`: the scan's file group of that number where the plan has one
/// scan; every file where it has several (a union numbers its inputs'
/// partitions one after the other) or the scan has fewer groups.
fn scanned_files(plan: &Arc<dyn ExecutionPlan>, partition: usize) -> Vec<String> {
    let mut scans: Vec<&FileScanConfig> = Vec::new();
    let _ = plan.apply(|node| {
        if let Some(scan) = node
            .downcast_ref::<DataSourceExec>()
            .and_then(|source| source.data_source().downcast_ref::<FileScanConfig>())
        {
            scans.push(scan);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    let one_scan = scans.len() == 1;
    scans
        .into_iter()
        .flat_map(|scan| {
            let groups = match scan.file_groups.get(partition) {
                Some(group) if one_scan => std::slice::from_ref(group),
                _ => scan.file_groups.as_slice(),
            };
            // `s3://lake/` and `np3/f.parquet`, or `file:///` and `tmp/f.parquet`.
            let store = scan.object_store_url.as_str();
            let separator = if store.ends_with('/') { "" } else { "/" };
            groups
                .iter()
                .flat_map(|group| group.files())
                .map(move |file| format!("{store}{separator}{}", file.object_meta.location))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;

    use super::*;

    #[tokio::test]
    async fn a_file_that_is_not_parquet_is_named() {
        let folder = tempfile::tempdir().expect("temp folder");
        let file = folder.path().join("part-0.parquet");
        let batch = arrow::record_batch::RecordBatch::try_from_iter([(
            "x",
            Arc::new(arrow::array::Int64Array::from(vec![1, 2])) as _,
        )])
        .expect("batch");
        let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&file).expect("file"),
            batch.schema(),
            None,
        )
        .expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        let context = SessionContext::new();
        let frame = context
            .read_parquet(file.display().to_string(), Default::default())
            .await
            .expect("read");
        let plan = frame.create_physical_plan().await.expect("plan");
        // Replaced after planning by as many bytes that are not Parquet.
        let size = std::fs::metadata(&file).expect("size").len() as usize;
        std::fs::write(&file, vec![b'x'; size]).expect("replace");
        let stream = plan.execute(0, context.task_ctx()).expect("execute");
        let error = datafusion::physical_plan::common::collect(stream)
            .await
            .expect_err("not Parquet");
        let named = name_scanned_files(error, &plan, 0).to_string();
        let expected = format!("reading 'file://{}'", file.display());
        assert!(named.contains(&expected), "{named}");

        let store = DataFusionError::ObjectStore(Box::new(object_store::Error::NotFound {
            path: "x".into(),
            source: "gone".into(),
        }));
        assert!(!is_decoding_failure(&store));
    }
}
