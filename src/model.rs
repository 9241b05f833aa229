//! The registry as plain Rust types: what every source produces and what
//! translation consumes. No AWS and no protobuf types live here.

mod attributes;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

pub use self::attributes::{Attributes, KeySet, Text, intern};

/// Everything one source knows at one moment: every service of every namespace.
///
/// Services are shared: a source republishes an unchanged service as the same
/// `Arc`, so comparing registries (and the snapshot builder's per-service check)
/// costs a pointer comparison for everything that did not change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    pub services: Vec<Arc<Service>>,
    /// False only for what a source publishes before its first complete read
    /// (`--initial-sync-timeout`): such a set never replaces one borrowed from a peer.
    pub complete: bool,
}

impl Registry {
    /// A complete registry.
    pub fn new(services: Vec<Service>) -> Self {
        Self::shared(services.into_iter().map(Arc::new).collect())
    }

    /// A complete registry of services already shared.
    pub fn shared(services: Vec<Arc<Service>>) -> Self {
        Registry { services, complete: true }
    }
}

/// One Cloud Map service (or its registry-file equivalent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// The Cloud Map namespace name; the host suffix.
    pub namespace: String,
    pub name: String,
    /// The service's creation time; becomes the MCP `create_time`, which istiod
    /// uses to order ServiceEntries that claim the same host.
    pub created: SystemTime,
    /// The service's own Cloud Map *service attributes* (`GetServiceAttributes`); the
    /// keys under `cloudmap-xds/` set its ports, location, exportTo, resolution and
    /// addresses (see `translate::settings`), the others are ignored.
    pub attributes: BTreeMap<String, String>,
    pub instances: Vec<Instance>,
}

/// One registered instance: exactly Cloud Map's attributes plus its health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub health: Health,
    pub attributes: Attributes,
}

/// Cloud Map's instance health status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Health {
    Healthy,
    Unhealthy,
    Unknown,
}

/// Which instances are served, named after Cloud Map's `HealthStatus` filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthFilter {
    /// Only HEALTHY instances.
    #[value(name = "HEALTHY")]
    Healthy,
    /// HEALTHY instances; all instances when none is healthy (fail open).
    #[default]
    #[value(name = "HEALTHY_OR_ELSE_ALL")]
    HealthyOrElseAll,
    /// Every instance, whatever its health.
    #[value(name = "ALL")]
    All,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "HEALTHY",
            Health::Unhealthy => "UNHEALTHY",
            Health::Unknown => "UNKNOWN",
        }
    }
}

impl HealthFilter {
    /// Applies the filter to one service's instances, keeping their order.
    pub fn select(self, instances: &[Instance]) -> Vec<&Instance> {
        // Sized for every instance: nearly all are healthy, and a filtered collect grew
        // the list two or three times for each service of a full build.
        let healthy = || {
            let mut selected = Vec::with_capacity(instances.len());
            selected.extend(instances.iter().filter(|i| i.health == Health::Healthy));
            selected
        };
        match self {
            HealthFilter::All => instances.iter().collect(),
            HealthFilter::Healthy => healthy(),
            HealthFilter::HealthyOrElseAll => {
                let selected = healthy();
                if selected.is_empty() { instances.iter().collect() } else { selected }
            }
        }
    }
}

/// Well-known Cloud Map instance attributes.
pub mod attr {
    pub const IPV4: &str = "AWS_INSTANCE_IPV4";
    pub const IPV6: &str = "AWS_INSTANCE_IPV6";
    pub const PORT: &str = "AWS_INSTANCE_PORT";
    pub const CNAME: &str = "AWS_INSTANCE_CNAME";
    pub const ALIAS_DNS_NAME: &str = "AWS_ALIAS_DNS_NAME";
    pub const RESERVED_PREFIX: &str = "AWS_";
    /// Set by ECS service discovery.
    pub const REGION: &str = "REGION";
    /// Set by ECS service discovery.
    pub const AVAILABILITY_ZONE: &str = "AVAILABILITY_ZONE";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, health: Health) -> Instance {
        Instance { id: id.into(), health, attributes: Attributes::new() }
    }

    #[test]
    fn health_filters_follow_cloud_map_semantics() {
        let all = vec![
            instance("a", Health::Healthy),
            instance("b", Health::Unhealthy),
            instance("c", Health::Unknown),
        ];
        let ids = |v: Vec<&Instance>| v.iter().map(|i| i.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(HealthFilter::Healthy.select(&all)), ["a"]);
        assert_eq!(ids(HealthFilter::HealthyOrElseAll.select(&all)), ["a"]);
        assert_eq!(ids(HealthFilter::All.select(&all)), ["a", "b", "c"]);
        let none_healthy = vec![instance("b", Health::Unhealthy)];
        assert_eq!(ids(HealthFilter::HealthyOrElseAll.select(&none_healthy)), ["b"]);
        assert!(HealthFilter::Healthy.select(&none_healthy).is_empty());
    }
}
