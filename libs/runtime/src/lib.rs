//! Plumbing that every stagedoor service shares, written once so that each service's crate is
//! about its own domain: configuration, tracing, the gRPC server (health, reflection, graceful
//! shutdown), the Postgres pool with per-service role and schema, and the single mapping from
//! domain errors to `tonic::Status` with a `google.rpc.ErrorInfo` detail.

pub mod auth;
pub mod batch;
pub mod config;
pub mod db;
pub mod error;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod time;
pub mod validate;

pub use error::{ApiError, DOMAIN};
pub use shutdown::{Shutdown, ShutdownTrigger};
