//! [`ParquetCommitExec`]: the one task that makes a write job's files visible.
//!
//! Its input is the file list of every write task: the map output of each
//! task's winning attempt (or, for a one-partition write, its own input). It:
//! 1. moves each staged file to its committed name;
//! 2. deletes files of this job that an earlier run of the commit moved in
//!    but the current list does not name;
//! 3. for `INSERT OVERWRITE`, claims its place in the order of the table's
//!    overwrites ([`super::order`]), then lists the table's older data files
//!    that it replaces (all of them, or only those in the partition folders
//!    this job wrote) in `_manifests/<job>.replaces`;
//! 4. writes the job's manifest, `_manifests/<job>.json`: the commit point,
//!    from which readers see this write whole and not what it replaces
//!    ([`super::snapshot`]);
//! 5. for `INSERT OVERWRITE`, deletes the files it replaces, the manifests
//!    of jobs left without a file, then the list of replaced files;
//! 6. aborts the uploads that killed attempts left unfinished, and deletes the
//!    job's staging folder, and with it the files of losing attempts; an
//!    overwrite then prunes the claims of ended overwrites;
//! 7. folds the finished manifests of other jobs into one file once there
//!    are many ([`super::fold`]).
//!
//! New files go in before old ones go, and each step can be repeated, so a
//! retried commit task finishes the work of one that died midway; a retry
//! that finds its job's manifest finishes from it, without reading its input.
//! Object stores offer no atomic multi-file rename: a reader that only
//! lists the folder may see part of the new files between steps 1 and 4,
//! and old and new rows together until step 5 ends. Quiver's readers read
//! the manifests too, and see neither. Its result is the row count, as
//! DataFusion's sinks return.
//!
//! Its metrics count the files it committed (`files_committed`) and the
//! older files an overwrite deleted (`files_replaced`).
//!
//! Each step first checks the executor's [`Lease`]: an executor the scheduler
//! may have declared lost must not move files in after the job was settled.
//!
//! A commit that is never retried (its job failed, or its scheduler
//! restarted) is settled by [`settle_write`] once the job has ended (in
//! `commit/settle.rs`): without a manifest the files it moved in are deleted again,
//! so readers never keep part of a write; with one, an interrupted
//! overwrite's deletions are finished.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::array::{AsArray, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt64Type};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::file_format::parquet::ParquetSink;
use datafusion::datasource::physical_plan::FileSink;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::metrics::{
    Count, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::{StreamExt, TryStreamExt};
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tracing::{debug, info, warn};

use crate::lease::{Lease, LeaseTime, task_lease};
use crate::operators::{final_output, only_child};
use crate::storage::{delete_paths, delete_prefix, get_if_exists};

use super::TaskAttempt;
use super::fold::{FoldedJobs, foldable, folded_names, folded_path, manifest_mode};
use super::layout::{
    REPLACED_LIST_SUFFIX, STAGING_FOLDER, STALE_STAGING_AFTER, committing_job, committing_marker,
    file_name, is_bookkeeping, job_staging, join, manifest as manifest_path, named_job,
    relative_to, replaced_list, upload_records, written_by,
};
use super::order::{self, Claim, Claimed, Claims, Standing};
use super::partition::folder_key;
use super::permission::{CommitPermission, CommitTimeSpent, ask_to_commit, commit_permission};
use super::snapshot::{CommittedFiles, KnownCommits};
use super::snapshot::{manifest_folder_names, manifest_jobs, read_replaced_list};
use crate::storage::upload::{abort_recorded_uploads, multipart_store};

mod settle;

pub use settle::{
    FinishOverwrite, JobEnded, Settled, Staging, Written, settle_write, settle_write_and_staging,
};

/// How many objects are moved or deleted at once.
const CONCURRENT_REQUESTS: usize = 16;

/// The result of a write job: how many rows it wrote.
pub static COUNT_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![Field::new(
        "count",
        DataType::UInt64,
        false,
    )]))
});

/// Commits the staged files of a write job.
#[derive(Debug)]
pub struct ParquetCommitExec {
    input: Arc<dyn ExecutionPlan>,
    sink: Arc<ParquetSink>,
    job_id: String,
    /// The jobs that had committed to the table when the statement was
    /// planned, if the commit must check that no other has since.
    known_commits: Option<Arc<KnownCommits>>,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl ParquetCommitExec {
    pub fn new(input: Arc<dyn ExecutionPlan>, sink: Arc<ParquetSink>, job_id: String) -> Self {
        let properties = final_output(Arc::clone(&COUNT_SCHEMA), 1);
        Self {
            input,
            sink,
            job_id,
            known_commits: None,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// Makes the commit fail, before it moves a file, if a job other than
    /// those in `known_commits` has committed to the table since then. A
    /// write whose rows were computed from the table's earlier contents (an
    /// `INSERT OVERWRITE t SELECT ... FROM t` queued behind an append), or
    /// that expects to create it (`CREATE TABLE AS`), would otherwise
    /// silently replace rows it never saw.
    pub fn with_known_commits(mut self, known_commits: KnownCommits) -> Self {
        self.known_commits = Some(Arc::new(known_commits));
        self
    }

    pub fn known_commits(&self) -> Option<&KnownCommits> {
        self.known_commits.as_deref()
    }

    pub fn sink(&self) -> &Arc<ParquetSink> {
        &self.sink
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }
}

impl DisplayAs for ParquetCommitExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let config = self.sink.config();
        write!(
            f,
            "ParquetCommitExec: location={}, mode={}",
            super::shown_location(config),
            config.insert_op
        )
    }
}

impl ExecutionPlan for ParquetCommitExec {
    fn name(&self) -> &str {
        "ParquetCommitExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut commit = Self::new(
            only_child(children, "ParquetCommitExec")?,
            Arc::clone(&self.sink),
            self.job_id.clone(),
        );
        commit.known_commits = self.known_commits.clone();
        Ok(Arc::new(commit))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "ParquetCommitExec has one partition, asked for {partition}"
            )));
        }
        let config = self.sink.config();
        let table_url = config
            .table_paths
            .first()
            .ok_or_else(|| DataFusionError::Internal("a commit has no output location".into()))?;
        let commit = Commit {
            store: context
                .runtime_env()
                .object_store(&config.object_store_url)?,
            multipart: multipart_store(&context, &config.object_store_url)?,
            local: config.object_store_url.as_str().starts_with("file://"),
            // The plan's `original_url` does not survive serialization.
            location: table_url.as_str().to_owned(),
            table: table_url.prefix().clone(),
            job_id: self.job_id.clone(),
            insert_op: config.insert_op,
            partitioned: !config.table_partition_cols.is_empty(),
            partition_types: config.table_partition_cols.clone(),
            file_schema: Some(Arc::clone(config.output_schema())),
            lease: task_lease(&context),
            permission: commit_permission(&context),
            allowed_until: OnceLock::new(),
            known_commits: self.known_commits.clone(),
            retry: context
                .session_config()
                .get_extension::<TaskAttempt>()
                .is_some_and(|task| task.attempt > 0),
            counts: CommitCounts {
                committed: MetricBuilder::new(&self.metrics).counter("files_committed", 0),
                replaced: MetricBuilder::new(&self.metrics).counter("files_replaced", 0),
            },
        };
        let input = self.input.execute(0, context)?;
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&COUNT_SCHEMA),
            futures::stream::once(commit.run(input)),
        )))
    }
}

/// Checks, before a write job runs, that the store lets it do what a
/// commit does under `table`: create, read, list and delete objects, by
/// writing an empty object in the job's staging folder, reading it, listing
/// the folder and deleting the object. A commit finds and checks its staged
/// files by listing and reading them, moves them into place by copy and
/// delete on S3, GCS and Azure, and rolls a failed write back by deleting:
/// credentials short of any of these would leave the files of a failed
/// write behind, where other engines may read them.
pub async fn check_write_access(
    store: &Arc<dyn ObjectStore>,
    table: &Path,
    job_id: &str,
) -> Result<()> {
    let staging = job_staging(table, job_id);
    let probe = staging.clone().join("_access_check");
    probe_create_access(store, &probe).await?;
    let missing = match store.head(&probe).await {
        Err(error) => Some(("read", error)),
        Ok(_) => match store.list(Some(&staging)).try_next().await {
            Err(error) => Some(("list", error)),
            Ok(_) => None,
        },
    };
    if let Some((right, error)) = missing {
        delete_probe_or_warn(store, &probe).await;
        return Err(store_refusal(
            error,
            format!(
                "can create objects there but not {right} them, which a write needs to find and \
                 check its staged files and to roll back a failed one; no data was written"
            ),
        ));
    }
    probe_delete_access(store, &probe).await
}

/// Checks, before a write through one of DataFusion's own sinks runs (CSV,
/// JSON, one file), that the store lets it create objects in `folder`, by
/// writing and deleting an empty, hidden object there. Those sinks report a
/// store's refusal without its cause ("Error encountered while finalizing
/// writes"), and may have written some files by then. They delete nothing,
/// so credentials that may not delete pass (the object stays, logged).
pub async fn check_folder_write_access(
    store: &Arc<dyn ObjectStore>,
    folder: &Path,
    job_id: &str,
) -> Result<()> {
    let probe = folder.clone().join(format!("_access_check-{job_id}"));
    probe_create_access(store, &probe).await?;
    delete_probe_or_warn(store, &probe).await;
    Ok(())
}

async fn delete_probe_or_warn(store: &Arc<dyn ObjectStore>, probe: &Path) {
    if let Err(e) = store.delete(probe).await {
        let error = crate::storage::redacted_error(&e);
        warn!(%probe, %error, "cannot delete the empty object that checked write access");
    }
}

/// Creates the empty object `probe`: the first object of a job's staging
/// folder. On local disk, the clean-up of another job that just ended
/// removes the shared staging folder (`_temporary/`) once it is empty,
/// which it can be for an instant after the store created it and before it
/// created the job's folder within: the store then finds no parent folder
/// and fails, and creating the object again succeeds.
async fn probe_create_access(store: &Arc<dyn ObjectStore>, probe: &Path) -> Result<()> {
    let mut tries = 0;
    loop {
        tries += 1;
        match store.put(probe, PutPayload::new()).await {
            Ok(_) => return Ok(()),
            Err(error) if tries < PROBE_CREATE_TRIES && lost_a_local_folder(&error) => {
                debug!(%probe, tries, "a folder was removed while the probe was created");
                // A pause out of step with whatever removes the folder, so
                // that the tries do not keep meeting its removals.
                tokio::time::sleep(PROBE_CREATE_PAUSE * tries as u32).await;
            }
            Err(error) => {
                return Err(store_refusal(error, "cannot create objects there".into()));
            }
        }
    }
}

/// Tries of [`probe_create_access`] whose folder another job's clean-up
/// removed as it was created.
const PROBE_CREATE_TRIES: usize = 50;
/// The pause after the first such try; each next one pauses longer.
const PROBE_CREATE_PAUSE: Duration = Duration::from_micros(100);

/// Whether `error`, of the local file system, says that a folder it
/// created, or found, was gone when it went on to create what lies in it.
fn lost_a_local_folder(error: &object_store::Error) -> bool {
    let object_store::Error::Generic {
        store: "LocalFileSystem",
        source,
    } = error
    else {
        return false;
    };
    let source: &(dyn std::error::Error + 'static) = source.as_ref();
    std::iter::successors(Some(source), |error| error.source()).any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    })
}

