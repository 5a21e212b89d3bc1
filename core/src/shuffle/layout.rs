//! Layout of map outputs, and where they lie on an executor's disk. (Small
//! ones are held in memory instead, in the same layout: see [`super::local`].)
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
//! Index format: the magic `QVX3`, a little-endian `u32` partition count `n`,
//! a little-endian `u32` block size `b`, then `n + 1` little-endian `u64`
//! offsets, then the little-endian `u32` CRC-32 checksums of every block of
//! every partition in order; partition `p` spans `offsets[p]..offsets[p + 1]`,
//! the last offset is the data file length, and its blocks are its
//! consecutive `b` bytes (the last may be shorter).
//!
//! A reader checks each block against its checksum before decoding it: corrupt
//! bytes must never reach the Arrow decoder, which would return wrong values
//! for a flipped data bit, and can abort the process on a corrupted length.
//! Checksums per block, rather than per partition, let the reader do so in
//! one pass over the file, holding one block at a time; the writer computes
//! them as the bytes go out.
//! Both files are written under a temporary name and renamed into place, so a
//! killed attempt never leaves a partial file under a final name.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use prost::Message;

use crate::error::{Error, Result};

const INDEX_MAGIC: &[u8; 4] = b"QVX3";

/// Bytes per checksummed block of a partition: what a reader holds at once.
pub const CHECKSUM_BLOCK_BYTES: u32 = 4 * 1024 * 1024;

/// Identifies one map task attempt's output. Every field that reaches a path is
/// validated, so a ticket from the network can never point outside the work dir.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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
    /// Bytes per checksummed block.
    pub block_size: u32,
    /// For each of the `n` partitions, the CRC-32 of each of its blocks.
    pub checksums: Vec<Vec<u32>>,
}

impl Index {
    pub fn partitions(&self) -> usize {
        self.checksums.len()
    }
}

/// How many blocks of `block_size` bytes hold `len` bytes.
fn block_count(len: u64, block_size: u32) -> u64 {
    len.div_ceil(u64::from(block_size))
}

/// Encodes the index of a data file.
pub fn encode_index(index: &Index) -> Vec<u8> {
    let count = index.partitions() as u32;
    let blocks: usize = index.checksums.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(12 + index.offsets.len() * 8 + blocks * 4);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&index.block_size.to_le_bytes());
    for offset in &index.offsets {
        out.extend_from_slice(&offset.to_le_bytes());
    }
    for checksum in index.checksums.iter().flatten() {
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
    if bytes.len() < 12 || &bytes[..4] != INDEX_MAGIC {
        return Err(corrupt("missing magic header".into()));
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let count = word(4) as usize;
    let block_size = word(8);
    if block_size == 0 {
        return Err(corrupt("a block size of 0".into()));
    }
    let offsets_end = count
        .checked_add(1)
        .and_then(|offsets| offsets.checked_mul(8))
        .and_then(|size| size.checked_add(12))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| {
            corrupt(format!(
                "{} bytes cannot hold the offsets of {count} partitions",
                bytes.len()
            ))
        })?;
    let offsets: Vec<u64> = bytes[12..offsets_end]
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
    let blocks: Vec<u64> = offsets
        .windows(2)
        .map(|range| block_count(range[1] - range[0], block_size))
        .collect();
    let expected = blocks
        .iter()
        .sum::<u64>()
        .checked_mul(4)
        .and_then(|size| size.checked_add(offsets_end as u64));
    if expected != Some(bytes.len() as u64) {
        return Err(corrupt(format!(
            "expected {expected:?} bytes for {count} partitions, found {}",
            bytes.len()
        )));
    }
    let mut words = bytes[offsets_end..]
        .chunks_exact(4)
        .map(|chunk| u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]));
    let checksums = blocks
        .iter()
        .map(|&n| words.by_ref().take(n as usize).collect())
        .collect();
    Ok(Index {
        offsets,
        block_size,
        checksums,
    })
}

/// Passes writes through to `inner`, counting them and checksumming them in
/// blocks of each partition: the writer's half of the index.
pub struct ChecksummingWriter<W> {
    inner: W,
    block_size: u32,
    /// Bytes written so far.
    position: u64,
    /// Bytes of the current block so far.
    in_block: u32,
    hasher: crc32fast::Hasher,
    /// Checksums of the current partition's finished blocks.
    current: Vec<u32>,
    offsets: Vec<u64>,
    checksums: Vec<Vec<u32>>,
}

