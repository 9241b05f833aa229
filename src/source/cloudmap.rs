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
//! `--list-interval`.

pub mod api;
pub mod client;
pub mod filter;
pub mod inventory;
pub mod poller;
pub mod rate;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::sync::watch;

use self::api::CloudMapApi;
use self::filter::{NameFilter, Patterns};
use self::inventory::Inventory;
use self::poller::{Limits, Poller};
use super::SourceView;
use crate::metrics::Metrics;

pub const DEFAULT_POLL_INTERVAL: &str = "5s";
pub const DEFAULT_FULL_REFRESH_INTERVAL: &str = "30s";
pub const DEFAULT_LIST_INTERVAL: &str = "30s";
pub const DEFAULT_AWS_REQUEST_TIMEOUT: &str = "5s";
/// Per second; AWS's own controller uses 2/s for ListServices (AWS publishes no quota).
pub const DEFAULT_RATE_LIST: &str = "2";
/// Per second; the account quota is 1,000/s (burst 2,000).
pub const DEFAULT_RATE_DISCOVER: &str = "100";
/// Per second; the account quota is 3,000/s.
pub const DEFAULT_RATE_REVISION: &str = "300";
pub const DEFAULT_MASS_REMOVAL_THRESHOLD: &str = "0.5";
/// Longer than the AWS hiccups seen in practice, short next to how long a real
/// bulk deletion can wait to disappear from the mesh.
pub const DEFAULT_MASS_REMOVAL_CONFIRM_AFTER: &str = "5m";

#[derive(Debug, Clone, Args, Serialize)]
pub struct CloudMapArgs {
    /// AWS region of the Cloud Map namespaces [default: the AWS environment/profile].
    #[arg(long, env = "AWS_REGION")]
    pub aws_region: Option<String>,

    /// Cloud Map endpoint override, e.g. a moto_server on loopback. AWS_ENDPOINT_URL_SERVICEDISCOVERY also works.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,

    /// How often instances are polled (one DiscoverInstancesRevision per service).
    #[arg(long, env = "CLOUDMAP_XDS_POLL_INTERVAL", default_value = DEFAULT_POLL_INTERVAL, value_parser = humantime::parse_duration)]
    #[serde(with = "crate::config::humantime_serde_shim")]
    pub poll_interval: Duration,

    /// How often each service is read in full (DiscoverInstances), spread evenly; health changes are seen at this pace.
    #[arg(long, env = "CLOUDMAP_XDS_FULL_REFRESH_INTERVAL", default_value = DEFAULT_FULL_REFRESH_INTERVAL, value_parser = humantime::parse_duration)]
    #[serde(with = "crate::config::humantime_serde_shim")]
    pub full_refresh_interval: Duration,

    /// How often namespaces and services are listed (ListNamespaces, ListServices); new services appear at this pace.
    #[arg(long, env = "CLOUDMAP_XDS_LIST_INTERVAL", default_value = DEFAULT_LIST_INTERVAL, value_parser = humantime::parse_duration)]
    #[serde(with = "crate::config::humantime_serde_shim")]
    pub list_interval: Duration,

    /// Only these namespaces (names or globs with * and ?, comma-separated) [default: all].
    #[arg(long, env = "CLOUDMAP_XDS_INCLUDE_NAMESPACES", value_delimiter = ',')]
    pub include_namespaces: Vec<String>,

    /// Never these namespaces (names or globs); wins over --include-namespaces.
    #[arg(long, env = "CLOUDMAP_XDS_EXCLUDE_NAMESPACES", value_delimiter = ',')]
    pub exclude_namespaces: Vec<String>,

    /// Only these services: SERVICE or NAMESPACE/SERVICE, names or globs, comma-separated [default: all].
    #[arg(long, env = "CLOUDMAP_XDS_INCLUDE_SERVICES", value_delimiter = ',')]
    pub include_services: Vec<String>,

    /// Never these services (SERVICE or NAMESPACE/SERVICE globs); wins over --include-services.
    #[arg(long, env = "CLOUDMAP_XDS_EXCLUDE_SERVICES", value_delimiter = ',')]
    pub exclude_services: Vec<String>,

