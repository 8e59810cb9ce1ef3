//! The queue token as it travels: `authorization: Bearer <token>` metadata.

use std::time::Duration;

use stagedoor_proto::queue::v1::{
    queue_internal_service_client::QueueInternalServiceClient, token_validation,
    ValidateTokenResponse, ValidateTokensRequest,
};
use tonic::{metadata::MetadataMap, transport::Channel, Code};
use tonic_types::StatusExt;

use crate::{
    batch::{self, BatchFuture, BatchLimits, Batcher},
    ApiError,
};

/// Reads the bearer token of a call, in its one canonical spelling (lowercase, hyphenated).
/// UNAUTHENTICATED / MISSING_TOKEN when there is none, UNAUTHENTICATED / MALFORMED_TOKEN when
/// the header is not `Bearer <token>` or the token is not a queue token's shape (a UUID): a
/// credential problem, not bad input, so a gateway answers 401 as for an unknown token.
/// Whether the token is real is the queue service's to say (its ValidateToken).
///
/// Why canonical: the queue reads any spelling of a UUID (`{braced}`, uppercase, no
/// hyphens), but this side keys things by the token's text: the concert's cache of vouched
/// tokens, and the payment's "one live payment per token" index. Two spellings of one token
/// must be one key, or a fan could pay twice with one admission by spelling it twice.
/// Checking the shape here also keeps junk (a 16 KiB header, say) out of the batched
/// ValidateTokens calls that other fans' checks ride in.
pub fn bearer_token(metadata: &MetadataMap) -> Result<String, ApiError> {
    let Some(value) = metadata.get("authorization") else {
        return Err(ApiError::new(
            tonic::Code::Unauthenticated,
            "MISSING_TOKEN",
            "this call needs a queue token as `authorization: Bearer <token>` metadata",
        ));
    };
    let malformed = || {
        ApiError::new(
            tonic::Code::Unauthenticated,
            "MALFORMED_TOKEN",
            "the authorization metadata must be `Bearer <token>`, the token as IssueToken gave it",
        )
    };
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(malformed());
    }
    let token = uuid::Uuid::try_parse(token).map_err(|_| malformed())?;
    Ok(token.hyphenated().to_string())
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

/// Checks queue tokens by asking the queue over gRPC (no service reads another's tables).
/// Cheap to clone: one HTTP/2 connection, multiplexed.
///
/// Tokens this replica must ask about at the same moment (a sale opening: a thousand fans'
/// first calls) go to the queue together, as one ValidateTokens call per batch
/// (`runtime::batch`) instead of one ValidateToken each. Every ask starts after the call
/// that needs it arrived, so batching never answers from an older read.
#[derive(Clone)]
pub struct TokenValidator {
    /// The queue's answers (see [`Checked`]).
    checks: Batcher<String, Checked>,
    recent: std::sync::Arc<RecentTokens>,
}

/// Tokens the queue vouched for moments ago, so a fan's burst of calls (list dates, list
/// seats, hold) costs one check at the queue rather than one each. An entry lives at most the
/// configured TTL and never past the token's own `expire_time`; a token completed or
/// expired meanwhile is therefore accepted for at most that TTL by this service. Callers
/// whose step must not tolerate that (the payment saga) use a TTL of zero.
struct RecentTokens {
    ttl: Duration,
    entries: std::sync::Mutex<std::collections::HashMap<String, (Fan, std::time::Instant)>>,
}

/// What the queue said of one token it issued.
enum Checked {
    /// ACTIVE: the fan, and how long the token's active window has left.
    Active(Fan, Duration),
    /// WAITING, DONE or EXPIRED.
    NotActive(NotActive),
}

/// A token the queue issued that is not ACTIVE: whose it is, whether it still waits, when its
/// active window ended or ends (`None`: it never had one), and the refusal a call that needs
/// an ACTIVE token answers with.
struct NotActive {
    fan: Fan,
    waiting: bool,
    window_end: Option<chrono::DateTime<chrono::Utc>>,
    refused: ApiError,
}

/// Entries kept at most before the cache starts over.
const RECENT_TOKENS_MAX: usize = 100_000;

impl TokenValidator {
    /// A validator for the queue at `queue_url` (`http://host:port`), whose every
    /// ValidateTokens call has `deadline`. The connection is made on first use and re-made
    /// after failures, so services may start in any order. Starts the batching worker, so it
    /// must be called inside a Tokio runtime; the worker stops when the last clone is dropped.
    pub fn new(queue_url: &str, cache_ttl: Duration, deadline: Duration) -> Result<Self, String> {
        let channel = crate::client::peer_channel("QUEUE_URL", queue_url, deadline)?;
        let queue = QueueInternalServiceClient::new(channel);
        let (checks, _worker) = Batcher::spawn(VALIDATE_LIMITS, move |tokens: Vec<String>| {
            let queue = queue.clone();
            Box::pin(ask_queue(queue, tokens, deadline)) as BatchFuture<Checked>
        });
        Ok(Self {
            checks,
            recent: std::sync::Arc::new(RecentTokens {
                ttl: cache_ttl,
                entries: std::sync::Mutex::new(std::collections::HashMap::new()),
            }),
        })
    }

