//! Device keys against the real broker (docs/device-protocol.md §9): the
//! Rust client (`perch device pub|sub --key-file`) end to end with NATS, and
//! raw datagrams sealed with `perch-wire` for everything a forger can try.
//! Nothing that fails to verify may be answered or leave state behind.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use perch_wire::protect::{self, DeviceEnvelope, KEY_BYTES};
use perch_wire::{decode_from_broker, Code, Frame, Qos, TopicRef};

use super::{nats, subscribe_nats};
use crate::support::{free_port, Server, TempDir};

const KEY_A: [u8; KEY_BYTES] = [0x11; KEY_BYTES];
const KEY_B: [u8; KEY_BYTES] = [0x22; KEY_BYTES];

fn hex(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// A broker with devices "a" and "b" keyed (b's key in a file) and the fleet
/// rule: publish under `t.{client}.>`, subscribe to `cmd.{client}.>`.
fn keyed_broker(require_key: bool) -> (Server, u16, TempDir) {
    let port = free_port();
    let dir = TempDir::new("device-keys");
    let key_b = dir.path.join("b.key");
    std::fs::write(&key_b, format!("{}\n", hex(&KEY_B))).expect("write key");
    let conf = dir.path.join("perch.toml");
    std::fs::write(
        &conf,
        format!(
            r#"[device]
udp = "127.0.0.1:{port}"
require_key = {require_key}
[device.default_permissions]
publish = {{ allow = ["t.{{client}}.>"] }}
subscribe = {{ allow = ["cmd.{{client}}.>"] }}
[[device.clients]]
client = "a"
key = "{}"
[[device.clients]]
client = "b"
key_file = "{}"
"#,
            hex(&KEY_A),
            key_b.display()
        ),
    )
    .expect("write config");
    let conf = conf.to_string_lossy().into_owned();
    let server = Server::perch(&["--shards", "2", "--config", &conf]);
    (server, port, dir)
}

/// A device that seals by hand, like the clients do.
struct Sealed {
    socket: UdpSocket,
    id: &'static [u8],
    key: [u8; KEY_BYTES],
    epoch: u32,
    counter: u32,
}

impl Sealed {
    fn new(port: u16, id: &'static [u8], key: [u8; KEY_BYTES], epoch: u32) -> Sealed {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket.connect(("127.0.0.1", port)).expect("connect");
        Sealed {
            socket,
            id,
            key,
            epoch,
            counter: 0,
        }
    }

    fn seal(&mut self, frame: &Frame<'_>) -> Vec<u8> {
        self.counter += 1;
        let mut plain = vec![0u8; frame.encoded_len()];
        let n = frame.encode(&mut plain).expect("encode");
        let envelope = DeviceEnvelope {
            client_id: self.id,
            epoch: self.epoch,
            counter: self.counter,
        };
        let mut out = vec![0u8; protect::device_sealed_len(self.id.len(), self.counter, n)];
        let len =
            protect::seal_from_device(&self.key, &envelope, &plain[..n], &mut out).expect("seal");
        out.truncate(len);
        out
    }

    fn send(&mut self, frame: &Frame<'_>) -> Vec<u8> {
        let bytes = self.seal(frame);
        self.socket.send(&bytes).expect("send");
        bytes
    }

    fn recv_within(&self, wait_ms: u64) -> Option<Vec<u8>> {
        self.socket
            .set_read_timeout(Some(Duration::from_millis(wait_ms)))
            .ok();
        let mut buf = [0u8; 2048];
        self.socket.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
    }

    /// The next sealed frame from the broker, opened.
    fn recv(&self) -> Vec<u8> {
        let bytes = self.recv_within(3_000).expect("a datagram from the broker");
        let mut plain = vec![0u8; bytes.len()];
        let (_, frame) = protect::open_from_broker(&self.key, self.epoch, &bytes, &mut plain)
            .unwrap_or_else(|e| panic!("not sealed for us: {bytes:02x?}: {e}"));
        frame.to_vec()
    }

    fn connect(&mut self) {
        self.send(&Frame::Connect {
            version: perch_wire::PROTOCOL_VERSION,
            clean_session: true,
            keepalive_s: 60,
            client_id: self.id,
            will: None,
        });
        let reply = self.recv();
        assert!(
            matches!(
                decode_from_broker(&reply),
                Ok(Frame::Connack { code: Code::Ok, .. })
            ),
            "{reply:02x?}"
        );
    }
}

/// No session at `socket`'s address: a plain 5-byte PUBLISH from it is
/// answered ERROR UNKNOWN_SESSION (4 bytes, so the no-amplification rule lets
/// it through).
fn has_no_session(socket: &UdpSocket, port: u16) -> bool {
    socket
        .send_to(&[0x30, 0x05, b'a', b'b', b'c'], ("127.0.0.1", port))
        .expect("send");
    socket
        .set_read_timeout(Some(Duration::from_millis(2_000)))
        .ok();
    let mut buf = [0u8; 64];
    match socket.recv(&mut buf) {
        Ok(n) => matches!(
            decode_from_broker(&buf[..n]),
            Ok(Frame::Error {
                code: Code::UnknownSession,
                ..
            })
        ),
        Err(_) => false,
    }
}

#[test]
fn keyed_rust_clients_reach_nats_and_back() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let (server, port, dir) = keyed_broker(true);
    let addr = format!("127.0.0.1:{port}");
    let key_file = dir.path.join("b.key").to_string_lossy().into_owned();
    let mut sub = nats(&server);
    subscribe_nats(&mut sub, "t.>");
    for qos in ["1", "0"] {
        let status = crate::support::perch_command()
            .args([
                "device", "pub", "--udp", &addr, "--qos", qos, "--count", "2",
            ])
            .args([
                "--client-id",
                "b",
                "--key-file",
                &key_file,
                "t.b.temp",
                "21.5",
            ])
            .status()
            .expect("run perch device pub");
        assert!(status.success(), "qos {qos}: {status}");
        for _ in 0..2 {
            assert_eq!(sub.read_line(), "MSG t.b.temp 1 4");
            assert_eq!(sub.read_line(), "21.5");
        }
    }
    // NATS → device, sealed both ways.
    let mut child = crate::support::perch_command()
        .args(["device", "sub", "--udp", &addr, "--count", "1"])
        .args(["--client-id", "b", "--key-file", &key_file, "cmd.b.>"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run perch device sub");
    let mut ready = String::new();
    BufReader::new(child.stderr.take().expect("stderr"))
        .read_line(&mut ready)
        .expect("sub's ready line");
    assert!(ready.contains("subscribed to cmd.b.>"), "{ready}");
    sub.send(b"PUB cmd.b.reboot 3\r\nnow\r\n");
    let output = child.wait_with_output().expect("sub exits after 1");
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout), "now\n");
    // The wrong key, or no key, or another device's subjects: refused.
    let wrong = dir.path.join("wrong.key");
    std::fs::write(&wrong, hex(&KEY_A)).expect("write");
    for extra in [
        &["--key-file", &*wrong.to_string_lossy(), "t.b.x"][..],
        &["t.b.x"][..],
    ] {
        let status = crate::support::perch_command()
            .args(["device", "pub", "--udp", &addr, "--qos", "1"])
            .args(["--timeout-ms", "800", "--client-id", "b"])
            .args(extra)
            .arg("x")
            .status()
            .expect("run perch device pub");
        assert!(!status.success(), "{extra:?} must not get through");
    }
    let status = crate::support::perch_command()
        .args(["device", "pub", "--udp", &addr, "--qos", "1"])
        .args([
            "--timeout-ms",
            "800",
            "--client-id",
            "b",
            "--key-file",
            &key_file,
        ])
        .args(["t.a.temp", "spoof"])
        .status()
        .expect("run perch device pub");
    assert!(!status.success(), "b may not publish as a");
    sub.send(b"PING\r\n");
    assert_eq!(sub.read_line(), "PONG", "nothing else reached NATS");
}

