//! Shuffle: how map outputs are written, stored, located and read back.
//!
//! - [`layout`]: where a map output lives on an executor's disk, and its offset index.
//! - [`writer`]: [`ShuffleWriterExec`], the root of every stage; it splits its
//!   input into output partitions and writes them into one map output per task.
//! - [`local`]: an executor's own map outputs, small ones held in memory,
//!   the rest in files.
//! - [`reader`]: [`ShuffleReaderExec`], the leaf that stands for an input stage
//!   and streams the map outputs it is bound to.
//! - [`fetch`]: opens one output partition of a map output, from local disk,
//!   from another executor over Arrow Flight, or from its durable copy.
//! - [`durable`]: map outputs copied to object storage.
//! - `failover`: a durable output read from its executor, going on from its
//!   copy if that executor fails midway.
//! - [`serve`]: an on-disk partition as Flight data, without decoding it.
//! - [`wait_time`]: the wait-time metrics of shuffle writes and reads.

pub mod durable;
mod failover;
pub mod fetch;
pub mod layout;
pub mod local;
pub mod reader;
pub mod serve;
pub mod wait_time;
pub mod writer;

pub use fetch::{FlightClientPool, ShuffleEnv};
pub use layout::MapOutputId;
pub use local::LocalOutputs;
pub use reader::{ReadMode, ShuffleReaderExec};
pub use writer::ShuffleWriterExec;

/// Helpers shared by the shuffle modules' tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::path::{Path, PathBuf};

    use arrow::ipc::writer::StreamWriter;
    use arrow::record_batch::RecordBatch;

    use super::layout::{Index, encode_index};

    /// `batches` (at least one) as the bytes of one Arrow IPC stream.
    pub fn ipc_stream(batches: &[RecordBatch]) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut writer = StreamWriter::try_new(&mut bytes, &batches[0].schema()).expect("writer");
        for batch in batches {
            writer.write(batch).expect("write");
        }
        writer.finish().expect("finish");
        drop(writer);
        bytes
    }

    /// Writes a map output as a task leaves it on disk, `m.data` and
    /// `m.index` in `dir`: a first partition of `batches` and an empty
    /// second one, checksummed in blocks of 64 bytes, so that the first
    /// spans several. Returns the two files.
    pub fn write_map_output(dir: &Path, batches: &[RecordBatch]) -> (PathBuf, PathBuf) {
        let bytes = ipc_stream(batches);
        let len = bytes.len() as u64;
        let index = Index {
            offsets: vec![0, len, len],
            block_size: 64,
            checksums: vec![block_checksums(&bytes, 64), Vec::new()],
        };
        let (data, index_file) = (dir.join("m.data"), dir.join("m.index"));
        std::fs::write(&data, &bytes).expect("data");
        std::fs::write(&index_file, encode_index(&index)).expect("index");
        (data, index_file)
    }

    /// The CRC-32 of each block of `bytes`, as the shuffle index holds them.
    pub fn block_checksums(bytes: &[u8], block_size: u32) -> Vec<u32> {
        bytes
            .chunks(block_size as usize)
            .map(crc32fast::hash)
            .collect()
    }
}
