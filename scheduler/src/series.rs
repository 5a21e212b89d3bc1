//! `range()` and `generate_series()` scans that always generate their whole
//! row, with the query's projection applied by a `ProjectionExec` above them.
//!
//! DataFusion pushes a projection into the series' `LazyMemoryExec`, and
//! datafusion-proto 55 serializes that operator with its projected schema but
//! without the projection. An executor then decodes a generator whose `value`
//! column no longer fits the schema, and `SELECT count(*) FROM range(10)`
//! failed with "number of columns(1) must match number of fields(0)".

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::Result;
use datafusion::execution::SessionState;
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::projection::ProjectionExec;

/// The table functions whose scans are wrapped.
const SERIES_FUNCTIONS: [&str; 2] = ["range", "generate_series"];

/// Replaces the series functions of `state` with whole-row versions.
pub fn register_whole_row_series(state: &mut SessionState) {
    for name in SERIES_FUNCTIONS {
        let Some(function) = state.table_functions().get(name) else {
            continue;
        };
        let inner = Arc::clone(function.function());
        state.register_udtf(name, Arc::new(WholeRowSeries(inner)));
    }
}

#[derive(Debug)]
struct WholeRowSeries(Arc<dyn TableFunctionImpl>);

impl TableFunctionImpl for WholeRowSeries {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let table = self.0.call_with_args(args)?;
        Ok(Arc::new(WholeRowScan(table)))
    }
}

#[derive(Debug)]
struct WholeRowScan(Arc<dyn TableProvider>);

#[async_trait]
impl TableProvider for WholeRowScan {
    fn schema(&self) -> SchemaRef {
        self.0.schema()
    }

    fn table_type(&self) -> TableType {
        self.0.table_type()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let whole = self.0.scan(state, None, filters, limit).await?;
        let Some(columns) = projection else {
            return Ok(whole);
        };
        let schema = whole.schema();
        let expressions = columns
            .iter()
            .map(|&index| {
                let name = schema.field(index).name().clone();
                let column: Arc<dyn PhysicalExpr> = Arc::new(Column::new(&name, index));
                (column, name)
            })
            .collect::<Vec<_>>();
        Ok(Arc::new(ProjectionExec::try_new(expressions, whole)?))
    }
}
