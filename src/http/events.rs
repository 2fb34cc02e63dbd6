//! `GET /api/v1/uploads/{id}/events` and `GET /api/v1/events`: Server-Sent Events, one
//! `data:` JSON per change of a job (status, progress), with keep-alives. A job's stream
//! starts with the job as it is, sends the job again at each change, and ends once the job
//! has finished; the stream of all jobs sends each change (`id`, `status`, `bytes_done`,
//! `bytes_total`) of the jobs the caller may see, until the client goes.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::{Extension, Router};
use futures::stream::{self, Stream, StreamExt as _};
use tokio::sync::broadcast::error::RecvError;

use super::error::ApiError;
use super::state::AppState;
use crate::auth::Caller;
use crate::events::JobChange;
use crate::wire::JobView;

/// How often an idle stream sends a comment, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How often a stream checks that its caller may still read it: a revoked key's streams
/// end within this and the gate's [`crate::auth`] validity cache, under 2 s.
const RECHECK: Duration = Duration::from_secs(1);

/// What a stream needs to go on: the feed, and who it is for, checked now and then.
struct Listener {
    changes: tokio::sync::broadcast::Receiver<JobChange>,
    caller: Caller,
    recheck: tokio::time::Interval,
}

impl Listener {
    fn new(changes: tokio::sync::broadcast::Receiver<JobChange>, caller: Caller) -> Self {
        let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + RECHECK, RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { changes, caller, recheck }
    }
}

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/uploads/{id}/events", get(job_events)).route("/api/v1/events", get(all_events))
}

fn data(value: &impl serde::Serialize) -> Event {
    Event::default().json_data(value).expect("a job serializes")
}

/// The next change that `keep` accepts; `None` once the feed closed, the process is
/// stopping, or the caller may no longer read (its key was revoked). A subscriber that fell
/// behind goes on with what is newest.
async fn next_change(
    listener: &mut Listener,
    state: &AppState,
    keep: impl Fn(&JobChange) -> bool,
) -> Option<JobChange> {
    loop {
        let received = tokio::select! {
            () = state.changes.stopped.cancelled() => return None,
            _ = listener.recheck.tick() => {
                if !state.gate.still_admits(&listener.caller).await {
                    tracing::info!(key = listener.caller.key_id(), "an event stream's caller may no longer read it; ending it");
                    return None;
                }
                continue;
            }
            received = listener.changes.recv() => received,
        };
        match received {
            Ok(change) if keep(&change) => return Some(change),
            Ok(_) => {}
            Err(RecvError::Lagged(skipped)) => tracing::debug!(skipped, "an event stream fell behind"),
            Err(RecvError::Closed) => return None,
        }
    }
}

/// A job's changes as Server-Sent Events: the job now, then at each change of its status or
/// progress (each `data:` is the job as `GET /api/v1/uploads/{id}` shows it); ends after it finishes.
#[utoipa::path(get, path = "/api/v1/uploads/{id}/events", tag = "events",
    params(("id" = String, Path, description = "the upload's id")),
    responses((status = 200, description = "an event stream of JobView", content_type = "text/event-stream", body = JobView),
        (status = 404, description = "no such upload (or another key's)", body = super::error::ErrorBody),
    ))]
pub(super) async fn job_events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // Subscribe before reading the job, so no change falls in between.
    let changes = state.changes.subscribe();
    let job = state.find(&id, &caller).await?;
    let job_id = job.id.to_string();
    let first = state.view(job, &caller).await?;
    let finished = first.status.is_final();
    let listener = Listener::new(changes, caller);
    let rest =
        stream::unfold((listener, state, job_id, finished), |(mut listener, state, job_id, finished)| async move {
            if finished {
                return None;
            }
            next_change(&mut listener, &state, |c| c.id == job_id).await?;
            // The job as it is now (a change may have come before its row was readable elsewhere).
            let job = state.repo.get(job_id.parse().ok()?).await.ok()??;
            let view = state.view(job, &listener.caller).await.ok()?;
            let finished = view.status.is_final();
            Some((Ok(data(&view)), (listener, state, job_id, finished)))
        });
    let stream = stream::once(async move { Ok(data(&first)) }).chain(rest);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// Every change of the jobs the key may see, as Server-Sent Events of `JobChange`.
#[utoipa::path(get, path = "/api/v1/events", tag = "events",
    responses((status = 200, description = "an event stream of JobChange", content_type = "text/event-stream", body = JobChange)))]
pub(super) async fn all_events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let listener = Listener::new(state.changes.subscribe(), caller);
    let stream = stream::unfold((listener, state), |(mut listener, state)| async move {
        let caller = listener.caller.clone();
        let change = next_change(&mut listener, &state, |c| caller.may_see(c.owner.as_deref())).await?;
        Some((Ok(data(&change)), (listener, state)))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}
