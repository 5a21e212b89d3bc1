//! Client errors.

use datafusion::error::DataFusionError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid cluster url {url:?}: expected quiver://host:port")]
    InvalidUrl { url: String },

    #[error("cannot reach the Quiver scheduler at {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },

    /// The scheduler refused or failed a call; the message is the server's.
    #[error("{}", .0.message())]
    Rpc(#[from] tonic::Status),

    #[error("job {job_id} failed: {message}")]
    JobFailed { job_id: String, message: String },

    #[error("job {job_id} was cancelled")]
    JobCancelled { job_id: String },

    /// The job may still run (the network failed), or have ended with its
    /// scheduler, and a restarted scheduler settles its write: committed or
    /// rolled back, which its status then tells.
    #[error(
        "lost contact with the scheduler while job {job_id} was running ({message}); \
         once the scheduler answers, `quiver job status {job_id}` tells how the job ended \
         (a write may have committed): check it before running the statement again"
    )]
    SchedulerLost { job_id: String, message: String },

    #[error("the scheduler stopped reporting on job {job_id}")]
    StatusLost { job_id: String },

    #[error("fewer than {expected} executors registered in time")]
    ExecutorsMissing { expected: usize },

    #[error(transparent)]
    DataFusion(#[from] DataFusionError),

    #[error(transparent)]
    Core(#[from] quiver_core::Error),
}

impl From<Error> for DataFusionError {
    fn from(error: Error) -> Self {
        match error {
            Error::DataFusion(inner) => inner,
            other => DataFusionError::External(Box::new(other)),
        }
    }
}
