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

mod encode;
pub mod ports;
pub mod settings;

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use smallvec::{SmallVec, smallvec};

use self::ports::PlannedPort;
use self::settings::{
    AddressMode, Defaults, InvalidSetting, Origin, ResolutionMode, ServiceSettings, Sourced,
};
use crate::model::{Attributes, Health, HealthFilter, Instance, KeySet, Registry, Service, attr};
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
    let mut out = Translation::default();
    match plan_service(service, options, &mut KeyRoles::default()) {
        Ok(plan) => {
            let spec = plan.spec();
            out.entries.push(Entry {
                name: plan.name().to_owned(),
                namespace: options.publish_namespace.clone(),
                create_time: service.created,
                spec,
                origin: (service.namespace.clone(), service.name.clone()),
            });
            (out.skipped, out.skipped_labels, out.invalid_settings) = plan.problems(service);
        }
        Err(reason) => out.skipped.push(service_skipped(service, reason)),
    }
    out
}

/// One translated service as production serves it: its ServiceEntry planned, to be
/// written by the caller into a buffer it frames (see [`translate_service_encoded`]).
/// The bytes written are exactly prost's encoding of [`translate_service`]'s entry.
#[derive(Debug)]
pub struct EncodedEntry<'a> {
    /// `<publish-namespace>/<ServiceEntry name>`, the MCP resource name.
    pub mcp_name: String,
    pub create_time: SystemTime,
    /// How many endpoints it lists.
    pub endpoints: usize,
    plan: Plan<'a>,
}

impl EncodedEntry<'_> {
    /// Writes the encoded `istio.networking.v1alpha3.ServiceEntry` at the start of
    /// `scratch`, growing it as needed; returns its length. What `scratch` holds past
    /// that is left from earlier writes: a buffer kept from one service to the next
    /// is zeroed only when it grows.
    pub fn write_spec(&self, scratch: &mut Vec<u8>) -> usize {
        encode::write_spec(&self.plan, scratch)
    }
}

/// The plan's qualified name, moved out: the plan then has no name (and `Plan::name` is empty).
fn take_name(plan: &mut Plan<'_>) -> String {
    plan.name_at = 0;
    std::mem::take(&mut plan.qualified_name)
}

/// [`translate_service`] with the entry planned for encoding; see [`EncodedEntry`].
#[derive(Debug, Default)]
pub struct EncodedTranslation<'a> {
    pub entry: Option<EncodedEntry<'a>>,
    pub skipped: Vec<Skipped>,
    pub skipped_labels: Vec<SkippedLabel>,
    pub invalid_settings: Vec<SettingProblem>,
}

/// Translates one service for encoding straight into bytes, without building the
/// message: the snapshot builder's path, where a full build translates every
/// instance and the message's maps and strings would be allocated only to be
/// encoded. The caller keeps `key_roles` from one service to the next.
pub fn translate_service_encoded<'a>(
    service: &'a Service,
    options: &Options,
    key_roles: &mut KeyRoles,
) -> EncodedTranslation<'a> {
    match plan_service(service, options, key_roles) {
        Ok(mut plan) => {
            let (skipped, skipped_labels, invalid_settings) = plan.problems(service);
            EncodedTranslation {
                entry: Some(EncodedEntry {
                    mcp_name: take_name(&mut plan),
                    create_time: service.created,
                    endpoints: plan.listed_endpoints().len(),
                    plan,
                }),
                skipped,
                skipped_labels,
                invalid_settings,
            }
        }
        Err(reason) => {
            EncodedTranslation { skipped: vec![service_skipped(service, reason)], ..Default::default() }
        }
    }
}

