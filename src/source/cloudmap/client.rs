//! Cloud Map over the AWS SDK: region, credentials, endpoint, timeouts and
//! retries; the start-up credential check; the `data-` host prefix fix for
//! custom endpoints; and the conversion of SDK types into `api` types, which
//! is where AWS types end.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_sdk_servicediscovery as sd;
use aws_sdk_servicediscovery::config::interceptors::{
    AfterDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextMut,
};
use aws_sdk_servicediscovery::config::retry::RetryConfig;
use aws_sdk_servicediscovery::config::timeout::TimeoutConfig;
use aws_sdk_servicediscovery::config::{
    ConfigBag, Credentials, Intercept, ProvideCredentials, Region, RuntimeComponents,
};
use aws_sdk_servicediscovery::error::{BoxError, DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_servicediscovery::types::{HealthStatus, HealthStatusFilter, NamespaceType, ServiceFilter};
use aws_smithy_http_client::tls;
use tracing::info;

use super::api::{
    ApiError, CloudMapApi, Discovered, ErrorKind, NamespaceInfo, NamespaceKind, Page, ServiceInfo,
};
use crate::error_text::error_chain;
use crate::model::{Health, Instance};

/// Attempts per call, the first included; the SDK's standard retry backs off
/// exponentially with jitter and classifies RequestLimitExceeded and ThrottlingException.
pub const MAX_ATTEMPTS: u32 = 3;
/// DiscoverInstances' maximum: a whole service (Cloud Map allows 1,000 instances per service).
pub const DISCOVER_MAX_RESULTS: i32 = 1000;
/// The SDK's own connect timeout for this behavior version.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(3100);
/// The most the standard retry sleeps between the attempts of one call (1 s base, doubling, jittered).
const RETRY_BACKOFF_BUDGET: Duration = Duration::from_secs(3);
/// How long the start-up credential check may take (IMDS and STS included).
pub const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(20);
/// The service-specific endpoint variable the SDK reads itself (service id `ServiceDiscovery`).
const SERVICE_ENDPOINT_ENV: &str = "AWS_ENDPOINT_URL_SERVICEDISCOVERY";

const CREDENTIAL_SOURCES: &str = "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), shared profile \
    (AWS_PROFILE, ~/.aws/credentials, ~/.aws/config), web identity / IRSA (AWS_WEB_IDENTITY_TOKEN_FILE, AWS_ROLE_ARN), \
    container credentials / EKS Pod Identity (AWS_CONTAINER_CREDENTIALS_FULL_URI or _RELATIVE_URI), EC2 instance metadata (IMDSv2)";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no AWS region: set --aws-region or AWS_REGION (or `region` in the AWS profile); Cloud Map is regional"
    )]
    NoRegion,
    #[error("no usable AWS credentials in region {region}: {detail}. Tried: {CREDENTIAL_SOURCES}")]
    NoCredentials { region: String, detail: String },
    #[error(
        "AWS credentials did not resolve within {timeout:?} in region {region}. Tried: {CREDENTIAL_SOURCES}"
    )]
    CredentialsTimeout { region: String, timeout: Duration },
}

