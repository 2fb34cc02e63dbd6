//! The web dashboard at `/`: one page, its script and its style, built into the binary
//! (nothing fetched from elsewhere, no build step). It uses the HTTP API like any client,
//! with the API key the user types in (kept in the browser's local storage).

use axum::Router;
use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::response::IntoResponse;
use axum::routing::get;

use super::state::AppState;

const PAGE: &str = include_str!("../../assets/dashboard.html");
const SCRIPT: &str = include_str!("../../assets/dashboard.js");
const STYLE: &str = include_str!("../../assets/dashboard.css");

/// Only the page's own script, style and API.
const POLICY: &str =
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { asset(PAGE, "text/html; charset=utf-8") }))
        .route("/assets/dashboard.js", get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }))
        .route("/assets/dashboard.css", get(|| async { asset(STYLE, "text/css; charset=utf-8") }))
}

fn asset(body: &'static str, content_type: &'static str) -> impl IntoResponse {
    ([(CONTENT_TYPE, content_type), (CONTENT_SECURITY_POLICY, POLICY), (CACHE_CONTROL, "no-cache")], body)
}
