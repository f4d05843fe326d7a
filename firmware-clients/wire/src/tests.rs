//! Frame-level tests: one `check` line per example, then every malformed
//! shape derived from them, then random bytes.

use crate::error::DecodeErrorKind as Kind;
use crate::*;

/// Encodes `frame`, compares with `bytes`, decodes `bytes` as sent by
/// `origin` and compares with `frame`.
fn check(origin: Origin, frame: Frame<'_>, bytes: &[u8]) {
    let mut out = [0u8; 512];
    let len = frame
        .encode(&mut out)
        .unwrap_or_else(|error| panic!("{frame:?}: {error}"));
    assert_eq!(&out[..len], bytes, "encode {frame:?}");
    assert_eq!(frame.encoded_len(), len);
    assert_eq!(decode(bytes, origin), Ok(frame), "decode {bytes:02x?}");
}

fn malformed(origin: Origin, bytes: &[u8], kind: Kind) {
    match decode(bytes, origin) {
        Err(error) => assert_eq!(error.kind, kind, "{bytes:02x?}: {error}"),
        Ok(frame) => panic!("{bytes:02x?} decoded as {frame:?}, expected {kind:?}"),
    }
}

use Origin::{Broker, Device};

/// Every frame shape, with the bytes the spec gives for it.
fn examples() -> [(Origin, Frame<'static>, &'static [u8]); 30] {
    [
        (
            Device,
            Frame::Connect {
                version: 1,
                clean_session: true,
                keepalive_s: 60,
                client_id: b"dev1",
                will: None,
            },
            b"\x11\x01\x3c\x04dev1",
        ),
        (
            Device,
            Frame::Connect {
                version: 1,
                clean_session: false,
                keepalive_s: 300,
                client_id: b"d",
                will: Some(Will {
                    qos: Qos::AtLeastOnce,
                    subject: b"w.d",
                    payload: b"gone",
                }),
            },
            b"\x12\x01\xac\x02\x01d\x01\x03w.dgone",
        ),
        (
            Device,
            Frame::Connect {
                version: 1,
                clean_session: true,
                keepalive_s: 0,
                client_id: b"",
                will: None,
            },
            b"\x11\x01\x00\x00",
        ),
        (
            Broker,
            Frame::Connack {
                session_present: true,
                code: Code::Ok,
                session_token: 0x0403_0201,
            },
            b"\x21\x00\x01\x02\x03\x04",
        ),
        (
            Broker,
            Frame::Connack {
                session_present: false,
                code: Code::UnsupportedVersion,
                session_token: 0,
            },
            b"\x20\x07\x00\x00\x00\x00",
        ),
        (
            Device,
            Frame::Publish {
                qos: Qos::AtMostOnce,
                topic: TopicRef::Registered(5),
                msg_id: 0,
                payload: b"21.5",
            },
            b"\x30\x0521.5",
        ),
        (
            Device,
            Frame::Publish {
                qos: Qos::AtLeastOnce,
                topic: TopicRef::Predefined(200),
                msg_id: 7,
                payload: b"",
            },
            b"\x35\xc8\x01\x07",
        ),
        (
            Device,
            Frame::Publish {
                qos: Qos::AtMostOnce,
                topic: TopicRef::Reply(3),
                msg_id: 0,
                payload: b"ok",
            },
            b"\x38\x03ok",
        ),
        (
            Device,
            Frame::PublishAnonymous {
                client_id: b"s7",
                topic: 1,
                payload: b"\x00\xff",
            },
            b"\x37\x02s7\x01\x00\xff",
        ),
        (
            Broker,
            Frame::Deliver {
                qos: Qos::AtMostOnce,
                topic: TopicRef::Registered(4),
                reply_handle: None,
                msg_id: 0,
                payload: b"on",
            },
            b"\x30\x04on",
        ),
        (
            Broker,
            Frame::Deliver {
                qos: Qos::AtLeastOnce,
                topic: TopicRef::Predefined(2),
                reply_handle: Some(9),
                msg_id: 1000,
                payload: b"?",
            },
            b"\x3d\x02\x09\xe8\x07?",
        ),
        (
            Device,
            Frame::Puback {
                msg_id: 7,
                code: Code::Ok,
            },
            b"\x40\x07\x00",
        ),
        (
            Broker,
            Frame::Puback {
                msg_id: 128,
                code: Code::StoreFailed,
            },
            b"\x40\x80\x01\x0a",
        ),
        (
            Device,
            Frame::Register {
                id: 1,
                subject: b"sensors.t",
            },
            b"\x50\x01sensors.t",
        ),
        (
            Broker,
            Frame::Register {
                id: 4,
                subject: b"cmd.dev1",
            },
            b"\x50\x04cmd.dev1",
        ),
        (
            Broker,
            Frame::Regack {
                req_id: 1,
                topic: 5,
                code: Code::Ok,
            },
            b"\x60\x01\x05\x00",
        ),
        (
            Device,
            Frame::Regack {
                req_id: 4,
                topic: 4,
                code: Code::Ok,
            },
            b"\x60\x04\x04\x00",
        ),
        (
            Broker,
            Frame::Regack {
                req_id: 2,
                topic: 0,
                code: Code::Other(200),
            },
            b"\x60\x02\x00\xc8",
        ),
        (
            Device,
            Frame::Subscribe {
                req_id: 2,
                max_qos: Qos::AtLeastOnce,
                filter: b"cmd.>",
            },
            b"\x71\x02cmd.>",
        ),
        (
            Broker,
            Frame::Suback {
                req_id: 2,
                code: Code::NotPermitted,
            },
            b"\x80\x02\x02",
        ),
        (
            Device,
            Frame::Unsubscribe {
                req_id: 3,
                filter: b"cmd.>",
            },
            b"\x90\x03cmd.>",
        ),
        (
            Broker,
            Frame::Unsuback {
                req_id: 3,
                code: Code::Ok,
            },
            b"\xa0\x03\x00",
        ),
        (Device, Frame::Ping, b"\xb0"),
        (Broker, Frame::Pong, b"\xc0"),
        (Device, Frame::Disconnect { sleep_s: None }, b"\xd0"),
        (Broker, Frame::Disconnect { sleep_s: None }, b"\xd0"),
        (
            Device,
            Frame::Disconnect {
                sleep_s: Some(3600),
            },
            b"\xd1\x90\x1c",
        ),
        (
            Device,
            Frame::Resume {
                session_token: 0xDEAD_BEEF,
            },
            b"\xe0\xef\xbe\xad\xde",
        ),
        (
            Broker,
            Frame::Error {
                code: Code::UnknownTopic,
                ref_type: Some(FrameType::Publish),
                ref_id: 5,
            },
            b"\xf0\x01\x03\x05",
        ),
        (
            Broker,
            Frame::Error {
                code: Code::Malformed,
                ref_type: None,
                ref_id: 0,
            },
            b"\xf0\x06\x00\x00",
        ),
    ]
}

