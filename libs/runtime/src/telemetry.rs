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
        .try_init();
}
