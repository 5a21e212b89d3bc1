//! Operator metrics on the wire: what a task's DataFusion operators measured,
//! summed over tasks on the scheduler, and shown by `EXPLAIN ANALYZE`.
//!
//! Operators are named by their position in the stage plan, in pre-order.
//! The executor decodes the same plan the scheduler encoded, so both sides
//! walk the same tree.

use std::sync::Arc;

use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::metrics::MetricValue;
use quiver_proto::{Metric, MetricKind, OperatorMetrics};

/// Every operator of `plan` in pre-order: the root first, then each child's
/// subtree in order.
pub fn operators_in_preorder(plan: &Arc<dyn ExecutionPlan>) -> Vec<Arc<dyn ExecutionPlan>> {
    let mut operators = Vec::new();
    let mut pending = vec![Arc::clone(plan)];
    while let Some(operator) = pending.pop() {
        pending.extend(operator.children().into_iter().rev().map(Arc::clone));
        operators.push(operator);
    }
    operators
}

/// The metrics of every operator of an executed plan, each summed over the
/// partitions the task ran. Operators that measured nothing are left out.
pub fn operator_metrics(plan: &Arc<dyn ExecutionPlan>) -> Vec<OperatorMetrics> {
    operators_in_preorder(plan)
        .iter()
        .enumerate()
        .filter_map(|(index, operator)| {
            let mut metrics: Vec<Metric> = operator
                .metrics()?
                .aggregate_by_name()
                .iter()
                .flat_map(|metric| wire_metrics(metric.value()))
                .collect();
            // A stable order, so that reports read the same from run to run.
            metrics.sort_by(|a, b| a.name.cmp(&b.name));
            (!metrics.is_empty()).then_some(OperatorMetrics {
                operator: index as u32,
                metrics,
            })
        })
        .collect()
}

/// The wire form of one DataFusion metric: none for those that do not add up
/// over tasks, two for a pruning count (what was pruned, what was kept).
fn wire_metrics(value: &MetricValue) -> Vec<Metric> {
    let count = |name: String, value: usize| Metric {
        name,
        value: value as u64,
        kind: MetricKind::Count.into(),
    };
    let kind = match value {
        MetricValue::ElapsedCompute(_) | MetricValue::Time { .. } => MetricKind::TimeNanos,
        MetricValue::SpilledBytes(_) | MetricValue::OutputBytes(_) => MetricKind::Bytes,
        MetricValue::CurrentMemoryUsage(_) | MetricValue::PeakMemoryUsage { .. } => {
            MetricKind::Gauge
        }
        MetricValue::Count { name, .. } if name.contains("bytes") => MetricKind::Bytes,
        MetricValue::OutputRows(_)
        | MetricValue::OutputBatches(_)
        | MetricValue::SpillCount(_)
        | MetricValue::SpilledRows(_)
        | MetricValue::Count { .. } => MetricKind::Count,
        MetricValue::Gauge { .. } => MetricKind::Gauge,
        // Row groups, pages and files pruned by statistics, page indexes and
        // bloom filters: the counts add up over tasks.
        MetricValue::PruningMetrics {
            name,
            pruning_metrics,
        } => {
            return vec![
                count(format!("{name}_pruned"), pruning_metrics.pruned()),
                count(format!("{name}_matched"), pruning_metrics.matched()),
            ];
        }
        // Points in time and ratios do not add up over tasks.
        MetricValue::StartTimestamp(_)
        | MetricValue::EndTimestamp(_)
        | MetricValue::Ratio { .. }
        | MetricValue::Custom { .. } => return Vec::new(),
    };
    vec![Metric {
        name: value.name().to_owned(),
        value: value.as_usize() as u64,
        kind: kind.into(),
    }]
}

/// Adds one task's operator metrics into a stage's totals.
pub fn add_operator_metrics(totals: &mut Vec<OperatorMetrics>, task: &[OperatorMetrics]) {
    for operator in task {
        let position = match totals.binary_search_by_key(&operator.operator, |o| o.operator) {
            Ok(position) => position,
            Err(position) => {
                totals.insert(
                    position,
                    OperatorMetrics {
                        operator: operator.operator,
                        metrics: Vec::new(),
                    },
                );
                position
            }
        };
        let total = &mut totals[position].metrics;
        for metric in &operator.metrics {
            match total.iter_mut().find(|m| m.name == metric.name) {
                Some(existing) if metric.kind() == MetricKind::Gauge => {
                    existing.value = existing.value.max(metric.value);
                }
                Some(existing) => existing.value = existing.value.saturating_add(metric.value),
                None => total.push(metric.clone()),
            }
        }
    }
}

/// `name=value` pairs for people: times in ms, bytes in KiB/MiB/GiB.
pub fn format_metrics(metrics: &[Metric]) -> String {
    metrics
        .iter()
        .map(|metric| {
            let value = match metric.kind() {
                MetricKind::TimeNanos => format!("{:.3}ms", metric.value as f64 / 1e6),
                MetricKind::Bytes => human_bytes(metric.value),
                MetricKind::Gauge
                    if metric.name.contains("mem") || metric.name.contains("bytes") =>
                {
                    human_bytes(metric.value)
                }
                _ => metric.value.to_string(),
            };
            format!("{}={value}", metric.name)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bytes as people write them: `512 B`, `1.5 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;

    use super::*;

    fn metric(name: &str, value: u64, kind: MetricKind) -> Metric {
        Metric {
            name: name.into(),
            value,
            kind: kind.into(),
        }
    }

    #[tokio::test]
    async fn an_executed_plan_reports_rows_per_operator_in_preorder() {
        let context = SessionContext::new();
        let frame = context
            .sql("SELECT x % 3 AS k, count(*) FROM (VALUES (1), (2), (3), (4)) t(x) GROUP BY 1")
            .await
            .expect("plan");
        let plan = frame.create_physical_plan().await.expect("physical");
        datafusion::physical_plan::collect(Arc::clone(&plan), context.task_ctx())
            .await
            .expect("run");
        let operators = operators_in_preorder(&plan);
        assert_eq!(operators[0].name(), plan.name());
        let metrics = operator_metrics(&plan);
        let root = metrics
            .iter()
            .find(|o| o.operator == 0)
            .expect("root measured");
        let rows = root
            .metrics
            .iter()
            .find(|m| m.name == "output_rows")
            .expect("output rows");
        assert_eq!(rows.value, 3);
        assert!(
            metrics
                .iter()
                .all(|o| (o.operator as usize) < operators.len())
        );
    }

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
    }

    #[test]
    fn totals_sum_counts_and_keep_the_largest_gauge() {
        let task = |rows, peak| {
            vec![OperatorMetrics {
                operator: 2,
                metrics: vec![
                    metric("output_rows", rows, MetricKind::Count),
                    metric("peak_mem_used", peak, MetricKind::Gauge),
                ],
            }]
        };
        let mut totals = Vec::new();
        add_operator_metrics(&mut totals, &task(10, 100));
        add_operator_metrics(&mut totals, &task(5, 300));
        add_operator_metrics(
            &mut totals,
            &[OperatorMetrics {
                operator: 0,
                metrics: vec![metric("elapsed_compute", 2_500_000, MetricKind::TimeNanos)],
            }],
        );
        assert_eq!(totals[0].operator, 0);
        assert_eq!(
            format_metrics(&totals[1].metrics),
            "output_rows=15, peak_mem_used=300 B"
        );
        assert_eq!(
            format_metrics(&totals[0].metrics),
            "elapsed_compute=2.500ms"
        );
    }
}
