//! Writes or checks the C client's two generated files from `perch-wire`, the
//! crate the broker and the Rust client use, so the C code cannot drift from
//! them unnoticed:
//!
//! * `include/perch_wire_constants.h` — frame types, result codes, flag bits,
//!   the valid flag values of every frame type in each direction, limits and
//!   the CRC parameters. Every value is read from the crate (its constants,
//!   `FrameType`/`Code` names, and what its encoder writes and its decoder
//!   accepts), never copied by hand.
//! * `tests/vectors.txt` — every `Example:` block of docs/device-protocol.md,
//!   decoded by perch-wire, plus seeded random frames (valid ones and
//!   mutations of them) with perch-wire's verdict. The C test runner decodes
//!   each line, prints the frame in the same canonical form and re-encodes it:
//!   the two implementations must agree byte for byte and field for field.
//!
//! `perch-c-gen --check` (what `make test` runs) fails when either file is not
//! what the crate and the spec produce now; `perch-c-gen --write` rewrites them.
//! What it does not do: compile or run any C (the Makefile does).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use perch_wire::{
    decode, serial, tcp, varint, Code, DecodeErrorKind, Frame, FrameType, Origin, Qos, TopicRef,
    Will,
};

/// Random valid frames in the vector file (and as many mutations of them).
const RANDOM_FRAMES: usize = 240;
/// Every this-many random valid frame is also emitted serial- and TCP-framed.
const FRAMED_EVERY: usize = 6;
/// The vectors are the same on every run: a fixed seed.
const SEED: u64 = 0x5EED_C0DE_2024_0009;

