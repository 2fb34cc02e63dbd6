//! An origin that misbehaves, files that are too large or not what was promised.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{Origin, content, md5_hex, sha256_hex, spawn_app, spawn_app_with};

#[tokio::test]
async fn origin_4xx_fails_at_once_without_retries() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    for code in [404, 403, 410] {
        let path = format!("/status/{code}");
        let id = app.submit(&origin.url(&path), &app.bucket, &format!("missing-{code}")).await;
        let job = app.finished(&id).await;
        assert_eq!(job["status"], "failed", "{job}");
        assert_eq!(job["retry_count"], 0, "{job}");
        assert!(job["last_error"].as_str().unwrap().contains(&code.to_string()), "{job}");
        assert_eq!(origin.hits(&path), 1);
    }
    app.stop().await;
}

#[tokio::test]
async fn throttling_and_timeouts_statuses_are_retried() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| {
        s.retry.max_retries = 1;
        // Retry-After: 1 is honoured but capped here.
        s.retry.max_delay = Duration::from_millis(100);
    })
    .await;
    // A 429 is a host asking to slow down, not a failing transfer: it gets the throttled
    // budget (10 retries), the others --max-retries (1).
    for (code, retries) in [(408, 1), (429, fileflow::lifecycle::THROTTLED_RETRIES), (502, 1)] {
        let path = format!("/status/{code}");
        let id = app.submit(&origin.url(&path), &app.bucket, &format!("t-{code}")).await;
        let job = app.finished(&id).await;
        assert_eq!(job["status"], "failed", "{job}");
        assert_eq!(job["retry_count"], retries, "{code} is transient: {job}");
        assert_eq!(origin.hits(&path), retries + 1);
    }
    app.stop().await;
}

#[tokio::test]
async fn a_connection_reset_mid_body_is_transient_and_leaves_no_object() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.retry.max_retries = 1).await;
    let id = app.submit(&origin.url("/reset/3000000"), &app.bucket, "reset.bin").await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["retry_count"], 1, "{job}");
    assert!(job["last_error"].as_str().unwrap().contains("interrupted"), "{job}");
    assert_eq!(origin.hits("/reset/3000000"), 2);
    assert!(app.stored_objects().await.is_empty(), "{:?}", app.stored_objects().await);

    // The same through a real TCP reset after the head and half the body.
    let id = app.submit(&origin.raw_url("/reset/3000000"), &app.bucket, "rst.bin").await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["retry_count"], 1, "{job}");
    assert!(job["last_error"].as_str().unwrap().contains("interrupted"), "{job}");
    assert_eq!(origin.hits("/reset/3000000"), 4);
    assert!(app.stored_objects().await.is_empty(), "{:?}", app.stored_objects().await);
    app.stop().await;
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length_is_transient_and_leaves_no_object() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.retry.max_retries = 1).await;
    let id = app.submit(&origin.raw_url("/short/100000"), &app.bucket, "short.bin").await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["retry_count"], 1, "{job}");
    assert!(job["last_error"].as_str().unwrap().contains("interrupted"), "{job}");
    assert!(app.stored_objects().await.is_empty(), "{:?}", app.stored_objects().await);
    app.stop().await;
}

#[tokio::test]
async fn a_stalled_origin_hits_the_idle_read_timeout() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| {
        s.retry.max_retries = 1;
        s.fetch.read_timeout = Duration::from_millis(300);
    })
    .await;
    let id = app.submit(&origin.url("/trickle/10?every_ms=1000"), &app.bucket, "stalled").await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["last_error"].as_str().unwrap().contains("timed out"), "{job}");
    // A timeout is transient: it was retried once, then the budget was spent.
    assert_eq!(job["retry_count"], 1, "{job}");
    assert_eq!(origin.hits("/trickle/10"), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_trickling_origin_cannot_hold_a_worker_past_the_transfer_deadline() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| {
        s.retry.max_retries = 0;
        s.fetch.read_timeout = Duration::from_secs(5);
        s.fetch.transfer_timeout = Duration::from_secs(1);
    })
    .await;
    let started = std::time::Instant::now();
    // 200 bytes at one per 50 ms would take 10 s: each read is quick, the whole is not.
    let id = app.submit(&origin.url("/trickle/200?every_ms=50"), &app.bucket, "trickle").await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["last_error"].as_str().unwrap().contains("did not finish within 1s"), "{job}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(app.stored_objects().await.is_empty(), "{:?}", app.stored_objects().await);
    app.stop().await;
}

