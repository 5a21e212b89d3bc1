//! `tpch`: generate TPC-H data and run the 22 queries on Quiver (an embedded
//! cluster or a running one) and on single-node DataFusion.

use std::path::PathBuf;

use arrow::util::pretty::pretty_format_batches;
use clap::{Parser, Subcommand, ValueEnum};
use quiver_benchmarks::queries::{QUERY_COUNT, query};
use quiver_benchmarks::report::{QueryTiming, markdown_table, median};
use quiver_benchmarks::runner::{Engine, datafusion_engine};
use quiver_benchmarks::{datagen, verify};
use quiver_client::{QuiverContext, StandaloneCluster, StandaloneOptions};

#[derive(Debug, Parser)]
#[command(
    name = "tpch",
    version,
    about = "TPC-H data generation and benchmark runner for Quiver"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate the TPC-H tables as Parquet (skips tables already complete).
    Gen(GenArgs),
    /// Run the TPC-H queries and print results and timings.
    Run(RunArgs),
    /// Measure the end-to-end time of trivial queries through the client.
    Latency(LatencyArgs),
    /// Split each query's time on Quiver: submission, tasks, shuffle, result.
    Profile(ProfileArgs),
}

#[derive(Debug, clap::Args)]
struct ProfileArgs {
    #[command(flatten)]
    data: GenArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Only these queries (default: all 22).
    #[arg(long = "query", short = 'q')]
    queries: Vec<usize>,
    /// Runs of each query before the profiled one (warm caches, as in `run`).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Write the profiles as JSON to this file.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Write the table as markdown to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

/// Where the Quiver jobs run.
#[derive(Debug, clap::Args)]
struct ClusterArgs {
    /// A running Quiver cluster; without it an embedded cluster is started.
    #[arg(long)]
    url: Option<String>,
    /// Executors of the embedded cluster.
    #[arg(long, default_value_t = 2)]
    executors: usize,
    /// Task slots per executor of the embedded cluster.
    #[arg(long, default_value_t = 1)]
    slots: usize,
    /// Shuffle partitions (and DataFusion target partitions).
    #[arg(long, default_value_t = 2)]
    partitions: usize,
    /// Bytes of small map outputs each embedded executor holds in memory
    /// instead of files (0: every output is a file).
    #[arg(long, default_value_t = StandaloneOptions::default().shuffle_memory_limit)]
    shuffle_memory_limit: u64,
    /// A session setting for the Quiver jobs, as KEY=VALUE (repeatable), e.g.
    /// `--set quiver.shuffle_location=s3://bucket/shuffle`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    settings: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct LatencyArgs {
    #[command(flatten)]
    data: GenArgs,
    /// Runs of each query (after 10 warm-up runs).
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// A running Quiver cluster; without it an embedded cluster is started.
    #[arg(long)]
    url: Option<String>,
    /// Executors of the embedded cluster.
    #[arg(long, default_value_t = 2)]
    executors: usize,
}

#[derive(Debug, clap::Args)]
struct GenArgs {
    /// Scale factor (1 is about 1 GB of raw data).
    #[arg(long, default_value_t = 0.1)]
    sf: f64,
    /// Files per large table.
    #[arg(long, default_value_t = 4)]
    parts: usize,
    /// Output folder (default: data/tpch-sf<SF>).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EngineChoice {
    Quiver,
    Datafusion,
    Both,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    data: GenArgs,
    /// Which engine(s) to run.
    #[arg(long, value_enum, default_value_t = EngineChoice::Both)]
    engine: EngineChoice,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Runs of each query.
    #[arg(long, default_value_t = 1)]
    iterations: usize,
    /// Only these queries (default: all 22).
    #[arg(long = "query", short = 'q')]
    queries: Vec<usize>,
    /// Compare every Quiver answer with single-node DataFusion and fail on any difference.
    #[arg(long)]
    verify: bool,
    /// Print the first rows of each result.
    #[arg(long, default_value_t = 3)]
    show_rows: usize,
    /// Write the timings as JSON to this file.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Write the comparison table as markdown to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Its embedded cluster logs what the servers' would: redacted alike.
    quiver_core::process::init_tracing_at("warn");
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Gen(args) => generate(&args).map(|_| ()),
        Command::Run(args) => run(args).await,
        Command::Latency(args) => latency(args).await,
        Command::Profile(args) => profile(args).await,
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tpch: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn generate(args: &GenArgs) -> Result<Vec<(String, PathBuf)>, String> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("data/tpch-sf{}", args.sf)));
    eprintln!("TPC-H SF {} in {} ...", args.sf, out.display());
    let started = std::time::Instant::now();
    let tables = datagen::generate(args.sf, args.parts, &out).map_err(|e| e.to_string())?;
    eprintln!("data ready in {:.1}s", started.elapsed().as_secs_f64());
    Ok(tables)
}

