//! Window functions that DataFusion evaluates in reverse, rewritten into
//! forms that survive the encoding of stage plans.
//!
//! To share one sort between `lag(x) OVER (ORDER BY x)` and
//! `lead(x) OVER (ORDER BY x DESC)`, DataFusion evaluates the second over the
//! first's order as a reversed `lead`: the same function with an
//! `is_reversed` flag that negates its offset. datafusion-proto 55 drops the
//! flag, so executors looked the other way: `lead` returned the previous
//! row. Before a plan is cut into stages, a reversed `lag` or `lead` becomes
//! the other function, unreversed, which reads the same row. A reversed
//! `nth_value` (counted from the frame's end) has no such equivalent and is
//! refused. The flag has no accessor; its `Debug` form shows it.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::{DataFusionError, Result};
use datafusion::functions_window::lead_lag::{lag_udwf, lead_udwf};
use datafusion::physical_expr::window::{StandardWindowExpr, WindowExpr};
use datafusion::physical_plan::windows::{
    BoundedWindowAggExec, WindowAggExec, WindowUDFExpr, create_udwf_window_expr,
};
use datafusion::physical_plan::{Distribution, ExecutionPlan};

/// `plan` with each reversed `lag` or `lead` written unreversed; an error
/// for a reversed `nth_value`.
pub fn unreverse_window_functions(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        // A window that may not be repartitioned needs its input whole.
        let can_repartition = node
            .input_distribution_requirements()
            .into_per_child()
            .first()
            .is_some_and(|required| !matches!(required, Distribution::SinglePartition));
        if let Some(window) = node.downcast_ref::<BoundedWindowAggExec>()
            && let Some(exprs) = unreversed(window.window_expr(), window.input())?
        {
            let rewritten = BoundedWindowAggExec::try_new(
                exprs,
                Arc::clone(window.input()),
                window.input_order_mode.clone(),
                can_repartition,
            )?;
            return Ok(Transformed::yes(
                Arc::new(rewritten) as Arc<dyn ExecutionPlan>
            ));
        }
        if let Some(window) = node.downcast_ref::<WindowAggExec>()
            && let Some(exprs) = unreversed(window.window_expr(), window.input())?
        {
            let rewritten =
                WindowAggExec::try_new(exprs, Arc::clone(window.input()), can_repartition)?;
            return Ok(Transformed::yes(
                Arc::new(rewritten) as Arc<dyn ExecutionPlan>
            ));
        }
        Ok(Transformed::no(node))
    })
    .map(|transformed| transformed.data)
}

/// `exprs` with their reversed `lag` and `lead` swapped, or `None` if none is reversed.
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
            if !format!("{function:?}").contains("is_reversed: true") {
                return Ok(Arc::clone(expr));
            }
            let swapped = match function.fun().name() {
                "lag" => lead_udwf(),
                "lead" => lag_udwf(),
                name => {
                    return Err(DataFusionError::NotImplemented(format!(
                        "{name} over the reverse of another window's order cannot run on the \
                         cluster yet (here: {}): write the windows of the query with the same \
                         ORDER BY direction",
                        expr.name()
                    )));
                }
            };
            changed = true;
            // IGNORE NULLS on window functions is refused before planning
            // (`unencodable.rs`), so it is never set here.
            let function = create_udwf_window_expr(
                &swapped,
                function.args(),
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
