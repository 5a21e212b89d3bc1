//! The execution runtime shared by every task of an executor: one fair,
//! spill-aware memory pool and one spill directory.

use std::sync::Arc;

use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};

use crate::config::ExecutorConfig;
use crate::{Error, Result};

pub fn build_runtime(config: &ExecutorConfig) -> Result<Arc<RuntimeEnv>> {
    let spill_dir = config.spill_dir();
    std::fs::create_dir_all(&spill_dir).map_err(|source| Error::WorkDir {
        path: spill_dir.display().to_string(),
        source,
    })?;
    RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(FairSpillPool::new(config.memory_limit)))
        .with_temp_file_path(spill_dir)
        .build_arc()
        .map_err(Error::Runtime)
}
