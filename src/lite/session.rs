//! One device's session: what a device registered, what it may still owe or be
//! owed, and whether it sleeps. Plain data, no I/O and no clock: the gateway
//! passes the time in. Thousands of mostly idle devices each hold one, so the
//! common part is small and everything only some devices use (subscriptions,
//! open requests, a sleep buffer, a will) sits behind one optional box.

use std::collections::VecDeque;

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

/// What only some devices need.
#[derive(Default)]
struct Extra {
    /// The device's subscriptions: (filter, the gateway's sid for it).
    subscriptions: Vec<(Box<[u8]>, u64)>,
    /// Open requests to the device: (handle, the requester's reply subject).
    replies: VecDeque<(u32, Box<[u8]>)>,
    next_reply_handle: u32,
    /// Encoded frames waiting for a sleeping device, oldest first.
    sleep_buffer: VecDeque<Box<[u8]>>,
    /// Deliveries waiting for the REGACK of their topic: (topic, frame).
    awaiting_regack: VecDeque<(u32, Box<[u8]>)>,
    sleep_buffer_bytes: usize,
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

    pub fn subscriptions(&self) -> &[(Box<[u8]>, u64)] {
        self.extra.as_ref().map_or(&[], |e| &e.subscriptions)
    }

    /// Adds a subscription; false when the session has as many as allowed.
    pub fn add_subscription(&mut self, filter: &[u8], sid: u64) -> bool {
        let extra = self.extra();
        if extra.subscriptions.len() >= SUBSCRIPTIONS_PER_SESSION_MAX {
            return false;
        }
        extra.subscriptions.push((filter.into(), sid));
        true
    }

    /// Removes the subscription on `filter`; returns its sid.
    pub fn remove_subscription(&mut self, filter: &[u8]) -> Option<u64> {
        let extra = self.extra.as_mut()?;
        let i = extra
            .subscriptions
            .iter()
            .position(|(f, _)| **f == *filter)?;
        Some(extra.subscriptions.swap_remove(i).1)
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