#[test]
fn forged_tampered_replayed_and_truncated_frames_are_dropped_unanswered() {
    let (server, port, _dir) = keyed_broker(false);
    let mut sub = nats(&server);
    subscribe_nats(&mut sub, "t.>");
    let connect = |id: &'static [u8]| Frame::Connect {
        version: perch_wire::PROTOCOL_VERSION,
        clean_session: true,
        keepalive_s: 60,
        client_id: id,
        will: None,
    };
    // Wrong key; unknown client; every single-bit change of a good CONNECT;
    // every truncation; a clear part whose lengths overrun the datagram.
    let mut forger = Sealed::new(port, b"a", KEY_B, 1);
    forger.send(&connect(b"a"));
    assert_eq!(forger.recv_within(500), None, "wrong key answered");
    let mut stranger = Sealed::new(port, b"zz", KEY_A, 1);
    stranger.send(&connect(b"zz"));
    assert_eq!(stranger.recv_within(300), None);
    let mut genuine = Sealed::new(port, b"a", KEY_A, 5);
    let good = genuine.seal(&connect(b"a"));
    for at in 1..good.len() {
        let mut bad = good.clone();
        bad[at] ^= 0x80;
        forger.socket.send(&bad).expect("send");
        forger.socket.send(&good[..at]).expect("send");
    }
    for overrun in [
        &[0x01, 0x40, b'a', 1, 0, 0, 0, 1][..],
        &[0x01, 0xff, 0xff, 0xff, 0xff, 0x0f],
        &[
            0x01, 0x01, b'a', 1, 0, 0, 0, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01,
        ],
        &[0x01],
    ] {
        forger.socket.send(overrun).expect("send");
    }
    let mut oversized = good.clone();
    oversized.resize(1500, 0xaa);
    forger.socket.send(&oversized).expect("send");
    assert_eq!(forger.recv_within(500), None, "a forgery was answered");
    assert!(
        has_no_session(&forger.socket, port),
        "a forgery made a session"
    );
    // The genuine CONNECT works; the same bytes again (from anywhere) do not.
    genuine.socket.send(&good).expect("send");
    let reply = genuine.recv();
    assert!(matches!(
        decode_from_broker(&reply),
        Ok(Frame::Connack { code: Code::Ok, .. })
    ));
    let replayer = UdpSocket::bind("127.0.0.1:0").expect("bind");
    replayer.send_to(&good, ("127.0.0.1", port)).expect("send");
    assert!(
        has_no_session(&replayer, port),
        "a replayed CONNECT made a session"
    );
    let publish = genuine.send(&Frame::Publish {
        qos: Qos::AtLeastOnce,
        topic: TopicRef::Predefined(0),
        msg_id: 1,
        payload: b"x",
    });
    // Predefined 0 does not exist: a sealed PUBACK UNKNOWN_TOPIC.
    assert!(matches!(
        decode_from_broker(&genuine.recv()),
        Ok(Frame::Puback {
            code: Code::UnknownTopic,
            ..
        })
    ));
    genuine.socket.send(&publish).expect("send");
    assert_eq!(
        genuine.recv_within(500),
        None,
        "a replayed PUBLISH was answered"
    );
    // Still connected: register and publish for real.
    genuine.send(&Frame::Register {
        id: 1,
        subject: b"t.a.temp",
    });
    let Ok(Frame::Regack { topic, .. }) = decode_from_broker(&genuine.recv()) else {
        panic!("no REGACK");
    };
    genuine.send(&Frame::Publish {
        qos: Qos::AtMostOnce,
        topic: TopicRef::Registered(topic),
        msg_id: 0,
        payload: b"ok",
    });
    assert_eq!(sub.read_line(), "MSG t.a.temp 1 2");
    assert_eq!(sub.read_line(), "ok");
}

