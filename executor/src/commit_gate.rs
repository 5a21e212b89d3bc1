//! Asks the scheduler, over the control stream, whether a commit attempt may
//! change its table (see `quiver_core::write::permission`).
//!
//! A commit attempt sends a `CommitRequest` and waits for the `CommitAnswer`
//! to its task. The wait ends without permission when the control session
//! ends (its requests are closed) or the executor's lease runs out: an
//! executor cut off from the scheduler never commits. An allowed attempt may
//! act for the answer's `act_for_millis`, counted from before it asked: the
//! scheduler counts from when it answered, later, so the executor always
//! stops first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use quiver_core::lease::{Lease, LeaseTime};
use quiver_core::write::permission::CommitAuthority;
use quiver_proto::{CommitAnswer, CommitRequest, ExecutorMessage, TaskId, executor_message};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

/// How often a waiting commit checks the lease.
const LEASE_CHECK: Duration = Duration::from_millis(100);

/// A task attempt: job, stage, partition, attempt.
type AttemptKey = (String, u32, u32, u32);

fn attempt_key(task: &TaskId) -> AttemptKey {
    (
        task.job_id.clone(),
        task.stage_id,
        task.partition,
        task.attempt,
    )
}

/// The commit requests of one control session that await their answers.
#[derive(Debug)]
pub struct CommitRequests {
    outbound: UnboundedSender<ExecutorMessage>,
    /// `None` once the session is over.
    waiting: Mutex<Option<HashMap<AttemptKey, oneshot::Sender<CommitAnswer>>>>,
}

impl CommitRequests {
    pub fn new(outbound: UnboundedSender<ExecutorMessage>) -> Arc<Self> {
        Arc::new(Self {
            outbound,
            waiting: Mutex::new(Some(HashMap::new())),
        })
    }

    /// Hands the scheduler's answer to the attempt that waits for it.
    pub fn answer(&self, answer: CommitAnswer) {
        let Some(task) = &answer.task else {
            return;
        };
        let key = attempt_key(task);
        let waiter = self
            .lock()
            .as_mut()
            .and_then(|waiting| waiting.remove(&key));
        if let Some(waiter) = waiter {
            let _ = waiter.send(answer);
        }
    }

    /// Ends the session's requests: those waiting, and any made later, get
    /// no permission.
    pub fn close(&self) {
        self.lock().take();
    }

