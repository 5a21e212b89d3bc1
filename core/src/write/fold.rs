//! Folded manifests: the manifests of many finished writes, kept as one file.
//!
//! Every statement lists the `_manifests/` folder of each table it reads
//! (see [`super::snapshot`]), and a commit of an append leaves a manifest
//! there that no overwrite retires while its files live. A table appended to
//! every minute would hold tens of thousands of manifests within a month,
//! and every statement would page through them (1,000 names per request on
//! S3). So a commit that finds [`FOLD_AT`] finished manifests of other jobs
//! folds them (at most 1,000 at once): it writes their jobs, and the mode
//! of each, with those of the folded files already there, into a new folded
//! file (`_manifests/z_folded-<job>-<unique>.json`), then deletes the
//! manifests and the older folded files. A manifest is finished when its
//! job has ended and its overwrite, if it is one, has deleted what it
//! replaced (its list of replaced files is gone).
//!
//! Readers take the folded jobs as committed, as if their manifests were
//! there. A folded file is never written twice: every fold writes a new one,
//! holding all that it read, before it deletes what it read. So a job is in
//! a manifest or a folded file at every moment, also when writers of two
//! clusters fold one table at once (each writes its own file; neither can
//! overwrite the other's), and a fold that dies midway leaves jobs in two
//! places, which is the same state. A reader that lists the folder, then
//! finds a listed folded file gone, lists again: a newer one holds its
//! jobs. A listing in pages reaches the folded files last (see
//! [`FOLDED_PREFIX`]), so one that missed folded manifests finds the new
//! folded file. Folded files only gain jobs, but for jobs that an overwrite
//! left without a file ([`FoldedManifests::without`]), which readers need
//! no more; and since a name is never reused, a listing that shows the same
//! folded names shows the same jobs.
//!
//! A commit never folds its own manifest: a retry of its commit task, and
//! the settling of its write once the job has ended, read that manifest. A
//! manifest that a later write folded before the settling ran is found in a
//! folded file.
//!
//! Since a folded file never changes, a process keeps those it has read
//! ([`FoldedCache`]) and asks the store for one only if it changed since
//! (`If-None-Match`): a statement on a table with a long history then
//! neither downloads nor parses its folded file again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};

use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::dml::InsertOp;
use object_store::path::Path;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt, PutPayload};

use super::layout::{MANIFEST_FOLDER, REPLACED_LIST_SUFFIX};
use super::snapshot::{manifest_folder_names, manifest_jobs};

/// Finished manifests of other jobs that make a commit fold them. A table
/// so keeps at most this many manifests, besides its folded files and the
/// manifests of writes still replacing files.
pub const FOLD_AT: usize = 32;

/// How the names of folded files in `_manifests/` start. With `z`, which no
/// job id does, so that one is never taken for a job's manifest, and which
/// sorts after every job id (hex digits): a listing that comes in pages, in
/// key order (S3's), reaches the folded files after the manifests. A reader
/// that found manifests gone, because a fold deleted them, so finds the
/// folded file that the fold wrote before deleting them.
pub const FOLDED_PREFIX: &str = "z_folded-";

/// Manifests that one fold takes at most: the first fold of a table that an
/// older version appended to many times must not hold its commit task up.
const FOLD_MAX: usize = 1000;

/// Listings of `_manifests/` a reader makes while folds keep replacing the
/// folded files it lists, before it fails.
const READ_TRIES: usize = 4;

/// The folded files among `names` (the `_manifests/` folder's), sorted.
pub fn folded_names(names: &[String]) -> Vec<String> {
    let mut folded: Vec<String> = names
        .iter()
        .filter(|name| name.starts_with(FOLDED_PREFIX) && name.ends_with(".json"))
        .cloned()
        .collect();
    folded.sort();
    folded
}

/// The folded file `name` of the table at `table`.
pub fn folded_path(table: &Path, name: &str) -> Path {
    table.clone().join(MANIFEST_FOLDER).join(name)
}

/// The jobs whose manifests were folded, with the mode of each write: the
/// contents of one folded file.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FoldedManifests {
    /// Job id to the write's mode, as its manifest recorded it
    /// (`Insert Into`, `Insert Overwrite`).
    pub jobs: BTreeMap<String, String>,
}

/// The folded jobs of one table: the contents of its folded files, as
/// listed together. Shared, not merged, so that a statement reading a table
/// of a million folded jobs copies none of them.
#[derive(Debug, Default, Clone)]
pub struct FoldedJobs {
    files: Vec<Arc<HeldJobs>>,
}

