//! Object storage: the stores behind table and output locations.
//!
//! - [`aws_profile`]: the AWS CLI's shared config and credentials files.
//! - [`assume_role`], [`credential_process`]: S3 credentials of a role a
//!   profile assumes, and those a profile's command prints, kept until they
//!   expire ([`expiring_credentials`]).
//! - [`options`]: `aws.*`/`gcp.*`/`azure.*`/`http.*` options of a location,
//!   checked when a statement is planned and never shown in clear.
//! - [`registry`]: builds each location's store from the environment and its
//!   options, on first use; one registry per scheduler and per executor.
//! - [`metered`]: counts the bytes each task reads from stores.
//! - [`echoes`]: blanks what stores echo of credentials in their errors.
//! - [`http_credentials`]: basic authentication or a token for HTTP(S)
//!   locations.
//! - [`upload`]: file uploads whose ids are recorded, so that the unfinished
//!   uploads of a killed task can be aborted (writes and durable shuffle).

pub mod assume_role;
pub mod aws_profile;
pub mod credential_process;
pub mod echoes;
pub mod expiring_credentials;
pub mod forwarding;
pub mod http_credentials;
pub mod metered;
pub mod options;
pub mod registry;
pub mod upload;

pub use echoes::{holds_url_password, redact_store_echoes, redacted_error};
pub use options::{
    StoreOptions, is_store_option, redact_sql, redact_statement_error,
    register_store_option_namespaces,
};
pub use registry::{
    Store, StoreError, StoreRegistry, build_store, store_did_not_answer, store_key,
};

use std::sync::Arc;

use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

/// The contents of the object at `path`, or none if there is no such
/// object.
pub async fn get_if_exists(
    store: &Arc<dyn ObjectStore>,
    path: &Path,
) -> object_store::Result<Option<bytes::Bytes>> {
    match store.get(path).await {
        Ok(found) => found.bytes().await.map(Some),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes `paths`, many per request where the store can; a path that is
/// gone already is fine.
pub async fn delete_paths(
    store: &Arc<dyn ObjectStore>,
    paths: BoxStream<'static, object_store::Result<Path>>,
) -> object_store::Result<()> {
    store
        .delete_stream(paths)
        .filter(|deleted| {
            let gone = matches!(deleted, Err(object_store::Error::NotFound { .. }));
            futures::future::ready(!gone)
        })
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// Deletes everything below `prefix`. On a local file system (`local`) the
/// folder goes too: deleting objects there leaves their folders (and partial
/// files of killed writers, which are not listed) behind.
pub async fn delete_prefix(
    store: &Arc<dyn ObjectStore>,
    prefix: &Path,
    local: bool,
) -> datafusion::error::Result<()> {
    let listed = store
        .list(Some(prefix))
        .map_ok(|meta| meta.location)
        .boxed();
    delete_paths(store, listed).await?;
    if local {
        remove_local_folder(prefix).await?;
    }
    Ok(())
}

/// Removes the local folder behind `path` of a `file://` store, with
/// whatever is left in it. A missing folder is fine.
async fn remove_local_folder(path: &Path) -> std::io::Result<()> {
    let folder = std::path::Path::new("/").join(path.as_ref());
    match tokio::fs::remove_dir_all(&folder).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A DataFusion runtime that finds stores through `registry`.
///
/// File listings are never cached: a batch engine's tables change under it
/// (its own writes land from other processes), and DataFusion's listing cache
/// keeps entries forever by default, so a cached listing would miss them.
pub fn runtime_builder(registry: Arc<StoreRegistry>) -> RuntimeEnvBuilder {
    RuntimeEnvBuilder::new()
        .with_object_store_registry(registry)
        .with_cache_manager(CacheManagerConfig::default().with_list_files_cache_limit(0))
}
