//! The scheduler's durable state, in an embedded redb database: the catalog's
//! definitions and the job history. Both survive a restart; tests and the
//! embedded cluster use the same code on an in-memory backend.
//!
//! Values are the protobuf messages of `quiver.proto` (`CatalogEntry`,
//! `JobRecord`, `JobStores`...), so the store needs no format of its own. Writes are
//! synchronous and small; callers run them off the event loop
//! ([`JobRecorder`] for the job history).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use prost::Message;
use quiver_core::write::{JobEnded, Settled};
use quiver_proto::{CatalogEntry, JobRecord, JobStores, PendingTable, StorageLeft, StoreConfig};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tracing::warn;

use crate::state::{JobDirectory, note_write_committed};

/// Catalog objects by kind and qualified name (`table:datafusion.public.t`).
const CATALOG: TableDefinition<&str, &[u8]> = TableDefinition::new("catalog");
/// Job records by job id.
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// Tables that `CREATE TABLE ... AS` jobs register once they succeed, by job id.
const PENDING_TABLES: TableDefinition<&str, &[u8]> = TableDefinition::new("pending_tables");
/// The stores of running jobs that leave data to settle, by job id: secrets
/// included, like the catalog's statements.
const JOB_STORES: TableDefinition<&str, &[u8]> = TableDefinition::new("job_stores");

/// What jobs may still have left in object storage (their durable map
/// outputs, their write's staging folder), by job id: secrets included,
/// like the job stores. Named when it held durable map outputs only, as the
/// stores of earlier versions have it.
const STORAGE_LEFT: TableDefinition<&str, &[u8]> = TableDefinition::new("durable_left");

/// Jobs whose write a settling found committed though the job did not
/// succeed, by job id (empty values): later settlings, at restarts too,
/// take them as jobs that succeeded, so that nothing of a committed write
/// is ever rolled back. Kept as long as the job's record.
const WRITES_COMMITTED: TableDefinition<&str, &[u8]> = TableDefinition::new("writes_committed");

/// Finished jobs kept in the history; older ones are pruned.
pub const JOB_HISTORY_LIMIT: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the state folder {path}: {source}")]
    Folder {
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error("state store error: {0}")]
    Database(#[from] redb::Error),

    #[error("corrupt record in the state store: {0}")]
    Corrupt(#[from] prost::DecodeError),
}

/// redb reports each kind of failure with a type of its own; here all of them
/// are database errors.
macro_rules! database_errors {
    ($($source:ty),* $(,)?) => {$(
        impl From<$source> for StoreError {
            fn from(error: $source) -> Self {
                Self::Database(error.into())
            }
        }
    )*};
}

database_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
);

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The embedded store; cheap to clone.
#[derive(Clone)]
pub struct StateStore {
    db: Arc<Database>,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore").finish_non_exhaustive()
    }
}

impl StateStore {
    /// Opens (or creates) the store in `folder`.
    pub fn open(folder: &Path) -> Result<Self> {
        std::fs::create_dir_all(folder).map_err(|source| StoreError::Folder {
            path: folder.display().to_string(),
            source,
        })?;
        Self::init(Database::create(folder.join("scheduler.redb"))?)
    }

    /// A store that lives and dies with the process.
    pub fn in_memory() -> Result<Self> {
        Self::init(Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?)
    }

