//! AWS Cloud Map source: polls Cloud Map and publishes every service of every
//! (included) namespace as the registry.
//!
//! - `api`: the four reads as a trait with plain types; `client`: that trait
//!   over the AWS SDK (AWS types end there).
//! - `inventory`: the pure state (last good state per service, schedules,
//!   mass-removal hold); `poller`: the async loop around it.
//! - `filter`: include/exclude globs; `rate`: per-API token buckets.
//!
//! Cost: an idle poll makes one DiscoverInstancesRevision call per service and
//! no control-plane call; DiscoverInstances only for services whose revision
//! changed, and for every service once per `--full-refresh-interval` (health
//! changes do not move the revision); ListNamespaces and ListServices once per
//! `--list-interval`, and GetServiceAttributes for every service each listing
//! lists (within `--rate-attributes`; one probe per listing while IAM denies it).

pub mod api;
pub mod client;
pub mod filter;
pub mod inventory;
pub mod poller;
pub mod rate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use self::api::CloudMapApi;
use self::filter::{NameFilter, Patterns};
use self::inventory::Inventory;
use self::poller::{Limits, Poller};
use super::SourceView;
use crate::metrics::Metrics;
use crate::model::Registry;

/// How the Cloud Map source reads AWS: plain values, set by `config` (the flags)
/// or by tests and embedders through [`Settings::new`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub region: Option<String>,
    /// A custom Cloud Map endpoint (moto on loopback, a proxy).
    pub endpoint_url: Option<String>,
    /// One DiscoverInstancesRevision per service per poll.
    pub poll_interval: Duration,
    /// Each service is read in full (DiscoverInstances) once per this long.
    pub full_refresh_interval: Duration,
    /// Namespaces and services are listed once per this long.
    pub list_interval: Duration,
    pub include_namespaces: Vec<String>,
    pub exclude_namespaces: Vec<String>,
    pub include_services: Vec<String>,
    pub exclude_services: Vec<String>,
    /// Requests per second for ListNamespaces + ListServices.
    pub rate_list: f64,
    pub rate_discover: f64,
    pub rate_revision: f64,
    /// Requests per second for GetServiceAttributes.
    pub rate_attributes: f64,
    /// The longest one request attempt may take.
    pub request_timeout: Duration,
    /// Share (0..=1) of all services one listing may remove without confirmation.
    pub mass_removal_threshold: f64,
    /// Publish whatever was read after this long even without a complete sync.
    pub initial_sync_timeout: Option<Duration>,
    /// Static keys instead of the default credential chain (tests and embedders).
    pub static_credentials: Option<StaticCredentials>,
}

/// Defaults of [`Settings`]; the flags' defaults are the same values (a test checks).
pub mod defaults {
    use std::time::Duration;

    pub const POLL_INTERVAL: Duration = Duration::from_secs(5);
    pub const FULL_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
    pub const LIST_INTERVAL: Duration = Duration::from_secs(30);
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
    /// Per second; AWS's own controller uses 2/s for ListServices (AWS publishes no quota).
    pub const RATE_LIST: f64 = 2.0;
    /// Per second; the account quota is 1,000/s (burst 2,000).
    pub const RATE_DISCOVER: f64 = 100.0;
    /// Per second; the account quota is 3,000/s.
    pub const RATE_REVISION: f64 = 300.0;
    /// Per second. AWS publishes no quota for GetServiceAttributes (a control-plane
    /// read); AWS's usual per-API refill for control-plane reads is 20/s (EC2's
    /// `Describe*`), and the two replicas we recommend poll independently, so each
    /// takes half. 1,000 services are read in about 100 s.
    pub const RATE_ATTRIBUTES: f64 = 10.0;
    pub const MASS_REMOVAL_THRESHOLD: f64 = 0.5;
}

