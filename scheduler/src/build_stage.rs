//! Gives the filtered build side of a partitioned join a stage of its own.
//!
//! DataFusion cannot estimate how many groups a `HAVING`-style filter over an
//! aggregate keeps. In TPC-H Q18 at SF10 the subquery `GROUP BY l_orderkey
//! HAVING sum(l_quantity) > 300` is estimated at millions of rows and keeps
//! 624, so the semi join on it is planned as a partitioned join, and the
//! final aggregate and its filter run inside the join's stage. The scheduler
//! then learns the build side's size only once the join runs, after both
//! 60 M `lineitem` rows and 15 M orders have been shuffled to it.
//!
//! This rule cuts such a build side at the join: it hash-partitions it on the
//! join keys, exactly as it is already partitioned, so it becomes a stage of
//! its own with the same rows in the same partitions. Once that stage has run,
//! its size is known: a semi-join reduction (`crate::reduction`) can filter
//! the probe side's scans by its keys, and an adaptive join
//! (`crate::adaptive`) can broadcast it. The cost is one more stage boundary
//! for rows that a filter has already thinned.

use std::sync::Arc;

use datafusion::common::NullEquality;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result;
use datafusion::logical_expr::JoinType;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{
    ExecutionPlan, ExecutionPlanProperties, Partitioning, PhysicalExpr,
};
use quiver_core::config::quiver_options;

/// The rule's name, as `EXPLAIN VERBOSE` shows it.
pub const STAGED_BUILD_SIDES: &str = "quiver_staged_build_sides";

/// Plans the filtered build side of a partitioned hash join as its own
/// stage, where a semi-join reduction or an adaptive join can use its size.
#[derive(Debug, Default)]
pub struct StagedBuildSides;

impl PhysicalOptimizerRule for StagedBuildSides {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let options = quiver_options(config);
        if !options.semi_join_reduction && !options.adaptive_joins {
            return Ok(plan);
        }
        plan.transform_up(|node| {
            let Some(join) = node.downcast_ref::<HashJoinExec>() else {
                return Ok(Transformed::no(node));
            };
            let Some(partitioning) = build_side_to_stage(join) else {
                return Ok(Transformed::no(node));
            };
            let build = Arc::new(RepartitionExec::try_new(
                Arc::clone(join.left()),
                partitioning,
            )?);
            let staged = join
                .builder()
                .with_new_children(vec![build, Arc::clone(join.right())])?
                .build_exec()?;
            Ok(Transformed::yes(staged))
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        STAGED_BUILD_SIDES
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// The partitioning that makes `join`'s build side a stage, if it should be
/// one: a partitioned join that drops unmatched probe rows, whose build side
/// ends in a filter over an aggregate and is hash-partitioned on the join
/// keys, as its probe side is. Re-hashing on those keys then leaves every row
/// in the partition it was in.
fn build_side_to_stage(join: &HashJoinExec) -> Option<Partitioning> {
    let reducible = matches!(
        join.join_type(),
        JoinType::Inner | JoinType::LeftSemi | JoinType::RightSemi
    );
    if *join.partition_mode() != PartitionMode::Partitioned
        || !reducible
        || join.null_aware
        || join.null_equality() != NullEquality::NullEqualsNothing
        || !filters_an_aggregate(join.left())
    {
        return None;
    }
    let (left_keys, right_keys): (Vec<_>, Vec<_>) = join
        .on()
        .iter()
        .map(|(left, right)| (Arc::clone(left), Arc::clone(right)))
        .unzip();
    let count = join.left().output_partitioning().partition_count();
    let hashed_on = |plan: &Arc<dyn ExecutionPlan>, keys: &[Arc<dyn PhysicalExpr>]| {
        matches!(
            plan.output_partitioning(),
            Partitioning::Hash(exprs, n) if *n == count && same_exprs(exprs, keys)
        )
    };
    (hashed_on(join.left(), &left_keys) && hashed_on(join.right(), &right_keys))
        .then(|| Partitioning::Hash(left_keys, count))
}

fn same_exprs(a: &[Arc<dyn PhysicalExpr>], b: &[Arc<dyn PhysicalExpr>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.eq(b))
}

/// Whether `plan`, past projections, is a filter whose input, past
/// projections, is an aggregate: a `HAVING` clause, whose output
/// size no estimate knows.
fn filters_an_aggregate(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let below_reshaping = |plan: &Arc<dyn ExecutionPlan>| {
        let mut plan = Arc::clone(plan);
        while plan.is::<ProjectionExec>() {
            plan = Arc::clone(plan.children()[0]);
        }
        plan
    };
    let top = below_reshaping(plan);
    top.downcast_ref::<FilterExec>()
        .is_some_and(|filter| below_reshaping(filter.input()).is::<AggregateExec>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adaptive::tests::stages_planned;
    use crate::stages::{StagePlan, display_stages};

    async fn stages_of_tables(sql: &str, facts_copies: usize) -> Vec<StagePlan> {
        stages_planned(sql, facts_copies, 0, vec![Arc::new(StagedBuildSides)]).await
    }

    fn rendered(stage: &StagePlan) -> String {
        datafusion::physical_plan::displayable(stage.plan.as_ref())
            .indent(false)
            .to_string()
    }

    const HAVING_SEMI_JOIN: &str = "SELECT a.k, sum(a.v) FROM facts a \
         WHERE a.k IN (SELECT k FROM facts GROUP BY k HAVING sum(v) > 25) GROUP BY a.k";

    #[tokio::test]
    async fn a_filtered_aggregate_build_side_is_a_stage_of_its_own() {
        let stages = stages_of_tables(HAVING_SEMI_JOIN, 50).await;
        let shown = display_stages(&stages);
        let build_stage = stages
            .iter()
            .find(|stage| {
                let plan = rendered(stage);
                plan.contains("FilterExec: sum(facts.v)")
            })
            .unwrap_or_else(|| panic!("no stage filters the aggregate in\n{shown}"));
        let text = rendered(build_stage);
        assert!(
            text.lines()
                .nth(1)
                .is_some_and(|line| line.contains("FilterExec")),
            "the filter is the top of its own stage:\n{shown}"
        );
        assert!(
            !text.contains("HashJoinExec"),
            "the join is in another stage:\n{shown}"
        );
        assert!(
            text.contains("partitioning=Hash([k@0], 2)"),
            "hashed on the join key, as the probe side:\n{shown}"
        );
    }

    #[tokio::test]
    async fn a_plain_build_side_and_an_outer_join_are_left_as_planned() {
        for sql in [
            // The build side is a scan: its size is estimated from statistics.
            "SELECT a.k, sum(b.v) FROM facts a JOIN facts b ON a.k = b.k GROUP BY a.k",
            // A full join keeps unmatched rows: no reduction applies.
            "SELECT a.k, b.k FROM (SELECT k FROM facts GROUP BY k HAVING sum(v) > 25) a \
             FULL JOIN facts b ON a.k = b.k",
        ] {
            let stages = stages_of_tables(sql, 50).await;
            let shown = display_stages(&stages);
            for stage in &stages {
                let text = rendered(stage);
                let top = text.lines().nth(1).unwrap_or_default();
                assert!(
                    !top.contains("FilterExec"),
                    "no stage ends in the filter:\n{shown}"
                );
            }
        }
    }
}
