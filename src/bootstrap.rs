//! Peer bootstrap (`--peer-bootstrap`): until its own first complete sync, a
//! replica serves the full ServiceEntry set of a Ready peer replica.
//!
//! Why: istiod exits at start when a config source cannot be reached, and a
//! replica is Ready (behind the Service istiod dials) only with a complete set.
//! During an AWS outage, replicas restarted one by one would each wait for a sync
//! that cannot happen, the Service would run out of endpoints, and the next
//! istiod restart would leave the mesh without a control plane.
//!
//! How: every target name resolves to every address. Each address is asked for
//! its status (the debug service's `GetStatus`, on the same gRPC port); this very
//! process (same instance id), a replica serving nothing complete (neither synced
//! nor borrowing) and one serving no ServiceEntries are skipped. The others are
//! tried, those serving their own sync first: a ServiceEntry stream over our own
//! ADS, whose first response becomes the served set, byte for byte (same names,
//! versions and create times, hence the same snapshot version), marked as
//! borrowed. The stream is followed: the peer's later pushes replace the borrowed
//! set. When it ends, peers are tried again. A replica serving a borrowed set is
//! Ready and can itself be borrowed from. It all stops at the replica's own first
//! complete sync, which always wins (an identical set changes nothing for istiod).
//!
//! No copy is kept on disk: see the README ("Peer bootstrap") for why.

mod peer;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::metrics::{Metrics, OutcomeLabels};
use crate::proto::cloudmap_xds::debug::v1::GetStatusResponse;
use crate::proto::envoy::service::discovery::v3::DiscoveryResponse;
use crate::snapshot::{self, Borrowed, DecodeError, Publisher, Snapshot};
use crate::supervise;

/// Between two rounds of trying every peer, while nothing was borrowed or the followed stream ended.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// TCP connect (and TLS handshake) to one peer address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The peer's `GetStatus` answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// The peer's first ServiceEntry response: it is sent at once by a Ready peer; a
/// full set of 10,000 services encodes to about 20 MB.
const FIRST_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// The ServiceEntry type asked for (every replica serves it).
const SERVICE_ENTRY_TYPE_URL: &str = crate::xds::SERVICE_ENTRY_TYPE_URLS[0];
/// Prefix of the node id a bootstrapping replica gives its peer (shown by `ListClients`).
pub const PEER_NODE_PREFIX: &str = "cloudmap-xds-peer~";

/// `metrics` outcome labels of one attempt at one peer address.
pub mod outcomes {
    /// The set was taken (counted once per followed stream).
    pub const BORROWED: &str = "borrowed";
    /// The address is this very process.
    pub const SELF: &str = "self";
    /// Neither synced nor serving a borrowed set.
    pub const NOT_READY: &str = "not_ready";
    /// Ready, but serving no ServiceEntries.
    pub const EMPTY: &str = "empty";
    /// No connection, or no status answer.
    pub const UNREACHABLE: &str = "unreachable";
    /// The stream failed or its content was refused (another publish namespace, undecodable).
    pub const FAILED: &str = "failed";
    /// A target name that resolved to no address.
    pub const UNRESOLVED: &str = "unresolved";
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--peer-bootstrap with TLS on the gRPC port (--tls-cert-file) needs --peer-ca-file, the CA that \
         signed the peers' certificates"
    )]
    CaFileRequired,
    #[error(
        "--peer-ca-file is set but the gRPC port has no TLS (--tls-cert-file): peers are dialled in plaintext"
    )]
    CaFileWithoutTls,
    #[error("cannot read --peer-ca-file {path}: {source}")]
    ReadCa { path: PathBuf, source: std::io::Error },
    #[error("--peer-ca-file {path}: no PEM CERTIFICATE in it")]
    NoCa { path: PathBuf },
}

/// Why a peer's response is not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the peer serves no ServiceEntries")]
    Empty,
    #[error("response of type {0:?}, not the ServiceEntries asked for")]
    Type(String),
    #[error("resource {index}: {error}")]
    Decode { index: usize, error: DecodeError },
    #[error(
        "the peer publishes {name:?}, outside this replica's publish namespace {namespace:?} \
         (--publish-namespace must be the same on every replica)"
    )]
    Namespace { name: String, namespace: String },
}

