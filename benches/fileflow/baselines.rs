//! What fileflow is compared with: the ceiling (a bare GET→PUT loop through the same HTTP
//! and storage clients, with no bookkeeping) and what a user would run instead
//! (`rclone copyurl`, one process per file; `rclone copy`, one process for many files).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use fileflow::domain::{BucketName, ObjectKey};
use fileflow::lifecycle::JobError;
use fileflow::storage::{ObjectStore, Unfenced, WriteOptions};
use futures::{StreamExt, TryStreamExt};
use tokio::process::Command;

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

/// Where rclone writes.
#[derive(Clone)]
pub enum RcloneTarget {
    /// A local directory.
    Dir(std::path::PathBuf),
    /// An S3 bucket, through the environment-configured remote `bench:`.
    S3 { env: Vec<(String, String)>, bucket: String },
}

impl RcloneTarget {
    /// rclone's name for `sub` inside this target.
    pub fn path(&self, sub: &str) -> String {
        match self {
            RcloneTarget::Dir(dir) => dir.join(sub).display().to_string(),
            RcloneTarget::S3 { bucket, .. } => format!("bench:{bucket}/{sub}"),
        }
    }

    /// An `rclone` command that can reach this target: no config file, no proxies, and the
    /// remote `bench:` for S3.
    pub fn command(&self) -> Command {
        let mut command = Command::new("rclone");
        command.env("RCLONE_CONFIG", "/dev/null");
        for proxy in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "AWS_CA_BUNDLE"] {
            command.env_remove(proxy);
        }
        if let RcloneTarget::S3 { env, .. } = self {
            command.envs(env.iter().map(|(k, v)| (k, v)));
        }
        command
    }

    /// The files under `sub` and their bytes (`rclone size`).
    pub async fn size(&self, sub: &str) -> Result<(u64, u64), String> {
        let mut command = self.command();
        command.args(["size", "--json"]).arg(self.path(sub));
        let size: serde_json::Value = serde_json::from_slice(&output(command).await?).map_err(|e| e.to_string())?;
        Ok((size["count"].as_u64().unwrap_or(0), size["bytes"].as_u64().unwrap_or(0)))
    }

    /// The SHA-256 of the file `sub`, read back through rclone.
    pub async fn sha256(&self, sub: &str) -> Result<String, String> {
        let mut command = self.command();
        command.args(["hashsum", "sha256", "--download"]).arg(self.path(sub));
        let printed = String::from_utf8_lossy(&output(command).await?).into_owned();
        printed.split_whitespace().next().map(str::to_owned).ok_or_else(|| "rclone hashsum printed nothing".into())
    }

    /// Remove `sub` and everything under it (for S3, the whole bucket when `sub` is empty).
    pub async fn purge(&self, sub: &str) {
        let mut command = self.command();
        command.arg("purge").arg(self.path(sub));
        let _ = output(command).await;
    }
}

pub fn rclone_installed() -> bool {
    std::process::Command::new("rclone")
        .arg("version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Run `command` to its end; its standard output, or why it failed.
async fn output(mut command: Command) -> Result<Vec<u8>, String> {
    let output = command.output().await.map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).chars().take(500).collect());
    }
    Ok(output.stdout)
}

/// Run `command` to its end; the seconds it took, or why it failed.
pub async fn timed(command: Command) -> Result<f64, String> {
    let started = Instant::now();
    output(command).await?;
    Ok(started.elapsed().as_secs_f64())
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
        let mut command = target.command();
        command.arg("copyurl").arg(file_url(n)).arg(target.path(&format!("rclone/{n:06}")));
        async move {
            let output = command.output().await.expect("rclone runs");
            assert!(output.status.success(), "rclone copyurl failed: {}", String::from_utf8_lossy(&output.stderr));
        }
    })
    .await;
    started.elapsed().as_secs_f64()
}

/// `rclone copy` of the files `list` names (paths under `base_url`, one a line) from rclone's
/// HTTP backend into `sub` of `target`, `transfers` at a time, in one process: what a user
/// copying many files runs. The seconds it took, or why it failed.
pub async fn rclone_copy(
    target: &RcloneTarget,
    base_url: &str,
    list: &Path,
    sub: &str,
    transfers: usize,
) -> Result<f64, String> {
    let mut command = target.command();
    command
        .args(["copy", "--http-url", base_url, ":http:"])
        .arg(target.path(sub))
        .arg("--files-from")
        .arg(list)
        .args(["--no-traverse", "--transfers", &transfers.to_string()]);
    timed(command).await
}
