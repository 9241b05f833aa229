//! A planned service written straight into ServiceEntry bytes.
//!
//! At 100,000 endpoints, building the generated `WorkloadEntry`s (a map of owned
//! strings per label and port, per endpoint) only to encode and drop them cost
//! most of a full build. Here each endpoint is written from the strings the
//! model already holds. The bytes are exactly prost's for [`Plan::spec`]: they
//! follow prost's rules (fields in tag order, empty strings and zeros left out,
//! including inside map entries, every element of a repeated field written, even
//! an empty one). Every translate unit test
//! (`tests::one`) and `tests/properties.rs` (builder against `translate` +
//! prost, byte for byte) hold the two paths together.

use prost::encoding::{WireType, encoded_len_varint, key_len};
use smallvec::SmallVec;

use std::borrow::Cow;
use std::net::IpAddr;

use super::ports::PlannedPort;
use super::{Address, Label, Plan, Served};
use crate::wire::{
    enum_len, length_delimited_len, put_key, put_varint, string_len, uint32_len, write_enum,
    write_repeated_string, write_string, write_uint32,
};

/// `ServiceEntry` fields (`workload_selector` and `subject_alt_names` are never set).
const HOSTS: u32 = 1;
const ADDRESSES: u32 = 2;
const SERVICE_PORTS: u32 = 3;
const LOCATION: u32 = 4;
const RESOLUTION: u32 = 5;
const ENDPOINTS: u32 = 6;
const EXPORT_TO: u32 = 7;
/// `ServicePort` fields (`target_port` is never set).
const NUMBER: u32 = 1;
const PROTOCOL: u32 = 2;
const NAME: u32 = 3;
/// `WorkloadEntry` fields (`network`, `weight` and `service_account` are never set).
const ADDRESS: u32 = 1;
const PORTS: u32 = 2;
const LABELS: u32 = 3;
const LOCALITY: u32 = 5;
/// Map entries' key and value.
const KEY: u32 = 1;
const VALUE: u32 = 2;

/// How long `plan`'s encoded `ServiceEntry` is, and what writing it needs: the
/// caller learns the length first, so it can frame the bytes (the MCP envelope)
/// in one buffer instead of copying them into it.
#[derive(Debug)]
pub(super) struct SizedSpec {
    /// Each listed endpoint's encoded `WorkloadEntry` length (inline for a typical service).
    endpoint_lens: SmallVec<[usize; 16]>,
    len: usize,
}

impl SizedSpec {
    pub(super) fn of(plan: &Plan<'_>) -> Self {
        let endpoint_lens: SmallVec<[usize; 16]> = plan
            .listed_endpoints()
            .iter()
            .map(|e| {
                workload_entry_len(e, plan.labels_of(e), &AddressText::of(&e.address), plan.port_names())
            })
            .collect();
        let endpoints_len: usize =
            endpoint_lens.iter().map(|len| length_delimited_len(ENDPOINTS, *len)).sum();
        let len = head_len(plan) + endpoints_len + tail_len(plan);
        SizedSpec { endpoint_lens, len }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Appends the encoded `ServiceEntry` of `plan` (the plan this was sized from) to
    /// `buf`, fields in tag order as prost writes them (`export_to`, 7, after the endpoints, 6).
    pub(super) fn write(&self, plan: &Plan<'_>, buf: &mut Vec<u8>) {
        let start = buf.len();
        buf.reserve(self.len);
        write_head(plan, buf);
        for (endpoint, len) in plan.listed_endpoints().iter().zip(&self.endpoint_lens) {
            put_key(ENDPOINTS, WireType::LengthDelimited, buf);
            put_varint(*len as u64, buf);
            let address = AddressText::of(&endpoint.address);
            write_workload_entry(endpoint, plan.labels_of(endpoint), &address, plan.port_names(), buf);
        }
        write_tail(plan, buf);
        debug_assert_eq!(buf.len() - start, self.len, "the size computed is the size written");
    }
}

/// The fields before the endpoints: hosts, addresses, ports, location, resolution.
/// Written from the plan, not through a prost message: building one cost a
/// handful of allocations per service, a tenth of a full build's.
fn head_len(plan: &Plan<'_>) -> usize {
    length_delimited_len(HOSTS, plan.host.len())
        + plan.addresses.iter().map(|a| length_delimited_len(ADDRESSES, a.len())).sum::<usize>()
        + plan.ports.iter().map(|p| length_delimited_len(SERVICE_PORTS, service_port_len(p))).sum::<usize>()
        + enum_len(LOCATION, plan.location.value as i32)
        + enum_len(RESOLUTION, plan.resolution.value as i32)
}

fn write_head(plan: &Plan<'_>, buf: &mut Vec<u8>) {
    write_repeated_string(HOSTS, &plan.host, buf);
    for address in &plan.addresses {
        write_repeated_string(ADDRESSES, address, buf);
    }
    for port in &plan.ports {
        put_key(SERVICE_PORTS, WireType::LengthDelimited, buf);
        put_varint(service_port_len(port) as u64, buf);
        write_uint32(NUMBER, u32::from(port.spec.number), buf);
        write_string(PROTOCOL, port.spec.protocol.as_str(), buf);
        write_string(NAME, &port.spec.name, buf);
    }
    write_enum(LOCATION, plan.location.value as i32, buf);
    write_enum(RESOLUTION, plan.resolution.value as i32, buf);
}

/// The field after the endpoints: `export_to`.
fn tail_len(plan: &Plan<'_>) -> usize {
    plan.export_to.value.iter().map(|e| length_delimited_len(EXPORT_TO, e.len())).sum()
}

fn write_tail(plan: &Plan<'_>, buf: &mut Vec<u8>) {
    for namespace in &plan.export_to.value {
        write_repeated_string(EXPORT_TO, namespace, buf);
    }
}

fn service_port_len(port: &PlannedPort) -> usize {
    uint32_len(NUMBER, u32::from(port.spec.number))
        + string_len(PROTOCOL, port.spec.protocol.as_str().len())
        + string_len(NAME, port.spec.name.len())
}

fn workload_entry_len<'n>(
    e: &Served<'_>,
    labels: &[Label<'_>],
    address: &AddressText<'_>,
    port_names: impl Iterator<Item = &'n str>,
) -> usize {
    length_delimited_len(ADDRESS, address.len())
        + port_names
            .zip(&e.targets)
            .map(|(n, t)| length_delimited_len(PORTS, port_entry_len(n, *t)))
            .sum::<usize>()
        + labels.iter().map(|(k, v)| length_delimited_len(LABELS, label_entry_len(k, v))).sum::<usize>()
        + string_len(LOCALITY, e.locality.len())
}

fn write_workload_entry<'n>(
    e: &Served<'_>,
    labels: &[Label<'_>],
    address: &AddressText<'_>,
    port_names: impl Iterator<Item = &'n str>,
    buf: &mut Vec<u8>,
) {
    put_key(ADDRESS, WireType::LengthDelimited, buf);
    put_varint(address.len() as u64, buf);
    address.write(buf);
    for (name, target) in port_names.zip(&e.targets) {
        put_key(PORTS, WireType::LengthDelimited, buf);
        put_varint(port_entry_len(name, *target) as u64, buf);
        write_string(KEY, name, buf);
        if *target != 0 {
            put_key(VALUE, WireType::Varint, buf);
            put_varint(u64::from(*target), buf);
        }
    }
    for (key, value) in labels {
        put_key(LABELS, WireType::LengthDelimited, buf);
        put_varint(label_entry_len(key, value) as u64, buf);
        write_string(KEY, key, buf);
        write_string(VALUE, value, buf);
    }
    if !e.locality.is_empty() {
        put_key(LOCALITY, WireType::LengthDelimited, buf);
        put_varint(e.locality.len() as u64, buf);
        e.locality.parts().iter().for_each(|p| buf.extend_from_slice(p.as_bytes()));
    }
}

/// An endpoint's address as text (never empty). IPv4, nearly every endpoint, is
/// written digit by digit: formatting it through `Display` into a new string cost
/// as much as the rest of the endpoint.
enum AddressText<'e> {
    V4([u8; 4]),
    Text(Cow<'e, str>),
}

impl<'e> AddressText<'e> {
    fn of(address: &'e Address) -> Self {
        match address {
            Address::Ip(IpAddr::V4(ip)) => AddressText::V4(ip.octets()),
            Address::Hostname(h) => AddressText::Text(Cow::Borrowed(h)),
            ip => AddressText::Text(Cow::Owned(ip.render())),
        }
    }

