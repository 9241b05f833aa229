//! Per-service settings: what a Cloud Map service's own *service attributes*
//! (keys under [`ATTRIBUTE_PREFIX`]) ask for, falling back to the flags and then
//! to the built-in defaults. Pure parsing; every value that cannot be used is
//! reported as an [`InvalidSetting`] and the setting falls back, so the rest of
//! the service is still served.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::proto::istio::networking::v1alpha3::service_entry::{Location, Resolution};

/// Every service attribute of ours starts with this.
pub const ATTRIBUTE_PREFIX: &str = "cloudmap-xds/";
/// `[NAME=]NUMBER[/PROTOCOL]`, comma-separated; the first is the instance port.
pub const PORTS_KEY: &str = "cloudmap-xds/ports";
/// `MESH_EXTERNAL` or `MESH_INTERNAL`.
pub const LOCATION_KEY: &str = "cloudmap-xds/location";
/// Comma-separated Istio namespaces, `.` (the publish namespace), `*` or `~`.
pub const EXPORT_TO_KEY: &str = "cloudmap-xds/export-to";
/// `STATIC`, `DNS`, `DNS_ROUND_ROBIN` or `NONE`.
pub const RESOLUTION_KEY: &str = "cloudmap-xds/resolution";
/// `lowest`, `all`, `none`, or comma-separated IPs / CIDRs.
pub const ADDRESSES_KEY: &str = "cloudmap-xds/addresses";
/// Every key we read, for the "unknown key" message.
pub const KEYS: [&str; 5] = [PORTS_KEY, LOCATION_KEY, EXPORT_TO_KEY, RESOLUTION_KEY, ADDRESSES_KEY];

/// Flag names, as origins of a setting.
pub const PORT_PROTOCOLS_FLAG: &str = "--port-protocols";
pub const LOCATION_FLAG: &str = "--default-location";
pub const EXPORT_TO_FLAG: &str = "--default-export-to";
pub const RESOLUTION_FLAG: &str = "--default-resolution";
pub const ADDRESSES_FLAG: &str = "--default-addresses";

/// Protocols istiod accepts on a ServiceEntry port (istio `pkg/config/protocol`,
/// `Parse`), in the spelling istio itself uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Http,
    Https,
    Http2,
    Grpc,
    GrpcWeb,
    HttpProxy,
    Tcp,
    Tls,
    Udp,
    Mongo,
    Redis,
    Mysql,
}

impl Protocol {
    pub const ALL: [Protocol; 12] = [
        Protocol::Http,
        Protocol::Https,
        Protocol::Http2,
        Protocol::Grpc,
        Protocol::GrpcWeb,
        Protocol::HttpProxy,
        Protocol::Tcp,
        Protocol::Tls,
        Protocol::Udp,
        Protocol::Mongo,
        Protocol::Redis,
        Protocol::Mysql,
    ];

    /// The spelling istio uses (its `protocol.Instance` constants).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "HTTP",
            Protocol::Https => "HTTPS",
            Protocol::Http2 => "HTTP2",
            Protocol::Grpc => "GRPC",
            Protocol::GrpcWeb => "GRPC-Web",
            Protocol::HttpProxy => "HTTP_PROXY",
            Protocol::Tcp => "TCP",
            Protocol::Tls => "TLS",
            Protocol::Udp => "UDP",
            Protocol::Mongo => "Mongo",
            Protocol::Redis => "Redis",
            Protocol::Mysql => "MySQL",
        }
    }

    /// Whether a sidecar tells this protocol's services apart without an address: by the
    /// HTTP `Host` (HTTP, gRPC) or the TLS SNI (HTTPS, TLS) on a wildcard listener. The others
    /// (TCP, MongoDB, Redis, MySQL) get a listener per service address, or without one a
    /// wildcard listener that takes the whole port.
    pub fn routed_by_name(self) -> bool {
        !matches!(self, Protocol::Tcp | Protocol::Udp | Protocol::Mongo | Protocol::Redis | Protocol::Mysql)
    }

    /// A DNS-label-safe prefix for port names (`grpc-web`, `http-proxy`).
    pub fn name_prefix(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::GrpcWeb => "grpc-web",
            Protocol::HttpProxy => "http-proxy",
            Protocol::Tcp => "tcp",
            Protocol::Tls => "tls",
            Protocol::Udp => "udp",
            Protocol::Mongo => "mongo",
            Protocol::Redis => "redis",
            Protocol::Mysql => "mysql",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;

    /// Case-insensitive, like istio's `protocol.Parse`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        Protocol::ALL.into_iter().find(|p| p.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| {
            let known: Vec<_> = Protocol::ALL.iter().map(|p| p.as_str()).collect();
            format!("unknown protocol {s:?} (istio accepts {})", known.join(", "))
        })
    }
}

