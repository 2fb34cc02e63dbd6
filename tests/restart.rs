//! The real binary, killed and restarted: no accepted job is lost, whatever the signal.

#[path = "support/origin.rs"]
mod origin;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use origin::{Origin, content};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

struct Fileflow {
    child: Child,
    base: String,
    client: reqwest::Client,
}

/// Start `fileflow serve` on a free port and wait until it listens.
async fn start(data_dir: &Path, env: &[(&str, &str)]) -> Fileflow {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fileflow"))
        .arg("serve")
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
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let port = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if event["message"] == "API listening" {
                return event["port"].as_u64().unwrap();
            }
        }
        panic!("fileflow exited before listening");
    })
    .await
    .expect("fileflow listens within 30 s");
    // Keep draining its log so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Fileflow {
        child,
        base: format!("http://127.0.0.1:{port}"),
        client: reqwest::Client::builder().no_proxy().build().unwrap(),
    }
}

impl Fileflow {
    async fn submit(&self, url: &str, key: &str) -> String {
        let body = json!({ "file_url": url, "bucket_name": "file-bucket", "object_name": key });
        let response = self.client.post(format!("{}/api/v1/upload", self.base)).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 202);
        response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
    }

    async fn statuses(&self) -> Vec<(String, String)> {
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

    async fn job(&self, id: &str) -> Value {
        self.client.get(format!("{}/api/v1/uploads/{id}", self.base)).send().await.unwrap().json().await.unwrap()
    }

    async fn wait_all_completed(&self, expected: usize, limit: Duration) -> Vec<(String, String)> {
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

    fn signal(&self, signal: &str) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success());
    }
}

#[tokio::test]
async fn kill_9_with_jobs_waiting_and_in_flight_loses_nothing() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = [("FILEFLOW_WORKER_CONCURRENCY", "2"), ("FILEFLOW_JOB_LEASE", "1s")];
    let first = start(dir.path(), &env).await;
    let mut ids = Vec::new();
    for i in 0..12u64 {
        let url = origin.url(&format!("/delay/1500/{}?seed={i}", 10_000 + i));
        ids.push((i, first.submit(&url, &format!("crash/{i}")).await));
    }
    // Wait until two jobs are mid-transfer, then kill without warning.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let statuses = first.statuses().await;
        if statuses.iter().filter(|(_, s)| s == "processing").count() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "jobs never started: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut first = first;
    first.child.start_kill().unwrap();
    first.child.wait().await.unwrap();

    let second = start(dir.path(), &env).await;
    let before: Vec<_> = second.statuses().await;
    assert!(
        before.iter().any(|(_, s)| s == "processing") && before.iter().any(|(_, s)| s == "pending"),
        "the kill left jobs in flight and waiting: {before:?}"
    );
    second.wait_all_completed(12, Duration::from_secs(60)).await;
    for (i, id) in ids {
        let job = second.job(&id).await;
        assert_eq!(job["size"], 10_000 + i, "{job}");
        let stored = std::fs::read(dir.path().join("objects/file-bucket/crash").join(i.to_string())).unwrap();
        assert!(stored == content(i, 10_000 + i), "job {id} stored wrong bytes");
    }
}

#[tokio::test]
async fn sigterm_lets_jobs_in_flight_finish_within_the_grace_period() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = [("FILEFLOW_WORKER_CONCURRENCY", "4"), ("FILEFLOW_SHUTDOWN_GRACE", "20s")];
    for signal in ["-TERM", "-INT"] {
        let mut app = start(dir.path(), &env).await;
        let a = app.submit(&origin.url("/delay/1000/2000?seed=1"), &format!("{signal}/a")).await;
        let b = app.submit(&origin.url("/delay/1000/3000?seed=2"), &format!("{signal}/b")).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while app.job(&a).await["status"] != "processing" || app.job(&b).await["status"] != "processing" {
            assert!(Instant::now() < deadline, "jobs never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stopping = Instant::now();
        app.signal(signal);
        let exit = tokio::time::timeout(Duration::from_secs(15), app.child.wait()).await.unwrap().unwrap();
        assert!(exit.success(), "{signal}: {exit:?}");
        assert!(stopping.elapsed() < Duration::from_secs(10));

        let after = start(dir.path(), &env).await;
        assert_eq!(after.job(&a).await["status"], "completed", "{signal}");
        assert_eq!(after.job(&b).await["size"], 3000, "{signal}");
        drop(after);
    }
}
