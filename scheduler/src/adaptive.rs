//! Adaptive broadcast joins: a partitioned hash join decided again once its
//! build side has run.
//!
//! DataFusion picks a join's mode from size estimates, and a filter or an
//! aggregate below the join often leaves those unknown or far too large: in
//! TPC-H Q12 the filtered `lineitem` side is estimated at the size of the
//! table but writes 730 KiB. When both inputs of a partitioned hash join are
//! shuffles, the scheduler runs the build side's stage first and holds the
//! probe side's stage back. Then the build side's size is known exactly:
//!
//! - if broadcasting it is cheap ([`AdaptivePolicy::broadcasts`]), the join
//!   becomes a `CollectLeft` join whose every task reads the whole build side,
//!   and the probe side's plan moves into the join's stage. The probe rows,
//!   usually the larger side, are then never written to a shuffle nor sent
//!   between executors, and one stage boundary is gone;
//! - otherwise the probe stage is released and the join runs as planned.
//!
//! The rewrite is made only where it cannot change an answer: for join types
//! that emit no unmatched build rows (see [`crate::joins`]), and where nothing
//! above the join in its stage relies on the join's hash partitioning.

use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::{Distribution, ExecutionPlan};
use quiver_core::config::quiver_options;
use quiver_core::shuffle::{ReadMode, ShuffleReaderExec};

use crate::broadcast::estimated_bytes;
use crate::joins::emits_build_side;
use crate::reduction::{self, Reduction};
use crate::stages::StagePlan;

/// A partitioned hash join whose two inputs are whole stages, so that it can
/// still become a broadcast join once the build stage has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptiveJoin {
    /// The stage that runs the join.
    pub join_stage: u32,
    /// The stage of the join's build (left) side: it runs first.
    pub build_stage: u32,
    /// The stage of the probe (right) side: held until the decision.
    pub probe_stage: u32,
}

/// When a build side that has run is broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptivePolicy {
    /// At or below this, always (DataFusion's `hash_join_single_partition_threshold`).
    pub always_bytes: u64,
    /// Up to this, when broadcasting ships fewer bytes than shuffling both
    /// sides (`quiver.broadcast_join_max_bytes`).
    pub max_bytes: u64,
    /// Whether a partitioned join whose two sides have run builds from the
    /// smaller one (`datafusion.optimizer.join_reordering`; see
    /// [`crate::join_swap`]).
    pub swaps_build_sides: bool,
}

impl AdaptivePolicy {
    /// The policy of a job's settings; `None` when `quiver.adaptive_joins` is off.
    pub fn from_config(config: &ConfigOptions) -> Option<Self> {
        quiver_options(config)
            .adaptive_joins
            .then(|| Self::of(config))
    }

    /// The thresholds of a job's settings.
    pub fn of(config: &ConfigOptions) -> Self {
        Self {
            always_bytes: config.optimizer.hash_join_single_partition_threshold as u64,
            max_bytes: quiver_options(config).broadcast_join_max_bytes,
            swaps_build_sides: config.optimizer.join_reordering,
        }
    }

    /// Whether a build side of `build_bytes`, sent to each of `probe_tasks`
    /// tasks, is worth broadcasting against a probe side estimated at
    /// `probe_bytes`. The same rule as the planner's ([`crate::broadcast`]),
    /// with the build side measured instead of estimated.
    pub fn broadcasts(&self, build_bytes: u64, probe_tasks: u64, probe_bytes: Option<u64>) -> bool {
        let ships_less = probe_bytes.is_some_and(|probe| {
            build_bytes.saturating_mul(probe_tasks.max(1)) <= build_bytes.saturating_add(probe)
        });
        build_bytes <= self.always_bytes || (build_bytes <= self.max_bytes && ships_less)
    }
}

/// A job's decisions that wait for a build side to run: its adaptive joins
/// and its semi-join reductions ([`crate::reduction`]), with the settings
/// that decide them.
#[derive(Debug, Clone, Default)]
pub struct PendingJoins {
    policy: Option<AdaptivePolicy>,
    joins: Vec<AdaptiveJoin>,
    /// When a key stage filters a scan; `None` when reductions are off.
    reduction_policy: Option<AdaptivePolicy>,
    reductions: Vec<Reduction>,
}

impl PendingJoins {
    /// The adaptive joins of `stages`, none when `policy` is `None` (turned
    /// off), and their reductions, none when `reduction_policy` is `None`.
    pub fn new(
        stages: &[StagePlan],
        policy: Option<AdaptivePolicy>,
        reduction_policy: Option<AdaptivePolicy>,
    ) -> Self {
        let joins = match policy {
            Some(_) => adaptive_joins(stages),
            None => Vec::new(),
        };
        let reductions = match reduction_policy {
            Some(_) => reduction::reductions(stages, &joins),
            None => Vec::new(),
        };
        Self {
            policy,
            joins,
            reduction_policy,
            reductions,
        }
    }