fn main() -> ExitCode {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "--check".into());
    let c_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let spec_path = c_dir.join("../../docs/device-protocol.md");
    let spec = match std::fs::read_to_string(&spec_path) {
        Ok(spec) => spec,
        Err(error) => {
            eprintln!("cannot read {}: {error}", spec_path.display());
            return ExitCode::FAILURE;
        }
    };
    let files: [(PathBuf, String); 3] = [
        (
            c_dir.join("include/perch_wire_constants.h"),
            constants_header(),
        ),
        (c_dir.join("tests/vectors.txt"), vectors(&spec)),
        (c_dir.join("tests/protect_vectors.txt"), protect_vectors()),
    ];
    match mode.as_str() {
        "--write" => {
            for (path, text) in &files {
                if let Err(error) = std::fs::write(path, text) {
                    eprintln!("cannot write {}: {error}", path.display());
                    return ExitCode::FAILURE;
                }
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        "--check" => {
            let mut stale = 0;
            for (path, text) in &files {
                let current = std::fs::read_to_string(path).unwrap_or_default();
                if current == *text {
                    println!("up to date: {}", path.display());
                } else {
                    stale += 1;
                    eprintln!(
                        "STALE: {} differs from what perch-wire and docs/device-protocol.md give \
                         now (first difference at line {}); run `make -C firmware-clients/c \
                         generate` and review the diff",
                        path.display(),
                        first_difference_line(&current, text)
                    );
                }
            }
            if stale == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        other => {
            eprintln!("usage: perch-c-gen [--check|--write] (got {other:?})");
            ExitCode::from(2)
        }
    }
}

fn first_difference_line(a: &str, b: &str) -> usize {
    a.lines()
        .zip(b.lines())
        .position(|(x, y)| x != y)
        .unwrap_or_else(|| a.lines().count().min(b.lines().count()))
        + 1
}

// ---------------------------------------------------------------- constants

/// The low nibble of the header perch-wire writes for `frame`.
fn header_flags(frame: &Frame<'_>) -> u8 {
    let mut out = [0u8; 64];
    frame.encode(&mut out).expect("a small frame encodes");
    out[0] & 0x0F
}

/// Bit `f` is set when perch-wire accepts flags `f` on type `t` from `origin`.
/// Asked with a lone header byte and with a header followed by 64 bytes of
/// 0x01 (every field then reads: varints and string lengths of 1, a will QoS
/// of 1), so a flag check that the decoder makes after reading a field (as
/// PUBLISH's predefined + reply one, after the topic) is reached too. Any
/// error but `ReservedFlags`/`WrongDirection`/`UnknownType` means the flags
/// are valid; the mutation vectors hold the C decoder to the same verdicts.
fn valid_flags(t: u8, origin: Origin) -> u16 {
    let mut valid = 0u16;
    for flags in 0..16u8 {
        let mut probe = [0x01u8; 65];
        probe[0] = (t << 4) | flags;
        let refused = [&probe[..1], &probe[..]].iter().any(|bytes| {
            matches!(
                decode(bytes, origin),
                Err(error) if matches!(
                    error.kind,
                    DecodeErrorKind::ReservedFlags(_)
                        | DecodeErrorKind::WrongDirection
                        | DecodeErrorKind::UnknownType
                )
            )
        });
        if !refused {
            valid |= 1 << flags;
        }
    }
    valid
}

fn constants_header() -> String {
    let mut h = String::new();
    let w = &mut h;
    let line = |w: &mut String, text: &str| {
        w.push_str(text);
        w.push('\n');
    };
    line(w, "/* SPDX-License-Identifier: Apache-2.0 */");
    line(
        w,
        "/* GENERATED from perch-wire (firmware-clients/wire) by firmware-clients/c/tools/gen.",
    );
    line(
        w,
        " * Do not edit: `make -C firmware-clients/c generate` rewrites it, and",
    );
    line(
        w,
        " * `make -C firmware-clients/c check-generated` (part of `make test`) fails when",
    );
    line(
        w,
        " * the crate changed and this file was not regenerated. */",
    );
    line(w, "#ifndef PERCH_WIRE_CONSTANTS_H");
    line(w, "#define PERCH_WIRE_CONSTANTS_H");
    line(w, "");
    line(w, "/* Limits (docs/device-protocol.md section 6). */");
    let limits: [(&str, u64); 10] = [
        (
            "PERCH_PROTOCOL_VERSION",
            perch_wire::PROTOCOL_VERSION.into(),
        ),
        ("PERCH_FRAME_BYTES_MAX", perch_wire::FRAME_BYTES_MAX as u64),
        (
            "PERCH_TCP_FRAME_BYTES_MAX",
            perch_wire::TCP_FRAME_BYTES_MAX as u64,
        ),
        (
            "PERCH_CLIENT_ID_BYTES_MAX",
            perch_wire::CLIENT_ID_BYTES_MAX as u64,
        ),
        (
            "PERCH_SUBJECT_BYTES_MAX",
            perch_wire::SUBJECT_BYTES_MAX as u64,
        ),
        ("PERCH_VARINT_BYTES_MAX", varint::BYTES_MAX as u64),
        (
            "PERCH_DEDUP_WINDOW_MSG_IDS",
            perch_wire::DEDUP_WINDOW_MSG_IDS as u64,
        ),
        ("PERCH_TCP_PREFIX_BYTES_MAX", tcp::PREFIX_BYTES_MAX as u64),
        (
            "PERCH_KEEPALIVE_TIMEOUT_MS_PER_S",
            perch_wire::keepalive_timeout_ms(1).expect("keepalive 1 s has a timeout"),
        ),
        (
            "PERCH_DEFRAMER_BYTES_FOR_FRAME_MAX",
            serial::DEFRAMER_BYTES_FOR_FRAME_MAX as u64,
        ),
    ];
    for (name, value) in limits {
        let _ = writeln!(w, "#define {name} {value}u");
    }
    line(w, "");
    line(
        w,
        "/* Frame types: the header's high nibble (section 2). */",
    );
    for t in 1..=15u8 {
        let frame_type = FrameType::from_u8(t).expect("1..=15 name types");
        let _ = writeln!(w, "#define PERCH_TYPE_{} 0x{t:X}u", frame_type.name());
    }
    line(w, "");
    line(w, "/* Result codes (section 4); 11..255 are reserved. */");
    let mut first_reserved = None;
    for value in 0..=255u8 {
        match Code::from_u8(value) {
            Code::Other(_) => {
                first_reserved.get_or_insert(value);
            }
            code => {
                let _ = writeln!(w, "#define PERCH_CODE_{} {value}u", code.name());
            }
        }
    }
    let _ = writeln!(
        w,
        "#define PERCH_CODE_RESERVED_MIN {}u",
        first_reserved.expect("some codes are reserved")
    );
    line(w, "");
    line(
        w,
        "/* Flag bits of the header's low nibble, as perch-wire's encoder sets them. */",
    );
    let client_id = b"d";
    let connect = |clean_session, will| Frame::Connect {
        version: perch_wire::PROTOCOL_VERSION,
        clean_session,
        keepalive_s: 0,
        client_id,
        will,
    };
    let will = Some(Will {
        qos: Qos::AtMostOnce,
        subject: b"s",
        payload: b"",
    });
    let publish = |qos, topic| Frame::Publish {
        qos,
        topic,
        msg_id: 0,
        payload: b"",
    };
    let flags: [(&str, u8); 10] = [
        (
            "PERCH_FLAG_CLEAN_SESSION",
            header_flags(&connect(true, None)),
        ),
        ("PERCH_FLAG_WILL", header_flags(&connect(false, will))),
        (
            "PERCH_FLAG_SESSION_PRESENT",
            header_flags(&Frame::Connack {
                session_present: true,
                code: Code::Ok,
                session_token: 0,
            }),
        ),
        (
            "PERCH_FLAG_QOS1",
            header_flags(&publish(Qos::AtLeastOnce, TopicRef::Registered(1))),
        ),
        (
            "PERCH_FLAG_QOS_MASK",
            header_flags(&Frame::PublishAnonymous {
                client_id,
                topic: 1,
                payload: b"",
            }) & 0b11,
        ),
        (
            "PERCH_FLAG_PREDEFINED",
            header_flags(&publish(Qos::AtMostOnce, TopicRef::Predefined(1))),
        ),
        (
            "PERCH_FLAG_REPLY",
            header_flags(&publish(Qos::AtMostOnce, TopicRef::Reply(1))),
        ),
        (
            "PERCH_FLAG_SLEEP",
            header_flags(&Frame::Disconnect { sleep_s: Some(1) }),
        ),
        (
            "PERCH_FLAG_MAX_QOS1",
            header_flags(&Frame::Subscribe {
                req_id: 1,
                max_qos: Qos::AtLeastOnce,
                filter: b"f",
            }),
        ),
        (
            "PERCH_QOS_CONNECTIONLESS",
            header_flags(&Frame::PublishAnonymous {
                client_id,
                topic: 1,
                payload: b"",
            }) & 0b11,
        ),
    ];
    for (name, value) in flags {
        let _ = writeln!(w, "#define {name} 0x{value:X}u");
    }
    line(w, "");
    line(
        w,
        "/* PERCH_VALID_FLAGS_FROM_x[type] has bit f set when a frame of that type with",
    );
    line(
        w,
        " * flags f may come from x: 0 for a type that does not travel that way. It is",
    );
    line(
        w,
        " * perch-wire's decoder asked about every header byte, so the C decoder's flag",
    );
    line(
        w,
        " * and direction checks are the crate's, not a copy of them. */",
    );
    for (name, origin) in [("DEVICE", Origin::Device), ("BROKER", Origin::Broker)] {
        let entries: Vec<String> = (0..16u8)
            .map(|t| format!("0x{:04X}u", valid_flags(t, origin)))
            .collect();
        let _ = writeln!(
            w,
            "#define PERCH_VALID_FLAGS_FROM_{name} {{ {} }}",
            entries.join(", ")
        );
    }
    line(w, "");
    line(
        w,
        "/* Serial framing (section 5): CRC-16 parameters and the line's byte budget. */",
    );
    let crc = serial::CRC16.algorithm;
    assert!(
        crc.width == 16 && !crc.refin && !crc.refout,
        "the C CRC is unreflected CRC-16; perch-wire's changed: {crc:?}"
    );
    let _ = writeln!(w, "#define PERCH_CRC16_POLY 0x{:04X}u", crc.poly);
    let _ = writeln!(w, "#define PERCH_CRC16_INIT 0x{:04X}u", crc.init);
    let _ = writeln!(w, "#define PERCH_CRC16_XOROUT 0x{:04X}u", crc.xorout);
    let _ = writeln!(w, "#define PERCH_CRC16_CHECK 0x{:04X}u", crc.check);
    let _ = writeln!(
        w,
        "#define PERCH_SERIAL_DELIMITER 0x{:02X}u",
        serial::DELIMITER
    );
    // The formula below must be serial::encoded_len_max for every frame length.
    for len in 0..=perch_wire::TCP_FRAME_BYTES_MAX {
        assert_eq!(
            len + 4 + (len + 2) / 254,
            serial::encoded_len_max(len),
            "PERCH_SERIAL_BYTES_MAX disagrees with perch-wire at {len}"
        );
    }
    line(
        w,
        "/* The most bytes a frame of `len` bytes takes on the line (COBS of frame + CRC,",
    );
    line(w, " * then the delimiter): serial::encoded_len_max. */");
    line(
        w,
        "#define PERCH_SERIAL_BYTES_MAX(len) ((len) + 4u + ((len) + 2u) / 254u)",
    );
    line(w, "");
    line(w, "#endif /* PERCH_WIRE_CONSTANTS_H */");
    h
}

// ------------------------------------------------------------------ vectors

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The canonical one-line form of a frame; the C test prints its decoded
/// `perch_frame_t` the same way. Flags are computed from the Rust fields, not
/// copied from the header byte.
fn describe(frame: &Frame<'_>) -> String {
    match *frame {
        Frame::Connect {
            version,
            clean_session,
            keepalive_s,
            client_id,
            will,
        } => {
            let flags = u8::from(clean_session) | (u8::from(will.is_some()) << 1);
            let mut s = format!(
                "CONNECT f={flags} version={version} keepalive_s={keepalive_s} client_id={}",
                hex(client_id)
            );
            if let Some(will) = will {
                let _ = write!(
                    s,
                    " will_qos={} will_subject={} will_payload={}",
                    will.qos.as_u8(),
                    hex(will.subject),
                    hex(will.payload)
                );
            }
            s
        }
        Frame::Connack {
            session_present,
            code,
            session_token,
        } => format!(
            "CONNACK f={} code={} session_token={session_token}",
            u8::from(session_present),
            code.as_u8()
        ),
        Frame::Publish {
            qos,
            topic,
            msg_id,
            payload,
        } => {
            let flags = qos.as_u8()
                | match topic {
                    TopicRef::Registered(_) => 0,
                    TopicRef::Predefined(_) => 4,
                    TopicRef::Reply(_) => 8,
                };
            format!(
                "PUBLISH f={flags} topic={} msg_id={msg_id} payload={}",
                topic.id(),
                hex(payload)
            )
        }
        Frame::PublishAnonymous {
            client_id,
            topic,
            payload,
        } => format!(
            "PUBLISH f=7 client_id={} topic={topic} payload={}",
            hex(client_id),
            hex(payload)
        ),
        Frame::Deliver {
            qos,
            topic,
            reply_handle,
            msg_id,
            payload,
        } => {
            let flags = qos.as_u8()
                | if matches!(topic, TopicRef::Predefined(_)) {
                    4
                } else {
                    0
                }
                | if reply_handle.is_some() { 8 } else { 0 };
            format!(
                "PUBLISH f={flags} topic={} reply_handle={} msg_id={msg_id} payload={}",
                topic.id(),
                reply_handle.unwrap_or(0),
                hex(payload)
            )
        }
        Frame::Puback { msg_id, code } => format!("PUBACK msg_id={msg_id} code={}", code.as_u8()),
        Frame::Register { id, subject } => format!("REGISTER id={id} subject={}", hex(subject)),
        Frame::Regack {
            req_id,
            topic,
            code,
        } => format!("REGACK req_id={req_id} topic={topic} code={}", code.as_u8()),
        Frame::Subscribe {
            req_id,
            max_qos,
            filter,
        } => format!(
            "SUBSCRIBE f={} req_id={req_id} filter={}",
            max_qos.as_u8(),
            hex(filter)
        ),
        Frame::Suback { req_id, code } => format!("SUBACK req_id={req_id} code={}", code.as_u8()),
        Frame::Unsubscribe { req_id, filter } => {
            format!("UNSUBSCRIBE req_id={req_id} filter={}", hex(filter))
        }
        Frame::Unsuback { req_id, code } => {
            format!("UNSUBACK req_id={req_id} code={}", code.as_u8())
        }
        Frame::Ping => "PING".into(),
        Frame::Pong => "PONG".into(),
        Frame::Disconnect { sleep_s } => format!(
            "DISCONNECT f={} sleep_s={}",
            u8::from(sleep_s.is_some()),
            sleep_s.unwrap_or(0)
        ),
        Frame::Resume { session_token } => format!("RESUME session_token={session_token}"),
        Frame::Error {
            code,
            ref_type,
            ref_id,
        } => format!(
            "ERROR code={} ref_type={} ref_id={ref_id}",
            code.as_u8(),
            ref_type.map_or(0, |t| t as u8)
        ),
    }
}

fn origin_letter(origin: Origin) -> char {
    match origin {
        Origin::Device => 'D',
        Origin::Broker => 'B',
    }
}

/// One line: `kind origin framing hex expected name`, tab-separated.
fn vector_line(
    out: &mut String,
    kind: &str,
    origin: Origin,
    framing: &str,
    bytes: &[u8],
    expected: &str,
    name: &str,
) {
    let _ = writeln!(
        out,
        "{kind}\t{}\t{framing}\t{}\t{expected}\t{name}",
        origin_letter(origin),
        hex(bytes)
    );
}

fn vectors(spec: &str) -> String {
    let mut out = String::new();
    out.push_str(
        "# GENERATED by firmware-clients/c/tools/gen from docs/device-protocol.md and perch-wire;\n\
         # do not edit (`make -C firmware-clients/c generate`). One case a line, tab-separated:\n\
         # kind (spec|random|mutated), origin (D device, B broker), framing (udp|tcp|serial),\n\
         # the bytes in hex, perch-wire's decoding in canonical form (ERR: refused), a name.\n",
    );
    spec_vectors(spec, &mut out);
    random_vectors(&mut out);
    out
}

fn spec_vectors(spec: &str, out: &mut String) {
    let mut lines = spec.lines();
    let mut count = 0;
    while let Some(line) = lines.next() {
        let Some(name) = line.strip_prefix("Example: ") else {
            continue;
        };
        let fence = lines.by_ref().find(|line| !line.trim().is_empty());
        assert_eq!(fence, Some("```hex"), "example {name:?}: no hex block");
        let mut bytes = Vec::new();
        for line in lines.by_ref() {
            if line == "```" {
                break;
            }
            for pair in line.split_whitespace() {
                bytes.push(u8::from_str_radix(pair, 16).expect("hex byte"));
            }
        }
        let origin = match (
            name.contains("(device → broker)"),
            name.contains("(broker → device)"),
        ) {
            (true, false) => Origin::Device,
            (false, true) => Origin::Broker,
            _ => panic!("example {name:?} names no direction"),
        };
        let (framing, frame_bytes): (&str, Vec<u8>) = if name.contains(" on serial") {
            let mut deframer = serial::Deframer::<{ serial::DEFRAMER_BYTES_FOR_FRAME_MAX }>::new();
            let (frame, rest) = deframer.feed(&bytes).expect("a serial frame");
            assert!(rest.is_empty(), "{name}: bytes after the delimiter");
            ("serial", frame.to_vec())
        } else if name.contains(" on TCP") {
            let (frame, consumed) = tcp::split_frame(&bytes)
                .expect("a whole TCP frame")
                .expect("a good prefix");
            assert_eq!(consumed, bytes.len(), "{name}: bytes after the frame");
            ("tcp", frame.to_vec())
        } else {
            ("udp", bytes.clone())
        };
        let frame = decode(&frame_bytes, origin).unwrap_or_else(|e| panic!("{name}: {e}"));
        vector_line(
            out,
            "spec",
            origin,
            framing,
            &bytes,
            &describe(&frame),
            name,
        );
        count += 1;
    }
    assert!(count >= 12, "only {count} examples in the spec");
}

/// Protected frames sealed by perch-wire (docs/device-protocol.md §9), for
/// the C client's own ChaCha20-Poly1305 to match byte for byte: device
/// envelopes it must produce, broker envelopes it must open. Random keys,
/// client ids of every length, epochs, counters of every varint length and
/// frames from empty to past a few Poly1305 blocks.
fn protect_vectors() -> String {
    use perch_wire::protect::{self, BrokerEnvelope, DeviceEnvelope};
    let mut out = String::from(
        "# GENERATED by firmware-clients/c/tools/gen from perch-wire's protect module; do not\n\
         # edit (`make -C firmware-clients/c generate`). Tab-separated, hex fields:\n\
         # device KEY CLIENT_ID EPOCH COUNTER FRAME SEALED   (the C client must seal FRAME to SEALED)\n\
         # broker KEY DEVICE_EPOCH SALT COUNTER FRAME SEALED (the C client must open SEALED to FRAME)\n",
    );
    let mut rng = Rng(SEED ^ 0x9E37_79B9);
    for i in 0..PROTECT_VECTORS {
        let key: [u8; protect::KEY_BYTES] = core::array::from_fn(|_| rng.byte());
        let frame_len = match i % 4 {
            0 => rng.below(17) as usize,
            1 => 16 * (1 + rng.below(4) as usize),
            _ => rng.below(300) as usize,
        };
        let frame: Vec<u8> = (0..frame_len).map(|_| rng.byte()).collect();
        let counter = rng.varint_value().max(1);
        let epoch = rng.next() as u32;
        let mut sealed = vec![0u8; frame_len + protect::DEVICE_OVERHEAD_BYTES_MAX];
        if i % 2 == 0 {
            let id_len = 1 + rng.below(perch_wire::CLIENT_ID_BYTES_MAX as u64) as usize;
            let id: Vec<u8> = (0..id_len).map(|_| rng.byte()).collect();
            let envelope = DeviceEnvelope {
                client_id: &id,
                epoch,
                counter,
            };
            let n = protect::seal_from_device(&key, &envelope, &frame, &mut sealed)
                .expect("a vector seals");
            let _ = writeln!(
                out,
                "device\t{}\t{}\t{epoch}\t{counter}\t{}\t{}",
                hex(&key),
                hex(&id),
                hex(&frame),
                hex(&sealed[..n])
            );
        } else {
            let salt: [u8; protect::SALT_BYTES] = core::array::from_fn(|_| rng.byte());
            let envelope = BrokerEnvelope { salt, counter };
            let n = protect::seal_from_broker(&key, epoch, &envelope, &frame, &mut sealed)
                .expect("a vector seals");
            let _ = writeln!(
                out,
                "broker\t{}\t{epoch}\t{}\t{counter}\t{}\t{}",
                hex(&key),
                hex(&salt),
                hex(&frame),
                hex(&sealed[..n])
            );
        }
    }
    out
}

/// Protected-frame vectors (half device, half broker envelopes).
const PROTECT_VECTORS: usize = 120;

/// xorshift64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    /// A u32 whose varint length is 1 to 5 with equal odds, often a boundary.
    fn varint_value(&mut self) -> u32 {
        const EDGES: [u32; 10] = [
            0,
            1,
            127,
            128,
            16383,
            16384,
            0x1F_FFFF,
            0x20_0000,
            0x0FFF_FFFF,
            u32::MAX,
        ];
        if self.below(4) == 0 {
            return EDGES[self.below(EDGES.len() as u64) as usize];
        }
        let bits = [7u32, 14, 21, 28, 32][self.below(5) as usize];
        let value = self.next() as u32;
        if bits == 32 {
            value
        } else {
            value & ((1 << bits) - 1)
        }
    }

    /// Bytes of a length up to `max`, usually short, sometimes at the limit.
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = match self.below(8) {
            0 => max,
            1 => self.below(max as u64 + 1) as usize,
            _ => self.below(max.min(12) as u64 + 1) as usize,
        };
        (0..len).map(|_| self.byte()).collect()
    }

    fn qos(&mut self) -> Qos {
        if self.below(2) == 0 {
            Qos::AtMostOnce
        } else {
            Qos::AtLeastOnce
        }
    }

    fn code(&mut self) -> Code {
        Code::from_u8(if self.below(3) == 0 {
            self.byte()
        } else {
            self.below(11) as u8
        })
    }
}

