//! Turns a client's query into stages: SQL or a serialized logical plan is
//! planned by DataFusion against the shared catalog, then cut into stages.
//!
//! Statements that only change the catalog or the session (`CREATE EXTERNAL
//! TABLE`, `DROP TABLE`, `CREATE VIEW`, `SET`) run here, at once, and need no
//! executor.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{CatalogProviderList, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{ParamValues, TableReference};
use datafusion::datasource::file_format::format_as_file_type;
use datafusion::datasource::file_format::parquet::ParquetFormatFactory;
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::source_as_provider;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{
    CreateMemoryTable, DdlStatement, Explain, LogicalPlan, LogicalPlanBuilder, PlanType,
    Statement as PlanStatement, ToStringifiedPlan, WriteOp,
};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use prost::bytes::Bytes;
use quiver_core::codec::{RemoteTableCodec, TableResolver, decode_logical_plan};
use quiver_core::config::{QuiverOptions, default_session_config, session_config_from_settings};
use quiver_core::guard::{catch_future_panic, panic_message};
use quiver_core::scalar_subqueries::SingleRowSubqueries;
use quiver_core::shuffle::durable;
use quiver_core::storage::redacted_error;
use quiver_core::storage::registry::ReplacedStore;
use quiver_core::storage::{
    StoreOptions, StoreRegistry, holds_url_password, is_store_option, redact_statement_error,
    redact_store_echoes, register_store_option_namespaces, runtime_builder, store_did_not_answer,
};
use quiver_core::write::sinks::unstaged_write_folder;
use quiver_core::write::snapshot::KnownCommits;
use quiver_core::write::{
    ParquetCommitExec, check_folder_write_access, check_write_access, distribute_parquet_writes,
};
use quiver_proto::{
    CatalogEntry, JobRecord, PendingTable, Setting, StoreConfig, submit_job_request::Query,
};

use crate::adaptive::{AdaptivePolicy, PendingJoins};
use crate::catalog;
use crate::committed_scans::{TableStates, plan_committed_scans};
use crate::error::{Error, Result};
use crate::locations::{read_parquet_folders, reads_target, store_configs, write_target};
use crate::managed::{self, CATALOGS_FOLDER, table_folders, warehouse_folder};
use crate::stages::{StagePlan, display_stages, split_into_stages};
use crate::starting::SilentStores;
use crate::state::JobLimits;
use crate::store::StateStore;
use crate::tables::first_unreadable_parquet_file;

const TARGET_PARTITIONS_KEY: &str = "datafusion.execution.target_partitions";

/// A planned query.
#[derive(Debug)]
pub enum Planned {
    /// A statement that already ran on the scheduler.
    Done { schema: SchemaRef },
    /// A query to run on the executors.
    Stages(StagedJob),
    /// `CREATE TABLE ... AS SELECT`: a job that writes the table's folder in
    /// the warehouse, then catalog statements that register that folder.
    CreateTableAs {
        write: StagedJob,
        register: Vec<String>,
        /// The catalog key of the table, to mark it managed once registered.
        managed_key: String,
    },
    /// `EXPLAIN ANALYZE`: a job that runs the statement, whose metrics then
    /// make the answer.
    Analyze { job: StagedJob, verbose: bool },
}

/// What a statement returns and what it takes, as a prepared statement
/// describes itself to a client.
#[derive(Debug, Clone)]
pub struct StatementShape {
    pub result: SchemaRef,
    /// One field per placeholder, named `$1`, `$2`...; `Null` where its type
    /// cannot be inferred.
    pub parameters: SchemaRef,
}

/// A job cut into stages, ready to run on the executors.
#[derive(Debug)]
pub struct StagedJob {
    pub schema: SchemaRef,
    pub stages: Vec<StagePlan>,
    pub encoded: Vec<Bytes>,
    pub limits: JobLimits,
    /// Options of the configured object stores the job uses.
    pub stores: Vec<StoreConfig>,
    /// `quiver.shuffle_location`, or empty.
    pub durable_shuffle: String,
    /// The table folder the job writes, if it writes one.
    pub writes_to: Option<String>,
    /// Joins to decide again once their build side has run.
    pub adaptive: PendingJoins,
    /// The stores that the statement's options configured: put back if the
    /// job does not succeed, as for a statement that fails to plan.
    pub configured_stores: Vec<ReplacedStore>,
    /// Plans the job again if a file it reads is replaced while it runs;
    /// `None` for jobs that cannot simply run again (see [`Replanner`]).
    pub replanner: Option<Replanner>,
}

/// Plans a running job's statement again, from its logical plan, against
/// the files its tables hold now: for a job that lost a file it reads to a
/// write that replaced it after the job was planned. Only the physical
/// planning is done again, so the statement itself (its store options, its
/// catalog lookups) does not run twice; a table that was dropped or
/// defined anew meanwhile fails the job instead, rather than be read with
/// its old definition.
///
/// `CREATE TABLE ... AS SELECT` and `EXPLAIN ANALYZE` jobs get none: the
/// first fails if its folder gained commits since it was planned, which a
/// new plan would forget, and the second reports on the stages it planned.
/// Nor do writes through sinks that stage nothing (CSV, JSON, a single
/// Parquet file): a new plan would write again what finished tasks wrote.
#[derive(Clone)]
pub struct Replanner {
    planner: Planner,
    job_id: String,
    logical: LogicalPlan,
    state: SessionState,
    schema: SchemaRef,
    overwrite: bool,
    /// The stores of the first plan, which a new plan lists files and
    /// checks write access with: the job acts with one set of credentials
    /// from start to end, whatever another statement configures meanwhile.
    stores: Vec<StoreConfig>,
}

impl std::fmt::Debug for Replanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replanner")
            .field("job_id", &self.job_id)
            .finish_non_exhaustive()
    }
}

impl Replanner {
    /// The job's stages as planned now.
    pub async fn plan(&self) -> Result<StagedJob> {
        self.check_tables_unchanged().await?;
        let schema = Arc::clone(&self.schema);
        let pinned = Arc::new(
            self.planner
                .object_stores
                .pinned(&self.stores)
                .map_err(Error::Query)?,
        );
        let runtime = RuntimeEnvBuilder::from_runtime_env(self.state.runtime_env())
            .with_object_store_registry(Arc::clone(&pinned) as _)
            .build_arc()
            .map_err(Error::Query)?;
        let state = SessionStateBuilder::new_from_existing(self.state.clone())
            .with_runtime_env(runtime)
            .build();
        let planner = Planner {
            object_stores: pinned,
            ..self.planner.clone()
        };
        planner
            .stage_job(
                &self.job_id,
                &self.logical,
                &state,
                schema,
                self.overwrite,
                false,
            )
            .await
    }

    /// Fails if a table on files that the job reads is no longer in the
    /// catalog as it was planned: dropped (a managed table's files go with
    /// it), or defined anew, possibly on other files or columns.
    async fn check_tables_unchanged(&self) -> Result<()> {
        let mut scans: Vec<(TableReference, Arc<dyn TableProvider>)> = Vec::new();
        self.logical
            .apply_with_subqueries(|node| {
                if let LogicalPlan::TableScan(scan) = node
                    && let Ok(provider) = source_as_provider(&scan.source)
                    && table_folders(&provider).is_some()
                {
                    scans.push((scan.table_name.clone(), provider));
                }
                Ok(TreeNodeRecursion::Continue)
            })
            .map_err(Error::Query)?;
        for (name, planned) in scans {
            let current = match self.state.schema_for_ref(name.clone()) {
                Ok(schema) => schema.table(name.table()).await.map_err(Error::Query)?,
                Err(_) => None,
            };
            let unchanged = current.is_some_and(|current| {
                Arc::ptr_eq(&current, &planned)
                    || (current.schema() == planned.schema()
                        && table_folders(&current) == table_folders(&planned))
            });
            if !unchanged {
                return Err(Error::Query(DataFusionError::Plan(format!(
                    "table '{name}' was dropped or defined anew while this job ran; run the \
                     statement again"
                ))));
            }
        }
        Ok(())
    }
}