fn service_skipped(service: &Service, reason: SkipReason) -> Skipped {
    Skipped { namespace: service.namespace.clone(), service: service.name.clone(), instance: None, reason }
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

/// Plans one service and explains it; `Err` when it cannot become a ServiceEntry at all.
pub fn explain_service(service: &Service, options: &Options) -> Result<Explanation, SkipReason> {
    let plan = plan_service(service, options, &mut KeyRoles::default())?;
    let selected = options.health_filter.select(&service.instances);
    let mut health_filtered: Vec<(String, Health)> = service
        .instances
        .iter()
        .filter(|i| !selected.iter().any(|s| std::ptr::eq(*s, *i)))
        .map(|i| (i.id.clone(), i.health))
        .collect();
    health_filtered.sort();
    let spec = plan.spec();
    let endpoint_instances = plan
        .listed_endpoints()
        .iter()
        .map(|e| e.instances.iter().map(|i| (*i).to_owned()).collect())
        .collect();
    Ok(Explanation {
        name: plan.name().to_owned(),
        host: plan.host,
        ports_origin: plan.ports_origin,
        ports: plan.ports,
        location: plan.location,
        export_to: plan.export_to,
        resolution: plan.resolution,
        addresses: plan.address_mode,
        endpoint_instances,
        skipped: plan.skipped,
        health_filtered,
        skipped_labels: plan.skipped_labels,
        invalid_settings: plan.invalid_settings,
        notes: plan.notes,
        spec,
    })
}

/// Everything decided for one service, before it becomes a message ([`Plan::spec`])
/// or bytes (`encode::write_spec`). Borrows the instances' strings: a full
/// build plans every instance, and copying each label only to encode it would
/// cost more than the rest of the translation.
#[derive(Debug)]
struct Plan<'a> {
    /// `<publish-namespace>/<ServiceEntry name>`: the MCP resource name, the entry's name
    /// from `name_at` on. One string for both: a full build names every service.
    qualified_name: String,
    name_at: usize,
    host: String,
    ports_origin: Origin,
    ports: Vec<PlannedPort>,
    /// Indices into `ports` in name order: the order of each endpoint's `targets`
    /// (a WorkloadEntry's port map is keyed, and encoded, by name).
    ports_by_name: SmallVec<[usize; 4]>,
    location: Sourced<Location>,
    export_to: Sourced<Vec<String>>,
    resolution: Sourced<Resolution>,
    address_mode: Sourced<AddressMode>,
    /// Nearly always one (the lowest endpoint IP): inline.
    addresses: SmallVec<[String; 1]>,
    /// Sorted, each distinct endpoint once.
    endpoints: Vec<Served<'a>>,
    /// Every endpoint's labels, each endpoint's in a range of its own (see [`Served::labels`]).
    labels: Vec<Label<'a>>,
    /// Instance ID → why it was left out; sorted.
    skipped: Vec<(String, SkipReason)>,
    skipped_labels: Vec<String>,
    invalid_settings: Vec<InvalidSetting>,
    notes: Vec<String>,
}

/// An endpoint as served: the instances that share its address, targets, labels and locality.
/// Made from one instance first (its port read, no targets yet), then given its targets once
/// the ports are planned, then merged with the endpoints equal to it.
#[derive(Debug, Clone)]
struct Served<'a> {
    /// A DNS name that is an IP (an instance CNAME of `10.0.0.1`) is that IP here,
    /// as it is once rendered (once the endpoint has its targets).
    address: Address,
    /// The instance's `AWS_INSTANCE_PORT`, from which the ports are planned.
    port: Option<u16>,
    /// The target of each service port, in port name order.
    targets: ports::Targets,
    /// Its labels in the plan's `labels`, in key order. A range, not the labels
    /// themselves: endpoints are moved and sorted whole, and five inline labels
    /// made each five times larger.
    labels: Range<usize>,
    locality: Locality<'a>,
    /// Sorted. Nearly always one: inline, so a full build allocates nothing for it.
    instances: SmallVec<[&'a str; 1]>,
}

impl<'a> Served<'a> {
    /// The instance it was made from, before endpoints are merged.
    fn first_instance(&self) -> &'a str {
        self.instances.first().copied().unwrap_or_default()
    }

    /// Orders endpoints by address (IPs numerically, before names), then ports,
    /// labels and locality: the order the message's fields give.
    fn key<'s>(
        &'s self,
        labels: &'s [Label<'a>],
    ) -> (&'s Address, &'s [u32], &'s [Label<'a>], &'s Locality<'a>) {
        (&self.address, &self.targets, &labels[self.labels.clone()], &self.locality)
    }
}

