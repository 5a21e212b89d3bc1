//! Settling a write once its job has ended: what the job's commit left in
//! the table is made whole or taken away again ([`settle_write`]).
//!
//! The scheduler settles each write job's table when the job ends, however
//! it ended: without the job's manifest, the files its commit moved in are
//! deleted again, so readers never keep part of a write; with it, an
//! interrupted overwrite's deletions are finished. A write that no
//! scheduler settles (its cluster was destroyed and never came back) is
//! settled by a later commit into the table, which sweeps the staging
//! folders untouched for [`ABANDONED_AFTER`]
//! ([`Commit::settle_abandoned_jobs`]).

use std::sync::{Arc, OnceLock};

use datafusion::datasource::listing::ListingTableUrl;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::ObjectStoreRegistry;
use datafusion::logical_expr::dml::InsertOp;
use futures::TryStreamExt;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use tracing::{info, warn};

use super::{Commit, CommitCounts, Manifest};
use crate::lease::Lease;
use crate::storage::StoreRegistry;
use crate::write::fold::FoldedJobs;
use crate::write::layout::{ABANDONED_AFTER, is_job_id, job_staging, manifest as manifest_path};
use crate::write::snapshot::staging_jobs;

/// Abandoned writes of other jobs that one commit settles at most (see
/// [`Commit::settle_abandoned_jobs`]).
const ABANDONED_PER_COMMIT: usize = 4;

/// How [`settle_write`] left a write job that ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The job's manifest exists, or a later write folded it: its write
    /// stands. `written` is what its manifest records; `None` once the
    /// manifest is folded or retired, which keep no count.
    Committed { written: Option<Written> },
    /// No manifest: the job's files that were moved in (`files` of them) are gone.
    RolledBack { files: usize },
}

/// What a committed write's manifest records that it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub rows: u64,
    pub files: u64,
    pub bytes: u64,
}

/// How the job whose write [`settle_write`] settles ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnded {
    /// Its commit wrote its manifest: nothing of its write is rolled back,
    /// even if the manifest is gone (another writer's overwrite retired it).
    Succeeded,
    /// Failed, cancelled, or interrupted by a scheduler restart.
    Otherwise,
}

/// Whether [`settle_write`] may finish a committed overwrite's deletions.
/// Only safe while no other job can write the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishOverwrite {
    Yes,
    No,
}

/// Whether settling a write left its job's staging folder (see
/// [`settle_write_and_staging`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staging {
    Deleted,
    /// A committed write's folder, which the store would not delete; its
    /// files are the losing attempts', which readers skip.
    Left,
}

/// Settles the write of job `job_id` into the table at `table_url` after the
/// job ended, however it ended, and deletes its staging folder. Repeatable.
///
/// A job whose commit never wrote its manifest is rolled back: files it moved
/// into the table are deleted, so a commit that died midway and was not
/// retried leaves nothing visible. A committed overwrite that stopped before
/// deleting the replaced files has them deleted when `finish` says so.
///
/// Once the outcome is known, a failure to delete a committed write's
/// staging folder is only logged; [`settle_write_and_staging`] says it.
pub async fn settle_write(
    stores: &StoreRegistry,
    table_url: &str,
    job_id: &str,
    ended: JobEnded,
    finish: FinishOverwrite,
) -> Result<Settled> {
    let (settled, _) = settle_write_and_staging(stores, table_url, job_id, ended, finish).await?;
    Ok(settled)
}

/// As [`settle_write`], and whether the job's staging folder is gone: for a
/// clean-up that must know if anything is left to try again.
pub async fn settle_write_and_staging(
    stores: &StoreRegistry,
    table_url: &str,
    job_id: &str,
    ended: JobEnded,
    finish: FinishOverwrite,
) -> Result<(Settled, Staging)> {
    let table = ListingTableUrl::parse(table_url)?;
    let store_url = table.object_store();
    let commit = Commit::settling(
        stores.get_store(store_url.as_ref())?,
        stores.multipart_store(store_url.as_ref())?,
        table.scheme() == "file",
        table_url,
        table.prefix().clone(),
        job_id,
        None,
    );
    commit.settle(ended, finish).await
}

