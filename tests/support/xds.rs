//! A sidecar's view of a real istiod: ADS requests for any type URL as a sidecar node with
//! chosen metadata (`DNS_CAPTURE`, `NAMESPACE`…), and minimal hand-written prost messages that
//! decode only the fields the tests read of envoy's Listener, Cluster, RouteConfiguration,
//! ClusterLoadAssignment and Istio's NDS NameTable. Field numbers are envoy's and Istio's
//! (`envoy/config/listener/v3/listener.proto`, `…/cluster/v3/cluster.proto`,
//! `…/route/v3/route.proto`, `…/endpoint/v3/endpoint.proto`, `istio/networking/nds/v1/nds.proto`);
//! prost skips every field not declared here, so the full protos are not needed (and not
//! vendored). `Option<u32>` as a message field is `google.protobuf.UInt32Value`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use prost::Message;
use prost_types::value::Kind;

use cloudmap_xds::proto::SharedAny;
use cloudmap_xds::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use cloudmap_xds::proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse, Node};

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const NAME_TABLE_TYPE: &str = "type.googleapis.com/istio.networking.nds.v1.NameTable";
pub const UPSTREAM_TLS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
/// The key of a Cluster's `typed_extension_protocol_options` under which istiod puts HTTP settings.
pub const HTTP_PROTOCOL_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
pub const TCP_PROXY_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
pub const HTTP_CONNECTION_MANAGER_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
/// How long istiod may take to answer one request.
pub const RESPONSE_DEADLINE: Duration = Duration::from_secs(20);

/// A sidecar node: its id (`sidecar~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local`) and metadata.
#[derive(Debug, Clone)]
pub struct Sidecar {
    pub ip: String,
    pub namespace: String,
    pub metadata: BTreeMap<String, String>,
}

impl Sidecar {
    /// A sidecar of `istio_version` at 10.0.0.9 in namespace `default`, without DNS proxying.
    pub fn new(istio_version: &str) -> Sidecar {
        Sidecar {
            ip: "10.0.0.9".into(),
            namespace: "default".into(),
            metadata: BTreeMap::from([
                ("ISTIO_VERSION".into(), istio_version.into()),
                ("CLUSTER_ID".into(), "Kubernetes".into()),
            ]),
        }
    }

    pub fn in_namespace(mut self, namespace: &str) -> Sidecar {
        namespace.clone_into(&mut self.namespace);
        self
    }

    pub fn with(mut self, key: &str, value: &str) -> Sidecar {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Istio's DNS proxying, as `ISTIO_META_DNS_CAPTURE=true` and `ISTIO_META_DNS_AUTO_ALLOCATE=true`
    /// on the proxy set it.
    pub fn with_dns_proxying(self) -> Sidecar {
        self.with("DNS_CAPTURE", "true").with("DNS_AUTO_ALLOCATE", "true")
    }

    pub fn id(&self) -> String {
        format!("sidecar~{}~probe.{ns}~{ns}.svc.cluster.local", self.ip, ns = self.namespace)
    }

    pub fn node(&self) -> Node {
        let mut fields: BTreeMap<String, prost_types::Value> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), prost_types::Value { kind: Some(Kind::StringValue(v.clone())) }))
            .collect();
        fields.insert(
            "NAMESPACE".into(),
            prost_types::Value { kind: Some(Kind::StringValue(self.namespace.clone())) },
        );
        Node {
            id: self.id(),
            metadata: Some(prost_types::Struct { fields: fields.into_iter().collect() }),
            ..Default::default()
        }
    }
}

/// One open ADS stream to istiod as a sidecar. Every response read is ACKed, as envoy does.
pub struct SidecarStream {
    sidecar: Sidecar,
    requests: tokio::sync::mpsc::Sender<DiscoveryRequest>,
    responses: Option<tonic::Streaming<DiscoveryResponse>>,
    /// Type URL → the resource names subscribed to (empty = wildcard).
    subscriptions: BTreeMap<String, Vec<String>>,
    sent_node: bool,
}

