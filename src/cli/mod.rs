//! Commands that are not the server: `fileflow keys …` (works on the database directly)
//! and the HTTP client (`submit`, `jobs`, `job`, `retry`, `cancel`, `url`, `batch`). With
//! `startup` and `backends`, the only readers of `config`.

mod api;
mod batch;
pub mod client;
pub mod keys;
