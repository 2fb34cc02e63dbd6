//! Polite fetching: a limit on transfers at once per origin host, and a host's
//! `Retry-After` pausing that host's jobs only.

use std::time::{Duration, Instant};

use crate::helpers::{Origin, spawn_app_with};

#[tokio::test]
async fn transfers_per_host_are_limited_and_other_hosts_go_on() {
    let busy = Origin::start().await;
    let other = Origin::start_on("127.0.0.2").await;
    let app = spawn_app_with(|s| {
        s.worker.worker_concurrency = 8;
        s.worker.per_host_concurrency = 2;
    })
    .await;
    // Workers up and taking jobs (a Kafka consumer group takes a few seconds to join).
    let warm = app.submit(&other.url("/file/10"), &app.bucket, "warm").await;
    assert_eq!(app.finished(&warm).await["status"], "completed");
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(app.submit(&busy.url("/delay/300/100"), &app.bucket, &format!("busy/{i}")).await);
    }
    let started = Instant::now();
    let url = other.url("/delay/50/100");
    let mut quick = Vec::new();
    for i in 0..3 {
        quick.push(app.submit(&url, &app.bucket, &format!("other/{i}")).await);
    }
    for id in &quick {
        assert_eq!(app.finished(id).await["status"], "completed");
    }
    let other_done = started.elapsed();
    for id in &ids {
        assert_eq!(app.finished(id).await["status"], "completed");
    }
    assert_eq!(busy.most_at_once(), 2, "at most two transfers at once from the busy host");
    assert!(other_done < Duration::from_millis(1000), "the other host waited: {other_done:?}");
    println!("other host's jobs done in {other_done:?} while the busy host's queued");
    app.stop().await;
}

#[tokio::test]
async fn a_hosts_retry_after_pauses_its_jobs_only() {
    let paused = Origin::start().await;
    let other = Origin::start_on("127.0.0.2").await;
    let app = spawn_app_with(|s| {
        s.retry.max_delay = Duration::from_secs(10);
        s.retry.max_retries = 1;
    })
    .await;
    let warm = app.submit(&other.url("/file/10"), &app.bucket, "warm").await;
    assert_eq!(app.finished(&warm).await["status"], "completed");
    let first = app.submit(&paused.url("/status/503?retry_after=3"), &app.bucket, "asked").await;
    app.wait_until(&first, Duration::from_secs(5), |j| j["retry_count"] == 1).await;
    let asked_at = Instant::now();
    // A throttled job keeps asking (it has the throttled budget): cancel it, so the pause
    // it caused is the only one.
    let cancelled = app.client.post(app.url(&format!("/api/v1/uploads/{first}/cancel"))).send().await.unwrap();
    assert!(cancelled.status().is_success(), "{}", cancelled.status());
    let waiting = app.submit(&paused.url("/file/100"), &app.bucket, "same-host").await;
    let elsewhere = app.submit(&other.url("/file/100"), &app.bucket, "other-host").await;
    assert_eq!(app.finished(&elsewhere).await["status"], "completed");
    assert!(asked_at.elapsed() < Duration::from_secs(1), "the other host was held up");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(paused.hits("/file/100"), 0, "the paused host was asked again before its Retry-After");
    let job = app.finished(&waiting).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["retry_count"], 0, "waiting for the host is not an attempt");
    assert!(asked_at.elapsed() >= Duration::from_millis(2500), "served after {:?}", asked_at.elapsed());
    app.stop().await;
}
