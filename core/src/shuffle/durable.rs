//! Durable shuffle: map outputs copied to object storage, so that they
//! outlive the executor that wrote them.
//!
//! With `quiver.shuffle_location` set (`s3://bucket/shuffle`, or a shared
//! folder), a map task still writes its data and index files locally, then
//! uploads both to `<location>/<job>/<stage>/<map>-a<attempt>.{data,index}`,
//! recording the data file's multipart upload under `<location>/<job>/_uploads/`.
//! Readers on other executors still ask the writer over Flight while it
//! lives, which costs no store requests, and fetch their partition's byte
//! range from the store once it has gone, or when its stream fails midway
//! ([`super::fetch`]), so a lost executor's outputs need no recompute and
//! executors may come and go between stages.
//! The scheduler deletes `<location>/<job>/` when the job ends, aborting
//! first the uploads that killed executors left unfinished.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use bytes::BytesMut;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::SpillFile;
use datafusion::execution::object_store::{ObjectStoreRegistry, ObjectStoreUrl};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use object_store::buffered::BufWriter;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::async_writer::AsyncFileWriter;
use parquet::errors::ParquetError;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use url::Url;

use super::fetch::segment_batches;
use super::layout::{MapOutputId, Segment, SegmentSource, decode_index};
use crate::error::{Error, Result};
use crate::lease::Lease;
use crate::storage::upload::{FileUpload, PARTS_IN_FLIGHT, RecordedUpload, abort_recorded_uploads};
use crate::storage::{StoreRegistry, delete_prefix, redacted_error};

/// The size of one multipart part of a data file's upload.
const UPLOAD_PART_BYTES: usize = 8 * 1024 * 1024;
/// Bytes read from a local data file at once.
const READ_BUFFER_BYTES: usize = 1024 * 1024;
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

/// A failure of durable storage at `location`, classified by its cause.
fn failure(location: &str) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> Error + '_ {
    move |source| Error::DurableShuffle {
        location: location.to_owned(),
        source,
    }
}

/// The store and the path of a location URL (`s3://bucket/a/b`).
fn resolve(
    stores: &dyn ObjectStoreRegistry,
    location: &str,
) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let invalid = failure(location);
    let url = Url::parse(location).map_err(|e| invalid(e.into()))?;
    let store_url =
        ObjectStoreUrl::parse(&url[..url::Position::BeforePath]).map_err(|e| invalid(e.into()))?;
    let store = stores
        .get_store(store_url.as_ref())
        .map_err(|e| invalid(e.into()))?;
    let path = Path::from_url_path(url.path()).map_err(|e| invalid(e.into()))?;
    Ok((store, path))
}

fn with_extension(path: &Path, extension: &str) -> Result<Path> {
    Path::parse(format!("{path}.{extension}")).map_err(|e| failure(path.as_ref())(e.into()))
}

/// The multipart API of the store at `location`, if it has one.
fn multipart_store(
    stores: &StoreRegistry,
    location: &str,
) -> Result<Option<Arc<dyn MultipartStore>>> {
    let url = Url::parse(location).map_err(|e| failure(location)(e.into()))?;
    stores
        .multipart_store(&url)
        .map_err(|e| failure(location)(e.into()))
}

/// The records of a job's uploads in progress (see [`crate::storage::upload`]).
fn upload_records(job_path: &Path) -> Path {
    job_path.clone().join("_uploads")
}

