//! Semi-join reduction: the keys of a small stage that has run filter the
//! scan of a stage that has not, before its rows are aggregated, joined or
//! shuffled.
//!
//! In TPC-H Q17 the join that decides the answer has, on one side, the 2,044
//! parts of one brand and container (SF10), and on the other an aggregate of
//! all 60 M `lineitem` rows grouped by part. The aggregate does not know that
//! only those parts' groups will be kept. When a hash join's build (left)
//! side is a whole stage, and its probe key, followed down the probe side
//! through projections, filters, inner joins, aggregate groups and shuffles,
//! comes straight from a column of a file scan in a stage that has not run,
//! with an aggregate or a shuffle in between (the work to save), then that
//! scan stage waits for the build stage. Once the build stage has
//! run and wrote at most `hash_join_single_partition_threshold` bytes, the
//! scan is wrapped in a `RightSemi` hash join against the build stage's
//! output, read whole by every task: only rows whose key the build side has
//! go on. The plan above is unchanged, since a semi join keeps the scan's
//! columns.
//!
//! This cannot change an answer: rows are removed only for key values that
//! the join drops anyway. That holds for join types that drop unmatched probe
//! rows (not right, full, mark or right anti joins, nor `NOT IN` anti joins,
//! which a null probe key changes), with null keys matching nothing, and when
//! every operator on the way keeps the key column's values:
//! the path stops at anything else (a limit, a window, a union, an outer join).
//! An inner join on the key is followed into both its sides: every row it
//! outputs has the same value on both, so in Q18 the 624 (SF10) order keys
//! over the quantity threshold filter `lineitem` as well as `orders` before
//! they are shuffled to be joined.
//! Each stage on the way must feed only the next one, so that no other reader
//! loses rows.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use datafusion::common::NullEquality;
use datafusion::common::config::ConfigOptions;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::JoinType;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::{ExecutionPlan, PhysicalExpr, replace_children_if_necessary};
use quiver_core::config::quiver_options;
use quiver_core::shuffle::{ShuffleReaderExec, ShuffleWriterExec};

use crate::adaptive::AdaptiveJoin;
use crate::stages::{StagePlan, collect_reader_stages};

/// A scan that a join's build stage can filter once it has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reduction {
    /// The stage of the join whose build side filters.
    pub join_stage: u32,
    /// The join's build stage: its output holds the keys.
    pub build_stage: u32,
    /// The stage of the scan: it waits for the build stage.
    pub scan_stage: u32,
}

/// Where the probe key of a join comes from: a column of a file scan.
struct ScanColumn {
    stage: u32,
    /// Child indices from the stage's writer down to the scan.
    path: Vec<usize>,
    column: usize,
    /// Stages whose output the path read, below the join's own.
    crossed: Vec<u32>,
    /// Whether an aggregate or a shuffle lies between scan and join. Without
    /// one, the semi join would only take the place of the join's own probe.
    saves_work: bool,
}

/// The reductions of a job's stages that cannot deadlock: a scan stage never
/// waits for a build stage that waits for it, through inputs, `held` stages
/// (the probe sides of adaptive joins) or other reductions.
pub fn reductions(stages: &[StagePlan], adaptive: &[AdaptiveJoin]) -> Vec<Reduction> {
    let mut waits: HashMap<u32, Vec<u32>> = stages
        .iter()
        .map(|stage| (stage.stage_id, stage.inputs.clone()))
        .collect();
    for join in adaptive {
        waits
            .entry(join.probe_stage)
            .or_default()
            .push(join.build_stage);
    }
    // A probe stage that an adaptive join merges away never completes.
    let merged = |id: u32| adaptive.iter().any(|join| join.probe_stage == id);
    let mut found = Vec::new();
    for stage in stages {
        let root: Arc<dyn ExecutionPlan> = Arc::clone(&stage.plan) as _;
        for (build_stage, scan) in reducible_joins(stages, stage.stage_id, &root, Vec::new()) {
            let reduction = Reduction {
                join_stage: stage.stage_id,
                build_stage,
                scan_stage: scan.stage,
            };
            let cycle = waits_for(&waits, build_stage, scan.stage);
            let repeated = found.iter().any(|r: &Reduction| r.scan_stage == scan.stage);
            // An adaptive join between the same stages broadcasts a build side
            // this small, and that join then filters the scan's rows itself.
            let adaptive_twin = adaptive.iter().any(|join| {
                join.join_stage == stage.stage_id
                    && join.build_stage == build_stage
                    && join.probe_stage == scan.stage
            });
            if !cycle && !repeated && !adaptive_twin && !merged(build_stage) {
                waits.entry(scan.stage).or_default().push(build_stage);
                found.push(reduction);
            }
        }
    }
    found
}

