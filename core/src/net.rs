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

/// How many bytes one HTTP/2 stream may receive before its reader takes them.
const STREAM_WINDOW_BYTES: u32 = 2 * 1024 * 1024;

/// How many bytes all streams of a connection together may receive before
/// their readers take them. Many shuffle streams share one connection, and a
/// stream whose reader is busy elsewhere holds up to a stream window of this;
/// were it not a large multiple of that, a few such streams would stall every
/// other stream of the connection, the one their reader waits on included.
const CONNECTION_WINDOW_BYTES: u32 = 32 * STREAM_WINDOW_BYTES;

/// Client settings of every Quiver connection: Nagle off, a connect timeout,
/// flow-control windows for many streams per connection, and HTTP/2
/// keepalives, so that a frozen peer (paused, or cut off without a reset)
/// fails the calls in flight within seconds instead of never.
pub fn tune_endpoint(endpoint: Endpoint) -> Endpoint {
    endpoint
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
}
