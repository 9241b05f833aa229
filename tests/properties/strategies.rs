//! Generators for the registry model, one strategy function per model type, each mixing
//! what Cloud Map (or a registry file) really holds with what it should not: valid and
//! invalid names, addresses, ports, labels and localities, at sizes from empty to large.
//!
//! Structure (registries, services, instances, which attributes are present) is built from
//! proptest collections and options, so a failure shrinks to the fewest services, instances
//! and attributes. Leaf strings are a *kind* chosen by proptest (shrinking toward the first,
//! most ordinary kind) plus a seed for a small generator: proptest's regex strategies cost
//! ~0.1-1 ms per string in a debug build, which would make a million services take hours.
//!
//! Extending the model means adding one strategy here (say `service_attributes()` when
//! `model::Service` gains attributes) and using it in its parent (`service_sized()`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cloudmap_xds::model::{Health, HealthFilter, Instance, Registry, Service, attr};
use cloudmap_xds::proto::istio::networking::v1alpha3::service_entry::{Location, Resolution};
use cloudmap_xds::translate::Options;
use cloudmap_xds::translate::settings::{
    ADDRESSES_KEY, AddressMode, Defaults, EXPORT_TO_KEY, LOCATION_KEY, PORTS_KEY, Protocol, RESOLUTION_KEY,
    ResolutionMode,
};
use fastrand::Rng;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;

/// A registry and the options it is translated with.
#[derive(Debug, Clone)]
pub struct Case {
    pub registry: Registry,
    pub options: Options,
}

pub fn case() -> BoxedStrategy<Case> {
    (registry(), options()).prop_map(|(registry, options)| Case { registry, options }).boxed()
}

/// Options as the CLI admits them: the publish namespace is a Kubernetes namespace name, and
/// the `--port-protocols` / `--default-*` flags hold values their parsers accept.
pub fn options() -> BoxedStrategy<Options> {
    let publish_namespace = leaf(&[(3, |_| "istio-system".to_owned()), (1, |r| dns_label(r, 1, 63))]);
    (publish_namespace, health_filter(), defaults())
        .prop_map(|(publish_namespace, health_filter, defaults)| Options {
            publish_namespace,
            health_filter,
            defaults,
        })
        .boxed()
}

/// What the defaults flags can hold: mostly nothing set, sometimes each of them.
pub fn defaults() -> BoxedStrategy<Defaults> {
    let protocol = (0..Protocol::ALL.len()).prop_map(|i| Protocol::ALL[i]);
    let port = prop_oneof![3 => prop::sample::select(vec![80u16, 443, 8080, 9090, 50051, 5432]), 1 => 1u16..];
    let location = prop_oneof![Just(Location::MeshExternal), Just(Location::MeshInternal)];
    let export_to = leaf(&[
        (2, |_| ".".to_owned()),
        (2, |_| "*".to_owned()),
        (1, |_| "~".to_owned()),
        (2, |r| {
            (0..r.usize(1..=3))
                .map(|_| dns_label(r, 1, 12))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join(",")
        }),
        (1, |r| format!(".,{}", dns_label(r, 1, 12))),
    ])
    .prop_map(|v| cloudmap_xds::translate::settings::parse_export_to(&v).unwrap_or_default());
    let resolution = prop_oneof![
        Just(ResolutionMode::Auto),
        Just(ResolutionMode::Fixed(Resolution::Static)),
        Just(ResolutionMode::Fixed(Resolution::Dns)),
        Just(ResolutionMode::Fixed(Resolution::DnsRoundRobin)),
        Just(ResolutionMode::Fixed(Resolution::None)),
    ];
    let addresses = addresses_value().prop_filter_map("parses", |v| v.parse::<AddressMode>().ok());
    (
        option::weighted(0.3, btree_map(port, protocol, 0..4)),
        option::weighted(0.2, location),
        option::weighted(0.2, export_to),
        option::weighted(0.2, resolution),
        option::weighted(0.2, addresses),
    )
        .prop_map(|(port_protocols, location, export_to, resolution, addresses)| Defaults {
            port_protocols: port_protocols.unwrap_or_default(),
            location,
            export_to,
            resolution,
            addresses,
        })
        .boxed()
}

pub fn health_filter() -> BoxedStrategy<HealthFilter> {
    prop_oneof![Just(HealthFilter::HealthyOrElseAll), Just(HealthFilter::Healthy), Just(HealthFilter::All)]
        .boxed()
}

