//! The chaos suite: the distributed stack (an API and two workers on PostgreSQL, Kafka and
//! S3) under faults, each alone and then mixed, and the embedded default under kill -9.
//!
//! Every scenario keeps a history of what the clients were told (every id answered 202),
//! lets the faults end, waits for the jobs to settle, and a checker counts from outside:
//! - lost: an accepted id the record does not know;
//! - stuck: a job still unfinished when the checker gives up waiting;
//! - slow: a job unfinished, after the faults ended, for longer than lease + sweep + grace,
//!   plus an allowance for the Kafka group to recover and the time the jobs left over by
//!   the faults take at one worker's concurrency; each job's time is printed;
//! - failed: jobs that gave up (none should: the faults are all transient);
//! - wrong bytes: a completed job whose stored object differs from its record (size,
//!   SHA-256) or from what the origin served;
//! - duplicates: two job rows for one submission, an object at a key no client sent, a
//!   job whose completion was logged twice;
//! - duplicate transfers (reported, allowed): fetches from the origin beyond the attempts
//!   the record counts (delivery is at-least-once, and a killed or frozen worker's attempt
//!   is not an attempt the record knows of).
//!
//! And no fileflow process may end but by the test's own kill -9: a crash (SIGSEGV, a
//! panic's abort) fails the scenario; nothing is restarted behind the test's back.
//!
//! `FILEFLOW_CHAOS_ROUNDS` sets how many rounds of faults each scenario runs (default 2; a
//! soak: `FILEFLOW_CHAOS_ROUNDS=20 ./scripts/test`).

#[path = "support/faulty_s3.rs"]
mod faulty_s3;

#[path = "support/origin.rs"]
mod origin;

#[path = "support/process.rs"]
mod process;

#[path = "support/services.rs"]
mod services;

use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::TryStreamExt as _;
use object_store::ObjectStoreExt as _;
use serde_json::{Value, json};
use sha2::Digest as _;
use tokio::process::{Child, Command};

use faulty_s3::FaultyS3;
use origin::{Origin, content};
use process::{Fileflow, start_role};

/// The lease, sweep interval and grace period the processes run with: a job is never idle
/// longer than their sum once the faults end.
const LEASE: &str = "2s";
const SWEEP: &str = "1s";
const GRACE: &str = "3s";
/// How long after the faults end every job must be finished.
const SETTLE_WITHIN: Duration = Duration::from_secs(90);

fn rounds() -> usize {
    std::env::var("FILEFLOW_CHAOS_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2)
}

/// Scenarios that crash the chaos PostgreSQL take turns with each other.
static CHAOS_PG: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------- the servers it breaks

/// A memory-only Kafka broker of the scenario's own: restarting it loses every message,
/// topic and committed offset, as a broker that lost its disk.
struct Broker {
    bin: String,
    port: u16,
    child: Child,
}

impl Broker {
    async fn start() -> Option<Self> {
        let bin = services::service("FILEFLOW_TEST_TANSU_BIN")?;
        // Below the ephemeral range: while the broker is down for a restart, no outgoing
        // connection or port-0 listener of the suite can take its port.
        let port = loop {
            let port = 20_000 + rand::random::<u16>() % 12_000;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                break port;
            }
        };
        let child = Self::spawn(&bin, port).await;
        Some(Self { bin, port, child })
    }

    async fn spawn(bin: &str, port: u16) -> Child {
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("tansu starts");
        let mut child = child;
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {port}");
            assert!(child.try_wait().unwrap().is_none(), "tansu exited: is port {port} taken?");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        child
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// kill -9, then start again on the same port with nothing in it.
    async fn restart_empty(&mut self) {
        self.child.kill().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.child = Self::spawn(&self.bin, self.port).await;
    }
}

/// The PostgreSQL that scenarios crash (`pg_ctl stop -m immediate`: no checkpoint, no
/// goodbye to clients) and start again.
struct ChaosPostgres {
    admin: String,
    pgdata: String,
    log: String,
    bindir: String,
}

impl ChaosPostgres {
    fn find() -> Option<Self> {
        Some(Self {
            admin: services::service("FILEFLOW_TEST_CHAOS_POSTGRES")?,
            pgdata: services::service("FILEFLOW_TEST_CHAOS_PGDATA")?,
            log: services::service("FILEFLOW_TEST_CHAOS_PGLOG")?,
            bindir: services::service("FILEFLOW_TEST_PG_BINDIR")?,
        })
    }

    async fn fresh_database(&self) -> String {
        let name = services::unique("chaos");
        let pool = sqlx::PgPool::connect(&self.admin).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&pool).await.unwrap();
        pool.close().await;
        format!("{}/{name}", self.admin.rsplit_once('/').unwrap().0)
    }

    async fn pg_ctl(&self, args: &[&str]) {
        let pg_ctl = format!("{}/pg_ctl", self.bindir);
        let status = Command::new("runuser")
            .args(["-u", "postgres", "--", &pg_ctl, "-D", &self.pgdata])
            .args(args)
            .stdout(Stdio::null())
            .status()
            .await
            .unwrap();
        assert!(status.success(), "pg_ctl {args:?}");
    }

    /// Start the server unless it runs (a scenario that failed may have left it down).
    async fn ensure_running(&self) {
        let pg_ctl = format!("{}/pg_ctl", self.bindir);
        let status = Command::new("runuser")
            .args(["-u", "postgres", "--", &pg_ctl, "-D", &self.pgdata, "status"])
            .stdout(Stdio::null())
            .status()
            .await
            .unwrap();
        if !status.success() {
            self.start().await;
        }
    }

    async fn crash(&self) {
        self.pg_ctl(&["-m", "immediate", "stop"]).await;
    }

    async fn start(&self) {
        self.pg_ctl(&["-l", &self.log, "-w", "-t", "60", "start"]).await;
    }
}

