//! Joins a filtered dimension with the one table it describes before the
//! rest of a tree of inner joins.
//!
//! DataFusion joins in the query's order. In TPC-H Q21 (`from supplier,
//! lineitem l1, orders, nation ... and n_name = 'SAUDI ARABIA'`) that joins
//! every late `lineitem` row with its supplier and then its order, and only
//! then does the nation drop 96 % of them. Here, in each tree of inner
//! equi-joins, an input that a filter shrinks (by DataFusion's estimates),
//! that has join keys with one other input only, and that is the smaller of
//! the two, is joined with that input first. The pair is then a filtered
//! input in its turn: a region filters its nations, and those nations their
//! suppliers (Q5, Q8). The other joins keep their order, conditions that
//! read several inputs (Q7's pair of nations) go to the lowest join that has
//! them all, and the tree gives its parent the same columns as before.
//! Nothing moves onto the tree's largest input: its joins keep the query's
//! order. A filtered input whose one join is with the largest input, on a
//! key that the largest joins one other input on, also filters that input
//! with a semi join: in Q9 the parts of one colour keep only their
//! `partsupp` rows (both join `lineitem` on `l_partkey`), which are then few
//! enough to broadcast instead of shuffling all of `partsupp`.
//!
//! The filtered input becomes a join's build side, so its estimate must be
//! within what a join may broadcast (`quiver.broadcast_join_max_bytes`, or
//! DataFusion's `hash_join_single_partition_threshold` if larger). An input
//! without estimates stays where it is. Inner joins commute, so the answer cannot change: every
//! condition is still applied, each to the same rows.

use std::sync::Arc;

use arrow::datatypes::Schema;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::Result;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::{Expr, JoinType, LogicalPlan, LogicalPlanBuilder};
use datafusion::optimizer::OptimizerRule;
use datafusion::optimizer::optimize_projections::OptimizeProjections;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};
use futures::future::BoxFuture;
use quiver_core::config::quiver_options;
use tracing::debug;

use crate::join_tree::{
    Condition, Inputs, JoinTree, equi_join, is_column_selection, is_inner_equi_join, is_subset,
};

/// Reorders the inner join trees of an optimized plan; see the module
/// documentation. The plan is returned unchanged when `quiver.reorder_joins`
/// is off.
pub async fn reorder_joins(plan: LogicalPlan, state: &SessionState) -> Result<LogicalPlan> {
    let options = quiver_options(state.config().options());
    if !options.reorder_joins {
        return Ok(plan);
    }
    let broadcast_threshold = state
        .config()
        .options()
        .optimizer
        .hash_join_single_partition_threshold as u64;
    let context = Context {
        state,
        max_build_bytes: options.broadcast_join_max_bytes.max(broadcast_threshold) as f64,
    };
    let ordered = rewrite(plan, false, &context).await?;
    if !ordered.transformed {
        return Ok(ordered.data);
    }
    // Moved joins carry every column of their inputs; DataFusion's rule
    // drops the ones nothing above reads, as it did before.
    Ok(OptimizeProjections::new()
        .rewrite(ordered.data, state)?
        .data)
}

struct Context<'a> {
    state: &'a SessionState,
    /// The largest estimate of an input that is moved.
    max_build_bytes: f64,
}

