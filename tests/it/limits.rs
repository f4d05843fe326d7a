//! Limits and bad input at the socket level: declared sizes that never arrive,
//! stale clients, connect deadlines, connection caps. Each checks both that the
//! offender gets the reference's answer and that nobody else is affected.

use std::time::Duration;

use crate::support::{Raw, Server};

/// Connections that each declare a 1 GiB payload (and a max-size one) and then
/// stall must not make the broker allocate what they declared.
#[test]
fn declared_huge_payloads_do_not_grow_memory() {
    let server = Server::perch(&[]);
    let baseline = server.rss_kib();
    // Declared 1 GiB: a 10-digit size, which nats-server refuses by closing
    // silently, from the control line alone.
    let mut huge = Vec::new();
    for _ in 0..50 {
        let mut raw = Raw::connect(&server);
        raw.send(b"CONNECT {\"verbose\":false}\r\nPUB big 1073741824\r\n");
        huge.push(raw);
    }
    for raw in &mut huge {
        let (bytes, closed) = raw.read_until_closed(Duration::from_secs(5));
        assert_eq!(String::from_utf8_lossy(&bytes), "");
        assert!(closed);
    }
    // Declared just over max_payload: the reference's -ERR, then close.
    let mut over = Raw::connect(&server);
    over.send(b"CONNECT {\"verbose\":false}\r\nPUB big 1048577\r\n");
    let (bytes, closed) = over.read_until_closed(Duration::from_secs(5));
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        "-ERR 'Maximum Payload Violation'\r\n"
    );
    assert!(closed);
    // Declared exactly max_payload (1 MiB), then only 10 bytes of it: memory must
    // follow what arrived, not what was declared.
    let mut stalled = Vec::new();
    for _ in 0..200 {
        let mut raw = Raw::connect(&server);
        raw.send(b"CONNECT {\"verbose\":false}\r\nPUB big 1048576\r\n0123456789");
        stalled.push(raw);
    }
    // A healthy client still gets answers meanwhile.
    let mut probe = Raw::connect(&server);
    probe.send(b"CONNECT {\"verbose\":false}\r\nPING\r\n");
    assert_eq!(probe.read_line(), "PONG");
    let grown_kib = server.rss_kib().saturating_sub(baseline);
    // 200 × 1 MiB declared would be 200 MiB; allow a few KiB per connection.
    assert!(
        grown_kib < 16 * 1024,
        "RSS grew by {grown_kib} KiB for 200 stalled 1 MiB declarations"
    );
}

#[test]
fn connect_deadline_closes_silent_sockets() {
    let server = Server::perch(&["--connect-timeout-ms", "300"]);
    let mut raw = Raw::connect(&server);
    let (bytes, closed) = raw.read_until_closed(Duration::from_secs(5));
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        "-ERR 'Authentication Timeout'\r\n"
    );
    assert!(closed);
}

#[test]
fn stale_connection_is_pinged_then_closed() {
    let server = Server::perch(&["--ping-interval-ms", "200", "--ping-max-outstanding", "2"]);
    let mut raw = Raw::connect(&server);
    raw.send(b"CONNECT {\"verbose\":false}\r\n");
    let (bytes, closed) = raw.read_until_closed(Duration::from_secs(5));
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        "PING\r\nPING\r\n-ERR 'Stale Connection'\r\n"
    );
    assert!(closed);

    // A client that answers stays.
    let mut alive = Raw::connect(&server);
    alive.send(b"CONNECT {\"verbose\":false}\r\n");
    for _ in 0..4 {
        assert_eq!(alive.read_line_exact(), "PING");
        alive.send(b"PONG\r\n");
    }
}

#[test]
fn max_connections_rejects_the_extra_client() {
    let server = Server::perch(&["--max-connections", "3"]);
    let mut held: Vec<Raw> = (0..3).map(|_| Raw::connect(&server)).collect();
    for raw in &mut held {
        raw.send(b"CONNECT {\"verbose\":false}\r\nPING\r\n");
        assert_eq!(raw.read_line(), "PONG");
    }
    let mut extra = Raw::connect(&server);
    let (bytes, closed) = extra.read_until_closed(Duration::from_secs(5));
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        "-ERR 'maximum connections exceeded'\r\n"
    );
    assert!(closed);
    // Once one leaves, a new client is admitted.
    drop(held.pop());
    std::thread::sleep(Duration::from_millis(200));
    let mut again = Raw::connect(&server);
    again.send(b"CONNECT {\"verbose\":false}\r\nPING\r\n");
    assert_eq!(again.read_line(), "PONG");
}

#[test]
fn garbage_closes_only_the_offender() {
    let server = Server::perch(&[]);
    let mut good = Raw::connect(&server);
    good.send(b"CONNECT {\"verbose\":false}\r\nSUB x 1\r\nPING\r\n");
    assert_eq!(good.read_line(), "PONG");
    // (input, what nats-server answers before closing; "" = closes silently)
    let unknown = "-ERR 'Unknown Protocol Operation'\r\n";
    let long_line = [b"SUB ".as_slice(), &[b'a'; 10_000]].concat();
    for (garbage, expected) in [
        (b"\x00\x00\x00\x00\r\n".as_slice(), unknown),
        (b"HELLO WORLD\r\n", unknown),
        (b"PUB x notanumber\r\n", ""),
        (b"PUB x 3\r\nabcXY", unknown),
        (&[b'A'; 10_000], unknown),
        (&long_line, "-ERR 'maximum control line exceeded'\r\n"),
    ] {
        let mut bad = Raw::connect(&server);
        bad.send(b"CONNECT {\"verbose\":false}\r\n");
        bad.send(garbage);
        let (bytes, closed) = bad.read_until_closed(Duration::from_secs(5));
        let shown = String::from_utf8_lossy(&garbage[..garbage.len().min(20)]);
        assert!(closed, "{shown:?} must close the connection");
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            expected,
            "answer to {shown:?}"
        );
    }
    let mut publisher = Raw::connect(&server);
    publisher.send(b"CONNECT {\"verbose\":false}\r\nPUB x 2\r\nok\r\n");
    assert_eq!(good.read_line(), "MSG x 1 2");
    assert_eq!(good.read_line(), "ok");
}
