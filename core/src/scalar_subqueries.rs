//! [`SingleRowSubqueries`]: uncorrelated scalar subqueries that fail, as
//! SQL requires, when they return more than one row.
//!
//! Quiver runs such a subquery as DataFusion does, with `ScalarSubqueryExec`
//! (cut into stages by the scheduler), which fails at a second row itself.
//! With `datafusion.optimizer.enable_physical_uncorrelated_scalar_subquery`
//! off, DataFusion's optimizer plans it as a join with the outer query
//! instead, and a join would repeat each outer row once per subquery row.
//! Then this analyzer rule, which runs before that optimizer, wraps each
//! such subquery that may return several rows in an aggregate of
//! [`single_value`]: one row, its value, or an error at a second row.
//! Subqueries that return at most one row by their shape (an aggregate
//! without `GROUP BY`, `LIMIT 1`) are left as they are. With the setting on
//! or off, it computes subqueries in aggregates and windows in a projection
//! below them: that optimizer refuses them there, and a window partitioned
//! by one would hash its rows on the subquery itself, in a shuffle whose
//! expressions executors decode without the subquery's value. Clients and
//! the scheduler both run it: a client optimizes the plans of its
//! `DataFrame`s before it sends them.

use std::sync::Arc;

use datafusion::common::Column;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::Result;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{Expr, FetchType, LogicalPlan, LogicalPlanBuilder, Subquery};
use datafusion::optimizer::AnalyzerRule;

use crate::single_value::single_value;

/// The analyzer rule; see the module documentation.
#[derive(Debug, Default)]
pub struct SingleRowSubqueries;

impl AnalyzerRule for SingleRowSubqueries {
    fn analyze(&self, plan: LogicalPlan, config: &ConfigOptions) -> Result<LogicalPlan> {
        // Computed below, a subquery in a window's `PARTITION BY` is a column
        // by the time the plan hashes rows on it: a shuffle's partitioning
        // expressions are decoded where no subquery's value is at hand.
        let plan = precompute_subqueries(plan)?;
        if config
            .optimizer
            .enable_physical_uncorrelated_scalar_subquery
        {
            return Ok(plan);
        }
        enforce_single_rows(plan)
    }

    fn name(&self) -> &str {
        "quiver_single_row_subqueries"
    }
}

/// `plan` with each uncorrelated scalar subquery that may return several
/// rows (in subqueries too) reduced to one row or an error.
fn enforce_single_rows(plan: LogicalPlan) -> Result<LogicalPlan> {
    plan.transform_up_with_subqueries(|node| {
        node.map_expressions(|expr| {
            expr.transform_up(|expr| match expr {
                // A subquery of several columns is DataFusion's error to give.
                Expr::ScalarSubquery(subquery)
                    if subquery.outer_ref_columns.is_empty()
                        && subquery.subquery.schema().fields().len() == 1
                        && !returns_at_most_one_row(&subquery.subquery) =>
                {
                    Ok(Transformed::yes(Expr::ScalarSubquery(single_row(
                        subquery,
                    )?)))
                }
                _ => Ok(Transformed::no(expr)),
            })
        })
    })
    .map(|transformed| transformed.data)
}

/// The name prefix of the columns that carry a subquery's value into an
/// aggregate or a window.
const PRECOMPUTED: &str = "__quiver_scalar_sq";

