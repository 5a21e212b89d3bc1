//! Keeps the plan's orderings true across Quiver's exchanges.
//!
//! Over a sorted input, such as a table stored sorted by its key, DataFusion
//! may plan an order-preserving repartition. Each of its output partitions
//! merges the sorted streams of every input partition, so the aggregate
//! above it can stream its groups (`ordering_mode=Sorted`), and the
//! operators above that rely on the order: a final merge then has no sort
//! below it.
//!
//! Quiver cuts every hash and round-robin repartition into a shuffle. A
//! shuffle reader reads the map outputs of its partition as they arrive,
//! not merged, so a partition read from several map tasks is not sorted.
//! Left alone, the plan above would then be wrong: the merge of `GROUP BY k
//! ORDER BY k` would return its rows out of order.
//!
//! This rule makes every such repartition a plain one, and the operators
//! above recompute their properties. An aggregate only wishes for sorted
//! input, so it hashes its groups instead. An operator that needs its input
//! sorted (a merge, a window, a sort-merge join) gets a sort below it where
//! the order is now missing. A repartition of a single input partition
//! keeps its order, as a shuffle from one map task does, and stays.
//!
//! The rule runs right after DataFusion's `EnsureRequirements`, which places
//! the repartitions, so that the later rules see the orderings that hold.

use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::Transformed;
use datafusion::error::Result;
use datafusion::physical_expr::{LexOrdering, OrderingRequirements, PhysicalSortExpr};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::{
    ExecutionPlan, ExecutionPlanProperties, replace_children_if_necessary,
};

/// The rule's name, as `EXPLAIN VERBOSE` shows it.
pub const UNORDERED_EXCHANGES: &str = "quiver_unordered_exchanges";

/// The DataFusion rule that places repartitions; this rule runs after it.
pub const PLACES_EXCHANGES: &str = "EnsureRequirements";

/// Plans every repartition that Quiver turns into a shuffle as one that does
/// not keep its input's order, and sorts where an operator needs the order.
#[derive(Debug, Default)]
pub struct UnorderedExchanges;

