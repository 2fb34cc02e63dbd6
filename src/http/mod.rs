//! The HTTP API. Each area owns its router; this module merges them and adds what every
//! request gets (a body limit and one log line).

mod downloads;
mod error;
mod extract;
mod health;
mod uploads;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::{self, Next};
use axum::response::Response;

use crate::fetch::DestinationGuard;
use crate::links::{DownloadLinks, LinkSigner};
use crate::metadata::JobRepository;
use crate::storage::ObjectStore;

pub use error::ApiError;

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
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(uploads::router())
        .merge(downloads::router())
        .merge(health::router())
        .layer(DefaultBodyLimit::max(MAX_BODY))
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