/// How large generated registries get: mostly small, sometimes large.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub services: (Range<usize>, Range<usize>),
    pub instances: (Range<usize>, Range<usize>),
}

/// Up to 63 services of up to 79 instances.
pub const DEFAULT_SIZES: Sizes = Sizes { services: (0..8, 8..64), instances: (0..6, 6..80) };
/// Up to 5 services of up to 5 instances: enough for a file's structure.
pub const SMALL_SIZES: Sizes = Sizes { services: (0..3, 3..6), instances: (0..3, 3..6) };

pub fn registry() -> BoxedStrategy<Registry> {
    registry_sized(DEFAULT_SIZES)
}

/// (namespace, name) unique, as every source guarantees (Cloud Map keys services by them,
/// the registry file rejects repeats).
pub fn registry_sized(sizes: Sizes) -> BoxedStrategy<Registry> {
    let (small, large) = sizes.services.clone();
    prop_oneof![
        6 => vec(service_sized(sizes.clone()), small),
        1 => vec(service_sized(sizes), large),
    ]
    .prop_map(|services| {
        let mut seen = BTreeSet::new();
        Registry::shared(
            services
                .into_iter()
                .filter(|s| seen.insert((s.namespace.clone(), s.name.clone())))
                .map(Arc::new)
                .collect(),
        )
    })
    .boxed()
}

pub fn service_sized(sizes: Sizes) -> BoxedStrategy<Service> {
    let (small, large) = sizes.instances;
    let instances = prop_oneof![
        8 => vec(instance(), small),
        1 => vec(instance(), large),
    ];
    (namespace_name(), service_name(), created(), option::weighted(0.4, service_attributes()), instances)
        .prop_map(|(namespace, name, created, attributes, instances)| Service {
            namespace,
            name,
            created,
            attributes: attributes.unwrap_or_default(),
            instances,
        })
        .boxed()
}

/// Cloud Map service attributes: ours (`cloudmap-xds/...`) with valid and invalid values,
/// unknown keys under our prefix, and keys of other tools.
pub fn service_attributes() -> BoxedStrategy<BTreeMap<String, String>> {
    (
        option::weighted(0.6, ports_value()),
        option::weighted(
            0.3,
            leaf(&[
                (4, |r| pick(r, &["MESH_EXTERNAL", "MESH_INTERNAL", "mesh_internal"]).to_owned()),
                (1, |r| unicode(r, 0, 12)),
            ]),
        ),
        option::weighted(0.3, export_to_value()),
        option::weighted(
            0.3,
            leaf(&[
                (4, |r| pick(r, &["STATIC", "DNS", "DNS_ROUND_ROBIN", "NONE", "auto", "dns"]).to_owned()),
                (1, |r| pick(r, &["DYNAMIC_DNS", "", "static ", "LOGICAL_DNS"]).to_owned()),
            ]),
        ),
        option::weighted(0.3, addresses_value()),
        btree_map(
            leaf(&[
                (3, |r| format!("cloudmap-xds/{}", from(r, "abcdefghijklmnop-", 0, 12))),
                (2, |r| label_name(r, 1, 20)),
            ]),
            leaf(&[(1, |r| unicode(r, 0, 20))]),
            0..3,
        ),
    )
        .prop_map(|(ports, location, export_to, resolution, addresses, others)| {
            let mut attributes = others;
            for (key, value) in [
                (PORTS_KEY, ports),
                (LOCATION_KEY, location),
                (EXPORT_TO_KEY, export_to),
                (RESOLUTION_KEY, resolution),
                (ADDRESSES_KEY, addresses),
            ] {
                if let Some(value) = value {
                    attributes.insert(key.to_owned(), value);
                }
            }
            attributes
        })
        .boxed()
}

/// `cloudmap-xds/ports`: declared port lists good and bad.
pub fn ports_value() -> BoxedStrategy<String> {
    leaf(&[
        (6, |r| {
            let protocols = [
                "HTTP",
                "HTTPS",
                "GRPC",
                "HTTP2",
                "TCP",
                "TLS",
                "grpc-web",
                "Mongo",
                "mysql",
                "REDIS",
                "UDP",
                "HTTP_PROXY",
            ];
            (0..r.usize(1..=4))
                .map(|_| {
                    let any = r.u16(1..);
                    let number = pick(r, &[80u16, 443, 8080, 9090, 50051, 5432, 1, 65535, any]);
                    let name = if r.bool() { format!("{}=", dns_label(r, 1, 15)) } else { String::new() };
                    let protocol =
                        if r.u8(0..4) > 0 { format!("/{}", pick(r, &protocols)) } else { String::new() };
                    format!("{name}{number}{protocol}")
                })
                .collect::<Vec<_>>()
                .join(pick(r, &[",", ", ", " , "]))
        }),
        (1, |r| {
            pick(r, &["", ",", "80,80", "http=80,http=81", "Web=80", "0", "70000", "80/QUIC", "=80", "80/"])
                .to_owned()
        }),
        (1, |r| from(r, "abc0123=/,- ", 0, 30)),
        (1, |r| unicode(r, 0, 20)),
    ])
}

