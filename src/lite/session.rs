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
    pub client_id: Box<[u8]>,
    pub addr: Peer,
    pub token: u32,
    keepalive_s: u32,
    last_heard_ms: u64,
    /// 0: awake.
    asleep_until_ms: u64,
    /// Session topic ids (both directions share one space), back to back as
    /// `[length u8][subject]`: id n is the n-th entry. One allocation.
    topics: Vec<u8>,
    recent_msg_ids: [u32; RECENT_MSG_IDS],
    recent_len: u8,
    recent_next: u8,
    extra: Option<Box<Extra>>,
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
    sleep_buffer_bytes: usize,
    will: Option<Will>,
}

impl DeviceSession {
    pub fn new(client_id: &[u8], addr: Peer, token: u32, keepalive_s: u32, now_ms: u64) -> Self {
        DeviceSession {
            client_id: client_id.into(),
            addr,
            token,
            keepalive_s: keepalive_s.max(1),
            last_heard_ms: now_ms,
            asleep_until_ms: 0,
            topics: Vec::new(),
            recent_msg_ids: [0; RECENT_MSG_IDS],
            recent_len: 0,
            recent_next: 0,
            extra: None,
        }
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
        self.keepalive_s = keepalive_s.max(1);
    }

    pub fn wake(&mut self) {
        self.asleep_until_ms = 0;
    }

    pub fn sleep(&mut self, until_ms: u64) {
        self.asleep_until_ms = until_ms.max(1);
    }

    /// The session id of `subject`, registering it if new; None when full.
    pub fn register(&mut self, subject: &[u8]) -> Option<u32> {
        if let Some(id) = self.topic_id(subject) {
            return Some(id);
        }
        let count = self.topic_entries().count();
        if count >= TOPICS_PER_SESSION_MAX || subject.len() > usize::from(u8::MAX) {
            return None;
        }
        self.topics.push(subject.len() as u8);
        self.topics.extend_from_slice(subject);
        Some(count as u32 + 1)
    }

    fn topic_entries(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = self.topics.as_slice();
        std::iter::from_fn(move || {
            let (&len, tail) = rest.split_first()?;
            let (subject, after) = tail.split_at(usize::from(len).min(tail.len()));
            rest = after;
            Some(subject)
        })
    }

    /// The subject of a session topic id.
    pub fn topic(&self, id: u32) -> Option<&[u8]> {
        let index = (id as usize).checked_sub(1)?;
        self.topic_entries().nth(index)
    }

    /// The session id of `subject`, if registered.
    pub fn topic_id(&self, subject: &[u8]) -> Option<u32> {
        self.topic_entries()
            .position(|t| t == subject)
            .map(|i| i as u32 + 1)
    }

    /// Records a QoS 1 message id; false if it was seen recently (a retransmit).
    pub fn first_sight(&mut self, msg_id: u32) -> bool {
        let seen = &self.recent_msg_ids[..self.recent_len as usize];
        if seen.contains(&msg_id) {
            return false;
        }
        self.recent_msg_ids[self.recent_next as usize] = msg_id;
        self.recent_next = (self.recent_next + 1) % RECENT_MSG_IDS as u8;
        self.recent_len = (self.recent_len + 1).min(RECENT_MSG_IDS as u8);
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

    /// When the session is lost without a word from the device
    /// (MQTT practice: 1.5 keepalives of silence, counted from the end of an
    /// announced sleep).
    pub fn expires_at_ms(&self) -> u64 {
        let keepalive_ms = u64::from(self.keepalive_s) * 1000;
        let from = self.last_heard_ms.max(self.asleep_until_ms);
        from + keepalive_ms + keepalive_ms / 2
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
        assert_eq!(s.register(b"a"), Some(1));
        assert_eq!(s.register(b"bb"), Some(2));
        assert_eq!(s.register(b"a"), Some(1));
        assert_eq!(s.topic(2), Some(&b"bb"[..]));
        assert_eq!(s.topic_id(b"bb"), Some(2));
        assert_eq!(s.topic(0), None);
        assert_eq!(s.topic(3), None);
        for i in 0..TOPICS_PER_SESSION_MAX {
            s.register(format!("t{i}").as_bytes());
        }
        assert_eq!(s.register(b"one.more"), None);
        assert_eq!(s.register(&[b'x'; 256]), None);
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
            std::mem::size_of::<DeviceSession>() <= 176,
            "{}",
            std::mem::size_of::<DeviceSession>()
        );
        let mut s = session();
        s.register(b"sensors.d1.t");
        s.set_will(None);
        assert!(s.extra.is_none(), "an idle device needs no extra state");
    }
}
