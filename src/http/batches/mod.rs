//! `/api/v1/batches`: a manifest in (by URL or a stored object; CSV, JSON Lines or a
//! `TsvHttpData-1.0` URL list), read into jobs in the background; its progress, its course
//! (cancel, pause, resume) and, when it ends, a report. See `runner.rs` for the reading
//! and `report.rs` for the report.

mod manifest;
mod report;
mod request;
mod runner;
mod view;

use std::collections::HashMap;

use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use futures::StreamExt as _;
use serde::Serialize;

use self::manifest::{Defaults, Format};
use self::request::{BatchRequest, Location, ManifestSource};
use self::view::{BatchView, view};
use super::error::{ApiError, ErrorBody};
use super::extract::{JsonObject, whole_number};
use super::state::AppState;
use super::uploads::{destination, idempotency_key};
use crate::auth::Caller;
use crate::domain::{BucketName, ObjectKey};
use crate::lifecycle::{IfExists, JobError};
use crate::metadata::{Batch, BatchCounts, BatchCreated, NewBatch, Steer};
use crate::storage::{Unfenced, WriteOptions};
use crate::telemetry::TraceParent;

pub use runner::run as run_batches;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/batches", post(create_batch).get(list_batches))
        .route("/api/v1/batches/{id}", get(get_batch))
        .route("/api/v1/batches/{id}/events", get(batch_events))
        .route("/api/v1/batches/{id}/report", get(batch_report))
        .route("/api/v1/batches/upload", post(upload_batch))
        .route("/api/v1/batches/{id}/cancel", post(cancel_batch))
        .route("/api/v1/batches/{id}/pause", post(pause_batch))
        .route("/api/v1/batches/{id}/resume", post(resume_batch))
}

/// What `POST /api/v1/batches` takes: `manifest_url` or `manifest` (not both); a field
/// given as null is absent.
#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
pub(super) struct BatchSubmission {
    /// The manifest's URL, checked as a source URL is.
    #[schema(value_type = Option<super::fields::HttpUrl>)]
    manifest_url: Option<String>,
    /// The manifest as an object in the store.
    manifest: Option<Location>,
    /// `csv`, `jsonl` or `tsv`; by default from the manifest's content type, its name's
    /// extension, or its first line.
    format: Option<Format>,
    /// The bucket of rows that name none (required for a URL list).
    #[schema(value_type = Option<super::fields::BucketName>)]
    bucket_name: Option<String>,
    /// Put in front of every object name; a row without `object_name` is named
    /// `<prefix><host>/<path>` of its URL.
    prefix: Option<String>,
    /// The default for rows that do not say.
    if_exists: Option<IfExists>,
    /// The default for rows that do not say.
    #[schema(value_type = Option<super::fields::Priority>)]
    priority: Option<u32>,
    /// The default for rows that do not say; needs the server's --webhook-secret.
    #[schema(value_type = Option<super::fields::HttpUrl>)]
    notify_url: Option<String>,
    /// Where to write the report, a CSV with one row per manifest row, when the batch ends.
    report: Option<Location>,
}

/// A page of batches, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct BatchList {
    batches: Vec<BatchView>,
    /// Pass as `before` for the next page; null on the last.
    next_before: Option<String>,
}

/// A location field (`manifest`, `report`) the caller may use: a valid bucket and name,
/// within the key's buckets.
fn location(body: &JsonObject, field: &'static str, caller: &Caller) -> Result<Option<Location>, ApiError> {
    let Some(value) = body.0.get(field).filter(|v| !v.is_null()) else { return Ok(None) };
    let location: Location = serde_json::from_value(value.clone())
        .map_err(|_| ApiError::invalid(field, "must be {\"bucket_name\", \"object_name\"}"))?;
    let (bucket, key) = location.parse().map_err(|e| ApiError::invalid(field, e))?;
    if let Caller::Key(api_key) = caller
        && !api_key.scope.allows(&bucket, &key)
    {
        return Err(ApiError::Forbidden(format!(
            "this API key may not use {:?} in bucket {:?}",
            key.as_str(),
            bucket.as_str()
        )));
    }
    Ok(Some(location))
}

