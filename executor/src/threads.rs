//! The dedicated thread pool that runs tasks.
//!
//! DataFusion operators can compute for seconds inside one poll (a nested-loop
//! join whose filter matches nothing, say). On a shared tokio runtime that
//! starves everything else on the worker: the control stream misses the
//! scheduler going away and heartbeats stop, and the Flight server stops
//! serving shuffle data to other executors. So tasks run on their own
//! runtime, and the process's main runtime keeps the control stream and the
//! data plane responsive whatever the tasks do.

use std::future::Future;

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::task::JoinHandle;

/// A multi-threaded tokio runtime for CPU-heavy task execution.
#[derive(Debug)]
pub struct TaskThreads {
    /// Always `Some` until dropped.
    runtime: Option<Runtime>,
    handle: Handle,
}

impl TaskThreads {
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("quiver-task")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        Ok(Self {
            runtime: Some(runtime),
            handle,
        })
    }

    /// Runs `future` on the task threads.
    pub fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future)
    }
}

impl Drop for TaskThreads {
    fn drop(&mut self) {
        // Dropping a runtime blocks until its tasks stop, which is not allowed
        // from async code; whatever still runs is abandoned instead.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
