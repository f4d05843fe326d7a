//! Encoding of NATS server->client protocol lines, byte-identical to nats-server 2.9.10.
//!
//! Owns: MSG, HMSG, INFO, -ERR, PING/PONG/+OK bytes, the no-responders status message,
//! the exact -ERR texts the session sends, and [`ServerInfo`] (INFO's JSON, fields in
//! nats-server's order). Every function appends to a caller's `Vec<u8>` and allocates
//! nothing else (lengths are formatted on the stack with itoa).
//!
//! Deliberately does not: decide *when* to send anything, check subjects, or buffer and
//! write to sockets. Known difference: Go's JSON escapes `<`, `>` and `&` in INFO
//! strings as `\u003c` etc.; serde_json does not (only matters for such server names).

use serde::Serialize;

/// Server keep-alive probe.
pub const PING: &[u8] = b"PING\r\n";
/// Reply to a client's PING.
pub const PONG: &[u8] = b"PONG\r\n";
/// Verbose-mode acknowledgement.
pub const OK: &[u8] = b"+OK\r\n";

/// The `version` perch announces in INFO. Clients gate features on it, so it names the
/// nats-server release whose behaviour perch provides (the lead's choice).
pub const PROTOCOL_VERSION: &str = "2.10.0";
/// The value of INFO's `go` field (nats-server reports its Go toolchain there).
pub const GO_FIELD: &str = "go";

/// The header block nats-server 2.9.10 sends as a no-responders status (16 bytes).
pub const NO_RESPONDERS_HEADERS: &[u8] = b"NATS/1.0 503\r\n\r\n";

/// Exact `-ERR` texts of nats-server 2.9.10 that the session sends itself (the parser's
/// and CONNECT's come from `ParseError::err_text` / `ConnectError::err_text`).
pub mod err_text {
    /// SUB with an invalid subject; the connection stays open.
    pub const INVALID_SUBJECT: &str = "Invalid Subject";
    /// Pedantic PUB to a non-literal subject; the connection stays open and the message
    /// is still delivered to matching subscriptions.
    pub const INVALID_PUBLISH_SUBJECT: &str = "Invalid Publish Subject";
    /// Bad or missing credentials (also: first op not CONNECT when auth is required); closes.
    pub const AUTHORIZATION_VIOLATION: &str = "Authorization Violation";
    /// No CONNECT within the auth timeout; closes.
    pub const AUTHENTICATION_TIMEOUT: &str = "Authentication Timeout";
    /// Too many unanswered server PINGs; closes.
    pub const STALE_CONNECTION: &str = "Stale Connection";
    /// Over max_connections; closes.
    pub const MAXIMUM_CONNECTIONS_EXCEEDED: &str = "maximum connections exceeded";
    /// Over max_subscriptions; the connection stays open.
    pub const MAXIMUM_SUBSCRIPTIONS_EXCEEDED: &str = "maximum subscriptions exceeded";
}

/// The INFO a server sends on accept, in nats-server 2.9.10's field order. Optional
/// fields are omitted when empty/false/zero, as Go's `omitempty` does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServerInfo {
    pub server_id: String,
    pub server_name: String,
    pub version: String,
    pub proto: i32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub git_commit: String,
    pub go: String,
    pub host: String,
    pub port: u16,
    pub headers: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub auth_required: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub tls_required: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub tls_verify: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub tls_available: bool,
    pub max_payload: usize,
    #[serde(skip_serializing_if = "is_false")]
    pub jetstream: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ip: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub client_id: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub client_ip: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub nonce: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cluster: String,
    #[serde(skip_serializing_if = "is_false")]
    pub cluster_dynamic: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub connect_urls: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ws_connect_urls: Vec<String>,
    #[serde(skip_serializing_if = "is_false")]
    pub ldm: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `INFO {json} \r\n` — note the space before CRLF, which nats-server sends too.
pub fn info(out: &mut Vec<u8>, info: &ServerInfo) {
    out.extend_from_slice(b"INFO ");
    serde_json::to_writer(&mut *out, info)
        .expect("ServerInfo has only string keys and plain values; writing to a Vec cannot fail");
    out.extend_from_slice(b" \r\n");
}

