//! Time-limited download links.
//!
//! The embedded mode signs links itself (HMAC-SHA256 with a key kept in the data dir) and
//! serves them from `GET /api/v1/downloads/{id}`; an S3 store presigns instead.

use std::path::Path;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use url::Url;

use crate::lifecycle::Job;

/// Makes a link through which anyone holding it can read a completed job's object until
/// `expires_at`, at the request of the API key `minted_by` (none: the open API). fileflow's
/// own links stop working when that key is revoked; a store's presigned links cannot be
/// revoked, only kept short (`--max-link-lifetime`).
#[async_trait]
pub trait DownloadLinks: Send + Sync + 'static {
    async fn link(&self, job: &Job, expires_at: DateTime<Utc>, minted_by: Option<&str>) -> anyhow::Result<Url>;

    /// The longest a link made here may last, if bounded.
    fn max_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// Links that last at most `max` (`--max-link-lifetime`), whatever is asked for: a store's
/// presigned links cannot be revoked, so their lifetime is the only bound on them.
pub struct CappedLinks {
    pub inner: std::sync::Arc<dyn DownloadLinks>,
    pub max: std::time::Duration,
}

#[async_trait]
impl DownloadLinks for CappedLinks {
    async fn link(&self, job: &Job, expires_at: DateTime<Utc>, minted_by: Option<&str>) -> anyhow::Result<Url> {
        let latest = Utc::now() + chrono::Duration::from_std(self.max).unwrap_or(chrono::Duration::MAX);
        self.inner.link(job, expires_at.min(latest), minted_by).await
    }

    fn max_lifetime(&self) -> Option<std::time::Duration> {
        Some(self.max)
    }
}

/// Why a signed link was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("this download link has expired")]
    Expired,
    #[error("this download link is not valid")]
    BadSignature,
    #[error("the API key this download link was made for has been revoked")]
    Revoked,
}

const KEY_FILE: &str = "signing.key";

/// Signs and checks fileflow's own download links.
#[derive(Clone)]
pub struct LinkSigner {
    key: Vec<u8>,
    /// Where fileflow is reachable by the link's users, e.g. `http://127.0.0.1:8000`.
    base: Url,
}

impl std::fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSigner").field("base", &self.base).finish_non_exhaustive()
    }
}

impl LinkSigner {
    pub fn new(key: Vec<u8>, base: Url) -> Self {
        Self { key, base }
    }

    /// Load the key from `<data_dir>/signing.key`, generating it on first start. Links keep
    /// working across restarts because the key does.
    pub fn load_or_create(data_dir: &Path, base: Url) -> anyhow::Result<Self> {
        Ok(Self::new(crate::secrets::load_or_create_key(&data_dir.join(KEY_FILE))?, base))
    }

    fn signature(&self, job: &Job, expires: i64, key: Option<&str>) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        // Bound to the object and its version, not only the job id, so a link never reads
        // another object, nor the same key after something else was written there.
        let version = job.object_version.as_deref().unwrap_or("");
        mac.update(format!("{}\n{}\n{}\n{version}\n{expires}", job.id, job.bucket_name, job.object_name).as_bytes());
        // Links of the open API (no key) sign exactly as before keys were recorded.
        if let Some(key) = key {
            mac.update(format!("\n{key}").as_bytes());
        }
        mac
    }

    /// A link to `job`'s object until `expires_at`, made for the API key `key`: it names
    /// the key (`key=<id>`, signed with the rest), so revoking the key ends the link.
    pub fn sign(&self, job: &Job, expires_at: DateTime<Utc>, key: Option<&str>) -> Url {
        let expires = expires_at.timestamp();
        let signature = URL_SAFE_NO_PAD.encode(self.signature(job, expires, key).finalize().into_bytes());
        let mut url = self.base.clone();
        url.set_path(&format!("/api/v1/downloads/{}", job.id));
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("expires", &expires.to_string());
            if let Some(key) = key {
                query.append_pair("key", key);
            }
            query.append_pair("signature", &signature);
        }
        url
    }

    /// Whether the link's parts are what fileflow signed for `job` and it has not expired
    /// (whether its key is still valid is the caller's to check).
    pub fn verify(
        &self,
        job: &Job,
        expires: i64,
        key: Option<&str>,
        signature: &str,
        now: DateTime<Utc>,
    ) -> Result<(), LinkError> {
        let given = URL_SAFE_NO_PAD.decode(signature).map_err(|_| LinkError::BadSignature)?;
        self.signature(job, expires, key).verify_slice(&given).map_err(|_| LinkError::BadSignature)?;
        if now.timestamp() >= expires {
            return Err(LinkError::Expired);
        }
        Ok(())
    }
}