async fn run(args: RunArgs) -> Result<(), String> {
    let tables = generate(&args.data)?;
    let mut engines = Vec::new();
    let mut cluster = None;
    if args.engine != EngineChoice::Datafusion || args.verify {
        let (context, started) = configured_cluster(&args.cluster).await?;
        cluster = started;
        engines.push(Engine::Quiver(context));
    }
    if args.engine != EngineChoice::Quiver || args.verify {
        engines.push(datafusion_engine(args.cluster.partitions));
    }
    for engine in &engines {
        engine.register_tables(&tables).await?;
    }
    let numbers = query_numbers(&args.queries);
    let mut timings = Vec::new();
    let mut failures = Vec::new();
    for (done, &number) in numbers.iter().enumerate() {
        let sql = query(number).ok_or_else(|| format!("there is no TPC-H query {number}"))?;
        let mut results = Vec::new();
        for engine in &engines {
            let mut millis = Vec::new();
            let mut batches = Vec::new();
            for _ in 0..args.iterations.max(1) {
                let (result, elapsed) = engine
                    .timed(sql)
                    .await
                    .map_err(|e| format!("Q{number} on {}: {e}", engine.name()))?;
                millis.push(elapsed.as_secs_f64() * 1000.0);
                batches = result;
            }
            let timing = QueryTiming {
                query: number,
                engine: engine.name(),
                rows: batches.iter().map(|b| b.num_rows()).sum(),
                millis,
            };
            eprintln!(
                "[{:>2}/{}] Q{number:02} {:<10} {:>6} rows  median {:>9.1} ms  (min {:.1}, max {:.1})",
                done + 1,
                numbers.len(),
                engine.name(),
                timing.rows,
                timing.median(),
                timing.min(),
                timing.max(),
            );
            timings.push(timing);
            results.push(batches);
        }
        if let Some(first) = results.first().filter(|_| args.show_rows > 0) {
            let preview: Vec<_> = first
                .iter()
                .take(1)
                .map(|b| b.slice(0, b.num_rows().min(args.show_rows)))
                .collect();
            if let Ok(table) = pretty_format_batches(&preview) {
                println!("Q{number}:\n{table}");
            }
        }
        if args.verify
            && results.len() == 2
            && let Err(difference) = verify::compare(&results[1], &results[0])
        {
            eprintln!("Q{number:02} VERIFY FAILED: {difference}");
            failures.push(number);
        }
    }
    let table = markdown_table(&timings);
    report(
        &table,
        args.markdown.as_deref(),
        &timings,
        args.output.as_deref(),
    )?;
    if let Some(cluster) = cluster {
        cluster.shutdown().await;
    }
    if failures.is_empty() {
        if args.verify {
            eprintln!(
                "verified: all {} answers equal single-node DataFusion",
                numbers.len()
            );
        }
        Ok(())
    } else {
        Err(format!(
            "answers differ from DataFusion for queries {failures:?}"
        ))
    }
}