/// `cloudmap-xds/export-to` and `--default-export-to`: Istio's rules, kept and broken.
pub fn export_to_value() -> BoxedStrategy<String> {
    leaf(&[
        (3, |r| (0..r.usize(1..=3)).map(|_| dns_label(r, 1, 12)).collect::<Vec<_>>().join(",")),
        (2, |r| pick(r, &[".", "*", "~", ".,istio-system", "*,a", "~,.", "a,a", "Team_A", ""]).to_owned()),
        (1, |r| format!(".,{}", dns_label(r, 1, 12))),
        (1, |r| unicode(r, 0, 12)),
    ])
}

/// `cloudmap-xds/addresses` and `--default-addresses`: modes, IPs, CIDRs (host bits set or
/// not, of both families, past their width), and garbage.
pub fn addresses_value() -> BoxedStrategy<String> {
    leaf(&[
        (3, |r| pick(r, &["lowest", "all", "none", "ALL"]).to_owned()),
        (2, |r| (0..r.usize(1..=3)).map(|_| ipv4(r).to_string()).collect::<Vec<_>>().join(",")),
        (2, |r| format!("{}/{}", ipv4(r), r.u8(0..=33))),
        (1, |r| format!("{}/{}", ipv6(r), r.u8(0..=129))),
        (1, |r| format!("{},{}", ipv4(r), ipv6(r))),
        (1, address_garbage),
    ])
}

/// Cloud Map namespace names: DNS names (`corp.local`), HTTP names, and worse.
pub fn namespace_name() -> BoxedStrategy<String> {
    leaf(&[(4, |r| dns_name(r, 1..=3, 1, 15)), (1, |r| dns_label(r, 1, 20)), (2, awkward_name)])
}

pub fn service_name() -> BoxedStrategy<String> {
    leaf(&[(4, |r| dns_label(r, 1, 24)), (2, awkward_name)])
}

/// Names as they come: upper case, `_`, dots, unicode, blanks, near and past DNS limits,
/// and a tiny alphabet so different names often map to the same host.
fn awkward_name(r: &mut Rng) -> String {
    match r.u8(0..9) {
        0 => from(r, "abcxyzABCXYZ0189_-", 1, 30),
        1 => {
            let labels = r.usize(2..=5);
            (0..labels).map(|_| from(r, "abcXYZ019_-", 0, 12)).collect::<Vec<_>>().join(".")
        }
        2 => from(r, "aA_.-", 1, 4),
        3 => unicode(r, 0, 24),
        4 => format!("{}{}{}", from(r, " \t", 0, 3), from(r, "abcdefgh", 1, 8), from(r, " \t", 0, 3)),
        5 => from(r, "abcdefghij0123456789-", 60, 70),
        6 => {
            let labels = r.usize(2..=5);
            (0..labels).map(|_| from(r, "abcdef0123-", 60, 66)).collect::<Vec<_>>().join(".")
        }
        7 => from(r, "abcdefABC_.-0123", 120, 300),
        _ => from(r, "a.b-", 0, 6),
    }
}

/// Cloud Map's CreateDate: before and after the epoch, with nanoseconds.
pub fn created() -> BoxedStrategy<SystemTime> {
    (any::<bool>(), 0u64..10_000_000_000, 0u32..1_000_000_000)
        .prop_map(|(before, secs, nanos)| {
            let offset = Duration::new(secs, nanos);
            if before { SystemTime::UNIX_EPOCH - offset } else { SystemTime::UNIX_EPOCH + offset }
        })
        .boxed()
}

pub fn instance() -> BoxedStrategy<Instance> {
    (instance_id(), health(), instance_attributes())
        .prop_map(|(id, health, attributes)| Instance { id, health, attributes: attributes.into() })
        .boxed()
}

