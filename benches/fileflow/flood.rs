//! Hostile neighbours: one address floods the API (requests with made-up keys as fast as it
//! can, and connections held open past its share) while another client, with a good key,
//! submits jobs; its accept latency is compared with a quiet run.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::load;
use crate::process::Fileflow;
use crate::report::Table;
use crate::{Bench, f2, services};

/// The flooding address (another loopback address than the good client's 127.0.0.1).
const FLOODER: &str = "127.0.0.2";
/// Tasks sending made-up keys back to back.
const FLOOD_TASKS: usize = 64;
/// Connections the flooder tries to hold open at once.
const FLOOD_CONNECTIONS: usize = 2000;
/// The good client's closed-loop clients.
const CLIENTS: usize = 8;

/// Counts of what the flood got.
#[derive(Default)]
struct FloodCounts {
    unauthorized: AtomicUsize,
    limited: AtomicUsize,
    other: AtomicUsize,
    opened: AtomicUsize,
}

fn flood_client() -> reqwest::Client {
    let ip: IpAddr = FLOODER.parse().expect("an address");
    reqwest::Client::builder().no_proxy().local_address(ip).pool_max_idle_per_host(FLOOD_TASKS).build().expect("builds")
}

/// Flood `base` from [`FLOODER`] until `stop`.
async fn flood(base: String, counts: Arc<FloodCounts>, stop: Arc<AtomicBool>) {
    let addr = base.trim_start_matches("http://").to_owned();
    let mut tasks = Vec::new();
    // Connections held open: idle sockets, as a slowloris would keep them.
    tasks.push(tokio::spawn({
        let (counts, stop) = (counts.clone(), stop.clone());
        async move {
            let mut held = Vec::new();
            for _ in 0..FLOOD_CONNECTIONS {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
                let _ = socket.bind((FLOODER.parse::<IpAddr>().expect("an address"), 0).into());
                if let Ok(stream) = socket.connect(addr.parse().expect("an address")).await {
                    held.push(stream);
                    counts.opened.fetch_add(1, Ordering::Relaxed);
                }
            }
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }));
    let client = flood_client();
    for t in 0..FLOOD_TASKS {
        let (client, counts, stop, url) =
            (client.clone(), counts.clone(), stop.clone(), format!("{base}/api/v1/uploads"));
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let sent = client.get(&url).bearer_auth(format!("ffk_{t:04}{n:08}_made-up")).send().await;
                let counter = match sent.map(|r| r.status().as_u16()) {
                    Ok(401) => &counts.unauthorized,
                    Ok(429) => &counts.limited,
                    _ => &counts.other,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

impl Bench {
    pub async fn flood(&mut self) -> Table {
        let mut table = Table::new(
            "Accept while another address floods the API",
            "A `fileflow api` process with keys required (`--auth required`, default limits: 128 connections per \
             address, 20 keyless requests per second per address; the good key's own rate and unfinished-jobs \
             limits lifted). A client on 127.0.0.1 submits jobs with a good \
             key (8 closed-loop clients, 2 s warm-up, 8 s measured), first quietly, then while 127.0.0.2 sends \
             requests with made-up keys from 64 tasks back to back and tries to hold 2,000 connections open.",
            &[
                "run",
                "accepted/s",
                "p50 ms",
                "p99 ms",
                "max ms",
                "errors",
                "flood: 401",
                "flood: 429",
                "flood: other",
                "flood: connections opened",
            ],
        );
        let data = self.dir(&services::unique("flood"));
        // The good key's own limits (100 requests/s, 10,000 unfinished jobs) would cap it
        // below what the server can take: lifted, so only the flood can slow it.
        let env: Vec<(String, String)> =
            [("FILEFLOW_AUTH", "required"), ("FILEFLOW_KEY_RATE_LIMIT", "0"), ("FILEFLOW_KEY_MAX_UNFINISHED", "0")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
        let key = crate::process::create_key(&data).await;
        let api = Fileflow::start("api", &data, &env).await;
        let measure = |base: String, key: String, files: Box<dyn Fn(usize) -> String + Send + Sync>| async move {
            let upload = load::upload(&base, "bench-flood", files);
            let request = move |client: &reqwest::Client, n| upload(client, n).bearer_auth(&key);
            load::closed_loop(CLIENTS, Duration::from_secs(2), Duration::from_secs(8), request).await
        };
        let quiet = measure(api.base.clone(), key.clone(), Box::new(self.url("/file/16384?seed={n}".into()))).await;
        let counts = Arc::new(FloodCounts::default());
        let stop = Arc::new(AtomicBool::new(false));
        // The flood runs on a thread and runtime of its own (one core at most), so the
        // good client's latency is the server's, not the benchmark's own scheduling.
        let flooding = {
            let (base, counts, stop) = (api.base.clone(), counts.clone(), stop.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
                runtime.block_on(flood(base, counts, stop));
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let loud = measure(api.base.clone(), key, Box::new(self.url("/file/16384?seed={n}".into()))).await;
        stop.store(true, Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(move || flooding.join()).await;
        for (name, l, c) in [("quiet", &quiet, None), ("flooded", &loud, Some(&counts))] {
            let count = |f: fn(&FloodCounts) -> &AtomicUsize| {
                c.map_or("–".to_owned(), |c| f(c).load(Ordering::Relaxed).to_string())
            };
            table.row(vec![
                name.into(),
                format!("{:.0}", l.per_sec()),
                f2(l.quantile_ms(0.50)),
                f2(l.quantile_ms(0.99)),
                f2(l.max_ms()),
                l.errors.to_string(),
                count(|c| &c.unauthorized),
                count(|c| &c.limited),
                count(|c| &c.other),
                count(|c| &c.opened),
            ]);
        }
        let ratio = loud.quantile_ms(0.99) / quiet.quantile_ms(0.99);
        self.notes
            .push(format!("flood: the good client's accept p99 flooded ÷ quiet = {ratio:.2} (the goal: within 2×)"));
        api.stop().await;
        table
    }
}