async fn probe_delete_access(store: &Arc<dyn ObjectStore>, probe: &Path) -> Result<()> {
    store.delete(probe).await.map_err(|error| {
        store_refusal(
            error,
            format!(
                "can create objects there but not delete them, which a write needs to move its \
                 files into place and to roll back a failed commit; no data was written (the \
                 empty, hidden check object '{probe}' may stay, which readers skip)"
            ),
        )
    })
}

/// The store's `error` that an access check met, explained by `what`. The
/// store's error is kept as it is, so that a task failing on it is retried
/// only if it may pass (a timeout, throttling), not on a refusal.
fn store_refusal(error: object_store::Error, what: String) -> DataFusionError {
    DataFusionError::ObjectStore(Box::new(error)).context(what)
}

/// What an overwrite replaces: the files it deletes, the jobs whose files
/// it keeps, and the jobs committed when it listed the table's files (only
/// those may have been replaced whole).
#[derive(Default)]
struct Replacement {
    files: Vec<(Path, String)>,
    kept_jobs: HashSet<String>,
    committed: CommittedFiles,
    /// The table's overwrite claims, as the overwrite read them.
    claims: Claims,
}

impl Replacement {
    /// Whether the overwrite of `own_job` left `job` without a file, so
    /// that its manifest may go. A job that committed after the listing
    /// (another cluster's write) may have files it did not see.
    fn retires(&self, job: &str, own_job: &str) -> bool {
        job != own_job && !self.kept_jobs.contains(job) && self.committed.committed(job)
    }
}

/// A file staged by a winning attempt.
struct StagedFile {
    staged: Path,
    relative: String,
    rows: u64,
    bytes: u64,
}

struct Commit {
    store: Arc<dyn ObjectStore>,
    /// The store's multipart API, to abort the uploads killed tasks left.
    multipart: Option<Arc<dyn MultipartStore>>,
    /// Whether the table is on the local file system, where deleting objects
    /// leaves their folders behind.
    local: bool,
    location: String,
    table: Path,
    job_id: String,
    insert_op: InsertOp,
    partitioned: bool,
    /// The declared types of the partition columns, so that an overwrite
    /// replaces every spelling of the folders it writes (`month=01` as well
    /// as `month=1`); none when the scheduler settles a write.
    partition_types: Vec<(String, DataType)>,
    /// The schema of the files, to write an empty file that keeps it when a
    /// write leaves an unpartitioned table without data; none when the
    /// scheduler settles a write.
    file_schema: Option<SchemaRef>,
    /// The lease of the executor running the commit; none when the scheduler
    /// settles a write.
    lease: Option<Arc<Lease>>,
    /// Asked before the commit first changes the table; none when the
    /// scheduler settles a write.
    permission: Option<Arc<CommitPermission>>,
    /// Until when the permission lets the commit act, once given, if it
    /// limits that.
    allowed_until: OnceLock<LeaseTime>,
    /// See [`ParquetCommitExec::with_known_commits`].
    known_commits: Option<Arc<KnownCommits>>,
    /// Whether an earlier attempt of this commit task may have run (its
    /// attempt number is above 0; after the scheduler planned the job
    /// again, every attempt is): it may have written the job's manifest.
    retry: bool,
    counts: CommitCounts,
}

/// What a commit did, for its operator's metrics.
#[derive(Default)]
struct CommitCounts {
    committed: Count,
    replaced: Count,
}

impl Commit {
    /// Fails once the executor's lease, or the time the permission gave
    /// the commit, has run out: checked right before every change to the
    /// store.
    fn check_may_act(&self) -> Result<()> {
        if let Some(lease) = &self.lease {
            lease.check()?;
        }
        match self.allowed_until.get() {
            Some(&until) if LeaseTime::now() >= until => Err(CommitTimeSpent::since(until))?,
            _ => Ok(()),
        }
    }

    /// Asks for the scheduler's permission to change the table (see
    /// [`super::permission`]); `finishes` when the manifest is there.
    async fn ask_to_commit(&self, finishes: bool) -> Result<()> {
        let until = ask_to_commit(self.permission.as_deref(), &self.location, finishes).await?;
        if let Some(until) = until {
            self.allowed_until.get_or_init(|| until);
        }
        Ok(())
    }

    /// Runs `changes`, which the permission allowed, within the time it
    /// gave: a step that hangs past it is dropped as well, not only the
    /// steps after it.
    async fn within_allowed_time<T>(&self, changes: impl Future<Output = Result<T>>) -> Result<T> {
        let Some(until) = self.allowed_until.get().copied() else {
            return changes.await;
        };
        match tokio::time::timeout(until - LeaseTime::now(), changes).await {
            Ok(result) => result,
            Err(_) => Err(CommitTimeSpent::since(until))?,
        }
    }

    async fn run(self, input: SendableRecordBatchStream) -> Result<RecordBatch> {
        if self.insert_op == InsertOp::Replace {
            return Err(DataFusionError::NotImplemented(
                "REPLACE INTO is not supported for Parquet tables; use INSERT OVERWRITE".into(),
            ));
        }
        if self.retry
            && let Some(manifest) = self.read_manifest().await?
        {
            self.ask_to_commit(true).await?;
            return self
                .within_allowed_time(self.finish_committed(&manifest))
                .await;
        }
        let files = staged_files(input).await?;
        self.check_staged_files_are_recent(&files).await?;
        self.check_no_commit_since_planning().await?;
        self.ask_to_commit(false).await?;
        self.within_allowed_time(self.commit(files)).await
    }

