//! fileflow's benchmarks, side by side with their baselines, in one run:
//!
//! 1. accept — `POST /api/v1/upload` latency and throughput under closed-loop load;
//! 2. pipeline — many small files from a local origin into the disk store and into S3;
//! 3. scale-out — one, two and four workers in one Kafka consumer group, against a slow origin;
//! 4. large file — one big file into the disk store and into S3, with fileflow's peak memory;
//! 5. resume — one big file cut at 90 % by the origin, with and without resumable transfers;
//! 6. segments — one 512 MiB file from nginx capping each connection at 16 MiB/s: fileflow
//!    (ranges at once, and one stream) beside `aria2c -x8 -s8` and `rclone copyurl`, into the
//!    disk and into S3, every result checked byte for byte;
//! 7. slots — CPU per job of one `fileflow serve` at 8, 16, 32 and 64 worker slots.
//!
//! Each fileflow figure is measured on a release `fileflow` process beside the ceiling (a
//! bare GET→PUT loop through the same HTTP and storage clients) and `rclone copyurl`.
//! `scripts/bench` starts the servers and runs this; the tables go to stdout and, when
//! `FILEFLOW_BENCH_REPORT` names a file, into it (BENCHMARKS.md).
//!
//! Knobs (environment): `FILEFLOW_BENCH_ONLY` (comma-separated: accept, busy, flood, pipeline,
//! scale, large, resume, segments, growth, costs, fair, memory, manifest, slots),
//! `FILEFLOW_BENCH_JOBS` (pipeline jobs, 5000), `FILEFLOW_BENCH_PIPELINE_ONLY` (only the
//! pipeline's stores whose names hold this text), `FILEFLOW_BENCH_LARGE_BYTES` (2 GiB),
//! `FILEFLOW_BENCH_SEGMENTED_BYTES` (512 MiB), `FILEFLOW_BENCH_RCLONE_FILES` (files copied by
//! `rclone copyurl` per store, 400; `rclone copy` takes as many as the pipeline has jobs),
//! `FILEFLOW_BENCH_ROUNDS` (turns of the pipeline, large, segments and slots runs, 3),
//! `FILEFLOW_BENCH_MANIFEST_ROWS` (comma-separated manifest sizes, 100000,1000000).

#[path = "../../tests/support/origin.rs"]
mod origin;

mod baselines;
mod busy;
mod check;
mod costs;
mod fair;
mod flood;
mod growth;
mod load;
mod manifest;
mod memory;
mod process;
mod progress;
mod report;
mod segments;
mod services;
mod slots;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fileflow::storage::{LocalStore, ObjectStore};

use baselines::RcloneTarget;
use process::Fileflow;
use progress::{JobsDb, now_ms};
use report::Table;
use services::{Distributed, S3};

const MIB: f64 = 1024.0 * 1024.0;
/// Small-file size for the pipeline and scale-out runs.
const SMALL: u64 = 16 * 1024;
/// The ceiling's and rclone's concurrency, and what one origin host gets of a fileflow
/// process's slots by default (`--per-host-concurrency`).
const CONCURRENCY: usize = 8;
/// Kafka partitions of the distributed pipeline's job topic.
const PIPELINE_PARTITIONS: u64 = 8;
/// Clients submitting jobs in the pipeline and scale-out runs.
const SUBMITTERS: usize = 16;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn wanted(part: &str) -> bool {
    match std::env::var("FILEFLOW_BENCH_ONLY") {
        Ok(only) if !only.trim().is_empty() => only.split(',').any(|p| p.trim() == part),
        _ => true,
    }
}

/// The median of `xs`, which it sorts.
fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let mid = xs.len() / 2;
    if xs.len() % 2 == 1 { xs[mid] } else { (xs[mid - 1] + xs[mid]) / 2.0 }
}

fn f1(x: f64) -> String {
    format!("{x:.1}")
}

fn f2(x: f64) -> String {
    format!("{x:.2}")
}

/// Where one benchmark's files go, for fileflow and for the baselines.
struct Target {
    name: &'static str,
    /// The environment of the `fileflow` process (its store, for the embedded stack).
    env: Vec<(String, String)>,
    /// Whether fileflow runs on a fresh distributed stack (PostgreSQL, Kafka, S3).
    distributed: bool,
    /// The ceiling's store: fileflow's own client for the same place.
    store: Arc<dyn ObjectStore>,
    rclone: RcloneTarget,
}