    pub fn policy(&self) -> Option<AdaptivePolicy> {
        self.policy
    }

    /// Whether partitioned joins choose their build side once both sides ran.
    pub fn swaps_build_sides(&self) -> bool {
        self.policy.is_some_and(|policy| policy.swaps_build_sides)
    }

    pub fn reduction_policy(&self) -> Option<AdaptivePolicy> {
        self.reduction_policy
    }

    /// Whether `stage_id` waits for a decision: it is a pending join's probe
    /// side, or the scan stage of a pending reduction.
    pub fn holds(&self, stage_id: u32) -> bool {
        self.joins.iter().any(|join| join.probe_stage == stage_id)
            || self.reductions.iter().any(|r| r.scan_stage == stage_id)
    }

    /// Takes out the pending reductions whose key stage is `complete`.
    pub fn take_ready_reductions(&mut self, complete: impl Fn(u32) -> bool) -> Vec<Reduction> {
        take_where(&mut self.reductions, |reduction| {
            complete(reduction.key_stage)
        })
    }

    /// Takes out the pending joins whose build stage is `complete`.
    pub fn take_ready(&mut self, complete: impl Fn(u32) -> bool) -> Vec<AdaptiveJoin> {
        take_where(&mut self.joins, |join| complete(join.build_stage))
    }

    /// Forgets the join run by `stage_id`, whose plan moved into another stage;
    /// its probe stage is released and the join stays partitioned.
    pub fn forget_join_stage(&mut self, stage_id: u32) {
        self.joins.retain(|join| join.join_stage != stage_id);
    }

    /// Moves the pending reductions of the scans of stage `from` to stage
    /// `to`, whose broadcast join now runs `from`'s plan: `to` then waits for
    /// their build stages as `from` did.
    pub fn move_reductions(&mut self, from: u32, to: u32) {
        for reduction in &mut self.reductions {
            if reduction.scan_stage == from {
                reduction.scan_stage = to;
            }
        }
    }
}

/// Removes from `items` and returns those for which `taken` holds.
fn take_where<T>(items: &mut Vec<T>, taken: impl Fn(&T) -> bool) -> Vec<T> {
    let (ready, waiting) = items.drain(..).partition(|item| taken(item));
    *items = waiting;
    ready
}

/// The joins of a job's stages that can still become broadcast joins.
pub fn adaptive_joins(stages: &[StagePlan]) -> Vec<AdaptiveJoin> {
    stages
        .iter()
        .filter_map(|stage| {
            let root: Arc<dyn ExecutionPlan> = Arc::clone(&stage.plan) as _;
            let (build_stage, probe_stage) = find_join(&root, true)?;
            let candidate = AdaptiveJoin {
                join_stage: stage.stage_id,
                build_stage,
                probe_stage,
            };
            keeps_partitions_valid(stages, &candidate).then_some(candidate)
        })
        .collect()
}

/// The build and probe stages of a partitioned hash join under `plan` that
/// reads two whole shuffles, where every operator from the stage's root down
/// to the join (`any_partitioning`) accepts input partitioned any way.
fn find_join(plan: &Arc<dyn ExecutionPlan>, any_partitioning: bool) -> Option<(u32, u32)> {
    if any_partitioning
        && let Some(join) = plan.downcast_ref::<HashJoinExec>()
        && let Some(stages) = broadcastable(join)
    {
        return Some(stages);
    }
    let required = plan.input_distribution_requirements();
    plan.children()
        .into_iter()
        .enumerate()
        .find_map(|(index, child)| {
            let unspecified = matches!(
                required.child_distribution(index),
                None | Some(Distribution::UnspecifiedDistribution)
            );
            find_join(child, any_partitioning && unspecified)
        })
}

/// The (build, probe) stages of a join that may become a broadcast join.
fn broadcastable(join: &HashJoinExec) -> Option<(u32, u32)> {
    if *join.partition_mode() != PartitionMode::Partitioned
        || join.null_aware
        || emits_build_side(*join.join_type())
    {
        return None;
    }
    let shuffled = |plan: &Arc<dyn ExecutionPlan>| {
        plan.downcast_ref::<ShuffleReaderExec>()
            .filter(|reader| reader.mode() == ReadMode::Hash)
            .map(ShuffleReaderExec::stage_id)
    };
    let build = shuffled(join.left())?;
    let probe = shuffled(join.right())?;
    (build != probe).then_some((build, probe))
}

