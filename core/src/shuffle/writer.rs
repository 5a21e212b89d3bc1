//! [`ShuffleWriterExec`]: the root of every stage. It runs one partition of its
//! input, splits the rows into output partitions and writes them as one map
//! output: held in memory when it is small, otherwise one data file plus an
//! offset index (see [`super::local`] and [`super::layout`]).
//!
//! Output partitions are buffered in memory under a reservation from the task's
//! memory pool. When the pool says no, the buffers are spilled to per-partition
//! temporary IPC files, which are concatenated into the data file at the end.

use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, AsArray};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::spill_file::{SpillFile, SpillWriter};
use datafusion::execution::{DiskManager, SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::metrics::{
    ExecutionPlanMetricsSet, MetricBuilder, MetricsSet, Time,
};
use datafusion::physical_plan::repartition::BatchPartitioner;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PlanProperties,
};
use futures::StreamExt;
use quiver_proto::PartitionStats;

use super::layout::{CHECKSUM_BLOCK_BYTES, ChecksummingWriter, Index, MapOutputId, encode_index};
use super::local::{LocalOutputs, Refused};
use super::wait_time::time_waits;
use crate::error::Error;
use crate::operators::only_child;

/// Writes the output of one stage partition (one map task) as shuffle data.
#[derive(Debug)]
pub struct ShuffleWriterExec {
    job_id: String,
    stage_id: u32,
    input: Arc<dyn ExecutionPlan>,
    /// How rows are split into output partitions; `None` keeps one output partition.
    partitioning: Option<Partitioning>,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl ShuffleWriterExec {
    pub fn new(
        job_id: impl Into<String>,
        stage_id: u32,
        input: Arc<dyn ExecutionPlan>,
        partitioning: Option<Partitioning>,
    ) -> Self {
        let properties = Arc::new(input.properties().as_ref().clone());
        Self {
            job_id: job_id.into(),
            stage_id,
            input,
            partitioning,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    pub fn stage_id(&self) -> u32 {
        self.stage_id
    }

    pub fn input(&self) -> &Arc<dyn ExecutionPlan> {
        &self.input
    }

    pub fn partitioning(&self) -> Option<&Partitioning> {
        self.partitioning.as_ref()
    }

    /// Number of map tasks: one per partition of the input.
    pub fn map_partition_count(&self) -> usize {
        self.input.output_partitioning().partition_count()
    }

    /// Number of output partitions each map task writes.
    pub fn output_partition_count(&self) -> usize {
        self.partitioning
            .as_ref()
            .map_or(1, Partitioning::partition_count)
    }

    /// Runs map partition `partition` and stores its output in `outputs`.
    /// Returns the row and byte count of each output partition.
    ///
    /// Its `shuffle_write_time` metric is the task's time not spent waiting
    /// for its input: splitting, buffering, spilling and writing the rows.
    pub async fn write(
        &self,
        partition: usize,
        attempt: u32,
        context: Arc<TaskContext>,
        outputs: &Arc<LocalOutputs>,
    ) -> Result<Vec<PartitionStats>> {
        let started = Instant::now();
        let input_wait = Time::new();
        let id = MapOutputId::new(&self.job_id, self.stage_id, partition as u32, attempt)?;
        let input = time_waits(
            self.input.execute(partition, Arc::clone(&context))?,
            input_wait.clone(),
        );
        let written = match &self.partitioning {
            None => write_single_partition(id, input, Arc::clone(outputs)).await,
            Some(partitioning) => {
                self.write_partitioned(id, partitioning, input, context, outputs)
                    .await
            }
        };
        let waited = Duration::from_nanos(input_wait.value() as u64);
        MetricBuilder::new(&self.metrics)
            .subset_time("shuffle_write_time", partition)
            .add_duration(started.elapsed().saturating_sub(waited));
        written
    }

    async fn write_partitioned(
        &self,
        id: MapOutputId,
        partitioning: &Partitioning,
        mut input: SendableRecordBatchStream,
        context: Arc<TaskContext>,
        outputs: &Arc<LocalOutputs>,
    ) -> Result<Vec<PartitionStats>> {
        let partition = id.map_partition as usize;
        let mut partitioner = BatchPartitioner::try_new(
            partitioning.clone(),
            Time::new(),
            partition,
            self.map_partition_count(),
        )?;
        let reservation = MemoryConsumer::new(format!(
            "ShuffleWriter[stage={}, partition={partition}]",
            self.stage_id
        ))
        .with_can_spill(true)
        .register(context.memory_pool());
        let mut buffers = PartitionBuffers::new(
            input.schema(),
            self.output_partition_count(),
            reservation,
            Arc::clone(&context.runtime_env().disk_manager),
        );

        let mut split = Vec::new();
        while let Some(batch) = input.next().await {
            partitioner.partition(batch?, |output, part| {
                split.push((output, part));
                Ok(())
            })?;
            for (output, part) in split.drain(..) {
                buffers.push(output, part).await?;
            }
        }
        let outputs = Arc::clone(outputs);
        tokio::task::spawn_blocking(move || buffers.write_map_output(&id, &outputs))
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?
    }
}

/// Copies the strings of view columns into buffers of their own.
///
/// Parquet strings are read as `Utf8View`; a batch taken from a larger one keeps
/// views into the whole source buffers, which would all be counted against the
/// memory pool and written to the shuffle file for every output partition.
pub fn compact_views(batch: RecordBatch) -> Result<RecordBatch> {
    let has_views = batch
        .schema()
        .fields()
        .iter()
        .any(|f| matches!(f.data_type(), DataType::Utf8View | DataType::BinaryView));
    if !has_views {
        return Ok(batch);
    }
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|column| match column.data_type() {
            DataType::Utf8View => Arc::new(column.as_string_view().gc()) as ArrayRef,
            DataType::BinaryView => Arc::new(column.as_binary_view().gc()) as ArrayRef,
            _ => Arc::clone(column),
        })
        .collect();
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

/// Streams a single output partition straight into the map output: with
/// nothing to group there is nothing to buffer, so no memory is held between
/// batches. Batches are written on a blocking thread, a few behind the input.
async fn write_single_partition(
    id: MapOutputId,
    mut input: SendableRecordBatchStream,
    outputs: Arc<LocalOutputs>,
) -> Result<Vec<PartitionStats>> {
    // `None` marks the end of the input: without it (the input failed or the
    // task was cancelled) the partial output is dropped, never published.
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Option<RecordBatch>>(2);
    let schema = input.schema();
    let writer = tokio::task::spawn_blocking(move || -> Result<Vec<PartitionStats>> {
        let out = ChecksummingWriter::new(OutputSink::new(&id, &outputs), CHECKSUM_BLOCK_BYTES);
        let mut writer = StreamWriter::try_new(out, &schema)?;
        let mut rows = 0u64;
        loop {
            match receiver.blocking_recv() {
                Some(Some(batch)) => {
                    rows += batch.num_rows() as u64;
                    writer.write(&batch)?;
                }
                Some(None) => break,
                None => {
                    drop(writer);
                    let _ = std::fs::remove_file(tmp_data_path(&id, outputs.work_dir()));
                    return Err(DataFusionError::Execution(
                        "the map task stopped before its input ended".into(),
                    ));
                }
            }
        }
        writer.finish()?;
        let mut out = writer.into_inner()?;
        out.end_partition();
        let (mut sink, mut index) = out.finish();
        if rows == 0 {
            // An empty partition is an empty segment, as in the partitioned layout.
            sink.discard();
            sink = OutputSink::new(&id, &outputs);
            index.offsets = vec![0, 0];
            index.checksums = vec![Vec::new()];
        }
        let bytes = index.offsets[1];
        sink.publish(&id, &outputs, index)?;
        Ok(vec![PartitionStats { rows, bytes }])
    });
    let mut complete = true;
    while let Some(batch) = input.next().await {
        let batch = batch?;
        if batch.num_rows() > 0 && sender.send(Some(compact_views(batch)?)).await.is_err() {
            complete = false; // the writer failed; its error is reported below
            break;
        }
    }
    if complete {
        let _ = sender.send(None).await;
    }
    drop(sender);
    writer
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))?
}

/// Where a map output's bytes go as they are written: into memory while they
/// fit in what the executor may still hold, then into a temporary data file.
enum OutputSink {
    Memory {
        buffer: Vec<u8>,
        room: usize,
        tmp: PathBuf,
    },
    File {
        file: BufWriter<File>,
        tmp: PathBuf,
    },
}

impl OutputSink {
    fn new(id: &MapOutputId, outputs: &LocalOutputs) -> Self {
        Self::Memory {
            buffer: Vec::new(),
            room: outputs.room(),
            tmp: tmp_data_path(id, outputs.work_dir()),
        }
    }

