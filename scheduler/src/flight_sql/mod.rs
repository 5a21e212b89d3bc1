//! Arrow Flight SQL on the scheduler, so that ADBC, JDBC and BI tools reach
//! Quiver with no Quiver-specific code. It shares the scheduler's port.
//!
//! A statement runs as a job like any other client's. `GetFlightInfo` plans
//! it and starts its job, and answers with one endpoint whose ticket names
//! the job. `DoGet` waits for the job and streams its result from the
//! executors through the scheduler, batch by batch: the scheduler never holds
//! a whole result, and clients need not reach the executors.
//!
//! Session settings travel as call headers, one per setting:
//! `x-quiver-setting-<key>: <value>`, for example
//! `x-quiver-setting-datafusion.execution.target_partitions: 8`.
//!
//! - [`metadata`]: catalogs, schemas, tables, table types and `SqlInfo`.
//! - [`prepared`]: prepared statements and their bound parameters.

pub mod metadata;
pub mod prepared;

use std::pin::Pin;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::SqlInfoData;
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionCancelQueryRequest, ActionCancelQueryResult, ActionClosePreparedStatementRequest,
    ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, Any,
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes,
    CommandGetTables, CommandPreparedStatementQuery, CommandPreparedStatementUpdate,
    CommandStatementQuery, CommandStatementUpdate, DoPutPreparedStatementResult, ProstMessageExt,
    SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    CancelFlightInfoRequest, CancelFlightInfoResult, CancelStatus, FlightData, FlightDescriptor,
    FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage, SchemaAsIpc,
    Ticket,
};
use datafusion::common::ParamValues;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use quiver_core::guard::catch_decoder_panic;
use quiver_core::ipc::{schema_from_bytes, schema_to_bytes};
use quiver_core::shuffle::FlightClientPool;
use quiver_core::shuffle::fetch::job_result;
use quiver_proto::{JobState, Setting, submit_job_request::Query};
use tonic::metadata::{KeyAndValueRef, MetadataMap};
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::service::{JobGuard, SchedulerGrpc, is_final};
use crate::state::CancelOutcome;
use prepared::{ParameterRow, PreparedStatements, parameter_rows};

type FlightStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Call headers that carry session settings start with this.
pub const SETTING_HEADER_PREFIX: &str = "x-quiver-setting-";

/// Values of Flight SQL's `CancelResult`, whose generated enum arrow-flight
/// does not export.
const CANCEL_RESULT_CANCELLED: i32 = 1;
const CANCEL_RESULT_CANCELLING: i32 = 2;
const CANCEL_RESULT_NOT_CANCELLABLE: i32 = 3;

/// The Flight action that cancels the query behind a FlightInfo.
const CANCEL_FLIGHT_INFO: &str = "CancelFlightInfo";

/// What a statement's ticket holds: the job, and the schema its result has.
#[derive(Clone, PartialEq, prost::Message)]
struct ResultHandle {
    #[prost(string, tag = "1")]
    job_id: String,
    #[prost(bytes = "vec", tag = "2")]
    schema: Vec<u8>,
}

/// The Flight SQL service of the scheduler.
#[derive(Clone)]
pub struct FlightSqlEndpoint {
    jobs: SchedulerGrpc,
    executors: FlightClientPool,
    prepared: Arc<PreparedStatements>,
    server_info: Arc<SqlInfoData>,
}

impl std::fmt::Debug for FlightSqlEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightSqlEndpoint").finish_non_exhaustive()
    }
}

impl FlightSqlEndpoint {
    pub fn new(jobs: SchedulerGrpc) -> Result<Self, FlightError> {
        Ok(Self {
            jobs,
            executors: FlightClientPool::default(),
            prepared: Arc::default(),
            server_info: Arc::new(metadata::server_info()?),
        })
    }

    /// Plans and starts a statement; answers with the endpoint of its result.
    async fn start(
        &self,
        sql: String,
        parameters: Option<ParamValues>,
        headers: &MetadataMap,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let settings = settings_from_headers(headers)?;
        let (job_id, schema) = self
            .jobs
            .submit(Query::Sql(sql), parameters, settings)
            .await?;
        let handle = ResultHandle {
            job_id,
            schema: schema_to_bytes(&schema),
        };
        let ticket = TicketStatementQuery {
            statement_handle: handle.encode_to_vec().into(),
        };
        let info = match FlightInfo::new().try_with_schema(&schema) {
            Ok(info) => info,
            Err(e) => {
                // Nobody could ever fetch the result.
                self.jobs.cancel_in_background(&handle.job_id);
                return Err(arrow_status(e));
            }
        };
        let info = info
            .with_endpoint(FlightEndpoint::new().with_ticket(any_ticket(&ticket)))
            .with_descriptor(descriptor)
            .with_ordered(true);
        Ok(Response::new(info))
    }

