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
//! - A hive-partitioned table reads null partition values
//!   (`col=__HIVE_DEFAULT_PARTITION__`) as nulls: see [`crate::hive`].

use std::sync::Arc;

use arrow::datatypes::{DataType, Schema};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::datasource::listing::{ListingTable, ListingTableConfig};
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