/// How to reach Cloud Map.
#[derive(Clone, Default)]
pub struct Connection {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    /// The longest one attempt may take; a whole call, retries included, is
    /// bounded by [`Connection::operation_timeout`].
    pub request_timeout: Duration,
    /// Static keys instead of the default chain (tests and embedders).
    pub static_credentials: Option<(String, String)>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .field("request_timeout", &self.request_timeout)
            .field("static_credentials", &self.static_credentials.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Connection {
    /// Bound of one call with every retry and the backoff between them.
    pub fn operation_timeout(&self) -> Duration {
        self.request_timeout.saturating_mul(MAX_ATTEMPTS) + RETRY_BACKOFF_BUDGET
    }
}

/// Cloud Map through the AWS SDK.
#[derive(Debug, Clone)]
pub struct SdkCloudMap {
    client: sd::Client,
}

/// Builds the client and checks, once, that a region and credentials exist.
/// Returns the client and the region in use.
pub async fn connect(settings: &Connection) -> Result<(SdkCloudMap, String), Error> {
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https();
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT.min(settings.request_timeout))
        .operation_attempt_timeout(settings.request_timeout)
        .operation_timeout(settings.operation_timeout())
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client)
        .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS))
        .timeout_config(timeouts);
    if let Some(region) = non_empty(settings.region.as_deref()) {
        loader = loader.region(Region::new(region.to_owned()));
    }
    if let Some(url) = non_empty(settings.endpoint_url.as_deref()) {
        loader = loader.endpoint_url(url);
    }
    if let Some((key, secret)) = &settings.static_credentials {
        loader =
            loader.credentials_provider(Credentials::new(key, secret, None, None, "cloudmap-xds-static"));
    }
    let sdk = loader.load().await;
    let region = sdk.region().map(ToString::to_string).ok_or(Error::NoRegion)?;

    let provider = sdk.credentials_provider().ok_or_else(|| Error::NoCredentials {
        region: region.clone(),
        detail: "no credential provider".into(),
    })?;
    match tokio::time::timeout(CREDENTIALS_TIMEOUT, provider.provide_credentials()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            // The chain's error lists every provider on its own line; one line is easier to read in pod logs.
            let detail = DisplayErrorContext(&e).to_string().split_whitespace().collect::<Vec<_>>().join(" ");
            return Err(Error::NoCredentials { region, detail });
        }
        Err(_) => return Err(Error::CredentialsTimeout { region, timeout: CREDENTIALS_TIMEOUT }),
    }

    let mut config = sd::config::Builder::from(&sdk);
    let custom_endpoint = sdk.endpoint_url().is_some() || service_endpoint_from_env();
    if custom_endpoint {
        config = config.interceptor(StripDataPrefix);
    }
    info!(%region, endpoint = sdk.endpoint_url().unwrap_or("default"), custom_endpoint, "Cloud Map client ready");
    Ok((SdkCloudMap { client: sd::Client::from_conf(config.build()) }, region))
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.map(str::trim).filter(|s| !s.is_empty())
}

/// The SDK resolves `AWS_ENDPOINT_URL_SERVICEDISCOVERY` itself, out of our sight; we only need to know it is set.
fn service_endpoint_from_env() -> bool {
    let ignored =
        std::env::var("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !ignored && std::env::var(SERVICE_ENDPOINT_ENV).is_ok_and(|v| !v.trim().is_empty())
}

/// DiscoverInstances and DiscoverInstancesRevision are modelled with host prefix
/// `data-`, which the SDK always applies. AWS serves `data-servicediscovery.<region>…`,
/// but a custom endpoint (moto on 127.0.0.1, a proxy) has no such host, and the
/// SDK has no switch; so with a custom endpoint the prefix is taken off again. Public for
/// other SDK clients aimed at such an endpoint (the tests' moto seeder).
#[derive(Debug)]
pub struct StripDataPrefix;

impl Intercept for StripDataPrefix {
    fn name(&self) -> &'static str {
        "StripDataPrefix"
    }

    fn modify_before_signing(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = context.request_mut();
        let stripped = strip_data_prefix(request.uri());
        if let Some(uri) = stripped {
            request.set_uri(uri.as_str())?;
        }
        Ok(())
    }
}

fn strip_data_prefix(uri: &str) -> Option<String> {
    let (scheme, rest) = uri.split_once("://")?;
    rest.strip_prefix("data-").map(|host| format!("{scheme}://{host}"))
}

/// Keeps a copy of the raw response body of one call. ListServices responses
/// from moto carry each service's `NamespaceId`, which `ServiceSummary` lacks;
/// with it the poller filters client-side what moto's ignored filter lets through.
#[derive(Debug, Clone, Default)]
struct KeepBody(Arc<Mutex<Option<Vec<u8>>>>);

impl Intercept for KeepBody {
    fn name(&self) -> &'static str {
        "KeepBody"
    }

    fn read_after_deserialization(
        &self,
        context: &AfterDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(bytes) = context.response().body().bytes() {
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(bytes.to_vec());
        }
        Ok(())
    }
}

