//! Politeness towards origins: at most so many transfers at once per origin host (shared
//! by a worker process's slots), and a host that answered 429 or 503 with `Retry-After` is
//! left alone until then, while jobs for other hosts keep flowing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a job for a host whose places (running and waiting) are all taken is put back
/// before it is tried again.
pub const BUSY_DEFERRAL: Duration = Duration::from_secs(1);
/// Hosts remembered before idle ones are forgotten.
const MAX_HOSTS: usize = 10_000;

/// Transfers in flight per host, and hosts that asked to be left alone.
pub struct Hosts {
    limit: usize,
    state: Mutex<HashMap<String, HostState>>,
}

struct HostState {
    running: Arc<Semaphore>,
    waiting: usize,
    blocked_until: Option<Instant>,
}

/// A place among a host's transfers, held while the transfer runs.
pub struct HostPermit {
    _permit: OwnedSemaphorePermit,
}

/// Why a job may not start now: come back at this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotNow(pub Instant);

impl Hosts {
    /// At most `limit` transfers at once per host (at least one).
    pub fn new(limit: usize) -> Self {
        Self { limit: limit.max(1), state: Mutex::new(HashMap::new()) }
    }

    /// Take a place among `host`'s transfers: at once if one is free; after a wait if
    /// fewer than `limit` jobs already wait for one; otherwise, or while the host asked to
    /// be left alone, not now.
    pub async fn enter(&self, host: &str) -> Result<HostPermit, NotNow> {
        let running = {
            let mut state = self.lock();
            if state.len() > MAX_HOSTS {
                state.retain(|_, h| {
                    h.waiting > 0 || h.running.available_permits() < self.limit || h.blocked_until.is_some()
                });
            }
            let limit = self.limit;
            let entry = state.entry(host.to_owned()).or_insert_with(|| HostState {
                running: Arc::new(Semaphore::new(limit)),
                waiting: 0,
                blocked_until: None,
            });
            let now = Instant::now();
            match entry.blocked_until {
                Some(until) if until > now => return Err(NotNow(until)),
                Some(_) => entry.blocked_until = None,
                None => {}
            }
            if let Ok(permit) = entry.running.clone().try_acquire_owned() {
                return Ok(HostPermit { _permit: permit });
            }
            if entry.waiting >= self.limit {
                return Err(NotNow(now + BUSY_DEFERRAL));
            }
            entry.waiting += 1;
            entry.running.clone()
        };
        let waited = Waiting { hosts: self, host };
        let permit = running.acquire_owned().await.expect("the semaphore is never closed");
        drop(waited);
        // The host may have asked to be left alone while this job waited.
        match self.lock().get(host).and_then(|h| h.blocked_until) {
            Some(until) if until > Instant::now() => Err(NotNow(until)),
            _ => Ok(HostPermit { _permit: permit }),
        }
    }

    /// `host` asked to be left alone until `until` (a `Retry-After`).
    pub fn block(&self, host: &str, until: Instant) {
        let mut state = self.lock();
        let limit = self.limit;
        let entry = state.entry(host.to_owned()).or_insert_with(|| HostState {
            running: Arc::new(Semaphore::new(limit)),
            waiting: 0,
            blocked_until: None,
        });
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
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(entry) = self.hosts.lock().get_mut(self.host) {
            entry.waiting -= 1;
        }
    }
}

/// The host a URL's transfer counts against: its host and port.
pub fn host_of(url: &url::Url) -> String {
    format!("{}:{}", url.host_str().unwrap_or(""), url.port_or_known_default().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_host_takes_its_limit_then_waiters_then_says_not_now() {
        let hosts = Arc::new(Hosts::new(2));
        let a = hosts.enter("a:80").await.unwrap();
        let _b = hosts.enter("a:80").await.unwrap();
        // Two may wait for a place; a third is told to come back.
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let hosts = hosts.clone();
                tokio::spawn(async move { hosts.enter("a:80").await.is_ok() })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(hosts.enter("a:80").await, Err(NotNow(_))));
        // Another host is not held up.
        assert!(hosts.enter("b:80").await.is_ok());
        drop(a);
        assert!(waiters.into_iter().next().unwrap().await.unwrap(), "a waiter got the freed place");
    }

    #[tokio::test]
    async fn a_blocked_host_is_left_alone_until_then() {
        let hosts = Hosts::new(4);
        let until = Instant::now() + Duration::from_millis(100);
        hosts.block("a:443", until);
        assert_eq!(hosts.enter("a:443").await.err(), Some(NotNow(until)));
        assert!(hosts.enter("b:443").await.is_ok());
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(hosts.enter("a:443").await.is_ok());
        assert_eq!(host_of(&url::Url::parse("https://Example.com/x").unwrap()), "example.com:443");
    }
}
