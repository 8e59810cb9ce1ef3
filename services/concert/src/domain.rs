//! The concert service's vocabulary and failures.

use chrono::{DateTime, SecondsFormat, Utc};
use stagedoor_runtime::ApiError;
use tonic::Code;

/// Most seats one fan may hold on one date at a time (anti-hoarding; DESIGN.md).
pub const MAX_SEATS_PER_FAN: usize = 4;

/// Failures of the concert domain; [`ApiError`] turns them into statuses.
#[derive(Debug, thiserror::Error)]
pub enum ConcertError {
    #[error("no concert {0}")]
    ConcertNotFound(String),
    #[error("no date {0}")]
    ScheduleNotFound(String),
    #[error("date {schedule_id} started at {start_time}: its sale is closed")]
    SaleClosed {
        schedule_id: String,
        start_time: DateTime<Utc>,
    },
    /// Also the answer to a fan who names another fan's hold (ReleaseHold), which must not
    /// learn that it exists; the internal calls carry no caller at all.
    #[error("no hold {0}")]
    HoldNotFound(String),
    #[error("the token admits to concert {token_concert}, not {concert}")]
    WrongConcert {
        token_concert: String,
        concert: String,
    },
    #[error("seat(s) {0:?} are not available")]
    SeatUnavailable(Vec<i32>),
    #[error("a fan holds at most {MAX_SEATS_PER_FAN} seats of one date; you hold {held} and asked for {asked}")]
    HoldLimitExceeded { held: i64, asked: usize },
    #[error("the hold is {0}, not HELD")]
    HoldNotHeld(&'static str),
    #[error("the hold expired and its seats were taken since")]
    HoldExpired,
    #[error("this idempotency key was used for a different request")]
    IdempotencyKeyReused,
    #[error("payment {payment_id} bought hold {hold_id}; a payment buys one hold")]
    PaymentBoughtAnotherHold { payment_id: String, hold_id: String },
    #[error(
        "a request with the same request_id for other seats was refused at the same moment; retry"
    )]
    KeyRefusedMeanwhile,
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl From<ConcertError> for ApiError {
    fn from(error: ConcertError) -> Self {
        let message = error.to_string();
        match error {
            ConcertError::ConcertNotFound(_) => {
                ApiError::new(Code::NotFound, "CONCERT_NOT_FOUND", message)
            }
            ConcertError::ScheduleNotFound(_) => {
                ApiError::new(Code::NotFound, "SCHEDULE_NOT_FOUND", message)
            }
            // FAILED_PRECONDITION: the date exists, but nothing about it can be bought now.
            ConcertError::SaleClosed {
                schedule_id,
                start_time,
            } => ApiError::new(Code::FailedPrecondition, "SALE_CLOSED", message)
                .with_metadata("schedule_id", schedule_id)
                .with_metadata(
                    "start_time",
                    start_time.to_rfc3339_opts(SecondsFormat::Secs, true),
                ),
            ConcertError::HoldNotFound(_) => {
                ApiError::new(Code::NotFound, "HOLD_NOT_FOUND", message)
            }
            ConcertError::WrongConcert { token_concert, .. } => {
                ApiError::new(Code::PermissionDenied, "TOKEN_WRONG_CONCERT", message)
                    .with_metadata("token_concert_id", token_concert)
            }
            // ABORTED: the caller lost a race for a seat; another seat may well succeed.
            ConcertError::SeatUnavailable(seats) => {
                ApiError::new(Code::Aborted, "SEAT_UNAVAILABLE", message).with_metadata(
                    "seat_numbers",
                    seats
                        .iter()
                        .map(i32::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                )
            }
            // How many the fan holds already: a client that lost track of its holds learns
            // how many seats it may still ask for (`limit` - `held`).
            ConcertError::HoldLimitExceeded { held, .. } => {
                ApiError::new(Code::FailedPrecondition, "HOLD_LIMIT_EXCEEDED", message)
                    .with_metadata("limit", MAX_SEATS_PER_FAN.to_string())
                    .with_metadata("held", held.to_string())
            }
            ConcertError::HoldNotHeld(status) => {
                ApiError::new(Code::FailedPrecondition, "HOLD_NOT_HELD", message)
                    .with_metadata("status", status)
            }
            ConcertError::HoldExpired => {
                ApiError::new(Code::FailedPrecondition, "HOLD_EXPIRED", message)
            }
            ConcertError::IdempotencyKeyReused => {
                ApiError::new(Code::InvalidArgument, "IDEMPOTENCY_KEY_REUSED", message)
                    .with_metadata("field", "request_id")
            }
            // ConfirmHold is idempotent per payment: its key names one sale.
            ConcertError::PaymentBoughtAnotherHold { hold_id, .. } => {
                ApiError::new(Code::InvalidArgument, "IDEMPOTENCY_KEY_REUSED", message)
                    .with_metadata("field", "payment_id")
                    .with_metadata("hold_id", hold_id)
            }
            // ABORTED: nothing was decided for this request; a retry is judged on its own.
            ConcertError::KeyRefusedMeanwhile => {
                ApiError::new(Code::Aborted, "CONCURRENT_UPDATE", message)
            }
            ConcertError::Api(api) => api,
            ConcertError::Database(db) => db.into(),
        }
    }
}

impl From<ConcertError> for tonic::Status {
    fn from(error: ConcertError) -> Self {
        ApiError::from(error).into()
    }
}
