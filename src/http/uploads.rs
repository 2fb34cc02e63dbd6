//! `/api/v1/upload` and `/api/v1/uploads…`: submit jobs and follow them.

use std::collections::HashMap;

use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::Serialize;

use super::error::ApiError;
use super::error::ErrorBody;
use super::extract::{JsonObject, whole_number};
use super::state::AppState;
use crate::auth::Caller;
use crate::domain::{BucketName, Md5Hex, ObjectKey, RequestHeaders, Sha256Hex, SourceUrl};
use crate::lifecycle::{Grant, IfExists, Job, JobId, JobStatus, NewJob};
use crate::metadata::{Cancel, Created, IdempotencyKey, ListFilter, Requeue};
use crate::telemetry::TraceParent;
use crate::wire::JobView;
use crate::wire::{DEFAULT_LINK_SECS, job_view, timestamp};
use sha2::Digest as _;

/// The longest lifetime of a download link (S3's presign limit).
const MAX_LINK_SECS: i64 = 7 * 24 * 3600;
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/upload", post(create_upload))
        .route("/api/v1/uploads", get(list_uploads))
        .route("/api/v1/uploads/{id}", get(get_upload))
        .route("/api/v1/uploads/{id}/url", get(download_url))
        .route("/api/v1/uploads/{id}/retry", post(retry_upload))
        .route("/api/v1/uploads/{id}/cancel", post(cancel_upload))
}

impl AppState {
    /// The job as `caller` sees it (its download link minted for the caller's key).
    pub(super) async fn view(&self, job: Job, caller: &Caller) -> Result<JobView, ApiError> {
        Ok(job_view(job, &*self.links, caller.key_id()).await?)
    }

    /// The job `raw_id`, if the caller may see it: another key's job is not found, so ids
    /// reveal nothing about other tenants.
    pub(super) async fn find(&self, raw_id: &str, caller: &Caller) -> Result<Job, ApiError> {
        let job = self.repo.get(parse_id(raw_id)?).await?.ok_or_else(|| not_found(raw_id))?;
        if !caller.may_see(job.grant.owner.as_deref()) {
            return Err(not_found(raw_id));
        }
        Ok(job)
    }
}

fn not_found(raw_id: &str) -> ApiError {
    ApiError::NotFound(format!("no upload with id {raw_id:?}"))
}

/// An upload id from a path; one that cannot exist is simply not found.
fn parse_id(raw_id: &str) -> Result<JobId, ApiError> {
    raw_id.parse().map_err(|_| not_found(raw_id))
}

/// A URL fileflow will connect to, from field `field`: refused names and IP-literal hosts
/// are known now (names are checked again when resolved).
pub(super) fn destination(state: &AppState, field: &'static str, raw: &str) -> Result<SourceUrl, ApiError> {
    let url = SourceUrl::parse(raw).map_err(|e| ApiError::invalid(field, e))?;
    state.guard.check_url(url.as_url()).map_err(|e| ApiError::invalid(field, e))?;
    Ok(url)
}

