//! Makes joins safe to split across tasks.
//!
//! A `CollectLeft` hash join that emits build-side rows (left, full, semi,
//! anti and mark joins on the left) tracks which build rows matched across
//! *all* probe partitions of one process, and emits them when the last one
//! ends. A task runs a single probe partition, so those rows would never be
//! emitted. Such joins are re-planned as partitioned hash joins: both sides are
//! hash-repartitioned on the join keys, so each task owns its build rows.
//!
//! A null-aware anti join (`x NOT IN (subquery)`) must see every probe row
//! (the subquery's) to honour NULLs, but decides each build row (the outer
//! query's) on its own. It is re-planned as a partitioned hash join whose
//! build side stays split as it was, and whose every partition streams the
//! whole probe side ([`ReplicateExec`]): each task then holds only its share
//! of the outer rows in its hash table, and reads the subquery's rows, which
//! are usually few. A nested-loop join has no keys to partition on; it runs
//! in a single task, with its probe side coalesced.
//!
//! A re-planned join's output is hash-partitioned on its keys, where the
//! broadcast join's was not. The exchange between a partial and a final
//! aggregate above it that DataFusion planned on those same keys (TPC-H Q13
//! groups by the join key) then moves no row to another partition, so it is
//! dropped rather than shuffled. Likewise a side of the join that is already
//! hash-partitioned on its keys (an aggregate grouped by them) is not
//! repartitioned.

use std::sync::Arc;

use datafusion::common::JoinType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::joins::{HashJoinExec, NestedLoopJoinExec, PartitionMode};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{
    ExecutionPlan, ExecutionPlanProperties, Partitioning, PhysicalExpr,
    replace_children_if_necessary,
};
use quiver_core::replicate::ReplicateExec;

/// Whether a join emits rows of its build (left) side after seeing all probe rows.
pub(crate) fn emits_build_side(join_type: JoinType) -> bool {
    matches!(
        join_type,
        JoinType::Left
            | JoinType::Full
            | JoinType::LeftSemi
            | JoinType::LeftAnti
            | JoinType::LeftMark
    )
}

/// Rewrites the joins of `plan` that cannot run split across tasks.
pub fn make_joins_distributable(
    plan: Arc<dyn ExecutionPlan>,
    partitions: usize,
) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        if let Some(join) = node.downcast_ref::<HashJoinExec>() {
            let collected = *join.partition_mode() == PartitionMode::CollectLeft;
            if collected && emits_build_side(*join.join_type()) {
                let split = if join.null_aware {
                    replicated_probe_anti_join(join, &node)?
                } else {
                    Transformed::yes(partition_hash_join(join, partitions)?)
                };
                return Ok(split.update_data(|split| as_many_partitions_as(split, &node)));
            }
        }
        if let Some(repartition) = node.downcast_ref::<RepartitionExec>()
            && is_redundant(repartition)
        {
            return Ok(Transformed::yes(Arc::clone(repartition.input())));
        }
        if let Some(join) = node.downcast_ref::<NestedLoopJoinExec>()
            && emits_build_side(*join.join_type())
        {
            return single_task_probe(&node, join.left(), join.right());
        }
        Ok(Transformed::no(node))
    })
    .map(|transformed| transformed.data)
}

/// Whether `repartition` is the exchange between a partial aggregate and its
/// final one that hashes rows on the keys and into the partitions that its
/// input is already hash-partitioned by. Other repartitions stay: one that
/// looks redundant may be there to cut a stage ([`crate::build_stage`]).
fn is_redundant(repartition: &RepartitionExec) -> bool {
    let partial_aggregate = repartition
        .input()
        .downcast_ref::<AggregateExec>()
        .is_some_and(|aggregate| *aggregate.mode() == AggregateMode::Partial);
    partial_aggregate
        && matches!(repartition.partitioning(), Partitioning::Hash(..))
        && !repartition.preserve_order()
        && repartition.input().output_partitioning() == repartition.partitioning()
}

