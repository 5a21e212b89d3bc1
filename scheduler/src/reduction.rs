//! Semi-join reduction: the keys of a small stage that has run filter the
//! scan of a stage that has not, before its rows are aggregated, joined or
//! shuffled.
//!
//! In TPC-H Q17 the join that decides the answer has, on one side, the 2,044
//! parts of one brand and container (SF10), and on the other an aggregate of
//! all 60 M `lineitem` rows grouped by part. The aggregate does not know that
//! only those parts' groups will be kept. So, for each side of a hash join
//! whose rows without a key on the other side the join drops:
//!
//! - its key is followed down through projections, filters, inner joins,
//!   aggregate groups and shuffles to a column of a file scan in a stage that
//!   has not run, with an aggregate or a shuffle in between (the work to
//!   save);
//! - the other side's key is followed down through operators whose output
//!   values are some of their input's (projections, filters, any join, group
//!   columns, limits) to a column of another stage's output: every key the
//!   join can match is in it.
//!
//! The scan stage then waits for that key stage, unless the key stage is a
//! plain scan of a whole table, whose keys a foreign key always matches.
//! Once it has run and is small enough to read in every task of the scan's
//! stage (the rule of broadcast joins, [`crate::adaptive::AdaptivePolicy`]),
//! the scan is wrapped in a `RightSemi` hash join against the key column of
//! its whole output: only rows whose key it holds go on. The plan above is
//! unchanged, since a semi join keeps the scan's columns. In Q21 the late
//! lines of the orders of one nation's suppliers (735 k rows at SF10) filter
//! both `lineitem` scans of its `EXISTS` and its `NOT EXISTS`: the anti
//! join's side is filtered by the keys that its other side, a semi join,
//! took from them.
//!
//! This cannot change an answer: rows are removed only for key values that
//! the join drops anyway. That holds for the sides that a join drops
//! unmatched (both of inner and semi joins, the probe side of left and left
//! anti joins, the build side of right and right anti joins; never a full or
//! mark join, nor a `NOT IN` anti join, which a null key changes), with null
//! keys matching nothing, and when every operator between the join and the
//! scan keeps the key column's values: the path stops at anything else (a
//! limit, a window, a union, an outer join). An inner join on the key is
//! followed into both its sides: every row it outputs has the same value on
//! both, so in Q18 the 624 (SF10) order keys over the quantity threshold
//! filter `lineitem` as well as `orders` before they are shuffled to be
//! joined. Each stage on the way must feed only the next one, so that no
//! other reader loses rows. Where both sides of one join could be filtered
//! by the other's stage, the probe side is (DataFusion makes the smaller
//! side the build side), and the other would wait in a circle.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use datafusion::common::NullEquality;
use datafusion::common::config::ConfigOptions;
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::JoinType;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::limit::{GlobalLimitExec, LocalLimitExec};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::{ExecutionPlan, PhysicalExpr, replace_children_if_necessary};
use quiver_core::config::quiver_options;
use quiver_core::shuffle::{ShuffleReaderExec, ShuffleWriterExec};

use crate::adaptive::{AdaptiveJoin, AdaptivePolicy};
use crate::stages::StagePlan;

/// A scan that the keys of a join's other side can filter once the stage
/// they come from has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reduction {
    /// The stage of the join.
    pub join_stage: u32,
    /// The stage whose output holds the keys.
    pub key_stage: u32,
    /// The stage of the scan: it waits for the key stage.
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
/// waits for a key stage that waits for it, through inputs, `held` stages
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
        for (keys, scan) in reducible_joins(stages, stage.stage_id, &root, Vec::new()) {
            let key_stage = keys.stage;
            let reduction = Reduction {
                join_stage: stage.stage_id,
                key_stage,
                scan_stage: scan.stage,
            };
            let cycle = waits_for(&waits, key_stage, scan.stage);
            let repeated = found.iter().any(|r: &Reduction| r.scan_stage == scan.stage);
            // An adaptive join between the same stages broadcasts a build side
            // this small, and that join then filters the scan's rows itself.
            let adaptive_twin = adaptive.iter().any(|join| {
                join.join_stage == stage.stage_id
                    && join.build_stage == key_stage
                    && join.probe_stage == scan.stage
            });
            let whole_table = stages
                .iter()
                .find(|stage| stage.stage_id == key_stage)
                .is_some_and(writes_a_whole_table);
            if !cycle && !repeated && !adaptive_twin && !merged(key_stage) && !whole_table {
                waits.entry(scan.stage).or_default().push(key_stage);
                found.push(reduction);
            }
        }
    }
    found
}