#[async_trait]
impl DownloadLinks for LinkSigner {
    async fn link(&self, job: &Job, expires_at: DateTime<Utc>, minted_by: Option<&str>) -> anyhow::Result<Url> {
        Ok(self.sign(job, expires_at, minted_by))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{BucketName, ObjectKey, SourceUrl};
    use crate::lifecycle::{JobId, JobStatus};

    fn job(id: i64, key: &str) -> Job {
        let now = Utc::now();
        Job {
            id: JobId(id),
            file_url: SourceUrl::parse("https://example.com/a").unwrap(),
            bucket_name: BucketName::parse("file-bucket").unwrap(),
            object_name: ObjectKey::parse(key).unwrap(),
            status: JobStatus::Completed,
            retry_count: 0,
            last_error: None,
            etag: None,
            size: None,
            sha256: None,
            md5: None,
            crc64nvme: None,
            content_type: None,
            expected_sha256: None,
            expected_md5: None,
            expected_size: None,
            if_exists: Default::default(),
            priority: 0,
            notify_url: None,
            request_headers: None,
            grant: crate::lifecycle::Grant::open(),
            object_version: Some("v1".into()),
            cancel_requested: false,
            bytes_done: None,
            bytes_total: None,
            traceparent: None,
            created_at: now,
            updated_at: now,
            next_attempt_at: None,
            origin: Default::default(),
            not_modified: false,
        }
    }

    fn params(url: &Url) -> (i64, String) {
        let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        (q["expires"].parse().unwrap(), q["signature"].clone())
    }

    #[test]
    fn a_signed_link_verifies_until_it_expires() {
        let signer = LinkSigner::new(vec![7; 32], Url::parse("http://127.0.0.1:8000").unwrap());
        let now = Utc::now();
        let url = signer.sign(&job(21, "kitty2.jpg"), now + chrono::Duration::seconds(60), None);
        assert_eq!(url.path(), "/api/v1/downloads/21");
        let (expires, sig) = params(&url);
        assert_eq!(signer.verify(&job(21, "kitty2.jpg"), expires, None, &sig, now), Ok(()));
        let later = now + chrono::Duration::seconds(61);
        assert_eq!(signer.verify(&job(21, "kitty2.jpg"), expires, None, &sig, later), Err(LinkError::Expired));
    }

    #[test]
    fn tampering_with_any_part_breaks_the_link() {
        let signer = LinkSigner::new(vec![7; 32], Url::parse("http://127.0.0.1:8000").unwrap());
        let now = Utc::now();
        let url = signer.sign(&job(21, "kitty2.jpg"), now + chrono::Duration::seconds(60), None);
        let (expires, sig) = params(&url);
        let bad = Err(LinkError::BadSignature);
        assert_eq!(signer.verify(&job(21, "kitty2.jpg"), expires + 3600, None, &sig, now), bad);
        assert_eq!(signer.verify(&job(22, "kitty2.jpg"), expires, None, &sig, now), bad);
        assert_eq!(signer.verify(&job(21, "other.jpg"), expires, None, &sig, now), bad);
        let rewritten = Job { object_version: Some("v2".into()), ..job(21, "kitty2.jpg") };
        assert_eq!(signer.verify(&rewritten, expires, None, &sig, now), bad);
        assert_eq!(signer.verify(&job(21, "kitty2.jpg"), expires, None, "AAAA", now), bad);
        assert_eq!(signer.verify(&job(21, "kitty2.jpg"), expires, None, "not base64!", now), bad);
        let other_key = LinkSigner::new(vec![8; 32], Url::parse("http://127.0.0.1:8000").unwrap());
        assert_eq!(other_key.verify(&job(21, "kitty2.jpg"), expires, None, &sig, now), bad);
    }

    #[test]
    fn a_link_names_the_key_it_was_made_for_and_cannot_be_moved_to_another() {
        let signer = LinkSigner::new(vec![7; 32], Url::parse("http://127.0.0.1:8000").unwrap());
        let now = Utc::now();
        let url = signer.sign(&job(21, "kitty2.jpg"), now + chrono::Duration::seconds(60), Some("k1"));
        let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(q["key"], "k1");
        let (expires, sig) = params(&url);
        let j = job(21, "kitty2.jpg");
        assert_eq!(signer.verify(&j, expires, Some("k1"), &sig, now), Ok(()));
        assert_eq!(signer.verify(&j, expires, Some("k2"), &sig, now), Err(LinkError::BadSignature));
        assert_eq!(signer.verify(&j, expires, None, &sig, now), Err(LinkError::BadSignature));
    }

    #[test]
    fn the_key_is_generated_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let base = Url::parse("http://127.0.0.1:8000").unwrap();
        let first = LinkSigner::load_or_create(dir.path(), base.clone()).unwrap();
        let second = LinkSigner::load_or_create(dir.path(), base).unwrap();
        assert_eq!(first.key, second.key);
        assert_eq!(first.key.len(), 32);
    }
}
