//! One JetStream stream over its store log, sans IO: publishes are checked against the
//! stream's rules (the `Nats-Expected-*` headers, `Nats-Msg-Id` dedupe, size and
//! discard=new limits), committed as one group-committed batch, and the discard=old
//! limits (max_msgs, max_bytes, max_age, max_msgs_per_subject) are then enforced by
//! moving a logical first sequence and removing whole segments below it.
//!
//! Owns: a [`Log`] and the in-memory state rebuilt from it at open (which sequences are
//! live, their subjects, sizes and timestamps; per-subject counts; the dedupe table).
//! Time is always an argument (`now_ns`); nothing here reads the clock.
//!
//! Durability of appends: the stream's [`Durability`] ([`StreamOptions`]) picks the
//! commit path — `always` syncs every batch before the acks, `interval` and `none` ack
//! after the write and leave the syncing to [`Stream::sync`] (the owner's timer) and
//! [`Stream::close`].
//!
//! Durability of deletes, in every mode: every deletion first syncs what was appended
//! before it, then is itself durable before it returns `Ok`. A purge that removes a
//! prefix of the live messages persists the log's purge floor (the first live sequence
//! after it), so whatever it removed from the front stays removed after a restart, and
//! a purge below a sequence past the end moves the next sequence there as
//! nats-server's compact does. A deletion that leaves older messages live — a purge by
//! subject, [`Stream::delete_msg`] — is one batch appended to the log's `deletes` file
//! (all of it or none of it survives a crash), and a restart never brings those
//! messages back. The limits (discard old) remove messages in memory and are
//! re-applied at open; since the outcome of a limit depends on what was deleted
//! since, the messages that limits removed are written along with the next durable
//! deletion, so that re-applying them at open can never resurrect one.
//!
//! Deliberately does not: route messages, send replies, know about consumers or
//! shards, keep a sync timer, or persist anything but the log (its segments, its
//! purge floor and its `deletes` file).

mod live;
mod queries;

#[cfg(test)]
mod crash_tests;

use std::collections::{HashMap, VecDeque};

use live::LiveMessages;
use std::ops::Range;
use std::rc::Rc;

use super::api::{
    errors, headers, ApiError, DiscardPolicy, PubAck, StreamConfig, StreamState, Timestamp,
};
use crate::nats::subject::subject_matches;
use crate::store::file::{read_if_present, replace_atomically};
use crate::store::{
    Directory, Durability, Log, LogConfig, NewRecord, RunSet, StoreError, SyncTicket,
};

/// What nats-server's store errors become in a PubAck (`NewJSStreamStoreFailedError`):
/// code 503, err_code 10077, the store error's text as the description.
pub const STORE_FAILED_ERR_CODE: u16 = 10077;
pub const MAX_MSGS_EXCEEDED_REASON: &str = "maximum messages exceeded";
pub const MAX_BYTES_EXCEEDED_REASON: &str = "maximum bytes exceeded";
pub const MAX_MSGS_PER_SUBJECT_EXCEEDED_REASON: &str = "maximum messages per subject exceeded";

/// The header block's first line; anything else is not a header block we act on.
const HEADER_VERSION_LINE: &[u8] = b"NATS/1.0";

/// A stored message's size as nats-server's file store accounts it (`fileStoreMsgSize`):
/// 22 bytes of record overhead and an 8-byte hash, plus 4 for the header length when
/// there are headers. `stream_info_with_deleted.json` (3 messages, 192 bytes) checks it.
pub fn stored_bytes(subject_len: usize, headers_len: usize, payload_len: usize) -> u64 {
    let overhead = if headers_len == 0 { 30 } else { 34 };
    (overhead + subject_len + headers_len + payload_len) as u64
}

/// The value of header `name` in a `NATS/1.0` header block, as nats-server's
/// `getHeader` finds it: the name is case-sensitive, the first line with it wins,
/// spaces before the value are skipped, nothing after it is trimmed.
pub fn header_value<'h>(block: &'h [u8], name: &str) -> Option<&'h [u8]> {
    let mut lines = block.split(|&b| b == b'\n');
    let first = lines.next()?;
    if !first.starts_with(HEADER_VERSION_LINE) {
        return None;
    }
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if &line[..colon] == name.as_bytes() {
            let value = &line[colon + 1..];
            let start = value.iter().position(|&b| b != b' ').unwrap_or(value.len());
            return Some(&value[start..]);
        }
    }
    None
}

/// A header value as a sequence; a value that is not a number matches no sequence
/// (nats-server parses it to -1, i.e. u64::MAX).
fn header_seq(value: &[u8]) -> u64 {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(u64::MAX)
}

/// What to do with a publish that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishPlan {
    /// Add it to the next batch for [`Stream::commit`].
    Store,
    /// Its `Nats-Msg-Id` was stored within the duplicate window: reply with this ack
    /// (the original's sequence, `duplicate: true`) and store nothing.
    Duplicate(PubAck),
}

/// A publish the owner collected for the next [`Stream::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMessage {
    pub subject: Vec<u8>,
    /// The NATS/1.0 header block, empty when the message had none.
    pub headers: Vec<u8>,
    pub payload: Vec<u8>,
    /// When it arrived; also the clock for the limits the commit enforces.
    pub timestamp_ns: i64,
}

/// A message read back from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub subject: Vec<u8>,
    pub headers: Vec<u8>,
    pub payload: Vec<u8>,
    pub timestamp_ns: i64,
}

/// Why a read found nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No live message there: the client's request is answered with 10037.
    #[error("no message found")]
    NotFound,
    /// The store failed to read (the disk's fault).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ReadError {
    /// The reply for a request that found nothing; `None` for a store failure.
    pub fn api_error(&self) -> Option<ApiError> {
        match self {
            ReadError::NotFound => Some(errors::NO_MESSAGE_FOUND.into()),
            ReadError::Store(_) => None,
        }
    }
}

/// A live message's bookkeeping, kept in memory so limits never read the disk.
#[derive(Debug, Clone)]
struct MessageMeta {
    /// Shared with the per-subject map's key: one allocation per subject, not per
    /// message (a 1 GiB stream of small messages holds millions).
    subject: Rc<[u8]>,
    bytes: u64,
    timestamp_ns: i64,
}

/// A subject's live sequences, oldest first, with the subject's shared name (the
/// map's key again, so a message can take a reference to it in the same lookup).
#[derive(Debug)]
struct SubjectSeqs {
    name: Rc<[u8]>,
    seqs: VecDeque<u64>,
}

impl std::ops::Deref for SubjectSeqs {
    type Target = VecDeque<u64>;

    fn deref(&self) -> &VecDeque<u64> {
        &self.seqs
    }
}

impl std::ops::DerefMut for SubjectSeqs {
    fn deref_mut(&mut self) -> &mut VecDeque<u64> {
        &mut self.seqs
    }
}

/// A message id seen within the duplicate window.
#[derive(Debug, Clone, Copy)]
struct SeenId {
    seq: u64,
    timestamp_ns: i64,
}

/// Changes a commit has checked but not yet stored, so each message of a batch is
/// checked against the stream as it will be after the ones before it.
#[derive(Debug, Default)]
struct Pending {
    messages: u64,
    bytes: u64,
    last_seq: Option<u64>,
    last_msg_id: Option<Vec<u8>>,
    /// Per subject: how many of the batch, and the last sequence.
    subjects: HashMap<Vec<u8>, (u64, u64)>,
    msg_ids: HashMap<Vec<u8>, u64>,
}

/// What an empty stream reports as its start, as nats-server 2.9's file store does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmptyStart {
    /// Never held a message nor was purged: `first_seq` 0.
    #[default]
    Untouched,
    /// Emptied by a purge of every subject: `first_ts` is Go's zero time.
    Purged,
    /// Emptied by removing its last messages one by one (delete, max_age or another
    /// limit, a purge by subject), or reopened empty after a restart: `first_ts` is
    /// the Unix epoch (the store's empty block has a first timestamp of 0), and a
    /// stream that never held a message starts at 1.
    Removed,
}

/// What a stream knew beyond its log, handed to the stream an update reopens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamMemory {
    last_seq: u64,
    last_timestamp_ns: i64,
    empty: bool,
    empty_start: EmptyStart,
}

/// How a stream stores its log: the segment layout and when appends are synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamOptions {
    pub log: LogConfig,
    pub durability: Durability,
}

/// What a stream knows of its messages, rebuilt from the log at open (in the same
/// pass as the log's recovery) and kept current by every commit and removal.
#[derive(Debug, Default)]
struct Index {
    /// Live messages by sequence; sequences between the first and last live ones that
    /// are missing here are the interior deletes.
    live: LiveMessages,
    bytes: u64,
    /// Live sequences per subject, oldest first.
    subjects: HashMap<Rc<[u8]>, SubjectSeqs>,
    /// The last sequence ever stored (0 if none) and its timestamp.
    last_seq: u64,
    last_timestamp_ns: i64,
    /// The `Nats-Msg-Id` of the last stored message (empty if it had none).
    last_msg_id: Vec<u8>,
    msg_ids: HashMap<Vec<u8>, SeenId>,
    /// The same ids in the order they were stored, for pruning the window.
    msg_id_order: VecDeque<(i64, Vec<u8>)>,
}

impl Index {
    /// Records that message `seq` was stored (live or since deleted): the last
    /// sequence, its timestamp and its dedupe id.
    fn note_stored(&mut self, seq: u64, headers: &[u8], timestamp_ns: i64) {
        assert!(seq > self.last_seq, "sequences only grow");
        self.last_seq = seq;
        self.last_timestamp_ns = timestamp_ns;
        let id = header_value(headers, headers::MSG_ID).unwrap_or(&[]);
        self.last_msg_id.clear();
        self.last_msg_id.extend_from_slice(id);
        if !id.is_empty() {
            self.msg_ids
                .insert(id.to_vec(), SeenId { seq, timestamp_ns });
            self.msg_id_order.push_back((timestamp_ns, id.to_vec()));
        }
    }

    /// Adds stored message `seq` to the live messages.
    fn insert_live(
        &mut self,
        seq: u64,
        subject: &[u8],
        headers_len: usize,
        payload_len: usize,
        timestamp_ns: i64,
    ) {
        let bytes = stored_bytes(subject.len(), headers_len, payload_len);
        // One lookup per message on the common path (a subject seen before).
        let shared = match self.subjects.get_mut(subject) {
            Some(entry) => {
                entry.seqs.push_back(seq);
                Rc::clone(&entry.name)
            }
            None => {
                let name: Rc<[u8]> = subject.into();
                let entry = SubjectSeqs {
                    name: Rc::clone(&name),
                    seqs: VecDeque::from([seq]),
                };
                self.subjects.insert(Rc::clone(&name), entry);
                name
            }
        };
        self.live.insert(
            seq,
            MessageMeta {
                subject: shared,
                bytes,
                timestamp_ns,
            },
        );
        self.bytes += bytes;
    }

