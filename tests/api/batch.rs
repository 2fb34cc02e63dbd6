//! `POST /api/v1/uploads/batch`: JSON lists and Storage Transfer Service URL lists, one
//! result per item in order, valid items accepted together and invalid ones reported.

use base64::Engine;
use fileflow::auth::{AuthMode, KeyLimits};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Origin, TestApp, content, md5_hex, spawn_app, spawn_app_with};

async fn post_batch(app: &TestApp, content_type: &str, query: &str, body: Vec<u8>, key: Option<&str>) -> (u16, Value) {
    let mut request = app
        .client
        .post(app.url(&format!("/api/v1/uploads/batch{query}")))
        .header("content-type", content_type)
        .body(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn job_count(app: &TestApp) -> usize {
    let (_, listed) = app.get("/api/v1/uploads?limit=1000").await;
    listed["uploads"].as_array().unwrap().len()
}

#[tokio::test]
async fn a_json_batch_accepts_the_valid_items_and_reports_the_rest_in_order() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let item = |url: String, key: &str| json!({ "file_url": url, "bucket_name": app.bucket, "object_name": key });
    let items = json!({ "items": [
        item(origin.url("/file/1000?seed=1"), "b/one"),
        { "file_url": origin.url("/file/10"), "bucket_name": "Not_A_Bucket", "object_name": "x" },
        item(origin.url("/file/2000?seed=2"), "b/two"),
        item("ftp://example.com/x".into(), "b/ftp"),
        "not an object",
        { "file_url": origin.url("/file/3000?seed=3"), "bucket_name": app.bucket, "object_name": "b/sized", "size": 3000 },
    ]});
    let (status, answer) = post_batch(&app, "application/json", "", serde_json::to_vec(&items).unwrap(), None).await;
    assert_eq!(status, 207, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 6);
    let fields: Vec<Option<&str>> = results.iter().map(|r| r["error"]["field"].as_str()).collect();
    assert_eq!(fields, [None, Some("bucket_name"), None, Some("file_url"), None, None]);
    assert_eq!(results[4]["error"]["code"], "malformed_json");
    for (i, key, seed, size) in [(0, "b/one", 1, 1000), (2, "b/two", 2, 2000), (5, "b/sized", 3, 3000)] {
        let id = results[i]["id"].as_str().unwrap();
        assert_eq!(app.finished(id).await["status"], "completed");
        assert!(app.read_object(key).await == content(seed, size));
    }
    assert_eq!(job_count(&app).await, 3, "only the valid items were written");
    app.stop().await;
}

#[tokio::test]
async fn a_url_list_is_fetched_with_its_sizes_and_md5s_verified() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let b64 = |bytes: &[u8]| {
        let raw = hex::decode(md5_hex(bytes)).unwrap();
        base64::engine::general_purpose::STANDARD.encode(raw)
    };
    let (a, b) = (content(7, 4096), content(8, 100));
    let list = format!(
        "TsvHttpData-1.0\n{}\t4096\t{}\n{}\n{}\t99\n{}\t100\t{}\n{}\tlots\n",
        origin.url("/file/4096?seed=7"),
        b64(&a),
        origin.url("/file/100?seed=8"),
        origin.url("/file/100?seed=8&wrong-size"),
        origin.url("/file/100?seed=9"),
        b64(&b),
        origin.url("/file/1"),
    );
    let (status, answer) = post_batch(
        &app,
        "text/tab-separated-values",
        &format!("?bucket_name={}&prefix=import/", app.bucket),
        list.into_bytes(),
        None,
    )
    .await;
    assert_eq!(status, 207, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 5);
    assert_eq!(results[4]["error"]["field"], "size", "{answer}");
    let outcome = |i: usize| {
        let id = results[i]["id"].as_str().unwrap().to_owned();
        let app = &app;
        async move { app.finished(&id).await }
    };
    let first = outcome(0).await;
    assert_eq!(first["status"], "completed", "{first}");
    assert_eq!(first["object_name"], "import/127.0.0.1/file/4096");
    assert!(app.read_object("import/127.0.0.1/file/4096").await == a);
    assert_eq!(outcome(1).await["status"], "completed");
    let wrong_size = outcome(2).await;
    assert_eq!(wrong_size["status"], "failed");
    assert!(wrong_size["last_error"].as_str().unwrap().contains("size mismatch"), "{wrong_size}");
    let wrong_md5 = outcome(3).await;
    assert_eq!(wrong_md5["status"], "failed");
    assert!(wrong_md5["last_error"].as_str().unwrap().contains("checksum mismatch"), "{wrong_md5}");
    app.stop().await;
}

