//! Resumable transfers: a large transfer cut by a transient error goes on from the last
//! part in the store on its next attempt (`Range` with `If-Range`), and starts over when
//! the origin cannot send a range or the file changed meanwhile.

use std::time::Duration;

use crate::helpers::{Origin, TestApp, sha256_hex, spawn_app, spawn_app_with};
use crate::origin::content;

const MIB: u64 = 1024 * 1024;
/// 40 MiB, cut at 36 MiB (90 %).
const SIZE: u64 = 40 * MIB;
const CUT: u64 = 36 * MIB;

async fn cut_transfer(app: &TestApp, origin: &Origin, name: &str, query: &str) -> serde_json::Value {
    let url = origin.url(&format!("/resumable/{name}/{SIZE}?seed=7&cut={CUT}{query}"));
    let id = app.submit(&url, &app.bucket, &format!("{name}.bin")).await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["retry_count"], 1, "one cut, one more attempt: {job}");
    job
}

/// The offset the second request asked for (0: the whole file again).
fn second_range(origin: &Origin, name: &str) -> u64 {
    let ranges = origin.ranges_asked(name);
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert_eq!(ranges[0], "", "the first request asks for the whole file");
    ranges[1].strip_prefix("bytes=").and_then(|r| r.strip_suffix('-')).map_or(0, |n| n.parse().unwrap())
}

#[tokio::test]
async fn a_cut_transfer_goes_on_from_the_last_stored_part() {
    if !resumes() {
        return;
    }
    let origin = Origin::start().await;
    let app = spawn_app().await;
    for (name, query) in [("tagged", ""), ("dated", "&validator=date")] {
        let job = cut_transfer(&app, &origin, name, query).await;
        let expected = content(7, SIZE);
        assert_eq!(job["sha256"], sha256_hex(&expected), "{job}");
        assert_eq!(job["crc64nvme"], crate::helpers::crc64nvme(&expected), "resumed: {job}");
        assert_eq!(job["size"], SIZE, "{job}");
        assert!(app.read_object(&format!("{name}.bin")).await == expected, "{name}: stored bytes differ");

        let from = second_range(&origin, name);
        let sent = origin.bytes_sent(name);
        // The parts stored before the cut are not fetched again: at most one part's worth
        // (16 MiB on disk, 5 MiB on S3) of the 36 MiB received is.
        assert!(from > 0 && from <= CUT && CUT - from <= 16 * MIB, "{name}: resumed from {from}");
        assert_eq!(sent, CUT + (SIZE - from), "{name}: origin sent {sent}");
        println!("{name}: resumed from {} MiB; origin sent {:.2}× the file", from / MIB, sent as f64 / SIZE as f64);
    }
    assert_eq!(app.stored_objects().await.len(), 2, "no staging files left: {:?}", app.stored_objects().await);
    assert_eq!(app.unfinished_uploads().await, 0);
    app.stop().await;
}

