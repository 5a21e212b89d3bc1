//! Shuffle reads over a real Flight server: many large streams from one
//! executor, read at once by two tasks that share their connection, as
//! broadcast build sides are read. Every row must arrive, once.
//!
//! The hang that such reads once caused (see `core/src/net.rs`) needed the
//! whole cluster to appear: at this size the old reader still finished. The
//! SF1 run with 4 partitions and 2 slots per executor is its reproduction.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::TaskContext;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::{ExecutionPlan, Partitioning, collect};
use datafusion::prelude::SessionConfig;
use quiver_core::shuffle::{
    FlightClientPool, LocalOutputs, ReadMode, ShuffleEnv, ShuffleReaderExec, ShuffleWriterExec,
};
use quiver_proto::{ExecutorAddress, MapOutput};
use tokio::net::TcpListener;

/// Map outputs written on the serving executor.
const MAPS: usize = 4;
/// Output partitions of each map output.
const PARTITIONS: usize = 4;
/// Rows per map output: each of its partitions is then about 3 MiB, more
/// than one HTTP/2 stream window.
const ROWS_PER_MAP: i64 = 400_000;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("payload", DataType::Utf8, false),
    ]))
}

/// One partition of rows per map output.
fn map_inputs() -> Arc<dyn ExecutionPlan> {
    let partitions = (0..MAPS as i64)
        .map(|map| {
            let keys: Vec<i64> = (map * ROWS_PER_MAP..(map + 1) * ROWS_PER_MAP).collect();
            let payloads: Vec<String> = keys.iter().map(|k| format!("{k:0>24}")).collect();
            let batch = RecordBatch::try_new(
                schema(),
                vec![
                    Arc::new(Int64Array::from(keys)),
                    Arc::new(StringArray::from(payloads)),
                ],
            )
            .expect("batch");
            vec![batch]
        })
        .collect::<Vec<_>>();
    MemorySourceConfig::try_new_exec(&partitions, schema(), None).expect("source")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_large_streams_from_one_executor_are_read_at_once() {
    let serving_dir = tempfile::tempdir().expect("temp dir");
    let reading_dir = tempfile::tempdir().expect("temp dir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let flight_port = listener.local_addr().expect("address").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Files, not memory: the outputs are as large as the streams should be.
    let serving = Arc::new(LocalOutputs::on_disk(serving_dir.path().to_path_buf()));
    let server = tokio::spawn(quiver_executor::flight::serve(
        listener,
        Arc::clone(&serving),
        async {
            let _ = stopped.await;
        },
    ));

    let key = Arc::new(Column::new("k", 0)) as _;
    let writer = ShuffleWriterExec::new(
        "job",
        1,
        map_inputs(),
        Some(Partitioning::Hash(vec![key], PARTITIONS)),
    );
    let address = ExecutorAddress {
        executor_id: "serving".into(),
        host: "127.0.0.1".into(),
        flight_port: u32::from(flight_port),
    };
    let mut outputs = Vec::new();
    for map in 0..MAPS {
        let context = Arc::new(TaskContext::default());
        let partitions = writer
            .write(map, 0, context, &serving)
            .await
            .expect("write a map output");
        outputs.push(MapOutput {
            map_partition: map as u32,
            executor: Some(address.clone()),
            attempt: 0,
            partitions,
            ..MapOutput::default()
        });
    }

    // Another executor reads every partition, each from every map output,
    // all at once.
    let reader = ShuffleReaderExec::new(
        "job",
        1,
        ReadMode::Hash,
        PARTITIONS,
        EquivalenceProperties::new(schema()),
    )
    .bind(outputs)
    .expect("bind");
    let env = ShuffleEnv {
        executor_id: "reading".into(),
        outputs: Arc::new(LocalOutputs::on_disk(reading_dir.path().to_path_buf())),
        clients: FlightClientPool::default(),
        runtime: Arc::new(RuntimeEnv::default()),
    };
    // Two tasks of the reading executor at once, sharing its connections.
    let read_everything = |env: ShuffleEnv, reader: ShuffleReaderExec| async move {
        let config = SessionConfig::new().with_extension(Arc::new(env));
        let context = Arc::new(TaskContext::default().with_session_config(config));
        let everything = Arc::new(CoalescePartitionsExec::new(Arc::new(reader)));
        collect(everything, context).await
    };
    let both = futures::future::try_join(
        read_everything(env.clone(), reader.clone()),
        read_everything(env, reader),
    );
    let (first, second) = tokio::time::timeout(Duration::from_secs(120), both)
        .await
        .expect("the reads finish instead of stalling")
        .expect("read");
    for batches in [first, second] {
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        assert_eq!(rows, MAPS * ROWS_PER_MAP as usize);
    }

    let _ = stop.send(());
    server.await.expect("join").expect("serve");
}
