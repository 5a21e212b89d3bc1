//! Generates the TPC-H tables as Parquet, one folder per table with several
//! files for the large tables. A table is written to a temporary folder and
//! renamed into place, so an interrupted run leaves nothing half-written and a
//! later run skips every table that is complete.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
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
        if !dir.join("_SUCCESS").exists() {
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
        write_parquet(&path, batches)?;
    }
    File::create(staging.join("_SUCCESS")).map_err(io(&staging))?;
    if dir.exists() && !dir.join("_SUCCESS").exists() {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    if let Err(e) = std::fs::rename(&staging, dir) {
        if !dir.join("_SUCCESS").exists() {
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

fn write_parquet(path: &Path, mut batches: Batches) -> Result<(), Error> {
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
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
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