impl Commit {
    /// A commit that only settles the write of `job_id` (see
    /// [`settle_write`]): it knows nothing of the job's plan.
    pub(super) fn settling(
        store: Arc<dyn ObjectStore>,
        multipart: Option<Arc<dyn MultipartStore>>,
        local: bool,
        location: &str,
        table: Path,
        job_id: &str,
        lease: Option<Arc<Lease>>,
    ) -> Self {
        Self {
            store,
            multipart,
            local,
            location: location.to_owned(),
            table,
            job_id: job_id.to_owned(),
            insert_op: InsertOp::Append,
            partitioned: false,
            partition_types: Vec::new(),
            file_schema: None,
            lease,
            permission: None,
            allowed_until: OnceLock::new(),
            known_commits: None,
            retry: false,
            counts: CommitCounts::default(),
        }
    }

    /// Settles this job's write: see [`settle_write_and_staging`].
    pub(super) async fn settle(
        &self,
        ended: JobEnded,
        finish: FinishOverwrite,
    ) -> Result<(Settled, Staging)> {
        let job_id = self.job_id.as_str();
        // Once the outcome is known, a failure to tidy up after it only leaves
        // garbage that readers skip: it is logged, and the outcome returned.
        let tidy = |step: &str, result: Result<()>| {
            if let Err(e) = result {
                let e = crate::storage::redacted_error(&e);
                warn!(%job_id, location = %self.location, %e, "settling a write could not {step}");
            }
        };
        let settled = match self.read_manifest().await? {
            Some(manifest)
                if ended == JobEnded::Otherwise && self.lost_every_file(&manifest).await =>
            {
                // A commit frozen past its lease (a paused process) put this
                // manifest after its write was rolled back: it names files
                // that are gone, and it goes too.
                warn!(%job_id, location = %self.location,
                    "deleting the manifest that a commit wrote after its write was rolled back");
                self.delete_all(vec![manifest_path(&self.table, job_id)])
                    .await?;
                self.delete_replaced_list().await?;
                Settled::RolledBack { files: 0 }
            }
            Some(manifest) => {
                if finish == FinishOverwrite::Yes {
                    tidy(
                        "finish the deletions of its overwrite",
                        self.finish_replacing(&manifest).await,
                    );
                }
                Settled::Committed {
                    written: Some(manifest.written()),
                }
            }
            // A later write folded its manifest: it had finished.
            None if FoldedJobs::read(&self.store, &self.table)
                .await?
                .contains(job_id) =>
            {
                Settled::Committed { written: None }
            }
            // A later overwrite that replaced all of its files retires its
            // manifest; with files left, it was retired by mistake.
            None if ended == JobEnded::Succeeded => {
                let left = self
                    .files_of_this_job()
                    .await
                    .map_or(0, |files| files.len());
                if left > 0 {
                    warn!(%job_id, location = %self.location, files = left,
                        "a job that committed has no manifest left, but has files: they stay, \
                         but Quiver's readers hide them");
                }
                Settled::Committed { written: None }
            }
            None => {
                let moved_in = self.files_of_this_job().await?;
                let files = moved_in.len();
                self.delete_all(moved_in.into_iter().map(|(path, _)| path).collect())
                    .await?;
                self.delete_replaced_list().await?;
                if files > 0 {
                    info!(%job_id, location = %self.location, files,
                        "rolled back the files of a commit that did not finish");
                }
                Settled::RolledBack { files }
            }
        };
        let staging = match settled {
            // A job's files stay hidden while its staging folder is there (in
            // a table without manifests), so it goes only after them.
            Settled::RolledBack { .. } => {
                self.delete_staging().await?;
                Staging::Deleted
            }
            Settled::Committed { .. } => {
                let deleted = self.delete_staging().await;
                let staging = match deleted {
                    Ok(()) => Staging::Deleted,
                    Err(_) => Staging::Left,
                };
                tidy("delete its staging folder", deleted);
                staging
            }
        };
        Ok((settled, staging))
    }

