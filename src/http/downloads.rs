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

use super::error::ApiError;
use super::state::AppState;
use crate::domain::ObjectKey;
use crate::lifecycle::{JobId, JobStatus};
use crate::links::LinkError;
use crate::storage::ReadError;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/downloads/{id}", get(download))
}

/// The stored object, through a link fileflow signed (no API key: the link is the authority).
#[utoipa::path(get, path = "/api/v1/downloads/{id}", tag = "downloads", security(()),
    params(("id" = String, Path, description = "the upload's id"),
        ("expires" = i64, Query, description = "when the link ends, unix seconds"),
        ("signature" = String, Query, description = "the link's signature")),
    responses((status = 200, description = "the object's bytes", content_type = "application/octet-stream"),
        (status = 403, description = "the link is not valid, has expired, or its key was revoked", body = super::error::ErrorBody),
        (status = 404, description = "the object was replaced or is not there", body = super::error::ErrorBody),
    ))]
pub(super) async fn download(
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
    let key = query.get("key").map(String::as_str);
    let id: JobId = id.parse().map_err(|_| refused())?;
    // An unknown id answers like a bad signature: links reveal nothing about other jobs.
    let job = state.repo.get(id).await?.ok_or_else(refused)?;
    signer.verify(&job, expires, key, signature, Utc::now()).map_err(|e| ApiError::Forbidden(e.to_string()))?;
    // A link made for a key lives no longer than the key.
    if let Some(key) = key
        && !state.gate.key_valid(key).await?
    {
        return Err(ApiError::Forbidden(LinkError::Revoked.to_string()));
    }
    if job.status != JobStatus::Completed {
        return Err(ApiError::NotFound(format!("upload {} has no stored object", job.id)));
    }
    let (bucket, key) = (&job.bucket_name, &job.object_name);
    let object = match state.store.get(bucket, key).await {
        Ok(object) => object,
        Err(ReadError::NotFound) => {
            return Err(ApiError::NotFound("the stored object is gone".into()));
        }
        Err(e) => return Err(ApiError::Internal(e.into())),
    };
    // The link names the version this job stored; other bytes written there since are not
    // this job's object.
    if job.object_version.is_some() && object.version != job.object_version {
        return Err(ApiError::NotFound(format!(
            "the object upload {} stored has been replaced since; this link no longer serves it",
            job.id
        )));
    }
    let content_type = job.content_type.unwrap_or_else(|| "application/octet-stream".into());
    let disposition = disposition(&content_type, key);
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_LENGTH, object.size.to_string()),
            (header::CACHE_CONTROL, "private, no-store".to_owned()),
            // Stored bytes are whatever an origin sent: never let a browser run them as
            // part of fileflow's own site.
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
            (header::CONTENT_SECURITY_POLICY, "sandbox; default-src 'none'".to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        Body::from_stream(object.body),
    )
        .into_response())
}

/// Types a browser may show in place: they cannot carry scripts. Everything else (HTML,
/// SVG, PDF, XML, unknown) is offered as a file to save.
const SHOWN_INLINE: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "image/avif",
    "video/mp4",
    "video/webm",
    "audio/mpeg",
    "audio/ogg",
    "text/plain",
];

/// `Content-Disposition` for a stored object: `inline` only for the safe types, with the
/// key's last segment as the file name (RFC 6266, with an ASCII fallback).
fn disposition(content_type: &str, key: &ObjectKey) -> String {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let kind = if SHOWN_INLINE.contains(&essence.as_str()) { "inline" } else { "attachment" };
    let name = key.as_str().rsplit('/').next().unwrap_or("download");
    let ascii: String =
        name.chars().map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' { c } else { '_' }).collect();
    let mut encoded = String::new();
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("{kind}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_safe_types_are_shown_inline_and_names_are_escaped() {
        let key = |k| ObjectKey::parse(k).unwrap();
        assert_eq!(
            disposition("image/png", &key("a/kitty.png")),
            "inline; filename=\"kitty.png\"; filename*=UTF-8''kitty.png"
        );
        for risky in ["text/html", "image/svg+xml", "application/pdf", "application/xml", "TEXT/HTML; charset=utf-8"] {
            assert!(disposition(risky, &key("x")).starts_with("attachment;"), "{risky}");
        }
        assert_eq!(
            disposition("text/html", &key("dir/\"évil\" x.html")),
            "attachment; filename=\"__vil__x.html\"; filename*=UTF-8''%22%C3%A9vil%22%20x.html"
        );
    }
}
