//! Build sides chosen by measured size: a partitioned hash join whose two
//! inputs have both run builds its hash table from the smaller one.
//!
//! DataFusion builds a hash join's table from the side it estimates smaller.
//! Below a filter, a semi-join reduction or another join those estimates are
//! often far off: in TPC-H Q9 at SF10 the joined `lineitem` side writes
//! 3.3 M rows, and the 15 M rows of `orders`, estimated smaller, fill the hash
//! table. When a stage is about to run and both inputs of a partitioned join
//! in it are complete shuffles, the scheduler knows their exact sizes, and it
//! swaps the join's inputs when the probe side wrote fewer rows
//! ([`swaps`]).
//!
//! The swap cannot change an answer. Both sides are hash-partitioned on the
//! join keys into the same number of partitions, so task *i* joins the same
//! rows whichever side it builds from, and DataFusion's own input swap turns
//! the join type around (a left join becomes a right join) and restores the
//! column order. Null-aware anti joins (`NOT IN`) are not symmetric and are
//! left alone, and so is a join whose output is ordered (it keeps its probe
//! side's order, as when that side is a shuffle of one sorted map task): the
//! operators above it, in its stage and in the stages that read it, were
//! planned on that order, which the swap would lose.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::Result;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use quiver_core::shuffle::{ReadMode, ShuffleReaderExec};
use quiver_proto::PartitionStats;

use crate::stages::StagePlan;

/// Whether a join that builds from `build` and probes `probe` should build
/// from `probe` instead. The hash table's cost is per row, so the side with
/// fewer rows builds it; but not when its rows are so much wider that the
/// table would take more than twice the memory.
pub fn swaps(build: PartitionStats, probe: PartitionStats) -> bool {
    probe.rows < build.rows && probe.bytes <= build.bytes.saturating_mul(2)
}

/// `stage` with the inputs of its swappable joins swapped where [`swaps`]
/// says so, given what each complete stage wrote, summed over its map
/// outputs (`written` answers `None` for a stage that has not finished).
/// Returns the new plan and the build stages, before the swap, of the joins
/// it swapped; `None` when no join changes.
pub fn choose_build_sides(
    stage: &StagePlan,
    written: impl Fn(u32) -> Option<PartitionStats>,
) -> Result<Option<(StagePlan, Vec<u32>)>> {
    // Each swappable join's build stage, and whether it should swap.
    let decisions: Vec<(u32, bool)> = swappable_joins(stage)?
        .into_iter()
        .map(|(build, probe)| {
            let swap = match (written(build), written(probe)) {
                (Some(build_written), Some(probe_written)) => swaps(build_written, probe_written),
                _ => false,
            };
            (build, swap)
        })
        .collect();
    let builds = agreed_builds(&decisions);
    if builds.is_empty() {
        return Ok(None);
    }
    Ok(Some((swap_joins(stage, &builds)?, builds)))
}

/// The build stages whose every join should swap, given each join's build
/// stage and decision. A swap is recorded by build stage, so a build stage
/// that two joins of one stage read swaps only when both should.
fn agreed_builds(decisions: &[(u32, bool)]) -> Vec<u32> {
    let mut builds: Vec<u32> = decisions
        .iter()
        .filter(|(build, _)| decisions.iter().all(|(b, swap)| b != build || *swap))
        .map(|(build, _)| *build)
        .collect();
    builds.sort_unstable();
    builds.dedup();
    builds
}

/// `stage` with the swappable joins that build from a stage in `builds`
/// building from their probe side instead: the decision of
/// [`choose_build_sides`] made again, for `EXPLAIN ANALYZE`.
pub fn swap_joins(stage: &StagePlan, builds: &[u32]) -> Result<StagePlan> {
    let input = Arc::clone(stage.plan.input())
        .transform_up(|node| {
            let Some(join) = node.downcast_ref::<HashJoinExec>() else {
                return Ok(Transformed::no(node));
            };
            match swappable(join) {
                Some((build, _)) if builds.contains(&build) => Ok(Transformed::yes(
                    join.swap_inputs(PartitionMode::Partitioned)?,
                )),
                _ => Ok(Transformed::no(node)),
            }
        })?
        .data;
    Ok(stage.with_input(input))
}