impl<'a> Plan<'a> {
    /// The ServiceEntry's name (without namespace).
    fn name(&self) -> &str {
        &self.qualified_name[self.name_at..]
    }

    /// The endpoints the ServiceEntry lists (none with resolution NONE).
    fn listed_endpoints(&self) -> &[Served<'a>] {
        if self.resolution.value == Resolution::None { &[] } else { &self.endpoints }
    }

    fn labels_of(&self, endpoint: &Served<'a>) -> &[Label<'a>] {
        &self.labels[endpoint.labels.clone()]
    }

    /// The port names in the order of each endpoint's `targets`.
    fn port_names(&self) -> impl Iterator<Item = &str> + Clone {
        self.ports_by_name.iter().map(|i| self.ports[*i].spec.name.as_str())
    }

    /// The ServiceEntry as a message: what `encode::write_spec` writes as bytes.
    fn spec(&self) -> ServiceEntry {
        let endpoints = self
            .listed_endpoints()
            .iter()
            .map(|e| WorkloadEntry {
                address: e.address.render(),
                ports: self.port_names().map(str::to_owned).zip(e.targets.iter().copied()).collect(),
                labels: self.labels_of(e).iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                network: String::new(),
                locality: e.locality.to_string(),
                weight: 0,
                service_account: String::new(),
            })
            .collect();
        ServiceEntry {
            hosts: vec![self.host.clone()],
            addresses: self.addresses.to_vec(),
            ports: self
                .ports
                .iter()
                .map(|p| ServicePort {
                    number: u32::from(p.spec.number),
                    protocol: p.spec.protocol.as_str().into(),
                    name: p.spec.name.clone(),
                    target_port: 0,
                })
                .collect(),
            location: self.location.value.into(),
            resolution: self.resolution.value.into(),
            endpoints,
            workload_selector: None,
            export_to: self.export_to.value.clone(),
            subject_alt_names: Vec::new(),
        }
    }

    /// What was left out, as a translation reports it.
    fn problems(&self, service: &Service) -> (Vec<Skipped>, Vec<SkippedLabel>, Vec<SettingProblem>) {
        let skipped = self
            .skipped
            .iter()
            .map(|(instance, reason)| Skipped {
                namespace: service.namespace.clone(),
                service: service.name.clone(),
                instance: Some(instance.clone()),
                reason: reason.clone(),
            })
            .collect();
        let skipped_labels = self
            .skipped_labels
            .iter()
            .map(|key| SkippedLabel {
                namespace: service.namespace.clone(),
                service: service.name.clone(),
                key: key.clone(),
            })
            .collect();
        let invalid_settings = self
            .invalid_settings
            .iter()
            .map(|setting| SettingProblem {
                namespace: service.namespace.clone(),
                service: service.name.clone(),
                setting: setting.clone(),
            })
            .collect();
        (skipped, skipped_labels, invalid_settings)
    }
}

