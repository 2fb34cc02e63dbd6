//! Webhooks: signed per the Standard Webhooks specification (checked with the
//! `standardwebhooks` crate, an implementation independent of fileflow's), sent for
//! completed, failed and cancelled jobs, retried until the receiver takes them, each try
//! visible on the job; the destination guard applies to them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};

use crate::helpers::{Origin, TestApp, spawn_app_with};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Clone, Default)]
struct Receiver {
    /// (headers, body) of every request, in order.
    seen: Arc<Mutex<Vec<(HeaderMap, String)>>>,
    /// Answer 500 to this many requests first.
    refuse_first: Arc<Mutex<usize>>,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: String) -> StatusCode {
    r.seen.lock().unwrap().push((headers, body));
    let mut refuse = r.refuse_first.lock().unwrap();
    if *refuse > 0 {
        *refuse -= 1;
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    StatusCode::NO_CONTENT
}

impl Receiver {
    async fn start(refuse_first: usize) -> (Self, String) {
        Self::start_on("127.0.0.1", refuse_first).await
    }

    /// A receiver on the loopback address `ip`.
    async fn start_on(ip: &str, refuse_first: usize) -> (Self, String) {
        let receiver = Self { refuse_first: Arc::new(Mutex::new(refuse_first)), ..Self::default() };
        let app = axum::Router::new().route("/hook", post(receive)).with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, url)
    }

    /// Wait for `n` requests; each verified with the independent implementation.
    async fn verified(&self, n: usize) -> Vec<(String, Value)> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.seen.lock().unwrap().len() < n {
            assert!(std::time::Instant::now() < deadline, "{} of {n} webhooks came", self.seen.lock().unwrap().len());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let verifier = standardwebhooks::Webhook::new(SECRET).unwrap();
        let seen = self.seen.lock().unwrap().clone();
        seen.into_iter()
            .map(|(headers, body)| {
                verifier.verify(body.as_bytes(), &headers).expect("the signature verifies");
                (headers["webhook-id"].to_str().unwrap().to_owned(), serde_json::from_str(&body).unwrap())
            })
            .collect()
    }
}

async fn app() -> TestApp {
    spawn_app_with(|s| s.auth.webhook_secret = Some(SECRET.parse().unwrap())).await
}

#[tokio::test]
async fn completed_failed_and_cancelled_jobs_are_announced_signed() {
    let origin = Origin::start().await;
    let (receiver, hook) = Receiver::start(0).await;
    let app = app().await;
    let submit = |url: String, key: &str| json!({ "file_url": url, "bucket_name": app.bucket, "object_name": key, "notify_url": hook });
    let done = app.submit_body(&submit(origin.url("/file/100"), "done")).await;
    assert_eq!(app.finished(&done).await["status"], "completed");
    let failed = app.submit_body(&submit(origin.url("/status/404"), "failed")).await;
    assert_eq!(app.finished(&failed).await["status"], "failed");
    let slow = app.submit_body(&submit(origin.url("/slow/100000000?every_ms=50"), "cancelled")).await;
    app.wait_until(&slow, Duration::from_secs(10), |j| j["status"] == "processing").await;
    app.client.post(app.url(&format!("/api/v1/uploads/{slow}/cancel"))).send().await.unwrap();

    let mut got = receiver.verified(3).await;
    got.sort_by_key(|(_, body)| body["data"]["object_name"].as_str().unwrap().to_owned());
    let kinds: Vec<(&str, &str)> =
        got.iter().map(|(_, b)| (b["type"].as_str().unwrap(), b["data"]["status"].as_str().unwrap())).collect();
    assert_eq!(
        kinds,
        [("upload.cancelled", "cancelled"), ("upload.completed", "completed"), ("upload.failed", "failed")]
    );
    let completed = &got[1].1["data"];
    assert_eq!((completed["id"].as_str(), completed["size"].as_u64()), (Some(done.as_str()), Some(100)));
    assert!(completed["download_url"].is_string());
    // Delivered once each (nothing was refused), and shown on the job.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(receiver.seen.lock().unwrap().len(), 3);
    let job = app.job(&done).await;
    let webhooks = job["webhooks"].as_array().unwrap();
    assert_eq!(webhooks.len(), 1, "{job}");
    assert_eq!(webhooks[0]["type"], "upload.completed");
    assert!(webhooks[0]["delivered_at"].is_string());
    assert_eq!(webhooks[0]["attempts"][0]["status"], 204);
    app.stop().await;
}