/// `plan` with the scalar subqueries in the expressions of aggregates and
/// windows (arguments, `GROUP BY`, `PARTITION BY`, `ORDER BY`) computed by
/// a projection below them, where DataFusion's
/// optimizer turns them into joins; it does so in projections and filters
/// only, and its physical planner refuses the rest. Each expression keeps
/// its name. Subqueries inside grouping sets are left where they are.
fn precompute_subqueries(plan: LogicalPlan) -> Result<LogicalPlan> {
    let mut precomputed = 0;
    plan.transform_up_with_subqueries(|node| {
        if !matches!(node, LogicalPlan::Aggregate(_) | LogicalPlan::Window(_)) {
            return Ok(Transformed::no(node));
        }
        let mut subqueries: Vec<Expr> = Vec::new();
        for expr in node.expressions() {
            if matches!(expr, Expr::GroupingSet(_)) {
                continue;
            }
            expr.apply(|expr| {
                if !matches!(expr, Expr::ScalarSubquery(_)) {
                    return Ok(TreeNodeRecursion::Continue);
                }
                if !subqueries.contains(expr) {
                    subqueries.push(expr.clone());
                }
                Ok(TreeNodeRecursion::Jump)
            })?;
        }
        if subqueries.is_empty() {
            return Ok(Transformed::no(node));
        }
        let input = node.inputs()[0].clone();
        // Names that no column of the input has (a plan analyzed again may
        // hold those of the first time).
        let names: Vec<String> = subqueries
            .iter()
            .map(|_| {
                loop {
                    precomputed += 1;
                    let name = format!("{PRECOMPUTED}_{precomputed}");
                    if !input.schema().has_column_with_unqualified_name(&name) {
                        break name;
                    }
                }
            })
            .collect();
        let values = subqueries
            .iter()
            .zip(&names)
            .map(|(subquery, name)| subquery.clone().alias(name));
        let below = LogicalPlanBuilder::from(input.clone())
            .project(
                input
                    .schema()
                    .columns()
                    .into_iter()
                    .map(Expr::Column)
                    .chain(values),
            )?
            .build()?;
        let exprs = node
            .expressions()
            .into_iter()
            .map(|expr| {
                if matches!(expr, Expr::GroupingSet(_)) {
                    return Ok(expr);
                }
                let name = expr.schema_name().to_string();
                let replaced = expr.transform_down(|expr| {
                    Ok(
                        match subqueries.iter().position(|subquery| *subquery == expr) {
                            Some(index) => Transformed::new(
                                Expr::Column(Column::from_name(&names[index])),
                                true,
                                TreeNodeRecursion::Jump,
                            ),
                            None => Transformed::no(expr),
                        },
                    )
                })?;
                replaced.data.alias_if_changed(name)
            })
            .collect::<Result<Vec<_>>>()?;
        let rewritten = node.with_new_exprs(exprs, vec![below])?;
        // A window passes its input's columns on, the precomputed ones too.
        let rewritten = match node {
            LogicalPlan::Window(_) => LogicalPlanBuilder::from(rewritten)
                .project(node.schema().columns().into_iter().map(Expr::Column))?
                .build()?,
            _ => rewritten,
        };
        Ok(Transformed::yes(rewritten))
    })
    .map(|transformed| transformed.data)
}

/// `subquery` aggregated to one row, its column keeping its name.
fn single_row(subquery: Subquery) -> Result<Subquery> {
    let (qualifier, field) = subquery.subquery.schema().qualified_field(0);
    let value = Expr::AggregateFunction(AggregateFunction::new_udf(
        single_value(),
        vec![Expr::Column((qualifier, field).into())],
        false,
        None,
        vec![],
        None,
    ))
    .alias(field.name());
    let plan = LogicalPlanBuilder::from(subquery.subquery.as_ref().clone())
        .aggregate(Vec::<Expr>::new(), vec![value])?
        .build()?;
    Ok(Subquery {
        subquery: Arc::new(plan),
        ..subquery
    })
}

