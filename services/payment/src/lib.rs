//! stagedoor's payment saga.
//!
//! Pay spends the fan's points, sells the held seats and completes the fan's queue token,
//! each step a call to the service that owns it, each keyed by the payment id so that it can
//! be asked again safely. The payment's progress is a row in this service's own schema,
//! written before the first call and whenever the saga ends, compensates or waits, so a
//! recovery worker on any replica can finish (or undo) whatever a crash or an unreachable
//! peer left half-way.
//!
//! - [`saga`]: the driver and its rules. [`store`]: the SQL (leases, conditional steps).
//! - [`peers`]: the calls to queue, concert and point, and what their failures mean.
//! - [`writes`]: the payment row's inserts and step records, batched.
//! - [`recovery`]: the worker. [`grpc`]: the API. [`app`]: wiring.

pub mod app;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod hops;
pub mod peers;
pub mod recovery;
pub mod saga;
pub mod store;
pub mod writes;

pub use app::start;
pub use config::PaymentConfig;
pub use domain::Fault;
