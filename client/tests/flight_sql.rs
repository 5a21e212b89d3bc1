//! The scheduler's Flight SQL endpoint through arrow-rs's own Flight SQL
//! client, which speaks the protocol a little differently from ADBC (the
//! Python ADBC tests are in `benchmarks/tests/flight_sql.rs`): prepared
//! updates, cancellation, metadata and error codes.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{AsArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Int64Type};
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::{
    Action, CancelFlightInfoRequest, CancelFlightInfoResult, CancelStatus, FlightInfo,
};
use futures::TryStreamExt;
use prost::Message;
use quiver_client::{StandaloneCluster, StandaloneOptions};
use tonic::transport::Channel;

async fn connect(cluster: &StandaloneCluster) -> FlightSqlServiceClient<Channel> {
    let address = cluster.url().replacen("quiver://", "http://", 1);
    let channel = Channel::from_shared(address)
        .expect("url")
        .connect()
        .await
        .expect("connect");
    FlightSqlServiceClient::new(channel)
}

async fn fetch(client: &mut FlightSqlServiceClient<Channel>, info: FlightInfo) -> Vec<RecordBatch> {
    let mut batches = Vec::new();
    for endpoint in info.endpoint {
        let ticket = endpoint.ticket.expect("a ticket");
        let stream = client.do_get(ticket).await.expect("do_get");
        batches.extend(stream.try_collect::<Vec<_>>().await.expect("batches"));
    }
    batches
}

async fn query(client: &mut FlightSqlServiceClient<Channel>, sql: &str) -> Vec<RecordBatch> {
    let info = client.execute(sql.to_owned(), None).await.expect("execute");
    fetch(client, info).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn arrow_rs_clients_prepare_update_cancel_and_list() {
    let cluster = StandaloneCluster::start(StandaloneOptions::default())
        .await
        .expect("start");
    drop(cluster.connect(2).await.expect("executors up"));
    let mut client = connect(&cluster).await;
    let folder = tempfile::tempdir().expect("folder");

    // A prepared INSERT with two rows of parameters bound, run as an update.
    let created = client
        .execute_update(
            format!(
                "CREATE EXTERNAL TABLE events (id BIGINT, kind VARCHAR) STORED AS PARQUET LOCATION '{}/'",
                folder.path().display()
            ),
            None,
        )
        .await
        .expect("create");
    assert_eq!(created, 0);
    let mut insert = client
        .prepare("INSERT INTO events VALUES ($1, $2)".into(), None)
        .await
        .expect("prepare");
    let parameters = RecordBatch::try_from_iter([
        ("id", Arc::new(Int64Array::from(vec![1, 2])) as _),
        (
            "kind",
            Arc::new(StringArray::from(vec!["start", "stop"])) as _,
        ),
    ])
    .expect("parameters");
    insert.set_parameters(parameters).expect("bind");
    assert_eq!(insert.execute_update().await.expect("insert"), 2);
    insert.close().await.expect("close");
    let counted = query(&mut client, "SELECT count(*) AS n FROM events").await;
    assert_eq!(counted[0].column(0).as_primitive::<Int64Type>().value(0), 2);

    // A prepared query with one bound row.
    let mut select = client
        .prepare("SELECT kind FROM events WHERE id = $1".into(), None)
        .await
        .expect("prepare");
    select
        .set_parameters(
            RecordBatch::try_from_iter([("id", Arc::new(Int64Array::from(vec![2])) as _)])
                .expect("parameters"),
        )
        .expect("bind");
    let info = select.execute().await.expect("execute");
    let rows = fetch(&mut client, info).await;
    let kind = arrow::compute::cast(rows[0].column(0), &DataType::Utf8).expect("as text");
    assert_eq!(kind.as_string::<i32>().value(0), "stop");

    // Cancelling a running query's FlightInfo cancels its job.
    let endless = "SELECT count(*), sum(value % 7) FROM range(1, 1000000000000)";
    let info = client.execute(endless.into(), None).await.expect("submit");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cancel(&mut client, &info).await, CancelStatus::Cancelled);
    let ticket = info.endpoint[0].ticket.clone().expect("ticket");
    let error = match client.do_get(ticket).await {
        Err(error) => error.to_string(),
        Ok(stream) => stream
            .try_collect::<Vec<_>>()
            .await
            .expect_err("cancelled")
            .to_string(),
    };
    assert!(error.contains("cancelled"), "{error}");
    assert_eq!(
        cancel(&mut client, &info).await,
        CancelStatus::NotCancellable
    );

    // Metadata.
    let info = client.get_catalogs().await.expect("catalogs");
    let catalogs = fetch(&mut client, info).await;
    let names: Vec<&str> = catalogs[0]
        .column(0)
        .as_string::<i32>()
        .iter()
        .flatten()
        .collect();
    assert_eq!(names, ["datafusion"]);

    // Errors keep DataFusion's message, with a status code to match.
    let error = client
        .execute("SELEC 1".into(), None)
        .await
        .expect_err("bad SQL");
    assert!(
        error.to_string().contains("invalid argument") && error.to_string().contains("SELEC"),
        "{error}"
    );
    let error = query_error(
        &mut client,
        "SELECT CAST(v AS INT) FROM (VALUES ('x')) t(v)",
    )
    .await;
    assert!(
        error.contains("Unknown") && error.contains("'x'"),
        "{error}"
    );
    cluster.shutdown().await;
}

/// Flight's `CancelFlightInfo` action on the query behind `info`.
async fn cancel(client: &mut FlightSqlServiceClient<Channel>, info: &FlightInfo) -> CancelStatus {
    let request = CancelFlightInfoRequest::new(info.clone());
    let action = Action::new("CancelFlightInfo", request.encode_to_vec());
    let mut answers = client.do_action(action).await.expect("cancel");
    let answer = answers
        .message()
        .await
        .expect("an answer")
        .expect("one result");
    CancelFlightInfoResult::decode(answer.body)
        .expect("a CancelFlightInfoResult")
        .status()
}

/// The error a query gets, whether at planning or while its result streams.
async fn query_error(client: &mut FlightSqlServiceClient<Channel>, sql: &str) -> String {
    let info = match client.execute(sql.to_owned(), None).await {
        Ok(info) => info,
        Err(error) => return error.to_string(),
    };
    let ticket = info.endpoint[0].ticket.clone().expect("ticket");
    match client.do_get(ticket).await {
        Err(error) => error.to_string(),
        Ok(stream) => stream
            .try_collect::<Vec<_>>()
            .await
            .expect_err("the query fails")
            .to_string(),
    }
}
