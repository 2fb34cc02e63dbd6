//! [`WebhookOutbox`] on both databases: `webhook_deliveries` and `webhook_attempts`.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{PgDb, RepoError, SqliteDb, from_millis, millis, to_millis};
use crate::lifecycle::JobId;
use crate::webhooks::{AttemptView, Attempted, DeliveryView, DueDelivery, WebhookOutbox};

fn due_from_row<R: Row>(row: &R) -> Result<DueDelivery, RepoError>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    Ok(DueDelivery {
        id: row.try_get("id")?,
        job_id: JobId(row.try_get("job_id")?),
        event: row.try_get("event")?,
        url: row.try_get("url")?,
        attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
    })
}

/// The deliveries of a job with their tries, from rows of deliveries and of tries.
fn views(deliveries: Vec<DeliveryView>, attempts: Vec<(i64, AttemptView)>) -> Vec<DeliveryView> {
    let mut deliveries = deliveries;
    for (delivery, attempt) in attempts {
        if let Some(view) = deliveries.iter_mut().find(|d| d.id == format!("msg_{delivery}")) {
            view.attempts.push(attempt);
        }
    }
    deliveries
}

/// The columns a try's outcome sets: (delivered_at, given_up_at, next_attempt_at), each
/// written as the database keeps times.
fn outcome_columns<T>(
    outcome: Attempted,
    at: DateTime<Utc>,
    time: impl Fn(DateTime<Utc>) -> T,
) -> (Option<T>, Option<T>, Option<T>) {
    match outcome {
        Attempted::Delivered => (Some(time(at)), None, None),
        Attempted::GaveUp => (None, Some(time(at)), None),
        Attempted::RetryAt(when) => (None, None, Some(time(when))),
    }
}

fn status_of(status: Option<i32>) -> Option<u16> {
    status.and_then(|s| u16::try_from(s).ok())
}

#[async_trait]
impl WebhookOutbox for SqliteDb {
    async fn claim_due(&self, limit: u32, hold: Duration) -> Result<Vec<DueDelivery>, RepoError> {
        let hold = millis(hold);
        let rows = self
            .write(move |c| {
                Box::pin(async move {
                    let now = to_millis(Utc::now());
                    sqlx::query(
                        "UPDATE webhook_deliveries SET claimed_until = ?1 + ?2 WHERE id IN \
                         (SELECT id FROM webhook_deliveries WHERE delivered_at IS NULL AND given_up_at IS NULL \
                          AND next_attempt_at <= ?1 AND (claimed_until IS NULL OR claimed_until < ?1) \
                          ORDER BY next_attempt_at LIMIT ?3) \
                         RETURNING id, job_id, event, url, attempts",
                    )
                    .bind(now)
                    .bind(hold)
                    .bind(i64::from(limit))
                    .fetch_all(c)
                    .await
                })
            })
            .await?;
        rows.iter().map(due_from_row).collect()
    }

    async fn record_attempt(
        &self,
        id: i64,
        at: DateTime<Utc>,
        status: Option<u16>,
        error: Option<&str>,
        outcome: Attempted,
    ) -> Result<(), RepoError> {
        let error = error.map(str::to_owned);
        let at_ms = to_millis(at);
        let (delivered, given_up, next) = outcome_columns(outcome, at, to_millis);
        self.write(move |c| {
            Box::pin(async move {
                use sqlx::Connection as _;
                let mut tx = c.begin().await?;
                sqlx::query(
                    "INSERT INTO webhook_attempts (delivery_id, attempted_at, status, error) VALUES (?1, ?2, ?3, ?4)",
                )
                .bind(id)
                .bind(at_ms)
                .bind(status.map(i32::from))
                .bind(error)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE webhook_deliveries SET attempts = attempts + 1, claimed_until = NULL, \
                     delivered_at = COALESCE(?2, delivered_at), given_up_at = COALESCE(?3, given_up_at), \
                     next_attempt_at = COALESCE(?4, next_attempt_at) WHERE id = ?1",
                )
                .bind(id)
                .bind(delivered)
                .bind(given_up)
                .bind(next)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok::<_, RepoError>(())
            })
        })
        .await
    }

    async fn deliveries_of(&self, job: JobId) -> Result<Vec<DeliveryView>, RepoError> {
        let rows = sqlx::query(
            "SELECT id, event, url, delivered_at, given_up_at, next_attempt_at FROM webhook_deliveries \
             WHERE job_id = ?1 ORDER BY id",
        )
        .bind(job.0)
        .fetch_all(&self.reads)
        .await?;
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in &rows {
            let (delivered, given_up): (Option<i64>, Option<i64>) =
                (row.try_get("delivered_at")?, row.try_get("given_up_at")?);
            let pending = delivered.is_none() && given_up.is_none();
            deliveries.push(DeliveryView {
                id: format!("msg_{}", row.try_get::<i64, _>("id")?),
                event: row.try_get("event")?,
                url: row.try_get("url")?,
                delivered_at: delivered.map(from_millis),
                given_up_at: given_up.map(from_millis),
                next_attempt_at: pending
                    .then(|| row.try_get::<i64, _>("next_attempt_at").map(from_millis))
                    .transpose()?,
                attempts: Vec::new(),
            });
        }
        let attempts = sqlx::query(
            "SELECT a.delivery_id, a.attempted_at, a.status, a.error FROM webhook_attempts a \
             JOIN webhook_deliveries d ON d.id = a.delivery_id WHERE d.job_id = ?1 ORDER BY a.attempted_at",
        )
        .bind(job.0)
        .fetch_all(&self.reads)
        .await?
        .iter()
        .map(|row| {
            Ok((
                row.try_get::<i64, _>("delivery_id")?,
                AttemptView {
                    at: from_millis(row.try_get("attempted_at")?),
                    status: status_of(row.try_get("status")?),
                    error: row.try_get("error")?,
                },
            ))
        })
        .collect::<Result<Vec<_>, RepoError>>()?;
        Ok(views(deliveries, attempts))
    }
}

