//! Integration tests: real workers on port 0, real tonic clients, and the
//! real binary for signals.

mod chaos;
mod contract;
mod errors;
mod helpers;
mod infra;
mod jobs_api;
mod jobs_core;
mod limits;
mod ownership;
mod process;
mod proxy;
mod tasks;
mod topology;