/// Whether `from` waits, directly or through others, for `to` (or is it).
fn waits_for(waits: &HashMap<u32, Vec<u32>>, from: u32, to: u32) -> bool {
    let mut seen = HashSet::new();
    let mut next = vec![from];
    while let Some(stage) = next.pop() {
        if stage == to {
            return true;
        }
        if seen.insert(stage) {
            next.extend(waits.get(&stage).into_iter().flatten());
        }
    }
    false
}

/// The joins under `plan` (at `path` in stage `stage_id`) whose build stage
/// can filter a scan, with that scan.
fn reducible_joins(
    stages: &[StagePlan],
    stage_id: u32,
    plan: &Arc<dyn ExecutionPlan>,
    path: Vec<usize>,
) -> Vec<(u32, ScanColumn)> {
    let mut found: Vec<(u32, ScanColumn)> = plan
        .downcast_ref::<HashJoinExec>()
        .map(|join| reducible_join(stages, stage_id, join, &path))
        .unwrap_or_default();
    for (index, child) in plan.children().into_iter().enumerate() {
        let mut child_path = path.clone();
        child_path.push(index);
        found.extend(reducible_joins(stages, stage_id, child, child_path));
    }
    found
}

/// The build stage of `join` with each scan whose rows its keys can filter:
/// the scans the probe key comes from, and those of the keys it is joined
/// with on the way.
fn reducible_join(
    stages: &[StagePlan],
    stage_id: u32,
    join: &HashJoinExec,
    path: &[usize],
) -> Vec<(u32, ScanColumn)> {
    let Some((build_stage, probe_column)) = filtering_build_side(join) else {
        return Vec::new();
    };
    let mut probe_path = path.to_vec();
    probe_path.push(1);
    let single_consumer = |scan: &ScanColumn| {
        scan.crossed
            .iter()
            .all(|id| stages.iter().filter(|s| s.inputs.contains(id)).count() == 1)
    };
    trace(stages, stage_id, join.right(), probe_column, probe_path)
        .into_iter()
        .filter(|scan| scan.saves_work && single_consumer(scan) && scan.stage != build_stage)
        .map(|scan| (build_stage, scan))
        .collect()
}

/// The build stage of `join` and the column of its first probe key, if the
/// build side's keys may filter the probe side: its type and null handling
/// drop unmatched probe rows, and its build side is a whole stage.
fn filtering_build_side(join: &HashJoinExec) -> Option<(u32, usize)> {
    // Not a mark join, nor an anti join with `NOT IN` semantics: a null
    // probe key changes their answer, and the filter would drop it.
    let drops_unmatched_probe_rows = matches!(
        join.join_type(),
        JoinType::Inner
            | JoinType::Left
            | JoinType::LeftSemi
            | JoinType::LeftAnti
            | JoinType::RightSemi
    );
    if !drops_unmatched_probe_rows
        || join.null_aware
        || join.null_equality() != NullEquality::NullEqualsNothing
    {
        return None;
    }
    let build_stage = whole_stage(join.left())?;
    let (_, probe_key) = join.on().first()?;
    let probe_column = probe_key.downcast_ref::<Column>()?.index();
    Some((build_stage, probe_column))
}

/// The stage that `plan` reads whole: a shuffle reader, maybe coalesced.
/// Not a coalesce with a limit: which rows it keeps depends on which arrive
/// first, so another read of the stage could keep others.
fn whole_stage(plan: &Arc<dyn ExecutionPlan>) -> Option<u32> {
    if plan.fetch().is_some() {
        return None;
    }
    let reader = match plan.downcast_ref::<CoalescePartitionsExec>() {
        Some(coalesce) => coalesce.input(),
        None => plan,
    };
    reader
        .downcast_ref::<ShuffleReaderExec>()
        .map(ShuffleReaderExec::stage_id)
}

