//! quinn-style tests: the real client and a small fake broker (built on
//! perch-wire) joined by two lossy, duplicating, delaying in-memory links on
//! a virtual clock. Every run is determined by its seed; a failure prints it.

use std::collections::VecDeque;

use perch_device::{
    Client, ClientError, Config, DisconnectReason, Event, NoStorage, Storage, StorageError, Target,
};
use perch_wire::{decode_from_device, Code, Frame, FrameType, Qos, TopicRef};

type TestClient<S = NoStorage> = Client<4, 4, 256, S>;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// One direction of the network.
struct Link {
    in_flight: Vec<(u64, Vec<u8>)>,
    loss_percent: u64,
    duplicate_percent: u64,
    latency_ms: u64,
    /// Each frame is delayed by up to this much more (frames sent close
    /// together may arrive out of order).
    jitter_ms: u64,
    /// Every frame offered to the link, lost or not, with its send time.
    log: Vec<(u64, Vec<u8>)>,
}

impl Link {
    fn new(loss_percent: u64, duplicate_percent: u64) -> Link {
        Link {
            in_flight: Vec::new(),
            loss_percent,
            duplicate_percent,
            latency_ms: 20,
            jitter_ms: 15,
            log: Vec::new(),
        }
    }

    fn send(&mut self, now: u64, frame: Vec<u8>, rng: &mut Rng) {
        self.log.push((now, frame.clone()));
        if rng.chance(self.loss_percent) {
            return;
        }
        let jitter = rng.next() % self.jitter_ms;
        if rng.chance(self.duplicate_percent) {
            self.in_flight
                .push((now + self.latency_ms + jitter + 7, frame.clone()));
        }
        self.in_flight.push((now + self.latency_ms + jitter, frame));
    }

    fn next_arrival(&self) -> Option<u64> {
        self.in_flight.iter().map(|(at, _)| *at).min()
    }

    fn take_due(&mut self, now: u64) -> Vec<Vec<u8>> {
        let mut due: Vec<(u64, Vec<u8>)> = Vec::new();
        self.in_flight.retain(|(at, frame)| {
            if *at <= now {
                due.push((*at, frame.clone()));
                false
            } else {
                true
            }
        });
        due.sort_by_key(|(at, _)| *at);
        due.into_iter().map(|(_, frame)| frame).collect()
    }
}

fn encode(frame: Frame<'_>) -> Vec<u8> {
    let mut out = vec![0u8; frame.encoded_len()];
    let len = frame
        .encode(&mut out)
        .expect("the fake broker builds valid frames");
    out.truncate(len);
    out
}

struct Delivery {
    subject: Vec<u8>,
    payload: Vec<u8>,
    qos: Qos,
    reply_handle: Option<u32>,
    msg_id: u32,
    /// Sent at least once (PONG after a wake waits for this).
    sent: bool,
}

/// Just enough broker to exercise the client: one session, its registered
/// topics, QoS 1 de-duplication over 16 ids, subscriptions (matched
/// exactly or by a trailing `>`), sleeping with a buffer, RESUME.
#[derive(Default)]
struct FakeBroker {
    answering: bool,
    refuse_with: Option<Code>,
    has_session: bool,
    address_known: bool,
    sleeping: bool,
    token: u32,
    next_topic: u32,
    /// Topics the device registered: (id, subject).
    topics: Vec<(u32, Vec<u8>)>,
    /// Topics the broker registered with the device: (id, subject, acked).
    device_topics: Vec<(u32, Vec<u8>, bool)>,
    seen_msg_ids: VecDeque<u32>,
    subscriptions: Vec<(Vec<u8>, Qos)>,
    /// Messages the broker accepted: (subject, payload).
    routed: Vec<(Vec<u8>, Vec<u8>)>,
    /// The msg id of every QoS 1 message it accepted (passed on), in order.
    routed_msg_ids: Vec<u32>,
    replies: Vec<(u32, Vec<u8>)>,
    /// Deliveries not yet acknowledged (QoS 1) or waiting for a REGACK.
    pending: Vec<Delivery>,
    sleep_buffer: Vec<Delivery>,
    next_delivery_id: u32,
    out: Vec<Vec<u8>>,
    connects: Vec<u64>,
    pings: usize,
    /// A PING woke the session: PONG once every buffered message was sent.
    pong_owed: bool,
    /// Like the real broker: the PONG goes once the buffered frames are
    /// sent, without waiting for the deliveries held for a REGACK (they go
    /// when it arrives, possibly after the PONG).
    pong_before_held: bool,
}

impl FakeBroker {
    fn new() -> FakeBroker {
        FakeBroker {
            answering: true,
            token: 0x1234_5678,
            next_topic: 1,
            next_delivery_id: 1,
            ..Default::default()
        }
    }

    fn send(&mut self, frame: Frame<'_>) {
        self.out.push(encode(frame));
    }

    fn handle(&mut self, bytes: &[u8], now: u64) {
        if !self.answering {
            return;
        }
        let frame = decode_from_device(bytes).expect("the client sends valid frames");
        match frame {
            Frame::Connect {
                version,
                clean_session,
                client_id,
                ..
            } => {
                assert_eq!(version, 1);
                assert_eq!(client_id, b"dev1");
                self.connects.push(now);
                if let Some(code) = self.refuse_with {
                    return self.send(Frame::Connack {
                        session_present: false,
                        code,
                        session_token: 0,
                    });
                }
                let session_present = self.has_session && !clean_session;
                if !session_present {
                    self.topics.clear();
                    self.device_topics.clear();
                    self.seen_msg_ids.clear();
                    self.subscriptions.clear();
                }
                self.has_session = true;
                self.address_known = true;
                self.sleeping = false;
                let session_token = self.token;
                return self.send(Frame::Connack {
                    session_present,
                    code: Code::Ok,
                    session_token,
                });
            }
            Frame::Resume { session_token } => {
                if self.has_session && session_token == self.token {
                    self.address_known = true;
                    self.send(Frame::Connack {
                        session_present: true,
                        code: Code::Ok,
                        session_token,
                    });
                } else {
                    self.send(Frame::Connack {
                        session_present: false,
                        code: Code::UnknownSession,
                        session_token: 0,
                    });
                }
                return;
            }
            Frame::PublishAnonymous { .. } => return,
            _ => {}
        }
        if !self.address_known {
            let ref_type = Some(frame.frame_type());
            return self.send(Frame::Error {
                code: Code::UnknownSession,
                ref_type,
                ref_id: 0,
            });
        }
        match frame {
            Frame::Register { id, subject } => {
                let topic = match self.topics.iter().find(|(_, s)| s == subject) {
                    Some((topic, _)) => *topic,
                    None => {
                        let topic = self.next_topic;
                        self.next_topic += 1;
                        self.topics.push((topic, subject.to_vec()));
                        topic
                    }
                };
                self.send(Frame::Regack {
                    req_id: id,
                    topic,
                    code: Code::Ok,
                });
            }
            Frame::Publish {
                qos,
                topic,
                msg_id,
                payload,
            } => {
                let subject = match topic {
                    TopicRef::Registered(id) => self
                        .topics
                        .iter()
                        .find(|(t, _)| *t == id)
                        .map(|(_, s)| s.clone()),
                    TopicRef::Predefined(id) => Some(format!("predefined.{id}").into_bytes()),
                    TopicRef::Reply(handle) => {
                        self.replies.push((handle, payload.to_vec()));
                        return;
                    }
                };
                let Some(subject) = subject else {
                    return match qos {
                        Qos::AtLeastOnce => self.send(Frame::Puback {
                            msg_id,
                            code: Code::UnknownTopic,
                        }),
                        Qos::AtMostOnce => self.send(Frame::Error {
                            code: Code::UnknownTopic,
                            ref_type: Some(FrameType::Publish),
                            ref_id: topic.id(),
                        }),
                    };
                };
                if qos == Qos::AtLeastOnce {
                    if !self.seen_msg_ids.contains(&msg_id) {
                        self.routed.push((subject, payload.to_vec()));
                        self.routed_msg_ids.push(msg_id);
                        if self.seen_msg_ids.len() == 16 {
                            self.seen_msg_ids.pop_front();
                        }
                        self.seen_msg_ids.push_back(msg_id);
                    }
                    self.send(Frame::Puback {
                        msg_id,
                        code: Code::Ok,
                    });
                } else {
                    self.routed.push((subject, payload.to_vec()));
                }
            }
            Frame::Subscribe {
                req_id,
                max_qos,
                filter,
            } => {
                self.subscriptions.retain(|(f, _)| f != filter);
                self.subscriptions.push((filter.to_vec(), max_qos));
                self.send(Frame::Suback {
                    req_id,
                    code: Code::Ok,
                });
            }
            Frame::Unsubscribe { req_id, filter } => {
                self.subscriptions.retain(|(f, _)| f != filter);
                self.send(Frame::Unsuback {
                    req_id,
                    code: Code::Ok,
                });
            }
            Frame::Ping => {
                self.pings += 1;
                if self.sleeping {
                    let buffered = std::mem::take(&mut self.sleep_buffer);
                    self.pong_owed = true;
                    for delivery in buffered {
                        self.start_delivery(delivery);
                    }
                    self.retransmit();
                } else {
                    self.send(Frame::Pong);
                }
            }
            Frame::Disconnect { sleep_s } => {
                self.sleeping = sleep_s.is_some();
                if sleep_s.is_none() {
                    self.has_session = false;
                    self.address_known = false;
                }
                self.send(Frame::Disconnect { sleep_s: None });
            }
            Frame::Puback { msg_id, code } => {
                assert_eq!(code, Code::Ok);
                self.pending.retain(|delivery| {
                    !(delivery.qos == Qos::AtLeastOnce && delivery.msg_id == msg_id)
                });
            }
            Frame::Regack {
                req_id,
                topic,
                code,
            } => {
                assert_eq!((req_id, code), (topic, Code::Ok));
                if let Some(entry) = self
                    .device_topics
                    .iter_mut()
                    .find(|(id, _, _)| *id == topic)
                {
                    entry.2 = true;
                }
                self.retransmit();
            }
            other => panic!("unexpected frame from the device: {other:?}"),
        }
    }

