//! What the scheduler serves while it starts.
//!
//! A starting scheduler recreates its catalog and settles the writes that
//! its restart interrupted, which can take minutes when a store does not
//! answer. Meanwhile it already serves what needs neither: executors
//! register, and clients follow, list and cancel jobs (the interrupted
//! writes show as running until they are settled). Every other call, which
//! plans statements or reads the catalog, waits for the start to finish, up
//! to [`START_WAIT`], and is then refused as unavailable, saying what the
//! scheduler is doing: a call that hangs for minutes helps nobody.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{BoxFuture, Context, Poll, Service};
use tonic::server::NamedService;
use tracing::{info, warn};

use crate::catalog::RECREATE_RETRY;
use crate::service::SchedulerGrpc;
use crate::state::event_loop::InterruptedJob;

/// How long a call waits for the scheduler to finish starting.
pub const START_WAIT: Duration = Duration::from_secs(60);

/// The calls of `quiver.SchedulerService` that need neither the catalog nor
/// the settled writes.
const SERVED_WHILE_STARTING: [&str; 7] = [
    "ExecutorChannel",
    "GetJobStatus",
    "WatchJob",
    "CancelJob",
    "ReleaseJob",
    "ListJobs",
    "ListExecutors",
];

/// The first phase of a start.
const RECREATING_CATALOG: &str = "recreating its catalog";

/// Recreates the catalog from the state store, then settles the writes of
/// the jobs that the last stop interrupted and records how they ended;
/// `gate` tells waiting calls which of the two it is doing. An error is
/// one of the state store, which the scheduler cannot run without.
pub async fn recover(
    service: &SchedulerGrpc,
    interrupted: &[InterruptedJob],
    executor_timeout: Duration,
    gate: &StartGate,
) -> crate::Result<()> {
    // The previous scheduler's executors last heard from it before this
    // start began; their leases run out meanwhile.
    let leases_ended = tokio::time::Instant::now() + executor_timeout;
    let silent = SilentStores::default();
    for (name, error) in service.planner().replay_catalog(&silent).await? {
        warn!(table = %name, %error, retry_secs = RECREATE_RETRY.as_secs(),
            "cannot recreate a stored catalog object; it stays stored, and is tried again");
    }
    let planner = service.planner().clone();
    tokio::spawn(async move {
        while !planner.catalog_is_whole() {
            tokio::time::sleep(RECREATE_RETRY).await;
            let failed = planner.recreate_the_rest().await;
            if failed.is_empty() {
                info!("every stored catalog object is recreated");
            }
        }
    });
    gate.doing("settling the writes that its restart interrupted");
    let settled = service
        .clean_up_interrupted_jobs(interrupted, leases_ended, &silent)
        .await;
    let left = service
        .register_pending_tables(interrupted, &settled.settled, &silent)
        .await;
    let mut unsettled = service.record_interrupted_writes(interrupted, &settled, &left.jobs);
    unsettled.extend(left.to_settle);
    service.handle().settling.end_the_rest();
    service.settle_later(unsettled, left.to_register);
    Ok(())
}

/// The stores that did not answer during one start, by
/// [`quiver_core::storage::StoreRegistry::identity`], each with what found
/// it silent. The rest of the start does not try them again: a store that
/// is down holds the start up once, not once per table, write and phase.
/// What is not tried is left as if it had failed, to be tried again while
/// the scheduler runs.
#[derive(Debug, Default)]
pub struct SilentStores(Mutex<HashMap<u64, String>>);

impl SilentStores {
    /// Why what lies on `store` is not tried: it did not answer earlier.
    pub fn not_tried(&self, store: Option<u64>) -> Option<String> {
        let silent = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        silent.get(&store?).cloned()
    }

    /// Records that `store` did not answer `when` ("when 'x' was
    /// recreated"); the first such record is the one told.
    pub fn did_not_answer(&self, store: Option<u64>, when: impl FnOnce() -> String) {
        if let Some(store) = store {
            let mut silent = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            silent
                .entry(store)
                .or_insert_with(|| format!("not tried: its store did not answer {}", when()));
        }
    }
}

/// Where the start is: what it is doing, or done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Starting, doing what the text says ("recreating its catalog").
    Doing(&'static str),
    Started,
    /// Told to stop: calls still waiting will not be served.
    Stopping,
}

/// Tells the calls waiting on the start where it is.
#[derive(Debug, Clone)]
pub struct StartGate {
    phase: watch::Sender<Phase>,
}

/// A start begins by recreating the catalog.
impl Default for StartGate {
    fn default() -> Self {
        Self {
            phase: watch::Sender::new(Phase::Doing(RECREATING_CATALOG)),
        }
    }
}

impl StartGate {
    pub fn doing(&self, what: &'static str) {
        self.phase.send_replace(Phase::Doing(what));
    }

    pub fn started(&self) {
        self.end_start(Phase::Started);
    }

    /// Refuses the calls that wait for the start, and those that come
    /// later: a stopping scheduler takes no new work.
    pub fn stopping(&self) {
        self.end_start(Phase::Stopping);
    }

