//! One client connection's NATS protocol state: the options it sent in CONNECT,
//! whether it has connected yet, its subscriptions, and the bytes queued for it.
//!
//! A session is a plain value the runtime drives: `handle_op` takes one parsed op
//! and answers with an [`Effect`] for the runtime to carry out (publish,
//! subscribe, ...); replies that need nothing else (PONG, -ERR) are queued on the
//! spot. The session never touches a socket or the clock: the runtime's writer
//! task drains [`Session::take_output`], and closing is a state the runtime acts
//! on (it shuts the socket down).
//!
//! Outbound bytes are bounded by `pending_bytes_max`: crossing it marks the
//! client a slow consumer and closes it without stalling anyone else.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use super::connect::{parse_connect, ConnectOptions};
use super::encode;
use super::parser::ClientOp;
use super::subject::{is_valid_publish_subject, is_valid_queue, is_valid_subject};
use crate::auth::{Auth, Grant, Permissions, ResponseLimits};

/// A message as it moves through the broker: borrowed, so routing copies nothing.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    pub subject: &'a [u8],
    pub reply: Option<&'a [u8]>,
    /// The NATS/1.0 header block, when the publisher sent HPUB.
    pub headers: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

/// What a session is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// INFO sent; only CONNECT (or PING) is expected.
    AwaitingConnect,
    /// CONNECT accepted; any op may come.
    Established,
    /// Closing: `flush` says whether queued output is still written first.
    Closing { flush: bool },
}

/// Why a session was closed, for logs and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    ClientClosed,
    ProtocolError,
    SlowConsumer,
    StaleConnection,
    ConnectTimeout,
    MaxConnections,
    ServerShutdown,
    /// The TLS handshake failed or timed out (nothing was sent encrypted).
    TlsHandshake,
}

impl CloseReason {
    /// Whether queued output (e.g. the -ERR explaining the close) is flushed first.
    fn flushes(self) -> bool {
        !matches!(self, CloseReason::SlowConsumer | CloseReason::ClientClosed)
    }
}

/// The options from CONNECT that change how the broker talks to this client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flags {
    pub verbose: bool,
    pub pedantic: bool,
    pub echo: bool,
    pub headers: bool,
    pub no_responders: bool,
    /// Not a client: the shell of a connection moving to another shard,
    /// which records what it is given in the forwarding format
    /// ([`Session::deliver_forwarded`]) instead of encoding it for a socket.
    pub forward: bool,
}

impl Flags {
    fn from_options(options: &ConnectOptions) -> Flags {
        Flags {
            verbose: options.verbose,
            pedantic: options.pedantic,
            echo: options.echo,
            headers: options.headers,
            no_responders: options.no_responders,
            forward: false,
        }
    }
}

/// A subscription: owned by its session's table and referenced from the router's
/// trie. The `Rc<Session>` cycle is broken when the session ends (see
/// [`Session::take_subscriptions`]).
pub struct Subscription {
    pub session: Rc<Session>,
    /// sid, subject and queue group back to back: one allocation, not three
    /// (there is one subscription per device, idle ones included).
    names: Box<[u8]>,
    sid_len: u32,
    subject_len: u32,
    has_queue: bool,
    /// A wildcard subscription that overlaps the client's subscribe deny list:
    /// each delivery is checked against it (nats-server's delivery filter).
    deny_filtered: Cell<bool>,
    /// Auto-unsubscribe after this many deliveries in total; 0 = never.
    max_msgs: Cell<u64>,
    delivered: Cell<u64>,
    live: Cell<bool>,
}

/// The outcome of offering a message to one subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the client.
    Delivered,
    /// Queued, and it was the last one `UNSUB <sid> <max>` allowed: remove it now.
    DeliveredLast,
    /// Not delivered: the subscription or its session is gone.
    Dead,
    /// Not delivered: the subject is denied to this client (a wildcard
    /// subscription overlapping a deny entry). It still counts as a match
    /// (no no-responders status), and a queue group tries another member,
    /// as nats-server does.
    Filtered,
}

impl Subscription {
    pub fn new(session: Rc<Session>, sid: &[u8], subject: &[u8], queue: Option<&[u8]>) -> Self {
        let names: Box<[u8]> = [sid, subject, queue.unwrap_or_default()].concat().into();
        // Lengths fit: sid and subject come from one control line, bounded by
        // max_control_line, itself far below 4 GiB.
        Subscription {
            session,
            names,
            sid_len: sid.len() as u32,
            subject_len: subject.len() as u32,
            has_queue: queue.is_some(),
            deny_filtered: Cell::new(false),
            max_msgs: Cell::new(0),
            delivered: Cell::new(0),
            live: Cell::new(true),
        }
    }

    pub fn sid(&self) -> &[u8] {
        &self.names[..self.sid_len as usize]
    }

    pub fn subject(&self) -> &[u8] {
        let start = self.sid_len as usize;
        &self.names[start..start + self.subject_len as usize]
    }

    pub fn queue(&self) -> Option<&[u8]> {
        let start = (self.sid_len + self.subject_len) as usize;
        self.has_queue.then(|| &self.names[start..])
    }

    pub fn is_live(&self) -> bool {
        self.live.get()
    }

    /// Marks the subscription removed; later deliveries are refused.
    pub fn kill(&self) {
        self.live.set(false);
    }

    /// Auto-unsubscribe after `max` deliveries in total (what `UNSUB <sid> <max>` does).
    pub fn set_max_msgs(&self, max: u64) {
        self.max_msgs.set(max);
    }

    pub fn delivered(&self) -> u64 {
        self.delivered.get()
    }

    /// The `UNSUB <sid> <max>` limit; 0 = none.
    pub fn max_msgs(&self) -> u64 {
        self.max_msgs.get()
    }

    /// Offers `msg` to the client; the caller removes the subscription on
    /// `DeliveredLast`.
    pub fn deliver(&self, msg: &Message<'_>) -> Delivery {
        if !self.live.get() || self.session.is_closing() {
            return Delivery::Dead;
        }
        if self.deny_filtered.get() && self.session.delivery_denied(msg.subject) {
            // Denied to this client: not sent, and not counted against a max.
            return Delivery::Filtered;
        }
        let delivered = self.delivered.get() + 1;
        self.delivered.set(delivered);
        self.session.queue_message(self.sid(), msg);
        if let Some(reply) = msg.reply {
            self.session.note_reply(reply);
        }
        let max = self.max_msgs.get();
        if max != 0 && delivered >= max {
            self.live.set(false);
            Delivery::DeliveredLast
        } else {
            Delivery::Delivered
        }
    }
}

