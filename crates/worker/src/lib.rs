//! The worker runs tasks for the fleet, over gRPC
//! (`shoal.worker.v1.WorkerService`), and owns durable jobs (queue, job
//! state, execution, retries, dead letters; see [`jobs`]).
//!
//! - [`tasks`]: the [`tasks::Task`] trait, the built-in kinds (`sleep`,
//!   `hash`, `echo`, `fail`) and the [`tasks::TaskRegistry`]; the module docs
//!   say how to add a kind.
//! - `execution`: the one executor every task runs through (slots,
//!   deadline and cancellation, payload parsing, duration metric), for
//!   `Execute` calls and durable jobs alike.
//! - [`runner`]: the `Execute` call's rules over it (refused when busy or
//!   draining, cancelled when the call is dropped or the grace is over).
//! - [`error`]: why an execution failed, and its one mapping to a gRPC status.
//! - `service`: the gRPC service over the runner.
//! - [`server`]: [`Worker::bind`] binds the gRPC and admin listeners (port 0
//!   works, for tests) and [`Worker::run`] serves, with health and
//!   reflection, until the shutdown future resolves, then drains under the
//!   configured grace.
//! - [`config`]: every setting, from flags or `SHOAL_WORKER_*` variables.

pub mod config;
pub mod error;
mod execution;
pub mod jobs;
pub mod runner;
pub mod server;
mod service;
pub mod tasks;

pub use config::Config;
pub use error::{ExecuteError, UnknownKind};
pub use runner::{Outcome, Runner, Stats};
pub use server::{RunError, StartError, Worker};
pub use tasks::{Task, TaskContext, TaskError, TaskRegistry};