#[test]
fn every_frame_round_trips() {
    for (origin, frame, bytes) in examples() {
        check(origin, frame, bytes);
    }
}

#[test]
fn qos0_publish_is_six_bytes() {
    let frame = Frame::Publish {
        qos: Qos::AtMostOnce,
        topic: TopicRef::Registered(127),
        msg_id: 0,
        payload: &[1, 2, 3, 4],
    };
    assert_eq!(frame.encoded_len(), 6);
    check(Device, frame, &[0x30, 0x7F, 1, 2, 3, 4]);
}

#[test]
fn truncation_at_every_byte_never_decodes_the_same_frame() {
    for (origin, frame, bytes) in examples() {
        for cut in 0..bytes.len() {
            match decode(&bytes[..cut], origin) {
                Err(_) => {}
                // A frame ending in `rest` may decode shorter: then it must be
                // a different frame, never a silently truncated copy.
                Ok(shorter) => assert_ne!(shorter, frame, "cut {cut} of {bytes:02x?}"),
            }
        }
        // Frames without a `rest` field reject a trailing byte.
        let mut longer = [0u8; 64];
        longer[..bytes.len()].copy_from_slice(bytes);
        let ends_in_rest = matches!(
            frame,
            Frame::Connect { will: Some(_), .. }
                | Frame::Publish { .. }
                | Frame::PublishAnonymous { .. }
                | Frame::Deliver { .. }
                | Frame::Register { .. }
                | Frame::Subscribe { .. }
                | Frame::Unsubscribe { .. }
        );
        if !ends_in_rest {
            malformed(origin, &longer[..bytes.len() + 1], Kind::TrailingBytes);
        }
    }
}