    /// The temporary data file, made first if the bytes are still in memory
    /// (what is buffered goes into it).
    fn file(&mut self) -> std::io::Result<&mut BufWriter<File>> {
        if let Self::Memory { buffer, tmp, .. } = self {
            let mut file = BufWriter::with_capacity(1024 * 1024, create_data_file(tmp)?);
            file.write_all(buffer)?;
            *self = Self::File {
                file,
                tmp: std::mem::take(tmp),
            };
        }
        match self {
            Self::File { file, .. } => Ok(file),
            Self::Memory { .. } => unreachable!("replaced by a file above"),
        }
    }

    /// Makes the output visible to readers: held in memory if it may be,
    /// otherwise as files under their final names.
    fn publish(self, id: &MapOutputId, outputs: &LocalOutputs, index: Index) -> Result<()> {
        match self {
            Self::Memory { buffer, tmp, .. } => match outputs.hold(id, buffer, index) {
                Ok(()) => Ok(()),
                Err(Refused { data, index }) => {
                    let mut file = create_data_file(&tmp).map_err(io(&tmp))?;
                    file.write_all(&data).map_err(io(&tmp))?;
                    drop(file);
                    publish_files(id, outputs.work_dir(), &tmp, &index)
                }
            },
            Self::File { mut file, tmp } => {
                file.flush().map_err(io(&tmp))?;
                drop(file);
                publish_files(id, outputs.work_dir(), &tmp, &index)
            }
        }
    }

