//! The client state machine. Inputs are `connect`, `publish`, `subscribe`,
//! `handle_input`, `handle_timeout` and friends, each with the time; outputs
//! are `poll_transmit`, `poll_event` and `poll_timeout`.
//!
//! What to send is derived from state rather than queued as bytes: each
//! pending request (CONNECT, REGISTER, SUBSCRIBE, a QoS 1 PUBLISH, PING) holds
//! a [`Retry`] saying whether it is due and when it times out, so a retry is
//! the same frame rebuilt with the same ids, and a reconnect just marks every
//! pending request due again.

use crate::StorageError;
use heapless::{Deque, Vec};
use perch_wire::protect::{self, ReplayWindow, KEY_BYTES, SALT_BYTES};
use perch_wire::{encode, Code, Frame, FrameType, Qos, TopicRef};
use perch_wire::{CLIENT_ID_BYTES_MAX, DEDUP_WINDOW_MSG_IDS, SUBJECT_BYTES_MAX};

use crate::storage::{self, NoStorage, RecordTarget, Storage, MSG_ID_LEASE};

/// How long to wait for a CONNACK, REGACK, SUBACK, PUBACK or PONG before the
/// first retransmission, by default. Each retry doubles it, up to 32×.
pub const CONNECT_RETRY_MS_DEFAULT: u32 = 1_000;

/// Non-message events the client holds until `poll_event` (messages have
/// their own one-slot inbox).
const EVENTS_MAX: usize = 8;
/// A new QoS 1 msg id is less than this past the oldest unacknowledged one.
/// The broker de-duplicates over the last 16 msg ids it accepted; while an
/// id X may still be retried, the ids it can accept besides X then lie in
/// (X − 8, X + 8), at most 14 of them, so X is still in the window when its
/// retry arrives. (Bounding only the count in flight does not do that:
/// reordering and lost PUBACKs let other ids push X out, and its retry is
/// passed on twice.)
const MSG_ID_SPAN_MAX: u32 = DEDUP_WINDOW_MSG_IDS as u32 / 2;
const _: () = assert!(2 * MSG_ID_SPAN_MAX - 2 < DEDUP_WINDOW_MSG_IDS as u32);

/// Acks (PUBACK, REGACK) waiting for `poll_transmit`. When full, an ack is
/// dropped: the broker retransmits and the client acks the copy.
const ACKS_MAX: usize = 8;

/// Settings fixed for the client's life.
#[derive(Clone, Debug)]
pub struct Config {
    /// At most [`CLIENT_ID_BYTES_MAX`] bytes.
    pub client_id: Vec<u8, CLIENT_ID_BYTES_MAX>,
    /// 0 disables keepalive; otherwise the client sends PING when it has sent
    /// nothing for this long.
    pub keepalive_s: u32,
    /// Start with a fresh session on the first connect. Reconnects never
    /// clean: they resume the session if the broker still has it.
    pub clean_session: bool,
    /// The first retransmission timeout of any request.
    pub retry_interval_ms: u32,
    /// Retransmissions of one request before the connection counts as lost.
    pub retries_max: u8,
    /// The first wait before reconnecting; doubles per failed attempt.
    pub reconnect_backoff_min_ms: u32,
    /// The longest wait before reconnecting.
    pub reconnect_backoff_max_ms: u32,
    /// The device's key: every frame is sealed with it and only sealed
    /// frames are taken from the broker (docs/device-protocol.md §9).
    /// None: plain frames, as without keys.
    pub key: Option<DeviceKey>,
    /// The lowest protection epoch this boot may use. Every CONNECT uses a
    /// new epoch, and no epoch may repeat across reboots: with a persistent
    /// [`Storage`] the client keeps the next one there ([`EPOCH_LEASE`] at a
    /// time); without one the firmware must pass a floor that grows every
    /// boot (a boot counter × 65536, or the RTC's seconds).
    pub epoch_floor: u32,
}

/// A 32-byte device key. `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceKey(pub [u8; KEY_BYTES]);

impl core::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("DeviceKey(<redacted>)")
    }
}

/// Epochs the client takes per [`Storage::store_epoch`]: it stores the epoch
/// this many ahead, and after a reboot starts there (one flash write per 16
/// connects).
pub const EPOCH_LEASE: u32 = 16;

/// What protection keeps: the key, this side's epoch and counter, and what
/// it has seen of the broker's frames in this epoch.
struct Protect {
    key: DeviceKey,
    /// The epoch of the current CONNECT and the last counter sealed in it.
    epoch: u32,
    counter: u32,
    /// The next epoch to take and how many are left before storing again.
    next_epoch: u32,
    epochs_leased: u32,
    /// The broker's salt from its first verified frame in this epoch.
    broker_salt: Option<[u8; SALT_BYTES]>,
    broker_window: ReplayWindow,
}

impl Config {
    /// Defaults: keepalive 60 s, clean first session, 1 s first retry, 4
    /// retries, reconnect backoff 1 s to 60 s.
    pub fn new(client_id: &[u8]) -> Result<Config, ClientError> {
        let client_id = Vec::from_slice(client_id).map_err(|_| ClientError::TooLarge)?;
        Ok(Config {
            client_id,
            keepalive_s: 60,
            clean_session: true,
            retry_interval_ms: CONNECT_RETRY_MS_DEFAULT,
            retries_max: 4,
            reconnect_backoff_min_ms: 1_000,
            reconnect_backoff_max_ms: 60_000,
            key: None,
            epoch_floor: 0,
        })
    }
}

/// What a publish is addressed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// A subject: registered once (REGISTER/REGACK), then sent by id.
    Subject(&'a [u8]),
    /// An id from the broker's predefined table.
    Predefined(u32),
    /// An id the client already knows is registered (e.g. from `Message`).
    Registered(u32),
}

/// Why the client's connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisconnectReason {
    /// A request went unanswered through every retry: the client reconnects.
    Timeout,
    /// The broker sent DISCONNECT: the client reconnects.
    ByBroker,
    /// CONNACK refused the session. NOT_PERMITTED and UNSUPPORTED_VERSION
    /// are final (the client stops); other codes are retried with backoff.
    Refused(Code),
    /// The application called [`Client::disconnect`].
    Closed,
}

/// Something the application should know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// CONNACK OK (also after a reconnect or RESUME).
    Connected {
        /// The broker kept the session: registrations and subscriptions
        /// survive. Otherwise the client re-registers and resubscribes itself.
        session_present: bool,
    },
    /// A message for one of the subscriptions.
    Message {
        /// The id it came on.
        topic: TopicRef,
        /// The subject, when the broker registered it (not for predefined ids).
        subject: Option<&'a [u8]>,
        /// The payload.
        payload: &'a [u8],
        /// Set when the message is a request: answer with [`Client::reply`].
        reply_handle: Option<u32>,
    },
    /// A QoS 1 publish was acknowledged OK.
    PublishAcked {
        /// The id [`Client::publish`] returned.
        msg_id: u32,
    },
    /// A publish was refused (PUBACK or REGACK code, or its session was lost
    /// for a reply). `msg_id` is 0 for QoS 0.
    PublishFailed {
        /// The id [`Client::publish`] returned.
        msg_id: u32,
        /// Why.
        code: Code,
    },
    /// SUBACK.
    Subscribed {
        /// The id [`Client::subscribe`] returned.
        req_id: u32,
        /// OK, or why not (the subscription is then forgotten).
        code: Code,
    },
    /// UNSUBACK.
    Unsubscribed {
        /// The id [`Client::unsubscribe`] returned.
        req_id: u32,
        /// OK, or why not.
        code: Code,
    },
    /// The broker sent ERROR (other than UNKNOWN_SESSION, which the client
    /// handles by resuming).
    Error {
        /// Why.
        code: Code,
        /// The refused frame's type.
        ref_type: Option<FrameType>,
        /// The refused frame's id.
        ref_id: u32,
    },
    /// The broker confirmed the sleep; the radio may go off.
    Asleep,
    /// After [`Client::wake`]: every buffered message was delivered (PONG).
    WakeDone,
    /// The connection ended.
    Disconnected {
        /// Why.
        reason: DisconnectReason,
    },
}

