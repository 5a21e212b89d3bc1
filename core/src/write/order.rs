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
//! claim names the job and the partition folders it writes. Then, when an
//! overwrite lists what it replaces:
//!
//! - it replaces, in the partitions it writes, the files of every earlier
//!   claim too, committed or not: their files were all in place before
//!   they claimed, so an earlier overwrite that commits after a later one
//!   shows nothing that the later one replaced;
//! - it replaces nothing in the partitions of a later claim whose job has
//!   committed: that job replaced what they held when it listed them, this
//!   overwrite's files included, and what was appended since stays;
//! - the files of a later claim whose job is still committing are not
//!   committed, so they stay as any commit in progress does; if that job
//!   fails, this overwrite has replaced what it had to.
//!
//! So the overwrite with the last claim decides what the partitions hold,
//! as if the others had committed before it, and no overwrite fails for
//! another, with one exception. A retried commit keeps the place its earlier
//! run claimed (a later overwrite may have replaced its files already); if
//! it moves files in only now, after a later claim on its partitions, that
//! later overwrite may have listed the partitions without them, and both
//! writes' rows would stand. Such a retry fails before its manifest, and
//! its files are rolled back.
//!
//! Claims of ended jobs are pruned, all but the last, from the oldest up to
//! the first job still committing: a job that is committing needs every
//! later claim, and later jobs need its own. A job that has been committing
//! for a day was abandoned with its cluster (a live commit takes minutes,
//! and stops acting once its executor's lease runs out); its claim goes
//! too, so that claims do not pile up behind it. Should its commit ever run
//! again, it finds no claim and claims anew: its files have long been in
//! place, which is all a claim needs.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::error::{DataFusionError, Result};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload};
use serde::{Deserialize, Serialize};

use super::layout::{ABANDONED_AFTER, MANIFEST_FOLDER, committing_marker};
use super::snapshot::CommittedJobs;
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
    /// Whether this claim's overwrite writes the partition `folder`, with
    /// `same_folder` telling whether two folders name one partition.
    pub fn covers(&self, folder: &str, same_folder: impl Fn(&str, &str) -> bool) -> bool {
        self.folders
            .as_ref()
            .is_none_or(|folders| folders.iter().any(|ours| same_folder(ours, folder)))
    }

    /// Whether this claim's overwrite and `other`'s write a partition in
    /// common.
    pub fn overlaps(&self, other: &Claim, same_folder: impl Fn(&str, &str) -> bool) -> bool {
        match &other.folders {
            None => true,
            Some(folders) => folders
                .iter()
                .any(|folder| self.covers(folder, &same_folder)),
        }
    }
}

/// An overwrite's claim, and whether an earlier run of its commit took it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub claim: Claim,
    pub by_earlier_run: bool,
}

/// Where one overwrite stands among the others of its table, when it lists
/// what it replaces.
#[derive(Debug, Default)]
pub struct Standing {
    /// The jobs that claimed a place before it: their files go too.
    pub earlier_jobs: HashSet<String>,
    /// The claims of other jobs after it.
    pub later: Vec<Claim>,
    /// Those of them whose jobs have committed: their partitions are theirs.
    pub superseded_by: Vec<Claim>,
    /// Every claim it read, for [`prune`] once the overwrite has committed.
    pub claims: Claims,
}

impl Standing {
    /// Reads where the overwrite that claimed `own` stands in the table at
    /// `table`. Read after the table's files are listed: an overwrite that
    /// claims later may have committed before the listing.
    pub async fn read(store: &Arc<dyn ObjectStore>, table: &Path, own: &Claim) -> Result<Self> {
        let claims = Claims::read(store, table).await?;
        let later: Vec<Claim> = claims.later(own).cloned().collect();
        let superseded_by = if later.is_empty() {
            Vec::new()
        } else {
            let (committed, _) = CommittedJobs::read(store, table).await?;
            later
                .iter()
                .filter(|claim| committed.contains(&claim.job_id))
                .cloned()
                .collect()
        };
        Ok(Self {
            earlier_jobs: claims.earlier_jobs(own),
            later,
            superseded_by,
            claims,
        })
    }

