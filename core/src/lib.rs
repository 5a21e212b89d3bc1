//! What both sides of a Quiver cluster share.
//!
//! - [`error`]: the crate's error type and how task failures are classified.
//! - [`config`]: `quiver.*` session settings and how settings travel with a job.
//! - [`shuffle`]: the shuffle writer and reader operators, the on-disk layout of map
//!   outputs, and the Arrow Flight client that fetches them.
//! - [`codec`]: the datafusion-proto extension codecs for Quiver's operators and
//!   for tables named by a client.
//! - [`decode_repairs`]: what datafusion-proto changes in stage plans, put back on executors.
//! - [`nested_aggregates`]: aggregates of nested values, measured per value on executors.
//! - [`ipc`]: Arrow schema <-> bytes helpers used on the wire.
//! - [`metrics`]: operator metrics on the wire, summed over tasks, for `EXPLAIN ANALYZE`.
//! - [`guard`]: decoding untrusted bytes without panicking.
//! - [`lease`]: how an executor that may have been declared lost stops its tasks.
//! - [`net`]: accepted connections for servers that take a bound listener.
//! - [`operators`]: what Quiver's execution plan operators share.
//! - [`process`]: logging, shutdown signals and exit codes of the server binaries.
//! - [`recursive`]: recursive CTEs in stage plans, which datafusion-proto does not encode.
//! - [`replicate`]: one partition streamed whole by many, for `NOT IN` joins split across tasks.
//! - [`scalar_subqueries`] and [`single_value`]: scalar subqueries that fail when they
//!   return several rows.
//! - [`storage`]: the object stores behind table and output locations, and their options.
//! - [`write`]: distributed Parquet writes: per-task files, then one commit.

pub mod codec;
pub mod config;
pub mod decode_repairs;
pub mod error;
pub mod guard;
pub mod ipc;
pub mod lease;
pub mod metrics;
pub mod nested_aggregates;
pub mod net;
pub mod operators;
pub mod process;
pub mod recursive;
pub mod replicate;
pub mod scalar_subqueries;
pub mod shuffle;
pub mod single_value;
pub mod storage;
pub mod write;

pub use error::{Error, Result};
