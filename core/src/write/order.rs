//! The order of one table's overwrites, for writers that share no scheduler.
//!
//! A scheduler commits the writes to one table one at a time, but two
//! clusters may overwrite the same partitions at once. Each then lists the
//! table before the other's manifest exists, keeps the other's files as a
//! commit in progress, and both overwrites stand: the partitions hold both
//! writes' rows. So an overwrite, once its files are in place and before
//! it lists what it replaces, claims the next place in the table's order:
//! it creates `_manifests/order/<n>.claim` only if no such object exists
//! (a conditional put, which local files, S3, GCS, Azure and memory stores
//! offer) and tries the next number when another writer was first. The
//! claim names the job and the partition folders it writes. Then:
//!
//! - an overwrite replaces, in the partitions it writes, the files of
//!   every earlier claim too, committed or not: their files were all in
//!   place before they claimed, so an earlier overwrite that commits after
//!   a later one shows nothing that the later one replaced;
//! - an overwrite that finds a later claim on a partition it writes, when
//!   it lists what it replaces, fails before its manifest: the later one
//!   may have replaced its files already, or may still fail, and neither
//!   can be told from the other.
//!
//! So the overwrite with the last claim decides what the partitions hold,
//! and an earlier one either committed first or fails. Claims of ended
//! jobs are pruned, all but the last, from the oldest up to the first job
//! still committing: a job that is committing needs every later claim, and
//! later jobs need its own.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::error::{DataFusionError, Result};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutPayload};
use serde::{Deserialize, Serialize};

use super::layout::MANIFEST_FOLDER;
use super::snapshot::CommittedFiles;
use crate::storage::{delete_paths, get_if_exists};

/// The folder of the claims, inside `_manifests/`.
const ORDER_FOLDER: &str = "order";
/// The ending of claim names.
const CLAIM_SUFFIX: &str = ".claim";
/// How many claims are read at once.
const CONCURRENT_READS: usize = 16;

/// One overwrite's place in its table's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    #[serde(skip)]
    pub place: u64,
    pub job_id: String,
    /// The partition folders the overwrite writes, as it spelled them;
    /// none when it replaces the whole table.
    pub folders: Option<Vec<String>>,
}

impl Claim {
    /// Whether this claim and one on `folders` may replace the same files,
    /// with `same_folder` telling whether two folders name one partition.
    pub fn overlaps(
        &self,
        folders: Option<&[String]>,
        same_folder: impl Fn(&str, &str) -> bool,
    ) -> bool {
        match (&self.folders, folders) {
            (Some(ours), Some(theirs)) => ours
                .iter()
                .any(|ours| theirs.iter().any(|theirs| same_folder(ours, theirs))),
            _ => true,
        }
    }
}

/// The claims of one table that a listing found, by place.
#[derive(Debug, Default)]
pub struct Claims(Vec<Claim>);

impl Claims {
    /// Reads the claims of the table at `table`. A claim pruned between
    /// the listing and its read is left out: its job has ended.
    pub async fn read(store: &Arc<dyn ObjectStore>, table: &Path) -> Result<Self> {
        let places = list_places(store, table).await?;
        let mut claims: Vec<Claim> = futures::stream::iter(places)
            .map(|place| async move {
                let Some(bytes) = get_if_exists(store, &claim_path(table, place)).await? else {
                    return Ok(None);
                };
                let claim: Claim = serde_json::from_slice(&bytes).map_err(|e| {
                    DataFusionError::Execution(format!(
                        "the overwrite claim {} of '{table}' is not valid: {e}",
                        claim_path(table, place)
                    ))
                })?;
                Ok::<_, DataFusionError>(Some(Claim { place, ..claim }))
            })
            .buffer_unordered(CONCURRENT_READS)
            .try_filter_map(|claim| async move { Ok(claim) })
            .try_collect()
            .await?;
        claims.sort_by_key(|claim| claim.place);
        Ok(Self(claims))
    }

    /// The claim of `job_id`, if it has one: its last, if a request that
    /// timed out had claimed a place unknown to it.
    pub fn of(&self, job_id: &str) -> Option<&Claim> {
        self.0.iter().rev().find(|claim| claim.job_id == job_id)
    }

