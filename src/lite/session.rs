//! One device's session: what a device registered, what it may still owe or be
//! owed, and whether it sleeps. Plain data, no I/O and no clock: the gateway
//! passes the time in. Thousands of mostly idle devices each hold one, so the
//! common part is small and everything only some devices use (subscriptions,
//! open requests, a sleep buffer, a will) sits behind one optional box.

use std::collections::VecDeque;
use std::net::SocketAddr;

use super::gateway::Peer;

/// Subjects a device may register (its session ids are 1..=this).
pub const TOPICS_PER_SESSION_MAX: usize = 32;
/// Recent QoS 1 message ids remembered to drop retransmitted duplicates.
pub const RECENT_MSG_IDS: usize = 16;
/// Requests a device may have open at once (reply handles).
pub const REPLY_HANDLES_MAX: usize = 8;
/// Subscriptions per device session.
pub const SUBSCRIPTIONS_PER_SESSION_MAX: usize = 16;
/// Deliveries held per session while the device has not yet acknowledged the
/// REGISTER of their subject (beyond it the oldest is dropped, counted).
pub const AWAITING_REGACK_MSGS_MAX: usize = 16;
/// Messages and bytes buffered for a sleeping device; beyond either, the oldest
/// buffered message is dropped (and counted), so a sleeper wakes to the newest.
pub const SLEEP_BUFFER_MSGS_MAX: usize = 32;
pub const SLEEP_BUFFER_BYTES_MAX: usize = 4096;
/// QoS 1 messages and bytes queued for a device until its PUBACK (sent or
/// waiting to be sent); beyond either, a new one is refused (counted): the
/// queued ones may be in flight already.
pub const QOS1_QUEUE_MSGS_MAX: usize = 32;
pub const QOS1_QUEUE_BYTES_MAX: usize = 4096;
/// A QoS 1 message is sent at most this many times (awake retries and wakes
/// together); then it is dropped as undeliverable (counted).
pub const QOS1_SENDS_MAX: u8 = 6;
/// The first retransmission of an unacknowledged QoS 1 message to an awake
/// device; each later one waits twice as long, up to 16 s.
pub const QOS1_RETRY_MS: u64 = 2_000;
const QOS1_RETRY_MS_MAX: u64 = 16_000;
/// A new QoS 1 msg id goes out only while it is less than this past the
/// oldest unacknowledged one (the device de-duplicates over 16 ids).
pub const QOS1_MSG_ID_SPAN_MAX: u32 = perch_wire::DEDUP_WINDOW_MSG_IDS as u32 / 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    /// Heard within its keepalive.
    Awake,
    /// Announced a sleep: its messages are buffered until it pings.
    Asleep { until_ms: u64 },
}

/// A will: published for the device when its session is lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    pub subject: Box<[u8]>,
    pub payload: Box<[u8]>,
    pub qos1: bool,
}

pub struct DeviceSession {
    pub addr: Peer,
    pub token: u32,
    /// 0: never expires.
    keepalive_s: u32,
    last_heard_ms: u64,
    /// 0: awake; else asleep, announced for `sleep_s` from then.
    asleep_until_ms: u64,
    sleep_s: u32,
    /// No frame but its CONNECT yet: a repeated CONNECT is a retransmit.
    pub fresh: bool,
    /// Connected without clean_session: the session outlives its connection
    /// (and, with a store, a broker restart).
    pub persistent: bool,
    /// The client id and then the session's topic ids, in one allocation:
    /// `[id length u8][client id]`, then per topic (both directions share one
    /// space) `[length u8][confirmed u8][subject]`, id n being the n-th. A
    /// topic the broker registered is confirmed by the device's REGACK.
    names: Vec<u8>,
    /// QoS 1 de-duplication, allocated by the first QoS 1 publish.
    recent: Option<Box<RecentMsgIds>>,
    extra: Option<Box<Extra>>,
}

/// The last msg ids accepted, a ring.
struct RecentMsgIds {
    ids: [u32; RECENT_MSG_IDS],
    len: u8,
    next: u8,
}

