//! The persistent catalog: every catalog object created with DDL (catalogs,
//! schemas, external tables and views) is stored with the statement that
//! created it, and replayed in creation order when the scheduler starts.
//!
//! Storing statements rather than resolved metadata keeps the store independent
//! of DataFusion's internal structures across versions; an external table's
//! schema is inferred again from its files on replay, under the
//! `datafusion.execution.parquet.*` settings of the session that created it,
//! which are stored with the statement (DataFusion fixes them in the table). A table made by
//! `CREATE TABLE ... AS` is written to the warehouse first and stored as the
//! external table of its folder.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use datafusion::common::TableReference;
use datafusion::execution::SessionState;
use datafusion::logical_expr::DdlStatement;
use quiver_proto::{CatalogEntry, Setting};
use tracing::warn;

use crate::store::{Result, StateStore};

/// What a DDL statement does to the persistent catalog.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    /// Store `sql` under `key`, unless `if_absent` and the key exists.
    Put {
        key: String,
        kind: &'static str,
        name: String,
        if_absent: bool,
    },
    /// Remove `key` and, when cascading, every object whose key starts with `prefix`.
    Remove {
        key: String,
        cascade_prefix: Option<String>,
    },
    /// Nothing to persist.
    None,
}

/// The prefix of the settings that a table keeps from the session that
/// created it: DataFusion copies them into its Parquet format.
const KEPT_SETTINGS_PREFIX: &str = "datafusion.execution.parquet.";

/// Records the effect of a DDL statement that has just run successfully,
/// planned with the session `settings`.
pub fn record(
    store: &StateStore,
    ddl: &DdlStatement,
    sql: &str,
    state: &SessionState,
    settings: &[Setting],
) -> Result<()> {
    match change_of(ddl, state) {
        Change::Put {
            key,
            kind,
            name,
            if_absent,
        } => {
            let entry = CatalogEntry {
                seq: 0,
                kind: kind.to_owned(),
                name,
                sql: sql.to_owned(),
                settings: settings
                    .iter()
                    .filter(|setting| {
                        setting
                            .key
                            .to_ascii_lowercase()
                            .starts_with(KEPT_SETTINGS_PREFIX)
                    })
                    .cloned()
                    .collect(),
            };
            store.add_catalog_entry(&key, entry, if_absent)
        }
        Change::Remove {
            key,
            cascade_prefix,
        } => {
            store.remove_catalog_entries(|stored| {
                stored == key
                    || cascade_prefix
                        .as_deref()
                        .is_some_and(|prefix| stored.starts_with(prefix))
            })?;
            Ok(())
        }
        Change::None => Ok(()),
    }
}

/// The kind of the catalog entry of a table that `CREATE TABLE AS` made,
/// which owns its warehouse folder (see [`crate::managed`]).
pub const MANAGED_TABLE: &str = "managed table";

/// The key of a table's catalog entry, and its resolved name.
pub fn table_key(name: &TableReference, state: &SessionState) -> (String, String) {
    let options = state.config().options();
    let resolved = name.clone().resolve(
        &options.catalog.default_catalog,
        &options.catalog.default_schema,
    );
    (format!("table:{resolved}"), resolved.to_string())
}

/// Marks the stored table under `key` as made by `CREATE TABLE AS`.
pub fn mark_managed(store: &StateStore, key: &str) -> Result<()> {
    if let Some(mut entry) = store.catalog_entry(key)? {
        MANAGED_TABLE.clone_into(&mut entry.kind);
        store.put_catalog_entry(key, &entry)?;
    }
    Ok(())
}

/// The stored object that a DDL statement creates or replaces (`false`),
/// or drops (`true`), by key.
pub fn key_changed(ddl: &DdlStatement, state: &SessionState) -> Option<(String, bool)> {
    if let DdlStatement::CreateMemoryTable(create) = ddl {
        return Some((table_key(&create.name, state).0, false));
    }
    match change_of(ddl, state) {
        Change::Put { key, .. } => Some((key, false)),
        Change::Remove { key, .. } => Some((key, true)),
        Change::None => None,
    }
}

/// How long stored objects that could not be recreated wait between tries.
pub const RECREATE_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// Stored catalog objects that the start could not recreate (their store
/// did not answer), by key, with why. They stay stored and are tried again
/// every [`RECREATE_RETRY`]; meanwhile no statement may create an object of
/// the same name, which would replace the stored one and, once dropped,
/// lose it (and orphan a managed table's files).
#[derive(Debug, Clone, Default)]
pub struct Unrecreated {
    objects: Arc<Mutex<BTreeMap<String, (CatalogEntry, String)>>>,
}

impl Unrecreated {
    pub fn insert(&self, key: String, entry: CatalogEntry, error: String) {
        self.lock().insert(key, (entry, error));
    }

