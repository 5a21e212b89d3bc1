//! An executor's own map outputs, held in memory or in files.
//!
//! Most map outputs are small: in a short query each task writes a few
//! kilobytes. Creating, renaming and later deleting two files per task then
//! costs more than the rows do (0.2 to 0.4 ms a file on the ext4 disks that
//! the benchmarks ran on). So an output of at most [`MAX_HELD_OUTPUT_BYTES`]
//! is held in memory, under a reservation from the executor's memory pool and
//! within the executor's limit for held outputs; every other output is a data
//! file and an index under the work dir ([`super::layout`]).
//!
//! Readers see the same thing either way: the IPC streams of the output
//! partitions one after the other, with the same offsets and block checksums.
//! A held output is lost with its process, as its files would be once the
//! restarted executor cleans its work dir; the scheduler recomputes both.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};

use super::layout::{Index, MapOutputId, Segment, SegmentSource, open_segment};
use crate::error::{Error, Result};

/// The largest map output held in memory. Larger ones gain little: their
/// time goes into the rows, not into creating files.
pub const MAX_HELD_OUTPUT_BYTES: usize = 16 * 1024 * 1024;

/// Where one executor's map outputs live.
#[derive(Debug)]
pub struct LocalOutputs {
    work_dir: PathBuf,
    /// The most bytes held at once; 0 holds nothing in memory.
    limit: u64,
    held: Mutex<Held>,
}

#[derive(Debug)]
struct Held {
    outputs: HashMap<MapOutputId, HeldOutput>,
    bytes: u64,
    /// Held bytes, counted in the executor's memory pool; `None` where
    /// there is no pool (the limit alone applies).
    reservation: Option<MemoryReservation>,
}

#[derive(Debug)]
struct HeldOutput {
    data: Bytes,
    index: Index,
    since: Instant,
}

/// A map output that could not be held: its bytes, to be written as a file.
#[derive(Debug)]
pub struct Refused {
    pub data: Vec<u8>,
    pub index: Index,
}

impl LocalOutputs {
    /// Outputs under `work_dir`, holding up to `limit` bytes in memory,
    /// counted in `pool` when there is one.
    pub fn new(work_dir: PathBuf, limit: u64, pool: Option<&Arc<dyn MemoryPool>>) -> Self {
        let reservation = pool.map(|pool| MemoryConsumer::new("HeldShuffleOutputs").register(pool));
        Self {
            work_dir,
            limit,
            held: Mutex::new(Held {
                outputs: HashMap::new(),
                bytes: 0,
                reservation,
            }),
        }
    }

    /// Outputs that are always files under `work_dir`.
    pub fn on_disk(work_dir: PathBuf) -> Self {
        Self::new(work_dir, 0, None)
    }

    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// How many bytes an output may buffer in memory before it goes to a file.
    pub fn room(&self) -> usize {
        let held = self.lock();
        let free = self.limit.saturating_sub(held.bytes);
        usize::try_from(free).map_or(MAX_HELD_OUTPUT_BYTES, |free| {
            free.min(MAX_HELD_OUTPUT_BYTES)
        })
    }

    /// Holds a finished map output in memory, or gives it back when it does
    /// not fit (the limit, or the memory pool, says no).
    pub fn hold(
        &self,
        id: &MapOutputId,
        mut data: Vec<u8>,
        index: Index,
    ) -> std::result::Result<(), Refused> {
        let size = data.len() as u64;
        let mut held = self.lock();
        let fits = self.limit > 0
            && size <= MAX_HELD_OUTPUT_BYTES as u64
            && held.bytes + size <= self.limit;
        let reserved = fits
            && held
                .reservation
                .as_mut()
                .is_none_or(|reservation| reservation.try_grow(data.len()).is_ok());
        if !reserved {
            return Err(Refused { data, index });
        }
        held.bytes += size;
        // What is counted is what stays allocated.
        data.shrink_to_fit();
        let output = HeldOutput {
            data: data.into(),
            index,
            since: Instant::now(),
        };
        if let Some(replaced) = held.outputs.insert(id.clone(), output) {
            // The same attempt cannot run twice; keep the counts right anyway.
            held.release(replaced.data.len());
        }
        Ok(())
    }