impl<W: Write> ChecksummingWriter<W> {
    pub fn new(inner: W, block_size: u32) -> Self {
        Self {
            inner,
            block_size,
            position: 0,
            in_block: 0,
            hasher: crc32fast::Hasher::new(),
            current: Vec::new(),
            offsets: vec![0],
            checksums: Vec::new(),
        }
    }

    /// Ends the current partition at the current position.
    pub fn end_partition(&mut self) {
        if self.in_block > 0 {
            self.end_block();
        }
        self.checksums.push(std::mem::take(&mut self.current));
        self.offsets.push(self.position);
    }

    /// The inner writer and the index of the partitions ended so far.
    pub fn finish(self) -> (W, Index) {
        let index = Index {
            offsets: self.offsets,
            block_size: self.block_size,
            checksums: self.checksums,
        };
        (self.inner, index)
    }

    fn end_block(&mut self) {
        let hasher = std::mem::replace(&mut self.hasher, crc32fast::Hasher::new());
        self.current.push(hasher.finalize());
        self.in_block = 0;
    }

    fn checksum(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = (self.block_size - self.in_block) as usize;
            let (head, rest) = bytes.split_at(room.min(bytes.len()));
            self.hasher.update(head);
            self.in_block += head.len() as u32;
            self.position += head.len() as u64;
            if self.in_block == self.block_size {
                self.end_block();
            }
            bytes = rest;
        }
    }
}

