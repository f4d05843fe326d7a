//! Sans-IO parser for the NATS client protocol (client -> server direction).
//!
//! Owns: splitting a byte buffer into one [`ClientOp`] at a time, zero copy, with the
//! framing rules of nats-server 2.9.10 (case-insensitive op names, arguments split on
//! runs of spaces/tabs, LF or CRLF line ends, payloads that must be followed by CRLF,
//! the control-line and payload limits) and the errors nats-server reports for each
//! framing fault (see [`ParseError::err_text`] and docs/nats-wire-notes.md).
//!
//! Deliberately does not: keep state between calls (call [`parse_op`] again at the new
//! offset), allocate, validate subjects (see `subject.rs`), decode CONNECT JSON (see
//! `connect.rs`), or know about connection state such as whether CONNECT enabled
//! headers, verbose or pedantic mode — the session applies those to the returned op.
//!
//! Known, deliberate differences from nats-server 2.9.10 (all on input no client sends):
//! - nats-server waits without bound for the LF that ends `PING`/`PONG`/`+OK` followed
//!   by junk, and for a line that is nothing but separators; here every line is bounded
//!   (see [`CONTROL_LINE_OVERHEAD_BYTES_MAX`]) so memory never grows with a peer's junk.
//! - nats-server drops the last byte of a line when a CR appears anywhere in it; here
//!   only a CR immediately before the LF is dropped.
//! - `HMSG` from a client is rejected as soon as `HM` is seen, not at its LF.

use serde::de::IgnoredAny;

/// nats-server's default `max_control_line`.
pub const CONTROL_LINE_BYTES_MAX_DEFAULT: usize = 4096;
/// nats-server's default `max_payload` (1 MiB).
pub const PAYLOAD_BYTES_MAX_DEFAULT: usize = 1 << 20;
/// Bytes a control line may hold beyond `control_line_bytes_max`, not counting its CRLF:
/// the longest op name (`CONNECT`) and one separator. nats-server measures only the
/// arguments against the limit; this bound also covers the op name and a sane
/// separator run, so a line without LF can never make the caller buffer more than
/// `control_line_bytes_max + CONTROL_LINE_OVERHEAD_BYTES_MAX + 1` bytes (the +1 is a CR).
pub const CONTROL_LINE_OVERHEAD_BYTES_MAX: usize = 8;
/// nats-server's `parseSize` rejects sizes of more than 9 digits ("999M").
const SIZE_DIGITS_MAX: usize = 9;

/// Limits the parser enforces; the session owns them (they may come from config).
#[derive(Clone, Copy, Debug)]
pub struct ParseLimits {
    /// Longest argument part of a control line (after op name and separators, before CRLF).
    pub control_line_bytes_max: usize,
    /// Largest PUB payload / HPUB total (headers + payload) a client may declare.
    pub payload_bytes_max: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        Self {
            control_line_bytes_max: CONTROL_LINE_BYTES_MAX_DEFAULT,
            payload_bytes_max: PAYLOAD_BYTES_MAX_DEFAULT,
        }
    }
}

/// One client->server operation, borrowing from the input buffer (zero copy).
#[derive(Debug, PartialEq, Eq)]
pub enum ClientOp<'a> {
    /// `CONNECT <json>`; `json` is everything after the op name and separators, and is
    /// not validated here (`connect::parse_connect` does that; bad JSON closes silently).
    Connect { json: &'a [u8] },
    /// `PUB <subject> [reply] <size>`.
    Pub {
        subject: &'a [u8],
        reply: Option<&'a [u8]>,
        payload: &'a [u8],
    },
    /// `HPUB <subject> [reply] <hdr_len> <total_len>`.
    /// `headers` is the first hdr_len bytes (starts with NATS/1.0), `payload` the rest.
    /// Header content is not checked (nats-server 2.9.10 does not either). The session
    /// must close silently if the connection's CONNECT did not enable headers.
    Hpub {
        subject: &'a [u8],
        reply: Option<&'a [u8]>,
        headers: &'a [u8],
        payload: &'a [u8],
    },
    /// `SUB <subject> [queue] <sid>`; subject validity is the session's check.
    Sub {
        subject: &'a [u8],
        queue: Option<&'a [u8]>,
        sid: &'a [u8],
    },
    /// `UNSUB <sid> [max_msgs]`. A max that is not 1..=9 ASCII digits is `None`, because
    /// nats-server treats it exactly like an absent max (unsubscribe now). `Some(0)` and
    /// any max not above the count already delivered also mean "unsubscribe now".
    Unsub {
        sid: &'a [u8],
        max_msgs: Option<u64>,
    },
    /// `PING` (anything up to the LF after the op name is ignored, as nats-server does).
    Ping,
    /// `PONG` (trailing bytes ignored likewise).
    Pong,
    /// Client-sent `INFO` with a JSON object or `null`: nats-server ignores it.
    /// (Other JSON closes silently: [`ParseError::InvalidClientInfo`].)
    Info,
    /// Client-sent `+OK` (trailing bytes ignored): nats-server ignores it.
    Ok,
    /// Never returned: nats-server closes the connection (silently) when a client sends
    /// `-ERR`, so the parser reports [`ParseError::ClientSentErr`] instead. Kept so the
    /// agreed interface stays stable.
    Err,
}

