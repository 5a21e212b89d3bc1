//! Splits batches by the values of hive partition columns, and spells their
//! folders as Hive and Spark do.
//!
//! A folder is `name=value`. The name is written as it is (a name that cannot
//! be a folder name is refused), since DataFusion's listing compares it as
//! written. The value escapes the characters that Hive and Spark escape as
//! `%XX` and keeps every other character, non-ASCII included, so Quiver,
//! Spark and Hive spell a value's folder alike, and an overwrite finds the
//! folders that other engines wrote. Readers decode the `%XX` escapes.

use std::collections::HashMap;
use std::fmt::Write;

use arrow::array::{Array, AsArray, RecordBatch, UInt32Array};
use arrow::compute::{CastOptions, cast_with_options, take_record_batch};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use percent_encoding::percent_decode_str;

/// The folder value of a null partition value, as Hive and Spark write it.
/// The scheduler's partitioned tables read it back as null.
pub const NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";

/// Where a batch's rows go: hive folders (`col=value`) of the partition columns.
#[derive(Debug, Clone)]
pub struct HivePartitioner {
    /// Indices of the partition columns in the input.
    partition_columns: Vec<(usize, String)>,
    /// Indices of the columns written into the files.
    data_columns: Vec<usize>,
    file_schema: SchemaRef,
}

