//! [`ParquetWriteExec`]: every task of a write stage writes its own rows into
//! Parquet files under its attempt's staging folder, rolling over to a new
//! file at the target size, and returns one row per file it wrote. Its
//! metrics, named as DataFusion's Parquet sink names them, count the rows,
//! files and bytes (footers included) that it wrote.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock};

use arrow::array::{RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::file_options::parquet_writer::ParquetWriterOptions;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::file_format::parquet::ParquetSink;
use datafusion::datasource::physical_plan::{FileSink, FileSinkConfig};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::metrics::{
    Count, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
};
use futures::StreamExt;
use object_store::buffered::BufWriter;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::AsyncArrowWriter;
use parquet::arrow::arrow_writer::ArrowWriterOptions;
use parquet::file::properties::WriterProperties;
use tracing::warn;

use super::TaskAttempt;
use super::layout::{attempt_staging, file_name, join, upload_record};
use super::partition::HivePartitioner;
use crate::config::QuiverOptions;
use crate::lease::{Lease, task_lease};
use crate::operators::{final_output, only_child};
use crate::storage::redacted_error;
use crate::storage::upload::{FileUpload, PARTS_IN_FLIGHT, RecordedUpload, multipart_store};

/// Files one write task keeps open at once, across partition folders. Past
/// it, the least recently written file is finished: a task writing many
/// partitions then writes more, smaller files instead of running out of memory.
const MAX_OPEN_FILES: usize = 64;

/// The largest file a task writes: S3 copies (our renames) stop at 5 GiB.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// The rows a write task returns: one per file it staged.
pub static WRITTEN_FILES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("staged", DataType::Utf8, false),
        Field::new("file", DataType::Utf8, false),
        Field::new("rows", DataType::UInt64, false),
        Field::new("bytes", DataType::UInt64, false),
    ]))
});

/// Writes each input partition into its own staged Parquet files.
#[derive(Debug)]
pub struct ParquetWriteExec {
    input: Arc<dyn ExecutionPlan>,
    sink: Arc<ParquetSink>,
    job_id: String,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl ParquetWriteExec {
    pub fn new(input: Arc<dyn ExecutionPlan>, sink: Arc<ParquetSink>, job_id: String) -> Self {
        let properties = final_output(
            Arc::clone(&WRITTEN_FILES_SCHEMA),
            input.output_partitioning().partition_count(),
        );
        Self {
            input,
            sink,
            job_id,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    pub fn sink(&self) -> &Arc<ParquetSink> {
        &self.sink
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }
}

impl DisplayAs for ParquetWriteExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let config = self.sink.config();
        write!(
            f,
            "ParquetWriteExec: location={}",
            super::shown_location(config)
        )?;
        if !config.table_partition_cols.is_empty() {
            let columns: Vec<&str> = config
                .table_partition_cols
                .iter()
                .map(|(name, _)| name.as_str())
                .collect();
            write!(f, ", partitioned_by=[{}]", columns.join(", "))?;
        }
        Ok(())
    }
}

impl ExecutionPlan for ParquetWriteExec {
    fn name(&self) -> &str {
        "ParquetWriteExec"
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
            only_child(children, "ParquetWriteExec")?,
            Arc::clone(&self.sink),
            self.job_id.clone(),
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let task = WriteTask::new(self, partition, &context)?;
        let input = self.input.execute(partition, context)?;
        let input = without_nulls_in_not_null_columns(input, self.sink.config());
        let written = futures::stream::once(task.run(input));
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&WRITTEN_FILES_SCHEMA),
            written,
        )))
    }
}

/// One task's write: its open files and what it has written so far.
struct WriteTask {
    store: Arc<dyn ObjectStore>,
    /// The store's multipart API, through which uploads are recorded.
    multipart: Option<Arc<dyn MultipartStore>>,
    lease: Option<Arc<Lease>>,
    /// The output location as the user wrote it, for error messages.
    location: String,
    table: Path,
    staging: Path,
    job_id: String,
    partition: usize,
    attempt: u32,
    /// Uploads started, for naming their records.
    uploads: usize,
    extension: String,
    partitioner: HivePartitioner,
    properties: WriterProperties,
    target_file_bytes: usize,
    buffer_bytes: usize,
    reservation: MemoryReservation,
    open: HashMap<String, OpenFile>,
    /// Counts writes, to find the least recently written open file.
    clock: u64,
    /// Files per partition folder, for numbering.
    files_per_folder: HashMap<String, usize>,
    written: Vec<WrittenFile>,
    counts: WriteCounts,
}

