//! Where a query's time goes on a Quiver cluster, from the job's own metrics.
//!
//! The client times the job from the outside (submission, the job itself, the
//! result stream); the job's stage metrics split the tasks' time inside:
//! launching, shuffle writing, shuffle reading (of which Flight transfers and
//! object-store reads), durable uploads, and the operators' own work, which
//! is what remains. Task times are summed over tasks, which run in parallel,
//! so they add up to more than the job's wall time; the critical path (the
//! slowest task of each stage, summed) is the part of the wall time that
//! tasks account for.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use quiver_client::QuiverContext;
use quiver_proto::{JobState, JobStatus, StageMetrics};
use serde::Serialize;

/// One run of one query, split.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryProfile {
    pub query: usize,
    pub rows: usize,
    /// End to end at the client.
    pub client_ms: f64,
    /// From the call until the job's first status: planning and submission.
    pub submit_ms: f64,
    /// The job from acceptance to success, on the scheduler's clock.
    pub job_ms: f64,
    /// From the job's success to the last result batch at the client.
    pub result_ms: f64,
    pub stages: usize,
    pub tasks: u32,
    /// Sum of the slowest task of each stage.
    pub critical_path_ms: f64,
    /// Summed over all tasks from here on.
    pub task_ms: f64,
    pub launch_ms: f64,
    pub shuffle_write_ms: f64,
    pub shuffle_read_ms: f64,
    /// The part of `shuffle_read_ms` spent on streams from other executors.
    pub flight_read_ms: f64,
    /// The part of `shuffle_read_ms` spent on durable copies in object storage.
    pub durable_read_ms: f64,
    pub durable_upload_ms: f64,
    pub shuffle_bytes_written: u64,
    pub flight_bytes_read: u64,
}

impl QueryProfile {
    /// Task time not spent launching, shuffling or uploading: the operators' work.
    pub fn operators_ms(&self) -> f64 {
        (self.task_ms
            - self.launch_ms
            - self.shuffle_write_ms
            - self.shuffle_read_ms
            - self.durable_upload_ms)
            .max(0.0)
    }

    /// Job time outside the critical path's tasks: scheduling latency
    /// between stages, and waits for free slots.
    pub fn between_tasks_ms(&self) -> f64 {
        (self.job_ms - self.critical_path_ms).max(0.0)
    }
}

/// Runs `sql` (TPC-H query `number`) once and splits its time.
pub async fn profile(
    context: &QuiverContext,
    number: usize,
    sql: &str,
) -> Result<QueryProfile, String> {
    #[derive(Default)]
    struct Seen {
        first: Option<Instant>,
        finished: Option<Instant>,
        last: Option<JobStatus>,
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let recorder = Arc::clone(&seen);
    let started = Instant::now();
    let stream = context
        .execute_sql(sql, move |status| {
            let mut seen = recorder.lock().unwrap_or_else(|e| e.into_inner());
            seen.first.get_or_insert_with(Instant::now);
            if status.state() == JobState::Succeeded {
                seen.finished.get_or_insert_with(Instant::now);
            }
            seen.last = Some(status.clone());
        })
        .await
        .map_err(|e| format!("Q{number}: {e}"))?;
    let batches: Vec<_> = stream
        .try_collect()
        .await
        .map_err(|e| format!("Q{number}: {e}"))?;
    let ended = Instant::now();
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    let status = seen
        .last
        .clone()
        .filter(|status| status.state() == JobState::Succeeded)
        .ok_or_else(|| format!("Q{number}: the job's final status never arrived"))?;
    let since = |from: Instant, to: Option<Instant>| to.map_or(0.0, |to| millis(to - from));
    let mut profile = QueryProfile {
        query: number,
        rows: batches.iter().map(|batch| batch.num_rows()).sum(),
        client_ms: millis(ended - started),
        submit_ms: since(started, seen.first),
        job_ms: status.elapsed_micros as f64 / 1000.0,
        result_ms: seen
            .finished
            .map_or(0.0, |finished| millis(ended - finished)),
        stages: status.stages.len(),
        ..QueryProfile::default()
    };
    for stage in &status.stages {
        add_stage(&mut profile, stage);
    }
    Ok(profile)
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn add_stage(profile: &mut QueryProfile, stage: &StageMetrics) {
    let total = |name: &str| -> u64 {
        stage
            .operators
            .iter()
            .flat_map(|operator| &operator.metrics)
            .filter(|metric| metric.name == name)
            .map(|metric| metric.value)
            .sum()
    };
    let nanos_ms = |name: &str| total(name) as f64 / 1e6;
    profile.tasks += stage.tasks;
    profile.critical_path_ms += stage.slowest_task_micros as f64 / 1000.0;
    profile.task_ms += stage.task_micros_total as f64 / 1000.0;
    profile.launch_ms += nanos_ms("task_launch_time");
    profile.shuffle_write_ms += nanos_ms("shuffle_write_time");
    profile.shuffle_read_ms += nanos_ms("shuffle_read_time");
    profile.flight_read_ms += nanos_ms("flight_read_time");
    profile.durable_read_ms += nanos_ms("durable_read_time");
    profile.durable_upload_ms += nanos_ms("durable_upload_time");
    profile.shuffle_bytes_written += total("shuffle_bytes_written");
    profile.flight_bytes_read += total("flight_bytes_read");
}

/// The profiles as a markdown table, one row per query and a total row.
pub fn markdown(profiles: &[QueryProfile]) -> String {
    let mut total = QueryProfile::default();
    for p in profiles {
        total.client_ms += p.client_ms;
        total.submit_ms += p.submit_ms;
        total.job_ms += p.job_ms;
        total.result_ms += p.result_ms;
        total.stages += p.stages;
        total.tasks += p.tasks;
        total.critical_path_ms += p.critical_path_ms;
        total.task_ms += p.task_ms;
        total.launch_ms += p.launch_ms;
        total.shuffle_write_ms += p.shuffle_write_ms;
        total.shuffle_read_ms += p.shuffle_read_ms;
        total.flight_read_ms += p.flight_read_ms;
        total.durable_read_ms += p.durable_read_ms;
        total.durable_upload_ms += p.durable_upload_ms;
        total.shuffle_bytes_written += p.shuffle_bytes_written;
        total.flight_bytes_read += p.flight_bytes_read;
    }
    let mut out = String::from(
        "| query | client | submit | job | result | between tasks | stages/tasks | \
         task time | launch | shuffle write | shuffle read | of which Flight | \
         operators | shuffled | over Flight |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let row = |label: String, p: &QueryProfile| {
        format!(
            "| {label} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {}/{} | {:.1} | {:.1} | {:.1} | \
             {:.1} | {:.1} | {:.1} | {:.1} MiB | {:.1} MiB |\n",
            p.client_ms,
            p.submit_ms,
            p.job_ms,
            p.result_ms,
            p.between_tasks_ms(),
            p.stages,
            p.tasks,
            p.task_ms,
            p.launch_ms,
            p.shuffle_write_ms,
            p.shuffle_read_ms,
            p.flight_read_ms,
            p.operators_ms(),
            mib(p.shuffle_bytes_written),
            mib(p.flight_bytes_read),
        )
    };
    for p in profiles {
        out.push_str(&row(format!("Q{}", p.query), p));
    }
    out.push_str(&row("total".into(), &total));
    out
}
