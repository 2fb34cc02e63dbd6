//! The webhook deliveries outbox: the port the dispatcher and the API use, and its records.
//! Its implementations for SQLite and PostgreSQL are in `webhooks.rs` beside it.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::RepoError;
use crate::lifecycle::JobId;
use crate::wire::DeliveryView;

/// The `webhook-id` of delivery `id`: the same on every try of it.
pub fn message_id(id: i64) -> String {
    format!("msg_{id}")
}

/// What a delivery announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A job's end: the body shows the job as it is when sent.
    Job(JobId),
    /// A batch's end, with the body's `data` as written when the batch closed (the
    /// batch's view then: a closed batch does not change).
    Batch { id: i64, data: String },
}

/// A delivery due to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueDelivery {
    pub id: i64,
    pub subject: Subject,
    pub event: String,
    pub url: String,
    /// Tries made before this one.
    pub attempts: u32,
}

/// What a try came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempted {
    Delivered,
    RetryAt(DateTime<Utc>),
    GaveUp,
}

/// Deliveries to one receiver (the scheme, host and port of a `notify_url`, whatever its
/// path) claimed at once, at most: a receiver that hangs or fails holds only this many of
/// the dispatchers' places, and only its own deliveries wait behind it.
pub const PER_RECEIVER: u32 = 4;

/// The deliveries outbox, in the metadata database.
#[async_trait]
pub trait WebhookOutbox: Send + Sync + 'static {
    /// Take up to `limit` due deliveries for `hold` (no one else takes them meanwhile),
    /// oldest first, and never more than [`PER_RECEIVER`] claimed at once for one receiver.
    async fn claim_due(&self, limit: u32, hold: Duration) -> Result<Vec<DueDelivery>, RepoError>;

    /// Record one try of delivery `id` and what it came to.
    async fn record_attempt(
        &self,
        id: i64,
        at: DateTime<Utc>,
        status: Option<u16>,
        error: Option<&str>,
        outcome: Attempted,
    ) -> Result<(), RepoError>;

    /// A job's deliveries and their tries, oldest first.
    async fn deliveries_of(&self, job: JobId) -> Result<Vec<DeliveryView>, RepoError>;

    /// Deliveries neither delivered nor given up.
    async fn depth(&self) -> Result<u64, RepoError>;
}