/// Why a call was refused. Nothing is queued when one is returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// `INFLIGHT` publishes are already queued or unacknowledged, or (QoS 1)
    /// the new msg id would be 8 or more past the oldest unacknowledged one:
    /// the publish waits for that one's PUBACK.
    InflightFull,
    /// `SUBS` topic ids are already held.
    TopicTableFull,
    /// `SUBS` subscriptions are already held.
    SubscriptionTableFull,
    /// The frame would be larger than `BUF`, or a subject or client id is
    /// over its protocol limit.
    TooLarge,
    /// The call needs an established session (sleep) or a started client.
    NotConnected,
    /// The [`Storage`] failed to keep (or, building the client, to read)
    /// a QoS 1 publish or the msg id counter.
    Storage,
}

impl core::fmt::Display for ClientError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ClientError::InflightFull => "too many publishes in flight",
            ClientError::TopicTableFull => "topic table full",
            ClientError::SubscriptionTableFull => "subscription table full",
            ClientError::TooLarge => "frame, subject or client id too large",
            ClientError::NotConnected => "not connected",
            ClientError::Storage => "storage failed",
        })
    }
}

impl core::error::Error for ClientError {}

/// Counters of what the client dropped or absorbed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames that did not decode.
    pub malformed_frames: u32,
    /// QoS 1 deliveries seen again (re-acknowledged, not re-delivered).
    pub duplicates: u32,
    /// QoS 0 deliveries dropped because the inbox was full or the topic
    /// unknown. (A QoS 1 delivery is left unacknowledged instead.)
    pub messages_dropped: u32,
    /// Events dropped because `EVENTS_MAX` were waiting.
    pub events_dropped: u32,
    /// Acks dropped because `ACKS_MAX` were waiting.
    pub acks_dropped: u32,
    /// Connections lost (timeouts and broker disconnects).
    pub connections_lost: u32,
    /// [`Storage`] calls that failed. A failed store or counter write is
    /// also returned by `publish`; a failed remove (after PUBACK) is retried
    /// at every `handle_timeout` until it succeeds or the slot is reused.
    pub storage_errors: u32,
    /// Stored records that did not parse when the client was built (e.g.
    /// written by another firmware version): removed, not sent.
    pub records_discarded: u32,
    /// With a key: frames from the broker dropped because they did not
    /// verify, were replays, or came unsealed (but for ERROR UNKNOWN_SESSION).
    pub unverified_dropped: u32,
}

/// A request's retransmission state.
#[derive(Clone, Copy, Debug)]
struct Retry {
    /// Send (again) at the next `poll_transmit`.
    due: bool,
    /// Transmissions so far.
    attempts: u8,
    /// When the last transmission times out.
    timeout_ms: u64,
}

impl Retry {
    const fn now() -> Retry {
        Retry {
            due: true,
            attempts: 0,
            timeout_ms: 0,
        }
    }

    // Out of line, like `on_timeout`: called for every kind of request, and
    // 64-bit arithmetic is long on a 32-bit core.
    #[inline(never)]
    fn sent(&mut self, now_ms: u64, interval_ms: u32) {
        self.due = false;
        self.attempts = self.attempts.saturating_add(1);
        let backoff = u64::from(interval_ms) << (self.attempts - 1).min(5);
        self.timeout_ms = now_ms.saturating_add(backoff);
    }

    fn deadline(&self) -> Option<u64> {
        (!self.due).then_some(self.timeout_ms)
    }

    /// Called at `now`: Err when the last allowed transmission timed out.
    #[inline(never)]
    fn on_timeout(&mut self, now_ms: u64, retries_max: u8) -> Result<(), ()> {
        if self.due || now_ms < self.timeout_ms {
            return Ok(());
        }
        if self.attempts > retries_max {
            return Err(());
        }
        self.due = true;
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Before `connect`.
    Idle,
    /// CONNECT (or RESUME) sent, waiting for CONNACK.
    AwaitingConnack {
        resume: bool,
    },
    Established,
    /// DISCONNECT(sleep) sent, waiting for the broker's DISCONNECT.
    AwaitingSleepAck {
        sleep_s: u32,
    },
    Asleep,
    /// PING sent from sleep, waiting for the buffered messages and PONG.
    Waking,
    /// Waiting out the backoff before connecting again.
    Reconnecting {
        at_ms: u64,
    },
    /// DISCONNECT to send, then Closed.
    Closing,
    Closed,
}

struct TopicEntry<const BUF: usize> {
    subject: Vec<u8, BUF>,
    /// 0 until bound.
    id: u32,
    /// Set while our REGISTER awaits its REGACK.
    registration: Option<(u32, Retry)>,
    /// Registered by the broker and not published to by us (dropped when a
    /// session is not resumed; ours are registered again).
    by_broker: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SubscriptionOp {
    Subscribe,
    Unsubscribe,
}

struct Subscription<const BUF: usize> {
    filter: Vec<u8, BUF>,
    max_qos: Qos,
    pending: Option<(SubscriptionOp, u32, Retry)>,
}

#[derive(Clone, Copy, Debug)]
enum OutgoingTarget {
    /// An entry of the topic table (sent once it is bound).
    Topic(usize),
    Fixed(TopicRef),
}

struct Outgoing<const BUF: usize> {
    target: OutgoingTarget,
    qos: Qos,
    msg_id: u32,
    payload: Vec<u8, BUF>,
    retry: Retry,
}

struct Inbox<const BUF: usize> {
    topic: TopicRef,
    topic_slot: Option<usize>,
    payload: Vec<u8, BUF>,
    reply_handle: Option<u32>,
}

#[derive(Clone, Copy, Debug)]
enum PendingEvent {
    Connected {
        session_present: bool,
    },
    /// The inbox holds the message.
    Message,
    PublishAcked {
        msg_id: u32,
    },
    PublishFailed {
        msg_id: u32,
        code: Code,
    },
    Subscribed {
        req_id: u32,
        code: Code,
    },
    Unsubscribed {
        req_id: u32,
        code: Code,
    },
    Error {
        code: Code,
        ref_type: Option<FrameType>,
        ref_id: u32,
    },
    Asleep,
    WakeDone,
    Disconnected {
        reason: DisconnectReason,
    },
}

#[derive(Clone, Copy, Debug)]
enum Ack {
    Puback { msg_id: u32, code: Code },
    Regack { topic: u32, code: Code },
}

/// What `poll_transmit` found to send.
#[derive(Clone, Copy, Debug)]
enum Next {
    Connect,
    Resume,
    Ack,
    Register(usize),
    Subscription(usize),
    Publish(usize),
    Ping,
    Sleep(u32),
    Disconnect,
}

/// The device protocol client. See the crate docs for the bounds, and
/// [`Client::with_storage`] for keeping QoS 1 publishes across a reboot.
pub struct Client<const SUBS: usize, const INFLIGHT: usize, const BUF: usize, S = NoStorage> {
    config: Config,
    state: State,
    /// The latest time any input carried; outputs are computed at it.
    now_ms: u64,
    connect_retry: Retry,
    reconnect_backoff_ms: u32,
    /// Set once a CONNACK OK arrived: later connects never clean.
    connected_once: bool,
    session_token: u32,
    last_sent_ms: u64,
    ping: Option<Retry>,
    next_msg_id: u32,
    next_req_id: u32,
    topics: [Option<TopicEntry<BUF>>; SUBS],
    subscriptions: [Option<Subscription<BUF>>; SUBS],
    outgoing: [Option<Outgoing<BUF>>; INFLIGHT],
    /// The last QoS 1 msg ids delivered to the application.
    seen_msg_ids: Deque<u32, DEDUP_WINDOW_MSG_IDS>,
    /// The one message not yet taken by `poll_event` (or just taken).
    inbox: Option<Inbox<BUF>>,
    /// The inbox's message was handed out: it may be overwritten.
    inbox_polled: bool,
    events: Deque<PendingEvent, EVENTS_MAX>,
    acks: Deque<Ack, ACKS_MAX>,
    stats: Stats,
    /// Where QoS 1 publishes are kept ([`NoStorage`]: nowhere).
    storage: S,
    /// Msg ids that may still be handed out before the counter is stored
    /// again (0: store it before the next one).
    msg_ids_leased: u32,
    /// Bit `slot`: the slot's record outlived its publish (a remove failed).
    unremoved: u16,
    /// With a key (`Config::key`).
    protect: Option<Protect>,
}

impl<const SUBS: usize, const INFLIGHT: usize, const BUF: usize> Client<SUBS, INFLIGHT, BUF> {
    /// A client that has not connected yet and keeps nothing across a reboot.
    pub fn new(config: Config) -> Self {
        Self::build(config, NoStorage)
    }
}

impl<const SUBS: usize, const INFLIGHT: usize, const BUF: usize, S: Storage>
    Client<SUBS, INFLIGHT, BUF, S>
{
    // At most 16 slots: `unremoved` has a bit per slot (and QoS 1 is held
    // to the msg id span, `MSG_ID_SPAN_MAX`, anyway). A CONNECT with the
    // longest id must fit BUF.
    const BOUNDS: () = {
        assert!(INFLIGHT >= 1 && INFLIGHT <= DEDUP_WINDOW_MSG_IDS);
        assert!(SUBS >= 1);
        assert!(BUF >= 8 + CLIENT_ID_BYTES_MAX && BUF <= perch_wire::TCP_FRAME_BYTES_MAX);
    };

    /// A client that has not connected yet and keeps its unacknowledged QoS
    /// 1 publishes in `storage`. Whatever an earlier run left there is taken
    /// back first: those publishes are sent again, with their msg ids, once
    /// [`Client::connect`] has a session, and end in `PublishAcked` or
    /// `PublishFailed` like any other. New msg ids continue from the stored
    /// counter. When anything was taken back, the first CONNECT does not
    /// clean the session (whatever `clean_session` says), so the broker's
    /// de-duplication window still covers the retransmissions.
    ///
    /// Fails with [`ClientError::Storage`] when the storage cannot be read;
    /// nothing was removed from it then. A record that does not parse is
    /// removed and counted in [`Stats::records_discarded`]; one whose
    /// subject finds no room in the topic table is removed and reported as
    /// `PublishFailed` with `NO_RESOURCES`.
    pub fn with_storage(config: Config, storage: S) -> Result<Self, ClientError> {
        let mut client = Self::build(config, storage);
        if S::PERSISTENT {
            client.restore()?;
        }
        Ok(client)
    }

    /// The storage (e.g. to inspect it, or to hand it to the next client).
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }

