//! Scans that read the committed state of their tables: the files of writes
//! whose manifest exists, without those a committed overwrite replaces (see
//! `quiver_core::write::snapshot`).
//!
//! DataFusion lists a table's folder when it plans a scan. Before a
//! statement's physical plan is made, the state of each table of files it
//! reads is read, and each scan of a table whose state hides files is
//! pointed at a [`CommittedTable`], which drops from the listed files what a
//! commit in progress, or an overwrite still deleting, would otherwise show.
//! It does so inside the scan, before DataFusion's physical optimizer
//! answers `count(*)` from the files' statistics. Once the scans have listed
//! their files, the states are read again: a write that committed in between
//! may have deleted listed files, so the statement is planned again.
//! Each table folder costs two listings of its `_manifests/` folder per
//! statement.

use std::borrow::Cow;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::Constraints;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig, FileScanConfigBuilder};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::SessionState;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::{Expr, LogicalPlan, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use object_store::ObjectStore;
use object_store::path::Path;
use quiver_core::write::snapshot::CommittedFiles;
use tracing::debug;

use crate::managed::table_folders;

/// How many times a statement is planned while writes keep committing to
/// the tables it reads, before it fails.
const PLANNING_TRIES: usize = 4;

/// The physical plan of `logical` with every scan of a table of files limited
/// to the table's committed files, as they were when the scans listed them.
pub async fn plan_committed_scans(
    logical: &LogicalPlan,
    state: &SessionState,
) -> Result<Arc<dyn ExecutionPlan>> {
    let mut changed = String::new();
    for attempt in 1..=PLANNING_TRIES {
        let (limited, states) = scan_committed_files(logical.clone(), state.runtime_env()).await?;
        // Planned again if a write committed meanwhile, also when planning
        // failed: a file it listed may have gone since.
        let planned = state
            .query_planner()
            .create_physical_plan(&limited, state)
            .await;
        match states.changed_folder().await? {
            None => return planned,
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

/// `plan` with every scan of a table written by Quiver limited to the
/// table's committed files, and the states of the tables it reads.
async fn scan_committed_files(
    plan: LogicalPlan,
    runtime: &RuntimeEnv,
) -> Result<(LogicalPlan, TableStates)> {
    let mut tables: Vec<Arc<dyn TableProvider>> = Vec::new();
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Ok(provider) = source_as_provider(&scan.source)
            && table_folders(&provider).is_some()
            && !tables.iter().any(|seen| Arc::ptr_eq(seen, &provider))
        {
            tables.push(provider);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if tables.is_empty() {
        return Ok((plan, TableStates::default()));
    }
    // The tables' states are read at once: on object storage each listing
    // is a round trip.
    let read: Vec<_> =
        futures::future::try_join_all(tables.into_iter().map(|provider| async move {
            let states = read_states(&provider, runtime).await?;
            Ok::<_, DataFusionError>((provider, states))
        }))
        .await?;
    let plan = plan
        .transform_up_with_subqueries(|node| {
            let LogicalPlan::TableScan(scan) = &node else {
                return Ok(Transformed::no(node));
            };
            let Ok(provider) = source_as_provider(&scan.source) else {
                return Ok(Transformed::no(node));
            };
            let Some((_, states)) = read.iter().find(|(seen, _)| Arc::ptr_eq(seen, &provider))
            else {
                return Ok(Transformed::no(node));
            };
            if states.iter().all(|state| state.committed.hides_nothing()) {
                return Ok(Transformed::no(node));
            }
            let limited = CommittedTable {
                inner: provider,
                folders: states.clone(),
            };
            let mut scan = scan.clone();
            scan.source = provider_as_source(Arc::new(limited));
            Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
        })?
        .data;
    let states = TableStates {
        folders: read.into_iter().flat_map(|(_, states)| states).collect(),
    };
    Ok((plan, states))
}

/// The committed state of each folder of `provider`.
async fn read_states(
    provider: &Arc<dyn TableProvider>,
    runtime: &RuntimeEnv,
) -> Result<Vec<Arc<FolderState>>> {
    let mut states = Vec::new();
    // A table on one file has no manifests.
    let folders = table_folders(provider).unwrap_or_default();
    for folder in folders.iter().filter(|url| url.is_collection()) {
        let store = runtime.object_store(folder.object_store())?;
        let committed = CommittedFiles::read(&store, folder.prefix()).await?;
        states.push(Arc::new(FolderState {
            url: folder.clone(),
            store,
            committed,
        }));
    }
    Ok(states)
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
struct TableStates {
    folders: Vec<Arc<FolderState>>,
}

impl TableStates {
    /// A folder to which a write has committed since its state was read.
    async fn changed_folder(&self) -> Result<Option<String>> {
        let current = futures::future::try_join_all(self.folders.iter().map(|folder| async {
            folder
                .committed
                .is_current(&folder.store, folder.url.prefix())
                .await
        }))
        .await?;
        Ok(self
            .folders
            .iter()
            .zip(current)
            .find(|(_, current)| !current)
            .map(|(folder, _)| folder.url.to_string()))
    }
}

/// A table of files whose scans read its committed files only.
#[derive(Debug)]
struct CommittedTable {
    inner: Arc<dyn TableProvider>,
    /// The states of the table's folders.
    folders: Vec<Arc<FolderState>>,
}

impl CommittedTable {
    fn shows(&self, file: &Path) -> bool {
        self.folders
            .iter()
            .find(|folder| file.prefix_matches(folder.url.prefix()))
            .is_none_or(|folder| folder.committed.shows(file))
    }

    /// `scan` without the files that this table does not show. When it drops
    /// any, the table's statistics become estimates: DataFusion would
    /// otherwise answer `count(*)` from them.
    fn limit(&self, scan: &FileScanConfig) -> Option<FileScanConfig> {
        let hides_any = scan
            .file_groups
            .iter()
            .flat_map(FileGroup::files)
            .any(|file| !self.shows(&file.object_meta.location));
        if !hides_any {
            return None;
        }
        // As many groups as before, so that the scan keeps its partitions.
        let groups = scan
            .file_groups
            .iter()
            .map(|group| {
                let files = group
                    .files()
                    .iter()
                    .filter(|file| self.shows(&file.object_meta.location))
                    .cloned()
                    .collect();
                FileGroup::new(files)
            })
            .collect();
        let statistics = scan.statistics().to_inexact();
        Some(
            FileScanConfigBuilder::from(scan.clone())
                .with_file_groups(groups)
                .with_statistics(statistics)
                .build(),
        )
    }
}

#[async_trait]
impl TableProvider for CommittedTable {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn constraints(&self) -> Option<&Constraints> {
        self.inner.constraints()
    }

    fn table_type(&self) -> TableType {
        self.inner.table_type()
    }

    fn get_table_definition(&self) -> Option<&str> {
        self.inner.get_table_definition()
    }

    fn get_logical_plan(&self) -> Option<Cow<'_, LogicalPlan>> {
        self.inner.get_logical_plan()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let plan = self.inner.scan(state, projection, filters, limit).await?;
        plan.transform_up(|node| {
            let limited = node
                .downcast_ref::<DataSourceExec>()
                .and_then(|source| source.data_source().downcast_ref::<FileScanConfig>())
                .and_then(|scan| self.limit(scan));
            Ok(match limited {
                Some(config) => Transformed::yes(
                    DataSourceExec::from_data_source(config) as Arc<dyn ExecutionPlan>
                ),
                None => Transformed::no(node),
            })
        })
        .map(|transformed| transformed.data)
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        self.inner.supports_filters_pushdown(filters)
    }
}

#[cfg(test)]
mod tests {
    use std::fmt;
    use std::ops::Range;
    use std::sync::Mutex;

    use bytes::Bytes;
    use datafusion::physical_plan::collect;
    use datafusion::prelude::SessionContext;
    use futures::stream::BoxStream;
    use object_store::local::LocalFileSystem;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
        PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
    };

    use super::*;

    /// Local files, on which `action` runs once, as the first listing or
    /// read of `at` starts: a write committing, or deleting what it
    /// replaced, while a statement is planned.
    struct ActionDuringPlanning {
        inner: LocalFileSystem,
        at: Path,
        action: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    impl ActionDuringPlanning {
        fn new(at: &std::path::Path, action: impl FnOnce() + Send + 'static) -> Self {
            Self {
                inner: LocalFileSystem::new(),
                at: Path::from_filesystem_path(at).expect("path"),
                action: Mutex::new(Some(Box::new(action))),
            }
        }

        fn act_once_at(&self, location: &Path) {
            if location == &self.at
                && let Some(action) = self.action.lock().expect("lock").take()
            {
                action();
            }
        }
    }

    impl fmt::Display for ActionDuringPlanning {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "ActionDuringPlanning({})", self.inner)
        }
    }

    impl fmt::Debug for ActionDuringPlanning {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            fmt::Display::fmt(self, f)
        }
    }

    #[async_trait]
    impl ObjectStore for ActionDuringPlanning {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &Path,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.act_once_at(location);
            self.inner.get_opts(location, options).await
        }

        async fn get_ranges(
            &self,
            location: &Path,
            ranges: &[Range<u64>],
        ) -> object_store::Result<Vec<Bytes>> {
            self.act_once_at(location);
            self.inner.get_ranges(location, ranges).await
        }

        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<Path>>,
        ) -> BoxStream<'static, object_store::Result<Path>> {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            if let Some(prefix) = prefix {
                self.act_once_at(prefix);
            }
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &Path,
            to: &Path,
            options: CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }

        async fn rename_opts(
            &self,
            from: &Path,
            to: &Path,
            options: RenameOptions,
        ) -> object_store::Result<()> {
            self.inner.rename_opts(from, to, options).await
        }
    }

    /// `k` of table `t`, as `plan_committed_scans` plans it.
    async fn planned_rows(context: &SessionContext) -> Result<Vec<i64>> {
        let plan = context
            .sql("SELECT k FROM t")
            .await?
            .into_optimized_plan()?;
        let physical = plan_committed_scans(&plan, &context.state()).await?;
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
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
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
        let store = ActionDuringPlanning::new(&table, commit);
        context.register_object_store(&url::Url::parse("file://").expect("url"), Arc::new(store));

        let rows = planned_rows(&context).await.expect("rows");
        assert_eq!(rows, vec![2], "the overwrite's row, and only it");
    }

    /// A file that a committed overwrite replaced, and may delete at any
    /// moment, is listed but never read while the statement is planned:
    /// neither for its statistics nor for its footer.
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

        let store = ActionDuringPlanning::new(&replaced, {
            let replaced = replaced.clone();
            move || std::fs::remove_file(&replaced).expect("delete the replaced file")
        });
        context.register_object_store(&url::Url::parse("file://").expect("url"), Arc::new(store));
        assert_eq!(planned_rows(&context).await.expect("rows"), vec![2]);
        assert!(replaced.exists(), "the replaced file was read");
    }
}
