//! Runs SQL statements: splits scripts, shows a progress line on a terminal,
//! and cancels the job on the cluster when the user presses Ctrl-C, or when
//! the CLI is told to stop (SIGTERM, as an orchestrator such as Airflow or
//! Kubernetes sends to stop a run: its job must not run on unowned).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use futures::TryStreamExt;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use quiver_client::QuiverContext;
use quiver_client::job::CancelOutcome;
use quiver_client::output::{Format, write_batches};
use quiver_core::metrics::human_bytes;
use quiver_proto::{JobState, JobStatus};

use crate::jobs::{committing_note, settling_note};

/// Exit code of a CLI stopped by SIGTERM, as shells report it.
const TERMINATED: i32 = 128 + 15;

/// Whether a statement is running, and whether SIGTERM came.
static RUNNING: AtomicBool = AtomicBool::new(false);
static TERMINATING: LazyLock<tokio::sync::watch::Sender<bool>> =
    LazyLock::new(|| tokio::sync::watch::Sender::new(false));

/// Makes SIGTERM stop the CLI as it would have stopped it by default, but
/// for a running statement, whose job is cancelled on the cluster first.
pub fn stop_on_terminate() {
    #[cfg(unix)]
    tokio::spawn(async {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut terminate) = signal(SignalKind::terminate()) else {
            return;
        };
        terminate.recv().await;
        TERMINATING.send_replace(true);
        // A statement that runs sees the flag and exits once it has
        // cancelled its job; one that has just ended, as it returns.
        if !RUNNING.load(Ordering::SeqCst) {
            std::process::exit(TERMINATED);
        }
    });
}

/// Completes once SIGTERM has come.
async fn terminating() {
    let mut flag = TERMINATING.subscribe();
    let _ = flag.wait_for(|terminating| *terminating).await;
}

/// Exits if SIGTERM came while a statement ran.
fn exit_if_terminating() {
    RUNNING.store(false, Ordering::SeqCst);
    if *TERMINATING.borrow() {
        std::process::exit(TERMINATED);
    }
}

/// How one statement ended, when it did not fail.
pub enum Outcome {
    Done,
    /// The user pressed Ctrl-C and the job was cancelled on the cluster.
    Interrupted,
}

/// Where a statement's result goes.
pub enum Sink<'a> {
    /// Printed on stdout.
    Print(Format),
    /// Written to a Parquet file (zstd), replaced atomically.
    Parquet(&'a Path),
}

/// Runs one statement and prints or writes its result.
pub async fn run_statement(
    context: &QuiverContext,
    statement: &str,
    sink: Sink<'_>,
    timing: bool,
) -> Result<Outcome, String> {
    let started = Instant::now();
    let show_progress = std::io::stderr().is_terminal();
    let job_id = Arc::new(Mutex::new(None::<String>));
    let seen_id = Arc::clone(&job_id);
    let execution = async {
        let stream = context
            .execute_sql(statement, move |status| {
                seen_id
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_or_insert_with(|| status.job_id.clone());
                if show_progress {
                    print_progress(status, started);
                }
            })
            .await
            .map_err(|e| e.to_string())?;
        let schema = stream.schema();
        let batches: Vec<_> = stream.try_collect().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((schema, batches))
    };
    // Kept alive through the Ctrl-C branch: dropping it would cancel the job
    // in the background, racing the cancellation that is reported below.
    tokio::pin!(execution);
    RUNNING.store(true, Ordering::SeqCst);
    let cancel = |job_id: &Mutex<Option<String>>| {
        clear_progress(show_progress);
        let job_id = job_id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        cancel_on_cluster(context, job_id)
    };
    let outcome = tokio::select! {
        outcome = &mut execution => outcome,
        _ = tokio::signal::ctrl_c() => {
            cancel(&job_id).await;
            exit_if_terminating();
            return Ok(Outcome::Interrupted);
        }
        _ = terminating() => {
            cancel(&job_id).await;
            std::process::exit(TERMINATED);
        }
    };
    exit_if_terminating();
    clear_progress(show_progress);
    let (schema, batches) = outcome?;
    match sink {
        Sink::Print(format) => {
            let mut stdout = std::io::stdout().lock();
            write_batches(&mut stdout, format, &schema, &batches).map_err(|e| e.to_string())?;
            stdout.flush().map_err(|e| e.to_string())?;
        }
        Sink::Parquet(path) => {
            let rows = write_parquet(path, &schema, &batches)?;
            eprintln!("wrote {rows} rows to {}", path.display());
        }
    }
    if timing {
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        eprintln!("{rows} rows in {:.3}s", started.elapsed().as_secs_f64());
    }
    Ok(Outcome::Done)
}