impl KeepBody {
    /// `Id` → `NamespaceId` of the services in a ListServices body, where present.
    fn namespace_ids(&self) -> HashMap<String, String> {
        #[derive(serde::Deserialize)]
        struct Body {
            #[serde(rename = "Services", default)]
            services: Vec<Summary>,
        }
        #[derive(serde::Deserialize)]
        struct Summary {
            #[serde(rename = "Id")]
            id: Option<String>,
            #[serde(rename = "NamespaceId")]
            namespace_id: Option<String>,
        }
        let body = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(Ok(body)) = body.map(|b| serde_json::from_slice::<Body>(&b)) else { return HashMap::new() };
        body.services.into_iter().filter_map(|s| Some((s.id?, s.namespace_id?))).collect()
    }
}

/// Classifies an SDK error and renders it on one line.
fn classify<E>(err: SdkError<E, sd::config::http::HttpResponse>) -> ApiError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let kind = match &err {
        SdkError::TimeoutError(_) => ErrorKind::Timeout,
        SdkError::DispatchFailure(d) if d.is_timeout() => ErrorKind::Timeout,
        _ => kind_of_answer(err.code(), status),
    };
    let message = match (err.code(), err.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => match &err {
            SdkError::TimeoutError(_) => "request timed out".to_owned(),
            _ => error_chain(&err),
        },
    };
    ApiError::new(kind, message)
}

/// Classifies an error answer by its code and HTTP status.
fn kind_of_answer(code: Option<&str>, status: Option<u16>) -> ErrorKind {
    match code {
        Some("RequestLimitExceeded" | "ThrottlingException" | "Throttling" | "TooManyRequestsException") => {
            ErrorKind::Throttled
        }
        Some("NamespaceNotFound" | "ServiceNotFound") => ErrorKind::NotFound,
        // AWS JSON services answer an IAM denial with HTTP 400 `AccessDeniedException`;
        // `AccessDenied` and a bare 403 are the other spellings of the same answer.
        Some("AccessDeniedException" | "AccessDenied") => ErrorKind::Denied,
        None if status == Some(403) => ErrorKind::Denied,
        _ if status == Some(429) => ErrorKind::Throttled,
        _ => ErrorKind::Other,
    }
}

fn system_time(date: Option<&sd::primitives::DateTime>) -> SystemTime {
    date.and_then(|d| SystemTime::try_from(*d).ok()).unwrap_or(SystemTime::UNIX_EPOCH)
}

fn namespace_info(ns: &sd::types::NamespaceSummary) -> Option<NamespaceInfo> {
    let (id, name) = (ns.id()?.to_owned(), ns.name()?.to_owned());
    let http_name = ns
        .properties()
        .and_then(|p| p.http_properties())
        .and_then(|h| h.http_name())
        .filter(|h| !h.is_empty())
        .unwrap_or(&name)
        .to_owned();
    let kind = match ns.r#type() {
        Some(NamespaceType::Http) => NamespaceKind::Http,
        Some(NamespaceType::DnsPrivate) => NamespaceKind::DnsPrivate,
        Some(NamespaceType::DnsPublic) => NamespaceKind::DnsPublic,
        other => NamespaceKind::Other(other.map(|t| t.as_str().to_owned()).unwrap_or_default()),
    };
    Some(NamespaceInfo { id, name, http_name, kind })
}

fn service_info(
    svc: &sd::types::ServiceSummary,
    raw_namespace_ids: &HashMap<String, String>,
) -> Option<ServiceInfo> {
    let (id, name) = (svc.id()?.to_owned(), svc.name()?.to_owned());
    // `DnsConfig.NamespaceId` is deprecated as a request field, but AWS still reports it for DNS services.
    #[allow(deprecated)]
    let dns_namespace_id = svc.dns_config().and_then(|d| d.namespace_id()).map(ToOwned::to_owned);
    let namespace_id = raw_namespace_ids.get(&id).cloned().or(dns_namespace_id);
    Some(ServiceInfo {
        namespace_id,
        created: system_time(svc.create_date()),
        health_checked: svc.health_check_config().is_some() || svc.health_check_custom_config().is_some(),
        id,
        name,
    })
}

