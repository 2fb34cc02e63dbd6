//! Jobs going through: stored bytes, checksums, retries, re-queueing, shutdown.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{
    Origin, content, md5_hex, sha256_hex, spawn_app, spawn_app_with, stack_settings, start, start_api_only,
};

/// `--digests` names the digests computed for the record: with CRC64/NVME alone, a job
/// records no SHA-256 (MD5 only where it is the disk store's ETag), yet a declared
/// SHA-256 is still computed and checked.
#[tokio::test]
async fn only_the_digests_asked_for_are_recorded_and_declared_ones_are_still_checked() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.worker.digests = vec![fileflow::worker::DigestName::Crc64nvme]).await;
    let expected = content(3, 300_000);
    let id = app.submit(&origin.url("/file/300000?seed=3"), &app.bucket, "crc-only.bin").await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["crc64nvme"], crate::helpers::crc64nvme(&expected), "{job}");
    assert!(job["sha256"].is_null(), "not asked for: {job}");
    let disk = !crate::helpers::distributed() && crate::helpers::store().is_empty();
    if disk {
        assert_eq!(job["md5"], md5_hex(&expected), "the disk store's ETag is the MD5: {job}");
        assert_eq!(job["etag"], md5_hex(&expected), "{job}");
    } else {
        assert!(job["md5"].is_null(), "the store names its own ETag: {job}");
    }
    assert!(app.read_object("crc-only.bin").await == expected);

    let declared = |sha256: String, key: &'static str| {
        let body = json!({ "file_url": origin.url("/file/300000?seed=3"), "bucket_name": app.bucket,
            "object_name": key, "sha256": sha256 });
        let app = &app;
        async move {
            let id = app.submit_body(&body).await;
            app.finished(&id).await
        }
    };
    let checked = declared(sha256_hex(&expected), "declared.bin").await;
    assert_eq!(checked["status"], "completed", "{checked}");
    assert_eq!(checked["sha256"], sha256_hex(&expected), "a declared digest is computed: {checked}");
    let refused = declared("0".repeat(64), "refused.bin").await;
    assert_eq!(refused["status"], "failed", "{refused}");
    assert!(refused["last_error"].as_str().unwrap().contains("checksum mismatch"), "{refused}");
    assert!(app.try_read_object("refused.bin").await.is_none(), "nothing stored");
    app.stop().await;
}

#[tokio::test]
async fn a_completed_job_has_the_origins_bytes_and_their_checksums() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let id = app.submit(&origin.url("/file/300000?seed=7&type=image/jpeg"), &app.bucket, "photos/kitty2.jpg").await;
    let job = app.finished(&id).await;

    let expected = content(7, 300_000);
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["retry_count"], 0);
    assert_eq!(job["last_error"], serde_json::Value::Null);
    assert_eq!(job["size"], 300_000);
    assert_eq!(job["sha256"], sha256_hex(&expected));
    assert_eq!(job["crc64nvme"], crate::helpers::crc64nvme(&expected));
    assert_eq!(job["md5"], md5_hex(&expected));
    if crate::helpers::store() == "azure" {
        // Azure names its own versions (`0x…`); the MD5 is in `md5`.
        assert!(job["etag"].as_str().is_some_and(|e| e.starts_with("0x")), "{job}");
    } else {
        assert_eq!(job["etag"], md5_hex(&expected), "the ETag is the MD5, as S3 reports for one PUT");
    }
    assert_eq!(job["content_type"], "image/jpeg");
    let stored = app.read_object("photos/kitty2.jpg").await;
    assert!(stored == expected, "stored bytes differ from the origin's");
    assert_eq!(app.stored_objects().await.len(), 1, "no staging files are left: {:?}", app.stored_objects().await);
    app.stop().await;
}

#[tokio::test]
async fn an_empty_file_is_stored_too() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let id = app.submit(&origin.url("/file/0"), &app.bucket, "empty").await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["size"], 0);
    assert_eq!(job["sha256"], sha256_hex(b""));
    assert_eq!(job["crc64nvme"], crate::helpers::crc64nvme(b""));
    assert_eq!(app.read_object("empty").await, b"");
    app.stop().await;
}

