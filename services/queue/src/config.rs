//! The queue service's settings: environment variables, each overridable by the flag of the
//! same name (`QUEUE_MAX_ACTIVE` = `--max-active`).

use std::{net::SocketAddr, time::Duration};

use stagedoor_runtime::config::{parse_duration, ServerSettings};

/// Default `LISTEN_ADDR` (DESIGN.md: queue listens on 50051).
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:50051";
/// Default `DATABASE_URL`: the queue's own role on a local Postgres.
pub const DEFAULT_DATABASE_URL: &str = "postgres://stagedoor_queue@127.0.0.1:5432/stagedoor";
const DEFAULT_MAX_CONNECTIONS: u32 = 16;
const DEFAULT_MAX_ACTIVE: u32 = 1000;
const DEFAULT_ADMIT_RATE: u32 = 200;
const DEFAULT_ACTIVE_TTL: &str = "30m";
const DEFAULT_IDLE_TTL: &str = "2m";
const DEFAULT_TICK: &str = "100ms";
const DEFAULT_WATCH_INTERVAL: &str = "2s";

/// Settings of one queue service process.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "stagedoor-queue",
    version,
    about = "stagedoor's waiting room (gRPC)"
)]
pub struct QueueConfig {
    /// Address the gRPC server listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = DEFAULT_LISTEN_ADDR)]
    pub listen_addr: SocketAddr,

    #[command(flatten)]
    pub server: ServerSettings,

    /// Postgres URL of the queue's own role; its tables live in schema `queue`.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,

    /// Most Postgres connections this process opens.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub database_max_connections: u32,

    /// Most tokens ACTIVE at once per concert (N).
    #[arg(long, env = "QUEUE_MAX_ACTIVE", default_value_t = DEFAULT_MAX_ACTIVE)]
    pub max_active: u32,

    /// Most fans admitted in any one second, per concert (R).
    #[arg(long, env = "QUEUE_ADMIT_RATE", default_value_t = DEFAULT_ADMIT_RATE)]
    pub admit_rate: u32,

    /// How long an admitted fan stays ACTIVE.
    #[arg(long, env = "QUEUE_ACTIVE_TTL", default_value = DEFAULT_ACTIVE_TTL, value_parser = parse_duration)]
    pub active_ttl: Duration,

    /// How long a WAITING fan may go without polling or watching before the token expires.
    /// A ghost goes at most a quarter of it later (heartbeats are written that coarsely) plus
    /// five heartbeat flushes (at most 10 s): 2m40s after its last poll at the default. A
    /// watcher's silence counts from the stream's end (for a phone that vanished, the server
    /// finds the dead connection within 40 s: `server::KEEPALIVE`).
    #[arg(long, env = "QUEUE_IDLE_TTL", default_value = DEFAULT_IDLE_TTL, value_parser = parse_duration)]
    pub idle_ttl: Duration,

    /// Period of the admission and expiry loop. With a short tick admissions are spread over
    /// the ticks (a long one lets up to `admit_rate` in at once); never more than `admit_rate`
    /// in any one second.
    #[arg(long, env = "QUEUE_TICK", default_value = DEFAULT_TICK, value_parser = parse_duration)]
    pub tick: Duration,

    /// Pause between two position updates of a WatchQueueStatus stream whose fan is 1,000 or
    /// more places back; a quarter of it under 1,000 places, a twentieth under 100. A
    /// watcher hears of its own admission as soon as its replica sees it (within about a
    /// tenth of a second), whatever its pause.
    #[arg(long, env = "QUEUE_WATCH_INTERVAL", default_value = DEFAULT_WATCH_INTERVAL, value_parser = parse_duration)]
    pub watch_interval: Duration,

    /// How often the stream of an ACTIVE fan re-reads its token, to hear of a payment or a
    /// leave made through another replica (through its own replica it hears at once). Not a
    /// setting: every re-read is a query, and ACTIVE watchers are as many as the cap. Tests
    /// move it to tell the two paths apart.
    #[arg(skip = ACTIVE_RECHECK)]
    pub active_recheck: Duration,
}

/// Default of [`QueueConfig::active_recheck`].
pub const ACTIVE_RECHECK: Duration = Duration::from_secs(2);