    /// The fan of a call: its bearer token must be ACTIVE. The queue's own refusals pass
    /// through with their code and reason (TOKEN_NOT_FOUND, TOKEN_NOT_ACTIVE, ...).
    pub async fn fan(&self, metadata: &MetadataMap) -> Result<Fan, ApiError> {
        self.check(metadata)
            .await?
            .map_err(|not_active| not_active.refused)
    }

    /// Whose token a call bears, whether ACTIVE or not: for calls that only act on what the
    /// fan already has, such as giving held seats back, which a fan whose payment completed
    /// the token must still be able to do. A WAITING token is taken; an ended one (DONE,
    /// EXPIRED) only until `ended_within` after its active window's end, the longest anything
    /// made with it can last (a hold's TTL): an old token, found in a backup or an old log,
    /// must not become a credential again. Otherwise it is refused as by
    /// [`TokenValidator::fan`]; so is any token the queue never issued, and an ended one when
    /// the queue does not say whose it is (a queue of an older version).
    pub async fn owner(
        &self,
        metadata: &MetadataMap,
        ended_within: Duration,
    ) -> Result<Fan, ApiError> {
        match self.check(metadata).await? {
            Ok(fan) => Ok(fan),
            Err(NotActive {
                fan,
                waiting,
                window_end,
                refused,
            }) => {
                let recent = window_end.is_some_and(|end| {
                    chrono::Utc::now() - end
                        < chrono::Duration::from_std(ended_within).unwrap_or(chrono::Duration::MAX)
                });
                if waiting || recent {
                    Ok(fan)
                } else {
                    Err(refused)
                }
            }
        }
    }

    /// The fan of a call's ACTIVE token (from the recent tokens, or from the queue and then
    /// kept), or what the queue said of a token it issued that is not ACTIVE.
    async fn check(&self, metadata: &MetadataMap) -> Result<Result<Fan, NotActive>, ApiError> {
        let token = bearer_token(metadata)?;
        if let Some(fan) = self.recent.get(&token) {
            return Ok(Ok(fan));
        }
        Ok(match self.checks.call(token).await? {
            Checked::Active(fan, window_left) => {
                self.recent.put(&fan, window_left);
                Ok(fan)
            }
            Checked::NotActive(not_active) => Err(not_active),
        })
    }
}

/// Tokens per ValidateTokens call: the queue's limit. Up to 16 calls at once: a token check
/// stands before every first call of a fan, so a batch must not wait long for a free slot
/// (with 4, hold-spread's p50 rose by a fifth; see BENCHMARKS.md).
const VALIDATE_LIMITS: BatchLimits = BatchLimits {
    concurrent: 16,
    ..BatchLimits::READS
};

