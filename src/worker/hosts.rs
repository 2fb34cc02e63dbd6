//! Politeness towards origins: at most so many transfers at once per origin host (shared
//! by a worker process's slots), and a host that answered 429 or 503 with `Retry-After` is
//! left alone until then, while jobs for other hosts keep flowing. A host's window adapts
//! (AIMD, as TCP's and aria2's): it halves each time the host answers 429 or 503, and grows
//! back by one with each transfer from it that ends well, up to the limit. A host the
//! operator names with a rate (`--host-rate files.example.com=10MiB`) gets at most that
//! many bytes a second across all of the process's transfers from it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::storage::ByteStream;

/// Longest a job for a host whose places (running and waiting) are all taken is put back
/// before it is tried again; it comes back sooner when the host's transfers are short (see
/// [`Window::turn_in`]).
const BUSY_DEFERRAL: Duration = Duration::from_secs(1);
/// Shortest such deferral: a job put back costs two writes, and each comes back at most
/// this often.
const MIN_DEFERRAL: Duration = Duration::from_millis(20);
/// Hosts remembered before idle ones are forgotten.
const MAX_HOSTS: usize = 10_000;

/// Transfers in flight per host, and hosts that asked to be left alone.
pub struct Hosts {
    limit: usize,
    /// Jobs that may wait for a host's place at once, across hosts (beyond them: not now,
    /// unless the job's key has none waiting for that host).
    max_waiting: usize,
    /// Jobs waiting for a host's place now, across hosts.
    waiting: AtomicUsize,
    state: Mutex<HashMap<String, HostState>>,
    /// Hosts with a bytes-per-second cap, by host name (any port).
    rates: HashMap<String, Arc<Pacer>>,
}

/// A cap on the bytes a second taken from one host (`HOST=RATE`, e.g.
/// `files.example.com=10MiB`): the host's name as in its URLs, any port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRate {
    pub host: String,
    pub bytes_per_second: u64,
}

impl std::str::FromStr for HostRate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (host, rate) =
            s.split_once('=').ok_or_else(|| format!("{s:?}: give HOST=RATE, e.g. files.example.com=10MiB"))?;
        let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
        if host.is_empty() || (host.contains(['/', ':', ' ']) && !host.starts_with('[')) {
            return Err(format!("{s:?}: {host:?} is not a host name (give the name alone, without a scheme or port)"));
        }
        let rate: bytesize::ByteSize = rate.trim().parse().map_err(|e| format!("{s:?}: the rate: {e}"))?;
        if rate.as_u64() == 0 {
            return Err(format!("{s:?}: the rate must be more than 0 bytes a second"));
        }
        Ok(Self { host, bytes_per_second: rate.as_u64() })
    }
}

/// One host's bytes-per-second budget, shared by its transfers.
struct Pacer {
    limiter: DefaultDirectRateLimiter,
    /// Most bytes taken in one go (the limiter's burst).
    burst: u32,
}

impl Pacer {
    fn new(bytes_per_second: u64) -> Self {
        let rate = u32::try_from(bytes_per_second).unwrap_or(u32::MAX).max(1);
        // A tenth of a second's bytes at most in one go (at least one byte), so a paced
        // transfer does not come in bursts of whole seconds.
        let burst = (rate / 10).clamp(1, 1 << 20);
        let quota = Quota::per_second(std::num::NonZeroU32::new(rate).expect("at least 1"))
            .allow_burst(std::num::NonZeroU32::new(burst).expect("at least 1"));
        Self { limiter: RateLimiter::direct(quota), burst }
    }

    /// Wait until `bytes` more may be taken.
    async fn take(&self, mut bytes: usize) {
        while bytes > 0 {
            let n = u32::try_from(bytes).unwrap_or(u32::MAX).min(self.burst);
            let cells = std::num::NonZeroU32::new(n).expect("n > 0");
            // Never more than the burst, so never refused.
            let _ = self.limiter.until_n_ready(cells).await;
            bytes -= n as usize;
        }
    }
}

struct HostState {
    running: Arc<Window>,
    /// Jobs waiting for a place, by their API key (`""`: none).
    waiting: HashMap<String, usize>,
    blocked_until: Option<Instant>,
}

/// A host's places: as many as its window, which shrinks and grows with how the host answers.
struct Window {
    places: Arc<Semaphore>,
    size: AtomicUsize,
    /// Places to take away as transfers end (the window shrank below the places in use).
    owed: AtomicUsize,
    /// How long a transfer holds a place, a moving mean in microseconds (0: none ended yet).
    held_us: AtomicU64,
    /// When the host was first seen.
    since: Instant,
}

