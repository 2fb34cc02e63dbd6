//! Fair share, measured: one key's small job beside another key's 10,000-job backlog (its
//! time to completion, p50 and p99 over 20 tries, beside the same on an idle server), and
//! what claiming costs with 10 k and 1 M jobs waiting in the embedded queue.

use std::time::{Duration, Instant};

use fileflow::metadata::{Durability, SqliteDb};
use fileflow::queue::{EmbeddedQueue, Queue as _};
use serde_json::{Value, json};

use crate::load::client;
use crate::process::{Fileflow, create_key};
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

/// Submit one job as `key` and wait for it to complete; its time from submit to completed.
async fn one_job(base: &str, key: &str, url: &str, n: usize) -> Duration {
    let http = client();
    let started = Instant::now();
    let body = json!({ "file_url": url, "bucket_name": "bench-fair", "object_name": format!("small/{n}") });
    let accepted: Value = http
        .post(format!("{base}/api/v1/upload"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("fileflow answers")
        .json()
        .await
        .expect("an id");
    let id = accepted["id"].as_str().unwrap_or_else(|| panic!("refused: {accepted}")).to_owned();
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
            Some("completed") => return started.elapsed(),
            Some("failed" | "cancelled") => panic!("the small job did not complete: {job}"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn tries(base: &str, key: &str, url: &str, from: usize) -> Vec<f64> {
    let mut times = Vec::with_capacity(TRIES);
    for n in from..from + TRIES {
        times.push(one_job(base, key, url, n).await.as_secs_f64() * 1000.0);
    }
    times
}

impl Bench {
    /// The fair-share table and the claim-cost table.
    pub async fn fair(&mut self) -> (Table, Table) {
        let data = self.scratch.path().join("fair");
        std::fs::create_dir_all(&data).expect("scratch");
        let busy_key = create_key(&data).await;
        let other_key = create_key(&data).await;
        let serve = Fileflow::start("serve", &data, &[]).await;
        let small = self.origin.url("/file/1024");
        let mut idle = tries(&serve.base, &other_key, &small, 0).await;

        // 10,000 jobs of 50 ms each from the busy key: 62 s of work for 8 slots.
        let http = client();
        let slow = self.origin.url("/delay/50/1024");
        for chunk in 0..BACKLOG / 1000 {
            let items: Vec<Value> = (0..1000)
                .map(|i| json!({ "file_url": slow, "bucket_name": "bench-fair", "object_name": format!("busy/{chunk}/{i}") }))
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
        let mut beside = tries(&serve.base, &other_key, &small, TRIES).await;
        serve.stop().await;

        let mut table = Table::new(
            "fair share",
            "Another key's 1 KiB job, submitted and followed to `completed` one at a time (20 \
             tries), on an idle `fileflow serve` (release, defaults: 8 slots) and while one key's \
             10,000 jobs of 50 ms wait (62 s of work for the 8 slots). First come, first served, \
             each try would wait behind what is left of the backlog.",
            &["server", "p50 ms", "p99 ms", "p50 ratio to idle"],
        );
        let idle_p50 = median(&mut idle.clone());
        table.row(vec!["idle".into(), f1(idle_p50), f1(quantile(&mut idle, 0.99)), "1.00".into()]);
        let beside_p50 = median(&mut beside.clone());
        table.row(vec![
            format!("beside a {BACKLOG}-job backlog of another key"),
            f1(beside_p50),
            f1(quantile(&mut beside, 0.99)),
            f2(beside_p50 / idle_p50),
        ]);
        (table, self.claims().await)
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
