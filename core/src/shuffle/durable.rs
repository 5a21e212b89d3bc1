//! Durable shuffle: map outputs copied to object storage, so that they
//! outlive the executor that wrote them.
//!
//! With `quiver.shuffle_location` set (`s3://bucket/shuffle`, or a shared
//! folder), a map task still writes its data and index files locally, then
//! uploads both to `<location>/<job>/<stage>/<map>-a<attempt>.{data,index}`.
//! Readers on other executors fetch their partition's byte range from the
//! store instead of asking the writer over Flight, so a lost executor's
//! outputs need no recompute and executors may come and go between stages.
//! The scheduler deletes `<location>/<job>/` when the job ends.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::SpillFile;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use url::Url;

use super::fetch::segment_batches;
use super::layout::{MapOutputId, Segment, SegmentSource, decode_index};
use crate::error::{Error, Result};
use crate::storage::delete_prefix;

/// Upload buffer of a data file: the size of one multipart part.
const UPLOAD_BUFFER_BYTES: usize = 8 * 1024 * 1024;
/// Parts of one upload in flight at once; each holds a buffer.
const UPLOAD_CONCURRENCY: usize = 2;
/// Write buffer of a partition being copied to local disk to be read.
const SPOOL_BUFFER_BYTES: usize = 1024 * 1024;

/// Where one map output lives under `shuffle_location`, without extension.
pub fn output_location(shuffle_location: &str, id: &MapOutputId) -> String {
    format!(
        "{}/{}-a{}",
        stage_location(shuffle_location, &id.job_id, id.stage_id),
        id.map_partition,
        id.attempt
    )
}

fn stage_location(shuffle_location: &str, job_id: &str, stage_id: u32) -> String {
    format!("{}/{stage_id}", job_location(shuffle_location, job_id))
}

/// The folder of all of a job's durable map outputs.
pub fn job_location(shuffle_location: &str, job_id: &str) -> String {
    format!("{}/{job_id}", shuffle_location.trim_end_matches('/'))
}

/// The store and the path of a location URL (`s3://bucket/a/b`).
fn resolve(runtime: &RuntimeEnv, location: &str) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let invalid = |reason: String| Error::DurableShuffle {
        location: location.to_owned(),
        reason,
    };
    let url = Url::parse(location).map_err(|e| invalid(e.to_string()))?;
    let store_url = ObjectStoreUrl::parse(&url[..url::Position::BeforePath])
        .map_err(|e| invalid(e.to_string()))?;
    let store = runtime
        .object_store(&store_url)
        .map_err(|e| invalid(e.to_string()))?;
    let path = Path::from_url_path(url.path()).map_err(|e| invalid(e.to_string()))?;
    Ok((store, path))
}

fn with_extension(path: &Path, extension: &str) -> Result<Path> {
    Path::parse(format!("{path}.{extension}")).map_err(|e| Error::DurableShuffle {
        location: path.to_string(),
        reason: e.to_string(),
    })
}

/// Uploads a published map output's files to `location`: the data first,
/// then the index, whose presence marks the output complete.
pub async fn upload(
    runtime: &RuntimeEnv,
    location: &str,
    data_file: &std::path::Path,
    index_file: &std::path::Path,
) -> Result<()> {
    let failed = |reason: String| Error::DurableShuffle {
        location: location.to_owned(),
        reason,
    };
    let (store, path) = resolve(runtime, location)?;
    let mut data = tokio::fs::File::open(data_file)
        .await
        .map_err(|e| Error::io(data_file, e))?;
    let mut upload = AbortOnDrop(Some(
        BufWriter::with_capacity(
            Arc::clone(&store),
            with_extension(&path, "data")?,
            UPLOAD_BUFFER_BYTES,
        )
        .with_max_concurrency(UPLOAD_CONCURRENCY),
    ));
    let writer = upload.writer();
    if let Err(e) = tokio::io::copy(&mut data, writer).await {
        let _ = writer.abort().await;
        upload.disarm();
        return Err(failed(e.to_string()));
    }
    // A writer that failed to shut down must not be aborted: it may be
    // shut down already. What it leaves is an unfinished upload, not a file.
    let shut_down = writer.shutdown().await;
    upload.disarm();
    shut_down.map_err(|e| failed(e.to_string()))?;
    let index = tokio::fs::read(index_file)
        .await
        .map_err(|e| Error::io(index_file, e))?;
    store
        .put(&with_extension(&path, "index")?, PutPayload::from(index))
        .await
        .map_err(|e| failed(e.to_string()))?;
    Ok(())
}

