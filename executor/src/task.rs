//! Runs one task: decode its plan fragment, bind its shuffle readers to the map
//! outputs of its input stages, then run its shuffle writer.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::TaskContext;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec;
use quiver_core::codec::QuiverPhysicalCodec;
use quiver_core::config::session_config_from_settings;
use quiver_core::error::classify_failure;
use quiver_core::shuffle::{FlightClientPool, ShuffleEnv, ShuffleReaderExec, ShuffleWriterExec};
use quiver_proto::{
    ExecutorAddress, FailureKind, LaunchTask, MapOutput, StageInput, TaskFailed, TaskId,
    TaskStatus, TaskSucceeded, task_status,
};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::Result;
use crate::config::ExecutorConfig;
use crate::runtime::build_runtime;

/// Runs tasks and tracks the running ones so that they can be cancelled.
///
/// Every launched task reports exactly one status, `Cancelled` included: the
/// scheduler counts an executor's busy slots by those reports.
#[derive(Debug)]
pub struct TaskRunner {
    executor_id: String,
    shuffle_dir: PathBuf,
    runtime: Arc<RuntimeEnv>,
    clients: FlightClientPool,
    /// Sending on (or dropping) a task's sender cancels it.
    running: Mutex<HashMap<TaskKey, oneshot::Sender<()>>>,
}

type TaskKey = (String, u32, u32, u32);

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
        Ok(Self {
            executor_id: config.executor_id.clone(),
            shuffle_dir: config.shuffle_dir(),
            runtime: build_runtime(config)?,
            clients: FlightClientPool::default(),
            running: Mutex::default(),
        })
    }

    pub fn shuffle_dir(&self) -> &PathBuf {
        &self.shuffle_dir
    }

    pub fn running_tasks(&self) -> usize {
        self.lock_running().len()
    }

    /// Starts a task in the background; `report` receives its final status.
    pub fn launch(
        self: &Arc<Self>,
        launch: LaunchTask,
        address: ExecutorAddress,
        report: impl FnOnce(TaskStatus) + Send + 'static,
    ) {
        let task = launch.task.clone().unwrap_or_default();
        let key = task_key(&task);
        let runner = Arc::clone(self);
        let (cancel, cancelled) = oneshot::channel::<()>();
        self.lock_running().insert(key, cancel);
        tokio::spawn(async move {
            let started = Instant::now();
            // Dropping the run future stops its DataFusion streams.
            let outcome = tokio::select! {
                result = runner.run(launch, address) => Some(result),
                _ = cancelled => None,
            };
            runner.lock_running().remove(&task_key(&task));
            let result = match outcome {
                Some(Ok(output)) => task_status::Result::Succeeded(TaskSucceeded {
                    output: Some(output),
                    elapsed_micros: started.elapsed().as_micros() as u64,
                }),
                Some(Err(error)) => {
                    let kind = classify_failure(&error);
                    warn!(job_id = %task.job_id, stage = task.stage_id, partition = task.partition,
                        attempt = task.attempt, ?kind, %error, "task failed");
                    task_status::Result::Failed(TaskFailed {
                        kind: kind.into(),
                        message: error.to_string(),
                    })
                }
                None => task_status::Result::Failed(TaskFailed {
                    kind: FailureKind::Cancelled.into(),
                    message: "task cancelled".into(),
                }),
            };
            report(TaskStatus {
                task: Some(task),
                result: Some(result),
            });
        });
    }

    /// Cancels every running task of a job. Returns how many were running.
    pub fn cancel_job(&self, job_id: &str) -> usize {
        let mut running = self.lock_running();
        let before = running.len();
        // Dropping a task's sender cancels it.
        running.retain(|key, _| key.0 != job_id);
        before - running.len()
    }

    /// Cancels every running task, e.g. when the scheduler connection is lost.
    pub fn cancel_all(&self) {
        self.lock_running().clear();
    }

    async fn run(&self, launch: LaunchTask, address: ExecutorAddress) -> DfResult<MapOutput> {
        let task = launch.task.unwrap_or_default();
        let context = self.task_context(&launch.settings, &task)?;
        let plan_bytes = launch.plan;
        let decode_context = Arc::clone(&context);
        let plan = tokio::task::spawn_blocking(move || {
            physical_plan_from_bytes_with_extension_codec(
                &plan_bytes,
                &decode_context,
                &QuiverPhysicalCodec,
            )
        })
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
        let partitions = writer
            .write(
                task.partition as usize,
                task.attempt,
                context,
                &self.shuffle_dir,
            )
            .await?;
        Ok(MapOutput {
            map_partition: task.partition,
            executor: Some(address),
            attempt: task.attempt,
            partitions,
        })
    }

    fn task_context(
        &self,
        settings: &[quiver_proto::Setting],
        task: &TaskId,
    ) -> DfResult<Arc<TaskContext>> {
        let config = session_config_from_settings(settings)?.with_extension(Arc::new(ShuffleEnv {
            executor_id: self.executor_id.clone(),
            work_dir: self.shuffle_dir.clone(),
            clients: self.clients.clone(),
        }));
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(Arc::clone(&self.runtime))
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
