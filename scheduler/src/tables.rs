//! How `CREATE EXTERNAL TABLE` makes its table: DataFusion's listing tables,
//! with three changes.
//!
//! - The definition kept for `SHOW CREATE TABLE` and `information_schema`
//!   has its secret store options redacted.
//! - A Parquet table on a folder reads only the folder's `.parquet` files.
//!   DataFusion does so already when it infers the columns, but a table
//!   declared with its columns would read every object in the folder, and
//!   fail on the `_SUCCESS` and `.crc` files that Spark writes next to its
//!   data. (Folders of extension-less Parquet files, as Hive writes, need a
//!   glob in the location, such as `.../*`.)
//! - A Parquet table on a flat folder in an object store, declared without
//!   columns, infers them from the folder's `.parquet` files only. DataFusion
//!   limits its inference to them for local folders alone, and reads every
//!   other object too: a non-empty `_SUCCESS`, or Hadoop's `.crc` files,
//!   would fail the statement.
//! - A hive-partitioned table reads null partition values
//!   (`col=__HIVE_DEFAULT_PARTITION__`) as nulls: see [`crate::hive`].

use std::sync::Arc;

use arrow::datatypes::{DataType, Schema};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::common::DFSchema;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::listing_table_factory::ListingTableFactory;
use datafusion::error::Result;
use datafusion::logical_expr::CreateExternalTable;
use quiver_core::storage::redact_sql;

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

#[async_trait]
impl TableProviderFactory for TableFactory {
    async fn create(
        &self,
        state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> Result<Arc<dyn TableProvider>> {
        let mut cmd = cmd.clone();
        cmd.definition = cmd.definition.as_deref().map(redact_sql);
        declare_parquet_columns(state, &mut cmd).await?;
        let cmd = &cmd;
        let table = self.listing.create(state, cmd).await?;
        let Some(listing) = table.downcast_ref::<ListingTable>() else {
            return Ok(table);
        };
        let partition_columns = listing.options().table_partition_cols.clone();
        let parquet_folder = cmd.file_type.eq_ignore_ascii_case("parquet")
            && listing.options().file_extension.is_empty();
        if partition_columns.is_empty() && !parquet_folder {
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
                .cloned()
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

/// Declares the columns of a Parquet table on a flat folder in an object
/// store, declared without them, as its `.parquet` files have them. A folder
/// with subfolders is left to DataFusion, which infers hive partitions from
/// them only when no columns are declared; so is a folder without any
/// `.parquet` file, so that its error names what is there.
async fn declare_parquet_columns(state: &dyn Session, cmd: &mut CreateExternalTable) -> Result<()> {
    let [location] = cmd.locations.as_slice() else {
        return Ok(());
    };
    if !cmd.file_type.eq_ignore_ascii_case("parquet")
        || !cmd.schema.fields().is_empty()
        || !cmd.table_partition_cols.is_empty()
    {
        return Ok(());
    }
    let url = ListingTableUrl::parse(location)?;
    if url.scheme() == "file" || !url.is_collection() {
        return Ok(());
    }
    let store = state.runtime_env().object_store(&url)?;
    let listing = store.list_with_delimiter(Some(url.prefix())).await?;
    let has_parquet = listing
        .objects
        .iter()
        .any(|object| object.location.as_ref().ends_with(PARQUET_EXTENSION));
    if !listing.common_prefixes.is_empty() || !has_parquet {
        return Ok(());
    }
    let format = ParquetFormat::default().with_options(state.table_options().parquet.clone());
    let options = ListingOptions::new(Arc::new(format)).with_file_extension(PARQUET_EXTENSION);
    let schema = options.infer_schema(state, &url).await?;
    if !schema.fields().is_empty() {
        cmd.schema = Arc::new(DFSchema::try_from(schema.as_ref().clone())?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use quiver_proto::submit_job_request::Query;

    use crate::planner::Planner;
    use crate::store::StateStore;

    #[tokio::test]
    async fn table_definitions_keep_no_secrets() {
        let store = StateStore::in_memory().expect("store");
        let planner = Planner::new(2, store, "/tmp/quiver-warehouse/".into()).expect("planner");
        let folder = tempfile::tempdir().expect("temp folder");
        let ddl = format!(
            "CREATE EXTERNAL TABLE t (a INT) STORED AS PARQUET LOCATION '{}/' \
             OPTIONS ('aws.secret_access_key' 'S3CRET', 'aws.region' 'eu-west-1')",
            folder.path().display()
        );
        planner
            .plan("ddl", Query::Sql(ddl), &[])
            .await
            .expect("create table");
        let state = planner.session_state(&[]).expect("state");
        let table = datafusion::prelude::SessionContext::new_with_state(state)
            .table_provider("t")
            .await
            .expect("table exists");
        let definition = table.get_table_definition().expect("definition kept");
        assert!(!definition.contains("S3CRET"), "{definition}");
        assert!(definition.contains("LOCATION"), "{definition}");
        assert_eq!(
            table
                .downcast_ref::<datafusion::datasource::listing::ListingTable>()
                .map(|listing| listing.options().file_extension.clone()),
            Some(".parquet".to_owned())
        );
    }
}
