//! The saga's vocabulary: its steps, the statuses clients see, and what can go wrong.

use stagedoor_runtime::ApiError;
use tonic::Code;

/// The next thing a payment's saga has to do (`payments.step`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Take the points (point's SpendPoints, keyed by the payment id).
    Spend,
    /// Sell the seats (concert's ConfirmHold, keyed by the payment id).
    Confirm,
    /// The seats could not be sold: give the points back (point's RefundPoints).
    Refund,
    /// Sold: mark the fan's queue token DONE so the next fan is admitted.
    CompleteToken,
    /// Nothing left to do.
    Done,
}

impl Step {
    pub fn as_db(self) -> &'static str {
        match self {
            Self::Spend => "SPEND",
            Self::Confirm => "CONFIRM",
            Self::Refund => "REFUND",
            Self::CompleteToken => "COMPLETE_TOKEN",
            Self::Done => "DONE",
        }
    }

    /// Reads `payments.step`; its CHECK constraint allows only these.
    pub fn from_db(text: &str) -> Self {
        match text {
            "SPEND" => Self::Spend,
            "CONFIRM" => Self::Confirm,
            "REFUND" => Self::Refund,
            "COMPLETE_TOKEN" => Self::CompleteToken,
            _ => Self::Done,
        }
    }
}

/// Where a payment stands, as clients see it (`payments.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Completed,
    Failed,
}

impl Status {
    pub fn as_db(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
        }
    }

    pub fn from_db(text: &str) -> Self {
        match text {
            "COMPLETED" => Self::Completed,
            "FAILED" => Self::Failed,
            _ => Self::Pending,
        }
    }
}

/// A place where a failure drill stops the saga as if the process had died there: after a
/// peer did its step and before the payment records it, the worst moment to crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// No drill (production).
    None,
    /// Points spent, not yet recorded, seats not confirmed.
    AfterSpend,
    /// Seats sold, not yet recorded, token not completed.
    AfterConfirm,
}

/// The reasons a FAILED payment may carry, as stable `'static` ErrorInfo reasons. A peer's
/// refusal outside this list is reported as PAYMENT_FAILED (FAILED_PRECONDITION) with the
/// peer's reason in the metadata (`cause`). No peer's INVALID_ARGUMENT is passed on as such:
/// Pay's own input was checked before the saga began, so the fan's request was not at fault.
const FAILURE_REASONS: [(&str, Code); 4] = [
    ("INSUFFICIENT_BALANCE", Code::FailedPrecondition),
    ("HOLD_EXPIRED", Code::FailedPrecondition),
    ("HOLD_NOT_HELD", Code::FailedPrecondition),
    ("HOLD_NOT_FOUND", Code::NotFound),
];