impl PhysicalOptimizerRule for UnorderedExchanges {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        unorder_exchanges(plan).map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        UNORDERED_EXCHANGES
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// Rewrites `plan` bottom up. Only the ancestors of a rewritten repartition
/// are rebuilt: everywhere else, DataFusion's plan already meets every
/// ordering requirement.
fn unorder_exchanges(plan: Arc<dyn ExecutionPlan>) -> Result<Transformed<Arc<dyn ExecutionPlan>>> {
    let mut changed = false;
    let children = plan
        .children()
        .into_iter()
        .map(|child| {
            let child = unorder_exchanges(Arc::clone(child))?;
            changed |= child.transformed;
            Ok(child.data)
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(repartition) = merging_repartition(&plan) {
        let input = children
            .into_iter()
            .next()
            .unwrap_or_else(|| Arc::clone(repartition.input()));
        let plain = RepartitionExec::try_new(input, repartition.partitioning().clone())?;
        return Ok(Transformed::yes(Arc::new(plain)));
    }
    if !changed {
        return Ok(Transformed::no(plan));
    }
    let rebuilt = replace_children_if_necessary(plan, children)?;
    let children = rebuilt
        .children()
        .into_iter()
        .zip(rebuilt.required_input_ordering())
        .map(|(child, required)| sorted_if_required(Arc::clone(child), required))
        .collect::<Result<Vec<_>>>()?;
    replace_children_if_necessary(rebuilt, children).map(Transformed::yes)
}

/// A repartition that merges several sorted input partitions into each
/// output partition to keep their order.
fn merging_repartition(plan: &Arc<dyn ExecutionPlan>) -> Option<&RepartitionExec> {
    plan.downcast_ref::<RepartitionExec>()
        .filter(|repartition| {
            repartition.preserve_order()
                && repartition.input().output_partitioning().partition_count() > 1
        })
}

/// `child`, or `child` sorted by the first alternative of a hard ordering
/// requirement that it does not meet. A soft requirement is only a wish.
fn sorted_if_required(
    child: Arc<dyn ExecutionPlan>,
    required: Option<OrderingRequirements>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let Some(OrderingRequirements::Hard(alternatives)) = required else {
        return Ok(child);
    };
    let properties = child.equivalence_properties();
    for alternative in &alternatives {
        if properties.ordering_satisfy_requirement(alternative.clone())? {
            return Ok(child);
        }
    }
    let Some(ordering) = alternatives.into_iter().next().and_then(|requirement| {
        LexOrdering::new(requirement.into_iter().map(PhysicalSortExpr::from))
    }) else {
        return Ok(child);
    };
    let partitioned = child.output_partitioning().partition_count() > 1;
    let sort = SortExec::new(ordering, child).with_preserve_partitioning(partitioned);
    Ok(Arc::new(sort))
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::execution::SessionStateBuilder;
    use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
    use datafusion::physical_plan::displayable;
    use datafusion::prelude::{SessionConfig, SessionContext, col};

    use super::*;

    /// A context whose table `sorted` has two partitions, each sorted by `k`,
    /// planned with `rules`.
    fn context(rules: Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>>) -> SessionContext {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let partition = |keys: std::ops::Range<i64>| {
            let keys: Vec<i64> = keys.collect();
            let batch = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(Int64Array::from(keys.clone())),
                    Arc::new(Int64Array::from(keys)),
                ],
            )
            .expect("batch");
            vec![batch]
        };
        let table = MemTable::try_new(
            Arc::clone(&schema),
            vec![partition(0..100), partition(100..200)],
        )
        .expect("table")
        .with_sort_order(vec![vec![col("k").sort(true, false)]]);
        let state = SessionStateBuilder::new()
            .with_config(SessionConfig::new().with_target_partitions(2))
            .with_default_features()
            .with_physical_optimizer_rules(rules)
            .build();
        let context = SessionContext::new_with_state(state);
        context
            .register_table("sorted", Arc::new(table))
            .expect("register");
        context
    }

    async fn plan(context: &SessionContext, sql: &str) -> Arc<dyn ExecutionPlan> {
        context
            .sql(sql)
            .await
            .expect("sql")
            .create_physical_plan()
            .await
            .expect("plan")
    }

    fn merging_repartitions(plan: &Arc<dyn ExecutionPlan>) -> usize {
        usize::from(merging_repartition(plan).is_some())
            + plan
                .children()
                .into_iter()
                .map(merging_repartitions)
                .sum::<usize>()
    }

    const GROUPED_IN_ORDER: &str = "SELECT k, sum(v) FROM sorted GROUP BY k ORDER BY k";

    #[tokio::test]
    async fn a_merge_over_a_shuffled_aggregate_gets_its_sort_back() {
        let datafusion = plan(&context(PhysicalOptimizer::new().rules), GROUPED_IN_ORDER).await;
        let shown = displayable(datafusion.as_ref()).indent(true).to_string();
        assert_eq!(merging_repartitions(&datafusion), 1, "{shown}");
        assert!(
            !shown.contains("SortExec"),
            "the order is only merged: {shown}"
        );

        let quiver = plan(
            &context(crate::planner::physical_optimizer_rules()),
            GROUPED_IN_ORDER,
        )
        .await;
        let shown = displayable(quiver.as_ref()).indent(true).to_string();
        assert_eq!(merging_repartitions(&quiver), 0, "{shown}");
        let lines: Vec<&str> = shown.lines().map(str::trim_start).collect();
        let merge = lines
            .iter()
            .position(|line| line.starts_with("SortPreservingMergeExec"))
            .expect("a final merge");
        assert!(
            lines[merge + 1..]
                .iter()
                .take_while(|line| !line.starts_with("RepartitionExec"))
                .any(|line| line.starts_with("SortExec")),
            "the partitions are sorted after the exchange: {shown}"
        );
        // The partial aggregate still streams over the sorted table; the
        // final one, behind the exchange, hashes.
        assert!(
            shown.contains("mode=Partial") && shown.contains("ordering_mode=Sorted"),
            "{shown}"
        );
        assert_eq!(shown.matches("ordering_mode=Sorted").count(), 1, "{shown}");
    }

    #[tokio::test]
    async fn plans_without_merging_repartitions_are_left_alone() {
        let context = context(PhysicalOptimizer::new().rules);
        for sql in [
            "SELECT k, v FROM sorted ORDER BY v",
            "SELECT v, count(*) FROM sorted GROUP BY v",
            "SELECT k, row_number() OVER (PARTITION BY v ORDER BY k) FROM sorted",
        ] {
            let plan = plan(&context, sql).await;
            let rewritten = UnorderedExchanges
                .optimize(Arc::clone(&plan), &ConfigOptions::default())
                .expect("rewrite");
            assert_eq!(merging_repartitions(&plan), 0, "{sql}");
            assert!(Arc::ptr_eq(&plan, &rewritten), "{sql}");
        }
    }
}