    /// Sends the request of `task`; the receiver gets the answer, or an
    /// error once the session is over.
    fn ask(&self, task: &TaskId, finishes: bool) -> oneshot::Receiver<CommitAnswer> {
        let (sender, receiver) = oneshot::channel();
        let mut waiting = self.lock();
        if let Some(waiting) = waiting.as_mut() {
            let request = ExecutorMessage {
                kind: Some(executor_message::Kind::CommitRequest(CommitRequest {
                    task: Some(task.clone()),
                    finishes,
                })),
            };
            if self.outbound.send(request).is_ok() {
                waiting.insert(attempt_key(task), sender);
            }
        }
        receiver
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<HashMap<AttemptKey, oneshot::Sender<CommitAnswer>>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The commit authority of one task attempt: the scheduler, asked through
/// the session that launched the task.
#[derive(Debug)]
pub struct TaskCommitGate {
    pub task: TaskId,
    pub requests: Arc<CommitRequests>,
    pub lease: Arc<Lease>,
}

#[async_trait]
impl CommitAuthority for TaskCommitGate {
    async fn allow(&self, finishes: bool) -> Result<Option<LeaseTime>, String> {
        let asked = LeaseTime::now();
        let mut answer = self.requests.ask(&self.task, finishes);
        loop {
            tokio::select! {
                answer = &mut answer => return match answer {
                    Ok(answer) if answer.allowed => Ok((answer.act_for_millis > 0)
                        .then(|| asked + Duration::from_millis(answer.act_for_millis))),
                    Ok(answer) => Err(answer.reason),
                    Err(_) => Err("the executor's session with the scheduler ended before \
                                   the scheduler answered".into()),
                },
                () = tokio::time::sleep(LEASE_CHECK) => {
                    self.lease.check().map_err(|expired| expired.to_string())?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use quiver_core::lease::LeaseTime;
    use tokio::sync::mpsc;

    use super::*;

    fn task(attempt: u32) -> TaskId {
        TaskId {
            job_id: "job".into(),
            stage_id: 2,
            partition: 0,
            attempt,
        }
    }

    fn gate(requests: &Arc<CommitRequests>, lease: Arc<Lease>) -> TaskCommitGate {
        TaskCommitGate {
            task: task(1),
            requests: Arc::clone(requests),
            lease,
        }
    }

    #[tokio::test]
    async fn a_commit_waits_for_the_answer_to_its_own_attempt() {
        let (outbound, mut sent) = mpsc::unbounded_channel();
        let requests = CommitRequests::new(outbound);
        let lease = Lease::until(LeaseTime::now() + Duration::from_secs(60));
        let gate = gate(&requests, lease);
        let asking = tokio::spawn(async move { gate.allow(false).await });
        let request = sent.recv().await.expect("a request goes out");
        assert!(matches!(
            request.kind,
            Some(executor_message::Kind::CommitRequest(CommitRequest { task: Some(ref t), finishes: false })) if *t == task(1)
        ));
        // Another attempt's answer is not this one's.
        requests.answer(CommitAnswer {
            task: Some(task(0)),
            allowed: true,
            ..CommitAnswer::default()
        });
        requests.answer(CommitAnswer {
            task: Some(task(1)),
            allowed: false,
            reason: "the job was cancelled".into(),
            ..CommitAnswer::default()
        });
        assert_eq!(
            asking.await.expect("joined"),
            Err("the job was cancelled".into())
        );
    }

    /// An allowed attempt may act for the answer's time, counted from
    /// before it asked; an answer without one sets no limit.
    #[tokio::test]
    async fn an_allowed_commit_acts_for_the_time_counted_from_its_question() {
        let (outbound, mut sent) = mpsc::unbounded_channel();
        let requests = CommitRequests::new(outbound);
        let lease = Lease::until(LeaseTime::now() + Duration::from_secs(60));
        for act_for_millis in [30_000, 0] {
            let gate = gate(&requests, Arc::clone(&lease));
            let before = LeaseTime::now();
            let asking = tokio::spawn(async move { gate.allow(false).await });
            sent.recv().await.expect("a request goes out");
            tokio::time::sleep(Duration::from_millis(20)).await;
            let answered = LeaseTime::now();
            requests.answer(CommitAnswer {
                task: Some(task(1)),
                allowed: true,
                act_for_millis,
                ..CommitAnswer::default()
            });
            let until = asking.await.expect("joined").expect("allowed");
            match until {
                Some(until) => {
                    assert!(until >= before + Duration::from_secs(30));
                    assert!(
                        until < answered + Duration::from_secs(30),
                        "counted from the question, not the answer"
                    );
                }
                None => assert_eq!(act_for_millis, 0),
            }
        }
    }

    #[tokio::test]
    async fn no_commit_is_allowed_once_the_session_or_the_lease_ends() {
        let (outbound, _sent) = mpsc::unbounded_channel();
        let requests = CommitRequests::new(outbound);
        let lease = Lease::until(LeaseTime::now() + Duration::from_secs(60));
        let waiting = gate(&requests, Arc::clone(&lease));
        let asking = tokio::spawn(async move { waiting.allow(false).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        requests.close();
        assert!(asking.await.expect("joined").is_err());
        assert!(
            gate(&requests, lease).allow(false).await.is_err(),
            "asked later"
        );

        let (outbound, _sent) = mpsc::unbounded_channel();
        let requests = CommitRequests::new(outbound);
        let short = Lease::until(LeaseTime::now() + Duration::from_millis(50));
        let error = gate(&requests, short)
            .allow(false)
            .await
            .expect_err("expired");
        assert!(!error.is_empty());
    }
}
