//! An in-process fake AWS Cloud Map on loopback, for registries moto cannot be seeded
//! with in a bench's time (10,000 services × 10 instances: moto registers about 350
//! instances a second and needs about 100 s to serve 1,000 × 10).
//!
//! It speaks the AWS JSON 1.1 protocol the SDK client in `src/source/cloudmap/client.rs`
//! speaks (`POST /`, `X-Amz-Target: Route53AutoNaming_v20170314.<Op>`, JSON bodies;
//! errors as HTTP 400 with `__type`), for the five reads the source makes:
//! ListNamespaces, ListServices, GetServiceAttributes, DiscoverInstances and
//! DiscoverInstancesRevision. Field names are AWS's (and moto's). Unlike moto it
//! behaves as AWS does where the source's cost depends on it: connections are kept
//! alive, the list calls page (at most 100 per page, `NextToken`), ListServices honours
//! its `NAMESPACE_ID` filter, DiscoverInstances returns at most `MaxResults` (default
//! 100) instances, and a service's `InstancesRevision` stays the same while its
//! instances do. Requests are not authenticated (the SDK signs them; the signature
//! is not checked). The registry is fixed when the fake starts.
//!
//! A `data-` host prefix never reaches it: the binary strips it for a custom endpoint.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use cloudmap_xds::model::{Health, Registry};
use serde_json::{Value, json};

/// The account every ARN names.
pub const ACCOUNT: &str = "123456789012";
/// The region every ARN names.
pub const REGION: &str = "us-east-1";
/// `X-Amz-Target` is this, a dot, and the operation.
const TARGET_PREFIX: &str = "Route53AutoNaming_v20170314";
/// The list calls' page size when the request names none, and their maximum.
const LIST_PAGE: usize = 100;
/// DiscoverInstances' `MaxResults` when the request names none, and its maximum.
const DISCOVER_DEFAULT: usize = 100;
const DISCOVER_MAX: usize = 1000;

/// The operations the fake answers, in the order of [`FakeCloudMap::calls`].
pub const OPERATIONS: [&str; 5] = [
    "ListNamespaces",
    "ListServices",
    "GetServiceAttributes",
    "DiscoverInstances",
    "DiscoverInstancesRevision",
];

struct FakeInstance {
    id: String,
    health: &'static str,
    attributes: Vec<(String, String)>,
}

struct FakeService {
    id: String,
    name: String,
    namespace_id: String,
    created: f64,
    /// Fixed: the registry never changes.
    revision: i64,
    attributes: BTreeMap<String, String>,
    instances: Vec<FakeInstance>,
}

struct FakeNamespace {
    id: String,
    name: String,
    created: f64,
    /// Indexes into `State::services`, in creation order.
    services: Vec<usize>,
}

#[derive(Default)]
struct State {
    namespaces: Vec<FakeNamespace>,
    services: Vec<FakeService>,
    namespace_by_id: HashMap<String, usize>,
    namespace_by_http_name: HashMap<String, usize>,
    service_by_id: HashMap<String, usize>,
    /// (namespace index, service name) → service index.
    service_by_name: HashMap<(usize, String), usize>,
    /// Requests by operation, in the order of [`OPERATIONS`].
    calls: [AtomicU64; OPERATIONS.len()],
    /// Requests answered with an error (unknown operation, bad input, not found).
    errors: AtomicU64,
    connections: AtomicU64,
}

/// The fake, serving on 127.0.0.1 until dropped.
pub struct FakeCloudMap {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeCloudMap {
    /// Serves `registry`: one HTTP namespace per distinct namespace name, its services
    /// in the registry's order, each instance's attributes as they are.
    pub async fn start(registry: &Registry) -> FakeCloudMap {
        let state = Arc::new(State::from_registry(registry));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counter = state.clone();
        let listener = listener.tap_io(move |tcp| {
            counter.connections.fetch_add(1, Ordering::Relaxed);
            let _ = tcp.set_nodelay(true);
        });
        let router = axum::Router::new().route("/", axum::routing::post(handle)).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        FakeCloudMap { addr, state, task }
    }

