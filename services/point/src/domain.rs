//! The wallet's vocabulary: ledger entries and what can go wrong.

use chrono::{DateTime, Utc};
use stagedoor_proto::point::v1 as pb;
use stagedoor_runtime::{time, ApiError};
use tonic::Code;

/// What caused a balance change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Charge,
    Spend,
    Refund,
}

impl EntryKind {
    /// The value stored in `ledger.kind`.
    pub fn as_db(self) -> &'static str {
        match self {
            Self::Charge => "CHARGE",
            Self::Spend => "SPEND",
            Self::Refund => "REFUND",
        }
    }

    /// Reads `ledger.kind`; the CHECK constraint guarantees one of the three.
    pub fn from_db(text: &str) -> Self {
        match text {
            "CHARGE" => Self::Charge,
            "SPEND" => Self::Spend,
            _ => Self::Refund,
        }
    }
}

/// One ledger row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub entry_id: i64,
    pub user_id: String,
    pub kind: EntryKind,
    pub amount: i64,
    pub balance_after: i64,
    pub request_id: Option<String>,
    pub payment_id: Option<String>,
    pub create_time: DateTime<Utc>,
}

impl Entry {
    pub fn to_proto(&self) -> pb::LedgerEntry {
        let kind = match self.kind {
            EntryKind::Charge => pb::LedgerEntryKind::Charge,
            EntryKind::Spend => pb::LedgerEntryKind::Spend,
            EntryKind::Refund => pb::LedgerEntryKind::Refund,
        };
        pb::LedgerEntry {
            entry_id: self.entry_id.to_string(),
            user_id: self.user_id.clone(),
            kind: kind as i32,
            amount: self.amount,
            balance_after: self.balance_after,
            request_id: self.request_id.clone().unwrap_or_default(),
            payment_id: self.payment_id.clone().unwrap_or_default(),
            create_time: Some(time::timestamp(self.create_time)),
        }
    }
}

/// Failures of the wallet's domain; [`ApiError`] turns them into statuses.
#[derive(Debug, thiserror::Error)]
pub enum PointError {
    #[error("amount {amount} is outside 1 to {max}")]
    AmountOutOfRange { amount: i64, max: i64 },
    #[error("the balance would pass the cap of {cap}")]
    BalanceCapExceeded { cap: i64 },
    #[error("the idempotency key was used for a different request")]
    IdempotencyKeyReused { key: &'static str },
    #[error("the balance {balance} is short of {amount}")]
    InsufficientBalance { balance: i64, amount: i64 },
    #[error("the payment spent nothing")]
    PaymentNotFound,
    #[error("invalid page token")]
    InvalidPageToken,
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl From<PointError> for ApiError {
    fn from(error: PointError) -> Self {
        let message = error.to_string();
        match error {
            PointError::AmountOutOfRange { max, .. } => {
                ApiError::new(Code::InvalidArgument, "AMOUNT_OUT_OF_RANGE", message)
                    .with_metadata("field", "amount")
                    .with_metadata("max", max.to_string())
                    .with_field("amount")
            }
            PointError::BalanceCapExceeded { cap } => {
                // The amount is valid; the wallet's state refuses it (DESIGN.md: state is
                // FAILED_PRECONDITION).
                ApiError::new(Code::FailedPrecondition, "BALANCE_CAP_EXCEEDED", message)
                    .with_metadata("cap", cap.to_string())
            }
            PointError::IdempotencyKeyReused { key } => {
                ApiError::new(Code::InvalidArgument, "IDEMPOTENCY_KEY_REUSED", message)
                    .with_metadata("field", key)
            }
            PointError::InsufficientBalance { balance, amount } => {
                ApiError::new(Code::FailedPrecondition, "INSUFFICIENT_BALANCE", message)
                    .with_metadata("balance", balance.to_string())
                    .with_metadata("amount", amount.to_string())
            }
            PointError::PaymentNotFound => {
                ApiError::new(Code::NotFound, "PAYMENT_NOT_FOUND", message)
            }
            PointError::InvalidPageToken => ApiError::invalid_field("page_token", message),
            PointError::Api(api) => api,
            PointError::Database(db) => db.into(),
        }
    }
}

impl From<PointError> for tonic::Status {
    fn from(error: PointError) -> Self {
        ApiError::from(error).into()
    }
}
