//! A fault-injecting proxy in front of the S3 server: a share of requests is answered
//! `503 SlowDown` without reaching the store, and another share reaches the store (the
//! write happens) but is answered `500 InternalError`, as a store that fails after the
//! fact. Requests are forwarded as signed (Host included), so SigV4 still checks out.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

/// Shares of requests that fail, in parts per thousand.
#[derive(Clone, Default)]
pub struct Faults {
    pub before_per_mille: Arc<AtomicU32>,
    pub after_per_mille: Arc<AtomicU32>,
    /// Requests failed before and after reaching the store.
    pub failed_before: Arc<AtomicU64>,
    pub failed_after: Arc<AtomicU64>,
    pub forwarded: Arc<AtomicU64>,
    /// Multipart completions still to be carried out and then answered 500 (the store
    /// completed the upload; the client hears it failed).
    pub lost_completions: Arc<AtomicU32>,
}

impl Faults {
    pub fn set(&self, before: u32, after: u32) {
        self.before_per_mille.store(before, Ordering::Relaxed);
        self.after_per_mille.store(after, Ordering::Relaxed);
    }
}

#[derive(Clone)]
struct Proxy {
    upstream: String,
    client: reqwest::Client,
    faults: Faults,
}

pub struct FaultyS3 {
    pub endpoint: String,
    pub faults: Faults,
    _server: tokio::task::JoinHandle<()>,
}

impl FaultyS3 {
    /// A proxy to `upstream` (`http://host:port`) on a free loopback port.
    pub async fn start(upstream: &str) -> Self {
        let faults = Faults::default();
        let proxy = Proxy {
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            faults: faults.clone(),
        };
        let app = axum::Router::new().fallback(forward).with_state(proxy);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { endpoint: format!("http://{addr}"), faults, _server: server }
    }
}

fn s3_error(status: StatusCode, code: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected fault</Message></Error>"
    );
    (status, [("content-type", "application/xml")], body).into_response()
}

async fn forward(State(proxy): State<Proxy>, request: Request) -> Response {
    let roll = rand::random::<u32>() % 1000;
    let before = proxy.faults.before_per_mille.load(Ordering::Relaxed);
    let after = proxy.faults.after_per_mille.load(Ordering::Relaxed);
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return s3_error(StatusCode::BAD_REQUEST, "IncompleteBody");
    };
    if roll < before {
        proxy.faults.failed_before.fetch_add(1, Ordering::Relaxed);
        return s3_error(StatusCode::SERVICE_UNAVAILABLE, "SlowDown");
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut headers = HeaderMap::new();
    for (name, value) in &parts.headers {
        // The client sets the length from the body it sends.
        if name != "connection" && name != "transfer-encoding" && name != "content-length" {
            headers.append(name, value.clone());
        }
    }
    let sent = proxy
        .client
        .request(parts.method.clone(), format!("{}{path}", proxy.upstream))
        .headers(headers)
        .body(body)
        .send()
        .await;
    let Ok(answer) = sent else { return s3_error(StatusCode::BAD_GATEWAY, "InternalError") };
    proxy.faults.forwarded.fetch_add(1, Ordering::Relaxed);
    let completion = parts.method == axum::http::Method::POST && path.contains("uploadId=");
    let lose_answer = completion
        && proxy
            .faults
            .lost_completions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
    if lose_answer || roll < before + after {
        proxy.faults.failed_after.fetch_add(1, Ordering::Relaxed);
        return s3_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
    }
    let status = answer.status();
    let mut reply = Response::builder().status(status);
    for (name, value) in answer.headers() {
        if name != "connection" && name != "transfer-encoding" {
            reply = reply.header(name, value);
        }
    }
    reply.body(Body::from_stream(answer.bytes_stream())).unwrap()
}