/// Fails the statement, before anything is written, if the store of
/// `target` (as `state` has it) does not let the job write there: a staged Parquet write
/// must create and delete objects in its staging folder
/// ([`check_write_access`]), and a write through one of DataFusion's own
/// sinks must create objects in the folder it writes into, `unstaged_in`
/// ([`check_folder_write_access`]).
async fn check_write_access_of(
    state: &SessionState,
    target: &str,
    unstaged_in: Option<object_store::path::Path>,
    job_id: &str,
) -> Result<()> {
    let location_error = |source| Error::WriteAccess {
        location: target.to_owned(),
        source,
    };
    let table = ListingTableUrl::parse(target).map_err(location_error)?;
    let store = state
        .runtime_env()
        .object_store(table.object_store())
        .map_err(location_error)?;
    // Spawned: a client that hangs up mid-check must not leave the
    // check's object behind in a folder that no job will settle.
    let (prefix, job_id) = (table.prefix().clone(), job_id.to_owned());
    let check = tokio::spawn(async move {
        match unstaged_in {
            Some(folder) => check_folder_write_access(&store, &folder, &job_id).await,
            None => check_write_access(&store, &prefix, &job_id).await,
        }
    });
    check
        .await
        .map_err(spawned_failure)?
        .map_err(location_error)
}

/// The durable shuffle location of a job (`quiver.shuffle_location`) as a
/// URL (a plain folder becomes a `file://` one, as executors expect), once
/// its store was found to take the job's map outputs
/// ([`durable::check_access`]); empty for none. A relative folder is
/// refused: each process would take it from its own working folder.
async fn durable_shuffle_location(
    state: &SessionState,
    options: &QuiverOptions,
    job_id: &str,
) -> Result<String> {
    let location = options.shuffle_location.trim();
    if location.is_empty() {
        return Ok(String::new());
    }
    let refused = |reason: &str| {
        Error::ShuffleLocation(quiver_core::error::Error::ShuffleLocationRefused {
            location: redact_store_echoes(location).into_owned(),
            reason: reason.to_owned(),
        })
    };
    if !location.contains("://") && !std::path::Path::new(location).is_absolute() {
        return Err(refused(
            "it is a relative folder; give a URL (s3://bucket/folder) or an absolute folder \
             that every executor shares",
        ));
    }
    let url = ListingTableUrl::parse(location)
        .map_err(|e| refused(&redacted_error(&e)))?
        .as_str()
        .trim_end_matches('/')
        .to_owned();
    let registry = Arc::clone(&state.runtime_env().object_store_registry);
    let job_id = job_id.to_owned();
    let checked = url.clone();
    // Spawned: a client that hangs up mid-check must not leave its object.
    tokio::spawn(async move { durable::check_access(registry.as_ref(), &checked, &job_id).await })
        .await
        .map_err(spawned_failure)?
        .map_err(Error::ShuffleLocation)?;
    Ok(url)
}

/// The write plan `physical` with its commit told which jobs have
/// committed to `target` so far, so that it fails rather than replace
/// rows committed after this statement was planned (see
/// [`ParquetCommitExec::with_known_commits`]): those of the state its
/// scans read (`read`) when it reads `target`, for a job that committed
/// once they had listed it was not read.
async fn guard_commit(
    state: &SessionState,
    physical: Arc<dyn ExecutionPlan>,
    target: &str,
    read: &TableStates,
) -> Result<Arc<dyn ExecutionPlan>> {
    let table = ListingTableUrl::parse(target).map_err(Error::Query)?;
    let known = match read.known_commits(&table) {
        Some(known) => known,
        None => {
            let store = state
                .runtime_env()
                .object_store(table.object_store())
                .map_err(Error::Query)?;
            KnownCommits::read(&store, table.prefix())
                .await
                .map_err(|e| Error::TableLocation {
                    location: target.to_owned(),
                    source: e,
                })?
        }
    };
    physical
        .transform_up(|node| match node.downcast_ref::<ParquetCommitExec>() {
            Some(commit) => {
                let [input] = commit.children()[..] else {
                    return Err(DataFusionError::Internal("a commit has one input".into()));
                };
                let guarded = ParquetCommitExec::new(
                    Arc::clone(input),
                    Arc::clone(commit.sink()),
                    commit.job_id().to_owned(),
                )
                .with_known_commits(known.clone());
                Ok(Transformed::yes(Arc::new(guarded) as Arc<dyn ExecutionPlan>))
            }
            None => Ok(Transformed::no(node)),
        })
        .map(|transformed| transformed.data)
        .map_err(Error::Query)
}

/// The logical plan of `sql`. A parse error does not quote the statement's
/// store options, which may hold secrets (see [`redact_statement_error`]).
async fn logical_plan_of(state: &SessionState, sql: &str) -> Result<LogicalPlan> {
    state
        .create_logical_plan(sql)
        .await
        .map_err(|e| Error::Query(redact_statement_error(e, sql)))
}

/// Plans queries against the catalog that all clients share.
#[derive(Clone)]
pub struct Planner {
    catalog: SessionContext,
    default_partitions: usize,
    store: StateStore,
    object_stores: Arc<StoreRegistry>,
    /// Where `CREATE TABLE ... AS SELECT` writes, ending in `/`.
    warehouse: String,
    /// Stored objects that the start could not recreate.
    unrecreated: catalog::Unrecreated,
}

impl std::fmt::Debug for Planner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Planner")
            .field("default_partitions", &self.default_partitions)
            .finish_non_exhaustive()
    }
}

/// DataFusion's physical optimizer rules, with Quiver's cost-based choice
/// of broadcast joins ahead of DataFusion's own join selection, exchanges
/// that do not claim to keep their input's order (a shuffle does not) once
/// they are placed, and staged build sides before the final check.
pub(crate) fn physical_optimizer_rules() -> Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>> {
    let mut rules = PhysicalOptimizer::new().rules;
    let position = rules
        .iter()
        .position(|rule| rule.name() == crate::broadcast::JOIN_SELECTION)
        .unwrap_or(0);
    rules.insert(position, Arc::new(crate::broadcast::BroadcastJoinSelection));
    let position = rules
        .iter()
        .position(|rule| rule.name() == crate::exchange_order::PLACES_EXCHANGES)
        .map_or(rules.len(), |position| position + 1);
    rules.insert(
        position,
        Arc::new(crate::exchange_order::UnorderedExchanges) as Arc<_>,
    );
    let position = rules
        .iter()
        .position(|rule| rule.name() == SANITY_CHECK)
        .unwrap_or(rules.len());
    rules.insert(
        position,
        Arc::new(crate::build_stage::StagedBuildSides) as Arc<_>,
    );
    rules
}

/// DataFusion's last physical rule, which checks every operator's
/// distribution and ordering requirements.
const SANITY_CHECK: &str = "SanityCheckPlan";

impl Planner {
    pub fn new(default_partitions: usize, store: StateStore, warehouse: String) -> Result<Self> {
        let object_stores = Arc::new(StoreRegistry::new());
        let runtime = runtime_builder(Arc::clone(&object_stores) as _)
            .build_arc()
            .map_err(Error::Query)?;
        let mut state = SessionStateBuilder::new()
            .with_config(default_session_config())
            .with_runtime_env(runtime)
            .with_default_features()
            .with_physical_optimizer_rules(physical_optimizer_rules())
            .build();
        register_store_option_namespaces(&mut state);
        state.add_analyzer_rule(Arc::new(SingleRowSubqueries));
        crate::series::register_whole_row_series(&mut state);
        for format in crate::tables::FORMATS {
            state.table_factories_mut().insert(
                format.to_owned(),
                Arc::new(crate::tables::TableFactory::default()),
            );
        }
        Ok(Self {
            catalog: SessionContext::new_with_state(state),
            default_partitions: default_partitions.max(1),
            store,
            object_stores,
            warehouse,
            unrecreated: catalog::Unrecreated::default(),
        })
    }