impl FoldedJobs {
    /// The folded jobs of the table at `table`, from a listing of its
    /// `_manifests/` folder, listed again while folds replace the files.
    /// Returns the listing's names too.
    pub async fn list_and_read(
        store: &Arc<dyn ObjectStore>,
        table: &Path,
    ) -> Result<(Vec<String>, Self)> {
        for _ in 0..READ_TRIES {
            let names = manifest_folder_names(store, table).await?;
            if let Some(folded) = Self::read_listed(store, table, &names).await? {
                return Ok((names, folded));
            }
        }
        Err(DataFusionError::Execution(format!(
            "the manifests of the table at '{table}' kept being folded while they were read \
             ({READ_TRIES} times in a row); run the statement again"
        )))
    }

    /// The folded jobs of the table at `table`.
    pub async fn read(store: &Arc<dyn ObjectStore>, table: &Path) -> Result<Self> {
        Ok(Self::list_and_read(store, table).await?.1)
    }

    /// The jobs of the folded files named among `names`; `None` if one of
    /// them is gone, replaced by a newer fold since the listing: list again.
    pub async fn read_listed(
        store: &Arc<dyn ObjectStore>,
        table: &Path,
        names: &[String],
    ) -> Result<Option<Self>> {
        let reads = folded_names(names)
            .into_iter()
            .map(|name| read_folded_file(store, table, folded_path(table, &name)));
        let files = futures::future::try_join_all(reads).await?;
        Ok(files
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .map(|files| Self { files }))
    }

    pub fn is_empty(&self) -> bool {
        self.files.iter().all(|file| file.is_empty())
    }

    pub fn contains(&self, job_id: &str) -> bool {
        self.files.iter().any(|file| file.mode(job_id).is_some())
    }

    /// Whether the folded write of `job_id` was an append; `None` if it is
    /// not folded.
    pub fn appended(&self, job_id: &str) -> Option<bool> {
        self.files
            .iter()
            .find_map(|file| file.mode(job_id))
            .map(|mode| mode == InsertOp::Append.name())
    }

    /// Every folded job; a job that a fold which died midway left in two
    /// files comes twice.
    pub fn jobs(&self) -> impl Iterator<Item = String> + '_ {
        self.files
            .iter()
            .flat_map(|file| file.jobs().map(|(job, _)| job))
    }

    /// All of these jobs in one folded file's contents, for a fold to add
    /// to or take from.
    pub fn merged(&self) -> FoldedManifests {
        let mut merged = FoldedManifests::default();
        for file in &self.files {
            merged
                .jobs
                .extend(file.jobs().map(|(job, mode)| (job, mode.to_owned())));
        }
        merged
    }
}

/// One folded file's jobs as a process holds them: the ids of 16 lower-case
/// hex digits (every id Quiver gives) as numbers, sorted, each with its
/// write's mode (an index into `modes`), in 16 bytes a job where the parsed
/// JSON would take about 150; any other id as written.
#[derive(Debug, Default)]
struct HeldJobs {
    ids: Vec<(u64, u16)>,
    other: BTreeMap<String, u16>,
    modes: Vec<String>,
}

impl HeldJobs {
    fn new(file: FoldedManifests) -> Result<Self> {
        let mut held = Self::default();
        for (job, mode) in file.jobs {
            let index = match held.modes.iter().position(|known| *known == mode) {
                Some(index) => index,
                None => {
                    held.modes.push(mode);
                    held.modes.len() - 1
                }
            };
            let index = u16::try_from(index).map_err(|_| {
                DataFusionError::Execution("a folded file names too many write modes".into())
            })?;
            match hex_id(&job) {
                Some(id) => held.ids.push((id, index)),
                None => {
                    held.other.insert(job, index);
                }
            }
        }
        held.ids.sort_unstable();
        Ok(held)
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.other.is_empty()
    }

    fn mode(&self, job_id: &str) -> Option<&str> {
        let index = match hex_id(job_id) {
            Some(id) => {
                let at = self.ids.binary_search_by_key(&id, |(id, _)| *id).ok()?;
                self.ids[at].1
            }
            None => *self.other.get(job_id)?,
        };
        self.modes.get(usize::from(index)).map(String::as_str)
    }