/// One batch: a ValidateTokens call for every token in it, each answered on its own.
async fn ask_queue(
    mut queue: QueueInternalServiceClient<Channel>,
    tokens: Vec<String>,
    deadline: Duration,
) -> Vec<Result<Checked, ApiError>> {
    let mut request = tonic::Request::new(ValidateTokensRequest {
        tokens: tokens.clone(),
    });
    request.set_timeout(deadline);
    let validations = match queue.validate_tokens(request).await {
        Ok(response) => response.into_inner().validations,
        Err(status) => {
            let info = status.get_details_error_info();
            let refused = queue_refusal(
                status.code(),
                info.as_ref().map(|info| info.reason.as_str()),
                status.message(),
                info.as_ref().and_then(|info| info.metadata.get("status")),
            );
            return batch::fail_all(tokens.len(), refused);
        }
    };
    if validations.len() != tokens.len() {
        let error = ApiError::internal(format!(
            "ValidateTokens answered {} of {} tokens",
            validations.len(),
            tokens.len()
        ));
        return batch::fail_all(tokens.len(), error);
    }
    tokens
        .into_iter()
        .zip(validations)
        .map(|(token, validation)| match validation.result {
            Some(token_validation::Result::Valid(valid)) => {
                let (fan, window_left) = vouched(token, valid);
                Ok(Checked::Active(fan, window_left))
            }
            Some(token_validation::Result::Refused(refused)) => {
                let error = queue_refusal(
                    Code::from_i32(refused.code),
                    Some(refused.reason.as_str()),
                    &refused.message,
                    refused.metadata.get("status"),
                );
                // A token issued but not ACTIVE: the queue says whose it is (internal
                // metadata, never passed on to this service's callers).
                match (
                    refused.reason.as_str(),
                    refused.metadata.get("user_id"),
                    refused.metadata.get("concert_id"),
                ) {
                    ("TOKEN_NOT_ACTIVE", Some(user_id), Some(concert_id)) => {
                        let fan = Fan {
                            user_id: user_id.clone(),
                            concert_id: concert_id.clone(),
                            token,
                        };
                        let window_end = refused
                            .metadata
                            .get("expire_time")
                            .and_then(|end| chrono::DateTime::parse_from_rfc3339(end).ok())
                            .map(|end| end.with_timezone(&chrono::Utc));
                        Ok(Checked::NotActive(NotActive {
                            fan,
                            waiting: refused.metadata.get("status").map(String::as_str)
                                == Some("WAITING"),
                            window_end,
                            refused: error,
                        }))
                    }
                    _ => Err(error),
                }
            }
            None => Err(ApiError::internal(
                "ValidateTokens answered a token with nothing",
            )),
        })
        .collect()
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

/// The fan the queue vouched for, and how long the token's active window has left.
fn vouched(token: String, valid: ValidateTokenResponse) -> (Fan, Duration) {
    let window_left = valid
        .expire_time
        .as_ref()
        .and_then(crate::time::from_timestamp)
        .and_then(|end| (end - chrono::Utc::now()).to_std().ok())
        .unwrap_or(Duration::ZERO);
    let fan = Fan {
        user_id: valid.user_id,
        concert_id: valid.concert_id,
        token,
    };
    (fan, window_left)
}

/// The queue's refusal of a token (`code`, ErrorInfo `reason` and `status` metadata), as the
/// caller of this service should see it: the token reasons pass through, an unreachable
/// queue is UNAVAILABLE, anything else is this service's internal error.
fn queue_refusal(
    code: Code,
    reason: Option<&str>,
    message: &str,
    token_status: Option<&String>,
) -> ApiError {
    let known = match reason {
        Some("TOKEN_NOT_FOUND") => Some("TOKEN_NOT_FOUND"),
        Some("TOKEN_NOT_ACTIVE") => Some("TOKEN_NOT_ACTIVE"),
        Some("MALFORMED_TOKEN") => Some("MALFORMED_TOKEN"),
        _ => None,
    };
    match (known, code) {
        // The queue says INVALID_ARGUMENT: to it the token is a request field. To our caller
        // it is the bearer credential, and a credential that is no token is UNAUTHENTICATED.
        (Some(reason @ "MALFORMED_TOKEN"), _) => {
            ApiError::new(Code::Unauthenticated, reason, message)
        }
        (Some(reason), code) => {
            let mut error = ApiError::new(code, reason, message);
            if let Some(token_status) = token_status {
                error = error.with_metadata("status", token_status.clone());
            }
            error
        }
        (None, code) if crate::client::peer_unreachable(code) => ApiError::new(
            Code::Unavailable,
            "QUEUE_UNAVAILABLE",
            "the queue service cannot check the token right now; retry",
        ),
        (None, code) => ApiError::internal(format!(
            "ValidateTokens failed: {code:?} {}: {message}",
            reason.unwrap_or("(no reason)")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0b5e6c1e-7f43-4c39-9a57-3d2b8f1e0a64";

    #[test]
    fn with_bearer_is_what_bearer_token_reads() {
        let request = with_bearer((), TOKEN);
        assert_eq!(bearer_token(request.metadata()), Ok(TOKEN.to_owned()));
    }

    #[test]
    fn every_spelling_of_a_token_reads_as_one() {
        let spellings = [
            TOKEN.to_uppercase(),
            TOKEN.replace('-', ""),
            format!("{{{TOKEN}}}"),
            format!("urn:uuid:{TOKEN}"),
            format!("  {TOKEN} "),
        ];
        for spelling in spellings {
            let request = with_bearer((), &spelling);
            assert_eq!(
                bearer_token(request.metadata()),
                Ok(TOKEN.to_owned()),
                "{spelling:?}"
            );
        }
    }

    #[test]
    fn what_is_no_token_is_refused_here() {
        for header in ["Bearer", "Bearer ", "Bearer tok-123", "Basic abc", TOKEN] {
            let mut request = tonic::Request::new(());
            request
                .metadata_mut()
                .insert("authorization", header.parse().unwrap());
            let refused = bearer_token(request.metadata()).unwrap_err();
            assert_eq!(refused.code(), Code::Unauthenticated, "{header:?}");
            assert_eq!(refused.reason(), "MALFORMED_TOKEN", "{header:?}");
        }
        let refused = bearer_token(tonic::Request::new(()).metadata()).unwrap_err();
        assert_eq!(refused.reason(), "MISSING_TOKEN");
    }
}
