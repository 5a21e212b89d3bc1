//! `EXPLAIN ANALYZE` on the cluster: the statement runs as a job, then its
//! stage plans are shown with what every operator measured, summed over the
//! stage's tasks, and the slowest task of each stage.

use std::fmt::Write;
use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use datafusion::error::Result as DataFusionResult;
use datafusion::physical_plan::{ExecutionPlan, displayable};
use quiver_core::metrics::{format_metrics, human_bytes};
use quiver_proto::{JobStatus, Metric, OperatorMetrics, StageMetrics};

use crate::adaptive::{self, AdaptiveJoin};
use crate::join_swap;
use crate::reduction::{self, Reduction};
use crate::stages::StagePlan;

/// Metrics shown without `VERBOSE`: the ones that say where time, rows,
/// memory and bytes went, how many Parquet row groups statistics pruned, and
/// what a write wrote and committed.
const SUMMARY_METRICS: [&str; 14] = [
    "output_rows",
    "elapsed_compute",
    "spill_count",
    "spilled_bytes",
    "peak_mem_used",
    "shuffle_bytes_read",
    "shuffle_bytes_written",
    "bytes_scanned",
    "row_groups_pruned_statistics_pruned",
    "rows_written",
    "files_written",
    "bytes_written",
    "files_committed",
    "files_replaced",
];

/// The columns of `EXPLAIN ANALYZE`, as DataFusion has them.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("plan_type", DataType::Utf8, false),
        Field::new("plan", DataType::Utf8, false),
    ]))
}

/// One row for the job, then one per stage, final stage last. `stages` are
/// the stages as planned; joins that became broadcast joins, scans that
/// semi-join reductions filtered and joins that swapped their build side at
/// run time are shown as they ran, in the order the job decided them.
pub fn report(
    stages: &[StagePlan],
    status: &JobStatus,
    verbose: bool,
) -> Result<RecordBatch, ArrowError> {
    let broadcast = broadcast_joins(stages, status);
    let reduced = reductions(stages, status);
    let stages = &adaptive::replay(stages, &broadcast)
        .and_then(|stages| reduction::replay(&stages, &reduced))
        .and_then(|stages| swapped_joins(stages, status))
        .map_err(|error| ArrowError::ExternalError(Box::new(error)))?;
    let mut kinds = vec!["Job".to_owned()];
    let mut job_line = format!(
        "job {}: {:.3} s, {} result rows, {} stages, {} shuffled, {} read from storage",
        status.job_id,
        status.elapsed_micros as f64 / 1e6,
        status.result_rows,
        stages.len(),
        human_bytes(status.bytes_written),
        human_bytes(status.store_bytes_read),
    );
    if status.table_files_written > 0 {
        job_line.push_str(&format!(
            ", {} files of {} written to tables",
            status.table_files_written,
            human_bytes(status.table_bytes_written)
        ));
    }
    let mut texts = vec![job_line];
    let final_stage = stages.last().map(|stage| stage.stage_id);
    for stage in stages {
        let metrics = status
            .stages
            .iter()
            .find(|m| m.stage_id == stage.stage_id)
            .cloned()
            .unwrap_or_default();
        let role = if Some(stage.stage_id) == final_stage {
            " (final)"
        } else {
            ""
        };
        kinds.push(format!("Stage {}{role}", stage.stage_id));
        texts.push(stage_text(stage, &metrics, verbose));
    }
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from(kinds)),
            Arc::new(StringArray::from(texts)),
        ],
    )
}

/// The adaptive joins that became broadcast joins, in the order they were
/// decided: a stage's own join before the join its plan moved into.
fn broadcast_joins(stages: &[StagePlan], status: &JobStatus) -> Vec<AdaptiveJoin> {
    let mut joins: Vec<AdaptiveJoin> = adaptive::adaptive_joins(stages)
        .into_iter()
        .filter(|join| {
            status.stages.iter().any(|metrics| {
                metrics.stage_id == join.probe_stage && metrics.merged_into == join.join_stage
            })
        })
        .collect();
    joins.sort_by_key(|join| join.join_stage);
    joins
}

/// The semi-join reductions that filtered a scan, as the job decided them.
fn reductions(stages: &[StagePlan], status: &JobStatus) -> Vec<Reduction> {
    reduction::reductions(stages, &adaptive::adaptive_joins(stages))
        .into_iter()
        .filter(|reduction| {
            status.stages.iter().any(|metrics| {
                metrics.stage_id == reduction.scan_stage
                    && metrics.reduced_by == reduction.key_stage
            })
        })
        .collect()
}