/// How a ServiceEntry's `addresses` are chosen.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddressMode {
    /// The lowest endpoint IP (the old operator's "first endpoint", made stable).
    Lowest,
    /// Every endpoint IP, so a caller that resolved any instance's IP still hits the host's listener.
    All,
    /// None: HTTP ports need none; for TCP ports Istio's DNS proxy allocates one.
    None,
    /// Exactly these IPs or CIDRs.
    Fixed(Vec<String>),
}

impl fmt::Display for AddressMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressMode::Lowest => f.write_str("lowest"),
            AddressMode::All => f.write_str("all"),
            AddressMode::None => f.write_str("none"),
            AddressMode::Fixed(addresses) => f.write_str(&addresses.join(",")),
        }
    }
}

impl FromStr for AddressMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("lowest") {
            return Ok(AddressMode::Lowest);
        }
        if s.eq_ignore_ascii_case("all") {
            return Ok(AddressMode::All);
        }
        if s.eq_ignore_ascii_case("none") {
            return Ok(AddressMode::None);
        }
        let mut addresses = Vec::new();
        for item in s.split(',').map(str::trim) {
            let normalized = normalize_ip_or_cidr(item)
                .ok_or_else(|| format!("{item:?} is neither lowest, all, none nor an IP address or CIDR"))?;
            if !addresses.contains(&normalized) {
                addresses.push(normalized);
            }
        }
        addresses.sort();
        Ok(AddressMode::Fixed(addresses))
    }
}

/// `10.0.0.1` or `10.0.0.0/16` in canonical form; host bits of a CIDR must be zero, as istiod requires.
fn normalize_ip_or_cidr(item: &str) -> Option<String> {
    match item.split_once('/') {
        None => item.parse::<IpAddr>().ok().map(|ip| ip.to_string()),
        Some((ip, bits)) => {
            let ip: IpAddr = ip.parse().ok()?;
            let bits: u8 = bits.parse().ok()?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            (bits <= max).then(|| format!("{ip}/{bits}"))
        }
    }
}

/// How the resolution is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolutionMode {
    /// `STATIC` when every endpoint is an IP, else `DNS`.
    Auto,
    Fixed(Resolution),
}

impl fmt::Display for ResolutionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolutionMode::Auto => f.write_str("auto"),
            ResolutionMode::Fixed(r) => f.write_str(r.as_str_name()),
        }
    }
}

impl FromStr for ResolutionMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Ok(ResolutionMode::Auto);
        }
        match Resolution::from_str_name(&s.to_ascii_uppercase()) {
            // DYNAMIC_DNS is for Istio's own DNS-based service discovery, not for endpoints we list.
            Some(
                r @ (Resolution::Static | Resolution::Dns | Resolution::DnsRoundRobin | Resolution::None),
            ) => Ok(ResolutionMode::Fixed(r)),
            _ => Err(format!("{s:?} is not one of auto, STATIC, DNS, DNS_ROUND_ROBIN, NONE")),
        }
    }
}