/// What the runtime must do after `handle_op`.
#[derive(Debug)]
pub enum Effect<'a> {
    /// Nothing beyond what was queued.
    None,
    /// Route this message (the +OK, if verbose, is already queued).
    Publish(Message<'a>),
    /// Add this subscription to the router, [`Session::hold_output`] until
    /// every shard has applied the interest, then [`Session::ok`].
    Subscribe(Rc<Subscription>),
    /// Remove this subscription from the router (it is already out of the table).
    Unsubscribe(Rc<Subscription>),
    /// Answer with [`Session::pong`] once everything this client published
    /// before the PING has reached its subscribers (a client's flush means
    /// "the server has processed all I sent", as with nats-server).
    Ping,
    /// The session is closing; stop reading.
    Close,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("sid", &String::from_utf8_lossy(self.sid()))
            .field("subject", &String::from_utf8_lossy(self.subject()))
            .finish()
    }
}

/// A session's subscriptions by sid. Devices hold a handful, so a short vector
/// (one small allocation, scanned linearly) serves them; past
/// `SUBSCRIPTIONS_INLINE_MAX` it becomes a map so that thousands of UNSUBs stay
/// linear in total.
enum SubTable {
    Few(Vec<Rc<Subscription>>),
    /// Boxed so the common `Few` case keeps `Session` small (a HashMap is 48 B).
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<Box<[u8]>, Rc<Subscription>>>),
}

const SUBSCRIPTIONS_INLINE_MAX: usize = 16;

impl SubTable {
    fn len(&self) -> usize {
        match self {
            SubTable::Few(v) => v.len(),
            SubTable::Many(m) => m.len(),
        }
    }

    fn get(&self, sid: &[u8]) -> Option<&Rc<Subscription>> {
        match self {
            SubTable::Few(v) => v.iter().find(|s| s.sid() == sid),
            SubTable::Many(m) => m.get(sid),
        }
    }

    fn insert(&mut self, sub: Rc<Subscription>) {
        match self {
            SubTable::Few(v) if v.len() < SUBSCRIPTIONS_INLINE_MAX => v.push(sub),
            SubTable::Few(v) => {
                let mut map: HashMap<_, _> = v.drain(..).map(|s| (Box::from(s.sid()), s)).collect();
                map.insert(sub.sid().into(), sub);
                *self = SubTable::Many(Box::new(map));
            }
            SubTable::Many(m) => {
                m.insert(sub.sid().into(), sub);
            }
        }
    }

    fn remove(&mut self, sid: &[u8]) -> Option<Rc<Subscription>> {
        match self {
            SubTable::Few(v) => {
                let i = v.iter().position(|s| s.sid() == sid)?;
                Some(v.swap_remove(i))
            }
            SubTable::Many(m) => m.remove(sid),
        }
    }

    fn find(&self, pred: impl Fn(&Rc<Subscription>) -> bool) -> Option<Rc<Subscription>> {
        match self {
            SubTable::Few(v) => v.iter().find(|s| pred(s)).cloned(),
            SubTable::Many(m) => m.values().find(|s| pred(s)).cloned(),
        }
    }

    fn into_vec(self) -> Vec<Rc<Subscription>> {
        match self {
            SubTable::Few(v) => v,
            SubTable::Many(m) => m.into_values().collect(),
        }
    }
}

/// Limits a session enforces itself.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    pub pending_bytes_max: usize,
    /// 0 = unlimited.
    pub subscriptions_max: usize,
}

pub struct Session {
    pub id: u64,
    /// A config reload replaces them ([`Session::set_limits`]).
    limits: Cell<SessionLimits>,
    state: Cell<State>,
    close_reason: Cell<Option<CloseReason>>,
    flags: Cell<Flags>,
    out: RefCell<Vec<u8>>,
    /// `out[hold_from..]` waits for [`Session::release_hold`]: what was queued
    /// after a SUB whose interest other shards have not yet confirmed (its +OK,
    /// a later PONG, anything delivered meanwhile) is not written before it.
    /// `NOT_HOLDING` when everything may be written.
    hold_from: Cell<usize>,
    /// Holds not yet released (one per SUB barrier still pending).
    holds: Cell<u32>,
    /// Bytes handed to the socket and not yet confirmed written.
    in_flight_bytes: Cell<usize>,
    /// The writer's waker while it waits in [`Session::output_ready`]: a
    /// single slot, not a tokio `Notify` (one writer, one thread; 16 B, and
    /// the wait itself costs the connection's task nothing).
    writer: Cell<Option<std::task::Waker>>,
    subs: RefCell<SubTable>,
    pings_outstanding: Cell<u32>,
    /// The shard whose client's message this session was last given
    /// (`ORIGIN_NONE`: none since the reader last looked), for connection
    /// affinity: a reply published in the next read pass is a round trip.
    last_origin: Cell<u8>,
    /// The connection is moving to another shard: the writer stops after its
    /// write in flight, leaving the socket open.
    detaching: Cell<bool>,
    /// The client answered a server PING at least once (nats-server's "RTT known").
    round_trip_measured: Cell<bool>,
    /// A message was published since the last ping check (nats-server counts
    /// published messages as activity, not PONGs or other ops).
    active_since_ping: Cell<bool>,
    msgs_in: Cell<u64>,
    msgs_out: Cell<u64>,
    /// Header and payload bytes published and delivered (nats-server's
    /// `in_bytes`/`out_bytes`: the message, not the protocol line).
    bytes_in: Cell<u64>,
    bytes_out: Cell<u64>,
    /// What CONNECT said about the client, for monitoring; boxed and absent
    /// unless it named something, so a bare session pays one pointer.
    client: RefCell<Option<Box<ClientDescription>>>,
    security: RefCell<Security>,
}

/// The CONNECT fields monitoring shows (`/connz`'s name, lang, version).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientDescription {
    pub name: Option<String>,
    pub lang: Option<String>,
    pub version: Option<String>,
}

/// One subscription as monitoring lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionView {
    pub subject: String,
    pub queue: Option<String>,
    pub sid: String,
    pub delivered: u64,
    /// The auto-unsubscribe limit; 0: none.
    pub max_msgs: u64,
}

/// Where a session stands with authentication. Boxed states: a session
/// without auth pays one word.
enum Security {
    /// No authentication configured: everything is allowed.
    Open,
    /// CONNECT must carry credentials `Auth` accepts.
    Required(Box<Pending>),
    /// Authenticated.
    Granted(Box<Granted>),
}

struct Pending {
    auth: std::sync::Arc<Auth>,
    /// The nonce this client's INFO carried, for an nkey user to sign.
    nonce: Option<[u8; crate::auth::nkey::NONCE_CHARS]>,
    /// `tls.map`: the verified client certificate's identities, which select
    /// the user at CONNECT (CONNECT's `user` is not looked at).
    identities: Option<Box<[String]>>,
}

struct Granted {
    /// The configuration that admitted the client (a reload checks the grant
    /// against the new one).
    auth: std::sync::Arc<Auth>,
    grant: Grant,
    /// Reply subjects this client received and may answer (`allow_responses`).
    responses: Option<Responses>,
}

/// The reply subjects a client with `allow_responses` may publish to, oldest
/// first. Bounded: past [`RESPONSES_TRACKED_MAX`] the oldest are forgotten
/// (a flood of requests cannot grow a responder's memory).
struct Responses {
    limits: ResponseLimits,
    open: std::collections::VecDeque<OpenReply>,
}

