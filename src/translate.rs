//! Pure translation of the registry model into Istio ServiceEntries.
//!
//! Deterministic: the same registry, in any order, yields the same entries in the
//! same order with the same bytes. Every entry produced passes istiod's
//! ServiceEntry validation; whatever cannot be expressed validly is skipped and
//! reported in [`Translation::skipped`], never emitted half-valid.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::model::{HealthFilter, Instance, Registry, Service, attr};
use crate::proto::istio::networking::v1alpha3::{
    ServiceEntry, ServicePort, WorkloadEntry,
    service_entry::{Location, Resolution},
};

/// Prefix of every ServiceEntry name, as the Go operator used.
pub const NAME_PREFIX: &str = "cloudmap-";
const MAX_DNS_LABEL: usize = 63;
const MAX_DNS_NAME: usize = 253;
const HTTP_PORT: u16 = 80;
const HTTPS_PORT: u16 = 443;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The Istio namespace the ServiceEntries are published in.
    pub publish_namespace: String,
    pub health_filter: HealthFilter,
}

/// One translated Cloud Map service.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// ServiceEntry name (without namespace).
    pub name: String,
    pub namespace: String,
    pub create_time: SystemTime,
    pub spec: ServiceEntry,
    /// Where it came from: (Cloud Map namespace, service).
    pub origin: (String, String),
}

/// Why an instance or a service was left out.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum SkipReason {
    /// No `AWS_INSTANCE_IPV4`, `AWS_INSTANCE_IPV6`, `AWS_INSTANCE_CNAME` or `AWS_ALIAS_DNS_NAME`.
    NoAddress,
    /// An address attribute is present but not a valid IP or DNS name.
    InvalidAddress { attribute: &'static str, value: String },
    /// `AWS_INSTANCE_PORT` is not a number in 1..=65535.
    InvalidPort(String),
    /// The service and namespace names cannot form a valid host.
    InvalidHost(String),
    /// Another service (first in namespace/service order) already gives this ServiceEntry name,
    /// e.g. `api.prod` in `corp.local` and `api` in `prod.corp.local`.
    DuplicateName(String),
}

