//! Chooses broadcast hash joins by what they ship.
//!
//! In a cluster, a partitioned hash join sends both of its inputs through a
//! shuffle, while a broadcast (`CollectLeft`) join sends its build side to
//! every task of the probe side and leaves the probe rows where they are.
//! DataFusion decides between the two with fixed size thresholds, which
//! Quiver sets to 32 MiB (`core/src/config.rs`). Above that, this rule still
//! broadcasts a build side when
//!
//! ```text
//! build × probe_tasks  ≤  build + probe        (bytes shipped)
//! build                ≤  quiver.broadcast_join_max_bytes
//! ```
//!
//! The cap bounds memory: each probe task holds the whole build side in a
//! hash table, and DataFusion's hash join cannot spill. Sizes are
//! DataFusion's estimates; a join without them is left to the thresholds.
//! The rule runs before DataFusion's `JoinSelection`, which then only checks
//! whether swapping the inputs makes the build side smaller still.

use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use quiver_core::config::QuiverOptions;
use tracing::debug;

/// The name of DataFusion's rule that this one runs before.
pub const JOIN_SELECTION: &str = "join_selection";

/// See the module documentation.
#[derive(Debug, Default)]
pub struct BroadcastJoinSelection;

impl PhysicalOptimizerRule for BroadcastJoinSelection {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let max_bytes = config.extensions.get::<QuiverOptions>().map_or(
            QuiverOptions::default().broadcast_join_max_bytes,
            |options| options.broadcast_join_max_bytes,
        );
        if max_bytes == 0 {
            return Ok(plan);
        }
        plan.transform_up(|node| {
            let Some(join) = node.downcast_ref::<HashJoinExec>() else {
                return Ok(Transformed::no(node));
            };
            if *join.partition_mode() != PartitionMode::Auto
                || join.null_aware
                || !ships_less_broadcast(join, max_bytes)?
            {
                return Ok(Transformed::no(node));
            }
            let broadcast = join
                .builder()
                .with_partition_mode(PartitionMode::CollectLeft)
                .build_exec()?;
            Ok(Transformed::yes(broadcast))
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "quiver_broadcast_join_selection"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// Whether broadcasting `join`'s build (left) side ships fewer bytes than
/// shuffling both sides, within `max_bytes`.
fn ships_less_broadcast(join: &HashJoinExec, max_bytes: u64) -> Result<bool> {
    let (Some(build), Some(probe)) = (
        estimated_bytes(join.left())?,
        estimated_bytes(join.right())?,
    ) else {
        return Ok(false);
    };
    let probe_tasks = join.right().output_partitioning().partition_count().max(1) as u64;
    let broadcast =
        build <= max_bytes && build.saturating_mul(probe_tasks) <= build.saturating_add(probe);
    if broadcast {
        debug!(
            build,
            probe, probe_tasks, "broadcasting a hash join's build side"
        );
    }
    Ok(broadcast)
}

/// DataFusion's estimate of the bytes that `plan` produces, if it has one.
pub(crate) fn estimated_bytes(plan: &Arc<dyn ExecutionPlan>) -> Result<Option<u64>> {
    let statistics = StatisticsContext::new().compute(plan.as_ref(), &StatisticsArgs::new())?;
    Ok(statistics
        .total_byte_size
        .get_value()
        .map(|&bytes| bytes as u64))
}

#[cfg(test)]
mod tests {
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::common::stats::Precision;
    use datafusion::common::{ColumnStatistics, JoinType, NullEquality, Statistics};
    use datafusion::physical_expr::expressions::Column;
    use datafusion::physical_plan::test::exec::StatisticsExec;

    use super::*;

    /// A leaf of two partitions with an estimated size.
    fn input(bytes: usize) -> Arc<dyn ExecutionPlan> {
        let schema = Schema::new(vec![Field::new("k", DataType::Int64, false)]);
        let statistics = Statistics {
            num_rows: Precision::Inexact(bytes / 8),
            total_byte_size: Precision::Inexact(bytes),
            column_statistics: vec![ColumnStatistics::new_unknown()],
        };
        Arc::new(StatisticsExec::new(statistics, schema))
    }

    fn join(build: usize, probe: usize) -> Arc<dyn ExecutionPlan> {
        let (left, right) = (input(build), input(probe));
        let on = vec![(
            Arc::new(Column::new("k", 0)) as _,
            Arc::new(Column::new("k", 0)) as _,
        )];
        Arc::new(
            HashJoinExec::try_new(
                left,
                right,
                on,
                None,
                &JoinType::Inner,
                None,
                PartitionMode::Auto,
                NullEquality::NullEqualsNothing,
                false,
            )
            .expect("join"),
        )
    }

    fn mode(plan: &Arc<dyn ExecutionPlan>) -> PartitionMode {
        *plan
            .downcast_ref::<HashJoinExec>()
            .expect("a hash join")
            .partition_mode()
    }

    fn optimize(plan: Arc<dyn ExecutionPlan>, max_bytes: u64) -> Arc<dyn ExecutionPlan> {
        let mut config = ConfigOptions::new();
        let mut options = QuiverOptions::default();
        options.broadcast_join_max_bytes = max_bytes;
        config.extensions.insert(options);
        BroadcastJoinSelection
            .optimize(plan, &config)
            .expect("optimize")
    }

    #[test]
    fn broadcasts_a_build_side_that_ships_less_within_the_cap() {
        const MIB: usize = 1024 * 1024;
        // 64 MiB to each of two probe tasks against 2 GiB: broadcast.
        assert_eq!(
            mode(&optimize(join(64 * MIB, 2048 * MIB), 128 << 20)),
            PartitionMode::CollectLeft
        );
        // 100 MiB to each of two probe tasks against 50 MiB: shuffling
        // both sides ships less.
        assert_eq!(
            mode(&optimize(join(100 * MIB, 50 * MIB), 128 << 20)),
            PartitionMode::Auto
        );
        // Above the cap: left to DataFusion's thresholds.
        assert_eq!(
            mode(&optimize(join(256 * MIB, 2048 * MIB), 128 << 20)),
            PartitionMode::Auto
        );
        // Turned off.
        assert_eq!(
            mode(&optimize(join(64 * MIB, 2048 * MIB), 0)),
            PartitionMode::Auto
        );
    }
}
