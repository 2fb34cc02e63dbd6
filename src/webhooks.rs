//! Webhooks: a job with a `notify_url` is announced there when it ends
//! (`upload.completed`, `upload.failed`, `upload.cancelled`), and so is a batch with one
//! (`batch.completed`, `batch.cancelled`), signed as the Standard Webhooks specification
//! says, at least once.
//!
//! The database writes a delivery into its outbox in the same statement that records the
//! job's final outcome (a trigger), or in the transaction that closes the batch (see
//! [`crate::metadata::BatchStore::close`]), so no end goes unannounced. A dispatcher in every
//! API process takes due deliveries (each under a short claim, so replicas do not send
//! the same one at once), posts them through the destination guard, keeps every try for the
//! job's view, and retries failures with the retry policy's backoff.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::fetch::{DestinationGuard, describe};
use crate::lifecycle::{JobError, RetryPolicy};
use crate::links::DownloadLinks;
use crate::metadata::JobRepository;
use crate::metadata::{Attempted, DueDelivery, Subject, WebhookOutbox, message_id};
use crate::secrets::WebhookSecret;

/// Longest a receiver may take to answer.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the dispatcher looks for due deliveries.
const POLL: Duration = Duration::from_millis(500);
/// Deliveries under way at once, at most (and at most `PER_RECEIVER` of them to one
/// receiver: see [`WebhookOutbox::claim_due`]).
const IN_FLIGHT: usize = 64;

/// Sends due deliveries until stopped.
pub struct Dispatcher {
    pub outbox: Arc<dyn WebhookOutbox>,
    pub repo: Arc<dyn JobRepository>,
    pub links: Arc<dyn DownloadLinks>,
    /// Connects only to addresses the guard allows (it checks every name it resolves).
    pub client: reqwest::Client,
    /// Checked again before every try: an IP-literal destination is never resolved, so
    /// the client's resolver never sees it, and the guard may have changed since the job
    /// was accepted (another process, a restart with other settings).
    pub guard: DestinationGuard,
    pub secret: WebhookSecret,
    /// Backoff between tries, and how many retries before giving up.
    pub policy: RetryPolicy,
}

impl Dispatcher {
    /// Send due deliveries, each as soon as it is claimed and without waiting for the
    /// others, until stopped; deliveries under way then get [`SEND_TIMEOUT`] to end.
    pub async fn run(self, stop: CancellationToken) {
        let this = Arc::new(self);
        let mut sending = tokio::task::JoinSet::new();
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A delivery that ends frees its receiver's place: look again at once.
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
                Some(_) = sending.join_next(), if !sending.is_empty() => {}
            }
            while sending.try_join_next().is_some() {}
            let free = IN_FLIGHT.saturating_sub(sending.len());
            if free == 0 {
                continue;
            }
            match this.outbox.claim_due(free as u32, SEND_TIMEOUT * 2).await {
                Ok(due) => {
                    for delivery in due {
                        let this = this.clone();
                        sending.spawn(async move { this.deliver(delivery).await });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the webhook outbox; will try again"),
            }
        }
        let _ = tokio::time::timeout(SEND_TIMEOUT, async { while sending.join_next().await.is_some() {} }).await;
    }

    /// Try one delivery and record how it went.
    async fn deliver(&self, due: DueDelivery) {
        let refused = match url::Url::parse(&due.url) {
            Ok(url) => self.guard.check_url(&url).err().map(|e| format!("the destination is refused: {}", e.0)),
            Err(e) => Some(format!("the destination is not a URL: {e}")),
        };
        let (status, error) = match &refused {
            Some(why) => (None, Some(why.clone())),
            None => match self.send(&due).await {
                Ok(status) if (200..300).contains(&status) => (Some(status), None),
                Ok(status) => (Some(status), Some(format!("the receiver answered HTTP {status}"))),
                Err(e) => (None, Some(e)),
            },
        };
        let now = Utc::now();
        let outcome = match &error {
            None => Attempted::Delivered,
            // No try will be let through: give up now.
            Some(_) if refused.is_some() => Attempted::GaveUp,
            Some(message) => {
                match self.policy.decide(due.attempts, &JobError::transient(message.clone()), rand::random()) {
                    crate::lifecycle::Decision::Retry { delay, .. } => {
                        Attempted::RetryAt(now + chrono::Duration::from_std(delay).unwrap_or_default())
                    }
                    crate::lifecycle::Decision::GiveUp => Attempted::GaveUp,
                }
            }
        };
        let (job_id, batch_id) = match &due.subject {
            Subject::Job(job) => (Some(job.0), None),
            Subject::Batch { id, .. } => (None, Some(*id)),
        };
        match outcome {
            Attempted::Delivered => tracing::info!(job_id, batch_id, event = %due.event, "webhook delivered"),
            _ => {
                tracing::warn!(job_id, batch_id, event = %due.event, error = error.as_deref().unwrap_or(""), ?outcome, "webhook not delivered")
            }
        }
        if let Err(e) = self.outbox.record_attempt(due.id, now, status, error.as_deref(), outcome).await {
            // Sent but not recorded: the claim lapses and it is sent again (at least once).
            tracing::warn!(job_id, batch_id, error = %e, "cannot record a webhook try");
        }
    }

    /// The body's `data`: the job as it is now, or the batch as it was when it closed.
    async fn data(&self, subject: &Subject) -> Result<serde_json::Value, String> {
        match subject {
            Subject::Job(id) => {
                let job = self.repo.get(*id).await.map_err(|e| e.to_string())?.ok_or("the job is gone")?;
                crate::wire::job_json(job.clone(), &*self.links, job.grant.owner.as_deref())
                    .await
                    .map_err(|e| e.to_string())
            }
            Subject::Batch { data, .. } => {
                serde_json::from_str(data).map_err(|e| format!("the batch's stored view is unreadable: {e}"))
            }
        }
    }

    /// Post the delivery; the receiver's status, or why there was none.
    async fn send(&self, due: &DueDelivery) -> Result<u16, String> {
        let data = self.data(&due.subject).await?;
        let timestamp = Utc::now();
        let body =
            serde_json::json!({ "type": due.event, "timestamp": timestamp.to_rfc3339(), "data": data }).to_string();
        let id = message_id(due.id);
        let signature = self.secret.sign(&id, timestamp.timestamp(), &body);
        let response = self
            .client
            .post(&due.url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.timestamp().to_string())
            .header("webhook-signature", signature)
            .body(body)
            .timeout(SEND_TIMEOUT)
            .send()
            .await
            .map_err(|e| describe(&e.without_url()))?;
        Ok(response.status().as_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_specification_example() {
        // The example from the Standard Webhooks specification.
        let secret: WebhookSecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse().unwrap();
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!("whsec_c2hvcnQ=".parse::<WebhookSecret>().is_err());
        assert!("not base64!".parse::<WebhookSecret>().is_err());
    }
}
