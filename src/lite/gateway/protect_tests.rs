//! The gateway with device keys (docs/device-protocol.md §9), in memory:
//! sealed frames in, sealed frames out, and everything that does not verify
//! dropped unanswered with nothing created.

use super::*;
use crate::config::DeviceConfig;
use wire::protect::{self, DeviceEnvelope, KEY_BYTES};

const KEY_A: [u8; KEY_BYTES] = [0xa5; KEY_BYTES];
const KEY_B: [u8; KEY_BYTES] = [0x5b; KEY_BYTES];

fn hex(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn credentials(require_key: bool) -> Arc<Credentials> {
    let text = format!(
        r#"
        require_key = {require_key}
        default_permissions = {{ publish = {{ allow = ["t.{{client}}.>"] }}, subscribe = {{ allow = ["cmd.{{client}}.>"], deny = ["cmd.{{client}}.secret"] }} }}
        [[clients]]
        client = "a"
        key = "{}"
        [[clients]]
        client = "b"
        key = "{}"
        "#,
        hex(&KEY_A),
        hex(&KEY_B)
    );
    let config: DeviceConfig = toml::from_str(&text).expect("parses");
    Arc::new(Credentials::new(&config).expect("valid"))
}

fn gateway(shard: usize, shards: usize, require_key: bool) -> Gateway {
    let table = [(1u32, "t.{client}.temp".to_string())]
        .into_iter()
        .collect();
    let mut g = Gateway::new(
        shard,
        shards,
        GatewayLimits {
            sessions_max: 16,
            ..GatewayLimits::default()
        },
        Arc::new(Predefined::new(&table).expect("table")),
    );
    g.set_credentials(credentials(require_key));
    g
}

fn addr(port: u16) -> Peer {
    Peer::Udp(SocketAddr::from(([10, 0, 0, 2], port)))
}

/// A device's side of protection, as the clients do it.
struct Device {
    id: &'static [u8],
    key: [u8; KEY_BYTES],
    epoch: u32,
    counter: u32,
}

impl Device {
    fn new(id: &'static [u8], key: [u8; KEY_BYTES]) -> Device {
        Device {
            id,
            key,
            epoch: 1,
            counter: 0,
        }
    }

    fn seal(&mut self, frame: &Frame<'_>) -> Vec<u8> {
        self.counter += 1;
        let plain = encode(frame);
        let envelope = DeviceEnvelope {
            client_id: self.id,
            epoch: self.epoch,
            counter: self.counter,
        };
        let mut out =
            vec![0u8; protect::device_sealed_len(self.id.len(), self.counter, plain.len())];
        let n = protect::seal_from_device(&self.key, &envelope, &plain, &mut out).expect("fits");
        out.truncate(n);
        out
    }

    /// The frames sent to this device, opened; panics on an unsealed one
    /// unless it is the allowed plain hint.
    fn open(&self, actions: &[Action]) -> Vec<Vec<u8>> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { frame, .. } => {
                    let mut plain = vec![0u8; frame.len()];
                    let (_, bytes) =
                        protect::open_from_broker(&self.key, self.epoch, frame, &mut plain)
                            .unwrap_or_else(|e| {
                                panic!("not sealed for the device: {frame:02x?}: {e}")
                            });
                    Some(bytes.to_vec())
                }
                _ => None,
            })
            .collect()
    }

    fn connect_frame(&self) -> Frame<'static> {
        Frame::Connect {
            version: wire::PROTOCOL_VERSION,
            clean_session: true,
            keepalive_s: 60,
            client_id: self.id,
            will: None,
        }
    }
}

fn handle(g: &mut Gateway, from: Peer, bytes: &[u8]) -> Vec<Action> {
    let mut out = Vec::new();
    g.handle_datagram(from, bytes, false, 10, &mut out);
    out
}

fn connected(g: &mut Gateway, device: &mut Device, from: Peer) {
    let bytes = device.seal(&device.connect_frame());
    let out = handle(g, from, &bytes);
    let frames = device.open(&out);
    assert_eq!(frames.len(), 1, "{out:?}");
    assert!(matches!(
        wire::decode_from_broker(&frames[0]),
        Ok(Frame::Connack { code: Code::Ok, .. })
    ));
}

fn publish(device: &mut Device, topic: u32, payload: &'static [u8]) -> Vec<u8> {
    device.seal(&Frame::Publish {
        qos: Qos::AtLeastOnce,
        topic: TopicRef::Predefined(topic),
        msg_id: device.counter + 1,
        payload,
    })
}

fn sent_len_max(actions: &[Action]) -> usize {
    actions
        .iter()
        .map(|a| match a {
            Action::Send { frame, .. } => frame.len(),
            _ => usize::MAX,
        })
        .max()
        .unwrap_or(0)
}

