//! The concert service's settings: environment variables, each overridable by the flag of
//! the same name (`CONCERT_HOLD_TTL` = `--hold-ttl`).

use std::{net::SocketAddr, time::Duration};

use stagedoor_runtime::config::{parse_duration, ServerSettings};

/// Default `LISTEN_ADDR` (DESIGN.md: concert listens on 50052).
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:50052";
/// Default `DATABASE_URL`: the concert service's own role on a local Postgres.
pub const DEFAULT_DATABASE_URL: &str = "postgres://stagedoor_concert@127.0.0.1:5432/stagedoor";
/// Default `QUEUE_URL`.
pub const DEFAULT_QUEUE_URL: &str = "http://127.0.0.1:50051";
const DEFAULT_MAX_CONNECTIONS: u32 = 16;
const DEFAULT_QUEUE_DEADLINE: &str = "10s";
const DEFAULT_HOLD_TTL: &str = "5m";
const DEFAULT_TOKEN_CACHE_TTL: &str = "1s";
const DEFAULT_HOLD_SWEEP_AFTER: &str = "10m";
const DEFAULT_HOLD_SWEEP_EVERY: &str = "30s";

/// Settings of one concert service process.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "stagedoor-concert",
    version,
    about = "stagedoor's seats and holds (gRPC)"
)]
pub struct ConcertConfig {
    /// Address the gRPC server listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = DEFAULT_LISTEN_ADDR)]
    pub listen_addr: SocketAddr,

    #[command(flatten)]
    pub server: ServerSettings,

    /// Postgres URL of the concert service's own role; its tables live in schema `concert`.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,

    /// Most Postgres connections this process opens.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub database_max_connections: u32,

    /// The queue service, which vouches for fans' tokens.
    #[arg(long, env = "QUEUE_URL", default_value = DEFAULT_QUEUE_URL)]
    pub queue_url: String,

    /// Deadline of every call to the queue: token checks and opening a concert's line.
    /// Generous on purpose: when a sale opens, a thousand fans may hit the same seat at once
    /// and their token checks queue up at the queue service; a fan waiting a few seconds is
    /// better served than one told UNAVAILABLE (which 2 s gave under CI's debug build).
    #[arg(long, env = "CONCERT_QUEUE_DEADLINE", default_value = DEFAULT_QUEUE_DEADLINE, value_parser = parse_duration)]
    pub queue_deadline: Duration,

    /// How long a hold keeps its seats unless paid.
    #[arg(long, env = "CONCERT_HOLD_TTL", default_value = DEFAULT_HOLD_TTL, value_parser = parse_duration)]
    pub hold_ttl: Duration,

    /// How long a token the queue vouched for is trusted without asking again (0 asks on
    /// every call). A token completed or expired meanwhile works here for at most this long;
    /// paying always asks the queue.
    #[arg(long, env = "CONCERT_TOKEN_CACHE_TTL", default_value = DEFAULT_TOKEN_CACHE_TTL, value_parser = parse_duration)]
    pub token_cache_ttl: Duration,

    /// How long after its expiry an unpaid hold is retired by the sweeper (its row becomes
    /// EXPIRED, its seats lose its mark). Until then a payment already under way may still
    /// buy it if nobody took its seats (ConfirmHold's paid-after-expiry rule); after, it is
    /// HOLD_EXPIRED. Fans see no difference: an expired hold's seats are free either way.
    #[arg(long, env = "CONCERT_HOLD_SWEEP_AFTER", default_value = DEFAULT_HOLD_SWEEP_AFTER, value_parser = parse_duration)]
    pub hold_sweep_after: Duration,

    /// How often each replica looks for holds to retire.
    #[arg(long, env = "CONCERT_HOLD_SWEEP_EVERY", default_value = DEFAULT_HOLD_SWEEP_EVERY, value_parser = parse_duration)]
    pub hold_sweep_every: Duration,
}

impl ConcertConfig {
    /// The defaults with `database_url` and `queue_url` and an ephemeral loopback port.
    /// Built field by field so exported variables never leak into a test.
    pub fn new(database_url: impl Into<String>, queue_url: impl Into<String>) -> Self {
        Self {
            listen_addr: "127.0.0.1:0".parse().expect("valid address"),
            server: ServerSettings::default(),
            database_url: database_url.into(),
            database_max_connections: DEFAULT_MAX_CONNECTIONS,
            queue_url: queue_url.into(),
            queue_deadline: parse_duration(DEFAULT_QUEUE_DEADLINE).expect("default parses"),
            hold_ttl: parse_duration(DEFAULT_HOLD_TTL).expect("default parses"),
            token_cache_ttl: parse_duration(DEFAULT_TOKEN_CACHE_TTL).expect("default parses"),
            hold_sweep_after: parse_duration(DEFAULT_HOLD_SWEEP_AFTER).expect("default parses"),
            hold_sweep_every: parse_duration(DEFAULT_HOLD_SWEEP_EVERY).expect("default parses"),
        }
    }

    /// Checks the settings that clap's types do not.
    pub fn validate(&self) -> Result<(), String> {
        if self.hold_ttl.is_zero() {
            return Err("CONCERT_HOLD_TTL must be above zero".into());
        }
        if self.queue_deadline.is_zero() {
            return Err("CONCERT_QUEUE_DEADLINE must be above zero".into());
        }
        if self.hold_sweep_every.is_zero() {
            return Err("CONCERT_HOLD_SWEEP_EVERY must be above zero".into());
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
            stagedoor_runtime::config::secrets_shown_in_help(&super::ConcertConfig::command());
        assert!(shown.is_empty(), "--help prints the value of {shown:?}");
    }
}