#[tokio::test]
async fn a_batch_refused_whole_writes_nothing() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let item = json!({ "file_url": origin.url("/file/10"), "bucket_name": app.bucket, "object_name": "x" });
    let too_many = json!({ "items": vec![item.clone(); 1001] });
    let (status, answer) = post_batch(&app, "application/json", "", serde_json::to_vec(&too_many).unwrap(), None).await;
    assert_eq!((status, answer["error"]["field"].as_str()), (422, Some("items")), "{answer}");
    let (status, _) = post_batch(&app, "application/json", "", br#"{"items":[]}"#.to_vec(), None).await;
    assert_eq!(status, 422);
    let (status, _) = post_batch(&app, "text/plain", "", b"x".to_vec(), None).await;
    assert_eq!(status, 415);
    let (status, _) = post_batch(&app, "application/json", "", b"{not json".to_vec(), None).await;
    assert_eq!(status, 400);
    let (status, answer) =
        post_batch(&app, "text/tab-separated-values", "", b"TsvHttpData-1.0\nhttp://x/\n".to_vec(), None).await;
    assert_eq!((status, answer["error"]["field"].as_str()), (422, Some("bucket_name")));
    let (status, _) =
        post_batch(&app, "text/tab-separated-values", "?bucket_name=b", b"http://x/\n".to_vec(), None).await;
    assert_eq!(status, 422, "no TsvHttpData-1.0 line");
    // A full batch of 1,000 fits in one request.
    let full = json!({ "items": (0..1000).map(|i| json!({ "file_url": origin.url("/file/10"), "bucket_name": app.bucket, "object_name": format!("many/{i}") })).collect::<Vec<_>>() });
    assert_eq!(job_count(&app).await, 0);
    let (status, answer) = post_batch(&app, "application/json", "", serde_json::to_vec(&full).unwrap(), None).await;
    assert_eq!(status, 207);
    assert_eq!(answer["results"].as_array().unwrap().iter().filter(|r| r["id"].is_string()).count(), 1000);
    app.stop().await;
}

#[tokio::test]
async fn a_key_outside_its_buckets_gets_forbidden_items() {
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.auth.mode = AuthMode::Required).await;
    app.ensure_bucket().await;
    let (_, key) = app.create_key("submitter", &[&app.bucket], KeyLimits::default()).await;
    let items = json!({ "items": [
        { "file_url": origin.url("/file/10"), "bucket_name": app.bucket, "object_name": "mine" },
        { "file_url": origin.url("/file/10"), "bucket_name": "someone-elses", "object_name": "theirs" },
    ]});
    let (status, _) = post_batch(&app, "application/json", "", serde_json::to_vec(&items).unwrap(), None).await;
    assert_eq!(status, 401);
    let (status, answer) =
        post_batch(&app, "application/json", "", serde_json::to_vec(&items).unwrap(), Some(&key)).await;
    assert_eq!(status, 207, "{answer}");
    assert!(answer["results"][0]["id"].is_string());
    assert_eq!(answer["results"][1]["error"]["code"], "forbidden");
    let (_, _, listed) = app.call(Method::GET, "/api/v1/uploads", Some(&key), None).await;
    assert_eq!(listed["uploads"].as_array().unwrap().len(), 1);
    app.stop().await;
}
