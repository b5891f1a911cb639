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
