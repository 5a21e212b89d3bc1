//! Compares two query results value by value. Floating-point values match
//! within a relative tolerance; everything else must be equal. Row order
//! matters: the TPC-H queries order their output.

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Float32Type, Float64Type};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};

const RELATIVE_TOLERANCE: f64 = 1e-9;

#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    Float(f64),
    Text(String),
}

impl Cell {
    fn matches(&self, other: &Cell) -> bool {
        match (self, other) {
            (Cell::Float(a), Cell::Float(b)) => {
                a == b || (a - b).abs() <= RELATIVE_TOLERANCE * a.abs().max(b.abs()).max(1.0)
            }
            _ => self == other,
        }
    }
}

fn rows(batches: &[RecordBatch]) -> Result<Vec<Vec<Cell>>, String> {
    let mut rows = Vec::new();
    let options = FormatOptions::default();
    for batch in batches {
        let columns: Vec<Box<dyn Fn(usize) -> Cell + '_>> = batch
            .columns()
            .iter()
            .map(
                |column| -> Result<Box<dyn Fn(usize) -> Cell + '_>, String> {
                    let column = column.as_ref();
                    let cell: Box<dyn Fn(usize) -> Cell + '_> = match column.data_type() {
                        DataType::Float64 => {
                            let values = column.as_primitive::<Float64Type>();
                            Box::new(move |row| Cell::Float(values.value(row)))
                        }
                        DataType::Float32 => {
                            let values = column.as_primitive::<Float32Type>();
                            Box::new(move |row| Cell::Float(f64::from(values.value(row))))
                        }
                        _ => {
                            let formatter = ArrayFormatter::try_new(column, &options)
                                .map_err(|e| e.to_string())?;
                            Box::new(move |row| Cell::Text(formatter.value(row).to_string()))
                        }
                    };
                    Ok(Box::new(move |row| {
                        if column.is_null(row) {
                            Cell::Null
                        } else {
                            cell(row)
                        }
                    }))
                },
            )
            .collect::<Result<_, _>>()?;
        for row in 0..batch.num_rows() {
            rows.push(columns.iter().map(|cell| cell(row)).collect());
        }
    }
    Ok(rows)
}

/// `Ok` when `actual` equals `expected`; otherwise a description of the first difference.
pub fn compare(expected: &[RecordBatch], actual: &[RecordBatch]) -> Result<(), String> {
    let field_names = |batches: &[RecordBatch]| {
        batches.first().map(|b| {
            b.schema()
                .fields()
                .iter()
                .map(|f| (f.name().clone(), f.data_type().clone()))
                .collect::<Vec<_>>()
        })
    };
    if let (Some(e), Some(a)) = (field_names(expected), field_names(actual))
        && e != a
    {
        return Err(format!("columns differ: expected {e:?}, got {a:?}"));
    }
    let (expected, actual) = (rows(expected)?, rows(actual)?);
    if expected.len() != actual.len() {
        return Err(format!(
            "expected {} rows, got {}",
            expected.len(),
            actual.len()
        ));
    }
    for (index, (e, a)) in expected.iter().zip(&actual).enumerate() {
        let same = e.len() == a.len() && e.iter().zip(a).all(|(x, y)| x.matches(y));
        if !same {
            return Err(format!("row {index} differs: expected {e:?}, got {a:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    fn batch(values: &[f64], names: &[&str]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("v", DataType::Float64, false),
            Field::new("n", DataType::Utf8, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Float64Array::from(values.to_vec())),
                Arc::new(StringArray::from(names.to_vec())),
            ],
        )
        .expect("valid batch")
    }

    #[test]
    fn tolerates_float_noise_only() {
        let a = batch(&[1.0, 2.0], &["x", "y"]);
        assert!(
            compare(
                std::slice::from_ref(&a),
                &[batch(&[1.0 + 1e-12, 2.0], &["x", "y"])]
            )
            .is_ok()
        );
        assert!(
            compare(
                std::slice::from_ref(&a),
                &[batch(&[1.001, 2.0], &["x", "y"])]
            )
            .is_err()
        );
        assert!(compare(std::slice::from_ref(&a), &[batch(&[1.0, 2.0], &["x", "z"])]).is_err());
        assert!(
            compare(std::slice::from_ref(&a), &[batch(&[2.0, 1.0], &["y", "x"])]).is_err(),
            "order matters"
        );
        assert!(compare(&[a], &[batch(&[1.0], &["x"])]).is_err());
    }
}
