//! Scans that read the committed state of their tables: the files of writes
//! whose manifest exists, without those a committed overwrite replaces (see
//! `quiver_core::write::snapshot`).
//!
//! DataFusion lists a table's folder when it plans a scan. Before a
//! statement's physical plan is made, each scan of a table of files whose
//! folder holds manifests is pointed at a [`CommittedTable`], which drops
//! from the listed files what a commit in progress, or an overwrite still
//! deleting, would otherwise show. It does so inside the scan, before
//! DataFusion's physical optimizer answers `count(*)` from the files'
//! statistics. Each table folder costs one listing of its `_manifests/`
//! folder per statement.

use std::borrow::Cow;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::Constraints;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig, FileScanConfigBuilder};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::error::Result;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::{Expr, LogicalPlan, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use object_store::path::Path;
use quiver_core::write::snapshot::CommittedFiles;

use crate::managed::table_folders;

/// `plan` with every scan of a table written by Quiver limited to the
/// table's committed files.
pub async fn scan_committed_files(plan: LogicalPlan, runtime: &RuntimeEnv) -> Result<LogicalPlan> {
    let mut scans = Vec::new();
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Ok(provider) = source_as_provider(&scan.source)
            && table_folders(&provider).is_some()
        {
            scans.push(provider);
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    })?;
    if scans.is_empty() {
        return Ok(plan);
    }
    let mut tables: Vec<Arc<dyn TableProvider>> = Vec::new();
    for provider in scans {
        if !tables.iter().any(|seen| Arc::ptr_eq(seen, &provider)) {
            tables.push(provider);
        }
    }
    // The tables' manifests are listed at once: on object storage each
    // listing is a round trip.
    let committed: Vec<_> =
        futures::future::try_join_all(tables.into_iter().map(|provider| async move {
            let tables = read_committed(&provider, runtime).await?;
            Ok::<_, datafusion::error::DataFusionError>((provider, tables))
        }))
        .await?;
    plan.transform_up_with_subqueries(|node| {
        let LogicalPlan::TableScan(scan) = &node else {
            return Ok(Transformed::no(node));
        };
        let Ok(provider) = source_as_provider(&scan.source) else {
            return Ok(Transformed::no(node));
        };
        let Some((_, tables)) = committed
            .iter()
            .find(|(seen, _)| Arc::ptr_eq(seen, &provider))
        else {
            return Ok(Transformed::no(node));
        };
        if tables.is_empty() {
            return Ok(Transformed::no(node));
        }
        let limited = CommittedTable {
            inner: provider,
            tables: Arc::clone(tables),
        };
        let mut scan = scan.clone();
        scan.source = provider_as_source(Arc::new(limited));
        Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
    })
    .map(|transformed| transformed.data)
}

/// The committed state of each folder of `provider` that holds manifests.
async fn read_committed(
    provider: &Arc<dyn TableProvider>,
    runtime: &RuntimeEnv,
) -> Result<Arc<Vec<(Path, CommittedFiles)>>> {
    let mut tables = Vec::new();
    // A table on one file has no manifests.
    let folders = table_folders(provider).unwrap_or_default();
    for folder in folders.iter().filter(|url| url.is_collection()) {
        let store = runtime.object_store(folder.object_store())?;
        let committed = CommittedFiles::read(&store, folder.prefix()).await?;
        if !committed.is_empty() {
            tables.push((folder.prefix().clone(), committed));
        }
    }
    Ok(Arc::new(tables))
}

/// A table of files whose scans read its committed files only.
#[derive(Debug)]
pub struct CommittedTable {
    inner: Arc<dyn TableProvider>,
    /// The folders of the table that hold manifests, with what they say.
    tables: Arc<Vec<(Path, CommittedFiles)>>,
}

impl CommittedTable {
    fn shows(&self, file: &Path) -> bool {
        self.tables
            .iter()
            .find(|(folder, _)| file.prefix_matches(folder))
            .is_none_or(|(_, committed)| committed.shows(file))
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
