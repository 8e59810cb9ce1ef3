//! `stagedoor-queue`: the waiting room as a process. All logic lives in the library.

use std::process::ExitCode;

use clap::Parser;
use stagedoor_queue::QueueConfig;
use stagedoor_runtime::{server, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    telemetry::init();
    let config = QueueConfig::parse();
    if let Err(problem) = config.validate() {
        eprintln!("stagedoor-queue: {problem}");
        return ExitCode::from(2);
    }
    let listener = match server::bind(config.listen_addr).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("stagedoor-queue: {error}");
            return ExitCode::FAILURE;
        }
    };
    let service = match stagedoor_queue::start(config, listener).await {
        Ok(service) => service,
        Err(error) => {
            eprintln!("stagedoor-queue: {error}");
            return ExitCode::FAILURE;
        }
    };
    match service.run_until_os_signal().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("stagedoor-queue: server failed: {error}");
            ExitCode::FAILURE
        }
    }
}
