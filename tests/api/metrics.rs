//! `/metrics`: Prometheus text with the jobs' outcomes, bytes, transfers and the API's
//! requests by route; admin keys only once keys exist.

use fileflow::auth::KeyLimits;

use serde_json::json;

use crate::helpers::{Origin, TestApp, spawn_app, spawn_app_with};

async fn scrape(app: &TestApp, key: Option<&str>) -> (u16, String) {
    let mut request = app.client.get(app.url("/metrics"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    if status == 200 {
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    }
    (status, response.text().await.unwrap())
}

/// The value of the sample `name` (with its labels, exactly as written), if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_count_what_jobs_and_requests_did() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let good = app.submit(&origin.url("/file/5000?seed=1"), &app.bucket, "ok.bin").await;
    let bad = app.submit(&origin.url("/status/404"), &app.bucket, "missing.bin").await;
    assert_eq!(app.finished(&good).await["status"], "completed");
    assert_eq!(app.finished(&bad).await["status"], "failed");

    let (status, text) = scrape(&app, None).await;
    assert_eq!(status, 200, "{text}");
    for (name, expected) in [
        ("fileflow_jobs_accepted_total", 2.0),
        ("fileflow_jobs_completed_total", 1.0),
        ("fileflow_jobs_failed_total{reason=\"origin_status\"}", 1.0),
        ("fileflow_bytes_stored_total", 5000.0),
        ("fileflow_transfer_duration_seconds_count", 1.0),
        ("fileflow_transfer_size_bytes_count", 1.0),
        ("fileflow_transfers_in_flight", 0.0),
        ("fileflow_http_requests_total{method=\"POST\",route=\"/api/v1/upload\",status=\"202\"}", 2.0),
    ] {
        assert_eq!(sample(&text, name), Some(expected), "{name} in\n{text}");
    }
    assert!(
        sample(&text, "fileflow_http_requests_total{method=\"GET\",route=\"/api/v1/uploads/{id}\",status=\"200\"}")
            .unwrap()
            >= 2.0
    );
    assert!(text.contains("fileflow_http_request_duration_seconds_bucket{le="), "{text}");
    assert!(text.trim_end().ends_with("# EOF"));

    // Once keys exist, metrics are for admins.
    let (_, admin) = app.create_key("admin", &[], KeyLimits::default()).await;
    let (_, submitter) = app.create_key("submitter", &[], KeyLimits::default()).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(scrape(&app, None).await.0, 401);
    assert_eq!(scrape(&app, Some(&submitter)).await.0, 403);
    assert_eq!(scrape(&app, Some(&admin)).await.0, 200);
    app.stop().await;
}

/// Failed jobs are counted by what failed, as the worker classified it where it happened.
#[tokio::test]
async fn failed_jobs_are_counted_by_what_failed() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| {
        s.store.max_file_size = bytesize::ByteSize::b(10_000);
        s.retry.max_retries = 1;
    })
    .await;
    let existing = app.submit(&origin.url("/file/100"), &app.bucket, "there.bin").await;
    assert_eq!(app.finished(&existing).await["status"], "completed");
    let failing = [
        json!({ "file_url": origin.url("/status/404"), "object_name": "gone.bin" }),
        json!({ "file_url": origin.url("/status/503"), "object_name": "down.bin" }),
        json!({ "file_url": origin.url("/file/20000"), "object_name": "big.bin" }),
        json!({ "file_url": origin.url("/file/100"), "object_name": "sum.bin", "sha256": "0".repeat(64) }),
        json!({ "file_url": origin.url("/reset/4000"), "object_name": "cut.bin" }),
        json!({ "file_url": origin.url("/file/100"), "object_name": "there.bin", "if_exists": "fail" }),
    ];
    for mut body in failing {
        body["bucket_name"] = json!(app.bucket);
        let id = app.submit_body(&body).await;
        assert_eq!(app.finished(&id).await["status"], "failed", "{body}");
    }
    let (_, text) = scrape(&app, None).await;
    for (reason, expected) in [
        ("origin_status", 1.0),
        ("throttled", 1.0),
        ("too_large", 1.0),
        ("verification", 1.0),
        ("network", 1.0),
        ("exists", 1.0),
    ] {
        let name = format!("fileflow_jobs_failed_total{{reason=\"{reason}\"}}");
        assert_eq!(sample(&text, &name), Some(expected), "{name} in\n{text}");
    }
    assert_eq!(sample(&text, "fileflow_jobs_failed_total{reason=\"other\"}"), None, "{text}");
    // Each 503 answer (one per attempt of the failed job) halved its host's window.
    let attempts = 1.0 + sample(&text, "fileflow_jobs_retried_total").unwrap_or(0.0);
    assert!(sample(&text, "fileflow_origin_throttled_total").is_some_and(|n| n >= 1.0 && n <= attempts), "{text}");
    app.stop().await;
}

/// The series `/metrics` holds (sample lines, comments left out).
fn series(text: &str) -> usize {
    text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count()
}

#[tokio::test]
async fn made_up_methods_and_paths_do_not_grow_the_metrics() {
    use futures::StreamExt as _;
    let app = spawn_app().await;
    // One of each kind first, so every series they can fall in exists.
    let odd = |i: usize| reqwest::Method::from_bytes(format!("XA{i:X}B{}", i * 7).as_bytes()).unwrap();
    let paths = |i: usize| [format!("/api/v1/uploads/{i}"), format!("/no/such/{i}/{}", i * 31), format!("/x{i}")];
    let send = |i: usize| {
        let app = &app;
        async move {
            let method = if i.is_multiple_of(2) { odd(i) } else { reqwest::Method::GET };
            let path = &paths(i)[i % 3];
            let response = app.client.request(method, app.url(path)).send().await.unwrap();
            response.status().as_u16()
        }
    };
    for i in 0..12 {
        send(i).await;
    }
    // A scrape counts itself after it is written: the first one's series show from the second.
    scrape(&app, None).await;
    let (_, before) = scrape(&app, None).await;
    let statuses: Vec<u16> = futures::stream::iter(12..10_012).map(send).buffer_unordered(16).collect().await;
    assert_eq!(statuses.len(), 10_000);
    let (_, after) = scrape(&app, None).await;
    assert_eq!(series(&after), series(&before), "before:\n{before}\nafter:\n{after}");
    assert!(!after.contains("XA"), "a made-up method became a label");
    assert!(!after.contains("/no/such") && !after.contains("/x1"), "a path became a label");
    let other: f64 = after
        .lines()
        .filter(|l| l.starts_with("fileflow_http_requests_total{method=\"other\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(other >= 5_000.0, "made-up methods are counted as other: {other}");
    app.stop().await;
}
