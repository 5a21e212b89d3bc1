//! How `CREATE EXTERNAL TABLE` makes its table: DataFusion's listing tables,
//! with these changes.
//!
//! - The definition kept for `SHOW CREATE TABLE` and `information_schema`
//!   has its secret store options redacted.
//! - A Parquet table on a folder reads only the folder's `.parquet` files.
//!   DataFusion does so already when it infers the columns, but a table
//!   declared with its columns would read every object in the folder, and
//!   fail on the `_SUCCESS` and `.crc` files that Spark writes next to its
//!   data. (Folders of extension-less Parquet files, as Hive writes, need a
//!   glob in the location, such as `.../*`.)
//! - A Parquet table on a folder, declared without columns, infers its
//!   columns from the `.parquet` files that it will read, and its partition
//!   columns from their `col=value` folders; declared partition columns are
//!   checked against those files too. DataFusion looks at every file: the
//!   `_SUCCESS` marker that Spark and Hadoop write at the top of a
//!   partitioned folder made it report "mixed partition values", and on an
//!   object store a non-empty marker or Hadoop's `.crc` files were read as
//!   Parquet and failed the statement.
//! - Columns that the table infers from its files are nullable, whatever
//!   the files say, as Spark and Trino take them: a file added later may lack
//!   the column or hold nulls in it, and a column taken as `NOT NULL` would
//!   let the optimizer fold `col IS NULL` to false, silently finding none of
//!   those rows. Columns declared `NOT NULL` stay so.
//! - A hive-partitioned table reads null partition values
//!   (`col=__HIVE_DEFAULT_PARTITION__`) as nulls: see [`crate::hive`].

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::common::{DFSchema, internal_err, plan_err};
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::listing_table_factory::ListingTableFactory;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::CreateExternalTable;
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectMeta, ObjectStore};
use quiver_core::guard::catch_future_panic;
use quiver_core::storage::redact_sql;
use quiver_core::write::partition::folder_values;

use crate::hive::HivePartitionedTable;

/// The extension of the data files that a Parquet folder table reads.
const PARQUET_EXTENSION: &str = ".parquet";

/// The table factory of one file format.
#[derive(Debug, Default)]
pub struct TableFactory {
    listing: ListingTableFactory,
}

/// The file formats that `CREATE EXTERNAL TABLE` takes.
pub const FORMATS: [&str; 4] = ["PARQUET", "CSV", "JSON", "ARROW"];