#[test]
fn fixed_frames_truncated_report_truncated() {
    malformed(Broker, b"\x21\x00\x01\x02\x03", Kind::Truncated);
    malformed(Device, b"\x11\x01\x3c\x04dev", Kind::Truncated);
    malformed(Device, b"\x11\x01", Kind::Truncated);
    malformed(Device, b"\x31", Kind::Truncated);
    malformed(Device, b"\x31\x05", Kind::Truncated);
    malformed(Device, b"\x37\x02s7", Kind::Truncated);
    malformed(Broker, b"\x38\x05", Kind::Truncated); // b3 b→d needs a handle...
    malformed(Broker, b"\x39\x05\x01", Kind::Truncated); // ...and then a msg id
    malformed(Device, b"\xe0\x01\x02\x03", Kind::Truncated);
    malformed(Broker, b"\xf0\x06", Kind::Truncated);
}

#[test]
fn header_and_flags() {
    malformed(Device, b"", Kind::Empty);
    malformed(Device, b"\x00", Kind::UnknownType);
    malformed(Broker, b"\x0f\x00", Kind::UnknownType);
    for (origin, header, flags) in [
        (Device, 0x14u8, 0x4u8),
        (Device, 0x18, 0x8),
        (Broker, 0x22, 0x2),
        (Device, 0x41, 0x1),
        (Device, 0x52, 0x2),
        (Device, 0x74, 0x4),
        (Device, 0x72, 0x2),
        (Device, 0x73, 0x3),
        (Device, 0xB1, 0x1),
        (Broker, 0xC8, 0x8),
        (Device, 0xD2, 0x2),
        (Broker, 0xD1, 0x1), // sleep is a device's request only
        (Device, 0xE1, 0x1),
        (Broker, 0xF1, 0x1),
        (Device, 0x32, 0x2), // QoS 2 does not exist
        (Device, 0x3C, 0xC), // predefined and reply at once
        (Device, 0x33, 0x3), // connectionless without predefined
        (Device, 0x3F, 0xF), // connectionless with reply
        (Broker, 0x37, 0x7), // connectionless from the broker
    ] {
        let bytes = [header, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01];
        malformed(origin, &bytes, Kind::ReservedFlags(flags));
    }
}

#[test]
fn direction() {
    for header in [0x11u8, 0x70, 0x90, 0xB0, 0xE0] {
        malformed(Broker, &[header, 1, 1, 1, 1, 1, 1], Kind::WrongDirection);
    }
    for header in [0x20u8, 0x80, 0xA0, 0xC0, 0xF0] {
        malformed(Device, &[header, 1, 1, 1, 1, 1, 1], Kind::WrongDirection);
    }
    // PUBLISH's b3 means a reply topic from a device and a reply handle from
    // the broker: the same bytes decode to different frames.
    let bytes = b"\x38\x03\x09x";
    assert_eq!(
        decode_from_device(bytes),
        Ok(Frame::Publish {
            qos: Qos::AtMostOnce,
            topic: TopicRef::Reply(3),
            msg_id: 0,
            payload: b"\x09x"
        })
    );
    assert_eq!(
        decode_from_broker(bytes),
        Ok(Frame::Deliver {
            qos: Qos::AtMostOnce,
            topic: TopicRef::Registered(3),
            reply_handle: Some(9),
            msg_id: 0,
            payload: b"x"
        })
    );
}

#[test]
fn varint_bounds() {
    malformed(
        Device,
        b"\x40\xff\xff\xff\xff\x80\x01\x00",
        Kind::VarintTooLong,
    );
    malformed(
        Device,
        b"\x40\xff\xff\xff\xff\x10\x00",
        Kind::VarintOverflow,
    );
    malformed(Device, b"\x40\x80\x00\x00", Kind::VarintNonMinimal);
    malformed(Device, b"\x40\x80", Kind::Truncated);
    check(
        Device,
        Frame::Puback {
            msg_id: u32::MAX,
            code: Code::Ok,
        },
        b"\x40\xff\xff\xff\xff\x0f\x00",
    );
    // A str length over u32 or over its limit.
    malformed(
        Device,
        b"\x11\x01\x00\xff\xff\xff\xff\x1f",
        Kind::VarintOverflow,
    );
    malformed(Device, b"\x11\x01\x00\x41", Kind::TooLong("client id"));
}

