//! Plumbing that every stagedoor service shares, written once so that each service's crate is
//! about its own domain: configuration, tracing, the gRPC server (health, reflection, graceful
//! shutdown), the Postgres pool with per-service role and schema, and the single mapping from
//! domain errors to `tonic::Status` with a `google.rpc.ErrorInfo` detail.

pub mod auth;
pub mod background;
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
///
/// It is built without transparent huge pages (the workspace's `no_thp` feature): by default
/// mimalloc asks the kernel for 2 MiB pages on its arenas, and in the demo's rush `perf` put
/// two fifths of all CPU time of its first two seconds in the kernel zeroing them
/// (`clear_page_erms`), while 10,000 streams and their buffers were being allocated. Without
/// them the demo's system time halves (2.5-3.4 s to 1.2-1.7 s) and its peak memory drops from
/// 500 to 380 MB. The feature only stops mimalloc's own `madvise`; on a host whose THP setting
/// is `always` rather than `madvise`, `MIMALLOC_ALLOW_THP=0` in the environment turns them off
/// for the process (the Dockerfile sets it).
pub use mimalloc::MiMalloc as Allocator;
pub use shutdown::{Shutdown, ShutdownTrigger};
