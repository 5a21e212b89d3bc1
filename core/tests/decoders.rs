//! Property tests (the fuzz targets) of every decoder that reads bytes from the
//! network or from shuffle storage: shuffle tickets, offset indexes, Arrow IPC
//! schemas and shuffle segments, control messages, and stage and logical
//! plans. Each gets valid input mutated at random (changed bytes, truncation)
//! and raw garbage, and must return a value or an error: never panic, never hang.
//!
//! `PROPTEST_CASES` sets the cases per target (256 by default); CI runs the
//! default, and longer runs are a matter of raising it.

use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::TableProvider;
use datafusion::common::TableReference;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use datafusion_proto::bytes::{
    logical_plan_to_bytes_with_extension_codec, physical_plan_to_bytes_with_extension_codec,
};
use futures::StreamExt;
use proptest::prelude::*;
use proptest::sample::Index;
use prost::Message;
use quiver_core::codec::{
    QuiverPhysicalCodec, RemoteTable, RemoteTableCodec, TableResolver, decode_logical_plan,
    decode_physical_plan,
};
use quiver_core::ipc::{schema_from_bytes, schema_to_bytes};
use quiver_core::shuffle::fetch::segment_batches;
use quiver_core::shuffle::layout::{
    ChecksummingWriter, Index as ShuffleIndex, MapOutputId, decode_index, encode_index,
    open_segment, parse_ticket,
};
use quiver_core::shuffle::{ReadMode, ShuffleReaderExec, ShuffleWriterExec};
use quiver_proto::{ExecutorMessage, LaunchTask, SchedulerMessage, ShuffleTicket};

/// Valid bytes changed by up to 8 byte writes and an optional truncation.
fn mutated(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let edits = prop::collection::vec((any::<Index>(), any::<u8>()), 0..8);
    (Just(valid), edits, prop::option::of(any::<Index>())).prop_map(|(mut bytes, edits, cut)| {
        if !bytes.is_empty() {
            for (at, value) in edits {
                let at = at.index(bytes.len());
                bytes[at] = value;
            }
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        bytes
    })
}

fn garbage() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..512)
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
    ]))
}

fn batch() -> RecordBatch {
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(Int64Array::from_iter_values(0..100)),
            Arc::new(StringArray::from_iter(
                (0..100).map(|i| (i % 7 != 0).then(|| format!("name-{i}"))),
            )),
        ],
    )
    .expect("batch")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A stage plan as the scheduler sends it: filter, projection and sort over a
/// shuffle reader, under a hash-partitioning shuffle writer.
///
/// It holds no in-memory table: datafusion-proto decodes those with the Arrow
/// IPC reader, which allocates whatever length corrupted bytes declare and
/// aborts the process when that fails (an abort cannot be caught; see the
/// fault-model notes in ARCHITECTURE.md). Stage plans come only from the
/// scheduler.
fn valid_stage_plan() -> Vec<u8> {
    use datafusion::logical_expr::Operator;
    use datafusion::physical_expr::expressions::{BinaryExpr, col, lit};
    use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr};
    use datafusion::physical_plan::Partitioning;
    use datafusion::physical_plan::filter::FilterExec;
    use datafusion::physical_plan::projection::ProjectionExec;
    use datafusion::physical_plan::sorts::sort::SortExec;

    let schema = schema();
    let column = |name: &str| col(name, &schema).expect("column");
    let reader: Arc<dyn ExecutionPlan> = Arc::new(ShuffleReaderExec::new(
        "job-1",
        1,
        ReadMode::Hash,
        4,
        EquivalenceProperties::new(Arc::clone(&schema)),
    ));
    let predicate = Arc::new(BinaryExpr::new(column("k"), Operator::Gt, lit(5i64)));
    let filter = Arc::new(FilterExec::try_new(predicate, reader).expect("filter"));
    let projection = Arc::new(
        ProjectionExec::try_new(
            vec![
                (column("name"), "name".to_owned()),
                (column("k"), "k".to_owned()),
            ],
            filter,
        )
        .expect("projection"),
    );
    let ordering = LexOrdering::new(vec![PhysicalSortExpr::new_default(
        col("k", &projection.schema()).expect("column"),
    )])
    .expect("ordering");
    let sort = Arc::new(SortExec::new(ordering, projection));
    let partitioning = Partitioning::Hash(vec![col("k", &sort.schema()).expect("column")], 4);
    let writer = ShuffleWriterExec::new("job-1", 2, sort, Some(partitioning));
    physical_plan_to_bytes_with_extension_codec(Arc::new(writer), &QuiverPhysicalCodec)
        .expect("encode")
        .to_vec()
}