/// Follows column `column` of `plan` (at `path` in stage `stage_id`) down to
/// the file scans it comes from unchanged, across stage boundaries. At an
/// inner join on that column, the other side's key holds the same value in
/// every row the join outputs, so the scan it comes from is followed too.
fn trace(
    stages: &[StagePlan],
    stage_id: u32,
    plan: &Arc<dyn ExecutionPlan>,
    column: usize,
    path: Vec<usize>,
) -> Vec<ScanColumn> {
    let down = |child: usize, column: usize, saves_work: bool| {
        let mut child_path = path.clone();
        child_path.push(child);
        let input = Arc::clone(plan.children()[child]);
        let mut scans = trace(stages, stage_id, &input, column, child_path);
        for scan in &mut scans {
            scan.saves_work |= saves_work;
        }
        scans
    };
    // A limit keeps some rows: filtering below it would change which.
    if plan.fetch().is_some() {
        return Vec::new();
    }
    if plan.downcast_ref::<DataSourceExec>().is_some() {
        return vec![ScanColumn {
            stage: stage_id,
            path,
            column,
            crossed: Vec::new(),
            saves_work: false,
        }];
    }
    if let Some(projection) = plan.downcast_ref::<ProjectionExec>() {
        return projection
            .expr()
            .get(column)
            .and_then(|projected| column_index(&projected.expr))
            .map(|input_column| down(0, input_column, false))
            .unwrap_or_default();
    }
    if let Some(filter) = plan.downcast_ref::<FilterExec>() {
        let column = match filter.projection() {
            Some(projection) => match projection.get(column) {
                Some(column) => *column,
                None => return Vec::new(),
            },
            None => column,
        };
        return down(0, column, false);
    }
    if let Some(aggregate) = plan.downcast_ref::<AggregateExec>() {
        let groups = aggregate.group_expr();
        if !groups.is_single() {
            return Vec::new();
        }
        return groups
            .expr()
            .get(column)
            .and_then(|(expr, _)| column_index(expr))
            .map(|input_column| down(0, input_column, true))
            .unwrap_or_default();
    }
    if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
        return trace_inner_join(join, column)
            .into_iter()
            .flat_map(|(child, column)| down(child, column, false))
            .collect();
    }
    if let Some(reader) = plan.downcast_ref::<ShuffleReaderExec>() {
        let Some(input) = stages.iter().find(|s| s.stage_id == reader.stage_id()) else {
            return Vec::new();
        };
        let root: Arc<dyn ExecutionPlan> = Arc::clone(&input.plan) as _;
        let mut scans = trace(stages, input.stage_id, &root, column, Vec::new());
        for scan in &mut scans {
            scan.crossed.push(input.stage_id);
            scan.saves_work = true;
        }
        return scans;
    }
    let keeps_rows = plan.downcast_ref::<CoalescePartitionsExec>().is_some()
        || plan.downcast_ref::<RepartitionExec>().is_some()
        || plan.downcast_ref::<ShuffleWriterExec>().is_some()
        || plan.downcast_ref::<SortExec>().is_some();
    if keeps_rows {
        return down(0, column, false);
    }
    Vec::new()
}

/// Where output column `column` of an inner join comes from, as (child,
/// column) pairs: its own side's column and, when that is an equi-join key,
/// the key it is joined with on the other side (same type, nulls matching
/// nothing, so both hold the same value in every output row).
fn trace_inner_join(join: &HashJoinExec, column: usize) -> Vec<(usize, usize)> {
    if join.join_type() != &JoinType::Inner {
        return Vec::new();
    }
    let column = match &join.projection {
        Some(projection) => match projection.get(column) {
            Some(column) => *column,
            None => return Vec::new(),
        },
        None => column,
    };
    let left_width = join.left().schema().fields().len();
    let (side, side_column) = if column < left_width {
        (0, column)
    } else {
        (1, column - left_width)
    };
    let mut sources = vec![(side, side_column)];
    if join.null_equality() != NullEquality::NullEqualsNothing {
        return sources;
    }
    let schemas = [join.left().schema(), join.right().schema()];
    for (left_key, right_key) in join.on() {
        let (Some(left), Some(right)) = (column_index(left_key), column_index(right_key)) else {
            continue;
        };
        let (own, other) = if side == 0 {
            (left, right)
        } else {
            (right, left)
        };
        let same_type = schemas[0].field(left).data_type() == schemas[1].field(right).data_type();
        if own == side_column && same_type {
            sources.push((1 - side, other));
        }
    }
    sources
}

