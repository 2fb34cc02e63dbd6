//! A floor under an origin's transfer rate: an origin that keeps a connection alive with a
//! byte now and then (never idle long enough for the read timeout) would otherwise hold a
//! transfer slot for the whole transfer timeout.

use std::pin::Pin;
use std::time::Duration;

use futures::StreamExt as _;
use tokio::time::Sleep;

use crate::lifecycle::{Cause, JobError};
use crate::storage::ByteStream;

/// The slowest transfer tolerated: at least `bytes_per_second` on average over every
/// `window`. Zero bytes per second turns the floor off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinRate {
    pub bytes_per_second: u64,
    pub window: Duration,
}

impl MinRate {
    fn bytes_per_window(&self) -> u64 {
        (u128::from(self.bytes_per_second) * self.window.as_millis() / 1000).try_into().unwrap_or(u64::MAX)
    }
}

/// `body`, cut with a transient error as soon as a window ends having brought fewer bytes
/// than the floor asks, whether or not bytes are arriving at that moment.
pub fn at_least(body: ByteStream, rate: MinRate) -> ByteStream {
    if rate.bytes_per_second == 0 || rate.window.is_zero() {
        return body;
    }
    let needed = rate.bytes_per_window();
    struct State {
        body: ByteStream,
        /// Ends the current window: one timer for the whole transfer, reset per window.
        window: Pin<Box<Sleep>>,
        seen: u64,
        done: bool,
    }
    let window = Box::pin(tokio::time::sleep(rate.window));
    let start = State { body, window, seen: 0, done: false };
    // Fused: readers may ask again after the end, as they may of any body.
    futures::stream::unfold(start, move |mut state| async move {
        if state.done {
            return None;
        }
        loop {
            tokio::select! {
                next = state.body.next() => {
                    match &next {
                        Some(Ok(chunk)) => state.seen += chunk.len() as u64,
                        Some(Err(_)) | None => state.done = true,
                    }
                    return next.map(|item| (item, state));
                }
                () = state.window.as_mut() => {
                    if state.seen < needed {
                        state.done = true;
                        let error = JobError::transient(format!(
                            "origin too slow: {} bytes in {}, the floor is {} bytes/s",
                            state.seen,
                            humantime::format_duration(rate.window),
                            rate.bytes_per_second
                        )).because(Cause::Timeout);
                        return Some((Err(error), state));
                    }
                    state.seen = 0;
                    let next_end = state.window.deadline() + rate.window;
                    state.window.as_mut().reset(next_end);
                }
            }
        }
    })
    .fuse()
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tokio::time::Instant;

    fn trickle(every: Duration, chunks: usize, size: usize) -> ByteStream {
        futures::stream::iter(0..chunks)
            .then(move |_| async move {
                tokio::time::sleep(every).await;
                Ok(Bytes::from(vec![7u8; size]))
            })
            .boxed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_below_the_floor_is_cut_when_its_window_ends() {
        let rate = MinRate { bytes_per_second: 1024, window: Duration::from_secs(30) };
        let started = Instant::now();
        let mut body = at_least(trickle(Duration::from_secs(25), 100, 1), rate);
        assert_eq!(body.next().await.unwrap().unwrap().len(), 1, "the first byte passes");
        let error = body.next().await.unwrap().unwrap_err();
        assert!(error.is_transient() && error.message.contains("origin too slow"), "{error:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(30), "cut when the first window ends");
        assert!(body.next().await.is_none(), "nothing after the cut");
        assert!(body.next().await.is_none(), "asking again after the end is fine");
    }

    #[tokio::test(start_paused = true)]
    async fn a_transfer_above_the_floor_runs_to_its_end() {
        let rate = MinRate { bytes_per_second: 1024, window: Duration::from_secs(10) };
        let body = at_least(trickle(Duration::from_secs(1), 60, 2048), rate);
        let chunks: Vec<_> = body.collect().await;
        assert_eq!(chunks.len(), 60);
        assert!(chunks.iter().all(Result::is_ok));
    }

    #[tokio::test(start_paused = true)]
    async fn a_floor_of_zero_changes_nothing() {
        let rate = MinRate { bytes_per_second: 0, window: Duration::from_secs(1) };
        let chunks: Vec<_> = at_least(trickle(Duration::from_secs(100), 3, 1), rate).collect().await;
        assert_eq!(chunks.len(), 3);
    }
}
