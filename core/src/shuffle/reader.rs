//! [`ShuffleReaderExec`]: the leaf of a stage that stands for one of its input
//! stages. The scheduler plans it unbound; the executor binds it to the map
//! outputs of the finished input stage before running the task.

use std::fmt;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use futures::{StreamExt, TryStreamExt};
use quiver_proto::MapOutput;

use super::fetch::{PartitionRef, ShuffleEnv, Source, fetch_partition};
use super::wait_time::time_waits;

/// Map outputs read at once by one reader partition. All of them are read
/// as their batches arrive: a stream opened ahead and left unread holds its
/// share of the HTTP/2 connection it shares with the others, and enough of
/// them would stall the stream being read for good.
const FETCH_CONCURRENCY: usize = 4;

/// Which map outputs a reader partition reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// Partition `p` reads output partition `p` of every map task (a hash exchange).
    Hash,
    /// Partition `p` reads the single output of map task `p`, keeping the input
    /// stage's partitioning and ordering (below a merge or a coalesce).
    PerMap,
}

/// Streams the shuffle output of an input stage.
#[derive(Debug, Clone)]
pub struct ShuffleReaderExec {
    job_id: String,
    stage_id: u32,
    mode: ReadMode,
    partition_count: usize,
    schema: SchemaRef,
    /// The input stage's map outputs, in map partition order; `None` until bound.
    outputs: Option<Arc<[MapOutput]>>,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl ShuffleReaderExec {
    /// An unbound reader. `eq_properties` carries the replaced plan's ordering and
    /// equivalences, so that the planner's view of the stage stays accurate.
    pub fn new(
        job_id: impl Into<String>,
        stage_id: u32,
        mode: ReadMode,
        partition_count: usize,
        eq_properties: EquivalenceProperties,
    ) -> Self {
        let schema = Arc::clone(eq_properties.schema());
        let properties = Arc::new(PlanProperties::new(
            eq_properties,
            Partitioning::UnknownPartitioning(partition_count),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Self {
            job_id: job_id.into(),
            stage_id,
            mode,
            partition_count,
            schema,
            outputs: None,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The reader of a hash exchange on `exprs` (over this reader's schema):
    /// its partition `p` holds exactly the rows that hash to `p`, as the
    /// exchange's would, since the writer hashes with DataFusion's
    /// partitioner. Operators that need that distribution keep accepting
    /// the reader in place of the exchange: an `InterleaveExec` (a `UNION`
    /// of inputs partitioned alike) refuses children that do not report it.
    pub fn with_hash_partitioning(mut self, exprs: Vec<Arc<dyn PhysicalExpr>>) -> Result<Self> {
        if self.mode != ReadMode::Hash {
            return Err(DataFusionError::Internal(format!(
                "shuffle reader of stage {} reads map outputs whole; it has no hash partitioning",
                self.stage_id
            )));
        }
        self.properties = Arc::new(
            self.properties
                .as_ref()
                .clone()
                .with_partitioning(Partitioning::Hash(exprs, self.partition_count)),
        );
        Ok(self)
    }

    /// The hash expressions of a reader of a hash exchange, if it was given them.
    pub fn hash_exprs(&self) -> Option<&[Arc<dyn PhysicalExpr>]> {
        match &self.properties.partitioning {
            Partitioning::Hash(exprs, _) => Some(exprs),
            _ => None,
        }
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    pub fn stage_id(&self) -> u32 {
        self.stage_id
    }

    pub fn mode(&self) -> ReadMode {
        self.mode
    }

    pub fn partition_count(&self) -> usize {
        self.partition_count
    }

    pub fn outputs(&self) -> Option<&[MapOutput]> {
        self.outputs.as_deref()
    }

    /// Binds the reader to the map outputs of its input stage.
    pub fn bind(&self, outputs: Vec<MapOutput>) -> Result<Self> {
        if self.mode == ReadMode::PerMap && outputs.len() != self.partition_count {
            return Err(DataFusionError::Plan(format!(
                "shuffle reader of stage {} expects {} map outputs, got {}",
                self.stage_id,
                self.partition_count,
                outputs.len()
            )));
        }
        let mut bound = self.clone();
        bound.outputs = Some(outputs.into());
        bound.metrics = ExecutionPlanMetricsSet::new();
        Ok(bound)
    }

    /// The (map output, output partition) pairs that reader partition `partition` reads.
    fn sources(&self, outputs: &[MapOutput], partition: usize) -> Vec<(MapOutput, usize)> {
        match self.mode {
            ReadMode::Hash => outputs
                .iter()
                .filter(|output| {
                    output
                        .partitions
                        .get(partition)
                        .is_none_or(|stats| stats.bytes > 0)
                })
                .map(|output| (output.clone(), partition))
                .collect(),
            ReadMode::PerMap => outputs
                .get(partition)
                .filter(|output| {
                    output
                        .partitions
                        .first()
                        .is_none_or(|stats| stats.bytes > 0)
                })
                .map(|output| vec![(output.clone(), 0)])
                .unwrap_or_default(),
        }
    }
}

impl DisplayAs for ShuffleReaderExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let mode = match self.mode {
            ReadMode::Hash => "hash",
            ReadMode::PerMap => "per-map",
        };
        write!(
            f,
            "ShuffleReaderExec: stage={}, mode={mode}, partitions={}",
            self.stage_id, self.partition_count
        )
    }
}

impl ExecutionPlan for ShuffleReaderExec {
    fn name(&self) -> &str {
        "ShuffleReaderExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
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
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "ShuffleReaderExec takes no children".into(),
            ))
        }
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let outputs = self.outputs.as_ref().ok_or_else(|| {
            DataFusionError::Internal(format!(
                "shuffle reader of stage {} was not bound to map outputs",
                self.stage_id
            ))
        })?;
        if partition >= self.partition_count {
            return Err(DataFusionError::Internal(format!(
                "shuffle reader of stage {} has {} partitions, asked for {partition}",
                self.stage_id, self.partition_count
            )));
        }
        let env = context.session_config().get_extension::<ShuffleEnv>();
        let pool = env
            .as_ref()
            .map(|env| env.clients.clone())
            .unwrap_or_default();
        let job_id = self.job_id.clone();
        let stage_id = self.stage_id;
        let schema = Arc::clone(&self.schema);
        let sources = self.sources(outputs, partition);
        let output_rows = MetricBuilder::new(&self.metrics).output_rows(partition);
        MetricBuilder::new(&self.metrics)
            .counter("shuffle_bytes_read", partition)
            .add(
                sources
                    .iter()
                    .filter_map(|(output, part)| output.partitions.get(*part))
                    .map(|stats| stats.bytes as usize)
                    .sum(),
            );
        // Wait times: of the whole read, and of the part read over Flight or
        // from object storage (opening the streams is in the first only).
        let read_time =
            MetricBuilder::new(&self.metrics).subset_time("shuffle_read_time", partition);
        let flight_time =
            MetricBuilder::new(&self.metrics).subset_time("flight_read_time", partition);
        let durable_time =
            MetricBuilder::new(&self.metrics).subset_time("durable_read_time", partition);
        let flight_bytes =
            MetricBuilder::new(&self.metrics).counter("flight_bytes_read", partition);
        let batches = futures::stream::iter(sources)
            .map(move |(output, output_partition)| {
                let (job_id, env, pool, schema) = (
                    job_id.clone(),
                    env.clone(),
                    pool.clone(),
                    Arc::clone(&schema),
                );
                let (flight_time, durable_time, flight_bytes) = (
                    flight_time.clone(),
                    durable_time.clone(),
                    flight_bytes.clone(),
                );
                let opened = async move {
                    let location = PartitionRef {
                        job_id: &job_id,
                        stage_id,
                        output: &output,
                        partition: output_partition,
                    };
                    let (stream, source) = fetch_partition(location, env.as_deref(), &pool, schema)
                        .await
                        .map_err(DataFusionError::from)?;
                    Ok::<_, DataFusionError>(match source {
                        Source::Local | Source::Inline => stream,
                        Source::Durable => time_waits(stream, durable_time),
                        Source::Flight => {
                            let bytes = output.partitions.get(output_partition);
                            flight_bytes.add(bytes.map_or(0, |stats| stats.bytes as usize));
                            time_waits(stream, flight_time)
                        }
                    })
                };
                // Opened only when it is read, so that no stream waits unread.
                Ok::<_, DataFusionError>(Box::pin(futures::stream::once(opened).try_flatten()))
            })
            .try_flatten_unordered(FETCH_CONCURRENCY)
            .inspect_ok(move |batch| output_rows.add(batch.num_rows()));
        Ok(time_waits(
            Box::pin(RecordBatchStreamAdapter::new(
                Arc::clone(&self.schema),
                batches,
            )),
            read_time,
        ))
    }
}
