//! Runs one task: decode its plan fragment, bind its shuffle readers to the map
//! outputs of its input stages, then run its shuffle writer.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::TaskContext;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::physical_plan::ExecutionPlan;
use quiver_core::codec::decode_physical_plan;
use quiver_core::config::session_config_from_settings;
use quiver_core::error::{classify_failure, fetch_failure};
use quiver_core::lease::Lease;
use quiver_core::metrics::{add_operator_metrics, operator_metrics};
use quiver_core::shuffle::durable;
use quiver_core::shuffle::layout::{MapOutputId, job_dir, validate_identifier};
use quiver_core::shuffle::{
    FlightClientPool, LocalOutputs, ShuffleEnv, ShuffleReaderExec, ShuffleWriterExec,
};
use quiver_core::storage::metered::{ReadMeter, metered_registry};
use quiver_core::storage::{StoreRegistry, redacted_error};
use quiver_core::write::TaskAttempt;
use quiver_core::write::permission::CommitPermission;
use quiver_core::write::sinks::check_unstaged_write_access;
use quiver_proto::{
    ExecutorAddress, FailureKind, LaunchTask, MapOutput, Metric, MetricKind, OperatorMetrics,
    PartitionStats, StageInput, StoreConfig, TaskFailed, TaskId, TaskStatus, TaskSucceeded,
    task_status,
};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::Result;
use crate::commit_gate::{CommitRequests, TaskCommitGate};
use crate::config::ExecutorConfig;
use crate::runtime::build_runtime;
use crate::scan_errors::explain_scan_failure;
use crate::threads::TaskThreads;

/// Runs tasks and tracks the running ones so that they can be cancelled.
///
/// Every launched task reports exactly one status, `Cancelled` included: the
/// scheduler counts an executor's busy slots by those reports.
#[derive(Debug)]
pub struct TaskRunner {
    executor_id: String,
    /// This executor's map outputs: small ones in memory, the rest in files.
    outputs: Arc<LocalOutputs>,
    runtime: Arc<RuntimeEnv>,
    /// The runtime's object stores, configured with the options tasks bring.
    stores: Arc<StoreRegistry>,
    clients: FlightClientPool,
    threads: TaskThreads,
    /// Jobs with cancelled tasks that have not stopped yet.
    stopping: Mutex<HashMap<String, StoppingJob>>,
    /// Sending on (or dropping) a task's sender cancels it.
    running: Mutex<HashMap<TaskKey, oneshot::Sender<()>>>,
}

type TaskKey = (String, u32, u32, u32);

#[derive(Debug, Default)]
struct StoppingJob {
    /// Cancelled tasks still running.
    tasks: usize,
    /// The job's data must go once they have stopped.
    remove_data: bool,
}

/// Deletes a job's shuffle folder in the background.
fn remove_job_dir(dir: PathBuf, job_id: String) {
    tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Ok(()) => info!(%job_id, "removed job shuffle data"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(%job_id, dir = %dir.display(), %e, "cannot remove job shuffle data"),
    });
}

fn task_key(task: &TaskId) -> TaskKey {
    (
        task.job_id.clone(),
        task.stage_id,
        task.partition,
        task.attempt,
    )
}

impl TaskRunner {
    pub fn new(config: &ExecutorConfig) -> Result<Self> {
        let stores = Arc::new(StoreRegistry::new());
        let runtime = build_runtime(config, Arc::clone(&stores))?;
        let outputs = LocalOutputs::new(
            config.shuffle_dir(),
            config.shuffle_memory_limit,
            Some(&runtime.memory_pool),
        );
        Ok(Self {
            executor_id: config.executor_id.clone(),
            outputs: Arc::new(outputs),
            runtime,
            stores,
            clients: FlightClientPool::default(),
            threads: TaskThreads::new(config.task_threads())
                .map_err(|source| crate::Error::TaskThreads { source })?,
            stopping: Mutex::default(),
            running: Mutex::default(),
        })
    }

    pub fn outputs(&self) -> &Arc<LocalOutputs> {
        &self.outputs
    }