/// Whether moving the probe plan into the join stage keeps the job's task
/// counts consistent. The join stage's tasks become the probe plan's
/// partitions, which must not be fewer (that would lose parallelism), and a
/// stage whose map outputs are read one per reader partition must keep its count.
/// Checked on the stages as planned, and again on the stages as they are
/// when the join is decided: an earlier broadcast join may have grown the
/// probe stage (its own join stage) to its probe plan's partitions.
pub fn keeps_partitions_valid(stages: &[StagePlan], join: &AdaptiveJoin) -> bool {
    let (Some(join_stage), Some(probe_stage)) = (
        stage(stages, join.join_stage),
        stage(stages, join.probe_stage),
    ) else {
        return false;
    };
    let read_only_by_join = stages
        .iter()
        .filter(|stage| stage.inputs.contains(&join.probe_stage))
        .count()
        == 1;
    let is_final = stages.last().map(|stage| stage.stage_id) == Some(join.join_stage);
    let (before, after) = (join_stage.partitions(), probe_stage.partitions());
    read_only_by_join
        && after >= before
        && (after == before || is_final || join_stage.plan.partitioning().is_some())
}

/// The stage `id` of a job's stages.
fn stage(stages: &[StagePlan], id: u32) -> Option<&StagePlan> {
    stages.iter().find(|stage| stage.stage_id == id)
}

/// DataFusion's estimate of the bytes stage `id` writes, for
/// [`AdaptivePolicy::broadcasts`]: a probe stage, or the scan stage of a
/// reduction, unfiltered. An estimate that DataFusion cannot compute counts
/// as none: the build side is then read whole only under the
/// always-broadcast threshold.
pub fn output_estimate(stages: &[StagePlan], id: u32) -> Option<u64> {
    estimated_bytes(stage(stages, id)?.plan.input())
        .ok()
        .flatten()
}

/// The join stage's plan with the join broadcasting its build side and
/// running the probe stage's plan in place of reading its shuffle.
pub fn broadcast_join(stages: &[StagePlan], join: &AdaptiveJoin) -> Result<StagePlan> {
    let find = |id: u32| {
        stage(stages, id).ok_or_else(|| {
            datafusion::error::DataFusionError::Internal(format!("no stage {id} in the job"))
        })
    };
    let join_stage = find(join.join_stage)?;
    let probe_plan = Arc::clone(find(join.probe_stage)?.plan.input());
    let input = Arc::clone(join_stage.plan.input())
        .transform_up(|node| {
            let Some(hash_join) = node.downcast_ref::<HashJoinExec>() else {
                return Ok(Transformed::no(node));
            };
            if broadcastable(hash_join) != Some((join.build_stage, join.probe_stage)) {
                return Ok(Transformed::no(node));
            }
            let build: Arc<dyn ExecutionPlan> =
                Arc::new(CoalescePartitionsExec::new(Arc::clone(hash_join.left())));
            let broadcast = hash_join
                .builder()
                .with_partition_mode(PartitionMode::CollectLeft)
                .with_new_children(vec![build, Arc::clone(&probe_plan)])?
                .build_exec()?;
            Ok(Transformed::yes(broadcast))
        })?
        .data;
    Ok(join_stage.with_input(input))
}

/// The stages as they ran, given the joins that became broadcast joins:
/// each join stage replaced by its rewritten plan. For `EXPLAIN ANALYZE`.
pub fn replay(stages: &[StagePlan], broadcast: &[AdaptiveJoin]) -> Result<Vec<StagePlan>> {
    let mut stages = stages.to_vec();
    for join in broadcast {
        let rewritten = broadcast_join(&stages, join)?;
        if let Some(stage) = stages
            .iter_mut()
            .find(|stage| stage.stage_id == join.join_stage)
        {
            *stage = rewritten;
        }
    }
    Ok(stages)
}

#[cfg(test)]
pub(crate) mod tests {
    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::execution::SessionStateBuilder;
    use datafusion::physical_optimizer::PhysicalOptimizerRule;
    use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
    use datafusion::prelude::{SessionConfig, SessionContext};
    use quiver_core::config::default_session_config;

    use super::*;
    use crate::stages::{display_stages, split_into_stages};

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn broadcasts_small_build_sides_and_those_that_ship_less() {
        let policy = AdaptivePolicy {
            always_bytes: 32 * MIB,
            max_bytes: 128 * MIB,
            swaps_build_sides: true,
        };
        assert!(policy.broadcasts(MIB, 2, None));
        assert!(policy.broadcasts(64 * MIB, 2, Some(1024 * MIB)));
        assert!(!policy.broadcasts(64 * MIB, 2, Some(32 * MIB)));
        assert!(!policy.broadcasts(64 * MIB, 2, None), "no estimate: no bet");
        assert!(!policy.broadcasts(256 * MIB, 2, Some(100_000 * MIB)));
    }

