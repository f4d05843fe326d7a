//! One JetStream consumer over one stream, sans IO: which stored messages it delivers,
//! to whom, and what it remembers about them — nats-server 2.9.10's consumer engine.
//!
//! Owns: create-time validation and defaults (the reference's exact errors), the start
//! position of each deliver policy, the filter, the delivery cursor and the backlog of
//! matching messages not yet delivered, the pending (unacknowledged) set with its
//! redelivery deadlines (ack_wait or backoff), redelivery counts and max_deliver, the
//! ack floor of the three ack policies, max_ack_pending, the queue of waiting pull
//! requests with their status replies (404, 408, 409, 100), push delivery while the
//! runtime reports interest, idle heartbeats, flow control, and the consumer's durable
//! state (one CRC-32C file replaced atomically, as `store/floor.rs` does).
//!
//! The runtime owns the consumer and its stream side by side and drives it: after a
//! stream commit, purge or delete, an ack, a pull request or a change of push interest
//! it calls [`Consumer::poll`], and it calls it again at [`Consumer::next_deadline`].
//! Time is always an argument (`now_ns`); nothing here reads the clock, touches a
//! socket, or holds on to the stream between calls. Counts (`num_pending`) are as of
//! the last `poll`: it notices appends by comparing the stream's state with what it saw,
//! so it costs next to nothing when nothing changed. A stream change that leaves holes
//! in the middle re-checks the backlog (O(backlog)).
//!
//! Deliberately does not: parse API subjects or bodies beyond the create-subject rules
//! (the API layer does), know other consumers (max_consumers, work-queue overlaps, name
//! collisions are the API layer's), check that a pull request's reply subject still has
//! interest (requests without `expires` wait until the consumer is deleted), replay at
//! the original pace, rate-limit, sample acks or send advisories. Consumer state is
//! only saved when the owner calls [`Consumer::save_state`].

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::api::{
    errors, AckKind, AckPolicy, AckSubject, ApiError, ConsumerConfig, ConsumerInfo, DeliverPolicy,
    KnownError, NextRequest, PullStatus, RetentionPolicy, SequenceInfo, StreamConfig, StreamState,
    Timestamp,
};
use super::stream::{ReadError, StoredMessage, Stream};
use crate::nats::subject::{is_valid_subject, subject_matches};
use crate::store::file::{read_if_present, replace_atomically};
use crate::store::{Directory, StoreError};

/// nats-server 2.9.10's consumer-create errors that the captured fixtures do not show,
/// with the texts of its `errors.json` (the observed ones live in `api::errors`).
pub mod create_errors {
    use crate::jetstream::api::errors::known;
    use crate::jetstream::api::KnownError;

    pub const NAME_EXISTS: KnownError = known(400, 10013, "consumer name already in use");
    pub const MAX_CONSUMERS_REACHED: KnownError =
        known(400, 10026, "maximum consumers limit reached");
    pub const DURABLE_NAME_NOT_SET: KnownError = known(
        400,
        10018,
        "consumer expected to be durable but a durable name was not set",
    );
    pub const EPHEMERAL_WITH_DURABLE_NAME: KnownError = known(
        400,
        10020,
        "consumer expected to be ephemeral but a durable name was set in request",
    );
    pub const DELIVER_TO_WILDCARDS: KnownError =
        known(400, 10079, "consumer deliver subject has wildcards");
    pub const PUSH_MAX_WAITING: KnownError =
        known(400, 10080, "consumer in push mode can not set max waiting");
    pub const DELIVER_CYCLE: KnownError =
        known(400, 10081, "consumer deliver subject forms a cycle");
    pub const MAX_PENDING_NEEDS_ACK_POLICY: KnownError = known(
        400,
        10082,
        "consumer requires ack policy for max ack pending",
    );
    pub const SMALL_HEARTBEAT: KnownError =
        known(400, 10083, "consumer idle heartbeat needs to be >= 100ms");
    pub const PULL_REQUIRES_ACK: KnownError =
        known(400, 10084, "consumer in pull mode requires ack policy");
    pub const PULL_WITH_RATE_LIMIT: KnownError = known(
        400,
        10086,
        "consumer in pull mode can not have rate limit set",
    );
    pub const MAX_WAITING_NEGATIVE: KnownError =
        known(400, 10087, "consumer max waiting needs to be positive");
    pub const HEARTBEAT_REQUIRES_PUSH: KnownError = known(
        400,
        10088,
        "consumer idle heartbeat requires a push based consumer",
    );
    pub const FLOW_CONTROL_REQUIRES_PUSH: KnownError = known(
        400,
        10089,
        "consumer flow control requires a push based consumer",
    );
    pub const FILTER_NOT_SUBSET: KnownError = known(
        400,
        10093,
        "consumer filter subject is not a valid subset of the interest subjects",
    );
    pub const WORKQUEUE_REQUIRES_EXPLICIT_ACK: KnownError =
        known(400, 10098, "workqueue stream requires explicit ack");
    pub const WORKQUEUE_NOT_DELIVER_ALL: KnownError = known(
        400,
        10101,
        "consumer must be deliver all on workqueue stream",
    );
    pub const BAD_DURABLE_NAME: KnownError =
        known(400, 10103, "durable name can not contain '.', '*', '>'");
    pub const FLOW_CONTROL_NEEDS_HEARTBEATS: KnownError = known(
        400,
        10108,
        "consumer with flow control also needs heartbeats",
    );
    pub const MAX_REQUEST_BATCH_NEGATIVE: KnownError =
        known(400, 10114, "consumer max request batch needs to be > 0");
    pub const MAX_REQUEST_EXPIRES_TOO_SMALL: KnownError = known(
        400,
        10115,
        "consumer max request expires needs to be >= 1ms",
    );
    pub const MAX_DELIVER_BACKOFF: KnownError = known(
        400,
        10116,
        "max deliver is required to be > length of backoff values",
    );
    pub const REPLICAS_EXCEED_STREAM: KnownError = known(
        400,
        10126,
        "consumer config replica count exceeds parent stream",
    );
    pub const FILTER_SUBJECT_MISMATCH: KnownError = known(
        400,
        10131,
        "Consumer create request did not match filtered subject from create subject",
    );
    pub const DURABLE_AND_NAME_MISMATCH: KnownError = known(
        400,
        10132,
        "Consumer Durable and Name have to be equal if both are provided",
    );
    pub const REPLICAS_NEGATIVE: KnownError =
        known(400, 10133, "replicas count cannot be negative");
}

use create_errors as ce;

const SECOND_NS: i64 = 1_000_000_000;
/// The reference's limits on names and descriptions (`JSMaxNameLen`, `JSMaxDescriptionLen`).
const NAME_LEN_MAX: usize = 255;
const DESCRIPTION_LEN_MAX: usize = 4096;
/// Push flow control: at most this many bytes in flight; the window starts at 1/16 of
/// it and doubles with every flow-control reply (`JsFlowControlMaxPending`).
const FLOW_CONTROL_BYTES_MAX: u64 = 32 << 20;
/// One `poll` delivers about this many bytes at most, then reports that it has more.
const POLL_BYTES_MAX: usize = 1 << 20;
/// The consumer state file's version (see [`Consumer::encode_state`]).
const STATE_VERSION: u32 = 1;

/// One message for the runtime to publish.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outbound {
    /// The subject to route on: the pull request's reply inbox, the push deliver
    /// subject, or a reply subject.
    pub route_to: Vec<u8>,
    /// The subject the client sees in MSG/HMSG: the stored message's own subject for a
    /// delivery, `route_to` for everything else.
    pub subject: Vec<u8>,
    /// Empty for none; a delivery's `$JS.ACK.…` subject.
    pub reply: Vec<u8>,
    /// Empty for none, else a whole `NATS/1.0` header block.
    pub headers: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Outbound {
    /// A header-only status message (a pull status, a heartbeat).
    fn status(to: &[u8], block: String) -> Outbound {
        Outbound {
            route_to: to.to_vec(),
            subject: to.to_vec(),
            headers: block.into_bytes(),
            ..Outbound::default()
        }
    }
}

/// A status header block the reference writes that `PullStatus` does not model.
fn status_block(code: u16, description: &str) -> String {
    format!("NATS/1.0 {code} {description}\r\n\r\n")
}

/// How a create request named its consumer, from its API subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateSubject<'a> {
    /// `$JS.API.CONSUMER.CREATE.<stream>`: the server names it.
    Ephemeral,
    /// `$JS.API.CONSUMER.CREATE.<stream>.<name>[.<filter>]`.
    Named {
        name: &'a str,
        filter: Option<&'a str>,
    },
    /// `$JS.API.CONSUMER.DURABLE.CREATE.<stream>.<durable>`.
    Durable(&'a str),
}

/// The reference's checks of a create request's body against its API subject, done
/// before the stream is looked up; the named form writes its name into the config.
pub fn check_create_subject(
    subject: CreateSubject<'_>,
    config: &mut ConsumerConfig,
) -> Result<(), ApiError> {
    match subject {
        CreateSubject::Durable(durable) => {
            if !config.is_durable() {
                return Err(ce::DURABLE_NAME_NOT_SET.into());
            }
            if config.durable_name != durable {
                return Err(errors::CONSUMER_NAME_MISMATCH.into());
            }
        }
        CreateSubject::Named { name, filter } => {
            if config.is_durable() && config.durable_name != name {
                return Err(errors::CONSUMER_NAME_MISMATCH.into());
            }
            config.name = name.to_owned();
            if filter.is_some_and(|filter| filter != config.filter_subject) {
                return Err(ce::FILTER_SUBJECT_MISMATCH.into());
            }
        }
        CreateSubject::Ephemeral => {
            if config.is_durable() {
                return Err(ce::EPHEMERAL_WITH_DURABLE_NAME.into());
            }
        }
    }
    Ok(())
}

