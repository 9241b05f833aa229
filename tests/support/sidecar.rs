//! What istiod tells a sidecar: a small ADS client that connects to istiod's plaintext
//! gRPC port as a sidecar proxy would (node id, `ISTIO_VERSION`, namespace), asks for
//! CDS, EDS or RDS, ACKs what it gets, and decodes the answer with the hand-written
//! messages of [`super::envoy`].

use std::net::SocketAddr;
use std::time::Duration;

use prost::Message;

use cloudmap_xds::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use cloudmap_xds::proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse, Node};

use super::envoy::{
    CLUSTER_TYPE, Cluster, ClusterLoadAssignment, ENDPOINT_TYPE, ROUTE_TYPE, RouteConfiguration,
};

/// The namespace of the pretend sidecar (what matters for Sidecar resources and
/// DestinationRule lookup).
pub const SIDECAR_NAMESPACE: &str = "default";
/// The node a sidecar of pod `probe` in namespace `default` would send.
pub const SIDECAR_NODE_ID: &str = "sidecar~10.0.0.9~probe.default~default.svc.cluster.local";
/// How long istiod may take to answer one request.
const ANSWER_DEADLINE: Duration = Duration::from_secs(20);

/// One ADS stream to istiod, as a sidecar.
pub struct Sidecar {
    client: AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    requests: tokio::sync::mpsc::Sender<DiscoveryRequest>,
    /// The request stream, until the call starts (with the first request queued: istiod
    /// sends the response headers only with its first response).
    unsent: Option<tokio::sync::mpsc::Receiver<DiscoveryRequest>>,
    responses: Option<tonic::Streaming<DiscoveryResponse>>,
    node: Node,
}

impl Sidecar {
    /// Connects; the stream opens with the first [`Sidecar::ask`].
    pub async fn connect(istiod_grpc: SocketAddr, istio_version: &str) -> Result<Sidecar, String> {
        let client = AggregatedDiscoveryServiceClient::connect(format!("http://{istiod_grpc}"))
            .await
            .map_err(|e| format!("connect {istiod_grpc}: {e}"))?
            .max_decoding_message_size(usize::MAX);
        let string =
            |s: &str| prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(s.to_owned())) };
        let metadata = prost_types::Struct {
            fields: [
                ("ISTIO_VERSION".to_owned(), string(istio_version)),
                ("NAMESPACE".to_owned(), string(SIDECAR_NAMESPACE)),
                ("CLUSTER_ID".to_owned(), string("Kubernetes")),
            ]
            .into(),
        };
        let node = Node { id: SIDECAR_NODE_ID.to_owned(), metadata: Some(metadata), ..Default::default() };
        // The request stream stays open as long as `requests` lives (a half-close ends the stream).
        let (requests, rx) = tokio::sync::mpsc::channel(16);
        Ok(Sidecar { client, requests, unsent: Some(rx), responses: None, node })
    }

    /// Queues `request` (the first one carries the node) and makes sure the call runs.
    async fn send(&mut self, mut request: DiscoveryRequest) -> Result<(), String> {
        if self.responses.is_none() {
            request.node = Some(self.node.clone());
        }
        self.requests.send(request).await.map_err(|_| "the ADS stream is closed".to_owned())?;
        if let Some(rx) = self.unsent.take() {
            let call =
                self.client.stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx));
            let responses = tokio::time::timeout(ANSWER_DEADLINE, call)
                .await
                .map_err(|_| format!("no answer to StreamAggregatedResources within {ANSWER_DEADLINE:?}"))?
                .map_err(|e| format!("StreamAggregatedResources: {e}"))?
                .into_inner();
            self.responses = Some(responses);
        }
        Ok(())
    }

    /// Asks for `type_url` (all resources when `names` is empty) and returns istiod's
    /// first answer of that type, ACKing it and anything else istiod pushes meanwhile.
    pub async fn ask(&mut self, type_url: &str, names: &[&str]) -> Result<DiscoveryResponse, String> {
        let request = DiscoveryRequest {
            type_url: type_url.to_owned(),
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            ..Default::default()
        };
        self.send(request).await?;
        loop {
            let responses = self.responses.as_mut().expect("the call started with the first request");
            let response = tokio::time::timeout(ANSWER_DEADLINE, responses.message())
                .await
                .map_err(|_| format!("no {type_url} response within {ANSWER_DEADLINE:?}"))?
                .map_err(|e| format!("ADS stream: {e}"))?
                .ok_or_else(|| format!("ADS stream ended before a {type_url} response"))?;
            let ack = DiscoveryRequest {
                type_url: response.type_url.clone(),
                version_info: response.version_info.clone(),
                response_nonce: response.nonce.clone(),
                resource_names: if response.type_url == type_url {
                    names.iter().map(|n| (*n).to_owned()).collect()
                } else {
                    Vec::new()
                },
                ..Default::default()
            };
            self.send(ack).await?;
            if response.type_url == type_url {
                return Ok(response);
            }
        }
    }

    /// Every cluster istiod gives this sidecar.
    pub async fn clusters(&mut self) -> Result<Vec<Cluster>, String> {
        decode_all(&self.ask(CLUSTER_TYPE, &[]).await?)
    }

    /// The route configuration `name` (for outbound HTTP, the port number: `"80"`).
    pub async fn route(&mut self, name: &str) -> Result<Option<RouteConfiguration>, String> {
        let routes: Vec<RouteConfiguration> = decode_all(&self.ask(ROUTE_TYPE, &[name]).await?)?;
        Ok(routes.into_iter().find(|r| r.name == name))
    }

    /// The endpoints of cluster `name`.
    pub async fn endpoints(&mut self, name: &str) -> Result<Option<ClusterLoadAssignment>, String> {
        let assignments: Vec<ClusterLoadAssignment> = decode_all(&self.ask(ENDPOINT_TYPE, &[name]).await?)?;
        Ok(assignments.into_iter().find(|a| a.cluster_name == name))
    }
}

fn decode_all<M: Message + Default>(response: &DiscoveryResponse) -> Result<Vec<M>, String> {
    response
        .resources
        .iter()
        .map(|any| M::decode(&any.value[..]).map_err(|e| format!("{}: {e}", response.type_url)))
        .collect()
}

/// A sidecar's CDS on a fresh stream; the names of the clusters istiod answers with.
pub async fn cluster_names(istiod_grpc: SocketAddr, istio_version: &str) -> Result<Vec<String>, String> {
    let clusters = Sidecar::connect(istiod_grpc, istio_version).await?.clusters().await?;
    Ok(clusters.into_iter().map(|c| c.name).collect())
}

/// A sidecar's view of one cluster on a fresh stream: the cluster, if istiod gives it to the
/// sidecar, and its endpoints.
pub async fn cluster(
    istiod_grpc: SocketAddr,
    istio_version: &str,
    name: &str,
) -> Result<Option<(Cluster, Option<ClusterLoadAssignment>)>, String> {
    let mut sidecar = Sidecar::connect(istiod_grpc, istio_version).await?;
    let Some(cluster) = sidecar.clusters().await?.into_iter().find(|c| c.name == name) else {
        return Ok(None);
    };
    let endpoints = sidecar.endpoints(name).await?;
    Ok(Some((cluster, endpoints)))
}

/// A sidecar's route configuration `name` on a fresh stream.
pub async fn route(
    istiod_grpc: SocketAddr,
    istio_version: &str,
    name: &str,
) -> Result<Option<RouteConfiguration>, String> {
    Sidecar::connect(istiod_grpc, istio_version).await?.route(name).await
}
