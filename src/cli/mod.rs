//! Commands that are not the server: `fileflow keys …` (works on the database directly)
//! and the HTTP client (`submit`, `jobs`, `job`, `retry`, `cancel`, `url`). With
//! `startup` and `backends`, the only readers of `config`.

pub mod client;
pub mod keys;
