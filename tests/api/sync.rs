//! `if_exists: if_changed`: a key stored from a URL is fetched again only when the origin
//! says the file changed.

use serde_json::json;

use crate::helpers::spawn_app;
use crate::origin::{Origin, content};

/// The origin names its version by a strong ETag or by a date: a second job for the same
/// URL and key asks it conditionally, completes on its 304 without a transfer (the record
/// says so) and keeps the object; once the file changes, the new version is stored; a key
/// written since from elsewhere is fetched again whatever the origin's version.
#[tokio::test]
async fn if_changed_fetches_only_what_changed() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    for validator in ["etag", "date"] {
        let name = format!("sync-{validator}");
        let url = origin.url(&format!("/resumable/{name}/3000?seed=7&validator={validator}"));
        let key = format!("synced-{validator}");
        let sync = |url: String| {
            let (app, key) = (&app, key.clone());
            async move {
                let body = json!({ "file_url": url, "bucket_name": app.bucket, "object_name": key,
                    "if_exists": "if_changed" });
                let id = app.submit_body(&body).await;
                app.finished(&id).await
            }
        };
        let version = |v: u32| content(Origin::versioned_seed(7, v), 3000);

        let first = sync(url.clone()).await;
        assert_eq!(first["status"], "completed", "{first}");
        assert_eq!(first["if_exists"], "if_changed", "{first}");
        assert!(first.get("not_modified").is_none(), "a first job transfers: {first}");
        let named = if validator == "etag" { "origin_etag" } else { "origin_last_modified" };
        assert!(first[named].is_string(), "the origin's version is recorded: {first}");
        assert!(app.read_object(&key).await == version(0));
        let sent = origin.bytes_sent(&name);
        assert_eq!(sent, 3000);

        let again = sync(url.clone()).await;
        assert_eq!(again["status"], "completed", "{again}");
        assert_eq!(again["not_modified"], true, "the origin said 304: {again}");
        assert_eq!(origin.not_modified(&name), 1);
        assert_eq!(origin.bytes_sent(&name), sent, "no body was fetched");
        for field in ["size", "sha256", "md5", "etag", named] {
            assert_eq!(again[field], first[field], "{field} is the stored object's: {again}");
        }
        assert!(again["download_url"].is_string(), "{again}");
        assert!(app.read_object(&key).await == version(0));

        // The file changes at the origin: the new version is stored.
        origin.set_version(&name, 1);
        let changed = sync(url.clone()).await;
        assert_eq!(changed["status"], "completed", "{changed}");
        assert!(changed.get("not_modified").is_none(), "{changed}");
        assert_ne!(changed[named], first[named], "{changed}");
        assert_ne!(changed["sha256"], first["sha256"], "{changed}");
        assert!(app.read_object(&key).await == version(1));
        assert_eq!(origin.bytes_sent(&name), sent + 3000);

        // Someone stores other bytes at the key: the next sync fetches again (the object
        // is no longer the one stored from this URL), though the origin's file is the same.
        let other = app.submit(&origin.url("/file/100?seed=9"), &app.bucket, &key).await;
        assert_eq!(app.finished(&other).await["status"], "completed");
        let refetched = sync(url.clone()).await;
        assert_eq!(refetched["status"], "completed", "{refetched}");
        assert!(refetched.get("not_modified").is_none(), "{refetched}");
        assert!(app.read_object(&key).await == version(1));
        assert_eq!(origin.bytes_sent(&name), sent + 6000);
        assert_eq!(origin.not_modified(&name), 1, "only the unchanged file was answered 304");
    }

    // What a job declares must hold of the stored object: a declared size it does not have
    // is fetched in full, and checked (so the job fails, as any transfer would).
    let url = origin.url("/resumable/sync-etag/3000?seed=7&validator=etag");
    let body = json!({ "file_url": url, "bucket_name": app.bucket, "object_name": "synced-etag",
        "if_exists": "if_changed", "size": 2999 });
    let id = app.submit_body(&body).await;
    let refused = app.finished(&id).await;
    assert_eq!(refused["status"], "failed", "{refused}");
    assert!(refused["last_error"].as_str().unwrap().contains("size mismatch"), "{refused}");
    assert_eq!(origin.not_modified("sync-etag"), 1, "not asked conditionally");
    // A caller's own conditional headers would make fileflow believe a 304 it did not ask for.
    let body = json!({ "file_url": url, "bucket_name": app.bucket, "object_name": "synced-etag",
        "headers": { "If-None-Match": "*" } });
    assert_eq!(app.post_upload(&body).await.status(), 422);

    // Another URL for the same key is not asked conditionally: it is fetched.
    let first = origin.url("/resumable/sync-a/2000?seed=3");
    let second = origin.url("/resumable/sync-b/2000?seed=4");
    for url in [first, second] {
        let body = json!({ "file_url": url, "bucket_name": app.bucket, "object_name": "one-key",
            "if_exists": "if_changed" });
        let id = app.submit_body(&body).await;
        let job = app.finished(&id).await;
        assert_eq!(job["status"], "completed", "{job}");
        assert!(job.get("not_modified").is_none(), "{job}");
    }
    assert!(app.read_object("one-key").await == content(Origin::versioned_seed(4, 0), 2000));
    assert_eq!(origin.not_modified("sync-a") + origin.not_modified("sync-b"), 0);
    app.stop().await;
}