    /// A NATS message arrives for the device's subscriptions.
    fn deliver(&mut self, subject: &[u8], payload: &[u8], qos: Qos, reply_handle: Option<u32>) {
        let Some((_, max_qos)) = self.subscriptions.iter().find(|(filter, _)| {
            filter.as_slice() == subject
                || filter
                    .strip_suffix(b">")
                    .is_some_and(|prefix| subject.starts_with(prefix))
        }) else {
            panic!("no subscription for {:?}", String::from_utf8_lossy(subject));
        };
        let qos = qos.min(*max_qos);
        let msg_id = if qos == Qos::AtLeastOnce {
            self.next_delivery_id += 1;
            self.next_delivery_id - 1
        } else {
            0
        };
        let delivery = Delivery {
            subject: subject.to_vec(),
            payload: payload.to_vec(),
            qos,
            reply_handle,
            msg_id,
            sent: false,
        };
        if self.sleeping {
            self.sleep_buffer.push(delivery);
        } else {
            self.start_delivery(delivery);
        }
    }

    fn start_delivery(&mut self, delivery: Delivery) {
        if !self
            .device_topics
            .iter()
            .any(|(_, s, _)| *s == delivery.subject)
        {
            let id = self.next_topic;
            self.next_topic += 1;
            self.device_topics
                .push((id, delivery.subject.clone(), false));
        }
        self.pending.push(delivery);
        self.retransmit();
    }

    /// Sends every pending delivery (and REGISTER for topics not yet acked);
    /// QoS 0 deliveries leave the list once sent.
    fn retransmit(&mut self) {
        if !self.answering {
            return;
        }
        let mut frames = Vec::new();
        for (id, subject, acked) in &self.device_topics {
            if !acked && self.pending.iter().any(|d| d.subject == *subject) {
                frames.push(encode(Frame::Register { id: *id, subject }));
            }
        }
        self.pending.retain_mut(|delivery| {
            let Some((id, _, true)) = self
                .device_topics
                .iter()
                .find(|(_, s, _)| *s == delivery.subject)
            else {
                return true;
            };
            frames.push(encode(Frame::Deliver {
                qos: delivery.qos,
                topic: TopicRef::Registered(*id),
                reply_handle: delivery.reply_handle,
                msg_id: delivery.msg_id,
                payload: &delivery.payload,
            }));
            delivery.sent = true;
            delivery.qos == Qos::AtLeastOnce
        });
        let acked = |subject: &[u8]| {
            self.device_topics
                .iter()
                .any(|(_, s, acked)| *acked && s == subject)
        };
        if self.pong_owed
            && self.pending.iter().all(|delivery| {
                delivery.sent || (self.pong_before_held && !acked(&delivery.subject))
            })
        {
            self.pong_owed = false;
            frames.push(encode(Frame::Pong));
        }
        self.out.extend(frames);
    }
}

/// An event with its borrowed parts copied out.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Connected {
        session_present: bool,
    },
    Message {
        subject: Option<Vec<u8>>,
        payload: Vec<u8>,
        reply_handle: Option<u32>,
    },
    PublishAcked {
        msg_id: u32,
    },
    PublishFailed {
        msg_id: u32,
        code: Code,
    },
    Subscribed {
        code: Code,
    },
    Unsubscribed {
        code: Code,
    },
    Error {
        code: Code,
    },
    Asleep,
    WakeDone,
    Disconnected {
        reason: DisconnectReason,
    },
}

impl From<Event<'_>> for Seen {
    fn from(event: Event<'_>) -> Seen {
        match event {
            Event::Connected { session_present } => Seen::Connected { session_present },
            Event::Message {
                subject,
                payload,
                reply_handle,
                ..
            } => Seen::Message {
                subject: subject.map(<[u8]>::to_vec),
                payload: payload.to_vec(),
                reply_handle,
            },
            Event::PublishAcked { msg_id } => Seen::PublishAcked { msg_id },
            Event::PublishFailed { msg_id, code } => Seen::PublishFailed { msg_id, code },
            Event::Subscribed { code, .. } => Seen::Subscribed { code },
            Event::Unsubscribed { code, .. } => Seen::Unsubscribed { code },
            Event::Error { code, .. } => Seen::Error { code },
            Event::Asleep => Seen::Asleep,
            Event::WakeDone => Seen::WakeDone,
            Event::Disconnected { reason } => Seen::Disconnected { reason },
        }
    }
}

struct Sim<S = NoStorage> {
    seed: u64,
    now: u64,
    rng: Rng,
    client: TestClient<S>,
    broker: FakeBroker,
    to_broker: Link,
    to_device: Link,
    events: Vec<Seen>,
    /// Replies the application sends when a request arrives.
    auto_reply: Option<Vec<u8>>,
}

const BROKER_RETRY_MS: u64 = 300;

/// A device's flash: one record per slot and the msg id counter, with
/// switches that make writes fail.
#[derive(Debug, Default)]
struct Flash {
    slots: [Option<Vec<u8>>; 4],
    counter: Option<u32>,
    fail_stores: bool,
    fail_removes: bool,
    fail_counter: bool,
    fail_loads: bool,
    /// Successful writes of any kind.
    writes: usize,
}

impl Flash {
    fn new() -> Flash {
        Flash::default()
    }