/// Uploads a published map output's files to `location`: the data first,
/// then the index, whose presence marks the output complete. The data goes
/// up as a multipart upload recorded in the job's folder, so that
/// [`remove_job`] aborts it should this executor be killed midway.
pub async fn upload(
    stores: &StoreRegistry,
    id: &MapOutputId,
    shuffle_location: &str,
    data_file: &std::path::Path,
    index_file: &std::path::Path,
    lease: Option<Arc<Lease>>,
) -> Result<String> {
    let location = output_location(shuffle_location, id);
    let failed = failure(&location);
    let (store, path) = resolve(stores, &location)?;
    let data_path = with_extension(&path, "data")?;
    let data_upload = match multipart_store(stores, &location)? {
        Some(multipart) => {
            let (_, job_path) = resolve(stores, &job_location(shuffle_location, &id.job_id))?;
            let record = upload_records(&job_path).join(format!(
                "{}-{}-a{}.json",
                id.stage_id, id.map_partition, id.attempt
            ));
            FileUpload::Recorded(RecordedUpload::new(
                multipart,
                Arc::clone(&store),
                data_path,
                record,
                lease.clone(),
                UPLOAD_PART_BYTES,
            ))
        }
        None => FileUpload::Buffered(
            BufWriter::with_capacity(Arc::clone(&store), data_path, UPLOAD_PART_BYTES)
                .with_max_concurrency(PARTS_IN_FLIGHT),
        ),
    };
    let mut upload = AbortOnDrop(Some(data_upload));
    if let Err(e) = send_file(data_file, upload.file(), &location).await {
        upload.abort_now().await;
        return Err(e);
    }
    // An upload that failed to complete is not aborted: a buffered writer may
    // be shut down already. What it leaves is an unfinished upload (recorded,
    // for [`remove_job`]) or a partial local file, never a visible output.
    let completed = upload.file().complete().await;
    upload.disarm();
    completed.map_err(|e| failed(completion_failure(e)))?;
    let index = tokio::fs::read(index_file)
        .await
        .map_err(|e| Error::io(index_file, e))?;
    // An executor that may have been declared lost must not publish an
    // output into a folder its job's clean-up may have deleted.
    if let Some(lease) = &lease {
        lease.check().map_err(|e| failed(e.into()))?;
    }
    store
        .put(&with_extension(&path, "index")?, PutPayload::from(index))
        .await
        .map_err(|e| failed(e.into()))?;
    Ok(location.clone())
}

/// Why completing a data file's upload failed, as the task's failure. The
/// store answers "no such upload" when a completion whose answer was lost is
/// retried (it had succeeded), or when the upload was aborted meanwhile;
/// either way another attempt of the task uploads the file again, so that
/// answer is not taken for a missing bucket, which fails at once.
fn completion_failure(error: ParquetError) -> Box<dyn std::error::Error + Send + Sync> {
    let upload_gone = std::iter::successors(
        Some(&error as &(dyn std::error::Error + 'static)),
        |cause| cause.source(),
    )
    .any(|cause| {
        matches!(
            cause.downcast_ref(),
            Some(object_store::Error::NotFound { .. })
        )
    });
    if upload_gone {
        // A generic store error: retried.
        Box::new(object_store::Error::Generic {
            store: "upload",
            source: format!("the upload ended unfinished: {error}").into(),
        })
    } else {
        error.into()
    }
}

/// Sends the local file at `path` to `upload` of `location`, one read
/// buffer at a time.
async fn send_file(path: &std::path::Path, upload: &mut FileUpload, location: &str) -> Result<()> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Error::io(path, e))?;
    loop {
        let mut buffer = BytesMut::with_capacity(READ_BUFFER_BYTES);
        let read = file
            .read_buf(&mut buffer)
            .await
            .map_err(|e| Error::io(path, e))?;
        if read == 0 {
            return Ok(());
        }
        upload
            .write(buffer.freeze())
            .await
            .map_err(|e| failure(location)(e.into()))?;
    }
}

/// A data upload that aborts itself when dropped unfinished: a task that is
/// cancelled stops in the middle of [`upload`], and its multipart upload
/// would otherwise keep its parts (which S3 bills, and no listing shows)
/// until [`remove_job`] aborts what the job's records name.
struct AbortOnDrop(Option<FileUpload>);

impl AbortOnDrop {
    fn file(&mut self) -> &mut FileUpload {
        self.0.as_mut().expect("the upload is not finished yet")
    }

    /// The upload has finished, or will not be aborted: nothing is left to do.
    fn disarm(&mut self) {
        self.0 = None;
    }