/// Result of one successful [`parse_op`] call.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A complete op and how many input bytes it used (including trailing CRLFs).
    Op(ClientOp<'a>, usize),
    /// Need more input. `frame_bytes` is the full frame length once the control line is
    /// known (so the caller can skip re-parsing until that many bytes are buffered); None otherwise.
    Incomplete { frame_bytes: Option<usize> },
}

/// A framing fault in the client's bytes. Every variant ends the connection; the
/// variants differ in what nats-server 2.9.10 sends first ([`ParseError::err_text`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The bytes do not start a client op (unknown/garbage/NUL, `MSG`, op name without
    /// its separator, blank line, leading space).
    #[error("unknown protocol operation")]
    UnknownOperation,
    /// A control line's arguments exceed `control_line_bytes_max` (with or without LF yet).
    #[error("control line too long")]
    ControlLineTooLong,
    /// A PUB/HPUB declares more than `payload_bytes_max` bytes.
    #[error("declared payload exceeds the maximum")]
    PayloadTooLarge,
    /// The `size` bytes after a PUB/HPUB control line are not followed by CRLF.
    #[error("payload not followed by CRLF")]
    MissingPayloadTerminator,
    /// PUB with other than 2 or 3 arguments.
    #[error("PUB needs <subject> [reply] <size>")]
    PubArgumentCount,
    /// PUB size is not 1..=9 ASCII digits.
    #[error("PUB size is not a decimal number of at most 9 digits")]
    PubSizeInvalid,
    /// HPUB with other than 3 or 4 arguments.
    #[error("HPUB needs <subject> [reply] <hdr_len> <total_len>")]
    HpubArgumentCount,
    /// HPUB hdr_len is not 1..=9 ASCII digits.
    #[error("HPUB header size is not a decimal number of at most 9 digits")]
    HpubHeaderSizeInvalid,
    /// HPUB total_len is not 1..=9 ASCII digits.
    #[error("HPUB total size is not a decimal number of at most 9 digits")]
    HpubTotalSizeInvalid,
    /// HPUB hdr_len is larger than total_len.
    #[error("HPUB header size larger than total size")]
    HpubHeaderSizeExceedsTotal,
    /// SUB with other than 2 or 3 arguments.
    #[error("SUB needs <subject> [queue] <sid>")]
    SubArgumentCount,
    /// UNSUB with other than 1 or 2 arguments.
    #[error("UNSUB needs <sid> [max_msgs]")]
    UnsubArgumentCount,
    /// Client-sent INFO whose argument is not a JSON object or `null`.
    #[error("client INFO is not a JSON object")]
    InvalidClientInfo,
    /// The client sent `-ERR`; nats-server logs it and closes the connection.
    #[error("client sent -ERR")]
    ClientSentErr,
}

impl ParseError {
    /// The exact text nats-server sends in `-ERR '<text>'`, or None if it closes silently.
    pub fn err_text(&self) -> Option<&'static str> {
        match self {
            Self::UnknownOperation | Self::MissingPayloadTerminator => {
                Some("Unknown Protocol Operation")
            }
            Self::ControlLineTooLong => Some("maximum control line exceeded"),
            Self::PayloadTooLarge => Some("Maximum Payload Violation"),
            Self::PubArgumentCount
            | Self::PubSizeInvalid
            | Self::HpubArgumentCount
            | Self::HpubHeaderSizeInvalid
            | Self::HpubTotalSizeInvalid
            | Self::HpubHeaderSizeExceedsTotal
            | Self::SubArgumentCount
            | Self::UnsubArgumentCount
            | Self::InvalidClientInfo
            | Self::ClientSentErr => None,
        }
    }

    /// Whether the reference closes the connection after this error (always, for framing
    /// faults: after one the byte stream cannot be trusted).
    pub fn closes_connection(&self) -> bool {
        true
    }
}

