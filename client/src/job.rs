//! Runs one job on the cluster: submit, follow its status, then stream the
//! result partitions from the executors over Arrow Flight.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::{StreamExt, TryStreamExt};
use quiver_core::ipc::schema_from_bytes;
use quiver_core::shuffle::fetch::{FlightClientPool, job_result};
use quiver_proto::scheduler_service_client::SchedulerServiceClient;
use quiver_proto::{
    JobRequest, JobState, JobStatus, Setting, SubmitJobRequest, submit_job_request::Query,
};
use tonic::transport::Channel;

use crate::error::{Error, Result, causes, transport_failure};

/// A submitted job.
#[derive(Debug, Clone)]
pub struct SubmittedJob {
    pub job_id: String,
    pub schema: SchemaRef,
}

pub async fn submit(
    client: &mut SchedulerServiceClient<Channel>,
    query: Query,
    settings: Vec<Setting>,
) -> Result<SubmittedJob> {
    let request = SubmitJobRequest {
        query: Some(query),
        settings,
    };
    let mut answer = client.submit_job(request.clone()).await;
    // Cancelled unwritten on a connection that had closed (its scheduler
    // stopped, or restarted since the last call): the scheduler never saw
    // it, and the channel connects again for the next request.
    if let Err(status) = &answer
        && causes(status).any(cancelled_in_queue)
    {
        answer = client.submit_job(request).await;
    }
    let response = answer.map_err(submit_failed)?.into_inner();
    Ok(SubmittedJob {
        schema: schema_from_bytes(&response.schema)?,
        job_id: response.job_id,
    })
}

/// The error for a submission that failed. An answer of the scheduler (a
/// status without a source) says the statement did not run. A failure of
/// the transport says nothing about it, unless the request never left:
/// no connection was made, or the connection closed while the request
/// still waited in its queue (hyper cancels those unwritten).
fn submit_failed(status: tonic::Status) -> Error {
    if std::error::Error::source(&status).is_none() {
        return Error::Rpc(status);
    }
    let message = transport_failure(&status);
    if causes(&status).any(never_written) {
        Error::StatementNotSent { message }
    } else {
        Error::StatementLost { message }
    }
}

/// Whether a transport failure says that the request was never written.
fn never_written(cause: &(dyn std::error::Error + 'static)) -> bool {
    let refused = cause
        .downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
    refused || cancelled_in_queue(cause)
}

/// Whether a transport failure is hyper's cancelling of a request still
/// queued for a connection that closed: it was never written.
fn cancelled_in_queue(cause: &(dyn std::error::Error + 'static)) -> bool {
    cause
        .downcast_ref::<hyper::Error>()
        .is_some_and(hyper::Error::is_canceled)
}

/// Follows a job until it reaches a final state; `progress` sees every
/// update. A job that failed or was cancelled is an error.
pub async fn wait(
    client: &mut SchedulerServiceClient<Channel>,
    job_id: &str,
    progress: impl FnMut(&JobStatus),
) -> Result<JobStatus> {
    let status = follow(client, job_id, progress).await?;
    match status.state() {
        JobState::Failed => Err(Error::JobFailed {
            job_id: job_id.to_owned(),
            message: status.error,
        }),
        JobState::Cancelled => Err(Error::JobCancelled {
            job_id: job_id.to_owned(),
        }),
        _ => Ok(status),
    }
}

/// Follows a job until it reaches a final state, which it returns;
/// `progress` sees every update.
pub async fn follow(
    client: &mut SchedulerServiceClient<Channel>,
    job_id: &str,
    mut progress: impl FnMut(&JobStatus),
) -> Result<JobStatus> {
    let mut updates = client
        .watch_job(JobRequest {
            job_id: job_id.to_owned(),
        })
        .await?
        .into_inner();
    let lost = |status: tonic::Status| Error::SchedulerLost {
        job_id: job_id.to_owned(),
        message: transport_failure(&status),
    };
    while let Some(status) = updates.message().await.map_err(lost)? {
        progress(&status);
        match status.state() {
            JobState::Succeeded | JobState::Failed | JobState::Cancelled => return Ok(status),
            JobState::Queued | JobState::Running | JobState::Unspecified => {}
        }
    }
    Err(Error::StatusLost {
        job_id: job_id.to_owned(),
    })
}

/// What a request to cancel a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job ended, cancelled.
    Cancelled,
    /// The job's write was committing: the job ends when the commit does,
    /// cancelled if the commit fails and succeeded if it commits. Its final
    /// status says which.
    Committing,
    /// A scheduler restart interrupted the job, and its write is being
    /// settled: it cannot be cancelled, and ends as the write settles.
    Settling,
    /// The job had already ended.
    Ended,
}

/// Asks the scheduler to cancel a job.
pub async fn cancel(
    client: &mut SchedulerServiceClient<Channel>,
    job_id: &str,
) -> Result<CancelOutcome> {
    let response = client
        .cancel_job(JobRequest {
            job_id: job_id.to_owned(),
        })
        .await?
        .into_inner();
    Ok(if response.cancelled {
        CancelOutcome::Cancelled
    } else if response.committing {
        CancelOutcome::Committing
    } else if response.settling {
        CancelOutcome::Settling
    } else {
        CancelOutcome::Ended
    })
}

/// Cancels a job on the cluster when dropped while armed: a caller that stops
/// waiting (a dropped future, Ctrl-C) must not leave the job running there.
struct CancelOnDrop {
    client: SchedulerServiceClient<Channel>,
    job_id: String,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut client = self.client.clone();
        let job_id = std::mem::take(&mut self.job_id);
        runtime.spawn(async move {
            if let Err(error) = cancel(&mut client, &job_id).await {
                tracing::warn!(%job_id, %error, "could not cancel an abandoned job");
            }
        });
    }
}

