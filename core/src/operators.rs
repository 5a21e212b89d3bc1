//! What Quiver's own execution plan operators share.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::error::{DataFusionError, Result};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::{ExecutionPlan, Partitioning, PlanProperties};

/// The one child of an operator that takes exactly one, from `with_new_children`.
pub fn only_child(
    children: Vec<Arc<dyn ExecutionPlan>>,
    operator: &str,
) -> Result<Arc<dyn ExecutionPlan>> {
    let [child] = <[_; 1]>::try_from(children)
        .map_err(|_| DataFusionError::Internal(format!("{operator} takes exactly one child")))?;
    Ok(child)
}

/// Properties of an operator that emits its rows once its input is done:
/// `partitions` partitions of `schema`, with no known order.
pub fn final_output(schema: SchemaRef, partitions: usize) -> Arc<PlanProperties> {
    Arc::new(PlanProperties::new(
        EquivalenceProperties::new(schema),
        Partitioning::UnknownPartitioning(partitions),
        EmissionType::Final,
        Boundedness::Bounded,
    ))
}
