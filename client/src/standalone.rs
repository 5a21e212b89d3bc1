//! An embedded cluster: one scheduler and N executors in this process, talking
//! real gRPC and Arrow Flight over loopback. Used by the README's first command,
//! by `quiver --standalone` and by the integration tests.

use std::time::Duration;

use quiver_executor::ExecutorConfig;
use quiver_scheduler::SchedulerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::context::QuiverContext;
use crate::error::Result;

/// Shape of an embedded cluster.
#[derive(Debug, Clone)]
pub struct StandaloneOptions {
    pub executors: usize,
    pub slots_per_executor: usize,
    /// Memory pool of each executor, in bytes.
    pub memory_limit: usize,
    /// Shuffle partitions when a job does not set them.
    pub default_partitions: usize,
    /// Jobs running at once; later ones queue. 0 means no limit.
    pub max_running_jobs: usize,
}

impl Default for StandaloneOptions {
    fn default() -> Self {
        Self {
            executors: 2,
            slots_per_executor: 2,
            memory_limit: 2 * 1024 * 1024 * 1024,
            default_partitions: 4,
            max_running_jobs: 16,
        }
    }
}

/// A running embedded cluster; dropping it stops every component.
#[derive(Debug)]
pub struct StandaloneCluster {
    url: String,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    work_dir: tempfile::TempDir,
}

impl StandaloneCluster {
    pub async fn start(options: StandaloneOptions) -> std::io::Result<Self> {
        let work_dir = tempfile::Builder::new()
            .prefix("quiver-standalone-")
            .tempdir()?;
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();

        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("quiver://{}", listener.local_addr()?);
        let scheduler_config = SchedulerConfig {
            default_partitions: options.default_partitions,
            max_running_jobs: options.max_running_jobs,
            ..SchedulerConfig::local()
        };
        let shutdown = wait_for(stopped.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = quiver_scheduler::run(scheduler_config, listener, shutdown).await {
                tracing::error!(%e, "embedded scheduler failed");
            }
        }));

        for index in 0..options.executors {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let mut config = ExecutorConfig::local(
                url.replace("quiver://", "http://"),
                work_dir.path().join(format!("executor-{index}")),
            );
            config.slots = Some(options.slots_per_executor);
            // The executors share this machine's cores: more task threads
            // than cores would only make them take turns.
            let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
            config.task_threads = Some((cores / options.executors.max(1)).max(1));
            config.memory_limit = options.memory_limit;
            let shutdown = wait_for(stopped.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = quiver_executor::run(config, listener, shutdown).await {
                    tracing::error!(%e, "embedded executor failed");
                }
            }));
        }
        Ok(Self {
            url,
            stop,
            tasks,
            work_dir,
        })
    }

    /// `quiver://127.0.0.1:<port>` of the scheduler.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The folder holding each executor's work dir (`executor-<n>/`).
    pub fn work_dir(&self) -> &std::path::Path {
        self.work_dir.path()
    }

    /// Connects a client, once every executor has registered.
    pub async fn connect(&self, executors: usize) -> Result<QuiverContext> {
        let context = QuiverContext::connect(&self.url).await?;
        wait_for_executors(&context, executors).await?;
        Ok(context)
    }

    /// Stops every component and waits for them.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for StandaloneCluster {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn wait_for(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Waits until `executors` executors have registered and take tasks. Gives up
/// after 30 seconds.
async fn wait_for_executors(context: &QuiverContext, executors: usize) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let registered = context.executors().await;
        match registered {
            Ok(list) if list.iter().filter(|e| !e.draining).count() >= executors => {
                return Ok(());
            }
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(crate::Error::ExecutorsMissing {
                    expected: executors,
                });
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
