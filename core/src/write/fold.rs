//! Folded manifests: the manifests of many finished writes, kept as one file.
//!
//! Every statement lists the `_manifests/` folder of each table it reads
//! (see [`super::snapshot`]), and a commit of an append leaves a manifest
//! there that no overwrite retires while its files live. A table appended to
//! every minute would hold tens of thousands of manifests within a month,
//! and every statement would page through them (1,000 names per request on
//! S3). So a commit that finds [`FOLD_AT`] finished manifests of other jobs
//! folds them: it writes their jobs, and the mode of each, into
//! `_manifests/_folded.json`, then deletes them. A manifest is finished when
//! its job has ended and its overwrite, if it is one, has deleted what it
//! replaced (its list of replaced files is gone).
//!
//! Readers take the folded jobs as committed, as if their manifests were
//! there. The folded file is replaced whole (a single `PUT`, atomic on every
//! store) and only gains jobs, but for jobs that an overwrite left without a
//! file ([`FoldedManifests::without`]), which readers need no more. It is
//! written before the manifests it folds are deleted, so a reader that lists
//! the folder while a fold runs, then reads the folded file, finds every
//! committed job in one or the other; a fold that dies in between leaves
//! jobs in both, which is the same state.
//!
//! Only the writer of a table folds it (writes to one table run one at a
//! time), and never its own manifest: a retry of its commit task, and the
//! settling of its write once the job has ended, read that manifest. A
//! manifest that a later write folded before the settling ran is found in
//! the folded file.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::dml::InsertOp;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::layout::{MANIFEST_FOLDER, REPLACED_LIST_SUFFIX};
use super::snapshot::manifest_jobs;
use crate::storage::get_if_exists;

/// Finished manifests of other jobs that make a commit fold them. A table
/// so keeps at most this many manifests, besides the folded file and the
/// manifests of writes still replacing files.
pub const FOLD_AT: usize = 32;

/// The name of the folded file in `_manifests/`. It starts with `_`, which
/// no job id does, so it is never taken for a job's manifest.
pub const FOLDED_NAME: &str = "_folded.json";

/// The folded file of the table at `table`.
pub fn folded_path(table: &Path) -> Path {
    table.clone().join(MANIFEST_FOLDER).join(FOLDED_NAME)
}

/// The jobs whose manifests were folded, with the mode of each write.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FoldedManifests {
    /// Job id to the write's mode, as its manifest recorded it
    /// (`Insert Into`, `Insert Overwrite`).
    pub jobs: BTreeMap<String, String>,
}

impl FoldedManifests {
    /// The folded file of the table at `table`; empty when there is none.
    pub async fn read(store: &Arc<dyn ObjectStore>, table: &Path) -> Result<Self> {
        let path = folded_path(table);
        let Some(bytes) = get_if_exists(store, &path).await? else {
            return Ok(Self::default());
        };
        serde_json::from_slice(&bytes).map_err(|e| {
            DataFusionError::Execution(format!(
                "the folded manifests of the table at '{table}' ('{path}') are not valid: {e}"
            ))
        })
    }

    /// The folded file, if `names` (the `_manifests/` folder's) has one.
    pub async fn read_if_listed(
        store: &Arc<dyn ObjectStore>,
        table: &Path,
        names: &[String],
    ) -> Result<Self> {
        if names.iter().any(|name| name == FOLDED_NAME) {
            Self::read(store, table).await
        } else {
            Ok(Self::default())
        }
    }

    /// Replaces the table's folded file with this one.
    pub async fn write(&self, store: &Arc<dyn ObjectStore>, table: &Path) -> Result<()> {
        let body = serde_json::to_vec(self).map_err(|e| DataFusionError::External(Box::new(e)))?;
        store
            .put(&folded_path(table), PutPayload::from(body))
            .await?;
        Ok(())
    }

    pub fn contains(&self, job_id: &str) -> bool {
        self.jobs.contains_key(job_id)
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
        names.push(FOLDED_NAME.to_owned());
        let own = format!("{:016x}", 0);
        assert_eq!(foldable(&names, &own), None, "one short: its own is kept");
        names.push(format!("{:016x}.json", FOLD_AT));
        let jobs = foldable(&names, &own).expect("enough to fold");
        assert_eq!(jobs.len(), FOLD_AT);
        assert!(!jobs.contains(&own));
        assert!(!jobs.iter().any(|job| job.starts_with('_')));
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
}
