//! Segmented downloads: one large file from nginx capping each answer at 16 MiB/s
//! (`limit_rate 16m`), fetched by fileflow (default settings: ranges at once), by fileflow
//! with `--segments 1` (one stream), by `aria2c -x8 -s8` and by `rclone copyurl`, into the
//! local disk and (fileflow and rclone) into S3; every run's bytes checked against the source's.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::baselines::{RcloneTarget, timed};
use crate::report::Table;
use crate::services::S3;
use crate::{Bench, MIB, check, env_number, f1, f2, median, origin, services};

/// nginx (one process) serving `root` on a loopback port, each answer capped at `rate` (nginx's `limit_rate`).
struct Nginx {
    child: Child,
    port: u16,
}

impl Nginx {
    async fn start(dir: &Path, root: &Path, rate: &str) -> Option<Nginx> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let conf = dir.join("nginx.conf");
        // One process, no master: killing it (on drop) leaves no worker behind.
        // Started by root, nginx's worker would drop to `nobody`, who cannot read the scratch files.
        let who = std::process::Command::new("id").arg("-un").output().ok()?;
        let user = match String::from_utf8_lossy(&who.stdout).trim() {
            "root" => "user root;\n",
            _ => "",
        };
        let text = format!(
            "{user}master_process off;\ndaemon off;\npid {pid};\nerror_log {err} warn;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n  \
             fastcgi_temp_path {tmp};\n  uwsgi_temp_path {tmp};\n  scgi_temp_path {tmp};\n  \
             server {{\n    listen 127.0.0.1:{port};\n    root {root};\n    limit_rate {rate};\n  }}\n}}\n",
            pid = dir.join("nginx.pid").display(),
            err = dir.join("error.log").display(),
            tmp = dir.display(),
            root = root.display(),
        );
        std::fs::write(&conf, text).ok()?;
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .ok()?;
        let ready = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if Instant::now() > ready {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(Nginx { child, port })
    }

    fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn installed(program: &str) -> bool {
    std::process::Command::new(program)
        .arg(if program == "nginx" { "-v" } else { "--version" })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Write the generated file of `size` bytes at `path`, in pieces.
fn write_file(path: &Path, size: u64) {
    use std::io::Write as _;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("the scratch file is created"));
    let piece = 8 << 20;
    let mut at = 0;
    while at < size {
        let len = piece.min(size - at);
        file.write_all(&origin::content_range(3, at, len as usize)).expect("the scratch file is written");
        at += len;
    }
    file.flush().expect("the scratch file is written");
}

/// Who fetches the file in one row of the table.
#[derive(Clone, Copy, PartialEq)]
enum Runner {
    /// One `fileflow serve`; `one_stream`: with `--segments 1`.
    Fileflow {
        one_stream: bool,
    },
    Aria2,
    Rclone,
}

/// One row: its name, its runner, into S3 (else the local disk), from the paced origin
/// (else nginx).
struct Row {
    name: &'static str,
    runner: Runner,
    s3: bool,
    paced: bool,
}

const fn row(name: &'static str, runner: Runner, s3: bool, paced: bool) -> Row {
    Row { name, runner, s3, paced }
}

const DEFAULTS: Runner = Runner::Fileflow { one_stream: false };
const ONE_STREAM: Runner = Runner::Fileflow { one_stream: true };

const ROWS: [Row; 9] = [
    row("fileflow (defaults)", DEFAULTS, false, false),
    row("fileflow --segments 1", ONE_STREAM, false, false),
    row("aria2c -x8 -s8", Runner::Aria2, false, false),
    row("rclone copyurl", Runner::Rclone, false, false),
    row("fileflow (defaults) → S3", DEFAULTS, true, false),
    row("fileflow --segments 1 → S3", ONE_STREAM, true, false),
    row("rclone copyurl → S3", Runner::Rclone, true, false),
    row("paced origin, no burst: fileflow (defaults)", DEFAULTS, false, true),
    row("paced origin, no burst: aria2c -x8 -s8", Runner::Aria2, false, true),
];

/// `Ok` if `got` (a SHA-256 read back from what a runner stored) is `want`.
fn same_bytes(got: Result<String, String>, want: &str) -> Result<(), String> {
    match got {
        Ok(got) if got == want => Ok(()),
        Ok(got) => Err(format!("stored wrong bytes (sha256 {got})")),
        Err(why) => Err(format!("stored wrong bytes? they cannot be read back: {why}")),
    }
}

impl Bench {
    pub async fn segments(&mut self) -> Table {
        let size = env_number("FILEFLOW_BENCH_SEGMENTED_BYTES", 512 << 20);
        let rounds = env_number("FILEFLOW_BENCH_ROUNDS", 3).max(1) as usize;
        let mib = size as f64 / MIB;
        let mut table = Table::new(
            &format!("Segmented download: {mib:.0} MiB from an origin capping each answer at 16 MiB/s"),
            "nginx, one process, `limit_rate 16m` (per answer, so per connection), serving a file from disk with \
             its ETag and `Accept-Ranges: bytes`; everything on loopback, into the local disk, and (rows marked \
             → S3) into S3 (Garage). fileflow: one release `fileflow serve` process (embedded stack), time \
             from the accept to the completion; once with its defaults (ranges at once: --segments 8, \
             --segment-threshold 64MiB, pieces of 8 MiB), once with --segments 1 (one stream). aria2c: `-x8 \
             -s8` (it writes only to a local file, so it has no S3 row). rclone: `rclone copyurl`. Every run's \
             result is checked byte for byte: the SHA-256 fileflow recorded for the job and that of the object \
             read back from the store, and that of aria2c's and rclone's copies, against the source file's; a \
             run that stored other bytes is not counted. The runners take turns; medians and the range of \
             MiB/s. Ratios: fileflow's default speed into the same store over this row's. nginx lets each \
             answer send a second's worth (16 MiB) before the cap bites, so many short answers (fileflow's \
             8 MiB pieces) gain more from that than a few long ones (aria2's eight ranges); the last rows take \
             the file from the benchmark's own origin instead, which paces every answer from its first byte \
             (1 MiB every 62 ms, 16.1 MiB/s) and generates the bytes as it sends them.",
            &["runner", "seconds", "MiB/s", "MiB/s (range)", "fileflow ÷ this", "peak RSS MiB"],
        );
        let missing: Vec<&str> = ["nginx", "aria2c", "rclone"].into_iter().filter(|p| !installed(p)).collect();
        if missing.contains(&"nginx") {
            self.notes.push("segmented download: not run (nginx is not installed)".into());
            return table;
        }
        for program in &missing {
            self.notes.push(format!("segmented download: {program} is not installed: its rows are missing"));
        }
        if self.s3.is_none() {
            self.notes.push("segmented download into S3: not run (no FILEFLOW_TEST_S3_*)".into());
        }
        let root = self.dir("segments-root");
        let file = root.join("big.bin");
        write_file(&file, size);
        let sha256 = check::file_sha256(&file).expect("the source file is read");
        let Some(nginx) = Nginx::start(&self.dir("segments-nginx"), &root, "16m").await else {
            self.notes.push("segmented download: not run (nginx did not start)".into());
            return table;
        };
        let url = nginx.url("big.bin");
        // The benchmark's own origin, sending 1 MiB every 62 ms from each answer's first
        // byte (16.1 MiB/s, no burst), with a strong ETag and ranges: the same bytes.
        let paced = |name: String| self.origin.url(&format!("/resumable/{name}/{size}?seed=3&every_ms=62"));
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); ROWS.len()];
        let out = self.dir("segments-out");
        for _ in 0..rounds {
            for (r, row) in ROWS.iter().enumerate() {
                let s3 = match (&self.s3, row.s3) {
                    (Some(s3), true) => Some(s3.clone()),
                    (None, true) => continue,
                    _ => None,
                };
                let source = if row.paced { paced(services::unique("paced")) } else { url.clone() };
                let outcome = match row.runner {
                    Runner::Fileflow { one_stream } => {
                        let mut env = s3.as_ref().map(S3::env).unwrap_or_default();
                        if one_stream {
                            env.push(("FILEFLOW_SEGMENTS".into(), "1".into()));
                        }
                        let bucket = services::unique("bench-segments");
                        let ((secs, completed, _, rss, _), wrong) = self
                            .fileflow_run_urls(&env, None, 1, &bucket, move |_| source.clone(), Some(&sha256))
                            .await;
                        if let Some(s3) = &s3 {
                            RcloneTarget::S3 { env: s3.rclone_env(), bucket }.purge("").await;
                        }
                        match (completed, wrong) {
                            (1, None) => Ok((secs, rss)),
                            (1, Some(wrong)) => Err(format!("stored wrong bytes: {wrong}")),
                            _ => Err("the job did not complete".to_owned()),
                        }
                    }
                    Runner::Aria2 if !missing.contains(&"aria2c") => {
                        let mut command = Command::new("aria2c");
                        command
                            .args(["-x8", "-s8", "-q", "--allow-overwrite=true", "--auto-file-renaming=false"])
                            .arg("-d")
                            .arg(&out)
                            .args(["-o", "aria2.bin"])
                            .arg(source);
                        let secs = timed(command).await;
                        let copy = out.join("aria2.bin");
                        let checked = secs.and_then(|secs| {
                            same_bytes(check::file_sha256(&copy).map_err(|e| e.to_string()), &sha256).map(|()| secs)
                        });
                        let _ = std::fs::remove_file(&copy);
                        checked.map(|secs| (secs, 0.0))
                    }
                    Runner::Rclone if !missing.contains(&"rclone") => {
                        let target = match &s3 {
                            Some(s3) => {
                                RcloneTarget::S3 { env: s3.rclone_env(), bucket: services::unique("bench-rclone") }
                            }
                            None => RcloneTarget::Dir(out.clone()),
                        };
                        let mut command = target.command();
                        command.arg("copyurl").arg(source).arg(target.path("rclone.bin"));
                        let checked = match timed(command).await {
                            Ok(secs) => same_bytes(target.sha256("rclone.bin").await, &sha256).map(|()| (secs, 0.0)),
                            Err(why) => Err(why),
                        };
                        target.purge(if s3.is_some() { "" } else { "rclone.bin" }).await;
                        let _ = std::fs::remove_file(out.join("rclone.bin"));
                        checked
                    }
                    _ => continue,
                };
                match outcome {
                    Ok(run) => runs[r].push(run),
                    Err(why) => self.notes.push(format!("segmented download, {}: {why}", row.name)),
                }
            }
        }
        let secs_of = |runs: &[(f64, f64)]| median(&mut runs.iter().map(|r| r.0).collect::<Vec<_>>());
        // The ratios' base: fileflow's default into the same store, from nginx.
        let base = |s3: bool| {
            let first = ROWS.iter().position(|row| row.runner == DEFAULTS && row.s3 == s3 && !row.paced);
            first.filter(|&i| !runs[i].is_empty()).map_or(f64::NAN, |i| secs_of(&runs[i]))
        };
        for (row, runs) in ROWS.iter().zip(&runs) {
            if runs.is_empty() {
                continue;
            }
            let secs = secs_of(runs);
            let (lo, hi) = runs.iter().fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(r.0), hi.max(r.0)));
            let rss = runs.iter().map(|r| r.1).fold(0f64, f64::max);
            table.row(vec![
                row.name.into(),
                f2(secs),
                f1(mib / secs),
                format!("{:.0}–{:.0}", mib / hi, mib / lo),
                f2(secs / base(row.s3)),
                if matches!(row.runner, Runner::Fileflow { .. }) { f1(rss) } else { "-".into() },
            ]);
        }
        drop(nginx);
        let _ = std::fs::remove_dir_all(&root);
        table
    }
}
