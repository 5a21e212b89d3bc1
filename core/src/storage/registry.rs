//! Which object store serves a URL.
//!
//! A store is built the first time a location is used: from the standard
//! environment variables and credential chains of its kind (`AWS_*` and the
//! instance, container and web-identity credentials; `GOOGLE_*`; `AZURE_*`),
//! overlaid with the options configured for that location, if any. Stores are
//! keyed by scheme and authority (`s3://bucket`), as DataFusion expects.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::object_store::ObjectStoreRegistry;
use object_store::aws::AmazonS3Builder;
use object_store::azure::{MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    ClientOptions, MultipartId, ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutPayload,
    PutResult, RetryConfig,
};
use quiver_proto::StoreConfig;
use url::Url;

use super::aws_profile::ProfileSettings;
use super::http_credentials;
use super::options::StoreOptions;

/// How long one request to a remote store is retried before the task fails
/// (and is retried itself, by the scheduler).
const STORE_RETRY_TIMEOUT: Duration = Duration::from_secs(30);
const STORE_MAX_RETRIES: usize = 5;

/// Why a store cannot be built. Never carries option values: they may be secrets.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("'{url}' is not a location Quiver can read or write: {reason}")]
    UnsupportedLocation { url: String, reason: String },
    #[error("cannot set up the object store for '{url}': {reason}")]
    Build { url: String, reason: String },
}

/// A built store: the interface DataFusion reads and writes through, and,
/// where the store has one, its multipart upload API. Writes use that to
/// record each upload's id, so that an upload a killed task left unfinished
/// can be found and aborted (see [`super::upload`]).
#[derive(Clone)]
pub struct Store {
    pub objects: Arc<dyn ObjectStore>,
    pub multipart: Option<Arc<dyn MultipartStore>>,
}

impl Store {
    fn with_multipart<S: ObjectStore + MultipartStore>(store: Arc<S>) -> Self {
        Self {
            objects: Arc::clone(&store) as _,
            multipart: Some(store as _),
        }
    }
}

/// Azure's multipart API, with an abort that does abort. An upload there is
/// blocks staged under the blob's name, and object_store's abort does
/// nothing: Azure keeps uncommitted blocks for a week. Committing an empty
/// block list discards them; the empty blob that leaves is then deleted.
/// Only uploads that were never completed are aborted, so no data is lost.
#[derive(Debug)]
struct AzureUploads(Arc<MicrosoftAzure>);

#[async_trait::async_trait]
impl MultipartStore for AzureUploads {
    async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
        self.0.create_multipart(path).await
    }

    async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        self.0.put_part(path, id, part_idx, data).await
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        self.0.complete_multipart(path, id, parts).await
    }

    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> object_store::Result<()> {
        self.0.complete_multipart(path, id, Vec::new()).await?;
        match self.0.delete(path).await {
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            deleted => deleted,
        }
    }
}

#[derive(Clone)]
struct Registered {
    store: Store,
    options: StoreOptions,
}

/// A store that [`StoreRegistry::configure`] replaced (or its absence), and
/// the options that replaced it.
pub struct ReplacedStore {
    key: String,
    previous: Option<Registered>,
    installed: StoreOptions,
}

impl std::fmt::Debug for ReplacedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplacedStore")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// The object stores of one process, built on first use.
#[derive(Default)]
pub struct StoreRegistry {
    stores: RwLock<HashMap<String, Registered>>,
}

impl std::fmt::Debug for StoreRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stores = self.read();
        let keys: Vec<&String> = stores.keys().collect();
        f.debug_struct("StoreRegistry")
            .field("stores", &keys)
            .finish()
    }
}

/// The registry key of a URL: its scheme and authority, with the user name,
/// which names the container in Azure's `abfss://<container>@<account>...`.
/// (A password is refused by [`build_store`].)
pub fn store_key(url: &Url) -> String {
    let user = match url.username() {
        "" => String::new(),
        user => format!("{user}@"),
    };
    format!(
        "{}://{user}{}",
        url.scheme(),
        &url[url::Position::BeforeHost..url::Position::AfterPort]
    )
}

