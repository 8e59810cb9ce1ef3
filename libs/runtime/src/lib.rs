//! Plumbing that every stagedoor service shares, written once so that each service's crate is
//! about its own domain: configuration, tracing, the gRPC server (health, reflection, graceful
//! shutdown), the Postgres pool with per-service role and schema, and the single mapping from
//! domain errors to `tonic::Status` with a `google.rpc.ErrorInfo` detail.

pub mod auth;
pub mod batch;
pub mod client;
pub mod config;
pub mod db;
pub mod error;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod time;
pub mod validate;

pub use error::{ApiError, DOMAIN};

/// The memory allocator every stagedoor binary installs:
///
/// ```ignore
/// #[global_allocator]
/// static ALLOCATOR: stagedoor_runtime::Allocator = stagedoor_runtime::Allocator;
/// ```
///
/// A rush is thousands of small requests, each allocating and freeing buffers on whichever
/// worker thread polls it. `perf` of `load hold-race` put a fifth of the process's time in
/// glibc malloc and free (`_int_free`, `unlink_chunk`, lock waits); with mimalloc, `load pay`
/// and `load list-seats` ran 7-30 % faster in every interleaved pair (BENCHMARKS.md).
pub use mimalloc::MiMalloc as Allocator;
pub use shutdown::{Shutdown, ShutdownTrigger};
