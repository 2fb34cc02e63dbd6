//! Who may call the API: API keys, the protected mode that decides when a key is needed,
//! and per-key request rates.
//!
//! `--auth auto` (the default) leaves the API open only while it listens on a loopback
//! address and no key has been created, so `fileflow serve` on a laptop works with no
//! setup; once a key exists, or on any other address, every `/api/` request needs one.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

pub use crate::domain::{ApiKey, IssuedKey, KeyLimits, NewKey, Role, Scope};
pub use crate::metadata::KeyStore;
use crate::metadata::RepoError;

/// `--auth`: whether the API asks for keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Open on a loopback listener while no key exists; otherwise a key is required.
    Auto,
    /// Every `/api/` request needs a key.
    Required,
    /// No keys asked for, on any address (logged at every start).
    Off,
}

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The API is open (no keys, or `--auth off`): the caller may do what an admin may.
    Open,
    Key(Arc<ApiKey>),
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        match self {
            Self::Open => true,
            Self::Key(key) => key.is_admin(),
        }
    }

    /// The key to record as a new job's owner.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Self::Open => None,
            Self::Key(key) => Some(&key.id),
        }
    }

    /// Whether the caller may see a job created by `owner`: admins see every job, a
    /// submitter only its own.
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        self.is_admin() || owner.is_some_and(|owner| Some(owner) == self.key_id())
    }
}

/// Why a request was turned away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A key that is malformed, unknown or revoked.
    Invalid,
    /// Over the key's request rate; try again after this long.
    RateLimited(Duration),
    /// The address sent too many requests without a valid key; try again after this long.
    /// Decided before any key is looked up.
    TooManyStrangers(Duration),
    /// The key could not be looked up (the database is unavailable): neither let in nor
    /// told its key is bad.
    Unavailable,
}

/// How often, while the API is open, it looks whether a key has been created since.
const KEY_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Whether requests need a key.
enum Door {
    /// Never (`--auth off`).
    Open,
    /// Always (`required`, or `auto` once a key exists or off loopback).
    Keyed,
    /// Not while no key exists (`auto` on loopback): looked at once a second (`checked`),
    /// and `closed` for good once a key exists.
    OpenUntilAKeyExists { closed: AtomicBool, checked: Mutex<Instant> },
}

/// Decides, per request, who is calling and whether they may.
pub struct Gate {
    keys: Arc<dyn KeyStore>,
    door: Door,
    pub defaults: KeyLimits,
    rates: Mutex<HashMap<String, (u32, Arc<DefaultDirectRateLimiter>)>>,
    /// Requests without a valid key, per client address.
    strangers: Option<Strangers>,
    /// Whether keys were valid when last looked up for a stream or a link, and when.
    validity: Mutex<HashMap<String, (Instant, bool)>>,
}

/// How long a key's validity, looked up for an open stream or a signed link, is trusted:
/// a revoked key's streams and links stop within this (plus a stream's check interval).
const VALIDITY_TTL: Duration = Duration::from_millis(500);

/// How many requests without a valid key an address may send at once, in seconds of its rate.
const STRANGER_BURST_SECONDS: u32 = 5;
/// Addresses tracked before the ones that went quiet are forgotten.
const STRANGERS_TRACKED: usize = 10_000;

/// The per-address allowance of requests without a valid key (a token bucket: `rate` per
/// second, up to `burst`). Each refused request (401) spends one; an address with none left
/// is turned away (429) before its key is looked up, until its allowance refills. Once an
/// address has spent any, each of its requests reserves one before the lookup and gets it
/// back if its key was good, so however many it sends at once, no more than its allowance
/// reach the key store. (governor's limiters cannot give a reservation back.) Callers from
/// addresses that send no bad keys never wait here.
struct Strangers {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

struct Bucket {
    /// What is left; below zero when more requests failed at once than the allowance held.
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        self.tokens = (self.tokens + rate * now.saturating_duration_since(self.at).as_secs_f64()).min(burst);
        self.at = now;
    }
}

/// What [`Strangers::reserve`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reserved {
    /// The address has its whole allowance: nothing was taken.
    Nothing,
    /// One was taken, to be given back if the key is good.
    One,
}

impl Strangers {
    fn new(per_second: u32) -> Option<Self> {
        let rate = f64::from(NonZeroU32::new(per_second)?.get());
        Some(Self { rate, burst: rate * f64::from(STRANGER_BURST_SECONDS), buckets: Mutex::new(HashMap::new()) })
    }