/// The null-aware anti join `join` (`node`) with its build side left split
/// as its input is, and the whole probe side in each partition; a build
/// side of one partition keeps the join in one task.
fn replicated_probe_anti_join(
    join: &HashJoinExec,
    node: &Arc<dyn ExecutionPlan>,
) -> Result<Transformed<Arc<dyn ExecutionPlan>>> {
    let build = uncoalesced(join.left());
    let build_partitions = build.output_partitioning().partition_count();
    if build_partitions <= 1 {
        return single_task_probe(node, join.left(), join.right());
    }
    let probe = coalesced(join.right());
    let probe: Arc<dyn ExecutionPlan> = Arc::new(ReplicateExec::try_new(probe, build_partitions)?);
    join.builder()
        .with_partition_mode(PartitionMode::Partitioned)
        .with_new_children(vec![build, probe])?
        .build_exec()
        .map(Transformed::yes)
}

/// `split`, the re-planned `join`, coalesced when `join` had one partition:
/// the operators above it (an aggregate planned in one step, say) may need
/// their input whole. Where it had more, DataFusion knew no partitioning of
/// its output (its last partition to end emits the unmatched build rows), so
/// nothing above can need a particular one.
fn as_many_partitions_as(
    split: Arc<dyn ExecutionPlan>,
    join: &Arc<dyn ExecutionPlan>,
) -> Arc<dyn ExecutionPlan> {
    let partitions = split.output_partitioning().partition_count();
    if join.output_partitioning().partition_count() == 1 && partitions > 1 {
        Arc::new(CoalescePartitionsExec::new(split))
    } else {
        split
    }
}

/// `plan` without the coalesce on top of it, if it has one that only
/// merges partitions: one that also applies a `LIMIT` (DataFusion folds a
/// subquery's limit into it) needs them all in one place.
fn uncoalesced(plan: &Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    match plan.downcast_ref::<CoalescePartitionsExec>() {
        Some(coalesce) if coalesce.fetch().is_none() => Arc::clone(coalesce.input()),
        _ => Arc::clone(plan),
    }
}

/// `plan` in one partition.
fn coalesced(plan: &Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    if plan.output_partitioning().partition_count() <= 1 {
        Arc::clone(plan)
    } else {
        Arc::new(CoalescePartitionsExec::new(Arc::clone(plan)))
    }
}

fn partition_hash_join(join: &HashJoinExec, partitions: usize) -> Result<Arc<dyn ExecutionPlan>> {
    let left_keys = join.on().iter().map(|(left, _)| Arc::clone(left)).collect();
    let right_keys = join
        .on()
        .iter()
        .map(|(_, right)| Arc::clone(right))
        .collect();
    // The build side of a CollectLeft join is coalesced; repartition its input instead.
    let left = hash_partitioned(uncoalesced(join.left()), left_keys, partitions)?;
    let right = hash_partitioned(Arc::clone(join.right()), right_keys, partitions)?;
    join.builder()
        .with_partition_mode(PartitionMode::Partitioned)
        .with_new_children(vec![left, right])?
        .build_exec()
}

/// `input` hash-partitioned on `keys` into `partitions`: as it is when an
/// exchange below already hashed it so (an aggregate grouped by the join
/// key, as the eager aggregation of Q13 plans), through a repartition
/// otherwise. A scan that only declares a hash partitioning (of files
/// grouped by a partition column) did not hash its rows as a shuffle does,
/// so it is repartitioned.
fn hash_partitioned(
    input: Arc<dyn ExecutionPlan>,
    keys: Vec<Arc<dyn PhysicalExpr>>,
    partitions: usize,
) -> Result<Arc<dyn ExecutionPlan>> {
    let wanted = Partitioning::Hash(keys, partitions);
    if *input.output_partitioning() == wanted && hashed_by_an_exchange(&input) {
        return Ok(input);
    }
    Ok(Arc::new(RepartitionExec::try_new(input, wanted)?))
}

/// Whether the partitioning of `plan` comes from a hash repartition below
/// it, through operators of one input each.
fn hashed_by_an_exchange(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let mut node = plan;
    loop {
        if let Some(repartition) = node.downcast_ref::<RepartitionExec>() {
            return matches!(repartition.partitioning(), Partitioning::Hash(..));
        }
        let children = node.children();
        if children.len() != 1 {
            return false;
        }
        node = children[0];
    }
}