#[test]
fn client_templates_keep_each_device_to_its_own_subjects() {
    let (server, port, _dir) = keyed_broker(true);
    let mut sub = nats(&server);
    subscribe_nats(&mut sub, ">");
    let mut a = Sealed::new(port, b"a", KEY_A, 1);
    a.connect();
    for (req_id, subject, want) in [
        (1, "t.b.temp", Code::NotPermitted),
        (2, "t.a.temp", Code::Ok),
    ] {
        a.send(&Frame::Register {
            id: req_id,
            subject: subject.as_bytes(),
        });
        let Ok(Frame::Regack { topic, .. }) = decode_from_broker(&a.recv()) else {
            panic!("no REGACK");
        };
        a.send(&Frame::Publish {
            qos: Qos::AtLeastOnce,
            topic: TopicRef::Registered(topic),
            msg_id: req_id,
            payload: b"v",
        });
        match decode_from_broker(&a.recv()) {
            Ok(Frame::Puback { code, .. }) => assert_eq!(code, want, "{subject}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(sub.read_line(), "MSG t.a.temp 1 1");
    assert_eq!(sub.read_line(), "v");
    for (filter, want) in [
        ("cmd.a.>", Code::Ok),
        ("cmd.b.>", Code::NotPermitted),
        (">", Code::NotPermitted),
    ] {
        a.send(&Frame::Subscribe {
            req_id: 9,
            max_qos: Qos::AtMostOnce,
            filter: filter.as_bytes(),
        });
        match decode_from_broker(&a.recv()) {
            Ok(Frame::Suback { code, .. }) => assert_eq!(code, want, "{filter}"),
            other => panic!("{other:?}"),
        }
    }
}

/// Thousands of source addresses send every kind of unverified datagram:
/// no reply is larger than its datagram, the broker's memory stays flat
/// (measured), and a keyed device is served throughout.
#[test]
fn a_flood_of_unverified_datagrams_keeps_memory_flat_and_reflects_nothing_larger() {
    let (server, port, _dir) = keyed_broker(true);
    let mut sub = nats(&server);
    subscribe_nats(&mut sub, "t.>");
    let mut a = Sealed::new(port, b"a", KEY_A, 1);
    a.connect();
    let rss_before = server.rss_kib();
    let target = ("127.0.0.1", port);
    let sockets: Vec<UdpSocket> = (0..2000)
        .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let mut forger = Sealed::new(port, b"a", KEY_B, 1);
    let mut sent = 0usize;
    let started = Instant::now();
    let mut largest_by_socket = vec![0usize; sockets.len()];
    for round in 0..4 {
        for (i, socket) in sockets.iter().enumerate() {
            let bytes = match round {
                0 => forger.seal(&Frame::Connect {
                    version: 1,
                    clean_session: true,
                    keepalive_s: 0,
                    client_id: b"a",
                    will: None,
                }),
                1 => vec![0x11, 0x01, 0x00, 0x01, b'x'], // plain CONNECT, 5 bytes
                2 => vec![0xb0],                         // plain PING
                _ => vec![0x01, 0x01, b'a', i as u8, 0, 0, 0, 1, 0, 0],
            };
            largest_by_socket[i] = largest_by_socket[i].max(bytes.len());
            socket.send_to(&bytes, target).expect("send");
            sent += 1;
        }
    }
    let elapsed = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let (mut answered, mut answered_bytes) = (0usize, 0usize);
    for (i, socket) in sockets.iter().enumerate() {
        socket.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 2048];
        while let Ok(n) = socket.recv(&mut buf) {
            // Each socket sent one datagram per round; an answer is never
            // larger than the largest it sent (per datagram: the gateway test).
            assert!(
                n <= largest_by_socket[i],
                "{n}-byte answer: {:02x?}",
                &buf[..n]
            );
            answered += 1;
            answered_bytes += n;
        }
    }
    let rss_after = server.rss_kib();
    eprintln!(
        "device flood: {sent} datagrams from {} addresses in {elapsed:?}; {answered} answers \
         ({answered_bytes} bytes); RSS {rss_before} -> {rss_after} KiB",
        sockets.len()
    );
    assert!(
        rss_after < rss_before + 2048,
        "RSS grew from {rss_before} KiB to {rss_after} KiB under the flood"
    );
    // The keyed device is still served.
    a.send(&Frame::Publish {
        qos: Qos::AtLeastOnce,
        topic: TopicRef::Predefined(0),
        msg_id: 1,
        payload: b"x",
    });
    assert!(matches!(
        decode_from_broker(&a.recv()),
        Ok(Frame::Puback { .. })
    ));
}

/// The C client (firmware-clients/c, its host examples) with a key: its own
/// ChaCha20-Poly1305 against the broker's RustCrypto one, both directions.
#[test]
fn keyed_c_clients_reach_nats_and_back() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let c_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/firmware-clients/c");
    let status = Command::new("make")
        .args(["-s", "-C", c_dir])
        .status()
        .expect("run make for the C client");
    assert!(status.success(), "make -C firmware-clients/c");
    let (server, port, dir) = keyed_broker(true);
    let key_file = dir.path.join("b.key");
    let mut sub = nats(&server);
    subscribe_nats(&mut sub, "t.>");
    let port_text = port.to_string();
    // sensor_pub as device b: `key` sealing or not, then payload, count, QoS.
    let sensor_pub = |key: Option<&std::path::Path>, timeout_ms: &str, rest: [&str; 3]| {
        let mut command = Command::new(format!("{c_dir}/build/host/sensor_pub"));
        if let Some(key) = key {
            command.env("PERCH_KEY_FILE", key);
        }
        command
            .args([
                "--timeout-ms",
                timeout_ms,
                "127.0.0.1",
                &port_text,
                "b",
                "t.b.temp",
            ])
            .args(rest)
            .output()
            .expect("run sensor_pub")
    };
    let output = sensor_pub(Some(&key_file), "10000", ["21.{n}", "3", "1"]);
    assert!(
        output.status.success(),
        "sensor_pub: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    for n in 1..=3 {
        assert_eq!(sub.read_line(), "MSG t.b.temp 1 4");
        assert_eq!(sub.read_line(), format!("21.{n}"));
    }
    // Its epoch file moved on: a second run right away is not a replay.
    let again = sensor_pub(Some(&key_file), "10000", ["x", "1", "1"]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(sub.read_line(), "MSG t.b.temp 1 1");
    assert_eq!(sub.read_line(), "x");
    let mut child = Command::new(format!("{c_dir}/build/host/sensor_sub"))
        .env("PERCH_KEY_FILE", &key_file)
        .args([
            "--timeout-ms",
            "10000",
            "127.0.0.1",
            &port_text,
            "b",
            "cmd.b.>",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sensor_sub");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut ready = String::new();
    while !ready.contains("subscribed to") {
        ready.clear();
        if stderr.read_line(&mut ready).expect("sensor_sub stderr") == 0 {
            panic!("sensor_sub ended before subscribing");
        }
    }
    sub.send(b"PUB cmd.b.go 2\r\ngo\r\n");
    let output = child.wait_with_output().expect("sensor_sub exits after 1");
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "go");
    // Without the key the C client gets nowhere (require_key).
    let plain = sensor_pub(None, "1500", ["no", "1", "1"]);
    assert!(!plain.status.success(), "a plain C client got through");
}
