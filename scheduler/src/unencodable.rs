//! Statements whose plans executors would receive changed, refused before
//! they run: a wrong answer is worse than an error.
//!
//! Stage plans reach executors encoded by datafusion-proto, which (as of
//! DataFusion 55) drops a window function's `FILTER (WHERE ...)` and the
//! `IGNORE NULLS` of window functions proper (`first_value`, `lag`,
//! `lead`, `nth_value`, ...). `count(*) FILTER (WHERE x > 0) OVER ()` would
//! count every row.

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::expr::{NullTreatment, WindowFunctionDefinition};
use datafusion::logical_expr::{Expr, LogicalPlan};

/// Refuses `plan` if a window function in it (in subqueries too) has a
/// clause that the encoding of stage plans drops.
pub fn refuse_dropped_window_clauses(plan: &LogicalPlan) -> Result<()> {
    let mut dropped: Option<String> = None;
    plan.apply_with_subqueries(|node| {
        for expr in node.expressions() {
            expr.apply(|expr| {
                if let Expr::WindowFunction(window) = expr {
                    let ignores_nulls = window.params.null_treatment
                        == Some(NullTreatment::IgnoreNulls)
                        && matches!(window.fun, WindowFunctionDefinition::WindowUDF(_));
                    if window.params.filter.is_some() || ignores_nulls {
                        dropped = Some(expr.to_string());
                        return Ok(TreeNodeRecursion::Stop);
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            })?;
        }
        Ok(if dropped.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    })?;
    match dropped {
        Some(window) => Err(DataFusionError::NotImplemented(format!(
            "window functions with FILTER (WHERE ...), and window functions such as \
             first_value, lag or lead with IGNORE NULLS, cannot run on the cluster yet \
             (here: {window}): the encoding of plans for executors drops those clauses, \
             which would change the answer. Filter with CASE WHEN inside the function \
             instead (sum(CASE WHEN ... THEN x END) OVER ...)"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;

    use super::*;

    async fn refusal(sql: &str) -> Option<String> {
        let context = SessionContext::new();
        let plan = context
            .state()
            .create_logical_plan(sql)
            .await
            .expect("plans");
        refuse_dropped_window_clauses(&plan)
            .err()
            .map(|e| e.to_string())
    }

    const ROWS: &str = "(VALUES (1, NULL), (2, 5), (3, NULL), (4, -1)) t(o, x)";

    #[tokio::test]
    async fn window_clauses_that_executors_would_not_see_are_refused() {
        for window in [
            "count(*) FILTER (WHERE x > 0) OVER ()",
            "sum(x) FILTER (WHERE x > 0) OVER (ORDER BY o)",
            "first_value(x) IGNORE NULLS OVER (ORDER BY o)",
            "lag(x) IGNORE NULLS OVER (ORDER BY o)",
        ] {
            let sql = format!("SELECT o, {window} AS w FROM {ROWS}");
            let error = refusal(&sql)
                .await
                .unwrap_or_else(|| panic!("{sql} refused"));
            assert!(error.contains("cannot run on the cluster yet"), "{error}");
        }
        // Inside a subquery too.
        let nested = format!(
            "SELECT count(*) FROM {ROWS} WHERE o IN \
             (SELECT count(*) FILTER (WHERE x > 0) OVER () FROM {ROWS})"
        );
        assert!(refusal(&nested).await.is_some(), "{nested}");
    }

    #[tokio::test]
    async fn window_functions_the_encoding_keeps_run() {
        for window in [
            "count(*) OVER ()",
            "lag(x) OVER (ORDER BY o)",
            "first_value(x) RESPECT NULLS OVER (ORDER BY o)",
            "sum(CASE WHEN x > 0 THEN x END) OVER (ORDER BY o)",
        ] {
            let sql = format!("SELECT o, {window} AS w FROM {ROWS}");
            assert_eq!(refusal(&sql).await, None, "{sql}");
        }
        // An aggregate's FILTER outside a window is encoded.
        let grouped = format!("SELECT count(*) FILTER (WHERE x > 0) FROM {ROWS}");
        assert_eq!(refusal(&grouped).await, None);
    }
}
