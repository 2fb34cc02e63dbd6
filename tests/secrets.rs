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
    app.stop().await;
    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logged.contains("job completed"), "logs were captured");
    assert!(!logged.contains("s3cr3t"), "a log line carried the header");

    // Without the header the origin refuses: the header was what let the job through.
    let app = spawn_app().await;
    let id = app.submit(&origin.url("/echo-header/authorization"), &app.bucket, "no-auth").await;
    assert_eq!(app.finished(&id).await["status"], "failed");
    app.stop().await;
}
