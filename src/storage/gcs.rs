//! Google Cloud Storage as a [`Cloud`], through object_store's XML API client. Credentials
//! come from the standard `GOOGLE_*` variables (a service account file or key, application
//! default credentials, the metadata server); an emulator is reached through its base URL
//! (`--gcs-endpoint`, or `gcs_base_url` in the service account file). Links are V4 signed
//! URLs, signed locally with the service account's key when it has one (else through
//! IAM signBlob); buckets are created through the JSON API.

use std::sync::Arc;

use async_trait::async_trait;
use object_store::StaticCredentialProvider;
use object_store::gcp::{GcpSigningCredential, GoogleCloudStorage, GoogleCloudStorageBuilder, ServiceAccountKey};
use url::Url;

use super::cloud::{Cloud, CloudLimits, CloudStore};
use crate::domain::BucketName;
use crate::lifecycle::JobError;

/// How to reach the service.
#[derive(Debug, Clone, Default)]
pub struct GcsSettings {
    /// A service account file (`GOOGLE_SERVICE_ACCOUNT`; object_store's other `GOOGLE_*`
    /// variables are read too).
    pub service_account: Option<String>,
    /// The service's base URL, for an emulator (default `https://storage.googleapis.com`).
    pub endpoint: Option<Url>,
    /// The base URL download links name, when users reach the service elsewhere.
    pub public_endpoint: Option<Url>,
    /// The project new buckets belong to (`GOOGLE_CLOUD_PROJECT`).
    pub project: Option<String>,
    pub create_buckets: bool,
    pub max_file_size: u64,
}

pub type GcsStore = CloudStore<Gcs>;

impl GcsStore {
    pub fn new(settings: GcsSettings) -> Result<Self, JobError> {
        let limits = CloudLimits { create_buckets: settings.create_buckets, max_file_size: settings.max_file_size };
        let signing = match &settings.service_account {
            Some(path) => local_signing_key(path)?,
            None => None,
        };
        Ok(CloudStore::with(Gcs { settings, signing }, limits))
    }
}

pub struct Gcs {
    settings: GcsSettings,
    /// The service account's own key, when its file has one: links are signed with it.
    signing: Option<Arc<StaticCredentialProvider<GcpSigningCredential>>>,
}

/// The signing key of a service account file that holds one (`client_email`, `private_key`).
fn local_signing_key(path: &str) -> Result<Option<Arc<StaticCredentialProvider<GcpSigningCredential>>>, JobError> {
    let bad = |e: &dyn std::fmt::Display| JobError::permanent(format!("GCS service account {path}: {e}"));
    let text = std::fs::read_to_string(path).map_err(|e| bad(&e))?;
    let account: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&e))?;
    let Some(pem) = account["private_key"].as_str().filter(|k| k.contains("PRIVATE KEY")) else {
        return Ok(None);
    };
    let key = ServiceAccountKey::from_pem(pem.as_bytes()).map_err(|e| bad(&e))?;
    let email = account["client_email"].as_str().unwrap_or_default().to_owned();
    Ok(Some(Arc::new(StaticCredentialProvider::new(GcpSigningCredential { email, private_key: Some(key) }))))
}

#[async_trait]
impl Cloud for Gcs {
    type Client = GoogleCloudStorage;

    fn name(&self) -> &'static str {
        "GCS"
    }

    fn client(&self, bucket: &str, public: bool) -> Result<GoogleCloudStorage, JobError> {
        let mut builder = GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket);
        if let Some(path) = &self.settings.service_account {
            builder = builder.with_service_account_path(path);
        }
        let endpoint = match public {
            true => self.settings.public_endpoint.as_ref().or(self.settings.endpoint.as_ref()),
            false => self.settings.endpoint.as_ref(),
        };
        if let Some(endpoint) = endpoint {
            builder = builder.with_base_url(endpoint.as_str().trim_end_matches('/'));
        }
        if let Some(signing) = &self.signing {
            builder = builder.with_signing_credentials(signing.clone());
        }
        builder.build().map_err(|e| JobError::permanent(format!("GCS configuration: {e}")))
    }

    /// The JSON API's buckets.insert, with the client's own credentials.
    async fn create_bucket(
        &self,
        http: &reqwest::Client,
        client: &GoogleCloudStorage,
        bucket: &BucketName,
    ) -> Result<reqwest::RequestBuilder, JobError> {
        let Some(project) = &self.settings.project else {
            return Err(JobError::permanent(format!(
                "GCS: cannot create bucket {bucket} without a project (GOOGLE_CLOUD_PROJECT or --gcs-project)"
            )));
        };
        let base = self.settings.endpoint.as_ref().map_or("https://storage.googleapis.com", |e| e.as_str());
        let mut url = Url::parse(&format!("{}/storage/v1/b", base.trim_end_matches('/')))
            .map_err(|e| JobError::permanent(format!("GCS: bad endpoint: {e}")))?;
        url.query_pairs_mut().append_pair("project", project);
        let token = client
            .credentials()
            .get_credential()
            .await
            .map_err(|e| JobError::transient(format!("GCS: no credentials to create bucket {bucket}: {e}")))?;
        let request = http.post(url).json(&serde_json::json!({ "name": bucket.as_str() }));
        Ok(match token.bearer.is_empty() {
            true => request,
            false => request.bearer_auth(&token.bearer),
        })
    }

    fn public_elsewhere(&self) -> bool {
        self.settings.public_endpoint.is_some()
    }

    fn is_missing_bucket(&self, text: &str) -> bool {
        // GCS says NoSuchBucket; fake-gcs-server answers 500 "no bucket named …".
        text.contains("NoSuchBucket") || text.contains("no bucket named")
    }
}
