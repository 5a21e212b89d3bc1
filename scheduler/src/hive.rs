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
//!   semantics included. An equality with a value whose folder name is one
//!   canonical text (a string, integer, date or boolean) becomes a plain
//!   equality on the raw column, so that the listing lists only that folder,
//!   as DataFusion's own listing does for typed partition columns;
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
use quiver_core::write::partition::{NULL_PARTITION, has_one_folder_spelling};

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

    /// The listing underneath, whose partition columns are strings.
    pub fn listing(&self) -> &ListingTable {
        &self.raw
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
        raw_filter(&self.partition_types, filter)
    }
}

/// `filter` over the raw (string) partition columns, given the declared
/// type of each partition column.
fn raw_filter(partition_types: &HashMap<String, DataType>, filter: &Expr) -> Result<Expr> {
    if let Some(plain) = folder_equality(partition_types, filter) {
        return Ok(plain);
    }
    filter
        .clone()
        .transform(|expr| match &expr {
            Expr::Column(column) => match partition_types.get(column.name()) {
                Some(declared) => Ok(Transformed::yes(HivePartitionedTable::typed(
                    expr.clone(),
                    declared,
                )?)),
                None => Ok(Transformed::no(expr)),
            },
            _ => Ok(Transformed::no(expr)),
        })
        .map(|rewritten| rewritten.data)
}

/// `column = value` on a partition column, for a value that is written as
/// one canonical folder name, means `raw = 'name'`. Kept a plain equality,
/// it lets the listing list only that folder. Strings, integers, dates and
/// booleans have one text each (`2024`, `2024-01-31`, `true`), the one that
/// Quiver, DataFusion, Hive and Spark write; folders spelled otherwise (say
/// `year=02024`) are then not found, as with DataFusion's typed listing. A
/// string that some writer escapes has several folder names, so it is not
/// looked up by one.
/// Other types (floats, decimals, timestamps) have several spellings of one
/// value, so their filters stay on the converted value, over every folder.
fn folder_equality(partition_types: &HashMap<String, DataType>, filter: &Expr) -> Option<Expr> {
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
    let declared = partition_types.get(column.name())?;
    // The listing spells the folder's name as an object store path, which
    // escapes a non-ASCII column name that writers keep as it is.
    if !has_one_folder_spelling(column.name()) {
        return None;
    }
    let name = match declared {
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => string_folder(value)?,
        // The type of the partition columns that a table infers.
        DataType::Dictionary(_, values) if values.as_ref() == &DataType::Utf8 => {
            string_folder(value)?
        }
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64
        | DataType::Date32
        | DataType::Boolean
            if &value.data_type() == declared && !value.is_null() =>
        {
            value.to_string()
        }
        _ => return None,
    };
    (name != NULL_PARTITION)
        .then(|| binary_expr(Expr::Column(column.clone()), Operator::Eq, lit(name)))
}

/// The folder text of a string literal, if every writer spells it one way.
/// `a:b` may lie in `p=a:b` or `p=a%3Ab`, `ü` in `p=ü` or `p=%C3%BC`: such
/// values are compared on every folder.
fn string_folder(value: &ScalarValue) -> Option<String> {
    let text = value.try_as_str().flatten()?;
    has_one_folder_spelling(text).then(|| text.to_owned())
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

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::col;

    use super::*;

    fn types() -> HashMap<String, DataType> {
        HashMap::from([
            ("region".to_owned(), DataType::Utf8),
            ("year".to_owned(), DataType::Int32),
            ("day".to_owned(), DataType::Date32),
            ("price".to_owned(), DataType::Float64),
            (
                "inferred".to_owned(),
                DataType::Dictionary(Box::new(DataType::UInt16), Box::new(DataType::Utf8)),
            ),
            ("ü".to_owned(), DataType::Utf8),
        ])
    }

    fn raw(filter: Expr) -> Expr {
        raw_filter(&types(), &filter).expect("rewrites")
    }

    #[test]
    fn an_equality_with_one_folder_name_stays_a_plain_equality() {
        assert_eq!(
            raw(col("region").eq(lit("EU"))),
            col("region").eq(lit("EU"))
        );
        assert_eq!(
            raw(lit(2024i32).eq(col("year"))),
            col("year").eq(lit("2024"))
        );
        let day = ScalarValue::Date32(Some(19_753));
        assert_eq!(
            raw(col("day").eq(lit(day))),
            col("day").eq(lit("2024-01-31"))
        );
        // An inferred partition column, compared with a dictionary literal.
        let dictionary = ScalarValue::Dictionary(
            Box::new(DataType::UInt16),
            Box::new(ScalarValue::from("2021")),
        );
        assert_eq!(
            raw(col("inferred").eq(lit(dictionary))),
            col("inferred").eq(lit("2021"))
        );
    }

    #[test]
    fn a_value_or_name_spelled_several_ways_is_compared_on_every_folder() {
        for filter in [
            col("region").eq(lit("a:b")),
            col("region").eq(lit("ünï")),
            col("region").eq(lit("a+b")),
            col("ü").eq(lit("EU")),
        ] {
            let rewritten = raw(filter.clone());
            assert_ne!(rewritten, filter, "{filter} must not list one folder");
        }
    }

    #[test]
    fn other_filters_are_evaluated_on_the_typed_value() {
        let typed_year = HivePartitionedTable::typed(col("year"), &DataType::Int32).expect("typed");
        // Not an equality, the marker, or a literal of another type.
        assert_eq!(
            raw(col("year").gt(lit(2024i32))),
            typed_year.clone().gt(lit(2024i32))
        );
        assert_eq!(
            raw(col("year").eq(lit(2024i64))),
            typed_year.eq(lit(2024i64))
        );
        let marker = raw(col("region").eq(lit(NULL_PARTITION)));
        assert_ne!(marker, col("region").eq(lit(NULL_PARTITION)));
        // A float has several spellings of one value: `1.5`, `1.50`.
        let typed_price =
            HivePartitionedTable::typed(col("price"), &DataType::Float64).expect("typed");
        assert_eq!(
            raw(col("price").eq(lit(1.5f64))),
            typed_price.eq(lit(1.5f64))
        );
    }
}
