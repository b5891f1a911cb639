//! Accepting connections the way every Shoal server should: with Nagle's
//! algorithm off. Servers bind their own listeners (so tests can use port 0),
//! and then neither tonic nor axum sets `TCP_NODELAY`: small responses written
//! in pieces (HTTP/2 headers, data, trailers) would wait for the peer's
//! delayed ACK, 40 ms on Linux.

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;

fn nodelay(stream: &TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
}

/// The accepted connections of `listener`, for tonic's
/// `serve_with_incoming_shutdown`.
pub fn incoming(listener: TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<TcpStream>> {
    TcpListenerStream::new(listener).map(|accepted| {
        if let Ok(stream) = &accepted {
            nodelay(stream);
        }
        accepted
    })
}

/// `listener` for `axum::serve`.
pub fn http_listener(listener: TcpListener) -> impl axum::serve::Listener<Io = TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt as _;
    listener.tap_io(|stream: &mut TcpStream| nodelay(stream))
}

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind the {listener} listener on {addr}")]
pub struct BindError {
    /// Which listener (`grpc`, `http`, `admin`).
    pub listener: &'static str,
    pub addr: std::net::SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the `listener` listener on `addr` (port 0 picks a free port).
///
/// # Errors
///
/// [`BindError`] when the address is taken or not allowed.
pub async fn bind(listener: &'static str, addr: std::net::SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError { listener, addr, source })
}
