//! A shard: one pinned thread running a single-threaded runtime that owns its
//! connections, its slice of the subscription index and its mailboxes.
//!
//! Inside a shard everything is `Rc`/`RefCell`; no borrow is held across an
//! `.await`. Shards share nothing but the bounded mailboxes in [`Peers`] and a
//! few atomic counters in [`Shared`] (connection counts for placement and
//! max_connections, and [`ShardStats`] for monitoring, which each shard
//! publishes from its housekeeping tick so the message path pays nothing).

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use super::io::{self, Backend};
use super::jetstream::{JsRuntime, JsShared};
use super::mailbox::{Batch, BatchPool, Control, Inbox, InterestMessage, Peers};
use crate::config::{Config, Limits, Placement};
use crate::jetstream::service::{Catalog, HostOptions, OsRoot};
use crate::nats::encode::ServerInfo;
use crate::nats::parser::ParseLimits;
use crate::nats::session::{CloseReason, Session, SessionLimits, State};
use crate::router::Router;
use crate::store::LogConfig;

/// The exit code when a device line cannot be opened (EX_UNAVAILABLE).
const EXIT_DEVICES_FAILED: i32 = 69;
/// How often a shard checks connect deadlines, pings and stuck closes (and
/// records its heartbeat for the systemd watchdog).
pub(crate) const HOUSEKEEPING_TICK_MS: u64 = 100;
/// How long a closing client's queued output may take to flush before the
/// socket is shut down regardless.
const CLOSE_FLUSH_MS_MAX: u64 = 1_000;
/// How long shutdown waits for clients to drain before the shard stops anyway.
const SHUTDOWN_DRAIN_MS_MAX: u64 = 5_000;
/// Pause after an accept error such as EMFILE, so the loop does not spin.
const ACCEPT_ERROR_BACKOFF_MS: u64 = 50;

/// A test-only fault: shard `shard`'s thread blocks for good `after_ms` after
/// it started (its loop stops, as a deadlock or a runaway task would stop it).
#[derive(Clone, Copy, Debug)]
pub struct StallHook {
    pub shard: usize,
    pub after_ms: u64,
}

/// One shard's counters for monitoring, written only by that shard (each
/// housekeeping tick, from the sessions' own counters) and read by the HTTP
/// thread without asking the shard. A cache line each, so a shard's writes
/// never invalidate a neighbour's line.
#[repr(align(64))]
#[derive(Default)]
pub(crate) struct ShardStats {
    /// Client messages and their header + payload bytes, published (in) and
    /// delivered (out), since start, closed connections included.
    pub msgs_in: AtomicU64,
    pub msgs_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Clients closed for exceeding max_pending (updated at once: rare).
    pub slow_consumers: AtomicU64,
    /// Client subscriptions now, and client SUBs since start.
    pub subscriptions: AtomicU64,
    pub subscriptions_inserted: AtomicU64,
}

/// Counters of connections that have closed (their sessions are gone), so
/// the published totals never go backwards.
#[derive(Clone, Copy, Default)]
struct ClosedTotals {
    msgs_in: u64,
    msgs_out: u64,
    bytes_in: u64,
    bytes_out: u64,
}

/// A monitoring question for one shard (see [`Control::Monitor`]).
pub(crate) struct MonitorRequest {
    /// Include a snapshot of every client connection.
    pub connections: bool,
    /// With `connections`: each connection's subscriptions too.
    pub subscriptions: bool,
    pub reply: tokio::sync::oneshot::Sender<ShardReport>,
}

/// A shard's answer to a [`MonitorRequest`].
#[cfg_attr(not(feature = "http"), allow(dead_code))]
pub(crate) struct ShardReport {
    pub connections: Vec<crate::monitor::endpoints::ConnSnapshot>,
    /// `(sessions, counters)` of the shard's device gateway, when devices are on.
    pub devices: Option<(usize, crate::lite::gateway::Stats)>,
}

/// State shared by all shards (atomics only; nothing on the message path).
pub(crate) struct Shared {
    /// The config the broker started with. What a reload may change is in
    /// [`Shard::limits`] (per shard) and [`Shared::connections_max`]; the rest
    /// of this never changes while the broker runs.
    pub config: Config,
    /// max_connections as last (re)loaded.
    pub connections_max: AtomicUsize,
    /// The origin of [`Shared::heartbeat_ms`].
    pub clock_origin: Instant,
    /// Per shard: when its housekeeping last ran, in ms since `clock_origin`
    /// (the systemd watchdog pings only while every one is recent).
    pub heartbeat_ms: Vec<AtomicU64>,
    /// Shards that finished starting (store open, devices up, shard 0
    /// accepting); `serving_changed` is signalled at each.
    pub shards_serving: AtomicUsize,
    pub serving_changed: Notify,
    pub stall: Option<StallHook>,
    pub shard_count: usize,
    pub server_id: String,
    pub peers: Peers,
    pub connections_per_shard: Vec<AtomicUsize>,
    pub connections_total: AtomicUsize,
    /// Connections closed at accept for `connection_rate_per_ip`.
    pub connections_rate_limited: AtomicU64,
    next_client_id: AtomicU64,
    /// `[from * shard_count + to]`: interest changes from shard `from` that
    /// shard `to` has applied (for the SUB barrier).
    interest_applied: Vec<AtomicU64>,
    /// Present when streams are enabled (`store_dir`).
    pub js: Option<JsShared>,
    /// Shards whose streams are open and subscribed; clients are accepted after all.
    pub js_ready: AtomicUsize,
    /// Present when `[authorization]` asks for credentials (at start; each
    /// shard holds the one in force, see [`Shard::auth`]).
    pub auth: Option<std::sync::Arc<crate::auth::Auth>>,
    /// Whether clients must authenticate now (a reload may change it), for
    /// monitoring.
    pub auth_required: std::sync::atomic::AtomicBool,
    /// `[tls]` as last (re)loaded; None: TLS is off. Read once per accepted
    /// connection (never on the message path), replaced whole by a reload.
    pub tls: std::sync::RwLock<Option<Arc<crate::tls::TlsSettings>>>,
    /// Per shard, for monitoring.
    pub stats: Vec<ShardStats>,
    /// When the broker started (wall clock), for `/varz` and `/connz`.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub started: crate::jetstream::api::Timestamp,
    /// Connection moves (`runtime/moves.rs`): the id of the one in progress
    /// (0: none), the next id, halves of it not yet over, when the last one
    /// started (clock ms), and moves completed.
    pub move_in_progress: std::sync::atomic::AtomicU32,
    pub next_move_id: std::sync::atomic::AtomicU32,
    pub move_halves_left: std::sync::atomic::AtomicU32,
    pub last_move_started_ms: AtomicU64,
    pub moves_total: AtomicU64,
    /// Test-only (`--debug-move-every N`): every Nth read pass on a shard
    /// tries to move its connection to the next shard; 0: off.
    pub debug_move_every: u32,
}

