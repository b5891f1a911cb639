//! The client side: the CA that server certificates must chain to, the
//! client's own certificate, and two ways to use them with tonic.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::files::{PemFile, TlsError, Watched};

/// Where a client's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// PEM CA certificate(s) the server's certificate must chain to.
    pub ca: PathBuf,
    /// The client's certificate chain and key, presented to servers that
    /// ask (mutual TLS).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The flag prefix, for messages (`upstream-tls`, `metrics-push-tls`).
    pub flags: &'static str,
}

impl ClientTlsFiles {
    /// The files set by `--<flags>-ca`, `--<flags>-cert` and `--<flags>-key`;
    /// `None`: plaintext.
    ///
    /// # Errors
    ///
    /// [`TlsError::Settings`] for a certificate without its key (or the
    /// reverse), or a certificate without a CA to verify the server with.
    pub fn from_flags(
        flags: &'static str,
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Option<Self>, TlsError> {
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert.to_owned(), key.to_owned())),
            (None, None) => None,
            _ => return Err(TlsError::Settings(format!("--{flags}-cert and --{flags}-key go together"))),
        };
        match ca {
            Some(ca) => Ok(Some(Self { ca: ca.to_owned(), identity, flags })),
            None if identity.is_some() => {
                Err(TlsError::Settings(format!("--{flags}-cert needs --{flags}-ca to verify the server with")))
            }
            None => Ok(None),
        }
    }
}

/// What the files hold, parsed.
#[derive(Debug)]
struct Material {
    config: Arc<ClientConfig>,
    ca: Certificate,
    identity: Option<Identity>,
}

/// A client's TLS material, kept current with its files (cheap to clone;
/// clones share it).
#[derive(Debug, Clone)]
pub struct ClientTls {
    watched: Arc<Watched<Material>>,
}

impl ClientTls {
    /// Reads and checks the files.
    ///
    /// # Errors
    ///
    /// A file that cannot be read or parsed, a key that does not match.
    pub fn load(files: &ClientTlsFiles) -> Result<Self, TlsError> {
        let flag = |what: &'static str| -> &'static str {
            match (files.flags, what) {
                ("upstream-tls", "ca") => "--upstream-tls-ca",
                ("upstream-tls", "cert") => "--upstream-tls-cert",
                ("upstream-tls", _) => "--upstream-tls-key",
                (_, "ca") => "--metrics-push-tls-ca",
                (_, "cert") => "--metrics-push-tls-cert",
                _ => "--metrics-push-tls-key",
            }
        };
        let mut pem = vec![PemFile::new(flag("ca"), &files.ca)];
        if let Some((cert, key)) = &files.identity {
            pem.push(PemFile::new(flag("cert"), cert));
            pem.push(PemFile::new(flag("key"), key));
        }
        Ok(Self { watched: Watched::load(pem, build)? })
    }

    /// Re-reads the files every `interval` (in the background, until every
    /// clone is dropped). Must be called inside a Tokio runtime.
    #[must_use]
    pub fn reloading(self, interval: Duration) -> Self {
        self.watched.watch("grpc client", interval);
        self
    }