#[test]
fn field_values_and_limits() {
    malformed(
        Device,
        b"\x12\x01\x00\x00\x02\x00",
        Kind::InvalidField("will QoS"),
    );
    malformed(Broker, b"\xf0\x00\x10\x00", Kind::InvalidField("ref_type"));
    let mut register = [b'a'; 1 + 1 + 256];
    register[0] = 0x50;
    register[1] = 0x01;
    assert!(decode_from_device(&register[..2 + 255]).is_ok());
    malformed(Device, &register, Kind::TooLong("subject"));
    register[0] = 0x70;
    malformed(Device, &register, Kind::TooLong("filter"));
    let mut connect = [b'c'; 4 + 64];
    connect[..4].copy_from_slice(&[0x11, 0x01, 0x00, 64]);
    assert!(decode_from_device(&connect).is_ok());
    assert_eq!(
        decode_from_device(&register).unwrap_err().code(),
        Code::TooLarge,
        "an over-long field is answered TOO_LARGE"
    );
    assert_eq!(
        decode_from_device(b"\x00").unwrap_err().code(),
        Code::Malformed
    );
}

#[test]
fn other_versions_decode_for_the_broker_to_refuse() {
    let frame = decode_from_device(b"\x11\x02\x3c\x04dev1").unwrap();
    assert!(matches!(frame, Frame::Connect { version: 2, .. }));
    assert_ne!(PROTOCOL_VERSION, 2);
}

