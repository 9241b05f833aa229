//! `--peer-bootstrap` and how peers are dialled.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use super::checked;
use crate::bootstrap::{self, Peers, Target, Tls};

#[derive(Debug, Clone, Args, Serialize)]
pub struct PeerArgs {
    /// Until its own first complete sync, serve the ServiceEntries of a Ready peer replica reached at
    /// HOST:PORT (comma-separated for several; each name resolves to every address, each is tried, this
    /// process itself is skipped), marked as borrowed. In Kubernetes: the headless Service,
    /// `cloudmap-xds-peers.<namespace>.svc:15099`. Off when unset.
    #[arg(long, env = "CLOUDMAP_XDS_PEER_BOOTSTRAP", value_delimiter = ',', value_parser = checked(Target::parse))]
    pub peer_bootstrap: Vec<String>,

    /// PEM CA certificate(s) that signed the peers' gRPC certificates; required with --peer-bootstrap when the
    /// gRPC port uses TLS (--tls-cert-file): peers are then dialled over TLS.
    #[arg(long, env = "CLOUDMAP_XDS_PEER_CA_FILE")]
    pub peer_ca_file: Option<PathBuf>,

    /// The name each peer's certificate must be valid for [default: the host of the --peer-bootstrap target].
    #[arg(long, env = "CLOUDMAP_XDS_PEER_SERVER_NAME")]
    pub peer_server_name: Option<String>,
}

impl PeerArgs {
    /// Whom the bootstrap dials, and how, or `None` when `--peer-bootstrap` is unset. `tls_on`:
    /// whether our gRPC port (hence every peer's) uses TLS.
    pub fn peers(&self, tls_on: bool) -> Result<Option<Peers>, bootstrap::Error> {
        let targets: Vec<Target> = self.peer_bootstrap.iter().filter_map(|t| Target::parse(t).ok()).collect();
        if targets.is_empty() {
            return Ok(None);
        }
        let tls = Tls::load(tls_on, self.peer_ca_file.as_deref(), self.peer_server_name.clone())?;
        Ok(Some(Peers { targets, tls }))
    }
}
