//! The point service's settings: environment variables, each overridable by the flag of the
//! same name (`POINT_MAX_AMOUNT` = `--max-amount`).

use std::net::SocketAddr;

use stagedoor_runtime::config::ServerSettings;

/// Default `LISTEN_ADDR` (DESIGN.md: point listens on 50053).
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:50053";
/// Default `DATABASE_URL`: the point service's own role on a local Postgres.
pub const DEFAULT_DATABASE_URL: &str = "postgres://stagedoor_point@127.0.0.1:5432/stagedoor";
const DEFAULT_MAX_CONNECTIONS: u32 = 16;
const DEFAULT_MAX_AMOUNT: i64 = 1_000_000;
const DEFAULT_BALANCE_CAP: i64 = 100_000_000;

/// Settings of one point service process.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "stagedoor-point", version, about = "stagedoor's wallet (gRPC)")]
pub struct PointConfig {
    /// Address the gRPC server listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = DEFAULT_LISTEN_ADDR)]
    pub listen_addr: SocketAddr,

    #[command(flatten)]
    pub server: ServerSettings,

    /// Postgres URL of the point service's own role; its tables live in schema `point`.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,

    /// Most Postgres connections this process opens.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub database_max_connections: u32,

    /// Largest amount of one charge, in won (a spend may take up to the balance cap).
    #[arg(long, env = "POINT_MAX_AMOUNT", default_value_t = DEFAULT_MAX_AMOUNT)]
    pub max_amount: i64,

    /// Largest balance a charge may reach, in won.
    #[arg(long, env = "POINT_BALANCE_CAP", default_value_t = DEFAULT_BALANCE_CAP)]
    pub balance_cap: i64,
}

impl PointConfig {
    /// The defaults with `database_url` and an ephemeral loopback port (tests, launchers).
    /// Built field by field so exported variables never leak into a test.
    pub fn for_database(database_url: impl Into<String>) -> Self {
        Self {
            listen_addr: "127.0.0.1:0".parse().expect("valid address"),
            server: ServerSettings::default(),
            database_url: database_url.into(),
            database_max_connections: DEFAULT_MAX_CONNECTIONS,
            max_amount: DEFAULT_MAX_AMOUNT,
            balance_cap: DEFAULT_BALANCE_CAP,
        }
    }

    /// Checks the settings that clap's types do not.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_amount < 1 || self.balance_cap < self.max_amount {
            return Err("POINT_MAX_AMOUNT must be at least 1 and at most POINT_BALANCE_CAP".into());
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
            stagedoor_runtime::config::secrets_shown_in_help(&super::PointConfig::command());
        assert!(shown.is_empty(), "--help prints the value of {shown:?}");
    }
}
