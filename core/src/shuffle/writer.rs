//! [`ShuffleWriterExec`]: the root of every stage. It runs one partition of its
//! input, splits the rows into output partitions and writes them into one data
//! file plus an offset index (see [`super::layout`]).
//!
//! Output partitions are buffered in memory under a reservation from the task's
//! memory pool. When the pool says no, the buffers are spilled to per-partition
//! temporary IPC files, which are concatenated into the data file at the end.

use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
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

    /// Runs map partition `partition` and writes its output under `work_dir`.
    /// Returns the row and byte count of each output partition.
    ///
    /// Its `shuffle_write_time` metric is the task's time not spent waiting
    /// for its input: splitting, buffering, spilling and writing the rows.
    pub async fn write(
        &self,
        partition: usize,
        attempt: u32,
        context: Arc<TaskContext>,
        work_dir: &Path,
    ) -> Result<Vec<PartitionStats>> {
        let started = Instant::now();
        let input_wait = Time::new();
        let id = MapOutputId::new(&self.job_id, self.stage_id, partition as u32, attempt)?;
        let input = time_waits(
            self.input.execute(partition, Arc::clone(&context))?,
            input_wait.clone(),
        );
        let written = match &self.partitioning {
            None => write_single_partition(id, input, work_dir.to_owned()).await,
            Some(partitioning) => {
                self.write_partitioned(id, partitioning, input, context, work_dir)
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
        work_dir: &Path,
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
        let work_dir = work_dir.to_owned();
        tokio::task::spawn_blocking(move || buffers.write_map_output(&id, &work_dir))
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

/// Streams a single output partition straight into the data file: with nothing
/// to group there is nothing to buffer, so no memory is held between batches.
/// Batches are written on a blocking thread, a few batches behind the input.
async fn write_single_partition(
    id: MapOutputId,
    mut input: SendableRecordBatchStream,
    work_dir: std::path::PathBuf,
) -> Result<Vec<PartitionStats>> {
    // `None` marks the end of the input: without it (the input failed or the
    // task was cancelled) the partial file is deleted, never published.
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Option<RecordBatch>>(2);
    let schema = input.schema();
    let writer = tokio::task::spawn_blocking(move || -> Result<Vec<PartitionStats>> {
        let data_path = id.data_path(&work_dir);
        let tmp_data = data_path.with_extension("data.tmp");
        if let Some(dir) = data_path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let file = File::create(&tmp_data).map_err(io(&tmp_data))?;
        let out = ChecksummingWriter::new(
            BufWriter::with_capacity(1024 * 1024, file),
            CHECKSUM_BLOCK_BYTES,
        );
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
                    let _ = std::fs::remove_file(&tmp_data);
                    return Err(DataFusionError::Execution(
                        "the map task stopped before its input ended".into(),
                    ));
                }
            }
        }
        writer.finish()?;
        let mut out = writer.into_inner()?;
        out.end_partition();
        let (mut file, mut index) = out.finish();
        file.flush().map_err(io(&tmp_data))?;
        drop(file);
        if rows == 0 {
            // An empty partition is an empty segment, as in the partitioned layout.
            File::create(&tmp_data).map_err(io(&tmp_data))?;
            index.offsets = vec![0, 0];
            index.checksums = vec![Vec::new()];
        }
        publish(&id, &work_dir, &tmp_data, &index)?;
        Ok(vec![PartitionStats {
            rows,
            bytes: index.offsets[1],
        }])
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

/// Turns an I/O error on `path` into a task error that names the path.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataFusionError + use<> {
    let path = path.to_owned();
    move |e| DataFusionError::from(Error::io(&path, e))
}

/// Writes the index of a finished data file and moves both to their final names.
fn publish(id: &MapOutputId, work_dir: &Path, tmp_data: &Path, index: &Index) -> Result<()> {
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

    /// Writes the data file and its index under their final names.
    fn write_map_output(
        mut self,
        id: &MapOutputId,
        work_dir: &Path,
    ) -> Result<Vec<PartitionStats>> {
        let data_path = id.data_path(work_dir);
        if let Some(dir) = data_path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let tmp_data = data_path.with_extension("data.tmp");
        let mut out = ChecksummingWriter::new(
            BufWriter::with_capacity(1024 * 1024, File::create(&tmp_data).map_err(io(&tmp_data))?),
            CHECKSUM_BLOCK_BYTES,
        );
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
                std::io::copy(&mut spilled, &mut out).map_err(io(&tmp_data))?;
            } else if !batches.is_empty() {
                let mut writer = StreamWriter::try_new(&mut out, &self.schema)?;
                for batch in &batches {
                    writer.write(batch)?;
                }
                writer.finish()?;
            }
            out.end_partition();
        }
        let (mut file, index) = out.finish();
        file.flush().map_err(io(&tmp_data))?;
        drop(file);
        drop(self.reservation);
        publish(id, work_dir, &tmp_data, &index)?;

        Ok(index
            .offsets
            .windows(2)
            .zip(self.rows)
            .map(|(range, rows)| PartitionStats {
                rows,
                bytes: range[1] - range[0],
            })
            .collect())
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
