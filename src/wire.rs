//! Protobuf wire format written by hand, where a full build or an envelope writes
//! fields from strings it already holds instead of building prost messages: proto3
//! rules (zero and empty scalars left out, every element of a repeated field
//! written), each helper's bytes exactly prost's (tested below against prost).

use prost::encoding::{WireType, encoded_len_varint, key_len};

/// A proto3 string field of `len` bytes: nothing when empty.
#[inline]
pub(crate) fn string_len(tag: u32, len: usize) -> usize {
    if len == 0 { 0 } else { length_delimited_len(tag, len) }
}

/// A length-delimited field of `len` bytes, key and length prefix included.
#[inline]
pub(crate) fn length_delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// A proto3 `uint32` or enum field: nothing when zero.
#[inline]
pub(crate) fn uint32_len(tag: u32, value: u32) -> usize {
    if value == 0 { 0 } else { key_len(tag) + encoded_len_varint(u64::from(value)) }
}

/// A proto3 enum, an `int32`: nothing when zero; a negative value is sign-extended to ten bytes.
#[inline]
pub(crate) fn enum_len(tag: u32, value: i32) -> usize {
    if value == 0 { 0 } else { key_len(tag) + encoded_len_varint(int32_bits(value)) }
}

/// What a varint of an `int32` encodes: its value sign-extended to 64 bits, as protobuf specifies.
#[inline]
fn int32_bits(value: i32) -> u64 {
    i64::from(value) as u64
}

#[inline]
pub(crate) fn write_uint32(tag: u32, value: u32, buf: &mut Vec<u8>) {
    if value != 0 {
        put_key(tag, WireType::Varint, buf);
        put_varint(u64::from(value), buf);
    }
}

#[inline]
pub(crate) fn write_enum(tag: u32, value: i32, buf: &mut Vec<u8>) {
    if value != 0 {
        put_key(tag, WireType::Varint, buf);
        put_varint(int32_bits(value), buf);
    }
}

/// A proto3 string field: nothing when empty.
#[inline]
pub(crate) fn write_string(tag: u32, s: &str, buf: &mut Vec<u8>) {
    if !s.is_empty() {
        write_repeated_string(tag, s, buf);
    }
}

/// One element of a repeated string field: written even when empty.
#[inline]
pub(crate) fn write_repeated_string(tag: u32, s: &str, buf: &mut Vec<u8>) {
    put_key(tag, WireType::LengthDelimited, buf);
    put_varint(s.len() as u64, buf);
    buf.extend_from_slice(s.as_bytes());
}

/// A varint, written here rather than by prost's generic `encode_varint`: a full
/// build writes a million of them, nearly all one byte, and the call cost a
/// twentieth of it.
#[inline]
pub(crate) fn put_varint(mut value: u64, buf: &mut Vec<u8>) {
    while value >= 0x80 {
        // Masked to seven bits plus the continuation bit: fits a byte.
        buf.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    // Below 0x80 here: fits a byte.
    buf.push(value as u8);
}

#[inline]
pub(crate) fn put_key(tag: u32, wire_type: WireType, buf: &mut Vec<u8>) {
    put_varint(u64::from(tag << 3 | wire_type as u32), buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_keys_are_what_prost_writes() {
        for value in [0, 1, 127, 128, 300, 16_383, 16_384, u64::from(u32::MAX), u64::MAX] {
            let (mut ours, mut prost_bytes) = (Vec::new(), Vec::new());
            put_varint(value, &mut ours);
            prost::encoding::encode_varint(value, &mut prost_bytes);
            assert_eq!(ours, prost_bytes, "{value}");
        }
        for value in [0, 1, 4, -1, i32::MIN] {
            let (mut ours, mut prost_bytes) = (Vec::new(), Vec::new());
            write_enum(5, value, &mut ours);
            prost::encoding::int32::encode(5, &value, &mut prost_bytes);
            if value == 0 {
                prost_bytes.clear(); // proto3 leaves a zero enum out
            }
            assert_eq!(ours, prost_bytes, "{value}");
            assert_eq!(enum_len(5, value), ours.len(), "{value}");
        }
        for tag in [1, 15, 16, 2047, 2048] {
            let (mut ours, mut prost_bytes) = (Vec::new(), Vec::new());
            put_key(tag, WireType::LengthDelimited, &mut ours);
            prost::encoding::encode_key(tag, WireType::LengthDelimited, &mut prost_bytes);
            assert_eq!(ours, prost_bytes, "{tag}");
        }
    }
}
