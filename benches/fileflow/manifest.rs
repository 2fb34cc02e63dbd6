//! A large manifest read into jobs: `POST /api/v1/batches` of a CSV of 100,000 and
//! 1,000,000 rows (by URL, from a file on disk served by a small server in this process),
//! on `fileflow serve` with its defaults (workers on), embedded and distributed: the time
//! until every row is a job, rows/s, the process's peak memory, the database's growth, and
//! what `GET /api/v1/batches/{id}` costs while reading and once every job exists.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::header;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use crate::load::client;
use crate::process::Fileflow;
use crate::report::Table;
use crate::services::unique;
use crate::{Bench, MIB, f1, f2, median};

/// A stack to run on: its name, the server's environment, its database's URL (distributed).
type Stack = (&'static str, Vec<(String, String)>, Option<String>);

/// How often the batch is looked at while it reads.
const POLL: Duration = Duration::from_millis(200);
/// `GET /api/v1/batches/{id}` calls timed once every row is a job.
const GETS: usize = 200;
/// Each job's file: a tiny one.
const FILE_BYTES: u64 = 64;

/// The `q` quantile (0–1) of `xs`, which it sorts (nearest rank).
fn quantile(xs: &mut [f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() as f64 - 1.0) * q).round() as usize]
}

/// A loopback server of the files in one directory, streamed from disk (the manifests).
struct FileServer {
    base: String,
    task: tokio::task::JoinHandle<()>,
}