#[tokio::test]
async fn a_refused_delivery_is_retried_under_the_same_id_and_every_try_is_shown() {
    let origin = Origin::start().await;
    let (receiver, hook) = Receiver::start(2).await;
    let app = app().await;
    let id = app
        .submit_body(&json!({ "file_url": origin.url("/file/10"), "bucket_name": app.bucket, "object_name": "x", "notify_url": hook }))
        .await;
    assert_eq!(app.finished(&id).await["status"], "completed");
    let got = receiver.verified(3).await;
    let ids: std::collections::HashSet<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), 1, "retries carry the same webhook-id: {ids:?}");
    let job = app.wait_until(&id, Duration::from_secs(5), |j| j["webhooks"][0]["delivered_at"].is_string()).await;
    let statuses: Vec<u64> =
        job["webhooks"][0]["attempts"].as_array().unwrap().iter().map(|a| a["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [500, 500, 204], "{job}");
    app.stop().await;
}

#[tokio::test]
async fn notify_urls_are_checked_like_origins() {
    let app = spawn_app_with(|s| {
        s.auth.webhook_secret = Some(SECRET.parse().unwrap());
        s.fetch.allow_private = false;
    })
    .await;
    for bad in ["http://169.254.169.254/hook", "http://127.0.0.1:9/hook", "ftp://example.com/", "not a url"] {
        let response = app
            .post_upload(&json!({ "file_url": "https://example.com/a", "bucket_name": app.bucket, "object_name": "x", "notify_url": bad }))
            .await;
        assert_eq!(response.status(), 422, "{bad}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["field"], "notify_url", "{bad}");
    }
    app.stop().await;
    // Without a signing secret, webhooks cannot be asked for.
    let unsigned = spawn_app_with(|_| {}).await;
    let response = unsigned
        .post_upload(&json!({ "file_url": "https://example.com/a", "bucket_name": unsigned.bucket, "object_name": "x", "notify_url": "https://example.com/hook" }))
        .await;
    assert_eq!(response.status(), 422);
    unsigned.stop().await;
}

/// A key's default webhook announces its jobs that name none.
#[tokio::test]
async fn a_keys_default_webhook_announces_its_jobs() {
    let origin = Origin::start().await;
    let (receiver, hook) = Receiver::start(0).await;
    let app = spawn_app_with(|s| {
        s.auth.webhook_secret = Some(SECRET.parse().unwrap());
        s.auth.mode = fileflow::auth::AuthMode::Required;
    })
    .await;
    app.ensure_bucket().await;
    let create = fileflow::config::KeysCommand::Create {
        name: "hooked".into(),
        role: fileflow::auth::Role::Submitter,
        buckets: Vec::new(),
        rate_limit: None,
        max_unfinished: None,
        file_size_limit: None,
        weight: None,
        notify_url: Some(hook.parse().unwrap()),
        output: fileflow::config::OutputFormat::Json,
    };
    let mut out = Vec::new();
    fileflow::cli::keys::run(&app.settings.data, create, &mut out).await.unwrap();
    let created: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(created["notify_url"], hook.as_str());
    let key = created["key"].as_str().unwrap();
    let body = json!({ "file_url": origin.url("/file/10"), "bucket_name": app.bucket, "object_name": "k" });
    let (status, _, job) = app.call(reqwest::Method::POST, "/api/v1/upload", Some(key), Some(&body)).await;
    assert_eq!(status, 202, "{job}");
    let got = receiver.verified(1).await;
    assert_eq!(got[0].1["type"], "upload.completed");
    assert_eq!(got[0].1["data"]["id"], job["id"]);
    app.stop().await;
}

#[tokio::test]
async fn an_ip_literal_destination_is_checked_again_at_every_send() {
    let origin = Origin::start().await;
    let (receiver, hook) = Receiver::start_on("127.0.0.2", 0).await;
    let dir = tempfile::tempdir().unwrap();
    // Accepted by a process that allows private destinations (no workers: it stays pending)...
    let mut settings = crate::helpers::test_settings(dir.path().to_owned());
    settings.auth.webhook_secret = Some(SECRET.parse().unwrap());
    let first = crate::helpers::start_api_only(settings.clone()).await;
    let id = first
        .submit_body(&json!({ "file_url": origin.url("/file/100"), "bucket_name": "file-bucket",
            "object_name": "a", "notify_url": hook }))
        .await;
    first.stop().await;
    // ...and finished by one that allows only the origin's address: the hook is refused.
    settings.fetch.allow_private = false;
    settings.fetch.allow = vec!["127.0.0.1".into()];
    let second = crate::helpers::start(settings, None).await;
    assert_eq!(second.finished(&id).await["status"], "completed");
    let job = second.wait_until(&id, Duration::from_secs(10), |j| j["webhooks"][0]["given_up_at"].is_string()).await;
    let tried = &job["webhooks"][0]["attempts"][0];
    assert!(tried["error"].as_str().unwrap().contains("refused"), "{job}");
    assert!(job["webhooks"][0]["delivered_at"].is_null(), "{job}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.seen.lock().unwrap().is_empty(), "the refused destination was called");
    second.stop().await;
}

/// A receiver that hangs (accepts and never answers) delays only its own deliveries: one
/// to another receiver, due after 40 of the hanging one's, still arrives at once.
#[tokio::test]
async fn a_hanging_receiver_delays_only_its_own_deliveries() {
    let origin = Origin::start().await;
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang = format!("http://{}/hook", hanging.local_addr().unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    let holder = held.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = hanging.accept().await {
            holder.lock().unwrap().push(socket);
        }
    });
    let (receiver, hook) = Receiver::start(0).await;
    let app = app().await;
    let body = |key: String, notify: &str| json!({ "file_url": origin.url("/file/10"), "bucket_name": app.bucket, "object_name": key, "notify_url": notify });
    // Each to a path of its own: the receiver is the host, whatever the path.
    let mut stuck = Vec::new();
    for i in 0..40 {
        stuck.push(app.submit_body(&body(format!("hang-{i}"), &format!("{hang}/{i}"))).await);
    }
    for id in &stuck {
        app.finished(id).await;
    }
    // The hanging receiver now holds its share of the dispatcher's places for 10 s each.
    let id = app.submit_body(&body("fast".into(), &hook)).await;
    app.finished(&id).await;
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(3);
    while receiver.seen.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the other receiver's delivery waited behind the hanging one");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    println!("delivered {:?} after its job ended", started.elapsed());
    assert!(held.lock().unwrap().len() <= 4, "at most 4 deliveries at once to one receiver");
    app.stop().await;
}

/// The batch deliveries (`batch.*`) the receiver got, verified, once one has come and a
/// second more has passed (for any duplicate to show).
async fn batch_deliveries(receiver: &Receiver) -> Vec<(String, Value)> {
    let is_batch = |body: &str| body.contains(r#""type":"batch."#);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !receiver.seen.lock().unwrap().iter().any(|(_, body)| is_batch(body)) {
        assert!(std::time::Instant::now() < deadline, "no batch webhook came");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n = receiver.seen.lock().unwrap().len();
    receiver
        .verified(n)
        .await
        .into_iter()
        .filter(|(_, body)| body["type"].as_str().unwrap().starts_with("batch."))
        .collect()
}

/// Wait until the batch has ended (its report written or failed); its view.
async fn ended_batch(app: &TestApp, id: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, batch) = app.get(&format!("/api/v1/batches/{id}")).await;
        assert_eq!(status, 200, "{batch}");
        if !batch["ended_at"].is_null() {
            return batch;
        }
        assert!(std::time::Instant::now() < deadline, "batch {id} did not end: {batch}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A batch with a `notify_url` is announced there once when it ends, signed, with its view
/// (counts, bytes, report) as `GET /api/v1/batches/{id}` shows it; its rows take the
/// `notify_url` too. Two API processes watch the batch end, and it is still announced once.
#[tokio::test]
async fn an_ended_batch_is_announced_once_with_its_view() {
    let origin = Origin::start().await;
    let (receiver, hook) = Receiver::start(0).await;
    let app = app().await;
    let other = crate::helpers::start_api_only(app.settings.clone()).await;
    let lines: Vec<String> = (1..=3u64)
        .map(|i| {
            json!({ "file_url": origin.url(&format!("/file/{}?seed={i}", 100 * i)), "object_name": format!("b/{i}") })
                .to_string()
        })
        .chain(["not json".to_owned()])
        .collect();
    let manifest = origin.serve_manifest("hooked.jsonl", "application/x-ndjson", lines.join("\n") + "\n");
    let report = json!({ "bucket_name": app.bucket, "object_name": "reports/hooked.csv" });
    let body = json!({ "manifest_url": manifest, "bucket_name": app.bucket, "notify_url": hook, "report": report });
    let (status, _, created) = app.call(reqwest::Method::POST, "/api/v1/batches", None, Some(&body)).await;
    assert_eq!(status, 202, "{created}");
    let id = created["id"].as_str().unwrap();
    let done = ended_batch(&app, id).await;
    assert_eq!(done["status"], "completed", "{done}");

    let announced = batch_deliveries(&receiver).await;
    assert_eq!(announced.len(), 1, "one batch webhook: {announced:?}");
    let (_, body) = &announced[0];
    assert_eq!(body["type"], "batch.completed");
    let data = &body["data"];
    assert_eq!(data, &done, "the body shows the batch as GET shows it once ended");
    assert_eq!((data["id"].as_str(), data["total"].as_u64()), (Some(id), Some(4)));
    let counts = &data["counts"];
    assert_eq!((counts["completed"].as_u64(), counts["invalid"].as_u64()), (Some(3), Some(1)), "{data}");
    assert_eq!(data["bytes_done"], 600);
    assert_eq!(
        (data["report"]["object_name"].as_str(), data["report"]["written"].as_bool()),
        (Some("reports/hooked.csv"), Some(true))
    );
    // The rows' own webhooks, one per job, beside it.
    let uploads =
        receiver.seen.lock().unwrap().iter().filter(|(_, b)| b.contains(r#""type":"upload.completed""#)).count();
    assert_eq!(uploads, 3);
    other.stop().await;
    app.stop().await;
}

/// A cancelled batch is announced as `batch.cancelled` once its running jobs have stopped.
#[tokio::test]
async fn a_cancelled_batch_is_announced_as_cancelled() {
    let origin = Origin::start().await;
    let (receiver, hook) = Receiver::start(0).await;
    let app = spawn_app_with(|s| {
        s.auth.webhook_secret = Some(SECRET.parse().unwrap());
        s.worker.worker_concurrency = 1;
    })
    .await;
    let rows: Vec<String> =
        (0..20).map(|i| format!("{},slow/{i}", origin.url(&format!("/delay/400/100?seed={i}")))).collect();
    let manifest =
        origin.serve_manifest("slow.csv", "text/csv", format!("file_url,object_name\n{}\n", rows.join("\n")));
    let body = json!({ "manifest_url": manifest, "bucket_name": app.bucket, "notify_url": hook });
    let (status, _, created) = app.call(reqwest::Method::POST, "/api/v1/batches", None, Some(&body)).await;
    assert_eq!(status, 202, "{created}");
    let id = created["id"].as_str().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while app.get(&format!("/api/v1/batches/{id}")).await.1["total"] != 20 {
        assert!(std::time::Instant::now() < deadline, "the manifest was not read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _, cancelled) =
        app.call(reqwest::Method::POST, &format!("/api/v1/batches/{id}/cancel"), None, None).await;
    assert_eq!(status, 202, "{cancelled}");
    let done = ended_batch(&app, id).await;
    let announced = batch_deliveries(&receiver).await;
    assert_eq!(announced.len(), 1, "one batch webhook: {announced:?}");
    assert_eq!(announced[0].1["type"], "batch.cancelled");
    assert_eq!(announced[0].1["data"], done);
    assert!(done["counts"]["cancelled"].as_u64() > Some(0), "{done}");
    assert!(done["report"].is_null(), "no report was asked for: {done}");
    app.stop().await;
}

/// Two processes closing one ended batch at once (each with its own connections to the
/// database): one closes it and enqueues its delivery, in one transaction; the other finds
/// it closed and enqueues nothing.
#[tokio::test]
async fn a_batch_closed_by_two_processes_at_once_is_announced_once() {
    use fileflow::metadata::{BatchCreated, BatchStore, EndNotice, NewBatch, PgDb, PgRepository, SqliteDb};
    use fileflow::metadata::{SqliteRepository, Subject, WebhookOutbox};
    let dir = tempfile::tempdir().unwrap();
    let url = match crate::helpers::distributed() {
        true => crate::services::fresh_postgres().await.expect("distributed needs PostgreSQL"),
        false => SqliteDb::default_url(dir.path()),
    };
    let open = || async {
        if url.starts_with("postgres") {
            let db = PgDb::connect(&url).await.unwrap();
            db.migrate().await.unwrap();
            let outbox: Arc<dyn WebhookOutbox> = Arc::new(db.clone());
            (Arc::new(PgRepository::new(db)) as Arc<dyn BatchStore>, outbox)
        } else {
            let db = SqliteDb::connect(&url).await.unwrap();
            db.migrate().await.unwrap();
            let outbox: Arc<dyn WebhookOutbox> = Arc::new(db.clone());
            (Arc::new(SqliteRepository::new(db)) as Arc<dyn BatchStore>, outbox)
        }
    };
    let (first, outbox) = open().await;
    let (second, _) = open().await;
    let now = chrono::Utc::now();
    let created = first.create_batch(&NewBatch { owner: None, request: "{}".into(), idempotency: None }, now).await;
    let BatchCreated::New(batch) = created.unwrap() else { panic!("a new batch") };
    first.take_reading("reader", Duration::from_secs(30), now).await.unwrap().expect("the batch to read");
    assert!(first.finish_reading(batch.id, "reader", None, now).await.unwrap());
    let ended = first.ending(now).await.unwrap();
    assert_eq!(ended.iter().map(|b| b.id).collect::<Vec<_>>(), [batch.id], "an empty batch ends at once");
    let notice = |by: &'static str| EndNotice {
        url: "http://127.0.0.1:9/hook".into(),
        render: Box::new(move |closed| json!({ "by": by, "status": closed.state.as_str() }).to_string()),
    };
    let (a, b) = tokio::join!(
        first.close(batch.id, None, Some(notice("first")), now),
        second.close(batch.id, None, Some(notice("second")), now)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a != b, "exactly one of the two closed the batch ({a}, {b})");
    // And a closer that comes back later (say, after a restart) adds nothing either.
    assert!(!first.close(batch.id, None, Some(notice("late")), now).await.unwrap());
    assert!(first.ending(now).await.unwrap().is_empty(), "a closed batch is not ending again");

    let due = outbox.claim_due(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(due[0].event, "batch.completed");
    let Subject::Batch { id, data } = &due[0].subject else { panic!("a batch delivery: {due:?}") };
    assert_eq!(*id, batch.id);
    let data: Value = serde_json::from_str(data).unwrap();
    assert_eq!(
        (data["by"].as_str(), data["status"].as_str()),
        (Some(if a { "first" } else { "second" }), Some("completed"))
    );
}
