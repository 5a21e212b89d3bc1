//! Serves an on-disk segment over Flight without decoding it.
//!
//! A segment is an Arrow IPC stream, and a Flight data message is one IPC
//! message split in two: its flatbuffer header and its body. So the server
//! cuts the stream at message boundaries and sends the bytes as they are,
//! instead of decoding every batch and encoding it again, work that would
//! compete with the tasks for the executor's cores. The reader decodes and
//! validates them as before; each block of the segment is checked against its
//! checksum before any of its bytes are sent.

use arrow::ipc::root_as_message;
use arrow_flight::FlightData;
use bytes::Bytes;
use futures::Stream;

use super::fetch::MAX_FLIGHT_MESSAGE_BYTES;
use super::layout::{Segment, VerifiedBlocks};
use crate::error::{Error, Result};
use crate::guard::catch_decoder_panic;

/// Marks an IPC message's length prefix (and ends the stream when followed by 0).
const CONTINUATION: [u8; 4] = [0xff; 4];

/// The IPC messages of `segment` as Flight data, read on a blocking thread a
/// few messages ahead of the sender.
pub fn segment_flight_data(segment: Segment) -> impl Stream<Item = Result<FlightData>> + Send {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<FlightData>>(4);
    if segment.len > 0 {
        tokio::task::spawn_blocking(move || {
            if let Err(reason) = catch_decoder_panic(|| send_messages(segment, &sender)) {
                let _ = sender.blocking_send(Err(Error::CorruptShuffleData(reason)));
            }
        });
    }
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

fn send_messages(segment: Segment, sender: &tokio::sync::mpsc::Sender<Result<FlightData>>) {
    let blocks = match segment.blocks() {
        Ok(blocks) => blocks,
        Err(e) => {
            let _ = sender.blocking_send(Err(e));
            return;
        }
    };
    let mut messages = Messages {
        blocks,
        pending: Bytes::new(),
        upcoming: Bytes::new(),
    };
    loop {
        let next = messages.next().transpose();
        let Some(message) = next else {
            return;
        };
        let failed = message.is_err();
        if sender.blocking_send(message).is_err() || failed {
            return;
        }
    }
}

/// Cuts the verified blocks of a segment into IPC messages. A message whole
/// within a block is sent as slices of it; one that spans blocks is copied
/// together.
struct Messages {
    blocks: VerifiedBlocks,
    /// Bytes of the next message, or more.
    pending: Bytes,
    /// Verified bytes after `pending`.
    upcoming: Bytes,
}

/// What the bytes at the front of a stream hold.
enum Frame {
    /// A whole message: its total length and its header's.
    Message { total: usize, header_len: usize },
    /// The end-of-stream marker.
    End,
    /// Not enough bytes to tell more: at least this many are needed.
    Incomplete(usize),
}

impl Messages {
    /// The next message; `None` at the end of the stream.
    fn next(&mut self) -> Result<Option<FlightData>> {
        loop {
            match frame(&self.pending)? {
                Frame::Message { total, header_len } => {
                    let mut message = self.pending.split_to(total);
                    let body = message.split_off(PREFIX_LEN + header_len);
                    return Ok(Some(FlightData {
                        data_header: message.slice(PREFIX_LEN..),
                        data_body: body,
                        ..FlightData::default()
                    }));
                }
                Frame::End => return Ok(None),
                Frame::Incomplete(needed) => self.gather(needed)?,
            }
        }
    }

    /// Brings `pending` towards `needed` bytes from the blocks that follow.
    fn gather(&mut self, needed: usize) -> Result<()> {
        if self.upcoming.is_empty() {
            self.upcoming = match self.blocks.next() {
                Some(block) => block?,
                None if self.pending.is_empty() => {
                    return Err(Error::CorruptShuffleData(
                        "the stream has no end-of-stream marker".into(),
                    ));
                }
                None => {
                    return Err(Error::CorruptShuffleData(
                        "the stream ends inside a message".into(),
                    ));
                }
            };
        }
        if self.pending.is_empty() {
            self.pending = std::mem::take(&mut self.upcoming);
        } else {
            let wanted = needed.saturating_sub(self.pending.len());
            let head = self.upcoming.split_to(wanted.min(self.upcoming.len()));
            let mut joined = Vec::with_capacity(self.pending.len() + head.len());
            joined.extend_from_slice(&self.pending);
            joined.extend_from_slice(&head);
            self.pending = Bytes::from(joined);
        }
        Ok(())
    }
}

/// The continuation marker and the header length before every message.
const PREFIX_LEN: usize = 8;

/// Reads the frame at the front of `bytes`.
fn frame(bytes: &[u8]) -> Result<Frame> {
    let corrupt = |what: String| Error::CorruptShuffleData(what);
    if bytes.len() < PREFIX_LEN {
        return Ok(Frame::Incomplete(PREFIX_LEN));
    }
    if bytes[..4] != CONTINUATION {
        return Err(corrupt(
            "an IPC message without its continuation marker".into(),
        ));
    }
    let header_len = i32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if header_len == 0 {
        return Ok(Frame::End);
    }
    let header_len = usize::try_from(header_len)
        .ok()
        .filter(|&len| len <= MAX_FLIGHT_MESSAGE_BYTES)
        .ok_or_else(|| corrupt(format!("an IPC message header of {header_len} bytes")))?;
    let Some(header) = bytes.get(PREFIX_LEN..PREFIX_LEN + header_len) else {
        return Ok(Frame::Incomplete(PREFIX_LEN + header_len));
    };
    let body_len = root_as_message(header)
        .map_err(|e| corrupt(format!("an IPC message header does not parse: {e}")))?
        .bodyLength();
    let body_len = usize::try_from(body_len)
        .ok()
        .filter(|&len| len <= MAX_FLIGHT_MESSAGE_BYTES - header_len)
        .ok_or_else(|| {
            corrupt(format!(
                "an IPC message body of {body_len} bytes, above the Flight limit of \
                 {MAX_FLIGHT_MESSAGE_BYTES}"
            ))
        })?;
    let total = PREFIX_LEN + header_len + body_len;
    if bytes.len() < total {
        Ok(Frame::Incomplete(total))
    } else {
        Ok(Frame::Message { total, header_len })
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use arrow::array::{DictionaryArray, Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Int32Type, Schema};
    use arrow_flight::decode::FlightRecordBatchStream;
    use futures::{StreamExt, TryStreamExt};

    use super::*;
    use crate::shuffle::layout::SegmentSource;
    use crate::shuffle::test_support::{block_checksums, ipc_stream};

    /// A segment holding `batches` as an IPC stream, after 3 bytes of another
    /// partition, in blocks of `block_size` bytes.
    fn segment(batches: &[RecordBatch], block_size: u32) -> Segment {
        let bytes = ipc_stream(batches);
        let mut file = tempfile::tempfile().expect("temp file");
        file.write_all(b"xyz").expect("prefix");
        file.write_all(&bytes).expect("segment");
        Segment {
            source: SegmentSource::File(file),
            start: 3,
            len: bytes.len() as u64,
            block_size,
            checksums: block_checksums(&bytes, block_size),
        }
    }

    fn batches() -> Vec<RecordBatch> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new(
                "tag",
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                true,
            ),
        ]));
        (0..3)
            .map(|n| {
                let tags: DictionaryArray<Int32Type> = vec!["a", "b", "a"].into_iter().collect();
                RecordBatch::try_new(
                    Arc::clone(&schema),
                    vec![
                        Arc::new(Int64Array::from(vec![n, n + 1, n + 2])),
                        Arc::new(StringArray::from(vec![Some("x"), None, Some("zz")])),
                        Arc::new(tags),
                    ],
                )
                .expect("batch")
            })
            .collect()
    }

    #[tokio::test]
    async fn served_messages_decode_to_the_written_batches() {
        let written = batches();
        // Whole messages within a block, and messages spanning up to dozens of blocks.
        for block_size in [1 << 20, 100, 7] {
            let messages = segment_flight_data(segment(&written, block_size))
                .map_err(|e| arrow_flight::error::FlightError::ExternalError(Box::new(e)));
            let read: Vec<RecordBatch> = FlightRecordBatchStream::new_from_flight_data(messages)
                .try_collect()
                .await
                .expect("decodes");
            assert_eq!(read, written, "blocks of {block_size} bytes");
        }
    }

    #[tokio::test]
    async fn a_corrupt_segment_is_refused_before_a_message_is_sent() {
        let mut corrupt = segment(&batches(), 64);
        corrupt.checksums[0] ^= 1;
        let mut messages = Box::pin(segment_flight_data(corrupt));
        let first = messages.next().await.expect("an error");
        assert!(
            matches!(first, Err(Error::CorruptShuffleData(_))),
            "{first:?}"
        );
        assert!(messages.next().await.is_none());
    }
}
