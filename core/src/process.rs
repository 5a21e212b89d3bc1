//! What the server binaries share: logging, the shutdown signal, and turning a
//! bound listener plus a server future into an exit code.

use std::fmt::Display;
use std::future::Future;
use std::io::Write;
use std::process::ExitCode;
use std::str::FromStr;

use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::Directive;

use crate::storage::redact_store_echoes;

/// Logs to stderr at the level `RUST_LOG` asks for (`info` by default),
/// with what stores echo of credentials, and passwords in URLs, blanked
/// ([`redact_store_echoes`]): DataFusion logs store errors that Quiver never
/// sees (a failed statistics pre-warm, at `warn`, quotes S3's answer with
/// its `<Token-0>`), and plans at `debug`. sqlparser is held at `info`: at
/// `debug` it logs the tokens of statements, secrets included, in forms no
/// pattern can tell. Colours only a terminal: a log file or a pod's log
/// gets plain text, which `grep job_id=...` finds.
pub fn init_tracing() {
    init_tracing_at("info");
}

/// As [`init_tracing`], at `default_level` where `RUST_LOG` is not set: for a
/// tool that runs an embedded cluster and prints its own report.
pub fn init_tracing_at(default_level: &str) {
    use std::io::IsTerminal;

    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_level))
        .add_directive(Directive::from_str("sqlparser=info").unwrap_or_default());
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .with_writer(|| Redacted(std::io::stderr()))
        .init();
}

/// A log's output, through [`redact_store_echoes`]. The formatter writes
/// each event in one call, so an echo is never cut between two.
struct Redacted<W>(W);

impl<W: Write> Write for Redacted<W> {
    fn write(&mut self, event: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(event);
        self.0.write_all(redact_store_echoes(&text).as_bytes())?;
        Ok(event.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_events_lose_what_stores_echo() {
        let mut log = Redacted(Vec::new());
        write!(
            log,
            "WARN listing_table_factory: Failed to pre-warm statistics cache: 400 Bad Request: \
             <Error><Code>ExpiredToken</Code><Token-0>IQoJb3JpZ2luTOKEN</Token-0></Error>\n\
             DEBUG CopyTo: output_url=http://user:PASSWORD1@host/x/\n"
        )
        .expect("write");
        let logged = String::from_utf8(log.0).expect("text");
        assert!(!logged.contains("IQoJb3JpZ2luTOKEN"), "{logged}");
        assert!(!logged.contains("PASSWORD1"), "{logged}");
        assert!(logged.contains("<Token-0>***</Token-0>"), "{logged}");
        assert!(logged.contains("http://user:***@host/x/"), "{logged}");
    }
}