    /// Waits for a job and streams its result from the executors. The job
    /// is cancelled if the caller goes away first, and its result freed
    /// once read.
    async fn job_batches(
        &self,
        job_id: &str,
        schema: SchemaRef,
    ) -> Result<SendableRecordBatchStream, Status> {
        let mut watcher = self.jobs.job_status(job_id)?;
        let mut guard = JobGuard::new(self.jobs.clone(), job_id);
        let status = watcher
            .wait_for(|status| is_final(status.state))
            .await
            .map(|status| status.clone())
            .map_err(|_| Status::from(Error::ShuttingDown))?;
        guard.finished();
        match status.state() {
            JobState::Succeeded => {}
            JobState::Cancelled => {
                return Err(Status::cancelled(format!("job {job_id} was cancelled")));
            }
            _ => {
                // Not ABORTED: clients may retry that, running a write again.
                return Err(Status::unknown(format!(
                    "job {job_id} failed: {}",
                    status.error
                )));
            }
        }
        let batches = job_result(
            self.executors.clone(),
            job_id.to_owned(),
            status.result_stage,
            status.result,
            Arc::clone(&schema),
        )
        // The guard lives as long as the stream, and releases the result when dropped.
        .inspect(move |_| {
            let _ = &guard;
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, batches)))
    }

    /// Cancels the jobs behind a FlightInfo's tickets; true if one was still running.
    async fn cancel(&self, info: FlightInfo) -> Result<CancelOutcome, Status> {
        let malformed = |e: String| Status::invalid_argument(format!("malformed ticket: {e}"));
        let mut outcomes = Vec::new();
        for ticket in info.endpoint.into_iter().filter_map(|e| e.ticket) {
            let any = Any::decode(ticket.ticket).map_err(|e| malformed(e.to_string()))?;
            let Some(statement) = any
                .unpack::<TicketStatementQuery>()
                .map_err(|e| malformed(e.to_string()))?
            else {
                continue;
            };
            let (handle, _) = decode_result_handle(&statement.statement_handle)?;
            outcomes.push(self.jobs.cancel(&handle.job_id).await?);
        }
        // Cancelled if any job was, still committing if any job is.
        Ok([CancelOutcome::Cancelled, CancelOutcome::Committing]
            .into_iter()
            .find(|outcome| outcomes.contains(outcome))
            .unwrap_or(CancelOutcome::Ended))
    }

    /// Runs an update to its end and returns the rows it changed.
    async fn run_update(
        &self,
        sql: String,
        parameters: Option<ParamValues>,
        settings: Vec<Setting>,
    ) -> Result<i64, Status> {
        let (job_id, schema) = self
            .jobs
            .submit(Query::Sql(sql), parameters, settings)
            .await?;
        let batches = self.job_batches(&job_id, schema).await?;
        affected_rows(batches).await
    }
}

/// Reads the parameter rows a client puts, refusing more than
/// [`prepared::MAX_PARAMETER_ROWS`] as soon as they arrive.
async fn read_parameters(stream: PeekableFlightDataStream) -> Result<Vec<ParameterRow>, Status> {
    // Some clients (arrow-rs) send only a descriptor, with no Arrow message.
    let messages = stream.try_filter(|data| futures::future::ready(!data.data_header.is_empty()));
    let mut batches =
        FlightRecordBatchStream::new_from_flight_data(messages.map_err(FlightError::from));
    let mut rows = Vec::new();
    while let Some(batch) = batches.next().await {
        let batch = batch
            .map_err(|e| Status::invalid_argument(format!("cannot read the parameters: {e}")))?;
        rows.extend(parameter_rows(std::slice::from_ref(&batch), rows.len())?);
    }
    Ok(rows)
}

/// The session settings a call carries in its headers.
fn settings_from_headers(headers: &MetadataMap) -> Result<Vec<Setting>, Status> {
    let mut settings = Vec::new();
    for entry in headers.iter() {
        let KeyAndValueRef::Ascii(key, value) = entry else {
            continue;
        };
        let Some(setting) = key.as_str().strip_prefix(SETTING_HEADER_PREFIX) else {
            continue;
        };
        let value = value.to_str().map_err(|_| {
            Status::invalid_argument(format!("the value of setting '{setting}' is not text"))
        })?;
        settings.push(Setting {
            key: setting.to_owned(),
            value: value.to_owned(),
        });
    }
    Ok(settings)
}