/// Writes `batches` to `path` through a temporary file, so that a failed
/// write never leaves a partial file under the name asked for.
fn write_parquet(
    path: &Path,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<usize, String> {
    let tmp = path.with_extension("parquet.tmp");
    let failed = |e: &dyn std::fmt::Display| format!("cannot write {}: {e}", path.display());
    let write = || -> Result<usize, String> {
        let file = std::fs::File::create(&tmp).map_err(|e| failed(&e))?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build();
        let mut writer = ArrowWriter::try_new(file, Arc::clone(schema), Some(properties))
            .map_err(|e| failed(&e))?;
        for batch in batches {
            writer.write(batch).map_err(|e| failed(&e))?;
        }
        writer.close().map_err(|e| failed(&e))?;
        std::fs::rename(&tmp, path).map_err(|e| failed(&e))?;
        Ok(batches.iter().map(RecordBatch::num_rows).sum())
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

async fn cancel_on_cluster(context: &QuiverContext, job_id: Option<String>) {
    let Some(job_id) = job_id else {
        eprintln!("interrupted before the job was submitted");
        return;
    };
    match tokio::time::timeout(Duration::from_secs(5), context.cancel_job(&job_id)).await {
        Ok(Ok(CancelOutcome::Cancelled)) => eprintln!("job {job_id} cancelled"),
        Ok(Ok(CancelOutcome::Committing)) => eprintln!("{}", committing_note(&job_id)),
        Ok(Ok(CancelOutcome::Settling)) => eprintln!("{}", settling_note(&job_id)),
        Ok(Ok(CancelOutcome::Ended)) => eprintln!("job {job_id} had already ended"),
        Ok(Err(e)) => eprintln!("could not cancel job {job_id}: {e}"),
        Err(_) => eprintln!("could not cancel job {job_id}: the scheduler did not answer"),
    }
}

fn clear_progress(shown: bool) {
    if shown {
        eprint!("\r\x1b[2K");
    }
}

/// One line, rewritten in place: where the job is and what it has done so far.
fn print_progress(status: &JobStatus, started: Instant) {
    if started.elapsed() < Duration::from_millis(500) {
        return;
    }
    let elapsed = started.elapsed().as_secs_f64();
    if status.state() == JobState::Queued {
        eprint!(
            "\r\x1b[2Kqueued: {} jobs ahead, {elapsed:.1}s",
            status.queue_position
        );
        return;
    }
    let into_tables = if status.table_files_written > 0 {
        format!(
            ", {} files of {} written to tables",
            status.table_files_written,
            human_bytes(status.table_bytes_written)
        )
    } else {
        String::new()
    };
    let replanned = match status.replans {
        0 => String::new(),
        1 => ", planned again once: a table it reads was rewritten".to_owned(),
        n => format!(", planned again {n} times: tables it reads were rewritten"),
    };
    let committing = if status.committing {
        ", committing"
    } else {
        ""
    };
    eprint!(
        "\r\x1b[2Kstages {}/{} done, {} tasks running, {} rows and {} shuffled, {} read from storage{into_tables}{replanned}{committing}, {elapsed:.1}s",
        status.stages_done,
        status.stages_total,
        status.tasks_running,
        status.rows_written,
        human_bytes(status.bytes_written),
        human_bytes(status.store_bytes_read),
    );
}

/// Splits a script into statements at semicolons outside quotes and comments.
pub fn split_statements(script: &str) -> Vec<String> {
    let (mut statements, rest) = split_terminated(script);
    if !rest.is_empty() {
        statements.push(rest);
    }
    statements
}

/// Splits off the statements of `script` that a semicolon ends (outside
/// quotes and comments), and returns them with what is left unterminated.
pub fn split_terminated(script: &str) -> (Vec<String>, String) {
    let mut statements = Vec::new();
    let mut current = String::new();
    let mut chars = script.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                current.push(c);
                if c == q {
                    quote = None;
                }
            }
            None => match c {
                '\'' | '"' => {
                    quote = Some(c);
                    current.push(c);
                }
                '-' if chars.peek() == Some(&'-') => {
                    for skipped in chars.by_ref() {
                        if skipped == '\n' {
                            current.push('\n');
                            break;
                        }
                    }
                }
                ';' => statements.push(std::mem::take(&mut current)),
                _ => current.push(c),
            },
        }
    }
    let statements = statements
        .into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    // An open quote keeps its text as typed, trailing newlines included.
    let rest = if quote.is_some() {
        current.trim_start().to_owned()
    } else {
        current.trim().to_owned()
    };
    (statements, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_outside_quotes_and_comments() {
        let script = "select 'a;b'; -- c; d\nselect \"x;\" from t;\n\n";
        assert_eq!(
            split_statements(script),
            vec!["select 'a;b'", "select \"x;\" from t"]
        );
    }

    #[test]
    fn unterminated_text_is_kept_for_the_next_line() {
        let (done, rest) = split_terminated("select 1; select\n 'a;");
        assert_eq!(done, vec!["select 1"]);
        assert_eq!(rest, "select\n 'a;");
        let (done, rest) = split_terminated("select 'a;\nb'; -- note;\n");
        assert_eq!(done, vec!["select 'a;\nb'"]);
        assert_eq!(rest, "");
    }
}
