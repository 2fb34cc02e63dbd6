//! The real servers `scripts/test` starts (PostgreSQL, Kafka, S3), found through
//! `FILEFLOW_TEST_*` variables. Under CI a missing server fails the test; elsewhere the
//! test says so and returns.
#![allow(dead_code)]

/// The variable's value; `None` (after saying so) when unset outside CI.
pub fn service(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Some(value),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{var} is not set: CI needs the real service (run ./scripts/test)")
        }
        _ => {
            eprintln!("{var} is not set: skipping (./scripts/test starts the services)");
            None
        }
    }
}

/// A unique name for this test's database, topic or bucket.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{:x}{:04x}", std::process::id(), rand::random::<u32>())
}

/// A fresh, empty PostgreSQL database; returns its URL.
pub async fn fresh_postgres() -> Option<String> {
    let admin = service("FILEFLOW_TEST_POSTGRES")?;
    let name = unique("ff");
    let pool = sqlx::PgPool::connect(&admin).await.expect("the test PostgreSQL answers");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&pool).await.unwrap();
    pool.close().await;
    let base = admin.rsplit_once('/').expect("a database URL").0;
    Some(format!("{base}/{name}"))
}

/// Connection details of the S3 server.
pub struct S3 {
    pub endpoint: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
}

pub fn s3() -> Option<S3> {
    Some(S3 {
        endpoint: service("FILEFLOW_TEST_S3_ENDPOINT")?,
        region: service("FILEFLOW_TEST_S3_REGION")?,
        access_key: service("FILEFLOW_TEST_S3_ACCESS_KEY")?,
        secret_key: service("FILEFLOW_TEST_S3_SECRET_KEY")?,
    })
}

impl S3 {
    /// How many multipart uploads are begun and neither completed nor aborted in `bucket`.
    #[allow(dead_code)]
    pub async fn unfinished_uploads(&self, bucket: &str) -> usize {
        use object_store::signer::{SignedUrlOptions, Signer};
        let options = SignedUrlOptions::default().with_query([("uploads", "")]);
        let url = self
            .bucket(bucket)
            .signed_url_opts(
                reqwest::Method::GET,
                &object_store::path::Path::from(""),
                std::time::Duration::from_secs(60),
                &options,
            )
            .await
            .unwrap();
        let response = reqwest::Client::builder().no_proxy().build().unwrap().get(url).send().await.unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert!(status.is_success(), "ListMultipartUploads: {status}: {body}");
        body.matches("<Upload>").count()
    }

    pub fn bucket(&self, bucket: &str) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_region(&self.region)
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .with_bucket_name(bucket)
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .build()
            .unwrap()
    }

    /// Create `bucket` (a presigned CreateBucket; an existing bucket is fine).
    #[allow(dead_code)]
    pub async fn create_bucket(&self, bucket: &str) {
        use object_store::signer::Signer;
        let url = self
            .bucket(bucket)
            .signed_url(reqwest::Method::PUT, &object_store::path::Path::from(""), std::time::Duration::from_secs(60))
            .await
            .unwrap();
        let response = reqwest::Client::new().put(url).send().await.unwrap();
        assert!(response.status().is_success() || response.status() == 409, "CreateBucket: {}", response.status());
    }

    /// The environment a `fileflow` process needs to use this store.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("FILEFLOW_STORAGE", "s3".into()),
            ("FILEFLOW_S3_ENDPOINT", self.endpoint.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("FILEFLOW_CREATE_BUCKETS", "true".into()),
        ]
    }
}

/// Connection details of the Azure Blob Storage emulator (Azurite).
pub struct Azure {
    pub endpoint: String,
    pub account: String,
    pub key: String,
}

/// A server that takes GCS object writes (moto's S3 application, through GCS's XML API),
/// with a service account file that points the GCS client at it.
pub struct GcsWrites {
    pub endpoint: String,
    pub service_account: String,
}

pub fn gcs_writes() -> Option<GcsWrites> {
    Some(GcsWrites {
        endpoint: service("FILEFLOW_TEST_GCS_WRITES_ENDPOINT")?,
        service_account: service("FILEFLOW_TEST_GCS_WRITES_SERVICE_ACCOUNT")?,
    })
}

pub fn azure() -> Option<Azure> {
    Some(Azure {
        endpoint: service("FILEFLOW_TEST_AZURE_ENDPOINT")?,
        account: service("FILEFLOW_TEST_AZURE_ACCOUNT")?,
        key: service("FILEFLOW_TEST_AZURE_KEY")?,
    })
}
