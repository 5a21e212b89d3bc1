//! Serving gRPC on a socket that the caller bound.

use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Endpoint;
use tonic::transport::server::TcpIncoming;

/// Connections accepted on `listener`, with Nagle's algorithm off.
///
/// tonic applies its own `tcp_nodelay` setting only to sockets it binds itself;
/// with Nagle on, every small request waits for the peer's delayed ACK, which
/// cost about 40 ms per call on loopback.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Client settings of every Quiver connection: Nagle off, a connect timeout,
/// and HTTP/2 keepalives, so that a frozen peer (paused, or cut off without a
/// reset) fails the calls in flight within seconds instead of never.
pub fn tune_endpoint(endpoint: Endpoint) -> Endpoint {
    endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
}