    fn init(db: Database) -> Result<Self> {
        let write = db.begin_write()?;
        write.open_table(CATALOG)?;
        write.open_table(JOBS)?;
        write.open_table(PENDING_TABLES)?;
        write.open_table(JOB_STORES)?;
        write.open_table(STORAGE_LEFT)?;
        write.open_table(WRITES_COMMITTED)?;
        write.commit()?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Adds or replaces a catalog object.
    pub fn put_catalog_entry(&self, key: &str, entry: &CatalogEntry) -> Result<()> {
        let write = self.db.begin_write()?;
        write
            .open_table(CATALOG)?
            .insert(key, entry.encode_to_vec().as_slice())?;
        write.commit()?;
        Ok(())
    }

    /// Stores a new catalog object under `key`, numbered after every stored
    /// one, unless `if_absent` and the key is taken. One transaction, so two
    /// statements at once never get the same number.
    pub fn add_catalog_entry(
        &self,
        key: &str,
        mut entry: CatalogEntry,
        if_absent: bool,
    ) -> Result<()> {
        let write = self.db.begin_write()?;
        {
            let mut table = write.open_table(CATALOG)?;
            if if_absent && table.get(key)?.is_some() {
                return Ok(());
            }
            entry.seq = next_seq(&table)?;
            table.insert(key, entry.encode_to_vec().as_slice())?;
        }
        write.commit()?;
        Ok(())
    }

    /// The catalog object stored under `key`, if any.
    pub fn catalog_entry(&self, key: &str) -> Result<Option<CatalogEntry>> {
        let read = self.db.begin_read()?;
        let table = read.open_table(CATALOG)?;
        let Some(bytes) = table.get(key)? else {
            return Ok(None);
        };
        Ok(Some(CatalogEntry::decode(bytes.value())?))
    }

    /// Whether a catalog object is stored under `key`.
    pub fn has_catalog_entry(&self, key: &str) -> Result<bool> {
        let read = self.db.begin_read()?;
        Ok(read.open_table(CATALOG)?.get(key)?.is_some())
    }

    /// Removes the catalog objects whose key `matches`; returns how many.
    pub fn remove_catalog_entries(&self, matches: impl Fn(&str) -> bool) -> Result<usize> {
        let write = self.db.begin_write()?;
        let removed = {
            let mut table = write.open_table(CATALOG)?;
            let before = table.len()?;
            table.retain(|key, _| !matches(key))?;
            before - table.len()?
        };
        write.commit()?;
        Ok(removed as usize)
    }

    /// Every catalog object with its key, in creation order.
    pub fn keyed_catalog_entries(&self) -> Result<Vec<(String, CatalogEntry)>> {
        let read = self.db.begin_read()?;
        let table = read.open_table(CATALOG)?;
        let mut entries = table
            .iter()?
            .map(|row| {
                let (key, value) = row?;
                Ok((key.value().to_owned(), CatalogEntry::decode(value.value())?))
            })
            .collect::<Result<Vec<(String, CatalogEntry)>>>()?;
        entries.sort_by_key(|(_, entry)| entry.seq);
        Ok(entries)
    }

    /// Every catalog object, in creation order.
    pub fn catalog_entries(&self) -> Result<Vec<CatalogEntry>> {
        let keyed = self.keyed_catalog_entries()?;
        Ok(keyed.into_iter().map(|(_, entry)| entry).collect())
    }

    /// The next catalog sequence number.
    pub fn next_catalog_seq(&self) -> Result<u64> {
        next_seq(&self.db.begin_read()?.open_table(CATALOG)?)
    }

    /// Stores the table that a `CREATE TABLE ... AS` job registers once it
    /// succeeds.
    pub fn put_pending_table(&self, pending: &PendingTable) -> Result<()> {
        let write = self.db.begin_write()?;
        write
            .open_table(PENDING_TABLES)?
            .insert(pending.job_id.as_str(), pending.encode_to_vec().as_slice())?;
        write.commit()?;
        Ok(())
    }

    /// Forgets the pending table of `job_id`: registered, or never to be.
    pub fn remove_pending_table(&self, job_id: &str) -> Result<()> {
        let write = self.db.begin_write()?;
        write.open_table(PENDING_TABLES)?.remove(job_id)?;
        write.commit()?;
        Ok(())
    }

    /// Every pending table.
    pub fn pending_tables(&self) -> Result<Vec<PendingTable>> {
        decode_all(&self.db.begin_read()?.open_table(PENDING_TABLES)?)
    }

    /// Writes job records and stores, in order, in one transaction. A
    /// finished job's stores are forgotten with its final record, unless
    /// its write is still to be settled.
    pub fn put_job_entries(&self, entries: &[JobEntry]) -> Result<()> {
        let write = self.db.begin_write()?;
        {
            let mut jobs = write.open_table(JOBS)?;
            let mut stores = write.open_table(JOB_STORES)?;
            let mut durable = write.open_table(STORAGE_LEFT)?;
            let mut committed = write.open_table(WRITES_COMMITTED)?;
            for entry in entries {
                match entry {
                    JobEntry::Record(record) => {
                        let job_id = record
                            .status
                            .as_ref()
                            .map(|status| status.job_id.as_str())
                            .unwrap_or_default();
                        // A final record written after its write was found
                        // committed keeps saying so.
                        let marked = committed
                            .get(job_id)?
                            .and_then(|_| marked_write_committed(record));
                        let record = marked.as_ref().unwrap_or(record);
                        jobs.insert(job_id, record.encode_to_vec().as_slice())?;
                        if record.finished_at_unix_ms > 0 && !record.write_unsettled {
                            stores.remove(job_id)?;
                        }
                    }
                    JobEntry::Stores(kept) => {
                        stores.insert(kept.job_id.as_str(), kept.encode_to_vec().as_slice())?;
                    }
                    JobEntry::StorageLeft(left) => {
                        // Kept as its job's acceptance recorded it: a restart
                        // recording it again must not put off its give-up.
                        let known = durable.get(left.job_id.as_str())?.is_some();
                        if !known {
                            durable
                                .insert(left.job_id.as_str(), left.encode_to_vec().as_slice())?;
                        }
                    }
                    JobEntry::StorageCleaned(job_id) => {
                        durable.remove(job_id.as_str())?;
                    }
                    JobEntry::WriteCommitted(job_id) => {
                        committed.insert(job_id.as_str(), [].as_slice())?;
                        let recorded = jobs
                            .get(job_id.as_str())?
                            .map(|record| JobRecord::decode(record.value()))
                            .transpose()?;
                        if let Some(marked) = recorded.as_ref().and_then(marked_write_committed) {
                            jobs.insert(job_id.as_str(), marked.encode_to_vec().as_slice())?;
                        }
                    }
                }
            }
        }
        write.commit()?;
        Ok(())
    }

    /// The stores kept for jobs that were running when the scheduler
    /// stopped, by job id; they are removed from the store, as no job runs
    /// when this is called (at start).
    pub fn take_job_stores(&self) -> Result<HashMap<String, Vec<StoreConfig>>> {
        let write = self.db.begin_write()?;
        let kept: Vec<JobStores> = {
            let mut table = write.open_table(JOB_STORES)?;
            let kept = decode_all(&table)?;
            table.retain(|_, _| false)?;
            kept
        };
        write.commit()?;
        Ok(kept
            .into_iter()
            .map(|kept| (kept.job_id, kept.stores))
            .collect())
    }

    /// What jobs may still have left in object storage.
    pub fn storage_left(&self) -> Result<Vec<StorageLeft>> {
        decode_all(&self.db.begin_read()?.open_table(STORAGE_LEFT)?)
    }

    /// The jobs whose write a settling found committed though they did not
    /// succeed (see [`WRITES_COMMITTED`]).
    pub fn writes_committed(&self) -> Result<HashSet<String>> {
        let read = self.db.begin_read()?;
        let table = read.open_table(WRITES_COMMITTED)?;
        table
            .iter()?
            .map(|row| Ok(row?.0.value().to_owned()))
            .collect()
    }

    /// The record of `job_id`, if the history holds it.
    pub fn job(&self, job_id: &str) -> Result<Option<JobRecord>> {
        let read = self.db.begin_read()?;
        let jobs = read.open_table(JOBS)?;
        Ok(jobs
            .get(job_id)?
            .map(|record| JobRecord::decode(record.value()))
            .transpose()?)
    }

    /// Every job record, oldest first.
    pub fn jobs(&self) -> Result<Vec<JobRecord>> {
        let mut records: Vec<JobRecord> = decode_all(&self.db.begin_read()?.open_table(JOBS)?)?;
        records.sort_by_key(|record| record.submitted_at_unix_ms);
        Ok(records)
    }

    /// Removes the oldest finished jobs beyond `keep`. A job whose storage
    /// is still to clean up is kept: its clean-up needs to know how it ended.
    pub fn prune_jobs(&self, keep: usize) -> Result<usize> {
        let left: HashSet<String> = self
            .storage_left()?
            .into_iter()
            .map(|left| left.job_id)
            .collect();
        let finished: Vec<String> = self
            .jobs()?
            .into_iter()
            .filter(|record| record.finished_at_unix_ms > 0)
            .filter_map(|record| record.status.map(|status| status.job_id))
            .filter(|job_id| !left.contains(job_id))
            .collect();
        let excess = finished.len().saturating_sub(keep);
        if excess == 0 {
            return Ok(0);
        }
        let write = self.db.begin_write()?;
        {
            let mut table = write.open_table(JOBS)?;
            let mut committed = write.open_table(WRITES_COMMITTED)?;
            for job_id in &finished[..excess] {
                table.remove(job_id.as_str())?;
                committed.remove(job_id.as_str())?;
            }
        }
        write.commit()?;
        Ok(excess)
    }
}

/// Every value of a table, decoded as the message `M`.
/// `record` marked as that of a job whose write committed although it did
/// not succeed ([`note_write_committed`]); `None` if that changes nothing,
/// or if a restarted scheduler is still settling its write (it records
/// how the job ended once it has).
fn marked_write_committed(record: &JobRecord) -> Option<JobRecord> {
    if record.write_unsettled {
        return None;
    }
    let mut marked = record.clone();
    let status = marked.status.as_mut()?;
    note_write_committed(status).then_some(marked)
}

fn decode_all<M: Message + Default>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<M>> {
    table
        .iter()?
        .map(|row| Ok(M::decode(row?.1.value())?))
        .collect()
}

/// The catalog sequence number after every stored one.
fn next_seq(table: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<u64> {
    let entries: Vec<CatalogEntry> = decode_all(table)?;
    Ok(entries.iter().map(|entry| entry.seq + 1).max().unwrap_or(1))
}

/// What the [`JobRecorder`] writes.
#[derive(Debug)]
pub enum JobEntry {
    /// A job's entry in the history.
    Record(Box<JobRecord>),
    /// The stores a job runs with, until its final record.
    Stores(JobStores),
    /// What a job may leave in object storage.
    StorageLeft(StorageLeft),
    /// The job's storage is cleaned up: nothing of it is left.
    StorageCleaned(String),
    /// A settling found the write of a job committed: its record is marked
    /// if the job did not succeed.
    WriteCommitted(String),
}

/// Writes job records on a thread of its own, so that the event loop never
/// waits for the disk. Records sent together are written in one transaction.
#[derive(Debug, Clone)]
pub struct JobRecorder {
    sender: std::sync::mpsc::Sender<Queued>,
    /// Where the statuses of ended jobs are shown, to mark those whose
    /// write was found committed.
    directory: JobDirectory,
}

/// What the recorder's thread is sent.
#[derive(Debug)]
enum Queued {
    Entry(JobEntry),
    /// Answered once every entry queued before it is written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

impl JobRecorder {
    pub fn start(store: StateStore, directory: JobDirectory) -> Self {
        let (sender, receiver) = std::sync::mpsc::channel::<Queued>();
        std::thread::Builder::new()
            .name("quiver-job-recorder".into())
            .spawn(move || {
                let mut written = 0usize;
                while let Ok(first) = receiver.recv() {
                    let (mut batch, mut flushes) = (Vec::new(), Vec::new());
                    for queued in std::iter::once(first).chain(receiver.try_iter()) {
                        match queued {
                            Queued::Entry(entry) => batch.push(entry),
                            Queued::Flush(done) => flushes.push(done),
                        }
                    }
                    if !batch.is_empty()
                        && let Err(e) = store.put_job_entries(&batch)
                    {
                        warn!(%e, records = batch.len(), "cannot record jobs");
                    }
                    for done in flushes {
                        let _ = done.send(());
                    }
                    written += batch.len();
                    if written >= JOB_HISTORY_LIMIT / 10 {
                        written = 0;
                        if let Err(e) = store.prune_jobs(JOB_HISTORY_LIMIT) {
                            warn!(%e, "cannot prune the job history");
                        }
                    }
                }
            })
            .map_or_else(
                |e| warn!(%e, "cannot start the job recorder; job history is not persisted"),
                drop,
            );
        Self { sender, directory }
    }

    /// Queues a record to be written.
    pub fn record(&self, record: JobRecord) {
        // The thread only stops with the process.
        let _ = self
            .sender
            .send(Queued::Entry(JobEntry::Record(Box::new(record))));
    }

    /// Waits until every record queued so far is written: a listing read
    /// from the store then shows every job that a client has seen.
    pub async fn flushed(&self) {
        let (done, written) = tokio::sync::oneshot::channel();
        if self.sender.send(Queued::Flush(done)).is_ok() {
            let _ = written.await;
        }
    }

    /// Queues what a job may leave in object storage (its durable map
    /// outputs at `shuffle_location`, its write into `writes_to`; either
    /// may be empty) with its stores, to be kept until its clean-up
    /// succeeds ([`Self::storage_cleaned`]).
    pub fn keep_storage_left(
        &self,
        job_id: &str,
        shuffle_location: &str,
        writes_to: &str,
        stores: &[StoreConfig],
    ) {
        let _ = self
            .sender
            .send(Queued::Entry(JobEntry::StorageLeft(StorageLeft {
                job_id: job_id.to_owned(),
                shuffle_location: shuffle_location.to_owned(),
                writes_to: writes_to.to_owned(),
                stores: stores.to_vec(),
                recorded_at_unix_ms: crate::state::event_loop::unix_millis(),
            })));
    }

    /// Queues noting that a settling found the write of `job_id` committed:
    /// later settlings must not roll it back. A job that ended otherwise
    /// than succeeded is marked as such, in the history and in the
    /// directory of jobs.
    pub fn write_committed(&self, job_id: &str) {
        self.directory.note_write_committed(job_id);
        let _ = self
            .sender
            .send(Queued::Entry(JobEntry::WriteCommitted(job_id.to_owned())));
    }

    /// Marks the write of `job_id` ([`Self::write_committed`]) if a settling
    /// found it committed though the job `ended` otherwise than succeeded;
    /// returns whether it did.
    pub fn note_settled(&self, job_id: &str, ended: JobEnded, settled: &Settled) -> bool {
        let committed_anyway =
            ended == JobEnded::Otherwise && matches!(settled, Settled::Committed { .. });
        if committed_anyway {
            self.write_committed(job_id);
        }
        committed_anyway
    }

    /// Queues forgetting what `job_id` left in object storage, cleaned up.
    pub fn storage_cleaned(&self, job_id: &str) {
        let _ = self
            .sender
            .send(Queued::Entry(JobEntry::StorageCleaned(job_id.to_owned())));
    }

    /// Queues the stores of a starting job to be kept until its final
    /// record, for a restarted scheduler to settle its data with.
    pub fn keep_stores(&self, job_id: &str, stores: &[StoreConfig]) {
        let _ = self.sender.send(Queued::Entry(JobEntry::Stores(JobStores {
            job_id: job_id.to_owned(),
            stores: stores.to_vec(),
        })));
    }
}

#[cfg(test)]
mod tests {
    use quiver_proto::{JobState, JobStatus};

    use super::*;

    #[tokio::test]
    async fn a_flushed_recorder_has_written_every_record_queued_before() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = StateStore::open(dir.path()).expect("open");
        let recorder = JobRecorder::start(store.clone(), JobDirectory::default());
        for n in 0..50 {
            recorder.record(record(&format!("{n:016x}"), n, n + 1));
        }
        recorder.flushed().await;
        assert_eq!(store.jobs().expect("jobs").len(), 50);
    }

    fn record(job_id: &str, submitted: u64, finished: u64) -> JobRecord {
        JobRecord {
            status: Some(JobStatus {
                job_id: job_id.into(),
                state: JobState::Succeeded.into(),
                ..JobStatus::default()
            }),
            query: "SELECT 1".into(),
            submitted_at_unix_ms: submitted,
            finished_at_unix_ms: finished,
            ..JobRecord::default()
        }
    }

    #[test]
    fn state_survives_reopening_the_store() {
        let folder = tempfile::tempdir().expect("tempdir");
        {
            let store = StateStore::open(folder.path()).expect("open");
            let entry = |seq: u64, name: &str| CatalogEntry {
                seq,
                kind: "table".into(),
                name: name.into(),
                sql: format!("CREATE VIEW {name} AS SELECT {seq}"),
                settings: Vec::new(),
            };
            store
                .put_catalog_entry("table:b", &entry(2, "b"))
                .expect("put");
            store
                .put_catalog_entry("table:a", &entry(1, "a"))
                .expect("put");
            store
                .put_catalog_entry("table:c", &entry(3, "c"))
                .expect("put");
            assert_eq!(
                store
                    .remove_catalog_entries(|key| key == "table:c")
                    .expect("remove"),
                1
            );
            store
                .put_job_entries(&[
                    JobEntry::Record(record("j1", 10, 20).into()),
                    JobEntry::Record(record("j2", 30, 0).into()),
                ])
                .expect("jobs");
        }
        let store = StateStore::open(folder.path()).expect("reopen");
        let names: Vec<String> = store
            .catalog_entries()
            .expect("entries")
            .into_iter()
            .map(|entry| entry.name)
            .collect();
        assert_eq!(
            names,
            ["a", "b"],
            "in creation order, without the removed one"
        );
        assert_eq!(store.next_catalog_seq().expect("seq"), 3);
        assert!(store.has_catalog_entry("table:a").expect("lookup"));
        let jobs = store.jobs().expect("jobs");
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[1].finished_at_unix_ms, 0);
    }

    #[test]
    fn a_jobs_stores_are_kept_until_its_write_is_settled() {
        let folder = tempfile::tempdir().expect("tempdir");
        let stores = |job_id: &str| {
            JobEntry::Stores(JobStores {
                job_id: job_id.into(),
                stores: vec![StoreConfig {
                    url: "s3://lake".into(),
                    options: [("aws.secret_access_key".into(), job_id.into())].into(),
                }],
            })
        };
        {
            let store = StateStore::open(folder.path()).expect("open");
            store
                .put_job_entries(&[
                    stores("ended"),
                    JobEntry::Record(record("ended", 10, 0).into()),
                    stores("running"),
                    JobEntry::Record(record("running", 20, 0).into()),
                    JobEntry::Record(record("ended", 10, 15).into()),
                    stores("unsettled"),
                    JobEntry::Record(
                        JobRecord {
                            write_unsettled: true,
                            ..record("unsettled", 5, 8)
                        }
                        .into(),
                    ),
                ])
                .expect("entries");
        }
        let store = StateStore::open(folder.path()).expect("reopen");
        let kept = store.take_job_stores().expect("take");
        let mut jobs: Vec<&String> = kept.keys().collect();
        jobs.sort();
        assert_eq!(jobs, ["running", "unsettled"]);
        assert_eq!(
            kept["running"][0].options["aws.secret_access_key"],
            "running"
        );
        assert!(store.take_job_stores().expect("take").is_empty(), "taken");
        assert_eq!(store.jobs().expect("jobs").len(), 3, "records are kept");
    }

    #[test]
    fn storage_stays_recorded_past_its_jobs_end_until_cleaned_up() {
        let folder = tempfile::tempdir().expect("tempdir");
        let left_at = |job_id: &str, recorded_at_unix_ms| {
            JobEntry::StorageLeft(StorageLeft {
                job_id: job_id.into(),
                shuffle_location: "s3://lake/maps".into(),
                writes_to: "s3://lake/table/".into(),
                stores: Vec::new(),
                recorded_at_unix_ms,
            })
        };
        let left = |job_id: &str| left_at(job_id, 1);
        {
            let store = StateStore::open(folder.path()).expect("open");
            store
                .put_job_entries(&[
                    left("deleted"),
                    left("ended"),
                    JobEntry::Record(record("ended", 10, 15).into()),
                    JobEntry::StorageCleaned("deleted".into()),
                    // A restart records an interrupted job again.
                    left_at("ended", 99),
                    JobEntry::WriteCommitted("ended".into()),
                    // Its storage is cleaned up; the mark stays.
                    JobEntry::WriteCommitted("deleted".into()),
                ])
                .expect("entries");
        }
        let store = StateStore::open(folder.path()).expect("reopen");
        let left = store.storage_left().expect("left");
        let jobs: Vec<&str> = left.iter().map(|left| left.job_id.as_str()).collect();
        assert_eq!(jobs, ["ended"], "kept after the job's final record");
        assert_eq!(left[0].shuffle_location, "s3://lake/maps");
        assert_eq!(left[0].writes_to, "s3://lake/table/");
        assert_eq!(left[0].recorded_at_unix_ms, 1, "as first recorded");
        let committed = store.writes_committed().expect("committed");
        assert_eq!(committed, HashSet::from(["ended".into(), "deleted".into()]));
        let record = store.job("ended").expect("read").expect("recorded");
        assert_eq!(record.finished_at_unix_ms, 15);
        assert!(store.job("deleted").expect("read").is_none());
    }

    #[test]
    fn pruning_keeps_the_newest_finished_jobs_and_running_ones() {
        let store = StateStore::in_memory().expect("store");
        let records: Vec<JobRecord> = (1..=5)
            .map(|n| {
                record(
                    &format!("j{n}"),
                    n * 10,
                    if n == 1 { 0 } else { n * 10 + 1 },
                )
            })
            .collect();
        let entries: Vec<JobEntry> = records
            .into_iter()
            .map(|record| JobEntry::Record(record.into()))
            .collect();
        store.put_job_entries(&entries).expect("jobs");
        assert_eq!(store.prune_jobs(2).expect("prune"), 2);
        let kept = || -> Vec<String> {
            store
                .jobs()
                .expect("jobs")
                .into_iter()
                .filter_map(|record| record.status.map(|status| status.job_id))
                .collect()
        };
        assert_eq!(kept(), ["j1", "j4", "j5"]);

        // j2, the oldest finished, has storage left to clean up.
        let records = (2..=3).map(|n| record(&format!("j{n}"), n * 10, n * 10 + 1));
        let mut entries: Vec<JobEntry> = records
            .map(|record| JobEntry::Record(record.into()))
            .collect();
        entries.push(JobEntry::StorageLeft(StorageLeft {
            job_id: "j2".into(),
            writes_to: "s3://lake/table/".into(),
            ..StorageLeft::default()
        }));
        entries.push(JobEntry::WriteCommitted("j3".into()));
        store.put_job_entries(&entries).expect("jobs");
        assert_eq!(store.prune_jobs(2).expect("prune"), 1);
        assert_eq!(kept(), ["j1", "j2", "j4", "j5"]);
        assert!(
            store.writes_committed().expect("marks").is_empty(),
            "pruned with j3"
        );
    }
}
