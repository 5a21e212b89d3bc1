//! The Quiver client: a Rust API in the style of DataFusion's `SessionContext`
//! and `DataFrame`, the `quiver` CLI, and an embedded standalone cluster.
//!
//! - [`context`]: [`QuiverContext`], connect to a cluster, run SQL, register tables.
//! - [`remote`]: the cluster's catalog as seen by the client, and the query
//!   planner that sends DataFrame plans to the cluster.
//! - [`job`]: submit a job, follow it, stream its result over Arrow Flight.
//! - [`standalone`]: a scheduler and executors in one process, over loopback.
//! - [`output`]: table, CSV and JSON rendering of results.
//!
//! ```no_run
//! # async fn demo() -> quiver_client::Result<()> {
//! let ctx = quiver_client::QuiverContext::connect("quiver://127.0.0.1:50050").await?;
//! ctx.register_parquet("lineitem", "/data/tpch/lineitem/").await?;
//! let batches = ctx.sql("SELECT count(*) FROM lineitem").await?.collect().await?;
//! # Ok(()) }
//! ```

pub mod context;
pub mod error;
pub mod job;
pub mod output;
pub mod remote;
pub mod standalone;

pub use context::QuiverContext;
pub use error::{Error, Result};
pub use standalone::{StandaloneCluster, StandaloneOptions};