/// The batch's request from the body, each field checked (rows are checked as they are read).
fn parse_request(body: &JsonObject, state: &AppState, caller: &Caller) -> Result<BatchRequest, ApiError> {
    let source = match (body.optional_str("manifest_url")?, location(body, "manifest", caller)?) {
        (Some(url), None) => ManifestSource::Url(destination(state, "manifest_url", url)?.as_str().to_owned()),
        (None, Some(l)) => ManifestSource::Stored { bucket_name: l.bucket_name, object_name: l.object_name },
        (Some(_), Some(_)) => return Err(ApiError::invalid("manifest", "give manifest_url or manifest, not both")),
        (None, None) => return Err(ApiError::invalid("manifest_url", "is required (or manifest)")),
    };
    let format = match body.optional_str("format")? {
        None => None,
        Some("csv") => Some(Format::Csv),
        Some("jsonl") => Some(Format::Jsonl),
        Some("tsv") => Some(Format::Tsv),
        Some(other) => return Err(ApiError::invalid("format", format!("{other:?} is not one of csv, jsonl, tsv"))),
    };
    let bucket_name = body.optional_str("bucket_name")?.map(str::to_owned);
    if let Some(bucket) = &bucket_name {
        BucketName::parse(bucket).map_err(|e| ApiError::invalid("bucket_name", e))?;
    }
    if format == Some(Format::Tsv) && bucket_name.is_none() {
        return Err(ApiError::invalid("bucket_name", "a URL list needs the batch's bucket_name"));
    }
    let if_exists = body.optional_str("if_exists")?.map(str::to_owned);
    if let Some(v) = &if_exists {
        v.parse::<IfExists>().map_err(|e| ApiError::invalid("if_exists", e))?;
    }
    let priority = match body.0.get("priority") {
        None | Some(serde_json::Value::Null) => None,
        Some(p) => Some(
            whole_number(p, i32::MAX as u64)
                .map(|p| p as u32)
                .ok_or_else(|| ApiError::invalid("priority", "must be a whole number from 0 to 2147483647"))?,
        ),
    };
    let notify_url = body.optional_str("notify_url")?.map(str::to_owned);
    if let Some(url) = &notify_url {
        if !state.webhooks_signed {
            return Err(ApiError::invalid(
                "notify_url",
                "webhooks need a signing secret: start fileflow with --webhook-secret",
            ));
        }
        destination(state, "notify_url", url)?;
    }
    Ok(BatchRequest {
        source,
        format,
        defaults: Defaults {
            bucket_name,
            prefix: body.optional_str("prefix")?.unwrap_or("").to_owned(),
            if_exists,
            priority,
            notify_url,
        },
        report: location(body, "report", caller)?,
        traceparent: None,
    })
}

/// Submit a manifest: its rows become jobs, read in the background.
#[utoipa::path(post, path = "/api/v1/batches", tag = "batches", request_body = BatchSubmission,
    params(("Idempotency-Key" = Option<super::fields::IdempotencyKey>, Header, description = "the same key and body answer the original batch")),
    responses(
        (status = 202, description = "accepted; the manifest is read in the background", body = BatchView,
            headers(("location" = String, description = "/api/v1/batches/{id}"),
                ("idempotent-replayed" = Option<String>, description = "`true` when this answers an earlier request with the same Idempotency-Key"))),
        (status = 403, description = "the key may not use that bucket", body = ErrorBody),
        (status = 422, description = "an invalid field (named in `field`), or an Idempotency-Key used with another body; nothing written", body = ErrorBody),
    ))]
pub(super) async fn create_batch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(trace): Extension<TraceParent>,
    headers: HeaderMap,
    body: JsonObject,
) -> Result<Response, ApiError> {
    let mut request = parse_request(&body, &state, &caller)?;
    let idempotency = idempotency_key(&headers, &caller, &body)?.map(|k| (k.key, k.request_sha256));
    request.traceparent = Some(trace.header());
    accept(&state, &caller, request, idempotency).await
}