/// Whether every subject `inner` matches is also matched by `outer` (both may hold
/// wildcards): nats-server's `subjectIsSubsetMatch`.
fn pattern_within(inner: &[u8], outer: &[u8]) -> bool {
    let mut inner = inner.split(|&b| b == b'.');
    let mut outer = outer.split(|&b| b == b'.');
    loop {
        match (inner.next(), outer.next()) {
            (None, None) => return true,
            (Some(_), Some(b">")) => return true,
            (Some(b">"), Some(_)) => return false,
            (Some(_), Some(b"*")) => {}
            (Some(b"*"), Some(_)) => return false,
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

fn has_wildcard(subject: &[u8]) -> bool {
    subject
        .split(|&b| b == b'.')
        .any(|token| token == b"*" || token == b">")
}

/// A name the reference accepts for a consumer (`isValidName`).
fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .bytes()
            .any(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n' | 0x0c | b'.' | b'*' | b'>'))
}

/// 10094 with its text: a deliver policy combined with the wrong start options.
fn invalid_policy(description: String) -> ApiError {
    ApiError {
        code: 400,
        err_code: errors::CONSUMER_START_SEQ_REQUIRED.err_code,
        description,
    }
}

fn templated(code: u16, err_code: u16, description: String) -> ApiError {
    ApiError {
        code,
        err_code,
        description,
    }
}

/// nats-server's `checkConsumerCfg` (and the stream-kind checks of `addConsumer`) on a
/// config that already has the server's defaults.
fn check_config(config: &ConsumerConfig, stream: &StreamConfig) -> Result<(), ApiError> {
    let fail = |error: KnownError| Err(error.into());
    if config.num_replicas > 0 && config.num_replicas > stream.num_replicas {
        return fail(ce::REPLICAS_EXCEED_STREAM);
    }
    if config.num_replicas < 0 {
        return fail(ce::REPLICAS_NEGATIVE);
    }
    if !config.backoff_ns.is_empty() && config.max_deliver <= config.backoff_ns.len() as i64 {
        return fail(ce::MAX_DELIVER_BACKOFF);
    }
    if config.description.len() > DESCRIPTION_LEN_MAX {
        return Err(templated(
            400,
            10107,
            format!("consumer description is too long, maximum allowed is {DESCRIPTION_LEN_MAX}"),
        ));
    }
    let deliver = config.deliver_subject.as_bytes();
    if !config.is_pull() {
        if has_wildcard(deliver) {
            return fail(ce::DELIVER_TO_WILDCARDS);
        }
        if !is_valid_subject(deliver) {
            return Err(templated(
                400,
                10112,
                "invalid push consumer deliver subject".into(),
            ));
        }
        if stream
            .subjects
            .iter()
            .any(|subject| pattern_within(deliver, subject.as_bytes()))
        {
            return fail(ce::DELIVER_CYCLE);
        }
        if config.max_waiting != 0 {
            return fail(ce::PUSH_MAX_WAITING);
        }
        if config.max_ack_pending > 0 && config.ack_policy == AckPolicy::None {
            return fail(ce::MAX_PENDING_NEEDS_ACK_POLICY);
        }
        if config.idle_heartbeat_ns > 0 && config.idle_heartbeat_ns < SECOND_NS / 10 {
            return fail(ce::SMALL_HEARTBEAT);
        }
    } else {
        if config.ack_policy == AckPolicy::None && stream.retention == RetentionPolicy::Workqueue {
            return fail(ce::PULL_REQUIRES_ACK);
        }
        if config.rate_limit_bps > 0 {
            return fail(ce::PULL_WITH_RATE_LIMIT);
        }
        if config.max_waiting < 0 {
            return fail(ce::MAX_WAITING_NEGATIVE);
        }
        if config.idle_heartbeat_ns > 0 {
            return fail(ce::HEARTBEAT_REQUIRES_PUSH);
        }
        if config.flow_control {
            return fail(ce::FLOW_CONTROL_REQUIRES_PUSH);
        }
        if config.max_batch < 0 {
            return fail(ce::MAX_REQUEST_BATCH_NEGATIVE);
        }
        if config.max_expires_ns != 0 && config.max_expires_ns < SECOND_NS / 1000 {
            return fail(ce::MAX_REQUEST_EXPIRES_TOO_SMALL);
        }
    }
    let filter = config.filter_subject.as_bytes();
    if !filter.is_empty() {
        let valid = is_valid_subject(filter)
            && stream.subjects.iter().any(|subject| {
                pattern_within(filter, subject.as_bytes())
                    || (has_wildcard(filter) && pattern_within(subject.as_bytes(), filter))
            });
        if !valid {
            return fail(ce::FILTER_NOT_SUBSET);
        }
    }
    check_start_options(config)?;
    if !config.sample_freq.is_empty() {
        let text = config.sample_freq.trim_end_matches('%');
        let reason = match text.parse::<i64>() {
            Ok(value) if value >= 0 => None,
            Ok(_) => Some("<nil>".to_owned()),
            Err(_) => Some(format!("strconv.Atoi: parsing {text:?}: invalid syntax")),
        };
        if let Some(reason) = reason {
            return Err(templated(
                400,
                10095,
                format!("failed to parse consumer sampling configuration: {reason}"),
            ));
        }
    }
    if config.flow_control && config.idle_heartbeat_ns == 0 {
        return fail(ce::FLOW_CONTROL_NEEDS_HEARTBEATS);
    }
    if config.is_durable() && !config.name.is_empty() && config.name != config.durable_name {
        return fail(ce::DURABLE_AND_NAME_MISMATCH);
    }
    if stream.retention == RetentionPolicy::Workqueue {
        if config.ack_policy != AckPolicy::Explicit {
            return fail(ce::WORKQUEUE_REQUIRES_EXPLICIT_ACK);
        }
        if config.deliver_policy != DeliverPolicy::All {
            return fail(ce::WORKQUEUE_NOT_DELIVER_ALL);
        }
    }
    Ok(())
}

/// The deliver policy against opt_start_seq / opt_start_time / filter_subject.
fn check_start_options(config: &ConsumerConfig) -> Result<(), ApiError> {
    let also_set = |policy: &str, option: &str| {
        Err(invalid_policy(format!(
            "consumer delivery policy is deliver {policy}, but optional start {option} is also set"
        )))
    };
    let not_set = |policy: &str, option: &str| {
        Err(invalid_policy(format!(
            "consumer delivery policy is deliver {policy}, but optional {option} is not set"
        )))
    };
    let (seq, time) = (config.opt_start_seq > 0, config.opt_start_time.is_some());
    match config.deliver_policy {
        DeliverPolicy::All | DeliverPolicy::Last | DeliverPolicy::New => {
            let policy = match config.deliver_policy {
                DeliverPolicy::All => "all",
                DeliverPolicy::Last => "last",
                _ => "new",
            };
            if seq {
                return also_set(policy, "sequence");
            }
            if time {
                return also_set(policy, "time");
            }
        }
        DeliverPolicy::LastPerSubject => {
            if seq {
                return also_set("last per subject", "sequence");
            }
            if time {
                return also_set("last per subject", "time");
            }
            if config.filter_subject.is_empty() {
                return not_set("last per subject", "filter subject");
            }
        }
        DeliverPolicy::ByStartSequence => {
            if !seq {
                return not_set("by start sequence", "start sequence");
            }
            if time {
                return also_set("by start sequence", "time");
            }
        }
        DeliverPolicy::ByStartTime => {
            if !time {
                return not_set("by start time", "start time");
            }
            if seq {
                return also_set("by start time", "start sequence");
            }
        }
    }
    Ok(())
}

/// nats-server's `checkNewConsumerConfig`: why an existing consumer's config may not
/// become `new` (both with defaults), or `None` when it may.
fn update_refusal(old: &ConsumerConfig, new: &ConsumerConfig, bound: bool) -> Option<ApiError> {
    let reason = if old.deliver_policy != new.deliver_policy {
        "deliver policy can not be updated"
    } else if old.opt_start_seq != new.opt_start_seq {
        "start sequence can not be updated"
    } else if old.opt_start_time != new.opt_start_time {
        "start time can not be updated"
    } else if old.ack_policy != new.ack_policy {
        errors::ACK_POLICY_UPDATE_REASON
    } else if old.replay_policy != new.replay_policy {
        "replay policy can not be updated"
    } else if old.idle_heartbeat_ns != new.idle_heartbeat_ns {
        "heart beats can not be updated"
    } else if old.flow_control != new.flow_control {
        "flow control can not be updated"
    } else if old.max_waiting != new.max_waiting {
        "max waiting can not be updated"
    } else if old.deliver_subject != new.deliver_subject && old.is_pull() {
        "can not update pull consumer to push based"
    } else if old.deliver_subject != new.deliver_subject && new.is_pull() {
        "can not update push consumer to pull based"
    } else if old.deliver_subject != new.deliver_subject && bound {
        return Some(ce::NAME_EXISTS.into());
    } else if !new.backoff_ns.is_empty() && new.max_deliver <= new.backoff_ns.len() as i64 {
        return Some(ce::MAX_DELIVER_BACKOFF.into());
    } else {
        return None;
    };
    Some(ApiError::consumer_create_failed(reason))
}

/// A duration as Go's `time.Duration.String` writes it (`500ms`, `1.5s`, `1m30s`).
fn go_duration(ns: i64) -> String {
    if ns == 0 {
        return "0s".to_owned();
    }
    let n = ns.unsigned_abs();
    let with_fraction = |value: u64, unit: u64| {
        let (whole, rest) = (value / unit, value % unit);
        if rest == 0 {
            return whole.to_string();
        }
        let width = unit.ilog10() as usize;
        let fraction = format!("{rest:0width$}");
        format!("{whole}.{}", fraction.trim_end_matches('0'))
    };
    let text = if n < 1_000 {
        format!("{n}ns")
    } else if n < 1_000_000 {
        format!("{}µs", with_fraction(n, 1_000))
    } else if n < 1_000_000_000 {
        format!("{}ms", with_fraction(n, 1_000_000))
    } else {
        let seconds = with_fraction(n % 60_000_000_000, 1_000_000_000);
        let minutes = n / 60_000_000_000;
        match (minutes / 60, minutes % 60) {
            (0, 0) => format!("{seconds}s"),
            (0, m) => format!("{m}m{seconds}s"),
            (h, m) => format!("{h}h{m}m{seconds}s"),
        }
    };
    if ns < 0 {
        format!("-{text}")
    } else {
        text
    }
}

/// splitmix64: names and flow-control tokens need variety, not secrecy.
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// An ephemeral consumer's generated name: 8 characters, as nats-server 2.9 makes them.
pub fn ephemeral_name(seed: u64) -> String {
    let mut state = seed;
    (0..8)
        .map(|_| {
            state = mix(state);
            char::from(BASE62[(state % 62) as usize])
        })
        .collect()
}

/// Ascending stream sequences kept as runs, so a backlog of a whole unfiltered stream
/// costs a few words.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SeqRuns {
    /// `[start, end)` runs, ascending and not touching.
    runs: VecDeque<(u64, u64)>,
    len: u64,
}

impl SeqRuns {
    fn push(&mut self, seq: u64) {
        match self.runs.back_mut() {
            Some(last) if last.1 == seq => last.1 += 1,
            last => {
                assert!(
                    last.is_none_or(|run| run.1 < seq),
                    "sequences are pushed in order"
                );
                self.runs.push_back((seq, seq + 1));
            }
        }
        self.len += 1;
    }

    fn front(&self) -> Option<u64> {
        self.runs.front().map(|run| run.0)
    }

    fn pop_front(&mut self) {
        let run = self.runs.front_mut().expect("pop_front on a non-empty set");
        run.0 += 1;
        if run.0 == run.1 {
            self.runs.pop_front();
        }
        self.len -= 1;
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn remove_below(&mut self, seq: u64) {
        while let Some(run) = self.runs.front_mut() {
            if run.1 <= seq {
                self.len -= run.1 - run.0;
                self.runs.pop_front();
            } else {
                if run.0 < seq {
                    self.len -= seq - run.0;
                    run.0 = seq;
                }
                break;
            }
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) {
        let old = std::mem::take(self);
        for (start, end) in old.runs {
            for seq in start..end {
                if keep(seq) {
                    self.push(seq);
                }
            }
        }
    }

    /// Runs read back from a state file; `None` unless ascending and non-empty.
    fn from_runs(runs: Vec<(u64, u64)>) -> Option<SeqRuns> {
        let mut set = SeqRuns::default();
        let mut previous_end = 0;
        for (start, end) in runs {
            if start >= end || start <= previous_end {
                return None;
            }
            previous_end = end;
            set.len += end - start;
            set.runs.push_back((start, end));
        }
        Some(set)
    }
}

/// A delivered message not yet acknowledged, by stream sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PendingMsg {
    /// The consumer sequence of its first delivery (redeliveries keep it).
    consumer_seq: u64,
    /// When it is redelivered; `None` while it waits in the redelivery queue.
    deadline_ns: Option<i64>,
}

/// A pull request waiting for messages (nats-server's `waitingRequest`).
#[derive(Debug, Clone)]
struct PullRequest {
    reply: Vec<u8>,
    /// Messages still wanted.
    batch: i64,
    /// Bytes still allowed; 0 = no limit.
    max_bytes: i64,
    expires_ns: Option<i64>,
    no_wait: bool,
    /// Messages sent to it so far.
    delivered: u64,
    heartbeat_ns: i64,
    next_heartbeat_ns: Option<i64>,
}

impl PullRequest {
    fn expired(&self, now_ns: i64) -> bool {
        self.expires_ns.is_some_and(|expires| now_ns >= expires)
    }

    fn timeout_status(&self) -> PullStatus {
        PullStatus::RequestTimeout {
            pending_messages: self.batch.max(0) as u64,
            pending_bytes: self.max_bytes.max(0) as u64,
        }
    }
}

/// Push flow control: bytes sent since the client last answered a flow-control request.
#[derive(Debug, Clone)]
struct FlowControl {
    window: u64,
    in_flight: u64,
    /// The outstanding request's reply subject and the bytes its answer releases.
    outstanding: Option<(Vec<u8>, u64)>,
    requests_sent: u64,
}

impl FlowControl {
    fn new() -> FlowControl {
        FlowControl {
            window: FLOW_CONTROL_BYTES_MAX / 16,
            in_flight: 0,
            outstanding: None,
            requests_sent: 0,
        }
    }
}

/// Where the next message comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Redelivery,
    LastPerSubject,
    Backlog,
}

struct Candidate {
    source: Source,
    /// Which delivery of it this is (1 = first).
    count: u64,
    message: StoredMessage,
}

enum Next {
    Message(Candidate),
    MaxAckPending,
    End,
}

/// Why a consumer state file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The bytes are not a state this code wrote (CRC, version or shape).
    #[error("corrupt consumer state: {0}")]
    Corrupt(&'static str),
}

/// A consumer (see the module docs).
#[derive(Debug)]
pub struct Consumer {
    stream_name: String,
    name: String,
    config: ConsumerConfig,
    created_ns: i64,
    /// The next stream sequence to consider for a first delivery (`delivered.stream_seq + 1`).
    next_seq: u64,
    /// The consumer sequence of the next delivery (`delivered.consumer_seq + 1`).
    next_consumer_seq: u64,
    /// (consumer, stream) sequences at or below which everything is acknowledged.
    ack_floor: (u64, u64),
    pending: BTreeMap<u64, PendingMsg>,
    /// How many times a pending message was redelivered (stream sequence → count).
    redelivered: BTreeMap<u64, u64>,
    /// Stream sequences due for redelivery, oldest first; stale entries (acked, or given
    /// a deadline again) are skipped.
    redeliver_queue: VecDeque<u64>,
    /// No pending deadline is earlier than this (a lower bound).
    earliest_deadline_ns: Option<i64>,
    /// deliver_policy last_per_subject: the last message of each subject, then `lps_resume` on.
    last_per_subject: SeqRuns,
    lps_resume: u64,
    /// Live stream sequences matching the filter from the cursor on, not yet delivered.
    backlog: SeqRuns,
    /// The next stream sequence to read into the backlog.
    scanned_to: u64,
    /// The stream's (first_seq, last_seq, messages) when last looked at.
    seen: (u64, u64, u64),
    waiting: VecDeque<PullRequest>,
    push_active: bool,
    next_push_heartbeat_ns: Option<i64>,
    flow: Option<FlowControl>,
    last_delivered_ns: Option<i64>,
    last_ack_ns: Option<i64>,
    /// Since when nothing happened, for `inactive_threshold`.
    idle_since_ns: i64,
    dirty: bool,
    deleted: bool,
}

fn signature(state: &StreamState) -> (u64, u64, u64) {
    (state.first_seq, state.last_seq, state.messages)
}

fn read<D: Directory>(stream: &Stream<D>, seq: u64) -> Result<Option<StoredMessage>, StoreError> {
    match stream.get(seq) {
        Ok(message) => Ok(Some(message)),
        Err(ReadError::NotFound) => Ok(None),
        Err(ReadError::Store(error)) => Err(error),
    }
}

/// The filter to apply to stored subjects; `None` when it lets every message through.
fn effective_filter(config: &ConsumerConfig, stream: &StreamConfig) -> Option<Vec<u8>> {
    let filter = config.filter_subject.as_bytes();
    let covers_stream = stream
        .subjects
        .iter()
        .all(|subject| pattern_within(subject.as_bytes(), filter));
    (!filter.is_empty() && !covers_stream).then(|| filter.to_vec())
}

/// Calls `each` with every live record of the stream from `from` through `last` that
/// passes `filter`.
fn scan_live<D: Directory>(
    stream: &Stream<D>,
    from: u64,
    last: u64,
    filter: Option<&[u8]>,
    mut each: impl FnMut(u64, &[u8], i64) -> bool,
) -> Result<(), StoreError> {
    let log = stream.log();
    let mut cursor = log.cursor(from);
    let mut buf = Vec::new();
    while let Some(record) = log.next(&mut cursor, &mut buf)? {
        if record.seq > last {
            break;
        }
        let wanted = filter.is_none_or(|filter| subject_matches(filter, record.subject));
        if wanted
            && stream.is_live(record.seq)
            && !each(
                record.seq,
                record.subject,
                stream
                    .timestamp_of(record.seq)
                    .unwrap_or(record.timestamp_ns),
            )
        {
            break;
        }
    }
    Ok(())
}

/// `headers_only`: the payload's size as a header instead of the payload.
fn headers_only_block(headers: &[u8], payload_len: usize) -> Vec<u8> {
    let mut block = if headers.is_empty() {
        b"NATS/1.0\r\n".to_vec()
    } else {
        headers[..headers.len().saturating_sub(2)].to_vec()
    };
    block.extend_from_slice(format!("Nats-Msg-Size: {payload_len}\r\n\r\n").as_bytes());
    block
}

impl Consumer {
    fn new(stream_name: String, name: String, config: ConsumerConfig, created_ns: i64) -> Self {
        let flow = (config.flow_control && !config.is_pull()).then(FlowControl::new);
        let next_push_heartbeat_ns = (!config.is_pull() && config.idle_heartbeat_ns > 0)
            .then(|| created_ns.saturating_add(config.idle_heartbeat_ns));
        Consumer {
            stream_name,
            name,
            config,
            created_ns,
            next_seq: 1,
            next_consumer_seq: 1,
            ack_floor: (0, 0),
            pending: BTreeMap::new(),
            redelivered: BTreeMap::new(),
            redeliver_queue: VecDeque::new(),
            earliest_deadline_ns: None,
            last_per_subject: SeqRuns::default(),
            lps_resume: 0,
            backlog: SeqRuns::default(),
            scanned_to: 1,
            seen: (0, 0, 0),
            waiting: VecDeque::new(),
            push_active: false,
            next_push_heartbeat_ns,
            flow,
            last_delivered_ns: None,
            last_ack_ns: None,
            idle_since_ns: created_ns,
            dirty: true,
            deleted: false,
        }
    }

    /// Creates a consumer on `stream` from a create request's config (the API layer
    /// has run [`check_create_subject`]): fills the reference's defaults, validates with
    /// its exact errors and places the cursor per the deliver policy. `name_seed` picks
    /// the generated name of a consumer with neither durable name nor name; the API
    /// layer retries with another seed if that name is taken.
    pub fn create<D: Directory>(
        stream: &Stream<D>,
        config: ConsumerConfig,
        created_ns: i64,
        name_seed: u64,
    ) -> Result<Consumer, ApiError> {
        let config = config.with_server_defaults();
        check_config(&config, stream.config())?;
        let name = if config.is_durable() {
            config.durable_name.clone()
        } else if !config.name.is_empty() {
            config.name.clone()
        } else {
            ephemeral_name(name_seed)
        };
        if config.is_durable() && name.len() > NAME_LEN_MAX {
            return Err(templated(
                400,
                10102,
                format!("consumer name is too long, maximum allowed is {NAME_LEN_MAX}"),
            ));
        }
        if !is_valid_name(&name) {
            return Err(ce::BAD_DURABLE_NAME.into());
        }
        let mut consumer = Consumer::new(stream.config().name.clone(), name, config, created_ns);
        consumer
            .start(stream)
            .map_err(|error| ApiError::consumer_create_failed(&error.to_string()))?;
        Ok(consumer)
    }

    /// nats-server's `selectStartingSeqNo`, then the first backlog scan.
    fn start<D: Directory>(&mut self, stream: &Stream<D>) -> Result<(), StoreError> {
        let state = stream.state();
        let (first, last) = (state.first_seq, state.last_seq);
        let filter = effective_filter(&self.config, stream.config());
        let mut last_per_subject = Vec::new();
        let mut start = match self.config.deliver_policy {
            DeliverPolicy::All => first,
            DeliverPolicy::Last => match &filter {
                None => last,
                Some(filter) => match stream.get_last_by_subject(filter) {
                    Ok(message) => message.seq,
                    Err(ReadError::NotFound) => 0,
                    Err(ReadError::Store(error)) => return Err(error),
                },
            },
            DeliverPolicy::New => last + 1,
            DeliverPolicy::ByStartSequence => self.config.opt_start_seq,
            DeliverPolicy::ByStartTime => {
                let time = self.config.opt_start_time.and_then(Timestamp::unix_nanos);
                let time = time.unwrap_or(i64::MIN);
                let mut found = last + 1;
                scan_live(stream, first, last, None, |seq, _, timestamp_ns| {
                    if timestamp_ns >= time {
                        found = seq;
                    }
                    timestamp_ns < time
                })?;
                found
            }
            DeliverPolicy::LastPerSubject => {
                let mut lasts: HashMap<Vec<u8>, u64> = HashMap::new();
                scan_live(stream, first, last, filter.as_deref(), |seq, subject, _| {
                    lasts.insert(subject.to_vec(), seq);
                    true
                })?;
                last_per_subject = lasts.into_values().collect();
                last_per_subject.sort_unstable();
                last_per_subject.first().copied().unwrap_or(last)
            }
        };
        if first == 0 {
            start = 1;
        } else {
            start = start.clamp(first, last + 1);
        }
        self.next_seq = start;
        self.scanned_to = start;
        if !last_per_subject.is_empty() {
            last_per_subject
                .into_iter()
                .for_each(|seq| self.last_per_subject.push(seq));
            self.lps_resume = last + 1;
            self.scanned_to = last + 1;
        }
        self.scan(stream, last)?;
        self.seen = signature(&state);
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }

    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// A create request for this existing consumer (nats-server 2.9 treats it as an
    /// update): `Ok(false)` if the config is the same (the reply is the existing info),
    /// `Ok(true)` if it changed something updatable, else the reference's error (e.g.
    /// 10012 "ack policy can not be updated"). A new push deliver subject clears the
    /// push interest until the runtime reports it again.
    pub fn update<D: Directory>(
        &mut self,
        stream: &Stream<D>,
        config: ConsumerConfig,
    ) -> Result<bool, ApiError> {
        let config = config.with_server_defaults();
        check_config(&config, stream.config())?;
        if config == self.config {
            return Ok(false);
        }
        if let Some(error) = update_refusal(&self.config, &config, self.push_active) {
            return Err(error);
        }
        let filter_changed = config.filter_subject != self.config.filter_subject;
        if config.deliver_subject != self.config.deliver_subject {
            self.push_active = false;
            let unacked: Vec<u64> = self.pending.keys().copied().collect();
            for seq in unacked {
                self.queue_redelivery(seq);
            }
        }
        self.config = config;
        if filter_changed {
            self.backlog = SeqRuns::default();
            self.scanned_to = if self.last_per_subject.is_empty() {
                self.next_seq
            } else {
                self.lps_resume
            };
            let last = stream.state().last_seq;
            self.scan(stream, last)
                .map_err(|error| ApiError::consumer_create_failed(&error.to_string()))?;
        }
        self.dirty = true;
        Ok(true)
    }

    /// Reads new stream messages into the backlog.
    fn scan<D: Directory>(&mut self, stream: &Stream<D>, last: u64) -> Result<(), StoreError> {
        let from = self.scanned_to;
        if from > last {
            return Ok(());
        }
        self.scanned_to = last + 1;
        match effective_filter(&self.config, stream.config()) {
            None => {
                for seq in from..=last {
                    if stream.is_live(seq) {
                        self.backlog.push(seq);
                    }
                }
                Ok(())
            }
            Some(filter) => {
                let backlog = &mut self.backlog;
                scan_live(stream, from, last, Some(&filter), |seq, _, _| {
                    backlog.push(seq);
                    true
                })
            }
        }
    }

    /// Catches up with the stream: messages appended, removed from the front (purge,
    /// limits), or removed in the middle.
    fn refresh<D: Directory>(&mut self, stream: &Stream<D>) -> Result<(), StoreError> {
        let state = stream.state();
        if signature(&state) == self.seen {
            return Ok(());
        }
        let (_, seen_last, seen_messages) = self.seen;
        let removed = seen_messages + state.last_seq.saturating_sub(seen_last) != state.messages;
        self.seen = signature(&state);
        if state.first_seq > 0 {
            self.purged_below(state.first_seq);
        }
        if removed && state.num_deleted > 0 {
            self.backlog.retain(|seq| stream.is_live(seq));
            self.last_per_subject.retain(|seq| stream.is_live(seq));
            if self.last_per_subject.is_empty() {
                self.next_seq = self.next_seq.max(self.lps_resume);
            }
        }
        self.scan(stream, state.last_seq)
    }

    /// Everything below `first` is gone from the stream (nats-server's `purge`).
    fn purged_below(&mut self, first: u64) {
        let had_last_per_subject = !self.last_per_subject.is_empty();
        self.backlog.remove_below(first);
        self.last_per_subject.remove_below(first);
        if had_last_per_subject && self.last_per_subject.is_empty() {
            self.next_seq = self.next_seq.max(self.lps_resume);
        }
        self.scanned_to = self.scanned_to.max(first);
        self.next_seq = self.next_seq.max(first);
        if self.ack_floor.1 + 1 < first {
            self.ack_floor.1 = first - 1;
            let kept = self.pending.split_off(&first);
            for (seq, gone) in std::mem::replace(&mut self.pending, kept) {
                self.ack_floor.0 = self.ack_floor.0.max(gone.consumer_seq);
                self.redelivered.remove(&seq);
            }
            self.dirty = true;
        }
    }

    fn num_pending(&self) -> u64 {
        self.last_per_subject.len() + self.backlog.len()
    }

    /// How many times `seq` has been delivered (0 if it is not pending).
    fn delivery_count(&self, seq: u64) -> u64 {
        let redelivered = self.redelivered.get(&seq).copied().unwrap_or(0);
        redelivered.saturating_add(1)
    }

    /// The redelivery wait after delivery number `count`.
    fn ack_wait(&self, count: u64) -> i64 {
        let backoff = &self.config.backoff_ns;
        match backoff.len() {
            0 => self.config.ack_wait_ns,
            len => backoff[(count.saturating_sub(1) as usize).min(len - 1)],
        }
    }

    /// The wall clock jumped forward by `jump_ns` beyond the monotonic clock:
    /// every armed timer (redelivery after ack_wait, pull expiries and
    /// heartbeats, push heartbeats, the inactivity clock) moves by as much,
    /// so each keeps the length it was set with instead of firing at once.
    pub fn shift_timers(&mut self, jump_ns: i64) {
        let later = |t: &mut i64| *t = t.saturating_add(jump_ns);
        for pending in self.pending.values_mut() {
            if let Some(deadline) = pending.deadline_ns.as_mut() {
                later(deadline);
            }
        }
        if let Some(earliest) = self.earliest_deadline_ns.as_mut() {
            later(earliest);
        }
        for request in &mut self.waiting {
            if let Some(expires) = request.expires_ns.as_mut() {
                later(expires);
            }
            if let Some(at) = request.next_heartbeat_ns.as_mut() {
                later(at);
            }
        }
        if let Some(at) = self.next_push_heartbeat_ns.as_mut() {
            later(at);
        }
        later(&mut self.idle_since_ns);
    }

    fn set_deadline(&mut self, seq: u64, deadline_ns: i64) {
        if let Some(pending) = self.pending.get_mut(&seq) {
            pending.deadline_ns = Some(deadline_ns);
            let earliest = self
                .earliest_deadline_ns
                .map_or(deadline_ns, |e| e.min(deadline_ns));
            self.earliest_deadline_ns = Some(earliest);
        }
    }

    fn queue_redelivery(&mut self, seq: u64) {
        if let Some(pending) = self.pending.get_mut(&seq) {
            if pending.deadline_ns.take().is_some() {
                self.redeliver_queue.push_back(seq);
            }
        }
    }

    /// Queues every pending message whose deadline passed (nats-server's `checkPending`).
    fn expire_pending(&mut self, now_ns: i64) {
        if self
            .earliest_deadline_ns
            .is_none_or(|earliest| now_ns < earliest)
        {
            return;
        }
        let mut earliest = None;
        for (&seq, pending) in &mut self.pending {
            match pending.deadline_ns {
                Some(deadline) if deadline <= now_ns => {
                    pending.deadline_ns = None;
                    self.redeliver_queue.push_back(seq);
                }
                Some(deadline) => {
                    earliest = Some(earliest.map_or(deadline, |e: i64| e.min(deadline)));
                }
                None => {}
            }
        }
        self.earliest_deadline_ns = earliest;
    }

    /// Forgets pending message `seq` (acknowledged, terminated, out of deliveries or gone
    /// from the stream) and moves the ack floor as nats-server does for explicit acks.
    fn settle(&mut self, seq: u64) {
        let Some(settled) = self.pending.remove(&seq) else {
            return;
        };
        self.redelivered.remove(&seq);
        if self.pending.is_empty() {
            self.ack_floor = (self.next_consumer_seq - 1, self.next_seq - 1);
        } else if settled.consumer_seq == self.ack_floor.0 + 1 {
            self.ack_floor = (settled.consumer_seq, seq);
            if let Some((&next, next_pending)) = self.pending.range(seq + 1..).next() {
                self.ack_floor = (next_pending.consumer_seq - 1, next - 1);
            }
        }
        self.dirty = true;
    }

    fn pop_last_per_subject(&mut self) {
        self.last_per_subject.pop_front();
        if self.last_per_subject.is_empty() {
            self.next_seq = self.next_seq.max(self.lps_resume);
        }
    }

    /// The next message to deliver: redeliveries first (skipping those past
    /// max_deliver or gone), then, below max_ack_pending, new ones.
    fn next_candidate<D: Directory>(&mut self, stream: &Stream<D>) -> Result<Next, StoreError> {
        while let Some(&seq) = self.redeliver_queue.front() {
            let queued = self
                .pending
                .get(&seq)
                .is_some_and(|pending| pending.deadline_ns.is_none());
            let count = self.delivery_count(seq).saturating_add(1);
            if !queued {
                self.redeliver_queue.pop_front();
                continue;
            }
            if self.config.max_deliver > 0 && count > self.config.max_deliver as u64 {
                self.redeliver_queue.pop_front();
                self.settle(seq);
                continue;
            }
            match read(stream, seq)? {
                Some(message) => {
                    return Ok(Next::Message(Candidate {
                        source: Source::Redelivery,
                        count,
                        message,
                    }))
                }
                None => {
                    self.redeliver_queue.pop_front();
                    self.settle(seq);
                }
            }
        }
        let max_ack_pending = self.config.max_ack_pending;
        if self.config.ack_policy != AckPolicy::None
            && max_ack_pending > 0
            && self.pending.len() as u64 >= max_ack_pending as u64
        {
            return Ok(Next::MaxAckPending);
        }
        while let Some(seq) = self.last_per_subject.front() {
            match read(stream, seq)? {
                Some(message) => {
                    return Ok(Next::Message(Candidate {
                        source: Source::LastPerSubject,
                        count: 1,
                        message,
                    }))
                }
                None => self.pop_last_per_subject(),
            }
        }
        while let Some(seq) = self.backlog.front() {
            match read(stream, seq)? {
                Some(message) => {
                    return Ok(Next::Message(Candidate {
                        source: Source::Backlog,
                        count: 1,
                        message,
                    }))
                }
                None => self.backlog.pop_front(),
            }
        }
        Ok(Next::End)
    }

    /// Delivers what it can: redeliveries, then new messages, to waiting pull requests
    /// or (while the runtime reports interest) the push deliver subject; answers pull
    /// requests that expired or are done, and sends idle heartbeats. Returns `true` when
    /// it stopped at its byte budget with more to deliver: call it again once the
    /// runtime has flushed `out`.
    pub fn poll<D: Directory>(
        &mut self,
        stream: &Stream<D>,
        now_ns: i64,
        out: &mut Vec<Outbound>,
    ) -> Result<bool, StoreError> {
        if self.deleted {
            return Ok(false);
        }
        self.refresh(stream)?;
        self.expire_pending(now_ns);
        let mut budget = POLL_BYTES_MAX;
        let (mut end_of_stream, mut more) = (true, false);
        loop {
            let ready = if self.config.is_pull() {
                !self.waiting.is_empty()
            } else {
                self.push_active && !self.flow_stalled()
            };
            if !ready {
                break;
            }
            if budget == 0 {
                (end_of_stream, more) = (false, true);
                break;
            }
            let candidate = match self.next_candidate(stream)? {
                Next::Message(candidate) => candidate,
                Next::MaxAckPending => {
                    end_of_stream = false;
                    break;
                }
                Next::End => {
                    self.next_seq = self.next_seq.max(self.scanned_to);
                    break;
                }
            };
            match self.deliver(candidate, now_ns, out) {
                Some(bytes) => budget = budget.saturating_sub(bytes),
                None => break,
            }
        }
        if self.config.is_pull() {
            self.process_waiting(now_ns, end_of_stream, out);
        } else {
            self.push_heartbeat(now_ns, out);
        }
        Ok(more)
    }

    /// Sends `candidate` if a pull request takes it (or to the push subject); returns
    /// the bytes sent, or `None` when no request could take it (it stays next).
    fn deliver(
        &mut self,
        candidate: Candidate,
        now_ns: i64,
        out: &mut Vec<Outbound>,
    ) -> Option<usize> {
        let Candidate {
            source,
            count,
            message,
        } = candidate;
        let seq = message.seq;
        let is_new = source != Source::Redelivery;
        let reply = AckSubject {
            domain: None,
            account_hash: None,
            stream: self.stream_name.clone(),
            consumer: self.name.clone(),
            delivered: count,
            stream_seq: seq,
            consumer_seq: self.next_consumer_seq,
            timestamp_ns: message.timestamp_ns,
            pending: self.num_pending() - u64::from(is_new),
        }
        .encode()
        .into_bytes();
        let (headers, payload) = if self.config.headers_only {
            (
                headers_only_block(&message.headers, message.payload.len()),
                Vec::new(),
            )
        } else {
            (message.headers, message.payload)
        };
        let size = message.subject.len() + reply.len() + headers.len() + payload.len();
        let route_to = if self.config.is_pull() {
            self.take_request(size as i64, now_ns, out)?
        } else {
            self.config.deliver_subject.clone().into_bytes()
        };
        match source {
            Source::Redelivery => {
                self.redeliver_queue.pop_front();
                let redelivered = self.redelivered.entry(seq).or_insert(0);
                *redelivered = redelivered.saturating_add(1);
            }
            Source::LastPerSubject => {
                self.next_seq = self.next_seq.max(seq + 1);
                self.pop_last_per_subject();
            }
            Source::Backlog => {
                self.next_seq = self.next_seq.max(seq + 1);
                self.backlog.pop_front();
            }
        }
        let consumer_seq = self.next_consumer_seq;
        self.next_consumer_seq += 1;
        if self.config.ack_policy == AckPolicy::None {
            self.ack_floor = (consumer_seq, seq);
        } else {
            // A redelivery keeps the consumer sequence of the first delivery (the ack
            // floor moves by it, as nats-server's `trackPending` does); the `$JS.ACK`
            // reply still carries the new one.
            self.pending
                .entry(seq)
                .or_insert(PendingMsg {
                    consumer_seq,
                    deadline_ns: None,
                })
                .deadline_ns = None;
            let wait = self.ack_wait(count);
            self.set_deadline(seq, now_ns.saturating_add(wait));
        }
        self.last_delivered_ns = Some(now_ns);
        self.idle_since_ns = now_ns;
        self.dirty = true;
        out.push(Outbound {
            route_to,
            subject: message.subject,
            reply,
            headers,
            payload,
        });
        if !self.config.is_pull() {
            if self.config.idle_heartbeat_ns > 0 {
                self.next_push_heartbeat_ns =
                    Some(now_ns.saturating_add(self.config.idle_heartbeat_ns));
            }
            self.account_flow(size as u64, out);
        }
        Some(size)
    }

    /// The waiting request the next message of `size` bytes goes to (nats-server's
    /// `nextWaiting`): requests it no longer fits (max_bytes) or that expired are
    /// answered and dropped; one that still wants more moves to the back.
    fn take_request(&mut self, size: i64, now_ns: i64, out: &mut Vec<Outbound>) -> Option<Vec<u8>> {
        loop {
            let request = self.waiting.front_mut()?;
            if request.max_bytes > 0 {
                if size <= request.max_bytes {
                    request.max_bytes -= size;
                    if request.max_bytes == 0 {
                        request.batch = 1;
                    }
                } else {
                    let status = PullStatus::MessageSizeExceedsMaxBytes {
                        pending_messages: request.batch.max(0) as u64,
                        pending_bytes: request.max_bytes as u64,
                    };
                    out.push(Outbound::status(&request.reply, status.header_block()));
                    self.waiting.pop_front();
                    continue;
                }
            }
            if request.expired(now_ns) {
                let block = request.timeout_status().header_block();
                out.push(Outbound::status(&request.reply, block));
                self.waiting.pop_front();
                continue;
            }
            request.delivered += 1;
            request.batch -= 1;
            let reply = request.reply.clone();
            if request.batch > 0 {
                if request.heartbeat_ns > 0 {
                    request.next_heartbeat_ns = Some(now_ns.saturating_add(request.heartbeat_ns));
                }
                if self.waiting.len() > 1 {
                    let request = self.waiting.pop_front()?;
                    self.waiting.push_back(request);
                }
            } else {
                self.waiting.pop_front();
            }
            return Some(reply);
        }
    }

    /// Answers waiting requests that expired, and no_wait ones that got something once
    /// nothing more is there (nats-server's `processWaiting`); sends due heartbeats.
    fn process_waiting(&mut self, now_ns: i64, end_of_stream: bool, out: &mut Vec<Outbound>) {
        let heartbeat = PullStatus::IdleHeartbeat {
            last_consumer_seq: self.next_consumer_seq - 1,
            last_stream_seq: self.next_seq - 1,
        };
        self.waiting.retain_mut(|request| {
            if (end_of_stream && request.no_wait && request.delivered > 0)
                || request.expired(now_ns)
            {
                let block = request.timeout_status().header_block();
                out.push(Outbound::status(&request.reply, block));
                return false;
            }
            if request.next_heartbeat_ns.is_some_and(|at| now_ns >= at) {
                out.push(Outbound::status(&request.reply, heartbeat.header_block()));
                request.next_heartbeat_ns = Some(now_ns.saturating_add(request.heartbeat_ns));
            }
            true
        });
    }

    fn push_heartbeat(&mut self, now_ns: i64, out: &mut Vec<Outbound>) {
        let Some(at) = self.next_push_heartbeat_ns else {
            return;
        };
        if now_ns < at {
            return;
        }
        if self.push_active {
            let mut block = PullStatus::IdleHeartbeat {
                last_consumer_seq: self.next_consumer_seq - 1,
                last_stream_seq: self.next_seq - 1,
            }
            .header_block();
            if let Some((subject, _)) = self.flow.as_ref().and_then(|f| f.outstanding.as_ref()) {
                block.truncate(block.len() - 2);
                block.push_str("Nats-Consumer-Stalled: ");
                block.push_str(&String::from_utf8_lossy(subject));
                block.push_str("\r\n\r\n");
            }
            let to = self.config.deliver_subject.as_bytes();
            out.push(Outbound::status(to, block));
        }
        self.next_push_heartbeat_ns = Some(now_ns.saturating_add(self.config.idle_heartbeat_ns));
    }

    fn flow_stalled(&self) -> bool {
        self.flow.as_ref().is_some_and(|f| f.in_flight > f.window)
    }

    /// Counts a push delivery against the flow-control window; asks the client for a
    /// flow-control reply once half of it is in flight.
    fn account_flow(&mut self, size: u64, out: &mut Vec<Outbound>) {
        let Some(flow) = self.flow.as_mut() else {
            return;
        };
        flow.in_flight += size;
        match &mut flow.outstanding {
            None if flow.in_flight > flow.window / 2 => {
                let mut token = mix(flow.requests_sent);
                flow.requests_sent += 1;
                let token: String = (0..4)
                    .map(|_| {
                        let digit = BASE62[(token % 62) as usize];
                        token /= 62;
                        char::from(digit)
                    })
                    .collect();
                let reply = format!("$JS.FC.{}.{}.{token}", self.stream_name, self.name);
                let to = self.config.deliver_subject.as_bytes();
                let mut request = Outbound::status(to, status_block(100, "FlowControl Request"));
                request.reply = reply.clone().into_bytes();
                out.push(request);
                flow.outstanding = Some((reply.into_bytes(), flow.in_flight));
            }
            Some((_, releases)) if flow.in_flight.saturating_sub(*releases) >= flow.window => {
                *releases += size;
            }
            _ => {}
        }
    }

    /// The client answered a flow-control request (a publish to its `$JS.FC.…` reply
    /// subject); answers to older requests are ignored.
    pub fn on_flow_control(&mut self, subject: &[u8]) {
        let Some(flow) = self.flow.as_mut() else {
            return;
        };
        let Some((outstanding, releases)) = &flow.outstanding else {
            return;
        };
        if outstanding != subject {
            return;
        }
        flow.in_flight = flow.in_flight.saturating_sub(*releases);
        flow.window = (flow.window * 2).min(FLOW_CONTROL_BYTES_MAX);
        flow.outstanding = None;
    }

    /// Whether anyone is subscribed to the push deliver subject (the runtime tracks it).
    pub fn set_push_active(&mut self, active: bool, now_ns: i64) {
        if self.push_active && !active {
            self.idle_since_ns = now_ns;
        }
        self.push_active = active;
    }

    /// A pull request (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>` with reply
    /// subject `reply`): refused with a status at once, or queued for the next `poll`.
    pub fn add_pull(
        &mut self,
        reply: Vec<u8>,
        request: NextRequest,
        now_ns: i64,
        out: &mut Vec<Outbound>,
    ) {
        if self.deleted || reply.is_empty() {
            return;
        }
        let refuse =
            |out: &mut Vec<Outbound>, block: String| out.push(Outbound::status(&reply, block));
        if !self.config.is_pull() {
            return refuse(out, PullStatus::ConsumerIsPushBased.header_block());
        }
        let heartbeat = request.idle_heartbeat_ns;
        if heartbeat > 0 && heartbeat.saturating_mul(2) > request.expires_ns {
            return refuse(
                out,
                status_block(400, "Bad Request - heartbeat value too large"),
            );
        }
        let batch = request.batch.max(1);
        let config = &self.config;
        if config.max_batch > 0 && batch > config.max_batch {
            let text = format!("Exceeded MaxRequestBatch of {}", config.max_batch);
            return refuse(out, status_block(409, &text));
        }
        if request.expires_ns > 0
            && config.max_expires_ns > 0
            && request.expires_ns > config.max_expires_ns
        {
            let text = format!(
                "Exceeded MaxRequestExpires of {}",
                go_duration(config.max_expires_ns)
            );
            return refuse(out, status_block(409, &text));
        }
        if request.max_bytes > 0 && config.max_bytes > 0 && request.max_bytes > config.max_bytes {
            let text = format!("Exceeded MaxRequestMaxBytes of {}", config.max_bytes);
            return refuse(out, status_block(409, &text));
        }
        let max_waiting = self.config.max_waiting.max(0) as usize;
        if self.waiting.len() >= max_waiting {
            self.process_waiting(now_ns, false, out);
        }
        if request.no_wait {
            let available = self.num_pending() + self.redeliver_queue.len() as u64;
            if available == 0 && request.expires_ns == 0 {
                self.idle_since_ns = now_ns;
                return refuse(out, PullStatus::NoMessages.header_block());
            }
            let wanted = self
                .waiting
                .iter()
                .fold(0i64, |sum, r| sum.saturating_add(r.batch));
            if available > 0 && (available as i64) < wanted {
                self.idle_since_ns = now_ns;
                return refuse(out, status_block(408, "Requests Pending"));
            }
        }
        if self.waiting.len() >= max_waiting {
            return refuse(out, PullStatus::ExceededMaxWaiting.header_block());
        }
        self.idle_since_ns = now_ns;
        self.waiting.push_back(PullRequest {
            reply,
            batch,
            max_bytes: request.max_bytes,
            expires_ns: (request.expires_ns != 0)
                .then(|| now_ns.saturating_add(request.expires_ns)),
            no_wait: request.no_wait,
            delivered: 0,
            heartbeat_ns: heartbeat,
            next_heartbeat_ns: (heartbeat > 0).then(|| now_ns.saturating_add(heartbeat)),
        });
    }

    /// A client's ack: a publish to a `$JS.ACK.…` subject this consumer handed out,
    /// with `reply` its reply subject (empty for none). Acks for another consumer are
    /// ignored. `+NXT` queues a pull request for `reply`; any other ack with a reply
    /// subject is answered with an empty message, as the reference does.
    pub fn on_ack(
        &mut self,
        ack: &AckSubject,
        kind: AckKind,
        reply: &[u8],
        now_ns: i64,
        out: &mut Vec<Outbound>,
    ) {
        if self.deleted || ack.stream != self.stream_name || ack.consumer != self.name {
            return;
        }
        self.idle_since_ns = now_ns;
        let seq = ack.stream_seq;
        match kind {
            AckKind::Ack | AckKind::Term { .. } => self.acknowledge(ack, now_ns),
            AckKind::Next { request } => {
                self.acknowledge(ack, now_ns);
                return self.add_pull(reply.to_vec(), request, now_ns, out);
            }
            AckKind::Nak { delay_ns } => match delay_ns {
                Some(delay) if delay > 0 => self.set_deadline(seq, now_ns.saturating_add(delay)),
                _ => self.queue_redelivery(seq),
            },
            AckKind::InProgress => {
                if self.pending.contains_key(&seq) {
                    let wait = self.ack_wait(self.delivery_count(seq));
                    self.set_deadline(seq, now_ns.saturating_add(wait));
                }
            }
        }
        if !reply.is_empty() && seq != 0 {
            out.push(Outbound {
                route_to: reply.to_vec(),
                subject: reply.to_vec(),
                ..Outbound::default()
            });
        }
    }

    fn acknowledge(&mut self, ack: &AckSubject, now_ns: i64) {
        let (consumer_seq, seq) = (ack.consumer_seq, ack.stream_seq);
        match self.config.ack_policy {
            AckPolicy::None => return,
            AckPolicy::Explicit => {
                if !self.pending.contains_key(&seq) {
                    return;
                }
                self.settle(seq);
            }
            AckPolicy::All => {
                let (floor_consumer, floor_stream) = self.ack_floor;
                if consumer_seq <= floor_consumer
                    || seq <= floor_stream
                    || consumer_seq >= self.next_consumer_seq
                    || seq >= self.next_seq
                {
                    return;
                }
                self.ack_floor = (consumer_seq, seq);
                let kept = self.pending.split_off(&(seq + 1));
                for (acked, _) in std::mem::replace(&mut self.pending, kept) {
                    self.redelivered.remove(&acked);
                }
                self.dirty = true;
            }
        }
        self.last_ack_ns = Some(now_ns);
    }

    /// The consumer was deleted: every waiting pull request gets 409 Consumer Deleted,
    /// and nothing more is delivered.
    pub fn on_delete(&mut self, out: &mut Vec<Outbound>) {
        for request in self.waiting.drain(..) {
            out.push(Outbound::status(
                &request.reply,
                PullStatus::ConsumerDeleted.header_block(),
            ));
        }
        self.deleted = true;
    }

    /// When `poll` next has timed work: a redelivery deadline, a pull request's expiry or
    /// heartbeat, a push heartbeat, or the moment the consumer becomes inactive.
    pub fn next_deadline(&self) -> Option<i64> {
        if self.deleted {
            return None;
        }
        let pending = self
            .earliest_deadline_ns
            .filter(|_| !self.pending.is_empty());
        let requests = self
            .waiting
            .iter()
            .flat_map(|request| [request.expires_ns, request.next_heartbeat_ns]);
        let inactive = (self.config.inactive_threshold_ns > 0 && self.idle()).then(|| {
            self.idle_since_ns
                .saturating_add(self.config.inactive_threshold_ns)
        });
        [pending, self.next_push_heartbeat_ns, inactive]
            .into_iter()
            .chain(requests)
            .flatten()
            .min()
    }

    fn idle(&self) -> bool {
        if self.config.is_pull() {
            self.waiting.is_empty()
        } else {
            !self.push_active
        }
    }

    /// Whether the consumer went unused for its `inactive_threshold` (no pull requests,
    /// deliveries or acks; for push, no interest): the runtime then deletes it, as the
    /// reference does with ephemerals.
    pub fn is_inactive(&self, now_ns: i64) -> bool {
        let threshold = self.config.inactive_threshold_ns;
        threshold > 0 && self.idle() && now_ns.saturating_sub(self.idle_since_ns) >= threshold
    }

    /// The consumer info reply's body, counts as of the last `poll`.
    pub fn info(&self, now_ns: i64) -> ConsumerInfo {
        let waiting = self
            .waiting
            .iter()
            .filter(|request| !request.expired(now_ns))
            .count();
        ConsumerInfo {
            stream_name: self.stream_name.clone(),
            name: self.name.clone(),
            created: Timestamp::from_unix_nanos(self.created_ns),
            config: Some(self.config.clone()),
            delivered: SequenceInfo {
                consumer_seq: self.next_consumer_seq - 1,
                stream_seq: self.next_seq - 1,
                last_active: self.last_delivered_ns.map(Timestamp::from_unix_nanos),
            },
            ack_floor: SequenceInfo {
                consumer_seq: self.ack_floor.0,
                stream_seq: self.ack_floor.1,
                last_active: self.last_ack_ns.map(Timestamp::from_unix_nanos),
            },
            num_ack_pending: self.pending.len() as u64,
            num_redelivered: self.redelivered.len() as u64,
            num_waiting: waiting as u64,
            num_pending: self.num_pending(),
            cluster: None,
            push_bound: !self.config.is_pull() && self.push_active,
        }
    }

    /// Whether the durable state changed since the last [`Consumer::save_state`].
    pub fn needs_save(&self) -> bool {
        self.dirty
    }

    /// The durable state: config, name, creation time, delivered cursor, ack floor,
    /// pending set (stream seq → consumer seq), redelivery counts and the remaining
    /// last-per-subject list. Little endian:
    ///
    /// `crc32c u32` (of everything after it) · `version u32` · `created_ns`,
    /// `next_seq`, `next_consumer_seq`, `ack_floor.consumer`, `ack_floor.stream`,
    /// `last_delivered_ns`, `last_ack_ns` (`i64::MIN` = never), `lps_resume` ·
    /// `count` + `(start, end)` runs · `count` + `(stream_seq, consumer_seq)` pending ·
    /// `count` + `(stream_seq, redeliveries)` · `len` + name · `len` + config JSON —
    /// every number a u64.
    pub fn encode_state(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; 4];
        bytes.extend_from_slice(&STATE_VERSION.to_le_bytes());
        let mut put = |value: u64| bytes.extend_from_slice(&value.to_le_bytes());
        let never = i64::MIN;
        for value in [
            self.created_ns as u64,
            self.next_seq,
            self.next_consumer_seq,
            self.ack_floor.0,
            self.ack_floor.1,
            self.last_delivered_ns.unwrap_or(never) as u64,
            self.last_ack_ns.unwrap_or(never) as u64,
            self.lps_resume,
        ] {
            put(value);
        }
        put(self.last_per_subject.runs.len() as u64);
        for &(start, end) in &self.last_per_subject.runs {
            put(start);
            put(end);
        }
        put(self.pending.len() as u64);
        for (&seq, pending) in &self.pending {
            put(seq);
            put(pending.consumer_seq);
        }
        put(self.redelivered.len() as u64);
        for (&seq, &count) in &self.redelivered {
            put(seq);
            put(count);
        }
        let config = serde_json::to_vec(&self.config).expect("a ConsumerConfig always encodes");
        for blob in [self.name.as_bytes(), &config] {
            bytes.extend_from_slice(&(blob.len() as u64).to_le_bytes());
            bytes.extend_from_slice(blob);
        }
        let crc = crc32c::crc32c(&bytes[4..]);
        bytes[..4].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Rebuilds a consumer from [`Consumer::encode_state`] bytes over `stream` (reopened
    /// after a restart): pending messages get a fresh ack_wait from `now_ns`, messages
    /// purged meanwhile are dropped, the backlog is read again.
    pub fn decode_state<D: Directory>(
        stream: &Stream<D>,
        bytes: &[u8],
        now_ns: i64,
    ) -> Result<Consumer, StateError> {
        let mut consumer = decode(bytes).map_err(StateError::Corrupt)?;
        consumer.stream_name = stream.config().name.clone();
        let seqs: Vec<u64> = consumer.pending.keys().copied().collect();
        for seq in seqs {
            let wait = consumer.ack_wait(consumer.delivery_count(seq));
            consumer.set_deadline(seq, now_ns.saturating_add(wait));
        }
        consumer.scanned_to = if consumer.last_per_subject.is_empty() {
            consumer.next_seq
        } else {
            consumer.lps_resume
        };
        let state = stream.state();
        if state.first_seq > 0 {
            consumer.purged_below(state.first_seq);
        }
        consumer.last_per_subject.retain(|seq| stream.is_live(seq));
        consumer.scan(stream, state.last_seq)?;
        consumer.seen = signature(&state);
        consumer.idle_since_ns = now_ns;
        Ok(consumer)
    }

    /// Writes the state to `file_name` in `dir` atomically: a temporary file, synced,
    /// renamed over the old one, the directory synced. On `Ok` a crash keeps the new
    /// state; on `Err` a crash leaves the old one or the new one, whole.
    pub fn save_state<D: Directory>(&mut self, dir: &D, file_name: &str) -> Result<(), StoreError> {
        replace_atomically(dir, file_name, &self.encode_state())?;
        self.dirty = false;
        Ok(())
    }

    /// Loads the consumer saved as `file_name` in `dir` (see [`Consumer::decode_state`])
    /// after a restart, without the times of its last delivery and ack (as the
    /// reference); `None` when there is no such file. A leftover temporary file is
    /// never read.
    pub fn load<D: Directory, S: Directory>(
        stream: &Stream<S>,
        dir: &D,
        file_name: &str,
        now_ns: i64,
    ) -> Result<Option<Consumer>, StateError> {
        let Some(bytes) = read_if_present(dir, file_name)? else {
            return Ok(None);
        };
        let mut consumer = Consumer::decode_state(stream, &bytes, now_ns)?;
        // nats-server 2.9 does not keep the last delivery and ack times across a
        // restart: its consumer info then has no `last_active` until the next one.
        consumer.last_delivered_ns = None;
        consumer.last_ack_ns = None;
        Ok(Some(consumer))
    }
}

/// Reads numbers and blobs off a state file, failing instead of reading past the end.
struct Reader<'b> {
    bytes: &'b [u8],
}

impl<'b> Reader<'b> {
    fn take(&mut self, len: usize) -> Result<&'b [u8], &'static str> {
        let (head, rest) = self.bytes.split_at_checked(len).ok_or("truncated")?;
        self.bytes = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        let mut value = [0u8; 8];
        value.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(value))
    }

    /// A count of `item_bytes`-sized entries that must fit in what is left.
    fn count(&mut self, item_bytes: usize) -> Result<usize, &'static str> {
        let count = self.u64()?;
        if count > (self.bytes.len() / item_bytes) as u64 {
            return Err("count past the end");
        }
        Ok(count as usize)
    }

    fn pairs(&mut self) -> Result<Vec<(u64, u64)>, &'static str> {
        let count = self.count(16)?;
        (0..count).map(|_| Ok((self.u64()?, self.u64()?))).collect()
    }

    fn blob(&mut self) -> Result<&'b [u8], &'static str> {
        let len = self.count(1)?;
        self.take(len)
    }
}