/// Whether `plan` returns at most one row whatever its input.
fn returns_at_most_one_row(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::Aggregate(aggregate) => aggregate.group_expr.is_empty(),
        LogicalPlan::Limit(limit) => {
            matches!(limit.get_fetch_type(), Ok(FetchType::Literal(Some(n))) if n <= 1)
                || returns_at_most_one_row(&limit.input)
        }
        LogicalPlan::Sort(sort) => {
            sort.fetch.is_some_and(|n| n <= 1) || returns_at_most_one_row(&sort.input)
        }
        LogicalPlan::Projection(projection) => returns_at_most_one_row(&projection.input),
        LogicalPlan::Filter(filter) => returns_at_most_one_row(&filter.input),
        LogicalPlan::SubqueryAlias(alias) => returns_at_most_one_row(&alias.input),
        LogicalPlan::EmptyRelation(_) => true,
        LogicalPlan::Values(values) => values.values.len() <= 1,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use arrow::util::pretty::pretty_format_batches;
    use datafusion::prelude::SessionContext;

    use crate::config::default_session_config;

    use super::*;

    /// A context with Quiver's settings, planning scalar subqueries as
    /// joins, and a table `t(a, b)` of two rows.
    async fn context() -> Result<SessionContext> {
        let mut config = default_session_config();
        config
            .options_mut()
            .optimizer
            .enable_physical_uncorrelated_scalar_subquery = false;
        let context = SessionContext::new_with_config(config);
        context
            .sql("CREATE TABLE t (a INT, b INT) AS VALUES (1, 10), (2, 20)")
            .await?;
        Ok(context)
    }

    /// The plan of `sql`, with single rows enforced.
    async fn enforced(sql: &str) -> Result<String> {
        let plan = context().await?.state().create_logical_plan(sql).await?;
        Ok(enforce_single_rows(plan)?.display_indent().to_string())
    }

    /// The answer to `sql` as a table, from `context` with the rule.
    async fn answer_in(context: SessionContext, sql: &str) -> Result<String> {
        context.add_analyzer_rule(Arc::new(SingleRowSubqueries));
        let batches = context.sql(sql).await?.collect().await?;
        Ok(pretty_format_batches(&batches)?.to_string())
    }

    /// The answer to `sql` with Quiver's settings and the rule.
    async fn answer(sql: &str) -> Result<String> {
        answer_in(context().await?, sql).await
    }

    #[tokio::test]
    async fn a_subquery_of_many_rows_is_reduced_to_one() -> Result<()> {
        let plan = enforced("SELECT a FROM t WHERE b = (SELECT b FROM t WHERE a > 0)").await?;
        assert!(
            plan.contains("Aggregate: groupBy=[[]], aggr=[[quiver_single_value(t.b) AS b]]"),
            "{plan}"
        );
        let nested = enforced("SELECT (SELECT (SELECT a FROM t) + b FROM t) FROM t").await?;
        assert_eq!(nested.matches("quiver_single_value").count(), 2, "{nested}");
        Ok(())
    }

    #[tokio::test]
    async fn subqueries_of_at_most_one_row_or_correlated_are_left_alone() -> Result<()> {
        for sql in [
            "SELECT (SELECT max(b) FROM t) FROM t",
            "SELECT (SELECT b FROM t ORDER BY a LIMIT 1) FROM t",
            "SELECT (SELECT b FROM t LIMIT 1) FROM t",
            "SELECT (SELECT 1) FROM t",
            "SELECT (SELECT sum(b) FROM t WHERE t.a = o.a) FROM t AS o",
        ] {
            let plan = enforced(sql).await?;
            assert!(!plan.contains("quiver_single_value"), "{sql}: {plan}");
        }
        Ok(())
    }

    #[tokio::test]
    async fn the_answer_is_the_one_value_null_or_an_error() -> Result<()> {
        let one = answer("SELECT a FROM t WHERE b = (SELECT b FROM t WHERE a = 2)").await?;
        assert!(one.contains("| 2 |") && !one.contains("| 1 |"), "{one}");
        let none = answer("SELECT (SELECT b FROM t WHERE a = 3) IS NULL AS empty").await?;
        assert!(none.contains("| true  |"), "{none}");
        // Without the aggregate, this joins both rows of `t` with both.
        let error = answer("SELECT a, (SELECT b FROM t) FROM t")
            .await
            .expect_err("must fail");
        assert!(error.to_string().contains("more than one row"), "{error}");
        Ok(())
    }

    /// DataFusion refuses these when it plans scalar subqueries as joins; they
    /// give the answers that it gives when it does not.
    #[tokio::test]
    async fn subqueries_in_aggregates_and_windows_give_one_process_answers() -> Result<()> {
        for sql in [
            "SELECT sum(a + (SELECT max(b) FROM t)) AS s, \
             count(*) FILTER (WHERE b > (SELECT min(b) FROM t)) AS c, \
             max(b) - (SELECT min(b) FROM t) AS spread FROM t",
            "SELECT a % 2 AS odd, sum(b * (SELECT count(*) FROM t)) FROM t GROUP BY a % 2 \
             HAVING sum(b * (SELECT count(*) FROM t)) > 0 ORDER BY odd",
            "SELECT a, sum(b + (SELECT max(a) FROM t)) OVER (ORDER BY a) AS running, \
             row_number() OVER () AS n FROM t ORDER BY a",
            "SELECT (SELECT sum(b + (SELECT min(a) FROM t)) FROM t) AS nested",
            // A column that has the name the first precomputed value would take.
            "SELECT sum(x + (SELECT max(a) FROM t)) AS s \
             FROM (SELECT a AS x, b AS __quiver_scalar_sq_1 FROM t) u",
        ] {
            let plain = SessionContext::new();
            plain
                .sql("CREATE TABLE t (a INT, b INT) AS VALUES (1, 10), (2, 20)")
                .await?;
            assert_eq!(answer(sql).await?, answer_in(plain, sql).await?, "{sql}");
        }
        let error = answer("SELECT sum((SELECT b FROM t)) FROM t")
            .await
            .expect_err("must fail");
        assert!(error.to_string().contains("more than one row"), "{error}");
        Ok(())
    }
}
