//! The TPC-H queries through the real binaries: `quiver-scheduler` and two
//! `quiver-executor` processes on loopback, queried with the `quiver` CLI in
//! CSV. Each answer must equal single-node DataFusion's, rendered the same way.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::processes::{ClusterArgs, ProcessCluster, binary};

use quiver_benchmarks::queries::{QUERY_COUNT, query};
use quiver_client::output::{Format, write_batches};

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
    let cluster = ProcessCluster::start(2, ClusterArgs::default());
    let url = cluster.url();
    // Wait until both executors have registered.
    drop(cluster.connect(2).await);
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
    check_cli_inputs(&url, cluster.work_dir());
    check_cli_shell(&url, cluster.work_dir());
    check_cli_jobs(&url);
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

    // Schemas, and DESCRIBE of a table in one.
    let nation = scratch.join("nation-copy");
    let described = cli(
        url,
        &format!(
            "CREATE SCHEMA sales; \
             COPY (SELECT * FROM nation) TO '{}/' STORED AS PARQUET; \
             CREATE EXTERNAL TABLE sales.nation STORED AS PARQUET LOCATION '{}/'; \
             DESCRIBE sales.nation",
            nation.display(),
            nation.display()
        ),
    )
    .expect("schema, table and DESCRIBE");
    assert!(
        // Inferred columns are nullable, whatever the files say.
        described.ends_with("column_name,data_type,is_nullable\nn_nationkey,Int64,YES\nn_name,Utf8View,YES\nn_regionkey,Int64,YES\nn_comment,Utf8View,YES\n"),
        "{described}"
    );

    let error = cli("quiver://127.0.0.1:1", "SELECT 1").expect_err("nothing listens on port 1");
    assert!(
        error.contains("127.0.0.1:1"),
        "the address is named: {error}"
    );
}

/// The interactive shell, fed through a pipe: backslash commands, a
/// statement over several lines, errors that do not end it, and history.
fn check_cli_shell(url: &str, scratch: &std::path::Path) {
    let history = scratch.join("shell-history");
    let mut child = Command::new(binary("quiver"))
        .args(["--url", url, "--shell", "--format", "csv", "--history"])
        .arg(&history)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the shell");
    let input = [
        "\\d",
        "\\d nation",
        "SELECT n_name",
        "  FROM nation",
        "  WHERE n_nationkey = 7;",
        "\\timing on",
        "SELECT 'x;y' AS s; SELEC 1;",
        "\\d no_such_table",
        "\\format json",
        "SELECT 2 AS two;",
        // Refused at once (a misspelt option), and kept without its secret.
        "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION 's3://lake/t/'",
        "  OPTIONS ('aws.secret_acces_key' 'HistSecret99');",
        "\\q",
        "SELECT 'after quitting' AS never;",
    ];
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{}\n", input.join("\n")).as_bytes())
        .expect("write stdin");
    let output = child.wait_with_output().expect("shell output");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for expected in [
        "public,nation,BASE TABLE",
        "n_nationkey,Int64,YES",
        "n_name\nGERMANY\n",
        "Timing is on.",
        "s\nx;y\n",
        "{\"two\":2}",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in\n{stdout}");
    }
    assert!(!stdout.contains("after quitting"), "{stdout}");
    for expected in ["SELEC", "No table named 'no_such_table'", "1 rows in"] {
        assert!(stderr.contains(expected), "{expected:?} in\n{stderr}");
    }
    let history = std::fs::read_to_string(&history).expect("the history was saved");
    assert!(history.contains("WHERE n_nationkey = 7;"), "{history}");
    assert!(
        history.contains("'aws.secret_acces_key' '***'") && !history.contains("HistSecret99"),
        "{history}"
    );
}

fn quiver(args: &[&str]) -> std::process::Output {
    Command::new(binary("quiver"))
        .args(args)
        .output()
        .expect("run the cli")
}