struct OpenReply {
    subject: Box<[u8]>,
    /// Responses still allowed; None: unlimited.
    left: Option<u32>,
    received_ms: u64,
}

/// Reply subjects tracked per client for `allow_responses` (nats-server
/// prunes past 4096 too).
const RESPONSES_TRACKED_MAX: usize = 4096;

thread_local! {
    /// Milliseconds on this shard's coarse clock, set by the runtime's
    /// housekeeping tick (nats/ reads no clock itself; see [`set_coarse_now_ms`]).
    static COARSE_NOW_MS: Cell<u64> = const { Cell::new(0) };
}

/// Sets the time `allow_responses` expiry is measured by, on this thread.
pub fn set_coarse_now_ms(ms: u64) {
    COARSE_NOW_MS.with(|now| now.set(ms));
}

pub fn coarse_now_ms() -> u64 {
    COARSE_NOW_MS.with(Cell::get)
}

impl Responses {
    fn note(&mut self, reply: &[u8]) {
        if self.open.len() >= RESPONSES_TRACKED_MAX {
            self.open.pop_front();
        }
        self.open.push_back(OpenReply {
            subject: reply.into(),
            left: self.limits.max,
            received_ms: coarse_now_ms(),
        });
    }

    /// Uses up one response to `subject` if one is open (newest first).
    fn take(&mut self, subject: &[u8]) -> bool {
        let now = coarse_now_ms();
        let expires_ms = self.limits.expires_ms;
        let expired =
            |r: &OpenReply| expires_ms.is_some_and(|e| now.saturating_sub(r.received_ms) > e);
        while self.open.front().is_some_and(expired) {
            self.open.pop_front();
        }
        let Some(i) = self
            .open
            .iter()
            .rposition(|r| &*r.subject == subject && !expired(r))
        else {
            return false;
        };
        let r = &mut self.open[i];
        match &mut r.left {
            None => {}
            Some(left) => {
                *left -= 1;
                if *left == 0 {
                    self.open.remove(i);
                }
            }
        }
        true
    }
}

/// What a config reload did to one session ([`Session::reauthorize`]).
#[derive(Debug, Default)]
pub struct Reauthorized {
    /// The client's credentials no longer admit it: it is closing.
    pub closed: bool,
    /// Subscriptions the new permissions no longer allow, already out of the
    /// session's table: the runtime removes them from the router.
    pub removed: Vec<Rc<Subscription>>,
}

/// [`Session::hold_from`] when nothing is held.
const NOT_HOLDING: usize = usize::MAX;

/// Before CONNECT arrives, nats-server (without auth) already serves the client
/// with the defaults an empty `CONNECT {}` implies: verbose, pedantic, echo.
const FLAGS_BEFORE_CONNECT: Flags = Flags {
    verbose: true,
    pedantic: true,
    echo: true,
    headers: false,
    no_responders: false,
    forward: false,
};

impl Session {
    /// New limits (a config reload) for what comes next: a lower
    /// `pending_bytes_max` is checked at the next queued frame, a lower
    /// `subscriptions_max` at the next SUB; nothing already granted is undone.
    pub fn set_limits(&self, limits: SessionLimits) {
        self.limits.set(limits);
    }

    pub fn new(id: u64, limits: SessionLimits) -> Rc<Session> {
        Rc::new(Session {
            id,
            limits: Cell::new(limits),
            state: Cell::new(State::AwaitingConnect),
            close_reason: Cell::new(None),
            flags: Cell::new(FLAGS_BEFORE_CONNECT),
            out: RefCell::new(Vec::new()),
            hold_from: Cell::new(NOT_HOLDING),
            holds: Cell::new(0),
            in_flight_bytes: Cell::new(0),
            writer: Cell::new(None),
            subs: RefCell::new(SubTable::Few(Vec::new())),
            pings_outstanding: Cell::new(0),
            last_origin: Cell::new(crate::router::ORIGIN_NONE),
            detaching: Cell::new(false),
            round_trip_measured: Cell::new(false),
            active_since_ping: Cell::new(false),
            msgs_in: Cell::new(0),
            msgs_out: Cell::new(0),
            security: RefCell::new(Security::Open),
            bytes_in: Cell::new(0),
            bytes_out: Cell::new(0),
            client: RefCell::new(None),
        })
    }

    /// The client must authenticate in CONNECT (before any other op);
    /// `nonce` is the one its INFO carries (for nkey users).
    pub fn require_auth(
        &self,
        auth: std::sync::Arc<Auth>,
        nonce: Option<[u8; crate::auth::nkey::NONCE_CHARS]>,
    ) {
        *self.security.borrow_mut() = Security::Required(Box::new(Pending {
            auth,
            nonce,
            identities: None,
        }));
    }

    /// `tls.map`: the verified client certificate's identities, which select
    /// the user at CONNECT. Only once authentication is required.
    pub fn set_tls_identities(&self, identities: Vec<String>) {
        if let Security::Required(pending) = &mut *self.security.borrow_mut() {
            pending.identities = Some(identities.into());
        }
    }

    /// The user (name, or public nkey) this client authenticated as; None
    /// without authentication or with the token.
    pub fn authorized_user(&self) -> Option<String> {
        match &*self.security.borrow() {
            Security::Granted(g) => g.grant.user(&g.auth).map(str::to_string),
            _ => None,
        }
    }

    /// Still waiting for CONNECT's credentials.
    pub fn awaiting_auth(&self) -> bool {
        matches!(&*self.security.borrow(), Security::Required(_))
    }

    fn permissions(&self) -> Option<std::sync::Arc<Permissions>> {
        match &*self.security.borrow() {
            Security::Granted(g) => g.grant.permissions.clone(),
            _ => None,
        }
    }

    /// A message with a reply subject was delivered to this client: under
    /// `allow_responses` it may now answer it.
    fn note_reply(&self, reply: &[u8]) {
        if let Security::Granted(g) = &mut *self.security.borrow_mut() {
            if let Some(responses) = &mut g.responses {
                responses.note(reply);
            }
        }
    }

    /// Uses up one response to `subject`, if this client received a request
    /// with that reply subject and may still answer it.
    fn take_response(&self, subject: &[u8]) -> bool {
        match &mut *self.security.borrow_mut() {
            Security::Granted(g) => g.responses.as_mut().is_some_and(|r| r.take(subject)),
            _ => false,
        }
    }

