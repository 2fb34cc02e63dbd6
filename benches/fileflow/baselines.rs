//! What fileflow is compared with: the ceiling (a bare GET→PUT loop through the same HTTP
//! and storage clients, with no bookkeeping) and what a user would run instead
//! (`rclone copyurl`, one process per file).

use std::sync::Arc;
use std::time::Instant;

use fileflow::domain::{BucketName, ObjectKey};
use fileflow::lifecycle::JobError;
use fileflow::storage::{ObjectStore, Unfenced, WriteOptions};
use futures::{StreamExt, TryStreamExt};

use crate::load::each_index;

/// GET each of `jobs` URLs and PUT it into `store` as `bucket/bench/{n}`, `concurrency` at
/// a time. Returns the seconds it took; panics on any failure.
pub async fn ceiling(
    store: Arc<dyn ObjectStore>,
    bucket: &str,
    jobs: usize,
    concurrency: usize,
    file_url: impl Fn(usize) -> String + Send + Sync + 'static,
) -> f64 {
    let client = reqwest::Client::builder().no_proxy().build().expect("a plain client builds");
    let bucket = BucketName::parse(bucket).expect("a valid bucket name");
    let started = Instant::now();
    each_index(concurrency, jobs, move |n| {
        let (client, store, bucket, url) = (client.clone(), store.clone(), bucket.clone(), file_url(n));
        async move {
            let response = client.get(url).send().await.and_then(|r| r.error_for_status());
            let body = response.expect("the origin answers").bytes_stream();
            let body = body.map_err(|e| JobError::transient(e.to_string())).boxed();
            let key = ObjectKey::parse(&format!("bench/{n:06}")).expect("a valid key");
            store
                .put(
                    &bucket,
                    &key,
                    WriteOptions { content_type: "application/octet-stream", may_create_bucket: true, length: None },
                    body,
                    &Unfenced,
                )
                .await
                .expect("the store takes the object");
        }
    })
    .await;
    started.elapsed().as_secs_f64()
}

/// Where `rclone copyurl` writes.
#[derive(Clone)]
pub enum RcloneTarget {
    /// A local directory.
    Dir(std::path::PathBuf),
    /// An S3 bucket, through the environment-configured remote `bench:`.
    S3 { env: Vec<(String, String)>, bucket: String },
}

pub fn rclone_installed() -> bool {
    std::process::Command::new("rclone")
        .arg("version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Run `rclone copyurl` once per file for `files` files, `concurrency` processes at a
/// time. Returns the seconds it took; panics if any copy fails.
pub async fn rclone(
    target: RcloneTarget,
    files: usize,
    concurrency: usize,
    file_url: impl Fn(usize) -> String + Send + Sync + 'static,
) -> f64 {
    let started = Instant::now();
    each_index(concurrency, files, move |n| {
        let mut command = tokio::process::Command::new("rclone");
        command.arg("copyurl").arg(file_url(n)).env("RCLONE_CONFIG", "/dev/null");
        for proxy in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "AWS_CA_BUNDLE"] {
            command.env_remove(proxy);
        }
        match &target {
            RcloneTarget::Dir(dir) => command.arg(dir.join(format!("rclone/{n:06}"))),
            RcloneTarget::S3 { env, bucket } => {
                command.envs(env.iter().map(|(k, v)| (k, v))).arg(format!("bench:{bucket}/rclone/{n:06}"))
            }
        };
        async move {
            let output = command.output().await.expect("rclone runs");
            assert!(output.status.success(), "rclone copyurl failed: {}", String::from_utf8_lossy(&output.stderr));
        }
    })
    .await;
    started.elapsed().as_secs_f64()
}
