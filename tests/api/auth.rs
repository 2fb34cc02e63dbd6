//! Who may do what: the authorization matrix (every route × every kind of caller),
//! tenancy, the protected mode at start-up, per-key limits and bucket grants. Runs on both
//! stacks.

use std::time::Duration;

use fileflow::auth::{AuthMode, KeyLimits};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Origin, TestApp, spawn_app_with, stack_settings, start_api_only};

/// An app that asks every request for a key.
async fn protected() -> TestApp {
    let app = spawn_app_with(|s| s.auth.mode = AuthMode::Required).await;
    app.ensure_bucket().await;
    app
}

fn upload(origin: &Origin, bucket: &str, key: &str) -> Value {
    json!({ "file_url": origin.url("/file/1000"), "bucket_name": bucket, "object_name": key })
}

/// Submit as `key` and wait for the job to finish (as seen by `key`).
async fn finished_as(app: &TestApp, key: &str, body: &Value) -> Value {
    let (status, _, created) = app.call(Method::POST, "/api/v1/upload", Some(key), Some(body)).await;
    assert_eq!(status, 202, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, _, job) = app.call(Method::GET, &format!("/api/v1/uploads/{id}"), Some(key), None).await;
        if job["status"] == "completed" || job["status"] == "failed" {
            return job;
        }
        assert!(std::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn every_route_answers_each_kind_of_caller_as_the_contract_says() {
    let origin = Origin::start().await;
    let app = protected().await;
    let bucket = app.bucket.clone();
    let (_, admin) = app.create_key("admin", &[], KeyLimits::default()).await;
    let (_, owner) = app.create_key("submitter", &[&bucket], KeyLimits::default()).await;
    let (_, other) = app.create_key("submitter", &[&bucket], KeyLimits::default()).await;
    let (revoked_id, revoked) = app.create_key("submitter", &[&bucket], KeyLimits::default()).await;
    app.revoke_key(&revoked_id).await;
    let unknown = "ffk_0123456789ab_bm90LWEta2V5LXRoYXQtZXhpc3Rz";

    let done = finished_as(&app, &owner, &upload(&origin, &bucket, "owned.bin")).await;
    assert_eq!(done["status"], "completed", "{done}");
    let id = done["id"].as_str().unwrap().to_owned();
    let updated_at = done["updated_at"].clone();

    let job = format!("/api/v1/uploads/{id}");
    let link = format!("/api/v1/uploads/{id}/url");
    let retry = format!("/api/v1/uploads/{id}/retry");
    let cancel = format!("/api/v1/uploads/{id}/cancel");
    let refused_body = upload(&origin, &bucket, "refused.bin");
    let outside = upload(&origin, "another-bucket", "outside.bin");
    // (caller, key) → expected status of: create, create outside the key's buckets, get,
    // list, link, retry and cancel (a completed job: 409 for whoever may see it).
    let matrix: [(&str, Option<&str>, [u16; 7]); 7] = [
        ("no key", None, [401, 401, 401, 401, 401, 401, 401]),
        ("malformed key", Some("not-a-key"), [401, 401, 401, 401, 401, 401, 401]),
        ("unknown key", Some(unknown), [401, 401, 401, 401, 401, 401, 401]),
        ("revoked key", Some(&revoked), [401, 401, 401, 401, 401, 401, 401]),
        ("submitter, own job", Some(&owner), [202, 403, 200, 200, 200, 409, 409]),
        ("submitter, another's job", Some(&other), [202, 403, 404, 200, 404, 404, 404]),
        ("admin", Some(&admin), [202, 202, 200, 200, 200, 409, 409]),
    ];
    let mut accepted = Vec::new();
    for (who, key, expected) in matrix {
        let refused_key = format!("refused-{}.bin", who.replace([' ', ','], "-"));
        let mut body = refused_body.clone();
        body["object_name"] = json!(refused_key);
        let calls = [
            app.call(Method::POST, "/api/v1/upload", key, Some(&body)).await,
            app.call(Method::POST, "/api/v1/upload", key, Some(&outside)).await,
            app.call(Method::GET, &job, key, None).await,
            app.call(Method::GET, "/api/v1/uploads", key, None).await,
            app.call(Method::GET, &link, key, None).await,
            app.call(Method::POST, &retry, key, None).await,
            app.call(Method::POST, &cancel, key, None).await,
        ];
        let got: Vec<u16> = calls.iter().map(|(status, ..)| *status).collect();
        assert_eq!(got, expected, "{who}: {:?}", calls.iter().map(|(_, _, b)| b).collect::<Vec<_>>());
        for (status, headers, body) in &calls {
            let code = body["error"]["code"].as_str();
            match status {
                401 => {
                    assert_eq!(code, Some("unauthorized"), "{who}: {body}");
                    let challenge = headers["www-authenticate"].to_str().unwrap();
                    assert!(challenge.starts_with("Bearer"), "{who}: {challenge}");
                    assert_eq!(challenge.contains("invalid_token"), key.is_some(), "{who}: {challenge}");
                }
                403 => assert_eq!(code, Some("forbidden"), "{who}: {body}"),
                404 => {
                    assert_eq!(code, Some("not_found"), "{who}: {body}");
                    assert!(!body.to_string().contains("owned.bin"), "a 404 reveals nothing: {body}");
                }
                202 => accepted.extend(body["id"].as_str().map(str::to_owned)),
                _ => {}
            }
        }
    }

    // Nothing was written on refusal: exactly the accepted jobs exist besides the first,
    // and the refused objects were never stored.
    let (_, _, all) = app.call(Method::GET, "/api/v1/uploads?limit=100", Some(&admin), None).await;
    let mut ids: Vec<String> =
        all["uploads"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().into()).collect();
    ids.sort();
    let mut expected_ids = accepted.clone();
    expected_ids.push(id.clone());
    expected_ids.sort();
    assert_eq!(ids, expected_ids);
    assert_eq!(accepted.len(), 4, "own, another's and the admin's two");
    for who in ["no-key", "malformed-key", "unknown-key", "revoked-key"] {
        assert_eq!(app.try_read_object(&format!("refused-{who}.bin")).await, None, "{who}");
    }
    let (_, _, unchanged) = app.call(Method::GET, &job, Some(&admin), None).await;
    assert_eq!(unchanged["updated_at"], updated_at, "refused retries and cancels changed nothing");
    app.stop().await;
}

#[tokio::test]
async fn submitters_list_only_their_own_jobs_and_admins_see_all() {
    let origin = Origin::start().await;
    let app = protected().await;
    let (_, admin) = app.create_key("admin", &[], KeyLimits::default()).await;
    let (_, a) = app.create_key("submitter", &[], KeyLimits::default()).await;
    let (_, b) = app.create_key("submitter", &[], KeyLimits::default()).await;
    let mut created = std::collections::HashMap::<&str, Vec<String>>::new();
    for (who, key, n) in [("a", &a, 3), ("b", &b, 2)] {
        for i in 0..n {
            let body = upload(&origin, &app.bucket, &format!("{who}/{i}"));
            let (status, _, job) = app.call(Method::POST, "/api/v1/upload", Some(key), Some(&body)).await;
            assert_eq!(status, 202);
            created.entry(who).or_default().push(job["id"].as_str().unwrap().to_owned());
        }
    }
    let listed = |key: &str, query: &'static str| {
        let app = &app;
        let key = key.to_owned();
        async move {
            let (status, _, page) = app.call(Method::GET, &format!("/api/v1/uploads{query}"), Some(&key), None).await;
            assert_eq!(status, 200, "{page}");
            let mut ids: Vec<String> =
                page["uploads"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_owned()).collect();
            ids.sort();
            ids
        }
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(listed(&a, "").await, sorted(created["a"].clone()));
    assert_eq!(listed(&b, "").await, sorted(created["b"].clone()));
    assert_eq!(listed(&admin, "").await, sorted([created["a"].clone(), created["b"].clone()].concat()));
    // Paging stays within the key's own jobs.
    let (_, _, first) = app.call(Method::GET, "/api/v1/uploads?limit=2", Some(&a), None).await;
    let next = first["next_before"].as_str().unwrap();
    let (_, _, second) = app.call(Method::GET, &format!("/api/v1/uploads?limit=2&before={next}"), Some(&a), None).await;
    let paged: Vec<&str> = [&first, &second]
        .iter()
        .flat_map(|p| p["uploads"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()))
        .collect();
    assert_eq!(paged.len(), 3);
    assert!(paged.iter().all(|id| created["a"].iter().any(|own| own == id)), "{paged:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_key_may_write_only_inside_its_buckets_and_prefixes() {
    let origin = Origin::start().await;
    let app = protected().await;
    let grant = format!("{}/team-a/*", app.bucket);
    let (_, key) = app.create_key("submitter", &[&grant], KeyLimits::default()).await;
    for (object, status) in [("team-a/ok.bin", 202), ("team-b/no.bin", 403), ("team-a", 403), ("x.bin", 403)] {
        let body = upload(&origin, &app.bucket, object);
        let (got, _, answer) = app.call(Method::POST, "/api/v1/upload", Some(&key), Some(&body)).await;
        assert_eq!(got, status, "{object}: {answer}");
        if status == 403 {
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.contains(&format!("{object:?} into bucket")) && message.contains("team-a/*"), "{answer}");
        }
    }
    let body = upload(&origin, "other-bucket", "team-a/ok.bin");
    assert_eq!(app.call(Method::POST, "/api/v1/upload", Some(&key), Some(&body)).await.0, 403);
    app.stop().await;
}

#[tokio::test]
async fn a_key_over_its_request_rate_is_told_when_to_come_back() {
    let app = protected().await;
    let limits = KeyLimits { rate_limit: Some(3), ..Default::default() };
    let (_, key) = app.create_key("submitter", &[], limits).await;
    let (_, unlimited) = app.create_key("admin", &[], KeyLimits::default()).await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..10 {
        let (status, headers, body) = app.call(Method::GET, "/api/v1/uploads", Some(&key), None).await;
        if status == 429 {
            assert_eq!(body["error"]["code"], "rate_limited", "{body}");
            retry_after = headers.get("retry-after").map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
        }
        statuses.push(status);
    }
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 3, "a burst of the rate, then refusals: {statuses:?}");
    assert_eq!(retry_after, Some(1));
    // Another key is not slowed down by this one.
    assert_eq!(app.call(Method::GET, "/api/v1/uploads", Some(&unlimited), None).await.0, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(app.call(Method::GET, "/api/v1/uploads", Some(&key), None).await.0, 200, "the rate refills");
    app.stop().await;
}

#[tokio::test]
async fn a_key_with_its_unfinished_jobs_at_the_limit_must_wait() {
    let origin = Origin::start().await;
    // No workers: accepted jobs stay pending.
    let dir = tempfile::tempdir().unwrap();
    let mut settings = stack_settings(dir.path().to_owned()).await;
    settings.auth.mode = AuthMode::Required;
    let app = start_api_only(settings).await;
    let (_, key) = app.create_key("submitter", &[], KeyLimits { max_unfinished: Some(2), ..Default::default() }).await;
    let send_once = |body: &Value| {
        app.client.post(app.url("/api/v1/upload")).bearer_auth(&key).header("Idempotency-Key", "once").json(body).send()
    };
    let retried = upload(&origin, &app.bucket, "q-once");
    let first = send_once(&retried).await.unwrap();
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    let body = upload(&origin, &app.bucket, "q1");
    assert_eq!(app.call(Method::POST, "/api/v1/upload", Some(&key), Some(&body)).await.0, 202);

    let body = upload(&origin, &app.bucket, "q2");
    let (status, headers, answer) = app.call(Method::POST, "/api/v1/upload", Some(&key), Some(&body)).await;
    assert_eq!(status, 429, "{answer}");
    assert_eq!(answer["error"]["code"], "rate_limited");
    assert!(headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    // A retry of an accepted request (same idempotency key, same body) is still answered.
    let again = send_once(&retried).await.unwrap();
    assert_eq!((again.status().as_u16(), again.headers().get("idempotent-replayed").is_some()), (202, true));
    assert_eq!(again.json::<Value>().await.unwrap()["id"], first["id"]);
    let mut other = retried.clone();
    other["object_name"] = json!("q-other");
    assert_eq!(send_once(&other).await.unwrap().status(), 429, "not a retry: over the limit");
    let (_, _, listed) = app.call(Method::GET, "/api/v1/uploads", Some(&key), None).await;
    assert_eq!(listed["uploads"].as_array().unwrap().len(), 2, "the refused jobs were not written");
    drop(dir);
    app.stop().await;
}

/// A retry adds an unfinished job as a submit does: over the key's quota it waits too.
#[tokio::test]
async fn a_retry_counts_against_the_unfinished_quota() {
    let origin = Origin::start().await;
    let app = protected().await;
    let (_, key) = app.create_key("submitter", &[], KeyLimits { max_unfinished: Some(1), ..Default::default() }).await;
    let failing = json!({ "file_url": origin.url("/status/404"), "bucket_name": app.bucket, "object_name": "gone" });
    let failed = finished_as(&app, &key, &failing).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let slow = json!({ "file_url": origin.url("/trickle/100?every_ms=200"), "bucket_name": app.bucket, "object_name": "slow" });
    let (status, _, busy) = app.call(Method::POST, "/api/v1/upload", Some(&key), Some(&slow)).await;
    assert_eq!(status, 202, "{busy}");
    let retry = format!("/api/v1/uploads/{}/retry", failed["id"].as_str().unwrap());
    let (status, headers, answer) = app.call(Method::POST, &retry, Some(&key), None).await;
    assert_eq!(status, 429, "one unfinished job already: {answer}");
    assert!(headers.contains_key("retry-after"));
    let (_, _, still) =
        app.call(Method::GET, &format!("/api/v1/uploads/{}", failed["id"].as_str().unwrap()), Some(&key), None).await;
    assert_eq!(still["status"], "failed", "a refused retry changes nothing: {still}");
    let cancel = format!("/api/v1/uploads/{}/cancel", busy["id"].as_str().unwrap());
    assert_eq!(app.call(Method::POST, &cancel, Some(&key), None).await.0, 202);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let busy_path = format!("/api/v1/uploads/{}", busy["id"].as_str().unwrap());
    while app.call(Method::GET, &busy_path, Some(&key), None).await.2["status"] != "cancelled" {
        assert!(std::time::Instant::now() < deadline, "the cancel did not end the job");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(app.call(Method::POST, &retry, Some(&key), None).await.0, 202, "under the quota again");
    app.stop().await;
}

#[tokio::test]
async fn a_key_with_a_smaller_file_limit_fails_larger_files() {
    let origin = Origin::start().await;
    let app = protected().await;
    let (_, key) =
        app.create_key("submitter", &[], KeyLimits { max_file_size: Some(2048), ..Default::default() }).await;
    let mut body = upload(&origin, &app.bucket, "small");
    body["file_url"] = json!(origin.url("/file/2048"));
    assert_eq!(finished_as(&app, &key, &body).await["status"], "completed");
    body["file_url"] = json!(origin.url("/file/2049"));
    body["object_name"] = json!("large");
    let job = finished_as(&app, &key, &body).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["last_error"].as_str().unwrap().contains("too large"), "{job}");
    assert_eq!(app.try_read_object("large").await, None);
    app.stop().await;
}

/// Only admin keys make fileflow create a missing bucket (S3 with --create-buckets).
#[tokio::test]
async fn only_admin_keys_make_fileflow_create_buckets() {
    if !crate::helpers::store_links() {
        return; // the disk store's buckets are directories; cloud stores are where buckets are created
    }
    let origin = Origin::start().await;
    let app = protected().await;
    let (_, admin) = app.create_key("admin", &[], KeyLimits::default()).await;
    let (_, submitter) = app.create_key("submitter", &[], KeyLimits::default()).await;
    let fresh = |name: &str| format!("{}-{name}", app.bucket);
    let job = finished_as(&app, &submitter, &upload(&origin, &fresh("s"), "x")).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["last_error"].as_str().unwrap().contains("bucket does not exist"), "{job}");
    let job = finished_as(&app, &admin, &upload(&origin, &fresh("a"), "x")).await;
    assert_eq!(job["status"], "completed", "{job}");
    app.stop().await;
}

#[tokio::test]
async fn the_api_is_open_on_loopback_until_a_key_exists() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|_| {}).await;
    let body = upload(&origin, &app.bucket, "open.bin");
    assert_eq!(app.call(Method::POST, "/api/v1/upload", None, Some(&body)).await.0, 202, "the seed's curl works");
    let (_, key) = app.create_key("admin", &[], KeyLimits::default()).await;
    // The running API notices the key within about a second, and closes.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, ..) = app.call(Method::GET, "/api/v1/uploads", None, None).await;
        if status == 401 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still open after a key was created");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _, listed) = app.call(Method::GET, "/api/v1/uploads", Some(&key), None).await;
    assert_eq!(status, 200);
    assert_eq!(listed["uploads"][0]["object_name"], "open.bin", "admins see jobs from the open days");
    // Health stays open.
    assert_eq!(app.call(Method::GET, "/healthz", None, None).await.0, 200);
    app.stop().await;
}

