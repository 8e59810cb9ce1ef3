//! The queue token as it travels: `authorization: Bearer <token>` metadata.

use std::time::Duration;

use stagedoor_proto::queue::v1::{
    queue_internal_service_client::QueueInternalServiceClient, ValidateTokenRequest,
};
use tonic::{metadata::MetadataMap, transport::Channel, Code};
use tonic_types::StatusExt;

use crate::ApiError;

/// Reads the bearer token of a call. UNAUTHENTICATED / MISSING_TOKEN when there is none,
/// INVALID_ARGUMENT / MALFORMED_TOKEN when the header is not `Bearer <token>`. Whether the
/// token is real is the queue service's to say (its ValidateToken).
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, ApiError> {
    let Some(value) = metadata.get("authorization") else {
        return Err(ApiError::new(
            tonic::Code::Unauthenticated,
            "MISSING_TOKEN",
            "this call needs a queue token as `authorization: Bearer <token>` metadata",
        ));
    };
    let malformed = || {
        ApiError::new(
            tonic::Code::InvalidArgument,
            "MALFORMED_TOKEN",
            "the authorization metadata must be `Bearer <token>`",
        )
    };
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(malformed());
    }
    Ok(token)
}

/// A request carrying `token` as `authorization: Bearer <token>`: the client side of
/// [`bearer_token`], for everything that calls a service on a fan's behalf (load runs, the
/// demo, tests).
pub fn with_bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .expect("a queue token is printable ASCII"),
    );
    request
}

/// The fan behind a call, as the queue vouches for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fan {
    /// The token's user: the only identity a call that needs a token ever acts as.
    pub user_id: String,
    /// The concert the token admits to.
    pub concert_id: String,
    /// The token as sent (concert and payment pass it on to the queue).
    pub token: String,
}

/// Checks queue tokens by calling the queue's ValidateToken over gRPC (no service reads
/// another's tables). Cheap to clone: one HTTP/2 connection, multiplexed.
#[derive(Clone)]
pub struct TokenValidator {
    queue: QueueInternalServiceClient<Channel>,
    recent: std::sync::Arc<RecentTokens>,
}

/// Tokens the queue vouched for moments ago, so a fan's burst of calls (list dates, list
/// seats, hold) costs one ValidateToken rather than one each. An entry lives at most the
/// configured TTL and never past the token's own `expire_time`; a token completed or
/// expired meanwhile is therefore accepted for at most that TTL by this service. Callers
/// whose step must not tolerate that (the payment saga) use a TTL of zero.
struct RecentTokens {
    ttl: Duration,
    entries: std::sync::Mutex<std::collections::HashMap<String, (Fan, std::time::Instant)>>,
}

/// Entries kept at most before the cache starts over.
const RECENT_TOKENS_MAX: usize = 100_000;

/// Deadline of one ValidateToken call.
///
/// Generous on purpose: when a sale opens, a thousand fans may hit the same seat at once and
/// their token checks queue up at the queue service. A fan waiting up to ten seconds for an
/// answer is better served than one told UNAVAILABLE (which a 2 s deadline produced under
/// CI's debug build, where the queue answers far slower than in release).
const VALIDATE_DEADLINE: Duration = Duration::from_secs(10);

impl TokenValidator {
    /// A validator for the queue at `queue_url` (`http://host:port`). The connection is made
    /// on first use and re-made after failures, so services may start in any order.
    pub fn new(queue_url: &str, cache_ttl: Duration) -> Result<Self, String> {
        let channel = Channel::from_shared(queue_url.to_owned())
            .map_err(|error| format!("invalid QUEUE_URL `{queue_url}`: {error}"))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(VALIDATE_DEADLINE)
            .connect_lazy();
        Ok(Self {
            queue: QueueInternalServiceClient::new(channel),
            recent: std::sync::Arc::new(RecentTokens {
                ttl: cache_ttl,
                entries: std::sync::Mutex::new(std::collections::HashMap::new()),
            }),
        })
    }

    /// The fan of a call: its bearer token must be ACTIVE. The queue's own refusals pass
    /// through with their code and reason (TOKEN_NOT_FOUND, TOKEN_NOT_ACTIVE, ...).
    pub async fn fan(&self, metadata: &MetadataMap) -> Result<Fan, ApiError> {
        let token = bearer_token(metadata)?.to_owned();
        if let Some(fan) = self.recent.get(&token) {
            return Ok(fan);
        }
        let mut request = tonic::Request::new(ValidateTokenRequest {
            token: token.clone(),
        });
        request.set_timeout(VALIDATE_DEADLINE);
        match self.queue.clone().validate_token(request).await {
            Ok(response) => {
                let valid = response.into_inner();
                let fan = Fan {
                    user_id: valid.user_id,
                    concert_id: valid.concert_id,
                    token,
                };
                let window_left = valid
                    .expire_time
                    .as_ref()
                    .and_then(crate::time::from_timestamp)
                    .and_then(|end| (end - chrono::Utc::now()).to_std().ok())
                    .unwrap_or(Duration::ZERO);
                self.recent.put(&fan, window_left);
                Ok(fan)
            }
            Err(status) => Err(queue_refusal(&status)),
        }
    }
}

impl RecentTokens {
    fn get(&self, token: &str) -> Option<Fan> {
        if self.ttl.is_zero() {
            return None;
        }
        let mut entries = self.entries.lock().expect("token cache poisoned");
        match entries.get(token) {
            Some((fan, until)) if std::time::Instant::now() < *until => Some(fan.clone()),
            Some(_) => {
                entries.remove(token);
                None
            }
            None => None,
        }
    }

    fn put(&self, fan: &Fan, window_left: Duration) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().expect("token cache poisoned");
        if entries.len() >= RECENT_TOKENS_MAX {
            entries.clear();
        }
        let until = std::time::Instant::now() + self.ttl.min(window_left);
        entries.insert(fan.token.clone(), (fan.clone(), until));
    }
}

/// The queue's answer to a token, as the caller of this service should see it.
fn queue_refusal(status: &tonic::Status) -> ApiError {
    let info = status.get_details_error_info();
    let reason = info.as_ref().map(|info| info.reason.as_str());
    let known = match reason {
        Some("TOKEN_NOT_FOUND") => Some("TOKEN_NOT_FOUND"),
        Some("TOKEN_NOT_ACTIVE") => Some("TOKEN_NOT_ACTIVE"),
        Some("MALFORMED_TOKEN") => Some("MALFORMED_TOKEN"),
        _ => None,
    };
    match (known, status.code()) {
        (Some(reason), code) => {
            let mut error = ApiError::new(code, reason, status.message());
            if let Some(token_status) = info.as_ref().and_then(|info| info.metadata.get("status")) {
                error = error.with_metadata("status", token_status.clone());
            }
            error
        }
        (None, Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled) => ApiError::new(
            Code::Unavailable,
            "QUEUE_UNAVAILABLE",
            "the queue service cannot check the token right now; retry",
        ),
        (None, _) => ApiError::internal(format!("ValidateToken failed: {status:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_bearer_is_what_bearer_token_reads() {
        let request = with_bearer((), "tok-123");
        assert_eq!(bearer_token(request.metadata()), Ok("tok-123"));
    }
}