    /// Ends the client and returns its storage, records and all.
    pub fn into_storage(self) -> S {
        self.storage
    }

    fn build(config: Config, storage: S) -> Self {
        let () = Self::BOUNDS;
        let protect = config.key.clone().map(|key| Protect {
            key,
            epoch: 0,
            counter: 0,
            next_epoch: config.epoch_floor,
            epochs_leased: 0,
            broker_salt: None,
            broker_window: ReplayWindow::new(),
        });
        Client {
            protect,
            reconnect_backoff_ms: config.reconnect_backoff_min_ms,
            config,
            state: State::Idle,
            now_ms: 0,
            connect_retry: Retry::now(),
            connected_once: false,
            session_token: 0,
            last_sent_ms: 0,
            ping: None,
            next_msg_id: 1,
            next_req_id: 1,
            topics: core::array::from_fn(|_| None),
            subscriptions: core::array::from_fn(|_| None),
            outgoing: core::array::from_fn(|_| None),
            seen_msg_ids: Deque::new(),
            inbox: None,
            inbox_polled: false,
            events: Deque::new(),
            acks: Deque::new(),
            stats: no_stats(),
            storage,
            msg_ids_leased: 0,
            unremoved: 0,
        }
    }

    fn restore(&mut self) -> Result<(), ClientError> {
        let counter = self.storage.load_msg_id_counter();
        let counter = counter.map_err(|_| self.storage_failed())?;
        let mut highest = 0;
        let mut record = [0u8; BUF];
        for slot in 0..INFLIGHT {
            let loaded = self.storage.load(slot, &mut record);
            let Some(len) = loaded.map_err(|_| self.storage_failed())? else {
                continue;
            };
            let parsed = record
                .get(..len)
                .and_then(storage::decode_record)
                .filter(|(_, _, payload)| self.check_publish_len(payload).is_ok());
            let Some((msg_id, target, payload)) = parsed else {
                self.stats.records_discarded = self.stats.records_discarded.wrapping_add(1);
                self.remove_record(slot);
                continue;
            };
            let target = match target {
                RecordTarget::Predefined(id) => OutgoingTarget::Fixed(TopicRef::Predefined(id)),
                RecordTarget::Registered(id) => OutgoingTarget::Fixed(TopicRef::Registered(id)),
                RecordTarget::Subject(subject) => match self.topic_for(subject) {
                    Ok(topic) => OutgoingTarget::Topic(topic),
                    Err(_) => {
                        self.event(PendingEvent::PublishFailed {
                            msg_id,
                            code: Code::NoResources,
                        });
                        self.remove_record(slot);
                        continue;
                    }
                },
            };
            self.enqueue(slot, target, Qos::AtLeastOnce, msg_id, payload);
            highest = highest.max(msg_id);
            // Keep the session (and its de-duplication window) if the broker
            // still has it: the copies may have been routed before the reboot.
            self.connected_once = true;
        }
        self.next_msg_id = match counter {
            Some(next) if next != 0 => next,
            _ => highest.checked_add(1).unwrap_or(1),
        };
        Ok(())
    }

    fn storage_failed(&mut self) -> ClientError {
        self.stats.storage_errors = self.stats.storage_errors.wrapping_add(1);
        ClientError::Storage
    }

    /// Empties `slot`'s record; a failure is retried by `handle_timeout`.
    fn remove_record(&mut self, slot: usize) {
        let bit = 1u16 << slot;
        if self.storage.remove(slot).is_ok() {
            self.unremoved &= !bit;
        } else {
            self.storage_failed();
            self.unremoved |= bit;
        }
    }

    /// Frees an outgoing slot (and its stored record).
    fn release(&mut self, slot: usize) {
        let stored = S::PERSISTENT
            && self.outgoing[slot]
                .as_ref()
                .is_some_and(|out| out.qos == Qos::AtLeastOnce);
        self.outgoing[slot] = None;
        if stored {
            self.remove_record(slot);
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The session is established (or awake from sleep): publishes flow.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Established | State::Waking)
    }

    /// The token of the current session (0 before the first CONNACK).
    pub fn session_token(&self) -> u32 {
        self.session_token
    }

