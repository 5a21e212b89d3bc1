//! Generates the TPC-H tables as Parquet, one folder per table with several
//! files for the large tables. A table is written to a temporary folder and
//! renamed into place, so an interrupted run leaves nothing half-written and a
//! later run skips every table that is complete.
//!
//! tpchgen writes every table in the order of its key, and splits it into
//! files of consecutive key ranges. Each file says so in its Parquet
//! metadata (`sorting_columns`), so that engines which read it (DataFusion
//! derives a scan's output order from it) can aggregate and join by the key
//! without sorting.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::WriterProperties;
use tpchgen::generators::{
    CustomerGenerator, LineItemGenerator, NationGenerator, OrderGenerator, PartGenerator,
    PartSuppGenerator, RegionGenerator, SupplierGenerator,
};
use tpchgen_arrow::{
    CustomerArrow, LineItemArrow, NationArrow, OrderArrow, PartArrow, PartSuppArrow, RegionArrow,
    SupplierArrow,
};

/// The eight TPC-H tables.
pub const TABLES: [&str; 8] = [
    "nation", "region", "part", "supplier", "partsupp", "customer", "orders", "lineitem",
];

/// The columns that each table is sorted by, as tpchgen writes it: the
/// key, and for `lineitem` the line number within an order. (`partsupp`
/// lists each part's suppliers in no order of their keys.)
fn sort_key(table: &str) -> &'static [&'static str] {
    match table {
        "nation" => &["n_nationkey"],
        "region" => &["r_regionkey"],
        "part" => &["p_partkey"],
        "supplier" => &["s_suppkey"],
        "partsupp" => &["ps_partkey"],
        "customer" => &["c_custkey"],
        "orders" => &["o_orderkey"],
        "lineitem" => &["l_orderkey", "l_linenumber"],
        _ => &[],
    }
}

/// The marker of a table written in the current layout: files in key order,
/// with `sorting_columns`. A table without it was written by an older
/// version and is written again. Both markers are empty files, as Spark's
/// `_SUCCESS` is: engines that infer a remote folder's columns read every
/// object in it, and fail on one that is not Parquet unless it is empty.
const LAYOUT_MARKER: &str = "_LAYOUT_2_SORTED";

/// Whether `dir` holds a table complete in the current layout.
fn complete(dir: &Path) -> bool {
    dir.join("_SUCCESS").exists() && dir.join(LAYOUT_MARKER).exists()
}