pub(super) fn parse_new_job(body: &JsonObject, state: &AppState, caller: &Caller) -> Result<NewJob, ApiError> {
    let source = destination(state, "file_url", body.required_str("file_url")?)?;
    let bucket =
        BucketName::parse(body.required_str("bucket_name")?).map_err(|e| ApiError::invalid("bucket_name", e))?;
    let key = ObjectKey::parse(body.required_str("object_name")?).map_err(|e| ApiError::invalid("object_name", e))?;
    // A key this store can never hold is refused now, not after a fetch.
    state.store.check_key(&bucket, &key).map_err(|e| ApiError::invalid("object_name", e))?;
    let expected_sha256 =
        body.optional_str("sha256")?.map(Sha256Hex::parse).transpose().map_err(|e| ApiError::invalid("sha256", e))?;
    let expected_md5 =
        body.optional_str("md5")?.map(Md5Hex::parse).transpose().map_err(|e| ApiError::invalid("md5", e))?;
    let key_default = match (caller, state.webhooks_signed) {
        (Caller::Key(api_key), true) => api_key.notify_url.as_deref(),
        _ => None,
    };
    let notify_url = match body.optional_str("notify_url")?.or(key_default) {
        None => None,
        Some(raw) => {
            if !state.webhooks_signed {
                return Err(ApiError::invalid(
                    "notify_url",
                    "webhooks need a signing secret: start fileflow with --webhook-secret",
                ));
            }
            Some(destination(state, "notify_url", raw)?)
        }
    };
    let if_exists = body
        .optional_str("if_exists")?
        .map(str::parse::<IfExists>)
        .transpose()
        .map_err(|e| ApiError::invalid("if_exists", e))?
        .unwrap_or_default();
    let priority = match body.0.get("priority") {
        None | Some(serde_json::Value::Null) => 0,
        Some(p) => whole_number(p, MAX_PRIORITY.into())
            .map(|p| p as u32)
            .ok_or_else(|| ApiError::invalid("priority", format!("must be a whole number from 0 to {MAX_PRIORITY}")))?,
    };
    // Sizes are kept as signed 64-bit integers.
    let expected_size = match body.0.get("size") {
        None | Some(serde_json::Value::Null) => None,
        Some(size) => Some(whole_number(size, MAX_SIZE).ok_or_else(|| {
            ApiError::invalid("size", format!("must be a whole number of bytes, at most {MAX_SIZE}"))
        })?),
    };
    let headers = match body.0.get("headers") {
        None | Some(serde_json::Value::Null) => RequestHeaders::default(),
        Some(serde_json::Value::Object(map)) => {
            let mut pairs = Vec::with_capacity(map.len());
            for (name, value) in map {
                let value = value
                    .as_str()
                    .ok_or_else(|| ApiError::invalid("headers", format!("the value of {name:?} must be a string")))?;
                pairs.push((name.as_str(), value));
            }
            RequestHeaders::parse(pairs).map_err(|e| ApiError::invalid("headers", e))?
        }
        Some(_) => return Err(ApiError::invalid("headers", "must be an object of header names to values")),
    };
    let grant = match caller {
        Caller::Open => Grant::open(),
        Caller::Key(api_key) => {
            if !api_key.scope.allows(&bucket, &key) {
                return Err(ApiError::Forbidden(format!(
                    "this API key may not write {:?} into bucket {:?} (it may write to: {})",
                    key.as_str(),
                    bucket.as_str(),
                    api_key.scope.entries().join(", ")
                )));
            }
            Grant {
                owner: Some(api_key.id.clone()),
                max_file_size: state.gate.limits_of(api_key).max_file_size.filter(|&m| m < state.max_file_size),
                may_create_bucket: api_key.is_admin(),
            }
        }
    };
    Ok(NewJob {
        source,
        bucket,
        key,
        expected_sha256,
        expected_md5,
        expected_size,
        if_exists,
        priority,
        notify_url,
        headers: state.sealer.seal(&headers),
        grant,
        // Set by the handler, from its request's trace context.
        traceparent: None,
        batch: None,
    })
}

/// The highest `priority` (S3 Batch Operations' bound: a signed 32-bit integer's).
const MAX_PRIORITY: u32 = super::fields::MAX_PRIORITY as u32;
/// The largest declared `size` (the database keeps sizes as signed 64-bit integers).
const MAX_SIZE: u64 = i64::MAX as u64;

/// How long a caller at its limit of unfinished jobs is told to wait before asking again.
const QUOTA_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Refuse a new job when the caller's key already has as many unfinished jobs as it may.
pub(super) async fn check_unfinished_quota(state: &AppState, caller: &Caller, adding: u64) -> Result<(), ApiError> {
    let Caller::Key(api_key) = caller else { return Ok(()) };
    let Some(limit) = state.gate.limits_of(api_key).max_unfinished.filter(|&n| n > 0) else { return Ok(()) };
    let unfinished = state.repo.unfinished_of(&api_key.id).await?;
    if unfinished + adding > limit {
        return Err(ApiError::RateLimited {
            message: format!("this API key has {unfinished} unfinished jobs, its limit is {limit}"),
            retry_after: QUOTA_RETRY_AFTER,
        });
    }
    Ok(())
}