impl SkipReason {
    /// A short, stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SkipReason::NoAddress => "no_address",
            SkipReason::InvalidAddress { .. } => "invalid_address",
            SkipReason::InvalidPort(_) => "invalid_port",
            SkipReason::InvalidHost(_) => "invalid_host",
            SkipReason::DuplicateName(_) => "duplicate_name",
        }
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::NoAddress => write!(
                f,
                "no address attribute (AWS_INSTANCE_IPV4, AWS_INSTANCE_IPV6, AWS_INSTANCE_CNAME or AWS_ALIAS_DNS_NAME)"
            ),
            SkipReason::InvalidAddress { attribute, value } => {
                write!(f, "{attribute}={value:?} is not a valid address")
            }
            SkipReason::InvalidPort(value) => {
                write!(f, "AWS_INSTANCE_PORT={value:?} is not a port in 1..=65535")
            }
            SkipReason::InvalidHost(host) => write!(f, "{host:?} cannot be made a valid DNS host"),
            SkipReason::DuplicateName(name) => {
                write!(f, "ServiceEntry name {name:?} is already given by another Cloud Map service")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Skipped {
    pub namespace: String,
    pub service: String,
    /// `None` when the whole service was skipped.
    pub instance: Option<String>,
    pub reason: SkipReason,
}

/// A custom attribute that could not become an endpoint label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SkippedLabel {
    pub namespace: String,
    pub service: String,
    pub key: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Translation {
    /// Sorted by name.
    pub entries: Vec<Entry>,
    pub skipped: Vec<Skipped>,
    pub skipped_labels: Vec<SkippedLabel>,
}

/// Translates a whole registry.
pub fn translate(registry: &Registry, options: &Options) -> Translation {
    let mut out = Translation::default();
    for service in &registry.services {
        out.merge(translate_service(service, options));
    }
    out.normalize();
    out
}

impl Translation {
    pub fn merge(&mut self, other: Translation) {
        self.entries.extend(other.entries);
        self.skipped.extend(other.skipped);
        self.skipped_labels.extend(other.skipped_labels);
    }

    /// Sorts everything; keeps one entry per name, the first in (namespace, service) order.
    pub fn normalize(&mut self) {
        let entries = std::mem::take(&mut self.entries);
        self.entries = first_per_name(entries, |e| (&e.name, &e.origin), &mut self.skipped);
        self.skipped.sort();
        self.skipped.dedup();
        self.skipped_labels.sort();
        self.skipped_labels.dedup();
    }
}

/// Sorts by name, keeping for each name only the first in (namespace, service)
/// order; the others are reported as [`SkipReason::DuplicateName`]. Two Cloud Map
/// services can give one name (`api.prod` in `corp.local`, `api` in `prod.corp.local`).
pub fn first_per_name<T>(
    mut items: Vec<T>,
    key: impl Fn(&T) -> (&String, &(String, String)),
    skipped: &mut Vec<Skipped>,
) -> Vec<T> {
    items.sort_by(|a, b| key(a).cmp(&key(b)));
    let mut kept: Vec<T> = Vec::with_capacity(items.len());
    for item in items {
        let (name, origin) = key(&item);
        if kept.last().is_some_and(|previous| key(previous).0 == name) {
            skipped.push(Skipped {
                namespace: origin.0.clone(),
                service: origin.1.clone(),
                instance: None,
                reason: SkipReason::DuplicateName(name.clone()),
            });
        } else {
            kept.push(item);
        }
    }
    kept
}

/// Translates one service: at most one entry, plus what was skipped. When the
/// service cannot be expressed at all, `entries` is empty and `skipped` says why.
pub fn translate_service(service: &Service, options: &Options) -> Translation {
    let mut out = Translation::default();
    let raw_host = format!("{}.{}", service.name, service.namespace);
    let Some(host) = to_host(&raw_host) else {
        out.skipped.push(Skipped {
            namespace: service.namespace.clone(),
            service: service.name.clone(),
            instance: None,
            reason: SkipReason::InvalidHost(raw_host),
        });
        return out;
    };
    let name = entry_name(&raw_host, &host);

    let mut selected = options.health_filter.select(&service.instances);
    selected.sort_by(|a, b| (&a.id, &a.attributes).cmp(&(&b.id, &b.attributes)));
    let mut endpoints = Vec::new();
    for instance in selected {
        match to_endpoint(instance) {
            Ok(endpoint) => endpoints.push(endpoint),
            Err(reason) => out.skipped.push(Skipped {
                namespace: service.namespace.clone(),
                service: service.name.clone(),
                instance: Some(instance.id.clone()),
                reason,
            }),
        }
        for key in instance.attributes.keys().filter(|k| is_custom(k)) {
            if !valid_label(key, &instance.attributes[key]) {
                out.skipped_labels.push(SkippedLabel {
                    namespace: service.namespace.clone(),
                    service: service.name.clone(),
                    key: key.clone(),
                });
            }
        }
    }

    out.entries.push(Entry {
        name,
        namespace: options.publish_namespace.clone(),
        create_time: service.created,
        spec: build_spec(host, endpoints),
        origin: (service.namespace.clone(), service.name.clone()),
    });
    // Report as `translate` does (once per instance id and reason, once per key), so the
    // snapshot builder, which uses this per service, counts what a full translation counts.
    out.normalize();
    out
}

/// An instance reduced to what the ServiceEntry needs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Endpoint {
    address: Address,
    port: Option<u16>,
    labels: BTreeMap<String, String>,
    locality: String,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Address {
    // Variant order sorts IPs (numerically) before hostnames.
    Ip(IpAddr),
    Hostname(String),
}

impl Address {
    fn render(&self) -> String {
        match self {
            Address::Ip(ip) => ip.to_string(),
            Address::Hostname(h) => h.clone(),
        }
    }
}

fn to_endpoint(instance: &Instance) -> Result<Endpoint, SkipReason> {
    let attrs = &instance.attributes;
    let port = match attrs.get(attr::PORT) {
        None => None,
        Some(value) => match value.trim().parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => return Err(SkipReason::InvalidPort(value.clone())),
        },
    };
    Ok(Endpoint {
        address: to_address(attrs)?,
        port,
        labels: attrs
            .iter()
            .filter(|(k, v)| is_custom(k) && valid_label(k, v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        locality: to_locality(attrs),
    })
}

type AddressParser = fn(&str) -> Option<Address>;

/// IPv4 wins over IPv6, and an IP over a DNS name. The first present attribute
/// that is invalid is the reason given when no attribute is usable.
fn to_address(attrs: &BTreeMap<String, String>) -> Result<Address, SkipReason> {
    let mut first_invalid = None;
    let candidates: [(&'static str, AddressParser); 4] = [
        (attr::IPV4, |v| v.parse::<Ipv4Addr>().ok().map(|ip| Address::Ip(ip.into()))),
        (attr::IPV6, |v| v.parse::<Ipv6Addr>().ok().map(|ip| Address::Ip(ip.into()))),
        (attr::CNAME, |v| to_dns_name(v).map(Address::Hostname)),
        (attr::ALIAS_DNS_NAME, |v| to_dns_name(v).map(Address::Hostname)),
    ];
    for (attribute, parse) in candidates {
        let Some(value) = attrs.get(attribute) else { continue };
        match parse(value.trim()) {
            Some(address) => return Ok(address),
            None => {
                first_invalid.get_or_insert(SkipReason::InvalidAddress { attribute, value: value.clone() });
            }
        }
    }
    Err(first_invalid.unwrap_or(SkipReason::NoAddress))
}

/// ECS's `REGION` and `AVAILABILITY_ZONE` as Istio's `region/zone`.
fn to_locality(attrs: &BTreeMap<String, String>) -> String {
    let part = |key| attrs.get(key).map(|v: &String| v.trim()).filter(|v| valid_locality_part(v));
    match (part(attr::REGION), part(attr::AVAILABILITY_ZONE)) {
        (Some(region), Some(zone)) => format!("{region}/{zone}"),
        (Some(region), None) => region.to_owned(),
        _ => String::new(),
    }
}

fn valid_locality_part(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_DNS_LABEL
        && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Builds the spec from sorted, deduplicated endpoints.
///
/// Every distinct instance port becomes a service port (80 `http`, 443 `https`,
/// others `tcp-<port>`); an instance without a port offers 80 and 443. Each
/// endpoint maps every service port to its own port, so an ECS bridge-mode task
/// registered on its own host port is reached there whichever service port a
/// client uses; an endpoint without a port keeps the service port's number.
fn build_spec(host: String, mut endpoints: Vec<Endpoint>) -> ServiceEntry {
    endpoints.sort();
    endpoints.dedup();
    let mut numbers = BTreeSet::new();
    for e in &endpoints {
        match e.port {
            Some(p) => {
                numbers.insert(p);
            }
            None => numbers.extend([HTTP_PORT, HTTPS_PORT]),
        }
    }
    if numbers.is_empty() {
        numbers.extend([HTTP_PORT, HTTPS_PORT]);
    }
    let ports: Vec<ServicePort> = numbers
        .iter()
        .map(|&n| {
            let (name, protocol) = port_name_and_protocol(n);
            ServicePort { number: n.into(), protocol: protocol.into(), name, target_port: 0 }
        })
        .collect();

    let resolution = if endpoints.iter().all(|e| matches!(e.address, Address::Ip(_))) {
        Resolution::Static
    } else {
        Resolution::Dns
    };
    // The lowest instance IP stands as the service address, as the Go operator's
    // first endpoint did, but stable under DiscoverInstances' random order.
    let addresses = match (resolution, endpoints.first()) {
        (Resolution::Static, Some(Endpoint { address: Address::Ip(ip), .. })) => vec![ip.to_string()],
        _ => Vec::new(),
    };
    let endpoints = endpoints
        .into_iter()
        .map(|e| WorkloadEntry {
            address: e.address.render(),
            ports: ports.iter().map(|p| (p.name.clone(), e.port.map_or(p.number, u32::from))).collect(),
            labels: e.labels,
            network: String::new(),
            locality: e.locality,
            weight: 0,
            service_account: String::new(),
        })
        .collect();

    ServiceEntry {
        hosts: vec![host],
        addresses,
        ports,
        location: Location::MeshExternal.into(),
        resolution: resolution.into(),
        endpoints,
        workload_selector: None,
        export_to: Vec::new(),
        subject_alt_names: Vec::new(),
    }
}

fn port_name_and_protocol(number: u16) -> (String, &'static str) {
    match number {
        HTTP_PORT => ("http".into(), "HTTP"),
        HTTPS_PORT => ("https".into(), "HTTPS"),
        n => (format!("tcp-{n}"), "TCP"),
    }
}

/// `svc.ns` as a valid lower-case DNS name: upper case is lowered, every other
/// character outside `[a-z0-9-]` becomes `-`. `None` when no valid name remains.
pub fn to_host(raw: &str) -> Option<String> {
    let labels: Vec<String> = raw
        .split('.')
        .map(|label| {
            let mapped: String = label
                .chars()
                .map(|c| c.to_ascii_lowercase())
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
                .collect();
            mapped.trim_matches('-').to_owned()
        })
        .collect();
    let valid = labels.len() >= 2
        && labels.iter().all(|l| !l.is_empty() && l.len() <= MAX_DNS_LABEL)
        && !labels.last().is_some_and(|l| all_digits(l));
    let host = labels.join(".");
    (valid && host.len() <= MAX_DNS_NAME).then_some(host)
}

/// `cloudmap-<host>`. When the host had to be rewritten, or the name would pass
/// Kubernetes' 253 characters, the name is shortened as needed and ends in a hash
/// of the original, so `My_Svc` and `my-svc` (and long look-alikes) stay distinct.
fn entry_name(raw_host: &str, host: &str) -> String {
    let plain = format!("{NAME_PREFIX}{host}");
    if raw_host == host && is_dns_subdomain(&plain) {
        return plain;
    }
    let digest = Sha256::digest(raw_host.as_bytes());
    let suffix: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let mut labels: Vec<&str> = plain.split('.').map(|l| &l[..l.len().min(MAX_DNS_LABEL)]).collect();
    if let Some(last) = labels.last_mut() {
        // The suffix joins the last label.
        *last = &last[..last.len().min(MAX_DNS_LABEL - 1 - suffix.len())];
    }
    let mut base = labels.iter().map(|l| l.trim_end_matches('-')).collect::<Vec<_>>().join(".");
    base.truncate(MAX_DNS_NAME - 1 - suffix.len());
    format!("{}-{suffix}", base.trim_end_matches(['-', '.']))
}

/// A CNAME or alias target as a lower-case DNS name without the trailing dot.
/// A dotted IPv4 address stays as it is (istiod accepts an IP as a DNS endpoint).
fn to_dns_name(value: &str) -> Option<String> {
    let name = value.strip_suffix('.').unwrap_or(value).to_ascii_lowercase();
    let numeric_tld = name.rsplit('.').next().is_some_and(all_digits) && name.parse::<Ipv4Addr>().is_err();
    (name.contains('.') && is_dns_subdomain(&name) && !numeric_tld).then_some(name)
}

/// istiod rejects a host or DNS name whose last label is all digits (`svc.2024`).
fn all_digits(label: &str) -> bool {
    !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit())
}

/// RFC 1123 subdomain, lower case, as Kubernetes and istiod check names.
fn is_dns_subdomain(name: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= MAX_DNS_LABEL
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    name.len() <= MAX_DNS_NAME && name.split('.').all(label_ok)
}

fn is_custom(key: &str) -> bool {
    !key.starts_with(attr::RESERVED_PREFIX)
}

/// Kubernetes label rules, which istiod applies to endpoint labels.
pub fn valid_label(key: &str, value: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    prefix.is_none_or(is_dns_subdomain)
        && qualified_name_part(name)
        && (value.is_empty() || qualified_name_part(value))
}

fn qualified_name_part(s: &str) -> bool {
    let bytes = s.as_bytes();
    !s.is_empty()
        && s.len() <= MAX_DNS_LABEL
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests;
