//! Command line and environment: every flag has an `env`, every default a name.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

pub mod cloudmap;

pub use self::cloudmap::CloudMapArgs;
use crate::model::HealthFilter;
use crate::translate::settings::{
    self, AddressMode, Defaults, ResolutionMode, parse_export_to, parse_location, parse_port_protocols,
};

pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:15099";
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:15098";
/// Used when neither `--publish-namespace` nor `POD_NAMESPACE` is set.
pub const DEFAULT_PUBLISH_NAMESPACE: &str = "istio-system";
/// The downward-API variable Kubernetes users set to the pod's namespace.
pub const POD_NAMESPACE_ENV: &str = "POD_NAMESPACE";
pub const DEFAULT_SHUTDOWN_GRACE_PERIOD: &str = "10s";
pub const DEFAULT_LOG_FILTER: &str = "info";
/// How long `render` and `export` may take to read Cloud Map once, completely.
pub const DEFAULT_READ_TIMEOUT: &str = "5m";

#[derive(Debug, Parser)]
#[command(
    name = "cloudmap-xds",
    version,
    about = "Serves AWS Cloud Map services to istiod as ServiceEntries over MCP-over-xDS"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the MCP-over-xDS server istiod dials (`meshConfig.configSources: - address: xds://HOST:PORT`).
    Serve(Box<ServeArgs>),
    /// Print the ServiceEntries as Kubernetes YAML (to preview, diff or `kubectl apply`): from a registry
    /// file, or, without one, from one complete read of Cloud Map with the same flags as `serve`.
    Render(Box<RenderArgs>),
    /// Print Cloud Map's current state as a registry file, to reproduce offline what `serve` sees.
    Export(Box<ExportArgs>),
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct ServeArgs {
    /// gRPC listen address: ADS, reflection, the debug service and grpc.health.v1.
    #[arg(long, env = "CLOUDMAP_XDS_GRPC_ADDR", default_value = DEFAULT_GRPC_ADDR)]
    pub grpc_addr: SocketAddr,

    /// Admin HTTP listen address: /healthz, /ready, /metrics, /debug/snapshot.
    #[arg(long, env = "CLOUDMAP_XDS_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,

    /// Serve this YAML registry file (watched for edits) instead of AWS Cloud Map.
    #[arg(long, env = "CLOUDMAP_XDS_REGISTRY_FILE")]
    pub registry_file: Option<PathBuf>,

    #[command(flatten)]
    pub publish: PublishArgs,

    /// Log format.
    #[arg(long, env = "CLOUDMAP_XDS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, in `tracing` EnvFilter syntax (e.g. `info,cloudmap_xds::xds=debug`).
    #[arg(long, env = "CLOUDMAP_XDS_LOG", default_value = DEFAULT_LOG_FILTER)]
    pub log: String,

    /// How long a SIGTERM drain may take before the process exits anyway.
    #[arg(long, env = "CLOUDMAP_XDS_SHUTDOWN_GRACE_PERIOD", default_value = DEFAULT_SHUTDOWN_GRACE_PERIOD, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_shim")]
    pub shutdown_grace_period: Duration,

    #[command(flatten)]
    pub cloudmap: CloudMapArgs,
}

/// How ServiceEntries are published; shared by `serve` and `render`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct PublishArgs {
    /// Istio namespace of the published ServiceEntries [default: $POD_NAMESPACE, else istio-system].
    #[arg(long, env = "CLOUDMAP_XDS_PUBLISH_NAMESPACE")]
    pub publish_namespace: Option<String>,

    /// Which instances become endpoints, by Cloud Map health status.
    #[arg(long, env = "CLOUDMAP_XDS_HEALTH_FILTER", value_enum, default_value_t = HealthFilter::HealthyOrElseAll)]
    pub health_filter: HealthFilter,

    /// Protocols of instance ports for services that declare no ports (`cloudmap-xds/ports`), as
    /// NUMBER=PROTOCOL pairs, e.g. `8080=HTTP,50051=GRPC`. 80 is HTTP and 443 HTTPS unless set here; others TCP.
    #[arg(long, env = "CLOUDMAP_XDS_PORT_PROTOCOLS", default_value = "", value_parser = checked(parse_port_protocols))]
    pub port_protocols: String,

    /// `location` of services that set none (`cloudmap-xds/location`): MESH_EXTERNAL or MESH_INTERNAL [default: MESH_EXTERNAL].
    #[arg(long, env = "CLOUDMAP_XDS_DEFAULT_LOCATION", value_parser = checked(parse_location))]
    pub default_location: Option<String>,

    /// `exportTo` of services that set none (`cloudmap-xds/export-to`): namespaces, `.` (the publish namespace), `*` or `~` [default: Istio's, everywhere].
    #[arg(long, env = "CLOUDMAP_XDS_DEFAULT_EXPORT_TO", value_parser = checked(parse_export_to))]
    pub default_export_to: Option<String>,

    /// `resolution` of services that set none (`cloudmap-xds/resolution`): auto (STATIC when every endpoint is an IP, else DNS), STATIC, DNS, DNS_ROUND_ROBIN or NONE.
    #[arg(long, env = "CLOUDMAP_XDS_DEFAULT_RESOLUTION", default_value = "auto", value_parser = checked(str::parse::<ResolutionMode>))]
    pub default_resolution: String,

    /// `addresses` of services that set none (`cloudmap-xds/addresses`): lowest (the lowest endpoint IP), all (every endpoint IP), none, or IPs/CIDRs.
    #[arg(long, env = "CLOUDMAP_XDS_DEFAULT_ADDRESSES", default_value = DEFAULT_ADDRESSES, value_parser = checked(str::parse::<AddressMode>))]
    pub default_addresses: String,
}