    fn records(&self) -> usize {
        self.slots.iter().flatten().count()
    }
}

impl Storage for Flash {
    fn store(&mut self, slot: usize, record: &[u8]) -> Result<(), StorageError> {
        assert!(record.len() <= 256, "a record fits BUF");
        if self.fail_stores {
            return Err(StorageError);
        }
        self.writes += 1;
        self.slots[slot] = Some(record.to_vec());
        Ok(())
    }

    fn remove(&mut self, slot: usize) -> Result<(), StorageError> {
        if self.fail_removes {
            return Err(StorageError);
        }
        self.writes += 1;
        self.slots[slot] = None;
        Ok(())
    }

    fn load(&mut self, slot: usize, buf: &mut [u8]) -> Result<Option<usize>, StorageError> {
        if self.fail_loads {
            return Err(StorageError);
        }
        let Some(record) = &self.slots[slot] else {
            return Ok(None);
        };
        let out = buf.get_mut(..record.len()).ok_or(StorageError)?;
        out.copy_from_slice(record);
        Ok(Some(record.len()))
    }

    fn store_msg_id_counter(&mut self, next: u32) -> Result<(), StorageError> {
        if self.fail_counter {
            return Err(StorageError);
        }
        self.writes += 1;
        self.counter = Some(next);
        Ok(())
    }

    fn load_msg_id_counter(&mut self) -> Result<Option<u32>, StorageError> {
        if self.fail_loads {
            return Err(StorageError);
        }
        Ok(self.counter)
    }
}

impl Sim {
    fn new(
        seed: u64,
        loss_percent: u64,
        duplicate_percent: u64,
        config: impl FnOnce(&mut Config),
    ) -> Sim {
        let mut settings = Config::new(b"dev1").unwrap();
        config(&mut settings);
        Sim {
            seed,
            now: 0,
            rng: Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            client: TestClient::new(settings),
            broker: FakeBroker::new(),
            to_broker: Link::new(loss_percent, duplicate_percent),
            to_device: Link::new(loss_percent, duplicate_percent),
            events: Vec::new(),
            auto_reply: None,
        }
    }
}

impl Sim<Flash> {
    fn with_flash(seed: u64, loss_percent: u64, duplicate_percent: u64, flash: Flash) -> Self {
        let settings = Config::new(b"dev1").unwrap();
        Sim {
            seed,
            now: 0,
            rng: Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            client: TestClient::with_storage(settings, flash).unwrap(),
            broker: FakeBroker::new(),
            to_broker: Link::new(loss_percent, duplicate_percent),
            to_device: Link::new(loss_percent, duplicate_percent),
            events: Vec::new(),
            auto_reply: None,
        }
    }

    /// The device resets: the client and what it had in RAM are gone (so
    /// are frames on their way to it); the flash, the broker and the frames
    /// already on their way to the broker remain. A new client is built from
    /// the flash, as firmware does at boot.
    fn reboot(&mut self) {
        let placeholder = TestClient::with_storage(Config::new(b"dev1").unwrap(), Flash::new());
        let old = std::mem::replace(&mut self.client, placeholder.unwrap());
        self.to_device.in_flight.clear();
        self.client = TestClient::with_storage(Config::new(b"dev1").unwrap(), old.into_storage())
            .expect("the flash reads");
    }

    fn flash(&mut self) -> &mut Flash {
        self.client.storage_mut()
    }
}

impl<S: Storage> Sim<S> {
    /// Moves frames and time until `until_ms` or until `stop` holds.
    fn drive_until(&mut self, until_ms: u64, mut stop: impl FnMut(&Self) -> bool) -> bool {
        let mut buf = [0u8; 256];
        let mut next_broker_retry = self.now + BROKER_RETRY_MS;
        loop {
            while let Some(event) = self.client.poll_event() {
                let seen = Seen::from(event);
                if let (
                    Seen::Message {
                        reply_handle: Some(handle),
                        ..
                    },
                    Some(reply),
                ) = (&seen, &self.auto_reply)
                {
                    let (handle, reply) = (*handle, reply.clone());
                    self.events.push(seen);
                    self.client.reply(handle, &reply, self.now).unwrap();
                    continue;
                }
                self.events.push(seen);
            }
            while let Some(len) = self.client.poll_transmit(&mut buf) {
                self.to_broker
                    .send(self.now, buf[..len].to_vec(), &mut self.rng);
            }
            for frame in std::mem::take(&mut self.broker.out) {
                self.to_device.send(self.now, frame, &mut self.rng);
            }
            if stop(self) {
                return true;
            }
            let broker_busy = !self.broker.pending.is_empty();
            let next = [
                self.client.poll_timeout(),
                self.to_broker.next_arrival(),
                self.to_device.next_arrival(),
                broker_busy.then_some(next_broker_retry),
            ]
            .into_iter()
            .flatten()
            .min();
            // A client that has frames to send after an event reaction is
            // handled at the top of the loop; nothing scheduled means idle.
            let Some(next) = next.filter(|&next| next <= until_ms) else {
                self.now = self.now.max(until_ms);
                self.client.handle_timeout(self.now);
                return stop(self);
            };
            self.now = self.now.max(next);
            for frame in self.to_broker.take_due(self.now) {
                self.broker.handle(&frame, self.now);
            }
            for frame in self.to_device.take_due(self.now) {
                // The fake broker only sends valid frames.
                self.client.handle_input(&frame, self.now).unwrap();
            }
            if broker_busy && self.now >= next_broker_retry {
                self.broker.retransmit();
                next_broker_retry = self.now + BROKER_RETRY_MS;
            }
            self.client.handle_timeout(self.now);
        }
    }

    fn connect(&mut self) {
        self.client.connect(self.now);
        let connected = self.drive_until(self.now + 60_000, |sim| {
            sim.events
                .iter()
                .any(|event| matches!(event, Seen::Connected { .. }))
        });
        assert!(connected, "seed {}: no CONNACK", self.seed);
    }

    fn count(&self, wanted: &Seen) -> usize {
        self.events.iter().filter(|event| *event == wanted).count()
    }

    fn frames_to_broker(&self) -> Vec<Frame<'_>> {
        self.to_broker
            .log
            .iter()
            .map(|(_, bytes)| decode_from_device(bytes).unwrap())
            .collect()
    }
}

#[test]
fn connect_register_then_publish_in_six_bytes() {
    let mut sim = Sim::new(1, 0, 0, |_| {});
    sim.connect();
    assert_eq!(
        sim.events,
        [Seen::Connected {
            session_present: false
        }]
    );
    let msg_id = sim
        .client
        .publish(
            Target::Subject(b"sensors.t"),
            b"21.5",
            Qos::AtMostOnce,
            sim.now,
        )
        .unwrap();
    assert_eq!(msg_id, 0);
    // A second publish to the same subject waits for the same registration.
    sim.client
        .publish(
            Target::Subject(b"sensors.t"),
            b"21.6",
            Qos::AtMostOnce,
            sim.now,
        )
        .unwrap();
    sim.drive_until(sim.now + 1_000, |sim| sim.broker.routed.len() == 2);
    assert_eq!(
        sim.broker.routed,
        [
            (b"sensors.t".to_vec(), b"21.5".to_vec()),
            (b"sensors.t".to_vec(), b"21.6".to_vec())
        ]
    );
    let log: Vec<&[u8]> = sim
        .to_broker
        .log
        .iter()
        .map(|(_, bytes)| bytes.as_slice())
        .collect();
    assert_eq!(log[0], b"\x11\x01\x3c\x04dev1", "CONNECT");
    assert_eq!(log[1], b"\x50\x01sensors.t", "one REGISTER");
    assert_eq!(log[2], b"\x30\x0121.5", "the 6-byte publish");
    assert_eq!(log[3], b"\x30\x0121.6");
    assert_eq!(log.len(), 4);
}

