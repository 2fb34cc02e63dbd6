//! Cancelling jobs: a waiting one at once, a running transfer within about a second with
//! nothing stored, a finished one refused.

use std::time::{Duration, Instant};

use reqwest::Method;

use crate::helpers::{Origin, spawn_app, spawn_app_with};

#[tokio::test]
async fn a_running_transfer_stops_within_a_second_and_stores_nothing() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    // 24 MiB at about 6 MiB/s: several seconds, past the first part of a multipart upload.
    let id = app.submit(&origin.url("/slow/25165824?every_ms=10"), &app.bucket, "big.bin").await;
    app.wait_until(&id, Duration::from_secs(10), |j| j["status"] == "processing").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let asked = Instant::now();
    let (status, _, job) = app.call(Method::POST, &format!("/api/v1/uploads/{id}/cancel"), None, None).await;
    assert_eq!(status, 202, "{job}");
    assert!(["processing", "cancelled"].contains(&job["status"].as_str().unwrap()), "{job}");
    let job = app.wait_until(&id, Duration::from_secs(5), |j| j["status"] == "cancelled").await;
    let took = asked.elapsed();
    assert!(took < Duration::from_millis(2500), "stopped {took:?} after the request");
    assert!(job["download_url"].is_null() && job["etag"].is_null(), "{job}");
    assert_eq!(app.try_read_object("big.bin").await, None);
    assert!(app.stored_objects().await.is_empty(), "left behind: {:?}", app.stored_objects().await);
    let (status, _, answer) = app.call(Method::POST, &format!("/api/v1/uploads/{id}/cancel"), None, None).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (409, Some("wrong_state")), "{answer}");
    println!("cancelled {took:?} after the request");
    app.stop().await;
}

#[tokio::test]
async fn a_waiting_retry_is_dropped() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| {
        s.retry.base_delay = Duration::from_secs(2);
        s.retry.max_delay = Duration::from_secs(2);
    })
    .await;
    let id = app.submit(&origin.url("/status/503"), &app.bucket, "later.bin").await;
    let job = app.wait_until(&id, Duration::from_secs(10), |j| j["retry_count"] == 1).await;
    assert_eq!(job["status"], "pending", "{job}");
    let (status, _, job) = app.call(Method::POST, &format!("/api/v1/uploads/{id}/cancel"), None, None).await;
    assert_eq!((status, job["status"].as_str()), (202, Some("cancelled")), "{job}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let job = app.job(&id).await;
    assert_eq!((job["status"].as_str(), job["retry_count"].as_u64()), (Some("cancelled"), Some(1)), "{job}");
    assert_eq!(origin.hits("/status/503"), 1, "the retry never ran");
    let (_, listed) = app.get("/api/v1/uploads?status=cancelled").await;
    assert_eq!(listed["uploads"][0]["id"], id.as_str());
    app.stop().await;
}

#[tokio::test]
async fn finished_and_unknown_jobs_cannot_be_cancelled() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let id = app.submit(&origin.url("/file/100"), &app.bucket, "done.bin").await;
    assert_eq!(app.finished(&id).await["status"], "completed");
    let (status, ..) = app.call(Method::POST, &format!("/api/v1/uploads/{id}/cancel"), None, None).await;
    assert_eq!(status, 409);
    assert_eq!(app.job(&id).await["status"], "completed");
    let (status, ..) = app.call(Method::POST, "/api/v1/uploads/424242/cancel", None, None).await;
    assert_eq!(status, 404);
    app.stop().await;
}
