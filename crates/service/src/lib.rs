//! The life of a Shoal service, written once:
//!
//! - [`service::main`]: the binary's sequence (healthcheck subcommand →
//!   config → validate → telemetry → serve until a signal → drain → flush →
//!   exit status), so each `main.rs` is a few lines; [`config`]: flags, the
//!   environment, `*_FILE` secrets, durations; [`shutdown`]: SIGTERM/SIGINT.
//! - [`admin`]: the admin listener (`/metrics`, `/healthz`, `/readyz`) and
//!   the [`admin::Readiness`] it reports.
//! - [`net`]: binding, `TCP_NODELAY`, counted connections.
//! - [`drain`]: the shutdown sequence and its settings; [`grpc::GrpcServer`]
//!   serves a gRPC service with health, reflection and that drain;
//!   [`http::serve_http`] the same for a public HTTP listener.
//! - [`json`]: JSON input rules shared by the gateway and the worker.
//!
//! Telemetry (logs, traces, metrics, propagation) is `shoal-telemetry`'s.

pub mod admin;
pub mod config;
pub mod drain;
pub mod grpc;
pub mod http;
pub mod json;
pub mod net;
pub mod service;
pub mod shutdown;

pub use drain::{DEFAULT_DRAIN_DELAY, DrainSettings, Stages};
pub use grpc::{GrpcServer, RunError};