/// The count an update reports: the `count` column of a write (`INSERT`,
/// `COPY`), nothing for a catalog statement, otherwise the rows returned.
async fn affected_rows(batches: SendableRecordBatchStream) -> Result<i64, Status> {
    let schema = batches.schema();
    let counted = schema.fields().len() == 1
        && schema.field(0).name() == "count"
        && schema.field(0).data_type() == &DataType::UInt64;
    batches
        .map_err(|e| Status::unknown(e.to_string()))
        .try_fold(0_i64, |total, batch| async move {
            let rows = if counted {
                let counts = batch
                    .column(0)
                    .as_primitive::<arrow::datatypes::UInt64Type>();
                counts.iter().flatten().sum::<u64>() as i64
            } else {
                batch.num_rows() as i64
            };
            Ok(total + rows)
        })
        .await
}

fn any_ticket(message: &impl ProstMessageExt) -> Ticket {
    Ticket::new(message.as_any().encode_to_vec())
}

fn arrow_status(error: impl std::fmt::Display) -> Status {
    Status::internal(error.to_string())
}

fn ipc_schema(schema: &arrow::datatypes::Schema) -> Result<bytes::Bytes, Status> {
    let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(arrow_status)?;
    Ok(bytes)
}

/// A stream of record batches as Flight data.
fn flight_data(batches: SendableRecordBatchStream) -> FlightStream<FlightData> {
    let schema = batches.schema();
    let batches = batches.map_err(|e| match e {
        DataFusionError::ArrowError(e, _) => FlightError::Arrow(*e),
        e => FlightError::Tonic(Box::new(Status::unknown(e.to_string()))),
    });
    Box::pin(
        FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(Status::from),
    )
}

fn one_batch(batch: RecordBatch) -> Response<FlightStream<FlightData>> {
    let schema = batch.schema();
    let batches = futures::stream::once(async move { Ok(batch) });
    Response::new(flight_data(Box::pin(RecordBatchStreamAdapter::new(
        schema, batches,
    ))))
}

/// The answer to a metadata command: one endpoint whose ticket is the command.
fn metadata_info(
    command: &impl ProstMessageExt,
    schema: &arrow::datatypes::Schema,
    descriptor: FlightDescriptor,
) -> Result<Response<FlightInfo>, Status> {
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(arrow_status)?
        .with_endpoint(FlightEndpoint::new().with_ticket(any_ticket(command)))
        .with_descriptor(descriptor);
    Ok(Response::new(info))
}

fn decode_result_handle(handle: &[u8]) -> Result<(ResultHandle, SchemaRef), Status> {
    let malformed = |what: String| Status::invalid_argument(format!("malformed ticket: {what}"));
    let decoded = ResultHandle::decode(handle).map_err(|e| malformed(e.to_string()))?;
    let schema = catch_decoder_panic(|| schema_from_bytes(&decoded.schema))
        .map_err(|e| malformed(e.to_string()))?
        .map_err(|e| malformed(e.to_string()))?;
    Ok((decoded, schema))
}

#[tonic::async_trait]
impl FlightSqlService for FlightSqlEndpoint {
    type FlightService = Self;

    /// No authentication: any handshake is accepted, for clients that always
    /// send one.
    async fn do_handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<FlightStream<HandshakeResponse>>, Status> {
        let response = HandshakeResponse::default();
        Ok(Response::new(Box::pin(futures::stream::once(async {
            Ok(response)
        }))))
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let headers = request.metadata().clone();
        self.start(query.query, None, &headers, request.into_inner())
            .await
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let statement = self.prepared.get(&query.prepared_statement_handle)?;
        let parameters = match statement.parameters.as_slice() {
            [] => None,
            [row] => Some(ParamValues::from(row.clone())),
            rows => {
                return Err(Status::invalid_argument(format!(
                    "a query runs with one row of parameters, and {} are bound",
                    rows.len()
                )));
            }
        };
        let headers = request.metadata().clone();
        self.start(statement.sql, parameters, &headers, request.into_inner())
            .await
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let (handle, schema) = decode_result_handle(&ticket.statement_handle)?;
        let batches = self.job_batches(&handle.job_id, schema).await?;
        Ok(Response::new(flight_data(batches)))
    }

