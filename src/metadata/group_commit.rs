//! Group commit: requests that arrive while a batch is being written go together into the
//! next one. Used for new jobs (SQLite and PostgreSQL) and for completions (SQLite).

use tokio::sync::{mpsc, oneshot};

/// Most writes of one kind in one batch.
pub(crate) const MAX_BATCH: usize = 64;

/// A request to a group-commit task, and where its answer goes.
pub(crate) type Pending<Request, Answer> = (Request, oneshot::Sender<Answer>);

/// Group commit: start a task that hands every request arriving while the last batch was
/// being written to `write` as the next batch, so under load many requests share one
/// statement and one commit (a statement's round trip, to SQLite's connection thread or to
/// the PostgreSQL server, is the main cost of a small write). `write` answers each request of its batch, in
/// order; a request is answered only once its batch is written. Nothing waits to fill a
/// batch: a lone request goes at once. The task ends when the last sender is dropped.
pub(crate) fn group_commit<Request, Answer, Write, Written>(
    max_batch: usize,
    write: Write,
) -> mpsc::Sender<Pending<Request, Answer>>
where
    Request: Send + 'static,
    Answer: Send + 'static,
    Write: Fn(Vec<Request>) -> Written + Send + 'static,
    Written: Future<Output = Vec<Answer>> + Send,
{
    let (sender, mut queued) = mpsc::channel::<Pending<Request, Answer>>(4 * max_batch);
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(max_batch);
        while queued.recv_many(&mut batch, max_batch).await > 0 {
            let (requests, replies): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
            for (reply, answer) in replies.into_iter().zip(write(requests).await) {
                let _ = reply.send(answer);
            }
        }
    });
    sender
}

/// Send `request` to a group-commit task and wait for its answer; `None` if the task is gone.
pub(crate) async fn through<Request, Answer>(
    task: &mpsc::Sender<Pending<Request, Answer>>,
    request: Request,
) -> Option<Answer> {
    let (reply, answer) = oneshot::channel();
    task.send((request, reply)).await.ok()?;
    answer.await.ok()
}

/// Write `batch` in one go (`write` answers each request, in order); if that fails,
/// write each request alone, so one bad request does not fail the others.
pub(crate) async fn all_or_each<'a, Request, Answer, Error, Write, Written>(
    batch: &'a [Request],
    write: Write,
) -> Vec<Result<Answer, Error>>
where
    Write: Fn(&'a [Request]) -> Written,
    Written: Future<Output = Result<Vec<Answer>, Error>>,
{
    if batch.len() > 1
        && let Ok(answers) = write(batch).await
    {
        return answers.into_iter().map(Ok).collect();
    }
    let mut answers = Vec::with_capacity(batch.len());
    for one in batch.chunks(1) {
        answers.push(write(one).await.map(|mut answer| answer.remove(0)));
    }
    answers
}
