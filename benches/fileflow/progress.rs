//! How far a run has got, read straight from fileflow's database: how many jobs have
//! ended, and when the last one did.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::Row;

pub enum JobsDb {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub completed: i64,
    pub failed: i64,
    /// When the last job changed state, in milliseconds since the Unix epoch.
    pub last_update_ms: i64,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("the clock is after 1970").as_millis() as i64
}

impl JobsDb {
    /// The embedded database of a `fileflow` data directory (which must already exist).
    pub async fn sqlite(data_dir: &Path) -> JobsDb {
        let url = format!("sqlite://{}", data_dir.join("fileflow.db").display());
        JobsDb::Sqlite(sqlx::SqlitePool::connect(&url).await.expect("fileflow's database opens"))
    }

    pub async fn postgres(url: &str) -> JobsDb {
        JobsDb::Postgres(sqlx::PgPool::connect(url).await.expect("fileflow's database opens"))
    }

    pub async fn progress(&self) -> Progress {
        let row = match self {
            JobsDb::Sqlite(pool) => sqlx::query(
                "SELECT coalesce(sum(status = 'completed'), 0), coalesce(sum(status = 'failed'), 0), \
                 coalesce(max(updated_at), 0) FROM files",
            )
            .fetch_one(pool)
            .await
            .map(|r| (r.get::<i64, _>(0), r.get::<i64, _>(1), r.get::<i64, _>(2))),
            JobsDb::Postgres(pool) => sqlx::query(
                "SELECT count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'failed'), \
                 coalesce((extract(epoch FROM max(updated_at)) * 1000)::bigint, 0) FROM files",
            )
            .fetch_one(pool)
            .await
            .map(|r| (r.get::<i64, _>(0), r.get::<i64, _>(1), r.get::<i64, _>(2))),
        };
        let (completed, failed, last_update_ms) = row.expect("the progress query runs");
        Progress { completed, failed, last_update_ms }
    }

    /// Every completed job's bucket, object name and recorded SHA-256.
    pub async fn completed_digests(&self) -> Vec<(String, String, Option<String>)> {
        const QUERY: &str = "SELECT bucket_name, object_name, sha256 FROM files WHERE status = 'completed'";
        let row = |r: &dyn Fn(usize) -> Option<String>| (r(0).unwrap_or_default(), r(1).unwrap_or_default(), r(2));
        match self {
            JobsDb::Sqlite(pool) => sqlx::query(QUERY)
                .fetch_all(pool)
                .await
                .map(|rows| rows.iter().map(|r| row(&|i| r.get::<Option<String>, _>(i))).collect()),
            JobsDb::Postgres(pool) => sqlx::query(QUERY)
                .fetch_all(pool)
                .await
                .map(|rows| rows.iter().map(|r| row(&|i| r.get::<Option<String>, _>(i))).collect()),
        }
        .expect("the jobs' digests are read")
    }

    /// Wait until `jobs` jobs have ended (completed or failed), or `limit` passes.
    pub async fn wait_for(&self, jobs: usize, limit: Duration) -> Progress {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let progress = self.progress().await;
            if (progress.completed + progress.failed) as usize >= jobs || tokio::time::Instant::now() >= deadline {
                return progress;
            }
            // The end time is the last job's own; polling less often only spares the database.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
