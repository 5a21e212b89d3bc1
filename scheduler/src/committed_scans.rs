//! Scans that read the committed state of their tables: the files of writes
//! whose manifest exists, without those a committed overwrite replaces (see
//! `quiver_core::write::snapshot`).
//!
//! DataFusion lists a table's folder, and reads its files' statistics, when
//! it plans a scan. Before a statement's physical plan is made, the state of
//! each table folder it reads is read; where a state hides files (a commit
//! in progress, an overwrite still deleting), the statement is planned with
//! a view of the stores whose listings leave those files out
//! ([`CommittedView`]), so that DataFusion never sees them: not for the
//! scan's files, nor its statistics, nor a `LIMIT` counted from them. Once
//! planned, the states are read again: an overwrite that committed in
//! between may have deleted listed files, so the statement is planned again.
//! Each table folder costs two listings of its `_manifests/` folder per
//! statement.

use std::sync::Arc;

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::datasource::source_as_provider;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::ExecutionPlan;
use object_store::ObjectStore;
use object_store::path::Path;
use quiver_core::storage::forwarding::{Forwarding, StoreHooks, WrappingRegistry};
use quiver_core::storage::store_key;
use quiver_core::write::snapshot::{CommittedFiles, KnownCommits};
use tracing::debug;
use url::Url;

use crate::managed::table_folders;

/// How many times a statement is planned while writes keep committing to
/// the tables it reads, before it fails.
const PLANNING_TRIES: usize = 4;

/// The physical plan of `logical`, whose scans read the committed files of
/// their tables as they were when the scans listed them, and the states of
/// those tables.
pub async fn plan_committed_scans(
    logical: &LogicalPlan,
    state: &SessionState,
) -> Result<(Arc<dyn ExecutionPlan>, TableStates)> {
    let mut changed = String::new();
    for attempt in 1..=PLANNING_TRIES {
        let states = read_table_states(logical, state.runtime_env()).await?;
        let view;
        let planning_state = if states.hide_nothing() {
            state
        } else {
            view = states.view_of(state)?;
            &view
        };
        // Planned again if a write committed meanwhile, also when planning
        // failed: a file it listed may have gone since.
        let planned = planning_state
            .query_planner()
            .create_physical_plan(logical, planning_state)
            .await;
        match states.changed_folder().await? {
            None => return planned.map(|physical| (physical, states)),
            Some(folder) => {
                debug!(attempt, %folder, "a write committed while the statement was planned; planning again");
                changed = folder;
            }
        }
    }
    Err(DataFusionError::Execution(format!(
        "writes kept committing to the table at '{changed}' while this statement was \
         planned ({PLANNING_TRIES} times in a row); run it again"
    )))
}

/// `error`, met reading which writes committed to the table folder `url`,
/// naming the folder: the store's own error names only a request.
fn cannot_read(url: &ListingTableUrl, error: DataFusionError) -> DataFusionError {
    DataFusionError::Context(format!("cannot read the table at '{url}'"), Box::new(error))
}

