//! A release `fileflow` process under measurement: started in a role, watched through its
//! JSON log, sampled for memory, killed at the end.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Fileflow {
    child: Child,
    pub pid: u32,
    /// `http://127.0.0.1:port` for roles that serve the API.
    pub base: String,
    /// Partitions currently assigned to this process by the Kafka group.
    assigned: Arc<Mutex<u64>>,
}

impl Fileflow {
    /// Start `fileflow <role>` with `env` and wait until it is ready.
    pub async fn start(role: &str, data_dir: &Path, env: &[(String, String)]) -> Fileflow {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fileflow"))
            .arg(role)
            .env("FILEFLOW_LISTEN", "127.0.0.1:0")
            .env("FILEFLOW_DATA_DIR", data_dir)
            .env("FILEFLOW_FETCH_ALLOW_PRIVATE", "true")
            .env("FILEFLOW_LOG_FORMAT", "json")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the fileflow binary starts");
        let pid = child.id().expect("a running child has a pid");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
        let ready = if role == "worker" { "workers started" } else { "API listening" };
        let mut port = 0;
        let mut seen = Vec::new();
        let started = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(event) = serde_json::from_str::<Value>(&line) else { continue };
                if event["message"] == ready {
                    port = event["port"].as_u64().unwrap_or(0);
                    return true;
                }
                seen.push(line);
            }
            false
        })
        .await;
        assert!(started == Ok(true), "fileflow {role} did not start; it said:\n{}", seen.join("\n"));
        // Keep draining the log so the process never blocks on a full pipe, and follow
        // the partitions the consumer group gives it.
        let assigned = Arc::new(Mutex::new(0));
        let tracked = assigned.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if !line.contains("partitions") {
                    continue;
                }
                let Ok(event) = serde_json::from_str::<Value>(&line) else { continue };
                let count = event["partitions"].as_u64().unwrap_or(0);
                let mut assigned = tracked.lock().unwrap();
                match event["message"].as_str() {
                    Some("partitions assigned") => *assigned = count,
                    Some("partitions revoked") => *assigned = 0,
                    _ => {}
                }
            }
        });
        Fileflow { child, pid, base: format!("http://127.0.0.1:{port}"), assigned }
    }

    pub fn assigned_partitions(&self) -> u64 {
        *self.assigned.lock().unwrap()
    }

    /// Peak resident memory so far (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let kib: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kib / 1024.0
    }

    /// CPU time the process has used so far (user and system), in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid)
    }

    /// Time the process's threads have spent runnable but waiting for a CPU, in seconds
    /// (the second field of each thread's schedstat).
    pub fn cpu_wait_seconds(&self) -> f64 {
        let Ok(threads) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) else { return 0.0 };
        let waited_ns: f64 = threads
            .filter_map(Result::ok)
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
            .sum();
        waited_ns / 1e9
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// CPU time process `pid` has used so far (user and system), in seconds.
/// Create an admin key in the database of `data_dir` (`fileflow keys create`); its secret.
pub async fn create_key(data_dir: &Path) -> String {
    create_key_in(data_dir, &[]).await
}

/// An admin key made with `fileflow keys create` in the stack `env` names (its database).
pub async fn create_key_in(data_dir: &Path, env: &[(String, String)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fileflow"))
        .args(["keys", "create", "--name", "bench", "--role", "admin", "--output", "json"])
        .env("FILEFLOW_DATA_DIR", data_dir)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .await
        .expect("fileflow keys create runs");
    assert!(out.status.success(), "keys create: {}", String::from_utf8_lossy(&out.stderr));
    let created: Value = serde_json::from_slice(&out.stdout).expect("keys create prints JSON");
    created["key"].as_str().expect("a key").to_owned()
}

pub fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

/// The CPU time (user and system, seconds) in the text of a `/proc/<pid>/stat`.
pub fn stat_cpu_seconds(stat: &str) -> f64 {
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime, fields 14 and 15 of the line (12 and 13 after the name), in the
    // kernel's USER_HZ ticks, which Linux fixes at 100 a second for /proc.
    (ticks(11) + ticks(12)) / 100.0
}

/// Wait until a group of workers holds every one of `partitions` partitions, each worker
/// some, and the assignment has stayed put for a second.
pub async fn wait_for_group(workers: &[Fileflow], partitions: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut settled_since = None;
    loop {
        let counts: Vec<u64> = workers.iter().map(Fileflow::assigned_partitions).collect();
        let settled = counts.iter().sum::<u64>() == partitions && counts.iter().all(|&c| c > 0);
        match (settled, settled_since) {
            (true, None) => settled_since = Some(tokio::time::Instant::now()),
            (true, Some(since)) if since.elapsed() >= Duration::from_secs(1) => return,
            (false, _) => settled_since = None,
            _ => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "the consumer group did not settle: {counts:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