/// What a write task has finished, for its operator's metrics.
struct WriteCounts {
    rows: Count,
    files: Count,
    bytes: Count,
}

impl WriteCounts {
    fn new(metrics: &ExecutionPlanMetricsSet, partition: usize) -> Self {
        let counter = |name: &'static str| MetricBuilder::new(metrics).counter(name, partition);
        Self {
            rows: counter("rows_written"),
            files: counter("files_written"),
            bytes: counter("bytes_written"),
        }
    }
}

struct OpenFile {
    relative: String,
    rows: u64,
    /// When this file was last written to, in [`WriteTask::clock`] ticks.
    last_write: u64,
    writer: AsyncArrowWriter<FileUpload>,
}

/// The share of the target size at which a file whose row groups are all
/// flushed counts as full, rather than go on with a small row group.
const FULL_SHARE: f64 = 0.9;

struct WrittenFile {
    relative: String,
    rows: u64,
    bytes: u64,
}

impl WriteTask {
    fn new(exec: &ParquetWriteExec, partition: usize, context: &Arc<TaskContext>) -> Result<Self> {
        let config: &FileSinkConfig = exec.sink.config();
        let table_url = config.table_paths.first().ok_or_else(|| {
            DataFusionError::Internal("a Parquet write has no output location".into())
        })?;
        let store = context
            .runtime_env()
            .object_store(&config.object_store_url)?;
        let attempt = context
            .session_config()
            .get_extension::<TaskAttempt>()
            .map_or(0, |task| task.attempt);
        let options = context
            .session_config()
            .options()
            .extensions
            .get::<QuiverOptions>()
            .cloned()
            .unwrap_or_default();
        let partitioner = HivePartitioner::new(
            &exec.input.schema(),
            &config.table_partition_cols,
            config.keep_partition_by_columns,
        )?;
        let mut parquet_options = exec.sink.parquet_options().clone();
        if !parquet_options.global.skip_arrow_metadata {
            parquet_options.arrow_schema(partitioner.file_schema());
        }
        let properties = ParquetWriterOptions::try_from(&parquet_options)?
            .writer_options()
            .clone();
        let reservation = MemoryConsumer::new(format!("ParquetWriteExec[{partition}]"))
            .register(context.memory_pool());
        Ok(Self {
            store,
            multipart: multipart_store(context, &config.object_store_url)?,
            lease: task_lease(context),
            // The plan's `original_url` does not survive serialization.
            location: table_url.as_str().to_owned(),
            table: table_url.prefix().clone(),
            staging: attempt_staging(table_url.prefix(), &exec.job_id, partition, attempt),
            job_id: exec.job_id.clone(),
            partition,
            attempt,
            uploads: 0,
            extension: config.file_extension.clone(),
            partitioner,
            properties,
            target_file_bytes: options.target_file_bytes.clamp(1, MAX_FILE_BYTES) as usize,
            buffer_bytes: context
                .session_config()
                .options()
                .execution
                .objectstore_writer_buffer_size,
            reservation,
            open: HashMap::new(),
            clock: 0,
            files_per_folder: HashMap::new(),
            written: Vec::new(),
            counts: WriteCounts::new(&exec.metrics, partition),
        })
    }

    async fn run(mut self, mut input: SendableRecordBatchStream) -> Result<RecordBatch> {
        let written = self.write_all(&mut input).await;
        if written.is_err() {
            self.abort_open_files().await;
        }
        written
    }

    /// Writes every input row, then finishes the open files. A failure of the
    /// store names the output location; a failure of the input is the query's.
    async fn write_all(&mut self, input: &mut SendableRecordBatchStream) -> Result<RecordBatch> {
        while let Some(batch) = input.next().await {
            for (folder, rows) in self.partitioner.split(&batch?)? {
                if rows.num_rows() > 0 {
                    let written = self.write(folder, &rows).await;
                    written.map_err(|e| self.store_failure(e))?;
                }
            }
        }
        // One at a time, so that a failure leaves the rest open to abort.
        loop {
            let next = self.open.keys().next().cloned();
            let Some(file) = next.and_then(|folder| self.open.remove(&folder)) else {
                break;
            };
            let finished = self.finish(file).await;
            finished.map_err(|e| self.store_failure(e))?;
        }
        self.reservation.free();
        self.written_files()
    }

    fn store_failure(&self, error: DataFusionError) -> DataFusionError {
        write_failure(&self.location, error)
    }

    /// Aborts the uploads of the files still open, so that a failed task
    /// leaves no incomplete multipart upload behind, where the store keeps
    /// (and bills) the parts until a lifecycle rule removes them.
    async fn abort_open_files(&mut self) {
        abort_uploads(
            self.open.drain().map(|(_, file)| file).collect(),
            &self.location,
        )
        .await;
    }