    /// The embedded store holding the catalog and the job history.
    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// Recreates the stored catalog objects, in creation order. An object
    /// that cannot be recreated (its files are gone, say) stays stored and is
    /// returned with the error, so that a later start can try again.
    /// A store that does not answer is kept in `silent`.
    pub async fn replay_catalog(&self, silent: &SilentStores) -> Result<Vec<(String, String)>> {
        let entries = self
            .with_store(|store| store.keyed_catalog_entries())
            .await?;
        Ok(self.recreate(entries, silent).await)
    }

    /// Recreates the stored objects that [`Planner::replay_catalog`] could
    /// not; returns those that still fail.
    pub async fn recreate_the_rest(&self) -> Vec<(String, String)> {
        let silent = SilentStores::default();
        self.recreate(self.unrecreated.entries(), &silent).await
    }

    /// Whether every stored catalog object is recreated.
    pub fn catalog_is_whole(&self) -> bool {
        self.unrecreated.is_empty()
    }

    /// Runs each stored statement of `entries` again, in order, and keeps
    /// those that fail as [`catalog::Unrecreated`]. Once a store has not
    /// answered, the tables after it on that store are kept without being
    /// tried: a store that is down holds the start up once, not once per
    /// table on it.
    async fn recreate(
        &self,
        entries: Vec<(String, CatalogEntry)>,
        silent: &SilentStores,
    ) -> Vec<(String, String)> {
        let mut failures = Vec::new();
        for (key, entry) in entries {
            let store = self.store_of(&entry.sql, &entry.settings).await;
            if let Some(why) = silent.not_tried(store) {
                failures.push((entry.name.clone(), why.clone()));
                self.unrecreated.insert(key, entry, why);
                continue;
            }
            let replayed = self
                .plan_statement(
                    "catalog-replay",
                    Query::Sql(entry.sql.clone()),
                    None,
                    &entry.settings,
                    false,
                )
                .await;
            match replayed {
                Ok(_) => {
                    self.unrecreated.remove(&key);
                }
                Err(e) => {
                    let error = redacted_error(&e);
                    if store_did_not_answer(&e) {
                        silent.did_not_answer(store, || {
                            format!("when '{}' was recreated", entry.name)
                        });
                    }
                    failures.push((entry.name.clone(), error.clone()));
                    self.unrecreated.insert(key, entry, error);
                }
            }
        }
        failures
    }

    /// The store that the table which `sql` creates lies on, as
    /// [`StoreRegistry::identity`] names it: `None` for a statement that
    /// names no location, or one on local disk, which always answers.
    pub async fn store_of(&self, sql: &str, settings: &[Setting]) -> Option<u64> {
        let plan = self
            .session_state(settings)
            .ok()?
            .create_logical_plan(sql)
            .await
            .ok()?;
        let (locations, options) = declared_locations(&plan)?;
        // A statement without store options uses the store as configured.
        let options = StoreOptions::from_statement_options(options).ok()?;
        let options = (!options.is_empty()).then_some(&options);
        self.object_stores
            .identity_of_location(locations.first()?, options)
    }

    /// The session state of a job: the shared catalog with the job's settings.
    pub fn session_state(&self, settings: &[Setting]) -> Result<SessionState> {
        let mut config = session_config_from_settings(settings).map_err(Error::Setting)?;
        if !settings.iter().any(|s| s.key == TARGET_PARTITIONS_KEY) {
            config = config.with_target_partitions(self.default_partitions);
        }
        // The shared catalog exists already; creating the default one again
        // would replace it with an empty catalog.
        config
            .options_mut()
            .catalog
            .create_default_catalog_and_schema = false;
        Ok(SessionStateBuilder::new_from_existing(self.catalog.state())
            .with_config(config)
            .build())
    }

    pub async fn plan(&self, job_id: &str, query: Query, settings: &[Setting]) -> Result<Planned> {
        let planned = self
            .plan_statement(job_id, query, None, settings, true)
            .await;
        self.explain_unrecreated(planned)
    }

    /// An error naming a stored object that the start could not recreate,
    /// with why it is missing.
    fn explain_unrecreated(&self, planned: Result<Planned>) -> Result<Planned> {
        match planned {
            Err(Error::Query(e)) => {
                let missing = self.unrecreated.named_in(&e.to_string());
                Err(Error::Query(match missing.is_empty() {
                    true => e,
                    false => e.context(missing.join("; ")),
                }))
            }
            other => other,
        }
    }

    /// Plans SQL whose `$1`, `$2`... placeholders take `parameters`: a
    /// prepared statement with bound values.
    pub async fn plan_with_parameters(
        &self,
        job_id: &str,
        sql: &str,
        parameters: ParamValues,
        settings: &[Setting],
    ) -> Result<Planned> {
        let query = Query::Sql(sql.to_owned());
        let planned = self
            .plan_statement(job_id, query, Some(parameters), settings, true)
            .await;
        self.explain_unrecreated(planned)
    }

    /// What a statement would return, without running it: the schema of its
    /// result and the types of its placeholders, in order (`$1` first).
    pub async fn describe(&self, sql: &str, settings: &[Setting]) -> Result<StatementShape> {
        let state = self.session_state(settings)?;
        let logical = logical_plan_of(&state, sql).await?;
        let result = Arc::new(logical.schema().as_arrow().clone());
        let mut types: Vec<_> = logical
            .get_parameter_types()
            .map_err(Error::Query)?
            .into_iter()
            .collect();
        // Placeholders are `$1`, `$2`...: order them by number, not as text.
        types.sort_by_key(|(name, _)| {
            name.trim_start_matches('$')
                .parse::<usize>()
                .unwrap_or(usize::MAX)
        });
        let fields: Vec<_> = types
            .into_iter()
            .map(|(name, data_type)| Field::new(name, data_type.unwrap_or(DataType::Null), true))
            .collect();
        Ok(StatementShape {
            result,
            parameters: Arc::new(Schema::new(fields)),
        })
    }

    /// Plans a query; catalog statements run here and, if `persist`, are stored.
    async fn plan_statement(
        &self,
        job_id: &str,
        query: Query,
        parameters: Option<ParamValues>,
        settings: &[Setting],
        persist: bool,
    ) -> Result<Planned> {
        let state = self.session_state(settings)?;
        let sql = match &query {
            Query::Sql(sql) => Some(sql.clone()),
            Query::LogicalPlan(_) => None,
        };
        let logical = match query {
            Query::Sql(sql) => logical_plan_of(&state, &sql).await?,
            Query::LogicalPlan(bytes) => {
                let codec = RemoteTableCodec::with_resolver(Arc::new(CatalogResolver {
                    state: state.clone(),
                }));
                decode_logical_plan(&bytes, &state.task_ctx(), &codec)
                    .map_err(Error::MalformedPlan)?
            }
        };
        let logical = match parameters {
            // A catalog statement is stored as its text, which would lose the values.
            Some(_) if matches!(logical, LogicalPlan::Ddl(_)) => {
                return Err(Error::Query(DataFusionError::Plan(
                    "catalog statements cannot take parameters".into(),
                )));
            }
            Some(values) => logical.with_param_values(values).map_err(Error::Query)?,
            None => logical,
        };
        let replaced = self.configure_locations(&logical)?;
        let logical = without_store_options(logical)?;
        let read_folders = read_parquet_folders(&logical);
        // Boxed: inline, the planning future would be moved on the stack.
        let planning =
            Box::pin(self.plan_logical(job_id, logical, sql, state, persist.then_some(settings)));
        let mut planned = catch_future_panic(planning).await.unwrap_or_else(|panic| {
            tracing::warn!(%job_id, %panic, "planning panicked");
            Err(Error::PlanningPanicked(panic))
        });
        // The session is built again for this rare path rather than kept
        // for every statement.
        if let Err(Error::Query(e)) = &mut planned
            && matches!(e.find_root(), DataFusionError::ParquetError(_))
            && let Ok(state) = self.session_state(settings)
            && let Some((file, failure)) =
                first_unreadable_parquet_file(&state, &read_folders).await
        {
            let error = std::mem::replace(e, DataFusionError::Plan(String::new()));
            *e = error.context(format!("cannot read the footer of '{file}': {failure}"));
        }
        match &mut planned {
            Err(_) => self.restore_locations(replaced),
            // A job that then fails puts them back too (see the service).
            Ok(
                Planned::Stages(job)
                | Planned::Analyze { job, .. }
                | Planned::CreateTableAs { write: job, .. },
            ) => job.configured_stores = replaced,
            Ok(Planned::Done { .. }) => {}
        }
        planned
    }