    /// Whether a later overwrite that committed wrote the partition `folder`.
    pub fn superseded(&self, folder: &str, same_folder: impl Fn(&str, &str) -> bool) -> bool {
        self.superseded_by
            .iter()
            .any(|claim| claim.covers(folder, &same_folder))
    }

    /// The first later claim that writes a partition that `own` writes.
    pub fn later_on_same_partitions(
        &self,
        own: &Claim,
        same_folder: impl Fn(&str, &str) -> bool,
    ) -> Option<&Claim> {
        self.later
            .iter()
            .find(|later| later.overlaps(own, &same_folder))
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
            .map(|place| read_claim(store, table, place))
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

    /// The claims of other jobs after `own`.
    pub fn later<'a>(&'a self, own: &'a Claim) -> impl Iterator<Item = &'a Claim> {
        self.0
            .iter()
            .filter(|claim| claim.place > own.place && claim.job_id != own.job_id)
    }

    /// The other jobs that claimed a place before `own`.
    pub fn earlier_jobs(&self, own: &Claim) -> HashSet<String> {
        self.0
            .iter()
            .filter(|claim| claim.place < own.place && claim.job_id != own.job_id)
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
) -> Result<Option<Claimed>> {
    if retry && let Some(own) = Claims::read(store, table).await?.of(job_id) {
        return Ok(Some(Claimed {
            claim: own.clone(),
            by_earlier_run: true,
        }));
    }
    let mut claim = Claim {
        place: 0,
        job_id: job_id.to_owned(),
        folders,
    };
    let body = serde_json::to_vec(&claim).map_err(|e| DataFusionError::External(Box::new(e)))?;
    // Past a place found taken, whatever a listing still shows.
    let mut lowest_free = 1;
    loop {
        let after_listed = list_places(store, table)
            .await?
            .last()
            .map_or(1, |last| last + 1);
        claim.place = after_listed.max(lowest_free);
        lowest_free = claim.place + 1;
        let payload = PutPayload::from(body.clone());
        let path = claim_path(table, claim.place);
        let claimed = Claimed {
            claim: claim.clone(),
            by_earlier_run: false,
        };
        match store.put_opts(&path, payload, PutMode::Create.into()).await {
            Ok(_) => return Ok(Some(claimed)),
            // Another overwrite took this place, or this one did, with a
            // request whose answer was lost and that the client sent again.
            Err(object_store::Error::AlreadyExists { .. }) => {
                let taken = read_claim(store, table, claim.place).await?;
                if taken.is_some_and(|taken| taken.job_id == claim.job_id) {
                    return Ok(Some(claimed));
                }
            }
            Err(object_store::Error::NotImplemented { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The claim at `place` in the table at `table`, if it is there.
async fn read_claim(
    store: &Arc<dyn ObjectStore>,
    table: &Path,
    place: u64,
) -> Result<Option<Claim>> {
    let path = claim_path(table, place);
    let Some(bytes) = get_if_exists(store, &path).await? else {
        return Ok(None);
    };
    let claim: Claim = serde_json::from_slice(&bytes).map_err(|e| {
        DataFusionError::Execution(format!(
            "the overwrite claim {path} of '{table}' is not valid: {e}"
        ))
    })?;
    Ok(Some(Claim { place, ..claim }))
}

/// Deletes, of `claims` (read earlier, as an overwrite's [`Standing`]
/// does), those of ended jobs from the oldest up to the first claim of a
/// job still committing (it has no manifest, and its staging folder is
/// there), keeping the last claim, so that a new claim never takes a place
/// below it. Claims made since `claims` were read are kept. Returns how
/// many went.
pub async fn prune(store: &Arc<dyn ObjectStore>, table: &Path, claims: Claims) -> Result<usize> {
    let Some(last) = claims.0.last().map(|claim| claim.place) else {
        return Ok(0);
    };
    // Read after the claims: a job seen committing may only have ended since.
    let (committed, _) = CommittedJobs::read(store, table).await?;
    // Listed only when a job has not committed, which is rare.
    let mut staging = None;
    let mut first_committing = last;
    for claim in &claims.0 {
        if claim.place >= last {
            break;
        }
        if committed.contains(&claim.job_id) {
            continue;
        }
        let staging = match &mut staging {
            Some(staging) => staging,
            None => staging.insert(super::snapshot::staging_jobs(store, table).await?),
        };
        if staging.contains(&claim.job_id) && !abandoned(store, table, &claim.job_id).await? {
            first_committing = claim.place;
            break;
        }
    }
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

/// Whether the job `job_id`, whose staging folder is there, has been
/// committing for longer than [`ABANDONED_AFTER`]. A job whose marker is
/// missing has not started committing, or has just ended.
async fn abandoned(store: &Arc<dyn ObjectStore>, table: &Path, job_id: &str) -> Result<bool> {
    match store.head(&committing_marker(table, job_id)).await {
        Ok(meta) => {
            Ok(chrono::Utc::now().signed_duration_since(meta.last_modified) > ABANDONED_AFTER)
        }
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
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
    use object_store::memory::InMemory;

    use super::*;

    async fn read(store: &Arc<dyn ObjectStore>, table: &Path) -> Claims {
        Claims::read(store, table).await.expect("claims")
    }

    #[tokio::test]
    async fn overwrites_claim_successive_places_and_a_retry_keeps_its_own() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let table = Path::from("t");
        let folders = |names: &[&str]| Some(names.iter().map(|name| name.to_string()).collect());
        let first = claim(&store, &table, "a1", folders(&["p=1"]), false)
            .await
            .expect("claim")
            .expect("ordered");
        assert!(!first.by_earlier_run);
        let first = first.claim;
        let second = claim(&store, &table, "b2", None, false)
            .await
            .expect("claim")
            .expect("ordered")
            .claim;
        assert_eq!((first.place, second.place), (1, 2));
        let again = claim(&store, &table, "a1", folders(&["p=1"]), true)
            .await
            .expect("claim")
            .expect("ordered");
        assert_eq!(
            again,
            Claimed {
                claim: first.clone(),
                by_earlier_run: true
            },
            "a retried commit keeps its place"
        );
        assert!(first.overlaps(&second, |a: &str, b: &str| a == b));

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
        assert_eq!(claims.later(&first).collect::<Vec<_>>(), vec![&whole]);
        assert_eq!(claims.later(&whole).count(), 0);
        assert_eq!(
            claims.earlier_jobs(&whole),
            HashSet::from(["a1".to_owned()])
        );
        assert!(first.covers("p=1", same) && !first.covers("p=2", same));
        assert!(whole.covers("p=2", same), "the whole table");

        // Only a later claim whose job committed takes its partitions.
        let standing = Standing::read(&store, &table, &first)
            .await
            .expect("standing");
        assert!(standing.superseded_by.is_empty());
        store
            .put(
                &Path::from("t/_manifests/b2.json"),
                PutPayload::from_static(b"{}"),
            )
            .await
            .expect("manifest");
        let standing = Standing::read(&store, &table, &first)
            .await
            .expect("standing");
        assert!(standing.superseded("p=7", same));
        assert!(standing.earlier_jobs.is_empty());
    }

    /// Claims places 1 to 3 for jobs 1 to 3, of the whole table.
    async fn claim_three(store: &Arc<dyn ObjectStore>, table: &Path) {
        for job in ["0000000000000001", "0000000000000002", "0000000000000003"] {
            claim(store, table, job, None, false)
                .await
                .expect("claim")
                .expect("ordered");
        }
    }

    /// Hides the objects whose path ends so from listings.
    #[derive(Debug)]
    struct Unlisted(&'static str);

    impl crate::storage::forwarding::StoreHooks for Unlisted {
        fn lists(&self, location: &Path) -> bool {
            !location.as_ref().ends_with(self.0)
        }
    }

    /// A put whose answer was lost is sent again by the client, and finds
    /// the claim it made: that is the job's place, not another's.
    #[tokio::test]
    async fn a_put_that_finds_its_own_claim_keeps_that_place() {
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let table = Path::from("t");
        let own = serde_json::to_vec(&Claim {
            place: 1,
            job_id: "a1".into(),
            folders: None,
        })
        .expect("json");
        let first = claim_path(&table, 1);
        inner.put(&first, own.into()).await.expect("put");
        // Listings miss it, as they miss a put whose answer is still on
        // its way: the claim tries the same place again.
        let store: Arc<dyn ObjectStore> = Arc::new(crate::storage::forwarding::Forwarding::new(
            Arc::clone(&inner),
            Unlisted("1.claim"),
        ));
        let claimed = claim(&store, &table, "a1", None, false)
            .await
            .expect("claim")
            .expect("ordered");
        assert_eq!(claimed.claim.place, 1);
        // Another job's claim there sends it to the next place.
        let other = claim(&store, &table, "b2", None, false)
            .await
            .expect("claim")
            .expect("ordered");
        assert_eq!(other.claim.place, 2);
    }

    #[tokio::test]
    async fn pruning_keeps_the_claims_from_the_first_job_still_committing() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let table = Path::from("t");
        claim_three(&store, &table).await;
        let put = |path: &str| {
            let store = Arc::clone(&store);
            let path = Path::from(path);
            async move { store.put(&path, PutPayload::new()).await.expect("put") }
        };
        // The first committed, the second is committing, the third failed
        // and was rolled back.
        put("t/_manifests/0000000000000001.json").await;
        put("t/_temporary/0000000000000002/_committing").await;
        assert_eq!(
            prune(&store, &table, read(&store, &table).await)
                .await
                .expect("prune"),
            1
        );
        assert_eq!(list_places(&store, &table).await.expect("list"), vec![2, 3]);

        // Once the second has committed, only the last claim stays.
        put("t/_manifests/0000000000000002.json").await;
        store
            .delete(&Path::from("t/_temporary/0000000000000002/_committing"))
            .await
            .expect("delete");
        assert_eq!(
            prune(&store, &table, read(&store, &table).await)
                .await
                .expect("prune"),
            1
        );
        assert_eq!(list_places(&store, &table).await.expect("list"), vec![3]);
        let next = claim(&store, &table, "0000000000000004", None, false)
            .await
            .expect("claim")
            .expect("ordered");
        assert_eq!(next.claim.place, 4, "never below the last claim");
    }

    /// A job committing for more than a day was abandoned with its cluster:
    /// its claim does not hold the later ones.
    #[tokio::test]
    async fn pruning_passes_a_job_committing_for_a_day() {
        let folder = tempfile::tempdir().expect("temp folder");
        let store: Arc<dyn ObjectStore> = Arc::new(
            object_store::local::LocalFileSystem::new_with_prefix(folder.path()).expect("store"),
        );
        let table = Path::from("t");
        claim_three(&store, &table).await;
        let marker = committing_marker(&table, "0000000000000001");
        store.put(&marker, PutPayload::new()).await.expect("mark");
        // Committing for a minute: it holds every later claim.
        assert_eq!(
            prune(&store, &table, read(&store, &table).await)
                .await
                .expect("prune"),
            0
        );
        let two_days_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(172_800);
        std::fs::File::options()
            .write(true)
            .open(folder.path().join(marker.as_ref()))
            .and_then(|file| file.set_modified(two_days_ago))
            .expect("age the marker");
        assert_eq!(
            prune(&store, &table, read(&store, &table).await)
                .await
                .expect("prune"),
            2
        );
        assert_eq!(list_places(&store, &table).await.expect("list"), vec![3]);
    }
}
