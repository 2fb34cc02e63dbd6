//! Segmented downloads: one large file from nginx capping each answer at 16 MiB/s
//! (`limit_rate 16m`), fetched by fileflow (default settings: ranges at once), by fileflow
//! with `--segments 1` (one stream), by `aria2c -x8 -s8` and by `rclone copyurl`.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::report::Table;
use crate::{Bench, MIB, env_number, f1, f2, median, origin, services};

/// nginx serving `root` on a loopback port, each answer capped at `rate` (nginx's `limit_rate`).
struct Nginx {
    child: Child,
    port: u16,
}

impl Nginx {
    async fn start(dir: &Path, root: &Path, rate: &str) -> Option<Nginx> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let conf = dir.join("nginx.conf");
        // Started by root, nginx's worker would drop to `nobody`, who cannot read the scratch files.
        let who = std::process::Command::new("id").arg("-un").output().ok()?;
        let user = match String::from_utf8_lossy(&who.stdout).trim() {
            "root" => "user root;\n",
            _ => "",
        };
        let text = format!(
            "{user}worker_processes 1;\ndaemon off;\npid {pid};\nerror_log {err} warn;\n\
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

/// Run `command` to its end; the seconds it took, or why it failed.
async fn timed(mut command: Command) -> Result<f64, String> {
    let started = Instant::now();
    let output = command.output().await.map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).chars().take(500).collect());
    }
    Ok(started.elapsed().as_secs_f64())
}

impl Bench {
    pub async fn segments(&mut self) -> Table {
        let size = env_number("FILEFLOW_BENCH_SEGMENTED_BYTES", 512 << 20);
        let rounds = env_number("FILEFLOW_BENCH_ROUNDS", 3).max(1) as usize;
        let mib = size as f64 / MIB;
        let mut table = Table::new(
            &format!("Segmented download: {mib:.0} MiB from an origin capping each answer at 16 MiB/s"),
            "nginx 1 worker, `limit_rate 16m` (per answer, so per connection), serving a file from disk with \
             its ETag and `Accept-Ranges: bytes`; everything on loopback, into the local disk. fileflow: one \
             release `fileflow serve` process (embedded stack), time from the accept to the completion; once \
             with its defaults (ranges at once: --segments 8, --segment-threshold 64MiB, pieces of 8 MiB), once \
             with --segments 1 (one stream). aria2c: `-x8 -s8`. rclone: `rclone copyurl`. The runners take \
             turns; medians and the range of MiB/s. Ratios: fileflow's default speed over this row's. nginx \
             lets each answer send a second's worth (16 MiB) before the cap bites, so many short answers \
             (fileflow's 8 MiB pieces) gain more from that than a few long ones (aria2's eight ranges); the              last rows take the file from the benchmark's own origin instead, which paces every answer from its              first byte (1 MiB every 62 ms, 16.1 MiB/s) and generates the bytes as it sends them.",
            &["runner", "seconds", "MiB/s", "MiB/s (range)", "fileflow ÷ this", "peak RSS MiB"],
        );
        let missing: Vec<&str> = ["nginx", "aria2c", "rclone"].into_iter().filter(|p| !installed(p)).collect();
        if missing.contains(&"nginx") {
            self.notes.push("segmented download: not run (nginx is not installed)".into());
            return table;
        }
        let root = self.dir("segments-root");
        let file = root.join("big.bin");
        write_file(&file, size);
        let Some(nginx) = Nginx::start(&self.dir("segments-nginx"), &root, "16m").await else {
            self.notes.push("segmented download: not run (nginx did not start)".into());
            return table;
        };
        let url = nginx.url("big.bin");
        let runners = [
            "fileflow (defaults)",
            "fileflow --segments 1",
            "aria2c -x8 -s8",
            "rclone copyurl",
            "paced origin, no burst: fileflow (defaults)",
            "paced origin, no burst: aria2c -x8 -s8",
        ];
        // The benchmark's own origin, sending 1 MiB every 62 ms from each answer's first
        // byte (16.1 MiB/s, no burst), with a strong ETag and ranges.
        let paced = |name: String| self.origin.url(&format!("/resumable/{name}/{size}?seed=3&every_ms=62"));
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); runners.len()];
        let out = self.dir("segments-out");
        for _ in 0..rounds {
            for (r, runner) in runners.iter().enumerate() {
                let outcome = match r {
                    0 | 1 | 4 => {
                        let env: Vec<(String, String)> =
                            if r == 1 { vec![("FILEFLOW_SEGMENTS".into(), "1".into())] } else { Vec::new() };
                        let file_url = if r == 4 { paced(services::unique("paced")) } else { url.clone() };
                        let bucket = services::unique("bench-segments");
                        let (secs, completed, _, rss, _) =
                            self.fileflow_run_urls(&env, None, 1, &bucket, move |_| file_url.clone()).await;
                        if completed == 1 { Ok((secs, rss)) } else { Err("the job did not complete".to_owned()) }
                    }
                    2 | 5 if !missing.contains(&"aria2c") => {
                        let mut command = Command::new("aria2c");
                        command
                            .args(["-x8", "-s8", "-q", "--allow-overwrite=true", "--auto-file-renaming=false"])
                            .arg("-d")
                            .arg(&out)
                            .args(["-o", "aria2.bin"])
                            .arg(if r == 5 { paced(services::unique("paced")) } else { url.clone() });
                        timed(command).await.map(|secs| (secs, 0.0))
                    }
                    3 if !missing.contains(&"rclone") => {
                        let mut command = Command::new("rclone");
                        command.arg("copyurl").arg(&url).arg(out.join("rclone.bin")).env("RCLONE_CONFIG", "/dev/null");
                        timed(command).await.map(|secs| (secs, 0.0))
                    }
                    _ => continue,
                };
                match outcome {
                    Ok(run) => runs[r].push(run),
                    Err(why) => self.notes.push(format!("segmented download, {runner}: {why}")),
                }
                check_and_clear(&out, size, &mut self.notes);
            }
        }
        let first = runs[0].iter().map(|r| r.0).collect::<Vec<_>>();
        let first = if first.is_empty() { f64::NAN } else { median(&mut first.clone()) };
        for (runner, runs) in runners.iter().zip(&runs) {
            if runs.is_empty() {
                continue;
            }
            let secs = median(&mut runs.iter().map(|r| r.0).collect::<Vec<_>>());
            let (lo, hi) = runs.iter().fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(r.0), hi.max(r.0)));
            let rss = runs.iter().map(|r| r.1).fold(0f64, f64::max);
            table.row(vec![
                (*runner).into(),
                f2(secs),
                f1(mib / secs),
                format!("{:.0}–{:.0}", mib / hi, mib / lo),
                f2(secs / first),
                if runner.contains("fileflow") { f1(rss) } else { "-".into() },
            ]);
        }
        drop(nginx);
        let _ = std::fs::remove_dir_all(&root);
        table
    }
}

/// Check the baselines' copies are whole, then remove them.
fn check_and_clear(out: &Path, size: u64, notes: &mut Vec<String>) {
    for name in ["aria2.bin", "rclone.bin"] {
        let path = out.join(name);
        if let Ok(meta) = std::fs::metadata(&path) {
            if meta.len() != size {
                notes.push(format!("segmented download: {name} has {} of {size} bytes", meta.len()));
            }
            let _ = std::fs::remove_file(&path);
        }
    }
}