#[tokio::test]
async fn a_public_listener_without_keys_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = stack_settings(dir.path().to_owned()).await;
    settings.server.listen = "0.0.0.0:0".parse().unwrap();
    let refused = fileflow::startup::Application::build(settings.clone(), fileflow::config::Command::Serve).await;
    let message = format!("{:#}", refused.err().expect("refuses to start"));
    assert!(message.contains("not a loopback address") && message.contains("fileflow keys create"), "{message}");

    // Explicitly open: starts (and says so in its log).
    let mut open = settings.clone();
    open.auth.mode = AuthMode::Off;
    let app = crate::helpers::start(open, None).await;
    assert_eq!(app.call(Method::GET, "/api/v1/uploads", None, None).await.0, 200);
    app.stop().await;

    // Once a key exists: starts, and asks for it.
    let create = fileflow::config::KeysCommand::Create {
        name: "ops".into(),
        role: fileflow::auth::Role::Admin,
        buckets: Vec::new(),
        rate_limit: None,
        max_unfinished: None,
        file_size_limit: None,
        weight: None,
        notify_url: None,
        output: fileflow::config::OutputFormat::Json,
    };
    let mut out = Vec::new();
    fileflow::cli::keys::run(&settings.data, create, &mut out).await.unwrap();
    let key: Value = serde_json::from_slice(&out).unwrap();
    let app = crate::helpers::start(settings.clone(), None).await;
    assert_eq!(app.call(Method::GET, "/api/v1/uploads", None, None).await.0, 401);
    assert_eq!(app.call(Method::GET, "/api/v1/uploads", key["key"].as_str(), None).await.0, 200);
    app.stop().await;

    // `--auth off` stays off although keys exist (also past the open API's look for keys).
    let mut off = settings.clone();
    off.auth.mode = AuthMode::Off;
    let app = crate::helpers::start(off, None).await;
    assert_eq!(app.call(Method::GET, "/api/v1/uploads", None, None).await.0, 200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(app.call(Method::GET, "/api/v1/uploads", None, None).await.0, 200, "off means off");
    app.stop().await;
    drop(dir);
}