/// `quiver job ...`, and Ctrl-C cancelling the job on the cluster.
fn check_cli_jobs(url: &str) {
    let submitted = quiver(&["--url", url, "job", "submit", "SELECT 42 AS answer"]);
    assert!(submitted.status.success(), "{submitted:?}");
    let job_id = String::from_utf8_lossy(&submitted.stdout).trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = quiver(&["--url", url, "--format", "csv", "job", "status", &job_id]);
        let text = String::from_utf8_lossy(&status.stdout).into_owned();
        if text.contains("SUCCEEDED") {
            assert!(text.starts_with("job_id,state,stages"), "{text}");
            // The history has the query: `job list` shows it, not the status.
            assert!(
                text.lines()
                    .next()
                    .is_some_and(|header| header.ends_with(",error"))
            );
            break;
        }
        assert!(Instant::now() < deadline, "job never succeeded: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let listed = quiver(&[
        "--url", url, "--format", "csv", "job", "list", "--limit", "5",
    ]);
    let text = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        text.lines()
            .any(|line| line.starts_with(&job_id) && line.ends_with(",SELECT 42 AS answer")),
        "{text}"
    );
    // A finished job keeps what each of its stages did.
    let stages = quiver(&[
        "--url", url, "--format", "csv", "job", "status", "--stages", &job_id,
    ]);
    let text = String::from_utf8_lossy(&stages.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"stage,tasks,task_ms_total,slowest_task_ms,slowest_task,rows_written,bytes_written"),
        "{text}"
    );
    let fields: Vec<&str> = lines
        .get(1)
        .map(|l| l.split(',').collect())
        .unwrap_or_default();
    assert_eq!((fields[0], fields[1], fields[5]), ("1", "1", "1"), "{text}");

    // Ctrl-C while a job runs cancels it on the cluster, and so does
    // SIGTERM (an orchestrator stopping the run), which then ends the CLI.
    let endless = "SELECT count(*), sum(value % 7) FROM range(1, 1000000000000)";
    for (signal, code) in [("INT", 130), ("TERM", 143)] {
        let child = Command::new(binary("quiver"))
            .args(["--url", url, "-c", endless])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cli");
        std::thread::sleep(Duration::from_millis(1500));
        common::processes::send_signal(child.id(), signal);
        let output = child.wait_with_output().expect("cli output");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{signal}: {stderr}");
        assert!(stderr.contains("cancelled"), "{signal}: {stderr}");
    }
    let listed = quiver(&[
        "--url", url, "--format", "csv", "job", "list", "--limit", "3",
    ]);
    let listing = String::from_utf8_lossy(&listed.stdout);
    let cancelled = listing
        .lines()
        .filter(|line| line.contains("CANCELLED") && line.contains("range(1, 1000000000000)"))
        .count();
    assert_eq!(cancelled, 2, "{listing}");

    // SET in a script changes the session for the statements after it.
    let started = Instant::now();
    let timed_out = cli(url, &format!("SET quiver.job_timeout_secs = 1; {endless}"))
        .expect_err("the job times out");
    assert!(timed_out.contains("timed out"), "{timed_out}");
    assert!(started.elapsed() < Duration::from_secs(30));

    // A result written to Parquet, read back by DataFusion's own reader.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("nations.parquet");
    let written = Command::new(binary("quiver"))
        .args([
            "--url",
            url,
            "-c",
            "SELECT n_nationkey, n_name FROM nation ORDER BY n_nationkey",
        ])
        .arg("--parquet")
        .arg(&file)
        .output()
        .expect("cli");
    assert!(written.status.success(), "{written:?}");
    assert!(
        String::from_utf8_lossy(&written.stderr).contains("wrote 25 rows"),
        "{written:?}"
    );
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(&file).expect("parquet file"),
    )
    .expect("a parquet file")
    .build()
    .expect("reader");
    let rows: usize = reader.map(|batch| batch.expect("batch").num_rows()).sum();
    assert_eq!(rows, 25);

    let unknown = quiver(&["--url", url, "job", "cancel", "no-such-job"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("unknown job"),
        "{unknown:?}"
    );
}