    /// A config reload replaced `[authorization]` with `new` (None: no
    /// authentication any more). A client admitted before is checked again
    /// ([`Auth::recheck`]): if it is no longer admitted it gets
    /// `Authorization Violation` and closes; otherwise its new permissions
    /// apply from here on, and each subscription they no longer allow is
    /// removed with nats-server's `Permissions Violation for Subscription to
    /// "x" (sid "n")`. A client that connected while no authentication was
    /// configured holds no credentials to check: it is closed, and reconnects
    /// with what it has. One still before CONNECT checks against `new`.
    pub fn reauthorize(&self, new: Option<&std::sync::Arc<Auth>>) -> Reauthorized {
        let mut outcome = Reauthorized::default();
        if self.is_closing() {
            return outcome;
        }
        let mut security = self.security.borrow_mut();
        let permissions = match (&mut *security, new) {
            (Security::Open, None) => return outcome,
            (Security::Required(pending), Some(new)) => {
                pending.auth = std::sync::Arc::clone(new);
                if new.nonce_required() && pending.nonce.is_none() {
                    // Its INFO carried no nonce to sign: it could never
                    // authenticate as an nkey user; let it reconnect.
                    drop(security);
                    self.fail(Some("Authorization Violation"), true);
                    outcome.closed = true;
                }
                return outcome;
            }
            (Security::Required(_), None) => {
                *security = Security::Open;
                return outcome;
            }
            (Security::Granted(_), None) => {
                *security = Security::Open;
                None
            }
            (Security::Open, Some(_)) => {
                drop(security);
                self.fail(Some("Authorization Violation"), true);
                outcome.closed = true;
                return outcome;
            }
            (Security::Granted(g), Some(new)) => match new.recheck(&g.auth, &g.grant) {
                Ok(grant) => {
                    let permissions = grant.permissions.clone();
                    let limits = permissions.as_ref().and_then(|p| p.responses());
                    g.responses = match (g.responses.take(), limits) {
                        (_, None) => None,
                        (Some(mut kept), Some(limits)) => {
                            kept.limits = limits;
                            Some(kept)
                        }
                        (None, Some(limits)) => Some(Responses {
                            limits,
                            open: std::collections::VecDeque::new(),
                        }),
                    };
                    g.auth = std::sync::Arc::clone(new);
                    g.grant = grant;
                    permissions
                }
                Err(crate::auth::AuthFailed) => {
                    drop(security);
                    tracing::info!(
                        client_id = self.id,
                        "config reload: the client's credentials are no longer accepted"
                    );
                    self.fail(Some("Authorization Violation"), true);
                    outcome.closed = true;
                    return outcome;
                }
            },
        };
        drop(security);
        // Every subscription is checked against the new permissions.
        let subs: Vec<Rc<Subscription>> = match &*self.subs.borrow() {
            SubTable::Few(v) => v.clone(),
            SubTable::Many(m) => m.values().cloned().collect(),
        };
        for sub in subs {
            let allowed = permissions
                .as_ref()
                .is_none_or(|p| p.can_subscribe(sub.subject(), sub.queue()));
            if allowed {
                sub.deny_filtered.set(
                    permissions
                        .as_ref()
                        .is_some_and(|p| p.filters_deliveries(sub.subject())),
                );
                continue;
            }
            let text = match sub.queue() {
                Some(q) => format!(
                    "Permissions Violation for Subscription to {} using queue {} (sid {})",
                    go_quote(sub.subject()),
                    go_quote(q),
                    go_quote(sub.sid())
                ),
                None => format!(
                    "Permissions Violation for Subscription to {} (sid {})",
                    go_quote(sub.subject()),
                    go_quote(sub.sid())
                ),
            };
            self.fail(Some(&text), false);
            self.subs.borrow_mut().remove(sub.sid());
            sub.kill();
            outcome.removed.push(sub);
        }
        outcome
    }

    fn delivery_denied(&self, subject: &[u8]) -> bool {
        match &*self.security.borrow() {
            Security::Granted(g) => g
                .grant
                .permissions
                .as_ref()
                .is_some_and(|p| p.delivery_denied(subject)),
            _ => false,
        }
    }

    pub fn state(&self) -> State {
        self.state.get()
    }

    pub fn flags(&self) -> Flags {
        self.flags.get()
    }

    pub fn is_closing(&self) -> bool {
        matches!(self.state.get(), State::Closing { .. })
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close_reason.get()
    }

    pub fn msgs_in(&self) -> u64 {
        self.msgs_in.get()
    }

    pub fn msgs_out(&self) -> u64 {
        self.msgs_out.get()
    }