#[test]
fn encode_refuses_what_decode_would_refuse() {
    let mut out = [0u8; 600];
    let long = [b'x'; 256];
    let cases: [(Frame<'_>, EncodeError); 7] = [
        (
            Frame::Publish {
                qos: Qos::AtMostOnce,
                topic: TopicRef::Registered(1),
                msg_id: 3,
                payload: b"",
            },
            EncodeError::InvalidField("msg_id on a QoS 0 publish"),
        ),
        (
            Frame::Deliver {
                qos: Qos::AtMostOnce,
                topic: TopicRef::Reply(1),
                reply_handle: None,
                msg_id: 0,
                payload: b"",
            },
            EncodeError::InvalidField("Reply topic in a Deliver"),
        ),
        (
            Frame::Register {
                id: 1,
                subject: &long,
            },
            EncodeError::TooLong("subject"),
        ),
        (
            Frame::Unsubscribe {
                req_id: 1,
                filter: &long,
            },
            EncodeError::TooLong("filter"),
        ),
        (
            Frame::Connect {
                version: 1,
                clean_session: true,
                keepalive_s: 1,
                client_id: &long[..65],
                will: None,
            },
            EncodeError::TooLong("client id"),
        ),
        (
            Frame::PublishAnonymous {
                client_id: &long[..65],
                topic: 1,
                payload: b"",
            },
            EncodeError::TooLong("client id"),
        ),
        (
            Frame::Suback {
                req_id: 1,
                code: Code::Other(3),
            },
            EncodeError::InvalidField("code: Other holds a named value"),
        ),
    ];
    for (frame, error) in cases {
        assert_eq!(frame.encode(&mut out), Err(error), "{frame:?}");
    }
    let frame = Frame::Ping;
    assert_eq!(
        frame.encode(&mut []),
        Err(EncodeError::BufferTooSmall { needed: 1 })
    );
    let frame = examples()[1].1;
    assert_eq!(
        frame.encode(&mut out[..5]),
        Err(EncodeError::BufferTooSmall { needed: 15 })
    );
}

/// xorshift64*: deterministic, seedable, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

/// Decoding never panics, and whatever decodes re-encodes to the same bytes
/// (one encoding per frame).
fn decode_is_total_and_canonical(bytes: &[u8]) -> bool {
    let mut decoded = false;
    for origin in [Device, Broker] {
        if let Ok(frame) = decode(bytes, origin) {
            let mut out = [0u8; 512];
            let len = frame
                .encode(&mut out)
                .unwrap_or_else(|error| panic!("{bytes:02x?}: {error}"));
            assert_eq!(&out[..len], bytes, "re-encode of {frame:?}");
            decoded = true;
        }
    }
    decoded
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut decoded = 0;
    for _ in 0..20_000 {
        let mut bytes = [0u8; 48];
        let len = rng.below(bytes.len() + 1);
        for byte in &mut bytes[..len] {
            *byte = rng.next() as u8;
        }
        decoded += usize::from(decode_is_total_and_canonical(&bytes[..len]));
    }
    assert!(decoded > 500, "random input should often decode: {decoded}");
}

#[test]
fn mutated_examples_never_panic() {
    let mut rng = Rng(42);
    let examples = examples();
    for _ in 0..20_000 {
        let (_, _, example) = examples[rng.below(examples.len())];
        let mut bytes = [0u8; 64];
        bytes[..example.len()].copy_from_slice(example);
        let mut len = example.len();
        for _ in 0..1 + rng.below(3) {
            match rng.below(4) {
                0 => bytes[rng.below(len)] ^= 1 << rng.below(8),
                1 => bytes[rng.below(len)] = rng.next() as u8,
                2 => len = rng.below(len + 1).max(1),
                _ => {
                    if len < bytes.len() {
                        bytes[len] = rng.next() as u8;
                        len += 1;
                    }
                }
            }
        }
        decode_is_total_and_canonical(&bytes[..len]);
        // The serial and TCP layers on the same bytes.
        let _ = tcp::split_frame(&bytes[..len]);
        let mut deframer = serial::Deframer::<32>::new();
        let mut input = &bytes[..len];
        while let Some((frame, rest)) = deframer.feed(input) {
            decode_is_total_and_canonical(frame);
            input = rest;
        }
    }
}

/// The per-frame encoders, called the way firmware calls them, write the
/// bytes of every device → broker example (and of the both-way frames), and
/// report a short buffer with the length they need.
#[test]
fn per_frame_encoders_match_the_examples() {
    let mut checked = 0;
    for (_, frame, bytes) in examples() {
        let mut out = [0u8; 512];
        let written = match frame {
            Frame::Connect {
                version,
                clean_session,
                keepalive_s,
                client_id,
                will,
            } => encode::connect(
                &mut out,
                version,
                clean_session,
                keepalive_s,
                client_id,
                will,
            ),
            Frame::Publish {
                qos,
                topic,
                msg_id,
                payload,
            } => encode::publish(&mut out, qos, topic, msg_id, payload),
            Frame::PublishAnonymous {
                client_id,
                topic,
                payload,
            } => encode::publish_anonymous(&mut out, client_id, topic, payload),
            Frame::Puback { msg_id, code } => encode::puback(&mut out, msg_id, code),
            Frame::Register { id, subject } => encode::register(&mut out, id, subject),
            Frame::Regack {
                req_id,
                topic,
                code,
            } => encode::regack(&mut out, req_id, topic, code),
            Frame::Subscribe {
                req_id,
                max_qos,
                filter,
            } => encode::subscribe(&mut out, req_id, max_qos, filter),
            Frame::Unsubscribe { req_id, filter } => encode::unsubscribe(&mut out, req_id, filter),
            Frame::Ping => encode::ping(&mut out),
            Frame::Disconnect { sleep_s } => encode::disconnect(&mut out, sleep_s),
            Frame::Resume { session_token } => encode::resume(&mut out, session_token),
            _ => continue,
        };
        assert_eq!(written.map(|len| &out[..len]), Ok(bytes), "{frame:?}");
        checked += 1;
    }
    assert!(checked >= 15, "{checked}");
    let mut short = [0u8; 3];
    assert_eq!(
        encode::publish(
            &mut short,
            Qos::AtLeastOnce,
            TopicRef::Registered(5),
            300,
            b"21.5"
        ),
        Err(EncodeError::BufferTooSmall { needed: 8 })
    );
    assert_eq!(
        encode::publish(&mut short, Qos::AtMostOnce, TopicRef::Registered(5), 3, b""),
        Err(EncodeError::InvalidField("msg_id on a QoS 0 publish"))
    );
}