    /// What to pass as `--aws-endpoint-url`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests so far by operation (see [`OPERATIONS`]), errors included.
    pub fn calls(&self) -> BTreeMap<&'static str, u64> {
        OPERATIONS.iter().zip(&self.state.calls).map(|(op, n)| (*op, n.load(Ordering::Relaxed))).collect()
    }

    /// Requests answered with an error so far.
    pub fn errors(&self) -> u64 {
        self.state.errors.load(Ordering::Relaxed)
    }

    /// Client connections accepted so far: far fewer than the calls when the client keeps them alive.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }
}

impl Drop for FakeCloudMap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn epoch_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl State {
    fn from_registry(registry: &Registry) -> State {
        let mut state = State::default();
        for service in &registry.services {
            let ns = match state.namespace_by_http_name.get(&service.namespace) {
                Some(&ns) => ns,
                None => {
                    let ns = state.namespaces.len();
                    let id = format!("ns-{:016x}", ns + 1);
                    state.namespace_by_id.insert(id.clone(), ns);
                    state.namespace_by_http_name.insert(service.namespace.clone(), ns);
                    state.namespaces.push(FakeNamespace {
                        id,
                        name: service.namespace.clone(),
                        created: 0.0,
                        services: Vec::new(),
                    });
                    ns
                }
            };
            let index = state.services.len();
            let id = format!("srv-{:016x}", index + 1);
            state.service_by_id.insert(id.clone(), index);
            state.service_by_name.insert((ns, service.name.clone()), index);
            state.namespaces[ns].services.push(index);
            state.services.push(FakeService {
                id,
                name: service.name.clone(),
                namespace_id: state.namespaces[ns].id.clone(),
                created: epoch_seconds(service.created),
                revision: 1,
                attributes: service.attributes.clone(),
                instances: service
                    .instances
                    .iter()
                    .map(|i| FakeInstance {
                        id: i.id.clone(),
                        health: match i.health {
                            Health::Healthy => "HEALTHY",
                            Health::Unhealthy => "UNHEALTHY",
                            Health::Unknown => "UNKNOWN",
                        },
                        attributes: i.attributes.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
                    })
                    .collect(),
            });
        }
        state
    }

    fn answer(&self, operation: &str, body: &Value) -> Result<Value, Failure> {
        match operation {
            "ListNamespaces" => self.list_namespaces(body),
            "ListServices" => self.list_services(body),
            "GetServiceAttributes" => self.get_service_attributes(body),
            "DiscoverInstances" => self.discover_instances(body),
            "DiscoverInstancesRevision" => {
                let service = &self.services[self.discovered_service(body)?];
                Ok(json!({ "InstancesRevision": service.revision }))
            }
            other => Err(Failure::new("UnknownOperationException", format!("unknown operation {other:?}"))),
        }
    }

    fn list_namespaces(&self, body: &Value) -> Result<Value, Failure> {
        if body.get("Filters").is_some_and(|f| !f.is_null()) {
            return Err(Failure::invalid("ListNamespaces filters are not implemented by the fake"));
        }
        let (start, end, next) = page(body, self.namespaces.len())?;
        let namespaces: Vec<Value> = self.namespaces[start..end]
            .iter()
            .map(|ns| {
                json!({
                    "Arn": format!("arn:aws:servicediscovery:{REGION}:{ACCOUNT}:namespace/{}", ns.id),
                    "Id": ns.id,
                    "Name": ns.name,
                    "Type": "HTTP",
                    "Properties": { "HttpProperties": { "HttpName": ns.name } },
                    "ServiceCount": ns.services.len(),
                    "CreateDate": ns.created,
                })
            })
            .collect();
        Ok(with_token(json!({ "Namespaces": namespaces }), next))
    }

