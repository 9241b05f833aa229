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

use std::borrow::Cow;
use std::net::IpAddr;

use super::ports::PlannedPort;
use super::{Address, Label, Plan, Served};
use crate::wire::{MAX_VARINT_LEN, Room, string_len, uint32_len};

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

/// Writes the encoded `ServiceEntry` of `plan` at the start of `scratch`; returns
/// its length (the bytes after it are left from earlier writes). Fields in tag
/// order as prost writes them (`export_to`, 7, after the endpoints, 6).
///
/// One pass: each endpoint's length prefix is reserved before its bytes and
/// filled in after them (computing every length first walked each endpoint
/// twice, a twelfth of a full build). Bytes are stored by index into room made
/// once for the whole entry (see [`Room`]).
pub(super) fn write_spec(plan: &Plan<'_>, scratch: &mut Vec<u8>) -> usize {
    Room::of(scratch, 0, spec_bound(plan)).write(|out| {
        write_head(plan, out);
        // Endpoints of one service are alike in size: the room the last one's length
        // took nearly always fits the next one's, so its bytes rarely move.
        let mut length_room = 2;
        for endpoint in plan.listed_endpoints() {
            out.key(ENDPOINTS, WireType::LengthDelimited);
            let length_at = out.reserve_length(length_room);
            let address = AddressText::of(&endpoint.address);
            write_workload_entry(endpoint, plan.labels_of(endpoint), &address, plan.port_names(), out);
            length_room = out.fill_length(length_at, length_room);
        }
        write_tail(plan, out);
    })
}

/// The most a field's key and length prefix take here: one byte of key (every tag
/// is below 16) and a varint.
const FIELD_BOUND: usize = 1 + MAX_VARINT_LEN;

/// The most [`write_spec`] writes for `plan`: each field's bytes and a [`FIELD_BOUND`]
/// for its key and length prefix (a map entry's key and value are fields too).
/// The plan's labels are every endpoint's, listed or not (merged endpoints leave
/// theirs behind), so their sum bounds the listed ones'.
fn spec_bound(plan: &Plan<'_>) -> usize {
    let head = plan.host.len()
        + FIELD_BOUND
        + plan.addresses.iter().map(|a| a.len() + FIELD_BOUND).sum::<usize>()
        + plan.ports.iter().map(|p| service_port_len(p) + FIELD_BOUND).sum::<usize>()
        + 2 * FIELD_BOUND;
    let port_entries: usize = plan.port_names().map(|name| name.len() + 3 * FIELD_BOUND).sum();
    let labels: usize = plan.labels.iter().map(|(k, v)| k.len() + v.len() + 3 * FIELD_BOUND).sum();
    // Each endpoint's own key and prefix, its address's and its locality's.
    let endpoints: usize = plan
        .listed_endpoints()
        .iter()
        .map(|e| 3 * FIELD_BOUND + AddressText::bound(&e.address) + e.locality.len() + port_entries)
        .sum();
    let tail: usize = plan.export_to.value.iter().map(|e| e.len() + FIELD_BOUND).sum();
    head + endpoints + labels + tail
}

/// The fields before the endpoints: hosts, addresses, ports, location, resolution.
/// Written from the plan, not through a prost message: building one cost a
/// handful of allocations per service, a tenth of a full build's.
fn write_head(plan: &Plan<'_>, out: &mut Room<'_>) {
    out.repeated_string(HOSTS, &plan.host);
    for address in &plan.addresses {
        out.repeated_string(ADDRESSES, address);
    }
    for port in &plan.ports {
        out.key(SERVICE_PORTS, WireType::LengthDelimited);
        out.varint(service_port_len(port) as u64);
        out.uint32(NUMBER, u32::from(port.spec.number));
        out.string(PROTOCOL, port.spec.protocol.as_str());
        out.string(NAME, &port.spec.name);
    }
    // Both enums are non-negative (istio's values), so each is a plain varint.
    out.uint32(LOCATION, plan.location.value as u32);
    out.uint32(RESOLUTION, plan.resolution.value as u32);
}

/// The field after the endpoints: `export_to`.
fn write_tail(plan: &Plan<'_>, out: &mut Room<'_>) {
    for namespace in &plan.export_to.value {
        out.repeated_string(EXPORT_TO, namespace);
    }
}

fn service_port_len(port: &PlannedPort) -> usize {
    uint32_len(NUMBER, u32::from(port.spec.number))
        + string_len(PROTOCOL, port.spec.protocol.as_str().len())
        + string_len(NAME, port.spec.name.len())
}

fn write_workload_entry<'n>(
    e: &Served<'_>,
    labels: &[Label<'_>],
    address: &AddressText<'_>,
    port_names: impl Iterator<Item = &'n str>,
    out: &mut Room<'_>,
) {
    out.key(ADDRESS, WireType::LengthDelimited);
    out.varint(address.len() as u64);
    address.write(out);
    for (name, target) in port_names.zip(&e.targets) {
        out.key(PORTS, WireType::LengthDelimited);
        out.varint(port_entry_len(name, *target) as u64);
        out.string(KEY, name);
        out.uint32(VALUE, *target);
    }
    for (key, value) in labels {
        out.key(LABELS, WireType::LengthDelimited);
        out.varint(label_entry_len(key, value) as u64);
        out.string(KEY, key);
        out.string(VALUE, value);
    }
    if !e.locality.is_empty() {
        out.key(LOCALITY, WireType::LengthDelimited);
        out.varint(e.locality.len() as u64);
        e.locality.parts().iter().for_each(|p| out.slice(p.as_bytes()));
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

    /// The most `address`'s text takes, without spelling it.
    fn bound(address: &Address) -> usize {
        match address {
            Address::Hostname(h) => h.len(),
            // The longest IPv6 text, `ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`.
            Address::Ip(_) => 45,
        }
    }

    fn len(&self) -> usize {
        match self {
            AddressText::V4(octets) => octets.iter().map(|o| decimal_digits(*o)).sum::<usize>() + 3,
            AddressText::Text(text) => text.len(),
        }
    }

    fn write(&self, out: &mut Room<'_>) {
        match self {
            AddressText::V4(octets) => ipv4_bytes(*octets, |b| out.byte(b)),
            AddressText::Text(text) => out.slice(text.as_bytes()),
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
            let written = Room::of(&mut buf, 0, text.len()).write(|out| text.write(out));
            buf.truncate(written);
            assert_eq!(String::from_utf8(buf).unwrap(), Ipv4Addr::from(octets).to_string());
            assert_eq!(text.len(), Ipv4Addr::from(octets).to_string().len());
            assert_eq!(ip_text(Ipv4Addr::from(octets).into()), Ipv4Addr::from(octets).to_string());
        }
    }
}
