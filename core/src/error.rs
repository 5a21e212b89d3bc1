//! Errors of the shared layer and the classification of task failures.

use datafusion::error::DataFusionError;
use quiver_proto::{FailureKind, FetchFailure};

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

    /// A durable map output is not where its location says.
    #[error("durable shuffle data at {location} is missing")]
    DurableOutputMissing { location: String },

    /// A map output could not be copied to or read from durable storage.
    /// Whether another attempt can succeed depends on the `source`.
    #[error("durable shuffle data at {location}: {source}")]
    DurableShuffle {
        location: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The durable shuffle location cannot hold a job's map outputs: no
    /// store serves it, or its store refuses a right they need.
    #[error("quiver.shuffle_location '{location}' cannot hold map outputs: {reason}")]
    ShuffleLocationRefused { location: String, reason: String },

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

    /// A map output could not be read, from its executor or from local disk.
    /// Retrying the reader cannot help: the scheduler recomputes that output.
    #[error(
        "fetching map output {map_partition} (attempt {attempt}) of stage {stage_id} from executor {executor_id} failed: {message}"
    )]
    Fetch {
        executor_id: String,
        stage_id: u32,
        map_partition: u32,
        attempt: u32,
        message: String,
    },

    #[error("executor at {address} answered: {status}")]
    FlightStatus {
        address: String,
        status: Box<tonic::Status>,
    },

    #[error("corrupt shuffle data: {0}")]
    CorruptShuffleData(String),

    #[error("invalid schema bytes: {0}")]
    InvalidSchema(String),

    /// A file that a task's plan reads is gone from its store, most likely
    /// replaced by a write after the statement was planned. Retrying the
    /// task cannot help; planning the statement again can.
    #[error(
        "'{file}' was deleted after this statement was planned, most likely replaced by a \
         write to its table; run the statement again to read the table as it is now: {message}"
    )]
    PlannedFileDeleted { file: String, message: String },
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
            Some(Error::Fetch { .. }) => FailureKind::FetchFailed,
            Some(Error::PlannedFileDeleted { .. }) => FailureKind::InputReplaced,
            Some(Error::Io { .. } | Error::Connect { .. }) => FailureKind::Retryable,
            // A store that throttles or times out may answer the next
            // attempt; a missing bucket or a refused key will not. Neither
            // will a location that is not a valid URL.
            Some(Error::DurableShuffle { source, .. }) => {
                classify_by_cause(source.as_ref()).unwrap_or(FailureKind::Fatal)
            }
            Some(_) => FailureKind::Fatal,
            None if inner.is::<crate::storage::StoreError>() => FailureKind::Fatal,
            None => match inner.downcast_ref::<object_store::Error>() {
                Some(error) => classify_store_failure(error),
                None => FailureKind::Retryable,
            },
        },
        DataFusionError::ObjectStore(error) => classify_store_failure(error),
        // Writes reach the store through the Parquet writer, which wraps its errors.
        DataFusionError::ParquetError(error) => match error.as_ref() {
            parquet::errors::ParquetError::External(inner) => {
                classify_by_cause(inner.as_ref()).unwrap_or(FailureKind::Fatal)
            }
            _ => FailureKind::Fatal,
        },
        DataFusionError::IoError(_) | DataFusionError::ResourcesExhausted(_) => {
            FailureKind::Retryable
        }
        _ => FailureKind::Fatal,
    }
}

/// Classifies by the first store or I/O error in `error`'s chain of causes.
fn classify_by_cause(error: &(dyn std::error::Error + 'static)) -> Option<FailureKind> {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(store) = current.downcast_ref::<object_store::Error>() {
            return Some(classify_store_failure(store));
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            // The store's error inside an I/O error, as object_store's
            // buffered writer reports them.
            let inner = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<object_store::Error>());
            return Some(inner.map_or_else(|| classify_io_failure(io), classify_store_failure));
        }
        cause = current.source();
    }
    None
}

/// A missing object, a refused credential or a bad path stays so on retry;
/// other store errors (timeouts, throttling, 5xx) may pass.
fn classify_store_failure(error: &object_store::Error) -> FailureKind {
    match error {
        object_store::Error::NotFound { .. }
        | object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. }
        | object_store::Error::InvalidPath { .. }
        | object_store::Error::NotSupported { .. }
        | object_store::Error::UnknownConfigurationKey { .. } => FailureKind::Fatal,
        // Local files report the file system's error inside a generic one.
        object_store::Error::Generic { source, .. } => std::iter::successors(
            Some(source.as_ref() as &(dyn std::error::Error + 'static)),
            |cause| cause.source(),
        )
        .find_map(|cause| cause.downcast_ref::<std::io::Error>())
        .map_or(FailureKind::Retryable, classify_io_failure),
        _ => FailureKind::Retryable,
    }
}

/// A name the file system refuses (too long, invalid), a denied permission
/// or a read-only file system stays so on retry; other I/O errors may pass.
fn classify_io_failure(error: &std::io::Error) -> FailureKind {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::InvalidFilename
        | ErrorKind::PermissionDenied
        | ErrorKind::ReadOnlyFilesystem
        | ErrorKind::FileTooLarge => FailureKind::Fatal,
        _ => FailureKind::Retryable,
    }
}

