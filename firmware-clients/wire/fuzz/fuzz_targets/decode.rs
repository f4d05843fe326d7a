//! Any bytes, decoded as sent by a device and by the broker, as a TCP stream
//! and as a serial line: nothing panics, and every frame that decodes
//! re-encodes to exactly the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use perch_wire::{decode, serial, tcp, Origin};

fn check(bytes: &[u8]) {
    for origin in [Origin::Device, Origin::Broker] {
        if let Ok(frame) = decode(bytes, origin) {
            let mut out = [0u8; 70_000];
            let len = frame.encode(&mut out).expect("a decoded frame encodes");
            assert_eq!(&out[..len], bytes, "{frame:?}");
        }
    }
}

fuzz_target!(|bytes: &[u8]| {
    check(bytes);
    let mut stream = bytes;
    while let Some(Ok((frame, consumed))) = tcp::split_frame(stream) {
        check(frame);
        stream = &stream[consumed..];
    }
    let mut deframer = serial::Deframer::<{ serial::DEFRAMER_BYTES_FOR_FRAME_MAX }>::new();
    let mut line = bytes;
    while let Some((frame, rest)) = deframer.feed(line) {
        check(frame);
        line = rest;
    }
});