impl SidecarStream {
    /// Opens a stream whose first request asks for `type_url` (`names` empty = every resource
    /// of the type). The first request goes out before the call: istiod sends the response
    /// headers only with its first response.
    pub async fn open(
        istiod_grpc: SocketAddr,
        sidecar: &Sidecar,
        type_url: &str,
        names: &[&str],
    ) -> Result<SidecarStream, String> {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{istiod_grpc}"))
            .await
            .map_err(|e| format!("connect {istiod_grpc}: {e}"))?
            .max_decoding_message_size(usize::MAX);
        // The sender stays in the struct: a half-close would end the stream.
        let (requests, rx) = tokio::sync::mpsc::channel(16);
        let mut stream = SidecarStream {
            sidecar: sidecar.clone(),
            requests,
            responses: None,
            subscriptions: BTreeMap::new(),
            sent_node: false,
        };
        stream.subscribe(type_url, names).await?;
        let responses = client
            .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("StreamAggregatedResources: {e}"))?
            .into_inner();
        stream.responses = Some(responses);
        Ok(stream)
    }

    async fn send(&mut self, mut request: DiscoveryRequest) -> Result<(), String> {
        if !self.sent_node {
            request.node = Some(self.sidecar.node());
            self.sent_node = true;
        }
        self.requests.send(request).await.map_err(|_| "the ADS stream is closed".to_owned())
    }

    /// Asks for `type_url` (`names` empty = every resource of the type).
    pub async fn subscribe(&mut self, type_url: &str, names: &[&str]) -> Result<(), String> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        self.subscriptions.insert(type_url.to_owned(), names.clone());
        self.send(DiscoveryRequest {
            type_url: type_url.to_owned(),
            resource_names: names,
            ..Default::default()
        })
        .await
    }

    /// The next response of any type, ACKed; an error after `deadline` without one.
    pub async fn next_within(&mut self, deadline: Duration) -> Result<DiscoveryResponse, String> {
        let responses = self.responses.as_mut().ok_or("the ADS call is not open")?;
        let response = tokio::time::timeout(deadline, responses.message())
            .await
            .map_err(|_| format!("no response within {deadline:?}"))?
            .map_err(|e| format!("ADS stream: {e}"))?
            .ok_or("the ADS stream ended")?;
        let names = self.subscriptions.get(&response.type_url).cloned().unwrap_or_default();
        self.send(DiscoveryRequest {
            version_info: response.version_info.clone(),
            response_nonce: response.nonce.clone(),
            type_url: response.type_url.clone(),
            resource_names: names,
            ..Default::default()
        })
        .await?;
        Ok(response)
    }

    /// The next response of `type_url`, ACKing (and dropping) responses of other types meanwhile.
    pub async fn next_of(&mut self, type_url: &str) -> Result<DiscoveryResponse, String> {
        loop {
            let response = self.next_within(RESPONSE_DEADLINE).await?;
            if response.type_url == type_url {
                return Ok(response);
            }
        }
    }
}

/// One request for `type_url` as `sidecar` on a fresh stream: istiod's first answer.
pub async fn fetch(
    istiod_grpc: SocketAddr,
    sidecar: &Sidecar,
    type_url: &str,
    names: &[&str],
) -> Result<DiscoveryResponse, String> {
    let mut stream = SidecarStream::open(istiod_grpc, sidecar, type_url, names).await?;
    let response = stream.next_within(RESPONSE_DEADLINE).await?;
    if response.type_url != type_url {
        return Err(format!("asked for {type_url}, istiod answered {}", response.type_url));
    }
    Ok(response)
}

/// Decodes every resource of a response as `M`.
pub fn decode_all<M: Message + Default>(resources: &[SharedAny]) -> Result<Vec<M>, String> {
    resources
        .iter()
        .map(|any| M::decode(&any.value[..]).map_err(|e| format!("decoding {}: {e}", any.type_url)))
        .collect()
}