    pub fn running_tasks(&self) -> usize {
        self.lock_running().len()
    }

    /// Jobs with a task running here.
    pub fn running_jobs(&self) -> std::collections::HashSet<String> {
        self.lock_running()
            .keys()
            .map(|(job_id, ..)| job_id.clone())
            .collect()
    }

    /// Starts a task in the background under `lease`, the lease of the
    /// control session that launched it; `report` receives its final status.
    pub fn launch(
        self: &Arc<Self>,
        launch: LaunchTask,
        address: ExecutorAddress,
        lease: Arc<Lease>,
        commits: Arc<CommitRequests>,
        report: impl FnOnce(TaskStatus) + Send + 'static,
    ) {
        let task = launch.task.clone().unwrap_or_default();
        let key = task_key(&task);
        let runner = Arc::clone(self);
        let (cancel, cancelled) = oneshot::channel::<()>();
        self.lock_running().insert(key, cancel);
        let execution = Arc::clone(&runner);
        let mut running = self
            .threads
            .spawn(async move { execution.run(launch, address, lease, commits).await });
        tokio::spawn(async move {
            let started = Instant::now();
            let job_id = task.job_id.clone();
            let outcome = tokio::select! {
                joined = &mut running => Some(joined.unwrap_or_else(|e| {
                    Err(DataFusionError::Execution(format!("task panicked: {e}")))
                })),
                _ = cancelled => {
                    // Aborting drops the task's DataFusion streams at its next
                    // yield; the report goes out now, whatever the task does.
                    running.abort();
                    None
                }
            };
            // Not in the map any more: the task was cancelled, whichever branch won.
            let cancelled = runner.lock_running().remove(&task_key(&task)).is_none();
            let aborted = outcome.is_none();
            let result = match outcome {
                Some(Ok((output, operators))) => task_status::Result::Succeeded(TaskSucceeded {
                    output: Some(output),
                    elapsed_micros: started.elapsed().as_micros() as u64,
                    operators,
                }),
                Some(Err(error)) => {
                    let kind = classify_failure(&error);
                    let message = redacted_error(&error);
                    warn!(job_id = %task.job_id, stage = task.stage_id, partition = task.partition,
                        attempt = task.attempt, ?kind, error = %message, "task failed");
                    task_status::Result::Failed(TaskFailed {
                        kind: kind.into(),
                        message,
                        fetch: fetch_failure(&error),
                    })
                }
                None => task_status::Result::Failed(TaskFailed {
                    kind: FailureKind::Cancelled.into(),
                    message: "task cancelled".into(),
                    fetch: None,
                }),
            };
            report(TaskStatus {
                task: Some(task),
                result: Some(result),
            });
            if aborted {
                // Wait until the task has really stopped: it may still write
                // shuffle files until then, which must not outlive its job.
                let _ = running.await;
            }
            if cancelled {
                runner.stopped_after_cancel(&job_id);
            }
        });
    }

    /// Cancels a job's tasks and deletes its shuffle data, now and again once
    /// its cancelled tasks have stopped writing.
    pub fn remove_job(&self, job_id: &str) {
        if let Err(e) = validate_identifier("job_id", job_id) {
            warn!(%e, "refusing to remove job data");
            return;
        }
        self.cancel_job(job_id);
        if let Some(stopping) = self.lock_stopping().get_mut(job_id) {
            stopping.remove_data = true;
        }
        self.outputs.remove_job(job_id);
        remove_job_dir(job_dir(self.outputs.work_dir(), job_id), job_id.to_owned());
    }

    fn stopped_after_cancel(&self, job_id: &str) {
        let mut stopping = self.lock_stopping();
        let Some(job) = stopping.get_mut(job_id) else {
            return;
        };
        job.tasks = job.tasks.saturating_sub(1);
        if job.tasks == 0 {
            let remove_data = job.remove_data;
            stopping.remove(job_id);
            if remove_data {
                self.outputs.remove_job(job_id);
                remove_job_dir(job_dir(self.outputs.work_dir(), job_id), job_id.to_owned());
            }
        }
    }

