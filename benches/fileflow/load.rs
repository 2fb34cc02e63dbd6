//! The load generator: closed-loop clients, each sending its next request when the last one
//! is answered, and open-loop (paced) load, requests sent at a fixed rate whatever the answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().pool_max_idle_per_host(1024).build().expect("a plain client builds")
}

/// The body of `POST /api/v1/upload` for job `n`.
pub fn upload_body(file_url: &str, bucket: &str, n: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({ "file_url": file_url, "bucket_name": bucket, "object_name": format!("bench/{n:06}") }))
        .expect("JSON serialises")
}

pub struct Latencies {
    /// Microseconds, sorted.
    sorted_us: Vec<u64>,
    pub errors: usize,
    pub secs: f64,
}

impl Latencies {
    pub fn count(&self) -> usize {
        self.sorted_us.len()
    }

    pub fn per_sec(&self) -> f64 {
        self.count() as f64 / self.secs
    }

    /// The `q` quantile (0..=1) in milliseconds, nearest rank.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.sorted_us.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * self.sorted_us.len() as f64).ceil() as usize).clamp(1, self.sorted_us.len());
        self.sorted_us[rank - 1] as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.sorted_us.last().map_or(f64::NAN, |&us| us as f64 / 1000.0)
    }
}

/// How request `n` of a load run is made.
pub trait MakeRequest: Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync + 'static {}
impl<F: Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync + 'static> MakeRequest for F {}

/// `POST /api/v1/upload` of job `n`, whose source `file_url(n)` names, into `bucket`.
pub fn upload(
    base: &str,
    bucket: &str,
    file_url: impl Fn(usize) -> String + Send + Sync + 'static,
) -> impl MakeRequest {
    let (url, bucket) = (format!("{base}/api/v1/upload"), bucket.to_owned());
    move |client: &reqwest::Client, n| {
        client.post(&url).header("content-type", "application/json").body(upload_body(&file_url(n), &bucket, n))
    }
}

/// Send `request` and read its whole answer; whether it succeeded.
async fn answered(request: reqwest::RequestBuilder) -> bool {
    match request.send().await.and_then(|r| r.error_for_status()) {
        Ok(r) => r.bytes().await.is_ok(),
        Err(_) => false,
    }
}

/// Closed loop: `connections` clients send requests back to back for `warmup + measure`,
/// each its next as soon as the last is answered; only requests sent after the warm-up count.
pub async fn closed_loop(
    connections: usize,
    warmup: Duration,
    measure: Duration,
    request: impl MakeRequest,
) -> Latencies {
    let client = client();
    let next = Arc::new(AtomicUsize::new(0));
    let request = Arc::new(request);
    let started = Instant::now();
    let (measure_from, measure_to) = (started + warmup, started + warmup + measure);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (client, next, request) = (client.clone(), next.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            loop {
                let sent = Instant::now();
                if sent >= measure_to {
                    break;
                }
                let ok = answered(request(&client, next.fetch_add(1, Ordering::Relaxed))).await;
                if sent >= measure_from {
                    if ok {
                        latencies.push(sent.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (latencies, e) = task.await.expect("a load task does not panic");
        all.extend(latencies);
        errors += e;
    }
    all.sort_unstable();
    Latencies { sorted_us: all, errors, secs: measure.as_secs_f64() }
}

/// Open loop: `rate` requests a second for `warmup + measure`, each sent at its own time
/// whatever became of the ones before, as independent users send them (a closed loop
/// would hold the next request back while one is slow, and so hide the slow spell).
/// Latency counts from sending the request (the runtime's timer wakes the generator at
/// millisecond steps, so measuring from the scheduled time would add up to a millisecond
/// of the generator's own to every figure). Requests scheduled after the warm-up count.
pub async fn paced(rate: f64, warmup: Duration, measure: Duration, request: impl MakeRequest) -> Latencies {
    let client = client();
    let request = Arc::new(request);
    let started = Instant::now();
    let measure_from = started + warmup;
    let total = (rate * (warmup + measure).as_secs_f64()) as usize;
    let mut tasks = Vec::with_capacity(total);
    for n in 0..total {
        let due = started + Duration::from_secs_f64(n as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let (client, request) = (client.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let ok = answered(request(&client, n)).await;
            (due >= measure_from).then(|| (ok, sent.elapsed().as_micros() as u64))
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for task in tasks {
        match task.await.expect("a load task does not panic") {
            Some((true, us)) => all.push(us),
            Some((false, _)) => errors += 1,
            None => {}
        }
    }
    all.sort_unstable();
    Latencies { sorted_us: all, errors, secs: measure.as_secs_f64() }
}

/// Run `work(n)` for every `n` in `0..count`, `workers` at a time: each worker is a task
/// that takes the next `n` as soon as its last one is done. Panics if any work panics.
pub async fn each_index<Work, Done>(workers: usize, count: usize, work: Work)
where
    Work: Fn(usize) -> Done + Send + Sync + 'static,
    Done: Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let work = Arc::new(work);
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (next, work) = (next.clone(), work.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        break;
                    }
                    work(n).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a worker does not panic");
    }
}

/// Submit jobs `0..jobs` through `connections` clients as fast as they are accepted.
/// Panics if any is refused: a pipeline run is only meaningful if every job got in.
pub async fn submit_all(
    base: &str,
    connections: usize,
    jobs: usize,
    bucket: &str,
    file_url: impl Fn(usize) -> String + Send + Sync + 'static,
) {
    let (client, request) = (client(), Arc::new(upload(base, bucket, file_url)));
    each_index(connections, jobs, move |n| {
        let sent = request(&client, n).send();
        async move {
            let response = sent.await.expect("fileflow answers");
            assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED, "job {n} was not accepted");
        }
    })
    .await;
}