    #[test]
    fn a_reduction_follows_its_scan_into_the_broadcast_join_stage() {
        let reduction = Reduction {
            join_stage: 7,
            key_stage: 2,
            scan_stage: 4,
        };
        let mut pending = PendingJoins {
            policy: None,
            joins: Vec::new(),
            reduction_policy: None,
            reductions: vec![reduction],
        };
        assert!(pending.holds(4) && !pending.holds(5));
        // Stage 5's join broadcast its build side and now runs stage 4's plan.
        pending.move_reductions(4, 5);
        assert!(!pending.holds(4), "stage 4 runs no task of its own");
        assert!(
            pending.holds(5),
            "stage 5 waits for the build stage instead"
        );
        let ready = pending.take_ready_reductions(|stage| stage == 2);
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].scan_stage, 5);
    }

    #[test]
    fn the_setting_turns_adaptive_joins_off() {
        let config: SessionConfig = default_session_config();
        let policy = AdaptivePolicy::from_config(config.options()).expect("on by default");
        assert_eq!(policy.always_bytes, 32 * MIB);
        let mut config = config;
        config
            .options_mut()
            .set("quiver.adaptive_joins", "false")
            .expect("a known setting");
        assert_eq!(AdaptivePolicy::from_config(config.options()), None);
    }

    /// Plans `sql` over two tables without statistics, so that DataFusion
    /// cannot tell the build side is small and joins partitioned.
    pub(crate) async fn stages_of(sql: &str) -> Vec<StagePlan> {
        stages_of_tables(sql, 1).await
    }

    /// [`stages_of`] with `facts` holding `facts_copies` copies of the rows
    /// of `dims`, in two partitions each.
    pub(crate) async fn stages_of_tables(sql: &str, facts_copies: usize) -> Vec<StagePlan> {
        // No estimate can make the join a broadcast at planning time.
        stages_with_broadcast_rows(sql, facts_copies, 0).await
    }

    /// The stages of `sql`, where a join side estimated at most
    /// `broadcast_rows` rows (or 100 bytes a row) is broadcast at planning time.
    pub(crate) async fn stages_with_broadcast_rows(
        sql: &str,
        facts_copies: usize,
        broadcast_rows: usize,
    ) -> Vec<StagePlan> {
        stages_planned(sql, facts_copies, broadcast_rows, Vec::new()).await
    }

    /// [`stages_with_broadcast_rows`], with `rules` run after DataFusion's
    /// physical optimizer rules.
    pub(crate) async fn stages_planned(
        sql: &str,
        facts_copies: usize,
        broadcast_rows: usize,
        rules: Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>>,
    ) -> Vec<StagePlan> {
        let mut config = default_session_config().with_target_partitions(2);
        config
            .options_mut()
            .optimizer
            .hash_join_single_partition_threshold = broadcast_rows * 100;
        config
            .options_mut()
            .optimizer
            .hash_join_single_partition_threshold_rows = broadcast_rows;
        let mut physical_rules = PhysicalOptimizer::new().rules;
        physical_rules.extend(rules);
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_default_features()
            .with_physical_optimizer_rules(physical_rules)
            .build();
        let context = SessionContext::new_with_state(state);
        let schema = Arc::new(Schema::new(vec![
            // Nullable, as most columns are: `NOT IN` is then null-aware.
            Field::new("k", DataType::Int64, true),
            Field::new("v", DataType::Int64, false),
        ]));
        // Two partitions each, as two files would give.
        let batch = |keys: [i64; 2]| {
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(Int64Array::from(keys.to_vec())),
                    Arc::new(Int64Array::from(keys.map(|k| k * 10).to_vec())),
                ],
            )
            .expect("batch")
        };
        for (table, copies) in [("facts", facts_copies), ("dims", 1)] {
            let partitions = vec![vec![batch([1, 2]); copies], vec![batch([3, 4]); copies]];
            let provider = MemTable::try_new(Arc::clone(&schema), partitions).expect("table");
            context
                .register_table(table, Arc::new(provider))
                .expect("register");
        }
        let plan = context
            .sql(sql)
            .await
            .expect("plan")
            .create_physical_plan()
            .await
            .expect("physical");
        split_into_stages("job", plan, 2).expect("stages")
    }

    fn rendered(stage: &StagePlan) -> String {
        datafusion::physical_plan::displayable(stage.plan.as_ref())
            .indent(false)
            .to_string()
    }

    /// An inner join whose build side is filtered, then grouped by another column.
    pub(crate) const FILTERED_JOIN: &str =
        "SELECT d.v, sum(f.v) FROM dims d JOIN facts f ON d.k = f.k WHERE d.v > 10 GROUP BY d.v";

    #[tokio::test]
    async fn an_inner_join_of_two_shuffles_becomes_a_broadcast_of_its_build_stage() {
        let stages = stages_of(FILTERED_JOIN).await;
        let joins = adaptive_joins(&stages);
        let [join] = joins.as_slice() else {
            panic!("one adaptive join expected in\n{}", display_stages(&stages));
        };
        let rewritten = broadcast_join(&stages, join).expect("rewrite");
        let text = rendered(&rewritten);
        assert!(text.contains("mode=CollectLeft"), "{text}");
        assert!(
            !rewritten.inputs.contains(&join.probe_stage),
            "the probe stage runs inside the join stage: {text}"
        );
        assert!(rewritten.inputs.contains(&join.build_stage), "{text}");
        assert!(text.contains("CoalescePartitionsExec"), "{text}");
        let replayed = replay(&stages, &[*join]).expect("replay");
        assert_eq!(rendered(&replayed[join.join_stage as usize - 1]), text);
    }

    /// Asserts that `sql` plans a join shown as `shown` that stays as planned.
    async fn assert_not_adaptive(sql: &str, shown: &str) {
        let stages = stages_of(sql).await;
        let text = display_stages(&stages);
        assert!(text.contains(shown), "{text}");
        assert_eq!(adaptive_joins(&stages), vec![], "{text}");
    }

    #[tokio::test]
    async fn a_join_does_not_take_a_probe_stage_that_an_earlier_broadcast_grew() {
        // The inner join probes a union of four partitions, shuffled into
        // two; the outer join reads the inner join's stage; the aggregate's
        // final step reads the outer join's stage one task per partition.
        let sql = "SELECT count(*) FROM dims d0 JOIN \
                   (SELECT f.v FROM dims d JOIN \
                     (SELECT k, v FROM facts UNION ALL SELECT k, v FROM facts) f ON d.k = f.k) s \
                   ON d0.k = s.v";
        let mut stages = stages_of(sql).await;
        let text = display_stages(&stages);
        let [inner, outer] = adaptive_joins(&stages)[..] else {
            panic!("two adaptive joins in\n{text}");
        };
        // DataFusion builds the outer join from the inner join's stage; make
        // it probe that stage instead, as it does when that side is larger.
        let outer_stage = stage(&stages, outer.join_stage).expect("stage");
        let swapped = crate::join_swap::swap_joins(outer_stage, &[inner.join_stage]).expect("swap");
        replace(&mut stages, swapped);
        let text = display_stages(&stages);
        let [inner, outer] = adaptive_joins(&stages)[..] else {
            panic!("two adaptive joins in\n{text}");
        };
        assert_eq!(outer.probe_stage, inner.join_stage, "chained:\n{text}");
        assert!(
            keeps_partitions_valid(&stages, &outer),
            "as planned:\n{text}"
        );
        // The inner join broadcasts first: its stage takes the union's four partitions.
        let grown = broadcast_join(&stages, &inner).expect("rewrite");
        assert_eq!(grown.partitions(), 4, "{text}");
        replace(&mut stages, grown);
        assert!(
            !keeps_partitions_valid(&stages, &outer),
            "the outer join's stage would run four tasks for a reader of two:\n{}",
            display_stages(&stages)
        );
    }

    /// `stages` with the stage of `plan`'s id replaced by `plan`.
    fn replace(stages: &mut [StagePlan], plan: StagePlan) {
        let slot = stages
            .iter_mut()
            .find(|stage| stage.stage_id == plan.stage_id)
            .expect("the stage");
        *slot = plan;
    }

    #[tokio::test]
    async fn a_join_whose_partitioning_is_relied_on_stays_partitioned() {
        // The aggregate above groups by the join key, so it reuses the join's
        // hash partitioning instead of shuffling again.
        assert_not_adaptive(
            "SELECT f.k, sum(d.v) FROM dims d JOIN facts f ON d.k = f.k GROUP BY f.k",
            "HashJoinExec: mode=Partitioned",
        )
        .await;
        // A left join emits unmatched build rows: each task would emit them.
        assert_not_adaptive(
            "SELECT * FROM dims d LEFT JOIN facts f ON d.k = f.k",
            "join_type=Left",
        )
        .await;
    }
}