/// Plans one service; `Err` when it cannot become a ServiceEntry at all.
fn plan_service<'a>(
    service: &'a Service,
    options: &Options,
    key_roles: &mut KeyRoles,
) -> Result<Plan<'a>, SkipReason> {
    let raw_host = [service.name.as_str(), ".", &service.namespace].concat();
    let host = to_host(&raw_host).ok_or_else(|| SkipReason::InvalidHost(raw_host.clone()))?;
    let (qualified_name, name_at) = qualified_entry_name(&options.publish_namespace, &raw_host, &host);
    // A host valid as it is is the raw host itself, kept rather than copied.
    let host = match host {
        Cow::Owned(mapped) => mapped,
        Cow::Borrowed(_) => raw_host,
    };
    let defaults = &options.defaults;
    let settings = ServiceSettings::from_attributes(&service.attributes, defaults);
    let mut invalid_settings = settings.invalid.clone();
    let mut notes = Vec::new();
    let mut skipped = Vec::new();
    let mut skipped_labels = Vec::new();

    let mut selected = options.health_filter.select(&service.instances);
    let order = |a: &&Instance, b: &&Instance| (&a.id, &a.attributes).cmp(&(&b.id, &b.attributes));
    // Sources list instances by id: checking is cheaper than sorting again.
    if !selected.is_sorted_by(|a, b| order(a, b).is_le()) {
        selected.sort_by(order);
    }

    // Endpoints are built once, in place: the ports are planned from them, then each gets its targets.
    let mut served: Vec<Served<'a>> = Vec::with_capacity(selected.len());
    // Room for every attribute of every instance if they all have the first one's count (nearly
    // always they share its keys): growing the list as labels come cost a tenth of the plan.
    let mut labels: Vec<Label<'a>> =
        Vec::with_capacity(selected.len() * selected.first().map_or(0, |i| i.attributes.len()));
    for instance in selected {
        let roles = key_roles.of(&instance.attributes);
        match to_endpoint(instance, roles, &mut labels, &mut skipped_labels) {
            Ok(endpoint) => served.push(endpoint),
            Err(reason) => skipped.push((instance.id.clone(), reason)),
        }
    }

    // Resolution first: STATIC leaves DNS-named instances out, which changes the ports.
    let resolution_mode = settings.resolution.clone();
    if resolution_mode.value == ResolutionMode::Fixed(Resolution::Static) {
        served.retain(|e| match &e.address {
            Address::Ip(_) => true,
            Address::Hostname(h) => {
                skipped.push((e.first_instance().to_owned(), SkipReason::NotAnIp(h.clone())));
                false
            }
        });
    }
    let all_ips = served.iter().all(|e| matches!(e.address, Address::Ip(_)));
    let mut resolution = match resolution_mode.value {
        ResolutionMode::Fixed(r) => Sourced { value: r, origin: resolution_mode.origin.clone() },
        ResolutionMode::Auto => Sourced {
            value: if all_ips { Resolution::Static } else { Resolution::Dns },
            origin: resolution_mode.origin.clone(),
        },
    };

    // Ports.
    let instance_ports: SmallVec<[Option<u16>; 16]> = served.iter().map(|e| e.port).collect();
    let (plan, ports_origin) = match &settings.ports {
        Some(declared) => {
            let origin = Origin::Attribute(settings::PORTS_KEY);
            (ports::declared(declared, &instance_ports, &origin), origin)
        }
        None => (ports::derived(&instance_ports, defaults), Origin::Default),
    };
    let mut ports_by_name: SmallVec<[usize; 4]> = (0..plan.ports.len()).collect();
    ports_by_name.sort_by(|a, b| plan.ports[*a].spec.name.cmp(&plan.ports[*b].spec.name));
    let in_name_order = ports_by_name.iter().enumerate().all(|(i, p)| i == *p);
    let mut index = 0;
    served.retain_mut(|endpoint| {
        let targets = plan.targets_of(index);
        index += 1;
        match targets {
            Some(targets) => {
                endpoint.targets = if in_name_order {
                    // A copy of the ports (`clone` goes element by element): once per endpoint.
                    ports::Targets::from_slice(targets)
                } else {
                    ports_by_name.iter().map(|i| targets[*i]).collect()
                };
                endpoint.address.render_as_read();
                true
            }
            None => {
                let why = plan.conflict.clone().unwrap_or_default();
                skipped.push((endpoint.first_instance().to_owned(), SkipReason::PortConflict(why)));
                false
            }
        }
    });
    // Sorted and deduplicated on content, so instance order and duplicates never show.
    // Sources list instances by id, and ids often follow addresses: checking is cheaper than sorting.
    if !served.is_sorted_by(|a, b| a.key(&labels) <= b.key(&labels)) {
        served.sort_by(|a, b| a.key(&labels).cmp(&b.key(&labels)));
    }
    served.dedup_by(|later, kept| {
        let same = later.key(&labels) == kept.key(&labels);
        if same {
            kept.instances.extend(later.instances.drain(..));
        }
        same
    });
    let mut merged = served;
    merged.iter_mut().for_each(|e| e.instances.sort_unstable());
    let endpoint_ips_usable = merged.iter().all(|e| matches!(e.address, Address::Ip(_)));

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
        resolution = Sourced {
            value: if endpoint_ips_usable { Resolution::Static } else { Resolution::Dns },
            origin: Origin::Default,
        };
    }

    // Addresses.
    let endpoint_ips = || {
        merged.iter().filter_map(|e| match e.address {
            Address::Ip(ip) => Some(ip),
            Address::Hostname(_) => None,
        })
    };
    let addresses_for = |mode: &AddressMode| -> Result<SmallVec<[String; 1]>, String> {
        match mode {
            AddressMode::None => Ok(SmallVec::new()),
            AddressMode::Lowest | AddressMode::All if !endpoint_ips_usable => Ok(SmallVec::new()),
            AddressMode::Lowest => Ok(endpoint_ips().min().map(encode::ip_text).into_iter().collect()),
            AddressMode::All => {
                let mut ips: Vec<IpAddr> = endpoint_ips().collect();
                ips.sort();
                ips.dedup();
                Ok(ips.into_iter().map(encode::ip_text).collect())
            }
            AddressMode::Fixed(list) => {
                let cidr = list.iter().any(|a| a.contains('/'));
                if cidr && !matches!(resolution.value, Resolution::Static | Resolution::None) {
                    Err(format!(
                        "CIDR addresses need resolution STATIC or NONE, not {}",
                        resolution.value.as_str_name()
                    ))
                } else {
                    Ok(list.iter().cloned().collect())
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
            SmallVec::new()
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
    if resolution.value == Resolution::None && endpoint_count > 0 {
        notes.push(format!(
            "resolution NONE: the {endpoint_count} endpoint(s) are not listed (istiod forbids endpoints with NONE); \
             traffic goes to the address the caller dialled"
        ));
    }

    // Once per instance id and reason, once per key: what a full translation reports, so
    // the snapshot builder, which translates per service, counts the same.
    skipped.sort();
    skipped.dedup();
    skipped_labels.sort();
    skipped_labels.dedup();
    invalid_settings.sort();
    invalid_settings.dedup();
    Ok(Plan {
        qualified_name,
        name_at,
        host,
        ports_origin,
        ports: plan.ports,
        ports_by_name,
        location: settings.location,
        export_to,
        resolution,
        address_mode,
        addresses,
        endpoints: merged,
        labels,
        skipped,
        skipped_labels,
        invalid_settings,
        notes,
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
    // Only spelled out when it is told: a full build plans every service.
    let unrouted_ports = || -> Vec<String> {
        ports
            .iter()
            .filter(|p| !p.spec.protocol.routed_by_name())
            .map(|p| p.spec.number.to_string())
            .collect()
    };
    if addresses.is_empty()
        && let unrouted = unrouted_ports()
        && !unrouted.is_empty()
    {
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

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Address {
    // Variant order sorts IPs (numerically) before hostnames.
    Ip(IpAddr),
    Hostname(String),
}

impl Address {
    fn render(&self) -> String {
        match self {
            Address::Ip(ip) => encode::ip_text(*ip),
            Address::Hostname(h) => h.clone(),
        }
    }

    /// Becomes what the rendered address reads as: a DNS name spelled as an IP is that IP.
    fn render_as_read(&mut self) {
        if let Address::Hostname(h) = self
            && let Ok(ip) = h.parse::<IpAddr>()
        {
            *self = Address::Ip(ip);
        }
    }
}

fn to_endpoint<'a>(
    instance: &'a Instance,
    roles: &[KeyRole],
    labels: &mut Vec<Label<'a>>,
    skipped_labels: &mut Vec<String>,
) -> Result<Served<'a>, SkipReason> {
    let labels_from = labels.len();
    let known = Known::read(&instance.attributes, roles, labels, skipped_labels);
    let port = match known.port {
        None => None,
        Some(value) => match trim(value).parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => return Err(SkipReason::InvalidPort(value.to_owned())),
        },
    };
    Ok(Served {
        address: to_address(&known)?,
        port,
        targets: ports::Targets::new(),
        locality: Locality::of(&known),
        labels: labels_from..labels.len(),
        instances: smallvec![instance.id.as_str()],
    })
}

/// What an endpoint is made of, taken from an instance's attributes in one pass
/// (a full build reads every instance; a lookup per attribute cost a binary search each).
#[derive(Debug, Default)]
struct Known<'a> {
    ipv4: Option<&'a str>,
    ipv6: Option<&'a str>,
    cname: Option<&'a str>,
    alias_dns_name: Option<&'a str>,
    port: Option<&'a str>,
    region: Option<&'a str>,
    zone: Option<&'a str>,
}

impl<'a> Known<'a> {
    /// Reads `attributes`, whose keys `roles` describes. The custom attributes that
    /// are valid labels are appended to `labels`; those that cannot be labels are
    /// added to `skipped_labels`.
    fn read(
        attributes: &'a Attributes,
        roles: &[KeyRole],
        labels: &mut Vec<Label<'a>>,
        skipped_labels: &mut Vec<String>,
    ) -> Self {
        let mut known = Known::default();
        debug_assert_eq!(attributes.len(), roles.len(), "roles are read from these very keys");
        for ((key, value), role) in attributes.iter().zip(roles) {
            let slot = match role.slot {
                Some(Slot::Ipv4) => &mut known.ipv4,
                Some(Slot::Ipv6) => &mut known.ipv6,
                Some(Slot::Cname) => &mut known.cname,
                Some(Slot::AliasDnsName) => &mut known.alias_dns_name,
                Some(Slot::Port) => &mut known.port,
                Some(Slot::Region) => &mut known.region,
                Some(Slot::Zone) => &mut known.zone,
                None => &mut None,
            };
            *slot = Some(value);
            match role.label {
                LabelKey::NotCustom => {}
                LabelKey::Valid if valid_label_value(value) => labels.push((key, value)),
                LabelKey::Valid | LabelKey::Invalid => skipped_labels.push(key.to_owned()),
            }
        }
        known
    }
}

/// The attributes an endpoint is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Ipv4,
    Ipv6,
    Cname,
    AliasDnsName,
    Port,
    Region,
    Zone,
}

/// Whether an attribute key can name an endpoint label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LabelKey {
    /// Cloud Map's own (`AWS_...`): never a label.
    NotCustom,
    /// A label if its value is valid too.
    Valid,
    Invalid,
}

/// What one attribute key is to an endpoint.
#[derive(Debug, Clone, Copy)]
struct KeyRole {
    slot: Option<Slot>,
    label: LabelKey,
}

impl KeyRole {
    fn of(key: &str) -> Self {
        let slot = match key {
            attr::IPV4 => Some(Slot::Ipv4),
            attr::IPV6 => Some(Slot::Ipv6),
            attr::CNAME => Some(Slot::Cname),
            attr::ALIAS_DNS_NAME => Some(Slot::AliasDnsName),
            attr::PORT => Some(Slot::Port),
            attr::REGION => Some(Slot::Region),
            attr::AVAILABILITY_ZONE => Some(Slot::Zone),
            _ => None,
        };
        let label = if !is_custom(key) {
            LabelKey::NotCustom
        } else if valid_label_key(key) {
            LabelKey::Valid
        } else {
            LabelKey::Invalid
        };
        KeyRole { slot, label }
    }
}

/// The roles of the last key set read. Instances nearly always share one key set
/// (ECS registers the same keys on every task, in every service), so each key is
/// matched and checked once per key set, not once per instance: the snapshot
/// builder keeps one from service to service.
#[derive(Debug, Default)]
pub struct KeyRoles {
    last_keys: KeySet,
    roles: SmallVec<[KeyRole; 12]>,
}

impl KeyRoles {
    /// The role of each of `attributes`' keys, in key order.
    fn of(&mut self, attributes: &Attributes) -> &[KeyRole] {
        if !self.last_keys.is_of(attributes) {
            self.roles.clear();
            self.roles.extend(attributes.keys().map(KeyRole::of));
            self.last_keys = attributes.key_set();
        }
        &self.roles
    }
}

type AddressParser = fn(&str) -> Option<Address>;

/// IPv4 wins over IPv6, and an IP over a DNS name. The first present attribute
/// that is invalid is the reason given when no attribute is usable.
fn to_address(known: &Known<'_>) -> Result<Address, SkipReason> {
    let mut first_invalid = None;
    let candidates: [(&'static str, Option<&str>, AddressParser); 4] = [
        (attr::IPV4, known.ipv4, |v| parse_ipv4(v).map(|ip| Address::Ip(ip.into()))),
        (attr::IPV6, known.ipv6, |v| v.parse::<Ipv6Addr>().ok().map(|ip| Address::Ip(ip.into()))),
        (attr::CNAME, known.cname, |v| to_dns_name(v).map(Address::Hostname)),
        (attr::ALIAS_DNS_NAME, known.alias_dns_name, |v| to_dns_name(v).map(Address::Hostname)),
    ];
    for (attribute, value, parse) in candidates {
        let Some(value) = value else { continue };
        match parse(trim(value)) {
            Some(address) => return Ok(address),
            None => {
                first_invalid
                    .get_or_insert(SkipReason::InvalidAddress { attribute, value: value.to_owned() });
            }
        }
    }
    Err(first_invalid.unwrap_or(SkipReason::NoAddress))
}

/// `value.parse::<Ipv4Addr>()`, exactly: four decimal octets of one to three digits,
/// none above 255 and none with a leading zero. Byte by byte: a full build parses every
/// instance's address, and std's general parser cost a tenth of the plan.
fn parse_ipv4(value: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = value.as_bytes().split(|b| *b == b'.');
    for octet in &mut octets {
        let digits = parts.next()?;
        let leading_zero = digits.len() > 1 && digits[0] == b'0';
        if digits.is_empty() || digits.len() > 3 || leading_zero {
            return None;
        }
        let mut number = 0u16;
        for digit in digits {
            if !digit.is_ascii_digit() {
                return None;
            }
            number = number * 10 + u16::from(digit - b'0');
        }
        *octet = u8::try_from(number).ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

/// An endpoint label: a custom attribute's key and value.
type Label<'a> = (&'a str, &'a str);

/// ECS's `REGION` and `AVAILABILITY_ZONE` as Istio's `region/zone` (or `region`
/// alone, or nothing). Kept as its parts and spelled out only when written: a full
/// build would otherwise allocate the joined string for every instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Locality<'a> {
    /// Empty when there is no locality.
    region: &'a str,
    /// Empty when there is no zone.
    zone: &'a str,
}

impl<'a> Locality<'a> {
    fn of(known: &Known<'a>) -> Self {
        let part = |value: Option<&'a str>| value.map(trim).filter(|v| valid_locality_part(v));
        match (part(known.region), part(known.zone)) {
            (Some(region), zone) => Locality { region, zone: zone.unwrap_or("") },
            (None, _) => Locality::default(),
        }
    }

    /// The parts as written: `region`, `/`, `zone`, each possibly empty.
    fn parts(&self) -> [&'a str; 3] {
        let separator = if self.zone.is_empty() { "" } else { "/" };
        [self.region, separator, self.zone]
    }

    fn len(&self) -> usize {
        self.parts().iter().map(|p| p.len()).sum()
    }

    fn is_empty(&self) -> bool {
        self.region.is_empty()
    }
}

impl std::fmt::Display for Locality<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.parts().iter().try_for_each(|p| f.write_str(p))
    }
}

impl Ord for Locality<'_> {
    /// As the written strings compare.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let bytes = |l: &Self| l.parts().into_iter().flat_map(str::bytes);
        bytes(self).cmp(bytes(other))
    }
}

