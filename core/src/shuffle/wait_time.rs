//! Measures how long the consumer of a stream waits for each of its batches:
//! from the first poll for a batch until it is ready. Unlike DataFusion's
//! `elapsed_compute`, this counts time spent waiting on disks, the network or
//! other threads, which is most of what a shuffle costs its consumer.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::error::Result;
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream};
use datafusion::physical_plan::metrics::Time;
use futures::{Stream, StreamExt};

/// Adds to `time` how long each batch of `stream` took to arrive once asked for.
pub fn time_waits(stream: SendableRecordBatchStream, time: Time) -> SendableRecordBatchStream {
    Box::pin(WaitTimed {
        inner: stream,
        time,
        asked_at: None,
    })
}

struct WaitTimed {
    inner: SendableRecordBatchStream,
    time: Time,
    /// When the batch being waited for was first polled for.
    asked_at: Option<Instant>,
}

impl Stream for WaitTimed {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let asked_at = *self.asked_at.get_or_insert_with(Instant::now);
        let poll = self.inner.poll_next_unpin(cx);
        if poll.is_ready() {
            self.time.add_duration(asked_at.elapsed());
            self.asked_at = None;
        }
        poll
    }
}

impl RecordBatchStream for WaitTimed {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;

    use super::*;

    #[tokio::test]
    async fn waiting_for_a_batch_is_counted_and_consuming_it_is_not() {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from(vec![1]))],
        )
        .expect("batch");
        // The producer takes 30 ms per batch.
        let slow = futures::stream::iter([batch.clone(), batch]).then(|batch| async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            Ok(batch)
        });
        let time = Time::new();
        let started = Instant::now();
        let mut stream = time_waits(
            Box::pin(RecordBatchStreamAdapter::new(schema, slow)),
            time.clone(),
        );
        while let Some(batch) = stream.next().await {
            batch.expect("batch");
            // The consumer's own work between batches is not waiting.
            std::thread::sleep(Duration::from_millis(50));
        }
        let waited = Duration::from_nanos(time.value() as u64);
        let consuming = Duration::from_millis(100);
        assert!(waited >= Duration::from_millis(60), "{waited:?}");
        assert!(waited <= started.elapsed() - consuming, "{waited:?}");
    }
}
