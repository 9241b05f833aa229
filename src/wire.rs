//! Protobuf wire format written by hand, where a full build or an envelope writes
//! fields from strings it already holds instead of building prost messages: proto3
//! rules (zero and empty scalars left out, every element of a repeated field
//! written), each helper's bytes exactly prost's (tested below against prost).
//! Everything is written through [`Room`], by index into a scratch buffer.

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

/// The longest varint, a `u64`'s.
pub(crate) const MAX_VARINT_LEN: usize = 10;

/// Room in a scratch buffer, written by index from where it starts. Storing a byte
/// by index costs a bounds check; pushing one onto a `Vec` checked capacity and
/// stored the length each time, and a full build writes twenty million bytes. The
/// buffer only grows (bytes past what was written are left from earlier writes),
/// so its room is zeroed once, not on every write.
pub(crate) struct Room<'b> {
    bytes: &'b mut [u8],
    at: usize,
}

impl<'b> Room<'b> {
    /// At least `bound` bytes of `scratch` from `from` on; writing more panics.
    pub(crate) fn of(scratch: &'b mut Vec<u8>, from: usize, bound: usize) -> Self {
        if scratch.len() < from + bound {
            scratch.resize(from + bound, 0);
        }
        // Exactly the bound, though the buffer may go on: a bound too small fails every time, not
        // only when an earlier, larger service happened to leave room after this one.
        Room { bytes: &mut scratch[from..from + bound], at: 0 }
    }

    /// Runs `write` in this room; returns how many bytes it wrote.
    pub(crate) fn write(mut self, write: impl FnOnce(&mut Self)) -> usize {
        write(&mut self);
        self.at
    }

    #[inline]
    pub(crate) fn byte(&mut self, byte: u8) {
        self.bytes[self.at] = byte;
        self.at += 1;
    }