impl PartialOrd for Locality<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

fn valid_locality_part(v: &str) -> bool {
    // Bytes, not chars: a non-ASCII character is invalid either way, and decoding cost more than the check.
    !v.is_empty()
        && v.len() <= MAX_DNS_LABEL
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `str::trim`, without decoding characters when the value has nothing to trim:
/// a full build trims three attributes of every instance, and nearly none has spaces.
fn trim(value: &str) -> &str {
    // `is_ascii_whitespace` leaves out the vertical tab, which `str::trim` removes.
    let solid = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii() && !b.is_ascii_whitespace() && *b != 0x0b);
    // An ASCII byte at either end is a whole character there, and not white space.
    if solid(value.as_bytes().first()) && solid(value.as_bytes().last()) { value } else { value.trim() }
}

/// `svc.ns` as a valid lower-case DNS name: upper case is lowered, every other
/// character outside `[a-z0-9-]` becomes `-`. `None` when no valid name remains.
/// Borrowed when `raw` is valid as it is, as nearly every name is.
pub fn to_host(raw: &str) -> Option<Cow<'_, str>> {
    // Mapping a name label by label allocates each.
    if is_valid_host(raw) {
        return Some(Cow::Borrowed(raw));
    }
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
    let host = labels.join(".");
    is_valid_host(&host).then_some(Cow::Owned(host))
}