    /// Gives up on the upload now, rather than when it is dropped.
    async fn abort_now(&mut self) {
        if let Some(upload) = self.0.take()
            && let Err(error) = upload.abort().await
        {
            let error = redacted_error(&error);
            tracing::warn!(%error, "could not abort a failed shuffle upload");
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(upload) = self.0.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = upload.abort().await {
                    let error = redacted_error(&error);
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
    let failed = failure(location);
    let (store, path) = resolve(runtime.object_store_registry.as_ref(), location)?;
    let data_path = with_extension(&path, "data")?;
    let index_path = with_extension(&path, "index")?;
    let missing_or_failed = |e: object_store::Error| match e {
        object_store::Error::NotFound { .. } => Error::DurableOutputMissing {
            location: location.to_owned(),
        },
        other => failed(other.into()),
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
            SpoolError::Local(cause) => failed(cause),
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
    Local(Box<dyn std::error::Error + Send + Sync>),
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
    let local = |e: std::io::Error| SpoolError::Local(e.into());
    let temp = runtime
        .disk_manager
        .create_tmp_file("reading a durable shuffle partition")
        .map_err(|e| SpoolError::Local(e.into()))?;
    let temp_path = temp
        .path()
        .ok_or_else(|| SpoolError::Local("the spill space has no local files".into()))?;
    let file = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(temp_path)
        .await
        .map_err(local)?;
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
        writer.write_all(&chunk).await.map_err(local)?;
    }
    writer.flush().await.map_err(local)?;
    let mut file = writer.into_inner();
    file.seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(local)?;
    Ok(Spooled {
        file: file.into_std().await,
        temp,
    })
}

/// Checks, before a job that copies its map outputs to `shuffle_location`
/// starts, that the store there lets it create, read and delete them, with
/// an empty object (`_access_check-<job>`, beside the jobs' folders, so that
/// a refused deletion leaves no job folder behind). A location no store
/// serves or a missing bucket would otherwise fail every map task, each
/// attempt of it, at run time. A right refused to the caller's keys (the
/// scheduler's) is only logged: its executors may hold other keys, and it
/// logs again when it cannot delete a job's outputs.
pub async fn check_access(
    stores: &dyn ObjectStoreRegistry,
    shuffle_location: &str,
    job_id: &str,
) -> Result<()> {
    let refused = |reason: String| Error::ShuffleLocationRefused {
        location: shuffle_location.to_owned(),
        reason,
    };
    let location = format!(
        "{}/_access_check-{job_id}",
        shuffle_location.trim_end_matches('/')
    );
    let (store, probe) = resolve(stores, &location).map_err(|e| refused(redacted_error(&e)))?;
    let checked = match store.put(&probe, PutPayload::new()).await {
        Ok(_) => {
            let read = store.head(&probe).await.map(drop).map_err(|e| ("read", e));
            let deleted = store.delete(&probe).await.map_err(|e| ("delete", e));
            read.and(deleted)
        }
        Err(e) => Err(("create", e)),
    };
    match checked {
        Ok(()) => Ok(()),
        Err((
            right,
            e @ (object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }),
        )) => {
            let error = redacted_error(&e);
            tracing::warn!(location = %shuffle_location, right, %error,
                "this process's keys lack a right at the durable shuffle location; the \
                 executors' keys must have it");
            Ok(())
        }
        Err((right, e)) => Err(refused(format!(
            "its store refuses to {right} objects there: {}",
            redacted_error(&e)
        ))),
    }
}

/// Deletes every durable map output of a job, once the uploads that its
/// killed executors left unfinished are aborted.
pub async fn remove_job(
    stores: &StoreRegistry,
    shuffle_location: &str,
    job_id: &str,
) -> Result<()> {
    let location = job_location(shuffle_location, job_id);
    let failed = failure(&location);
    let (store, prefix) = resolve(stores, &location)?;
    // The folder goes even if an upload cannot be aborted (a lifecycle rule
    // removes such an upload): that is logged.
    if let Some(multipart) = multipart_store(stores, &location)? {
        match abort_recorded_uploads(&store, multipart.as_ref(), &upload_records(&prefix)).await {
            Ok(0) => {}
            Ok(aborted) => {
                tracing::info!(%location, aborted, "aborted shuffle uploads that killed tasks left");
            }
            Err(e) => {
                let error = redacted_error(&e);
                tracing::warn!(%location, %error, "cannot abort the shuffle uploads that killed tasks left");
            }
        }
    }
    delete_prefix(&store, &prefix, location.starts_with("file:"))
        .await
        .map_err(|e| failed(e.into()))
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    use datafusion::physical_plan::common::collect;

    use super::*;
    use crate::shuffle::test_support::write_map_output;
    use crate::storage::{StoreRegistry, runtime_builder};

    /// A map output of two partitions: `[1, 2]` and nothing.
    fn write_output(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1, 2]))])
            .expect("batch");
        write_map_output(dir, &[batch])
    }

    /// A location's access check leaves nothing, and one whose store cannot
    /// create objects (a folder under a file) is refused, naming it.
    #[tokio::test]
    async fn a_shuffle_locations_access_is_checked_without_a_trace() {
        let dir = tempfile::tempdir().expect("temp dir");
        let stores = StoreRegistry::new();
        let location = format!("file://{}/maps", dir.path().display());
        check_access(&stores, &location, "job1")
            .await
            .expect("access");
        let left: Vec<_> = std::fs::read_dir(dir.path().join("maps"))
            .expect("the location")
            .collect();
        assert!(left.is_empty(), "{left:?}");

        std::fs::write(dir.path().join("file"), b"x").expect("a file");
        let location = format!("file://{}/file/maps", dir.path().display());
        let error = check_access(&stores, &location, "job1")
            .await
            .expect_err("under a file")
            .to_string();
        assert!(
            error.starts_with(&format!(
                "quiver.shuffle_location '{location}' cannot hold map outputs: its store \
                 refuses to create objects there"
            )),
            "{error}"
        );
    }

    #[test]
    fn an_upload_gone_at_completion_is_retried() {
        use crate::error::classify_failure;
        use quiver_proto::FailureKind;

        let classified = |store: object_store::Error| {
            let error = Error::DurableShuffle {
                location: "s3://lake/_shuffle/job/1/0-a0".into(),
                source: completion_failure(ParquetError::External(Box::new(store))),
            };
            classify_failure(&DataFusionError::from(error))
        };
        let gone = object_store::Error::NotFound {
            path: "_shuffle/job/1/0-a0.data".into(),
            source: "NoSuchUpload".into(),
        };
        assert_eq!(classified(gone), FailureKind::Retryable);
        let refused = object_store::Error::PermissionDenied {
            path: "_shuffle/job/1/0-a0.data".into(),
            source: "AccessDenied".into(),
        };
        assert_eq!(classified(refused), FailureKind::Fatal);
    }

    #[tokio::test]
    async fn outputs_round_trip_through_the_store_and_corruption_is_caught() {
        let local = tempfile::tempdir().expect("temp");
        let remote = tempfile::tempdir().expect("temp");
        let (data, index) = write_output(local.path());
        let stores = Arc::new(StoreRegistry::new());
        let runtime = runtime_builder(Arc::clone(&stores))
            .build()
            .expect("runtime");
        let shuffle = format!("file://{}", remote.path().display());
        let id = MapOutputId::new("job1", 2, 0, 1).expect("id");
        let location = upload(&stores, &id, &shuffle, &data, &index, None)
            .await
            .expect("upload");
        assert_eq!(location, output_location(&shuffle, &id));

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

        remove_job(&stores, &shuffle, "job1").await.expect("remove");
        assert!(!remote.path().join("job1").exists());
        // The scheduler's sweep removes a job's folder again after its
        // clean-up did: a folder already gone is no failure.
        remove_job(&stores, &shuffle, "job1")
            .await
            .expect("remove what is gone");
    }
}