/// Record the batch (or find the one an Idempotency-Key names) and answer 202.
async fn accept(
    state: &AppState,
    caller: &Caller,
    request: BatchRequest,
    idempotency: Option<(String, String)>,
) -> Result<Response, ApiError> {
    let stored = serde_json::to_string(&request).map_err(|e| ApiError::Internal(e.into()))?;
    let new = NewBatch { owner: caller.key_id().map(str::to_owned), request: stored, idempotency };
    let (batch, replayed) = match state.bulk.create_batch(&new, Utc::now()).await? {
        BatchCreated::New(batch) => (*batch, false),
        BatchCreated::Replayed(batch) => (*batch, true),
        BatchCreated::KeyReused => {
            return Err(ApiError::invalid("Idempotency-Key", "this key was used with a different request"));
        }
    };
    if !replayed {
        tracing::info!(batch_id = batch.id, "batch accepted");
    }
    let location = format!("/api/v1/batches/{}", batch.id);
    let mut response = (StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(view(batch))).into_response();
    if replayed {
        response.headers_mut().insert("idempotent-replayed", header::HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Send a manifest with the request and submit it: the body is stored first, at
/// `manifest_object_name` in `bucket_name` (a batch reads its manifest in the background,
/// so it must outlive the request), then read as a batch whose manifest is that object.
#[utoipa::path(post, path = "/api/v1/batches/upload", tag = "batches",
    params(
        ("bucket_name" = super::fields::BucketName, Query, description = "where the manifest is kept, the rows' default bucket, and the report's bucket"),
        ("manifest_object_name" = super::fields::ObjectName, Query, description = "the manifest's name in bucket_name"),
        ("format" = Option<Format>, Query, description = "by default from the Content-Type (text/csv, application/x-ndjson, text/tab-separated-values) or the first line"),
        ("prefix" = Option<String>, Query, description = "put in front of every object name"),
        ("if_exists" = Option<IfExists>, Query, description = "the default for rows that do not say"),
        ("priority" = Option<super::fields::Priority>, Query, description = "the default for rows that do not say"),
        ("notify_url" = Option<super::fields::HttpUrl>, Query, description = "the default for rows that do not say; needs the server's --webhook-secret"),
        ("report_object_name" = Option<super::fields::ObjectName>, Query, description = "where in bucket_name to write the report when the batch ends"),
    ),
    request_body(description = "the manifest: CSV, JSON Lines or a TsvHttpData-1.0 URL list, at most --max-file-size; any content type", content(
        (String = "text/csv"),
        (String = "application/x-ndjson"),
        (String = "text/tab-separated-values"),
        (String = "application/octet-stream"),
    )),
    responses(
        (status = 202, description = "stored and accepted; the manifest is read in the background", body = BatchView,
            headers(("location" = String, description = "/api/v1/batches/{id}"))),
        (status = 403, description = "the key may not use that bucket", body = ErrorBody),
        (status = 413, description = "the manifest is larger than --max-file-size", body = ErrorBody),
        (status = 422, description = "an invalid parameter; nothing written", body = ErrorBody),
        (status = 500, description = "the store could not keep the manifest for now; no batch", body = ErrorBody),
    ))]
pub(super) async fn upload_batch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(trace): Extension<TraceParent>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    if headers.contains_key("Idempotency-Key") {
        return Err(ApiError::invalid(
            "Idempotency-Key",
            "is not taken with an uploaded manifest: store it, then POST /api/v1/batches with `manifest`",
        ));
    }
    // The query, as the JSON body of POST /api/v1/batches would say it, checked the same way.
    let required = |name: &'static str| query.get(name).cloned().ok_or_else(|| ApiError::invalid(name, "is required"));
    let bucket = required("bucket_name")?;
    let mut fields = serde_json::Map::new();
    fields.insert("bucket_name".into(), bucket.clone().into());
    fields.insert(
        "manifest".into(),
        serde_json::json!({ "bucket_name": bucket, "object_name": required("manifest_object_name")? }),
    );
    if let Some(report) = query.get("report_object_name") {
        fields.insert("report".into(), serde_json::json!({ "bucket_name": bucket, "object_name": report }));
    }
    for name in ["format", "prefix", "if_exists", "notify_url"] {
        if let Some(value) = query.get(name) {
            fields.insert(name.into(), value.clone().into());
        }
    }
    if let Some(raw) = query.get("priority") {
        let priority = raw
            .parse::<u32>()
            .ok()
            .filter(|&p| p <= i32::MAX as u32)
            .ok_or_else(|| ApiError::invalid("priority", "must be a whole number from 0 to 2147483647"))?;
        fields.insert("priority".into(), priority.into());
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_owned();
    if !fields.contains_key("format") {
        let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        let format = match essence.as_str() {
            "text/csv" => Some("csv"),
            "application/x-ndjson" | "application/jsonl" | "application/jsonlines" => Some("jsonl"),
            "text/tab-separated-values" => Some("tsv"),
            _ => None,
        };
        if let Some(format) = format {
            fields.insert("format".into(), format.into());
        }
    }
    let mut request = parse_request(&JsonObject(fields), &state, &caller)?;
    let ManifestSource::Stored { bucket_name, object_name } = &request.source else {
        unreachable!("an uploaded manifest is a stored one")
    };
    let (bucket, key) = (
        BucketName::parse(bucket_name).map_err(|e| ApiError::invalid("bucket_name", e))?,
        ObjectKey::parse(object_name).map_err(|e| ApiError::invalid("manifest_object_name", e))?,
    );
    state.store.check_key(&bucket, &key).map_err(|e| ApiError::invalid("manifest_object_name", e))?;
    // Streamed into the store, never whole in memory, and no larger than a file the key
    // may fetch.
    let limit = match &caller {
        Caller::Key(api_key) => {
            state.gate.limits_of(api_key).max_file_size.map_or(state.max_file_size, |m| m.min(state.max_file_size))
        }
        _ => state.max_file_size,
    };
    let too_large = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let over = too_large.clone();
    let mut seen = 0u64;
    let stream = body
        .into_data_stream()
        .map(move |chunk| {
            let chunk =
                chunk.map_err(|e| JobError::permanent(format!("reading the manifest from the request: {e}")))?;
            seen += chunk.len() as u64;
            if seen > limit {
                over.store(true, std::sync::atomic::Ordering::Relaxed);
                return Err(JobError::permanent(format!("the manifest is larger than {limit} bytes")));
            }
            Ok(chunk)
        })
        .boxed();
    // The open API and admin keys may create the bucket, as for their jobs.
    let options = WriteOptions {
        content_type: &content_type,
        may_create_bucket: caller.key_id().is_none() || caller.is_admin(),
        length: None,
    };
    if let Err(e) = state.store.put(&bucket, &key, options, stream, &Unfenced).await {
        if too_large.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(ApiError::PayloadTooLarge);
        }
        if !e.is_transient() {
            return Err(ApiError::invalid(
                "bucket_name",
                format!("the manifest cannot be stored there: {}", e.message),
            ));
        }
        return Err(ApiError::Internal(anyhow::anyhow!("an uploaded manifest could not be stored: {e}")));
    }
    request.traceparent = Some(trace.header());
    // Checked before the manifest was stored, the request fails from here only when the
    // database does; the manifest then stays where the caller asked it to be kept.
    accept(&state, &caller, request, None).await
}

