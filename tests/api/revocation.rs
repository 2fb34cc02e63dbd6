//! Revoking a key reaches everything it opened: its event streams end within 2 s and the
//! download links fileflow signed for it answer 403; links made for other keys go on.
//! Every link is bounded by `--max-link-lifetime` (a store's presigned links cannot be
//! revoked).

use std::time::{Duration, Instant};

use fileflow::auth::KeyLimits;
use futures::StreamExt as _;
use reqwest::Method;

use crate::helpers::{Origin, spawn_app_with, start_api_only, store_links, test_settings};

/// Read `response`'s stream until it ends; how long that took after `since`.
async fn ended(response: reqwest::Response, since: &std::sync::Mutex<Option<Instant>>) -> Duration {
    let mut body = response.bytes_stream();
    let limit = Duration::from_secs(10);
    tokio::time::timeout(limit, async { while let Some(Ok(_)) = body.next().await {} })
        .await
        .expect("the stream ends once its key is revoked");
    since.lock().unwrap().expect("revoked before the end").elapsed()
}

#[tokio::test]
async fn a_revoked_keys_event_streams_end_within_two_seconds() {
    let dir = tempfile::tempdir().unwrap();
    // No workers: the job stays pending and its stream stays open.
    let mut settings = test_settings(dir.path().to_owned());
    settings.auth.mode = fileflow::auth::AuthMode::Required;
    let app = start_api_only(settings).await;
    let (_, admin) = app.create_key("admin", &[], KeyLimits::default()).await;
    let (revoked_id, submitter) = app.create_key("submitter", &[], KeyLimits::default()).await;
    let body =
        serde_json::json!({ "file_url": "http://127.0.0.1:9/a", "bucket_name": "file-bucket", "object_name": "a" });
    let (status, _, job) = app.call(Method::POST, "/api/v1/upload", Some(&submitter), Some(&body)).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let open = |path: String, key: String| {
        let request = app.client.get(app.url(&path)).bearer_auth(key);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            response
        }
    };
    let job_stream = open(format!("/api/v1/uploads/{id}/events"), submitter.clone()).await;
    let all_stream = open("/api/v1/events".into(), submitter.clone()).await;
    let admins_stream = open("/api/v1/events".into(), admin.clone()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let since = std::sync::Mutex::new(None);
    let (job_took, all_took, ()) = tokio::join!(ended(job_stream, &since), ended(all_stream, &since), async {
        *since.lock().unwrap() = Some(Instant::now());
        app.revoke_key(&revoked_id).await;
    });
    for took in [job_took, all_took] {
        assert!(took < Duration::from_secs(2), "a revoked key's stream ended {took:?} after the revocation");
    }
    // Another key's stream goes on.
    let mut admins = admins_stream.bytes_stream();
    let still = tokio::time::timeout(Duration::from_millis(2500), admins.next()).await;
    assert!(still.is_err(), "the admin's stream ended: {still:?}");
    println!("streams ended {job_took:?} and {all_took:?} after the revocation");
    app.stop().await;
}

#[tokio::test]
async fn links_fileflow_signs_end_with_the_key_they_were_made_for() {
    if store_links() {
        return; // A store's presigned links cannot be revoked: see the lifetime cap below.
    }
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.auth.mode = fileflow::auth::AuthMode::Required).await;
    app.ensure_bucket().await;
    let (_, admin) = app.create_key("admin", &[], KeyLimits::default()).await;
    let (submitter_id, submitter) = app.create_key("submitter", &[], KeyLimits::default()).await;
    let body = serde_json::json!({ "file_url": origin.url("/file/1000?seed=4"), "bucket_name": app.bucket, "object_name": "k.bin" });
    let (_, _, job) = app.call(Method::POST, "/api/v1/upload", Some(&submitter), Some(&body)).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    let view = loop {
        let (_, _, view) = app.call(Method::GET, &format!("/api/v1/uploads/{id}"), Some(&submitter), None).await;
        if view["status"] == "completed" || Instant::now() > deadline {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(view["status"], "completed", "{view}");
    let link_for = |key: String| {
        let app = &app;
        let id = id.clone();
        async move {
            let (status, _, link) = app.call(Method::GET, &format!("/api/v1/uploads/{id}/url"), Some(&key), None).await;
            assert_eq!(status, 200, "{link}");
            link["url"].as_str().unwrap().to_owned()
        }
    };
    let submitters_link = link_for(submitter.clone()).await;
    assert!(submitters_link.contains(&format!("key={submitter_id}")), "{submitters_link}");
    let in_view = view["download_url"].as_str().unwrap().to_owned();
    let admins_link = link_for(admin.clone()).await;
    for link in [&submitters_link, &in_view, &admins_link] {
        let response = app.client.get(link).send().await.unwrap();
        assert_eq!(response.status(), 200, "{link}");
    }
    // Moving a link to another key breaks its signature.
    let moved = submitters_link.replace(&format!("key={submitter_id}"), "key=someoneelse");
    assert_eq!(app.client.get(&moved).send().await.unwrap().status(), 403);

    app.revoke_key(&submitter_id).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    for link in [&submitters_link, &in_view] {
        let response = app.client.get(link).send().await.unwrap();
        assert_eq!(response.status(), 403, "{link}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(body["error"]["message"].as_str().unwrap().contains("revoked"), "{body}");
    }
    let response = app.client.get(&admins_link).send().await.unwrap();
    assert_eq!(response.status(), 200, "the admin's own link goes on");
    app.stop().await;
}

#[tokio::test]
async fn max_link_lifetime_bounds_every_link() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.server.max_link_lifetime = Duration::from_secs(60)).await;
    let id = app.submit(&origin.url("/file/100"), &app.bucket, "short.bin").await;
    assert_eq!(app.finished(&id).await["status"], "completed");
    let (status, _, answer) =
        app.call(Method::GET, &format!("/api/v1/uploads/{id}/url?expires_in=120"), None, None).await;
    assert_eq!((status, answer["error"]["field"].as_str()), (422, Some("expires_in")), "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("60"), "{answer}");
    let (status, _, link) = app.call(Method::GET, &format!("/api/v1/uploads/{id}/url"), None, None).await;
    assert_eq!(status, 200, "{link}");
    let expires_at = chrono::DateTime::parse_from_rfc3339(link["expires_at"].as_str().unwrap()).unwrap();
    let left = expires_at.signed_duration_since(chrono::Utc::now()).num_seconds();
    assert!((50..=61).contains(&left), "the default hour was cut to the cap: {left} s left");
    app.stop().await;
}
