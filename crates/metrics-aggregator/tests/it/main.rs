//! Integration tests of the metrics-aggregator: the real service on port 0,
//! real OTLP pushes from the OpenTelemetry SDK, a real `redis-server`, and
//! the real binary as child processes.

mod durability;
mod fuzz;
mod helpers;
mod hostile;
mod ingest;
mod limits;
mod mtls;
mod process;
mod queries;
