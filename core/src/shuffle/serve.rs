//! Serves an on-disk segment over Flight without decoding it.
//!
//! A segment is an Arrow IPC stream, and a Flight data message is one IPC
//! message split in two: its flatbuffer header and its body. So the server
//! cuts the stream at message boundaries and sends the bytes as they are,
//! instead of decoding every batch and encoding it again, work that would
//! compete with the tasks for the executor's cores. The reader decodes and
//! validates them as before; the segment's checksum is verified first.

use std::io::Read;

use arrow::ipc::root_as_message;
use arrow_flight::FlightData;
use futures::Stream;

use super::fetch::MAX_FLIGHT_MESSAGE_BYTES;
use super::layout::Segment;
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

fn send_messages(mut segment: Segment, sender: &tokio::sync::mpsc::Sender<Result<FlightData>>) {
    if let Err(e) = segment.verify() {
        let _ = sender.blocking_send(Err(e));
        return;
    }
    let mut reader = segment.into_reader();
    loop {
        let next = read_message(&mut reader).transpose();
        let Some(message) = next else {
            return;
        };
        let failed = message.is_err();
        if sender.blocking_send(message).is_err() || failed {
            return;
        }
    }
}

/// Reads the next encapsulated IPC message; `None` at the end of the stream.
fn read_message(reader: &mut impl Read) -> Result<Option<FlightData>> {
    let corrupt = |what: String| Error::CorruptShuffleData(what);
    let io = |e: std::io::Error| Error::io("shuffle data", e);
    let mut word = [0u8; 4];
    match reader.read_exact(&mut word) {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        read => read.map_err(io)?,
    }
    if word == CONTINUATION {
        reader.read_exact(&mut word).map_err(io)?;
    }
    let header_len = i32::from_le_bytes(word);
    if header_len == 0 {
        return Ok(None);
    }
    let header_len = usize::try_from(header_len)
        .ok()
        .filter(|&len| len <= MAX_FLIGHT_MESSAGE_BYTES)
        .ok_or_else(|| corrupt(format!("an IPC message header of {header_len} bytes")))?;
    let mut header = vec![0u8; header_len];
    reader.read_exact(&mut header).map_err(io)?;
    let body_len = root_as_message(&header)
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
    let mut body = vec![0u8; body_len];
    reader.read_exact(&mut body).map_err(io)?;
    Ok(Some(FlightData {
        data_header: header.into(),
        data_body: body.into(),
        ..FlightData::default()
    }))
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};
    use std::sync::Arc;

    use arrow::array::{DictionaryArray, Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Int32Type, Schema};
    use arrow_flight::decode::FlightRecordBatchStream;
    use futures::{StreamExt, TryStreamExt};

    use super::*;
    use crate::shuffle::test_support::ipc_stream;

    /// A segment holding `batches` as an IPC stream, after 3 bytes of another partition.
    fn segment(batches: &[RecordBatch]) -> Segment {
        let bytes = ipc_stream(batches);
        let mut file = tempfile::tempfile().expect("temp file");
        file.write_all(b"xyz").expect("prefix");
        file.write_all(&bytes).expect("segment");
        file.seek(SeekFrom::Start(3)).expect("seek");
        Segment {
            file,
            start: 3,
            len: bytes.len() as u64,
            checksum: crc32fast::hash(&bytes),
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
        let messages = segment_flight_data(segment(&written))
            .map_err(|e| arrow_flight::error::FlightError::ExternalError(Box::new(e)));
        let read: Vec<RecordBatch> = FlightRecordBatchStream::new_from_flight_data(messages)
            .try_collect()
            .await
            .expect("decodes");
        assert_eq!(read, written);
    }

    #[tokio::test]
    async fn a_corrupt_segment_is_refused_before_a_message_is_sent() {
        let mut corrupt = segment(&batches());
        corrupt.checksum ^= 1;
        let mut messages = Box::pin(segment_flight_data(corrupt));
        let first = messages.next().await.expect("an error");
        assert!(
            matches!(first, Err(Error::CorruptShuffleData(_))),
            "{first:?}"
        );
        assert!(messages.next().await.is_none());
    }
}
