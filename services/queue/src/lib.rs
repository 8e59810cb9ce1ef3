//! stagedoor's waiting room.
//!
//! Fans enter a concert's line with IssueToken and get a place (1, 2, 3, ...). Admission is
//! FIFO and bounded by a cap of ACTIVE tokens and a rate; ACTIVE tokens expire after a window,
//! WAITING tokens whose fans stopped polling expire as ghosts, and a finished token frees its
//! slot for the next fan at once. A fan's position is `place - admitted_through - 1`, read
//! in O(1) from the line's admission pointer, never by counting the rows ahead.
//!
//! - [`store`]: the SQL and the admission procedure (the lock discipline lives there).
//! - [`batcher`]: group commit of IssueToken under a rush.
//! - [`board`]: each replica's view of busy lines (admission rate, stream notifications).
//! - [`heartbeat`]: keeping polled tokens alive without a write per poll.
//! - [`cache`]: answering polls of WAITING fans from memory.
//! - [`open_lines`]: refusing IssueToken for a concert with no line before any transaction.
//! - [`grpc`]: the two gRPC services. [`app`]: wiring.

pub mod app;
pub mod batcher;
pub mod board;
pub mod cache;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod heartbeat;
pub mod open_lines;
pub mod store;

pub use app::start;
pub use config::QueueConfig;
