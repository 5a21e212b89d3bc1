//! File uploads that a killed task cannot leave behind unnoticed.
//!
//! A task sends each file it puts in a remote store (a written Parquet file,
//! a durable shuffle output) in parts, as a multipart upload. The store
//! keeps (and bills) the parts of an upload that is never completed or
//! aborted, and no listing of the bucket shows them. A task that fails or is
//! cancelled aborts its uploads itself; a task whose process is killed
//! cannot. So before a file's first part goes up, the task records the
//! upload's id in its job's records folder, and deletes the record once the
//! upload is completed or aborted. Whoever finishes the job (a write's
//! commit, the scheduler settling a write or removing a job's durable
//! shuffle data) aborts every upload still recorded
//! ([`abort_recorded_uploads`]) before deleting the folder.
//!
//! What is left: an upload created in the moment before its record was
//! written. It holds no parts yet; an abort-incomplete-uploads lifecycle rule
//! removes it. Stores without a multipart API (local files) write through
//! object_store's `BufWriter`: a killed writer's partial file lies in the
//! job's folder, which the same clean-up deletes.

use std::sync::Arc;

use bytes::Bytes;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::execution::object_store::ObjectStoreUrl;
use futures::future::BoxFuture;
use futures::{FutureExt, TryStreamExt};
use object_store::buffered::BufWriter;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{MultipartId, ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::async_writer::AsyncFileWriter;
use parquet::errors::ParquetError;
use tokio::task::JoinSet;
use tracing::warn;

use crate::lease::Lease;
use crate::storage::{StoreRegistry, redacted_error};

/// Parts of one file uploading at once while the next one fills.
pub const PARTS_IN_FLIGHT: usize = 2;

/// The multipart API of the store at `url`, found through the task's
/// [`StoreRegistry`] (a session config extension the executor sets). `None`
/// for stores without one, and for tasks run outside an executor.
pub fn multipart_store(
    context: &TaskContext,
    url: &ObjectStoreUrl,
) -> Result<Option<Arc<dyn MultipartStore>>> {
    match context.session_config().get_extension::<StoreRegistry>() {
        Some(stores) => stores.multipart_store(url.as_ref()),
        None => Ok(None),
    }
}

/// What an upload record holds: enough to abort the upload.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct UploadRecord {
    path: String,
    upload_id: String,
}

/// Where a file of a write task goes: a recorded multipart upload where the
/// store has one, otherwise object_store's buffered writer.
pub enum FileUpload {
    Recorded(RecordedUpload),
    Buffered(BufWriter),
}

impl FileUpload {
    /// Gives up on the file: its upload is aborted and its record deleted.
    pub async fn abort(self) -> object_store::Result<()> {
        match self {
            FileUpload::Recorded(upload) => upload.abort().await,
            FileUpload::Buffered(mut writer) => writer.abort().await,
        }
    }
}

impl AsyncFileWriter for FileUpload {
    fn write(&mut self, bytes: Bytes) -> BoxFuture<'_, parquet::errors::Result<()>> {
        match self {
            FileUpload::Recorded(upload) => upload.write(bytes).boxed(),
            FileUpload::Buffered(writer) => writer.write(bytes),
        }
    }

    fn complete(&mut self) -> BoxFuture<'_, parquet::errors::Result<()>> {
        match self {
            FileUpload::Recorded(upload) => upload.complete().boxed(),
            FileUpload::Buffered(writer) => writer.complete(),
        }
    }
}

/// One file sent as a multipart upload whose id is recorded at `record`
/// before its first part. A file smaller than one part is sent in a single
/// request, which is atomic, and needs no record.
pub struct RecordedUpload {
    multipart: Arc<dyn MultipartStore>,
    objects: Arc<dyn ObjectStore>,
    path: Path,
    record: Path,
    lease: Option<Arc<Lease>>,
    part_bytes: usize,
    /// Bytes not yet sent, in the chunks the Parquet writer gave them.
    pending: Vec<Bytes>,
    pending_bytes: usize,
    /// The upload, once its first part is due.
    id: Option<MultipartId>,
    sent_parts: usize,
    uploading: JoinSet<object_store::Result<(usize, PartId)>>,
    uploaded: Vec<(usize, PartId)>,
}

impl RecordedUpload {
    /// An upload of `path` in parts of at least `part_bytes`, recorded at
    /// `record`. A `lease` that has run out stops it before it starts.
    pub fn new(
        multipart: Arc<dyn MultipartStore>,
        objects: Arc<dyn ObjectStore>,
        path: Path,
        record: Path,
        lease: Option<Arc<Lease>>,
        part_bytes: usize,
    ) -> Self {
        Self {
            multipart,
            objects,
            path,
            record,
            lease,
            part_bytes,
            pending: Vec::new(),
            pending_bytes: 0,
            id: None,
            sent_parts: 0,
            uploading: JoinSet::new(),
            uploaded: Vec::new(),
        }
    }

