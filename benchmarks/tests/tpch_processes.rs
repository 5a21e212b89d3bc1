//! The TPC-H queries through the real binaries: `quiver-scheduler` and two
//! `quiver-executor` processes on loopback, queried with the `quiver` CLI in
//! CSV. Each answer must equal single-node DataFusion's, rendered the same way.
//!
//! The binaries come from the same target folder as this test; `cargo build
//! --workspace --bins` (which `.ci/run` does) puts them there.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quiver_benchmarks::queries::{QUERY_COUNT, query};
use quiver_client::output::{Format, write_batches};

fn binary(name: &str) -> PathBuf {
    let deps = std::env::current_exe().expect("test path");
    let dir = deps
        .parent()
        .and_then(|d| d.parent())
        .expect("target folder");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Kills the child processes when the test ends, even on failure.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn cli(url: &str, sql: &str) -> Result<String, String> {
    let output = Command::new(binary("quiver"))
        .args(["--url", url, "--format", "csv", "-c", sql])
        .output()
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpch_through_real_processes_and_the_cli() {
    let tables = common::tpch_tables();
    let work = tempfile::tempdir().expect("work dir");
    let port = free_port();
    let url = format!("quiver://127.0.0.1:{port}");
    let mut processes = Processes(Vec::new());
    processes.0.push(
        Command::new(binary("quiver-scheduler"))
            .args(["--port", &port.to_string(), "--default-partitions", "4"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start scheduler"),
    );
    for index in 0..2 {
        processes.0.push(
            Command::new(binary("quiver-executor"))
                .args(["--scheduler-url", &format!("http://127.0.0.1:{port}")])
                .args(["--flight-port", "0", "--slots", "2"])
                .arg("--work-dir")
                .arg(work.path().join(format!("executor-{index}")))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start executor"),
        );
    }

    // Wait until the cluster runs a job that needs both executors' slots.
    let deadline = Instant::now() + Duration::from_secs(60);
    while cli(&url, "SELECT count(*) FROM (VALUES (1),(2),(3),(4)) t(x)").is_err() {
        assert!(Instant::now() < deadline, "the cluster did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
    for (name, dir) in &tables {
        cli(
            &url,
            &format!(
                "CREATE EXTERNAL TABLE {name} STORED AS PARQUET LOCATION '{}/'",
                dir.display()
            ),
        )
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    }

    let datafusion = common::reference_engine(&tables, 4).await;
    let mut failures = Vec::new();
    for number in 1..=QUERY_COUNT {
        let sql = query(number).expect("query exists");
        let batches = datafusion.run(sql).await.expect("datafusion");
        let schema = batches.first().map(|b| b.schema()).expect("a result batch");
        let mut expected = Vec::new();
        write_batches(&mut expected, Format::Csv, &schema, &batches).expect("render");
        match cli(&url, sql) {
            Ok(actual) if actual == String::from_utf8_lossy(&expected) => {}
            Ok(actual) => failures.push(format!(
                "Q{number}: expected\n{}\ngot\n{actual}",
                String::from_utf8_lossy(&expected)
            )),
            Err(e) => failures.push(format!("Q{number} failed: {e}")),
        }
    }
    check_cli_inputs(&url, work.path());
    let error = cli(&url, "SELECT * FROM no_such_table").expect_err("unknown table");
    assert!(error.contains("no_such_table"), "{error}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Statements from stdin and from files, JSON output, and an unreachable scheduler.
fn check_cli_inputs(url: &str, scratch: &std::path::Path) {
    let mut child = Command::new(binary("quiver"))
        .args(["--url", url, "--format", "json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start cli");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"SELECT 1 AS one;\nSELECT 'a;b' AS s; -- a comment\n")
        .expect("write stdin");
    let output = child.wait_with_output().expect("cli output");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "{\"one\":1}\n{\"s\":\"a;b\"}\n"
    );

    let script = scratch.join("script.sql");
    std::fs::write(
        &script,
        "SELECT count(*) AS n FROM nation;\nSELECT count(*) AS r FROM region;\n",
    )
    .expect("script");
    let output = Command::new(binary("quiver"))
        .args(["--url", url, "--format", "csv", "-f"])
        .arg(&script)
        .output()
        .expect("cli");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "n\n25\nr\n5\n");

    let error = cli("quiver://127.0.0.1:1", "SELECT 1").expect_err("nothing listens on port 1");
    assert!(
        error.contains("127.0.0.1:1"),
        "the address is named: {error}"
    );
}
