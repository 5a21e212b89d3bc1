//! Opens one output partition of a map output as a stream of record batches:
//! from the task's launch when it came back inline with its map task's
//! status, straight from disk when this executor holds it, otherwise over
//! Arrow Flight from the executor that does. A durable output is read from
//! its copy in object storage once that executor has gone, or when it fails.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arrow::buffer::Buffer;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::{StreamDecoder, StreamReader};
use arrow::record_batch::RecordBatch;
use arrow_flight::Ticket;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_client::FlightServiceClient;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use quiver_proto::{ExecutorAddress, MapOutput, ShuffleTicket};
use tonic::transport::{Channel, Endpoint};
use tracing::debug;

use super::durable;
use super::failover::DurableCopy;
use super::layout::{MapOutputId, Segment};
use super::local::LocalOutputs;
use crate::error::{Error, Result};
use crate::guard::catch_decoder_panic;

/// What a task needs to read shuffle data; stored as a `SessionConfig` extension.
#[derive(Debug, Clone)]
pub struct ShuffleEnv {
    /// Id of the executor running the task: outputs it holds are read directly.
    pub executor_id: String,
    /// This executor's map outputs.
    pub outputs: Arc<LocalOutputs>,
    pub clients: FlightClientPool,
    /// The executor's runtime, whose object stores hold durable map outputs.
    pub runtime: Arc<RuntimeEnv>,
}

/// Largest Flight message accepted; batches are split well below this by the sender.
pub const MAX_FLIGHT_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

/// How long a durable output's reader waits for its executor to start a
/// stream before it reads the copy instead. A live executor answers within
/// milliseconds; a paused one would hold the reader until the connection's
/// keep-alive gives up (about 15 s).
const DURABLE_FLIGHT_OPEN_TIMEOUT: Duration = Duration::from_secs(3);

/// How long an executor whose call failed is not asked for durable outputs:
/// their readers go to the copies at once instead of each waiting on it.
const FAILED_EXECUTOR_SKIPPED_FOR: Duration = Duration::from_secs(30);

/// Flight clients by executor address, shared by all tasks of a process.
/// A tonic channel multiplexes many calls, so one per executor is enough.
#[derive(Debug, Clone, Default)]
pub struct FlightClientPool {
    clients: Arc<Mutex<HashMap<String, FlightServiceClient<Channel>>>>,
    /// When a call to each of these executors last failed.
    failed: Arc<Mutex<HashMap<String, Instant>>>,
}

impl FlightClientPool {
    pub async fn client(&self, address: &ExecutorAddress) -> Result<FlightServiceClient<Channel>> {
        let key = address_key(address);
        if let Some(client) = self.lock().get(&key) {
            return Ok(client.clone());
        }
        let connect_error = |source| Error::Connect {
            executor_id: address.executor_id.clone(),
            address: key.clone(),
            source,
        };
        let endpoint = Endpoint::from_shared(format!("http://{key}")).map_err(connect_error)?;
        let channel = crate::net::tune_endpoint(endpoint)
            .connect()
            .await
            .map_err(connect_error)?;
        let client = FlightServiceClient::new(channel)
            .max_decoding_message_size(MAX_FLIGHT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_FLIGHT_MESSAGE_BYTES);
        self.lock().insert(key, client.clone());
        Ok(client)
    }

    /// Forgets the client of an executor, e.g. after a failed call.
    pub fn evict(&self, address: &ExecutorAddress) {
        self.lock().remove(&address_key(address));
    }

    /// Notes that a call to `address` failed: see [`Self::failed_lately`].
    pub(super) fn note_failure(&self, address: &ExecutorAddress) {
        lock(&self.failed).insert(address_key(address), Instant::now());
    }

    /// Whether a call to `address` failed in the last
    /// [`FAILED_EXECUTOR_SKIPPED_FOR`].
    fn failed_lately(&self, address: &ExecutorAddress) -> bool {
        let mut failed = lock(&self.failed);
        failed.retain(|_, at| at.elapsed() < FAILED_EXECUTOR_SKIPPED_FOR);
        failed.contains_key(&address_key(address))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, FlightServiceClient<Channel>>> {
        lock(&self.clients)
    }
}

/// An executor's Flight address, `host:port`: what the pool keys it by.
fn address_key(address: &ExecutorAddress) -> String {
    format!("{}:{}", address.host, address.flight_port)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the map inconsistent.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Names one output partition of one map output of a job's stage.
#[derive(Debug, Clone)]
pub struct PartitionRef<'a> {
    pub job_id: &'a str,
    pub stage_id: u32,
    pub output: &'a MapOutput,
    pub partition: usize,
}

impl PartitionRef<'_> {
    fn ticket(&self) -> ShuffleTicket {
        ShuffleTicket {
            job_id: self.job_id.to_owned(),
            stage_id: self.stage_id,
            map_partition: self.output.map_partition,
            attempt: self.output.attempt,
            output_partition: self.partition as u32,
        }
    }
}