/// What a Pay, GetPayment or ListPayments call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    #[error("no hold {0} of yours")]
    HoldNotFound(String),
    /// `payment_id`: the payment that bought it, when one did (else empty).
    #[error("hold {hold_id} is {status}: it cannot be paid")]
    HoldNotHeld {
        hold_id: String,
        status: String,
        payment_id: String,
    },
    #[error("hold {0} expired unpaid and was retired: it cannot be paid any more")]
    HoldExpired(String),
    #[error("hold {hold_id} already has payment {payment_id}")]
    HoldAlreadyPaying { hold_id: String, payment_id: String },
    #[error("this queue token already pays for another hold (payment {payment_id}): one admission buys one hold")]
    TokenAlreadyPaying { payment_id: String },
    #[error("the token admits to concert {token_concert}, the hold is for concert {concert}")]
    WrongConcert {
        token_concert: String,
        concert: String,
    },
    #[error("request_id {request_id} was used for another hold (payment {payment_id})")]
    IdempotencyKeyReused {
        request_id: String,
        payment_id: String,
    },
    #[error("payment {0} not found")]
    PaymentNotFound(String),
    #[error("payment {0} is still in progress (a service it needs is slow or down); it will finish on its own: retry Pay with the same request_id or read it with GetPayment")]
    InProgress(String),
    #[error("payment {payment_id} failed: {message}")]
    Failed {
        payment_id: String,
        reason: String,
        message: String,
        /// What the payment cost: INSUFFICIENT_BALANCE says it, for a client to show how
        /// many points are missing.
        amount: i64,
    },
    #[error("the concert service cannot be reached; retry")]
    ConcertUnavailable,
    #[error("invalid page_token")]
    InvalidPageToken,
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl From<PaymentError> for ApiError {
    fn from(error: PaymentError) -> Self {
        let message = error.to_string();
        match error {
            PaymentError::HoldNotFound(_) => {
                ApiError::new(Code::NotFound, "HOLD_NOT_FOUND", message)
            }
            PaymentError::HoldNotHeld {
                status, payment_id, ..
            } => {
                let error = ApiError::new(Code::FailedPrecondition, "HOLD_NOT_HELD", message)
                    .with_metadata("status", status);
                if payment_id.is_empty() {
                    error
                } else {
                    error.with_metadata("payment_id", payment_id)
                }
            }
            PaymentError::HoldExpired(hold_id) => {
                ApiError::new(Code::FailedPrecondition, "HOLD_EXPIRED", message)
                    .with_metadata("hold_id", hold_id)
            }
            // Lost races (DESIGN.md: ALREADY_EXISTS / ABORTED): another request created the
            // payment this one would have, and the client can read it by `payment_id`. If
            // that payment failed between the refused insert and the look-up, nothing is
            // left to read and nothing blocks a retry: ABORTED, retry with the same key.
            PaymentError::HoldAlreadyPaying { payment_id, .. }
            | PaymentError::TokenAlreadyPaying { payment_id }
                if payment_id.is_empty() =>
            {
                ApiError::new(
                    Code::Aborted,
                    "CONCURRENT_UPDATE",
                    "the payment this one lost to failed a moment ago; retry with the same \
                     request_id",
                )
            }
            PaymentError::HoldAlreadyPaying { payment_id, .. } => {
                ApiError::new(Code::AlreadyExists, "HOLD_ALREADY_PAYING", message)
                    .with_metadata("payment_id", payment_id)
            }
            PaymentError::TokenAlreadyPaying { payment_id } => {
                ApiError::new(Code::AlreadyExists, "TOKEN_ALREADY_PAYING", message)
                    .with_metadata("payment_id", payment_id)
            }
            PaymentError::WrongConcert { token_concert, .. } => {
                ApiError::new(Code::PermissionDenied, "TOKEN_WRONG_CONCERT", message)
                    .with_metadata("token_concert_id", token_concert)
            }
            PaymentError::IdempotencyKeyReused { payment_id, .. } => {
                ApiError::new(Code::InvalidArgument, "IDEMPOTENCY_KEY_REUSED", message)
                    .with_metadata("field", "request_id")
                    .with_metadata("payment_id", payment_id)
            }
            PaymentError::PaymentNotFound(_) => {
                ApiError::new(Code::NotFound, "PAYMENT_NOT_FOUND", message)
            }
            // UNAVAILABLE: retrying (with the same request_id) is exactly what to do.
            PaymentError::InProgress(payment_id) => {
                ApiError::new(Code::Unavailable, "PAYMENT_IN_PROGRESS", message)
                    .with_metadata("payment_id", payment_id)
            }
            PaymentError::Failed {
                payment_id,
                reason,
                amount,
                ..
            } => {
                let known = FAILURE_REASONS
                    .iter()
                    .find(|(known, _)| *known == reason.as_str());
                let error = match known {
                    Some((reason, code)) => ApiError::new(*code, reason, message),
                    None => ApiError::new(Code::FailedPrecondition, "PAYMENT_FAILED", message)
                        .with_metadata("cause", reason.clone()),
                }
                .with_metadata("payment_id", payment_id);
                if reason == "INSUFFICIENT_BALANCE" {
                    error.with_metadata("amount", amount.to_string())
                } else {
                    error
                }
            }
            PaymentError::ConcertUnavailable => {
                ApiError::new(Code::Unavailable, "CONCERT_UNAVAILABLE", message)
            }
            PaymentError::InvalidPageToken => ApiError::invalid_field("page_token", message),
            PaymentError::Api(api) => api,
            PaymentError::Database(db) => db.into(),
        }
    }
}

impl From<PaymentError> for tonic::Status {
    fn from(error: PaymentError) -> Self {
        ApiError::from(error).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_race_names_the_winner_or_asks_for_a_retry() {
        let lost = ApiError::from(PaymentError::HoldAlreadyPaying {
            hold_id: "h".into(),
            payment_id: "p".into(),
        });
        assert_eq!(
            (lost.code(), lost.reason()),
            (Code::AlreadyExists, "HOLD_ALREADY_PAYING")
        );
        assert_eq!(lost.metadata(), [("payment_id", "p".to_owned())]);
        // The winner failed before it could be looked up: nothing to read, retry.
        for vanished in [
            PaymentError::HoldAlreadyPaying {
                hold_id: "h".into(),
                payment_id: String::new(),
            },
            PaymentError::TokenAlreadyPaying {
                payment_id: String::new(),
            },
        ] {
            let retry = ApiError::from(vanished);
            assert_eq!(
                (retry.code(), retry.reason()),
                (Code::Aborted, "CONCURRENT_UPDATE")
            );
        }
    }

    #[test]
    fn a_hold_that_was_bought_names_its_payment() {
        let not_held = |status: &str, payment_id: &str| {
            ApiError::from(PaymentError::HoldNotHeld {
                hold_id: "h".into(),
                status: status.into(),
                payment_id: payment_id.into(),
            })
        };
        let sold = not_held("CONFIRMED", "p");
        assert_eq!(
            (sold.code(), sold.reason()),
            (Code::FailedPrecondition, "HOLD_NOT_HELD")
        );
        assert_eq!(
            sold.metadata(),
            [
                ("status", "CONFIRMED".to_owned()),
                ("payment_id", "p".to_owned())
            ]
        );
        assert_eq!(
            not_held("RELEASED", "").metadata(),
            [("status", "RELEASED".to_owned())]
        );
    }
}
