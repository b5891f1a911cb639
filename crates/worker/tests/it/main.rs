//! Integration tests: real workers on port 0, real tonic clients, and the
//! real binary for signals.

mod errors;
mod helpers;
mod infra;
#[cfg(feature = "jobs")]
mod jobs_core;
mod limits;
mod process;
mod tasks;