/// Rewrites the trees in `plan`, deepest first. `within_tree` says that the
/// parent belongs to the same tree, which is then reordered from its root.
fn rewrite<'a>(
    plan: LogicalPlan,
    within_tree: bool,
    context: &'a Context<'a>,
) -> BoxFuture<'a, Result<Transformed<LogicalPlan>>> {
    Box::pin(async move {
        let children_within_tree = match &plan {
            LogicalPlan::Join(join) => is_inner_equi_join(join),
            LogicalPlan::Projection(projection) => within_tree && is_column_selection(projection),
            _ => false,
        };
        let mut children = Vec::new();
        for child in plan.inputs() {
            children.push(rewrite(child.clone(), children_within_tree, context).await?);
        }
        let plan = if children.iter().any(|child| child.transformed) {
            let mut children = children.into_iter();
            plan.map_children(|_| {
                let child = children.next().expect("one per input");
                Ok(Transformed::yes(child.data))
            })?
        } else {
            Transformed::no(plan)
        };
        let LogicalPlan::Join(join) = &plan.data else {
            return Ok(plan);
        };
        if within_tree || !is_inner_equi_join(join) {
            return Ok(plan);
        }
        let Some(tree) = JoinTree::collect(&plan.data, 3) else {
            return Ok(plan);
        };
        Ok(match tree.reorder(context).await? {
            Some(ordered) => Transformed::yes(ordered),
            None => plan,
        })
    })
}

impl JoinTree {
    /// The tree with filtered inputs joined first, or `None` when none moves.
    async fn reorder(self, context: &Context<'_>) -> Result<Option<LogicalPlan>> {
        let mut groups = Vec::with_capacity(self.inputs.len());
        for (number, input) in self.inputs.iter().enumerate() {
            let Some(estimate) = estimate(input, context.state).await? else {
                debug!(input = number, "no estimate: the join tree keeps its order");
                return Ok(None);
            };
            groups.push(Some(Group {
                plan: input.clone(),
                members: 1 << number,
                estimate,
            }));
        }
        let mut placed = vec![false; self.conditions.len()];
        let mut moved = false;
        while let Some((from, into)) = self.next_move(&groups, &placed, context) {
            let filtered = groups[from].take().expect("a group that moves exists");
            let host = groups[into].take().expect("the host group exists");
            debug!(
                filtered = %filtered.members,
                host = %host.members,
                rows = filtered.estimate.rows,
                selectivity = filtered.estimate.selectivity,
                "joining a filtered input first"
            );
            let Some(joined) = self.join(filtered, host, &mut placed)? else {
                return Ok(None);
            };
            groups[into] = Some(joined);
            moved = true;
        }
        for semi in self.semi_filters(&groups, &placed, context) {
            let filter = groups[semi.filter].as_ref().map(|group| group.plan.clone());
            let (Some(filter), Some(host)) = (filter, groups[semi.host].as_mut()) else {
                continue;
            };
            debug!(
                filter = semi.filter,
                host = semi.host,
                "filtering an input by the keys of a filtered input"
            );
            host.plan = equi_join(
                host.plan.clone(),
                filter,
                vec![(semi.host_key, semi.filter_key)],
                None,
                JoinType::LeftSemi,
            )?;
            moved = true;
        }
        if !moved {
            return Ok(None);
        }
        let Some((plan, _)) = self.rebuild(
            &self.shape,
            &mut |number| {
                groups[number]
                    .take()
                    .map(|group| (group.plan, group.members))
            },
            &mut placed,
        )?
        else {
            return Ok(None);
        };
        if placed.contains(&false) {
            return Ok(None);
        }
        let columns = self.output.columns().into_iter().map(Expr::Column);
        Ok(Some(
            LogicalPlanBuilder::from(plan).project(columns)?.build()?,
        ))
    }

