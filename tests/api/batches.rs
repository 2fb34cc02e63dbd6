//! `/api/v1/batches`: a manifest by URL (CSV, JSON Lines, a URL list) read into jobs in
//! the background; counts and status as they go; invalid rows listed with their row
//! numbers while the valid ones run; cancel, pause and resume; the report.

use std::time::{Duration, Instant};

use fileflow::auth::{AuthMode, KeyLimits};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Origin, TestApp, content, sha256_hex, spawn_app, spawn_app_with};

async fn submit(app: &TestApp, key: Option<&str>, body: &Value) -> String {
    let (status, headers, answer) = app.call(Method::POST, "/api/v1/batches", key, Some(body)).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    assert_eq!(headers["location"], format!("/api/v1/batches/{id}").as_str());
    id
}

async fn batch(app: &TestApp, id: &str) -> Value {
    let (status, _, batch) = app.call(Method::GET, &format!("/api/v1/batches/{id}"), None, None).await;
    assert_eq!(status, 200, "{batch}");
    batch
}

/// Poll the batch until `done`; panic with its last view after `limit`.
async fn batch_until(app: &TestApp, id: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let batch = batch(app, id).await;
        if done(&batch) {
            return batch;
        }
        assert!(Instant::now() < deadline, "batch {id} did not get there in {limit:?}: {batch}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until the batch has ended (every job ended, its report written).
async fn ended(app: &TestApp, id: &str) -> Value {
    batch_until(app, id, Duration::from_secs(60), |b| !b["ended_at"].is_null()).await
}

async fn batch_jobs(app: &TestApp, id: &str) -> Vec<Value> {
    let (status, _, listed) =
        app.call(Method::GET, &format!("/api/v1/uploads?batch={id}&limit=1000"), None, None).await;
    assert_eq!(status, 200, "{listed}");
    listed["uploads"].as_array().unwrap().clone()
}

#[tokio::test]
async fn a_csv_manifest_by_url_runs_its_valid_rows_and_lists_the_invalid_ones() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let file = |seed: u64, size: u64| origin.url(&format!("/file/{size}?seed={seed}"));
    let good_sha = sha256_hex(&content(3, 3000));
    let manifest = [
        "file_url,object_name,size,sha256".to_owned(),
        format!("{},csv/one,1000,", file(1, 1000)),
        "ftp://example.com/x,csv/ftp,,".to_owned(),
        format!("{},csv/two,,", file(2, 2000)),
        format!("\"{}\",\"csv/three, quoted\",3000,{good_sha}", file(3, 3000)),
        format!("{},csv/short", file(4, 10)),
        String::new(),
        format!("{},csv/bad-size,lots,", file(5, 10)),
        format!("{},,500,", file(6, 500)),
    ]
    .join("\r\n");
    let url = origin.serve_manifest("m.csv", "text/csv", manifest);
    let report = json!({ "bucket_name": app.bucket, "object_name": "reports/csv.csv" });
    let id = submit(&app, None, &json!({ "manifest_url": url, "bucket_name": app.bucket, "report": report })).await;

    let done = ended(&app, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["total"], 7, "{done}");
    let counts = &done["counts"];
    assert_eq!((counts["completed"].as_u64(), counts["invalid"].as_u64()), (Some(4), Some(3)), "{done}");
    assert_eq!(
        (counts["pending"].as_u64(), counts["processing"].as_u64(), counts["failed"].as_u64()),
        (Some(0), Some(0), Some(0))
    );
    assert_eq!(done["bytes_done"], 1000 + 2000 + 3000 + 500, "{done}");
    for (key, seed, size) in [("csv/one", 1, 1000), ("csv/two", 2, 2000), ("csv/three, quoted", 3, 3000)] {
        assert!(app.read_object(key).await == content(seed, size), "{key} holds the origin's exact bytes");
    }
    // A row without object_name is named after its URL's host and path.
    let host = origin.addr.to_string().replace(':', "%3A");
    let named = batch_jobs(&app, &id).await.into_iter().find(|j| j["size"] == 500).expect("the unnamed row ran");
    assert!(named["object_name"].as_str().unwrap().ends_with("/file/500"), "{named} ({host})");
    assert_eq!(batch_jobs(&app, &id).await.len(), 4, "the valid rows, and only they, are the batch's jobs");

    let report = String::from_utf8(app.read_object("reports/csv.csv").await).unwrap();
    // The batch links its report, served to the key that may see the batch.
    let link = done["report"]["url"].as_str().expect("a written report's link");
    assert_eq!(link, format!("/api/v1/batches/{id}/report"));
    let served = app.client.get(app.url(link)).send().await.unwrap();
    assert_eq!(served.status(), 200);
    assert!(served.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    assert_eq!(served.text().await.unwrap(), report, "the link serves the stored report");
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(lines[0], "row,file_url,bucket_name,object_name,status,size,sha256,etag,last_error");
    assert_eq!(lines.len(), 1 + 7, "one report row per manifest row:\n{report}");
    let status_of = |row: usize| lines[row].split(',').nth(4).map(str::to_owned);
    let rows: Vec<String> = lines[1..].iter().map(|l| l.split(',').next().unwrap().to_owned()).collect();
    assert_eq!(rows, ["1", "2", "3", "4", "5", "6", "7"], "rows in manifest order, blank lines not counted");
    assert_eq!(status_of(1).as_deref(), Some("completed"));
    assert_eq!(status_of(2).as_deref(), Some("invalid"));
    assert!(lines[2].contains("file_url"), "the reason names the field: {}", lines[2]);
    assert!(lines[4].contains("\"csv/three, quoted\"") && lines[4].contains(&good_sha), "{}", lines[4]);
    assert!(lines[5].starts_with("5,") && lines[5].contains(",invalid,"), "{}", lines[5]);
    assert!(lines[6].starts_with("6,") && lines[6].contains("size"), "{}", lines[6]);
    app.stop().await;
}

#[tokio::test]
async fn a_json_lines_manifest_takes_the_batch_defaults_and_its_jobs_are_listed_by_batch() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let lines: Vec<String> = (1..=20u64)
        .map(|i| {
            json!({ "file_url": origin.url(&format!("/file/{}?seed={i}", 100 * i)), "object_name": format!("j/{i}") })
                .to_string()
        })
        .chain(["not json".to_owned(), "[1, 2]".to_owned()])
        .collect();
    let url = origin.serve_manifest("m.jsonl", "application/x-ndjson", lines.join("\n") + "\n");
    let id =
        submit(&app, None, &json!({ "manifest_url": url, "bucket_name": app.bucket, "prefix": "in/", "priority": 5 }))
            .await;
    let done = ended(&app, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        (done["total"].as_u64(), done["counts"]["completed"].as_u64(), done["counts"]["invalid"].as_u64()),
        (Some(22), Some(20), Some(2))
    );
    for i in 1..=20u64 {
        assert!(app.read_object(&format!("in/j/{i}")).await == content(i, 100 * i), "in/j/{i}");
    }
    let jobs = batch_jobs(&app, &id).await;
    assert_eq!(jobs.len(), 20);
    assert!(jobs.iter().all(|j| j["priority"] == 5 && j["status"] == "completed"), "{jobs:?}");
    // Jobs outside the batch are not listed under it.
    app.submit(&origin.url("/file/10"), &app.bucket, "alone").await;
    assert_eq!(batch_jobs(&app, &id).await.len(), 20);
    let (_, _, listed) = app.call(Method::GET, "/api/v1/batches", None, None).await;
    assert_eq!(listed["batches"][0]["id"], id.as_str(), "{listed}");
    app.stop().await;
}

#[tokio::test]
async fn a_url_list_manifest_is_read_as_the_batch_endpoint_reads_it() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let list =
        format!("TsvHttpData-1.0\n{}\t700\n{}\n", origin.url("/file/700?seed=7"), origin.url("/file/800?seed=8"));
    let url = origin.serve_manifest("list.tsv", "text/tab-separated-values", list);
    let id = submit(&app, None, &json!({ "manifest_url": url, "bucket_name": app.bucket, "prefix": "tsv/" })).await;
    let done = ended(&app, &id).await;
    assert_eq!(done["counts"]["completed"], 2, "{done}");
    // Named `<prefix><host>/<path>`, as the transfer service names them.
    let host = origin.addr.ip().to_string();
    assert!(app.read_object(&format!("tsv/{host}/file/700")).await == content(7, 700));
    app.stop().await;
}

