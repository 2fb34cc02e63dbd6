//! Past one machine: what one job costs each shared component of the distributed stack
//! (PostgreSQL statements, rows and WAL; Kafka messages and bytes; S3 requests; and the
//! CPU time of every process), measured on a run of two `fileflow api` and four
//! `fileflow worker` processes, from which BENCHMARKS.md's capacity model is worked out.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use sqlx::Row as _;

use crate::process::{self, Fileflow};
use crate::progress::{JobsDb, now_ms};
use crate::report::Table;
use crate::{Bench, SUBMITTERS, env_number, f1, f2, load, services};

const PARTITIONS: u32 = 8;

/// CPU seconds used so far by every process whose command name is `name` (children
/// of PostgreSQL included: each connection is a `postgres` process).
pub fn cpu_of(name: &str) -> f64 {
    cpu_where(name, |_| true)
}

/// PostgreSQL's CPU seconds so far: (client connections, background processes — WAL
/// writer, checkpointer, autovacuum…). A connection's process title names its client's
/// address.
fn postgres_cpu() -> (f64, f64) {
    let connection = |title: &str| title.contains("127.0.0.1(");
    (cpu_where("postgres", connection), cpu_where("postgres", |t| !connection(t)))
}

/// [`cpu_of`], of the processes whose command line `title` accepts.
fn cpu_where(name: &str, title: impl Fn(&str) -> bool) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0.0 };
    dir.filter_map(Result::ok)
        .filter_map(|entry| {
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            Some((stat, String::from_utf8_lossy(&cmdline).into_owned()))
        })
        .filter_map(|(stat, cmdline)| {
            let comm = stat.split_once('(')?.1.rsplit_once(')')?.0;
            (comm == name && title(&cmdline)).then(|| process::stat_cpu_seconds(&stat))
        })
        .sum()
}

/// S3 requests Garage has served so far, by API call, from its admin `/metrics`.
async fn s3_requests(admin: &str) -> BTreeMap<String, f64> {
    let text = match reqwest::get(format!("{admin}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let mut counts = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("api_s3_request_counter{")) {
        let endpoint = line.split("api_endpoint=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
        let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        *counts.entry(endpoint.to_owned()).or_default() += value;
    }
    counts
}

/// Messages in `topic` and their bytes (key, value and headers), read from the beginning.
fn kafka_topic(brokers: &str, topic: &str) -> (u64, u64) {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", services::unique("bench-count"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("a Kafka consumer");
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).expect("topic metadata");
    let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    let mut assignment = rdkafka::TopicPartitionList::new();
    let mut total = 0u64;
    for &p in &partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout).expect("watermarks");
        total += (high - low).max(0) as u64;
        assignment.add_partition_offset(topic, p, rdkafka::Offset::Beginning).expect("a partition");
    }
    consumer.assign(&assignment).expect("assign");
    let (mut seen, mut bytes) = (0u64, 0u64);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen < total && std::time::Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(500)) {
            seen += 1;
            let headers: usize =
                rdkafka::message::Headers::iter(&message.headers().map(|h| h.detach()).unwrap_or_default())
                    .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
                    .sum();
            bytes += (message.key().map_or(0, <[u8]>::len) + message.payload().map_or(0, <[u8]>::len) + headers) as u64;
        }
    }
    (total, bytes)
}

struct PgStats {
    statements: f64,
    rows: f64,
    wal_bytes: f64,
    commits: f64,
    exec_ms: f64,
    top: Vec<(String, f64, f64, f64, f64)>,
}