impl StoreRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses `options` for the location of `url` from now on. Does nothing if
    /// they are the options in use already. Returns what it replaced, for
    /// [`StoreRegistry::restore`] should the statement that set them fail.
    pub fn configure(
        &self,
        url: &Url,
        options: &StoreOptions,
    ) -> Result<Option<ReplacedStore>, StoreError> {
        let key = store_key(url);
        if self
            .read()
            .get(&key)
            .is_some_and(|registered| &registered.options == options)
        {
            return Ok(None);
        }
        let store = build_store(url, options)?;
        let previous = self.write().insert(
            key.clone(),
            Registered {
                store,
                options: options.clone(),
            },
        );
        Ok(Some(ReplacedStore {
            key,
            previous,
            installed: options.clone(),
        }))
    }

    /// Puts back the store that [`StoreRegistry::configure`] replaced.
    pub fn restore(&self, replaced: ReplacedStore) {
        let mut stores = self.write();
        match replaced.previous {
            Some(previous) => stores.insert(replaced.key, previous),
            None => stores.remove(&replaced.key),
        };
    }

    /// Puts back the store that [`StoreRegistry::configure`] replaced, unless
    /// a later statement has configured the location again since.
    pub fn restore_if_current(&self, replaced: ReplacedStore) {
        let current = self
            .read()
            .get(&replaced.key)
            .is_some_and(|registered| registered.options == replaced.installed);
        if current {
            self.restore(replaced);
        }
    }

    /// A registry of the stores of `locations`, each built with its own
    /// options, that nothing configured later changes: what one job or task
    /// runs with from start to end. Another statement may configure a
    /// location of the job anew meanwhile (other credentials), and a failed
    /// statement's options are put back when its job ends, but the job's
    /// clean-up must still act with the credentials its writes were made
    /// with. A store `self` holds with the same options is shared rather
    /// than built again; `self` is left as it is. A location not listed is
    /// built from the environment on first use, as in any registry.
    pub fn pinned(&self, locations: &[StoreConfig]) -> DfResult<StoreRegistry> {
        let mut pinned = HashMap::new();
        for location in locations {
            let url = Url::parse(&location.url).map_err(|e| {
                DataFusionError::Plan(format!("invalid store location '{}': {e}", location.url))
            })?;
            let options = StoreOptions::from_pairs(
                location
                    .options
                    .iter()
                    .map(|(key, value)| (key.clone(), value.clone())),
            );
            let key = store_key(&url);
            let shared = self
                .read()
                .get(&key)
                .filter(|registered| registered.options == options)
                .map(|registered| registered.store.clone());
            let store = match shared {
                Some(store) => store,
                None => build_store(&url, &options)
                    .map_err(|e| DataFusionError::External(Box::new(e)))?,
            };
            pinned.insert(key, Registered { store, options });
        }
        Ok(StoreRegistry {
            stores: RwLock::new(pinned),
        })
    }

    /// Keeps the stores of `pinned` as the latest of their locations, so
    /// that a later [`StoreRegistry::pinned`] with the same options shares
    /// them (an executor's registry is such a cache of its tasks' stores).
    pub fn remember(&self, pinned: &StoreRegistry) {
        let pinned = pinned.read();
        let known = |stores: &HashMap<String, Registered>, key: &String, options: &StoreOptions| {
            stores.get(key).is_some_and(|kept| &kept.options == options)
        };
        // Most tasks bring the options kept already: no write lock for them.
        let current = self.read();
        if pinned
            .iter()
            .all(|(key, registered)| known(&current, key, &registered.options))
        {
            return;
        }
        drop(current);
        let mut stores = self.write();
        for (key, registered) in pinned.iter() {
            if !known(&stores, key, &registered.options) {
                stores.insert(key.clone(), registered.clone());
            }
        }
    }

    /// The multipart upload API of the store of `url`, if it has one. Local
    /// files have none: a killed writer's partial file lies in the staging
    /// folder, which settling the write deletes.
    pub fn multipart_store(&self, url: &Url) -> DfResult<Option<Arc<dyn MultipartStore>>> {
        Ok(self.registered(url)?.multipart)
    }

    /// The store of `url`, built with no options on first use.
    fn registered(&self, url: &Url) -> DfResult<Store> {
        let key = store_key(url);
        if let Some(registered) = self.read().get(&key) {
            return Ok(registered.store.clone());
        }
        let store = build_store(url, &StoreOptions::default())
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let mut stores = self.write();
        let registered = stores.entry(key).or_insert(Registered {
            store,
            options: StoreOptions::default(),
        });
        Ok(registered.store.clone())
    }

    /// An opaque identity of the store that `url` is reached through with
    /// `options`, or with the options configured for it when `None`. Two
    /// locations of one identity are one endpoint reached with the same
    /// credentials: when one does not answer, neither will the other.
    pub fn identity(&self, url: &Url, options: Option<&StoreOptions>) -> u64 {
        let configured;
        let options = match options {
            Some(options) => options,
            None => {
                configured = self.options_for(url).unwrap_or_default();
                &configured
            }
        };
        let mut hasher = DefaultHasher::new();
        (store_key(url), options).hash(&mut hasher);
        hasher.finish()
    }

    /// The [`StoreRegistry::identity`] of the store of `location` (a table
    /// or output location, as a statement names it): `None` for one that
    /// is not a valid location, or on local disk, which always answers.
    pub fn identity_of_location(
        &self,
        location: &str,
        options: Option<&StoreOptions>,
    ) -> Option<u64> {
        let url = datafusion::datasource::listing::ListingTableUrl::parse(location).ok()?;
        (url.scheme() != "file").then(|| self.identity(url.object_store().as_ref(), options))
    }

    /// The options configured for the location of `url`, if any.
    pub fn options_for(&self, url: &Url) -> Option<StoreOptions> {
        self.read()
            .get(&store_key(url))
            .map(|registered| registered.options.clone())
            .filter(|options| !options.is_empty())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Registered>> {
        self.stores
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Registered>> {
        self.stores
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ObjectStoreRegistry for StoreRegistry {
    fn register_store(
        &self,
        url: &Url,
        store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        self.write()
            .insert(
                store_key(url),
                Registered {
                    store: Store {
                        objects: store,
                        multipart: None,
                    },
                    options: StoreOptions::default(),
                },
            )
            .map(|previous| previous.store.objects)
    }

    fn deregister_store(&self, url: &Url) -> DfResult<Arc<dyn ObjectStore>> {
        self.write()
            .remove(&store_key(url))
            .map(|registered| registered.store.objects)
            .ok_or_else(|| {
                DataFusionError::Execution(format!("no object store is registered for '{url}'"))
            })
    }

    fn get_store(&self, url: &Url) -> DfResult<Arc<dyn ObjectStore>> {
        Ok(self.registered(url)?.objects)
    }
}

/// Whether `error` says a store did not answer: no connection, a dropped
/// one, or no reply in time, after every retry. Any answer of the store (a
/// refusal, a missing object) says it is there.
pub fn store_did_not_answer(error: &(dyn std::error::Error + 'static)) -> bool {
    use object_store::client::{HttpError, HttpErrorKind};

    std::iter::successors(Some(error), |error| error.source()).any(|cause| {
        cause.downcast_ref::<HttpError>().is_some_and(|http| {
            matches!(
                http.kind(),
                HttpErrorKind::Connect
                    | HttpErrorKind::Request
                    | HttpErrorKind::Timeout
                    | HttpErrorKind::Interrupted
            )
        })
    })
}

fn retry_config() -> RetryConfig {
    RetryConfig {
        max_retries: STORE_MAX_RETRIES,
        retry_timeout: STORE_RETRY_TIMEOUT,
        ..RetryConfig::default()
    }
}

/// Builds the store for `url`: environment first, then `options` on top.
pub fn build_store(url: &Url, options: &StoreOptions) -> Result<Store, StoreError> {
    let unsupported = |reason: String| StoreError::UnsupportedLocation {
        url: store_key(url),
        reason,
    };
    // Never used, and shown wherever the location is: refused.
    if url.password().is_some() {
        return Err(unsupported(
            "a location must not hold a password; give credentials in OPTIONS (...) \
             or the environment"
                .into(),
        ));
    }
    // Echoed by a store, they are blanked wherever they appear.
    super::echoes::remember_environment_secrets();
    for (key, value) in options.iter() {
        if !super::options::is_harmless(key) {
            super::echoes::remember_secret(value);
        }
    }
    // `memory://name/` names one of the process's in-memory stores;
    // object_store knows only the nameless `memory:///`.
    if url.scheme() == "memory" {
        return Ok(memory_store(&store_key(url)));
    }
    let (scheme, _) = ObjectStoreScheme::parse(url).map_err(|e| unsupported(e.to_string()))?;
    match scheme {
        ObjectStoreScheme::Local => Ok(Store {
            objects: local_store(),
            multipart: None,
        }),
        // A cloud store's web address may hold the bucket or container in
        // its path, which DataFusion keeps as the table's path in the store.
        // S3's virtual-hosted form (`https://<bucket>.s3.<region>.amazonaws.com`)
        // names the bucket in the host, and works.
        ObjectStoreScheme::AmazonS3
        | ObjectStoreScheme::GoogleCloudStorage
        | ObjectStoreScheme::MicrosoftAzure
            if matches!(url.scheme(), "http" | "https") && !is_virtual_hosted_s3(url) =>
        {
            Err(unsupported(
                "write a cloud store's location with its own scheme: s3://<bucket>/<path>, \
                 gs://<bucket>/<path>, az://<container>/<path> or \
                 abfss://<container>@<account>.dfs.core.windows.net/<path>"
                    .into(),
            ))
        }
        ObjectStoreScheme::AmazonS3 => {
            let env = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
            let profile = ProfileSettings::read(&env);
            let builder = profile.fill(AmazonS3Builder::from_env(), &env);
            let mut builder = builder.with_url(url.as_str()).with_retry(retry_config());
            for (name, value) in options.for_provider("aws") {
                builder = builder.with_config(aws_key(name).map_err(build_error(url))?, value);
            }
            let builder = profile
                .with_credentials(builder, &env)
                .map_err(build_error(url))?;
            let store = builder.build().map_err(build_error(url))?;
            Ok(Store::with_multipart(Arc::new(store)))
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            let mut builder = GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry_config());
            for (name, value) in options.for_provider("gcp") {
                builder = builder.with_config(parse_key(url, name)?, value);
            }
            let store = builder.build().map_err(build_error(url))?;
            Ok(Store::with_multipart(Arc::new(store)))
        }
        ObjectStoreScheme::MicrosoftAzure => {
            let mut builder = MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry_config());
            for (name, value) in options.for_provider("azure") {
                builder = builder.with_config(parse_key(url, name)?, value);
            }
            let store = Arc::new(builder.build().map_err(build_error(url))?);
            Ok(Store {
                objects: Arc::clone(&store) as _,
                multipart: Some(Arc::new(AzureUploads(store))),
            })
        }
        ObjectStoreScheme::Http if !url.username().is_empty() => Err(unsupported(
            "an HTTP location must not hold a user name; give credentials in OPTIONS \
             ('http.username' '...', 'http.password' '...') or ('http.bearer_token' '...')"
                .into(),
        )),
        ObjectStoreScheme::Http => {
            // A location written as http:// asks for plain HTTP.
            let mut client = ClientOptions::new().with_allow_http(url.scheme() == "http");
            let mut credentials = Vec::new();
            for (name, value) in options.for_provider("http") {
                if http_credentials::is_credential_option(name) {
                    credentials.push((name, value));
                } else {
                    client = client.with_config(parse_key(url, name)?, value);
                }
            }
            let headers = http_credentials::authorization(&credentials).map_err(|reason| {
                StoreError::Build {
                    url: store_key(url),
                    reason: reason.to_owned(),
                }
            })?;
            if let Some(headers) = headers {
                client = client.with_default_headers(headers);
            }
            let builder = HttpBuilder::new()
                .with_url(&url[..url::Position::BeforePath])
                .with_retry(retry_config())
                .with_client_options(client);
            Ok(Store {
                objects: Arc::new(builder.build().map_err(build_error(url))?),
                multipart: None,
            })
        }
        other => Err(unsupported(format!("{other:?} stores are not supported"))),
    }
}

/// Whether `url` is an S3 web address with the bucket in its host name
/// (`<bucket>.s3.<region>.amazonaws.com`), not in its path (`s3.<region>...`,
/// Cloudflare R2's `<account>.r2.cloudflarestorage.com`).
fn is_virtual_hosted_s3(url: &Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    host.ends_with(".amazonaws.com") && !host.starts_with("s3.") && !host.starts_with("s3-")
}

/// Keys were checked when the statement was planned; an unparsable one here
/// means the options came from somewhere else, so it is an error too.
fn parse_key<K>(url: &Url, name: &str) -> Result<K, StoreError>
where
    K: std::str::FromStr<Err = object_store::Error>,
{
    name.to_ascii_lowercase().parse().map_err(build_error(url))
}

/// Why the store of `url` cannot be built: named by its key, not its options.
fn build_error(url: &Url) -> impl Fn(object_store::Error) -> StoreError + '_ {
    move |source| StoreError::Build {
        url: store_key(url),
        reason: without_byte_dumps(&source.to_string()),
    }
}

/// `text` without the lists of byte values that some builder errors print
/// of their input: a service account key whose PEM cannot be read comes
/// back as `missing section end marker: [80, 82, 73, ...]`, the whole key.
fn without_byte_dumps(text: &str) -> String {
    let mut kept = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        kept.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let list_end = after.find(']').filter(|&end| {
            let list = &after[..end];
            list.split(',').count() >= 4
                && list.split(',').all(|item| {
                    !item.trim().is_empty() && item.trim().bytes().all(|b| b.is_ascii_digit())
                })
        });
        match list_end {
            Some(end) => {
                kept.push_str("[bytes not shown]");
                rest = &after[end + 1..];
            }
            None => {
                kept.push('[');
                rest = after;
            }
        }
    }
    kept.push_str(rest);
    kept
}