    fn jobs(&self) -> impl Iterator<Item = (String, &str)> {
        let mode = |index: &u16| self.modes[usize::from(*index)].as_str();
        let ids = self
            .ids
            .iter()
            .map(move |(id, index)| (format!("{id:016x}"), mode(index)));
        let other = self
            .other
            .iter()
            .map(move |(job, index)| (job.clone(), mode(index)));
        ids.chain(other)
    }

    /// Memory held, about.
    fn memory(&self) -> usize {
        let other: usize = self.other.keys().map(|job| job.len() + 64).sum();
        self.ids.len() * size_of::<(u64, u16)>() + other
    }
}

/// `job_id` as a number, if it is 16 lower-case hex digits, which print
/// back as they were.
fn hex_id(job_id: &str) -> Option<u64> {
    let hex = job_id.len() == 16
        && job_id
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte));
    hex.then(|| u64::from_str_radix(job_id, 16).ok()).flatten()
}

/// The contents of the folded file at `path`, from the store unless this
/// process holds it in the version the store has; `None` if it is gone.
async fn read_folded_file(
    store: &Arc<dyn ObjectStore>,
    table: &Path,
    path: Path,
) -> Result<Option<Arc<HeldJobs>>> {
    let key = format!("{store}/{path}");
    let held = FoldedCache::shared().get(&key);
    let options = GetOptions {
        if_none_match: held.as_ref().map(|(e_tag, _)| e_tag.clone()),
        ..GetOptions::default()
    };
    let found = match store.get_opts(&path, options).await {
        Ok(found) => found,
        Err(object_store::Error::NotModified { .. }) => return Ok(held.map(|(_, folded)| folded)),
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let e_tag = found.meta.e_tag.clone();
    let bytes = found.bytes().await?;
    let folded = serde_json::from_slice::<FoldedManifests>(&bytes).map_err(|e| {
        DataFusionError::Execution(format!(
            "the folded manifests of the table at '{table}' ('{path}') are not valid: {e}"
        ))
    })?;
    let folded = Arc::new(HeldJobs::new(folded)?);
    if let Some(e_tag) = e_tag {
        FoldedCache::shared().put(key, e_tag, Arc::clone(&folded));
    }
    Ok(Some(folded))
}

/// Memory that a process's [`FoldedCache`] may hold: the folded files of
/// tables with about 4 million folded writes, held as [`HeldJobs`]. A file
/// too large for it is read by every statement.
const FOLDED_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// The folded files this process has read, by store and path, with their
/// entity tags; the least recently used go first when it is full.
#[derive(Default)]
struct FoldedCache {
    files: HashMap<String, HeldFold>,
    bytes: usize,
    clock: u64,
}

struct HeldFold {
    e_tag: String,
    folded: Arc<HeldJobs>,
    bytes: usize,
    last_use: u64,
}

impl FoldedCache {
    fn shared() -> std::sync::MutexGuard<'static, FoldedCache> {
        static SHARED: LazyLock<Mutex<FoldedCache>> = LazyLock::new(Mutex::default);
        SHARED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&mut self, key: &str) -> Option<(String, Arc<HeldJobs>)> {
        self.clock += 1;
        let held = self.files.get_mut(key)?;
        held.last_use = self.clock;
        Some((held.e_tag.clone(), Arc::clone(&held.folded)))
    }

    fn put(&mut self, key: String, e_tag: String, folded: Arc<HeldJobs>) {
        let bytes = folded.memory();
        if bytes > FOLDED_CACHE_BYTES {
            return;
        }
        if let Some(replaced) = self.files.remove(&key) {
            self.bytes -= replaced.bytes;
        }
        while self.bytes + bytes > FOLDED_CACHE_BYTES {
            let Some(oldest) = self
                .files
                .iter()
                .min_by_key(|(_, held)| held.last_use)
                .map(|(key, _)| key.clone())
            else {
                break;
            };
            if let Some(evicted) = self.files.remove(&oldest) {
                self.bytes -= evicted.bytes;
            }
        }
        self.clock += 1;
        self.bytes += bytes;
        self.files.insert(
            key,
            HeldFold {
                e_tag,
                folded,
                bytes,
                last_use: self.clock,
            },
        );
    }
}

