//! Polite fetching: a limit on transfers at once per origin host, and a host's
//! `Retry-After` pausing that host's jobs only.

use std::time::{Duration, Instant};

use crate::helpers::{Origin, spawn_app_with};

#[tokio::test]
async fn transfers_per_host_are_limited_and_other_hosts_go_on() {
    let busy = Origin::start().await;
    let other = Origin::start_on("127.0.0.2").await;
    let app = spawn_app_with(|s| {
        s.worker_concurrency = 8;
        s.per_host_concurrency = 2;
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
        s.retry_max_delay = Duration::from_secs(10);
        s.max_retries = 1;
    })
    .await;
    let warm = app.submit(&other.url("/file/10"), &app.bucket, "warm").await;
    assert_eq!(app.finished(&warm).await["status"], "completed");
    let first = app.submit(&paused.url("/status/503?retry_after=3"), &app.bucket, "asked").await;
    app.wait_until(&first, Duration::from_secs(5), |j| j["retry_count"] == 1).await;
    let asked_at = Instant::now();
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

/// With the default settings, a dozen jobs from an origin that trickles (2 KiB/s, above
/// the rate floor, so never cut) hold at most half the transfer slots: a small job from
/// another host, submitted after them, completes at once.
#[tokio::test]
async fn a_slow_origin_cannot_take_every_slot_by_default() {
    let slow = Origin::start().await;
    let other = Origin::start_on("127.0.0.2").await;
    let app = spawn_app_with(|_| {}).await;
    let warm = app.submit(&other.url("/file/10"), &app.bucket, "warm").await;
    assert_eq!(app.finished(&warm).await["status"], "completed");
    let mut trickling = Vec::new();
    for i in 0..12 {
        let url = slow.url(&format!("/slow/40960?chunk=2048&every_ms=1000&seed={i}"));
        trickling.push(app.submit(&url, &app.bucket, &format!("slow/{i}")).await);
    }
    // The slow jobs have their slots before the small one comes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut receiving = 0;
        for id in &trickling {
            receiving += usize::from(app.job(id).await["bytes_done"].as_u64().unwrap_or(0) > 0);
        }
        if receiving >= 4 {
            assert_eq!(receiving, 4, "at most four transfers at once from one host");
            break;
        }
        assert!(Instant::now() < deadline, "the slow host's transfers did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    let small = app.submit(&other.url("/file/1000"), &app.bucket, "small").await;
    assert_eq!(app.finished(&small).await["status"], "completed");
    let waited = started.elapsed();
    println!("small job done in {waited:?} beside a trickling origin");
    assert!(waited < Duration::from_secs(2), "the small job waited behind the slow origin: {waited:?}");
    for id in &trickling {
        app.call(reqwest::Method::POST, &format!("/api/v1/uploads/{id}/cancel"), None, None).await;
    }
    app.stop().await;
}