#[tokio::test]
async fn transient_failures_are_retried_until_the_origin_recovers() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let id = app.submit(&origin.url("/flaky/a/2/5000"), &app.bucket, "flaky.bin").await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["retry_count"], 2);
    assert_eq!(origin.hits("/flaky/a/2/5000"), 3);
    assert_eq!(app.read_object("flaky.bin").await, content(1, 5000));
    app.stop().await;
}

#[tokio::test]
async fn a_job_that_keeps_failing_gives_up_after_max_retries() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let id = app.submit(&origin.url("/status/500"), &app.bucket, "never").await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["retry_count"], 3);
    assert!(job["last_error"].as_str().unwrap().contains("500"), "{job}");
    assert_eq!(origin.hits("/status/500"), 4, "one attempt plus three retries");
    assert!(app.stored_objects().await.is_empty());
    app.stop().await;
}

/// Backoff grows from the configured base delay (a 500 carries no Retry-After), and is
/// never shorter than an origin's Retry-After (a 503 here asks for 1 s).
#[tokio::test]
async fn retries_back_off_from_the_base_delay_and_honour_retry_after() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| {
        s.retry.base_delay = Duration::from_millis(400);
        s.retry.max_delay = Duration::from_secs(10);
        s.retry.max_retries = 2;
    })
    .await;
    let started = std::time::Instant::now();
    let plain = app.submit(&origin.url("/flaky/backoff/2/3000"), &app.bucket, "backoff.bin").await;
    let slow = app.submit(&origin.url("/status/503"), &app.bucket, "slow-retries").await;
    let pending =
        app.wait_until(&slow, Duration::from_secs(10), |j| j["retry_count"] == 1 && j["status"] == "pending").await;
    assert!(pending["next_attempt_at"].is_string(), "a scheduled retry shows when: {pending}");
    assert!(pending["last_error"].as_str().unwrap().contains("503"));

    let job = app.finished(&plain).await;
    // Equal jitter: at least half of 400 ms, then half of 800 ms.
    assert!(started.elapsed() >= Duration::from_millis(600), "retried too soon: {:?}", started.elapsed());
    assert_eq!((job["status"].as_str(), job["retry_count"].as_u64()), (Some("completed"), Some(2)), "{job}");
    assert_eq!(origin.hits("/flaky/backoff/2/3000"), 3);
    assert_eq!(app.read_object("backoff.bin").await, content(1, 3000));

    let job = app.wait_until(&slow, Duration::from_secs(10), |j| j["retry_count"].as_u64() >= Some(2)).await;
    // Retry-After: 1 lifts both backoffs to 1 s.
    assert!(started.elapsed() >= Duration::from_millis(1900), "retried too soon: {:?}", started.elapsed());
    // A host asking to slow down is not a failing transfer: past --max-retries (2) the
    // job is still retried (up to THROTTLED_RETRIES).
    assert_eq!(job["status"], "pending", "{job}");
    let job = app.wait_until(&slow, Duration::from_secs(10), |j| j["retry_count"].as_u64() >= Some(3)).await;
    assert_eq!(job["status"], "pending", "{job}");
    app.stop().await;
}

#[tokio::test]
async fn a_failed_job_can_be_requeued_and_then_completes() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.retry.max_retries = 0).await;
    let id = app.submit(&origin.url("/flaky/requeue/1/2048"), &app.bucket, "again.bin").await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "failed", "{job}");

    let retry = app.client.post(app.url(&format!("/api/v1/uploads/{id}/retry"))).send().await.unwrap();
    assert_eq!(retry.status(), 202);
    let job = app.wait_until(&id, Duration::from_secs(10), |j| j["status"] == "completed").await;
    assert_eq!(job["retry_count"], 0);
    assert_eq!(app.read_object("again.bin").await, content(1, 2048));

    let again = app.client.post(app.url(&format!("/api/v1/uploads/{id}/retry"))).send().await.unwrap();
    assert_eq!(again.status(), 409);
    let body: serde_json::Value = again.json().await.unwrap();
    assert_eq!(body["error"]["code"], "wrong_state");
    app.stop().await;
}

