//! `spawn_app`: a real fileflow on port 0 with a fresh data dir, on the embedded stack or,
//! when `FILEFLOW_TEST_STACK=distributed`, on PostgreSQL + Kafka + S3 (a fresh database,
//! topics, group and bucket per test).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fileflow::auth::KeyLimits;
use fileflow::config::{Command, KeysCommand, OutputFormat, Settings};
use fileflow::startup::{Application, Hooks};
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub use crate::origin::{Origin, content};

pub struct TestApp {
    pub base: String,
    /// The bucket this test stores into (unique per test on S3).
    pub bucket: String,
    s3: Option<crate::services::S3>,
    /// The object store this test's bucket is in, when it is not the disk.
    remote: Option<std::sync::Arc<dyn object_store::ObjectStore>>,
    pub client: reqwest::Client,
    pub settings: Settings,
    _data_dir: Option<tempfile::TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Settings for tests: private origins allowed, fast retries, short leases.
pub fn test_settings(data_dir: PathBuf) -> Settings {
    let mut s = Settings::defaults(data_dir);
    s.server.listen = "127.0.0.1:0".parse().unwrap();
    s.fetch.allow_private = true;
    s.retry.base_delay = Duration::from_millis(20);
    s.retry.max_delay = Duration::from_millis(200);
    s.worker.job_lease = Duration::from_secs(3);
    s.worker.shutdown_grace = Duration::from_secs(5);
    s
}

/// Test settings on this run's stack.
pub async fn stack_settings(data_dir: PathBuf) -> Settings {
    let mut settings = test_settings(data_dir);
    if distributed() {
        use_distributed_stack(&mut settings).await;
    }
    if store() == "azure" {
        use_azure(&mut settings);
    }
    settings
}

/// The store the suite runs on besides the stack's own (`FILEFLOW_TEST_STORE=azure`):
/// the embedded stack with Azure Blob Storage (Azurite) instead of the disk.
pub fn store() -> String {
    std::env::var("FILEFLOW_TEST_STORE").unwrap_or_default()
}

fn use_azure(settings: &mut Settings) {
    let azure = crate::services::azure().expect("FILEFLOW_TEST_STORE=azure needs Azurite");
    settings.store.storage = fileflow::config::StorageKind::Azure;
    settings.store.azure_endpoint = Some(azure.endpoint.parse().unwrap());
    settings.store.azure_account = Some(azure.account);
    settings.store.azure_access_key = Some(azure.key.into());
    settings.store.create_buckets = true;
    // Names this test's container.
    settings.kafka.topic = crate::services::unique("jobs");
}

/// Whether download links are the store's own (presigned S3, Azure SAS), not fileflow's.
pub fn store_links() -> bool {
    distributed() || store() == "azure"
}

/// Point `settings` at the distributed stack's servers (fresh database, topics and group).
async fn use_distributed_stack(settings: &mut Settings) {
    let s3 = crate::services::s3().expect("FILEFLOW_TEST_STACK=distributed needs S3");
    settings.data.database_url =
        Some(crate::services::fresh_postgres().await.expect("distributed needs PostgreSQL").into());
    settings.kafka.brokers = Some(crate::services::service("FILEFLOW_TEST_KAFKA").expect("distributed needs Kafka"));
    settings.kafka.topic = crate::services::unique("jobs");
    settings.kafka.group = crate::services::unique("workers");
    settings.kafka.partitions = 2;
    settings.store.storage = fileflow::config::StorageKind::S3;
    settings.store.s3_endpoint = Some(s3.endpoint.parse().unwrap());
    settings.store.s3_region = s3.region.clone();
    settings.store.create_buckets = true;
    settings.store.s3_access_key_id = Some(s3.access_key.clone());
    settings.store.s3_secret_access_key = Some(s3.secret_key.clone().into());
}

/// Whether this run uses the distributed stack.
pub fn distributed() -> bool {
    std::env::var("FILEFLOW_TEST_STACK").is_ok_and(|s| s == "distributed")
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_with_hooks(adjust, Hooks::default()).await
}

pub async fn spawn_app_with_hooks(adjust: impl FnOnce(&mut Settings), hooks: Hooks) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = stack_settings(dir.path().to_owned()).await;
    adjust(&mut settings);
    start_with(settings, Some(dir), hooks).await
}