/// Rows per row group: large enough for efficient scans, small enough that a
/// file splits into several scan tasks.
const ROW_GROUP_ROWS: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write parquet file {path}: {source}")]
    Parquet {
        path: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("cannot generate {path}: {source}")]
    Generate {
        path: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    #[error("scale factor must be positive, got {0}")]
    ScaleFactor(f64),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Generates every missing table under `out`. `parts` files are written for
/// the large tables. Returns the folder of each table.
pub fn generate(
    scale_factor: f64,
    parts: usize,
    out: &Path,
) -> Result<Vec<(String, PathBuf)>, Error> {
    if scale_factor <= 0.0 || !scale_factor.is_finite() {
        return Err(Error::ScaleFactor(scale_factor));
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    let parts = parts.max(1);
    let mut tables = Vec::new();
    for table in TABLES {
        let dir = out.join(table);
        if !complete(&dir) {
            write_table(table, scale_factor, parts, &dir)?;
        }
        tables.push((table.to_owned(), dir));
    }
    Ok(tables)
}

fn write_table(
    table: &'static str,
    scale_factor: f64,
    parts: usize,
    dir: &Path,
) -> Result<(), Error> {
    // Each process stages into its own folder, so concurrent generators (tests
    // run in parallel) never touch each other's files; the first rename wins.
    let staging = dir.with_extension(format!("tmp-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    // The tiny tables are not split.
    let parts = if matches!(table, "nation" | "region") {
        1
    } else {
        parts
    };
    for part in 1..=parts {
        let path = staging.join(format!("part-{part}.parquet"));
        let batches = table_batches(table, scale_factor, part as i32, parts as i32);
        write_parquet(&path, batches, sort_key(table))?;
    }
    for marker in [LAYOUT_MARKER, "_SUCCESS"] {
        File::create(staging.join(marker)).map_err(io(&staging))?;
    }
    if dir.exists() && !complete(dir) {
        match std::fs::remove_dir_all(dir) {
            // Another process may be replacing the same table.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(dir)(e)),
            _ => {}
        }
    }
    if let Err(e) = std::fs::rename(&staging, dir) {
        if !complete(dir) {
            return Err(io(dir)(e));
        }
        // Another process finished the same table first.
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    Ok(())
}

type Batches = Box<dyn Iterator<Item = Result<RecordBatch, arrow::error::ArrowError>>>;

fn table_batches(table: &str, sf: f64, part: i32, parts: i32) -> Batches {
    const BATCH: usize = 8192;
    match table {
        "nation" => {
            Box::new(NationArrow::new(NationGenerator::new(sf, part, parts)).with_batch_size(BATCH))
        }
        "region" => {
            Box::new(RegionArrow::new(RegionGenerator::new(sf, part, parts)).with_batch_size(BATCH))
        }
        "part" => {
            Box::new(PartArrow::new(PartGenerator::new(sf, part, parts)).with_batch_size(BATCH))
        }
        "supplier" => Box::new(
            SupplierArrow::new(SupplierGenerator::new(sf, part, parts)).with_batch_size(BATCH),
        ),
        "partsupp" => Box::new(
            PartSuppArrow::new(PartSuppGenerator::new(sf, part, parts)).with_batch_size(BATCH),
        ),
        "customer" => Box::new(
            CustomerArrow::new(CustomerGenerator::new(sf, part, parts)).with_batch_size(BATCH),
        ),
        "orders" => {
            Box::new(OrderArrow::new(OrderGenerator::new(sf, part, parts)).with_batch_size(BATCH))
        }
        _ => Box::new(
            LineItemArrow::new(LineItemGenerator::new(sf, part, parts)).with_batch_size(BATCH),
        ),
    }
}

fn write_parquet(path: &Path, mut batches: Batches, sort_key: &[&str]) -> Result<(), Error> {
    let parquet_error = |source| Error::Parquet {
        path: path.display().to_string(),
        source,
    };
    let generate_error = |source| Error::Generate {
        path: path.display().to_string(),
        source,
    };
    let Some(first) = batches.next().transpose().map_err(generate_error)? else {
        return Ok(());
    };
    let sorting_columns = sort_key
        .iter()
        .filter_map(|name| first.schema().index_of(name).ok())
        .map(|index| SortingColumn {
            column_idx: index as i32,
            descending: false,
            nulls_first: false,
        })
        .collect();
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_sorting_columns(Some(sorting_columns))
        .build();
    let file = File::create(path).map_err(io(path))?;
    let mut writer = ArrowWriter::try_new(file, Arc::clone(first.schema_ref()), Some(properties))
        .map_err(parquet_error)?;
    for batch in std::iter::once(Ok(first)).chain(batches) {
        writer
            .write(&batch.map_err(generate_error)?)
            .map_err(parquet_error)?;
    }
    writer.close().map_err(parquet_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use arrow::array::{AsArray, RecordBatch};
    use arrow::datatypes::Int64Type;
    use datafusion::physical_plan::displayable;
    use datafusion::prelude::{ParquetReadOptions, SessionContext};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;

    fn files(dir: &Path) -> Vec<PathBuf> {
        (1..)
            .map(|part| dir.join(format!("part-{part}.parquet")))
            .take_while(|path| path.exists())
            .collect()
    }

    #[tokio::test]
    async fn tables_are_written_in_key_order_and_say_so() {
        let out = tempfile::tempdir().expect("tempdir");
        let tables = generate(0.01, 3, out.path()).expect("generate");
        for (table, dir) in &tables {
            let key = sort_key(table)[0];
            let mut last = i64::MIN;
            for path in files(dir) {
                let reader =
                    ParquetRecordBatchReaderBuilder::try_new(File::open(&path).expect("open"))
                        .expect("reader");
                let metadata = Arc::clone(reader.metadata());
                let index = reader.schema().index_of(key).expect("key column") as i32;
                for row_group in metadata.row_groups() {
                    let sorting = row_group.sorting_columns().expect("sorting columns");
                    assert_eq!(sorting[0].column_idx, index, "{}", path.display());
                    assert_eq!(sorting.len(), sort_key(table).len());
                }
                // The claim holds, and across files too: each starts after
                // the last key of the one before.
                for batch in reader.build().expect("batches") {
                    let batch: RecordBatch = batch.expect("batch");
                    let keys = batch.column_by_name(key).expect("key");
                    for &value in keys.as_primitive::<Int64Type>().values() {
                        assert!(value >= last, "{table}: {value} after {last}");
                        last = value;
                    }
                }
            }
        }

        // DataFusion takes the order from the metadata.
        let context = SessionContext::new();
        let lineitem = out.path().join("lineitem");
        context
            .register_parquet(
                "lineitem",
                lineitem.to_str().expect("utf-8 path"),
                ParquetReadOptions::default(),
            )
            .await
            .expect("register");
        let plan = context
            .sql("SELECT l_orderkey, l_linenumber FROM lineitem")
            .await
            .expect("sql")
            .create_physical_plan()
            .await
            .expect("plan");
        let shown = displayable(plan.as_ref()).indent(true).to_string();
        assert!(
            shown.contains(
                "output_ordering=[l_orderkey@0 ASC NULLS LAST, l_linenumber@1 ASC NULLS LAST]"
            ),
            "{shown}"
        );
    }

    #[test]
    fn tables_of_an_older_layout_are_written_again() {
        let out = tempfile::tempdir().expect("tempdir");
        let stale = out.path().join("nation");
        std::fs::create_dir_all(&stale).expect("mkdir");
        std::fs::write(stale.join("part-1.parquet"), b"not parquet").expect("write");
        std::fs::write(stale.join("_SUCCESS"), b"").expect("write");
        generate(0.01, 1, out.path()).expect("generate");
        assert!(complete(&stale));
        let file = File::open(stale.join("part-1.parquet")).expect("open");
        let reader = ParquetRecordBatchReaderBuilder::try_new(file).expect("a parquet file");
        assert_eq!(reader.metadata().file_metadata().num_rows(), 25);

        // A complete table is kept as it is.
        let modified = |path: &Path| {
            std::fs::metadata(path)
                .and_then(|m| m.modified())
                .expect("mtime")
        };
        let before = modified(&stale.join("part-1.parquet"));
        generate(0.01, 1, out.path()).expect("generate");
        assert_eq!(modified(&stale.join("part-1.parquet")), before);
    }
}