    fn note_cancelled(&self, cancelled: &[TaskKey]) {
        let mut stopping = self.lock_stopping();
        for (job_id, ..) in cancelled {
            stopping.entry(job_id.clone()).or_default().tasks += 1;
        }
    }

    fn lock_stopping(&self) -> std::sync::MutexGuard<'_, HashMap<String, StoppingJob>> {
        self.stopping
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Cancels every running task of a job. Returns how many were running.
    pub fn cancel_job(&self, job_id: &str) -> usize {
        self.cancel_where(|key| key.0 == job_id)
    }

    /// Cancels every running task, e.g. when the scheduler connection is lost.
    pub fn cancel_all(&self) {
        self.cancel_where(|_| true);
    }

    fn cancel_where(&self, selected: impl Fn(&TaskKey) -> bool) -> usize {
        let cancelled: Vec<TaskKey> = {
            let mut running = self.lock_running();
            let keys: Vec<TaskKey> = running
                .keys()
                .filter(|key| selected(key))
                .cloned()
                .collect();
            for key in &keys {
                // Dropping a task's sender cancels it.
                running.remove(key);
            }
            keys
        };
        self.note_cancelled(&cancelled);
        cancelled.len()
    }

    /// Runs a task to its end; returns its map output and what its operators measured.
    async fn run(
        &self,
        launch: LaunchTask,
        address: ExecutorAddress,
        lease: Arc<Lease>,
        commits: Arc<CommitRequests>,
    ) -> DfResult<(MapOutput, Vec<OperatorMetrics>)> {
        let launched = Instant::now();
        let task = launch.task.unwrap_or_default();
        let stores = self.task_stores(&launch.stores)?;
        let meter = Arc::new(ReadMeter::default());
        let gate = TaskCommitGate {
            task: task.clone(),
            requests: commits,
            lease: Arc::clone(&lease),
        };
        let context = self.task_context(
            &launch.settings,
            &task,
            &stores,
            &meter,
            Arc::clone(&lease),
            gate,
        )?;
        let plan_bytes = launch.plan;
        let decode_context = Arc::clone(&context);
        let plan =
            tokio::task::spawn_blocking(move || decode_physical_plan(&plan_bytes, &decode_context))
                .await
                .map_err(|e| DataFusionError::External(Box::new(e)))??;
        let plan = bind_inputs(plan, &launch.inputs)?;
        let writer = plan.downcast_ref::<ShuffleWriterExec>().ok_or_else(|| {
            DataFusionError::Internal(format!(
                "a task plan must have a shuffle writer at its root, found {}",
                plan.name()
            ))
        })?;
        debug!(job_id = %task.job_id, stage = task.stage_id, partition = task.partition, "task running");
        let launch_time = launched.elapsed();
        // A durable copy is uploaded from the output's files: any output
        // copied to the durable shuffle, and a write task's file list that
        // may turn out too large to come back inline.
        let outputs =
            if launch.durable_shuffle.is_empty() && launch.large_output_location.is_empty() {
                Arc::clone(&self.outputs)
            } else {
                Arc::new(LocalOutputs::on_disk(self.outputs.work_dir().to_owned()))
            };
        let runtime = context.runtime_env();
        // DataFusion's own sinks hide why the store refused them: the
        // folder is checked first, with this executor's credentials.
        check_unstaged_write_access(&plan, &runtime, &task.job_id).await?;
        let partitions = match writer
            .write(task.partition as usize, task.attempt, context, &outputs)
            .await
        {
            Ok(partitions) => partitions,
            Err(e) => {
                return Err(
                    explain_scan_failure(e, &plan, task.partition as usize, &runtime).await,
                );
            }
        };
        let inline_result = self
            .small_result(&task, &partitions, launch.inline_result_max_bytes)
            .await?;
        let copy_to = durable_copy_target(
            &launch.durable_shuffle,
            &launch.large_output_location,
            &partitions,
            &inline_result,
        );
        let (durable_location, upload) = match copy_to {
            None => (String::new(), None),
            Some(location) => {
                let started = Instant::now();
                let location = self.upload_output(&stores, location, &task, lease).await?;
                (location, Some(started.elapsed()))
            }
        };
        let times = TaskTimes {
            launch: launch_time,
            upload,
        };
        let mut operators = operator_metrics(&plan);
        add_operator_metrics(&mut operators, &[writer_metrics(&partitions, &times)]);
        let output = MapOutput {
            map_partition: task.partition,
            executor: Some(address),
            attempt: task.attempt,
            partitions,
            durable_location,
            store_bytes_read: meter.bytes(),
            store_requests: meter.requests(),
            inline_result,
        };
        Ok((output, operators))
    }