    async fn write(&mut self, folder: String, rows: &RecordBatch) -> Result<()> {
        self.clock += 1;
        if !self.open.contains_key(&folder) {
            if self.open.len() >= MAX_OPEN_FILES {
                self.close_least_recent().await?;
            }
            let file = self.open_file(&folder)?;
            self.open.insert(folder.clone(), file);
        }
        let Some(file) = self.open.get_mut(&folder) else {
            return Err(DataFusionError::Internal("write file vanished".into()));
        };
        file.last_write = self.clock;
        file.writer.write(rows).await?;
        file.rows += rows.num_rows() as u64;
        let estimate = file.writer.bytes_written() + file.writer.in_progress_size();
        if estimate >= self.target_file_bytes {
            // The writer's estimate of its open row group counts page
            // buffers and dictionaries before compression: on compressible
            // data it is several times what the row group writes. Flushed,
            // the file's size is known; a file still short of the target
            // goes on with a new row group, and each such flush closes in
            // on the target without passing it.
            file.writer.flush().await?;
            let written = file.writer.bytes_written() as f64;
            let full = written >= self.target_file_bytes as f64 * FULL_SHARE;
            if full && let Some(file) = self.open.remove(&folder) {
                self.finish(file).await?;
            }
        }
        self.fit_memory().await
    }

    /// Memory held by the open files: their row groups being encoded, and
    /// each one's upload buffer and parts in flight.
    fn buffered_bytes(&self) -> usize {
        let upload_bytes = self.buffer_bytes * (1 + PARTS_IN_FLIGHT);
        self.open
            .values()
            .map(|file| file.writer.memory_size() + upload_bytes)
            .sum()
    }

    /// Keeps the open files within the memory pool. When they do not fit,
    /// their row groups are flushed early (smaller row groups); if that is
    /// not enough, the least recently written files are finished (more,
    /// smaller files). One open file is always allowed.
    async fn fit_memory(&mut self) -> Result<()> {
        if self.reservation.try_resize(self.buffered_bytes()).is_ok() {
            return Ok(());
        }
        for file in self.open.values_mut() {
            file.writer.flush().await?;
        }
        while self.reservation.try_resize(self.buffered_bytes()).is_err() && self.open.len() > 1 {
            self.close_least_recent().await?;
        }
        self.reservation.resize(self.buffered_bytes());
        Ok(())
    }

    async fn close_least_recent(&mut self) -> Result<()> {
        let oldest = self
            .open
            .iter()
            .min_by_key(|(_, file)| file.last_write)
            .map(|(folder, _)| folder.clone());
        if let Some(file) = oldest.and_then(|folder| self.open.remove(&folder)) {
            self.finish(file).await?;
        }
        Ok(())
    }

    /// Finishes a file and records it, with its size read back, footer included.
    async fn finish(&mut self, file: OpenFile) -> Result<()> {
        file.writer.close().await?;
        let path = staged_path(&self.staging, &file.relative)?;
        let store = Arc::clone(&self.store);
        let bytes = store.head(&path).await?.size;
        self.counts.rows.add(file.rows as usize);
        self.counts.files.add(1);
        self.counts.bytes.add(bytes as usize);
        self.written.push(WrittenFile {
            relative: file.relative,
            rows: file.rows,
            bytes,
        });
        Ok(())
    }

    fn open_file(&mut self, folder: &str) -> Result<OpenFile> {
        let count = self.files_per_folder.entry(folder.to_owned()).or_default();
        let name = file_name(&self.job_id, self.partition, *count, &self.extension);
        *count += 1;
        let relative = if folder.is_empty() {
            name
        } else {
            format!("{folder}/{name}")
        };
        let path = staged_path(&self.staging, &relative)?;
        let sink = self.upload(path);
        let options = ArrowWriterOptions::new().with_properties(self.properties.clone());
        let writer = AsyncArrowWriter::try_new_with_options(
            sink,
            Arc::clone(self.partitioner.file_schema()),
            options,
        )?;
        Ok(OpenFile {
            relative,
            rows: 0,
            last_write: self.clock,
            writer,
        })
    }