    /// Ends the start with `ended`, unless it has ended already.
    fn end_start(&self, ended: Phase) {
        self.phase.send_if_modified(|phase| {
            let starting = matches!(phase, Phase::Doing(_));
            if starting {
                *phase = ended;
            }
            starting
        });
    }

    /// Serves `inner`'s calls once the start is done, but for those that
    /// `served_at_once` names by their method.
    pub fn guard<S>(&self, inner: S, served_at_once: fn(&str) -> bool) -> UntilStarted<S> {
        UntilStarted {
            inner,
            phase: self.phase.subscribe(),
            served_at_once,
        }
    }

    /// Waits up to `wait` for the start to finish; the error says what it
    /// is still doing.
    async fn wait_until_started(
        mut phase: watch::Receiver<Phase>,
        wait: Duration,
    ) -> Result<(), tonic::Status> {
        let stopping = || {
            tonic::Status::unavailable(
                "the scheduler is stopping, and did not run this call: send it to the \
                 scheduler that replaces it",
            )
        };
        let ended = tokio::time::timeout(
            wait,
            phase.wait_for(|phase| !matches!(phase, Phase::Doing(_))),
        )
        .await
        .map(|ended| ended.map(|phase| phase.clone()));
        match ended {
            Ok(Ok(Phase::Started)) => Ok(()),
            // The gate went away with the server.
            Ok(Ok(_) | Err(_)) => Err(stopping()),
            Err(_) => {
                let doing = match &*phase.borrow() {
                    Phase::Doing(what) => *what,
                    Phase::Started | Phase::Stopping => "starting",
                };
                Err(tonic::Status::unavailable(format!(
                    "the scheduler is starting: it is {doing}, and has not finished within \
                     {}s; job status, listing and cancelling already work: try again shortly",
                    wait.as_secs()
                )))
            }
        }
    }
}

/// Whether a `quiver.SchedulerService` method serves while starting.
pub fn scheduler_call_served_at_once(method: &str) -> bool {
    SERVED_WHILE_STARTING.contains(&method)
}

/// Whether an Arrow Flight method serves while starting: none do, as
/// every Flight SQL call plans a statement or reads the catalog.
pub fn flight_call_served_at_once(_method: &str) -> bool {
    false
}

/// A gRPC service whose calls wait for the scheduler's start (see [`StartGate::guard`]).
#[derive(Debug, Clone)]
pub struct UntilStarted<S> {
    inner: S,
    phase: watch::Receiver<Phase>,
    served_at_once: fn(&str) -> bool,
}

impl<S: NamedService> NamedService for UntilStarted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for UntilStarted<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let method = request.uri().path().rsplit('/').next().unwrap_or_default();
        let at_once = (self.served_at_once)(method) || *self.phase.borrow() == Phase::Started;
        // The clone that was made ready serves this call; a fresh one waits
        // for the next (tower's contract for services that move into futures).
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let phase = self.phase.clone();
        Box::pin(async move {
            if !at_once && let Err(status) = StartGate::wait_until_started(phase, START_WAIT).await
            {
                return Ok(status.into_http());
            }
            inner.call(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_waits_for_the_start_and_is_told_what_holds_it_up() {
        let gate = StartGate::default();
        let phase = gate.phase.subscribe();
        gate.doing("settling the writes its restart interrupted");
        let error = StartGate::wait_until_started(phase.clone(), Duration::from_millis(10))
            .await
            .expect_err("still starting");
        assert_eq!(error.code(), tonic::Code::Unavailable);
        assert!(
            error
                .message()
                .contains("it is settling the writes its restart interrupted"),
            "{error}"
        );
        let waiting = tokio::spawn(StartGate::wait_until_started(
            phase.clone(),
            Duration::from_secs(60),
        ));
        gate.started();
        waiting.await.expect("waiter").expect("started");
        gate.stopping();
        StartGate::wait_until_started(phase, Duration::from_secs(60))
            .await
            .expect("a started scheduler that stops serves what it has");
    }

    #[tokio::test]
    async fn a_scheduler_stopped_while_starting_refuses_the_waiting_calls() {
        let gate = StartGate::default();
        let waiting = tokio::spawn(StartGate::wait_until_started(
            gate.phase.subscribe(),
            Duration::from_secs(60),
        ));
        gate.stopping();
        let error = waiting.await.expect("waiter").expect_err("refused");
        assert_eq!(error.code(), tonic::Code::Unavailable);
        assert!(error.message().contains("did not run this call"), "{error}");
        gate.started();
        let error = StartGate::wait_until_started(gate.phase.subscribe(), Duration::from_secs(60))
            .await
            .expect_err("still refused");
        assert!(error.message().contains("stopping"), "{error}");
    }

    #[test]
    fn following_jobs_serves_while_starting_and_planning_does_not() {
        assert!(scheduler_call_served_at_once("GetJobStatus"));
        assert!(scheduler_call_served_at_once("ExecutorChannel"));
        assert!(!scheduler_call_served_at_once("SubmitJob"));
        assert!(!scheduler_call_served_at_once("GetTable"));
        assert!(!flight_call_served_at_once("GetFlightInfo"));
    }
}
