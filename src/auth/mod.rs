//! Who may call the API: API keys, the protected mode that decides when a key is needed,
//! and per-key request rates.
//!
//! `--auth auto` (the default) leaves the API open only while it listens on a loopback
//! address and no key has been created, so `fileflow serve` on a laptop works with no
//! setup; once a key exists, or on any other address, every `/api/` request needs one.

pub mod cli;
pub mod keys;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::metadata::RepoError;
pub use keys::{ApiKey, IssuedKey, KeyLimits, NewKey, Role, Scope};

/// Where API keys are kept: the metadata database.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Record a new key under the issued id and digest.
    async fn create_key(&self, issued: &IssuedKey, key: &NewKey, now: DateTime<Utc>) -> Result<ApiKey, RepoError>;

    /// Every key, revoked ones included, oldest first.
    async fn list_keys(&self) -> Result<Vec<ApiKey>, RepoError>;

    /// Revoke a key; `false` when there is no such key or it was already revoked.
    async fn revoke_key(&self, id: &str, now: DateTime<Utc>) -> Result<bool, RepoError>;

    /// The key with this id and the digest of its secret.
    async fn find_key(&self, id: &str) -> Result<Option<(ApiKey, String)>, RepoError>;

    /// Whether any key was ever created (revoked ones count: the API stays protected).
    async fn has_keys(&self) -> Result<bool, RepoError>;
}

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

/// The per-address allowance of requests without a valid key: each refused request (401)
/// spends one; an address with none left is turned away (429) before its key is looked up,
/// until its allowance refills. Callers with good keys from other addresses are unaffected.
struct Strangers {
    refused: DefaultKeyedRateLimiter<IpAddr>,
    /// Addresses out of allowance, and until when.
    benched: Mutex<HashMap<IpAddr, Instant>>,
}

impl Strangers {
    fn new(per_second: u32) -> Option<Self> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = rate.saturating_mul(NonZeroU32::new(STRANGER_BURST_SECONDS).expect("not zero"));
        Some(Self {
            refused: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            benched: Mutex::new(HashMap::new()),
        })
    }

    /// How long `ip` must still wait, if it is out of allowance.
    fn waiting(&self, ip: IpAddr) -> Option<Duration> {
        let mut benched = self.benched.lock().unwrap_or_else(|p| p.into_inner());
        let until = *benched.get(&ip)?;
        let now = Instant::now();
        if until > now {
            return Some(until - now);
        }
        benched.remove(&ip);
        None
    }

    /// Spend one of `ip`'s allowance on a refused request.
    fn refused(&self, ip: IpAddr) {
        if self.refused.len() > STRANGERS_TRACKED {
            self.refused.retain_recent();
        }
        if let Err(not_until) = self.refused.check_key(&ip) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let mut benched = self.benched.lock().unwrap_or_else(|p| p.into_inner());
            if benched.len() > STRANGERS_TRACKED {
                let now = Instant::now();
                benched.retain(|_, until| *until > now);
            }
            benched.insert(ip, Instant::now() + wait);
            tracing::warn!(%ip, "too many requests without a valid API key from one address; refusing it for a while");
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
        let strangers = self.strangers.as_ref().zip(peer);
        if let Some((strangers, ip)) = strangers
            && let Some(wait) = strangers.waiting(ip)
        {
            return Err(Refusal::TooManyStrangers(wait));
        }
        let admitted = self.admit_key(bearer).await;
        if let (Some((strangers, ip)), Err(Refusal::Missing | Refusal::Invalid)) = (strangers, &admitted) {
            strangers.refused(ip);
        }
        admitted
    }

    async fn admit_key(&self, bearer: Option<&str>) -> Result<Caller, Refusal> {
        let presented = bearer.ok_or(Refusal::Missing)?;
        let id = keys::key_id(presented).ok_or(Refusal::Invalid)?;
        let found = self.keys.find_key(id).await.map_err(|e| {
            tracing::error!(error = %e, "cannot look up an API key");
            Refusal::Unavailable
        })?;
        let Some((key, digest)) = found else { return Err(Refusal::Invalid) };
        if !keys::matches(presented, &digest) || key.revoked_at.is_some() {
            return Err(Refusal::Invalid);
        }
        self.check_rate(&key)?;
        Ok(Caller::Key(Arc::new(key)))
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
