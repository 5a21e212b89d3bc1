//! The executor's control stream: one long-lived bidirectional gRPC stream to
//! the scheduler. Up it go register, heartbeats and task statuses; down it come
//! task launches, cancellations and requests to remove a job's shuffle data.
//!
//! When the stream breaks, the running tasks are aborted (the scheduler has
//! already rescheduled them) and the executor dials again with backoff.
//!
//! Each session holds a [`Lease`] that every heartbeat the scheduler
//! acknowledges extends. When it runs out (the scheduler is unreachable, or
//! this process was paused), the session ends as lost, and its tasks stop,
//! before the scheduler's own timeout declares this executor lost.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use quiver_core::lease::{Lease, LeaseTime};
use quiver_proto::scheduler_service_client::SchedulerServiceClient;
use quiver_proto::{
    Draining, ExecutorAddress, ExecutorMessage, Heartbeat, PROTOCOL_VERSION, RegisterExecutor,
    SchedulerMessage, executor_message, scheduler_message,
};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Code;
use tonic::Streaming;
use tonic::transport::Endpoint;
use tracing::{info, warn};

use crate::commit_gate::CommitRequests;
use crate::config::ExecutorConfig;
use crate::task::TaskRunner;
use crate::{Error, Result};

const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The lease under a scheduler that grants none (and so never times out an
/// executor that stays connected): only the session's end revokes it.
const NO_LEASE_LIMIT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

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

/// Largest message on the control stream, either way: the scheduler's
/// default `--max-message-bytes`.
const MAX_CONTROL_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

async fn serve_session(
    endpoint: &Endpoint,
    address: &ExecutorAddress,
    slots: u32,
    runner: &Arc<TaskRunner>,
    draining: watch::Receiver<bool>,
) -> SessionEnd {
    let channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(e) => return SessionEnd::Lost(format!("cannot connect: {e}")),
    };
    // tonic's default refuses messages over 4 MiB: a task whose plan holds a
    // large literal, or a commit given many write tasks' file lists, would
    // break the stream.
    let mut client = SchedulerServiceClient::new(channel)
        .max_decoding_message_size(MAX_CONTROL_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_CONTROL_MESSAGE_BYTES);
    let (outbound, outbound_rx) = tokio::sync::mpsc::unbounded_channel();
    let registered_at = LeaseTime::now();
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
    let (heartbeat_interval, lease_length) = match inbound.message().await {
        Ok(Some(SchedulerMessage {
            kind: Some(scheduler_message::Kind::Registered(registered)),
        })) => (
            Duration::from_millis(registered.heartbeat_interval_millis.max(50)),
            (registered.lease_millis > 0).then(|| Duration::from_millis(registered.lease_millis)),
        ),
        Ok(_) => return SessionEnd::Lost("scheduler did not acknowledge registration".into()),
        Err(status) => return end_from_status(status),
    };
    info!(executor_id = %address.executor_id, lease_millis = lease_length.map(|l| l.as_millis()),
        "registered with scheduler");
    let lease = Lease::until(registered_at + lease_length.unwrap_or(NO_LEASE_LIMIT));
    let commits = CommitRequests::new(outbound.clone());
    let mut session = Session {
        address,
        runner,
        outbound,
        lease: Arc::clone(&lease),
        commits,
        lease_length,
        unacknowledged: VecDeque::new(),
        next_sequence: 0,
    };
    let end = session
        .serve(&mut inbound, heartbeat_interval, draining)
        .await;
    // The session's tasks must not act once it is over, even before they
    // notice that they were cancelled.
    lease.revoke();
    session.commits.close();
    end
}

/// One registered control session.
struct Session<'a> {
    address: &'a ExecutorAddress,
    runner: &'a Arc<TaskRunner>,
    outbound: UnboundedSender<ExecutorMessage>,
    /// Held by every task launched in this session.
    lease: Arc<Lease>,
    /// Its tasks' commits waiting for the scheduler's permission.
    commits: Arc<CommitRequests>,
    /// How far past its send time an acknowledged heartbeat extends the
    /// lease; none when the scheduler grants no lease.
    lease_length: Option<Duration>,
    /// Heartbeats sent and not yet acknowledged: sequence and send time.
    unacknowledged: VecDeque<(u64, LeaseTime)>,
    next_sequence: u64,
}