    fn list_services(&self, body: &Value) -> Result<Value, Failure> {
        let mut namespace = None;
        for filter in body.get("Filters").and_then(Value::as_array).into_iter().flatten() {
            let name = filter.get("Name").and_then(Value::as_str);
            let condition = filter.get("Condition").and_then(Value::as_str).unwrap_or("EQ");
            let values: Vec<&str> = filter
                .get("Values")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            match (name, condition, values.as_slice()) {
                (Some("NAMESPACE_ID"), "EQ", [id]) => {
                    // An ARN names the namespace too.
                    let id = id.rsplit('/').next().unwrap_or(id);
                    namespace = Some(*self.namespace_by_id.get(id).ok_or_else(|| {
                        Failure::new("NamespaceNotFound", format!("Namespace not found: {id}"))
                    })?);
                }
                _ => return Err(Failure::invalid(format!("unsupported ListServices filter {filter}"))),
            }
        }
        let all: Vec<usize>;
        let services: &[usize] = match namespace {
            Some(ns) => &self.namespaces[ns].services,
            None => {
                all = (0..self.services.len()).collect();
                &all
            }
        };
        let (start, end, next) = page(body, services.len())?;
        let summaries: Vec<Value> = services[start..end]
            .iter()
            .map(|&s| {
                let s = &self.services[s];
                json!({
                    "Arn": format!("arn:aws:servicediscovery:{REGION}:{ACCOUNT}:service/{}", s.id),
                    "Id": s.id,
                    "Name": s.name,
                    "Type": "HTTP",
                    "InstanceCount": s.instances.len(),
                    "CreateDate": s.created,
                })
            })
            .collect();
        Ok(with_token(json!({ "Services": summaries }), next))
    }

    fn get_service_attributes(&self, body: &Value) -> Result<Value, Failure> {
        let id =
            body.get("ServiceId").and_then(Value::as_str).ok_or_else(|| Failure::invalid("no ServiceId"))?;
        let id = id.rsplit('/').next().unwrap_or(id);
        let service = self
            .service_by_id
            .get(id)
            .map(|&s| &self.services[s])
            .ok_or_else(|| Failure::new("ServiceNotFound", format!("Service not found: {id}")))?;
        Ok(json!({
            "ServiceAttributes": {
                "ServiceArn": format!("arn:aws:servicediscovery:{REGION}:{ACCOUNT}:service/{}", service.id),
                "ResourceOwner": ACCOUNT,
                "Attributes": service.attributes,
            }
        }))
    }

    /// The service a Discover call names by namespace HTTP name and service name.
    fn discovered_service(&self, body: &Value) -> Result<usize, Failure> {
        let field = |name: &str| {
            body.get(name).and_then(Value::as_str).ok_or_else(|| Failure::invalid(format!("no {name}")))
        };
        let (namespace, service) = (field("NamespaceName")?, field("ServiceName")?);
        let ns = *self
            .namespace_by_http_name
            .get(namespace)
            .ok_or_else(|| Failure::new("NamespaceNotFound", format!("Namespace not found: {namespace}")))?;
        self.service_by_name
            .get(&(ns, service.to_owned()))
            .copied()
            .ok_or_else(|| Failure::new("ServiceNotFound", format!("Service not found: {service}")))
    }

