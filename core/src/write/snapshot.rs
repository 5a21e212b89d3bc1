//! What a reader of a table sees: the data files of committed writes only.
//!
//! A commit moves its files in one by one and an overwrite deletes the old
//! ones afterwards, since no store renames or deletes a set of files at
//! once. A reader that only listed the folder would see part of a write
//! while its commit runs, and old and new rows together while an overwrite
//! deletes. The job's manifest is the commit point, so a reader that knows
//! the manifests sees each write whole, or not at all:
//!
//! - a file that Quiver named for a job ([`committing_job`]) is shown only
//!   once that job's manifest exists;
//! - a file that a committed overwrite replaces is hidden from its manifest
//!   on, although it is deleted later: the overwrite lists the files it
//!   replaces ([`replaced_list`]) before it writes its manifest.
//!
//! Both need one listing of the table's `_manifests/` folder, and a read of
//! its folded files when there are some ([`super::fold`]). The first
//! Quiver write into a folder without manifests (a new folder, or a table
//! that other engines wrote) is hidden while its job's staging folder is
//! there instead. Other writers' files are read as listed.
//!
//! The state is read before the reader lists the table's files, and must
//! still hold once it has ([`CommittedFiles::is_current`]): an overwrite
//! committed in between would have deleted files that the older state
//! still shows, and the reader would miss them and not see the new ones.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::dml::InsertOp;
use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::path::Path;

use super::fold::{FOLDED_PREFIX, FoldedJobs, folded_names, manifest_mode};
use super::layout::{
    MANIFEST_FOLDER, REPLACED_LIST_SUFFIX, STAGING_FOLDER, committing_job, join, manifest,
    replaced_list,
};
use crate::storage::get_if_exists;

/// The jobs committed to one table: those whose manifests a listing of its
/// `_manifests/` folder shows, and those of its folded files.
#[derive(Debug, Default)]
pub struct CommittedJobs {
    manifests: HashSet<String>,
    folded: FoldedJobs,
}

impl CommittedJobs {
    /// The jobs committed to the table at `table` now, with the names that
    /// its `_manifests/` folder listed.
    pub async fn read(store: &Arc<dyn ObjectStore>, table: &Path) -> Result<(Self, Vec<String>)> {
        let (names, folded) = FoldedJobs::list_and_read(store, table).await?;
        let manifests = manifest_jobs(&names);
        Ok((Self { manifests, folded }, names))
    }

    pub fn contains(&self, job_id: &str) -> bool {
        self.manifests.contains(job_id) || self.folded.contains(job_id)
    }

    pub fn is_empty(&self) -> bool {
        self.manifests.is_empty() && self.folded.is_empty()
    }
}

/// The committed state of one table, as its manifests tell it.
#[derive(Debug, Default)]
pub struct CommittedFiles {
    jobs: CommittedJobs,
    /// Files that committed overwrites replace and have not deleted yet.
    replaced: HashSet<Path>,
    /// Jobs with a staging folder, when no job has committed yet: one of
    /// them may be moving its files in.
    staging: HashSet<String>,
    /// The folded files read (see [`super::fold`]): a later listing that
    /// shows the same names shows the same jobs, and needs not read them.
    folded_files: Vec<String>,
}

impl CommittedFiles {
    /// Reads the committed state of the table at `table`: a listing of its
    /// manifests, and the lists of files that committed overwrites are still
    /// deleting (there are none once they finish). Without manifests, the
    /// listing of its staging folder too.
    pub async fn read(store: &Arc<dyn ObjectStore>, table: &Path) -> Result<Self> {
        let (jobs, names) = CommittedJobs::read(store, table).await?;
        let folded_files = folded_names(&names);
        let mut replaced = HashSet::new();
        for job_id in names
            .iter()
            .filter_map(|name| name.strip_suffix(REPLACED_LIST_SUFFIX))
            .filter(|job_id| jobs.contains(job_id))
        {
            // None: its overwrite has just finished deleting.
            for path in read_replaced_list(store, table, job_id)
                .await?
                .unwrap_or_default()
            {
                replaced.insert(path);
            }
        }
        let staging = if jobs.is_empty() {
            staging_jobs(store, table).await?
        } else {
            HashSet::new()
        };
        Ok(Self {
            jobs,
            replaced,
            staging,
            folded_files,
        })
    }

    /// What this state knew of the table's commits, for a write planned
    /// from it.
    pub fn known_commits(&self) -> KnownCommits {
        KnownCommits::of(self.jobs.manifests.iter().cloned())
    }

