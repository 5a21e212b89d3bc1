//! [`QuiverContext`]: the entry point of the Rust API, in the style of
//! DataFusion's `SessionContext`.

use std::sync::Arc;

use datafusion::dataframe::DataFrame;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder, Statement as PlanStatement};
use datafusion::physical_plan::EmptyRecordBatchStream;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::{DFParser, Statement};
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use quiver_core::config::{default_session_config, settings_to_send};
use quiver_core::scalar_subqueries::SingleRowSubqueries;
use quiver_core::shuffle::FlightClientPool;
use quiver_core::storage::redact_statement_error;
use quiver_proto::scheduler_service_client::SchedulerServiceClient;
use quiver_proto::{
    ExecutorInfo, JobRecord, JobRequest, JobStatus, ListExecutorsRequest, ListJobsRequest, Setting,
    submit_job_request::Query,
};
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};
use crate::job::{self, CancelOutcome};
use crate::remote::{DistributedQueryPlanner, RemoteCatalog};

/// Largest gRPC message accepted from the scheduler.
const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// A connection to a Quiver cluster.
///
/// DataFrames built from it are planned against the cluster's catalog and run
/// on the cluster when collected; `SET` changes this session's settings, which
/// travel with every job.
#[derive(Clone)]
pub struct QuiverContext {
    client: SchedulerServiceClient<Channel>,
    pool: FlightClientPool,
    session: SessionContext,
}

impl std::fmt::Debug for QuiverContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuiverContext").finish_non_exhaustive()
    }
}

