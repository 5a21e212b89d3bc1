//! `quiver job ...`: submit a job without waiting, follow, cancel and list jobs.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use quiver_client::QuiverContext;
use quiver_client::job::CancelOutcome;
use quiver_client::output::{Format, write_batches};
use quiver_proto::{JobRecord, JobStatus, StageMetrics};

#[derive(Debug, clap::Subcommand)]
pub enum JobCommand {
    /// Submit SQL and print the job id at once, without waiting for the job.
    Submit {
        /// The statement to run.
        sql: String,
    },
    /// Print a job's status, running or finished.
    Status {
        job_id: String,
        /// Print one row per stage instead: its tasks, their time and the
        /// slowest one, and the rows and bytes it wrote.
        #[arg(long)]
        stages: bool,
        /// Wait until the job has ended: succeeded, failed or cancelled.
        #[arg(long)]
        wait: bool,
    },
    /// Cancel a running or queued job.
    Cancel { job_id: String },
    /// List the newest jobs of the scheduler's history.
    List {
        /// How many jobs (0 for all).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

pub async fn run(
    context: &QuiverContext,
    command: JobCommand,
    format: Format,
) -> Result<(), String> {
    match command {
        JobCommand::Submit { sql } => {
            let job = context.submit_sql(&sql).await.map_err(|e| e.to_string())?;
            println!("{}", job.job_id);
        }
        JobCommand::Status {
            job_id,
            stages,
            wait,
        } => {
            let status = if wait {
                context.wait_for_job(&job_id).await
            } else {
                context.job_status(&job_id).await
            }
            .map_err(|e| e.to_string())?;
            if stages {
                print_stages(&status, format)?;
            } else {
                print_jobs(&[(status, None)], format)?;
            }
        }
        JobCommand::Cancel { job_id } => {
            match context
                .cancel_job(&job_id)
                .await
                .map_err(|e| e.to_string())?
            {
                CancelOutcome::Cancelled => println!("job {job_id} cancelled"),
                CancelOutcome::Committing => println!("{}", committing_note(&job_id)),
                CancelOutcome::Settling => println!("{}", settling_note(&job_id)),
                CancelOutcome::Ended => return Err(format!("job {job_id} had already ended")),
            }
        }
        JobCommand::List { limit } => {
            let jobs: Vec<(JobStatus, Option<JobRecord>)> = context
                .list_jobs(limit)
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter_map(|mut record| Some((record.status.take()?, Some(record))))
                .collect();
            print_jobs(&jobs, format)?;
        }
    }
    Ok(())
}

/// Prints jobs as a table, CSV or JSON, one row per job; with their
/// queries when they come from the history (`job list`).
fn print_jobs(jobs: &[(JobStatus, Option<JobRecord>)], format: Format) -> Result<(), String> {
    let strings = |value: fn(&JobStatus, Option<&JobRecord>) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(
            jobs.iter()
                .map(|(status, record)| value(status, record.as_ref())),
        ))
    };
    let numbers = |value: fn(&JobStatus) -> u64| -> ArrayRef {
        Arc::new(UInt64Array::from_iter_values(
            jobs.iter().map(|(status, _)| value(status)),
        ))
    };
    let mut columns: Vec<(&str, ArrayRef)> = vec![
        ("job_id", strings(|s, _| s.job_id.clone())),
        ("state", strings(|s, _| state_name(s))),
        (
            "stages",
            strings(|s, _| format!("{}/{}", s.stages_done, s.stages_total)),
        ),
        ("tasks_running", numbers(|s| u64::from(s.tasks_running))),
        ("elapsed_ms", numbers(|s| s.elapsed_micros / 1000)),
        ("result_rows", numbers(|s| s.result_rows)),
        ("shuffle_bytes_written", numbers(|s| s.bytes_written)),
        ("store_bytes_read", numbers(|s| s.store_bytes_read)),
        ("table_files_written", numbers(|s| s.table_files_written)),
        ("table_bytes_written", numbers(|s| s.table_bytes_written)),
        ("replans", numbers(|s| u64::from(s.replans))),
        ("error", strings(|s, _| s.error.clone())),
    ];
    if jobs.iter().any(|(_, record)| record.is_some()) {
        columns.push((
            "query",
            strings(|_, record| record.map(|r| one_line(&r.query)).unwrap_or_default()),
        ));
    }
    print_columns(columns, format)
}