    fn advance(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    /// Starts connecting (CONNECT at the next `poll_transmit`). Also
    /// restarts a closed client.
    pub fn connect(&mut self, now_ms: u64) {
        self.advance(now_ms);
        self.start_connect(false);
    }

    /// The source address changed (the modem re-attached): continue the
    /// session with RESUME instead of a new CONNECT.
    pub fn resume(&mut self, now_ms: u64) {
        self.advance(now_ms);
        let resume = self.session_token != 0;
        self.start_connect(resume);
    }

    fn start_connect(&mut self, resume: bool) {
        // With a key, every connect is a CONNECT in a new epoch (RESUME is
        // not needed: the key, not the address, names the session).
        let resume = resume && self.protect.is_none();
        if self.protect.is_some() && self.new_epoch().is_err() {
            // No epoch that is sure to be new: do not send (retried after
            // the backoff).
            self.stats.storage_errors = self.stats.storage_errors.wrapping_add(1);
            return self.backoff();
        }
        self.state = State::AwaitingConnack { resume };
        self.connect_retry = Retry::now();
    }

    /// Takes the next epoch, storing a new lease first when the last is used up.
    fn new_epoch(&mut self) -> Result<(), StorageError> {
        let Some(p) = self.protect.as_mut() else {
            return Ok(());
        };
        if p.epochs_leased == 0 {
            if S::PERSISTENT {
                let stored = self.storage.load_epoch()?.unwrap_or(0);
                let start = stored.max(p.next_epoch).max(self.config.epoch_floor);
                let end = start.checked_add(EPOCH_LEASE).ok_or(StorageError)?;
                self.storage.store_epoch(end)?;
                p.next_epoch = start;
                p.epochs_leased = EPOCH_LEASE;
            } else {
                p.epochs_leased = u32::MAX;
            }
        }
        p.epoch = p.next_epoch;
        p.next_epoch = p.next_epoch.checked_add(1).ok_or(StorageError)?;
        p.epochs_leased -= 1;
        p.counter = 0;
        p.broker_salt = None;
        p.broker_window = ReplayWindow::new();
        Ok(())
    }

    /// The protection epoch of the current connection (0 without a key).
    pub fn epoch(&self) -> u32 {
        self.protect.as_ref().map_or(0, |p| p.epoch)
    }

    /// Queues a publish. Returns its msg id (QoS 1) or 0 (QoS 0); the outcome
    /// is a `PublishAcked` / `PublishFailed` event (QoS 1). A subject not yet
    /// registered is registered first; the publish is sent after REGACK.
    pub fn publish(
        &mut self,
        target: Target<'_>,
        payload: &[u8],
        qos: Qos,
        now_ms: u64,
    ) -> Result<u32, ClientError> {
        self.advance(now_ms);
        if self.state == State::Idle || self.state == State::Closed {
            return Err(ClientError::NotConnected);
        }
        let (target, record) = match target {
            Target::Subject(subject) => {
                if subject.len() > SUBJECT_BYTES_MAX || 1 + 5 + subject.len() > BUF {
                    return Err(ClientError::TooLarge);
                }
                let slot = self.outgoing_slot(qos)?;
                self.check_publish_len(payload)?;
                let (topic, exists) = self.topic_slot(subject)?;
                let msg_id = self.keep(slot, qos, RecordTarget::Subject(subject), payload)?;
                match &mut self.topics[topic] {
                    // We publish there: the subject is ours now, registered
                    // again in a new session rather than forgotten, so the
                    // queued publish never points at a freed or reused slot.
                    Some(entry) if exists => entry.by_broker = false,
                    _ => self.add_topic(topic, subject),
                }
                self.enqueue(slot, OutgoingTarget::Topic(topic), qos, msg_id, payload);
                return Ok(msg_id);
            }
            Target::Predefined(id) => (TopicRef::Predefined(id), RecordTarget::Predefined(id)),
            Target::Registered(id) => (TopicRef::Registered(id), RecordTarget::Registered(id)),
        };
        let slot = self.outgoing_slot(qos)?;
        self.check_publish_len(payload)?;
        let msg_id = self.keep(slot, qos, record, payload)?;
        self.enqueue(slot, OutgoingTarget::Fixed(target), qos, msg_id, payload);
        Ok(msg_id)
    }

    /// A QoS 1 publish's msg id, its record stored in `slot` first (when
    /// there is storage); 0 for QoS 0.
    fn keep(
        &mut self,
        slot: usize,
        qos: Qos,
        target: RecordTarget<'_>,
        payload: &[u8],
    ) -> Result<u32, ClientError> {
        if qos == Qos::AtMostOnce {
            return Ok(0);
        }
        if !S::PERSISTENT {
            return Ok(self.allocate_msg_id());
        }
        // Checked with the longest msg id, before one is spent.
        if storage::record_len(&target, u32::MAX, payload) > BUF {
            return Err(ClientError::TooLarge);
        }
        let msg_id = self.allocate_stored_msg_id()?;
        let mut record = [0u8; BUF];
        let len = storage::encode_record(&target, msg_id, payload, &mut record)
            .ok_or(ClientError::TooLarge)?;
        if self.storage.store(slot, &record[..len]).is_err() {
            return Err(self.storage_failed());
        }
        self.unremoved &= !(1u16 << slot);
        Ok(msg_id)
    }

    /// `allocate_msg_id`, storing the counter [`MSG_ID_LEASE`] ahead
    /// whenever the last lease is used up.
    fn allocate_stored_msg_id(&mut self) -> Result<u32, ClientError> {
        loop {
            if self.msg_ids_leased == 0 {
                // Ids run 1..=u32::MAX and wrap to 1: position id - 1 of
                // u32::MAX.
                let position = u64::from(self.next_msg_id.max(1) - 1) + u64::from(MSG_ID_LEASE);
                let end = (position % u64::from(u32::MAX)) as u32 + 1;
                if self.storage.store_msg_id_counter(end).is_err() {
                    return Err(self.storage_failed());
                }
                self.msg_ids_leased = MSG_ID_LEASE;
            }
            self.msg_ids_leased -= 1;
            let id = self.next_msg_id;
            self.next_msg_id = self.next_msg_id.checked_add(1).unwrap_or(1);
            if !self.msg_id_in_use(id) {
                return Ok(id);
            }
        }
    }

    /// Answers a request delivered with `reply_handle` (QoS 0).
    pub fn reply(
        &mut self,
        reply_handle: u32,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<(), ClientError> {
        self.advance(now_ms);
        let slot = self.outgoing_slot(Qos::AtMostOnce)?;
        self.check_publish_len(payload)?;
        let target = OutgoingTarget::Fixed(TopicRef::Reply(reply_handle));
        self.enqueue(slot, target, Qos::AtMostOnce, 0, payload);
        Ok(())
    }

    /// A free outgoing slot for a publish of `qos`. A QoS 1 publish also
    /// waits while its msg id would be [`MSG_ID_SPAN_MAX`] or more past an
    /// unacknowledged one (restored ones included).
    fn outgoing_slot(&self, qos: Qos) -> Result<usize, ClientError> {
        let mut free = None;
        for (slot, entry) in self.outgoing.iter().enumerate() {
            match entry {
                None => free = free.or(Some(slot)),
                Some(out) => {
                    // Ids count up and wrap past 0: the distance is at
                    // most one too large across the wrap, never too small.
                    if qos == Qos::AtLeastOnce
                        && out.qos == Qos::AtLeastOnce
                        && self.next_msg_id.wrapping_sub(out.msg_id) >= MSG_ID_SPAN_MAX
                    {
                        return Err(ClientError::InflightFull);
                    }
                }
            }
        }
        free.ok_or(ClientError::InflightFull)
    }

    /// Header, topic and msg id at their largest, then the payload.
    fn check_publish_len(&self, payload: &[u8]) -> Result<(), ClientError> {
        if 1 + 5 + 5 + payload.len() > BUF {
            return Err(ClientError::TooLarge);
        }
        Ok(())
    }

    fn enqueue(
        &mut self,
        slot: usize,
        target: OutgoingTarget,
        qos: Qos,
        msg_id: u32,
        payload: &[u8],
    ) {
        // Built in place: moving a heapless Vec copies its whole capacity.
        let out = self.outgoing[slot].insert(Outgoing {
            target,
            qos,
            msg_id,
            payload: Vec::new(),
            retry: Retry::now(),
        });
        // Fits: the caller checked the payload against BUF.
        let _ = out.payload.extend_from_slice(payload);
    }

    fn allocate_msg_id(&mut self) -> u32 {
        loop {
            let id = self.next_msg_id;
            self.next_msg_id = self.next_msg_id.checked_add(1).unwrap_or(1);
            if !self.msg_id_in_use(id) {
                return id;
            }
        }
    }

    fn msg_id_in_use(&self, id: u32) -> bool {
        self.outgoing.iter().flatten().any(|out| out.msg_id == id)
    }

    fn allocate_req_id(&mut self) -> u32 {
        let id = self.next_req_id;
        self.next_req_id = self.next_req_id.checked_add(1).unwrap_or(1);
        id
    }

    /// The topic-table slot for `subject`, starting a REGISTER if it is new.
    fn topic_for(&mut self, subject: &[u8]) -> Result<usize, ClientError> {
        let (slot, exists) = self.topic_slot(subject)?;
        if !exists {
            self.add_topic(slot, subject);
        }
        Ok(slot)
    }

    /// The slot holding `subject` (true), or a free one (false). The caller
    /// checked that `subject` fits `BUF`.
    fn topic_slot(&self, subject: &[u8]) -> Result<(usize, bool), ClientError> {
        if let Some(slot) = self.topics.iter().position(|entry| {
            entry
                .as_ref()
                .is_some_and(|entry| same_bytes(&entry.subject, subject))
        }) {
            return Ok((slot, true));
        }
        let slot = self
            .topics
            .iter()
            .position(Option::is_none)
            .ok_or(ClientError::TopicTableFull)?;
        Ok((slot, false))
    }

    /// Puts `subject` in the free `slot` and starts its REGISTER.
    fn add_topic(&mut self, slot: usize, subject: &[u8]) {
        let req_id = self.allocate_req_id();
        let entry = self.topics[slot].insert(TopicEntry {
            subject: Vec::new(),
            id: 0,
            registration: Some((req_id, Retry::now())),
            by_broker: false,
        });
        // Fits: publish checked 1 + 5 + subject ≤ BUF, a record ≤ BUF.
        let _ = entry.subject.extend_from_slice(subject);
    }

    /// Subscribes to a NATS filter; returns the request id its `Subscribed`
    /// event carries. Subscribing to a filter already held updates its QoS.
    pub fn subscribe(
        &mut self,
        filter: &[u8],
        max_qos: Qos,
        now_ms: u64,
    ) -> Result<u32, ClientError> {
        self.advance(now_ms);
        if filter.len() > SUBJECT_BYTES_MAX || 1 + 5 + filter.len() > BUF {
            return Err(ClientError::TooLarge);
        }
        let req_id = self.allocate_req_id();
        let pending = Some((SubscriptionOp::Subscribe, req_id, Retry::now()));
        if let Some(existing) = self.subscription_mut(filter) {
            existing.max_qos = max_qos;
            existing.pending = pending;
            return Ok(req_id);
        }
        let slot = self
            .subscriptions
            .iter()
            .position(Option::is_none)
            .ok_or(ClientError::SubscriptionTableFull)?;
        self.add_subscription(slot, filter, max_qos, pending);
        Ok(req_id)
    }

    /// Drops a subscription; returns the request id of its `Unsubscribed`
    /// event. A filter not held is sent anyway (the broker answers OK).
    pub fn unsubscribe(&mut self, filter: &[u8], now_ms: u64) -> Result<u32, ClientError> {
        self.advance(now_ms);
        if filter.len() > SUBJECT_BYTES_MAX || 1 + 5 + filter.len() > BUF {
            return Err(ClientError::TooLarge);
        }
        let req_id = self.allocate_req_id();
        let pending = Some((SubscriptionOp::Unsubscribe, req_id, Retry::now()));
        if let Some(existing) = self.subscription_mut(filter) {
            existing.pending = pending;
            return Ok(req_id);
        }
        let slot = self
            .subscriptions
            .iter()
            .position(Option::is_none)
            .ok_or(ClientError::SubscriptionTableFull)?;
        self.add_subscription(slot, filter, Qos::AtMostOnce, pending);
        Ok(req_id)
    }

    /// Fills the free `slot`; the caller checked `filter` against BUF.
    fn add_subscription(
        &mut self,
        slot: usize,
        filter: &[u8],
        max_qos: Qos,
        pending: Option<(SubscriptionOp, u32, Retry)>,
    ) {
        let sub = self.subscriptions[slot].insert(Subscription {
            filter: Vec::new(),
            max_qos,
            pending,
        });
        let _ = sub.filter.extend_from_slice(filter);
    }

    fn subscription_mut(&mut self, filter: &[u8]) -> Option<&mut Subscription<BUF>> {
        self.subscriptions
            .iter_mut()
            .flatten()
            .find(|sub| same_bytes(&sub.filter, filter))
    }

    /// Asks the broker to keep the session asleep for `sleep_s` seconds and
    /// buffer its messages. `Asleep` follows when the broker confirms; call
    /// [`Client::wake`] before `1.5 × sleep_s` to collect the messages.
    pub fn sleep(&mut self, sleep_s: u32, now_ms: u64) -> Result<(), ClientError> {
        self.advance(now_ms);
        if self.state != State::Established {
            return Err(ClientError::NotConnected);
        }
        self.state = State::AwaitingSleepAck { sleep_s };
        self.connect_retry = Retry::now();
        Ok(())
    }

    /// Wakes a sleeping session: PING, then the buffered messages arrive,
    /// then `WakeDone`. The session stays asleep afterwards; [`Client::connect`]
    /// makes it awake for good.
    pub fn wake(&mut self, now_ms: u64) -> Result<(), ClientError> {
        self.advance(now_ms);
        if self.state != State::Asleep {
            return Err(ClientError::NotConnected);
        }
        self.state = State::Waking;
        // Timeouts from before the sleep mean nothing now.
        self.rearm_requests();
        self.ping = Some(Retry::now());
        Ok(())
    }

    /// Ends the session (DISCONNECT at the next `poll_transmit`).
    pub fn disconnect(&mut self, now_ms: u64) {
        self.advance(now_ms);
        self.state = State::Closing;
    }

    // ---- inputs from the network and the clock ----

    /// One frame from the broker: a UDP datagram, a TCP frame without its
    /// prefix, or a deframed serial frame. A frame that does not decode is
    /// dropped, counted and returned as the error.
    ///
    /// With a key, a sealed frame is verified and checked against the
    /// broker's window first; a frame that fails, or an unsealed one other
    /// than ERROR UNKNOWN_SESSION, is dropped and counted in
    /// [`Stats::unverified_dropped`] (returning `Ok`).
    pub fn handle_input(
        &mut self,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<(), perch_wire::DecodeError> {
        self.advance(now_ms);
        let Some(p) = self.protect.as_mut() else {
            return self.handle_frame(bytes);
        };
        if bytes.first() != Some(&protect::HEADER_FROM_BROKER) {
            // The one unsealed signal: it only makes us CONNECT again.
            if let Ok(Frame::Error {
                code: Code::UnknownSession,
                ..
            }) = perch_wire::decode_from_broker(bytes)
            {
                return self.handle_frame(bytes);
            }
            self.stats.unverified_dropped = self.stats.unverified_dropped.wrapping_add(1);
            return Ok(());
        }
        let mut plain = [0u8; BUF];
        let len = match protect::open_from_broker(&p.key.0, p.epoch, bytes, &mut plain) {
            Ok((envelope, frame))
                if p.broker_salt.is_none_or(|salt| salt == envelope.salt)
                    && p.broker_window.accept(0, envelope.counter).is_ok() =>
            {
                p.broker_salt = Some(envelope.salt);
                frame.len()
            }
            _ => {
                self.stats.unverified_dropped = self.stats.unverified_dropped.wrapping_add(1);
                return Ok(());
            }
        };
        self.handle_frame(&plain[..len])
    }

    fn handle_frame(&mut self, bytes: &[u8]) -> Result<(), perch_wire::DecodeError> {
        let frame = match perch_wire::decode_from_broker(bytes) {
            Ok(frame) => frame,
            Err(error) => {
                self.stats.malformed_frames = self.stats.malformed_frames.wrapping_add(1);
                return Err(error);
            }
        };
        match frame {
            Frame::Connack {
                session_present,
                code,
                session_token,
            } => self.on_connack(session_present, code, session_token),
            Frame::Error {
                code: Code::UnknownSession,
                ..
            } => {
                // Our address is unknown to the broker (NAT rebinding, or the
                // session expired): resume if we can, else connect afresh.
                if self.in_session() || self.state == State::Asleep {
                    let resume = self.session_token != 0;
                    self.start_connect(resume);
                }
            }
            Frame::Error {
                code,
                ref_type,
                ref_id,
            } => self.event(PendingEvent::Error {
                code,
                ref_type,
                ref_id,
            }),
            // Asleep again after a wake's PONG, the broker may still send
            // the deliveries it held for a REGACK, and their REGISTERs: they
            // are taken and acknowledged (the acks go out while asleep).
            _ if !(self.in_session()
                || (self.state == State::Asleep
                    && matches!(frame, Frame::Deliver { .. } | Frame::Register { .. }))) => {}
            Frame::Deliver {
                qos,
                topic,
                reply_handle,
                msg_id,
                payload,
            } => self.on_deliver(qos, topic, reply_handle, msg_id, payload),
            Frame::Register { id, subject } => self.on_broker_register(id, subject),
            Frame::Regack {
                req_id,
                topic,
                code,
            } => self.on_regack(req_id, topic, code),
            Frame::Puback { msg_id, code } => self.on_puback(msg_id, code),
            Frame::Suback { req_id, code } => {
                self.on_subscription_ack(req_id, code, SubscriptionOp::Subscribe)
            }
            Frame::Unsuback { req_id, code } => {
                self.on_subscription_ack(req_id, code, SubscriptionOp::Unsubscribe)
            }
            Frame::Pong => {
                self.ping = None;
                if self.state == State::Waking {
                    self.state = State::Asleep;
                    self.event(PendingEvent::WakeDone);
                }
            }
            Frame::Disconnect { .. } => {
                if let State::AwaitingSleepAck { .. } = self.state {
                    self.state = State::Asleep;
                    self.ping = None;
                    self.event(PendingEvent::Asleep);
                } else {
                    self.lose(DisconnectReason::ByBroker);
                }
            }
            // Only a device sends these; decode_from_broker refuses them.
            Frame::Connect { .. }
            | Frame::Publish { .. }
            | Frame::PublishAnonymous { .. }
            | Frame::Subscribe { .. }
            | Frame::Unsubscribe { .. }
            | Frame::Ping
            | Frame::Resume { .. } => {}
        }
        Ok(())
    }

    /// States in which the broker's session frames are meaningful.
    fn in_session(&self) -> bool {
        matches!(
            self.state,
            State::Established | State::Waking | State::AwaitingSleepAck { .. }
        )
    }

    fn on_connack(&mut self, session_present: bool, code: Code, session_token: u32) {
        let State::AwaitingConnack { resume } = self.state else {
            return;
        };
        match code {
            Code::Ok => {}
            Code::UnknownSession if resume => return self.start_connect(false),
            Code::NotPermitted | Code::UnsupportedVersion => {
                self.state = State::Closed;
                return self.event(PendingEvent::Disconnected {
                    reason: DisconnectReason::Refused(code),
                });
            }
            _ => {
                self.event(PendingEvent::Disconnected {
                    reason: DisconnectReason::Refused(code),
                });
                return self.backoff();
            }
        }
        self.state = State::Established;
        self.connected_once = true;
        self.session_token = session_token;
        self.reconnect_backoff_ms = self.config.reconnect_backoff_min_ms;
        self.ping = None;
        self.last_sent_ms = self.now_ms;
        self.rearm_requests();
        if !session_present {
            self.forget_session();
        }
        self.event(PendingEvent::Connected { session_present });
    }

    /// The broker has no state for us: drop what it registered, register and
    /// subscribe again, fail replies (their handles died with the session).
    fn forget_session(&mut self) {
        self.seen_msg_ids.clear();
        for entry in &mut self.topics {
            let Some(topic) = entry else { continue };
            if topic.by_broker {
                *entry = None;
            } else {
                topic.id = 0;
                let req_id = self.next_req_id;
                self.next_req_id = self.next_req_id.checked_add(1).unwrap_or(1);
                topic.registration = Some((req_id, Retry::now()));
            }
        }
        for entry in &mut self.subscriptions {
            let Some(sub) = entry else { continue };
            match sub.pending {
                Some((SubscriptionOp::Unsubscribe, req_id, _)) => {
                    let event = PendingEvent::Unsubscribed {
                        req_id,
                        code: Code::Ok,
                    };
                    *entry = None;
                    push_event(&mut self.events, &mut self.stats, event);
                }
                Some((SubscriptionOp::Subscribe, req_id, _)) => {
                    sub.pending = Some((SubscriptionOp::Subscribe, req_id, Retry::now()))
                }
                None => {
                    let req_id = self.next_req_id;
                    self.next_req_id = self.next_req_id.checked_add(1).unwrap_or(1);
                    sub.pending = Some((SubscriptionOp::Subscribe, req_id, Retry::now()));
                }
            }
        }
        for entry in &mut self.outgoing {
            let Some(out) = entry else { continue };
            if matches!(out.target, OutgoingTarget::Fixed(TopicRef::Reply(_))) {
                let event = PendingEvent::PublishFailed {
                    msg_id: out.msg_id,
                    code: Code::UnknownSession,
                };
                *entry = None;
                push_event(&mut self.events, &mut self.stats, event);
            }
        }
    }

    fn on_deliver(
        &mut self,
        qos: Qos,
        topic: TopicRef,
        reply_handle: Option<u32>,
        msg_id: u32,
        payload: &[u8],
    ) {
        let topic_slot = match topic {
            TopicRef::Registered(id) => {
                let slot = self.topics.iter().position(|entry| {
                    entry
                        .as_ref()
                        .is_some_and(|entry| entry.id == id && entry.registration.is_none())
                });
                if slot.is_none() {
                    match qos {
                        Qos::AtLeastOnce => self.ack(Ack::Puback {
                            msg_id,
                            code: Code::UnknownTopic,
                        }),
                        Qos::AtMostOnce => self.count_dropped(),
                    }
                    return;
                }
                slot
            }
            _ => None,
        };
        if qos == Qos::AtLeastOnce && self.seen_msg_ids.iter().any(|&seen| seen == msg_id) {
            self.stats.duplicates = self.stats.duplicates.wrapping_add(1);
            return self.ack(Ack::Puback {
                msg_id,
                code: Code::Ok,
            });
        }
        let room = (self.inbox.is_none() || self.inbox_polled) && !self.events.is_full();
        let fits = payload.len() <= BUF;
        if !room || !fits {
            match (qos, fits) {
                // Unacknowledged: the broker retransmits once we have room.
                (Qos::AtLeastOnce, true) => {}
                (Qos::AtLeastOnce, false) => self.ack(Ack::Puback {
                    msg_id,
                    code: Code::TooLarge,
                }),
                (Qos::AtMostOnce, _) => self.count_dropped(),
            }
            return;
        }
        let inbox = self.inbox.insert(Inbox {
            topic,
            topic_slot,
            payload: Vec::new(),
            reply_handle,
        });
        let _ = inbox.payload.extend_from_slice(payload); // checked: fits
        self.inbox_polled = false;
        self.event(PendingEvent::Message);
        if qos == Qos::AtLeastOnce {
            if self.seen_msg_ids.is_full() {
                self.seen_msg_ids.pop_front();
            }
            let _ = self.seen_msg_ids.push_back(msg_id);
            self.ack(Ack::Puback {
                msg_id,
                code: Code::Ok,
            });
        }
    }

    fn on_broker_register(&mut self, id: u32, subject: &[u8]) {
        if subject.len() > BUF {
            return self.ack(Ack::Regack {
                topic: id,
                code: Code::TooLarge,
            });
        }
        let existing = self.topics.iter().position(|entry| {
            entry
                .as_ref()
                .is_some_and(|entry| entry.id == id && entry.registration.is_none())
        });
        let slot = existing.or_else(|| self.topics.iter().position(Option::is_none));
        let Some(slot) = slot else {
            return self.ack(Ack::Regack {
                topic: id,
                code: Code::NoResources,
            });
        };
        // A retransmitted REGISTER of a subject we have since published to
        // leaves it ours (see `publish`).
        let by_broker = self.topics[slot]
            .as_ref()
            .is_none_or(|topic| topic.by_broker);
        let topic = self.topics[slot].insert(TopicEntry {
            subject: Vec::new(),
            id,
            registration: None,
            by_broker,
        });
        let _ = topic.subject.extend_from_slice(subject); // checked: fits
        self.ack(Ack::Regack {
            topic: id,
            code: Code::Ok,
        });
    }

    fn on_regack(&mut self, req_id: u32, topic: u32, code: Code) {
        let Some(slot) = self.topics.iter().position(|entry| {
            entry
                .as_ref()
                .is_some_and(|entry| matches!(entry.registration, Some((id, _)) if id == req_id))
        }) else {
            return;
        };
        if code == Code::Ok && topic != 0 {
            let entry = self.topics[slot].as_mut().expect("found above");
            entry.id = topic;
            entry.registration = None;
            return;
        }
        self.topics[slot] = None;
        for index in 0..INFLIGHT {
            let Some(out) = &self.outgoing[index] else {
                continue;
            };
            if matches!(out.target, OutgoingTarget::Topic(s) if s == slot) {
                let msg_id = out.msg_id;
                self.release(index);
                self.event(PendingEvent::PublishFailed { msg_id, code });
            }
        }
    }

    fn on_puback(&mut self, msg_id: u32, code: Code) {
        let Some(slot) = self.outgoing.iter().position(|entry| {
            entry.as_ref().is_some_and(|out| {
                out.qos == Qos::AtLeastOnce && out.msg_id == msg_id && out.retry.attempts > 0
            })
        }) else {
            return;
        };
        self.release(slot);
        self.event(match code {
            Code::Ok => PendingEvent::PublishAcked { msg_id },
            code => PendingEvent::PublishFailed { msg_id, code },
        });
    }

    fn on_subscription_ack(&mut self, req_id: u32, code: Code, op: SubscriptionOp) {
        let Some(entry) = self.subscriptions.iter_mut().find(|entry| {
            entry.as_ref().is_some_and(
                |sub| matches!(sub.pending, Some((o, id, _)) if o == op && id == req_id),
            )
        }) else {
            return;
        };
        let sub = entry.as_mut().expect("found above");
        sub.pending = None;
        if op == SubscriptionOp::Unsubscribe || code != Code::Ok {
            *entry = None;
        }
        self.event(match op {
            SubscriptionOp::Subscribe => PendingEvent::Subscribed { req_id, code },
            SubscriptionOp::Unsubscribe => PendingEvent::Unsubscribed { req_id, code },
        });
    }

    /// Time passed: retransmit, send keepalive PINGs, reconnect.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.advance(now_ms);
        if S::PERSISTENT && self.unremoved != 0 {
            for slot in 0..INFLIGHT {
                if self.unremoved & (1 << slot) != 0 && self.outgoing[slot].is_none() {
                    self.remove_record(slot);
                }
            }
        }
        let now = self.now_ms;
        let retries_max = self.config.retries_max;
        match self.state {
            State::Idle | State::Asleep | State::Closing | State::Closed => return,
            State::Reconnecting { at_ms } => {
                // CONNECT without clean_session, not RESUME: it also finds a
                // session the broker kept across its own restart.
                if now >= at_ms {
                    self.start_connect(false);
                }
                return;
            }
            State::AwaitingConnack { .. } | State::AwaitingSleepAck { .. } => {
                if self.connect_retry.on_timeout(now, retries_max).is_err() {
                    self.lose(DisconnectReason::Timeout);
                }
                return;
            }
            State::Established | State::Waking => {}
        }
        // Plain loops rather than one chained iterator: less code.
        let mut lost = false;
        for topic in self.topics.iter_mut().flatten() {
            if let Some((_, retry)) = &mut topic.registration {
                lost |= retry.on_timeout(now, retries_max).is_err();
            }
        }
        for sub in self.subscriptions.iter_mut().flatten() {
            if let Some((_, _, retry)) = &mut sub.pending {
                lost |= retry.on_timeout(now, retries_max).is_err();
            }
        }
        for out in self.outgoing.iter_mut().flatten() {
            if out.qos == Qos::AtLeastOnce {
                lost |= out.retry.on_timeout(now, retries_max).is_err();
            }
        }
        if let Some(retry) = &mut self.ping {
            lost |= retry.on_timeout(now, retries_max).is_err();
        }
        if lost {
            return self.lose(DisconnectReason::Timeout);
        }
        if self.state == State::Established && self.ping.is_none() {
            if let Some(due) = self.keepalive_due_ms() {
                if now >= due {
                    self.ping = Some(Retry::now());
                }
            }
        }
    }

    fn keepalive_due_ms(&self) -> Option<u64> {
        (self.config.keepalive_s > 0).then(|| {
            self.last_sent_ms
                .saturating_add(u64::from(self.config.keepalive_s) * 1000)
        })
    }

    /// The connection is gone: tell the application, wait out the backoff,
    /// and make every pending request due again for the next session.
    fn lose(&mut self, reason: DisconnectReason) {
        self.stats.connections_lost = self.stats.connections_lost.wrapping_add(1);
        self.event(PendingEvent::Disconnected { reason });
        self.backoff();
    }

    fn backoff(&mut self) {
        self.state = State::Reconnecting {
            at_ms: self
                .now_ms
                .saturating_add(u64::from(self.reconnect_backoff_ms)),
        };
        self.reconnect_backoff_ms = self
            .reconnect_backoff_ms
            .saturating_mul(2)
            .min(self.config.reconnect_backoff_max_ms);
        self.rearm_requests();
    }

    /// Every unanswered request is sent again at once, with fresh retries
    /// (after a reconnect or RESUME the old timeouts mean nothing).
    fn rearm_requests(&mut self) {
        self.ping = None;
        for topic in self.topics.iter_mut().flatten() {
            if let Some((_, retry)) = &mut topic.registration {
                *retry = Retry::now();
            }
        }
        for sub in self.subscriptions.iter_mut().flatten() {
            if let Some((_, _, retry)) = &mut sub.pending {
                *retry = Retry::now();
            }
        }
        for out in self.outgoing.iter_mut().flatten() {
            out.retry = Retry::now();
        }
    }

    // ---- outputs ----

    /// The earliest time at which [`Client::handle_timeout`] has work.
    /// `None`: nothing is scheduled (idle, asleep or closed).
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.state {
            State::Idle | State::Asleep | State::Closing | State::Closed => None,
            State::Reconnecting { at_ms } => Some(at_ms),
            State::AwaitingConnack { .. } | State::AwaitingSleepAck { .. } => {
                self.connect_retry.deadline()
            }
            State::Established | State::Waking => {
                let topics =
                    self.topics.iter().flatten().filter_map(|topic| {
                        topic.registration.and_then(|(_, retry)| retry.deadline())
                    });
                let subs = self
                    .subscriptions
                    .iter()
                    .flatten()
                    .filter_map(|sub| sub.pending.and_then(|(_, _, retry)| retry.deadline()));
                let outgoing = self
                    .outgoing
                    .iter()
                    .flatten()
                    .filter(|out| out.qos == Qos::AtLeastOnce)
                    .filter_map(|out| out.retry.deadline());
                let ping = self.ping.and_then(|retry| retry.deadline());
                let keepalive = match (self.state, self.ping) {
                    (State::Established, None) => self.keepalive_due_ms(),
                    _ => None,
                };
                topics
                    .chain(subs)
                    .chain(outgoing)
                    .chain(ping)
                    .chain(keepalive)
                    .min()
            }
        }
    }

    /// Writes the next frame to send into `out` and returns its length, or
    /// `None` when there is nothing to send. `out` should hold `BUF` bytes: a
    /// frame that does not fit stays queued.
    ///
    /// With a key the frame is sealed: `out` then needs room for the
    /// envelope too (`BUF` + [`protect::DEVICE_OVERHEAD_BYTES_MAX`]).
    pub fn poll_transmit(&mut self, out: &mut [u8]) -> Option<usize> {
        let next = self.next_transmit()?;
        let len = match self.protect.is_some() {
            false => self.encode_next(next, out)?,
            true => {
                let mut plain = [0u8; BUF];
                let len = self.encode_next(next, &mut plain)?;
                self.seal(&plain[..len], out)?
            }
        };
        self.mark_sent(next);
        Some(len)
    }

    /// Seals `frame` with the next counter of this epoch into `out`.
    fn seal(&mut self, frame: &[u8], out: &mut [u8]) -> Option<usize> {
        let p = self.protect.as_mut()?;
        // Counters run out after 2^32 - 1 frames: the next CONNECT (a new
        // epoch) starts them again.
        let counter = p.counter.checked_add(1)?;
        let envelope = protect::DeviceEnvelope {
            client_id: &self.config.client_id,
            epoch: p.epoch,
            counter,
        };
        let len = protect::seal_from_device(&p.key.0, &envelope, frame, out).ok()?;
        p.counter = counter;
        Some(len)
    }

    fn next_transmit(&self) -> Option<Next> {
        match self.state {
            State::Idle | State::Closed | State::Reconnecting { .. } => None,
            // Acks for messages that arrived just before the PONG.
            State::Asleep => (!self.acks.is_empty()).then_some(Next::Ack),
            State::AwaitingConnack { resume } => {
                self.connect_retry
                    .due
                    .then_some(if resume { Next::Resume } else { Next::Connect })
            }
            State::AwaitingSleepAck { sleep_s } => {
                self.connect_retry.due.then_some(Next::Sleep(sleep_s))
            }
            State::Closing => Some(Next::Disconnect),
            State::Established | State::Waking => {
                if !self.acks.is_empty() {
                    return Some(Next::Ack);
                }
                if let Some(slot) = self.topics.iter().position(|entry| {
                    entry.as_ref().is_some_and(
                        |topic| matches!(topic.registration, Some((_, retry)) if retry.due),
                    )
                }) {
                    return Some(Next::Register(slot));
                }
                if let Some(slot) = self.subscriptions.iter().position(|entry| {
                    entry
                        .as_ref()
                        .is_some_and(|sub| matches!(sub.pending, Some((_, _, retry)) if retry.due))
                }) {
                    return Some(Next::Subscription(slot));
                }
                if let Some(slot) = self.outgoing.iter().position(|entry| {
                    entry
                        .as_ref()
                        .is_some_and(|out| out.retry.due && self.resolve(out.target).is_some())
                }) {
                    return Some(Next::Publish(slot));
                }
                self.ping
                    .is_some_and(|retry| retry.due)
                    .then_some(Next::Ping)
            }
        }
    }

    /// The wire topic of a publish target, once its topic is bound.
    fn resolve(&self, target: OutgoingTarget) -> Option<TopicRef> {
        match target {
            OutgoingTarget::Fixed(topic) => Some(topic),
            OutgoingTarget::Topic(slot) => {
                let topic = self.topics[slot].as_ref()?;
                (topic.registration.is_none() && topic.id != 0)
                    .then_some(TopicRef::Registered(topic.id))
            }
        }
    }

    /// Writes the frame for `next` with the wire crate's per-frame encoders
    /// (so only the encoders of frames a device sends are linked). `None`
    /// if it does not fit `out`.
    fn encode_next(&self, next: Next, out: &mut [u8]) -> Option<usize> {
        let written = match next {
            Next::Connect => encode::connect(
                out,
                perch_wire::PROTOCOL_VERSION,
                self.config.clean_session && !self.connected_once,
                self.config.keepalive_s,
                &self.config.client_id,
                None,
            ),
            Next::Resume => encode::resume(out, self.session_token),
            Next::Ack => match *self.acks.front().expect("next_transmit saw an ack") {
                Ack::Puback { msg_id, code } => encode::puback(out, msg_id, code),
                Ack::Regack { topic, code } => {
                    let bound = if code == Code::Ok { topic } else { 0 };
                    encode::regack(out, topic, bound, code)
                }
            },
            Next::Register(slot) => {
                let topic = self.topics[slot].as_ref().expect("next_transmit saw it");
                let (req_id, _) = topic.registration.expect("next_transmit saw it");
                encode::register(out, req_id, &topic.subject)
            }
            Next::Subscription(slot) => {
                let sub = self.subscriptions[slot]
                    .as_ref()
                    .expect("next_transmit saw it");
                match sub.pending.expect("next_transmit saw it") {
                    (SubscriptionOp::Subscribe, req_id, _) => {
                        encode::subscribe(out, req_id, sub.max_qos, &sub.filter)
                    }
                    (SubscriptionOp::Unsubscribe, req_id, _) => {
                        encode::unsubscribe(out, req_id, &sub.filter)
                    }
                }
            }
            Next::Publish(slot) => {
                let publish = self.outgoing[slot].as_ref().expect("next_transmit saw it");
                let topic = self
                    .resolve(publish.target)
                    .expect("next_transmit resolved it");
                encode::publish(out, publish.qos, topic, publish.msg_id, &publish.payload)
            }
            Next::Ping => encode::ping(out),
            Next::Sleep(sleep_s) => encode::disconnect(out, Some(sleep_s)),
            Next::Disconnect => encode::disconnect(out, None),
        };
        written.ok()
    }

    fn mark_sent(&mut self, next: Next) {
        let (now, interval) = (self.now_ms, self.config.retry_interval_ms);
        self.last_sent_ms = now;
        match next {
            Next::Connect | Next::Resume | Next::Sleep(_) => self.connect_retry.sent(now, interval),
            Next::Ack => {
                self.acks.pop_front();
            }
            Next::Register(slot) => {
                if let Some(Some(TopicEntry {
                    registration: Some((_, retry)),
                    ..
                })) = self.topics.get_mut(slot)
                {
                    retry.sent(now, interval);
                }
            }
            Next::Subscription(slot) => {
                if let Some(Some(Subscription {
                    pending: Some((_, _, retry)),
                    ..
                })) = self.subscriptions.get_mut(slot)
                {
                    retry.sent(now, interval);
                }
            }
            Next::Publish(slot) => {
                let entry = &mut self.outgoing[slot];
                match entry {
                    Some(out) if out.qos == Qos::AtLeastOnce => out.retry.sent(now, interval),
                    _ => *entry = None, // QoS 0: sent once, done.
                }
            }
            Next::Ping => {
                if let Some(retry) = &mut self.ping {
                    retry.sent(now, interval);
                }
            }
            Next::Disconnect => {
                self.state = State::Closed;
                self.event(PendingEvent::Disconnected {
                    reason: DisconnectReason::Closed,
                });
            }
        }
    }

    /// The next event, if any. A `Message` borrows the client until the next
    /// call that takes `&mut self`.
    pub fn poll_event(&mut self) -> Option<Event<'_>> {
        let pending = self.events.pop_front()?;
        Some(match pending {
            PendingEvent::Connected { session_present } => Event::Connected { session_present },
            PendingEvent::Message => {
                // Handed out: the next delivery may overwrite it, which needs
                // `&mut self` and so waits for this borrow to end.
                self.inbox_polled = true;
                let inbox = self
                    .inbox
                    .as_ref()
                    .expect("a Message event has its inbox filled");
                let subject = inbox
                    .topic_slot
                    .and_then(|slot| self.topics[slot].as_ref())
                    .map(|topic| topic.subject.as_slice());
                Event::Message {
                    topic: inbox.topic,
                    subject,
                    payload: &inbox.payload,
                    reply_handle: inbox.reply_handle,
                }
            }
            PendingEvent::PublishAcked { msg_id } => Event::PublishAcked { msg_id },
            PendingEvent::PublishFailed { msg_id, code } => Event::PublishFailed { msg_id, code },
            PendingEvent::Subscribed { req_id, code } => Event::Subscribed { req_id, code },
            PendingEvent::Unsubscribed { req_id, code } => Event::Unsubscribed { req_id, code },
            PendingEvent::Error {
                code,
                ref_type,
                ref_id,
            } => Event::Error {
                code,
                ref_type,
                ref_id,
            },
            PendingEvent::Asleep => Event::Asleep,
            PendingEvent::WakeDone => Event::WakeDone,
            PendingEvent::Disconnected { reason } => Event::Disconnected { reason },
        })
    }

    fn event(&mut self, event: PendingEvent) {
        push_event(&mut self.events, &mut self.stats, event);
    }

    fn count_dropped(&mut self) {
        self.stats.messages_dropped = self.stats.messages_dropped.wrapping_add(1);
    }

    fn ack(&mut self, ack: Ack) {
        if self.acks.push_back(ack).is_err() {
            self.stats.acks_dropped = self.stats.acks_dropped.wrapping_add(1);
        }
    }
}

/// `a == b` for subjects, as a loop: the only comparisons of byte strings in
/// the client, and short, so not worth linking `memcmp`.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// Zeroed counters, built out of line: inlined, the zeroing lands in the
/// 8-aligned client and links `__aeabi_memclr8` (174 bytes) just for it.
#[inline(never)]
fn no_stats() -> Stats {
    Stats::default()
}

// Out of line: a `Deque` push at each of a dozen call sites is large.
#[inline(never)]
fn push_event(
    events: &mut Deque<PendingEvent, EVENTS_MAX>,
    stats: &mut Stats,
    event: PendingEvent,
) {
    if events.push_back(event).is_err() {
        stats.events_dropped = stats.events_dropped.wrapping_add(1);
    }
}
