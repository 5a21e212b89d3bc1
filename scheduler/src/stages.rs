//! Cuts a DataFusion physical plan into a DAG of stages at its exchanges.
//!
//! - A hash (or round-robin) `RepartitionExec` becomes a shuffle: the input is a
//!   stage whose writer partitions its rows, and a [`ShuffleReaderExec`] in hash
//!   mode takes the repartition's place.
//! - Below a `CoalescePartitionsExec` or a `SortPreservingMergeExec` (this covers
//!   the build side of `CollectLeft` joins, which DataFusion coalesces) the
//!   input becomes a stage whose map outputs are read one per reader partition,
//!   so the merge or coalesce runs in the next stage over all of them.
//! - What remains above the last cut is the final stage; its map outputs are the
//!   job's result.
//! - An uncorrelated scalar subquery (DataFusion's `ScalarSubqueryExec`, which
//!   runs its subqueries before its input and hands their values to the
//!   input's expressions) is cut apart: each subquery becomes a stage of its
//!   own, and every stage cut from the input that reads one of their values
//!   runs under a `ScalarSubqueryExec` that reads them from those stages. A
//!   task so knows the values before it scans, and a scan filtered by one
//!   prunes files and row groups by it, as in one process.
//!
//! Every stage plan has a [`ShuffleWriterExec`] at its root. Stage ids start at 1
//! and inputs always have smaller ids than the stages that read them.

use std::fmt::Write;
use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::physical_planning_context::ScalarSubqueryResults;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::scalar_subquery::ScalarSubqueryExpr;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::scalar_subquery::{ScalarSubqueryExec, ScalarSubqueryLink};
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::{
    ExecutionPlan, ExecutionPlanProperties, Partitioning, displayable,
    replace_children_if_necessary,
};
use datafusion_proto::bytes::physical_plan_to_bytes_with_proto_converter;
use prost::bytes::Bytes;
use quiver_core::codec::QuiverPhysicalCodec;
use quiver_core::decode_repairs::StagePlanConverter;
use quiver_core::recursive::RecursiveQueryExec;
use quiver_core::shuffle::{ReadMode, ShuffleReaderExec, ShuffleWriterExec};

use crate::joins::make_joins_distributable;

/// One stage of a job.
#[derive(Debug, Clone)]
pub struct StagePlan {
    pub stage_id: u32,
    /// The stage's plan, with a [`ShuffleWriterExec`] at its root.
    pub plan: Arc<ShuffleWriterExec>,
    /// Ids of the stages this one reads.
    pub inputs: Vec<u32>,
}

impl StagePlan {
    /// Number of tasks: one per partition of the writer's input.
    pub fn partitions(&self) -> usize {
        self.plan.map_partition_count()
    }

    /// This stage running `input` under its writer: a plan that the scheduler
    /// rewrote once a stage it waited for had run.
    pub fn with_input(&self, input: Arc<dyn ExecutionPlan>) -> StagePlan {
        let writer = &self.plan;
        let plan = Arc::new(ShuffleWriterExec::new(
            writer.job_id(),
            writer.stage_id(),
            input,
            writer.partitioning().cloned(),
        ));
        let mut inputs = Vec::new();
        collect_reader_stages(plan.input(), &mut inputs);
        StagePlan {
            stage_id: self.stage_id,
            plan,
            inputs,
        }
    }

    /// The plan as executors receive it: datafusion-proto bytes.
    pub fn encode(&self) -> crate::Result<Bytes> {
        let plan: Arc<dyn ExecutionPlan> = Arc::clone(&self.plan) as _;
        physical_plan_to_bytes_with_proto_converter(plan, &QuiverPhysicalCodec, &StagePlanConverter)
            .map_err(|source| crate::Error::EncodePlan {
                stage: self.stage_id,
                source,
            })
    }
}

/// Splits `plan` into stages; the last one is the final stage. `partitions` is
/// the shuffle width used where a join must be repartitioned.
pub fn split_into_stages(
    job_id: &str,
    plan: Arc<dyn ExecutionPlan>,
    partitions: usize,
) -> Result<Vec<StagePlan>> {
    let plan = crate::reversed_windows::unreverse_window_functions(plan)?;
    let plan = make_joins_distributable(plan, partitions)?;
    let mut splitter = StageSplitter {
        job_id,
        stages: Vec::new(),
        subqueries: None,
    };
    let root = splitter.cut(plan)?;
    splitter.add_stage(root, None)?;
    Ok(splitter.stages)
}