    /// Budget for ListNamespaces + ListServices, in requests per second.
    #[arg(long, env = "CLOUDMAP_XDS_RATE_LIST", default_value = DEFAULT_RATE_LIST, value_parser = positive_rate)]
    pub rate_list: f64,

    /// Budget for DiscoverInstances, in requests per second.
    #[arg(long, env = "CLOUDMAP_XDS_RATE_DISCOVER", default_value = DEFAULT_RATE_DISCOVER, value_parser = positive_rate)]
    pub rate_discover: f64,

    /// Budget for DiscoverInstancesRevision, in requests per second.
    #[arg(long, env = "CLOUDMAP_XDS_RATE_REVISION", default_value = DEFAULT_RATE_REVISION, value_parser = positive_rate)]
    pub rate_revision: f64,

    /// Longest one AWS request attempt may take; a call with its retries is bounded by 3x this plus 3s.
    #[arg(long, env = "CLOUDMAP_XDS_AWS_REQUEST_TIMEOUT", default_value = DEFAULT_AWS_REQUEST_TIMEOUT, value_parser = humantime::parse_duration)]
    #[serde(with = "crate::config::humantime_serde_shim")]
    pub aws_request_timeout: Duration,

    /// A listing that would remove more than this share (0 to 1) of all services at once is held until confirmed (see --mass-removal-confirm-after).
    #[arg(long, env = "CLOUDMAP_XDS_MASS_REMOVAL_THRESHOLD", default_value = DEFAULT_MASS_REMOVAL_THRESHOLD, value_parser = share)]
    pub mass_removal_threshold: f64,

    /// A held mass removal applies only once listings have confirmed it for this long (0s: the next listing confirms it); a first listing with no service at all waits as long before the first sync.
    #[arg(long, env = "CLOUDMAP_XDS_MASS_REMOVAL_CONFIRM_AFTER", default_value = DEFAULT_MASS_REMOVAL_CONFIRM_AFTER, value_parser = humantime::parse_duration)]
    #[serde(with = "crate::config::humantime_serde_shim")]
    pub mass_removal_confirm_after: Duration,

    /// Publish whatever was read after this long even if the first complete sync has not finished [default: wait forever].
    #[arg(long, env = "CLOUDMAP_XDS_INITIAL_SYNC_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "optional_duration")]
    pub initial_sync_timeout: Option<Duration>,

    /// Static credentials for tests and embedders; never read from flags or the
    /// environment (the default credential chain is used when unset).
    #[arg(skip)]
    #[serde(skip)]
    pub static_credentials: Option<StaticCredentials>,
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

fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of requests per second")),
    }
}

fn share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a share between 0 and 1")),
    }
}

fn optional_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => crate::config::humantime_serde_shim::serialize(d, s),
        None => s.serialize_none(),
    }
}