/// The built-in address choice, as a flag value.
pub const DEFAULT_ADDRESSES: &str = "lowest";

/// A clap value parser that checks a value with `parse` and keeps its text (for the logged configuration).
fn checked<T>(
    parse: impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static,
) -> impl clap::builder::TypedValueParser<Value = String> {
    move |s: &str| parse(s).map(|_| s.to_owned())
}

#[derive(Debug, Clone, Args)]
pub struct RenderArgs {
    /// The registry file to render; without one, Cloud Map is read once, completely, with the same flags as `serve`.
    #[arg(long, env = "CLOUDMAP_XDS_REGISTRY_FILE")]
    pub registry_file: Option<PathBuf>,

    /// Instead of the YAML, explain one ServiceEntry: where each port, protocol and setting came from
    /// (service attribute, flag, default) and which instances were left out and why. Give its name
    /// (`cloudmap-<service>.<namespace>`) or the Cloud Map `NAMESPACE/SERVICE`.
    #[arg(long, env = "CLOUDMAP_XDS_EXPLAIN")]
    pub explain: Option<String>,

    /// How long the one complete Cloud Map read may take.
    #[arg(long, env = "CLOUDMAP_XDS_READ_TIMEOUT", default_value = DEFAULT_READ_TIMEOUT, value_parser = humantime::parse_duration)]
    pub read_timeout: Duration,

    #[command(flatten)]
    pub publish: PublishArgs,

    #[command(flatten)]
    pub cloudmap: CloudMapArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Write the registry file here instead of standard output.
    #[arg(long, short, env = "CLOUDMAP_XDS_EXPORT_OUTPUT")]
    pub output: Option<PathBuf>,

    /// How long the one complete Cloud Map read may take.
    #[arg(long, env = "CLOUDMAP_XDS_READ_TIMEOUT", default_value = DEFAULT_READ_TIMEOUT, value_parser = humantime::parse_duration)]
    pub read_timeout: Duration,

    #[command(flatten)]
    pub cloudmap: CloudMapArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid publish namespace {0:?}: it must be a Kubernetes namespace name (lower-case letters, digits and '-', at most 63)"
    )]
    PublishNamespace(String),
    #[error("{flag}: {reason}")]
    Flag { flag: &'static str, reason: String },
}

impl PublishArgs {
    /// The namespace in effect: the flag, else `POD_NAMESPACE`, else `istio-system`.
    pub fn namespace(&self) -> Result<String, Error> {
        let ns = match &self.publish_namespace {
            Some(ns) => ns.clone(),
            None => std::env::var(POD_NAMESPACE_ENV)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| DEFAULT_PUBLISH_NAMESPACE.to_owned()),
        };
        let valid = !ns.is_empty()
            && ns.len() <= 63
            && ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !ns.starts_with('-')
            && !ns.ends_with('-');
        if valid { Ok(ns) } else { Err(Error::PublishNamespace(ns)) }
    }

    pub fn translate_options(&self) -> Result<crate::translate::Options, Error> {
        let flag = |flag: &'static str| move |reason: String| Error::Flag { flag, reason };
        let optional =
            |value: &Option<String>| value.as_deref().filter(|v| !v.trim().is_empty()).map(str::to_owned);
        let defaults = Defaults {
            port_protocols: parse_port_protocols(&self.port_protocols)
                .map_err(flag(settings::PORT_PROTOCOLS_FLAG))?,
            location: optional(&self.default_location)
                .map(|v| parse_location(&v))
                .transpose()
                .map_err(flag(settings::LOCATION_FLAG))?,
            export_to: optional(&self.default_export_to)
                .map(|v| parse_export_to(&v))
                .transpose()
                .map_err(flag(settings::EXPORT_TO_FLAG))?,
            resolution: match self
                .default_resolution
                .parse::<ResolutionMode>()
                .map_err(flag(settings::RESOLUTION_FLAG))?
            {
                ResolutionMode::Auto => None,
                fixed => Some(fixed),
            },
            addresses: if self.default_addresses == DEFAULT_ADDRESSES {
                None
            } else {
                Some(self.default_addresses.parse::<AddressMode>().map_err(flag(settings::ADDRESSES_FLAG))?)
            },
        };
        Ok(crate::translate::Options {
            publish_namespace: self.namespace()?,
            health_filter: self.health_filter,
            defaults,
        })
    }
}

