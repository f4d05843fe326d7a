//! One shard's device sessions behind the compact device protocol
//! (docs/device-protocol.md): frames in, actions out. It knows nothing of
//! sockets, threads or the clock (time is an argument), so the whole protocol
//! is tested in memory.
//!
//! Ownership: a session lives on the shard `owner_of(client_id)`; its token
//! carries that shard, so a RESUME from a new address finds it from any shard.
//! A datagram that reaches a shard which does not own its session (the kernel
//! spreads source addresses over the shards' sockets) is forwarded to the owner
//! ([`Action::Forward`]); the owner answers from its own socket, which shares
//! the address and port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use perch_wire::{self as wire, Code, Frame, FrameType, Qos, TopicRef};

use super::credentials::{Credentials, Unverified};
use super::predefined::Predefined;
use super::session::{DeviceSession, Presence, Qos1Send, QueuedQos1, SnapshotError, Will};
use crate::auth::Permissions;

/// Where a frame came from and where its answers go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A UDP source address (any shard's socket can answer it).
    Udp(SocketAddr),
    /// A stream connection (TCP, a serial line), by the shell's id for it. Its
    /// session lives on the shard that serves the connection.
    Stream(u64),
}

/// What the shell must do after a call.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this frame to this address (UDP: one datagram).
    Send { to: Peer, frame: Vec<u8> },
    /// Route a message as a publish from a device.
    Publish {
        subject: Vec<u8>,
        reply: Option<Vec<u8>>,
        payload: Vec<u8>,
        /// QoS 1: send PUBACK to `to` for `msg_id` once routed.
        ack: Option<(Peer, u32)>,
        /// Published at QoS 1 (a QoS 1 publish or will): the message carries
        /// the `Perch-Qos: 1` header, so devices subscribed at QoS 1 get it so.
        qos1: bool,
    },
    /// Subscribe the gateway's internal session under `sid`; once every shard
    /// routes to it, send SUBACK `req_id` to `to` (None: a session restored
    /// from the store, nobody to tell).
    Subscribe {
        sid: u64,
        filter: Vec<u8>,
        suback: Option<(Peer, u32)>,
    },
    /// Drop the internal subscription `sid`.
    Unsubscribe { sid: u64 },
    /// A retransmitted QoS 1 publish (already routed): PUBACK `msg_id` to `to`
    /// again, unless the first copy's ack is still waiting for the store.
    AckAgain { to: Peer, msg_id: u32 },
    /// The datagram belongs to a session on another shard.
    Forward {
        shard: usize,
        from: SocketAddr,
        datagram: Vec<u8>,
    },
}

/// Limits with units.
#[derive(Clone, Copy, Debug)]
pub struct GatewayLimits {
    pub sessions_max: usize,
    pub payload_bytes_max: usize,
    /// Addresses remembered as belonging to another shard's sessions (the
    /// shell sets it to sessions_max × shards: every device of every other
    /// shard may send here).
    pub foreign_addrs_max: usize,
}

impl Default for GatewayLimits {
    fn default() -> Self {
        GatewayLimits {
            sessions_max: 10_000,
            payload_bytes_max: wire::FRAME_BYTES_MAX,
            foreign_addrs_max: 10_000,
        }
    }
}

/// Counted drops and refusals (also what monitoring will show).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub malformed_frames: u64,
    pub unknown_session_frames: u64,
    pub duplicate_publishes: u64,
    pub sleep_buffer_dropped: u64,
    /// QoS 1 messages for devices refused because the device's queue was full.
    pub qos1_queue_full: u64,
    /// QoS 1 messages for devices dropped after `QOS1_SENDS_MAX` sends.
    pub qos1_undeliverable: u64,
    pub sessions_expired: u64,
    pub refused: u64,
    /// ERROR replies not sent because the per-second budget was spent.
    pub errors_suppressed: u64,
    /// Envelopes dropped unanswered: unparsable, no key for the client id,
    /// or a tag that does not verify (docs/device-protocol.md §9).
    pub unverified_dropped: u64,
    /// Verified envelopes dropped as replays.
    pub replays_dropped: u64,
    /// Plain frames refused because the client id (or every device) must seal.
    pub plain_refused: u64,
    /// Replies to unverified datagrams not sent because they were larger.
    pub replies_too_large: u64,
    /// Publishes and subscriptions refused by permissions.
    pub not_permitted: u64,
}

/// The shard a client id's session lives on (FNV-1a, stable across restarts).
pub fn owner_of(client_id: &[u8], shard_count: usize) -> usize {
    (fnv1a(client_id) % shard_count.max(1) as u64) as usize
}

/// A key of a session that the session itself holds (its client id, its
/// address), indexed without a second copy of every key: the map holds the
/// key's 64-bit hash and the slot, whose session has the key to compare; a key
/// whose hash another live key already has (rare, or crafted) goes to
/// `clashes`, keyed by itself.
trait SessionKey: Eq + std::hash::Hash {
    type Owned: Eq + std::hash::Hash + std::borrow::Borrow<Self>;
    fn of(session: &DeviceSession) -> &Self;
    fn hash64(&self) -> u64;
    fn to_owned_key(&self) -> Self::Owned;
}

impl SessionKey for [u8] {
    type Owned = Box<[u8]>;
    fn of(session: &DeviceSession) -> &[u8] {
        session.client_id()
    }
    fn hash64(&self) -> u64 {
        fnv1a(self)
    }
    fn to_owned_key(&self) -> Box<[u8]> {
        self.into()
    }
}

impl SessionKey for Peer {
    type Owned = Peer;
    fn of(session: &DeviceSession) -> &Peer {
        &session.addr
    }
    fn hash64(&self) -> u64 {
        let mut bytes = [0u8; 19];
        let used = match self {
            Peer::Udp(SocketAddr::V4(a)) => {
                bytes[..4].copy_from_slice(&a.ip().octets());
                bytes[4..6].copy_from_slice(&a.port().to_le_bytes());
                6
            }
            Peer::Udp(SocketAddr::V6(a)) => {
                bytes[..16].copy_from_slice(&a.ip().octets());
                bytes[16..18].copy_from_slice(&a.port().to_le_bytes());
                18
            }
            Peer::Stream(id) => {
                bytes[..8].copy_from_slice(&id.to_le_bytes());
                bytes[8] = 0xFF;
                9
            }
        };
        fnv1a(&bytes[..used])
    }
    fn to_owned_key(&self) -> Peer {
        *self
    }
}

struct SessionIndex<K: SessionKey + ?Sized> {
    by_hash: HashMap<u64, usize>,
    clashes: HashMap<K::Owned, usize>,
    /// Tests replace it with one that makes every key clash.
    hasher: fn(&K) -> u64,
}

impl<K: SessionKey + ?Sized> Default for SessionIndex<K> {
    fn default() -> Self {
        SessionIndex {
            by_hash: HashMap::new(),
            clashes: HashMap::new(),
            hasher: K::hash64,
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

impl<K: SessionKey + ?Sized> SessionIndex<K> {
    fn len(&self) -> usize {
        self.by_hash.len() + self.clashes.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.by_hash.values().chain(self.clashes.values()).copied()
    }

    fn get(&self, key: &K, sessions: &[Option<DeviceSession>]) -> Option<usize> {
        let slot = *self.by_hash.get(&(self.hasher)(key))?;
        if sessions[slot].as_ref().is_some_and(|s| K::of(s) == key) {
            return Some(slot);
        }
        self.clashes.get(key).copied()
    }

    fn contains(&self, key: &K, sessions: &[Option<DeviceSession>]) -> bool {
        self.get(key, sessions).is_some()
    }

    fn insert(&mut self, key: &K, slot: usize, sessions: &[Option<DeviceSession>]) {
        match self.by_hash.entry((self.hasher)(key)) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(slot);
            }
            std::collections::hash_map::Entry::Occupied(e) => {
                let other = *e.get();
                // The slot's own key again, or a stale entry: take it over.
                let take_over =
                    other == slot || sessions[other].as_ref().is_none_or(|s| K::of(s) == key);
                if take_over {
                    *e.into_mut() = slot;
                } else {
                    self.clashes.insert(key.to_owned_key(), slot);
                }
            }
        }
    }

    /// Forgets `key` if it names `slot`.
    fn remove(&mut self, key: &K, slot: usize) {
        let hash = (self.hasher)(key);
        if self.by_hash.get(&hash) == Some(&slot) {
            self.by_hash.remove(&hash);
            // Promote a clash with the same hash, so `get` finds it first.
            let hasher = self.hasher;
            let promoted = self
                .clashes
                .iter()
                .find(|(owned, _)| hasher((*owned).borrow()) == hash)
                .map(|(owned, &s)| (K::to_owned_key((*owned).borrow()), s));
            if let Some((owned, s)) = promoted {
                self.clashes.remove(owned.borrow());
                self.by_hash.insert(hash, s);
            }
        } else if self.clashes.get(key) == Some(&slot) {
            self.clashes.remove(key);
        }
    }
}

use std::borrow::Borrow;

/// Session tokens: the owner shard in the top 6 bits, a counter below.
const TOKEN_SHARD_SHIFT: u32 = 26;

pub struct Gateway {
    shard: usize,
    shard_count: usize,
    limits: GatewayLimits,
    predefined: Arc<Predefined>,
    sessions: Vec<Option<DeviceSession>>,
    free: Vec<usize>,
    by_addr: SessionIndex<Peer>,
    by_client: SessionIndex<[u8]>,
    by_sid: HashMap<u64, usize>,
    /// Addresses whose sessions live on another shard (forward to it).
    /// Keyed by the address's 64-bit hash, the shard as one byte (shards ≤ 64):
    /// a few bytes per device whose datagrams reach this shard but whose
    /// session lives elsewhere. A hash clash forwards to the wrong shard, which
    /// answers UNKNOWN_SESSION; the device RESUMEs and the entry is corrected.
    foreign: HashMap<u64, u8>,
    next_token: u32,
    next_sid: u64,
    /// The second `errors_this_second` counts in.
    error_second: u64,
    errors_this_second: u32,
    /// Sessions are kept in the store: the client ids whose stored copy is
    /// out of date (see [`Gateway::take_changes`]).
    persist: bool,
    changed: std::collections::HashSet<Box<[u8]>>,
    /// Stand-in addresses for restored sessions whose device was on a stream
    /// connection (counting down from u64::MAX, never a live stream's id).
    next_restored_stream: u64,
    /// Device keys and permissions (docs/device-protocol.md §9).
    credentials: Arc<Credentials>,
    /// Compiled permissions of the sessions that have any, by slot.
    permissions: HashMap<usize, Arc<Permissions>>,
    /// Where an envelope is opened: grows to the largest verified-size
    /// datagram (at most a TCP frame), kept.
    scratch: Vec<u8>,
    pub stats: Stats,
}

/// A kept session to write (client id, its bytes) or, with None, to remove.
pub type StoredChange = (Box<[u8]>, Option<Vec<u8>>);

/// How a QoS 1 pass treats a session.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Qos1Pass {
    /// The device woke or reconnected: everything in the window goes again.
    Wake,
    /// The device was just heard (a PUBACK, a REGACK): new ones go, even if
    /// it is between sleeps.
    Heard,
    /// New messages and due retries, to an awake device only.
    Timer,
}

