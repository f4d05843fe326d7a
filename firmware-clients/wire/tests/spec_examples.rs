//! Every `Example:` in docs/device-protocol.md decodes, and re-encodes to the
//! same bytes, with the framing and direction its name gives.

use perch_wire::{decode, serial, tcp, Frame, Origin};

const SPEC: &str = include_str!("../../../docs/device-protocol.md");

struct Example {
    name: String,
    bytes: Vec<u8>,
}

fn examples() -> Vec<Example> {
    let mut examples = Vec::new();
    let mut lines = SPEC.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.strip_prefix("Example: ") else {
            continue;
        };
        let fence = lines.by_ref().find(|line| !line.trim().is_empty());
        assert_eq!(
            fence,
            Some("```hex"),
            "example {name:?} is not followed by a hex block"
        );
        let mut bytes = Vec::new();
        for line in lines.by_ref() {
            if line == "```" {
                break;
            }
            for pair in line.split_whitespace() {
                let byte = u8::from_str_radix(pair, 16)
                    .unwrap_or_else(|_| panic!("example {name:?}: {pair:?} is not a hex byte"));
                bytes.push(byte);
            }
        }
        examples.push(Example {
            name: name.to_string(),
            bytes,
        });
    }
    examples
}

fn origin(name: &str) -> Origin {
    match (
        name.contains("(device → broker)"),
        name.contains("(broker → device)"),
    ) {
        (true, false) => Origin::Device,
        (false, true) => Origin::Broker,
        _ => panic!("example {name:?} names no direction"),
    }
}

fn reencode(frame: &Frame<'_>) -> Vec<u8> {
    let mut out = vec![0u8; frame.encoded_len()];
    let len = frame.encode(&mut out).expect("a decoded frame encodes");
    out.truncate(len);
    out
}

#[test]
fn every_spec_example_decodes_and_reencodes_byte_for_byte() {
    let examples = examples();
    assert!(examples.len() >= 12, "only {} examples", examples.len());
    for Example { name, bytes } in &examples {
        let origin = origin(name);
        if name.contains(" on serial") {
            let mut deframer = serial::Deframer::<{ serial::DEFRAMER_BYTES_FOR_FRAME_MAX }>::new();
            let (frame_bytes, rest) = deframer
                .feed(bytes)
                .unwrap_or_else(|| panic!("{name}: no frame"));
            assert!(rest.is_empty(), "{name}: bytes after the delimiter");
            let frame =
                decode(frame_bytes, origin).unwrap_or_else(|error| panic!("{name}: {error}"));
            let mut out = vec![0u8; serial::encoded_len_max(frame.encoded_len())];
            let len = serial::encode(&frame, &mut out).expect("encodes");
            assert_eq!(&out[..len], &bytes[..], "{name}: serial re-encoding");
        } else if name.contains(" on TCP") {
            let (frame_bytes, consumed) = tcp::split_frame(bytes)
                .unwrap_or_else(|| panic!("{name}: incomplete"))
                .unwrap_or_else(|error| panic!("{name}: {error}"));
            assert_eq!(consumed, bytes.len(), "{name}: bytes after the frame");
            let frame =
                decode(frame_bytes, origin).unwrap_or_else(|error| panic!("{name}: {error}"));
            let mut out = vec![0u8; tcp::PREFIX_BYTES_MAX + frame.encoded_len()];
            let len = tcp::encode(&frame, &mut out).expect("encodes");
            assert_eq!(&out[..len], &bytes[..], "{name}: TCP re-encoding");
        } else {
            let frame = decode(bytes, origin).unwrap_or_else(|error| panic!("{name}: {error}"));
            assert_eq!(reencode(&frame), *bytes, "{name}: re-encoding of {frame:?}");
            assert!(bytes.len() <= perch_wire::FRAME_BYTES_MAX);
        }
    }
}

#[test]
fn the_six_byte_publish_is_in_the_spec() {
    let six = examples()
        .into_iter()
        .find(|example| example.name.contains("6 bytes"))
        .expect("the spec shows the 6-byte QoS 0 publish");
    assert_eq!(six.bytes.len(), 6);
    assert!(matches!(
        decode(&six.bytes, Origin::Device),
        Ok(Frame::Publish { qos: perch_wire::Qos::AtMostOnce, payload, .. }) if payload.len() == 4
    ));
}

#[test]
fn every_frame_type_has_an_example() {
    let mut seen = [false; 16];
    for Example { name, bytes } in examples() {
        let frame_bytes = if name.contains(" on ") {
            continue;
        } else {
            bytes
        };
        seen[usize::from(frame_bytes[0] >> 4)] = true;
    }
    for (frame_type, seen) in seen.iter().enumerate().skip(1) {
        assert!(seen, "no example of frame type {frame_type:#x}");
    }
}

/// Every `Protected example:` of section 9 opens with the example key (the
/// device epoch 1) to the frame on its `Opened:` line, and sealing that frame
/// again with the same envelope gives the same bytes.
#[test]
fn protected_examples_open_and_reseal() {
    use perch_wire::protect::*;
    let key: [u8; KEY_BYTES] = core::array::from_fn(|i| i as u8);
    let hex = |text: &str| -> Vec<u8> {
        text.split_whitespace()
            .map(|pair| u8::from_str_radix(pair, 16).expect("hex byte"))
            .collect()
    };
    let mut lines = SPEC.lines();
    let mut count = 0;
    while let Some(line) = lines.next() {
        let Some(name) = line.strip_prefix("Protected example: ") else {
            continue;
        };
        assert_eq!(
            lines.by_ref().find(|l| !l.trim().is_empty()),
            Some("```hex")
        );
        let mut sealed = Vec::new();
        for line in lines.by_ref() {
            if line == "```" {
                break;
            }
            sealed.extend(hex(line));
        }
        let opened = lines
            .by_ref()
            .find_map(|l| l.strip_prefix("Opened: `"))
            .and_then(|l| l.strip_suffix('`'))
            .unwrap_or_else(|| panic!("{name}: no Opened: line"));
        let want = hex(opened);
        let mut plain = [0u8; 1024];
        let mut again = vec![0u8; sealed.len()];
        match origin(name) {
            Origin::Device => {
                let (envelope, frame) = open_from_device(&key, &sealed, &mut plain).expect("opens");
                assert_eq!(frame, &want[..], "{name}");
                assert!(decode(frame, Origin::Device).is_ok(), "{name}");
                let n = seal_from_device(&key, &envelope, &want, &mut again).expect("seals");
                assert_eq!(&again[..n], &sealed[..], "{name}");
            }
            Origin::Broker => {
                let (envelope, frame) =
                    open_from_broker(&key, 1, &sealed, &mut plain).expect("opens");
                assert_eq!(frame, &want[..], "{name}");
                assert!(decode(frame, Origin::Broker).is_ok(), "{name}");
                let n = seal_from_broker(&key, 1, &envelope, &want, &mut again).expect("seals");
                assert_eq!(&again[..n], &sealed[..], "{name}");
            }
        }
        count += 1;
    }
    assert_eq!(count, 3, "section 9 has three protected examples");
}
