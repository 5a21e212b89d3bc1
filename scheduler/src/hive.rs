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
//!   semantics included;
//! - an equality that the listing can turn into a folder prefix, so that it
//!   lists only that folder, becomes a plain equality on the raw column. For
//!   a string that every writer spells one way, that is the string itself.
//!   Other types have several spellings of one value (`month=1` and
//!   `month=01`, `1.5` and `1.50`), so the scan lists the folders of the
//!   filtered columns, level by level, and keeps the plain equality only
//!   where one folder holds the value ([`equality_folders`]);
//! - an insert casts the partition columns to strings, which the write path
//!   turns into folders (nulls into the marker).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, Constraints, DFSchema, ScalarValue, plan_err};
use datafusion::datasource::file_format::parquet::ParquetSink;
use datafusion::datasource::listing::ListingTable;
use datafusion::datasource::physical_plan::{FileScanConfig, FileSink};
use datafusion::datasource::sink::DataSinkExec;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{
    Expr, Operator, TableProviderFilterPushDown, TableType, binary_expr, cast, lit, when,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::projection::ProjectionExec;
use object_store::ObjectStore;
use object_store::path::Path;
use quiver_core::write::partition::{
    NULL_PARTITION, folder_values, has_one_folder_spelling, is_string_type,
};

/// A listing table with string partition columns, shown in their declared types.
#[derive(Debug)]
pub struct HivePartitionedTable {
    /// The listing, whose partition columns are strings: the raw folder values.
    raw: ListingTable,
    /// The table's schema, with the partition columns in their declared types.
    schema: SchemaRef,
    /// The partition columns in folder order, with their declared types.
    partition_columns: Vec<(String, DataType)>,
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
            partition_columns: partition_columns.to_vec(),
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

    /// Fails, naming the folder, when a file that `scan` reads lies in a
    /// partition folder whose value is not of its column's declared type
    /// (`month=abc` for an `INT` month): the cast in the scan's projection
    /// would fail in a task with an error that names neither. A query that
    /// reads no partition column (`count(*)`) fails too, rather than count
    /// rows that no other query can read.
    fn check_partition_values(&self, scan: &Arc<dyn ExecutionPlan>) -> Result<()> {
        let mut checked: HashSet<(usize, &str)> = HashSet::new();
        let mut files = Vec::new();
        scan.apply(|node| {
            if let Some(config) = node
                .downcast_ref::<DataSourceExec>()
                .and_then(|source| source.data_source().downcast_ref::<FileScanConfig>())
            {
                files.extend(config.file_groups.iter().flat_map(|group| group.iter()));
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        for file in files {
            let columns = self.partition_columns.iter().zip(&file.partition_values);
            for (index, ((name, declared), value)) in columns.enumerate() {
                let ScalarValue::Utf8(Some(raw)) = value else {
                    continue;
                };
                if declared == &DataType::Utf8
                    || raw == NULL_PARTITION
                    || !checked.insert((index, raw.as_str()))
                {
                    continue;
                }
                if let Err(error) = value.cast_to(declared) {
                    let location = self
                        .raw
                        .table_paths()
                        .iter()
                        .map(|url| url.as_str())
                        .collect::<Vec<_>>()
                        .join(", ");
                    return plan_err!(
                        "the partition folder '{name}={raw}' of the table at {location} \
                         (file {}) does not hold a {declared} value for column '{name}': \
                         {error}; remove or rename the folder, or declare the column with \
                         a type that holds its value",
                        file.object_meta.location
                    );
                }
            }
        }
        Ok(())
    }

    /// For the leading partition columns that `filters` hold equal to a
    /// literal, the raw value of the one folder that holds it (see
    /// [`equality_folders`]).
    async fn equality_folders(
        &self,
        state: &dyn Session,
        filters: &[Expr],
    ) -> Result<FoundFolders> {
        // A table of several folders, or of a glob, is not one folder tree.
        let [url] = self.raw.table_paths().as_slice() else {
            return Ok(HashMap::new());
        };
        if url.get_glob().is_some() {
            return Ok(HashMap::new());
        }
        let store = state.runtime_env().object_store(url)?;
        equality_folders(
            store.as_ref(),
            url.prefix(),
            &self.partition_columns,
            filters,
        )
        .await
    }
}

/// `plan`, a write into the raw listing, with the partition columns' declared
/// types in its Parquet sink, whose rows still carry them as strings. The
/// commit of an overwrite compares folders by their typed values, so that it
/// replaces `month=01` where it writes `month=1`.
fn with_declared_partition_types(
    plan: Arc<dyn ExecutionPlan>,
    partition_columns: &[(String, DataType)],
) -> Arc<dyn ExecutionPlan> {
    let Some(write) = plan.downcast_ref::<DataSinkExec>() else {
        return plan;
    };
    let Some(parquet) = write.sink().downcast_ref::<ParquetSink>() else {
        return plan;
    };
    let mut config = parquet.config().clone();
    config.table_partition_cols = partition_columns.to_vec();
    let sink = ParquetSink::new(config, parquet.parquet_options().clone());
    Arc::new(DataSinkExec::new(
        Arc::clone(write.input()),
        Arc::new(sink),
        write.sort_order().clone(),
    ))
}

/// For each column whose value [`equality_folders`] found in one folder:
/// that value, and the folder's raw value.
pub type FoundFolders = HashMap<String, (ScalarValue, String)>;

/// Whether `error` is, at its root, a value that could not be converted:
/// a failed cast, or a text that does not parse as a time or a number.
fn is_cast_error(error: &DataFusionError) -> bool {
    matches!(error.find_root(), DataFusionError::ArrowError(inner, _)
    if matches!(
        inner.as_ref(),
        ArrowError::CastError(_) | ArrowError::ParseError(_) | ArrowError::InvalidArgumentError(_)
    ))
}

/// `filter`'s column and literal, if it is `column = literal`.
fn literal_equality(filter: &Expr) -> Option<(&Column, &ScalarValue)> {
    let Expr::BinaryExpr(binary) = filter else {
        return None;
    };
    if binary.op != Operator::Eq {
        return None;
    }
    match (binary.left.as_ref(), binary.right.as_ref()) {
        (Expr::Column(column), Expr::Literal(value, _))
        | (Expr::Literal(value, _), Expr::Column(column)) => Some((column, value)),
        _ => None,
    }
}

/// For each leading partition column (in folder order) that `filters` hold
/// equal to a literal, the raw value of the one folder that holds it, found
/// by listing that level's folders under the folders already found:
/// `month = 1` finds `month=01` where that is how the folder is spelled.
/// The first column that is not filtered so, or whose value lies in several
/// folders (`month=1` and `month=01`), ends the search: its filter and those
/// after it are evaluated on every folder's typed value. A value that no
/// folder holds is given its canonical text, whose folder does not exist.
///
/// A string that every writer spells one way needs no listing: the folder is
/// the string. Each other filtered level costs one listing of its folders.
pub async fn equality_folders(
    store: &dyn ObjectStore,
    table: &Path,
    partition_columns: &[(String, DataType)],
    filters: &[Expr],
) -> Result<FoundFolders> {
    let mut equalities: HashMap<&str, Vec<&ScalarValue>> = HashMap::new();
    for (column, value) in filters.iter().filter_map(literal_equality) {
        let values = equalities.entry(column.name()).or_default();
        if !values.contains(&value) {
            values.push(value);
        }
    }
    let mut found = FoundFolders::new();
    let mut prefix = table.clone();
    for (name, declared) in partition_columns {
        // Held equal to two values, the column names no one folder.
        let Some([value]) = equalities.get(name.as_str()).map(Vec::as_slice) else {
            break;
        };
        let value = *value;
        // The listing spells the folder's name as an object store path, which
        // escapes a non-ASCII column name that writers keep as it is.
        if !has_one_folder_spelling(name) {
            break;
        }
        if is_string_type(declared) {
            let Some(text) = string_folder(value) else {
                break;
            };
            prefix = prefix.join(format!("{name}={text}"));
            continue;
        }
        if value.is_null() || &value.data_type() != declared {
            break;
        }
        let folders = match store.list_with_delimiter(Some(&prefix)).await {
            Ok(listed) => listed.common_prefixes,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(error) => return Err(error.into()),
        };
        let holding: Vec<String> = folders
            .iter()
            .filter_map(|folder| {
                let (column, raw) = folder_values(folder.filename()?).into_iter().next()?;
                let typed = ScalarValue::try_from_string(raw.clone(), declared).ok()?;
                (column == name && &typed == value).then_some(raw)
            })
            .collect();
        // A folder spelled with escapes (`ts=2024-01-01T00%3A00%3A00`)
        // cannot be a prefix of the listing: its filter stays typed.
        let raw = match holding.as_slice() {
            [] => value.to_string(),
            [raw] => raw.clone(),
            _ => break,
        };
        if !has_one_folder_spelling(&raw) {
            break;
        }
        found.insert(name.clone(), (value.clone(), raw.clone()));
        if holding.is_empty() {
            break;
        }
        prefix = prefix.join(format!("{name}={raw}"));
    }
    Ok(found)
}

/// `filter` over the raw (string) partition columns, given the declared
/// type of each partition column and the raw values of the folders that
/// [`equality_folders`] found.
fn raw_filter(
    partition_types: &HashMap<String, DataType>,
    folders: &FoundFolders,
    filter: &Expr,
) -> Result<Expr> {
    if let Some(plain) = folder_equality(partition_types, folders, filter) {
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

/// `column = value` on a partition column as `raw = 'folder value'`, where
/// the value lies in one folder: a string that every writer spells one way,
/// or a value whose folder [`equality_folders`] found. Kept a plain equality,
/// it lets the listing list only that folder. A string that some writer
/// escapes has several folder names, and so may any other value, so those
/// are compared on every folder's typed value.
fn folder_equality(
    partition_types: &HashMap<String, DataType>,
    folders: &FoundFolders,
    filter: &Expr,
) -> Option<Expr> {
    let (column, value) = literal_equality(filter)?;
    let declared = partition_types.get(column.name())?;
    let name = match folders.get(column.name()) {
        Some((found, raw)) if found == value => raw.clone(),
        // Looked up for another value: `month = 1 AND month = 2`.
        Some(_) => return None,
        // See `equality_folders` for the column name.
        None if is_string_type(declared) && has_one_folder_spelling(column.name()) => {
            string_folder(value)?
        }
        None => return None,
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
        let folders = self.equality_folders(state, filters).await?;
        let filters = filters
            .iter()
            .map(|filter| raw_filter(&self.partition_types, &folders, filter))
            .collect::<Result<Vec<_>>>()?;
        let scan = match self.raw.scan(state, projection, &filters, limit).await {
            Ok(scan) => scan,
            // Pruning casts every folder's value to its declared type: find
            // the folder that failed it, to name it.
            Err(error) if is_cast_error(&error) => {
                let whole = self.raw.scan(state, None, &[], None).await?;
                self.check_partition_values(&whole)?;
                return Err(error);
            }
            Err(error) => return Err(error),
        };
        self.check_partition_values(&scan)?;
        self.convert_partition_columns(state, scan, Self::typed)
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        let raw = filters
            .iter()
            .map(|filter| raw_filter(&self.partition_types, &HashMap::new(), filter))
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
        let plan = self.raw.insert_into(state, input, insert_op).await?;
        Ok(with_declared_partition_types(plan, &self.partition_columns))
    }
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::col;
    use object_store::local::LocalFileSystem;

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

    /// `filter` over the raw columns, where no folder was looked up.
    fn raw(filter: Expr) -> Expr {
        raw_filter(&types(), &HashMap::new(), &filter).expect("rewrites")
    }

    fn typed(column: &str) -> Expr {
        HivePartitionedTable::typed(col(column), &types()[column]).expect("typed")
    }

    #[test]
    fn an_equality_with_one_folder_name_stays_a_plain_equality() {
        assert_eq!(
            raw(col("region").eq(lit("EU"))),
            col("region").eq(lit("EU"))
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
        // A value whose one folder was found, in that folder's spelling.
        let folders = HashMap::from([(
            "year".to_owned(),
            (ScalarValue::Int32(Some(2024)), "02024".to_owned()),
        )]);
        let filter = lit(2024i32).eq(col("year"));
        assert_eq!(
            raw_filter(&types(), &folders, &filter).expect("rewrites"),
            col("year").eq(lit("02024"))
        );
        // Not for another value of the column.
        let other = col("year").eq(lit(2025i32));
        assert_eq!(
            raw_filter(&types(), &folders, &other).expect("rewrites"),
            typed("year").eq(lit(2025i32))
        );
    }

    #[test]
    fn a_value_that_may_lie_in_several_folders_is_compared_on_every_folder() {
        for filter in [
            col("region").eq(lit("a:b")),
            col("region").eq(lit("ünï")),
            col("region").eq(lit("a+b")),
            col("ü").eq(lit("EU")),
        ] {
            let rewritten = raw(filter.clone());
            assert_ne!(rewritten, filter, "{filter} must not list one folder");
        }
        // `year=2024` and `year=02024`, `day=2024-01-31` and `day=2024-1-31`,
        // `price=1.5` and `price=1.50`, unless their folders were listed.
        let day = ScalarValue::Date32(Some(19_753));
        assert_eq!(
            raw(col("year").eq(lit(2024i32))),
            typed("year").eq(lit(2024i32))
        );
        assert_eq!(
            raw(col("day").eq(lit(day.clone()))),
            typed("day").eq(lit(day))
        );
        assert_eq!(
            raw(col("price").eq(lit(1.5f64))),
            typed("price").eq(lit(1.5f64))
        );
    }

    #[test]
    fn other_filters_are_evaluated_on_the_typed_value() {
        // Not an equality, the marker, or a literal of another type.
        assert_eq!(
            raw(col("year").gt(lit(2024i32))),
            typed("year").gt(lit(2024i32))
        );
        assert_eq!(
            raw(col("year").eq(lit(2024i64))),
            typed("year").eq(lit(2024i64))
        );
        let marker = raw(col("region").eq(lit(NULL_PARTITION)));
        assert_ne!(marker, col("region").eq(lit(NULL_PARTITION)));
    }

    /// The folders that `equality_folders` finds for `filters` in a tree of
    /// `region`, `year` and `month` folders.
    async fn folders_for(filters: &[Expr]) -> HashMap<String, String> {
        let tree = tempfile::tempdir().expect("temp folder");
        for folder in [
            "region=EU/year=2024/month=01",
            "region=EU/year=2024/month=2",
            "region=EU/year=2025/month=1",
            "region=EU/year=2025/month=01",
            "region=EU/year=2025/month=__HIVE_DEFAULT_PARTITION__",
            "region=US/year=02024/month=1",
        ] {
            let folder = tree.path().join(folder);
            std::fs::create_dir_all(&folder).expect("folders");
            std::fs::write(folder.join("part-0.parquet"), b"data").expect("file");
        }
        let store = LocalFileSystem::new_with_prefix(tree.path()).expect("store");
        let columns = [
            ("region".to_owned(), DataType::Utf8),
            ("year".to_owned(), DataType::Int32),
            ("month".to_owned(), DataType::Int64),
        ];
        equality_folders(&store, &Path::default(), &columns, filters)
            .await
            .expect("lists")
            .into_iter()
            .map(|(column, (_, raw))| (column, raw))
            .collect()
    }

    fn found(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(column, raw)| ((*column).to_owned(), (*raw).to_owned()))
            .collect()
    }

    /// A timestamp's folder is escaped (`:` as `%3A`) on object stores, and
    /// cannot be a listing prefix: its filter stays typed.
    #[tokio::test]
    async fn an_escaped_folder_is_not_looked_up_by_its_name() {
        let store = object_store::memory::InMemory::new();
        let file = Path::parse("ts=2024-01-01T00%3A00%3A00/part-0.parquet").expect("path");
        object_store::ObjectStoreExt::put(
            &store,
            &file,
            object_store::PutPayload::from_static(b"data"),
        )
        .await
        .expect("put");
        let declared = DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None);
        let value = ScalarValue::try_from_string("2024-01-01T00:00:00".into(), &declared)
            .expect("a timestamp");
        let columns = [("ts".to_owned(), declared)];
        let filters = [col("ts").eq(lit(value))];
        let found = equality_folders(&store, &Path::default(), &columns, &filters)
            .await
            .expect("lists");
        assert!(found.is_empty(), "{found:?}");
    }

    #[tokio::test]
    async fn each_filtered_level_finds_the_folder_that_holds_its_value() {
        let eu = col("region").eq(lit("EU"));
        let us = col("region").eq(lit("US"));
        let year = |value: i32| col("year").eq(lit(value));
        let month = |value: i64| lit(value).eq(col("month"));
        // `month=01` holds 1 and `month=2` holds 2.
        assert_eq!(
            folders_for(&[eu.clone(), year(2024), month(1)]).await,
            found(&[("year", "2024"), ("month", "01")])
        );
        assert_eq!(
            folders_for(&[month(2), year(2024), eu.clone()]).await,
            found(&[("year", "2024"), ("month", "2")])
        );
        assert_eq!(
            folders_for(&[us, year(2024), month(1)]).await,
            found(&[("year", "02024"), ("month", "1")])
        );
        // Two folders hold 1; the marker is no number.
        assert_eq!(
            folders_for(&[eu.clone(), year(2025), month(1)]).await,
            found(&[("year", "2025")])
        );
        // No folder holds 2023: its canonical folder lists nothing.
        assert_eq!(
            folders_for(&[eu.clone(), year(2023), month(1)]).await,
            found(&[("year", "2023")])
        );
        // Two values of one column, or an escaped folder, end the search.
        assert_eq!(
            folders_for(&[eu.clone(), year(2024), year(2025), month(1)]).await,
            found(&[])
        );
        assert_eq!(
            folders_for(&[eu.clone(), year(2024), year(2024), month(2)]).await,
            found(&[("year", "2024"), ("month", "2")])
        );
        // A level without an equality ends the search.
        assert_eq!(folders_for(&[year(2024), month(1)]).await, found(&[]));
        assert_eq!(
            folders_for(&[eu, col("year").gt(lit(2000i32)), month(1)]).await,
            found(&[])
        );
    }
}
