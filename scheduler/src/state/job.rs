//! The state of one job: its stages, and every task's attempts and output.
//! Pure state machine, driven by the event loop; it never does I/O.

use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use quiver_proto::{
    FailureKind, JobState, JobStatus, LaunchTask, MapOutput, Setting, StageInput, TaskId,
};

use crate::stages::StagePlan;

/// First retry delay; doubled on each further attempt.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    Pending,
    Running { executor_id: String },
    Done,
}

#[derive(Debug)]
pub struct Task {
    pub state: TaskState,
    /// The current attempt when running; the next one when pending.
    pub attempt: u32,
    pub output: Option<MapOutput>,
    /// A retry waits until then.
    pub not_before: Instant,
    /// Executor on which the previous attempt failed; avoided when possible.
    pub avoid: Option<String>,
}

#[derive(Debug)]
pub struct Stage {
    pub id: u32,
    pub plan: Bytes,
    pub inputs: Vec<u32>,
    pub tasks: Vec<Task>,
}

impl Stage {
    pub fn is_complete(&self) -> bool {
        self.tasks.iter().all(|task| task.state == TaskState::Done)
    }
}

/// What a status report did to the job.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Continue,
    Succeeded,
    Failed(String),
}

#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub seq: u64,
    pub settings: Vec<Setting>,
    pub max_attempts: u32,
    /// Indexed by `stage_id - 1`; the last stage is the final one.
    pub stages: Vec<Stage>,
    pub running: usize,
    pub started: Instant,
    pub state: JobState,
    pub error: String,
}

impl Job {
    pub fn new(
        id: String,
        seq: u64,
        settings: Vec<Setting>,
        max_attempts: u32,
        stages: &[StagePlan],
        encoded: Vec<Bytes>,
        now: Instant,
    ) -> Self {
        let stages = stages
            .iter()
            .zip(encoded)
            .map(|(stage, plan)| Stage {
                id: stage.stage_id,
                plan,
                inputs: stage.inputs.clone(),
                tasks: (0..stage.partitions())
                    .map(|_| Task {
                        state: TaskState::Pending,
                        attempt: 0,
                        output: None,
                        not_before: now,
                        avoid: None,
                    })
                    .collect(),
            })
            .collect();
        Self {
            id,
            seq,
            settings,
            max_attempts: max_attempts.max(1),
            stages,
            running: 0,
            started: now,
            state: JobState::Running,
            error: String::new(),
        }
    }

    fn stage(&self, stage_id: u32) -> Option<&Stage> {
        self.stages.get(stage_id.checked_sub(1)? as usize)
    }

    fn stage_mut(&mut self, stage_id: u32) -> Option<&mut Stage> {
        self.stages.get_mut(stage_id.checked_sub(1)? as usize)
    }

    fn final_stage(&self) -> Option<&Stage> {
        self.stages.last()
    }

    fn inputs_complete(&self, stage: &Stage) -> bool {
        stage
            .inputs
            .iter()
            .all(|input| self.stage(*input).is_some_and(Stage::is_complete))
    }

    /// A pending task whose inputs are all available, earliest stage first.
    /// Returns it with the executor its last attempt failed on.
    pub fn next_runnable(&self, now: Instant) -> Option<(u32, usize, Option<&str>)> {
        self.stages
            .iter()
            .filter(|stage| self.inputs_complete(stage))
            .find_map(|stage| {
                stage
                    .tasks
                    .iter()
                    .position(|task| task.state == TaskState::Pending && task.not_before <= now)
                    .map(|partition| {
                        let avoid = stage.tasks[partition].avoid.as_deref();
                        (stage.id, partition, avoid)
                    })
            })
    }

    /// Marks a task running on `executor_id` and builds its launch message.
    pub fn launch(
        &mut self,
        stage_id: u32,
        partition: usize,
        executor_id: &str,
    ) -> Option<LaunchTask> {
        let inputs: Vec<StageInput> = self
            .stage(stage_id)?
            .inputs
            .iter()
            .filter_map(|input| self.stage(*input))
            .map(|input| StageInput {
                stage_id: input.id,
                outputs: input
                    .tasks
                    .iter()
                    .filter_map(|t| t.output.clone())
                    .collect(),
            })
            .collect();
        let job_id = self.id.clone();
        let settings = self.settings.clone();
        let stage = self.stage_mut(stage_id)?;
        let plan = stage.plan.clone();
        let task = stage.tasks.get_mut(partition)?;
        task.state = TaskState::Running {
            executor_id: executor_id.to_owned(),
        };
        let attempt = task.attempt;
        self.running += 1;
        Some(LaunchTask {
            task: Some(TaskId {
                job_id,
                stage_id,
                partition: partition as u32,
                attempt,
            }),
            plan,
            inputs,
            settings,
        })
    }

