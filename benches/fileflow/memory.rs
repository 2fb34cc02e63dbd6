//! Full load: every default slot busy with a large file at once (64 jobs of 32 MiB from 8
//! origin hosts, 8 places each), into the disk store and into S3, with the process's peak
//! memory beside its budget (`--max-memory`, the default 1 GiB and 256 MiB).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::load::client;
use crate::origin::Origin;
use crate::process::{Fileflow, create_key_in};
use crate::report::Table;
use crate::services::unique;
use crate::{Bench, MIB, f1};

/// Jobs at once: the default `--worker-concurrency`.
const JOBS: usize = 64;
/// Origin hosts: 64 slots ÷ the default 8 places per host.
const HOSTS: usize = 8;
const FILE: u64 = 32 * 1024 * 1024;

impl Bench {
    pub async fn memory(&mut self) -> Table {
        let mut table = Table::new(
            "memory at full load",
            &format!(
                "{JOBS} jobs of {} MiB submitted at once from {HOSTS} origin hosts (127.0.0.1–8, \
                 {} places each), so every default slot of one `fileflow serve` (release, \
                 defaults otherwise) transfers a large file at once. Peak RSS is the process's \
                 VmHWM over the run, which includes the runtime, the database and the HTTP \
                 clients besides the transfers' buffers.",
                FILE >> 20,
                JOBS / HOSTS
            ),
            &["store", "--max-memory", "MiB/s", "peak RSS MiB"],
        );
        let mut origins = Vec::with_capacity(HOSTS);
        for host in 1..=HOSTS {
            origins.push(Origin::start_on(&format!("127.0.0.{host}")).await);
        }
        let mut stores = vec![("disk", Vec::new())];
        match &self.s3 {
            Some(s3) => stores.push(("S3 (Garage)", s3.env())),
            None => self.notes.push("memory at full load into S3: not run (no FILEFLOW_TEST_S3_*)".into()),
        }
        for (store, env) in stores {
            for budget in ["1GiB", "256MiB"] {
                let mut env = env.clone();
                env.push(("FILEFLOW_MAX_MEMORY".into(), budget.into()));
                let (rate, rss) = self.full_load(&env, &origins).await;
                table.row(vec![store.into(), budget.into(), f1(rate), f1(rss)]);
            }
        }
        table
    }

    /// One run: MiB/s from the first submit to the last completion, and peak RSS in MiB.
    async fn full_load(&mut self, env: &[(String, String)], origins: &[Origin]) -> (f64, f64) {
        let data = self.dir(&unique("memory"));
        let key = create_key_in(&data, env).await;
        let serve = Fileflow::start("serve", &data, env).await;
        let bucket = unique("bench-memory");
        let items: Vec<Value> = (0..JOBS)
            .map(|n| {
                let url = origins[n % HOSTS].url(&format!("/file/{FILE}?seed={n}"));
                json!({ "file_url": url, "bucket_name": bucket, "object_name": format!("large/{n}") })
            })
            .collect();
        let http = client();
        let started = Instant::now();
        let answer: Value = http
            .post(format!("{}/api/v1/uploads/batch", serve.base))
            .bearer_auth(&key)
            .json(&json!({ "items": items }))
            .send()
            .await
            .expect("fileflow answers")
            .json()
            .await
            .expect("a batch answer");
        let ids: Vec<String> = answer["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| r["id"].as_str().unwrap_or_else(|| panic!("refused: {r}")).to_owned())
            .collect();
        for id in &ids {
            crate::fair::completed(&http, &serve.base, &key, id, Duration::from_millis(100)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let rss = serve.peak_rss_mib();
        serve.stop().await;
        let _ = std::fs::remove_dir_all(&data);
        ((JOBS as u64 * FILE) as f64 / MIB / secs, rss)
    }
}