/// The (build, probe) stages of every swappable join in `stage`, top down.
fn swappable_joins(stage: &StagePlan) -> Result<Vec<(u32, u32)>> {
    let mut joins = Vec::new();
    let root: Arc<dyn ExecutionPlan> = Arc::clone(&stage.plan) as _;
    root.apply(|node| {
        if let Some(join) = node.downcast_ref::<HashJoinExec>()
            && let Some(sides) = swappable(join)
        {
            joins.push(sides);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(joins)
}

/// The (build, probe) stages of a partitioned hash join that reads two whole
/// hash shuffles and may swap its inputs.
fn swappable(join: &HashJoinExec) -> Option<(u32, u32)> {
    if *join.partition_mode() != PartitionMode::Partitioned
        || join.null_aware
        || !join.join_type().supports_swap()
        || join.properties().output_ordering().is_some()
    {
        return None;
    }
    let shuffled = |plan: &Arc<dyn ExecutionPlan>| {
        plan.downcast_ref::<ShuffleReaderExec>()
            .filter(|reader| reader.mode() == ReadMode::Hash)
            .map(ShuffleReaderExec::stage_id)
    };
    Some((shuffled(join.left())?, shuffled(join.right())?))
}

#[cfg(test)]
mod tests {
    use datafusion::physical_plan::displayable;

    use super::*;
    use crate::adaptive::tests::stages_of;
    use crate::stages::display_stages;

    const fn written(rows: u64, bytes: u64) -> PartitionStats {
        PartitionStats { rows, bytes }
    }

    #[test]
    fn the_side_with_fewer_rows_builds_unless_it_is_much_wider() {
        assert!(swaps(written(15_000, 180), written(3_300, 260)));
        assert!(!swaps(written(3_300, 260), written(15_000, 180)));
        assert!(
            !swaps(written(100, 10), written(100, 10)),
            "a tie keeps the plan"
        );
        assert!(
            !swaps(written(1_000, 100), written(900, 201)),
            "twice the memory"
        );
    }

    /// A partitioned inner join of two hash shuffles of `k`; the probe
    /// side's reader says its rows are sorted on `k` when `sorted_probe`.
    fn join_of_shuffles(sorted_probe: bool) -> HashJoinExec {
        use arrow::datatypes::{DataType, Field, Schema};
        use datafusion::common::{JoinType, NullEquality};
        use datafusion::physical_expr::expressions::col;
        use datafusion::physical_expr::{EquivalenceProperties, PhysicalSortExpr};

        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        let key = col("k", &schema).expect("column");
        let reader = |stage: u32, sorted: bool| -> Arc<dyn ExecutionPlan> {
            let mut properties = EquivalenceProperties::new(Arc::clone(&schema));
            if sorted {
                properties.add_ordering([PhysicalSortExpr::new_default(Arc::clone(&key))]);
            }
            Arc::new(ShuffleReaderExec::new(
                "job",
                stage,
                ReadMode::Hash,
                4,
                properties,
            ))
        };
        HashJoinExec::try_new(
            reader(1, false),
            reader(2, sorted_probe),
            vec![(Arc::clone(&key), Arc::clone(&key))],
            None,
            &JoinType::Inner,
            None,
            PartitionMode::Partitioned,
            NullEquality::NullEqualsNothing,
            false,
        )
        .expect("join")
    }

    #[test]
    fn a_join_whose_output_is_ordered_keeps_its_sides() {
        assert_eq!(swappable(&join_of_shuffles(false)), Some((1, 2)));
        let ordered = join_of_shuffles(true);
        assert!(
            ordered.properties().output_ordering().is_some(),
            "an inner join keeps its probe side's order"
        );
        assert_eq!(swappable(&ordered), None);
    }

    #[test]
    fn a_build_stage_read_by_two_joins_swaps_only_when_both_should() {
        assert_eq!(agreed_builds(&[(1, true), (3, false)]), vec![1]);
        assert_eq!(agreed_builds(&[(1, true), (1, false)]), Vec::<u32>::new());
        assert_eq!(
            agreed_builds(&[(2, true), (1, true), (2, true)]),
            vec![1, 2]
        );
    }

    /// The (build, probe) stages of the first swappable join in `stage`.
    fn first_join(stage: &StagePlan) -> Option<(u32, u32)> {
        swappable_joins(stage).expect("walk").first().copied()
    }

    /// The join stage of `sql` and its (build, probe) stages.
    async fn join_stage(sql: &str) -> (StagePlan, u32, u32) {
        let stages = stages_of(sql).await;
        stages
            .iter()
            .find_map(|stage| first_join(stage).map(|(build, probe)| (stage.clone(), build, probe)))
            .unwrap_or_else(|| panic!("no partitioned join in\n{}", display_stages(&stages)))
    }

    fn rendered(stage: &StagePlan) -> String {
        displayable(stage.plan.as_ref()).indent(false).to_string()
    }

    #[tokio::test]
    async fn a_left_join_whose_probe_side_ran_smaller_builds_from_it() {
        let sql = "SELECT d.k, f.v FROM dims d LEFT JOIN facts f ON d.k = f.k";
        let (stage, build, probe) = join_stage(sql).await;
        let sizes = |id: u32| {
            Some(match id {
                id if id == build => written(1_000, 16_000),
                id if id == probe => written(10, 160),
                _ => return None,
            })
        };
        let (swapped, builds) = choose_build_sides(&stage, sizes)
            .expect("rewrite")
            .expect("the probe side is smaller");
        assert_eq!(builds, vec![build]);
        let text = rendered(&swapped);
        assert!(text.contains("join_type=Right"), "{text}");
        assert_eq!(swapped.plan.schema(), stage.plan.schema(), "same columns");
        assert_eq!(swapped.partitions(), stage.partitions());
        let mut inputs = swapped.inputs.clone();
        inputs.sort();
        assert_eq!(inputs, vec![build.min(probe), build.max(probe)]);
        // The reader now on the build side is the former probe stage.
        let (new_build, new_probe) = first_join(&swapped).expect("still a partitioned join");
        assert_eq!((new_build, new_probe), (probe, build));
        assert_eq!(
            rendered(&swap_joins(&stage, &builds).expect("replay")),
            text
        );
    }

    #[tokio::test]
    async fn a_join_waits_for_both_sides_and_keeps_a_smaller_build_side() {
        let sql = "SELECT d.k, f.v FROM dims d JOIN facts f ON d.k = f.k";
        let (stage, build, probe) = join_stage(sql).await;
        let only_build = |id: u32| (id == build).then_some(written(1_000, 16_000));
        assert!(
            choose_build_sides(&stage, only_build)
                .expect("walk")
                .is_none()
        );
        let smaller_build = |id: u32| {
            Some(match id {
                id if id == build => written(10, 160),
                id if id == probe => written(1_000, 16_000),
                _ => return None,
            })
        };
        assert!(
            choose_build_sides(&stage, smaller_build)
                .expect("walk")
                .is_none()
        );
    }
}