#[async_trait]
impl WebhookOutbox for PgDb {
    async fn claim_due(&self, limit: u32, hold: Duration) -> Result<Vec<DueDelivery>, RepoError> {
        let rows = sqlx::query(
            "UPDATE webhook_deliveries SET claimed_until = now() + $1 * interval '1 millisecond' WHERE id IN \
             (SELECT id FROM webhook_deliveries WHERE delivered_at IS NULL AND given_up_at IS NULL \
              AND next_attempt_at <= now() AND (claimed_until IS NULL OR claimed_until < now()) \
              ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
             RETURNING id, job_id, event, url, attempts",
        )
        .bind(millis(hold) as f64)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(due_from_row).collect()
    }

    async fn record_attempt(
        &self,
        id: i64,
        at: DateTime<Utc>,
        status: Option<u16>,
        error: Option<&str>,
        outcome: Attempted,
    ) -> Result<(), RepoError> {
        let (delivered, given_up, next) = outcome_columns(outcome, at, |t| t);
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO webhook_attempts (delivery_id, attempted_at, status, error) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(at)
            .bind(status.map(i32::from))
            .bind(error)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, claimed_until = NULL, \
             delivered_at = COALESCE($2, delivered_at), given_up_at = COALESCE($3, given_up_at), \
             next_attempt_at = COALESCE($4, next_attempt_at) WHERE id = $1",
        )
        .bind(id)
        .bind(delivered)
        .bind(given_up)
        .bind(next)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn deliveries_of(&self, job: JobId) -> Result<Vec<DeliveryView>, RepoError> {
        let rows = sqlx::query(
            "SELECT id, event, url, delivered_at, given_up_at, next_attempt_at FROM webhook_deliveries \
             WHERE job_id = $1 ORDER BY id",
        )
        .bind(job.0)
        .fetch_all(&self.pool)
        .await?;
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in &rows {
            let delivered: Option<DateTime<Utc>> = row.try_get("delivered_at")?;
            let given_up: Option<DateTime<Utc>> = row.try_get("given_up_at")?;
            let pending = delivered.is_none() && given_up.is_none();
            deliveries.push(DeliveryView {
                id: format!("msg_{}", row.try_get::<i64, _>("id")?),
                event: row.try_get("event")?,
                url: row.try_get("url")?,
                delivered_at: delivered,
                given_up_at: given_up,
                next_attempt_at: if pending { row.try_get("next_attempt_at")? } else { None },
                attempts: Vec::new(),
            });
        }
        let attempts = sqlx::query(
            "SELECT a.delivery_id, a.attempted_at, a.status, a.error FROM webhook_attempts a \
             JOIN webhook_deliveries d ON d.id = a.delivery_id WHERE d.job_id = $1 ORDER BY a.attempted_at",
        )
        .bind(job.0)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            Ok((
                row.try_get::<i64, _>("delivery_id")?,
                AttemptView {
                    at: row.try_get("attempted_at")?,
                    status: status_of(row.try_get("status")?),
                    error: row.try_get("error")?,
                },
            ))
        })
        .collect::<Result<Vec<_>, RepoError>>()?;
        Ok(views(deliveries, attempts))
    }
}