/// The batch `raw_id`, if the caller may see it (another key's batch is not found).
async fn find(state: &AppState, raw_id: &str, caller: &Caller) -> Result<Batch, ApiError> {
    let not_found = || ApiError::NotFound(format!("no batch with id {raw_id:?}"));
    let id: i64 = raw_id.parse().map_err(|_| not_found())?;
    let batch = state.bulk.batch(id).await?.ok_or_else(not_found)?;
    if !caller.may_see(batch.owner.as_deref()) {
        return Err(not_found());
    }
    Ok(batch)
}

/// A batch: its status, counts by job status (and invalid rows), bytes done, its report.
#[utoipa::path(get, path = "/api/v1/batches/{id}", tag = "batches",
    params(("id" = String, Path, description = "the batch's id")),
    responses((status = 200, description = "the batch", body = BatchView),
        (status = 404, description = "no such batch (or another key's)", body = ErrorBody),
    ))]
pub(super) async fn get_batch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<BatchView>, ApiError> {
    Ok(Json(view(find(&state, &id, &caller).await?)))
}

/// A batch's report, read from the store, for the key that may see the batch (the link the
/// batch's view gives once the report is written).
#[utoipa::path(get, path = "/api/v1/batches/{id}/report", tag = "batches",
    params(("id" = String, Path, description = "the batch's id")),
    responses((status = 200, description = "the report: a CSV, one row per manifest row", content_type = "text/csv"),
        (status = 404, description = "no such batch (or another key's), or its report is not written (or is gone)", body = ErrorBody),
    ))]
