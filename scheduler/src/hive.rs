//! Hive-partitioned tables whose partition columns may hold nulls.
//!
//! A null partition value is written as the folder `col=__HIVE_DEFAULT_PARTITION__`,
//! as Hive and Spark write it. DataFusion's listing parses each folder's value
//! into the column's type and has no such marker: it would read the marker
//! back as a string, or fail for any other type. So a partitioned table is a
//! listing table whose partition columns are all strings (the raw folder
//! values), wrapped by [`HivePartitionedTable`], which shows them in their
//! declared types with the marker as null:
//!
//! - a scan projects each raw column through `CASE WHEN raw = marker THEN
//!   NULL ELSE CAST(raw AS type) END`;
//! - filters on partition columns are rewritten onto the raw columns with the
//!   same expression, so the listing still prunes files by them exactly, null
//!   semantics included. An equality on a string column stays a plain
//!   equality, so that the listing lists only that folder;
//! - an insert casts the partition columns to strings, which the write path
//!   turns into folders (nulls into the marker).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, Constraints, DFSchema, ScalarValue};
use datafusion::datasource::listing::ListingTable;
use datafusion::error::Result;
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{
    Expr, Operator, TableProviderFilterPushDown, TableType, binary_expr, cast, lit, when,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::projection::ProjectionExec;
use quiver_core::write::partition::NULL_PARTITION;

/// A listing table with string partition columns, shown in their declared types.
#[derive(Debug)]
pub struct HivePartitionedTable {
    /// The listing, whose partition columns are strings: the raw folder values.
    raw: ListingTable,
    /// The table's schema, with the partition columns in their declared types.
    schema: SchemaRef,
    /// The declared type of each partition column.
    partition_types: HashMap<String, DataType>,
}

impl HivePartitionedTable {
    /// Wraps `raw`, a listing whose partition columns are strings.
    /// `partition_columns` are their declared types.
    pub fn new(raw: ListingTable, partition_columns: &[(String, DataType)]) -> Self {
        let partition_types: HashMap<String, DataType> =
            partition_columns.iter().cloned().collect();
        let raw_schema = raw.schema();
        let fields: Vec<Field> = raw_schema
            .fields()
            .iter()
            .map(|field| match partition_types.get(field.name()) {
                Some(declared) => Field::new(field.name(), declared.clone(), true),
                None => field.as_ref().clone(),
            })
            .collect();
        let schema = Arc::new(Schema::new_with_metadata(
            fields,
            raw_schema.metadata().clone(),
        ));
        Self {
            raw,
            schema,
            partition_types,
        }
    }

    /// The declared-type value of the raw partition column `raw`.
    fn typed(raw: Expr, declared: &DataType) -> Result<Expr> {
        let converted = if declared == &DataType::Utf8 {
            raw.clone()
        } else {
            cast(raw.clone(), declared.clone())
        };
        when(
            raw.eq(lit(NULL_PARTITION)),
            lit(ScalarValue::try_from(declared)?),
        )
        .otherwise(converted)
    }

    /// `plan` with each partition column `c` replaced by `convert(c, declared
    /// type)`; `plan` itself when it has none.
    fn convert_partition_columns(
        &self,
        state: &dyn Session,
        plan: Arc<dyn ExecutionPlan>,
        convert: impl Fn(Expr, &DataType) -> Result<Expr>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let schema = plan.schema();
        let touched = schema
            .fields()
            .iter()
            .any(|field| self.partition_types.contains_key(field.name()));
        if !touched {
            return Ok(plan);
        }
        let df_schema = DFSchema::try_from(Arc::clone(&schema))?;
        let expressions = schema
            .fields()
            .iter()
            .map(|field| {
                let column = Expr::Column(Column::new_unqualified(field.name()));
                let expr = match self.partition_types.get(field.name()) {
                    Some(declared) => convert(column, declared)?,
                    None => column,
                };
                let physical = state.create_physical_expr(expr, &df_schema)?;
                Ok((physical, field.name().clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(ProjectionExec::try_new(expressions, plan)?))
    }

    /// `filter` over the raw columns.
    fn raw_filter(&self, filter: &Expr) -> Result<Expr> {
        if let Some(plain) = self.plain_string_equality(filter) {
            return Ok(plain);
        }
        filter
            .clone()
            .transform(|expr| match &expr {
                Expr::Column(column) => match self.partition_types.get(column.name()) {
                    Some(declared) => Ok(Transformed::yes(Self::typed(expr.clone(), declared)?)),
                    None => Ok(Transformed::no(expr)),
                },
                _ => Ok(Transformed::no(expr)),
            })
            .map(|rewritten| rewritten.data)
    }

    /// `column = 'value'` on a string partition column, for a value other
    /// than the marker, means the same on the raw column; kept plain, it lets
    /// the listing list only that folder.
    fn plain_string_equality(&self, filter: &Expr) -> Option<Expr> {
        let Expr::BinaryExpr(binary) = filter else {
            return None;
        };
        if binary.op != Operator::Eq {
            return None;
        }
        let (column, value) = match (binary.left.as_ref(), binary.right.as_ref()) {
            (Expr::Column(column), Expr::Literal(value, _))
            | (Expr::Literal(value, _), Expr::Column(column)) => (column, value),
            _ => return None,
        };
        let is_string_column = matches!(
            self.partition_types.get(column.name()),
            Some(DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8)
        );
        match value.try_as_str() {
            Some(Some(text)) if is_string_column && text != NULL_PARTITION => Some(binary_expr(
                Expr::Column(column.clone()),
                Operator::Eq,
                lit(text),
            )),
            _ => None,
        }
    }
}

#[async_trait]
impl TableProvider for HivePartitionedTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn constraints(&self) -> Option<&Constraints> {
        self.raw.constraints()
    }

    fn table_type(&self) -> TableType {
        self.raw.table_type()
    }

    fn get_table_definition(&self) -> Option<&str> {
        self.raw.get_table_definition()
    }

    fn get_column_default(&self, column: &str) -> Option<&Expr> {
        self.raw.get_column_default(column)
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let filters = filters
            .iter()
            .map(|filter| self.raw_filter(filter))
            .collect::<Result<Vec<_>>>()?;
        let scan = self.raw.scan(state, projection, &filters, limit).await?;
        self.convert_partition_columns(state, scan, Self::typed)
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        let raw = filters
            .iter()
            .map(|filter| self.raw_filter(filter))
            .collect::<Result<Vec<_>>>()?;
        self.raw
            .supports_filters_pushdown(&raw.iter().collect::<Vec<_>>())
    }

    async fn insert_into(
        &self,
        state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let input = self.convert_partition_columns(state, input, |column, _| {
            Ok(cast(column, DataType::Utf8))
        })?;
        self.raw.insert_into(state, input, insert_op).await
    }
}
