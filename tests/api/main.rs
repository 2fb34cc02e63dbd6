//! End-to-end tests of the embedded mode, through the HTTP API.

#[path = "../support/origin.rs"]
mod origin;

#[path = "../support/services.rs"]
mod services;

#[path = "../support/jobs.rs"]
mod jobs;

mod helpers;

mod auth;
mod batch;
mod batches;
mod cancel;
mod destinations;
mod download_links;
mod events;
mod failures;
mod fair_share;
mod gcs;
mod limits;
mod metrics;
mod openapi;
mod origin_requests;
mod polite;
mod private_files;
mod resume;
mod revocation;
mod segments;
mod sites;
mod submit;
mod sync;
mod webhooks;
mod workflow;