pub(super) async fn batch_report(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let batch = find(&state, &id, &caller).await?;
    let location = BatchRequest::from_stored(&batch.request).ok().and_then(|r| r.report);
    let (Some(location), true) = (location, batch.report_written) else {
        return Err(ApiError::NotFound(format!("batch {} has no written report", batch.id)));
    };
    // Checked when the batch was accepted.
    let (bucket, key) = location.parse().map_err(|e| ApiError::Internal(anyhow::anyhow!(e)))?;
    let report = match state.store.get(&bucket, &key).await {
        Ok(report) => report,
        Err(crate::storage::ReadError::NotFound) => return Err(ApiError::NotFound("the report is gone".into())),
        Err(e) => return Err(ApiError::Internal(e.into())),
    };
    let name = key.as_str().rsplit('/').next().unwrap_or("report.csv").replace(['"', '\\'], "_");
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (header::CONTENT_LENGTH, report.size.to_string()),
            (header::CACHE_CONTROL, "private, no-store".to_owned()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
            (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{name}\"")),
        ],
        axum::body::Body::from_stream(report.body),
    )
        .into_response())
}

/// How often a batch's event stream looks at the batch (one row, its counts kept by the
/// statements that change its jobs).
const EVENTS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A batch's progress as Server-Sent Events: the batch now, then again each second in which
/// it changed (each `data:` is the batch as `GET /api/v1/batches/{id}` shows it); ends
/// after it has ended, when the process stops, or once the caller's key is revoked.
#[utoipa::path(get, path = "/api/v1/batches/{id}/events", tag = "batches",
    params(("id" = String, Path, description = "the batch's id")),
    responses((status = 200, description = "an event stream of BatchView", content_type = "text/event-stream", body = BatchView),
        (status = 404, description = "no such batch (or another key's)", body = ErrorBody),
    ))]
pub(super) async fn batch_events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<axum::response::sse::Sse<impl futures::Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError> {
    let first = find(&state, &id, &caller).await?;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + EVENTS_EVERY, EVENTS_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let last = (first.id, moved(&first), first.ended_at.is_some());
    let rest = futures::stream::unfold((state, caller, ticks, last), |(state, caller, mut ticks, last)| async move {
        let (id, mut seen, mut ended) = last;
        loop {
            if ended {
                return None;
            }
            tokio::select! {
                () = state.changes.stopped.cancelled() => return None,
                _ = ticks.tick() => {}
            }
            if !state.gate.still_admits(&caller).await {
                return None;
            }
            let batch = state.bulk.batch(id).await.ok()??;
            ended = batch.ended_at.is_some();
            // Its counts are kept by triggers that leave `updated_at` as it is.
            if moved(&batch) != seen || ended {
                seen = moved(&batch);
                let event = batch_event(batch);
                return Some((Ok(event), (state, caller, ticks, (id, seen, ended))));
            }
        }
    });
    let stream = futures::stream::once(async move { Ok(batch_event(first)) }).chain(rest);
    Ok(axum::response::sse::Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default()))
}