    /// Whether `manifest`, of this job, names files and none of them is in
    /// the table any more: asked file by file, up to the first one found.
    /// A file that cannot be asked about counts as there.
    pub(super) async fn lost_every_file(&self, manifest: &Manifest) -> bool {
        for file in &manifest.files {
            let Ok(path) = self.committed_path(&file.path) else {
                return false;
            };
            match self.store.head(&path).await {
                Err(object_store::Error::NotFound { .. }) => {}
                _ => return false,
            }
        }
        !manifest.files.is_empty()
    }

    /// Settles the writes of other jobs whose staging folder nobody has
    /// touched for [`ABANDONED_AFTER`]: their clusters went without settling
    /// them (a scheduler that never came back, a clean-up the store
    /// refused). As after a failed job, what they moved in without a
    /// manifest goes, with their staging folders and unfinished uploads. A
    /// job still alive cannot be among them: its commit would not use files
    /// staged that long ago ([`STALE_STAGING_AFTER`]), and once it marks
    /// its folder, the folder is not untouched. At most
    /// [`ABANDONED_PER_COMMIT`] are settled, so that a table with many
    /// does not hold this commit up; a failure is logged, and the next
    /// commit tries again.
    pub(super) async fn settle_abandoned_jobs(&self) {
        let others = match staging_jobs(&self.store, &self.table).await {
            Ok(others) => others,
            Err(error) => return self.warn_unsettled(None, &error),
        };
        let mut settled = 0;
        // Only Quiver's: another engine may stage its files in a folder of
        // the same name.
        for job_id in others
            .iter()
            .filter(|job| is_job_id(job) && **job != self.job_id)
        {
            if settled == ABANDONED_PER_COMMIT {
                break;
            }
            match self.settle_if_abandoned(job_id).await {
                Ok(true) => settled += 1,
                Ok(false) => {}
                Err(error) => self.warn_unsettled(Some(job_id), &error),
            }
        }
    }

    fn warn_unsettled(&self, abandoned: Option<&str>, error: &DataFusionError) {
        let error = crate::storage::redacted_error(error);
        warn!(job_id = %self.job_id, ?abandoned, location = %self.location, %error,
            "could not settle the write of an abandoned job");
    }

    /// Settles the write of `job_id` if it was abandoned (see
    /// [`Self::settle_abandoned_jobs`]); returns whether it was.
    async fn settle_if_abandoned(&self, job_id: &str) -> Result<bool> {
        let staging = job_staging(&self.table, job_id);
        if !untouched_for(&self.store, &staging, ABANDONED_AFTER).await? {
            return Ok(false);
        }
        // Under this commit's lease and permission: it acts for them.
        let abandoned = Commit {
            allowed_until: self.allowed_until.clone(),
            ..Commit::settling(
                Arc::clone(&self.store),
                self.multipart.clone(),
                self.local,
                &self.location,
                self.table.clone(),
                job_id,
                self.lease.clone(),
            )
        };
        let (settled, _) = abandoned
            .settle(JobEnded::Otherwise, FinishOverwrite::No)
            .await?;
        info!(job_id = %self.job_id, abandoned = %job_id, location = %self.location,
            ?settled, "settled the write of a job abandoned with its cluster");
        Ok(true)
    }
}

/// Whether nothing below `folder` changed for longer than `age`; false for a
/// folder that holds nothing (any more). The listing stops at the first
/// recent file: a running job's folder can hold thousands.
async fn untouched_for(
    store: &Arc<dyn ObjectStore>,
    folder: &Path,
    age: chrono::TimeDelta,
) -> Result<bool> {
    let now = chrono::Utc::now();
    let mut listing = store.list(Some(folder));
    let mut empty = true;
    while let Some(meta) = listing.try_next().await? {
        if now.signed_duration_since(meta.last_modified) <= age {
            return Ok(false);
        }
        empty = false;
    }
    Ok(!empty)
}
