//! TLS on the gRPC port (`--tls-cert-file`, `--tls-key-file`), for istiod's
//! `configSources[].tlsSettings: {mode: SIMPLE}` (Istio 1.26+).
//!
//! The pair is re-read every [`RELOAD_INTERVAL`]; a change is taken once two
//! reads in a row agree (cert-manager and kubelet replace both files, not always
//! at the same instant), so new connections get the new certificate. A new pair
//! that does not load (unparsable, or key and certificate do not match) is
//! logged once and counted, and the last good pair stays in use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tracing::{error, info};

use crate::metrics::OutcomeLabels;

/// How often the certificate and key files are compared with what is served.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// A TLS handshake that takes longer is dropped (its socket closed).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {flag} {path}: {source}")]
    Read { flag: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{flag} {path}: {message}")]
    Parse { flag: &'static str, path: PathBuf, message: String },
    #[error("--tls-cert-file {cert} and --tls-key-file {key} do not go together: {message}")]
    Mismatch { cert: PathBuf, key: PathBuf, message: String },
}

/// Where the pair lives.
#[derive(Debug, Clone)]
pub struct Files {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The bytes of both files, as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl Files {
    fn read(&self) -> Result<Contents, Error> {
        let read = |flag, path: &Path| {
            std::fs::read(path).map_err(|source| Error::Read { flag, path: path.to_owned(), source })
        };
        Ok(Contents { cert: read("--tls-cert-file", &self.cert)?, key: read("--tls-key-file", &self.key)? })
    }

    /// Parses a pair: a PEM certificate chain (leaf first) and a PEM private key that matches it.
    fn parse(&self, contents: &Contents) -> Result<CertifiedKey, Error> {
        let parse_error =
            |flag, path: &Path, message: String| Error::Parse { flag, path: path.to_owned(), message };
        let chain = CertificateDer::pem_slice_iter(&contents.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| parse_error("--tls-cert-file", &self.cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(parse_error("--tls-cert-file", &self.cert, "no PEM CERTIFICATE in it".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(&contents.key)
            .map_err(|e| parse_error("--tls-key-file", &self.key, e.to_string()))?;
        CertifiedKey::from_der(chain, key, &provider()).map_err(|e| Error::Mismatch {
            cert: self.cert.clone(),
            key: self.key.clone(),
            message: e.to_string(),
        })
    }
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The pair in use; new handshakes read it.
#[derive(Debug)]
pub struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// A loaded pair: the acceptor for the listener and the state its reloader starts from.
pub struct Loaded {
    pub acceptor: tokio_rustls::TlsAcceptor,
    current: Arc<Current>,
    served: Contents,
}

/// Loads the pair at start; an error here stops the start with a clear message.
pub fn load(files: &Files) -> Result<Loaded, Error> {
    let served = files.read()?;
    let key = files.parse(&served)?;
    let current = Arc::new(Current(RwLock::new(Arc::new(key))));
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            message: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(current.clone());
    // gRPC clients (grpc-go in istiod among them) insist on ALPN h2.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)), current, served })
}

impl Loaded {
    /// The task that re-reads the pair until `shutdown` (see the module documentation),
    /// counting reloads in `reloads` by outcome (`success`, `error`).
    pub fn watch_files(
        &self,
        files: Files,
        reloads: Family<OutcomeLabels, Counter>,
        shutdown: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        watch_files(files, self.current.clone(), self.served.clone(), reloads, shutdown)
    }
}

async fn watch_files(
    files: Files,
    current: Arc<Current>,
    mut served: Contents,
    reloads: Family<OutcomeLabels, Counter>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut candidate: Option<Contents> = None;
    let mut failed: Option<Contents> = None;
    let mut ticker = tokio::time::interval(RELOAD_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait_for(|d| *d) => return,
        }
        // Unreadable for a moment (a file being replaced): try again at the next tick.
        let Ok(contents) = files.read() else { continue };
        if contents == served || failed.as_ref() == Some(&contents) {
            candidate = None;
            continue;
        }
        if candidate.as_ref() != Some(&contents) {
            candidate = Some(contents);
            continue;
        }
        candidate = None;
        match files.parse(&contents) {
            Ok(key) => {
                *current.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
                info!(cert = %files.cert.display(), "TLS certificate reloaded; new connections use it");
                reloads.get_or_create(&OutcomeLabels { outcome: "success" }).inc();
                served = contents;
                failed = None;
            }
            Err(e) => {
                error!(error = %e, "new TLS certificate or key rejected; still serving the previous pair");
                reloads.get_or_create(&OutcomeLabels { outcome: "error" }).inc();
                failed = Some(contents);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_and_unparsable_files_name_their_flag() {
        let dir = std::env::temp_dir().join(format!("cloudmap-xds-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = Files { cert: dir.join("absent.crt"), key: dir.join("absent.key") };
        let err = load(&files).err().unwrap().to_string();
        assert!(err.starts_with("cannot read --tls-cert-file "), "{err}");
        std::fs::write(dir.join("bad.crt"), "not a certificate").unwrap();
        std::fs::write(dir.join("bad.key"), "not a key").unwrap();
        let files = Files { cert: dir.join("bad.crt"), key: dir.join("bad.key") };
        let err = load(&files).err().unwrap().to_string();
        assert!(err.contains("--tls-cert-file") && err.contains("no PEM CERTIFICATE"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