    /// Before a lookup for `ip`: how long it must wait if its allowance is spent.
    fn reserve(&self, ip: IpAddr) -> Result<Reserved, Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let Some(bucket) = buckets.get_mut(&ip) else { return Ok(Reserved::Nothing) };
        bucket.refill(now, self.rate, self.burst);
        if bucket.tokens >= self.burst {
            buckets.remove(&ip);
            return Ok(Reserved::Nothing);
        }
        if bucket.tokens < 1.0 {
            return Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate));
        }
        bucket.tokens -= 1.0;
        Ok(Reserved::One)
    }

    /// After the lookup: a refused request spends one of the allowance (unless reserved),
    /// an admitted one gives its reservation back.
    fn settle(&self, ip: IpAddr, reserved: Reserved, refused: bool) {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        match (reserved, refused) {
            (Reserved::One, false) => {
                if let Some(bucket) = buckets.get_mut(&ip) {
                    bucket.tokens = (bucket.tokens + 1.0).min(self.burst);
                }
            }
            (Reserved::Nothing, true) => {
                if buckets.len() >= STRANGERS_TRACKED {
                    // Forget the addresses whose allowance is whole again.
                    let (rate, burst) = (self.rate, self.burst);
                    buckets.retain(|_, b| {
                        b.refill(now, rate, burst);
                        b.tokens < burst
                    });
                }
                let bucket = buckets.entry(ip).or_insert(Bucket { tokens: self.burst, at: now });
                bucket.refill(now, self.rate, self.burst);
                bucket.tokens -= 1.0;
            }
            _ => {}
        }
        if refused && buckets.get(&ip).is_some_and(|b| b.tokens < 1.0) {
            tracing::debug!(%ip, "too many requests without a valid API key from one address");
        }
    }
}

impl Gate {
    /// The gate for an API listening on `listen`. In `auto` mode a listener that is not on
    /// loopback with no key created refuses to start: it would be open to whoever reaches it.
    pub async fn new(
        mode: AuthMode,
        listen: SocketAddr,
        keys: Arc<dyn KeyStore>,
        defaults: KeyLimits,
        unauthenticated_rate: u32,
    ) -> anyhow::Result<Self> {
        let have_keys = keys.has_keys().await?;
        let loopback = listen.ip().is_loopback();
        let door = match mode {
            AuthMode::Off => {
                tracing::warn!(%listen, "--auth off: the API asks for no key; anyone who reaches it may use it");
                Door::Open
            }
            AuthMode::Required => Door::Keyed,
            AuthMode::Auto if !loopback && !have_keys => anyhow::bail!(
                "fileflow would listen on {listen}, which is not a loopback address, and no API key exists: \
                 anyone who reaches it could use it. Create a key first, with the same --data-dir or \
                 --database-url: `fileflow keys create --name admin --role admin`. Or listen on 127.0.0.1, \
                 or pass --auth off to run it open on purpose."
            ),
            AuthMode::Auto if have_keys => Door::Keyed,
            AuthMode::Auto => {
                tracing::info!(%listen, "API open on loopback while no API key exists (`fileflow keys create` protects it)");
                Door::OpenUntilAKeyExists { closed: AtomicBool::new(false), checked: Mutex::new(Instant::now()) }
            }
        };
        let strangers = Strangers::new(unauthenticated_rate);
        Ok(Self {
            keys,
            door,
            defaults,
            rates: Mutex::new(HashMap::new()),
            strangers,
            validity: Mutex::new(HashMap::new()),
        })
    }

    /// The caller presenting `bearer` (the token of an `Authorization: Bearer` header) from
    /// `peer`, if allowed in.
    pub async fn admit(&self, bearer: Option<&str>, peer: Option<IpAddr>) -> Result<Caller, Refusal> {
        if self.is_open().await {
            return Ok(Caller::Open);
        }
        let Some((strangers, ip)) = self.strangers.as_ref().zip(peer) else {
            return self.admit_key(bearer).await;
        };
        let reserved = strangers.reserve(ip).map_err(Refusal::TooManyStrangers)?;
        let admitted = self.admit_key(bearer).await;
        strangers.settle(ip, reserved, matches!(admitted, Err(Refusal::Missing | Refusal::Invalid)));
        admitted
    }

    async fn admit_key(&self, bearer: Option<&str>) -> Result<Caller, Refusal> {
        let presented = bearer.ok_or(Refusal::Missing)?;
        let id = crate::domain::api_key::key_id(presented).ok_or(Refusal::Invalid)?;
        let found = self.keys.find_key(id).await.map_err(|e| {
            tracing::error!(error = %e, "cannot look up an API key");
            Refusal::Unavailable
        })?;
        let Some((key, digest)) = found else { return Err(Refusal::Invalid) };
        if !crate::domain::api_key::matches(presented, &digest) || key.revoked_at.is_some() {
            return Err(Refusal::Invalid);
        }
        self.check_rate(&key)?;
        Ok(Caller::Key(Arc::new(key)))
    }

    /// The caller a key's background work acts as (a batch read after its request
    /// ended): the key as it is now; `None` once it is revoked or gone.
    pub async fn caller_for_key(&self, id: &str) -> Result<Option<Caller>, RepoError> {
        let found = self.keys.find_key(id).await?;
        Ok(found.filter(|(key, _)| key.revoked_at.is_none()).map(|(key, _)| Caller::Key(Arc::new(key))))
    }