#[tokio::test]
async fn cancel_stops_the_waiting_jobs_of_a_batch() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.worker.worker_concurrency = 1).await;
    let rows: Vec<String> =
        (0..30).map(|i| format!("{},slow/{i}", origin.url(&format!("/delay/400/100?seed={i}")))).collect();
    let url = origin.serve_manifest("slow.csv", "text/csv", format!("file_url,object_name\n{}\n", rows.join("\n")));
    let report = json!({ "bucket_name": app.bucket, "object_name": "reports/cancelled.csv" });
    let id = submit(&app, None, &json!({ "manifest_url": url, "bucket_name": app.bucket, "report": report })).await;
    batch_until(&app, &id, Duration::from_secs(30), |b| {
        b["total"] == 30 && b["counts"]["completed"].as_u64() >= Some(1)
    })
    .await;
    let (status, _, cancelled) = app.call(Method::POST, &format!("/api/v1/batches/{id}/cancel"), None, None).await;
    assert_eq!(status, 202, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    let done = ended(&app, &id).await;
    let counts = &done["counts"];
    assert_eq!((counts["pending"].as_u64(), counts["processing"].as_u64()), (Some(0), Some(0)), "{done}");
    let (completed, cancelled) = (counts["completed"].as_u64().unwrap(), counts["cancelled"].as_u64().unwrap());
    assert_eq!(completed + cancelled, 30, "{done}");
    assert!(cancelled >= 20, "most of the batch never ran: {done}");
    let jobs = batch_jobs(&app, &id).await;
    assert_eq!(jobs.iter().filter(|j| j["status"] == "cancelled").count() as u64, cancelled);
    let report = String::from_utf8(app.read_object("reports/cancelled.csv").await).unwrap();
    assert_eq!(report.lines().count(), 31);
    assert_eq!(report.lines().filter(|l| l.contains(",cancelled,")).count() as u64, cancelled);
    let (status, _, again) = app.call(Method::POST, &format!("/api/v1/batches/{id}/cancel"), None, None).await;
    assert_eq!(status, 409, "{again}");
    app.stop().await;
}