#[tokio::test]
async fn many_jobs_run_concurrently_and_all_complete() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.worker.worker_concurrency = 8).await;
    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    for i in 0..40u64 {
        let url = origin.url(&format!("/delay/200/{}?seed={i}", 1000 + i));
        ids.push((i, app.submit(&url, &app.bucket, &format!("many/{i}")).await));
    }
    for (i, id) in &ids {
        let job = app.finished(id).await;
        assert_eq!(job["status"], "completed", "{job}");
        let stored = app.read_object(&format!("many/{i}")).await;
        assert!(stored == content(*i, 1000 + i), "job {id} stored the wrong bytes");
    }
    // 40 jobs of 200 ms each take 8 s one at a time; eight at a time about 1 s.
    assert!(started.elapsed() < Duration::from_secs(6), "jobs did not overlap: {:?}", started.elapsed());
    app.stop().await;
}

#[tokio::test]
async fn a_worker_never_runs_more_transfers_than_its_concurrency() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.worker.worker_concurrency = 3).await;
    let mut ids = Vec::new();
    for i in 0..15u64 {
        let url = origin.url(&format!("/delay/100/{}?seed={i}", 500 + i));
        ids.push(app.submit(&url, &app.bucket, &format!("bounded/{i}")).await);
    }
    for id in &ids {
        let job = app.finished(id).await;
        assert_eq!(job["status"], "completed", "{job}");
    }
    // Outcomes are recorded beside the next transfers, but transfers stay at three.
    assert_eq!(origin.most_at_once(), 3, "transfers at once");
    app.stop().await;
}

#[tokio::test]
async fn shutdown_hands_unfinished_jobs_back_and_a_restart_completes_them() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = stack_settings(dir.path().to_owned()).await;
    settings.worker.shutdown_grace = Duration::from_millis(300);
    let app = start(settings.clone(), None).await;
    // The origin takes 3 s to answer: longer than the grace period.
    let id = app.submit(&origin.url("/delay/3000/4096"), &app.bucket, "handed-back").await;
    app.wait_until(&id, Duration::from_secs(5), |j| j["status"] == "processing").await;
    app.stop().await;

    // Look with an API-only process, so no worker takes the job before we see it.
    let observer = start_api_only(settings.clone()).await;
    let job = observer.job(&id).await;
    assert_eq!(job["status"], "pending", "handed back, not failed: {job}");
    assert_eq!(job["retry_count"], 0, "a hand-back is not a failed attempt");
    observer.stop().await;

    let again = start(settings, None).await;
    let job = again.wait_until(&id, Duration::from_secs(15), |j| j["status"] == "completed").await;
    assert_eq!(job["size"], 4096);
    again.stop().await;
    drop(dir);
}

#[tokio::test]
async fn a_stopping_worker_finishes_its_transfers_and_hands_back_jobs_still_waiting() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = stack_settings(dir.path().to_owned()).await;
    settings.worker.worker_concurrency = 1;
    settings.worker.shutdown_grace = Duration::from_secs(20);
    let app = start(settings.clone(), None).await;
    let processing = |j: &serde_json::Value| j["status"] == "processing";
    let running = app.submit(&origin.url("/delay/1500/4096?seed=1"), &app.bucket, "running").await;
    app.wait_until(&running, Duration::from_secs(5), processing).await;
    // One transfer at a time: the second job is claimed ahead and waits for the slot.
    let waiting = app.submit(&origin.url("/delay/1499/4096?seed=2"), &app.bucket, "waiting").await;
    app.wait_until(&waiting, Duration::from_secs(5), processing).await;
    app.stop().await;

    let observer = start_api_only(settings).await;
    assert_eq!(observer.job(&running).await["status"], "completed", "a transfer under way runs to its end");
    let job = observer.job(&waiting).await;
    assert_eq!((&job["status"], &job["retry_count"]), (&json!("pending"), &json!(0)), "handed back: {job}");
    assert_eq!(origin.hits("/delay/1499/4096"), 0, "no transfer starts once the worker is stopping");
    observer.stop().await;
    drop(dir);
}