/// Unique in Cloud Map, but a registry file may repeat them; a small alphabet makes repeats common.
pub fn instance_id() -> BoxedStrategy<String> {
    leaf(&[(3, |r| format!("i-{:08x}", r.u32(..))), (1, |r| from(r, "ab", 1, 2)), (1, |r| unicode(r, 0, 16))])
}

pub fn health() -> BoxedStrategy<Health> {
    prop_oneof![Just(Health::Healthy), Just(Health::Unhealthy), Just(Health::Unknown)].boxed()
}

/// Every attribute an instance can carry: the address attributes (each may hold any kind
/// of address, or garbage), the port, ECS's locality, other `AWS_` attributes and custom ones.
pub fn instance_attributes() -> BoxedStrategy<BTreeMap<String, String>> {
    let addresses = (
        option::weighted(0.7, ipv4_value()),
        option::weighted(0.2, ipv6_value()),
        option::weighted(0.15, dns_value()),
        option::weighted(0.05, dns_value()),
    );
    let locality = (option::weighted(0.3, locality_part()), option::weighted(0.25, locality_part()));
    let others = leaf(&[(1, |r| unicode(r, 0, 12))]);
    (
        addresses,
        option::weighted(0.6, port_value()),
        locality,
        btree_map(custom_key(), label_value(), 0..5),
        btree_map(other_aws_key(), others, 0..2),
    )
        .prop_map(|((ipv4, ipv6, cname, alias), port, (region, zone), custom, aws)| {
            let mut attributes = custom;
            attributes.extend(aws);
            let known = [
                (attr::IPV4, ipv4),
                (attr::IPV6, ipv6),
                (attr::CNAME, cname),
                (attr::ALIAS_DNS_NAME, alias),
                (attr::PORT, port),
                (attr::REGION, region),
                (attr::AVAILABILITY_ZONE, zone),
            ];
            for (key, value) in known {
                if let Some(value) = value {
                    attributes.insert(key.to_owned(), value);
                }
            }
            attributes
        })
        .boxed()
}

/// `AWS_INSTANCE_IPV4`: mostly an IPv4 address, sometimes in a form or of a kind that is not.
pub fn ipv4_value() -> BoxedStrategy<String> {
    leaf(&[
        (8, |r| ipv4(r).to_string()),
        (1, |r| format!(" {}\t", ipv4(r))),
        (1, |r| {
            let o = ipv4(r).octets();
            format!("{:03}.{:03}.{}.{}", o[0], o[1], o[2], o[3])
        }),
        (1, ipv6_text),
        (1, address_garbage),
    ])
}

/// `AWS_INSTANCE_IPV6`: canonical, IPv4-mapped, upper case, zoned, bracketed, or not IPv6.
pub fn ipv6_value() -> BoxedStrategy<String> {
    leaf(&[(6, |r| ipv6(r).to_string()), (3, ipv6_text), (1, |r| ipv4(r).to_string()), (1, address_garbage)])
}

fn ipv6_text(r: &mut Rng) -> String {
    match r.u8(0..5) {
        0 => ipv6(r).to_string().to_uppercase(),
        1 => format!("::ffff:{}", ipv4(r)),
        2 => format!("{}%eth0", ipv6(r)),
        3 => format!("[{}]", ipv6(r)),
        _ => {
            // Every group written out, leading zeros kept.
            let s = ipv6(r).segments();
            s.iter().map(|g| format!("{g:04x}")).collect::<Vec<_>>().join(":")
        }
    }
}

/// `AWS_INSTANCE_CNAME` / `AWS_ALIAS_DNS_NAME`: DNS names good and bad.
pub fn dns_value() -> BoxedStrategy<String> {
    leaf(&[
        (6, |r| dns_name(r, 2..=5, 1, 14)),
        (1, |r| format!("{}.", dns_name(r, 2..=4, 1, 14))),
        (1, |r| {
            let labels = r.usize(2..=4);
            (0..labels).map(|_| from(r, "abcXYZ019-", 1, 12)).collect::<Vec<_>>().join(".")
        }),
        (1, |r| format!("_{}._tcp.{}.com", from(r, "abcdefgh", 1, 8), from(r, "abcdefgh", 1, 8))),
        (1, |r| format!("*.{}.com", from(r, "abcdefgh", 1, 8))),
        (1, |r| dns_label(r, 1, 12)),
        (1, |r| {
            let labels = r.usize(2..=5);
            (0..labels).map(|_| r.u16(0..1000).to_string()).collect::<Vec<_>>().join(".")
        }),
        (1, |r| format!("{}.{}", from(r, "abcdef0123-", 60, 70), from(r, "abcde", 2, 5))),
        (1, |r| dns_name(r, 5..=7, 40, 63)),
        (1, address_garbage),
    ])
}

