//! fileflow: copy files from URLs into object storage, asynchronously, safely and without
//! losing work.
//!
//! - [`domain`]: validated input values (bucket names, keys, URLs, checksums);
//! - [`lifecycle`]: job states and the retry decision, free of I/O;
//! - ports and their adapters: [`metadata`] (jobs), [`queue`] (deliveries),
//!   [`storage`] (objects), [`fetch`] (origins, behind the destination guard);
//! - [`worker`]: one job through the pipeline; [`http`]: the API; [`relay`] and
//!   [`reconciler`]: what makes queued work reach the workers, and reach them again;
//! - [`config`], [`backends`], [`startup`]: settings and wiring.

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
