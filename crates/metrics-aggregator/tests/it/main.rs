//! Integration tests of the metrics-aggregator: the real service on port 0,
//! real OTLP pushes from the OpenTelemetry SDK, a real `redis-server`, and
//! the real binary as child processes.

mod durability;
mod helpers;
mod ingest;
mod limits;
mod process;
mod queries;
