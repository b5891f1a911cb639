//! The server side: a reloading certificate, client-certificate
//! verification, and the accept loop that hands TLS streams to tonic.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::files::{PemFile, TlsError, Watched};

/// Most TLS handshakes in progress at once on one listener; at the bound the
/// server stops accepting (new connections wait in the kernel's backlog)
/// until one ends.
pub const MAX_HANDSHAKES: usize = 256;
/// Handshaken connections waiting for tonic to take them.
const READY_QUEUE: usize = 64;

/// The TLS settings of a gRPC server, from flags or the environment.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// PEM certificate chain of the gRPC listener. Set with
    /// `--grpc-tls-key` to serve TLS; unset: plaintext (local development).
    /// Re-read every 5 s: a rotated certificate is used for new connections.
    #[arg(long = "grpc-tls-cert", env = "SHOAL_GRPC_TLS_CERT")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// PEM private key of `--grpc-tls-cert` (PKCS#8, PKCS#1 or SEC1).
    #[arg(long = "grpc-tls-key", env = "SHOAL_GRPC_TLS_KEY")]
    pub grpc_tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) that clients' certificates must chain to: with
    /// it, a client without a valid certificate is refused in the TLS
    /// handshake (mutual TLS). Needs `--grpc-tls-cert`.
    #[arg(long = "grpc-tls-client-ca", env = "SHOAL_GRPC_TLS_CLIENT_CA")]
    pub grpc_tls_client_ca: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// The files to serve TLS with; `None`: plaintext.
    ///
    /// # Errors
    ///
    /// [`TlsError::Settings`] for a certificate without its key (or the
    /// reverse), or a client CA without a certificate.
    pub fn files(&self) -> Result<Option<ServerTlsFiles>, TlsError> {
        match (&self.grpc_tls_cert, &self.grpc_tls_key) {
            (Some(cert), Some(key)) => Ok(Some(ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.grpc_tls_client_ca.clone(),
            })),
            (None, None) if self.grpc_tls_client_ca.is_some() => Err(TlsError::Settings(
                "--grpc-tls-client-ca (SHOAL_GRPC_TLS_CLIENT_CA) needs --grpc-tls-cert and --grpc-tls-key".into(),
            )),
            (None, None) => Ok(None),
            _ => Err(TlsError::Settings(
                "--grpc-tls-cert (SHOAL_GRPC_TLS_CERT) and --grpc-tls-key (SHOAL_GRPC_TLS_KEY) go together".into(),
            )),
        }
    }
}

/// Where a server's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set: clients must present a certificate chaining to it.
    pub client_ca: Option<PathBuf>,
}

/// A server's TLS configuration, kept current with its files (cheap to
/// clone; clones share it).
#[derive(Debug, Clone)]
pub struct ServerTls {
    watched: Arc<Watched<ServerConfig>>,
    mutual: bool,
}

impl ServerTls {
    /// Reads and checks the files.
    ///
    /// # Errors
    ///
    /// A file that cannot be read or parsed, a key that does not match.
    pub fn load(files: &ServerTlsFiles) -> Result<Self, TlsError> {
        let mut pem = vec![PemFile::new("--grpc-tls-cert", &files.cert), PemFile::new("--grpc-tls-key", &files.key)];
        if let Some(ca) = &files.client_ca {
            pem.push(PemFile::new("--grpc-tls-client-ca", ca));
        }
        Ok(Self { watched: Watched::load(pem, build)?, mutual: files.client_ca.is_some() })
    }

    /// Re-reads the files every `interval` (in the background, until every
    /// clone is dropped). Must be called inside a Tokio runtime.
    #[must_use]
    pub fn reloading(self, interval: Duration) -> Self {
        self.watched.watch("grpc server", interval);
        self
    }

    /// Re-reads the files now; `Ok(true)` when they changed and are in use.
    ///
    /// # Errors
    ///
    /// As [`ServerTls::load`]; the previous files stay in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        self.watched.reload()
    }

    /// Whether clients must present a certificate.
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }

    /// The rustls configuration as of now.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.watched.current()
    }
}

