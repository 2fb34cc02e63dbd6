//! The SQLite write connection of a process, owned by one task.
//!
//! SQLite takes one writer at a time, so a process keeps one write connection and hands it
//! work in order. A task that owns the connection outright costs a statement one thread
//! hand-off to the connection's worker thread; a pool of one connection added an
//! acquire and a spawned return-to-pool to every statement, about three times the cost
//! (measured: ~230 µs a statement through the pool, ~80 µs on a held connection).

use std::panic::AssertUnwindSafe;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use sqlx::SqliteConnection;
use tokio::sync::{mpsc, oneshot};

/// Work for the connection: runs to its end even if whoever asked for it stops waiting.
type Job = Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, ()> + Send>;

#[derive(Clone, Debug)]
pub(crate) struct Writer {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Writer {
    /// Start the task that owns `connection`; it ends when the last clone is dropped.
    pub(crate) fn start(mut connection: SqliteConnection) -> Self {
        let (jobs, mut queued) = mpsc::unbounded_channel::<Job>();
        tokio::spawn(async move {
            while let Some(job) = queued.recv().await {
                // A panic fails that request (its answer is dropped), not the writer.
                if AssertUnwindSafe(job(&mut connection)).catch_unwind().await.is_err() {
                    tracing::error!("a database write panicked");
                }
            }
        });
        Self { jobs }
    }

    /// Run `work` on the write connection after the work queued before it.
    pub(crate) async fn run<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<sqlx::Error> + Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, E>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |connection| {
            Box::pin(async move {
                let _ = reply.send(work(connection).await);
            })
        });
        self.jobs.send(job).map_err(|_| sqlx::Error::PoolClosed)?;
        answer.await.map_err(|_| sqlx::Error::PoolClosed)?
    }
}