    pub fn remove(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Whether the object under `key` is a table that owns its folder
    /// (`CREATE TABLE AS`).
    pub fn owns_folder(&self, key: &str) -> bool {
        self.lock()
            .get(key)
            .is_some_and(|(entry, _)| entry.kind == MANAGED_TABLE)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Every object, in creation order, with its key.
    pub fn entries(&self) -> Vec<(String, CatalogEntry)> {
        let mut entries: Vec<(String, CatalogEntry)> = self
            .lock()
            .iter()
            .map(|(key, (entry, _))| (key.clone(), entry.clone()))
            .collect();
        entries.sort_by_key(|(_, entry)| entry.seq);
        entries
    }

    /// Why the object under `key` is not in the catalog, if it is one of these.
    pub fn why(&self, key: &str) -> Option<String> {
        self.lock()
            .get(key)
            .map(|(entry, error)| describe(entry, error))
    }

    /// Why the objects named in `message` (an error's) are not in the catalog.
    pub fn named_in(&self, message: &str) -> Vec<String> {
        self.lock()
            .values()
            .filter(|(entry, _)| {
                let short = entry.name.rsplit('.').next().unwrap_or(&entry.name);
                message.contains(&format!("'{}'", entry.name))
                    || message.contains(&format!("'{short}'"))
            })
            .map(|(entry, error)| describe(entry, error))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (CatalogEntry, String)>> {
        self.objects.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn describe(entry: &CatalogEntry, error: &str) -> String {
    format!(
        "'{}' is stored in the catalog, but could not be recreated when the scheduler started \
         ({error}); it is tried again every {}s",
        entry.name,
        RECREATE_RETRY.as_secs()
    )
}

fn change_of(ddl: &DdlStatement, state: &SessionState) -> Change {
    let options = state.config().options();
    let catalog = options.catalog.default_catalog.as_str();
    let table_key = |name: &TableReference| table_key(name, state);
    let schema_key = |name: &str| {
        let qualified = if name.contains('.') {
            name.to_owned()
        } else {
            format!("{catalog}.{name}")
        };
        (format!("schema:{qualified}"), qualified)
    };
    match ddl {
        DdlStatement::CreateExternalTable(create) => {
            let (key, name) = table_key(&create.name);
            Change::Put {
                key,
                kind: "table",
                name,
                if_absent: create.if_not_exists,
            }
        }
        DdlStatement::CreateView(create) => {
            let (key, name) = table_key(&create.name);
            Change::Put {
                key,
                kind: "table",
                name,
                if_absent: false,
            }
        }
        DdlStatement::CreateCatalogSchema(create) => {
            let (key, name) = schema_key(&create.schema_name);
            Change::Put {
                key,
                kind: "schema",
                name,
                if_absent: create.if_not_exists,
            }
        }
        DdlStatement::CreateCatalog(create) => Change::Put {
            key: format!("catalog:{}", create.catalog_name),
            kind: "catalog",
            name: create.catalog_name.clone(),
            if_absent: create.if_not_exists,
        },
        DdlStatement::DropTable(drop) => Change::Remove {
            key: table_key(&drop.name).0,
            cascade_prefix: None,
        },
        DdlStatement::DropView(drop) => Change::Remove {
            key: table_key(&drop.name).0,
            cascade_prefix: None,
        },
        DdlStatement::DropCatalogSchema(drop) => {
            let (key, name) = schema_key(&drop.name.to_string());
            Change::Remove {
                key,
                cascade_prefix: drop.cascade.then(|| format!("table:{name}.")),
            }
        }
        DdlStatement::CreateMemoryTable(create) => {
            warn!(table = %create.name, "in-memory tables are not persisted: this one is lost when the scheduler restarts");
            Change::None
        }
        DdlStatement::CreateIndex(_)
        | DdlStatement::CreateFunction(_)
        | DdlStatement::DropFunction(_) => Change::None,
    }
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::LogicalPlan;
    use datafusion::prelude::SessionContext;

    use super::*;

    async fn change(sql: &str) -> Change {
        let context = SessionContext::new();
        context
            .sql("CREATE VIEW existing AS SELECT 1 AS x")
            .await
            .expect("setup");
        let plan = context
            .state()
            .create_logical_plan(sql)
            .await
            .expect("plans");
        let LogicalPlan::Ddl(ddl) = plan else {
            panic!("{sql} is not DDL");
        };
        change_of(&ddl, &context.state())
    }

    #[tokio::test]
    async fn ddl_maps_to_catalog_changes() {
        assert_eq!(
            change("CREATE EXTERNAL TABLE IF NOT EXISTS s.t STORED AS CSV LOCATION '/x.csv'").await,
            Change::Put {
                key: "table:datafusion.s.t".into(),
                kind: "table",
                name: "datafusion.s.t".into(),
                if_absent: true,
            }
        );
        assert_eq!(
            change("CREATE OR REPLACE VIEW v AS SELECT 1").await,
            Change::Put {
                key: "table:datafusion.public.v".into(),
                kind: "table",
                name: "datafusion.public.v".into(),
                if_absent: false,
            }
        );
        assert_eq!(
            change("DROP VIEW existing").await,
            Change::Remove {
                key: "table:datafusion.public.existing".into(),
                cascade_prefix: None,
            }
        );
        assert_eq!(
            change("CREATE SCHEMA staging").await,
            Change::Put {
                key: "schema:datafusion.staging".into(),
                kind: "schema",
                name: "datafusion.staging".into(),
                if_absent: false,
            }
        );
        assert_eq!(
            change("DROP SCHEMA staging CASCADE").await,
            Change::Remove {
                key: "schema:datafusion.staging".into(),
                cascade_prefix: Some("table:datafusion.staging.".into()),
            }
        );
        assert_eq!(change("CREATE TABLE m AS VALUES (1)").await, Change::None);
    }
}