impl TableFactory {
    /// DataFusion's listing table for a partitioned Parquet folder with
    /// declared columns, and its partition columns. DataFusion's factory
    /// checks the partition folders against a sample of every file below the
    /// folder, so the `_SUCCESS` marker at its top failed it with "mixed
    /// partition values". The factory therefore sees the partition columns as
    /// plain columns, and they are checked here against the data files.
    async fn partitioned_parquet_folder(
        &self,
        state: &dyn Session,
        cmd: &CreateExternalTable,
        folder: &ListingTableUrl,
    ) -> Result<(Arc<dyn TableProvider>, Vec<(String, DataType)>)> {
        let partition_columns = cmd
            .table_partition_cols
            .iter()
            .map(|name| {
                let field = cmd.schema.field_with_unqualified_name(name)?;
                Ok((name.clone(), field.data_type().clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut unpartitioned = cmd.clone();
        unpartitioned.table_partition_cols.clear();
        let table = self.listing.create(state, &unpartitioned).await?;
        let format = match table.downcast_ref::<ListingTable>() {
            Some(listing) => Arc::clone(&listing.options().format),
            None => return internal_err!("a Parquet folder table is not a listing table"),
        };
        ListingOptions::new(format)
            .with_file_extension(PARQUET_EXTENSION)
            .with_table_partition_cols(partition_columns.clone())
            .validate_partitions(state, folder)
            .await?;
        Ok((table, partition_columns))
    }
}

#[async_trait]
impl TableProviderFactory for TableFactory {
    async fn create(
        &self,
        state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> Result<Arc<dyn TableProvider>> {
        let mut cmd = cmd.clone();
        cmd.definition = cmd.definition.as_deref().map(redact_sql);
        let inferred = cmd.schema.fields().is_empty();
        let folder = parquet_folder(&cmd)?;
        match &folder {
            Some(folder) => declare_parquet_columns(state, &mut cmd, folder).await?,
            None => refuse_empty_parquet_file(state, &cmd).await?,
        }
        let cmd = &cmd;
        let (table, partition_columns) = match &folder {
            Some(folder)
                if !cmd.table_partition_cols.is_empty() && !cmd.schema.fields().is_empty() =>
            {
                self.partitioned_parquet_folder(state, cmd, folder).await?
            }
            _ => {
                let table = self.listing.create(state, cmd).await?;
                let columns = table
                    .downcast_ref::<ListingTable>()
                    .map(|listing| listing.options().table_partition_cols.clone())
                    .unwrap_or_default();
                (table, columns)
            }
        };
        let Some(listing) = table.downcast_ref::<ListingTable>() else {
            return Ok(table);
        };
        // A glob chooses its own files (`.../*` for Hive's extension-less ones).
        let parquet_folder = cmd.file_type.eq_ignore_ascii_case("parquet")
            && listing.options().file_extension.is_empty()
            && listing
                .table_paths()
                .iter()
                .all(|url| url.get_glob().is_none());
        if partition_columns.is_empty() && !parquet_folder && !inferred {
            return Ok(table);
        }
        let mut options = listing.options().clone();
        if parquet_folder {
            options = options.with_file_extension(PARQUET_EXTENSION);
        }
        // The listing reads the raw folder values; see `crate::hive`.
        let options = options.with_table_partition_cols(
            partition_columns
                .iter()
                .map(|(name, _)| (name.clone(), DataType::Utf8))
                .collect(),
        );
        let table_schema = table.schema();
        let file_schema = Schema::new(
            table_schema
                .fields()
                .iter()
                .filter(|field| {
                    !partition_columns
                        .iter()
                        .any(|(name, _)| name == field.name())
                })
                .map(|field| {
                    let nullable = inferred || field.is_nullable();
                    field.as_ref().clone().with_nullable(nullable)
                })
                .collect::<Vec<_>>(),
        );
        let config = ListingTableConfig::new_with_multi_paths(listing.table_paths().clone())
            .with_listing_options(options)
            .with_schema(Arc::new(file_schema));
        let rebuilt = ListingTable::try_new(config)?
            .with_cache(state.runtime_env().cache_manager.get_file_statistic_cache())
            .with_definition(cmd.definition.clone())
            .with_constraints(cmd.constraints.clone())
            .with_column_defaults(cmd.column_defaults.clone());
        if partition_columns.is_empty() {
            Ok(Arc::new(rebuilt))
        } else {
            Ok(Arc::new(HivePartitionedTable::new(
                rebuilt,
                &partition_columns,
            )))
        }
    }
}

/// Declares the columns of a Parquet table on a folder, declared without
/// them, as the folder's data files have them, and its partition columns as
/// their `col=value` folders name them, unless `PARTITIONED BY` names them.
/// The data files are those the table will read: non-empty `.parquet` files
/// in the folder and in its `col=value` folders (other subfolders, such as
/// `_temporary/` and `_manifests/`, are skipped unless
/// `datafusion.execution.listing_table_ignore_subdirectory` is off).
///
/// A folder without any data file is refused if it holds other files, which
/// the table would silently never read, and, declared without columns, if
/// it holds nothing at all (markers and empty objects have no columns).
async fn declare_parquet_columns(
    state: &dyn Session,
    cmd: &mut CreateExternalTable,
    url: &ListingTableUrl,
) -> Result<()> {
    let store = state.runtime_env().object_store(url)?;
    if !cmd.schema.fields().is_empty() {
        // Declared: one data file is enough to know the folder is read.
        let any_data = url
            .list_all_files(state, store.as_ref(), PARQUET_EXTENSION)
            .await?
            .try_filter(|file| futures::future::ready(file.size > 0))
            .try_next()
            .await?;
        if any_data.is_none() {
            refuse_unread_files(state, &store, url).await?;
        }
        return Ok(());
    }
    let files: Vec<ObjectMeta> = url
        .list_all_files(state, store.as_ref(), PARQUET_EXTENSION)
        .await?
        .try_collect()
        .await?;
    if !files.iter().any(|file| file.size > 0) {
        refuse_unread_files(state, &store, url).await?;
        return plan_err!(
            "cannot infer the columns of the table at {url}: it holds no Parquet data \
             file; declare the table's columns"
        );
    }
    let partition_columns = if !cmd.table_partition_cols.is_empty() {
        cmd.table_partition_cols.clone()
    } else if state
        .config_options()
        .execution
        .listing_table_factory_infer_partitions
    {
        folder_partition_columns(url, &files)?
    } else {
        Vec::new()
    };
    // Empty files hold no schema, and their footers cannot be read.
    let files: Vec<ObjectMeta> = files.into_iter().filter(|file| file.size > 0).collect();
    let file_schema = merged_file_schema(state, cmd, url, &store, &files).await?;
    let mut fields: Vec<Field> = file_schema
        .fields()
        .iter()
        .map(|field| field.as_ref().clone())
        .collect();
    for name in &partition_columns {
        if file_schema.field_with_name(name).is_ok() {
            return plan_err!(
                "column '{name}' of the table at {url} is both in its Parquet files \
                 and a partition folder ('{name}=...'); declare the table's columns"
            );
        }
        // The type DataFusion gives the partition columns it infers.
        let dictionary = DataType::Dictionary(Box::new(DataType::UInt16), Box::new(DataType::Utf8));
        fields.push(Field::new(name, dictionary, true));
    }
    cmd.schema = Arc::new(DFSchema::try_from(Schema::new(fields))?);
    cmd.table_partition_cols = partition_columns;
    Ok(())
}

/// Refuses a folder whose files the table would not read: it has no
/// `.parquet` data file (checked by the caller), but holds files that are
/// neither hidden (`_SUCCESS`, `.part-0.crc`, as Hadoop names its own) nor
/// empty, such as Hive's extension-less `000000_0`.
async fn refuse_unread_files(
    state: &dyn Session,
    store: &Arc<dyn ObjectStore>,
    url: &ListingTableUrl,
) -> Result<()> {
    let unread: Vec<ObjectMeta> = url
        .list_all_files(state, store.as_ref(), "")
        .await?
        .try_filter(|file| {
            let hidden = file
                .location
                .filename()
                .is_none_or(|name| name.starts_with('_') || name.starts_with('.'));
            futures::future::ready(file.size > 0 && !hidden)
        })
        .take(3)
        .try_collect()
        .await?;
    if unread.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = unread
        .iter()
        .map(|file| format!("'{}'", file.location))
        .collect();
    plan_err!(
        "the table at {url} would read none of its files: a Parquet folder table reads \
         the '.parquet' files in it, and it has none, but holds {}; give the files the \
         '.parquet' extension, or name them in the location (a file, or a glob on local files)",
        names.join(", ")
    )
}

/// Refuses a Parquet table on one file that is empty: it has no footer, and
/// DataFusion would take it for a table without columns. (A folder's empty
/// files are skipped, as Spark skips them.)
async fn refuse_empty_parquet_file(state: &dyn Session, cmd: &CreateExternalTable) -> Result<()> {
    let [location] = cmd.locations.as_slice() else {
        return Ok(());
    };
    if !cmd.file_type.eq_ignore_ascii_case("parquet") {
        return Ok(());
    }
    let url = ListingTableUrl::parse(location)?;
    if url.is_collection() || url.get_glob().is_some() {
        return Ok(());
    }
    let store = state.runtime_env().object_store(&url)?;
    match object_store::ObjectStoreExt::head(&store, url.prefix()).await {
        Ok(file) if file.size == 0 => {
            plan_err!("the table at {location} is an empty file (0 bytes), not a Parquet file")
        }
        // A missing file gets DataFusion's error, which names it.
        _ => Ok(()),
    }
}

/// The location of a Parquet table on one folder, if the table is one.
fn parquet_folder(cmd: &CreateExternalTable) -> Result<Option<ListingTableUrl>> {
    let [location] = cmd.locations.as_slice() else {
        return Ok(None);
    };
    if !cmd.file_type.eq_ignore_ascii_case("parquet") {
        return Ok(None);
    }
    let url = ListingTableUrl::parse(location)?;
    Ok((url.is_collection() && url.get_glob().is_none()).then_some(url))
}

/// The columns of `files`: every file's, merged in the order of their paths,
/// as DataFusion merges them (the table makes them nullable). A file that
/// cannot be read is named by its URL (under the table's folder `url`).
async fn merged_file_schema(
    state: &dyn Session,
    cmd: &CreateExternalTable,
    url: &ListingTableUrl,
    store: &Arc<dyn ObjectStore>,
    files: &[ObjectMeta],
) -> Result<Schema> {
    let format = parquet_format(state, cmd)?;
    let concurrency = state.config_options().execution.meta_fetch_concurrency;
    let mut schemas: Vec<(ObjectMeta, SchemaRef)> = futures::stream::iter(files.to_vec())
        .map(|file| {
            let format = Arc::clone(&format);
            async move {
                // Name the file: a folder's error would not say which one.
                // The Parquet reader panics on some malformed footers.
                let inferred = format.infer_schema(state, store, std::slice::from_ref(&file));
                let schema = catch_future_panic(inferred)
                    .await
                    .unwrap_or_else(|panic| {
                        Err(DataFusionError::Execution(format!(
                            "it is not a valid Parquet file (the reader failed: {panic})"
                        )))
                    })
                    .map_err(|e| {
                        let file = format!("{}{}", url.object_store().as_str(), file.location);
                        e.context(format!("cannot read the footer of '{file}'"))
                    })?;
                Ok::<_, DataFusionError>((file, schema))
            }
        })
        .buffer_unordered(usize::from(concurrency))
        .try_collect()
        .await?;
    schemas.sort_by(|(left, _), (right, _)| left.location.cmp(&right.location));
    Ok(Schema::try_merge(
        schemas
            .into_iter()
            .map(|(_, schema)| schema.as_ref().clone()),
    )?)
}

/// The partition columns that the `col=value` folders of `files` name, in
/// their order in a path. Every file must lie in folders of the same
/// columns.
fn folder_partition_columns(url: &ListingTableUrl, files: &[ObjectMeta]) -> Result<Vec<String>> {
    let mut columns: Option<(Vec<String>, &ObjectMeta)> = None;
    for file in files {
        let Some(segments) = url.strip_prefix(&file.location) else {
            continue;
        };
        let mut segments: Vec<&str> = segments.collect();
        segments.pop(); // the file's own name
        let names: Vec<String> = folder_values(&segments.join("/"))
            .into_iter()
            .map(|(name, _)| name.to_owned())
            .collect();
        match &columns {
            None => columns = Some((names, file)),
            Some((first, first_file)) if *first != names => {
                return plan_err!(
                    "the Parquet files of {url} are partitioned by different columns: \
                     {} by {first:?} and {} by {names:?}",
                    first_file.location,
                    file.location
                );
            }
            Some(_) => {}
        }
    }
    Ok(columns.map(|(names, _)| names).unwrap_or_default())
}

/// The first Parquet file in `locations` (folders, or files) whose footer
/// cannot be read, and why: DataFusion reports a broken footer met while it
/// gathers a table's statistics without naming the file, so planning that
/// failed so looks for it. Reads the footers of up to
/// [`FOOTERS_CHECKED_AT_MOST`] files, a few at once: only after such a
/// failure. A location that cannot be listed is passed over.
pub async fn first_unreadable_parquet_file(
    state: &SessionState,
    locations: &[ListingTableUrl],
) -> Option<(String, String)> {
    let format: Arc<dyn FileFormat> = state
        .get_file_format_factory("parquet")?
        .create(state, &HashMap::new())
        .ok()?;
    let mut checked = 0;
    for location in locations {
        let Ok(store) = state.runtime_env().object_store(location) else {
            continue;
        };
        let files: Vec<ObjectMeta> = if location.is_collection() {
            let Ok(listing) = location
                .list_all_files(state, store.as_ref(), PARQUET_EXTENSION)
                .await
            else {
                continue;
            };
            listing
                .try_filter(|file| futures::future::ready(file.size > 0))
                .take(FOOTERS_CHECKED_AT_MOST - checked)
                .try_collect()
                .await
                .unwrap_or_default()
        } else {
            object_store::ObjectStoreExt::head(&store, location.prefix())
                .await
                .into_iter()
                .collect()
        };
        checked += files.len();
        let failures = futures::stream::iter(files)
            .map(|file| {
                let (format, store) = (Arc::clone(&format), Arc::clone(&store));
                async move {
                    let inferred = format.infer_schema(state, &store, std::slice::from_ref(&file));
                    let failure = match catch_future_panic(inferred).await {
                        Ok(Ok(_)) => return None,
                        Ok(Err(e)) => e.to_string(),
                        Err(panic) => panic,
                    };
                    // The store's URL ends with '/': `s3://lake/`, `file:///`.
                    let url = format!("{}{}", location.object_store().as_str(), file.location);
                    Some((url, failure))
                }
            })
            .buffered(FOOTERS_READ_AT_ONCE)
            .filter_map(futures::future::ready);
        if let Some(found) = std::pin::pin!(failures).next().await {
            return Some(found);
        }
        if checked >= FOOTERS_CHECKED_AT_MOST {
            break;
        }
    }
    None
}

/// Footers that [`first_unreadable_parquet_file`] reads at most, and at once.
const FOOTERS_CHECKED_AT_MOST: usize = 10_000;
const FOOTERS_READ_AT_ONCE: usize = 16;

/// The Parquet format with the statement's `format.*` options, as
/// DataFusion's listing factory makes it.
fn parquet_format(state: &dyn Session, cmd: &CreateExternalTable) -> Result<Arc<dyn FileFormat>> {
    let Some(state) = state.as_any().downcast_ref::<SessionState>() else {
        return internal_err!("a table factory needs a SessionState");
    };
    let Some(factory) = state.get_file_format_factory("parquet") else {
        return internal_err!("the Parquet format is not registered");
    };
    factory.create(state, &cmd.options)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch};
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::prelude::SessionContext;
    use quiver_proto::submit_job_request::Query;

    use crate::planner::Planner;
    use crate::store::StateStore;

    /// Writes a Parquet file of one `Int64` column `x` holding `values`.
    fn write_parquet(path: &Path, values: Vec<i64>) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("folders");
        let batch = RecordBatch::try_from_iter([("x", Arc::new(Int64Array::from(values)) as _)])
            .expect("batch");
        write_batch(path, &batch);
    }

    /// Registers a Parquet table `t` on `folder`, declared by `declaration`
    /// (what stands between the name and `LOCATION`), then runs `sql`.
    async fn register_and_query(
        folder: &Path,
        declaration: &str,
        sql: &str,
    ) -> Result<String, String> {
        let store = StateStore::in_memory().expect("store");
        let planner = Planner::new(2, store, "/tmp/quiver-warehouse/".into()).expect("planner");
        let ddl = format!(
            "CREATE EXTERNAL TABLE t {declaration} LOCATION '{}/'",
            folder.display()
        );
        planner
            .plan("ddl", Query::Sql(ddl), &[])
            .await
            .map_err(|error| error.to_string())?;
        let context = SessionContext::new_with_state(planner.session_state(&[]).expect("state"));
        let batches = context
            .sql(sql)
            .await
            .map_err(|error| error.to_string())?
            .collect()
            .await
            .map_err(|error| error.to_string())?;
        Ok(pretty_format_batches(&batches).expect("format").to_string())
    }

    #[tokio::test]
    async fn a_partitioned_folder_with_markers_infers_its_columns_from_the_data() {
        let folder = tempfile::tempdir().expect("temp folder");
        let root = folder.path();
        write_parquet(&root.join("year=2024/part-0.parquet"), vec![1, 2, 3]);
        write_parquet(&root.join("year=2025/part-0.parquet"), vec![4, 5]);
        // What Spark, Hadoop and Quiver leave beside the data: an empty and a
        // non-empty marker, a checksum, a manifest, and a killed writer's
        // partial file in its staging folder.
        std::fs::write(root.join("_SUCCESS"), b"").expect("marker");
        std::fs::write(root.join("year=2024/_SUCCESS"), b"{\"ok\": true}").expect("marker");
        std::fs::write(root.join("year=2024/.part-0.parquet.crc"), b"crc").expect("crc");
        std::fs::create_dir_all(root.join("_manifests")).expect("folder");
        std::fs::write(root.join("_manifests/job.json"), b"{}").expect("manifest");
        std::fs::create_dir_all(root.join("_temporary/job/p0-a0/year=2026")).expect("folder");
        std::fs::write(
            root.join("_temporary/job/p0-a0/year=2026/part.parquet"),
            b"PAR1 cut short",
        )
        .expect("partial file");

        let sql = "SELECT CAST(year AS VARCHAR) AS year, count(*) AS n, sum(x) AS total \
                   FROM t GROUP BY 1 ORDER BY 1";
        let expected = [
            "+------+---+-------+",
            "| year | n | total |",
            "+------+---+-------+",
            "| 2024 | 3 | 6     |",
            "| 2025 | 2 | 9     |",
            "+------+---+-------+",
        ]
        .join("\n");
        // Inferred, named, and declared with their types.
        for declaration in [
            "STORED AS PARQUET",
            "STORED AS PARQUET PARTITIONED BY (year)",
            "(x BIGINT, year INT) STORED AS PARQUET PARTITIONED BY (year)",
        ] {
            let answer = register_and_query(root, declaration, sql)
                .await
                .unwrap_or_else(|error| panic!("{declaration}: {error}"));
            assert_eq!(answer, expected, "{declaration}");
        }
        // The declared partition columns are still checked against the folders.
        let error = register_and_query(
            root,
            "(x BIGINT, month INT) STORED AS PARQUET PARTITIONED BY (month)",
            "SELECT 1",
        )
        .await
        .expect_err("a partition column without folders must fail");
        assert!(error.contains("month"), "{error}");
    }

    #[tokio::test]
    async fn partition_values_are_found_however_their_folders_spell_them() {
        // As Kafka Connect and other writers of formatted paths spell months.
        let folder = tempfile::tempdir().expect("temp folder");
        let root = folder.path();
        write_parquet(&root.join("year=2024/month=01/part-0.parquet"), vec![1, 2]);
        write_parquet(&root.join("year=2024/month=02/part-0.parquet"), vec![4]);
        write_parquet(&root.join("year=2025/month=1/part-0.parquet"), vec![10]);
        write_parquet(&root.join("year=2025/month=01/part-0.parquet"), vec![20]);
        let declaration = "(x BIGINT, year INT, month INT) STORED AS PARQUET \
                           PARTITIONED BY (year, month)";
        for (filter, total) in [
            ("year = 2024 AND month = 1", "3"),
            ("month = 1", "33"),
            ("year = 2025 AND month = 1", "30"),
            ("month = 2 AND year = 2024", "4"),
            ("year = 2023 AND month = 1", ""),
        ] {
            let answer = register_and_query(
                root,
                declaration,
                &format!("SELECT sum(x) AS total FROM t WHERE {filter}"),
            )
            .await
            .expect("the folder registers");
            assert!(
                answer.contains(&format!("| {total:<5} |")),
                "{filter}: {answer}"
            );
        }
        // Only the folder holding the value is read.
        let plan = register_and_query(
            root,
            declaration,
            "EXPLAIN SELECT x FROM t WHERE year = 2024 AND month = 1",
        )
        .await
        .expect("the folder registers");
        assert!(plan.contains("month=01/part-0.parquet"), "{plan}");
        assert!(
            !plan.contains("month=02") && !plan.contains("year=2025"),
            "{plan}"
        );
    }

    #[tokio::test]
    async fn a_folder_value_not_of_its_columns_type_is_named_in_the_error() {
        // A cast, a date and a number that fail differently in Arrow.
        for (column, valid, invalid, type_name, filter) in [
            ("month INT", "month=1", "month=abc", "Int32", "month > 0"),
            (
                "day DATE",
                "day=2024-01-01",
                "day=someday",
                "Date32",
                "day > DATE '2023-01-01'",
            ),
            (
                "price DECIMAL(5, 2)",
                "price=1.50",
                "price=1.2.3",
                "Decimal128(5, 2)",
                "price > 1",
            ),
        ] {
            let folder = tempfile::tempdir().expect("temp folder");
            let root = folder.path();
            write_parquet(&root.join(format!("{valid}/part-0.parquet")), vec![1]);
            write_parquet(&root.join(format!("{invalid}/part-0.parquet")), vec![2]);
            let name = column.split(' ').next().expect("name");
            let declaration =
                format!("(x BIGINT, {column}) STORED AS PARQUET PARTITIONED BY ({name})");
            // Whether the folder fails pruning or the scan's cast, and also
            // where no partition column is read.
            for query in [
                "SELECT * FROM t".to_owned(),
                format!("SELECT x FROM t WHERE {filter}"),
                "SELECT count(*) FROM t".to_owned(),
            ] {
                let error = register_and_query(root, &declaration, &query)
                    .await
                    .expect_err("a value not of the column's type must fail");
                assert!(
                    error.contains(&format!("partition folder '{invalid}'"))
                        && error.contains(&format!("{invalid}/part-0.parquet"))
                        && error.contains(&format!("{type_name} value for column '{name}'")),
                    "{query}: {error}"
                );
            }
            // A filter that lists only the valid folder reads it.
            let (_, value) = valid.split_once('=').expect("a folder");
            let equality = match name {
                "day" => format!("SELECT x FROM t WHERE day = DATE '{value}'"),
                _ => format!("SELECT x FROM t WHERE {name} = {value}"),
            };
            let answer = register_and_query(root, &declaration, &equality)
                .await
                .expect("the valid folder reads");
            assert!(answer.contains("| 1 |"), "{equality}: {answer}");
        }
    }

    /// DataFusion fixes a table's Parquet read settings when it is created;
    /// the catalog keeps them, so a replayed table reads as it did.
    #[tokio::test]
    async fn a_replayed_table_keeps_its_creating_sessions_parquet_settings() {
        let folder = tempfile::tempdir().expect("temp folder");
        let batch = RecordBatch::try_from_iter([(
            "b",
            Arc::new(arrow::array::BinaryArray::from(vec![&b"abc"[..]])) as _,
        )])
        .expect("batch");
        let file = std::fs::File::create(folder.path().join("part-0.parquet")).expect("file");
        let mut writer = ArrowWriter::try_new(file, batch.schema(), None).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");

        let store = StateStore::in_memory().expect("store");
        let warehouse = "/tmp/quiver-warehouse/".to_owned();
        let planner = Planner::new(2, store.clone(), warehouse.clone()).expect("planner");
        let as_string = quiver_proto::Setting {
            key: "datafusion.execution.parquet.binary_as_string".into(),
            value: "true".into(),
        };
        let ddl = format!(
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{}/'",
            folder.path().display()
        );
        planner
            .plan("ddl", Query::Sql(ddl), &[as_string])
            .await
            .expect("table");
        let column_type = |planner: &Planner| {
            let context =
                SessionContext::new_with_state(planner.session_state(&[]).expect("state"));
            async move {
                let table = context.table_provider("t").await.expect("the table");
                table.schema().field(0).data_type().clone()
            }
        };
        let created = column_type(&planner).await;
        assert!(
            matches!(
                created,
                arrow::datatypes::DataType::Utf8 | arrow::datatypes::DataType::Utf8View
            ),
            "{created}"
        );
        let restarted = Planner::new(2, store, warehouse).expect("planner");
        let failures = restarted
            .replay_catalog(&crate::starting::SilentStores::default())
            .await
            .expect("replay");
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(column_type(&restarted).await, created);
    }

    /// Writes `batch` to the Parquet file `path`.
    fn write_batch(path: &Path, batch: &RecordBatch) {
        let file = std::fs::File::create(path).expect("file");
        let mut writer = ArrowWriter::try_new(file, batch.schema(), None).expect("writer");
        writer.write(batch).expect("write");
        writer.close().expect("close");
    }

    /// A batch of the `Int64` columns `columns`, nullable as given.
    fn int_batch(columns: &[(&str, Vec<Option<i64>>, bool)]) -> RecordBatch {
        RecordBatch::try_from_iter_with_nullable(columns.iter().map(|(name, values, nullable)| {
            (
                *name,
                Arc::new(Int64Array::from(values.clone())) as _,
                *nullable,
            )
        }))
        .expect("batch")
    }

    #[tokio::test]
    async fn inferred_columns_are_nullable_so_files_added_later_are_read_right() {
        let folder = tempfile::tempdir().expect("temp folder");
        let root = folder.path();
        // Every file the table is made from says its columns are non-null;
        // the second adds `b`, which the first lacks.
        write_batch(
            &root.join("part-0.parquet"),
            &int_batch(&[("a", vec![Some(1)], false)]),
        );
        write_batch(
            &root.join("part-1.parquet"),
            &int_batch(&[("a", vec![Some(2)], false), ("b", vec![Some(20)], false)]),
        );
        write_batch(
            &root.join("single.parquet.data"),
            &int_batch(&[("a", vec![Some(1)], false)]),
        );
        let store = StateStore::in_memory().expect("store");
        let planner = Planner::new(2, store, "/tmp/quiver-warehouse/".into()).expect("planner");
        for ddl in [
            format!(
                "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{}/'",
                root.display()
            ),
            format!(
                "CREATE EXTERNAL TABLE one STORED AS PARQUET LOCATION '{}'",
                root.join("single.parquet.data").display()
            ),
            format!(
                "CREATE EXTERNAL TABLE strict (a BIGINT NOT NULL, b BIGINT) STORED AS PARQUET \
                 LOCATION '{}/'",
                root.display()
            ),
        ] {
            planner
                .plan("ddl", Query::Sql(ddl), &[])
                .await
                .expect("registers");
        }
        // Files added after the table was made: one without `b`, one with
        // nulls in both columns.
        write_batch(
            &root.join("part-2.parquet"),
            &int_batch(&[("a", vec![Some(3)], false)]),
        );
        write_batch(
            &root.join("part-3.parquet"),
            &int_batch(&[("a", vec![None], true), ("b", vec![None], true)]),
        );
        let context = SessionContext::new_with_state(planner.session_state(&[]).expect("state"));
        let nullable = |table: &str| {
            let context = context.clone();
            let table = table.to_owned();
            async move {
                let provider = context.table_provider(table.as_str()).await.expect("table");
                provider
                    .schema()
                    .fields()
                    .iter()
                    .map(|field| (field.name().clone(), field.is_nullable()))
                    .collect::<Vec<_>>()
            }
        };
        let owned = |pairs: &[(&str, bool)]| {
            pairs
                .iter()
                .map(|(name, nullable)| ((*name).to_owned(), *nullable))
                .collect::<Vec<_>>()
        };
        assert_eq!(nullable("t").await, owned(&[("a", true), ("b", true)]));
        assert_eq!(nullable("one").await, owned(&[("a", true)]));
        assert_eq!(
            nullable("strict").await,
            owned(&[("a", false), ("b", true)])
        );
        // Kept non-null, these were folded to false and counted 0.
        let batches = context
            .sql(
                "SELECT count(*) FILTER (WHERE a IS NULL) AS no_a, \
                 count(*) FILTER (WHERE b IS NULL) AS no_b FROM t",
            )
            .await
            .expect("plans")
            .collect()
            .await
            .expect("runs");
        let answer = pretty_format_batches(&batches).expect("format").to_string();
        let expected = [
            "+------+------+",
            "| no_a | no_b |",
            "+------+------+",
            "| 1    | 3    |",
            "+------+------+",
        ]
        .join("\n");
        assert_eq!(answer, expected);
    }

    #[tokio::test]
    async fn a_folder_without_parquet_data_files_is_refused_or_empty() {
        // Only markers and empty files: no columns to infer, an empty table
        // where they are declared.
        let folder = tempfile::tempdir().expect("temp folder");
        let root = folder.path();
        std::fs::write(root.join("_SUCCESS"), b"").expect("marker");
        std::fs::create_dir_all(root.join("year=2024")).expect("folder");
        std::fs::write(root.join("year=2024/empty.parquet"), b"").expect("empty file");
        let error = register_and_query(root, "STORED AS PARQUET", "SELECT * FROM t")
            .await
            .expect_err("nothing to infer columns from");
        assert!(error.contains("no Parquet data file"), "{error}");
        let answer = register_and_query(root, "(x BIGINT) STORED AS PARQUET", "SELECT * FROM t")
            .await
            .expect("a declared table on an empty folder");
        assert!(!answer.contains("| 1"), "{answer}");

        // Data files the table would never read, as Hive names them.
        write_parquet(&root.join("000000_0"), vec![1, 2]);
        for declaration in ["STORED AS PARQUET", "(x BIGINT) STORED AS PARQUET"] {
            let error = register_and_query(root, declaration, "SELECT * FROM t")
                .await
                .expect_err("unread files must be refused");
            assert!(
                error.contains("would read none of its files") && error.contains("000000_0"),
                "{declaration}: {error}"
            );
        }
    }

    #[tokio::test]
    async fn inconsistent_partition_folders_are_named_in_the_error() {
        let folder = tempfile::tempdir().expect("temp folder");
        let root = folder.path();
        write_parquet(&root.join("year=2024/part-0.parquet"), vec![1]);
        write_parquet(&root.join("month=1/part-0.parquet"), vec![2]);
        let error = register_and_query(root, "STORED AS PARQUET", "SELECT * FROM t")
            .await
            .expect_err("mixed partitioning must fail");
        assert!(
            error.contains("partitioned by different columns"),
            "{error}"
        );
        assert!(error.contains("year=2024/part-0.parquet"), "{error}");
        assert!(error.contains("month=1/part-0.parquet"), "{error}");

        let folder = tempfile::tempdir().expect("temp folder");
        write_parquet(&folder.path().join("x=1/part-0.parquet"), vec![1]);
        let error = register_and_query(folder.path(), "STORED AS PARQUET", "SELECT * FROM t")
            .await
            .expect_err("a column in both the files and a folder must fail");
        assert!(error.contains("column 'x'"), "{error}");
    }
}