// ---------------------------------------------------------------- the system under test

/// An API and workers as real processes; killed ones are kept for their logs.
struct Cluster {
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
    api: Fileflow,
    /// Where clients send jobs: the API's base URL, or `None` while it is down.
    api_base: Arc<Mutex<Option<String>>>,
    workers: Vec<Fileflow>,
    gone: Vec<Fileflow>,
    /// Processes that ended without the test ending them (a crash, a panic, an exit).
    deaths: Vec<String>,
}

impl Cluster {
    async fn start(env: Vec<(String, String)>, workers: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let api = Self::spawn("api", &dir, &env).await;
        let mut started = Vec::new();
        for _ in 0..workers {
            started.push(Self::spawn("worker", &dir, &env).await);
        }
        let api_base = Arc::new(Mutex::new(Some(api.base.clone())));
        Self { env, dir, api, api_base, workers: started, gone: Vec::new(), deaths: Vec::new() }
    }

    async fn spawn(role: &str, dir: &tempfile::TempDir, env: &[(String, String)]) -> Fileflow {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        start_role(role, dir.path(), &env).await
    }

    /// kill -9 `process`, noting it as a death if it had already ended on its own (or ended
    /// of anything but the test's SIGKILL).
    async fn end(deaths: &mut Vec<String>, role: &str, process: &mut Fileflow) {
        let before = process.child.try_wait().unwrap();
        let status = process.kill().await;
        if before.is_some() || status.signal() != Some(SIGKILL) {
            deaths.push(describe_death(role, process, status));
        }
    }

    async fn kill_api(&mut self) {
        *self.api_base.lock().unwrap() = None;
        Self::end(&mut self.deaths, "api", &mut self.api).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.restart_api().await;
    }

    async fn restart_api(&mut self) {
        *self.api_base.lock().unwrap() = None;
        let fresh = Self::spawn("api", &self.dir, &self.env).await;
        let dead = std::mem::replace(&mut self.api, fresh);
        self.gone.push(dead);
        *self.api_base.lock().unwrap() = Some(self.api.base.clone());
    }