    /// The first claim of another job after `own` that `overlaps` own's
    /// partitions.
    pub fn later_overlapping(
        &self,
        own: &Claim,
        overlaps: impl Fn(&Claim) -> bool,
    ) -> Option<&Claim> {
        self.0
            .iter()
            .find(|claim| claim.place > own.place && claim.job_id != own.job_id && overlaps(claim))
    }

    /// The jobs that claimed a place before `own`.
    pub fn earlier_jobs(&self, own: &Claim) -> HashSet<String> {
        self.0
            .iter()
            .filter(|claim| claim.place < own.place)
            .map(|claim| claim.job_id.clone())
            .collect()
    }
}

/// Claims the next place in the order of the table at `table` for the
/// overwrite of `job_id` on `folders` (none: the whole table), or returns
/// the place it claimed before (a retried commit keeps its place: a later
/// overwrite may have replaced its files already). `None` if the store
/// cannot create an object only when it is absent: the overwrite then
/// commits unordered, as before claims existed.
pub async fn claim(
    store: &Arc<dyn ObjectStore>,
    table: &Path,
    job_id: &str,
    folders: Option<Vec<String>>,
    retry: bool,
) -> Result<Option<Claim>> {
    if retry && let Some(own) = Claims::read(store, table).await?.of(job_id) {
        return Ok(Some(own.clone()));
    }
    let mut claim = Claim {
        place: 0,
        job_id: job_id.to_owned(),
        folders,
    };
    let body = serde_json::to_vec(&claim).map_err(|e| DataFusionError::External(Box::new(e)))?;
    loop {
        claim.place = list_places(store, table)
            .await?
            .last()
            .map_or(1, |last| last + 1);
        let payload = PutPayload::from(body.clone());
        let path = claim_path(table, claim.place);
        match store.put_opts(&path, payload, PutMode::Create.into()).await {
            Ok(_) => return Ok(Some(claim)),
            // Another overwrite took this place: take the next.
            Err(object_store::Error::AlreadyExists { .. }) => continue,
            Err(object_store::Error::NotImplemented { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Deletes the claims of ended jobs from the oldest up to the first claim
/// of a job still committing (it has no manifest, and its staging folder
/// is there), keeping the last claim, so that a new claim never takes a
/// place below it. Returns how many went.
pub async fn prune(store: &Arc<dyn ObjectStore>, table: &Path) -> Result<usize> {
    let claims = Claims::read(store, table).await?;
    let Some(last) = claims.0.last().map(|claim| claim.place) else {
        return Ok(0);
    };
    // Read after the claims: a job seen committing may only have ended since.
    let committed = CommittedFiles::read(store, table).await?;
    let staging = super::snapshot::staging_jobs(store, table).await?;
    let first_committing = claims
        .0
        .iter()
        .find(|claim| !committed.committed(&claim.job_id) && staging.contains(&claim.job_id))
        .map_or(last, |claim| claim.place.min(last));
    let ended: Vec<Path> = claims
        .0
        .iter()
        .filter(|claim| claim.place < first_committing)
        .map(|claim| claim_path(table, claim.place))
        .collect();
    let count = ended.len();
    let paths = futures::stream::iter(ended.into_iter().map(Ok)).boxed();
    delete_paths(store, paths).await?;
    Ok(count)
}

/// The places claimed in the table at `table`, in order.
async fn list_places(store: &Arc<dyn ObjectStore>, table: &Path) -> Result<Vec<u64>> {
    let folder = order_folder(table);
    let names: Vec<Path> = match store
        .list(Some(&folder))
        .map_ok(|meta| meta.location)
        .try_collect()
        .await
    {
        Ok(names) => names,
        Err(object_store::Error::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let mut places: Vec<u64> = names
        .iter()
        .filter_map(|path| path.filename()?.strip_suffix(CLAIM_SUFFIX)?.parse().ok())
        .collect();
    places.sort_unstable();
    Ok(places)
}

fn order_folder(table: &Path) -> Path {
    table.clone().join(MANIFEST_FOLDER).join(ORDER_FOLDER)
}

/// Zero-padded, so that listings return claims in order.
fn claim_path(table: &Path, place: u64) -> Path {
    order_folder(table).join(format!("{place:020}{CLAIM_SUFFIX}"))
}

#[cfg(test)]
mod tests {
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    use super::*;

    #[tokio::test]
    async fn overwrites_claim_successive_places_and_a_retry_keeps_its_own() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let table = Path::from("t");
        let folders = |names: &[&str]| Some(names.iter().map(|name| name.to_string()).collect());
        let first = claim(&store, &table, "a1", folders(&["p=1"]), false)
            .await
            .expect("claim")
            .expect("ordered");
        let second = claim(&store, &table, "b2", None, false)
            .await
            .expect("claim")
            .expect("ordered");
        assert_eq!((first.place, second.place), (1, 2));
        let again = claim(&store, &table, "a1", folders(&["p=1"]), true)
            .await
            .expect("claim")
            .expect("ordered");
        assert_eq!(again, first, "a retried commit keeps its place");

        // A place taken meanwhile is skipped.
        store
            .put(&claim_path(&table, 3), PutPayload::from_static(b"{}"))
            .await
            .expect("put");
        let refused = store
            .put_opts(
                &claim_path(&table, 3),
                PutPayload::from_static(b"{}"),
                PutMode::Create.into(),
            )
            .await;
        assert!(matches!(
            refused,
            Err(object_store::Error::AlreadyExists { .. })
        ));

        let claims = Claims::read(&store, &table).await;
        assert!(claims.is_err(), "a claim that is not valid is an error");
        store.delete(&claim_path(&table, 3)).await.expect("delete");
        let claims = Claims::read(&store, &table).await.expect("claims");
        let same = |ours: &str, theirs: &str| ours == theirs;
        let whole = claims.of("b2").expect("b2").clone();
        assert_eq!(
            claims.later_overlapping(&first, |claim| claim
                .overlaps(first.folders.as_deref(), same)),
            Some(&whole),
            "the whole table overlaps every partition"
        );
        assert!(claims.later_overlapping(&whole, |_| true).is_none());
        assert_eq!(
            claims.earlier_jobs(&whole),
            HashSet::from(["a1".to_owned()])
        );
        let other = Claim {
            place: 0,
            job_id: "c3".into(),
            folders: folders(&["p=2"]),
        };
        assert!(!first.overlaps(other.folders.as_deref(), same));
        assert!(first.overlaps(folders(&["p=2", "p=1"]).as_deref(), same));
    }

    #[tokio::test]
    async fn pruning_keeps_the_claims_from_the_first_job_still_committing() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let table = Path::from("t");
        for job in ["0000000000000001", "0000000000000002", "0000000000000003"] {
            claim(&store, &table, job, None, false)
                .await
                .expect("claim")
                .expect("ordered");
        }
        let put = |path: &str| {
            let store = Arc::clone(&store);
            let path = Path::from(path);
            async move { store.put(&path, PutPayload::new()).await.expect("put") }
        };
        // The first committed, the second is committing, the third failed
        // and was rolled back.
        put("t/_manifests/0000000000000001.json").await;
        put("t/_temporary/0000000000000002/_committing").await;
        assert_eq!(prune(&store, &table).await.expect("prune"), 1);
        assert_eq!(list_places(&store, &table).await.expect("list"), vec![2, 3]);

        // Once the second has committed, only the last claim stays.
        put("t/_manifests/0000000000000002.json").await;
        store
            .delete(&Path::from("t/_temporary/0000000000000002/_committing"))
            .await
            .expect("delete");
        assert_eq!(prune(&store, &table).await.expect("prune"), 1);
        assert_eq!(list_places(&store, &table).await.expect("list"), vec![3]);
        let next = claim(&store, &table, "0000000000000004", None, false)
            .await
            .expect("claim")
            .expect("ordered");
        assert_eq!(next.place, 4, "never below the last claim");
    }
}
