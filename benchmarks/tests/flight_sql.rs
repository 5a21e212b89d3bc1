//! Quiver's Arrow Flight SQL endpoint, driven by the unmodified Python
//! clients (adbc-driver-flightsql and pyarrow): tables, the 22 TPC-H queries
//! (compared here with single-node DataFusion), bound parameters, metadata,
//! errors, updates, streaming and settings. See
//! `tests/python/flight_sql_client.py` for the client side.

mod common;

use std::path::Path;
use std::process::Command;

use arrow::ipc::reader::FileReader;
use arrow::record_batch::RecordBatch;
use quiver_benchmarks::queries::{QUERY_COUNT, query};
use quiver_benchmarks::verify::compare;
use quiver_client::StandaloneOptions;

fn read_arrow_file(path: &Path) -> Vec<RecordBatch> {
    let file = std::fs::File::open(path)
        .unwrap_or_else(|e| panic!("the client wrote no {}: {e}", path.display()));
    FileReader::try_new(file, None)
        .expect("an Arrow file")
        .collect::<Result<_, _>>()
        .expect("readable batches")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_adbc_clients_work_against_the_flight_sql_endpoint() {
    let python = common::python::python_importing(
        &["adbc_driver_flightsql.dbapi", "pyarrow"],
        "quiver-adbc-venv",
        &["adbc-driver-flightsql>=1.1", "pyarrow>=15"],
    );
    let tables = common::tpch_tables();
    let options = StandaloneOptions {
        executors: 2,
        slots_per_executor: 2,
        default_partitions: 4,
        ..StandaloneOptions::default()
    };
    let (cluster, _context) = common::start_cluster(options).await;

    let work = tempfile::tempdir().expect("temporary folder");
    let (query_dir, out_dir, scratch_dir) = (
        work.path().join("queries"),
        work.path().join("answers"),
        work.path().join("scratch"),
    );
    for dir in [&query_dir, &out_dir, &scratch_dir] {
        std::fs::create_dir_all(dir).expect("create folder");
    }
    for number in 1..=QUERY_COUNT {
        let sql = query(number).expect("query exists");
        std::fs::write(query_dir.join(format!("q{number:02}.sql")), sql).expect("write query");
    }
    let table_locations: serde_json::Map<String, serde_json::Value> = tables
        .iter()
        .map(|(name, path)| (name.clone(), path.display().to_string().into()))
        .collect();
    let tables_json = work.path().join("tables.json");
    std::fs::write(
        &tables_json,
        serde_json::to_vec(&table_locations).expect("json"),
    )
    .expect("write tables");

    let uri = cluster.url().replacen("quiver://", "grpc://", 1);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/flight_sql_client.py");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(&uri)
            .arg(&tables_json)
            .arg(&query_dir)
            .arg(&out_dir)
            .arg(&scratch_dir)
            .output()
    })
    .await
    .expect("join")
    .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python client failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("all Flight SQL checks passed"), "{stdout}");

    let datafusion = common::reference_engine(&tables, 4).await;
    let mut failures = Vec::new();
    for number in 1..=QUERY_COUNT {
        let sql = query(number).expect("query exists");
        let expected = datafusion.run(sql).await.expect("datafusion runs it");
        let actual = read_arrow_file(&work.path().join(format!("answers/q{number:02}.arrow")));
        if let Err(difference) = compare(&expected, &actual) {
            failures.push(format!("Q{number}: {difference}"));
        }
    }
    cluster.shutdown().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