#[tokio::test]
async fn a_large_file_streams_through_intact() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let size: u64 = 256 << 20;
    let id = app
        .submit_body(&json!({
            "file_url": origin.url(&format!("/file/{size}?seed=3")),
            "bucket_name": app.bucket,
            "object_name": "large.bin",
        }))
        .await;
    let job =
        app.wait_until(&id, Duration::from_secs(120), |j| j["status"] == "completed" || j["status"] == "failed").await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["size"], size);
    let expected_sha = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let mut offset = 0u64;
        while offset < size {
            let len = (8u64 << 20).min(size - offset);
            h.update(crate::origin::content_range(3, offset, len as usize));
            offset += len;
        }
        hex::encode(h.finalize())
    };
    assert_eq!(job["sha256"], expected_sha);
    // The stored bytes themselves (on S3: a multipart upload of several parts), not only
    // the digest fileflow computed on the way.
    let stored = app.read_object("large.bin").await;
    assert_eq!(stored.len() as u64, size);
    let stored_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&stored))
    };
    assert_eq!(stored_sha, expected_sha, "the stored object differs from what the origin served");
    app.stop().await;
}

/// `if_exists`: overwrite (the default) replaces the object, skip completes without
/// fetching and keeps it, fail fails the job and leaves it.
#[tokio::test]
async fn if_exists_decides_what_happens_to_an_object_already_there() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let submit = |seed: u64, key: &str, if_exists: Option<&str>| {
        let mut body = json!({ "file_url": origin.url(&format!("/file/2000?seed={seed}")), "bucket_name": app.bucket, "object_name": key });
        if let Some(mode) = if_exists {
            body["if_exists"] = json!(mode);
        }
        let app = &app;
        async move {
            let id = app.submit_body(&body).await;
            app.finished(&id).await
        }
    };
    assert_eq!(submit(1, "kept", None).await["status"], "completed");
    let hits = origin.hits("/file/2000");

    let skipped = submit(2, "kept", Some("skip")).await;
    assert_eq!(skipped["status"], "completed", "{skipped}");
    assert_eq!((skipped["if_exists"].as_str(), skipped["size"].as_u64()), (Some("skip"), Some(2000)));
    assert!(skipped["sha256"].is_null(), "nothing was fetched to hash: {skipped}");
    assert_eq!(origin.hits("/file/2000"), hits, "skip fetched nothing");
    assert!(app.read_object("kept").await == content(1, 2000));

    // Skip completes only with what the caller declared: other content at the key fails
    // the job, names why, and stays as it was.
    let sha = |seed: u64, size: u64| crate::helpers::sha256_hex(&content(seed, size));
    let declared = |extra: serde_json::Value| {
        let mut body = json!({ "file_url": origin.url("/file/2000?seed=2"), "bucket_name": app.bucket,
            "object_name": "kept", "if_exists": "skip" });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let app = &app;
        async move {
            let id = app.submit_body(&body).await;
            app.finished(&id).await
        }
    };
    for (what, extra) in [
        ("size", json!({ "size": 1000 })),
        ("sha256", json!({ "sha256": sha(2, 2000) })),
        ("md5", json!({ "md5": "0".repeat(32) })),
    ] {
        let refused = declared(extra).await;
        assert_eq!(refused["status"], "failed", "{what}: {refused}");
        let error = refused["last_error"].as_str().unwrap();
        assert!(error.contains("an object with other content is at the key") && error.contains(what), "{refused}");
        assert_eq!(refused["retry_count"], 0, "permanent: {refused}");
    }
    let same = declared(json!({ "size": 2000, "sha256": sha(1, 2000) })).await;
    assert_eq!(same["status"], "completed", "the same content is skipped: {same}");
    assert_eq!(same["sha256"], sha(1, 2000), "{same}");
    assert_eq!(origin.hits("/file/2000"), hits, "skip fetched nothing");
    assert!(app.read_object("kept").await == content(1, 2000));

    let failed = submit(3, "kept", Some("fail")).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["last_error"].as_str().unwrap().contains("already exists"), "{failed}");
    assert_eq!(failed["retry_count"], 0, "permanent");
    assert!(app.read_object("kept").await == content(1, 2000));

    // Where nothing is there yet, skip and fail fetch as usual.
    assert_eq!(submit(4, "new-skip", Some("skip")).await["status"], "completed");
    assert!(app.read_object("new-skip").await == content(4, 2000));
    assert_eq!(submit(5, "new-fail", Some("fail")).await["status"], "completed");

    let overwritten = submit(6, "kept", Some("overwrite")).await;
    assert_eq!(overwritten["status"], "completed");
    assert!(app.read_object("kept").await == content(6, 2000));
    let bad = app.post_upload(&json!({ "file_url": origin.url("/file/1"), "bucket_name": app.bucket, "object_name": "x", "if_exists": "replace" })).await;
    assert_eq!(bad.status(), 422);
    app.stop().await;
}