fn routed(actions: &[Action]) -> Vec<Vec<u8>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish { subject, .. } => Some(subject.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_keyed_device_connects_publishes_and_gets_sealed_answers() {
    let mut g = gateway(0, 1, false);
    let mut a = Device::new(b"a", KEY_A);
    connected(&mut g, &mut a, addr(1));
    let out = handle(&mut g, addr(1), &publish(&mut a, 1, b"21.5"));
    assert_eq!(routed(&out), [b"t.a.temp".to_vec()]);
    // The shell's PUBACK goes through `outbound`, sealed.
    let puback = g.outbound(
        addr(1),
        encode(&Frame::Puback {
            msg_id: 2,
            code: Code::Ok,
        }),
    );
    let opened = a.open(&[Action::Send {
        to: addr(1),
        frame: puback,
    }]);
    assert_eq!(opened, [vec![0x40, 0x02, 0x00]]);
    // A new source address (NAT rebinding): the key names the session.
    let out = handle(&mut g, addr(2), &publish(&mut a, 1, b"22"));
    assert_eq!(routed(&out).len(), 1);
    assert_eq!(g.client_id_at(addr(2)).as_deref(), Some(&b"a"[..]));
}

#[test]
fn wrong_key_tampered_replayed_and_truncated_frames_create_nothing_and_get_no_answer() {
    let mut g = gateway(0, 1, false);
    // A wrong key for "a".
    let mut forger = Device::new(b"a", KEY_B);
    let out = handle(&mut g, addr(9), &forger.seal(&forger.connect_frame()));
    assert!(out.is_empty() && g.session_count() == 0);
    // Unknown client id.
    let mut stranger = Device::new(b"zz", KEY_A);
    assert!(handle(&mut g, addr(9), &stranger.seal(&stranger.connect_frame())).is_empty());
    let mut a = Device::new(b"a", KEY_A);
    let connect = a.seal(&a.connect_frame());
    for at in 0..connect.len() {
        let mut bad = connect.clone();
        bad[at] ^= 0x01;
        let out = handle(&mut g, addr(9), &bad);
        if at == 0 {
            // No longer an envelope: a plain malformed frame, answered (rate
            // limited) with an ERROR no larger than it.
            assert!(sent_len_max(&out) <= bad.len());
        } else {
            assert!(out.is_empty(), "byte {at}");
            assert!(
                handle(&mut g, addr(9), &connect[..at]).is_empty(),
                "length {at}"
            );
        }
    }
    // Oversized: a declared client id longer than the datagram.
    assert!(handle(&mut g, addr(9), &[0x01, 0x40, b'a', 1, 0, 0, 0, 1]).is_empty());
    assert!(handle(&mut g, addr(9), &[0x01, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_empty());
    assert_eq!(g.session_count(), 0);
    assert!(g.by_addr.is_empty() && g.foreign.is_empty());
    // The genuine one works once; its replay does nothing.
    let out = handle(&mut g, addr(1), &connect);
    assert_eq!(a.open(&out).len(), 1);
    let stats = g.stats;
    assert!(
        handle(&mut g, addr(3), &connect).is_empty(),
        "replayed CONNECT"
    );
    assert_eq!(g.client_id_at(addr(1)).as_deref(), Some(&b"a"[..]));
    let frame = publish(&mut a, 1, b"x");
    assert_eq!(routed(&handle(&mut g, addr(1), &frame)).len(), 1);
    assert!(
        handle(&mut g, addr(1), &frame).is_empty(),
        "replayed PUBLISH"
    );
    assert_eq!(g.stats.replays_dropped, stats.replays_dropped + 2);
    assert!(g.stats.unverified_dropped >= 2 * connect.len() as u64);
    // A frame of an older epoch, after a reconnect in a new one.
    let old = publish(&mut a, 1, b"old");
    a.epoch = 2;
    a.counter = 0;
    connected(&mut g, &mut a, addr(1));
    assert!(handle(&mut g, addr(1), &old).is_empty(), "older epoch");
}

#[test]
fn plain_frames_for_keyed_devices_are_refused_and_others_still_work() {
    let mut g = gateway(0, 1, false);
    let plain_connect = |id: &'static [u8]| {
        encode(&Frame::Connect {
            version: wire::PROTOCOL_VERSION,
            clean_session: true,
            keepalive_s: 0,
            client_id: id,
            will: None,
        })
    };
    let out = handle(&mut g, addr(1), &plain_connect(b"ab"));
    assert_eq!(out.len(), 1, "a plain device without a key is let in");
    let out = handle(&mut g, addr(2), &plain_connect(b"a"));
    // CONNACK NOT_PERMITTED is 6 bytes, the CONNECT 5: not sent.
    assert!(out.is_empty());
    assert_eq!(g.stats.plain_refused, 1);
    assert_eq!(g.stats.replies_too_large, 1);
    // A keyed session does not take plain frames from its address.
    let mut a = Device::new(b"a", KEY_A);
    connected(&mut g, &mut a, addr(3));
    let plain = encode(&Frame::Publish {
        qos: Qos::AtMostOnce,
        topic: TopicRef::Predefined(1),
        msg_id: 0,
        payload: b"forged",
    });
    assert!(handle(&mut g, addr(3), &plain).is_empty());
    // Nor a plain connectionless publish in its name.
    assert!(routed(&handle(&mut g, addr(4), &[0x37, 0x01, b'a', 0x01, b'x'])).is_empty());
    // With require_key, no plain CONNECT gets a session.
    let mut strict = gateway(0, 1, true);
    let connect = plain_connect(b"ab");
    let out = handle(&mut strict, addr(1), &connect);
    assert!(sent_len_max(&out) <= connect.len());
    assert_eq!(strict.session_count(), 0);
    assert!(strict.by_addr.is_empty());
}

#[test]
fn client_templates_keep_each_device_to_its_own_subjects() {
    let mut g = gateway(0, 1, true);
    let mut a = Device::new(b"a", KEY_A);
    connected(&mut g, &mut a, addr(1));
    // Register b's subject and publish to it: NOT_PERMITTED in the PUBACK.
    let out = handle(
        &mut g,
        addr(1),
        &a.seal(&Frame::Register {
            id: 1,
            subject: b"t.b.temp",
        }),
    );
    let regack = a.open(&out);
    let Ok(Frame::Regack {
        topic,
        code: Code::Ok,
        ..
    }) = wire::decode_from_broker(&regack[0])
    else {
        panic!("{regack:02x?}");
    };
    let frame = a.seal(&Frame::Publish {
        qos: Qos::AtLeastOnce,
        topic: TopicRef::Registered(topic),
        msg_id: 7,
        payload: b"x",
    });
    let out = handle(&mut g, addr(1), &frame);
    assert!(routed(&out).is_empty());
    assert_eq!(
        a.open(&out),
        [encode(&Frame::Puback {
            msg_id: 7,
            code: Code::NotPermitted
        })]
    );
    // Its own subject is fine.
    assert_eq!(
        routed(&handle(&mut g, addr(1), &publish(&mut a, 1, b"ok"))),
        [b"t.a.temp".to_vec()]
    );
    // Subscriptions: its commands yes, b's and everything no.
    for (filter, want) in [
        (&b"cmd.a.>"[..], None),
        (b"cmd.b.>", Some(Code::NotPermitted)),
        (b">", Some(Code::NotPermitted)),
    ] {
        let out = handle(
            &mut g,
            addr(1),
            &a.seal(&Frame::Subscribe {
                req_id: 3,
                max_qos: Qos::AtMostOnce,
                filter,
            }),
        );
        let refused = a.open(&out);
        match want {
            None => assert!(
                out.iter().any(|x| matches!(x, Action::Subscribe { .. })),
                "{filter:?}"
            ),
            Some(code) => assert_eq!(
                refused,
                [encode(&Frame::Suback { req_id: 3, code })],
                "{filter:?}"
            ),
        }
    }
    // The denied subject under the allowed wildcard is filtered at delivery.
    let sid = *g.by_sid.keys().next().expect("subscribed");
    let mut out = Vec::new();
    g.deliver(sid, b"cmd.a.secret", None, b"", b"s", 20, &mut out);
    assert!(out.is_empty(), "{out:?}");
    g.deliver(sid, b"cmd.a.go", None, b"", b"g", 20, &mut out);
    let frames = a.open(&out);
    assert!(!frames.is_empty(), "deliveries are sealed for the device");
}

/// Many source addresses, every kind of unverified datagram: no session, no
/// remembered address, no reply larger than its datagram, and the gateway's
/// own memory (its tables) does not grow.
#[test]
fn a_flood_of_unverified_datagrams_costs_nothing_and_reflects_nothing_larger() {
    let mut g = gateway(0, 2, true);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut forger = Device::new(b"a", KEY_B);
    let mut sent_bytes = 0usize;
    let mut replied_bytes = 0usize;
    for i in 0..20_000u32 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let from = Peer::Udp(SocketAddr::from((
            [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
            (seed & 0xffff) as u16,
        )));
        let bytes: Vec<u8> = match i % 4 {
            0 => forger.seal(&forger.connect_frame()),
            1 => (0..(seed % 64) as usize)
                .map(|k| (seed >> (k % 56)) as u8)
                .collect(),
            2 => {
                let mut b = forger.seal(&Frame::Ping);
                b[0] = 0x01;
                b
            }
            _ => encode(&Frame::Connect {
                version: 1,
                clean_session: true,
                keepalive_s: 0,
                client_id: b"x",
                will: None,
            }),
        };
        let out = handle(&mut g, from, &bytes);
        sent_bytes += bytes.len();
        for action in &out {
            match action {
                Action::Send { frame, .. } => {
                    assert!(frame.len() <= bytes.len(), "{frame:02x?} for {bytes:02x?}");
                    replied_bytes += frame.len();
                }
                other => panic!("an unverified datagram caused {other:?}"),
            }
        }
    }
    assert_eq!(g.session_count(), 0);
    assert!(g.by_addr.is_empty() && g.foreign.is_empty() && g.by_sid.is_empty());
    assert!(g.sessions.is_empty() && g.permissions.is_empty());
    assert!(
        g.scratch.len() <= wire::FRAME_BYTES_MAX,
        "scratch {}",
        g.scratch.len()
    );
    assert!(
        replied_bytes <= sent_bytes / 10,
        "{replied_bytes} of {sent_bytes}"
    );
    assert!(g.stats.unverified_dropped >= 10_000);
}
