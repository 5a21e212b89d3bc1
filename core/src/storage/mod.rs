//! Object storage: the stores behind table and output locations.
//!
//! - [`options`]: `aws.*`/`gcp.*`/`azure.*`/`http.*` options of a location,
//!   checked when a statement is planned and never shown in clear.
//! - [`registry`]: builds each location's store from the environment and its
//!   options, on first use; one registry per scheduler and per executor.
//! - [`metered`]: counts the bytes each task reads from stores.

pub mod metered;
pub mod options;
pub mod registry;

pub use options::{StoreOptions, redact_sql, register_store_option_namespaces};
pub use registry::{StoreError, StoreRegistry, build_store, store_key};

use std::sync::Arc;

use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;

/// Removes the local folder behind `path` of a `file://` store, with
/// whatever is left in it: deleting objects on a local file system leaves
/// their folders (and partial files of killed writers, which are not
/// listed) behind. A missing folder is fine.
pub async fn remove_local_folder(path: &object_store::path::Path) -> std::io::Result<()> {
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
