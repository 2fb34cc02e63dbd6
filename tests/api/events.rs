//! Live events: a job's stream follows it from its state at subscription to its end, with
//! progress on the way; the stream of all jobs shows a key only its own jobs. On the
//! distributed stack the changes come from PostgreSQL's notifications.

use std::time::Duration;

use fileflow::auth::KeyLimits;
use futures::StreamExt as _;
use serde_json::{Value, json};

use crate::helpers::{Origin, TestApp, spawn_app};

/// Read an event stream's `data:` JSONs until it ends or `enough` says so (at most `limit`).
pub async fn read_events(
    app: &TestApp,
    path: &str,
    key: Option<&str>,
    limit: Duration,
    enough: impl Fn(&[Value]) -> bool,
) -> (Vec<Value>, bool) {
    let mut request = app.client.get(app.url(path));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();
    let (mut events, mut pending) = (Vec::new(), String::new());
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let chunk = match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(chunk)) => chunk.unwrap(),
            Ok(None) => return (events, true),
            Err(_) => panic!("no end within {limit:?}; events so far: {events:?}"),
        };
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            for line in event.lines() {
                if let Some(data) = line.strip_prefix("data: ").or_else(|| line.strip_prefix("data:")) {
                    events.push(serde_json::from_str(data).unwrap());
                }
            }
        }
        if enough(&events) {
            return (events, false);
        }
    }
}

#[tokio::test]
async fn a_jobs_stream_follows_it_with_progress_to_its_end() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    // 8 MiB at about 3 MiB/s: a few progress reports.
    let id = app.submit(&origin.url("/slow/8388608?every_ms=20"), &app.bucket, "watched.bin").await;
    let (events, ended) =
        read_events(&app, &format!("/api/v1/uploads/{id}/events"), None, Duration::from_secs(30), |_| false).await;
    assert!(ended, "the stream ends with the job");
    assert!(events.iter().all(|e| e["id"] == id.as_str()), "{events:?}");
    let statuses: Vec<&str> = events.iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert_eq!(statuses.last(), Some(&"completed"), "{statuses:?}");
    assert_eq!(events.last().unwrap()["size"], 8388608);
    let moving = events
        .iter()
        .filter(|e| e["status"] == "processing" && e["bytes_done"].as_u64().is_some_and(|d| d > 0 && d < 8388608))
        .count();
    assert!(moving >= 1, "progress on the way: {events:?}");
    let done: Vec<u64> = events.iter().filter_map(|e| e["bytes_done"].as_u64()).collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "progress never goes back: {done:?}");
    println!("{} events: {statuses:?}", events.len());

    // A finished job's stream is the job, then the end.
    let (events, ended) =
        read_events(&app, &format!("/api/v1/uploads/{id}/events"), None, Duration::from_secs(5), |_| false).await;
    assert!(ended && events.len() == 1 && events[0]["status"] == "completed", "{events:?}");
    app.stop().await;
}

#[tokio::test]
async fn the_stream_of_all_jobs_shows_a_key_its_own_jobs_only() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    app.ensure_bucket().await;
    let (_, admin) = app.create_key("admin", &[], KeyLimits::default()).await;
    let (_, alice) = app.create_key("submitter", &[&app.bucket], KeyLimits::default()).await;
    let (_, bob) = app.create_key("submitter", &[&app.bucket], KeyLimits::default()).await;
    // The open API closes within a second of the first key.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let refused = app.client.get(app.url("/api/v1/events")).send().await.unwrap();
    assert_eq!(refused.status(), 401, "a key is needed once keys exist");

    let submit = |key: String, name: &'static str, size: u64| {
        let (app_url, bucket, url) =
            (app.url("/api/v1/upload"), app.bucket.clone(), origin.url(&format!("/delay/300/{size}")));
        let client = app.client.clone();
        async move {
            let body = json!({ "file_url": url, "bucket_name": bucket, "object_name": name });
            let answer: Value =
                client.post(app_url).bearer_auth(key).json(&body).send().await.unwrap().json().await.unwrap();
            answer["id"].as_str().unwrap().to_owned()
        }
    };
    // Alice and the admin watch until Alice's job has completed; Bob's job runs meanwhile.
    let watch = |key: String| {
        let app = &app;
        async move {
            let (events, _) = read_events(app, "/api/v1/events", Some(&key), Duration::from_secs(30), |events| {
                events.iter().any(|e| e["status"] == "completed" && e["bytes_total"] == 6000)
            })
            .await;
            events
        }
    };
    let submits = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let bobs = submit(bob.clone(), "bob.bin", 5000).await;
        let alices = submit(alice.clone(), "alice.bin", 6000).await;
        (bobs, alices)
    };
    let (alice_saw, admin_saw, (bobs, alices)) = tokio::join!(watch(alice.clone()), watch(admin.clone()), submits);
    let ids = |events: &[Value]| {
        events.iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(ids(&alice_saw), [alices.clone()].into(), "Alice sees her own job only: {alice_saw:?}");
    assert!(ids(&admin_saw).contains(&alices) && ids(&admin_saw).contains(&bobs), "the admin sees both: {admin_saw:?}");
    assert!(alice_saw.iter().all(|e| e.get("owner").is_none()), "owners are never sent: {alice_saw:?}");
    app.stop().await;
}