/// A transfer's progress shows on the job while it runs (about once a second), and the
/// final size once it completes.
#[tokio::test]
async fn progress_shows_while_a_transfer_runs() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let size = 8 * 1024 * 1024;
    // 8 MiB at about 2.5 MiB/s: three seconds or so.
    let id = app.submit(&origin.url(&format!("/slow/{size}?every_ms=25")), &app.bucket, "watched.bin").await;
    let first = app.wait_until(&id, Duration::from_secs(10), |j| j["bytes_done"].as_u64().is_some_and(|d| d > 0)).await;
    assert_eq!(first["status"], "processing", "{first}");
    assert_eq!(first["bytes_total"], size, "{first}");
    let done_then = first["bytes_done"].as_u64().unwrap();
    let later = app
        .wait_until(&id, Duration::from_secs(10), |j| {
            j["status"] == "completed" || j["bytes_done"].as_u64().is_some_and(|d| d > done_then)
        })
        .await;
    assert!(later["bytes_done"].as_u64().unwrap() > done_then, "{later}");
    let job = app.finished(&id).await;
    assert_eq!(
        (job["status"].as_str(), job["bytes_done"].as_u64(), job["bytes_total"].as_u64()),
        (Some("completed"), Some(size), Some(size))
    );
    app.stop().await;
}

#[tokio::test]
async fn jobs_writing_one_object_run_one_after_another_and_the_last_to_finish_wins() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    // Four jobs for one key and two for another, all at once; each takes about 400 ms.
    let mut same = Vec::new();
    for seed in 1..=4u64 {
        same.push(app.submit(&origin.url(&format!("/delay/400/70000?seed={seed}")), &app.bucket, "shared.bin").await);
    }
    for seed in 5..=6u64 {
        app.submit(&origin.url(&format!("/delay/400/70000?seed={seed}")), &app.bucket, "elsewhere.bin").await;
    }
    let mut finished = Vec::new();
    for id in &same {
        let job = app.finished(id).await;
        assert_eq!(job["status"], "completed", "{job}");
        finished.push(job);
    }
    // The record of the job that finished last describes the object.
    finished.sort_by_key(|job| job["updated_at"].as_str().unwrap().to_owned());
    let last = finished.last().unwrap();
    assert_eq!(sha256_hex(&app.read_object("shared.bin").await), last["sha256"].as_str().unwrap(), "{last}");
    // One at a time per object (so at most one per key and the other key's two: 1 + 1 at
    // once), and one after another: each started after the one before it had finished.
    assert!(origin.most_at_once() <= 2, "{} requests at once", origin.most_at_once());
    println!("order: {:?}", finished.iter().map(|j| j["id"].clone()).collect::<Vec<_>>());
    app.stop().await;
}
