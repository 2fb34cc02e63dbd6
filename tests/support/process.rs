//! `fileflow` as a real process: start it in a role, talk to its API, kill it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Fileflow {
    pub child: Child,
    pub base: String,
    client: reqwest::Client,
    /// Every JSON log event the process wrote.
    pub events: Arc<Mutex<Vec<Value>>>,
}

/// The `fileflow` program under test: cargo's build of it, or `FILEFLOW_TEST_BIN` (a copy
/// of that build kept aside, when several checkouts share one target directory and another
/// one's build may replace the file while a suite runs).
pub fn binary() -> String {
    std::env::var("FILEFLOW_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_fileflow").to_owned())
}

/// Start `fileflow serve` on a free port and wait until it listens.
pub async fn start(data_dir: &Path, env: &[(&str, &str)]) -> Fileflow {
    start_role("serve", data_dir, env).await
}

/// Start `fileflow <role>` and wait until it is up (listening, or workers started).
pub async fn start_role(role: &str, data_dir: &Path, env: &[(&str, &str)]) -> Fileflow {
    let mut child = Command::new(binary())
        .arg(role)
        .env("FILEFLOW_LISTEN", "127.0.0.1:0")
        .env("FILEFLOW_DATA_DIR", data_dir)
        .env("FILEFLOW_FETCH_ALLOW_PRIVATE", "true")
        .env("FILEFLOW_LOG_FORMAT", "json")
        .env("FILEFLOW_RETRY_BASE_DELAY", "20ms")
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("fileflow starts");
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut keep = log_file(role, child.id().unwrap_or(0));
    let ready = if role == "worker" { "workers started" } else { "API listening" };
    let port = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            keep_line(&mut keep, &line);
            let Ok(event) = serde_json::from_str::<Value>(&line) else { continue };
            let found = event["message"] == ready;
            let port = event["port"].as_u64();
            events.lock().unwrap().push(event);
            if found {
                return port.unwrap_or(0);
            }
        }
        panic!("fileflow {role} exited before it was ready: {:?}", events.lock().unwrap());
    })
    .await
    .expect("fileflow is ready within 60 s");
    // Keep reading its log (so it never blocks on a full pipe), and keep the events.
    let sink = events.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            keep_line(&mut keep, &line);
            if let Ok(event) = serde_json::from_str::<Value>(&line) {
                sink.lock().unwrap().push(event);
            }
        }
    });
    Fileflow {
        child,
        base: format!("http://127.0.0.1:{port}"),
        client: reqwest::Client::builder().no_proxy().build().unwrap(),
        events,
    }
}

/// With `FILEFLOW_TEST_LOG_DIR` set, every line a process writes is also kept in
/// `<dir>/<role>-<pid>.log`, to read a failed run's whole story afterwards.
fn log_file(role: &str, pid: u32) -> Option<std::fs::File> {
    let dir = std::env::var_os("FILEFLOW_TEST_LOG_DIR")?;
    std::fs::create_dir_all(&dir).ok()?;
    std::fs::File::create(Path::new(&dir).join(format!("{role}-{pid}.log"))).ok()
}

fn keep_line(file: &mut Option<std::fs::File>, line: &str) {
    if let Some(f) = file {
        use std::io::Write as _;
        let _ = writeln!(f, "{line}");
    }
}

impl Fileflow {
    pub async fn submit(&self, url: &str, key: &str) -> String {
        self.submit_to(url, "file-bucket", key).await
    }

    pub async fn submit_to(&self, url: &str, bucket: &str, key: &str) -> String {
        let body = json!({ "file_url": url, "bucket_name": bucket, "object_name": key });
        let response = self.client.post(format!("{}/api/v1/upload", self.base)).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 202);
        response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
    }

    pub async fn statuses(&self) -> Vec<(String, String)> {
        let list: Value = self
            .client
            .get(format!("{}/api/v1/uploads?limit=1000", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list["uploads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| (j["id"].as_str().unwrap().to_owned(), j["status"].as_str().unwrap().to_owned()))
            .collect()
    }

    pub async fn job(&self, id: &str) -> Value {
        self.client.get(format!("{}/api/v1/uploads/{id}", self.base)).send().await.unwrap().json().await.unwrap()
    }

    pub async fn wait_all_completed(&self, expected: usize, limit: Duration) -> Vec<(String, String)> {
        let deadline = Instant::now() + limit;
        loop {
            let statuses = self.statuses().await;
            if statuses.len() == expected && statuses.iter().all(|(_, s)| s == "completed") {
                return statuses;
            }
            assert!(Instant::now() < deadline, "not all jobs completed: {statuses:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success());
    }

    /// Job ids this process logged as completed.
    pub fn completed_ids(&self) -> Vec<String> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .filter(|e| e["message"] == "job completed")
            .map(|e| e["job_id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// kill -9 and reap; returns how the process ended (SIGKILL, unless it had already
    /// ended on its own).
    pub async fn kill(&mut self) -> std::process::ExitStatus {
        if let Some(status) = self.child.try_wait().unwrap() {
            return status;
        }
        // It may end on its own between the check and the signal: the status says so.
        let _ = self.child.start_kill();
        self.child.wait().await.unwrap()
    }
}