    /// Refuses staged files older than [`STALE_STAGING_AFTER`]: a later
    /// commit into the table may be about to take the write as abandoned
    /// and delete them. One file tells, as the folder's newest is no older;
    /// of the first three, those an earlier attempt moved in already are
    /// skipped.
    async fn check_staged_files_are_recent(&self, files: &[StagedFile]) -> Result<()> {
        let mut written = None;
        for file in files.iter().take(3) {
            match self.store.head(&file.staged).await {
                Ok(meta) => {
                    written = Some(meta.last_modified);
                    break;
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let Some(written) = written else {
            return Ok(());
        };
        let age = chrono::Utc::now().signed_duration_since(written);
        if age <= STALE_STAGING_AFTER {
            return Ok(());
        }
        Err(DataFusionError::Execution(format!(
            "the files this job staged in '{}' were written {} hours ago, more than the {} \
             hours within which a commit uses them: a later commit into the table takes a \
             write untouched for a day as abandoned and deletes its files, so this commit \
             does not move them in; run the statement again",
            self.location,
            age.num_hours(),
            STALE_STAGING_AFTER.num_hours()
        )))
    }

    /// Makes the staged `files` the job's write, once allowed to.
    async fn commit(&self, mut files: Vec<StagedFile>) -> Result<RecordBatch> {
        if files.is_empty() {
            files.extend(self.stage_schema_file().await?);
        }
        // Readers of a table without manifests hide the files of jobs with
        // a staging folder: on object stores the folder must not vanish
        // with the last file moved out of it.
        self.mark_staging().await?;
        // New files go in before old ones go: a commit that dies in between
        // leaves extra rows, never lost ones, and its retry finishes the job.
        let moved_now = self.move_into_place(&files).await?;
        self.counts.committed.add(files.len());
        // Only a retried commit can find files an earlier run moved in; a
        // first attempt need not list the whole table.
        if self.retry {
            self.delete_stale_files_of_this_job(&files).await?;
        }
        let rows: u64 = files.iter().map(|file| file.rows).sum();
        let mut claims = None;
        let replaced = if self.insert_op == InsertOp::Overwrite {
            let written: Vec<&str> = files.iter().map(|file| file.relative.as_str()).collect();
            let claimed = self.claim_place(&written).await?;
            let moved_in_after_claiming = claimed
                .as_ref()
                .is_some_and(|claimed| claimed.by_earlier_run)
                && moved_now > 0;
            let claim = claimed.map(|claimed| claimed.claim);
            let mut replaced = self
                .replaced_files(
                    self.partitioned,
                    written.into_iter(),
                    claim.as_ref(),
                    moved_in_after_claiming,
                )
                .await?;
            self.write_replaced_list(&replaced).await?;
            claims = Some(std::mem::take(&mut replaced.claims));
            Some(replaced)
        } else {
            None
        };
        // Once the manifest is there the write counts as done: readers see
        // it, and not what it replaces, and recovery finishes the deletions
        // below rather than undoing the moves above.
        self.write_manifest(&files, rows).await?;
        if let Some(replaced) = replaced {
            let deleted = self.delete_replaced(replaced).await;
            deleted.map_err(|e| self.failed_after_commit(e))?;
        }
        self.delete_staging().await?;
        info!(job_id = %self.job_id, location = %self.location, files = files.len(), rows,
            "write committed");
        if let Some(claims) = claims {
            self.prune_claims(claims).await;
        }
        self.settle_abandoned_jobs().await;
        // The write stands whatever happens here: a fold is only a saving,
        // and the next commit tries again.
        if let Err(error) = self.fold_manifests().await {
            let error = crate::storage::redacted_error(&error);
            warn!(job_id = %self.job_id, location = %self.location, %error,
                "could not fold the table's manifests");
        }
        count_batch(rows)
    }

    /// Folds the finished manifests of other jobs, with the folded files
    /// there, into a new folded file, then deletes them, once there are
    /// [`super::fold::FOLD_AT`] of them. A manifest that cannot be read, or
    /// records no mode, stays; so does everything if another fold replaced
    /// a folded file meanwhile (the next commit folds).
    async fn fold_manifests(&self) -> Result<()> {
        let names = manifest_folder_names(&self.store, &self.table).await?;
        let Some(jobs) = foldable(&names, &self.job_id) else {
            return Ok(());
        };
        let Some(folded) = FoldedJobs::read_listed(&self.store, &self.table, &names).await? else {
            return Ok(());
        };
        let mut folded = folded.merged();
        let modes = concurrently(jobs, &self.store, |store, job| async move {
            let bytes = get_if_exists(&store, &manifest_path(&self.table, &job)).await?;
            Ok((job, bytes.as_deref().and_then(manifest_mode)))
        })
        .await?;
        let mut manifests = Vec::new();
        for (job, mode) in modes {
            if let Some(mode) = mode {
                manifests.push(manifest_path(&self.table, &job));
                folded.jobs.insert(job, mode);
            }
        }
        self.check_may_act()?;
        folded
            .write_new(&self.store, &self.table, &self.job_id)
            .await?;
        let count = manifests.len();
        manifests.extend(self.folded_files(&names));
        self.delete_all(manifests).await?;
        info!(job_id = %self.job_id, location = %self.location, manifests = count,
            folded = folded.jobs.len(), "folded the manifests of finished writes");
        Ok(())
    }

    /// Finishes a commit that an earlier attempt of this task took past its
    /// manifest before it was lost: the write stands, so its input is not
    /// read (recomputing it could read the files the overwrite deleted), and
    /// the overwrite's deletions and the staging folder are finished from
    /// the manifest. The result is the row count the manifest records.
    async fn finish_committed(&self, manifest: &Manifest) -> Result<RecordBatch> {
        self.counts.committed.add(manifest.files.len());
        let finished = self.finish_replacing(manifest).await;
        finished.map_err(|e| self.failed_after_commit(e))?;
        self.delete_staging().await?;
        info!(job_id = %self.job_id, location = %self.location, rows = manifest.rows,
            "finished a write that an earlier attempt of its commit had committed");
        count_batch(manifest.rows)
    }

    /// A failure to delete what a committed overwrite replaces, saying that
    /// the write stands: the job fails, but its rows are in the table.
    fn failed_after_commit(&self, error: DataFusionError) -> DataFusionError {
        error.context(format!(
            "the overwrite of '{}' committed: Quiver reads its rows and not those it replaces, \
             but finishing it (deleting the replaced files, then the manifests of the writes \
             it replaced whole) failed, so other engines may read both until the statement \
             runs again",
            self.location
        ))
    }

    /// Deletes the files that a committed overwrite replaces and that are
    /// still there; nothing for an append.
    async fn finish_replacing(&self, manifest: &Manifest) -> Result<()> {
        // Manifests from before the commit point moved carry no
        // `partitioned`: their deletions had finished when they were written.
        if manifest.mode != InsertOp::Overwrite.to_string() {
            return Ok(());
        }
        let Some(partitioned) = manifest.partitioned else {
            return Ok(());
        };
        if manifest.replaced_list {
            // Exactly the files listed, however long ago it committed: the
            // folder may hold files that others wrote since. No list: the
            // deletions had finished.
            if let Some(replaced) = self.replacement_from_list().await? {
                self.delete_replaced(replaced).await?;
            }
            return Ok(());
        }
        // Written before overwrites listed what they replace (or claimed
        // a place).
        let written = manifest.files.iter().map(|file| file.path.as_str());
        let replaced = self
            .replaced_files(partitioned, written, None, false)
            .await?;
        self.delete_replaced(replaced).await
    }

    /// What this job's overwrite listed as replaced, with the jobs of the
    /// table's other data files; none once its list is gone.
    async fn replacement_from_list(&self) -> Result<Option<Replacement>> {
        let Some(files) = read_replaced_list(&self.store, &self.table, &self.job_id).await? else {
            return Ok(None);
        };
        let committed = CommittedFiles::read(&self.store, &self.table).await?;
        let listed: HashSet<&Path> = files.iter().collect();
        let kept_jobs = self
            .data_files()
            .await?
            .iter()
            .filter(|(path, _)| !listed.contains(path))
            .filter_map(|(path, _)| path.filename().and_then(named_job).map(str::to_owned))
            .collect();
        let files = files
            .into_iter()
            .map(|path| {
                let relative = relative_to(&self.table, &path).unwrap_or_default();
                (path, relative)
            })
            .collect();
        Ok(Some(Replacement {
            files,
            kept_jobs,
            committed,
            claims: Claims::default(),
        }))
    }

    /// Fails if a job other than this one and those known when the
    /// statement was planned has committed to the table. Writes to one
    /// table run one at a time, so none can commit between this check and
    /// this job's manifest.
    async fn check_no_commit_since_planning(&self) -> Result<()> {
        let Some(known) = &self.known_commits else {
            return Ok(());
        };
        let now = KnownCommits::read(&self.store, &self.table).await?;
        match now.committed_since(known, &self.job_id) {
            None => Ok(()),
            Some(job) => Err(DataFusionError::Execution(format!(
                "the table at '{}' changed while this statement waited to run: job {job} \
                 committed to it after the statement was planned, and this write would \
                 replace rows it never read; nothing was written, run the statement again",
                self.location
            ))),
        }
    }

    /// An empty Parquet file with the table's columns, staged, when this write
    /// committed no rows to an unpartitioned table that would then hold no
    /// data file: a table declared without columns needs one file to infer
    /// them from (a `CREATE TABLE AS` of an empty result, an overwrite with
    /// nothing, or a catalog replayed after either), as Spark writes one.
    async fn stage_schema_file(&self) -> Result<Option<StagedFile>> {
        let Some(schema) = &self.file_schema else {
            return Ok(None);
        };
        let keeps_data = self.insert_op == InsertOp::Append
            && self
                .data_files()
                .await?
                .iter()
                .any(|(path, _)| !written_by(path, &self.job_id));
        if self.partitioned || keeps_data {
            return Ok(None);
        }
        let mut bytes = Vec::new();
        ArrowWriter::try_new(&mut bytes, Arc::clone(schema), None)?.close()?;
        let relative = file_name(&self.job_id, 0, 0, "parquet");
        let staged = job_staging(&self.table, &self.job_id)
            .join("schema")
            .join(relative.as_str());
        self.check_may_act()?;
        let size = bytes.len() as u64;
        self.store.put(&staged, PutPayload::from(bytes)).await?;
        Ok(Some(StagedFile {
            staged,
            relative,
            rows: 0,
            bytes: size,
        }))
    }

    /// The table's data files, relative to it: what a scan of it reads.
    /// Staging, manifests and other sub-folders are not data.
    async fn data_files(&self) -> Result<Vec<(Path, String)>> {
        let listed: Vec<Path> = self
            .store
            .list(Some(&self.table))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await?;
        Ok(listed
            .into_iter()
            .filter(|path| !is_bookkeeping(&self.table, path))
            .filter_map(|path| {
                let relative = relative_to(&self.table, &path)?;
                let in_folder_of_data = relative
                    .split('/')
                    .rev()
                    .skip(1)
                    .all(|folder| folder.contains('='));
                in_folder_of_data.then_some((path, relative))
            })
            .collect())
    }

    /// The data files of this job in the table, by path and relative path.
    async fn files_of_this_job(&self) -> Result<Vec<(Path, String)>> {
        let mut files = self.data_files().await?;
        files.retain(|(path, _)| written_by(path, &self.job_id));
        Ok(files)
    }

    /// Deletes files that an earlier run of this commit moved in but this
    /// run's attempts did not write (a recomputed write may split its rows
    /// into fewer files): the current file list is the truth.
    async fn delete_stale_files_of_this_job(&self, files: &[StagedFile]) -> Result<()> {
        let current: HashSet<&str> = files.iter().map(|file| file.relative.as_str()).collect();
        let stale = self
            .files_of_this_job()
            .await?
            .into_iter()
            .filter(|(_, relative)| !current.contains(relative.as_str()))
            .map(|(path, _)| path)
            .collect();
        self.delete_all(stale).await
    }

    /// Claims this overwrite's place in the table's order of overwrites
    /// ([`super::order`]), once its files are in place; none if the store
    /// cannot order them.
    async fn claim_place(&self, written: &[&str]) -> Result<Option<Claimed>> {
        let folders = self.partitioned.then(|| {
            let folders: HashSet<&str> =
                written.iter().map(|relative| folder_of(relative)).collect();
            let mut folders: Vec<String> = folders.into_iter().map(str::to_owned).collect();
            folders.sort();
            folders
        });
        self.check_may_act()?;
        let claim =
            order::claim(&self.store, &self.table, &self.job_id, folders, self.retry).await?;
        if claim.is_none() {
            warn!(job_id = %self.job_id, location = %self.location,
                "the store cannot create an object only if it is absent, so this overwrite is \
                 not ordered with overwrites of the same partitions from other clusters");
        }
        Ok(claim)
    }

    /// Deletes the claims of ended overwrites among `claims`; they are only
    /// kept longer if that fails.
    async fn prune_claims(&self, claims: Claims) {
        if let Err(error) = order::prune(&self.store, &self.table, claims).await {
            let error = crate::storage::redacted_error(&error);
            warn!(job_id = %self.job_id, location = %self.location, %error,
                "could not prune the claims of ended overwrites");
        }
    }

    /// The files that an overwrite replaces: in the partition folders this
    /// job wrote (`written`) for a partitioned table, all of the table's
    /// data files otherwise. Files of this job stay.
    /// Folders are compared by the values they name ([`folder_key`]), so
    /// that a folder that another engine spelled otherwise (`p=%C3%BC` for
    /// `p=ü`, `month=01` for `month=1`) is replaced too.
    /// With its `claim`, the files of overwrites that claimed earlier go
    /// too, committed or not, and nothing goes in the partitions of later
    /// claims that have committed ([`super::order`]).
    ///
    /// A retried commit that kept its earlier run's claim but moved files
    /// in only now (`moved_in_after_claiming`) fails if a later claim is on
    /// its partitions: that overwrite may have listed them without these
    /// files, and both writes' rows would stand. The error is final, so the
    /// job's files are rolled back.
    async fn replaced_files<'a>(
        &self,
        partitioned: bool,
        written: impl Iterator<Item = &'a str>,
        claim: Option<&Claim>,
        moved_in_after_claiming: bool,
    ) -> Result<Replacement> {
        let key = |relative: &str| folder_key(folder_of(relative), &self.partition_types);
        let touched: HashSet<Vec<(String, String)>> = written.map(key).collect();
        // Read before the files are listed: a job that commits in between
        // counts as uncommitted, and keeps its files.
        let committed = CommittedFiles::read(&self.store, &self.table).await?;
        let mut replacement = Replacement {
            committed,
            ..Replacement::default()
        };
        let listed = self.data_files().await?;
        let standing = match claim {
            Some(own) => Standing::read(&self.store, &self.table, own).await?,
            None => Standing::default(),
        };
        let same_folder = |ours: &str, theirs: &str| {
            folder_key(ours, &self.partition_types) == folder_key(theirs, &self.partition_types)
        };
        if let Some(own) = claim
            && moved_in_after_claiming
            && let Some(later) = standing.later_on_same_partitions(own, same_folder)
        {
            return Err(DataFusionError::Execution(format!(
                "the overwrite of '{}' was retried after job {} began to overwrite the same \
                 partitions, and moved files in since; its write is rolled back: run the \
                 statement again",
                self.location, later.job_id
            )));
        }
        for (path, relative) in listed {
            // Another job's files that readers do not see for want of its
            // manifest: a commit in progress (another cluster's), or one
            // that failed, which its settling rolls back. Neither is this
            // overwrite's to delete, unless it is an overwrite that claimed
            // its place earlier. (In a folder without manifests, only a
            // staging job's files are such.)
            let earlier_overwrite = || {
                path.filename()
                    .and_then(committing_job)
                    .is_some_and(|job| standing.earlier_jobs.contains(job))
            };
            if !written_by(&path, &self.job_id)
                && replacement.committed.uncommitted(&path)
                && !earlier_overwrite()
            {
                continue;
            }
            let replaced = !written_by(&path, &self.job_id)
                && (!partitioned || touched.contains(&key(&relative)))
                && !standing.superseded(folder_of(&relative), same_folder);
            if replaced {
                replacement.files.push((path, relative));
            } else if let Some(job) = path.filename().and_then(named_job) {
                replacement.kept_jobs.insert(job.to_owned());
            }
        }
        replacement.claims = standing.claims;
        Ok(replacement)
    }

    /// Lists the files this overwrite replaces where readers find it
    /// ([`replaced_list`]), before the manifest makes the write visible:
    /// from then on readers skip them, although they are deleted after.
    async fn write_replaced_list(&self, replaced: &Replacement) -> Result<()> {
        if replaced.files.is_empty() {
            return Ok(());
        }
        let relatives: Vec<&str> = replaced
            .files
            .iter()
            .map(|(_, relative)| relative.as_str())
            .collect();
        let list =
            serde_json::to_vec(&relatives).map_err(|e| DataFusionError::External(Box::new(e)))?;
        self.check_may_act()?;
        self.store
            .put(
                &replaced_list(&self.table, &self.job_id),
                PutPayload::from(list),
            )
            .await?;
        Ok(())
    }

    /// Deletes the files that an overwrite replaced, then the manifests of
    /// the jobs it left without a file, then the list of replaced files.
    async fn delete_replaced(&self, mut replaced: Replacement) -> Result<()> {
        let files = std::mem::take(&mut replaced.files);
        let count = files.len();
        self.delete_all(files.into_iter().map(|(path, _)| path).collect())
            .await?;
        self.counts.replaced.add(count);
        self.retire_manifests(&replaced).await?;
        self.delete_replaced_list().await
    }

    /// Deletes the manifests of other jobs that `replaced` left without a
    /// data file: readers need a manifest only to show its job's files, and
    /// every statement lists the manifests, so they grow with the table's
    /// surviving writes, not with its history.
    async fn retire_manifests(&self, replaced: &Replacement) -> Result<()> {
        let names = manifest_folder_names(&self.store, &self.table).await?;
        let retired: Vec<String> = manifest_jobs(&names)
            .into_iter()
            .filter(|job| replaced.retires(job, &self.job_id))
            .collect();
        let count = retired.len();
        // With a list of replaced files that a cancelled overwrite left: all
        // of them lay in folders that this overwrite replaced too.
        let paths = retired
            .iter()
            .flat_map(|job| {
                let list = format!("{job}{REPLACED_LIST_SUFFIX}");
                let manifest = Some(manifest_path(&self.table, job));
                let list = names
                    .contains(&list)
                    .then(|| replaced_list(&self.table, job));
                manifest.into_iter().chain(list)
            })
            .collect();
        self.delete_all(paths).await?;
        // Folded jobs left without a file go too: into a new folded file
        // without them, unless none is left. Skipped if another fold
        // replaced a folded file meanwhile; they are only kept longer.
        let folded = FoldedJobs::read_listed(&self.store, &self.table, &names).await?;
        let retired_folded = folded.map(|folded| folded.merged()).and_then(|folded| {
            let kept = folded.without(|job| replaced.retires(job, &self.job_id))?;
            Some((folded.jobs.len() - kept.jobs.len(), kept))
        });
        let count = count + retired_folded.as_ref().map_or(0, |(retired, _)| *retired);
        if let Some((_, kept)) = retired_folded {
            if !kept.jobs.is_empty() {
                self.check_may_act()?;
                kept.write_new(&self.store, &self.table, &self.job_id)
                    .await?;
            }
            self.delete_all(self.folded_files(&names)).await?;
        }
        if count > 0 {
            info!(job_id = %self.job_id, location = %self.location, manifests = count,
                "retired the manifests of writes that this overwrite replaced whole");
        }
        Ok(())
    }

    /// The paths of the folded files among `names`.
    fn folded_files(&self, names: &[String]) -> Vec<Path> {
        folded_names(names)
            .iter()
            .map(|name| folded_path(&self.table, name))
            .collect()
    }

    async fn delete_replaced_list(&self) -> Result<()> {
        self.delete_all(vec![replaced_list(&self.table, &self.job_id)])
            .await
    }

    /// Moves the staged files into place; returns how many this run moved
    /// (an earlier run may have moved the others).
    async fn move_into_place(&self, files: &[StagedFile]) -> Result<usize> {
        let moves = files
            .iter()
            .map(|file| Ok((file.staged.clone(), self.committed_path(&file.relative)?)))
            .collect::<Result<Vec<_>>>()?;
        let moved = concurrently(
            moves,
            &self.store,
            |store, (staged, committed)| async move {
                self.check_may_act()?;
                match store.rename(&staged, &committed).await {
                    Ok(()) => Ok(true),
                    // Moved already by an earlier run of this step.
                    Err(object_store::Error::NotFound { .. })
                        if store.head(&committed).await.is_ok() =>
                    {
                        Ok(false)
                    }
                    // Copied already by an earlier run, which died before it
                    // deleted the staged copy, on a store whose rename will
                    // not replace a file: object_store 0.13's GCS sends its
                    // rename's copy with a create-only condition. The names
                    // are the job's own, so the file in place is this one.
                    Err(object_store::Error::AlreadyExists { .. }) => {
                        match store.delete(&staged).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(false),
                            Err(e) => Err(DataFusionError::from(e)),
                        }
                    }
                    Err(e) => Err(DataFusionError::from(e)),
                }
            },
        )
        .await?;
        Ok(moved.into_iter().filter(|moved| *moved).count())
    }

    fn committed_path(&self, relative: &str) -> Result<Path> {
        join(&self.table, relative).map_err(|e| DataFusionError::External(Box::new(e)))
    }

    /// Writes the job's manifest: every file it committed, with its rows and size.
    async fn write_manifest(&self, files: &[StagedFile], rows: u64) -> Result<()> {
        self.check_may_act()?;
        let committed_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let manifest = serde_json::json!({
            "job_id": self.job_id,
            "committed_at_unix_secs": committed_at,
            "mode": self.insert_op.to_string(),
            "partitioned": self.partitioned,
            "replaced_list": self.insert_op == InsertOp::Overwrite,
            "rows": rows,
            "files": files.iter().map(|file| serde_json::json!({
                "path": file.relative,
                "rows": file.rows,
                "bytes": file.bytes,
            })).collect::<Vec<_>>(),
        });
        self.store
            .put(
                &manifest_path(&self.table, &self.job_id),
                PutPayload::from(manifest.to_string()),
            )
            .await?;
        Ok(())
    }

    /// Keeps the job's staging folder listed until [`Self::delete_staging`]
    /// deletes it, after the manifest: readers of a table without manifests
    /// hide the files of jobs with a staging folder.
    async fn mark_staging(&self) -> Result<()> {
        self.check_may_act()?;
        let marker = committing_marker(&self.table, &self.job_id);
        self.store.put(&marker, PutPayload::new()).await?;
        Ok(())
    }

    /// Deletes the job's staging folder: the winners' files are gone from it
    /// already, so what remains are the files of failed or losing attempts.
    /// The uploads that killed attempts left unfinished are aborted first:
    /// their records are in this folder.
    async fn delete_staging(&self) -> Result<()> {
        self.check_may_act()?;
        if let Some(multipart) = &self.multipart {
            let records = upload_records(&self.table, &self.job_id);
            let aborted = abort_recorded_uploads(&self.store, multipart.as_ref(), &records).await?;
            if aborted > 0 {
                info!(job_id = %self.job_id, location = %self.location, aborted,
                    "aborted uploads that tasks left unfinished");
            }
        }
        let staging = job_staging(&self.table, &self.job_id);
        delete_prefix(&self.store, &staging, self.local).await?;
        if self.local {
            // Other jobs may be writing into it: only an empty folder goes.
            let temporary = std::path::Path::new("/")
                .join(self.table.as_ref())
                .join(STAGING_FOLDER);
            let _ = tokio::fs::remove_dir(temporary).await;
        }
        Ok(())
    }

    async fn delete_all(&self, paths: Vec<Path>) -> Result<()> {
        self.check_may_act()?;
        let paths = futures::stream::iter(paths.into_iter().map(Ok)).boxed();
        Ok(delete_paths(&self.store, paths).await?)
    }
}

/// The parts of a manifest that settling or finishing a write reads.
#[derive(serde::Deserialize)]
struct Manifest {
    mode: String,
    partitioned: Option<bool>,
    /// Whether the overwrite listed the files it replaces before this
    /// manifest; older manifests do not say.
    #[serde(default)]
    replaced_list: bool,
    rows: u64,
    files: Vec<ManifestFile>,
}

#[derive(serde::Deserialize)]
struct ManifestFile {
    path: String,
    bytes: u64,
}

impl Manifest {
    /// What the job wrote, as its manifest records it.
    fn written(&self) -> Written {
        Written {
            rows: self.rows,
            files: self.files.len() as u64,
            bytes: self.files.iter().map(|file| file.bytes).sum(),
        }
    }
}

impl Commit {
    async fn read_manifest(&self) -> Result<Option<Manifest>> {
        let path = manifest_path(&self.table, &self.job_id);
        let Some(bytes) = get_if_exists(&self.store, &path).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            DataFusionError::Execution(format!(
                "the manifest of job {} at '{}' is not valid: {e}",
                self.job_id, self.location
            ))
        })
    }
}

