//! The real binary, killed and restarted: no accepted job is lost, whatever the signal.

#[path = "support/origin.rs"]
mod origin;

#[path = "support/process.rs"]
mod process;

use std::time::{Duration, Instant};

use origin::{Origin, content};
use process::start;

#[tokio::test]
async fn kill_9_with_jobs_waiting_and_in_flight_loses_nothing() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = [("FILEFLOW_WORKER_CONCURRENCY", "2"), ("FILEFLOW_JOB_LEASE", "1s")];
    let first = start(dir.path(), &env).await;
    let mut ids = Vec::new();
    for i in 0..12u64 {
        let url = origin.url(&format!("/delay/1500/{}?seed={i}", 10_000 + i));
        ids.push((i, first.submit(&url, &format!("crash/{i}")).await));
    }
    // Wait until the worker holds jobs (two mid-transfer, up to two more claimed ahead)
    // while others still wait in the queue, then kill without warning.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let statuses = first.statuses().await;
        let count = |status: &str| statuses.iter().filter(|(_, s)| s == status).count();
        if count("processing") >= 2 && count("pending") > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "jobs never started: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut first = first;
    first.kill().await;

    let second = start(dir.path(), &env).await;
    // The jobs the dead process held were handed back at the restart.
    let handed_back: u64 = second
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["message"] == "handed back the jobs of a process that is gone")
        .map(|e| e["jobs"].as_u64().unwrap())
        .sum();
    assert!(handed_back >= 2, "the kill left jobs in flight: {handed_back} handed back");
    second.wait_all_completed(12, Duration::from_secs(60)).await;
    for (i, id) in ids {
        let job = second.job(&id).await;
        assert_eq!(job["size"], 10_000 + i, "{job}");
        let stored = std::fs::read(dir.path().join("objects/file-bucket/crash").join(i.to_string())).unwrap();
        assert!(stored == content(i, 10_000 + i), "job {id} stored wrong bytes");
    }
}