/// Streams a finished job's result, partition after partition, then tells the
/// scheduler that the result can be freed.
pub fn result_stream(
    client: SchedulerServiceClient<Channel>,
    pool: FlightClientPool,
    schema: SchemaRef,
    status: JobStatus,
) -> SendableRecordBatchStream {
    let partitions = job_result(
        pool,
        status.job_id.clone(),
        status.result_stage,
        status.result,
        Arc::clone(&schema),
    );
    let release_job_id = status.job_id;
    let release = futures::stream::once(async move {
        let mut client = client;
        // Best effort: unreleased results expire on the scheduler anyway.
        let _ = client
            .release_job(JobRequest {
                job_id: release_job_id,
            })
            .await;
        Ok(None)
    });
    let batches = partitions
        .map_ok(Some)
        .chain(release)
        .try_filter_map(|batch| async move { Ok(batch) });
    Box::pin(RecordBatchStreamAdapter::new(schema, batches))
}

/// Submits a query, waits for it and streams its result.
pub async fn execute(
    mut client: SchedulerServiceClient<Channel>,
    pool: FlightClientPool,
    query: Query,
    settings: Vec<Setting>,
    progress: impl FnMut(&JobStatus),
) -> Result<SendableRecordBatchStream> {
    let started = std::time::Instant::now();
    let job = submit(&mut client, query, settings).await?;
    let submitted = started.elapsed();
    let mut guard = CancelOnDrop {
        client: client.clone(),
        job_id: job.job_id.clone(),
        armed: true,
    };
    let status = wait(&mut client, &job.job_id, progress).await;
    // A job that ended, well or badly, needs no cancelling; one whose status
    // was lost may still be running.
    guard.armed = !matches!(
        status,
        Ok(_) | Err(Error::JobFailed { .. } | Error::JobCancelled { .. })
    );
    let status = status?;
    tracing::debug!(job_id = %job.job_id, submit_us = submitted.as_micros() as u64,
        total_us = started.elapsed().as_micros() as u64, "job finished on the cluster");
    Ok(result_stream(client, pool, job.schema, status))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use tokio::io::AsyncReadExt;

    /// A listener on a free loopback port, and its address.
    async fn loopback_listener() -> (tokio::net::TcpListener, std::net::SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        (listener, address)
    }

    async fn submit_to(address: std::net::SocketAddr) -> Error {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .expect("endpoint")
            .connect_lazy();
        let query = Query::Sql("CREATE TABLE t AS SELECT 1".into());
        submit(&mut SchedulerServiceClient::new(channel), query, Vec::new())
            .await
            .expect_err("nothing answers")
    }

    #[tokio::test]
    async fn a_statement_that_reached_no_scheduler_was_not_sent() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        drop(listener);
        let error = submit_to(address).await;
        assert!(matches!(error, Error::StatementNotSent { .. }), "{error:?}");
        assert!(error.to_string().contains("refused"), "{error}");
    }

    #[tokio::test]
    async fn a_statement_whose_connection_closed_before_it_was_written_was_not_sent() {
        let (listener, address) = loopback_listener().await;
        // Takes each connection and closes it at once, before the client
        // could write the request queued for it.
        let peer = tokio::spawn(async move {
            let mut connections = 0;
            while let Ok(Ok((connection, _))) =
                tokio::time::timeout(Duration::from_secs(2), listener.accept()).await
            {
                drop(connection);
                connections += 1;
            }
            connections
        });
        let error = submit_to(address).await;
        assert!(matches!(error, Error::StatementNotSent { .. }), "{error:?}");
        assert!(error.to_string().contains("canceled"), "{error}");
        assert_eq!(peer.await.expect("peer"), 2, "sent once more");
    }

    /// A statement cancelled unwritten on a connection that closed (its
    /// scheduler restarted since the last statement) is sent once more, on
    /// a new connection, and runs. On one thread, the connection's task
    /// sees the close before it takes the request, as in the test above.
    #[tokio::test]
    async fn a_statement_cancelled_unwritten_is_sent_again() {
        let options = crate::StandaloneOptions {
            executors: 1,
            ..crate::StandaloneOptions::default()
        };
        let cluster = crate::StandaloneCluster::start(options)
            .await
            .expect("cluster");
        let scheduler = cluster.url().trim_start_matches("quiver://").to_owned();
        let (listener, address) = loopback_listener().await;
        // Closes the first connection at once, and passes the next ones on
        // to the scheduler.
        let proxy = tokio::spawn(async move {
            let (first, _) = listener.accept().await.expect("accept");
            drop(first);
            while let Ok((mut client, _)) = listener.accept().await {
                let scheduler = scheduler.clone();
                tokio::spawn(async move {
                    let mut upstream = tokio::net::TcpStream::connect(&scheduler)
                        .await
                        .expect("reach the scheduler");
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .expect("endpoint")
            .connect_lazy();
        let query = Query::Sql("SELECT 1".into());
        let submitted = submit(&mut SchedulerServiceClient::new(channel), query, Vec::new())
            .await
            .expect("sent again, and run");
        assert!(!submitted.job_id.is_empty());
        proxy.abort();
        cluster.shutdown().await;
    }

    #[tokio::test]
    async fn a_scheduler_that_cannot_be_reached_is_named_with_the_cause() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        drop(listener);
        let error = crate::QuiverContext::connect(&format!("quiver://{address}"))
            .await
            .map(|_| ())
            .expect_err("nothing listens");
        let message = error.to_string();
        assert!(
            message.contains(&address.to_string()) && message.contains("refused"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_statement_whose_connection_broke_may_have_run() {
        let (listener, address) = loopback_listener().await;
        // Takes the connection and the start of the request, then drops it,
        // as a scheduler that dies while it plans.
        let peer = tokio::spawn(async move {
            let (mut connection, _) = listener.accept().await.expect("accept");
            let mut buffer = [0; 64];
            let _ = connection.read(&mut buffer).await;
        });
        let error = submit_to(address).await;
        peer.await.expect("peer");
        assert!(matches!(error, Error::StatementLost { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("quiver job list"), "{message}");
        assert!(!message.ends_with("(transport error)"), "{message}");
    }
}
