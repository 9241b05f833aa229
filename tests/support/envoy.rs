//! The few fields of Envoy's xDS resources the tests read, as hand-written prost
//! messages. Field numbers are Envoy's (`envoy/config/cluster/v3/cluster.proto`,
//! `.../route/v3/route_components.proto`, `.../endpoint/v3/endpoint.proto`, ...);
//! protobuf skips every field not declared here, so a full Envoy proto tree is not
//! needed (and stays out of the server's `proto/`).
//!
//! `Option<u32>` as a message field is `google.protobuf.UInt32Value`.

use std::collections::HashMap;

use prost::Message;
use prost_types::{Any, Duration};

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const UPSTREAM_TLS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
/// The key of `typed_extension_protocol_options` under which istiod puts HTTP settings.
pub const HTTP_PROTOCOL_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// `envoy.config.cluster.v3.Cluster`.
#[derive(Clone, PartialEq, Message)]
pub struct Cluster {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "4")]
    pub connect_timeout: Option<Duration>,
    #[prost(message, optional, tag = "10")]
    pub circuit_breakers: Option<CircuitBreakers>,
    #[prost(message, optional, tag = "24")]
    pub transport_socket: Option<TransportSocket>,
    #[prost(map = "string, message", tag = "36")]
    pub typed_extension_protocol_options: HashMap<String, Any>,
    #[prost(message, repeated, tag = "43")]
    pub transport_socket_matches: Vec<TransportSocketMatch>,
}

/// `envoy.config.cluster.v3.CircuitBreakers`.
#[derive(Clone, PartialEq, Message)]
pub struct CircuitBreakers {
    #[prost(message, repeated, tag = "1")]
    pub thresholds: Vec<Thresholds>,
}

/// `envoy.config.cluster.v3.CircuitBreakers.Thresholds`.
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

/// `envoy.config.core.v3.TransportSocket`.
#[derive(Clone, PartialEq, Message)]
pub struct TransportSocket {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "3")]
    pub typed_config: Option<Any>,
}

/// `envoy.config.cluster.v3.Cluster.TransportSocketMatch`.
#[derive(Clone, PartialEq, Message)]
pub struct TransportSocketMatch {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "3")]
    pub transport_socket: Option<TransportSocket>,
}

/// `envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext`.
#[derive(Clone, PartialEq, Message)]
pub struct UpstreamTlsContext {
    #[prost(string, tag = "2")]
    pub sni: String,
}

/// `envoy.extensions.upstreams.http.v3.HttpProtocolOptions`.
#[derive(Clone, PartialEq, Message)]
pub struct HttpProtocolOptions {
    #[prost(message, optional, tag = "1")]
    pub common_http_protocol_options: Option<CommonHttpProtocolOptions>,
}

/// `envoy.config.core.v3.HttpProtocolOptions`.
#[derive(Clone, PartialEq, Message)]
pub struct CommonHttpProtocolOptions {
    #[prost(message, optional, tag = "1")]
    pub idle_timeout: Option<Duration>,
    #[prost(message, optional, tag = "6")]
    pub max_requests_per_connection: Option<u32>,
}

impl Cluster {
    /// The TLS context of the cluster's transport socket (or of its first socket match
    /// that has one), when the socket is TLS.
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

    /// The HTTP settings of the upstream connections, when istiod set any.
    pub fn http_options(&self) -> Option<CommonHttpProtocolOptions> {
        let any = self.typed_extension_protocol_options.get(HTTP_PROTOCOL_OPTIONS_KEY)?;
        HttpProtocolOptions::decode(&any.value[..]).expect("HttpProtocolOptions").common_http_protocol_options
    }
}

/// `envoy.config.route.v3.RouteConfiguration`.
#[derive(Clone, PartialEq, Message)]
pub struct RouteConfiguration {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, repeated, tag = "2")]
    pub virtual_hosts: Vec<VirtualHost>,
}

/// `envoy.config.route.v3.VirtualHost`.
#[derive(Clone, PartialEq, Message)]
pub struct VirtualHost {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, repeated, tag = "2")]
    pub domains: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    pub routes: Vec<Route>,
    #[prost(message, optional, tag = "16")]
    pub retry_policy: Option<RetryPolicy>,
}

/// `envoy.config.route.v3.Route` (only its `route` action).
#[derive(Clone, PartialEq, Message)]
pub struct Route {
    #[prost(message, optional, tag = "2")]
    pub route: Option<RouteAction>,
    #[prost(string, tag = "14")]
    pub name: String,
}

/// `envoy.config.route.v3.RouteAction`.
#[derive(Clone, PartialEq, Message)]
pub struct RouteAction {
    #[prost(string, tag = "1")]
    pub cluster: String,
    #[prost(message, optional, tag = "8")]
    pub timeout: Option<Duration>,
    #[prost(message, optional, tag = "9")]
    pub retry_policy: Option<RetryPolicy>,
}

/// `envoy.config.route.v3.RetryPolicy`.
#[derive(Clone, PartialEq, Message)]
pub struct RetryPolicy {
    #[prost(string, tag = "1")]
    pub retry_on: String,
    #[prost(message, optional, tag = "2")]
    pub num_retries: Option<u32>,
    #[prost(message, optional, tag = "3")]
    pub per_try_timeout: Option<Duration>,
}

/// `envoy.config.endpoint.v3.ClusterLoadAssignment`.
#[derive(Clone, PartialEq, Message)]
pub struct ClusterLoadAssignment {
    #[prost(string, tag = "1")]
    pub cluster_name: String,
    #[prost(message, repeated, tag = "2")]
    pub endpoints: Vec<LocalityLbEndpoints>,
}

/// `envoy.config.endpoint.v3.LocalityLbEndpoints`.
#[derive(Clone, PartialEq, Message)]
pub struct LocalityLbEndpoints {
    #[prost(message, repeated, tag = "2")]
    pub lb_endpoints: Vec<LbEndpoint>,
}

/// `envoy.config.endpoint.v3.LbEndpoint`.
#[derive(Clone, PartialEq, Message)]
pub struct LbEndpoint {
    #[prost(message, optional, tag = "1")]
    pub endpoint: Option<Endpoint>,
}

/// `envoy.config.endpoint.v3.Endpoint`.
#[derive(Clone, PartialEq, Message)]
pub struct Endpoint {
    #[prost(message, optional, tag = "1")]
    pub address: Option<Address>,
}

/// `envoy.config.core.v3.Address`.
#[derive(Clone, PartialEq, Message)]
pub struct Address {
    #[prost(message, optional, tag = "1")]
    pub socket_address: Option<SocketAddress>,
}

/// `envoy.config.core.v3.SocketAddress`.
#[derive(Clone, PartialEq, Message)]
pub struct SocketAddress {
    #[prost(string, tag = "2")]
    pub address: String,
    #[prost(uint32, tag = "3")]
    pub port_value: u32,
}

impl ClusterLoadAssignment {
    /// `address:port` of every endpoint, sorted.
    pub fn addresses(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .filter_map(|e| e.endpoint.as_ref()?.address.as_ref()?.socket_address.as_ref())
            .map(|s| format!("{}:{}", s.address, s.port_value))
            .collect();
        out.sort();
        out
    }
}

/// A protobuf Duration in milliseconds (for assertions).
pub fn millis(d: Option<&Duration>) -> Option<i64> {
    d.map(|d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000)
}
