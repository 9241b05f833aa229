//! The five Cloud Map reads the poller makes, in plain types: the seam between
//! the AWS SDK (`client.rs`) and the poller, so the poller can be tested
//! without a network. No AWS SDK type crosses this line.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::SystemTime;

use crate::model::Instance;

/// The Cloud Map APIs we call; the names are the `api` label of `cloudmap_xds_aws_calls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Api {
    ListNamespaces,
    ListServices,
    DiscoverInstances,
    DiscoverInstancesRevision,
    GetServiceAttributes,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::ListNamespaces => "ListNamespaces",
            Api::ListServices => "ListServices",
            Api::DiscoverInstances => "DiscoverInstances",
            Api::DiscoverInstancesRevision => "DiscoverInstancesRevision",
            Api::GetServiceAttributes => "GetServiceAttributes",
        }
    }
}

impl std::fmt::Display for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceKind {
    Http,
    DnsPrivate,
    DnsPublic,
    Other(String),
}

/// One `NamespaceSummary`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub id: String,
    pub name: String,
    /// What DiscoverInstances takes; differs from `name` when a name was reused.
    pub http_name: String,
    pub kind: NamespaceKind,
}

/// One `ServiceSummary`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub id: String,
    pub name: String,
    /// The namespace the response says the service is in, when it says so (AWS
    /// returns it only in a DNS service's `DnsConfig`; moto in every summary).
    /// Used to filter client-side, as moto ignores the `NAMESPACE_ID` filter.
    pub namespace_id: Option<String>,
    /// `CreateDate`; the Unix epoch when absent, so every replica agrees.
    pub created: SystemTime,
    /// Whether a Route 53 or custom health check is configured.
    pub health_checked: bool,
}

/// One page of a List call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_token: Option<String>,
}

/// One DiscoverInstances answer (HealthStatus=ALL, MaxResults=1000: the whole service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    pub instances: Vec<Instance>,
    pub revision: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// `RequestLimitExceeded`, `ThrottlingException` or HTTP 429.
    Throttled,
    /// Our request timeout (attempt or operation) elapsed.
    Timeout,
    /// `NamespaceNotFound` or `ServiceNotFound`.
    NotFound,
    /// `AccessDeniedException` (HTTP 400, how AWS JSON services answer) or `AccessDenied` /
    /// HTTP 403: the IAM policy does not allow the action.
    Denied,
    /// Everything else: connection refused, 5xx, unparsable responses.
    Other,
}

/// A failed call, classified; the message carries the SDK's whole error chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError { kind, message: message.into() }
    }

    /// The `outcome` label of `cloudmap_xds_aws_calls`.
    pub fn outcome(&self) -> &'static str {
        match self.kind {
            ErrorKind::Throttled => "throttled",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Denied => "denied",
            ErrorKind::NotFound | ErrorKind::Other => "error",
        }
    }
}

/// Cloud Map, as the poller sees it. Implemented over the AWS SDK in `client.rs`
/// and by fakes in tests. Each method is exactly one AWS request.
pub trait CloudMapApi: Send + Sync + 'static {
    fn list_namespaces(
        &self,
        next_token: Option<String>,
    ) -> impl Future<Output = Result<Page<NamespaceInfo>, ApiError>> + Send;

    /// One page of `ListServices` filtered by `NAMESPACE_ID`.
    fn list_services(
        &self,
        namespace_id: &str,
        next_token: Option<String>,
    ) -> impl Future<Output = Result<Page<ServiceInfo>, ApiError>> + Send;

    /// `DiscoverInstances` with the namespace's HttpName, HealthStatus=ALL and MaxResults=1000.
    fn discover_instances(
        &self,
        namespace_http_name: &str,
        service: &str,
    ) -> impl Future<Output = Result<Discovered, ApiError>> + Send;

    fn discover_instances_revision(
        &self,
        namespace_http_name: &str,
        service: &str,
    ) -> impl Future<Output = Result<i64, ApiError>> + Send;

    /// `GetServiceAttributes`: the service-level key/values (at most 30; none is an empty map).
    fn get_service_attributes(
        &self,
        service_id: &str,
    ) -> impl Future<Output = Result<BTreeMap<String, String>, ApiError>> + Send;
}