#[derive(Debug)]
struct OneTable;

impl TableResolver for OneTable {
    fn resolve(&self, name: &TableReference) -> DfResult<Arc<dyn TableProvider>> {
        if name.table() == "nation" {
            Ok(Arc::new(RemoteTable::new("nation", schema())))
        } else {
            Err(DataFusionError::Plan(format!("table '{name}' not found")))
        }
    }
}

/// A client-built logical plan over a remote table.
fn valid_logical_plan() -> Vec<u8> {
    let context = SessionContext::new();
    context
        .register_table("nation", Arc::new(RemoteTable::new("nation", schema())))
        .expect("register");
    let plan = runtime().block_on(async {
        context
            .sql("SELECT name, sum(k) FROM nation WHERE k < 10 GROUP BY name ORDER BY name")
            .await
            .expect("sql")
            .logical_plan()
            .clone()
    });
    logical_plan_to_bytes_with_extension_codec(&plan, &RemoteTableCodec::default())
        .expect("encode")
        .to_vec()
}

fn valid_ticket() -> Vec<u8> {
    ShuffleTicket {
        job_id: "0123456789abcdef".into(),
        stage_id: 3,
        map_partition: 1,
        attempt: 0,
        output_partition: 2,
    }
    .encode_to_vec()
}

/// A map output on disk with three partitions, and its bytes.
struct StoredOutput {
    dir: tempfile::TempDir,
    id: MapOutputId,
    data: Vec<u8>,
    index: Vec<u8>,
}

fn stored_output() -> StoredOutput {
    // Small blocks, so that a mutation can hit any of several in a partition.
    let mut out = ChecksummingWriter::new(Vec::new(), 128);
    for _ in 0..3 {
        let mut writer =
            arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema()).expect("writer");
        writer.write(&batch()).expect("write");
        writer.finish().expect("finish");
        drop(writer);
        out.end_partition();
    }
    let (data, index) = out.finish();
    StoredOutput {
        dir: tempfile::tempdir().expect("tempdir"),
        id: MapOutputId::new("job-1", 1, 0, 0).expect("id"),
        index: encode_index(&index),
        data,
    }
}

/// Reads every partition of a map output whose files hold `data` and `index`;
/// returns how many batches came back.
fn read_all(stored: &StoredOutput, data: &[u8], index: &[u8]) -> usize {
    let data_path = stored.id.data_path(stored.dir.path());
    std::fs::create_dir_all(data_path.parent().expect("stage dir")).expect("mkdir");
    std::fs::write(&data_path, data).expect("data");
    std::fs::write(stored.id.index_path(stored.dir.path()), index).expect("index");
    runtime().block_on(async {
        let mut read = 0;
        for partition in 0..3 {
            if let Ok(segment) = open_segment(stored.dir.path(), &stored.id, partition) {
                let mut batches = segment_batches(segment);
                while let Some(batch) = batches.next().await {
                    if batch.is_err() {
                        break;
                    }
                    read += 1;
                }
            }
        }
        read
    })
}