    /// Drops what was written, deleting the temporary file if there is one.
    fn discard(self) {
        if let Self::File { file, tmp } = self {
            drop(file);
            let _ = std::fs::remove_file(tmp);
        }
    }
}

impl Write for OutputSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if let Self::Memory { buffer, room, .. } = self
            && buffer.len() + bytes.len() <= *room
        {
            buffer.extend_from_slice(bytes);
            return Ok(bytes.len());
        }
        self.file()?.write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::File { file, .. } => file.flush(),
            Self::Memory { .. } => Ok(()),
        }
    }
}

/// Where a map output's data file is written before it is published.
fn tmp_data_path(id: &MapOutputId, work_dir: &Path) -> PathBuf {
    id.data_path(work_dir).with_extension("data.tmp")
}

/// Creates a temporary data file, and the stage folder it goes in.
fn create_data_file(tmp: &Path) -> std::io::Result<File> {
    if let Some(dir) = tmp.parent() {
        std::fs::create_dir_all(dir)?;
    }
    File::create(tmp)
}

/// Turns an I/O error on `path` into a task error that names the path.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataFusionError + use<> {
    let path = path.to_owned();
    move |e| DataFusionError::from(Error::io(&path, e))
}

/// Writes the index of a finished data file and moves both to their final names.
fn publish_files(id: &MapOutputId, work_dir: &Path, tmp_data: &Path, index: &Index) -> Result<()> {
    let data_path = id.data_path(work_dir);
    let index_path = id.index_path(work_dir);
    let tmp_index = index_path.with_extension("index.tmp");
    std::fs::write(&tmp_index, encode_index(index)).map_err(io(&tmp_index))?;
    std::fs::rename(tmp_data, &data_path).map_err(io(&data_path))?;
    std::fs::rename(&tmp_index, &index_path).map_err(io(&index_path))?;
    Ok(())
}

/// In-memory buffers of the output partitions of one map task, with their spills.
struct PartitionBuffers {
    schema: SchemaRef,
    batches: Vec<Vec<RecordBatch>>,
    rows: Vec<u64>,
    spills: Vec<Option<Spill>>,
    reservation: MemoryReservation,
    disk_manager: Arc<DiskManager>,
}

/// Spilled batches of one output partition, as an open IPC stream in a temp file.
struct Spill {
    file: Arc<dyn SpillFile>,
    writer: StreamWriter<BufWriter<Box<dyn SpillWriter>>>,
}

impl PartitionBuffers {
    fn new(
        schema: SchemaRef,
        partitions: usize,
        reservation: MemoryReservation,
        disk_manager: Arc<DiskManager>,
    ) -> Self {
        Self {
            schema,
            batches: vec![Vec::new(); partitions],
            rows: vec![0; partitions],
            spills: (0..partitions).map(|_| None).collect(),
            reservation,
            disk_manager,
        }
    }

