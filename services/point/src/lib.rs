//! stagedoor's wallet.
//!
//! Points are kept in an append-only ledger (CHARGE, SPEND, REFUND, each naming its cause);
//! a wallet's balance is kept equal to the sum of its entries in the same transaction, and
//! never goes below zero. Spends are keyed by payment, charges by the client's request id.
//!
//! - [`store`]: the SQL, where the rules live (conditional updates, unique indexes).
//! - [`grpc`]: the two gRPC services. [`app`]: wiring.

pub mod app;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod store;

pub use app::start;
pub use config::PointConfig;
