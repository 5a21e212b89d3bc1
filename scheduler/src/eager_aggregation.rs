//! Aggregates the many side of a tree of inner joins before it meets the
//! side that the query groups by ("eager aggregation").
//!
//! TPC-H Q10 sums `lineitem` per customer and groups by every column of
//! `customer` it shows (`group by c_custkey, c_name, c_address, ...`).
//! DataFusion joins in the query's order, so every matching `lineitem` row
//! carries the customer's name, address and comment through the joins, and
//! the aggregate then hashes those strings. Here, when an aggregate sits on
//! a tree of inner equi-joins, its inputs split in two:
//! - the *aggregated side*: the inputs its arguments read, with the inputs
//!   joined to them that no grouping column comes from (`orders` and
//!   `lineitem` in Q10);
//! - the *grouping side*: the rest (`customer`, `nation`).
//!
//! The aggregated side is then aggregated first, by its join keys to the
//! grouping side (`o_custkey`), and only that joins the grouping side; the
//! query's aggregate combines the partial results (a sum of sums, a sum of
//! counts, a min of mins). A left or right join is split the same way when
//! the aggregates read only columns of its null-supplying side: in Q13,
//! `orders` is counted per `o_custkey` before `customer` left-joins it, and
//! a customer without orders still counts 0.
//!
//! The answer cannot change: each joined row is an aggregated-side row
//! paired with a grouping-side row that matches its keys, and the partial
//! result of an aggregated-side key holds exactly the rows that any
//! grouping-side row with that key would have met. The rewrite is made only
//! where it cannot cost much, because the estimates it would need (distinct
//! keys) are not there:
//! - every key the grouping side joins on is one of the query's grouping
//!   columns, so the early aggregate has no more groups than the query's;
//! - the grouping side's inputs are unfiltered scans, so joining them first
//!   would have dropped no aggregated-side row (keys are taken to be foreign
//!   keys);
//! - the aggregated side holds the input with the most rows by DataFusion's
//!   estimates, so it is the many rows that are grouped;
//! - the aggregates are `sum`, `min`, `max` and `count`, without
//!   `DISTINCT`, `FILTER` or `ORDER BY`, over columns, literals, `+`, `-`
//!   and `*`: early, they are computed on rows that a join would have
//!   dropped first, where a division or a cast could fail. A `count(*)`
//!   alone reads no input: the aggregated side is then every input no
//!   grouping column comes from.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, NullEquality, ScalarValue};
use datafusion::error::Result;
use datafusion::execution::session_state::SessionState;
use datafusion::functions_aggregate::expr_fn::{max, min, sum};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    Aggregate, Expr, Join, JoinConstraint, JoinType, LogicalPlan, Operator, Projection, cast, lit,
    when,
};
use datafusion::optimizer::OptimizerRule;
use datafusion::optimizer::optimize_projections::OptimizeProjections;
use quiver_core::config::quiver_options;
use tracing::debug;

use crate::join_order::estimate;
use crate::join_tree::{
    Inputs, JoinTree, equi_join, is_column_selection, is_inner_equi_join, is_subset,
};

