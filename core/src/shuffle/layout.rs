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
//! Index format: the magic `QVX2`, a little-endian `u32` partition count `n`,
//! then `n + 1` little-endian `u64` offsets, then `n` little-endian `u32`
//! CRC-32 checksums; partition `p` spans `offsets[p]..offsets[p + 1]`, the
//! last offset is the data file length, and checksum `p` covers partition `p`.
//! A reader verifies a partition's checksum before decoding it: corrupt bytes
//! must never reach the Arrow decoder, which would return wrong values for a
//! flipped data bit, and can abort the process on a corrupted length.
//! Both files are written under a temporary name and renamed into place, so a
//! killed attempt never leaves a partial file under a final name.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::error::{Error, Result};

const INDEX_MAGIC: &[u8; 4] = b"QVX2";

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

/// The decoded index of a data file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// `n + 1` ascending offsets, from 0 to the data file length.
    pub offsets: Vec<u64>,
    /// The CRC-32 of each of the `n` partitions.
    pub checksums: Vec<u32>,
}

/// Encodes the index of a data file.
pub fn encode_index(index: &Index) -> Vec<u8> {
    let count = index.checksums.len() as u32;
    let mut out = Vec::with_capacity(8 + index.offsets.len() * 8 + index.checksums.len() * 4);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&count.to_le_bytes());
    for offset in &index.offsets {
        out.extend_from_slice(&offset.to_le_bytes());
    }
    for checksum in &index.checksums {
        out.extend_from_slice(&checksum.to_le_bytes());
    }
    out
}

/// Decodes and checks an index; `data_len` is the length of its data file.
pub fn decode_index(path: &Path, bytes: &[u8], data_len: u64) -> Result<Index> {
    let corrupt = |reason: String| Error::CorruptIndex {
        path: path.display().to_string(),
        reason,
    };
    if bytes.len() < 8 || &bytes[..4] != INDEX_MAGIC {
        return Err(corrupt("missing magic header".into()));
    }
    let count = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    let expected = count
        .checked_mul(12)
        .and_then(|size| size.checked_add(16))
        .ok_or_else(|| corrupt(format!("impossible partition count {count}")))?;
    if bytes.len() != expected {
        return Err(corrupt(format!(
            "expected {expected} bytes for {count} partitions, found {}",
            bytes.len()
        )));
    }
    let (offset_bytes, checksum_bytes) = bytes[8..].split_at((count + 1) * 8);
    let offsets: Vec<u64> = offset_bytes
        .chunks_exact(8)
        .map(|chunk| {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            u64::from_le_bytes(word)
        })
        .collect();
    let checksums = checksum_bytes
        .chunks_exact(4)
        .map(|chunk| u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
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
    Ok(Index { offsets, checksums })
}

/// The CRC-32 of each range `offsets[p]..offsets[p + 1]` of `file`.
pub fn checksum_ranges(file: &mut File, offsets: &[u64]) -> std::io::Result<Vec<u32>> {
    offsets
        .windows(2)
        .map(|range| {
            file.seek(SeekFrom::Start(range[0]))?;
            checksum_of(&mut *file, range[1] - range[0])
        })
        .collect()
}

/// The CRC-32 of the next `len` bytes of `reader`.
fn checksum_of(reader: impl Read, len: u64) -> std::io::Result<u32> {
    let mut hasher = crc32fast::Hasher::new();
    let mut reader = reader.take(len);
    let mut buffer = vec![0u8; 256 * 1024];
    let mut read = 0u64;
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        read += n as u64;
    }
    if read != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("expected {len} bytes, found {read}"),
        ));
    }
    Ok(hasher.finalize())
}

/// A byte range of a data file that holds one output partition.
#[derive(Debug)]
pub struct Segment {
    pub file: File,
    /// Where the partition starts in the file.
    pub start: u64,
    pub len: u64,
    /// The partition's CRC-32, from the index.
    pub checksum: u32,
}