    /// Whether the key `id` exists and is not revoked (looked up at most once per
    /// [`VALIDITY_TTL`] per key).
    pub async fn key_valid(&self, id: &str) -> Result<bool, RepoError> {
        {
            let validity = self.validity.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, valid)) = validity.get(id)
                && at.elapsed() < VALIDITY_TTL
            {
                return Ok(*valid);
            }
        }
        let valid = matches!(self.keys.find_key(id).await?, Some((key, _)) if key.revoked_at.is_none());
        self.validity.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_owned(), (Instant::now(), valid));
        Ok(valid)
    }

    /// Whether `caller`, admitted when its request began, would still be: its key is not
    /// revoked, or the open API is still open. Long-lived answers (event streams) ask this
    /// as they go. When it cannot be told (the database does not answer), no.
    pub async fn still_admits(&self, caller: &Caller) -> bool {
        match caller {
            Caller::Open => self.is_open().await,
            Caller::Key(key) => self.key_valid(&key.id).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot tell whether an API key is still valid; ending its stream");
                false
            }),
        }
    }

    /// Whether the API is open now. An API open until a key exists looks for keys at most
    /// once a second and closes for good once one does.
    async fn is_open(&self) -> bool {
        let (closed, checked) = match &self.door {
            Door::Open => return true,
            Door::Keyed => return false,
            Door::OpenUntilAKeyExists { closed, checked } => (closed, checked),
        };
        if closed.load(Ordering::Relaxed) {
            return false;
        }
        {
            let mut checked = checked.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if now.duration_since(*checked) < KEY_CHECK_INTERVAL {
                return true;
            }
            *checked = now;
        }
        match self.keys.has_keys().await {
            Ok(false) => true,
            Ok(true) => {
                tracing::info!("an API key exists now: every API request needs one from here on");
                closed.store(true, Ordering::Relaxed);
                false
            }
            Err(e) => {
                // Fail closed: a key may exist that cannot be seen now.
                tracing::error!(error = %e, "cannot tell whether API keys exist; asking for one");
                false
            }
        }
    }

    /// The limits that hold for `key`: its own, or the server's defaults.
    pub fn limits_of(&self, key: &ApiKey) -> KeyLimits {
        KeyLimits {
            rate_limit: key.limits.rate_limit.or(self.defaults.rate_limit),
            max_unfinished: key.limits.max_unfinished.or(self.defaults.max_unfinished),
            max_file_size: key.limits.max_file_size.or(self.defaults.max_file_size),
            weight: key.limits.weight.or(self.defaults.weight),
        }
    }

    fn check_rate(&self, key: &ApiKey) -> Result<(), Refusal> {
        let Some(rate) = self.limits_of(key).rate_limit.and_then(NonZeroU32::new) else { return Ok(()) };
        let limiter = {
            let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
            let entry = rates
                .entry(key.id.clone())
                .or_insert_with(|| (rate.get(), Arc::new(RateLimiter::direct(Quota::per_second(rate)))));
            if entry.0 != rate.get() {
                *entry = (rate.get(), Arc::new(RateLimiter::direct(Quota::per_second(rate))));
            }
            entry.1.clone()
        };
        limiter
            .check()
            .map_err(|not_until| Refusal::RateLimited(not_until.wait_time_from(DefaultClock::default().now())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_that_spent_its_allowance_waits_and_good_keys_give_reservations_back() {
        let strangers = Strangers::new(2).unwrap(); // 2/s, a burst of 10
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        // An address with no failures takes nothing, however much it asks.
        for _ in 0..50 {
            assert_eq!(strangers.reserve(other), Ok(Reserved::Nothing));
        }
        // Ten refusals spend the burst; then it waits, before any lookup.
        for _ in 0..10 {
            let reserved = strangers.reserve(ip).unwrap();
            strangers.settle(ip, reserved, true);
        }
        let wait = strangers.reserve(ip).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(500), "{wait:?}");
        assert_eq!(strangers.reserve(other), Ok(Reserved::Nothing), "other addresses are untouched");
    }

    #[test]
    fn requests_in_flight_at_once_cannot_pass_the_allowance() {
        let strangers = Strangers::new(2).unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let first = strangers.reserve(ip).unwrap();
        strangers.settle(ip, first, true); // one failure: 9 left
        // 30 requests reach the gate before any lookup ends: only 9 are let through.
        let reserved: Vec<_> = (0..30).map(|_| strangers.reserve(ip)).collect();
        assert_eq!(reserved.iter().filter(|r| r.is_ok()).count(), 9);
        // Good keys among them give their reservations back.
        for _ in 0..9 {
            strangers.settle(ip, Reserved::One, false);
        }
        assert!(strangers.reserve(ip).is_ok());
    }
}
