//! `count(DISTINCT x)` over nested values (structs, lists, maps, unions)
//! with memory that is measured, and held, per value.
//!
//! DataFusion 55 counts such values in a set of `ScalarValue`s. Each one is
//! a one-row slice of the batch it came from, so it keeps that whole batch
//! alive and reports the batch's size as its own, and the set's size is
//! measured again, value by value, after every batch. Summed over the set,
//! the reported size grows with the square of the input. On an executor,
//! where a shuffled batch's columns share the buffer of one IPC message, a
//! few thousand values reported hundreds of gigabytes and the memory pool
//! failed the task (`SELECT count(DISTINCT (a, b)), count(DISTINCT b)`).
//!
//! Executors therefore run these counts with [`compact_distinct_count`]:
//! the same set and the same answers, but a value is copied out of its
//! batch when it is first seen, and its size is added up once, as it is
//! inserted. [`with_compact_distinct_counts`] swaps it into a decoded stage
//! plan. The aggregate keeps its name, state and output, so the stages on
//! either side of it do not see the change.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, AsArray};
use arrow::datatypes::{DataType, FieldRef, SchemaRef};
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::{DataFusionError, Result};
use datafusion::functions_aggregate::count::count_udaf;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
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

/// `plan` with each `count(DISTINCT x)` of a nested `x` counted by
/// [`compact_distinct_count`].
pub fn with_compact_distinct_counts(
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
                if !counts_nested_values(expr, &schema)? {
                    return Ok(Arc::clone(expr));
                }
                changed = true;
                let compact =
                    AggregateExprBuilder::new(compact_distinct_count(), expr.expressions())
                        .schema(Arc::clone(&schema))
                        .alias(expr.name())
                        .distinct()
                        .build()?;
                Ok(Arc::new(compact))
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

/// Whether `expr` is DataFusion's `count(DISTINCT x)` of a nested `x`.
/// Dictionaries are left alone: DataFusion counts their values, not them.
fn counts_nested_values(expr: &AggregateFunctionExpr, schema: &SchemaRef) -> Result<bool> {
    if expr.fun().name() != count_udaf().name() || !expr.is_distinct() {
        return Ok(false);
    }
    let arguments = expr.expressions();
    let [argument] = arguments.as_slice() else {
        return Ok(false);
    };
    let data_type = argument.data_type(schema)?;
    Ok(data_type.is_nested()
        && !matches!(
            data_type,
            DataType::Dictionary(..) | DataType::RunEndEncoded(..)
        ))
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
        for values in states[0].as_list::<i32>().iter() {
            let values = values.ok_or_else(|| {
                DataFusionError::Internal("a partial count of distinct values is null".to_owned())
            })?;
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

    #[tokio::test]
    async fn executor_plans_count_nested_values_as_datafusion_does() -> Result<()> {
        let folder = tempfile::tempdir().expect("temporary folder");
        let context = SessionContext::new();
        for (file, first) in [("a.parquet", 0), ("b.parquet", 2_000)] {
            let path = folder.path().join(file);
            context
                .sql(&format!(
                    "COPY (SELECT CAST(value AS INT) AS a, 's' || CAST(value % 7 AS VARCHAR) AS b \
                     FROM generate_series({first}, {}) ) TO '{}' STORED AS PARQUET",
                    first + 1_999,
                    path.display()
                ))
                .await?
                .collect()
                .await?;
        }
        context
            .register_parquet(
                "t",
                folder.path().to_str().expect("path"),
                ParquetReadOptions::default(),
            )
            .await?;
        let sql = "SELECT count(DISTINCT (a, b)) AS pairs, count(DISTINCT [b]) AS lists, \
                   count(DISTINCT b) AS labels FROM t";
        let plan = context.sql(sql).await?.create_physical_plan().await?;
        let expected =
            datafusion::physical_plan::collect(Arc::clone(&plan), context.task_ctx()).await?;

        let compact = with_compact_distinct_counts(plan)?;
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
}
