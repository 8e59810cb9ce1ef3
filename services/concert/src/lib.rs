//! stagedoor's seat inventory: the catalog (concerts, dates, seat maps with prices), which
//! seats are free, and holds of 1 to 4 seats with exactly one winner per seat.
//!
//! A seat's state is derived when read (sold, held until a time, or free), so a hold whose
//! time has passed frees its seats at that instant with no sweeper. Every call of the public
//! service needs an ACTIVE queue token, checked by the queue over gRPC; the fan's identity is
//! the token's user.
//!
//! - [`store`]: the SQL and the lock order that makes racing holds safe.
//! - [`grpc`]: the public, internal and admin services. [`lines`]: each concert's waiting
//!   room at the queue. [`app`]: wiring.

pub mod app;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod lines;
pub mod store;

pub use app::start;
pub use config::ConcertConfig;
