//! Stores and registries that pass every request on to another, and do a
//! little more on the way: a view that leaves files out of listings, a test
//! that acts as a planner reaches a file. [`Forwarding`] holds the
//! delegation once; what differs lives in its [`StoreHooks`].

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::error::Result as DfResult;
use datafusion::execution::object_store::ObjectStoreRegistry;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};
use url::Url;

/// What a [`Forwarding`] store does besides passing requests on.
pub trait StoreHooks: fmt::Debug + Send + Sync + 'static {
    /// Runs before a request reads `location`, or lists below it.
    fn before(&self, _location: &Path) {}

    /// Whether listings show the object at `location`.
    fn lists(&self, _location: &Path) -> bool {
        true
    }
}

/// A store that passes every request on to `inner`, through `hooks`.
#[derive(Debug)]
pub struct Forwarding<H> {
    inner: Arc<dyn ObjectStore>,
    hooks: Arc<H>,
}

impl<H: StoreHooks> Forwarding<H> {
    pub fn new(inner: Arc<dyn ObjectStore>, hooks: H) -> Self {
        Self {
            inner,
            hooks: Arc::new(hooks),
        }
    }

    fn listed(
        &self,
        listing: BoxStream<'static, Result<ObjectMeta>>,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let hooks = Arc::clone(&self.hooks);
        listing
            .try_filter(move |meta| futures::future::ready(hooks.lists(&meta.location)))
            .boxed()
    }
}

impl<H> fmt::Display for Forwarding<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Forwarding({})", self.inner)
    }
}

#[async_trait]
impl<H: StoreHooks> ObjectStore for Forwarding<H> {
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

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.hooks.before(location);
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.hooks.before(location);
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        if let Some(prefix) = prefix {
            self.hooks.before(prefix);
        }
        self.listed(self.inner.list(prefix))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        if let Some(prefix) = prefix {
            self.hooks.before(prefix);
        }
        self.listed(self.inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        if let Some(prefix) = prefix {
            self.hooks.before(prefix);
        }
        let mut listing = self.inner.list_with_delimiter(prefix).await?;
        listing
            .objects
            .retain(|meta| self.hooks.lists(&meta.location));
        Ok(listing)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

/// Hands out the stores of `inner`, each as `wrap` makes it from the store
/// and its URL.
pub struct WrappingRegistry<F> {
    inner: Arc<dyn ObjectStoreRegistry>,
    wrap: F,
}

impl<F> WrappingRegistry<F>
where
    F: Fn(&Url, Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> + Send + Sync + 'static,
{
    pub fn new(inner: Arc<dyn ObjectStoreRegistry>, wrap: F) -> Self {
        Self { inner, wrap }
    }
}

impl<F> fmt::Debug for WrappingRegistry<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappingRegistry")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<F> ObjectStoreRegistry for WrappingRegistry<F>
where
    F: Fn(&Url, Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> + Send + Sync + 'static,
{
    fn register_store(
        &self,
        url: &Url,
        store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        self.inner.register_store(url, store)
    }

    fn deregister_store(&self, url: &Url) -> DfResult<Arc<dyn ObjectStore>> {
        self.inner.deregister_store(url)
    }

    fn get_store(&self, url: &Url) -> DfResult<Arc<dyn ObjectStore>> {
        Ok((self.wrap)(url, self.inner.get_store(url)?))
    }
}
