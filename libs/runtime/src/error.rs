//! The one place where an error becomes a gRPC status.
//!
//! Services describe their failures as domain enums and convert them into an [`ApiError`]:
//! a status code, a stable UPPER_SNAKE `reason`, a message for humans and optional metadata.
//! [`ApiError`] becomes a `tonic::Status` carrying a `google.rpc.ErrorInfo` (domain
//! [`DOMAIN`]) so that clients in any language branch on `reason`, never on message text.
//! Database errors are mapped here once, Postgres SQLSTATEs included.

use std::collections::HashMap;

use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

/// `google.rpc.ErrorInfo.domain` of every stagedoor error.
pub const DOMAIN: &str = "stagedoor";

/// A failure as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    code: Code,
    reason: &'static str,
    message: String,
    metadata: Vec<(&'static str, String)>,
    /// The request field at fault, for INVALID_ARGUMENT: also sent as a BadRequest violation.
    field: Option<&'static str>,
}

impl ApiError {
    /// An error with its status code, stable reason and human message.
    pub fn new(code: Code, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            metadata: Vec::new(),
            field: None,
        }
    }

    /// INVALID_ARGUMENT / INVALID_FIELD for a request field that fails its check.
    pub fn invalid_field(field: &'static str, message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, "INVALID_FIELD", message)
            .with_metadata("field", field)
            .with_field(field)
    }

    /// UNAVAILABLE / SHUTTING_DOWN: this replica is stopping and will not answer `message`'s
    /// call; a retry (which a load balancer sends to another replica) will.
    pub fn shutting_down(message: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, "SHUTTING_DOWN", message)
    }

    /// INTERNAL: something the client cannot fix. The details go to the log, not the client.
    pub fn internal(context: impl std::fmt::Display) -> Self {
        tracing::error!(%context, "internal error");
        Self::new(
            Code::Internal,
            "INTERNAL",
            "internal error; it has been logged",
        )
    }

    /// Adds an ErrorInfo metadata entry (e.g. `field`, `status`, `seat_number`).
    pub fn with_metadata(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.metadata.push((key, value.into()));
        self
    }

    /// Names the request field at fault (sent as a `google.rpc.BadRequest` violation).
    pub fn with_field(mut self, field: &'static str) -> Self {
        self.field = Some(field);
        self
    }

    /// The gRPC status code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The stable ErrorInfo reason.
    pub fn reason(&self) -> &'static str {
        self.reason
    }

    /// The human message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The ErrorInfo metadata entries.
    pub fn metadata(&self) -> &[(&'static str, String)] {
        &self.metadata
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> Self {
        let metadata: HashMap<String, String> = error
            .metadata
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect();
        let mut details = ErrorDetails::with_error_info(error.reason, DOMAIN, metadata);
        if let Some(field) = error.field {
            details.add_bad_request_violation(field, error.message.clone());
        }
        tonic::Status::with_error_details(error.code, error.message, details)
    }
}

/// SQLSTATE 23505: a unique constraint refused a row.
pub const UNIQUE_VIOLATION: &str = "23505";
/// SQLSTATE 40001: a serializable transaction lost a race.
pub const SERIALIZATION_FAILURE: &str = "40001";
/// SQLSTATE 40P01: Postgres broke a deadlock by aborting this transaction.
pub const DEADLOCK_DETECTED: &str = "40P01";
/// SQLSTATE 57014: statement timeout or cancellation.
pub const QUERY_CANCELED: &str = "57014";

/// Whether `sqlstate` says the server, not the statement, is the trouble: class 08 (the
/// connection failed), 57P01-57P03 (Postgres is shutting down, crashed, or still starting:
/// a restart sends 57P01 to every connection before closing it) and 53300 (too many
/// connections). A retry, on a fresh connection, may well succeed.
fn server_unavailable(sqlstate: &str) -> bool {
    sqlstate.starts_with("08") || sqlstate.starts_with("57P") || sqlstate == "53300"
}

/// The SQLSTATE of a database error, if it is one.
pub fn sqlstate(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(db) => db.code().map(|code| code.into_owned()),
        _ => None,
    }
}

/// Whether a database error is a unique violation (of the named constraint, if given).
pub fn is_unique_violation(error: &sqlx::Error, constraint: Option<&str>) -> bool {
    match error {
        sqlx::Error::Database(db) if db.code().as_deref() == Some(UNIQUE_VIOLATION) => {
            constraint.is_none() || db.constraint() == constraint
        }
        _ => false,
    }
}

impl From<sqlx::Error> for ApiError {
    /// Database failures a service did not handle itself. Lost races become ABORTED (safe to
    /// retry), an unreachable or exhausted database UNAVAILABLE, everything else INTERNAL.
    fn from(error: sqlx::Error) -> Self {
        let state = sqlstate(&error);
        match state.as_deref() {
            Some(UNIQUE_VIOLATION) => {
                return ApiError::new(
                    Code::AlreadyExists,
                    "ALREADY_EXISTS",
                    "a concurrent request created the same thing; retry to read it",
                )
            }
            Some(SERIALIZATION_FAILURE) | Some(DEADLOCK_DETECTED) => {
                return ApiError::new(
                    Code::Aborted,
                    "CONCURRENT_UPDATE",
                    "a concurrent request changed the same data; retry",
                )
            }
            Some(QUERY_CANCELED) => {
                return ApiError::new(
                    Code::Unavailable,
                    "DATABASE_BUSY",
                    "the database took too long; retry",
                )
            }
            _ => {}
        }
        let unavailable = matches!(
            error,
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)
        ) || state.as_deref().is_some_and(server_unavailable);
        if unavailable {
            tracing::warn!(%error, "database unavailable");
            return ApiError::new(
                Code::Unavailable,
                "DATABASE_UNAVAILABLE",
                "the database is unavailable; retry",
            );
        }
        ApiError::internal(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_carries_error_info_and_bad_request() {
        let status: tonic::Status =
            ApiError::invalid_field("user_id", "user_id must not be empty").into();
        assert_eq!(status.code(), Code::InvalidArgument);
        let info = status.get_details_error_info().expect("ErrorInfo attached");
        assert_eq!(info.reason, "INVALID_FIELD");
        assert_eq!(info.domain, DOMAIN);
        assert_eq!(
            info.metadata.get("field").map(String::as_str),
            Some("user_id")
        );
        let bad_request = status
            .get_details_bad_request()
            .expect("BadRequest attached");
        assert_eq!(bad_request.field_violations[0].field, "user_id");
    }

    #[test]
    fn a_server_going_away_is_told_apart_from_a_bad_statement() {
        for away in ["57P01", "57P02", "57P03", "08006", "08001", "53300"] {
            assert!(server_unavailable(away), "{away}");
        }
        for statement in ["23505", "57014", "42P01", "22P02", "53100"] {
            assert!(!server_unavailable(statement), "{statement}");
        }
    }

    #[test]
    fn pool_timeout_is_unavailable() {
        let error: ApiError = sqlx::Error::PoolTimedOut.into();
        assert_eq!(error.code(), Code::Unavailable);
        assert_eq!(error.reason(), "DATABASE_UNAVAILABLE");
    }
}
