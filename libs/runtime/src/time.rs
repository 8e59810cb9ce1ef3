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
///
/// The range is the Timestamp's own (years 0001 to 9999, nanos below a second), which
/// Postgres can store. chrono alone reaches ±262,000 years: an instant it accepts but
/// Postgres refuses would reach the database and come back as INTERNAL instead of bad input.
pub fn from_timestamp(ts: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    in_range(DateTime::from_timestamp(ts.seconds, ts.nanos as u32)?)
}

/// `at` if a `google.protobuf.Timestamp` can hold it (years 0001 to 9999), which every
/// instant read from a client (a field, a page token) must be before it goes to Postgres.
pub fn in_range(at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    use chrono::Datelike;
    (1..=9999).contains(&at.year()).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos }
    }

    #[test]
    fn timestamps_in_protobuf_range_convert_both_ways() {
        // 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999999Z, the range's two ends.
        for edge in [ts(-62_135_596_800, 0), ts(253_402_300_799, 999_999_999)] {
            let at = from_timestamp(&edge).expect("in range");
            assert_eq!(timestamp(at), edge);
        }
    }

    #[test]
    fn timestamps_outside_protobuf_range_are_none() {
        for outside in [
            ts(-62_135_596_801, 0),
            ts(253_402_300_800, 0),
            ts(-8_000_000_000_000, 0),
            ts(0, -1),
            ts(0, 1_000_000_000),
        ] {
            assert_eq!(from_timestamp(&outside), None, "{outside:?}");
        }
    }
}
