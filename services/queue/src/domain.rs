//! The queue's vocabulary: token statuses, a fan's ticket, and what can go wrong.

use chrono::{DateTime, Utc};
use stagedoor_proto::queue::v1 as pb;
use stagedoor_runtime::ApiError;
use tonic::Code;
use uuid::Uuid;

/// Where a token is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenStatus {
    Waiting,
    Active,
    Done,
    Expired,
}

impl TokenStatus {
    /// The value stored in `tokens.status`.
    pub fn as_db(self) -> &'static str {
        match self {
            Self::Waiting => "WAITING",
            Self::Active => "ACTIVE",
            Self::Done => "DONE",
            Self::Expired => "EXPIRED",
        }
    }

    /// Reads `tokens.status`; the CHECK constraint guarantees one of the four.
    pub fn from_db(text: &str) -> Self {
        match text {
            "WAITING" => Self::Waiting,
            "ACTIVE" => Self::Active,
            "DONE" => Self::Done,
            _ => Self::Expired,
        }
    }

    /// Whether the token has ended (DONE or EXPIRED) and will never change again.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Expired)
    }

    /// The protobuf enum.
    pub fn to_proto(self) -> pb::TokenStatus {
        match self {
            Self::Waiting => pb::TokenStatus::Waiting,
            Self::Active => pb::TokenStatus::Active,
            Self::Done => pb::TokenStatus::Done,
            Self::Expired => pb::TokenStatus::Expired,
        }
    }
}

/// How a live token is ended before its window runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Its fan paid (CompleteToken): an ACTIVE token becomes DONE.
    Paid,
    /// Its fan left the line (LeaveQueue): a WAITING or ACTIVE token becomes EXPIRED.
    Left,
}

/// A token with where it stands, as read from the database in one query.
#[derive(Debug, Clone, PartialEq)]
pub struct Ticket {
    pub token: Uuid,
    pub concert_id: String,
    pub user_id: String,
    pub place: i64,
    /// Effective status: an ACTIVE row past its window reads EXPIRED.
    pub status: TokenStatus,
    pub create_time: DateTime<Utc>,
    pub admit_time: Option<DateTime<Utc>>,
    pub expire_time: Option<DateTime<Utc>>,
    /// The line's admission pointer when the ticket was read.
    pub admitted_through: i64,
    /// Whether the token's `last_seen` is old enough to be refreshed.
    pub heartbeat_due: bool,
    /// How long before this read its fan was last written as seen (`last_seen`): what a
    /// replica's memory counts the next heartbeat from. Zero for a ticket just issued.
    pub seen_ago: std::time::Duration,
}

impl Ticket {
    /// Fans ahead who have not been admitted yet; 0 unless WAITING.
    pub fn position(&self) -> i64 {
        position(self.status, self.place, self.admitted_through)
    }
}

/// Fans ahead of `place` given the line's admission pointer. O(1): no row is counted.
pub fn position(status: TokenStatus, place: i64, admitted_through: i64) -> i64 {
    match status {
        TokenStatus::Waiting => (place - admitted_through - 1).max(0),
        _ => 0,
    }
}

/// Failures of the queue's own domain; [`ApiError`] turns them into statuses.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the token is not a stagedoor queue token")]
    MalformedToken,
    #[error("no such token was issued")]
    TokenNotFound,
    #[error("the token is {}, not ACTIVE", .0.as_db())]
    TokenNotActive(TokenStatus),
    #[error("no concert {0}: a concert's waiting room opens when the concert is created")]
    ConcertNotFound(String),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> Self {
        match error {
            QueueError::MalformedToken => ApiError::new(
                Code::InvalidArgument,
                "MALFORMED_TOKEN",
                "the token is not a stagedoor queue token",
            )
            .with_metadata("field", "token")
            .with_field("token"),
            QueueError::TokenNotFound => ApiError::new(
                Code::Unauthenticated,
                "TOKEN_NOT_FOUND",
                "no such token was issued; enter the queue with IssueToken",
            ),
            QueueError::TokenNotActive(status) => ApiError::new(
                Code::FailedPrecondition,
                "TOKEN_NOT_ACTIVE",
                format!("the token is {}, not ACTIVE", status.as_db()),
            )
            .with_metadata("status", status.as_db()),
            QueueError::ConcertNotFound(ref concert_id) => {
                ApiError::new(Code::NotFound, "CONCERT_NOT_FOUND", error.to_string())
                    .with_metadata("concert_id", concert_id.clone())
            }
            QueueError::Api(api) => api,
            QueueError::Database(db) => db.into(),
        }
    }
}

impl From<QueueError> for tonic::Status {
    fn from(error: QueueError) -> Self {
        ApiError::from(error).into()
    }
}

/// Parses a token as sent by a client.
pub fn parse_token(text: &str) -> Result<Uuid, QueueError> {
    Uuid::try_parse(text.trim()).map_err(|_| QueueError::MalformedToken)
}