#[test]
fn predefined_topics_need_no_registration() {
    let mut sim = Sim::new(2, 0, 0, |_| {});
    sim.connect();
    sim.client
        .publish(Target::Predefined(7), b"x", Qos::AtMostOnce, sim.now)
        .unwrap();
    sim.drive_until(sim.now + 1_000, |sim| !sim.broker.routed.is_empty());
    assert_eq!(
        sim.broker.routed,
        [(b"predefined.7".to_vec(), b"x".to_vec())]
    );
    assert_eq!(sim.to_broker.log.len(), 2);
}

/// Under loss and duplication each QoS 1 message reaches the broker exactly
/// once and is acknowledged exactly once, and every retransmission of it is
/// the same bytes.
#[test]
fn qos1_is_delivered_once_under_loss_and_duplication() {
    for seed in 1..=40 {
        let mut sim = Sim::new(seed, 20, 20, |config| config.retries_max = 5);
        sim.connect();
        let mut ids = Vec::new();
        for index in 0..12u32 {
            let payload = index.to_le_bytes();
            loop {
                match sim.client.publish(
                    Target::Subject(b"sensors.t"),
                    &payload,
                    Qos::AtLeastOnce,
                    sim.now,
                ) {
                    Ok(msg_id) => {
                        ids.push(msg_id);
                        break;
                    }
                    Err(ClientError::InflightFull) => {
                        let acked = sim.count_acked();
                        sim.drive_until(sim.now + 120_000, |sim| sim.count_acked() > acked);
                    }
                    Err(error) => panic!("seed {seed}: {error}"),
                }
            }
        }
        let done = sim.drive_until(sim.now + 600_000, |sim| sim.count_acked() == 12);
        assert!(
            done,
            "seed {seed}: only {} of 12 acked: {:?}",
            sim.count_acked(),
            sim.events
        );
        let mut routed: Vec<u32> = sim
            .broker
            .routed
            .iter()
            .map(|(_, p)| u32::from_le_bytes(p[..4].try_into().unwrap()))
            .collect();
        routed.sort_unstable();
        assert_eq!(
            routed,
            (0..12).collect::<Vec<_>>(),
            "seed {seed}: each message once"
        );
        for msg_id in &ids {
            assert_eq!(
                sim.count(&Seen::PublishAcked { msg_id: *msg_id }),
                1,
                "seed {seed}: msg {msg_id}"
            );
            let copies: Vec<Vec<u8>> = sim
                .frames_to_broker()
                .into_iter()
                .filter(|frame| matches!(frame, Frame::Publish { msg_id: id, .. } if id == msg_id))
                .map(encode)
                .collect();
            assert!(
                copies.windows(2).all(|pair| pair[0] == pair[1]),
                "seed {seed}: retries differ"
            );
        }
        assert_eq!(sim.client.stats().events_dropped, 0);
    }
}

impl<S: Storage> Sim<S> {
    fn count_acked(&self) -> usize {
        self.events
            .iter()
            .filter(|event| matches!(event, Seen::PublishAcked { .. }))
            .count()
    }

