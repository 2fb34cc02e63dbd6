//! The API's description: OpenAPI 3.1 generated from the handlers' annotations and the
//! types they answer with, at `/api/v1/openapi.json`, and `/docs`, a page built into the
//! binary that renders it.

use axum::Router;
use axum::http::header::{CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::response::IntoResponse;
use axum::routing::get;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::state::AppState;
use super::{batch, batches, downloads, events, health, uploads};

#[derive(OpenApi)]
#[openapi(
    info(title = "fileflow", description = "Fetch files from URLs into object storage."),
    paths(
        uploads::create_upload,
        uploads::list_uploads,
        uploads::get_upload,
        uploads::download_url,
        uploads::retry_upload,
        uploads::cancel_upload,
        batch::create_batch,
        batches::create_batch,
        batches::upload_batch,
        batches::list_batches,
        batches::get_batch,
        batches::cancel_batch,
        batches::pause_batch,
        batches::resume_batch,
        events::job_events,
        events::all_events,
        downloads::download,
        health::healthz,
        health::readyz,
        super::metrics::metrics,
    ),
    modifiers(&BearerKeys),
    security(("api_key" = [])),
)]
struct ApiDoc;

/// API keys as bearer tokens (`Authorization: Bearer ffk_…`).
struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("ffk_<id>_<secret>").build();
        components.add_security_scheme("api_key", SecurityScheme::Http(scheme));
    }
}

/// The description as JSON.
pub fn document() -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the description serializes");
    doc["info"]["version"] = env!("CARGO_PKG_VERSION").into();
    doc
}

const DOCS: &str = include_str!("../../assets/docs.html");

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/openapi.json", get(|| async { axum::Json(document()) })).route(
        "/docs",
        get(|| async {
            let policy = "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'";
            ([(CONTENT_TYPE, "text/html; charset=utf-8"), (CONTENT_SECURITY_POLICY, policy)], DOCS).into_response()
        }),
    )
}
