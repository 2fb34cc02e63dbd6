//! Cost as the jobs pile up: a database grown to 10 k, 100 k and 1 M jobs (finished ones,
//! written straight into fileflow's tables, as a long-running deployment accumulates them),
//! and what the API's reads and writes and the reconciler's sweep cost at each size.

use std::time::Duration;

use sqlx::{Connection as _, Row as _};

use crate::load::{self, Latencies};
use crate::process::Fileflow;
use crate::progress::{JobsDb, now_ms};
use crate::report::Table;
use crate::{Bench, f1, f2, services};

/// The share of seeded jobs that failed (every 20th) and that were cancelled (every 100th,
/// offset by one); the rest completed.
const SEEDED_FAILED_EVERY: i64 = 20;

impl JobsDb {
    /// Add `count` finished jobs that ended a day or more ago, most completed (with digests
    /// and a content type), every 20th failed and every 100th cancelled, one millisecond
    /// apart. Written with fileflow stopped; the embedded queue keeps no row for them.
    pub async fn seed_finished(&self, count: u64) {
        let ended = now_ms() - 86_400_000;
        match self {
            JobsDb::Sqlite(pool) => {
                let mut c = pool.acquire().await.expect("the database opens");
                let mut tx = c.begin().await.expect("a transaction");
                let before: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM files")
                    .fetch_one(&mut *tx)
                    .await
                    .expect("max id");
                sqlx::query(
                    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
                     INSERT INTO files (file_url, bucket_name, object_name, etag, size, status, retry_count, \
                         last_error, sha256, md5, content_type, created_at, updated_at) \
                     SELECT 'http://origin.example/file/16384?seed=' || (?2 + i), 'bench-growth', \
                         'seed/' || (?2 + i), '\"' || lower(hex(randomblob(16))) || '\"', 16384, \
                         CASE WHEN i % ?4 = 0 THEN 'failed' WHEN i % 100 = 1 THEN 'cancelled' ELSE 'completed' END, \
                         CASE WHEN i % ?4 = 0 THEN 3 ELSE 0 END, \
                         CASE WHEN i % ?4 = 0 THEN 'origin answered 404 Not Found' END, \
                         lower(hex(randomblob(32))), lower(hex(randomblob(16))), 'application/octet-stream', \
                         ?3 - ?1 + i - 40, ?3 - ?1 + i FROM n",
                )
                .bind(count as i64)
                .bind(before)
                .bind(ended)
                .bind(SEEDED_FAILED_EVERY)
                .execute(&mut *tx)
                .await
                .expect("the seed rows are written");
                // The insert trigger queued them; finished jobs have no queue row.
                sqlx::query("DELETE FROM queue WHERE job_id > ?1")
                    .bind(before)
                    .execute(&mut *tx)
                    .await
                    .expect("the seed rows leave the queue");
                tx.commit().await.expect("the seed commits");
            }
            JobsDb::Postgres(pool) => {
                let mut c = pool.acquire().await.expect("the database opens");
                // Leave out the change notifications the triggers would send for every row.
                sqlx::query("SET session_replication_role = replica").execute(&mut *c).await.expect("replica role");
                sqlx::query(
                    "INSERT INTO files (file_url, bucket_name, object_name, etag, size, status, retry_count, \
                         last_error, sha256, md5, content_type, accept_token, created_at, updated_at) \
                     SELECT 'http://origin.example/file/16384?seed=' || (b.before + i), 'bench-growth', \
                         'seed/' || (b.before + i), '\"' || md5(random()::text) || '\"', 16384, \
                         CASE WHEN i % $3 = 0 THEN 'failed' WHEN i % 100 = 1 THEN 'cancelled' ELSE 'completed' END, \
                         CASE WHEN i % $3 = 0 THEN 3 ELSE 0 END, \
                         CASE WHEN i % $3 = 0 THEN 'origin answered 404 Not Found' END, \
                         md5(random()::text) || md5(random()::text), md5(random()::text), \
                         'application/octet-stream', md5(random()::text), \
                         to_timestamp(($2 - $1 + i - 40) / 1000.0), to_timestamp(($2 - $1 + i) / 1000.0) \
                     FROM (SELECT coalesce(max(id), 0) AS before FROM files) b, generate_series(1, $1) i",
                )
                .bind(count as i64)
                .bind(ended)
                .bind(SEEDED_FAILED_EVERY)
                .execute(&mut *c)
                .await
                .expect("the seed rows are written");
                sqlx::query("SET session_replication_role = origin").execute(&mut *c).await.expect("origin role");
                // What autovacuum does to a table that grew: statistics and the visibility map.
                sqlx::query("VACUUM ANALYZE").execute(&mut *c).await.expect("VACUUM ANALYZE");
            }
        }
    }