/// What of a batch shows that it moved: its counts, bytes, rows, state and last steer.
fn moved(batch: &Batch) -> (BatchCounts, u64, u64, bool, chrono::DateTime<Utc>) {
    (batch.counts, batch.bytes_done, batch.total, batch.paused, batch.updated_at)
}

fn batch_event(batch: Batch) -> Event {
    Event::default().json_data(view(batch)).expect("a batch's view serializes")
}

/// Batches the key may see, newest first.
#[utoipa::path(get, path = "/api/v1/batches", tag = "batches",
    params(("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1–1000, default 50"),
        ("before" = Option<i64>, Query, description = "only batches older than this id (the next page)")),
    responses((status = 200, description = "a page", body = BatchList),
        (status = 422, description = "an invalid parameter", body = ErrorBody),
    ))]
pub(super) async fn list_batches(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<BatchList>, ApiError> {
    let limit = match query.get("limit") {
        None => 50,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::invalid("limit", "must be a whole number from 1 to 1000"))?,
    };
    let before = query
        .get("before")
        .map(|raw| raw.parse::<i64>())
        .transpose()
        .map_err(|_| ApiError::invalid("before", "must be a batch id"))?;
    let owner = if caller.is_admin() { None } else { caller.key_id() };
    let batches = state.bulk.batches(owner, before, limit).await?;
    let next_before = if batches.len() == limit as usize { batches.last().map(|b| b.id.to_string()) } else { None };
    Ok(Json(BatchList { batches: batches.into_iter().map(view).collect(), next_before }))
}

async fn steer(state: &AppState, caller: &Caller, raw_id: &str, steer: Steer) -> Result<Response, ApiError> {
    let batch = find(state, raw_id, caller).await?;
    let steered = state.bulk.steer(batch.id, steer, Utc::now()).await?;
    let Some(steered) = steered else { return Err(ApiError::NotFound(format!("no batch with id {raw_id:?}"))) };
    if !steered.changed {
        let shown = view(steered.batch).status;
        return Err(ApiError::Conflict(format!("the batch is {shown}")));
    }
    tracing::info!(batch_id = batch.id, action = ?steer, "batch steered");
    Ok((StatusCode::ACCEPTED, Json(view(steered.batch))).into_response())
}

/// Cancel a batch: its waiting jobs are cancelled, running ones asked to stop, no more rows read.
#[utoipa::path(post, path = "/api/v1/batches/{id}/cancel", tag = "batches",
    params(("id" = String, Path, description = "the batch's id")),
    responses((status = 202, description = "cancelled", body = BatchView),
        (status = 409, description = "the batch has already ended", body = ErrorBody),
        (status = 404, description = "no such batch (or another key's)", body = ErrorBody),
    ))]
pub(super) async fn cancel_batch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    steer(&state, &caller, &id, Steer::Cancel).await
}

/// Pause a batch: none of its waiting jobs is started (running ones finish), reading stops.
#[utoipa::path(post, path = "/api/v1/batches/{id}/pause", tag = "batches",
    params(("id" = String, Path, description = "the batch's id")),
    responses((status = 202, description = "paused", body = BatchView),
        (status = 409, description = "the batch is paused already, or has ended", body = ErrorBody),
        (status = 404, description = "no such batch (or another key's)", body = ErrorBody),
    ))]
pub(super) async fn pause_batch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    steer(&state, &caller, &id, Steer::Pause).await
}

/// Resume a paused batch.
#[utoipa::path(post, path = "/api/v1/batches/{id}/resume", tag = "batches",
    params(("id" = String, Path, description = "the batch's id")),
    responses((status = 202, description = "resumed", body = BatchView),
        (status = 409, description = "the batch is not paused", body = ErrorBody),
        (status = 404, description = "no such batch (or another key's)", body = ErrorBody),
    ))]
pub(super) async fn resume_batch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    steer(&state, &caller, &id, Steer::Resume).await
}