/// What `POST /api/v1/upload` takes (its fields are read one by one, so each mistake
/// names its field; this type describes them). A field given as null is absent.
#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
pub(super) struct UploadRequest {
    /// The file to fetch.
    #[schema(value_type = super::fields::HttpUrl)]
    file_url: String,
    #[schema(value_type = super::fields::BucketName)]
    bucket_name: String,
    #[schema(value_type = super::fields::ObjectName)]
    object_name: String,
    /// The content's SHA-256, checked before the object is stored.
    #[schema(value_type = Option<super::fields::Sha256Hex>)]
    sha256: Option<String>,
    /// The content's MD5, checked before the object is stored.
    #[schema(value_type = Option<super::fields::Md5Hex>)]
    md5: Option<String>,
    /// The content's size in bytes, checked before the object is stored.
    #[schema(maximum = 9223372036854775807_u64)]
    size: Option<u64>,
    #[schema(value_type = Option<super::fields::OriginHeaders>)]
    headers: Option<HashMap<String, String>>,
    /// A webhook called when the job ends (Standard Webhooks); needs the server's
    /// --webhook-secret.
    #[schema(value_type = Option<super::fields::HttpUrl>)]
    notify_url: Option<String>,
    if_exists: Option<IfExists>,
    /// Among this caller's waiting jobs, higher goes first; callers take turns whatever
    /// their priorities.
    #[schema(value_type = Option<super::fields::Priority>)]
    priority: Option<u32>,
}

/// The answer to an accepted upload.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct Accepted {
    id: String,
    message: &'static str,
}

/// A page of uploads, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct UploadList {
    uploads: Vec<JobView>,
    /// Pass as `before` for the next page; null on the last.
    next_before: Option<String>,
}

/// A time-limited download link.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct DownloadLink {
    url: String,
    expires_at: String,
}

/// Submit a job: fetch `file_url` into `bucket_name` as `object_name`.
#[utoipa::path(post, path = "/api/v1/upload", tag = "uploads", request_body = UploadRequest,
    params(("Idempotency-Key" = Option<super::fields::IdempotencyKey>, Header,
        description = "the same key and body (fields in any order) answer the original job for 24 hours; another body under the key is 422")),
    responses(
        (status = 202, description = "accepted", body = Accepted, headers(
            ("location" = String, description = "/api/v1/uploads/{id}"),
            ("idempotent-replayed" = Option<String>, description = "`true` when this answers an earlier request with the same Idempotency-Key"))),
        (status = 403, description = "the key may not write there", body = ErrorBody),
        (status = 422, description = "an invalid field (named in `field`), a destination the server refuses, or an Idempotency-Key used with another body; nothing written", body = ErrorBody),
        (status = 429, description = "the key's request rate or unfinished-jobs limit", body = ErrorBody),
    ))]
pub(super) async fn create_upload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(trace): Extension<TraceParent>,
    headers: HeaderMap,
    body: JsonObject,
) -> Result<Response, ApiError> {
    let mut new_job = parse_new_job(&body, &state, &caller)?;
    new_job.traceparent = Some(trace.header());
    let once = idempotency_key(&headers, &caller, &body)?;
    if let Err(refused) = check_unfinished_quota(&state, &caller, 1).await {
        // A retry of a request that was accepted is answered, whatever the quota says now.
        let replay = match &once {
            Some(once) => state.repo.replay_of(once, Utc::now()).await?,
            None => None,
        };
        let Some(job) = replay else { return Err(refused) };
        return Ok(accepted(&job, true));
    }
    let (job, replayed) = match once {
        None => (state.repo.create(&new_job, Utc::now()).await?, false),
        Some(once) => match state.repo.create_once(&new_job, &once, Utc::now()).await? {
            Created::New(job) => (*job, false),
            Created::Replayed(job) => (*job, true),
            Created::KeyReused => {
                return Err(ApiError::invalid(
                    IDEMPOTENCY_KEY,
                    "this key was used with a different request in the last 24 hours",
                ));
            }
        },
    };
    if replayed {
        tracing::info!(job_id = %job.id, "job request replayed under its idempotency key");
    } else {
        state.metrics.accepted.inc();
        tracing::info!(job_id = %job.id, bucket = %job.bucket_name, key = %job.object_name, "job accepted");
    }
    Ok(accepted(&job, replayed))
}

/// The answer to an accepted upload: 202, its location and id (`replayed`: the original
/// answer to a retried request).
fn accepted(job: &Job, replayed: bool) -> Response {
    let location = format!("/api/v1/uploads/{}", job.id);
    let mut response = (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(Accepted { id: job.id.to_string(), message: "file upload initiated successfully" }),
    )
        .into_response();
    if replayed {
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// The request's `Idempotency-Key` (1 to 255 visible ASCII characters), scoped to the
/// caller's API key, with the digest of the body it came with.
pub(super) fn idempotency_key(
    headers: &HeaderMap,
    caller: &Caller,
    body: &JsonObject,
) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else { return Ok(None) };
    let key = value
        .to_str()
        .ok()
        .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| ApiError::invalid(IDEMPOTENCY_KEY, "must be 1 to 255 visible ASCII characters"))?;
    Ok(Some(IdempotencyKey {
        owner: caller.key_id().unwrap_or_default().to_owned(),
        key: key.to_owned(),
        request_sha256: request_digest(&serde_json::Value::Object(body.0.clone())),
    }))
}