/// [`fetch`], decoded.
pub async fn fetch_decoded<M: Message + Default>(
    istiod_grpc: SocketAddr,
    sidecar: &Sidecar,
    type_url: &str,
    names: &[&str],
) -> Result<Vec<M>, String> {
    decode_all(&fetch(istiod_grpc, sidecar, type_url, names).await?.resources)
}

pub async fn listeners(istiod_grpc: SocketAddr, sidecar: &Sidecar) -> Result<Vec<Listener>, String> {
    fetch_decoded(istiod_grpc, sidecar, LISTENER_TYPE, &[]).await
}

pub async fn clusters(istiod_grpc: SocketAddr, sidecar: &Sidecar) -> Result<Vec<String>, String> {
    let clusters: Vec<ClusterName> = fetch_decoded(istiod_grpc, sidecar, CLUSTER_TYPE, &[]).await?;
    Ok(clusters.into_iter().map(|c| c.name).collect())
}

/// The cluster `name` as istiod gives it to `sidecar` (None when the sidecar does not get it).
pub async fn cluster(
    istiod_grpc: SocketAddr,
    sidecar: &Sidecar,
    name: &str,
) -> Result<Option<Cluster>, String> {
    let clusters: Vec<Cluster> = fetch_decoded(istiod_grpc, sidecar, CLUSTER_TYPE, &[]).await?;
    Ok(clusters.into_iter().find(|c| c.name == name))
}

pub async fn route(
    istiod_grpc: SocketAddr,
    sidecar: &Sidecar,
    name: &str,
) -> Result<Option<RouteConfiguration>, String> {
    let routes: Vec<RouteConfiguration> = fetch_decoded(istiod_grpc, sidecar, ROUTE_TYPE, &[name]).await?;
    Ok(routes.into_iter().find(|r| r.name == name))
}

pub async fn load_assignment(
    istiod_grpc: SocketAddr,
    sidecar: &Sidecar,
    cluster: &str,
) -> Result<Option<ClusterLoadAssignment>, String> {
    let assignments: Vec<ClusterLoadAssignment> =
        fetch_decoded(istiod_grpc, sidecar, ENDPOINT_TYPE, &[cluster]).await?;
    Ok(assignments.into_iter().find(|a| a.cluster_name == cluster))
}

/// The NDS name table istiod sends the sidecar's DNS proxy (empty when it sends none).
pub async fn name_table(istiod_grpc: SocketAddr, sidecar: &Sidecar) -> Result<NameTable, String> {
    let tables: Vec<NameTable> = fetch_decoded(istiod_grpc, sidecar, NAME_TABLE_TYPE, &[]).await?;
    Ok(tables.into_iter().next().unwrap_or_default())
}

// ---- envoy.config.cluster.v3 ------------------------------------------------------------------

#[derive(Clone, PartialEq, Message)]
pub struct ClusterName {
    #[prost(string, tag = "1")]
    pub name: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Cluster {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "4")]
    pub connect_timeout: Option<prost_types::Duration>,
    #[prost(message, optional, tag = "10")]
    pub circuit_breakers: Option<CircuitBreakers>,
    #[prost(message, optional, tag = "24")]
    pub transport_socket: Option<TransportSocket>,
    #[prost(btree_map = "string, message", tag = "36")]
    pub typed_extension_protocol_options: BTreeMap<String, prost_types::Any>,
    #[prost(message, repeated, tag = "43")]
    pub transport_socket_matches: Vec<TransportSocketMatch>,
}

#[derive(Clone, PartialEq, Message)]
pub struct CircuitBreakers {
    #[prost(message, repeated, tag = "1")]
    pub thresholds: Vec<Thresholds>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Thresholds {
    /// `envoy.config.core.v3.RoutingPriority`: 0 = DEFAULT, 1 = HIGH.
    #[prost(int32, tag = "1")]
    pub priority: i32,
    #[prost(message, optional, tag = "2")]
    pub max_connections: Option<u32>,
    #[prost(message, optional, tag = "3")]
    pub max_pending_requests: Option<u32>,
    #[prost(message, optional, tag = "4")]
    pub max_requests: Option<u32>,
    #[prost(message, optional, tag = "5")]
    pub max_retries: Option<u32>,
}

/// `envoy.config.cluster.v3.Cluster.TransportSocketMatch`
#[derive(Clone, PartialEq, Message)]
pub struct TransportSocketMatch {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "3")]
    pub transport_socket: Option<TransportSocket>,
}