    async fn write(&mut self, bytes: Bytes) -> parquet::errors::Result<()> {
        self.pending_bytes += bytes.len();
        self.pending.push(bytes);
        if self.pending_bytes >= self.part_bytes {
            self.send_part().await.map_err(parquet_error)?;
        }
        Ok(())
    }

    async fn complete(&mut self) -> parquet::errors::Result<()> {
        self.finish().await.map_err(parquet_error)
    }

    async fn finish(&mut self) -> object_store::Result<()> {
        let Some(id) = self.id.clone() else {
            let payload = self.take_pending();
            self.objects.put(&self.path, payload).await?;
            return Ok(());
        };
        if self.pending_bytes > 0 {
            self.send_part().await?;
        }
        self.collect_finished_parts().await?;
        let mut parts = std::mem::take(&mut self.uploaded);
        parts.sort_by_key(|(index, _)| *index);
        let parts = parts.into_iter().map(|(_, part)| part).collect();
        self.multipart
            .complete_multipart(&self.path, &id, parts)
            .await?;
        self.id = None;
        delete_record(&self.objects, &self.record).await
    }

    /// Sends what is pending as the next part, starting the upload first if
    /// this is its first part. Waits while [`PARTS_IN_FLIGHT`] are uploading.
    async fn send_part(&mut self) -> object_store::Result<()> {
        let id = match &self.id {
            Some(id) => id.clone(),
            None => self.start().await?,
        };
        while self.uploading.len() >= PARTS_IN_FLIGHT {
            self.collect_one_part().await?;
        }
        let payload = self.take_pending();
        let index = self.sent_parts;
        self.sent_parts += 1;
        let multipart = Arc::clone(&self.multipart);
        let path = self.path.clone();
        self.uploading.spawn(async move {
            let part = multipart.put_part(&path, &id, index, payload).await?;
            Ok((index, part))
        });
        Ok(())
    }

    /// The bytes not yet sent, as one payload (their chunks are not copied).
    fn take_pending(&mut self) -> PutPayload {
        self.pending_bytes = 0;
        PutPayload::from_iter(std::mem::take(&mut self.pending))
    }

    /// Creates the upload and records its id, so that it can be aborted
    /// even if this process dies before it completes.
    async fn start(&mut self) -> object_store::Result<MultipartId> {
        if let Some(lease) = &self.lease {
            lease.check().map_err(upload_error)?;
        }
        let id = self.multipart.create_multipart(&self.path).await?;
        self.id = Some(id.clone());
        let record = UploadRecord {
            path: self.path.to_string(),
            upload_id: id.clone(),
        };
        let record = serde_json::to_vec(&record).map_err(upload_error)?;
        self.objects.put(&self.record, record.into()).await?;
        Ok(id)
    }

    async fn collect_one_part(&mut self) -> object_store::Result<()> {
        if let Some(joined) = self.uploading.join_next().await {
            self.uploaded.push(joined_part(joined)?);
        }
        Ok(())
    }

    async fn collect_finished_parts(&mut self) -> object_store::Result<()> {
        while !self.uploading.is_empty() {
            self.collect_one_part().await?;
        }
        Ok(())
    }

    async fn abort(mut self) -> object_store::Result<()> {
        self.uploading.abort_all();
        let Some(id) = self.id.take() else {
            return Ok(());
        };
        abort_upload(self.multipart.as_ref(), &self.path, &id).await?;
        delete_record(&self.objects, &self.record).await
    }
}

fn joined_part(
    joined: std::result::Result<object_store::Result<(usize, PartId)>, tokio::task::JoinError>,
) -> object_store::Result<(usize, PartId)> {
    joined.map_err(upload_error)?
}

/// A failure of the upload itself rather than of the store's API.
fn upload_error(error: impl std::error::Error + Send + Sync + 'static) -> object_store::Error {
    object_store::Error::Generic {
        store: "upload",
        source: Box::new(error),
    }
}

fn parquet_error(error: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(error))
}

/// Aborts an upload; one that is gone (completed, or aborted already) is fine.
async fn abort_upload(
    multipart: &dyn MultipartStore,
    path: &Path,
    id: &MultipartId,
) -> object_store::Result<()> {
    gone_is_fine(multipart.abort_multipart(path, id).await)
}

async fn delete_record(objects: &Arc<dyn ObjectStore>, record: &Path) -> object_store::Result<()> {
    gone_is_fine(objects.delete(record).await)
}

fn gone_is_fine(result: object_store::Result<()>) -> object_store::Result<()> {
    match result {
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        other => other,
    }
}

