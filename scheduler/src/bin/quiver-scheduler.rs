//! `quiver-scheduler`: plans jobs and runs them on Quiver executors.

use clap::Parser;
use quiver_core::process::{init_tracing, serve_until_signal, shutdown_signal};
use quiver_scheduler::SchedulerConfig;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    init_tracing();
    let config = SchedulerConfig::parse();
    let address = format!("{}:{}", config.bind_host, config.port);
    serve_until_signal("quiver-scheduler", &address, |listener| {
        quiver_scheduler::run(config, listener, shutdown_signal())
    })
    .await
}