struct Bench {
    origin: origin::Origin,
    scratch: tempfile::TempDir,
    s3: Option<S3>,
    distributed: Option<Distributed>,
    notes: Vec<String>,
}

impl Bench {
    fn url(&self, path: String) -> impl Fn(usize) -> String + Send + Sync + 'static {
        let base = self.origin.url("");
        move |n| format!("{base}{}", path.replace("{n}", &n.to_string()))
    }

    fn dir(&self, name: &str) -> std::path::PathBuf {
        let dir = self.scratch.path().join(name);
        std::fs::create_dir_all(&dir).expect("the scratch directory is writable");
        dir
    }

    /// The local disk store, for a part of the run: fileflow's own (in its data directory),
    /// and `<part>-ceiling-disk` and `<part>-rclone-disk` for the baselines.
    fn disk_target(&self, part: &str) -> Target {
        let ceiling = self.dir(&format!("{part}-ceiling-disk"));
        Target {
            name: "disk",
            env: Vec::new(),
            distributed: false,
            store: Arc::new(LocalStore::new(&ceiling).expect("a local store opens")),
            rclone: RcloneTarget::Dir(self.dir(&format!("{part}-rclone-disk"))),
        }
    }

    async fn accept(&mut self) -> Table {
        let mut table = Table::new(
            "Accept: POST /api/v1/upload",
            "A `fileflow api` process (no workers, so only accepting is measured) under closed-loop load from \
             the benchmark process: each client sends its next job as soon as the last is answered. 3 s warm-up, \
             then 10 s measured. Latency is from sending the request to reading the whole 202 answer.",
            &["stack", "clients", "accepted/s", "p50 ms", "p99 ms", "max ms", "errors"],
        );
        let mut stacks = vec![
            ("embedded (SQLite, durability power-loss: synchronous=FULL, the default)", Vec::new()),
            (
                "embedded (SQLite, durability process-crash: synchronous=NORMAL)",
                vec![("FILEFLOW_SQLITE_DURABILITY".to_owned(), "process-crash".to_owned())],
            ),
        ];
        match &self.distributed {
            Some(d) => stacks.push(("distributed (PostgreSQL + Kafka outbox)", d.fresh_stack(8, false).await.0)),
            None => self.notes.push("accept, distributed: not run (no FILEFLOW_TEST_POSTGRES/KAFKA/S3_*)".into()),
        }
        for (name, stack_env) in stacks {
            let data = self.dir(&services::unique("accept"));
            let api = Fileflow::start("api", &data, &stack_env).await;
            for clients in [1, 8, 32] {
                let request = load::upload(&api.base, "bench-accept", self.url("/file/16384?seed={n}".into()));
                let latencies =
                    load::closed_loop(clients, Duration::from_secs(3), Duration::from_secs(10), request).await;
                table.row(vec![
                    name.into(),
                    clients.to_string(),
                    format!("{:.0}", latencies.per_sec()),
                    f2(latencies.quantile_ms(0.50)),
                    f2(latencies.quantile_ms(0.99)),
                    f2(latencies.max_ms()),
                    latencies.errors.to_string(),
                ]);
            }
            api.stop().await;
        }
        table
    }

    /// Run `jobs` jobs through one fileflow process; returns (seconds from the first
    /// accept to the last completion, completed, failed, peak RSS MiB, CPU seconds the
    /// process used from its start to the last completion).
    async fn fileflow_run(
        &self,
        role_env: &[(String, String)],
        database: Option<&str>,
        jobs: usize,
        bucket: &str,
        path: String,
    ) -> (f64, i64, i64, f64, f64) {
        self.fileflow_run_urls(role_env, database, jobs, bucket, self.url(path), None).await.0
    }

    /// [`Bench::fileflow_run`] with the jobs' URLs from `file_url` (any origin). With
    /// `sha256`, every completed job's recorded digest and its stored object's bytes are
    /// checked against it; the second value says what was wrong, if anything.
    async fn fileflow_run_urls(
        &self,
        role_env: &[(String, String)],
        database: Option<&str>,
        jobs: usize,
        bucket: &str,
        file_url: impl Fn(usize) -> String + Send + Sync + 'static,
        sha256: Option<&str>,
    ) -> ((f64, i64, i64, f64, f64), Option<String>) {
        let data = self.dir(&services::unique("run"));
        let serve = Fileflow::start("serve", &data, role_env).await;
        let db = match database {
            Some(url) => {
                // Measure the work, not the worker joining its consumer group.
                process::wait_for_group(std::slice::from_ref(&serve), 2 * PIPELINE_PARTITIONS).await;
                JobsDb::postgres(url).await
            }
            None => JobsDb::sqlite(&data).await,
        };
        let started = now_ms();
        load::submit_all(&serve.base, SUBMITTERS, jobs, bucket, file_url).await;
        let progress = db.wait_for(jobs, Duration::from_secs(1800)).await;
        let secs = (progress.last_update_ms - started) as f64 / 1000.0;
        let (rss, cpu) = (serve.peak_rss_mib(), serve.cpu_seconds());
        serve.stop().await;
        let wrong = match sha256 {
            Some(sha256) => self.wrong_bytes(&db, role_env, &data, sha256).await,
            None => None,
        };
        // What it stored is not needed again (and large files would fill the disk).
        let _ = std::fs::remove_dir_all(&data);
        ((secs, progress.completed, progress.failed, rss, cpu), wrong)
    }

    /// What differs from `sha256` among a run's completed jobs: the digest each recorded,
    /// then the bytes of the object it stored, read back from the run's store (its S3
    /// bucket, or the disk store in `data`).
    async fn wrong_bytes(
        &self,
        db: &JobsDb,
        role_env: &[(String, String)],
        data: &Path,
        sha256: &str,
    ) -> Option<String> {
        let on_s3 = role_env.iter().any(|(k, v)| k == "FILEFLOW_STORAGE" && v == "s3");
        let store: Arc<dyn ObjectStore> = match &self.s3 {
            Some(s3) if on_s3 => Arc::new(s3.store()),
            _ => Arc::new(LocalStore::new(&data.join("objects")).expect("the run's disk store opens")),
        };
        let digests = db.completed_digests().await;
        if digests.is_empty() {
            return Some("no completed job to check".into());
        }
        for (bucket, key, recorded) in digests {
            if recorded.as_deref() != Some(sha256) {
                return Some(format!("{bucket}/{key}: the job recorded sha256 {recorded:?}"));
            }
            match check::stored_sha256(store.as_ref(), &bucket, &key).await {
                Ok(stored) if stored == sha256 => {}
                Ok(stored) => return Some(format!("{bucket}/{key}: the stored object's sha256 is {stored}")),
                Err(why) => return Some(format!("{bucket}/{key}: the stored object cannot be read: {why}")),
            }
        }
        None
    }

    async fn pipeline(&mut self) -> Table {
        let jobs = env_number("FILEFLOW_BENCH_JOBS", 5000) as usize;
        let rclone_files = env_number("FILEFLOW_BENCH_RCLONE_FILES", 400) as usize;
        let rounds = env_number("FILEFLOW_BENCH_ROUNDS", 3).max(1) as usize;
        let mut table = Table::new(
            &format!("Pipeline: {jobs} jobs of 16 KiB"),
            &format!(
                "Every job is a distinct 16 KiB file from a local origin. fileflow: one `fileflow serve` process \
                 (defaults: 64 slots, {CONCURRENCY} per origin host; one row with the previous default of \
                 {CONCURRENCY} slots), jobs submitted by {SUBMITTERS} clients; time from the first \
                 accept to the last completion (for the distributed stack, once its worker holds its partitions). \
                 fileflow and the ceiling take {rounds} turns each; the median and range of the turns are shown. Ceiling: the same jobs as a bare GET→PUT loop through fileflow's own \
                 HTTP client and store, {CONCURRENCY} at a time. rclone: `rclone copyurl`, one process per file, \
                 {CONCURRENCY} at a time, over the first {rclone_files} files; and `rclone copy --http-url ORIGIN \
                 :http: DEST --files-from LIST --no-traverse --transfers {CONCURRENCY}`, one process for all {jobs} \
                 files (rclone's HTTP backend asks each file's length with a HEAD, then GETs it; the same 16 KiB \
                 files at paths without a query string, which that backend cannot send), the files' count and \
                 bytes checked after with `rclone size`. Ratios compare files per second."
            ),
            &[
                "store",
                "runner",
                "files",
                "files/s (median)",
                "files/s (range)",
                "MiB/s",
                "fileflow ÷ this",
                "peak RSS MiB",
                "CPU µs per job",
            ],
        );
        let mut disk = self.disk_target("pipeline");
        disk.name = "disk (durability power-loss: synchronous=FULL, the default)";
        let mut targets = vec![disk];
        // The previous default, side by side: many slots must not cost small files throughput.
        let mut eight = self.disk_target("pipeline-eight");
        eight.name = "disk, --worker-concurrency 8 (the previous default)";
        eight.env.push(("FILEFLOW_WORKER_CONCURRENCY".into(), CONCURRENCY.to_string()));
        targets.push(eight);
        // The same with the embedded database synced only at checkpoints: what durability
        // against power loss (the default) costs.
        let mut relaxed = self.disk_target("pipeline-relaxed");
        relaxed.name = "disk, durability process-crash (synchronous=NORMAL)";
        relaxed.env.push(("FILEFLOW_SQLITE_DURABILITY".into(), "process-crash".into()));
        targets.push(relaxed);
        match &self.s3 {
            Some(s3) => {
                // The first ceiling turn creates this bucket.
                let rclone = RcloneTarget::S3 { env: s3.rclone_env(), bucket: "bench-ceiling0".into() };
                targets.push(Target {
                    name: "S3 (Garage), embedded stack",
                    env: s3.env(),
                    distributed: false,
                    store: Arc::new(s3.store()),
                    rclone: rclone.clone(),
                });
                if self.distributed.is_some() {
                    targets.push(Target {
                        name: "S3 (Garage), distributed stack",
                        env: Vec::new(),
                        distributed: true,
                        store: Arc::new(s3.store()),
                        rclone,
                    });
                }
            }
            None => self.notes.push("pipeline into S3: not run (no FILEFLOW_TEST_S3_*)".into()),
        }
        // For a closer look at one row: only the stores whose names hold this text.
        if let Ok(only) = std::env::var("FILEFLOW_BENCH_PIPELINE_ONLY") {
            targets.retain(|t| t.name.contains(only.as_str()));
        }
        let rclone_ok = baselines::rclone_installed();
        if !rclone_ok {
            self.notes.push("rclone is not installed: its rows are missing".into());
        }
        let path = "/file/16384?seed={n}".to_owned();
        for Target { name, env: mut stack_env, distributed, store, rclone } in targets {
            // fileflow and the ceiling take turns, so a slow spell of the machine hits both.
            let (mut runs, mut ceilings, mut peak_rss, mut cpu) = (Vec::new(), Vec::new(), 0f64, Vec::new());
            for round in 0..rounds {
                // Every turn starts from an empty database, topic and group.
                let mut database = None;
                if let (true, Some(d)) = (distributed, &self.distributed) {
                    let (fresh_env, url) = d.fresh_stack(PIPELINE_PARTITIONS as u32, true).await;
                    (stack_env, database) = (fresh_env, Some(url));
                }
                let bucket = services::unique("bench-pipeline");
                let (secs, completed, failed, rss, cpu_secs) =
                    self.fileflow_run(&stack_env, database.as_deref(), jobs, &bucket, path.clone()).await;
                cpu.push(cpu_secs * 1e6 / jobs as f64);
                if failed > 0 || completed < jobs as i64 {
                    self.notes.push(format!("pipeline, {name}: {completed} completed, {failed} failed of {jobs}"));
                }
                runs.push(secs);
                peak_rss = peak_rss.max(rss);
                let bucket = format!("bench-ceiling{round}");
                let url = self.url(path.clone());
                ceilings.push(baselines::ceiling(store.clone(), &bucket, jobs, CONCURRENCY, url).await);
            }
            let rate = jobs as f64 / median(&mut runs);
            let ceiling_rate = jobs as f64 / median(&mut ceilings);
            let range =
                |secs: &[f64]| format!("{:.0}–{:.0}", jobs as f64 / secs[secs.len() - 1], jobs as f64 / secs[0]);
            let mib = |rate: f64| f1(SMALL as f64 / MIB * rate);
            table.row(vec![
                name.into(),
                "fileflow".into(),
                jobs.to_string(),
                format!("{rate:.0}"),
                range(&runs),
                mib(rate),
                "1.00".into(),
                f1(peak_rss),
                format!("{:.0}", median(&mut cpu)),
            ]);
            table.row(vec![
                name.into(),
                "ceiling: bare GET→PUT".into(),
                jobs.to_string(),
                format!("{ceiling_rate:.0}"),
                range(&ceilings),
                mib(ceiling_rate),
                f2(rate / ceiling_rate),
                "-".into(),
                "-".into(),
            ]);
            if rclone_ok {
                let secs = baselines::rclone(rclone.clone(), rclone_files, CONCURRENCY, self.url(path.clone())).await;
                let rclone_rate = rclone_files as f64 / secs;
                table.row(vec![
                    name.into(),
                    "rclone copyurl".into(),
                    rclone_files.to_string(),
                    format!("{rclone_rate:.1}"),
                    "-".into(),
                    mib(rclone_rate),
                    f2(rate / rclone_rate),
                    "-".into(),
                    "-".into(),
                ]);
                if let Some(copy_rate) = self.rclone_copy(name, &rclone, jobs).await {
                    table.row(vec![
                        name.into(),
                        format!("rclone copy --files-from --transfers {CONCURRENCY}"),
                        jobs.to_string(),
                        format!("{copy_rate:.0}"),
                        "-".into(),
                        mib(copy_rate),
                        f2(rate / copy_rate),
                        "-".into(),
                        "-".into(),
                    ]);
                }
            }
        }
        table
    }

    /// `files` small files copied by one `rclone copy` from the origin (rclone's HTTP
    /// backend) into `target`, then counted there; files a second, or `None` with a note.
    async fn rclone_copy(&mut self, store: &str, target: &RcloneTarget, files: usize) -> Option<f64> {
        // rclone's HTTP backend names files by path alone (a query string would be escaped
        // into the path), so the files are `/flaky/{name}/0/16384`: the origin's 16 KiB file,
        // never failing, at a distinct path each.
        let list = self.dir("pipeline-rclone-lists").join(format!("{files}.txt"));
        let paths: String = (0..files).map(|n| format!("flaky/c{n:06}/0/{SMALL}\n")).collect();
        std::fs::write(&list, paths).expect("the scratch directory is writable");
        let sub = services::unique("copy");
        let copied = baselines::rclone_copy(target, &self.origin.url("/"), &list, &sub, CONCURRENCY).await;
        let counted = match copied {
            Ok(secs) => target.size(&sub).await.map(|counted| (secs, counted)),
            Err(why) => Err(why),
        };
        target.purge(&sub).await;
        let want = (files as u64, files as u64 * SMALL);
        let why = match counted {
            Ok((secs, got)) if got == want => return Some(files as f64 / secs),
            Ok((_, (count, bytes))) => format!("copied {count} files of {bytes} bytes, not {} of {}", want.0, want.1),
            Err(why) => why,
        };
        self.notes.push(format!("pipeline, {store}, rclone copy: {why}"));
        None
    }

    async fn scale(&mut self) -> Table {
        const PARTITIONS: u64 = 8;
        const DELAY_MS: u64 = 20;
        // Low enough that four workers' bookkeeping fits this machine's two cores, so
        // what is measured is how the group spreads the waiting.
        const SCALE_CONCURRENCY: usize = 2;
        let per_worker = env_number("FILEFLOW_BENCH_SCALE_JOBS", 600) as usize;
        // On two cores Garage's own CPU per PUT, not the group, limits four workers; the
        // local disk store leaves the machine to the workers. FILEFLOW_BENCH_SCALE_STORE=s3
        // measures with Garage.
        let on_s3 = std::env::var("FILEFLOW_BENCH_SCALE_STORE").is_ok_and(|v| v == "s3");
        let store = if on_s3 { "S3 (Garage)" } else { "the local disk store" };
        let mut table = Table::new(
            "Scale-out: workers in one consumer group",
            &format!(
                "Distributed stack: PostgreSQL, Kafka with {PARTITIONS} partitions, {store}. One `fileflow api` process \
                 and 1, 2 or 4 `fileflow worker` processes of concurrency {SCALE_CONCURRENCY} each; the origin waits \
                 {DELAY_MS} ms before every 16 KiB answer, so the work is waiting, not CPU. {per_worker} jobs per \
                 worker, submitted once the group has settled; time from the first accept to the last completion. \
                 The bound is workers × {SCALE_CONCURRENCY} / {DELAY_MS} ms."
            ),
            &["workers", "jobs", "seconds", "jobs/s", "× one worker", "bound jobs/s", "of bound"],
        );
        let Some(d) = self.distributed.clone() else {
            self.notes.push("scale-out: not run (no FILEFLOW_TEST_POSTGRES/KAFKA/S3_*)".into());
            return table;
        };
        let mut one = None;
        for workers in [1usize, 2, 4] {
            let jobs = per_worker * workers;
            let (mut stack_env, database) = d.fresh_stack(PARTITIONS as u32, on_s3).await;
            stack_env.push(("FILEFLOW_WORKER_CONCURRENCY".into(), SCALE_CONCURRENCY.to_string()));
            // One data directory for all, as processes sharing a machine's disk store do.
            let data = self.dir(&services::unique("scale"));
            let api = Fileflow::start("api", &data, &stack_env).await;
            let mut group = Vec::new();
            for _ in 0..workers {
                group.push(Fileflow::start("worker", &data, &stack_env).await);
            }
            // The group consumes the job topic and its retry topic.
            process::wait_for_group(&group, 2 * PARTITIONS).await;
            let db = JobsDb::postgres(&database).await;
            let started = now_ms();
            let path = format!("/delay/{DELAY_MS}/16384?seed={{n}}");
            load::submit_all(&api.base, SUBMITTERS, jobs, "bench-scale", self.url(path)).await;
            let progress = db.wait_for(jobs, Duration::from_secs(1800)).await;
            let secs = (progress.last_update_ms - started) as f64 / 1000.0;
            let rate = progress.completed as f64 / secs;
            if progress.completed < jobs as i64 {
                self.notes.push(format!("scale-out, {workers} workers: {} of {jobs} completed", progress.completed));
            }
            let base_rate = *one.get_or_insert(rate);
            let bound = (workers * SCALE_CONCURRENCY) as f64 * 1000.0 / DELAY_MS as f64;
            table.row(vec![
                workers.to_string(),
                jobs.to_string(),
                f2(secs),
                format!("{rate:.0}"),
                f2(rate / base_rate),
                format!("{bound:.0}"),
                format!("{:.0}%", 100.0 * rate / bound),
            ]);
            for worker in group {
                worker.stop().await;
            }
            api.stop().await;
        }
        table
    }

    async fn resume(&mut self) -> Table {
        let size = env_number("FILEFLOW_BENCH_LARGE_BYTES", 2 << 30);
        let cut = size / 10 * 9;
        let mib = size as f64 / MIB;
        let mut table = Table::new(
            &format!("Resume: {mib:.0} MiB cut at 90 %"),
            "One file from the local origin, whose first answer breaks the connection after 90 % of the body; \
             the job's next attempt fetches it again. fileflow: one `fileflow serve` process (embedded stack, \
             default settings), time from the accept to the completion. With resume, the origin names the file's \
             version (a strong ETag) and answers ranges; without, it names no version, so the next attempt starts \
             over. Bytes fetched: what the origin sent, over the file's size; fetched twice: what was sent beyond \
             the file's size.",
            &["store", "transfer", "seconds", "bytes fetched ÷ size", "fetched twice MiB", "next attempt asked for"],
        );
        let mut targets = vec![("disk", Vec::new())];
        match &self.s3 {
            Some(s3) => targets.push(("S3 (Garage)", s3.env())),
            None => self.notes.push("resume into S3: not run (no FILEFLOW_TEST_S3_*)".into()),
        }
        for (store, env) in targets {
            for (transfer, validator) in [("resumed", "etag"), ("started over", "none")] {
                let name = services::unique("resume");
                let path = format!("/resumable/{name}/{size}?seed={{n}}&cut={cut}&validator={validator}");
                let (secs, completed, ..) = self.fileflow_run(&env, None, 1, "bench-resume", path).await;
                if completed != 1 {
                    self.notes.push(format!("resume, {store}, {transfer}: the job did not complete"));
                }
                let sent = self.origin.bytes_sent(&name);
                let asked = self.origin.ranges_asked(&name).get(1).cloned().unwrap_or_default();
                table.row(vec![
                    store.into(),
                    transfer.into(),
                    f2(secs),
                    f2(sent as f64 / size as f64),
                    f1(sent.saturating_sub(size) as f64 / MIB),
                    if asked.is_empty() { "the whole file".into() } else { asked },
                ]);
            }
        }
        table
    }

    async fn large(&mut self) -> Table {
        let size = env_number("FILEFLOW_BENCH_LARGE_BYTES", 2 << 30);
        let mib = size as f64 / MIB;
        let mut table = Table::new(
            &format!("Large file: {mib:.0} MiB"),
            "One file from the local origin. fileflow: one `fileflow serve` process (embedded stack), time from \
             the accept to the completion, and the process's peak resident memory (VmHWM) over its whole life; \
             once from an origin that sends an ETag (stored resumably, part by part, as from most origins), once \
             from one that names no version. Ceiling: one streamed GET→PUT through fileflow's own HTTP client and \
             store. rclone: `rclone copyurl`. The runners take turns, three times; medians, and the range of \
             MiB/s. Ratios: the first fileflow row's speed over this row's. CPU: the fileflow process's and \
             Garage's, per run.",
            &[
                "store",
                "runner",
                "seconds",
                "MiB/s",
                "MiB/s (range)",
                "fileflow ÷ this",
                "peak RSS MiB",
                "fileflow CPU s",
                "Garage CPU s",
            ],
        );
        let path = format!("/file/{size}?seed={{n}}");
        let disk = self.dir("large-ceiling-disk");
        let rclone_disk = self.dir("large-rclone-disk");
        let mut targets = vec![self.disk_target("large")];
        if let Some(s3) = &self.s3 {
            let rclone = RcloneTarget::S3 { env: s3.rclone_env(), bucket: "bench-ceiling".into() };
            targets.push(Target {
                name: "S3 (Garage)",
                env: s3.env(),
                distributed: false,
                store: Arc::new(s3.store()),
                rclone,
            });
        } else {
            self.notes.push("large file into S3: not run (no FILEFLOW_TEST_S3_*)".into());
        }
        let rounds = env_number("FILEFLOW_BENCH_ROUNDS", 3).max(1) as usize;
        let rclone_ok = baselines::rclone_installed();
        for Target { name, env: stack_env, store, rclone, .. } in targets {
            // Most origins name a file's version (ETag, Last-Modified), which makes fileflow
            // store it resumably, part by part; an origin that names none is stored in one go.
            // The runners take turns, `rounds` times, so a slow spell of the machine hits all.
            let runners = [
                "fileflow (origin sends an ETag)",
                "fileflow (origin names no version)",
                "ceiling: bare GET→PUT",
                "rclone copyurl",
            ];
            let mut runs: Vec<Vec<(f64, f64, f64, f64)>> = vec![Vec::new(); runners.len()];
            for _ in 0..rounds {
                for (r, runner) in runners.iter().enumerate() {
                    let garage = costs::cpu_of("garage");
                    let (secs, rss, cpu) = match r {
                        0 | 1 => {
                            let file = match r {
                                0 => format!("/resumable/{}/{size}?seed={{n}}", services::unique("large")),
                                _ => path.clone(),
                            };
                            let (secs, completed, _, rss, cpu) =
                                self.fileflow_run(&stack_env, None, 1, "bench-large", file).await;
                            if completed != 1 {
                                self.notes.push(format!("large file, {name}, {runner}: the job did not complete"));
                            }
                            (secs, rss, cpu)
                        }
                        2 => {
                            let url = self.url(path.clone());
                            (baselines::ceiling(store.clone(), "bench-ceiling", 1, 1, url).await, 0.0, 0.0)
                        }
                        _ if rclone_ok => {
                            (baselines::rclone(rclone.clone(), 1, 1, self.url(path.clone())).await, 0.0, 0.0)
                        }
                        _ => continue,
                    };
                    runs[r].push((secs, rss, cpu, costs::cpu_of("garage") - garage));
                    // Free the disk for the next run.
                    for dir in [&disk, &rclone_disk] {
                        let _ = std::fs::remove_dir_all(dir);
                        std::fs::create_dir_all(dir).expect("the scratch directory is writable");
                    }
                }
            }
            let medians: Vec<Option<[f64; 4]>> = runs
                .iter()
                .map(|runs| {
                    (!runs.is_empty()).then(|| {
                        let column = |pick: fn(&(f64, f64, f64, f64)) -> f64| {
                            median(&mut runs.iter().map(pick).collect::<Vec<_>>())
                        };
                        [column(|r| r.0), column(|r| r.1), column(|r| r.2), column(|r| r.3)]
                    })
                })
                .collect();
            let first = medians[0].map_or(f64::NAN, |m| m[0]);
            for (runner, median) in runners.iter().zip(&medians) {
                let Some([secs, rss, cpu, garage]) = *median else { continue };
                let fileflow = runner.starts_with("fileflow");
                let range = {
                    let r = &runs[runners.iter().position(|x| x == runner).expect("a runner")];
                    let (lo, hi) = r.iter().fold((f64::MAX, 0f64), |(lo, hi), x| (lo.min(x.0), hi.max(x.0)));
                    format!("{:.0}–{:.0}", mib / hi, mib / lo)
                };
                table.row(vec![
                    name.into(),
                    (*runner).into(),
                    f2(secs),
                    f1(mib / secs),
                    range,
                    f2(secs / first),
                    if fileflow { f1(rss) } else { "-".into() },
                    if fileflow { f1(cpu) } else { "-".into() },
                    if name.starts_with("S3") { f1(garage) } else { "-".into() },
                ]);
            }
        }
        table
    }
}