fn single_task_probe(
    node: &Arc<dyn ExecutionPlan>,
    left: &Arc<dyn ExecutionPlan>,
    right: &Arc<dyn ExecutionPlan>,
) -> Result<Transformed<Arc<dyn ExecutionPlan>>> {
    if right.output_partitioning().partition_count() <= 1 {
        return Ok(Transformed::no(Arc::clone(node)));
    }
    replace_children_if_necessary(Arc::clone(node), vec![Arc::clone(left), coalesced(right)])
        .map(Transformed::yes)
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, RecordBatch};
    use datafusion::physical_plan::displayable;
    use datafusion::prelude::{SessionConfig, SessionContext};

    use super::*;
    use crate::adaptive::tests::stages_with_broadcast_rows;
    use crate::stages::{StagePlan, display_stages};

    /// The stages of `sql` (see [`stages_with_broadcast_rows`]), their text,
    /// and the text of the stage with a partitioned hash join.
    async fn partitioned_join_stage(
        sql: &str,
        facts_copies: usize,
        broadcast_rows: usize,
    ) -> (Vec<StagePlan>, String, String) {
        let stages = stages_with_broadcast_rows(sql, facts_copies, broadcast_rows).await;
        let text = display_stages(&stages);
        let join_stage = text
            .split("Stage ")
            .find(|stage| stage.contains("HashJoinExec: mode=Partitioned"))
            .unwrap_or_else(|| panic!("a partitioned join in\n{text}"))
            .to_owned();
        (stages, text, join_stage)
    }

    #[tokio::test]
    async fn a_group_by_the_key_of_a_re_planned_join_runs_in_the_join_stage() {
        // `dims` is small enough to broadcast, but a left join emits its
        // unmatched rows, so the join is re-planned partitioned on `d.k`.
        let sql = "SELECT d.k, count(f.v) FROM dims d LEFT JOIN facts f ON d.k = f.k GROUP BY d.k";
        let (stages, text, join_stage) = partitioned_join_stage(sql, 1, 1000).await;
        assert!(
            join_stage.contains("join_type=Left")
                && join_stage.contains("AggregateExec: mode=FinalPartitioned"),
            "the aggregate reads the join's partitions without a shuffle:\n{text}"
        );
        // The two sides of the join, then the join with its aggregate.
        assert_eq!(stages.len(), 3, "{text}");
    }

    #[tokio::test]
    async fn only_an_exchange_makes_a_hash_partitioning_trusted() {
        let context =
            SessionContext::new_with_config(SessionConfig::new().with_target_partitions(2));
        let batch = RecordBatch::try_from_iter(vec![
            ("k", Arc::new(Int64Array::from(vec![1, 2, 3])) as _),
            ("v", Arc::new(Int64Array::from(vec![10, 20, 30])) as _),
        ])
        .expect("batch");
        context.register_batch("t", batch).expect("register");
        let plan = |sql: &'static str| {
            let context = context.clone();
            async move {
                let frame = context.sql(sql).await.expect("plan");
                frame.create_physical_plan().await.expect("physical plan")
            }
        };
        let grouped = plan("SELECT k, count(v) FROM t GROUP BY k").await;
        assert!(
            matches!(grouped.output_partitioning(), Partitioning::Hash(..)),
            "{}",
            displayable(grouped.as_ref()).indent(false)
        );
        assert!(hashed_by_an_exchange(&grouped));
        let scanned = plan("SELECT k, v FROM t WHERE v > 10").await;
        assert!(!hashed_by_an_exchange(&scanned));
    }

    #[tokio::test]
    async fn a_join_side_grouped_by_the_key_is_not_shuffled_again() {
        // `dims` (4 rows) is broadcast and the counts per `f.k` of 40 rows
        // are not; the left join is re-planned partitioned on `f.k`, which
        // the counts are hash-partitioned on already.
        let sql = "SELECT d.k, sum(f.c) FROM dims d \
            LEFT JOIN (SELECT k, count(v) AS c FROM facts GROUP BY k) f ON d.k = f.k GROUP BY d.k";
        let (stages, text, join_stage) = partitioned_join_stage(sql, 10, 5).await;
        assert!(
            join_stage.contains(
                "AggregateExec: mode=FinalPartitioned, gby=[k@0 as k], aggr=[count(facts.v)]"
            ),
            "the counts are final in the join's stage:\n{text}"
        );
        // `dims`, the partial counts, then the join with both aggregates.
        assert_eq!(stages.len(), 3, "{text}");
    }
}