/// One `--peer-bootstrap` value: a name (or IP) and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl Target {
    /// `HOST:PORT`, `IP:PORT` or `[IPv6]:PORT`.
    pub fn parse(s: &str) -> Result<Target, String> {
        let s = s.trim();
        let error = || format!("{s:?} is not HOST:PORT (e.g. cloudmap-xds-peers.istio-system.svc:15099)");
        let (host, port) = s.rsplit_once(':').ok_or_else(error)?;
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.strip_suffix(']').ok_or_else(error)?,
            None if host.contains(':') => return Err(error()),
            None => host,
        };
        let port = port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(error)?;
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(error());
        }
        Ok(Target { host: host.to_owned(), port })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// TLS to the peers: the CA that signed their certificates, and the name to check.
#[derive(Debug, Clone)]
pub struct Tls {
    pub ca_pem: Vec<u8>,
    /// Checked against each peer's certificate; else the target's host.
    pub server_name: Option<String>,
}

impl Tls {
    /// Reads the CA file; `tls_on` says whether the gRPC port (hence every peer's) uses TLS.
    pub fn load(
        tls_on: bool,
        ca_file: Option<&Path>,
        server_name: Option<String>,
    ) -> Result<Option<Tls>, Error> {
        match (tls_on, ca_file) {
            (false, None) => Ok(None),
            (false, Some(_)) => Err(Error::CaFileWithoutTls),
            (true, None) => Err(Error::CaFileRequired),
            (true, Some(path)) => {
                let ca_pem =
                    std::fs::read(path).map_err(|source| Error::ReadCa { path: path.to_owned(), source })?;
                if !String::from_utf8_lossy(&ca_pem).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(Error::NoCa { path: path.to_owned() });
                }
                Ok(Some(Tls { ca_pem, server_name }))
            }
        }
    }
}

/// Whom to borrow from and how to dial them (`--peer-bootstrap`, `--peer-ca-file`).
#[derive(Debug, Clone)]
pub struct Peers {
    pub targets: Vec<Target>,
    pub tls: Option<Tls>,
}

/// Everything the bootstrap task needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub peers: Peers,
    /// This process ([`instance_id`]).
    pub instance_id: String,
    /// Every borrowed name must be in it (`<namespace>/...`).
    pub publish_namespace: String,
    /// Largest response accepted from a peer (`--max-response-size`, the most a peer sends).
    pub max_response_size: usize,
    pub retry_interval: Duration,
}

/// A name for this process, unique among replicas: the host name (the pod name in
/// Kubernetes) and 64 random bits (a restarted container keeps its pod name).
pub fn instance_id() -> String {
    let host =
        std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "cloudmap-xds".into());
    format!("{host}-{:016x}", fastrand::u64(..))
}

/// What a peer's status says about borrowing from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Serves its own complete sync: the best source.
    Synced,
    /// Serves a set it borrowed itself: fine when no synced peer answers.
    Relaying,
    Itself,
    NotReady,
    Empty,
}

impl Verdict {
    pub fn of(status: &GetStatusResponse, own_instance: &str) -> Verdict {
        if status.instance_id == own_instance {
            Verdict::Itself
        } else if !status.synced && !status.borrowed {
            Verdict::NotReady
        } else if status.service_entries == 0 {
            Verdict::Empty
        } else if status.synced {
            Verdict::Synced
        } else {
            Verdict::Relaying
        }
    }

    fn outcome(self) -> Option<&'static str> {
        match self {
            Verdict::Synced | Verdict::Relaying => None,
            Verdict::Itself => Some(outcomes::SELF),
            Verdict::NotReady => Some(outcomes::NOT_READY),
            Verdict::Empty => Some(outcomes::EMPTY),
        }
    }
}

