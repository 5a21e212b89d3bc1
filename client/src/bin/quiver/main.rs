//! `quiver`: run SQL on a Quiver cluster from the command line.

use std::io::{IsTerminal, Read, Write};
use std::time::Instant;

use clap::Parser;
use futures::TryStreamExt;
use quiver_client::QuiverContext;
use quiver_client::output::{Format, write_batches};
use quiver_proto::JobStatus;

/// Run SQL on a Quiver cluster. Statements come from -c, then -f, else stdin.
#[derive(Debug, Parser)]
#[command(name = "quiver", version)]
struct Cli {
    /// Scheduler to connect to.
    #[arg(long, env = "QUIVER_URL", default_value = "quiver://127.0.0.1:50050")]
    url: String,

    /// SQL to run; may be given several times.
    #[arg(short = 'c', long = "command")]
    commands: Vec<String>,

    /// File of SQL statements to run; may be given several times.
    #[arg(short = 'f', long = "file")]
    files: Vec<std::path::PathBuf>,

    /// How results are printed.
    #[arg(long, env = "QUIVER_FORMAT", value_enum, default_value_t = Format::Table)]
    format: Format,

    /// Print how long each statement took, on stderr.
    #[arg(long)]
    timing: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("Error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let mut scripts = cli.commands.clone();
    for file in &cli.files {
        scripts.push(
            std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?,
        );
    }
    if scripts.is_empty() {
        let mut input = String::new();
        std::io::stdin()
            .read_to_string(&mut input)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
        scripts.push(input);
    }
    let context = QuiverContext::connect(&cli.url)
        .await
        .map_err(|e| e.to_string())?;
    let mut stdout = std::io::stdout().lock();
    for statement in scripts.iter().flat_map(|script| split_statements(script)) {
        let started = Instant::now();
        let show_progress = std::io::stderr().is_terminal();
        let stream = context
            .execute_sql(&statement, |status| {
                if show_progress {
                    print_progress(status, started);
                }
            })
            .await
            .map_err(|e| e.to_string())?;
        let schema = stream.schema();
        let batches: Vec<_> = stream.try_collect().await.map_err(|e| e.to_string())?;
        if show_progress {
            eprint!("\r\x1b[2K");
        }
        write_batches(&mut stdout, cli.format, &schema, &batches).map_err(|e| e.to_string())?;
        stdout.flush().map_err(|e| e.to_string())?;
        if cli.timing {
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            eprintln!("{rows} rows in {:.3}s", started.elapsed().as_secs_f64());
        }
    }
    Ok(())
}

fn print_progress(status: &JobStatus, started: Instant) {
    if started.elapsed().as_millis() < 500 {
        return;
    }
    eprint!(
        "\r\x1b[2Kstages {}/{} done, {} tasks running, {:.1}s",
        status.stages_done,
        status.stages_total,
        status.tasks_running,
        started.elapsed().as_secs_f64()
    );
}

/// Splits a script into statements at semicolons outside quotes and comments.
fn split_statements(script: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    let mut chars = script.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                current.push(c);
                if c == q {
                    quote = None;
                }
            }
            None => match c {
                '\'' | '"' => {
                    quote = Some(c);
                    current.push(c);
                }
                '-' if chars.peek() == Some(&'-') => {
                    for skipped in chars.by_ref() {
                        if skipped == '\n' {
                            current.push('\n');
                            break;
                        }
                    }
                }
                ';' => statements.push(std::mem::take(&mut current)),
                _ => current.push(c),
            },
        }
    }
    statements.push(current);
    statements
        .into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::split_statements;

    #[test]
    fn splits_outside_quotes_and_comments() {
        let script = "select 'a;b'; -- c; d\nselect \"x;\" from t;\n\n";
        assert_eq!(
            split_statements(script),
            vec!["select 'a;b'", "select \"x;\" from t"]
        );
    }
}