    /// A statement that creates or drops the stored object under `key`,
    /// which the start could not recreate (`why`). Creating one of its
    /// name would replace it: refused. Dropping it forgets it, unless it
    /// owns its folder (`CREATE TABLE AS`), which cannot be deleted while
    /// its store does not answer.
    async fn change_unrecreated(&self, key: String, drops: bool, why: String) -> Result<Planned> {
        let refused = |advice: &str| {
            Err(Error::Query(DataFusionError::Plan(format!(
                "{why}: {advice}"
            ))))
        };
        if !drops {
            return refused("drop it before creating another of its name");
        }
        if self.unrecreated.owns_folder(&key) {
            return refused(
                "it owns its folder, which is deleted with it: drop it once it is recreated",
            );
        }
        let removed = key.clone();
        self.with_store(move |store| store.remove_catalog_entries(|k| k == removed))
            .await?;
        self.unrecreated.remove(&key);
        Ok(Planned::Done {
            schema: Arc::new(Schema::empty()),
        })
    }

    /// Refuses to create the object under `key` while a `CREATE TABLE AS`
    /// job other than `job_id` has yet to register its table there: that
    /// job's table would then be kept out, its rows orphaned in its folder.
    async fn refuse_a_pending_name(&self, key: String, job_id: &str) -> Result<()> {
        let pending = self
            .with_store(|store| store.pending_tables())
            .await?
            .into_iter()
            .find(|table| table.managed_key == key && table.job_id != job_id);
        match pending {
            None => Ok(()),
            Some(table) => Err(Error::Query(DataFusionError::Plan(format!(
                "'{}' is being created by the CREATE TABLE AS job {}, which has yet to \
                 register it: wait for that job (`quiver job status --wait {}`)",
                key.trim_start_matches("table:"),
                table.job_id,
                table.job_id
            )))),
        }
    }