/// Where an opened partition is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// This executor's disk.
    Local,
    /// The durable copy in object storage.
    Durable,
    /// The executor holding it, over Arrow Flight.
    Flight,
    /// The task's launch: a small output that came back with its map task's
    /// status (`MapOutput.inline_result`).
    Inline,
}

/// Streams one output partition, from disk when `env` says this executor holds it,
/// and says where from.
///
/// Any failure to open or read it, local or remote, is an [`Error::Fetch`] naming
/// the map output, so that the scheduler recomputes that output instead of
/// retrying the reader against the same missing data.
pub async fn fetch_partition(
    location: PartitionRef<'_>,
    env: Option<&ShuffleEnv>,
    pool: &FlightClientPool,
    schema: SchemaRef,
) -> Result<(SendableRecordBatchStream, Source)> {
    let address = location.output.executor.clone().unwrap_or_default();
    let fetch_error = {
        let executor_id = address.executor_id.clone();
        let stage_id = location.stage_id;
        let map_partition = location.output.map_partition;
        let attempt = location.output.attempt;
        move |message: String| Error::Fetch {
            executor_id: executor_id.clone(),
            stage_id,
            map_partition,
            attempt,
            message,
        }
    };
    let durable = &location.output.durable_location;
    let partition = location.partition;
    let inline = &location.output.inline_result;
    let opened = match env {
        // An inline output holds the map output's only partition.
        _ if !inline.is_empty() && partition == 0 => {
            inline_batches(inline.clone(), schema).map(|stream| (stream, Source::Inline))
        }
        Some(env) if env.executor_id == address.executor_id => {
            match open_local(&location, env, Arc::clone(&schema)).await {
                Err(_) if !durable.is_empty() => {
                    open_durable(env, durable, partition, schema).await
                }
                opened => opened.map(|stream| (stream, Source::Local)),
            }
        }
        Some(env) if !durable.is_empty() => {
            open_durable_output(&location, env, &address, pool, schema).await
        }
        _ => fetch_remote(&location, &address, pool, schema)
            .await
            .map(|stream| (stream, Source::Flight)),
    };
    // A slow or throttling store may hold a good durable copy: the reader is
    // retried, and nothing is recomputed.
    if let Err(transient @ Error::DurableShuffle { .. }) = opened {
        return Err(transient);
    }
    let (stream, source) = opened.map_err(|e| fetch_error(e.to_string()))?;
    let schema = stream.schema();
    let batches = stream.map_err(move |e| {
        if is_durable_shuffle_failure(&e) {
            // A durable copy read on from after its executor failed: as
            // when it is opened first, a slow store retries the reader.
            e
        } else {
            fetch_error(e.to_string()).into()
        }
    });
    Ok((
        Box::pin(RecordBatchStreamAdapter::new(schema, batches)),
        source,
    ))
}

fn is_durable_shuffle_failure(error: &DataFusionError) -> bool {
    matches!(error, DataFusionError::External(inner)
        if matches!(inner.downcast_ref::<Error>(), Some(Error::DurableShuffle { .. })))
}

/// Streams a finished job's result: the final stage's outputs, one after the
/// other, from the executors holding them. Nothing is buffered beyond the
/// batch in flight, so a result of any size passes through. Outputs that
/// came back with their task's status (`MapOutput.inline_result`) and empty
/// ones need no call to an executor.
pub fn job_result(
    pool: FlightClientPool,
    job_id: String,
    stage_id: u32,
    outputs: Vec<MapOutput>,
    schema: SchemaRef,
) -> SendableRecordBatchStream {
    let outputs = Arc::new(outputs);
    let fetch_schema = Arc::clone(&schema);
    let batches = futures::stream::iter(0..outputs.len())
        .then(move |index| {
            let (job_id, pool, schema, outputs) = (
                job_id.clone(),
                pool.clone(),
                Arc::clone(&fetch_schema),
                Arc::clone(&outputs),
            );
            async move {
                let output = &outputs[index];
                if output.partitions.iter().all(|stats| stats.rows == 0) {
                    let nothing = futures::stream::empty();
                    return Ok(Box::pin(RecordBatchStreamAdapter::new(schema, nothing)) as _);
                }
                let location = PartitionRef {
                    job_id: &job_id,
                    stage_id,
                    output,
                    partition: 0,
                };
                fetch_partition(location, None, &pool, schema)
                    .await
                    .map(|(stream, _)| stream)
                    .map_err(DataFusionError::from)
            }
        })
        .try_flatten();
    Box::pin(RecordBatchStreamAdapter::new(schema, batches))
}