/// The consumer in state bytes, not yet attached to its stream.
fn decode(bytes: &[u8]) -> Result<Consumer, &'static str> {
    let (crc, body) = bytes.split_at_checked(4).ok_or("truncated")?;
    let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc != crc32c::crc32c(body) {
        return Err("crc mismatch");
    }
    let mut reader = Reader { bytes: body };
    let version = reader.take(4)?;
    if u32::from_le_bytes([version[0], version[1], version[2], version[3]]) != STATE_VERSION {
        return Err("unknown version");
    }
    let created = reader.u64()?;
    let (next_seq, next_consumer_seq) = (reader.u64()?, reader.u64()?);
    let (floor_consumer, floor_stream) = (reader.u64()?, reader.u64()?);
    let (delivered, acked) = (reader.u64()?, reader.u64()?);
    let lps_resume = reader.u64()?;
    let last_per_subject =
        SeqRuns::from_runs(reader.pairs()?).ok_or("bad last-per-subject runs")?;
    let pending_pairs = reader.pairs()?;
    let redelivered: BTreeMap<u64, u64> = reader.pairs()?.into_iter().collect();
    let name = std::str::from_utf8(reader.blob()?).map_err(|_| "name is not UTF-8")?;
    let config: ConsumerConfig =
        serde_json::from_slice(reader.blob()?).map_err(|_| "config is not a consumer config")?;
    if !reader.bytes.is_empty() {
        return Err("trailing bytes");
    }
    if next_seq == 0 || next_consumer_seq == 0 {
        return Err("sequence 0");
    }
    if floor_stream >= next_seq || floor_consumer >= next_consumer_seq {
        return Err("ack floor past the cursor");
    }
    let mut consumer = Consumer::new(String::new(), name.to_owned(), config, created as i64);
    let time = |value: u64| (value as i64 != i64::MIN).then_some(value as i64);
    consumer.next_seq = next_seq;
    consumer.next_consumer_seq = next_consumer_seq;
    consumer.ack_floor = (floor_consumer, floor_stream);
    consumer.last_delivered_ns = time(delivered);
    consumer.last_ack_ns = time(acked);
    consumer.last_per_subject = last_per_subject;
    consumer.lps_resume = lps_resume;
    for (seq, consumer_seq) in pending_pairs {
        if seq >= next_seq || consumer_seq == 0 || consumer_seq >= next_consumer_seq {
            return Err("pending delivery after the cursor");
        }
        let pending = PendingMsg {
            consumer_seq,
            deadline_ns: None,
        };
        if consumer.pending.insert(seq, pending).is_some() {
            return Err("pending sequence twice");
        }
    }
    consumer.redelivered = redelivered
        .into_iter()
        .filter(|(seq, _)| consumer.pending.contains_key(seq))
        .collect();
    consumer.dirty = false;
    Ok(consumer)
}

