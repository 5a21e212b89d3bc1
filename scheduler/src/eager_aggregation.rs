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
//! grouping side and its own grouping columns (`o_custkey`), and only that
//! joins the grouping side; the query's aggregate combines the partial
//! results (a sum of sums, a sum of counts, a min of mins).
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
//!   `DISTINCT`, `FILTER` or `ORDER BY`.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, ScalarValue};
use datafusion::error::Result;
use datafusion::execution::session_state::SessionState;
use datafusion::functions_aggregate::expr_fn::{max, min, sum};
use datafusion::logical_expr::{
    Aggregate, Expr, JoinType, LogicalPlan, Projection, cast, lit, when,
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
        if candidate.aggregates_the_largest_input(state).await?
            && let Some(rewritten) = candidate.rewrite()?
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
        let Expr::AggregateFunction(function) = expr.clone().unalias() else {
            return None;
        };
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

/// An aggregate over a tree of inner joins, split into its aggregated and
/// grouping sides, that passes every test but the estimates.
struct Candidate {
    aggregate: Aggregate,
    tree: JoinTree,
    combines: Vec<Combine>,
    /// The inputs aggregated first.
    aggregated: Inputs,
    /// The pairs of keys between the sides: the aggregated side's column,
    /// and the grouping side's.
    cut: Vec<(Column, Expr)>,
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
        if !is_inner_equi_join(join) {
            return None;
        }
        let tree = JoinTree::collect(input, 2)?;
        let mut grouped = 0;
        for column in &grouping {
            grouped |= tree.read_by(&Expr::Column((*column).clone()))?;
        }
        let mut argued = 0;
        for expr in &aggregate.aggr_expr {
            argued |= tree.read_by(expr)?;
        }
        let all: Inputs = if tree.inputs.len() == 64 {
            Inputs::MAX
        } else {
            (1 << tree.inputs.len()) - 1
        };
        let aggregated = tree.component(argued, all & !grouped)?;
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
            let Expr::Column(other_column) = other else {
                return None;
            };
            if !grouping.contains(&other_column) {
                return None;
            }
            cut.push((own.clone(), other.clone()));
        }
        Some(Self {
            aggregate: aggregate.clone(),
            tree,
            combines,
            aggregated,
            cut,
        })
    }

    /// Whether the aggregated side holds the input with the most rows by
    /// DataFusion's estimates: `false` when one has no estimate.
    async fn aggregates_the_largest_input(&self, state: &SessionState) -> Result<bool> {
        let mut largest: Option<(f64, usize)> = None;
        for (number, input) in self.tree.inputs.iter().enumerate() {
            let Some(estimate) = estimate(input, state).await? else {
                debug!(
                    input = number,
                    "no estimate: the aggregate stays above its joins"
                );
                return Ok(false);
            };
            if largest.is_none_or(|(rows, _)| estimate.rows > rows) {
                largest = Some((estimate.rows, number));
            }
        }
        Ok(largest.is_some_and(|(_, number)| self.aggregated & (1 << number) != 0))
    }

    /// The aggregate with its aggregated side aggregated first, giving the
    /// same columns; `None` when the two sides do not each join up.
    fn rewrite(&self) -> Result<Option<LogicalPlan>> {
        let tree = &self.tree;
        let aggregated = self.aggregated;
        let mut placed: Vec<bool> = tree
            .conditions
            .iter()
            .map(|condition| {
                let inputs = condition.inputs();
                !is_subset(inputs, aggregated) && inputs & aggregated != 0
            })
            .collect();
        let side = |members: Inputs, placed: &mut Vec<bool>| {
            tree.rebuild(
                &tree.shape,
                &mut |number| {
                    (members & (1 << number) != 0)
                        .then(|| (tree.inputs[number].clone(), 1 << number))
                },
                placed,
            )
        };
        let Some((aggregated_plan, _)) = side(aggregated, &mut placed)? else {
            return Ok(None);
        };
        let Some((grouping_plan, _)) = side(!aggregated, &mut placed)? else {
            return Ok(None);
        };
        if placed.contains(&false) {
            return Ok(None);
        }

        // The early aggregate: by the aggregated side's keys (no grouping
        // column comes from that side), each aggregate under a name of its own.
        let mut early_groups: Vec<Expr> = Vec::new();
        for (own, _) in &self.cut {
            let key = Expr::Column(own.clone());
            if !early_groups.contains(&key) {
                early_groups.push(key);
            }
        }
        let partial_names: Vec<String> = (0..self.combines.len())
            .map(|number| format!("__quiver_partial_{number}"))
            .collect();
        let partials = self
            .aggregate
            .aggr_expr
            .iter()
            .zip(&partial_names)
            .map(|(expr, name)| expr.clone().unalias().alias(name))
            .collect();
        let early = LogicalPlan::Aggregate(Aggregate::try_new(
            Arc::new(aggregated_plan),
            early_groups,
            partials,
        )?);
        let on = self
            .cut
            .iter()
            .map(|(own, other)| (Expr::Column(own.clone()), other.clone()))
            .collect();
        let joined = equi_join(early, grouping_plan, on, None, JoinType::Inner)?;

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
                // A count is never null: a sum of counts is, over no rows.
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
        debug!(
            keys = ?self.cut.iter().map(|(own, _)| own.to_string()).collect::<Vec<_>>(),
            "aggregating before joins"
        );
        Ok(Some(rewritten))
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
                        ids(400).iter().map(|id| (id % 13 != 0).then_some(id % 60)),
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
    async fn the_setting_turns_eager_aggregation_off() {
        let context = shop(false);
        let (optimized, rewritten) = rewritten(&context, REVENUE).await;
        assert_eq!(rewritten, optimized);
    }
}
