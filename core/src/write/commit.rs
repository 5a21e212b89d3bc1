//! [`ParquetCommitExec`]: the one task that makes a write job's files visible.
//!
//! Its input is the file list of every write task: the map output of each
//! task's winning attempt (or, for a one-partition write, its own input). It:
//! 1. moves each staged file to its committed name;
//! 2. deletes files of this job that an earlier run of the commit moved in
//!    but the current list does not name;
//! 3. for `INSERT OVERWRITE`, deletes the table's older data files: all of
//!    them, or only those in the partition folders this job wrote;
//! 4. writes the job's manifest, `_manifests/<job>.json`;
//! 5. deletes the job's staging folder, and with it the files of losing attempts.
//!
//! New files go in before old ones go, and each step can be repeated, so a
//! retried commit task finishes the work of one that died midway. Between
//! steps 1 and 3 a reader may see old and new rows together: object stores
//! offer no atomic multi-file rename. Its result is the row count, as
//! DataFusion's sinks return.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::{SystemTime, UNIX_EPOCH};

use arrow::array::{AsArray, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt64Type};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::file_format::parquet::ParquetSink;
use datafusion::datasource::physical_plan::FileSink;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tracing::info;

use crate::operators::{final_output, only_child};
use crate::storage::{delete_paths, delete_prefix};

use super::layout::{
    STAGING_FOLDER, is_bookkeeping, job_staging, join, manifest as manifest_path, relative_to,
    written_by,
};

/// How many objects are moved or deleted at once.
const CONCURRENT_REQUESTS: usize = 16;

/// The result of a write job: how many rows it wrote.
pub static COUNT_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![Field::new(
        "count",
        DataType::UInt64,
        false,
    )]))
});

/// Commits the staged files of a write job.
#[derive(Debug)]
pub struct ParquetCommitExec {
    input: Arc<dyn ExecutionPlan>,
    sink: Arc<ParquetSink>,
    job_id: String,
    properties: Arc<PlanProperties>,
}

impl ParquetCommitExec {
    pub fn new(input: Arc<dyn ExecutionPlan>, sink: Arc<ParquetSink>, job_id: String) -> Self {
        let properties = final_output(Arc::clone(&COUNT_SCHEMA), 1);
        Self {
            input,
            sink,
            job_id,
            properties,
        }
    }

    pub fn sink(&self) -> &Arc<ParquetSink> {
        &self.sink
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }
}

impl DisplayAs for ParquetCommitExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let config = self.sink.config();
        write!(
            f,
            "ParquetCommitExec: location={}, mode={}",
            config.original_url, config.insert_op
        )
    }
}

impl ExecutionPlan for ParquetCommitExec {
    fn name(&self) -> &str {
        "ParquetCommitExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::new(
            only_child(children, "ParquetCommitExec")?,
            Arc::clone(&self.sink),
            self.job_id.clone(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "ParquetCommitExec has one partition, asked for {partition}"
            )));
        }
        let config = self.sink.config();
        let table = config
            .table_paths
            .first()
            .ok_or_else(|| DataFusionError::Internal("a commit has no output location".into()))?
            .prefix()
            .clone();
        let commit = Commit {
            store: context
                .runtime_env()
                .object_store(&config.object_store_url)?,
            local: config.object_store_url.as_str().starts_with("file://"),
            location: config.original_url.clone(),
            table,
            job_id: self.job_id.clone(),
            insert_op: config.insert_op,
            partitioned: !config.table_partition_cols.is_empty(),
        };
        let input = self.input.execute(0, context)?;
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&COUNT_SCHEMA),
            futures::stream::once(commit.run(input)),
        )))
    }
}

/// A file staged by a winning attempt.
struct StagedFile {
    staged: Path,
    relative: String,
    rows: u64,
    bytes: u64,
}

struct Commit {
    store: Arc<dyn ObjectStore>,
    /// Whether the table is on the local file system, where deleting objects
    /// leaves their folders behind.
    local: bool,
    location: String,
    table: Path,
    job_id: String,
    insert_op: InsertOp,
    partitioned: bool,
}

impl Commit {
    async fn run(self, input: SendableRecordBatchStream) -> Result<RecordBatch> {
        let files = staged_files(input).await?;
        if self.insert_op == InsertOp::Replace {
            return Err(DataFusionError::NotImplemented(
                "REPLACE INTO is not supported for Parquet tables; use INSERT OVERWRITE".into(),
            ));
        }
        // New files go in before old ones go: a commit that dies in between
        // leaves extra rows, never lost ones, and its retry finishes the job.
        self.move_into_place(&files).await?;
        self.delete_stale_files_of_this_job(&files).await?;
        if self.insert_op == InsertOp::Overwrite {
            self.delete_replaced(&files).await?;
        }
        let rows: u64 = files.iter().map(|file| file.rows).sum();
        self.write_manifest(&files, rows).await?;
        self.delete_staging().await?;
        info!(job_id = %self.job_id, location = %self.location, files = files.len(), rows,
            "write committed");
        Ok(RecordBatch::try_new(
            Arc::clone(&COUNT_SCHEMA),
            vec![Arc::new(UInt64Array::from(vec![rows]))],
        )?)
    }

    /// The table's data files, relative to it: what a scan of it reads.
    /// Staging, manifests and other sub-folders are not data.
    async fn data_files(&self) -> Result<Vec<(Path, String)>> {
        let listed: Vec<Path> = self
            .store
            .list(Some(&self.table))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await?;
        Ok(listed
            .into_iter()
            .filter(|path| !is_bookkeeping(&self.table, path))
            .filter_map(|path| {
                let relative = relative_to(&self.table, &path)?;
                let in_folder_of_data = relative
                    .split('/')
                    .rev()
                    .skip(1)
                    .all(|folder| folder.contains('='));
                in_folder_of_data.then_some((path, relative))
            })
            .collect())
    }

