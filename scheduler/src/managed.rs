//! Tables that own their data: `CREATE TABLE ... AS` writes a table into its
//! own warehouse folder, and dropping the table deletes what the folder held,
//! as Spark and Hive do for managed tables.
//!
//! A table is managed when its catalog entry says so ([`MANAGED_TABLE`],
//! set once `CREATE TABLE ... AS` has registered it) and its one location is
//! a warehouse folder of its name: the current warehouse's, or that of the
//! warehouse it was created in, should `--warehouse` have changed since. An
//! external table keeps its files, wherever they are, the warehouse
//! included.
//!
//! The files are listed before the table is dropped and only those are
//! deleted: a `CREATE TABLE ... AS` of the same name that starts meanwhile
//! writes files of other names, which stay.

use std::sync::Arc;

use datafusion::catalog::TableProvider;
use datafusion::common::{ResolvedTableReference, SchemaReference, TableReference};
use datafusion::datasource::listing::{ListingTable, ListingTableUrl};
use datafusion::execution::SessionState;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::DdlStatement;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use quiver_core::storage::{delete_paths, redacted_error};
use tracing::{info, warn};

use crate::catalog::{MANAGED_TABLE, table_key};
use crate::hive::HivePartitionedTable;
use crate::store::StateStore;

/// The folder under the warehouse that holds the non-default catalogs'
/// tables; no schema of the default catalog may take its name.
pub const CATALOGS_FOLDER: &str = "_catalogs";

/// The warehouse folder of a table: `<warehouse><schema>/<table>/` in the
/// default catalog, `<warehouse>_catalogs/<catalog>/<schema>/<table>/` in
/// any other, so that two catalogs' tables of one name never share a folder.
pub fn warehouse_folder(
    warehouse: &str,
    name: &ResolvedTableReference,
    default_catalog: &str,
) -> String {
    let (schema, table) = (&name.schema, &name.table);
    if name.catalog.as_ref() == default_catalog {
        format!("{warehouse}{schema}/{table}/")
    } else {
        let catalog = &name.catalog;
        format!("{warehouse}{CATALOGS_FOLDER}/{catalog}/{schema}/{table}/")
    }
}

/// A dropped managed table's folder, and the files it held when dropped.
pub struct DroppedFolder {
    folder: ListingTableUrl,
    files: Vec<Path>,
}

/// The folders and files of the managed tables that `ddl` drops: the table
/// of a `DROP TABLE`, every table of a `DROP SCHEMA ... CASCADE`. Looked up
/// before the statement runs, while the tables are in the catalog.
pub async fn dropped_folders(
    ddl: &DdlStatement,
    state: &SessionState,
    store: &StateStore,
) -> Vec<DroppedFolder> {
    let mut dropped = Vec::new();
    for name in dropped_tables(ddl, state) {
        let Some(folder) = managed_folder(&name, state, store).await else {
            continue;
        };
        match list_files(state.runtime_env(), &folder).await {
            Ok(files) => dropped.push(DroppedFolder { folder, files }),
            Err(e) => {
                let error = redacted_error(&e);
                warn!(%folder, %error, "cannot list the folder of a dropped table; it stays");
            }
        }
    }
    dropped
}

/// The tables that `ddl` drops.
fn dropped_tables(ddl: &DdlStatement, state: &SessionState) -> Vec<TableReference> {
    match ddl {
        DdlStatement::DropTable(drop) => vec![drop.name.clone()],
        DdlStatement::DropCatalogSchema(drop) if drop.cascade => {
            let default_catalog = &state.config().options().catalog.default_catalog;
            let (catalog, schema) = match &drop.name {
                SchemaReference::Bare { schema } => (default_catalog.clone(), schema.to_string()),
                SchemaReference::Full { schema, catalog } => {
                    (catalog.to_string(), schema.to_string())
                }
            };
            state
                .catalog_list()
                .catalog(&catalog)
                .and_then(|found| found.schema(&schema))
                .map(|found| found.table_names())
                .unwrap_or_default()
                .into_iter()
                .map(|table| TableReference::full(catalog.as_str(), schema.as_str(), table))
                .collect()
        }
        _ => Vec::new(),
    }
}

/// The warehouse folder of the table `name`, if it is a managed table.
pub(crate) async fn managed_folder(
    name: &TableReference,
    state: &SessionState,
    store: &StateStore,
) -> Option<ListingTableUrl> {
    let (key, _) = table_key(name, state);
    // The embedded store reads from disk: not on the async threads.
    let store = store.clone();
    let entry = tokio::task::spawn_blocking(move || store.catalog_entry(&key))
        .await
        .ok()?
        .ok()??;
    if entry.kind != MANAGED_TABLE {
        return None;
    }
    let options = &state.config().options().catalog;
    let resolved = name
        .clone()
        .resolve(&options.default_catalog, &options.default_schema);
    let table = state
        .catalog_list()
        .catalog(&resolved.catalog)?
        .schema(&resolved.schema)?
        .table(&resolved.table)
        .await
        .ok()??;
    let [folder] = table_folders(&table)? else {
        return None;
    };
    // `/<schema>/<table>/` under any warehouse folder, spelt as URLs are.
    let own = warehouse_folder("file:///", &resolved, &options.default_catalog);
    let own = ListingTableUrl::parse(own).ok()?;
    let own = own.as_str().strip_prefix("file://")?;
    if folder.as_str().ends_with(own) {
        return Some(folder.clone());
    }
    warn!(table = %resolved, %folder,
        "a table that CREATE TABLE AS made reads a folder not named for it; its files stay");
    None
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

async fn list_files(
    runtime: &Arc<RuntimeEnv>,
    folder: &ListingTableUrl,
) -> datafusion::error::Result<Vec<Path>> {
    let store = runtime.object_store(folder.object_store())?;
    Ok(store
        .list(Some(folder.prefix()))
        .map_ok(|meta| meta.location)
        .try_collect()
        .await?)
}

/// Deletes the files of dropped managed tables. The tables are gone from
/// the catalog already, so a file that cannot be deleted is logged rather
/// than failing the statement; a `CREATE TABLE ... AS` of that name then
/// refuses the folder, naming a file left. On local disk, the folders left empty go too.
pub async fn delete_folders(runtime: &Arc<RuntimeEnv>, dropped: Vec<DroppedFolder>) {
    for DroppedFolder { folder, files } in dropped {
        let count = files.len();
        let deleted = match runtime.object_store(folder.object_store()) {
            Ok(store) => {
                let paths = futures::stream::iter(files.into_iter().map(Ok)).boxed();
                delete_paths(&store, paths).await.map_err(Into::into)
            }
            Err(e) => Err(e),
        };
        match deleted {
            Ok(()) => {
                if folder.scheme() == "file" {
                    let root = std::path::Path::new("/").join(folder.prefix().as_ref());
                    let _ = tokio::task::spawn_blocking(move || remove_empty_folders(&root)).await;
                }
                info!(%folder, files = count, "deleted the files of a dropped table");
            }
            Err(e) => {
                let error = redacted_error(&e);
                warn!(%folder, %error, "cannot delete the files of a dropped table");
            }
        }
    }
}

/// Removes `folder` and the folders below it that hold nothing, deepest
/// first; a folder with a file in it stays.
fn remove_empty_folders(folder: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(folder) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_empty_folders(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(folder);
}