/// `stages` with the joins that built from their other side swapped.
fn swapped_joins(stages: Vec<StagePlan>, status: &JobStatus) -> DataFusionResult<Vec<StagePlan>> {
    stages
        .into_iter()
        .map(|stage| {
            let swapped = status
                .stages
                .iter()
                .find(|metrics| metrics.stage_id == stage.stage_id)
                .map_or(&[][..], |metrics| &metrics.swapped_builds[..]);
            if swapped.is_empty() {
                Ok(stage)
            } else {
                join_swap::swap_joins(&stage, swapped)
            }
        })
        .collect()
}

fn stage_text(stage: &StagePlan, metrics: &StageMetrics, verbose: bool) -> String {
    if metrics.merged_into != 0 {
        return format!(
            "merged into stage {}, whose join broadcast its build side instead of \
             shuffling this stage's rows\n",
            metrics.merged_into
        );
    }
    let inputs: Vec<String> = stage.inputs.iter().map(u32::to_string).collect();
    let mut text = format!(
        "tasks={}, inputs=[{}], task time={:.3} ms in total",
        metrics.tasks,
        inputs.join(", "),
        metrics.task_micros_total as f64 / 1e3,
    );
    if metrics.tasks > 0 {
        let _ = write!(
            text,
            ", slowest task: partition {} on {} in {:.3} ms",
            metrics.slowest_task_partition,
            metrics.slowest_task_executor,
            metrics.slowest_task_micros as f64 / 1e3
        );
    }
    if !metrics.swapped_builds.is_empty() {
        let probes: Vec<String> = metrics.swapped_builds.iter().map(u32::to_string).collect();
        let _ = write!(
            text,
            ", build side swapped at run time: stage {} probes, as it wrote more rows",
            probes.join(", ")
        );
    }
    text.push('\n');
    let root: Arc<dyn ExecutionPlan> = Arc::clone(&stage.plan) as _;
    let mut index = 0;
    write_operator(&mut text, &root, 0, &mut index, &metrics.operators, verbose);
    text
}

/// Writes an operator and its subtree, numbering operators in pre-order as
/// the executors do (`quiver_core::metrics::operators_in_preorder`).
fn write_operator(
    out: &mut String,
    operator: &Arc<dyn ExecutionPlan>,
    depth: usize,
    index: &mut u32,
    measured: &[OperatorMetrics],
    verbose: bool,
) {
    let shown: Vec<Metric> = measured
        .iter()
        .find(|m| m.operator == *index)
        .map(|m| {
            m.metrics
                .iter()
                .filter(|metric| verbose || SUMMARY_METRICS.contains(&metric.name.as_str()))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let _ = write!(
        out,
        "{:indent$}{}",
        "",
        displayable(operator.as_ref())
            .one_line()
            .to_string()
            .trim_end(),
        indent = depth * 2
    );
    if !shown.is_empty() {
        let _ = write!(out, ", metrics=[{}]", format_metrics(&shown));
    }
    out.push('\n');
    *index += 1;
    for child in operator.children() {
        write_operator(out, child, depth + 1, index, measured, verbose);
    }
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;
    use quiver_core::metrics::operators_in_preorder;
    use quiver_proto::MetricKind;

    use super::*;
    use crate::stages::split_into_stages;

    #[tokio::test]
    async fn operators_are_numbered_as_the_executors_number_them() {
        let context = SessionContext::new();
        let plan = context
            .sql("SELECT x, count(*) FROM (VALUES (1), (2)) t(x) GROUP BY x ORDER BY x")
            .await
            .expect("plan")
            .create_physical_plan()
            .await
            .expect("physical");
        let stages = split_into_stages("job", plan, 2).expect("stages");
        let last = stages.last().expect("a final stage");
        let operators = operators_in_preorder(&(Arc::clone(&last.plan) as _));
        let deepest = operators.len() as u32 - 1;
        let metrics = StageMetrics {
            stage_id: last.stage_id,
            tasks: 2,
            operators: vec![OperatorMetrics {
                operator: deepest,
                metrics: vec![Metric {
                    name: "output_rows".into(),
                    value: 7,
                    kind: MetricKind::Count.into(),
                }],
            }],
            slowest_task_executor: "executor-1".into(),
            ..StageMetrics::default()
        };
        let text = stage_text(last, &metrics, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), operators.len() + 1, "{text}");
        let last_line = lines.last().expect("a line");
        assert!(
            last_line.contains(operators[deepest as usize].name())
                && last_line.ends_with("metrics=[output_rows=7]"),
            "{text}"
        );
        assert!(lines[0].contains("slowest task: partition 0 on executor-1"));
    }
}
