//! Serving gRPC on a socket that the caller bound.

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

/// Connections accepted on `listener`, with Nagle's algorithm off.
///
/// tonic applies its own `tcp_nodelay` setting only to sockets it binds itself;
/// with Nagle on, every small request waits for the peer's delayed ACK, which
/// cost about 40 ms per call on loopback.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}
