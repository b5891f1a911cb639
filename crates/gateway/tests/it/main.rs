//! Integration tests: a real gateway over real workers and aggregators, all
//! in this process on 127.0.0.1:0 (the signal tests start the real binary),
//! driven over real HTTP.

mod balancing;
mod deadline;
mod errors;
mod helpers;
mod jobs;
mod lifecycle;
mod metrics;
mod openapi;
mod stats;
mod status;
mod tasks;
mod tracing;
