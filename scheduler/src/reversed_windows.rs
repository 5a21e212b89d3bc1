//! Window functions that DataFusion evaluates in reverse, rewritten into
//! forms that survive the encoding of stage plans.
//!
//! To share one sort between `lag(x) OVER (ORDER BY x)` and
//! `lead(x) OVER (ORDER BY x DESC)`, DataFusion evaluates the second over the
//! first's order as a reversed `lead`: the same function with an
//! `is_reversed` flag that negates its offset. datafusion-proto 55 drops the
//! flag, so executors looked the other way: `lead` returned the previous
//! row. Before a plan is cut into stages, a reversed `lag` or `lead` becomes
//! the other function, and a reversed `nth_value(x, n)` (the flag counts
//! from the frame's end) becomes `nth_value(x, -n)`, both unreversed, which
//! read the same row. A reversed `first_value` or `last_value` never reads
//! the flag (it swaps the function instead) and stays as it is. The flag
//! has no accessor; its `Debug` form, whose last fields it and
//! `ignore_nulls` are, shows it.

use std::sync::Arc;

use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::{DataFusionError, Result};
use datafusion::functions_window::lead_lag::{lag_udwf, lead_udwf};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::Literal;
use datafusion::physical_expr::window::{StandardWindowExpr, WindowExpr};
use datafusion::physical_plan::windows::{
    BoundedWindowAggExec, WindowAggExec, WindowUDFExpr, create_udwf_window_expr,
};
use datafusion::physical_plan::{Distribution, ExecutionPlan};

/// `plan` with each reversed `lag`, `lead` or `nth_value` written unreversed.
pub fn unreverse_window_functions(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        // A window that may not be repartitioned needs its input whole.
        let can_repartition = || {
            node.input_distribution_requirements()
                .into_per_child()
                .first()
                .is_some_and(|required| !matches!(required, Distribution::SinglePartition))
        };
        if let Some(window) = node.downcast_ref::<BoundedWindowAggExec>()
            && let Some(exprs) = unreversed(window.window_expr(), window.input())?
        {
            let rewritten = BoundedWindowAggExec::try_new(
                exprs,
                Arc::clone(window.input()),
                window.input_order_mode.clone(),
                can_repartition(),
            )?;
            return Ok(Transformed::yes(
                Arc::new(rewritten) as Arc<dyn ExecutionPlan>
            ));
        }
        if let Some(window) = node.downcast_ref::<WindowAggExec>()
            && let Some(exprs) = unreversed(window.window_expr(), window.input())?
        {
            let rewritten =
                WindowAggExec::try_new(exprs, Arc::clone(window.input()), can_repartition())?;
            return Ok(Transformed::yes(
                Arc::new(rewritten) as Arc<dyn ExecutionPlan>
            ));
        }
        Ok(Transformed::no(node))
    })
    .map(|transformed| transformed.data)
}

/// Whether `function` is evaluated in reverse. Its `Debug` form ends with
/// `is_reversed: ..., ignore_nulls: ... }`; the last match is the field, not
/// a literal or a column name that happens to hold the words.
fn is_reversed(function: &WindowUDFExpr) -> bool {
    format!("{function:?}")
        .rsplit_once(", is_reversed: ")
        .is_some_and(|(_, flag)| flag.starts_with("true, ignore_nulls: "))
}

/// The literal `n` of `nth_value(x, n)`, negated.
fn negated(n: &Arc<dyn PhysicalExpr>, window: &str) -> Result<Arc<dyn PhysicalExpr>> {
    let value = n
        .downcast_ref::<Literal>()
        .and_then(|literal| match literal.value() {
            ScalarValue::Int64(Some(n)) => Some(*n),
            ScalarValue::Int32(Some(n)) => Some(i64::from(*n)),
            ScalarValue::Int16(Some(n)) => Some(i64::from(*n)),
            ScalarValue::Int8(Some(n)) => Some(i64::from(*n)),
            ScalarValue::UInt64(Some(n)) => i64::try_from(*n).ok(),
            ScalarValue::UInt32(Some(n)) => Some(i64::from(*n)),
            _ => None,
        })
        .ok_or_else(|| {
            DataFusionError::NotImplemented(format!(
                "{window} is evaluated over the reverse of its order, which the cluster can \
                 run only with an integer literal n"
            ))
        })?;
    let negated = value
        .checked_neg()
        .ok_or_else(|| DataFusionError::Execution(format!("{window}: n is out of range")))?;
    Ok(Arc::new(Literal::new(ScalarValue::Int64(Some(negated)))))
}

/// `exprs` with their reversed `lag`, `lead` and `nth_value` unreversed, or
/// `None` if none is reversed.
fn unreversed(
    exprs: &[Arc<dyn WindowExpr>],
    input: &Arc<dyn ExecutionPlan>,
) -> Result<Option<Vec<Arc<dyn WindowExpr>>>> {
    let mut changed = false;
    let exprs = exprs
        .iter()
        .map(|expr| {
            let Some(standard) = expr.as_any().downcast_ref::<StandardWindowExpr>() else {
                return Ok(Arc::clone(expr));
            };
            let Some(function) = standard
                .get_standard_func_expr()
                .as_any()
                .downcast_ref::<WindowUDFExpr>()
            else {
                return Ok(Arc::clone(expr));
            };
            if !is_reversed(function) {
                return Ok(Arc::clone(expr));
            }
            let mut args = function.args().to_vec();
            let unreversed = match function.fun().name() {
                "lag" => lead_udwf(),
                "lead" => lag_udwf(),
                "nth_value" => {
                    args[1] = negated(&args[1], expr.name())?;
                    Arc::clone(function.fun())
                }
                _ => return Ok(Arc::clone(expr)),
            };
            changed = true;
            // IGNORE NULLS on window functions is refused before planning
            // (`unencodable.rs`), so it is never set here.
            let function = create_udwf_window_expr(
                &unreversed,
                &args,
                &input.schema(),
                expr.name().to_owned(),
                false,
            )?;
            Ok(Arc::new(StandardWindowExpr::new(
                function,
                standard.partition_by(),
                standard.order_by(),
                Arc::clone(standard.get_window_frame()),
            )) as Arc<dyn WindowExpr>)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(changed.then_some(exprs))
}