/// Start fileflow on settings whose data dir the caller keeps (for restarts).
pub async fn start(settings: Settings, data_dir: Option<tempfile::TempDir>) -> TestApp {
    start_with(settings, data_dir, Hooks::default()).await
}

/// Start only the API (no workers) on these settings: to look at jobs without anyone
/// picking them up.
pub async fn start_api_only(settings: Settings) -> TestApp {
    start_as(Command::Api, settings, None, Hooks::default()).await
}

async fn start_with(settings: Settings, data_dir: Option<tempfile::TempDir>, hooks: Hooks) -> TestApp {
    start_as(Command::Serve, settings, data_dir, hooks).await
}

async fn start_as(role: Command, settings: Settings, data_dir: Option<tempfile::TempDir>, hooks: Hooks) -> TestApp {
    let app = Application::build_with(settings.clone(), role, hooks).await.expect("fileflow builds");
    let base = format!("http://127.0.0.1:{}", app.port());
    let (tx, rx) = oneshot::channel::<()>();
    let running = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    let s3 = (settings.store.storage == fileflow::config::StorageKind::S3).then(|| crate::services::s3().unwrap());
    let bucket = match &settings.kafka.topic {
        topic if settings.store.storage != fileflow::config::StorageKind::Fs => format!("bucket-{topic}"),
        _ => "file-bucket".to_owned(),
    };
    let remote: Option<std::sync::Arc<dyn object_store::ObjectStore>> = match settings.store.storage {
        fileflow::config::StorageKind::S3 => Some(std::sync::Arc::new(s3.as_ref().unwrap().bucket(&bucket))),
        fileflow::config::StorageKind::Azure => Some(std::sync::Arc::new(
            object_store::azure::MicrosoftAzureBuilder::new()
                .with_account(settings.store.azure_account.clone().unwrap())
                .with_access_key(settings.store.azure_access_key.as_ref().unwrap().expose())
                .with_endpoint(
                    settings.store.azure_endpoint.as_ref().unwrap().as_str().trim_end_matches('/').to_owned(),
                )
                .with_allow_http(true)
                .with_container_name(&bucket)
                .build()
                .unwrap(),
        )),
        _ => None,
    };
    TestApp {
        base,
        bucket,
        s3,
        remote,
        client: reqwest::Client::builder().no_proxy().build().unwrap(),
        settings,
        _data_dir: data_dir,
        shutdown: Some(tx),
        running,
    }
}

impl TestApp {
    /// Create an API key through `fileflow keys create --output json`; returns (id, key).
    pub async fn create_key(&self, role: &str, buckets: &[&str], limits: KeyLimits) -> (String, String) {
        let action = KeysCommand::Create {
            name: format!("{role}-test"),
            role: role.parse().unwrap(),
            buckets: buckets.iter().map(|b| b.to_string()).collect(),
            rate_limit: limits.rate_limit,
            max_unfinished: limits.max_unfinished,
            file_size_limit: limits.max_file_size.map(bytesize::ByteSize::b),
            weight: limits.weight,
            notify_url: None,
            output: OutputFormat::Json,
        };
        let mut out = Vec::new();
        fileflow::cli::keys::run(&self.settings.data, action, &mut out).await.expect("keys create");
        let created: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(created["role"], role);
        (created["id"].as_str().unwrap().to_owned(), created["key"].as_str().unwrap().to_owned())
    }

    /// Make sure this test's bucket exists (on S3 a test's bucket is otherwise created by
    /// its first job, which only admin keys may do).
    pub async fn ensure_bucket(&self) {
        if let Some(s3) = &self.s3 {
            s3.create_bucket(&self.bucket).await;
        }
        if self.settings.store.storage == fileflow::config::StorageKind::Azure {
            let store = fileflow::storage::AzureStore::new(fileflow::storage::AzureSettings {
                account: self.settings.store.azure_account.clone(),
                access_key: self.settings.store.azure_access_key.clone(),
                endpoint: self.settings.store.azure_endpoint.clone(),
                ..Default::default()
            });
            store.create_bucket(&fileflow::domain::BucketName::parse(&self.bucket).unwrap()).await.unwrap();
        }
    }

    /// Revoke a key through `fileflow keys revoke`.
    pub async fn revoke_key(&self, id: &str) {
        let mut out = Vec::new();
        fileflow::cli::keys::run(&self.settings.data, KeysCommand::Revoke { id: id.to_owned() }, &mut out)
            .await
            .expect("keys revoke");
    }

