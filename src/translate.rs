//! Pure translation of the registry model into Istio ServiceEntries.
//!
//! Deterministic: the same registry, in any order, yields the same entries in the
//! same order with the same bytes. Every entry produced passes istiod's
//! ServiceEntry validation; whatever cannot be expressed validly is skipped and
//! reported in [`Translation::skipped`] (instances) or
//! [`Translation::invalid_settings`] (service attributes), never emitted half-valid.
//!
//! - `settings`: a service's own attributes (`cloudmap-xds/...`) over the flags' defaults;
//! - `ports`: which service ports exist and where each endpoint receives them.

pub mod ports;
pub mod settings;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use self::ports::PlannedPort;
use self::settings::{
    AddressMode, Defaults, InvalidSetting, Origin, ResolutionMode, ServiceSettings, Sourced,
};
use crate::model::{Attributes, Health, HealthFilter, Instance, Registry, Service, attr};
use crate::proto::istio::networking::v1alpha3::{
    ServiceEntry, ServicePort, WorkloadEntry,
    service_entry::{Location, Resolution},
};

/// Prefix of every ServiceEntry name, as the Go operator used.
pub const NAME_PREFIX: &str = "cloudmap-";
const MAX_DNS_LABEL: usize = 63;
const MAX_DNS_NAME: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The Istio namespace the ServiceEntries are published in.
    pub publish_namespace: String,
    pub health_filter: HealthFilter,
    /// What services that set nothing get (the `--port-protocols` and `--default-*` flags).
    pub defaults: Defaults,
}