fn instance(i: &sd::types::HttpInstanceSummary) -> Option<Instance> {
    let health = match i.health_status() {
        Some(HealthStatus::Healthy) => Health::Healthy,
        Some(HealthStatus::Unhealthy) => Health::Unhealthy,
        // The wire value UNKNOWN is the SDK's `UnknownValue`.
        _ => Health::Unknown,
    };
    let attributes = i.attributes().map(|a| a.iter().collect()).unwrap_or_default();
    Some(Instance { id: i.instance_id()?.to_owned(), health, attributes })
}

fn page_token(token: Option<&str>) -> Option<String> {
    token.filter(|t| !t.is_empty()).map(ToOwned::to_owned)
}

impl CloudMapApi for SdkCloudMap {
    async fn list_namespaces(&self, next_token: Option<String>) -> Result<Page<NamespaceInfo>, ApiError> {
        let out = self.client.list_namespaces().set_next_token(next_token).send().await.map_err(classify)?;
        Ok(Page {
            items: out.namespaces().iter().filter_map(namespace_info).collect(),
            next_token: page_token(out.next_token()),
        })
    }

    async fn list_services(
        &self,
        namespace_id: &str,
        next_token: Option<String>,
    ) -> Result<Page<ServiceInfo>, ApiError> {
        let filter = ServiceFilter::builder()
            .name(sd::types::ServiceFilterName::NamespaceId)
            .values(namespace_id)
            .condition(sd::types::FilterCondition::Eq)
            .build()
            .map_err(|e| ApiError::new(ErrorKind::Other, format!("building the NAMESPACE_ID filter: {e}")))?;
        let body = KeepBody::default();
        let out = self
            .client
            .list_services()
            .filters(filter)
            .set_next_token(next_token)
            .customize()
            .interceptor(body.clone())
            .send()
            .await
            .map_err(classify)?;
        let raw_namespace_ids = body.namespace_ids();
        Ok(Page {
            items: out.services().iter().filter_map(|s| service_info(s, &raw_namespace_ids)).collect(),
            next_token: page_token(out.next_token()),
        })
    }

    async fn discover_instances(
        &self,
        namespace_http_name: &str,
        service: &str,
    ) -> Result<Discovered, ApiError> {
        let out = self
            .client
            .discover_instances()
            .namespace_name(namespace_http_name)
            .service_name(service)
            .max_results(DISCOVER_MAX_RESULTS)
            .health_status(HealthStatusFilter::All)
            .send()
            .await
            .map_err(classify)?;
        Ok(Discovered {
            instances: out.instances().iter().filter_map(instance).collect(),
            revision: out.instances_revision(),
        })
    }

    async fn discover_instances_revision(
        &self,
        namespace_http_name: &str,
        service: &str,
    ) -> Result<i64, ApiError> {
        let out = self
            .client
            .discover_instances_revision()
            .namespace_name(namespace_http_name)
            .service_name(service)
            .send()
            .await
            .map_err(classify)?;
        out.instances_revision().ok_or_else(|| {
            ApiError::new(ErrorKind::Other, "DiscoverInstancesRevision returned no InstancesRevision")
        })
    }