/// The result of a write job that wrote `rows` rows, as the bytes of an
/// Arrow IPC stream: what its commit task's output holds, for a scheduler
/// that learns the count from the job's manifest instead.
pub fn write_result_ipc(rows: u64) -> Result<Vec<u8>> {
    let batch = count_batch(rows)?;
    let mut bytes = Vec::new();
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &batch.schema())?;
    writer.write(&batch)?;
    writer.finish()?;
    drop(writer);
    Ok(bytes)
}

/// The result of a write job: one row, its row count.
fn count_batch(rows: u64) -> Result<RecordBatch> {
    Ok(RecordBatch::try_new(
        Arc::clone(&COUNT_SCHEMA),
        vec![Arc::new(UInt64Array::from(vec![rows]))],
    )?)
}

/// Runs `request` for every item, [`CONCURRENT_REQUESTS`] at a time.
async fn concurrently<T, R, F, Fut>(
    items: impl IntoIterator<Item = T>,
    store: &Arc<dyn ObjectStore>,
    request: F,
) -> Result<Vec<R>>
where
    F: Fn(Arc<dyn ObjectStore>, T) -> Fut,
    Fut: Future<Output = Result<R>>,
{
    let requests: Vec<Fut> = items
        .into_iter()
        .map(|item| request(Arc::clone(store), item))
        .collect();
    futures::stream::iter(requests)
        .buffer_unordered(CONCURRENT_REQUESTS)
        .try_collect()
        .await
}

/// The folder of a relative path: `a=1/b=2` for `a=1/b=2/part.parquet`.
fn folder_of(relative: &str) -> &str {
    relative.rsplit_once('/').map_or("", |(folder, _)| folder)
}