/// The op a control line names, once its name (and required separator) is matched.
#[derive(Clone, Copy)]
enum OpName {
    Pub,
    Hpub,
    Sub,
    Unsub,
    Ping,
    Pong,
    Connect,
    Info,
    Ok,
    Err,
}

/// Outcome of matching the op name at the start of the input.
enum NameMatch {
    /// Op recognised; arguments begin at this offset (after the name and, for ops that
    /// take arguments, after the whole separator run).
    Found(OpName, usize),
    /// Input ends inside the name or separator run and is consistent with it so far.
    NeedMore,
}

/// Parses exactly one op from the start of `input`. Stateless: call again at the new offset.
pub fn parse_op<'a>(input: &'a [u8], limits: &ParseLimits) -> Result<Parsed<'a>, ParseError> {
    let line_bytes_max = limits
        .control_line_bytes_max
        .saturating_add(CONTROL_LINE_OVERHEAD_BYTES_MAX);
    let (op, args_start) = match match_name(input, line_bytes_max)? {
        NameMatch::Found(op, args_start) => (op, args_start),
        NameMatch::NeedMore => return Ok(Parsed::Incomplete { frame_bytes: None }),
    };

    // For ops with arguments nats-server's state machine takes the first byte after the
    // separator run as the start of the arguments *whatever it is*, so a LF (or CR) there
    // does not end the line: `SUB \n a b\r\n` is `SUB a b`. Only later bytes can.
    let first_end_byte = match op {
        OpName::Ping | OpName::Pong | OpName::Ok => args_start,
        _ => args_start + 1,
    };
    // Bounded scan: a line longer than line_bytes_max is an error whether or not its LF
    // has arrived, so there is no need to look further (and repeated calls on a growing
    // buffer without LF stay O(limit), never O(buffer)).
    let scan_end = input.len().min(line_bytes_max.saturating_add(2));
    let scan_start = first_end_byte.min(scan_end);
    let Some(lf) = find_lf(&input[scan_start..scan_end]).map(|i| scan_start + i) else {
        let mut line_end = input.len();
        if line_end > first_end_byte && input[line_end - 1] == b'\r' {
            line_end -= 1;
        }
        if line_end.saturating_sub(args_start) > limits.control_line_bytes_max
            || line_end > line_bytes_max
        {
            return Err(ParseError::ControlLineTooLong);
        }
        return Ok(Parsed::Incomplete { frame_bytes: None });
    };
    let args_end = if lf > first_end_byte && input[lf - 1] == b'\r' {
        lf - 1
    } else {
        lf
    };
    if args_end - args_start > limits.control_line_bytes_max || args_end > line_bytes_max {
        return Err(ParseError::ControlLineTooLong);
    }
    let args = &input[args_start..args_end];
    let line_bytes = lf + 1;

    match op {
        OpName::Pub => parse_pub(input, args, line_bytes, limits),
        OpName::Hpub => parse_hpub(input, args, line_bytes, limits),
        OpName::Sub => {
            let (count, a) = split_args::<3>(args, is_sub_separator);
            let op = match count {
                2 => ClientOp::Sub {
                    subject: a[0],
                    queue: None,
                    sid: a[1],
                },
                3 => ClientOp::Sub {
                    subject: a[0],
                    queue: Some(a[1]),
                    sid: a[2],
                },
                _ => return Err(ParseError::SubArgumentCount),
            };
            Ok(Parsed::Op(op, line_bytes))
        }
        OpName::Unsub => {
            let (count, a) = split_args::<2>(args, is_sub_separator);
            let op = match count {
                1 => ClientOp::Unsub {
                    sid: a[0],
                    max_msgs: None,
                },
                2 => ClientOp::Unsub {
                    sid: a[0],
                    max_msgs: parse_size(a[1]).map(|n| n as u64),
                },
                _ => return Err(ParseError::UnsubArgumentCount),
            };
            Ok(Parsed::Op(op, line_bytes))
        }
        OpName::Ping => Ok(Parsed::Op(ClientOp::Ping, line_bytes)),
        OpName::Pong => Ok(Parsed::Op(ClientOp::Pong, line_bytes)),
        OpName::Ok => Ok(Parsed::Op(ClientOp::Ok, line_bytes)),
        OpName::Connect => Ok(Parsed::Op(ClientOp::Connect { json: args }, line_bytes)),
        OpName::Info => {
            if is_json_object_or_null(args) {
                Ok(Parsed::Op(ClientOp::Info, line_bytes))
            } else {
                Err(ParseError::InvalidClientInfo)
            }
        }
        OpName::Err => Err(ParseError::ClientSentErr),
    }
}

