//! Segmented transfers: a large file from an origin that serves ranges of a version it
//! names is fetched as several ranges at once, each range checked before a byte of it is
//! stored; anything else gets one whole request, and a range that does not prove itself
//! never ends in a `completed` job with other bytes than the origin's file.

use crate::helpers::{Origin, TestApp, md5_hex, sha256_hex, spawn_app_with};
use crate::origin::content;

const MIB: u64 = 1024 * 1024;
/// Over the tests' threshold (16 MiB): 6 pieces on disk (8 MiB), 10 on S3 (5 MiB).
const SIZE: u64 = 48 * MIB;
const SEGMENTS: u16 = 4;

async fn segmenting_app() -> TestApp {
    spawn_app_with(|s| {
        s.worker.segments = SEGMENTS;
        s.worker.segment_threshold = bytesize::ByteSize::mib(16);
    })
    .await
}

async fn fetch(app: &TestApp, origin: &Origin, name: &str, size: u64, query: &str) -> serde_json::Value {
    let url = origin.url(&format!("/resumable/{name}/{size}?seed=5{query}"));
    let id = app.submit(&url, &app.bucket, &format!("{name}.bin")).await;
    app.finished(&id).await
}

/// The bounded ranges asked (`bytes=a-b` as (a, b)), sorted, and the whole-file requests.
fn ranges(origin: &Origin, name: &str) -> (Vec<(u64, u64)>, usize) {
    let asked = origin.ranges_asked(name);
    let whole = asked.iter().filter(|r| r.is_empty()).count();
    let mut bounded: Vec<(u64, u64)> = asked
        .iter()
        .filter_map(|r| r.strip_prefix("bytes=")?.split_once('-'))
        .filter_map(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .collect();
    bounded.sort_unstable();
    (bounded, whole)
}

#[tokio::test]
async fn a_large_file_is_fetched_in_ranges_at_once_and_stored_byte_exact() {
    let origin = Origin::start().await;
    let app = segmenting_app().await;
    // 1 MiB every 10 ms per answer: slow enough that the ranges overlap.
    let job = fetch(&app, &origin, "big", SIZE, "&every_ms=10").await;
    assert_eq!(job["status"], "completed", "{job}");
    let expected = content(5, SIZE);
    assert_eq!(job["size"], SIZE, "{job}");
    assert_eq!(job["sha256"], sha256_hex(&expected), "{job}");
    assert_eq!(job["crc64nvme"], crate::helpers::crc64nvme(&expected), "{job}");
    assert!(app.read_object("big.bin").await == expected, "stored bytes differ");

    let (bounded, whole) = ranges(&origin, "big");
    assert_eq!(whole, 1, "one whole-file request, whose start is the first piece");
    // The ranges tile the rest of the file exactly, each asked once.
    let first = bounded.first().expect("ranges were asked").0;
    assert!(first > 0 && first < SIZE, "{bounded:?}");
    let mut next = first;
    for &(a, b) in &bounded {
        assert_eq!(a, next, "ranges tile the file: {bounded:?}");
        next = b + 1;
    }
    assert_eq!(next, SIZE, "{bounded:?}");
    // Every fetcher but the first piece's asks its range at once; the first piece's asks
    // the next range when its piece is in (before or after the others' end).
    let at_once = origin.most_ranges_at_once("big");
    assert!((u32::from(SEGMENTS) - 1..=u32::from(SEGMENTS)).contains(&at_once), "{at_once} ranges at once");
    // The whole-file answer was dropped after its first piece, not read to its end.
    assert!(origin.bytes_sent("big") < SIZE + 2 * first, "sent {}", origin.bytes_sent("big"));
    let stored = app.stored_objects().await;
    assert!(stored.len() == 1 && stored[0].ends_with("big.bin"), "no staging file left: {stored:?}");
    assert_eq!(app.unfinished_uploads().await, 0);
    println!("{} ranges after the first piece of {} MiB, {at_once} at once", bounded.len(), first / MIB);
    app.stop().await;
}

#[tokio::test]
async fn an_origin_that_cannot_serve_ranges_or_a_small_file_gets_one_whole_request() {
    let origin = Origin::start().await;
    let app = segmenting_app().await;
    let cases = [
        ("rangeless", SIZE, "&ranges=no"),
        ("weak", SIZE, "&validator=weak"),
        ("unnamed", SIZE, "&validator=none"),
        ("small", 12 * MIB, ""),
    ];
    for (name, size, query) in cases {
        let job = fetch(&app, &origin, name, size, query).await;
        assert_eq!(job["status"], "completed", "{name}: {job}");
        assert_eq!(job["sha256"], sha256_hex(&content(5, size)), "{name}: {job}");
        assert_eq!(origin.ranges_asked(name), [""], "{name}: one whole request");
        assert_eq!(origin.most_ranges_at_once(name), 0, "{name}");
    }
    app.stop().await;
}

#[tokio::test]
async fn range_answers_that_do_not_prove_themselves_are_never_stored() {
    let origin = Origin::start().await;
    let app = segmenting_app().await;
    let cases = [
        ("as200", "&lie=range_as_200"),
        ("wrongstart", "&lie=wrong_start"),
        ("nottoend", "&lie=not_to_end"),
        ("shorttotal", "&lie=short_total"),
        ("unknowntotal", "&lie=unknown_total"),
        ("novalidator", "&lie=no_validator"),
        // The file changes once the transfer has begun: If-Range gets the new file whole
        // (200), or, from an origin that ignores If-Range, a range of it with its new ETag.
        ("changed", "&bump=1"),
        ("changedignored", "&bump=1&lie=ignore_if_range"),
        ("changeddate", "&bump=1&lie=ignore_if_range&validator=date"),
    ];
    for (name, query) in cases {
        let job = fetch(&app, &origin, name, SIZE, query).await;
        let (bounded, whole) = ranges(&origin, name);
        assert!(!bounded.is_empty(), "{name}: ranges were asked");
        match job["status"].as_str() {
            Some("completed") => {
                // Whole again, in one stream: the bytes of one version of the file, never a mix.
                assert_eq!(whole, 2, "{name}: one whole request, then the whole file again: {job}");
                let stored = app.read_object(&format!("{name}.bin")).await;
                let versions = [content(5, SIZE), content(Origin::versioned_seed(5, 1), SIZE)];
                assert!(versions.contains(&stored), "{name}: stored bytes are no version of the file");
                assert_eq!(job["sha256"], sha256_hex(&stored), "{name}: {job}");
                assert_eq!(job["size"], SIZE, "{name}: {job}");
            }
            _ => {
                assert_eq!(job["status"], "failed", "{name}: {job}");
                assert!(app.try_read_object(&format!("{name}.bin")).await.is_none(), "{name}: nothing stored");
            }
        }
        println!("{name}: {} after {} ranges", job["status"], bounded.len());
    }
    let stored = app.stored_objects().await;
    assert_eq!(stored.len(), cases.len(), "no staging files left: {stored:?}");
    assert_eq!(app.unfinished_uploads().await, 0, "no multipart upload left open");
    app.stop().await;
}

#[tokio::test]
async fn a_range_cut_midway_is_fetched_again_alone() {
    let origin = Origin::start().await;
    let app = segmenting_app().await;
    let cut = SIZE * 3 / 4 + 100 * 1024;
    let job = fetch(&app, &origin, "cut", SIZE, &format!("&cut_once={cut}")).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["retry_count"], 0, "no new attempt: {job}");
    let expected = content(5, SIZE);
    assert_eq!(job["md5"], md5_hex(&expected), "{job}");
    assert!(app.read_object("cut.bin").await == expected, "stored bytes differ");
    let (bounded, whole) = ranges(&origin, "cut");
    assert_eq!(whole, 1);
    let cut_range = *bounded.iter().find(|(a, b)| (*a..=*b).contains(&cut)).unwrap();
    for range in &bounded {
        let times = bounded.iter().filter(|r| *r == range).count();
        assert_eq!(times, if *range == cut_range { 2 } else { 1 }, "only the cut range again: {bounded:?}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_segmented_transfer_cut_for_good_goes_on_after_its_stored_pieces() {
    let origin = Origin::start().await;
    let app = segmenting_app().await;
    // The range holding this byte breaks every time this attempt asks for it (once, and
    // again after each of its retries); the next attempt finds it whole.
    let cut = SIZE * 3 / 4 + 100 * 1024;
    let job = fetch(&app, &origin, "resumed", SIZE, &format!("&cut_once={cut}&cut_times=4")).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["retry_count"], 1, "one attempt cut, one more: {job}");
    let expected = content(5, SIZE);
    assert_eq!(job["sha256"], sha256_hex(&expected), "{job}");
    assert!(app.read_object("resumed.bin").await == expected, "stored bytes differ");
    if crate::helpers::store() == "azure" {
        // Azure uploads start over (README): the next attempt fetches the whole file again.
        assert_eq!(ranges(&origin, "resumed").1, 2, "{:?}", origin.ranges_asked("resumed"));
        app.stop().await;
        return;
    }
    // The second attempt asked for the rest from a stored piece's end, not the whole file.
    let asked = origin.ranges_asked("resumed");
    assert_eq!(asked.iter().filter(|r| r.is_empty()).count(), 1, "{asked:?}");
    let from: u64 = asked
        .iter()
        .find_map(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .expect("the next attempt asks for the rest");
    assert!(from > 0 && from < cut, "resumed from {from}");
    let sent = origin.bytes_sent("resumed");
    println!("resumed from {} MiB; origin sent {:.2}x the file", from / MIB, sent as f64 / SIZE as f64);
    let stored = app.stored_objects().await;
    assert!(stored.len() == 1, "no staging file left: {stored:?}");
    assert_eq!(app.unfinished_uploads().await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_file_fetched_in_ranges_is_checked_against_what_the_job_declares() {
    let origin = Origin::start().await;
    let app = segmenting_app().await;
    let expected = content(5, SIZE);
    let submit = |name: &str, extra: serde_json::Value| {
        let mut body = serde_json::json!({
            "file_url": origin.url(&format!("/resumable/{name}/{SIZE}?seed=5")),
            "bucket_name": app.bucket,
            "object_name": format!("{name}.bin"),
        });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let id = app
        .submit_body(&submit(
            "declared",
            serde_json::json!({ "sha256": sha256_hex(&expected), "md5": md5_hex(&expected), "size": SIZE }),
        ))
        .await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert!(!ranges(&origin, "declared").0.is_empty(), "fetched in ranges");

    let id = app.submit_body(&submit("mismatch", serde_json::json!({ "sha256": "0".repeat(64) }))).await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["last_error"].as_str().unwrap().contains("checksum mismatch"), "{job}");
    assert!(!ranges(&origin, "mismatch").0.is_empty(), "fetched in ranges");
    assert!(app.try_read_object("mismatch.bin").await.is_none(), "a mismatching file is not stored");
    let stored = app.stored_objects().await;
    assert_eq!(stored.len(), 1, "no staging file left: {stored:?}");
    assert_eq!(app.unfinished_uploads().await, 0, "no multipart upload left open");
    app.stop().await;
}

#[tokio::test]
async fn a_cancelled_transfer_in_ranges_leaves_nothing() {
    let origin = Origin::start().await;
    let app = segmenting_app().await;
    // 1 MiB every 400 ms per answer: about 6 s for the whole file with four ranges at once.
    let url = origin.url(&format!("/resumable/cancelled/{SIZE}?seed=5&every_ms=400"));
    let id = app.submit(&url, &app.bucket, "cancelled.bin").await;
    let limit = std::time::Duration::from_secs(30);
    app.wait_until(&id, limit, |j| j["bytes_done"].as_u64().unwrap_or(0) >= 4 * MIB).await;
    let (status, _, job) = app.call(reqwest::Method::POST, &format!("/api/v1/uploads/{id}/cancel"), None, None).await;
    assert_eq!(status, 202, "{job}");
    let job = app.wait_until(&id, limit, |j| j["status"] == "cancelled").await;
    assert!(!ranges(&origin, "cancelled").0.is_empty(), "it was fetched in ranges: {job}");
    assert!(app.try_read_object("cancelled.bin").await.is_none(), "nothing stored");
    let stored = app.stored_objects().await;
    assert!(stored.is_empty(), "left behind: {stored:?}");
    assert_eq!(app.unfinished_uploads().await, 0, "parts left behind");
    app.stop().await;
}