/// Reads the write tasks' file lists.
async fn staged_files(mut input: SendableRecordBatchStream) -> Result<Vec<StagedFile>> {
    let mut files = Vec::new();
    while let Some(batch) = input.next().await {
        let batch = batch?;
        let column = |name: &str| {
            batch.column_by_name(name).ok_or_else(|| {
                DataFusionError::Internal(format!("write task output has no '{name}' column"))
            })
        };
        let staged = column("staged")?.as_string::<i32>();
        let relative = column("file")?.as_string::<i32>();
        let rows = column("rows")?.as_primitive::<UInt64Type>();
        let bytes = column("bytes")?.as_primitive::<UInt64Type>();
        for row in 0..batch.num_rows() {
            files.push(StagedFile {
                staged: Path::parse(staged.value(row))
                    .map_err(|e| DataFusionError::External(Box::new(e)))?,
                relative: relative.value(row).to_owned(),
                rows: rows.value(row),
                bytes: bytes.value(row),
            });
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use std::path::Path as LocalPath;

    use super::*;
    use crate::storage::StoreRegistry;

    /// On local disk, the clean-ups of other jobs remove the empty staging
    /// folder while new jobs create their own folders within it: their
    /// access checks pass all the same. (The clean-ups here run every
    /// 10 µs, far more often than jobs end; a single try of each check
    /// fails within the first few jobs.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_access_check_survives_the_clean_up_of_another_job() {
        use std::sync::atomic::{AtomicBool, Ordering};

        let folder = tempfile::tempdir().expect("folder");
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::local::LocalFileSystem::new());
        let table = Path::from_filesystem_path(folder.path()).expect("table");
        let staging = folder.path().join(STAGING_FOLDER);
        let stop = Arc::new(AtomicBool::new(false));
        let cleaning_up = std::thread::spawn({
            let (staging, stop) = (staging.clone(), Arc::clone(&stop));
            move || {
                let mut removed = 0;
                while !stop.load(Ordering::Relaxed) {
                    removed += usize::from(std::fs::remove_dir(&staging).is_ok());
                    std::thread::sleep(Duration::from_micros(10));
                }
                removed
            }
        });
        for job in 0..500 {
            let job_id = format!("{job:016x}");
            let checked = check_write_access(&store, &table, &job_id).await;
            if let Err(error) = checked {
                stop.store(true, Ordering::Relaxed);
                panic!("job {job}: {error}");
            }
            // The job ended: its folder goes, and the staging folder is
            // empty again.
            std::fs::remove_dir(staging.join(&job_id)).expect("the job's folder");
        }
        stop.store(true, Ordering::Relaxed);
        let removed = cleaning_up.join().expect("clean-ups");
        assert!(removed > 0, "the staging folder was never removed");
    }

    /// A task whose access check the store refused fails for good; one whose
    /// store was throttling or timing out is tried again.
    #[test]
    fn a_refused_access_check_is_not_retried_and_a_throttled_one_is() {
        use quiver_proto::FailureKind;

        let check = |error| {
            let refused = store_refusal(error, "cannot create objects there".into());
            crate::error::classify_failure(&super::super::write_failure("s3://b/t/", refused))
        };
        let denied = object_store::Error::PermissionDenied {
            path: "t/_access_check".into(),
            source: "403 AccessDenied".into(),
        };
        assert_eq!(check(denied), FailureKind::Fatal);
        let throttled = object_store::Error::Generic {
            store: "S3",
            source: "503 SlowDown".into(),
        };
        assert_eq!(check(throttled), FailureKind::Retryable);
    }

    fn touch(table: &LocalPath, relative: &str) {
        let path = table.join(relative);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("folder");
        std::fs::write(path, b"rows").expect("file");
    }

    /// A first attempt of `job_id`'s commit into `table` on `store`, as a
    /// test drives one: no lease, permission or guard, unpartitioned; on
    /// local disk when `location` is a path.
    fn test_commit(
        store: Arc<dyn ObjectStore>,
        location: String,
        table: Path,
        job_id: &str,
        insert_op: InsertOp,
    ) -> Commit {
        Commit {
            store,
            multipart: None,
            local: location.starts_with('/'),
            location,
            table,
            job_id: job_id.into(),
            insert_op,
            partitioned: false,
            partition_types: Vec::new(),
            file_schema: None,
            lease: None,
            permission: None,
            allowed_until: OnceLock::new(),
            known_commits: None,
            retry: false,
            counts: CommitCounts::default(),
        }
    }

    /// Such a commit into the local folder `table`.
    fn local_commit(table: &LocalPath, job_id: &str, insert_op: InsertOp) -> Commit {
        test_commit(
            Arc::new(object_store::local::LocalFileSystem::new()),
            table.display().to_string(),
            Path::from_filesystem_path(table).expect("path"),
            job_id,
            insert_op,
        )
    }

    /// What the write tasks return for `staged` files (their staged paths,
    /// and paths relative to the table), one row each.
    fn written_files(staged: Vec<String>, relatives: Vec<String>) -> SendableRecordBatchStream {
        use arrow::array::{StringArray, UInt64Array};

        let count = staged.len();
        let batch = RecordBatch::try_new(
            Arc::clone(&super::super::exec::WRITTEN_FILES_SCHEMA),
            vec![
                Arc::new(StringArray::from(staged)),
                Arc::new(StringArray::from(relatives)),
                Arc::new(UInt64Array::from(vec![1; count])),
                Arc::new(UInt64Array::from(vec![4; count])),
            ],
        )
        .expect("batch");
        Box::pin(RecordBatchStreamAdapter::new(
            batch.schema(),
            futures::stream::iter([Ok(batch)]),
        ))
    }

    /// Files below `table`, relative to it, sorted.
    fn files(table: &LocalPath) -> Vec<String> {
        fn walk(dir: &LocalPath, root: &LocalPath, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).expect("listing") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    walk(&path, root, found);
                } else {
                    let relative = path.strip_prefix(root).expect("below the root");
                    found.push(relative.display().to_string());
                }
            }
        }
        let mut found = Vec::new();
        walk(table, table, &mut found);
        found.sort();
        found
    }

    /// What [`manifest`] records of a write of one file.
    const ONE_FILE: Written = Written {
        rows: 1,
        files: 1,
        bytes: 4,
    };

    fn manifest(job_id: &str, mode: InsertOp, files: &[&str]) -> String {
        serde_json::json!({
            "job_id": job_id,
            "mode": mode.to_string(),
            "partitioned": true,
            "rows": 1,
            "files": files.iter().map(|path| serde_json::json!({
                "path": path, "rows": 1, "bytes": 4,
            })).collect::<Vec<_>>(),
        })
        .to_string()
    }

    /// Another writer's commit in progress (another cluster's: its files
    /// moved in, its manifest not yet written) is not this overwrite's to
    /// replace, nor is its manifest, written after the overwrite listed the
    /// table, its to retire. And a job that succeeded is never rolled back
    /// by its settling, even if its manifest went.
    #[tokio::test]
    async fn an_overwrite_keeps_what_another_writer_commits_meanwhile() {
        let dir = tempfile::tempdir().expect("temp");
        let table = dir.path();
        let old = "00000000000000a1";
        let racing = "00000000000000b2";
        let overwrite = "00000000000000c3";
        commit_staged(
            table,
            old,
            InsertOp::Append,
            &["p=1/part-00000000000000a1-00000-000.parquet"],
        )
        .await;
        // The racing append has moved its file in, and commits later.
        touch(table, &format!("p=1/part-{racing}-00000-000.parquet"));
        commit_staged(
            table,
            overwrite,
            InsertOp::Overwrite,
            &[&format!("p=1/part-{overwrite}-00000-000.parquet")],
        )
        .await;
        touch(table, &format!("_manifests/{racing}.json"));
        assert_eq!(
            files(table),
            vec![
                format!("_manifests/{racing}.json"),
                format!("_manifests/{overwrite}.json"),
                "_manifests/order/00000000000000000001.claim".to_owned(),
                format!("p=1/part-{racing}-00000-000.parquet"),
                format!("p=1/part-{overwrite}-00000-000.parquet"),
            ],
            "the old file and manifest went; the racing write's stayed"
        );

        // Quiver-named files copied without their manifests into a folder
        // with no commits are read as any writer's, so an overwrite
        // replaces them.
        let copied = tempfile::tempdir().expect("temp");
        let foreign = format!("p=1/part-{old}-00000-000.parquet");
        touch(copied.path(), &foreign);
        let first = "00000000000000d4";
        commit_staged(
            copied.path(),
            first,
            InsertOp::Overwrite,
            &[&format!("p=1/part-{first}-00000-000.parquet")],
        )
        .await;
        assert!(!copied.path().join(&foreign).exists(), "replaced");

        // Its manifest retired by a writer that did not know it, a job
        // that succeeded keeps its files when settled.
        std::fs::remove_file(table.join(format!("_manifests/{racing}.json"))).expect("retire");
        let url = format!("file://{}/", table.display());
        let stores = StoreRegistry::new();
        let settled = settle_write(
            &stores,
            &url,
            racing,
            JobEnded::Succeeded,
            FinishOverwrite::No,
        )
        .await
        .expect("settle");
        assert_eq!(settled, Settled::Committed { written: None });
        assert!(
            table
                .join(format!("p=1/part-{racing}-00000-000.parquet"))
                .exists()
        );
    }

    /// On an object store, which has no folders, the first write into a
    /// folder without manifests stays hidden from readers between moving
    /// its last file and writing its manifest: its staging folder is kept
    /// listed by a marker. The reader's state is read in that instant, when
    /// the overwrite first lists `_manifests/` after its moves.
    #[tokio::test]
    async fn a_first_write_stays_hidden_until_its_manifest_on_object_stores() {
        use std::sync::Mutex;

        use object_store::memory::InMemory;

        use crate::storage::forwarding::{Forwarding, StoreHooks};
        use crate::write::snapshot::CommittedFiles;

        const JOB: &str = "00000000000000e5";
        let file = Path::from(format!("t/part-{JOB}-00000-000.parquet"));

        /// Reads the state as a reader would, the first time the commit
        /// lists `_manifests/` after moving the file in.
        #[derive(Debug)]
        struct ReaderMidCommit {
            inner: Arc<dyn ObjectStore>,
            file: Path,
            shown: Arc<Mutex<Option<bool>>>,
        }
        impl StoreHooks for ReaderMidCommit {
            fn before(&self, location: &Path) {
                // The in-memory store answers at once: no runtime needed.
                let moved = futures::executor::block_on(self.inner.head(&self.file)).is_ok();
                let mut shown = self.shown.lock().expect("lock");
                if moved && shown.is_none() && location.as_ref().contains("_manifests") {
                    let table = Path::from("t");
                    let state =
                        futures::executor::block_on(CommittedFiles::read(&self.inner, &table))
                            .expect("state");
                    *shown = Some(state.shows(&self.file));
                }
            }
        }

        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let staged = Path::from(format!(
            "t/_temporary/{JOB}/p0-a0/part-{JOB}-00000-000.parquet"
        ));
        inner
            .put(&staged, PutPayload::from_static(b"rows"))
            .await
            .expect("stage");
        let shown = Arc::new(Mutex::new(None));
        let hooks = ReaderMidCommit {
            inner: Arc::clone(&inner),
            file: file.clone(),
            shown: Arc::clone(&shown),
        };
        let store: Arc<dyn ObjectStore> = Arc::new(Forwarding::new(Arc::clone(&inner), hooks));
        let input = written_files(
            vec![staged.to_string()],
            vec![format!("part-{JOB}-00000-000.parquet")],
        );
        let commit = test_commit(
            store,
            "memory:///t/".into(),
            Path::from("t"),
            JOB,
            InsertOp::Overwrite,
        );
        commit.run(input).await.expect("commit");
        assert_eq!(
            *shown.lock().expect("lock"),
            Some(false),
            "moved in, not yet committed: hidden"
        );
        let after = CommittedFiles::read(&inner, &Path::from("t"))
            .await
            .expect("state");
        assert!(after.shows(&file), "committed: shown");
        assert!(list(&inner, "t/_temporary").await.is_empty(), "marker gone");
    }

    /// Runs an action the first time a request reads or lists a location
    /// that `at` picks.
    struct RunOnce {
        at: Box<dyn Fn(&Path) -> bool + Send + Sync>,
        action: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    impl RunOnce {
        fn new(
            at: impl Fn(&Path) -> bool + Send + Sync + 'static,
            action: impl FnOnce() + Send + 'static,
        ) -> Self {
            Self {
                at: Box::new(at),
                action: std::sync::Mutex::new(Some(Box::new(action))),
            }
        }
    }

    impl fmt::Debug for RunOnce {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("RunOnce")
        }
    }

    impl crate::storage::forwarding::StoreHooks for RunOnce {
        fn before(&self, location: &Path) {
            if (self.at)(location)
                && let Some(action) = self.action.lock().expect("lock").take()
            {
                action();
            }
        }
    }

    /// An overwrite of `folder` in the in-memory table `t` by `job_id`, its
    /// one file staged in `inner`: the commit, on `store`, and its input.
    async fn staged_overwrite(
        store: Arc<dyn ObjectStore>,
        inner: &Arc<dyn ObjectStore>,
        job_id: &str,
        folder: &str,
    ) -> (Commit, SendableRecordBatchStream) {
        let relative = format!("{folder}/part-{job_id}-00000-000.parquet");
        let staged = Path::from(format!("t/_temporary/{job_id}/p0-a0/{relative}"));
        inner
            .put(&staged, PutPayload::from_static(b"rows"))
            .await
            .expect("stage");
        let mut commit = test_commit(
            store,
            "memory:///t/".into(),
            Path::from("t"),
            job_id,
            InsertOp::Overwrite,
        );
        commit.partitioned = true;
        let input = written_files(vec![staged.to_string()], vec![relative]);
        (commit, input)
    }

    /// Two overwrites from two clusters, which share no scheduler, each
    /// committing while the other does. Whatever the interleaving, a
    /// partition they both write ends with the rows of the overwrite that
    /// claimed its place last, never both, and neither fails. The second
    /// overwrite runs whole at one point of the first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_overwrites_of_a_partition_leave_one_writes_rows() {
        use object_store::memory::InMemory;

        use crate::storage::forwarding::Forwarding;
        use crate::write::snapshot::CommittedFiles;

        const OLD: &str = "00000000000000a1";
        const FIRST: &str = "00000000000000b2";
        const SECOND: &str = "00000000000000c3";
        const APPENDED: &str = "00000000000000d4";
        let file = |job: &str, folder: &str| format!("{folder}/part-{job}-00000-000.parquet");

        fn sorted(mut names: Vec<String>) -> Vec<String> {
            names.sort();
            names
        }

        /// The data files readers see, and those the store holds, sorted.
        async fn shown_and_held(store: &Arc<dyn ObjectStore>) -> (Vec<String>, Vec<String>) {
            let table = Path::from("t");
            let state = CommittedFiles::read(store, &table).await.expect("state");
            let held: Vec<Path> = list(store, "t")
                .await
                .into_iter()
                .filter(|path| !is_bookkeeping(&table, path))
                .collect();
            let name = |path: &Path| relative_to(&table, path).expect("below");
            let shown = held.iter().filter(|path| state.shows(path)).map(name);
            (
                sorted(shown.collect()),
                sorted(held.iter().map(name).collect()),
            )
        }

        /// Asserts that readers see `files` and that the store holds no
        /// other data file.
        async fn assert_left(store: &Arc<dyn ObjectStore>, files: Vec<String>) {
            let files = sorted(files);
            assert_eq!(shown_and_held(store).await, (files.clone(), files));
        }

        /// Commits an append of one file in `p=1` by `job`.
        async fn append(store: &Arc<dyn ObjectStore>, job: &str) {
            let file = format!("p=1/part-{job}-00000-000.parquet");
            let manifest = manifest(job, InsertOp::Append, &[file.as_str()]);
            for (path, body) in [
                (format!("t/{file}"), "rows".to_owned()),
                (format!("t/_manifests/{job}.json"), manifest),
            ] {
                store
                    .put(&Path::from(path), body.into())
                    .await
                    .expect("put");
            }
        }

        /// On a table holding one committed file in `p=1`, runs the first
        /// overwrite (of `first_folder`), with the second (of
        /// `second_folder`), then an append when `then_append`, run whole
        /// the first time the first reads or lists a location that `at`
        /// picks. Returns the store and the first overwrite's result.
        async fn race(
            first_folder: &str,
            second_folder: &str,
            at: fn(&Path) -> bool,
            then_append: bool,
        ) -> (Arc<dyn ObjectStore>, Result<RecordBatch>) {
            let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
            append(&inner, OLD).await;
            let (second, input) =
                staged_overwrite(Arc::clone(&inner), &inner, SECOND, second_folder).await;
            let store = Arc::clone(&inner);
            let hooks = RunOnce::new(at, move || {
                // The in-memory store answers at once: no runtime needed.
                futures::executor::block_on(async {
                    second.run(input).await.expect("the second overwrite");
                    if then_append {
                        append(&store, APPENDED).await;
                    }
                });
            });
            let store: Arc<dyn ObjectStore> = Arc::new(Forwarding::new(Arc::clone(&inner), hooks));
            let (first, input) = staged_overwrite(store, &inner, FIRST, first_folder).await;
            let result = first.run(input).await;
            (inner, result)
        }
        let before_claiming = |path: &Path| path.as_ref() == "t/_manifests/order";
        let before_listing = |path: &Path| path.as_ref() == "t/_manifests";
        let before_manifest = |path: &Path| path.as_ref().ends_with(".claim");

        // The second claims its place first, replaces the old file, and
        // keeps the first's, which has no claim yet. The first, later,
        // replaces both.
        let (store, first) = race("p=1", "p=1", before_claiming, false).await;
        first.expect("the first overwrite");
        assert_left(&store, vec![file(FIRST, "p=1")]).await;

        // The first has listed what it replaces, the old file, when the
        // second claims after it: the second replaces the first's files
        // too, although they are not committed yet, and the first commits
        // nothing that shows. (Without claims, both overwrites stood.)
        let (store, first) = race("p=1", "p=1", before_manifest, false).await;
        first.expect("the first overwrite");
        assert_left(&store, vec![file(SECOND, "p=1")]).await;

        // The second claims after the first, replaces the first's files,
        // and commits before the first lists the table; then a third
        // writer appends. The first replaces nothing in the second's
        // partition, as if it had committed before the second, which kept
        // the append. (Without that, the first deleted the append.)
        let (store, first) = race("p=1", "p=1", before_listing, true).await;
        first.expect("the first overwrite");
        assert_left(&store, vec![file(SECOND, "p=1"), file(APPENDED, "p=1")]).await;

        // Overwrites of other partitions do not conflict.
        let (store, first) = race("p=1", "p=2", before_listing, false).await;
        first.expect("the first overwrite");
        assert_left(&store, vec![file(FIRST, "p=1"), file(SECOND, "p=2")]).await;

        // The first claimed its place and its executor died; the second
        // claimed after it and committed. The first's retry keeps its place
        // but moves in a file (recomputed) that the second never listed: it
        // fails rather than stand beside the second's rows, and settling
        // rolls its file back. (Without that, both showed.)
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        append(&store, OLD).await;
        let folders = Some(vec!["p=1".to_owned()]);
        order::claim(&store, &Path::from("t"), FIRST, folders, false)
            .await
            .expect("claim");
        let marker = committing_marker(&Path::from("t"), FIRST);
        store.put(&marker, PutPayload::new()).await.expect("mark");
        let (second, input) = staged_overwrite(Arc::clone(&store), &store, SECOND, "p=1").await;
        second.run(input).await.expect("the second overwrite");
        let (mut retried, input) = staged_overwrite(Arc::clone(&store), &store, FIRST, "p=1").await;
        retried.retry = true;
        let error = retried
            .run(input)
            .await
            .expect_err("a conflict")
            .to_string();
        assert!(error.contains(&format!("after job {SECOND}")), "{error}");
        let (shown, _) = shown_and_held(&store).await;
        assert_eq!(shown, vec![file(SECOND, "p=1")]);
    }

    /// An append that another cluster moves in and commits after an
    /// overwrite listed the table, and before the overwrite retires the
    /// manifests of the jobs it replaced whole, keeps its manifest: the
    /// overwrite retires only jobs it saw committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_overwrite_retires_only_jobs_it_saw_committed() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        use object_store::memory::InMemory;

        use crate::storage::forwarding::Forwarding;
        use crate::write::snapshot::CommittedFiles;

        const OVERWRITE: &str = "00000000000000c3";
        const APPEND: &str = "00000000000000d4";
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let appended = Path::from(format!("t/p=1/part-{APPEND}-00000-000.parquet"));
        let append_manifest = Path::from(format!("t/_manifests/{APPEND}.json"));
        let listings = AtomicUsize::new(0);
        let store = Arc::clone(&inner);
        let (file, manifest_path) = (appended.clone(), append_manifest.clone());
        let body = manifest(
            APPEND,
            InsertOp::Append,
            &[&format!("p=1/part-{APPEND}-00000-000.parquet")],
        );
        // The overwrite lists `_manifests/` to read the table's state, then,
        // after its manifest, to retire what it replaced whole.
        let hooks = RunOnce::new(
            move |path| {
                path.as_ref() == "t/_manifests" && listings.fetch_add(1, Ordering::SeqCst) == 1
            },
            move || {
                futures::executor::block_on(async {
                    store.put(&file, PutPayload::from_static(b"rows")).await?;
                    store.put(&manifest_path, body.into()).await
                })
                .expect("the append commits");
            },
        );
        let hooked: Arc<dyn ObjectStore> = Arc::new(Forwarding::new(Arc::clone(&inner), hooks));
        let (overwrite, input) = staged_overwrite(hooked, &inner, OVERWRITE, "p=1").await;
        overwrite.run(input).await.expect("the overwrite");

        assert!(
            get_if_exists(&inner, &append_manifest)
                .await
                .expect("get")
                .is_some()
        );
        let state = CommittedFiles::read(&inner, &Path::from("t"))
            .await
            .expect("state");
        assert!(state.shows(&appended), "the append stays committed");
    }

    /// A store that behaves as another one does, but for one way.
    #[derive(Debug)]
    struct Quirky(Arc<dyn ObjectStore>, Quirk);

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Quirk {
        /// Its rename will not replace a file, as object_store 0.13's GCS:
        /// it copies with a create-only condition, then deletes.
        CreateOnlyRenames,
        /// It refuses every deletion, as for keys that may only read and
        /// write.
        RefusesDeletes,
    }

    impl fmt::Display for Quirky {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{:?}({})", self.1, self.0)
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Quirky {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            self.0.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.0.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &Path,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.0.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<Path>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<Path>> {
            if self.1 != Quirk::RefusesDeletes {
                return self.0.delete_stream(locations);
            }
            locations
                .map(|location| {
                    Err(object_store::Error::PermissionDenied {
                        path: location?.to_string(),
                        source: "deletes are refused".into(),
                    })
                })
                .boxed()
        }

        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.0.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.0.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &Path,
            to: &Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.0.copy_opts(from, to, options).await
        }

        async fn rename_opts(
            &self,
            from: &Path,
            to: &Path,
            options: object_store::RenameOptions,
        ) -> object_store::Result<()> {
            if self.1 != Quirk::CreateOnlyRenames {
                return self.0.rename_opts(from, to, options).await;
            }
            let create = object_store::CopyOptions::new().with_mode(object_store::CopyMode::Create);
            self.0.copy_opts(from, to, create).await?;
            self.0.delete(from).await
        }
    }

    /// A commit run again after an earlier run copied a file in and died
    /// before it deleted the staged copy, on a store whose rename will not
    /// replace a file: the file counts as moved, its staged copy goes, and
    /// the commit finishes.
    #[tokio::test]
    async fn a_commit_run_again_finishes_on_a_store_whose_rename_will_not_replace() {
        use object_store::memory::InMemory;

        use crate::write::snapshot::CommittedFiles;

        const JOB: &str = "00000000000000f6";
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let relative = format!("part-{JOB}-00000-000.parquet");
        let staged = Path::from(format!("t/_temporary/{JOB}/p0-a0/{relative}"));
        let committed = Path::from(format!("t/{relative}"));
        for path in [&staged, &committed] {
            inner
                .put(path, PutPayload::from_static(b"rows"))
                .await
                .expect("put");
        }
        let store: Arc<dyn ObjectStore> =
            Arc::new(Quirky(Arc::clone(&inner), Quirk::CreateOnlyRenames));
        let mut commit = test_commit(
            store,
            "memory:///t/".into(),
            Path::from("t"),
            JOB,
            InsertOp::Append,
        );
        commit.retry = true;
        let input = written_files(vec![staged.to_string()], vec![relative]);
        commit.run(input).await.expect("the commit finishes");
        let state = CommittedFiles::read(&inner, &Path::from("t"))
            .await
            .expect("state");
        assert!(state.shows(&committed), "committed: shown");
        assert!(
            list(&inner, "t/_temporary").await.is_empty(),
            "staged copy gone"
        );
    }

    /// Settling a committed write whose staging folder the store will not
    /// delete still tells that it committed, and that the folder is left:
    /// a clean-up must know to try again.
    #[tokio::test]
    async fn a_committed_write_whose_staging_folder_stays_says_so() {
        use object_store::memory::InMemory;

        const JOB: &str = "00000000000000f7";
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let relative = format!("part-{JOB}-00000-000.parquet");
        let manifest = manifest(JOB, InsertOp::Append, &[&relative]);
        for (path, contents) in [
            (format!("t/{relative}"), "rows".to_owned()),
            (format!("t/_manifests/{JOB}.json"), manifest),
            (
                format!("t/_temporary/{JOB}/p0-a1/{relative}"),
                "lost".into(),
            ),
        ] {
            inner
                .put(&Path::from(path), PutPayload::from(contents))
                .await
                .expect("put");
        }
        let settle = |quirk: Option<Quirk>| {
            let store = match quirk {
                Some(quirk) => Arc::new(Quirky(Arc::clone(&inner), quirk)) as _,
                None => Arc::clone(&inner),
            };
            let commit = Commit::settling(
                store,
                None,
                false,
                "memory:///t/",
                Path::from("t"),
                JOB,
                None,
            );
            async move {
                commit
                    .settle(JobEnded::Succeeded, FinishOverwrite::No)
                    .await
                    .expect("settled")
            }
        };
        let written = Some(Written {
            rows: 1,
            files: 1,
            bytes: 4,
        });
        let (settled, staging) = settle(Some(Quirk::RefusesDeletes)).await;
        assert_eq!(settled, Settled::Committed { written });
        assert_eq!(staging, Staging::Left);
        assert_eq!(list(&inner, "t/_temporary").await.len(), 1);

        let (settled, staging) = settle(None).await;
        assert_eq!(settled, Settled::Committed { written });
        assert_eq!(staging, Staging::Deleted);
        assert!(list(&inner, "t/_temporary").await.is_empty());
    }

    async fn list(store: &Arc<dyn ObjectStore>, prefix: &str) -> Vec<Path> {
        store
            .list(Some(&Path::from(prefix)))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await
            .expect("list")
    }

    #[tokio::test]
    async fn an_unfinished_commit_is_rolled_back_and_a_committed_one_stands() {
        let dir = tempfile::tempdir().expect("temp");
        let table = dir.path();
        let url = format!("file://{}/", table.display());
        let stores = StoreRegistry::new();
        touch(table, "region=EU/part-old-00000-000.parquet");
        // Job 1 died midway through moving its files in: one made it.
        touch(table, "region=EU/part-job1-00000-000.parquet");
        touch(
            table,
            "_temporary/job1/p1-a0/region=US/part-job1-00001-000.parquet",
        );

        let settled = settle_write(
            &stores,
            &url,
            "job1",
            JobEnded::Otherwise,
            FinishOverwrite::Yes,
        )
        .await
        .expect("settle");
        assert_eq!(settled, Settled::RolledBack { files: 1 });
        assert_eq!(files(table), vec!["region=EU/part-old-00000-000.parquet"]);

        // Job 2, an overwrite of region=EU, wrote its manifest and stopped
        // before deleting the files it replaces.
        touch(table, "region=US/part-old-00001-000.parquet");
        touch(table, "region=EU/part-job2-00000-000.parquet");
        let written = ["region=EU/part-job2-00000-000.parquet"];
        std::fs::create_dir_all(table.join("_manifests")).expect("folder");
        std::fs::write(
            table.join("_manifests/job2.json"),
            manifest("job2", InsertOp::Overwrite, &written),
        )
        .expect("manifest");
        touch(
            table,
            "_temporary/job2/p0-a1/region=EU/part-job2-00000-000.parquet",
        );

        // While other writers may run, the replaced files are left alone.
        let settled = settle_write(
            &stores,
            &url,
            "job2",
            JobEnded::Otherwise,
            FinishOverwrite::No,
        )
        .await
        .expect("settle");
        assert_eq!(
            settled,
            Settled::Committed {
                written: Some(ONE_FILE)
            }
        );
        assert_eq!(files(table).len(), 4, "{:?}", files(table));
        assert!(!table.join("_temporary/job2").exists());

        let settled = settle_write(
            &stores,
            &url,
            "job2",
            JobEnded::Otherwise,
            FinishOverwrite::Yes,
        )
        .await
        .expect("settle");
        assert_eq!(
            settled,
            Settled::Committed {
                written: Some(ONE_FILE)
            }
        );
        assert_eq!(
            files(table),
            vec![
                "_manifests/job2.json",
                "region=EU/part-job2-00000-000.parquet",
                "region=US/part-old-00001-000.parquet",
            ]
        );
        // Settling is repeatable.
        let again = settle_write(
            &stores,
            &url,
            "job2",
            JobEnded::Otherwise,
            FinishOverwrite::Yes,
        )
        .await
        .expect("settle");
        assert_eq!(
            again,
            Settled::Committed {
                written: Some(ONE_FILE)
            }
        );
        assert_eq!(files(table).len(), 3);

        std::fs::write(table.join("_manifests/job3.json"), b"{").expect("manifest");
        let error = settle_write(
            &stores,
            &url,
            "job3",
            JobEnded::Otherwise,
            FinishOverwrite::Yes,
        )
        .await
        .expect_err("a broken manifest is an error");
        assert!(error.to_string().contains("job3"), "{error}");

        // A commit frozen past its lease puts its manifest after its write
        // was rolled back: settled again, its manifest goes.
        std::fs::remove_file(table.join("_manifests/job3.json")).expect("remove");
        let late = ["region=EU/part-job4-00000-000.parquet"];
        std::fs::write(
            table.join("_manifests/job4.json"),
            manifest("job4", InsertOp::Append, &late),
        )
        .expect("manifest");
        let settle_job4 = |ended| settle_write(&stores, &url, "job4", ended, FinishOverwrite::Yes);
        assert_eq!(
            settle_job4(JobEnded::Otherwise).await.expect("settle"),
            Settled::RolledBack { files: 0 }
        );
        assert_eq!(files(table).len(), 3, "{:?}", files(table));
        // Not while a file it names is there.
        touch(table, late[0]);
        std::fs::write(
            table.join("_manifests/job4.json"),
            manifest("job4", InsertOp::Append, &late),
        )
        .expect("manifest");
        assert_eq!(
            settle_job4(JobEnded::Otherwise).await.expect("settle"),
            Settled::Committed {
                written: Some(ONE_FILE)
            }
        );
        assert_eq!(files(table).len(), 5, "{:?}", files(table));
    }

    /// A commit task lost after its manifest is retried: the retry neither
    /// reads its input (the write tasks would be recomputed from files the
    /// overwrite deleted) nor fails, but finishes the deletions and returns
    /// the rows the manifest records. The manifests of writes it replaced
    /// whole go too.
    #[tokio::test]
    async fn a_retried_commit_finishes_from_its_manifest_without_reading_its_input() {
        let dir = tempfile::tempdir().expect("temp");
        let table = dir.path();
        touch(table, "region=EU/part-old-00000-000.parquet");
        touch(table, "region=US/part-old-00001-000.parquet");
        // Job two wrote to region=EU only: the overwrite leaves it no file.
        touch(table, "region=EU/part-two-00000-000.parquet");
        touch(table, "region=EU/part-job1-00000-000.parquet");
        touch(
            table,
            "_temporary/job1/p0-a0/region=EU/part-job1-00000-001.parquet",
        );
        std::fs::create_dir_all(table.join("_manifests")).expect("folder");
        for (job, files) in [
            (
                "old",
                &[
                    "region=EU/part-old-00000-000.parquet",
                    "region=US/part-old-00001-000.parquet",
                ][..],
            ),
            ("two", &["region=EU/part-two-00000-000.parquet"][..]),
        ] {
            std::fs::write(
                table.join(format!("_manifests/{job}.json")),
                manifest(job, InsertOp::Append, files),
            )
            .expect("manifest");
        }
        // A list that job two, cancelled after its manifest, left behind.
        std::fs::write(table.join("_manifests/two.replaces"), "[]").expect("list");
        // It listed what it replaces; another engine has written to
        // region=EU since, and that file stays.
        touch(table, "region=EU/part-00000-later-c000.parquet");
        let listed = manifest(
            "job1",
            InsertOp::Overwrite,
            &["region=EU/part-job1-00000-000.parquet"],
        )
        .replacen('{', r#"{"replaced_list": true, "#, 1);
        std::fs::write(table.join("_manifests/job1.json"), listed).expect("manifest");
        std::fs::write(
            table.join("_manifests/job1.replaces"),
            r#"["region=EU/part-old-00000-000.parquet", "region=EU/part-two-00000-000.parquet"]"#,
        )
        .expect("list of replaced files");
        let mut commit = local_commit(table, "job1", InsertOp::Overwrite);
        commit.partitioned = true;
        commit.known_commits = Some(Arc::new(KnownCommits::default()));
        commit.retry = true;
        let unreadable = futures::stream::once(async {
            Err(DataFusionError::Execution(
                "the commit read its input".into(),
            ))
        });
        let input = Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&super::super::exec::WRITTEN_FILES_SCHEMA),
            unreadable,
        ));

        let result = commit.run(input).await.expect("the write had committed");
        let rows = result.column(0).as_primitive::<UInt64Type>().value(0);
        assert_eq!(rows, 1, "the manifest's row count");
        assert_eq!(
            files(table),
            vec![
                "_manifests/job1.json",
                "_manifests/old.json",
                "region=EU/part-00000-later-c000.parquet",
                "region=EU/part-job1-00000-000.parquet",
                "region=US/part-old-00001-000.parquet",
            ],
            "the replaced files, their list, and the manifest and list of job two are gone"
        );
    }

    /// A commit on an executor whose lease ran out (it may have been declared
    /// lost, and its commit given to another executor) changes nothing.
    #[tokio::test]
    async fn a_commit_whose_lease_ran_out_changes_nothing() {
        use std::time::Duration;

        use crate::lease::LeaseTime;

        let dir = tempfile::tempdir().expect("temp");
        let table = dir.path();
        let staged = "_temporary/job1/p0-a0/region=EU/part-job1-00000-000.parquet";
        touch(table, staged);
        let table_path = Path::from_filesystem_path(table).expect("path");
        let commit = |lease| Commit {
            partitioned: true,
            lease: Some(lease),
            ..local_commit(table, "job1", InsertOp::Append)
        };
        let file_list = || {
            written_files(
                vec![join(&table_path, staged).expect("path").to_string()],
                vec!["region=EU/part-job1-00000-000.parquet".to_owned()],
            )
        };

        let error = commit(Lease::until(LeaseTime::now()))
            .run(file_list())
            .await
            .expect_err("an expired lease stops the commit");
        assert!(error.to_string().contains("lease"), "{error}");
        assert_eq!(files(table), vec![staged]);

        let rows = commit(Lease::until(LeaseTime::now() + Duration::from_secs(60)))
            .run(file_list())
            .await
            .expect("a commit under a valid lease");
        assert_eq!(rows.num_rows(), 1);
        assert_eq!(
            files(table),
            vec![
                "_manifests/job1.json",
                "region=EU/part-job1-00000-000.parquet"
            ]
        );
    }

    /// Allows every commit to act until its time.
    #[derive(Debug)]
    struct AllowsUntil(LeaseTime);

    #[async_trait::async_trait]
    impl super::super::permission::CommitAuthority for AllowsUntil {
        async fn allow(&self, _finishes: bool) -> std::result::Result<Option<LeaseTime>, String> {
            Ok(Some(self.0))
        }
    }

    /// A commit acts only for the time its permission gives: one allowed
    /// no time changes nothing, and a step that hangs past it is dropped.
    #[tokio::test]
    async fn a_commit_acts_only_for_the_time_it_was_allowed() {
        use std::time::Duration;

        let dir = tempfile::tempdir().expect("temp");
        let table = dir.path();
        let staged = "_temporary/job1/p0-a0/part-job1-00000-000.parquet";
        touch(table, staged);
        let table_path = Path::from_filesystem_path(table).expect("path");
        let commit = |until| Commit {
            permission: Some(Arc::new(CommitPermission(Arc::new(AllowsUntil(until))))),
            ..local_commit(table, "job1", InsertOp::Append)
        };
        let file_list = || {
            written_files(
                vec![join(&table_path, staged).expect("path").to_string()],
                vec!["part-job1-00000-000.parquet".to_owned()],
            )
        };

        let error = commit(LeaseTime::now())
            .run(file_list())
            .await
            .expect_err("no time to act");
        assert!(
            error.to_string().contains("--commit-timeout-secs"),
            "{error}"
        );
        assert_eq!(files(table), vec![staged]);

        let hung = commit(LeaseTime::now() + Duration::from_millis(100));
        hung.ask_to_commit(false).await.expect("allowed");
        let error = hung
            .within_allowed_time(std::future::pending::<Result<()>>())
            .await
            .expect_err("a hung step is dropped");
        assert!(
            error.to_string().contains("--commit-timeout-secs"),
            "{error}"
        );

        let rows = commit(LeaseTime::now() + Duration::from_secs(60))
            .run(file_list())
            .await
            .expect("a commit with time to act");
        assert_eq!(rows.num_rows(), 1);
        assert_eq!(
            files(table),
            vec!["_manifests/job1.json", "part-job1-00000-000.parquet"]
        );
    }

    /// Commits `staged` (relative to `table`, under this job's staging
    /// folder) as job `job_id`, as its commit task would.
    async fn commit_staged(table: &LocalPath, job_id: &str, op: InsertOp, staged: &[&str]) {
        try_commit_staged(table, job_id, op, staged, None)
            .await
            .expect("commit");
    }

    /// [`commit_staged`], its staged files last changed at `written` if
    /// given; returns how the commit ended.
    async fn try_commit_staged(
        table: &LocalPath,
        job_id: &str,
        op: InsertOp,
        staged: &[&str],
        written: Option<SystemTime>,
    ) -> Result<RecordBatch> {
        let table_path = Path::from_filesystem_path(table).expect("path");
        let mut paths = Vec::new();
        let mut relatives = Vec::new();
        for relative in staged {
            let staged = format!("_temporary/{job_id}/p0-a0/{relative}");
            touch(table, &staged);
            if let Some(written) = written {
                set_modified(&table.join(&staged), written);
            }
            paths.push(join(&table_path, &staged).expect("path").to_string());
            relatives.push(relative.to_string());
        }
        let mut commit = local_commit(table, job_id, op);
        commit.partitioned = true;
        commit.run(written_files(paths, relatives)).await
    }

    fn set_modified(path: &LocalPath, time: SystemTime) {
        std::fs::File::options()
            .write(true)
            .open(path)
            .and_then(|file| file.set_modified(time))
            .expect("set the file's time");
    }

    /// A commit does not move in files staged more than half a day ago: by
    /// a day, a later commit's sweep may delete them while it does. Files
    /// staged a little earlier are committed.
    #[tokio::test]
    async fn a_commit_refuses_files_staged_more_than_half_a_day_ago() {
        let dir = tempfile::tempdir().expect("temp");
        let table = dir.path();
        let hours_ago = |hours: u64| SystemTime::now() - Duration::from_secs(hours * 3600);
        let stale = "00000000000000e1";
        let name = format!("p=1/part-{stale}-00000-000.parquet");
        let error = try_commit_staged(
            table,
            stale,
            InsertOp::Append,
            &[&name],
            Some(hours_ago(13)),
        )
        .await
        .expect_err("staged 13 hours ago");
        assert!(error.to_string().contains("13 hours ago"), "{error}");
        assert_eq!(
            files(table),
            vec![format!("_temporary/{stale}/p0-a0/{name}")],
            "nothing moved in"
        );

        let recent = "00000000000000e2";
        let name = format!("p=1/part-{recent}-00000-000.parquet");
        try_commit_staged(
            table,
            recent,
            InsertOp::Append,
            &[&name],
            Some(hours_ago(11)),
        )
        .await
        .expect("staged 11 hours ago");
        assert!(files(table).contains(&name));
    }

    /// A commit settles the writes of jobs whose staging folders nobody
    /// touched for a day, as their clusters would have: one that did not
    /// commit is rolled back, one that did keeps its files. A job staging
    /// files now is left alone.
    #[tokio::test]
    async fn a_commit_settles_the_writes_of_jobs_abandoned_for_a_day() {
        let dir = tempfile::tempdir().expect("temp");
        let table = dir.path();
        let (unfinished, committed, running) =
            ("000000000000000a", "000000000000000b", "000000000000000c");
        let data = |job: &str| format!("p=1/part-{job}-00000-000.parquet");
        for job in [unfinished, committed, running] {
            touch(table, &data(job));
            touch(table, &format!("_temporary/{job}/_committing"));
            touch(
                table,
                &format!("_temporary/{job}/p1-a0/p=2/part-{job}-00001-000.parquet"),
            );
        }
        std::fs::create_dir_all(table.join("_manifests")).expect("folder");
        std::fs::write(
            table.join(format!("_manifests/{committed}.json")),
            manifest(committed, InsertOp::Append, &[&data(committed)]),
        )
        .expect("manifest");
        // Another engine's staging folder of the same name is not Quiver's to settle.
        let foreign = "_temporary/0/part-00000.parquet";
        touch(table, foreign);
        let two_days_ago = SystemTime::now() - Duration::from_secs(172_800);
        set_modified(&table.join(foreign), two_days_ago);
        for job in [unfinished, committed] {
            for relative in files(&table.join(format!("_temporary/{job}"))) {
                set_modified(
                    &table.join(format!("_temporary/{job}/{relative}")),
                    two_days_ago,
                );
            }
        }

        let new = "00000000000000d1";
        commit_staged(table, new, InsertOp::Append, &[&data(new)]).await;
        assert_eq!(
            files(table),
            vec![
                format!("_manifests/{committed}.json"),
                format!("_manifests/{new}.json"),
                foreign.to_owned(),
                format!("_temporary/{running}/_committing"),
                format!("_temporary/{running}/p1-a0/p=2/part-{running}-00001-000.parquet"),
                data(committed),
                data(running),
                data(new),
            ]
        );
    }

    /// Appends leave a manifest each; once enough of them are finished, a
    /// commit folds them into one file. Their writes stay committed for
    /// readers, for guards and for settling; an overwrite that leaves
    /// folded jobs without a file takes them out of the folded file.
    #[tokio::test]
    async fn finished_manifests_are_folded_and_their_writes_stay_committed() {
        use super::super::fold::{FOLD_AT, FOLDED_PREFIX, FoldedJobs};
        use super::super::snapshot::CommittedFiles;

        let dir = tempfile::tempdir().expect("temp");
        let table = dir.path();
        let table_path = Path::from_filesystem_path(table).expect("path");
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::local::LocalFileSystem::new());
        let appends: Vec<String> = (0..FOLD_AT).map(|n| format!("{n:016x}")).collect();
        let data = |job: &str| {
            let region = if job.ends_with(['0', '2', '4', '6', '8']) {
                "EU"
            } else {
                "US"
            };
            format!("region={region}/part-{job}-00000-000.parquet")
        };
        for job in &appends {
            commit_staged(table, job, InsertOp::Append, &[&data(job)]).await;
        }
        let manifests = |table: &LocalPath| -> Vec<String> {
            files(table)
                .into_iter()
                .filter_map(|file| file.strip_prefix("_manifests/").map(str::to_owned))
                .collect()
        };
        assert_eq!(manifests(table).len(), FOLD_AT, "one short of a fold");
        let before = CommittedFiles::read(&store, &table_path)
            .await
            .expect("read");

        // The next commit folds every other finished manifest.
        let last = "00000000000000ff";
        commit_staged(table, last, InsertOp::Append, &[&data(last)]).await;
        let left = manifests(table);
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(left[0], format!("{last}.json"));
        assert!(
            left[1].starts_with(&format!("{FOLDED_PREFIX}{last}-")),
            "{left:?}"
        );
        let folded = FoldedJobs::read(&store, &table_path).await.expect("folded");
        assert_eq!(folded.jobs().count(), FOLD_AT);
        assert!(appends.iter().all(|job| folded.appended(job) == Some(true)));
        let after = CommittedFiles::read(&store, &table_path)
            .await
            .expect("read");
        for job in appends.iter().map(String::as_str).chain([last]) {
            let file = join(&table_path, &data(job)).expect("path");
            assert!(after.shows(&file), "{job}");
        }
        // A guard planned before the fold finds the job that folded them.
        let now = KnownCommits::read(&store, &table_path).await.expect("jobs");
        assert_eq!(now, after.known_commits());
        assert_eq!(now.manifests, [last]);
        let planned = before.known_commits();
        assert_eq!(planned.manifests.len(), FOLD_AT);
        assert_eq!(now.committed_since(&planned, "another"), Some(last));
        assert!(
            before.is_current(&store, &table_path).await.expect("check"),
            "a fold and an append change nothing a reader relied on"
        );
        // Settling a folded job (its clean-up may run after a later write
        // folded it) keeps its write.
        let url = format!("file://{}/", table.display());
        let settled = settle_write(
            &StoreRegistry::new(),
            &url,
            &appends[0],
            JobEnded::Otherwise,
            FinishOverwrite::No,
        )
        .await
        .expect("settle");
        assert_eq!(settled, Settled::Committed { written: None });
        assert!(table.join(data(&appends[0])).exists());

        // An overwrite of region=EU leaves the jobs that wrote only there
        // without a file: they leave the folded file.
        let overwrite = "0000000000000abc";
        commit_staged(
            table,
            overwrite,
            InsertOp::Overwrite,
            &[&format!("region=EU/part-{overwrite}-00000-000.parquet")],
        )
        .await;
        let folded = FoldedJobs::read(&store, &table_path).await.expect("folded");
        let us: Vec<&str> = appends
            .iter()
            .map(String::as_str)
            .filter(|job| data(job).contains("US"))
            .collect();
        assert_eq!(folded.jobs().collect::<Vec<_>>(), us);
        assert!(
            !before.is_current(&store, &table_path).await.expect("check"),
            "the overwrite deleted files the old state shows"
        );
    }
}