#[tokio::test]
async fn an_origin_that_cannot_resume_is_fetched_again_from_the_start() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    for (name, query) in [("unnamed", "&validator=none"), ("rangeless", "&ranges=no")] {
        let job = cut_transfer(&app, &origin, name, query).await;
        assert_eq!(job["sha256"], sha256_hex(&content(7, SIZE)), "{job}");
        if query.contains("none") {
            assert_eq!(origin.ranges_asked(name), ["", ""], "without a validator no range is asked");
        }
        assert_eq!(origin.bytes_sent(name), CUT + SIZE, "{name}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_file_changed_between_attempts_is_fetched_whole() {
    if !resumes() {
        return;
    }
    let (origin, app, job) = changed_between_attempts("changing", &format!("cut={CUT}")).await;
    let changed = content(Origin::versioned_seed(7, 1), SIZE);
    assert_eq!(job["sha256"], sha256_hex(&changed), "the new version, whole: {job}");
    assert!(app.read_object("changing.bin").await == changed);
    assert!(second_range(&origin, "changing") > 0, "a range was asked, with If-Range");
    assert_eq!(origin.bytes_sent("changing"), CUT + SIZE, "the origin sent the new version whole");
    assert_eq!(app.stored_objects().await.len(), 1, "{:?}", app.stored_objects().await);
    assert_eq!(app.unfinished_uploads().await, 0, "the first version's parts were removed");
    app.stop().await;
}

#[tokio::test]
async fn cancelling_or_failing_a_resumable_transfer_leaves_no_parts() {
    if !resumes() {
        return;
    }
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| {
        s.retry.base_delay = Duration::from_secs(1);
        s.retry.max_delay = Duration::from_secs(1);
        // One stream, as this is about a resumable write (ranges at once would finish the
        // 80 MiB before the cancel comes; tests/api/segments.rs cancels those).
        s.worker.segments = 1;
    })
    .await;
    // Cancelled mid-way, after parts are in the store. Parts are read ahead of those
    // stored (up to four of 5 MiB on S3), so the file is long enough that the transfer is
    // still under way when the cancel comes.
    let url = origin.url(&format!("/resumable/cancelled/{}?seed=7&every_ms=50", 2 * SIZE));
    let id = app.submit(&url, &app.bucket, "cancelled.bin").await;
    app.wait_until(&id, Duration::from_secs(30), |j| j["bytes_done"].as_u64().unwrap_or(0) >= 10 * MIB).await;
    let (status, _, job) = app.call(reqwest::Method::POST, &format!("/api/v1/uploads/{id}/cancel"), None, None).await;
    assert_eq!(status, 202, "{job}");
    // The worker sees the cancel within a second; on S3 the parts already in flight end and
    // the upload is aborted before the job shows `cancelled`, which the full suite's load on
    // the one S3 server has stretched past 10 s.
    app.wait_until(&id, Duration::from_secs(30), |j| j["status"] == "cancelled").await;

    // Cut once, then the file is gone from the origin: the job fails for good.
    let url = origin.url(&format!("/resumable/vanishing/{SIZE}?seed=7&cut={CUT}&validator=etag"));
    let id = app
        .submit_body(&serde_json::json!({
            "file_url": url, "bucket_name": app.bucket, "object_name": "vanishing.bin", "sha256": "0".repeat(64)
        }))
        .await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["last_error"].as_str().unwrap_or_default().contains("checksum mismatch"), "{job}");
    assert_eq!(job["retry_count"], 1, "{job}");

    assert!(app.stored_objects().await.is_empty(), "left behind: {:?}", app.stored_objects().await);
    assert_eq!(app.unfinished_uploads().await, 0, "parts left behind");
    app.stop().await;
}

/// A transfer of `/resumable/{name}/…?{query}` cut once, the file replaced by its next
/// version while the job waits for its second attempt; the job once finished.
async fn changed_between_attempts(name: &str, query: &str) -> (Origin, TestApp, serde_json::Value) {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| {
        s.retry.base_delay = Duration::from_secs(2);
        s.retry.max_delay = Duration::from_secs(2);
    })
    .await;
    let url = origin.url(&format!("/resumable/{name}/{SIZE}?seed=7&{query}"));
    let id = app.submit(&url, &app.bucket, &format!("{name}.bin")).await;
    let waiting = app.wait_until(&id, Duration::from_secs(30), |j| j["retry_count"] == 1).await;
    assert_eq!(waiting["status"], "pending", "{waiting}");
    origin.set_version(name, 1);
    let job = app.finished(&id).await;
    (origin, app, job)
}

/// Whether this run's store resumes uploads (Azure's starts over: see the README).
fn resumes() -> bool {
    crate::helpers::store() != "azure"
}