    /// Plans a statement whose locations are configured. `persist` holds the
    /// session's settings if the statement's catalog changes are stored.
    async fn plan_logical(
        &self,
        job_id: &str,
        logical: LogicalPlan,
        sql: Option<String>,
        state: SessionState,
        persist: Option<&[Setting]>,
    ) -> Result<Planned> {
        let schema: SchemaRef = Arc::new(logical.schema().as_arrow().clone());
        if persist.is_some()
            && let LogicalPlan::Ddl(ddl) = &logical
            && let Some((key, drops)) = catalog::key_changed(ddl, &state)
        {
            if let Some(why) = self.unrecreated.why(&key) {
                return self.change_unrecreated(key, drops, why).await;
            }
            if !drops {
                self.refuse_a_pending_name(key, job_id).await?;
            }
        }
        if let LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(create)) = &logical {
            return self.plan_create_table_as(job_id, create, &state).await;
        }
        if let LogicalPlan::Statement(
            PlanStatement::Prepare(_) | PlanStatement::Execute(_) | PlanStatement::Deallocate(_),
        ) = &logical
        {
            // Each statement sent here is planned in a session of its own.
            return Err(Error::Query(DataFusionError::NotImplemented(
                "PREPARE, EXECUTE and DEALLOCATE in SQL text sent to the scheduler keep \
                 nothing between statements: run them in one session of the quiver CLI or \
                 of QuiverContext::sql, or use Flight SQL prepared statements (ADBC's \
                 Statement.prepare) with $1 parameters"
                    .to_owned(),
            )));
        }
        if matches!(logical, LogicalPlan::Ddl(_) | LogicalPlan::Statement(_)) {
            let ddl = match (&logical, &sql) {
                (LogicalPlan::Ddl(ddl), Some(sql)) => Some((ddl.clone(), sql.clone())),
                (LogicalPlan::Ddl(ddl), None) => return Err(Error::DdlPlan(ddl.name().into())),
                _ => None,
            };
            let location = match &logical {
                LogicalPlan::Ddl(DdlStatement::CreateExternalTable(table)) => {
                    Some(table.locations.join(", "))
                }
                _ => None,
            };
            let dropped = match &logical {
                LogicalPlan::Ddl(ddl) if persist.is_some() => {
                    managed::dropped_folders(ddl, &state, &self.store).await
                }
                _ => Vec::new(),
            };
            let context = SessionContext::new_with_state(state.clone());
            let executed =
                async { context.execute_logical_plan(logical).await?.collect().await }.await;
            executed.map_err(|e| match location {
                Some(location) if is_storage_error(&e) => Error::TableLocation {
                    location,
                    source: e,
                },
                _ => Error::Query(e),
            })?;
            if let (Some((ddl, sql)), Some(settings)) = (ddl, persist) {
                let store = self.store.clone();
                let settings = settings.to_vec();
                tokio::task::spawn_blocking(move || {
                    catalog::record(&store, &ddl, &sql, &state, &settings)
                })
                .await
                .map_err(|_| Error::ShuttingDown)??;
            }
            managed::delete_folders(&self.catalog.runtime_env(), dropped).await;
            return Ok(Planned::Done { schema });
        }
        if let LogicalPlan::Analyze(analyze) = logical {
            let (inner, overwrite) = plan_overwrite_as_append(analyze.input.as_ref().clone());
            let schema = Arc::new(inner.schema().as_arrow().clone());
            let job = self
                .stage_job(job_id, &inner, &state, schema, overwrite, false)
                .await?;
            return Ok(Planned::Analyze {
                job,
                verbose: analyze.verbose,
            });
        }
        let (logical, overwrite) = plan_overwrite_as_append(logical);
        let mut job = self
            .stage_job(
                job_id,
                &logical,
                &state,
                Arc::clone(&schema),
                overwrite,
                false,
            )
            .await?;
        let writes_unstaged = matches!(logical, LogicalPlan::Dml(_) | LogicalPlan::Copy(_))
            && job.writes_to.is_none();
        job.replanner = (!writes_unstaged).then(|| Replanner {
            planner: self.clone(),
            job_id: job_id.to_owned(),
            logical,
            state,
            schema,
            overwrite,
            stores: job.stores.clone(),
        });
        Ok(Planned::Stages(job))
    }

    /// Plans a query into stages. `overwrite` makes its Parquet writes replace
    /// what their target holds. `creates` marks a `CREATE TABLE AS`, whose
    /// commit fails if another job committed to its folder in the meantime.
    async fn stage_job(
        &self,
        job_id: &str,
        logical: &LogicalPlan,
        state: &SessionState,
        schema: SchemaRef,
        overwrite: bool,
        creates: bool,
    ) -> Result<StagedJob> {
        let partitions = state.config().target_partitions();
        // The states of the tables its scans read, for a write's guard.
        let (physical, read) = match logical {
            LogicalPlan::Explain(explain) => (
                explain_stages(job_id, explain, state, partitions)
                    .await
                    .map_err(Error::Query)?,
                TableStates::default(),
            ),
            _ if reads_only_information_schema(logical) => (
                run_on_scheduler(logical, state, Arc::clone(&schema))
                    .await
                    .map_err(Error::Query)?,
                TableStates::default(),
            ),
            _ => {
                crate::unencodable::refuse_dropped_window_clauses(logical).map_err(Error::Query)?;
                check_insert_target(logical, state)
                    .await
                    .map_err(Error::Query)?;
                let (_, physical, read) =
                    physical_plan(logical, state).await.map_err(Error::Query)?;
                (physical, read)
            }
        };
        let physical =
            distribute_parquet_writes(physical, job_id, overwrite).map_err(Error::Query)?;
        let options = state
            .config()
            .options()
            .extensions
            .get::<QuiverOptions>()
            .cloned()
            .unwrap_or_default();
        let durable_shuffle = durable_shuffle_location(state, &options, job_id).await?;
        let stores = store_configs(&physical, &durable_shuffle, &self.object_stores)
            .map_err(Error::Query)?;
        let writes_to = write_target(&physical);
        if let Some(target) = &writes_to {
            check_write_access_of(state, target, None, job_id).await?;
        } else if let Some((target, folder)) = unstaged_write_folder(&physical) {
            check_write_access_of(state, &target, Some(folder), job_id).await?;
        }
        let physical = match &writes_to {
            Some(target) if creates || reads_target(logical, target) => {
                guard_commit(state, physical, target, &read).await?
            }
            _ => physical,
        };
        let stages = split_into_stages(job_id, physical, partitions).map_err(Error::Query)?;
        // The result's schema as its batches carry it. DataFusion's rewrites
        // may change a type from the one its logical plan declares (a decimal
        // `sum` beside a `count(DISTINCT ...)` becomes a sum of sums, ten
        // digits wider), and Arrow readers refuse a stream whose batches
        // differ from its schema.
        let schema = stages
            .last()
            .map_or(schema, |last| last.plan.input().schema());
        let adaptive = PendingJoins::new(
            &stages,
            AdaptivePolicy::from_config(state.config().options()),
            crate::reduction::policy(state.config().options()),
        );
        let encoded = encode_stages(stages.clone()).await?;
        Ok(StagedJob {
            schema,
            stages,
            encoded,
            limits: JobLimits::from_options(&options),
            stores,
            durable_shuffle,
            writes_to,
            adaptive,
            configured_stores: Vec::new(),
            replanner: None,
        })
    }

    /// A one-stage job whose result is `batch`: for answers the scheduler
    /// computes itself, such as the report of `EXPLAIN ANALYZE`.
    pub async fn stage_result(&self, job_id: &str, batch: RecordBatch) -> Result<StagedJob> {
        let schema = batch.schema();
        let source = MemorySourceConfig::try_new_exec(&[vec![batch]], Arc::clone(&schema), None)
            .map_err(Error::Query)?;
        let stages = split_into_stages(job_id, source, 1).map_err(Error::Query)?;
        let encoded = encode_stages(stages.clone()).await?;
        Ok(StagedJob {
            schema,
            stages,
            encoded,
            limits: JobLimits::from_options(&QuiverOptions::default()),
            stores: Vec::new(),
            durable_shuffle: String::new(),
            writes_to: None,
            adaptive: PendingJoins::default(),
            configured_stores: Vec::new(),
            replanner: None,
        })
    }

    /// `CREATE TABLE t AS SELECT ...` writes `t` as Parquet into its own
    /// warehouse folder, which must hold no data but that of the table it
    /// replaces (`OR REPLACE`), by a distributed write, and registers the folder as an external table
    /// once the write has committed. The table owns the folder
    /// ([`managed`]): dropping it deletes the folder.
    async fn plan_create_table_as(
        &self,
        job_id: &str,
        create: &CreateMemoryTable,
        state: &SessionState,
    ) -> Result<Planned> {
        let empty = Arc::new(Schema::empty());
        // The session's default catalog and schema, as its folder's.
        let catalog = &state.config().options().catalog;
        let name = create
            .name
            .clone()
            .resolve(&catalog.default_catalog, &catalog.default_schema);
        let exists = self
            .catalog
            .table_exist(TableReference::full(
                name.catalog.as_ref(),
                name.schema.as_ref(),
                name.table.as_ref(),
            ))
            .map_err(Error::Query)?;
        if exists && create.if_not_exists {
            return Ok(Planned::Done { schema: empty });
        }
        if exists && !create.or_replace {
            return Err(Error::Query(DataFusionError::Plan(format!(
                "table '{}' already exists",
                create.name
            ))));
        }
        for part in [&name.schema, &name.table] {
            check_folder_name(part)?;
        }
        if name.catalog.as_ref() == catalog.default_catalog
            && name.schema.as_ref() == CATALOGS_FOLDER
        {
            return Err(Error::Query(DataFusionError::Plan(format!(
                "the schema '{CATALOGS_FOLDER}' of the default catalog cannot hold tables made by \
                 CREATE TABLE AS: its warehouse folder holds the other catalogs' tables"
            ))));
        }
        let location = warehouse_folder(&self.warehouse, &name, &catalog.default_catalog);
        let folder = ListingTableUrl::parse(&location).map_err(Error::Query)?;
        let replaces_its_own = exists
            && managed::managed_folder(&create.name, state, &self.store)
                .await
                .is_some_and(|own| own.as_str() == folder.as_str());
        if !replaces_its_own {
            self.check_folder_holds_no_data(&create.name, &location, &folder)
                .await?;
        }
        let parquet = format_as_file_type(Arc::new(ParquetFormatFactory::new()));
        let write = LogicalPlanBuilder::copy_to(
            create.input.as_ref().clone(),
            location.clone(),
            parquet,
            HashMap::new(),
            Vec::new(),
        )
        .and_then(LogicalPlanBuilder::build)
        .map_err(Error::Query)?;
        let schema = Arc::new(write.schema().as_arrow().clone());
        let write = self
            .stage_job(job_id, &write, state, schema, true, true)
            .await?;
        let quoted = [&name.catalog, &name.schema, &name.table]
            .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
            .join(".");
        // Replaced in one statement: a `DROP TABLE` would delete the folder
        // just written, which the table owns.
        let register = vec![format!(
            "CREATE {}EXTERNAL TABLE {quoted} STORED AS PARQUET LOCATION '{}'",
            if exists { "OR REPLACE " } else { "" },
            location.replace('\'', "''")
        )];
        let managed_key = catalog::table_key(&create.name, state).0;
        Ok(Planned::CreateTableAs {
            write,
            register,
            managed_key,
        })
    }

    /// Refuses a `CREATE TABLE AS` whose warehouse folder holds data that no
    /// table it replaces owns, as Spark does (`LOCATION_ALREADY_EXISTS`): an
    /// external table registered there, files another engine wrote, or
    /// what a failed `DROP` left. The write would replace them. Hidden
    /// files (`_`, `.`) and empty objects (folder markers) are not data.
    async fn check_folder_holds_no_data(
        &self,
        table: &TableReference,
        location: &str,
        url: &ListingTableUrl,
    ) -> Result<()> {
        let located = |source| Error::TableLocation {
            location: location.to_owned(),
            source,
        };
        let store = self
            .catalog
            .runtime_env()
            .object_store(url.object_store())
            .map_err(located)?;
        let mut listing = store.list(Some(url.prefix()));
        while let Some(object) = futures::StreamExt::next(&mut listing).await {
            let object = object.map_err(|e| located(e.into()))?;
            let hidden = object
                .location
                .prefix_match(url.prefix())
                .is_some_and(|mut parts| parts.any(|part| part.as_ref().starts_with(['_', '.'])));
            if !hidden && object.size > 0 {
                return Err(Error::Query(DataFusionError::Plan(format!(
                    "cannot create table '{table}': its warehouse folder '{location}' already \
                     holds data ('{}'), which the table would replace; drop the table that \
                     owns it, move the files away, or register them with CREATE EXTERNAL TABLE",
                    object.location
                ))));
            }
        }
        Ok(())
    }

    /// Marks the table stored under `key` as made by `CREATE TABLE AS`: it
    /// owns its warehouse folder, which dropping it deletes.
    /// Runs `work` on the state store, off the async threads.
    async fn with_store<T: Send + 'static>(
        &self,
        work: impl FnOnce(&StateStore) -> crate::store::Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        Ok(tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|_| Error::ShuttingDown)??)
    }

    /// Stores a table to register once its `CREATE TABLE ... AS` job succeeds.
    pub async fn put_pending_table(&self, pending: PendingTable) -> Result<()> {
        self.with_store(move |store| store.put_pending_table(&pending))
            .await
    }

    pub async fn remove_pending_table(&self, job_id: String) -> Result<()> {
        self.with_store(move |store| store.remove_pending_table(&job_id))
            .await
    }

    /// The tables of `CREATE TABLE ... AS` jobs not yet registered, and the
    /// job history.
    pub async fn pending_tables(&self) -> Result<(Vec<PendingTable>, Vec<JobRecord>)> {
        self.with_store(|store| Ok((store.pending_tables()?, store.jobs()?)))
            .await
    }

    /// The jobs whose write a settling found committed though they did not
    /// succeed.
    pub async fn writes_committed(&self) -> Result<HashSet<String>> {
        self.with_store(|store| store.writes_committed()).await
    }

    /// The record of `job_id` in the job history, if it holds it.
    pub async fn job_record(&self, job_id: &str) -> Result<Option<JobRecord>> {
        let job_id = job_id.to_owned();
        self.with_store(move |store| store.job(&job_id)).await
    }

    /// What jobs may still have left in object storage (see
    /// [`crate::storage_leftovers`]).
    pub async fn storage_left(&self) -> Result<Vec<quiver_proto::StorageLeft>> {
        self.with_store(|store| store.storage_left()).await
    }

    /// Registers the table of a `CREATE TABLE ... AS` job whose write has
    /// committed, marks it as owning its folder, and forgets it as pending.
    pub async fn register_pending_table(&self, pending: PendingTable) -> Result<()> {
        // A scheduler that stopped after storing the table's entry, and
        // before the rest, recreated the table from it on start: running
        // the statement again would fail ("already exists"), and leave the
        // table pending and not marked as owning its folder.
        let key = pending.managed_key.clone();
        let stored = self
            .with_store(move |store| store.catalog_entry(&key))
            .await?;
        let registered = stored.is_some_and(|entry| pending.statements.contains(&entry.sql));
        if !registered {
            for statement in &pending.statements {
                self.plan(
                    &pending.job_id,
                    Query::Sql(statement.clone()),
                    &pending.settings,
                )
                .await?;
            }
        }
        self.mark_managed(pending.managed_key).await?;
        self.remove_pending_table(pending.job_id).await
    }

    pub async fn mark_managed(&self, key: String) -> Result<()> {
        self.with_store(move |store| catalog::mark_managed(store, &key))
            .await
    }

    /// Sets up the store of a location that a statement names with store
    /// options (`CREATE EXTERNAL TABLE ... OPTIONS ('aws.region' ...)`,
    /// `COPY ... OPTIONS (...)`), before DataFusion first lists it.
    fn configure_locations(&self, plan: &LogicalPlan) -> Result<Vec<ReplacedStore>> {
        let (locations, options) = match plan {
            // Nothing runs under EXPLAIN, but its output shows the
            // locations and options: they are checked all the same.
            LogicalPlan::Explain(explain) => {
                if let Some((locations, options)) = declared_locations(&explain.plan) {
                    for location in locations {
                        check_location_spelling(location)?;
                    }
                    StoreOptions::from_statement_options(options).map_err(Error::Query)?;
                }
                return Ok(Vec::new());
            }
            plan => match declared_locations(plan) {
                Some(found) => found,
                None => return Ok(Vec::new()),
            },
        };
        for location in locations {
            check_location_spelling(location)?;
        }
        let options = StoreOptions::from_statement_options(options).map_err(Error::Query)?;
        let mut replaced = Vec::new();
        if options.is_empty() {
            return Ok(replaced);
        }
        for location in locations {
            let configured = ListingTableUrl::parse(location)
                .and_then(|url| {
                    options.check_apply_to(location, url.as_ref())?;
                    Ok(url)
                })
                .map_err(Error::Query)
                .and_then(|url| {
                    Ok(self
                        .object_stores
                        .configure(url.object_store().as_ref(), &options)?)
                });
            match configured {
                Ok(previous) => replaced.extend(previous),
                Err(e) => {
                    self.restore_locations(replaced);
                    return Err(e);
                }
            }
        }
        Ok(replaced)
    }

    /// Undoes [`Planner::configure_locations`] for a statement that failed,
    /// so that a bad statement cannot change how a location is reached.
    fn restore_locations(&self, replaced: Vec<ReplacedStore>) {
        for store in replaced.into_iter().rev() {
            self.object_stores.restore(store);
        }
    }

    /// The catalogs every job sees.
    pub fn catalogs(&self) -> Arc<dyn CatalogProviderList> {
        Arc::clone(self.catalog.state().catalog_list())
    }

    /// The scheduler's object stores.
    pub fn object_stores(&self) -> Arc<StoreRegistry> {
        Arc::clone(&self.object_stores)
    }

    /// The runtime of the shared catalog, with the scheduler's object stores.
    pub fn runtime_env(&self) -> Arc<datafusion::execution::runtime_env::RuntimeEnv> {
        self.catalog.runtime_env()
    }

    /// The schema of a table in the shared catalog, if it exists.
    /// A stored table that the start could not recreate is an error that
    /// says why, rather than none.
    pub async fn table_schema(&self, name: &str) -> Result<Option<SchemaRef>> {
        match self.catalog.table_provider(name).await {
            Ok(table) => Ok(Some(table.schema())),
            Err(DataFusionError::Plan(_)) => {
                let (key, _) =
                    catalog::table_key(&TableReference::from(name), &self.catalog.state());
                match self.unrecreated.why(&key) {
                    Some(why) => Err(Error::Query(DataFusionError::Plan(why))),
                    None => Ok(None),
                }
            }
            Err(e) => Err(Error::Query(e)),
        }
    }
}

