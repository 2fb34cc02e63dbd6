//! Fair share: one key's backlog does not hold up another key's job, weights and
//! priorities order what waits. Asserted by order (how much of the backlog was still
//! waiting when the other job finished), not by time.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Origin, TestApp, spawn_app_with};
use fileflow::auth::{AuthMode, KeyLimits};

/// Jobs of 100 ms each, so a backlog of `n` takes n / slots × 100 ms to drain.
const SLOW: &str = "/delay/100/10";

async fn submit_batch(app: &TestApp, key: Option<&str>, items: Vec<Value>) {
    let (status, _, answer) =
        app.call(Method::POST, "/api/v1/uploads/batch", key, Some(&json!({ "items": items }))).await;
    assert!(status == 202 || status == 207, "{status} {answer}");
    assert!(answer["results"].as_array().unwrap().iter().all(|r| r["id"].is_string()), "{answer}");
}

/// How many of `key`'s jobs are not finished yet (pending or processing).
async fn waiting(app: &TestApp, key: Option<&str>) -> usize {
    let mut count = 0;
    for status in ["pending", "processing"] {
        let mut before = String::new();
        loop {
            let path = format!("/api/v1/uploads?status={status}&limit=1000{before}");
            let (code, _, listed) = app.call(Method::GET, &path, key, None).await;
            assert_eq!(code, 200, "{listed}");
            let page = listed["uploads"].as_array().unwrap();
            count += page.len();
            match listed["next_before"].as_str() {
                Some(next) if page.len() == 1000 => before = format!("&before={next}"),
                _ => break,
            }
        }
    }
    count
}

/// Wait (30 s at most) until the workers finished one of `key`'s `backlog` jobs.
async fn started(app: &TestApp, key: Option<&str>, backlog: usize) {
    for _ in 0..600 {
        if waiting(app, key).await < backlog {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no job of the backlog finished in 30 s");
}

async fn finished_as(app: &TestApp, id: &str, key: Option<&str>) -> Value {
    for _ in 0..600 {
        let (_, _, job) = app.call(Method::GET, &format!("/api/v1/uploads/{id}"), key, None).await;
        if ["completed", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or_default()) {
            return job;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("job {id} did not finish in 30 s");
}

#[tokio::test]
async fn one_keys_backlog_does_not_hold_up_another_key() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| {
        s.auth.mode = AuthMode::Required;
        s.worker.worker_concurrency = 4;
        s.kafka.max_backlog = 20;
    })
    .await;
    let (_, busy) = app.create_key("admin", &[], KeyLimits::default()).await;
    let (_, other) = app.create_key("admin", &[], KeyLimits::default()).await;
    let backlog = 300;
    let items = (0..backlog)
        .map(|i| json!({ "file_url": origin.url(SLOW), "bucket_name": app.bucket, "object_name": format!("busy/{i}") }))
        .collect();
    submit_batch(&app, Some(&busy), items).await;
    // The workers are at the backlog.
    started(&app, Some(&busy), backlog).await;
    let body = json!({ "file_url": origin.url(SLOW), "bucket_name": app.bucket, "object_name": "other/1" });
    let (status, _, accepted) = app.call(Method::POST, "/api/v1/upload", Some(&other), Some(&body)).await;
    assert_eq!(status, 202, "{accepted}");
    let job = finished_as(&app, accepted["id"].as_str().unwrap(), Some(&other)).await;
    assert_eq!(job["status"], "completed", "{job}");
    let left = waiting(&app, Some(&busy)).await;
    println!("the other key's job finished with {left} of {backlog} of the busy key's still waiting");
    // First come, first served would have run all 300 first; in turns, it waits for the
    // jobs already claimed or on the topic (the embedded queue's claim-ahead, the Kafka
    // bound of 20) and little else.
    assert!(left >= backlog / 2, "{left} of {backlog} left: the other key waited behind the backlog");
    app.stop().await;
}

#[tokio::test]
async fn a_higher_priority_job_overtakes_the_same_keys_backlog() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| {
        s.worker.worker_concurrency = 4;
        s.kafka.max_backlog = 20;
    })
    .await;
    let backlog = 200;
    let items = (0..backlog)
        .map(|i| json!({ "file_url": origin.url(SLOW), "bucket_name": app.bucket, "object_name": format!("low/{i}") }))
        .collect();
    submit_batch(&app, None, items).await;
    started(&app, None, backlog).await;
    let urgent = app
        .submit_body(
            &json!({ "file_url": origin.url(SLOW), "bucket_name": app.bucket, "object_name": "urgent", "priority": 9 }),
        )
        .await;
    let job = app.finished(&urgent).await;
    assert_eq!((job["status"].as_str(), job["priority"].as_u64()), (Some("completed"), Some(9)), "{job}");
    let left = waiting(&app, None).await;
    println!("the priority-9 job finished with {left} of {backlog} priority-0 jobs still waiting");
    assert!(left >= backlog / 2, "{left} of {backlog} left: the urgent job waited behind the backlog");
    app.stop().await;
}

#[tokio::test]
async fn a_priority_out_of_range_is_refused() {
    let app = spawn_app_with(|_| {}).await;
    for bad in [json!(-1), json!(2_147_483_648u64), json!("high"), json!(1.5)] {
        let body = json!({ "file_url": "https://example.com/a", "bucket_name": app.bucket, "object_name": "a", "priority": bad });
        let (status, _, answer) = app.call(Method::POST, "/api/v1/upload", None, Some(&body)).await;
        assert_eq!(status, 422, "{bad}: {answer}");
        assert_eq!(answer["error"]["field"], "priority", "{answer}");
    }
    app.stop().await;
}