/// SHA-256 of a JSON value written with its object keys sorted, so the same request sent
/// with its fields in another order is the same request.
pub(super) fn request_digest(value: &serde_json::Value) -> String {
    fn canonical(value: &serde_json::Value, out: &mut String) {
        match value {
            serde_json::Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push('{');
                for (i, (name, value)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::String(name.clone()).to_string());
                    out.push(':');
                    canonical(value, out);
                }
                out.push('}');
            }
            serde_json::Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    canonical(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut text = String::new();
    canonical(value, &mut text);
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// An upload, with its webhook deliveries.
#[utoipa::path(get, path = "/api/v1/uploads/{id}", tag = "uploads", params(("id" = String, Path, description = "the upload's id")),
    responses((status = 200, description = "the upload", body = JobView),
        (status = 404, description = "no such upload (or another key's)", body = ErrorBody),
    ))]
pub(super) async fn get_upload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let job = state.find(&id, &caller).await?;
    let deliveries = match job.notify_url {
        Some(_) => Some(state.outbox.deliveries_of(job.id).await?),
        None => None,
    };
    let mut view = state.view(job, &caller).await?;
    view.webhooks = deliveries;
    Ok(Json(view))
}

/// Uploads the key may see, newest first.
#[utoipa::path(get, path = "/api/v1/uploads", tag = "uploads",
    params(
        ("status" = Option<JobStatus>, Query, description = "only uploads in this status"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1–1000, default 50"),
        ("before" = Option<i64>, Query, description = "only uploads older than this id (the next page)"),
        ("batch" = Option<i64>, Query, description = "only the uploads of this batch"),
    ),
    responses((status = 200, description = "a page", body = UploadList),
        (status = 422, description = "an invalid parameter", body = ErrorBody),
    ))]
pub(super) async fn list_uploads(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<UploadList>, ApiError> {
    let status =
        query.get("status").map(|s| s.parse::<JobStatus>()).transpose().map_err(|e| ApiError::invalid("status", e))?;
    let limit = match query.get("limit") {
        None => DEFAULT_PAGE,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| ApiError::invalid("limit", format!("must be a whole number from 1 to {MAX_PAGE}")))?,
    };
    let before = query
        .get("before")
        .map(|raw| raw.parse::<JobId>())
        .transpose()
        .map_err(|_| ApiError::invalid("before", "must be an upload id"))?;
    let batch = query
        .get("batch")
        .map(|raw| raw.parse::<i64>())
        .transpose()
        .map_err(|_| ApiError::invalid("batch", "must be a batch id"))?;
    // A submitter lists its own jobs; admins (and the open API) every job.
    let owner = if caller.is_admin() { None } else { caller.key_id().map(str::to_owned) };
    let jobs = state.repo.list(&ListFilter { status, owner, batch, before, limit }).await?;
    let next = if jobs.len() == limit as usize { jobs.last().map(|j| j.id.to_string()) } else { None };
    let mut uploads = Vec::with_capacity(jobs.len());
    for job in jobs {
        uploads.push(state.view(job, &caller).await?);
    }
    Ok(Json(UploadList { uploads, next_before: next }))
}

/// A time-limited download link for a completed upload.
#[utoipa::path(get, path = "/api/v1/uploads/{id}/url", tag = "uploads",
    params(("id" = String, Path, description = "the upload's id"),
        ("expires_in" = Option<i64>, Query, minimum = 1, maximum = 604800,
            description = "seconds, default 3600, at most 604800 (or the server's --max-link-lifetime, if shorter)")),
    responses((status = 200, description = "the link", body = DownloadLink),
        (status = 409, description = "the upload has not completed", body = ErrorBody),
        (status = 404, description = "no such upload (or another key's)", body = ErrorBody),
        (status = 422, description = "expires_in out of range", body = ErrorBody),
    ))]
