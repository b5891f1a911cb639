//! Shoal's benchmark tools, driven by `scripts/bench`:
//!
//! - [`load`]: the load generator behind the `shoal-load` binary — a
//!   fixed-rate open loop that corrects for coordinated omission, and a
//!   closed loop over N connections, for HTTP/1.1 and for the worker's gRPC
//!   `Execute`; reports JSON with exact percentiles ([`stats`]).
//! - [`hello`]: the bare axum server (`bare-hello`) the gateway's throughput
//!   is compared with.
//! - [`startup`]: time from exec to ready, RSS at ready and time to exit on
//!   SIGTERM (`shoal-load startup`).
//!
//! Nothing here is used by the services, and no test asserts a timing.

pub mod hello;
pub mod load;
pub mod startup;
pub mod stats;