impl Window {
    fn new(size: usize) -> Arc<Self> {
        Arc::new(Self {
            places: Arc::new(Semaphore::new(size)),
            size: AtomicUsize::new(size),
            owed: AtomicUsize::new(0),
            held_us: AtomicU64::new(0),
            since: Instant::now(),
        })
    }

    /// A transfer held a place this long.
    fn held(&self, took: Duration) {
        let took = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self.held_us.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |mean| {
            Some(if mean == 0 { took } else { mean - mean / 8 + took / 8 })
        });
    }

    /// About how long until a place frees for a job behind `ahead` waiting ones: a place's
    /// hold time (the mean of the transfers that ended, or before any did, how long the
    /// host has been in use) for each round of the window ahead of it, between
    /// [`MIN_DEFERRAL`] and [`BUSY_DEFERRAL`]. Short transfers bring a deferred job back
    /// in milliseconds; long ones, or a host that has not finished one yet, in up to a second.
    fn turn_in(&self, ahead: usize) -> Duration {
        let held = match self.held_us.load(Ordering::Relaxed) {
            0 => self.since.elapsed(),
            mean => Duration::from_micros(mean),
        };
        let rounds = 1 + ahead / self.size.load(Ordering::Relaxed).max(1);
        held.saturating_mul(u32::try_from(rounds).unwrap_or(u32::MAX)).clamp(MIN_DEFERRAL, BUSY_DEFERRAL)
    }

    /// Whether no transfer holds a place.
    fn idle(&self) -> bool {
        self.places.available_permits() + self.owed.load(Ordering::Relaxed) >= self.size.load(Ordering::Relaxed)
    }

    /// Halve the window (at least one place).
    fn shrink(&self) {
        let size = self.size.load(Ordering::Relaxed);
        let smaller = (size / 2).max(1);
        self.size.store(smaller, Ordering::Relaxed);
        let fewer = size - smaller;
        let taken = self.places.forget_permits(fewer);
        self.owed.fetch_add(fewer - taken, Ordering::Relaxed);
    }

    /// One place more, up to `limit`.
    fn grow(&self, limit: usize) {
        if self.size.load(Ordering::Relaxed) >= limit {
            return;
        }
        self.size.fetch_add(1, Ordering::Relaxed);
        let repaid = self.owed.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| o.checked_sub(1)).is_ok();
        if !repaid {
            self.places.add_permits(1);
        }
    }
}

/// A place among a host's transfers, held while the transfer runs.
pub struct HostPermit {
    permit: Option<OwnedSemaphorePermit>,
    window: Arc<Window>,
    /// When the place was taken (`None`: given back unused, not counted in the hold time).
    taken: Option<Instant>,
}

impl HostPermit {
    fn new(permit: OwnedSemaphorePermit, window: Arc<Window>) -> Self {
        Self { permit: Some(permit), window, taken: Some(Instant::now()) }
    }

    /// Give the place back without having used it: no transfer's hold time.
    pub fn unused(mut self) {
        self.taken = None;
    }
}

impl Drop for HostPermit {
    fn drop(&mut self) {
        if let Some(taken) = self.taken {
            self.window.held(taken.elapsed());
        }
        // A window that shrank below the places in use takes this one away.
        let owed = self.window.owed.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| o.checked_sub(1)).is_ok();
        if let (true, Some(permit)) = (owed, self.permit.take()) {
            permit.forget();
        }
    }
}

/// Why a job may not start now: come back at this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotNow(pub Instant);