/// `envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext`
#[derive(Clone, PartialEq, Message)]
pub struct UpstreamTlsContext {
    #[prost(string, tag = "2")]
    pub sni: String,
}

/// `envoy.extensions.upstreams.http.v3.HttpProtocolOptions`
#[derive(Clone, PartialEq, Message)]
pub struct HttpProtocolOptions {
    #[prost(message, optional, tag = "1")]
    pub common_http_protocol_options: Option<CommonHttpProtocolOptions>,
}

/// `envoy.config.core.v3.HttpProtocolOptions`
#[derive(Clone, PartialEq, Message)]
pub struct CommonHttpProtocolOptions {
    #[prost(message, optional, tag = "1")]
    pub idle_timeout: Option<prost_types::Duration>,
    #[prost(message, optional, tag = "6")]
    pub max_requests_per_connection: Option<u32>,
}

impl Cluster {
    /// The TLS context of its transport socket (or of the first socket match with one), if TLS.
    pub fn upstream_tls(&self) -> Option<UpstreamTlsContext> {
        let sockets = self
            .transport_socket
            .iter()
            .chain(self.transport_socket_matches.iter().filter_map(|m| m.transport_socket.as_ref()));
        sockets
            .filter_map(|s| s.typed_config.as_ref())
            .find(|any| any.type_url == UPSTREAM_TLS_TYPE)
            .map(|any| UpstreamTlsContext::decode(&any.value[..]).expect("UpstreamTlsContext"))
    }

    /// The circuit breaker thresholds at the default priority.
    pub fn default_thresholds(&self) -> Option<&Thresholds> {
        self.circuit_breakers.as_ref()?.thresholds.iter().find(|t| t.priority == 0)
    }

    /// The HTTP settings of its upstream connections, when istiod set any.
    pub fn http_options(&self) -> Option<CommonHttpProtocolOptions> {
        let any = self.typed_extension_protocol_options.get(HTTP_PROTOCOL_OPTIONS_KEY)?;
        HttpProtocolOptions::decode(&any.value[..]).expect("HttpProtocolOptions").common_http_protocol_options
    }
}

/// A protobuf Duration in milliseconds.
pub fn millis(d: Option<&prost_types::Duration>) -> Option<i64> {
    d.map(|d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000)
}

// ---- envoy.config.core.v3 ---------------------------------------------------------------------

#[derive(Clone, PartialEq, Message)]
pub struct Address {
    #[prost(message, optional, tag = "1")]
    pub socket_address: Option<SocketAddress>,
}

#[derive(Clone, PartialEq, Message)]
pub struct SocketAddress {
    #[prost(string, tag = "2")]
    pub address: String,
    #[prost(uint32, tag = "3")]
    pub port_value: u32,
}

impl Address {
    /// `IP:PORT` (`?` for what is not a socket address).
    pub fn render(&self) -> String {
        self.socket_address.as_ref().map_or("?".into(), |s| format!("{}:{}", s.address, s.port_value))
    }
}

/// `envoy.config.core.v3.TransportSocket`
#[derive(Clone, PartialEq, Message)]
pub struct TransportSocket {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "3")]
    pub typed_config: Option<prost_types::Any>,
}

#[derive(Clone, PartialEq, Message)]
pub struct CidrRange {
    #[prost(string, tag = "1")]
    pub address_prefix: String,
    #[prost(message, optional, tag = "2")]
    pub prefix_len: Option<u32>,
}

// ---- envoy.config.listener.v3 -----------------------------------------------------------------

