//! Names the files a task read when one of them cannot be decoded, and
//! says why a file it was planned to read is gone.
//!
//! DataFusion's Parquet reader reports a file that is not Parquet, or is
//! cut short or corrupt, without saying which file (`Invalid Parquet file.
//! Corrupt footer`). A table on a folder of thousands of files then leaves
//! its user searching. The task knows the files its scans read: a decoding
//! failure is given them as context. Store errors name their object
//! already, but a planned file that the store no longer has was most likely
//! replaced by a write to its table after the statement was planned: the
//! error says so, typed, so that the scheduler plans the statement again
//! and it reads the new files.

use std::sync::Arc;

use arrow::error::ArrowError;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::DataFusionError;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::parquet::errors::ParquetError;
use datafusion::physical_plan::ExecutionPlan;
use object_store::ObjectStoreExt;
use object_store::path::Path;

/// Files named in an error at most; the rest are counted.
const NAMED_FILES: usize = 3;

/// `error` explained by the files that `plan`'s scans read for
/// `partition`: a planned file that is gone from its store is named and
/// said to be deleted after planning, and a failure to decode Parquet names
/// the files it may come from; other errors are returned as they are.
pub async fn explain_scan_failure(
    error: DataFusionError,
    plan: &Arc<dyn ExecutionPlan>,
    partition: usize,
    runtime: &RuntimeEnv,
) -> DataFusionError {
    let files = scanned_files(plan, partition);
    if let Some(gone) = deleted_file(&error, &files, runtime).await {
        // Typed, so that the scheduler plans the statement again.
        return quiver_core::Error::PlannedFileDeleted {
            file: gone.name.clone(),
            message: error.to_string(),
        }
        .into();
    }
    // A writer's failure may hold a Parquet error too, but is the output's.
    if !is_decoding_failure(&error) || quiver_core::write::is_write_failure(&error) {
        return error;
    }
    let files: Vec<String> = files.into_iter().map(|file| file.name).collect();
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

/// The scanned file that `error` names and that its store no longer has.
/// DataFusion's Parquet reader keeps the store's error only as text
/// (`Failed to fetch metadata for file ...: ... not found`), so the files
/// that the error's text names are looked up in their store: one request
/// each, for a task that has failed anyway.
async fn deleted_file<'a>(
    error: &DataFusionError,
    files: &'a [ScannedFile],
    runtime: &RuntimeEnv,
) -> Option<&'a ScannedFile> {
    let text = error.to_string();
    let named = files
        .iter()
        .filter(|file| text.contains(file.location.as_ref()))
        .take(NAMED_FILES);
    for file in named {
        let Ok(store) = runtime.object_store(&file.store) else {
            continue;
        };
        if let Err(object_store::Error::NotFound { .. }) = store.head(&file.location).await {
            return Some(file);
        }
    }
    None
}

/// A file that a scan reads.
struct ScannedFile {
    /// `<store><path>`, as errors name it.
    name: String,
    store: ObjectStoreUrl,
    location: Path,
}

/// The files (`<store><path>`, and their paths in the store) that the scans of `plan` read for
/// `partition`: the scan's file group of that number where the plan has one
/// scan; every file where it has several (a union numbers its inputs'
/// partitions one after the other) or the scan has fewer groups.
fn scanned_files(plan: &Arc<dyn ExecutionPlan>, partition: usize) -> Vec<ScannedFile> {
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
            let store = &scan.object_store_url;
            let separator = if store.as_str().ends_with('/') {
                ""
            } else {
                "/"
            };
            groups
                .iter()
                .flat_map(|group| group.files())
                .map(move |file| {
                    let location = file.object_meta.location.clone();
                    ScannedFile {
                        name: format!("{}{separator}{location}", store.as_str()),
                        store: store.clone(),
                        location,
                    }
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;

    use super::*;

    /// The plan of a scan of a new Parquet file of two rows at `file`.
    async fn scan_of_new_file(
        context: &SessionContext,
        file: &std::path::Path,
    ) -> Arc<dyn ExecutionPlan> {
        let batch = arrow::record_batch::RecordBatch::try_from_iter([(
            "x",
            Arc::new(arrow::array::Int64Array::from(vec![1, 2])) as _,
        )])
        .expect("batch");
        let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(file).expect("file"),
            batch.schema(),
            None,
        )
        .expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        context
            .read_parquet(file.display().to_string(), Default::default())
            .await
            .expect("read")
            .create_physical_plan()
            .await
            .expect("plan")
    }

    /// The Parquet writer reports a refused file as a Parquet error, as the
    /// reader reports a corrupt one; only the reader's is blamed on the
    /// files the task read.
    #[tokio::test]
    async fn a_failed_write_is_not_blamed_on_what_the_task_read() {
        let folder = tempfile::tempdir().expect("temp folder");
        let context = SessionContext::new();
        let plan = scan_of_new_file(&context, &folder.path().join("part-0.parquet")).await;
        let refused = || {
            DataFusionError::ParquetError(Box::new(ParquetError::External(Box::new(
                std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            ))))
        };
        let runtime = context.runtime_env();
        let read = explain_scan_failure(refused(), &plan, 0, &runtime).await;
        assert!(read.to_string().contains("reading '"), "{read}");
        let written = quiver_core::write::write_failure("file:///out/", refused());
        let written = explain_scan_failure(written, &plan, 0, &runtime).await;
        assert!(!written.to_string().contains("reading '"), "{written}");
        assert!(
            written
                .to_string()
                .starts_with("cannot write to 'file:///out/'"),
            "{written}"
        );
    }

    #[tokio::test]
    async fn a_file_that_is_not_parquet_or_is_gone_is_named() {
        let folder = tempfile::tempdir().expect("temp folder");
        let file = folder.path().join("part-0.parquet");
        let context = SessionContext::new();
        let plan = scan_of_new_file(&context, &file).await;
        // Replaced after planning by as many bytes that are not Parquet.
        let size = std::fs::metadata(&file).expect("size").len() as usize;
        std::fs::write(&file, vec![b'x'; size]).expect("replace");
        let stream = plan.execute(0, context.task_ctx()).expect("execute");
        let error = datafusion::physical_plan::common::collect(stream)
            .await
            .expect_err("not Parquet");
        let runtime = context.runtime_env();
        let named = explain_scan_failure(error, &plan, 0, &runtime)
            .await
            .to_string();
        let expected = format!("reading 'file://{}'", file.display());
        assert!(named.contains(&expected), "{named}");

        // Deleted after planning: an overwrite replaced it.
        let file = folder.path().join("part-1.parquet");
        let plan = scan_of_new_file(&context, &file).await;
        std::fs::remove_file(&file).expect("delete");
        let stream = plan.execute(0, context.task_ctx()).expect("execute");
        let error = datafusion::physical_plan::common::collect(stream)
            .await
            .expect_err("gone");
        let explained = explain_scan_failure(error, &plan, 0, &runtime).await;
        assert_eq!(
            quiver_core::error::classify_failure(&explained),
            quiver_proto::FailureKind::InputReplaced
        );
        let explained = explained.to_string();
        assert!(
            explained.contains(&format!(
                "'file://{}' was deleted after this statement was planned",
                file.display()
            )) && explained.contains("run the statement again"),
            "{explained}"
        );

        let store = DataFusionError::ObjectStore(Box::new(object_store::Error::NotFound {
            path: "x".into(),
            source: "gone".into(),
        }));
        assert!(!is_decoding_failure(&store));
    }
}