/// An origin that keeps the connection alive with a byte now and then (never idle long
/// enough for the read timeout) is cut by the rate floor, and that is transient: retried.
#[tokio::test]
async fn an_origin_below_the_rate_floor_is_cut_and_retried() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| {
        s.retry.max_retries = 1;
        s.fetch.read_timeout = Duration::from_secs(5);
        s.fetch.min_transfer_rate = bytesize::ByteSize::kib(1);
        s.fetch.min_rate_window = Duration::from_secs(1);
    })
    .await;
    let started = std::time::Instant::now();
    let id = app.submit(&origin.url("/trickle/100?every_ms=200"), &app.bucket, "crawl").await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["retry_count"], 1, "the cut is transient: one retry, then the budget is spent: {job}");
    assert!(job["last_error"].as_str().unwrap().contains("origin too slow"), "{job}");
    assert!(started.elapsed() < Duration::from_secs(8), "each attempt is cut after its 1 s window");
    assert_eq!(origin.hits("/trickle/100"), 2);
    assert!(app.stored_objects().await.is_empty(), "{:?}", app.stored_objects().await);
    app.stop().await;
}

#[tokio::test]
async fn a_slow_but_steady_origin_completes() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.fetch.read_timeout = Duration::from_secs(2)).await;
    let id = app.submit(&origin.url("/trickle/20?every_ms=50"), &app.bucket, "steady").await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(app.read_object("steady").await, content(1, 20));
    app.stop().await;
}

#[tokio::test]
async fn files_over_the_size_limit_fail_permanently() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.store.max_file_size = bytesize::ByteSize::b(10_000)).await;
    let id = app.submit(&origin.url("/file/10001"), &app.bucket, "big").await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["retry_count"], 0);
    assert!(job["last_error"].as_str().unwrap().contains("too large"), "{job}");
    let id = app.submit(&origin.url("/file/10000"), &app.bucket, "fits").await;
    assert_eq!(app.finished(&id).await["status"], "completed");
    assert_eq!(app.stored_objects().await.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn checksums_given_at_submit_are_verified() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let bytes = content(5, 65_536);
    let url = origin.url("/file/65536?seed=5");

    let good = app
        .submit_body(&json!({
            "file_url": url, "bucket_name": app.bucket, "object_name": "good.bin",
            "sha256": sha256_hex(&bytes).to_uppercase(), "md5": md5_hex(&bytes),
        }))
        .await;
    assert_eq!(app.finished(&good).await["status"], "completed");

    for (field, wrong) in [("sha256", "0".repeat(64)), ("md5", "0".repeat(32))] {
        let id = app
            .submit_body(&json!({
                "file_url": url, "bucket_name": app.bucket, "object_name": format!("bad-{field}.bin"),
                field: wrong,
            }))
            .await;
        let job = app.finished(&id).await;
        assert_eq!(job["status"], "failed", "{job}");
        assert_eq!(job["retry_count"], 0, "a mismatch is permanent");
        assert!(job["last_error"].as_str().unwrap().contains("checksum mismatch"), "{job}");
        assert!(app.try_read_object(&format!("bad-{field}.bin")).await.is_none());
    }
    assert_eq!(app.stored_objects().await.len(), 1, "{:?}", app.stored_objects().await);
    app.stop().await;
}

#[tokio::test]
async fn redirects_are_followed_up_to_the_limit() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.fetch.max_redirects = 3).await;
    let ok = app.submit(&origin.url("/redirect/3/1000"), &app.bucket, "redirected").await;
    assert_eq!(app.finished(&ok).await["status"], "completed");
    let too_many = app.submit(&origin.url("/redirect/4/1000"), &app.bucket, "loop").await;
    let job = app.finished(&too_many).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["retry_count"], 0);
    assert!(job["last_error"].as_str().unwrap().contains("redirect"), "{job}");
    app.stop().await;
}

/// A name that resolves to loopback is refused when fetched, before any connection.
#[tokio::test]
async fn a_name_resolving_to_loopback_fails_permanently_when_fetched() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.fetch.allow_private = false).await;
    // The machine's own name resolves to a loopback address here (see /etc/hosts).
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_owned();
    let resolved: Vec<_> = tokio::net::lookup_host((host.as_str(), 0)).await.unwrap().collect();
    assert!(resolved.iter().any(|a| a.ip().is_loopback()), "{host} should resolve to loopback: {resolved:?}");

    let url = format!("http://{host}:{}/file/10", origin.addr.port());
    let id = app.submit(&url, &app.bucket, "sneaky").await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["retry_count"], 0);
    assert!(job["last_error"].as_str().unwrap().contains("refused"), "{job}");
    assert_eq!(origin.hits("/file/10"), 0, "no connection reached the origin");
    app.stop().await;
}

