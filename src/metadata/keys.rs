//! [`KeyStore`] on both databases: the `api_keys` table.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use sqlx::Row;

use super::{PgDb, RepoError, SqliteDb, from_db, from_millis, to_db, to_millis};
use crate::domain::{ApiKey, IssuedKey, KeyLimits, NewKey, Role, Scope};

/// Where API keys are kept: the metadata database.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Record a new key under the issued id and digest.
    async fn create_key(&self, issued: &IssuedKey, key: &NewKey, now: DateTime<Utc>) -> Result<ApiKey, RepoError>;

    /// Every key, revoked ones included, oldest first.
    async fn list_keys(&self) -> Result<Vec<ApiKey>, RepoError>;

    /// Revoke a key; `false` when there is no such key or it was already revoked.
    async fn revoke_key(&self, id: &str, now: DateTime<Utc>) -> Result<bool, RepoError>;

    /// The key with this id and the digest of its secret.
    async fn find_key(&self, id: &str) -> Result<Option<(ApiKey, String)>, RepoError>;

    /// Whether any key was ever created (revoked ones count: the API stays protected).
    async fn has_keys(&self) -> Result<bool, RepoError>;
}

macro_rules! key_columns {
    () => {
        "id, name, role, buckets, secret_sha256, rate_limit, max_unfinished, max_file_size, created_at, revoked_at, \
         notify_url, weight"
    };
}
const KEY_COLUMNS: &str = key_columns!();

/// The columns both databases read the same way; times differ (milliseconds vs `timestamptz`).
fn key_from_row<R: Row>(
    row: &R,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
) -> Result<(ApiKey, String), RepoError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i32>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let corrupt = |reason: String| RepoError::Corrupt { id: 0, reason };
    let id: String = row.try_get("id")?;
    let role: String = row.try_get("role")?;
    let buckets: String = row.try_get("buckets")?;
    let key = ApiKey {
        name: row.try_get("name")?,
        role: role.parse::<Role>().map_err(|e| corrupt(format!("key {id}: {e}")))?,
        scope: Scope::from_json(&buckets).map_err(|e| corrupt(format!("key {id}: buckets: {e}")))?,
        limits: KeyLimits {
            rate_limit: row.try_get::<Option<i32>, _>("rate_limit")?.map(|r| u32::try_from(r).unwrap_or(0)),
            max_unfinished: row.try_get::<Option<i64>, _>("max_unfinished")?.map(from_db),
            max_file_size: row.try_get::<Option<i64>, _>("max_file_size")?.map(from_db),
            weight: row.try_get::<Option<i32>, _>("weight")?.map(|w| u32::try_from(w).unwrap_or(1)),
        },
        notify_url: row.try_get("notify_url")?,
        created_at,
        revoked_at,
        id,
    };
    Ok((key, row.try_get("secret_sha256")?))
}

fn rate_value(rate: Option<u32>) -> Option<i32> {
    rate.map(|v| i32::try_from(v).unwrap_or(i32::MAX))
}

/// The stored weight: the key's, or 1.
fn weight_value(weight: Option<u32>) -> i32 {
    weight.map_or(1, |w| i32::try_from(w.max(1)).unwrap_or(i32::MAX))
}

fn sqlite_key(row: &sqlx::sqlite::SqliteRow) -> Result<(ApiKey, String), RepoError> {
    let revoked: Option<i64> = row.try_get("revoked_at")?;
    key_from_row(row, from_millis(row.try_get("created_at")?), revoked.map(from_millis))
}

fn pg_key(row: &sqlx::postgres::PgRow) -> Result<(ApiKey, String), RepoError> {
    key_from_row(row, row.try_get("created_at")?, row.try_get("revoked_at")?)
}

#[async_trait]
impl KeyStore for SqliteDb {
    async fn create_key(&self, issued: &IssuedKey, key: &NewKey, now: DateTime<Utc>) -> Result<ApiKey, RepoError> {
        let (id, digest, name, role, buckets) =
            (issued.id.clone(), issued.secret_sha256.clone(), key.name.clone(), key.role.as_str(), key.scope.to_json());
        let limits = key.limits;
        let notify_url = key.notify_url.clone();
        let row = self
            .write(move |c| {
                sqlx::query(concat!(
                    "INSERT INTO api_keys (id, name, role, buckets, secret_sha256, rate_limit, max_unfinished, \
                     max_file_size, created_at, notify_url, weight) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) RETURNING ",
                    key_columns!()
                ))
                .bind(id)
                .bind(name)
                .bind(role)
                .bind(buckets)
                .bind(digest)
                .bind(rate_value(limits.rate_limit))
                .bind(limits.max_unfinished.map(to_db))
                .bind(limits.max_file_size.map(to_db))
                .bind(to_millis(now))
                .bind(notify_url)
                .bind(weight_value(limits.weight))
                .fetch_one(c)
                .boxed()
            })
            .await?;
        Ok(sqlite_key(&row)?.0)
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>, RepoError> {
        let rows = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"))
            .fetch_all(&self.reads)
            .await?;
        rows.iter().map(|row| sqlite_key(row).map(|(key, _)| key)).collect()
    }

    async fn revoke_key(&self, id: &str, now: DateTime<Utc>) -> Result<bool, RepoError> {
        let id = id.to_owned();
        let done = self
            .write(move |c| {
                sqlx::query("UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL")
                    .bind(id)
                    .bind(to_millis(now))
                    .execute(c)
                    .boxed()
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn find_key(&self, id: &str) -> Result<Option<(ApiKey, String)>, RepoError> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"))
            .bind(id)
            .fetch_optional(&self.reads)
            .await?;
        row.as_ref().map(sqlite_key).transpose()
    }

    async fn has_keys(&self) -> Result<bool, RepoError> {
        Ok(sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM api_keys)").fetch_one(&self.reads).await?)
    }
}

#[async_trait]
impl KeyStore for PgDb {
    async fn create_key(&self, issued: &IssuedKey, key: &NewKey, now: DateTime<Utc>) -> Result<ApiKey, RepoError> {
        let row = sqlx::query(&format!(
            "INSERT INTO api_keys (id, name, role, buckets, secret_sha256, rate_limit, max_unfinished, \
             max_file_size, created_at, notify_url, weight) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             RETURNING {KEY_COLUMNS}"
        ))
        .bind(&issued.id)
        .bind(&key.name)
        .bind(key.role.as_str())
        .bind(key.scope.to_json())
        .bind(&issued.secret_sha256)
        .bind(rate_value(key.limits.rate_limit))
        .bind(key.limits.max_unfinished.map(to_db))
        .bind(key.limits.max_file_size.map(to_db))
        .bind(now)
        .bind(&key.notify_url)
        .bind(weight_value(key.limits.weight))
        .fetch_one(&self.pool)
        .await?;
        Ok(pg_key(&row)?.0)
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>, RepoError> {
        let rows = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|row| pg_key(row).map(|(key, _)| key)).collect()
    }

    async fn revoke_key(&self, id: &str, now: DateTime<Utc>) -> Result<bool, RepoError> {
        let done = sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn find_key(&self, id: &str) -> Result<Option<(ApiKey, String)>, RepoError> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(pg_key).transpose()
    }

    async fn has_keys(&self) -> Result<bool, RepoError> {
        Ok(sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM api_keys)").fetch_one(&self.pool).await?)
    }
}