    async fn push(&mut self, partition: usize, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let batch = compact_views(batch)?;
        let size = batch.get_array_memory_size();
        if self.reservation.try_grow(size).is_err() {
            self.spill().await?;
            // A single batch larger than the whole pool is still written rather
            // than failing the task: its memory is already allocated.
            self.reservation.grow(size);
        }
        self.rows[partition] += batch.num_rows() as u64;
        self.batches[partition].push(batch);
        Ok(())
    }

    /// Moves every buffered batch to its partition's spill file.
    async fn spill(&mut self) -> Result<()> {
        let batches = std::mem::take(&mut self.batches);
        let mut spills = std::mem::take(&mut self.spills);
        let schema = Arc::clone(&self.schema);
        let disk_manager = Arc::clone(&self.disk_manager);
        let partitions = batches.len();
        let spills = tokio::task::spawn_blocking(move || -> Result<Vec<Option<Spill>>> {
            for (partition, batches) in batches.into_iter().enumerate() {
                if batches.is_empty() {
                    continue;
                }
                let spill = match &mut spills[partition] {
                    Some(spill) => spill,
                    slot => slot.insert(Spill::create(&disk_manager, &schema)?),
                };
                for batch in &batches {
                    spill.writer.write(batch)?;
                }
            }
            Ok(spills)
        })
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))??;
        self.spills = spills;
        self.batches = vec![Vec::new(); partitions];
        self.reservation.free();
        Ok(())
    }

    /// Writes the map output and makes it visible to readers.
    fn write_map_output(
        mut self,
        id: &MapOutputId,
        outputs: &LocalOutputs,
    ) -> Result<Vec<PartitionStats>> {
        let mut out = ChecksummingWriter::new(OutputSink::new(id, outputs), CHECKSUM_BLOCK_BYTES);
        let sink_error = |e: std::io::Error| {
            DataFusionError::from(Error::io(id.data_path(outputs.work_dir()), e))
        };
        for (partition, batches) in self.batches.into_iter().enumerate() {
            if let Some(Spill { file, mut writer }) = self.spills[partition].take() {
                for batch in &batches {
                    writer.write(batch)?;
                }
                writer.finish()?;
                let mut spill_writer = writer
                    .into_inner()?
                    .into_inner()
                    .map_err(|e| DataFusionError::External(Box::new(e.into_error())))?;
                spill_writer.finish()?;
                let path = file.path().ok_or_else(|| {
                    DataFusionError::NotImplemented(
                        "the shuffle writer needs spill files on a local disk".into(),
                    )
                })?;
                let mut spilled = File::open(path).map_err(io(path))?;
                std::io::copy(&mut spilled, &mut out).map_err(sink_error)?;
            } else if !batches.is_empty() {
                let mut writer = StreamWriter::try_new(&mut out, &self.schema)?;
                for batch in &batches {
                    writer.write(batch)?;
                }
                writer.finish()?;
            }
            out.end_partition();
        }
        let (sink, index) = out.finish();
        drop(self.reservation);
        let stats = index
            .offsets
            .windows(2)
            .zip(self.rows)
            .map(|(range, rows)| PartitionStats {
                rows,
                bytes: range[1] - range[0],
            })
            .collect();
        sink.publish(id, outputs, index)?;
        Ok(stats)
    }
}

impl Spill {
    fn create(disk_manager: &Arc<DiskManager>, schema: &SchemaRef) -> Result<Self> {
        let file = disk_manager.create_tmp_file("shuffle writer spill")?;
        let writer = StreamWriter::try_new(BufWriter::new(file.open_writer()?), schema)?;
        Ok(Self { file, writer })
    }
}

impl DisplayAs for ShuffleWriterExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "ShuffleWriterExec: stage={}", self.stage_id)?;
        match &self.partitioning {
            Some(partitioning) => write!(f, ", partitioning={partitioning}"),
            None => write!(f, ", partitioning=None"),
        }
    }
}

