//! Azure Blob Storage as a [`Cloud`]: a job's bucket is a container. Credentials come from
//! object_store's standard `AZURE_*` variables (account key, SAS, client secret, managed
//! identity, …); an explicit account, key and endpoint (Azurite, a sovereign cloud) win.
//! Links are SAS URLs signed with the account key; containers are created with a
//! SharedKey-signed Create Container request, so creating them needs the account key.

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use object_store::azure::{MicrosoftAzure, MicrosoftAzureBuilder};
use sha2::Sha256;
use url::Url;

use super::cloud::{Cloud, CloudLimits, CloudStore};
use crate::domain::BucketName;
use crate::lifecycle::JobError;

/// The Blob service version fileflow's own requests (Create Container) speak.
const API_VERSION: &str = "2021-08-06";

/// How to reach the account.
#[derive(Debug, Clone, Default)]
pub struct AzureSettings {
    /// The storage account (`AZURE_STORAGE_ACCOUNT_NAME`).
    pub account: Option<String>,
    /// Its access key (`AZURE_STORAGE_ACCOUNT_KEY`), base64.
    pub access_key: Option<crate::secrets::Secret>,
    /// The account's blob endpoint, e.g. `http://127.0.0.1:10000/devstoreaccount1` for
    /// Azurite (default `https://<account>.blob.core.windows.net`).
    pub endpoint: Option<Url>,
    /// The endpoint download links name, when users reach the account elsewhere.
    pub public_endpoint: Option<Url>,
    /// Azurite (`AZURE_STORAGE_USE_EMULATOR`): its development account and key, at
    /// `AZURITE_BLOB_STORAGE_URL` or `http://127.0.0.1:10000`, unless given.
    pub use_emulator: bool,
    pub create_buckets: bool,
    pub max_file_size: u64,
}

pub type AzureStore = CloudStore<Azure>;

/// Azurite's documented development account and key.
const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
const EMULATOR_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

impl AzureStore {
    pub fn new(mut settings: AzureSettings) -> Self {
        if settings.use_emulator {
            // Everything explicit from here on: object_store's emulator mode ignores an endpoint.
            let account = settings.account.get_or_insert_with(|| EMULATOR_ACCOUNT.to_owned()).clone();
            settings.access_key.get_or_insert_with(|| EMULATOR_KEY.into());
            if settings.endpoint.is_none() {
                let base =
                    std::env::var("AZURITE_BLOB_STORAGE_URL").unwrap_or_else(|_| "http://127.0.0.1:10000".into());
                settings.endpoint = Url::parse(&format!("{}/{account}", base.trim_end_matches('/'))).ok();
            }
        }
        let limits = CloudLimits { create_buckets: settings.create_buckets, max_file_size: settings.max_file_size };
        CloudStore::with(Azure { settings }, limits)
    }
}

pub struct Azure {
    settings: AzureSettings,
}

impl Azure {
    /// The account's blob endpoint, as fileflow reaches it.
    fn endpoint(&self) -> Result<Url, JobError> {
        if let Some(endpoint) = &self.settings.endpoint {
            return Ok(endpoint.clone());
        }
        let account = self.settings.account.as_deref().ok_or_else(|| {
            JobError::permanent("Azure: no storage account (AZURE_STORAGE_ACCOUNT_NAME or --azure-account)")
        })?;
        Url::parse(&format!("https://{account}.blob.core.windows.net"))
            .map_err(|e| JobError::permanent(format!("Azure: bad account name: {e}")))
    }
}

#[async_trait]
impl Cloud for Azure {
    type Client = MicrosoftAzure;

    fn name(&self) -> &'static str {
        "Azure"
    }

    fn client(&self, bucket: &str, public: bool) -> Result<MicrosoftAzure, JobError> {
        let mut builder = MicrosoftAzureBuilder::from_env().with_container_name(bucket).with_use_emulator(false);
        if let Some(account) = &self.settings.account {
            builder = builder.with_account(account);
        }
        if let Some(key) = &self.settings.access_key {
            builder = builder.with_access_key(key.expose());
        }
        let endpoint = match public {
            true => self.settings.public_endpoint.as_ref().or(self.settings.endpoint.as_ref()),
            false => self.settings.endpoint.as_ref(),
        };
        if let Some(endpoint) = endpoint {
            builder = builder
                .with_endpoint(endpoint.as_str().trim_end_matches('/').to_owned())
                .with_allow_http(endpoint.scheme() == "http");
        }
        builder.build().map_err(|e| JobError::permanent(format!("Azure configuration: {e}")))
    }

    /// Create Container, signed with the account key (SharedKey).
    async fn create_bucket(
        &self,
        http: &reqwest::Client,
        _client: &MicrosoftAzure,
        bucket: &BucketName,
    ) -> Result<reqwest::RequestBuilder, JobError> {
        let (Some(account), Some(key)) = (&self.settings.account, &self.settings.access_key) else {
            return Err(JobError::permanent(format!(
                "Azure: cannot create container {bucket} without the account name and key"
            )));
        };
        let key =
            BASE64.decode(key.expose()).map_err(|e| JobError::permanent(format!("Azure: the account key: {e}")))?;
        let mut url = self.endpoint()?;
        url.path_segments_mut()
            .map_err(|()| JobError::permanent("Azure: the endpoint cannot be a base"))?
            .pop_if_empty()
            .push(bucket.as_str());
        url.set_query(Some("restype=container"));
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        let signature = shared_key_signature(&key, account, &url, &date);
        Ok(http
            .put(url)
            .header("x-ms-date", &date)
            .header("x-ms-version", API_VERSION)
            .header("content-length", "0")
            .header("authorization", format!("SharedKey {account}:{signature}")))
    }

    fn public_elsewhere(&self) -> bool {
        self.settings.public_endpoint.is_some()
    }

    fn is_missing_bucket(&self, text: &str) -> bool {
        text.contains("ContainerNotFound")
    }

    /// object_store's Azure client stages blocks only for blobs without properties, so a
    /// resumed blob would lose its content type: uploads start over instead.
    fn resumable(&self) -> bool {
        false
    }

    /// A block blob holds up to 50,000 blocks.
    fn max_parts(&self) -> u64 {
        50_000
    }
}

/// The SharedKey signature of a body-less PUT with only `x-ms-date` and `x-ms-version`
/// (<https://learn.microsoft.com/rest/api/storageservices/authorize-with-shared-key>).
fn shared_key_signature(key: &[u8], account: &str, url: &Url, date: &str) -> String {
    // VERB, then eleven standard headers all empty (Content-Length is empty when 0).
    let mut to_sign = format!("PUT{}", "\n".repeat(12));
    to_sign.push_str(&format!("x-ms-date:{date}\nx-ms-version:{API_VERSION}\n"));
    to_sign.push_str(&format!("/{account}{}", url.path()));
    let mut query: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    query.sort();
    for (name, value) in query {
        to_sign.push_str(&format!("\n{}:{value}", name.to_ascii_lowercase()));
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(to_sign.as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}