    /// Moves the timestamps of sequences `from..=to` (the newest ones) by
    /// `shift_ns`: live messages, dedupe ids and the last timestamp. The
    /// dedupe order stays sorted, since only its newest entries move.
    fn shift_timestamps(&mut self, from: u64, to: u64, shift_ns: i64) {
        for seq in from..=to {
            if let Some(meta) = self.live.get_mut(seq) {
                meta.timestamp_ns = meta.timestamp_ns.saturating_add(shift_ns);
            }
        }
        for (timestamp_ns, id) in self.msg_id_order.iter_mut().rev() {
            let Some(seen) = self.msg_ids.get_mut(id) else {
                continue;
            };
            if seen.seq < from {
                break;
            }
            if seen.seq <= to && seen.timestamp_ns == *timestamp_ns {
                seen.timestamp_ns = seen.timestamp_ns.saturating_add(shift_ns);
                *timestamp_ns = seen.timestamp_ns;
            }
        }
        if (from..=to).contains(&self.last_seq) {
            self.last_timestamp_ns = self.last_timestamp_ns.saturating_add(shift_ns);
        }
    }

    /// Removes a live message; returns whether it was live.
    fn remove_live(&mut self, seq: u64) -> bool {
        let Some(meta) = self.live.remove(&seq) else {
            return false;
        };
        self.bytes -= meta.bytes;
        let seqs = self
            .subjects
            .get_mut(&meta.subject)
            .expect("a live message's subject is counted");
        let index = seqs
            .binary_search(&seq)
            .expect("a live message is in its subject's list");
        seqs.remove(index);
        if seqs.is_empty() {
            self.subjects.remove(&meta.subject);
        }
        true
    }
}

/// A stream: its config, its log and the state rebuilt from the log.
pub struct Stream<D: Directory> {
    config: StreamConfig,
    log: Log<D>,
    durability: Durability,
    /// Sequences that the limits removed (in memory) and the log's `deletes` file does
    /// not record yet: written with the next durable deletion (see the module doc).
    unrecorded: RunSet,
    index: Index,
    /// Where the logical stream starts when it holds no message (after a purge).
    first_seq_when_empty: u64,
    /// How it became empty, for the `first_ts` (and `first_seq`) it then reports.
    empty_start: EmptyStart,
    /// Messages after this sequence were stamped since the clock was last
    /// trusted (since the open, or the last jump): a forward jump of the wall
    /// clock moves their timestamps by as much (see `jetstream::clock`).
    stamped_after_seq: u64,
    /// The corrections made so far that still cover live messages, kept in
    /// the `clock` file and applied again at every open.
    clock_shifts: Vec<ClockShift>,
}

/// Timestamps of sequences `from_seq..=to_seq` are `shift_ns` later than the
/// log records them (they were stamped by a clock that was behind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ClockShift {
    from_seq: u64,
    to_seq: u64,
    shift_ns: i64,
}

/// The stream's clock corrections, next to its segments.
const CLOCK_FILE: &str = "clock";
const CLOCK_FILE_MAGIC: &[u8; 4] = b"PCK1";