    async fn get_service_attributes(&self, service_id: &str) -> Result<BTreeMap<String, String>, ApiError> {
        let out =
            self.client.get_service_attributes().service_id(service_id).send().await.map_err(classify)?;
        Ok(out
            .service_attributes()
            .and_then(|a| a.attributes())
            .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_prefix_comes_off_custom_endpoints_only_once() {
        assert_eq!(
            strip_data_prefix("http://data-127.0.0.1:5000/").as_deref(),
            Some("http://127.0.0.1:5000/")
        );
        assert_eq!(
            strip_data_prefix("https://data-data-x.example/").as_deref(),
            Some("https://data-x.example/")
        );
        assert_eq!(strip_data_prefix("http://127.0.0.1:5000/"), None);
        assert_eq!(strip_data_prefix("not a uri"), None);
    }

    #[test]
    fn raw_namespace_ids_are_read_from_list_services_bodies() {
        let body = KeepBody::default();
        *body.0.lock().unwrap() = Some(
            br#"{"Services":[{"Id":"srv-1","NamespaceId":"ns-1","Name":"a"},{"Id":"srv-2","Name":"b"}]}"#
                .to_vec(),
        );
        assert_eq!(body.namespace_ids(), HashMap::from([("srv-1".to_owned(), "ns-1".to_owned())]));
        *body.0.lock().unwrap() = Some(b"not json".to_vec());
        assert!(body.namespace_ids().is_empty());
    }

    #[test]
    fn summaries_convert_with_fallbacks() {
        let ns = sd::types::NamespaceSummary::builder()
            .id("ns-1")
            .name("shop")
            .r#type(NamespaceType::DnsPrivate)
            .properties(
                sd::types::NamespaceProperties::builder()
                    .http_properties(sd::types::HttpProperties::builder().http_name("shop-1a2b").build())
                    .build(),
            )
            .build();
        let info = namespace_info(&ns).unwrap();
        assert_eq!((info.http_name.as_str(), info.kind), ("shop-1a2b", NamespaceKind::DnsPrivate));
        let bare = sd::types::NamespaceSummary::builder().id("ns-2").name("blog").build();
        assert_eq!(namespace_info(&bare).unwrap().http_name, "blog");

        let svc = sd::types::ServiceSummary::builder()
            .id("srv-1")
            .name("api")
            .create_date(sd::primitives::DateTime::from_secs(1_700_000_000))
            .health_check_custom_config(sd::types::HealthCheckCustomConfig::builder().build())
            .build();
        let info = service_info(&svc, &HashMap::new()).unwrap();
        assert_eq!(info.created, SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        assert!(info.health_checked);
        assert_eq!(info.namespace_id, None);
        let bare = sd::types::ServiceSummary::builder().id("srv-2").name("db").build();
        let info = service_info(&bare, &HashMap::from([("srv-2".into(), "ns-9".into())])).unwrap();
        assert_eq!((info.created, info.health_checked), (SystemTime::UNIX_EPOCH, false));
        assert_eq!(info.namespace_id.as_deref(), Some("ns-9"));
    }

    #[test]
    fn answers_are_classified_by_code_then_status() {
        let kind = |code, status| kind_of_answer(code, Some(status));
        assert_eq!(kind(Some("AccessDeniedException"), 400), ErrorKind::Denied);
        assert_eq!(kind(Some("AccessDenied"), 403), ErrorKind::Denied);
        assert_eq!(kind(None, 403), ErrorKind::Denied);
        // A 403 with another code is about the credentials, not the policy.
        assert_eq!(kind(Some("ExpiredTokenException"), 403), ErrorKind::Other);
        assert_eq!(kind(Some("ThrottlingException"), 400), ErrorKind::Throttled);
        assert_eq!(kind(Some("RequestLimitExceeded"), 400), ErrorKind::Throttled);
        assert_eq!(kind(None, 429), ErrorKind::Throttled);
        assert_eq!(kind(Some("ServiceNotFound"), 400), ErrorKind::NotFound);
        assert_eq!(kind(Some("InvalidInput"), 400), ErrorKind::Other);
        assert_eq!(kind_of_answer(None, None), ErrorKind::Other);
    }

    #[test]
    fn error_chains_are_one_line_without_debug_dumps() {
        #[derive(Debug, thiserror::Error)]
        #[error("dispatch failure")]
        struct Outer(#[source] std::io::Error);
        let err = Outer(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection\nrefused"));
        assert_eq!(error_chain(&err), "dispatch failure: Connection refused");
    }

    #[test]
    fn unknown_health_maps_to_unknown() {
        let i = sd::types::HttpInstanceSummary::builder()
            .instance_id("i-1")
            .health_status(HealthStatus::from("UNKNOWN"))
            .attributes("AWS_INSTANCE_IPV4", "10.0.0.1")
            .build();
        let converted = instance(&i).unwrap();
        assert_eq!(converted.health, Health::Unknown);
        assert_eq!(&converted.attributes["AWS_INSTANCE_IPV4"], "10.0.0.1");
    }
}