    pub fn subscription_count(&self) -> usize {
        self.subs.borrow().len()
    }

    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.get()
    }

    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.get()
    }

    /// What CONNECT said about the client (None before CONNECT, or when it
    /// named nothing).
    pub fn client_description(&self) -> Option<ClientDescription> {
        self.client.borrow().as_deref().cloned()
    }

    /// The live subscriptions, for monitoring (allocates; never on the
    /// message path).
    pub fn subscription_views(&self) -> Vec<SubscriptionView> {
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        let view = |sub: &Rc<Subscription>| SubscriptionView {
            subject: text(sub.subject()),
            queue: sub.queue().map(text),
            sid: text(sub.sid()),
            delivered: sub.delivered(),
            max_msgs: sub.max_msgs.get(),
        };
        match &*self.subs.borrow() {
            SubTable::Few(v) => v.iter().map(view).collect(),
            SubTable::Many(m) => m.values().map(view).collect(),
        }
    }

    /// Takes one parsed op. Replies that depend on nothing else are queued here;
    /// the rest is returned as an [`Effect`] for the runtime.
    pub fn handle_op<'a>(self: &Rc<Self>, op: ClientOp<'a>) -> Effect<'a> {
        if self.is_closing() {
            return Effect::Close;
        }
        let unauthenticated = matches!(&*self.security.borrow(), Security::Required(_));
        if unauthenticated && !matches!(op, ClientOp::Connect { .. }) {
            // With auth on, the first op must be CONNECT (nats-server closes).
            return self.fail(Some("Authorization Violation"), true);
        }
        match op {
            ClientOp::Connect { json } => self.handle_connect(json),
            ClientOp::Ping => Effect::Ping,
            ClientOp::Pong => {
                if self.pings_outstanding.get() > 0 {
                    self.round_trip_measured.set(true);
                }
                self.pings_outstanding.set(0);
                Effect::None
            }
            // Not acknowledged even in verbose mode (checked against nats-server).
            ClientOp::Info | ClientOp::Ok => Effect::None,
            ClientOp::Err => self.fail(None, true),
            ClientOp::Pub {
                subject,
                reply,
                payload,
            } => self.handle_pub(subject, reply, None, payload),
            ClientOp::Hpub {
                subject,
                reply,
                headers,
                payload,
            } => {
                if !self.flags.get().headers {
                    // nats-server closes silently: HPUB is unknown without headers.
                    return self.fail(None, true);
                }
                // An empty header block is delivered as a plain MSG, as nats-server does.
                let headers = (!headers.is_empty()).then_some(headers);
                self.handle_pub(subject, reply, headers, payload)
            }
            ClientOp::Sub {
                subject,
                queue,
                sid,
            } => self.handle_sub(subject, queue, sid),
            ClientOp::Unsub { sid, max_msgs } => self.handle_unsub(sid, max_msgs),
        }
    }

    fn handle_connect<'a>(&self, json: &[u8]) -> Effect<'a> {
        match parse_connect(json) {
            Ok(options) => {
                let required = match &*self.security.borrow() {
                    Security::Required(pending) => Some((
                        std::sync::Arc::clone(&pending.auth),
                        pending.nonce,
                        pending.identities.clone(),
                    )),
                    _ => None,
                };
                if let Some((auth, nonce, identities)) = required {
                    let result = match identities {
                        Some(identities) => auth.authenticate_by_identity(
                            &identities,
                            options.pass.as_deref().unwrap_or(""),
                        ),
                        None => auth.authenticate(&options, nonce.as_ref().map(|n| &n[..])),
                    };
                    match result {
                        Ok(grant) => {
                            let responses =
                                grant.permissions.as_ref().and_then(|p| p.responses()).map(
                                    |limits| Responses {
                                        limits,
                                        open: std::collections::VecDeque::new(),
                                    },
                                );
                            *self.security.borrow_mut() = Security::Granted(Box::new(Granted {
                                auth,
                                grant,
                                responses,
                            }))
                        }
                        Err(crate::auth::AuthFailed) => {
                            tracing::debug!(
                                client_id = self.id,
                                user = options.user.as_deref().unwrap_or(""),
                                "authorization violation"
                            );
                            return self.fail(Some("Authorization Violation"), true);
                        }
                    }
                }
                let flags = Flags::from_options(&options);
                self.flags.set(flags);
                *self.client.borrow_mut() =
                    (options.name.is_some() || options.lang.is_some() || options.version.is_some())
                        .then(|| {
                            Box::new(ClientDescription {
                                name: options.name,
                                lang: options.lang,
                                version: options.version,
                            })
                        });
                if self.state.get() == State::AwaitingConnect {
                    self.state.set(State::Established);
                }
                self.ok();
                Effect::None
            }
            Err(e) => self.fail(e.err_text(), e.closes_connection()),
        }
    }

    fn handle_pub<'a>(
        &self,
        subject: &'a [u8],
        reply: Option<&'a [u8]>,
        headers: Option<&'a [u8]>,
        payload: &'a [u8],
    ) -> Effect<'a> {
        if let Some(permissions) = self.permissions() {
            if !permissions.can_publish(subject) && !self.take_response(subject) {
                let text = format!("Permissions Violation for Publish to {}", go_quote(subject));
                return self.fail(Some(&text), false);
            }
        }
        let flags = self.flags.get();
        if flags.pedantic && !is_valid_publish_subject(subject) {
            // nats-server complains but still acknowledges and routes the message.
            self.fail(Some("Invalid Publish Subject"), false);
        }
        self.msgs_in.set(self.msgs_in.get() + 1);
        let bytes = payload.len() + headers.map_or(0, <[u8]>::len);
        self.bytes_in.set(self.bytes_in.get() + bytes as u64);
        self.active_since_ping.set(true);
        self.ok();
        Effect::Publish(Message {
            subject,
            reply,
            headers,
            payload,
        })
    }

    fn handle_sub<'a>(
        self: &Rc<Self>,
        subject: &[u8],
        queue: Option<&[u8]>,
        sid: &[u8],
    ) -> Effect<'a> {
        if !is_valid_subject(subject) || !queue.is_none_or(is_valid_queue) {
            return self.fail(Some("Invalid Subject"), false);
        }
        let permissions = self.permissions();
        if let Some(p) = &permissions {
            if !p.can_subscribe(subject, queue) {
                let text = match queue {
                    Some(q) => format!(
                        "Permissions Violation for Subscription to {} using queue {}",
                        go_quote(subject),
                        go_quote(q)
                    ),
                    None => format!(
                        "Permissions Violation for Subscription to {}",
                        go_quote(subject)
                    ),
                };
                return self.fail(Some(&text), false);
            }
        }
        let mut subs = self.subs.borrow_mut();
        if subs.get(sid).is_some() {
            // nats-server ignores a SUB that reuses a live sid.
            drop(subs);
            self.ok();
            return Effect::None;
        }
        let max = self.limits.get().subscriptions_max;
        if max != 0 && subs.len() >= max {
            drop(subs);
            return self.fail(Some("maximum subscriptions exceeded"), false);
        }
        let sub = Rc::new(Subscription::new(Rc::clone(self), sid, subject, queue));
        if permissions.is_some_and(|p| p.filters_deliveries(subject)) {
            sub.deny_filtered.set(true);
        }
        subs.insert(Rc::clone(&sub));
        Effect::Subscribe(sub)
    }

    fn handle_unsub<'a>(&self, sid: &[u8], max_msgs: Option<u64>) -> Effect<'a> {
        let mut subs = self.subs.borrow_mut();
        let Some(sub) = subs.get(sid) else {
            drop(subs);
            self.ok();
            return Effect::None;
        };
        if let Some(max) = max_msgs {
            if max > sub.delivered.get() {
                sub.set_max_msgs(max);
                drop(subs);
                self.ok();
                return Effect::None;
            }
        }
        let sub = subs.remove(sid).expect("present: looked up above");
        drop(subs);
        sub.kill();
        self.ok();
        Effect::Unsubscribe(sub)
    }

    /// Removes a subscription that delivered its last allowed message.
    pub fn forget_subscription(&self, sub: &Subscription) {
        let mut subs = self.subs.borrow_mut();
        if subs.get(sub.sid()).is_some_and(|s| std::ptr::eq(&**s, sub)) {
            subs.remove(sub.sid());
        }
    }

    /// Empties the subscription table (session ending), breaking the Rc cycle.
    pub fn take_subscriptions(&self) -> Vec<Rc<Subscription>> {
        let subs =
            std::mem::replace(&mut *self.subs.borrow_mut(), SubTable::Few(Vec::new())).into_vec();
        for sub in &subs {
            sub.kill();
        }
        subs
    }

    /// The subscriptions (for a connection move).
    pub fn subscriptions(&self) -> Vec<Rc<Subscription>> {
        match &*self.subs.borrow() {
            SubTable::Few(v) => v.clone(),
            SubTable::Many(m) => m.values().cloned().collect(),
        }
    }

    /// Notes that a client's message published on shard `origin` was queued.
    #[inline]
    pub fn note_origin(&self, origin: u8) {
        self.last_origin.set(origin);
    }

    /// The origin noted since the last call ([`crate::router::ORIGIN_NONE`]: none).
    pub fn take_origin(&self) -> u8 {
        self.last_origin.replace(crate::router::ORIGIN_NONE)
    }

    /// Unreleased SUB-barrier holds.
    pub fn holds(&self) -> u32 {
        self.holds.get()
    }

    /// Starts a move: the writer stops after its write in flight (see
    /// [`Session::is_detaching`]) and leaves the socket open.
    pub fn detach(&self) {
        self.detaching.set(true);
        self.wake_writer();
    }

    /// The move is over: the writer on the new shard may write again.
    pub fn attached(&self) {
        self.detaching.set(false);
    }

    pub fn is_detaching(&self) -> bool {
        self.detaching.get()
    }

    /// A shell for a connection moving away: the same client id and
    /// subscriptions (sid and subject; movable connections have only plain
    /// ones without a max), recording what it is given for
    /// [`Session::deliver_forwarded`]. Its output is bounded by the client's
    /// own max_pending (past it the shell closes, and the move ends the client
    /// as a slow consumer: what it would have been).
    pub fn shell_of(client: &Rc<Session>) -> (Rc<Session>, Vec<Rc<Subscription>>) {
        let shell = Session::new(client.id, client.limits.get());
        shell.state.set(State::Established);
        shell.flags.set(Flags {
            forward: true,
            ..client.flags.get()
        });
        let subs: Vec<Rc<Subscription>> = client
            .subscriptions()
            .iter()
            .map(|sub| {
                let copy = Rc::new(Subscription::new(
                    Rc::clone(&shell),
                    sub.sid(),
                    sub.subject(),
                    None,
                ));
                shell.subs.borrow_mut().insert(Rc::clone(&copy));
                copy
            })
            .collect();
        (shell, subs)
    }

    /// Takes what a shell recorded (its whole output).
    pub fn take_forwarded(&self) -> Vec<u8> {
        std::mem::take(&mut *self.out.borrow_mut())
    }

    /// Delivers what a shell recorded on the old shard through this session's
    /// own subscriptions (so permissions, allowed responses and counters work
    /// as for any delivery), ahead of everything queued since the output was
    /// held (`hold_output` when the connection arrived); records of a
    /// subscription that is gone are dropped. Returns false for a malformed
    /// record (never from a shell; nothing after it is delivered).
    pub fn deliver_forwarded(&self, records: &[u8]) -> bool {
        let tail = {
            let mut out = self.out.borrow_mut();
            let at = self.hold_from.get().min(out.len());
            out.split_off(at)
        };
        let mut at = 0;
        let mut ok = true;
        while at < records.len() {
            let Some((sid, msg, used)) = forwarded_record(&records[at..]) else {
                ok = false;
                break;
            };
            at += used;
            let sub = self.subs.borrow().get(sid).cloned();
            if let Some(sub) = sub {
                sub.deliver(&msg);
            }
        }
        self.out.borrow_mut().extend_from_slice(&tail);
        ok
    }

    /// Finds this session's subscription whose subject matches `subject`
    /// (used for the no-responders status, sent on the requester's inbox sid).
    pub fn subscription_matching(&self, subject: &[u8]) -> Option<Rc<Subscription>> {
        self.subs
            .borrow()
            .find(|s| s.queue().is_none() && super::subject::subject_matches(s.subject(), subject))
    }

    /// Queues the answer to a client's PING.
    pub fn pong(&self) {
        self.queue_bytes(encode::PONG);
    }

    /// Queues +OK if the client asked for verbose mode.
    pub fn ok(&self) {
        if self.flags.get().verbose {
            self.queue_bytes(encode::OK);
        }
    }

    /// Queues `-ERR '<text>'` (None: the reference closes silently) and, if
    /// `closes`, starts closing.
    fn fail<'a>(&self, text: Option<&str>, closes: bool) -> Effect<'a> {
        if let Some(text) = text {
            let mut bytes = Vec::with_capacity(text.len() + 10);
            encode::err(&mut bytes, text);
            self.queue_bytes(&bytes);
        }
        if closes {
            self.close(CloseReason::ProtocolError);
            Effect::Close
        } else {
            Effect::None
        }
    }

    /// Queues `-ERR '<text>'` and closes: for errors found outside `handle_op`
    /// (parser errors, timeouts, limits).
    pub fn fail_and_close(&self, text: Option<&str>, reason: CloseReason) {
        if let Some(text) = text {
            let mut bytes = Vec::with_capacity(text.len() + 10);
            encode::err(&mut bytes, text);
            self.queue_bytes(&bytes);
        }
        self.close(reason);
    }

    /// The ping timer fired: queues a server PING unless `max` are already
    /// unanswered, in which case the client is stale. Like nats-server, a client
    /// that published since the last check (once it has answered one PING) is
    /// evidently alive and is not pinged. Returns false when it was closed.
    pub fn ping(&self, outstanding_max: u32) -> bool {
        if self.active_since_ping.replace(false) && self.round_trip_measured.get() {
            return true;
        }
        let outstanding = self.pings_outstanding.get();
        if outstanding >= outstanding_max {
            self.fail_and_close(Some("Stale Connection"), CloseReason::StaleConnection);
            return false;
        }
        self.pings_outstanding.set(outstanding + 1);
        self.queue_bytes(encode::PING);
        true
    }

    /// Queues raw protocol bytes for the client.
    pub fn queue_bytes(&self, bytes: &[u8]) {
        if self.is_closing() && self.close_reason.get() == Some(CloseReason::SlowConsumer) {
            return;
        }
        let was_empty = {
            let mut out = self.out.borrow_mut();
            let was_empty = out.is_empty();
            out.extend_from_slice(bytes);
            was_empty
        };
        self.after_queue(was_empty);
    }

    fn queue_message(&self, sid: &[u8], msg: &Message<'_>) {
        let was_empty = {
            let mut out = self.out.borrow_mut();
            let was_empty = out.is_empty();
            let flags = self.flags.get();
            match msg.headers {
                _ if flags.forward => forward_record(&mut out, sid, msg),
                Some(headers) if flags.headers => {
                    encode::hmsg(&mut out, msg.subject, sid, msg.reply, headers, msg.payload)
                }
                _ => encode::msg(&mut out, msg.subject, sid, msg.reply, msg.payload),
            }
            was_empty
        };
        self.msgs_out.set(self.msgs_out.get() + 1);
        let bytes = msg.payload.len() + msg.headers.map_or(0, <[u8]>::len);
        self.bytes_out.set(self.bytes_out.get() + bytes as u64);
        self.after_queue(was_empty);
    }

    /// Enforces max_pending and wakes the writer. The writer only sleeps when the
    /// queue is empty, so only the empty → non-empty transition needs a wake-up
    /// (one atomic operation saved per message on the hot path).
    fn after_queue(&self, was_empty: bool) {
        let pending = self.out.borrow().len() + self.in_flight_bytes.get();
        if pending > self.limits.get().pending_bytes_max {
            self.out.borrow_mut().clear();
            self.close(CloseReason::SlowConsumer);
            return;
        }
        if was_empty {
            self.wake_writer();
        }
    }

    /// Starts closing. The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        if self.is_closing() {
            return;
        }
        self.close_reason.set(Some(reason));
        // A closing client is owed no ordering: flush whatever it may still get.
        self.hold_from.set(NOT_HOLDING);
        self.holds.set(0);
        self.state.set(State::Closing {
            flush: reason.flushes(),
        });
        if !reason.flushes() {
            self.out.borrow_mut().clear();
        }
        self.wake_writer();
    }

    /// Waits until there is output to write, the session is closing or the
    /// connection is moving.
    pub async fn output_ready(&self) {
        std::future::poll_fn(|cx| {
            if self.has_output() || self.is_closing() || self.detaching.get() {
                return std::task::Poll::Ready(());
            }
            // Checked and parked in one step on one thread: every change that
            // makes the check pass wakes this waker ([`Session::wake_writer`]).
            let waker = cx.waker();
            match self.writer.take() {
                Some(old) if old.will_wake(waker) => self.writer.set(Some(old)),
                _ => self.writer.set(Some(waker.clone())),
            }
            std::task::Poll::Pending
        })
        .await
    }

    fn wake_writer(&self) {
        if let Some(waker) = self.writer.take() {
            waker.wake();
        }
    }

    /// Takes a hold on the output: from now on, queued output waits until every
    /// hold is released with [`Session::release_hold`] (what is already queued may
    /// still be written). While one hold stands, further holds keep its position.
    pub fn hold_output(&self) {
        if self.is_closing() {
            return;
        }
        if self.holds.get() == 0 {
            self.hold_from.set(self.out.borrow().len());
        }
        self.holds.set(self.holds.get() + 1);
    }

    /// Releases one [`Session::hold_output`]; the last one lets the writer have
    /// everything held.
    pub fn release_hold(&self) {
        let holds = self.holds.get();
        if holds == 0 {
            return; // closed meanwhile: closing dropped every hold
        }
        self.holds.set(holds - 1);
        if holds == 1 {
            self.hold_from.set(NOT_HOLDING);
            if !self.out.borrow().is_empty() {
                self.wake_writer();
            }
        }
    }

    /// Swaps the writable queued output for `spare` (an empty buffer) and records
    /// it as in flight until [`Session::written`]; held output stays queued.
    pub fn take_output(&self, mut spare: Vec<u8>) -> Vec<u8> {
        debug_assert!(spare.is_empty());
        let mut out = self.out.borrow_mut();
        let hold_from = self.hold_from.get();
        let buf = if hold_from >= out.len() {
            if hold_from != NOT_HOLDING {
                // Everything queued before the hold goes: what comes next is
                // held (the hold point is now the start of the queue).
                self.hold_from.set(0);
            }
            std::mem::replace(&mut *out, spare)
        } else {
            spare.extend_from_slice(&out[hold_from..]);
            out.truncate(hold_from);
            self.hold_from.set(0);
            std::mem::replace(&mut *out, spare)
        };
        self.in_flight_bytes.set(buf.len());
        buf
    }

    /// The writer finished writing what `take_output` gave it.
    pub fn written(&self) {
        self.in_flight_bytes.set(0);
    }

    /// Whether output is queued that the writer may write now.
    pub fn has_output(&self) -> bool {
        self.out.borrow().len().min(self.hold_from.get()) > 0
    }

    /// Queued plus in-flight output bytes.
    pub fn pending_bytes(&self) -> usize {
        self.out.borrow().len() + self.in_flight_bytes.get()
    }
}

