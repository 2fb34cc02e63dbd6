//! The job lifecycle: states, transitions and the retry decision.
//!
//! Nothing here does I/O. Workers ask this module what a finished attempt means
//! ([`settle`]) and adapters only persist the answer.

mod error;
mod job;
mod retry;

pub use error::{Cause, ErrorKind, JobError};
pub use job::{Grant, IfExists, Job, JobId, JobStatus, NewJob, Settlement, StoredObject, lease_renew_interval, settle};
pub use retry::{Decision, RetryPolicy};
