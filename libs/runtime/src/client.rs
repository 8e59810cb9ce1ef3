//! Outbound gRPC channels: how a stagedoor service, its CLI and its tests connect to a
//! service. One place, so that every client of the mesh gets the same HTTP/2 settings as
//! the servers it talks to.

use std::time::Duration;

use tonic::{
    transport::{Channel, Endpoint},
    Code,
};

use crate::server::CONNECTION_WINDOW;

/// An endpoint for the service at `url` (`http://host:port`), with the connection window the
/// servers use. h2 closes a connection whose peer leaves too many small DATA frames unread
/// (half the connection window's worth); for a client that is responses its callers have
/// not picked up yet. Tonic's default window (5 MiB) carried 20,000 calls in flight on one
/// connection and broke at 35,000 (`libs/runtime/tests/server.rs`, which passes with this).
pub fn endpoint(url: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .initial_connection_window_size(CONNECTION_WINDOW)
        // Idle internal connections can sit for hours between sales: pings find a dead peer
        // (or a middlebox that dropped the connection) before a fan's call does.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10)))
}

/// A lazily connected channel to a peer service whose every call carries `deadline` (sent
/// to the callee as `grpc-timeout` and enforced here): a peer that hangs costs at most that
/// long. The connection is made on first use and re-made after failures, so services may
/// start in any order. `setting` names the URL's variable in the error (`QUEUE_URL`).
pub fn peer_channel(setting: &str, url: &str, deadline: Duration) -> Result<Channel, String> {
    Ok(endpoint(url)
        .map_err(|error| format!("invalid {setting} `{url}`: {error}"))?
        .connect_timeout(Duration::from_secs(1).min(deadline))
        .timeout(deadline)
        .connect_lazy())
}

/// Whether a peer's status `code` (with no ErrorInfo reason) says the peer could not be
/// reached or did not answer in time, rather than that it answered: as retryable as a peer
/// that is down. UNKNOWN is tonic's word for a broken connection (a stagedoor service never
/// answers UNKNOWN itself).
pub fn peer_unreachable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}