    /// Deletes files that an earlier run of this commit moved in but this
    /// run's attempts did not write (a recomputed write may split its rows
    /// into fewer files): the current file list is the truth.
    async fn delete_stale_files_of_this_job(&self, files: &[StagedFile]) -> Result<()> {
        let current: HashSet<&str> = files.iter().map(|file| file.relative.as_str()).collect();
        let stale = self
            .data_files()
            .await?
            .into_iter()
            .filter(|(path, relative)| {
                written_by(path, &self.job_id) && !current.contains(relative.as_str())
            })
            .map(|(path, _)| path)
            .collect();
        self.delete_all(stale).await
    }

    /// Deletes the files that an overwrite replaces: in the partition
    /// folders this job wrote for a partitioned table, all of the table's
    /// data files otherwise. Files of this job stay.
    async fn delete_replaced(&self, files: &[StagedFile]) -> Result<()> {
        let touched: HashSet<&str> = files.iter().map(|file| folder_of(&file.relative)).collect();
        let replaced = self
            .data_files()
            .await?
            .into_iter()
            .filter(|(path, relative)| {
                !written_by(path, &self.job_id)
                    && (!self.partitioned || touched.contains(folder_of(relative)))
            })
            .map(|(path, _)| path)
            .collect();
        self.delete_all(replaced).await
    }

    async fn move_into_place(&self, files: &[StagedFile]) -> Result<()> {
        let moves = files
            .iter()
            .map(|file| Ok((file.staged.clone(), self.committed_path(&file.relative)?)))
            .collect::<Result<Vec<_>>>()?;
        concurrently(
            moves,
            &self.store,
            |store, (staged, committed)| async move {
                match store.rename(&staged, &committed).await {
                    Ok(()) => Ok(()),
                    // Moved already by an earlier run of this step.
                    Err(object_store::Error::NotFound { .. })
                        if store.head(&committed).await.is_ok() =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(DataFusionError::from(e)),
                }
            },
        )
        .await
    }

    fn committed_path(&self, relative: &str) -> Result<Path> {
        join(&self.table, relative).map_err(|e| DataFusionError::External(Box::new(e)))
    }

    /// Writes the job's manifest: every file it committed, with its rows and size.
    async fn write_manifest(&self, files: &[StagedFile], rows: u64) -> Result<()> {
        let committed_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let manifest = serde_json::json!({
            "job_id": self.job_id,
            "committed_at_unix_secs": committed_at,
            "mode": self.insert_op.to_string(),
            "rows": rows,
            "files": files.iter().map(|file| serde_json::json!({
                "path": file.relative,
                "rows": file.rows,
                "bytes": file.bytes,
            })).collect::<Vec<_>>(),
        });
        self.store
            .put(
                &manifest_path(&self.table, &self.job_id),
                PutPayload::from(manifest.to_string()),
            )
            .await?;
        Ok(())
    }

    /// Deletes the job's staging folder: the winners' files are gone from it
    /// already, so what remains are the files of failed or losing attempts.
    async fn delete_staging(&self) -> Result<()> {
        let staging = job_staging(&self.table, &self.job_id);
        delete_prefix(&self.store, &staging, self.local).await?;
        if self.local {
            // Other jobs may be writing into it: only an empty folder goes.
            let temporary = std::path::Path::new("/")
                .join(self.table.as_ref())
                .join(STAGING_FOLDER);
            let _ = tokio::fs::remove_dir(temporary).await;
        }
        Ok(())
    }

    async fn delete_all(&self, paths: Vec<Path>) -> Result<()> {
        let paths = futures::stream::iter(paths.into_iter().map(Ok)).boxed();
        Ok(delete_paths(&self.store, paths).await?)
    }
}

/// Runs `request` for every item, [`CONCURRENT_REQUESTS`] at a time.
async fn concurrently<T, F, Fut>(
    items: impl IntoIterator<Item = T>,
    store: &Arc<dyn ObjectStore>,
    request: F,
) -> Result<()>
where
    F: Fn(Arc<dyn ObjectStore>, T) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let requests: Vec<Fut> = items
        .into_iter()
        .map(|item| request(Arc::clone(store), item))
        .collect();
    futures::stream::iter(requests)
        .buffer_unordered(CONCURRENT_REQUESTS)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// The folder of a relative path: `a=1/b=2` for `a=1/b=2/part.parquet`.
fn folder_of(relative: &str) -> &str {
    relative.rsplit_once('/').map_or("", |(folder, _)| folder)
}

/// Reads the write tasks' file lists.
async fn staged_files(mut input: SendableRecordBatchStream) -> Result<Vec<StagedFile>> {
    let mut files = Vec::new();
    while let Some(batch) = input.next().await {
        let batch = batch?;
        let column = |name: &str| {
            batch.column_by_name(name).ok_or_else(|| {
                DataFusionError::Internal(format!("write task output has no '{name}' column"))
            })
        };
        let staged = column("staged")?.as_string::<i32>();
        let relative = column("file")?.as_string::<i32>();
        let rows = column("rows")?.as_primitive::<UInt64Type>();
        let bytes = column("bytes")?.as_primitive::<UInt64Type>();
        for row in 0..batch.num_rows() {
            files.push(StagedFile {
                staged: Path::parse(staged.value(row))
                    .map_err(|e| DataFusionError::External(Box::new(e)))?,
                relative: relative.value(row).to_owned(),
                rows: rows.value(row),
                bytes: bytes.value(row),
            });
        }
    }
    Ok(files)
}