    #[inline]
    pub(crate) fn slice(&mut self, bytes: &[u8]) {
        self.bytes[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }

    /// A varint, written here rather than by prost's generic `encode_varint`: a full
    /// build writes a million of them, nearly all one byte, and the call cost a
    /// twentieth of it.
    #[inline]
    pub(crate) fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            // Masked to seven bits plus the continuation bit: fits a byte.
            self.byte((value & 0x7f) as u8 | 0x80);
            value >>= 7;
        }
        // Below 0x80 here: fits a byte.
        self.byte(value as u8);
    }

    #[inline]
    pub(crate) fn key(&mut self, tag: u32, wire_type: WireType) {
        self.varint(u64::from(tag << 3 | wire_type as u32));
    }

    /// One element of a repeated string field: written even when empty.
    #[inline]
    pub(crate) fn repeated_string(&mut self, tag: u32, s: &str) {
        self.key(tag, WireType::LengthDelimited);
        self.varint(s.len() as u64);
        self.slice(s.as_bytes());
    }

    /// A proto3 string field: nothing when empty.
    #[inline]
    pub(crate) fn string(&mut self, tag: u32, s: &str) {
        if !s.is_empty() {
            self.repeated_string(tag, s);
        }
    }

    /// A message field, encoded by prost straight into the room.
    pub(crate) fn message(&mut self, tag: u32, message: &impl prost::Message) {
        self.key(tag, WireType::LengthDelimited);
        let len = message.encoded_len();
        self.varint(len as u64);
        let mut rest = &mut self.bytes[self.at..self.at + len];
        message.encode_raw(&mut rest);
        self.at += len;
    }

    /// A proto3 `uint32` field, or an enum whose value is not negative: nothing when zero.
    #[inline]
    pub(crate) fn uint32(&mut self, tag: u32, value: u32) {
        if value != 0 {
            self.key(tag, WireType::Varint);
            self.varint(u64::from(value));
        }
    }

    /// Skips `room` bytes for a length prefix that [`fill_length`](Self::fill_length)
    /// writes once what follows is written; returns where they are.
    #[inline]
    pub(crate) fn reserve_length(&mut self, room: usize) -> usize {
        let at = self.at;
        self.at += room;
        at
    }

    /// Writes the length of what follows the `room` bytes reserved at `at` as a
    /// varint there, moving those bytes when the varint takes more or less room
    /// (growing needs as many more bytes in the room as the varint is longer); returns its size.
    pub(crate) fn fill_length(&mut self, at: usize, room: usize) -> usize {
        let len = self.at - at - room;
        let mut varint = [0u8; MAX_VARINT_LEN];
        let size = Room { bytes: &mut varint, at: 0 }.write(|v| v.varint(len as u64));
        if size != room {
            self.bytes.copy_within(at + room..self.at, at + size);
            self.at = at + size + len;
        }
        self.bytes[at..at + size].copy_from_slice(&varint[..size]);
        size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Room's bytes, written in a scratch buffer that held something else.
    fn in_room(write: impl FnOnce(&mut Room<'_>)) -> Vec<u8> {
        let mut scratch = vec![0xa5; 3];
        let len = Room::of(&mut scratch, 0, 64).write(write);
        scratch.truncate(len);
        scratch
    }

    #[test]
    fn room_writes_what_prost_writes() {
        for value in [0, 1, 127, 128, 300, 16_383, 16_384, u64::from(u32::MAX), u64::MAX] {
            let mut prost_bytes = Vec::new();
            prost::encoding::encode_varint(value, &mut prost_bytes);
            assert_eq!(in_room(|r| r.varint(value)), prost_bytes, "{value}");
        }
        for tag in [1, 15, 16, 2047, 2048] {
            let mut prost_bytes = Vec::new();
            prost::encoding::encode_key(tag, WireType::LengthDelimited, &mut prost_bytes);
            assert_eq!(in_room(|r| r.key(tag, WireType::LengthDelimited)), prost_bytes, "{tag}");
        }
        for time in [
            prost_types::Timestamp { seconds: 0, nanos: 0 },
            prost_types::Timestamp { seconds: 1_714_564_800, nanos: 999_999_999 },
            prost_types::Timestamp { seconds: -1, nanos: 5 },
        ] {
            let mut prost_bytes = Vec::new();
            prost::encoding::message::encode(2, &time, &mut prost_bytes);
            assert_eq!(in_room(|r| r.message(2, &time)), prost_bytes, "{time:?}");
        }
        for value in [0, 1, 300, u32::MAX] {
            let mut prost_bytes = Vec::new();
            if value != 0 {
                prost::encoding::uint32::encode(5, &value, &mut prost_bytes);
            }
            assert_eq!(in_room(|r| r.uint32(5, value)), prost_bytes, "{value}");
        }
        for s in ["", "a", "istio-system/cloudmap-x"] {
            let mut prost_bytes = Vec::new();
            prost::encoding::string::encode(3, &s.to_owned(), &mut prost_bytes);
            assert_eq!(in_room(|r| r.repeated_string(3, s)), prost_bytes, "{s:?}");
            assert_eq!(in_room(|r| r.string(3, s)), if s.is_empty() { vec![] } else { prost_bytes }, "{s:?}");
        }
    }

    #[test]
    fn a_filled_length_is_prost_whatever_room_was_reserved() {
        for len in [0, 1, 127, 128, 300, 16_383, 16_384, 2_097_152] {
            let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut expected = Vec::new();
            prost::encoding::bytes::encode(6, &body, &mut expected);
            for room in 1..=4 {
                let mut scratch = Vec::new();
                let written = Room::of(&mut scratch, 0, len + 1 + room + MAX_VARINT_LEN).write(|r| {
                    r.key(6, WireType::LengthDelimited);
                    let at = r.reserve_length(room);
                    r.slice(&body);
                    let size = r.fill_length(at, room);
                    assert_eq!(size, encoded_len_varint(len as u64), "{len} {room}");
                });
                assert_eq!(&scratch[..written], &expected[..], "length {len} in room {room}");
            }
        }
    }
}
