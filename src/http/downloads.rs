//! `GET /api/v1/downloads/{id}`: serves objects through fileflow's own signed links
//! (embedded mode, where the store is a local directory).

use std::collections::HashMap;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::Utc;

use super::{ApiError, AppState};
use crate::domain::{BucketName, ObjectKey};
use crate::lifecycle::{JobId, JobStatus};
use crate::storage::ReadError;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/downloads/{id}", get(download))
}

async fn download(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let refused = || ApiError::Forbidden("this download link is not valid".into());
    let Some(signer) = &state.signer else {
        return Err(ApiError::NotFound("this store serves downloads through its own links".into()));
    };
    let expires = query.get("expires").and_then(|e| e.parse::<i64>().ok()).ok_or_else(refused)?;
    let signature = query.get("signature").ok_or_else(refused)?;
    let id: JobId = id.parse().map_err(|_| refused())?;
    // An unknown id answers like a bad signature: links reveal nothing about other jobs.
    let job = state.repo.get(id).await?.ok_or_else(refused)?;
    signer.verify(&job, expires, signature, Utc::now()).map_err(|e| ApiError::Forbidden(e.to_string()))?;
    if job.status != JobStatus::Completed {
        return Err(ApiError::NotFound(format!("upload {} has no stored object", job.id)));
    }
    let bucket = BucketName::parse(&job.bucket_name).map_err(|e| anyhow::anyhow!("job {}: {e}", job.id))?;
    let key = ObjectKey::parse(&job.object_name).map_err(|e| anyhow::anyhow!("job {}: {e}", job.id))?;
    let object = match state.store.get(&bucket, &key).await {
        Ok(object) => object,
        Err(ReadError::NotFound) => {
            return Err(ApiError::NotFound("the stored object is gone".into()));
        }
        Err(e) => return Err(ApiError::Internal(e.into())),
    };
    let content_type = job.content_type.unwrap_or_else(|| "application/octet-stream".into());
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_LENGTH, object.size.to_string()),
            (header::CACHE_CONTROL, "private, no-store".to_owned()),
        ],
        Body::from_stream(object.body),
    )
        .into_response())
}
