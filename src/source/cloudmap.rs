//! AWS Cloud Map source (completed by the Cloud Map issue).

use std::time::Duration;

use clap::Args;
use serde::Serialize;

pub const DEFAULT_POLL_INTERVAL: &str = "5s";

#[derive(Debug, Clone, Args, Serialize)]
pub struct CloudMapArgs {
    /// AWS region of the Cloud Map namespaces [default: the AWS environment/profile].
    #[arg(long, env = "AWS_REGION")]
    pub aws_region: Option<String>,

    /// Cloud Map endpoint override, e.g. a moto_server on loopback.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,

    /// How often instances are polled.
    #[arg(long, env = "CLOUDMAP_XDS_POLL_INTERVAL", default_value = DEFAULT_POLL_INTERVAL, value_parser = humantime::parse_duration)]
    #[serde(with = "crate::config::humantime_serde_shim")]
    pub poll_interval: Duration,
}

/// Starts polling Cloud Map; returns the source's view once its client is set up.
pub async fn start(
    _args: &CloudMapArgs,
    _metrics: &crate::metrics::Metrics,
    _shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<super::SourceView, Error> {
    Err(Error::NotYet)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Cloud Map source is not built yet; use --registry-file")]
    NotYet,
}
