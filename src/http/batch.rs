//! `POST /api/v1/uploads/batch`: many jobs in one request, as a JSON list of upload bodies
//! or as a Storage Transfer Service URL list (`TsvHttpData-1.0`). Valid items are accepted
//! in one write; each invalid one is reported in its place without holding up the rest.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use chrono::Utc;
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::error::{ErrorBody, ErrorDetail};
use super::extract::JsonObject;
use super::state::AppState;
use super::uploads::{check_unfinished_quota, parse_new_job};
use crate::auth::Caller;
use crate::domain::BucketName;
use crate::lifecycle::NewJob;
use crate::telemetry::TraceParent;

/// Most items in one batch.
pub const MAX_ITEMS: usize = 1000;
/// Largest batch body: a thousand upload bodies with room for headers and long URLs.
const MAX_BATCH_BODY: usize = 4 * 1024 * 1024;
pub(super) const TSV_HEADER: &str = "TsvHttpData-1.0";

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/uploads/batch", post(create_batch).layer(DefaultBodyLimit::max(MAX_BATCH_BODY)))
}

/// What `POST /api/v1/uploads/batch` takes as JSON.
#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
pub(super) struct BatchItems {
    /// Upload bodies, as `POST /api/v1/upload` takes them: each is checked on its own, and
    /// one that is not valid is refused in its place in the answer.
    #[schema(min_items = 1, max_items = 1000)]
    items: Vec<super::uploads::UploadRequest>,
}

/// One item's outcome: the job it became, or why it was refused.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub(super) enum BatchResult {
    Accepted { id: String },
    Refused { error: ErrorDetail },
}

/// The batch's answer: one result per item, in order.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(super) struct BatchResults {
    results: Vec<BatchResult>,
}

/// Submit up to 1,000 jobs: a JSON list of upload bodies, or a Storage Transfer Service URL
/// list (`TsvHttpData-1.0`) with `bucket_name` and `prefix`.
#[utoipa::path(post, path = "/api/v1/uploads/batch", tag = "uploads", operation_id = "create_upload_batch",
    request_body(description = "`{\"items\": [upload bodies]}`, or a TsvHttpData-1.0 URL list (at most 1,000 lines \
        after its header, blank lines aside; needs `bucket_name`); at most 4 MiB", content(
        (BatchItems = "application/json"),
        (super::fields::UrlList = "text/tab-separated-values"),
    )),
    params(("bucket_name" = Option<super::fields::BucketName>, Query, description = "the bucket of a URL list's files (required with one)"),
        ("prefix" = Option<String>, Query, description = "the keys' prefix for a URL list")),
    responses((status = 207, description = "one result per item, in order: each valid item's job, each invalid one's error", body = BatchResults),
        (status = 415, description = "neither JSON nor a URL list", body = ErrorBody),
        (status = 422, description = "an empty or too long list, a URL list without its header line or bucket_name, an invalid bucket_name; nothing written", body = ErrorBody),
        (status = 429, description = "the key's request rate or unfinished-jobs limit", body = ErrorBody),
    ))]
pub(super) async fn create_batch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(trace): Extension<TraceParent>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        _ => ApiError::MalformedJson(rejection.body_text()),
    })?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if let Some(bucket) = query.get("bucket_name") {
        BucketName::parse(bucket).map_err(|e| ApiError::invalid("bucket_name", e))?;
    }
    let items = match essence.as_str() {
        "application/json" => json_items(&body)?,
        "text/tab-separated-values" => tsv_items(&body, &query)?,
        _ => return Err(ApiError::UnsupportedMediaType),
    };
    // Parse every item; the valid ones are written together, in order.
    let parsed: Vec<Result<_, ApiError>> = items
        .into_iter()
        .map(|item| {
            let job = item.and_then(|object| parse_new_job(&JsonObject(object), &state, &caller));
            job.map(|job| NewJob { traceparent: Some(trace.header()), ..job })
        })
        .collect();
    let valid: Vec<_> = parsed.iter().filter_map(|p| p.as_ref().ok().cloned()).collect();
    check_unfinished_quota(&state, &caller, valid.len() as u64).await?;
    let mut created = state.repo.create_all(&valid, Utc::now()).await?.into_iter();
    let results: Vec<BatchResult> = parsed
        .iter()
        .map(|item| match item {
            Ok(_) => BatchResult::Accepted { id: created.next().expect("one job per valid item").id.to_string() },
            Err(error) => BatchResult::Refused { error: error.body() },
        })
        .collect();
    state.metrics.accepted.inc_by(valid.len() as u64);
    tracing::info!(accepted = valid.len(), refused = results.len() - valid.len(), "batch accepted");
    Ok((StatusCode::MULTI_STATUS, Json(BatchResults { results })).into_response())
}

