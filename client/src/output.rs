//! Renders query results as a table, CSV (with a header line) or JSON lines.

use std::io::Write;

use arrow::datatypes::Schema;
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use arrow::util::pretty::pretty_format_batches;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An aligned text table.
    Table,
    /// Comma-separated values with a header line.
    Csv,
    /// One JSON object per row.
    Json,
}

/// Writes `batches` to `out` in `format`.
pub fn write_batches(
    out: &mut impl Write,
    format: Format,
    schema: &Schema,
    batches: &[RecordBatch],
) -> Result<(), ArrowError> {
    match format {
        Format::Table => {
            if schema.fields().is_empty() {
                return Ok(());
            }
            let table = if batches.is_empty() {
                pretty_format_batches(&[RecordBatch::new_empty(std::sync::Arc::new(
                    schema.clone(),
                ))])?
            } else {
                pretty_format_batches(batches)?
            };
            writeln!(out, "{table}")?;
        }
        Format::Csv => {
            if schema.fields().is_empty() {
                return Ok(());
            }
            let header: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            writeln!(out, "{}", header.join(","))?;
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(false)
                .build(&mut *out);
            for batch in batches {
                writer.write(batch)?;
            }
        }
        Format::Json => {
            let mut writer = arrow::json::LineDelimitedWriter::new(&mut *out);
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field};
    use std::sync::Arc;

    fn sample() -> (Schema, Vec<RecordBatch>) {
        let schema = Schema::new(vec![
            Field::new("n", DataType::Int64, false),
            Field::new("name", DataType::Utf8, false),
        ]);
        let batch = RecordBatch::try_new(
            Arc::new(schema.clone()),
            vec![
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec!["a", "b,c"])),
            ],
        )
        .expect("valid batch");
        (schema, vec![batch])
    }

    fn render(format: Format) -> String {
        let (schema, batches) = sample();
        let mut out = Vec::new();
        write_batches(&mut out, format, &schema, &batches).expect("rendered");
        String::from_utf8(out).expect("utf8")
    }

    #[test]
    fn csv_has_a_header_and_quotes() {
        assert_eq!(render(Format::Csv), "n,name\n1,a\n2,\"b,c\"\n");
    }

    #[test]
    fn json_is_one_object_per_row() {
        assert_eq!(
            render(Format::Json),
            "{\"n\":1,\"name\":\"a\"}\n{\"n\":2,\"name\":\"b,c\"}\n"
        );
    }

    #[test]
    fn table_is_aligned() {
        let table = render(Format::Table);
        assert!(table.contains("| n | name |"), "{table}");
    }
}
