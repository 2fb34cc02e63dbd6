//! Google Cloud Storage against fake-gcs-server: the parts of fileflow's GCS store the
//! emulator can answer. It creates buckets through the JSON API as fileflow does, but it
//! does not implement the XML API's object PUT and multipart upload that object_store's
//! GCS client writes with (it answers `invalid uploadType`), so transfers into GCS are not
//! run against a server here (the README says so). Signing links needs no server.

use chrono::Utc;
use fileflow::domain::BucketName;
use fileflow::links::DownloadLinks;
use fileflow::storage::{GcsSettings, GcsStore};

/// These checks run once, with the embedded stack on disk (the suite's other runs are
/// about their own stores).
fn first_run() -> bool {
    !crate::helpers::distributed() && crate::helpers::store().is_empty()
}

fn settings() -> Option<(GcsSettings, String)> {
    let endpoint = crate::services::service("FILEFLOW_TEST_GCS_ENDPOINT")?;
    let account = crate::services::service("FILEFLOW_TEST_GCS_SERVICE_ACCOUNT")?;
    let settings = GcsSettings {
        service_account: Some(account),
        endpoint: Some(endpoint.parse().unwrap()),
        project: Some("fileflow-test".into()),
        create_buckets: true,
        max_file_size: 1 << 30,
        ..Default::default()
    };
    Some((settings, endpoint))
}

#[tokio::test]
async fn a_bucket_is_created_through_the_json_api_and_creating_it_again_is_harmless() {
    if !first_run() {
        return;
    }
    let Some((settings, endpoint)) = settings() else { return };
    let store = GcsStore::new(settings).unwrap();
    let name = crate::services::unique("gcs-");
    let bucket = BucketName::parse(&name).unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let described = || client.get(format!("{endpoint}/storage/v1/b/{name}")).send();
    assert_eq!(described().await.unwrap().status(), 404);
    store.create_bucket(&bucket).await.unwrap();
    let found: serde_json::Value = described().await.unwrap().json().await.unwrap();
    assert_eq!(found["name"], name.as_str());
    store.create_bucket(&bucket).await.unwrap();
}

/// Links are V4 signed URLs (RSA-SHA256 with the service account's own key, no call to
/// IAM), naming the public endpoint when one is set.
#[tokio::test]
async fn links_are_v4_signed_with_the_service_accounts_key_for_the_public_endpoint() {
    if !first_run() {
        return;
    }
    let Some((mut settings, _)) = settings() else { return };
    settings.public_endpoint = Some("https://files.example.com".parse().unwrap());
    let store = GcsStore::new(settings).unwrap();
    let url = store
        .link(&crate::jobs::completed("reports", "2026/q3.pdf"), Utc::now() + chrono::Duration::seconds(600), None)
        .await
        .unwrap();
    assert_eq!(url.host_str(), Some("files.example.com"), "{url}");
    assert_eq!(url.path(), "/reports/2026/q3.pdf");
    let query: std::collections::HashMap<String, String> = url.query_pairs().into_owned().collect();
    assert_eq!(query["X-Goog-Algorithm"], "GOOG4-RSA-SHA256");
    assert!(query["X-Goog-Credential"].starts_with("fileflow@fileflow-test.iam.gserviceaccount.com/"), "{url}");
    assert_eq!(query["X-Goog-Expires"], "600");
    let signature = &query["X-Goog-Signature"];
    assert_eq!(signature.len(), 512, "a 2048-bit RSA signature in hex: {signature}");
    assert!(signature.bytes().all(|b| b.is_ascii_hexdigit()));
}
