//! The Quiver scheduler: accepts jobs, plans them into stages and runs their
//! tasks on executors.
//!
//! - [`service`]: the gRPC service, for executors' control streams and clients' calls.
//! - [`flight_sql`]: Arrow Flight SQL, on the same port, for ADBC, JDBC and BI tools.
//! - [`planner`]: SQL or a logical plan to a physical plan, against the shared catalog.
//! - [`stages`]: cuts a physical plan into a DAG of stages at its exchanges.
//! - [`analyze`]: the report of `EXPLAIN ANALYZE`: stage plans with their metrics.
//! - [`join_order`]: joins filtered dimensions first in trees of inner joins ([`join_tree`]).
//! - [`eager_aggregation`]: aggregates a join tree's many side before the joins.
//! - [`joins`]: re-plans joins that cannot run split across tasks.
//! - [`broadcast`]: broadcasts hash joins' build sides when that ships fewer bytes.
//! - [`build_stage`]: gives a join's `HAVING`-filtered build side a stage of its own.
//! - [`exchange_order`]: exchanges that keep no order, as shuffles keep none.
//! - [`adaptive`]: turns partitioned joins into broadcasts once a build side has run.
//! - [`join_swap`]: builds a join's hash table from the side that ran smaller.
//! - [`reduction`]: filters a scan by the keys of a small join side that has run.
//! - [`committed_scans`]: scans that read the files of committed writes only.
//! - [`series`]: `range()` and `generate_series()` scans that survive serialization.
//! - [`locations`]: the object stores a job uses, and the options its tasks need.
//! - [`state`]: the event loop that owns jobs, stages, tasks and executors.
//! - [`store`]: the embedded store (redb) of the catalog and the job history.
//! - [`catalog`]: which DDL statements are stored, and their replay on start.
//! - [`tables`]: the table factory of `CREATE EXTERNAL TABLE`.
//! - [`hive`]: hive-partitioned tables whose partition columns may hold nulls.
//! - [`managed`]: the warehouse folders of `CREATE TABLE AS` tables, deleted on `DROP`.
//! - [`config`]: command-line and environment settings.
//! - [`starting`]: recovery on start, and what is served meanwhile.
//! - [`storage_leftovers`]: cleans up what a job's clean-up left in object storage.
//! - [`reversed_windows`]: `lag` and `lead` evaluated in reverse, rewritten to survive encoding.
//! - [`unencodable`]: statements refused because executors would get their plans changed.
//!
//! [`run`] serves on a bound listener until `shutdown` completes, so tests bind
//! `127.0.0.1:0` and stop it cleanly.

pub mod adaptive;
pub mod analyze;
pub mod broadcast;
pub mod build_stage;
pub mod catalog;
pub mod committed_scans;
pub mod config;
pub mod eager_aggregation;
pub mod error;
pub mod exchange_order;
pub mod flight_sql;
pub mod hive;
pub mod join_order;
pub mod join_swap;
pub mod join_tree;
pub mod joins;
pub mod locations;
pub mod managed;
pub mod planner;
pub mod reduction;
pub mod reversed_windows;
pub mod series;
pub mod service;
pub mod stages;
pub mod starting;
pub mod state;
pub mod storage_leftovers;
pub mod store;
pub mod tables;
pub mod unencodable;

use std::future::Future;

use arrow_flight::flight_service_server::FlightServiceServer;
use quiver_proto::scheduler_service_server::SchedulerServiceServer;
use tokio::net::TcpListener;
use tracing::{info, warn};

pub use config::SchedulerConfig;
pub use error::{Error, Result};