pub(super) async fn download_url(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<DownloadLink>, ApiError> {
    let max = max_link_secs(&state);
    let expires_in =
        match query.get("expires_in") {
            None => DEFAULT_LINK_SECS.min(max),
            Some(raw) => raw.parse::<i64>().ok().filter(|s| (1..=max).contains(s)).ok_or_else(|| {
                ApiError::invalid("expires_in", format!("must be a number of seconds from 1 to {max}"))
            })?,
        };
    let job = state.find(&id, &caller).await?;
    if job.status != JobStatus::Completed {
        return Err(ApiError::Conflict(format!("upload {} is {}, not completed", job.id, job.status)));
    }
    let expires_at = Utc::now() + chrono::Duration::seconds(expires_in);
    let url = state.links.link(&job, expires_at, caller.key_id()).await?;
    Ok(Json(DownloadLink { url: url.to_string(), expires_at: timestamp(expires_at) }))
}

/// The longest lifetime of a link this server makes, in seconds (its store's limit or
/// --max-link-lifetime, if shorter than S3's).
pub(super) fn max_link_secs(state: &AppState) -> i64 {
    state.links.max_lifetime().map_or(MAX_LINK_SECS, |m| (m.as_secs() as i64).clamp(1, MAX_LINK_SECS))
}

/// Run a failed upload again, with a fresh retry budget.
#[utoipa::path(post, path = "/api/v1/uploads/{id}/retry", tag = "uploads", params(("id" = String, Path, description = "the upload's id")),
    responses((status = 202, description = "re-queued", body = JobView),
        (status = 409, description = "the upload has not failed", body = ErrorBody),
        (status = 404, description = "no such upload (or another key's)", body = ErrorBody),
        (status = 429, description = "the key's request rate or unfinished-jobs limit", body = ErrorBody),
    ))]
pub(super) async fn retry_upload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = state.find(&id, &caller).await?;
    if job.status == JobStatus::Failed {
        // A retry adds an unfinished job, as a submit does: the same quota applies.
        check_unfinished_quota(&state, &caller, 1).await?;
    }
    let job_id = job.id;
    match state.repo.requeue_failed(job_id, Utc::now()).await? {
        Requeue::Requeued(job) => {
            tracing::info!(job_id = %job.id, "failed job re-queued");
            Ok((StatusCode::ACCEPTED, Json(state.view(*job, &caller).await?)).into_response())
        }
        Requeue::NotFailed(status) => {
            Err(ApiError::Conflict(format!("upload {} is {status}; only failed uploads can be retried", job_id)))
        }
        Requeue::NotFound => Err(not_found(&id)),
    }
}

/// Cancel a job: a waiting one is `cancelled` at once; a running one is asked to stop (it
/// shows `cancelled` once its worker has, within about a second); 409 once finished.
#[utoipa::path(post, path = "/api/v1/uploads/{id}/cancel", tag = "uploads", params(("id" = String, Path, description = "the upload's id")),
    responses((status = 202, description = "cancelled, or asked to stop", body = JobView),
        (status = 409, description = "the upload has finished", body = ErrorBody),
        (status = 404, description = "no such upload (or another key's)", body = ErrorBody),
    ))]
pub(super) async fn cancel_upload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job_id = state.find(&id, &caller).await?.id;
    match state.repo.cancel(job_id, Utc::now()).await? {
        Cancel::Cancelled(job) => {
            tracing::info!(job_id = %job.id, "job cancelled");
            Ok((StatusCode::ACCEPTED, Json(state.view(*job, &caller).await?)).into_response())
        }
        Cancel::Requested(job) => {
            tracing::info!(job_id = %job.id, "cancel requested from the job's worker");
            Ok((StatusCode::ACCEPTED, Json(state.view(*job, &caller).await?)).into_response())
        }
        Cancel::Finished(status) => {
            Err(ApiError::Conflict(format!("upload {job_id} is {status}; only unfinished uploads can be cancelled")))
        }
        Cancel::NotFound => Err(not_found(&id)),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_request_digest_ignores_field_order_only() {
        let a = json!({ "file_url": "u", "bucket_name": "b", "headers": { "x": "1", "a": "2" } });
        let b = json!({ "headers": { "a": "2", "x": "1" }, "bucket_name": "b", "file_url": "u" });
        let c = json!({ "file_url": "u", "bucket_name": "c", "headers": { "x": "1", "a": "2" } });
        assert_eq!(request_digest(&a), request_digest(&b));
        assert_ne!(request_digest(&a), request_digest(&c));
    }
}
