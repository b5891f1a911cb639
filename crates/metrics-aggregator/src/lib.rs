//! The metrics-aggregator owns the fleet view of metrics: ingestion over
//! OTLP, merging across replicas, windows, queries and Prometheus exposition.
//!
//! The merge core is pure and has no I/O: [`series`] and [`source`] say what
//! is merged, [`merge`] the algebra, [`accum`] how one source's cumulative
//! and delta points accumulate, [`histogram`] and [`exponential`] the
//! histogram types, [`store`] the bounded fleet state and its queries,
//! [`window`] the rolling windows. Around it: [`otlp`] decodes pushes,
//! `ingest` and `query` serve gRPC, [`prometheus`] renders text,
//! [`checkpoint`] talks to Redis.
//!
//! The service is a library plus a thin binary: [`Aggregator::bind`] binds
//! the gRPC and admin listeners (port 0 works, for tests) and
//! [`Aggregator::run`] serves until the shutdown future resolves, then
//! drains under the configured grace. The contract is in `docs/aggregator.md`.

pub mod accum;
pub mod checkpoint;
pub mod config;
pub mod exponential;
pub mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod histogram;
mod ingest;
pub mod merge;
pub mod otlp;
pub mod prometheus;
mod query;
pub mod rate;
pub mod series;
mod server;
pub mod source;
pub mod store;
pub mod window;

#[cfg(test)]
mod properties;

pub use config::{Config, ConfigError};
pub use query::QueryError;
pub use server::{Aggregator, OTLP_SERVICE_NAME, RunError, StartError};