fn parse_pub<'a>(
    input: &'a [u8],
    args: &'a [u8],
    line_bytes: usize,
    limits: &ParseLimits,
) -> Result<Parsed<'a>, ParseError> {
    let (count, a) = split_args::<3>(args, is_pub_separator);
    let (subject, reply, size) = match count {
        2 => (a[0], None, a[1]),
        3 => (a[0], Some(a[1]), a[2]),
        _ => return Err(ParseError::PubArgumentCount),
    };
    let size = parse_size(size).ok_or(ParseError::PubSizeInvalid)?;
    if size > limits.payload_bytes_max {
        return Err(ParseError::PayloadTooLarge);
    }
    let frame_bytes = line_bytes + size + 2;
    let Some(payload) = take_payload(input, line_bytes, size)? else {
        return Ok(Parsed::Incomplete {
            frame_bytes: Some(frame_bytes),
        });
    };
    let op = ClientOp::Pub {
        subject,
        reply,
        payload,
    };
    Ok(Parsed::Op(op, frame_bytes))
}

fn parse_hpub<'a>(
    input: &'a [u8],
    args: &'a [u8],
    line_bytes: usize,
    limits: &ParseLimits,
) -> Result<Parsed<'a>, ParseError> {
    let (count, a) = split_args::<4>(args, is_pub_separator);
    let (subject, reply, header_size, total_size) = match count {
        3 => (a[0], None, a[1], a[2]),
        4 => (a[0], Some(a[1]), a[2], a[3]),
        _ => return Err(ParseError::HpubArgumentCount),
    };
    let header_size = parse_size(header_size).ok_or(ParseError::HpubHeaderSizeInvalid)?;
    let total_size = parse_size(total_size).ok_or(ParseError::HpubTotalSizeInvalid)?;
    if header_size > total_size {
        return Err(ParseError::HpubHeaderSizeExceedsTotal);
    }
    if total_size > limits.payload_bytes_max {
        return Err(ParseError::PayloadTooLarge);
    }
    let frame_bytes = line_bytes + total_size + 2;
    let Some(body) = take_payload(input, line_bytes, total_size)? else {
        return Ok(Parsed::Incomplete {
            frame_bytes: Some(frame_bytes),
        });
    };
    let (headers, payload) = body.split_at(header_size);
    let op = ClientOp::Hpub {
        subject,
        reply,
        headers,
        payload,
    };
    Ok(Parsed::Op(op, frame_bytes))
}

/// The `size` bytes after the control line, checked to be followed by CRLF; `None`
/// while they (or the CRLF) have not all arrived.
fn take_payload(
    input: &[u8],
    payload_start: usize,
    size: usize,
) -> Result<Option<&[u8]>, ParseError> {
    let payload_end = payload_start + size;
    // Reject a wrong terminator as soon as its first byte is here, as nats-server does.
    match input.get(payload_end..) {
        Some([b'\r', b'\n', ..]) => Ok(Some(&input[payload_start..payload_end])),
        Some([] | [b'\r']) | None => Ok(None),
        Some(_) => Err(ParseError::MissingPayloadTerminator),
    }
}

