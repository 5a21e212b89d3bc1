//! The interactive shell: line editing and history (rustyline), statements
//! over several lines until a `;`, and backslash commands.

use std::path::PathBuf;

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{Field, Schema};
use quiver_client::QuiverContext;
use quiver_client::output::{Format, write_batches};
use quiver_core::storage::redact_sql;
use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;

use crate::statements::{Outcome, Sink, run_statement, split_terminated};

const PROMPT: &str = "quiver> ";
const CONTINUATION: &str = "     -> ";

const HELP: &str = "\
Statements end with ';' and may span several lines.
  \\d              list tables and views
  \\d NAME         describe a table or view
  \\timing [on|off] show how long each statement takes
  \\format table|csv|json  how results are printed
  \\q              quit (or Ctrl-D)
  \\?              this help
Ctrl-C cancels the running job on the cluster, or clears the line being typed.";

/// What the shell may change while it runs.
pub struct ShellOptions {
    pub format: Format,
    pub timing: bool,
    /// Where history is kept across sessions; none keeps no history.
    pub history: Option<PathBuf>,
}

/// Reads statements until `\q` or end of input, running each on the cluster.
/// A failed statement is reported and the shell goes on.
pub async fn run(context: &QuiverContext, mut options: ShellOptions) -> Result<(), String> {
    let mut editor = DefaultEditor::new().map_err(|e| format!("cannot start the shell: {e}"))?;
    if let Some(path) = &options.history {
        // A first session has no history yet.
        let _ = editor.load_history(path);
    }
    println!("Connected. Type \\? for help, \\q to quit.");
    let mut buffer = String::new();
    loop {
        let prompt = if buffer.is_empty() {
            PROMPT
        } else {
            CONTINUATION
        };
        // rustyline blocks: keep the runtime's other threads free meanwhile.
        let line = match tokio::task::block_in_place(|| editor.readline(prompt)) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => {
                buffer.clear();
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(format!("cannot read input: {e}")),
        };
        if buffer.is_empty() && line.trim_start().starts_with('\\') {
            let _ = editor.add_history_entry(line.trim());
            match run_command(context, line.trim(), &mut options).await {
                Ok(Continue::Yes) => continue,
                Ok(Continue::No) => break,
                Err(message) => {
                    eprintln!("Error: {message}");
                    continue;
                }
            }
        }
        if !buffer.is_empty() {
            buffer.push('\n');
        }
        buffer.push_str(&line);
        let (statements, rest) = split_terminated(&buffer);
        if !statements.is_empty() {
            // The history file is plain text: a store option's secret, or a
            // location's password, is kept as '***', to be typed again.
            let _ = editor.add_history_entry(redact_sql(buffer.trim()));
        }
        buffer = rest;
        for statement in statements {
            match run_statement(
                context,
                &statement,
                Sink::Print(options.format),
                options.timing,
            )
            .await
            {
                Ok(Outcome::Done) => {}
                // The job was cancelled on the cluster; the shell goes on.
                Ok(Outcome::Interrupted) => break,
                Err(message) => eprintln!("Error: {message}"),
            }
        }
    }
    if let Some(path) = &options.history
        && let Err(e) = editor.save_history(path)
    {
        eprintln!("cannot save the history to {}: {e}", path.display());
    }
    Ok(())
}

enum Continue {
    Yes,
    No,
}

async fn run_command(
    context: &QuiverContext,
    line: &str,
    options: &mut ShellOptions,
) -> Result<Continue, String> {
    let mut words = line.split_whitespace();
    let command = words.next().unwrap_or_default();
    let argument = words.next();
    if words.next().is_some() {
        return Err(format!("too many arguments to {command}; try \\?"));
    }
    let query = match (command, argument) {
        ("\\q", None) => return Ok(Continue::No),
        ("\\?" | "\\h", None) => {
            println!("{HELP}");
            return Ok(Continue::Yes);
        }
        ("\\timing", setting) => {
            options.timing = match setting {
                None => !options.timing,
                Some("on") => true,
                Some("off") => false,
                Some(other) => return Err(format!("\\timing takes on or off, not '{other}'")),
            };
            println!("Timing is {}.", if options.timing { "on" } else { "off" });
            return Ok(Continue::Yes);
        }
        ("\\format", Some(name)) => {
            options.format = match name {
                "table" => Format::Table,
                "csv" => Format::Csv,
                "json" => Format::Json,
                other => return Err(format!("unknown format '{other}': table, csv or json")),
            };
            return Ok(Continue::Yes);
        }
        ("\\d", None) => list_tables_query(),
        ("\\d", Some(name)) => {
            // The table as the catalog resolves the name: case, quotes and
            // qualifiers follow SQL's rules.
            let table = context.table(name).await.map_err(|e| e.to_string())?;
            print_columns(table.schema().as_arrow(), options.format)?;
            return Ok(Continue::Yes);
        }
        _ => return Err(format!("unknown command {line}; try \\?")),
    };
    let sink = Sink::Print(options.format);
    run_statement(context, &query, sink, false).await?;
    Ok(Continue::Yes)
}

fn list_tables_query() -> String {
    "SELECT table_schema, table_name, table_type FROM information_schema.tables \
     WHERE table_schema <> 'information_schema' ORDER BY table_schema, table_name"
        .to_owned()
}

/// Prints a table's columns: name, type and whether it may be null.
fn print_columns(schema: &Schema, format: Format) -> Result<(), String> {
    let fields = schema.fields();
    let text = |value: &dyn Fn(&Field) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(
            fields.iter().map(|field| value(field)),
        ))
    };
    let batch = RecordBatch::try_from_iter([
        ("column_name", text(&|field| field.name().clone())),
        ("data_type", text(&|field| field.data_type().to_string())),
        (
            "is_nullable",
            text(&|field| if field.is_nullable() { "YES" } else { "NO" }.to_owned()),
        ),
    ])
    .map_err(|e| e.to_string())?;
    write_batches(
        &mut std::io::stdout().lock(),
        format,
        &batch.schema(),
        &[batch],
    )
    .map_err(|e| e.to_string())
}
