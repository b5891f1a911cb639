//! Accepting connections the way every Shoal server should: with Nagle's
//! algorithm off, and counted.
//!
//! Servers bind their own listeners (so tests can use port 0), and then
//! neither tonic nor axum sets `TCP_NODELAY`: small responses written in
//! pieces (HTTP/2 headers, data, trailers) would wait for the peer's delayed
//! ACK, 40 ms on Linux. Every accepted connection is also counted in a
//! [`Connections`] while it is open: the drain uses the count to end the
//! drain delay early when no client holds a connection (see
//! [`crate::drain`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;

fn nodelay(stream: &TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
}

/// The number of open connections of one listener (shared, cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct Connections(Arc<Count>);

#[derive(Debug, Default)]
struct Count {
    open: AtomicUsize,
    closed: Notify,
    /// When the count last fell to zero (tokio's clock, so paused tests can
    /// drive it).
    last_closed: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Connections {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.0.open.load(Ordering::SeqCst)
    }

    /// Resolves once no connection is open (at once if none is).
    pub async fn none_open(&self) {
        loop {
            let closed = self.0.closed.notified();
            if self.open() == 0 {
                return;
            }
            closed.await;
        }
    }

    /// Resolves once no connection has been open for `window` (at once if
    /// none ever was): a client that opens a connection per request, or
    /// reconnects after a `Connection: close`, keeps this from resolving
    /// while it still routes here.
    pub async fn quiet_for(&self, window: Duration) {
        loop {
            self.none_open().await;
            let since = self.last_closed().map_or(window, |at| at.elapsed());
            if since >= window && self.open() == 0 {
                return;
            }
            tokio::time::sleep(window.saturating_sub(since)).await;
        }
    }

    fn last_closed(&self) -> Option<tokio::time::Instant> {
        *self.0.last_closed.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one connection until the guard is dropped.
    pub fn track(&self) -> Tracked {
        self.0.open.fetch_add(1, Ordering::SeqCst);
        Tracked(self.clone())
    }
}

/// One open connection in a [`Connections`]; dropping it closes the count.
#[derive(Debug)]
pub struct Tracked(Connections);

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.0.0.last_closed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(tokio::time::Instant::now());
            self.0.0.closed.notify_waiters();
        }
    }
}

pin_project_lite::pin_project! {
    /// An accepted TCP stream, counted while it is open.
    #[derive(Debug)]
    pub struct CountedStream {
        #[pin]
        stream: TcpStream,
        _tracked: Tracked,
    }
}

impl CountedStream {
    fn new(stream: TcpStream, connections: &Connections) -> Self {
        nodelay(&stream);
        Self { stream, _tracked: connections.track() }
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for CountedStream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// The accepted connections of `listener`, counted in `connections`, for
/// tonic's `serve_with_incoming_shutdown`.
pub fn incoming(
    listener: TcpListener,
    connections: Connections,
) -> impl tokio_stream::Stream<Item = io::Result<CountedStream>> {
    TcpListenerStream::new(listener)
        .map(move |accepted| accepted.map(|stream| CountedStream::new(stream, &connections)))
}

/// `listener` for `axum::serve`, its connections counted in `connections`.
#[derive(Debug)]
pub struct HttpListener {
    listener: TcpListener,
    connections: Connections,
}

/// `listener` for `axum::serve`, its connections counted in `connections`.
pub fn http_listener(listener: TcpListener, connections: Connections) -> HttpListener {
    HttpListener { listener, connections }
}

impl axum::serve::Listener for HttpListener {
    type Io = CountedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => return (CountedStream::new(stream, &self.connections), addr),
                Err(error) => {
                    // As axum's own listener: per-connection errors (the peer
                    // went away, too many open files) are not fatal.
                    tracing::debug!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind the {listener} listener on {addr}")]
pub struct BindError {
    /// Which listener (`grpc`, `http`, `admin`).
    pub listener: &'static str,
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// Binds the `listener` listener on `addr` (port 0 picks a free port).
///
/// # Errors
///
/// [`BindError`] when the address is taken or not allowed.
pub async fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError { listener, addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_are_counted_while_open() {
        let connections = Connections::new();
        connections.none_open().await;
        let listener = bind("test", SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = Box::pin(incoming(listener, connections.clone()));
        let client = TcpStream::connect(addr).await.unwrap();
        let server = accepted.next().await.unwrap().unwrap();
        assert_eq!(connections.open(), 1);
        drop(client);
        let waiter = tokio::spawn({
            let connections = connections.clone();
            async move { connections.none_open().await }
        });
        drop(server);
        waiter.await.unwrap();
        assert_eq!(connections.open(), 0);
    }
}