    fn messages(&self) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
        self.events
            .iter()
            .filter_map(|event| match event {
                Seen::Message {
                    subject, payload, ..
                } => Some((subject.clone(), payload.clone())),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn subscribed_messages_arrive_once_under_loss_and_duplication() {
    for seed in 1..=30 {
        let mut sim = Sim::new(seed, 20, 25, |config| config.retries_max = 6);
        sim.connect();
        sim.client
            .subscribe(b"cmd.>", Qos::AtLeastOnce, sim.now)
            .unwrap();
        let subscribed = sim.drive_until(sim.now + 60_000, |sim| {
            sim.count(&Seen::Subscribed { code: Code::Ok }) == 1
        });
        assert!(subscribed, "seed {seed}: {:?}", sim.events);
        for index in 0..5u8 {
            sim.broker
                .deliver(b"cmd.dev1.reboot", &[index], Qos::AtLeastOnce, None);
        }
        let done = sim.drive_until(sim.now + 120_000, |sim| {
            sim.broker.pending.is_empty() && sim.messages().len() >= 5
        });
        assert!(done, "seed {seed}: {:?}", sim.events);
        let mut payloads: Vec<u8> = sim
            .messages()
            .into_iter()
            .map(|(subject, payload)| {
                assert_eq!(subject.as_deref(), Some(&b"cmd.dev1.reboot"[..]));
                payload[0]
            })
            .collect();
        payloads.sort_unstable();
        assert_eq!(payloads, [0, 1, 2, 3, 4], "seed {seed}: each delivery once");
    }
}

#[test]
fn requests_are_answered_by_reply_handle() {
    let mut sim = Sim::new(3, 0, 0, |_| {});
    sim.auto_reply = Some(b"ok".to_vec());
    sim.connect();
    sim.client
        .subscribe(b"svc.dev1", Qos::AtMostOnce, sim.now)
        .unwrap();
    sim.drive_until(sim.now + 1_000, |sim| !sim.broker.subscriptions.is_empty());
    sim.broker
        .deliver(b"svc.dev1", b"status?", Qos::AtMostOnce, Some(7));
    sim.drive_until(sim.now + 1_000, |sim| !sim.broker.replies.is_empty());
    assert_eq!(sim.broker.replies, [(7, b"ok".to_vec())]);
    assert!(sim.events.contains(&Seen::Message {
        subject: Some(b"svc.dev1".to_vec()),
        payload: b"status?".to_vec(),
        reply_handle: Some(7)
    }));
    let reply = sim.to_broker.log.last().unwrap().1.clone();
    assert_eq!(reply, b"\x38\x07ok");
}

#[test]
fn keepalive_pings_then_reconnects_with_backoff_after_silence() {
    let mut sim = Sim::new(4, 0, 0, |config| config.keepalive_s = 10);
    sim.connect();
    sim.client
        .publish(Target::Subject(b"t"), b"1", Qos::AtLeastOnce, sim.now)
        .unwrap();
    sim.drive_until(sim.now + 35_000, |_| false);
    assert_eq!(sim.broker.pings, 3, "a PING every 10 s of silence");
    // The broker goes away: PINGs go unanswered, the client gives up and
    // reconnects with growing gaps.
    sim.broker.answering = false;
    sim.drive_until(sim.now + 400_000, |_| false);
    assert!(
        sim.count(&Seen::Disconnected {
            reason: DisconnectReason::Timeout
        }) >= 2,
        "{:?}",
        sim.events
    );
    let connects: Vec<u64> = sim
        .to_broker
        .log
        .iter()
        .filter(|(_, bytes)| bytes[0] >> 4 == 0x1)
        .map(|(at, _)| *at)
        .collect();
    assert!(connects.len() >= 4);
    // Attempts back off: the gaps between connect rounds grow (the first
    // CONNECT is the initial one, 72 s before the first reconnect).
    let starts: Vec<u64> = connects[1..]
        .windows(2)
        .filter(|w| w[1] - w[0] > 20_000)
        .map(|w| w[1] - w[0])
        .collect();
    assert!(starts.windows(2).all(|w| w[1] >= w[0]), "gaps {starts:?}");
    // The broker returns with the session: the client resumes it.
    sim.broker.answering = true;
    let before = sim.events.len();
    sim.drive_until(sim.now + 200_000, |sim| {
        sim.events[before..].contains(&Seen::Connected {
            session_present: true,
        })
    });
    assert!(
        sim.events[before..].contains(&Seen::Connected {
            session_present: true
        }),
        "{:?}",
        sim.events
    );
    let reconnect = sim
        .frames_to_broker()
        .into_iter()
        .rfind(|f| matches!(f, Frame::Connect { .. }));
    assert!(
        matches!(
            reconnect,
            Some(Frame::Connect {
                clean_session: false,
                ..
            })
        ),
        "reconnects never clean"
    );
}

#[test]
fn sleeping_device_collects_buffered_messages_on_wake() {
    let mut sim = Sim::new(5, 0, 0, |_| {});
    sim.connect();
    sim.client
        .subscribe(b"cmd.dev1", Qos::AtLeastOnce, sim.now)
        .unwrap();
    sim.drive_until(sim.now + 1_000, |sim| {
        sim.count(&Seen::Subscribed { code: Code::Ok }) == 1
    });
    sim.client.sleep(600, sim.now).unwrap();
    sim.drive_until(sim.now + 1_000, |sim| sim.events.contains(&Seen::Asleep));
    assert!(sim.events.contains(&Seen::Asleep));
    assert_eq!(
        sim.to_broker.log.last().unwrap().1,
        b"\xd1\xd8\x04",
        "DISCONNECT sleep 600"
    );
    assert_eq!(sim.client.poll_timeout(), None, "no timers while asleep");
    sim.broker
        .deliver(b"cmd.dev1", b"a", Qos::AtLeastOnce, None);
    sim.broker.deliver(b"cmd.dev1", b"b", Qos::AtMostOnce, None);
    let sent = sim.to_broker.log.len();
    sim.drive_until(sim.now + 300_000, |_| false);
    assert_eq!(sim.to_broker.log.len(), sent, "asleep: nothing sent");
    assert!(sim.messages().is_empty());
    sim.client.wake(sim.now).unwrap();
    sim.drive_until(sim.now + 5_000, |sim| sim.events.contains(&Seen::WakeDone));
    let position = |wanted: &Seen| sim.events.iter().position(|event| event == wanted).unwrap();
    assert_eq!(sim.messages().len(), 2);
    assert!(position(&Seen::WakeDone) > position(&Seen::Asleep));
    let mut payloads: Vec<Vec<u8>> = sim
        .messages()
        .into_iter()
        .map(|(_, payload)| payload)
        .collect();
    payloads.sort(); // the link may reorder
    assert_eq!(payloads, [b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(sim.client.poll_timeout(), None, "asleep again after PONG");
}

#[test]
fn unknown_session_after_address_change_is_resumed() {
    let mut sim = Sim::new(6, 0, 0, |_| {});
    sim.connect();
    // NAT rebinding: the broker no longer recognises the device's address.
    sim.broker.address_known = false;
    let msg_id = sim
        .client
        .publish(Target::Subject(b"t"), b"x", Qos::AtLeastOnce, sim.now)
        .unwrap();
    sim.drive_until(sim.now + 30_000, |sim| {
        sim.count(&Seen::PublishAcked { msg_id }) == 1
    });
    assert_eq!(
        sim.count(&Seen::PublishAcked { msg_id }),
        1,
        "{:?}",
        sim.events
    );
    let frames = sim.frames_to_broker();
    assert!(frames.contains(&Frame::Resume {
        session_token: 0x1234_5678
    }));
    assert_eq!(sim.broker.connects.len(), 1, "resumed, not reconnected");
    assert_eq!(sim.broker.routed, [(b"t".to_vec(), b"x".to_vec())]);
}

#[test]
fn a_refused_connect_stops_the_client() {
    let mut sim = Sim::new(7, 0, 0, |_| {});
    sim.broker.refuse_with = Some(Code::NotPermitted);
    sim.client.connect(0);
    sim.drive_until(100_000, |_| false);
    assert_eq!(
        sim.events,
        [Seen::Disconnected {
            reason: DisconnectReason::Refused(Code::NotPermitted)
        }]
    );
    assert_eq!(sim.broker.connects.len(), 1);
    assert_eq!(sim.client.poll_timeout(), None);
}

#[test]
fn unanswered_connects_are_bounded_then_back_off() {
    let mut sim = Sim::new(8, 100, 0, |config| {
        config.retries_max = 2;
        config.reconnect_backoff_min_ms = 5_000;
        config.reconnect_backoff_max_ms = 20_000;
    });
    sim.client.connect(0);
    sim.drive_until(200_000, |_| false);
    let times: Vec<u64> = sim.to_broker.log.iter().map(|(at, _)| *at).collect();
    // Rounds of 3 transmissions (1 + retries_max) 1 s, 2 s apart, then a
    // backoff of 5 s, 10 s, 20 s, 20 s ... between rounds.
    assert_eq!(&times[..6], &[0, 1_000, 3_000, 12_000, 13_000, 15_000]);
    assert!(
        times.len() < 40,
        "bounded: {} CONNECTs in 200 s",
        times.len()
    );
}

#[test]
fn bounds_are_errors_not_growth() {
    let mut sim = Sim::new(9, 100, 0, |_| {});
    sim.client.connect(0);
    assert_eq!(
        sim.client
            .publish(Target::Predefined(1), &[0u8; 250], Qos::AtMostOnce, 0),
        Err(ClientError::TooLarge)
    );
    for _ in 0..4 {
        sim.client
            .publish(Target::Predefined(1), b"x", Qos::AtLeastOnce, 0)
            .unwrap();
    }
    assert_eq!(
        sim.client
            .publish(Target::Predefined(1), b"x", Qos::AtLeastOnce, 0),
        Err(ClientError::InflightFull)
    );
    let mut sim = Sim::new(9, 100, 0, |_| {});
    sim.client.connect(0);
    for index in 0..4u8 {
        sim.client
            .publish(Target::Subject(&[b'a' + index]), b"x", Qos::AtMostOnce, 0)
            .unwrap();
    }
    // Four topics fill the table... and four publishes the in-flight slots.
    assert_eq!(
        sim.client
            .publish(Target::Subject(b"e"), b"x", Qos::AtMostOnce, 0),
        Err(ClientError::InflightFull)
    );
    for index in 0..4u8 {
        sim.client
            .subscribe(&[b'a' + index], Qos::AtMostOnce, 0)
            .unwrap();
    }
    assert_eq!(
        sim.client.subscribe(b"z", Qos::AtMostOnce, 0),
        Err(ClientError::SubscriptionTableFull)
    );
    assert_eq!(
        sim.client.subscribe(&[b'x'; 300], Qos::AtMostOnce, 0),
        Err(ClientError::TooLarge)
    );
}

#[test]
fn unsubscribe_round_trip() {
    let mut sim = Sim::new(10, 0, 0, |_| {});
    sim.connect();
    sim.client
        .subscribe(b"a.>", Qos::AtMostOnce, sim.now)
        .unwrap();
    sim.drive_until(sim.now + 1_000, |sim| {
        sim.count(&Seen::Subscribed { code: Code::Ok }) == 1
    });
    sim.client.unsubscribe(b"a.>", sim.now).unwrap();
    sim.drive_until(sim.now + 1_000, |sim| {
        sim.count(&Seen::Unsubscribed { code: Code::Ok }) == 1
    });
    assert!(sim.broker.subscriptions.is_empty());
    assert_eq!(sim.to_broker.log.last().unwrap().1, b"\x90\x02a.>");
}

impl<S: Storage> Sim<S> {
    fn acked_ids(&self) -> Vec<u32> {
        self.events
            .iter()
            .filter_map(|event| match event {
                Seen::PublishAcked { msg_id } => Some(*msg_id),
                _ => None,
            })
            .collect()
    }

    /// Every QoS 1 PUBLISH the device sent from log entry `from` on:
    /// (msg id, encoded frame).
    fn qos1_publishes(&self, from: usize) -> Vec<(u32, Vec<u8>)> {
        self.to_broker.log[from..]
            .iter()
            .filter_map(|(_, bytes)| match decode_from_device(bytes).unwrap() {
                Frame::Publish {
                    qos: Qos::AtLeastOnce,
                    msg_id,
                    ..
                } => Some((msg_id, bytes.clone())),
                _ => None,
            })
            .collect()
    }

    fn routed_payloads(&self) -> Vec<Vec<u8>> {
        let mut payloads: Vec<Vec<u8>> =
            self.broker.routed.iter().map(|(_, p)| p.clone()).collect();
        payloads.sort();
        payloads
    }
}

/// QoS 1 across a reboot: publishes, the link dies with some of them routed
/// but not acknowledged, the device resets and builds its client from the
/// same flash. Every message is routed once and acknowledged once, the
/// retransmissions carry the same msg ids (byte for byte the same frames),
/// the flash ends empty, and new publishes after the reboot get fresh ids
/// that the broker's de-duplication window does not swallow.
#[test]
fn qos1_survives_a_reboot_with_the_same_msg_ids() {
    for seed in 1..=30 {
        let mut sim = Sim::with_flash(seed, 20, 20, Flash::new());
        sim.connect();
        let mut ids = Vec::new();
        for index in 0..4u8 {
            let target = if index % 2 == 0 {
                Target::Subject(b"sensors.t")
            } else {
                Target::Predefined(3)
            };
            let msg_id = sim
                .client
                .publish(target, &[b'a', index], Qos::AtLeastOnce, sim.now)
                .unwrap();
            ids.push(msg_id);
        }
        assert_eq!(sim.flash().records(), 4, "seed {seed}: kept before sent");
        // Run until (seed-dependent) 1 to 3 messages reached the broker, then
        // the link dies and the device resets.
        let routed_before = 1 + (seed as usize % 3);
        sim.drive_until(sim.now + 120_000, |sim| {
            sim.broker.routed.len() >= routed_before
        });
        sim.to_broker.loss_percent = 100;
        sim.to_device.loss_percent = 100;
        sim.drive_until(sim.now + 500, |_| false);
        let acked_before = sim.acked_ids();
        assert!(
            acked_before.len() < 4,
            "seed {seed}: a reboot with nothing in flight"
        );
        sim.reboot();
        sim.to_broker.loss_percent = 20;
        sim.to_device.loss_percent = 20;
        let log_at_reboot = sim.to_broker.log.len();
        sim.client.connect(sim.now);
        let done = sim.drive_until(sim.now + 600_000, |sim| sim.acked_ids().len() >= 4);
        assert!(done, "seed {seed}: {:?}", sim.events);
        sim.drive_until(sim.now + 5_000, |_| false);

        let mut acked = sim.acked_ids();
        acked.sort_unstable();
        assert_eq!(acked, ids, "seed {seed}: each acknowledged exactly once");
        assert_eq!(
            sim.routed_payloads(),
            [
                b"a\0".to_vec(),
                b"a\x01".to_vec(),
                b"a\x02".to_vec(),
                b"a\x03".to_vec()
            ],
            "seed {seed}: each routed exactly once"
        );
        let after = sim.qos1_publishes(log_at_reboot);
        for id in ids.iter().filter(|id| !acked_before.contains(id)) {
            assert!(
                after.iter().any(|(msg_id, _)| msg_id == id),
                "seed {seed}: msg {id} resent after the reboot"
            );
        }
        let all = sim.qos1_publishes(0);
        for (msg_id, bytes) in &all {
            assert!(ids.contains(msg_id), "seed {seed}: only the original ids");
            assert!(
                all.iter()
                    .filter(|(id, _)| id == msg_id)
                    .all(|(_, b)| b == bytes),
                "seed {seed}: msg {msg_id} resent differently"
            );
        }
        let reconnect = sim.frames_to_broker()[log_at_reboot..]
            .iter()
            .find(|frame| matches!(frame, Frame::Connect { .. }))
            .copied();
        assert!(
            matches!(
                reconnect,
                Some(Frame::Connect {
                    clean_session: false,
                    ..
                })
            ),
            "seed {seed}: a restored client keeps the session"
        );
        assert_eq!(
            sim.flash().records(),
            0,
            "seed {seed}: acked records removed"
        );

        // After the reboot, new ids continue past every id handed out before.
        let mut fresh = Vec::new();
        for index in 0..4u8 {
            let msg_id = sim
                .client
                .publish(
                    Target::Predefined(3),
                    &[b'b', index],
                    Qos::AtLeastOnce,
                    sim.now,
                )
                .unwrap();
            assert!(
                !ids.contains(&msg_id),
                "seed {seed}: msg id {msg_id} reused"
            );
            fresh.push(msg_id);
        }
        let done = sim.drive_until(sim.now + 600_000, |sim| sim.acked_ids().len() >= 8);
        assert!(done, "seed {seed}: {:?}", sim.events);
        assert_eq!(
            sim.broker.routed.len(),
            8,
            "seed {seed}: fresh ids are not duplicates"
        );
        assert_eq!(sim.client.stats().storage_errors, 0);
    }
}

/// A store that fails makes `publish` fail: nothing is queued or sent, and
/// the next publish, once the flash works, goes through. A failed counter
/// write is the same. A remove that fails after PUBACK is retried.
#[test]
fn storage_failures_are_reported_not_dropped() {
    let mut sim = Sim::with_flash(11, 0, 0, Flash::new());
    sim.connect();
    // The counter is written before the first msg id is handed out.
    sim.flash().fail_counter = true;
    assert_eq!(
        sim.client
            .publish(Target::Predefined(3), b"1", Qos::AtLeastOnce, sim.now),
        Err(ClientError::Storage)
    );
    sim.flash().fail_counter = false;
    sim.flash().fail_stores = true;
    for target in [Target::Subject(b"sensors.t"), Target::Predefined(3)] {
        assert_eq!(
            sim.client.publish(target, b"1", Qos::AtLeastOnce, sim.now),
            Err(ClientError::Storage)
        );
    }
    sim.drive_until(sim.now + 5_000, |_| false);
    assert!(
        !sim.frames_to_broker()
            .iter()
            .any(|frame| matches!(frame, Frame::Publish { .. } | Frame::Register { .. })),
        "nothing was queued: {:?}",
        sim.frames_to_broker()
    );
    assert_eq!(sim.client.stats().storage_errors, 3);
    assert!(sim
        .events
        .iter()
        .all(|event| matches!(event, Seen::Connected { .. })));
    // QoS 0 is not kept, so it does not need the flash.
    sim.client
        .publish(Target::Predefined(3), b"0", Qos::AtMostOnce, sim.now)
        .unwrap();
    sim.drive_until(sim.now + 1_000, |sim| sim.broker.routed.len() == 1);
    assert_eq!(sim.flash().records(), 0);
    sim.flash().fail_stores = false;
    // Four slots are still free: the failures took none.
    let ids: Vec<u32> = (0..4u8)
        .map(|index| {
            sim.client
                .publish(Target::Predefined(3), &[index], Qos::AtLeastOnce, sim.now)
                .unwrap()
        })
        .collect();
    assert_eq!(sim.flash().records(), 4);
    assert!(sim.flash().counter.is_some());
    // The broker acknowledges them but the flash cannot erase.
    sim.flash().fail_removes = true;
    sim.drive_until(sim.now + 5_000, |sim| sim.acked_ids().len() == 4);
    let mut acked = sim.acked_ids();
    acked.sort_unstable();
    assert_eq!(acked, ids);
    assert_eq!(sim.flash().records(), 4, "the removes failed");
    let errors = sim.client.stats().storage_errors;
    assert!(errors >= 3 + 4, "{errors}");
    sim.flash().fail_removes = false;
    sim.client.handle_timeout(sim.now + 1);
    assert_eq!(sim.flash().records(), 0, "retried once the flash works");
    assert_eq!(sim.broker.routed.len(), 5, "four QoS 1, one QoS 0");

    // A record too large for BUF with its subject is refused up front.
    let subject = [b's'; 200];
    assert_eq!(
        sim.client.publish(
            Target::Subject(&subject),
            &[0u8; 60],
            Qos::AtLeastOnce,
            sim.now
        ),
        Err(ClientError::TooLarge)
    );
    // Unreadable flash: the client is not built and nothing is lost.
    let mut flash = sim.client.into_storage();
    flash.slots[0] = Some(b"\x02\x07\x03x".to_vec());
    flash.fail_loads = true;
    let settings = Config::new(b"dev1").unwrap();
    assert!(matches!(
        TestClient::with_storage(settings, &mut flash),
        Err(ClientError::Storage)
    ));
    assert_eq!(flash.records(), 1);
}

/// What a boot finds in the flash: a record that does not parse is removed
/// and counted; the others are queued in their slots with their ids; the
/// counter says where new ids start; and a restored client connects
/// without cleaning the session.
#[test]
fn restored_records_and_counter() {
    let mut flash = Flash::new();
    flash.slots[0] = Some(b"\x02\x07\x03x".to_vec()); // msg 7 to predefined 3, "x"
    flash.slots[1] = Some(b"\x09garbage".to_vec());
    flash.slots[3] = Some(b"\x01\x05\x09sensors.ty".to_vec()); // msg 5 to "sensors.t", "y"
    flash.counter = Some(40);
    let mut sim = Sim::with_flash(12, 0, 0, flash);
    assert_eq!(sim.client.stats().records_discarded, 1);
    assert_eq!(sim.flash().records(), 2);
    sim.connect();
    // Restored ids count toward the msg id span: new id 40 would be 35 past
    // msg 5, so a QoS 1 publish waits (and spends no id) until 5 is acked.
    assert_eq!(
        sim.client
            .publish(Target::Predefined(3), b"w", Qos::AtLeastOnce, sim.now),
        Err(ClientError::InflightFull)
    );
    sim.drive_until(sim.now + 5_000, |sim| sim.acked_ids().len() == 2);
    let mut acked = sim.acked_ids();
    acked.sort_unstable();
    assert_eq!(acked, [5, 7]);
    assert_eq!(
        sim.routed_payloads(),
        [b"x".to_vec(), b"y".to_vec()],
        "{:?}",
        sim.broker.routed
    );
    assert!(matches!(
        sim.frames_to_broker()[0],
        Frame::Connect {
            clean_session: false,
            ..
        }
    ));
    let msg_id = sim
        .client
        .publish(Target::Predefined(3), b"z", Qos::AtLeastOnce, sim.now)
        .unwrap();
    assert_eq!(msg_id, 40);
    assert_eq!(sim.flash().counter, Some(40 + 16), "a lease of 16 ids");
    assert_eq!(sim.flash().records(), 1);

    // An empty flash: a clean session, ids from 1, and one counter write
    // per 16 ids.
    let mut sim = Sim::with_flash(13, 0, 0, Flash::new());
    sim.connect();
    assert!(matches!(
        sim.frames_to_broker()[0],
        Frame::Connect {
            clean_session: true,
            ..
        }
    ));
    for expected in 1..=20u32 {
        let msg_id = sim
            .client
            .publish(Target::Predefined(3), b"z", Qos::AtLeastOnce, sim.now)
            .unwrap();
        assert_eq!(msg_id, expected);
        sim.drive_until(sim.now + 5_000, |sim| {
            sim.acked_ids().len() == expected as usize
        });
    }
    assert_eq!(sim.flash().counter, Some(33));
    // 20 stores, 20 removes, 2 counter writes.
    assert_eq!(sim.flash().writes, 42);
}

/// The broker de-duplicates over the last 16 msg ids it *accepted*. If only
/// the number of unacknowledged publishes were bounded, reordering and lost
/// PUBACKs would let later ids (and earlier ones accepted late) push a
/// long-unacknowledged id out of that window, and its next retry would be
/// passed on a second time. The client keeps every new msg id less than 8
/// past the oldest unacknowledged one, so each id is passed on exactly once.
#[test]
fn qos1_msg_ids_stay_within_the_brokers_window_under_reordering() {
    let mut doubled = Vec::new();
    for seed in 1..=20 {
        let mut sim = Sim::new(seed, 25, 10, |config| {
            config.retries_max = 8;
            config.retry_interval_ms = 200;
        });
        // Frames overtake each other by up to 150 ms.
        sim.to_broker.jitter_ms = 150;
        sim.to_device.jitter_ms = 150;
        sim.connect();
        let mut ids = Vec::new();
        for index in 0..48u32 {
            loop {
                match sim.client.publish(
                    Target::Predefined(3),
                    &index.to_le_bytes(),
                    Qos::AtLeastOnce,
                    sim.now,
                ) {
                    Ok(msg_id) => {
                        ids.push(msg_id);
                        break;
                    }
                    Err(ClientError::InflightFull) => {
                        let acked = sim.count_acked();
                        sim.drive_until(sim.now + 60_000, |sim| sim.count_acked() > acked);
                    }
                    Err(error) => panic!("seed {seed}: {error}"),
                }
            }
        }
        let done = sim.drive_until(sim.now + 600_000, |sim| sim.count_acked() == 48);
        assert!(done, "seed {seed}: {} of 48 acked", sim.count_acked());
        for msg_id in &ids {
            let copies = sim
                .broker
                .routed_msg_ids
                .iter()
                .filter(|id| *id == msg_id)
                .count();
            if copies != 1 {
                doubled.push((seed, *msg_id, copies));
            }
        }
    }
    assert!(
        doubled.is_empty(),
        "(seed, msg id, times passed on): {doubled:?}"
    );
}

/// The span bound itself: with msg id 1 unacknowledged, ids 2..=8 may go
/// (and be acknowledged), a 9th waits for id 1's PUBACK.
#[test]
fn a_new_msg_id_stays_less_than_8_past_the_oldest_unacknowledged() {
    let mut client: Client<4, 16, 128> = Client::new(Config::new(b"dev1").unwrap());
    let mut buf = [0u8; 128];
    client.connect(0);
    client.poll_transmit(&mut buf).expect("CONNECT");
    let connack = encode(Frame::Connack {
        session_present: false,
        code: Code::Ok,
        session_token: 1,
    });
    client.handle_input(&connack, 0).unwrap();
    let first = client
        .publish(Target::Predefined(1), b"x", Qos::AtLeastOnce, 0)
        .unwrap();
    assert_eq!(first, 1);
    client.poll_transmit(&mut buf).expect("PUBLISH 1");
    let mut sent = Vec::new();
    for _ in 0..20 {
        match client.publish(Target::Predefined(1), b"x", Qos::AtLeastOnce, 0) {
            Ok(msg_id) => {
                sent.push(msg_id);
                client.poll_transmit(&mut buf).expect("PUBLISH");
                let puback = encode(Frame::Puback {
                    msg_id,
                    code: Code::Ok,
                });
                client.handle_input(&puback, 0).unwrap();
            }
            Err(error) => {
                assert_eq!(error, ClientError::InflightFull);
                break;
            }
        }
    }
    assert_eq!(sent, (2..=8).collect::<Vec<_>>(), "id 9 waits for id 1");
    // QoS 0 and replies are not held back.
    client
        .publish(Target::Predefined(1), b"x", Qos::AtMostOnce, 0)
        .unwrap();
    let puback = encode(Frame::Puback {
        msg_id: 1,
        code: Code::Ok,
    });
    client.handle_input(&puback, 0).unwrap();
    assert_eq!(
        client.publish(Target::Predefined(1), b"x", Qos::AtLeastOnce, 0),
        Ok(9)
    );
}

/// The broker releases the deliveries it held for a REGACK as soon as the
/// REGACK arrives, which may be after the PONG that ends a wake: the client
/// is asleep again by then, and still answers REGISTER and takes them.
#[test]
fn deliveries_after_the_pong_of_a_wake_are_accepted() {
    for seed in 1..=10 {
        let loss = if seed == 1 { 0 } else { 15 };
        let mut sim = Sim::new(seed, loss, 0, |config| config.retries_max = 8);
        sim.broker.pong_before_held = true;
        sim.connect();
        sim.client
            .subscribe(b"cmd.>", Qos::AtLeastOnce, sim.now)
            .unwrap();
        let subscribed = sim.drive_until(sim.now + 60_000, |sim| {
            sim.count(&Seen::Subscribed { code: Code::Ok }) == 1
        });
        assert!(subscribed, "seed {seed}: {:?}", sim.events);
        sim.client.sleep(600, sim.now).unwrap();
        let asleep = sim.drive_until(sim.now + 60_000, |sim| sim.events.contains(&Seen::Asleep));
        assert!(asleep, "seed {seed}: {:?}", sim.events);
        // New subjects: each needs a REGISTER before its message.
        sim.broker
            .deliver(b"cmd.dev1.a", b"a", Qos::AtLeastOnce, None);
        sim.broker
            .deliver(b"cmd.dev1.b", b"b", Qos::AtLeastOnce, None);
        sim.client.wake(sim.now).unwrap();
        let done = sim.drive_until(sim.now + 60_000, |sim| {
            sim.events.contains(&Seen::WakeDone)
                && sim.broker.pending.is_empty()
                && sim.messages().len() >= 2
        });
        assert!(
            done,
            "seed {seed}: {:?}, broker still holds {}",
            sim.events,
            sim.broker.pending.len()
        );
        let mut messages = sim.messages();
        messages.sort();
        assert_eq!(
            messages,
            [
                (Some(b"cmd.dev1.a".to_vec()), b"a".to_vec()),
                (Some(b"cmd.dev1.b".to_vec()), b"b".to_vec())
            ],
            "seed {seed}"
        );
        if seed == 1 {
            // Without loss the PONG came first: both arrived while asleep.
            let wake_done = sim.events.iter().position(|e| *e == Seen::WakeDone);
            let first = sim
                .events
                .iter()
                .position(|e| matches!(e, Seen::Message { .. }));
            assert!(wake_done < first, "{:?}", sim.events);
        }
        assert!(sim.broker.device_topics.iter().all(|(_, _, acked)| *acked));
        assert_eq!(sim.client.poll_timeout(), None, "seed {seed}: still asleep");
    }
}

/// A subject the broker registered (for a delivery) and that the device
/// then publishes to: a publish to it queued across a lost session must
/// still go to that subject, registered again, not stay stuck or follow the
/// freed topic slot to another subject.
#[test]
fn a_queued_publish_to_a_broker_registered_subject_survives_a_new_session() {
    let mut sim = Sim::new(14, 0, 0, |_| {});
    sim.connect();
    sim.client
        .subscribe(b"cmd.>", Qos::AtMostOnce, sim.now)
        .unwrap();
    sim.drive_until(sim.now + 1_000, |sim| {
        sim.count(&Seen::Subscribed { code: Code::Ok }) == 1
    });
    sim.broker
        .deliver(b"cmd.dev1.a", b"hello", Qos::AtMostOnce, None);
    sim.drive_until(sim.now + 1_000, |sim| !sim.messages().is_empty());
    assert_eq!(
        sim.messages(),
        [(Some(b"cmd.dev1.a".to_vec()), b"hello".to_vec())]
    );
    // The broker goes away with the publish unacknowledged, and comes back
    // without the session (a restart): its topic ids are gone.
    sim.broker.answering = false;
    let msg_id = sim
        .client
        .publish(
            Target::Subject(b"cmd.dev1.a"),
            b"queued",
            Qos::AtLeastOnce,
            sim.now,
        )
        .unwrap();
    let lost = sim.drive_until(sim.now + 120_000, |sim| {
        sim.count(&Seen::Disconnected {
            reason: DisconnectReason::Timeout,
        }) == 1
    });
    assert!(lost, "{:?}", sim.events);
    sim.broker.answering = true;
    sim.broker.has_session = false;
    let fresh = Seen::Connected {
        session_present: false,
    };
    let connected = sim.drive_until(sim.now + 120_000, |sim| sim.count(&fresh) == 2);
    assert!(connected, "{:?}", sim.events);
    // A publish to another subject takes the first free topic slot.
    sim.client
        .publish(Target::Subject(b"other"), b"o", Qos::AtMostOnce, sim.now)
        .unwrap();
    let acked = sim.drive_until(sim.now + 60_000, |sim| {
        sim.count(&Seen::PublishAcked { msg_id }) == 1 && sim.broker.routed.len() == 2
    });
    assert!(acked, "{:?}, routed {:?}", sim.events, sim.broker.routed);
    let mut routed = sim.broker.routed.clone();
    routed.sort();
    assert_eq!(
        routed,
        [
            (b"cmd.dev1.a".to_vec(), b"queued".to_vec()),
            (b"other".to_vec(), b"o".to_vec())
        ]
    );
}

/// The same by hand, with the broker's REGISTER retransmitted (its REGACK
/// lost) after the device published to the subject: the subject stays the
/// device's, and the new session registers it again for the queued publish.
#[test]
fn a_retransmitted_broker_register_leaves_a_published_subject_ours() {
    let mut client: TestClient = Client::new(Config::new(b"dev1").unwrap());
    let mut buf = [0u8; 256];
    let connack = encode(Frame::Connack {
        session_present: false,
        code: Code::Ok,
        session_token: 1,
    });
    let register = encode(Frame::Register {
        id: 5,
        subject: b"cmd.dev1.a",
    });
    client.connect(0);
    client.poll_transmit(&mut buf).expect("CONNECT");
    client.handle_input(&connack, 0).unwrap();
    client.handle_input(&register, 0).unwrap();
    client.poll_transmit(&mut buf).expect("REGACK");
    let msg_id = client
        .publish(Target::Subject(b"cmd.dev1.a"), b"q", Qos::AtLeastOnce, 0)
        .unwrap();
    let len = client.poll_transmit(&mut buf).expect("PUBLISH");
    assert!(matches!(
        decode_from_device(&buf[..len]).unwrap(),
        Frame::Publish {
            topic: TopicRef::Registered(5),
            ..
        }
    ));
    client.handle_input(&register, 0).unwrap();
    client.poll_transmit(&mut buf).expect("REGACK again");
    // The broker ends the session; the reconnect finds none.
    client
        .handle_input(&encode(Frame::Disconnect { sleep_s: None }), 0)
        .unwrap();
    client.handle_timeout(client.poll_timeout().expect("a reconnect is due"));
    client.poll_transmit(&mut buf).expect("CONNECT");
    client.handle_input(&connack, 0).unwrap();
    let len = client.poll_transmit(&mut buf).expect("REGISTER");
    assert_eq!(
        decode_from_device(&buf[..len]).unwrap(),
        Frame::Register {
            id: 1,
            subject: b"cmd.dev1.a"
        }
    );
    let regack = encode(Frame::Regack {
        req_id: 1,
        topic: 9,
        code: Code::Ok,
    });
    client.handle_input(&regack, 0).unwrap();
    let len = client.poll_transmit(&mut buf).expect("the queued PUBLISH");
    assert_eq!(
        decode_from_device(&buf[..len]).unwrap(),
        Frame::Publish {
            qos: Qos::AtLeastOnce,
            topic: TopicRef::Registered(9),
            msg_id,
            payload: b"q"
        }
    );
}