impl Shared {
    pub(crate) fn new(
        config: Config,
        shard_count: usize,
        peers: Peers,
        stall: Option<StallHook>,
        tls: Option<crate::tls::TlsSettings>,
    ) -> Shared {
        // Checked by Config::validate before the shards start.
        let auth = config.auth().ok().flatten().map(std::sync::Arc::new);
        for user in auth.iter().flat_map(|a| a.plain_text_users()) {
            tracing::warn!(
                user,
                "authorization: plain-text password in the config; a bcrypt hash is safer"
            );
        }
        Shared {
            connections_max: AtomicUsize::new(config.max_connections),
            clock_origin: Instant::now(),
            heartbeat_ms: (0..shard_count).map(|_| AtomicU64::new(0)).collect(),
            shards_serving: AtomicUsize::new(0),
            serving_changed: Notify::new(),
            stall,
            shard_count,
            server_id: server_id(),
            peers,
            connections_per_shard: (0..shard_count).map(|_| AtomicUsize::new(0)).collect(),
            connections_total: AtomicUsize::new(0),
            connections_rate_limited: AtomicU64::new(0),
            auth_required: std::sync::atomic::AtomicBool::new(auth.is_some()),
            next_client_id: AtomicU64::new(1),
            interest_applied: (0..shard_count * shard_count)
                .map(|_| AtomicU64::new(0))
                .collect(),
            js: config.store_dir.clone().map(|path| JsShared {
                root: OsRoot { path },
                options: HostOptions {
                    log: LogConfig {
                        segment_bytes_max: config.store_segment_bytes,
                        ..LogConfig::default()
                    },
                    durability: config.store_durability,
                    per_stream: config.store_stream_durability.clone(),
                },
                catalog: Mutex::new(Catalog::default()),
            }),
            js_ready: AtomicUsize::new(0),
            auth,
            tls: std::sync::RwLock::new(tls.map(Arc::new)),
            stats: (0..shard_count).map(|_| ShardStats::default()).collect(),
            started: crate::jetstream::api::Timestamp::from_unix_nanos(unix_now_ns()),
            move_in_progress: std::sync::atomic::AtomicU32::new(0),
            next_move_id: std::sync::atomic::AtomicU32::new(1),
            move_halves_left: std::sync::atomic::AtomicU32::new(0),
            last_move_started_ms: AtomicU64::new(0),
            moves_total: AtomicU64::new(0),
            debug_move_every: 0,
            config,
        }
    }

    /// The TLS settings new connections use now.
    pub(crate) fn tls(&self) -> Option<Arc<crate::tls::TlsSettings>> {
        // A poisoned lock can only come from a panic, which aborts the process.
        self.tls.read().map(|t| t.clone()).unwrap_or(None)
    }

    /// Milliseconds on the heartbeat clock.
    pub(crate) fn clock_ms(&self) -> u64 {
        self.clock_origin.elapsed().as_millis() as u64
    }

    /// Client connections accepted since start (rejected ones included).
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn connections_accepted(&self) -> u64 {
        self.next_client_id.load(Ordering::Relaxed) - 1
    }

    fn interest_applied(&self, from: usize, to: usize) -> u64 {
        self.interest_applied[from * self.shard_count + to].load(Ordering::Acquire)
    }
}

fn unix_now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A random-looking 56-character id in nats-server's alphabet (uppercase A–Z, 2–7).
fn server_id() -> String {
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ (u64::from(std::process::id()) << 32)
        | 1;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut id = String::from("N");
    for _ in 0..55 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        id.push(ALPHABET[(seed % 32) as usize] as char);
    }
    id
}

/// nats-server sends its first PING to a client after at most 2 s (to learn the
/// round-trip time), then every ping interval.
const FIRST_PING_MS_MAX: u64 = 2_000;

fn first_ping_delay_ms(ping_interval_ms: u64) -> u64 {
    ping_interval_ms.min(FIRST_PING_MS_MAX)
}

/// What a shard knows about one of its connections besides the session. Kept
/// small (times are milliseconds since the shard started): there is one per
/// connection, idle ones included.
pub(crate) struct ConnEntry {
    pub session: Rc<Session>,
    fd: RawFd,
    shut_down: Cell<bool>,
    /// A TLS handshake is running: `deadline_ms` is when it is ended.
    handshaking: Cell<bool>,
    opened_ms: u64,
    /// While `handshaking`, the handshake's deadline; after it, when the
    /// CONNECT deadline starts: at accept, or for TLS clients when their
    /// handshake ended (each phase has its own timeout, as in nats-server).
    /// One field for both keeps every connection's entry 8 bytes smaller.
    deadline_ms: Cell<u64>,
    next_ping_ms: Cell<u64>,
    /// `NOT_CLOSING` until housekeeping first sees the session closing.
    closing_since_ms: Cell<u64>,
}

const NOT_CLOSING: u64 = u64::MAX;

/// A session waiting for the SUB barrier: see [`Shard::release_when_interest_applied`].
struct InterestHold {
    session: Rc<Session>,
    target: u64,
}

/// A shard's connections in slots: register hands out a slot, unregister frees
/// it for reuse. Denser than a hash map keyed by id, and iterated in order.
#[derive(Default)]
struct Connections {
    slots: Vec<Option<ConnEntry>>,
    free: Vec<usize>,
    len: usize,
}