/// A data upload that aborts itself when dropped unfinished: a task that is
/// cancelled stops in the middle of [`upload`], and its multipart upload
/// would otherwise keep its parts (which S3 bills, and no listing shows).
/// An executor killed outright cannot abort; a bucket lifecycle rule
/// removes what it leaves.
struct AbortOnDrop(Option<BufWriter>);

impl AbortOnDrop {
    fn writer(&mut self) -> &mut BufWriter {
        self.0.as_mut().expect("the upload is not finished yet")
    }

    /// The upload has finished or been aborted: nothing is left to abort.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(mut writer) = self.0.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = writer.abort().await {
                    tracing::warn!(%error, "could not abort a cancelled shuffle upload");
                }
            });
        }
    }
}

/// Reads one output partition of the map output at `location`: its byte
/// range of the data file is copied to local spill space, then checked
/// against the index's checksum before a byte of it is decoded.
pub async fn open_partition(
    runtime: &RuntimeEnv,
    location: &str,
    partition: usize,
    schema: SchemaRef,
) -> Result<SendableRecordBatchStream> {
    let failed = |reason: String| Error::DurableShuffle {
        location: location.to_owned(),
        reason,
    };
    let (store, path) = resolve(runtime, location)?;
    let data_path = with_extension(&path, "data")?;
    let index_path = with_extension(&path, "index")?;
    let missing_or_failed = |e: object_store::Error| match e {
        object_store::Error::NotFound { .. } => Error::DurableOutputMissing {
            location: location.to_owned(),
        },
        other => failed(other.to_string()),
    };
    let index_bytes = store
        .get(&index_path)
        .await
        .map_err(missing_or_failed)?
        .bytes()
        .await
        .map_err(missing_or_failed)?;
    let data_len = store
        .head(&data_path)
        .await
        .map_err(missing_or_failed)?
        .size;
    let mut index = decode_index(
        std::path::Path::new(index_path.as_ref()),
        &index_bytes,
        data_len,
    )?;
    let count = index.partitions();
    if partition >= count {
        return Err(Error::PartitionOutOfRange { partition, count });
    }
    let (start, end) = (index.offsets[partition], index.offsets[partition + 1]);
    if start == end {
        return Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            futures::stream::empty(),
        )));
    }
    let spooled = spool(runtime, &store, &data_path, start..end)
        .await
        .map_err(|e| match e {
            SpoolError::Store(e) => missing_or_failed(e),
            SpoolError::Local(reason) => failed(reason),
        })?;
    let segment = Segment {
        source: SegmentSource::File(spooled.file),
        start: 0,
        len: end - start,
        block_size: index.block_size,
        checksums: std::mem::take(&mut index.checksums[partition]),
    };
    // The spooled copy is deleted once the stream is dropped.
    let spooled_copy = spooled.temp;
    let location = location.to_owned();
    let batches = segment_batches(segment).map(move |batch| {
        let _keep = &spooled_copy;
        batch.map_err(|e| match e {
            Error::CorruptShuffleData(reason) => {
                DataFusionError::from(Error::CorruptShuffleData(format!("{location}: {reason}")))
            }
            other => DataFusionError::from(other),
        })
    });
    Ok(Box::pin(RecordBatchStreamAdapter::new(schema, batches)))
}

/// A partition's bytes, copied to a temporary file of the runtime's disk manager.
struct Spooled {
    file: std::fs::File,
    temp: Arc<dyn SpillFile>,
}

enum SpoolError {
    Store(object_store::Error),
    Local(String),
}