impl ExecutionPlan for ShuffleWriterExec {
    fn name(&self) -> &str {
        "ShuffleWriterExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        if let Some(Partitioning::Hash(exprs, _)) = &self.partitioning {
            for expr in exprs {
                if f(expr)? == TreeNodeRecursion::Stop {
                    return Ok(TreeNodeRecursion::Stop);
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::new(
            self.job_id.clone(),
            self.stage_id,
            only_child(children, "ShuffleWriterExec")?,
            self.partitioning.clone(),
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        _partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        Err(DataFusionError::Internal(
            "ShuffleWriterExec is run by the executor's task runner through ShuffleWriterExec::write"
                .into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{Field, Schema};
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::physical_expr::expressions::col;
    use datafusion::physical_plan::common::collect;

    use super::*;
    use crate::shuffle::fetch::segment_stream;

    fn input(rows: i64) -> Arc<dyn ExecutionPlan> {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        let batches: Vec<RecordBatch> = (0..rows)
            .step_by(1000)
            .map(|start| {
                let keys: Vec<i64> = (start..(start + 1000).min(rows)).collect();
                RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(Int64Array::from(keys))])
                    .expect("batch")
            })
            .collect();
        MemorySourceConfig::try_new_exec(&[batches], schema, None).expect("source")
    }

    /// Writes `rows` keys hashed into `partitions` (or kept whole with
    /// `None`), then reads every partition back: the stats and the keys.
    async fn round_trip(
        outputs: &Arc<LocalOutputs>,
        rows: i64,
        partitions: Option<usize>,
    ) -> (Vec<PartitionStats>, Vec<i64>) {
        let source = input(rows);
        let partitioning = partitions.map(|count| {
            Partitioning::Hash(vec![col("k", &source.schema()).expect("column")], count)
        });
        let schema = source.schema();
        let writer = ShuffleWriterExec::new("job", 1, source, partitioning);
        let stats = writer
            .write(0, 0, Arc::new(TaskContext::default()), outputs)
            .await
            .expect("write");
        let id = MapOutputId::new("job", 1, 0, 0).expect("id");
        let mut keys = Vec::new();
        for partition in 0..stats.len() {
            let segment = outputs.open_segment(&id, partition).expect("segment");
            for batch in collect(segment_stream(segment, Arc::clone(&schema)))
                .await
                .expect("read")
            {
                let column = batch
                    .column(0)
                    .as_primitive::<arrow::datatypes::Int64Type>();
                keys.extend(column.values().iter().copied());
            }
        }
        keys.sort_unstable();
        (stats, keys)
    }

    fn files_under(dir: &Path) -> usize {
        walk(dir).len()
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .flat_map(|entry| {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path)
                } else {
                    vec![path]
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn small_outputs_are_held_and_large_ones_go_to_files() {
        let id = MapOutputId::new("job", 1, 0, 0).expect("id");
        for partitions in [Some(3), None] {
            let dir = tempfile::tempdir().expect("dir");
            let roomy = Arc::new(LocalOutputs::new(dir.path().to_owned(), 1 << 20, None));
            let (stats, keys) = round_trip(&roomy, 100, partitions).await;
            assert_eq!(keys, (0..100).collect::<Vec<_>>());
            assert_eq!(stats.iter().map(|s| s.rows).sum::<u64>(), 100);
            assert!(roomy.is_held(&id), "{partitions:?}");
            assert_eq!(files_under(dir.path()), 0, "{partitions:?}");

            // Past the room, the bytes already buffered go to a file too.
            let dir = tempfile::tempdir().expect("dir");
            let tight = Arc::new(LocalOutputs::new(dir.path().to_owned(), 4096, None));
            let (stats, keys) = round_trip(&tight, 20_000, partitions).await;
            assert_eq!(keys, (0..20_000).collect::<Vec<_>>());
            assert_eq!(stats.iter().map(|s| s.rows).sum::<u64>(), 20_000);
            assert!(!tight.is_held(&id));
            assert_eq!(tight.held_bytes(), 0);
            let files = walk(dir.path());
            assert_eq!(files.len(), 2, "a data file and its index: {files:?}");
            let data = std::fs::metadata(id.data_path(dir.path())).expect("data file");
            assert_eq!(data.len(), stats.iter().map(|s| s.bytes).sum::<u64>());
        }
    }

    #[tokio::test]
    async fn empty_outputs_are_held_or_written_empty() {
        for limit in [1 << 20, 0] {
            let dir = tempfile::tempdir().expect("dir");
            let outputs = Arc::new(LocalOutputs::new(dir.path().to_owned(), limit, None));
            let (stats, keys) = round_trip(&outputs, 0, None).await;
            assert!(keys.is_empty());
            assert_eq!(stats, vec![PartitionStats { rows: 0, bytes: 0 }]);
            // Held in memory, or two files (an empty data file and its index).
            let expected_files = if limit == 0 { 2 } else { 0 };
            assert_eq!(files_under(dir.path()), expected_files, "limit {limit}");
        }
    }
}