fn column_index(expr: &Arc<dyn PhysicalExpr>) -> Option<usize> {
    expr.downcast_ref::<Column>().map(Column::index)
}

/// Whether semi-join reduction is on for a job's settings, and the largest
/// build side it reads into every task of the scan stage.
pub fn threshold_bytes(config: &ConfigOptions) -> Option<u64> {
    quiver_options(config)
        .semi_join_reduction
        .then_some(config.optimizer.hash_join_single_partition_threshold as u64)
}

/// The scan stage of `reduction` with its scan filtered by the build stage's
/// keys, from the stages as they are now. `None` when the join no longer
/// leads to that scan (an adaptive join rewrote the plans).
pub fn reduce(stages: &[StagePlan], reduction: &Reduction) -> Result<Option<StagePlan>> {
    let Some(join_stage) = stages.iter().find(|s| s.stage_id == reduction.join_stage) else {
        return Ok(None);
    };
    let root: Arc<dyn ExecutionPlan> = Arc::clone(&join_stage.plan) as _;
    let Some((build, scan)) = find_reduction(stages, reduction, &root, Vec::new()) else {
        return Ok(None);
    };
    let Some(scan_stage) = stages.iter().find(|s| s.stage_id == scan.stage) else {
        return Ok(None);
    };
    let build_key = build.key;
    let build: Arc<dyn ExecutionPlan> = match build.plan.downcast_ref::<CoalescePartitionsExec>() {
        Some(_) => build.plan,
        None => Arc::new(CoalescePartitionsExec::new(build.plan)),
    };
    let root: Arc<dyn ExecutionPlan> = Arc::clone(&scan_stage.plan) as _;
    let filtered = replace_at(&root, &scan.path, &|scan_plan| {
        let scan_key = Column::new(scan_plan.schema().field(scan.column).name(), scan.column);
        let semi = HashJoinExec::try_new(
            Arc::clone(&build),
            scan_plan,
            vec![(Arc::clone(&build_key), Arc::new(scan_key) as _)],
            None,
            &JoinType::RightSemi,
            None,
            PartitionMode::CollectLeft,
            NullEquality::NullEqualsNothing,
            false,
        )?;
        Ok(Arc::new(semi) as _)
    })?;
    let writer = filtered
        .downcast_ref::<ShuffleWriterExec>()
        .ok_or_else(|| {
            DataFusionError::Internal(format!("stage {} has no writer at its root", scan.stage))
        })?;
    let plan = Arc::new(ShuffleWriterExec::new(
        writer.job_id(),
        writer.stage_id(),
        Arc::clone(writer.input()),
        writer.partitioning().cloned(),
    ));
    let mut inputs = Vec::new();
    collect_reader_stages(plan.input(), &mut inputs);
    Ok(Some(StagePlan {
        stage_id: scan.stage,
        plan,
        inputs,
    }))
}

/// What a reduction needs of its join: the build side and its key.
struct BuildSide {
    plan: Arc<dyn ExecutionPlan>,
    key: Arc<dyn PhysicalExpr>,
}

/// The build side of the join of `reduction` under `plan`, and the scan it
/// leads to.
fn find_reduction(
    stages: &[StagePlan],
    reduction: &Reduction,
    plan: &Arc<dyn ExecutionPlan>,
    path: Vec<usize>,
) -> Option<(BuildSide, ScanColumn)> {
    if let Some(join) = plan.downcast_ref::<HashJoinExec>()
        && let Some((_, scan)) = reducible_join(stages, reduction.join_stage, join, &path)
            .into_iter()
            .find(|(build_stage, scan)| {
                *build_stage == reduction.build_stage && scan.stage == reduction.scan_stage
            })
    {
        let build = BuildSide {
            plan: Arc::clone(join.left()),
            key: Arc::clone(&join.on()[0].0),
        };
        return Some((build, scan));
    }
    plan.children()
        .into_iter()
        .enumerate()
        .find_map(|(index, child)| {
            let mut child_path = path.clone();
            child_path.push(index);
            find_reduction(stages, reduction, child, child_path)
        })
}