#[derive(Clone, PartialEq, Message)]
pub struct Listener {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub address: Option<Address>,
    #[prost(message, repeated, tag = "3")]
    pub filter_chains: Vec<FilterChain>,
    #[prost(message, optional, tag = "25")]
    pub default_filter_chain: Option<FilterChain>,
    #[prost(message, optional, tag = "26")]
    pub bind_to_port: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
pub struct FilterChain {
    #[prost(message, optional, tag = "1")]
    pub filter_chain_match: Option<FilterChainMatch>,
    #[prost(message, repeated, tag = "3")]
    pub filters: Vec<Filter>,
    #[prost(string, tag = "7")]
    pub name: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct FilterChainMatch {
    #[prost(message, repeated, tag = "3")]
    pub prefix_ranges: Vec<CidrRange>,
    #[prost(message, optional, tag = "8")]
    pub destination_port: Option<u32>,
    #[prost(string, tag = "9")]
    pub transport_protocol: String,
    #[prost(string, repeated, tag = "10")]
    pub application_protocols: Vec<String>,
    #[prost(string, repeated, tag = "11")]
    pub server_names: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Filter {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "4")]
    pub typed_config: Option<prost_types::Any>,
}

/// `envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy`
#[derive(Clone, PartialEq, Message)]
pub struct TcpProxy {
    #[prost(string, tag = "1")]
    pub stat_prefix: String,
    #[prost(string, tag = "2")]
    pub cluster: String,
}

/// `envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager`
#[derive(Clone, PartialEq, Message)]
pub struct HttpConnectionManager {
    #[prost(message, optional, tag = "3")]
    pub rds: Option<Rds>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Rds {
    #[prost(string, tag = "2")]
    pub route_config_name: String,
}

/// What a filter chain does with a connection: the TCP proxy's cluster, or the RDS route of an
/// HTTP connection manager.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    TcpProxy(String),
    HttpRoute(String),
    Other(String),
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::TcpProxy(cluster) => write!(f, "tcp_proxy -> {cluster}"),
            Action::HttpRoute(route) => write!(f, "http rds {route:?}"),
            Action::Other(name) => f.write_str(name),
        }
    }
}

impl FilterChain {
    /// The terminal filter's action (istio puts telemetry filters before it).
    pub fn action(&self) -> Action {
        let Some(last) = self.filters.last() else { return Action::Other("(no filters)".into()) };
        let Some(config) = &last.typed_config else { return Action::Other(last.name.clone()) };
        match config.type_url.as_str() {
            TCP_PROXY_TYPE => TcpProxy::decode(&config.value[..]).map_or_else(
                |e| Action::Other(format!("bad TcpProxy: {e}")),
                |t| Action::TcpProxy(t.cluster),
            ),
            HTTP_CONNECTION_MANAGER_TYPE => HttpConnectionManager::decode(&config.value[..]).map_or_else(
                |e| Action::Other(format!("bad HttpConnectionManager: {e}")),
                |h| Action::HttpRoute(h.rds.map(|r| r.route_config_name).unwrap_or_default()),
            ),
            other => Action::Other(other.to_owned()),
        }
    }

