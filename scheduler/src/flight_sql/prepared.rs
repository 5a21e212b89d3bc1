//! Prepared statements of Flight SQL clients: their SQL and the rows of
//! parameter values bound to them.
//!
//! Handles are opaque to clients and name an entry here. The number of open
//! statements is bounded: a client that never closes its statements makes
//! the least recently used ones expire, and using an expired handle gets a
//! clear error rather than growing the scheduler's memory without end.

use std::collections::HashMap;
use std::sync::Mutex;

use arrow::array::RecordBatch;
use bytes::Bytes;
use datafusion::common::ScalarValue;
use tonic::Status;

/// Most prepared statements open at once, over all clients.
const MAX_OPEN_STATEMENTS: usize = 4096;

/// Most parameter rows bound to one statement: each row runs as a job of
/// its own, so loading data this way belongs in `COPY` or a table instead.
pub const MAX_PARAMETER_ROWS: usize = 1024;

/// One row of values for a statement's `$1`, `$2`... placeholders.
pub type ParameterRow = Vec<ScalarValue>;

#[derive(Debug, Clone)]
pub struct PreparedStatement {
    pub sql: String,
    /// Bound rows; empty until the client binds some.
    pub parameters: Vec<ParameterRow>,
    last_used: u64,
}

#[derive(Debug, Default)]
pub struct PreparedStatements {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    statements: HashMap<Bytes, PreparedStatement>,
    clock: u64,
}

impl Inner {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

impl PreparedStatements {
    /// Stores a statement and returns its new handle.
    pub fn insert(&self, sql: String) -> Bytes {
        let handle = Bytes::from(uuid::Uuid::new_v4().simple().to_string());
        let mut inner = self.lock();
        if inner.statements.len() >= MAX_OPEN_STATEMENTS
            && let Some(oldest) = inner
                .statements
                .iter()
                .min_by_key(|(_, statement)| statement.last_used)
                .map(|(handle, _)| handle.clone())
        {
            inner.statements.remove(&oldest);
        }
        let last_used = inner.tick();
        inner.statements.insert(
            handle.clone(),
            PreparedStatement {
                sql,
                parameters: Vec::new(),
                last_used,
            },
        );
        handle
    }

    /// The statement behind a handle, as it is now.
    pub fn get(&self, handle: &[u8]) -> Result<PreparedStatement, Status> {
        self.touch(handle, |statement| statement.clone())
    }

    /// Replaces the parameter rows bound to a statement.
    pub fn bind(&self, handle: &[u8], parameters: Vec<ParameterRow>) -> Result<(), Status> {
        self.touch(handle, |statement| statement.parameters = parameters)
    }

    /// Runs `f` on the statement behind a handle, marking it used now.
    fn touch<T>(
        &self,
        handle: &[u8],
        f: impl FnOnce(&mut PreparedStatement) -> T,
    ) -> Result<T, Status> {
        let mut inner = self.lock();
        let now = inner.tick();
        let statement = inner
            .statements
            .get_mut(handle)
            .ok_or_else(|| unknown(handle))?;
        statement.last_used = now;
        Ok(f(statement))
    }

    /// Forgets a statement; closing one twice is not an error.
    pub fn close(&self, handle: &[u8]) {
        self.lock().statements.remove(handle);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map stays consistent even if a holder panicked.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn unknown(handle: &[u8]) -> Status {
    let shown: String = String::from_utf8_lossy(handle).chars().take(64).collect();
    Status::not_found(format!(
        "unknown prepared statement '{shown}': it was closed, or expired after {MAX_OPEN_STATEMENTS} newer ones"
    ))
}

/// Splits bound parameter batches into rows of values; `before` rows were
/// read already, and count against the limit.
pub fn parameter_rows(batches: &[RecordBatch], before: usize) -> Result<Vec<ParameterRow>, Status> {
    let total: usize = before + batches.iter().map(RecordBatch::num_rows).sum::<usize>();
    if total > MAX_PARAMETER_ROWS {
        return Err(Status::invalid_argument(format!(
            "{total} parameter rows are bound, at most {MAX_PARAMETER_ROWS} are allowed: each row runs as a job of its own; load data with COPY or INSERT ... SELECT instead"
        )));
    }
    let mut rows = Vec::with_capacity(total - before);
    for batch in batches {
        for row in 0..batch.num_rows() {
            let values = batch
                .columns()
                .iter()
                .map(|column| ScalarValue::try_from_array(column, row))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Status::invalid_argument(format!("bad parameter value: {e}")))?;
            rows.push(values);
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};

    use super::*;

    #[test]
    fn statements_bind_rows_and_close() {
        let statements = PreparedStatements::default();
        let handle = statements.insert("SELECT $1".into());
        assert!(statements.get(&handle).expect("open").parameters.is_empty());
        let batch = RecordBatch::try_from_iter([
            ("a", Arc::new(Int64Array::from(vec![1, 2])) as _),
            ("b", Arc::new(StringArray::from(vec!["x", "y"])) as _),
        ])
        .expect("batch");
        let rows = parameter_rows(&[batch], 0).expect("rows");
        assert_eq!(
            rows[1],
            vec![ScalarValue::Int64(Some(2)), ScalarValue::from("y")]
        );
        statements.bind(&handle, rows).expect("bound");
        assert_eq!(statements.get(&handle).expect("open").parameters.len(), 2);
        statements.close(&handle);
        let error = statements.get(&handle).expect_err("closed");
        assert_eq!(error.code(), tonic::Code::NotFound);
        assert!(error.message().contains("unknown prepared statement"));
    }

    #[test]
    fn the_least_recently_used_statement_expires_first() {
        let statements = PreparedStatements::default();
        let first = statements.insert("SELECT 1".into());
        let second = statements.insert("SELECT 2".into());
        statements.get(&first).expect("open");
        for _ in 0..MAX_OPEN_STATEMENTS - 1 {
            statements.insert("SELECT 3".into());
        }
        assert!(statements.get(&first).is_ok(), "recently used");
        assert!(statements.get(&second).is_err(), "least recently used");
    }

    #[test]
    fn too_many_parameter_rows_are_refused() {
        let values: Vec<i64> = (0..=MAX_PARAMETER_ROWS as i64).collect();
        let batch = RecordBatch::try_from_iter([("a", Arc::new(Int64Array::from(values)) as _)])
            .expect("batch");
        let error = parameter_rows(&[batch], 0).expect_err("too many");
        assert!(error.message().contains("COPY"), "{}", error.message());
    }
}