/// ERROR replies per shard per second to peers that may have no session.
pub const UNSOLICITED_ERRORS_PER_SECOND_MAX: u32 = 200;

impl Gateway {
    pub fn new(
        shard: usize,
        shard_count: usize,
        limits: GatewayLimits,
        predefined: Arc<Predefined>,
    ) -> Gateway {
        assert!(
            shard < shard_count && shard_count <= 64,
            "shard {shard} of {shard_count}"
        );
        Gateway {
            shard,
            shard_count,
            limits,
            predefined,
            sessions: Vec::new(),
            free: Vec::new(),
            by_addr: SessionIndex::default(),
            by_client: SessionIndex::default(),
            by_sid: HashMap::new(),
            foreign: HashMap::new(),
            next_token: 1,
            next_sid: 1,
            error_second: 0,
            errors_this_second: 0,
            persist: false,
            changed: std::collections::HashSet::new(),
            next_restored_stream: u64::MAX,
            credentials: Arc::new(Credentials::default()),
            permissions: HashMap::new(),
            scratch: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// Device keys and permissions; before any frame (default: none, every
    /// device plain and allowed everything).
    pub fn set_credentials(&mut self, credentials: Arc<Credentials>) {
        self.credentials = credentials;
    }

    /// `frame` as it must go to `to`: sealed when the session there is a
    /// keyed device's (the shell's own frames: PUBACKs, SUBACKs), else as is.
    pub fn outbound(&self, to: Peer, frame: Vec<u8>) -> Vec<u8> {
        if !self.credentials.enabled() {
            return frame;
        }
        let Some(slot) = self.by_addr.get(&to, &self.sessions) else {
            return frame;
        };
        let Some(session) = self.sessions[slot].as_ref() else {
            return frame;
        };
        self.credentials
            .seal(session.client_id(), &frame)
            .unwrap_or(frame)
    }

    /// Seals the frames of `out[start..]` to keyed sessions (deliveries,
    /// retries: the shell's later sends go through [`Gateway::outbound`]).
    fn seal_sends(&self, out: &mut [Action], start: usize) {
        if !self.credentials.enabled() {
            return;
        }
        for action in &mut out[start..] {
            if let Action::Send { to, frame } = action {
                let sealed = self.outbound(*to, std::mem::take(frame));
                *frame = sealed;
            }
        }
    }

    fn permissions_of(&self, slot: usize) -> Option<&Permissions> {
        self.permissions.get(&slot).map(|p| &**p)
    }

    fn set_permissions(&mut self, slot: usize, client_id: &[u8]) {
        match self.credentials.permissions(client_id) {
            Some(p) => self.permissions.insert(slot, p),
            None => self.permissions.remove(&slot),
        };
    }

    /// Keep sessions in the store: from now on [`Gateway::take_changes`]
    /// reports what to write.
    pub fn enable_persistence(&mut self) {
        self.persist = true;
    }

    /// The stored sessions to update since the last call: (client id, the
    /// session's bytes) to write, or (client id, None) to remove. Kept: the
    /// persistent sessions (CONNECT without clean_session) and the sleeping
    /// ones.
    pub fn take_changes(&mut self) -> Vec<StoredChange> {
        let changed = std::mem::take(&mut self.changed);
        changed
            .into_iter()
            .map(|client_id| {
                let bytes = self
                    .by_client
                    .get(&client_id, &self.sessions)
                    .and_then(|slot| self.sessions[slot].as_ref())
                    .filter(|s| s.persistent || s.presence() != Presence::Awake)
                    .map(DeviceSession::snapshot);
                (client_id, bytes)
            })
            .collect()
    }

    /// A write of `client_id`'s stored session failed: report it again.
    pub fn retry_change(&mut self, client_id: Box<[u8]>) {
        self.changed.insert(client_id);
    }

    /// Marks the session at `slot` as changed for the store.
    fn touch(&mut self, slot: usize) {
        if self.persist {
            if let Some(session) = self.sessions[slot].as_ref() {
                if !self.changed.contains(session.client_id()) {
                    self.changed.insert(session.client_id().into());
                }
            }
        }
    }

    /// Brings back a session the store kept (at start-up). Its subscriptions
    /// are made again (`Action::Subscribe` without SUBACK). Returns the
    /// client id, or None when the session belongs to another shard (it
    /// loads it) or this client id is already live.
    pub fn restore(
        &mut self,
        bytes: &[u8],
        now_ms: u64,
        out: &mut Vec<Action>,
    ) -> Result<Option<Vec<u8>>, SnapshotError> {
        let stand_in = Peer::Stream(self.next_restored_stream);
        let mut session = DeviceSession::restore(bytes, now_ms, stand_in)?;
        let client_id = session.client_id().to_vec();
        let owner = owner_of(&client_id, self.shard_count);
        if owner != self.shard {
            // Its device's datagrams may reach this shard's socket first (the
            // kernel spreads source addresses over the shards anew after a
            // restart): forward them to the owner.
            if let Peer::Udp(addr) = session.addr {
                self.remember_foreign(addr, owner);
            }
            return Ok(None);
        }
        if self.by_client.contains(&client_id[..], &self.sessions)
            || self.by_client.len() >= self.limits.sessions_max
        {
            return Ok(None);
        }
        if session.addr == stand_in {
            self.next_restored_stream -= 1;
        }
        // Its token names the shard that made it; a new one if that is not us
        // (the shard count changed), so RESUME finds it here.
        if (session.token >> TOKEN_SHARD_SHIFT) as usize != self.shard {
            session.token = self.new_token();
        }
        let counter = session.token & ((1 << TOKEN_SHARD_SHIFT) - 1);
        if counter >= self.next_token {
            self.next_token = counter.wrapping_add(1).max(1);
        }
        let filters: Vec<Box<[u8]>> = session
            .subscriptions()
            .iter()
            .map(|s| s.filter.clone())
            .collect();
        let slot = match self.free.pop() {
            Some(slot) => {
                self.sessions[slot] = Some(session);
                slot
            }
            None => {
                self.sessions.push(Some(session));
                self.sessions.len() - 1
            }
        };
        self.by_client.insert(&client_id, slot, &self.sessions);
        self.set_permissions(slot, &client_id);
        let addr = self.sessions[slot].as_ref().map(|s| s.addr);
        if let Some(addr) = addr {
            if self.by_addr.get(&addr, &self.sessions).is_none() {
                self.by_addr.insert(&addr, slot, &self.sessions);
            }
        }
        for filter in filters {
            let sid = self.next_sid;
            self.next_sid += 1;
            if let Some(sub) = self.sessions[slot]
                .as_mut()
                .and_then(|s| s.subscription_mut(&filter))
            {
                sub.sid = sid;
            }
            self.by_sid.insert(sid, slot);
            out.push(Action::Subscribe {
                sid,
                filter: filter.into_vec(),
                suback: None,
            });
        }
        Ok(Some(client_id))
    }

    fn new_token(&mut self) -> u32 {
        let token = ((self.shard as u32) << TOKEN_SHARD_SHIFT)
            | (self.next_token & ((1 << TOKEN_SHARD_SHIFT) - 1));
        self.next_token = self.next_token.wrapping_add(1).max(1);
        token
    }

    /// Sends what the session's QoS 1 queue has due.
    fn pump_qos1(&mut self, slot: usize, now_ms: u64, pass: Qos1Pass, out: &mut Vec<Action>) {
        let Some(session) = self.sessions[slot].as_mut() else {
            return;
        };
        if session.qos1_queued() == 0
            || (pass == Qos1Pass::Timer && session.presence() != Presence::Awake)
        {
            return;
        }
        let mut sends = Vec::new();
        let dropped = session.qos1_due(now_ms, pass == Qos1Pass::Wake, &mut sends);
        let to = session.addr;
        for send in sends {
            let frame = match send {
                Qos1Send::Frame(frame) => frame.into_vec(),
                Qos1Send::Register(id) => match session.topic(id) {
                    Some(subject) => encode(&Frame::Register { id, subject }),
                    None => continue,
                },
            };
            out.push(Action::Send { to, frame });
        }
        if dropped > 0 {
            self.stats.qos1_undeliverable += dropped as u64;
            self.touch(slot);
        }
    }

    /// Drops the session of a stream connection that closed (its will is
    /// published: the device did not say goodbye).
    pub fn stream_closed(&mut self, peer: Peer, out: &mut Vec<Action>) {
        if let Some(slot) = self.by_addr.get(&peer, &self.sessions) {
            self.remove(slot, true, out);
        }
    }

    /// The client id of the session at `addr`.
    pub fn client_id_at(&self, addr: Peer) -> Option<Vec<u8>> {
        let slot = self.by_addr.get(&addr, &self.sessions)?;
        self.sessions[slot].as_ref().map(|s| s.client_id().to_vec())
    }

    pub fn session_count(&self) -> usize {
        self.by_client.len()
    }

    /// One datagram (UDP) or one deframed frame (TCP, serial) from `from`.
    /// `forwarded`: it came from another shard, which already decided it is ours.
    ///
    /// With device keys configured, an envelope is verified before anything
    /// else happens (docs/device-protocol.md §9), and a plain datagram from an
    /// address without a session is never answered with more bytes than it had.
    pub fn handle_datagram(
        &mut self,
        from: Peer,
        bytes: &[u8],
        forwarded: bool,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        if !self.credentials.enabled() {
            self.handle_plain(from, bytes, forwarded, now_ms, out);
            return;
        }
        if bytes.first() == Some(&wire::protect::HEADER_FROM_DEVICE) {
            self.handle_sealed(from, bytes, forwarded, now_ms, out);
            return;
        }
        let start = out.len();
        let had_session = self.by_addr.contains(&from, &self.sessions);
        self.handle_plain(from, bytes, forwarded, now_ms, out);
        // A plain device let in (it has a session now) is answered as before;
        // anything else gets no reply larger than its datagram.
        if !had_session && !self.by_addr.contains(&from, &self.sessions) {
            let before = out.len();
            let mut index = 0;
            out.retain(|action| {
                index += 1;
                index <= start
                    || !matches!(action, Action::Send { frame, .. } if frame.len() > bytes.len())
            });
            self.stats.replies_too_large += (before - out.len()) as u64;
        }
        self.seal_sends(out, start);
    }

    /// A device envelope: verified, checked against its device's window, and
    /// only then opened as a frame of the envelope's client id.
    fn handle_sealed(
        &mut self,
        from: Peer,
        bytes: &[u8],
        forwarded: bool,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let mut scratch = std::mem::take(&mut self.scratch);
        if scratch.len() < bytes.len() {
            scratch.resize(bytes.len().min(wire::TCP_FRAME_BYTES_MAX), 0);
        }
        let credentials = Arc::clone(&self.credentials);
        match credentials.open(bytes, &mut scratch) {
            Ok((envelope, frame)) => {
                let owner = owner_of(envelope.client_id, self.shard_count);
                match from {
                    // Verified here, accepted (windowed) by the owner.
                    Peer::Udp(addr) if owner != self.shard && !forwarded => {
                        self.remember_foreign(addr, owner);
                        out.push(Action::Forward {
                            shard: owner,
                            from: addr,
                            datagram: bytes.to_vec(),
                        });
                    }
                    _ => self.handle_verified(from, &envelope, frame, now_ms, out),
                }
            }
            Err(_) => self.stats.unverified_dropped += 1,
        }
        self.scratch = scratch;
    }

    fn handle_verified(
        &mut self,
        from: Peer,
        envelope: &wire::protect::DeviceEnvelope<'_>,
        bytes: &[u8],
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let client_id = envelope.client_id;
        let frame = wire::decode_from_device(bytes);
        let connect = matches!(frame, Ok(Frame::Connect { .. }));
        if let Err(Unverified::Replayed) = self.credentials.accept(envelope, connect) {
            self.stats.replays_dropped += 1;
            return;
        }
        let start = out.len();
        match frame {
            Err(e) => {
                self.stats.malformed_frames += 1;
                let ref_type = bytes.first().map_or(0, |b| b >> 4);
                self.send_error(out, from, e.code(), ref_type, 0);
            }
            Ok(Frame::Connect {
                client_id: claimed, ..
            }) if claimed != client_id => {
                self.stats.plain_refused += 1;
                self.send_connack(out, from, false, Code::NotPermitted, 0);
            }
            Ok(Frame::Connect { version, .. }) if version != wire::PROTOCOL_VERSION => {
                self.send_connack(out, from, false, Code::UnsupportedVersion, 0);
            }
            Ok(Frame::Connect {
                clean_session,
                keepalive_s,
                will,
                ..
            }) => self.connect(
                from,
                clean_session,
                keepalive_s,
                client_id,
                will,
                now_ms,
                out,
            ),
            Ok(Frame::PublishAnonymous {
                client_id: claimed,
                topic,
                payload,
            }) => {
                if claimed == client_id {
                    self.publish_anonymous(claimed, topic, payload, out);
                } else {
                    self.stats.plain_refused += 1;
                }
                return;
            }
            Ok(frame) => {
                let slot = self
                    .by_client
                    .get(client_id, &self.sessions)
                    .filter(|_| self.credentials.session_epoch(client_id) == Some(envelope.epoch));
                let Some(slot) = slot else {
                    // No session for this epoch (a restarted broker, an expired
                    // session): the one plain hint, smaller than the envelope.
                    self.stats.unknown_session_frames += 1;
                    let ref_type = frame.frame_type() as u8;
                    self.send_unsolicited_error(
                        out,
                        from,
                        now_ms,
                        Code::UnknownSession,
                        ref_type,
                        0,
                    );
                    return;
                };
                // The key, not the address, names the session: a verified frame
                // from a new address moves it (NAT rebinding needs no RESUME).
                if self.sessions[slot].as_ref().is_some_and(|s| s.addr != from) {
                    self.rebind(slot, from);
                }
                if let Frame::Resume { session_token } = frame {
                    let token = self.sessions[slot].as_ref().map_or(0, |s| s.token);
                    self.heard(slot, now_ms);
                    if token == session_token {
                        self.send_connack(out, from, true, Code::Ok, token);
                    } else {
                        self.send_connack(out, from, false, Code::UnknownSession, 0);
                    }
                } else {
                    self.heard(slot, now_ms);
                    self.established(slot, frame, now_ms, out);
                }
            }
        }
        // Everything this frame caused goes to its device, sealed (a
        // DISCONNECT to the address a session was taken from included).
        for action in &mut out[start..] {
            if let Action::Send { frame, .. } = action {
                if let Some(sealed) = self.credentials.seal(client_id, frame) {
                    *frame = sealed;
                }
            }
        }
    }

    /// A plain frame (no envelope).
    fn handle_plain(
        &mut self,
        from: Peer,
        bytes: &[u8],
        forwarded: bool,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        // Only UDP datagrams may belong to another shard's session.
        let udp_from = match from {
            Peer::Udp(addr) if !forwarded => Some(addr),
            _ => None,
        };
        if let Some(addr) = udp_from {
            if let Some(&shard) = self.foreign.get(&Peer::Udp(addr).hash64()) {
                let shard = usize::from(shard);
                if !self.by_addr.contains(&from, &self.sessions) {
                    out.push(Action::Forward {
                        shard,
                        from: addr,
                        datagram: bytes.to_vec(),
                    });
                    return;
                }
            }
        }
        let frame = match wire::decode_from_device(bytes) {
            Ok(frame) => frame,
            Err(e) => {
                self.stats.malformed_frames += 1;
                let ref_type = bytes.first().map_or(0, |b| b >> 4);
                // TOO_LARGE for an over-long client id or subject, else MALFORMED.
                self.send_unsolicited_error(out, from, now_ms, e.code(), ref_type, 0);
                return;
            }
        };
        // Frames that may arrive without a session here.
        match &frame {
            Frame::Connect { client_id, .. } if !self.credentials.allows_plain(client_id) => {
                // A keyed device (or any, with require_key) must seal.
                self.stats.plain_refused += 1;
                self.send_connack(out, from, false, Code::NotPermitted, 0);
                return;
            }
            Frame::PublishAnonymous { client_id, .. }
                if !self.credentials.allows_plain(client_id) =>
            {
                self.stats.plain_refused += 1;
                return;
            }
            Frame::Connect { client_id, .. } => {
                let owner = owner_of(client_id, self.shard_count);
                if let Some(addr) = udp_from.filter(|_| owner != self.shard) {
                    self.remember_foreign(addr, owner);
                    out.push(Action::Forward {
                        shard: owner,
                        from: addr,
                        datagram: bytes.to_vec(),
                    });
                    return;
                }
            }
            Frame::Resume { session_token } => {
                let owner = (*session_token >> TOKEN_SHARD_SHIFT) as usize;
                if let Some(addr) =
                    udp_from.filter(|_| owner != self.shard && owner < self.shard_count)
                {
                    self.remember_foreign(addr, owner);
                    out.push(Action::Forward {
                        shard: owner,
                        from: addr,
                        datagram: bytes.to_vec(),
                    });
                    return;
                }
            }
            Frame::PublishAnonymous {
                client_id,
                topic,
                payload,
            } => {
                self.publish_anonymous(client_id, *topic, payload, out);
                return;
            }
            _ => {}
        }
        match frame {
            Frame::Connect { version, .. } if version != wire::PROTOCOL_VERSION => {
                self.send_connack(out, from, false, Code::UnsupportedVersion, 0);
            }
            Frame::Connect {
                clean_session,
                keepalive_s,
                client_id,
                will,
                ..
            } => self.connect(
                from,
                clean_session,
                keepalive_s,
                client_id,
                will,
                now_ms,
                out,
            ),
            Frame::Resume { session_token } => {
                let slot = self.by_client.slots().find(|&s| {
                    self.sessions[s]
                        .as_ref()
                        .is_some_and(|d| d.token == session_token)
                });
                let keyed = slot
                    .and_then(|s| self.sessions[s].as_ref())
                    .is_some_and(|d| self.credentials.key(d.client_id()).is_some());
                match slot.filter(|_| !keyed) {
                    Some(slot) => {
                        self.rebind(slot, from);
                        self.heard(slot, now_ms);
                        self.send_connack(out, from, true, Code::Ok, session_token);
                    }
                    None => {
                        self.stats.unknown_session_frames += 1;
                        if self.unsolicited_allowed(now_ms) {
                            self.send_connack(out, from, false, Code::UnknownSession, 0);
                        }
                    }
                }
            }
            frame => {
                let Some(slot) = self.by_addr.get(&from, &self.sessions) else {
                    self.stats.unknown_session_frames += 1;
                    let ref_type = bytes.first().map_or(0, |b| b >> 4);
                    self.send_unsolicited_error(
                        out,
                        from,
                        now_ms,
                        Code::UnknownSession,
                        ref_type,
                        0,
                    );
                    return;
                };
                let keyed = self.sessions[slot]
                    .as_ref()
                    .is_some_and(|d| self.credentials.key(d.client_id()).is_some());
                if keyed {
                    // A plain frame claiming a keyed device's session: dropped.
                    self.stats.plain_refused += 1;
                    return;
                }
                self.heard(slot, now_ms);
                self.established(slot, frame, now_ms, out);
            }
        }
    }

    fn remember_foreign(&mut self, from: SocketAddr, shard: usize) {
        let key = Peer::Udp(from).hash64();
        if self.foreign.len() >= self.limits.foreign_addrs_max && !self.foreign.contains_key(&key) {
            // Bounded: forget an arbitrary one (its device will RESUME again).
            if let Some(&any) = self.foreign.keys().next() {
                self.foreign.remove(&any);
            }
        }
        self.foreign.insert(key, shard as u8);
    }

    fn heard(&mut self, slot: usize, now_ms: u64) {
        if let Some(session) = self.sessions[slot].as_mut() {
            session.heard(now_ms);
        }
    }

    fn rebind(&mut self, slot: usize, to: Peer) {
        let Some(session) = self.sessions[slot].as_mut() else {
            return;
        };
        let old = std::mem::replace(&mut session.addr, to);
        self.by_addr.remove(&old, slot);
        self.by_addr.insert(&to, slot, &self.sessions);
        if old != to {
            self.touch(slot);
        }
        if let Peer::Udp(addr) = to {
            self.foreign.remove(&Peer::Udp(addr).hash64());
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn connect(
        &mut self,
        from: Peer,
        clean_session: bool,
        keepalive_s: u32,
        client_id: &[u8],
        will: Option<wire::Will<'_>>,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        if client_id.is_empty() || client_id.len() > wire::CLIENT_ID_BYTES_MAX {
            self.send_connack(out, from, false, Code::Malformed, 0);
            return;
        }
        if let (Some(will), Some(permissions)) = (&will, self.credentials.permissions(client_id)) {
            if !permissions.can_publish(will.subject) {
                self.stats.not_permitted += 1;
                self.send_connack(out, from, false, Code::NotPermitted, 0);
                return;
            }
        }
        let existing = self.by_client.get(client_id, &self.sessions);
        if let Some(slot) = existing {
            let session = self.sessions[slot].as_ref().expect("indexed slot is live");
            if session.fresh && session.addr == from {
                // A retransmitted CONNECT (its CONNACK was lost): the same answer.
                let token = session.token;
                self.send_connack(out, from, !clean_session, Code::Ok, token);
                return;
            }
            if session.addr != from {
                // Taken over from another address: tell the old one.
                out.push(Action::Send {
                    to: session.addr,
                    frame: encode(&Frame::Disconnect { sleep_s: None }),
                });
            }
        }
        let (slot, present) = match existing {
            Some(slot) if !clean_session => {
                // Persistent session: keep its topics and subscriptions.
                self.rebind(slot, from);
                if let Some(s) = self.sessions[slot].as_mut() {
                    s.set_keepalive_s(keepalive_s);
                    s.wake();
                }
                (slot, true)
            }
            existing => {
                if let Some(slot) = existing {
                    self.remove(slot, false, out);
                }
                if self.by_client.len() >= self.limits.sessions_max {
                    self.stats.refused += 1;
                    self.send_connack(out, from, false, Code::NoResources, 0);
                    return;
                }
                let token = self.new_token();
                let session = DeviceSession::new(client_id, from, token, keepalive_s, now_ms);
                let slot = match self.free.pop() {
                    Some(slot) => {
                        self.sessions[slot] = Some(session);
                        slot
                    }
                    None => {
                        self.sessions.push(Some(session));
                        self.sessions.len() - 1
                    }
                };
                self.by_client.insert(client_id, slot, &self.sessions);
                if let Some(old) = self.by_addr.get(&from, &self.sessions) {
                    if old != slot {
                        self.remove(old, false, out);
                    }
                }
                self.by_addr.insert(&from, slot, &self.sessions);
                if let Peer::Udp(addr) = from {
                    self.foreign.remove(&Peer::Udp(addr).hash64());
                }
                (slot, false)
            }
        };
        self.set_permissions(slot, client_id);
        let session = self.sessions[slot].as_mut().expect("slot just filled");
        session.heard(now_ms);
        session.persistent = !clean_session;
        session.set_will(will.map(|w| Will {
            subject: w.subject.into(),
            payload: w.payload.into(),
            qos1: w.qos == Qos::AtLeastOnce,
        }));
        let token = session.token;
        self.send_connack(out, from, present, Code::Ok, token);
        if present {
            // What waited for the device: buffered messages, its QoS 1 queue.
            let session = self.sessions[slot].as_mut().expect("slot just filled");
            for frame in session.take_buffered() {
                out.push(Action::Send {
                    to: from,
                    frame: frame.into_vec(),
                });
            }
            self.pump_qos1(slot, now_ms, Qos1Pass::Wake, out);
        }
        self.touch(slot);
    }

    /// A frame from a device with a session here.
    fn established(&mut self, slot: usize, frame: Frame<'_>, now_ms: u64, out: &mut Vec<Action>) {
        let session = self.sessions[slot].as_mut().expect("live slot");
        session.fresh = false;
        let to = session.addr;
        match frame {
            Frame::Publish {
                qos,
                topic,
                msg_id,
                payload,
            } => {
                if payload.len() > self.limits.payload_bytes_max {
                    self.send_error(out, to, Code::TooLarge, 0x3, msg_id);
                    return;
                }
                let subject = match topic {
                    TopicRef::Registered(id) => session.topic(id).map(<[u8]>::to_vec),
                    TopicRef::Predefined(id) => self.predefined.subject(id, session.client_id()),
                    TopicRef::Reply(handle) => session.take_reply(handle).map(<[u8]>::into_vec),
                };
                let Some(subject) = subject else {
                    self.send_publish_refusal(out, to, qos, msg_id, topic.id(), Code::UnknownTopic);
                    return;
                };
                // A reply to a handle is allowed: the handle is single-use and
                // the device was allowed the request (allow_responses, max 1).
                let reply = matches!(topic, TopicRef::Reply(_));
                let permissions = self.permissions.get(&slot);
                if !reply && permissions.is_some_and(|p| !p.can_publish(&subject)) {
                    self.stats.not_permitted += 1;
                    self.send_publish_refusal(out, to, qos, msg_id, topic.id(), Code::NotPermitted);
                    return;
                }
                let session = self.sessions[slot].as_mut().expect("live slot");
                let ack = match qos {
                    Qos::AtMostOnce => None,
                    Qos::AtLeastOnce => {
                        if !session.first_sight(msg_id) {
                            // A retransmit: the first copy was routed; ack again.
                            self.stats.duplicate_publishes += 1;
                            out.push(Action::AckAgain { to, msg_id });
                            return;
                        }
                        Some((to, msg_id))
                    }
                };
                out.push(Action::Publish {
                    subject,
                    reply: None,
                    payload: payload.to_vec(),
                    ack,
                    qos1: qos == Qos::AtLeastOnce,
                });
                // The de-duplication window changed.
                if qos == Qos::AtLeastOnce {
                    self.touch(slot);
                }
            }
            Frame::Register {
                id: req_id,
                subject,
            } => {
                let (topic, code) = if !crate::nats::subject::is_valid_publish_subject(subject)
                    || subject.len() > wire::SUBJECT_BYTES_MAX
                {
                    (0, Code::InvalidSubject)
                } else {
                    match session.register(subject, true) {
                        Some(topic) => (topic, Code::Ok),
                        None => (0, Code::NoResources),
                    }
                };
                out.push(Action::Send {
                    to,
                    frame: encode(&Frame::Regack {
                        req_id,
                        topic,
                        code,
                    }),
                });
                if code == Code::Ok {
                    self.touch(slot);
                }
            }
            // The device acknowledging a broker REGISTER: nothing to do.
            // The device's answer to the broker's REGISTER: deliveries held for
            // that topic go now (or into the sleep buffer).
            Frame::Regack { topic, code, .. } => {
                if code == Code::Ok {
                    // The REGACK shows the device is listening now, asleep or not.
                    for frame in session.confirm_topic(topic) {
                        out.push(Action::Send {
                            to,
                            frame: frame.into_vec(),
                        });
                    }
                    self.touch(slot);
                    self.pump_qos1(slot, now_ms, Qos1Pass::Heard, out);
                } else {
                    self.stats.refused += session.refuse_topic(topic) as u64;
                }
            }
            // The device acknowledging a QoS 1 message: it leaves the queue
            // (any code: a refusal is final too), and the window moves on.
            Frame::Puback { msg_id, code } => {
                if session.acked_qos1(msg_id) {
                    if code != Code::Ok {
                        self.stats.refused += 1;
                    }
                    self.touch(slot);
                    self.pump_qos1(slot, now_ms, Qos1Pass::Heard, out);
                }
            }
            Frame::Subscribe {
                req_id,
                max_qos,
                filter,
            } => {
                let qos1 = max_qos == Qos::AtLeastOnce;
                if !crate::nats::subject::is_valid_subject(filter) {
                    out.push(Action::Send {
                        to,
                        frame: encode(&Frame::Suback {
                            req_id,
                            code: Code::InvalidSubject,
                        }),
                    });
                    return;
                }
                let permissions = self.permissions.get(&slot);
                if permissions.is_some_and(|p| !p.can_subscribe(filter, None)) {
                    self.stats.not_permitted += 1;
                    out.push(Action::Send {
                        to,
                        frame: encode(&Frame::Suback {
                            req_id,
                            code: Code::NotPermitted,
                        }),
                    });
                    return;
                }
                let session = self.sessions[slot].as_mut().expect("live slot");
                if let Some(existing) = session.subscription_mut(filter) {
                    // Subscribing again replaces max_qos.
                    existing.qos1 = qos1;
                    self.touch(slot);
                    out.push(Action::Send {
                        to,
                        frame: encode(&Frame::Suback {
                            req_id,
                            code: Code::Ok,
                        }),
                    });
                    return;
                }
                let sid = self.next_sid;
                if !session.add_subscription(filter, sid, qos1) {
                    out.push(Action::Send {
                        to,
                        frame: encode(&Frame::Suback {
                            req_id,
                            code: Code::NoResources,
                        }),
                    });
                    return;
                }
                self.next_sid += 1;
                self.by_sid.insert(sid, slot);
                self.touch(slot);
                out.push(Action::Subscribe {
                    sid,
                    filter: filter.to_vec(),
                    suback: Some((to, req_id)),
                });
            }
            Frame::Unsubscribe { req_id, filter } => {
                if let Some(sid) = session.remove_subscription(filter) {
                    self.by_sid.remove(&sid);
                    out.push(Action::Unsubscribe { sid });
                    self.touch(slot);
                }
                out.push(Action::Send {
                    to,
                    frame: encode(&Frame::Unsuback {
                        req_id,
                        code: Code::Ok,
                    }),
                });
            }
            Frame::Ping => {
                let buffered = session.take_buffered();
                let asleep = session.presence() != Presence::Awake;
                session.sleep_again(now_ms);
                for frame in buffered {
                    out.push(Action::Send {
                        to,
                        frame: frame.into_vec(),
                    });
                }
                // A sleeper's wake: its QoS 1 queue goes again (an awake
                // device's PING changes nothing for it).
                let pass = if asleep {
                    Qos1Pass::Wake
                } else {
                    Qos1Pass::Timer
                };
                self.pump_qos1(slot, now_ms, pass, out);
                out.push(Action::Send {
                    to,
                    frame: encode(&Frame::Pong),
                });
            }
            Frame::Disconnect { sleep_s: Some(s) } => {
                session.sleep(s, now_ms);
                self.touch(slot);
                out.push(Action::Send {
                    to,
                    frame: encode(&Frame::Disconnect { sleep_s: None }),
                });
            }
            Frame::Disconnect { sleep_s: None } => {
                // A clean goodbye: no will.
                if let Some(s) = self.sessions[slot].as_mut() {
                    s.set_will(None);
                }
                self.remove(slot, false, out);
                out.push(Action::Send {
                    to,
                    frame: encode(&Frame::Disconnect { sleep_s: None }),
                });
            }
            other => {
                // Broker-to-device frames sent by a device.
                self.stats.malformed_frames += 1;
                let ref_type = other.frame_type() as u8;
                self.send_error(out, to, Code::Malformed, ref_type, 0);
            }
        }
    }

    fn publish_anonymous(
        &mut self,
        client_id: &[u8],
        topic: u32,
        payload: &[u8],
        out: &mut Vec<Action>,
    ) {
        if payload.len() > self.limits.payload_bytes_max
            || client_id.len() > wire::CLIENT_ID_BYTES_MAX
        {
            self.stats.refused += 1;
            return;
        }
        let subject = self.predefined.subject(topic, client_id);
        let permissions = self.credentials.permissions(client_id);
        if let (Some(subject), Some(p)) = (&subject, permissions) {
            if !p.can_publish(subject) {
                self.stats.not_permitted += 1;
                return;
            }
        }
        match subject {
            Some(subject) => out.push(Action::Publish {
                subject,
                reply: None,
                payload: payload.to_vec(),
                ack: None,
                qos1: false,
            }),
            // Never answered (docs: it must not reflect traffic at a forged
            // address); counted.
            None => self.stats.refused += 1,
        }
    }

    /// A message for the internal subscription `sid`. Its subject goes as a
    /// predefined id when the table has it for this device, else as a session
    /// id; a new one is REGISTERed first and the message held until the
    /// device's REGACK. A sleeping device's frames are buffered instead.
    ///
    /// It goes at QoS 1 when the subscription asked for QoS 1 and the message
    /// carries `Perch-Qos: 1` (a device's QoS 1 publish, or a NATS publisher
    /// asking for it): queued until the device's PUBACK, retried, kept in the
    /// store for a sleeper.
    #[allow(clippy::too_many_arguments)]
    pub fn deliver(
        &mut self,
        sid: u64,
        subject: &[u8],
        reply: Option<&[u8]>,
        headers: &[u8],
        payload: &[u8],
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let start = out.len();
        self.deliver_plain(sid, subject, reply, headers, payload, now_ms, out);
        self.seal_sends(out, start);
    }

    #[allow(clippy::too_many_arguments)]
    fn deliver_plain(
        &mut self,
        sid: u64,
        subject: &[u8],
        reply: Option<&[u8]>,
        headers: &[u8],
        payload: &[u8],
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let Some(&slot) = self.by_sid.get(&sid) else {
            return;
        };
        if self
            .permissions_of(slot)
            .is_some_and(|p| p.delivery_denied(subject))
        {
            // Under an allowed wildcard, a denied subject (filtered here as
            // nats-server filters its deliveries).
            return;
        }
        let Some(session) = self.sessions[slot].as_mut() else {
            return;
        };
        let qos1 = session
            .subscriptions()
            .iter()
            .any(|s| s.sid == sid && s.qos1)
            && wants_qos1(headers);
        let predefined = self.predefined.id_for(subject, session.client_id());
        let mut registered_now = false;
        let (topic, confirmed) = match predefined {
            Some(id) => (TopicRef::Predefined(id), true),
            None => match session.topic_id(subject) {
                Some(id) => (TopicRef::Registered(id), session.topic_confirmed(id)),
                None => match session.register(subject, false) {
                    Some(id) => {
                        let register = encode(&Frame::Register { id, subject });
                        self.send_or_buffer(slot, register, out);
                        self.touch(slot);
                        registered_now = true;
                        (TopicRef::Registered(id), false)
                    }
                    None => {
                        // No id left: the device cannot be told which subject.
                        self.stats.refused += 1;
                        return;
                    }
                },
            },
        };
        let Some(session) = self.sessions[slot].as_mut() else {
            return;
        };
        let reply_handle = reply.map(|r| session.open_reply(r));
        if qos1 {
            let msg_id = session.take_msg_id();
            let frame = encode(&Frame::Deliver {
                qos: Qos::AtLeastOnce,
                topic,
                reply_handle,
                msg_id,
                payload,
            });
            let queued = session.queue_qos1(QueuedQos1 {
                msg_id,
                awaits_topic: if confirmed { 0 } else { topic.id() },
                frame: frame.into(),
                sent_at_ms: 0,
                sends: 0,
            });
            if !queued {
                self.stats.qos1_queue_full += 1;
                return;
            }
            self.touch(slot);
            self.pump_qos1(slot, now_ms, Qos1Pass::Timer, out);
            return;
        }
        let frame = encode(&Frame::Deliver {
            qos: Qos::AtMostOnce,
            topic,
            reply_handle,
            msg_id: 0,
            payload,
        });
        if confirmed {
            self.send_or_buffer(slot, frame, out);
        } else {
            let id = topic.id();
            let dropped = session.await_regack(id, frame.into());
            self.stats.refused += dropped as u64;
            if !registered_now && session.presence() == Presence::Awake {
                // The REGISTER may have been lost: ask again with each held
                // message (a sleeper's is still in its buffer).
                let again = encode(&Frame::Register { id, subject });
                self.send_or_buffer(slot, again, out);
            }
        }
    }

    /// Sends a frame to the session's device now, or buffers it while it sleeps.
    fn send_or_buffer(&mut self, slot: usize, frame: Vec<u8>, out: &mut Vec<Action>) {
        let Some(session) = self.sessions[slot].as_mut() else {
            return;
        };
        match session.presence() {
            Presence::Awake => out.push(Action::Send {
                to: session.addr,
                frame,
            }),
            Presence::Asleep { .. } => {
                self.stats.sleep_buffer_dropped += session.buffer(frame.into()) as u64;
            }
        }
    }

    /// Ends sessions silent past their keepalive (publishing their wills) and
    /// retransmits unacknowledged QoS 1 messages whose time has come.
    pub fn expire(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let start = out.len();
        self.expire_plain(now_ms, out);
        self.seal_sends(out, start);
    }

    fn expire_plain(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        for slot in self.slots_due(now_ms, DeviceSession::next_qos1_retry_ms) {
            self.pump_qos1(slot, now_ms, Qos1Pass::Timer, out);
        }
        for slot in self.slots_due(now_ms, DeviceSession::expires_at_ms) {
            self.stats.sessions_expired += 1;
            self.remove(slot, true, out);
        }
    }

    /// The slots whose session's `when` has come by `now_ms`.
    fn slots_due(&self, now_ms: u64, when: fn(&DeviceSession) -> Option<u64>) -> Vec<usize> {
        self.sessions
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_ref().and_then(when).is_some_and(|at| at <= now_ms))
            .map(|(slot, _)| slot)
            .collect()
    }

    /// The earliest time [`Gateway::expire`] has work.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.sessions
            .iter()
            .flatten()
            .flat_map(|s| [s.expires_at_ms(), s.next_qos1_retry_ms()])
            .flatten()
            .min()
    }

    fn remove(&mut self, slot: usize, publish_will: bool, out: &mut Vec<Action>) {
        let Some(mut session) = self.sessions[slot].take() else {
            return;
        };
        self.free.push(slot);
        self.permissions.remove(&slot);
        self.by_client.remove(session.client_id(), slot);
        self.by_addr.remove(&session.addr, slot);
        if self.persist {
            self.changed.insert(session.client_id().into());
        }
        for sub in session.subscriptions() {
            self.by_sid.remove(&sub.sid);
            out.push(Action::Unsubscribe { sid: sub.sid });
        }
        if publish_will {
            if let Some(will) = session.take_will() {
                out.push(Action::Publish {
                    subject: will.subject.into_vec(),
                    reply: None,
                    payload: will.payload.into_vec(),
                    ack: None,
                    qos1: will.qos1,
                });
            }
        }
    }

    fn send_connack(
        &self,
        out: &mut Vec<Action>,
        to: Peer,
        session_present: bool,
        code: Code,
        session_token: u32,
    ) {
        out.push(Action::Send {
            to,
            frame: encode(&Frame::Connack {
                session_present,
                code,
                session_token,
            }),
        });
    }

    fn send_publish_refusal(
        &mut self,
        out: &mut Vec<Action>,
        to: Peer,
        qos: Qos,
        msg_id: u32,
        topic: u32,
        code: Code,
    ) {
        self.stats.refused += 1;
        match qos {
            Qos::AtLeastOnce => out.push(Action::Send {
                to,
                frame: encode(&Frame::Puback { msg_id, code }),
            }),
            Qos::AtMostOnce => self.send_error(out, to, code, 0x3, topic),
        }
    }

    /// An ERROR to a peer that may have no session (garbage, unknown
    /// sessions): bounded per second, so spoofed datagrams cannot turn the
    /// broker into a reflector. Beyond the budget they are dropped, counted.
    fn send_unsolicited_error(
        &mut self,
        out: &mut Vec<Action>,
        to: Peer,
        now_ms: u64,
        code: Code,
        ref_type: u8,
        ref_id: u32,
    ) {
        if self.unsolicited_allowed(now_ms) {
            self.send_error(out, to, code, ref_type, ref_id);
        }
    }

    /// Spends one of this second's unsolicited answers, if any is left.
    fn unsolicited_allowed(&mut self, now_ms: u64) -> bool {
        let second = now_ms / 1000;
        if second != self.error_second {
            self.error_second = second;
            self.errors_this_second = 0;
        }
        if self.errors_this_second >= UNSOLICITED_ERRORS_PER_SECOND_MAX {
            self.stats.errors_suppressed += 1;
            return false;
        }
        self.errors_this_second += 1;
        true
    }

    fn send_error(&self, out: &mut Vec<Action>, to: Peer, code: Code, ref_type: u8, ref_id: u32) {
        out.push(Action::Send {
            to,
            frame: encode(&Frame::Error {
                code,
                ref_type: FrameType::from_u8(ref_type),
                ref_id,
            }),
        });
    }
}

/// Whether a NATS message asks for QoS 1 delivery to devices: a
/// `Perch-Qos: 1` header (name case-insensitive, as NATS headers are).
pub fn wants_qos1(headers: &[u8]) -> bool {
    headers
        .split(|&b| b == b'\n')
        .skip(1)
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            Some((&line[..colon], &line[colon + 1..]))
        })
        .any(|(name, value)| {
            name.trim_ascii()
                .eq_ignore_ascii_case(QOS_HEADER.as_bytes())
                && value.trim_ascii() == b"1"
        })
}