/// Parses `MESH_EXTERNAL` / `MESH_INTERNAL` (case-insensitive).
pub fn parse_location(s: &str) -> Result<Location, String> {
    match Location::from_str_name(&s.trim().to_ascii_uppercase()) {
        Some(l) => Ok(l),
        None => Err(format!("{:?} is not MESH_EXTERNAL or MESH_INTERNAL", s.trim())),
    }
}

/// Parses an `exportTo` list with istio's rules (`validateExportTo`): `.`, `*`, `~`
/// or namespace names; `*` and `~` stand alone; no duplicates. Empty = Istio's default (everyone).
pub fn parse_export_to(s: &str) -> Result<Vec<String>, String> {
    let items: Vec<String> =
        s.split(',').map(str::trim).filter(|i| !i.is_empty()).map(str::to_owned).collect();
    let mut seen = std::collections::BTreeSet::new();
    for item in &items {
        let valid = item == "." || item == "*" || item == "~" || is_dns_label(item);
        if !valid {
            return Err(format!("{item:?} is not '.', '*', '~' or a namespace name"));
        }
        if !seen.insert(item.as_str()) {
            return Err(format!("{item:?} appears twice"));
        }
    }
    if items.len() > 1 && items.iter().any(|i| i == "*" || i == "~") {
        return Err("'*' and '~' cannot be combined with other entries".into());
    }
    Ok(items)
}

/// One declared service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortSpec {
    pub number: u16,
    pub name: String,
    pub protocol: Protocol,
}

/// The name a port gets when none is given: `http` for 80/HTTP, `https` for
/// 443/HTTPS (the seed tutorial's names), else `<protocol>-<number>`.
pub fn default_port_name(number: u16, protocol: Protocol) -> String {
    match (number, protocol) {
        (80, Protocol::Http) => "http".into(),
        (443, Protocol::Https) => "https".into(),
        (n, p) => {
            // Spelled out by hand: every service without a ports attribute names its
            // ports on every full build, and `format!` cost a thirtieth of one.
            let prefix = p.name_prefix();
            let mut name = String::with_capacity(prefix.len() + 6);
            name.push_str(prefix);
            name.push('-');
            let digits = n.checked_ilog10().unwrap_or(0) + 1;
            for place in (0..digits).rev() {
                // One decimal digit: below 10, so it fits a u8.
                name.push(char::from(b'0' + (n / 10u16.pow(place) % 10) as u8));
            }
            name
        }
    }
}

/// Parses the ports attribute: `[NAME=]NUMBER[/PROTOCOL]`, comma-separated. A
/// port without protocol takes the one `protocol_of` gives its number.
pub fn parse_ports(s: &str, protocol_of: impl Fn(u16) -> Protocol) -> Result<Vec<PortSpec>, String> {
    let mut ports: Vec<PortSpec> = Vec::new();
    for item in s.split(',').map(str::trim) {
        if item.is_empty() {
            return Err("an empty entry (want NAME=NUMBER/PROTOCOL, e.g. http=80/HTTP)".into());
        }
        let (name, rest) = match item.split_once('=') {
            Some((name, rest)) => (Some(name.trim()), rest.trim()),
            None => (None, item),
        };
        let (number, protocol) = match rest.split_once('/') {
            Some((n, p)) => (n.trim(), Some(p.trim())),
            None => (rest, None),
        };
        let number = match number.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("{item:?}: {number:?} is not a port number in 1..=65535")),
        };
        let protocol = match protocol {
            Some(p) => p.parse::<Protocol>().map_err(|e| format!("{item:?}: {e}"))?,
            None => protocol_of(number),
        };
        let name = match name {
            Some(name) if is_dns_label(name) => name.to_owned(),
            Some(name) => {
                return Err(format!(
                    "{item:?}: port name {name:?} is not a DNS label (lower-case letters, digits, '-', at most 63)"
                ));
            }
            None => default_port_name(number, protocol),
        };
        if ports.iter().any(|p| p.number == number) {
            return Err(format!("port {number} is declared twice"));
        }
        if ports.iter().any(|p| p.name == name) {
            return Err(format!("port name {name:?} is declared twice"));
        }
        ports.push(PortSpec { number, name, protocol });
    }
    Ok(ports)
}

