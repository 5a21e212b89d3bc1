//! How `CREATE EXTERNAL TABLE ... STORED AS PARQUET` makes its table.
//!
//! DataFusion's listing tables, with one change: a table on a folder reads
//! only the folder's `.parquet` files. DataFusion does so already when it
//! infers the columns, but a table declared with its columns would read every
//! object in the folder, and so fail on the `_SUCCESS` manifests that
//! Quiver's (and Spark's) writes leave next to their files.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::datatypes::Schema;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::datasource::listing::{ListingTable, ListingTableConfig};
use datafusion::datasource::listing_table_factory::ListingTableFactory;
use datafusion::error::Result;
use datafusion::logical_expr::CreateExternalTable;

/// The extension of the data files that a Parquet folder table reads.
const PARQUET_EXTENSION: &str = ".parquet";

#[derive(Debug, Default)]
pub struct ParquetTableFactory {
    listing: ListingTableFactory,
}

#[async_trait]
impl TableProviderFactory for ParquetTableFactory {
    async fn create(
        &self,
        state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> Result<Arc<dyn TableProvider>> {
        let table = self.listing.create(state, cmd).await?;
        let Some(listing) = table.downcast_ref::<ListingTable>() else {
            return Ok(table);
        };
        if !listing.options().file_extension.is_empty() {
            return Ok(table);
        }
        let partition_columns: HashSet<&str> = listing
            .options()
            .table_partition_cols
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        let table_schema = table.schema();
        let file_schema = Schema::new(
            table_schema
                .fields()
                .iter()
                .filter(|field| !partition_columns.contains(field.name().as_str()))
                .cloned()
                .collect::<Vec<_>>(),
        );
        let options = listing
            .options()
            .clone()
            .with_file_extension(PARQUET_EXTENSION);
        let config = ListingTableConfig::new_with_multi_paths(listing.table_paths().clone())
            .with_listing_options(options)
            .with_schema(Arc::new(file_schema));
        let rebuilt = ListingTable::try_new(config)?
            .with_cache(state.runtime_env().cache_manager.get_file_statistic_cache())
            .with_definition(cmd.definition.clone())
            .with_constraints(cmd.constraints.clone())
            .with_column_defaults(cmd.column_defaults.clone());
        Ok(Arc::new(rebuilt))
    }
}