    /// The jobs in the database.
    pub async fn jobs(&self) -> i64 {
        match self {
            JobsDb::Sqlite(pool) => sqlx::query_scalar("SELECT count(*) FROM files").fetch_one(pool).await,
            JobsDb::Postgres(pool) => sqlx::query_scalar("SELECT count(*) FROM files").fetch_one(pool).await,
        }
        .expect("count(*)")
    }

    /// The jobs in `bucket`, or only its completed ones.
    pub async fn jobs_in(&self, bucket: &str, completed_only: bool) -> i64 {
        let completed = if completed_only { " AND status = 'completed'" } else { "" };
        match self {
            JobsDb::Sqlite(pool) => {
                let sql = format!("SELECT count(*) FROM files WHERE bucket_name = ?1{completed}");
                sqlx::query_scalar(&sql).bind(bucket).fetch_one(pool).await
            }
            JobsDb::Postgres(pool) => {
                let sql = format!("SELECT count(*) FROM files WHERE bucket_name = $1{completed}");
                sqlx::query_scalar(&sql).bind(bucket).fetch_one(pool).await
            }
        }
        .expect("count(*)")
    }

    /// Bytes the database takes: SQLite's used pages (after a checkpoint), PostgreSQL's
    /// tables with their indexes and TOAST.
    pub async fn bytes(&self) -> i64 {
        match self {
            JobsDb::Sqlite(pool) => {
                sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(pool).await.expect("checkpoint");
                sqlx::query_scalar(
                    "SELECT (page_count - freelist_count) * page_size \
                     FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()",
                )
                .fetch_one(pool)
                .await
            }
            JobsDb::Postgres(pool) => {
                sqlx::query_scalar("SELECT sum(pg_total_relation_size(relid))::bigint FROM pg_stat_user_tables")
                    .fetch_one(pool)
                    .await
            }
        }
        .expect("the database's size")
    }

    /// The plan the database chooses for `sql` with `binds` (integers or text), one line.
    pub async fn plan(&self, sql: &str, binds: &[Bind]) -> String {
        match self {
            JobsDb::Sqlite(pool) => {
                let explain = format!("EXPLAIN QUERY PLAN {sql}");
                let mut query = sqlx::query(&explain);
                for bind in binds {
                    query = match bind {
                        Bind::Int(v) => query.bind(*v),
                        Bind::Text(v) => query.bind(v.clone()),
                    };
                }
                let rows = query.fetch_all(pool).await.expect("EXPLAIN QUERY PLAN");
                rows.iter().map(|r| r.get::<String, _>("detail")).collect::<Vec<_>>().join("; ")
            }
            JobsDb::Postgres(pool) => {
                let mut c = pool.acquire().await.expect("a connection");
                // The plan a prepared statement settles on after its first runs.
                sqlx::query("SET plan_cache_mode = force_generic_plan").execute(&mut *c).await.expect("SET");
                let explain = format!("EXPLAIN (COSTS OFF) {sql}");
                let mut query = sqlx::query(&explain);
                for bind in binds {
                    query = match bind {
                        Bind::Int(v) => query.bind(*v),
                        Bind::Text(v) => query.bind(v.clone()),
                    };
                }
                let rows = query.fetch_all(&mut *c).await.expect("EXPLAIN");
                rows.iter().map(|r| r.get::<String, _>(0).trim().to_owned()).collect::<Vec<_>>().join("; ")
            }
        }
    }
}

pub enum Bind {
    Int(i64),
    Text(String),
}

/// The mean reconciler sweep so far, in milliseconds, from a process's `/metrics`.
async fn sweeps(base: &str) -> (f64, f64) {
    let text = load::client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .expect("/metrics answers")
        .text()
        .await
        .expect("/metrics reads");
    let value = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok()).unwrap_or(0.0);
    (value("fileflow_reconciler_sweep_duration_seconds_sum"), value("fileflow_reconciler_sweep_duration_seconds_count"))
}

fn ms(latencies: &Latencies) -> String {
    f2(latencies.quantile_ms(0.99))
}

