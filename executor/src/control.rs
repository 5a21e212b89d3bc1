//! The executor's control stream: one long-lived bidirectional gRPC stream to
//! the scheduler. Up it go register, heartbeats and task statuses; down it come
//! task launches, cancellations and requests to remove a job's shuffle data.
//!
//! When the stream breaks, the running tasks are aborted (the scheduler has
//! already rescheduled them) and the executor dials again with backoff.

use std::sync::Arc;
use std::time::Duration;

use quiver_proto::scheduler_service_client::SchedulerServiceClient;
use quiver_proto::{
    Draining, ExecutorAddress, ExecutorMessage, Heartbeat, PROTOCOL_VERSION, RegisterExecutor,
    SchedulerMessage, executor_message, scheduler_message,
};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Code;
use tonic::transport::Endpoint;
use tracing::{info, warn};

use crate::config::ExecutorConfig;
use crate::task::TaskRunner;
use crate::{Error, Result};

const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why a control session ended.
enum SessionEnd {
    /// The scheduler released this draining executor.
    Drained,
    /// The scheduler will never accept this executor (e.g. a protocol mismatch).
    Refused(String),
    /// The connection failed or broke; dial again.
    Lost(String),
}

/// Keeps the executor connected to the scheduler. Once `draining` turns true,
/// it tells the scheduler and returns when the scheduler releases it, or when
/// the connection is lost (no scheduler is left to need this executor).
pub async fn run(
    config: ExecutorConfig,
    flight_port: u16,
    runner: Arc<TaskRunner>,
    draining: watch::Receiver<bool>,
) -> Result<()> {
    let endpoint = Endpoint::from_shared(config.scheduler_url.clone()).map_err(|source| {
        Error::SchedulerUrl {
            url: config.scheduler_url.clone(),
            source,
        }
    })?;
    let endpoint = quiver_core::net::tune_endpoint(endpoint);
    let address = ExecutorAddress {
        executor_id: config.executor_id.clone(),
        host: config.advertised_host().to_owned(),
        flight_port: u32::from(flight_port),
    };
    let slots = config.slots() as u32;
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let started = tokio::time::Instant::now();
        let end = serve_session(&endpoint, &address, slots, &runner, draining.clone()).await;
        match end {
            SessionEnd::Drained => {
                info!("released by the scheduler");
                return Ok(());
            }
            SessionEnd::Refused(message) => {
                runner.cancel_all();
                return Err(Error::Refused(message));
            }
            SessionEnd::Lost(reason) if *draining.borrow() => {
                warn!(%reason, "control stream lost while draining; stopping");
                return Ok(());
            }
            SessionEnd::Lost(reason) => {
                // The scheduler has rescheduled these tasks elsewhere.
                runner.cancel_all();
                warn!(scheduler = %config.scheduler_url, %reason, "control stream lost, reconnecting");
            }
        }
        // A session that held for a while was healthy: start over with short waits.
        if started.elapsed() > MAX_BACKOFF * 2 {
            backoff = INITIAL_BACKOFF;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn serve_session(
    endpoint: &Endpoint,
    address: &ExecutorAddress,
    slots: u32,
    runner: &Arc<TaskRunner>,
    mut draining: watch::Receiver<bool>,
) -> SessionEnd {
    let channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(e) => return SessionEnd::Lost(format!("cannot connect: {e}")),
    };
    let mut client = SchedulerServiceClient::new(channel);
    let (outbound, outbound_rx) = tokio::sync::mpsc::unbounded_channel();
    send(
        &outbound,
        executor_message::Kind::Register(RegisterExecutor {
            protocol_version: PROTOCOL_VERSION,
            address: Some(address.clone()),
            slots,
        }),
    );
    let mut inbound = match client
        .executor_channel(UnboundedReceiverStream::new(outbound_rx))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return end_from_status(status),
    };
    let heartbeat_interval = match inbound.message().await {
        Ok(Some(SchedulerMessage {
            kind: Some(scheduler_message::Kind::Registered(registered)),
        })) => Duration::from_millis(registered.heartbeat_interval_millis.max(50)),
        Ok(_) => return SessionEnd::Lost("scheduler did not acknowledge registration".into()),
        Err(status) => return end_from_status(status),
    };
    info!(executor_id = %address.executor_id, "registered with scheduler");
    let mut ticker = tokio::time::interval(heartbeat_interval);
    let mut announced = false;
    loop {
        tokio::select! {
            // Told once per session, so that a scheduler that comes back learns it too.
            Ok(_) = draining.wait_for(|draining| *draining), if !announced => {
                announced = true;
                send(&outbound, executor_message::Kind::Draining(Draining {}));
            }
            _ = ticker.tick() => {
                let running_tasks = runner.running_tasks() as u32;
                send(&outbound, executor_message::Kind::Heartbeat(Heartbeat { running_tasks }));
            }
            message = inbound.message() => match message {
                Ok(Some(SchedulerMessage {
                    kind: Some(scheduler_message::Kind::Drained(_)),
                })) => return SessionEnd::Drained,
                Ok(Some(SchedulerMessage { kind: Some(kind) })) => {
                    handle(kind, address, runner, &outbound);
                }
                Ok(Some(SchedulerMessage { kind: None })) => {}
                Ok(None) => return SessionEnd::Lost("scheduler closed the stream".into()),
                Err(status) => return end_from_status(status),
            }
        }
    }
}

fn handle(
    message: scheduler_message::Kind,
    address: &ExecutorAddress,
    runner: &Arc<TaskRunner>,
    outbound: &UnboundedSender<ExecutorMessage>,
) {
    match message {
        scheduler_message::Kind::LaunchTask(launch) => {
            let outbound = outbound.clone();
            runner.launch(launch, address.clone(), move |status| {
                send(&outbound, executor_message::Kind::TaskStatus(status));
            });
        }
        scheduler_message::Kind::CancelTasks(cancel) => {
            let cancelled = runner.cancel_job(&cancel.job_id);
            info!(job_id = %cancel.job_id, cancelled, "cancelled tasks");
        }
        scheduler_message::Kind::RemoveJobData(remove) => {
            runner.remove_job(&remove.job_id);
        }
        scheduler_message::Kind::Registered(_) | scheduler_message::Kind::Drained(_) => {}
    }
}

fn send(outbound: &UnboundedSender<ExecutorMessage>, kind: executor_message::Kind) {
    // A closed channel means the session is over; the loop notices on its own.
    let _ = outbound.send(ExecutorMessage { kind: Some(kind) });
}

fn end_from_status(status: tonic::Status) -> SessionEnd {
    match status.code() {
        Code::FailedPrecondition | Code::InvalidArgument => {
            SessionEnd::Refused(status.message().to_owned())
        }
        _ => SessionEnd::Lost(status.to_string()),
    }
}