    /// Wait (up to 20 s) until worker `i` is in the middle of a transfer, so a fault lands
    /// on work under way rather than on an idle process.
    async fn until_transferring(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let transferring = {
                let events = self.workers[i].events.lock().unwrap();
                let count = |message: &str| events.iter().filter(|e| e["message"] == message).count();
                count("job started")
                    > count("job completed") + count("job attempt failed; retry scheduled") + count("job failed")
            };
            if transferring {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// kill -9 worker `i` in the middle of a transfer, and start another in its place.
    async fn kill_worker(&mut self, i: usize) {
        self.until_transferring(i).await;
        Self::end(&mut self.deaths, &format!("worker {i}"), &mut self.workers[i]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let fresh = Self::spawn("worker", &self.dir, &self.env).await;
        let dead = std::mem::replace(&mut self.workers[i], fresh);
        self.gone.push(dead);
    }

    /// Every process that ended without the test ending it, during the scenario or now.
    /// None is restarted: a harness that restarts a crashed process hides the crash.
    fn unexpected_deaths(&mut self) -> Vec<String> {
        let mut deaths = std::mem::take(&mut self.deaths);
        let running = std::iter::once(("api".to_owned(), &mut self.api))
            .chain(self.workers.iter_mut().enumerate().map(|(i, w)| (format!("worker {i}"), w)));
        for (role, process) in running {
            if let Some(status) = process.child.try_wait().unwrap() {
                deaths.push(describe_death(&role, process, status));
            }
        }
        deaths
    }

    /// The last log events of the processes still running, for a failed scenario.
    fn print_recent_logs(&self) {
        for (role, process) in std::iter::once(("api", &self.api)).chain(self.workers.iter().map(|w| ("worker", w))) {
            let events = process.events.lock().unwrap();
            let quiet = |e: &&Value| e["level"] != "DEBUG" && e["message"] != "request";
            let recent: Vec<_> = events.iter().filter(quiet).rev().take(12).collect();
            for event in recent.into_iter().rev() {
                eprintln!("  {role} {}: {event}", process.base);
            }
        }
    }

    /// Completions each job's id was logged with, over every process that ever ran.
    fn completions(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for process in self.gone.iter().chain(self.workers.iter()).chain(std::iter::once(&self.api)) {
            for id in process.completed_ids() {
                *counts.entry(id).or_default() += 1;
            }
        }
        counts
    }
}

/// SIGKILL's number: the only signal that may end a process here (the test sends it).
const SIGKILL: i32 = 9;

/// How a process ended, with its last log lines, for the failure message.
fn describe_death(role: &str, process: &Fileflow, status: std::process::ExitStatus) -> String {
    let how = match (status.signal(), status.core_dumped()) {
        (Some(signal), true) => format!("killed by signal {signal} (core dumped)"),
        (Some(signal), false) => format!("killed by signal {signal}"),
        (None, _) => format!("exited on its own ({status})"),
    };
    let events = process.events.lock().unwrap();
    let last: Vec<String> = events.iter().rev().take(5).map(|e| e.to_string()).collect();
    format!("{role} {} {how}; its last log lines, newest first: {last:?}", process.base)
}

// ---------------------------------------------------------------- history and checker

/// What the origin served for an accepted job.
#[derive(Clone, Debug)]
enum Served {
    File {
        seed: u64,
        size: u64,
    },
    /// A file the origin replaced during the job: any of its versions is right, as long as
    /// the record describes the stored one.
    Replaced,
}

#[derive(Clone, Debug)]
struct Accepted {
    id: String,
    /// The origin path it was fetched from.
    path: String,
    key: String,
    served: Served,
    /// When the 202 came.
    at: DateTime<Utc>,
}

/// What the clients were told: every job accepted, and every key sent (accepted or not:
/// a request whose answer was lost may still have made a job).
#[derive(Clone, Default)]
struct History(Arc<Mutex<(Vec<Accepted>, HashSet<String>)>>);

impl History {
    fn accepted(&self) -> Vec<Accepted> {
        self.0.lock().unwrap().0.clone()
    }

    fn keys_sent(&self) -> HashSet<String> {
        self.0.lock().unwrap().1.clone()
    }
}

/// Submit `jobs` jobs, one every `pace`, to whichever API is up; every 202 goes into the
/// history. Runs until all were tried (a refused or broken request is not retried).
fn submit_in_background(
    api_base: Arc<Mutex<Option<String>>>,
    origin: &Origin,
    bucket: &str,
    jobs: Vec<(String, Served, String)>,
    pace: Duration,
    history: History,
) -> tokio::task::JoinHandle<usize> {
    let (bucket, origin_url) = (bucket.to_owned(), origin.url(""));
    tokio::spawn(async move {
        let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().unwrap();
        let mut refused = 0;
        for (path, served, key) in jobs {
            tokio::time::sleep(pace).await;
            let Some(base) = api_base.lock().unwrap().clone() else {
                refused += 1;
                continue;
            };
            let body = json!({"file_url": format!("{origin_url}{path}"), "bucket_name": bucket, "object_name": key});
            history.0.lock().unwrap().1.insert(key.clone());
            let answer = client.post(format!("{base}/api/v1/upload")).json(&body).send().await;
            match answer {
                Ok(response) if response.status() == 202 => {
                    let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
                    history.0.lock().unwrap().0.push(Accepted { id, path, key, served, at: Utc::now() });
                }
                _ => refused += 1,
            }
        }
        refused
    })
}

/// A job's record as the checker reads it: id, status, size, sha256, last_error,
/// retry_count, updated_at (when it finished, for a finished job).
type Record = (i64, String, Option<i64>, Option<String>, Option<String>, i32, DateTime<Utc>);

#[derive(Debug, Default)]
struct Counts {
    accepted: usize,
    completed: usize,
    lost: usize,
    stuck: usize,
    failed: usize,
    wrong_bytes: usize,
    /// Job rows beyond one for a key the clients sent once.
    duplicate_rows: usize,
    /// Objects in the bucket at a key no client sent (a second object for a submission).
    stray_objects: usize,
    /// Jobs whose completion was logged more than once.
    completed_twice: usize,
    /// Fetches from the origin beyond the attempts the records count (allowed: delivery is
    /// at-least-once, and a killed or frozen worker's attempt is not one the record knows).
    duplicate_transfers: usize,
    /// The longest a job stayed unfinished once the faults had ended (or once accepted, if
    /// later), the bound it is held to ([`unfinished_bound`]) and the jobs over it.
    longest_unfinished: Duration,
    bound: Duration,
    slow: usize,
}

/// How long a job may stay unfinished once the faults end, with `backlog` jobs still to do
/// then: its lease may lapse, the next sweep finds it, the grace period passes; the group
/// recovers (the allowance below); and the jobs ahead of it take their turn, at one
/// worker's concurrency (the group may well give every partition to one member).
fn unfinished_bound(backlog: usize) -> Duration {
    let parse = |d: &str| humantime::parse_duration(d).unwrap();
    let drain = PER_JOB * u32::try_from(backlog).unwrap_or(u32::MAX) / CONCURRENCY;
    parse(LEASE) + parse(SWEEP) + parse(GRACE) + ALLOWANCE + drain
}

/// On top of lease + sweep + grace: the Kafka group noticing a killed member (its session
/// timeout, 6 s) and handing its partitions on (a rejoin, about 3 s), and a margin.
const ALLOWANCE: Duration = Duration::from_secs(12);
/// One job's work: the origin answers after 600 ms, then the store and the record.
const PER_JOB: Duration = Duration::from_millis(700);
/// Jobs a worker runs at once (`FILEFLOW_WORKER_CONCURRENCY`).
const CONCURRENCY: u32 = 2;

/// Wait (up to [`SETTLE_WITHIN`]) until every accepted job is finished, then count.
async fn check(
    scenario: &str,
    history: &History,
    faults_ended: DateTime<Utc>,
    stack: &Stack,
    origin: &Origin,
    completions: impl Fn() -> HashMap<String, usize>,
) -> Counts {
    let accepted = history.accepted();
    let ids: Vec<i64> = accepted.iter().map(|a| a.id.parse().unwrap()).collect();
    let pool = sqlx::PgPool::connect(&stack.database_url).await.expect("the database is back");
    let deadline = Instant::now() + SETTLE_WITHIN;
    let rows = loop {
        let rows: Vec<Record> = sqlx::query_as(
            "SELECT id, status, size, sha256, last_error, retry_count, updated_at FROM files WHERE id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&pool)
        .await
        .unwrap();
        let finished = rows.iter().filter(|r| r.1 == "completed" || r.1 == "failed").count();
        if finished == ids.len() || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let checked_at = Utc::now();
    let rows: HashMap<String, _> = rows.into_iter().map(|r| (r.0.to_string(), r)).collect();
    let mut counts = Counts { accepted: accepted.len(), ..Default::default() };
    let mut unfinished_for = Vec::new();
    for job in &accepted {
        let Some((_, status, size, sha256, last_error, retry_count, updated_at)) = rows.get(&job.id) else {
            counts.lost += 1;
            eprintln!("[{scenario}] lost: job {}", job.id);
            continue;
        };
        let finished = status == "completed" || status == "failed";
        let since = job.at.max(faults_ended);
        let until = if finished { *updated_at } else { checked_at };
        unfinished_for.push(((until - since).to_std().unwrap_or_default(), job.id.clone()));
        let attempts = usize::try_from(*retry_count).unwrap_or(0) + 1;
        let path = job.path.split('?').next().unwrap_or_default();
        counts.duplicate_transfers += (origin.hits(path) as usize).saturating_sub(attempts);
        match status.as_str() {
            "completed" => counts.completed += 1,
            "failed" => {
                counts.failed += 1;
                eprintln!("[{scenario}] failed: job {}: {last_error:?}", job.id);
                continue;
            }
            other => {
                counts.stuck += 1;
                eprintln!("[{scenario}] stuck: job {} is {other}", job.id);
                continue;
            }
        }
        let stored = stack.store.get(&object_store::path::Path::from(job.key.as_str())).await;
        let stored = match stored {
            Ok(found) => found.bytes().await.unwrap().to_vec(),
            Err(e) => {
                counts.wrong_bytes += 1;
                eprintln!("[{scenario}] wrong bytes: job {} completed but its object is missing: {e}", job.id);
                continue;
            }
        };
        let digest = hex::encode(sha2::Sha256::digest(&stored));
        let matches_record = Some(stored.len() as i64) == *size && Some(&digest) == sha256.as_ref();
        let matches_origin = match job.served {
            Served::File { seed, size } => stored == content(seed, size),
            Served::Replaced => true,
        };
        if !(matches_record && matches_origin) {
            counts.wrong_bytes += 1;
            eprintln!(
                "[{scenario}] wrong bytes: job {} (record {size:?} {sha256:?}, stored {} {digest})",
                job.id,
                stored.len()
            );
        }
    }
    counts.duplicate_rows = duplicate_rows(scenario, &pool, &stack.bucket).await;
    counts.stray_objects = stray_objects(scenario, &stack.store, &history.keys_sent()).await;
    counts.completed_twice = completions().values().filter(|n| **n > 1).count();
    unfinished_for.sort_unstable_by(|a, b| b.cmp(a));
    counts.longest_unfinished = unfinished_for.first().map(|(d, _)| *d).unwrap_or_default();
    // The backlog the faults left: jobs that finished (or not) after they ended.
    let backlog = unfinished_for.iter().filter(|(d, _)| !d.is_zero()).count();
    counts.bound = unfinished_bound(backlog);
    counts.slow = unfinished_for.iter().filter(|(d, _)| *d > counts.bound).count();
    let each: Vec<String> = unfinished_for.iter().map(|(d, id)| format!("{id}={:.1}", d.as_secs_f64())).collect();
    println!(
        "chaos [{scenario}]: each job's longest time unfinished after the faults (s; bound {:?} with {backlog} jobs left): {}",
        counts.bound,
        each.join(" ")
    );
    println!(
        "chaos [{scenario}]: accepted {}, completed {}, lost {}, stuck {}, failed {}, wrong bytes {}, duplicate rows {}, \
         stray objects {}, completed twice {}, longest unfinished {:.1} s ({} over the bound), duplicate transfers {}",
        counts.accepted,
        counts.completed,
        counts.lost,
        counts.stuck,
        counts.failed,
        counts.wrong_bytes,
        counts.duplicate_rows,
        counts.stray_objects,
        counts.completed_twice,
        counts.longest_unfinished.as_secs_f64(),
        counts.slow,
        counts.duplicate_transfers,
    );
    counts
}

/// Job rows beyond the first for each key of the scenario's bucket (each key was sent once).
async fn duplicate_rows(scenario: &str, pool: &sqlx::PgPool, bucket: &str) -> usize {
    let repeated: Vec<(String, i64)> = sqlx::query_as(
        "SELECT object_name, count(*) FROM files WHERE bucket_name = $1 GROUP BY object_name HAVING count(*) > 1",
    )
    .bind(bucket)
    .fetch_all(pool)
    .await
    .unwrap();
    for (key, rows) in &repeated {
        eprintln!("[{scenario}] duplicate rows: {rows} jobs for the one submission of {key}");
    }
    repeated.iter().map(|(_, rows)| usize::try_from(rows - 1).unwrap_or(0)).sum()
}

/// Objects in the bucket at keys no client sent.
async fn stray_objects(scenario: &str, store: &object_store::aws::AmazonS3, sent: &HashSet<String>) -> usize {
    use object_store::ObjectStore as _;
    let listed: Vec<object_store::ObjectMeta> = match store.list(None).try_collect().await {
        Ok(listed) => listed,
        // No job ever completed: the bucket may not even exist.
        Err(object_store::Error::NotFound { .. }) => Vec::new(),
        Err(e) => panic!("[{scenario}] cannot list the bucket: {e}"),
    };
    let stray: Vec<_> = listed.iter().filter(|o| !sent.contains(o.location.as_ref())).collect();
    for object in &stray {
        eprintln!("[{scenario}] stray object: {} ({} bytes)", object.location, object.size);
    }
    stray.len()
}

fn assert_promise_held(scenario: &str, counts: &Counts) {
    assert!(counts.accepted > 0, "[{scenario}] no job was accepted");
    assert_eq!((counts.lost, counts.stuck, counts.wrong_bytes), (0, 0, 0), "[{scenario}] {counts:?}");
    assert_eq!(counts.failed, 0, "[{scenario}] transient faults failed jobs: {counts:?}");
    assert_eq!(
        (counts.duplicate_rows, counts.stray_objects, counts.completed_twice),
        (0, 0, 0),
        "[{scenario}] duplicates (rows, objects, completions): {counts:?}"
    );
    assert_eq!(
        counts.slow, 0,
        "[{scenario}] jobs stayed unfinished longer than lease + sweep + grace + allowance + backlog ({:?}) after the faults: {counts:?}",
        counts.bound
    );
}

/// No fileflow process ended but by the test's own kill -9.
fn assert_no_process_died(scenario: &str, cluster: &mut Cluster) {
    let deaths = cluster.unexpected_deaths();
    assert!(deaths.is_empty(), "[{scenario}] processes died of causes the test did not bring: {deaths:#?}");
}

// ---------------------------------------------------------------- scenarios

/// What a scenario runs on.
struct Stack {
    env: Vec<(String, String)>,
    database_url: String,
    bucket: String,
    store: object_store::aws::AmazonS3,
    broker: Option<Broker>,
    s3_proxy: Option<FaultyS3>,
}

/// A fresh stack: a database on `postgres` (the shared server, or the chaos one), the
/// shared broker or one of the scenario's own, S3 direct or through the fault proxy.
async fn stack(chaos_pg: Option<&ChaosPostgres>, own_broker: bool, faulty_s3: bool) -> Option<Stack> {
    let database_url = match chaos_pg {
        Some(pg) => pg.fresh_database().await,
        None => services::fresh_postgres().await?,
    };
    let s3 = services::s3()?;
    let broker = if own_broker { Some(Broker::start().await?) } else { None };
    let brokers = match &broker {
        Some(b) => b.address(),
        None => services::service("FILEFLOW_TEST_KAFKA")?,
    };
    let s3_proxy = if faulty_s3 { Some(FaultyS3::start(&s3.endpoint).await) } else { None };
    let bucket = services::unique("chaos-");
    let mut env: Vec<(String, String)> = s3.env().into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    if let Some(proxy) = &s3_proxy {
        env.retain(|(k, _)| k != "FILEFLOW_S3_ENDPOINT");
        env.push(("FILEFLOW_S3_ENDPOINT".into(), proxy.endpoint.clone()));
    }
    for (k, v) in [
        ("FILEFLOW_DATABASE_URL", database_url.clone()),
        ("FILEFLOW_KAFKA_BROKERS", brokers),
        ("FILEFLOW_KAFKA_TOPIC", services::unique("chaos")),
        ("FILEFLOW_KAFKA_GROUP", services::unique("chaos-workers")),
        ("FILEFLOW_KAFKA_PARTITIONS", "4".into()),
        ("FILEFLOW_WORKER_CONCURRENCY", CONCURRENCY.to_string()),
        ("FILEFLOW_JOB_LEASE", LEASE.into()),
        ("FILEFLOW_RECONCILE_INTERVAL", SWEEP.into()),
        ("FILEFLOW_RECONCILE_GRACE", GRACE.into()),
        ("FILEFLOW_MAX_RETRIES", "20".into()),
        ("FILEFLOW_RETRY_MAX_DELAY", "1s".into()),
        ("FILEFLOW_SHUTDOWN_GRACE", "1s".into()),
    ] {
        env.push((k.into(), v));
    }
    let store = s3.bucket(&bucket);
    Some(Stack { env, database_url, bucket, store, broker, s3_proxy })
}

/// `n` jobs of small files, each served after 600 ms (so kills and freezes land while
/// transfers are under way), keys under `prefix`.
fn small_jobs(prefix: &str, n: u64) -> Vec<(String, Served, String)> {
    (0..n)
        .map(|i| {
            let size = 2_000 + 997 * i;
            (format!("/delay/600/{size}?seed={i}"), Served::File { seed: i, size }, format!("{prefix}/{i}"))
        })
        .collect()
}

/// One scenario: an API and two workers on `stack`; `jobs` are submitted one every `pace`
/// while `faults` runs; then the checker counts, and the promise must hold.
async fn run_scenario(
    name: &str,
    mut stack: Stack,
    jobs: Vec<(String, Served, String)>,
    pace: Duration,
    faults: impl AsyncFnOnce(&mut Cluster, &mut Stack),
) -> Stack {
    let origin = Origin::start().await;
    let mut cluster = Cluster::start(stack.env.clone(), 2).await;
    let history = History::default();
    let submitting =
        submit_in_background(cluster.api_base.clone(), &origin, &stack.bucket, jobs, pace, history.clone());
    faults(&mut cluster, &mut stack).await;
    let faults_ended = Utc::now();
    submitting.await.unwrap();
    let counts = check(name, &history, faults_ended, &stack, &origin, || cluster.completions()).await;
    if counts.lost + counts.stuck + counts.failed + counts.wrong_bytes + counts.slow > 0 {
        cluster.print_recent_logs();
    }
    assert_no_process_died(name, &mut cluster);
    assert_promise_held(name, &counts);
    stack
}

#[tokio::test]
async fn kill_9_of_every_process_kind_repeatedly() {
    let Some(stack) = stack(None, false, false).await else { return };
    let jobs = small_jobs("kill", 20 + 20 * rounds() as u64);
    run_scenario("kill -9", stack, jobs, Duration::from_millis(200), async |cluster, _| {
        for round in 0..rounds() {
            tokio::time::sleep(Duration::from_millis(700)).await;
            cluster.kill_worker(round % 2).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            cluster.kill_api().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            cluster.kill_worker((round + 1) % 2).await;
        }
    })
    .await;
}

#[tokio::test]
async fn the_broker_restarts_with_its_messages_gone() {
    let Some(stack) = stack(None, true, false).await else { return };
    let jobs = small_jobs("broker", 20 + 15 * rounds() as u64);
    run_scenario("broker lost its messages", stack, jobs, Duration::from_millis(120), async |_, stack| {
        for _ in 0..rounds() {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            stack.broker.as_mut().unwrap().restart_empty().await;
        }
    })
    .await;
}

#[tokio::test]
async fn postgres_crashes_and_restarts() {
    let Some(pg) = ChaosPostgres::find() else { return };
    let _turn = CHAOS_PG.lock().await;
    pg.ensure_running().await;
    let Some(stack) = stack(Some(&pg), false, false).await else { return };
    let jobs = small_jobs("pg", 20 + 15 * rounds() as u64);
    run_scenario("PostgreSQL crash", stack, jobs, Duration::from_millis(150), async |_, _| {
        for _ in 0..rounds() {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            pg.crash().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            pg.start().await;
        }
    })
    .await;
}

#[tokio::test]
async fn s3_fails_a_share_of_requests_before_and_after_writing() {
    let Some(stack) = stack(None, false, true).await else { return };
    // 15% refused with SlowDown, 10% written and then answered 500.
    stack.s3_proxy.as_ref().unwrap().faults.set(150, 100);
    let mut jobs = small_jobs("s3", 30);
    // Multipart uploads too (over 5 MiB): parts and completions fail as well.
    for i in 0..2u64 {
        let size = 6 * 1024 * 1024 + 1000 * i;
        let seed = 500 + i;
        jobs.push((format!("/file/{size}?seed={seed}"), Served::File { seed, size }, format!("s3/big-{i}")));
    }
    let stack = run_scenario("S3 faults", stack, jobs, Duration::from_millis(20), async |_, _| {}).await;
    let faults = &stack.s3_proxy.as_ref().unwrap().faults;
    let (before, after) = (
        faults.failed_before.load(std::sync::atomic::Ordering::Relaxed),
        faults.failed_after.load(std::sync::atomic::Ordering::Relaxed),
    );
    println!("chaos [S3 faults]: {before} requests refused before the store, {after} failed after writing");
    assert!(before > 0 && after > 0, "the proxy injected faults");
}

/// A multipart completion the store carried out but whose answer was lost: the client's
/// retry of it finds no upload (404). That is not a missing bucket: the job is retried
/// and completes with the right bytes.
#[tokio::test]
async fn a_lost_answer_to_a_multipart_completion_is_retried() {
    let Some(stack) = stack(None, false, true).await else { return };
    let faults = &stack.s3_proxy.as_ref().unwrap().faults;
    faults.lost_completions.store(1, std::sync::atomic::Ordering::Relaxed);
    let size = 6 * 1024 * 1024;
    let jobs = vec![(format!("/file/{size}?seed=77"), Served::File { seed: 77, size }, "lost/answer".to_owned())];
    let stack = run_scenario("lost completion answer", stack, jobs, Duration::ZERO, async |_, _| {}).await;
    let faults = &stack.s3_proxy.as_ref().unwrap().faults;
    assert_eq!(faults.lost_completions.load(std::sync::atomic::Ordering::Relaxed), 0, "the fault was injected");
}

/// A worker frozen (SIGSTOP) mid-transfer past its lease, while the origin replaces the
/// file; another worker completes the job with the new file; the frozen one wakes up and
/// must not replace the stored object with the old bytes.
#[tokio::test]
async fn a_frozen_worker_cannot_replace_a_newer_result() {
    let Some(stack) = stack(None, false, false).await else { return };
    let origin = Origin::start().await;
    let mut env = stack.env.clone();
    env.push(("FILEFLOW_WORKER_CONCURRENCY".into(), "8".into()));
    let mut cluster = Cluster::start(env, 1).await;
    let history = History::default();
    let jobs: Vec<_> = (0..6u64)
        .map(|i| (format!("/versioned/v{i}/300000?seed={i}&slow_ms=3000"), Served::Replaced, format!("frozen/{i}")))
        .collect();
    submit_in_background(cluster.api_base.clone(), &origin, &stack.bucket, jobs, Duration::ZERO, history.clone())
        .await
        .unwrap();
    // Freeze the only worker once it is transferring, then replace every file.
    let frozen = &cluster.workers[0];
    let deadline = Instant::now() + Duration::from_secs(60);
    while !frozen.events.lock().unwrap().iter().any(|e| e["message"] == "job started") {
        assert!(Instant::now() < deadline, "the worker never started a job");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    frozen.signal("-STOP");
    for i in 0..6 {
        origin.set_version(&format!("v{i}"), 1);
    }
    // Another worker takes over once the leases lapse and the group moves the partitions.
    let taker = Cluster::spawn("worker", &cluster.dir, &cluster.env).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while taker.completed_ids().len() < 6 {
        assert!(Instant::now() < deadline, "the other worker did not take the jobs over: {:?}", taker.completed_ids());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.workers[0].signal("-CONT");
    let woken = Utc::now();
    // Give the woken worker time to try to finish what it had started.
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.workers.push(taker);
    let counts = check("frozen worker", &history, woken, &stack, &origin, || cluster.completions()).await;
    assert_no_process_died("frozen worker", &mut cluster);
    assert_promise_held("frozen worker", &counts);
    for job in history.accepted() {
        let stored = stack.store.get(&object_store::path::Path::from(job.key.as_str())).await.unwrap();
        let i: u64 = job.key.rsplit('/').next().unwrap().parse().unwrap();
        assert!(
            stored.bytes().await.unwrap() == content(Origin::versioned_seed(i, 1), 300_000),
            "job {} holds the old file: the frozen worker replaced the newer result",
            job.id
        );
    }
}

/// Every fault at once, round after round.
#[tokio::test]
async fn every_fault_mixed() {
    let Some(pg) = ChaosPostgres::find() else { return };
    let _turn = CHAOS_PG.lock().await;
    pg.ensure_running().await;
    let Some(stack) = stack(Some(&pg), true, true).await else { return };
    stack.s3_proxy.as_ref().unwrap().faults.set(100, 50);
    let jobs = small_jobs("mixed", 30 + 30 * rounds() as u64);
    run_scenario("mixed", stack, jobs, Duration::from_millis(200), async |cluster, stack| {
        for round in 0..rounds() {
            tokio::time::sleep(Duration::from_millis(800)).await;
            cluster.kill_worker(round % 2).await;
            stack.broker.as_mut().unwrap().restart_empty().await;
            tokio::time::sleep(Duration::from_millis(800)).await;
            // The API is killed while PostgreSQL is down; its successor waits for the database.
            pg.crash().await;
            tokio::join!(cluster.kill_api(), async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                pg.start().await;
            });
            let frozen = (round + 1) % 2;
            cluster.until_transferring(frozen).await;
            cluster.workers[frozen].signal("-STOP");
            tokio::time::sleep(Duration::from_secs(3)).await;
            cluster.workers[frozen].signal("-CONT");
        }
    })
    .await;
}

/// The embedded default: kill -9 during a storm of 16 clients submitting; after a restart
/// every job that was answered 202 is there, and completes with the right bytes.
#[tokio::test]
async fn embedded_kill_9_during_a_submit_storm_keeps_every_accepted_job() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = [("FILEFLOW_WORKER_CONCURRENCY", "4")];
    let mut first = process::start(dir.path(), &env).await;
    let base = first.base.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accepted = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
    let clients: Vec<_> = (0..16u64)
        .map(|client| {
            let (base, url, stop, accepted) = (base.clone(), origin.url(""), stop.clone(), accepted.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder().no_proxy().build().unwrap();
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let seed = client * 100_000 + n;
                    n += 1;
                    let body = json!({"file_url": format!("{url}/file/1000?seed={seed}"), "bucket_name": "storm",
                        "object_name": format!("s/{seed}")});
                    match http.post(format!("{base}/api/v1/upload")).json(&body).send().await {
                        Ok(r) if r.status() == 202 => {
                            let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
                            accepted.lock().unwrap().push((id, seed));
                        }
                        _ => return,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    first.kill().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() > 100, "the storm got going: {} accepted", accepted.len());

    let second = process::start(dir.path(), &env).await;
    let (mut lost, mut stuck, mut wrong) = (0, 0, 0);
    let deadline = Instant::now() + SETTLE_WITHIN;
    for (id, seed) in &accepted {
        let job = loop {
            let job = second.job(id).await;
            let finished = job["status"] == "completed" || job["status"] == "failed";
            if finished || job["error"]["code"] == "not_found" || Instant::now() > deadline {
                break job;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        match job["status"].as_str() {
            None => lost += 1,
            Some("completed") => {
                let path = PathBuf::from(dir.path()).join("objects/storm/s").join(seed.to_string());
                if std::fs::read(path).ok() != Some(content(*seed, 1000)) {
                    wrong += 1;
                }
            }
            Some(_) => stuck += 1,
        }
    }
    println!(
        "chaos [embedded submit storm, kill -9]: accepted {}, lost {lost}, stuck {stuck}, wrong bytes {wrong}",
        accepted.len()
    );
    assert_eq!((lost, stuck, wrong), (0, 0, 0));
}
