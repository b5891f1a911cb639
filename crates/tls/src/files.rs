//! Reading PEM files, and keeping what was built from them current.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate, key or CA file that cannot be used, or a setting that
/// cannot work.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("the {what} {path} holds no PEM private key")]
    NoKey {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("the {what} {path} is not a usable CA certificate")]
    BadCa {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the certificate and key do not make a usable identity")]
    Identity(#[source] rustls::Error),
    #[error("cannot verify client certificates with the client CA")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("`{0}` is not a valid TLS server name")]
    ServerName(String),
    #[error("{0}")]
    Settings(String),
}

/// One PEM file and what it is for (named in errors).
#[derive(Debug, Clone)]
pub(crate) struct PemFile {
    pub(crate) what: &'static str,
    pub(crate) path: PathBuf,
}

impl PemFile {
    pub(crate) fn new(what: &'static str, path: &Path) -> Self {
        Self { what, path: path.to_owned() }
    }

    pub(crate) fn read(&self) -> Result<Vec<u8>, TlsError> {
        std::fs::read(&self.path).map_err(|source| TlsError::Read { what: self.what, path: self.path.clone(), source })
    }

    pub(crate) fn certs(&self, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs: Vec<_> = CertificateDer::pem_slice_iter(pem).filter_map(Result::ok).collect();
        if certs.is_empty() {
            return Err(TlsError::NoCertificate { what: self.what, path: self.path.clone() });
        }
        Ok(certs)
    }

    pub(crate) fn key(&self, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(pem).map_err(|source| TlsError::NoKey {
            what: self.what,
            path: self.path.clone(),
            source,
        })
    }

    pub(crate) fn roots(&self, pem: &[u8]) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in self.certs(pem)? {
            roots.add(cert).map_err(|source| TlsError::BadCa { what: self.what, path: self.path.clone(), source })?;
        }
        Ok(roots)
    }
}

/// Builds what a set of files holds from their content.
pub(crate) type Build<T> = fn(&[PemFile], &[Vec<u8>]) -> Result<T, TlsError>;

/// What was built from a set of files, with the files' content it was built
/// from and a generation that counts the changes.
#[derive(Debug)]
pub(crate) struct Watched<T> {
    files: Vec<PemFile>,
    state: RwLock<(Arc<T>, Vec<Vec<u8>>)>,
    generation: tokio::sync::watch::Sender<u64>,
    build: Build<T>,
}

impl<T: Send + Sync + 'static> Watched<T> {
    /// Reads and builds once (a failure here is a start-up failure).
    pub(crate) fn load(files: Vec<PemFile>, build: Build<T>) -> Result<Arc<Self>, TlsError> {
        let contents = files.iter().map(PemFile::read).collect::<Result<Vec<_>, _>>()?;
        let built = build(&files, &contents)?;
        let (generation, _) = tokio::sync::watch::channel(0);
        Ok(Arc::new(Self { files, state: RwLock::new((Arc::new(built), contents)), generation, build }))
    }

    pub(crate) fn current(&self) -> Arc<T> {
        match self.state.read() {
            Ok(state) => state.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        }
    }

    pub(crate) fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Re-reads the files; rebuilds when their content changed. `Ok(true)`
    /// when the new files are in use.
    pub(crate) fn reload(&self) -> Result<bool, TlsError> {
        let contents = self.files.iter().map(PemFile::read).collect::<Result<Vec<_>, _>>()?;
        let unchanged = match self.state.read() {
            Ok(state) => state.1 == contents,
            Err(poisoned) => poisoned.into_inner().1 == contents,
        };
        if unchanged {
            return Ok(false);
        }
        let built = (self.build)(&self.files, &contents)?;
        match self.state.write() {
            Ok(mut state) => *state = (Arc::new(built), contents),
            Err(poisoned) => *poisoned.into_inner() = (Arc::new(built), contents),
        }
        self.generation.send_modify(|g| *g += 1);
        Ok(true)
    }

    /// Re-reads every `interval` until the last strong handle is gone.
    pub(crate) fn watch(self: &Arc<Self>, what: &'static str, interval: Duration) {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(watched) = weak.upgrade() else { return };
                // Small files: reading them blocks for microseconds.
                match tokio::task::spawn_blocking(move || watched.reload()).await {
                    Ok(Ok(true)) => tracing::info!(what, "tls files changed, new connections use them"),
                    Ok(Ok(false)) => {}
                    Ok(Err(error)) => tracing::warn!(
                        what,
                        error = &error as &dyn std::error::Error,
                        "tls files unusable, keeping the previous ones"
                    ),
                    Err(_) => return,
                }
            }
        });
    }
}