    /// The upload of a new file at `path`: recorded where the store can
    /// list nothing of an unfinished upload, buffered otherwise.
    fn upload(&mut self, path: Path) -> FileUpload {
        let Some(multipart) = &self.multipart else {
            let writer = BufWriter::with_capacity(Arc::clone(&self.store), path, self.buffer_bytes)
                .with_max_concurrency(PARTS_IN_FLIGHT);
            return FileUpload::Buffered(writer);
        };
        let record = upload_record(
            &self.table,
            &self.job_id,
            self.partition,
            self.attempt,
            self.uploads,
        );
        self.uploads += 1;
        FileUpload::Recorded(RecordedUpload::new(
            Arc::clone(multipart),
            Arc::clone(&self.store),
            path,
            record,
            self.lease.clone(),
            self.buffer_bytes,
        ))
    }

    fn written_files(&self) -> Result<RecordBatch> {
        let staged: StringArray = self
            .written
            .iter()
            .map(|file| staged_path(&self.staging, &file.relative).map(|p| Some(p.to_string())))
            .collect::<Result<_>>()?;
        let files: StringArray = self
            .written
            .iter()
            .map(|file| Some(file.relative.clone()))
            .collect();
        let rows: UInt64Array = self.written.iter().map(|file| Some(file.rows)).collect();
        let bytes: UInt64Array = self.written.iter().map(|file| Some(file.bytes)).collect();
        Ok(RecordBatch::try_new(
            Arc::clone(&WRITTEN_FILES_SCHEMA),
            vec![
                Arc::new(staged),
                Arc::new(files),
                Arc::new(rows),
                Arc::new(bytes),
            ],
        )?)
    }
}

impl Drop for WriteTask {
    /// A cancelled task drops its write midway; its uploads are aborted in
    /// the background, as dropping cannot wait for the store.
    fn drop(&mut self) {
        if self.open.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let open: Vec<OpenFile> = self.open.drain().map(|(_, file)| file).collect();
        let location = self.location.clone();
        runtime.spawn(async move { abort_uploads(open, &location).await });
    }
}

async fn abort_uploads(files: Vec<OpenFile>, location: &str) {
    for file in files {
        if let Err(e) = file.writer.into_inner().abort().await {
            let error = redacted_error(&e);
            warn!(%location, %error, "cannot abort an upload");
        }
    }
}

/// `input`, failing at the first null in a data column that the table's
/// schema says is `NOT NULL` (declared so: inferred columns are nullable),
/// as DataFusion's own sinks do: a file holding one would
/// make every later read of the table fail. Partition columns hold nulls
/// as Hive's null folder, whatever their field says.
fn without_nulls_in_not_null_columns(
    input: SendableRecordBatchStream,
    config: &FileSinkConfig,
) -> SendableRecordBatchStream {
    let input_schema = input.schema();
    let partition_column = |name: &str| {
        config
            .table_partition_cols
            .iter()
            .any(|(column, _)| column == name)
    };
    let checked: Vec<(usize, String)> = config
        .output_schema()
        .fields()
        .iter()
        .zip(input_schema.fields())
        .enumerate()
        .filter(|(_, (declared, written))| {
            !declared.is_nullable() && written.is_nullable() && !partition_column(declared.name())
        })
        .map(|(index, (declared, _))| (index, declared.name().clone()))
        .collect();
    if checked.is_empty() {
        return input;
    }
    let batches = input.map(move |batch| {
        let batch = batch?;
        let null_in = checked.iter().find(|(index, _)| {
            batch
                .columns()
                .get(*index)
                .and_then(|column| column.logical_nulls())
                .is_some_and(|nulls| nulls.null_count() > 0)
        });
        match null_in {
            Some((_, column)) => Err(DataFusionError::Execution(format!(
                "column '{column}' of the table is NOT NULL, but a row to write holds a \
                 null in it; nothing was written"
            ))),
            None => Ok(batch),
        }
    });
    Box::pin(RecordBatchStreamAdapter::new(input_schema, batches))
}

fn staged_path(staging: &Path, relative: &str) -> Result<Path> {
    join(staging, relative).map_err(|e| DataFusionError::External(Box::new(e)))
}

/// How a failure to write into `location` begins: the store's own error
/// names only a request.
const WRITE_FAILURE: &str = "cannot write to";

/// `error`, met writing into `location`, naming it.
pub fn write_failure(location: &str, error: DataFusionError) -> DataFusionError {
    error.context(format!("{WRITE_FAILURE} '{location}'"))
}

/// Whether `error` is a failure to write ([`write_failure`]), however
/// deep in its chain: what went wrong is the output's, not an input's.
pub fn is_write_failure(error: &DataFusionError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if let Some(DataFusionError::Context(context, _)) = current.downcast_ref()
            && context.starts_with(WRITE_FAILURE)
        {
            return true;
        }
        cause = current.source();
    }
    false
}