    fn len(&self) -> usize {
        match self {
            AddressText::V4(octets) => octets.iter().map(|o| decimal_digits(*o)).sum::<usize>() + 3,
            AddressText::Text(text) => text.len(),
        }
    }

    fn write(&self, buf: &mut Vec<u8>) {
        match self {
            AddressText::V4(octets) => ipv4_bytes(*octets, |b| buf.push(b)),
            AddressText::Text(text) => buf.extend_from_slice(text.as_bytes()),
        }
    }
}

/// `ip` as `Display` spells it; IPv4 without the formatting machinery (see [`AddressText`]).
pub(super) fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut text = String::with_capacity(15);
            ipv4_bytes(v4.octets(), |b| text.push(char::from(b)));
            text
        }
        IpAddr::V6(v6) => v6.to_string(),
    }
}

/// The ASCII bytes of a dotted-quad IPv4 address, one by one.
fn ipv4_bytes(octets: [u8; 4], mut push: impl FnMut(u8)) {
    for (i, octet) in octets.iter().enumerate() {
        if i > 0 {
            push(b'.');
        }
        if *octet >= 100 {
            push(b'0' + octet / 100);
        }
        if *octet >= 10 {
            push(b'0' + octet / 10 % 10);
        }
        push(b'0' + octet % 10);
    }
}

fn decimal_digits(octet: u8) -> usize {
    match octet {
        0..=9 => 1,
        10..=99 => 2,
        _ => 3,
    }
}

fn port_entry_len(name: &str, target: u32) -> usize {
    string_len(KEY, name.len())
        + if target == 0 { 0 } else { key_len(VALUE) + encoded_len_varint(u64::from(target)) }
}

fn label_entry_len(key: &str, value: &str) -> usize {
    string_len(KEY, key.len()) + string_len(VALUE, value.len())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn ipv4_text_is_what_display_gives() {
        for octets in [[0, 9, 10, 99], [100, 199, 200, 255], [1, 2, 3, 4], [255, 255, 255, 255]] {
            let text = AddressText::V4(octets);
            let mut buf = Vec::new();
            text.write(&mut buf);
            assert_eq!(String::from_utf8(buf).unwrap(), Ipv4Addr::from(octets).to_string());
            assert_eq!(text.len(), Ipv4Addr::from(octets).to_string().len());
            assert_eq!(ip_text(Ipv4Addr::from(octets).into()), Ipv4Addr::from(octets).to_string());
        }
    }
}
