//! `quiver`: run SQL on a Quiver cluster from the command line, and manage
//! its jobs (`quiver job submit|status|cancel|list`).
//!
//! - [`statements`]: runs statements with a progress line and Ctrl-C cancel.
//! - [`shell`]: the interactive shell, when no SQL is given and stdin is a terminal.
//! - [`jobs`]: the `job` subcommands.

mod jobs;
mod shell;
mod statements;

use std::io::{IsTerminal, Read};

use clap::Parser;
use quiver_client::QuiverContext;
use quiver_client::output::Format;

use statements::{Outcome, Sink, run_statement, split_statements};

/// Run SQL on a Quiver cluster. Statements come from -c, then -f, else
/// stdin; with neither and a terminal, an interactive shell starts.
#[derive(Debug, Parser)]
#[command(name = "quiver", version)]
struct Cli {
    /// Scheduler to connect to.
    #[arg(
        long,
        env = "QUIVER_URL",
        default_value = "quiver://127.0.0.1:50050",
        global = true
    )]
    url: String,

    #[command(subcommand)]
    command: Option<Command>,

    /// SQL to run; may be given several times.
    #[arg(short = 'c', long = "command")]
    commands: Vec<String>,

    /// File of SQL statements to run; may be given several times.
    #[arg(short = 'f', long = "file")]
    files: Vec<std::path::PathBuf>,

    /// How results are printed.
    #[arg(long, env = "QUIVER_FORMAT", value_enum, default_value_t = Format::Table, global = true)]
    format: Format,

    /// Print how long each statement took, on stderr.
    #[arg(long)]
    timing: bool,

    /// Write the result of the last statement to this Parquet file (zstd)
    /// instead of printing it; earlier statements print as usual.
    #[arg(long, value_name = "FILE")]
    parquet: Option<std::path::PathBuf>,

    /// Start the interactive shell even when stdin is not a terminal.
    #[arg(long, env = "QUIVER_SHELL")]
    shell: bool,

    /// The shell's history file [default: ~/.quiver_history].
    #[arg(long, env = "QUIVER_HISTORY", value_name = "FILE")]
    history: Option<std::path::PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print every setting a session can SET, with its default, as markdown.
    Settings,
    /// Manage jobs.
    Job {
        #[command(subcommand)]
        command: jobs::JobCommand,
    },
}

/// Exit code of a run interrupted with Ctrl-C, as shells expect.
const INTERRUPTED: u8 = 130;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    statements::stop_on_terminate();
    let outcome = match cli.command {
        Some(Command::Settings) => {
            print!("{}", quiver_core::config::settings_markdown());
            Ok(Outcome::Done)
        }
        Some(Command::Job { command }) => match QuiverContext::connect(&cli.url).await {
            Ok(context) => jobs::run(&context, command, cli.format)
                .await
                .map(|()| Outcome::Done),
            Err(e) => Err(e.to_string()),
        },
        None => run_sql(cli).await,
    };
    match outcome {
        Ok(Outcome::Done) => std::process::ExitCode::SUCCESS,
        Ok(Outcome::Interrupted) => std::process::ExitCode::from(INTERRUPTED),
        Err(message) => {
            eprintln!("Error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_sql(cli: Cli) -> Result<Outcome, String> {
    let mut scripts = cli.commands.clone();
    for file in &cli.files {
        scripts.push(
            std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?,
        );
    }
    if scripts.is_empty() && (cli.shell || std::io::stdin().is_terminal()) {
        let context = QuiverContext::connect(&cli.url)
            .await
            .map_err(|e| e.to_string())?;
        let history = cli.history.clone().or_else(|| {
            std::env::var_os("HOME")
                .map(|home| std::path::PathBuf::from(home).join(".quiver_history"))
        });
        let options = shell::ShellOptions {
            format: cli.format,
            timing: cli.timing,
            history,
        };
        return shell::run(&context, options).await.map(|()| Outcome::Done);
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
    let statements: Vec<String> = scripts
        .iter()
        .flat_map(|script| split_statements(script))
        .collect();
    for (index, statement) in statements.iter().enumerate() {
        let sink = match &cli.parquet {
            Some(path) if index + 1 == statements.len() => Sink::Parquet(path),
            _ => Sink::Print(cli.format),
        };
        if let Outcome::Interrupted = run_statement(&context, statement, sink, cli.timing).await? {
            return Ok(Outcome::Interrupted);
        }
    }
    Ok(Outcome::Done)
}