    /// The filtered inputs that stay where they are but whose keys filter
    /// another group (a semi join): those whose one pair of keys joins them
    /// with the largest group, on a key that the largest joins exactly one
    /// other group on, larger than they are. In Q9 `part` and `partsupp`
    /// both join `lineitem` on `l_partkey`, so only the `partsupp` rows of
    /// parts of the colour asked for can meet a `lineitem` row: they are
    /// then few enough to broadcast, instead of all of `partsupp` and the
    /// joined `lineitem` rows being shuffled to meet. A semi join adds no
    /// rows, whatever the keys, and the filter keeps its own join. The filter
    /// then runs twice, so only one that gives the same rows each time
    /// ([`repeatable`]) is used.
    fn semi_filters(
        &self,
        groups: &[Option<Group>],
        placed: &[bool],
        context: &Context<'_>,
    ) -> Vec<SemiFilter> {
        let Some(largest) = largest_group(groups) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for (number, group) in groups.iter().enumerate() {
            let Some(group) = group else {
                continue;
            };
            let estimate = &group.estimate;
            // A group of several inputs would be joined a second time.
            if number == largest
                || group.members.count_ones() != 1
                || estimate.selectivity >= 1.0
                || estimate.bytes > context.max_build_bytes
                || !repeatable(&group.plan)
            {
                continue;
            }
            let mut own = self
                .unplaced_keys(placed)
                .filter(|condition| condition.inputs() & group.members != 0);
            let (Some(own_keys), None) = (own.next(), own.next()) else {
                continue;
            };
            let Some([(filter_key, _), (largest_key, largest_inputs)]) =
                own_keys.sides_from(group.members)
            else {
                continue;
            };
            if owner(groups, largest_inputs) != Some(largest) {
                continue;
            }
            let hosts: Vec<(usize, &Expr)> = self
                .unplaced_keys(placed)
                .filter(|condition| condition.inputs() & group.members == 0)
                .filter_map(|condition| {
                    let (host_key, host_inputs) = condition.paired_with(largest_key)?;
                    let host = owner(groups, host_inputs)?;
                    (host != largest).then_some((host, host_key))
                })
                .collect();
            let Some(&(host, host_key)) = hosts.first() else {
                continue;
            };
            let one_host = hosts.iter().all(|(other, _)| *other == host);
            let larger = groups[host]
                .as_ref()
                .is_some_and(|host| host.estimate.rows > estimate.rows);
            if one_host && larger {
                found.push(SemiFilter {
                    filter: number,
                    host,
                    filter_key: filter_key.clone(),
                    host_key: host_key.clone(),
                });
            }
        }
        found
    }

    /// The pairs of keys not yet placed.
    fn unplaced_keys<'a>(&'a self, placed: &'a [bool]) -> impl Iterator<Item = &'a Condition> {
        self.conditions
            .iter()
            .zip(placed)
            .filter(|(condition, placed)| !**placed && matches!(condition, Condition::Keys { .. }))
            .map(|(condition, _)| condition)
    }

    /// The next filtered group to join with its only neighbour, and that
    /// neighbour: of those that may move, the one that keeps the smallest
    /// share of its rows. Nothing moves onto the largest group (the facts,
    /// usually): its joins keep the query's order, which a move by
    /// estimates would upset where a filter's estimate is far off (in Q8,
    /// DataFusion takes 20 % of parts for one type, where 0.7 % pass).
    fn next_move(
        &self,
        groups: &[Option<Group>],
        placed: &[bool],
        context: &Context<'_>,
    ) -> Option<(usize, usize)> {
        let largest = largest_group(groups);
        let moves = groups.iter().enumerate().filter_map(|(number, group)| {
            let group = group.as_ref()?;
            let estimate = &group.estimate;
            if estimate.selectivity >= 1.0 || estimate.bytes > context.max_build_bytes {
                return None;
            }
            let neighbour = self.only_neighbour(groups, placed, group.members)?;
            let host = groups[neighbour].as_ref()?;
            (Some(neighbour) != largest && estimate.rows < host.estimate.rows).then_some((
                estimate.selectivity,
                number,
                neighbour,
            ))
        });
        moves
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, number, neighbour)| (number, neighbour))
    }

    /// The one group that the group of `members` has pairs of keys with,
    /// among the conditions not yet placed. `None` when there is none, or
    /// more than one, or a pair reads several groups on a side.
    fn only_neighbour(
        &self,
        groups: &[Option<Group>],
        placed: &[bool],
        members: Inputs,
    ) -> Option<usize> {
        let mut neighbour = None;
        for condition in self
            .unplaced_keys(placed)
            .filter(|condition| condition.inputs() & members != 0)
        {
            let other = owner(groups, condition.keys_to(members)?)?;
            if neighbour.is_some_and(|neighbour| neighbour != other) {
                return None;
            }
            neighbour = Some(other);
        }
        neighbour
    }

    /// `filtered` joined with `host`, on every condition that reads only
    /// their inputs. `None` when no pair of keys spans them.
    fn join(&self, filtered: Group, host: Group, placed: &mut [bool]) -> Result<Option<Group>> {
        let members = filtered.members | host.members;
        let Some(plan) = self.join_plans(
            (filtered.plan, filtered.members),
            (host.plan, host.members),
            placed,
        )?
        else {
            return Ok(None);
        };
        // Keys are taken to be a foreign key and the key it refers to: the
        // host keeps the share of its rows that the filter keeps.
        let selectivity = filtered.estimate.selectivity;
        Ok(Some(Group {
            plan,
            members,
            estimate: Estimate {
                rows: host.estimate.rows * selectivity,
                bytes: host.estimate.bytes * selectivity,
                selectivity: host.estimate.selectivity * selectivity,
            },
        }))
    }
}

