//! The network side of the peer bootstrap: a gRPC channel to one peer address,
//! its status, and its ServiceEntry stream, followed.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{info, warn};

use super::{
    CONNECT_TIMEOUT, FIRST_RESPONSE_TIMEOUT, PEER_NODE_PREFIX, SERVICE_ENTRY_TYPE_URL, STATUS_TIMEOUT,
    Settings, Target, borrowed_from, borrowed_snapshot, outcomes,
};
use crate::error_text::error_chain;
use crate::metrics::{Metrics, OutcomeLabels};
use crate::proto::cloudmap_xds::debug::v1::debug_client::DebugClient;
use crate::proto::cloudmap_xds::debug::v1::{GetStatusRequest, GetStatusResponse};
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::envoy::service::discovery::v3::{DiscoveryRequest, Node};
use crate::snapshot::Publisher;
use crate::snapshot::publish::record_served_metrics;

/// HTTP/2 pings on a followed stream, so a peer that vanished (node lost) is noticed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A peer address that answered its status, with the channel it answered on.
pub(super) struct Candidate {
    pub addr: SocketAddr,
    pub status: GetStatusResponse,
    channel: Channel,
}

/// Connects to `addr` and asks for its status.
pub(super) async fn probe(
    settings: &Settings,
    target: &Target,
    addr: SocketAddr,
) -> Result<Candidate, String> {
    let channel = connect(settings, target, addr).await?;
    let status = tokio::time::timeout(
        STATUS_TIMEOUT,
        DebugClient::new(channel.clone()).get_status(GetStatusRequest {}),
    )
    .await
    .map_err(|_| format!("no status within {STATUS_TIMEOUT:?}"))?
    .map_err(|s| format!("status: {:?}: {}", s.code(), s.message()))?
    .into_inner();
    Ok(Candidate { addr, status, channel })
}

async fn connect(settings: &Settings, target: &Target, addr: SocketAddr) -> Result<Channel, String> {
    let scheme = if settings.peers.tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| error_chain(&e))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if let Some(tls) = &settings.peers.tls {
        let name = tls.server_name.clone().unwrap_or_else(|| target.host.clone());
        let config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem)).domain_name(name);
        endpoint = endpoint.tls_config(config).map_err(|e| error_chain(&e))?;
    }
    endpoint.connect().await.map_err(|e| error_chain(&e))
}

/// Takes the candidate's ServiceEntry set and serves it, then each later push, until
/// the stream ends; returns how it ended, or why nothing was taken.
pub(super) async fn follow(
    settings: &Settings,
    candidate: Candidate,
    publisher: &Publisher,
    metrics: &Metrics,
) -> Result<String, String> {
    let Candidate { addr, status, channel } = candidate;
    // The sender stays here for the stream's life: dropping it would half-close the stream.
    let (requests, outgoing) = mpsc::channel(2);
    let first = DiscoveryRequest {
        node: Some(Node { id: format!("{PEER_NODE_PREFIX}{}", settings.instance_id), ..Default::default() }),
        type_url: SERVICE_ENTRY_TYPE_URL.to_owned(),
        ..Default::default()
    };
    requests.send(first).await.map_err(|_| "the request queue closed".to_owned())?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(settings.max_response_size);
    let opened = tokio::time::timeout(
        FIRST_RESPONSE_TIMEOUT,
        client.stream_aggregated_resources(ReceiverStream::new(outgoing)),
    )
    .await
    .map_err(|_| format!("no stream within {FIRST_RESPONSE_TIMEOUT:?}"))?
    .map_err(|s| format!("stream refused: {:?}: {}", s.code(), s.message()))?;
    let mut responses = opened.into_inner();
    let mut taken = false;
    loop {
        let next = if taken {
            responses.message().await
        } else {
            tokio::time::timeout(FIRST_RESPONSE_TIMEOUT, responses.message())
                .await
                .map_err(|_| format!("no ServiceEntries within {FIRST_RESPONSE_TIMEOUT:?}"))?
        };
        let response = match (next, taken) {
            (Ok(Some(response)), _) => response,
            (Ok(None), false) => return Err("the stream ended before any ServiceEntries".into()),
            (Ok(None), true) => return Ok("the peer ended the stream".into()),
            (Err(s), false) => return Err(format!("stream: {:?}: {}", s.code(), s.message())),
            (Err(s), true) => return Ok(format!("stream error {:?}: {}", s.code(), s.message())),
        };
        let (version, nonce) = (response.version_info.clone(), response.nonce.clone());
        let (namespace, from) = (settings.publish_namespace.clone(), borrowed_from(addr, &status));
        // Decoding a full set is CPU work (about as much as istiod's): off the async workers.
        let converted = tokio::task::spawn_blocking(move || borrowed_snapshot(response, &namespace, from))
            .await
            .map_err(|e| format!("decoding the peer's set failed: {e}"))?;
        let snapshot = match converted {
            Ok(snapshot) => snapshot,
            Err(refusal) if taken => {
                warn!(peer = %addr, %refusal, "a later push of the peer refused; the borrowed set stays as it was");
                return Ok(format!("a push was refused: {refusal}"));
            }
            Err(refusal) => return Err(refusal.to_string()),
        };
        let (entries, endpoints, bytes, set_version) =
            (snapshot.resources.len(), snapshot.endpoints, snapshot.encoded_len(), snapshot.version.clone());
        let woke = publisher.publish_borrowed(snapshot);
        let serving = publisher.current();
        let borrowed = serving.borrowed.is_some();
        metrics.peer.serving_borrowed.set(i64::from(borrowed));
        if borrowed {
            record_served_metrics(metrics, &serving);
        }
        if !taken {
            metrics.peer.attempts.get_or_create(&OutcomeLabels { outcome: outcomes::BORROWED }).inc();
            info!(
                peer = %addr,
                peer_instance = %status.instance_id,
                peer_borrowed = status.borrowed,
                service_entries = entries,
                endpoints,
                bytes,
                version = %set_version,
                "serving ServiceEntries borrowed from a peer until this replica's own first complete sync"
            );
            taken = true;
        } else if woke {
            info!(peer = %addr, service_entries = entries, version = %set_version, "borrowed set updated by the peer");
        }
        let ack = DiscoveryRequest {
            type_url: SERVICE_ENTRY_TYPE_URL.to_owned(),
            version_info: version,
            response_nonce: nonce,
            ..Default::default()
        };
        if requests.send(ack).await.is_err() {
            return Ok("the stream closed".into());
        }
    }
}
