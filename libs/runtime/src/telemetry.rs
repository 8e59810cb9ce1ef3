//! Logging through `tracing`; `RUST_LOG` sets the level (default `info`).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber, logging at `info` unless `RUST_LOG` says otherwise.
/// Calling it again (e.g. from several tests) is harmless.
pub fn init() {
    init_with_default("info");
}

/// Like [`init`], with another default level: commands that draw on the terminal (the
/// demo's progress bars) log only warnings unless asked.
pub fn init_with_default(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{level},sqlx=warn,h2=warn,tower=warn,hyper=warn"))
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(colours_wanted())
        .try_init();
}

/// Colours only for a person at a terminal: logs written to a file, a pipe, `docker compose
/// logs` or a collector must not carry escape codes. `NO_COLOR` (no-color.org) turns them
/// off at a terminal too.
fn colours_wanted() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|no| no.is_empty())
}
