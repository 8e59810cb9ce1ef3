//! Configuration helpers shared by the services' `clap` configs.
//!
//! Every setting comes from the environment (DESIGN.md conventions) and a flag of the same
//! name may override it; each service declares its own settings with `#[arg(long, env = ...)]`
//! and uses the parsers here for the values whose syntax is shared.

use std::time::Duration;

/// Settings of the gRPC server and the process around a service, the same for all four (each
/// service's config flattens them in).
#[derive(Debug, Clone, clap::Args)]
pub struct ServerSettings {
    /// On SIGTERM or Ctrl-C, how long the server goes on answering (new connections included)
    /// while grpc.health.v1 reports NOT_SERVING, before it drains: the time load balancers
    /// need to stop routing to it. Another signal cuts it short.
    #[arg(long, env = "SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            shutdown_delay: DEFAULT_SHUTDOWN_DELAY,
        }
    }
}

/// Environment variables whose values are secrets: a database URL carries its role's
/// password. clap prints the value of every `env` argument in `--help` unless the argument
/// says `hide_env_values = true`, and help output gets pasted into tickets and chats.
pub const SECRET_ENVS: &[&str] = &["DATABASE_URL"];

/// The arguments of `command` and of its subcommands whose `--help` would print the value of
/// a [`SECRET_ENVS`] variable, named `command --arg`: empty when every one hides it. Each
/// binary's tests hold its command to this.
pub fn secrets_shown_in_help(command: &clap::Command) -> Vec<String> {
    let mut shown: Vec<String> = command
        .get_arguments()
        .filter(|arg| {
            let env = arg.get_env().and_then(|env| env.to_str());
            env.is_some_and(|env| SECRET_ENVS.contains(&env)) && !arg.is_hide_env_values_set()
        })
        .map(|arg| format!("{} --{}", command.get_name(), arg.get_id()))
        .collect();
    for subcommand in command.get_subcommands() {
        shown.extend(secrets_shown_in_help(subcommand));
    }
    shown
}

/// Default `SHUTDOWN_DELAY`: a balancer's health probe every few seconds sees NOT_SERVING
/// before the listener closes. With the 20 s drain limit it stays inside the 30 s an
/// orchestrator usually allows before it kills the process.
pub const DEFAULT_SHUTDOWN_DELAY: Duration = Duration::from_secs(5);

/// The longest duration [`parse_duration`] accepts. Every setting it reads is a TTL, an
/// interval or a deadline: more than a year is a typo, and far more would overflow where it
/// is added to a clock (`Instant + Duration` panics) or wrap in the unit's arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Parses a human duration: a whole number followed by `ms`, `s`, `m` or `h` (`250ms`,
/// `30s`, `5m`, `1h`), at most [`MAX_DURATION`]. A bare number is seconds. Used for every TTL
/// and interval so that tests and operators write them the same way.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 250ms, 30s, 5m or 1h"))?;
    let millis_per_unit: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` in `{text}` (use ms, s, m or h)"
            ))
        }
    };
    value
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .filter(|duration| *duration <= MAX_DURATION)
        .ok_or_else(|| format!("`{text}` is longer than {}", format_duration(MAX_DURATION)))
}

/// Formats a duration the way [`parse_duration`] reads it back, for defaults and logs.
pub fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms > 0 && ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms > 0 && ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip() {
        for text in ["250ms", "30s", "5m", "1h", "0s"] {
            let parsed = parse_duration(text).unwrap();
            assert_eq!(format_duration(parsed), text);
        }
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("ms").is_err());
        // Past a year, and past what the units' arithmetic holds (this one used to wrap
        // round to 44 s in a release build).
        assert_eq!(parse_duration("8784h").unwrap(), MAX_DURATION);
        assert!(parse_duration("8785h").is_err());
        assert!(parse_duration("307445734561825861m").is_err());
        assert!(parse_duration("18446744073709551615ms").is_err());
    }
}