fn encode_clock_shifts(shifts: &[ClockShift]) -> Vec<u8> {
    let mut out = CLOCK_FILE_MAGIC.to_vec();
    out.extend_from_slice(&(shifts.len() as u32).to_le_bytes());
    for s in shifts {
        out.extend_from_slice(&s.from_seq.to_le_bytes());
        out.extend_from_slice(&s.to_seq.to_le_bytes());
        out.extend_from_slice(&s.shift_ns.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode_clock_shifts(bytes: &[u8]) -> Option<Vec<ClockShift>> {
    let (body, crc) = bytes.split_last_chunk::<4>()?;
    if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
        return None;
    }
    let rest = body.strip_prefix(CLOCK_FILE_MAGIC)?;
    let (count, mut rest) = rest.split_first_chunk::<4>()?;
    let count = u32::from_le_bytes(*count) as usize;
    let mut shifts = Vec::new();
    for _ in 0..count {
        let (from, r) = rest.split_first_chunk::<8>()?;
        let (to, r) = r.split_first_chunk::<8>()?;
        let (shift, r) = r.split_first_chunk::<8>()?;
        rest = r;
        shifts.push(ClockShift {
            from_seq: u64::from_le_bytes(*from),
            to_seq: u64::from_le_bytes(*to),
            shift_ns: i64::from_le_bytes(*shift),
        });
    }
    rest.is_empty().then_some(shifts)
}

/// How many records recovery reads between two progress reports.
pub const RECOVERY_PROGRESS_RECORDS: u64 = 16 * 1024;

impl<D: Directory> Stream<D> {
    /// Opens (or creates) the stream's log in `dir` and rebuilds its state by scanning
    /// it, then applies the limits as of `now_ns`.
    pub fn open(dir: D, config: StreamConfig, now_ns: i64) -> Result<Self, StoreError> {
        Self::open_with_log_config(dir, config, LogConfig::default(), now_ns)
    }

    /// [`Stream::open`] with a chosen segment layout (tests roll tiny segments).
    pub fn open_with_log_config(
        dir: D,
        config: StreamConfig,
        log_config: LogConfig,
        now_ns: i64,
    ) -> Result<Self, StoreError> {
        let options = StreamOptions {
            log: log_config,
            durability: Durability::Always,
        };
        Self::open_with_options(dir, config, options, now_ns)
    }

    /// [`Stream::open`] with a chosen segment layout and durability mode.
    pub fn open_with_options(
        dir: D,
        config: StreamConfig,
        options: StreamOptions,
        now_ns: i64,
    ) -> Result<Self, StoreError> {
        Self::open_reporting(dir, config, options, now_ns, &mut |_| {})
    }

    /// [`Stream::open_with_options`] calling `progress` with the count of
    /// records read so far every [`RECOVERY_PROGRESS_RECORDS`] records (a
    /// counter per record; the callback decides whether to tell anyone).
    pub fn open_reporting(
        dir: D,
        config: StreamConfig,
        options: StreamOptions,
        now_ns: i64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Self, StoreError> {
        // One pass: the stream's index is built from the records the log's recovery
        // reads and checks anyway (records below the purge floor are not shown).
        let mut index = Index::default();
        let mut records_read = 0u64;
        let log = Log::open_visiting(dir, options.log, &mut |record| {
            records_read += 1;
            if records_read.is_multiple_of(RECOVERY_PROGRESS_RECORDS) {
                progress(records_read);
            }
            index.note_stored(record.seq, record.headers, record.timestamp_ns);
            let (headers_len, payload_len) = (record.headers.len(), record.payload.len());
            index.insert_live(
                record.seq,
                record.subject,
                headers_len,
                payload_len,
                record.timestamp_ns,
            );
        })?;
        // Deleted records still count for the last sequence and its timestamp, and
        // their dedupe ids stay in the window, as before the restart; they are just
        // not live.
        let last_live = index.live.last_key_value().map_or(0, |(seq, _)| seq);
        for run in log.deleted().iter() {
            for seq in run.start..run.end.min(last_live + 1) {
                index.remove_live(seq);
            }
        }
        // A log whose records all lie below its floor starts after them.
        index.last_seq = index.last_seq.max(log.first_seq() - 1);
        assert_eq!(
            index.last_seq,
            log.last_seq(),
            "recovery visited every record"
        );
        // Timestamps a clock jump corrected (written whole or not at all; a
        // damaged file is reported and the log's own timestamps stand).
        let clock_shifts = match read_if_present(log.dir(), CLOCK_FILE)? {
            Some(bytes) => decode_clock_shifts(&bytes).unwrap_or_else(|| {
                tracing::warn!(
                    "stream {}: unreadable {CLOCK_FILE} file ignored",
                    config.name
                );
                Vec::new()
            }),
            None => Vec::new(),
        };
        for shift in &clock_shifts {
            index.shift_timestamps(shift.from_seq, shift.to_seq, shift.shift_ns);
        }
        let stamped_after_seq = index.last_seq;
        let mut stream = Stream {
            config,
            durability: options.durability,
            unrecorded: RunSet::new(),
            first_seq_when_empty: log.first_seq(),
            empty_start: EmptyStart::Untouched,
            log,
            index,
            stamped_after_seq,
            clock_shifts,
        };
        stream.enforce_limits(now_ns)?;
        Ok(stream)
    }

    pub fn config(&self) -> &StreamConfig {
        &self.config
    }

    /// The timestamp of the last message stored (0 if none).
    pub fn last_timestamp_ns(&self) -> i64 {
        self.index.last_timestamp_ns
    }

    /// The wall clock jumped forward by `jump_ns` beyond the monotonic clock:
    /// the messages stamped since the clock was last trusted were stamped
    /// that much too early, so max_age and the duplicate window would count
    /// them too old. Their timestamps move by `jump_ns`, durably (the `clock`
    /// file), and the clock is trusted from here on.
    pub fn clock_jumped(&mut self, jump_ns: i64) -> Result<(), StoreError> {
        let (from_seq, to_seq) = (self.stamped_after_seq + 1, self.index.last_seq);
        self.stamped_after_seq = to_seq;
        if from_seq > to_seq || jump_ns <= 0 {
            return Ok(());
        }
        self.index.shift_timestamps(from_seq, to_seq, jump_ns);
        let first = self.first_seq();
        self.clock_shifts.retain(|s| s.to_seq >= first);
        self.clock_shifts.push(ClockShift {
            from_seq,
            to_seq,
            shift_ns: jump_ns,
        });
        replace_atomically(
            self.log.dir(),
            CLOCK_FILE,
            &encode_clock_shifts(&self.clock_shifts),
        )
    }

    /// The clock is the wall clock and looks set: what was stamped so far
    /// needs no correction by a later jump.
    pub fn clock_trusted(&mut self) {
        self.stamped_after_seq = self.index.last_seq;
    }

    /// A live message's timestamp, corrected for clock jumps.
    pub fn timestamp_of(&self, seq: u64) -> Option<i64> {
        self.index.live.get(seq).map(|meta| meta.timestamp_ns)
    }

    /// When this stream's appends are synced.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Makes every message committed so far durable; what `interval` mode's timer
    /// calls (a no-op when nothing is pending, as always in `always` mode). An error
    /// fails the log for good, as any store I/O error does.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.log.sync()
    }

    /// Bytes committed but not yet synced (0 in `always` mode).
    pub fn unsynced_bytes(&self) -> u64 {
        self.log.unsynced_bytes()
    }

    /// Syncs what is pending and closes the stream: the clean shutdown, after which
    /// nothing acknowledged is lost in any mode.
    pub fn close(self) -> Result<(), StoreError> {
        self.log.close()
    }

    /// Whether a publish on `subject` belongs to this stream.
    pub fn accepts(&self, subject: &[u8]) -> bool {
        self.config
            .subjects
            .iter()
            .any(|pattern| subject_matches(pattern.as_bytes(), subject))
    }

    /// Checks a publish against the stream as committed, in nats-server's order:
    /// Nats-Expected-Stream, Nats-Msg-Id dedupe, Nats-Expected-Last-Subject-Sequence,
    /// Nats-Expected-Last-Sequence, Nats-Expected-Last-Msg-Id, max_msg_size, then the
    /// discard=new limits. [`Stream::commit`] checks again with the batch's earlier
    /// messages counted, so a batch never breaks a rule this accepted alone.
    pub fn check_publish(
        &self,
        subject: &[u8],
        headers: Option<&[u8]>,
        payload_len: usize,
        now_ns: i64,
    ) -> Result<PublishPlan, ApiError> {
        self.check(
            &Pending::default(),
            subject,
            headers.unwrap_or(&[]),
            payload_len,
            now_ns,
        )
    }

    fn check(
        &self,
        pending: &Pending,
        subject: &[u8],
        header_block: &[u8],
        payload_len: usize,
        now_ns: i64,
    ) -> Result<PublishPlan, ApiError> {
        let header = |name| header_value(header_block, name);
        if let Some(expected) = header(headers::EXPECTED_STREAM) {
            if !expected.is_empty() && expected != self.config.name.as_bytes() {
                return Err(errors::EXPECTED_STREAM_MISMATCH.into());
            }
        }
        if let Some(id) = header(headers::MSG_ID).filter(|id| !id.is_empty()) {
            if let Some(&seq) = pending.msg_ids.get(id) {
                return Ok(PublishPlan::Duplicate(self.duplicate_ack(seq)));
            }
            if let Some(seen) = self.index.msg_ids.get(id) {
                if !self.outside_window(seen.timestamp_ns, now_ns) {
                    return Ok(PublishPlan::Duplicate(self.duplicate_ack(seen.seq)));
                }
            }
        }
        if let Some(value) =
            header(headers::EXPECTED_LAST_SUBJECT_SEQUENCE).filter(|v| !v.is_empty())
        {
            let actual = match pending.subjects.get(subject) {
                Some(&(_, last)) => last,
                None => self
                    .index
                    .subjects
                    .get(subject)
                    .and_then(|seqs| seqs.back().copied())
                    .unwrap_or(0),
            };
            if header_seq(value) != actual {
                return Err(ApiError::wrong_last_sequence(actual));
            }
        }
        if let Some(value) = header(headers::EXPECTED_LAST_SEQUENCE).filter(|v| !v.is_empty()) {
            let actual = pending.last_seq.unwrap_or(self.index.last_seq);
            if header_seq(value) != actual {
                return Err(ApiError::wrong_last_sequence(actual));
            }
        }
        if let Some(expected) = header(headers::EXPECTED_LAST_MSG_ID).filter(|v| !v.is_empty()) {
            let actual = pending
                .last_msg_id
                .as_deref()
                .unwrap_or(&self.index.last_msg_id);
            if expected != actual {
                return Err(ApiError::wrong_last_msg_id(&String::from_utf8_lossy(
                    actual,
                )));
            }
        }
        let max_msg_size = self.config.max_msg_size;
        if max_msg_size >= 0 && (header_block.len() + payload_len) as u64 > max_msg_size as u64 {
            return Err(errors::MESSAGE_SIZE_EXCEEDS_MAXIMUM.into());
        }
        if self.config.discard == DiscardPolicy::New {
            let messages = self.index.live.len() as u64 + pending.messages;
            let bytes = self.index.bytes + pending.bytes;
            let size = stored_bytes(subject.len(), header_block.len(), payload_len);
            if self.config.max_msgs > 0 && messages + 1 > self.config.max_msgs as u64 {
                return Err(store_failed(MAX_MSGS_EXCEEDED_REASON));
            }
            if self.config.max_bytes > 0 && bytes + size > self.config.max_bytes as u64 {
                return Err(store_failed(MAX_BYTES_EXCEEDED_REASON));
            }
            let per_subject = self.config.max_msgs_per_subject;
            if per_subject > 0 && self.config.discard_new_per_subject {
                let stored = self
                    .index
                    .subjects
                    .get(subject)
                    .map_or(0, |seqs| seqs.len() as u64);
                let batched = pending.subjects.get(subject).map_or(0, |&(count, _)| count);
                if stored + batched + 1 > per_subject as u64 {
                    return Err(store_failed(MAX_MSGS_PER_SUBJECT_EXCEEDED_REASON));
                }
            }
        }
        Ok(PublishPlan::Store)
    }

    fn duplicate_ack(&self, seq: u64) -> PubAck {
        PubAck {
            stream: self.config.name.clone(),
            seq,
            duplicate: true,
            ..PubAck::default()
        }
    }

    fn outside_window(&self, timestamp_ns: i64, now_ns: i64) -> bool {
        now_ns.saturating_sub(timestamp_ns) > self.config.duplicate_window_ns
    }

    /// Checks every message again (counting the batch's earlier ones), appends the
    /// accepted ones with one [`Log::append`] (one write, one fdatasync; in the
    /// `interval` and `none` modes [`Log::append_unsynced`], one write), updates the
    /// state and enforces the discard=old limits as of the last message's timestamp.
    /// Returns one reply per message, in order. On `Err` nothing is acknowledged.
    pub fn commit(
        &mut self,
        batch: &[PlannedMessage],
    ) -> Result<Vec<Result<PubAck, ApiError>>, StoreError> {
        let sync = self.durability.syncs_every_append();
        self.commit_with(batch, sync)
    }

    /// [`Stream::commit`] that writes without syncing, whatever the mode: the caller
    /// syncs the log out of line ([`Stream::sync_ticket`], [`Stream::sync_handle`],
    /// then [`Stream::finish_sync`]) and, in the `always` mode, sends none of the
    /// replies, and lets nothing read the new messages, until that sync returned.
    pub fn commit_unsynced(
        &mut self,
        batch: &[PlannedMessage],
    ) -> Result<Vec<Result<PubAck, ApiError>>, StoreError> {
        self.commit_with(batch, false)
    }

    /// What an out-of-line sync must cover; `None` when all is durable.
    pub fn sync_ticket(&self) -> Option<SyncTicket> {
        self.log.sync_ticket()
    }

    /// A handle another thread can `fdatasync`; `None` on the simulated disk.
    pub fn sync_handle(&self) -> Result<Option<std::fs::File>, StoreError> {
        self.log.sync_handle()
    }

    /// The out-of-line sync of `ticket` returned `Ok`.
    pub fn finish_sync(&mut self, ticket: SyncTicket) {
        self.log.finish_sync(ticket)
    }

    /// The out-of-line sync failed: the stream acknowledges nothing more.
    pub fn fail(&mut self) {
        self.log.fail()
    }

    fn commit_with(
        &mut self,
        batch: &[PlannedMessage],
        sync: bool,
    ) -> Result<Vec<Result<PubAck, ApiError>>, StoreError> {
        let mut pending = Pending::default();
        let mut replies = Vec::with_capacity(batch.len());
        let mut accepted = Vec::with_capacity(batch.len());
        let mut next_seq = self.log.next_seq();
        for message in batch {
            let plan = self.check(
                &pending,
                &message.subject,
                &message.headers,
                message.payload.len(),
                message.timestamp_ns,
            );
            match plan {
                Err(error) => replies.push(Err(error)),
                Ok(PublishPlan::Duplicate(ack)) => replies.push(Ok(ack)),
                Ok(PublishPlan::Store) => {
                    let seq = next_seq;
                    next_seq += 1;
                    pending.messages += 1;
                    pending.bytes += stored_bytes(
                        message.subject.len(),
                        message.headers.len(),
                        message.payload.len(),
                    );
                    pending.last_seq = Some(seq);
                    let id = header_value(&message.headers, headers::MSG_ID).unwrap_or(&[]);
                    if !id.is_empty() {
                        pending.msg_ids.insert(id.to_vec(), seq);
                    }
                    pending.last_msg_id = Some(id.to_vec());
                    let entry = pending.subjects.entry(message.subject.clone()).or_default();
                    *entry = (entry.0 + 1, seq);
                    accepted.push(message);
                    replies.push(Ok(PubAck {
                        stream: self.config.name.clone(),
                        seq,
                        ..PubAck::default()
                    }));
                }
            }
        }
        let records: Vec<NewRecord<'_>> = accepted
            .iter()
            .map(|message| NewRecord {
                timestamp_ns: message.timestamp_ns,
                subject: &message.subject,
                headers: &message.headers,
                payload: &message.payload,
            })
            .collect();
        let seqs = if sync {
            self.log.append(&records)?
        } else {
            self.log.append_unsynced(&records)?
        };
        assert_eq!(seqs.end, next_seq, "the log assigns the sequences planned");
        for (seq, message) in seqs.zip(&accepted) {
            self.note_stored(seq, &message.headers, message.timestamp_ns);
            self.insert_live(
                seq,
                &message.subject,
                message.headers.len(),
                message.payload.len(),
                message.timestamp_ns,
            );
        }
        if let Some(last) = batch.iter().map(|m| m.timestamp_ns).max() {
            self.enforce_limits(last)?;
        }
        Ok(replies)
    }

    fn note_stored(&mut self, seq: u64, headers: &[u8], timestamp_ns: i64) {
        self.index.note_stored(seq, headers, timestamp_ns)
    }

    fn insert_live(
        &mut self,
        seq: u64,
        subject: &[u8],
        headers_len: usize,
        payload_len: usize,
        timestamp_ns: i64,
    ) {
        self.index
            .insert_live(seq, subject, headers_len, payload_len, timestamp_ns)
    }

    /// Removes a live message from the in-memory state; returns whether it was live.
    fn remove(&mut self, seq: u64) -> bool {
        if !self.index.remove_live(seq) {
            return false;
        }
        if self.index.live.is_empty() {
            self.first_seq_when_empty = self.index.last_seq + 1;
            self.empty_start = EmptyStart::Removed;
        }
        true
    }

    /// Removes a live message because of a limit: in memory, and remembered for the
    /// next durable deletion.
    fn trim(&mut self, seq: u64) {
        if self.remove(seq) {
            self.unrecorded.insert(seq..seq + 1);
        }
    }

    /// Applies max_age, max_msgs, max_bytes and max_msgs_per_subject (discarding the
    /// oldest), prunes the dedupe window and drops whole segments below the first
    /// live message.
    fn enforce_limits(&mut self, now_ns: i64) -> Result<(), StoreError> {
        if self.config.max_age_ns > 0 {
            let oldest_kept_ns = now_ns.saturating_sub(self.config.max_age_ns);
            while let Some((seq, meta)) = self.index.live.first_key_value() {
                if meta.timestamp_ns > oldest_kept_ns {
                    break;
                }
                self.trim(seq);
            }
        }
        if self.config.max_msgs > 0 {
            while self.index.live.len() as u64 > self.config.max_msgs as u64 {
                self.remove_first();
            }
        }
        if self.config.max_bytes > 0 {
            while self.index.bytes > self.config.max_bytes as u64 {
                self.remove_first();
            }
        }
        let per_subject = self.config.max_msgs_per_subject;
        if per_subject > 0 {
            let over: Vec<u64> = self
                .index
                .subjects
                .values()
                .filter(|seqs| seqs.len() as u64 > per_subject as u64)
                .flat_map(|seqs| seqs.iter().take(seqs.len() - per_subject as usize).copied())
                .collect();
            for seq in over {
                self.trim(seq);
            }
        }
        while let Some(&(timestamp_ns, _)) = self.index.msg_id_order.front() {
            if !self.outside_window(timestamp_ns, now_ns) {
                break;
            }
            let (_, id) = self.index.msg_id_order.pop_front().expect("front exists");
            if self
                .index
                .msg_ids
                .get(&id)
                .is_some_and(|seen| seen.timestamp_ns == timestamp_ns)
            {
                self.index.msg_ids.remove(&id);
            }
        }
        self.drop_segments()
    }

    fn remove_first(&mut self) {
        let (seq, _) = self
            .index
            .live
            .first_key_value()
            .expect("over a limit means not empty");
        self.trim(seq);
    }

    fn drop_segments(&mut self) -> Result<(), StoreError> {
        let first = self.first_seq();
        if first > self.log.first_seq() && !self.log.is_empty() {
            self.log.purge_below(first)?;
        }
        self.unrecorded.remove_below(self.log.first_seq());
        Ok(())
    }

    /// Makes the deletion of `runs` durable, with every removal by the limits that is
    /// not recorded yet, after syncing what was appended before (so that no deletion
    /// that a limit derived from an unsynced message outlives that message).
    fn persist_deletes(
        &mut self,
        runs: impl IntoIterator<Item = Range<u64>>,
    ) -> Result<(), StoreError> {
        self.log.sync()?;
        let all: Vec<Range<u64>> = self.unrecorded.iter().chain(runs).collect();
        self.log.delete(&all)?;
        self.unrecorded.clear();
        Ok(())
    }

    /// Deletes live message `seq` (`$JS.API.STREAM.MSG.DELETE`); `Ok(false)` if it is
    /// not live. When this returns `Ok(true)` the deletion is durable: the message is
    /// never read or delivered again, also after a crash. Deleting the first live
    /// message moves the stream's first sequence, as in nats-server.
    ///
    /// `no_erase` is accepted for the API's sake: nats-server overwrites the payload
    /// on disk unless it is set; perch treats both alike — the record's bytes stay in
    /// their segment (unreadable through every API) until the segment is removed.
    pub fn delete_msg(&mut self, seq: u64, no_erase: bool) -> Result<bool, StoreError> {
        let _ = no_erase;
        if !self.index.live.contains_key(&seq) {
            return Ok(false);
        }
        self.persist_deletes(std::iter::once(seq..seq + 1))?;
        self.remove(seq);
        self.drop_segments()?;
        Ok(true)
    }

    /// Expires messages older than max_age and ids outside the duplicate window.
    pub fn expire(&mut self, now_ns: i64) -> Result<(), StoreError> {
        self.enforce_limits(now_ns)
    }

    /// The first live sequence, or where the stream starts when it holds none.
    fn first_seq(&self) -> u64 {
        match self.index.live.first_key_value() {
            Some((seq, _)) => seq,
            None => self.first_seq_when_empty.max(self.index.last_seq + 1),
        }
    }

    /// Reads live message `seq`.
    pub fn get(&self, seq: u64) -> Result<StoredMessage, ReadError> {
        if !self.index.live.contains_key(&seq) {
            return Err(ReadError::NotFound);
        }
        let mut buf = Vec::new();
        let record = self.log.read(seq, &mut buf)?.ok_or(ReadError::NotFound)?;
        Ok(StoredMessage {
            seq: record.seq,
            subject: record.subject.to_vec(),
            headers: record.headers.to_vec(),
            payload: record.payload.to_vec(),
            timestamp_ns: self.timestamp_of(seq).unwrap_or(record.timestamp_ns),
        })
    }

    /// The newest live message whose subject matches `filter` (wildcards allowed).
    pub fn get_last_by_subject(&self, filter: &[u8]) -> Result<StoredMessage, ReadError> {
        let last = match self.index.subjects.get(filter) {
            Some(seqs) => seqs.back().copied(),
            None => self
                .index
                .subjects
                .iter()
                .filter(|(subject, _)| subject_matches(filter, subject))
                .filter_map(|(_, seqs)| seqs.back().copied())
                .max(),
        };
        self.get(last.ok_or(ReadError::NotFound)?)
    }

    /// Removes the live messages matching `subject` (wildcards allowed; all when
    /// `None`) below `up_to_seq` (exclusive, as nats-server's purge `seq`; all when
    /// `None`). Returns how many were removed once the purge is durable (see the
    /// module doc); a purge of everything below a sequence past the end moves the next
    /// sequence there. On `Err` the log has failed, and a restart finds the purge
    /// either wholly applied or not at all.
    pub fn purge(
        &mut self,
        subject: Option<&[u8]>,
        up_to_seq: Option<u64>,
    ) -> Result<u64, StoreError> {
        let end = up_to_seq.unwrap_or(u64::MAX);
        let doomed: Vec<u64> = self
            .index
            .live
            .range(..end)
            .filter(|(_, meta)| match subject {
                None => true,
                Some(filter) => subject_matches(filter, &meta.subject),
            })
            .map(|(seq, _)| seq)
            .collect();
        self.log.sync()?;
        // The doomed messages are a subsequence of the live ones: if they are the
        // first ones, the purge floor says it all; if a live message stays before one
        // of them, the log's `deletes` file must say which.
        let prefix = self
            .index
            .live
            .keys()
            .zip(&doomed)
            .take_while(|(a, b)| a == *b)
            .count();
        if prefix < doomed.len() {
            self.persist_deletes(runs_of(&doomed))?;
        }
        for &seq in &doomed {
            self.remove(seq);
        }
        if self.index.live.is_empty() {
            // nats-server compacts to `up_to_seq` when a purge of every subject
            // reaches past the end: the stream then starts (and continues) there.
            let past_end = match (subject, up_to_seq) {
                (None, Some(seq)) => seq,
                _ => 0,
            };
            self.first_seq_when_empty = past_end.max(self.index.last_seq + 1);
            if subject.is_none() {
                self.empty_start = EmptyStart::Purged;
            }
        }
        self.log.raise_floor(self.first_seq())?;
        if self.log.last_seq() > self.index.last_seq {
            assert!(
                self.index.live.is_empty(),
                "only a purge of everything moves the end"
            );
            self.index.last_seq = self.log.last_seq();
        }
        self.unrecorded.remove_below(self.log.first_seq());
        self.drop_segments()?;
        Ok(doomed.len() as u64)
    }

    /// The stream was just reopened after a restart (not by an update): an empty
    /// stream now reports what nats-server 2.9's file store recovers for it, the
    /// Unix epoch as `first_ts` and, if it never held a message, `first_seq` 1.
    pub fn note_restart(&mut self) {
        if self.index.live.is_empty() {
            self.empty_start = EmptyStart::Removed;
        }
    }

    /// What the log alone does not tell, for [`Stream::carry_over`].
    pub fn memory(&self) -> StreamMemory {
        StreamMemory {
            last_seq: self.index.last_seq,
            last_timestamp_ns: self.index.last_timestamp_ns,
            empty: self.index.live.is_empty(),
            empty_start: self.empty_start,
        }
    }

    /// The stream was reopened by an update (no restart): keeps the last message's
    /// time when a purge left no record of it, and how an empty stream got empty.
    pub fn carry_over(&mut self, old: StreamMemory) {
        if self.index.last_seq == old.last_seq && self.index.last_timestamp_ns == 0 {
            self.index.last_timestamp_ns = old.last_timestamp_ns;
        }
        if self.index.live.is_empty() && old.empty {
            self.empty_start = old.empty_start;
        }
    }

    /// The stream's state as a stream info reply shows it (no consumers counted, no
    /// subject or deleted details).
    pub fn state(&self) -> StreamState {
        let mut state = StreamState::empty();
        if self.index.last_seq == 0 && self.empty_start == EmptyStart::Untouched {
            return state;
        }
        state.messages = self.index.live.len() as u64;
        state.bytes = self.index.bytes;
        state.first_seq = self.first_seq();
        state.last_seq = self.index.last_seq;
        // A purge past the end of a stream that never stored a message moves the
        // last sequence but leaves Go's zero time, until a restart (the epoch then).
        let stored_or_reopened =
            self.index.last_timestamp_ns != 0 || self.empty_start == EmptyStart::Removed;
        if self.index.last_seq > 0 && stored_or_reopened {
            state.last_ts = Timestamp::from_unix_nanos(self.index.last_timestamp_ns);
        }
        match self.index.live.first_key_value() {
            Some((_, meta)) => {
                state.first_ts = Timestamp::from_unix_nanos(meta.timestamp_ns);
                state.num_deleted = self.index.last_seq - state.first_seq + 1 - state.messages;
            }
            None if self.empty_start == EmptyStart::Removed => {
                state.first_ts = Timestamp::from_unix_nanos(0);
            }
            None => {}
        }
        state.num_subjects = self.index.subjects.len() as u64;
        state
    }

    /// The interior deletes: sequences between the first and last live messages that
    /// are gone (a stream info's `deleted` with `deleted_details`).
    pub fn deleted(&self) -> Vec<u64> {
        let mut deleted = Vec::new();
        let mut expected = self.first_seq();
        for seq in self.index.live.keys() {
            deleted.extend(expected..seq);
            expected = seq + 1;
        }
        deleted.extend(expected..=self.index.last_seq);
        deleted
    }

    /// The stream's log: for consumers reading in order.
    pub fn log(&self) -> &Log<D> {
        &self.log
    }

    /// Whether `seq` is a live message (consumers skip the rest).
    pub fn is_live(&self, seq: u64) -> bool {
        self.index.live.contains_key(&seq)
    }
}

/// Sorted sequences as runs of consecutive ones.
fn runs_of(seqs: &[u64]) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    for &seq in seqs {
        match runs.last_mut() {
            Some(run) if run.end == seq => run.end += 1,
            _ => runs.push(seq..seq + 1),
        }
    }
    runs
}

fn store_failed(reason: &str) -> ApiError {
    ApiError {
        code: 503,
        err_code: STORE_FAILED_ERR_CODE,
        description: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    //! Replays the publishes captured from nats-server (`tests/fixtures/jetstream/pub_*`)
    //! and checks the exact reply bytes, then each limit, expiry on a virtual clock
    //! and recovery after simulated power cuts.

    use std::path::Path;

    use super::*;
    use crate::jetstream::api::PubAckResponse;
    use crate::store::SimDirectory;

    const SECOND_NS: i64 = 1_000_000_000;
    /// A virtual clock's start; any instant works.
    const T0_NS: i64 = 1_700_000_000 * SECOND_NS;

    fn config(json: &str) -> StreamConfig {
        let config: StreamConfig = serde_json::from_str(json).expect("test config parses");
        config.with_server_defaults()
    }

    fn open(dir: &SimDirectory, config: &StreamConfig, now_ns: i64) -> Stream<SimDirectory> {
        let log_config = LogConfig {
            segment_bytes_max: 512,
            index_interval_records: 4,
        };
        Stream::open_with_log_config(dir.clone(), config.clone(), log_config, now_ns)
            .expect("sim disk opens")
    }

    /// Checks and commits one publish, as the owner would: the reply as bytes on the
    /// wire (PubAck or error response).
    fn publish(
        stream: &mut Stream<SimDirectory>,
        subject: &str,
        headers: &str,
        payload: &[u8],
        now_ns: i64,
    ) -> String {
        let header_block = (!headers.is_empty()).then_some(headers.as_bytes());
        let name = stream.config().name.clone();
        let reply =
            match stream.check_publish(subject.as_bytes(), header_block, payload.len(), now_ns) {
                Err(error) => Err(error),
                Ok(PublishPlan::Duplicate(ack)) => Ok(ack),
                Ok(PublishPlan::Store) => {
                    let message = PlannedMessage {
                        subject: subject.as_bytes().to_vec(),
                        headers: headers.as_bytes().to_vec(),
                        payload: payload.to_vec(),
                        timestamp_ns: now_ns,
                    };
                    let mut replies = stream.commit(&[message]).expect("sim disk commits");
                    assert_eq!(replies.len(), 1);
                    replies.remove(0)
                }
            };
        match reply {
            Ok(ack) => PubAckResponse { error: None, ack }.encode(),
            Err(error) => PubAckResponse::failed(&name, error).encode(),
        }
    }

    #[test]
    fn header_values_as_nats_server_finds_them() {
        let check = |block: &str, name: &str, want: Option<&str>| {
            let got = header_value(block.as_bytes(), name);
            assert_eq!(got, want.map(str::as_bytes), "{block:?} {name}");
        };
        check(
            "NATS/1.0\r\nNats-Msg-Id: m1\r\n\r\n",
            "Nats-Msg-Id",
            Some("m1"),
        );
        check(
            "NATS/1.0\r\nNats-Msg-Id:m1\r\n\r\n",
            "Nats-Msg-Id",
            Some("m1"),
        );
        check(
            "NATS/1.0\r\nNats-Msg-Id:   m1 \r\n\r\n",
            "Nats-Msg-Id",
            Some("m1 "),
        );
        check("NATS/1.0\r\nnats-msg-id: m1\r\n\r\n", "Nats-Msg-Id", None);
        check(
            "NATS/1.0\r\nA: 1\r\nNats-Msg-Id: x\r\nNats-Msg-Id: y\r\n\r\n",
            "Nats-Msg-Id",
            Some("x"),
        );
        check("NATS/1.0\r\nX-Nats-Msg-Id: m1\r\n\r\n", "Nats-Msg-Id", None);
        check("NATS/1.0 503\r\n\r\n", "Nats-Msg-Id", None);
        check("HTTP/1.0\r\nNats-Msg-Id: m1\r\n\r\n", "Nats-Msg-Id", None);
        check("", "Nats-Msg-Id", None);
        check(
            "NATS/1.0\r\nNats-Expected-Last-Sequence: 4\r\n\r\n",
            "Nats-Expected-Last-Sequence",
            Some("4"),
        );
    }

    /// One captured publish: its subject, headers and payload, and the reply body.
    fn fixture(name: &str) -> (String, String, Vec<u8>, String) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jetstream")
            .join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path).expect("fixture exists");
        let json: serde_json::Value = serde_json::from_str(&text).expect("fixture is JSON");
        let field = |value: &serde_json::Value| value.as_str().unwrap_or_default().to_owned();
        (
            field(&json["subject"]),
            field(&json["request_headers"]),
            field(&json["request"]).into_bytes(),
            field(&json["replies"][0]["body"]),
        )
    }

    #[test]
    fn captured_publishes_get_the_reference_replies() {
        let dir = SimDirectory::new();
        let config = config(r#"{"name":"S","subjects":["s.>"],"max_msgs":1000}"#);
        let mut stream = open(&dir, &config, T0_NS);
        assert_eq!(stream.state(), StreamState::empty());
        // In the order the probe sent them (they share one stream).
        let exchanges = [
            "pub_ack",
            "pub_ack_msg_id",
            "pub_ack_duplicate",
            "pub_ack_b",
            "pub_expected_stream_ok",
            "pub_expected_stream_wrong",
            "pub_expected_last_sequence_wrong",
            "pub_expected_last_subject_sequence_wrong",
            "pub_expected_last_msg_id_wrong",
            "pub_expected_last_sequence_ok",
        ];
        for (i, name) in exchanges.into_iter().enumerate() {
            let (subject, headers, payload, want) = fixture(name);
            let now_ns = T0_NS + i as i64 * SECOND_NS;
            assert_eq!(
                publish(&mut stream, &subject, &headers, &payload, now_ns),
                want,
                "{name}"
            );
        }
        // stream_info_with_deleted: 3 and 4 gone, 3 messages of 192 bytes.
        assert_eq!(stream.purge(Some(b"s.b"), None).unwrap(), 1);
        assert_eq!(stream.purge(Some(b"s.c"), Some(5)).unwrap(), 1);
        let state = stream.state();
        let got = (state.messages, state.bytes, state.first_seq, state.last_seq);
        assert_eq!(got, (3, 192, 1, 5));
        assert_eq!((state.num_subjects, state.num_deleted), (2, 2));
        assert_eq!(stream.deleted(), [3, 4]);
        assert_eq!(stream.get(2).unwrap().payload, b"again");
        assert_eq!(stream.get_last_by_subject(b"s.a").unwrap().seq, 2);
        assert_eq!(stream.get_last_by_subject(b"s.*").unwrap().seq, 5);
        let no_message = Some(errors::NO_MESSAGE_FOUND.into());
        assert_eq!(stream.get(3).unwrap_err().api_error(), no_message);
        assert_eq!(stream.get(6).unwrap_err().api_error(), no_message);
        assert_eq!(
            stream.get_last_by_subject(b"s.b").unwrap_err().api_error(),
            no_message
        );
        // stream_info_after_purge: empty, first_seq is last_seq + 1.
        assert_eq!(stream.purge(None, None).unwrap(), 3);
        let state = stream.state();
        let got = (state.messages, state.bytes, state.first_seq, state.last_seq);
        assert_eq!(got, (0, 0, 6, 5));
        assert!(state.first_ts.is_go_zero());
        assert_eq!(
            publish(&mut stream, "s.a", "", b"x", T0_NS),
            r#"{"stream":"S", "seq":6}"#
        );
    }

    #[test]
    fn captured_limits_stream_replies() {
        let (_, _, request, _) = fixture("stream_create_limits");
        let request = String::from_utf8(request).expect("fixture is text");
        let mut stream = open(&SimDirectory::new(), &config(&request), T0_NS);
        for name in ["pub_to_limits_stream", "pub_max_msg_size_exceeded"] {
            let (subject, headers, payload, want) = fixture(name);
            assert_eq!(
                publish(&mut stream, &subject, &headers, &payload, T0_NS),
                want,
                "{name}"
            );
        }
        assert!(stream.accepts(b"l.a"));
        assert!(!stream.accepts(b"l.a.b"));
        assert!(!stream.accepts(b"s.a"));
    }

    /// Publishes `subjects` one per second from T0 and returns the stream's
    /// (messages, first_seq, last_seq) and the replies that were errors.
    fn run_limits(json: &str, subjects: &[&str]) -> ((u64, u64, u64), Vec<String>) {
        let mut stream = open(&SimDirectory::new(), &config(json), T0_NS);
        let mut errors = Vec::new();
        for (i, subject) in subjects.iter().enumerate() {
            let reply = publish(
                &mut stream,
                subject,
                "",
                b"0123456789",
                T0_NS + i as i64 * SECOND_NS,
            );
            if reply.contains("error") {
                errors.push(reply);
            }
        }
        let state = stream.state();
        ((state.messages, state.first_seq, state.last_seq), errors)
    }

    #[test]
    fn limits_discard_old_and_new() {
        let check =
            |json: &str, subjects: &[&str], want_state: (u64, u64, u64), want_errors: &[&str]| {
                let (state, errors) = run_limits(json, subjects);
                assert_eq!(state, want_state, "{json}");
                let descriptions: Vec<String> = errors
                    .iter()
                    .map(|reply| {
                        let response: PubAckResponse =
                            serde_json::from_str(reply).expect("reply is JSON");
                        let error = response.error.expect("an error reply");
                        format!("{} {} {}", error.code, error.err_code, error.description)
                    })
                    .collect();
                assert_eq!(descriptions, want_errors, "{json}");
            };
        let five = ["t.a", "t.b", "t.a", "t.a", "t.c"];
        // One message: 30 + 3 + 10 = 43 bytes.
        check(
            r#"{"name":"T","subjects":["t.*"],"max_msgs":3}"#,
            &five,
            (3, 3, 5),
            &[],
        );
        check(
            r#"{"name":"T","subjects":["t.*"],"max_bytes":100}"#,
            &five,
            (2, 4, 5),
            &[],
        );
        check(
            r#"{"name":"T","subjects":["t.*"],"max_msgs_per_subject":1}"#,
            &five,
            (3, 2, 5),
            &[],
        );
        check(
            r#"{"name":"T","subjects":["t.*"],"max_msgs":3,"discard":"new"}"#,
            &five,
            (3, 1, 3),
            &["503 10077 maximum messages exceeded"; 2],
        );
        check(
            r#"{"name":"T","subjects":["t.*"],"max_bytes":100,"discard":"new"}"#,
            &five,
            (2, 1, 2),
            &["503 10077 maximum bytes exceeded"; 3],
        );
        // Per subject, discard=new only refuses with discard_new_per_subject.
        check(
            r#"{"name":"T","subjects":["t.*"],"max_msgs_per_subject":1,"discard":"new"}"#,
            &five,
            (3, 2, 5),
            &[],
        );
        check(
            r#"{"name":"T","subjects":["t.*"],"max_msgs_per_subject":1,"discard":"new","discard_new_per_subject":true}"#,
            &five,
            (3, 1, 3),
            &["503 10077 maximum messages per subject exceeded"; 2],
        );
        check(
            r#"{"name":"T","subjects":["t.*"],"max_msg_size":9}"#,
            &five[..1],
            (0, 0, 0),
            &["400 10054 message size exceeds maximum allowed"],
        );
    }

    #[test]
    fn max_age_expires_on_the_virtual_clock() {
        let config = config(r#"{"name":"A","subjects":["a"],"max_age":10000000000}"#);
        let dir = SimDirectory::new();
        let mut stream = open(&dir, &config, T0_NS);
        for i in 0..5 {
            publish(&mut stream, "a", "", b"x", T0_NS + i * SECOND_NS);
        }
        let check = |stream: &Stream<SimDirectory>, want: (u64, u64)| {
            let state = stream.state();
            assert_eq!((state.messages, state.first_seq), want);
        };
        check(&stream, (5, 1));
        stream.expire(T0_NS + 10 * SECOND_NS).unwrap();
        check(&stream, (4, 2));
        stream.expire(T0_NS + 13 * SECOND_NS - 1).unwrap();
        check(&stream, (2, 4));
        // Reopening later applies max_age as of then.
        drop(stream);
        let stream = open(&dir, &config, T0_NS + 100 * SECOND_NS);
        check(&stream, (0, 6));
        assert_eq!(stream.state().last_seq, 5);
    }

    /// A gateway without an RTC: it boots in 1970, stores messages, then NTP
    /// sets the clock to 2026. Stamped by `JsClock`, corrected at its jump,
    /// the early messages neither mass-expire under max_age nor lose their
    /// dedupe ids, timestamps stay in order, and a restart keeps all of that.
    #[test]
    fn a_clock_set_late_neither_expires_nor_reorders_what_came_before() {
        use crate::jetstream::clock::JsClock;
        let config = config(
            r#"{"name":"C","subjects":["c"],"max_age":3600000000000,"duplicate_window":120000000000}"#,
        );
        const YEAR_2026_NS: i64 = 1_796_000_000 * SECOND_NS;
        let dir = SimDirectory::new();
        let control_dir = SimDirectory::new();
        let boot_ns = 10 * SECOND_NS;
        let mut clock = JsClock::new(boot_ns, 0, 0);
        let mut stream = open(&dir, &config, boot_ns);
        let mut control = open(&control_dir, &config, boot_ns);
        let id = "NATS/1.0\r\nNats-Msg-Id: early\r\n\r\n";
        for i in 0..5 {
            let now = clock.read(boot_ns + i * SECOND_NS, i * SECOND_NS).now_ns;
            let headers = if i == 4 { id } else { "" };
            publish(&mut stream, "c", headers, b"x", now);
            publish(&mut control, "c", headers, b"x", now);
        }
        // NTP: 2026, five seconds of monotonic time after boot.
        let reading = clock.read(YEAR_2026_NS, 5 * SECOND_NS);
        assert!(reading.jumped_ns > 0);
        stream.clock_jumped(reading.jumped_ns).unwrap();
        let now = reading.now_ns;
        stream.expire(now).unwrap();
        control.expire(now).unwrap();
        assert_eq!(
            control.state().messages,
            0,
            "uncorrected, all look 56 years old"
        );
        assert_eq!(
            stream.state().messages,
            5,
            "corrected, they are seconds old"
        );
        assert_eq!(
            publish(&mut stream, "c", id, b"x", now),
            r#"{"stream":"C", "seq":5,"duplicate": true}"#,
            "the dedupe id stored before the jump is still in its window"
        );
        publish(
            &mut stream,
            "c",
            "",
            b"late",
            clock.read(YEAR_2026_NS + SECOND_NS, 6 * SECOND_NS).now_ns,
        );
        let stamps = |stream: &Stream<SimDirectory>| -> Vec<i64> {
            (1..=6)
                .map(|seq| stream.get(seq).expect("live").timestamp_ns)
                .collect()
        };
        let before_restart = stamps(&stream);
        assert!(
            before_restart.windows(2).all(|w| w[0] <= w[1]),
            "{before_restart:?}"
        );
        assert_eq!(before_restart[0], YEAR_2026_NS - 5 * SECOND_NS);
        // A restart reads the correction back.
        drop(stream);
        let mut stream = open(&dir, &config, now + SECOND_NS);
        assert_eq!(stream.state().messages, 6);
        assert_eq!(stamps(&stream), before_restart);
        // An hour of real time later, the early ones are due, and go.
        stream
            .expire(YEAR_2026_NS - 5 * SECOND_NS + 3600 * SECOND_NS + 1)
            .unwrap();
        assert_eq!(stream.state().first_seq, 2);
        // After a trusted reading nothing older moves with a later jump.
        stream.clock_trusted();
        stream.clock_jumped(3600 * SECOND_NS).unwrap();
        let kept: Vec<i64> = (2..=6)
            .map(|seq| stream.get(seq).expect("live").timestamp_ns)
            .collect();
        assert_eq!(kept, before_restart[1..]);
    }

    #[test]
    fn dedupe_window_and_batches() {
        let config = config(r#"{"name":"D","subjects":["d"],"duplicate_window":5000000000}"#);
        let mut stream = open(&SimDirectory::new(), &config, T0_NS);
        let id = "NATS/1.0\r\nNats-Msg-Id: one\r\n\r\n";
        assert_eq!(
            publish(&mut stream, "d", id, b"1", T0_NS),
            r#"{"stream":"D", "seq":1}"#
        );
        let duplicate = r#"{"stream":"D", "seq":1,"duplicate": true}"#;
        assert_eq!(
            publish(&mut stream, "d", id, b"1", T0_NS + 5 * SECOND_NS),
            duplicate
        );
        stream.expire(T0_NS + 6 * SECOND_NS).unwrap();
        assert_eq!(
            publish(&mut stream, "d", id, b"1", T0_NS + 6 * SECOND_NS),
            r#"{"stream":"D", "seq":2}"#
        );
        // Within one batch: the second copy of an id is a duplicate of the first, and
        // an expected last sequence counts the batch's earlier messages.
        let message = |headers: &str| PlannedMessage {
            subject: b"d".to_vec(),
            headers: headers.as_bytes().to_vec(),
            payload: b"p".to_vec(),
            timestamp_ns: T0_NS + 7 * SECOND_NS,
        };
        let batch = [
            message("NATS/1.0\r\nNats-Msg-Id: two\r\n\r\n"),
            message("NATS/1.0\r\nNats-Msg-Id: two\r\n\r\n"),
            message("NATS/1.0\r\nNats-Expected-Last-Sequence: 3\r\n\r\n"),
            message("NATS/1.0\r\nNats-Expected-Last-Sequence: 3\r\n\r\n"),
            message("NATS/1.0\r\nNats-Expected-Last-Msg-Id: two\r\n\r\n"),
        ];
        let replies: Vec<String> = stream
            .commit(&batch)
            .unwrap()
            .into_iter()
            .map(|reply| match reply {
                Ok(ack) => ack.encode(),
                Err(error) => error.description,
            })
            .collect();
        assert_eq!(
            replies,
            [
                r#"{"stream":"D", "seq":3}"#,
                r#"{"stream":"D", "seq":3,"duplicate": true}"#,
                r#"{"stream":"D", "seq":4}"#,
                "wrong last sequence: 4",
                "wrong last msg ID: ",
            ]
        );
        assert_eq!(stream.state().last_seq, 4);
    }

    /// What an empty stream reports, as nats-server 2.9.10's file store: Go's zero
    /// time after a purge of every subject, the Unix epoch after its messages went one
    /// by one (delete, max_age, a purge by subject) or a restart, and `first_seq` 0
    /// only while it was never touched.
    #[test]
    fn empty_streams_report_their_start_as_the_reference() {
        let epoch = Timestamp::from_unix_nanos(0);
        let start = |stream: &Stream<SimDirectory>| {
            let state = stream.state();
            (state.first_seq, state.last_seq, state.first_ts)
        };
        let zero = Timestamp::GO_ZERO;
        let config_for = |json: &str| config(json);

        let dir = SimDirectory::new();
        let plain = config_for(r#"{"name":"E","subjects":["e.*"]}"#);
        let mut stream = open(&dir, &plain, T0_NS);
        assert_eq!(start(&stream), (0, 0, zero), "never touched");
        stream.purge(None, None).unwrap();
        assert_eq!(start(&stream), (1, 0, zero), "purged while empty");
        drop(stream);
        let mut stream = open(&dir, &plain, T0_NS);
        stream.note_restart();
        assert_eq!(start(&stream), (1, 0, epoch), "reopened empty");
        assert_eq!(stream.state().last_ts, zero);
        stream.purge(None, Some(5)).unwrap();
        assert_eq!(start(&stream), (5, 4, zero), "purged past the end");
        assert_eq!(stream.state().last_ts, zero, "nothing was ever stored");
        drop(stream);
        let mut stream = open(&dir, &plain, T0_NS);
        stream.note_restart();
        assert_eq!(start(&stream), (5, 4, epoch));
        assert_eq!(stream.state().last_ts, epoch);

        let dir = SimDirectory::new();
        let mut stream = open(&dir, &plain, T0_NS);
        stream.note_restart();
        assert_eq!(start(&stream), (1, 0, epoch), "reopened never touched");
        publish(&mut stream, "e.a", "", b"1", T0_NS);
        publish(&mut stream, "e.b", "", b"2", T0_NS + 1);
        assert_eq!(start(&stream).2, Timestamp::from_unix_nanos(T0_NS));
        assert!(stream.delete_msg(1, false).unwrap());
        assert!(stream.delete_msg(2, false).unwrap());
        assert_eq!(start(&stream), (3, 2, epoch), "deleted one by one");
        publish(&mut stream, "e.a", "", b"3", T0_NS + 2);
        stream.purge(Some(b"e.*"), None).unwrap();
        assert_eq!(start(&stream), (4, 3, epoch), "purged by subject");
        publish(&mut stream, "e.a", "", b"4", T0_NS + 3);
        stream.purge(None, Some(9)).unwrap();
        assert_eq!(start(&stream), (9, 8, zero), "purged below a sequence");
        assert_ne!(stream.state().last_ts, zero);
        drop(stream);
        let mut stream = open(&dir, &plain, T0_NS);
        stream.note_restart();
        assert_eq!(start(&stream), (9, 8, epoch), "purged, then reopened");
        publish(&mut stream, "e.a", "", b"5", T0_NS + 4);
        stream.purge(None, None).unwrap();
        assert_eq!(start(&stream), (10, 9, zero), "purged");

        let aging = config_for(r#"{"name":"A","subjects":["a"],"max_age":1000000000}"#);
        let mut stream = open(&SimDirectory::new(), &aging, T0_NS);
        publish(&mut stream, "a", "", b"1", T0_NS);
        stream.expire(T0_NS + 2 * SECOND_NS).unwrap();
        assert_eq!(start(&stream), (2, 1, epoch), "expired");

        // An update reopens the stream: no restart, nothing forgotten.
        let dir = SimDirectory::new();
        let mut stream = open(&dir, &plain, T0_NS);
        publish(&mut stream, "e.a", "", b"1", T0_NS + 7);
        stream.purge(None, None).unwrap();
        let memory = stream.memory();
        drop(stream);
        let mut stream = open(&dir, &plain, T0_NS);
        assert_eq!(stream.state().last_ts, zero, "the log has no record left");
        stream.carry_over(memory);
        assert_eq!(start(&stream), (2, 1, zero), "still purged");
        assert_eq!(
            stream.state().last_ts,
            Timestamp::from_unix_nanos(T0_NS + 7)
        );
    }

    #[test]
    fn purges_survive_a_restart() {
        let dir = SimDirectory::new();
        let config = config(r#"{"name":"P","subjects":["p.*"]}"#);
        let mut stream = open(&dir, &config, T0_NS);
        // stream_info_after_purge_seq: an empty stream purged below 5 starts at 5.
        assert_eq!(stream.purge(None, Some(5)).unwrap(), 0);
        let state = stream.state();
        assert_eq!((state.messages, state.first_seq, state.last_seq), (0, 5, 4));
        drop(stream);
        let mut stream = open(&dir, &config, T0_NS);
        let state = stream.state();
        assert_eq!((state.messages, state.first_seq, state.last_seq), (0, 5, 4));
        for i in 0..6 {
            let subject = if i % 2 == 0 { "p.a" } else { "p.b" };
            publish(&mut stream, subject, "", b"x", T0_NS + i);
        }
        // seqs 5..=10; a prefix purge is durable.
        assert_eq!(stream.purge(None, Some(7)).unwrap(), 2);
        // A purge by subject that is not a prefix goes to the deletes file; one that
        // moves the first sequence makes that move durable.
        assert_eq!(stream.purge(Some(b"p.b"), None).unwrap(), 2);
        assert_eq!(stream.deleted(), [8, 10]);
        assert_eq!(stream.purge(Some(b"p.a"), Some(8)).unwrap(), 1);
        assert_eq!(stream.state().first_seq, 9);
        drop(stream);
        dir.crash(1);
        let mut stream = open(&dir, &config, T0_NS);
        let state = stream.state();
        let got = (state.messages, state.first_seq, state.last_seq);
        assert_eq!(got, (1, 9, 10), "9 live, 10 stays deleted");
        assert_eq!(stream.deleted(), [10]);
        // A purge past the end moves the next sequence, durably.
        assert_eq!(stream.purge(None, Some(20)).unwrap(), 1);
        drop(stream);
        dir.crash(2);
        let mut stream = open(&dir, &config, T0_NS);
        let state = stream.state();
        assert_eq!(
            (state.messages, state.first_seq, state.last_seq),
            (0, 20, 19)
        );
        assert_eq!(
            publish(&mut stream, "p.a", "", b"x", T0_NS),
            r#"{"stream":"P", "seq":20}"#
        );
    }

    #[test]
    fn power_cuts_never_undo_an_acked_purge_nor_half_apply_one() {
        let config = config(r#"{"name":"C","subjects":["c.*"]}"#);
        let (mut interrupted, mut acked_purges) = (0, 0);
        for seed in 0..64 {
            let dir = SimDirectory::new();
            let mut stream = open(&dir, &config, T0_NS);
            let mut rng = crate::store::file::SimRng::new(seed);
            dir.power_loss_after(rng.below(120));
            // The state after the last acked operation, and a purge in flight.
            let mut acked_first_seq = 1;
            let mut in_flight: Option<(u64, Vec<u64>, u64)> = None;
            for i in 0..40u64 {
                if rng.chance(1, 4) {
                    let last = stream.state().last_seq;
                    let up_to = stream.first_seq() + rng.below(last + 4 - stream.first_seq());
                    let live_before: Vec<u64> = stream.index.live.keys().collect();
                    match stream.purge(None, Some(up_to)) {
                        Ok(_) => {
                            acked_purges += 1;
                            acked_first_seq = stream.first_seq();
                        }
                        Err(_) => {
                            in_flight = Some((up_to, live_before, last));
                            break;
                        }
                    }
                    continue;
                }
                let message = PlannedMessage {
                    subject: format!("c.{}", rng.below(3)).into_bytes(),
                    headers: Vec::new(),
                    payload: vec![b'x'; rng.below(40) as usize],
                    timestamp_ns: T0_NS + i as i64,
                };
                if stream.commit(&[message]).is_err() {
                    break;
                }
            }
            drop(stream);
            dir.crash(seed);
            let reopened = open(&dir, &config, T0_NS + 60);
            let live: Vec<u64> = reopened.index.live.keys().collect();
            assert!(
                reopened.first_seq() >= acked_first_seq,
                "seed {seed}: acked purge undone"
            );
            if let Some((up_to, live_before, last_before)) = in_flight {
                interrupted += 1;
                let applied: Vec<u64> = live_before
                    .iter()
                    .copied()
                    .filter(|&s| s >= up_to)
                    .collect();
                let state = reopened.state();
                if live == applied && state.last_seq == last_before.max(up_to - 1) {
                    assert_eq!(
                        reopened.first_seq(),
                        up_to.max(live.first().copied().unwrap_or(0))
                    );
                } else {
                    assert_eq!(
                        live, live_before,
                        "seed {seed}: purge below {up_to} half applied"
                    );
                }
            }
        }
        assert!(
            interrupted > 4 && acked_purges > 32,
            "{interrupted} interrupted, {acked_purges} acked"
        );
    }

    #[test]
    fn power_cuts_keep_every_acked_message_and_rebuild_the_state() {
        let config = config(r#"{"name":"C","subjects":["c.*"],"max_msgs_per_subject":3}"#);
        // How many runs saw the power cut, and how many came back exactly as before.
        let (mut cuts, mut identical) = (0, 0);
        for seed in 0..64 {
            let dir = SimDirectory::new();
            let mut stream = open(&dir, &config, T0_NS);
            let mut rng = crate::store::file::SimRng::new(seed);
            let mut acked = 0;
            let mut acked_id = String::new();
            let cut_after = rng.below(200);
            dir.power_loss_after(cut_after);
            for i in 0..60u64 {
                let batch: Vec<PlannedMessage> = (0..rng.below(4) + 1)
                    .map(|j| PlannedMessage {
                        subject: format!("c.{}", rng.below(5)).into_bytes(),
                        headers: format!("NATS/1.0\r\nNats-Msg-Id: {i}-{j}\r\n\r\n").into_bytes(),
                        payload: vec![b'x'; rng.below(40) as usize],
                        timestamp_ns: T0_NS + i as i64,
                    })
                    .collect();
                match stream.commit(&batch) {
                    Ok(replies) => {
                        acked = replies
                            .last()
                            .and_then(|r| r.as_ref().ok())
                            .map_or(acked, |ack| ack.seq);
                        acked_id = format!("{i}-{}", batch.len() - 1);
                    }
                    Err(_) => {
                        cuts += 1;
                        break;
                    }
                }
            }
            let before = stream.state();
            let live_before: Vec<u64> = stream.index.live.keys().collect();
            let subjects_before: Vec<(u64, Rc<[u8]>)> = stream
                .index
                .live
                .iter()
                .map(|(seq, meta)| (seq, meta.subject.clone()))
                .collect();
            drop(stream);
            dir.crash(seed);
            let reopened = open(&dir, &config, T0_NS + 60);
            let after = reopened.state();
            assert!(
                after.last_seq >= acked,
                "seed {seed}: acked {acked}, recovered {}",
                after.last_seq
            );
            if after.last_seq == before.last_seq {
                assert_eq!(after, before, "seed {seed}");
                identical += 1;
                let live_after: Vec<u64> = reopened.index.live.keys().collect();
                assert_eq!(live_after, live_before, "seed {seed}");
            }
            // Every acked message still live before the cut is back, unless messages
            // that were written but not yet acked came back too and pushed it out
            // under the per-subject limit.
            for (seq, subject) in subjects_before.into_iter().filter(|&(seq, _)| seq <= acked) {
                match reopened.get(seq) {
                    Ok(message) => assert_eq!(message.subject, subject.as_ref(), "seed {seed}"),
                    Err(_) => {
                        let newer = &reopened.index.subjects[&*subject];
                        assert!(
                            newer.len() == 3 && newer[0] > seq && newer[2] > acked,
                            "seed {seed}: lost {seq}"
                        );
                    }
                }
            }
            // Dedupe ids within the window survive, even of messages the per-subject
            // limit has since removed.
            if acked > 0 {
                let headers = format!("NATS/1.0\r\nNats-Msg-Id: {acked_id}\r\n\r\n");
                let plan = reopened.check_publish(b"c.0", Some(headers.as_bytes()), 1, T0_NS + 61);
                assert_eq!(
                    plan,
                    Ok(PublishPlan::Duplicate(reopened.duplicate_ack(acked))),
                    "seed {seed}"
                );
            }
        }
        assert!(
            cuts > 32 && identical > 16,
            "{cuts} cuts, {identical} identical"
        );
    }

    #[test]
    fn delete_msg_is_durable_and_moves_the_first_sequence() {
        let dir = SimDirectory::new();
        let config = config(r#"{"name":"M","subjects":["m.*"]}"#);
        let mut stream = open(&dir, &config, T0_NS);
        for i in 0..6 {
            publish(&mut stream, &format!("m.{}", i % 2), "", b"x", T0_NS + i);
        }
        assert!(stream.delete_msg(3, false).unwrap());
        assert!(!stream.delete_msg(3, false).unwrap(), "not live any more");
        assert!(!stream.delete_msg(99, true).unwrap(), "never stored");
        assert!(stream.delete_msg(5, true).unwrap());
        assert_eq!(stream.deleted(), [3, 5]);
        let no_message = Some(errors::NO_MESSAGE_FOUND.into());
        assert_eq!(stream.get(3).unwrap_err().api_error(), no_message);
        // Deleting the first one moves the first sequence.
        assert!(stream.delete_msg(1, false).unwrap());
        let state = stream.state();
        let got = (
            state.messages,
            state.first_seq,
            state.last_seq,
            state.num_deleted,
        );
        assert_eq!(got, (3, 2, 6, 2));
        drop(stream);
        dir.crash(1);
        let mut stream = open(&dir, &config, T0_NS);
        assert_eq!(stream.state(), state);
        assert_eq!(stream.deleted(), [3, 5]);
        let mut buf = Vec::new();
        for seq in [1, 3, 5] {
            assert!(stream.get(seq).is_err(), "{seq}");
            assert_eq!(stream.log().read(seq, &mut buf).unwrap(), None, "{seq}");
        }
        // Deleting the last one keeps the last sequence; deleting every one empties
        // the stream, which then counts on.
        assert!(stream.delete_msg(6, false).unwrap());
        assert_eq!(stream.state().last_seq, 6);
        assert!(stream.delete_msg(2, false).unwrap());
        assert!(stream.delete_msg(4, false).unwrap());
        let state = stream.state();
        assert_eq!((state.messages, state.first_seq, state.last_seq), (0, 7, 6));
        drop(stream);
        dir.crash(2);
        let mut stream = open(&dir, &config, T0_NS);
        let state = stream.state();
        assert_eq!((state.messages, state.first_seq, state.last_seq), (0, 7, 6));
        assert_eq!(
            publish(&mut stream, "m.0", "", b"x", T0_NS),
            r#"{"stream":"M", "seq":7}"#
        );
    }

    #[test]
    fn deletions_keep_limits_from_bringing_messages_back() {
        // max_msgs 3: 3, 4, 5 live; deleting 5 leaves 3 and 4. Re-applying the limit
        // at open over 1..=4 would keep 2, 3, 4: 2 must not come back.
        let dir = SimDirectory::new();
        let max_msgs = config(r#"{"name":"L","subjects":["l.*"],"max_msgs":3}"#);
        let mut stream = open(&dir, &max_msgs, T0_NS);
        for i in 0..5 {
            publish(&mut stream, "l.a", "", b"x", T0_NS + i);
        }
        assert!(stream.delete_msg(5, false).unwrap());
        let live: Vec<u64> = stream.index.live.keys().collect();
        assert_eq!(live, [3, 4]);
        drop(stream);
        dir.crash(1);
        let stream = open(&dir, &max_msgs, T0_NS);
        let live: Vec<u64> = stream.index.live.keys().collect();
        assert_eq!(live, [3, 4]);
        // Per subject, in the middle: l.a 1 goes when l.a 3 comes; then l.a 3 is
        // deleted. At open, l.a 1 and 2 alone would fit the limit of 2.
        let dir = SimDirectory::new();
        let per_subject = config(r#"{"name":"L","subjects":["l.*"],"max_msgs_per_subject":2}"#);
        let mut stream = open(&dir, &per_subject, T0_NS);
        for (i, subject) in ["l.a", "l.a", "l.a", "l.b"].into_iter().enumerate() {
            publish(&mut stream, subject, "", b"x", T0_NS + i as i64);
        }
        assert!(stream.delete_msg(3, false).unwrap());
        drop(stream);
        dir.crash(2);
        let stream = open(&dir, &per_subject, T0_NS);
        let live: Vec<u64> = stream.index.live.keys().collect();
        assert_eq!(live, [2, 4]);
        // A purge by subject records them too.
        let dir = SimDirectory::new();
        let mut stream = open(&dir, &per_subject, T0_NS);
        for (i, subject) in ["l.a", "l.b", "l.a", "l.a", "l.b"].into_iter().enumerate() {
            publish(&mut stream, subject, "", b"x", T0_NS + i as i64);
        }
        assert_eq!(stream.purge(Some(b"l.a"), Some(4)).unwrap(), 1);
        let live: Vec<u64> = stream.index.live.keys().collect();
        assert_eq!(live, [2, 4, 5]);
        drop(stream);
        dir.crash(3);
        let stream = open(&dir, &per_subject, T0_NS);
        let live: Vec<u64> = stream.index.live.keys().collect();
        assert_eq!(live, [2, 4, 5]);
    }

    #[test]
    fn deleted_messages_keep_their_dedupe_ids_and_the_last_sequence() {
        let dir = SimDirectory::new();
        let config = config(r#"{"name":"D","subjects":["d"],"duplicate_window":5000000000}"#);
        let mut stream = open(&dir, &config, T0_NS);
        let id = "NATS/1.0\r\nNats-Msg-Id: one\r\n\r\n";
        publish(&mut stream, "d", "", b"0", T0_NS);
        publish(&mut stream, "d", id, b"1", T0_NS + 1);
        assert!(stream.delete_msg(2, false).unwrap());
        let state = stream.state();
        drop(stream);
        dir.crash(1);
        let mut stream = open(&dir, &config, T0_NS + 2);
        assert_eq!(stream.state(), state);
        assert_eq!(
            publish(&mut stream, "d", id, b"1", T0_NS + 3),
            r#"{"stream":"D", "seq":2,"duplicate": true}"#
        );
    }

    fn options(durability: Durability) -> StreamOptions {
        StreamOptions {
            log: LogConfig {
                segment_bytes_max: 512,
                index_interval_records: 4,
            },
            durability,
        }
    }

    /// What a power cut in one durability mode left.
    struct ModeRun {
        /// Acked messages: sequence and payload.
        acked: Vec<(u64, Vec<u8>)>,
        /// Every sequence below this was acked before a `sync` that returned `Ok`
        /// (or by a synced commit).
        synced_next: u64,
        /// Live sequences and payloads after the crash.
        recovered: Vec<(u64, Vec<u8>)>,
    }

    /// Commits single messages in `durability` mode, syncing now and then in
    /// `interval` mode, until a power cut at a random operation; crashes and reopens
    /// (which must succeed), and checks that what came back is a prefix of what was
    /// acked, exactly as sent, that no torn tail is left once open, and that the
    /// stream takes new messages and a clean close keeps them.
    fn power_cut_in_mode(durability: Durability, seed: u64) -> ModeRun {
        let config = config(r#"{"name":"C","subjects":["c.*"]}"#);
        let dir = SimDirectory::new();
        let mut stream =
            Stream::open_with_options(dir.clone(), config.clone(), options(durability), T0_NS)
                .unwrap();
        assert_eq!(stream.durability(), durability);
        let mut rng = crate::store::file::SimRng::new(seed);
        dir.power_loss_after(rng.below(150));
        let mut run = ModeRun {
            acked: Vec::new(),
            synced_next: 1,
            recovered: Vec::new(),
        };
        for i in 0..60u64 {
            if durability == Durability::Interval && rng.chance(1, 5) {
                match stream.sync() {
                    Ok(()) => run.synced_next = stream.log().next_seq(),
                    Err(_) => break,
                }
                assert_eq!(stream.unsynced_bytes(), 0);
                continue;
            }
            let payload = format!("{seed}-{i}").into_bytes();
            let message = PlannedMessage {
                subject: format!("c.{}", rng.below(3)).into_bytes(),
                headers: Vec::new(),
                payload: payload.clone(),
                timestamp_ns: T0_NS + i as i64,
            };
            match stream.commit(&[message]) {
                Ok(replies) => {
                    let seq = replies[0].as_ref().unwrap().seq;
                    run.acked.push((seq, payload));
                    if durability == Durability::Always {
                        assert_eq!(stream.unsynced_bytes(), 0);
                        run.synced_next = seq + 1;
                    }
                }
                Err(_) => break,
            }
        }
        drop(stream);
        dir.crash(seed);
        let reopened =
            Stream::open_with_options(dir.clone(), config.clone(), options(durability), T0_NS);
        let mut stream = match reopened {
            Ok(stream) => stream,
            Err(error) => panic!("{durability} seed {seed}: reopen: {error}"),
        };
        let report = crate::store::verify::verify_log(&dir).unwrap();
        assert!(!report.has_torn_tail(), "{durability} seed {seed}");
        run.recovered = stream
            .index
            .live
            .keys()
            .map(|seq| (seq, stream.get(seq).unwrap().payload))
            .collect();
        // Acked messages come back as a prefix, exactly as sent (a message written
        // but not acked may come back after them).
        let acked_back = run.recovered.len().min(run.acked.len());
        assert_eq!(
            run.recovered[..acked_back],
            run.acked[..acked_back],
            "{durability} seed {seed}"
        );
        let next = stream.log().next_seq();
        let message = PlannedMessage {
            subject: b"c.0".to_vec(),
            headers: Vec::new(),
            payload: b"after".to_vec(),
            timestamp_ns: T0_NS + 100,
        };
        let replies = stream.commit(&[message]).unwrap();
        assert_eq!(replies[0].as_ref().unwrap().seq, next);
        stream.close().unwrap();
        dir.crash(seed + 1);
        let stream = Stream::open_with_options(dir, config, options(durability), T0_NS).unwrap();
        assert_eq!(stream.get(next).unwrap().payload, b"after", "close syncs");
        run
    }

    /// How many of 48 power cuts in `durability` mode lost acked messages; `check`
    /// sees each run.
    fn lost_in_mode(durability: Durability, check: impl Fn(u64, &ModeRun)) -> usize {
        let mut lost = 0;
        for seed in 0..48 {
            let run = power_cut_in_mode(durability, seed);
            check(seed, &run);
            if run.recovered.len() < run.acked.len() {
                lost += 1;
            }
        }
        lost
    }

    #[test]
    fn always_mode_loses_nothing_acked() {
        let lost = lost_in_mode(Durability::Always, |seed, run| {
            assert_eq!(run.recovered[..run.acked.len()], run.acked, "seed {seed}");
        });
        assert_eq!(lost, 0);
    }

    #[test]
    fn interval_mode_loses_only_what_came_after_the_last_sync() {
        let lost = lost_in_mode(Durability::Interval, |seed, run| {
            let synced = run.acked.iter().filter(|(seq, _)| *seq < run.synced_next);
            let synced = synced.count();
            assert!(
                run.recovered.len() >= synced,
                "seed {seed}: lost a synced message"
            );
        });
        assert!(lost > 4, "unsynced messages were lost in {lost} runs only");
    }

    #[test]
    fn none_mode_may_lose_unsynced_but_recovers_cleanly() {
        // The checks are power_cut_in_mode's: the stream reopens, what comes back is
        // a prefix of what was acked, no torn tail is left, and close syncs.
        let lost = lost_in_mode(Durability::None, |_, _| {});
        assert!(lost > 4, "unsynced messages were lost in {lost} runs only");
    }

    #[test]
    fn sync_failure_fails_the_stream_closed() {
        let dir = SimDirectory::new();
        let config = config(r#"{"name":"F","subjects":["f"]}"#);
        let interval = options(Durability::Interval);
        let mut stream =
            Stream::open_with_options(dir.clone(), config.clone(), interval, T0_NS).unwrap();
        publish(&mut stream, "f", "", b"synced", T0_NS);
        stream.sync().unwrap();
        publish(&mut stream, "f", "", b"not yet", T0_NS);
        assert!(stream.unsynced_bytes() > 0);
        dir.fail_next_sync();
        assert!(matches!(stream.sync(), Err(StoreError::Io { .. })));
        // Never retried: everything after errors, also once the disk would work.
        assert!(matches!(stream.sync(), Err(StoreError::Failed)));
        let message = PlannedMessage {
            subject: b"f".to_vec(),
            headers: Vec::new(),
            payload: b"x".to_vec(),
            timestamp_ns: T0_NS,
        };
        assert!(matches!(stream.commit(&[message]), Err(StoreError::Failed)));
        assert!(matches!(
            stream.delete_msg(1, false),
            Err(StoreError::Failed)
        ));
        assert!(matches!(stream.purge(None, None), Err(StoreError::Failed)));
        drop(stream);
        dir.crash(1);
        let stream = Stream::open_with_options(dir, config, interval, T0_NS).unwrap();
        assert_eq!(stream.get(1).unwrap().payload, b"synced");
    }
}