/// The states of the table folders that `plan` scans.
async fn read_table_states(plan: &LogicalPlan, runtime: &RuntimeEnv) -> Result<TableStates> {
    let mut folders: Vec<ListingTableUrl> = Vec::new();
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Ok(provider) = source_as_provider(&scan.source)
        {
            // A table on one file has no manifests.
            for folder in table_folders(&provider)
                .unwrap_or_default()
                .iter()
                .filter(|url| url.is_collection())
            {
                if !folders.contains(folder) {
                    folders.push(folder.clone());
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    // The folders' states are read at once: on object storage each listing
    // is a round trip.
    let folders = futures::future::try_join_all(folders.into_iter().map(|url| async move {
        let store = runtime.object_store(url.object_store())?;
        let committed = CommittedFiles::read(&store, url.prefix())
            .await
            .map_err(|e| cannot_read(&url, e))?;
        Ok::<_, DataFusionError>(Arc::new(FolderState {
            url,
            store,
            committed,
        }))
    }))
    .await?;
    Ok(TableStates { folders })
}

/// The committed state of one table folder, as read before a statement's
/// scans listed it.
#[derive(Debug)]
struct FolderState {
    url: ListingTableUrl,
    store: Arc<dyn ObjectStore>,
    committed: CommittedFiles,
}

/// The states of the table folders one statement reads.
#[derive(Debug, Default)]
pub struct TableStates {
    folders: Vec<Arc<FolderState>>,
}

impl TableStates {
    fn hide_nothing(&self) -> bool {
        self.folders
            .iter()
            .all(|folder| folder.committed.hides_nothing())
    }

    /// The jobs committed to `folder` in the state that the statement read,
    /// if it read that folder.
    pub fn known_commits(&self, folder: &ListingTableUrl) -> Option<KnownCommits> {
        self.folders
            .iter()
            .find(|state| {
                state.url.object_store() == folder.object_store()
                    && state.url.prefix() == folder.prefix()
            })
            .map(|state| state.committed.known_commits())
    }

    /// A folder to which a write has committed since its state was read.
    async fn changed_folder(&self) -> Result<Option<String>> {
        let current = futures::future::try_join_all(self.folders.iter().map(|folder| async {
            folder
                .committed
                .is_current(&folder.store, folder.url.prefix())
                .await
                .map_err(|e| cannot_read(&folder.url, e))
        }))
        .await?;
        Ok(self
            .folders
            .iter()
            .zip(current)
            .find(|(_, current)| !current)
            .map(|(folder, _)| folder.url.to_string()))
    }

    /// `state` with stores whose listings leave out what these states hide.
    fn view_of(&self, state: &SessionState) -> Result<SessionState> {
        let runtime = state.runtime_env();
        let folders = self.folders.clone();
        let registry = Arc::new(WrappingRegistry::new(
            Arc::clone(&runtime.object_store_registry),
            move |url: &Url, store| committed_view(url, store, &folders),
        ));
        let runtime = RuntimeEnvBuilder::from_runtime_env(runtime)
            .with_object_store_registry(registry)
            .build_arc()?;
        Ok(SessionStateBuilder::new_from_existing(state.clone())
            .with_runtime_env(runtime)
            .build())
    }
}

/// The stores of a folder's table, seen through `folders`' states.
fn committed_view(
    url: &Url,
    store: Arc<dyn ObjectStore>,
    folders: &[Arc<FolderState>],
) -> Arc<dyn ObjectStore> {
    let hiding: Vec<Arc<FolderState>> = folders
        .iter()
        .filter(|folder| {
            !folder.committed.hides_nothing()
                && store_key(folder.url.object_store().as_ref()) == store_key(url)
        })
        .cloned()
        .collect();
    if hiding.is_empty() {
        return store;
    }
    Arc::new(Forwarding::new(store, CommittedView { folders: hiding }))
}

/// Listings that show, of the table folders of `folders`, only the files
/// their committed state shows.
#[derive(Debug)]
struct CommittedView {
    folders: Vec<Arc<FolderState>>,
}

impl StoreHooks for CommittedView {
    fn lists(&self, location: &Path) -> bool {
        self.folders
            .iter()
            .find(|folder| location.prefix_matches(folder.url.prefix()))
            .is_none_or(|folder| folder.committed.shows(location))
    }
}

#[cfg(test)]
mod tests {
    use std::fmt;
    use std::sync::Mutex;

    use datafusion::physical_plan::collect;
    use datafusion::prelude::SessionContext;
    use object_store::local::LocalFileSystem;

    use super::*;

    /// Runs `action` once, as the first listing or read of `at` starts: a
    /// write committing, or deleting what it replaced, while a statement is
    /// planned.
    struct ActionAt {
        at: Path,
        action: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    impl fmt::Debug for ActionAt {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "ActionAt({})", self.at)
        }
    }

    impl StoreHooks for ActionAt {
        fn before(&self, location: &Path) {
            if location == &self.at
                && let Some(action) = self.action.lock().expect("lock").take()
            {
                action();
            }
        }
    }

    /// Local files, on which `action` runs as the first request for `at`
    /// starts.
    fn action_during_planning(
        at: &std::path::Path,
        action: impl FnOnce() + Send + 'static,
    ) -> Arc<dyn ObjectStore> {
        let hooks = ActionAt {
            at: Path::from_filesystem_path(at).expect("path"),
            action: Mutex::new(Some(Box::new(action))),
        };
        Arc::new(Forwarding::new(Arc::new(LocalFileSystem::new()), hooks))
    }

    /// The column `k` that `sql` returns, planned by `plan_committed_scans`.
    async fn planned_rows(context: &SessionContext, sql: &str) -> Result<Vec<i64>> {
        let plan = context.sql(sql).await?.into_optimized_plan()?;
        let (physical, _) = plan_committed_scans(&plan, &context.state()).await?;
        let batches = collect(physical, context.task_ctx()).await?;
        Ok(batches
            .iter()
            .flat_map(|batch| {
                batch
                    .column(0)
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .expect("k")
                    .values()
                    .to_vec()
            })
            .collect())
    }

    /// A context whose runtime does not cache file listings, as Quiver's.
    fn uncached_context() -> SessionContext {
        let runtime = RuntimeEnvBuilder::new()
            .with_cache_manager(
                datafusion::execution::cache::cache_manager::CacheManagerConfig::default()
                    .with_list_files_cache_limit(0),
            )
            .build_arc()
            .expect("runtime");
        SessionContext::new_with_config_rt(Default::default(), runtime)
    }

    async fn write_one_row(context: &SessionContext, file: &std::path::Path, k: i64) {
        context
            .sql(&format!(
                "COPY (SELECT CAST({k} AS BIGINT) AS k) TO '{}' STORED AS PARQUET",
                file.display()
            ))
            .await
            .expect("plan")
            .collect()
            .await
            .expect("write");
    }

    /// An overwrite that commits between the read of the table's state and
    /// the listing of its files would leave the statement with neither the
    /// old rows (deleted) nor the new ones (not committed in the state it
    /// read): the statement is planned again, and reads the new rows.
    #[tokio::test]
    async fn a_write_committed_while_a_statement_is_planned_is_read_whole() {
        const OLD: &str = "00000000000000a1";
        const NEW: &str = "00000000000000b2";
        let dir = tempfile::tempdir().expect("temp");
        let table = dir.path().join("t");
        let staged = dir.path().join(format!("part-{NEW}-00000-000.parquet"));
        let context = uncached_context();
        write_one_row(
            &context,
            &table.join(format!("part-{OLD}-00000-000.parquet")),
            1,
        )
        .await;
        write_one_row(&context, &staged, 2).await;
        std::fs::create_dir_all(table.join("_manifests")).expect("folder");
        std::fs::write(table.join(format!("_manifests/{OLD}.json")), "{}").expect("manifest");
        context
            .sql(&format!(
                "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '{}/'",
                table.display()
            ))
            .await
            .expect("table");

        let commit = {
            let table = table.clone();
            move || {
                std::fs::rename(&staged, table.join(staged.file_name().expect("name")))
                    .expect("move in");
                std::fs::write(table.join(format!("_manifests/{NEW}.json")), "{}")
                    .expect("manifest");
                std::fs::remove_file(table.join(format!("part-{OLD}-00000-000.parquet")))
                    .expect("delete the replaced file");
            }
        };
        let store = action_during_planning(&table, commit);
        context.register_object_store(&Url::parse("file://").expect("url"), store);

        let rows = planned_rows(&context, "SELECT k FROM t")
            .await
            .expect("rows");
        assert_eq!(rows, vec![2], "the overwrite's row, and only it");
    }

    /// A file that a committed overwrite replaced, and may delete at any
    /// moment, is left out of the listing that planning makes: nothing of
    /// it is read, neither its footer nor its statistics, and a `LIMIT`
    /// does not count its rows.
    #[tokio::test]
    async fn planning_reads_nothing_of_replaced_files() {
        const OLD: &str = "00000000000000a1";
        const NEW: &str = "00000000000000b2";
        let dir = tempfile::tempdir().expect("temp");
        let table = dir.path().join("t");
        let replaced = table.join(format!("part-{OLD}-00000-000.parquet"));
        let context = uncached_context();
        write_one_row(&context, &replaced, 1).await;
        write_one_row(
            &context,
            &table.join(format!("part-{NEW}-00000-000.parquet")),
            2,
        )
        .await;
        std::fs::create_dir_all(table.join("_manifests")).expect("folder");
        for job in [OLD, NEW] {
            std::fs::write(table.join(format!("_manifests/{job}.json")), "{}").expect("manifest");
        }
        std::fs::write(
            table.join(format!("_manifests/{NEW}.replaces")),
            format!("[\"part-{OLD}-00000-000.parquet\"]"),
        )
        .expect("list of replaced files");
        context
            .sql(&format!(
                // Declared, so that the first footers read are the scan's.
                "CREATE EXTERNAL TABLE t (k BIGINT) STORED AS PARQUET LOCATION '{}/'",
                table.display()
            ))
            .await
            .expect("table");

        let store = action_during_planning(&replaced, {
            let replaced = replaced.clone();
            move || std::fs::remove_file(&replaced).expect("delete the replaced file")
        });
        context.register_object_store(&Url::parse("file://").expect("url"), store);
        assert_eq!(
            planned_rows(&context, "SELECT k FROM t")
                .await
                .expect("rows"),
            vec![2]
        );
        assert_eq!(
            planned_rows(&context, "SELECT k FROM t LIMIT 1")
                .await
                .expect("rows"),
            vec![2]
        );
        assert!(replaced.exists(), "the replaced file was read");
    }
}