/// Fencing: the lease changed hands while a worker was transferring (another claim took
/// the job, as one does once a lease lapses). When the transfer ends, the worker may not
/// make its object visible, and its outcome is refused: the store holds nothing of it and
/// the record stays the new holder's.
#[tokio::test]
async fn a_worker_whose_lease_changed_hands_mid_transfer_stores_nothing() {
    let origin = Origin::start().await;
    // A long lease: the worker's renewal (every 10 s) does not notice the change in time,
    // so only the fence before the store's commit stands in the way.
    let app = spawn_app_with(|s| s.worker.job_lease = Duration::from_secs(30)).await;
    let id = app.submit(&origin.url("/versioned/fenced/20000?slow_ms=2000"), &app.bucket, "fenced").await;
    app.wait_until(&id, Duration::from_secs(10), |job| job["status"] == "processing").await;
    let taken = take_over_lease(&app, &id).await;
    assert!(taken, "the job was processing under the worker's lease");
    // The transfer ends after ~2 s; give it time to try to store and record.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(app.try_read_object("fenced").await, None, "the worker stored an object without its lease");
    let job = app.job(&id).await;
    assert_eq!(job["status"], "processing", "the new holder's claim stands: {job}");
    app.stop().await;
}

/// Give the job's lease to another owner, as a later claim does; `true` if it was held.
async fn take_over_lease(app: &crate::helpers::TestApp, id: &str) -> bool {
    let id: i64 = id.parse().unwrap();
    match &app.settings.data.database_url {
        Some(url) if url.expose().starts_with("postgres") => {
            let pool = sqlx::PgPool::connect(url.expose()).await.unwrap();
            let done =
                sqlx::query("UPDATE files SET lease_owner = 'a-later-claim' WHERE id = $1 AND status = 'processing'")
                    .bind(id)
                    .execute(&pool)
                    .await
                    .unwrap();
            done.rows_affected() == 1
        }
        _ => {
            let url = fileflow::metadata::SqliteDb::default_url(&app.settings.data.data_dir);
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            let done =
                sqlx::query("UPDATE files SET lease_owner = 'a-later-claim' WHERE id = ?1 AND status = 'processing'")
                    .bind(id)
                    .execute(&pool)
                    .await
                    .unwrap();
            done.rows_affected() == 1
        }
    }
}

/// Keys the disk store can never hold: refused at submit when the store can tell (a file
/// name longer than the file system takes), else failed at once, with one fetch, no retry,
/// and an error that names no server path.
#[tokio::test]
async fn keys_the_disk_store_can_never_hold_fail_at_once() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    if app.settings.store.storage != fileflow::config::StorageKind::Fs {
        app.stop().await;
        return;
    }
    let long = format!("dir/{}.bin", "n".repeat(300));
    let refused = app
        .post_upload(&json!({ "file_url": origin.url("/file/10"), "bucket_name": app.bucket, "object_name": long }))
        .await;
    assert_eq!(refused.status(), 422);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("object_name"), "{body}");
    assert!(app.stored_objects().await.is_empty());

    let data_dir = app.settings.data.data_dir.canonicalize().unwrap();
    assert_eq!(
        app.finished(&app.submit(&origin.url("/file/100"), &app.bucket, "a").await).await["status"],
        "completed"
    );
    assert_eq!(
        app.finished(&app.submit(&origin.url("/file/101"), &app.bucket, "c/d").await).await["status"],
        "completed"
    );
    // Small files go to the store in one write, large ones through a staging file.
    let large = format!("/file/{}", 20 * 1024 * 1024);
    for (key, path, why) in [
        ("a/b", "/file/102", "is an object, not a folder"),
        ("c", "/file/103", "a folder"),
        ("a/large", large.as_str(), "is an object, not a folder"),
    ] {
        let job = app.finished(&app.submit(&origin.url(path), &app.bucket, key).await).await;
        assert_eq!(job["status"], "failed", "{key}: {job}");
        assert_eq!(job["retry_count"], 0, "{key}: permanent: {job}");
        let error = job["last_error"].as_str().unwrap();
        assert!(error.contains(why), "{key}: {job}");
        assert!(
            !error.contains(&*data_dir.to_string_lossy()) && !error.contains("/tmp"),
            "{key}: a server path: {job}"
        );
        assert_eq!(origin.hits(path), 1, "{key}: fetched once");
    }
    app.stop().await;
}
