//! Hostile input over the network: garbage and oversized gRPC messages,
//! malformed plans, unknown job ids, and malformed or path-traversing Flight
//! tickets all get an error with a clear status, and the servers go on serving.

use std::time::Duration;

use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{ProstMessageExt, TicketStatementQuery};
use arrow_flight::{Criteria, Ticket};
use prost::Message;
use quiver_client::{QuiverContext, StandaloneCluster, StandaloneOptions};
use quiver_proto::scheduler_service_client::SchedulerServiceClient;
use quiver_proto::{JobRequest, ShuffleTicket, SubmitJobRequest, submit_job_request::Query};
use quiver_scheduler::SchedulerConfig;
use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::Channel;

/// Deterministic pseudo-random bytes (xorshift), so that failures reproduce.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

async fn submit(client: &mut SchedulerServiceClient<Channel>, query: Query) -> tonic::Status {
    match client
        .submit_job(SubmitJobRequest {
            query: Some(query),
            settings: vec![],
        })
        .await
    {
        Ok(response) => panic!("accepted: {:?}", response.into_inner().job_id),
        Err(status) => status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_refuses_garbage_and_keeps_serving() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let config = SchedulerConfig {
        max_message_bytes: 64 * 1024,
        ..SchedulerConfig::local()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(quiver_scheduler::run(config, listener, async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client =
        SchedulerServiceClient::new(channel.clone()).max_encoding_message_size(usize::MAX);

    // Garbage where a client-built logical plan belongs.
    for seed in 0..200 {
        let bytes = noise(seed, (seed as usize * 37) % 2000);
        let status = submit(&mut client, Query::LogicalPlan(bytes)).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("malformed logical plan"),
            "{status:?}"
        );
    }

    // A message over the limit is refused by size, naming it.
    let huge = format!("SELECT '{}'", "x".repeat(128 * 1024));
    let status = submit(&mut client, Query::Sql(huge)).await;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("message length too large"),
        "{status:?}"
    );

    // Unknown and malicious job ids.
    for job_id in ["no-such-job", "../../etc/passwd", ""] {
        let request = || JobRequest {
            job_id: job_id.to_owned(),
        };
        let status = client
            .get_job_status(request())
            .await
            .expect_err("unknown job");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let status = client.cancel_job(request()).await.expect_err("unknown job");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let status = client
            .release_job(request())
            .await
            .expect_err("unknown job");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }

    // Garbage and forged tickets on the Flight SQL endpoint.
    let mut flight_sql = FlightServiceClient::new(channel);
    let forged = TicketStatementQuery {
        statement_handle: noise(3, 40).into(),
    };
    let cases = [
        (noise(11, 300), "DecodeError"),
        (forged.as_any().encode_to_vec(), "malformed ticket"),
    ];
    for (bytes, message) in cases {
        let status = flight_sql
            .do_get(Ticket {
                ticket: bytes.into(),
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(message), "{status:?}");
    }

    // After all that, the scheduler serves a normal statement.
    let context = QuiverContext::connect(&url).await.expect("client");
    context
        .sql("CREATE VIEW still_serving AS SELECT 1 AS one")
        .await
        .expect("the scheduler still plans statements");
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("stops")
        .expect("joins")
        .expect("serves cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_data_plane_refuses_bad_tickets_and_keeps_serving() {
    let cluster = StandaloneCluster::start(StandaloneOptions::default())
        .await
        .expect("start");
    let context = cluster.connect(2).await.expect("connect");
    let executor = context
        .executors()
        .await
        .expect("executors")
        .into_iter()
        .find_map(|info| info.address)
        .expect("an executor");
    let channel =
        Channel::from_shared(format!("http://{}:{}", executor.host, executor.flight_port))
            .expect("url")
            .connect()
            .await
            .expect("flight");
    let mut flight = FlightServiceClient::new(channel);

    let ticket = |job_id: &str| ShuffleTicket {
        job_id: job_id.into(),
        stage_id: 1,
        map_partition: 0,
        attempt: 0,
        output_partition: 0,
    };
    let cases: Vec<(Vec<u8>, Code, &str)> = vec![
        (
            noise(7, 300),
            Code::InvalidArgument,
            "malformed shuffle ticket",
        ),
        (
            ticket("../../../etc").encode_to_vec(),
            Code::InvalidArgument,
            "invalid identifier",
        ),
        (
            ticket("job/../../x").encode_to_vec(),
            Code::InvalidArgument,
            "invalid identifier",
        ),
        (
            ticket("no-such-job").encode_to_vec(),
            Code::NotFound,
            "no-such-job",
        ),
    ];
    for (bytes, code, message) in cases {
        let status = flight
            .do_get(Ticket {
                ticket: bytes.into(),
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(message), "{status:?}");
    }
    let status = flight
        .list_flights(Criteria::default())
        .await
        .expect_err("not served");
    assert_eq!(status.code(), Code::Unimplemented);

    // The executors still run jobs.
    let batches = context
        .sql("SELECT count(*) AS n FROM (VALUES (1), (2), (3)) t(x)")
        .await
        .expect("plan")
        .collect()
        .await
        .expect("run");
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    cluster.shutdown().await;
}
