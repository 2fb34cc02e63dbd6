//! S3 (any S3-compatible service) as a [`Cloud`]: path-style addressing when an endpoint
//! is given (MinIO, Garage), every PUT and part checked by the store against its SHA-256,
//! buckets created with a presigned CreateBucket, links presigned with SigV4.

use async_trait::async_trait;
use object_store::aws::{AmazonS3, AmazonS3Builder, Checksum};
use object_store::path::Path as StorePath;
use object_store::signer::Signer;
use url::Url;

use super::cloud::{Cloud, CloudLimits, CloudStore};
use crate::domain::BucketName;
use crate::lifecycle::JobError;

/// How to reach the store.
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// Path-style addressing is used when an endpoint is given (MinIO, Garage).
    pub endpoint: Option<Url>,
    /// The endpoint download links name, when users reach the store at another address
    /// than fileflow does (path-style too).
    pub public_endpoint: Option<Url>,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: crate::secrets::Secret,
    /// Create a missing bucket instead of failing the job.
    pub create_buckets: bool,
    /// The largest file accepted: parts grow so no upload needs more than 10,000.
    pub max_file_size: u64,
}

pub type S3Store = CloudStore<S3>;

impl S3Store {
    pub fn new(settings: S3Settings) -> Self {
        let limits = CloudLimits { create_buckets: settings.create_buckets, max_file_size: settings.max_file_size };
        CloudStore::with(S3 { settings }, limits)
    }
}

pub struct S3 {
    settings: S3Settings,
}

#[async_trait]
impl Cloud for S3 {
    type Client = AmazonS3;

    fn name(&self) -> &'static str {
        "S3"
    }

    fn client(&self, bucket: &str, public: bool) -> Result<AmazonS3, JobError> {
        let endpoint = match public {
            true => self.settings.public_endpoint.as_ref().or(self.settings.endpoint.as_ref()),
            false => self.settings.endpoint.as_ref(),
        };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(&self.settings.region)
            .with_access_key_id(&self.settings.access_key_id)
            .with_secret_access_key(self.settings.secret_access_key.expose())
            // The store verifies every PUT and part against its CRC64/NVME
            // (x-amz-checksum-crc64nvme), and a multipart object's whole CRC is the one
            // fileflow records. Over HTTPS the payload goes unsigned, as AWS's own SDKs send
            // it: TLS guards the bytes and the CRC checks them, so no second SHA-256 pass;
            // over plain HTTP the signature covers the payload's SHA-256 too.
            .with_checksum_algorithm(Checksum::CRC64NVME)
            .with_unsigned_payload(endpoint.is_none_or(|e| e.scheme() == "https"));
        if let Some(endpoint) = endpoint {
            builder = builder
                .with_endpoint(endpoint.as_str().trim_end_matches('/'))
                .with_virtual_hosted_style_request(false)
                .with_allow_http(endpoint.scheme() == "http");
        }
        builder.build().map_err(|e| JobError::permanent(format!("S3 configuration: {e}")))
    }

    /// A presigned CreateBucket request.
    async fn create_bucket(
        &self,
        http: &reqwest::Client,
        client: &AmazonS3,
        _bucket: &BucketName,
    ) -> Result<reqwest::RequestBuilder, JobError> {
        let url = client
            .signed_url(reqwest::Method::PUT, &StorePath::from(""), std::time::Duration::from_secs(60))
            .await
            .map_err(|e| JobError::transient(format!("S3: cannot sign CreateBucket: {e}")))?;
        Ok(http.put(url))
    }

    fn public_elsewhere(&self) -> bool {
        self.settings.public_endpoint.is_some()
    }

    fn is_missing_bucket(&self, text: &str) -> bool {
        text.contains("NoSuchBucket")
    }

    fn part_checksum(&self) -> Option<&'static str> {
        Some("crc64nvme")
    }

    /// Cloudflare R2 takes a multipart upload only when its parts but the last are of one size.
    fn equal_parts(&self) -> bool {
        let host = self.settings.endpoint.as_ref().and_then(|e| e.host_str().map(str::to_ascii_lowercase));
        host.is_some_and(|h| h.ends_with(".r2.cloudflarestorage.com"))
    }
}
