//! Conversions between database time (`chrono`) and protobuf time.

use chrono::{DateTime, Utc};

/// A database instant as a `google.protobuf.Timestamp`.
pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// A span of time as a `google.protobuf.Duration`, clamped at zero.
pub fn duration(span: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: span.as_secs() as i64,
        nanos: span.subsec_nanos() as i32,
    }
}

/// A `google.protobuf.Timestamp` as a database instant; `None` when it is out of range.
pub fn from_timestamp(ts: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}