/// A batch's event stream shows it now, then as it changes (counts, rate, ETA), and ends
/// once the batch has ended; the view's rate and ETA are what a progress bar needs.
#[tokio::test]
async fn a_batch_event_stream_follows_it_to_its_end() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.worker.worker_concurrency = 2).await;
    let rows: Vec<String> =
        (0..12).map(|i| format!("{},followed/{i}", origin.url(&format!("/delay/300/100?seed={i}")))).collect();
    let url = origin.serve_manifest("followed.csv", "text/csv", format!("file_url,object_name\n{}\n", rows.join("\n")));
    let id = submit(&app, None, &json!({ "manifest_url": url, "bucket_name": app.bucket })).await;
    let path = format!("/api/v1/batches/{id}/events");
    let (events, ended) = crate::events::read_events(&app, &path, None, Duration::from_secs(60), |_| false).await;
    assert!(ended, "the stream ends with the batch");
    assert!(events.len() >= 3, "the batch now, changes, its end: {events:?}");
    let completed: Vec<u64> = events.iter().map(|e| e["counts"]["completed"].as_u64().unwrap()).collect();
    assert!(completed.windows(2).all(|w| w[0] <= w[1]), "progress never goes back: {completed:?}");
    assert!(events.iter().any(|e| e["eta_seconds"].as_u64().is_some()), "an ETA while it runs: {events:?}");
    let last = events.last().unwrap();
    assert_eq!(
        (last["status"].as_str(), last["counts"]["completed"].as_u64()),
        (Some("completed"), Some(12)),
        "{last}"
    );
    assert!(last["ended_at"].is_string() && last["eta_seconds"].is_null(), "{last}");
    assert!(last["rate"].as_f64().is_some_and(|r| r > 0.0), "{last}");
    assert_eq!(last["id"], batch(&app, &id).await["id"]);

    // No stream for a batch that is not there (or is another key's).
    let (status, _, _) = app.call(Method::GET, "/api/v1/batches/999999/events", None, None).await;
    assert_eq!(status, 404);
    app.stop().await;
}

/// Cancelling a batch whose jobs all run (none waits) stops them too.
#[tokio::test]
async fn cancel_stops_the_running_jobs_of_a_batch_with_none_waiting() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.worker.worker_concurrency = 4).await;
    let rows: Vec<String> = (0..2)
        .map(|i| format!("{},running/{i}", origin.url(&format!("/trickle/100000?every_ms=50&seed={i}"))))
        .collect();
    let url = origin.serve_manifest("running.csv", "text/csv", format!("file_url,object_name\n{}\n", rows.join("\n")));
    let id = submit(&app, None, &json!({ "manifest_url": url, "bucket_name": app.bucket })).await;
    batch_until(&app, &id, Duration::from_secs(30), |b| b["total"] == 2 && b["counts"]["processing"] == 2).await;
    let (status, _, _) = app.call(Method::POST, &format!("/api/v1/batches/{id}/cancel"), None, None).await;
    assert_eq!(status, 202);
    let done = batch_until(&app, &id, Duration::from_secs(30), |b| !b["ended_at"].is_null()).await;
    assert_eq!((done["status"].as_str(), done["counts"]["cancelled"].as_u64()), (Some("cancelled"), Some(2)), "{done}");
    assert!(app.try_read_object("running/0").await.is_none() && app.try_read_object("running/1").await.is_none());
    app.stop().await;
}

