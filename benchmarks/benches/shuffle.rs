//! Micro-benchmark of the shuffle: one map task hash-partitioning TPC-H
//! `lineitem` rows into output partitions on disk (`ShuffleWriterExec`), and
//! reader tasks streaming every partition back from local disk
//! (`ShuffleReaderExec`), through the same code the executors run.
//!
//! `cargo bench -p quiver-benchmarks --bench shuffle` (SF 0.1 by default;
//! `QUIVER_BENCH_SF` changes it).

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::TaskContext;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_expr::expressions::col;
use datafusion::physical_plan::{ExecutionPlan, Partitioning};
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::TryStreamExt;
use quiver_core::shuffle::layout::job_dir;
use quiver_core::shuffle::{
    FlightClientPool, LocalOutputs, ReadMode, ShuffleEnv, ShuffleReaderExec, ShuffleWriterExec,
};
use quiver_proto::{ExecutorAddress, MapOutput};
use tpchgen::generators::LineItemGenerator;
use tpchgen_arrow::LineItemArrow;

const EXECUTOR_ID: &str = "bench";
/// Written again on every iteration, and deleted after each.
const WRITE_JOB: &str = "bench-write";
/// Written once per partition count, then read on every iteration.
const READ_JOB: &str = "bench-read";

fn lineitem(scale_factor: f64) -> Vec<RecordBatch> {
    LineItemArrow::new(LineItemGenerator::new(scale_factor, 1, 1))
        .with_batch_size(8192)
        .collect::<Result<_, _>>()
        .expect("generate lineitem")
}

fn task_context(outputs: &Arc<LocalOutputs>) -> Arc<TaskContext> {
    let runtime = RuntimeEnvBuilder::new().build_arc().expect("runtime");
    let config = SessionConfig::new().with_extension(Arc::new(ShuffleEnv {
        executor_id: EXECUTOR_ID.into(),
        outputs: Arc::clone(outputs),
        clients: FlightClientPool::default(),
        runtime: Arc::clone(&runtime),
    }));
    SessionContext::new_with_config_rt(config, runtime).task_ctx()
}

/// Writes map task `map` of a stage of `job` hash-partitioned on `l_orderkey`.
async fn write(
    job: &str,
    batches: &[RecordBatch],
    partitions: usize,
    map: u32,
    context: &Arc<TaskContext>,
    outputs: &Arc<LocalOutputs>,
) -> MapOutput {
    let schema = batches[0].schema();
    let source = MemorySourceConfig::try_new_exec(&[batches.to_vec()], Arc::clone(&schema), None)
        .expect("source");
    let key = col("l_orderkey", &schema).expect("column");
    let writer = ShuffleWriterExec::new(
        job,
        1,
        source,
        Some(Partitioning::Hash(vec![key], partitions)),
    );
    let stats = writer
        .write(0, map, Arc::clone(context), outputs)
        .await
        .expect("write");
    MapOutput {
        map_partition: 0,
        executor: Some(ExecutorAddress {
            executor_id: EXECUTOR_ID.into(),
            ..ExecutorAddress::default()
        }),
        attempt: map,
        partitions: stats,
        ..MapOutput::default()
    }
}

/// Reads every output partition of `output` back, as the next stage's tasks do.
async fn read_all(
    output: &MapOutput,
    schema: SchemaRef,
    partitions: usize,
    context: &Arc<TaskContext>,
) -> usize {
    let reader = ShuffleReaderExec::new(
        READ_JOB,
        1,
        ReadMode::Hash,
        partitions,
        datafusion::physical_expr::EquivalenceProperties::new(schema),
    )
    .bind(vec![output.clone()])
    .expect("bind");
    let mut rows = 0;
    for partition in 0..partitions {
        let batches: Vec<RecordBatch> = reader
            .execute(partition, Arc::clone(context))
            .expect("execute")
            .try_collect()
            .await
            .expect("read");
        rows += batches.iter().map(RecordBatch::num_rows).sum::<usize>();
    }
    rows
}

fn shuffle(c: &mut Criterion) {
    let scale_factor = std::env::var("QUIVER_BENCH_SF")
        .ok()
        .and_then(|sf| sf.parse().ok())
        .unwrap_or(0.1);
    let batches = lineitem(scale_factor);
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let bytes: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum();
    let runtime = tokio::runtime::Runtime::new().expect("tokio");
    let work_dir = tempfile::tempdir().expect("work dir");
    // Files, as large map outputs are: the bench measures the file format.
    let outputs = Arc::new(LocalOutputs::on_disk(work_dir.path().to_owned()));
    let context = task_context(&outputs);

    let mut group = c.benchmark_group(format!("shuffle lineitem sf{scale_factor} ({rows} rows)"));
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes as u64));
    for partitions in [4, 16, 64] {
        let mut attempt = 0;
        group.bench_with_input(
            BenchmarkId::new("write", partitions),
            &partitions,
            |b, &n| {
                b.iter(|| {
                    attempt += 1;
                    let output = runtime
                        .block_on(write(WRITE_JOB, &batches, n, attempt, &context, &outputs));
                    std::fs::remove_dir_all(job_dir(work_dir.path(), WRITE_JOB)).expect("clean up");
                    output
                })
            },
        );
        let output = runtime.block_on(write(READ_JOB, &batches, partitions, 0, &context, &outputs));
        let schema = batches[0].schema();
        group.bench_with_input(
            BenchmarkId::new("read", partitions),
            &partitions,
            |b, &n| {
                b.iter(|| {
                    let read =
                        runtime.block_on(read_all(&output, Arc::clone(&schema), n, &context));
                    assert_eq!(read, rows);
                })
            },
        );
        std::fs::remove_dir_all(job_dir(work_dir.path(), READ_JOB)).expect("clean up");
    }
    group.finish();
}

criterion_group!(benches, shuffle);
criterion_main!(benches);
