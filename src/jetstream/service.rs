//! One shard's JetStream, sans IO: the streams this shard owns (and their
//! consumers), the `$JS.API` requests addressed to them, their publishes and acks.
//! The runtime feeds it messages and sends the [`Outbound`] messages it returns.
//!
//! Owns: dispatching `$JS.API.<verb>…` subjects to stream and consumer operations,
//! turning their results into the reference's reply JSON, collecting publishes
//! into one group-committed batch per stream per pass ([`Host::commit`]), stream
//! configs on disk (`stream.json`, replaced atomically), and the [`Catalog`]: the
//! summary of every stream on every shard that account info, stream names/list
//! and the subject-overlap check read.
//!
//! Which shard owns a stream is a function of its name ([`owner_of`]); requests that
//! name no stream (`INFO`, `STREAM.NAMES`, `STREAM.LIST`) are answered from the
//! catalog by whichever shard gets them.
//!
//! Deliberately does not: route, read the clock, know about sockets, or decide when
//! a batch ends (the runtime commits once per pass over what arrived).

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::api::{
    self, errors, response_type, AccountInfo, AccountInfoBody, AccountLimits, AckKind, AckSubject,
    ApiError, ApiPaged, ApiResponse, ApiStats, ConsumerCreateRequest, ConsumerInfo,
    ConsumerInfoBody, ConsumerListBody, ConsumerListRequest, ConsumerNamesBody, MsgDeleteRequest,
    MsgGetBody, MsgGetRequest, NextRequest, PubAckResponse, StreamConfig, StreamCreateBody,
    StreamInfo, StreamInfoBody, StreamInfoRequest, StreamListBody, StreamListRequest,
    StreamNamesBody, StreamPurgeBody, StreamPurgeRequest, StreamUpdateBody, SuccessBody, Timestamp,
};
use super::consumer::{check_create_subject, Consumer, CreateSubject, StateError};
use super::stream::{PlannedMessage, ReadError, Stream, StreamOptions};
use crate::store::file::{read_if_present, replace_atomically};
use crate::store::streams::{list_streams, stream_dir, validate_stream_name};
use crate::store::{Directory, Durability, LogConfig, OsDirectory, StoreError, SyncTicket};

/// Push consumers' flow-control replies come back on `$JS.FC.<stream>.<consumer>.…`.
pub const FLOW_CONTROL_PREFIX: &str = "$JS.FC.";

/// A durable consumer's state file in its stream's directory.
fn consumer_file(name: &str) -> String {
    format!("consumer-{name}")
}

/// Loads the durable consumers saved in a stream's directory.
fn load_consumers<D: Directory>(
    stream: &Stream<D>,
    dir: &D,
    now_ns: i64,
) -> Result<BTreeMap<String, Consumer>, StoreError> {
    let mut consumers = BTreeMap::new();
    for file in dir
        .list()
        .map_err(StoreError::io("list", "stream directory"))?
    {
        let Some(name) = file.strip_prefix("consumer-") else {
            continue;
        };
        if name.ends_with(".tmp") {
            continue;
        }
        match Consumer::load(stream, dir, &file, now_ns) {
            Ok(Some(consumer)) => {
                consumers.insert(name.to_owned(), consumer);
            }
            Ok(None) => {}
            Err(StateError::Store(error)) => return Err(error),
            Err(StateError::Corrupt(why)) => {
                return Err(StoreError::io("load", &file)(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("consumer state is corrupt: {why}"),
                )))
            }
        }
    }
    Ok(consumers)
}

/// A stream's config and creation time, in its directory.
pub const STREAM_META_FILE: &str = "stream.json";

pub use super::consumer::Outbound;

/// A reply: a plain message on `to`.
fn reply_to(to: &[u8], payload: Vec<u8>) -> Outbound {
    Outbound {
        route_to: to.to_vec(),
        subject: to.to_vec(),
        payload,
        ..Outbound::default()
    }
}

/// Where a stream's directory lives, and how to make and remove one: the real file
/// system, or a simulated disk in tests.
pub trait StoreRoot {
    type Dir: Directory + Clone;
    /// Opens (creating it if needed) stream `name`'s directory.
    fn open_stream(&self, name: &str) -> io::Result<Self::Dir>;
    /// Removes stream `name`'s directory and everything in it, durably.
    fn remove_stream(&self, name: &str) -> io::Result<()>;
    /// The names of the streams present.
    fn list(&self) -> io::Result<Vec<String>>;
}

/// A store directory on the file system (`--store-dir`).
#[derive(Debug, Clone)]
pub struct OsRoot {
    pub path: PathBuf,
}

impl StoreRoot for OsRoot {
    type Dir = OsDirectory;

    fn open_stream(&self, name: &str) -> io::Result<OsDirectory> {
        let dir = stream_dir(&self.path, name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        std::fs::create_dir_all(&dir)?;
        // The new name in streams/ must survive a power cut too.
        if let Some(parent) = dir.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        OsDirectory::open(dir)
    }

    fn remove_stream(&self, name: &str) -> io::Result<()> {
        let dir = stream_dir(&self.path, name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        std::fs::remove_dir_all(&dir)?;
        if let Some(parent) = dir.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        match list_streams(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            other => other,
        }
    }
}

/// The shard that owns stream `name`: FNV-1a of the name, so every shard and every
/// restart with the same shard count agree without asking each other.
pub fn owner_of(name: &str, shard_count: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in name.as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % shard_count.max(1) as u64) as usize
}

/// What an `$JS.API.…` subject addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiTarget {
    /// Answered from the catalog by any shard.
    Catalog,
    /// Handled by the stream's owner.
    Stream(String),
    /// Not an API subject the reference answers: no reply at all.
    Unknown,
}