impl Segment {
    /// Reads the partition once to check its checksum, then rewinds to its
    /// start. Costs a second read, from the page cache in practice.
    pub fn verify(&mut self) -> Result<()> {
        let actual = checksum_of(&mut self.file, self.len)
            .and_then(|checksum| {
                self.file.seek(SeekFrom::Start(self.start))?;
                Ok(checksum)
            })
            .map_err(|e| Error::io("shuffle data", e))?;
        if actual == self.checksum {
            Ok(())
        } else {
            Err(Error::CorruptShuffleData(format!(
                "checksum mismatch (expected {:08x}, found {actual:08x})",
                self.checksum
            )))
        }
    }

    /// A reader positioned at the partition's first byte that stops at its last.
    pub fn into_reader(self) -> std::io::Take<BufReader<File>> {
        BufReader::with_capacity(256 * 1024, self.file).take(self.len)
    }
}

/// What a Flight ticket asks for: one output partition of one map output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRequest {
    pub output: MapOutputId,
    pub partition: usize,
}

/// Parses a shuffle ticket from the network. Anything but a well-formed ticket
/// naming safe identifiers is an error.
pub fn parse_ticket(bytes: &[u8]) -> Result<PartitionRequest> {
    let ticket = quiver_proto::ShuffleTicket::decode(bytes).map_err(Error::MalformedTicket)?;
    Ok(PartitionRequest {
        output: MapOutputId::new(
            &ticket.job_id,
            ticket.stage_id,
            ticket.map_partition,
            ticket.attempt,
        )?,
        partition: ticket.output_partition as usize,
    })
}

/// Opens output partition `partition` of a map output stored under `work_dir`.
pub fn open_segment(work_dir: &Path, id: &MapOutputId, partition: usize) -> Result<Segment> {
    let index_path = id.index_path(work_dir);
    let data_path = id.data_path(work_dir);
    let index = std::fs::read(&index_path).map_err(|e| Error::io(&index_path, e))?;
    let mut file = File::open(&data_path).map_err(|e| Error::io(&data_path, e))?;
    let data_len = file.metadata().map_err(|e| Error::io(&data_path, e))?.len();
    let index = decode_index(&index_path, &index, data_len)?;
    let count = index.checksums.len();
    if partition >= count {
        return Err(Error::PartitionOutOfRange { partition, count });
    }
    let (start, end) = (index.offsets[partition], index.offsets[partition + 1]);
    file.seek(SeekFrom::Start(start))
        .map_err(|e| Error::io(&data_path, e))?;
    Ok(Segment {
        file,
        start,
        len: end - start,
        checksum: index.checksums[partition],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(offsets: &[u64]) -> Index {
        Index {
            offsets: offsets.to_vec(),
            checksums: (1..offsets.len() as u32).collect(),
        }
    }

    #[test]
    fn index_round_trips() {
        let bytes = encode_index(&index(&[0, 10, 10, 25]));
        let decoded = decode_index(Path::new("x"), &bytes, 25).expect("valid");
        assert_eq!(decoded, index(&[0, 10, 10, 25]));
    }

    #[test]
    fn corrupt_indexes_are_rejected() {
        let bytes = encode_index(&index(&[0, 10, 25]));
        assert!(
            decode_index(Path::new("x"), &bytes, 24).is_err(),
            "length mismatch"
        );
        assert!(decode_index(Path::new("x"), &bytes[..bytes.len() - 1], 25).is_err());
        assert!(decode_index(Path::new("x"), b"garbage!", 0).is_err());
        let descending = encode_index(&index(&[0, 30, 25]));
        assert!(decode_index(Path::new("x"), &descending, 25).is_err());
        let mut huge = bytes.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_index(Path::new("x"), &huge, 25).is_err());
    }

    #[test]
    fn a_changed_byte_fails_the_checksum() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data");
        std::fs::write(&path, b"hello shuffle world").expect("write");
        let offsets = [0, 5, 19];
        let checksums =
            checksum_ranges(&mut File::open(&path).expect("open"), &offsets).expect("sums");
        let segment = |checksum| Segment {
            file: File::open(&path).expect("open"),
            start: 0,
            len: 5,
            checksum,
        };
        segment(checksums[0]).verify().expect("intact");
        assert!(segment(checksums[0] ^ 1).verify().is_err());
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