async fn pg_stats(pool: &sqlx::PgPool) -> PgStats {
    let totals = sqlx::query(
        "SELECT coalesce(sum(calls), 0)::float8, coalesce(sum(rows), 0)::float8, \
                coalesce(sum(wal_bytes), 0)::float8, \
                (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database())::float8, \
                coalesce(sum(total_exec_time), 0)::float8 \
         FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(pool)
    .await
    .expect("pg_stat_statements");
    let top = sqlx::query(
        "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 90), calls::float8, rows::float8, wal_bytes::float8, \
                total_exec_time \
         FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         ORDER BY calls DESC LIMIT 10",
    )
    .fetch_all(pool)
    .await
    .expect("pg_stat_statements");
    PgStats {
        statements: totals.get(0),
        rows: totals.get(1),
        wal_bytes: totals.get(2),
        commits: totals.get(3),
        exec_ms: totals.get(4),
        top: top.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect(),
    }
}

impl Bench {
    pub async fn costs(&mut self) -> (Table, Table) {
        let jobs = env_number("FILEFLOW_BENCH_COST_JOBS", 4000) as usize;
        let mut table = Table::new(
            "Per job, on the distributed stack",
            &format!(
                "Two `fileflow api` and four `fileflow worker` processes (concurrency 8 each) on one PostgreSQL, \
                 one Kafka broker (Tansu, {PARTITIONS} partitions) and one S3 store (Garage); {jobs} jobs of 16 KiB \
                 submitted by {SUBMITTERS} clients spread over both APIs. PostgreSQL: `pg_stat_statements` and \
                 `pg_stat_database` of fileflow's database; WAL: the server's WAL position before and after. Kafka: \
                 the messages in fileflow's topics, read back. S3: Garage's request counters. CPU: the processes' \
                 CPU time (all `postgres` processes, the broker, the store, the fileflow processes). Divided by \
                 the jobs."
            ),
            &["component", "measure", "per job", "total"],
        );
        let mut statements = Table::new(
            "PostgreSQL statements the run sent most",
            "From `pg_stat_statements` of the run above, per job.",
            &["statement (start)", "calls per job", "rows per job", "WAL bytes per job", "execution ms per job"],
        );
        let Some(d) = self.distributed.clone() else {
            self.notes.push("costs: not run (no FILEFLOW_TEST_POSTGRES/KAFKA/S3_*)".into());
            return (table, statements);
        };
        let (env, url) = d.fresh_stack(PARTITIONS, true).await;
        let topic = env.iter().find(|(k, _)| k == "FILEFLOW_KAFKA_TOPIC").map(|(_, v)| v.clone()).expect("a topic");
        let data = self.dir(&services::unique("costs"));
        let apis = vec![Fileflow::start("api", &data, &env).await, Fileflow::start("api", &data, &env).await];
        let mut workers = Vec::new();
        for _ in 0..4 {
            workers.push(Fileflow::start("worker", &data, &env).await);
        }
        process::wait_for_group(&workers, 2 * PARTITIONS as u64).await;
        let pool = sqlx::PgPool::connect(&url).await.expect("fileflow's database");
        let has_statements =
            sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").execute(&pool).await.is_ok()
                && sqlx::query("SELECT pg_stat_statements_reset()").execute(&pool).await.is_ok();
        if !has_statements {
            self.notes.push("costs: pg_stat_statements is not loaded; PostgreSQL statements are missing".into());
        }
        let wal_lsn = || async {
            sqlx::query_scalar::<_, f64>("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8")
                .fetch_one(&pool)
                .await
                .expect("the WAL position")
        };
        let pg_before = if has_statements { Some(pg_stats(&pool).await) } else { None };
        let wal_before = wal_lsn().await;
        let s3_admin = std::env::var("FILEFLOW_TEST_S3_ADMIN").ok();
        let s3_before = match &s3_admin {
            Some(admin) => s3_requests(admin).await,
            None => BTreeMap::new(),
        };
        let cpu = |fileflow: &[&Fileflow]| {
            let (connections, background) = postgres_cpu();
            [
                ("PostgreSQL connections", connections),
                ("PostgreSQL background (WAL writer, checkpointer, autovacuum)", background),
                ("Kafka (Tansu)", cpu_of("tansu")),
                ("S3 (Garage)", cpu_of("garage")),
                ("fileflow api ×2", fileflow[..2].iter().map(|f| f.cpu_seconds()).sum()),
                ("fileflow worker ×4", fileflow[2..].iter().map(|f| f.cpu_seconds()).sum()),
                ("the benchmark (origin and clients)", process::cpu_seconds(std::process::id())),
            ]
        };
        let everyone: Vec<&Fileflow> = apis.iter().chain(workers.iter()).collect();
        let cpu_before = cpu(&everyone);
        let started = now_ms();
        // Half the jobs through each API.
        let half = jobs / 2;
        let bucket = services::unique("bench-costs");
        tokio::join!(
            load::submit_all(&apis[0].base, SUBMITTERS / 2, half, &bucket, self.url("/file/16384?seed={n}".into())),
            load::submit_all(&apis[1].base, SUBMITTERS / 2, jobs - half, &bucket, {
                let url = self.url("/file/16384?seed={n}".into());
                move |n| url(n + half)
            }),
        );
        let db = JobsDb::postgres(&url).await;
        let progress = db.wait_for(jobs, Duration::from_secs(1800)).await;
        let secs = (progress.last_update_ms - started) as f64 / 1000.0;
        let cpu_after = cpu(&everyone);
        let wal = wal_lsn().await - wal_before;
        let per = |x: f64| x / jobs as f64;
        table.row(vec![
            "the run".into(),
            "jobs completed; seconds; jobs/s".into(),
            "-".into(),
            format!("{}; {}; {:.0}", progress.completed, f2(secs), progress.completed as f64 / secs),
        ]);
        if let (Some(before), true) = (pg_before, has_statements) {
            let after = pg_stats(&pool).await;
            for (measure, total) in [
                ("statements", after.statements - before.statements),
                ("rows returned or changed", after.rows - before.rows),
                ("transactions committed", after.commits - before.commits),
                ("WAL bytes of fileflow's statements", after.wal_bytes - before.wal_bytes),
                ("statement execution ms (in the executor)", after.exec_ms - before.exec_ms),
            ] {
                table.row(vec!["PostgreSQL".into(), measure.into(), f2(per(total)), format!("{total:.0}")]);
            }
            for (query, calls, rows, wal_bytes, exec_ms) in after.top {
                statements.row(vec![
                    format!("`{}`", query.replace('|', "\\|")),
                    f2(per(calls)),
                    f2(per(rows)),
                    format!("{:.0}", per(wal_bytes)),
                    format!("{:.3}", per(exec_ms)),
                ]);
            }
        }
        table.row(vec![
            "PostgreSQL".into(),
            "WAL bytes (whole server)".into(),
            format!("{:.0}", per(wal)),
            format!("{wal:.0}"),
        ]);
        for name in [topic.clone(), format!("{topic}-retry")] {
            let brokers = d.kafka.clone();
            let (messages, bytes) = tokio::task::spawn_blocking({
                let name = name.clone();
                move || kafka_topic(&brokers, &name)
            })
            .await
            .expect("the topic is read");
            table.row(vec![
                "Kafka".into(),
                format!("messages in `{}`; their bytes", if name == topic { "<topic>" } else { "<topic>-retry" }),
                format!("{}; {}", f2(per(messages as f64)), f1(per(bytes as f64))),
                format!("{messages}; {bytes}"),
            ]);
        }
        if let Some(admin) = &s3_admin {
            for (endpoint, count) in s3_requests(admin).await {
                let total = count - s3_before.get(&endpoint).copied().unwrap_or(0.0);
                if total > 0.0 {
                    table.row(vec!["S3".into(), format!("{endpoint} requests"), f2(per(total)), format!("{total:.0}")]);
                }
            }
        } else {
            self.notes.push("costs: no FILEFLOW_TEST_S3_ADMIN; S3 requests are missing".into());
        }
        let mut all = 0.0;
        for ((name, before), (_, after)) in cpu_before.iter().zip(cpu_after.iter()) {
            let total = after - before;
            all += total;
            table.row(vec![
                (*name).into(),
                "CPU ms".into(),
                format!("{:.3}", 1000.0 * per(total)),
                format!("{:.1} s = {:.2} cores", total, total / secs),
            ]);
        }
        // The model's check: all of it shares this machine's cores.
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get) as f64;
        table.row(vec![
            "everything".into(),
            format!("CPU ms; the jobs/s {cores:.0} cores allow at that cost"),
            format!("{:.3}", 1000.0 * per(all)),
            format!("{:.0} jobs/s", cores / per(all)),
        ]);
        pool.close().await;
        for fileflow in apis.into_iter().chain(workers) {
            fileflow.stop().await;
        }
        (table, statements)
    }
}
