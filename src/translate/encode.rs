//! A planned service written straight into ServiceEntry bytes.
//!
//! At 100,000 endpoints, building the generated `WorkloadEntry`s (a map of owned
//! strings per label and port, per endpoint) only to encode and drop them cost
//! most of a full build. Here each endpoint is written from the strings the
//! model already holds. The bytes are exactly prost's for [`Plan::spec`]: the
//! fields before and after the endpoints are encoded by prost itself, and the
//! endpoints follow prost's rules (fields in tag order, empty strings and zeros
//! left out, including inside map entries). Every translate unit test
//! (`tests::one`) and `tests/properties.rs` (builder against `translate` +
//! prost, byte for byte) hold the two paths together.

use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use std::borrow::Cow;
use std::net::IpAddr;

use super::{Address, Plan, Served};
use crate::proto::istio::networking::v1alpha3::ServiceEntry;

/// `ServiceEntry.endpoints`.
const ENDPOINTS: u32 = 6;
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
    /// Tags 1-5 come before the endpoints (6), `export_to` (7) after; prost writes in tag order.
    head: ServiceEntry,
    tail: ServiceEntry,
    /// Each listed endpoint's encoded `WorkloadEntry` length.
    endpoint_lens: Vec<usize>,
    len: usize,
}

impl SizedSpec {
    pub(super) fn of(plan: &Plan<'_>) -> Self {
        let mut head = plan.spec_without_endpoints();
        let tail = ServiceEntry { export_to: std::mem::take(&mut head.export_to), ..ServiceEntry::default() };
        let endpoint_lens: Vec<usize> = plan
            .listed_endpoints()
            .iter()
            .map(|e| workload_entry_len(e, &AddressText::of(&e.address), plan.port_names()))
            .collect();
        let endpoints_len: usize =
            endpoint_lens.iter().map(|len| length_delimited_len(ENDPOINTS, *len)).sum();
        let len = head.encoded_len() + endpoints_len + tail.encoded_len();
        SizedSpec { head, tail, endpoint_lens, len }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Appends the encoded `ServiceEntry` of `plan` (the plan this was sized from) to `buf`.
    pub(super) fn write(&self, plan: &Plan<'_>, buf: &mut Vec<u8>) {
        let start = buf.len();
        buf.reserve(self.len);
        self.head.encode_raw(buf);
        for (endpoint, len) in plan.listed_endpoints().iter().zip(&self.endpoint_lens) {
            encode_key(ENDPOINTS, WireType::LengthDelimited, buf);
            encode_varint(*len as u64, buf);
            write_workload_entry(endpoint, &AddressText::of(&endpoint.address), plan.port_names(), buf);
        }
        self.tail.encode_raw(buf);
        debug_assert_eq!(buf.len() - start, self.len, "the size computed is the size written");
    }
}

fn workload_entry_len<'n>(
    e: &Served<'_>,
    address: &AddressText<'_>,
    port_names: impl Iterator<Item = &'n str>,
) -> usize {
    length_delimited_len(ADDRESS, address.len())
        + port_names
            .zip(&e.targets)
            .map(|(n, t)| length_delimited_len(PORTS, port_entry_len(n, *t)))
            .sum::<usize>()
        + e.labels.iter().map(|(k, v)| length_delimited_len(LABELS, label_entry_len(k, v))).sum::<usize>()
        + string_len(LOCALITY, e.locality.len())
}

fn write_workload_entry<'n>(
    e: &Served<'_>,
    address: &AddressText<'_>,
    port_names: impl Iterator<Item = &'n str>,
    buf: &mut Vec<u8>,
) {
    encode_key(ADDRESS, WireType::LengthDelimited, buf);
    encode_varint(address.len() as u64, buf);
    address.write(buf);
    for (name, target) in port_names.zip(&e.targets) {
        encode_key(PORTS, WireType::LengthDelimited, buf);
        encode_varint(port_entry_len(name, *target) as u64, buf);
        write_string(KEY, name, buf);
        if *target != 0 {
            encode_key(VALUE, WireType::Varint, buf);
            encode_varint(u64::from(*target), buf);
        }
    }
    for (key, value) in &e.labels {
        encode_key(LABELS, WireType::LengthDelimited, buf);
        encode_varint(label_entry_len(key, value) as u64, buf);
        write_string(KEY, key, buf);
        write_string(VALUE, value, buf);
    }
    if !e.locality.is_empty() {
        encode_key(LOCALITY, WireType::LengthDelimited, buf);
        encode_varint(e.locality.len() as u64, buf);
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
            AddressText::V4(octets) => {
                for (i, octet) in octets.iter().enumerate() {
                    if i > 0 {
                        buf.push(b'.');
                    }
                    if *octet >= 100 {
                        buf.push(b'0' + octet / 100);
                    }
                    if *octet >= 10 {
                        buf.push(b'0' + octet / 10 % 10);
                    }
                    buf.push(b'0' + octet % 10);
                }
            }
            AddressText::Text(text) => buf.extend_from_slice(text.as_bytes()),
        }
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

/// A proto3 string field of `len` bytes: nothing when empty.
fn string_len(tag: u32, len: usize) -> usize {
    if len == 0 { 0 } else { length_delimited_len(tag, len) }
}

fn length_delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn write_string(tag: u32, s: &str, buf: &mut Vec<u8>) {
    if !s.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(s.len() as u64, buf);
        buf.extend_from_slice(s.as_bytes());
    }
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
        }
    }
}