/// A host istiod accepts: an RFC 1123 subdomain of at least two labels, the last not all digits.
fn is_valid_host(host: &str) -> bool {
    is_dns_subdomain(host) && host.contains('.') && !host.rsplit('.').next().is_some_and(all_digits)
}

/// `<namespace>/cloudmap-<host>` and where the ServiceEntry's name (`cloudmap-<host>`)
/// starts in it. When the host had to be rewritten, or the name would pass Kubernetes'
/// 253 characters, the name is shortened as needed and ends in a hash of the original,
/// so `My_Svc` and `my-svc` (and long look-alikes) stay distinct.
fn qualified_entry_name(namespace: &str, raw_host: &str, host: &str) -> (String, usize) {
    let name_at = namespace.len() + 1;
    // Nearly every name is plain: spelled once, in the one string.
    let mut qualified = [namespace, "/", NAME_PREFIX, host].concat();
    let plain = &qualified[name_at..];
    if raw_host == host && is_dns_subdomain(plain) {
        return (qualified, name_at);
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
    let hashed = format!("{}-{suffix}", base.trim_end_matches(['-', '.']));
    qualified.truncate(name_at);
    qualified.push_str(&hashed);
    (qualified, name_at)
}

/// A CNAME or alias target as a lower-case DNS name without the trailing dot.
/// A dotted IPv4 address stays as it is (istiod accepts an IP as a DNS endpoint).
fn to_dns_name(value: &str) -> Option<String> {
    let name = value.strip_suffix('.').unwrap_or(value).to_ascii_lowercase();
    let numeric_tld = name.rsplit('.').next().is_some_and(all_digits) && parse_ipv4(&name).is_none();
    (name.contains('.') && is_dns_subdomain(&name) && !numeric_tld).then_some(name)
}

/// istiod rejects a host or DNS name whose last label is all digits (`svc.2024`).
fn all_digits(label: &str) -> bool {
    !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit())
}