#[tokio::main]
async fn main() {
    let scratch_root = std::env::var("FILEFLOW_BENCH_DIR").unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").to_owned());
    std::fs::create_dir_all(&scratch_root).expect("the scratch root is writable");
    let mut bench = Bench {
        origin: origin::Origin::start().await,
        scratch: tempfile::tempdir_in(&scratch_root).expect("a scratch directory"),
        s3: S3::from_env(),
        distributed: Distributed::from_env(),
        notes: Vec::new(),
    };
    let context = report::context();
    println!("{context}");
    let mut tables = Vec::new();
    for (part, title) in [
        ("accept", "accept"),
        ("busy", "accept while the workers run"),
        ("flood", "accept while another address floods"),
        ("pipeline", "pipeline"),
        ("scale", "scale-out"),
        ("large", "large file"),
        ("resume", "resume"),
        ("segments", "segmented download"),
        ("growth", "cost as the jobs pile up"),
        ("costs", "per job, on the distributed stack"),
        ("fair", "fair share"),
        ("memory", "memory at full load"),
        ("manifest", "a large manifest read into jobs"),
        ("slots", "CPU per job by worker slots"),
    ] {
        if !wanted(part) {
            continue;
        }
        println!("== {title}");
        let table = match part {
            "accept" => bench.accept().await,
            "busy" => bench.busy().await,
            "flood" => bench.flood().await,
            "growth" | "costs" | "fair" => {
                let (first, second) = match part {
                    "growth" => bench.growth().await,
                    "costs" => bench.costs().await,
                    _ => bench.fair().await,
                };
                println!("\n{}", first.markdown());
                tables.push(first);
                second
            }
            "pipeline" => bench.pipeline().await,
            "scale" => bench.scale().await,
            "resume" => bench.resume().await,
            "segments" => bench.segments().await,
            "memory" => bench.memory().await,
            "manifest" => bench.manifest().await,
            "slots" => bench.slots().await,
            _ => bench.large().await,
        };
        println!("\n{}", table.markdown());
        tables.push(table);
    }
    for note in &bench.notes {
        println!("note: {note}");
    }
    if let Ok(path) = std::env::var("FILEFLOW_BENCH_REPORT") {
        report::write(Path::new(&path), &context, &tables, &bench.notes).expect("the report is written");
        println!("written to {path}");
    }
}