impl HivePartitioner {
    /// `keep_partition_columns` writes the partition columns into the files too.
    pub fn new(
        input: &SchemaRef,
        partition_columns: &[(String, DataType)],
        keep_partition_columns: bool,
    ) -> Result<Self> {
        let partition_columns = partition_columns
            .iter()
            .map(|(name, _)| {
                if name.is_empty()
                    || name.contains(['/', '='])
                    || name.chars().any(char::is_control)
                {
                    return Err(DataFusionError::Plan(format!(
                        "cannot partition by column '{name}': a hive folder name cannot be \
                         empty or hold '/', '=' or control characters"
                    )));
                }
                Ok((input.index_of(name)?, name.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        let data_columns: Vec<usize> = (0..input.fields().len())
            .filter(|index| {
                keep_partition_columns || !partition_columns.iter().any(|(p, _)| p == index)
            })
            .collect();
        if data_columns.is_empty() {
            return Err(DataFusionError::Plan(
                "cannot partition by every column: the files would hold none".into(),
            ));
        }
        let file_schema = SchemaRef::new(input.project(&data_columns)?);
        Ok(Self {
            partition_columns,
            data_columns,
            file_schema,
        })
    }

    /// The schema of the rows in the files.
    pub fn file_schema(&self) -> &SchemaRef {
        &self.file_schema
    }

    /// Splits `batch` into one batch per partition folder (`a=1/b=x`, encoded
    /// as an object store path, or `""` when the table is not partitioned), in
    /// the order the folders first appear.
    pub fn split(&self, batch: &RecordBatch) -> Result<Vec<(String, RecordBatch)>> {
        if self.partition_columns.is_empty() {
            return Ok(vec![(String::new(), batch.project(&self.data_columns)?)]);
        }
        // A value that is not text (binary that is not UTF-8) must fail the
        // write: the default cast would make it null, and its rows would go
        // to the null folder.
        let strict = CastOptions {
            safe: false,
            ..CastOptions::default()
        };
        let values = self
            .partition_columns
            .iter()
            .map(|(index, name)| {
                cast_with_options(batch.column(*index), &DataType::Utf8, &strict).map_err(|error| {
                    DataFusionError::Execution(format!(
                        "partition column '{name}' has a value that cannot be a folder name: {error}"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let values: Vec<_> = values
            .iter()
            .map(|array| array.as_string::<i32>())
            .collect();
        let mut folders: Vec<String> = Vec::new();
        let mut rows: HashMap<String, Vec<u32>> = HashMap::new();
        for row in 0..batch.num_rows() {
            let mut folder = String::new();
            for ((_, name), column) in self.partition_columns.iter().zip(&values) {
                if !folder.is_empty() {
                    folder.push('/');
                }
                folder.push_str(name);
                folder.push('=');
                if column.is_null(row) {
                    folder.push_str(NULL_PARTITION);
                } else {
                    escape_value(column.value(row), &mut folder);
                }
            }
            rows.entry(folder.clone())
                .or_insert_with(|| {
                    folders.push(folder);
                    Vec::new()
                })
                .push(row as u32);
        }
        let data = batch.project(&self.data_columns)?;
        folders
            .into_iter()
            .map(|folder| {
                let indices = UInt32Array::from(rows.remove(&folder).unwrap_or_default());
                Ok((folder, take_record_batch(&data, &indices)?))
            })
            .collect()
    }
}

/// Whether Hive and Spark write `byte` of a partition value as `%XX`.
fn hive_escapes(byte: u8) -> bool {
    byte.is_ascii_control() || b"\"#%'*/:=?\\{[]^".contains(&byte)
}

/// Appends `value` to `folder`, escaped as Hive and Spark escape a partition
/// value.
fn escape_value(value: &str, folder: &mut String) {
    for character in value.chars() {
        match u8::try_from(character) {
            Ok(byte) if hive_escapes(byte) => {
                // Writing to a String cannot fail.
                let _ = write!(folder, "%{byte:02X}");
            }
            _ => folder.push(character),
        }
    }
}

/// Whether every writer spells `value`'s folder the same: it holds only
/// ASCII letters, digits, `-`, `_` and `.`. Only such a value can be looked
/// up by its folder's name. Writers escape the rest differently: Hive and
/// Spark escape a few characters (`:` as `%3A`) and keep non-ASCII text,
/// while pyarrow and DuckDB percent-encode everything else (`+` as `%2B`,
/// `ü` as `%C3%BC`), so other values may lie in folders spelled in several
/// ways.
pub fn has_one_folder_spelling(value: &str) -> bool {
    value
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || b"-_.".contains(&byte))
}

/// Whether partition values of type `data_type` are strings, whose folders
/// hold their text as it is.
pub fn is_string_type(data_type: &DataType) -> bool {
    match data_type {
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => true,
        // The type of the partition columns that a table infers.
        DataType::Dictionary(_, values) => values.as_ref() == &DataType::Utf8,
        _ => false,
    }
}

/// The partition values that a relative folder names, in a form in which
/// every spelling of one value is equal: decoded, and, for a column that
/// `types` declares of another type than a string, as that type's value
/// prints (`month=01` and `month=1` both name `1`, `price=1.50` names `1.5`).
/// A value that does not parse as its type, or the null marker, stays as it
/// is spelled.
pub fn folder_key(folder: &str, types: &[(String, DataType)]) -> Vec<(String, String)> {
    folder_values(folder)
        .into_iter()
        .map(|(name, value)| {
            let declared = types
                .iter()
                .find(|(column, _)| column == name)
                .map(|(_, declared)| declared)
                .filter(|declared| !is_string_type(declared));
            let value = match declared {
                Some(declared) if value != NULL_PARTITION => {
                    ScalarValue::try_from_string(value.clone(), declared)
                        .map_or(value, |typed| typed.to_string())
                }
                _ => value,
            };
            (name.to_owned(), value)
        })
        .collect()
}

/// The partition values that a relative folder (`a=1/b=x%3Ay`) names,
/// decoded, as readers decode them: two spellings of the same values are
/// equal.
pub fn folder_values(folder: &str) -> Vec<(&str, String)> {
    folder
        .split('/')
        .filter_map(|segment| segment.split_once('='))
        .map(|(name, value)| {
            let decoded = percent_decode_str(value)
                .decode_utf8()
                .map_or_else(|_| value.to_owned(), |text| text.into_owned());
            (name, decoded)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;

    #[test]
    fn rows_go_to_their_partition_folders() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("region", DataType::Utf8, true),
        ]));
        let nulls = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec![None, Some("EU")])),
            ],
        )
        .expect("valid batch");
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
                Arc::new(StringArray::from(vec![
                    Some("EU"),
                    Some("A/B"),
                    Some("EU"),
                    Some("US"),
                ])),
            ],
        )
        .expect("valid batch");
        let partitioner =
            HivePartitioner::new(&schema, &[("region".into(), DataType::Utf8)], false)
                .expect("region is a column");
        assert_eq!(partitioner.file_schema().fields().len(), 1);
        let split = partitioner.split(&nulls).expect("split");
        let folders: Vec<&str> = split.iter().map(|(folder, _)| folder.as_str()).collect();
        assert_eq!(
            folders,
            vec!["region=__HIVE_DEFAULT_PARTITION__", "region=EU"]
        );
        let split = partitioner.split(&batch).expect("split");
        let folders: Vec<(&str, usize)> = split
            .iter()
            .map(|(folder, batch)| (folder.as_str(), batch.num_rows()))
            .collect();
        assert_eq!(
            folders,
            vec![("region=EU", 2), ("region=A%2FB", 1), ("region=US", 1)]
        );
    }

    /// The folders of `values`, partitioned by column `p`.
    fn folders_of(values: Vec<Option<&str>>) -> Vec<String> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("p", DataType::Utf8, true),
        ]));
        let ids = Int64Array::from_iter_values(0..values.len() as i64);
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(ids), Arc::new(StringArray::from(values))],
        )
        .expect("valid batch");
        HivePartitioner::new(&schema, &[("p".into(), DataType::Utf8)], false)
            .expect("p is a column")
            .split(&batch)
            .expect("split")
            .into_iter()
            .map(|(folder, _)| folder)
            .collect()
    }

    #[test]
    fn values_are_escaped_as_hive_and_spark_escape_them() {
        assert_eq!(
            folders_of(vec![
                Some("a:b"),
                Some("ünï"),
                Some("x=1/y"),
                Some("50% off"),
                Some("")
            ]),
            vec!["p=a%3Ab", "p=ünï", "p=x%3D1%2Fy", "p=50%25 off", "p="]
        );
        // Two spellings of one value name the same folder values.
        assert_eq!(
            folder_values("p=ünï/q=a%3Ab"),
            folder_values("p=%C3%BC%6E%C3%AF/q=a:b")
        );
        assert_eq!(folder_values("p=ünï"), vec![("p", "ünï".to_owned())]);
        assert_ne!(folder_values("p=a"), folder_values("p=b"));
        // Typed, `01` and `1` are one month and `1.50` and `1.5` one price;
        // as strings, or unparsed, they stay apart.
        let types = [
            ("month".to_owned(), DataType::Int32),
            ("price".to_owned(), DataType::Float64),
            ("code".to_owned(), DataType::Utf8),
        ];
        let key = |folder| folder_key(folder, &types);
        assert_eq!(key("month=01/price=1.50"), key("month=1/price=1.5"));
        assert_eq!(key("month=01"), vec![("month".to_owned(), "1".to_owned())]);
        assert_ne!(key("code=01"), key("code=1"));
        assert_ne!(key("month=x1"), key("month=1"));
        let marker = format!("month={NULL_PARTITION}");
        assert_eq!(
            key(&marker),
            vec![("month".to_owned(), NULL_PARTITION.to_owned())]
        );
        assert!(has_one_folder_spelling("EU-2024_v1.5"));
        // pyarrow and DuckDB spell these `a%2Bb`, `a%2Cb`, `a%26b`, ...
        for value in [
            "a:b", "ünï", "a b", "50%", "a~b", "a+b", "a,b", "a&b", "a@b", "a(b)", "",
        ] {
            assert_eq!(
                has_one_folder_spelling(value),
                value.is_empty(),
                "{value:?}"
            );
        }
    }

    #[test]
    fn a_value_or_name_that_cannot_be_a_folder_is_refused() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("p", DataType::Binary, true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(arrow::array::BinaryArray::from(vec![
                    &b"ok"[..],
                    &[0xFF, 0x00][..],
                ])),
            ],
        )
        .expect("valid batch");
        let partitioner = HivePartitioner::new(&schema, &[("p".into(), DataType::Binary)], false)
            .expect("p is a column");
        let error = partitioner
            .split(&batch)
            .expect_err("invalid UTF-8 must fail")
            .to_string();
        assert!(error.contains("partition column 'p'"), "{error}");

        for name in ["a/b", "a=b", "", "tab\t"] {
            let schema = Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, false),
                Field::new(name, DataType::Utf8, true),
            ]));
            let error = HivePartitioner::new(&schema, &[(name.into(), DataType::Utf8)], false)
                .expect_err("the name must be refused")
                .to_string();
            assert!(
                error.contains("cannot partition by column"),
                "{name:?}: {error}"
            );
        }
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("ü", DataType::Utf8, true),
        ]));
        assert!(HivePartitioner::new(&schema, &[("ü".into(), DataType::Utf8)], false).is_ok());
        let error = HivePartitioner::new(
            &schema,
            &[("id".into(), DataType::Int64), ("ü".into(), DataType::Utf8)],
            false,
        )
        .expect_err("partitioning by every column must be refused")
        .to_string();
        assert!(error.contains("every column"), "{error}");
    }
}
