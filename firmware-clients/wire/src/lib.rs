//! The frames of the perch device protocol, version 1, and their three
//! transport framings (UDP, TCP, serial).
//!
//! This crate owns the bytes and nothing else: it knows no sockets, no clock,
//! no sessions and no allocator. The specification it follows is
//! `docs/device-protocol.md`; the code follows the document, and a test
//! decodes and re-encodes every worked example in it byte for byte.
//!
//! # API in one screen
//!
//! * [`Frame`] — one enum for every frame, borrowing payloads, subjects and
//!   client ids from the input as `&[u8]`.
//! * Decoding needs to know who sent the bytes, because PUBLISH's flag `b3`
//!   lays out the fields differently per direction:
//!   [`decode_from_device`] (what a broker calls) and [`decode_from_broker`]
//!   (what a device calls), or [`decode`] with an [`Origin`]. Decoders check
//!   flags, lengths, varint bounds and the direction of the frame type, and
//!   never panic on any input.
//! * Encoding needs no direction: [`Frame::encoded_len`] and
//!   [`Frame::encode`] into a caller's buffer. Whatever `encode` accepts,
//!   the matching decoder returns unchanged.
//! * [`encode`] — one function per frame a device sends
//!   ([`encode::connect`], [`encode::publish`], [`encode::puback`], ...),
//!   taking the fields instead of a [`Frame`]. `Frame::encode` calls them,
//!   so the bytes and errors are the same; firmware that calls them directly
//!   links no encoder for the broker's frames.
//! * The wire type 0x3 (PUBLISH) has three Rust shapes, one per layout of the
//!   design table: [`Frame::Publish`] (device → broker, session QoS 0/1),
//!   [`Frame::PublishAnonymous`] (device → broker, QoS 3, no session) and
//!   [`Frame::Deliver`] (broker → device, with an optional reply handle).
//! * [`protect`] — protected frames: a frame sealed with ChaCha20-Poly1305
//!   under a per-device key, its epoch and counter, and the replay window.
//! * [`varint`] — unsigned LEB128 of at most 5 bytes, minimal encodings only.
//! * [`tcp`] — the varint length prefix and a splitter for a byte stream.
//! * [`serial`] — COBS over `frame || crc16`, a `0x00` delimiter, and a
//!   fixed-capacity streaming [`serial::Deframer`].
//!
//! ```
//! use perch_wire::{decode_from_device, Frame, Qos, TopicRef};
//! let frame = Frame::Publish { qos: Qos::AtMostOnce, topic: TopicRef::Registered(5), msg_id: 0, payload: b"21.5" };
//! let mut out = [0u8; 16];
//! let n = frame.encode(&mut out).unwrap();
//! assert_eq!(&out[..n], &[0x30, 0x05, b'2', b'1', b'.', b'5']);
//! assert_eq!(decode_from_device(&out[..n]).unwrap(), frame);
//! ```
//!
//! What it does not do: check that subjects are valid NATS subjects or UTF-8
//! (the broker answers INVALID_SUBJECT), enforce [`FRAME_BYTES_MAX`] on a
//! datagram (the transport owner does), or keep any state between frames
//! other than the serial deframer's buffer.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod code;
mod decode;
pub mod encode;
mod error;
mod frame;
pub mod protect;
pub mod serial;
pub mod tcp;
pub mod varint;

pub use code::Code;
pub use decode::{decode, decode_from_broker, decode_from_device, Origin};
pub use error::{DecodeError, DecodeErrorKind, EncodeError};
pub use frame::{Frame, FrameType, Qos, TopicRef, Will};

/// The protocol version a CONNECT carries. A broker refuses any other with
/// CONNACK code UNSUPPORTED_VERSION; the wire layer decodes it either way.
pub const PROTOCOL_VERSION: u8 = 1;
/// The largest frame on UDP and serial, by default. A transport may be
/// configured smaller, never larger than [`TCP_FRAME_BYTES_MAX`].
pub const FRAME_BYTES_MAX: usize = 1024;
/// The largest frame a TCP length prefix may announce.
pub const TCP_FRAME_BYTES_MAX: usize = 65535;
/// The longest client id in CONNECT, the connectionless PUBLISH and templates.
pub const CLIENT_ID_BYTES_MAX: usize = 64;
/// The longest subject or filter: REGISTER, SUBSCRIBE, UNSUBSCRIBE, a will.
pub const SUBJECT_BYTES_MAX: usize = 255;
/// A QoS 1 receiver de-duplicates over the last this-many accepted msg ids
/// of a session, so a sender keeps at most this many unacknowledged.
pub const DEDUP_WINDOW_MSG_IDS: usize = 16;

/// The broker closes a session from which nothing arrived for 1.5 × its
/// keepalive. `None` for `keepalive_s` 0 (no keepalive).
pub const fn keepalive_timeout_ms(keepalive_s: u32) -> Option<u64> {
    if keepalive_s == 0 {
        None
    } else {
        Some(keepalive_s as u64 * 1500)
    }
}

const _: () = assert!(FRAME_BYTES_MAX <= TCP_FRAME_BYTES_MAX);
// A REGISTER carrying the longest subject fits in the smallest default frame:
// header + a 5-byte varint + the subject.
const _: () = assert!(1 + varint::BYTES_MAX + SUBJECT_BYTES_MAX <= FRAME_BYTES_MAX);
// A CONNECT with the longest client id and a will on the longest subject
// leaves room for a will payload.
const _: () =
    assert!(1 + 1 + 5 + 1 + CLIENT_ID_BYTES_MAX + 1 + 2 + SUBJECT_BYTES_MAX < FRAME_BYTES_MAX);

#[cfg(test)]
mod tests;
