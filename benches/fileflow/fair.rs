//! Fair share, measured: one key's small job beside another key's 10,000-job backlog (its
//! time to completion, p50 and p99 over 20 tries, beside the same on an idle server), and
//! what claiming costs with 10 k and 1 M jobs waiting in the embedded queue.

use std::time::{Duration, Instant};

use fileflow::metadata::{Durability, SqliteDb};
use fileflow::queue::{EmbeddedQueue, Queue as _};
use serde_json::{Value, json};

use crate::load::client;
use crate::process::Fileflow;
use crate::report::Table;
use crate::{Bench, f1, f2, median};

/// Tries of the small job, on the idle server and beside the backlog.
const TRIES: usize = 20;
/// The busy key's backlog.
const BACKLOG: usize = 10_000;

/// The `q` quantile (0–1) of `xs`, which it sorts.
fn quantile(xs: &mut [f64], q: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() as f64 - 1.0) * q).round() as usize]
}

/// Submit one job as `key`; its id.
async fn submit(base: &str, key: &str, url: &str, bucket: &str, name: &str) -> String {
    let body = json!({ "file_url": url, "bucket_name": bucket, "object_name": name });
    let accepted: Value = client()
        .post(format!("{base}/api/v1/upload"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("fileflow answers")
        .json()
        .await
        .expect("an id");
    accepted["id"].as_str().unwrap_or_else(|| panic!("refused: {accepted}")).to_owned()
}

/// Follow job `id` (looking every `every`) until it completes; panics if it ends otherwise.
pub async fn completed(http: &reqwest::Client, base: &str, key: &str, id: &str, every: Duration) {
    loop {
        let job: Value = http
            .get(format!("{base}/api/v1/uploads/{id}"))
            .bearer_auth(key)
            .send()
            .await
            .expect("fileflow answers")
            .json()
            .await
            .expect("a job");
        match job["status"].as_str() {
            Some("completed") => return,
            Some("failed" | "cancelled") => panic!("a job did not complete: {job}"),
            _ => tokio::time::sleep(every).await,
        }
    }
}

/// Submit one job as `key` and wait for it to complete; its time from submit to completed.
async fn one_job(base: &str, key: &str, url: &str, bucket: &str, n: usize) -> Duration {
    let started = Instant::now();
    let id = submit(base, key, url, bucket, &format!("small/{n}")).await;
    completed(&client(), base, key, &id, Duration::from_millis(10)).await;
    started.elapsed()
}

async fn tries(base: &str, key: &str, url: &str, bucket: &str, from: usize) -> Vec<f64> {
    let mut times = Vec::with_capacity(TRIES);
    for n in from..from + TRIES {
        times.push(one_job(base, key, url, bucket, n).await.as_secs_f64() * 1000.0);
    }
    times
}

impl Bench {
    /// The fair-share table (on the embedded stack, and on PostgreSQL + Kafka + S3 when
    /// its servers are there) and the claim-cost table.
    pub async fn fair(&mut self) -> (Table, Table) {
        let mut table = Table::new(
            "fair share",
            "Another key's 1 KiB job, submitted and followed to `completed` one at a time (20 \
             tries), on `fileflow serve` (release, defaults: 64 slots, 8 per origin host): idle; \
             while 12 jobs from an origin that sends 2 KiB/s hold its host's places (the small \
             job from another host); and while one key's 10,000 jobs of 50 ms from the same \
             origin wait (62 s of work for the host's 8 places). First come, first served, each \
             try would wait behind what is left of the backlog. Target: within 2× idle + 1 s.",
            &["stack", "case", "p50 ms", "p99 ms", "p50 ratio to idle", "target ms"],
        );
        let mut stacks = vec![("embedded (SQLite, disk)", Vec::new())];
        match &self.distributed {
            Some(d) => stacks.push(("PostgreSQL + Kafka + S3", d.fresh_stack(8, true).await.0)),
            None => self.notes.push("fair share, distributed stack: not run (no PostgreSQL/Kafka)".into()),
        }
        for (stack, env) in stacks {
            self.fair_on(&mut table, stack, &env).await;
        }
        (table, self.claims().await)
    }

    async fn fair_on(&mut self, table: &mut Table, stack: &str, env: &[(String, String)]) {
        let data = self.scratch.path().join(crate::services::unique("fair"));
        std::fs::create_dir_all(&data).expect("scratch");
        let busy_key = crate::process::create_key_in(&data, env).await;
        let other_key = crate::process::create_key_in(&data, env).await;
        let bucket = crate::services::unique("bench-fair");
        let serve = Fileflow::start("serve", &data, env).await;
        let small = self.origin.url("/file/1024");
        // Workers up (a Kafka consumer group takes a few seconds to join).
        one_job(&serve.base, &other_key, &small, &bucket, 1_000_000).await;
        let mut idle = tries(&serve.base, &other_key, &small, &bucket, 0).await;
        let idle_p50 = median(&mut idle.clone());
        let mut row = |case: &str, times: &mut Vec<f64>| {
            let p50 = median(&mut times.clone());
            table.row(vec![
                stack.into(),
                case.into(),
                f1(p50),
                f1(quantile(times, 0.99)),
                f2(p50 / idle_p50),
                f1(2.0 * idle_p50 + 1000.0),
            ]);
        };
        row("idle", &mut idle);

        // 12 jobs of 30 s each from an origin that sends 2 KiB every second.
        let slow_origin = crate::origin::Origin::start_on("127.0.0.2").await;
        let crawl = slow_origin.url("/slow/61440?chunk=2048&every_ms=1000");
        let mut crawling = Vec::new();
        for i in 0..12 {
            crawling.push(submit(&serve.base, &busy_key, &crawl, &bucket, &format!("crawl/{i}")).await);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while slow_origin.streaming() < 8 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut beside_slow = tries(&serve.base, &other_key, &small, &bucket, TRIES).await;
        row("12 jobs from a 2 KiB/s origin under way", &mut beside_slow);
        let http = client();
        for id in &crawling {
            let _ = http.post(format!("{}/api/v1/uploads/{id}/cancel", serve.base)).bearer_auth(&busy_key).send().await;
        }

        // 10,000 jobs of 50 ms each from the busy key, from the small job's origin.
        let slow = self.origin.url("/delay/50/1024");
        for chunk in 0..BACKLOG / 1000 {
            let items: Vec<Value> = (0..1000)
                .map(|i| json!({ "file_url": slow, "bucket_name": bucket, "object_name": format!("busy/{chunk}/{i}") }))
                .collect();
            let answer = http
                .post(format!("{}/api/v1/uploads/batch", serve.base))
                .bearer_auth(&busy_key)
                .json(&json!({ "items": items }))
                .send()
                .await
                .expect("fileflow answers");
            assert!(answer.status().is_success(), "the backlog was refused: {}", answer.status());
        }
        let mut beside = tries(&serve.base, &other_key, &small, &bucket, 2 * TRIES).await;
        row(&format!("another key's {BACKLOG}-job backlog, same origin"), &mut beside);
        serve.stop().await;
    }

    /// Claims of 16 jobs from the embedded queue with 10 k and 1 M jobs waiting across ten keys.
    async fn claims(&mut self) -> Table {
        let mut table = Table::new(
            "claiming at scale",
            "One claim of 16 jobs (what a worker process asks for at 8 slots) from the embedded \
             queue, in turns across ten keys, with 10 k and 1 M jobs waiting; 200 claims each, \
             on SQLite with `synchronous=FULL`.",
            &["jobs waiting", "p50 ms", "p99 ms", "database MiB"],
        );
        for waiting in [10_000u64, 1_000_000] {
            let dir = self.scratch.path().join(format!("claims-{waiting}"));
            std::fs::create_dir_all(&dir).expect("scratch");
            let db = SqliteDb::connect_with(&SqliteDb::default_url(&dir), Durability::PowerLoss).await.expect("opens");
            db.migrate().await.expect("migrates");
            sqlx::query(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
                 INSERT INTO files (file_url, bucket_name, object_name, owner_key, priority, status, retry_count, \
                     created_at, updated_at) \
                 SELECT 'http://origin.example/file/16384?seed=' || i, 'bench-claims', 'waiting/' || i, \
                     'key-' || (i % 10), i % 3, 'pending', 0, 1000 + i, 1000 + i FROM n",
            )
            .bind(waiting as i64)
            .execute(&db.reads)
            .await
            .expect("the waiting jobs are written");
            let queue = EmbeddedQueue::new(db.clone(), Duration::from_secs(600), "bench");
            let mut times = Vec::with_capacity(200);
            for _ in 0..200 {
                let started = Instant::now();
                let claimed = queue.receive_many(16).await.expect("claims");
                times.push(started.elapsed().as_secs_f64() * 1000.0);
                assert_eq!(claimed.len(), 16);
            }
            let size: u64 = std::fs::read_dir(&dir)
                .expect("the data dir")
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum();
            table.row(vec![
                waiting.to_string(),
                f2(median(&mut times.clone())),
                f2(quantile(&mut times, 0.99)),
                f1(size as f64 / (1024.0 * 1024.0)),
            ]);
        }
        table
    }
}
