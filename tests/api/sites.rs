//! A web page in the user's browser can reach a loopback API: requests for a host fileflow
//! is not served under get 421 (DNS rebinding), state-changing requests from another site's
//! pages get 403 and change nothing (cross-site requests), and only `--cors-origins` get
//! CORS answers.

use fileflow::auth::KeyLimits;
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app, spawn_app_with, start_api_only, test_settings};

/// A request with these extra headers; answers status, headers and JSON body.
async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    key: Option<&str>,
    body: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = app.client.request(method, app.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(body) = body {
        request = request.body(body.to_owned());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.json().await.unwrap_or(Value::Null))
}

fn port(app: &TestApp) -> u16 {
    app.base.rsplit(':').next().unwrap().parse().unwrap()
}

async fn job_count(app: &TestApp, key: Option<&str>) -> usize {
    let (status, _, listed) = app.call(Method::GET, "/api/v1/uploads", key, None).await;
    assert_eq!(status, 200, "{listed}");
    listed["uploads"].as_array().unwrap().len()
}

fn upload_body() -> String {
    json!({ "file_url": "http://127.0.0.1:9/a", "bucket_name": "file-bucket", "object_name": "a" }).to_string()
}

#[tokio::test]
async fn a_request_for_a_foreign_host_is_misdirected_on_every_route_in_every_mode() {
    let app = spawn_app().await;
    let rebound = format!("rebind.attacker.example:{}", port(&app));
    for (method, path) in [
        (Method::GET, "/api/v1/uploads"),
        (Method::GET, "/api/v1/uploads/1"),
        (Method::GET, "/metrics"),
        (Method::GET, "/"),
        (Method::GET, "/healthz"),
        (Method::GET, "/readyz"),
        (Method::GET, "/api/v1/openapi.json"),
        (Method::GET, "/api/v1/downloads/1?expires=1&signature=x"),
        (Method::GET, "/no/such/route"),
    ] {
        let (status, headers, body) = send(&app, method.clone(), path, &[("host", rebound.as_str())], None, None).await;
        assert_eq!(status, 421, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], "misdirected_request", "{method} {path}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("--allowed-hosts"), "{body}");
        assert!(headers.contains_key("x-request-id"));
    }
    // A submit for a foreign host writes nothing.
    let (status, _, body) = send(
        &app,
        Method::POST,
        "/api/v1/upload",
        &[("host", rebound.as_str()), ("content-type", "application/json")],
        None,
        Some(&upload_body()),
    )
    .await;
    assert_eq!((status, body["error"]["code"].as_str()), (421, Some("misdirected_request")), "{body}");
    assert_eq!(job_count(&app, None).await, 0);
    // Loopback names and addresses are served.
    for host in [format!("localhost:{}", port(&app)), format!("127.0.0.1:{}", port(&app)), "localhost".into()] {
        let (status, _, body) =
            send(&app, Method::GET, "/api/v1/uploads", &[("host", host.as_str())], None, None).await;
        assert_eq!(status, 200, "{host}: {body}");
    }

    // With keys, a valid key does not make a foreign host acceptable.
    let (_, admin) = app.create_key("admin", &[], KeyLimits::default()).await;
    let (status, _, body) =
        send(&app, Method::GET, "/api/v1/uploads", &[("host", rebound.as_str())], Some(&admin), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (421, Some("misdirected_request")), "{body}");
    let (status, ..) = send(&app, Method::GET, "/api/v1/uploads", &[], Some(&admin), None).await;
    assert_eq!(status, 200);
    app.stop().await;
}

#[tokio::test]
async fn allowed_hosts_and_the_public_url_host_are_served() {
    let app = spawn_app_with(|s| {
        s.server.allowed_hosts = vec!["files.internal".into(), ".corp.example".into()];
        s.server.public_url = Some("https://dl.example.com".parse().unwrap());
    })
    .await;
    for host in ["files.internal:8000", "dl.example.com", "api.corp.example", "corp.example:443"] {
        let (status, _, body) = send(&app, Method::GET, "/api/v1/uploads", &[("host", host)], None, None).await;
        assert_eq!(status, 200, "{host}: {body}");
    }
    for host in ["other.internal", "evilcorp.example", "dl.example.com.attacker.example"] {
        let (status, ..) = send(&app, Method::GET, "/api/v1/uploads", &[("host", host)], None, None).await;
        assert_eq!(status, 421, "{host}");
    }
    app.stop().await;
}

#[tokio::test]
async fn on_all_addresses_probes_by_ip_are_served_and_names_need_allowing() {
    let app = spawn_app_with(|s| {
        s.server.listen = "0.0.0.0:0".parse().unwrap();
        s.auth.mode = fileflow::auth::AuthMode::Off;
    })
    .await;
    for host in ["10.1.2.3:8000", "[fd00::7]:8000", "127.0.0.1"] {
        let (status, _, body) = send(&app, Method::GET, "/healthz", &[("host", host)], None, None).await;
        assert_eq!(status, 200, "{host}: {body}");
    }
    let (status, ..) = send(&app, Method::GET, "/healthz", &[("host", "fileflow.svc:8000")], None, None).await;
    assert_eq!(status, 421);
    app.stop().await;
}