#[tokio::test]
async fn pause_holds_the_waiting_jobs_and_resume_releases_them() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.worker.worker_concurrency = 2).await;
    let rows: Vec<String> =
        (0..20).map(|i| format!("{},held/{i}", origin.url(&format!("/delay/300/100?seed={i}")))).collect();
    let url = origin.serve_manifest("held.csv", "text/csv", format!("file_url,object_name\n{}\n", rows.join("\n")));
    let id = submit(&app, None, &json!({ "manifest_url": url, "bucket_name": app.bucket })).await;
    batch_until(&app, &id, Duration::from_secs(30), |b| {
        b["total"] == 20 && b["counts"]["completed"].as_u64() >= Some(1)
    })
    .await;
    let (status, _, paused) = app.call(Method::POST, &format!("/api/v1/batches/{id}/pause"), None, None).await;
    assert_eq!(status, 202, "{paused}");
    assert_eq!(paused["status"], "paused");
    // What was running finishes; nothing else starts.
    let settled = batch_until(&app, &id, Duration::from_secs(30), |b| b["counts"]["processing"] == 0).await;
    let held = settled["counts"]["completed"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = batch(&app, &id).await;
    assert_eq!(still["status"], "paused", "{still}");
    assert_eq!(still["counts"]["completed"].as_u64(), Some(held), "no job ran while paused: {still}");
    assert!(still["counts"]["pending"].as_u64().unwrap() >= 10, "{still}");
    let (status, _, again) = app.call(Method::POST, &format!("/api/v1/batches/{id}/pause"), None, None).await;
    assert_eq!(status, 409, "{again}");

    let (status, _, resumed) = app.call(Method::POST, &format!("/api/v1/batches/{id}/resume"), None, None).await;
    assert_eq!(status, 202, "{resumed}");
    let done = ended(&app, &id).await;
    assert_eq!(
        (done["status"].as_str(), done["counts"]["completed"].as_u64()),
        (Some("completed"), Some(20)),
        "{done}"
    );
    assert!(app.read_object("held/19").await == content(19, 100));
    app.stop().await;
}