impl Bench {
    pub async fn growth(&mut self) -> (Table, Table) {
        let sizes: Vec<u64> = std::env::var("FILEFLOW_BENCH_GROWTH_SIZES")
            .ok()
            .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![10_000, 100_000, 1_000_000]);
        let mut table = Table::new(
            "Cost as the jobs pile up",
            "A `fileflow api` process (reconciler sweeping every 250 ms, no workers) on a database holding this \
             many finished jobs (95 % completed, 4 % failed, 1 % cancelled, written into its tables with fileflow \
             stopped; PostgreSQL then vacuumed and analysed, as autovacuum would). Accept: open loop at 1,000 jobs/s \
             for 4 s. Lists: `GET /api/v1/uploads?status=failed&limit=50`, the first page and a deep one (the \
             cursor 90 % of the way down), and a single job's `GET`, each by 4 closed-loop clients for 3 s. Sweep: \
             the mean of the reconciler's sweeps while it ran. Bytes per job: the database's size (SQLite: used \
             pages after a checkpoint; PostgreSQL: tables, indexes and TOAST) over its jobs.",
            &[
                "database",
                "jobs",
                "accept p99 ms",
                "list, first page p99 ms",
                "list, deep page p99 ms",
                "GET one p99 ms",
                "sweep ms (mean)",
                "bytes per job",
            ],
        );
        let mut plans = Table::new(
            "Query plans at the largest size",
            "What each database plans for the reads that grow with the jobs (PostgreSQL: the generic plan of a \
             prepared statement, which it settles on after five runs).",
            &["database", "query", "plan"],
        );
        // (name, the process's environment, PostgreSQL's URL for the distributed stack)
        type Stack = (&'static str, Vec<(String, String)>, Option<String>);
        let mut stacks: Vec<Stack> = vec![("SQLite (embedded)", Vec::new(), None)];
        match &self.distributed {
            Some(d) => {
                let (env, url) = d.fresh_stack(8, false).await;
                stacks.push(("PostgreSQL (distributed)", env, Some(url)));
            }
            None => self.notes.push("growth, PostgreSQL: not run (no FILEFLOW_TEST_POSTGRES/KAFKA/S3_*)".into()),
        }
        for (name, mut env, url) in stacks {
            env.push(("FILEFLOW_RECONCILE_INTERVAL".into(), "250ms".into()));
            let data = self.dir(&services::unique("growth"));
            // A first start creates the schema.
            Fileflow::start("api", &data, &env).await.stop().await;
            let db = match &url {
                Some(url) => JobsDb::postgres(url).await,
                None => JobsDb::sqlite(&data).await,
            };
            let mut seeded = 0;
            for &size in &sizes {
                db.seed_finished(size - seeded).await;
                seeded = size;
                let jobs = db.jobs().await;
                let bytes = db.bytes().await;
                let api = Fileflow::start("api", &data, &env).await;
                let base = api.base.clone();
                let quick = (Duration::from_secs(1), Duration::from_secs(3));
                let accept = load::paced(
                    1000.0,
                    Duration::from_secs(1),
                    Duration::from_secs(4),
                    load::upload(&base, "bench-growth", self.url("/file/1024?seed={n}".into())),
                )
                .await;
                let list = |before: Option<i64>| {
                    let url = match before {
                        Some(id) => format!("{base}/api/v1/uploads?status=failed&limit=50&before={id}"),
                        None => format!("{base}/api/v1/uploads?status=failed&limit=50"),
                    };
                    move |client: &reqwest::Client, _| client.get(&url)
                };
                let first = load::closed_loop(4, quick.0, quick.1, list(None)).await;
                let deep_cursor = seeded as i64 / 10;
                let deep = load::closed_loop(4, quick.0, quick.1, list(Some(deep_cursor))).await;
                let one = {
                    let base = base.clone();
                    move |client: &reqwest::Client, n: usize| {
                        let id = 1 + (n as u64).wrapping_mul(2_654_435_761) % seeded;
                        client.get(format!("{base}/api/v1/uploads/{id}"))
                    }
                };
                let get = load::closed_loop(4, quick.0, quick.1, one).await;
                let (sum, count) = sweeps(&base).await;
                api.stop().await;
                let errors = accept.errors + first.errors + deep.errors + get.errors;
                if errors > 0 {
                    self.notes.push(format!("growth, {name}, {jobs} jobs: {errors} requests failed"));
                }
                table.row(vec![
                    name.into(),
                    jobs.to_string(),
                    ms(&accept),
                    ms(&first),
                    ms(&deep),
                    ms(&get),
                    if count > 0.0 { f2(1000.0 * sum / count) } else { "-".into() },
                    f1(bytes as f64 / jobs as f64),
                ]);
                if size == *sizes.last().expect("a size") {
                    self.plans(&db, name, deep_cursor, &mut plans).await;
                }
            }
        }
        (table, plans)
    }