/// Streams a byte range of a stored file into a temporary file in the
/// executor's spill space, so that a partition of any size is read through a
/// bounded buffer instead of being held in memory, outside the memory pool.
async fn spool(
    runtime: &RuntimeEnv,
    store: &Arc<dyn ObjectStore>,
    path: &Path,
    range: std::ops::Range<u64>,
) -> std::result::Result<Spooled, SpoolError> {
    let local = |e: &dyn std::fmt::Display| SpoolError::Local(e.to_string());
    let temp = runtime
        .disk_manager
        .create_tmp_file("reading a durable shuffle partition")
        .map_err(|e| local(&e))?;
    let temp_path = temp
        .path()
        .ok_or_else(|| SpoolError::Local("the spill space has no local files".into()))?;
    let file = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(temp_path)
        .await
        .map_err(|e| local(&e))?;
    let mut writer = tokio::io::BufWriter::with_capacity(SPOOL_BUFFER_BYTES, file);
    let options = GetOptions {
        range: Some(GetRange::Bounded(range)),
        ..GetOptions::default()
    };
    let mut chunks = store
        .get_opts(path, options)
        .await
        .map_err(SpoolError::Store)?
        .into_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(SpoolError::Store)?;
        writer.write_all(&chunk).await.map_err(|e| local(&e))?;
    }
    writer.flush().await.map_err(|e| local(&e))?;
    let mut file = writer.into_inner();
    file.seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(|e| local(&e))?;
    Ok(Spooled {
        file: file.into_std().await,
        temp,
    })
}

/// Deletes every durable map output of a job.
pub async fn remove_job(runtime: &RuntimeEnv, shuffle_location: &str, job_id: &str) -> Result<()> {
    let location = job_location(shuffle_location, job_id);
    let failed = |reason: String| Error::DurableShuffle {
        location: location.clone(),
        reason,
    };
    let (store, prefix) = resolve(runtime, &location)?;
    delete_prefix(&store, &prefix, location.starts_with("file:"))
        .await
        .map_err(|e| failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    use datafusion::physical_plan::common::collect;

    use super::*;
    use crate::shuffle::layout::{Index, encode_index};
    use crate::shuffle::test_support::{block_checksums, ipc_stream};
    use crate::storage::{StoreRegistry, runtime_builder};

    /// A map output of two partitions: `[1, 2]` and nothing.
    fn write_output(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from(vec![1, 2]))],
        )
        .expect("batch");
        let bytes = ipc_stream(&[batch]);
        let len = bytes.len() as u64;
        // Blocks of 64 bytes: the partition spans several.
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

    #[tokio::test]
    async fn outputs_round_trip_through_the_store_and_corruption_is_caught() {
        let local = tempfile::tempdir().expect("temp");
        let remote = tempfile::tempdir().expect("temp");
        let (data, index) = write_output(local.path());
        let runtime = runtime_builder(Arc::new(StoreRegistry::new()))
            .build()
            .expect("runtime");
        let shuffle = format!("file://{}", remote.path().display());
        let id = MapOutputId::new("job1", 2, 0, 1).expect("id");
        let location = output_location(&shuffle, &id);
        upload(&runtime, &location, &data, &index)
            .await
            .expect("upload");

        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let read = open_partition(&runtime, &location, 0, Arc::clone(&schema))
            .await
            .expect("open");
        let batches = collect(read).await.expect("read");
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 2);
        let empty = open_partition(&runtime, &location, 1, Arc::clone(&schema))
            .await
            .expect("open");
        assert!(collect(empty).await.expect("read").is_empty());

        // A flipped byte in the stored copy is caught by the checksum.
        let stored = remote.path().join("job1/2/0-a1.data");
        let mut bytes = std::fs::read(&stored).expect("stored data");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&stored, bytes).expect("corrupt");
        let corrupt = open_partition(&runtime, &location, 0, schema)
            .await
            .expect("open");
        let error = collect(corrupt).await.expect_err("corruption is caught");
        assert!(error.to_string().contains("checksum"), "{error}");
        // The spooled copies are gone once their streams are.
        assert!(
            runtime
                .disk_manager
                .temp_dir_paths()
                .iter()
                .all(|dir| std::fs::read_dir(dir).map_or(true, |mut files| files.next().is_none())),
            "spooled partitions left behind"
        );

        remove_job(&runtime, &shuffle, "job1")
            .await
            .expect("remove");
        assert!(!remote.path().join("job1").exists());
    }
}