#[tokio::test]
async fn a_batch_belongs_to_the_key_that_created_it() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.auth.mode = AuthMode::Required).await;
    app.ensure_bucket().await;
    let (_, alice) = app.create_key("submitter", &[&app.bucket], KeyLimits::default()).await;
    let (_, bob) = app.create_key("submitter", &[&app.bucket], KeyLimits::default()).await;
    let url =
        origin.serve_manifest("a.csv", "text/csv", format!("file_url,object_name\n{},mine\n", origin.url("/file/10")));
    let report = json!({ "bucket_name": app.bucket, "object_name": "reports/alice.csv" });
    let id =
        submit(&app, Some(&alice), &json!({ "manifest_url": url, "bucket_name": app.bucket, "report": report })).await;
    let (status, _, _) = app.call(Method::GET, &format!("/api/v1/batches/{id}"), Some(&bob), None).await;
    assert_eq!(status, 404);
    // Its report is alice's to read, not bob's.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, _, batch) = app.call(Method::GET, &format!("/api/v1/batches/{id}"), Some(&alice), None).await;
        if !batch["ended_at"].is_null() {
            break;
        }
        assert!(Instant::now() < deadline, "the batch did not end: {batch}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report_path = format!("/api/v1/batches/{id}/report");
    let read = |key: String| {
        let request = app.client.get(app.url(&report_path)).bearer_auth(key);
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(read(bob.clone()).await, 404);
    assert_eq!(read(alice.clone()).await, 200);
    let (status, _, _) = app.call(Method::POST, &format!("/api/v1/batches/{id}/cancel"), Some(&bob), None).await;
    assert_eq!(status, 404);
    let (_, _, listed) = app.call(Method::GET, "/api/v1/batches", Some(&bob), None).await;
    assert_eq!(listed["batches"].as_array().unwrap().len(), 0, "{listed}");
    let (status, _, seen) = app.call(Method::GET, &format!("/api/v1/batches/{id}"), Some(&alice), None).await;
    assert_eq!(status, 200, "{seen}");
    let elsewhere = json!({ "manifest_url": url, "bucket_name": app.bucket, "report": { "bucket_name": "other-bucket", "object_name": "r.csv" } });
    let (status, _, refused) = app.call(Method::POST, "/api/v1/batches", Some(&alice), Some(&elsewhere)).await;
    assert_eq!(status, 403, "{refused}");
    app.stop().await;
}

#[tokio::test]
async fn a_batch_request_is_checked_before_anything_is_written() {
    let app = spawn_app().await;
    for (body, field) in [
        (json!({ "bucket_name": app.bucket }), "manifest_url"),
        (json!({ "manifest_url": "ftp://example.com/m.csv" }), "manifest_url"),
        (json!({ "manifest_url": "https://example.com/m", "format": "xml" }), "format"),
        (json!({ "manifest_url": "https://example.com/m", "if_exists": "maybe" }), "if_exists"),
        (json!({ "manifest_url": "https://example.com/m", "format": "tsv" }), "bucket_name"),
    ] {
        let (status, _, answer) = app.call(Method::POST, "/api/v1/batches", None, Some(&body)).await;
        assert_eq!(status, 422, "{body}: {answer}");
        assert_eq!(answer["error"]["field"], field, "{answer}");
    }
    let (_, _, listed) = app.call(Method::GET, "/api/v1/batches", None, None).await;
    assert_eq!(listed["batches"].as_array().unwrap().len(), 0);
    // The same Idempotency-Key and body answer the first batch.
    let body = json!({ "manifest_url": "https://example.com/m.csv", "bucket_name": app.bucket });
    let send = || app.client.post(app.url("/api/v1/batches")).header("Idempotency-Key", "k1").json(&body).send();
    let (first, second) = (send().await.unwrap(), send().await.unwrap());
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (202, 202));
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    let (a, b): (Value, Value) = (first.json().await.unwrap(), second.json().await.unwrap());
    assert_eq!(a["id"], b["id"]);
    app.stop().await;
}

#[tokio::test]
async fn a_batch_read_when_the_process_stops_is_read_on_from_its_last_chunk_after_a_restart() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let rows: Vec<String> = (1..=3000u64)
        .map(|i| match i % 100 {
            0 => format!("{},r/{i}", origin.url(&format!("/file/10?seed={i}"))),
            _ => format!("ftp://example.com/{i},r/{i}"),
        })
        .collect();
    let body = format!("file_url,object_name\n{}\n", rows.join("\n"));
    // About 40 pieces, one every 200 ms: eight seconds of reading.
    let url = origin.serve_manifest("long.csv", "text/csv", body) + "?every_ms=200&piece=3000";
    let report = json!({ "bucket_name": app.bucket, "object_name": "reports/restart.csv" });
    let id = submit(&app, None, &json!({ "manifest_url": url, "bucket_name": app.bucket, "report": report })).await;
    // Stopped once its first jobs ran (on Kafka, once the workers have joined their group:
    // a member that leaves while joining holds the group's next join up).
    let part = batch_until(&app, &id, Duration::from_secs(30), |b| b["counts"]["completed"].as_u64() > Some(0)).await;
    assert_eq!(part["status"], "reading", "stopped half-way: {part}");
    let settings = app.settings.clone();
    let dir = app.stop().await;

    let app = crate::helpers::start(settings, dir).await;
    let done = ended(&app, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!((done["total"].as_u64(), done["counts"]["invalid"].as_u64()), (Some(3000), Some(2970)), "{done}");
    assert_eq!(done["counts"]["completed"], 30, "{done}");
    assert_eq!(batch_jobs(&app, &id).await.len(), 30, "no row became two jobs");
    let report = String::from_utf8(app.read_object("reports/restart.csv").await).unwrap();
    let rows: Vec<u64> = report.lines().skip(1).map(|l| l.split(',').next().unwrap().parse().unwrap()).collect();
    assert_eq!(rows, (1..=3000).collect::<Vec<_>>(), "every row once, in order");
    assert!(app.read_object("r/3000").await == content(3000, 10));
    app.stop().await;
}