/// `MSG <subject> <sid> [reply] <len>\r\n<payload>\r\n`
pub fn msg(out: &mut Vec<u8>, subject: &[u8], sid: &[u8], reply: Option<&[u8]>, payload: &[u8]) {
    let mut len = itoa::Buffer::new();
    let len = len.format(payload.len()).as_bytes();
    out.reserve(
        b"MSG ".len()
            + subject.len()
            + 1
            + sid.len()
            + 1
            + reply.map_or(0, |r| r.len() + 1)
            + len.len()
            + 2
            + payload.len()
            + 2,
    );
    out.extend_from_slice(b"MSG ");
    out.extend_from_slice(subject);
    out.push(b' ');
    out.extend_from_slice(sid);
    out.push(b' ');
    if let Some(reply) = reply {
        out.extend_from_slice(reply);
        out.push(b' ');
    }
    out.extend_from_slice(len);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// `HMSG <subject> <sid> [reply] <hdr_len> <total_len>\r\n<headers><payload>\r\n`
pub fn hmsg(
    out: &mut Vec<u8>,
    subject: &[u8],
    sid: &[u8],
    reply: Option<&[u8]>,
    headers: &[u8],
    payload: &[u8],
) {
    let mut header_len = itoa::Buffer::new();
    let header_len = header_len.format(headers.len()).as_bytes();
    let mut total_len = itoa::Buffer::new();
    let total_len = total_len.format(headers.len() + payload.len()).as_bytes();
    out.reserve(
        b"HMSG ".len()
            + subject.len()
            + 1
            + sid.len()
            + 1
            + reply.map_or(0, |r| r.len() + 1)
            + header_len.len()
            + 1
            + total_len.len()
            + 2
            + headers.len()
            + payload.len()
            + 2,
    );
    out.extend_from_slice(b"HMSG ");
    out.extend_from_slice(subject);
    out.push(b' ');
    out.extend_from_slice(sid);
    out.push(b' ');
    if let Some(reply) = reply {
        out.extend_from_slice(reply);
        out.push(b' ');
    }
    out.extend_from_slice(header_len);
    out.push(b' ');
    out.extend_from_slice(total_len);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(headers);
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// `-ERR '<text>'\r\n`
pub fn err(out: &mut Vec<u8>, text: &str) {
    out.reserve(b"-ERR ''\r\n".len() + text.len());
    out.extend_from_slice(b"-ERR '");
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"'\r\n");
}

/// What nats-server 2.9.10 sends a requester (CONNECT with headers and no_responders)
/// whose request reached no subscriber: an HMSG on the reply subject, to the sid of the
/// requester's own plain (non-queue) subscription matching it, with a 503 status and no
/// payload, whatever the request carried:
/// `HMSG <reply> <sid> 16 16\r\nNATS/1.0 503\r\n\r\n\r\n`.
pub fn no_responders(out: &mut Vec<u8>, reply_subject: &[u8], sid: &[u8]) {
    hmsg(out, reply_subject, sid, None, NO_RESPONDERS_HEADERS, b"");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(encode: impl FnOnce(&mut Vec<u8>), want: &[u8]) {
        let mut out = b"prefix|".to_vec();
        encode(&mut out);
        assert_eq!(
            String::from_utf8_lossy(&out[7..]),
            String::from_utf8_lossy(want)
        );
        assert_eq!(&out[..7], b"prefix|", "appends, never overwrites");
    }

    #[test]
    fn lines() {
        check(
            |o| msg(o, b"foo", b"1", None, b"hi"),
            b"MSG foo 1 2\r\nhi\r\n",
        );
        check(
            |o| msg(o, b"foo", b"1", Some(b"r.1"), b""),
            b"MSG foo 1 r.1 0\r\n\r\n",
        );
        check(
            |o| hmsg(o, b"foo", b"9", Some(b"r"), b"NATS/1.0\r\n\r\n", b"hi"),
            b"HMSG foo 9 r 12 14\r\nNATS/1.0\r\n\r\nhi\r\n",
        );
        check(
            |o| err(o, "Unknown Protocol Operation"),
            b"-ERR 'Unknown Protocol Operation'\r\n",
        );
        check(
            |o| no_responders(o, b"_INBOX.x", b"1"),
            b"HMSG _INBOX.x 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\n",
        );
        check(|o| o.extend_from_slice(PING), b"PING\r\n");
        check(|o| o.extend_from_slice(PONG), b"PONG\r\n");
        check(|o| o.extend_from_slice(OK), b"+OK\r\n");
    }

    #[test]
    fn info_matches_nats_server() {
        // Captured from nats-server 2.9.10 (`nats-server -p 14222 -a 127.0.0.1`).
        let plain = ServerInfo {
            server_id: "NAIGN76KP5YLU3LLEG3REZOT22BPV35Z7PUMDCN55QRYTMPMM7NYFHBG".into(),
            server_name: "NAIGN76KP5YLU3LLEG3REZOT22BPV35Z7PUMDCN55QRYTMPMM7NYFHBG".into(),
            version: "2.9.10".into(),
            proto: 1,
            go: "go1.19.8".into(),
            host: "127.0.0.1".into(),
            port: 14222,
            headers: true,
            max_payload: 1048576,
            client_id: 4,
            client_ip: "127.0.0.1".into(),
            ..ServerInfo::default()
        };
        check(
            |o| info(o, &plain),
            b"INFO {\"server_id\":\"NAIGN76KP5YLU3LLEG3REZOT22BPV35Z7PUMDCN55QRYTMPMM7NYFHBG\",\
\"server_name\":\"NAIGN76KP5YLU3LLEG3REZOT22BPV35Z7PUMDCN55QRYTMPMM7NYFHBG\",\"version\":\"2.9.10\",\
\"proto\":1,\"go\":\"go1.19.8\",\"host\":\"127.0.0.1\",\"port\":14222,\"headers\":true,\
\"max_payload\":1048576,\"client_id\":4,\"client_ip\":\"127.0.0.1\"} \r\n",
        );
        // With `-js --user u --pass p`: auth_required and jetstream slot in by field order.
        let auth_js = ServerInfo {
            server_id: "S".into(),
            server_name: "S".into(),
            version: "2.9.10".into(),
            proto: 1,
            go: "go1.19.8".into(),
            host: "127.0.0.1".into(),
            port: 14712,
            headers: true,
            auth_required: true,
            max_payload: 1048576,
            jetstream: true,
            client_id: 4,
            client_ip: "127.0.0.1".into(),
            ..ServerInfo::default()
        };
        check(
            |o| info(o, &auth_js),
            b"INFO {\"server_id\":\"S\",\"server_name\":\"S\",\"version\":\"2.9.10\",\"proto\":1,\
\"go\":\"go1.19.8\",\"host\":\"127.0.0.1\",\"port\":14712,\"headers\":true,\"auth_required\":true,\
\"max_payload\":1048576,\"jetstream\":true,\"client_id\":4,\"client_ip\":\"127.0.0.1\"} \r\n",
        );
    }
}