/// Aggregates before joins where the module documentation allows it. The
/// plan is returned unchanged when `quiver.eager_aggregation` is off.
pub async fn aggregate_before_joins(
    plan: LogicalPlan,
    state: &SessionState,
) -> Result<LogicalPlan> {
    if !quiver_options(state.config().options()).eager_aggregation {
        return Ok(plan);
    }
    // The candidates are found first: judging one needs estimates, which
    // are planned asynchronously.
    let mut candidates = Vec::new();
    plan.apply(|node| {
        if let LogicalPlan::Aggregate(aggregate) = node
            && let Some(candidate) = Candidate::of(aggregate)
        {
            candidates.push(candidate);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let mut rewrites = Vec::new();
    for candidate in candidates {
        // The rewrite is cheap; the estimates plan every input physically.
        if let Some(rewritten) = candidate.rewrite()?
            && candidate.aggregates_the_largest_input(state).await?
        {
            rewrites.push((candidate.aggregate, rewritten));
        }
    }
    if rewrites.is_empty() {
        return Ok(plan);
    }
    let rewritten = plan.transform_up(|node| {
        let found = match &node {
            LogicalPlan::Aggregate(aggregate) => rewrites
                .iter()
                .position(|(original, _)| original == aggregate),
            _ => None,
        };
        match found {
            Some(found) => Ok(Transformed::yes(rewrites.swap_remove(found).1)),
            None => Ok(Transformed::no(node)),
        }
    })?;
    // The new aggregates and joins carry every column of their inputs;
    // DataFusion's rule drops the ones nothing above reads.
    Ok(OptimizeProjections::new()
        .rewrite(rewritten.data, state)?
        .data)
}

/// How an aggregate's partial results combine.
#[derive(Debug, Clone, Copy)]
enum Combine {
    Sum,
    Min,
    Max,
    /// A sum of counts, which is 0 rather than null.
    Count,
}

impl Combine {
    fn of(expr: &Expr) -> Option<Self> {
        let function = aggregate_function(expr)?;
        let params = &function.params;
        if params.distinct || params.filter.is_some() || !params.order_by.is_empty() {
            return None;
        }
        match function.func.name() {
            "sum" => Some(Self::Sum),
            "min" => Some(Self::Min),
            "max" => Some(Self::Max),
            "count" => Some(Self::Count),
            _ => None,
        }
    }

    fn combine(self, partial: Expr) -> Expr {
        match self {
            Self::Sum | Self::Count => sum(partial),
            Self::Min => min(partial),
            Self::Max => max(partial),
        }
    }
}

/// An aggregate over joins, split into its aggregated and grouping sides,
/// that passes every test but the estimates.
struct Candidate {
    aggregate: Aggregate,
    combines: Vec<Combine>,
    split: Split,
}

/// Where an aggregate's joins are cut, and how the early aggregate joins the
/// grouping side again.
enum Split {
    /// A tree of inner joins.
    Inner {
        tree: JoinTree,
        /// The inputs aggregated first.
        aggregated: Inputs,
        /// The pairs of keys between the sides: the aggregated side's
        /// column, and the grouping side's.
        cut: Vec<(Column, Expr)>,
    },
    /// One left or right join, whose null-supplying side is aggregated: a
    /// grouping-side row without a match still meets one row, of nulls.
    Outer {
        join: Join,
        /// The pairs of keys: the null-supplying side's column, and the
        /// preserved side's.
        keys: Vec<(Column, Expr)>,
    },
}

impl Candidate {
    fn of(aggregate: &Aggregate) -> Option<Self> {
        let combines = aggregate
            .aggr_expr
            .iter()
            .map(Combine::of)
            .collect::<Option<Vec<_>>>()?;
        let grouping: Vec<&Column> = aggregate
            .group_expr
            .iter()
            .map(|expr| match expr {
                Expr::Column(column) => Some(column),
                _ => None,
            })
            .collect::<Option<_>>()?;
        let mut input = aggregate.input.as_ref();
        while let LogicalPlan::Projection(projection) = input
            && is_column_selection(projection)
        {
            input = projection.input.as_ref();
        }
        let LogicalPlan::Join(join) = input else {
            return None;
        };
        let split = if is_inner_equi_join(join) {
            Split::inner(input, aggregate, &grouping)?
        } else {
            Split::outer(join, aggregate, &grouping)?
        };
        Some(Self {
            aggregate: aggregate.clone(),
            combines,
            split,
        })
    }

    /// Whether the aggregated side holds the input with the most rows by
    /// DataFusion's estimates: `false` when one has no estimate.
    async fn aggregates_the_largest_input(&self, state: &SessionState) -> Result<bool> {
        let mut largest: Option<(f64, bool)> = None;
        for (input, aggregated) in self.split.inputs() {
            let Some(estimate) = estimate(input, state).await? else {
                debug!("no estimate of a join input: the aggregate stays above its joins");
                return Ok(false);
            };
            if largest.is_none_or(|(rows, _)| estimate.rows > rows) {
                largest = Some((estimate.rows, aggregated));
            }
        }
        Ok(largest.is_some_and(|(_, aggregated)| aggregated))
    }

    /// The aggregate with its aggregated side aggregated first, giving the
    /// same columns; `None` when the two sides do not each join up.
    fn rewrite(&self) -> Result<Option<LogicalPlan>> {
        let partial_names: Vec<String> = (0..self.combines.len())
            .map(|number| format!("__quiver_partial_{number}"))
            .collect();
        // The early aggregate: by the aggregated side's keys (no grouping
        // column comes from that side), each aggregate under a name of its own.
        let early = |aggregated: LogicalPlan, keys: &[(Column, Expr)]| -> Result<LogicalPlan> {
            let mut groups: Vec<Expr> = Vec::new();
            for (own, _) in keys {
                let key = Expr::Column(own.clone());
                if !groups.contains(&key) {
                    groups.push(key);
                }
            }
            let partials = self
                .aggregate
                .aggr_expr
                .iter()
                .zip(&partial_names)
                .map(|(expr, name)| expr.clone().unalias().alias(name))
                .collect();
            Ok(LogicalPlan::Aggregate(Aggregate::try_new(
                Arc::new(aggregated),
                groups,
                partials,
            )?))
        };
        let Some(joined) = self.split.join_early(early)? else {
            return Ok(None);
        };

        // The query's aggregate, combining the partial results, and its
        // columns under their names and types.
        let schema = self.aggregate.schema.as_ref();
        let groups = self.aggregate.group_expr.len();
        let combined = self
            .combines
            .iter()
            .zip(&partial_names)
            .enumerate()
            .map(|(number, (combine, name))| {
                let partial = Expr::Column(Column::new_unqualified(name));
                combine
                    .combine(partial)
                    .alias(schema.field(groups + number).name())
            })
            .collect();
        let combining = LogicalPlan::Aggregate(Aggregate::try_new(
            Arc::new(joined),
            self.aggregate.group_expr.clone(),
            combined,
        )?);
        let mut columns = Vec::with_capacity(schema.fields().len());
        for (number, (qualifier, field)) in schema.iter().enumerate() {
            let column = Expr::Column(Column::new(qualifier.cloned(), field.name()));
            if number < groups {
                columns.push(column);
                continue;
            }
            let combined_type = combining.schema().field(number).data_type();
            let mut value = if combined_type == field.data_type() {
                column
            } else {
                cast(column, field.data_type().clone())
            };
            if let Combine::Count = self.combines[number - groups] {
                // A count is never null; a sum of counts is over no partial
                // count, or over an outer join's row of nulls.
                let zero = lit(ScalarValue::new_zero(field.data_type())?);
                value = when(value.clone().is_not_null(), value).otherwise(zero)?;
            }
            columns.push(value.alias(field.name()));
        }
        let rewritten = LogicalPlan::Projection(Projection::try_new(columns, Arc::new(combining))?);
        let same_columns = rewritten.schema().iter().eq(schema.iter());
        if !same_columns {
            debug!(
                before = %schema,
                after = %rewritten.schema(),
                "the aggregate before joins gives other columns: left above them"
            );
            return Ok(None);
        }
        debug!(plan = %rewritten.display_indent(), "aggregating before joins");
        Ok(Some(rewritten))
    }
}

impl Split {
    /// A tree of inner joins under `aggregate`, if it splits.
    fn inner(tree_root: &LogicalPlan, aggregate: &Aggregate, grouping: &[&Column]) -> Option<Self> {
        let tree = JoinTree::collect(tree_root, 2)?;
        let mut grouped = 0;
        for column in grouping {
            grouped |= tree.read_by(&Expr::Column((*column).clone()))?;
        }
        let mut argued = 0;
        for expr in &aggregate.aggr_expr {
            if !reads_infallibly(expr) {
                return None;
            }
            argued |= tree.read_by(expr)?;
        }
        let all = tree.all_inputs();
        // `count(*)` alone reads no input: the inputs no grouping column
        // comes from are then aggregated, if they join up.
        let ungrouped = all & !grouped;
        let seed = if argued == 0 { ungrouped } else { argued };
        let aggregated = tree.component(seed, ungrouped)?;
        if argued == 0 && aggregated != ungrouped {
            return None;
        }
        let grouping_side = all & !aggregated;
        if grouping_side == 0 || !is_subset(argued, aggregated) {
            return None;
        }
        let unfiltered = (0..tree.inputs.len())
            .filter(|number| grouping_side & (1 << number) != 0)
            .all(|number| is_unfiltered_scan(&tree.inputs[number]));
        if !unfiltered {
            return None;
        }
        let mut cut = Vec::new();
        for condition in &tree.conditions {
            let inputs = condition.inputs();
            if is_subset(inputs, aggregated) || is_subset(inputs, grouping_side) {
                continue;
            }
            let [(Expr::Column(own), _), (other, _)] = condition.sides_from(aggregated)? else {
                return None;
            };
            cut.push((own.clone(), grouping_key(other, grouping)?));
        }
        Some(Self::Inner {
            tree,
            aggregated,
            cut,
        })
    }

    /// A left or right join under `aggregate`, if it splits. The aggregates
    /// read columns of the null-supplying side only, as they are: an
    /// expression such as `coalesce(o_id, 0)` is not null on the row of
    /// nulls that an unmatched row meets, which the early aggregate never
    /// sees.
    fn outer(join: &Join, aggregate: &Aggregate, grouping: &[&Column]) -> Option<Self> {
        let (preserved, nullable) = match join.join_type {
            JoinType::Left => (&join.left, &join.right),
            JoinType::Right => (&join.right, &join.left),
            _ => return None,
        };
        if join.join_constraint != JoinConstraint::On
            || join.null_equality != NullEquality::NullEqualsNothing
            || join.null_aware
            || join.filter.is_some()
            || join.on.is_empty()
            || !is_unfiltered_scan(preserved)
        {
            return None;
        }
        let reads_nullable_columns = |expr: &Expr| {
            aggregate_function(expr).is_some_and(|function| {
                let args = &function.params.args;
                !args.is_empty()
                    && args.iter().all(|arg| {
                        matches!(arg, Expr::Column(column) if nullable.schema().has_column(column))
                    })
            })
        };
        let groups_preserved = grouping
            .iter()
            .all(|column| preserved.schema().has_column(column));
        if !groups_preserved || !aggregate.aggr_expr.iter().all(reads_nullable_columns) {
            return None;
        }
        let mut keys = Vec::new();
        for (left, right) in &join.on {
            let (preserved_key, nullable_key) = match join.join_type {
                JoinType::Left => (left, right),
                _ => (right, left),
            };
            let Expr::Column(own) = nullable_key else {
                return None;
            };
            keys.push((own.clone(), grouping_key(preserved_key, grouping)?));
        }
        Some(Self::Outer {
            join: join.clone(),
            keys,
        })
    }

    /// The join's inputs, each with whether it is on the aggregated side.
    fn inputs(&self) -> Vec<(&LogicalPlan, bool)> {
        match self {
            Self::Inner {
                tree, aggregated, ..
            } => tree
                .inputs
                .iter()
                .enumerate()
                .map(|(number, input)| (input, aggregated & (1 << number) != 0))
                .collect(),
            Self::Outer { join, .. } => vec![
                (join.left.as_ref(), join.join_type == JoinType::Right),
                (join.right.as_ref(), join.join_type == JoinType::Left),
            ],
        }
    }

    /// The joins with the aggregated side replaced by `early` of it and the
    /// keys it joins on; `None` when the sides do not each join up.
    fn join_early(
        &self,
        early: impl Fn(LogicalPlan, &[(Column, Expr)]) -> Result<LogicalPlan>,
    ) -> Result<Option<LogicalPlan>> {
        let on = |keys: &[(Column, Expr)]| -> Vec<(Expr, Expr)> {
            keys.iter()
                .map(|(own, other)| (Expr::Column(own.clone()), other.clone()))
                .collect()
        };
        match self {
            Self::Inner {
                tree,
                aggregated,
                cut,
            } => {
                let aggregated = *aggregated;
                // The pairs of keys between the sides are placed last.
                let mut placed: Vec<bool> = tree
                    .conditions
                    .iter()
                    .map(|condition| {
                        let inputs = condition.inputs();
                        !is_subset(inputs, aggregated) && inputs & aggregated != 0
                    })
                    .collect();
                let mut side = |members: Inputs| {
                    tree.rebuild(
                        &tree.shape,
                        &mut |number| {
                            (members & (1 << number) != 0)
                                .then(|| (tree.inputs[number].clone(), 1 << number))
                        },
                        &mut placed,
                    )
                };
                let grouping = tree.all_inputs() & !aggregated;
                // Each side must join up on its own: in a star grouped by
                // its dimensions' keys, only the facts join the dimensions.
                let (Some((aggregated_plan, joined)), Some((grouping_plan, grouped))) =
                    (side(aggregated)?, side(grouping)?)
                else {
                    return Ok(None);
                };
                if joined != aggregated || grouped != grouping || placed.contains(&false) {
                    return Ok(None);
                }
                // The early aggregate is the build side: it is the smaller.
                let early = early(aggregated_plan, cut)?;
                Ok(Some(equi_join(
                    early,
                    grouping_plan,
                    on(cut),
                    None,
                    JoinType::Inner,
                )?))
            }
            Self::Outer { join, keys } => {
                let joined = match join.join_type {
                    JoinType::Left => {
                        let early = early(join.right.as_ref().clone(), keys)?;
                        let on = on(keys)
                            .into_iter()
                            .map(|(own, other)| (other, own))
                            .collect();
                        equi_join(join.left.as_ref().clone(), early, on, None, JoinType::Left)?
                    }
                    _ => {
                        let early = early(join.left.as_ref().clone(), keys)?;
                        equi_join(
                            early,
                            join.right.as_ref().clone(),
                            on(keys),
                            None,
                            JoinType::Right,
                        )?
                    }
                };
                Ok(Some(joined))
            }
        }
    }
}

/// Whether the arguments of the aggregate `expr` cannot fail: columns,
/// literals and `+`, `-`, `*` (which wrap, as DataFusion computes them).
/// Early, they are computed on rows that a join would have dropped first,
/// where `a / b` or a cast might fail.
fn reads_infallibly(expr: &Expr) -> bool {
    fn infallible(expr: &Expr) -> bool {
        match expr {
            Expr::Column(_) | Expr::Literal(..) => true,
            Expr::BinaryExpr(binary) => {
                matches!(
                    binary.op,
                    Operator::Plus | Operator::Minus | Operator::Multiply
                ) && infallible(&binary.left)
                    && infallible(&binary.right)
            }
            Expr::Negative(inner) => infallible(inner),
            _ => false,
        }
    }
    aggregate_function(expr).is_some_and(|function| function.params.args.iter().all(infallible))
}

/// The aggregate function of one of an aggregate's expressions, under its
/// aliases.
fn aggregate_function(expr: &Expr) -> Option<&AggregateFunction> {
    match expr {
        Expr::Alias(alias) => aggregate_function(&alias.expr),
        Expr::AggregateFunction(function) => Some(function),
        _ => None,
    }
}

/// `key` as a grouping column of the query, if it is one: then grouping by
/// the key it is joined with makes no more groups than the query does.
fn grouping_key(key: &Expr, grouping: &[&Column]) -> Option<Expr> {
    match key {
        Expr::Column(column) if grouping.contains(&column) => Some(key.clone()),
        _ => None,
    }
}

/// A table scan without filters or a limit, possibly renamed or narrowed to
/// some of its columns: joining it drops no row that has a match.
fn is_unfiltered_scan(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::TableScan(scan) => scan.filters.is_empty() && scan.fetch.is_none(),
        LogicalPlan::Projection(projection) if is_column_selection(projection) => {
            is_unfiltered_scan(&projection.input)
        }
        LogicalPlan::SubqueryAlias(alias) => is_unfiltered_scan(&alias.input),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Decimal128Array, Int64Array, RecordBatch, StringArray};
    use datafusion::prelude::{SessionConfig, SessionContext};
    use quiver_core::config::QuiverOptions;

    use super::*;
    use crate::join_tree::tests::{answer, scanned_tables};

    /// Customers (one id twice) in nations, their orders, and the orders'
    /// items, which are the most rows; some keys and values are null.
    fn shop(eager: bool) -> SessionContext {
        let mut options = QuiverOptions::default();
        options.eager_aggregation = eager;
        let config = SessionConfig::new()
            .with_target_partitions(2)
            .with_option_extension(options);
        let context = SessionContext::new_with_config(config);
        let register = |name: &str, batch: RecordBatch| {
            context.register_batch(name, batch).expect("register");
        };
        let ids = |rows: i64| -> Vec<i64> { (0..rows).collect() };
        let customer_ids: Vec<i64> = ids(50).into_iter().map(|id| id.min(48)).collect();
        register(
            "customers",
            RecordBatch::try_from_iter(vec![
                ("id", Arc::new(Int64Array::from(customer_ids)) as _),
                (
                    "name",
                    Arc::new(StringArray::from_iter_values(
                        ids(50).iter().map(|id| format!("customer {id}")),
                    )) as _,
                ),
                (
                    "nation",
                    Arc::new(Int64Array::from_iter_values(
                        ids(50).iter().map(|id| id % 5),
                    )) as _,
                ),
            ])
            .expect("customers"),
        );
        register(
            "nations",
            RecordBatch::try_from_iter(vec![
                ("id", Arc::new(Int64Array::from(ids(5))) as _),
                (
                    "name",
                    Arc::new(StringArray::from_iter_values(
                        ids(5).iter().map(|id| format!("nation {id}")),
                    )) as _,
                ),
            ])
            .expect("nations"),
        );
        let amounts =
            Decimal128Array::from_iter_values(ids(400).iter().map(|id| i128::from(*id) * 125))
                .with_precision_and_scale(15, 2)
                .expect("decimal");
        register(
            "orders",
            RecordBatch::try_from_iter(vec![
                ("id", Arc::new(Int64Array::from(ids(400))) as _),
                (
                    "customer",
                    Arc::new(Int64Array::from_iter(
                        // Customers 0 to 4 have no orders.
                        ids(400)
                            .iter()
                            .map(|id| (id % 13 != 0).then_some(id % 60 + 5)),
                    )) as _,
                ),
                ("amount", Arc::new(amounts) as _),
            ])
            .expect("orders"),
        );
        let prices = Decimal128Array::from_iter(
            ids(2000)
                .iter()
                .map(|id| (id % 7 != 0).then_some(i128::from(*id) * 37 % 10_000)),
        )
        .with_precision_and_scale(15, 2)
        .expect("decimal");
        register(
            "items",
            RecordBatch::try_from_iter(vec![
                (
                    "order_id",
                    Arc::new(Int64Array::from_iter_values(
                        ids(2000).iter().map(|id| id % 450),
                    )) as _,
                ),
                ("price", Arc::new(prices) as _),
                (
                    "quantity",
                    Arc::new(Int64Array::from_iter_values(
                        ids(2000).iter().map(|id| id % 50),
                    )) as _,
                ),
                (
                    "nation",
                    Arc::new(Int64Array::from_iter_values(
                        ids(2000).iter().map(|id| id % 5),
                    )) as _,
                ),
            ])
            .expect("items"),
        );
        context
    }

    /// The optimized plan of `sql` and the plan with aggregates moved below
    /// joins, after checking that both give the same answer and columns.
    async fn rewritten(context: &SessionContext, sql: &str) -> (LogicalPlan, LogicalPlan) {
        let state = context.state();
        let logical = state.create_logical_plan(sql).await.expect("plan");
        let optimized = state.optimize(&logical).expect("optimize");
        let rewritten = aggregate_before_joins(optimized.clone(), &state)
            .await
            .expect("rewrite");
        assert_eq!(rewritten.schema(), optimized.schema());
        assert_eq!(
            answer(&state, rewritten.clone()).await,
            answer(&state, optimized.clone()).await,
            "the rewritten plan answers differently:\n{rewritten}"
        );
        (optimized, rewritten)
    }

    /// The tables under each aggregate of `plan`, outermost first.
    fn aggregated_tables(plan: &LogicalPlan) -> Vec<Vec<String>> {
        let mut found = Vec::new();
        plan.apply(|node| {
            if let LogicalPlan::Aggregate(aggregate) = node {
                found.push(scanned_tables(&aggregate.input));
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .expect("walk");
        found
    }

    const REVENUE: &str = "select c.id, c.name, n.name, sum(i.price), count(*), \
        count(i.price), min(i.quantity), max(o.amount) \
        from customers c, orders o, items i, nations n \
        where c.id = o.customer and o.id = i.order_id and c.nation = n.id \
        group by c.id, c.name, n.name order by c.id, c.name";

    #[tokio::test]
    async fn the_many_side_is_aggregated_by_the_grouped_key_before_the_joins() {
        let context = shop(true);
        let (optimized, rewritten) = rewritten(&context, REVENUE).await;
        assert_eq!(
            aggregated_tables(&optimized),
            [["customers", "items", "nations", "orders"]]
        );
        assert_eq!(
            aggregated_tables(&rewritten),
            [
                vec!["customers", "items", "nations", "orders"],
                vec!["items", "orders"]
            ],
            "{rewritten}"
        );
    }

    #[tokio::test]
    async fn a_count_of_rows_is_a_sum_of_counts() {
        let context = shop(true);
        let sql = "select c.id, c.name, count(*) from customers c, orders o, items i \
            where c.id = o.customer and o.id = i.order_id group by c.id, c.name";
        let (_, rewritten) = rewritten(&context, sql).await;
        assert_eq!(
            aggregated_tables(&rewritten),
            [
                vec!["customers", "items", "orders"],
                vec!["items", "orders"]
            ],
            "{rewritten}"
        );
    }

    #[tokio::test]
    async fn aggregates_stay_where_grouping_early_could_cost() {
        let context = shop(true);
        for sql in [
            // The key `orders` joins `customers` on is not a grouping column.
            "select c.name, sum(i.price) from customers c, orders o, items i \
                where c.id = o.customer and o.id = i.order_id group by c.name",
            // `customers` is filtered: joining it first may drop items.
            "select c.id, sum(i.price) from customers c, orders o, items i \
                where c.id = o.customer and o.id = i.order_id and c.name <> 'customer 3' \
                group by c.id",
            // The aggregate reads the grouping side.
            "select c.id, sum(i.price + c.nation) from customers c, orders o, items i \
                where c.id = o.customer and o.id = i.order_id group by c.id",
            // A division is computed on items whose orders no customer
            // has, where it may fail.
            "select c.id, sum(i.price / (i.quantity + 1)) from customers c, orders o, items i \
                where c.id = o.customer and o.id = i.order_id group by c.id",
            // A star grouped by its dimensions' keys: they join only the
            // aggregated side, not each other.
            "select o.id, c.id, n.id, sum(i.price) from items i, orders o, customers c, nations n \
                where i.order_id = o.id and i.quantity = c.id and i.nation = n.id \
                group by o.id, c.id, n.id",
            // A distinct count cannot be combined from partial counts.
            "select c.id, count(distinct i.quantity) from customers c, orders o, items i \
                where c.id = o.customer and o.id = i.order_id group by c.id",
            // The side that would be aggregated is the smaller one.
            "select i.order_id, max(c.name) from items i, orders o, customers c \
                where i.order_id = o.id and o.customer = c.id group by i.order_id",
        ] {
            let (optimized, rewritten) = rewritten(&context, sql).await;
            assert_eq!(rewritten, optimized, "{sql}");
        }
    }

    #[tokio::test]
    async fn an_outer_joins_null_supplying_side_is_aggregated_first() {
        let context = shop(true);
        for sql in [
            // As TPC-H Q13; customers 0 to 4 count 0 orders, and sum null.
            "select c.id, count(o.id), sum(o.amount), max(o.id) from customers c \
                left join orders o on c.id = o.customer group by c.id",
            "select c.id, count(o.id) from orders o right join customers c \
                on o.customer = c.id and o.amount > 100 group by c.id",
        ] {
            let (_, rewritten) = rewritten(&context, sql).await;
            assert_eq!(
                aggregated_tables(&rewritten),
                [vec!["customers", "orders"], vec!["orders"]],
                "{sql}\n{rewritten}"
            );
        }
        for sql in [
            // An unmatched customer's row counts once.
            "select c.id, count(*) from customers c left join orders o \
                on c.id = o.customer group by c.id",
            // ... and so does its order id, made 0.
            "select c.id, count(coalesce(o.id, 0)) from customers c left join orders o \
                on c.id = o.customer group by c.id",
            // The side to aggregate first is the smaller.
            "select o.customer, count(c.id) from orders o left join customers c \
                on c.id = o.customer group by o.customer",
        ] {
            let (optimized, rewritten) = rewritten(&context, sql).await;
            assert_eq!(rewritten, optimized, "{sql}");
        }
    }

    #[tokio::test]
    async fn the_setting_turns_eager_aggregation_off() {
        let context = shop(false);
        let (optimized, rewritten) = rewritten(&context, REVENUE).await;
        assert_eq!(rewritten, optimized);
    }
}
