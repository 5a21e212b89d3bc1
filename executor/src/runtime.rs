//! The execution runtime shared by every task of an executor: one fair,
//! spill-aware memory pool, one spill directory and one object store registry.

use std::sync::Arc;

use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnv;
use quiver_core::storage::{StoreRegistry, runtime_builder};

use crate::config::ExecutorConfig;
use crate::{Error, Result};

pub fn build_runtime(
    config: &ExecutorConfig,
    stores: Arc<StoreRegistry>,
) -> Result<Arc<RuntimeEnv>> {
    let spill_dir = config.spill_dir();
    std::fs::create_dir_all(&spill_dir).map_err(|source| Error::WorkDir {
        path: spill_dir.display().to_string(),
        source,
    })?;
    runtime_builder(stores)
        .with_memory_pool(Arc::new(FairSpillPool::new(config.memory_limit)))
        .with_temp_file_path(spill_dir)
        .build_arc()
        .map_err(Error::Runtime)
}
