//! Reading a durable map output from the executor that wrote it, with its
//! copy in object storage to fall back on: a stream that fails midway goes
//! on from the copy after the rows it delivered, so that the reader is
//! neither retried nor its input recomputed.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use quiver_proto::ExecutorAddress;
use tracing::warn;

use super::durable;
use super::fetch::FlightClientPool;
use crate::error::Error;

/// The durable copy of one output partition that is being read from its
/// executor.
pub(super) struct DurableCopy {
    pub(super) runtime: Arc<RuntimeEnv>,
    pub(super) location: String,
    pub(super) partition: usize,
    pub(super) schema: SchemaRef,
    pub(super) pool: FlightClientPool,
    pub(super) executor: ExecutorAddress,
}

/// Where a partition read from its executor, with a durable copy to fall back
/// on, is read from now.
enum Reading {
    /// The executor, which has delivered this many rows so far.
    Executor {
        stream: SendableRecordBatchStream,
        delivered: usize,
        copy: DurableCopy,
    },
    /// The copy, past the rows the executor delivered.
    Copy(SendableRecordBatchStream),
    Ended,
}

impl DurableCopy {
    /// `from_executor`, read on from this copy if it fails: the copy holds
    /// the same rows in the same order (both are the bytes of one attempt's
    /// data file), so the rows the executor delivered are skipped, and the
    /// reader sees each row once and need not be retried.
    pub(super) fn after_failure_of(
        self,
        from_executor: SendableRecordBatchStream,
    ) -> SendableRecordBatchStream {
        let schema = Arc::clone(&self.schema);
        let start = Reading::Executor {
            stream: from_executor,
            delivered: 0,
            copy: self,
        };
        let batches = futures::stream::unfold(start, |reading| async move {
            match reading {
                Reading::Executor {
                    mut stream,
                    delivered,
                    copy,
                } => match stream.next().await {
                    Some(Ok(batch)) => {
                        let delivered = delivered + batch.num_rows();
                        let reading = Reading::Executor {
                            stream,
                            delivered,
                            copy,
                        };
                        Some((Ok(batch), reading))
                    }
                    None => None,
                    Some(Err(e)) => {
                        warn!(%e, location = %copy.location, delivered,
                            "reading on from a durable output's copy: its executor failed");
                        drop(stream);
                        copy.pool.note_failure(&copy.executor);
                        match copy.open().await {
                            Ok(stream) => next_from_copy(stream, delivered).await,
                            Err(e) => Some((Err(e), Reading::Ended)),
                        }
                    }
                },
                Reading::Copy(stream) => next_from_copy(stream, 0).await,
                Reading::Ended => None,
            }
        });
        Box::pin(RecordBatchStreamAdapter::new(schema, batches))
    }

    async fn open(&self) -> Result<SendableRecordBatchStream, DataFusionError> {
        let schema = Arc::clone(&self.schema);
        durable::open_partition(&self.runtime, &self.location, self.partition, schema)
            .await
            .map_err(DataFusionError::from)
    }
}

/// The next batch of a durable copy after its first `skip` rows.
async fn next_from_copy(
    mut stream: SendableRecordBatchStream,
    mut skip: usize,
) -> Option<(Result<RecordBatch, DataFusionError>, Reading)> {
    loop {
        let Some(next) = stream.next().await else {
            if skip == 0 {
                return None;
            }
            let short = Error::CorruptShuffleData(format!(
                "a durable copy ended {skip} rows before what its executor had sent"
            ));
            return Some((Err(short.into()), Reading::Ended));
        };
        match next {
            Ok(batch) if batch.num_rows() <= skip && skip > 0 => skip -= batch.num_rows(),
            Ok(batch) => {
                let rest = batch.slice(skip, batch.num_rows() - skip);
                return Some((Ok(rest), Reading::Copy(stream)));
            }
            Err(e) => return Some((Err(e), Reading::Ended)),
        }
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_plan::common::collect;

    use super::*;
    use crate::shuffle::MapOutputId;
    use crate::shuffle::test_support::write_map_output;
    use crate::storage::{StoreRegistry, runtime_builder};

    fn numbers(range: std::ops::Range<i64>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let values = Arc::new(Int64Array::from_iter_values(range));
        RecordBatch::try_new(schema, vec![values]).expect("batch")
    }

    fn copy_at(runtime: &Arc<RuntimeEnv>, location: &str, schema: &SchemaRef) -> DurableCopy {
        DurableCopy {
            runtime: Arc::clone(runtime),
            location: location.to_owned(),
            partition: 0,
            schema: Arc::clone(schema),
            pool: FlightClientPool::default(),
            executor: ExecutorAddress::default(),
        }
    }

    /// A read from a durable output's executor that fails goes on from the
    /// copy: wherever it failed (before the first batch, between batches,
    /// inside one), the reader gets every row once, in order.
    #[tokio::test]
    async fn a_failed_read_from_the_executor_goes_on_from_the_durable_copy() {
        let local = tempfile::tempdir().expect("temp");
        let remote = tempfile::tempdir().expect("temp");
        let written = [numbers(0..3), numbers(3..6), numbers(6..9)];
        let (data, index) = write_map_output(local.path(), &written);
        let stores = Arc::new(StoreRegistry::new());
        let runtime = Arc::new(
            runtime_builder(Arc::clone(&stores))
                .build()
                .expect("runtime"),
        );
        let shuffle = format!("file://{}", remote.path().display());
        let id = MapOutputId::new("job1", 1, 0, 0).expect("id");
        let location = durable::upload(&stores, &id, &shuffle, &data, &index, None)
            .await
            .expect("upload");
        let schema = written[0].schema();
        // What the executor delivered before it failed.
        for delivered in [
            vec![],
            vec![numbers(0..3)],
            vec![numbers(0..3), numbers(3..5)],
        ] {
            let failure = DataFusionError::Execution("the executor went away".into());
            let from_executor = futures::stream::iter(delivered.clone().into_iter().map(Ok))
                .chain(futures::stream::once(async { Err(failure) }));
            let copy = copy_at(&runtime, &location, &schema);
            let read = copy.after_failure_of(Box::pin(RecordBatchStreamAdapter::new(
                Arc::clone(&schema),
                from_executor,
            )));
            let batches = collect(read).await.expect("read on from the copy");
            let values: Vec<i64> = batches
                .iter()
                .flat_map(|batch| {
                    let column = batch.column(0).as_any().downcast_ref::<Int64Array>();
                    column.expect("int64").values().to_vec()
                })
                .collect();
            assert_eq!(values, (0..9).collect::<Vec<_>>(), "after {delivered:?}");
        }

        // A copy that cannot be read fails the read: nothing is made up.
        std::fs::remove_dir_all(remote.path().join("job1")).expect("remove the copy");
        let copy = copy_at(&runtime, &location, &schema);
        let failing = futures::stream::once(async {
            Err(DataFusionError::Execution("the executor went away".into()))
        });
        let read = copy.after_failure_of(Box::pin(RecordBatchStreamAdapter::new(schema, failing)));
        let error = collect(read).await.expect_err("no copy to read");
        assert!(error.to_string().contains("job1"), "{error}");
    }
}