/// Matches the op name (case-insensitively) at the start of `input`, failing at the
/// first byte that cannot continue any client op, as nats-server's state machine does.
fn match_name(input: &[u8], line_bytes_max: usize) -> Result<NameMatch, ParseError> {
    let Some(&first) = input.first() else {
        return Ok(NameMatch::NeedMore);
    };
    // `b | 0x20` folds ASCII upper case to lower case; the only other byte it maps onto a
    // lower-case letter is that letter's upper-case form, so this is exact for letters.
    let (op, name, separator_required): (OpName, &[u8], bool) = match first | 0x20 {
        b'p' => match input.get(1).map(|b| b | 0x20) {
            None => return Ok(NameMatch::NeedMore),
            Some(b'u') => (OpName::Pub, b"pub", true),
            Some(b'i') => (OpName::Ping, b"ping", false),
            Some(b'o') => (OpName::Pong, b"pong", false),
            Some(_) => return Err(ParseError::UnknownOperation),
        },
        b'h' => match input.get(1).map(|b| b | 0x20) {
            None => return Ok(NameMatch::NeedMore),
            Some(b'p') => (OpName::Hpub, b"hpub", true),
            // HMSG is server->client only; nats-server fails a client's HMSG as unknown.
            Some(_) => return Err(ParseError::UnknownOperation),
        },
        b's' => (OpName::Sub, b"sub", true),
        b'u' => (OpName::Unsub, b"unsub", true),
        b'c' => (OpName::Connect, b"connect", false),
        b'i' => (OpName::Info, b"info", false),
        _ if first == b'+' => (OpName::Ok, b"+ok", false),
        _ if first == b'-' => (OpName::Err, b"-err", true),
        _ => return Err(ParseError::UnknownOperation),
    };
    for (i, &expected) in name.iter().enumerate().skip(1) {
        match input.get(i) {
            None => return Ok(NameMatch::NeedMore),
            Some(&b) if b | 0x20 == expected => {}
            Some(_) => return Err(ParseError::UnknownOperation),
        }
    }
    let name_end = name.len();
    match op {
        // Everything after the name up to the LF is ignored, separators or not.
        OpName::Ping | OpName::Pong | OpName::Ok => return Ok(NameMatch::Found(op, name_end)),
        _ => {}
    }
    if separator_required {
        match input.get(name_end) {
            None => return Ok(NameMatch::NeedMore),
            Some(&b) if is_pub_separator(b) => {}
            Some(_) => return Err(ParseError::UnknownOperation),
        }
    }
    // Skip the separator run, bounded so a peer cannot make us buffer endless blanks.
    let mut i = name_end;
    while let Some(&b) = input.get(i) {
        if !is_pub_separator(b) {
            return Ok(NameMatch::Found(op, i));
        }
        i += 1;
        if i > line_bytes_max {
            return Err(ParseError::ControlLineTooLong);
        }
    }
    Ok(NameMatch::NeedMore)
}