impl Hosts {
    /// At most `limit` transfers at once per host (at least one).
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            max_waiting: limit.max(1),
            waiting: AtomicUsize::new(0),
            state: Mutex::new(HashMap::new()),
            rates: HashMap::new(),
        }
    }

    /// The same, letting up to `waiting` jobs (at least the host's limit) wait for a host's
    /// place at once, across hosts: a worker process passes its slots, so jobs waiting for
    /// busy hosts hold at most half of the jobs it keeps claimed, and jobs that can start
    /// now still flow.
    pub fn with_waiting(mut self, waiting: usize) -> Self {
        self.max_waiting = waiting.max(self.limit);
        self
    }

    /// The same, with bytes-per-second caps on the hosts `rates` names.
    pub fn with_rates(mut self, rates: &[HostRate]) -> Self {
        self.rates = rates.iter().map(|r| (r.host.clone(), Arc::new(Pacer::new(r.bytes_per_second)))).collect();
        self
    }

    /// `body`, from `url`'s host, taken no faster than the host's cap (unchanged when it
    /// has none). Every transfer and range from the host shares the cap.
    pub fn paced(&self, url: &url::Url, body: ByteStream) -> ByteStream {
        if self.rates.is_empty() {
            return body;
        }
        let host = url.host_str().unwrap_or("").trim_end_matches('.').to_ascii_lowercase();
        let Some(pacer) = self.rates.get(&host).cloned() else { return body };
        body.then(move |chunk| {
            let pacer = pacer.clone();
            async move {
                if let Ok(bytes) = &chunk {
                    pacer.take(bytes.len()).await;
                }
                chunk
            }
        })
        .boxed()
    }

    /// Take a place among `host`'s transfers for a job of API key `owner`: at once if one
    /// is free; after a wait if fewer jobs wait than may, or if none of `owner`'s waits for
    /// this host (so one key's queue never keeps another key's job out: it waits, rather
    /// than being sent back again and again while the first key's jobs take every freed
    /// place); otherwise, or while the host asked to be left alone, not now.
    pub async fn enter(&self, host: &str, owner: &str) -> Result<HostPermit, NotNow> {
        let running = {
            let mut state = self.lock();
            if state.len() > MAX_HOSTS {
                state.retain(|_, h| !h.waiting.is_empty() || !h.running.idle() || h.blocked_until.is_some());
            }
            let entry = self.entry(&mut state, host);
            let now = Instant::now();
            match entry.blocked_until {
                Some(until) if until > now => return Err(NotNow(until)),
                Some(_) => entry.blocked_until = None,
                None => {}
            }
            if let Ok(permit) = entry.running.places.clone().try_acquire_owned() {
                return Ok(HostPermit::new(permit, entry.running.clone()));
            }
            let mine = entry.waiting.get(owner).copied().unwrap_or(0);
            if mine > 0 && self.waiting.load(Ordering::Relaxed) >= self.max_waiting {
                let ahead = entry.waiting.values().sum();
                return Err(NotNow(now + entry.running.turn_in(ahead)));
            }
            *entry.waiting.entry(owner.to_owned()).or_default() += 1;
            self.waiting.fetch_add(1, Ordering::Relaxed);
            entry.running.clone()
        };
        let waited = Waiting { hosts: self, host, owner };
        let permit = running.places.clone().acquire_owned().await.expect("the semaphore is never closed");
        drop(waited);
        let mut permit = HostPermit::new(permit, running);
        // The host may have asked to be left alone while this job waited.
        match self.lock().get(host).and_then(|h| h.blocked_until) {
            Some(until) if until > Instant::now() => {
                permit.taken = None;
                Err(NotNow(until))
            }
            _ => Ok(permit),
        }
    }

    /// Up to `wanted` more places among `host`'s transfers for a transfer that already
    /// holds one (its extra ranges), only those free now: never a wait, never past the
    /// host's window, none while the host asked to be left alone.
    pub fn more(&self, host: &str, wanted: usize) -> Vec<HostPermit> {
        let mut state = self.lock();
        let entry = self.entry(&mut state, host);
        if entry.blocked_until.is_some_and(|until| until > Instant::now()) {
            return Vec::new();
        }
        let window = entry.running.clone();
        std::iter::from_fn(|| window.places.clone().try_acquire_owned().ok())
            .take(wanted)
            .map(|permit| HostPermit::new(permit, window.clone()))
            .collect()
    }

    /// `host` answered 429 or 503: halve its window.
    pub fn throttled(&self, host: &str) {
        let mut state = self.lock();
        let window = self.entry(&mut state, host).running.clone();
        window.shrink();
        tracing::info!(%host, window = window.size.load(Ordering::Relaxed), "origin host asked to slow down; fewer transfers at once");
    }

    /// A transfer from `host` ended well: one place more, up to the limit.
    pub fn succeeded(&self, host: &str) {
        if let Some(h) = self.lock().get(host) {
            h.running.grow(self.limit);
        }
    }

    /// Hosts now busy (every place taken, jobs waiting), throttled (a window below the
    /// limit) and paused (asked to be left alone), in that order.
    pub fn census(&self) -> (usize, usize, usize) {
        let now = Instant::now();
        let state = self.lock();
        let busy = state.values().filter(|h| !h.waiting.is_empty()).count();
        let throttled = state.values().filter(|h| h.running.size.load(Ordering::Relaxed) < self.limit).count();
        let paused = state.values().filter(|h| h.blocked_until.is_some_and(|until| until > now)).count();
        (busy, throttled, paused)
    }

    /// How many transfers `host` may have at once now.
    pub fn window(&self, host: &str) -> usize {
        self.lock().get(host).map_or(self.limit, |h| h.running.size.load(Ordering::Relaxed))
    }

    fn entry<'a>(&self, state: &'a mut HashMap<String, HostState>, host: &str) -> &'a mut HostState {
        let limit = self.limit;
        state.entry(host.to_owned()).or_insert_with(|| HostState {
            running: Window::new(limit),
            waiting: HashMap::new(),
            blocked_until: None,
        })
    }

    /// `host` asked to be left alone until `until` (a `Retry-After`).
    pub fn block(&self, host: &str, until: Instant) {
        let mut state = self.lock();
        let entry = self.entry(&mut state, host);
        entry.blocked_until = Some(entry.blocked_until.map_or(until, |b| b.max(until)));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HostState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts a job among its host's waiting ones until dropped (also when the wait is cancelled).
struct Waiting<'a> {
    hosts: &'a Hosts,
    host: &'a str,
    owner: &'a str,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(entry) = self.hosts.lock().get_mut(self.host)
            && let Some(count) = entry.waiting.get_mut(self.owner)
        {
            *count -= 1;
            if *count == 0 {
                entry.waiting.remove(self.owner);
            }
        }
        self.hosts.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The host a URL's transfer counts against: its host and port.
pub fn host_of(url: &url::Url) -> String {
    format!("{}:{}", url.host_str().unwrap_or(""), url.port_or_known_default().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deferred_job_comes_back_when_a_place_is_likely_free() {
        let window = Window::new(8);
        // Before any transfer ended, the host's time in use stands in: just seen, the least.
        assert_eq!(window.turn_in(64), MIN_DEFERRAL);
        // Short transfers (2 ms each): nine rounds of the window ahead, 18 ms, so the least.
        for _ in 0..20 {
            window.held(Duration::from_millis(2));
        }
        assert_eq!(window.turn_in(64), MIN_DEFERRAL);
        // 10 ms each: 90 ms for a job behind 64, 10 ms (the least, 20) for one behind none.
        for _ in 0..200 {
            window.held(Duration::from_millis(10));
        }
        let behind_64 = window.turn_in(64);
        assert!((Duration::from_millis(85)..=Duration::from_millis(95)).contains(&behind_64), "{behind_64:?}");
        assert_eq!(window.turn_in(0), MIN_DEFERRAL);
        // Long transfers: a second at most.
        for _ in 0..200 {
            window.held(Duration::from_secs(30));
        }
        assert_eq!(window.turn_in(1), BUSY_DEFERRAL);
    }

    #[tokio::test]
    async fn a_place_given_back_unused_does_not_count_as_a_transfer() {
        let hosts = Hosts::new(1);
        let mut permit = hosts.enter("a:80", "").await.unwrap();
        permit.taken = None;
        drop(permit);
        let window = hosts.lock().get("a:80").unwrap().running.clone();
        assert_eq!(window.held_us.load(Ordering::Relaxed), 0);
        drop(hosts.enter("a:80", "").await.unwrap());
        assert!(window.held_us.load(Ordering::Relaxed) > 0);
    }

    #[tokio::test]
    async fn a_host_takes_its_limit_then_waiters_then_says_not_now() {
        let hosts = Arc::new(Hosts::new(2));
        let a = hosts.enter("a:80", "").await.unwrap();
        let _b = hosts.enter("a:80", "").await.unwrap();
        // Two may wait for a place; a third is told to come back.
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let hosts = hosts.clone();
                tokio::spawn(async move { hosts.enter("a:80", "").await.is_ok() })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(hosts.enter("a:80", "").await, Err(NotNow(_))));
        // Another host is not held up.
        assert!(hosts.enter("b:80", "").await.is_ok());
        drop(a);
        assert!(waiters.into_iter().next().unwrap().await.unwrap(), "a waiter got the freed place");
    }

    #[tokio::test]
    async fn a_full_wait_sends_back_a_keys_next_job_but_lets_another_keys_job_wait() {
        let hosts = Arc::new(Hosts::new(1).with_waiting(2));
        let _running = hosts.enter("a:80", "busy").await.unwrap();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let hosts = hosts.clone();
                tokio::spawn(async move { hosts.enter("a:80", "busy").await.is_ok() })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(hosts.enter("a:80", "busy").await, Err(NotNow(_))), "the process's waiting is full");
        // Another key's job is not sent back: it waits for a place.
        let other = tokio::time::timeout(Duration::from_millis(50), hosts.enter("a:80", "other")).await;
        assert!(other.is_err(), "it waited instead of being told not now");
        // Nor is the busy key's first job for another busy host.
        let _b = hosts.enter("b:80", "busy").await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(50), hosts.enter("b:80", "busy")).await.is_err());
        drop(waiters);
    }

    #[tokio::test]
    async fn a_throttling_host_gets_half_the_places_then_one_more_per_success() {
        let hosts = Hosts::new(8);
        let held: Vec<_> = futures::future::join_all((0..8).map(|_| hosts.enter("a:80", ""))).await;
        hosts.throttled("a:80");
        assert_eq!(hosts.window("a:80"), 4);
        assert_eq!(hosts.census(), (0, 1, 0), "one host throttled");
        hosts.throttled("a:80");
        assert_eq!(hosts.window("a:80"), 2);
        // The eight under way finish; only two places remain.
        drop(held);
        let two: Vec<_> = futures::future::join_all((0..2).map(|_| hosts.enter("a:80", ""))).await;
        assert!(two.iter().all(Result::is_ok));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), hosts.enter("a:80", "")).await.is_err(),
            "a third waits"
        );
        drop(two);
        for _ in 0..10 {
            hosts.succeeded("a:80");
        }
        assert_eq!(hosts.window("a:80"), 8, "back to the limit, not past it");
        let eight: Vec<_> = futures::future::join_all((0..8).map(|_| hosts.enter("a:80", ""))).await;
        assert!(eight.iter().all(Result::is_ok));
        hosts.throttled("a:80");
        hosts.throttled("a:80");
        hosts.throttled("a:80");
        hosts.throttled("a:80");
        assert_eq!(hosts.window("a:80"), 1, "never below one");
    }

    #[tokio::test]
    async fn a_transfer_takes_more_places_only_when_free() {
        let hosts = Hosts::new(4);
        let _one = hosts.enter("a:80", "").await.unwrap();
        let more = hosts.more("a:80", 7);
        assert_eq!(more.len(), 3, "never past the host's limit");
        assert!(hosts.more("a:80", 1).is_empty());
        drop(more);
        assert_eq!(hosts.more("a:80", 2).len(), 2);
        hosts.block("a:80", Instant::now() + Duration::from_secs(60));
        assert!(hosts.more("a:80", 2).is_empty(), "none while the host asked for a pause");
    }

    #[test]
    fn host_rates_read_as_host_equals_rate() {
        let rate: HostRate = "Files.Example.com=10MiB".parse().unwrap();
        assert_eq!(rate, HostRate { host: "files.example.com".into(), bytes_per_second: 10 << 20 });
        for bad in [
            "files.example.com",
            "https://a.example/=1MiB",
            "a.example:8080=1MiB",
            "a.example=0",
            "a.example=fast",
            "=1MiB",
        ] {
            assert!(bad.parse::<HostRate>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_capped_hosts_transfers_share_its_rate_and_others_are_not_paced() {
        let hosts = Hosts::new(8).with_rates(&["slow.example=100KiB".parse().unwrap()]);
        let body = |n: usize| -> ByteStream {
            futures::stream::iter((0..n).map(|_| Ok(bytes::Bytes::from(vec![0u8; 10 * 1024])))).boxed()
        };
        let slow = url::Url::parse("http://slow.example:8080/a").unwrap();
        let other = url::Url::parse("http://fast.example/a").unwrap();
        let started = Instant::now();
        let fast: Vec<_> = hosts.paced(&other, body(100)).collect().await;
        assert_eq!(fast.len(), 100);
        assert!(started.elapsed() < Duration::from_millis(200), "another host is not paced");
        // Two transfers of 100 KiB from the capped host: 200 KiB at 100 KiB/s together,
        // less the first burst (10 KiB).
        let started = Instant::now();
        let (a, b) = futures::future::join(
            hosts.paced(&slow, body(10)).collect::<Vec<_>>(),
            hosts.paced(&slow, body(10)).collect::<Vec<_>>(),
        )
        .await;
        assert_eq!((a.len(), b.len()), (10, 10));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(1800), "200 KiB at 100 KiB/s took {took:?}");
        assert!(took < Duration::from_millis(3000), "{took:?}");
    }

    #[tokio::test]
    async fn a_blocked_host_is_left_alone_until_then() {
        let hosts = Hosts::new(4);
        let until = Instant::now() + Duration::from_millis(100);
        hosts.block("a:443", until);
        assert_eq!(hosts.census(), (0, 0, 1), "one host paused");
        assert_eq!(hosts.enter("a:443", "").await.err(), Some(NotNow(until)));
        assert!(hosts.enter("b:443", "").await.is_ok());
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(hosts.enter("a:443", "").await.is_ok());
        assert_eq!(host_of(&url::Url::parse("https://Example.com/x").unwrap()), "example.com:443");
    }
}