/// Aborts every upload recorded under `records` and deletes the records.
/// Returns how many it aborted. An upload that cannot be aborted is logged
/// and its record left in place; deleting the staging folder then takes it,
/// and the bucket's lifecycle rule is what removes that upload.
pub async fn abort_recorded_uploads(
    objects: &Arc<dyn ObjectStore>,
    multipart: &dyn MultipartStore,
    records: &Path,
) -> Result<usize> {
    let listed: Vec<Path> = objects
        .list(Some(records))
        .map_ok(|meta| meta.location)
        .try_collect()
        .await?;
    let mut aborted = 0;
    for record in listed {
        let bytes = match objects.get(&record).await {
            Ok(found) => found.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let UploadRecord { path, upload_id } = serde_json::from_slice(&bytes).map_err(|e| {
            DataFusionError::Execution(format!("upload record '{record}' is unreadable: {e}"))
        })?;
        let path = Path::parse(&path).map_err(|e| DataFusionError::External(Box::new(e)))?;
        match abort_upload(multipart, &path, &upload_id).await {
            Ok(()) => {
                delete_record(objects, &record).await?;
                aborted += 1;
            }
            Err(e) => {
                let error = redacted_error(&e);
                warn!(%path, %error, "cannot abort an unfinished upload");
            }
        }
    }
    Ok(aborted)
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use object_store::memory::InMemory;

    use super::*;

    const PART_BYTES: usize = 100;
    const RECORDS: &str = "table/_temporary/job/_uploads";

    fn upload(store: &Arc<InMemory>) -> RecordedUpload {
        RecordedUpload::new(
            Arc::clone(store) as _,
            Arc::clone(store) as _,
            Path::from("table/_temporary/job/p0-a0/part-0.parquet"),
            Path::from(format!("{RECORDS}/p0-a0-0.json")),
            None,
            PART_BYTES,
        )
    }

    fn chunk(n: u8) -> Bytes {
        Bytes::from(vec![n; 60])
    }

    async fn record_of(store: &Arc<InMemory>, upload: &RecordedUpload) -> Option<UploadRecord> {
        match store.get(&upload.record).await {
            Ok(found) => {
                let bytes = found.bytes().await.expect("read record");
                Some(serde_json::from_slice(&bytes).expect("record is JSON"))
            }
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn a_file_of_several_parts_is_recorded_until_it_completes() {
        let store = Arc::new(InMemory::new());
        let mut file = upload(&store);
        file.write(chunk(1)).await.expect("write");
        assert!(record_of(&store, &file).await.is_none(), "no part sent yet");
        file.write(chunk(2)).await.expect("write");
        let record = record_of(&store, &file)
            .await
            .expect("recorded at the first part");
        assert_eq!(record.path, file.path.as_ref());
        for n in 3..=5 {
            file.write(chunk(n)).await.expect("write");
        }
        file.complete().await.expect("complete");
        assert!(record_of(&store, &file).await.is_none(), "record deleted");
        let written = contents(&store, &file.path).await;
        let expected: Vec<u8> = (1..=5).flat_map(|n| chunk(n).to_vec()).collect();
        assert_eq!(written.as_ref(), expected.as_slice());
    }

    #[tokio::test]
    async fn a_file_smaller_than_a_part_is_one_put_without_a_record() {
        let store = Arc::new(InMemory::new());
        let mut file = upload(&store);
        file.write(chunk(7)).await.expect("write");
        file.complete().await.expect("complete");
        assert!(record_of(&store, &file).await.is_none());
        assert_eq!(contents(&store, &file.path).await, chunk(7));
    }

    async fn contents(store: &Arc<InMemory>, path: &Path) -> Bytes {
        let found = store.get(path).await.expect("file");
        found.bytes().await.expect("read file")
    }

    /// A task killed mid-upload aborts nothing itself; settling its job
    /// finds the upload by its record and aborts it.
    #[tokio::test]
    async fn an_upload_left_by_a_killed_task_is_aborted_from_its_record() {
        let store = Arc::new(InMemory::new());
        let (file, record) = partly_uploaded(&store).await;
        let path = file.path.clone();
        drop(file);

        let objects: Arc<dyn ObjectStore> = Arc::clone(&store) as _;
        let aborted = abort_recorded_uploads(&objects, store.as_ref(), &Path::from(RECORDS))
            .await
            .expect("abort recorded uploads");
        assert_eq!(aborted, 1);
        assert_upload_gone(&store, &path, &record).await;
    }

    /// An upload with parts sent and more to come, and its record.
    async fn partly_uploaded(store: &Arc<InMemory>) -> (RecordedUpload, UploadRecord) {
        let mut file = upload(store);
        for n in 1..=4 {
            file.write(chunk(n)).await.expect("write");
        }
        let record = record_of(store, &file).await.expect("recorded");
        (file, record)
    }

    /// Neither the upload nor its record remains, and no file appeared.
    async fn assert_upload_gone(store: &Arc<InMemory>, path: &Path, record: &UploadRecord) {
        let records = Path::from(RECORDS);
        assert!(
            store.list(Some(&records)).next().await.is_none(),
            "record deleted"
        );
        let completed = store
            .complete_multipart(path, &record.upload_id, Vec::new())
            .await;
        assert!(completed.is_err(), "the upload is gone");
        assert!(store.head(path).await.is_err(), "no file appeared");
    }

    #[tokio::test]
    async fn an_aborted_upload_leaves_neither_parts_nor_record() {
        let store = Arc::new(InMemory::new());
        let (file, record) = partly_uploaded(&store).await;
        let path = file.path.clone();
        FileUpload::Recorded(file).abort().await.expect("abort");
        assert_upload_gone(&store, &path, &record).await;
    }
}