    fn discover_instances(&self, body: &Value) -> Result<Value, Failure> {
        if ["QueryParameters", "OptionalParameters"].iter().any(|p| body.get(p).is_some_and(|v| !v.is_null()))
        {
            return Err(Failure::invalid("DiscoverInstances parameters are not implemented by the fake"));
        }
        let service = &self.services[self.discovered_service(body)?];
        let max = match body.get("MaxResults") {
            None | Some(Value::Null) => DISCOVER_DEFAULT,
            Some(v) => match v.as_u64() {
                Some(n @ 1..=1000) => n as usize,
                _ => {
                    return Err(Failure::invalid(format!("MaxResults must be 1 to {DISCOVER_MAX}, not {v}")));
                }
            },
        };
        let healthy = |i: &&FakeInstance| i.health == "HEALTHY";
        let selected: Vec<&FakeInstance> =
            match body.get("HealthStatus").and_then(Value::as_str).unwrap_or("ALL") {
                "ALL" => service.instances.iter().collect(),
                "HEALTHY" => service.instances.iter().filter(healthy).collect(),
                "UNHEALTHY" => service.instances.iter().filter(|i| i.health == "UNHEALTHY").collect(),
                "HEALTHY_OR_ELSE_ALL" => match service.instances.iter().filter(healthy).collect::<Vec<_>>() {
                    none if none.is_empty() => service.instances.iter().collect(),
                    some => some,
                },
                other => return Err(Failure::invalid(format!("unknown HealthStatus {other:?}"))),
            };
        let (namespace, name) = (&body["NamespaceName"], &body["ServiceName"]);
        let instances: Vec<Value> = selected
            .iter()
            .take(max)
            .map(|i| {
                let attributes: serde_json::Map<String, Value> =
                    i.attributes.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect();
                json!({
                    "InstanceId": i.id,
                    "NamespaceName": namespace,
                    "ServiceName": name,
                    "HealthStatus": i.health,
                    "Attributes": attributes,
                })
            })
            .collect();
        Ok(json!({ "Instances": instances, "InstancesRevision": service.revision }))
    }
}

/// The `[start, end)` of a list call's page over `len` items, and the next page's token.
fn page(body: &Value, len: usize) -> Result<(usize, usize, Option<String>), Failure> {
    let size = match body.get("MaxResults") {
        None | Some(Value::Null) => LIST_PAGE,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=100) => n as usize,
            _ => return Err(Failure::invalid(format!("MaxResults must be 1 to {LIST_PAGE}, not {v}"))),
        },
    };
    let start = match body.get("NextToken").and_then(Value::as_str) {
        None => 0,
        Some(token) => token
            .strip_prefix("fake-page-")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n <= len)
            .ok_or_else(|| Failure::invalid(format!("bad NextToken {token:?}")))?,
    };
    let end = (start + size).min(len);
    Ok((start, end, (end < len).then(|| format!("fake-page-{end}"))))
}

fn with_token(mut answer: Value, next: Option<String>) -> Value {
    if let Some(next) = next {
        answer["NextToken"] = Value::from(next);
    }
    answer
}

/// An error answer: HTTP 400 with the AWS error code.
struct Failure {
    code: &'static str,
    message: String,
}

impl Failure {
    fn new(code: &'static str, message: impl Into<String>) -> Failure {
        Failure { code, message: message.into() }
    }

    fn invalid(message: impl Into<String>) -> Failure {
        Failure::new("InvalidInput", message)
    }
}

fn json_response(status: StatusCode, body: &Value, error: Option<&str>) -> Response {
    let mut response =
        (status, [(header::CONTENT_TYPE, "application/x-amz-json-1.1")], body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert("x-amzn-requestid", header::HeaderValue::from_static("fake-cloudmap"));
    if let Some(code) = error {
        headers.insert("x-amzn-errortype", header::HeaderValue::from_str(code).unwrap());
    }
    response
}

async fn handle(
    axum::extract::State(state): axum::extract::State<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or("");
    let operation = target.strip_prefix(TARGET_PREFIX).and_then(|o| o.strip_prefix('.')).unwrap_or(target);
    if let Some(i) = OPERATIONS.iter().position(|op| *op == operation) {
        state.calls[i].fetch_add(1, Ordering::Relaxed);
    }
    let answer = match serde_json::from_slice::<Value>(&body) {
        Ok(request) => state.answer(operation, &request),
        Err(e) => Err(Failure::new("SerializationException", format!("the body is not JSON: {e}"))),
    };
    match answer {
        Ok(answer) => json_response(StatusCode::OK, &answer, None),
        Err(failure) => {
            state.errors.fetch_add(1, Ordering::Relaxed);
            let body = json!({ "__type": failure.code, "message": failure.message });
            json_response(StatusCode::BAD_REQUEST, &body, Some(failure.code))
        }
    }
}
