//! The Quiver executor: runs plan fragments for the scheduler, and stores and
//! serves their shuffle output.
//!
//! - [`config`]: command-line and environment settings.
//! - [`control`]: the long-lived control stream to the scheduler: register,
//!   heartbeat, receive tasks and report their status.
//! - [`task`]: runs one task: decodes its plan, binds its shuffle readers to
//!   their map outputs, and writes its output through the shuffle writer.
//! - [`flight`]: the Arrow Flight data plane that serves shuffle partitions.
//! - [`runtime`]: the bounded memory pool and spill directory shared by all tasks.
//!
//! [`run`] starts an executor: it serves Flight on the given listener and keeps
//! its control stream to the scheduler until `shutdown` completes.

pub mod config;
pub mod control;
pub mod flight;
pub mod runtime;
pub mod task;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::info;

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

/// Runs an executor until `shutdown` completes. `flight_listener` is the bound
/// socket of the Flight data plane; its port is advertised to the scheduler.
pub async fn run(
    config: ExecutorConfig,
    flight_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let flight_port = flight_listener
        .local_addr()
        .map_err(Error::ListenerAddress)?
        .port();
    let executor = Arc::new(task::TaskRunner::new(&config)?);
    info!(
        executor_id = %config.executor_id,
        flight_port,
        slots = config.slots(),
        work_dir = %config.work_dir.display(),
        "executor starting"
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let flight = tokio::spawn(flight::serve(
        flight_listener,
        config.work_dir.clone(),
        wait_for_stop(stop_rx.clone()),
    ));
    let control = control::run(config, flight_port, executor, wait_for_stop(stop_rx));
    tokio::pin!(control);
    let outcome = tokio::select! {
        outcome = &mut control => outcome,
        () = shutdown => Ok(()),
    };
    let _ = stop_tx.send(true);
    let flight_outcome = flight.await.map_err(|e| Error::Refused(e.to_string()));
    outcome?;
    flight_outcome?
}

async fn wait_for_stop(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}