    async fn do_put_statement_update(
        &self,
        command: CommandStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let settings = settings_from_headers(request.metadata())?;
        self.run_update(command.query, None, settings).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let settings = settings_from_headers(request.metadata())?;
        let shape = self
            .jobs
            .planner()
            .describe(&query.query, &settings)
            .await?;
        let handle = self.prepared.insert(query.query);
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle,
            dataset_schema: ipc_schema(&shape.result)?,
            parameter_schema: ipc_schema(&shape.parameters)?,
        })
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let rows = read_parameters(request.into_inner()).await?;
        self.prepared.bind(&query.prepared_statement_handle, rows)?;
        // The handle stays the same: the bound values live here.
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(query.prepared_statement_handle),
        })
    }

    async fn do_put_prepared_statement_update(
        &self,
        query: CommandPreparedStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let settings = settings_from_headers(request.metadata())?;
        let mut statement = self.prepared.get(&query.prepared_statement_handle)?;
        // Values may come with the update itself rather than bound before.
        let sent = read_parameters(request.into_inner()).await?;
        if !sent.is_empty() {
            statement.parameters = sent;
        }
        if statement.parameters.is_empty() {
            return self.run_update(statement.sql, None, settings).await;
        }
        let mut total = 0;
        for row in statement.parameters {
            let parameters = Some(ParamValues::from(row));
            total += self
                .run_update(statement.sql.clone(), parameters, settings.clone())
                .await?;
        }
        Ok(total)
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        _request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        self.prepared.close(&query.prepared_statement_handle);
        Ok(())
    }

    async fn do_action_cancel_query(
        &self,
        query: ActionCancelQueryRequest,
        _request: Request<arrow_flight::Action>,
    ) -> Result<ActionCancelQueryResult, Status> {
        let info = FlightInfo::decode(query.info)
            .map_err(|e| Status::invalid_argument(format!("malformed FlightInfo: {e}")))?;
        let result = match self.cancel(info).await? {
            CancelOutcome::Cancelled => CANCEL_RESULT_CANCELLED,
            CancelOutcome::Committing => CANCEL_RESULT_CANCELLING,
            CancelOutcome::Settling | CancelOutcome::Ended => CANCEL_RESULT_NOT_CANCELLABLE,
        };
        Ok(ActionCancelQueryResult { result })
    }

    /// `CancelFlightInfo`, the Flight action that replaced `CancelQuery`.
    async fn do_action_fallback(
        &self,
        request: Request<arrow_flight::Action>,
    ) -> Result<Response<<Self as FlightService>::DoActionStream>, Status> {
        let action = request.into_inner();
        if action.r#type != CANCEL_FLIGHT_INFO {
            return Err(Status::invalid_argument(format!(
                "unknown action '{}'",
                action.r#type.chars().take(64).collect::<String>()
            )));
        }
        let request = CancelFlightInfoRequest::decode(action.body)
            .map_err(|e| Status::invalid_argument(format!("malformed CancelFlightInfo: {e}")))?;
        let info = request
            .info
            .ok_or_else(|| Status::invalid_argument("CancelFlightInfo without a FlightInfo"))?;
        let status = match self.cancel(info).await? {
            CancelOutcome::Cancelled => CancelStatus::Cancelled,
            CancelOutcome::Committing => CancelStatus::Cancelling,
            CancelOutcome::Settling | CancelOutcome::Ended => CancelStatus::NotCancellable,
        };
        let result = arrow_flight::Result {
            body: CancelFlightInfoResult::new(status).encode_to_vec().into(),
        };
        Ok(Response::new(Box::pin(futures::stream::once(async {
            Ok(result)
        }))))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        metadata_info(&query, &schema, request.into_inner())
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let catalogs = self.jobs.planner().catalogs();
        let batch = metadata::catalogs(query, catalogs.as_ref()).map_err(arrow_status)?;
        Ok(one_batch(batch))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        metadata_info(&query, &schema, request.into_inner())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let catalogs = self.jobs.planner().catalogs();
        let batch = metadata::schemas(query, catalogs.as_ref()).map_err(arrow_status)?;
        Ok(one_batch(batch))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        metadata_info(&query, &schema, request.into_inner())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let catalogs = self.jobs.planner().catalogs();
        let batch = metadata::tables(query, catalogs.as_ref())
            .await
            .map_err(arrow_status)?;
        Ok(one_batch(batch))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        metadata_info(&query, &schema, request.into_inner())
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let batch = metadata::table_types(query).map_err(arrow_status)?;
        Ok(one_batch(batch))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = self.server_info.schema();
        metadata_info(&query, &schema, request.into_inner())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let batch = query
            .into_builder(&self.server_info)
            .build()
            .map_err(arrow_status)?;
        Ok(one_batch(batch))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_prefixed_headers() {
        let mut headers = MetadataMap::new();
        headers.insert(
            "x-quiver-setting-datafusion.execution.target_partitions",
            "3".parse().expect("value"),
        );
        headers.insert("authorization", "none".parse().expect("value"));
        let settings = settings_from_headers(&headers).expect("settings");
        assert_eq!(
            settings,
            vec![Setting {
                key: "datafusion.execution.target_partitions".into(),
                value: "3".into(),
            }]
        );
    }

    #[test]
    fn a_forged_ticket_is_refused_without_a_panic() {
        for bytes in [&b"garbage"[..], &[0x12, 0x03, 0xff, 0xff, 0xff][..]] {
            let error = decode_result_handle(bytes).expect_err("malformed");
            assert_eq!(error.code(), tonic::Code::InvalidArgument);
        }
    }
}
