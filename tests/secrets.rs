//! Secrets in per-job headers stay out of the API and the logs. Its own test binary, so
//! it can own the global log subscriber and see every line fileflow writes.

#[path = "support/origin.rs"]
mod origin;

#[path = "support/services.rs"]
mod services;

#[path = "api/helpers.rs"]
#[allow(dead_code, unused_imports)]
mod helpers;

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::json;

use helpers::{Origin, spawn_app};

/// Collects every log line written while it is the current subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn urlencode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[tokio::test]
async fn per_job_headers_reach_the_origin_but_are_never_shown_or_logged() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let origin = Origin::start().await;
    let app = spawn_app().await;
    let secret = "Bearer s3cr3t-t0ken";
    let id = app
        .submit_body(&json!({
            "file_url": origin.url("/echo-header/authorization"),
            "bucket_name": app.bucket,
            "object_name": "private.txt",
            "headers": { "Authorization": secret },
        }))
        .await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(app.read_object("private.txt").await, secret.as_bytes());

    let (_, list) = app.get("/api/v1/uploads").await;
    for shown in [job.to_string(), list.to_string()] {
        assert!(!shown.contains("s3cr3t"), "the API showed the header: {shown}");
    }

    // At rest the header is encrypted: the database holds no trace of it, nor of its name.
    let db = app.settings.data.data_dir.join("fileflow.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await.unwrap();
    let stored: String = sqlx::query_scalar("SELECT request_headers FROM files WHERE id = ?1")
        .bind(id.parse::<i64>().unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        stored.starts_with("v1.") && !stored.contains("s3cr3t") && !stored.to_lowercase().contains("authorization"),
        "{stored}"
    );
    pool.close().await;
    // The database and its write-ahead log, where a fresh row still is before a checkpoint.
    let mut raw = std::fs::read(&db).unwrap();
    raw.extend(std::fs::read(db.with_extension("db-wal")).unwrap_or_default());
    assert!(raw.windows(11).any(|w| w == b"private.txt"), "the job's row is in the bytes read");
    assert!(!raw.windows(6).any(|w| w == b"s3cr3t"), "the database files hold the secret");

    // Tokens in a source URL's query string stay out of the logs, on success and failure
    // (a redirect carrying one, an origin error).
    let queried = origin.url("/to?url=") + &urlencode(&origin.url("/file/10?sig=qu3ry-t0ken"));
    let ok = app.submit(&format!("{queried}&auth=qu3ry-t0ken"), &app.bucket, "queried.bin").await;
    assert_eq!(app.finished(&ok).await["status"], "completed");
    let failing = app.submit(&origin.url("/status/404?sig=qu3ry-t0ken"), &app.bucket, "missing.bin").await;
    assert_eq!(app.finished(&failing).await["status"], "failed");
    app.stop().await;
    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logged.contains("job completed"), "logs were captured");
    assert!(!logged.contains("s3cr3t"), "a log line carried the header");
    assert!(!logged.contains("qu3ry-t0ken"), "a log line carried a query string");

    // Without the header the origin refuses: the header was what let the job through.
    let app = spawn_app().await;
    let id = app.submit(&origin.url("/echo-header/authorization"), &app.bucket, "no-auth").await;
    assert_eq!(app.finished(&id).await["status"], "failed");
    app.stop().await;
}
