//! The device protocol against the real broker: devices speak UDP datagrams
//! built with `perch-wire` (the crate firmware links), NATS clients on the
//! other side use the raw NATS protocol. Sessions are owned by the shard of
//! their client id, so with several client ids and source ports these also
//! cover datagrams that reach a shard which forwards them to the owner.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use perch_wire::{decode_from_broker, Code, Frame, Qos, TopicRef, Will};

use crate::support::{free_port, Raw, Server, TempDir};

/// How long a device waits for an expected datagram.
const REPLY_MS_MAX: u64 = 3_000;

struct Device {
    socket: UdpSocket,
}

impl Device {
    fn new(port: u16) -> Device {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind device socket");
        socket
            .connect(("127.0.0.1", port))
            .expect("connect device socket");
        Device { socket }
    }

    fn send(&self, frame: &Frame<'_>) {
        let mut buf = vec![0u8; frame.encoded_len()];
        let n = frame.encode(&mut buf).expect("encode");
        self.socket.send(&buf[..n]).expect("send datagram");
    }

    fn send_raw(&self, bytes: &[u8]) {
        self.socket.send(bytes).expect("send datagram");
    }

    /// The next datagram, decoded (owned copy), or None after `wait_ms`.
    fn recv_within(&self, wait_ms: u64) -> Option<Vec<u8>> {
        self.socket
            .set_read_timeout(Some(Duration::from_millis(wait_ms)))
            .ok();
        let mut buf = [0u8; 2048];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(_) => None,
        }
    }

    fn recv(&self) -> Vec<u8> {
        self.recv_within(REPLY_MS_MAX)
            .expect("a datagram from the broker")
    }

    fn connect(&self, client_id: &str, keepalive_s: u32, will: Option<Will<'_>>) -> u32 {
        self.connect_with(client_id, keepalive_s, will, true)
    }

    fn connect_with(
        &self,
        client_id: &str,
        keepalive_s: u32,
        will: Option<Will<'_>>,
        clean_session: bool,
    ) -> u32 {
        self.send(&Frame::Connect {
            version: perch_wire::PROTOCOL_VERSION,
            clean_session,
            keepalive_s,
            client_id: client_id.as_bytes(),
            will,
        });
        let reply = self.recv();
        match decode_from_broker(&reply).expect("CONNACK decodes") {
            Frame::Connack {
                code: Code::Ok,
                session_token,
                ..
            } => session_token,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn register(&self, req_id: u32, subject: &str) -> u32 {
        self.send(&Frame::Register {
            id: req_id,
            subject: subject.as_bytes(),
        });
        let reply = self.recv();
        match decode_from_broker(&reply).expect("REGACK decodes") {
            Frame::Regack {
                req_id: r,
                topic,
                code: Code::Ok,
            } if r == req_id => topic,
            other => panic!("expected REGACK, got {other:?}"),
        }
    }

    fn subscribe(&self, req_id: u32, filter: &str) {
        self.subscribe_at(req_id, filter, Qos::AtMostOnce);
    }

    fn subscribe_at(&self, req_id: u32, filter: &str, max_qos: Qos) {
        self.send(&Frame::Subscribe {
            req_id,
            max_qos,
            filter: filter.as_bytes(),
        });
        let reply = self.recv();
        match decode_from_broker(&reply).expect("SUBACK decodes") {
            Frame::Suback {
                req_id: r,
                code: Code::Ok,
            } if r == req_id => {}
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// The next message for the device: (subject registered for it, reply
    /// handle, payload). A REGISTER before it names the subject.
    fn next_message(&self, topics: &mut Vec<(u32, String)>) -> (String, Option<u32>, Vec<u8>) {
        loop {
            let datagram = self.recv();
            match decode_from_broker(&datagram).expect("broker frame decodes") {
                Frame::Register { id, subject } => {
                    // The broker holds the message until the device confirms.
                    topics.push((id, String::from_utf8_lossy(subject).into_owned()));
                    self.send(&Frame::Regack {
                        req_id: id,
                        topic: id,
                        code: Code::Ok,
                    });
                }
                Frame::Deliver {
                    topic,
                    reply_handle,
                    payload,
                    ..
                } => {
                    let id = topic.id();
                    let subject = topics
                        .iter()
                        .find(|(t, _)| *t == id)
                        .map(|(_, s)| s.clone())
                        .unwrap_or_else(|| panic!("message on unregistered topic {id}"));
                    return (subject, reply_handle, payload.to_vec());
                }
                other => panic!("expected REGISTER or a message, got {other:?}"),
            }
        }
    }
}

/// What a device got between sending PING and the broker's PONG, acting as a
/// firmware does: REGACK every REGISTER, PUBACK every QoS 1 message (when
/// `ack`). Returns (msg id, payload) of the QoS 1 messages, in arrival order,
/// and waits on after the PONG while REGISTERs are outstanding.
fn wake_and_collect(device: &Device, ack: bool) -> Vec<(u32, Vec<u8>)> {
    device.send(&Frame::Ping);
    let mut got = Vec::new();
    let mut ponged = false;
    let mut regacked_after_pong = false;
    loop {
        let wait = if ponged && !regacked_after_pong {
            300
        } else {
            REPLY_MS_MAX
        };
        let Some(datagram) = device.recv_within(wait) else {
            assert!(ponged, "no PONG from the broker");
            return got;
        };
        match decode_from_broker(&datagram).expect("broker frame decodes") {
            Frame::Register { id, .. } => {
                device.send(&Frame::Regack {
                    req_id: id,
                    topic: id,
                    code: Code::Ok,
                });
                regacked_after_pong = !ponged;
            }
            Frame::Deliver {
                qos: Qos::AtLeastOnce,
                msg_id,
                payload,
                ..
            } => {
                if ack {
                    device.send(&Frame::Puback {
                        msg_id,
                        code: Code::Ok,
                    });
                }
                got.push((msg_id, payload.to_vec()));
            }
            Frame::Pong => {
                ponged = true;
                if got.is_empty() && !regacked_after_pong {
                    // Messages whose subject needed a REGISTER follow its REGACK.
                    regacked_after_pong = false;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn nats(server: &Server) -> Raw {
    let mut raw = Raw::connect(server);
    raw.send(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n");
    raw
}

/// A NATS connection that speaks headers (HPUB, HMSG).
fn nats_with_headers(server: &Server) -> Raw {
    let mut raw = Raw::connect(server);
    raw.send(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true}\r\n");
    raw
}

fn subscribe_nats(raw: &mut Raw, subject: &str) {
    raw.send(format!("SUB {subject} 1\r\nPING\r\n").as_bytes());
    assert_eq!(raw.read_line(), "PONG");
}

/// perch with devices on a free UDP port (and a config file for `extra_toml`).
fn broker(extra_toml: &str, shards: &str) -> (Server, u16, TempDir) {
    let port = free_port();
    let dir = TempDir::new("device");
    let conf = dir.path.join("perch.toml");
    std::fs::write(
        &conf,
        format!("[device]\nudp = \"127.0.0.1:{port}\"\n{extra_toml}"),
    )
    .expect("write config");
    let conf = conf.to_string_lossy().into_owned();
    let server = Server::perch(&["--shards", shards, "--config", &conf]);
    (server, port, dir)
}

#[test]
fn device_publishes_reach_nats_subscribers_once() {
    let (server, port, _dir) = broker("", "2");
    let mut sub = nats(&server);
    subscribe_nats(&mut sub, "sensors.>");
    // Several devices: their client ids spread over both shards' sessions.
    for d in 0..4 {
        let device = Device::new(port);
        let id = format!("dev{d}");
        device.connect(&id, 30, None);
        let subject = format!("sensors.{id}.temp");
        let topic = device.register(1, &subject);
        device.send(&Frame::Publish {
            qos: Qos::AtMostOnce,
            topic: TopicRef::Registered(topic),
            msg_id: 0,
            payload: b"21.5",
        });
        assert_eq!(sub.read_line(), format!("MSG {subject} 1 4"));
        assert_eq!(sub.read_line(), "21.5");
        // QoS 1: acked; a retransmit of the same id is acked again, routed once.
        for _ in 0..2 {
            device.send(&Frame::Publish {
                qos: Qos::AtLeastOnce,
                topic: TopicRef::Registered(topic),
                msg_id: 7,
                payload: b"22",
            });
            let ack = device.recv();
            assert_eq!(
                decode_from_broker(&ack).expect("PUBACK"),
                Frame::Puback {
                    msg_id: 7,
                    code: Code::Ok
                }
            );
        }
        assert_eq!(sub.read_line(), format!("MSG {subject} 1 2"));
        assert_eq!(sub.read_line(), "22");
    }
    sub.send(b"PING\r\n");
    assert_eq!(sub.read_line(), "PONG", "no duplicate was delivered");
}

/// The 6-byte QoS 0 publish of the overhead goal, byte for byte.
#[test]
fn smallest_publish_is_six_bytes() {
    let (server, port, _dir) = broker("", "1");
    let mut sub = nats(&server);
    subscribe_nats(&mut sub, "t");
    let device = Device::new(port);
    device.connect("tiny", 30, None);
    let topic = device.register(1, "t");
    assert!(topic < 128);
    let datagram = [0x30, topic as u8, b'a', b'b', b'c', b'd'];
    device.send_raw(&datagram);
    assert_eq!(sub.read_line(), "MSG t 1 4");
    assert_eq!(sub.read_line(), "abcd");
}

#[test]
fn predefined_ids_and_connectionless_publish() {
    let (server, port, _dir) = broker(
        "[device.predefined]\n\"1\" = \"sensors.{client}.temp\"\n\"2\" = \"fleet.alarm\"\n",
        "2",
    );
    let mut sub = nats(&server);
    subscribe_nats(&mut sub, ">");
    let device = Device::new(port);
    device.connect("node7", 30, None);
    device.send(&Frame::Publish {
        qos: Qos::AtMostOnce,
        topic: TopicRef::Predefined(1),
        msg_id: 0,
        payload: b"5",
    });
    assert_eq!(sub.read_line(), "MSG sensors.node7.temp 1 1");
    assert_eq!(sub.read_line(), "5");
    // No session at all: the smallest devices.
    let anonymous = Device::new(port);
    anonymous.send(&Frame::PublishAnonymous {
        client_id: b"beacon3",
        topic: 1,
        payload: b"9",
    });
    assert_eq!(sub.read_line(), "MSG sensors.beacon3.temp 1 1");
    assert_eq!(sub.read_line(), "9");
    // An unknown predefined id is refused with a code, QoS 1 in its PUBACK.
    device.send(&Frame::Publish {
        qos: Qos::AtLeastOnce,
        topic: TopicRef::Predefined(99),
        msg_id: 3,
        payload: b"x",
    });
    assert_eq!(
        decode_from_broker(&device.recv()).expect("PUBACK"),
        Frame::Puback {
            msg_id: 3,
            code: Code::UnknownTopic
        }
    );
}

#[test]
fn devices_receive_subscribed_messages_and_answer_requests() {
    let (server, port, _dir) = broker("", "2");
    let device = Device::new(port);
    device.connect("dev42", 30, None);
    device.subscribe(1, "dev.dev42.>");
    let mut topics = Vec::new();
    let mut nats_client = nats(&server);
    nats_client.send(b"PUB dev.dev42.led 2\r\non\r\n");
    let (subject, reply, payload) = device.next_message(&mut topics);
    assert_eq!(
        (subject.as_str(), reply, payload.as_slice()),
        ("dev.dev42.led", None, &b"on"[..])
    );
    // A NATS request reaches the device with a reply handle; its answer
    // reaches the requester.
    subscribe_nats(&mut nats_client, "_INBOX.req.*");
    nats_client.send(b"PUB dev.dev42.cmd _INBOX.req.1 4\r\nping\r\n");
    let (subject, reply, payload) = device.next_message(&mut topics);
    assert_eq!(
        (subject.as_str(), payload.as_slice()),
        ("dev.dev42.cmd", &b"ping"[..])
    );
    let handle = reply.expect("a request carries a reply handle");
    device.send(&Frame::Publish {
        qos: Qos::AtMostOnce,
        topic: TopicRef::Reply(handle),
        msg_id: 0,
        payload: b"pong",
    });
    assert_eq!(nats_client.read_line(), "MSG _INBOX.req.1 1 4");
    assert_eq!(nats_client.read_line(), "pong");
    // Unsubscribed: nothing more arrives.
    device.send(&Frame::Unsubscribe {
        req_id: 2,
        filter: b"dev.dev42.>",
    });
    assert!(matches!(
        decode_from_broker(&device.recv()),
        Ok(Frame::Unsuback {
            req_id: 2,
            code: Code::Ok
        })
    ));
    nats_client.send(b"PUB dev.dev42.led 3\r\noff\r\nPING\r\n");
    assert_eq!(nats_client.read_line(), "PONG");
    assert_eq!(device.recv_within(300), None);
}

#[test]
fn a_sleeping_device_gets_its_messages_when_it_wakes() {
    let (server, port, _dir) = broker("", "2");
    let device = Device::new(port);
    device.connect("sleeper", 30, None);
    device.subscribe(1, "cmd.sleeper");
    device.send(&Frame::Disconnect { sleep_s: Some(60) });
    assert!(matches!(
        decode_from_broker(&device.recv()),
        Ok(Frame::Disconnect { .. })
    ));
    let mut nats_client = nats(&server);
    nats_client.send(
        b"PUB cmd.sleeper 1\r\na\r\nPUB cmd.sleeper 1\r\nb\r\nPUB cmd.sleeper 1\r\nc\r\nPING\r\n",
    );
    assert_eq!(nats_client.read_line(), "PONG");
    assert_eq!(
        device.recv_within(300),
        None,
        "nothing is sent to a sleeper"
    );
    device.send(&Frame::Ping);
    // What was buffered (the REGISTER of the subject), then PONG; the
    // device's REGACK releases the held messages, in order.
    let topic = match decode_from_broker(&device.recv()) {
        Ok(Frame::Register {
            id,
            subject: b"cmd.sleeper",
        }) => id,
        other => panic!("expected the buffered REGISTER, got {other:?}"),
    };
    assert!(matches!(
        decode_from_broker(&device.recv()),
        Ok(Frame::Pong)
    ));
    device.send(&Frame::Regack {
        req_id: topic,
        topic,
        code: Code::Ok,
    });
    let mut topics = vec![(topic, "cmd.sleeper".to_string())];
    for want in [b"a", b"b", b"c"] {
        let (subject, _, payload) = device.next_message(&mut topics);
        assert_eq!(
            (subject.as_str(), payload.as_slice()),
            ("cmd.sleeper", &want[..])
        );
    }
}

#[test]
fn a_lost_session_publishes_its_will() {
    let (server, port, _dir) = broker("", "2");
    let mut sub = nats(&server);
    subscribe_nats(&mut sub, "status.>");
    let device = Device::new(port);
    device.connect(
        "fragile",
        1,
        Some(Will {
            qos: Qos::AtMostOnce,
            subject: b"status.fragile",
            payload: b"gone",
        }),
    );
    let started = Instant::now();
    // Silence: after 1.5 keepalives the broker gives up on it.
    assert_eq!(sub.read_line(), "MSG status.fragile 1 4");
    assert_eq!(sub.read_line(), "gone");
    assert!(started.elapsed() >= Duration::from_millis(1_400));
    // The session is gone.
    device.send(&Frame::Ping);
    assert!(matches!(
        decode_from_broker(&device.recv()),
        Ok(Frame::Error {
            code: Code::UnknownSession,
            ..
        })
    ));
}

#[test]
fn a_device_resumes_its_session_from_a_new_address() {
    let (server, port, _dir) = broker("", "2");
    let mut sub = nats(&server);
    subscribe_nats(&mut sub, "nb.>");
    let first = Device::new(port);
    let token = first.connect("nbiot1", 30, None);
    let topic = first.register(1, "nb.nbiot1");
    // NAT rebinding: same device, new source port.
    let second = Device::new(port);
    second.send(&Frame::Publish {
        qos: Qos::AtMostOnce,
        topic: TopicRef::Registered(topic),
        msg_id: 0,
        payload: b"x",
    });
    assert!(matches!(
        decode_from_broker(&second.recv()),
        Ok(Frame::Error {
            code: Code::UnknownSession,
            ..
        })
    ));
    second.send(&Frame::Resume {
        session_token: token,
    });
    assert_eq!(
        decode_from_broker(&second.recv()).expect("CONNACK"),
        Frame::Connack {
            session_present: true,
            code: Code::Ok,
            session_token: token
        }
    );
    second.send(&Frame::Publish {
        qos: Qos::AtMostOnce,
        topic: TopicRef::Registered(topic),
        msg_id: 0,
        payload: b"y",
    });
    assert_eq!(sub.read_line(), "MSG nb.nbiot1 1 1");
    assert_eq!(sub.read_line(), "y");
}

#[test]
fn bad_datagrams_get_codes_and_change_nothing() {
    let (server, port, _dir) = broker("", "2");
    let mut sub = nats(&server);
    subscribe_nats(&mut sub, ">");
    let device = Device::new(port);
    // Garbage, a truncated CONNECT, a huge declared length: clear errors.
    for bad in [
        &[0x00u8][..],
        &[0x10, 0x01],
        &[0x3F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
    ] {
        device.send_raw(bad);
        assert!(matches!(
            decode_from_broker(&device.recv()),
            Ok(Frame::Error {
                code: Code::Malformed,
                ..
            })
        ));
    }
    // Frames before CONNECT: no session.
    device.send(&Frame::Ping);
    assert!(matches!(
        decode_from_broker(&device.recv()),
        Ok(Frame::Error {
            code: Code::UnknownSession,
            ..
        })
    ));
    device.connect("ok1", 30, None);
    // An unregistered id, an invalid subject, a version from the future.
    device.send(&Frame::Publish {
        qos: Qos::AtLeastOnce,
        topic: TopicRef::Registered(9),
        msg_id: 1,
        payload: b"x",
    });
    assert!(matches!(
        decode_from_broker(&device.recv()),
        Ok(Frame::Puback {
            msg_id: 1,
            code: Code::UnknownTopic
        })
    ));
    device.send(&Frame::Register {
        id: 5,
        subject: b"a..b",
    });
    assert!(matches!(
        decode_from_broker(&device.recv()),
        Ok(Frame::Regack {
            req_id: 5,
            code: Code::InvalidSubject,
            ..
        })
    ));
    let other = Device::new(port);
    other.send(&Frame::Connect {
        version: 9,
        clean_session: true,
        keepalive_s: 30,
        client_id: b"future",
        will: None,
    });
    assert!(matches!(
        decode_from_broker(&other.recv()),
        Ok(Frame::Connack {
            code: Code::UnsupportedVersion,
            ..
        })
    ));
    // Nothing reached the NATS side, and the broker still serves.
    sub.send(b"PING\r\n");
    assert_eq!(sub.read_line(), "PONG");
    let topic = device.register(2, "still.fine");
    device.send(&Frame::Publish {
        qos: Qos::AtMostOnce,
        topic: TopicRef::Registered(topic),
        msg_id: 0,
        payload: b"1",
    });
    assert_eq!(sub.read_line(), "MSG still.fine 1 1");
    assert_eq!(sub.read_line(), "1");
}

/// A raw NATS request: the reply's payload.
fn request(raw: &mut Raw, subject: &str, body: &str) -> String {
    raw.send(format!("PUB {subject} _INBOX.dev.t {}\r\n{body}\r\n", body.len()).as_bytes());
    let line = raw.read_line();
    assert!(
        line.starts_with("MSG _INBOX.dev.t 9 "),
        "expected the reply, got {line:?}"
    );
    raw.read_line()
}

/// QoS 1 into a stream: each PUBACK comes after the stream's fsync, so
/// everything acked is there after kill -9 and a restart (and a retransmit
/// is stored once, however the broker restarted in between).
#[test]
fn acked_device_publishes_survive_kill_9() {
    let port = free_port();
    let dir = TempDir::new("device-store");
    let store = dir.path.join("store");
    std::fs::create_dir_all(&store).expect("store dir");
    let conf = dir.path.join("perch.toml");
    std::fs::write(&conf, format!("[device]\nudp = \"127.0.0.1:{port}\"\n")).expect("write config");
    let args = [
        "--config",
        conf.to_str().expect("utf-8"),
        "--store-dir",
        store.to_str().expect("utf-8"),
    ];
    let server = Server::perch(&args);
    let mut nats_client = nats(&server);
    subscribe_nats(&mut nats_client, "_INBOX.dev.t");
    nats_client.send(b"UNSUB 1\r\nSUB _INBOX.dev.t 9\r\nPING\r\n");
    assert_eq!(nats_client.read_line(), "PONG");
    let created = request(
        &mut nats_client,
        "$JS.API.STREAM.CREATE.READINGS",
        r#"{"name":"READINGS","subjects":["sensors.>"]}"#,
    );
    assert!(
        created.contains("\"type\":\"io.nats.jetstream.api.v1.stream_create_response\""),
        "{created}"
    );

    let device = Device::new(port);
    device.connect("meter1", 30, None);
    let topic = device.register(1, "sensors.meter1.kwh");
    let acked = 40u32;
    for msg_id in 1..=acked {
        device.send(&Frame::Publish {
            qos: Qos::AtLeastOnce,
            topic: TopicRef::Registered(topic),
            msg_id,
            payload: format!("{msg_id}").as_bytes(),
        });
        assert_eq!(
            decode_from_broker(&device.recv()).expect("PUBACK"),
            Frame::Puback {
                msg_id,
                code: Code::Ok
            }
        );
    }
    server.kill9();

    let server = Server::perch(&args);
    // The device lost its session with the broker; it reconnects and
    // retransmits its last publish, as a device whose PUBACK was lost would.
    let device = Device::new(port);
    device.connect("meter1", 30, None);
    let topic = device.register(1, "sensors.meter1.kwh");
    device.send(&Frame::Publish {
        qos: Qos::AtLeastOnce,
        topic: TopicRef::Registered(topic),
        msg_id: acked,
        payload: format!("{acked}").as_bytes(),
    });
    assert!(matches!(
        decode_from_broker(&device.recv()),
        Ok(Frame::Puback { code: Code::Ok, .. })
    ));
    let mut nats_client = nats(&server);
    subscribe_nats(&mut nats_client, "_INBOX.dev.x");
    nats_client.send(b"SUB _INBOX.dev.t 9\r\nPING\r\n");
    assert_eq!(nats_client.read_line(), "PONG");
    let info = request(&mut nats_client, "$JS.API.STREAM.INFO.READINGS", "");
    let info: serde_json::Value = serde_json::from_str(&info).expect("stream info JSON");
    assert_eq!(
        info["state"]["messages"],
        serde_json::json!(acked),
        "every acked publish, once: {info}"
    );
}

/// The same protocol over TCP: frames with a varint length.
#[test]
fn devices_speak_tcp_too() {
    use std::io::{Read, Write};
    let port = free_port();
    let server = Server::perch(&["--device-tcp", &format!("127.0.0.1:{port}")]);
    let mut sub = nats(&server);
    subscribe_nats(&mut sub, "tcp.>");
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the device port");
    stream
        .set_read_timeout(Some(Duration::from_millis(REPLY_MS_MAX)))
        .ok();
    let send = |stream: &mut std::net::TcpStream, frame: &Frame<'_>| {
        let mut buf = vec![0u8; frame.encoded_len() + perch_wire::tcp::PREFIX_BYTES_MAX];
        let n = perch_wire::tcp::encode(frame, &mut buf).expect("encode");
        stream.write_all(&buf[..n]).expect("write");
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut recv = |stream: &mut std::net::TcpStream| -> Vec<u8> {
        loop {
            if let Some(Ok((frame, used))) = perch_wire::tcp::split_frame(&pending) {
                let frame = frame.to_vec();
                pending.drain(..used);
                return frame;
            }
            let mut chunk = [0u8; 512];
            let n = stream.read(&mut chunk).expect("a frame from the broker");
            assert!(n > 0, "the broker closed the device connection");
            pending.extend_from_slice(&chunk[..n]);
        }
    };
    send(
        &mut stream,
        &Frame::Connect {
            version: perch_wire::PROTOCOL_VERSION,
            clean_session: true,
            keepalive_s: 30,
            client_id: b"wired",
            will: None,
        },
    );
    assert!(matches!(
        decode_from_broker(&recv(&mut stream)),
        Ok(Frame::Connack { code: Code::Ok, .. })
    ));
    // Two frames in one write, then a reply to each.
    let mut both = Vec::new();
    for frame in [
        Frame::Register {
            id: 1,
            subject: b"tcp.wired",
        },
        Frame::Subscribe {
            req_id: 2,
            max_qos: Qos::AtMostOnce,
            filter: b"cmd.wired",
        },
    ] {
        let mut buf = vec![0u8; 64];
        let n = perch_wire::tcp::encode(&frame, &mut buf).expect("encode");
        both.extend_from_slice(&buf[..n]);
    }
    stream.write_all(&both).expect("write");
    let topic = match decode_from_broker(&recv(&mut stream)) {
        Ok(Frame::Regack {
            topic,
            code: Code::Ok,
            ..
        }) => topic,
        other => panic!("expected REGACK, got {other:?}"),
    };
    assert!(matches!(
        decode_from_broker(&recv(&mut stream)),
        Ok(Frame::Suback {
            req_id: 2,
            code: Code::Ok
        })
    ));
    send(
        &mut stream,
        &Frame::Publish {
            qos: Qos::AtMostOnce,
            topic: TopicRef::Registered(topic),
            msg_id: 0,
            payload: b"on the wire",
        },
    );
    assert_eq!(sub.read_line(), "MSG tcp.wired 1 11");
    assert_eq!(sub.read_line(), "on the wire");
    sub.send(b"PUB cmd.wired 2\r\ngo\r\n");
    let id = match decode_from_broker(&recv(&mut stream)) {
        Ok(Frame::Register {
            id,
            subject: b"cmd.wired",
        }) => id,
        other => panic!("expected REGISTER, got {other:?}"),
    };
    send(
        &mut stream,
        &Frame::Regack {
            req_id: id,
            topic: id,
            code: Code::Ok,
        },
    );
    assert!(matches!(
        decode_from_broker(&recv(&mut stream)),
        Ok(Frame::Deliver { payload: b"go", .. })
    ));
    // A length prefix over the limit cannot be resynchronised: closed.
    stream.write_all(&[0xFF, 0xFF, 0x7F]).expect("write");
    let mut rest = [0u8; 16];
    assert_eq!(
        stream.read(&mut rest).unwrap_or(0),
        0,
        "closed after a bad prefix"
    );
}

/// A pseudo-terminal pair: the broker opens the device end as a serial line.
struct Pty {
    master: std::fs::File,
    device_path: String,
}

impl Pty {
    fn open() -> Pty {
        use std::os::fd::FromRawFd;
        // SAFETY: posix_openpt/grantpt/unlockpt/ptsname on a fresh master fd;
        // ptsname's static buffer is copied out at once.
        unsafe {
            let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
            assert!(fd >= 0, "posix_openpt");
            assert_eq!(libc::grantpt(fd), 0, "grantpt");
            assert_eq!(libc::unlockpt(fd), 0, "unlockpt");
            let name = libc::ptsname(fd);
            assert!(!name.is_null(), "ptsname");
            let device_path = std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned();
            // The line must be raw on the test's side too (no echo, no CR/LF games).
            let mut tio: libc::termios = std::mem::zeroed();
            libc::tcgetattr(fd, &mut tio);
            libc::cfmakeraw(&mut tio);
            libc::tcsetattr(fd, libc::TCSANOW, &tio);
            Pty {
                master: std::fs::File::from_raw_fd(fd),
                device_path,
            }
        }
    }
}

/// The same protocol over a serial line (a pty here): COBS frames with a
/// CRC; noise and a corrupted frame are dropped and the line resynchronises.
#[test]
fn devices_speak_serial_lines() {
    use std::io::{Read, Write};
    let pty = Pty::open();
    let dir = TempDir::new("device-serial");
    let conf = dir.path.join("perch.toml");
    std::fs::write(
        &conf,
        format!(
            "[[device.serial]]\npath = \"{}\"\nbaud = 115200\n",
            pty.device_path
        ),
    )
    .expect("write config");
    let server = Server::perch(&["--config", conf.to_str().expect("utf-8")]);
    let mut sub = nats(&server);
    subscribe_nats(&mut sub, "serial.>");
    let mut master = pty.master.try_clone().expect("clone pty");
    let frame_bytes = |frame: &Frame<'_>| {
        let mut buf = vec![0u8; perch_wire::serial::encoded_len_max(frame.encoded_len())];
        let n = perch_wire::serial::encode(frame, &mut buf).expect("encode");
        buf.truncate(n);
        buf
    };
    let mut deframer = perch_wire::serial::Deframer::<2048>::new();
    let mut read_frame = |master: &mut std::fs::File| -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_millis(REPLY_MS_MAX);
        let mut chunk = [0u8; 256];
        loop {
            assert!(Instant::now() < deadline, "no frame on the serial line");
            let n = master.read(&mut chunk).expect("read pty");
            if let Some((frame, _rest)) = deframer.feed(&chunk[..n]) {
                return frame.to_vec();
            }
        }
    };
    // Line noise first, then a frame whose CRC is broken, then good frames.
    master
        .write_all(&[0x55, 0xAA, 0x13, 0x00])
        .expect("write pty");
    let mut bad = frame_bytes(&Frame::Ping);
    bad[1] ^= 0x40;
    master.write_all(&bad).expect("write pty");
    master
        .write_all(&frame_bytes(&Frame::Connect {
            version: perch_wire::PROTOCOL_VERSION,
            clean_session: true,
            keepalive_s: 30,
            client_id: b"uart0",
            will: None,
        }))
        .expect("write pty");
    assert!(matches!(
        decode_from_broker(&read_frame(&mut master)),
        Ok(Frame::Connack { code: Code::Ok, .. })
    ));
    master
        .write_all(&frame_bytes(&Frame::Register {
            id: 1,
            subject: b"serial.uart0",
        }))
        .expect("write pty");
    let topic = match decode_from_broker(&read_frame(&mut master)) {
        Ok(Frame::Regack {
            topic,
            code: Code::Ok,
            ..
        }) => topic,
        other => panic!("expected REGACK, got {other:?}"),
    };
    master
        .write_all(&frame_bytes(&Frame::Publish {
            qos: Qos::AtLeastOnce,
            topic: TopicRef::Registered(topic),
            msg_id: 1,
            payload: &[0, 1, 0, 2],
        }))
        .expect("write pty");
    assert!(matches!(
        decode_from_broker(&read_frame(&mut master)),
        Ok(Frame::Puback {
            msg_id: 1,
            code: Code::Ok
        })
    ));
    assert_eq!(sub.read_line(), "MSG serial.uart0 1 4");
}

/// Spoofed-source floods: thousands of datagrams from ever new ports (garbage,
/// CONNECTs that are never followed up, frames without sessions) answer at
/// most the ERROR budget, grow no memory, and leave real devices unaffected.
#[test]
fn floods_from_many_source_ports_change_nothing_for_others() {
    let (server, port, _dir) = broker("", "2");
    let mut sub = nats(&server);
    subscribe_nats(&mut sub, "ok.>");
    let device = Device::new(port);
    device.connect("steady", 30, None);
    let topic = device.register(1, "ok.steady");
    let rss_before = server.rss_kib();
    let target = ("127.0.0.1", port);
    let started = Instant::now();
    let sockets: Vec<UdpSocket> = (0..1500)
        .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind"))
        .collect();
    for (i, socket) in sockets.iter().enumerate() {
        socket
            .send_to(&[0xFF, i as u8, (i >> 8) as u8], target)
            .expect("send");
        socket.send_to(&[0xB0], target).expect("send"); // PING without a session
    }
    let elapsed_s = started.elapsed().as_secs() + 1;
    std::thread::sleep(Duration::from_millis(300));
    let mut answered = 0u64;
    for socket in &sockets {
        socket.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 64];
        while socket.recv(&mut buf).is_ok() {
            answered += 1;
        }
    }
    // 3000 bad datagrams: the per-shard budget bounds the answers (2 shards,
    // at most two budget windows per second of sending).
    let bound =
        2 * u64::from(perch::lite::gateway::UNSOLICITED_ERRORS_PER_SECOND_MAX) * (elapsed_s + 1);
    assert!(
        answered > 0 && answered <= bound,
        "{answered} answers, bound {bound}"
    );
    device.send(&Frame::Publish {
        qos: Qos::AtLeastOnce,
        topic: TopicRef::Registered(topic),
        msg_id: 1,
        payload: b"fine",
    });
    assert!(matches!(
        decode_from_broker(&device.recv()),
        Ok(Frame::Puback { code: Code::Ok, .. })
    ));
    assert_eq!(sub.read_line(), "MSG ok.steady 1 4");
    assert_eq!(sub.read_line(), "fine");
    let rss_after = server.rss_kib();
    assert!(
        rss_after < rss_before + 2048,
        "RSS grew from {rss_before} KiB to {rss_after} KiB under the flood"
    );
}

/// The official Rust client on the NATS side: async-nats requests reach a
/// device and get its answer; an async-nats subscriber sees device publishes.
#[test]
fn async_nats_requests_a_device_and_hears_it() {
    let (server, port, _dir) = broker("", "2");
    let device = Device::new(port);
    device.connect("pump7", 30, None);
    device.subscribe(1, "dev.pump7.>");
    let topic = device.register(2, "sensors.pump7.flow");
    let responder = std::thread::spawn(move || {
        let mut topics = Vec::new();
        let (subject, reply, payload) = device.next_message(&mut topics);
        assert_eq!(
            (subject.as_str(), payload.as_slice()),
            ("dev.pump7.speed", &b"get"[..])
        );
        device.send(&Frame::Publish {
            qos: Qos::AtMostOnce,
            topic: TopicRef::Reply(reply.expect("a reply handle")),
            msg_id: 0,
            payload: b"1450rpm",
        });
        device.send(&Frame::Publish {
            qos: Qos::AtMostOnce,
            topic: TopicRef::Registered(topic),
            msg_id: 0,
            payload: b"3.2",
        });
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        use futures::StreamExt;
        let client = async_nats::connect(server.url())
            .await
            .expect("async-nats connects");
        let mut readings = client.subscribe("sensors.>").await.expect("subscribe");
        client.flush().await.expect("flush");
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            client.request("dev.pump7.speed", "get".into()),
        )
        .await
        .expect("answered in time")
        .expect("request");
        assert_eq!(&answer.payload[..], b"1450rpm");
        let reading = tokio::time::timeout(Duration::from_secs(5), readings.next())
            .await
            .expect("a reading in time")
            .expect("subscription open");
        assert_eq!(
            (reading.subject.as_str(), &reading.payload[..]),
            ("sensors.pump7.flow", &b"3.2"[..])
        );
    });
    responder.join().expect("device thread");
}

/// async-nats, unchanged, on both sides of QoS 1: its publish with the
/// `Perch-Qos: 1` header reaches a QoS 1 device subscriber at QoS 1, and a
/// device's QoS 1 publish reaches it with that header.
#[test]
fn async_nats_and_devices_exchange_qos1_through_the_header() {
    let (server, port, _dir) = broker("", "2");
    let device = Device::new(port);
    device.connect("valve3", 30, None);
    device.subscribe_at(1, "dev.valve3.cmd", Qos::AtLeastOnce);
    let up = device.register(2, "sensors.valve3.t");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        use futures::StreamExt;
        let client = async_nats::connect(server.url())
            .await
            .expect("async-nats connects");
        let mut readings = client.subscribe("sensors.>").await.expect("subscribe");
        client.flush().await.expect("flush");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Perch-Qos", "1");
        client
            .publish_with_headers("dev.valve3.cmd", headers, "open".into())
            .await
            .expect("publish");
        client.flush().await.expect("flush");
        let mut topics = Vec::new();
        let delivered = loop {
            let frame = device.recv();
            match decode_from_broker(&frame).expect("broker frame decodes") {
                Frame::Register { id, subject } => {
                    topics.push((id, subject.to_vec()));
                    device.send(&Frame::Regack {
                        req_id: id,
                        topic: id,
                        code: Code::Ok,
                    });
                }
                Frame::Deliver {
                    qos,
                    msg_id,
                    payload,
                    ..
                } => break (qos, msg_id, payload.to_vec()),
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(
            (delivered.0, delivered.2.as_slice()),
            (Qos::AtLeastOnce, &b"open"[..])
        );
        device.send(&Frame::Puback {
            msg_id: delivered.1,
            code: Code::Ok,
        });
        device.send(&Frame::Publish {
            qos: Qos::AtLeastOnce,
            topic: TopicRef::Registered(up),
            msg_id: 1,
            payload: b"open:ok",
        });
        let reading = tokio::time::timeout(Duration::from_secs(5), readings.next())
            .await
            .expect("a reading in time")
            .expect("subscription open");
        assert_eq!(&reading.payload[..], b"open:ok");
        let qos = reading
            .headers
            .as_ref()
            .and_then(|h| h.get("Perch-Qos"))
            .map(|v| v.as_str().to_string());
        assert_eq!(qos.as_deref(), Some("1"));
    });
}

/// `perch device pub|sub`, the Rust firmware client on a host, against the
/// broker: over UDP and TCP, with a NATS client on the other side.
#[test]
fn device_cli_publishes_and_subscribes() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let port = free_port();
    let server = Server::perch(&[
        "--device-udp",
        &format!("127.0.0.1:{port}"),
        "--device-tcp",
        &format!("127.0.0.1:{port}"),
    ]);
    let addr = format!("127.0.0.1:{port}");
    let mut sub = nats(&server);
    subscribe_nats(&mut sub, "cli.>");
    for (transport, qos) in [("--udp", "1"), ("--tcp", "1"), ("--udp", "0")] {
        let status = crate::support::perch_command()
            .args([
                "device", "pub", transport, &addr, "--qos", qos, "--count", "3",
            ])
            .args(["--client-id", "cli1", "cli.reading", "42"])
            .status()
            .expect("run perch device pub");
        assert!(status.success(), "{transport} qos {qos}: {status}");
        for _ in 0..3 {
            assert_eq!(sub.read_line(), "MSG cli.reading 1 2");
            assert_eq!(sub.read_line(), "42");
        }
    }
    let mut child = crate::support::perch_command()
        .args([
            "device",
            "sub",
            "--tcp",
            &addr,
            "--count",
            "2",
            "--client-id",
            "cli2",
            "cli.cmd.*",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run perch device sub");
    let mut ready = String::new();
    BufReader::new(child.stderr.take().expect("stderr"))
        .read_line(&mut ready)
        .expect("sub's ready line");
    assert!(ready.contains("subscribed to cli.cmd.*"), "{ready}");
    sub.send(b"PUB cli.cmd.a 3\r\none\r\nPUB cli.cmd.b 3\r\ntwo\r\n");
    let output = child.wait_with_output().expect("sub exits after 2");
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout), "one\ntwo\n");
    // At QoS 1 (the client acknowledges; the broker would resend).
    let mut child = crate::support::perch_command()
        .args([
            "device", "sub", "--udp", &addr, "--qos", "1", "--count", "1",
        ])
        .args(["--client-id", "cli3", "cli.q1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run perch device sub --qos 1");
    let mut ready = String::new();
    BufReader::new(child.stderr.take().expect("stderr"))
        .read_line(&mut ready)
        .expect("sub's ready line");
    assert!(ready.contains("subscribed to cli.q1"), "{ready}");
    let mut headers_client = nats_with_headers(&server);
    headers_client.send(b"HPUB cli.q1 26 31\r\nNATS/1.0\r\nPerch-Qos: 1\r\n\r\nq1msg\r\n");
    let output = child.wait_with_output().expect("sub exits after 1");
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout), "q1msg\n");
    // No broker: a QoS 1 publish cannot be acknowledged, so it fails.
    let dead = free_port();
    let status = crate::support::perch_command()
        .args([
            "device",
            "pub",
            "--udp",
            &format!("127.0.0.1:{dead}"),
            "--qos",
            "1",
        ])
        .args(["--timeout-ms", "500", "cli.x", "1"])
        .status()
        .expect("run perch device pub");
    assert!(!status.success(), "no broker, no ack: must fail");
}

/// Downlink QoS 1 to an awake device: a NATS publisher asks for it with the
/// `Perch-Qos: 1` header; the broker resends the same msg id until the
/// device's PUBACK. A device's own QoS 1 publish carries the header to NATS
/// subscribers and reaches QoS 1 device subscribers at QoS 1.
#[test]
fn qos1_messages_to_devices_are_resent_until_acknowledged() {
    let (server, port, _dir) = broker("", "2");
    let device = Device::new(port);
    device.connect("q1dev", 30, None);
    device.subscribe_at(1, "cmd.q1dev", Qos::AtLeastOnce);
    let mut nats_client = nats_with_headers(&server);
    nats_client.send(b"HPUB cmd.q1dev 26 28\r\nNATS/1.0\r\nPerch-Qos: 1\r\n\r\nup\r\nPING\r\n");
    assert_eq!(nats_client.read_line(), "PONG");
    let topic = match decode_from_broker(&device.recv()) {
        Ok(Frame::Register { id, .. }) => id,
        other => panic!("expected REGISTER, got {other:?}"),
    };
    device.send(&Frame::Regack {
        req_id: topic,
        topic,
        code: Code::Ok,
    });
    let first = device.recv();
    let Ok(Frame::Deliver {
        qos: Qos::AtLeastOnce,
        msg_id,
        payload: b"up",
        ..
    }) = decode_from_broker(&first)
    else {
        panic!(
            "expected a QoS 1 delivery, got {:?}",
            decode_from_broker(&first)
        );
    };
    // Not acknowledged: the same message, same msg id, again (2 s later).
    let again = device.recv_within(4_000).expect("a retransmission");
    assert_eq!(again, first);
    device.send(&Frame::Puback {
        msg_id,
        code: Code::Ok,
    });
    assert_eq!(
        device.recv_within(2_500),
        None,
        "acknowledged: not sent again"
    );

    // Device to device at QoS 1, and to NATS with the header.
    subscribe_nats(&mut nats_client, "cmd.q1dev");
    let sender = Device::new(port);
    sender.connect("q1src", 30, None);
    let up = sender.register(1, "cmd.q1dev");
    sender.send(&Frame::Publish {
        qos: Qos::AtLeastOnce,
        topic: TopicRef::Registered(up),
        msg_id: 1,
        payload: b"d2d",
    });
    assert!(matches!(
        decode_from_broker(&sender.recv()),
        Ok(Frame::Puback {
            msg_id: 1,
            code: Code::Ok
        })
    ));
    assert_eq!(nats_client.read_line(), "HMSG cmd.q1dev 1 26 29");
    assert_eq!(nats_client.read_line(), "NATS/1.0");
    assert_eq!(nats_client.read_line(), "Perch-Qos: 1");
    assert!(matches!(
        decode_from_broker(&device.recv()),
        Ok(Frame::Deliver {
            qos: Qos::AtLeastOnce,
            payload: b"d2d",
            ..
        })
    ));
}

/// With a store, what waits for a sleeping device at QoS 1 survives kill -9:
/// after the restart the device wakes (PING from the same address) and gets
/// every message, with the msg ids it would have had; what it acknowledged
/// stays acknowledged across a second kill -9.
#[test]
fn qos1_messages_for_a_sleeper_survive_kill_9() {
    let port = free_port();
    let dir = TempDir::new("device-sleep-store");
    let store = dir.path.join("store");
    let conf = dir.path.join("perch.toml");
    std::fs::write(&conf, format!("[device]\nudp = \"127.0.0.1:{port}\"\n")).expect("write config");
    let args = [
        "--shards",
        "2",
        "--config",
        conf.to_str().expect("utf-8"),
        "--store-dir",
        store.to_str().expect("utf-8"),
    ];
    let server = Server::perch(&args);
    let device = Device::new(port);
    device.connect_with("sleeper9", 30, None, false);
    device.subscribe_at(1, "cmd.sleeper9", Qos::AtLeastOnce);
    device.send(&Frame::Disconnect { sleep_s: Some(60) });
    assert!(matches!(
        decode_from_broker(&device.recv()),
        Ok(Frame::Disconnect { .. })
    ));
    let mut nats_client = nats_with_headers(&server);
    let payloads = ["p-one", "p-two", "p-three", "p-four"];
    for p in payloads {
        let msg = format!(
            "HPUB cmd.sleeper9 26 {}\r\nNATS/1.0\r\nPerch-Qos: 1\r\n\r\n{p}\r\n",
            26 + p.len()
        );
        nats_client.send(msg.as_bytes());
    }
    nats_client.send(b"PING\r\n");
    assert_eq!(nats_client.read_line(), "PONG");
    // The broker has the messages once its stored copy of the session holds
    // them (written at the end of the pass that queued them).
    let file = store.join("devices").join(format!(
        "{}.ses",
        b"sleeper9"
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stored = std::fs::read(&file).unwrap_or_default();
        let has = |p: &str| stored.windows(p.len()).any(|w| w == p.as_bytes());
        if payloads.iter().all(|p| has(p)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the session was never stored with its messages"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill9();

    let server = Server::perch(&args);
    // Wakes without acking: everything, once each.
    let got = wake_and_collect(&device, false);
    let got_payloads: Vec<&[u8]> = got.iter().map(|(_, p)| p.as_slice()).collect();
    let want: Vec<&[u8]> = payloads.iter().map(|p| p.as_bytes()).collect();
    assert_eq!(got_payloads, want);
    let ids: Vec<u32> = got.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    // Wakes again, acks them all this time.
    let again = wake_and_collect(&device, true);
    assert_eq!(again, got);
    // Wait for the stored copy to drop them, then kill -9 once more.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read(&file)
        .unwrap_or_default()
        .windows(5)
        .any(|w| w == b"p-one")
    {
        assert!(Instant::now() < deadline, "acked messages stayed stored");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill9();
    let _server = Server::perch(&args);
    assert!(
        wake_and_collect(&device, true).is_empty(),
        "acked means gone"
    );
}

mod keys;