/// Decodes a result that came back inline: a complete IPC stream.
fn inline_batches(bytes: bytes::Bytes, schema: SchemaRef) -> Result<SendableRecordBatchStream> {
    let batches = catch_decoder_panic(|| {
        StreamReader::try_new(std::io::Cursor::new(bytes), None)?
            .collect::<std::result::Result<Vec<_>, _>>()
    })
    .map_err(Error::CorruptShuffleData)?
    .map_err(|e| Error::CorruptShuffleData(format!("an inline result: {e}")))?;
    let batches = futures::stream::iter(batches.into_iter().map(Ok));
    Ok(Box::pin(RecordBatchStreamAdapter::new(schema, batches)))
}

/// Opens a partition of a durable output that another executor wrote: from
/// that executor while the scheduler names it (a Flight stream costs no
/// store requests), going on from the copy should the stream fail; from the
/// copy at once when the executor has gone, failed lately, or starts no
/// stream in time.
async fn open_durable_output(
    location: &PartitionRef<'_>,
    env: &ShuffleEnv,
    address: &ExecutorAddress,
    pool: &FlightClientPool,
    schema: SchemaRef,
) -> Result<(SendableRecordBatchStream, Source)> {
    let durable = &location.output.durable_location;
    let partition = location.partition;
    if location.output.executor.is_none() || pool.failed_lately(address) {
        return open_durable(env, durable, partition, schema).await;
    }
    let from_executor = tokio::time::timeout(
        DURABLE_FLIGHT_OPEN_TIMEOUT,
        fetch_remote(location, address, pool, Arc::clone(&schema)),
    );
    let e = match from_executor.await {
        Ok(Ok(stream)) => {
            let copy = DurableCopy {
                runtime: Arc::clone(&env.runtime),
                location: durable.clone(),
                partition,
                schema,
                pool: pool.clone(),
                executor: address.clone(),
            };
            return Ok((copy.after_failure_of(stream), Source::Flight));
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no stream within {DURABLE_FLIGHT_OPEN_TIMEOUT:?}"),
    };
    debug!(%e, location = %durable, "reading a durable output's copy: its executor did not serve it");
    pool.note_failure(address);
    open_durable(env, durable, partition, schema).await
}

async fn open_durable(
    env: &ShuffleEnv,
    location: &str,
    partition: usize,
    schema: SchemaRef,
) -> Result<(SendableRecordBatchStream, Source)> {
    let stream = durable::open_partition(&env.runtime, location, partition, schema).await?;
    Ok((stream, Source::Durable))
}

async fn open_local(
    location: &PartitionRef<'_>,
    env: &ShuffleEnv,
    schema: SchemaRef,
) -> Result<SendableRecordBatchStream> {
    let id = MapOutputId::new(
        location.job_id,
        location.stage_id,
        location.output.map_partition,
        location.output.attempt,
    )?;
    let outputs = Arc::clone(&env.outputs);
    let partition = location.partition;
    let segment = tokio::task::spawn_blocking(move || outputs.open_segment(&id, partition))
        .await
        .map_err(|e| Error::io(env.outputs.work_dir(), std::io::Error::other(e)))??;
    Ok(segment_stream(segment, schema))
}

/// Asks the executor holding the output for it over Flight `DoGet`.
async fn fetch_remote(
    location: &PartitionRef<'_>,
    address: &ExecutorAddress,
    pool: &FlightClientPool,
    schema: SchemaRef,
) -> Result<SendableRecordBatchStream> {
    let mut client = pool.client(address).await?;
    let ticket = Ticket {
        ticket: location.ticket().encode_to_vec().into(),
    };
    let response = client.do_get(ticket).await.map_err(|status| {
        pool.evict(address);
        Error::FlightStatus {
            address: address_key(address),
            status: Box::new(status),
        }
    })?;
    let batches = FlightRecordBatchStream::new_from_flight_data(
        response.into_inner().map_err(FlightError::from),
    )
    .map_err(|e| DataFusionError::External(Box::new(e)));
    Ok(Box::pin(RecordBatchStreamAdapter::new(schema, batches)))
}

fn send_segment_batches(segment: Segment, sender: &tokio::sync::mpsc::Sender<Result<RecordBatch>>) {
    if let Err(e) = decode_segment(segment, |batch| sender.blocking_send(Ok(batch)).is_ok()) {
        let _ = sender.blocking_send(Err(e));
    }
}

/// Decodes `segment` in one pass, block by block, each checked before it
/// reaches the decoder; hands each batch to `send` until it returns false.
fn decode_segment(segment: Segment, mut send: impl FnMut(RecordBatch) -> bool) -> Result<()> {
    let mut decoder = StreamDecoder::new();
    for block in segment.blocks()? {
        // Batches whole within a block share its memory; the decoder copies
        // the ones that span two.
        let mut block = Buffer::from(block?);
        while let Some(batch) = decoder.decode(&mut block)? {
            if !send(batch) {
                return Ok(());
            }
        }
    }
    Ok(decoder.finish()?)
}

/// Streams the batches of a local segment, decoding on a blocking thread.
pub fn segment_stream(segment: Segment, schema: SchemaRef) -> SendableRecordBatchStream {
    let batches = segment_batches(segment).map_err(DataFusionError::from);
    Box::pin(RecordBatchStreamAdapter::new(schema, batches))
}

/// Decodes a local segment on a blocking thread, a few batches ahead of the consumer.
pub fn segment_batches(
    segment: Segment,
) -> impl futures::Stream<Item = Result<RecordBatch>> + Send {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<RecordBatch>>(2);
    if segment.len > 0 {
        tokio::task::spawn_blocking(move || {
            // Corrupt bytes can make the IPC decoder panic instead of failing.
            if let Err(reason) = catch_decoder_panic(|| send_segment_batches(segment, &sender)) {
                let _ = sender.blocking_send(Err(Error::CorruptShuffleData(reason)));
            }
        });
    }
    tokio_stream::wrappers::ReceiverStream::new(receiver).boxed()
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_plan::common::collect;
    use quiver_proto::PartitionStats;

    use super::*;
    use crate::shuffle::test_support::ipc_stream;

    /// An executor whose call failed is skipped for a while by the readers
    /// of durable outputs, and only that one.
    #[test]
    fn an_executor_whose_call_failed_is_skipped_for_a_while() {
        let pool = FlightClientPool::default();
        let address = |port| ExecutorAddress {
            executor_id: format!("e{port}"),
            host: "127.0.0.1".into(),
            flight_port: port,
        };
        assert!(!pool.failed_lately(&address(1)));
        pool.note_failure(&address(1));
        assert!(pool.failed_lately(&address(1)));
        assert!(!pool.failed_lately(&address(2)));
        let long_ago = Instant::now().checked_sub(FAILED_EXECUTOR_SKIPPED_FOR);
        if let Some(long_ago) = long_ago {
            lock(&pool.failed).insert("127.0.0.1:1".into(), long_ago);
            assert!(
                !pool.failed_lately(&address(1)),
                "asked again after a while"
            );
        }
    }

    #[tokio::test]
    async fn inline_and_empty_outputs_are_read_without_an_executor() {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from(vec![7, 8]))],
        )
        .expect("batch");
        let bytes = ipc_stream(std::slice::from_ref(&batch));
        let stats = |rows: u64, bytes: u64| vec![PartitionStats { rows, bytes }];
        // No executor is named: a Flight call would fail.
        let outputs = vec![
            MapOutput {
                partitions: stats(2, bytes.len() as u64),
                inline_result: bytes.into(),
                ..MapOutput::default()
            },
            MapOutput {
                map_partition: 1,
                partitions: stats(0, 0),
                ..MapOutput::default()
            },
        ];
        let result = job_result(
            FlightClientPool::default(),
            "job1".into(),
            3,
            outputs,
            Arc::clone(&schema),
        );
        let batches = collect(result).await.expect("read");
        assert_eq!(batches, vec![batch]);

        let corrupt = vec![MapOutput {
            partitions: stats(2, 3),
            inline_result: vec![1, 2, 3].into(),
            ..MapOutput::default()
        }];
        let result = job_result(
            FlightClientPool::default(),
            "job1".into(),
            3,
            corrupt,
            schema,
        );
        let error = collect(result).await.expect_err("not an IPC stream");
        assert!(
            error.to_string().contains("corrupt") || error.to_string().contains("IPC"),
            "{error}"
        );
    }
}