/// Whether `stage` writes every row of the one table it reads: a file scan
/// with no predicate and no limit, under projections only. Its keys are then
/// all of that table's, and a scan joined to it by a foreign key (TPC-H Q13's
/// `orders` by `customer`) has no row that they would drop: the reduction
/// would make the scan wait and hash every row for nothing.
fn writes_a_whole_table(stage: &StagePlan) -> bool {
    let mut plan = stage.plan.input();
    while let Some(projection) = plan.downcast_ref::<ProjectionExec>() {
        plan = projection.input();
    }
    plan.downcast_ref::<DataSourceExec>()
        .and_then(|source| source.data_source().downcast_ref::<FileScanConfig>())
        .is_some_and(|scan| scan.limit.is_none() && scan.file_source().filter().is_none())
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

/// The joins under `plan` (at `path` in stage `stage_id`) whose keys can
/// filter a scan, with where the keys come from and that scan.
fn reducible_joins(
    stages: &[StagePlan],
    stage_id: u32,
    plan: &Arc<dyn ExecutionPlan>,
    path: Vec<usize>,
) -> Vec<(KeySource, ScanColumn)> {
    let mut found: Vec<(KeySource, ScanColumn)> = plan
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

/// Each scan that one side of `join` leads to, whose rows the keys of the
/// other side can filter, with the stage those keys come from.
fn reducible_join(
    stages: &[StagePlan],
    stage_id: u32,
    join: &HashJoinExec,
    path: &[usize],
) -> Vec<(KeySource, ScanColumn)> {
    let single_consumer = |scan: &ScanColumn| {
        scan.crossed
            .iter()
            .all(|id| stages.iter().filter(|s| s.inputs.contains(id)).count() == 1)
    };
    let mut found = Vec::new();
    for side in filtering_sides(join) {
        let mut side_path = path.to_vec();
        side_path.push(side.filtered_child);
        let filtered = Arc::clone(join.children()[side.filtered_child]);
        for scan in trace(stages, stage_id, &filtered, side.filtered_column, side_path) {
            if scan.saves_work && single_consumer(&scan) && scan.stage != side.keys.stage {
                found.push((side.keys.clone(), scan));
            }
        }
    }
    found
}

/// One side of a join whose rows can be filtered by the other side's keys.
struct FilteringSide {
    /// Where the other side's keys come from.
    keys: KeySource,
    /// The child (0 left, 1 right) whose rows the keys filter.
    filtered_child: usize,
    /// Its column of the join's first key.
    filtered_column: usize,
}

/// The sides of `join` whose rows without a key on the other side the join
/// drops (never a mark join, nor an anti join with `NOT IN` semantics: a
/// null there changes the answer, and the filter would drop it), where the
/// other side's keys come from another stage's output.
fn filtering_sides(join: &HashJoinExec) -> Vec<FilteringSide> {
    if join.null_aware || join.null_equality() != NullEquality::NullEqualsNothing {
        return Vec::new();
    }
    let Some((left_key, right_key)) = join.on().first() else {
        return Vec::new();
    };
    let (Some(left_column), Some(right_column)) = (column_index(left_key), column_index(right_key))
    else {
        return Vec::new();
    };
    let columns = [left_column, right_column];
    // The probe side first: DataFusion makes the smaller side the build
    // side, and a scan filtered by the other direction waits instead.
    [1, 0]
        .into_iter()
        .filter(|&filtered| drops_unmatched(join.join_type(), filtered))
        .filter_map(|filtered| {
            let other = 1 - filtered;
            Some(FilteringSide {
                keys: key_source(join.children()[other], columns[other])?,
                filtered_child: filtered,
                filtered_column: columns[filtered],
            })
        })
        .collect()
}

/// Whether a join of `join_type` drops the rows of child `side` (0 left,
/// 1 right) whose key the other side does not hold.
fn drops_unmatched(join_type: &JoinType, side: usize) -> bool {
    use JoinType::*;
    match side {
        0 => matches!(join_type, Inner | Right | LeftSemi | RightSemi | RightAnti),
        _ => matches!(join_type, Inner | Left | LeftSemi | RightSemi | LeftAnti),
    }
}

/// A column of a stage's output that holds every value (but nulls) that a
/// join key can take: a filter on it keeps every row the join can match.
#[derive(Clone)]
struct KeySource {
    stage: u32,
    /// A reader of that stage, as the join's stage has it.
    reader: Arc<dyn ExecutionPlan>,
    column: usize,
}

/// Follows column `column` of `plan` down through operators whose output
/// values come from their input (each a subset of it, nulls aside) to the
/// shuffle reader it is read from.
fn key_source(plan: &Arc<dyn ExecutionPlan>, column: usize) -> Option<KeySource> {
    if let Some(reader) = plan.downcast_ref::<ShuffleReaderExec>() {
        return Some(KeySource {
            stage: reader.stage_id(),
            reader: Arc::clone(plan),
            column,
        });
    }
    let (child, child_column) = if let Some(projection) = plan.downcast_ref::<ProjectionExec>() {
        (0, column_index(&projection.expr().get(column)?.expr)?)
    } else if let Some(filter) = plan.downcast_ref::<FilterExec>() {
        let column = match filter.projection() {
            Some(projection) => *projection.get(column)?,
            None => column,
        };
        (0, column)
    } else if let Some(aggregate) = plan.downcast_ref::<AggregateExec>() {
        let (expr, _) = aggregate.group_expr().expr().get(column)?;
        (0, column_index(expr)?)
    } else if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
        join_output_source(join, column)?
    } else if plan.downcast_ref::<CoalescePartitionsExec>().is_some()
        || plan.downcast_ref::<RepartitionExec>().is_some()
        || plan.downcast_ref::<SortExec>().is_some()
        || plan.downcast_ref::<SortPreservingMergeExec>().is_some()
        || plan.downcast_ref::<GlobalLimitExec>().is_some()
        || plan.downcast_ref::<LocalLimitExec>().is_some()
    {
        (0, column)
    } else {
        return None;
    };
    key_source(plan.children()[child], child_column)
}

/// The child (0 left, 1 right) and its column that output column `column`
/// of `join` is taken from; `None` for a mark join's mark.
fn join_output_source(join: &HashJoinExec, column: usize) -> Option<(usize, usize)> {
    let column = match &join.projection {
        Some(projection) => *projection.get(column)?,
        None => column,
    };
    let left_width = join.left().schema().fields().len();
    let right_width = join.right().schema().fields().len();
    use JoinType::*;
    match join.join_type() {
        Inner | Left | Right | Full if column < left_width => Some((0, column)),
        Inner | Left | Right | Full => Some((1, column - left_width)),
        LeftSemi | LeftAnti | LeftMark => (column < left_width).then_some((0, column)),
        RightSemi | RightAnti | RightMark => (column < right_width).then_some((1, column)),
    }
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
    let Some((side, side_column)) = join_output_source(join, column) else {
        return Vec::new();
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

/// When a key stage that has run filters a scan, for a job's settings:
/// by the same rule as a broadcast join's build side, since every task of
/// the scan's stage reads it whole. `None` when reduction is turned off.
pub fn policy(config: &ConfigOptions) -> Option<AdaptivePolicy> {
    quiver_options(config)
        .semi_join_reduction
        .then(|| AdaptivePolicy::of(config))
}

/// The scan stage of `reduction` with its scan filtered by the key stage's
/// keys, from the stages as they are now. `None` when the join no longer
/// leads to that scan (an adaptive join rewrote the plans).
pub fn reduce(stages: &[StagePlan], reduction: &Reduction) -> Result<Option<StagePlan>> {
    let Some(join_stage) = stages.iter().find(|s| s.stage_id == reduction.join_stage) else {
        return Ok(None);
    };
    let root: Arc<dyn ExecutionPlan> = Arc::clone(&join_stage.plan) as _;
    let Some((keys, scan)) = find_reduction(stages, reduction, &root, Vec::new()) else {
        return Ok(None);
    };
    let Some(scan_stage) = stages.iter().find(|s| s.stage_id == scan.stage) else {
        return Ok(None);
    };
    // Every partition of the key stage, and of its columns only the key.
    let key_name = keys.reader.schema().field(keys.column).name().clone();
    let key: Arc<dyn PhysicalExpr> = Arc::new(Column::new(&key_name, keys.column));
    let build: Arc<dyn ExecutionPlan> = Arc::new(ProjectionExec::try_new(
        [(key, key_name.clone())],
        Arc::new(CoalescePartitionsExec::new(keys.reader)),
    )?);
    let build_key: Arc<dyn PhysicalExpr> = Arc::new(Column::new(&key_name, 0));
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
    Ok(Some(scan_stage.with_input(Arc::clone(writer.input()))))
}

/// Where the keys of the join of `reduction` under `plan` come from, and
/// the scan they filter.
fn find_reduction(
    stages: &[StagePlan],
    reduction: &Reduction,
    plan: &Arc<dyn ExecutionPlan>,
    path: Vec<usize>,
) -> Option<(KeySource, ScanColumn)> {
    if let Some(join) = plan.downcast_ref::<HashJoinExec>()
        && let Some(found) = reducible_join(stages, reduction.join_stage, join, &path)
            .into_iter()
            .find(|(keys, scan)| {
                keys.stage == reduction.key_stage && scan.stage == reduction.scan_stage
            })
    {
        return Some(found);
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
        assert!(reduced.inputs.contains(&reduction.key_stage), "{text}");
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
        assert_eq!(found[0].key_stage, found[1].key_stage, "{shown}");
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
            .filter(|r| rendered(&stages[r.key_stage as usize - 1]).contains("sum(dims.v)"))
            .collect();
        assert_eq!(by_subquery.len(), 1, "{found:?} in\n{shown}");
    }

    /// Q21's shape: orders with a late line (`a`) that have another line
    /// (`b`) and no other late line (`c`).
    const EXISTS_AND_NOT_EXISTS: &str = "SELECT a.k, count(*) FROM facts a \
         WHERE a.v > 20 \
         AND EXISTS (SELECT 1 FROM facts b WHERE b.k = a.k AND b.v <> a.v) \
         AND NOT EXISTS (SELECT 1 FROM facts c WHERE c.k = a.k AND c.v < a.v) \
         GROUP BY a.k";

    #[tokio::test]
    async fn the_keys_a_semi_join_keeps_filter_the_side_of_an_anti_join() {
        let stages = stages_of_tables(EXISTS_AND_NOT_EXISTS, 50).await;
        let shown = display_stages(&stages);
        let found = reductions(&stages, &adaptive_joins(&stages));
        // Both subqueries' scans wait for the filtered `a`: the semi join's
        // other side, and the anti join's side that only matters where it
        // matches the semi join's output, whose keys all come from `a`.
        assert_eq!(found.len(), 2, "{found:?} in\n{shown}");
        let key_stage = &stages[found[0].key_stage as usize - 1];
        assert!(
            rendered(key_stage).contains("v@1 > 20"),
            "{found:?} in\n{shown}"
        );
        assert_eq!(found[0].key_stage, found[1].key_stage, "{shown}");
        assert_ne!(found[0].scan_stage, found[1].scan_stage, "{shown}");
        for reduction in &found {
            let reduced = reduce(&stages, reduction)
                .expect("rewrite")
                .expect("the join still leads to the scan");
            let text = rendered(&reduced);
            assert!(text.contains("join_type=RightSemi"), "{text}");
            assert!(reduced.inputs.contains(&reduction.key_stage), "{text}");
        }
    }

    #[test]
    fn only_rows_a_join_drops_unmatched_are_filtered() {
        use JoinType::*;
        let filtered = |join_type| {
            [0, 1]
                .into_iter()
                .filter(|&side| drops_unmatched(&join_type, side))
                .collect::<Vec<_>>()
        };
        assert_eq!(filtered(Inner), [0, 1]);
        assert_eq!(filtered(LeftSemi), [0, 1]);
        assert_eq!(filtered(RightSemi), [0, 1]);
        assert_eq!(filtered(Left), [1]);
        assert_eq!(
            filtered(LeftAnti),
            [1],
            "unmatched left rows are the answer"
        );
        assert_eq!(filtered(Right), [0]);
        assert_eq!(
            filtered(RightAnti),
            [0],
            "unmatched right rows are the answer"
        );
        assert_eq!(filtered(Full), Vec::<usize>::new());
        assert_eq!(filtered(LeftMark), Vec::<usize>::new());
        assert_eq!(filtered(RightMark), Vec::<usize>::new());
    }

    #[test]
    fn keys_come_from_the_reader_under_operators_that_keep_their_values() {
        use arrow::datatypes::{DataType, Field, Schema};
        use datafusion::logical_expr::Operator;
        use datafusion::physical_expr::EquivalenceProperties;
        use datafusion::physical_plan::expressions::{BinaryExpr, lit};
        use quiver_core::shuffle::ReadMode;

        let schema = Arc::new(Schema::new(vec![
            Field::new("v", DataType::Int64, true),
            Field::new("k", DataType::Int64, true),
        ]));
        let reader: Arc<dyn ExecutionPlan> = Arc::new(ShuffleReaderExec::new(
            "job",
            7,
            ReadMode::PerMap,
            2,
            EquivalenceProperties::new(schema),
        ));
        let source = |plan: Arc<dyn ExecutionPlan>, column| {
            key_source(&plan, column).map(|keys| (keys.stage, keys.column))
        };
        assert_eq!(source(Arc::clone(&reader), 1), Some((7, 1)));
        // A limit keeps some of the values: all of them still filter.
        let limited = CoalescePartitionsExec::new(Arc::clone(&reader)).with_fetch(Some(1));
        assert_eq!(source(Arc::new(limited), 1), Some((7, 1)));
        let k: Arc<dyn PhysicalExpr> = Arc::new(Column::new("k", 1));
        let k_plus_one: Arc<dyn PhysicalExpr> =
            Arc::new(BinaryExpr::new(Arc::clone(&k), Operator::Plus, lit(1i64)));
        let projection = |expr| {
            Arc::new(
                ProjectionExec::try_new([(expr, "key".to_owned())], Arc::clone(&reader))
                    .expect("projection"),
            ) as Arc<dyn ExecutionPlan>
        };
        assert_eq!(source(projection(k), 0), Some((7, 1)));
        assert_eq!(source(projection(k_plus_one), 0), None, "a computed key");
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
            // `dims` may be filtered by the keys of the other side (with the
            // limit, its three); the rows of `facts` must all go on.
            let facts_filtered: Vec<_> = found
                .iter()
                .filter(|r| rendered(&stages[r.scan_stage as usize - 1]).contains("[50, 50]"))
                .collect();
            assert_eq!(
                facts_filtered,
                Vec::<&Reduction>::new(),
                "{sql}\n{}",
                display_stages(&stages)
            );
        }
    }
}