/// A device's subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    pub filter: Box<[u8]>,
    /// The gateway's sid for it on its internal NATS session.
    pub sid: u64,
    /// The SUBSCRIBE's max_qos was 1.
    pub qos1: bool,
}

/// A QoS 1 message for the device, kept until its PUBACK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedQos1 {
    pub msg_id: u32,
    /// A registered topic whose REGACK must come first; 0: none needed.
    pub awaits_topic: u32,
    /// The encoded PUBLISH, msg id included.
    pub frame: Box<[u8]>,
    /// When it was last sent (0: not yet) and how often.
    pub sent_at_ms: u64,
    pub sends: u8,
}

/// What a QoS 1 pass wants sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Qos1Send {
    Frame(Box<[u8]>),
    /// Ask again for the REGACK of this broker-registered topic.
    Register(u32),
}

/// What only some devices need.
#[derive(Default)]
struct Extra {
    /// The device's subscriptions.
    subscriptions: Vec<Subscription>,
    /// Open requests to the device: (handle, the requester's reply subject).
    replies: VecDeque<(u32, Box<[u8]>)>,
    next_reply_handle: u32,
    /// Encoded frames waiting for a sleeping device, oldest first.
    sleep_buffer: VecDeque<Box<[u8]>>,
    /// Deliveries waiting for the REGACK of their topic: (topic, frame).
    awaiting_regack: VecDeque<(u32, Box<[u8]>)>,
    sleep_buffer_bytes: usize,
    /// QoS 1 messages for the device, in msg id order, until their PUBACK.
    qos1: VecDeque<QueuedQos1>,
    qos1_bytes: usize,
    /// The msg id the next QoS 1 message for the device gets (0: 1).
    next_msg_id: u32,
    will: Option<Will>,
}

impl DeviceSession {
    pub fn new(client_id: &[u8], addr: Peer, token: u32, keepalive_s: u32, now_ms: u64) -> Self {
        let mut names = Vec::with_capacity(1 + client_id.len());
        // Client ids are at most CLIENT_ID_BYTES_MAX (64) bytes: the gateway
        // checks before it opens a session.
        assert!(
            client_id.len() <= usize::from(u8::MAX),
            "client id length checked"
        );
        names.push(client_id.len() as u8);
        names.extend_from_slice(client_id);
        DeviceSession {
            addr,
            token,
            keepalive_s,
            last_heard_ms: now_ms,
            asleep_until_ms: 0,
            sleep_s: 0,
            fresh: true,
            persistent: false,
            names,
            recent: None,
            extra: None,
        }
    }

    pub fn client_id(&self) -> &[u8] {
        let len = usize::from(self.names[0]);
        &self.names[1..1 + len]
    }

    /// Where the topic entries start in `names`.
    fn topics_at(&self) -> usize {
        1 + usize::from(self.names[0])
    }

    fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(|| {
            Box::new(Extra {
                next_reply_handle: 1,
                ..Extra::default()
            })
        })
    }

    pub fn presence(&self) -> Presence {
        match self.asleep_until_ms {
            0 => Presence::Awake,
            until_ms => Presence::Asleep { until_ms },
        }
    }

    pub fn heard(&mut self, now_ms: u64) {
        self.last_heard_ms = now_ms;
    }

    pub fn set_keepalive_s(&mut self, keepalive_s: u32) {
        self.keepalive_s = keepalive_s;
    }

    /// Ends sleeping (a CONNECT that keeps the session).
    pub fn wake(&mut self) {
        self.asleep_until_ms = 0;
    }

    /// Sleeps for `sleep_s` from `now_ms` (DISCONNECT with a duration).
    pub fn sleep(&mut self, sleep_s: u32, now_ms: u64) {
        self.sleep_s = sleep_s;
        self.asleep_until_ms = (now_ms + u64::from(sleep_s) * 1000).max(1);
    }

    /// A sleeper's PING collected its messages: it sleeps again for another
    /// `sleep_s`.
    pub fn sleep_again(&mut self, now_ms: u64) {
        if self.asleep_until_ms != 0 {
            self.sleep(self.sleep_s, now_ms);
        }
    }

    /// The session id of `subject`, registering it if new (`confirmed`: the
    /// device registered it itself); None when full.
    pub fn register(&mut self, subject: &[u8], confirmed: bool) -> Option<u32> {
        if let Some(id) = self.topic_id(subject) {
            return Some(id);
        }
        let count = self.topic_entries().count();
        if count >= TOPICS_PER_SESSION_MAX || subject.len() > usize::from(u8::MAX) {
            return None;
        }
        // Exactly what is needed: thousands of sessions each keep theirs.
        self.names.reserve_exact(2 + subject.len());
        self.names.push(subject.len() as u8);
        self.names.push(u8::from(confirmed));
        self.names.extend_from_slice(subject);
        Some(count as u32 + 1)
    }

    /// (confirmed, subject) per topic, in id order; with each entry's offset.
    fn topic_entries(&self) -> impl Iterator<Item = (usize, bool, &[u8])> {
        let mut at = self.topics_at();
        let topics = self.names.as_slice();
        std::iter::from_fn(move || {
            let len = usize::from(*topics.get(at)?);
            let confirmed = *topics.get(at + 1)? != 0;
            let subject = topics.get(at + 2..at + 2 + len)?;
            let entry = (at, confirmed, subject);
            at += 2 + len;
            Some(entry)
        })
    }

    /// The subject of a session topic id.
    pub fn topic(&self, id: u32) -> Option<&[u8]> {
        let index = (id as usize).checked_sub(1)?;
        self.topic_entries()
            .nth(index)
            .map(|(_, _, subject)| subject)
    }

    /// The session id of `subject`, if registered, and whether the device
    /// confirmed it.
    pub fn topic_id(&self, subject: &[u8]) -> Option<u32> {
        self.topic_entries()
            .position(|(_, _, t)| t == subject)
            .map(|i| i as u32 + 1)
    }

    pub fn topic_confirmed(&self, id: u32) -> bool {
        let Some(index) = (id as usize).checked_sub(1) else {
            return false;
        };
        self.topic_entries()
            .nth(index)
            .is_some_and(|(_, confirmed, _)| confirmed)
    }

    /// The device acknowledged the broker's REGISTER of `id`: the deliveries
    /// held for it, in order.
    pub fn confirm_topic(&mut self, id: u32) -> Vec<Box<[u8]>> {
        let Some(index) = (id as usize).checked_sub(1) else {
            return Vec::new();
        };
        let Some((at, _, _)) = self.topic_entries().nth(index) else {
            return Vec::new();
        };
        self.names[at + 1] = 1;
        match self.extra.as_mut() {
            Some(extra) => {
                // QoS 1 messages waiting for it go with the next pass.
                for msg in extra.qos1.iter_mut().filter(|m| m.awaits_topic == id) {
                    msg.awaits_topic = 0;
                    msg.sent_at_ms = 0;
                }
                let (ready, waiting): (VecDeque<_>, VecDeque<_>) = extra
                    .awaiting_regack
                    .drain(..)
                    .partition(|(topic, _)| *topic == id);
                extra.awaiting_regack = waiting;
                ready.into_iter().map(|(_, frame)| frame).collect()
            }
            None => Vec::new(),
        }
    }

    /// Holds a delivery until its topic's REGACK; returns how many older
    /// ones were dropped to stay in bounds.
    pub fn await_regack(&mut self, topic: u32, frame: Box<[u8]>) -> usize {
        let waiting = &mut self.extra().awaiting_regack;
        waiting.push_back((topic, frame));
        let mut dropped = 0;
        while waiting.len() > AWAITING_REGACK_MSGS_MAX {
            waiting.pop_front();
            dropped += 1;
        }
        dropped
    }

    /// The device refused the broker's REGISTER of `id`: drop what waits for
    /// it; returns how many.
    pub fn refuse_topic(&mut self, id: u32) -> usize {
        let Some(extra) = self.extra.as_mut() else {
            return 0;
        };
        let before = extra.awaiting_regack.len();
        extra.awaiting_regack.retain(|(topic, _)| *topic != id);
        before - extra.awaiting_regack.len()
    }

    /// Records a QoS 1 message id; false if it was seen recently (a retransmit).
    pub fn first_sight(&mut self, msg_id: u32) -> bool {
        let recent = self.recent.get_or_insert_with(|| {
            Box::new(RecentMsgIds {
                ids: [0; RECENT_MSG_IDS],
                len: 0,
                next: 0,
            })
        });
        if recent.ids[..usize::from(recent.len)].contains(&msg_id) {
            return false;
        }
        recent.ids[usize::from(recent.next)] = msg_id;
        recent.next = (recent.next + 1) % RECENT_MSG_IDS as u8;
        recent.len = (recent.len + 1).min(RECENT_MSG_IDS as u8);
        true
    }

    pub fn subscriptions(&self) -> &[Subscription] {
        self.extra.as_ref().map_or(&[], |e| &e.subscriptions)
    }

    /// The subscription on `filter`, to change its QoS.
    pub fn subscription_mut(&mut self, filter: &[u8]) -> Option<&mut Subscription> {
        let extra = self.extra.as_mut()?;
        extra
            .subscriptions
            .iter_mut()
            .find(|s| *s.filter == *filter)
    }

    /// Adds a subscription; false when the session has as many as allowed.
    pub fn add_subscription(&mut self, filter: &[u8], sid: u64, qos1: bool) -> bool {
        let extra = self.extra();
        if extra.subscriptions.len() >= SUBSCRIPTIONS_PER_SESSION_MAX {
            return false;
        }
        extra.subscriptions.push(Subscription {
            filter: filter.into(),
            sid,
            qos1,
        });
        true
    }

    /// Removes the subscription on `filter`; returns its sid.
    pub fn remove_subscription(&mut self, filter: &[u8]) -> Option<u64> {
        let extra = self.extra.as_mut()?;
        let i = extra
            .subscriptions
            .iter()
            .position(|s| *s.filter == *filter)?;
        Some(extra.subscriptions.swap_remove(i).sid)
    }

    pub fn set_will(&mut self, will: Option<Will>) {
        if will.is_some() || self.extra.is_some() {
            self.extra().will = will;
        }
    }

    pub fn take_will(&mut self) -> Option<Will> {
        self.extra.as_mut()?.will.take()
    }

    /// A handle for a request's reply subject (the oldest open one is
    /// forgotten when all are taken: its requester times out, as with a lost
    /// datagram).
    pub fn open_reply(&mut self, reply: &[u8]) -> u32 {
        let extra = self.extra();
        if extra.replies.len() >= REPLY_HANDLES_MAX {
            extra.replies.pop_front();
        }
        let handle = extra.next_reply_handle;
        extra.next_reply_handle = extra.next_reply_handle.wrapping_add(1).max(1);
        extra.replies.push_back((handle, reply.into()));
        handle
    }

    /// Takes the reply subject of an open request.
    pub fn take_reply(&mut self, handle: u32) -> Option<Box<[u8]>> {
        let replies = &mut self.extra.as_mut()?.replies;
        let i = replies.iter().position(|(h, _)| *h == handle)?;
        replies.remove(i).map(|(_, reply)| reply)
    }

    /// Buffers a frame for a sleeping device; returns how many old frames were
    /// dropped to make room.
    pub fn buffer(&mut self, frame: Box<[u8]>) -> usize {
        let extra = self.extra();
        let mut dropped = 0;
        extra.sleep_buffer_bytes += frame.len();
        extra.sleep_buffer.push_back(frame);
        while extra.sleep_buffer.len() > SLEEP_BUFFER_MSGS_MAX
            || (extra.sleep_buffer_bytes > SLEEP_BUFFER_BYTES_MAX && extra.sleep_buffer.len() > 1)
        {
            if let Some(old) = extra.sleep_buffer.pop_front() {
                extra.sleep_buffer_bytes -= old.len();
                dropped += 1;
            }
        }
        dropped
    }

    /// Everything buffered while asleep, oldest first.
    pub fn take_buffered(&mut self) -> Vec<Box<[u8]>> {
        match self.extra.as_mut() {
            Some(extra) => {
                extra.sleep_buffer_bytes = 0;
                extra.sleep_buffer.drain(..).collect()
            }
            None => Vec::new(),
        }
    }

    /// The msg id for a new QoS 1 message to the device (from 1, wrapping
    /// past 0).
    pub fn take_msg_id(&mut self) -> u32 {
        let extra = self.extra();
        let id = extra.next_msg_id.max(1);
        extra.next_msg_id = id.wrapping_add(1).max(1);
        id
    }

    /// Queues a QoS 1 message for the device; false (refused) when the queue
    /// is full.
    pub fn queue_qos1(&mut self, msg: QueuedQos1) -> bool {
        let extra = self.extra();
        if extra.qos1.len() >= QOS1_QUEUE_MSGS_MAX
            || extra.qos1_bytes + msg.frame.len() > QOS1_QUEUE_BYTES_MAX
        {
            return false;
        }
        extra.qos1_bytes += msg.frame.len();
        extra.qos1.push_back(msg);
        true
    }

    /// The device's PUBACK for `msg_id`: true if that message was queued.
    pub fn acked_qos1(&mut self, msg_id: u32) -> bool {
        let Some(extra) = self.extra.as_mut() else {
            return false;
        };
        let Some(i) = extra.qos1.iter().position(|m| m.msg_id == msg_id) else {
            return false;
        };
        if let Some(msg) = extra.qos1.remove(i) {
            extra.qos1_bytes -= msg.frame.len();
        }
        true
    }

    pub fn qos1_queued(&self) -> usize {
        self.extra.as_ref().map_or(0, |e| e.qos1.len())
    }

    /// Collects the QoS 1 messages to send now into `out`; returns how many
    /// were dropped for having been sent `QOS1_SENDS_MAX` times unacknowledged.
    /// Only messages within `QOS1_MSG_ID_SPAN_MAX` of the oldest queued one
    /// go out. `woke`: the device just woke or reconnected, so every one goes
    /// again; otherwise new ones go, and retries whose time has come.
    pub fn qos1_due(&mut self, now_ms: u64, woke: bool, out: &mut Vec<Qos1Send>) -> usize {
        let Some(oldest) = self.extra.as_ref().and_then(|e| e.qos1.front()) else {
            return 0;
        };
        let oldest = oldest.msg_id;
        // Which topics the window waits for are confirmed (at most a span's
        // worth of lookups).
        let mut confirmed = [true; QOS1_MSG_ID_SPAN_MAX as usize];
        for (i, msg) in self
            .extra
            .as_ref()
            .map(|e| e.qos1.iter())
            .into_iter()
            .flatten()
            .take_while(|m| m.msg_id.wrapping_sub(oldest) < QOS1_MSG_ID_SPAN_MAX)
            .enumerate()
        {
            confirmed[i] = msg.awaits_topic == 0 || self.topic_confirmed(msg.awaits_topic);
        }
        let Some(extra) = self.extra.as_mut() else {
            return 0;
        };
        let mut dropped = 0;
        let mut i = 0;
        let mut asked: Option<u32> = None;
        let mut window = 0;
        while i < extra.qos1.len() {
            let msg = &mut extra.qos1[i];
            if msg.msg_id.wrapping_sub(oldest) >= QOS1_MSG_ID_SPAN_MAX {
                break;
            }
            let is_confirmed = confirmed[window];
            window += 1;
            let due =
                woke || msg.sent_at_ms == 0 || now_ms >= msg.sent_at_ms + retry_after_ms(msg.sends);
            if !due || (!is_confirmed && msg.sent_at_ms == 0 && !woke) {
                // Not yet; or it waits for a REGISTER sent with it just now.
                if !is_confirmed && msg.sent_at_ms == 0 {
                    msg.sent_at_ms = now_ms.max(1);
                }
                i += 1;
                continue;
            }
            if msg.sends >= QOS1_SENDS_MAX {
                if let Some(gone) = extra.qos1.remove(i) {
                    extra.qos1_bytes -= gone.frame.len();
                }
                dropped += 1;
                continue;
            }
            msg.sends += 1;
            msg.sent_at_ms = now_ms.max(1);
            if is_confirmed {
                out.push(Qos1Send::Frame(msg.frame.clone()));
            } else if asked != Some(msg.awaits_topic) {
                asked = Some(msg.awaits_topic);
                out.push(Qos1Send::Register(msg.awaits_topic));
            }
            i += 1;
        }
        dropped
    }

    /// When the next QoS 1 retransmission is due (awake devices only).
    pub fn next_qos1_retry_ms(&self) -> Option<u64> {
        if self.asleep_until_ms != 0 {
            return None;
        }
        let extra = self.extra.as_ref()?;
        let oldest = extra.qos1.front()?.msg_id;
        extra
            .qos1
            .iter()
            .take_while(|m| m.msg_id.wrapping_sub(oldest) < QOS1_MSG_ID_SPAN_MAX)
            .map(|m| m.sent_at_ms + retry_after_ms(m.sends))
            .min()
    }

    /// The session as bytes, for the store: what a device needs after a
    /// broker restart (its topics, subscriptions, will, sleep and QoS 1
    /// state). Not kept: QoS 0 messages, open requests.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(64 + self.names.len());
        w.extend_from_slice(SNAPSHOT_MAGIC);
        w.push(u8::from(self.persistent) | (u8::from(self.asleep_until_ms != 0) << 1));
        for n in [self.token, self.keepalive_s, self.sleep_s] {
            w.extend_from_slice(&n.to_le_bytes());
        }
        match self.addr {
            Peer::Udp(SocketAddr::V4(a)) => {
                w.push(4);
                w.extend_from_slice(&a.ip().octets());
                w.extend_from_slice(&a.port().to_le_bytes());
            }
            Peer::Udp(SocketAddr::V6(a)) => {
                w.push(6);
                w.extend_from_slice(&a.ip().octets());
                w.extend_from_slice(&a.port().to_le_bytes());
            }
            Peer::Stream(_) => w.push(0),
        }
        put_bytes(&mut w, &self.names);
        let recent = self.recent.as_deref();
        let recent_ids = recent.map_or(&[][..], |r| &r.ids[..usize::from(r.len)]);
        w.push(recent_ids.len() as u8);
        w.push(recent.map_or(0, |r| r.next));
        for id in recent_ids {
            w.extend_from_slice(&id.to_le_bytes());
        }
        let extra = self.extra.as_deref();
        let subs = extra.map_or(&[][..], |e| &e.subscriptions[..]);
        w.push(subs.len() as u8);
        for sub in subs {
            w.push(u8::from(sub.qos1));
            put_bytes(&mut w, &sub.filter);
        }
        match extra.and_then(|e| e.will.as_ref()) {
            Some(will) => {
                w.push(1 | (u8::from(will.qos1) << 1));
                put_bytes(&mut w, &will.subject);
                put_bytes(&mut w, &will.payload);
            }
            None => w.push(0),
        }
        w.extend_from_slice(&extra.map_or(0, |e| e.next_msg_id).to_le_bytes());
        let queued = extra.map(|e| &e.qos1);
        w.push(queued.map_or(0, VecDeque::len) as u8);
        for msg in queued.into_iter().flatten() {
            w.extend_from_slice(&msg.msg_id.to_le_bytes());
            w.extend_from_slice(&msg.awaits_topic.to_le_bytes());
            w.push(msg.sends);
            put_bytes(&mut w, &msg.frame);
        }
        let crc = crc32c::crc32c(&w);
        w.extend_from_slice(&crc.to_le_bytes());
        w
    }

    /// A session from [`DeviceSession::snapshot`]'s bytes, heard at `now_ms`
    /// (a sleeper gets a whole sleep from then). `stream_addr` stands in for
    /// the address of a device that was on a stream connection (gone now).
    /// Subscriptions come back with sid 0: the caller gives them sids.
    pub fn restore(bytes: &[u8], now_ms: u64, stream_addr: Peer) -> Result<Self, SnapshotError> {
        let (body, crc) = bytes
            .split_last_chunk::<4>()
            .ok_or(SnapshotError::Truncated)?;
        if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
            return Err(SnapshotError::Checksum);
        }
        let mut r = Reader(body);
        if r.take(SNAPSHOT_MAGIC.len())? != SNAPSHOT_MAGIC {
            return Err(SnapshotError::Format);
        }
        let flags = r.u8()?;
        let (token, keepalive_s, sleep_s) = (r.u32()?, r.u32()?, r.u32()?);
        let addr = match r.u8()? {
            4 => {
                let ip: [u8; 4] = r.take(4)?.try_into().map_err(|_| SnapshotError::Format)?;
                Peer::Udp(SocketAddr::from((ip, r.u16()?)))
            }
            6 => {
                let ip: [u8; 16] = r.take(16)?.try_into().map_err(|_| SnapshotError::Format)?;
                Peer::Udp(SocketAddr::from((ip, r.u16()?)))
            }
            0 => stream_addr,
            _ => return Err(SnapshotError::Format),
        };
        let names = r.bytes()?.to_vec();
        let id_len = usize::from(*names.first().ok_or(SnapshotError::Format)?);
        if id_len == 0 || names.len() < 1 + id_len {
            return Err(SnapshotError::Format);
        }
        let mut session =
            DeviceSession::new(&names[1..1 + id_len], addr, token, keepalive_s, now_ms);
        session.names = names;
        session.persistent = flags & 1 != 0;
        session.fresh = false;
        let recent_len = r.u8()?;
        let recent_next = r.u8()?;
        if usize::from(recent_len) > RECENT_MSG_IDS || usize::from(recent_next) >= RECENT_MSG_IDS {
            return Err(SnapshotError::Format);
        }
        if recent_len > 0 {
            let mut recent = Box::new(RecentMsgIds {
                ids: [0; RECENT_MSG_IDS],
                len: recent_len,
                next: recent_next,
            });
            for id in &mut recent.ids[..usize::from(recent_len)] {
                *id = r.u32()?;
            }
            session.recent = Some(recent);
        }
        for _ in 0..r.u8()? {
            let qos1 = r.u8()? != 0;
            let filter = r.bytes()?;
            if !session.add_subscription(filter, 0, qos1) {
                return Err(SnapshotError::Format);
            }
        }
        let will = r.u8()?;
        if will & 1 != 0 {
            let subject = r.bytes()?.into();
            let payload = r.bytes()?.into();
            session.set_will(Some(Will {
                subject,
                payload,
                qos1: will & 2 != 0,
            }));
        }
        let next_msg_id = r.u32()?;
        for _ in 0..r.u8()? {
            let msg = QueuedQos1 {
                msg_id: r.u32()?,
                awaits_topic: r.u32()?,
                sends: r.u8()?,
                frame: r.bytes()?.into(),
                sent_at_ms: 0,
            };
            if !session.queue_qos1(msg) {
                return Err(SnapshotError::Format);
            }
        }
        if next_msg_id != 0 {
            session.extra().next_msg_id = next_msg_id;
        }
        if flags & 2 != 0 {
            session.sleep(sleep_s, now_ms);
        } else {
            session.sleep_s = sleep_s;
        }
        if !r.0.is_empty() {
            return Err(SnapshotError::Format);
        }
        Ok(session)
    }

    /// When the session is lost without a word from the device: after 1.5
    /// keepalives of silence, or, asleep, 1.5 sleep durations without a PING
    /// (docs/device-protocol.md). None: never (keepalive 0, awake).
    pub fn expires_at_ms(&self) -> Option<u64> {
        let period_s = if self.asleep_until_ms != 0 {
            self.sleep_s
        } else {
            self.keepalive_s
        };
        let timeout_ms = perch_wire::keepalive_timeout_ms(period_s)?;
        Some(self.last_heard_ms + timeout_ms)
    }
}