impl Connections {
    fn insert(&mut self, entry: ConnEntry) -> usize {
        self.len += 1;
        match self.free.pop() {
            Some(slot) => {
                assert!(self.slots[slot].is_none(), "free slot {slot} in use");
                self.slots[slot] = Some(entry);
                slot
            }
            None => {
                self.slots.push(Some(entry));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, slot: usize) {
        assert!(
            self.slots[slot].take().is_some(),
            "slot {slot} was not in use"
        );
        self.len -= 1;
        self.free.push(slot);
        // Give memory back after a crowd has left (hysteresis: a quarter full).
        if self.len * 4 < self.slots.len() && self.slots.len() > 1024 {
            while self.slots.last().is_some_and(Option::is_none) {
                self.slots.pop();
            }
            let slots_len = self.slots.len();
            self.free.retain(|&s| s < slots_len);
            self.slots.shrink_to_fit();
            self.free.shrink_to_fit();
        }
    }

    fn iter(&self) -> impl Iterator<Item = &ConnEntry> {
        self.slots.iter().flatten()
    }
}

pub(crate) struct Shard {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub router: RefCell<Router>,
    /// The limits in force: the config's at start, replaced by a reload.
    limits: Cell<Limits>,
    pub batch_pool: BatchPool,
    connections: RefCell<Connections>,
    /// Set by readers and the data loop; taken by `spin_after_activity`.
    active: Cell<bool>,
    activity: Notify,
    /// Interest changes this shard has broadcast (to every other shard).
    interest_sent: Cell<u64>,
    /// The SUB barrier: sessions whose output is held until every other shard
    /// has applied this shard's first `target` interest changes, in order of
    /// `target` (it only grows). Released as peers confirm (`InterestApplied`).
    interest_holds: RefCell<std::collections::VecDeque<InterestHold>>,
    /// Interest from other shards, drained by the interest loop and by readers
    /// before they route (see [`Shard::apply_arrived_interest`]).
    interest_inbox: RefCell<Option<mpsc::UnboundedReceiver<InterestMessage>>>,
    closed_totals: Cell<ClosedTotals>,
    /// Client SUBs since start (monitoring's `num_inserts`).
    subscriptions_inserted: Cell<u64>,
    shutting_down: Cell<bool>,
    stop_accepting: Notify,
    /// This shard's JetStream, once its streams are open.
    pub js: std::cell::OnceCell<Rc<JsRuntime>>,
    /// This shard's device gateway, when devices are configured.
    pub device: std::cell::OnceCell<Rc<super::device::DeviceRuntime>>,
    /// `[authorization]` in force: the config's at start, replaced by a
    /// reload (None: no authentication).
    auth: RefCell<Option<std::sync::Arc<crate::auth::Auth>>>,
    /// Connection moves: this shard's half of the one in progress, round-trip
    /// counts, which batches from each shard it has handled.
    pub moves: super::moves::Moves,
    /// Read passes, for `--debug-move-every`.
    pub debug_passes: Cell<u64>,
    /// Scratch for the router's targets of one client message (borrowed only
    /// while a reader routes it, so every connection shares one).
    pub route_targets: RefCell<Vec<crate::router::RemoteTarget>>,
}

impl Shard {
    pub(crate) fn new(id: usize, shared: Arc<Shared>) -> Shard {
        let config = &shared.config;
        Shard {
            id,
            router: RefCell::new(Router::new(id, shared.shard_count)),
            limits: Cell::new(config.limits()),
            batch_pool: BatchPool::new(Arc::clone(&shared.peers.returned[id])),
            connections: RefCell::new(Connections::default()),
            active: Cell::new(false),
            activity: Notify::new(),
            interest_sent: Cell::new(0),
            interest_holds: RefCell::new(std::collections::VecDeque::new()),
            interest_inbox: RefCell::new(None),
            closed_totals: Cell::new(ClosedTotals::default()),
            subscriptions_inserted: Cell::new(0),
            shutting_down: Cell::new(false),
            stop_accepting: Notify::new(),
            js: std::cell::OnceCell::new(),
            device: std::cell::OnceCell::new(),
            auth: RefCell::new(shared.auth.clone()),
            moves: super::moves::Moves::default(),
            debug_passes: Cell::new(0),
            route_targets: RefCell::new(Vec::new()),
            shared,
        }
    }

    /// The `[authorization]` new connections must satisfy.
    pub(crate) fn auth(&self) -> Option<std::sync::Arc<crate::auth::Auth>> {
        self.auth.borrow().clone()
    }

    /// A reload replaced `[authorization]`: new connections get `new`, and
    /// every live one is checked against it ([`Session::reauthorize`]); the
    /// subscriptions it loses leave the router before the shard confirms the
    /// reload, so nothing the new permissions deny is routed to them after.
    fn apply_auth(&self, new: Option<std::sync::Arc<crate::auth::Auth>>) {
        *self.auth.borrow_mut() = new.clone();
        let mut removed = Vec::new();
        let mut closed = 0usize;
        for entry in self.connections.borrow().iter() {
            let outcome = entry.session.reauthorize(new.as_ref());
            closed += usize::from(outcome.closed);
            removed.extend(outcome.removed);
        }
        if !removed.is_empty() {
            let mut router = self.router.borrow_mut();
            for sub in &removed {
                router.unsubscribe(sub);
            }
        }
        if closed > 0 || !removed.is_empty() {
            tracing::info!(
                shard = self.id,
                closed,
                subscriptions_removed = removed.len(),
                "config reload: authorization applied to live connections"
            );
        }
        self.broadcast_interest();
    }

    /// The config the broker started with; for limits see [`Shard::limits`].
    pub(crate) fn config(&self) -> &Config {
        &self.shared.config
    }

    pub(crate) fn limits(&self) -> Limits {
        self.limits.get()
    }

    pub(crate) fn parse_limits(&self) -> ParseLimits {
        let limits = self.limits.get();
        ParseLimits {
            control_line_bytes_max: limits.max_control_line,
            payload_bytes_max: limits.max_payload,
        }
    }

    pub(crate) fn session_limits(&self) -> SessionLimits {
        let limits = self.limits.get();
        SessionLimits {
            pending_bytes_max: limits.max_pending,
            subscriptions_max: limits.max_subscriptions,
        }
    }

    /// A reload: new limits for new and live connections alike. Readers take
    /// the parse limits at each op and sessions check theirs at each use, so
    /// nothing is dropped; a ping interval shortened takes effect at once.
    fn apply_limits(&self, limits: Limits) {
        self.limits.set(limits);
        let session_limits = self.session_limits();
        let next_ping_ms = self.now_ms() + limits.ping_interval_ms;
        for entry in self.connections.borrow().iter() {
            entry.session.set_limits(session_limits);
            if entry.next_ping_ms.get() > next_ping_ms {
                entry.next_ping_ms.set(next_ping_ms);
            }
        }
    }

    /// The INFO line for one client.
    pub(crate) fn info_line(
        &self,
        client_id: u64,
        peer: Option<SocketAddr>,
        tls: Option<&crate::tls::TlsSettings>,
        nonce: Option<&[u8]>,
    ) -> Vec<u8> {
        let config = self.config();
        let limits = self.limits.get();
        let info = ServerInfo {
            server_id: self.shared.server_id.clone(),
            server_name: config
                .server_name
                .clone()
                .unwrap_or_else(|| self.shared.server_id.clone()),
            version: crate::nats::encode::PROTOCOL_VERSION.to_string(),
            go: crate::nats::encode::GO_FIELD.to_string(),
            host: config.listen.ip().to_string(),
            port: config.listen.port(),
            headers: true,
            auth_required: self.auth.borrow().is_some(),
            nonce: nonce
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .unwrap_or_default(),
            // TLS is never optional here, so `tls_available` is never sent.
            tls_required: tls.is_some(),
            tls_verify: tls.is_some_and(|t| t.verify),
            max_payload: limits.max_payload,
            jetstream: self.shared.js.is_some(),
            proto: 1,
            client_id,
            client_ip: peer.map(|p| p.ip().to_string()).unwrap_or_default(),
            ..ServerInfo::default()
        };
        let mut line = Vec::with_capacity(320);
        crate::nats::encode::info(&mut line, &info);
        line
    }

    /// Notes work for the spinner (a read, a batch from another shard).
    pub(crate) fn mark_active(&self) {
        if !self.active.replace(true) {
            self.activity.notify_one();
        }
    }

    /// Milliseconds on the broker's one clock (`Shared::clock_origin`), so
    /// connections' times compare across shards (`/connz?sort=start`).
    fn now_ms(&self) -> u64 {
        self.shared.clock_ms()
    }

    /// Adds a connection; returns its slot for [`Shard::unregister`].
    pub(crate) fn register(&self, session: &Rc<Session>, fd: RawFd) -> usize {
        let now_ms = self.now_ms();
        let slot = self.connections.borrow_mut().insert(ConnEntry {
            session: Rc::clone(session),
            fd,
            shut_down: Cell::new(false),
            opened_ms: now_ms,
            handshaking: Cell::new(false),
            deadline_ms: Cell::new(now_ms),
            next_ping_ms: Cell::new(
                now_ms + first_ping_delay_ms(self.limits.get().ping_interval_ms),
            ),
            closing_since_ms: Cell::new(NOT_CLOSING),
        });
        if self.shutting_down.get() {
            session.close(CloseReason::ServerShutdown);
        }
        slot
    }

    /// A TLS handshake begins on the connection in `slot`: housekeeping ends
    /// it after `timeout_ms` (by shutdown, never by racing the read).
    pub(crate) fn handshake_started(&self, slot: usize, timeout_ms: u64) {
        if let Some(entry) = &self.connections.borrow().slots[slot] {
            entry.handshaking.set(true);
            entry
                .deadline_ms
                .set(self.now_ms().saturating_add(timeout_ms));
        }
    }

    /// The handshake ended (either way); the CONNECT deadline starts now.
    pub(crate) fn handshake_ended(&self, slot: usize) {
        if let Some(entry) = &self.connections.borrow().slots[slot] {
            entry.handshaking.set(false);
            entry.deadline_ms.set(self.now_ms());
        }
    }

    /// [`Shard::register`] for a connection that moved here: it keeps the
    /// time it was opened (monitoring shows it).
    pub(crate) fn register_moved(&self, session: &Rc<Session>, fd: RawFd, opened_ms: u64) -> usize {
        let slot = self.register(session, fd);
        if let Some(entry) = self.connections.borrow_mut().slots[slot].as_mut() {
            entry.opened_ms = opened_ms;
        }
        slot
    }

    /// Removes a connection that is moving to another shard (it is not
    /// closing: the totals stay); returns when it was opened.
    pub(crate) fn unregister_moved(&self, slot: usize) -> u64 {
        let opened_ms = self.connections.borrow().slots[slot]
            .as_ref()
            .map_or(0, |e| e.opened_ms);
        self.connections.borrow_mut().remove(slot);
        self.shared.connections_per_shard[self.id].fetch_sub(1, Ordering::Relaxed);
        opened_ms
    }

    pub(crate) fn unregister(&self, slot: usize) {
        if let Some(entry) = &self.connections.borrow().slots[slot] {
            let session = &entry.session;
            let mut closed = self.closed_totals.get();
            closed.msgs_in += session.msgs_in();
            closed.msgs_out += session.msgs_out();
            closed.bytes_in += session.bytes_in();
            closed.bytes_out += session.bytes_out();
            self.closed_totals.set(closed);
        }
        self.connections.borrow_mut().remove(slot);
        self.shared.connections_per_shard[self.id].fetch_sub(1, Ordering::Relaxed);
        self.shared
            .connections_total
            .fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_count(&self) -> usize {
        self.connections.borrow().len
    }

    /// A client subscribed (counted for monitoring's `num_inserts`).
    pub(crate) fn note_subscribe(&self) {
        self.subscriptions_inserted
            .set(self.subscriptions_inserted.get() + 1);
    }

    /// A client was closed as a slow consumer.
    pub(crate) fn note_slow_consumer(&self) {
        self.shared.stats[self.id]
            .slow_consumers
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Answers a monitoring request from this shard's own state.
    fn report(&self, request: MonitorRequest) {
        let connections = if request.connections {
            self.connections
                .borrow()
                .iter()
                .map(|entry| self.snapshot(entry, request.subscriptions))
                .collect()
        } else {
            Vec::new()
        };
        let devices = self.device.get().map(|device| device.report());
        // The asker may have timed out and gone: nothing to do then.
        let _ = request.reply.send(ShardReport {
            connections,
            devices,
        });
    }

    fn snapshot(
        &self,
        entry: &ConnEntry,
        subscriptions: bool,
    ) -> crate::monitor::endpoints::ConnSnapshot {
        let session = &entry.session;
        let peer = peer_of(entry.fd);
        let started = self.shared.started;
        let start_ns = started.unix_seconds * 1_000_000_000
            + i64::from(started.nanos)
            + entry.opened_ms as i64 * 1_000_000;
        crate::monitor::endpoints::ConnSnapshot {
            cid: session.id,
            ip: peer.map(|p| p.ip().to_string()).unwrap_or_default(),
            port: peer.map_or(0, |p| p.port()),
            start: crate::jetstream::api::Timestamp::from_unix_nanos(start_ns),
            pending_bytes: session.pending_bytes() as u64,
            in_msgs: session.msgs_in(),
            out_msgs: session.msgs_out(),
            in_bytes: session.bytes_in(),
            out_bytes: session.bytes_out(),
            subscriptions: u32::try_from(session.subscription_count()).unwrap_or(u32::MAX),
            client: session.client_description(),
            authorized_user: session.authorized_user(),
            subs: if subscriptions {
                session.subscription_views()
            } else {
                Vec::new()
            },
        }
    }

    /// Publishes the monitoring counters: closed connections' totals plus the
    /// live sessions' own counters (the sessions count per message; nothing
    /// on the message path touches an atomic for monitoring).
    fn publish_stats(&self) {
        let mut totals = self.closed_totals.get();
        let mut subscriptions = 0u64;
        for entry in self.connections.borrow().iter() {
            let session = &entry.session;
            totals.msgs_in += session.msgs_in();
            totals.msgs_out += session.msgs_out();
            totals.bytes_in += session.bytes_in();
            totals.bytes_out += session.bytes_out();
            subscriptions += session.subscription_count() as u64;
        }
        let stats = &self.shared.stats[self.id];
        stats.msgs_in.store(totals.msgs_in, Ordering::Relaxed);
        stats.msgs_out.store(totals.msgs_out, Ordering::Relaxed);
        stats.bytes_in.store(totals.bytes_in, Ordering::Relaxed);
        stats.bytes_out.store(totals.bytes_out, Ordering::Relaxed);
        stats.subscriptions.store(subscriptions, Ordering::Relaxed);
        stats
            .subscriptions_inserted
            .store(self.subscriptions_inserted.get(), Ordering::Relaxed);
    }

    /// Broadcasts the router's pending interest changes to every other shard.
    pub(crate) fn broadcast_interest(&self) {
        let mut router = self.router.borrow_mut();
        while let Some(change) = router.poll_interest_change() {
            let change = Arc::new(change);
            for (shard, interest) in self.shared.peers.interest.iter().enumerate() {
                if shard != self.id {
                    let _ = interest.send(InterestMessage::Change(Arc::clone(&change)));
                }
            }
            self.interest_sent.set(self.interest_sent.get() + 1);
        }
    }

    /// The SUB barrier without waiting: broadcasts this shard's pending interest
    /// changes and releases the session's hold (taken with
    /// [`Session::hold_output`]) once every other shard has applied all of them
    /// (and every change sent before, so a SUB that changed nothing while an
    /// earlier change is still travelling is covered too). The reader goes on
    /// reading meanwhile: a burst of SUBs spread over many reads costs no round
    /// trip per SUB or per read, and the peers apply it in one wake-up.
    pub(crate) fn release_when_interest_applied(&self, session: &Rc<Session>) {
        self.broadcast_interest();
        let target = self.interest_sent.get();
        if self.interest_applied_everywhere(target) {
            session.release_hold();
            return;
        }
        self.interest_holds.borrow_mut().push_back(InterestHold {
            session: Rc::clone(session),
            target,
        });
    }

    /// Whether every other shard has applied this shard's first `target` changes.
    fn interest_applied_everywhere(&self, target: u64) -> bool {
        (0..self.shared.shard_count)
            .all(|shard| shard == self.id || self.shared.interest_applied(self.id, shard) >= target)
    }

    /// A peer confirmed applied changes: release the holds that are now met.
    fn release_interest_holds(&self) {
        let mut holds = self.interest_holds.borrow_mut();
        while let Some(hold) = holds.front() {
            if !self.interest_applied_everywhere(hold.target) {
                break;
            }
            let hold = holds.pop_front().expect("front exists");
            hold.session.release_hold();
        }
    }

    /// Applies every interest message that has arrived, then tells each origin
    /// whose changes were applied (one `Applied` per origin per drain). Readers
    /// call it before routing a pass: a publish is never routed with interest
    /// that had already reached this shard still waiting in the channel, however
    /// the runtime orders this shard's tasks.
    pub(crate) fn apply_arrived_interest(&self) {
        self.apply_arrived_interest_from(0);
    }

    /// [`Shard::apply_arrived_interest`], with origins already applied from.
    fn apply_arrived_interest_from(&self, mut applied_from: u64) {
        loop {
            let message = match self.interest_inbox.borrow_mut().as_mut() {
                Some(inbox) => inbox.try_recv().ok(),
                None => None,
            };
            let Some(message) = message else { break };
            self.handle_interest(message, &mut applied_from);
        }
        while applied_from != 0 {
            let origin = applied_from.trailing_zeros() as usize;
            applied_from &= applied_from - 1;
            let _ = self.shared.peers.interest[origin].send(InterestMessage::Applied);
        }
    }

    fn handle_interest(&self, message: InterestMessage, applied_from: &mut u64) {
        match message {
            InterestMessage::Change(change) => {
                self.router.borrow_mut().apply(&change);
                self.shared.interest_applied[change.shard * self.shared.shard_count + self.id]
                    .fetch_add(1, Ordering::Release);
                *applied_from |= 1 << change.shard;
            }
            InterestMessage::Applied => self.release_interest_holds(),
            InterestMessage::Fence { applied } => {
                let _ = applied.send(());
            }
            InterestMessage::MoveSwitch { id, from, to } => {
                super::moves::switch(self, id, from, to);
            }
        }
    }

    /// Broadcasts, then waits until every other shard has applied every interest
    /// change this shard ever sent: the SUB barrier, so a client whose SUB got
    /// its PONG/+OK is never missed by a publisher on another shard. This covers
    /// SUBs that changed nothing themselves (a second subscriber on a subject)
    /// while an earlier change is still in flight. Shards already up to date are
    /// not asked; the others get a fence, whose acknowledgement (FIFO behind the
    /// changes) proves they applied them.
    pub(crate) async fn broadcast_interest_and_wait(&self) {
        self.broadcast_interest();
        let sent = self.interest_sent.get();
        let (applied_tx, mut applied_rx) = mpsc::unbounded_channel();
        let mut fences = 0;
        for (shard, interest) in self.shared.peers.interest.iter().enumerate() {
            if shard == self.id || self.shared.interest_applied(self.id, shard) >= sent {
                continue;
            }
            let fence = InterestMessage::Fence {
                applied: applied_tx.clone(),
            };
            if interest.send(fence).is_ok() {
                fences += 1;
            }
        }
        drop(applied_tx);
        for _ in 0..fences {
            // None: a shard stopped (shutdown); nothing left to wait for.
            if applied_rx.recv().await.is_none() {
                break;
            }
        }
    }

    fn begin_shutdown(&self) {
        if let Some(js) = self.js.get() {
            js.sync_all(self.id);
        }
        self.shutting_down.set(true);
        self.stop_accepting.notify_one();
        for entry in self.connections.borrow().iter() {
            entry.session.close(CloseReason::ServerShutdown);
        }
    }
}

/// Runs one shard to completion on the current thread's runtime.
pub(crate) async fn run_shard<B: Backend>(
    shard: Rc<Shard>,
    inbox: Inbox,
    listener: Option<std::net::TcpListener>,
    devices: Option<super::device::DeviceSockets>,
) {
    tokio::task::spawn_local(data_loop(Rc::clone(&shard), inbox.data));
    tokio::task::spawn_local(housekeeping(Rc::clone(&shard)));
    if shard.config().spin_us > 0 && B::SPIN_HELPS {
        tokio::task::spawn_local(spin_after_activity(Rc::clone(&shard)));
    }
    *shard.interest_inbox.borrow_mut() = Some(inbox.interest);
    tokio::task::spawn_local(interest_loop(Rc::clone(&shard)));
    let stopped = Rc::new(Notify::new());
    tokio::task::spawn_local(control_loop::<B>(
        Rc::clone(&shard),
        inbox.control,
        Rc::clone(&stopped),
    ));
    if let Some(js) = &shard.shared.js {
        // Streams open and subscribe before any client is accepted (the barrier
        // in `start` needs the other shards' control loops, hence after spawning).
        match JsRuntime::start(&shard, js).await {
            Ok(runtime) => {
                let _ = shard.js.set(Rc::clone(&runtime));
                tokio::task::spawn_local(super::jetstream::run(Rc::clone(&shard), runtime));
            }
            Err(e) => {
                tracing::error!(shard = shard.id, "cannot open the store: {e}");
                std::process::exit(super::jetstream::EXIT_STORE_FAILED);
            }
        }
        shard.shared.js_ready.fetch_add(1, Ordering::AcqRel);
    }
    if let Some(sockets) = devices {
        match super::device::start(&shard, sockets) {
            Ok(runtime) => {
                let _ = shard.device.set(runtime);
            }
            Err(e) => {
                tracing::error!(shard = shard.id, "cannot serve devices: {e}");
                std::process::exit(EXIT_DEVICES_FAILED);
            }
        }
    }
    if let Some(listener) = listener {
        while shard.shared.js.is_some()
            && shard.shared.js_ready.load(Ordering::Acquire) < shard.shared.shard_count
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::task::spawn_local(accept_loop::<B>(Rc::clone(&shard), listener));
    }
    shard.shared.shards_serving.fetch_add(1, Ordering::AcqRel);
    shard.shared.serving_changed.notify_one();
    stopped.notified().await;

    // Drain: every session is closing with flush; wait for them to finish.
    let deadline = Instant::now() + Duration::from_millis(SHUTDOWN_DRAIN_MS_MAX);
    while shard.connection_count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::debug!(
        shard = shard.id,
        left = shard.connection_count(),
        "shard stopped"
    );
}

/// Waits for interest messages and applies them (readers also apply what has
/// arrived before they route). The inbox is borrowed only inside each poll,
/// never across an await.
async fn interest_loop(shard: Rc<Shard>) {
    loop {
        let first = std::future::poll_fn(|cx| match shard.interest_inbox.borrow_mut().as_mut() {
            Some(inbox) => inbox.poll_recv(cx),
            None => std::task::Poll::Ready(None),
        })
        .await;
        let Some(first) = first else { return };
        let mut applied_from = 0;
        shard.handle_interest(first, &mut applied_from);
        // The rest of what arrived, and the acknowledgements for all of it.
        shard.apply_arrived_interest_from(applied_from);
    }
}

async fn control_loop<B: Backend>(
    shard: Rc<Shard>,
    mut control: mpsc::UnboundedReceiver<Control>,
    stopped: Rc<Notify>,
) {
    while let Some(message) = control.recv().await {
        handle_control::<B>(&shard, message, &stopped);
    }
}

fn handle_control<B: Backend>(shard: &Rc<Shard>, message: Control, stopped: &Notify) {
    // The sender's interest changes sent before this message are applied first
    // (two channels, one order: e.g. a reply to a forwarded JetStream request
    // must see the requester's SUB to its inbox).
    shard.apply_arrived_interest();
    match message {
        Control::Adopt {
            stream,
            client_id,
            reject,
        } => adopt::<B>(shard, stream, client_id, reject),
        Control::Recycled => shard.batch_pool.reclaim_woken(),
        Control::PassOn(batch) => {
            deliver_batch(shard, &batch);
            shard.shared.peers.give_back(batch);
            shard.broadcast_interest();
        }
        Control::DeviceDatagram(datagram) => match shard.device.get() {
            Some(device) => device.handle_forwarded(shard, datagram),
            None => tracing::warn!(
                shard = shard.id,
                "device datagram before the gateway started; dropped"
            ),
        },
        Control::JsApi(request) => match shard.js.get() {
            Some(js) => js.forward_in(request),
            None => tracing::warn!(
                shard = shard.id,
                "JetStream request before the store opened; dropped"
            ),
        },
        Control::Reload {
            limits,
            auth,
            applied,
        } => {
            shard.apply_limits(limits);
            if let Some(auth) = auth {
                shard.apply_auth(auth);
            }
            let _ = applied.send(shard.id);
        }
        Control::Monitor(request) => shard.report(request),
        Control::MoveIn(moved) => move_in::<B>(shard, *moved),
        Control::MoveWatermark {
            id,
            shard: from,
            opened,
        } => super::moves::watermark(shard, id, from, opened),
        Control::MoveEnd {
            id,
            forwarded,
            overflow,
        } => super::moves::end(shard, id, forwarded, overflow),
        Control::MoveAbort { id } => super::moves::abort(shard, id),
        Control::Shutdown => {
            shard.begin_shutdown();
            stopped.notify_one();
        }
    }
}

/// A connection moving here from another shard (`runtime/moves.rs`).
fn move_in<B: Backend>(shard: &Rc<Shard>, moved: super::moves::MovedConnection) {
    let super::moves::MovedConnection {
        id,
        from,
        stream,
        session,
        read_buffer,
        frame_bytes_needed,
        opened_ms,
        affinity,
    } = moved;
    let session = session.into_inner();
    let socket = match B::adopt(stream) {
        Ok(socket) => socket,
        Err(e) => {
            tracing::warn!(shard = shard.id, "cannot take a moving connection: {e}");
            return super::moves::refuse(shard, id, from, session);
        }
    };
    let start = super::moves::arrive(shard, id, from, affinity, &session);
    let slot = shard.register_moved(&session, io::Socket::raw_fd(&socket), opened_ms);
    tokio::task::spawn_local(super::connection::serve_moved(
        Rc::clone(shard),
        socket,
        session,
        slot,
        start,
        read_buffer,
        frame_bytes_needed,
    ));
}

fn adopt<B: Backend>(shard: &Rc<Shard>, stream: std::net::TcpStream, client_id: u64, reject: bool) {
    let peer = stream.peer_addr().ok();
    match B::adopt(stream) {
        Ok(socket) => match shard.shared.tls().filter(|_| !reject) {
            // The settings in force now; a reload affects later connections only.
            Some(tls) => {
                let task =
                    super::connection::serve_tls(Rc::clone(shard), socket, client_id, peer, tls);
                tracing::trace!(
                    bytes = std::mem::size_of_val(&task),
                    "TLS connection task size"
                );
                tokio::task::spawn_local(task);
            }
            None => {
                let task = {
                    let fd = io::Socket::raw_fd(&socket);
                    let (session, slot) =
                        super::connection::open(shard, fd, client_id, peer, reject);
                    super::connection::serve(Rc::clone(shard), socket, session, slot)
                };
                tracing::trace!(bytes = std::mem::size_of_val(&task), "connection task size");
                tokio::task::spawn_local(task);
            }
        },
        Err(e) => {
            tracing::warn!(shard = shard.id, "cannot adopt connection: {e}");
            shard.shared.connections_per_shard[shard.id].fetch_sub(1, Ordering::Relaxed);
            shard
                .shared
                .connections_total
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Keeps the shard's thread busy for `spin_us` after its last activity instead
/// of sleeping: waking a sleeping core costs tens of microseconds on a VM, and a
/// request-reply crosses shards twice. Spinning is `yield_now`, so every other
/// task and the I/O driver keep running (tokio polls the driver without blocking
/// while a task is yielding). Idle shards do not spin.
async fn spin_after_activity(shard: Rc<Shard>) {
    let spin = Duration::from_micros(shard.config().spin_us);
    loop {
        shard.activity.notified().await;
        let mut until = Instant::now() + spin;
        loop {
            tokio::task::yield_now().await;
            let now = Instant::now();
            if shard.active.replace(false) {
                until = now + spin;
            }
            if now >= until {
                break;
            }
        }
    }
}

async fn data_loop(shard: Rc<Shard>, mut data: mpsc::Receiver<Batch>) {
    while let Some(batch) = data.recv().await {
        shard.mark_active();
        deliver_batch(&shard, &batch);
        shard.moves.batch_done(batch.origin, batch.seq);
        super::moves::progress(&shard);
        if let Some(applied) = &batch.fence {
            let _ = applied.send(());
            continue;
        }
        // Back to the shard that allocated it: reused there, never freed here.
        // At once, not gathered: see `Control::Recycled` (it wakes the origin
        // early, which request-reply latency depends on).
        shard.shared.peers.give_back(batch);
        // Auto-unsubscribes may have changed interest; no one waits on these.
        shard.broadcast_interest();
        // Let writers drain what this batch queued before taking the next one, so a
        // backlog of batches does not pile up in subscribers' buffers (and trip
        // max_pending) merely because this shard was descheduled for a while.
        tokio::task::yield_now().await;
    }
}

/// Delivers a batch another shard routed here. Queue picks that found no live
/// member here are passed on to a shard that has members ([`Control::PassOn`]).
fn deliver_batch(shard: &Shard, batch: &Batch) {
    // Interest its sender changed before sending it applies to what it carries
    // (JetStream answers from it, queue picks passed on from it).
    shard.apply_arrived_interest();
    let mut passed_on = Vec::new();
    let mut onward: Vec<Batch> = Vec::new();
    {
        let mut router = shard.router.borrow_mut();
        for (route_subject, msg, envelope) in batch.messages() {
            let via = crate::router::Via {
                origin: if batch.counts_for_affinity {
                    batch.origin as u8
                } else {
                    crate::router::ORIGIN_NONE
                },
                stamp: envelope.stamp,
            };
            router.deliver_remote_as(
                route_subject,
                &msg,
                envelope.plain,
                &envelope.queues,
                via,
                &mut passed_on,
            );
            for target in &mut passed_on {
                if onward.len() <= target.shard {
                    onward.resize_with(target.shard + 1, Batch::default);
                }
                let next = &mut onward[target.shard];
                if next.envelopes.capacity() == 0 {
                    *next = shard.batch_pool.take(shard.id);
                }
                let route = (route_subject != msg.subject).then_some(route_subject);
                next.push_as(route, &msg, target, envelope.stamp);
            }
        }
    }
    for (to, next) in onward.into_iter().enumerate() {
        if !next.is_empty() {
            let _ = shard.shared.peers.control[to].send(Control::PassOn(next));
        }
    }
}

async fn accept_loop<B: Backend>(shard: Rc<Shard>, listener: std::net::TcpListener) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot listen: {e}");
            return;
        }
    };
    let shared = Arc::clone(&shard.shared);
    let mut next_round_robin = 0usize;
    let mut rate = super::ratelimit::RateLimiter::new(shard.limits().connection_rate_per_ip);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shard.stop_accepting.notified() => break,
        };
        let (stream, peer) = match accepted.and_then(|(s, peer)| Ok((s.into_std()?, peer))) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
                continue;
            }
        };
        rate.set_rate(shard.limits().connection_rate_per_ip);
        if !rate.admit(peer.ip(), shard.now_ms()) {
            // Closed before INFO: a refused connection gets no bytes back.
            // Logged at the 1st, 2nd, 4th, 8th… refusal: a flood does not flood the log.
            let refused = shared
                .connections_rate_limited
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    ip = %peer.ip(),
                    refused,
                    "connection_rate_per_ip exceeded: connection closed"
                );
            }
            drop(stream);
            continue;
        }
        let target = match shared.config.placement {
            Placement::RoundRobin => {
                next_round_robin = (next_round_robin + 1) % shared.shard_count;
                (next_round_robin + shared.shard_count - 1) % shared.shard_count
            }
            Placement::LeastLoaded => (0..shared.shard_count)
                .min_by_key(|&s| shared.connections_per_shard[s].load(Ordering::Relaxed))
                .unwrap_or(0),
        };
        let total = shared.connections_total.fetch_add(1, Ordering::Relaxed);
        shared.connections_per_shard[target].fetch_add(1, Ordering::Relaxed);
        let reject = total >= shared.connections_max.load(Ordering::Relaxed);
        let client_id = shared.next_client_id.fetch_add(1, Ordering::Relaxed);
        if target == shard.id {
            adopt::<B>(&shard, stream, client_id, reject);
        } else if shared.peers.control[target]
            .send(Control::Adopt {
                stream,
                client_id,
                reject,
            })
            .is_err()
        {
            shared.connections_per_shard[target].fetch_sub(1, Ordering::Relaxed);
            shared.connections_total.fetch_sub(1, Ordering::Relaxed);
        }
    }
    tracing::debug!("stopped accepting");
}

