//! On-disk layout of map outputs.
//!
//! Each map task attempt writes one data file holding every output partition,
//! one after the other, each as a complete Arrow IPC stream, and an index file
//! with the byte offset of each partition:
//!
//! ```text
//! {work_dir}/{job_id}/stage-{stage}/map-{partition}-attempt-{attempt}.data
//! {work_dir}/{job_id}/stage-{stage}/map-{partition}-attempt-{attempt}.index
//! ```
//!
//! Index format: the magic `QVIX`, a little-endian `u32` partition count `n`,
//! then `n + 1` little-endian `u64` offsets; partition `p` spans
//! `offsets[p]..offsets[p + 1]` and the last offset is the data file length.
//! Both files are written under a temporary name and renamed into place, so a
//! killed attempt never leaves a partial file under a final name.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const INDEX_MAGIC: &[u8; 4] = b"QVIX";

/// Identifies one map task attempt's output. Every field that reaches a path is
/// validated, so a ticket from the network can never point outside the work dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapOutputId {
    pub job_id: String,
    pub stage_id: u32,
    pub map_partition: u32,
    pub attempt: u32,
}

impl MapOutputId {
    pub fn new(job_id: &str, stage_id: u32, map_partition: u32, attempt: u32) -> Result<Self> {
        validate_identifier("job_id", job_id)?;
        Ok(Self {
            job_id: job_id.to_owned(),
            stage_id,
            map_partition,
            attempt,
        })
    }

    fn stem(&self, work_dir: &Path) -> PathBuf {
        job_dir(work_dir, &self.job_id)
            .join(format!("stage-{}", self.stage_id))
            .join(format!(
                "map-{}-attempt-{}",
                self.map_partition, self.attempt
            ))
    }

    pub fn data_path(&self, work_dir: &Path) -> PathBuf {
        self.stem(work_dir).with_extension("data")
    }

    pub fn index_path(&self, work_dir: &Path) -> PathBuf {
        self.stem(work_dir).with_extension("index")
    }
}

/// The folder holding all of a job's shuffle data on one executor.
pub fn job_dir(work_dir: &Path, job_id: &str) -> PathBuf {
    work_dir.join(job_id)
}

/// Accepts identifiers made of ASCII letters, digits, `-` and `_` (1 to 64 characters).
pub fn validate_identifier(field: &'static str, value: &str) -> Result<()> {
    let valid = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidIdentifier {
            field,
            value: value.chars().take(80).collect(),
        })
    }
}

/// Encodes the index of a data file whose partitions end at `ends`.
pub fn encode_index(offsets: &[u64]) -> Vec<u8> {
    let count = offsets.len().saturating_sub(1) as u32;
    let mut out = Vec::with_capacity(8 + offsets.len() * 8);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&count.to_le_bytes());
    for offset in offsets {
        out.extend_from_slice(&offset.to_le_bytes());
    }
    out
}

/// Decodes and checks an index; `data_len` is the length of its data file.
pub fn decode_index(path: &Path, bytes: &[u8], data_len: u64) -> Result<Vec<u64>> {
    let corrupt = |reason: String| Error::CorruptIndex {
        path: path.display().to_string(),
        reason,
    };
    if bytes.len() < 8 || &bytes[..4] != INDEX_MAGIC {
        return Err(corrupt("missing magic header".into()));
    }
    let count = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    let expected = 8 + (count + 1) * 8;
    if bytes.len() != expected {
        return Err(corrupt(format!(
            "expected {expected} bytes for {count} partitions, found {}",
            bytes.len()
        )));
    }
    let offsets: Vec<u64> = bytes[8..]
        .chunks_exact(8)
        .map(|chunk| {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            u64::from_le_bytes(word)
        })
        .collect();
    if offsets.first() != Some(&0) || offsets.windows(2).any(|w| w[0] > w[1]) {
        return Err(corrupt("offsets are not ascending from zero".into()));
    }
    if offsets.last() != Some(&data_len) {
        return Err(corrupt(format!(
            "index ends at {} but the data file has {data_len} bytes",
            offsets.last().copied().unwrap_or_default()
        )));
    }
    Ok(offsets)
}

/// A byte range of a data file that holds one output partition.
#[derive(Debug)]
pub struct Segment {
    pub file: File,
    pub len: u64,
}

impl Segment {
    /// A reader positioned at the partition's first byte that stops at its last.
    pub fn into_reader(self) -> std::io::Take<BufReader<File>> {
        BufReader::with_capacity(256 * 1024, self.file).take(self.len)
    }
}

/// Opens output partition `partition` of a map output stored under `work_dir`.
pub fn open_segment(work_dir: &Path, id: &MapOutputId, partition: usize) -> Result<Segment> {
    let index_path = id.index_path(work_dir);
    let data_path = id.data_path(work_dir);
    let index = std::fs::read(&index_path).map_err(|e| Error::io(&index_path, e))?;
    let mut file = File::open(&data_path).map_err(|e| Error::io(&data_path, e))?;
    let data_len = file.metadata().map_err(|e| Error::io(&data_path, e))?.len();
    let offsets = decode_index(&index_path, &index, data_len)?;
    let count = offsets.len() - 1;
    if partition >= count {
        return Err(Error::PartitionOutOfRange { partition, count });
    }
    let (start, end) = (offsets[partition], offsets[partition + 1]);
    file.seek(SeekFrom::Start(start))
        .map_err(|e| Error::io(&data_path, e))?;
    Ok(Segment {
        file,
        len: end - start,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trips() {
        let bytes = encode_index(&[0, 10, 10, 25]);
        let offsets = decode_index(Path::new("x"), &bytes, 25).expect("valid");
        assert_eq!(offsets, vec![0, 10, 10, 25]);
    }

    #[test]
    fn corrupt_indexes_are_rejected() {
        let bytes = encode_index(&[0, 10, 25]);
        assert!(
            decode_index(Path::new("x"), &bytes, 24).is_err(),
            "length mismatch"
        );
        assert!(decode_index(Path::new("x"), &bytes[..bytes.len() - 1], 25).is_err());
        assert!(decode_index(Path::new("x"), b"garbage!", 0).is_err());
        let descending = encode_index(&[0, 30, 25]);
        assert!(decode_index(Path::new("x"), &descending, 25).is_err());
    }

    #[test]
    fn identifiers_cannot_escape_the_work_dir() {
        for bad in ["../etc", "a/b", "", "..", "a b", &"x".repeat(65)] {
            assert!(MapOutputId::new(bad, 1, 0, 0).is_err(), "{bad:?} accepted");
        }
        let id = MapOutputId::new("job-1_a", 2, 3, 1).expect("valid");
        assert_eq!(
            id.data_path(Path::new("/w")),
            PathBuf::from("/w/job-1_a/stage-2/map-3-attempt-1.data")
        );
    }
}
