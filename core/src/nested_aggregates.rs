//! Aggregates of nested values (structs, lists, maps, unions) with memory
//! that is measured, and held, per value, on executors.
//!
//! DataFusion 55 keeps such values as `ScalarValue`s. One taken from an
//! array is a one-row slice of it, so it keeps the whole array alive and
//! reports the array's size as its own. Summed over many values, the
//! reported size grows with the square of the input. On an executor, where
//! a shuffled batch's columns share the buffer of one IPC message, a few
//! thousand values reported hundreds of gigabytes and the memory pool
//! failed the task. Two aggregates keep such slices:
//!
//! - `count(DISTINCT x)` keeps every value it sees, and measures its set
//!   again after every batch. [`compact_distinct_count`] counts the same set
//!   with the same answers, but copies a value out of its batch when it is
//!   first seen and adds its size once, as it is inserted.
//! - An ordered `array_agg(x ORDER BY ...)` copies the values it is given
//!   row by row, but keeps the values of the partial results it merges as
//!   slices. [`ordered_array_agg`] merges a partial result by handing its
//!   rows to DataFusion's own accumulator as input rows, which it copies,
//!   and lets it sort them, as it sorts its input.
//!
//! [`with_measured_nested_aggregates`] swaps both into a decoded stage plan.
//! Each aggregate keeps its name, state and output, so the stages on either
//! side of it do not see the change.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, FieldRef, SchemaRef};
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::{DataFusionError, Result};
use datafusion::functions_aggregate::array_agg::array_agg_udaf;
use datafusion::functions_aggregate::count::count_udaf;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::AggregateOrderSensitivity;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, Volatility,
};
use datafusion::physical_expr::aggregate::{AggregateExprBuilder, AggregateFunctionExpr};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::AggregateExec;

/// The function's name, as an executor's plan shows it.
pub const COMPACT_DISTINCT_COUNT: &str = "quiver_count_distinct";

/// `count(DISTINCT x)` for a nested `x`; see the module documentation.
pub fn compact_distinct_count() -> Arc<AggregateUDF> {
    static FUNCTION: LazyLock<Arc<AggregateUDF>> =
        LazyLock::new(|| Arc::new(AggregateUDF::from(CompactDistinctCount::new())));
    Arc::clone(&FUNCTION)
}

/// The ordered `array_agg` of nested values, as an executor's plan shows it.
pub const ORDERED_ARRAY_AGG: &str = "quiver_ordered_array_agg";

/// `array_agg(x ORDER BY ...)` of a nested `x` or ordering; see the module
/// documentation.
pub fn ordered_array_agg() -> Arc<AggregateUDF> {
    static FUNCTION: LazyLock<Arc<AggregateUDF>> = LazyLock::new(|| {
        Arc::new(AggregateUDF::from(OrderedArrayAgg {
            array_agg: array_agg_udaf(),
        }))
    });
    Arc::clone(&FUNCTION)
}

/// `plan` with each `count(DISTINCT x)` of a nested `x` counted by
/// [`compact_distinct_count`], and each ordered `array_agg` of nested
/// values collected by [`ordered_array_agg`].
pub fn with_measured_nested_aggregates(
    plan: Arc<dyn ExecutionPlan>,
) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        let Some(aggregate) = node.downcast_ref::<AggregateExec>() else {
            return Ok(Transformed::no(node));
        };
        let schema = aggregate.input_schema();
        let mut changed = false;
        let exprs = aggregate
            .aggr_expr()
            .iter()
            .map(|expr| {
                let builder = if counts_nested_values(expr, &schema)? {
                    AggregateExprBuilder::new(compact_distinct_count(), expr.expressions())
                        .distinct()
                } else if collects_nested_values_in_order(expr, &schema)? {
                    AggregateExprBuilder::new(ordered_array_agg(), expr.expressions())
                        .order_by(expr.order_bys().to_vec())
                        .with_ignore_nulls(expr.ignore_nulls())
                        .with_reversed(expr.is_reversed())
                } else {
                    return Ok(Arc::clone(expr));
                };
                changed = true;
                let measured = builder
                    .schema(Arc::clone(&schema))
                    .alias(expr.name())
                    .build()?;
                Ok(Arc::new(measured))
            })
            .collect::<Result<Vec<_>>>()?;
        if !changed {
            return Ok(Transformed::no(node));
        }
        let rewritten = aggregate.with_new_aggr_exprs(exprs);
        Ok(Transformed::yes(
            Arc::new(rewritten) as Arc<dyn ExecutionPlan>
        ))
    })
    .map(|transformed| transformed.data)
}

