//! Command line and environment: every flag has an `env`, every default a name.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::model::HealthFilter;
use crate::source::cloudmap::CloudMapArgs;

pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:15099";
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:15098";
/// Used when neither `--publish-namespace` nor `POD_NAMESPACE` is set.
pub const DEFAULT_PUBLISH_NAMESPACE: &str = "istio-system";
/// The downward-API variable Kubernetes users set to the pod's namespace.
pub const POD_NAMESPACE_ENV: &str = "POD_NAMESPACE";
pub const DEFAULT_SHUTDOWN_GRACE_PERIOD: &str = "10s";
pub const DEFAULT_LOG_FILTER: &str = "info";
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
    /// Print the ServiceEntries of a registry file as Kubernetes YAML, to preview, diff or `kubectl apply`.
    Render(RenderArgs),
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
}

#[derive(Debug, Clone, Args)]
pub struct RenderArgs {
    /// The registry file to render.
    #[arg(long, env = "CLOUDMAP_XDS_REGISTRY_FILE")]
    pub registry_file: PathBuf,

    #[command(flatten)]
    pub publish: PublishArgs,
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
        Ok(crate::translate::Options {
            publish_namespace: self.namespace()?,
            health_filter: self.health_filter,
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
    }

    #[test]
    fn bad_flags_are_clear_errors() {
        let err = parse(&["serve", "--grpc-addr", "localhost"]).unwrap_err().to_string();
        assert!(err.contains("invalid value 'localhost' for '--grpc-addr"), "{err}");
        let err = parse(&["serve", "--health-filter", "SOMETIMES"]).unwrap_err().to_string();
        assert!(err.contains("HEALTHY_OR_ELSE_ALL"), "{err}");
        let err = parse(&["serve", "--shutdown-grace-period", "soon"]).unwrap_err().to_string();
        assert!(err.contains("--shutdown-grace-period"), "{err}");
    }

    #[test]
    fn publish_namespace_must_be_a_namespace_name() {
        let args =
            PublishArgs { publish_namespace: Some("Istio_System".into()), health_filter: HealthFilter::All };
        assert!(args.namespace().unwrap_err().to_string().contains("Istio_System"));
        let args =
            PublishArgs { publish_namespace: Some("mesh-config".into()), health_filter: HealthFilter::All };
        assert_eq!(args.namespace().unwrap(), "mesh-config");
    }
}