/// PUB/HPUB (and the op/argument boundary) split on spaces and tabs only.
#[inline]
fn is_pub_separator(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// SUB/UNSUB split on spaces, tabs, CR and LF (nats-server's `splitArg`).
#[inline]
fn is_sub_separator(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Splits `args` into at most `N` fields on runs of separators, without allocating.
/// Returns the number of fields found, counting at most `N + 1` (so "too many" is
/// distinguishable); fields past `N` are not stored.
#[inline]
fn split_args<const N: usize>(
    args: &[u8],
    is_separator: impl Fn(u8) -> bool,
) -> (usize, [&[u8]; N]) {
    let mut fields: [&[u8]; N] = [&[]; N];
    let mut count = 0;
    let mut i = 0;
    while i < args.len() {
        if is_separator(args[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < args.len() && !is_separator(args[i]) {
            i += 1;
        }
        if count == N {
            return (N + 1, fields);
        }
        fields[count] = &args[start..i];
        count += 1;
    }
    (count, fields)
}

/// nats-server's `parseSize`: 1..=9 ASCII digits, nothing else (no sign, no blanks).
#[inline]
fn parse_size(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || digits.len() > SIZE_DIGITS_MAX {
        return None;
    }
    let mut n: usize = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + usize::from(d - b'0');
    }
    Some(n)
}

/// Position of the first LF, scanning a word at a time (lines are short; this keeps the
/// per-message cost to a few instructions without a memchr dependency).
#[inline]
fn find_lf(haystack: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    const LFS: u64 = ONES * b'\n' as u64;
    let mut chunks = haystack.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("chunks_exact yields 8 bytes"));
        let x = word ^ LFS;
        // Classic "has zero byte": the lowest set high bit marks the first zero byte
        // exactly (borrows only produce false hits above a real one).
        let hits = x.wrapping_sub(ONES) & !x & HIGHS;
        if hits != 0 {
            return Some(offset + (hits.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'\n')
        .map(|i| offset + i)
}

/// What nats-server's `json.Unmarshal` into its Info struct accepts, to the first order:
/// one JSON object or `null`, optionally surrounded by whitespace. (Type mismatches in
/// known INFO fields, which Go also rejects, are accepted here.)
fn is_json_object_or_null(json: &[u8]) -> bool {
    let first = json.iter().find(|b| !b.is_ascii_whitespace());
    matches!(first, Some(b'{') | Some(b'n')) && serde_json::from_slice::<IgnoredAny>(json).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ParseLimits = ParseLimits {
        control_line_bytes_max: 32,
        payload_bytes_max: 16,
    };

    /// Renders one parse outcome compactly: `PUB <subject> <reply|-> "<payload>" @<used>`,
    /// `more`, `more @<frame_bytes>`, or the error variant's name.
    fn render(result: Result<Parsed<'_>, ParseError>) -> String {
        let text = |b: &[u8]| b.escape_ascii().to_string();
        let quoted = |b: &[u8]| format!("\"{}\"", b.escape_ascii());
        let opt = |b: Option<&[u8]>| b.map_or("-".to_string(), text);
        match result {
            Ok(Parsed::Op(op, used)) => {
                let op = match op {
                    ClientOp::Connect { json } => format!("CONNECT {}", quoted(json)),
                    ClientOp::Pub {
                        subject,
                        reply,
                        payload,
                    } => format!("PUB {} {} {}", text(subject), opt(reply), quoted(payload)),
                    ClientOp::Hpub {
                        subject,
                        reply,
                        headers,
                        payload,
                    } => format!(
                        "HPUB {} {} {} {}",
                        text(subject),
                        opt(reply),
                        quoted(headers),
                        quoted(payload)
                    ),
                    ClientOp::Sub {
                        subject,
                        queue,
                        sid,
                    } => format!("SUB {} {} {}", text(subject), opt(queue), text(sid)),
                    ClientOp::Unsub { sid, max_msgs } => format!(
                        "UNSUB {} {}",
                        text(sid),
                        max_msgs.map_or("-".to_string(), |n| n.to_string())
                    ),
                    other => format!("{other:?}").to_uppercase(),
                };
                format!("{op} @{used}")
            }
            Ok(Parsed::Incomplete { frame_bytes: None }) => "more".to_string(),
            Ok(Parsed::Incomplete {
                frame_bytes: Some(n),
            }) => format!("more @{n}"),
            Err(e) => format!("{e:?}"),
        }
    }

    /// One case: input bytes and the rendered outcome. A complete op must also parse as
    /// `more` at every strict prefix (the parser never fails on input it would accept).
    #[track_caller]
    fn check(input: &[u8], want: &str) {
        let got = render(parse_op(input, &LIMITS));
        assert_eq!(got, want, "input {:?}", input.escape_ascii().to_string());
        if let Ok(Parsed::Op(_, used)) = parse_op(input, &LIMITS) {
            for cut in 0..used {
                let prefix = render(parse_op(&input[..cut], &LIMITS));
                assert!(prefix.starts_with("more"), "prefix {cut}: {prefix}");
            }
        }
    }

    #[test]
    fn simple_ops() {
        check(b"PING\r\n", "PING @6");
        check(b"PING\n", "PING @5");
        check(b"ping\r\nPING\r\n", "PING @6");
        check(b"pInG x y\r\n", "PING @10");
        check(b"PINGX\r\n", "PING @7");
        check(b"PING\rjunk\r\n", "PING @11");
        check(b"PONG\r\n", "PONG @6");
        check(b"+OK\r\n", "OK @5");
        check(b"+ok junk\n", "OK @9");
        check(b"INFO {}\r\n", "INFO @9");
        check(b"INFO{}\r\n", "INFO @8");
        check(b"INFO null\r\n", "INFO @11");
        check(
            b"CONNECT {\"verbose\":false}\r\n",
            r#"CONNECT "{\"verbose\":false}" @27"#,
        );
        check(b"CONNECT{}\r\n", r#"CONNECT "{}" @11"#);
        check(b"connect \t {} \r\n", r#"CONNECT "{} " @15"#);
        check(b"CONNECT\r\n", r#"CONNECT "\r" @9"#);
        check(b"CONNECT\n{}\r\n", r#"CONNECT "\n{}" @12"#);
    }

    #[test]
    fn pub_and_hpub() {
        check(b"PUB foo 2\r\nhi\r\n", r#"PUB foo - "hi" @15"#);
        check(b"pub foo 2\nhi\r\n", r#"PUB foo - "hi" @14"#);
        check(
            b"PUB\tfoo \t bar\t\t2 \r\nhi\r\n",
            r#"PUB foo bar "hi" @23"#,
        );
        check(b"PUB foo 0\r\n\r\n", r#"PUB foo - "" @13"#);
        check(b"PUB foo 000000002\r\nhi\r\n", r#"PUB foo - "hi" @23"#);
        check(b"PUB foo 2\r\n\r\n\r\n", r#"PUB foo - "\r\n" @15"#);
        check(
            b"PUB foo 16\r\n0123456789abcdef\r\n",
            r#"PUB foo - "0123456789abcdef" @30"#,
        );
        check(b"PUB \nfoo 2\r\nhi\r\n", r#"PUB \nfoo - "hi" @16"#);
        check(b"PUB a\x00b 1\r\n\x00\r\n", r#"PUB a\x00b - "\x00" @14"#);
        check(
            b"HPUB foo 12 14\r\nNATS/1.0\r\n\r\nhi\r\n",
            r#"HPUB foo - "NATS/1.0\r\n\r\n" "hi" @32"#,
        );
        check(b"hpub foo r 0 2\r\nhi\r\n", r#"HPUB foo r "" "hi" @20"#);
        check(b"HPUB foo 2 2\r\nxx\r\n", r#"HPUB foo - "xx" "" @18"#);
    }

    #[test]
    fn sub_and_unsub() {
        check(b"SUB foo 1\r\n", "SUB foo - 1 @11");
        check(b"sub foo q 1\n", "SUB foo q 1 @12");
        check(b"SUB foo\r1\r\n", "SUB foo - 1 @11");
        check(b"SUB foo 1 \r\n", "SUB foo - 1 @12");
        check(b"SUB\t\tfoo\t \tbar 1\r\n", "SUB foo bar 1 @18");
        // A LF right after the separators is the first argument byte, not the line end.
        check(b"SUB \n UNSUB  SUB PING\r\n", "SUB UNSUB SUB PING @23");
        check(b"SUB \noo q 2\r\n", "SUB oo q 2 @13");
        check(b"SUB \r\n", "SubArgumentCount");
        check(b"SUB \n", "more");
        check(b"UNSUB 1\r\n", "UNSUB 1 - @9");
        check(b"UNSUB 1 5\r\n", "UNSUB 1 5 @11");
        check(b"UNSUB 1 0\r\n", "UNSUB 1 0 @11");
        check(b"UNSUB 1 x\r\n", "UNSUB 1 - @11");
        check(b"UNSUB 1 999999999\r\n", "UNSUB 1 999999999 @19");
        check(b"UNSUB 1 1000000000\r\n", "UNSUB 1 - @20");
    }

    #[test]
    fn incomplete() {
        check(b"", "more");
        check(b"P", "more");
        check(b"PU", "more");
        check(b"PUB", "more");
        check(b"PUB ", "more");
        check(b"PUB foo 2", "more");
        check(b"PUB foo 2\r", "more");
        check(b"PUB foo 2\r\n", "more @15");
        check(b"PUB foo 2\r\nhi", "more @15");
        check(b"PUB foo 2\r\nhi\r", "more @15");
        check(b"HPUB foo 12 14\r\nNATS", "more @32");
        check(b"-ER", "more");
        check(b"-ERR 'x'", "more");
        check(b"UNSUB", "more");
        check(b"CONNECT", "more");
        check(b"PING", "more");
        check(b"PING junk", "more");
    }

    #[test]
    fn framing_errors() {
        check(b"FOO bar\r\n", "UnknownOperation");
        check(b"\x01\x02\x03\r\n", "UnknownOperation");
        check(b"\x00\x00\r\n", "UnknownOperation");
        check(b"PI\x00NG\r\n", "UnknownOperation");
        check(b"\r\nPING\r\n", "UnknownOperation");
        check(b" PING\r\n", "UnknownOperation");
        check(b"PUB\r\n", "UnknownOperation");
        check(b"PUBfoo 2\r\n", "UnknownOperation");
        check(b"PUX", "UnknownOperation");
        check(b"MSG foo 1 2\r\n", "UnknownOperation");
        check(b"HMSG foo 1 12 14\r\n", "UnknownOperation");
        check(b"-ERR\r\n", "UnknownOperation");
        check(b"+OX\r\n", "UnknownOperation");
        check(b"PUB foo 3\r\nabcXY", "MissingPayloadTerminator");
        check(b"PUB foo 3\r\nabc\nPING\r\n", "MissingPayloadTerminator");
        check(b"PUB foo 3\r\nabcd\r\n", "MissingPayloadTerminator");
        check(b"PUB foo 3\r\nabc\rX", "MissingPayloadTerminator");
        check(b"PUB foo 3\r\nabcX", "MissingPayloadTerminator");
        check(b"-ERR 'x'\r\n", "ClientSentErr");
        check(b"INFO []\r\n", "InvalidClientInfo");
        check(b"INFO 1\r\n", "InvalidClientInfo");
        check(b"INFO\r\n", "InvalidClientInfo");
        check(b"INFO {} junk\r\n", "InvalidClientInfo");
    }

    #[test]
    fn argument_errors() {
        check(b"PUB \r\n", "PubArgumentCount");
        check(b"PUB foo\r\n", "PubArgumentCount");
        check(b"PUB foo bar baz 3\r\n", "PubArgumentCount");
        check(b"PUB foo x\r\n", "PubSizeInvalid");
        check(b"PUB foo -1\r\n", "PubSizeInvalid");
        check(b"PUB foo +2\r\n", "PubSizeInvalid");
        check(b"PUB foo 0000000002\r\n", "PubSizeInvalid");
        check(b"PUB foo 2\r\r\n", "PubSizeInvalid");
        check(b"HPUB foo 12\r\n", "HpubArgumentCount");
        check(b"HPUB foo a b 12 14\r\n", "HpubArgumentCount");
        check(b"HPUB foo x 12\r\n", "HpubHeaderSizeInvalid");
        check(b"HPUB foo 12 x\r\n", "HpubTotalSizeInvalid");
        check(b"HPUB foo 12 10\r\n", "HpubHeaderSizeExceedsTotal");
        check(b"HPUB foo 99 17\r\n", "HpubHeaderSizeExceedsTotal");
        check(b"SUB foo\r\n", "SubArgumentCount");
        check(b"SUB foo q 1 x\r\n", "SubArgumentCount");
        check(b"SUB \r\n", "SubArgumentCount");
        check(b"UNSUB \r\n", "UnsubArgumentCount");
        check(b"UNSUB 1 2 3\r\n", "UnsubArgumentCount");
    }

    #[test]
    fn limits() {
        // The payload limit (16 here) is checked from the control line alone.
        check(b"PUB foo 17\r\n", "PayloadTooLarge");
        check(b"PUB foo 999999999\r\n", "PayloadTooLarge");
        check(b"HPUB foo 12 17\r\n", "PayloadTooLarge");
        // The control line limit (32 here) counts the arguments, like nats-server.
        let a30 = "a".repeat(30);
        let a31 = "a".repeat(31);
        check(
            format!("PUB {a30} 0\r\n\r\n").as_bytes(),
            &format!("PUB {a30} - \"\" @40"),
        );
        check(
            format!("PUB {a31} 0\r\n\r\n").as_bytes(),
            "ControlLineTooLong",
        );
        check(
            format!("PUB\t\t{a31} 0\r\n").as_bytes(),
            "ControlLineTooLong",
        );
        // Without LF yet, the arguments so far (minus a trailing CR) are measured.
        let a32 = "a".repeat(32);
        let a33 = "a".repeat(33);
        check(format!("PUB {a32}").as_bytes(), "more");
        check(format!("PUB {a32}\r").as_bytes(), "more");
        check(format!("PUB {a33}").as_bytes(), "ControlLineTooLong");
        check(format!("CONNECT {a33}").as_bytes(), "ControlLineTooLong");
        // Stricter than nats-server: trailing junk and separator runs are bounded too.
        check(format!("PING{a33}").as_bytes(), "ControlLineTooLong");
        check(format!("PING{a33}\r\n").as_bytes(), "ControlLineTooLong");
        check(
            format!("PUB{}", " ".repeat(64)).as_bytes(),
            "ControlLineTooLong",
        );
    }

    #[test]
    fn never_waits_for_a_line_longer_than_the_bound() {
        let bound = LIMITS.control_line_bytes_max + CONTROL_LINE_OVERHEAD_BYTES_MAX + 1;
        for prefix in [
            "PUB ", "HPUB ", "SUB ", "UNSUB ", "CONNECT", "INFO", "PING", "+OK", "-ERR ", "PUB ",
        ] {
            for filler in [b'a', b' ', b'\t', b'\r'] {
                let mut input = prefix.as_bytes().to_vec();
                input.resize(bound + 1, filler);
                let got = render(parse_op(&input, &LIMITS));
                assert!(!got.starts_with("more"), "{prefix:?}+{filler}: {got}");
            }
        }
    }

    #[test]
    fn find_lf_matches_naive() {
        let mut buf = [b'a'; 40];
        for at in 0..buf.len() {
            buf[at] = b'\n';
            for start in 0..=at {
                assert_eq!(find_lf(&buf[start..]), Some(at - start));
            }
            buf[at] = 0x8a; // a high-bit byte must not be mistaken for LF
            assert_eq!(find_lf(&buf), None);
            buf[at] = b'a';
        }
    }
}
