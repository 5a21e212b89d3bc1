//! [`single_value`]: the value of the one row a scalar subquery returns,
//! and an error if it returns more.
//!
//! Quiver plans an uncorrelated scalar subquery as a join with the outer
//! query (DataFusion's `ScalarSubqueryExec` hands its value to expressions
//! that may run in other stages). A join has no notion of "one row": a
//! subquery that returns two would double each outer row instead of failing
//! as SQL requires. The scheduler puts this aggregate over such subqueries,
//! as Calcite's `SINGLE_VALUE` does: one row whatever its input, that row's
//! value (null when there is none), and an error at a second row. It splits
//! into partial and final steps like any aggregate, so the subquery runs
//! across tasks and the final step sees the row counts of all of them.

use std::sync::{Arc, LazyLock};

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Field, FieldRef, UInt64Type};
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, Volatility,
};

/// The function's name, as plans show it.
pub const SINGLE_VALUE: &str = "quiver_single_value";

/// The error of a scalar subquery that returned several rows; the same
/// words as DataFusion's when it runs such a subquery in one process.
const MORE_THAN_ONE_ROW: &str = "Scalar subquery returned more than one row";

/// The aggregate function; see the module documentation.
pub fn single_value() -> Arc<AggregateUDF> {
    static FUNCTION: LazyLock<Arc<AggregateUDF>> =
        LazyLock::new(|| Arc::new(AggregateUDF::from(SingleValue::new())));
    Arc::clone(&FUNCTION)
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct SingleValue {
    signature: Signature,
}

impl SingleValue {
    fn new() -> Self {
        Self {
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

impl AggregateUDFImpl for SingleValue {
    fn name(&self) -> &str {
        SINGLE_VALUE
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(arg_types[0].clone())
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(SingleValueAccumulator {
            value: ScalarValue::try_from(args.return_field.data_type())?,
            rows: 0,
        }))
    }

    /// The value seen, and how many rows were seen.
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![
            Arc::new(
                args.return_field
                    .as_ref()
                    .clone()
                    .with_name(format_state_name(args.name, "value"))
                    .with_nullable(true),
            ),
            Arc::new(Field::new(
                format_state_name(args.name, "rows"),
                DataType::UInt64,
                false,
            )),
        ])
    }
}

#[derive(Debug)]
struct SingleValueAccumulator {
    value: ScalarValue,
    rows: u64,
}

impl SingleValueAccumulator {
    /// Counts `rows` more rows, of which the value is `value`'s row `index`
    /// if there is one; fails once more than one row is counted.
    fn add(&mut self, rows: u64, value: &ArrayRef, index: usize) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        self.rows += rows;
        if self.rows > 1 {
            return Err(DataFusionError::Execution(MORE_THAN_ONE_ROW.to_owned()));
        }
        self.value = ScalarValue::try_from_array(value, index)?;
        Ok(())
    }
}

impl Accumulator for SingleValueAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let values = &values[0];
        self.add(values.len() as u64, values, 0)
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let (values, rows) = (&states[0], states[1].as_primitive::<UInt64Type>());
        for (index, rows) in rows.iter().enumerate() {
            self.add(rows.unwrap_or(0), values, index)?;
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![
            self.value.clone(),
            ScalarValue::UInt64(Some(self.rows)),
        ])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(self.value.clone())
    }

    fn size(&self) -> usize {
        size_of_val(self) + self.value.size() - size_of_val(&self.value)
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, UInt64Array};

    use super::*;

    fn accumulator() -> SingleValueAccumulator {
        SingleValueAccumulator {
            value: ScalarValue::Int64(None),
            rows: 0,
        }
    }

    fn ints(values: &[Option<i64>]) -> ArrayRef {
        Arc::new(Int64Array::from(values.to_vec()))
    }

    #[test]
    fn no_rows_give_null_and_one_row_gives_its_value() -> Result<()> {
        let mut none = accumulator();
        none.update_batch(&[ints(&[])])?;
        assert_eq!(none.evaluate()?, ScalarValue::Int64(None));

        let mut one = accumulator();
        one.update_batch(&[ints(&[])])?;
        one.update_batch(&[ints(&[Some(7)])])?;
        assert_eq!(one.evaluate()?, ScalarValue::Int64(Some(7)));
        Ok(())
    }

    #[test]
    fn a_second_row_fails_in_one_batch_or_across_batches() {
        let mut together = accumulator();
        let error = together.update_batch(&[ints(&[Some(1), Some(2)])]);
        assert!(
            error
                .expect_err("must fail")
                .to_string()
                .contains(MORE_THAN_ONE_ROW)
        );

        let mut apart = accumulator();
        apart.update_batch(&[ints(&[None])]).expect("one row");
        let error = apart.update_batch(&[ints(&[None])]);
        assert!(
            error
                .expect_err("must fail")
                .to_string()
                .contains(MORE_THAN_ONE_ROW)
        );
    }

    #[test]
    fn partial_states_merge_to_one_row_or_fail() -> Result<()> {
        let states = |values: &[Option<i64>], rows: &[u64]| -> Vec<ArrayRef> {
            vec![ints(values), Arc::new(UInt64Array::from(rows.to_vec()))]
        };
        let mut merged = accumulator();
        merged.merge_batch(&states(&[None, Some(5), None], &[0, 1, 0]))?;
        assert_eq!(merged.evaluate()?, ScalarValue::Int64(Some(5)));

        let error = merged.merge_batch(&states(&[Some(6)], &[1]));
        assert!(
            error
                .expect_err("must fail")
                .to_string()
                .contains(MORE_THAN_ONE_ROW)
        );
        Ok(())
    }
}