impl Session<'_> {
    async fn serve(
        &mut self,
        inbound: &mut Streaming<SchedulerMessage>,
        heartbeat_interval: Duration,
        mut draining: watch::Receiver<bool>,
    ) -> SessionEnd {
        let mut ticker = tokio::time::interval(heartbeat_interval);
        let mut announced = false;
        loop {
            // Revoked only once the session is over: then it ends at once.
            let lease_left = self.lease.remaining();
            tokio::select! {
                // Checked first: a process resumed after a pause must stop
                // its tasks before it does anything else on the scheduler's behalf.
                biased;
                () = tokio::time::sleep(lease_left) => {
                    if let Some(end) = self.lease_ran_out() {
                        return end;
                    }
                }
                // Told once per session, so that a scheduler that comes back learns it too.
                Ok(_) = draining.wait_for(|draining| *draining), if !announced => {
                    announced = true;
                    send(&self.outbound, executor_message::Kind::Draining(Draining {}));
                }
                _ = ticker.tick() => self.heartbeat(),
                message = inbound.message() => match message {
                    Ok(Some(SchedulerMessage {
                        kind: Some(scheduler_message::Kind::Drained(_)),
                    })) => return SessionEnd::Drained,
                    Ok(Some(SchedulerMessage { kind: Some(kind) })) => self.handle(kind),
                    Ok(Some(SchedulerMessage { kind: None })) => {}
                    Ok(None) => {
                        return self.lost_or("scheduler closed the stream".into());
                    }
                    Err(status) => match end_from_status(status) {
                        SessionEnd::Lost(reason) => return self.lost_or(reason),
                        end => return end,
                    },
                }
            }
        }
    }

    /// The session's end if its lease has run out.
    fn lease_ran_out(&self) -> Option<SessionEnd> {
        let expired = self.lease.check().err()?;
        Some(SessionEnd::Lost(format!(
            "no heartbeat was acknowledged in time: {expired}"
        )))
    }

    /// The session's end when its stream broke for `reason`. A lease that
    /// ran out is the cause to report: a process resumed after a pause may
    /// see the stream that the scheduler closed meanwhile before its timer.
    fn lost_or(&self, reason: String) -> SessionEnd {
        self.lease_ran_out().unwrap_or(SessionEnd::Lost(reason))
    }

    fn heartbeat(&mut self) {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        if self.lease_length.is_some() {
            self.unacknowledged.push_back((sequence, LeaseTime::now()));
        }
        send(
            &self.outbound,
            executor_message::Kind::Heartbeat(Heartbeat {
                running_tasks: self.runner.running_tasks() as u32,
                sequence,
            }),
        );
    }

    /// Heartbeat `sequence` was heard: the lease now runs from its send time.
    fn acknowledged(&mut self, sequence: u64) {
        while let Some(&(sent, sent_at)) = self.unacknowledged.front() {
            if sent > sequence {
                break;
            }
            self.unacknowledged.pop_front();
            if sent == sequence
                && let Some(length) = self.lease_length
            {
                self.lease.extend_to(sent_at + length);
            }
        }
    }

    fn handle(&mut self, message: scheduler_message::Kind) {
        match message {
            scheduler_message::Kind::LaunchTask(launch) => {
                let outbound = self.outbound.clone();
                self.runner.launch(
                    launch,
                    self.address.clone(),
                    Arc::clone(&self.lease),
                    Arc::clone(&self.commits),
                    move |status| {
                        send(&outbound, executor_message::Kind::TaskStatus(status));
                    },
                );
            }
            scheduler_message::Kind::CancelTasks(cancel) => {
                let cancelled = self.runner.cancel_job(&cancel.job_id);
                info!(job_id = %cancel.job_id, cancelled, "cancelled tasks");
            }
            scheduler_message::Kind::RemoveJobData(remove) => {
                self.runner.remove_job(&remove.job_id);
            }
            scheduler_message::Kind::HeartbeatAck(ack) => self.acknowledged(ack.sequence),
            scheduler_message::Kind::CommitAnswer(answer) => self.commits.answer(answer),
            scheduler_message::Kind::Registered(_) | scheduler_message::Kind::Drained(_) => {}
        }
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
