//! Recursive CTEs (`WITH RECURSIVE`) in stage plans.
//!
//! DataFusion runs one as a [`RecursiveQueryExec`] whose recursive term reads
//! the rows of the previous iteration from a [`WorkTableExec`]. The work table
//! lives in the memory of the process that runs the query, so the scheduler
//! keeps the whole operator in one stage (its exchanges stay in process, and
//! it runs as one task). datafusion-proto 55 encodes neither operator; Quiver's
//! codec carries them.
//!
//! A work table read may have a projection pushed into it, which the
//! operator does not expose: it is sent as the projected schema and rebuilt,
//! on decoding, as a projection by column name over the whole work table.

use std::sync::Arc;

use arrow::datatypes::Schema;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::{DataFusionError, Result};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::projection::ProjectionExec;
pub use datafusion::physical_plan::recursive_query::RecursiveQueryExec;
pub use datafusion::physical_plan::work_table::WorkTableExec;

/// The recursive query `name` over its decoded terms. Each work table read in
/// `recursive_term` that returns fewer columns than the query becomes a
/// projection over a read of the whole work table, which holds rows of
/// `schema`.
pub fn decode_recursive_query(
    name: String,
    schema: Arc<Schema>,
    static_term: Arc<dyn ExecutionPlan>,
    recursive_term: Arc<dyn ExecutionPlan>,
    is_distinct: bool,
) -> Result<RecursiveQueryExec> {
    let recursive_term = recursive_term
        .transform_up(|plan| {
            let Some(read) = plan.downcast_ref::<WorkTableExec>() else {
                return Ok(Transformed::no(plan));
            };
            if read.name() != name || read.schema().fields() == schema.fields() {
                return Ok(Transformed::no(plan));
            }
            let whole: Arc<dyn ExecutionPlan> =
                Arc::new(WorkTableExec::new(name.clone(), Arc::clone(&schema), None)?);
            let columns = read
                .schema()
                .fields()
                .iter()
                .map(|field| {
                    let index = schema.index_of(field.name()).map_err(|_| {
                        DataFusionError::Plan(format!(
                            "work table '{name}' has no column '{}'",
                            field.name()
                        ))
                    })?;
                    let column: Arc<dyn PhysicalExpr> = Arc::new(Column::new(field.name(), index));
                    Ok((column, field.name().clone()))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Transformed::yes(
                Arc::new(ProjectionExec::try_new(columns, whole)?) as Arc<dyn ExecutionPlan>,
            ))
        })?
        .data;
    RecursiveQueryExec::try_new(name, schema, static_term, recursive_term, is_distinct)
}