    /// Takes the running task that `id` reports on out of the running state,
    /// if the report is current: a stale attempt's report changes nothing.
    fn finish_running(&mut self, id: &TaskId) -> Option<(&mut Task, String)> {
        let task = self
            .stage_mut(id.stage_id)?
            .tasks
            .get_mut(id.partition as usize)?;
        let executor_id = match &task.state {
            TaskState::Running { executor_id } if task.attempt == id.attempt => executor_id.clone(),
            _ => return None,
        };
        task.state = TaskState::Pending;
        self.running -= 1;
        let task = self
            .stage_mut(id.stage_id)?
            .tasks
            .get_mut(id.partition as usize)?;
        Some((task, executor_id))
    }

    pub fn on_success(&mut self, id: &TaskId, output: MapOutput) -> Outcome {
        let Some((task, _)) = self.finish_running(id) else {
            return Outcome::Continue;
        };
        task.state = TaskState::Done;
        task.output = Some(output);
        if self.final_stage().is_some_and(Stage::is_complete) {
            self.state = JobState::Succeeded;
            Outcome::Succeeded
        } else {
            Outcome::Continue
        }
    }

    pub fn on_failure(
        &mut self,
        id: &TaskId,
        kind: FailureKind,
        message: &str,
        now: Instant,
    ) -> Outcome {
        let max_attempts = self.max_attempts;
        let Some((task, executor_id)) = self.finish_running(id) else {
            return Outcome::Continue;
        };
        let retryable = matches!(kind, FailureKind::Retryable | FailureKind::FetchFailed);
        let next_attempt = id.attempt + 1;
        if !retryable || next_attempt >= max_attempts {
            let message = if retryable {
                format!(
                    "task {}/{} failed after {next_attempt} attempts: {message}",
                    id.stage_id, id.partition
                )
            } else {
                message.to_owned()
            };
            return self.fail(message);
        }
        task.attempt = next_attempt;
        task.not_before = now + RETRY_BACKOFF * 2u32.saturating_pow(id.attempt);
        task.avoid = Some(executor_id);
        Outcome::Continue
    }

    /// Reschedules what was lost with an executor: its running tasks, and the map
    /// outputs it held that a stage still needs (recomputed from lineage).
    pub fn on_executor_lost(&mut self, executor_id: &str, now: Instant) {
        let needed: Vec<bool> = (0..self.stages.len())
            .map(|index| {
                let stage_id = index as u32 + 1;
                index + 1 == self.stages.len()
                    || self
                        .stages
                        .iter()
                        .any(|s| s.inputs.contains(&stage_id) && !s.is_complete())
            })
            .collect();
        for (stage, needed) in self.stages.iter_mut().zip(needed) {
            for task in &mut stage.tasks {
                let on_lost = match &task.state {
                    TaskState::Running { executor_id: e } => e == executor_id,
                    TaskState::Done => {
                        needed
                            && task
                                .output
                                .as_ref()
                                .and_then(|o| o.executor.as_ref())
                                .is_some_and(|e| e.executor_id == executor_id)
                    }
                    TaskState::Pending => false,
                };
                if on_lost {
                    if matches!(task.state, TaskState::Running { .. }) {
                        self.running -= 1;
                    }
                    task.state = TaskState::Pending;
                    task.output = None;
                    task.attempt += 1;
                    task.not_before = now;
                    task.avoid = Some(executor_id.to_owned());
                }
            }
        }
    }

    pub fn fail(&mut self, message: String) -> Outcome {
        self.state = JobState::Failed;
        self.error.clone_from(&message);
        Outcome::Failed(message)
    }

    pub fn cancel(&mut self) {
        self.state = JobState::Cancelled;
        self.error = "job cancelled".into();
    }

    /// Executors that hold or compute data of this job.
    pub fn executors(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .stages
            .iter()
            .flat_map(|stage| &stage.tasks)
            .filter_map(|task| match &task.state {
                TaskState::Running { executor_id } => Some(executor_id.clone()),
                _ => task
                    .output
                    .as_ref()
                    .and_then(|o| o.executor.as_ref())
                    .map(|e| e.executor_id.clone()),
            })
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    pub fn status(&self) -> JobStatus {
        let result = if self.state == JobState::Succeeded {
            self.final_stage()
                .map(|stage| {
                    stage
                        .tasks
                        .iter()
                        .filter_map(|t| t.output.clone())
                        .collect()
                })
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        JobStatus {
            job_id: self.id.clone(),
            state: self.state.into(),
            stages_total: self.stages.len() as u32,
            stages_done: self.stages.iter().filter(|s| s.is_complete()).count() as u32,
            tasks_running: self.running as u32,
            error: self.error.clone(),
            result,
            elapsed_micros: self.started.elapsed().as_micros() as u64,
            result_stage: self.final_stage().map_or(0, |stage| stage.id),
        }
    }
}