    /// The data file of a final-stage output of one partition and at most
    /// `max_bytes`, to return with the task's status; empty otherwise.
    async fn small_result(
        &self,
        task: &TaskId,
        partitions: &[PartitionStats],
        max_bytes: u64,
    ) -> DfResult<bytes::Bytes> {
        let [partition] = partitions else {
            return Ok(bytes::Bytes::new());
        };
        if partition.bytes == 0 || partition.bytes > max_bytes {
            return Ok(bytes::Bytes::new());
        }
        let id = MapOutputId::new(&task.job_id, task.stage_id, task.partition, task.attempt)?;
        let outputs = Arc::clone(&self.outputs);
        let data = tokio::task::spawn_blocking(move || outputs.data(&id))
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))??;
        Ok(data)
    }

    /// Copies a finished map output to durable storage; returns where it went.
    async fn upload_output(
        &self,
        stores: &StoreRegistry,
        shuffle_location: &str,
        task: &TaskId,
        lease: Arc<Lease>,
    ) -> DfResult<String> {
        let id = MapOutputId::new(&task.job_id, task.stage_id, task.partition, task.attempt)?;
        let location = durable::upload(
            stores,
            &id,
            shuffle_location,
            &id.data_path(self.outputs.work_dir()),
            &id.index_path(self.outputs.work_dir()),
            Some(lease),
        )
        .await?;
        Ok(location)
    }

    /// The stores of a task: those of the locations its job configured, each
    /// with the options that the job brings, whatever tasks of other jobs
    /// configure meanwhile (see [`StoreRegistry::pinned`]). The executor's
    /// registry keeps the latest options of each location, so that the next
    /// task with the same options shares the store rather than build it.
    fn task_stores(&self, stores: &[StoreConfig]) -> DfResult<Arc<StoreRegistry>> {
        let pinned = self.stores.pinned(stores)?;
        self.stores.remember(&pinned);
        Ok(Arc::new(pinned))
    }

    /// The task's context: the executor's runtime with the task's `stores`,
    /// whose reads are counted into `meter` and whose multipart APIs writes
    /// record uploads through, the job's settings, the session's lease, and
    /// the gate through which a commit asks the scheduler.
    fn task_context(
        &self,
        settings: &[quiver_proto::Setting],
        task: &TaskId,
        stores: &Arc<StoreRegistry>,
        meter: &Arc<ReadMeter>,
        lease: Arc<Lease>,
        gate: TaskCommitGate,
    ) -> DfResult<Arc<TaskContext>> {
        let metered = metered_registry(Arc::clone(stores) as _, Arc::clone(meter));
        let runtime = RuntimeEnvBuilder::from_runtime_env(&self.runtime)
            .with_object_store_registry(Arc::new(metered))
            .build_arc()?;
        let config = session_config_from_settings(settings)?
            .with_extension(Arc::new(ShuffleEnv {
                executor_id: self.executor_id.clone(),
                outputs: Arc::clone(&self.outputs),
                clients: self.clients.clone(),
                runtime: Arc::clone(&runtime),
            }))
            .with_extension(Arc::new(TaskAttempt {
                attempt: task.attempt,
            }))
            .with_extension(Arc::clone(stores))
            .with_extension(lease)
            .with_extension(Arc::new(CommitPermission(Arc::new(gate))));
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .with_session_id(task.job_id.clone())
            .build();
        Ok(state.task_ctx())
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<TaskKey, oneshot::Sender<()>>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Binds every shuffle reader of `plan` to the map outputs of its input stage.
fn bind_inputs(
    plan: Arc<dyn ExecutionPlan>,
    inputs: &[StageInput],
) -> DfResult<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        let Some(reader) = node.downcast_ref::<ShuffleReaderExec>() else {
            return Ok(Transformed::no(node));
        };
        let input = inputs
            .iter()
            .find(|input| input.stage_id == reader.stage_id())
            .ok_or_else(|| {
                DataFusionError::Internal(format!(
                    "task has no map outputs for input stage {}",
                    reader.stage_id()
                ))
            })?;
        let bound: Arc<dyn ExecutionPlan> = Arc::new(reader.bind(input.outputs.clone())?);
        Ok(Transformed::yes(bound))
    })
    .map(|transformed| transformed.data)
}