/// RFC 1123 label, as istiod checks port names and exportTo namespaces.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Where a setting in effect came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// A service attribute (the key).
    Attribute(&'static str),
    /// A command-line flag (its name).
    Flag(&'static str),
    /// The built-in default.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Attribute(key) => write!(f, "service attribute {key}"),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
            Origin::Default => f.write_str("default"),
        }
    }
}

/// A setting and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sourced<T> {
    pub value: T,
    pub origin: Origin,
}

/// A service attribute of ours that could not be used; the setting fell back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct InvalidSetting {
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl InvalidSetting {
    /// A short, stable label for metrics: the setting's name, or `unknown`.
    pub fn kind(&self) -> &'static str {
        KEYS.iter()
            .find(|k| **k == self.key)
            .map_or("unknown", |k| k.strip_prefix(ATTRIBUTE_PREFIX).unwrap_or(k))
    }
}

impl fmt::Display for InvalidSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={:?}: {}", self.key, self.value, self.reason)
    }
}

/// Defaults for services that set nothing, from the flags. `None` = built-in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Defaults {
    /// Port number → protocol for services without a ports attribute
    /// (`--port-protocols`); 80 is HTTP and 443 HTTPS unless this says otherwise.
    pub port_protocols: BTreeMap<u16, Protocol>,
    pub location: Option<Location>,
    pub export_to: Option<Vec<String>>,
    pub resolution: Option<ResolutionMode>,
    pub addresses: Option<AddressMode>,
}

/// The built-in address choice.
pub const DEFAULT_ADDRESS_MODE: AddressMode = AddressMode::Lowest;

impl Defaults {
    /// The protocol of a port number and where that came from.
    pub fn protocol_of(&self, number: u16) -> Sourced<Protocol> {
        if let Some(p) = self.port_protocols.get(&number) {
            return Sourced { value: *p, origin: Origin::Flag(PORT_PROTOCOLS_FLAG) };
        }
        let value = match number {
            80 => Protocol::Http,
            443 => Protocol::Https,
            _ => Protocol::Tcp,
        };
        Sourced { value, origin: Origin::Default }
    }
}

/// Parses `--port-protocols`: `NUMBER=PROTOCOL`, comma-separated.
pub fn parse_port_protocols(s: &str) -> Result<BTreeMap<u16, Protocol>, String> {
    let mut out = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (number, protocol) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not NUMBER=PROTOCOL (e.g. 8080=HTTP)"))?;
        let number = match number.trim().parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("{item:?}: {:?} is not a port number in 1..=65535", number.trim())),
        };
        let protocol = protocol.parse::<Protocol>().map_err(|e| format!("{item:?}: {e}"))?;
        if out.insert(number, protocol).is_some() {
            return Err(format!("port {number} appears twice"));
        }
    }
    Ok(out)
}

/// Everything a service's attributes ask for, each with its origin; what the
/// ports attribute does not set is decided per instance set by the port rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSettings {
    /// Declared ports; `None` = derive them from the instances.
    pub ports: Option<Vec<PortSpec>>,
    pub location: Sourced<Location>,
    pub export_to: Sourced<Vec<String>>,
    pub resolution: Sourced<ResolutionMode>,
    pub addresses: Sourced<AddressMode>,
    pub invalid: Vec<InvalidSetting>,
}

