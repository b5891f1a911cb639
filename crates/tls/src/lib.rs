//! Mutual TLS for the gRPC hops between Shoal's services, with certificates
//! from files that are re-read while serving (cert-manager rotates them in
//! place; compose generates them once).
//!
//! - [`ServerTls`]: a server's certificate and key, and the CA its clients'
//!   certificates must chain to (then a client without one is refused in
//!   the handshake); [`accept`] turns accepted TCP connections into TLS
//!   streams for tonic, handshaking concurrently under a bound and a
//!   deadline.
//! - [`ClientTls`]: the CA a client trusts and its own certificate and key;
//!   [`ClientTls::endpoint`] configures a tonic [`Endpoint`] from the files
//!   as they are now (balanced channels, rebuilt on [`ClientTls::changes`]),
//!   [`ClientTls::connector`] connects with the files as they are at each
//!   connect (single channels).
//! - [`ServerTlsArgs`] and [`ClientTlsFiles::from_flags`]: the settings and
//!   their cross-field rules.
//!
//! Files are re-read every [`RELOAD_INTERVAL`] (by content, so the symlink
//! swap of a Kubernetes Secret volume is seen); a new set that does not parse
//! is logged and the previous one stays in use. Connections already open keep
//! the certificate they were made with; new ones use the new files.
//!
//! Only `ring` is used as the crypto provider (no aws-lc, no cmake).

mod client;
mod files;
mod server;

use std::time::Duration;

pub use client::{ClientTls, ClientTlsFiles, Connector};
pub use files::TlsError;
pub use server::{ServerTls, ServerTlsArgs, ServerTlsFiles, accept};
pub use tonic::transport::Endpoint;

/// How often certificate files are re-read in the services.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// Longest a TLS handshake may take before the connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// How a server's gRPC listener is protected, for its `listening` log line:
/// `off` (plaintext), `server` (TLS, any client), `mutual` (TLS, clients
/// need a certificate). `mutual` is [`ServerTls::is_mutual`] when TLS is on.
pub fn mode(mutual: Option<bool>) -> &'static str {
    match mutual {
        None => "off",
        Some(false) => "server",
        Some(true) => "mutual",
    }
}

/// Checks that `name` can be verified against a certificate (a DNS name or
/// an IP address).
///
/// # Errors
///
/// [`TlsError::ServerName`] naming it.
pub fn check_server_name(name: &str) -> Result<(), TlsError> {
    rustls_pki_types::ServerName::try_from(name).map(|_| ()).map_err(|_| TlsError::ServerName(name.to_owned()))
}
