//! The process's long-running parts (the API, the workers, the relay, the sweeps…), run
//! under one roof: each has a name, is told to stop through one token, is joined within
//! a bound, and an early end or a panic is logged with its name.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// The running loops of a process.
pub struct Loops {
    stop: CancellationToken,
    running: JoinSet<anyhow::Result<()>>,
    names: HashMap<Id, &'static str>,
}

/// A loop that ended, and how.
#[derive(Debug)]
pub struct Ended {
    pub name: &'static str,
    pub outcome: Result<(), String>,
}

impl Loops {
    /// Loops that end once `stop` is cancelled.
    pub fn new(stop: CancellationToken) -> Self {
        Self { stop, running: JoinSet::new(), names: HashMap::new() }
    }

    /// The token every loop watches.
    pub fn stop(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Start `name`: the future `start` makes from the stop token, which it must honour.
    pub fn spawn<F>(&mut self, name: &'static str, start: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let run = start(self.stop.clone()).instrument(tracing::info_span!("loop", name));
        let handle = self.running.spawn(run);
        self.names.insert(handle.id(), name);
    }

    /// [`Loops::spawn`] for a loop that cannot fail other than by panicking.
    pub fn spawn_infallible<F>(&mut self, name: &'static str, start: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let run = start(self.stop.clone());
        self.spawn(name, |_| async move {
            run.await;
            Ok(())
        });
    }

    /// Waits for the first loop to end (before the stop, that is a failure of the process);
    /// never resolves when none runs.
    pub async fn first_ended(&mut self) -> Ended {
        match self.running.join_next_with_id().await {
            Some(joined) => self.ended(joined),
            None => std::future::pending().await,
        }
    }

    /// Cancel the stop token and wait up to `within` for every loop to end, logging each
    /// failure; the names of those still running after that are returned (and keep running
    /// until this value is dropped, which aborts them).
    pub async fn stop_and_join(&mut self, within: Duration) -> Vec<&'static str> {
        self.stop.cancel();
        self.join(within).await
    }

    /// Wait up to `within` for the loops to end (after the stop), logging each failure;
    /// returns the names of those still running.
    pub async fn join(&mut self, within: Duration) -> Vec<&'static str> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.running.join_next_with_id()).await {
                Ok(Some(joined)) => {
                    let ended = self.ended(joined);
                    if let Err(why) = &ended.outcome {
                        tracing::error!(name = ended.name, error = %why, "a part of the process failed while stopping");
                    }
                }
                Ok(None) => return Vec::new(),
                Err(_) => return self.names.values().copied().collect(),
            }
        }
    }

    fn ended(&mut self, joined: Result<(Id, anyhow::Result<()>), JoinError>) -> Ended {
        let (id, outcome) = match joined {
            Ok((id, Ok(()))) => (id, Ok(())),
            Ok((id, Err(e))) => (id, Err(format!("{e:#}"))),
            Err(e) if e.is_panic() => (e.id(), Err(format!("panicked: {}", panic_message(e)))),
            Err(e) => (e.id(), Err("cancelled".to_owned())),
        };
        let name = self.names.remove(&id).unwrap_or("unnamed");
        Ended { name, outcome }
    }
}

fn panic_message(e: JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_early_end_is_named_and_the_others_stop_on_the_token() {
        let mut loops = Loops::new(CancellationToken::new());
        loops.spawn_infallible("patient", |stop| async move { stop.cancelled().await });
        loops.spawn("broken", |_| async { Err(anyhow::anyhow!("no database")) });
        let ended = loops.first_ended().await;
        assert_eq!(ended.name, "broken");
        assert_eq!(ended.outcome, Err("no database".to_owned()));
        assert!(loops.stop_and_join(Duration::from_secs(5)).await.is_empty());
    }

    #[tokio::test]
    async fn a_panic_is_reported_and_a_stuck_loop_is_named() {
        let mut loops = Loops::new(CancellationToken::new());
        loops.spawn_infallible("panics", |_| async { panic!("boom") });
        loops.spawn_infallible("stuck", |_| std::future::pending());
        let ended = loops.first_ended().await;
        assert_eq!((ended.name, ended.outcome), ("panics", Err("panicked: boom".to_owned())));
        assert_eq!(loops.stop_and_join(Duration::from_millis(50)).await, ["stuck"]);
    }
}
