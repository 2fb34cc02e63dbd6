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

/// The case, on the default settings: 12 jobs from an origin that sends 2 KiB/s
/// (above the minimum rate, so never cut) hold only their host's share of the slots, and
/// a small job from another host is done while they all still run.
#[tokio::test]
async fn a_slow_origin_holds_only_its_hosts_share_of_the_default_slots() {
    let slow = Origin::start().await;
    let other = Origin::start_on("127.0.0.2").await;
    let app = spawn_app_with(|_| {}).await;
    let warm = app.submit(&other.url("/file/10"), &app.bucket, "warm").await;
    assert_eq!(app.finished(&warm).await["status"], "completed");
    // 2 KiB every second: 30 s per job, far longer than the rest of the test.
    let url = slow.url("/slow/61440?chunk=2048&every_ms=1000");
    let mut crawling = Vec::new();
    for i in 0..12 {
        crawling.push(app.submit(&url, &app.bucket, &format!("slow/{i}")).await);
    }
    // The slow host has every place it may take.
    for _ in 0..200 {
        if slow.streaming() >= 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(slow.streaming(), 8, "the slow host gets its --per-host-concurrency (8)");
    let quick = app.submit(&other.url("/file/1000"), &app.bucket, "quick").await;
    let job = app.finished(&quick).await;
    assert_eq!(job["status"], "completed", "{job}");
    // Done while every slow job still runs or waits.
    for id in &crawling {
        let (_, _, job) = app.call(reqwest::Method::GET, &format!("/api/v1/uploads/{id}"), None, None).await;
        assert!(["pending", "processing"].contains(&job["status"].as_str().unwrap()), "{job}");
    }
    assert_eq!(slow.most_streaming(), 8, "never more than 8 at once from the slow host");
    for id in &crawling {
        let (status, _, answer) =
            app.call(reqwest::Method::POST, &format!("/api/v1/uploads/{id}/cancel"), None, None).await;
        assert!(status == 200 || status == 202, "{status} {answer}");
    }
    app.stop().await;
}

/// `--host-rate`: the bytes a second from a host the operator names are capped across its
/// transfers; other hosts are not paced, and what is stored is still the origin's bytes.
#[tokio::test]
async fn a_host_rate_caps_that_hosts_bytes_a_second_across_its_transfers() {
    let capped = Origin::start().await;
    let other = Origin::start_on("127.0.0.2").await;
    let app = spawn_app_with(|s| s.worker.host_rates = vec!["127.0.0.1=256KiB".parse().unwrap()]).await;
    let warm = app.submit(&other.url("/file/10"), &app.bucket, "warm").await;
    assert_eq!(app.finished(&warm).await["status"], "completed");
    let started = Instant::now();
    let mut paced = Vec::new();
    for i in 0..2 {
        paced
            .push(app.submit(&capped.url(&format!("/file/524288?seed={i}")), &app.bucket, &format!("paced/{i}")).await);
    }
    let free = app.submit(&other.url("/file/524288"), &app.bucket, "free").await;
    assert_eq!(app.finished(&free).await["status"], "completed");
    let free_took = started.elapsed();
    for id in &paced {
        let job = app.finished(id).await;
        assert_eq!((job["status"].as_str(), job["size"].as_u64()), (Some("completed"), Some(524_288)), "{job}");
    }
    let paced_took = started.elapsed();
    // 1 MiB at 256 KiB/s: 4 s, less the first tenth of a second's burst.
    assert!(paced_took >= Duration::from_millis(3700), "the capped host's 1 MiB took {paced_took:?}");
    assert!(free_took < Duration::from_secs(2), "the other host was paced too: {free_took:?}");
    println!("capped host: 1 MiB in {paced_took:?}; other host: 512 KiB in {free_took:?}");
    app.stop().await;
}
