//! `stagedoor-payment`: the payment saga as a process. All logic lives in the library.

use std::process::ExitCode;

use clap::Parser;
use stagedoor_payment::PaymentConfig;
use stagedoor_runtime::{server, telemetry};

#[global_allocator]
static ALLOCATOR: stagedoor_runtime::Allocator = stagedoor_runtime::Allocator;

#[tokio::main]
async fn main() -> ExitCode {
    telemetry::init();
    let config = PaymentConfig::parse();
    if let Err(problem) = config.validate() {
        eprintln!("stagedoor-payment: {problem}");
        return ExitCode::from(2);
    }
    let (listen_addr, server_settings) = (config.listen_addr, config.server.clone());
    server::run_binary(
        "stagedoor-payment",
        listen_addr,
        &server_settings,
        |listener| stagedoor_payment::start(config, listener),
    )
    .await
}