/// Origins answer `Range` sloppily in every way RFC 9110 allows and some it does not. A
/// partial answer continues the stored part only when it proves the same file; otherwise
/// the whole file is fetched once, in the same attempt, and the job holds exactly the
/// origin's current bytes.
#[tokio::test]
async fn sloppy_partial_answers_never_make_a_wrong_object() {
    if !resumes() {
        return;
    }
    const HALF: u64 = SIZE / 2;
    let origin = Origin::start().await;
    let app = spawn_app().await;
    for lie in ["unknown_total", "wrong_start", "short_total", "not_to_end", "no_validator", "refuse_range"] {
        let name = format!("lie-{}", lie.replace('_', "-"));
        let url = origin.url(&format!("/resumable/{name}/{SIZE}?seed=7&cut={HALF}&lie={lie}"));
        let id = app.submit(&url, &app.bucket, &format!("{name}.bin")).await;
        let job = app.finished(&id).await;
        let expected = content(7, SIZE);
        assert_eq!(job["status"], "completed", "{lie}: {job}");
        assert_eq!(job["retry_count"], 1, "{lie}: one cut, then the whole file in the same attempt: {job}");
        assert_eq!(job["size"], SIZE, "{lie}: {job}");
        assert_eq!(job["sha256"], sha256_hex(&expected), "{lie}: {job}");
        assert!(app.read_object(&format!("{name}.bin")).await == expected, "{lie}: stored bytes differ");
        let ranges = origin.ranges_asked(&name);
        assert_eq!(ranges.len(), 3, "{lie}: whole, a range, whole again: {ranges:?}");
        assert!(ranges[1].starts_with("bytes=") && ranges[2].is_empty(), "{lie}: {ranges:?}");
    }
    // A whole file answered 206 with the whole file's range is the whole file.
    let url = origin.url(&format!("/resumable/whole-206/{}?seed=7&lie=whole_as_206", 3 * MIB));
    let id = app.submit(&url, &app.bucket, "whole-206.bin").await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["sha256"], sha256_hex(&content(7, 3 * MIB)), "{job}");
    assert_eq!(app.stored_objects().await.len(), 7, "no staging files left: {:?}", app.stored_objects().await);
    assert_eq!(app.unfinished_uploads().await, 0, "no parts left behind");
    app.stop().await;
}

/// The file changes between attempts and the origin ignores `If-Range`: its 206 of the new
/// version (with the new ETag) must not be spliced onto the old version's stored part.
#[tokio::test]
async fn a_changed_file_behind_an_origin_that_ignores_if_range_is_fetched_whole() {
    if !resumes() {
        return;
    }
    let (origin, app, job) = changed_between_attempts("deaf", &format!("cut={}&lie=ignore_if_range", SIZE / 2)).await;
    let changed = content(Origin::versioned_seed(7, 1), SIZE);
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["retry_count"], 1, "{job}");
    assert_eq!(job["sha256"], sha256_hex(&changed), "the new version, whole: {job}");
    assert!(app.read_object("deaf.bin").await == changed, "stored bytes are not the new version");
    assert_eq!(origin.ranges_asked("deaf").len(), 3, "{:?}", origin.ranges_asked("deaf"));
    assert_eq!(app.unfinished_uploads().await, 0, "the first version's parts were removed");
    app.stop().await;
}

/// A job whose retries run out on a transient error after parts were stored leaves no
/// parts or staging file behind.
#[tokio::test]
async fn a_job_failed_after_stored_parts_leaves_none_behind() {
    if !resumes() {
        return;
    }
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.retry.max_retries = 0).await;
    let url = origin.url(&format!("/resumable/spent/{SIZE}?seed=7&cut={CUT}"));
    let id = app.submit(&url, &app.bucket, "spent.bin").await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["bytes_done"].as_u64().unwrap_or(0) > 0, "parts were stored before the cut: {job}");
    assert!(app.stored_objects().await.is_empty(), "left behind: {:?}", app.stored_objects().await);
    assert_eq!(app.unfinished_uploads().await, 0, "parts left behind");
    app.stop().await;
}
