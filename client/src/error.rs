//! Client errors.

use datafusion::error::DataFusionError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid cluster url {url:?}: expected quiver://host:port")]
    InvalidUrl { url: String },

    #[error(
        "cannot reach the Quiver scheduler at {address}: {}",
        with_causes(source)
    )]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },

    /// The scheduler refused or failed a call; the message is the server's.
    #[error("{}", transport_failure(.0))]
    Rpc(#[from] tonic::Status),

    /// The call carrying a statement failed after it was sent, before the
    /// scheduler answered: the scheduler may have planned it and run its
    /// job (a `CREATE TABLE AS` runs its write before it answers).
    #[error(
        "lost contact with the scheduler before it answered ({message}); the statement \
         may have run, and a write in it may have committed: once the scheduler answers, \
         `quiver job list` shows its job and how it ended: check it before running the \
         statement again"
    )]
    StatementLost { message: String },

    /// No connection to the scheduler could be made for a call: it was not sent.
    #[error("cannot reach the Quiver scheduler ({message}); the statement was not sent")]
    StatementNotSent { message: String },

    #[error("job {job_id} failed: {message}")]
    JobFailed { job_id: String, message: String },

    #[error("job {job_id} was cancelled")]
    JobCancelled { job_id: String },

    /// The job may still run (the network failed), or have ended with its
    /// scheduler, and a restarted scheduler settles its write: committed or
    /// rolled back, which its status then tells.
    #[error(
        "lost contact with the scheduler while job {job_id} was running ({message}); \
         once the scheduler answers, `quiver job status --wait {job_id}` tells how the job \
         ended (a write may have committed): check it before running the statement again"
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

/// A status's message, with the causes of a transport failure, which
/// tonic's own message ("transport error") leaves out.
pub(crate) fn transport_failure(status: &tonic::Status) -> String {
    joined(status.message().to_owned(), causes(status))
}

/// An error with its causes, which a transport error's own text leaves out.
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    joined(
        error.to_string(),
        std::iter::successors(error.source(), |cause| cause.source()),
    )
}

/// `first`, then each cause that does not repeat what came before; tonic's
/// bare "transport error" goes once something says more.
fn joined<'a>(
    first: String,
    causes: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> String {
    let mut parts = vec![first];
    for cause in causes {
        let text = cause.to_string();
        if !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
    }
    if parts.len() > 1 {
        parts.retain(|part| part != "transport error");
    }
    parts.join(": ")
}

/// The errors under a status: set only when the call failed in transport.
pub(crate) fn causes(
    status: &tonic::Status,
) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    std::iter::successors(std::error::Error::source(status), |cause| cause.source())
}

impl From<Error> for DataFusionError {
    fn from(error: Error) -> Self {
        match error {
            Error::DataFusion(inner) => inner,
            other => DataFusionError::External(Box::new(other)),
        }
    }
}
