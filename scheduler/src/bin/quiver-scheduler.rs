//! `quiver-scheduler`: plans jobs and runs them on Quiver executors.

use clap::Parser;
use quiver_scheduler::SchedulerConfig;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let config = SchedulerConfig::parse();
    let bind = format!("{}:{}", config.bind_host, config.port);
    let listener = match tokio::net::TcpListener::bind(&bind).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("quiver-scheduler: cannot bind {bind}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match quiver_scheduler::run(config, listener, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quiver-scheduler: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