impl CloudMapArgs {
    /// Every flag at its default, read from nothing (no environment): for tests and embedders.
    pub fn new(region: impl Into<String>) -> Self {
        let secs = Duration::from_secs;
        CloudMapArgs {
            aws_region: Some(region.into()),
            aws_endpoint_url: None,
            poll_interval: secs(5),
            full_refresh_interval: secs(30),
            list_interval: secs(30),
            include_namespaces: Vec::new(),
            exclude_namespaces: Vec::new(),
            include_services: Vec::new(),
            exclude_services: Vec::new(),
            rate_list: 2.0,
            rate_discover: 100.0,
            rate_revision: 300.0,
            aws_request_timeout: secs(5),
            mass_removal_threshold: 0.5,
            mass_removal_confirm_after: secs(300),
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

    fn check(&self) -> Result<NameFilter, Error> {
        for (flag, d) in [
            ("--poll-interval", self.poll_interval),
            ("--full-refresh-interval", self.full_refresh_interval),
            ("--list-interval", self.list_interval),
            ("--aws-request-timeout", self.aws_request_timeout),
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
            mass_removal_confirm_after: self.mass_removal_confirm_after,
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
}

/// Checks the settings and builds the AWS client (failing clearly without a
/// region or credentials). Returns the view and the poller, for the caller to
/// run (and supervise). The view's registry stays `None` until the first
/// complete sync.
pub async fn start(
    args: &CloudMapArgs,
    metrics: &Metrics,
    shutdown: watch::Receiver<bool>,
) -> Result<(SourceView, impl Future<Output = ()> + Send + 'static), Error> {
    let filter = args.check()?;
    let settings = client::Settings {
        region: args.aws_region.clone(),
        endpoint_url: args.aws_endpoint_url.clone(),
        request_timeout: args.aws_request_timeout,
        static_credentials: args
            .static_credentials
            .as_ref()
            .map(|c| (c.access_key_id.clone(), c.secret_access_key.clone())),
    };
    let (api, region) = client::connect(&settings).await?;
    let call_timeout = settings.operation_timeout() + Duration::from_secs(1);
    Ok(start_with_api(
        Arc::new(api),
        format!("cloudmap:{region}"),
        args,
        filter,
        metrics,
        call_timeout,
        shutdown,
    ))
}

/// The view and the poller of any [`CloudMapApi`] (tests use fakes).
pub fn start_with_api<A: CloudMapApi>(
    api: Arc<A>,
    source_name: String,
    args: &CloudMapArgs,
    filter: NameFilter,
    metrics: &Metrics,
    call_timeout: Duration,
    shutdown: watch::Receiver<bool>,
) -> (SourceView, impl Future<Output = ()> + Send + 'static) {
    let (sink, view) = super::channel(source_name);
    let inventory = Inventory::new(args.inventory_config(filter), Instant::now(), fastrand::u64(..));
    let limits = Limits::new(args.rate_list, args.rate_discover, args.rate_revision);
    let poller = Poller::new(
        api,
        inventory,
        sink,
        metrics.source.clone(),
        limits,
        call_timeout,
        args.initial_sync_timeout,
    );
    (view, poller.run(shutdown))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CloudMapArgs,
    }

    fn parse(args: &[&str]) -> Result<CloudMapArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn new_matches_the_flag_defaults() {
        let parsed = parse(&["--aws-region", "eu-west-1"]).unwrap();
        let built = CloudMapArgs::new("eu-west-1");
        assert_eq!(serde_json::to_value(&parsed).unwrap(), serde_json::to_value(&built).unwrap());
    }

    #[test]
    fn lists_and_numbers_parse() {
        let args = parse(&[
            "--include-namespaces",
            "prod-*,shared",
            "--exclude-services",
            "*-canary",
            "--rate-discover",
            "50.5",
            "--initial-sync-timeout",
            "2m",
        ])
        .unwrap();
        assert_eq!(args.include_namespaces, ["prod-*", "shared"]);
        assert_eq!(args.exclude_services, ["*-canary"]);
        assert!((args.rate_discover - 50.5).abs() < f64::EPSILON);
        assert_eq!(args.initial_sync_timeout, Some(Duration::from_secs(120)));
        assert!(args.check().is_ok());
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let err = parse(&["--rate-list", "0"]).unwrap_err().to_string();
        assert!(err.contains("not a positive number"), "{err}");
        let err = parse(&["--mass-removal-threshold", "1.5"]).unwrap_err().to_string();
        assert!(err.contains("between 0 and 1"), "{err}");
        let args = parse(&["--poll-interval", "0s"]).unwrap();
        assert!(args.check().unwrap_err().to_string().contains("--poll-interval"));
        let args = parse(&["--include-services", "a/b/c"]).unwrap();
        assert!(args.check().unwrap_err().to_string().contains("--include-services"));
    }

    #[test]
    fn static_credentials_are_never_logged() {
        let args = CloudMapArgs::new("us-east-1").with_static_credentials("AKIDEXAMPLE", "very-secret");
        assert!(!format!("{args:?}").contains("very-secret"));
        assert!(!serde_json::to_string(&args).unwrap().contains("AKIDEXAMPLE"));
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