/// An access key pair given in code.
#[derive(Clone)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Every setting at its default: for tests and embedders.
    pub fn new(region: impl Into<String>) -> Self {
        Settings {
            region: Some(region.into()),
            endpoint_url: None,
            poll_interval: defaults::POLL_INTERVAL,
            full_refresh_interval: defaults::FULL_REFRESH_INTERVAL,
            list_interval: defaults::LIST_INTERVAL,
            include_namespaces: Vec::new(),
            exclude_namespaces: Vec::new(),
            include_services: Vec::new(),
            exclude_services: Vec::new(),
            rate_list: defaults::RATE_LIST,
            rate_discover: defaults::RATE_DISCOVER,
            rate_revision: defaults::RATE_REVISION,
            rate_attributes: defaults::RATE_ATTRIBUTES,
            request_timeout: defaults::REQUEST_TIMEOUT,
            mass_removal_threshold: defaults::MASS_REMOVAL_THRESHOLD,
            initial_sync_timeout: None,
            static_credentials: None,
        }
    }

    pub fn with_static_credentials(mut self, access_key_id: &str, secret_access_key: &str) -> Self {
        self.static_credentials = Some(StaticCredentials {
            access_key_id: access_key_id.to_owned(),
            secret_access_key: secret_access_key.to_owned(),
        });
        self
    }

    /// Checks what the flag parsers cannot; returns the name filter.
    pub fn check(&self) -> Result<NameFilter, Error> {
        for (flag, d) in [
            ("--poll-interval", self.poll_interval),
            ("--full-refresh-interval", self.full_refresh_interval),
            ("--list-interval", self.list_interval),
            ("--aws-request-timeout", self.request_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::Setting(format!("{flag} must be more than zero")));
            }
        }
        if !(0.0..=1.0).contains(&self.mass_removal_threshold) {
            return Err(Error::Setting("--mass-removal-threshold must be between 0 and 1".into()));
        }
        Ok(NameFilter::new(Patterns {
            include_namespaces: &self.include_namespaces,
            exclude_namespaces: &self.exclude_namespaces,
            include_services: &self.include_services,
            exclude_services: &self.exclude_services,
        })?)
    }

    fn inventory_config(&self, filter: NameFilter) -> inventory::Config {
        inventory::Config {
            poll_interval: self.poll_interval,
            list_interval: self.list_interval,
            full_refresh_interval: self.full_refresh_interval,
            mass_removal_threshold: self.mass_removal_threshold,
            filter,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Client(#[from] client::Error),
    #[error(transparent)]
    Filter(#[from] filter::Error),
    #[error("{0}")]
    Setting(String),
    #[error(
        "Cloud Map was not read completely within {timeout:?} (instances of {read} of {listed} services read); last error: {last_error}"
    )]
    ReadTimeout { timeout: Duration, read: usize, listed: usize, last_error: String },
}

/// Checks the settings, builds the AWS client (failing clearly without a region
/// or credentials), and starts polling. The view's registry stays `None` until
/// the first complete sync.
pub async fn start(
    settings: &Settings,
    metrics: &Metrics,
    shutdown: watch::Receiver<bool>,
) -> Result<SourceView, Error> {
    let filter = settings.check()?;
    let connection = client::Connection {
        region: settings.region.clone(),
        endpoint_url: settings.endpoint_url.clone(),
        request_timeout: settings.request_timeout,
        static_credentials: settings
            .static_credentials
            .as_ref()
            .map(|c| (c.access_key_id.clone(), c.secret_access_key.clone())),
    };
    let (api, region) = client::connect(&connection).await?;
    let call_timeout = connection.operation_timeout() + Duration::from_secs(1);
    Ok(start_with_api(
        Arc::new(api),
        format!("cloudmap:{region}"),
        settings,
        filter,
        metrics,
        call_timeout,
        shutdown,
    ))
}

/// One complete read of Cloud Map, exactly what `serve` publishes first (same
/// settings, filters and health handling), for `render` and `export`.
pub async fn read_once(settings: &Settings, timeout: Duration) -> Result<Registry, Error> {
    let metrics = Metrics::unregistered();
    let (stop, shutdown) = watch::channel(false);
    let view = start(settings, &metrics, shutdown).await?;
    let result = first_complete(view, timeout).await;
    stop.send_replace(true);
    result
}

/// Waits for a source's first complete registry.
async fn first_complete(mut view: SourceView, timeout: Duration) -> Result<Registry, Error> {
    let waited = tokio::time::timeout(timeout, view.registry.wait_for(Option::is_some))
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|registry| registry.as_ref().map(|r| Registry::clone(r)));
    if let Some(registry) = waited {
        return Ok(registry);
    }
    let status = view.status();
    let listed = status.services.keys().filter(|(_, service)| !service.is_empty()).count();
    let read = status
        .services
        .iter()
        .filter(|((_, service), s)| !service.is_empty() && s.last_success.is_some())
        .count();
    Err(Error::ReadTimeout {
        timeout,
        read,
        listed,
        last_error: status.last_error.unwrap_or_else(|| "none".into()),
    })
}

/// Starts polling any [`CloudMapApi`] (tests use fakes).
pub fn start_with_api<A: CloudMapApi>(
    api: Arc<A>,
    source_name: String,
    settings: &Settings,
    filter: NameFilter,
    metrics: &Metrics,
    call_timeout: Duration,
    shutdown: watch::Receiver<bool>,
) -> SourceView {
    let (sink, view) = super::channel(source_name);
    let inventory = Inventory::new(settings.inventory_config(filter), Instant::now(), fastrand::u64(..));
    let limits = Limits::new(
        settings.rate_list,
        settings.rate_discover,
        settings.rate_revision,
        settings.rate_attributes,
    );
    let poller = Poller::new(
        api,
        inventory,
        sink,
        metrics.source.clone(),
        limits,
        call_timeout,
        settings.initial_sync_timeout,
    );
    tokio::spawn(poller.run(shutdown));
    view
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_credentials_are_never_logged() {
        let settings = Settings::new("us-east-1").with_static_credentials("AKIDEXAMPLE", "very-secret");
        assert!(!format!("{settings:?}").contains("very-secret"));
    }

    #[test]
    fn zero_intervals_are_refused() {
        let settings = Settings { poll_interval: Duration::ZERO, ..Settings::new("x") };
        assert!(settings.check().unwrap_err().to_string().contains("--poll-interval"));
    }

    #[test]
    fn start_errors_are_one_line_naming_what_was_tried() {
        let err = Error::from(client::Error::NoCredentials {
            region: "us-east-1".into(),
            detail: "none found".into(),
        });
        let text = err.to_string();
        assert!(!text.contains('\n'), "{text}");
        for tried in ["AWS_ACCESS_KEY_ID", "AWS_PROFILE", "IRSA", "EKS Pod Identity", "instance metadata"] {
            assert!(text.contains(tried), "{tried} missing from {text}");
        }
        assert!(Error::from(client::Error::NoRegion).to_string().contains("--aws-region"));
    }
}