/// A peer's ServiceEntry response as a borrowed snapshot, or why it is not served.
pub fn borrowed_snapshot(
    response: DiscoveryResponse,
    publish_namespace: &str,
    from: Borrowed,
) -> Result<Snapshot, Refusal> {
    if !crate::xds::is_service_entry(&response.type_url) {
        return Err(Refusal::Type(response.type_url));
    }
    if response.resources.is_empty() {
        return Err(Refusal::Empty);
    }
    let prefix = format!("{publish_namespace}/");
    let resources = response
        .resources
        .into_iter()
        .enumerate()
        .map(|(index, any)| {
            let resource =
                snapshot::decode_resource(any).map_err(|error| Refusal::Decode { index, error })?;
            if !resource.name.starts_with(&prefix) {
                return Err(Refusal::Namespace {
                    name: resource.name,
                    namespace: publish_namespace.to_owned(),
                });
            }
            Ok(resource)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Snapshot::borrowed(resources, from))
}

/// The bootstrap task: tries peers until this replica's own first complete sync
/// is served, then waits for the drain (a supervised task must not end early).
pub async fn run(
    settings: Settings,
    publisher: Publisher,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    info!(
        targets = %settings.peers.targets.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        tls = settings.peers.tls.is_some(),
        instance = %settings.instance_id,
        "peer bootstrap: borrowing a Ready peer's ServiceEntries until the first complete sync"
    );
    let mut last_summary = String::new();
    loop {
        let summary = tokio::select! {
            summary = round(&settings, &publisher, &metrics) => summary,
            () = own_sync(&mut snapshots) => break,
            _ = shutdown.wait_for(|d| *d) => return,
        };
        if summary != last_summary {
            info!(peers = %summary, retry_in = ?settings.retry_interval, "peer bootstrap round");
            last_summary = summary;
        } else {
            debug!(peers = %summary, "peer bootstrap round");
        }
        tokio::select! {
            () = tokio::time::sleep(settings.retry_interval) => {}
            () = own_sync(&mut snapshots) => break,
            _ = shutdown.wait_for(|d| *d) => return,
        }
    }
    metrics.peer.serving_borrowed.set(0);
    info!("own first complete sync served; peer bootstrap done");
    let _ = shutdown.wait_for(|d| *d).await;
}

/// Returns once a snapshot built here is served.
async fn own_sync(snapshots: &mut watch::Receiver<Arc<Snapshot>>) {
    if snapshots.wait_for(|s| s.is_own()).await.is_err() {
        // The snapshot stage is gone; its own task reports why.
        supervise::upstream_ended().await;
    }
}

/// One pass over every peer address; returns a one-line account of each.
async fn round(settings: &Settings, publisher: &Publisher, metrics: &Metrics) -> String {
    let count = |outcome: &'static str| metrics.peer.attempts.get_or_create(&OutcomeLabels { outcome }).inc();
    let mut notes = Vec::new();
    let mut candidates = Vec::new();
    for target in &settings.peers.targets {
        let addrs = match tokio::net::lookup_host((target.host.as_str(), target.port)).await {
            Ok(addrs) => addrs.collect::<Vec<SocketAddr>>(),
            Err(e) => {
                count(outcomes::UNRESOLVED);
                notes.push(format!("{target}: {e}"));
                continue;
            }
        };
        if addrs.is_empty() {
            count(outcomes::UNRESOLVED);
            notes.push(format!("{target}: no address"));
        }
        for addr in addrs {
            if candidates.iter().any(|c: &peer::Candidate| c.addr == addr) {
                continue;
            }
            match peer::probe(settings, target, addr).await {
                Ok(candidate) => match Verdict::of(&candidate.status, &settings.instance_id).outcome() {
                    Some(outcome) => {
                        count(outcome);
                        if outcome != outcomes::SELF {
                            notes.push(format!("{addr}: {outcome}"));
                        }
                    }
                    None => candidates.push(candidate),
                },
                Err(e) => {
                    count(outcomes::UNREACHABLE);
                    notes.push(format!("{addr}: unreachable: {e}"));
                }
            }
        }
    }
    // Synced peers first; the sort is stable, so resolution order decides among equals.
    candidates.sort_by_key(|c| Verdict::of(&c.status, &settings.instance_id));
    for candidate in candidates {
        let addr = candidate.addr;
        match peer::follow(settings, candidate, publisher, metrics).await {
            Ok(ended) => notes.push(format!("{addr}: followed until {ended}")),
            Err(e) => {
                count(outcomes::FAILED);
                warn!(peer = %addr, error = %e, "cannot borrow from this peer");
                notes.push(format!("{addr}: failed: {e}"));
            }
        }
        if publisher.current().borrowed.is_some() {
            break;
        }
    }
    if notes.is_empty() { "no peer but this process".to_owned() } else { notes.join("; ") }
}

/// Where a set came from, for a snapshot taken now.
fn borrowed_from(addr: SocketAddr, status: &GetStatusResponse) -> Borrowed {
    Borrowed {
        peer: addr.to_string(),
        peer_instance: status.instance_id.clone(),
        peer_borrowed: status.borrowed,
        at: SystemTime::now(),
    }
}

#[cfg(test)]
mod tests;
