//! The metrics-aggregator owns the fleet view of metrics: ingestion over
//! OTLP, merging across replicas, windows, queries and Prometheus exposition.
//!
//! This crate is a library plus a thin binary: [`Aggregator::bind`] binds the
//! gRPC and admin listeners (port 0 works, for tests) and
//! [`Aggregator::run`] serves until the shutdown future resolves, then drains
//! under the configured grace.

pub mod config;
mod query;
mod server;

pub use config::Config;
pub use server::{Aggregator, RunError, StartError};
