//! The HTTP API. Each area owns its router; this module merges them and adds what every
//! request gets (a body limit and one log line).

mod auth;
mod batch;
mod downloads;
mod error;
mod extract;
mod health;
mod serve;
mod uploads;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use tower_http::timeout::TimeoutLayer;

use crate::auth::Gate;
use crate::fetch::DestinationGuard;
use crate::links::{DownloadLinks, LinkSigner};
use crate::metadata::JobRepository;
use crate::secrets::HeaderSealer;
use crate::storage::ObjectStore;
use crate::webhooks::WebhookOutbox;

pub use error::ApiError;
pub use serve::{ServerLimits, serve};
pub use uploads::job_json;

/// Largest request body the API reads; an upload request is a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub repo: Arc<dyn JobRepository>,
    pub store: Arc<dyn ObjectStore>,
    pub links: Arc<dyn DownloadLinks>,
    /// Set when fileflow signs and serves download links itself.
    pub signer: Option<Arc<LinkSigner>>,
    pub guard: DestinationGuard,
    /// Who may call the API.
    pub gate: Arc<Gate>,
    /// Encrypts per-job origin headers before they reach the database.
    pub sealer: Arc<HeaderSealer>,
    /// The server's largest file; a key's own limit can only lower it.
    pub max_file_size: u64,
    /// Webhook deliveries and their tries, for the job's view.
    pub outbox: Arc<dyn WebhookOutbox>,
    /// Whether webhooks can be signed (a secret is configured): `notify_url` needs it.
    pub webhooks_signed: bool,
}

/// The API. `request_timeout` bounds reading a request (its body is read inside the
/// handler) and producing its answer; a download's body streams on after it. (A body-level
/// timeout layer was tried too: wrapping every request body cost the distributed accept
/// four fifths of its throughput at 8 clients, 4,291 → 894 jobs/s, and bought nothing.)
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    // Every /api/ route needs a caller the gate admits, except signed download links,
    // which carry their own authority.
    let keyed = uploads::router()
        .merge(batch::router())
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::authenticate));
    Router::new()
        .merge(keyed)
        .merge(downloads::router())
        .merge(health::router())
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, request_timeout))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// One structured line per request. The query string is left out: it may hold a signature.
async fn log_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let latency_us = started.elapsed().as_micros() as u64;
    tracing::info!(%method, uri = %path, status = response.status().as_u16(), latency_us, "request");
    response
}