fn build(files: &[PemFile], contents: &[Vec<u8>]) -> Result<ServerConfig, TlsError> {
    let certs = files[0].certs(&contents[0])?;
    let key = files[1].key(&contents[1])?;
    let builder = ServerConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Identity)?;
    let builder = match (files.get(2), contents.get(2)) {
        (Some(file), Some(pem)) => {
            let roots = file.roots(pem)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crate::provider())
                .build()
                .map_err(TlsError::Verifier)?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(TlsError::Identity)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The TLS streams of the connections `incoming` accepts, for tonic's
/// `serve_with_incoming*`. Handshakes run concurrently (at most
/// [`MAX_HANDSHAKES`], each bounded by [`crate::HANDSHAKE_TIMEOUT`]) with the
/// configuration current at each accept; a failed handshake (a plaintext
/// client, no client certificate, one from another CA) closes that
/// connection and is logged with the peer's address. Ends when `incoming`
/// does; dropping the stream stops the accept loop.
pub fn accept<S, IO, E>(tls: ServerTls, incoming: S) -> TlsIncoming<IO>
where
    S: Stream<Item = Result<IO, E>> + Send + 'static,
    E: std::fmt::Display + Send,
    IO: AsyncRead + AsyncWrite + Connected<ConnectInfo = TcpConnectInfo> + Unpin + Send + 'static,
{
    let (ready, receiver) = mpsc::channel(READY_QUEUE);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let task = tokio::spawn(async move {
        let mut incoming = std::pin::pin!(incoming);
        while let Some(accepted) = incoming.next().await {
            let io = match accepted {
                Ok(io) => io,
                Err(error) => {
                    tracing::debug!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let ready = ready.clone();
            let mutual = tls.mutual;
            tokio::spawn(async move {
                let peer = io.connect_info().remote_addr();
                let outcome = tokio::time::timeout(crate::HANDSHAKE_TIMEOUT, acceptor.accept(io)).await;
                drop(permit);
                match outcome {
                    Ok(Ok(stream)) => {
                        let _ = ready.send(stream).await;
                    }
                    Ok(Err(error)) => {
                        tracing::info!(peer = ?peer, mutual, %error, "tls handshake refused");
                    }
                    Err(_) => tracing::info!(peer = ?peer, "tls handshake timed out"),
                }
            });
        }
    });
    TlsIncoming { receiver, task }
}

/// The handshaken connections of [`accept`].
#[derive(Debug)]
pub struct TlsIncoming<IO> {
    receiver: mpsc::Receiver<TlsStream<IO>>,
    task: JoinHandle<()>,
}

impl<IO> Stream for TlsIncoming<IO> {
    type Item = io::Result<TlsStream<IO>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.receiver.poll_recv(cx).map(|next| next.map(Ok))
    }
}

impl<IO> Drop for TlsIncoming<IO> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_and_key_go_together() {
        let args = ServerTlsArgs { grpc_tls_cert: Some("c".into()), ..ServerTlsArgs::default() };
        assert!(args.files().unwrap_err().to_string().contains("go together"));
        let args = ServerTlsArgs { grpc_tls_client_ca: Some("ca".into()), ..ServerTlsArgs::default() };
        assert!(args.files().unwrap_err().to_string().contains("needs --grpc-tls-cert"));
        assert_eq!(ServerTlsArgs::default().files().unwrap(), None);
        let args = ServerTlsArgs {
            grpc_tls_cert: Some("c".into()),
            grpc_tls_key: Some("k".into()),
            grpc_tls_client_ca: Some("ca".into()),
        };
        assert_eq!(args.files().unwrap().unwrap().client_ca, Some(PathBuf::from("ca")));
    }

    #[test]
    fn missing_files_are_named() {
        let files =
            ServerTlsFiles { cert: "/nonexistent/c.pem".into(), key: "/nonexistent/k.pem".into(), client_ca: None };
        let error = ServerTls::load(&files).unwrap_err().to_string();
        assert!(error.contains("--grpc-tls-cert /nonexistent/c.pem"), "{error}");
    }
}