/// Durations appear as `10s` in the logged configuration.
pub mod humantime_serde_shim {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cloudmap-xds").chain(args.iter().copied()))
    }

    #[test]
    fn serve_defaults() {
        let Command::Serve(args) = parse(&["serve", "--registry-file", "r.yaml"]).unwrap().command else {
            panic!("not serve")
        };
        assert_eq!(args.grpc_addr.to_string(), DEFAULT_GRPC_ADDR);
        assert_eq!(args.admin_addr.to_string(), DEFAULT_ADMIN_ADDR);
        assert_eq!(args.shutdown_grace_period, Duration::from_secs(10));
        assert_eq!(args.publish.health_filter, HealthFilter::HealthyOrElseAll);
    }

    #[test]
    fn bad_flags_are_clear_errors() {
        let err = parse(&["serve", "--grpc-addr", "localhost"]).unwrap_err().to_string();
        assert!(err.contains("invalid value 'localhost' for '--grpc-addr"), "{err}");
        let err = parse(&["serve", "--health-filter", "SOMETIMES"]).unwrap_err().to_string();
        assert!(err.contains("HEALTHY_OR_ELSE_ALL"), "{err}");
        let err = parse(&["serve", "--shutdown-grace-period", "soon"]).unwrap_err().to_string();
        assert!(err.contains("--shutdown-grace-period"), "{err}");
        let err = parse(&["serve", "--port-protocols", "8080=SPDY"]).unwrap_err().to_string();
        assert!(err.contains("--port-protocols") && err.contains("unknown protocol"), "{err}");
        let err = parse(&["serve", "--default-export-to", "*,a"]).unwrap_err().to_string();
        assert!(err.contains("--default-export-to"), "{err}");
        let err = parse(&["serve", "--default-addresses", "some"]).unwrap_err().to_string();
        assert!(err.contains("--default-addresses"), "{err}");
    }

    #[test]
    fn translation_defaults_come_from_the_flags() {
        use crate::proto::istio::networking::v1alpha3::service_entry::Location;
        use crate::translate::settings::Protocol;
        let Command::Serve(args) = parse(&[
            "serve",
            "--port-protocols",
            "8080=HTTP,50051=grpc",
            "--default-location",
            "MESH_INTERNAL",
            "--default-export-to",
            ".,team-a",
            "--default-addresses",
            "all",
        ])
        .unwrap()
        .command
        else {
            panic!("not serve")
        };
        let options = args.publish.translate_options().unwrap();
        let d = options.defaults;
        assert_eq!(d.port_protocols.get(&8080), Some(&Protocol::Http));
        assert_eq!(d.port_protocols.get(&50051), Some(&Protocol::Grpc));
        assert_eq!(d.location, Some(Location::MeshInternal));
        assert_eq!(d.export_to, Some(vec![".".to_string(), "team-a".to_string()]));
        assert_eq!(d.addresses, Some(AddressMode::All));
        assert_eq!(d.resolution, None);
        let Command::Serve(args) = parse(&["serve"]).unwrap().command else { panic!("not serve") };
        assert_eq!(args.publish.translate_options().unwrap().defaults, Defaults::default());
    }

    #[test]
    fn publish_namespace_must_be_a_namespace_name() {
        let Command::Render(args) =
            parse(&["render", "--publish-namespace", "Istio_System"]).unwrap().command
        else {
            panic!("not render")
        };
        assert!(args.publish.namespace().unwrap_err().to_string().contains("Istio_System"));
        let Command::Render(args) = parse(&["render", "--publish-namespace", "mesh-config"]).unwrap().command
        else {
            panic!("not render")
        };
        assert_eq!(args.publish.namespace().unwrap(), "mesh-config");
    }
}