/// The map output that a fetch failure could not read, for the scheduler to recompute.
pub fn fetch_failure(error: &DataFusionError) -> Option<FetchFailure> {
    let DataFusionError::External(inner) = error.find_root() else {
        return None;
    };
    match inner.downcast_ref::<Error>()? {
        Error::Fetch {
            executor_id,
            stage_id,
            map_partition,
            attempt,
            ..
        } => Some(FetchFailure {
            stage_id: *stage_id,
            map_partition: *map_partition,
            attempt: *attempt,
            executor_id: executor_id.clone(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_system_errors_that_stay_are_not_retried() {
        let local = |kind: std::io::ErrorKind| {
            DataFusionError::ObjectStore(Box::new(object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(std::io::Error::new(kind, "from the file system")),
            }))
        };
        assert_eq!(
            classify_failure(&local(std::io::ErrorKind::InvalidFilename)),
            FailureKind::Fatal
        );
        assert_eq!(
            classify_failure(&local(std::io::ErrorKind::ReadOnlyFilesystem)),
            FailureKind::Fatal
        );
        assert_eq!(
            classify_failure(&local(std::io::ErrorKind::Interrupted)),
            FailureKind::Retryable
        );
    }

    #[test]
    fn store_errors_inside_parquet_writes_are_classified_by_cause() {
        let wrapped = |store: object_store::Error| {
            let io = std::io::Error::other(store);
            DataFusionError::ParquetError(Box::new(parquet::errors::ParquetError::External(
                Box::new(io),
            )))
        };
        let missing = wrapped(object_store::Error::NotFound {
            path: "b/out/x.parquet".into(),
            source: "no such bucket".into(),
        });
        assert_eq!(classify_failure(&missing), FailureKind::Fatal);
        let throttled = wrapped(object_store::Error::Generic {
            store: "S3",
            source: "503 SlowDown".into(),
        });
        assert_eq!(classify_failure(&throttled), FailureKind::Retryable);
    }

    #[test]
    fn durable_shuffle_failures_are_retried_only_when_they_may_pass() {
        let durable = |source: Box<dyn std::error::Error + Send + Sync>| {
            DataFusionError::from(Error::DurableShuffle {
                location: "s3://lake/_shuffle/job/1/0-a0".into(),
                source,
            })
        };
        // As the upload reports a store error: inside the Parquet writer's.
        let uploading = |store: object_store::Error| {
            durable(Box::new(parquet::errors::ParquetError::External(Box::new(
                store,
            ))))
        };
        let no_bucket = uploading(object_store::Error::NotFound {
            path: "_shuffle/job/1/0-a0.data".into(),
            source: "NoSuchBucket".into(),
        });
        assert_eq!(classify_failure(&no_bucket), FailureKind::Fatal);
        let refused = uploading(object_store::Error::PermissionDenied {
            path: "_shuffle/job/1/0-a0.data".into(),
            source: "AccessDenied".into(),
        });
        assert_eq!(classify_failure(&refused), FailureKind::Fatal);
        let throttled = durable(Box::new(object_store::Error::Generic {
            store: "S3",
            source: "503 SlowDown".into(),
        }));
        assert_eq!(classify_failure(&throttled), FailureKind::Retryable);
        let bad_url = durable(Box::new(
            url::Url::parse("no scheme").expect_err("not a URL"),
        ));
        assert_eq!(classify_failure(&bad_url), FailureKind::Fatal);
        assert!(
            no_bucket
                .to_string()
                .contains("s3://lake/_shuffle/job/1/0-a0"),
            "{no_bucket}"
        );
    }

    #[test]
    fn fetch_failures_are_told_apart() {
        let fetch = DataFusionError::from(Error::Fetch {
            executor_id: "e1".into(),
            stage_id: 2,
            map_partition: 3,
            attempt: 1,
            message: "connection refused".into(),
        });
        // DataFusion wraps errors raised inside its operators; the cause still shows.
        let wrapped = DataFusionError::Context("reading input".into(), Box::new(fetch));
        assert_eq!(classify_failure(&wrapped), FailureKind::FetchFailed);
        let missing = fetch_failure(&wrapped).expect("names the map output");
        assert_eq!(
            (missing.stage_id, missing.map_partition, missing.attempt),
            (2, 3, 1)
        );
        assert_eq!(missing.executor_id, "e1");
        let plan = DataFusionError::Plan("no such column".into());
        assert_eq!(classify_failure(&plan), FailureKind::Fatal);
        let oom = DataFusionError::ResourcesExhausted("pool".into());
        assert_eq!(classify_failure(&oom), FailureKind::Retryable);
    }
}