impl Options {
    pub fn new(publish_namespace: impl Into<String>, health_filter: HealthFilter) -> Self {
        Options { publish_namespace: publish_namespace.into(), health_filter, defaults: Defaults::default() }
    }
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
    /// The instances serve different protocols and this one lost (see `translate::ports`).
    PortConflict(String),
    /// `STATIC` resolution was asked for, and this instance has a DNS name, not an IP.
    NotAnIp(String),
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
            SkipReason::PortConflict(_) => "port_conflict",
            SkipReason::NotAnIp(_) => "not_an_ip",
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
            SkipReason::PortConflict(why) => write!(f, "port conflict: {why}"),
            SkipReason::NotAnIp(name) => {
                write!(f, "{name:?} is a DNS name, and resolution STATIC needs IP addresses")
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

/// A service attribute of ours that could not be used, with its service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SettingProblem {
    pub namespace: String,
    pub service: String,
    pub setting: InvalidSetting,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Translation {
    /// Sorted by name.
    pub entries: Vec<Entry>,
    pub skipped: Vec<Skipped>,
    pub skipped_labels: Vec<SkippedLabel>,
    pub invalid_settings: Vec<SettingProblem>,
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
        self.invalid_settings.extend(other.invalid_settings);
    }

    /// Sorts everything; keeps one entry per name, the first in (namespace, service) order.
    pub fn normalize(&mut self) {
        let entries = std::mem::take(&mut self.entries);
        self.entries = first_per_name(entries, |e| (&e.name, &e.origin), &mut self.skipped);
        self.skipped.sort();
        self.skipped.dedup();
        self.skipped_labels.sort();
        self.skipped_labels.dedup();
        self.invalid_settings.sort();
        self.invalid_settings.dedup();
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
    let skip = |instance: Option<String>, reason| Skipped {
        namespace: service.namespace.clone(),
        service: service.name.clone(),
        instance,
        reason,
    };
    let mut out = Translation::default();
    let explanation = match explain_service(service, options) {
        Ok(explanation) => explanation,
        Err(reason) => {
            out.skipped.push(skip(None, reason));
            return out;
        }
    };
    out.skipped
        .extend(explanation.skipped.into_iter().map(|(instance, reason)| skip(Some(instance), reason)));
    out.skipped_labels.extend(explanation.skipped_labels.into_iter().map(|key| SkippedLabel {
        namespace: service.namespace.clone(),
        service: service.name.clone(),
        key,
    }));
    out.invalid_settings.extend(explanation.invalid_settings.into_iter().map(|setting| SettingProblem {
        namespace: service.namespace.clone(),
        service: service.name.clone(),
        setting,
    }));
    out.entries.push(Entry {
        name: explanation.name,
        namespace: options.publish_namespace.clone(),
        create_time: service.created,
        spec: explanation.spec,
        origin: (service.namespace.clone(), service.name.clone()),
    });
    out
}

/// Everything decided for one service, and why: the ServiceEntry plus where each
/// port, protocol and setting came from, which instances were left out and why.
/// Served by the debug service and `render --explain`; recomputed on demand, never stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// ServiceEntry name (without namespace).
    pub name: String,
    pub host: String,
    /// Where the port list came from: the ports attribute, or derived from the instances.
    pub ports_origin: Origin,
    pub ports: Vec<PlannedPort>,
    pub location: Sourced<Location>,
    pub export_to: Sourced<Vec<String>>,
    /// The resolution in effect; `origin` says who asked for it (`Default` = chosen from the addresses).
    pub resolution: Sourced<Resolution>,
    pub addresses: Sourced<AddressMode>,
    /// Per endpoint: the instances it stands for.
    pub endpoint_instances: Vec<Vec<String>>,
    /// Instance ID → why it was left out.
    pub skipped: Vec<(String, SkipReason)>,
    /// Instances the health filter left out, with their health.
    pub health_filtered: Vec<(String, Health)>,
    pub skipped_labels: Vec<String>,
    pub invalid_settings: Vec<InvalidSetting>,
    /// Decisions worth telling the user (e.g. resolution NONE drops endpoints).
    pub notes: Vec<String>,
    pub spec: ServiceEntry,
}

/// Plans one service; `Err` when it cannot become a ServiceEntry at all.
pub fn explain_service(service: &Service, options: &Options) -> Result<Explanation, SkipReason> {
    let raw_host = format!("{}.{}", service.name, service.namespace);
    let host = to_host(&raw_host).ok_or_else(|| SkipReason::InvalidHost(raw_host.clone()))?;
    let name = entry_name(&raw_host, &host);
    let defaults = &options.defaults;
    let settings = ServiceSettings::from_attributes(&service.attributes, defaults);
    let mut invalid_settings = settings.invalid.clone();
    let mut notes = Vec::new();
    let mut skipped = Vec::new();
    let mut skipped_labels = Vec::new();

    let selected = options.health_filter.select(&service.instances);
    let mut health_filtered: Vec<(String, Health)> = service
        .instances
        .iter()
        .filter(|i| !selected.iter().any(|s| std::ptr::eq(*s, *i)))
        .map(|i| (i.id.clone(), i.health))
        .collect();
    health_filtered.sort();
    let mut selected = selected;
    selected.sort_by(|a, b| (&a.id, &a.attributes).cmp(&(&b.id, &b.attributes)));

    let mut endpoints: Vec<Endpoint> = Vec::new();
    for instance in selected {
        for (key, value) in instance.attributes.iter().filter(|(k, _)| is_custom(k)) {
            if !valid_label(key, value) {
                skipped_labels.push(key.to_owned());
            }
        }
        match to_endpoint(instance) {
            Ok(endpoint) => endpoints.push(endpoint),
            Err(reason) => skipped.push((instance.id.clone(), reason)),
        }
    }

    // Resolution first: STATIC leaves DNS-named instances out, which changes the ports.
    let resolution_mode = settings.resolution.clone();
    if resolution_mode.value == ResolutionMode::Fixed(Resolution::Static) {
        endpoints.retain(|e| match &e.address {
            Address::Ip(_) => true,
            Address::Hostname(h) => {
                skipped.extend(e.instances.iter().map(|i| (i.clone(), SkipReason::NotAnIp(h.clone()))));
                false
            }
        });
    }
    let all_ips = endpoints.iter().all(|e| matches!(e.address, Address::Ip(_)));
    let mut resolution = match resolution_mode.value {
        ResolutionMode::Fixed(r) => Sourced { value: r, origin: resolution_mode.origin.clone() },
        ResolutionMode::Auto => Sourced {
            value: if all_ips { Resolution::Static } else { Resolution::Dns },
            origin: resolution_mode.origin.clone(),
        },
    };

    // Ports.
    let instance_ports: Vec<Option<u16>> = endpoints.iter().map(|e| e.port).collect();
    let (plan, ports_origin) = match &settings.ports {
        Some(declared) => {
            let origin = Origin::Attribute(settings::PORTS_KEY);
            (ports::declared(declared, &instance_ports, &origin), origin)
        }
        None => (ports::derived(&instance_ports, defaults), Origin::Default),
    };
    let mut workload_entries: Vec<(WorkloadEntry, Vec<String>)> = Vec::new();
    for (endpoint, targets) in endpoints.iter().zip(plan.targets) {
        match targets {
            Some(targets) => workload_entries.push((
                WorkloadEntry {
                    address: endpoint.address.render(),
                    ports: targets,
                    labels: endpoint.labels.clone(),
                    network: String::new(),
                    locality: endpoint.locality.clone(),
                    weight: 0,
                    service_account: String::new(),
                },
                endpoint.instances.clone(),
            )),
            None => {
                let why = plan.conflict.clone().unwrap_or_default();
                skipped.extend(
                    endpoint.instances.iter().map(|i| (i.clone(), SkipReason::PortConflict(why.clone()))),
                );
            }
        }
    }
    // Sorted and deduplicated on content, so instance order and duplicates never show.
    workload_entries.sort_by(|a, b| {
        (endpoint_key(&a.0), &a.0.labels, &a.0.locality).cmp(&(
            endpoint_key(&b.0),
            &b.0.labels,
            &b.0.locality,
        ))
    });
    let mut merged: Vec<(WorkloadEntry, Vec<String>)> = Vec::with_capacity(workload_entries.len());
    for (entry, instances) in workload_entries {
        match merged.last_mut() {
            Some((last, ids)) if *last == entry => ids.extend(instances),
            _ => merged.push((entry, instances)),
        }
    }

    // istiod allows DNS_ROUND_ROBIN with at most one endpoint (counted as served: an
    // address that appears with two localities is two endpoints).
    if resolution.value == Resolution::DnsRoundRobin && merged.len() > 1 {
        invalid_settings.push(InvalidSetting {
            key: origin_key(&resolution.origin, settings::RESOLUTION_KEY),
            value: resolution.value.as_str_name().into(),
            reason: format!(
                "DNS_ROUND_ROBIN allows at most one endpoint and there are {}; resolution chosen automatically",
                merged.len()
            ),
        });
        let all_ips = merged.iter().all(|(e, _)| e.address.parse::<IpAddr>().is_ok());
        resolution = Sourced {
            value: if all_ips { Resolution::Static } else { Resolution::Dns },
            origin: Origin::Default,
        };
    }

    // Addresses.
    let kept_ips: Vec<IpAddr> = {
        let mut ips: Vec<IpAddr> = merged.iter().filter_map(|(e, _)| e.address.parse().ok()).collect();
        ips.sort();
        ips.dedup();
        ips
    };
    let endpoint_ips_usable = merged.iter().all(|(e, _)| e.address.parse::<IpAddr>().is_ok());
    let addresses_for = |mode: &AddressMode| -> Result<Vec<String>, String> {
        match mode {
            AddressMode::None => Ok(Vec::new()),
            AddressMode::Lowest | AddressMode::All if !endpoint_ips_usable => Ok(Vec::new()),
            AddressMode::Lowest => Ok(kept_ips.first().map(ToString::to_string).into_iter().collect()),
            AddressMode::All => Ok(kept_ips.iter().map(ToString::to_string).collect()),
            AddressMode::Fixed(list) => {
                let cidr = list.iter().any(|a| a.contains('/'));
                if cidr && !matches!(resolution.value, Resolution::Static | Resolution::None) {
                    Err(format!(
                        "CIDR addresses need resolution STATIC or NONE, not {}",
                        resolution.value.as_str_name()
                    ))
                } else {
                    Ok(list.clone())
                }
            }
        }
    };
    let mut address_mode = settings.addresses.clone();
    let addresses = match addresses_for(&address_mode.value) {
        Ok(addresses) => addresses,
        Err(reason) => {
            invalid_settings.push(InvalidSetting {
                key: origin_key(&address_mode.origin, settings::ADDRESSES_KEY),
                value: address_mode.value.to_string(),
                reason: format!("{reason}; no addresses set"),
            });
            address_mode = Sourced { value: AddressMode::None, origin: Origin::Default };
            Vec::new()
        }
    };

    // exportTo: istiod rejects `.` next to the publish namespace's own name.
    let mut export_to = settings.export_to.clone();
    if export_to.value.iter().any(|e| e == ".") && export_to.value.contains(&options.publish_namespace) {
        invalid_settings.push(InvalidSetting {
            key: origin_key(&export_to.origin, settings::EXPORT_TO_KEY),
            value: export_to.value.join(","),
            reason: format!("'.' already means the publish namespace {:?}", options.publish_namespace),
        });
        export_to = Sourced { value: Vec::new(), origin: Origin::Default };
    }

    let endpoint_count = merged.len();
    notes.extend(address_notes(
        &address_mode.value,
        &addresses,
        &plan.ports,
        resolution.value,
        endpoint_count,
    ));
    let (endpoints, endpoint_instances): (Vec<WorkloadEntry>, Vec<Vec<String>>) = if resolution.value
        == Resolution::None
    {
        if endpoint_count > 0 {
            notes.push(format!(
                    "resolution NONE: the {endpoint_count} endpoint(s) are not listed (istiod forbids endpoints with NONE); \
                     traffic goes to the address the caller dialled"
                ));
        }
        (Vec::new(), Vec::new())
    } else {
        merged
            .into_iter()
            .map(|(e, mut ids)| {
                ids.sort();
                (e, ids)
            })
            .unzip()
    };

    // Once per instance id and reason, once per key: what a full translation reports, so
    // the snapshot builder, which translates per service, counts the same.
    skipped.sort();
    skipped.dedup();
    skipped_labels.sort();
    skipped_labels.dedup();
    invalid_settings.sort();
    invalid_settings.dedup();
    let spec = ServiceEntry {
        hosts: vec![host.clone()],
        addresses,
        ports: plan
            .ports
            .iter()
            .map(|p| ServicePort {
                number: u32::from(p.spec.number),
                protocol: p.spec.protocol.as_str().into(),
                name: p.spec.name.clone(),
                target_port: 0,
            })
            .collect(),
        location: settings.location.value.into(),
        resolution: resolution.value.into(),
        endpoints,
        workload_selector: None,
        export_to: export_to.value.clone(),
        subject_alt_names: Vec::new(),
    };
    Ok(Explanation {
        name,
        host,
        ports_origin,
        ports: plan.ports,
        location: settings.location,
        export_to,
        resolution,
        addresses: address_mode,
        endpoint_instances,
        skipped,
        health_filtered,
        skipped_labels,
        invalid_settings,
        notes,
        spec,
    })
}

/// Finds the service a user means, by ServiceEntry name (`cloudmap-<host>`, with or
/// without `<publish-namespace>/`) or by Cloud Map `NAMESPACE/SERVICE`, and explains
/// it. When two services give one name, the one served (first in namespace/service order) is meant.
pub fn explain(registry: &Registry, target: &str, options: &Options) -> Option<(Service, Explanation)> {
    let target = target.trim();
    let entry_name = target.strip_prefix(&format!("{}/", options.publish_namespace)).unwrap_or(target);
    let mut services: Vec<&Service> = registry.services.iter().map(|s| &**s).collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    if let Some(service) = services.iter().find(|s| format!("{}/{}", s.namespace, s.name) == target) {
        return explain_service(service, options).ok().map(|e| (Service::clone(service), e));
    }
    services.into_iter().find_map(|service| match explain_service(service, options) {
        Ok(e) if e.name == entry_name => Some((service.clone(), e)),
        _ => None,
    })
}

/// What the addresses make of the sidecars' listeners, where it costs or surprises
/// (measured with istiod 1.26 in `tests/istiod_mesh.rs`).
fn address_notes(
    mode: &AddressMode,
    addresses: &[String],
    ports: &[PlannedPort],
    resolution: Resolution,
    endpoints: usize,
) -> Vec<String> {
    let mut notes = Vec::new();
    if *mode == AddressMode::All && addresses.len() > 1 {
        let n = addresses.len();
        let mut note = format!(
            "addresses all: istiod builds one service per address, so sidecars get {n} listeners per TCP port"
        );
        if resolution != Resolution::None && endpoints > 0 {
            note.push_str(&format!(
                " and every endpoint once per address ({n} x {endpoints} = {} endpoints per port)",
                n * endpoints
            ));
        }
        note.push_str("; `lowest` with Istio's DNS proxying costs one listener and lists each endpoint once");
        notes.push(note);
    }
    let unrouted: Vec<String> = ports
        .iter()
        .filter(|p| !p.spec.protocol.routed_by_name())
        .map(|p| p.spec.number.to_string())
        .collect();
    if addresses.is_empty() && !unrouted.is_empty() {
        notes.push(format!(
            "no addresses: sidecars serve port(s) {} on a wildcard listener (0.0.0.0) that takes every \
             outbound connection to that port, whatever its destination, and only one such service per \
             port (Istio allocates no address to ServiceEntries from a config source); set {} to \
             lowest, all or an IP to bind it",
            unrouted.join(", "),
            settings::ADDRESSES_KEY
        ));
    }
    notes
}

/// The name under which a setting's problem is reported: the attribute key, or the flag.
fn origin_key(origin: &Origin, attribute: &'static str) -> String {
    match origin {
        Origin::Attribute(key) => (*key).to_owned(),
        Origin::Flag(flag) => (*flag).to_owned(),
        Origin::Default => attribute.to_owned(),
    }
}

/// Orders endpoints by address (IPs numerically, before names), then ports.
fn endpoint_key(e: &WorkloadEntry) -> (Address, &BTreeMap<String, u32>) {
    let address = match e.address.parse::<IpAddr>() {
        Ok(ip) => Address::Ip(ip),
        Err(_) => Address::Hostname(e.address.clone()),
    };
    (address, &e.ports)
}

/// An instance reduced to what the ServiceEntry needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    address: Address,
    port: Option<u16>,
    labels: BTreeMap<String, String>,
    locality: String,
    /// The instance IDs it stands for.
    instances: Vec<String>,
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
            _ => return Err(SkipReason::InvalidPort(value.to_owned())),
        },
    };
    Ok(Endpoint {
        address: to_address(attrs)?,
        port,
        labels: attrs
            .iter()
            .filter(|(k, v)| is_custom(k) && valid_label(k, v))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        locality: to_locality(attrs),
        instances: vec![instance.id.clone()],
    })
}

type AddressParser = fn(&str) -> Option<Address>;

/// IPv4 wins over IPv6, and an IP over a DNS name. The first present attribute
/// that is invalid is the reason given when no attribute is usable.
fn to_address(attrs: &Attributes) -> Result<Address, SkipReason> {
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
                first_invalid
                    .get_or_insert(SkipReason::InvalidAddress { attribute, value: value.to_owned() });
            }
        }
    }
    Err(first_invalid.unwrap_or(SkipReason::NoAddress))
}

/// ECS's `REGION` and `AVAILABILITY_ZONE` as Istio's `region/zone`.
fn to_locality(attrs: &Attributes) -> String {
    let part = |key| attrs.get(key).map(str::trim).filter(|v| valid_locality_part(v));
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