impl QueueConfig {
    /// The defaults, with `database_url` and an ephemeral loopback port (for tests and
    /// in-process launchers).
    pub fn for_database(database_url: impl Into<String>) -> Self {
        // Built field by field rather than parsed, so that a developer's exported
        // QUEUE_* or DATABASE_URL variables never leak into a test.
        let duration = |text| parse_duration(text).expect("default durations parse");
        Self {
            listen_addr: "127.0.0.1:0".parse().expect("valid address"),
            server: ServerSettings::default(),
            database_url: database_url.into(),
            database_max_connections: DEFAULT_MAX_CONNECTIONS,
            max_active: DEFAULT_MAX_ACTIVE,
            admit_rate: DEFAULT_ADMIT_RATE,
            active_ttl: duration(DEFAULT_ACTIVE_TTL),
            idle_ttl: duration(DEFAULT_IDLE_TTL),
            tick: duration(DEFAULT_TICK),
            watch_interval: duration(DEFAULT_WATCH_INTERVAL),
            active_recheck: ACTIVE_RECHECK,
        }
    }

    /// Checks the settings that clap's types do not.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_active == 0 {
            return Err("QUEUE_MAX_ACTIVE must be at least 1".into());
        }
        if self.admit_rate == 0 {
            return Err("QUEUE_ADMIT_RATE must be at least 1".into());
        }
        if self.tick.is_zero()
            || self.active_ttl.is_zero()
            || self.idle_ttl.is_zero()
            || self.watch_interval.is_zero()
        {
            return Err(
                "QUEUE_TICK, QUEUE_ACTIVE_TTL, QUEUE_IDLE_TTL and QUEUE_WATCH_INTERVAL \
                        must be above zero"
                    .into(),
            );
        }
        Ok(())
    }

    /// A WAITING token's `last_seen` is refreshed when older than this: a quarter of the idle
    /// TTL, so polls don't write on every call yet a polling fan is never taken for a ghost.
    pub fn heartbeat_every(&self) -> Duration {
        self.idle_ttl / 4
    }

    /// How often a replica writes the heartbeats it noted in memory: several times per
    /// heartbeat period, so a noted fan is written long before the sweeper could take it
    /// for a ghost.
    pub fn heartbeat_flush(&self) -> Duration {
        (self.heartbeat_every() / 4).clamp(Duration::from_millis(50), Duration::from_secs(2))
    }

    /// How old a WAITING token's `last_seen` must be for the sweeper to expire it as a ghost:
    /// the idle TTL, plus a heartbeat period, plus four flush periods.
    /// - A poll or a watch writes `last_seen` only when the last write is a heartbeat period
    ///   old, so the last write can be up to that much older than the fan's last sign of life;
    ///   without this period, a fan silent for less than the TTL could be taken for a ghost.
    /// - A poll only notes the fan in memory and the flusher writes it up to a flush period
    ///   later, so a fan who polls just before the TTL is up would otherwise be swept in
    ///   between, losing a place it kept by polling in time.
    pub fn ghost_after(&self) -> Duration {
        self.idle_ttl + self.heartbeat_every() + 4 * self.heartbeat_flush()
    }

    /// The token bucket's size: two ticks' worth of admissions (at least one fan), so that
    /// admissions are spread over the ticks. The bucket alone would let a second hold more
    /// than `admit_rate`, so admission also counts the last second (`store::admit`). That
    /// count blocks the tick that comes just as the batch of a second ago is still inside
    /// the window; one tick deep, the bucket would then throw that tick's refill away, and a
    /// line limited by the rate would drain at about R / (1 + tick) instead of R. Two deep,
    /// the next tick admits what the blocked one could not.
    pub fn admit_burst(&self) -> f64 {
        (f64::from(self.admit_rate) * 2.0 * self.tick.as_secs_f64()).max(1.0)
    }
}

#[cfg(test)]
mod help {
    use clap::CommandFactory;

    #[test]
    fn help_never_prints_the_database_password() {
        let shown =
            stagedoor_runtime::config::secrets_shown_in_help(&super::QueueConfig::command());
        assert!(shown.is_empty(), "--help prints the value of {shown:?}");
    }
}