#[tokio::test]
async fn a_manifest_sent_with_the_request_is_kept_in_the_store_and_read_as_a_batch() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.store.max_file_size = bytesize::ByteSize::kib(64)).await;
    let rows: Vec<String> = (0..20)
        .map(|i| {
            format!(
                "{{\"file_url\":\"{}\",\"object_name\":\"up/{i}\"}}",
                origin.url(&format!("/file/{}?seed={i}", 50 + i))
            )
        })
        .collect();
    let manifest = rows.join("\n") + "\n";
    let upload = |query: String, body: String| {
        app.client
            .post(app.url(&format!("/api/v1/batches/upload?{query}")))
            .header("Content-Type", "application/x-ndjson")
            .body(body)
            .send()
    };
    let bucket = &app.bucket;
    let answer = upload(
        format!("bucket_name={bucket}&manifest_object_name=in/m.jsonl&report_object_name=out/r.csv"),
        manifest.clone(),
    )
    .await
    .unwrap();
    assert_eq!(answer.status(), 202);
    let batch: Value = answer.json().await.unwrap();
    let batch = ended(&app, batch["id"].as_str().unwrap()).await;
    assert_eq!((batch["total"].as_u64(), batch["counts"]["completed"].as_u64()), (Some(20), Some(20)), "{batch}");
    assert_eq!(batch["format"], "jsonl", "{batch}");
    assert_eq!(app.read_object("in/m.jsonl").await, manifest.as_bytes());
    assert_eq!(app.read_object("up/3").await, content(3, 53));
    let report = String::from_utf8(app.read_object("out/r.csv").await).unwrap();
    assert_eq!(report.lines().count(), 21, "{report}");

    // Bad input: a clear error, no batch, nothing stored.
    for (query, field) in [
        ("manifest_object_name=x.jsonl".to_owned(), "bucket_name"),
        (format!("bucket_name={bucket}"), "manifest_object_name"),
        (format!("bucket_name={bucket}&manifest_object_name=x.jsonl&priority=high"), "priority"),
        (format!("bucket_name={bucket}&manifest_object_name=x.jsonl&format=xml"), "format"),
    ] {
        let answer = upload(query.clone(), manifest.clone()).await.unwrap();
        assert_eq!(answer.status(), 422, "{query}");
        let error: Value = answer.json().await.unwrap();
        assert_eq!(error["error"]["field"], field, "{query}: {error}");
    }
    // Larger than --max-file-size: 413, and no manifest left behind.
    let answer =
        upload(format!("bucket_name={bucket}&manifest_object_name=big.jsonl"), manifest.repeat(100)).await.unwrap();
    assert_eq!(answer.status(), 413);
    assert_eq!(app.try_read_object("big.jsonl").await, None, "nothing kept of a refused manifest");
    let (_, _, listed) = app.call(Method::GET, "/api/v1/batches", None, None).await;
    assert_eq!(listed["batches"].as_array().unwrap().len(), 1, "{listed}");
    app.stop().await;
}

#[tokio::test]
async fn a_key_can_upload_a_manifest_only_into_its_own_buckets() {
    let app = spawn_app_with(|s| s.auth.mode = AuthMode::Required).await;
    let (_, key) = app.create_key("submitter", &[&format!("{}/mine/*", app.bucket)], KeyLimits::default()).await;
    let upload = |query: String| {
        app.client
            .post(app.url(&format!("/api/v1/batches/upload?{query}")))
            .bearer_auth(&key)
            .header("Content-Type", "text/csv")
            .body("file_url,object_name\nhttps://example.com/a,mine/a\n")
            .send()
    };
    let bucket = &app.bucket;
    for query in [
        format!("bucket_name={bucket}&manifest_object_name=theirs/m.csv"),
        "bucket_name=elsewhere&manifest_object_name=mine/m.csv".to_owned(),
        format!("bucket_name={bucket}&manifest_object_name=mine/m.csv&report_object_name=theirs/r.csv"),
    ] {
        let answer = upload(query.clone()).await.unwrap();
        assert_eq!(answer.status(), 403, "{query}");
    }
    assert_eq!(app.try_read_object("theirs/m.csv").await, None);
    assert_eq!(app.try_read_object("mine/m.csv").await, None, "nothing stored for a refused request");
    // A key that may not create buckets stores into one that exists.
    app.ensure_bucket().await;
    let answer = upload(format!("bucket_name={bucket}&manifest_object_name=mine/m.csv")).await.unwrap();
    assert_eq!(answer.status(), 202);
    app.stop().await;
}
