//! Errors of the shared layer and the classification of task failures.

use datafusion::error::DataFusionError;
use quiver_proto::FailureKind;

/// Result with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error raised by the shared layer (shuffle storage, data plane, codecs).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error("arrow error: {0}")]
    Arrow(#[from] arrow::error::ArrowError),

    #[error(
        "invalid identifier {value:?} in {field}: only letters, digits, '-' and '_' are allowed"
    )]
    InvalidIdentifier { field: &'static str, value: String },

    #[error("malformed shuffle ticket: {0}")]
    MalformedTicket(#[source] prost::DecodeError),

    #[error("corrupt shuffle index {path}: {reason}")]
    CorruptIndex { path: String, reason: String },

    #[error("output partition {partition} out of range: the map output has {count} partitions")]
    PartitionOutOfRange { partition: usize, count: usize },

    #[error("cannot reach executor {executor_id} at {address}: {source}")]
    Connect {
        executor_id: String,
        address: String,
        #[source]
        source: tonic::transport::Error,
    },

    #[error(
        "fetching shuffle partition from executor {executor_id} at {address} failed: {message}"
    )]
    Fetch {
        executor_id: String,
        address: String,
        message: String,
    },

    #[error("invalid schema bytes: {0}")]
    InvalidSchema(String),
}

impl Error {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

impl From<Error> for DataFusionError {
    fn from(error: Error) -> Self {
        DataFusionError::External(Box::new(error))
    }
}

/// Decides whether another attempt of a failed task can succeed.
///
/// Fetch failures are told apart so that the scheduler can recompute the missing
/// map output rather than blindly retrying the reader.
pub fn classify_failure(error: &DataFusionError) -> FailureKind {
    match error.find_root() {
        DataFusionError::External(inner) => match inner.downcast_ref::<Error>() {
            Some(Error::Fetch { .. } | Error::Connect { .. }) => FailureKind::FetchFailed,
            Some(Error::Io { .. }) => FailureKind::Retryable,
            Some(_) => FailureKind::Fatal,
            None => FailureKind::Retryable,
        },
        DataFusionError::IoError(_)
        | DataFusionError::ObjectStore(_)
        | DataFusionError::ResourcesExhausted(_) => FailureKind::Retryable,
        _ => FailureKind::Fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_failures_are_told_apart() {
        let fetch = DataFusionError::from(Error::Fetch {
            executor_id: "e1".into(),
            address: "127.0.0.1:1".into(),
            message: "connection refused".into(),
        });
        assert_eq!(classify_failure(&fetch), FailureKind::FetchFailed);
        let plan = DataFusionError::Plan("no such column".into());
        assert_eq!(classify_failure(&plan), FailureKind::Fatal);
        let oom = DataFusionError::ResourcesExhausted("pool".into());
        assert_eq!(classify_failure(&oom), FailureKind::Retryable);
    }
}
