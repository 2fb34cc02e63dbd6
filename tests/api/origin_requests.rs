//! What fileflow sends to origins and how it records what they send back.

use serde_json::{Value, json};

use crate::helpers::{Origin, content, spawn_app};
use crate::origin::PNG_HEAD;

#[tokio::test]
async fn bad_headers_are_refused_at_submit() {
    let app = spawn_app().await;
    for headers in [
        json!({ "Host": "example.com" }),
        json!({ "Content-Length": "3" }),
        json!({ "bad name": "x" }),
        json!({ "X-Line": "a\nb" }),
        json!({ "X-Number": 5 }),
        json!(["Authorization", "x"]),
        json!("Authorization: x"),
    ] {
        let body = json!({
            "file_url": "http://127.0.0.1:9/x", "bucket_name": app.bucket, "object_name": "x", "headers": headers,
        });
        let response = app.post_upload(&body).await;
        assert_eq!(response.status(), 422, "{headers}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["field"], "headers", "{headers}");
    }
    app.stop().await;
}

#[tokio::test]
async fn fileflow_names_itself_to_origins() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let id = app.submit(&origin.url("/echo-header/user-agent"), &app.bucket, "ua").await;
    assert_eq!(app.finished(&id).await["status"], "completed");
    let agent = String::from_utf8(app.read_object("ua").await).unwrap();
    assert_eq!(agent, format!("fileflow/{}", env!("CARGO_PKG_VERSION")));
    app.stop().await;
}

#[tokio::test]
async fn compressed_content_is_stored_as_served() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let id = app.submit(&origin.url("/gzip/5000"), &app.bucket, "served.gz").await;
    let job = app.finished(&id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["size"], 5000);
    assert_eq!(job["content_type"], "application/gzip");
    assert!(app.read_object("served.gz").await == content(1, 5000));
    app.stop().await;
}

#[tokio::test]
async fn a_generic_content_type_is_replaced_by_a_sniffed_one() {
    let origin = Origin::start().await;
    let app = spawn_app().await;
    let id = app.submit(&origin.url("/png"), &app.bucket, "image").await;
    let job = app.finished(&id).await;
    assert_eq!(job["content_type"], "image/png", "{job}");
    assert_eq!(app.read_object("image").await, PNG_HEAD);
    let (_, link) = app.get(&format!("/api/v1/uploads/{id}/url")).await;
    let response = app.client.get(link["url"].as_str().unwrap()).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "image/png");

    let id = app.submit(&origin.url("/file/100"), &app.bucket, "opaque").await;
    assert_eq!(app.finished(&id).await["content_type"], "application/octet-stream");
    app.stop().await;
}

/// A caller's headers (credentials for its origin) go to that origin only: not to another
/// origin a redirect points at (another host, or another port of the same host), and no
/// Referer tells the next hop where the request came from.
#[tokio::test]
async fn origin_headers_stay_with_their_origin_across_redirects() {
    let origin = Origin::start().await;
    let elsewhere = Origin::start_on("127.0.0.2").await;
    let same_host_other_port = Origin::start().await;
    let app = spawn_app().await;
    let secrets = json!({ "Authorization": "Bearer s3cr3t", "X-Api-Key": "k3y", "Cookie": "session=c00kie" });
    let via_redirect = |target: &str| {
        origin.url("/to?url=") + &url::form_urlencoded::byte_serialize(target.as_bytes()).collect::<String>()
    };
    let cases = [
        ("same-origin", via_redirect(&origin.url("/headers")), true),
        ("other-host", via_redirect(&elsewhere.url("/headers")), false),
        ("other-port", via_redirect(&same_host_other_port.url("/headers")), false),
    ];
    for (key, file_url, sent) in &cases {
        let id = app
            .submit_body(&json!({
                "file_url": file_url, "bucket_name": app.bucket, "object_name": key, "headers": secrets,
            }))
            .await;
        assert_eq!(app.finished(&id).await["status"], "completed", "{key}");
        let seen: Value = serde_json::from_slice(&app.read_object(key).await).unwrap();
        for name in ["authorization", "x-api-key", "cookie"] {
            assert_eq!(seen.get(name).is_some(), *sent, "{key}: {name} in {seen}");
        }
        assert!(seen.get("referer").is_none(), "{key}: {seen}");
    }
    app.stop().await;
}
