//! The queue port: how workers are handed jobs.
//!
//! Messages are put on the queue by the metadata repository (in the same transaction as the
//! job row); workers receive them, and acknowledge only once the job's outcome is durable.
//! Delivery is at-least-once: a worker that dies without acknowledging leaves its message to
//! be delivered again once its lock lapses.

mod embedded;
pub mod kafka;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::lifecycle::JobId;

pub use embedded::{ConsumerLock, EmbeddedQueue};

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue backend error: {0}")]
    Backend(String),
}

impl From<sqlx::Error> for QueueError {
    fn from(e: sqlx::Error) -> Self {
        Self::Backend(e.to_string())
    }
}

/// Whether the queue still holds messages the workers have not consumed: the reconciler
/// announces overdue `pending` jobs again only once it does not (their messages may be in
/// that backlog). A queue that lives in the database needs no such probe.
#[async_trait]
pub trait Backlog: Send + Sync + 'static {
    /// Messages the workers have not consumed yet.
    async fn lag(&self) -> Result<u64, QueueError>;
}

/// One message handed to one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub job_id: JobId,
    /// 1 for the first attempt, then one more per retry.
    pub attempt: u32,
    /// Identifies this hand-over to the backend (lock owner, offset, …).
    pub token: String,
    /// The W3C `traceparent` the message carried (Kafka; the embedded queue's jobs carry
    /// theirs in their row).
    pub traceparent: Option<String>,
}

#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Wait for the next message that is due. Cancel-safe.
    async fn receive(&self) -> Result<Delivery, QueueError> {
        let mut deliveries = self.receive_many(1).await?;
        deliveries.pop().ok_or_else(|| QueueError::Backend("the queue handed over nothing".into()))
    }

    /// Wait until a message is due, then take it and up to `max - 1` more that are due
    /// too (at least one, at most `max`). Cancel-safe.
    async fn receive_many(&self, max: usize) -> Result<Vec<Delivery>, QueueError>;

    /// The job's outcome is durable: forget the message.
    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError>;

    /// The job's final outcome is recorded: completed (`failure` is `None`) or failed for
    /// good. Forget the message; a failed job's goes aside with the reason
    /// ([`dead_letter`](Self::dead_letter)).
    async fn finished(&self, delivery: &Delivery, failure: Option<&str>) -> Result<(), QueueError> {
        match failure {
            None => self.ack(delivery).await,
            Some(reason) => self.dead_letter(delivery, reason).await,
        }
    }

    /// Deliver the job again at `due_at` as attempt `attempt`, then forget this message.
    async fn retry(&self, delivery: &Delivery, attempt: u32, due_at: DateTime<Utc>) -> Result<(), QueueError>;

    /// The job failed for good (or names no job): move the message aside (Kafka's DLQ)
    /// with the reason, and forget it here.
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), QueueError>;

    /// Give the message back untouched, to be delivered again at once (shutdown).
    async fn release(&self, delivery: &Delivery) -> Result<(), QueueError>;

    /// Keep a long-running delivery from being handed to another worker.
    async fn keep_alive(&self, delivery: &Delivery) -> Result<(), QueueError>;

    /// Another worker holds the job until `until`: see that it is delivered again then, or
    /// leave that to the database, whose reconciler announces again every job that should
    /// be moving and is not.
    async fn defer(&self, delivery: &Delivery, until: DateTime<Utc>) -> Result<(), QueueError>;

    /// This worker cannot see the delivery through (an infrastructure error, or its lease
    /// was lost): let go of it so nothing waits on it, without a promise of redelivery.
    /// The job's record says what happens next (the reconciler, or a lapsing lock, brings
    /// it back within a bound).
    async fn abandon(&self, delivery: &Delivery);

    /// Stop receiving and let go of the backend (Kafka: commit what was stored and leave
    /// the consumer group) within `timeout`. Nothing to do by default.
    async fn close(&self, _timeout: std::time::Duration) {}

    /// Messages in the queue, waiting or held, when the queue can count them cheaply.
    async fn depth(&self) -> Option<u64> {
        None
    }
}