const SNAPSHOT_MAGIC: &[u8] = b"PDS1";

/// Why a stored session could not be read back.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("truncated")]
    Truncated,
    #[error("checksum mismatch")]
    Checksum,
    #[error("not a device session of this version")]
    Format,
}

fn put_bytes(w: &mut Vec<u8>, bytes: &[u8]) {
    // Every field is bounded far below 64 KiB (frames are ≤ 1 KiB).
    w.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    w.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        if self.0.len() < n {
            return Err(SnapshotError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, SnapshotError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn bytes(&mut self) -> Result<&'a [u8], SnapshotError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

/// The wait before the next send of a QoS 1 message already sent `sends`
/// times.
fn retry_after_ms(sends: u8) -> u64 {
    let doublings = u32::from(sends.saturating_sub(1)).min(8);
    (QOS1_RETRY_MS << doublings).min(QOS1_RETRY_MS_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> DeviceSession {
        DeviceSession::new(b"d1", Peer::Stream(9), 7, 10, 0)
    }

    #[test]
    fn topics_register_once_and_are_bounded() {
        let mut s = session();
        assert_eq!(s.register(b"a", true), Some(1));
        assert_eq!(s.register(b"bb", false), Some(2));
        assert_eq!(s.register(b"a", false), Some(1));
        assert!(s.topic_confirmed(1) && !s.topic_confirmed(2));
        s.await_regack(2, b"m1".to_vec().into());
        s.await_regack(2, b"m2".to_vec().into());
        let released = s.confirm_topic(2);
        assert_eq!(released.len(), 2);
        assert!(s.topic_confirmed(2));
        assert_eq!(s.topic(2), Some(&b"bb"[..]));
        assert_eq!(s.topic_id(b"bb"), Some(2));
        assert_eq!(s.topic(0), None);
        assert_eq!(s.topic(3), None);
        for i in 0..TOPICS_PER_SESSION_MAX {
            s.register(format!("t{i}").as_bytes(), true);
        }
        assert_eq!(s.register(b"one.more", true), None);
        assert_eq!(s.register(&[b'x'; 256], true), None);
    }

    #[test]
    fn duplicates_are_seen_within_the_window() {
        let mut s = session();
        assert!(s.first_sight(5));
        assert!(!s.first_sight(5));
        for id in 100..100 + RECENT_MSG_IDS as u32 {
            assert!(s.first_sight(id));
        }
        assert!(s.first_sight(5), "forgotten after the window");
    }

    #[test]
    fn sleep_buffer_keeps_the_newest_within_bounds() {
        let mut s = session();
        let mut dropped = 0;
        for i in 0..SLEEP_BUFFER_MSGS_MAX + 5 {
            dropped += s.buffer(vec![i as u8; 8].into());
        }
        assert_eq!(dropped, 5);
        let buffered = s.take_buffered();
        assert_eq!(buffered.len(), SLEEP_BUFFER_MSGS_MAX);
        assert_eq!(buffered.first().map(|f| f[0]), Some(5));
        assert!(s.take_buffered().is_empty());
        s.buffer(vec![0; 100].into());
        dropped = s.buffer(vec![0; SLEEP_BUFFER_BYTES_MAX].into());
        assert_eq!(dropped, 1, "one over the byte bound pushes out the older");
    }

    #[test]
    fn reply_handles_are_bounded() {
        let mut s = session();
        let first = s.open_reply(b"_INBOX.1");
        for i in 0..REPLY_HANDLES_MAX {
            s.open_reply(format!("_INBOX.x{i}").as_bytes());
        }
        assert_eq!(s.take_reply(first), None, "the oldest was forgotten");
        let h = s.open_reply(b"_INBOX.2");
        assert_eq!(s.take_reply(h).as_deref(), Some(&b"_INBOX.2"[..]));
        assert_eq!(s.take_reply(h), None);
    }

    #[test]
    fn an_idle_session_is_small() {
        // The struct itself; the gateway's two index entries and the client id
        // and topic allocations come on top (measured with the loadgen's
        // device-idle scenario, BENCHMARKS.md).
        assert!(
            std::mem::size_of::<DeviceSession>() <= 104,
            "{}",
            std::mem::size_of::<DeviceSession>()
        );
        let mut s = session();
        s.register(b"sensors.d1.t", true);
        s.set_will(None);
        assert!(s.extra.is_none(), "an idle device needs no extra state");
    }
}
