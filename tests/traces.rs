//! Traces exported over OTLP from the real binary to a collector: a request's span
//! continues its caller's trace, and the transfer it started is that span's child.

#[path = "support/collector.rs"]
mod collector;

#[path = "support/origin.rs"]
mod origin;

#[path = "support/process.rs"]
mod process;

use std::time::{Duration, Instant};

use collector::Collector;
use origin::Origin;
use process::start;

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn serve_exports_the_request_and_its_transfer_in_the_callers_trace_and_flushes_at_exit() {
    let collector = Collector::start().await;
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Batches would wait a minute: what arrives was sent by the shutdown.
    let endpoint = collector.endpoint();
    let env = [("FILEFLOW_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "60000")];
    let mut app = start(dir.path(), &env).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let submit = |path: &str, key: &str, traceparent: Option<String>| {
        let mut request = client.post(format!("{}/api/v1/upload", app.base)).json(&serde_json::json!({
            "file_url": origin.url(path), "bucket_name": "traced", "object_name": key
        }));
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        request.send()
    };
    let good = submit("/file/5000", "good.bin", Some(format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))).await.unwrap();
    assert_eq!(good.status(), 202);
    let good = good.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let gone = submit("/status/404", "gone.bin", None).await.unwrap();
    let gone = gone.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.job(&good).await["status"] != "completed" || app.job(&gone).await["status"] != "failed" {
        assert!(Instant::now() < deadline, "jobs did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(collector.spans().is_empty(), "spans were sent before the batch was due");
    app.signal("-TERM");
    let exit = tokio::time::timeout(Duration::from_secs(15), app.child.wait()).await.unwrap().unwrap();
    assert!(exit.success());

    let spans = collector.spans();
    let request = spans
        .iter()
        .find(|s| s.name == "POST /api/v1/upload" && s.trace_id == CALLER_TRACE)
        .unwrap_or_else(|| panic!("no span for the traced request: {spans:#?}"));
    assert_eq!(request.parent_span_id, CALLER_SPAN, "the request continues its caller's span");
    assert_eq!((request.service.as_str(), request.process.as_str()), ("fileflow", "serve"));
    assert_eq!(request.attribute("http.response.status_code"), Some("202"));
    assert_eq!(request.attribute("http.route"), Some("/api/v1/upload"));
    assert!(request.events.iter().any(|e| e == "job accepted"), "{request:?}");

    let transfer = spans
        .iter()
        .find(|s| s.name == "transfer" && s.attribute("job_id") == Some(good.as_str()))
        .unwrap_or_else(|| panic!("no span for the transfer: {spans:#?}"));
    assert_eq!(transfer.trace_id, CALLER_TRACE, "the transfer is in the request's trace");
    assert_eq!(transfer.parent_span_id, request.span_id, "the transfer is the request's child");
    assert_eq!(transfer.attribute("outcome"), Some("completed"));
    assert_ne!(transfer.status, 2);
    assert!(transfer.events.iter().any(|e| e == "job completed"), "{transfer:?}");

    // A request without a caller's trace starts one; its failed transfer is an error.
    let failed = spans
        .iter()
        .find(|s| s.name == "transfer" && s.attribute("job_id") == Some(gone.as_str()))
        .unwrap_or_else(|| panic!("no span for the failed transfer: {spans:#?}"));
    assert_eq!(failed.attribute("outcome"), Some("failed"));
    assert_eq!(failed.status, 2, "a failed transfer is an error span");
    let started = spans.iter().find(|s| s.span_id == failed.parent_span_id).expect("its request was exported");
    assert_eq!(started.name, "POST /api/v1/upload");
    assert!(started.parent_span_id.is_empty(), "a request with no traceparent is a root span");
    assert_ne!(started.trace_id, CALLER_TRACE);
    assert_eq!(started.trace_id, failed.trace_id);
}
