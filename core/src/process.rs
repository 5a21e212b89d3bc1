//! What the server binaries share: logging, the shutdown signal, and turning a
//! bound listener plus a server future into an exit code.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// Logs to stderr at the level `RUST_LOG` asks for (`info` by default).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Completes on Ctrl-C or, on Unix, SIGTERM (what Kubernetes sends).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Binds `address`, runs `serve` until it ends, and reports failures as
/// `name: message` on stderr.
pub async fn serve_until_signal<Fut, E>(
    name: &str,
    address: &str,
    serve: impl FnOnce(TcpListener) -> Fut,
) -> ExitCode
where
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let listener = match TcpListener::bind(address).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("{name}: cannot bind {address}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match serve(listener).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}