proptest! {
    #[test]
    fn shuffle_tickets(bytes in prop_oneof![mutated(valid_ticket()), garbage()]) {
        if let Ok(request) = parse_ticket(&bytes) {
            // Whatever parses names a path inside the work dir.
            let root = std::path::Path::new("/work");
            prop_assert!(request.output.data_path(root).starts_with(root));
            prop_assert!(!request.output.job_id.contains(".."));
        }
    }

    #[test]
    fn path_traversing_job_ids_are_refused(job_id in "[./a-z]{0,12}") {
        let ticket = ShuffleTicket { job_id: job_id.clone(), ..ShuffleTicket::default() };
        let parsed = parse_ticket(&ticket.encode_to_vec());
        prop_assert_eq!(parsed.is_ok(), !job_id.is_empty() && !job_id.contains(['.', '/']));
    }

    #[test]
    fn offset_indexes(
        bytes in prop_oneof![mutated(encode_index(&ShuffleIndex {
            offsets: vec![0, 10, 25, 40],
            block_size: 10,
            checksums: vec![vec![7], vec![8, 9], vec![10, 11]],
        })), garbage()],
        len in 0u64..100,
    ) {
        if let Ok(index) = decode_index(std::path::Path::new("x.index"), &bytes, len) {
            prop_assert!(index.offsets.windows(2).all(|w| w[0] <= w[1]));
            prop_assert!(index.offsets.last().is_some_and(|last| *last == len));
            prop_assert_eq!(index.offsets.len(), index.checksums.len() + 1);
            for (range, checksums) in index.offsets.windows(2).zip(&index.checksums) {
                let blocks = (range[1] - range[0]).div_ceil(u64::from(index.block_size));
                prop_assert_eq!(blocks, checksums.len() as u64);
            }
        }
    }

    #[test]
    fn ipc_schemas(bytes in prop_oneof![mutated(schema_to_bytes(&schema())), garbage()]) {
        let _ = schema_from_bytes(&bytes);
    }

    #[test]
    fn control_messages(bytes in garbage()) {
        let _ = ExecutorMessage::decode(bytes.as_slice());
        let _ = SchedulerMessage::decode(bytes.as_slice());
        let _ = LaunchTask::decode(bytes.as_slice());
    }
}

proptest! {
    // Each case writes files or decodes a whole plan; fewer cases keep CI quick.
    #![proptest_config(ProptestConfig {
        cases: ProptestConfig::default().cases / 4,
        ..ProptestConfig::default()
    })]

    #[test]
    fn shuffle_segments(
        seed in any::<u64>(),
        edits in prop::collection::vec((any::<Index>(), any::<u8>()), 1..16),
        cut in prop::option::of(any::<Index>()),
    ) {
        let stored = stored_output();
        let mut data = stored.data.clone();
        for (at, value) in edits {
            let at = at.index(data.len());
            data[at] ^= value | 1;
        }
        if let Some(cut) = cut {
            data.truncate(cut.index(data.len() + 1));
        }
        // Corrupt data under a valid index, then the original data under a damaged index.
        read_all(&stored, &data, &stored.index);
        let mut index = stored.index.clone();
        let at = (seed as usize) % index.len();
        index[at] ^= 0x5a;
        read_all(&stored, &stored.data, &index);
    }

    #[test]
    fn stage_plans(bytes in prop_oneof![mutated(valid_stage_plan()), garbage()]) {
        let context = SessionContext::new();
        let _ = decode_physical_plan(&bytes, &context.task_ctx());
    }

    #[test]
    fn logical_plans(bytes in prop_oneof![mutated(valid_logical_plan()), garbage()]) {
        let context = SessionContext::new();
        let codec = RemoteTableCodec::with_resolver(Arc::new(OneTable));
        let _ = decode_logical_plan(&bytes, &context.task_ctx(), &codec);
    }
}

/// The mutations start from inputs that really decode.
#[test]
fn valid_inputs_decode() {
    let context = SessionContext::new();
    assert!(parse_ticket(&valid_ticket()).is_ok());
    decode_physical_plan(&valid_stage_plan(), &context.task_ctx()).expect("stage plan");
    let codec = RemoteTableCodec::with_resolver(Arc::new(OneTable));
    decode_logical_plan(&valid_logical_plan(), &context.task_ctx(), &codec).expect("plan");
    let stored = stored_output();
    assert_eq!(read_all(&stored, &stored.data, &stored.index), 3);
    let mut flipped = stored.data.clone();
    flipped[stored.data.len() / 2] ^= 0x10;
    assert_eq!(
        read_all(&stored, &flipped, &stored.index),
        2,
        "the partition with the flipped bit is refused, the others read"
    );
}