/// Marks an absent reply or header block in a forwarding record.
const FORWARD_ABSENT: u32 = u32::MAX;

/// Appends a shell's record of one delivery: five little-endian u32 lengths
/// (sid, subject, reply, headers, payload; `FORWARD_ABSENT` for a missing
/// reply or header block), then those bytes.
fn forward_record(out: &mut Vec<u8>, sid: &[u8], msg: &Message<'_>) {
    let lens = [
        sid.len() as u32,
        msg.subject.len() as u32,
        msg.reply.map_or(FORWARD_ABSENT, |r| r.len() as u32),
        msg.headers.map_or(FORWARD_ABSENT, |h| h.len() as u32),
        msg.payload.len() as u32,
    ];
    for len in lens {
        out.extend_from_slice(&len.to_le_bytes());
    }
    out.extend_from_slice(sid);
    out.extend_from_slice(msg.subject);
    out.extend_from_slice(msg.reply.unwrap_or_default());
    out.extend_from_slice(msg.headers.unwrap_or_default());
    out.extend_from_slice(msg.payload);
}

/// Reads one [`forward_record`]: the sid, the message and the bytes used.
fn forwarded_record(bytes: &[u8]) -> Option<(&[u8], Message<'_>, usize)> {
    let mut lens = [0u32; 5];
    for (i, len) in lens.iter_mut().enumerate() {
        let raw = bytes.get(i * 4..i * 4 + 4)?;
        *len = u32::from_le_bytes(raw.try_into().ok()?);
    }
    let mut at = 20usize;
    let mut take = |len: u32, optional: bool| -> Option<Option<&[u8]>> {
        if optional && len == FORWARD_ABSENT {
            return Some(None);
        }
        let end = at.checked_add(len as usize)?;
        let slice = bytes.get(at..end)?;
        at = end;
        Some(Some(slice))
    };
    let sid = take(lens[0], false)??;
    let subject = take(lens[1], false)??;
    let reply = take(lens[2], true)?;
    let headers = take(lens[3], true)?;
    let payload = take(lens[4], false)??;
    let msg = Message {
        subject,
        reply,
        headers,
        payload,
    };
    Some((sid, msg, at))
}