    /// Re-reads the files now; `Ok(true)` when they changed and are in use.
    ///
    /// # Errors
    ///
    /// As [`ClientTls::load`]; the previous files stay in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        self.watched.reload()
    }

    /// Changes whenever new files are in use (to rebuild endpoints made by
    /// [`ClientTls::endpoint`]).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.watched.changes()
    }

    /// `endpoint` (its URI must be `https://`) with the files as they are
    /// now; the server's certificate must be valid for `server_name` (a DNS
    /// name, or an IP address), whatever address is dialled.
    ///
    /// # Errors
    ///
    /// When tonic refuses the configuration (an invalid server name).
    pub fn endpoint(&self, endpoint: Endpoint, server_name: &str) -> Result<Endpoint, tonic::transport::Error> {
        let material = self.watched.current();
        let mut config = ClientTlsConfig::new()
            .domain_name(server_name)
            .ca_certificate(material.ca.clone())
            .timeout(crate::HANDSHAKE_TIMEOUT);
        if let Some(identity) = &material.identity {
            config = config.identity(identity.clone());
        }
        endpoint.tls_config(config)
    }

    /// A connector for [`Endpoint::connect_with_connector_lazy`] (give the
    /// endpoint an `http://` URI: the connector does the TLS) that reads the
    /// material at every connect, so a long-lived channel follows
    /// rotations. Servers are verified against `server_name`.
    ///
    /// # Errors
    ///
    /// [`TlsError::ServerName`] when `server_name` is not a DNS name or IP.
    pub fn connector(&self, server_name: &str) -> Result<Connector, TlsError> {
        let name =
            ServerName::try_from(server_name.to_owned()).map_err(|_| TlsError::ServerName(server_name.to_owned()))?;
        Ok(Connector { tls: self.clone(), name })
    }
}

fn build(files: &[PemFile], contents: &[Vec<u8>]) -> Result<Material, TlsError> {
    let roots = files[0].roots(&contents[0])?;
    let builder = ClientConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Identity)?
        .with_root_certificates(roots);
    let (mut config, identity) = match (files.get(1), files.get(2)) {
        (Some(cert_file), Some(key_file)) => {
            let certs = cert_file.certs(&contents[1])?;
            let key = key_file.key(&contents[2])?;
            let config = builder.with_client_auth_cert(certs, key).map_err(TlsError::Identity)?;
            (config, Some(Identity::from_pem(&contents[1], &contents[2])))
        }
        _ => (builder.with_no_client_auth(), None),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Material { config: Arc::new(config), ca: Certificate::from_pem(&contents[0]), identity })
}

/// Connects TCP, then TLS with the current material (see
/// [`ClientTls::connector`]).
#[derive(Debug, Clone)]
pub struct Connector {
    tls: ClientTls,
    name: ServerName<'static>,
}

/// A connection made by [`Connector`].
pub type Connection = TokioIo<TlsStream<TcpStream>>;

/// Why [`Connector`] could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the uri {0} has no host and port")]
    Uri(String),
    #[error("cannot connect to {0}")]
    Tcp(String, #[source] std::io::Error),
    #[error("tls handshake with {0} failed")]
    Handshake(String, #[source] std::io::Error),
    #[error("the server at {0} did not negotiate http/2 (alpn h2)")]
    NoH2(String),
}

impl tower::Service<http::Uri> for Connector {
    type Response = Connection;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Connection, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.tls.watched.current().config.clone();
        let name = self.name.clone();
        Box::pin(async move {
            let (Some(host), Some(port)) = (uri.host(), uri.port_u16()) else {
                return Err(ConnectError::Uri(uri.to_string()));
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let address = format!("{host}:{port}");
            let tcp = TcpStream::connect((host, port)).await.map_err(|e| ConnectError::Tcp(address.clone(), e))?;
            let _ = tcp.set_nodelay(true);
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| ConnectError::Handshake(address.clone(), e))?;
            if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(ConnectError::NoH2(address));
            }
            Ok(TokioIo::new(stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_flags_go_together() {
        let p = Path::new("x");
        assert_eq!(ClientTlsFiles::from_flags("upstream-tls", None, None, None).unwrap(), None);
        let error = ClientTlsFiles::from_flags("upstream-tls", None, Some(p), Some(p)).unwrap_err().to_string();
        assert!(error.contains("--upstream-tls-cert needs --upstream-tls-ca"), "{error}");
        let error = ClientTlsFiles::from_flags("upstream-tls", Some(p), Some(p), None).unwrap_err().to_string();
        assert!(error.contains("go together"), "{error}");
        let files = ClientTlsFiles::from_flags("upstream-tls", Some(p), None, None).unwrap().unwrap();
        assert_eq!(files.identity, None);
    }
}
