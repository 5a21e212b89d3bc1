//! Splits batches by the values of hive partition columns.

use std::collections::HashMap;

use arrow::array::{Array, AsArray, RecordBatch, UInt32Array};
use arrow::compute::{cast, take_record_batch};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::error::Result;

use object_store::path::{Path, PathPart};

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
            .map(|(name, _)| Ok((input.index_of(name)?, name.clone())))
            .collect::<Result<Vec<_>>>()?;
        let data_columns: Vec<usize> = (0..input.fields().len())
            .filter(|index| {
                keep_partition_columns || !partition_columns.iter().any(|(p, _)| p == index)
            })
            .collect();
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
        let values = self
            .partition_columns
            .iter()
            .map(|(index, _)| cast(batch.column(*index), &DataType::Utf8))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let values: Vec<_> = values
            .iter()
            .map(|array| array.as_string::<i32>())
            .collect();
        let mut folders: Vec<String> = Vec::new();
        let mut rows: HashMap<String, Vec<u32>> = HashMap::new();
        for row in 0..batch.num_rows() {
            let mut parts = Vec::with_capacity(values.len());
            for ((_, name), column) in self.partition_columns.iter().zip(&values) {
                let value = if column.is_null(row) {
                    NULL_PARTITION
                } else {
                    column.value(row)
                };
                parts.push(format!("{name}={value}"));
            }
            // One encoded path part per folder: a '/' in a value stays in it.
            let folder =
                Path::from_iter(parts.iter().map(|part| PathPart::from(part.as_str()))).to_string();
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
}