    /// Output partition `partition` of a map output, from memory or from its files.
    pub fn open_segment(&self, id: &MapOutputId, partition: usize) -> Result<Segment> {
        let held = {
            let held = self.lock();
            held.outputs
                .get(id)
                .map(|output| (output.data.clone(), output.index.clone()))
        };
        match held {
            Some((data, mut index)) => {
                Segment::of_partition(SegmentSource::Memory(data), &mut index, partition)
            }
            None => open_segment(&self.work_dir, id, partition),
        }
    }

    /// The whole data of a map output (every partition's stream).
    pub fn data(&self, id: &MapOutputId) -> Result<Bytes> {
        if let Some(output) = self.lock().outputs.get(id) {
            return Ok(output.data.clone());
        }
        let path = id.data_path(&self.work_dir);
        std::fs::read(&path)
            .map(Bytes::from)
            .map_err(|e| Error::io(&path, e))
    }

    /// Whether a map output is held in memory.
    pub fn is_held(&self, id: &MapOutputId) -> bool {
        self.lock().outputs.contains_key(id)
    }

    /// Bytes held in memory now.
    pub fn held_bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Drops the outputs of a job held in memory (its files are the caller's).
    pub fn remove_job(&self, job_id: &str) {
        self.lock().remove_where(|id, _| id.job_id == job_id);
    }

    /// Drops the held outputs of jobs whose newest output is older than
    /// `ttl`, except jobs in `running`; returns the jobs dropped. The memory
    /// side of the work dir's sweeper, for jobs whose removal was lost.
    pub fn sweep(&self, ttl: Duration, running: &HashSet<String>, now: Instant) -> Vec<String> {
        let mut held = self.lock();
        let mut newest: HashMap<&str, Instant> = HashMap::new();
        for (id, output) in &held.outputs {
            let since = newest.entry(id.job_id.as_str()).or_insert(output.since);
            *since = (*since).max(output.since);
        }
        let stale: HashSet<String> = newest
            .into_iter()
            .filter(|(job, since)| {
                !running.contains(*job) && now.saturating_duration_since(*since) > ttl
            })
            .map(|(job, _)| job.to_owned())
            .collect();
        held.remove_where(|id, _| stale.contains(&id.job_id));
        stale.into_iter().collect()
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Held {
    fn remove_where(&mut self, selected: impl Fn(&MapOutputId, &HeldOutput) -> bool) {
        let mut freed = 0;
        self.outputs.retain(|id, output| {
            let keep = !selected(id, output);
            if !keep {
                freed += output.data.len();
            }
            keep
        });
        self.release(freed);
    }

    fn release(&mut self, bytes: usize) {
        self.bytes -= bytes as u64;
        if let Some(reservation) = &mut self.reservation {
            reservation.shrink(bytes.min(reservation.size()));
        }
    }
}

#[cfg(test)]
mod tests {
    use datafusion::execution::memory_pool::GreedyMemoryPool;

    use super::*;
    use crate::shuffle::layout::{CHECKSUM_BLOCK_BYTES, ChecksummingWriter};

    fn id(job: &str, map: u32) -> MapOutputId {
        MapOutputId::new(job, 1, map, 0).expect("id")
    }

    /// A map output of the given partitions, with its index.
    fn output(partitions: &[&[u8]]) -> (Vec<u8>, Index) {
        let mut writer = ChecksummingWriter::new(Vec::new(), CHECKSUM_BLOCK_BYTES);
        for partition in partitions {
            std::io::Write::write_all(&mut writer, partition).expect("write");
            writer.end_partition();
        }
        writer.finish()
    }

    fn read(outputs: &LocalOutputs, id: &MapOutputId, partition: usize) -> Vec<u8> {
        let blocks = outputs
            .open_segment(id, partition)
            .expect("segment")
            .blocks()
            .expect("blocks");
        blocks
            .map(|block| block.expect("block").to_vec())
            .collect::<Vec<_>>()
            .concat()
    }

    #[test]
    fn a_held_output_reads_partition_by_partition() {
        let dir = tempfile::tempdir().expect("dir");
        let outputs = LocalOutputs::new(dir.path().to_owned(), 1024, None);
        let (data, index) = output(&[b"first", b"", b"third"]);
        outputs.hold(&id("j", 0), data, index).expect("held");
        assert_eq!(read(&outputs, &id("j", 0), 0), b"first");
        assert_eq!(read(&outputs, &id("j", 0), 1), b"");
        assert_eq!(read(&outputs, &id("j", 0), 2), b"third");
        assert!(matches!(
            outputs.open_segment(&id("j", 0), 3),
            Err(Error::PartitionOutOfRange { .. })
        ));
        assert_eq!(&outputs.data(&id("j", 0)).expect("data")[..], b"firstthird");
        // Nothing went to disk.
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    }

    #[test]
    fn outputs_over_the_limit_or_the_pool_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let outputs = LocalOutputs::new(dir.path().to_owned(), 8, None);
        let (data, index) = output(&[b"12345"]);
        outputs.hold(&id("j", 0), data, index).expect("held");
        assert_eq!(outputs.room(), 3);
        let (data, index) = output(&[b"6789"]);
        let refused = outputs
            .hold(&id("j", 1), data, index)
            .expect_err("over the limit");
        assert_eq!(refused.data, b"6789");

        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(4));
        let outputs = LocalOutputs::new(dir.path().to_owned(), 1024, Some(&pool));
        let (data, index) = output(&[b"12345"]);
        assert!(
            outputs.hold(&id("j", 0), data, index).is_err(),
            "the pool is too small"
        );
        let (data, index) = output(&[b"1234"]);
        outputs
            .hold(&id("j", 0), data, index)
            .expect("fits the pool");
        assert_eq!(pool.reserved(), 4);
        outputs.remove_job("j");
        assert_eq!(pool.reserved(), 0);
        assert_eq!(outputs.held_bytes(), 0);
    }

    #[test]
    fn removing_a_job_keeps_the_others_and_falls_back_to_files() {
        let dir = tempfile::tempdir().expect("dir");
        let outputs = LocalOutputs::new(dir.path().to_owned(), 1024, None);
        for job in ["a", "b"] {
            let (data, index) = output(&[job.as_bytes()]);
            outputs.hold(&id(job, 0), data, index).expect("held");
        }
        outputs.remove_job("a");
        assert!(!outputs.is_held(&id("a", 0)));
        assert_eq!(read(&outputs, &id("b", 0), 0), b"b");
        // What is not held is looked for on disk, and is missing there.
        assert!(matches!(
            outputs.open_segment(&id("a", 0), 0),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn the_sweep_drops_old_jobs_that_are_not_running() {
        let outputs = LocalOutputs::new(PathBuf::from("/nonexistent"), 1024, None);
        for job in ["done", "running"] {
            let (data, index) = output(&[b"x"]);
            outputs.hold(&id(job, 0), data, index).expect("held");
        }
        let running = HashSet::from(["running".to_owned()]);
        let ttl = Duration::from_secs(30);
        assert!(
            outputs.sweep(ttl, &running, Instant::now()).is_empty(),
            "too young"
        );
        let later = Instant::now() + Duration::from_secs(60);
        assert_eq!(outputs.sweep(ttl, &running, later), vec!["done".to_owned()]);
        assert!(outputs.is_held(&id("running", 0)));
        assert_eq!(outputs.held_bytes(), 1);
    }
}
