//! Scheduler errors, and their one mapping to gRPC status codes.

use datafusion::error::DataFusionError;
use quiver_core::storage::redact_store_echoes;
use tonic::{Code, Status};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The query cannot be planned: bad SQL, an unknown table or column, a
    /// missing or unreadable file. Retrying cannot help.
    #[error("{0}")]
    Query(#[source] DataFusionError),

    #[error("invalid setting: {0}")]
    Setting(#[source] DataFusionError),

    #[error("malformed logical plan: {0}")]
    MalformedPlan(#[source] DataFusionError),

    #[error("the request has no query")]
    EmptyQuery,

    #[error("cannot encode the plan of stage {stage}: {source}")]
    EncodePlan {
        stage: u32,
        #[source]
        source: DataFusionError,
    },

    /// Timing settings that would make executors stop their own tasks.
    #[error(
        "--executor-timeout-ms ({timeout_ms}) must be at least 3 times \
         --heartbeat-interval-ms ({heartbeat_ms}): executors stop their tasks when \
         no heartbeat is acknowledged within three quarters of the timeout"
    )]
    HeartbeatTiming { timeout_ms: u64, heartbeat_ms: u64 },

    #[error("unknown job {0}")]
    UnknownJob(String),

    #[error("the scheduler is shutting down")]
    ShuttingDown,

    #[error("cannot bind {address}: {source}")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot set up Flight SQL: {0}")]
    FlightSql(#[source] arrow_flight::error::FlightError),

    #[error("the gRPC server failed: {0}")]
    Serve(#[source] tonic::transport::Error),

    #[error(transparent)]
    Store(#[from] crate::store::StoreError),

    /// The write of `CREATE TABLE ... AS SELECT` failed; the table was not created.
    #[error("writing the table failed (job {job_id}): {message}")]
    TableWrite { job_id: String, message: String },

    /// The statement under `EXPLAIN ANALYZE` failed.
    #[error("the analyzed job {job_id} failed: {message}")]
    AnalyzedJob { job_id: String, message: String },

    /// A table whose files cannot be listed or read when it is created.
    #[error("cannot read the table at '{location}': {source}")]
    TableLocation {
        location: String,
        #[source]
        source: DataFusionError,
    },

    /// A write's location whose store refuses to create or delete objects.
    #[error("cannot write to '{location}': {source}")]
    WriteAccess {
        location: String,
        #[source]
        source: DataFusionError,
    },

    /// A table or output location whose object store cannot be set up.
    #[error(transparent)]
    Location(#[from] quiver_core::storage::StoreError),

    /// `quiver.shuffle_location` cannot hold the job's map outputs.
    #[error(transparent)]
    ShuffleLocation(quiver_core::error::Error),

    #[error(
        "catalog statements must be sent as SQL text, so that they can be stored; got a {0} plan"
    )]
    DdlPlan(String),

    /// Planning panicked in a library, most likely on malformed input that
    /// it does not check (the Parquet reader on some broken footers).
    #[error(
        "planning the statement failed on input that a library could not handle (a malformed \
         file, most likely): {0}"
    )]
    PlanningPanicked(String),
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = match &error {
            Error::Query(_)
            | Error::Setting(_)
            | Error::MalformedPlan(_)
            | Error::EmptyQuery
            | Error::DdlPlan(_)
            | Error::Location(_)
            | Error::ShuffleLocation(_)
            | Error::TableLocation { .. }
            | Error::WriteAccess { .. } => Code::InvalidArgument,
            Error::Store(_) => Code::Unavailable,
            Error::UnknownJob(_) => Code::NotFound,
            // Not ABORTED: clients may retry that, which would run a write again.
            Error::TableWrite { .. } | Error::AnalyzedJob { .. } => Code::Unknown,
            Error::ShuttingDown => Code::Unavailable,
            Error::EncodePlan { .. }
            | Error::Bind { .. }
            | Error::HeartbeatTiming { .. }
            | Error::Serve(_)
            | Error::FlightSql(_)
            | Error::PlanningPanicked(_) => Code::Internal,
        };
        // A store's refusal may echo the request's credentials.
        Status::new(code, redact_store_echoes(&error.to_string()))
    }
}