/// The header that carries a message's QoS between devices and NATS.
pub const QOS_HEADER: &str = "Perch-Qos";

/// Encodes a broker-made frame (its sizes are ours, so it always fits).
pub fn encode(frame: &Frame<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; frame.encoded_len()];
    let n = frame
        .encode(&mut buf)
        .expect("a buffer of encoded_len fits the frame");
    buf.truncate(n);
    buf
}

/// A message for the device on session topic `topic`.
pub fn encode_delivery(topic: u32, reply_handle: Option<u32>, payload: &[u8]) -> Vec<u8> {
    encode(&Frame::Deliver {
        qos: Qos::AtMostOnce,
        topic: TopicRef::Registered(topic),
        reply_handle,
        msg_id: 0,
        payload,
    })
}

#[cfg(test)]
mod protect_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> Peer {
        Peer::Udp(SocketAddr::from(([10, 0, 0, 1], port)))
    }

    fn gateway(shard: usize, shards: usize) -> Gateway {
        let table = [(1u32, "sensors.{client}.t".to_string())]
            .into_iter()
            .collect();
        Gateway::new(
            shard,
            shards,
            GatewayLimits {
                sessions_max: 3,
                ..GatewayLimits::default()
            },
            Arc::new(Predefined::new(&table).expect("table")),
        )
    }

    /// Feeds one frame; returns the actions, with sent frames decoded.
    fn feed(g: &mut Gateway, from: Peer, frame: &Frame<'_>, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        g.handle_datagram(from, &encode(frame), false, now_ms, &mut out);
        out
    }

    fn sent(actions: &[Action]) -> Vec<Frame<'_>> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { frame, .. } => {
                    Some(wire::decode_from_broker(frame).expect("broker frames decode"))
                }
                _ => None,
            })
            .collect()
    }

    fn connect(g: &mut Gateway, from: Peer, id: &str, keepalive_s: u32, now_ms: u64) -> u32 {
        let out = feed(
            g,
            from,
            &Frame::Connect {
                version: wire::PROTOCOL_VERSION,
                clean_session: true,
                keepalive_s,
                client_id: id.as_bytes(),
                will: Some(wire::Will {
                    qos: Qos::AtMostOnce,
                    subject: b"will.x",
                    payload: b"bye",
                }),
            },
            now_ms,
        );
        match sent(&out).as_slice() {
            [Frame::Connack {
                code: Code::Ok,
                session_token,
                ..
            }] => *session_token,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    #[test]
    fn qos1_retransmits_are_routed_once_and_acked_again() {
        let mut g = gateway(0, 1);
        connect(&mut g, addr(1), "d", 10, 0);
        let out = feed(
            &mut g,
            addr(1),
            &Frame::Register {
                id: 4,
                subject: b"a.b",
            },
            1,
        );
        assert_eq!(
            sent(&out),
            vec![Frame::Regack {
                req_id: 4,
                topic: 1,
                code: Code::Ok
            }]
        );
        let publish = Frame::Publish {
            qos: Qos::AtLeastOnce,
            topic: TopicRef::Registered(1),
            msg_id: 9,
            payload: b"p",
        };
        let first = feed(&mut g, addr(1), &publish, 2);
        assert!(matches!(
            &first[..],
            [Action::Publish {
                ack: Some((_, 9)),
                ..
            }]
        ));
        // Duplicated datagram, then the same id retried after a lost PUBACK.
        for now in [3, 500] {
            let again = feed(&mut g, addr(1), &publish, now);
            assert_eq!(
                again,
                vec![Action::AckAgain {
                    to: addr(1),
                    msg_id: 9
                }]
            );
        }
        assert_eq!(g.stats.duplicate_publishes, 2);
    }

    #[test]
    fn sessions_live_on_their_owner_shard() {
        let shards = 4;
        let id = (0..100)
            .map(|i| format!("dev{i}"))
            .find(|id| owner_of(id.as_bytes(), shards) == 2)
            .expect("some id hashes to shard 2");
        let mut g = gateway(0, shards);
        let connect = Frame::Connect {
            version: wire::PROTOCOL_VERSION,
            clean_session: true,
            keepalive_s: 5,
            client_id: id.as_bytes(),
            will: None,
        };
        let out = feed(&mut g, addr(7), &connect, 0);
        assert!(matches!(&out[..], [Action::Forward { shard: 2, .. }]));
        // Later datagrams from that address go there too, without decoding.
        let out = feed(&mut g, addr(7), &Frame::Ping, 1);
        assert!(matches!(&out[..], [Action::Forward { shard: 2, .. }]));
        assert_eq!(g.session_count(), 0);
        // On the owner, the forwarded CONNECT opens the session.
        let mut owner = gateway(2, shards);
        let mut out = Vec::new();
        owner.handle_datagram(addr(7), &encode(&connect), true, 0, &mut out);
        assert!(matches!(
            sent(&out)[..],
            [Frame::Connack { code: Code::Ok, .. }]
        ));
    }

    #[test]
    fn sleeping_devices_get_their_buffer_on_ping_and_silent_ones_leave_a_will() {
        let mut g = gateway(0, 1);
        connect(&mut g, addr(1), "s", 2, 0);
        let out = feed(
            &mut g,
            addr(1),
            &Frame::Subscribe {
                req_id: 1,
                max_qos: Qos::AtMostOnce,
                filter: b"cmd.>",
            },
            0,
        );
        let sid = match &out[..] {
            [Action::Subscribe { sid, .. }] => *sid,
            other => panic!("{other:?}"),
        };
        feed(
            &mut g,
            addr(1),
            &Frame::Disconnect { sleep_s: Some(60) },
            10,
        );
        let mut out = Vec::new();
        g.deliver(sid, b"cmd.a", None, b"", b"1", 20, &mut out);
        g.deliver(sid, b"cmd.a", Some(b"_INBOX.r"), b"", b"2", 20, &mut out);
        assert!(out.is_empty(), "buffered while asleep");
        // Still within its sleep plus 1.5 keepalives: not expired.
        g.expire(60_000, &mut out);
        assert_eq!(g.session_count(), 1);
        let woke = feed(&mut g, addr(1), &Frame::Ping, 61_000);
        let frames = sent(&woke);
        assert_eq!(
            frames,
            vec![
                Frame::Register {
                    id: 1,
                    subject: b"cmd.a"
                },
                Frame::Pong
            ]
        );
        // The device confirms the subject: the held messages follow, in order.
        let confirmed = feed(
            &mut g,
            addr(1),
            &Frame::Regack {
                req_id: 1,
                topic: 1,
                code: Code::Ok,
            },
            61_010,
        );
        let frames = sent(&confirmed);
        assert!(matches!(
            frames[0],
            Frame::Deliver {
                reply_handle: None,
                payload: b"1",
                ..
            }
        ));
        assert!(matches!(
            frames[1],
            Frame::Deliver {
                reply_handle: Some(_),
                payload: b"2",
                ..
            }
        ));
        assert_eq!(frames.len(), 2);
        // Asleep again after the PONG (for another 60 s): buffered again.
        let mut out = Vec::new();
        g.deliver(sid, b"cmd.a", None, b"", b"3", 61_020, &mut out);
        assert!(out.is_empty());
        // No PING within 1.5 sleep durations: gone, its will published, its
        // subscription dropped.
        let mut out = Vec::new();
        g.expire(61_010 + 89_000, &mut out);
        assert_eq!(g.session_count(), 1);
        g.expire(61_010 + 90_000, &mut out);
        assert_eq!(g.session_count(), 0);
        assert!(out.contains(&Action::Unsubscribe { sid }));
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::Publish { subject, .. } if subject == b"will.x")));
    }

    #[test]
    fn resume_moves_the_session_to_the_new_address() {
        let mut g = gateway(0, 1);
        let token = connect(&mut g, addr(1), "nb", 30, 0);
        let out = feed(&mut g, addr(2), &Frame::Ping, 1);
        assert!(matches!(
            sent(&out)[..],
            [Frame::Error {
                code: Code::UnknownSession,
                ..
            }]
        ));
        let out = feed(
            &mut g,
            addr(2),
            &Frame::Resume {
                session_token: token,
            },
            2,
        );
        assert_eq!(
            sent(&out),
            vec![Frame::Connack {
                session_present: true,
                code: Code::Ok,
                session_token: token
            }]
        );
        let out = feed(&mut g, addr(1), &Frame::Ping, 3);
        assert!(
            matches!(
                sent(&out)[..],
                [Frame::Error {
                    code: Code::UnknownSession,
                    ..
                }]
            ),
            "the old address is forgotten"
        );
        let out = feed(
            &mut g,
            addr(9),
            &Frame::Resume {
                session_token: token ^ 1,
            },
            4,
        );
        assert!(matches!(
            sent(&out)[..],
            [Frame::Connack {
                code: Code::UnknownSession,
                ..
            }]
        ));
    }

    #[test]
    fn client_ids_with_one_hash_keep_their_own_sessions() {
        let mut g = gateway(0, 1);
        g.by_client.hasher = |_| 7; // every id clashes
        g.by_addr.hasher = |_| 9; // and every address
        let ids = ["a", "b", "c"];
        let tokens: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| connect(&mut g, addr(i as u16), id, 30, 0))
            .collect();
        assert_eq!(g.session_count(), 3);
        for (i, id) in ids.iter().enumerate() {
            let slot = g
                .by_client
                .get(id.as_bytes(), &g.sessions)
                .expect("indexed");
            assert_eq!(g.sessions[slot].as_ref().map(|s| s.token), Some(tokens[i]));
        }
        // The one in the hash map leaves: a clash is promoted and still found.
        feed(&mut g, addr(0), &Frame::Disconnect { sleep_s: None }, 1);
        assert_eq!(g.session_count(), 2);
        assert!(g.by_client.get(b"a", &g.sessions).is_none());
        for id in ["b", "c"] {
            assert!(
                g.by_client.get(id.as_bytes(), &g.sessions).is_some(),
                "{id}"
            );
        }
        // Frames from each address still reach their own session.
        for port in [1u16, 2] {
            let out = feed(&mut g, addr(port), &Frame::Ping, 2);
            assert_eq!(sent(&out), vec![Frame::Pong], "port {port}");
        }
        let out = feed(&mut g, addr(0), &Frame::Ping, 2);
        assert!(matches!(
            sent(&out)[..],
            [Frame::Error {
                code: Code::UnknownSession,
                ..
            }]
        ));
        // Reconnecting from elsewhere takes the same session over (the old
        // address is told), not a second one.
        let out = feed(
            &mut g,
            addr(9),
            &Frame::Connect {
                version: wire::PROTOCOL_VERSION,
                clean_session: true,
                keepalive_s: 30,
                client_id: b"c",
                will: None,
            },
            2,
        );
        assert!(matches!(
            sent(&out)[..],
            [
                Frame::Disconnect { sleep_s: None },
                Frame::Connack { code: Code::Ok, .. }
            ]
        ));
        assert_eq!(g.session_count(), 2);
        let out = feed(&mut g, addr(2), &Frame::Ping, 3);
        assert!(
            matches!(
                sent(&out)[..],
                [Frame::Error {
                    code: Code::UnknownSession,
                    ..
                }]
            ),
            "c moved to port 9"
        );
        let out = feed(&mut g, addr(9), &Frame::Ping, 3);
        assert_eq!(sent(&out), vec![Frame::Pong]);
    }

    #[test]
    fn a_flood_of_garbage_gets_a_bounded_number_of_answers() {
        let mut g = gateway(0, 1);
        let mut answered = 0;
        for port in 0..1000u16 {
            let mut out = Vec::new();
            g.handle_datagram(addr(port), &[0x00], false, 5, &mut out);
            answered += out.len();
        }
        assert_eq!(answered, UNSOLICITED_ERRORS_PER_SECOND_MAX as usize);
        assert_eq!(
            g.stats.errors_suppressed,
            1000 - u64::from(UNSOLICITED_ERRORS_PER_SECOND_MAX)
        );
        assert_eq!(g.session_count(), 0);
        assert!(
            g.foreign.is_empty() && g.by_addr.is_empty(),
            "nothing remembered of them"
        );
        // The next second answers again.
        let mut out = Vec::new();
        g.handle_datagram(addr(1), &[0x00], false, 1_005, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn limits_and_bad_frames_get_codes() {
        let mut g = gateway(0, 1);
        for i in 0..3 {
            connect(&mut g, addr(10 + i), &format!("d{i}"), 30, 0);
        }
        let out = feed(
            &mut g,
            addr(20),
            &Frame::Connect {
                version: 1,
                clean_session: true,
                keepalive_s: 30,
                client_id: b"d9",
                will: None,
            },
            0,
        );
        assert!(matches!(
            sent(&out)[..],
            [Frame::Connack {
                code: Code::NoResources,
                ..
            }]
        ));
        let mut out = Vec::new();
        g.handle_datagram(addr(10), &[0xFF, 0xFF, 0xFF], false, 1, &mut out);
        assert!(matches!(
            sent(&out)[..],
            [Frame::Error {
                code: Code::Malformed,
                ..
            }]
        ));
        assert_eq!(g.stats.malformed_frames, 1);
        let big = vec![0u8; wire::FRAME_BYTES_MAX + 1];
        let out = feed(
            &mut g,
            addr(10),
            &Frame::Publish {
                qos: Qos::AtLeastOnce,
                topic: TopicRef::Predefined(1),
                msg_id: 3,
                payload: &big,
            },
            2,
        );
        assert!(matches!(
            sent(&out)[..],
            [Frame::Error {
                code: Code::TooLarge,
                ..
            }]
        ));
        // A predefined id works without REGISTER; a dotted client id cannot fill {client}.
        let out = feed(
            &mut g,
            addr(10),
            &Frame::Publish {
                qos: Qos::AtMostOnce,
                topic: TopicRef::Predefined(1),
                msg_id: 0,
                payload: b"x",
            },
            3,
        );
        assert!(
            matches!(&out[..], [Action::Publish { subject, .. }] if subject == b"sensors.d0.t")
        );
    }

    const QOS1: &[u8] = b"NATS/1.0\r\nPerch-Qos: 1\r\n\r\n";

    /// A session "d" at addr(1) subscribed to its predefined subject (no
    /// REGISTER needed) at `max_qos`; returns the sid.
    fn subscribed(g: &mut Gateway, max_qos: Qos, keepalive_s: u32) -> u64 {
        connect(g, addr(1), "d", keepalive_s, 0);
        let out = feed(
            g,
            addr(1),
            &Frame::Subscribe {
                req_id: 1,
                max_qos,
                filter: b"sensors.d.t",
            },
            0,
        );
        match &out[..] {
            [Action::Subscribe { sid, .. }] => *sid,
            other => panic!("{other:?}"),
        }
    }

    /// (msg id, payload) of every QoS 1 delivery sent; panics on QoS 0 ones.
    fn qos1_deliveries(actions: &[Action]) -> Vec<(u32, Vec<u8>)> {
        sent(actions)
            .into_iter()
            .filter_map(|f| match f {
                Frame::Deliver {
                    qos: Qos::AtLeastOnce,
                    msg_id,
                    payload,
                    ..
                } => Some((msg_id, payload.to_vec())),
                Frame::Deliver { .. } => panic!("a QoS 0 delivery"),
                _ => None,
            })
            .collect()
    }

    fn deliver(g: &mut Gateway, sid: u64, headers: &[u8], payload: &[u8], now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        g.deliver(sid, b"sensors.d.t", None, headers, payload, now, &mut out);
        out
    }

    fn tick(g: &mut Gateway, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        g.expire(now, &mut out);
        out
    }

    fn puback(g: &mut Gateway, msg_id: u32, now: u64) -> Vec<Action> {
        feed(
            g,
            addr(1),
            &Frame::Puback {
                msg_id,
                code: Code::Ok,
            },
            now,
        )
    }

    #[test]
    fn qos1_downlink_is_retried_with_the_same_msg_id_until_puback() {
        let mut g = gateway(0, 1);
        let sid = subscribed(&mut g, Qos::AtLeastOnce, 0);
        // Without the header the message is QoS 0, whatever the subscription.
        let plain = deliver(&mut g, sid, b"", b"x", 0);
        assert!(matches!(
            sent(&plain)[..],
            [Frame::Deliver {
                qos: Qos::AtMostOnce,
                msg_id: 0,
                topic: TopicRef::Predefined(1),
                ..
            }]
        ));
        let first = deliver(&mut g, sid, QOS1, b"m1", 100);
        assert_eq!(qos1_deliveries(&first), vec![(1, b"m1".to_vec())]);
        assert!(tick(&mut g, 2_099).is_empty(), "not before the retry time");
        assert_eq!(g.next_expiry_ms(), Some(2_100));
        let again = tick(&mut g, 2_100);
        assert_eq!(qos1_deliveries(&again), vec![(1, b"m1".to_vec())]);
        // The next retry waits twice as long.
        assert!(tick(&mut g, 6_099).is_empty());
        assert_eq!(qos1_deliveries(&tick(&mut g, 6_100)).len(), 1);
        assert!(puback(&mut g, 1, 6_200).is_empty());
        assert!(tick(&mut g, 100_000).is_empty(), "acked: never again");
        assert_eq!(g.next_expiry_ms(), None);
        // A second message gets the next msg id.
        let second = deliver(&mut g, sid, QOS1, b"m2", 100_000);
        assert_eq!(qos1_deliveries(&second), vec![(2, b"m2".to_vec())]);
    }

    #[test]
    fn a_qos0_subscription_gets_qos1_messages_at_qos0() {
        let mut g = gateway(0, 1);
        let sid = subscribed(&mut g, Qos::AtMostOnce, 0);
        let out = deliver(&mut g, sid, QOS1, b"x", 0);
        assert!(matches!(
            sent(&out)[..],
            [Frame::Deliver {
                qos: Qos::AtMostOnce,
                ..
            }]
        ));
        assert!(tick(&mut g, 100_000).is_empty());
    }

    #[test]
    fn qos1_downlink_ids_stay_within_the_span_of_the_oldest_unacked() {
        let mut g = gateway(0, 1);
        let sid = subscribed(&mut g, Qos::AtLeastOnce, 0);
        let mut out = Vec::new();
        for i in 0..12u8 {
            out.extend(deliver(&mut g, sid, QOS1, &[i], 1));
        }
        let ids: Vec<u32> = qos1_deliveries(&out)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(
            ids,
            (1..=8).collect::<Vec<_>>(),
            "8 past the oldest at most"
        );
        // An ack out of order moves nothing: 1 is still the oldest.
        assert!(qos1_deliveries(&puback(&mut g, 5, 10)).is_empty());
        let moved = puback(&mut g, 1, 11);
        assert_eq!(qos1_deliveries(&moved), vec![(9, vec![8])]);
        // A retry resends the unacked ones of the window, not 5.
        let retry = tick(&mut g, 2_001);
        let ids: Vec<u32> = qos1_deliveries(&retry)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, vec![2, 3, 4, 6, 7, 8]);
    }

    #[test]
    fn an_unacknowledged_qos1_message_is_dropped_after_its_last_send() {
        let mut g = gateway(0, 1);
        let sid = subscribed(&mut g, Qos::AtLeastOnce, 0);
        let mut sends = qos1_deliveries(&deliver(&mut g, sid, QOS1, b"m", 0)).len();
        let mut now = 0;
        while let Some(at) = g.next_expiry_ms() {
            assert!(at > now, "time moves on");
            now = at;
            sends += qos1_deliveries(&tick(&mut g, now)).len();
        }
        assert_eq!(sends, usize::from(super::super::session::QOS1_SENDS_MAX));
        assert_eq!(g.stats.qos1_undeliverable, 1);
    }

    #[test]
    fn a_full_qos1_queue_refuses_new_messages_and_counts_them() {
        let mut g = gateway(0, 1);
        let sid = subscribed(&mut g, Qos::AtLeastOnce, 0);
        let max = super::super::session::QOS1_QUEUE_MSGS_MAX;
        for i in 0..max + 3 {
            deliver(&mut g, sid, QOS1, format!("{i}").as_bytes(), 0);
        }
        assert_eq!(g.stats.qos1_queue_full, 3);
        // The oldest are kept (they may be in flight): ack the first window
        // and the next ones follow in order.
        let mut next = Vec::new();
        for id in 1..=8 {
            next.extend(qos1_deliveries(&puback(&mut g, id, 5)));
        }
        assert_eq!(next.first(), Some(&(9, b"8".to_vec())));
    }

    #[test]
    fn a_sleeper_gets_its_qos1_messages_at_every_wake_until_it_acks() {
        let mut g = gateway(0, 1);
        let sid = subscribed(&mut g, Qos::AtLeastOnce, 0);
        feed(&mut g, addr(1), &Frame::Disconnect { sleep_s: Some(60) }, 0);
        assert!(deliver(&mut g, sid, QOS1, b"a", 10).is_empty());
        assert!(deliver(&mut g, sid, QOS1, b"b", 20).is_empty());
        assert!(tick(&mut g, 30_000).is_empty(), "no retries to a sleeper");
        let wake = feed(&mut g, addr(1), &Frame::Ping, 60_000);
        assert_eq!(
            qos1_deliveries(&wake),
            vec![(1, b"a".to_vec()), (2, b"b".to_vec())]
        );
        assert_eq!(sent(&wake).last(), Some(&Frame::Pong));
        // It went back to sleep without acking: all again at the next wake.
        let wake = feed(&mut g, addr(1), &Frame::Ping, 120_000);
        assert_eq!(qos1_deliveries(&wake).len(), 2);
        puback(&mut g, 1, 120_001);
        puback(&mut g, 2, 120_002);
        let wake = feed(&mut g, addr(1), &Frame::Ping, 180_000);
        assert_eq!(sent(&wake), vec![Frame::Pong]);
    }

    #[test]
    fn a_qos1_message_on_a_new_subject_waits_for_the_regack() {
        let mut g = gateway(0, 1);
        connect(&mut g, addr(1), "d", 0, 0);
        let out = feed(
            &mut g,
            addr(1),
            &Frame::Subscribe {
                req_id: 1,
                max_qos: Qos::AtLeastOnce,
                filter: b"cmd.>",
            },
            0,
        );
        let [Action::Subscribe { sid, .. }] = out[..] else {
            panic!("{out:?}");
        };
        let mut out = Vec::new();
        g.deliver(sid, b"cmd.x", None, QOS1, b"go", 100, &mut out);
        assert_eq!(
            sent(&out),
            vec![Frame::Register {
                id: 1,
                subject: b"cmd.x"
            }]
        );
        // The REGACK is lost: the REGISTER is asked again at the retry time.
        assert!(tick(&mut g, 2_099).is_empty());
        let again = tick(&mut g, 2_100);
        assert_eq!(
            sent(&again),
            vec![Frame::Register {
                id: 1,
                subject: b"cmd.x"
            }]
        );
        let confirmed = feed(
            &mut g,
            addr(1),
            &Frame::Regack {
                req_id: 1,
                topic: 1,
                code: Code::Ok,
            },
            2_200,
        );
        assert_eq!(qos1_deliveries(&confirmed), vec![(1, b"go".to_vec())]);
    }

    #[test]
    fn headers_ask_for_qos1_by_name_case_insensitively() {
        assert!(wants_qos1(b"NATS/1.0\r\nPerch-Qos: 1\r\n\r\n"));
        assert!(wants_qos1(b"NATS/1.0\r\nX: y\r\nperch-qos:1\r\n\r\n"));
        assert!(!wants_qos1(b"NATS/1.0\r\nPerch-Qos: 0\r\n\r\n"));
        assert!(!wants_qos1(b"NATS/1.0\r\nPerch-Qosx: 1\r\n\r\n"));
        assert!(
            !wants_qos1(b"Perch-Qos: 1\r\n"),
            "the status line is no header"
        );
        assert!(!wants_qos1(b""));
    }

    /// A persistent session with a topic, a subscription, a will, a QoS 1
    /// queue and QoS 1 ids seen, asleep: stored and brought back whole.
    #[test]
    fn stored_sessions_come_back_whole() {
        let mut g = gateway(0, 1);
        g.enable_persistence();
        let out = feed(
            &mut g,
            addr(1),
            &Frame::Connect {
                version: wire::PROTOCOL_VERSION,
                clean_session: false,
                keepalive_s: 30,
                client_id: b"d",
                will: Some(wire::Will {
                    qos: Qos::AtLeastOnce,
                    subject: b"will.d",
                    payload: b"gone",
                }),
            },
            0,
        );
        let Some(Frame::Connack { session_token, .. }) = sent(&out).first().cloned() else {
            panic!("{out:?}");
        };
        let topic = feed(
            &mut g,
            addr(1),
            &Frame::Register {
                id: 1,
                subject: b"up.d",
            },
            1,
        );
        assert_eq!(sent(&topic).len(), 1);
        feed(
            &mut g,
            addr(1),
            &Frame::Publish {
                qos: Qos::AtLeastOnce,
                topic: TopicRef::Registered(1),
                msg_id: 7,
                payload: b"r",
            },
            2,
        );
        let out = feed(
            &mut g,
            addr(1),
            &Frame::Subscribe {
                req_id: 2,
                max_qos: Qos::AtLeastOnce,
                filter: b"sensors.d.t",
            },
            3,
        );
        let [Action::Subscribe { sid, .. }] = out[..] else {
            panic!("{out:?}");
        };
        let acked = qos1_deliveries(&deliver(&mut g, sid, QOS1, b"one", 4));
        assert_eq!(acked.len(), 1);
        puback(&mut g, 1, 5);
        feed(&mut g, addr(1), &Frame::Disconnect { sleep_s: Some(60) }, 6);
        assert!(deliver(&mut g, sid, QOS1, b"two", 7).is_empty());
        assert!(deliver(&mut g, sid, QOS1, b"three", 8).is_empty());
        let changes = g.take_changes();
        assert_eq!(changes.len(), 1);
        let (client_id, Some(bytes)) = &changes[0] else {
            panic!("a persistent session is stored");
        };
        assert_eq!(&**client_id, b"d");

        // A restarted broker.
        let mut g = gateway(0, 1);
        g.enable_persistence();
        let mut out = Vec::new();
        assert_eq!(g.restore(bytes, 0, &mut out), Ok(Some(b"d".to_vec())));
        let [Action::Subscribe {
            sid,
            ref filter,
            suback: None,
        }] = out[..]
        else {
            panic!("{out:?}");
        };
        assert_eq!(filter, b"sensors.d.t");
        // The sleeper wakes from its address: the queued messages, same ids.
        let wake = feed(&mut g, addr(1), &Frame::Ping, 1_000);
        assert_eq!(
            qos1_deliveries(&wake),
            vec![(2, b"two".to_vec()), (3, b"three".to_vec())]
        );
        // New messages continue the ids; the uplink window is kept (7 is a
        // retransmit) and so is the registered topic.
        puback(&mut g, 2, 1_001);
        puback(&mut g, 3, 1_002);
        let next = deliver(&mut g, sid, QOS1, b"four", 1_003);
        assert!(next.is_empty(), "asleep again after the PONG");
        let retransmit = feed(
            &mut g,
            addr(1),
            &Frame::Publish {
                qos: Qos::AtLeastOnce,
                topic: TopicRef::Registered(1),
                msg_id: 7,
                payload: b"r",
            },
            1_004,
        );
        assert!(
            matches!(retransmit[..], [Action::AckAgain { msg_id: 7, .. }]),
            "{retransmit:?}"
        );
        // RESUME with the old token still finds it.
        let resumed = feed(&mut g, addr(2), &Frame::Resume { session_token }, 1_005);
        assert!(matches!(
            sent(&resumed)[..],
            [Frame::Connack {
                session_present: true,
                code: Code::Ok,
                ..
            }]
        ));
        let wake = feed(&mut g, addr(2), &Frame::Ping, 1_006);
        assert_eq!(qos1_deliveries(&wake), vec![(4, b"four".to_vec())]);
        // Its will survived too.
        let mut out = Vec::new();
        g.expire(10_000_000, &mut out);
        assert!(out.iter().any(|a| matches!(
            a,
            Action::Publish { subject, qos1: true, .. } if subject == b"will.d"
        )));
        // Gone: the stored copy is removed.
        let changes = g.take_changes();
        assert!(changes
            .iter()
            .any(|(id, bytes)| &**id == b"d" && bytes.is_none()));
    }

    #[test]
    fn damaged_stored_sessions_are_refused() {
        let mut g = gateway(0, 1);
        g.enable_persistence();
        connect(&mut g, addr(1), "d", 0, 0);
        feed(&mut g, addr(1), &Frame::Disconnect { sleep_s: Some(5) }, 1);
        let changes = g.take_changes();
        let Some((_, Some(bytes))) = changes.first() else {
            panic!("a sleeping session is stored: {changes:?}");
        };
        let mut fresh = gateway(0, 1);
        let mut out = Vec::new();
        for cut in 0..bytes.len() {
            assert!(
                fresh.restore(&bytes[..cut], 0, &mut out).is_err(),
                "cut at {cut}"
            );
        }
        for i in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x40;
            assert!(fresh.restore(&flipped, 0, &mut out).is_err(), "flip at {i}");
        }
        assert_eq!(fresh.session_count(), 0);
        assert_eq!(fresh.restore(bytes, 0, &mut out), Ok(Some(b"d".to_vec())));
        // Another shard's session is left for that shard.
        let owner = owner_of(b"d", 2);
        let mut mine = gateway(owner, 2);
        let mut theirs = gateway(1 - owner, 2);
        assert_eq!(mine.restore(bytes, 0, &mut out), Ok(Some(b"d".to_vec())));
        assert_eq!(theirs.restore(bytes, 0, &mut out), Ok(None));
        // ...but forwards the device's datagrams to the owner.
        let ping = feed(&mut theirs, addr(1), &Frame::Ping, 1);
        assert!(
            matches!(ping[..], [Action::Forward { shard, .. }] if shard == owner),
            "{ping:?}"
        );
    }

    #[test]
    fn only_persistent_and_sleeping_sessions_are_stored() {
        let mut g = gateway(0, 1);
        g.enable_persistence();
        connect(&mut g, addr(1), "clean", 0, 0);
        feed(
            &mut g,
            addr(1),
            &Frame::Register {
                id: 1,
                subject: b"a.b",
            },
            1,
        );
        let changes = g.take_changes();
        assert!(
            changes.iter().all(|(_, bytes)| bytes.is_none()),
            "{changes:?}"
        );
        feed(&mut g, addr(1), &Frame::Disconnect { sleep_s: Some(9) }, 2);
        assert!(matches!(g.take_changes()[..], [(_, Some(_))]));
        feed(&mut g, addr(1), &Frame::Disconnect { sleep_s: None }, 3);
        assert!(matches!(g.take_changes()[..], [(_, None)]));
        assert!(g.take_changes().is_empty());
    }
}