/// Prints `table`, and writes it to `markdown` and `results` as JSON to `json`, if given.
fn report(
    table: &str,
    markdown: Option<&std::path::Path>,
    results: &impl serde::Serialize,
    json: Option<&std::path::Path>,
) -> Result<(), String> {
    println!("{table}");
    let write = |path: &std::path::Path, contents: &str| {
        std::fs::write(path, contents).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    if let Some(path) = markdown {
        write(path, table)?;
    }
    if let Some(path) = json {
        write(
            path,
            &serde_json::to_string_pretty(results).map_err(|e| e.to_string())?,
        )?;
    }
    Ok(())
}

/// The cluster of `args` (connected to, or embedded and started), with the
/// session settings applied.
async fn configured_cluster(
    args: &ClusterArgs,
) -> Result<(QuiverContext, Option<StandaloneCluster>), String> {
    let options = StandaloneOptions {
        executors: args.executors,
        slots_per_executor: args.slots,
        default_partitions: args.partitions,
        shuffle_memory_limit: args.shuffle_memory_limit,
        ..StandaloneOptions::default()
    };
    let (context, cluster) = quiver_context(args.url.as_deref(), options).await?;
    for setting in &args.settings {
        let (key, value) = setting
            .split_once('=')
            .ok_or_else(|| format!("--set takes KEY=VALUE, got '{setting}'"))?;
        let statement = format!("SET {key} = '{}'", value.replace('\'', "''"));
        context
            .sql(&statement)
            .await
            .map_err(|e| format!("{statement}: {e}"))?;
    }
    Ok((context, cluster))
}

/// The query numbers asked for, or all 22.
fn query_numbers(asked: &[usize]) -> Vec<usize> {
    if asked.is_empty() {
        (1..=QUERY_COUNT).collect()
    } else {
        asked.to_vec()
    }
}

async fn profile(args: ProfileArgs) -> Result<(), String> {
    let tables = generate(&args.data)?;
    let (context, cluster) = configured_cluster(&args.cluster).await?;
    let engine = Engine::Quiver(context.clone());
    engine.register_tables(&tables).await?;
    let numbers = query_numbers(&args.queries);
    let mut profiles = Vec::new();
    for (done, &number) in numbers.iter().enumerate() {
        let sql = query(number).ok_or_else(|| format!("there is no TPC-H query {number}"))?;
        for _ in 0..args.warmup {
            engine.run(sql).await?;
        }
        let profiled = quiver_benchmarks::profile::profile(&context, number, sql).await?;
        eprintln!(
            "[{:>2}/{}] Q{number:02} job {:>8.1} ms, {} stages, {} tasks",
            done + 1,
            numbers.len(),
            profiled.job_ms,
            profiled.stages,
            profiled.tasks
        );
        profiles.push(profiled);
    }
    let table = quiver_benchmarks::profile::markdown(&profiles);
    report(
        &table,
        args.markdown.as_deref(),
        &profiles,
        args.output.as_deref(),
    )?;
    if let Some(cluster) = cluster {
        cluster.shutdown().await;
    }
    Ok(())
}

/// Connects to the cluster at `url`, or starts an embedded one shaped by `options`.
async fn quiver_context(
    url: Option<&str>,
    options: StandaloneOptions,
) -> Result<(QuiverContext, Option<StandaloneCluster>), String> {
    if let Some(url) = url {
        let context = QuiverContext::connect(url)
            .await
            .map_err(|e| e.to_string())?;
        return Ok((context, None));
    }
    let executors = options.executors;
    let slots = options.slots_per_executor;
    let cluster = StandaloneCluster::start(options)
        .await
        .map_err(|e| e.to_string())?;
    eprintln!(
        "embedded cluster at {} with {executors} executors x {slots} slots",
        cluster.url()
    );
    let context = cluster
        .connect(executors)
        .await
        .map_err(|e| e.to_string())?;
    Ok((context, Some(cluster)))
}

async fn latency(args: LatencyArgs) -> Result<(), String> {
    let tables = generate(&args.data)?;
    let options = StandaloneOptions {
        executors: args.executors,
        slots_per_executor: 1,
        ..StandaloneOptions::default()
    };
    let (context, cluster) = quiver_context(args.url.as_deref(), options).await?;
    let engine = Engine::Quiver(context);
    let nation: Vec<_> = tables
        .into_iter()
        .filter(|(name, _)| name == "nation")
        .collect();
    engine.register_tables(&nation).await?;
    println!("| query | runs | median (ms) | p99 (ms) | max (ms) |");
    println!("|---|---:|---:|---:|---:|");
    for sql in [
        "SELECT 1",
        "SELECT n_name FROM nation WHERE n_nationkey = 7",
    ] {
        for _ in 0..10 {
            engine.run(sql).await?;
        }
        let mut millis = Vec::with_capacity(args.runs);
        for _ in 0..args.runs.max(1) {
            let (_, elapsed) = engine.timed(sql).await?;
            millis.push(elapsed.as_secs_f64() * 1000.0);
        }
        millis.sort_by(f64::total_cmp);
        let p99 = millis[((millis.len() * 99).div_ceil(100)).saturating_sub(1)];
        println!(
            "| `{sql}` | {} | {:.2} | {:.2} | {:.2} |",
            millis.len(),
            median(&millis),
            p99,
            millis[millis.len() - 1]
        );
    }
    if let Some(cluster) = cluster {
        cluster.shutdown().await;
    }
    Ok(())
}