/// One random valid frame, encoded by perch-wire, and the direction it travels.
fn random_frame(rng: &mut Rng) -> (Origin, Vec<u8>) {
    let client_id = rng.bytes(perch_wire::CLIENT_ID_BYTES_MAX);
    let subject = rng.bytes(perch_wire::SUBJECT_BYTES_MAX);
    let payload = rng.bytes(300);
    let will_payload = rng.bytes(40);
    let (a, b, c) = (rng.varint_value(), rng.varint_value(), rng.varint_value());
    let token = rng.next() as u32;
    let frame_type = 1 + rng.below(15) as u8;
    let qos = rng.qos();
    let msg_id = |qos: Qos| if qos == Qos::AtLeastOnce { c } else { 0 };
    let (origin, frame) = match frame_type {
        0x1 => {
            let will = (rng.below(2) == 0).then(|| Will {
                qos: rng.qos(),
                subject: &subject,
                payload: &will_payload,
            });
            let frame = Frame::Connect {
                version: if rng.below(4) == 0 { rng.byte() } else { 1 },
                clean_session: rng.below(2) == 0,
                keepalive_s: a,
                client_id: &client_id,
                will,
            };
            (Origin::Device, frame)
        }
        0x2 => (
            Origin::Broker,
            Frame::Connack {
                session_present: rng.below(2) == 0,
                code: rng.code(),
                session_token: token,
            },
        ),
        0x3 => match rng.below(5) {
            0 => (
                Origin::Device,
                Frame::PublishAnonymous {
                    client_id: &client_id,
                    topic: a,
                    payload: &payload,
                },
            ),
            1 | 2 => {
                let topic = match rng.below(3) {
                    0 => TopicRef::Registered(a),
                    1 => TopicRef::Predefined(a),
                    _ => TopicRef::Reply(a),
                };
                let frame = Frame::Publish {
                    qos,
                    topic,
                    msg_id: msg_id(qos),
                    payload: &payload,
                };
                (Origin::Device, frame)
            }
            _ => {
                let topic = if rng.below(2) == 0 {
                    TopicRef::Registered(a)
                } else {
                    TopicRef::Predefined(a)
                };
                let frame = Frame::Deliver {
                    qos,
                    topic,
                    reply_handle: (rng.below(2) == 0).then_some(b),
                    msg_id: msg_id(qos),
                    payload: &payload,
                };
                (Origin::Broker, frame)
            }
        },
        0x4 => (
            either(rng),
            Frame::Puback {
                msg_id: a,
                code: rng.code(),
            },
        ),
        0x5 => (
            either(rng),
            Frame::Register {
                id: a,
                subject: &subject,
            },
        ),
        0x6 => (
            either(rng),
            Frame::Regack {
                req_id: a,
                topic: b,
                code: rng.code(),
            },
        ),
        0x7 => (
            Origin::Device,
            Frame::Subscribe {
                req_id: a,
                max_qos: qos,
                filter: &subject,
            },
        ),
        0x8 => (
            Origin::Broker,
            Frame::Suback {
                req_id: a,
                code: rng.code(),
            },
        ),
        0x9 => (
            Origin::Device,
            Frame::Unsubscribe {
                req_id: a,
                filter: &subject,
            },
        ),
        0xA => (
            Origin::Broker,
            Frame::Unsuback {
                req_id: a,
                code: rng.code(),
            },
        ),
        0xB => (Origin::Device, Frame::Ping),
        0xC => (Origin::Broker, Frame::Pong),
        0xD => {
            if rng.below(2) == 0 {
                (Origin::Device, Frame::Disconnect { sleep_s: Some(a) })
            } else {
                (either(rng), Frame::Disconnect { sleep_s: None })
            }
        }
        0xE => (
            Origin::Device,
            Frame::Resume {
                session_token: token,
            },
        ),
        _ => (
            Origin::Broker,
            Frame::Error {
                code: rng.code(),
                ref_type: FrameType::from_u8(rng.below(16) as u8),
                ref_id: a,
            },
        ),
    };
    let mut bytes = vec![0u8; frame.encoded_len()];
    let len = frame
        .encode(&mut bytes)
        .expect("a random valid frame encodes");
    bytes.truncate(len);
    assert_eq!(decode(&bytes, origin), Ok(frame), "perch-wire round trip");
    (origin, bytes)
}