/// Turns `quiver://host:port` (or `http://host:port`) into a gRPC endpoint address.
pub fn endpoint_address(url: &str) -> Result<String> {
    let rest = url
        .strip_prefix("quiver://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    let valid = !rest.is_empty() && !rest.contains('/') && rest.contains(':');
    if valid {
        Ok(format!("http://{rest}"))
    } else {
        Err(Error::InvalidUrl {
            url: url.to_owned(),
        })
    }
}

impl QuiverContext {
    /// Connects to the scheduler at `quiver://host:port`.
    pub async fn connect(url: &str) -> Result<Self> {
        let address = endpoint_address(url)?;
        let connect_error = |source| Error::Connect {
            address: address.trim_start_matches("http://").to_owned(),
            source,
        };
        let endpoint = Endpoint::from_shared(address.clone()).map_err(connect_error)?;
        let channel = quiver_core::net::tune_endpoint(endpoint)
            .connect()
            .await
            .map_err(connect_error)?;
        let client = SchedulerServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let pool = FlightClientPool::default();
        let mut state = SessionStateBuilder::new()
            .with_config(default_session_config())
            .with_default_features()
            .with_query_planner(Arc::new(DistributedQueryPlanner::new(
                client.clone(),
                pool.clone(),
            )))
            .build();
        // Plans are optimized here, before they are sent: DataFusion turns
        // scalar subqueries into joins then.
        state.add_analyzer_rule(Arc::new(SingleRowSubqueries));
        let session = SessionContext::new_with_state(state);
        let catalog = session
            .state()
            .config()
            .options()
            .catalog
            .default_catalog
            .clone();
        session.register_catalog(catalog, Arc::new(RemoteCatalog::new(client.clone())));
        Ok(Self {
            client,
            pool,
            session,
        })
    }

    /// Plans a SQL statement. Queries return a lazy DataFrame that runs on the
    /// cluster when collected; DDL (`CREATE EXTERNAL TABLE`, `DROP TABLE`,
    /// `CREATE VIEW`) and writes (`COPY ... TO`, `INSERT INTO`) run on the
    /// cluster at once, and `SET` changes this session.
    pub async fn sql(&self, sql: &str) -> Result<DataFrame> {
        let started = std::time::Instant::now();
        let state = self.session.state();
        let plan = plan_statement(&state, sql).await?;
        tracing::debug!(
            planning_us = started.elapsed().as_micros() as u64,
            "statement planned on the client"
        );
        // A local session: collecting the distributed planner's empty plan
        // would queue a job on the cluster for nothing.
        let nothing = || -> Result<DataFrame> {
            let empty = LogicalPlanBuilder::empty(false).build()?;
            Ok(DataFrame::new(SessionContext::new().state(), empty))
        };
        match plan {
            LogicalPlan::Ddl(_) => {
                self.run_sql(sql).await?;
                nothing()
            }
            // `EXECUTE` gives the prepared plan to run; `SET`, `PREPARE` and
            // the rest change this session only.
            LogicalPlan::Statement(PlanStatement::Execute(_)) => self.prepared(plan).await,
            LogicalPlan::Statement(_) => {
                self.session.execute_logical_plan(plan).await?;
                nothing()
            }
            // The cluster explains its own plan (the stage DAG, and with
            // ANALYZE what each stage's operators did), and plans
            // writes itself (`COPY`, `INSERT`), so that their files are
            // written by every task there. Both answer with a few rows, so
            // they run at once, as DataFusion's DDL does. A query on a table
            // function (`range()`) runs as SQL text too: such a table is not
            // in the cluster's catalog, so a client-built plan cannot name it.
            plan if runs_as_sql_text(&plan) => {
                let stream = self.execute_sql(sql, |_| {}).await?;
                let batches = datafusion::physical_plan::common::collect(stream).await?;
                // A local session: the distributed planner would send the rows back.
                Ok(SessionContext::new().read_batches(batches)?)
            }
            plan => Ok(DataFrame::new(state, plan)),
        }
    }

    /// The query that `execute`, an `EXECUTE` statement, names, with its
    /// parameters, to run on the cluster. Statements that run as SQL text
    /// (writes, `EXPLAIN`, DDL, queries on table functions) have no text
    /// once prepared, and are refused.
    async fn prepared(&self, execute: LogicalPlan) -> Result<DataFrame> {
        let frame = self.session.execute_logical_plan(execute).await?;
        let plan = frame.logical_plan();
        if runs_as_sql_text(plan) || matches!(plan, LogicalPlan::Ddl(_) | LogicalPlan::Statement(_))
        {
            return Err(DataFusionError::NotImplemented(
                "EXECUTE runs prepared queries only; run writes, EXPLAIN, DDL and queries \
                 on table functions as statements of their own"
                    .to_owned(),
            )
            .into());
        }
        Ok(frame)
    }

    /// The executors registered with the scheduler.
    pub async fn executors(&self) -> Result<Vec<ExecutorInfo>> {
        let response = self
            .scheduler()
            .list_executors(ListExecutorsRequest {})
            .await?;
        Ok(response.into_inner().executors)
    }

    /// Submits SQL and returns at once, without waiting for the job.
    pub async fn submit_sql(&self, sql: &str) -> Result<job::SubmittedJob> {
        job::submit(
            &mut self.scheduler(),
            Query::Sql(sql.to_owned()),
            self.settings(),
        )
        .await
    }

    /// The current status of a job, running or in the history.
    pub async fn job_status(&self, job_id: &str) -> Result<JobStatus> {
        let response = self
            .scheduler()
            .get_job_status(JobRequest {
                job_id: job_id.to_owned(),
            })
            .await?;
        Ok(response.into_inner())
    }

    /// Waits for a job to end, and returns its final status, however it
    /// ended: succeeded, failed or cancelled. A job whose write a scheduler
    /// restart interrupted ends once the write is settled.
    pub async fn wait_for_job(&self, job_id: &str) -> Result<JobStatus> {
        job::follow(&mut self.scheduler(), job_id, |_| {}).await
    }

    /// The newest `limit` jobs of the scheduler's history (0 for all), oldest first.
    pub async fn list_jobs(&self, limit: u32) -> Result<Vec<JobRecord>> {
        let response = self
            .scheduler()
            .list_jobs(ListJobsRequest { limit })
            .await?;
        Ok(response.into_inner().jobs)
    }

    /// Cancels a running job: its tasks stop and its data is freed. A job
    /// whose write is committing ends when its commit does (see
    /// [`CancelOutcome`]).
    pub async fn cancel_job(&self, job_id: &str) -> Result<CancelOutcome> {
        job::cancel(&mut self.scheduler(), job_id).await
    }

    /// Sends SQL text to the cluster to be planned there, and streams the result.
    /// This is what the CLI uses; `progress` sees every status update.
    ///
    /// `SET` and `RESET` change this session instead: its settings travel
    /// with every later job.
    pub async fn execute_sql(
        &self,
        sql: &str,
        progress: impl FnMut(&JobStatus),
    ) -> Result<SendableRecordBatchStream> {
        match session_statement(sql) {
            Some(SessionStatement::Changes) => {
                let plan = plan_statement(&self.session.state(), sql).await?;
                self.session.execute_logical_plan(plan).await?;
                let nothing = Arc::new(arrow::datatypes::Schema::empty());
                return Ok(Box::pin(EmptyRecordBatchStream::new(nothing)));
            }
            // The prepared plan, with its parameters, runs on the cluster.
            Some(SessionStatement::RunsPrepared) => {
                let plan = plan_statement(&self.session.state(), sql).await?;
                return Ok(self.prepared(plan).await?.execute_stream().await?);
            }
            None => {}
        }
        job::execute(
            self.client.clone(),
            self.pool.clone(),
            Query::Sql(sql.to_owned()),
            self.settings(),
            progress,
        )
        .await
    }

    async fn run_sql(&self, sql: &str) -> Result<()> {
        let mut client = self.client.clone();
        let submitted =
            job::submit(&mut client, Query::Sql(sql.to_owned()), self.settings()).await?;
        job::wait(&mut client, &submitted.job_id, |_| {}).await?;
        Ok(())
    }

    /// A DataFrame over a table of the cluster's catalog.
    pub async fn table(&self, name: &str) -> Result<DataFrame> {
        Ok(self.session.table(name).await?)
    }

    /// Registers a Parquet file, folder or hive-partitioned folder as a table.
    pub async fn register_parquet(&self, name: &str, location: &str) -> Result<()> {
        self.register_external(name, "PARQUET", location, "").await
    }

    /// Registers a CSV file or folder as a table.
    pub async fn register_csv(&self, name: &str, location: &str, has_header: bool) -> Result<()> {
        let options = format!("OPTIONS ('format.has_header' '{has_header}')");
        self.register_external(name, "CSV", location, &options)
            .await
    }

    async fn register_external(
        &self,
        name: &str,
        format: &str,
        location: &str,
        options: &str,
    ) -> Result<()> {
        let sql = format!(
            "CREATE EXTERNAL TABLE {} STORED AS {format} LOCATION '{}' {options}",
            quote_identifier(name),
            location.replace('\'', "''")
        );
        self.run_sql(&sql).await
    }

    /// The settings that differ from the defaults, sent with every job.
    pub fn settings(&self) -> Vec<Setting> {
        settings_to_send(self.session.state().config().options())
    }

    /// The local DataFusion session that builds this context's plans.
    pub fn session(&self) -> &SessionContext {
        &self.session
    }

    /// The raw gRPC client of the scheduler.
    pub fn scheduler(&self) -> SchedulerServiceClient<Channel> {
        self.client.clone()
    }
}

/// The logical plan of `sql`; an error loses what it would repeat of the
/// statement's secret store options.
async fn plan_statement(state: &SessionState, sql: &str) -> Result<LogicalPlan> {
    state.create_logical_plan(sql).await.map_err(|e| match e {
        // The scheduler's answer on a table (one it cannot read) is told as
        // it said it, not as DataFusion's "External error: ...".
        DataFusionError::External(inner) => match inner.downcast::<Error>() {
            Ok(ours) => *ours,
            Err(other) => redact_statement_error(DataFusionError::External(other), sql).into(),
        },
        e => redact_statement_error(e, sql).into(),
    })
}

fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A statement that [`QuiverContext::execute_sql`] does not send as text,
/// since what it changes lives in this session.
#[derive(Debug, PartialEq, Eq)]
enum SessionStatement {
    /// `SET`, `RESET`, `PREPARE` or `DEALLOCATE`.
    Changes,
    /// `EXECUTE` of a statement prepared in this session.
    RunsPrepared,
}

/// What `sql` is, if it is one statement about this session.
fn session_statement(sql: &str) -> Option<SessionStatement> {
    let statements = DFParser::parse_sql(sql).ok()?;
    if statements.len() != 1 {
        return None;
    }
    match statements.front()? {
        Statement::Reset(_) => Some(SessionStatement::Changes),
        Statement::Statement(inner) => match inner.as_ref() {
            SqlStatement::Set(_)
            | SqlStatement::Prepare { .. }
            | SqlStatement::Deallocate { .. } => Some(SessionStatement::Changes),
            SqlStatement::Execute { .. } => Some(SessionStatement::RunsPrepared),
            _ => None,
        },
        _ => None,
    }
}

/// Statements that [`QuiverContext::sql`] sends to the cluster as SQL text, to
/// be planned and run there at once.
fn runs_as_sql_text(plan: &LogicalPlan) -> bool {
    matches!(
        plan,
        LogicalPlan::Explain(_)
            | LogicalPlan::Analyze(_)
            | LogicalPlan::Copy(_)
            | LogicalPlan::Dml(_)
    ) || crate::remote::scans_client_tables(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_about_the_session_stay_in_it() {
        for changes in [
            "SET datafusion.execution.parquet.pruning = false",
            "reset quiver.job_timeout_secs",
            "PREPARE plus_one(INT) AS SELECT $1 + 1",
            "DEALLOCATE plus_one",
        ] {
            assert_eq!(
                session_statement(changes),
                Some(SessionStatement::Changes),
                "{changes}"
            );
        }
        assert_eq!(
            session_statement("EXECUTE plus_one(5)"),
            Some(SessionStatement::RunsPrepared)
        );
        for sent in ["SELECT 1", "SET a = 1; SELECT 1", "not sql at all"] {
            assert_eq!(session_statement(sent), None, "{sent}");
        }
    }

    #[test]
    fn urls() {
        assert_eq!(
            endpoint_address("quiver://localhost:50050").expect("valid"),
            "http://localhost:50050"
        );
        assert!(endpoint_address("quiver://").is_err());
        assert!(endpoint_address("localhost").is_err());
    }
}