/// `INSERT OVERWRITE` is planned as an append, and the distributed write
/// then replaces the files (DataFusion's Parquet sink refuses overwrites).
/// Returns the plan and whether it overwrites.
fn plan_overwrite_as_append(plan: LogicalPlan) -> (LogicalPlan, bool) {
    match plan {
        LogicalPlan::Dml(dml) if dml.op == WriteOp::Insert(InsertOp::Overwrite) => {
            let mut append = dml;
            append.op = WriteOp::Insert(InsertOp::Append);
            (LogicalPlan::Dml(append), true)
        }
        plan => (plan, false),
    }
}

/// Whether every table `plan` reads is in `information_schema`: the shared
/// catalog's own description, which lives on the scheduler only (`SHOW
/// TABLES`, `SHOW COLUMNS`, `SHOW CREATE TABLE`, `SHOW ALL`).
fn reads_only_information_schema(plan: &LogicalPlan) -> bool {
    let (mut scans, mut catalog_scans) = (0, 0);
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            scans += 1;
            if scan.table_name.schema() == Some("information_schema") {
                catalog_scans += 1;
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    scans > 0 && scans == catalog_scans
}

/// Runs a small query on the scheduler and returns its rows as a one-stage
/// job, as `EXPLAIN` does.
async fn run_on_scheduler(
    plan: &LogicalPlan,
    state: &SessionState,
    schema: SchemaRef,
) -> DfResult<Arc<dyn ExecutionPlan>> {
    let physical = state.create_physical_plan(plan).await?;
    let batches = datafusion::physical_plan::collect(physical, state.task_ctx()).await?;
    MemorySourceConfig::try_new_exec(&[batches], schema, None).map(|exec| exec as _)
}

/// Whether an error came from reading files rather than from the statement.
fn is_storage_error(error: &DataFusionError) -> bool {
    matches!(
        error.find_root(),
        DataFusionError::ObjectStore(_)
            | DataFusionError::ParquetError(_)
            | DataFusionError::IoError(_)
            | DataFusionError::ArrowError(..)
            | DataFusionError::External(_)
    )
}

/// `EXPLAIN` on the cluster: the optimized logical plan and the stage DAG the
/// query would run as (stages, their tasks and inputs, and the exchanges
/// between them), returned as a small in-memory result.
async fn explain_stages(
    job_id: &str,
    explain: &Explain,
    state: &SessionState,
    partitions: usize,
) -> DfResult<Arc<dyn ExecutionPlan>> {
    // The plan that would run: an overwrite planned as an append, and
    // Parquet writes as write tasks and a commit.
    let (plan, overwrite) = plan_overwrite_as_append(explain.plan.as_ref().clone());
    let (optimized, physical, _) = physical_plan(&plan, state).await?;
    let physical = distribute_parquet_writes(physical, job_id, overwrite)?;
    let stages = split_into_stages(job_id, physical, partitions)?;
    let schema: SchemaRef = Arc::new(explain.schema.as_arrow().clone());
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(StringArray::from(vec!["logical_plan", "distributed_plan"])),
            Arc::new(StringArray::from(vec![
                optimized.display_indent().to_string(),
                display_stages(&stages),
            ])),
        ],
    )?;
    let source = MemorySourceConfig::try_new_exec(&[vec![batch]], schema, None)?;
    Ok(source)
}

