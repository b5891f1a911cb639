//! Integration tests: a real gateway over real workers and aggregators, all
//! in this process on 127.0.0.1:0 (the signal tests start the real binary),
//! driven over real HTTP.

mod auth;
mod balancing;
mod batch;
mod bodies;
mod deadline;
mod errors;
mod helpers;
mod jobs;
mod lifecycle;
mod metrics;
mod mtls;
mod openapi;
mod rollout;
mod slow_clients;
mod stats;
mod status;
mod tasks;
mod tracing;
