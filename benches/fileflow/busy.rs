//! Accepting while the workers run: open-loop load on the default `fileflow serve`, whose
//! workers run the jobs it accepts, beside the same on an API-only process; and the same
//! while retention deletes old jobs.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::load;
use crate::process::Fileflow;
use crate::progress::JobsDb;
use crate::report::Table;
use crate::{Bench, env_number, f2, services};

/// Finished jobs in the database of the retention runs.
const RETAINED: u64 = 200_000;

/// How long a small write takes to reach the disk on `dir`'s filesystem while the run
/// goes on: a 4 KiB write and `fdatasync` every 10 ms, until `stop`; the latencies in µs.
fn sync_probe(dir: &Path, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<u64>> {
    let path = dir.join("sync-probe");
    std::thread::spawn(move || {
        let mut file = std::fs::File::create(&path).expect("the probe file is created");
        let mut latencies = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            file.write_all(&[7u8; 4096]).expect("the probe writes");
            let started = Instant::now();
            file.sync_data().expect("the probe syncs");
            latencies.push(started.elapsed().as_micros() as u64);
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&path);
        latencies.sort_unstable();
        latencies
    })
}

fn p99_ms(sorted_us: &[u64]) -> f64 {
    sorted_us.get(sorted_us.len() * 99 / 100).map_or(f64::NAN, |&us| us as f64 / 1000.0)
}

struct Run {
    process: &'static str,
    role: &'static str,
    durability: &'static str,
    rate: f64,
    /// Extra settings, and whether the database starts with `RETAINED` finished jobs.
    env: Vec<(&'static str, &'static str)>,
    seeded: bool,
}

impl Bench {
    pub async fn busy(&mut self) -> Table {
        let measure = Duration::from_secs(env_number("FILEFLOW_BENCH_BUSY_SECS", 10));
        let warmup = Duration::from_secs(3);
        let mut table = Table::new(
            "Accept while the workers run",
            &format!(
                "Open-loop load: jobs offered at a fixed rate, each request sent on time whatever became of the \
                 ones before; latency from sending the request to reading the whole 202 answer; {}s warm-up, then \
                 {}s measured. Every job is a distinct 1 KiB file from the local origin into the disk store. \
                 `serve` is the default process, whose workers (the default 64 slots, 8 per origin host) run what it accepts meanwhile; \
                 `api` accepts only. Durability: power-loss is `synchronous=FULL` (the default), process-crash \
                 `synchronous=NORMAL`. Retention rows: a database holding {RETAINED} finished jobs a day old, with \
                 retention off, then `--retention 1h` and a sweep every second (each deletes at most 1,000). CPU: \
                 the fileflow process's CPU time over the run, in cores; waiting: the time its threads were ready to \
                 run but had no CPU (the kernel's run-queue delay), over the run — 1.00 means a thread was waiting \
                 all the time, on average. Disk sync: a 4 KiB write and `fdatasync` every 10 ms on the same \
                 filesystem during the run (the time a commit of the database waits for the disk).",
                warmup.as_secs(),
                measure.as_secs()
            ),
            &[
                "process",
                "durability",
                "offered/s",
                "answered/s",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
                "max ms",
                "errors",
                "jobs completed meanwhile",
                "old jobs deleted meanwhile",
                "fileflow CPU (cores)",
                "fileflow waiting for a CPU (threads)",
                "disk sync p99 ms",
            ],
        );
        let idle = Arc::new(AtomicBool::new(false));
        let probe = sync_probe(self.scratch.path(), idle.clone());
        tokio::time::sleep(Duration::from_secs(3)).await;
        idle.store(true, Ordering::Relaxed);
        let idle_sync = p99_ms(&probe.join().expect("the probe does not panic"));
        self.notes.push(format!("busy: disk sync p99 with nothing running: {idle_sync:.2} ms"));
        let full = "power-loss";
        let normal = "process-crash";
        let serve = |durability, rate| Run {
            process: "serve",
            role: "serve",
            durability,
            rate,
            env: Vec::new(),
            seeded: false,
        };
        let mut runs = Vec::new();
        for rate in [2000.0, 5000.0] {
            runs.push(serve(full, rate));
            runs.push(Run { process: "api", role: "api", ..serve(full, rate) });
            runs.push(serve(normal, rate));
        }
        runs.push(Run { process: "serve, retention off", seeded: true, ..serve(full, 2000.0) });
        runs.push(Run {
            process: "serve, retention 1h",
            seeded: true,
            env: vec![("FILEFLOW_RETENTION", "1h"), ("FILEFLOW_RECONCILE_INTERVAL", "1s")],
            ..serve(full, 2000.0)
        });
        // FILEFLOW_BENCH_BUSY_ONLY="serve/power-loss/2000;…" runs only the rows named.
        let only = std::env::var("FILEFLOW_BENCH_BUSY_ONLY").unwrap_or_default();
        runs.retain(|run| {
            only.is_empty() || only.split(';').any(|o| o == format!("{}/{}/{}", run.process, run.durability, run.rate))
        });
        for run in runs {
            let data = self.dir(&services::unique("busy"));
            let mut env: Vec<(String, String)> =
                run.env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
            env.push(("FILEFLOW_SQLITE_DURABILITY".into(), run.durability.into()));
            if run.seeded {
                Fileflow::start("api", &data, &env).await.stop().await;
                JobsDb::sqlite(&data).await.seed_finished(RETAINED).await;
            }
            let fileflow = Fileflow::start(run.role, &data, &env).await;
            let db = JobsDb::sqlite(&data).await;
            let old_before = db.jobs_in("bench-growth", false).await;
            let (cpu_before, wait_before) = (fileflow.cpu_seconds(), fileflow.cpu_wait_seconds());
            let probing = Arc::new(AtomicBool::new(false));
            let probe = sync_probe(&data, probing.clone());
            let started = Instant::now();
            let request = load::upload(&fileflow.base, "bench-busy", self.url("/file/1024?seed={n}".into()));
            let latencies = load::paced(run.rate, warmup, measure, request).await;
            let elapsed = started.elapsed().as_secs_f64();
            let cores = (fileflow.cpu_seconds() - cpu_before) / elapsed;
            let waiting = (fileflow.cpu_wait_seconds() - wait_before) / elapsed;
            probing.store(true, Ordering::Relaxed);
            let sync = p99_ms(&probe.join().expect("the probe does not panic"));
            // Only this run's jobs: retention deletes old completed ones meanwhile.
            let completed = db.jobs_in("bench-busy", true).await;
            let deleted = old_before - db.jobs_in("bench-growth", false).await;
            fileflow.stop().await;
            table.row(vec![
                run.process.into(),
                run.durability.into(),
                format!("{:.0}", run.rate),
                format!("{:.0}", latencies.per_sec()),
                f2(latencies.quantile_ms(0.50)),
                f2(latencies.quantile_ms(0.99)),
                f2(latencies.quantile_ms(0.999)),
                f2(latencies.max_ms()),
                latencies.errors.to_string(),
                if run.role == "serve" { completed.to_string() } else { "-".into() },
                if run.seeded { deleted.to_string() } else { "-".into() },
                f2(cores),
                f2(waiting),
                f2(sync),
            ]);
        }
        table
    }
}
