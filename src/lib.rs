//! fileflow: copy files from URLs into object storage, asynchronously, safely and without
//! losing work. Lower layers never import higher ones (`tests/layout.rs` checks it):
//!
//! - values: [`domain`] (parsed input, API key values), [`lifecycle`] (job states and the
//!   retry decision, free of I/O), [`secrets`] and [`files`] (keys kept outside the
//!   database, private file modes);
//! - ports and their adapters: [`metadata`] (jobs, keys, the webhook outbox), [`queue`]
//!   (deliveries), [`storage`] (objects), [`fetch`] (origins, behind the destination
//!   guard), [`links`] (download links);
//! - [`wire`]: the JSON a job is shown as, shared by the API, its streams and webhooks;
//! - work: [`worker`] (one job through the pipeline), [`relay`] and [`reconciler`] (what
//!   makes queued work reach the workers, and reach them again), [`webhooks`], [`events`];
//! - edges: [`http`] (the API), [`auth`] (who may call), [`cli`] (the `keys` command and
//!   the client), [`metrics`], [`telemetry`];
//! - wiring: [`config`], [`backends`], [`startup`].

pub mod auth;
pub mod backends;
pub mod cli;
pub mod config;
pub mod domain;
pub mod events;
pub mod fetch;
pub mod files;
pub mod http;
pub mod lifecycle;
pub mod links;
pub mod metadata;
pub mod metrics;
pub mod queue;
pub mod reconciler;
pub mod relay;
pub mod secrets;
pub mod startup;
pub mod storage;
pub mod telemetry;
pub mod webhooks;
pub mod wire;
pub mod worker;
