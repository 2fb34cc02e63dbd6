//! CPU per job by worker slots: one `fileflow serve` (embedded defaults: SQLite with
//! durable writes, the disk store) at 8, 16, 32 and 64 slots (`--worker-concurrency`), each
//! run 2,000 jobs of 16 KiB posted in batches of 1,000; the process's CPU time per job.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::process::Fileflow;
use crate::progress::{JobsDb, now_ms};
use crate::report::Table;
use crate::{Bench, env_number, f2, load, median, services};

/// Jobs per run, posted in requests of `BATCH` (`POST /api/v1/uploads/batch` takes 1,000 at most).
const JOBS: usize = 2000;
const BATCH: usize = 1000;
/// The settings, in the order each round runs them: far apart first, so a slow spell of
/// the machine does not fall on neighbours only.
const SLOTS: [usize; 4] = [8, 64, 16, 32];

/// Where a run's data directory (its database and stored objects) lives.
struct Place {
    name: &'static str,
    root: PathBuf,
}

impl Bench {
    pub async fn slots(&mut self) -> Table {
        let rounds = env_number("FILEFLOW_BENCH_ROUNDS", 3).max(1) as usize;
        let mut table = Table::new(
            "CPU per job by worker slots",
            &format!(
                "One release `fileflow serve` (embedded defaults: SQLite with synchronous=FULL, the disk store, \
                 {} per origin host) with `--worker-concurrency` 8, 16, 32 or 64 and a fresh data directory each \
                 run; {JOBS} distinct 16 KiB files from the benchmark's local origin, posted as `POST \
                 /api/v1/uploads/batch` requests of {BATCH}, then the run waits until all have completed. CPU: \
                 the process's user and system time (/proc/PID/stat) from the first post to the last \
                 completion, over the jobs. One warm-up run per setting, then the settings take turns \
                 (8, 64, 16, 32), {rounds} times; medians, and the range of the runs. Each setting twice: with \
                 the data directory on the benchmark's scratch disk (what users run), and on tmpfs (`/dev/shm`, \
                 where a file's create, write and sync cost the kernel next to nothing): the second is \
                 fileflow's own cost. Data directories are removed only once the part is over (a file system \
                 without a journal scans past recently deleted inodes for every new file).",
                crate::CONCURRENCY
            ),
            &[
                "data directory",
                "slots",
                "runs",
                "CPU µs per job, median (min–max)",
                "jobs/s (median)",
                "CPU ÷ 8 slots",
            ],
        );
        let tmpfs = tempfile::Builder::new().prefix("fileflow-bench-slots").tempdir_in("/dev/shm").ok();
        let mut places = vec![Place { name: "scratch disk", root: self.dir("slots") }];
        match &tmpfs {
            Some(dir) => places.push(Place { name: "tmpfs", root: dir.path().to_owned() }),
            None => self.notes.push("slots: no /dev/shm; the tmpfs rows are missing".into()),
        }
        for place in &places {
            for slots in SLOTS {
                self.slots_run(place, slots).await;
            }
            let mut runs: BTreeMap<usize, Vec<(f64, f64)>> = BTreeMap::new();
            for _ in 0..rounds {
                for slots in SLOTS {
                    if let Some(run) = self.slots_run(place, slots).await {
                        runs.entry(slots).or_default().push(run);
                    }
                }
            }
            let cpu_median = |runs: &[(f64, f64)]| median(&mut runs.iter().map(|r| r.0).collect::<Vec<_>>());
            let eight = runs.get(&8).map_or(f64::NAN, |r| cpu_median(r));
            for (slots, runs) in &runs {
                let cpu = cpu_median(runs);
                let (lo, hi) = runs.iter().fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(r.0), hi.max(r.0)));
                table.row(vec![
                    place.name.into(),
                    slots.to_string(),
                    runs.len().to_string(),
                    format!("{cpu:.0} ({lo:.0}–{hi:.0})"),
                    format!("{:.0}", median(&mut runs.iter().map(|r| r.1).collect::<Vec<_>>())),
                    f2(cpu / eight),
                ]);
            }
            let _ = std::fs::remove_dir_all(&place.root);
        }
        table
    }

    /// One run at `slots` slots with its data directory under `place`: (CPU µs per job,
    /// jobs a second), or `None` with a note if not every job completed.
    async fn slots_run(&mut self, place: &Place, slots: usize) -> Option<(f64, f64)> {
        let data = place.root.join(services::unique("slots"));
        std::fs::create_dir_all(&data).expect("the data directory is made");
        let serve = Fileflow::start("serve", &data, &[("FILEFLOW_WORKER_CONCURRENCY".into(), slots.to_string())]).await;
        let db = JobsDb::sqlite(&data).await;
        let (http, bucket) = (load::client(), services::unique("bench-slots"));
        let file_url = self.url("/file/16384?seed={n}".into());
        let (cpu_before, started) = (serve.cpu_seconds(), now_ms());
        for first in (0..JOBS).step_by(BATCH) {
            // The items are `POST /api/v1/upload` bodies.
            let items: Vec<Vec<u8>> =
                (first..JOBS.min(first + BATCH)).map(|n| load::upload_body(&file_url(n), &bucket, n)).collect();
            let body = [b"{\"items\":[".as_slice(), &items.join(b",".as_slice()), b"]}"].concat();
            let answer = http
                .post(format!("{}/api/v1/uploads/batch", serve.base))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("fileflow answers");
            let status = answer.status();
            let text = answer.text().await.unwrap_or_default();
            assert!(status.is_success() && !text.contains("\"error\""), "the batch was refused: {status} {text}");
        }
        let progress = db.wait_for(JOBS, Duration::from_secs(600)).await;
        let cpu = serve.cpu_seconds() - cpu_before;
        serve.stop().await;
        if progress.completed < JOBS as i64 {
            let (completed, failed) = (progress.completed, progress.failed);
            let place = place.name;
            self.notes.push(format!("slots, {place}, {slots}: {completed} completed, {failed} failed of {JOBS}"));
            return None;
        }
        let secs = (progress.last_update_ms - started) as f64 / 1000.0;
        Some((cpu * 1e6 / JOBS as f64, JOBS as f64 / secs))
    }
}