/// The peer of a connected socket, asked of the kernel (so connections need
/// not keep it: idle ones are the norm).
/// The peer's IP address of a connected socket (for a moved connection's
/// closing log line).
pub(crate) fn peer_ip(fd: RawFd) -> Option<std::net::IpAddr> {
    peer_of(fd).map(|p| p.ip())
}

fn peer_of(fd: RawFd) -> Option<SocketAddr> {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is a registered connection's socket, open until the
    // connection unregisters (on this thread, so not during this call);
    // ManuallyDrop keeps this borrowed view from closing it.
    let stream = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    stream.peer_addr().ok()
}

/// Connect deadlines, server PINGs, and sockets whose close is taking too long.
/// Timers live here, never around a read (see io/mod.rs).
///
/// Each tick is also the shard's heartbeat for the systemd watchdog: it runs on
/// the shard's own loop, so a blocked thread or a task that never yields stops
/// it.
async fn housekeeping(shard: Rc<Shard>) {
    let mut tick = tokio::time::interval(Duration::from_millis(HOUSEKEEPING_TICK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let shared = &shard.shared;
        shared.heartbeat_ms[shard.id].store(shared.clock_ms(), Ordering::Release);
        if let Some(stall) = shared.stall {
            if stall.shard == shard.id && shard.now_ms() >= stall.after_ms {
                tracing::warn!(shard = shard.id, "--debug-stall-shard: blocking this shard");
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
        }
        let config = shard.limits();
        shard.publish_stats();
        let now_ms = shard.now_ms();
        crate::nats::session::set_coarse_now_ms(now_ms);
        for entry in shard.connections.borrow().iter() {
            let session = &entry.session;
            if entry.handshaking.get() {
                if now_ms >= entry.deadline_ms.get() && !entry.shut_down.get() {
                    // What nats-server does: nothing more is sent, the
                    // connection closes. The pending read ends the handshake.
                    tracing::info!(client_id = session.id, "TLS handshake timeout");
                    entry.shut_down.set(true);
                    io::shutdown(entry.fd);
                }
                continue;
            }
            match session.state() {
                State::AwaitingConnect => {
                    if now_ms.saturating_sub(entry.deadline_ms.get()) >= config.connect_timeout_ms {
                        session.fail_and_close(
                            Some("Authentication Timeout"),
                            CloseReason::ConnectTimeout,
                        );
                    }
                }
                State::Established => {
                    if now_ms >= entry.next_ping_ms.get() {
                        entry.next_ping_ms.set(now_ms + config.ping_interval_ms);
                        session.ping(config.ping_max_outstanding);
                    }
                }
                State::Closing { .. } => {}
            }
            if let State::Closing { flush } = session.state() {
                if entry.closing_since_ms.get() == NOT_CLOSING {
                    entry.closing_since_ms.set(now_ms);
                }
                let stuck = !flush
                    || now_ms.saturating_sub(entry.closing_since_ms.get()) >= CLOSE_FLUSH_MS_MAX;
                if stuck && !entry.shut_down.get() {
                    entry.shut_down.set(true);
                    io::shutdown(entry.fd);
                }
            }
        }
    }
}
