//! The payment service's settings: environment variables, each overridable by the flag of
//! the same name (`PAYMENT_LEASE` = `--lease`).

use std::{net::SocketAddr, time::Duration};

use stagedoor_runtime::config::{parse_duration, ServerSettings};

use crate::domain::Fault;

/// Default `LISTEN_ADDR` (DESIGN.md: payment listens on 50054).
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:50054";
/// Default `DATABASE_URL`: the payment service's own role on a local Postgres.
pub const DEFAULT_DATABASE_URL: &str = "postgres://stagedoor_payment@127.0.0.1:5432/stagedoor";
const DEFAULT_QUEUE_URL: &str = "http://127.0.0.1:50051";
const DEFAULT_CONCERT_URL: &str = "http://127.0.0.1:50052";
const DEFAULT_POINT_URL: &str = "http://127.0.0.1:50053";
const DEFAULT_MAX_CONNECTIONS: u32 = 16;
const DEFAULT_CALL_DEADLINE: &str = "5s";
const DEFAULT_PAY_PATIENCE: &str = "10s";
const DEFAULT_LEASE: &str = "30s";
const DEFAULT_RECOVERY_INTERVAL: &str = "1s";
const DEFAULT_RETRY_MAX: &str = "30s";

/// Settings of one payment service process.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "stagedoor-payment",
    version,
    about = "stagedoor's payment saga (gRPC)"
)]
pub struct PaymentConfig {
    /// Address the gRPC server listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = DEFAULT_LISTEN_ADDR)]
    pub listen_addr: SocketAddr,

    #[command(flatten)]
    pub server: ServerSettings,

    /// Postgres URL of the payment service's own role; its tables live in schema `payment`.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,

    /// Most Postgres connections this process opens.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub database_max_connections: u32,

    /// The queue service: checks tokens, completes them once paid.
    #[arg(long, env = "QUEUE_URL", default_value = DEFAULT_QUEUE_URL)]
    pub queue_url: String,

    /// The concert service: reads and confirms holds.
    #[arg(long, env = "CONCERT_URL", default_value = DEFAULT_CONCERT_URL)]
    pub concert_url: String,

    /// The point service: spends and refunds points.
    #[arg(long, env = "POINT_URL", default_value = DEFAULT_POINT_URL)]
    pub point_url: String,

    /// Deadline of every call to another service.
    #[arg(long, env = "PAYMENT_CALL_DEADLINE", default_value = DEFAULT_CALL_DEADLINE, value_parser = parse_duration)]
    pub call_deadline: Duration,

    /// How long Pay keeps retrying a peer that does not answer before it answers
    /// UNAVAILABLE / PAYMENT_IN_PROGRESS and leaves the payment to the recovery worker.
    #[arg(long, env = "PAYMENT_PAY_PATIENCE", default_value = DEFAULT_PAY_PATIENCE, value_parser = parse_duration)]
    pub pay_patience: Duration,

    /// How long a drive owns a payment without recording progress; after that
    /// (it crashed, say) another replica's recovery worker takes the payment over.
    #[arg(long, env = "PAYMENT_LEASE", default_value = DEFAULT_LEASE, value_parser = parse_duration)]
    pub lease: Duration,

    /// How often the recovery worker looks for unfinished payments whose lease ran out; also
    /// the first backoff of a payment whose peer was down.
    #[arg(long, env = "PAYMENT_RECOVERY_INTERVAL", default_value = DEFAULT_RECOVERY_INTERVAL, value_parser = parse_duration)]
    pub recovery_interval: Duration,

    /// Longest backoff between two recovery attempts of one payment.
    #[arg(long, env = "PAYMENT_RETRY_MAX", default_value = DEFAULT_RETRY_MAX, value_parser = parse_duration)]
    pub retry_max: Duration,

    /// Failure drill for tests and game days: stop every saga at this point as a crash
    /// would. Never set it in production.
    #[arg(long, env = "PAYMENT_FAULT", value_enum, default_value = "none")]
    pub fault: Fault,
}

impl PaymentConfig {
    /// The defaults with the given database and peers and an ephemeral loopback port.
    /// Built field by field so exported variables never leak into a test.
    pub fn new(
        database_url: impl Into<String>,
        queue_url: impl Into<String>,
        concert_url: impl Into<String>,
        point_url: impl Into<String>,
    ) -> Self {
        let duration = |text| parse_duration(text).expect("default parses");
        Self {
            listen_addr: "127.0.0.1:0".parse().expect("valid address"),
            server: ServerSettings::default(),
            database_url: database_url.into(),
            database_max_connections: DEFAULT_MAX_CONNECTIONS,
            queue_url: queue_url.into(),
            concert_url: concert_url.into(),
            point_url: point_url.into(),
            call_deadline: duration(DEFAULT_CALL_DEADLINE),
            pay_patience: duration(DEFAULT_PAY_PATIENCE),
            lease: duration(DEFAULT_LEASE),
            recovery_interval: duration(DEFAULT_RECOVERY_INTERVAL),
            retry_max: duration(DEFAULT_RETRY_MAX),
            fault: Fault::None,
        }
    }

    /// Checks the settings that clap's types do not.
    pub fn validate(&self) -> Result<(), String> {
        // A driver renews its lease before a call whenever less than two call deadlines are
        // left of it (saga.rs, `drive`): so a lease must last at least that long, or another
        // replica could take over mid-call.
        if self.lease < self.call_deadline * 2 {
            return Err("PAYMENT_LEASE must be at least twice PAYMENT_CALL_DEADLINE".into());
        }
        if self.call_deadline.is_zero() || self.recovery_interval.is_zero() {
            return Err(
                "PAYMENT_CALL_DEADLINE and PAYMENT_RECOVERY_INTERVAL must be above zero".into(),
            );
        }
        if self.retry_max < self.recovery_interval {
            return Err("PAYMENT_RETRY_MAX must be at least PAYMENT_RECOVERY_INTERVAL".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod help {
    use clap::CommandFactory;

    #[test]
    fn help_never_prints_the_database_password() {
        let shown =
            stagedoor_runtime::config::secrets_shown_in_help(&super::PaymentConfig::command());
        assert!(shown.is_empty(), "--help prints the value of {shown:?}");
    }
}