/// Prints a job's stages, one row each, from the metrics its tasks reported.
fn print_stages(status: &JobStatus, format: Format) -> Result<(), String> {
    let stages = &status.stages;
    let numbers = |value: &dyn Fn(&StageMetrics) -> u64| -> ArrayRef {
        Arc::new(UInt64Array::from_iter_values(stages.iter().map(value)))
    };
    // What the writer at the root of the stage plan (operator 0) wrote.
    let written = |name: &'static str| {
        move |stage: &StageMetrics| {
            stage
                .operators
                .iter()
                .filter(|operator| operator.operator == 0)
                .flat_map(|operator| &operator.metrics)
                .find(|metric| metric.name == name)
                .map_or(0, |metric| metric.value)
        }
    };
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("stage", numbers(&|s| u64::from(s.stage_id))),
        ("tasks", numbers(&|s| u64::from(s.tasks))),
        ("task_ms_total", numbers(&|s| s.task_micros_total / 1000)),
        (
            "slowest_task_ms",
            numbers(&|s| s.slowest_task_micros / 1000),
        ),
        (
            "slowest_task",
            Arc::new(StringArray::from_iter_values(stages.iter().map(|s| {
                // A stage of a failed or cancelled job may have none.
                if s.tasks == 0 {
                    return "no task finished".to_owned();
                }
                format!(
                    "partition {} on {}",
                    s.slowest_task_partition, s.slowest_task_executor
                )
            }))),
        ),
        ("rows_written", numbers(&written("output_rows"))),
        ("bytes_written", numbers(&written("shuffle_bytes_written"))),
    ];
    print_columns(columns, format)
}

fn print_columns(columns: Vec<(&str, ArrayRef)>, format: Format) -> Result<(), String> {
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|(name, array)| Field::new(*name, array.data_type().clone(), false))
            .collect::<Vec<_>>(),
    ));
    debug_assert!(
        schema
            .fields()
            .iter()
            .all(|f| f.data_type() != &DataType::Null)
    );
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        columns.into_iter().map(|(_, array)| array).collect(),
    )
    .map_err(|e| e.to_string())?;
    write_batches(&mut std::io::stdout().lock(), format, &schema, &[batch])
        .map_err(|e| e.to_string())
}

fn state_name(status: &JobStatus) -> String {
    let name = status
        .state()
        .as_str_name()
        .trim_start_matches("JOB_STATE_");
    match status.state() {
        quiver_proto::JobState::Queued => format!("QUEUED ({} ahead)", status.queue_position),
        // Running it again would add its rows twice.
        _ if status.write_committed => format!("{name} (WRITE COMMITTED)"),
        _ => name.to_owned(),
    }
}

/// A query on one line, shortened for a listing.
fn one_line(query: &str) -> String {
    let flat = query.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 60 {
        format!("{}...", flat.chars().take(57).collect::<String>())
    } else {
        flat
    }
}

/// What the CLI says when a cancel comes while a restarted scheduler
/// settles the job's write.
pub(crate) fn settling_note(job_id: &str) -> String {
    format!(
        "job {job_id} was interrupted by a scheduler restart, and its write is being settled: \
         it cannot be cancelled, and ends failed if the write is rolled back, succeeded if it \
         committed; `quiver job status --wait {job_id}` shows how it ended"
    )
}

/// What the CLI says when a cancel comes while the job's write commits.
pub(crate) fn committing_note(job_id: &str) -> String {
    format!(
        "job {job_id} is committing its write and is not stopped midway: it is cancelled \
         if the commit fails, and succeeds if it commits; `quiver job status --wait \
         {job_id}` shows how it ended"
    )
}
