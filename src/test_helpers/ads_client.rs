//! A tonic ADS client scripted like istiod's `pkg/adsc` config-source client.

use std::net::SocketAddr;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse, Node};
use crate::proto::istio::mcp::v1alpha1::{Metadata, Resource};
use crate::proto::istio::networking::v1alpha3::ServiceEntry;

pub const MESH_CONFIG_TYPE: &str = "core/v1alpha1/MeshConfig";
pub const SERVICE_ENTRY_V1: &str = "networking.istio.io/v1/ServiceEntry";

/// The Pilot kinds current istiod (1.30+) asks for, in its order.
pub const ISTIO_PILOT_TYPES: [&str; 15] = [
    "security.istio.io/v1/AuthorizationPolicy",
    "networking.istio.io/v1/DestinationRule",
    "networking.istio.io/v1alpha3/EnvoyFilter",
    "networking.istio.io/v1/Gateway",
    "security.istio.io/v1/PeerAuthentication",
    "networking.istio.io/v1beta1/ProxyConfig",
    "security.istio.io/v1/RequestAuthentication",
    "networking.istio.io/v1/ServiceEntry",
    "networking.istio.io/v1/Sidecar",
    "telemetry.istio.io/v1/Telemetry",
    "extensions.istio.io/v1alpha1/TrafficExtension",
    "networking.istio.io/v1/VirtualService",
    "extensions.istio.io/v1alpha1/WasmPlugin",
    "networking.istio.io/v1/WorkloadEntry",
    "networking.istio.io/v1/WorkloadGroup",
];

pub struct AdsClient {
    requests: Option<mpsc::Sender<DiscoveryRequest>>,
    responses: Streaming<DiscoveryResponse>,
    node_id: String,
    sent_first: bool,
}

impl AdsClient {
    pub async fn connect(addr: SocketAddr) -> Result<Self, tonic::Status> {
        Self::connect_as(addr, "sidecar~10.1.2.3~istiod-test.istio-system~istio-system.svc.cluster.local")
            .await
    }

    pub async fn connect_as(addr: SocketAddr, node_id: &str) -> Result<Self, tonic::Status> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        Self::over(channel, node_id).await
    }

    /// Opens the stream over a channel the caller configured (keepalive, TLS, ...).
    pub async fn over(channel: tonic::transport::Channel, node_id: &str) -> Result<Self, tonic::Status> {
        let mut client = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(usize::MAX);
        let (tx, rx) = mpsc::channel(64);
        let responses = client.stream_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
        Ok(AdsClient { requests: Some(tx), responses, node_id: node_id.to_owned(), sent_first: false })
    }

    fn node(&self) -> Node {
        let metadata = prost_types::Struct {
            fields: [
                ("GENERATOR".to_string(), string_value("api")),
                ("ISTIO_VERSION".to_string(), string_value("65536.65536.65536")),
            ]
            .into(),
        };
        Node { id: self.node_id.clone(), metadata: Some(metadata), ..Default::default() }
    }

    /// Sends a request; the Node goes on the first request of the stream only, as adsc does.
    pub async fn send(&mut self, mut request: DiscoveryRequest) {
        if !self.sent_first {
            request.node = Some(self.node());
            self.sent_first = true;
        }
        self.requests
            .as_ref()
            .expect("stream half-closed")
            .send(request)
            .await
            .expect("request stream closed");
    }

    /// istiod's opening: MeshConfig, then one request per type, each with a bogus non-empty nonce.
    pub async fn send_initial(&mut self, type_urls: &[&str]) {
        for type_url in type_urls {
            self.send(DiscoveryRequest {
                type_url: type_url.to_string(),
                response_nonce: "2026-11-25 17:45:24.123 +0000 UTC m=+0.01".into(),
                ..Default::default()
            })
            .await;
        }
    }

    pub async fn istiod_handshake(&mut self) {
        let mut types = vec![MESH_CONFIG_TYPE];
        types.extend(ISTIO_PILOT_TYPES);
        self.send_initial(&types).await;
    }

    pub async fn ack(&mut self, response: &DiscoveryResponse) {
        self.send(DiscoveryRequest {
            type_url: response.type_url.clone(),
            version_info: response.version_info.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    /// The next response, or `None` when the server ended the stream (Ok status).
    pub async fn recv_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<DiscoveryResponse>, tonic::Status> {
        match tokio::time::timeout(timeout, self.responses.message()).await {
            Ok(result) => result,
            Err(_) => Err(tonic::Status::deadline_exceeded(format!("no response within {timeout:?}"))),
        }
    }

    pub async fn recv(&mut self) -> DiscoveryResponse {
        self.recv_timeout(super::DEADLINE).await.expect("stream error").expect("stream ended")
    }

    /// Receives until a response of `type_url` arrives, ACKing everything on the way.
    pub async fn recv_type(&mut self, type_url: &str) -> DiscoveryResponse {
        loop {
            let response = self.recv().await;
            self.ack(&response).await;
            if response.type_url == type_url {
                return response;
            }
        }
    }

    /// Ends our side of the stream, like grpcurl after its last request.
    pub fn half_close(&mut self) {
        self.requests = None;
    }
}

fn string_value(s: &str) -> prost_types::Value {
    prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(s.into())) }
}

/// Decodes every resource the way istiod's `mcpToPilot` does.
pub fn service_entries(response: &DiscoveryResponse) -> Vec<(Metadata, ServiceEntry)> {
    response
        .resources
        .iter()
        .map(|any| {
            assert_eq!(any.type_url, crate::snapshot::MCP_RESOURCE_TYPE_URL);
            let resource = Resource::decode(&any.value[..]).expect("mcp Resource");
            let body = resource.body.expect("body");
            assert_eq!(body.type_url, crate::snapshot::SERVICE_ENTRY_BODY_TYPE_URL);
            (
                resource.metadata.expect("metadata"),
                ServiceEntry::decode(&body.value[..]).expect("ServiceEntry"),
            )
        })
        .collect()
}
