//! The Arrow Flight data plane: `DoGet` with a [`ShuffleTicket`] streams one
//! output partition of a map output held by this executor. Every other Flight
//! call is refused.
//!
//! The ticket only names ids, never a path: ids are validated and the path is
//! derived on this side, so a crafted ticket cannot read outside the work dir.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures::{Stream, TryStreamExt};
use quiver_core::shuffle::LocalOutputs;
use quiver_core::shuffle::fetch::MAX_FLIGHT_MESSAGE_BYTES;
use quiver_core::shuffle::layout::{PartitionRequest, parse_ticket};
use quiver_core::shuffle::serve::segment_flight_data;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

use crate::{Error, Result};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Serves the partitions of this executor's map outputs.
#[derive(Debug, Clone)]
pub struct ShuffleFlightService {
    outputs: Arc<LocalOutputs>,
}

impl ShuffleFlightService {
    pub fn new(outputs: Arc<LocalOutputs>) -> Self {
        Self { outputs }
    }
}

/// Serves the data plane on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    outputs: Arc<LocalOutputs>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let service = ShuffleFlightService::new(outputs);
    tonic::transport::Server::builder()
        .add_service(
            FlightServiceServer::new(service)
                .max_decoding_message_size(MAX_FLIGHT_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_FLIGHT_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(quiver_core::net::incoming(listener), shutdown)
        .await
        .map_err(Error::Flight)
}

fn refused<T>(call: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{call} is not served by a Quiver executor's data plane"
    )))
}

#[tonic::async_trait]
impl FlightService for ShuffleFlightService {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoExchangeStream = BoxStream<FlightData>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let PartitionRequest {
            output: id,
            partition,
        } = parse_ticket(&request.into_inner().ticket)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let outputs = Arc::clone(&self.outputs);
        let segment = tokio::task::spawn_blocking(move || outputs.open_segment(&id, partition))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| match &e {
                quiver_core::Error::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    Status::not_found(e.to_string())
                }
                quiver_core::Error::PartitionOutOfRange { .. } => {
                    Status::invalid_argument(e.to_string())
                }
                _ => Status::internal(e.to_string()),
            })?;
        // The stored IPC messages go out as they are: the reader decodes them.
        let stream = segment_flight_data(segment).map_err(|e| match e {
            quiver_core::Error::CorruptShuffleData(_) => Status::data_loss(e.to_string()),
            _ => Status::internal(e.to_string()),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        refused("Handshake")
    }

    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        refused("ListFlights")
    }

    async fn get_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        refused("GetFlightInfo")
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        refused("PollFlightInfo")
    }

    async fn get_schema(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        refused("GetSchema")
    }

    async fn do_put(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        refused("DoPut")
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        refused("DoExchange")
    }

    async fn do_action(
        &self,
        _request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        refused("DoAction")
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        refused("ListActions")
    }
}