/// An API without workers, so jobs stay pending.
async fn api_only() -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let app = start_api_only(test_settings(dir.path().to_owned())).await;
    (app, dir)
}

#[tokio::test]
async fn a_cross_site_request_is_refused_and_changes_nothing() {
    let (app, _dir) = api_only().await;
    let id = app.submit("http://127.0.0.1:9/a", "file-bucket", "a").await;
    let cancel = format!("/api/v1/uploads/{id}/cancel");
    let own = app.base.clone();
    // A form-like request browsers send without a preflight.
    for headers in [
        vec![("origin", "https://attacker.example"), ("content-type", "text/plain")],
        vec![("origin", "null")],
        vec![("origin", "http://127.0.0.1:1")],
        vec![("sec-fetch-site", "cross-site")],
        vec![("sec-fetch-site", "same-site")],
    ] {
        let (status, _, body) = send(&app, Method::POST, &cancel, &headers, None, Some("x")).await;
        assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{headers:?}: {body}");
        assert_eq!(app.job(&id).await["status"], "pending", "{headers:?}");
    }
    let foreign = [("origin", "https://attacker.example"), ("content-type", "application/json")];
    let (status, ..) = send(&app, Method::POST, "/api/v1/upload", &foreign, None, Some(&upload_body())).await;
    assert_eq!(status, 403);
    assert_eq!(job_count(&app, None).await, 1, "the refused submit wrote nothing");
    // Reads from other sites are left to the browser's same-origin policy.
    let (status, ..) = send(&app, Method::GET, "/api/v1/uploads", &foreign, None, None).await;
    assert_eq!(status, 200);

    // fileflow's own pages (the dashboard) and clients that are not browsers go through.
    let (status, _, body) = send(&app, Method::POST, &cancel, &[("origin", own.as_str())], None, None).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("cancelled")), "{body}");
    let same = [("origin", own.as_str()), ("sec-fetch-site", "same-origin"), ("content-type", "application/json")];
    let (status, _, body) = send(&app, Method::POST, "/api/v1/upload", &same, None, Some(&upload_body())).await;
    assert_eq!(status, 202, "{body}");
    let (status, ..) =
        send(&app, Method::POST, "/api/v1/upload", &[("content-type", "application/json")], None, Some(&upload_body()))
            .await;
    assert_eq!(status, 202);

    // With keys too: a key does not make another site's page welcome.
    let (_, admin) = app.create_key("admin", &[], KeyLimits::default()).await;
    let (status, ..) = send(&app, Method::POST, "/api/v1/upload", &foreign, Some(&admin), Some(&upload_body())).await;
    assert_eq!(status, 403);
    assert_eq!(job_count(&app, Some(&admin)).await, 3);
    app.stop().await;
}

#[tokio::test]
async fn cors_origins_get_preflight_answers_and_may_submit() {
    let app = spawn_app_with(|s| s.server.cors_origins = vec!["https://app.example.com".parse().unwrap()]).await;
    let preflight = |origin: &'static str| {
        app.client
            .request(Method::OPTIONS, app.url("/api/v1/upload"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization,content-type,idempotency-key")
            .send()
    };
    let answer = preflight("https://app.example.com").await.unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    let headers = answer.headers();
    assert_eq!(headers["access-control-allow-origin"], "https://app.example.com");
    let methods = headers["access-control-allow-methods"].to_str().unwrap();
    assert!(methods.contains("POST"), "{methods}");
    let allowed = headers["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("idempotency-key"), "{allowed}");
    let answer = preflight("https://attacker.example").await.unwrap();
    assert!(!answer.headers().contains_key("access-control-allow-origin"));

    let app_origin = [("origin", "https://app.example.com"), ("content-type", "application/json")];
    let (status, headers, body) =
        send(&app, Method::POST, "/api/v1/upload", &app_origin, None, Some(&upload_body())).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(headers["access-control-allow-origin"], "https://app.example.com");
    assert!(headers["access-control-expose-headers"].to_str().unwrap().to_ascii_lowercase().contains("location"));
    let other = [("origin", "https://attacker.example"), ("content-type", "application/json")];
    let (status, ..) = send(&app, Method::POST, "/api/v1/upload", &other, None, Some(&upload_body())).await;
    assert_eq!(status, 403);
    app.stop().await;
}

#[tokio::test]
async fn the_dashboard_runs_only_its_own_script_and_cannot_be_framed() {
    let app = spawn_app().await;
    for path in ["/", "/assets/dashboard.js"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let policy = response.headers()["content-security-policy"].to_str().unwrap().to_owned();
        for part in ["default-src 'self'", "object-src 'none'", "frame-ancestors 'none'"] {
            assert!(policy.contains(part), "{path}: {policy}");
        }
        assert!(!policy.contains("unsafe-inline") && !policy.contains("unsafe-eval"), "{policy}");
    }
    // Job fields are written into the page as text, never as markup.
    let script = app.client.get(app.url("/assets/dashboard.js")).send().await.unwrap().text().await.unwrap();
    assert!(!script.contains("innerHTML") && !script.contains("insertAdjacentHTML"), "the script writes markup");
    app.stop().await;
}