impl FoldedManifests {
    /// Writes these jobs into a new folded file of the table at `table`,
    /// named for `job_id` and unique.
    pub async fn write_new(
        &self,
        store: &Arc<dyn ObjectStore>,
        table: &Path,
        job_id: &str,
    ) -> Result<()> {
        let name = format!(
            "{FOLDED_PREFIX}{job_id}-{}.json",
            uuid::Uuid::new_v4().simple()
        );
        let body = serde_json::to_vec(self).map_err(|e| DataFusionError::External(Box::new(e)))?;
        store
            .put(&folded_path(table, &name), PutPayload::from(body))
            .await?;
        Ok(())
    }

    /// Whether the folded write of `job_id` was an append; `None` if it is
    /// not folded.
    pub fn appended(&self, job_id: &str) -> Option<bool> {
        self.jobs
            .get(job_id)
            .map(|mode| mode == InsertOp::Append.name())
    }

    /// These folded jobs without those that `retired` says have no file
    /// left; `None` if none is retired.
    pub fn without(&self, retired: impl Fn(&str) -> bool) -> Option<Self> {
        let kept: BTreeMap<String, String> = self
            .jobs
            .iter()
            .filter(|(job, _)| !retired(job))
            .map(|(job, mode)| (job.clone(), mode.clone()))
            .collect();
        (kept.len() < self.jobs.len()).then_some(Self { jobs: kept })
    }
}

/// The manifests among `names` (the `_manifests/` folder's) that a commit
/// of `own_job` may fold: other jobs', whose overwrite, if any, has no list
/// of replaced files left. `None` while there are fewer than [`FOLD_AT`].
pub fn foldable(names: &[String], own_job: &str) -> Option<Vec<String>> {
    let replacing: HashSet<&str> = names
        .iter()
        .filter_map(|name| name.strip_suffix(REPLACED_LIST_SUFFIX))
        .collect();
    let mut jobs: Vec<String> = manifest_jobs(names)
        .into_iter()
        .filter(|job| job != own_job && !replacing.contains(job.as_str()))
        .collect();
    jobs.sort();
    jobs.truncate(FOLD_MAX);
    (jobs.len() >= FOLD_AT).then_some(jobs)
}

