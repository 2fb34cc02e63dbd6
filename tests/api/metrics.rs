//! `/metrics`: Prometheus text with the jobs' outcomes, bytes, transfers and the API's
//! requests by route; admin keys only once keys exist.

use fileflow::auth::KeyLimits;

use crate::helpers::{Origin, TestApp, spawn_app};

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
