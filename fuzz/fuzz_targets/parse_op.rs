//! Fuzzes `perch::nats::parser::parse_op` the way a connection drives it: parse ops off
//! the front of a buffer until it is incomplete or fails, under small limits so the
//! limit paths are reached often.
//!
//! Invariants checked: never panics; an op consumes 0 < n <= input bytes; every slice an
//! op borrows lies inside the consumed frame; `Incomplete { frame_bytes }` asks for more
//! than is buffered; a buffer without LF is never `Incomplete` past the documented bound;
//! and the same buffer fed one byte at a time reaches the same ops (statelessness).
#![no_main]

use libfuzzer_sys::fuzz_target;
use perch::nats::parser::{
    parse_op, ClientOp, ParseLimits, Parsed, CONTROL_LINE_OVERHEAD_BYTES_MAX,
};

const LIMITS: ParseLimits = ParseLimits {
    control_line_bytes_max: 64,
    payload_bytes_max: 128,
};

fn assert_within(frame: &[u8], field: &[u8]) {
    let frame_range = frame.as_ptr_range();
    let field_range = field.as_ptr_range();
    assert!(
        frame_range.start <= field_range.start && field_range.end <= frame_range.end,
        "borrowed slice escapes its frame"
    );
}

fn check_op(frame: &[u8], op: &ClientOp<'_>) {
    match *op {
        ClientOp::Connect { json } => assert_within(frame, json),
        ClientOp::Pub { subject, reply, payload } => {
            assert_within(frame, subject);
            reply.iter().for_each(|r| assert_within(frame, r));
            assert_within(frame, payload);
            assert!(payload.len() <= LIMITS.payload_bytes_max);
        }
        ClientOp::Hpub { subject, reply, headers, payload } => {
            assert_within(frame, subject);
            reply.iter().for_each(|r| assert_within(frame, r));
            assert_within(frame, headers);
            assert_within(frame, payload);
            assert!(headers.len() + payload.len() <= LIMITS.payload_bytes_max);
        }
        ClientOp::Sub { subject, queue, sid } => {
            assert_within(frame, subject);
            queue.iter().for_each(|q| assert_within(frame, q));
            assert_within(frame, sid);
        }
        ClientOp::Unsub { sid, .. } => assert_within(frame, sid),
        ClientOp::Ping | ClientOp::Pong | ClientOp::Info | ClientOp::Ok | ClientOp::Err => {}
    }
}

/// What happened at one offset, comparable across buffer lengths.
#[derive(Debug, PartialEq)]
enum Step {
    Op(usize, String),
    Failed(usize, perch::nats::parser::ParseError),
}

/// Parses ops off the front of `input` the way a connection does.
fn drain(input: &[u8]) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut offset = 0;
    loop {
        let rest = &input[offset..];
        match parse_op(rest, &LIMITS) {
            Ok(Parsed::Op(op, used)) => {
                assert!(used > 0 && used <= rest.len(), "consumed {used} of {}", rest.len());
                check_op(&rest[..used], &op);
                steps.push(Step::Op(offset, format!("{op:?}")));
                offset += used;
            }
            Ok(Parsed::Incomplete { frame_bytes }) => {
                if let Some(frame_bytes) = frame_bytes {
                    assert!(frame_bytes > rest.len(), "incomplete but frame is buffered");
                }
                if !rest.contains(&b'\n') {
                    let bound =
                        LIMITS.control_line_bytes_max + CONTROL_LINE_OVERHEAD_BYTES_MAX + 1;
                    assert!(rest.len() <= bound, "waits on {} bytes without LF", rest.len());
                }
                return steps;
            }
            Err(e) => {
                assert!(e.closes_connection());
                steps.push(Step::Failed(offset, e));
                return steps;
            }
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let whole = drain(input);
    // Statelessness: a shorter buffer (bytes still in flight) never yields a different
    // op or error than the full one at the same offset; it can only stop earlier.
    let step = if input.len() <= 256 { 1 } else { input.len() / 64 };
    for end in (0..input.len()).step_by(step) {
        let partial = drain(&input[..end]);
        assert!(partial.len() <= whole.len(), "prefix {end} yields more than the whole");
        assert_eq!(partial[..], whole[..partial.len()], "prefix {end} diverged");
    }
});