/// The group that holds all of `inputs`, if one does.
fn owner(groups: &[Option<Group>], inputs: Inputs) -> Option<usize> {
    groups.iter().position(|group| {
        group
            .as_ref()
            .is_some_and(|group| is_subset(inputs, group.members))
    })
}

/// The group with the most rows by its estimate.
fn largest_group(groups: &[Option<Group>]) -> Option<usize> {
    groups
        .iter()
        .enumerate()
        .filter_map(|(number, group)| Some((number, group.as_ref()?.estimate.rows)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(number, _)| number)
}

/// Whether `plan` gives the same rows each time it runs: a scan, filtered
/// and projected by expressions that are not volatile (`random()`). A
/// `LIMIT` (with an `ORDER BY` that has ties, or none) or any other
/// operator may choose its rows differently each time.
fn repeatable(plan: &LogicalPlan) -> bool {
    let varies = plan.exists(|node| {
        let kept = matches!(
            node,
            LogicalPlan::TableScan(_)
                | LogicalPlan::Filter(_)
                | LogicalPlan::Projection(_)
                | LogicalPlan::SubqueryAlias(_)
        );
        Ok(!kept || node.expressions().iter().any(Expr::is_volatile))
    });
    // The check returns no error; were there one, the plan is not relied on.
    !varies.unwrap_or(true)
}

/// A group whose keys filter another: the host's rows are semi-joined with
/// the filter's on `host_key = filter_key`.
struct SemiFilter {
    filter: usize,
    host: usize,
    filter_key: Expr,
    host_key: Expr,
}

/// Inputs joined so far: one, or one with the filtered inputs moved onto it.
struct Group {
    plan: LogicalPlan,
    members: Inputs,
    estimate: Estimate,
}

/// DataFusion's estimate of an input.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Estimate {
    pub(crate) rows: f64,
    bytes: f64,
    /// The share of the rows read from its sources that it keeps.
    selectivity: f64,
}

/// Estimates `input` from its physical plan, if DataFusion can.
pub(crate) async fn estimate(
    input: &LogicalPlan,
    state: &SessionState,
) -> Result<Option<Estimate>> {
    let physical = state
        .query_planner()
        .create_physical_plan(input, state)
        .await?;
    statistics_estimate(&physical)
}

