//! TPC-H for Quiver: data generation, the 22 queries, a runner for Quiver and
//! single-node DataFusion, and result verification.
//!
//! - [`datagen`]: writes the eight tables as Parquet with tpchgen, idempotently.
//! - [`queries`]: the 22 queries, with the standard validation parameters.
//! - [`verify`]: compares two results value by value, with a float tolerance.
//! - [`runner`]: registers the tables on an engine and times the queries.
//! - [`report`]: timing statistics and the markdown comparison table.
//! - [`profile`]: splits a query's time on Quiver, from the job's metrics.

pub mod datagen;
pub mod profile;
pub mod queries;
pub mod report;
pub mod runner;
pub mod verify;