impl ServiceSettings {
    /// Reads the service attributes of ours; anything else is ignored.
    pub fn from_attributes(attributes: &BTreeMap<String, String>, defaults: &Defaults) -> Self {
        let mut invalid = Vec::new();
        let ports = match attributes.get(PORTS_KEY) {
            None => None,
            Some(value) => match parse_ports(value, |n| defaults.protocol_of(n).value) {
                Ok(ports) => Some(ports),
                Err(reason) => {
                    invalid.push(InvalidSetting { key: PORTS_KEY.into(), value: value.clone(), reason });
                    None
                }
            },
        };
        let location = setting(
            attributes,
            (LOCATION_KEY, parse_location),
            (defaults.location, LOCATION_FLAG),
            Location::MeshExternal,
            &mut invalid,
        );
        let export_to = setting(
            attributes,
            (EXPORT_TO_KEY, parse_export_to),
            (defaults.export_to.clone(), EXPORT_TO_FLAG),
            Vec::new(),
            &mut invalid,
        );
        let resolution = setting(
            attributes,
            (RESOLUTION_KEY, str::parse::<ResolutionMode>),
            (defaults.resolution, RESOLUTION_FLAG),
            ResolutionMode::Auto,
            &mut invalid,
        );
        let addresses = setting(
            attributes,
            (ADDRESSES_KEY, str::parse::<AddressMode>),
            (defaults.addresses.clone(), ADDRESSES_FLAG),
            DEFAULT_ADDRESS_MODE,
            &mut invalid,
        );
        // Bounded by a `&str`: a `String` bound was an allocation for every service.
        let ours = (std::ops::Bound::Included(ATTRIBUTE_PREFIX), std::ops::Bound::Unbounded);
        for (key, value) in attributes.range::<str, _>(ours) {
            if !key.starts_with(ATTRIBUTE_PREFIX) {
                break;
            }
            if !KEYS.contains(&key.as_str()) {
                invalid.push(InvalidSetting {
                    key: key.clone(),
                    value: value.clone(),
                    reason: format!("unknown key; cloudmap-xds reads {}", KEYS.join(", ")),
                });
            }
        }
        invalid.sort();
        ServiceSettings { ports, location, export_to, resolution, addresses, invalid }
    }
}

