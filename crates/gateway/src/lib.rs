//! The gateway owns HTTP: routing, validation, limits, error mapping and the
//! fan-out over gRPC to the workers and the metrics-aggregator. It holds no
//! state of its own.
//!
//! - [`Gateway::bind`] binds the public HTTP and admin listeners (port 0
//!   works, for tests) and starts resolving the upstreams;
//!   [`Gateway::run`] serves until the shutdown future resolves, then drains
//!   under the configured grace.
//! - `routes` (private): `GET /`, `POST /v1/tasks/{kind}`, `GET /v1/status`;
//!   [`problem`]: every error as RFC 9457 problem+json (and the table of
//!   status-code decisions);
//!   [`auth`]: API keys and the client they name; [`limits`]: per-client
//!   rate and concurrency; `edge` (private): the admission of a `/v1/*`
//!   request (credential, limits, body within its deadline);
//!   [`guard`]: load shedding and panic containment;
//!   [`discovery`]: client-side load balancing over re-resolved,
//!   health-watched addresses; [`upstream`]: the one call path per upstream
//!   (readiness, deadline, retry of what never started, status mapping).

pub mod auth;
mod body;
mod cache;
pub mod config;
pub mod discovery;
mod edge;
pub mod guard;
pub mod limits;
pub mod listener;
pub mod problem;
mod routes;
mod server;
pub mod upstream;

pub use config::Config;
pub use server::{Gateway, RunError, StartError, Upstreams};