/// Whether `data_type` holds values that DataFusion keeps as slices of
/// their arrays. Dictionaries are left alone: DataFusion aggregates their
/// values, not them.
fn is_nested(data_type: &DataType) -> bool {
    data_type.is_nested()
        && !matches!(
            data_type,
            DataType::Dictionary(..) | DataType::RunEndEncoded(..)
        )
}

/// Whether `expr` is DataFusion's `count(DISTINCT x)` of a nested `x`.
fn counts_nested_values(expr: &AggregateFunctionExpr, schema: &SchemaRef) -> Result<bool> {
    if expr.fun().name() != count_udaf().name() || !expr.is_distinct() {
        return Ok(false);
    }
    let arguments = expr.expressions();
    let [argument] = arguments.as_slice() else {
        return Ok(false);
    };
    Ok(is_nested(&argument.data_type(schema)?))
}

/// Whether `expr` is DataFusion's `array_agg(x ORDER BY ...)`, without
/// `DISTINCT`, of a nested `x` or by a nested ordering.
fn collects_nested_values_in_order(
    expr: &AggregateFunctionExpr,
    schema: &SchemaRef,
) -> Result<bool> {
    if expr.fun().name() != array_agg_udaf().name()
        || expr.is_distinct()
        || expr.order_bys().is_empty()
    {
        return Ok(false);
    }
    for value in expr
        .expressions()
        .iter()
        .chain(expr.order_bys().iter().map(|order| &order.expr))
    {
        if is_nested(&value.data_type(schema)?) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// DataFusion's `array_agg`, whose ordered accumulator merges partial
/// results through its input; see [`MergedAsInput`]. It only runs plans
/// that executors decoded, which no optimizer rewrites again, so it
/// answers only what running them asks (no reversal, no ordering hints).
#[derive(Debug, PartialEq, Eq, Hash)]
struct OrderedArrayAgg {
    array_agg: Arc<AggregateUDF>,
}

impl AggregateUDFImpl for OrderedArrayAgg {
    fn name(&self) -> &str {
        ORDERED_ARRAY_AGG
    }

    fn signature(&self) -> &Signature {
        self.array_agg.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.array_agg.return_type(arg_types)
    }

    fn return_field(&self, arg_fields: &[FieldRef]) -> Result<FieldRef> {
        self.array_agg.return_field(arg_fields)
    }

    fn is_nullable(&self) -> bool {
        self.array_agg.is_nullable()
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        self.array_agg.state_fields(args)
    }

    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        self.array_agg.order_sensitivity()
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        if args.is_distinct || args.order_bys.is_empty() {
            return Err(DataFusionError::Internal(format!(
                "{ORDERED_ARRAY_AGG} collects values in an order, without DISTINCT"
            )));
        }
        Ok(Box::new(MergedAsInput {
            array_agg: self.array_agg.accumulator(args)?,
        }))
    }

    fn default_value(&self, data_type: &DataType) -> Result<ScalarValue> {
        self.array_agg.default_value(data_type)
    }
}

/// DataFusion's ordered `array_agg` accumulator, given the rows of the
/// partial results it merges as input rows. It copies each input value and
/// ordering out of its array, and sorts what it collected before it answers
/// (the input of an executor's aggregate is never taken as sorted), so the
/// answer is the merge's, and what it keeps is its own.
#[derive(Debug)]
struct MergedAsInput {
    array_agg: Box<dyn Accumulator>,
}

impl Accumulator for MergedAsInput {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.array_agg.update_batch(values)
    }

    /// A partial result is a list of values and a list of their orderings,
    /// one struct per value; a partial result of no rows is null.
    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let [values, orderings] = states else {
            return Err(DataFusionError::Internal(format!(
                "{ORDERED_ARRAY_AGG} merges values and their orderings, not {} lists",
                states.len()
            )));
        };
        let (values, orderings) = (values.as_list::<i32>(), orderings.as_list::<i32>());
        for row in 0..values.len() {
            if values.is_null(row) {
                continue;
            }
            let (row_values, row_orderings) = (values.value(row), orderings.value(row));
            let row_orderings = row_orderings.as_struct();
            if row_values.len() != row_orderings.len() {
                return Err(DataFusionError::Internal(format!(
                    "a partial {ORDERED_ARRAY_AGG} of {} values has {} orderings",
                    row_values.len(),
                    row_orderings.len()
                )));
            }
            let mut input = vec![row_values];
            input.extend(row_orderings.columns().iter().cloned());
            self.array_agg.update_batch(&input)?;
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.array_agg.state()
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        self.array_agg.evaluate()
    }

    fn size(&self) -> usize {
        size_of_val(self) + self.array_agg.size()
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct CompactDistinctCount {
    signature: Signature,
}

impl CompactDistinctCount {
    fn new() -> Self {
        Self {
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

impl AggregateUDFImpl for CompactDistinctCount {
    fn name(&self) -> &str {
        COMPACT_DISTINCT_COUNT
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn is_nullable(&self) -> bool {
        false
    }

    /// DataFusion's own, so that partial results from either function merge.
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        count_udaf().inner().state_fields(args)
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let ([field], true) = (args.expr_fields, args.is_distinct) else {
            return Err(DataFusionError::Internal(format!(
                "{COMPACT_DISTINCT_COUNT} counts the distinct values of one argument"
            )));
        };
        Ok(Box::new(CompactDistinctCountAccumulator {
            values: HashSet::new(),
            value_bytes: 0,
            value_type: field.data_type().clone(),
        }))
    }

    fn default_value(&self, _data_type: &DataType) -> Result<ScalarValue> {
        Ok(ScalarValue::Int64(Some(0)))
    }
}

#[derive(Debug)]
struct CompactDistinctCountAccumulator {
    /// The distinct non-null values seen, each in buffers of its own.
    values: HashSet<ScalarValue>,
    /// What the values hold beyond their `ScalarValue`s, summed as they
    /// were inserted.
    value_bytes: usize,
    value_type: DataType,
}

impl Accumulator for CompactDistinctCountAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let values = &values[0];
        for index in 0..values.len() {
            let value = ScalarValue::try_from_array(values, index)?;
            if value.is_null() || self.values.contains(&value) {
                continue;
            }
            let value = value.compacted();
            self.value_bytes += value.size() - size_of_val(&value);
            self.values.insert(value);
        }
        Ok(())
    }

    /// Merges partial results: one list of distinct values per row.
    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        // A null partial result holds no values; DataFusion's count skips it too.
        for values in states[0].as_list::<i32>().iter().flatten() {
            self.update_batch(&[values])?;
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let values = self.values.iter().cloned().collect::<Vec<_>>();
        let list = ScalarValue::new_list_nullable(&values, &self.value_type);
        Ok(vec![ScalarValue::List(list)])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Int64(Some(self.values.len() as i64)))
    }

    fn size(&self) -> usize {
        size_of_val(self) + size_of::<ScalarValue>() * self.values.capacity() + self.value_bytes
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::path::Path;

    use arrow::array::{Int32Array, RecordBatch, StringArray, StructArray};
    use arrow::datatypes::{Field, Fields};
    use arrow::ipc::reader::StreamReader;
    use arrow::ipc::writer::StreamWriter;
    use datafusion::common::tree_node::TreeNodeRecursion;
    use datafusion::prelude::{ParquetReadOptions, SessionContext};

    use super::*;

    /// `rows` pairs (k, 'v' || k % 7) as one struct column.
    fn pairs(rows: i32) -> ArrayRef {
        let fields = Fields::from(vec![
            Field::new("k", DataType::Int32, false),
            Field::new("v", DataType::Utf8, false),
        ]);
        let keys = Int32Array::from_iter_values(0..rows);
        let labels = StringArray::from_iter_values((0..rows).map(|k| format!("v{}", k % 7)));
        Arc::new(StructArray::new(
            fields,
            vec![Arc::new(keys), Arc::new(labels)],
            None,
        ))
    }

    /// `array` after a trip through Arrow IPC, as a shuffle reader hands it
    /// over: its buffers are slices of one message.
    fn through_ipc(array: ArrayRef) -> ArrayRef {
        let batch = RecordBatch::try_from_iter([("pairs", array)]).expect("batch");
        let mut bytes = Vec::new();
        let mut writer = StreamWriter::try_new(&mut bytes, &batch.schema()).expect("writer");
        writer.write(&batch).expect("write");
        writer.finish().expect("finish");
        drop(writer);
        let mut reader = StreamReader::try_new(Cursor::new(bytes), None).expect("reader");
        let batch = reader.next().expect("a batch").expect("decoded batch");
        Arc::clone(batch.column(0))
    }

    fn accumulator(value_type: DataType) -> CompactDistinctCountAccumulator {
        CompactDistinctCountAccumulator {
            values: HashSet::new(),
            value_bytes: 0,
            value_type,
        }
    }

    #[test]
    fn values_from_one_message_are_measured_one_by_one() {
        let rows = 4_000;
        let values = pairs(rows);
        let mut partial = accumulator(values.data_type().clone());
        partial
            .update_batch(&[Arc::clone(&values)])
            .expect("update");
        let ScalarValue::List(state) = partial.state().expect("state").remove(0) else {
            panic!("the state is a list");
        };

        let mut merged = accumulator(values.data_type().clone());
        merged.merge_batch(&[through_ipc(state)]).expect("merge");
        assert_eq!(
            merged.evaluate().expect("count"),
            ScalarValue::Int64(Some(4_000))
        );

        // A one-row struct of an integer and a short string takes a few
        // hundred bytes in buffers of its own. DataFusion's set reported
        // the whole message for each value: over 1 GB here.
        let per_value = merged.size() / rows as usize;
        assert!(per_value < 2_048, "{per_value} bytes per value");
    }

    #[test]
    fn nulls_are_not_counted_and_duplicates_once() {
        let values = pairs(10);
        let with_null = StructArray::new(
            values.as_struct().fields().clone(),
            values.as_struct().columns().to_vec(),
            Some(vec![true, false, true, true, true, true, true, true, true, true].into()),
        );
        let mut count = accumulator(values.data_type().clone());
        count.update_batch(&[Arc::new(with_null)]).expect("update");
        count.update_batch(&[values.slice(0, 5)]).expect("update");
        assert_eq!(
            count.evaluate().expect("count"),
            ScalarValue::Int64(Some(10))
        );
    }

    /// `context` with a table `t(a, b)`: `rows` keys and labels, in two
    /// Parquet files under `folder`.
    async fn with_table(
        context: SessionContext,
        folder: &Path,
        rows: i64,
    ) -> Result<SessionContext> {
        let half = rows / 2;
        for (file, first) in [("a.parquet", 0), ("b.parquet", half)] {
            let path = folder.join(file);
            context
                .sql(&format!(
                    "COPY (SELECT CAST(value AS INT) AS a, 's' || CAST(value % 7 AS VARCHAR) AS b \
                     FROM generate_series({first}, {}) ) TO '{}' STORED AS PARQUET",
                    first + half - 1,
                    path.display()
                ))
                .await?
                .collect()
                .await?;
        }
        let location = folder.to_str().expect("path");
        context
            .register_parquet("t", location, ParquetReadOptions::default())
            .await?;
        Ok(context)
    }

    #[tokio::test]
    async fn executor_plans_count_nested_values_as_datafusion_does() -> Result<()> {
        let folder = tempfile::tempdir().expect("temporary folder");
        let context = with_table(SessionContext::new(), folder.path(), 4_000).await?;
        let sql = "SELECT count(DISTINCT (a, b)) AS pairs, count(DISTINCT [b]) AS lists, \
                   count(DISTINCT b) AS labels FROM t";
        let plan = context.sql(sql).await?.create_physical_plan().await?;
        let expected =
            datafusion::physical_plan::collect(Arc::clone(&plan), context.task_ctx()).await?;

        let compact = with_measured_nested_aggregates(plan)?;
        let answer =
            datafusion::physical_plan::collect(Arc::clone(&compact), context.task_ctx()).await?;
        assert_eq!(
            arrow::util::pretty::pretty_format_batches(&answer)?.to_string(),
            arrow::util::pretty::pretty_format_batches(&expected)?.to_string()
        );

        // Both steps of the aggregate count the structs and the lists
        // compactly; strings keep DataFusion's own accumulator.
        let mut steps = Vec::new();
        compact.apply(|node| {
            if let Some(aggregate) = node.downcast_ref::<AggregateExec>() {
                let functions = aggregate
                    .aggr_expr()
                    .iter()
                    .map(|expr| expr.fun().name().to_owned());
                steps.push(functions.collect::<Vec<_>>());
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        assert_eq!(steps.len(), 2, "{steps:?}");
        for functions in steps {
            assert_eq!(
                functions,
                [COMPACT_DISTINCT_COUNT, COMPACT_DISTINCT_COUNT, "count"]
            );
        }
        Ok(())
    }

    /// Under a memory pool of 64 MiB, DataFusion's own ordered `array_agg`
    /// of 20,000 structs fails as it merges its partial results, each value
    /// counted as the whole partial result it came in. An executor's plan
    /// answers as DataFusion does without a bound.
    #[tokio::test]
    async fn executor_plans_collect_nested_values_in_order_within_their_memory() -> Result<()> {
        let folder = tempfile::tempdir().expect("temporary folder");
        let unbounded = with_table(SessionContext::new(), folder.path(), 20_000).await?;
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(
                datafusion::execution::memory_pool::FairSpillPool::new(64 * 1024 * 1024),
            ))
            .build_arc()?;
        let config = datafusion::prelude::SessionConfig::new().with_target_partitions(2);
        let bounded = SessionContext::new_with_config_rt(config, runtime);
        let location = folder.path().to_str().expect("path");
        bounded
            .register_parquet("t", location, ParquetReadOptions::default())
            .await?;
        for sql in [
            "SELECT cardinality(array_agg(named_struct('a', a, 'b', b) ORDER BY a DESC)) AS n, \
             array_element(array_agg(named_struct('a', a, 'b', b) ORDER BY a DESC), 1) AS top \
             FROM t",
            "SELECT b, array_element(array_agg([a, a + 1] ORDER BY a), 3) AS third \
             FROM t GROUP BY b ORDER BY b",
            "SELECT array_element(array_agg(a ORDER BY named_struct('x', -a), b DESC), 1) AS first \
             FROM t",
        ] {
            let expected = unbounded.sql(sql).await?.collect().await?;
            let plan = bounded.sql(sql).await?.create_physical_plan().await?;
            if sql.contains("cardinality") {
                let error =
                    datafusion::physical_plan::collect(Arc::clone(&plan), bounded.task_ctx())
                        .await
                        .expect_err("DataFusion's accumulator asks for too much");
                assert!(error.to_string().contains("Resources exhausted"), "{error}");
            }
            let measured = with_measured_nested_aggregates(plan)?;
            let shown = datafusion::physical_plan::displayable(measured.as_ref())
                .indent(true)
                .to_string();
            assert!(!shown.contains("nth_value"), "{sql}: {shown}");
            let mut functions = Vec::new();
            measured.apply(|node| {
                if let Some(aggregate) = node.downcast_ref::<AggregateExec>() {
                    functions.extend(
                        aggregate
                            .aggr_expr()
                            .iter()
                            .map(|e| e.fun().name().to_owned()),
                    );
                }
                Ok(TreeNodeRecursion::Continue)
            })?;
            assert!(
                !functions.is_empty() && functions.iter().all(|name| name == ORDERED_ARRAY_AGG),
                "{sql}: {functions:?}"
            );
            let answer = datafusion::physical_plan::collect(measured, bounded.task_ctx()).await?;
            assert_eq!(
                arrow::util::pretty::pretty_format_batches(&answer)?.to_string(),
                arrow::util::pretty::pretty_format_batches(&expected)?.to_string(),
                "{sql}"
            );
        }
        Ok(())
    }
}
