//! Tables that own their data: `CREATE TABLE ... AS` writes a table into its
//! own warehouse folder (`<warehouse><schema>/<table>/`), and dropping the
//! table deletes that folder, as Spark and Hive do for managed tables.
//!
//! A table is managed when its one location is its name's warehouse folder,
//! which only `CREATE TABLE ... AS` writes (and replaces whatever it finds
//! there). An external table declared on any other location keeps its files.

use std::sync::Arc;

use datafusion::catalog::TableProvider;
use datafusion::common::{SchemaReference, TableReference};
use datafusion::datasource::listing::{ListingTable, ListingTableUrl};
use datafusion::execution::SessionState;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::DdlStatement;
use quiver_core::storage::{delete_prefix, redact_store_echoes};
use tracing::{info, warn};

use crate::hive::HivePartitionedTable;

/// The warehouse folder of table `table` in schema `schema`.
pub fn warehouse_folder(warehouse: &str, schema: &str, table: &str) -> String {
    format!("{warehouse}{schema}/{table}/")
}

/// The folders of the managed tables that `ddl` drops: the table of a
/// `DROP TABLE`, every table of a `DROP SCHEMA ... CASCADE`. Looked up
/// before the statement runs, while the tables are still in the catalog.
pub async fn dropped_folders(
    ddl: &DdlStatement,
    state: &SessionState,
    warehouse: &str,
) -> Vec<ListingTableUrl> {
    let catalog = &state.config().options().catalog;
    let names: Vec<TableReference> = match ddl {
        DdlStatement::DropTable(drop) => vec![drop.name.clone()],
        DdlStatement::DropCatalogSchema(drop) if drop.cascade => {
            let (catalog_name, schema_name) = match &drop.name {
                SchemaReference::Bare { schema } => {
                    (catalog.default_catalog.clone(), schema.to_string())
                }
                SchemaReference::Full { schema, catalog } => {
                    (catalog.to_string(), schema.to_string())
                }
            };
            let Some(schema) = state
                .catalog_list()
                .catalog(&catalog_name)
                .and_then(|found| found.schema(&schema_name))
            else {
                return Vec::new();
            };
            schema
                .table_names()
                .into_iter()
                .map(|table| {
                    TableReference::full(catalog_name.as_str(), schema_name.as_str(), table)
                })
                .collect()
        }
        _ => return Vec::new(),
    };
    let mut folders = Vec::new();
    for name in names {
        let resolved = name.resolve(&catalog.default_catalog, &catalog.default_schema);
        let Some(schema) = state
            .catalog_list()
            .catalog(&resolved.catalog)
            .and_then(|found| found.schema(&resolved.schema))
        else {
            continue;
        };
        let Ok(Some(table)) = schema.table(&resolved.table).await else {
            continue;
        };
        let own = warehouse_folder(warehouse, &resolved.schema, &resolved.table);
        let Ok(own) = ListingTableUrl::parse(&own) else {
            continue;
        };
        let owns = |folders: &[ListingTableUrl]| matches!(folders, [only] if only.as_str() == own.as_str());
        if table_folders(&table).is_some_and(owns) {
            folders.push(own);
        }
    }
    folders
}

/// The locations a table reads, if it is a table of files.
pub(crate) fn table_folders(table: &Arc<dyn TableProvider>) -> Option<&[ListingTableUrl]> {
    let listing = table.downcast_ref::<ListingTable>().or_else(|| {
        table
            .downcast_ref::<HivePartitionedTable>()
            .map(HivePartitionedTable::listing)
    })?;
    Some(listing.table_paths())
}

/// Deletes the folders of dropped managed tables. The tables are gone from
/// the catalog already, so a folder that cannot be deleted is logged rather
/// than failing the statement; the next `CREATE TABLE ... AS` of that name
/// replaces what is left.
pub async fn delete_folders(runtime: &Arc<RuntimeEnv>, folders: Vec<ListingTableUrl>) {
    for folder in folders {
        let deleted = match runtime.object_store(folder.object_store()) {
            Ok(store) => delete_prefix(&store, folder.prefix(), folder.scheme() == "file").await,
            Err(e) => Err(e),
        };
        match deleted {
            Ok(()) => info!(%folder, "deleted the folder of a dropped table"),
            Err(e) => {
                let error = redact_store_echoes(&e.to_string()).into_owned();
                warn!(%folder, %error, "cannot delete the folder of a dropped table");
            }
        }
    }
}