    /// A request as `key` (none: no Authorization header); answers status, headers and JSON body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut request = self.client.request(method, self.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, headers, response.json().await.unwrap_or(Value::Null))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn post_upload(&self, body: &Value) -> reqwest::Response {
        self.client.post(self.url("/api/v1/upload")).json(body).send().await.unwrap()
    }

    /// Submit a job and return its id, asserting it was accepted.
    pub async fn submit(&self, file_url: &str, bucket: &str, key: &str) -> String {
        self.submit_body(&json!({ "file_url": file_url, "bucket_name": bucket, "object_name": key })).await
    }

    pub async fn submit_body(&self, body: &Value) -> String {
        let response = self.post_upload(body).await;
        assert_eq!(response.status(), 202, "upload refused: {:?}", response.text().await);
        let body: Value = response.json().await.unwrap();
        body["id"].as_str().expect("id is a string").to_owned()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn job(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/api/v1/uploads/{id}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Poll until the job satisfies `done`; panic with its last state after `limit`.
    pub async fn wait_until(&self, id: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let job = self.job(id).await;
            if done(&job) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} did not get there in {limit:?}: {job}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Wait for `completed` or `failed`.
    pub async fn finished(&self, id: &str) -> Value {
        self.wait_until(id, Duration::from_secs(30), |j| j["status"] == "completed" || j["status"] == "failed").await
    }

    /// The stored object `key` in this test's bucket.
    pub async fn read_object(&self, key: &str) -> Vec<u8> {
        self.try_read_object(key).await.unwrap_or_else(|| panic!("no object {key} in {}", self.bucket))
    }

    pub async fn try_read_object(&self, key: &str) -> Option<Vec<u8>> {
        match &self.remote {
            Some(remote) => {
                use object_store::ObjectStoreExt;
                let path = object_store::path::Path::from_iter(key.split('/'));
                match remote.get(&path).await {
                    Ok(found) => Some(found.bytes().await.unwrap().to_vec()),
                    Err(object_store::Error::NotFound { .. }) => None,
                    Err(e) if missing_bucket(&e) => None,
                    Err(e) => panic!("cannot read {key}: {e}"),
                }
            }
            None => std::fs::read(self.settings.data.data_dir.join("objects").join(&self.bucket).join(key)).ok(),
        }
    }

    /// Everything in this test's bucket: objects, and on disk any leftover staging files.
    /// Partial writes left in the store: S3 multipart uploads neither completed nor aborted
    /// (on disk, staging files show among [`TestApp::stored_objects`]).
    pub async fn unfinished_uploads(&self) -> usize {
        match &self.s3 {
            Some(s3) => s3.unfinished_uploads(&self.bucket).await,
            None => 0,
        }
    }

    pub async fn stored_objects(&self) -> Vec<String> {
        match &self.remote {
            Some(remote) => {
                use futures::TryStreamExt;
                let listed: Result<Vec<_>, _> = remote.list(None).try_collect().await;
                match listed {
                    Ok(objects) => objects.into_iter().map(|o| o.location.to_string()).collect(),
                    Err(e) if missing_bucket(&e) || matches!(e, object_store::Error::NotFound { .. }) => Vec::new(),
                    Err(e) => panic!("cannot list {}: {e}", self.bucket),
                }
            }
            None => {
                fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
                    let Ok(entries) = std::fs::read_dir(dir) else { return };
                    for entry in entries.flatten() {
                        let path = entry.path();
                        if path.is_dir() {
                            walk(&path, out);
                        } else {
                            out.push(path.display().to_string());
                        }
                    }
                }
                let mut out = Vec::new();
                walk(&self.settings.data.data_dir.join("objects"), &mut out);
                out.sort();
                out
            }
        }
    }

    /// Stop gracefully and wait for the process to finish.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.running).await.unwrap().expect("fileflow stops cleanly");
        self._data_dir.take()
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// CRC64/NVME as S3 and fileflow write it: big-endian, base64.
pub fn crc64nvme(bytes: &[u8]) -> String {
    use base64::Engine as _;
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, bytes);
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

pub fn md5_hex(bytes: &[u8]) -> String {
    use md5::Digest;
    hex::encode(md5::Md5::digest(bytes))
}

/// A store's way of saying the bucket (container) does not exist.
fn missing_bucket(e: &object_store::Error) -> bool {
    let text = e.to_string();
    text.contains("NoSuchBucket") || text.contains("ContainerNotFound")
}
