//! A TCP proxy in front of Redis that loses one reply on the wire: armed
//! with a marker, it forwards the first client chunk containing the marker
//! to Redis (which runs it), discards whatever Redis answers, and closes the
//! connection. Every other byte passes through.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Default)]
struct Shared {
    marker: Mutex<Option<Vec<u8>>>,
    dropped: AtomicUsize,
    /// A partition: nothing passes either way (connections stay open).
    cut: AtomicBool,
}

/// The running proxy; dropped → stopped.
pub struct ReplyDropper {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for ReplyDropper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ReplyDropper {
    /// A proxy on 127.0.0.1:0 to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared::default());
        let accept = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let shared = accept.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        relay(client, server, shared).await;
                    }
                });
            }
        });
        Self { addr, shared, task }
    }

    /// `redis://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Loses the reply to the next request that contains `marker`.
    pub fn drop_reply_to(&self, marker: &str) {
        *self.shared.marker.lock().expect("marker lock") = Some(marker.as_bytes().to_vec());
    }

    /// Partitions the client from Redis: every byte is dropped, both ways.
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
    }

    /// How many replies were lost so far.
    pub fn dropped(&self) -> usize {
        self.shared.dropped.load(Ordering::SeqCst)
    }
}

async fn relay(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mute = Arc::new(AtomicBool::new(false));
    let muted = mute.clone();
    let partitioned = shared.clone();
    let down = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if muted.load(Ordering::SeqCst) || partitioned.cut.load(Ordering::SeqCst) {
                continue;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if shared.cut.load(Ordering::SeqCst) {
            continue;
        }
        let hit = {
            let mut marker = shared.marker.lock().expect("marker lock");
            let found = marker.as_ref().is_some_and(|m| buf[..n].windows(m.len()).any(|w| w == m.as_slice()));
            if found {
                *marker = None;
            }
            found
        };
        if hit {
            // Redis runs the request; its answer never reaches the client.
            mute.store(true, Ordering::SeqCst);
            let _ = server_write.write_all(&buf[..n]).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            shared.dropped.fetch_add(1, Ordering::SeqCst);
            break;
        }
        if server_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    down.abort();
}
