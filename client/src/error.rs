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

    #[error(
        "lost contact with the scheduler while job {job_id} was running ({message}); the job did not finish"
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