#[tokio::test]
async fn sigterm_lets_jobs_in_flight_finish_within_the_grace_period() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = [("FILEFLOW_WORKER_CONCURRENCY", "4"), ("FILEFLOW_SHUTDOWN_GRACE", "20s")];
    for signal in ["-TERM", "-INT"] {
        let mut app = start(dir.path(), &env).await;
        let a = app.submit(&origin.url("/delay/1000/2000?seed=1"), &format!("{signal}/a")).await;
        let b = app.submit(&origin.url("/delay/1000/3000?seed=2"), &format!("{signal}/b")).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while app.job(&a).await["status"] != "processing" || app.job(&b).await["status"] != "processing" {
            assert!(Instant::now() < deadline, "jobs never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stopping = Instant::now();
        app.signal(signal);
        let exit = tokio::time::timeout(Duration::from_secs(15), app.child.wait()).await.unwrap().unwrap();
        assert!(exit.success(), "{signal}: {exit:?}");
        assert!(stopping.elapsed() < Duration::from_secs(10));

        let after = start(dir.path(), &env).await;
        assert_eq!(after.job(&a).await["status"], "completed", "{signal}");
        assert_eq!(after.job(&b).await["size"], 3000, "{signal}");
        drop(after);
    }
}

#[tokio::test]
async fn proxy_environment_variables_are_ignored() {
    let origin = Origin::start().await;
    let proxy = origin::Canary::start("127.0.0.1:0").await;
    let proxy_url = format!("http://{}", proxy.addr);
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("HTTP_PROXY", proxy_url.as_str()),
        ("http_proxy", proxy_url.as_str()),
        ("HTTPS_PROXY", proxy_url.as_str()),
        ("ALL_PROXY", proxy_url.as_str()),
    ];
    let app = start(dir.path(), &env).await;
    let id = app.submit(&origin.url("/file/1000"), "direct").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.job(&id).await["status"] != "completed" {
        assert!(Instant::now() < deadline, "{}", app.job(&id).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(proxy.hits(), 0, "the proxy from the environment was used");
    assert_eq!(origin.hits("/file/1000"), 1);
}

/// After kill -9, a restarted `serve` resumes the jobs its predecessor had in flight at
/// once: their leases (30 s here) belong to a process that is gone.
#[tokio::test]
async fn a_restarted_serve_resumes_its_jobs_without_waiting_out_their_leases() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = [("FILEFLOW_WORKER_CONCURRENCY", "2"), ("FILEFLOW_JOB_LEASE", "30s")];
    let mut first = start(dir.path(), &env).await;
    let mut ids = Vec::new();
    for i in 0..4u64 {
        ids.push(
            first.submit(&origin.url(&format!("/delay/2000/{}?seed={i}", 5_000 + i)), &format!("resume/{i}")).await,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while first.statuses().await.iter().filter(|(_, s)| s == "processing").count() < 2 {
        assert!(Instant::now() < deadline, "jobs never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().await;

    let restarted = Instant::now();
    let second = start(dir.path(), &env).await;
    second.wait_all_completed(4, Duration::from_secs(20)).await;
    let took = restarted.elapsed();
    assert!(took < Duration::from_secs(15), "jobs waited for their dead leases: {took:?}");
    assert!(
        second.events.lock().unwrap().iter().any(|e| e["message"] == "handed back the jobs of a process that is gone"),
        "the restart said what it recovered"
    );
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(second.job(id).await["size"], 5_000 + i as u64);
    }
}

/// kill -9 in the middle of writing a large object leaves a staging file behind; it never
/// becomes the object, and the next process removes it once no live write can be that old.
#[tokio::test]
async fn a_kill_mid_write_leaves_no_staging_file_for_good() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = [("FILEFLOW_TRANSFER_TIMEOUT", "3s"), ("FILEFLOW_SHUTDOWN_GRACE", "1s"), ("FILEFLOW_JOB_LEASE", "1s")];
    let mut first = start(dir.path(), &env).await;
    // 4 MiB in 8 pieces over 2.4 s: the store starts its staged write after the first MiB.
    let id = first.submit(&origin.url("/versioned/mid/4194304?seed=5&slow_ms=2400"), "mid/big.bin").await;
    let bucket = dir.path().join("objects/file-bucket/mid");
    let staging = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.contains('#')).collect()
            })
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while staging(&bucket).is_empty() {
        assert!(Instant::now() < deadline, "the write never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().await;
    let left = staging(&bucket);
    assert!(!left.is_empty(), "killed mid-write");

    let second = start(dir.path(), &env).await;
    second.wait_all_completed(1, Duration::from_secs(30)).await;
    assert_eq!(std::fs::read(bucket.join("big.bin")).unwrap(), content(5, 4_194_304), "job {id}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while staging(&bucket).iter().any(|name| left.contains(name)) {
        assert!(Instant::now() < deadline, "the dead write's staging file is still there: {:?}", staging(&bucket));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A webhook is delivered at least once from its durable outbox: the receiver is down,
/// fileflow is killed while it retries, and the restarted process delivers it, signed.
#[tokio::test]
async fn a_webhook_outlives_a_kill_9_and_is_delivered_after_the_restart() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A port with nothing listening yet: where the receiver will be.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let env = [
        ("FILEFLOW_WEBHOOK_SECRET", SECRET),
        ("FILEFLOW_RETRY_BASE_DELAY", "200ms"),
        ("FILEFLOW_RETRY_MAX_DELAY", "2s"),
    ];
    let first = start(dir.path(), &env).await;
    let body = serde_json::json!({
        "file_url": origin.url("/file/100"), "bucket_name": "file-bucket", "object_name": "hooked",
        "notify_url": format!("http://127.0.0.1:{port}/hook"),
    });
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let created: serde_json::Value =
        client.post(format!("{}/api/v1/upload", first.base)).json(&body).send().await.unwrap().json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let job = first.job(&id).await;
        let tries = job["webhooks"][0]["attempts"].as_array().map_or(0, Vec::len);
        if job["status"] == "completed" && tries >= 1 {
            assert!(job["webhooks"][0]["attempts"][0]["error"].is_string(), "{job}");
            break;
        }
        assert!(Instant::now() < deadline, "no failed try yet: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut first = first;
    first.kill().await;

    // The receiver comes up; the restarted process finds the delivery in its outbox.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(axum::http::HeaderMap, String)>();
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((headers, body));
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, receiver).await.unwrap() });
    let second = start(dir.path(), &env).await;
    let (headers, delivered) =
        tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("delivered").unwrap();
    standardwebhooks::Webhook::new(SECRET).unwrap().verify(delivered.as_bytes(), &headers).expect("signed");
    let event: serde_json::Value = serde_json::from_str(&delivered).unwrap();
    assert_eq!((event["type"].as_str(), event["data"]["id"].as_str()), (Some("upload.completed"), Some(id.as_str())));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !second.job(&id).await["webhooks"][0]["delivered_at"].is_string() {
        assert!(Instant::now() < deadline, "the delivery was not recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_transfer_cut_by_kill_9_goes_on_from_its_last_part_after_the_restart() {
    const MIB: u64 = 1024 * 1024;
    let size = 64 * MIB;
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = [("FILEFLOW_JOB_LEASE", "1s")];
    let mut first = start(dir.path(), &env).await;
    // 1 MiB every 40 ms: a few seconds, checkpoints every 16 MiB on the way.
    let id = first.submit(&origin.url(&format!("/resumable/killed/{size}?seed=5&every_ms=40")), "resumed.bin").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let done = first.job(&id).await["bytes_done"].as_u64().unwrap_or(0);
        if done >= 40 * MIB {
            break;
        }
        assert!(Instant::now() < deadline, "the transfer never got far");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().await;
    let staged = std::fs::read_dir(dir.path().join("objects/file-bucket")).unwrap().count();
    assert_eq!(staged, 1, "the staging file stays for the next process");

    let second = start(dir.path(), &env).await;
    second.wait_all_completed(1, Duration::from_secs(60)).await;
    let job = second.job(&id).await;
    let expected = content(5, size);
    assert_eq!(job["size"], size, "{job}");
    let stored = std::fs::read(dir.path().join("objects/file-bucket/resumed.bin")).unwrap();
    assert!(stored == expected, "stored bytes differ");
    let ranges = origin.ranges_asked("killed");
    let from: u64 = ranges[1].strip_prefix("bytes=").and_then(|r| r.strip_suffix('-')).unwrap().parse().unwrap();
    assert!(from >= 32 * MIB, "went on from {from}: {ranges:?}");
    assert_eq!(std::fs::read_dir(dir.path().join("objects/file-bucket")).unwrap().count(), 1, "no staging file left");
    println!(
        "went on from {} MiB; origin sent {} MiB for a {} MiB file",
        from / MIB,
        origin.bytes_sent("killed") / MIB,
        size / MIB
    );
}
