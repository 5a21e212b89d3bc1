//! `quiver-executor`: runs tasks for a Quiver scheduler.

use clap::Parser;
use quiver_core::process::{init_tracing, serve_until_signal, shutdown_signal};
use quiver_executor::ExecutorConfig;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    init_tracing();
    let config = ExecutorConfig::parse();
    // The executor serves its Flight data plane on this address.
    let address = format!("{}:{}", config.bind_host, config.flight_port);
    serve_until_signal("quiver-executor", &address, |listener| {
        quiver_executor::run(config, listener, shutdown_signal())
    })
    .await
}
