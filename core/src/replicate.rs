//! [`ReplicateExec`]: one input partition, streamed whole by each of `n`
//! output partitions.
//!
//! A null-aware anti join (`x NOT IN (subquery)`) decides each outer row from
//! the row itself and from the *whole* subquery: any null in it, or none of
//! it at all, changes every row's answer. Its outer rows can be split across
//! tasks as long as each task sees all of the subquery, which this operator
//! gives every partition of the join (each task of its stage reads the
//! subquery's stage in full, as a broadcast join's task reads its build side).

use std::fmt;
use std::sync::Arc;

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, ExecutionPlanProperties,
    Partitioning, PlanProperties,
};

use crate::operators::only_child;

/// Streams its single-partition input whole in each of its partitions.
#[derive(Debug)]
pub struct ReplicateExec {
    input: Arc<dyn ExecutionPlan>,
    partitions: usize,
    properties: Arc<PlanProperties>,
}

impl ReplicateExec {
    /// `input` copied into `partitions` partitions. `input` must have one
    /// partition (coalesce it first).
    pub fn try_new(input: Arc<dyn ExecutionPlan>, partitions: usize) -> Result<Self> {
        let input_partitions = input.output_partitioning().partition_count();
        if input_partitions != 1 {
            return Err(DataFusionError::Internal(format!(
                "ReplicateExec takes an input of one partition, not {input_partitions}"
            )));
        }
        // Each partition is the input's one stream, in its order.
        let properties = Arc::new(PlanProperties::new(
            input.equivalence_properties().clone(),
            Partitioning::UnknownPartitioning(partitions),
            input.pipeline_behavior(),
            input.boundedness(),
        ));
        Ok(Self {
            input,
            partitions,
            properties,
        })
    }

    pub fn partitions(&self) -> usize {
        self.partitions
    }
}

impl DisplayAs for ReplicateExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "ReplicateExec: partitions={}", self.partitions)
    }
}

impl ExecutionPlan for ReplicateExec {
    fn name(&self) -> &str {
        "ReplicateExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
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
        let input = only_child(children, "ReplicateExec")?;
        Ok(Arc::new(Self::try_new(input, self.partitions)?))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition >= self.partitions {
            return Err(DataFusionError::Internal(format!(
                "ReplicateExec has {} partitions, asked for {partition}",
                self.partitions
            )));
        }
        self.input.execute(0, context)
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, RecordBatch};
    use datafusion::physical_plan::collect_partitioned;
    use datafusion::physical_plan::repartition::RepartitionExec;
    use datafusion::prelude::SessionContext;

    use super::*;

    /// A plan of one partition holding the rows 1, 2 and 3.
    async fn three_rows(context: &SessionContext) -> Arc<dyn ExecutionPlan> {
        let batch =
            RecordBatch::try_from_iter([("x", Arc::new(Int64Array::from(vec![1, 2, 3])) as _)])
                .expect("batch");
        context.register_batch("t", batch).expect("register");
        context
            .sql("SELECT x FROM t")
            .await
            .expect("plans")
            .create_physical_plan()
            .await
            .expect("physical plan")
    }

    #[tokio::test]
    async fn every_partition_streams_the_whole_input() {
        let context = SessionContext::new();
        let input = three_rows(&context).await;
        let replicated: Arc<dyn ExecutionPlan> =
            Arc::new(ReplicateExec::try_new(input, 3).expect("one input partition"));
        let partitions = collect_partitioned(replicated, context.task_ctx())
            .await
            .expect("runs");
        assert_eq!(partitions.len(), 3);
        for batches in partitions {
            let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
            assert_eq!(rows, 3);
        }
    }

    #[tokio::test]
    async fn an_input_of_several_partitions_is_refused() {
        let context = SessionContext::new();
        let input = three_rows(&context).await;
        let split = Arc::new(
            RepartitionExec::try_new(input, Partitioning::RoundRobinBatch(2)).expect("split"),
        );
        let error = ReplicateExec::try_new(split, 2).expect_err("refused");
        assert!(
            error.to_string().contains("one partition, not 2"),
            "{error}"
        );
    }
}
