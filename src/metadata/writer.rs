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
    first: mpsc::UnboundedSender<Job>,
}

impl Writer {
    /// Start the task that owns `connection`; it ends when the last clone is dropped.
    pub(crate) fn start(mut connection: SqliteConnection) -> Self {
        let (jobs, mut queued) = mpsc::unbounded_channel::<Job>();
        let (first, mut queued_first) = mpsc::unbounded_channel::<Job>();
        tokio::spawn(async move {
            loop {
                let job = tokio::select! {
                    biased;
                    Some(job) = queued_first.recv() => job,
                    Some(job) = queued.recv() => job,
                    else => break,
                };
                // A panic fails that request (its answer is dropped), not the writer.
                if AssertUnwindSafe(job(&mut connection)).catch_unwind().await.is_err() {
                    tracing::error!("a database write panicked");
                }
            }
        });
        Self { jobs, first }
    }

    /// Run `work` on the write connection after the work queued before it.
    pub(crate) async fn run<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<sqlx::Error> + Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, E>> + Send + 'static,
    {
        self.queue(&self.jobs, work).await
    }

    /// Run `work` on the write connection before the work queued by [`Writer::run`] (after
    /// the statement under way, and after other work queued this way): for writes someone
    /// is waiting on to answer a request, ahead of the workers' bookkeeping.
    pub(crate) async fn run_first<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<sqlx::Error> + Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, E>> + Send + 'static,
    {
        self.queue(&self.first, work).await
    }

    async fn queue<T, E, F>(&self, queue: &mpsc::UnboundedSender<Job>, work: F) -> Result<T, E>
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
        queue.send(job).map_err(|_| sqlx::Error::PoolClosed)?;
        answer.await.map_err(|_| sqlx::Error::PoolClosed)?
    }
}