    async fn plans(&self, db: &JobsDb, name: &str, deep_cursor: i64, table: &mut Table) {
        use fileflow::lifecycle::{JobId, JobStatus};
        use fileflow::metadata::ListFilter;
        let postgres = matches!(db, JobsDb::Postgres(_));
        let placeholder: fn(usize) -> String = if postgres { |n| format!("${n}") } else { |n| format!("?{n}") };
        let p = placeholder;
        let page = |before: Option<i64>| ListFilter {
            status: Some(JobStatus::Failed),
            owner: None,
            batch: None,
            before: before.map(JobId),
            limit: 50,
        };
        let failed = || Bind::Text("failed".into());
        // The list statements as each repository wraps the filter.
        let list = |filter: &str| {
            if postgres {
                format!("SELECT * FROM files WHERE id = ANY(ARRAY(SELECT id FROM files {filter})) ORDER BY id DESC")
            } else {
                format!("SELECT * FROM files {filter}")
            }
        };
        let now = now_ms();
        // The list statements are fileflow's own; the others are the parts of
        // `JobRepository::{get, claim_many, reconcile, forget_finished}` that read the
        // growing table.
        let claim = if postgres {
            "SELECT f.id FROM files f WHERE f.id = ANY(ARRAY[$1::bigint]) \
             AND ((f.status = 'pending' AND (f.next_attempt_at IS NULL OR f.next_attempt_at <= now())) \
                OR (f.status = 'processing' AND f.lease_expires_at <= now())) \
               AND NOT EXISTS (SELECT 1 FROM files o WHERE o.bucket_name = f.bucket_name \
                   AND o.object_name = f.object_name AND o.status = 'processing' AND o.id <> f.id) \
               AND NOT EXISTS (SELECT 1 FROM (SELECT id, bucket_name, object_name, status FROM files \
                   WHERE id = ANY(ARRAY[$1::bigint]) OFFSET 0) o \
                   WHERE o.id < f.id AND o.bucket_name = f.bucket_name AND o.object_name = f.object_name \
                     AND o.status = 'pending') \
             FOR UPDATE OF f SKIP LOCKED"
        } else {
            "SELECT files.id FROM files WHERE files.id IN (?1) \
               AND ((files.status = 'pending' AND (files.next_attempt_at IS NULL OR files.next_attempt_at <= ?2)) \
                 OR (files.status = 'processing' AND files.lease_expires_at <= ?2)) \
               AND NOT EXISTS (SELECT 1 FROM files o WHERE o.bucket_name = files.bucket_name \
                   AND o.object_name = files.object_name AND o.status = 'processing' AND o.id <> files.id) \
               AND NOT EXISTS (SELECT 1 FROM files o WHERE o.id IN (?1) AND o.id < files.id AND o.status = 'pending' \
                   AND o.bucket_name = files.bucket_name AND o.object_name = files.object_name)"
        };
        let (sweep, retention) = if postgres {
            (
                "SELECT f.id FROM files f WHERE f.status IN ('pending', 'processing') \
                 AND ((f.status = 'pending' AND greatest(f.updated_at, f.announced_at, f.next_attempt_at) \
                 < now() - $1 * interval '1 millisecond') OR (f.status = 'processing' AND f.lease_expires_at <= now())) \
                 AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = f.id) ORDER BY f.id LIMIT 1000"
                    .to_owned(),
                "SELECT id FROM files WHERE status IN ('completed', 'failed', 'cancelled') \
                 AND updated_at < to_timestamp($1 / 1000.0) ORDER BY updated_at LIMIT 1000"
                    .to_owned(),
            )
        } else {
            (
                "SELECT id FROM files WHERE status IN ('pending', 'processing') AND updated_at < ?1 \
                 AND (status = 'pending' OR (status = 'processing' AND lease_expires_at <= ?1)) \
                 AND NOT EXISTS (SELECT 1 FROM queue q WHERE q.job_id = files.id) ORDER BY id LIMIT 1000"
                    .to_owned(),
                "SELECT id FROM files INDEXED BY files_finished_updated_idx \
                 WHERE status IN ('completed', 'failed', 'cancelled') AND updated_at < ?1 ORDER BY updated_at LIMIT 1000"
                    .to_owned(),
            )
        };
        let queries: Vec<(&str, String, Vec<Bind>)> = vec![
            ("list, first page (status=failed)", list(&page(None).sql(placeholder)), vec![failed(), Bind::Int(50)]),
            (
                "list, deep page (status=failed, before=…)",
                list(&page(Some(deep_cursor)).sql(placeholder)),
                vec![failed(), Bind::Int(deep_cursor), Bind::Int(50)],
            ),
            ("GET one", format!("SELECT * FROM files WHERE id = {}", p(1)), vec![Bind::Int(deep_cursor)]),
            (
                "claim (one writer per object)",
                claim.to_owned(),
                if postgres { vec![Bind::Int(deep_cursor)] } else { vec![Bind::Int(deep_cursor), Bind::Int(now)] },
            ),
            ("reconciler: stuck jobs", sweep, vec![Bind::Int(if postgres { 30_000 } else { now })]),
            ("retention: oldest finished", retention, vec![Bind::Int(now - 3_600_000)]),
        ];
        for (query, sql, binds) in queries {
            table.row(vec![name.into(), query.into(), format!("`{}`", db.plan(&sql, &binds).await)]);
        }
    }
}
