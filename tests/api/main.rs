//! End-to-end tests of the embedded mode, through the HTTP API.

#[path = "../support/origin.rs"]
mod origin;

mod helpers;

mod download_links;
mod failures;
mod submit;
mod workflow;