/// One setting: the attribute when it parses, else the flag, else the built-in value.
fn setting<T>(
    attributes: &BTreeMap<String, String>,
    (key, parse): (&'static str, impl Fn(&str) -> Result<T, String>),
    (flag_value, flag): (Option<T>, &'static str),
    builtin: T,
    invalid: &mut Vec<InvalidSetting>,
) -> Sourced<T> {
    if let Some(value) = attributes.get(key) {
        match parse(value) {
            Ok(parsed) => return Sourced { value: parsed, origin: Origin::Attribute(key) },
            Err(reason) => invalid.push(InvalidSetting { key: key.into(), value: value.clone(), reason }),
        }
    }
    match flag_value {
        Some(value) => Sourced { value, origin: Origin::Flag(flag) },
        None => Sourced { value: builtin, origin: Origin::Default },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn default_port_names_spell_the_number() {
        for n in [1, 9, 10, 99, 100, 443, 8080, 10_000, 65_535] {
            assert_eq!(default_port_name(n, Protocol::Tcp), format!("tcp-{n}"));
            assert_eq!(default_port_name(n, Protocol::Grpc), format!("grpc-{n}"));
        }
        assert_eq!(default_port_name(80, Protocol::Http), "http");
        assert_eq!(default_port_name(80, Protocol::Tcp), "tcp-80");
        for p in Protocol::ALL {
            assert_eq!(p.name_prefix(), p.as_str().to_ascii_lowercase().replace('_', "-"), "{p}");
        }
    }

    #[test]
    fn ports_attribute_grammar() {
        let defaults =
            Defaults { port_protocols: BTreeMap::from([(8080, Protocol::Http)]), ..Defaults::default() };
        let ports =
            parse_ports("80/http, admin=9090/GRPC, 8080, 5432", |n| defaults.protocol_of(n).value).unwrap();
        let got: Vec<_> = ports.iter().map(|p| (p.number, p.name.as_str(), p.protocol)).collect();
        assert_eq!(
            got,
            [
                (80, "http", Protocol::Http),
                (9090, "admin", Protocol::Grpc),
                (8080, "http-8080", Protocol::Http),
                (5432, "tcp-5432", Protocol::Tcp),
            ]
        );
        let grpc_web = parse_ports("8443/grpc-web", |_| Protocol::Tcp).unwrap();
        assert_eq!((grpc_web[0].name.as_str(), grpc_web[0].protocol.as_str()), ("grpc-web-8443", "GRPC-Web"));
        for (bad, needle) in [
            ("", "empty entry"),
            ("80,", "empty entry"),
            ("http=0/HTTP", "not a port number"),
            ("http=70000", "not a port number"),
            ("80/QUIC", "unknown protocol"),
            ("Web=80", "not a DNS label"),
            ("80,80/HTTP", "declared twice"),
            ("a=80,a=81", "declared twice"),
        ] {
            let err = parse_ports(bad, |_| Protocol::Tcp).unwrap_err();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
    }

    #[test]
    fn export_to_follows_istio_rules() {
        assert_eq!(parse_export_to(".,team-a").unwrap(), [".", "team-a"]);
        assert_eq!(parse_export_to("*").unwrap(), ["*"]);
        assert!(parse_export_to("").unwrap().is_empty());
        assert!(parse_export_to("*,team-a").is_err());
        assert!(parse_export_to("~,.").is_err());
        assert!(parse_export_to("Team_A").is_err());
        assert!(parse_export_to("a,a").is_err());
    }

    #[test]
    fn address_modes_parse() {
        assert_eq!("ALL".parse::<AddressMode>().unwrap(), AddressMode::All);
        assert_eq!(
            "10.1.0.0/16, 10.0.0.1".parse::<AddressMode>().unwrap(),
            AddressMode::Fixed(vec!["10.0.0.1".into(), "10.1.0.0/16".into()])
        );
        assert!("10.0.0.0/40".parse::<AddressMode>().is_err());
        assert!("some".parse::<AddressMode>().is_err());
    }

    #[test]
    fn attributes_override_flags_which_override_defaults_and_bad_values_fall_back() {
        let defaults = Defaults {
            location: Some(Location::MeshInternal),
            export_to: Some(vec!["team-a".into()]),
            ..Defaults::default()
        };
        let s = ServiceSettings::from_attributes(
            &attrs(&[
                (RESOLUTION_KEY, "dns"),
                (EXPORT_TO_KEY, "*,x"),
                (LOCATION_KEY, "mesh_external"),
                ("cloudmap-xds/port", "80"),
                ("team", "payments"),
            ]),
            &defaults,
        );
        assert_eq!(
            s.resolution,
            Sourced {
                value: ResolutionMode::Fixed(Resolution::Dns),
                origin: Origin::Attribute(RESOLUTION_KEY)
            }
        );
        assert_eq!(
            s.location,
            Sourced { value: Location::MeshExternal, origin: Origin::Attribute(LOCATION_KEY) }
        );
        assert_eq!(
            s.export_to,
            Sourced { value: vec!["team-a".into()], origin: Origin::Flag(EXPORT_TO_FLAG) }
        );
        assert_eq!(s.addresses, Sourced { value: AddressMode::Lowest, origin: Origin::Default });
        assert!(s.ports.is_none());
        let invalid: Vec<_> = s.invalid.iter().map(|i| (i.key.as_str(), i.kind())).collect();
        assert_eq!(invalid, [("cloudmap-xds/export-to", "export-to"), ("cloudmap-xds/port", "unknown")]);
        assert!(s.invalid[1].reason.contains(PORTS_KEY), "{}", s.invalid[1]);
    }

    #[test]
    fn port_protocol_flag_parses() {
        let map = parse_port_protocols("8080=http, 50051=GRPC").unwrap();
        assert_eq!(map, BTreeMap::from([(8080, Protocol::Http), (50051, Protocol::Grpc)]));
        assert!(parse_port_protocols("8080").unwrap_err().contains("NUMBER=PROTOCOL"));
        assert!(parse_port_protocols("8080=SPDY").unwrap_err().contains("unknown protocol"));
        assert!(parse_port_protocols("1=TCP,1=HTTP").unwrap_err().contains("twice"));
        assert!(parse_port_protocols("").unwrap().is_empty());
    }
}