/// A subject as Go's `%q` writes it, which is what nats-server's permission
/// errors carry: in double quotes, `"` and `\\` escaped, bytes outside
/// printable ASCII as `\\xNN`.
fn go_quote(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    for &b in bytes {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthorizationConfig;
    use std::sync::Arc;

    fn plain_session() -> Rc<Session> {
        let session = Session::new(
            1,
            SessionLimits {
                pending_bytes_max: 1 << 20,
                subscriptions_max: 0,
            },
        );
        session.state.set(State::Established);
        session
    }

    #[test]
    fn output_queued_after_a_hold_waits_even_when_the_writer_took_everything_before_it() {
        let session = plain_session();
        session.queue_bytes(b"before");
        session.hold_output();
        // Nothing after the hold yet: the writer takes all there is...
        assert_eq!(session.take_output(Vec::new()), b"before");
        session.written();
        // ...and what comes next is held (it once leaked from the hold point's
        // old offset, cutting a later frame in two).
        session.queue_bytes(b"held frame");
        assert!(!session.has_output());
        assert!(session.take_output(Vec::new()).is_empty());
        session.release_hold();
        assert_eq!(session.take_output(Vec::new()), b"held frame");
    }

    #[test]
    fn a_shells_records_are_delivered_ahead_of_held_output() {
        let client = plain_session();
        let sub = Rc::new(Subscription::new(Rc::clone(&client), b"7", b"a.>", None));
        client.subs.borrow_mut().insert(Rc::clone(&sub));
        let (shell, shell_subs) = Session::shell_of(&client);
        assert_eq!(shell_subs.len(), 1);
        for (subject, reply, headers) in [
            (&b"a.1"[..], Some(&b"r.1"[..]), None),
            (b"a.2", None, Some(&b"NATS/1.0\r\n\r\n"[..])),
        ] {
            let msg = Message {
                subject,
                reply,
                headers,
                payload: b"p",
            };
            assert_eq!(shell_subs[0].deliver(&msg), Delivery::Delivered);
        }
        let records = shell.take_forwarded();
        client.queue_bytes(b"PING\r\n");
        client.hold_output();
        client.queue_bytes(b"+OK\r\n");
        assert!(client.deliver_forwarded(&records));
        client.release_hold();
        let out = String::from_utf8(client.take_output(Vec::new())).expect("utf8");
        assert_eq!(
            out,
            "PING\r\nMSG a.1 7 r.1 1\r\np\r\nMSG a.2 7 1\r\np\r\n+OK\r\n"
        );
        assert_eq!(sub.delivered(), 2);
        // A cut record is refused, never read past its end.
        assert!(!client.deliver_forwarded(&records[..records.len() - 1]));
    }

    fn auth(toml_text: &str) -> Arc<Auth> {
        let config: AuthorizationConfig = toml::from_str(toml_text).expect("TOML");
        Arc::new(Auth::new(&config).expect("valid").expect("auth on"))
    }

    fn session(auth: &Arc<Auth>) -> Rc<Session> {
        let session = Session::new(
            1,
            SessionLimits {
                pending_bytes_max: 1 << 20,
                subscriptions_max: 0,
            },
        );
        session.require_auth(Arc::clone(auth), None);
        session
    }

    fn connect(session: &Rc<Session>, json: &str) {
        let effect = session.handle_op(ClientOp::Connect {
            json: json.as_bytes(),
        });
        assert!(matches!(effect, Effect::None), "{effect:?}");
    }

    fn publish(session: &Rc<Session>, subject: &str) -> bool {
        matches!(
            session.handle_op(ClientOp::Pub {
                subject: subject.as_bytes(),
                reply: None,
                payload: b"x",
            }),
            Effect::Publish(_)
        )
    }

    fn output(session: &Session) -> String {
        String::from_utf8_lossy(&session.take_output(Vec::new())).into_owned()
    }

    fn request(sub: &Subscription, reply: &str) {
        let msg = Message {
            subject: b"svc.q",
            reply: Some(reply.as_bytes()),
            headers: None,
            payload: b"q",
        };
        assert_eq!(sub.deliver(&msg), Delivery::Delivered);
    }

    fn subscribe(session: &Rc<Session>, subject: &str, sid: &str) -> Rc<Subscription> {
        match session.handle_op(ClientOp::Sub {
            subject: subject.as_bytes(),
            queue: None,
            sid: sid.as_bytes(),
        }) {
            Effect::Subscribe(sub) => sub,
            other => panic!("SUB {subject}: {other:?}"),
        }
    }

    #[test]
    fn responses_are_counted_expire_and_stay_bounded() {
        let auth = auth(
            r#"users = [ { user = "svc", password = "s", permissions = { subscribe = ["svc.>"], allow_responses = { max = 2, expires_ms = 1000 } } } ]"#,
        );
        let s = session(&auth);
        connect(&s, r#"{"verbose":false,"user":"svc","pass":"s"}"#);
        let sub = subscribe(&s, "svc.>", "1");
        set_coarse_now_ms(10_000);
        assert!(!publish(&s, "_INBOX.a"), "nothing received yet");
        request(&sub, "_INBOX.a");
        assert!(publish(&s, "_INBOX.a"));
        assert!(publish(&s, "_INBOX.a"));
        assert!(!publish(&s, "_INBOX.a"), "max 2");
        request(&sub, "_INBOX.b");
        set_coarse_now_ms(11_001);
        assert!(!publish(&s, "_INBOX.b"), "expired after 1000 ms");
        // A flood of requests keeps only the newest RESPONSES_TRACKED_MAX.
        for i in 0..RESPONSES_TRACKED_MAX + 10 {
            request(&sub, &format!("_INBOX.f.{i}"));
        }
        if let Security::Granted(g) = &*s.security.borrow() {
            let open = &g.responses.as_ref().expect("responses").open;
            assert_eq!(open.len(), RESPONSES_TRACKED_MAX);
        }
        assert!(!publish(&s, "_INBOX.f.0"), "the oldest were forgotten");
        assert!(publish(
            &s,
            &format!("_INBOX.f.{}", RESPONSES_TRACKED_MAX + 9)
        ));
        let out = output(&s);
        assert!(
            out.contains("-ERR 'Permissions Violation for Publish to \"_INBOX.a\"'"),
            "{out}"
        );
    }

    #[test]
    fn a_reload_rechecks_credentials_and_removes_subscriptions_that_lost_permission() {
        let before =
            auth(r#"users = [ { user = "a", password = "pa" }, { user = "b", password = "pb" } ]"#);
        let a = session(&before);
        connect(&a, r#"{"verbose":false,"user":"a","pass":"pa"}"#);
        let kept = subscribe(&a, "cmd.a", "1");
        let lost = subscribe(&a, "secret.>", "2");
        let wide = subscribe(&a, "cmd.*", "3");
        let b = session(&before);
        connect(&b, r#"{"verbose":false,"user":"b","pass":"pb"}"#);
        let pending = session(&before);
        output(&a);
        output(&b);

        // a: same password, now restricted; b: password changed.
        let after = auth(
            r#"users = [ { user = "a", password = "pa", permissions = { subscribe = { allow = ["cmd.>"], deny = ["cmd.x"] }, publish = ["cmd.>"] } }, { user = "b", password = "new" } ]"#,
        );
        let outcome = a.reauthorize(Some(&after));
        assert!(!outcome.closed);
        assert_eq!(outcome.removed.len(), 1);
        assert!(Rc::ptr_eq(&outcome.removed[0], &lost));
        assert!(!lost.is_live() && kept.is_live() && wide.is_live());
        assert!(
            wide.deny_filtered.get(),
            "cmd.* now overlaps the deny entry"
        );
        assert_eq!(
            output(&a),
            "-ERR 'Permissions Violation for Subscription to \"secret.>\" (sid \"2\")'\r\n"
        );
        assert!(!publish(&a, "other"), "new publish permissions apply");
        assert!(publish(&a, "cmd.go"));

        let outcome = b.reauthorize(Some(&after));
        assert!(outcome.closed && b.is_closing());
        assert_eq!(output(&b), "-ERR 'Authorization Violation'\r\n");

        // Before CONNECT: checked against the new table when CONNECT comes.
        assert!(!pending.reauthorize(Some(&after)).closed);
        connect(&pending, r#"{"verbose":false,"user":"b","pass":"new"}"#);

        // Authentication turned off: everyone may do everything.
        assert!(!a.reauthorize(None).closed);
        assert!(publish(&a, "other"));
    }

    #[test]
    fn a_client_admitted_without_auth_is_closed_when_auth_is_turned_on() {
        let open = Session::new(
            2,
            SessionLimits {
                pending_bytes_max: 1 << 20,
                subscriptions_max: 0,
            },
        );
        connect(&open, r#"{"verbose":false}"#);
        let token = auth(r#"token = "t""#);
        assert!(open.reauthorize(Some(&token)).closed);
        assert!(open.is_closing());
    }
}