fn either(rng: &mut Rng) -> Origin {
    if rng.below(2) == 0 {
        Origin::Device
    } else {
        Origin::Broker
    }
}

/// A copy of `bytes` broken one way or another (it may still decode).
fn mutate(rng: &mut Rng, bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    match rng.below(6) {
        0 => {
            let at = rng.below(out.len() as u64) as usize;
            out[at] ^= 1 << rng.below(8);
        }
        1 => {
            let at = rng.below(out.len() as u64) as usize;
            out[at] = rng.byte();
        }
        2 => out.truncate(rng.below(out.len() as u64) as usize),
        3 => out.push(rng.byte()),
        4 => out[0] = (out[0] & 0xF0) | (rng.byte() & 0x0F),
        _ => out[0] = (out[0] & 0x0F) | (rng.byte() & 0xF0),
    }
    out
}

fn random_vectors(out: &mut String) {
    let mut rng = Rng(SEED);
    for index in 0..RANDOM_FRAMES {
        let (origin, bytes) = random_frame(&mut rng);
        let frame = decode(&bytes, origin).expect("checked in random_frame");
        let expected = describe(&frame);
        let name = format!("random {index}");
        vector_line(out, "random", origin, "udp", &bytes, &expected, &name);
        if index % FRAMED_EVERY == 0 {
            let mut line = vec![0u8; serial::encoded_len_max(bytes.len())];
            let n = serial::encode(&frame, &mut line).expect("serial encode");
            vector_line(
                out,
                "random",
                origin,
                "serial",
                &line[..n],
                &expected,
                &name,
            );
            let mut stream = vec![0u8; tcp::PREFIX_BYTES_MAX + bytes.len()];
            let n = tcp::encode(&frame, &mut stream).expect("tcp encode");
            vector_line(out, "random", origin, "tcp", &stream[..n], &expected, &name);
        }
        let broken = mutate(&mut rng, &bytes);
        let verdict = match decode(&broken, origin) {
            Ok(frame) => describe(&frame),
            Err(_) => "ERR".into(),
        };
        let name = format!("mutated {index}");
        vector_line(out, "mutated", origin, "udp", &broken, &verdict, &name);
    }
}