fn statistics_estimate(physical: &Arc<dyn ExecutionPlan>) -> Result<Option<Estimate>> {
    let context = StatisticsContext::new();
    let statistics = context.compute(physical.as_ref(), &StatisticsArgs::new())?;
    let Some(&rows) = statistics.num_rows.get_value() else {
        return Ok(None);
    };
    let bytes = match statistics.total_byte_size.get_value() {
        Some(&bytes) => bytes as f64,
        // Parquet sizes only fixed-width columns.
        None => rows as f64 * row_width(&physical.schema()),
    };
    let mut scanned = 0usize;
    let mut known = true;
    physical.apply(|node| {
        if node.children().is_empty() {
            let source = context.compute(node.as_ref(), &StatisticsArgs::new())?;
            match source.num_rows.get_value() {
                Some(&rows) => scanned = scanned.saturating_add(rows),
                None => known = false,
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let selectivity = if known && scanned > 0 {
        (rows as f64 / scanned as f64).min(1.0)
    } else {
        1.0
    };
    Ok(Some(Estimate {
        rows: rows as f64,
        bytes,
        selectivity,
    }))
}

/// Bytes in a row of `schema`, taking a value of variable width for
/// [`VARIABLE_WIDTH`] bytes.
fn row_width(schema: &Schema) -> f64 {
    schema
        .fields()
        .iter()
        .map(|field| {
            field
                .data_type()
                .primitive_width()
                .unwrap_or(VARIABLE_WIDTH) as f64
        })
        .sum()
}

/// The width taken for a string, a binary or a nested value: TPC-H's names
/// and comments average 15 to 70 characters.
const VARIABLE_WIDTH: usize = 32;

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use datafusion::prelude::{SessionConfig, SessionContext};
    use quiver_core::config::QuiverOptions;

    use super::*;
    use crate::join_tree::tests::{answer, scanned_tables};

    /// A snowflake: `facts` refer to `dims`, which refer to `subs`, which
    /// refer to `regions`; `others` is a second dimension of `facts`. Each
    /// level is ten times smaller than the one it describes.
    async fn snowflake(reorder: bool) -> SessionContext {
        let mut options = QuiverOptions::default();
        options.reorder_joins = reorder;
        let config = SessionConfig::new()
            .with_target_partitions(2)
            .with_option_extension(options);
        let context = SessionContext::new_with_config(config);
        let table = |name: &str, rows: i64, refers: i64| {
            let ids: Vec<i64> = (0..rows).collect();
            let references: Vec<i64> = ids.iter().map(|id| id % refers).collect();
            let names: Vec<String> = ids.iter().map(|id| format!("{name}{}", id % 3)).collect();
            let batch = RecordBatch::try_from_iter(vec![
                ("id", Arc::new(Int64Array::from(ids)) as _),
                ("ref", Arc::new(Int64Array::from(references)) as _),
                ("name", Arc::new(StringArray::from(names)) as _),
            ])
            .expect("batch");
            context.register_batch(name, batch).expect("register");
        };
        table("facts", 10_000, 1_000);
        table("dims", 1_000, 100);
        table("subs", 100, 10);
        table("regions", 10, 10);
        table("others", 1_000, 100);
        context
    }

    /// The optimized plan of `sql`, reordered, with its answer and the answer
    /// of the plan as optimized.
    async fn reordered(context: &SessionContext, sql: &str) -> (LogicalPlan, LogicalPlan, String) {
        let state = context.state();
        let logical = state.create_logical_plan(sql).await.expect("plan");
        let optimized = state.optimize(&logical).expect("optimize");
        let ordered = reorder_joins(optimized.clone(), &state)
            .await
            .expect("reorder");
        let expected = answer(&state, optimized.clone()).await;
        let answer = answer(&state, ordered.clone()).await;
        assert_eq!(answer, expected, "the reordered plan answers differently");
        (optimized, ordered, answer)
    }

    /// The tables read under the smallest join that reads all of `tables`.
    fn tables_joined_with(plan: &LogicalPlan, tables: &[&str]) -> Vec<String> {
        let mut smallest: Option<Vec<String>> = None;
        plan.apply(|node| {
            if let LogicalPlan::Join(_) = node {
                let read = scanned_tables(node);
                if tables.iter().all(|t| read.iter().any(|r| r == t))
                    && smallest.as_ref().is_none_or(|s| read.len() < s.len())
                {
                    smallest = Some(read);
                }
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .expect("walk");
        smallest.expect("a join of those tables")
    }

    const SNOWFLAKE: &str = "select count(*), sum(facts.id) from facts, dims, subs \
        where facts.ref = dims.id and dims.ref = subs.id and subs.name = 'subs1'";

    #[tokio::test]
    async fn a_filtered_dimension_joins_the_table_it_describes_first() {
        let context = snowflake(true).await;
        let (optimized, ordered, answer) = reordered(&context, SNOWFLAKE).await;
        assert_eq!(
            tables_joined_with(&optimized, &["dims", "subs"]),
            ["dims", "facts", "subs"],
            "the query's order joins facts and dims first:\n{optimized}"
        );
        assert_eq!(
            tables_joined_with(&ordered, &["dims", "subs"]),
            ["dims", "subs"],
            "{ordered}"
        );
        assert_eq!(ordered.schema(), optimized.schema());
        assert!(answer.contains("3300"), "{answer}");
    }

    #[tokio::test]
    async fn filtered_dimensions_move_level_by_level() {
        let context = snowflake(true).await;
        let sql = "select count(*), sum(facts.id) from facts, others, dims, subs, regions \
            where facts.ref = dims.id and facts.ref = others.id and dims.ref = subs.id \
            and subs.ref = regions.id and regions.name = 'regions2'";
        let (_, ordered, _) = reordered(&context, sql).await;
        assert_eq!(
            tables_joined_with(&ordered, &["regions", "subs"]),
            ["regions", "subs"],
            "{ordered}"
        );
        assert_eq!(
            tables_joined_with(&ordered, &["dims", "regions"]),
            ["dims", "regions", "subs"],
            "{ordered}"
        );
        // `facts` meets `others` first, as in the query.
        assert_eq!(
            tables_joined_with(&ordered, &["facts", "others"]),
            ["facts", "others"],
            "{ordered}"
        );
    }

    #[tokio::test]
    async fn the_largest_input_keeps_its_join_order() {
        let context = snowflake(true).await;
        // `others` and `dims` are both filtered, and `others` comes first in
        // the query: it still meets `facts` first, and `dims` only has
        // `subs` moved onto it.
        let sql = "select count(*), sum(facts.id) from facts, others, dims, subs \
            where facts.ref = others.id and facts.ref = dims.id and dims.ref = subs.id \
            and subs.name = 'subs2' and others.name = 'others1' and dims.name = 'dims1'";
        let (optimized, ordered, _) = reordered(&context, sql).await;
        for plan in [&optimized, &ordered] {
            assert_eq!(
                tables_joined_with(plan, &["facts", "others"]),
                ["facts", "others"],
                "{plan}"
            );
        }
        assert_eq!(
            tables_joined_with(&ordered, &["dims", "subs"]),
            ["dims", "subs"],
            "{ordered}"
        );
    }

    #[tokio::test]
    async fn a_filtered_input_filters_another_joined_on_the_largest_inputs_key() {
        let context = snowflake(true).await;
        // As in TPC-H Q9: `subs` (filtered) and `others` each join `facts`
        // on `facts.ref` only, so `subs.id = others.id` in every row.
        let sql = "select count(*), sum(facts.id), sum(others.ref) from subs, facts, others \
            where subs.id = facts.ref and others.id = facts.ref and subs.name = 'subs1'";
        let (optimized, ordered, answer) = reordered(&context, sql).await;
        let semi_joins = |plan: &LogicalPlan| {
            let mut found = Vec::new();
            plan.apply(|node| {
                if let LogicalPlan::Join(join) = node
                    && join.join_type == JoinType::LeftSemi
                {
                    found.push((scanned_tables(&join.left), scanned_tables(&join.right)));
                }
                Ok(TreeNodeRecursion::Continue)
            })
            .expect("walk");
            found
        };
        assert_eq!(semi_joins(&optimized), vec![], "{optimized}");
        assert_eq!(
            semi_joins(&ordered),
            vec![(vec!["others".to_owned()], vec!["subs".to_owned()])],
            "{ordered}"
        );
        // `subs` still filters `facts` where the query joins them.
        assert_eq!(
            tables_joined_with(&ordered, &["facts", "subs"]),
            ["facts", "subs"],
            "{ordered}"
        );
        assert!(answer.contains("330"), "{answer}");
        // Two such inputs: neither is filtered.
        let ambiguous = "select count(*) from subs, facts, others, dims \
            where subs.id = facts.ref and others.id = facts.ref and dims.id = facts.ref \
            and subs.name = 'subs1'";
        let (optimized, ordered, _) = reordered(&context, ambiguous).await;
        assert_eq!(ordered, optimized);
    }

    #[tokio::test]
    async fn an_input_that_may_give_other_rows_when_run_again_filters_nothing() {
        let context = snowflake(true).await;
        let state = context.state();
        // A semi join would run `subs` a second time, choosing other rows.
        for chosen in [
            "select id from subs order by random() limit 1",
            "select id from subs where random() < 0.5",
            "select id from subs order by ref limit 1",
            "select id from subs limit 1",
        ] {
            let sql = format!(
                "select count(*) from ({chosen}) s, facts f, others o \
                 where s.id = f.ref and o.id = f.ref"
            );
            let logical = state.create_logical_plan(&sql).await.expect("plan");
            let optimized = state.optimize(&logical).expect("optimize");
            let ordered = reorder_joins(optimized.clone(), &state)
                .await
                .expect("reorder");
            assert_eq!(ordered, optimized, "{sql}:\n{ordered}");
        }
    }

    #[tokio::test]
    async fn unfiltered_or_larger_inputs_keep_their_place() {
        let context = snowflake(true).await;
        for sql in [
            // Nothing is filtered.
            "select count(*) from facts, dims, subs where facts.ref = dims.id and dims.ref = subs.id",
            // `dims` is filtered but larger than `subs`, and `facts` is
            // filtered but larger than `dims`.
            "select count(*) from subs, dims, facts where facts.ref = dims.id and dims.ref = subs.id \
                and dims.name = 'dims0' and facts.name <> 'facts0'",
        ] {
            let (optimized, ordered, _) = reordered(&context, sql).await;
            assert_eq!(ordered, optimized, "{sql}");
        }
    }

    #[tokio::test]
    async fn a_condition_over_two_moved_inputs_is_applied_where_both_are() {
        let context = snowflake(true).await;
        // As in TPC-H Q7: each dimension is filtered on its own, and the pair
        // once more by a condition that reads both.
        let sql = "select count(*), sum(facts.id) from facts, dims, others, subs s1, subs s2 \
            where facts.ref = dims.id and facts.ref = others.id \
            and dims.ref = s1.id and others.ref = s2.id \
            and s1.name in ('subs0', 'subs1') and s2.name in ('subs0', 'subs1') \
            and ((s1.name = 'subs0' and s2.name = 'subs1') or (s1.name = 'subs1' and s2.name = 'subs0'))";
        let (_, ordered, _) = reordered(&context, sql).await;
        assert_eq!(
            tables_joined_with(&ordered, &["dims", "subs"]),
            ["dims", "subs"],
            "{ordered}"
        );
        assert_eq!(
            tables_joined_with(&ordered, &["others", "subs"]),
            ["others", "subs"],
            "{ordered}"
        );
    }

    #[tokio::test]
    async fn an_outer_join_bounds_a_tree() {
        let context = snowflake(true).await;
        // `subs` is filtered, but its only join is a left join: the inner
        // tree above it has two inputs, and nothing moves.
        let sql = "select count(*), sum(d.id) from facts, \
            (select dims.id, subs.name from dims left join subs on dims.ref = subs.id and subs.name = 'subs1') d \
            where facts.ref = d.id";
        let (optimized, ordered, _) = reordered(&context, sql).await;
        assert_eq!(ordered, optimized);
    }

    #[tokio::test]
    async fn the_setting_turns_reordering_off() {
        let context = snowflake(false).await;
        let (optimized, ordered, _) = reordered(&context, SNOWFLAKE).await;
        assert_eq!(ordered, optimized);
    }
}
