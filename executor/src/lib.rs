//! The Quiver executor: runs plan fragments for the scheduler, and stores and
//! serves their shuffle output.
//!
//! - [`commit_gate`]: asks the scheduler whether a commit may change its table.
//! - [`config`]: command-line and environment settings.
//! - [`control`]: the long-lived control stream to the scheduler: register,
//!   heartbeat, receive tasks and report their status.
//! - [`task`]: runs one task: decodes its plan, binds its shuffle readers to
//!   their map outputs, and writes its output through the shuffle writer.
//! - [`flight`]: the Arrow Flight data plane that serves shuffle partitions.
//! - [`runtime`]: the bounded memory pool and spill directory shared by all tasks.
//! - [`scan_errors`]: names the files a task read when one cannot be decoded.
//! - [`sweeper`]: removes shuffle data that nobody will ask for again.
//! - [`threads`]: the dedicated thread pool that runs tasks, so that a busy
//!   task never starves the control stream or the data plane.
//!
//! [`run`] starts an executor: it serves Flight on the given listener and keeps
//! its control stream to the scheduler until `shutdown` completes.

pub mod commit_gate;
pub mod config;
pub mod control;
pub mod flight;
pub mod runtime;
pub mod scan_errors;
pub mod sweeper;
pub mod task;
pub mod threads;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::{info, warn};

/// How long a stopping executor lets its Flight streams in flight finish.
const FLIGHT_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

pub use config::ExecutorConfig;

/// Errors that stop an executor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot prepare work dir {path}: {source}")]
    WorkDir {
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot build the execution runtime: {0}")]
    Runtime(#[source] datafusion::error::DataFusionError),

    #[error("cannot start the task threads: {source}")]
    TaskThreads {
        #[source]
        source: std::io::Error,
    },

    #[error("cannot read the Flight listener address: {0}")]
    ListenerAddress(#[source] std::io::Error),

    #[error("the Flight server failed: {0}")]
    Flight(#[source] tonic::transport::Error),

    #[error("invalid scheduler url {url:?}: {source}")]
    SchedulerUrl {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },

    #[error("the scheduler refused this executor: {0}")]
    Refused(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs an executor until `shutdown` completes, then drains it (see
/// [`ExecutorConfig::drain_grace_secs`]). `flight_listener` is the bound socket
/// of the Flight data plane; its port is advertised to the scheduler.
pub async fn run(
    config: ExecutorConfig,
    flight_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let flight_port = flight_listener
        .local_addr()
        .map_err(Error::ListenerAddress)?
        .port();
    sweeper::remove_own_dirs(
        &[config.shuffle_dir(), config.spill_dir()],
        "files of a previous run",
    );
    let executor = Arc::new(task::TaskRunner::new(&config)?);
    let sweeper = tokio::spawn(sweeper::run(
        config.shuffle_root(),
        config.shuffle_ttl(),
        Arc::clone(&executor),
    ));
    info!(
        executor_id = %config.executor_id,
        flight_port,
        slots = config.slots(),
        work_dir = %config.work_dir.display(),
        "executor starting"
    );
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut flight = tokio::spawn(flight::serve(
        flight_listener,
        Arc::clone(executor.outputs()),
        async move {
            let _ = stop_rx.wait_for(|stopped| *stopped).await;
        },
    ));
    let grace = config.drain_grace();
    let shuffle_dir = config.shuffle_dir();
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let control = control::run(config, flight_port, Arc::clone(&executor), drain_rx);
    tokio::pin!(control);
    let outcome = tokio::select! {
        outcome = &mut control => outcome,
        () = shutdown => drain(&mut control, &drain_tx, grace, &executor).await,
    };
    // Whatever is still running has been given up by now.
    executor.cancel_all();
    sweeper.abort();
    let _ = stop_tx.send(true);
    // Streams in flight end first, but a stalled reader does not hold the
    // executor: a durable output's reader reads on from its copy.
    let flight_outcome = match tokio::time::timeout(FLIGHT_STOP_GRACE, &mut flight).await {
        Ok(joined) => joined.map_err(|e| Error::Refused(e.to_string())),
        Err(_) => {
            warn!(
                grace_secs = FLIGHT_STOP_GRACE.as_secs(),
                "Flight streams still open after the grace period; stopping anyway"
            );
            flight.abort();
            Ok(Ok(()))
        }
    };
    if outcome.is_ok() {
        sweeper::remove_own_dirs(&[shuffle_dir], "shuffle data no one needs after the drain");
    }
    info!("executor stopped");
    outcome?;
    flight_outcome?
}

/// Drains the executor: the control stream tells the scheduler, which stops
/// sending tasks and answers once no running job needs this executor. Gives up
/// after `grace`.
async fn drain(
    control: &mut (impl Future<Output = Result<()>> + Unpin),
    drain_tx: &tokio::sync::watch::Sender<bool>,
    grace: std::time::Duration,
    executor: &task::TaskRunner,
) -> Result<()> {
    if grace.is_zero() {
        return Ok(());
    }
    info!(
        running_tasks = executor.running_tasks(),
        grace_secs = grace.as_secs(),
        "draining"
    );
    let _ = drain_tx.send(true);
    match tokio::time::timeout(grace, control).await {
        Ok(outcome) => outcome,
        Err(_) => {
            warn!(
                running_tasks = executor.running_tasks(),
                "drain grace period over; stopping anyway"
            );
            Ok(())
        }
    }
}
