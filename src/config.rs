//! Command line and environment: every flag has an `env`, every default a name.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

pub mod cloudmap;
pub mod peer;

pub use self::cloudmap::CloudMapArgs;
pub use self::peer::PeerArgs;
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
/// Each istiod replica (and revision) holds one stream per replica of ours it is
/// connected to; 100 is ten times a large control plane. Each stream can pin a
/// few encoded responses in memory when its client reads slowly.
pub const DEFAULT_MAX_ADS_STREAMS: &str = "100";
/// Debug calls copy the whole set (ListServiceEntries); a handful at once is plenty for people and scripts.
pub const DEFAULT_MAX_DEBUG_CALLS: &str = "4";
/// istiod's requests are a few KB (type URL, node metadata on the first).
pub const DEFAULT_MAX_REQUEST_SIZE: &str = "1MiB";
/// The full ServiceEntry set of 100,000 endpoints (10,000 services of 10 ECS-like instances)
/// encodes to about 20 MB; 64 MiB leaves three times that (istiod itself accepts up to 2 GiB).
pub const DEFAULT_MAX_RESPONSE_SIZE: &str = "64MiB";
/// istiod's own client keepalive (`pkg/keepalive`: 30 s, 10 s timeout); we ping as often to reap dead peers.
pub const DEFAULT_GRPC_KEEPALIVE_INTERVAL: &str = "30s";
pub const DEFAULT_GRPC_KEEPALIVE_TIMEOUT: &str = "10s";
/// Istiod decodes the whole ServiceEntry set on every push (about 1 s of its CPU at
/// 10,000 services × 10 instances on 2 cores, see the README's performance section),
/// so bursts are coalesced to at most one push per this interval.
pub const DEFAULT_MIN_PUSH_INTERVAL: &str = "1s";

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

    /// Least time between two pushes of a changed ServiceEntry set; changes within it are coalesced into the next push.
    #[arg(long, env = "CLOUDMAP_XDS_MIN_PUSH_INTERVAL", default_value = DEFAULT_MIN_PUSH_INTERVAL, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_shim")]
    pub min_push_interval: Duration,

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

    /// Most ADS streams served at once; more are refused with RESOURCE_EXHAUSTED (istiod retries, possibly on another replica).
    #[arg(long, env = "CLOUDMAP_XDS_MAX_ADS_STREAMS", default_value = DEFAULT_MAX_ADS_STREAMS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_ads_streams: u32,

    /// Most debug-service calls served at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CLOUDMAP_XDS_MAX_DEBUG_CALLS", default_value = DEFAULT_MAX_DEBUG_CALLS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_debug_calls: u32,

    /// Largest request message accepted on the ADS and debug services (bytes, or with KiB/MiB/GiB).
    #[arg(long, env = "CLOUDMAP_XDS_MAX_REQUEST_SIZE", default_value = DEFAULT_MAX_REQUEST_SIZE, value_parser = byte_size)]
    pub max_request_size: usize,

    /// Largest response message sent (bytes, or with KiB/MiB/GiB); a larger ServiceEntry set is not sent and is logged and counted.
    #[arg(long, env = "CLOUDMAP_XDS_MAX_RESPONSE_SIZE", default_value = DEFAULT_MAX_RESPONSE_SIZE, value_parser = byte_size)]
    pub max_response_size: usize,

    /// How long a gRPC connection may be silent before we ping it.
    #[arg(long, env = "CLOUDMAP_XDS_GRPC_KEEPALIVE_INTERVAL", default_value = DEFAULT_GRPC_KEEPALIVE_INTERVAL, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_shim")]
    pub grpc_keepalive_interval: Duration,

    /// How long a ping may go unanswered before the connection is closed (a dead peer is reaped).
    #[arg(long, env = "CLOUDMAP_XDS_GRPC_KEEPALIVE_TIMEOUT", default_value = DEFAULT_GRPC_KEEPALIVE_TIMEOUT, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_shim")]
    pub grpc_keepalive_timeout: Duration,

    /// PEM certificate chain (leaf first) for TLS on the gRPC port; re-read when it changes (cert-manager rotation).
    #[arg(long, env = "CLOUDMAP_XDS_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key of --tls-cert-file.
    #[arg(long, env = "CLOUDMAP_XDS_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    #[command(flatten)]
    pub peer: PeerArgs,
}

/// `1048576`, `512KiB`, `1MiB`, `2GiB` (binary units; `KB`/`MB`/`GB` mean the same here).
pub fn byte_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("{s:?} is not a size (e.g. 1048576, 512KiB, 64MiB)")),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a positive size (e.g. 1048576, 512KiB, 64MiB)"))
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
        assert_eq!(args.min_push_interval, humantime::parse_duration(DEFAULT_MIN_PUSH_INTERVAL).unwrap());
        assert_eq!(args.publish.health_filter, HealthFilter::HealthyOrElseAll);
        assert_eq!(args.max_ads_streams, 100);
        assert_eq!(args.max_debug_calls, 4);
        assert_eq!(args.max_request_size, 1 << 20);
        assert_eq!(args.max_response_size, 64 << 20);
        assert_eq!(args.grpc_keepalive_interval, Duration::from_secs(30));
        assert_eq!(args.grpc_keepalive_timeout, Duration::from_secs(10));
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(byte_size("1048576"), Ok(1 << 20));
        assert_eq!(byte_size("512KiB"), Ok(512 << 10));
        assert_eq!(byte_size("64MiB"), Ok(64 << 20));
        assert_eq!(byte_size("2 GB"), Ok(2 << 30));
        assert!(byte_size("0").unwrap_err().contains("positive"));
        assert!(byte_size("ten MiB").unwrap_err().contains("not a"));
        assert!(byte_size("5TiB").unwrap_err().contains("not a size"));
        let err = parse(&["serve", "--max-ads-streams", "0"]).unwrap_err().to_string();
        assert!(err.contains("--max-ads-streams"), "{err}");
        let err = parse(&["serve", "--tls-cert-file", "tls.crt"]).unwrap_err().to_string();
        assert!(err.contains("--tls-key-file"), "{err}");
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