/// Default largest gRPC message: plans of big queries can be large.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Serves the scheduler on `listener` until `shutdown` completes.
pub async fn run(
    config: SchedulerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let address = listener.local_addr().ok();
    if config.executor_timeout_ms < 3 * config.heartbeat_interval_ms {
        return Err(Error::HeartbeatTiming {
            timeout_ms: config.executor_timeout_ms,
            heartbeat_ms: config.heartbeat_interval_ms,
        });
    }
    let store = config.open_store()?;
    let planner =
        planner::Planner::new(config.default_partitions, store.clone(), config.warehouse())?;
    let loop_config = config.loop_config();
    let (handle, interrupted) =
        state::event_loop::spawn(loop_config.clone(), &store, planner.object_stores())?;
    let service = service::SchedulerGrpc::new(handle, planner);
    let flight_sql =
        flight_sql::FlightSqlEndpoint::new(service.clone()).map_err(Error::FlightSql)?;
    let gate = starting::StartGate::default();
    let start = {
        let (service, gate) = (service.clone(), gate.clone());
        async move {
            starting::recover(&service, &interrupted, loop_config.executor_timeout, &gate).await?;
            gate.started();
            if service.planner().catalog_is_whole() {
                info!("scheduler started: its catalog is recreated and interrupted writes settled");
            } else {
                warn!(
                    "scheduler started, without the stored catalog objects it could not recreate"
                );
            }
            // Until the scheduler stops, which drops this future.
            storage_leftovers::sweep(service.planner(), service.handle()).await;
            Ok(())
        }
    };
    info!(?address, "scheduler serving");
    let (stopping, stop_seen) = tokio::sync::oneshot::channel();
    let stop_gate = gate.clone();
    let shutdown = async move {
        shutdown.await;
        stop_gate.stopping();
        info!(
            grace_secs = SHUTDOWN_GRACE.as_secs(),
            "scheduler stopping: no new connections; open ones may finish within the grace"
        );
        let _ = stopping.send(());
    };
    let serving = tonic::transport::Server::builder()
        .add_service(
            gate.guard(
                SchedulerServiceServer::new(service)
                    .max_decoding_message_size(config.max_message_bytes)
                    .max_encoding_message_size(config.max_message_bytes),
                starting::scheduler_call_served_at_once,
            ),
        )
        .add_service(
            gate.guard(
                FlightServiceServer::new(flight_sql)
                    .max_decoding_message_size(config.max_message_bytes)
                    .max_encoding_message_size(config.max_message_bytes),
                starting::flight_call_served_at_once,
            ),
        )
        .serve_with_incoming_shutdown(quiver_core::net::incoming(listener), shutdown);
    // A graceful stop waits for every connection to close, and executors'
    // control streams and clients' job watches never close on their own:
    // the process would stay, holding its executors, which would never
    // reach a new scheduler. Past the grace, the open ones are dropped;
    // their executors dial again, and the next scheduler settles the jobs
    // that were running.
    let grace_over = async {
        if stop_seen.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        served = serving => served.map_err(Error::Serve),
        failed = start => failed,
        () = grace_over => {
            warn!("connections still open after the shutdown grace are dropped");
            Ok(())
        }
    }
}

/// How long a stopping scheduler lets open connections finish: statements
/// being planned, results being read.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    /// Executors stop their tasks when no heartbeat is acknowledged within
    /// 3/4 of the timeout: a timeout that leaves no room for heartbeats is refused.
    #[tokio::test]
    async fn a_timeout_shorter_than_three_heartbeats_is_refused() {
        let config = SchedulerConfig {
            heartbeat_interval_ms: 1000,
            executor_timeout_ms: 2000,
            ..SchedulerConfig::local()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let error = run(config, listener, std::future::ready(()))
            .await
            .expect_err("refused");
        assert!(matches!(error, Error::HeartbeatTiming { .. }), "{error}");
        assert!(
            error.to_string().contains("--executor-timeout-ms (2000)"),
            "{error}"
        );
    }

    /// A scheduler that has stopped lets go of its state store, as the
    /// embedded cluster needs: nothing it started (the event loop, the job
    /// recorder, the sweep of durable outputs) outlives it. redb refuses to
    /// open a database that is still open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_scheduler_lets_go_of_its_state_store() {
        use std::time::{Duration, Instant};

        use quiver_proto::ListExecutorsRequest;
        use quiver_proto::scheduler_service_client::SchedulerServiceClient;

        let state = tempfile::tempdir().expect("state folder");
        let config = SchedulerConfig {
            state_dir: state.path().to_path_buf(),
            ephemeral_state: false,
            ..SchedulerConfig::local()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(run(config, listener, async {
            let _ = stopped.await;
        }));
        // Calls are answered once the start is over.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut client) = SchedulerServiceClient::connect(url.clone()).await
                && client.list_executors(ListExecutorsRequest {}).await.is_ok()
            {
                break;
            }
            assert!(Instant::now() < deadline, "the scheduler never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.send(()).expect("the scheduler runs");
        running.await.expect("join").expect("a clean stop");

        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match store::StateStore::open(state.path()) {
                Ok(_) => break,
                Err(e) => assert!(Instant::now() < deadline, "still held: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
