//! Session settings: Quiver's own `quiver.*` options, the defaults that make a
//! DataFusion plan distributable, and how settings travel with each job.

use datafusion::common::config::{ConfigEntry, ConfigExtension, ConfigOptions, ExtensionOptions};
use datafusion::common::extensions_options;
use datafusion::error::Result;
use datafusion::prelude::SessionConfig;
use quiver_proto::Setting;

extensions_options! {
    /// Quiver's session options, set with `SET quiver.<name> = <value>`.
    pub struct QuiverOptions {
        /// How many times a task is attempted before its job fails.
        pub max_task_attempts: usize, default = 4
        /// A job still running after this many seconds fails; 0 means no limit.
        pub job_timeout_secs: u64, default = 0
        /// A Parquet write task starts a new file once its current one reaches this size (at most 4 GiB).
        pub target_file_bytes: u64, default = 268435456
        /// Where map outputs are also stored (`s3://bucket/shuffle`), so that they outlive their executors; empty keeps them on the executors only.
        pub shuffle_location: String, default = String::new()
        /// A write task's list of the files it wrote comes back to the scheduler with its status when it is at most this many bytes (about 200 per file), and at most 64 MiB divided by the tasks of its stage (the commit task receives them all), and is copied into the table's staging folder otherwise. Either way it outlives the executor, so that a commit retried after its executor was lost needs no write task recomputed: that would read the table again, whose files an overwrite may have deleted.
        pub inline_file_list_max_bytes: u64, default = 1048576
        /// Largest estimated build side that a hash join broadcasts to every probe task when that ships fewer bytes than shuffling both sides; 0 turns the cost-based choice off (build sides under `datafusion.optimizer.hash_join_single_partition_threshold` are broadcast regardless).
        pub broadcast_join_max_bytes: u64, default = 134217728
        /// Decide partitioned hash joins again once their build side has run: the probe side's stage waits for it, and when the build side turns out small enough to broadcast (by the two settings above), the probe side runs inside the join's stage instead of being shuffled. A partitioned join whose two sides have both run builds its hash table from the side that wrote fewer rows, unless `datafusion.optimizer.join_reordering` is off.
        pub adaptive_joins: bool, default = true
        /// Filter a scan by the keys of a join's other side once the stage they come from has run: when one side of a hash join drops its rows that the other side has no key for (both sides of an inner or semi join, the probe side of a left or anti join, the build side of a right anti join), its key comes unchanged from a file scan in a stage that has not run (through projections, filters, inner joins, into both their sides when they join on that key, aggregate groups and shuffles), and the other side's key comes from a column of another stage's output (through operators that only keep or drop values: projections, filters, joins, aggregate groups, limits), the scan's stage waits for that stage. If it wrote at most `datafusion.optimizer.hash_join_single_partition_threshold` bytes, or at most `quiver.broadcast_join_max_bytes` and reading it in every task of the scan's stage ships less than the scan's estimated output, only scan rows whose key it holds go on. With this setting or `adaptive_joins` on, a partitioned join's build side that filters an aggregate (a `HAVING`) runs as a stage of its own, so that its size is known first.
        pub semi_join_reduction: bool, default = true
        /// Join a filtered input of a tree of inner joins with the one other input it has join keys with before the rest, when DataFusion estimates it the smaller of the two and small enough to broadcast (`quiver.broadcast_join_max_bytes`, or `datafusion.optimizer.hash_join_single_partition_threshold` if larger): a nation filtered by name then filters its suppliers before they meet `lineitem`. Nothing moves onto the largest input, and other joins keep the query's order. A filtered input whose one join is with the largest input, on a key that the largest joins one other input on, also filters that input by a semi join (in TPC-H Q9, `part` filters `partsupp`).
        pub reorder_joins: bool, default = true
        /// Aggregate the many side of a tree of inner joins before it meets the side the query groups by, when the query groups by every key that side joins on, that side's tables are scanned unfiltered, and the aggregated side holds the input with the most estimated rows: in TPC-H Q10, `lineitem` is summed per `o_custkey` before the customers' names and addresses are joined. Only `sum`, `min`, `max` and `count`, without `DISTINCT`, `FILTER` or `ORDER BY`.
        pub eager_aggregation: bool, default = true
    }
}

impl ConfigExtension for QuiverOptions {
    const PREFIX: &'static str = "quiver";
}

/// Settings that Quiver overrides from DataFusion's defaults, and why:
/// - round-robin repartitioning inside a stage would make each task compute
///   every input partition, so exchanges are planned as hash shuffles instead;
/// - join and aggregate dynamic filters are shared in memory between operators,
///   which does not work across stages that run in different processes;
/// - file-scan work stealing lets one partition read its siblings' files, but a
///   task runs only its own partition, so it would read every file;
/// - a partitioned join writes both of its sides through a shuffle, while a
///   broadcast (`CollectLeft`) join only ships its small build side, and its
///   probe side stays in the stage that scans it. DataFusion's thresholds are
///   tuned for one process, where repartitioning is an in-memory exchange, so
///   Quiver broadcasts build sides estimated below 32 MiB (Spark's equivalent
///   default is 10 MB). At TPC-H SF1 this stops Q3, Q5 and Q7 from shuffling
///   all of `lineitem`, and halves their time.
const DISTRIBUTED_DEFAULTS: &[(&str, &str)] = &[
    (
        "datafusion.execution.enable_file_stream_work_stealing",
        "false",
    ),
    (
        "datafusion.optimizer.enable_round_robin_repartition",
        "false",
    ),
    (
        "datafusion.optimizer.enable_join_dynamic_filter_pushdown",
        "false",
    ),
    (
        "datafusion.optimizer.enable_aggregate_dynamic_filter_pushdown",
        "false",
    ),
    ("datafusion.catalog.information_schema", "true"),
    (
        "datafusion.optimizer.hash_join_single_partition_threshold",
        "33554432",
    ),
    (
        "datafusion.optimizer.hash_join_single_partition_threshold_rows",
        "1048576",
    ),
];

