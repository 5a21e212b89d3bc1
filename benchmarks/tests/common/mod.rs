#![allow(dead_code)] // each test binary uses a different part of this module
//! Shared setup of the TPC-H integration tests: one data set per test binary,
//! generated once into the target folder and reused across runs.

use std::path::PathBuf;

use quiver_benchmarks::datagen;

/// Scale factor of the tests: small enough for CI, large enough for several
/// row groups and non-trivial joins.
pub const SCALE_FACTOR: f64 = 0.01;

/// The TPC-H tables at [`SCALE_FACTOR`], generated on first use.
pub fn tpch_tables() -> Vec<(String, PathBuf)> {
    let dir = std::env::var_os("QUIVER_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("quiver-test-data"))
        .join(format!("tpch-sf{SCALE_FACTOR}"));
    datagen::generate(SCALE_FACTOR, 3, &dir).expect("generate TPC-H data")
}

use quiver_client::{QuiverContext, StandaloneCluster, StandaloneOptions};

/// Starts an embedded cluster and connects to it once every executor is up.
pub async fn start_cluster(options: StandaloneOptions) -> (StandaloneCluster, QuiverContext) {
    let executors = options.executors;
    let cluster = StandaloneCluster::start(options)
        .await
        .expect("start cluster");
    let context = cluster
        .connect(executors)
        .await
        .expect("connect to cluster");
    (cluster, context)
}

/// Single-node DataFusion with `partitions` target partitions over `tables`:
/// the reference every Quiver answer is compared with.
pub async fn reference_engine(
    tables: &[(String, PathBuf)],
    partitions: usize,
) -> quiver_benchmarks::runner::Engine {
    let engine = quiver_benchmarks::runner::datafusion_engine(partitions);
    engine
        .register_tables(tables)
        .await
        .expect("register on datafusion");
    engine
}

pub mod processes;
pub mod python;
pub mod s3;