/// What the shuffle writer at a stage plan's root wrote, as its metrics.
/// Parts of a task's time outside its operators.
struct TaskTimes {
    /// From the launch message to running: decoding and binding the plan.
    launch: Duration,
    /// Copying the map output to durable storage, if it was.
    upload: Option<Duration>,
}

fn writer_metrics(partitions: &[PartitionStats], times: &TaskTimes) -> OperatorMetrics {
    let total = |value: fn(&PartitionStats) -> u64| partitions.iter().map(value).sum();
    let metric = |name: &str, value: u64, kind: MetricKind| Metric {
        name: name.into(),
        value,
        kind: kind.into(),
    };
    let nanos = |duration: Duration| duration.as_nanos() as u64;
    let mut metrics = vec![
        metric("output_rows", total(|stats| stats.rows), MetricKind::Count),
        metric(
            "shuffle_bytes_written",
            total(|stats| stats.bytes),
            MetricKind::Bytes,
        ),
        metric(
            "task_launch_time",
            nanos(times.launch),
            MetricKind::TimeNanos,
        ),
    ];
    if let Some(upload) = times.upload {
        metrics.push(metric(
            "durable_upload_time",
            nanos(upload),
            MetricKind::TimeNanos,
        ));
    }
    OperatorMetrics {
        operator: 0,
        metrics,
    }
}

/// Where a task's output is copied to outlive its executor: the job's
/// durable shuffle location (`shuffle_location`) if it has one; else, for a
/// write task's file list that did not come back inline, the table's
/// staging folder (`large_output_location`). None for an output that holds
/// nothing: readers skip it.
fn durable_copy_target<'a>(
    shuffle_location: &'a str,
    large_output_location: &'a str,
    partitions: &[PartitionStats],
    inline_result: &[u8],
) -> Option<&'a str> {
    if !shuffle_location.is_empty() {
        return Some(shuffle_location);
    }
    let holds_data = partitions.iter().any(|partition| partition.bytes > 0);
    (!large_output_location.is_empty() && inline_result.is_empty() && holds_data)
        .then_some(large_output_location)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_copied_where_they_must_outlive_the_executor() {
        let written = [PartitionStats {
            rows: 5_000,
            bytes: 2 << 20,
        }];
        let empty = [PartitionStats { rows: 0, bytes: 0 }];
        let staging = "s3://lake/t/_temporary";
        let shuffle = "s3://lake/shuffle";
        assert_eq!(
            durable_copy_target(shuffle, "", &written, &[]),
            Some(shuffle)
        );
        assert_eq!(
            durable_copy_target("", staging, &written, &[]),
            Some(staging),
            "a file list too large to come back inline"
        );
        assert_eq!(
            durable_copy_target("", staging, &written, &[1, 2]),
            None,
            "inline"
        );
        assert_eq!(
            durable_copy_target("", staging, &empty, &[]),
            None,
            "nothing to read"
        );
        assert_eq!(durable_copy_target("", "", &written, &[]), None);
    }
}
