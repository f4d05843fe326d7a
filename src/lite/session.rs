//! One device's session: what a device registered, what it may still owe or be
//! owed, and whether it sleeps. Plain data, no I/O and no clock: the gateway
//! passes the time in, and the session is small because thousands of mostly
//! idle devices each hold one.

use std::collections::VecDeque;
use super::gateway::Peer;

/// Subjects a device may register (its session ids are 1..=this).
pub const TOPICS_PER_SESSION_MAX: usize = 32;
/// Recent QoS 1 message ids remembered to drop retransmitted duplicates.
pub const RECENT_MSG_IDS: usize = 16;
/// Requests a device may have open at once (reply handles).
pub const REPLY_HANDLES_MAX: usize = 8;
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
    pub keepalive_ms: u64,
    pub last_heard_ms: u64,
    pub presence: Presence,
    /// Session topic ids (both directions share one space): index + 1.
    topics: Vec<Box<[u8]>>,
    recent_msg_ids: [u32; RECENT_MSG_IDS],
    recent_len: u8,
    recent_next: u8,
    /// The device's subscriptions: (filter, the gateway's sid for it).
    pub subscriptions: Vec<(Box<[u8]>, u64)>,
    /// Open requests to the device: (handle, the requester's reply subject).
    replies: VecDeque<(u32, Box<[u8]>)>,
    next_reply_handle: u32,
    /// Encoded frames waiting for a sleeping device, oldest first.
    pub sleep_buffer: VecDeque<Box<[u8]>>,
    pub sleep_buffer_bytes: usize,
    pub will: Option<Box<Will>>,
}

impl DeviceSession {
    pub fn new(
        client_id: &[u8],
        addr: Peer,
        token: u32,
        keepalive_ms: u64,
        now_ms: u64,
    ) -> Self {
        DeviceSession {
            client_id: client_id.into(),
            addr,
            token,
            keepalive_ms,
            last_heard_ms: now_ms,
            presence: Presence::Awake,
            topics: Vec::new(),
            recent_msg_ids: [0; RECENT_MSG_IDS],
            recent_len: 0,
            recent_next: 0,
            subscriptions: Vec::new(),
            replies: VecDeque::new(),
            next_reply_handle: 1,
            sleep_buffer: VecDeque::new(),
            sleep_buffer_bytes: 0,
            will: None,
        }
    }

    /// The session id of `subject`, registering it if new; None when full.
    pub fn register(&mut self, subject: &[u8]) -> Option<u32> {
        if let Some(i) = self.topics.iter().position(|t| **t == *subject) {
            return Some(i as u32 + 1);
        }
        if self.topics.len() >= TOPICS_PER_SESSION_MAX {
            return None;
        }
        self.topics.push(subject.into());
        Some(self.topics.len() as u32)
    }

    /// The subject of a session topic id.
    pub fn topic(&self, id: u32) -> Option<&[u8]> {
        let index = (id as usize).checked_sub(1)?;
        self.topics.get(index).map(|t| &**t)
    }

    /// The session id of `subject`, if registered.
    pub fn topic_id(&self, subject: &[u8]) -> Option<u32> {
        self.topics
            .iter()
            .position(|t| **t == *subject)
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

    /// A handle for a request's reply subject (the oldest open one is
    /// forgotten when all are taken: its requester times out, as with a lost
    /// datagram).
    pub fn open_reply(&mut self, reply: &[u8]) -> u32 {
        if self.replies.len() >= REPLY_HANDLES_MAX {
            self.replies.pop_front();
        }
        let handle = self.next_reply_handle;
        self.next_reply_handle = self.next_reply_handle.wrapping_add(1).max(1);
        self.replies.push_back((handle, reply.into()));
        handle
    }

    /// Takes the reply subject of an open request.
    pub fn take_reply(&mut self, handle: u32) -> Option<Box<[u8]>> {
        let i = self.replies.iter().position(|(h, _)| *h == handle)?;
        self.replies.remove(i).map(|(_, reply)| reply)
    }

    /// Buffers a frame for a sleeping device; returns how many old frames were
    /// dropped to make room.
    pub fn buffer(&mut self, frame: Box<[u8]>) -> usize {
        let mut dropped = 0;
        self.sleep_buffer_bytes += frame.len();
        self.sleep_buffer.push_back(frame);
        while self.sleep_buffer.len() > SLEEP_BUFFER_MSGS_MAX
            || (self.sleep_buffer_bytes > SLEEP_BUFFER_BYTES_MAX && self.sleep_buffer.len() > 1)
        {
            if let Some(old) = self.sleep_buffer.pop_front() {
                self.sleep_buffer_bytes -= old.len();
                dropped += 1;
            }
        }
        dropped
    }

    /// When the session is lost without a word from the device.
    pub fn expires_at_ms(&self) -> u64 {
        match self.presence {
            // nats-server/MQTT practice: 1.5 keepalives of silence.
            Presence::Awake => self.last_heard_ms + self.keepalive_ms + self.keepalive_ms / 2,
            Presence::Asleep { until_ms } => until_ms + self.keepalive_ms + self.keepalive_ms / 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> DeviceSession {
        DeviceSession::new(b"d1", Peer::Stream(9), 7, 10_000, 0)
    }

    #[test]
    fn topics_register_once_and_are_bounded() {
        let mut s = session();
        assert_eq!(s.register(b"a"), Some(1));
        assert_eq!(s.register(b"b"), Some(2));
        assert_eq!(s.register(b"a"), Some(1));
        assert_eq!(s.topic(2), Some(&b"b"[..]));
        assert_eq!(s.topic(0), None);
        assert_eq!(s.topic(3), None);
        for i in 0..TOPICS_PER_SESSION_MAX {
            s.register(format!("t{i}").as_bytes());
        }
        assert_eq!(s.register(b"one.more"), None);
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
        assert_eq!(s.sleep_buffer.len(), SLEEP_BUFFER_MSGS_MAX);
        assert_eq!(s.sleep_buffer.front().map(|f| f[0]), Some(5));
        dropped = s.buffer(vec![0; SLEEP_BUFFER_BYTES_MAX].into());
        assert!(dropped > 0 && s.sleep_buffer_bytes <= SLEEP_BUFFER_BYTES_MAX);
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
}