/// `aws.allow_http` and the other client options are spelled without a prefix.
fn aws_key(name: &str) -> object_store::Result<object_store::aws::AmazonS3ConfigKey> {
    name.parse().or_else(|_| {
        name.parse::<object_store::ClientConfigKey>()
            .map(object_store::aws::AmazonS3ConfigKey::Client)
    })
}

fn local_store() -> Arc<dyn ObjectStore> {
    static LOCAL: OnceLock<Arc<dyn ObjectStore>> = OnceLock::new();
    Arc::clone(LOCAL.get_or_init(|| Arc::new(LocalFileSystem::new())))
}

/// `memory://` stores live as long as the process, shared by everything in
/// it: the embedded cluster's scheduler and executors see the same objects.
fn memory_store(key: &str) -> Store {
    static MEMORY: OnceLock<std::sync::Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    let mut stores = MEMORY
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Store::with_multipart(Arc::clone(
        stores
            .entry(key.to_owned())
            .or_insert_with(|| Arc::new(InMemory::new())),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Url {
        Url::parse(text).expect("valid url")
    }

    #[test]
    fn stores_are_keyed_by_scheme_and_authority() {
        assert_eq!(store_key(&url("s3://bucket/a/b.parquet")), "s3://bucket");
        // Two containers of one account are two stores.
        assert_eq!(
            store_key(&url("abfss://lake@acct.dfs.core.windows.net/a/")),
            "abfss://lake@acct.dfs.core.windows.net"
        );
        assert_eq!(store_key(&url("file:///tmp/x")), "file://");
        assert_eq!(store_key(&url("http://h:8080/x")), "http://h:8080");
    }

    /// A store nothing listens for did not answer, however deep its error is
    /// wrapped; a store that answers "not found" did.
    #[tokio::test]
    async fn a_store_that_did_not_answer_is_told_from_one_that_refused() {
        use object_store::aws::AmazonS3Builder;

        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port");
        let silent = AmazonS3Builder::new()
            .with_bucket_name("bucket")
            .with_region("us-east-1")
            .with_endpoint(format!("http://{closed}"))
            .with_allow_http(true)
            .with_access_key_id("key")
            .with_secret_access_key("secret")
            .with_retry(RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            })
            .build()
            .expect("store");
        let error = silent
            .head(&Path::from("a.parquet"))
            .await
            .expect_err("nothing listens");
        let wrapped = DataFusionError::Context(
            "inferring the schema".into(),
            Box::new(DataFusionError::ObjectStore(Box::new(error))),
        );
        assert!(store_did_not_answer(&wrapped), "{wrapped}");

        let answered = InMemory::new()
            .head(&Path::from("a.parquet"))
            .await
            .expect_err("not there");
        assert!(!store_did_not_answer(&answered), "{answered}");
    }

    #[test]
    fn locations_reached_alike_share_a_store_identity() {
        let registry = StoreRegistry::new();
        let region =
            |region: &str| StoreOptions::from_pairs([("aws.region".to_owned(), region.to_owned())]);
        let (eu, us) = (region("eu-west-1"), region("us-east-1"));
        let lake = registry.identity(&url("s3://lake/a/"), Some(&eu));
        assert_eq!(lake, registry.identity(&url("s3://lake/b/c/"), Some(&eu)));
        assert_ne!(lake, registry.identity(&url("s3://other/a/"), Some(&eu)));
        assert_ne!(lake, registry.identity(&url("s3://lake/a/"), Some(&us)));
        // Without options of its own, a location is reached as configured.
        assert_ne!(lake, registry.identity(&url("s3://lake/a/"), None));
        registry
            .configure(&url("s3://lake/"), &eu)
            .expect("configure");
        assert_eq!(lake, registry.identity(&url("s3://lake/a/"), None));
    }

    #[test]
    fn locations_that_cannot_work_are_refused_clearly() {
        let none = StoreOptions::default();
        for (location, expected) in [
            ("http://alice:s3cret@host/x/", "must not hold a password"),
            ("http://alice@host/x/", "must not hold a user name"),
            (
                "https://acct.blob.core.windows.net/lake/x/",
                "az://<container>",
            ),
            (
                "https://s3.us-east-1.amazonaws.com/bucket/x/",
                "s3://<bucket>",
            ),
        ] {
            let Err(error) = build_store(&url(location), &none) else {
                panic!("{location} must be refused");
            };
            let error = error.to_string();
            assert!(error.contains(expected), "{location}: {error}");
            assert!(!error.contains("s3cret"), "{error}");
        }
    }

    #[test]
    fn a_virtual_hosted_s3_address_names_its_bucket() {
        let store = build_store(
            &url("https://lake.s3.eu-west-1.amazonaws.com"),
            &StoreOptions::default(),
        );
        assert!(store.is_ok(), "{:?}", store.err());
    }

    #[test]
    fn configured_options_build_a_store_and_travel() {
        let registry = StoreRegistry::new();
        let location = url("s3://bucket/table/");
        assert!(registry.options_for(&location).is_none());
        let options = StoreOptions::from_pairs([
            ("aws.region".to_owned(), "us-east-1".to_owned()),
            ("aws.endpoint".to_owned(), "http://127.0.0.1:1".to_owned()),
            ("aws.allow_http".to_owned(), "true".to_owned()),
        ]);
        registry
            .configure(&location, &options)
            .expect("store builds");
        assert_eq!(registry.options_for(&location), Some(options.clone()));
        registry.get_store(&location).expect("store is registered");

        // A failed statement's options are undone.
        let other = StoreOptions::from_pairs([("aws.region".to_owned(), "eu-west-1".to_owned())]);
        let replaced = registry
            .configure(&location, &other)
            .expect("store builds")
            .expect("the first options were replaced");
        assert_eq!(registry.options_for(&location), Some(other));
        registry.restore(replaced);
        assert_eq!(registry.options_for(&location), Some(options));
    }

    #[test]
    fn a_pinned_registry_keeps_the_options_of_its_job() {
        let shared = StoreRegistry::new();
        let location = url("s3://bucket/table/");
        let job_options = StoreOptions::from_pairs([
            ("aws.region".to_owned(), "us-east-1".to_owned()),
            ("aws.access_key_id".to_owned(), "JOBKEY".to_owned()),
            ("aws.secret_access_key".to_owned(), "job-secret".to_owned()),
        ]);
        let replaced = shared
            .configure(&location, &job_options)
            .expect("store builds")
            .expect("nothing was configured");
        let config = StoreConfig {
            url: "s3://bucket".to_owned(),
            options: job_options
                .iter()
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
        };
        let pinned = shared.pinned(&[config]).expect("pinned");
        let job_store = pinned.get_store(&location).expect("pinned store");
        assert!(
            Arc::ptr_eq(&job_store, &shared.get_store(&location).expect("shared")),
            "a store of the same options is shared, not built again"
        );

        // The job's options are put back, then another statement sets others:
        // the pinned registry still has the job's store and options.
        shared.restore(replaced);
        let other = StoreOptions::from_pairs([("aws.region".to_owned(), "eu-west-1".to_owned())]);
        shared.configure(&location, &other).expect("store builds");
        assert_eq!(pinned.options_for(&location), Some(job_options.clone()));
        assert!(Arc::ptr_eq(
            &job_store,
            &pinned.get_store(&location).expect("pinned store")
        ));
        assert_eq!(shared.options_for(&location), Some(other.clone()));

        // Remembered, the pinned stores become the shared registry's latest.
        shared.remember(&pinned);
        assert_eq!(shared.options_for(&location), Some(job_options));
    }

    #[test]
    fn memory_stores_are_shared_within_the_process() {
        let first = StoreRegistry::new()
            .get_store(&url("memory://shared-test/"))
            .expect("memory store");
        let second = StoreRegistry::new()
            .get_store(&url("memory://shared-test/"))
            .expect("memory store");
        assert!(Arc::ptr_eq(&first, &second));
    }

    #[test]
    fn a_service_account_key_that_cannot_be_read_is_not_echoed() {
        let body = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7";
        let key = serde_json::json!({
            "type": "service_account",
            "client_email": "quiver@example.invalid",
            "private_key_id": "1",
            "private_key": format!("-----BEGIN PRIVATE KEY-----{body}"),
        });
        let options =
            StoreOptions::from_pairs([("gcp.service_account_key".to_owned(), key.to_string())]);
        let Err(error) = build_store(&url("gs://bucket/t/"), &options) else {
            panic!("a key without its end marker cannot be read");
        };
        let shown = error.to_string();
        let as_bytes = body
            .bytes()
            .take(4)
            .map(|b| b.to_string())
            .collect::<Vec<_>>();
        assert!(
            !shown.contains(body) && !shown.contains(&as_bytes.join(", ")),
            "{shown}"
        );
        assert!(shown.contains("gs://bucket"), "{shown}");
    }

    #[test]
    fn byte_lists_are_left_out_of_builder_errors() {
        assert_eq!(
            without_byte_dumps("bad pem: [80, 82, 73, 86, 65] at [1, 2] and [a, b, c, d]"),
            "bad pem: [bytes not shown] at [1, 2] and [a, b, c, d]"
        );
        assert_eq!(without_byte_dumps("unclosed [80, 82"), "unclosed [80, 82");
    }

    #[test]
    fn unknown_schemes_get_a_clear_error() {
        let error = StoreRegistry::new()
            .get_store(&url("ftp://host/x"))
            .expect_err("ftp is not a store");
        assert!(error.to_string().contains("ftp://host/x"), "{error}");
    }
}
