//! The job lifecycle: states, transitions, the retry decision and whose job goes next.
//!
//! Nothing here does I/O. Workers ask this module what a finished attempt means
//! ([`settle`]) and adapters only persist the answer.

mod error;
mod job;
mod retry;
mod turns;

pub use error::{Cause, ErrorKind, JobError};
pub use job::{
    BatchRow, Grant, IfExists, Job, JobId, JobStatus, NewJob, OriginVersion, Settlement, StoredObject,
    lease_renew_interval, settle,
};
pub use retry::{Decision, RetryPolicy, THROTTLED_RETRIES};
pub use turns::{Candidate, Turns, take_turns};