fn address_garbage(r: &mut Rng) -> String {
    match r.u8(0..4) {
        0 => String::new(),
        1 => from(r, " .:", 1, 4),
        2 => from(r, "0123456789abcdefABCDEF:.%[]/-", 1, 24),
        _ => unicode(r, 1, 16),
    }
}

/// `AWS_INSTANCE_PORT`: any port, and what is not one.
pub fn port_value() -> BoxedStrategy<String> {
    leaf(&[
        (6, |r| r.u16(1..=u16::MAX).to_string()),
        (2, |r| pick(r, &["80", "443", "8080", "9090", "15001", "15006", "15008", "15090"]).to_owned()),
        (1, |r| {
            pick(
                r,
                &["0", "65536", "-1", "+80", " 8080 ", "080", "8080.0", "", "http", "99999999999999999999"],
            )
            .to_owned()
        }),
        (1, |r| unicode(r, 0, 6)),
    ])
}

/// `REGION` and `AVAILABILITY_ZONE` as ECS writes them, and otherwise.
pub fn locality_part() -> BoxedStrategy<String> {
    leaf(&[
        (4, |r| {
            let zone = if r.bool() { from(r, "abcdef", 1, 1) } else { String::new() };
            format!(
                "{}-{}-{}{zone}",
                from(r, "abcdefghijklmnopqrstuvwxyz", 2, 2),
                from(r, "eastwestnorthsouthcentral", 4, 9),
                r.u8(0..10)
            )
        }),
        (1, |r| format!("{}{}-az{}", from(r, "abcdefghijklmnopqrstuvwxyz", 3, 3), r.u8(0..10), r.u8(0..10))),
        (1, |r| from(r, "aZ09_/ .-", 0, 12)),
        (1, |r| unicode(r, 0, 8)),
        (1, |r| from(r, "abcdef0123-", 60, 70)),
    ])
}

/// Custom attribute keys: Kubernetes label keys (plain and prefixed, some Istio's own),
/// reserved-looking ones, and keys no label may have.
pub fn custom_key() -> BoxedStrategy<String> {
    leaf(&[
        (4, |r| label_name(r, 1, 22)),
        (2, |r| format!("{}/{}", dns_name(r, 1..=3, 1, 10), label_name(r, 1, 12))),
        (1, |r| {
            pick(
                r,
                &[
                    "app",
                    "version",
                    "region",
                    "istio.io/rev",
                    "topology.istio.io/network",
                    "security.istio.io/tlsMode",
                    "topology.kubernetes.io/zone",
                    "kubernetes.io/hostname",
                ],
            )
            .to_owned()
        }),
        (1, |r| from(r, "aZ09._/-", 1, 80)),
        (1, |r| format!("{}/{}/{}", from(r, "abc", 1, 5), from(r, "abc", 1, 5), from(r, "abc", 1, 5))),
        (1, |r| from(r, "abcdef0123", 64, 70)),
        (1, |r| format!("{}/{}", from(r, "abc0.", 250, 260), from(r, "abc", 1, 5))),
        (1, |r| unicode(r, 1, 12)),
    ])
}

/// Label values: valid ones (empty included), at and past 63 characters, and invalid ones.
pub fn label_value() -> BoxedStrategy<String> {
    leaf(&[
        (5, |r| if r.u8(0..6) == 0 { String::new() } else { label_name(r, 1, 22) }),
        (1, |r| from(r, "abcdef0123", 62, 65)),
        (1, |r| from(r, " abc._-", 1, 12)),
        (1, |r| unicode(r, 0, 12)),
    ])
}

/// `AWS_` attributes other than the address and port ones (Cloud Map and ECS set some).
pub fn other_aws_key() -> BoxedStrategy<String> {
    leaf(&[
        (1, |r| {
            pick(r, &["AWS_INIT_HEALTH_STATUS", "AWS_EC2_INSTANCE_ID", "AWS_INSTANCE_IPV4_X"]).to_owned()
        }),
        (1, |r| format!("AWS_{}", from(r, "ABCDEFGHIJKLMNOPQRSTUVWXYZ_", 1, 12))),
    ])
}

// ---- leaf generators -----------------------------------------------------------------------------

type Generator = fn(&mut Rng) -> String;