/// `logical` optimized by DataFusion, with its joins reordered and
/// aggregates moved below joins by Quiver, and the physical plan of that,
/// whose scans read committed files only.
async fn physical_plan(
    logical: &LogicalPlan,
    state: &SessionState,
) -> DfResult<(LogicalPlan, Arc<dyn ExecutionPlan>, TableStates)> {
    let optimized = state.optimize(logical)?;
    let ordered = crate::join_order::reorder_joins(optimized, state).await?;
    let ordered = crate::eager_aggregation::aggregate_before_joins(ordered, state).await?;
    let (physical, read) = plan_committed_scans(&ordered, state).await?;
    Ok((ordered, physical, read))
}

/// Encodes every stage plan off the async threads: large plans take a while.
async fn encode_stages(stages: Vec<StagePlan>) -> Result<Vec<Bytes>> {
    tokio::task::spawn_blocking(move || stages.iter().map(StagePlan::encode).collect())
        .await
        .map_err(|_| Error::ShuttingDown)?
}

/// Resolves table names of client-built plans in a job's session state.
#[derive(Debug)]
struct CatalogResolver {
    state: SessionState,
}

impl TableResolver for CatalogResolver {
    fn resolve(&self, name: &TableReference) -> DfResult<Arc<dyn TableProvider>> {
        let catalog = &self.state.config().options().catalog;
        let resolved = name
            .clone()
            .resolve(&catalog.default_catalog, &catalog.default_schema);
        let schema = self
            .state
            .catalog_list()
            .catalog(&resolved.catalog)
            .and_then(|catalog| catalog.schema(&resolved.schema))
            .ok_or_else(|| DataFusionError::Plan(format!("table '{name}' not found")))?;
        // The scheduler's catalog is in memory: this future is ready at once.
        futures::executor::block_on(schema.table(&resolved.table))?
            .ok_or_else(|| DataFusionError::Plan(format!("table '{name}' not found")))
    }
}

/// The error of a spawned planning step that did not finish: it panicked,
/// or the scheduler is stopping.
fn spawned_failure(error: tokio::task::JoinError) -> Error {
    match error.try_into_panic() {
        Ok(panic) => Error::PlanningPanicked(panic_message(panic)),
        Err(_) => Error::ShuttingDown,
    }
}

/// The schemes of the stores Quiver reaches.
const STORE_SCHEMES: [&str; 12] = [
    "s3", "s3a", "gs", "az", "abfs", "abfss", "adl", "azure", "http", "https", "file", "memory",
];

/// Refuses a location that a URL parser would misread, naming it:
/// - a store's scheme without its `//` (`s3:/lake/t/`), which is no URL;
/// - an empty folder name (`s3://lake//t/`), which no store path holds;
/// - a `#` or `?` that would cut it short: in `s3://b/t#2/` or
///   `file:///d/t?v=2` the `#` starts a fragment and the `?` a query, so
///   the table would be read from, or written to, `t/`. Only HTTP(S)
///   locations have queries (a signed URL's); none has a fragment. A plain
///   path (`/d/t#2/`) is a file name, and is not cut.
fn check_location_spelling(location: &str) -> Result<()> {
    let misspelt = |problem: &str| {
        Err(Error::Query(DataFusionError::Plan(format!(
            "the location '{}' {problem}",
            redact_store_echoes(location)
        ))))
    };
    // Refused before DataFusion plans (and logs) the statement.
    // Also a password with a `/`, which URL parsers do not read as one.
    if url::Url::parse(location).is_ok_and(|url| url.password().is_some())
        || holds_url_password(location)
    {
        return misspelt(
            "holds a password, which would show wherever the location does: give \
             credentials in OPTIONS (...) or the environment (for HTTP(S): \
             'http.username' and 'http.password', or 'http.bearer_token')",
        );
    }
    let Some((scheme, rest)) = location.split_once("://") else {
        return match location.split_once(':') {
            Some((scheme, _)) if STORE_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()) => {
                misspelt("is not a URL: write it as '<scheme>://<bucket>/<folder>/'")
            }
            _ => Ok(()),
        };
    };
    let path = rest.split_once('/').map_or("", |(_, path)| path);
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if path.starts_with('/') || path.contains("//") {
        return misspelt("has an empty folder name ('//'), which no store path holds");
    }
    let scheme = scheme.to_ascii_lowercase();
    let cut_at = if scheme == "http" || scheme == "https" {
        location.find('#')
    } else {
        location.find(['#', '?'])
    };
    let Some(at) = cut_at else {
        return Ok(());
    };
    let character = &location[at..=at];
    let escaped = if character == "#" { "%23" } else { "%3F" };
    Err(Error::Query(DataFusionError::Plan(format!(
        "the location '{location}' holds '{character}', which a URL reads as the end of \
         its path: the data would be read from or written to '{}'; write it as '{escaped}' \
         if it is part of a folder or file name",
        &location[..at]
    ))))
}

/// The locations that a statement declares or writes, with its store
/// options: `CREATE EXTERNAL TABLE` and `COPY`, run by `EXPLAIN ANALYZE`
/// too, whose statement needs its locations as much.
fn declared_locations(plan: &LogicalPlan) -> Option<(&[String], &HashMap<String, String>)> {
    match plan {
        LogicalPlan::Analyze(analyze) => declared_locations(&analyze.input),
        LogicalPlan::Ddl(DdlStatement::CreateExternalTable(table)) => {
            Some((table.locations.as_slice(), &table.options))
        }
        LogicalPlan::Copy(copy) => Some((std::slice::from_ref(&copy.output_url), &copy.options)),
        _ => None,
    }
}

/// Lists the folder of the table that `logical`, if an `INSERT`, writes
/// into, before DataFusion lists it to plan the insert: a store that
/// refuses (a deleted bucket, credentials that stopped working) then fails
/// the statement naming the table, where DataFusion's error would name only
/// a request. One page of one level: a round trip.
async fn check_insert_target(logical: &LogicalPlan, state: &SessionState) -> DfResult<()> {
    let LogicalPlan::Dml(dml) = logical else {
        return Ok(());
    };
    if !matches!(dml.op, WriteOp::Insert(_)) {
        return Ok(());
    }
    let provider = source_as_provider(&dml.target).ok();
    let Some(folder) = provider
        .as_ref()
        .and_then(table_folders)
        .and_then(<[_]>::first)
        .filter(|folder| folder.is_collection())
    else {
        return Ok(());
    };
    let store = state.runtime_env().object_store(folder.object_store())?;
    match store.list_with_delimiter(Some(folder.prefix())).await {
        Ok(_) => Ok(()),
        Err(error) => Err(DataFusionError::ObjectStore(Box::new(error))
            .context(format!("cannot write to the table at '{folder}'"))),
    }
}