/// The API call an `$JS.API.…` subject makes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call<'s> {
    AccountInfo,
    StreamNames,
    StreamList,
    StreamCreate(&'s str),
    StreamUpdate(&'s str),
    StreamInfo(&'s str),
    StreamDelete(&'s str),
    StreamPurge(&'s str),
    MsgGet(&'s str),
    MsgDelete(&'s str),
    /// Consumer calls: the stream, then the rest of the subject's tokens.
    Consumer {
        verb: ConsumerVerb,
        stream: &'s str,
        rest: Vec<&'s str>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumerVerb {
    Create,
    DurableCreate,
    Info,
    Delete,
    Names,
    List,
    Next,
}

fn parse_call(subject: &str) -> Option<Call<'_>> {
    let rest = subject.strip_prefix(api::API_PREFIX)?;
    let tokens: Vec<&str> = rest.split('.').collect();
    let call = match tokens.as_slice() {
        ["INFO"] => Call::AccountInfo,
        ["STREAM", "NAMES"] => Call::StreamNames,
        ["STREAM", "LIST"] => Call::StreamList,
        ["STREAM", "CREATE", s] => Call::StreamCreate(s),
        ["STREAM", "UPDATE", s] => Call::StreamUpdate(s),
        ["STREAM", "INFO", s] => Call::StreamInfo(s),
        ["STREAM", "DELETE", s] => Call::StreamDelete(s),
        ["STREAM", "PURGE", s] => Call::StreamPurge(s),
        ["STREAM", "MSG", "GET", s] => Call::MsgGet(s),
        ["STREAM", "MSG", "DELETE", s] => Call::MsgDelete(s),
        ["CONSUMER", "DURABLE", "CREATE", s, rest @ ..] => Call::Consumer {
            verb: ConsumerVerb::DurableCreate,
            stream: s,
            rest: rest.to_vec(),
        },
        ["CONSUMER", "MSG", "NEXT", s, rest @ ..] => Call::Consumer {
            verb: ConsumerVerb::Next,
            stream: s,
            rest: rest.to_vec(),
        },
        ["CONSUMER", verb, s, rest @ ..] => {
            let verb = match *verb {
                "CREATE" => ConsumerVerb::Create,
                "INFO" => ConsumerVerb::Info,
                "DELETE" => ConsumerVerb::Delete,
                "NAMES" => ConsumerVerb::Names,
                "LIST" => ConsumerVerb::List,
                _ => return None,
            };
            Call::Consumer {
                verb,
                stream: s,
                rest: rest.to_vec(),
            }
        }
        _ => return None,
    };
    Some(call)
}

/// Who answers an API subject (the runtime forwards stream calls to the owner).
pub fn api_target(subject: &str) -> ApiTarget {
    match parse_call(subject) {
        None => ApiTarget::Unknown,
        Some(Call::AccountInfo | Call::StreamNames | Call::StreamList) => ApiTarget::Catalog,
        Some(
            Call::StreamCreate(s)
            | Call::StreamUpdate(s)
            | Call::StreamInfo(s)
            | Call::StreamDelete(s)
            | Call::StreamPurge(s)
            | Call::MsgGet(s)
            | Call::MsgDelete(s)
            | Call::Consumer { stream: s, .. },
        ) => ApiTarget::Stream(s.to_owned()),
    }
}

/// Every stream on every shard, as the catalog-wide calls need it. Each owner
/// refreshes its streams' entries after changing them; readers see a recent state.
#[derive(Debug, Default)]
pub struct Catalog {
    pub streams: BTreeMap<String, StreamInfo>,
    pub api_total: u64,
    pub api_errors: u64,
}

/// A stream's config and creation time as stored in `stream.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StreamMeta {
    config: StreamConfig,
    created: Timestamp,
}

struct Hosted<D: Directory> {
    stream: Stream<D>,
    created: Timestamp,
    dir: D,
    /// Publishes collected for the next commit, with their reply subjects.
    pending: Vec<(PlannedMessage, Vec<u8>)>,
    consumers: BTreeMap<String, Consumer>,
}

/// What an API call may consult besides the host: the clock, the catalog, and
/// whether a subject has subscribers (a push consumer is bound when its deliver
/// subject has one).
pub struct ApiContext<'a> {
    pub now_ns: i64,
    pub catalog: &'a Mutex<Catalog>,
    pub interest: &'a dyn Fn(&[u8]) -> bool,
}

/// Replies held until out-of-line syncs return (see [`Host::commit_holding_acks`]).
#[derive(Debug, Default)]
pub struct HeldAcks {
    /// Per stream: what the sync covers, and the file to `fdatasync`.
    pub syncs: Vec<(String, SyncTicket, std::fs::File)>,
    pub replies: Vec<Outbound>,
}

/// How the streams' logs are laid out and synced.
#[derive(Debug, Clone, Default)]
pub struct HostOptions {
    pub log: LogConfig,
    pub durability: Durability,
    /// Exceptions to `durability` by stream name.
    pub per_stream: BTreeMap<String, Durability>,
}

impl HostOptions {
    pub fn for_stream(&self, name: &str) -> StreamOptions {
        StreamOptions {
            log: self.log,
            durability: self
                .per_stream
                .get(name)
                .copied()
                .unwrap_or(self.durability),
        }
    }
}

/// The streams one shard owns.
pub struct Host<R: StoreRoot> {
    /// A consumer stopped at its byte budget with more to deliver.
    more: bool,
    root: R,
    options: HostOptions,
    shard: usize,
    shard_count: usize,
    streams: BTreeMap<String, Hosted<R::Dir>>,
}

/// Whether two subject patterns can match a common subject.
pub fn subjects_overlap(a: &str, b: &str) -> bool {
    let mut left = a.split('.');
    let mut right = b.split('.');
    loop {
        match (left.next(), right.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) => {
                if x != y && x != "*" && y != "*" {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("API replies always encode")
}

/// How far [`Host::open_reporting`] got: stream `stream_index` (from 0) of the
/// `streams` this shard owns, `records_read` of its records so far.
#[derive(Debug)]
pub struct RecoveryProgress<'a> {
    pub stream: &'a str,
    pub stream_index: usize,
    pub streams: usize,
    pub records_read: u64,
}

impl<R: StoreRoot> Host<R> {
    /// Opens the streams of `root` that `shard` owns and enters them in `catalog`.
    pub fn open(
        root: R,
        options: HostOptions,
        shard: usize,
        shard_count: usize,
        now_ns: i64,
        catalog: &Mutex<Catalog>,
    ) -> Result<Host<R>, StoreError> {
        Self::open_reporting(
            root,
            options,
            shard,
            shard_count,
            now_ns,
            catalog,
            &mut |_| {},
        )
    }

    /// [`Host::open`] telling `progress` which stream it recovers and how far
    /// it got: once as each stream starts, then every
    /// [`super::stream::RECOVERY_PROGRESS_RECORDS`] records.
    pub fn open_reporting(
        root: R,
        options: HostOptions,
        shard: usize,
        shard_count: usize,
        now_ns: i64,
        catalog: &Mutex<Catalog>,
        progress: &mut dyn FnMut(&RecoveryProgress<'_>),
    ) -> Result<Host<R>, StoreError> {
        let mut host = Host {
            more: false,
            root,
            options,
            shard,
            shard_count,
            streams: BTreeMap::new(),
        };
        let owned: Vec<String> = host
            .root
            .list()
            .map_err(StoreError::io("list", "streams"))?
            .into_iter()
            .filter(|name| owner_of(name, shard_count) == shard)
            .collect();
        let streams = owned.len();
        for (stream_index, name) in owned.into_iter().enumerate() {
            let mut report = |records_read| {
                progress(&RecoveryProgress {
                    stream: &name,
                    stream_index,
                    streams,
                    records_read,
                })
            };
            report(0);
            let dir = host
                .root
                .open_stream(&name)
                .map_err(StoreError::io("open", &name))?;
            let Some(meta) = read_meta(&dir)? else {
                tracing::warn!(stream = %name, "no {STREAM_META_FILE}: not a stream, skipped");
                continue;
            };
            let mut stream = Stream::open_reporting(
                dir.clone(),
                meta.config,
                host.options.for_stream(&name),
                now_ns,
                &mut report,
            )?;
            stream.note_restart();
            tracing::info!(stream = %name, shard, messages = stream.state().messages, "stream opened");
            host.streams.insert(
                name,
                Hosted {
                    consumers: load_consumers(&stream, &dir, now_ns)?,
                    stream,
                    created: meta.created,
                    dir,
                    pending: Vec::new(),
                },
            );
        }
        let names: Vec<String> = host.streams.keys().cloned().collect();
        for name in names {
            host.refresh_catalog(&name, catalog);
        }
        Ok(host)
    }

    /// The subjects this shard's internal subscriber must listen on: every owned
    /// stream's subjects and its ack subjects.
    pub fn subscriptions(&self) -> Vec<String> {
        let mut subjects = Vec::new();
        for (name, hosted) in &self.streams {
            subjects.extend(hosted.stream.config().subjects.iter().cloned());
            subjects.push(format!("{}{name}.>", api::ACK_PREFIX));
            subjects.push(format!("{FLOW_CONTROL_PREFIX}{name}.>"));
        }
        subjects
    }

    /// Whether the shard has publishes waiting for [`Host::commit`].
    pub fn has_pending(&self) -> bool {
        self.streams.values().any(|h| !h.pending.is_empty())
    }

    /// A message on an owned stream's subject: checked now (a refusal is replied at
    /// once), stored at the next commit.
    pub fn publish(
        &mut self,
        subject: &[u8],
        reply: &[u8],
        headers: &[u8],
        payload: &[u8],
        now_ns: i64,
        out: &mut Vec<Outbound>,
    ) {
        let Some((_, hosted)) = self
            .streams
            .iter_mut()
            .find(|(_, h)| h.stream.accepts(subject))
        else {
            return;
        };
        let header_block = (!headers.is_empty()).then_some(headers);
        // The cheap checks now; the commit checks everything again in batch order.
        if let Err(error) =
            hosted
                .stream
                .check_publish(subject, header_block, payload.len(), now_ns)
        {
            if !reply.is_empty() {
                let name = &hosted.stream.config().name;
                out.push(reply_to(
                    reply,
                    PubAckResponse::failed(name, error).encode().into_bytes(),
                ));
            }
            return;
        }
        hosted.pending.push((
            PlannedMessage {
                subject: subject.to_vec(),
                headers: headers.to_vec(),
                payload: payload.to_vec(),
                timestamp_ns: now_ns,
            },
            reply.to_vec(),
        ));
    }

    /// Stores every collected publish: one group commit per stream, then one reply
    /// per publish that asked for one. `Err` is a store failure: nothing of that
    /// batch was acknowledged, and the store must not ack again.
    pub fn commit(
        &mut self,
        catalog: &Mutex<Catalog>,
        out: &mut Vec<Outbound>,
    ) -> Result<(), StoreError> {
        self.commit_into(catalog, out, None)
    }

    /// Makes every `interval` stream's acknowledged writes durable.
    pub fn sync_interval_streams(&mut self) -> Result<(), StoreError> {
        for hosted in self.streams.values_mut() {
            if hosted.stream.durability() == Durability::Interval {
                hosted.stream.sync()?;
            }
        }
        Ok(())
    }

    /// Syncs every stream (clean shutdown: `interval` and `none` lose nothing).
    pub fn sync_all(&mut self) -> Result<(), StoreError> {
        for hosted in self.streams.values_mut() {
            hosted.stream.sync()?;
        }
        Ok(())
    }

    /// [`Host::commit`] for the bulk of a pass, with the `always` streams' fsync
    /// taken off the shard's thread: their batches are written unsynced and their
    /// replies held in `held` with the syncs that must return first; the caller
    /// runs those (elsewhere), then calls [`Host::finish_syncs`] and sends the held
    /// replies. Nothing may use the host in between (no API call, no consumer
    /// poll), so nothing reads a message before it is durable. Streams of the other
    /// modes, and streams whose files have no sync handle, commit as usual.
    pub fn commit_holding_acks(
        &mut self,
        catalog: &Mutex<Catalog>,
        out: &mut Vec<Outbound>,
        held: &mut HeldAcks,
    ) -> Result<(), StoreError> {
        self.commit_into(catalog, out, Some(held))
    }

    /// [`Host::commit`], or with `held`, [`Host::commit_holding_acks`].
    fn commit_into(
        &mut self,
        catalog: &Mutex<Catalog>,
        out: &mut Vec<Outbound>,
        mut held: Option<&mut HeldAcks>,
    ) -> Result<(), StoreError> {
        let names: Vec<String> = self
            .streams
            .iter()
            .filter(|(_, h)| !h.pending.is_empty())
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            let Some(hosted) = self.streams.get_mut(&name) else {
                continue;
            };
            let always = held.is_some() && hosted.stream.durability() == Durability::Always;
            let pending = std::mem::take(&mut hosted.pending);
            let (messages, replies): (Vec<PlannedMessage>, Vec<Vec<u8>>) =
                pending.into_iter().unzip();
            let results = if always {
                hosted.stream.commit_unsynced(&messages)?
            } else {
                hosted.stream.commit(&messages)?
            };
            let mut sink = &mut *out;
            if let (true, Some(held)) = (always, held.as_deref_mut()) {
                if let Some(ticket) = hosted.stream.sync_ticket() {
                    match hosted.stream.sync_handle()? {
                        Some(file) => {
                            held.syncs.push((name.clone(), ticket, file));
                            sink = &mut held.replies;
                        }
                        None => hosted.stream.sync()?,
                    }
                }
            }
            for (result, reply) in results.into_iter().zip(replies) {
                if reply.is_empty() {
                    continue;
                }
                let response = match result {
                    Ok(ack) => PubAckResponse { error: None, ack },
                    Err(error) => PubAckResponse::failed(&name, error),
                };
                sink.push(reply_to(&reply, response.encode().into_bytes()));
            }
            self.refresh_catalog(&name, catalog);
            self.more = true;
        }
        Ok(())
    }

    /// The held syncs returned `Ok` (see [`Host::commit_holding_acks`]).
    pub fn finish_syncs(&mut self, syncs: &[(String, SyncTicket)]) {
        for (name, ticket) in syncs {
            if let Some(hosted) = self.streams.get_mut(name) {
                hosted.stream.finish_sync(*ticket);
            }
        }
    }

    /// Applies the limits that depend on time (max_age).
    /// The newest timestamp of any hosted stream (0 if none): the floor of
    /// JetStream's clock after a restart (`jetstream::clock`).
    pub fn newest_timestamp_ns(&self) -> i64 {
        self.streams
            .values()
            .map(|h| h.stream.last_timestamp_ns())
            .max()
            .unwrap_or(0)
    }

    /// The wall clock jumped forward by `jump_ns` beyond the monotonic clock:
    /// messages stamped since it was last trusted move by as much (so they do
    /// not expire early), and so do the consumers' timers.
    pub fn clock_jumped(&mut self, jump_ns: i64) -> Result<(), StoreError> {
        for hosted in self.streams.values_mut() {
            hosted.stream.clock_jumped(jump_ns)?;
            for consumer in hosted.consumers.values_mut() {
                consumer.shift_timers(jump_ns);
            }
        }
        Ok(())
    }

    /// The clock reads the wall clock and it looks set (see [`Stream::clock_trusted`]).
    pub fn clock_trusted(&mut self) {
        for hosted in self.streams.values_mut() {
            hosted.stream.clock_trusted();
        }
    }

    pub fn expire(&mut self, now_ns: i64, catalog: &Mutex<Catalog>) -> Result<(), StoreError> {
        let names: Vec<String> = self
            .streams
            .iter()
            .filter(|(_, h)| h.stream.config().max_age_ns > 0)
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            if let Some(hosted) = self.streams.get_mut(&name) {
                let before = hosted.stream.state().messages;
                hosted.stream.expire(now_ns)?;
                if hosted.stream.state().messages != before {
                    self.refresh_catalog(&name, catalog);
                }
            }
        }
        Ok(())
    }

    fn refresh_catalog(&self, name: &str, catalog: &Mutex<Catalog>) {
        let Some(hosted) = self.streams.get(name) else {
            return;
        };
        let info = self.stream_info(hosted);
        if let Ok(mut catalog) = catalog.lock() {
            catalog.streams.insert(name.to_owned(), info);
        }
    }

    fn stream_info(&self, hosted: &Hosted<R::Dir>) -> StreamInfo {
        let mut state = hosted.stream.state();
        state.consumer_count = hosted.consumers.len() as u64;
        StreamInfo {
            config: hosted.stream.config().clone(),
            created: hosted.created,
            state,
            domain: String::new(),
            cluster: None,
        }
    }

    /// Answers one API request. Catalog calls may come to any shard; stream calls
    /// only to the owner (the runtime forwards them). Returns `Err` only for a store
    /// failure that must stop the store.
    pub fn handle_api(
        &mut self,
        subject: &str,
        reply: &[u8],
        body: &[u8],
        cx: &ApiContext<'_>,
        out: &mut Vec<Outbound>,
    ) -> Result<(), StoreError> {
        let (now_ns, catalog) = (cx.now_ns, cx.catalog);
        let Some(call) = parse_call(subject) else {
            return Ok(());
        };
        if let Call::Consumer {
            verb: ConsumerVerb::Next,
            stream,
            rest,
        } = &call
        {
            return self.pull(stream, rest, reply, body, now_ns, out);
        }
        let (payload, failed) = self.dispatch(call, body, cx, out)?;
        if let Ok(mut catalog) = catalog.lock() {
            catalog.api_total += 1;
            catalog.api_errors += u64::from(failed);
        }
        if !reply.is_empty() {
            out.push(reply_to(reply, payload));
        }
        Ok(())
    }

    /// The reply's bytes and whether it is an error.
    fn dispatch(
        &mut self,
        call: Call<'_>,
        body: &[u8],
        cx: &ApiContext<'_>,
        out: &mut Vec<Outbound>,
    ) -> Result<(Vec<u8>, bool), StoreError> {
        let (now_ns, catalog) = (cx.now_ns, cx.catalog);
        fn reply<B: Serialize>(response: ApiResponse<B>) -> (Vec<u8>, bool) {
            let failed = response.error.is_some();
            (encode(&response), failed)
        }
        let invalid_json = || -> ApiError { errors::INVALID_JSON.into() };
        Ok(match call {
            Call::AccountInfo => reply(ApiResponse::ok(
                response_type::ACCOUNT_INFO,
                account_info(catalog),
            )),
            Call::StreamNames => {
                let t = response_type::STREAM_NAMES;
                match api::decode_request::<StreamListRequest>(body) {
                    Err(_) => reply(ApiResponse::failed(
                        t,
                        invalid_json(),
                        StreamNamesBody::default(),
                    )),
                    Ok(request) => reply(ApiResponse::ok(t, stream_names(catalog, &request))),
                }
            }
            Call::StreamList => {
                let t = response_type::STREAM_LIST;
                match api::decode_request::<StreamListRequest>(body) {
                    Err(_) => reply(ApiResponse::failed(
                        t,
                        invalid_json(),
                        StreamListBody::default(),
                    )),
                    Ok(request) => reply(ApiResponse::ok(t, stream_list(catalog, &request))),
                }
            }
            Call::StreamCreate(name) => {
                let t = response_type::STREAM_CREATE;
                match self.create_stream(name, body, now_ns, catalog)? {
                    Ok(info) => reply(ApiResponse::ok(
                        t,
                        StreamCreateBody {
                            info: Some(info),
                            did_create: true,
                        },
                    )),
                    Err(error) => reply(ApiResponse::failed(t, error, StreamCreateBody::default())),
                }
            }
            Call::StreamUpdate(name) => {
                let t = response_type::STREAM_UPDATE;
                match self.update_stream(name, body, now_ns, catalog)? {
                    Ok(info) => reply(ApiResponse::ok(t, StreamUpdateBody { info: Some(info) })),
                    Err(error) => reply(ApiResponse::failed(t, error, StreamUpdateBody::default())),
                }
            }
            Call::StreamInfo(name) => {
                let t = response_type::STREAM_INFO;
                match self.info_of(name, body) {
                    Ok(info) => reply(ApiResponse::ok(t, info)),
                    Err(error) => reply(ApiResponse::failed(t, error, StreamInfoBody::default())),
                }
            }
            Call::StreamDelete(name) => {
                let t = response_type::STREAM_DELETE;
                if !self.streams.contains_key(name) {
                    reply(ApiResponse::failed(
                        t,
                        errors::STREAM_NOT_FOUND.into(),
                        SuccessBody::default(),
                    ))
                } else {
                    if let Some(mut hosted) = self.streams.remove(name) {
                        for consumer in hosted.consumers.values_mut() {
                            consumer.on_delete(out);
                        }
                    }
                    self.root
                        .remove_stream(name)
                        .map_err(StoreError::io("remove", name))?;
                    if let Ok(mut catalog) = catalog.lock() {
                        catalog.streams.remove(name);
                    }
                    reply(ApiResponse::ok(t, SuccessBody { success: true }))
                }
            }
            Call::StreamPurge(name) => {
                let t = response_type::STREAM_PURGE;
                let result = self.purge(name, body)?;
                if result.is_ok() {
                    self.refresh_catalog(name, catalog);
                    self.more = true;
                }
                match result {
                    Ok(purged) => reply(ApiResponse::ok(
                        t,
                        StreamPurgeBody {
                            success: true,
                            purged,
                        },
                    )),
                    Err(error) => reply(ApiResponse::failed(t, error, StreamPurgeBody::default())),
                }
            }
            Call::MsgGet(name) => {
                let t = response_type::STREAM_MSG_GET;
                match self.msg_get(name, body)? {
                    Ok(message) => reply(ApiResponse::ok(
                        t,
                        MsgGetBody {
                            message: Some(message),
                        },
                    )),
                    Err(error) => reply(ApiResponse::failed(t, error, MsgGetBody::default())),
                }
            }
            Call::MsgDelete(name) => {
                let t = response_type::STREAM_MSG_DELETE;
                let result = self.msg_delete(name, body)?;
                if result.is_ok() {
                    self.refresh_catalog(name, catalog);
                    self.more = true;
                }
                match result {
                    Ok(()) => reply(ApiResponse::ok(t, SuccessBody { success: true })),
                    Err(error) => reply(ApiResponse::failed(t, error, SuccessBody::default())),
                }
            }
            Call::Consumer { verb, stream, rest } => {
                let result = self.consumer_call(verb, stream, &rest, body, cx, out)?;
                self.refresh_catalog(stream, catalog);
                result
            }
        })
    }

    /// A consumer API call other than a pull request: the reply's bytes and whether
    /// it is an error.
    fn consumer_call(
        &mut self,
        verb: ConsumerVerb,
        stream_name: &str,
        rest: &[&str],
        body: &[u8],
        cx: &ApiContext<'_>,
        out: &mut Vec<Outbound>,
    ) -> Result<(Vec<u8>, bool), StoreError> {
        let now_ns = cx.now_ns;
        fn reply<B: Serialize>(response: ApiResponse<B>) -> (Vec<u8>, bool) {
            let failed = response.error.is_some();
            (encode(&response), failed)
        }
        let name = rest.first().copied().unwrap_or_default();
        Ok(match verb {
            ConsumerVerb::Create | ConsumerVerb::DurableCreate => {
                let t = response_type::CONSUMER_CREATE;
                let subject = match (verb, rest) {
                    (ConsumerVerb::DurableCreate, [durable]) => CreateSubject::Durable(durable),
                    (ConsumerVerb::Create, []) => CreateSubject::Ephemeral,
                    // `CREATE.<stream>.<name>[.<filter…>]`: the filter is checked by
                    // `create_consumer` (it may hold dots).
                    (ConsumerVerb::Create, [name, ..]) => {
                        CreateSubject::Named { name, filter: None }
                    }
                    _ => {
                        return Ok(reply(ApiResponse::failed(
                            t,
                            errors::BAD_REQUEST.into(),
                            ConsumerInfoBody::default(),
                        )))
                    }
                };
                match self.create_consumer(stream_name, subject, rest, body, cx, out)? {
                    Ok(info) => reply(ApiResponse::ok(t, ConsumerInfoBody { info: Some(info) })),
                    Err(error) => reply(ApiResponse::failed(t, error, ConsumerInfoBody::default())),
                }
            }
            ConsumerVerb::Info => {
                let t = response_type::CONSUMER_INFO;
                match self.consumer_mut(stream_name, name) {
                    Ok((_, consumer)) => reply(ApiResponse::ok(
                        t,
                        ConsumerInfoBody {
                            info: Some(consumer.info(now_ns)),
                        },
                    )),
                    Err(error) => reply(ApiResponse::failed(t, error, ConsumerInfoBody::default())),
                }
            }
            ConsumerVerb::Delete => {
                let t = response_type::CONSUMER_DELETE;
                match self.consumer_mut(stream_name, name) {
                    Err(error) => reply(ApiResponse::failed(t, error, SuccessBody::default())),
                    Ok((dir, consumer)) => {
                        consumer.on_delete(out);
                        let file = consumer_file(name);
                        let dir = dir.clone();
                        if let Some(hosted) = self.streams.get_mut(stream_name) {
                            hosted.consumers.remove(name);
                        }
                        if dir
                            .list()
                            .map_err(StoreError::io("list", &file))?
                            .contains(&file)
                        {
                            dir.remove(&file).map_err(StoreError::io("remove", &file))?;
                            dir.sync()
                                .map_err(StoreError::io("sync directory for", &file))?;
                        }
                        reply(ApiResponse::ok(t, SuccessBody { success: true }))
                    }
                }
            }
            ConsumerVerb::Names | ConsumerVerb::List => {
                let list = verb == ConsumerVerb::List;
                let t = if list {
                    response_type::CONSUMER_LIST
                } else {
                    response_type::CONSUMER_NAMES
                };
                let Some(hosted) = self.streams.get(stream_name) else {
                    return Ok(if list {
                        reply(ApiResponse::failed(
                            t,
                            errors::STREAM_NOT_FOUND.into(),
                            ConsumerListBody::default(),
                        ))
                    } else {
                        reply(ApiResponse::failed(
                            t,
                            errors::STREAM_NOT_FOUND.into(),
                            ConsumerNamesBody::default(),
                        ))
                    });
                };
                let request: ConsumerListRequest = api::decode_request(body).unwrap_or_default();
                let offset = request.offset.max(0) as usize;
                let total = hosted.consumers.len() as i64;
                if list {
                    let consumers = hosted
                        .consumers
                        .values()
                        .skip(offset)
                        .take(api::LIST_PAGE_LIMIT as usize)
                        .map(|c| c.info(now_ns))
                        .collect();
                    reply(ApiResponse::ok(
                        t,
                        ConsumerListBody {
                            paged: ApiPaged {
                                total,
                                offset: offset as i64,
                                limit: api::LIST_PAGE_LIMIT,
                            },
                            consumers,
                            missing: Vec::new(),
                        },
                    ))
                } else {
                    let names: Vec<String> = hosted
                        .consumers
                        .keys()
                        .skip(offset)
                        .take(api::NAMES_PAGE_LIMIT as usize)
                        .cloned()
                        .collect();
                    reply(ApiResponse::ok(
                        t,
                        ConsumerNamesBody {
                            paged: ApiPaged {
                                total,
                                offset: offset as i64,
                                limit: api::NAMES_PAGE_LIMIT,
                            },
                            consumers: Some(names),
                        },
                    ))
                }
            }
            ConsumerVerb::Next => unreachable!("pull requests are handled by `pull`"),
        })
    }

    fn consumer_mut(
        &mut self,
        stream_name: &str,
        name: &str,
    ) -> Result<(&R::Dir, &mut Consumer), ApiError> {
        let hosted = self
            .streams
            .get_mut(stream_name)
            .ok_or_else(|| ApiError::from(errors::STREAM_NOT_FOUND))?;
        let consumer = hosted
            .consumers
            .get_mut(name)
            .ok_or_else(|| ApiError::from(errors::CONSUMER_NOT_FOUND))?;
        Ok((&hosted.dir, consumer))
    }

    fn create_consumer(
        &mut self,
        stream_name: &str,
        subject: CreateSubject<'_>,
        rest: &[&str],
        body: &[u8],
        cx: &ApiContext<'_>,
        out: &mut Vec<Outbound>,
    ) -> Result<Result<ConsumerInfo, ApiError>, StoreError> {
        let (now_ns, interest) = (cx.now_ns, cx.interest);
        let request: ConsumerCreateRequest = match api::decode_required_request(body) {
            Ok(request) => request,
            Err(_) => return Ok(Err(errors::INVALID_JSON.into())),
        };
        if !request.stream_name.is_empty() && request.stream_name != stream_name {
            return Ok(Err(errors::STREAM_NAME_MISMATCH.into()));
        }
        let mut config = request.config;
        let filter_from_subject = (rest.len() > 1).then(|| rest[1..].join("."));
        if let Err(error) = check_create_subject(subject, &mut config) {
            return Ok(Err(error));
        }
        if let Some(filter) = &filter_from_subject {
            if *filter != config.filter_subject {
                return Ok(Err(
                    super::consumer::create_errors::FILTER_SUBJECT_MISMATCH.into()
                ));
            }
        }
        let seed = now_ns as u64 ^ (self.shard as u64) << 56;
        let Some(hosted) = self.streams.get_mut(stream_name) else {
            return Ok(Err(errors::STREAM_NOT_FOUND.into()));
        };
        let existing_name = if config.is_durable() {
            Some(config.durable_name.clone())
        } else if !config.name.is_empty() {
            Some(config.name.clone())
        } else {
            None
        };
        let name = match existing_name
            .as_ref()
            .and_then(|n| hosted.consumers.get_mut(n))
        {
            Some(consumer) => match consumer.update(&hosted.stream, config) {
                Err(error) => return Ok(Err(error)),
                Ok(_) => consumer.name().to_owned(),
            },
            None => {
                if hosted.stream.config().max_consumers > 0
                    && hosted.consumers.len() as i64 >= hosted.stream.config().max_consumers
                {
                    return Ok(Err(
                        super::consumer::create_errors::MAX_CONSUMERS_REACHED.into()
                    ));
                }
                let mut attempt = 0u64;
                let consumer = loop {
                    let consumer = match Consumer::create(
                        &hosted.stream,
                        config.clone(),
                        now_ns,
                        seed.wrapping_add(attempt),
                    ) {
                        Ok(consumer) => consumer,
                        Err(error) => return Ok(Err(error)),
                    };
                    if !hosted.consumers.contains_key(consumer.name()) {
                        break consumer;
                    }
                    attempt += 1;
                };
                let name = consumer.name().to_owned();
                hosted.consumers.insert(name.clone(), consumer);
                name
            }
        };
        let Some(consumer) = hosted.consumers.get_mut(&name) else {
            return Ok(Err(errors::CONSUMER_NOT_FOUND.into()));
        };
        if !consumer.config().is_pull() {
            let deliver = consumer.config().deliver_subject.clone();
            consumer.set_push_active(interest(deliver.as_bytes()), now_ns);
        }
        if consumer.config().is_durable() && consumer.needs_save() {
            consumer.save_state(&hosted.dir, &consumer_file(&name))?;
        }
        // The reply shows the consumer as created, before this first poll delivers
        // anything (nats-server starts delivering after it has answered).
        let info = consumer.info(now_ns);
        consumer.poll(&hosted.stream, now_ns, out)?;
        Ok(Ok(info))
    }

    /// `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`: queued on the consumer (which
    /// answers with messages or a status); an unknown consumer gets no reply, as
    /// from the reference.
    fn pull(
        &mut self,
        stream_name: &str,
        rest: &[&str],
        reply: &[u8],
        body: &[u8],
        now_ns: i64,
        out: &mut Vec<Outbound>,
    ) -> Result<(), StoreError> {
        let [name] = rest else {
            return Ok(());
        };
        let Some(hosted) = self.streams.get_mut(stream_name) else {
            return Ok(());
        };
        let Some(consumer) = hosted.consumers.get_mut(*name) else {
            return Ok(());
        };
        let Ok(request) = NextRequest::parse(body) else {
            return Ok(());
        };
        consumer.add_pull(reply.to_vec(), request, now_ns, out);
        self.more |= consumer.poll(&hosted.stream, now_ns, out)?;
        Ok(())
    }

    /// A publish on `$JS.ACK.<stream>.…` (with the publisher's reply subject).
    pub fn ack(
        &mut self,
        subject: &[u8],
        reply: &[u8],
        body: &[u8],
        now_ns: i64,
        out: &mut Vec<Outbound>,
    ) -> Result<(), StoreError> {
        let Ok(subject) = std::str::from_utf8(subject) else {
            return Ok(());
        };
        let (Ok(ack), Ok(kind)) = (AckSubject::parse(subject), AckKind::parse(body)) else {
            tracing::debug!(subject, "unreadable ack ignored");
            return Ok(());
        };
        let Some(hosted) = self.streams.get_mut(&ack.stream) else {
            return Ok(());
        };
        let Some(consumer) = hosted.consumers.get_mut(&ack.consumer) else {
            return Ok(());
        };
        consumer.on_ack(&ack, kind, reply, now_ns, out);
        self.more |= consumer.poll(&hosted.stream, now_ns, out)?;
        Ok(())
    }

    /// A reply to a push consumer's flow-control request (`$JS.FC.<stream>.<consumer>.…`).
    pub fn flow_control(&mut self, subject: &[u8]) {
        let text = String::from_utf8_lossy(subject);
        let mut tokens = text.split('.').skip(2);
        let (Some(stream), Some(name)) = (tokens.next(), tokens.next()) else {
            return;
        };
        if let Some(consumer) = self
            .streams
            .get_mut(stream)
            .and_then(|h| h.consumers.get_mut(name))
        {
            consumer.on_flow_control(subject);
            self.more = true;
        }
    }

    /// Every push consumer's deliver subject, for the runtime to check interest.
    pub fn push_subjects(&self) -> Vec<(String, String, Vec<u8>)> {
        let mut subjects = Vec::new();
        for (stream, hosted) in &self.streams {
            for (name, consumer) in &hosted.consumers {
                if !consumer.config().is_pull() {
                    let deliver = consumer.config().deliver_subject.as_bytes().to_vec();
                    subjects.push((stream.clone(), name.clone(), deliver));
                }
            }
        }
        subjects
    }

    /// Tells a push consumer whether its deliver subject has subscribers.
    pub fn set_push_active(&mut self, stream: &str, name: &str, active: bool, now_ns: i64) {
        if let Some(consumer) = self
            .streams
            .get_mut(stream)
            .and_then(|h| h.consumers.get_mut(name))
        {
            consumer.set_push_active(active, now_ns);
            self.more = true;
        }
    }

    /// Drives every consumer: deliveries after commits, redeliveries and expiries at
    /// their deadlines, inactive ephemerals removed, durable state saved. Returns
    /// whether some consumer has more to deliver right away (poll again after
    /// flushing `out`).
    pub fn poll_consumers(
        &mut self,
        now_ns: i64,
        catalog: &Mutex<Catalog>,
        out: &mut Vec<Outbound>,
    ) -> Result<bool, StoreError> {
        let mut more = std::mem::take(&mut self.more);
        let mut changed = Vec::new();
        for (stream_name, hosted) in &mut self.streams {
            let mut gone = Vec::new();
            for (name, consumer) in &mut hosted.consumers {
                more |= consumer.poll(&hosted.stream, now_ns, out)?;
                if consumer.is_inactive(now_ns) {
                    consumer.on_delete(out);
                    gone.push(name.clone());
                } else if consumer.config().is_durable() && consumer.needs_save() {
                    consumer.save_state(&hosted.dir, &consumer_file(name))?;
                }
            }
            for name in gone {
                hosted.consumers.remove(&name);
                let file = consumer_file(&name);
                if hosted
                    .dir
                    .list()
                    .map_err(StoreError::io("list", &file))?
                    .contains(&file)
                {
                    hosted
                        .dir
                        .remove(&file)
                        .map_err(StoreError::io("remove", &file))?;
                }
                changed.push(stream_name.clone());
            }
        }
        for name in changed {
            self.refresh_catalog(&name, catalog);
        }
        Ok(more)
    }

    /// The earliest consumer deadline (redelivery, pull expiry, heartbeat).
    pub fn next_deadline(&self) -> Option<i64> {
        self.streams
            .values()
            .flat_map(|h| h.consumers.values())
            .filter_map(Consumer::next_deadline)
            .min()
    }

    fn create_stream(
        &mut self,
        name: &str,
        body: &[u8],
        now_ns: i64,
        catalog: &Mutex<Catalog>,
    ) -> Result<Result<StreamInfo, ApiError>, StoreError> {
        let config = match validated_config(name, body) {
            Ok(config) => config,
            Err(error) => return Ok(Err(error)),
        };
        if let Some(hosted) = self.streams.get(name) {
            // Creating what exists with the same config is not an error.
            return Ok(if hosted.stream.config() == &config {
                Ok(self.stream_info(hosted))
            } else {
                Err(errors::STREAM_NAME_IN_USE.into())
            });
        }
        if let Err(error) = check_overlap(catalog, name, &config) {
            return Ok(Err(error));
        }
        assert_eq!(
            owner_of(name, self.shard_count),
            self.shard,
            "stream calls reach the owner"
        );
        let created = Timestamp::from_unix_nanos(now_ns);
        // A stream that cannot be created (a full disk, say) fails the request, not
        // the store: nothing was acknowledged into it yet.
        let opened = self
            .root
            .open_stream(name)
            .map_err(StoreError::io("create", name))
            .and_then(|dir| {
                let meta = StreamMeta {
                    config: config.clone(),
                    created,
                };
                write_meta(&dir, &meta)?;
                let stream = Stream::open_with_options(
                    dir.clone(),
                    config,
                    self.options.for_stream(name),
                    now_ns,
                )?;
                Ok((dir, stream))
            });
        let (dir, stream) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                tracing::warn!(stream = name, "cannot create stream: {error}");
                let _ = self.root.remove_stream(name);
                return Ok(Err(ApiError {
                    code: 500,
                    err_code: errors::STREAM_CREATE_FAILED_ERR_CODE,
                    description: error.to_string(),
                }));
            }
        };
        let hosted = Hosted {
            stream,
            created,
            dir,
            pending: Vec::new(),
            consumers: BTreeMap::new(),
        };
        let info = self.stream_info(&hosted);
        self.streams.insert(name.to_owned(), hosted);
        self.refresh_catalog(name, catalog);
        Ok(Ok(info))
    }

    fn update_stream(
        &mut self,
        name: &str,
        body: &[u8],
        now_ns: i64,
        catalog: &Mutex<Catalog>,
    ) -> Result<Result<StreamInfo, ApiError>, StoreError> {
        let config = match validated_config(name, body) {
            Ok(config) => config,
            Err(error) => return Ok(Err(error)),
        };
        let Some(hosted) = self.streams.get(name) else {
            return Ok(Err(errors::STREAM_NOT_FOUND.into()));
        };
        let old = hosted.stream.config();
        if old.storage != config.storage {
            return Ok(Err(ApiError::stream_invalid_config(
                "stream configuration update can not change storage type",
            )));
        }
        if old.retention != config.retention {
            return Ok(Err(ApiError::stream_invalid_config(
                "stream configuration update can not change retention policy",
            )));
        }
        if let Err(error) = check_overlap(catalog, name, &config) {
            return Ok(Err(error));
        }
        let created = hosted.created;
        let dir = hosted.dir.clone();
        write_meta(
            &dir,
            &StreamMeta {
                config: config.clone(),
                created,
            },
        )?;
        // Reopen under the new config: its limits apply from now on (a rare
        // operation; reopening rescans the log).
        let (consumers, memory) = match self.streams.remove(name) {
            Some(old) => (old.consumers, Some(old.stream.memory())),
            None => Default::default(),
        };
        let mut stream =
            Stream::open_with_options(dir.clone(), config, self.options.for_stream(name), now_ns)?;
        // An update is no restart: the stream keeps what its log does not record.
        if let Some(memory) = memory {
            stream.carry_over(memory);
        }
        let hosted = Hosted {
            stream,
            created,
            dir,
            pending: Vec::new(),
            consumers,
        };
        let info = self.stream_info(&hosted);
        self.streams.insert(name.to_owned(), hosted);
        self.refresh_catalog(name, catalog);
        Ok(Ok(info))
    }

    fn info_of(&self, name: &str, body: &[u8]) -> Result<StreamInfoBody, ApiError> {
        let Some(hosted) = self.streams.get(name) else {
            return Err(errors::STREAM_NOT_FOUND.into());
        };
        let request: StreamInfoRequest =
            api::decode_request(body).map_err(|_| ApiError::from(errors::INVALID_JSON))?;
        let mut info = self.stream_info(hosted);
        let mut paged = ApiPaged::default();
        if request.deleted_details {
            info.state.deleted = hosted.stream.deleted();
        }
        if !request.subjects_filter.is_empty() {
            let subjects = hosted
                .stream
                .subject_counts(request.subjects_filter.as_bytes());
            paged.total = subjects.len() as i64;
            paged.limit = api::STREAM_INFO_SUBJECTS_PAGE_LIMIT;
            if !subjects.is_empty() {
                info.state.subjects = Some(subjects);
            }
        }
        Ok(StreamInfoBody {
            paged,
            info: Some(info),
        })
    }

    fn purge(&mut self, name: &str, body: &[u8]) -> Result<Result<u64, ApiError>, StoreError> {
        let Some(hosted) = self.streams.get_mut(name) else {
            return Ok(Err(errors::STREAM_NOT_FOUND.into()));
        };
        if hosted.stream.config().deny_purge {
            return Ok(Err(errors::STREAM_PURGE_NOT_PERMITTED.into()));
        }
        let Ok(request) = api::decode_request::<StreamPurgeRequest>(body) else {
            return Ok(Err(errors::INVALID_JSON.into()));
        };
        if request.keep > 0 && request.seq > 0 {
            // Both is ambiguous; the reference refuses it.
            return Ok(Err(errors::BAD_REQUEST.into()));
        }
        // `>` is every subject: the reference purges as without a filter.
        let filter = (!request.filter.is_empty() && request.filter != ">")
            .then_some(request.filter.as_bytes());
        let mut up_to = (request.seq > 0).then_some(request.seq);
        if request.keep > 0 {
            up_to = Some(hosted.stream.seq_keeping_newest(filter, request.keep));
        }
        Ok(Ok(hosted.stream.purge(filter, up_to)?))
    }

    fn msg_get(
        &mut self,
        name: &str,
        body: &[u8],
    ) -> Result<Result<api::StoredMessage, ApiError>, StoreError> {
        let Some(hosted) = self.streams.get(name) else {
            return Ok(Err(errors::STREAM_NOT_FOUND.into()));
        };
        let request: MsgGetRequest = match api::decode_required_request(body) {
            Ok(request) => request,
            Err(_) => return Ok(Err(errors::INVALID_JSON.into())),
        };
        let by_seq = request.seq > 0 && request.last_by_subj.is_empty();
        let found = if !request.last_by_subj.is_empty() && request.seq == 0 {
            hosted
                .stream
                .get_last_by_subject(request.last_by_subj.as_bytes())
        } else if !request.next_by_subj.is_empty() {
            hosted
                .stream
                .get_next_by_subject(request.next_by_subj.as_bytes(), request.seq)
        } else if by_seq {
            hosted.stream.get(request.seq)
        } else {
            return Ok(Err(errors::BAD_REQUEST.into()));
        };
        match found {
            Ok(message) => Ok(Ok(api::StoredMessage {
                subject: String::from_utf8_lossy(&message.subject).into_owned(),
                seq: message.seq,
                hdrs: message.headers,
                data: message.payload,
                time: Timestamp::from_unix_nanos(message.timestamp_ns),
            })),
            Err(ReadError::NotFound) => Ok(Err(errors::NO_MESSAGE_FOUND.into())),
            Err(ReadError::Store(error)) => Err(error),
        }
    }

    fn msg_delete(&mut self, name: &str, body: &[u8]) -> Result<Result<(), ApiError>, StoreError> {
        let Some(hosted) = self.streams.get_mut(name) else {
            return Ok(Err(errors::STREAM_NOT_FOUND.into()));
        };
        if hosted.stream.config().deny_delete {
            return Ok(Err(ApiError::stream_msg_delete_failed(
                errors::MSG_DELETE_NOT_PERMITTED_REASON,
            )));
        }
        let request: MsgDeleteRequest = match api::decode_required_request(body) {
            Ok(request) => request,
            Err(_) => return Ok(Err(errors::INVALID_JSON.into())),
        };
        if request.seq > hosted.stream.state().last_seq {
            return Ok(Err(ApiError::stream_msg_delete_failed(
                errors::MSG_DELETE_PAST_END_REASON,
            )));
        }
        if request.seq < hosted.stream.state().first_seq {
            // Below the first message: the reference's store says "no message found".
            return Ok(Err(ApiError::stream_msg_delete_failed("no message found")));
        }
        if !hosted.stream.delete_msg(request.seq, request.no_erase)? {
            // Already deleted (or purged): nats-server's JSSequenceNotFoundErrF.
            return Ok(Err(ApiError {
                code: 400,
                err_code: errors::SEQUENCE_NOT_FOUND_ERR_CODE,
                description: format!("sequence {} not found", request.seq),
            }));
        }
        Ok(Ok(()))
    }
}

/// The stream config in a create/update request, checked against the subject's
/// name, with the reference's defaults filled in.
fn validated_config(name: &str, body: &[u8]) -> Result<StreamConfig, ApiError> {
    let config: StreamConfig =
        api::decode_required_request(body).map_err(|_| ApiError::from(errors::INVALID_JSON))?;
    if !config.name.is_empty() && config.name != name {
        return Err(errors::STREAM_NAME_MISMATCH.into());
    }
    let mut config = config;
    config.name = name.to_owned();
    if validate_stream_name(name).is_err() || name.contains(['*', '>', '.']) {
        return Err(ApiError::stream_invalid_config(
            errors::INVALID_STREAM_NAME_REASON,
        ));
    }
    let config = config.with_server_defaults();
    if config.duplicate_window_ns < 0 {
        return Err(ApiError::stream_invalid_config(
            errors::NEGATIVE_DUPLICATE_WINDOW_REASON,
        ));
    }
    if config.max_age_ns != 0 && config.duplicate_window_ns > config.max_age_ns {
        return Err(ApiError::stream_invalid_config(
            errors::DUPLICATE_WINDOW_OVER_MAX_AGE_REASON,
        ));
    }
    if config.allow_rollup_hdrs && config.deny_purge {
        return Err(ApiError::stream_invalid_config(
            errors::ROLLUP_NEEDS_PURGE_REASON,
        ));
    }
    for subject in &config.subjects {
        if !crate::nats::subject::is_valid_subject(subject.as_bytes()) {
            return Err(ApiError::stream_invalid_config("invalid subject"));
        }
    }
    Ok(config)
}

fn check_overlap(
    catalog: &Mutex<Catalog>,
    name: &str,
    config: &StreamConfig,
) -> Result<(), ApiError> {
    let Ok(catalog) = catalog.lock() else {
        return Ok(());
    };
    let overlaps = catalog
        .streams
        .iter()
        .filter(|(other, _)| other.as_str() != name)
        .any(|(_, info)| {
            info.config.subjects.iter().any(|theirs| {
                config
                    .subjects
                    .iter()
                    .any(|ours| subjects_overlap(ours, theirs))
            })
        });
    if overlaps {
        Err(errors::SUBJECTS_OVERLAP.into())
    } else {
        Ok(())
    }
}

fn account_info(catalog: &Mutex<Catalog>) -> AccountInfoBody {
    let Ok(catalog) = catalog.lock() else {
        return AccountInfoBody::default();
    };
    let (mut memory, mut storage, mut consumers) = (0, 0, 0);
    for info in catalog.streams.values() {
        match info.config.storage {
            api::StorageType::Memory => memory += info.state.bytes,
            api::StorageType::File => storage += info.state.bytes,
        }
        consumers += info.state.consumer_count;
    }
    AccountInfoBody {
        info: Some(AccountInfo {
            memory,
            storage,
            streams: catalog.streams.len() as u64,
            consumers,
            limits: AccountLimits::UNLIMITED,
            domain: String::new(),
            api: ApiStats {
                total: catalog.api_total,
                errors: catalog.api_errors,
            },
            tiers: None,
        }),
    }
}

/// The streams a names/list request selects: all, or those whose subjects
/// overlap `subject`.
fn selected<'c>(
    catalog: &'c Catalog,
    request: &StreamListRequest,
) -> Vec<(&'c String, &'c StreamInfo)> {
    catalog
        .streams
        .iter()
        .filter(|(_, info)| {
            request.subject.is_empty()
                || info
                    .config
                    .subjects
                    .iter()
                    .any(|s| subjects_overlap(s, &request.subject))
        })
        .collect()
}

fn stream_names(catalog: &Mutex<Catalog>, request: &StreamListRequest) -> StreamNamesBody {
    let Ok(catalog) = catalog.lock() else {
        return StreamNamesBody::default();
    };
    let all = selected(&catalog, request);
    let offset = request.offset.max(0) as usize;
    let names: Vec<String> = all
        .iter()
        .skip(offset)
        .take(api::NAMES_PAGE_LIMIT as usize)
        .map(|(name, _)| (*name).clone())
        .collect();
    StreamNamesBody {
        paged: ApiPaged {
            total: all.len() as i64,
            offset: offset as i64,
            limit: api::NAMES_PAGE_LIMIT,
        },
        streams: (!names.is_empty()).then_some(names),
    }
}

fn stream_list(catalog: &Mutex<Catalog>, request: &StreamListRequest) -> StreamListBody {
    let Ok(catalog) = catalog.lock() else {
        return StreamListBody::default();
    };
    let all = selected(&catalog, request);
    let offset = request.offset.max(0) as usize;
    StreamListBody {
        paged: ApiPaged {
            total: all.len() as i64,
            offset: offset as i64,
            limit: api::LIST_PAGE_LIMIT,
        },
        streams: all
            .iter()
            .skip(offset)
            .take(api::LIST_PAGE_LIMIT as usize)
            .map(|(_, info)| (*info).clone())
            .collect(),
        missing: Vec::new(),
    }
}

/// Reads `stream.json`; `None` when the directory has none.
fn read_meta<D: Directory>(dir: &D) -> Result<Option<StreamMeta>, StoreError> {
    let Some(bytes) = read_if_present(dir, STREAM_META_FILE)? else {
        return Ok(None);
    };
    let meta = serde_json::from_slice(&bytes).map_err(|e| {
        StoreError::io("parse", STREAM_META_FILE)(io::Error::new(io::ErrorKind::InvalidData, e))
    })?;
    Ok(Some(meta))
}

/// Replaces `stream.json` atomically (see [`replace_atomically`]).
fn write_meta<D: Directory>(dir: &D, meta: &StreamMeta) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(meta).expect("stream meta always encodes");
    replace_atomically(dir, STREAM_META_FILE, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference refuses a duplicate window longer than a max_age that is set
    /// (after the defaults: an unset window follows a shorter max_age).
    #[test]
    fn duplicate_window_within_max_age() {
        let refused = validated_config(
            "LX",
            br#"{"name":"LX","subjects":["lx"],"max_age":1000000000,"duplicate_window":2000000000}"#,
        )
        .unwrap_err();
        assert_eq!(
            (refused.code, refused.err_code, refused.description.as_str()),
            (
                500,
                10052,
                "duplicates window can not be larger then max age"
            )
        );
        let defaulted = validated_config(
            "LA",
            br#"{"name":"LA","subjects":["la"],"max_age":500000000}"#,
        )
        .unwrap();
        assert_eq!(defaulted.duplicate_window_ns, 500_000_000);
        let no_age = validated_config(
            "LD",
            br#"{"name":"LD","subjects":["ld"],"duplicate_window":2000000000}"#,
        )
        .unwrap();
        assert_eq!(no_age.duplicate_window_ns, 2_000_000_000);
    }

    fn temp_root(tag: &str) -> OsRoot {
        let path = std::env::temp_dir().join(format!(
            "perch-service-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        OsRoot { path }
    }

    /// `always` streams: the acks of a batch are held until the out-of-line
    /// fdatasync of its bytes returned, and only then is the log durable.
    #[test]
    fn held_acks_wait_for_the_out_of_line_sync() {
        let root = temp_root("held");
        let path = root.path.clone();
        let catalog = Mutex::new(Catalog::default());
        let mut host =
            Host::open(root, HostOptions::default(), 0, 1, 1_000, &catalog).expect("open host");
        let no_interest = |_: &[u8]| false;
        let cx = ApiContext {
            now_ns: 1_000,
            catalog: &catalog,
            interest: &no_interest,
        };
        let mut out = Vec::new();
        host.handle_api(
            "$JS.API.STREAM.CREATE.H",
            b"_INBOX.1",
            br#"{"name":"H","subjects":["h"]}"#,
            &cx,
            &mut out,
        )
        .expect("create");
        assert_eq!(out.len(), 1, "the create reply");
        out.clear();
        for i in 0..3u8 {
            host.publish(b"h", b"_INBOX.ack", b"", &[i], 2_000, &mut out);
        }
        let mut held = HeldAcks::default();
        host.commit_holding_acks(&catalog, &mut out, &mut held)
            .expect("commit");
        assert!(out.is_empty(), "no ack before the sync: {out:?}");
        assert_eq!(held.replies.len(), 3);
        assert_eq!(held.syncs.len(), 1);
        let (name, ticket, file) = held.syncs.pop().expect("one sync");
        let stream = &host.streams[&name].stream;
        assert_eq!(stream.sync_ticket(), Some(ticket), "not durable yet");
        file.sync_data().expect("fdatasync");
        host.finish_syncs(&[(name.clone(), ticket)]);
        assert_eq!(
            host.streams[&name].stream.sync_ticket(),
            None,
            "durable now"
        );
        assert_eq!(
            String::from_utf8_lossy(&held.replies[2].payload),
            r#"{"stream":"H", "seq":3}"#
        );
        let _ = std::fs::remove_dir_all(path);
    }
}