    /// Whether `job_id` has committed in this state.
    pub fn committed(&self, job_id: &str) -> bool {
        self.jobs.contains(job_id)
    }

    fn none_committed(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Whether readers of the table see every file they list.
    pub fn hides_nothing(&self) -> bool {
        self.none_committed() && self.staging.is_empty()
    }

    /// Whether a reader of the table sees the data file at `path`.
    pub fn shows(&self, path: &Path) -> bool {
        !self.replaced.contains(path) && !self.uncommitted(path)
    }

    /// Whether the data file at `path` is part of a write that has not
    /// committed: a commit in progress, or one that failed, which its
    /// settling rolls back.
    pub fn uncommitted(&self, path: &Path) -> bool {
        let Some(job) = path.filename().and_then(committing_job) else {
            return false;
        };
        if self.none_committed() {
            // A folder that Quiver has not committed to: a name that looks
            // like Quiver's is another writer's unless its job is staging.
            self.staging.contains(job)
        } else {
            !self.committed(job)
        }
    }

    /// Whether no overwrite has committed to the table at `table` since this
    /// state was read, so that a listing of its files made since shows what
    /// this state expects: each committed job's files, and those that
    /// overwrites replaced gone or hidden. An append that committed since
    /// changes neither: its files stay hidden, as in this state.
    pub async fn is_current(&self, store: &Arc<dyn ObjectStore>, table: &Path) -> Result<bool> {
        let names = manifest_folder_names(store, table).await?;
        let folded = if folded_names(&names) == self.folded_files {
            // The same folded files: their jobs are all in this state.
            FoldedJobs::default()
        } else {
            match FoldedJobs::read_listed(store, table, &names).await? {
                Some(folded) => folded,
                // Folded again since the listing: the state may be older.
                None => return Ok(false),
            }
        };
        let folded_overwrite = folded
            .jobs()
            .any(|job_id| !self.committed(&job_id) && folded.appended(&job_id) == Some(false));
        if folded_overwrite {
            return Ok(false);
        }
        for job_id in manifest_jobs(&names) {
            if !self.committed(&job_id) && !appended(store, table, &job_id).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// What a write that read its own table knew of the table's commits when
/// it was planned: the jobs whose own manifests (not folded) were listed.
/// That is enough to tell whether any job has committed since, however
/// long the table's history: the job that committed last always has its
/// own manifest, since a commit folds and retires only other jobs'
/// manifests, and a manifest, once listed, stays listed until it is folded
/// or retired. So a job committed since planning leaves a manifest that
/// this list lacks, and jobs folded or retired since (by an overwrite
/// still deleting what it replaced) change nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KnownCommits {
    /// Sorted.
    pub manifests: Vec<String>,
}

impl KnownCommits {
    /// These jobs, whose manifests were listed.
    pub fn of(manifests: impl IntoIterator<Item = String>) -> Self {
        let mut manifests: Vec<String> = manifests.into_iter().collect();
        manifests.sort();
        Self { manifests }
    }

    /// The jobs whose manifests the table at `table` holds now.
    pub async fn read(store: &Arc<dyn ObjectStore>, table: &Path) -> Result<Self> {
        let names = manifest_folder_names(store, table).await?;
        Ok(Self::of(manifest_jobs(&names)))
    }

    /// A job other than `own_job` whose manifest these list and `earlier`
    /// did not: one that committed since `earlier` was read.
    pub fn committed_since(&self, earlier: &Self, own_job: &str) -> Option<&str> {
        self.manifests
            .iter()
            .find(|job| *job != own_job && earlier.manifests.binary_search(job).is_err())
            .map(String::as_str)
    }
}

/// Whether the manifest of `job_id` records an append, which deletes
/// nothing. A manifest gone since it was listed was folded, and the folded
/// file says, or retired by an overwrite; one that cannot be read is not
/// taken for an append.
async fn appended(store: &Arc<dyn ObjectStore>, table: &Path, job_id: &str) -> Result<bool> {
    let Some(bytes) = get_if_exists(store, &manifest(table, job_id)).await? else {
        let folded = FoldedJobs::read(store, table).await?;
        return Ok(folded.appended(job_id).unwrap_or(false));
    };
    Ok(manifest_mode(&bytes).as_deref() == Some(InsertOp::Append.name()))
}

/// The files that the overwrite of `job_id` listed as replaced in the table
/// at `table`; none once it has deleted them (it deletes the list last).
pub(super) async fn read_replaced_list(
    store: &Arc<dyn ObjectStore>,
    table: &Path,
    job_id: &str,
) -> Result<Option<Vec<Path>>> {
    let Some(list) = get_if_exists(store, &replaced_list(table, job_id)).await? else {
        return Ok(None);
    };
    let relatives: Vec<String> = serde_json::from_slice(&list).map_err(|e| {
        DataFusionError::Execution(format!(
            "the list of files that job {job_id} replaces in '{table}' is not valid: {e}"
        ))
    })?;
    relatives
        .iter()
        .map(|relative| join(table, relative).map_err(|e| DataFusionError::External(Box::new(e))))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// The jobs whose manifests are among `names`; not the folded files, whose
/// names start as no job id does.
pub(super) fn manifest_jobs(names: &[String]) -> HashSet<String> {
    names
        .iter()
        .filter(|name| !name.starts_with(FOLDED_PREFIX))
        .filter_map(|name| name.strip_suffix(".json").map(str::to_owned))
        .collect()
}

/// The jobs that have a staging folder in the table at `table`.
pub(super) async fn staging_jobs(
    store: &Arc<dyn ObjectStore>,
    table: &Path,
) -> Result<HashSet<String>> {
    let folder = table.clone().join(STAGING_FOLDER);
    match store.list_with_delimiter(Some(&folder)).await {
        Ok(listing) => Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|prefix| prefix.filename().map(str::to_owned))
            .collect()),
        Err(object_store::Error::NotFound { .. }) => Ok(HashSet::new()),
        Err(e) => Err(e.into()),
    }
}

/// The names of the files in the `_manifests/` folder of the table at
/// `table`: the manifests of committed jobs and the lists of files that
/// overwrites replace.
pub(super) async fn manifest_folder_names(
    store: &Arc<dyn ObjectStore>,
    table: &Path,
) -> Result<Vec<String>> {
    let folder = table.clone().join(MANIFEST_FOLDER);
    match store
        .list(Some(&folder))
        .map_ok(|meta| meta.location.filename().unwrap_or_default().to_owned())
        .try_collect()
        .await
    {
        Ok(names) => Ok(names),
        Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, PutPayload};

    use super::*;

    const OLD: &str = "0000000000000001";
    const NEW: &str = "0000000000000002";
    const RUNNING: &str = "0000000000000003";

    fn file(job: &str, folder: &str) -> Path {
        Path::from(format!("t/{folder}/part-{job}-00000-000.parquet"))
    }

    async fn put(store: &Arc<dyn ObjectStore>, path: &str, body: &str) {
        store
            .put(&Path::from(path), PutPayload::from(body.to_owned()))
            .await
            .expect("put");
    }

    #[tokio::test]
    async fn readers_see_committed_writes_only() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let table = Path::from("t");
        let spark = Path::from("t/p=1/part-00000-5a1c7d0e-c000.snappy.parquet");

        // Files of a table without manifests are all shown...
        let none = CommittedFiles::read(&store, &table).await.expect("read");
        assert!(none.hides_nothing());
        assert!(none.shows(&file(RUNNING, "p=1")));
        assert!(none.shows(&spark));
        // ...but those of a first write, while it stages.
        put(
            &store,
            &format!("t/_temporary/{RUNNING}/p0-a0/p=1/part-{RUNNING}-00000-000.parquet"),
            "rows",
        )
        .await;
        let first = CommittedFiles::read(&store, &table).await.expect("read");
        assert!(!first.hides_nothing());
        assert!(!first.shows(&file(RUNNING, "p=1")), "staging");
        assert!(first.shows(&file(OLD, "p=1")));
        assert!(first.shows(&spark));

        // The old job committed; the new one, an overwrite of p=1, has
        // committed and is deleting what it replaces; a third is moving its
        // files in.
        put(&store, &format!("t/_manifests/{OLD}.json"), "{}").await;
        put(&store, &format!("t/_manifests/{NEW}.json"), "{}").await;
        let replaced = format!(
            "[\"p=1/part-{OLD}-00000-000.parquet\", \"p=1/part-00000-5a1c7d0e-c000.snappy.parquet\"]"
        );
        put(&store, &format!("t/_manifests/{NEW}.replaces"), &replaced).await;
        // An uncommitted job's list hides nothing.
        put(
            &store,
            &format!("t/_manifests/{RUNNING}.replaces"),
            &format!("[\"p=2/part-{OLD}-00000-000.parquet\"]"),
        )
        .await;
        let view = CommittedFiles::read(&store, &table).await.expect("read");
        assert!(view.shows(&file(NEW, "p=1")));
        assert!(!view.shows(&file(OLD, "p=1")), "replaced");
        assert!(!view.shows(&spark), "replaced");
        assert!(view.shows(&file(OLD, "p=2")));
        assert!(!view.shows(&file(RUNNING, "p=2")), "not committed");
        assert!(view.shows(&Path::from("t/p=2/data.parquet")));

        put(&store, &format!("t/_manifests/{NEW}.replaces"), "{").await;
        let error = CommittedFiles::read(&store, &table)
            .await
            .expect_err("a broken list");
        assert!(error.to_string().contains(NEW), "{error}");
    }

    /// A job that commits after a write was planned is found, however the
    /// manifests are folded or retired meanwhile; the committing job itself
    /// and manifests gone since are not commits.
    #[tokio::test]
    async fn known_commits_find_a_job_committed_since() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let read = || async {
            KnownCommits::read(&store, &Path::from("t"))
                .await
                .expect("read")
        };
        let append = r#"{"mode": "Insert Into"}"#;
        put(&store, &format!("t/_manifests/{OLD}.json"), append).await;
        put(&store, &format!("t/_manifests/{NEW}.json"), append).await;
        let planned = read().await;
        assert_eq!(planned.manifests, [OLD, NEW]);

        // Folded, or retired by an overwrite that was already committed.
        let both = format!(r#"{{"jobs": {{"{OLD}": "Insert Into", "{NEW}": "Insert Into"}}}}"#);
        put(&store, "t/_manifests/z_folded-a-1.json", &both).await;
        for job in [OLD, NEW] {
            let manifest = Path::from(format!("t/_manifests/{job}.json"));
            store.delete(&manifest).await.expect("delete");
        }
        assert_eq!(read().await.committed_since(&planned, RUNNING), None);
        // The committing job's own manifest (a retried commit's).
        put(&store, &format!("t/_manifests/{RUNNING}.json"), append).await;
        assert_eq!(read().await.committed_since(&planned, RUNNING), None);
        // Another job's.
        assert_eq!(read().await.committed_since(&planned, NEW), Some(RUNNING));
    }

    /// A state read before an overwrite commits is out of date once its
    /// manifest is there: it may have deleted what the state shows.
    #[tokio::test]
    async fn a_state_is_current_until_an_overwrite_commits() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let table = Path::from("t");
        let empty = CommittedFiles::read(&store, &table).await.expect("read");
        assert!(empty.is_current(&store, &table).await.expect("check"));

        // An append deletes nothing: the files it committed stay hidden.
        let append = r#"{"mode": "Insert Into"}"#;
        put(&store, &format!("t/_manifests/{OLD}.json"), append).await;
        assert!(empty.is_current(&store, &table).await.expect("check"));
        let one = CommittedFiles::read(&store, &table).await.expect("read");
        // A list of replaced files is written before its job's manifest,
        // which is what marks the commit.
        put(&store, &format!("t/_manifests/{NEW}.replaces"), "[]").await;
        assert!(one.is_current(&store, &table).await.expect("check"));
        let overwrite = r#"{"mode": "Insert Overwrite"}"#;
        put(&store, &format!("t/_manifests/{NEW}.json"), overwrite).await;
        assert!(!one.is_current(&store, &table).await.expect("check"));
        assert!(!empty.is_current(&store, &table).await.expect("check"));

        // Folded manifests keep their mode: a folded append changes nothing,
        // a folded overwrite does.
        let two = CommittedFiles::read(&store, &table).await.expect("read");
        let folded = |mode: &str| format!(r#"{{"jobs": {{"{RUNNING}": "{mode}"}}}}"#);
        put(
            &store,
            "t/_manifests/z_folded-a-1.json",
            &folded("Insert Into"),
        )
        .await;
        assert!(two.is_current(&store, &table).await.expect("check"));
        // A later fold replaces that file with its own.
        let first_fold = Path::from("t/_manifests/z_folded-a-1.json");
        store.delete(&first_fold).await.expect("delete");
        put(
            &store,
            "t/_manifests/z_folded-b-2.json",
            &folded("Insert Overwrite"),
        )
        .await;
        assert!(!two.is_current(&store, &table).await.expect("check"));
        let three = CommittedFiles::read(&store, &table).await.expect("read");
        assert!(
            three.shows(&file(RUNNING, "p=3")),
            "a folded job is committed"
        );
        assert!(three.is_current(&store, &table).await.expect("check"));

        // A folded file that is not valid is an error naming it, not a
        // table whose folded writes are silently hidden.
        put(&store, "t/_manifests/z_folded-c-3.json", "{").await;
        let error = CommittedFiles::read(&store, &table)
            .await
            .expect_err("a broken folded file");
        assert!(error.to_string().contains("z_folded-c-3.json"), "{error}");
    }
}
