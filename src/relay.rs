//! The outbox relay: publishes the job messages that PostgreSQL transactions wrote to the
//! `outbox` table, and deletes them once the broker has acknowledged them. A crash between
//! a commit and its publish only delays the message; a crash after the publish and before
//! the delete repeats it, which claiming makes harmless.

use std::time::Duration;

use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::metadata::PgDb;
use crate::queue::QueueError;
use crate::queue::kafka::{JobMessage, KafkaPublisher, KafkaSettings, ensure_topics};

/// Messages published per transaction.
const BATCH: i64 = 200;
/// How often the relay makes sure the topics exist.
const TOPIC_CHECK: Duration = Duration::from_secs(5);
/// How often an idle relay looks for rows written by other processes.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// Longest one batch may take (the database, then every publish, each bounded by the
/// publisher's own timeout): past it the batch is abandoned, its rows unlocked and retried.
const BATCH_TIMEOUT: Duration = Duration::from_secs(90);

pub struct OutboxRelay {
    db: PgDb,
    publisher: KafkaPublisher,
    kafka: KafkaSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("outbox database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("an outbox batch took longer than {0:?}; abandoned")]
    TimedOut(Duration),
}

impl OutboxRelay {
    pub fn new(db: PgDb, kafka: &KafkaSettings) -> Result<Self, QueueError> {
        Ok(Self { db, publisher: KafkaPublisher::new(kafka)?, kafka: kafka.clone() })
    }

    /// Publish one batch; returns how many messages went out. Rows are locked with SKIP
    /// LOCKED, so several API processes relay side by side without repeating each other.
    pub async fn run_once(&self) -> Result<usize, RelayError> {
        let mut tx = self.db.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT o.id, o.attempt, f.id AS job_id, f.file_url, f.bucket_name, f.object_name, f.traceparent \
             FROM outbox o JOIN files f ON f.id = o.job_id ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED",
        )
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut messages = Vec::with_capacity(rows.len());
        for row in &rows {
            ids.push(row.try_get::<i64, _>("id")?);
            let message = JobMessage {
                id: row.try_get::<i64, _>("job_id")?.to_string(),
                file_url: row.try_get("file_url")?,
                bucket_name: row.try_get("bucket_name")?,
                object_name: row.try_get("object_name")?,
            };
            let attempt = u32::try_from(row.try_get::<i32, _>("attempt")?).unwrap_or(1);
            messages.push((message, attempt, row.try_get::<Option<String>, _>("traceparent")?));
        }
        futures::future::try_join_all(
            messages.iter().map(|(m, attempt, trace)| self.publisher.publish_job(m, *attempt, trace.as_deref())),
        )
        .await?;
        // The jobs were handed to the broker now: the reconciler measures from here.
        sqlx::query(
            "WITH sent AS (DELETE FROM outbox WHERE id = ANY($1) RETURNING job_id) \
             UPDATE files SET announced_at = now() WHERE id IN (SELECT job_id FROM sent)",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::debug!(published = ids.len(), "outbox relayed");
        Ok(ids.len())
    }

    /// Relay until `stop`; failures are logged and retried, never fatal.
    pub async fn run(self, stop: CancellationToken) {
        // The API accepts jobs while Kafka is away; the outbox keeps them until it is back.
        while let Err(e) = ensure_topics(&self.kafka).await {
            tracing::warn!(error = %e, "Kafka is not reachable yet; jobs wait in the outbox");
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        let mut topics_checked = tokio::time::Instant::now();
        // Failures in a row, so the relay says when it is publishing again.
        let mut failures = 0u32;
        loop {
            let woken = self.db.outboxed.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            // A broker that lost its state lost the topics too, and may take messages for
            // a topic that no longer exists without complaint: make sure they exist now
            // and then, not only after a failure.
            if topics_checked.elapsed() >= TOPIC_CHECK {
                topics_checked = tokio::time::Instant::now();
                if let Err(e) = ensure_topics(&self.kafka).await {
                    tracing::warn!(error = %e, "cannot check the Kafka topics");
                }
            }
            let batch = tokio::time::timeout(BATCH_TIMEOUT, self.run_once())
                .await
                .unwrap_or(Err(RelayError::TimedOut(BATCH_TIMEOUT)));
            if let (Ok(published), true) = (&batch, failures > 0) {
                tracing::info!(published, failures, "outbox relay publishing again");
                failures = 0;
            }
            let wait = match batch {
                Ok(n) if n as i64 == BATCH => continue,
                Ok(_) => IDLE_POLL,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "outbox relay failed; will retry");
                    // A broker that lost its state lost the topics too: create them again.
                    if matches!(e, RelayError::Queue(_) | RelayError::TimedOut(_))
                        && let Err(e) = ensure_topics(&self.kafka).await
                    {
                        tracing::warn!(error = %e, "cannot create the Kafka topics");
                    }
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = &mut woken => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}
