//! Counts what a task reads from object stores: the bytes of every range it
//! fetches and the number of requests, for its job's status. It is how
//! partition pruning and Parquet predicate pushdown show their worth.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::execution::object_store::ObjectStoreRegistry;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, OBJECT_STORE_COALESCE_DEFAULT,
    ObjectMeta, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload,
    PutResult, RenameOptions, Result, coalesce_ranges,
};
use url::Url;

use super::forwarding::WrappingRegistry;

/// Bytes and requests read through a [`metered_registry`].
#[derive(Debug, Default)]
pub struct ReadMeter {
    bytes: AtomicU64,
    requests: AtomicU64,
}

impl ReadMeter {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// The stores of `inner`, each wrapped to count what it reads into `meter`.
pub fn metered_registry(
    inner: Arc<dyn ObjectStoreRegistry>,
    meter: Arc<ReadMeter>,
) -> impl ObjectStoreRegistry {
    WrappingRegistry::new(inner, move |url: &Url, store| {
        Arc::new(MeteredStore {
            inner: store,
            meter: Arc::clone(&meter),
            reads_ranges_in_place: matches!(url.scheme(), "file" | "memory"),
        }) as Arc<dyn ObjectStore>
    })
}

/// A store that counts the bytes its reads return.
#[derive(Debug)]
struct MeteredStore {
    inner: Arc<dyn ObjectStore>,
    meter: Arc<ReadMeter>,
    /// Local files and memory read several ranges exactly, in place. Remote
    /// stores fetch them in merged requests, gaps included.
    reads_ranges_in_place: bool,
}

impl fmt::Display for MeteredStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Metered({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for MeteredStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    // Single ranged reads (`get_range`) come through here as well.
    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let head = options.head;
        let result = self.inner.get_opts(location, options).await?;
        self.meter.requests.fetch_add(1, Ordering::Relaxed);
        if !head {
            self.meter
                .bytes
                .fetch_add(result.range.end - result.range.start, Ordering::Relaxed);
        }
        Ok(result)
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        if self.reads_ranges_in_place {
            // Forwarded, so that one open file serves every range; what it
            // reads is exactly the ranges asked for.
            let read = self.inner.get_ranges(location, ranges).await?;
            self.meter.requests.fetch_add(1, Ordering::Relaxed);
            let bytes: u64 = ranges.iter().map(|range| range.end - range.start).sum();
            self.meter.bytes.fetch_add(bytes, Ordering::Relaxed);
            return Ok(read);
        }
        // A remote store merges ranges less than a MiB apart into one request
        // and fetches the gaps too: merged here, as object_store does, so that
        // each request and all the bytes it fetches pass through `get_opts`.
        coalesce_ranges(
            ranges,
            |range| self.get_range(location, range),
            OBJECT_STORE_COALESCE_DEFAULT,
        )
        .await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;

    use super::*;

    fn metered(reads_ranges_in_place: bool) -> (MeteredStore, Arc<ReadMeter>) {
        let meter = Arc::new(ReadMeter::default());
        let store = MeteredStore {
            inner: Arc::new(InMemory::new()),
            meter: Arc::clone(&meter),
            reads_ranges_in_place,
        };
        (store, meter)
    }

    #[tokio::test]
    async fn reads_are_counted_and_writes_are_not() {
        let (store, meter) = metered(true);
        let path = Path::from("a/b");
        store
            .put(&path, PutPayload::from(vec![7u8; 1000]))
            .await
            .expect("put");
        assert_eq!(meter.bytes(), 0);
        store.get_range(&path, 100..300).await.expect("range");
        store.head(&path).await.expect("head");
        assert_eq!(meter.bytes(), 200);
        store
            .get_ranges(&path, &[0..10, 500..520])
            .await
            .expect("ranges");
        assert_eq!(meter.bytes(), 230);
        assert_eq!(meter.requests(), 3);
    }

    /// A remote store fetches nearby ranges in one request, gaps included:
    /// those are the bytes that cross the network.
    #[tokio::test]
    async fn merged_remote_reads_count_the_bytes_fetched() {
        let (store, meter) = metered(false);
        let path = Path::from("a/b");
        let far = 3 * OBJECT_STORE_COALESCE_DEFAULT;
        store
            .put(&path, PutPayload::from(vec![7u8; far as usize + 100]))
            .await
            .expect("put");
        let read = store
            .get_ranges(&path, &[0..10, 500..520, far..far + 100])
            .await
            .expect("ranges");
        assert_eq!(
            read.iter().map(Bytes::len).collect::<Vec<_>>(),
            [10, 20, 100]
        );
        // Two requests: 0..520 merged, and the far range on its own.
        assert_eq!(meter.requests(), 2);
        assert_eq!(meter.bytes(), 520 + 100);
    }
}
