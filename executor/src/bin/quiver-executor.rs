//! `quiver-executor`: runs tasks for a Quiver scheduler.

use clap::Parser;
use quiver_executor::ExecutorConfig;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let config = ExecutorConfig::parse();
    let bind = format!("{}:{}", config.bind_host, config.flight_port);
    let listener = match tokio::net::TcpListener::bind(&bind).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("quiver-executor: cannot bind the Flight data plane to {bind}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match quiver_executor::run(config, listener, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quiver-executor: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