/// RFC 1123 subdomain, lower case, as Kubernetes and istiod check names. One pass
/// over the bytes: a full build checks every service's host and name.
fn is_dns_subdomain(name: &str) -> bool {
    if name.len() > MAX_DNS_NAME {
        return false;
    }
    let mut label_len = 0;
    let mut previous = b'.';
    for &b in name.as_bytes() {
        if b == b'.' {
            // A label is not empty and does not end in `-`.
            if label_len == 0 || previous == b'-' {
                return false;
            }
            label_len = 0;
        } else {
            let allowed = b.is_ascii_lowercase() || b.is_ascii_digit() || (b == b'-' && label_len > 0);
            label_len += 1;
            if !allowed || label_len > MAX_DNS_LABEL {
                return false;
            }
        }
        previous = b;
    }
    label_len > 0 && previous != b'-'
}

fn is_custom(key: &str) -> bool {
    !key.starts_with(attr::RESERVED_PREFIX)
}

/// Kubernetes label rules, which istiod applies to endpoint labels.
pub fn valid_label(key: &str, value: &str) -> bool {
    valid_label_key(key) && valid_label_value(value)
}

fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    prefix.is_none_or(is_dns_subdomain) && qualified_name_part(name)
}

fn valid_label_value(value: &str) -> bool {
    value.is_empty() || qualified_name_part(value)
}

fn qualified_name_part(s: &str) -> bool {
    let bytes = s.as_bytes();
    !s.is_empty()
        && s.len() <= MAX_DNS_LABEL
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes.iter().all(|&b| NAME_PART_BYTE[usize::from(b)])
}

/// The bytes a qualified name part may hold, as a table: a full build checks every
/// custom attribute of every instance, and one load per byte beat four comparisons.
const NAME_PART_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < table.len() {
        let c = b as u8; // b < 256
        table[b] = c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.';
        b += 1;
    }
    table
};

#[cfg(test)]
mod tests;