/// `plan` with the node at `path` (child indices) replaced by `replace(node)`.
fn replace_at(
    plan: &Arc<dyn ExecutionPlan>,
    path: &[usize],
    replace: &dyn Fn(Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let Some((first, rest)) = path.split_first() else {
        return replace(Arc::clone(plan));
    };
    let mut children: Vec<Arc<dyn ExecutionPlan>> = plan.children().into_iter().cloned().collect();
    let child = children
        .get_mut(*first)
        .ok_or_else(|| DataFusionError::Internal(format!("no child {first} in {}", plan.name())))?;
    *child = replace_at(child, rest, replace)?;
    replace_children_if_necessary(Arc::clone(plan), children)
}

/// The stages as they ran, given the reductions applied (after the adaptive
/// joins' rewrites). For `EXPLAIN ANALYZE`.
pub fn replay(stages: &[StagePlan], applied: &[Reduction]) -> Result<Vec<StagePlan>> {
    let mut stages = stages.to_vec();
    for reduction in applied {
        if let Some(rewritten) = reduce(&stages, reduction)?
            && let Some(stage) = stages
                .iter_mut()
                .find(|stage| stage.stage_id == rewritten.stage_id)
        {
            *stage = rewritten;
        }
    }
    Ok(stages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adaptive::adaptive_joins;
    use crate::adaptive::tests::{stages_of_tables, stages_planned, stages_with_broadcast_rows};
    use crate::build_stage::StagedBuildSides;
    use crate::stages::display_stages;

    /// Q17's shape: a filtered side compared with an aggregate of the other
    /// table grouped by the join key, in a correlated subquery.
    const JOIN_WITH_AGGREGATE: &str = "SELECT sum(d.v) FROM dims d WHERE d.v > 10 \
         AND d.v < (SELECT sum(f.v) FROM facts f WHERE f.k = d.k)";

    fn rendered(stage: &StagePlan) -> String {
        datafusion::physical_plan::displayable(stage.plan.as_ref())
            .indent(false)
            .to_string()
    }

    #[tokio::test]
    async fn a_scan_under_an_aggregate_is_filtered_by_the_join_build_side() {
        // A larger `facts`, so that the filtered `dims` is the build side.
        let stages = stages_of_tables(JOIN_WITH_AGGREGATE, 50).await;
        let shown = display_stages(&stages);
        let found = reductions(&stages, &adaptive_joins(&stages));
        let [reduction] = found.as_slice() else {
            panic!("one reduction expected in\n{shown}");
        };
        let scan_stage = &stages[reduction.scan_stage as usize - 1];
        assert!(
            rendered(scan_stage).contains("AggregateExec: mode=Partial"),
            "the scan below the aggregate waits: {shown}"
        );
        let reduced = reduce(&stages, reduction)
            .expect("rewrite")
            .expect("the join still leads to the scan");
        let text = rendered(&reduced);
        assert!(text.contains("join_type=RightSemi"), "{text}");
        assert!(text.contains("mode=CollectLeft"), "{text}");
        assert!(reduced.inputs.contains(&reduction.build_stage), "{text}");
        assert_eq!(
            reduced.plan.input().schema(),
            scan_stage.plan.input().schema(),
            "the plan above the scan sees the same columns"
        );
        let replayed = replay(&stages, &[*reduction]).expect("replay");
        assert_eq!(rendered(&replayed[reduction.scan_stage as usize - 1]), text);
    }

    /// Q18's shape: the keys of a small aggregate filter a join of two large
    /// sides on `join_on`; the subquery's keys are compared with `a.k`.
    fn filtered_join(join_on: &str) -> String {
        format!(
            "SELECT a.k, sum(b.v) FROM facts a JOIN facts b ON {join_on} \
             WHERE a.k IN (SELECT k FROM dims GROUP BY k HAVING sum(v) > 25) GROUP BY a.k"
        )
    }

    #[tokio::test]
    async fn both_sides_of_an_inner_join_on_the_key_are_filtered() {
        let sql = filtered_join("a.k = b.k");
        // The subquery broadcast, or partitioned with a stage of its own.
        let broadcast = stages_with_broadcast_rows(&sql, 50, 10).await;
        let staged = stages_planned(&sql, 50, 0, vec![Arc::new(StagedBuildSides)]).await;
        for stages in [broadcast, staged] {
            both_sides_filtered(&stages);
        }
    }

    fn both_sides_filtered(stages: &[StagePlan]) {
        let shown = display_stages(stages);
        let found = reductions(stages, &adaptive_joins(stages));
        let scan_stages: HashSet<u32> = found.iter().map(|r| r.scan_stage).collect();
        assert_eq!(found.len(), 2, "{found:?} in\n{shown}");
        assert_eq!(scan_stages.len(), 2, "{found:?} in\n{shown}");
        assert_eq!(found[0].build_stage, found[1].build_stage, "{shown}");
        for reduction in &found {
            let reduced = reduce(stages, reduction)
                .expect("rewrite")
                .expect("the join still leads to the scan");
            assert!(
                rendered(&reduced).contains("join_type=RightSemi"),
                "{shown}"
            );
        }
        let replayed = replay(stages, &found).expect("replay");
        for reduction in &found {
            let text = rendered(&replayed[reduction.scan_stage as usize - 1]);
            assert!(text.contains("join_type=RightSemi"), "{text}");
        }
    }

    #[tokio::test]
    async fn a_join_that_can_broadcast_its_build_side_is_not_also_a_reduction() {
        // The join reads two whole stages: the adaptive join decides it, and
        // a reduction between the same stages would only hold the scan.
        let sql = "SELECT a.k, b.v FROM dims a JOIN facts b ON a.k = b.k";
        let stages = stages_of_tables(sql, 50).await;
        let adaptive = adaptive_joins(&stages);
        assert_eq!(adaptive.len(), 1, "{}", display_stages(&stages));
        assert_eq!(reductions(&stages, &adaptive), vec![]);
    }

    #[tokio::test]
    async fn a_join_on_another_column_does_not_lead_to_the_other_side() {
        // `b` is joined on `a.v`, not on the key the subquery filters: only
        // `a`'s scan can be filtered by the subquery's keys.
        let stages = stages_with_broadcast_rows(&filtered_join("a.v = b.k"), 50, 10).await;
        let shown = display_stages(&stages);
        let found = reductions(&stages, &adaptive_joins(&stages));
        let by_subquery: Vec<_> = found
            .iter()
            .filter(|r| rendered(&stages[r.build_stage as usize - 1]).contains("sum(dims.v)"))
            .collect();
        assert_eq!(by_subquery.len(), 1, "{found:?} in\n{shown}");
    }

    #[test]
    fn a_build_side_limited_as_it_is_read_is_not_a_whole_stage() {
        use arrow::datatypes::{DataType, Field, Schema};
        use datafusion::physical_expr::EquivalenceProperties;
        use quiver_core::shuffle::ReadMode;

        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, true)]));
        let reader: Arc<dyn ExecutionPlan> = Arc::new(ShuffleReaderExec::new(
            "job",
            7,
            ReadMode::PerMap,
            2,
            EquivalenceProperties::new(schema),
        ));
        let coalesced = CoalescePartitionsExec::new(Arc::clone(&reader));
        assert_eq!(whole_stage(&reader), Some(7));
        assert_eq!(whole_stage(&(Arc::new(coalesced.clone()) as _)), Some(7));
        // Which row a limit keeps depends on which arrives first.
        let limited: Arc<dyn ExecutionPlan> = Arc::new(coalesced.with_fetch(Some(1)));
        assert_eq!(whole_stage(&limited), None);
    }

    #[tokio::test]
    async fn scans_whose_rows_a_join_keeps_are_not_filtered() {
        for sql in [
            // An anti join keeps the aggregate's unmatched rows.
            "SELECT f.k FROM (SELECT k, sum(v) AS total FROM facts GROUP BY k) f \
             WHERE f.k NOT IN (SELECT k FROM dims WHERE v > 10)",
            // `NOT IN`: a null in the subquery empties the answer, and the
            // filter would drop that null.
            "SELECT sum(d.v) FROM dims d WHERE d.v > 10 \
             AND d.k NOT IN (SELECT k FROM facts GROUP BY k)",
            // A limit under the join: filtering first would change its rows.
            "SELECT sum(a.total) FROM (SELECT k, sum(v) AS total FROM facts GROUP BY k LIMIT 3) a \
             WHERE a.k IN (SELECT k FROM dims WHERE v > 10)",
            // The key is computed, not a column of the scan.
            "SELECT sum(d.v) FROM dims d WHERE d.v > 10 \
             AND d.k IN (SELECT k + 1 FROM facts GROUP BY k + 1)",
        ] {
            let stages = stages_of_tables(sql, 50).await;
            let found = reductions(&stages, &adaptive_joins(&stages));
            assert_eq!(found, vec![], "{sql}\n{}", display_stages(&stages));
        }
    }
}