type Item = Result<Map<String, Value>, ApiError>;

/// `{"items":[…]}`: each item an upload body.
fn json_items(body: &[u8]) -> Result<Vec<Item>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let Some(items) = value.get("items").and_then(Value::as_array) else {
        return Err(ApiError::invalid("items", "must be a list of upload requests"));
    };
    check_count(items.len())?;
    Ok(items
        .iter()
        .map(|item| match item {
            Value::Object(object) => Ok(object.clone()),
            _ => Err(ApiError::MalformedJson("an item must be a JSON object".into())),
        })
        .collect())
}

fn check_count(count: usize) -> Result<(), ApiError> {
    match count {
        0 => Err(ApiError::invalid("items", "the batch is empty")),
        n if n > MAX_ITEMS => Err(ApiError::invalid("items", format!("at most {MAX_ITEMS} items, got {n}"))),
        _ => Ok(()),
    }
}

/// A URL list in Google Storage Transfer Service's format: a `TsvHttpData-1.0` line, then
/// one line per file: URL, and optionally its size in bytes and its base64 MD5, separated
/// by tabs. Each file goes to `bucket_name` as `<prefix><host>/<path>`, as the transfer
/// service names them.
fn tsv_items(body: &[u8], query: &HashMap<String, String>) -> Result<Vec<Item>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| ApiError::invalid("body", "the URL list is not UTF-8"))?;
    let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
    if lines.next().map(str::trim) != Some(TSV_HEADER) {
        return Err(ApiError::invalid("body", format!("a URL list starts with a {TSV_HEADER} line")));
    }
    let bucket = query.get("bucket_name").ok_or_else(|| ApiError::invalid("bucket_name", "is required"))?;
    let prefix = query.get("prefix").map(String::as_str).unwrap_or("");
    let lines: Vec<&str> = lines.filter(|l| !l.trim().is_empty()).collect();
    check_count(lines.len())?;
    Ok(lines.into_iter().map(|line| tsv_item(line, bucket, prefix)).collect())
}

pub(super) fn tsv_item(line: &str, bucket: &str, prefix: &str) -> Item {
    let mut fields = line.split('\t');
    let url = fields.next().unwrap_or("").trim();
    let size = fields.next().map(str::trim).filter(|s| !s.is_empty());
    let md5 = fields.next().map(str::trim).filter(|s| !s.is_empty());
    if fields.next().is_some() {
        return Err(ApiError::invalid("body", "a line has at most three fields: URL, size, base64 MD5"));
    }
    let parsed = url::Url::parse(url).map_err(|e| ApiError::invalid("file_url", format!("{url:?}: {e}")))?;
    let name = format!("{prefix}{}{}", parsed.host_str().unwrap_or(""), parsed.path());
    let mut item = Map::new();
    item.insert("file_url".into(), json!(url));
    item.insert("bucket_name".into(), json!(bucket));
    item.insert("object_name".into(), json!(name));
    if let Some(size) = size {
        let size: u64 =
            size.parse().map_err(|_| ApiError::invalid("size", format!("{size:?} is not a number of bytes")))?;
        item.insert("size".into(), json!(size));
    }
    if let Some(md5) = md5 {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(md5)
            .ok()
            .filter(|raw| raw.len() == 16)
            .ok_or_else(|| ApiError::invalid("md5", format!("{md5:?} is not a base64 MD5")))?;
        item.insert("md5".into(), json!(hex::encode(raw)));
    }
    Ok(item)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_list_names_objects_as_the_transfer_service_does() {
        let list = "TsvHttpData-1.0\nhttps://example.com/data/a.csv\t1357\twA/5tXaKhHEH5yz7v4ehJw==\r\n\nhttps://cdn.example.org/b.bin\n";
        let query =
            HashMap::from([("bucket_name".to_owned(), "bucket".to_owned()), ("prefix".to_owned(), "in/".to_owned())]);
        let items = tsv_items(list.as_bytes(), &query).unwrap();
        let first = items[0].as_ref().unwrap();
        assert_eq!(first["object_name"], "in/example.com/data/a.csv");
        assert_eq!(
            (first["size"].as_u64(), first["md5"].as_str()),
            (Some(1357), Some("c00ff9b5768a847107e72cfbbf87a127"))
        );
        assert_eq!(items[1].as_ref().unwrap()["object_name"], "in/cdn.example.org/b.bin");
        assert_eq!(items.len(), 2);
        assert!(tsv_item("https://x.example/a\tnot-a-size", "b", "").is_err());
        assert!(tsv_item("https://x.example/a\t1\tnot base64", "b", "").is_err());
        assert!(tsv_items(b"https://no.header/", &query).is_err());
    }
}
