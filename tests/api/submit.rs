//! Submitting jobs: the seed's contract, validation, and reading jobs back.

use serde_json::{Value, json};

use crate::helpers::{Origin, spawn_app};

#[tokio::test]
async fn upload_answers_202_with_the_seeds_body_and_a_location() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let response = app
        .post_upload(&json!({
            "file_url": origin.url("/file/43410"),
            "bucket_name": "file-bucket",
            "object_name": "kitty2.jpg"
        }))
        .await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    let id = body["id"].as_str().unwrap();
    assert_eq!(body, json!({ "id": id, "message": "file upload initiated successfully" }));
    assert_eq!(location, format!("/api/v1/uploads/{id}"));

    let (status, job) = app.get(&location).await;
    assert_eq!(status, 200);
    assert_eq!(job["id"], id);
    assert_eq!(job["file_url"], origin.url("/file/43410"));
    assert_eq!(job["bucket_name"], "file-bucket");
    assert_eq!(job["object_name"], "kitty2.jpg");
    assert!(["pending", "processing", "completed"].contains(&job["status"].as_str().unwrap()));
    assert!(job["created_at"].as_str().unwrap().ends_with('Z'));
    app.stop().await;
}

/// Every refused request: its status, error code and (for 422) the field named.
#[tokio::test]
async fn bad_requests_get_clear_errors_and_write_nothing() {
    let app = spawn_app().await;
    let ok_url = "http://127.0.0.1:9/file.bin";
    // The test's own bucket: on S3, the "nothing was written" check below lists it.
    let valid = json!({ "file_url": ok_url, "bucket_name": app.bucket, "object_name": "a.bin" });
    let with = |field: &str, value: Value| {
        let mut body = valid.clone();
        body[field] = value;
        body
    };
    let without = |field: &str| {
        let mut body = valid.clone();
        body.as_object_mut().unwrap().remove(field);
        body
    };
    let cases: Vec<(&str, Value, u16, &str, Option<&str>)> = vec![
        ("missing file_url", without("file_url"), 422, "invalid_field", Some("file_url")),
        ("missing bucket", without("bucket_name"), 422, "invalid_field", Some("bucket_name")),
        ("missing key", without("object_name"), 422, "invalid_field", Some("object_name")),
        ("number url", with("file_url", json!(42)), 422, "invalid_field", Some("file_url")),
        ("relative url", with("file_url", json!("photo.jpg")), 422, "invalid_field", Some("file_url")),
        ("ftp url", with("file_url", json!("ftp://example.com/a")), 422, "invalid_field", Some("file_url")),
        ("file url", with("file_url", json!("file:///etc/passwd")), 422, "invalid_field", Some("file_url")),
        ("seed's local url", with("file_url", json!("local://sonny.jpg")), 422, "invalid_field", Some("file_url")),
        ("credentials", with("file_url", json!("http://u:p@example.com/a")), 422, "invalid_field", Some("file_url")),
        (
            "url too long",
            with("file_url", json!(format!("https://example.com/{}", "a".repeat(2100)))),
            422,
            "invalid_field",
            Some("file_url"),
        ),
        (
            "seed's underscore bucket",
            with("bucket_name", json!("file_bucket")),
            422,
            "invalid_field",
            Some("bucket_name"),
        ),
        ("uppercase bucket", with("bucket_name", json!("Bucket")), 422, "invalid_field", Some("bucket_name")),
        ("ip bucket", with("bucket_name", json!("10.0.0.1")), 422, "invalid_field", Some("bucket_name")),
        ("short bucket", with("bucket_name", json!("ab")), 422, "invalid_field", Some("bucket_name")),
        ("escaping key", with("object_name", json!("../../etc/passwd")), 422, "invalid_field", Some("object_name")),
        ("absolute key", with("object_name", json!("/etc/passwd")), 422, "invalid_field", Some("object_name")),
        ("backslash key", with("object_name", json!("..\\x")), 422, "invalid_field", Some("object_name")),
        ("empty key", with("object_name", json!("")), 422, "invalid_field", Some("object_name")),
        ("control key", with("object_name", json!("a\u{7}b")), 422, "invalid_field", Some("object_name")),
        ("long key", with("object_name", json!("k".repeat(1025))), 422, "invalid_field", Some("object_name")),
        ("bad sha256", with("sha256", json!("abc")), 422, "invalid_field", Some("sha256")),
        ("bad md5", with("md5", json!("zz".repeat(16))), 422, "invalid_field", Some("md5")),
        ("array body", json!([valid.clone()]), 400, "malformed_json", None),
    ];
    for (name, body, status, code, field) in cases {
        let response = app.post_upload(&body).await;
        assert_eq!(response.status().as_u16(), status, "{name}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], code, "{name}: {error}");
        assert!(error["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}");
        if let Some(field) = field {
            assert_eq!(error["error"]["field"], field, "{name}: {error}");
        }
    }

    let raw = |content_type: &'static str, body: String| {
        app.client.post(app.url("/api/v1/upload")).header("content-type", content_type).body(body).send()
    };
    let broken = raw("application/json", "{\"file_url\": ".into()).await.unwrap();
    assert_eq!(broken.status(), 400);
    assert_eq!(broken.json::<Value>().await.unwrap()["error"]["code"], "malformed_json");
    let wrong_type = raw("text/plain", valid.to_string()).await.unwrap();
    assert_eq!(wrong_type.status(), 415);
    assert_eq!(wrong_type.json::<Value>().await.unwrap()["error"]["code"], "unsupported_media_type");
    let huge = raw("application/json", format!("{{\"pad\": \"{}\"}}", "x".repeat(200_000))).await.unwrap();
    assert_eq!(huge.status(), 413);
    assert_eq!(huge.json::<Value>().await.unwrap()["error"]["code"], "payload_too_large");

    // Nothing was written: no job, no object.
    let (_, list) = app.get("/api/v1/uploads").await;
    assert_eq!(list["uploads"], json!([]));
    assert!(app.stored_objects().await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn private_destinations_are_refused_at_submit_unless_allowed() {
    let app = crate::helpers::spawn_app_with(|s| s.fetch.allow_private = false).await;
    for url in [
        "http://127.0.0.1:8000/x",
        "http://2130706433/x",
        "http://[::1]/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.8/x",
        "http://localhost/x",
        "http://metadata.google.internal/x",
    ] {
        let response =
            app.post_upload(&json!({ "file_url": url, "bucket_name": "file-bucket", "object_name": "x" })).await;
        assert_eq!(response.status(), 422, "{url}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["field"], "file_url", "{url}");
        assert!(error["error"]["message"].as_str().unwrap().contains("refused"), "{url}: {error}");
    }
    let (_, list) = app.get("/api/v1/uploads").await;
    assert_eq!(list["uploads"], json!([]));
    app.stop().await;
}

#[tokio::test]
async fn unknown_ids_are_404_in_the_error_shape() {
    let app = spawn_app().await;
    for path in ["/api/v1/uploads/999", "/api/v1/uploads/abc", "/api/v1/uploads/999/url"] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["error"]["code"], "not_found", "{path}");
    }
    let response = app.client.post(app.url("/api/v1/uploads/999/retry")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn the_list_is_newest_first_filtered_and_paginated() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.submit(&origin.url("/file/100"), &app.bucket, &format!("f{i}")).await);
    }
    let missing = app.submit(&origin.url("/status/404"), &app.bucket, "missing").await;
    for id in &ids {
        app.finished(id).await;
    }
    app.finished(&missing).await;

    let (status, all) = app.get("/api/v1/uploads").await;
    assert_eq!(status, 200);
    let listed: Vec<&str> = all["uploads"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).chain([missing.as_str()]).collect();
    expected.reverse();
    assert_eq!(listed, expected);
    assert_eq!(all["next_before"], Value::Null);

    let (_, failed) = app.get("/api/v1/uploads?status=failed").await;
    let failed = failed["uploads"].as_array().unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["id"], missing.as_str());

    let (_, page1) = app.get("/api/v1/uploads?status=completed&limit=2").await;
    let ids1: Vec<&str> = page1["uploads"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids1, [ids[4].as_str(), ids[3].as_str()]);
    let cursor = page1["next_before"].as_str().unwrap();
    let (_, page2) = app.get(&format!("/api/v1/uploads?status=completed&limit=2&before={cursor}")).await;
    let ids2: Vec<&str> = page2["uploads"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids2, [ids[2].as_str(), ids[1].as_str()]);

    for (query, field) in [
        ("status=done", "status"),
        ("limit=0", "limit"),
        ("limit=5000", "limit"),
        ("limit=x", "limit"),
        ("before=x", "before"),
    ] {
        let (status, body) = app.get(&format!("/api/v1/uploads?{query}")).await;
        assert_eq!(status, 422, "{query}");
        assert_eq!(body["error"]["field"], field, "{query}");
    }
    app.stop().await;
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let app = spawn_app().await;
    let (status, body) = app.get("/healthz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = app.get("/readyz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")));
    app.stop().await;
}

/// A client that opens connections and never finishes its headers (slowloris) holds them
/// for the header timeout only; the API keeps answering others meanwhile.
#[tokio::test]
async fn slow_clients_cannot_hold_the_api() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = crate::helpers::spawn_app_with(|s| {
        s.server.header_timeout = std::time::Duration::from_millis(500);
        s.server.request_timeout = std::time::Duration::from_millis(700);
        s.server.max_connections = 8;
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut slow = Vec::new();
    for _ in 0..8 {
        let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
        socket.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ").await.unwrap();
        slow.push(socket);
    }
    let idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // Headers complete, body promised and never sent: answered 408 after the request timeout.
    let mut silent_body = tokio::net::TcpStream::connect(&addr).await.unwrap();
    silent_body
        .write_all(b"POST /api/v1/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, 200);
    assert!(started.elapsed() < std::time::Duration::from_secs(3), "answered after {:?}", started.elapsed());
    // Every slow connection, and the idle one, was closed by the server.
    let mut answer = [0u8; 64];
    let read = tokio::time::timeout(std::time::Duration::from_secs(3), silent_body.read(&mut answer)).await;
    let n = read.expect("a request whose body never comes is answered in time").unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&answer[..n])
    );
    for mut socket in slow.into_iter().chain([idle]) {
        let mut buf = [0u8; 1024];
        let read = tokio::time::timeout(std::time::Duration::from_secs(3), socket.read(&mut buf)).await;
        // The read ends in time: the server hung up (end of stream or a reset), or first
        // answered 408.
        if let Ok(n) = read.expect("the server closed the connection in time") {
            let answer = String::from_utf8_lossy(&buf[..n]);
            assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
        }
    }
    app.stop().await;
}

/// A client that retries after losing the answer gets its original job back, never a
/// second one, also when the retries race; another body under the same key is refused.
#[tokio::test]
async fn an_idempotency_key_gives_the_original_job_back() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let body = json!({ "file_url": origin.url("/file/100"), "bucket_name": app.bucket, "object_name": "once.bin" });
    let send = |key: &'static str, body: Value| {
        let request = app.client.post(app.url("/api/v1/upload")).header("Idempotency-Key", key).json(&body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let replayed = response.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap().to_owned());
            (status, replayed, response.json::<Value>().await.unwrap())
        }
    };
    let (status, replayed, first) = send("order-1", body.clone()).await;
    assert_eq!((status, replayed), (202, None), "{first}");
    // The same request again, with its fields in another order: the same job.
    let mut reordered = serde_json::Map::new();
    for field in ["object_name", "bucket_name", "file_url"] {
        reordered.insert(field.into(), body[field].clone());
    }
    let (status, replayed, again) = send("order-1", Value::Object(reordered)).await;
    assert_eq!((status, replayed.as_deref()), (202, Some("true")));
    assert_eq!(again["id"], first["id"]);
    // Another body under the same key.
    let mut other = body.clone();
    other["object_name"] = json!("other.bin");
    let (status, _, refused) = send("order-1", other).await;
    assert_eq!((status, refused["error"]["field"].as_str()), (422, Some("Idempotency-Key")), "{refused}");

    // Ten retries racing under a fresh key: one job between them.
    let mut racing = body.clone();
    racing["object_name"] = json!("raced.bin");
    let answers = futures::future::join_all((0..10).map(|_| send("order-2", racing.clone()))).await;
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|(status, _, b)| {
            assert_eq!(*status, 202, "{b}");
            b["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert_eq!(answers.iter().filter(|(_, replayed, _)| replayed.is_none()).count(), 1, "one created, nine replayed");

    let (_, listed) = app.get("/api/v1/uploads?limit=100").await;
    assert_eq!(listed["uploads"].as_array().unwrap().len(), 2, "one job per key: {listed}");
    let (status, _, bad) = send("bad key with spaces", body.clone()).await;
    assert_eq!((status, bad["error"]["field"].as_str()), (422, Some("Idempotency-Key")));
    app.stop().await;
}