impl<W: Write> Write for ChecksummingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.checksum(&buf[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Where a segment's bytes are: an open data file, or a map output held in
/// memory (see [`super::local`]).
#[derive(Debug)]
pub enum SegmentSource {
    File(File),
    Memory(Bytes),
}

/// A byte range of a map output that holds one output partition.
#[derive(Debug)]
pub struct Segment {
    pub source: SegmentSource,
    /// Where the partition starts in the map output.
    pub start: u64,
    pub len: u64,
    /// Bytes per checksummed block.
    pub block_size: u32,
    /// The CRC-32 of each of the partition's blocks, from the index.
    pub checksums: Vec<u32>,
}

impl Segment {
    /// Output partition `partition` of a map output with `index`, read from `source`.
    pub fn of_partition(
        source: SegmentSource,
        index: &mut Index,
        partition: usize,
    ) -> Result<Self> {
        let count = index.partitions();
        if partition >= count {
            return Err(Error::PartitionOutOfRange { partition, count });
        }
        let (start, end) = (index.offsets[partition], index.offsets[partition + 1]);
        Ok(Self {
            source,
            start,
            len: end - start,
            block_size: index.block_size,
            checksums: std::mem::take(&mut index.checksums[partition]),
        })
    }

    /// The partition's bytes, one block at a time, each checked against its
    /// checksum before it is returned.
    pub fn blocks(self) -> Result<VerifiedBlocks> {
        if self.block_size == 0
            || block_count(self.len, self.block_size) != self.checksums.len() as u64
        {
            return Err(Error::CorruptShuffleData(format!(
                "{} checksums for {} bytes in blocks of {}",
                self.checksums.len(),
                self.len,
                self.block_size
            )));
        }
        let source = match self.source {
            SegmentSource::File(mut file) => {
                file.seek(SeekFrom::Start(self.start))
                    .map_err(|e| Error::io("shuffle data", e))?;
                SegmentSource::File(file)
            }
            SegmentSource::Memory(bytes) => {
                let end = self.start.saturating_add(self.len);
                if end > bytes.len() as u64 {
                    return Err(Error::CorruptShuffleData(format!(
                        "a segment ends at {end}, past the {} bytes held",
                        bytes.len()
                    )));
                }
                SegmentSource::Memory(bytes.slice(self.start as usize..end as usize))
            }
        };
        Ok(VerifiedBlocks {
            source,
            remaining: self.len,
            block_size: self.block_size,
            checksums: self.checksums.into_iter(),
        })
    }
}

/// The blocks of a [`Segment`], verified.
pub struct VerifiedBlocks {
    /// A file positioned at the next block, or the bytes from the next block on.
    source: SegmentSource,
    remaining: u64,
    block_size: u32,
    checksums: std::vec::IntoIter<u32>,
}

impl VerifiedBlocks {
    fn read_block(&mut self, len: u64) -> std::io::Result<Bytes> {
        match &mut self.source {
            SegmentSource::File(file) => {
                // Read into spare capacity: zeroing the block first would cost a pass.
                let mut block = Vec::with_capacity(len as usize);
                let read = file.take(len).read_to_end(&mut block)?;
                if read as u64 == len {
                    Ok(block.into())
                } else {
                    Err(std::io::ErrorKind::UnexpectedEof.into())
                }
            }
            SegmentSource::Memory(bytes) => Ok(bytes.split_to(len as usize)),
        }
    }
}

impl Iterator for VerifiedBlocks {
    type Item = Result<Bytes>;

    fn next(&mut self) -> Option<Self::Item> {
        let expected = self.checksums.next()?;
        let len = self.remaining.min(u64::from(self.block_size));
        self.remaining -= len;
        let block = match self.read_block(len) {
            Ok(block) => block,
            Err(e) => {
                self.checksums = Vec::new().into_iter();
                return Some(Err(Error::io("shuffle data", e)));
            }
        };
        let actual = crc32fast::hash(&block);
        if actual != expected {
            self.checksums = Vec::new().into_iter();
            return Some(Err(Error::CorruptShuffleData(format!(
                "checksum mismatch (expected {expected:08x}, found {actual:08x})"
            ))));
        }
        Some(Ok(block))
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
    let file = File::open(&data_path).map_err(|e| Error::io(&data_path, e))?;
    let data_len = file.metadata().map_err(|e| Error::io(&data_path, e))?.len();
    let mut index = decode_index(&index_path, &index, data_len)?;
    Segment::of_partition(SegmentSource::File(file), &mut index, partition)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shuffle::test_support::block_checksums;

    /// An index with blocks of 10 bytes and made-up checksums.
    fn index(offsets: &[u64]) -> Index {
        let mut next = 0;
        let checksums = offsets
            .windows(2)
            .map(|range| {
                (0..block_count(range[1].saturating_sub(range[0]), 10))
                    .map(|_| {
                        next += 1;
                        next
                    })
                    .collect()
            })
            .collect();
        Index {
            offsets: offsets.to_vec(),
            block_size: 10,
            checksums,
        }
    }

    #[test]
    fn index_round_trips() {
        let bytes = encode_index(&index(&[0, 10, 10, 25]));
        let decoded = decode_index(Path::new("x"), &bytes, 25).expect("valid");
        assert_eq!(decoded, index(&[0, 10, 10, 25]));
        assert_eq!(decoded.checksums, vec![vec![1], vec![], vec![2, 3]]);
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
        let mut no_blocks = bytes.clone();
        no_blocks[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(decode_index(Path::new("x"), &no_blocks, 25).is_err());
        let mut tiny_blocks = bytes;
        tiny_blocks[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert!(decode_index(Path::new("x"), &tiny_blocks, 25).is_err());
    }

    #[test]
    fn the_writer_checksums_what_it_writes_block_by_block() {
        let mut writer = ChecksummingWriter::new(Vec::new(), 4);
        writer.write_all(b"hello").expect("write");
        writer.write_all(b" shuffle").expect("write");
        writer.end_partition();
        writer.end_partition();
        writer.write_all(b"world").expect("write");
        writer.end_partition();
        let (data, index) = writer.finish();
        assert_eq!(data, b"hello shuffleworld");
        assert_eq!(index.offsets, vec![0, 13, 13, 18]);
        assert_eq!(
            index.checksums,
            vec![
                block_checksums(b"hello shuffle", 4),
                vec![],
                block_checksums(b"world", 4)
            ]
        );
        assert_eq!(index.checksums[0].len(), 4);
        let encoded = encode_index(&index);
        assert_eq!(
            decode_index(Path::new("x"), &encoded, 18).expect("valid"),
            index
        );
    }

    #[test]
    fn a_changed_byte_fails_its_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data");
        let data = b"hello shuffle world";
        std::fs::write(&path, data).expect("write");
        let segment = |checksums| Segment {
            source: SegmentSource::File(File::open(&path).expect("open")),
            start: 6,
            len: 13,
            block_size: 4,
            checksums,
        };
        let intact = block_checksums(&data[6..], 4);
        let blocks: Vec<Bytes> = segment(intact.clone())
            .blocks()
            .expect("blocks")
            .collect::<Result<_>>()
            .expect("intact");
        assert_eq!(blocks.concat(), b"shuffle world");
        let mut changed = intact.clone();
        changed[2] ^= 1;
        let read: Vec<Result<Bytes>> = segment(changed).blocks().expect("blocks").collect();
        assert_eq!(read.len(), 3, "the bad block ends the stream");
        assert!(read[0].is_ok() && read[1].is_ok() && read[2].is_err());
        assert!(
            segment(intact[..3].to_vec()).blocks().is_err(),
            "a block short"
        );
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
