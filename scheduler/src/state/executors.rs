//! The executors the scheduler knows: their address, slots and control stream.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use quiver_proto::{ExecutorAddress, ExecutorInfo, SchedulerMessage};
use tokio::sync::mpsc::UnboundedSender;
use tonic::Status;

/// Messages to one executor's control stream.
pub type ExecutorSender = UnboundedSender<Result<SchedulerMessage, Status>>;

#[derive(Debug)]
pub struct ExecutorEntry {
    pub address: ExecutorAddress,
    pub slots: usize,
    pub running: usize,
    /// Identifies the control stream; a stale stream's disconnect is ignored.
    pub connection: u64,
    pub sender: ExecutorSender,
    pub last_seen: Instant,
    /// Shutting down gracefully: gets no new tasks.
    pub draining: bool,
}

impl ExecutorEntry {
    /// Slots open to new tasks; none while draining.
    pub fn free_slots(&self) -> usize {
        if self.draining {
            0
        } else {
            self.slots.saturating_sub(self.running)
        }
    }

    pub fn info(&self) -> ExecutorInfo {
        ExecutorInfo {
            address: Some(self.address.clone()),
            slots: self.slots as u32,
            running_tasks: self.running as u32,
            draining: self.draining,
        }
    }

    /// Sends a message; false when the stream is gone.
    pub fn send(&self, message: SchedulerMessage) -> bool {
        self.sender.send(Ok(message)).is_ok()
    }
}

#[derive(Debug, Default)]
pub struct ExecutorRegistry {
    executors: HashMap<String, ExecutorEntry>,
}

impl ExecutorRegistry {
    /// Adds an executor; returns the entry it replaced (a re-registration).
    pub fn insert(&mut self, entry: ExecutorEntry) -> Option<ExecutorEntry> {
        self.executors
            .insert(entry.address.executor_id.clone(), entry)
    }

    pub fn get_mut(&mut self, executor_id: &str) -> Option<&mut ExecutorEntry> {
        self.executors.get_mut(executor_id)
    }

    /// Removes the executor if `connection` is still its current stream.
    pub fn remove_connection(
        &mut self,
        executor_id: &str,
        connection: u64,
    ) -> Option<ExecutorEntry> {
        if self.executors.get(executor_id)?.connection == connection {
            self.executors.remove(executor_id)
        } else {
            None
        }
    }

    pub fn remove(&mut self, executor_id: &str) -> Option<ExecutorEntry> {
        self.executors.remove(executor_id)
    }

    /// Executors silent for longer than `timeout`.
    pub fn expired(&self, now: Instant, timeout: Duration) -> Vec<String> {
        self.executors
            .values()
            .filter(|e| now.duration_since(e.last_seen) > timeout)
            .map(|e| e.address.executor_id.clone())
            .collect()
    }

    /// The executor with the most free slots, preferring any other than `avoid`.
    pub fn pick(&self, avoid: Option<&str>) -> Option<String> {
        let best = |skip: Option<&str>| {
            self.executors
                .values()
                .filter(|e| e.free_slots() > 0 && Some(e.address.executor_id.as_str()) != skip)
                .max_by_key(|e| {
                    (
                        e.free_slots(),
                        std::cmp::Reverse(e.address.executor_id.clone()),
                    )
                })
                .map(|e| e.address.executor_id.clone())
        };
        best(avoid).or_else(|| best(None))
    }

    pub fn has_free_slot(&self) -> bool {
        self.executors.values().any(|e| e.free_slots() > 0)
    }

    pub fn total_slots(&self) -> usize {
        self.executors.values().map(|e| e.slots).sum()
    }

    pub fn len(&self) -> usize {
        self.executors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.executors.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &ExecutorEntry> {
        self.executors.values()
    }

    /// Draining executors with no task left running.
    pub fn idle_draining(&self) -> Vec<String> {
        self.executors
            .values()
            .filter(|e| e.draining && e.running == 0)
            .map(|e| e.address.executor_id.clone())
            .collect()
    }
}