/// Refuses a schema or table name that cannot be its own warehouse folder:
/// one that would climb out of the warehouse (`..`), reach into another
/// table's folder (`/`), or be read as part of a URL (`#`, `?`, `%`).
fn check_folder_name(name: &str) -> Result<()> {
    let unsafe_character = name
        .chars()
        .any(|character| character.is_control() || "/\\#?%".contains(character));
    if name.is_empty() || name == "." || name == ".." || unsafe_character {
        return Err(Error::Query(DataFusionError::Plan(format!(
            "'{name}' cannot name a table's warehouse folder: a name must not be empty, \
             '.' or '..', nor hold '/', '\\', '#', '?', '%' or control characters"
        ))));
    }
    Ok(())
}

/// `plan` without the store options of its `COPY`s. The stores have taken
/// them already (`configure_locations`), and the plan is printed by EXPLAIN
/// and logged by DataFusion's optimizer, where secrets must not show.
fn without_store_options(plan: LogicalPlan) -> Result<LogicalPlan> {
    plan.transform_up(|node| match node {
        LogicalPlan::Copy(mut copy) if copy.options.keys().any(|key| is_store_option(key)) => {
            copy.options.retain(|key, _| !is_store_option(key));
            Ok(Transformed::yes(LogicalPlan::Copy(copy)))
        }
        // EXPLAIN VERBOSE prints the plan as first planned, kept as text.
        LogicalPlan::Explain(mut explain) => {
            for stringified in &mut explain.stringified_plans {
                if stringified.plan_type == PlanType::InitialLogicalPlan {
                    *stringified = explain.plan.to_stringified(PlanType::InitialLogicalPlan);
                }
            }
            Ok(Transformed::yes(LogicalPlan::Explain(explain)))
        }
        other => Ok(Transformed::no(other)),
    })
    .map(|transformed| transformed.data)
    .map_err(Error::Query)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tables on one bucket, reached with the same options, lie on one
    /// store: when it does not answer for one, the others are not tried.
    #[tokio::test]
    async fn tables_on_one_store_with_the_same_options_share_it() {
        let store = StateStore::in_memory().expect("store");
        let planner = Planner::new(2, store, "/tmp/quiver-warehouse/".into()).expect("planner");
        let store_of = |name: &str, location: &str, region: &str| {
            let sql = format!(
                "CREATE EXTERNAL TABLE {name} STORED AS PARQUET LOCATION '{location}' \
                 OPTIONS ('aws.region' '{region}', 'format.pushdown_filters' '{name}')"
            );
            let planner = &planner;
            async move { planner.store_of(&sql, &[]).await }
        };
        let first = store_of("a", "s3://lake/a/", "eu-west-1").await;
        assert!(first.is_some());
        assert_eq!(first, store_of("b", "s3://lake/b/", "eu-west-1").await);
        assert_ne!(first, store_of("c", "s3://other/c/", "eu-west-1").await);
        assert_ne!(first, store_of("d", "s3://lake/d/", "us-east-1").await);
        assert_eq!(store_of("e", "/data/e/", "eu-west-1").await, None);
        assert_eq!(
            planner.store_of("CREATE VIEW v AS SELECT 1", &[]).await,
            None
        );
        // A table without options of its own is reached as its location is
        // configured: here, with none.
        let plain = "CREATE EXTERNAL TABLE f STORED AS PARQUET LOCATION 's3://lake/f/'";
        let plain = planner.store_of(plain, &[]).await;
        assert!(plain.is_some());
        assert_ne!(first, plain);
    }

    /// A name that a `CREATE TABLE AS` job has yet to register is its own:
    /// another statement may not create an object of it, while the job's
    /// registration does.
    #[tokio::test]
    async fn a_table_pending_registration_keeps_its_name() {
        let folder = tempfile::tempdir().expect("folder");
        let create = format!(
            "CREATE EXTERNAL TABLE made STORED AS PARQUET LOCATION '{}/'",
            folder.path().display()
        );
        std::fs::write(folder.path().join("part-0.parquet"), parquet_of_one_row())
            .expect("a data file");
        let store = StateStore::in_memory().expect("store");
        let planner = Planner::new(2, store, "/tmp/quiver-warehouse/".into()).expect("planner");
        let pending = PendingTable {
            job_id: "00000000000000c1".into(),
            statements: vec![create.clone()],
            managed_key: "table:datafusion.public.made".into(),
            settings: Vec::new(),
        };
        planner
            .put_pending_table(pending.clone())
            .await
            .expect("pending");
        for sql in [
            create.clone(),
            "CREATE VIEW made AS SELECT 1 AS x".into(),
            "CREATE TABLE made AS SELECT 1 AS x".into(),
        ] {
            let error = planner
                .plan("00000000000000d2", Query::Sql(sql.clone()), &[])
                .await
                .map(|_| ())
                .expect_err(&sql)
                .to_string();
            assert!(
                error.contains(
                    "'datafusion.public.made' is being created by the CREATE TABLE AS \
                     job 00000000000000c1"
                ),
                "{sql}: {error}"
            );
        }
        planner
            .register_pending_table(pending)
            .await
            .expect("the job registers its table");
        let (left, _) = planner.pending_tables().await.expect("pending tables");
        assert!(left.is_empty(), "{left:?}");
        let error = planner
            .plan("00000000000000d2", Query::Sql(create), &[])
            .await
            .map(|_| ())
            .expect_err("it exists now")
            .to_string();
        assert!(error.contains("already exists"), "{error}");
    }

    fn parquet_of_one_row() -> Vec<u8> {
        use datafusion::parquet::arrow::ArrowWriter;

        let batch = RecordBatch::try_from_iter([(
            "v",
            Arc::new(arrow::array::Int64Array::from(vec![1])) as _,
        )])
        .expect("batch");
        let mut bytes = Vec::new();
        let mut writer = ArrowWriter::try_new(&mut bytes, batch.schema(), None).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        bytes
    }

    #[test]
    fn misspelt_locations_are_refused_naming_them() {
        for (location, problem) in [
            ("s3:/lake/data/", "is not a URL"),
            ("S3:lake/data/", "is not a URL"),
            ("s3://lake//data/", "empty folder name"),
            ("gs://lake/a//b/", "empty folder name"),
            ("s3://b/t#2/", "end of its path"),
            ("http://user:***@host/t/", "holds a password"),
        ] {
            let error = check_location_spelling(location)
                .expect_err(location)
                .to_string();
            assert!(
                error.contains(location) && error.contains(problem),
                "{error}"
            );
        }
        for (location, shown, secret) in [
            ("s3://u:PW123@lake/x/", "s3://u:***@lake/x/", "PW123"),
            // A URL parser reads no password here, but a port.
            (
                "s3://AKIAEX:wJal/rXUtn@lake/x/",
                "s3://AKIAEX:***@lake/x/",
                "rXU",
            ),
        ] {
            let error = check_location_spelling(location)
                .expect_err(location)
                .to_string();
            assert!(
                error.contains(&format!("'{shown}' holds a password")) && !error.contains(secret),
                "{error}"
            );
        }
        for location in [
            "s3://lake/data/",
            "s3://lake",
            "file:///tmp/t/",
            "/tmp/a//b/",
            "C:/data/t/",
            "https://host/t/x.parquet?sig=1",
        ] {
            check_location_spelling(location).expect(location);
        }
    }
}