/// Renders the stages one after the other, for EXPLAIN and plan snapshots.
pub fn display_stages(stages: &[StagePlan]) -> String {
    let mut out = String::new();
    for stage in stages {
        let inputs: Vec<String> = stage.inputs.iter().map(u32::to_string).collect();
        let _ = writeln!(
            out,
            "Stage {} (tasks={}, inputs=[{}])",
            stage.stage_id,
            stage.partitions(),
            inputs.join(", ")
        );
        let plan = displayable(stage.plan.as_ref()).indent(false).to_string();
        for line in plan.lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

struct StageSplitter<'a> {
    job_id: &'a str,
    stages: Vec<StagePlan>,
    /// The scalar subqueries of the plan being cut, read from their stages,
    /// and the container of their values; see [`Self::cut_scalar_subqueries`].
    subqueries: Option<ScalarSubqueries>,
}

/// A `ScalarSubqueryExec`'s subqueries, each read from the stage that runs
/// it, and the container that the expressions reading them share.
#[derive(Clone)]
struct ScalarSubqueries {
    links: Vec<ScalarSubqueryLink>,
    results: ScalarSubqueryResults,
}

impl ScalarSubqueries {
    /// `plan` running these subqueries first, if any of its expressions
    /// reads one of their values.
    fn over(&self, plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
        if !reads_values_of(&plan, &self.results)? {
            return Ok(plan);
        }
        Ok(Arc::new(ScalarSubqueryExec::new(
            plan,
            self.links.clone(),
            self.results.clone(),
        )))
    }
}

/// Whether `expr` reads the value of any scalar subquery.
fn reads_a_subquery_value(expr: &Arc<dyn PhysicalExpr>) -> bool {
    expr.exists(|expr| Ok(expr.downcast_ref::<ScalarSubqueryExpr>().is_some()))
        .unwrap_or(true)
}

/// Whether an expression of `plan` reads a value from `results`.
fn reads_values_of(plan: &Arc<dyn ExecutionPlan>, results: &ScalarSubqueryResults) -> Result<bool> {
    let mut reads = false;
    plan.apply(|node| {
        node.apply_expressions(&mut |expr| {
            expr.apply(|expr| {
                let read = expr.downcast_ref::<ScalarSubqueryExpr>();
                if read.is_some_and(|read| ScalarSubqueryResults::ptr_eq(read.results(), results)) {
                    reads = true;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    })?;
    Ok(reads)
}

impl StageSplitter<'_> {
    fn cut(&mut self, plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
        if let Some(subqueries) = plan.downcast_ref::<ScalarSubqueryExec>() {
            return self.cut_scalar_subqueries(subqueries);
        }
        if plan.is::<RecursiveQueryExec>() {
            // Its recursive term reads the previous iteration's rows from a
            // work table in the memory of the task that runs it: it stays
            // whole, one task with its exchanges in process.
            return Ok(plan);
        }
        let children = plan
            .children()
            .into_iter()
            .map(|child| self.cut(Arc::clone(child)))
            .collect::<Result<Vec<_>>>()?;
        let plan = if children.is_empty() {
            plan
        } else {
            replace_children_if_necessary(plan, children)?
        };

        if let Some(repartition) = plan.downcast_ref::<RepartitionExec>() {
            let partitioning = repartition.partitioning().clone();
            if let Partitioning::Hash(_, count) | Partitioning::RoundRobinBatch(count) =
                partitioning
            {
                let hashed_on = match &partitioning {
                    Partitioning::Hash(exprs, _) => Some(exprs.clone()),
                    _ => None,
                };
                if hashed_on.iter().flatten().any(reads_a_subquery_value) {
                    // Executors decode a shuffle's partitioning where no
                    // subquery's value is at hand.
                    return Err(DataFusionError::NotImplemented(
                        "rows shuffled on an expression of a scalar subquery's value; compute \
                         the expression in a subquery of its own first"
                            .to_owned(),
                    ));
                }
                let stage_id =
                    self.add_stage(Arc::clone(repartition.input()), Some(partitioning))?;
                let reader = ShuffleReaderExec::new(
                    self.job_id,
                    stage_id,
                    ReadMode::Hash,
                    count,
                    plan.equivalence_properties().clone(),
                );
                let reader = match hashed_on {
                    Some(exprs) => reader.with_hash_partitioning(exprs)?,
                    None => reader,
                };
                return Ok(Arc::new(reader));
            }
        }

        let merges_partitions =
            plan.is::<CoalescePartitionsExec>() || plan.is::<SortPreservingMergeExec>();
        if merges_partitions {
            let child = Arc::clone(plan.children()[0]);
            let count = child.output_partitioning().partition_count();
            if count > 1 {
                let eq_properties = child.equivalence_properties().clone();
                let stage_id = self.add_stage(child, None)?;
                let reader: Arc<dyn ExecutionPlan> = Arc::new(ShuffleReaderExec::new(
                    self.job_id,
                    stage_id,
                    ReadMode::PerMap,
                    count,
                    eq_properties,
                ));
                return replace_children_if_necessary(plan, vec![reader]);
            }
        }
        Ok(plan)
    }

    /// Cuts each subquery of `plan` into stages of its own, then `plan`'s
    /// input, whose stages that read a subquery's value run the subqueries
    /// (read from their stages) first. DataFusion plans one such node, at the
    /// root, for a query's own subqueries; a subquery's own subqueries are in
    /// its plan.
    fn cut_scalar_subqueries(
        &mut self,
        plan: &ScalarSubqueryExec,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let links = plan
            .subqueries()
            .iter()
            .map(|subquery| {
                let root = self.cut(Arc::clone(&subquery.plan))?;
                let count = root.output_partitioning().partition_count();
                let eq_properties = root.equivalence_properties().clone();
                let stage_id = self.add_stage(root, None)?;
                let reader = ShuffleReaderExec::new(
                    self.job_id,
                    stage_id,
                    ReadMode::PerMap,
                    count,
                    eq_properties,
                );
                Ok(ScalarSubqueryLink {
                    plan: Arc::new(reader),
                    index: subquery.index,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let subqueries = ScalarSubqueries {
            links,
            results: plan.results().clone(),
        };
        if self.subqueries.replace(subqueries.clone()).is_some() {
            return Err(DataFusionError::NotImplemented(
                "a plan whose scalar subqueries are run in two places of its input, one \
                 below the other"
                    .to_owned(),
            ));
        }
        let input = self.cut(Arc::clone(plan.input()));
        self.subqueries = None;
        subqueries.over(input?)
    }

    fn add_stage(
        &mut self,
        input: Arc<dyn ExecutionPlan>,
        partitioning: Option<Partitioning>,
    ) -> Result<u32> {
        let input = match &self.subqueries {
            Some(subqueries) => subqueries.over(input)?,
            None => input,
        };
        let stage_id = self.stages.len() as u32 + 1;
        let mut inputs = Vec::new();
        collect_reader_stages(&input, &mut inputs);
        self.stages.push(StagePlan {
            stage_id,
            plan: Arc::new(ShuffleWriterExec::new(
                self.job_id,
                stage_id,
                input,
                partitioning,
            )),
            inputs,
        });
        Ok(stage_id)
    }
}

pub(crate) fn collect_reader_stages(plan: &Arc<dyn ExecutionPlan>, out: &mut Vec<u32>) {
    if let Some(reader) = plan.downcast_ref::<ShuffleReaderExec>() {
        if !out.contains(&reader.stage_id()) {
            out.push(reader.stage_id());
        }
        return;
    }
    for child in plan.children() {
        collect_reader_stages(child, out);
    }
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::{ParquetReadOptions, SessionContext};
    use quiver_core::config::default_session_config;

    use super::*;

    /// The stages of `sql` over `t(k)`, keys 0 to 99 in two Parquet files.
    async fn stages_of(sql: &str) -> Result<Vec<StagePlan>> {
        let folder = tempfile::tempdir().expect("temporary folder");
        let context = SessionContext::new_with_config(default_session_config());
        for (file, first) in [("a.parquet", 0), ("b.parquet", 50)] {
            let path = folder.path().join(file);
            let copy = format!(
                "COPY (SELECT value AS k FROM range({first}, {})) TO '{}' STORED AS PARQUET",
                first + 50,
                path.display()
            );
            context.sql(&copy).await?.collect().await?;
        }
        let folder_url = folder.path().to_str().expect("a path");
        context
            .register_parquet("t", folder_url, ParquetReadOptions::default())
            .await?;
        let plan = context.sql(sql).await?.create_physical_plan().await?;
        split_into_stages("job", plan, 2)
    }

    /// The stages that run scalar subqueries before their own plan, and the
    /// stages they read the values from.
    fn readers_of_values(stages: &[StagePlan]) -> Vec<(u32, Vec<u32>)> {
        stages
            .iter()
            .filter_map(|stage| {
                let subqueries = stage.plan.input().downcast_ref::<ScalarSubqueryExec>()?;
                let mut read = Vec::new();
                for link in subqueries.subqueries() {
                    collect_reader_stages(&link.plan, &mut read);
                }
                Some((stage.stage_id, read))
            })
            .collect()
    }

    #[tokio::test]
    async fn a_scalar_subquery_runs_in_stages_that_its_readers_wait_for() -> Result<()> {
        let stages =
            stages_of("SELECT count(*) FROM t WHERE k > (SELECT max(k) - 10 FROM t)").await?;
        let shown = display_stages(&stages);
        // The scan stage filters by the value; the final count reads none.
        let readers = readers_of_values(&stages);
        assert_eq!(readers.len(), 1, "{shown}");
        let (scan_stage, subquery_stages) = &readers[0];
        assert_eq!(subquery_stages.len(), 1, "{shown}");
        let scan = stages.iter().find(|stage| stage.stage_id == *scan_stage);
        let scan = scan.expect("the scan stage");
        assert!(scan.inputs.contains(&subquery_stages[0]), "{shown}");
        assert!(subquery_stages[0] < *scan_stage, "{shown}");
        assert!(shown.contains("DataSourceExec"), "{shown}");
        Ok(())
    }

    #[tokio::test]
    async fn a_query_without_scalar_subqueries_keeps_its_stages() -> Result<()> {
        let stages = stages_of("SELECT count(*) FROM t WHERE k > 10").await?;
        assert!(readers_of_values(&stages).is_empty());
        Ok(())
    }
}