    /// The destination CIDRs it matches (`[]` = any).
    pub fn destinations(&self) -> Vec<String> {
        self.filter_chain_match
            .as_ref()
            .map(|m| {
                m.prefix_ranges
                    .iter()
                    .map(|r| format!("{}/{}", r.address_prefix, r.prefix_len.unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One line: `[match] -> action`.
    pub fn summary(&self) -> String {
        let mut matches = Vec::new();
        if let Some(m) = &self.filter_chain_match {
            if let Some(port) = m.destination_port {
                matches.push(format!("port {port}"));
            }
            let destinations = self.destinations();
            if !destinations.is_empty() {
                matches.push(format!("dst {}", destinations.join(",")));
            }
            if !m.transport_protocol.is_empty() {
                matches.push(format!("transport {}", m.transport_protocol));
            }
            if !m.application_protocols.is_empty() {
                matches.push(format!("alpn {}", m.application_protocols.join(",")));
            }
            if !m.server_names.is_empty() {
                matches.push(format!("sni {}", m.server_names.join(",")));
            }
        }
        let name = if self.name.is_empty() { String::new() } else { format!("{} ", self.name) };
        format!("{name}[{}] {}", matches.join("; "), self.action())
    }
}

impl Listener {
    /// The listener and each filter chain, one per line.
    pub fn summary(&self) -> String {
        let address = self.address.as_ref().map_or("?".into(), Address::render);
        let mut out = format!("{} ({address})", self.name);
        for chain in self.filter_chains.iter().chain(&self.default_filter_chain) {
            out.push_str("\n    ");
            out.push_str(&chain.summary());
        }
        out
    }

    /// Every action of its filter chains (the default chain included).
    pub fn actions(&self) -> Vec<Action> {
        self.filter_chains.iter().chain(&self.default_filter_chain).map(FilterChain::action).collect()
    }
}

// ---- envoy.config.route.v3 --------------------------------------------------------------------

#[derive(Clone, PartialEq, Message)]
pub struct RouteConfiguration {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, repeated, tag = "2")]
    pub virtual_hosts: Vec<VirtualHost>,
}

#[derive(Clone, PartialEq, Message)]
pub struct VirtualHost {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, repeated, tag = "2")]
    pub domains: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    pub routes: Vec<Route>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Route {
    #[prost(message, optional, tag = "2")]
    pub route: Option<RouteAction>,
    #[prost(string, tag = "14")]
    pub name: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct RouteAction {
    #[prost(string, tag = "1")]
    pub cluster: String,
    #[prost(message, optional, tag = "8")]
    pub timeout: Option<prost_types::Duration>,
    #[prost(message, optional, tag = "9")]
    pub retry_policy: Option<RetryPolicy>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RetryPolicy {
    #[prost(string, tag = "1")]
    pub retry_on: String,
    #[prost(message, optional, tag = "2")]
    pub num_retries: Option<u32>,
    #[prost(message, optional, tag = "3")]
    pub per_try_timeout: Option<prost_types::Duration>,
}

impl RouteConfiguration {
    /// The virtual host whose domains include `domain`.
    pub fn virtual_host_for(&self, domain: &str) -> Option<&VirtualHost> {
        self.virtual_hosts.iter().find(|v| v.domains.iter().any(|d| d == domain))
    }
}

// ---- envoy.config.endpoint.v3 -----------------------------------------------------------------

#[derive(Clone, PartialEq, Message)]
pub struct ClusterLoadAssignment {
    #[prost(string, tag = "1")]
    pub cluster_name: String,
    #[prost(message, repeated, tag = "2")]
    pub endpoints: Vec<LocalityLbEndpoints>,
}

#[derive(Clone, PartialEq, Message)]
pub struct LocalityLbEndpoints {
    #[prost(message, optional, tag = "1")]
    pub locality: Option<Locality>,
    #[prost(message, repeated, tag = "2")]
    pub lb_endpoints: Vec<LbEndpoint>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Locality {
    #[prost(string, tag = "1")]
    pub region: String,
    #[prost(string, tag = "2")]
    pub zone: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct LbEndpoint {
    #[prost(message, optional, tag = "1")]
    pub endpoint: Option<Endpoint>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Endpoint {
    #[prost(message, optional, tag = "1")]
    pub address: Option<Address>,
}

impl ClusterLoadAssignment {
    /// Every endpoint as `IP:PORT`, sorted.
    pub fn addresses(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .filter_map(|e| e.endpoint.as_ref()?.address.as_ref().map(Address::render))
            .collect();
        out.sort();
        out
    }
}

// ---- istio.networking.nds.v1 ------------------------------------------------------------------

#[derive(Clone, PartialEq, Message)]
pub struct NameTable {
    #[prost(btree_map = "string, message", tag = "1")]
    pub table: BTreeMap<String, NameInfo>,
}

#[derive(Clone, PartialEq, Message)]
pub struct NameInfo {
    #[prost(string, repeated, tag = "1")]
    pub ips: Vec<String>,
    #[prost(string, tag = "2")]
    pub registry: String,
}