/// The mode that a manifest records (`Insert Into`, `Insert Overwrite`);
/// `None` if it records none or is not valid JSON.
pub fn manifest_mode(manifest: &[u8]) -> Option<String> {
    let manifest: serde_json::Value = serde_json::from_slice(manifest).ok()?;
    manifest.get("mode")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_finished_manifests_of_other_jobs_are_folded() {
        let mut names: Vec<String> = (0..FOLD_AT).map(|n| format!("{n:016x}.json")).collect();
        names.push(format!("{FOLDED_PREFIX}{:016x}-1.json", 7));
        assert_eq!(folded_names(&names).len(), 1);
        let own = format!("{:016x}", 0);
        assert_eq!(foldable(&names, &own), None, "one short: its own is kept");
        names.push(format!("{:016x}.json", FOLD_AT));
        let jobs = foldable(&names, &own).expect("enough to fold");
        assert_eq!(jobs.len(), FOLD_AT);
        assert!(!jobs.contains(&own));
        assert!(!jobs.iter().any(|job| job.starts_with('z')));
        let many: Vec<String> = (0..2 * FOLD_MAX)
            .map(|n| format!("{n:016x}.json"))
            .collect();
        assert_eq!(foldable(&many, &own).map(|jobs| jobs.len()), Some(FOLD_MAX));
        // An overwrite still deleting what it replaced is not finished.
        names.push(format!("{:016x}.replaces", 1));
        assert_eq!(foldable(&names, &own), None);
    }

    #[test]
    fn retired_jobs_leave_the_folded_file() {
        let folded = FoldedManifests {
            jobs: [("a", "Insert Into"), ("b", "Insert Overwrite")]
                .into_iter()
                .map(|(job, mode)| (job.to_owned(), mode.to_owned()))
                .collect(),
        };
        assert_eq!(folded.appended("a"), Some(true));
        assert_eq!(folded.appended("b"), Some(false));
        assert_eq!(folded.appended("c"), None);
        assert_eq!(folded.without(|_| false), None);
        let kept = folded.without(|job| job == "a").expect("one retired");
        assert_eq!(kept.jobs.keys().collect::<Vec<_>>(), ["b"]);
    }

    /// A folded file is held compactly and gives back exactly what it held.
    #[test]
    fn held_jobs_keep_every_id_and_mode() {
        let file = FoldedManifests {
            jobs: [
                ("00000000000000ff", "Insert Into"),
                ("a0b1c2d3e4f5a6b7", "Insert Overwrite"),
                ("A0B1C2D3E4F5A6B7", "Insert Into"),
                ("00ff", "Insert Overwrite"),
                ("not-a-quiver-job", "Insert Into"),
            ]
            .into_iter()
            .map(|(job, mode)| (job.to_owned(), mode.to_owned()))
            .collect(),
        };
        let folded = FoldedJobs {
            files: vec![Arc::new(HeldJobs::new(file.clone()).expect("held"))],
        };
        assert_eq!(folded.merged(), file);
        assert_eq!(folded.appended("00000000000000ff"), Some(true));
        assert_eq!(folded.appended("a0b1c2d3e4f5a6b7"), Some(false));
        assert_eq!(folded.appended("A0B1C2D3E4F5A6B7"), Some(true));
        assert_eq!(folded.appended("00ff"), Some(false));
        assert!(!folded.contains("00000000000000fe"));
        assert!(!folded.contains("ff"));
        assert_eq!(folded.files[0].ids.len(), 2, "the hex ids as numbers");
    }

    /// A folded file read before is not downloaded again, but a file
    /// rewritten under its name (which Quiver never does) is read anew.
    #[tokio::test]
    async fn a_held_folded_file_is_read_again_only_when_it_changed() {
        use object_store::memory::InMemory;

        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let table = Path::from("held");
        let name = format!("{FOLDED_PREFIX}0-{}.json", uuid::Uuid::new_v4().simple());
        let path = folded_path(&table, &name);
        let one =
            |job: &str| PutPayload::from(format!(r#"{{"jobs": {{"{job}": "Insert Into"}}}}"#));
        store.put(&path, one("a")).await.expect("put");
        let names = vec![name];
        let read = || async {
            FoldedJobs::read_listed(&store, &table, &names)
                .await
                .expect("read")
                .expect("there")
        };
        let first = read().await;
        let again = read().await;
        assert!(Arc::ptr_eq(&first.files[0], &again.files[0]), "held");
        store.put(&path, one("b")).await.expect("rewrite");
        let rewritten = read().await;
        assert_eq!(rewritten.jobs().collect::<Vec<_>>(), ["b"]);
        store.delete(&path).await.expect("delete");
        assert!(
            FoldedJobs::read_listed(&store, &table, &names)
                .await
                .expect("read")
                .is_none(),
            "gone since the listing"
        );
    }

    /// Two writers that fold one table at once (of two clusters) each write
    /// a folded file of their own and delete what they read: no job is lost,
    /// whichever deletes first. A reader holding a listing from before a
    /// fold lists again.
    #[tokio::test]
    async fn folds_at_once_keep_every_job() {
        use object_store::memory::InMemory;

        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let table = Path::from("t");
        let first = FoldedManifests {
            jobs: [("a".to_owned(), "Insert Into".to_owned())].into(),
        };
        first.write_new(&store, &table, "0").await.expect("write");
        let manifest = table.clone().join(MANIFEST_FOLDER).join("b.json");
        let body = PutPayload::from(r#"{"mode": "Insert Into"}"#);
        store.put(&manifest, body).await.expect("manifest");

        let names = manifest_folder_names(&store, &table).await.expect("list");
        let mut folds = Vec::new();
        for writer in ["1", "2"] {
            let mut folded = FoldedJobs::read_listed(&store, &table, &names)
                .await
                .expect("read")
                .expect("nothing folded since the listing")
                .merged();
            folded.jobs.insert("b".into(), "Insert Into".into());
            folds.push((writer, folded));
        }
        for (writer, folded) in folds {
            folded
                .write_new(&store, &table, writer)
                .await
                .expect("write");
            let mut read = folded_names(&names)
                .iter()
                .map(|name| folded_path(&table, name))
                .collect::<Vec<_>>();
            read.push(manifest.clone());
            for path in read {
                match store.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => panic!("delete: {e}"),
                }
            }
        }
        assert!(
            FoldedJobs::read_listed(&store, &table, &names)
                .await
                .expect("read")
                .is_none(),
            "a listing from before the folds is stale"
        );
        let (names, folded) = FoldedJobs::list_and_read(&store, &table)
            .await
            .expect("read");
        assert_eq!(folded_names(&names).len(), 2, "{names:?}");
        assert_eq!(folded.merged().jobs.keys().collect::<Vec<_>>(), ["a", "b"]);
    }
}