#[cfg(test)]
mod tests {
    //! Replays the captured consumer exchanges (`tests/fixtures/jetstream/consumer_*`,
    //! `pull_next_*`) against a stream holding the captured messages and compares reply
    //! bodies, status header blocks and `$JS.ACK` subjects byte for byte; then each
    //! deliver and ack policy, redelivery on a virtual clock, pull and push mechanics,
    //! and the durable state under simulated power cuts.

    use std::path::Path;

    use serde_json::Value;

    use super::*;
    use crate::jetstream::api::{
        response_type, ApiResponse, ConsumerCreateRequest, ConsumerInfoBody,
    };
    use crate::jetstream::stream::PlannedMessage;
    use crate::store::file::SimRng;
    use crate::store::{LogConfig, SimDirectory};

    const MS: i64 = 1_000_000;
    const S: i64 = SECOND_NS;
    const T0: i64 = 1_700_000_000 * S;

    type Sim = Stream<SimDirectory>;

    fn fixture(name: &str) -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jetstream")
            .join(format!("{name}.json"));
        let text = std::fs::read_to_string(path).expect("fixture exists");
        serde_json::from_str(&text).expect("fixture is JSON")
    }

    fn reply_body(fixture: &Value) -> Value {
        serde_json::from_str(fixture["replies"][0]["body"].as_str().unwrap()).unwrap()
    }

    fn time_ns(value: &Value) -> i64 {
        Timestamp::parse_rfc3339(value.as_str().unwrap())
            .and_then(Timestamp::unix_nanos)
            .unwrap()
    }

    fn stream(json: &str) -> Sim {
        let config: StreamConfig = serde_json::from_str(json).unwrap();
        let log = LogConfig {
            segment_bytes_max: 512,
            index_interval_records: 4,
        };
        Stream::open_with_log_config(SimDirectory::new(), config.with_server_defaults(), log, T0)
            .unwrap()
    }

    fn publish(stream: &mut Sim, subject: &str, headers: &str, payload: &str, at: i64) -> u64 {
        let message = PlannedMessage {
            subject: subject.into(),
            headers: headers.into(),
            payload: payload.into(),
            timestamp_ns: at,
        };
        let replies = stream.commit(&[message]).unwrap();
        replies[0].as_ref().expect("stored").seq
    }

    /// Stream S as the probe left it when it created its consumers: the captured
    /// publishes with their timestamps, then messages 3 and 4 deleted.
    fn probe_stream() -> Sim {
        let mut s = stream(r#"{"name":"S","subjects":["s.>"]}"#);
        publish(&mut s, "s.a", "", "hello", 1_795_311_518_999_448_754);
        let id = "NATS/1.0\r\nNats-Msg-Id: m1\r\n\r\n";
        publish(&mut s, "s.a", id, "again", 1_795_311_519_301_879_162);
        publish(&mut s, "s.b", "", "bee", 1_795_311_519_400_000_000);
        let expected_stream = "NATS/1.0\r\nNats-Expected-Stream: S\r\n\r\n";
        publish(
            &mut s,
            "s.c",
            expected_stream,
            "c1",
            1_795_311_520_000_000_000,
        );
        let expected_last = "NATS/1.0\r\nNats-Expected-Last-Sequence: 4\r\n\r\n";
        publish(
            &mut s,
            "s.c",
            expected_last,
            "c6",
            1_795_311_521_715_853_431,
        );
        s.purge(Some(b"s.b"), None).unwrap();
        s.purge(Some(b"s.c"), Some(5)).unwrap();
        assert_eq!(s.deleted(), [3, 4]);
        s
    }

    /// t.a t.b t.a t.c t.b, one a second from T0 + 1 s.
    fn stream_t() -> Sim {
        let mut s = stream(r#"{"name":"T","subjects":["t.>"]}"#);
        for (i, subject) in ["t.a", "t.b", "t.a", "t.c", "t.b"].into_iter().enumerate() {
            publish(&mut s, subject, "", "x", T0 + (i as i64 + 1) * S);
        }
        s
    }

    fn create_subject(subject: &str) -> CreateSubject<'_> {
        let rest = subject.strip_prefix("$JS.API.CONSUMER.").unwrap();
        if let Some(rest) = rest.strip_prefix("DURABLE.CREATE.") {
            return CreateSubject::Durable(rest.split_once('.').unwrap().1);
        }
        match rest.strip_prefix("CREATE.").unwrap().split_once('.') {
            None => CreateSubject::Ephemeral,
            Some((_, named)) => match named.split_once('.') {
                None => CreateSubject::Named {
                    name: named,
                    filter: None,
                },
                Some((name, filter)) => CreateSubject::Named {
                    name,
                    filter: Some(filter),
                },
            },
        }
    }

    /// Runs a captured create request against `stream`.
    fn create_from(fixture: &Value, stream: &Sim, created_ns: i64) -> Result<Consumer, ApiError> {
        let subject = fixture["subject"].as_str().unwrap();
        let request: ConsumerCreateRequest =
            serde_json::from_str(fixture["request"].as_str().unwrap()).unwrap();
        let mut config = request.config;
        check_create_subject(create_subject(subject), &mut config)?;
        Consumer::create(stream, config, created_ns, 7)
    }

    fn reply_json(response_type: &str, result: Result<ConsumerInfo, ApiError>) -> Value {
        let response = match result {
            Ok(info) => ApiResponse::ok(response_type, ConsumerInfoBody { info: Some(info) }),
            Err(error) => ApiResponse::failed(response_type, error, ConsumerInfoBody::default()),
        };
        serde_json::to_value(response).unwrap()
    }

    fn config(json: &str) -> ConsumerConfig {
        serde_json::from_str(json).unwrap()
    }

    fn consumer(stream: &Sim, json: &str) -> Consumer {
        Consumer::create(stream, config(json), T0, 1).unwrap()
    }

    fn text(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).unwrap()
    }

    fn poll(c: &mut Consumer, s: &Sim, now: i64) -> Vec<Outbound> {
        let mut out = Vec::new();
        assert!(!c.poll(s, now, &mut out).unwrap(), "within the byte budget");
        out
    }

    /// Queues a pull request and polls once; returns everything sent.
    fn pull(c: &mut Consumer, s: &Sim, inbox: &str, body: &str, now: i64) -> Vec<Outbound> {
        let mut out = Vec::new();
        let request = NextRequest::parse(body.as_bytes()).unwrap();
        c.add_pull(inbox.as_bytes().to_vec(), request, now, &mut out);
        out.extend(poll(c, s, now));
        out
    }

    fn ack(c: &mut Consumer, delivery: &Outbound, body: &str, now: i64) -> Vec<Outbound> {
        let subject = AckSubject::parse(text(&delivery.reply)).unwrap();
        let mut out = Vec::new();
        c.on_ack(
            &subject,
            AckKind::parse(body.as_bytes()).unwrap(),
            b"",
            now,
            &mut out,
        );
        out
    }

    /// (stream seq, delivery count, consumer seq) of each delivery.
    fn deliveries(out: &[Outbound]) -> Vec<(u64, u64, u64)> {
        out.iter()
            .filter(|m| m.reply.starts_with(b"$JS.ACK."))
            .map(|m| {
                let ack = AckSubject::parse(text(&m.reply)).unwrap();
                (ack.stream_seq, ack.delivered, ack.consumer_seq)
            })
            .collect()
    }

    fn seqs(out: &[Outbound]) -> Vec<u64> {
        deliveries(out).into_iter().map(|d| d.0).collect()
    }

    fn statuses(out: &[Outbound]) -> Vec<&str> {
        out.iter()
            .filter(|m| m.payload.is_empty() && m.headers.starts_with(b"NATS/1.0 "))
            .map(|m| text(&m.headers))
            .collect()
    }

    /// (subject, reply, headers, body) as the fixtures record a message.
    fn wire(out: &[Outbound]) -> Vec<[String; 4]> {
        out.iter()
            .map(|m| [&m.subject, &m.reply, &m.headers, &m.payload].map(|b| text(b).to_owned()))
            .collect()
    }

    fn fixture_wire(fixture: &Value) -> Vec<[String; 4]> {
        let field = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        fixture["replies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| [&r["subject"], &r["reply"], &r["headers"], &r["body"]].map(field))
            .collect()
    }

    /// A captured pull exchange, replayed: the request from the same inbox, then polls
    /// at each deadline up to `until`.
    fn replay_pull(c: &mut Consumer, s: &Sim, name: &str, now: i64, until: i64) -> Vec<Outbound> {
        let fx = fixture(name);
        let inbox = fx["reply_to"].as_str().unwrap();
        let mut out = pull(c, s, inbox, fx["request"].as_str().unwrap(), now);
        while let Some(at) = c.next_deadline().filter(|&at| at <= until) {
            out.extend(poll(c, s, at));
        }
        assert_eq!(wire(&out), fixture_wire(&fx), "{name}");
        out
    }

    fn info_json(c: &Consumer, now: i64) -> Value {
        reply_json(response_type::CONSUMER_INFO, Ok(c.info(now)))
    }

    #[test]
    fn creates_reply_as_captured() {
        for name in [
            "consumer_create_ack_none_pull",
            "consumer_create_by_start_time",
            "consumer_create_ephemeral_push_ack_none",
            "consumer_create_idle_pull",
            "consumer_create_last_per_subject",
            "consumer_create_named_by_start_seq",
            "consumer_create_pull_durable",
            "consumer_durable_create_push",
            "consumer_create_no_ack_policy_pull",
            "consumer_create_no_ack_policy_push",
            "consumer_create_bad_start_seq",
            "consumer_create_durable_mismatch",
        ] {
            let fx = fixture(name);
            let expected = reply_body(&fx);
            let request: Value = serde_json::from_str(fx["request"].as_str().unwrap()).unwrap();
            let s = match request["stream_name"].as_str().unwrap() {
                "S" => probe_stream(),
                _ => stream(r#"{"name":"E"}"#),
            };
            let created = expected.get("created").map_or(T0, time_ns);
            let result = create_from(&fx, &s, created).map(|c| c.info(created));
            let mut actual = reply_json(response_type::CONSUMER_CREATE, result);
            if fx["subject"] == "$JS.API.CONSUMER.CREATE.S" {
                let generated = actual["name"].as_str().unwrap();
                assert!(
                    generated.len() == 8 && generated.bytes().all(|b| b.is_ascii_alphanumeric())
                );
                actual["name"] = expected["name"].clone();
            }
            assert_eq!(actual, expected, "{name}");
        }
    }

    /// The probe's pull consumer `pd`, created with the config its info shows.
    fn probe_pd(s: &Sim) -> (Consumer, i64) {
        let fx = fixture("consumer_info");
        let info = reply_body(&fx);
        let created = time_ns(&info["created"]);
        let config: ConsumerConfig = serde_json::from_value(info["config"].clone()).unwrap();
        let pd = Consumer::create(s, config, created, 0).unwrap();
        assert_eq!(info_json(&pd, created), info, "consumer_info");
        (pd, created)
    }

    #[test]
    fn create_of_an_existing_consumer() {
        let s = probe_stream();
        let (mut pd, _) = probe_pd(&s);
        let same = pd.config().clone();
        assert_eq!(pd.update(&s, same), Ok(false));
        let fx = fixture("consumer_create_exists_different");
        let request: ConsumerCreateRequest =
            serde_json::from_str(fx["request"].as_str().unwrap()).unwrap();
        let mut config = request.config;
        check_create_subject(create_subject(fx["subject"].as_str().unwrap()), &mut config).unwrap();
        let error = pd.update(&s, config).unwrap_err();
        let actual = reply_json(response_type::CONSUMER_CREATE, Err(error));
        assert_eq!(actual, reply_body(&fx));
        // Updatable fields change; a new filter re-reads the backlog.
        let mut changed = pd.config().clone();
        changed.max_ack_pending = 7;
        changed.filter_subject = "s.a".into();
        assert_eq!(pd.update(&s, changed), Ok(true));
        assert_eq!(pd.info(0).config.unwrap().max_ack_pending, 7);
        assert_eq!(pd.info(0).num_pending, 2);
        let mut refused = pd.config().clone();
        refused.deliver_policy = DeliverPolicy::New;
        let error = pd.update(&s, refused).unwrap_err();
        assert_eq!(
            (error.err_code, error.description.as_str()),
            (10012, "deliver policy can not be updated")
        );
    }

    #[test]
    fn pull_session_replays_the_capture() {
        let s = probe_stream();
        let (mut pd, created) = probe_pd(&s);
        let mut now = created + 10 * S;
        let batch = replay_pull(&mut pd, &s, "pull_next_batch", now, now);
        for delivery in &batch {
            assert!(ack(&mut pd, delivery, "", now).is_empty());
        }
        now += S;
        let nak = replay_pull(&mut pd, &s, "pull_next_nak_delay", now, now);
        ack(&mut pd, &nak[0], "-NAK {\"delay\": 500000000}", now);
        assert_eq!(pd.next_deadline(), Some(now + 500 * MS));
        // The next request waits for the delayed redelivery.
        let redelivered = replay_pull(
            &mut pd,
            &s,
            "pull_next_wpi_term",
            now + 100 * MS,
            now + 500 * MS,
        );
        for body in ["+WPI", "+TERM"] {
            ack(&mut pd, &redelivered[0], body, now + 600 * MS);
        }
        now += S;
        replay_pull(&mut pd, &s, "pull_next_no_wait_404", now, now);
        replay_pull(&mut pd, &s, "pull_next_expires_408", now, now + S);
        now += 2 * S;
        replay_pull(
            &mut pd,
            &s,
            "pull_next_idle_heartbeat_100",
            now,
            now + 2 * S,
        );
        assert_eq!(pd.next_deadline(), None);
        let expected = reply_body(&fixture("consumer_info_after_acks"));
        let mut actual = info_json(&pd, now);
        for sequence in ["delivered", "ack_floor"] {
            assert!(actual[sequence]["last_active"].is_string(), "{sequence}");
            actual[sequence]["last_active"] = expected[sequence]["last_active"].clone();
        }
        assert_eq!(actual, expected);
    }

    #[test]
    fn pull_statuses_replay_the_capture() {
        let s = probe_stream();
        let now = T0 + 100 * S;
        let mut named =
            create_from(&fixture("consumer_create_named_by_start_seq"), &s, T0).unwrap();
        replay_pull(&mut named, &s, "pull_next_max_bytes_409", now, now + S);
        replay_pull(&mut named, &s, "pull_next_empty_body", now, now);
        replay_pull(&mut named, &s, "pull_next_number_body", now, now);
        assert_eq!(
            named.info(now).num_waiting,
            1,
            "the batch of 2 still wants one"
        );

        let mut idle = create_from(&fixture("consumer_create_idle_pull"), &s, T0).unwrap();
        let fx = fixture("pull_next_exceeded_max_waiting_409");
        let inbox = fx["reply_to"].as_str().unwrap();
        let mut out = Vec::new();
        for _ in 0..11 {
            let request = NextRequest::parse(fx["request"].as_str().unwrap().as_bytes()).unwrap();
            idle.add_pull(inbox.as_bytes().to_vec(), request, now, &mut out);
        }
        out.extend(poll(&mut idle, &s, now));
        assert_eq!(idle.info(now).num_waiting, 10);
        out.extend(poll(&mut idle, &s, now + 300 * MS));
        assert_eq!(wire(&out), fixture_wire(&fx));

        let fx = fixture("pull_next_consumer_deleted_409");
        let inbox = fx["reply_to"].as_str().unwrap();
        let mut out = pull(&mut idle, &s, inbox, fx["request"].as_str().unwrap(), now);
        idle.on_delete(&mut out);
        assert_eq!(wire(&out), fixture_wire(&fx));
        assert_eq!(idle.next_deadline(), None);

        let mut push = create_from(&fixture("consumer_durable_create_push"), &s, T0).unwrap();
        replay_pull(&mut push, &s, "pull_next_push_consumer_409", now, now);
    }

    #[test]
    fn deliver_policies() {
        let start_time = Timestamp::from_unix_nanos(T0 + 3 * S).to_rfc3339();
        let by_time =
            format!(r#"{{"deliver_policy":"by_start_time","opt_start_time":"{start_time}"}}"#);
        // (config, delivered at first, delivered after t.a and t.d arrive)
        let cases: [(&str, &[u64], &[u64]); 13] = [
            (r#"{}"#, &[1, 2, 3, 4, 5], &[6, 7]),
            (r#"{"filter_subject":"t.b"}"#, &[2, 5], &[]),
            (r#"{"filter_subject":"t.*"}"#, &[1, 2, 3, 4, 5], &[6, 7]),
            (r#"{"filter_subject":"t.>"}"#, &[1, 2, 3, 4, 5], &[6, 7]),
            (r#"{"deliver_policy":"last"}"#, &[5], &[6, 7]),
            (
                r#"{"deliver_policy":"last","filter_subject":"t.a"}"#,
                &[3],
                &[6],
            ),
            (r#"{"deliver_policy":"new"}"#, &[], &[6, 7]),
            (
                r#"{"deliver_policy":"new","filter_subject":"t.d"}"#,
                &[],
                &[7],
            ),
            (
                r#"{"deliver_policy":"by_start_sequence","opt_start_seq":3}"#,
                &[3, 4, 5],
                &[6, 7],
            ),
            (&by_time, &[3, 4, 5], &[6, 7]),
            (
                r#"{"deliver_policy":"last_per_subject","filter_subject":"t.*"}"#,
                &[3, 4, 5],
                &[6, 7],
            ),
            (
                r#"{"deliver_policy":"last_per_subject","filter_subject":"t.a"}"#,
                &[3],
                &[6],
            ),
            (
                r#"{"deliver_policy":"last_per_subject","filter_subject":"t.>"}"#,
                &[3, 4, 5],
                &[6, 7],
            ),
        ];
        for (json, first, after) in cases {
            let mut s = stream_t();
            let mut c = consumer(&s, json);
            assert_eq!(c.info(T0).num_pending, first.len() as u64, "{json}");
            let now = T0 + 10 * S;
            let got = seqs(&pull(
                &mut c,
                &s,
                "in",
                r#"{"batch":100,"expires":1000000000}"#,
                now,
            ));
            assert_eq!(got, first, "{json}");
            publish(&mut s, "t.a", "", "x", now);
            publish(&mut s, "t.d", "", "x", now);
            let got = seqs(&pull(
                &mut c,
                &s,
                "in",
                r#"{"batch":100,"expires":1000000000}"#,
                now,
            ));
            assert_eq!(got, after, "{json}");
            assert_eq!(c.info(now).delivered.stream_seq, 7, "{json}");
        }
    }

    #[test]
    fn ack_policies() {
        let s = stream_t();
        let now = T0 + 10 * S;
        let batch = r#"{"batch":5}"#;

        let mut none = consumer(&s, r#"{"ack_policy":"none","ack_wait":1000000000}"#);
        assert_eq!(seqs(&pull(&mut none, &s, "in", batch, now)).len(), 5);
        let info = none.info(now);
        assert_eq!(info.num_ack_pending, 0);
        assert_eq!(
            (info.ack_floor.consumer_seq, info.ack_floor.stream_seq),
            (5, 5)
        );
        let later = pull(&mut none, &s, "in", r#"{"no_wait":true}"#, now + 100 * S);
        assert_eq!(
            statuses(&later),
            ["NATS/1.0 404 No Messages\r\n\r\n"],
            "never redelivered"
        );

        let mut all = consumer(&s, r#"{"ack_policy":"all","ack_wait":1000000000}"#);
        let out = pull(&mut all, &s, "in", batch, now);
        ack(&mut all, &out[2], "", now);
        ack(&mut all, &out[1], "", now);
        let info = all.info(now);
        assert_eq!(info.num_ack_pending, 2);
        assert_eq!(
            (info.ack_floor.consumer_seq, info.ack_floor.stream_seq),
            (3, 3)
        );
        let redelivered = pull(&mut all, &s, "in", batch, now + S);
        assert_eq!(deliveries(&redelivered), [(4, 2, 6), (5, 2, 7)]);

        let mut explicit = consumer(&s, r#"{"ack_policy":"explicit"}"#);
        let out = pull(&mut explicit, &s, "in", batch, now);
        let floor = |c: &Consumer| {
            let info = c.info(now);
            (
                info.ack_floor.consumer_seq,
                info.ack_floor.stream_seq,
                info.num_ack_pending,
            )
        };
        let steps = [
            (1, (0, 0, 4)),
            (0, (2, 2, 3)),
            (3, (2, 2, 2)),
            (2, (4, 4, 1)),
            (4, (5, 5, 0)),
        ];
        for (index, want) in steps {
            ack(&mut explicit, &out[index], "+ACK", now);
            assert_eq!(
                floor(&explicit),
                want,
                "after acking delivery {}",
                index + 1
            );
        }
    }

    #[test]
    fn redelivery_after_ack_wait_and_max_deliver() {
        let s = stream_t();
        let mut c = consumer(
            &s,
            r#"{"filter_subject":"t.a","ack_policy":"explicit","ack_wait":1000000000,"max_deliver":2}"#,
        );
        let t = T0 + 10 * S;
        assert_eq!(deliveries(&pull(&mut c, &s, "in", "1", t)), [(1, 1, 1)]);
        assert_eq!(c.next_deadline(), Some(t + S));
        let out = pull(
            &mut c,
            &s,
            "in",
            r#"{"batch":10,"expires":100000000000}"#,
            t + 500 * MS,
        );
        assert_eq!(deliveries(&out), [(3, 1, 2)]);
        assert!(poll(&mut c, &s, t + S - 1).is_empty());
        let out = poll(&mut c, &s, t + S);
        assert_eq!(deliveries(&out), [(1, 2, 3)]);
        assert_eq!(AckSubject::parse(text(&out[0].reply)).unwrap().pending, 0);
        let info = c.info(t + S);
        assert_eq!((info.num_redelivered, info.num_ack_pending), (1, 2));
        assert_eq!(deliveries(&poll(&mut c, &s, t + 3 * S / 2)), [(3, 2, 4)]);
        // Both were delivered max_deliver times: they are dropped, not sent again.
        assert!(poll(&mut c, &s, t + 3 * S).is_empty());
        let info = c.info(t + 3 * S);
        assert_eq!((info.num_ack_pending, info.num_redelivered), (0, 0));
        // Nothing pending: the floor is what was delivered, and the cursor passed the
        // end of the stream looking for more t.a.
        assert_eq!(
            (info.ack_floor.consumer_seq, info.ack_floor.stream_seq),
            (4, 5)
        );
    }

    /// A forward jump of the wall clock (NTP setting an unset clock) must not
    /// fire every armed timer at once: ack_wait and a pull request's expiry
    /// keep the length they were set with.
    #[test]
    fn timers_keep_their_length_across_a_clock_jump() {
        let s = stream_t();
        let json = r#"{"filter_subject":"t.a","ack_policy":"explicit","ack_wait":30000000000}"#;
        let (mut c, mut control) = (consumer(&s, json), consumer(&s, json));
        let t = T0 + 10 * S;
        for c in [&mut c, &mut control] {
            assert_eq!(deliveries(&pull(c, &s, "in", "1", t)), [(1, 1, 1)]);
            // A waiting request that expires in 60 s.
            let out = pull(c, &s, "w", r#"{"batch":5,"expires":60000000000}"#, t);
            assert_eq!(deliveries(&out), [(3, 1, 2)]);
        }
        let jump = 3600 * S;
        c.shift_timers(jump);
        let after = t + jump + S;
        let expired = poll(&mut control, &s, after);
        assert!(
            expired
                .iter()
                .any(|o| o.route_to == b"w" && text(&o.headers).contains("408")),
            "unshifted, the 60 s request timed out at the jump: {expired:?}"
        );
        assert!(
            poll(&mut c, &s, after).is_empty(),
            "shifted: nothing is due yet"
        );
        assert_eq!(c.next_deadline(), Some(t + jump + 30 * S));
        // Redelivered after its 30 s, into the request that is still waiting.
        let out = poll(&mut c, &s, t + jump + 30 * S);
        assert_eq!(deliveries(&out).len(), 2, "{out:?}");
        assert!(out.iter().all(|o| o.route_to == b"w"));
    }

    #[test]
    fn backoff_sets_each_redelivery_wait() {
        let s = stream_t();
        let json = r#"{"filter_subject":"t.c","ack_policy":"explicit","backoff":[1000000000,3000000000],"max_deliver":5}"#;
        let mut c = consumer(&s, json);
        let t = T0 + 10 * S;
        let wait = r#"{"batch":10,"expires":100000000000}"#;
        assert_eq!(deliveries(&pull(&mut c, &s, "in", wait, t)), [(4, 1, 1)]);
        assert_eq!(c.next_deadline(), Some(t + S));
        assert_eq!(deliveries(&poll(&mut c, &s, t + S)), [(4, 2, 2)]);
        assert_eq!(c.next_deadline(), Some(t + 4 * S));
        assert_eq!(deliveries(&poll(&mut c, &s, t + 4 * S)), [(4, 3, 3)]);
        assert_eq!(
            c.next_deadline(),
            Some(t + 7 * S),
            "the last backoff repeats"
        );
    }

    #[test]
    fn max_ack_pending_holds_new_messages_back() {
        let s = stream_t();
        let mut c = consumer(&s, r#"{"ack_policy":"explicit","max_ack_pending":2}"#);
        let t = T0 + 10 * S;
        let out = pull(
            &mut c,
            &s,
            "in",
            r#"{"batch":10,"no_wait":true,"expires":5000000000}"#,
            t,
        );
        assert_eq!(seqs(&out), [1, 2]);
        assert!(statuses(&out).is_empty(), "held back, not at the end");
        ack(&mut c, &out[0], "", t);
        assert_eq!(seqs(&poll(&mut c, &s, t)), [3]);
        assert_eq!(c.info(t).num_waiting, 1);
    }

    /// The ack floor moves by the consumer sequence of a message's first delivery, as
    /// the reference's does (its differential `consumers_pull`): a redelivered message
    /// settled at its original place lets the floor reach the next pending one.
    #[test]
    fn ack_floor_follows_first_deliveries() {
        let mut s = stream(r#"{"name":"P","subjects":["p.>"]}"#);
        for (i, subject) in ["p.a", "p.b", "p.a", "p.b", "p.a"].into_iter().enumerate() {
            publish(&mut s, subject, "", "x", T0 + i as i64 * MS);
        }
        let mut c = consumer(
            &s,
            r#"{"durable_name":"d","ack_policy":"explicit","ack_wait":500000000,"max_deliver":3}"#,
        );
        let t = T0 + S;
        let floor = |c: &Consumer| {
            let info = c.info(t);
            (info.ack_floor.consumer_seq, info.ack_floor.stream_seq)
        };
        let first = pull(&mut c, &s, "in", r#"{"batch":2,"no_wait":true}"#, t);
        assert_eq!(deliveries(&first), [(1, 1, 1), (2, 1, 2)]);
        ack(&mut c, &first[0], "+ACK", t);
        ack(&mut c, &first[1], "-NAK", t);
        assert_eq!(floor(&c), (1, 1));
        let second = pull(&mut c, &s, "in", r#"{"batch":3,"no_wait":true}"#, t);
        assert_eq!(deliveries(&second), [(2, 2, 3), (3, 1, 4), (4, 1, 5)]);
        assert_eq!(
            c.pending[&2].consumer_seq, 2,
            "a redelivery keeps the first one"
        );
        // 2 settles as consumer seq 2 (first delivery): the floor passes it and stops
        // before 3, pending since consumer seq 4.
        ack(&mut c, &second[0], "+TERM", t);
        assert_eq!(floor(&c), (3, 2));
        ack(&mut c, &second[1], "+WPI", t);
        ack(&mut c, &second[2], "+ACK", t);
        assert_eq!(floor(&c), (3, 2), "4 is past a gap");
        let info = c.info(t);
        assert_eq!((info.num_ack_pending, info.num_pending), (1, 1));
        ack(&mut c, &second[1], "+ACK", t);
        assert_eq!(
            floor(&c),
            (5, 4),
            "nothing pending: the floor is the cursor"
        );
    }

    #[test]
    fn nak_progress_and_term() {
        let s = stream_t();
        let mut c = consumer(
            &s,
            r#"{"filter_subject":"t.a","ack_policy":"explicit","ack_wait":1000000000}"#,
        );
        let t = T0 + 10 * S;
        let wait = r#"{"batch":100,"expires":100000000000}"#;
        let first = pull(&mut c, &s, "in", "1", t);
        assert_eq!(deliveries(&first), [(1, 1, 1)]);
        ack(&mut c, &first[0], "-NAK", t);
        let again = pull(&mut c, &s, "in", "1", t);
        assert_eq!(deliveries(&again), [(1, 2, 2)], "a NAK redelivers at once");
        ack(&mut c, &again[0], "-NAK {\"delay\": 500000000}", t);
        assert!(pull(&mut c, &s, "in", wait, t + 499 * MS)
            .iter()
            .all(|m| AckSubject::parse(text(&m.reply)).unwrap().stream_seq == 3));
        let later = poll(&mut c, &s, t + 500 * MS);
        assert_eq!(deliveries(&later), [(1, 3, 4)]);
        ack(&mut c, &later[0], "+WPI", t + 1400 * MS);
        // 3, sent at t + 499 ms, is redelivered at t + 1499 ms as consumer seq 5.
        assert_eq!(deliveries(&poll(&mut c, &s, t + 1500 * MS)), [(3, 2, 5)]);
        assert_eq!(deliveries(&poll(&mut c, &s, t + 2400 * MS)), [(1, 4, 6)]);
        ack(&mut c, &later[0], "+TERM", t + 2500 * MS);
        assert!(deliveries(&poll(&mut c, &s, t + 60 * S))
            .iter()
            .all(|d| d.0 != 1));
        assert!(!c.pending.contains_key(&1));
    }

    #[test]
    fn ack_replies_next_and_foreign_acks() {
        let s = stream_t();
        let mut c = consumer(&s, r#"{"ack_policy":"explicit"}"#);
        let t = T0 + 10 * S;
        let out = pull(&mut c, &s, "in", "1", t);
        let subject = AckSubject::parse(text(&out[0].reply)).unwrap();
        let mut foreign = subject.clone();
        foreign.consumer = "other".into();
        let mut replies = Vec::new();
        c.on_ack(&foreign, AckKind::Ack, b"_INBOX.ack", t, &mut replies);
        assert!(replies.is_empty());
        assert_eq!(c.info(t).num_ack_pending, 1);
        c.on_ack(&subject, AckKind::Ack, b"_INBOX.ack", t, &mut replies);
        assert_eq!(
            wire(&replies),
            [["_INBOX.ack", "", "", ""].map(String::from)]
        );
        assert_eq!(c.info(t).num_ack_pending, 0);
        let out = pull(&mut c, &s, "in", "1", t);
        let next = AckKind::parse(b"+NXT 2").unwrap();
        let mut replies = Vec::new();
        let subject = AckSubject::parse(text(&out[0].reply)).unwrap();
        c.on_ack(&subject, next, b"_INBOX.next", t, &mut replies);
        replies.extend(poll(&mut c, &s, t));
        assert_eq!(seqs(&replies), [3, 4]);
        assert!(replies.iter().all(|m| m.route_to == b"_INBOX.next"));
        assert_eq!(c.info(t).ack_floor.stream_seq, 2);
    }

    #[test]
    fn pull_request_limits() {
        let s = stream_t();
        let json =
            r#"{"ack_policy":"explicit","max_batch":5,"max_expires":1000000000,"max_bytes":100}"#;
        let mut c = consumer(&s, json);
        let t = T0 + 10 * S;
        for (body, status) in [
            (
                r#"{"batch":6}"#,
                "NATS/1.0 409 Exceeded MaxRequestBatch of 5\r\n\r\n",
            ),
            (
                r#"{"expires":2000000000}"#,
                "NATS/1.0 409 Exceeded MaxRequestExpires of 1s\r\n\r\n",
            ),
            (
                r#"{"max_bytes":101}"#,
                "NATS/1.0 409 Exceeded MaxRequestMaxBytes of 100\r\n\r\n",
            ),
            (
                r#"{"expires":500000000,"idle_heartbeat":300000000}"#,
                "NATS/1.0 400 Bad Request - heartbeat value too large\r\n\r\n",
            ),
        ] {
            assert_eq!(
                statuses(&pull(&mut c, &s, "in", body, t)),
                [status],
                "{body}"
            );
        }
        // no_wait: what there is, then 408 with what the request still wanted.
        let out = pull(&mut c, &s, "in", r#"{"batch":5,"no_wait":true}"#, t);
        assert_eq!(seqs(&out), [1, 2, 3, 4, 5]);
        let out = pull(&mut c, &s, "in", r#"{"batch":5,"no_wait":true}"#, t);
        assert_eq!(statuses(&out), ["NATS/1.0 404 No Messages\r\n\r\n"]);
        let mut s = s;
        publish(&mut s, "t.x", "", "x", t);
        let out = pull(
            &mut c,
            &s,
            "in",
            r#"{"batch":3,"no_wait":true,"expires":500000000}"#,
            t,
        );
        assert_eq!(seqs(&out), [6]);
        assert_eq!(
            statuses(&out),
            ["NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 2\r\nNats-Pending-Bytes: 0\r\n\r\n"]
        );
        // no_wait with expires and nothing there waits for a message.
        let out = pull(
            &mut c,
            &s,
            "in",
            r#"{"batch":1,"no_wait":true,"expires":500000000}"#,
            t,
        );
        assert!(out.is_empty());
        publish(&mut s, "t.x", "", "x", t);
        assert_eq!(seqs(&poll(&mut c, &s, t)), [7]);
    }

    #[test]
    fn stream_deletes_and_purges() {
        let mut s = stream_t();
        let mut c = consumer(&s, r#"{"ack_policy":"explicit","ack_wait":1000000000}"#);
        let t = T0 + 10 * S;
        assert_eq!(seqs(&pull(&mut c, &s, "in", "2", t)), [1, 2]);
        s.purge(Some(b"t.b"), None).unwrap();
        assert!(poll(&mut c, &s, t).is_empty());
        assert_eq!(c.info(t).num_pending, 2, "5 is gone");
        assert_eq!(seqs(&pull(&mut c, &s, "in", "5", t)), [3, 4]);
        // 2 is gone too: its redelivery is dropped.
        let out = pull(
            &mut c,
            &s,
            "in",
            r#"{"batch":10,"expires":10000000000}"#,
            t + S,
        );
        assert_eq!(deliveries(&out), [(1, 2, 5), (3, 2, 6), (4, 2, 7)]);
        assert_eq!(c.info(t + S).num_ack_pending, 3);
        s.purge(None, Some(4)).unwrap();
        assert!(poll(&mut c, &s, t + S).is_empty());
        let info = c.info(t + S);
        assert_eq!(info.num_ack_pending, 1);
        // The purged 1 and 3 lift the floor to their first deliveries' consumer
        // sequences (1 and 3), not to their redeliveries' (5 and 6).
        assert_eq!(
            (info.ack_floor.consumer_seq, info.ack_floor.stream_seq),
            (3, 3)
        );
        s.purge(None, None).unwrap();
        poll(&mut c, &s, t + S);
        let info = c.info(t + S);
        assert_eq!((info.num_ack_pending, info.num_pending), (0, 0));
        assert_eq!(info.delivered.stream_seq, 5);
    }

    #[test]
    fn push_delivery_heartbeats_and_headers_only() {
        let mut s = stream_t();
        let json = r#"{"durable_name":"p","deliver_subject":"d.p","ack_policy":"explicit","idle_heartbeat":1000000000}"#;
        let mut c = consumer(&s, json);
        let t = T0 + 10 * S;
        assert!(poll(&mut c, &s, t).is_empty(), "nobody listens");
        c.set_push_active(true, t);
        let out = poll(&mut c, &s, t);
        assert_eq!(seqs(&out), [1, 2, 3, 4, 5]);
        assert!(out.iter().all(|m| m.route_to == b"d.p"));
        assert_eq!(wire(&out[..1])[0][0], "t.a");
        assert!(c.info(t).push_bound);
        assert_eq!(c.next_deadline(), Some(t + S));
        let out = poll(&mut c, &s, t + S);
        assert_eq!(
            wire(&out),
            [["d.p", "", "NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 5\r\nNats-Last-Stream: 5\r\n\r\n", ""].map(String::from)]
        );
        c.set_push_active(false, t + S);
        publish(&mut s, "t.a", "NATS/1.0\r\nA: b\r\n\r\n", "12345", t + S);
        assert!(poll(&mut c, &s, t + 2 * S).is_empty());

        let mut h = consumer(
            &s,
            r#"{"deliver_subject":"d.h","headers_only":true,"filter_subject":"t.a"}"#,
        );
        h.set_push_active(true, t);
        let out = poll(&mut h, &s, t);
        let headers: Vec<&str> = out.iter().map(|m| text(&m.headers)).collect();
        assert_eq!(
            headers,
            [
                "NATS/1.0\r\nNats-Msg-Size: 1\r\n\r\n",
                "NATS/1.0\r\nNats-Msg-Size: 1\r\n\r\n",
                "NATS/1.0\r\nA: b\r\nNats-Msg-Size: 5\r\n\r\n"
            ]
        );
        assert!(out.iter().all(|m| m.payload.is_empty()));
    }

    #[test]
    fn push_flow_control_stalls_until_answered() {
        let mut s = stream(r#"{"name":"F","subjects":["f"]}"#);
        for i in 0..20 {
            publish(&mut s, "f", "", &"x".repeat(50), T0 + i);
        }
        let json = r#"{"deliver_subject":"d.f","flow_control":true,"idle_heartbeat":1000000000}"#;
        let mut c = consumer(&s, json);
        c.flow.as_mut().unwrap().window = 500;
        c.set_push_active(true, T0);
        let out = poll(&mut c, &s, T0);
        let requests: Vec<&Outbound> = out
            .iter()
            .filter(|m| m.reply.starts_with(b"$JS.FC."))
            .collect();
        assert_eq!(requests.len(), 1);
        assert_eq!(
            text(&requests[0].headers),
            "NATS/1.0 100 FlowControl Request\r\n\r\n"
        );
        let fc = requests[0].reply.clone();
        assert!(text(&fc).starts_with(&format!("$JS.FC.F.{}.", c.name())));
        let sent = seqs(&out);
        assert!(sent.len() > 3 && sent.len() < 20, "{sent:?}");
        let heartbeat = poll(&mut c, &s, T0 + S);
        assert_eq!(
            statuses(&heartbeat),
            [format!(
                "NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: {0}\r\nNats-Last-Stream: {0}\r\nNats-Consumer-Stalled: {1}\r\n\r\n",
                sent.len(),
                text(&fc)
            )]
        );
        c.on_flow_control(b"$JS.FC.F.other.0000");
        assert!(seqs(&poll(&mut c, &s, T0 + S)).is_empty());
        let mut rest = Vec::new();
        for _ in 0..10 {
            if let Some(request) = rest
                .iter()
                .rev()
                .find(|m: &&Outbound| m.reply.starts_with(b"$JS.FC."))
            {
                let reply = request.reply.clone();
                c.on_flow_control(&reply);
            } else {
                c.on_flow_control(&fc);
            }
            rest.extend(poll(&mut c, &s, T0 + S));
        }
        let all: Vec<u64> = sent.iter().copied().chain(seqs(&rest)).collect();
        assert_eq!(all, (1..=20).collect::<Vec<u64>>());
    }

    #[test]
    fn inactive_ephemerals() {
        let s = stream_t();
        let mut c = consumer(&s, r#"{"ack_policy":"explicit"}"#);
        assert_eq!(c.config().inactive_threshold_ns, 5 * S);
        assert_eq!(c.next_deadline(), Some(T0 + 5 * S));
        assert!(!c.is_inactive(T0 + 5 * S - 1));
        assert!(c.is_inactive(T0 + 5 * S));
        pull(
            &mut c,
            &s,
            "in",
            r#"{"batch":10,"expires":60000000000}"#,
            T0 + 6 * S,
        );
        assert!(!c.is_inactive(T0 + 30 * S), "a request is waiting");
        let durable = consumer(&s, r#"{"durable_name":"d"}"#);
        assert!(!durable.is_inactive(T0 + 1000 * S));
    }

    #[test]
    fn create_subject_and_config_errors() {
        let mut durable = config(r#"{"durable_name":"a"}"#);
        let check = |subject, config: &mut ConsumerConfig| {
            check_create_subject(subject, config).map_err(|e| e.err_code)
        };
        assert_eq!(check(CreateSubject::Ephemeral, &mut durable), Err(10020));
        assert_eq!(check(CreateSubject::Durable("b"), &mut durable), Err(10017));
        assert_eq!(
            check(CreateSubject::Durable("a"), &mut config("{}")),
            Err(10018)
        );
        let named = CreateSubject::Named {
            name: "n",
            filter: Some("t.a"),
        };
        assert_eq!(check(named, &mut config("{}")), Err(10131));
        let mut filtered = config(r#"{"filter_subject":"t.a"}"#);
        assert_eq!(check(named, &mut filtered), Ok(()));
        assert_eq!(filtered.name, "n");

        let s = stream_t();
        let work = stream(r#"{"name":"W","subjects":["w"],"retention":"workqueue"}"#);
        let cases: [(&Sim, &str, u16, &str); 14] = [
            (&s, r#"{"deliver_policy":"last_per_subject"}"#, 10094, "consumer delivery policy is deliver last per subject, but optional filter subject is not set"),
            (&s, r#"{"opt_start_seq":3}"#, 10094, "consumer delivery policy is deliver all, but optional start sequence is also set"),
            (&s, r#"{"deliver_policy":"by_start_time"}"#, 10094, "consumer delivery policy is deliver by start time, but optional start time is not set"),
            (&s, r#"{"idle_heartbeat":1000000000}"#, 10088, ce::HEARTBEAT_REQUIRES_PUSH.description),
            (&s, r#"{"deliver_subject":"d","max_waiting":3}"#, 10080, ce::PUSH_MAX_WAITING.description),
            (&s, r#"{"deliver_subject":"d.*"}"#, 10079, ce::DELIVER_TO_WILDCARDS.description),
            (&s, r#"{"deliver_subject":"t.x"}"#, 10081, ce::DELIVER_CYCLE.description),
            (&s, r#"{"filter_subject":"u.a"}"#, 10093, ce::FILTER_NOT_SUBSET.description),
            (&s, r#"{"deliver_subject":"d","flow_control":true}"#, 10108, ce::FLOW_CONTROL_NEEDS_HEARTBEATS.description),
            (&s, r#"{"ack_policy":"explicit","backoff":[1000000000]}"#, 10116, ce::MAX_DELIVER_BACKOFF.description),
            (&s, r#"{"durable_name":"a","name":"b"}"#, 10132, ce::DURABLE_AND_NAME_MISMATCH.description),
            (&s, r#"{"durable_name":"a.b"}"#, 10103, ce::BAD_DURABLE_NAME.description),
            (&work, r#"{"durable_name":"a"}"#, 10084, ce::PULL_REQUIRES_ACK.description),
            (&work, r#"{"ack_policy":"explicit","deliver_policy":"new"}"#, 10101, ce::WORKQUEUE_NOT_DELIVER_ALL.description),
        ];
        for (stream, json, err_code, description) in cases {
            let error = Consumer::create(stream, config(json), T0, 0).unwrap_err();
            assert_eq!(
                (error.err_code, error.description.as_str()),
                (err_code, description),
                "{json}"
            );
        }
        // The observed 10094 text comes out of the same template.
        let error = Consumer::create(
            &s,
            config(r#"{"deliver_policy":"by_start_sequence"}"#),
            T0,
            0,
        );
        assert_eq!(
            error.unwrap_err(),
            errors::CONSUMER_START_SEQ_REQUIRED.into()
        );
    }

    #[test]
    fn subject_subsets_and_go_durations() {
        for (inner, outer, want) in [
            ("a.b", "a.*", true),
            ("a.*", "a.>", true),
            ("a.>", "a.*", false),
            ("a.*", "a.b", false),
            ("a", "a.>", false),
            ("a.b.c", "a.>", true),
            (">", ">", true),
            ("a.b", "a.b", true),
        ] {
            assert_eq!(
                pattern_within(inner.as_bytes(), outer.as_bytes()),
                want,
                "{inner} in {outer}"
            );
        }
        for (ns, text) in [
            (0, "0s"),
            (999, "999ns"),
            (1_500, "1.5µs"),
            (500 * MS, "500ms"),
            (1_500 * MS, "1.5s"),
            (90 * S, "1m30s"),
            (3600 * S, "1h0m0s"),
            (-S, "-1s"),
        ] {
            assert_eq!(go_duration(ns), text);
        }
    }

    /// A consumer with something in every part of its state.
    fn busy_consumer(s: &Sim, t: i64) -> Consumer {
        let json = r#"{"durable_name":"b","deliver_policy":"last_per_subject","filter_subject":"t.*","ack_policy":"explicit","ack_wait":10000000000}"#;
        let mut c = consumer(s, json);
        let out = pull(&mut c, s, "in", "1", t);
        assert_eq!(seqs(&out), [3]);
        ack(&mut c, &out[0], "-NAK", t);
        assert_eq!(
            deliveries(&pull(&mut c, s, "in", "2", t)),
            [(3, 2, 2), (4, 1, 3)]
        );
        c
    }

    #[test]
    fn state_round_trips() {
        let s = stream_t();
        let t = T0 + 10 * S;
        let mut c = busy_consumer(&s, t);
        let bytes = c.encode_state();
        let mut copy = Consumer::decode_state(&s, &bytes, t).unwrap();
        assert_eq!(copy.encode_state(), bytes);
        assert_eq!(info_json(&copy, t), info_json(&c, t));
        // Both go on the same way: 5 is the rest of last-per-subject.
        assert_eq!(seqs(&pull(&mut copy, &s, "in", "5", t)), [5]);
        assert_eq!(seqs(&pull(&mut c, &s, "in", "5", t)), [5]);
        for at in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[at / 8] ^= 1 << (at % 8);
            assert!(Consumer::decode_state(&s, &damaged, t).is_err(), "bit {at}");
        }
        for len in 0..bytes.len() {
            assert!(
                Consumer::decode_state(&s, &bytes[..len], t).is_err(),
                "{len} bytes"
            );
        }
        // Well-framed nonsense is refused, never a panic.
        let mut rng = SimRng::new(3);
        for _ in 0..2000 {
            let mut body = STATE_VERSION.to_le_bytes().to_vec();
            body.extend((0..rng.below(200)).map(|_| {
                if rng.chance(1, 2) {
                    rng.below(3) as u8
                } else {
                    rng.next_u64() as u8
                }
            }));
            let mut framed = crc32c::crc32c(&body).to_le_bytes().to_vec();
            framed.extend(body);
            assert!(decode(&framed).is_err());
        }
    }

    #[test]
    fn durable_consumer_reopens_where_it_was() {
        let mut s = stream_t();
        let dir = SimDirectory::new();
        let t = T0 + 10 * S;
        let mut c = consumer(
            &s,
            r#"{"durable_name":"d","ack_policy":"explicit","ack_wait":10000000000}"#,
        );
        let out = pull(&mut c, &s, "in", "2", t);
        ack(&mut c, &out[0], "", t);
        assert!(c.needs_save());
        c.save_state(&dir, "d.state").unwrap();
        assert!(!c.needs_save());
        drop(c);
        publish(&mut s, "t.a", "", "x", t + S);
        assert!(Consumer::load(&s, &dir, "other", t).unwrap().is_none());
        let later = t + 100 * S;
        let mut c = Consumer::load(&s, &dir, "d.state", later).unwrap().unwrap();
        let info = c.info(later);
        assert_eq!((info.num_ack_pending, info.num_pending), (1, 4));
        assert_eq!(
            (info.delivered.consumer_seq, info.delivered.stream_seq),
            (2, 2)
        );
        assert_eq!(
            (info.ack_floor.consumer_seq, info.ack_floor.stream_seq),
            (1, 1)
        );
        assert_eq!(
            c.next_deadline(),
            Some(later + 10 * S),
            "ack_wait restarts at load"
        );
        assert!(
            info.delivered.last_active.is_none() && info.ack_floor.last_active.is_none(),
            "no last_active after a restart, as from the reference"
        );
        let wait = r#"{"batch":9,"expires":60000000000}"#;
        assert_eq!(seqs(&pull(&mut c, &s, "in", wait, later + S)), [3, 4, 5, 6]);
        assert!(c.info(later + S).delivered.last_active.is_some());
        assert_eq!(deliveries(&poll(&mut c, &s, later + 10 * S)), [(2, 2, 7)]);
    }

    #[test]
    fn state_file_survives_power_cuts_whole() {
        let s = stream_t();
        let t = T0 + 10 * S;
        let mut old = busy_consumer(&s, t);
        let mut new = busy_consumer(&s, t);
        let out = pull(&mut new, &s, "in", "1", t);
        ack(&mut new, &out[0], "", t);
        // `load` forgets these (as after a restart); the rest must come back whole.
        for c in [&mut old, &mut new] {
            (c.last_delivered_ns, c.last_ack_ns) = (None, None);
        }
        let (old_bytes, new_bytes) = (old.encode_state(), new.encode_state());
        assert_ne!(old_bytes, new_bytes);
        let mut outcomes = std::collections::BTreeSet::new();
        for seed in 0..64u64 {
            let dir = SimDirectory::new();
            old.save_state(&dir, "c").unwrap();
            let cut = seed % 8;
            dir.power_loss_after(cut);
            let saved = new.save_state(&dir, "c").is_ok();
            dir.crash(seed);
            let loaded = Consumer::load(&s, &dir, "c", t)
                .unwrap()
                .expect("a state file");
            let bytes = loaded.encode_state();
            assert!(
                bytes == old_bytes || bytes == new_bytes,
                "seed {seed}: neither state"
            );
            if saved {
                assert_eq!(
                    bytes, new_bytes,
                    "seed {seed}: a save that returned Ok was lost"
                );
            }
            outcomes.insert((cut, bytes == new_bytes));
            // Saving again after the crash works whatever was left behind.
            new.save_state(&dir, "c").unwrap();
            let again = Consumer::load(&s, &dir, "c", t).unwrap().unwrap();
            assert_eq!(again.encode_state(), new_bytes);
        }
        // create, write, sync, rename, directory sync: only the last makes it durable.
        assert!(
            outcomes.contains(&(4, false)) && outcomes.contains(&(5, true)),
            "{outcomes:?}"
        );
    }
}