/// A string of one of `kinds` (weight, generator). Proptest chooses the kind and a seed; the
/// kind shrinks toward the first, so list the most ordinary kind first.
pub fn leaf(kinds: &[(u32, Generator)]) -> BoxedStrategy<String> {
    let indices: Vec<usize> = kinds
        .iter()
        .enumerate()
        .flat_map(|(i, (weight, _))| std::iter::repeat_n(i, *weight as usize))
        .collect();
    let generators: Vec<Generator> = kinds.iter().map(|(_, g)| *g).collect();
    (prop::sample::select(indices), any::<u64>())
        .prop_map(move |(kind, seed)| generators[kind](&mut Rng::with_seed(seed)))
        .boxed()
}

fn pick<T: Copy>(r: &mut Rng, options: &[T]) -> T {
    options[r.usize(..options.len())]
}

/// `min..=max` characters drawn from `alphabet`.
pub fn from(r: &mut Rng, alphabet: &str, min: usize, max: usize) -> String {
    let chars: Vec<char> = alphabet.chars().collect();
    (0..r.usize(min..=max)).map(|_| chars[r.usize(..chars.len())]).collect()
}

/// Any characters: mostly printable ASCII, also controls, Latin-1, other planes, combining
/// marks, odd spaces and the line and paragraph separators.
pub fn unicode(r: &mut Rng, min: usize, max: usize) -> String {
    (0..r.usize(min..=max))
        .map(|_| match r.u8(0..10) {
            0..=4 => r.char(' '..='~'),
            5 => r.char('\0'..='\u{1f}'),
            6 => r.char('\u{80}'..='\u{7ff}'),
            7 => r.char('\u{800}'..='\u{ffff}'),
            8 => r.char('\u{10000}'..='\u{10ffff}'),
            _ => pick(r, &['\u{a0}', '\u{2028}', '\u{feff}', '\u{301}', '\u{7f}', '\u{85}']),
        })
        .collect()
}

/// A DNS-1123 label of `min..=max` characters.
fn dns_label(r: &mut Rng, min: usize, max: usize) -> String {
    const EDGE: &str = "abcdefghijklmnopqrstuvwxyz0123456789";
    let len = r.usize(min.max(1)..=max);
    let mut s = from(r, EDGE, 1, 1);
    if len > 1 {
        s.push_str(&from(r, "abcdefghijklmnopqrstuvwxyz0123456789-", len - 2, len - 2));
        s.push_str(&from(r, EDGE, 1, 1));
    }
    s
}

fn dns_name(r: &mut Rng, labels: std::ops::RangeInclusive<usize>, min: usize, max: usize) -> String {
    (0..r.usize(labels)).map(|_| dns_label(r, min, max)).collect::<Vec<_>>().join(".")
}

/// A Kubernetes label name (the part after an optional prefix).
fn label_name(r: &mut Rng, min: usize, max: usize) -> String {
    const EDGE: &str = "abcxyzABCXYZ0189";
    let len = r.usize(min.max(1)..=max);
    let mut s = from(r, EDGE, 1, 1);
    if len > 1 {
        s.push_str(&from(r, "abcxyzABCXYZ0189._-", len - 2, len - 2));
        s.push_str(&from(r, EDGE, 1, 1));
    }
    s
}

/// Any IPv4 address, the special ones often.
fn ipv4(r: &mut Rng) -> Ipv4Addr {
    match r.u8(0..8) {
        0 => pick(
            r,
            &[
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::BROADCAST,
                Ipv4Addr::LOCALHOST,
                Ipv4Addr::new(169, 254, 169, 254),
                Ipv4Addr::new(224, 0, 0, 1),
            ],
        ),
        1 => Ipv4Addr::new(10, r.u8(..), r.u8(..), r.u8(..)),
        _ => Ipv4Addr::from(r.u32(..)),
    }
}

/// Any IPv6 address, the special and IPv4-embedding ones often.
fn ipv6(r: &mut Rng) -> Ipv6Addr {
    match r.u8(0..8) {
        0 => {
            pick(r, &[Ipv6Addr::UNSPECIFIED, Ipv6Addr::LOCALHOST, Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)])
        }
        1 => ipv4(r).to_ipv6_mapped(),
        2 => ipv4(r).to_ipv6_compatible(),
        3 => Ipv6Addr::new(0xfd00, r.u16(..), 0, 0, 0, 0, 0, r.u16(..)),
        _ => Ipv6Addr::from(r.u128(..)),
    }
}