impl FileServer {
    async fn start(root: PathBuf) -> FileServer {
        let app = axum::Router::new().route(
            "/{name}",
            axum::routing::get(move |axum::extract::Path(name): axum::extract::Path<String>| {
                let path = root.join(name);
                async move {
                    match tokio::fs::File::open(&path).await {
                        Ok(file) => {
                            let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
                            let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
                            (
                                [
                                    (header::CONTENT_TYPE, "text/csv".to_owned()),
                                    (header::CONTENT_LENGTH, len.to_string()),
                                ],
                                body,
                            )
                                .into_response()
                        }
                        Err(_) => axum::http::StatusCode::NOT_FOUND.into_response(),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        let base = format!("http://{}", listener.local_addr().expect("an address"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FileServer { base, task }
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Write a CSV manifest of `rows` rows to `path`, a line at a time; its size in bytes.
fn write_manifest(path: &Path, rows: usize, file_url: &str) -> u64 {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("the manifest file is created"));
    writeln!(out, "file_url,object_name").expect("the manifest is written");
    for n in 0..rows {
        writeln!(out, "{file_url}?seed={n},m/{n:07}").expect("the manifest is written");
    }
    out.flush().expect("the manifest is written");
    std::fs::metadata(path).expect("the manifest").len()
}

/// Bytes of the SQLite database in `data` (the database file and its WAL).
fn sqlite_bytes(data: &Path) -> u64 {
    ["fileflow.db", "fileflow.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(data.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

async fn pg_bytes(pool: &sqlx::PgPool) -> u64 {
    let bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
        .fetch_one(pool)
        .await
        .expect("the database's size");
    bytes as u64
}

/// One run's figures.
struct Run {
    read_secs: f64,
    total: u64,
    invalid: u64,
    completed_when_read: u64,
    rss_mib: f64,
    growth_mib: f64,
    polls_ms: Vec<f64>,
    gets_ms: Vec<f64>,
    cancel_ms: f64,
    error: Option<String>,
}

impl Bench {
    pub async fn manifest(&mut self) -> Table {
        let sizes: Vec<usize> = std::env::var("FILEFLOW_BENCH_MANIFEST_ROWS")
            .ok()
            .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
            .filter(|v: &Vec<usize>| !v.is_empty())
            .unwrap_or_else(|| vec![100_000, 1_000_000]);
        let mut table = Table::new(
            "Batches: a large manifest",
            &format!(
                "`POST /api/v1/batches` with a `manifest_url`: a CSV (`file_url,object_name`, distinct names, each \
                 row a {FILE_BYTES}-byte file from the benchmark's origin) written to disk and served from it by a \
                 loopback server in the benchmark process. One `fileflow serve` (release, defaults: workers on, 64 \
                 slots, 8 per origin host; embedded: SQLite `synchronous=FULL`, disk store; distributed: \
                 PostgreSQL + Kafka (8 partitions) + S3 (Garage), as the fair-share part runs it, the batch posted once \
                 its worker holds its partitions). Read: from \
                 sending the POST until `GET /api/v1/batches/{{id}}`, polled every {} ms, shows a status other than \
                 `reading` (so ±0.2 s). Peak RSS: the process's VmHWM over its life up to then and the GETs after. \
                 DB growth: SQLite's fileflow.db + fileflow.db-wal, PostgreSQL's `pg_database_size`, from \
                 after start to the end of reading. GET while reading: the polls; GET once read: {GETS} calls one \
                 after another, while the workers still run the jobs. Cancel: `POST …/cancel` until it answered.",
                POLL.as_millis()
            ),
            &[
                "rows",
                "stack",
                "read s",
                "rows/s",
                "completed by then",
                "peak RSS MiB",
                "DB growth MiB",
                "GET p50/p99 ms while reading",
                "GET p50/p99 ms once read",
                "cancel ms",
            ],
        );
        let manifests = self.dir("manifest-files");
        let server = FileServer::start(manifests.clone()).await;
        let file_url = self.origin.url(&format!("/file/{FILE_BYTES}"));
        for &rows in &sizes {
            let name = format!("m{rows}.csv");
            let bytes = write_manifest(&manifests.join(&name), rows, &file_url);
            println!("  manifest of {rows} rows: {:.1} MiB", bytes as f64 / MIB);
            let url = format!("{}/{name}", server.base);
            let mut stacks: Vec<Stack> = vec![("embedded (SQLite, disk)", Vec::new(), None)];
            match &self.distributed {
                Some(d) => {
                    let (env, database) = d.fresh_stack(8, true).await;
                    stacks.push(("PostgreSQL + Kafka + S3", env, Some(database)));
                }
                None => self.notes.push("manifest, distributed stack: not run (no PostgreSQL/Kafka/S3)".into()),
            }
            for (stack, env, database) in stacks {
                let run = self.manifest_run(&url, &env, database.as_deref()).await;
                if let Some(error) = &run.error {
                    self.notes.push(format!("manifest, {rows} rows, {stack}: {error}"));
                }
                let pair =
                    |xs: &[f64]| format!("{} / {}", f2(median(&mut xs.to_vec())), f2(quantile(&mut xs.to_vec(), 0.99)));
                table.row(vec![
                    rows.to_string(),
                    stack.into(),
                    f1(run.read_secs),
                    format!("{:.0}", run.total as f64 / run.read_secs),
                    run.completed_when_read.to_string(),
                    f1(run.rss_mib),
                    f1(run.growth_mib),
                    pair(&run.polls_ms),
                    pair(&run.gets_ms),
                    format!("{:.0}", run.cancel_ms),
                ]);
                if run.total != rows as u64 || run.invalid != 0 {
                    self.notes.push(format!(
                        "manifest, {rows} rows, {stack}: total {} and {} invalid after reading",
                        run.total, run.invalid
                    ));
                }
            }
            let _ = std::fs::remove_file(manifests.join(&name));
        }
        table
    }

    async fn manifest_run(&mut self, url: &str, env: &[(String, String)], database: Option<&str>) -> Run {
        let data = self.dir(&unique("manifest"));
        let serve = Fileflow::start("serve", &data, env).await;
        let pool = match database {
            Some(url) => {
                // The workers hold their partitions before the batch starts (a Kafka group
                // takes a few seconds to join), so they run while it is read.
                crate::process::wait_for_group(std::slice::from_ref(&serve), 2 * 8).await;
                Some(sqlx::PgPool::connect(url).await.expect("PostgreSQL answers"))
            }
            None => None,
        };
        let size = async |pool: &Option<sqlx::PgPool>| match pool {
            Some(pool) => pg_bytes(pool).await,
            None => sqlite_bytes(&data),
        };
        let before = size(&pool).await;
        let http = client();
        let bucket = unique("bench-manifest");
        let started = Instant::now();
        let answer = http
            .post(format!("{}/api/v1/batches", serve.base))
            .json(&json!({ "manifest_url": url, "bucket_name": bucket, "format": "csv" }))
            .send()
            .await
            .expect("fileflow answers");
        let status = answer.status();
        let created: Value = answer.json().await.expect("a batch");
        assert_eq!(status, 202, "the batch was refused: {created}");
        let id = created["id"].as_str().expect("an id").to_owned();
        let batch_url = format!("{}/api/v1/batches/{id}", serve.base);
        let get = async || -> (f64, Value) {
            let at = Instant::now();
            let batch: Value =
                http.get(&batch_url).send().await.expect("fileflow answers").json().await.expect("a batch");
            (at.elapsed().as_secs_f64() * 1000.0, batch)
        };
        let mut polls_ms = Vec::new();
        let deadline = Duration::from_secs(1800);
        let (read_secs, batch) = loop {
            tokio::time::sleep(POLL).await;
            let (ms, batch) = get().await;
            if batch["status"] != "reading" {
                break (started.elapsed().as_secs_f64(), batch);
            }
            polls_ms.push(ms);
            if started.elapsed() > deadline {
                break (started.elapsed().as_secs_f64(), batch);
            }
        };
        let after = size(&pool).await;
        println!("  read: {read_secs:.1} s, {batch}");
        let mut error = batch["read_error"].as_str().map(|e| format!("read_error: {e}"));
        if batch["status"] == "reading" {
            error = Some(format!("still reading after {} s", deadline.as_secs()));
        }
        let count = |v: &Value| v.as_u64().unwrap_or(0);
        let mut gets_ms = Vec::with_capacity(GETS);
        for _ in 0..GETS {
            gets_ms.push(get().await.0);
        }
        let (_, later) = get().await;
        println!("  after {GETS} GETs: {later}");
        let rss_mib = serve.peak_rss_mib();
        let at = Instant::now();
        let cancelled = http.post(format!("{batch_url}/cancel")).send().await.expect("fileflow answers");
        let cancel_ms = at.elapsed().as_secs_f64() * 1000.0;
        if !cancelled.status().is_success() {
            let status = cancelled.status();
            let body = cancelled.text().await.unwrap_or_default();
            error.get_or_insert(format!("cancel answered {status}: {body}"));
        }
        serve.stop().await;
        if let Some(pool) = pool {
            pool.close().await;
        }
        let _ = std::fs::remove_dir_all(&data);
        Run {
            read_secs,
            total: count(&batch["total"]),
            invalid: count(&batch["counts"]["invalid"]),
            completed_when_read: count(&batch["counts"]["completed"]),
            rss_mib,
            growth_mib: (after as f64 - before as f64) / MIB,
            polls_ms,
            gets_ms,
            cancel_ms,
            error,
        }
    }
}