/// A session config with Quiver's options registered and distributed defaults applied.
pub fn default_session_config() -> SessionConfig {
    let mut config = SessionConfig::new().with_option_extension(QuiverOptions::default());
    for (key, value) in DISTRIBUTED_DEFAULTS {
        // The keys are DataFusion's own, so setting them cannot fail.
        let _ = config.options_mut().set(key, value);
    }
    config
}

/// The session config of a job: the defaults, then the job's settings in order.
/// An unknown key or a bad value is the user's error and is reported as such.
pub fn session_config_from_settings(settings: &[Setting]) -> Result<SessionConfig> {
    let mut config = default_session_config();
    for setting in settings {
        config.options_mut().set(&setting.key, &setting.value)?;
    }
    Ok(config)
}

/// The entries of `options` that differ from [`default_session_config`]: what a
/// client sends with each job.
pub fn settings_to_send(options: &ConfigOptions) -> Vec<Setting> {
    let defaults = entry_values(default_session_config().options());
    entry_values(options)
        .into_iter()
        .filter(|(key, value)| defaults.iter().all(|(k, v)| k != key || v != value))
        .filter_map(|(key, value)| {
            value.map(|value| Setting {
                key: key.clone(),
                value,
            })
        })
        .collect()
}

/// Every option with its full key and value.
fn entry_values(options: &ConfigOptions) -> Vec<(String, Option<String>)> {
    entries(options)
        .into_iter()
        .map(|ConfigEntry { key, value, .. }| (key, value))
        .collect()
}

/// Quiver's options in `config`, or their defaults where none are registered.
pub fn quiver_options(config: &ConfigOptions) -> QuiverOptions {
    config
        .extensions
        .get::<QuiverOptions>()
        .cloned()
        .unwrap_or_default()
}

/// Every option, Quiver's first. DataFusion lists extension options without
/// their prefix, so Quiver's are prefixed here to be settable on the other side.
fn entries(options: &ConfigOptions) -> Vec<ConfigEntry> {
    let quiver = options
        .extensions
        .get::<QuiverOptions>()
        .map(|quiver| quiver.entries())
        .unwrap_or_default()
        .into_iter()
        .map(|mut entry| {
            if !entry.key.starts_with("quiver.") {
                entry.key = format!("quiver.{}", entry.key);
            }
            entry
        });
    let datafusion = options
        .entries()
        .into_iter()
        .filter(|entry| entry.key.starts_with("datafusion."));
    quiver.chain(datafusion).collect()
}

/// Defaults that depend on where the code runs, described rather than shown.
fn machine_dependent_default(key: &str) -> Option<&'static str> {
    match key {
        "datafusion.execution.target_partitions" => {
            Some("the scheduler's `--default-partitions` (4 unless set)")
        }
        "datafusion.execution.planning_concurrency" => Some("the scheduler's number of cores"),
        _ => None,
    }
}

/// The table of every setting a job can `SET`, with Quiver's defaults; where
/// Quiver overrides DataFusion's default, both are shown. `docs/settings.md`
/// is this table, and a test keeps it current.
pub fn settings_markdown() -> String {
    let datafusion_defaults = ConfigOptions::default().entries();
    let mut out = String::from(
        "# Settings\n\n\
         Generated by `quiver settings`; do not edit. Set any of these for a session with \
         `SET key = value`: they travel with each job.\n\n\
         | key | default | description |\n|---|---|---|\n",
    );
    for entry in entries(default_session_config().options()) {
        let value = entry.value.clone().unwrap_or_default();
        let datafusion = datafusion_defaults
            .iter()
            .find(|default| default.key == entry.key)
            .and_then(|default| default.value.clone())
            .unwrap_or_default();
        let default = if let Some(text) = machine_dependent_default(&entry.key) {
            text.to_owned()
        } else if entry.key.starts_with("datafusion.") && datafusion != value {
            format!("`{value}` (DataFusion: `{datafusion}`)")
        } else {
            format!("`{value}`")
        };
        let description = entry
            .description
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .replace('|', "\\|");
        out.push_str(&format!(
            "| `{}` | {default} | {description} |\n",
            entry.key
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_document_is_current() {
        // Embedded, so that the binary compares the document it was built
        // from: a copy built in another checkout must not read this one's.
        let stored = include_str!("../../docs/settings.md");
        let current = settings_markdown();
        let only_in = |text: &'static str, of: &str, other: &str| {
            let lines: Vec<&str> = of
                .lines()
                .filter(|line| !other.lines().any(|theirs| theirs == *line))
                .take(3)
                .collect();
            format!(
                "{} lines, first ones only in {text}: {lines:?}",
                of.lines().count()
            )
        };
        assert!(
            stored == current.as_str(),
            "docs/settings.md is out of date: run `cargo run -p quiver-client --bin quiver -- settings > docs/settings.md`; \
             stored: {}; current: {}",
            only_in("stored", stored, &current),
            only_in("current", &current, stored),
        );
    }
}
