//! The Cloud Map flags (`serve`, `render` and `export` share them), turned into the
//! source's plain [`Settings`].

use std::time::Duration;

use clap::Args;
use serde::Serialize;

use crate::source::cloudmap::{Settings, StaticCredentials};

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
/// Per second; AWS publishes no quota (see `source::cloudmap::defaults::RATE_ATTRIBUTES` for why 10).
pub const DEFAULT_RATE_ATTRIBUTES: &str = "10";
pub const DEFAULT_MASS_REMOVAL_THRESHOLD: &str = "0.5";

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
    #[serde(with = "super::humantime_serde_shim")]
    pub poll_interval: Duration,

    /// How often each service is read in full (DiscoverInstances), spread evenly; health changes are seen at this pace.
    #[arg(long, env = "CLOUDMAP_XDS_FULL_REFRESH_INTERVAL", default_value = DEFAULT_FULL_REFRESH_INTERVAL, value_parser = humantime::parse_duration)]
    #[serde(with = "super::humantime_serde_shim")]
    pub full_refresh_interval: Duration,

    /// How often namespaces and services are listed (ListNamespaces, ListServices); new services appear at this pace.
    #[arg(long, env = "CLOUDMAP_XDS_LIST_INTERVAL", default_value = DEFAULT_LIST_INTERVAL, value_parser = humantime::parse_duration)]
    #[serde(with = "super::humantime_serde_shim")]
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

    /// Budget for GetServiceAttributes, in requests per second (every service once per listing).
    #[arg(long, env = "CLOUDMAP_XDS_RATE_ATTRIBUTES", default_value = DEFAULT_RATE_ATTRIBUTES, value_parser = positive_rate)]
    pub rate_attributes: f64,

    /// Longest one AWS request attempt may take; a call with its retries is bounded by 3x this plus 3s.
    #[arg(long, env = "CLOUDMAP_XDS_AWS_REQUEST_TIMEOUT", default_value = DEFAULT_AWS_REQUEST_TIMEOUT, value_parser = humantime::parse_duration)]
    #[serde(with = "super::humantime_serde_shim")]
    pub aws_request_timeout: Duration,

    /// A listing that would remove more than this share (0 to 1) of all services at once is held until the next listing confirms it.
    #[arg(long, env = "CLOUDMAP_XDS_MASS_REMOVAL_THRESHOLD", default_value = DEFAULT_MASS_REMOVAL_THRESHOLD, value_parser = share)]
    pub mass_removal_threshold: f64,

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
        Some(d) => super::humantime_serde_shim::serialize(d, s),
        None => s.serialize_none(),
    }
}

impl CloudMapArgs {
    /// The source's settings; what the parsers cannot check is checked by [`Settings::check`].
    pub fn settings(&self) -> Settings {
        Settings {
            region: self.aws_region.clone(),
            endpoint_url: self.aws_endpoint_url.clone(),
            poll_interval: self.poll_interval,
            full_refresh_interval: self.full_refresh_interval,
            list_interval: self.list_interval,
            include_namespaces: self.include_namespaces.clone(),
            exclude_namespaces: self.exclude_namespaces.clone(),
            include_services: self.include_services.clone(),
            exclude_services: self.exclude_services.clone(),
            rate_list: self.rate_list,
            rate_discover: self.rate_discover,
            rate_revision: self.rate_revision,
            rate_attributes: self.rate_attributes,
            request_timeout: self.aws_request_timeout,
            mass_removal_threshold: self.mass_removal_threshold,
            initial_sync_timeout: self.initial_sync_timeout,
            static_credentials: self.static_credentials.clone(),
        }
    }

    pub fn with_static_credentials(mut self, access_key_id: &str, secret_access_key: &str) -> Self {
        self.static_credentials = Some(StaticCredentials {
            access_key_id: access_key_id.to_owned(),
            secret_access_key: secret_access_key.to_owned(),
        });
        self
    }
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
    fn flag_defaults_are_the_settings_defaults() {
        let parsed = parse(&["--aws-region", "eu-west-1"]).unwrap().settings();
        let built = Settings::new("eu-west-1");
        assert_eq!(format!("{parsed:?}"), format!("{built:?}"));
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
            "--rate-attributes",
            "2.5",
            "--initial-sync-timeout",
            "2m",
        ])
        .unwrap();
        assert_eq!(args.include_namespaces, ["prod-*", "shared"]);
        assert_eq!(args.exclude_services, ["*-canary"]);
        assert!((args.rate_discover - 50.5).abs() < f64::EPSILON);
        assert!((args.settings().rate_attributes - 2.5).abs() < f64::EPSILON);
        assert_eq!(args.initial_sync_timeout, Some(Duration::from_secs(120)));
        assert!(args.settings().check().is_ok());
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let err = parse(&["--rate-list", "0"]).unwrap_err().to_string();
        assert!(err.contains("not a positive number"), "{err}");
        let err = parse(&["--rate-attributes", "none"]).unwrap_err().to_string();
        assert!(err.contains("not a positive number"), "{err}");
        let err = parse(&["--mass-removal-threshold", "1.5"]).unwrap_err().to_string();
        assert!(err.contains("between 0 and 1"), "{err}");
        let args = parse(&["--poll-interval", "0s"]).unwrap();
        assert!(args.settings().check().unwrap_err().to_string().contains("--poll-interval"));
        let args = parse(&["--include-services", "a/b/c"]).unwrap();
        assert!(args.settings().check().unwrap_err().to_string().contains("--include-services"));
    }
}
