//! The shell around one shard's JetStream host ([`crate::jetstream::service`]).
//!
//! An internal client session per shard subscribes, like any client, to the
//! subjects the shard's streams capture and to their `$JS.ACK.<stream>.>` subjects,
//! and every shard's session is a member of one queue group on `$JS.API.>`, so each
//! API request reaches exactly one shard. That shard answers catalog calls itself
//! and forwards stream calls to the stream's owner over the control mailbox.
//! Publishes reach the owner through the ordinary routing (a cross-shard hop when
//! the publisher is elsewhere); replies and deliveries go back through it too.
//!
//! One task per shard drains the session's delivered frames, feeds the host, group
//! commits everything that arrived in that pass (one write and one fdatasync per
//! stream), then routes the replies. The fsync runs on the shard's thread: the
//! shard's other clients wait for it, and meanwhile more publishes gather for the
//! next, larger batch.
//!
//! A store failure is fatal: logged, and the process exits nonzero before any ack
//! of the failed batch is sent (never a retry that pretends).

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use super::mailbox::{Control, Outgoing};
use super::shard::Shard;
use crate::jetstream::api;
use crate::jetstream::clock::JsClock;
use crate::jetstream::service::{
    api_target, owner_of, ApiContext, ApiTarget, Catalog, HeldAcks, Host, HostOptions, OsRoot,
    Outbound, RecoveryProgress, FLOW_CONTROL_PREFIX,
};
use crate::nats::session::{Message, Session, SessionLimits, Subscription};
use crate::store::{StoreError, SyncTicket};

/// The queue group every shard's internal session joins on `$JS.API.>`.
const API_QUEUE: &str = "perch-jetstream";
/// How often a push consumer without subscribers looks for one.
const PUSH_INTEREST_POLL_MS: u64 = 20;
/// Recovery progress goes to systemd at most this often (plus once per stream).
const RECOVERY_STATUS_MS: u64 = 250;
/// How often time-based limits (max_age) are applied.
const EXPIRE_TICK_MS: u64 = 1_000;
/// The exit code when the store fails (EX_IOERR).
pub(crate) const EXIT_STORE_FAILED: i32 = 74;
/// The internal session never counts as a slow consumer: it drains everything at
/// each pass. A bound still exists so a stuck store cannot eat all memory.
const INTERNAL_PENDING_BYTES_MAX: usize = 1 << 30;

/// What all shards share for JetStream: the catalog and where the store lives.
pub(crate) struct JsShared {
    pub root: OsRoot,
    pub options: HostOptions,
    pub catalog: Mutex<Catalog>,
}

/// An API request forwarded to the stream's owner.
pub(crate) struct Forwarded {
    pub subject: String,
    pub reply: Vec<u8>,
    pub body: Vec<u8>,
}

/// One shard's JetStream runtime.
pub(crate) struct JsRuntime {
    session: Rc<Session>,
    host: RefCell<Host<OsRoot>>,
    forwarded: RefCell<VecDeque<Forwarded>>,
    wake: Notify,
    /// The internal session's subscriptions by subject.
    subscribed: RefCell<HashMap<String, Rc<Subscription>>>,
    next_sid: std::cell::Cell<u64>,
    syncer: Syncer,
    /// The time streams and consumers run on: never backwards, from the
    /// store's newest timestamp on after a boot with an unset clock; forward
    /// jumps are handed to the host (`jetstream::clock`).
    clock: RefCell<JsClock>,
    started: std::time::Instant,
}

/// A thread that runs `fdatasync`s for one shard, so the shard is not blocked
/// while the disk syncs (the one blocking call on the message path).
struct Syncer {
    jobs: std::sync::mpsc::Sender<SyncJob>,
}

type SyncJob = (
    Vec<std::fs::File>,
    tokio::sync::oneshot::Sender<std::io::Result<()>>,
);

impl Syncer {
    fn spawn(shard: usize) -> std::io::Result<Syncer> {
        let (jobs, queue) = std::sync::mpsc::channel::<SyncJob>();
        std::thread::Builder::new()
            .name(format!("perch-sync-{shard}"))
            .spawn(move || {
                for (files, done) in queue {
                    let result = files.iter().try_for_each(|file| {
                        let started = std::time::Instant::now();
                        let result = file.sync_data();
                        crate::monitor::histogram::FSYNC.observe(started.elapsed());
                        result
                    });
                    let _ = done.send(result);
                }
            })?;
        Ok(Syncer { jobs })
    }

    /// `fdatasync`s every file on the sync thread; resolves when all returned.
    async fn sync(&self, files: Vec<std::fs::File>) -> std::io::Result<()> {
        let (done, result) = tokio::sync::oneshot::channel();
        if self.jobs.send((files, done)).is_err() {
            return Err(std::io::Error::other("the sync thread is gone"));
        }
        result
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("the sync thread is gone")))
    }
}

/// The wall clock (what `JsClock` corrects).
fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Logs the store failure and ends the process: nothing more is acknowledged.
fn fail_store(shard: usize, error: &StoreError) -> ! {
    tracing::error!(
        shard,
        "store failed, exiting so nothing more is acknowledged: {error}"
    );
    std::process::exit(EXIT_STORE_FAILED);
}

impl JsRuntime {
    /// Opens the shard's streams and subscribes its internal session.
    pub(crate) async fn start(
        shard: &Rc<Shard>,
        js: &JsShared,
    ) -> Result<Rc<JsRuntime>, StoreError> {
        // Recovery tells systemd where it is (STATUS=, shown by `systemctl
        // status`): at each stream's start and its first progress report, then
        // at most every RECOVERY_STATUS_MS, each report pushing the start
        // timeout back.
        let mut last_report: Option<std::time::Instant> = None;
        let mut report = |progress: &RecoveryProgress<'_>| {
            let due = if progress.records_read == 0 {
                last_report = None;
                true
            } else {
                let due = last_report
                    .is_none_or(|at| at.elapsed() >= Duration::from_millis(RECOVERY_STATUS_MS));
                if due {
                    last_report = Some(std::time::Instant::now());
                }
                due
            };
            if due {
                super::systemd::starting(&format!(
                    "recovering stream {} ({} of {} on shard {}): {} messages read",
                    progress.stream,
                    progress.stream_index + 1,
                    progress.streams,
                    shard.id,
                    progress.records_read
                ));
            }
        };
        let host = Host::open_reporting(
            js.root.clone(),
            js.options.clone(),
            shard.id,
            shard.shared.shard_count,
            now_ns(),
            &js.catalog,
            &mut report,
        )?;
        let started = std::time::Instant::now();
        let wall = now_ns();
        let floor = host.newest_timestamp_ns();
        if wall < floor {
            tracing::warn!(
                shard = shard.id,
                "the wall clock is {:.0} s behind the store's newest message: streams go on \
                 from that time until the clock catches up (no RTC? NTP not synced yet?)",
                (floor - wall) as f64 / 1e9
            );
        }
        let session = Session::new(
            u64::MAX - shard.id as u64,
            SessionLimits {
                pending_bytes_max: INTERNAL_PENDING_BYTES_MAX,
                subscriptions_max: 0,
            },
        );
        let runtime = Rc::new(JsRuntime {
            session,
            host: RefCell::new(host),
            forwarded: RefCell::new(VecDeque::new()),
            wake: Notify::new(),
            subscribed: RefCell::new(HashMap::new()),
            next_sid: std::cell::Cell::new(1),
            syncer: Syncer::spawn(shard.id)
                .map_err(StoreError::io("start the sync thread for", "the store"))?,
            clock: RefCell::new(JsClock::new(wall, 0, floor)),
            started,
        });
        runtime.op(
            shard,
            br#"CONNECT {"verbose":false,"pedantic":false,"headers":true,"echo":true}"#,
        );
        let api = format!("SUB {}> {API_QUEUE} 0", api::API_PREFIX);
        runtime.op(shard, api.as_bytes());
        runtime.sync_subscriptions(shard, true).await;
        Ok(runtime)
    }

    /// Reads JetStream's clock; a forward jump of the wall clock moves what
    /// was measured against the old time (see `jetstream::clock`).
    fn now(&self, shard: usize) -> i64 {
        let mono = self.started.elapsed().as_nanos() as i64;
        let reading = self.clock.borrow_mut().read(now_ns(), mono);
        let mut host = self.host.borrow_mut();
        if reading.jumped_ns > 0 {
            tracing::warn!(
                shard,
                "the wall clock jumped forward by {:.3} s: messages stamped since it was \
                 last trusted and consumer timers move by as much",
                reading.jumped_ns as f64 / 1e9
            );
            if let Err(e) = host.clock_jumped(reading.jumped_ns) {
                // The timestamps are corrected in memory; only a restart
                // before the next correction would see the old ones.
                tracing::warn!(shard, "storing the clock correction failed: {e}");
            }
        } else if reading.trusted {
            host.clock_trusted();
        }
        reading.now_ns
    }

    /// Runs one protocol op on the internal session, as a client's would run.
    fn op(&self, shard: &Shard, line: &[u8]) {
        if let Some(sub) = super::internal::op(&self.session, shard, line) {
            self.subscribed
                .borrow_mut()
                .insert(String::from_utf8_lossy(sub.subject()).into_owned(), sub);
        }
    }

    /// Makes the internal subscriptions match the streams this shard owns, and
    /// waits until every shard routes by them (so a stream's creator can publish
    /// to it from anywhere as soon as it has the reply).
    async fn sync_subscriptions(&self, shard: &Rc<Shard>, force_barrier: bool) {
        let wanted: BTreeSet<String> = self.host.borrow().subscriptions().into_iter().collect();
        let api_subject = format!("{}>", api::API_PREFIX);
        let stale: Vec<(String, Rc<Subscription>)> = self
            .subscribed
            .borrow()
            .iter()
            .filter(|(subject, _)| **subject != api_subject && !wanted.contains(*subject))
            .map(|(subject, sub)| (subject.clone(), Rc::clone(sub)))
            .collect();
        let mut changed = !stale.is_empty();
        for (subject, sub) in stale {
            self.subscribed.borrow_mut().remove(&subject);
            let line = format!("UNSUB {}", String::from_utf8_lossy(sub.sid()));
            self.op(shard, line.as_bytes());
        }
        for subject in wanted {
            if self.subscribed.borrow().contains_key(&subject) {
                continue;
            }
            let sid = self.next_sid.get();
            self.next_sid.set(sid + 1);
            self.op(shard, format!("SUB {subject} s{sid}").as_bytes());
            changed = true;
        }
        if changed || force_barrier {
            shard.broadcast_interest_and_wait().await;
        }
    }

    /// Clean shutdown: whatever `interval`/`none` streams have not synced yet is made
    /// durable now.
    pub(crate) fn sync_all(&self, shard: usize) {
        if let Err(e) = self.host.borrow_mut().sync_all() {
            fail_store(shard, &e);
        }
    }

    /// Queues a request forwarded by another shard.
    pub(crate) fn forward_in(&self, request: Forwarded) {
        self.forwarded.borrow_mut().push_back(request);
        self.wake.notify_one();
    }
}

/// The shard's JetStream task.
pub(crate) async fn run(shard: Rc<Shard>, runtime: Rc<JsRuntime>) {
    let js = shard
        .shared
        .js
        .as_ref()
        .expect("the JetStream task runs only with a store");
    let mut outgoing = Outgoing::new();
    let mut out: Vec<Outbound> = Vec::new();
    let mut next_expire = runtime.now(shard.id);
    let sync_interval_ns = shard.config().store_sync_interval_ms as i64 * 1_000_000;
    let mut next_sync = next_expire + sync_interval_ns;
    let mut push_active: HashMap<(String, String), bool> = HashMap::new();
    let mut push_waiting = false;
    let mut again = false;
    let mut deadline: Option<i64> = None;
    let mut held = HeldAcks::default();
    loop {
        let mut idle_ms = EXPIRE_TICK_MS.min(shard.config().store_sync_interval_ms);
        if push_waiting {
            idle_ms = idle_ms.min(PUSH_INTEREST_POLL_MS);
        }
        if let Some(at) = deadline {
            let now = runtime.clock.borrow().now_ns();
            let until_ms = (at.saturating_sub(now).max(0) / 1_000_000) as u64 + 1;
            idle_ms = idle_ms.min(until_ms);
        }
        if again {
            idle_ms = 0;
        }
        let idle = Duration::from_millis(idle_ms);
        tokio::select! {
            () = runtime.session.output_ready() => {}
            () = runtime.wake.notified() => {}
            () = tokio::time::sleep(idle) => {}
        }
        let frames = runtime.session.take_output(Vec::new());
        runtime.session.written();
        let now = runtime.now(shard.id);
        let interest = |subject: &[u8]| shard.router.borrow().has_interest(subject);
        let cx = ApiContext {
            now_ns: now,
            catalog: &js.catalog,
            interest: &interest,
        };
        let mut resubscribe = false;
        {
            let mut host = runtime.host.borrow_mut();
            super::internal::for_each_frame(shard.id, &frames, |msg| {
                if msg.subject.starts_with(api::API_PREFIX.as_bytes()) {
                    let subject = String::from_utf8_lossy(msg.subject).into_owned();
                    match api_target(&subject) {
                        ApiTarget::Unknown => {}
                        ApiTarget::Stream(name)
                            if owner_of(&name, shard.shared.shard_count) != shard.id =>
                        {
                            let owner = owner_of(&name, shard.shared.shard_count);
                            let _ =
                                shard.shared.peers.control[owner].send(Control::JsApi(Forwarded {
                                    subject,
                                    reply: msg.reply.to_vec(),
                                    body: msg.payload.to_vec(),
                                }));
                        }
                        _ => {
                            if host.has_pending() {
                                if let Err(e) = host.commit(&js.catalog, &mut out) {
                                    fail_store(shard.id, &e);
                                }
                            }
                            if let Err(e) =
                                host.handle_api(&subject, msg.reply, msg.payload, &cx, &mut out)
                            {
                                fail_store(shard.id, &e);
                            }
                            resubscribe = true;
                        }
                    }
                } else if msg.subject.starts_with(api::ACK_PREFIX.as_bytes()) {
                    if let Err(e) = host.ack(msg.subject, msg.reply, msg.payload, now, &mut out) {
                        fail_store(shard.id, &e);
                    }
                } else if msg.subject.starts_with(FLOW_CONTROL_PREFIX.as_bytes()) {
                    host.flow_control(msg.subject);
                } else {
                    host.publish(
                        msg.subject,
                        msg.reply,
                        msg.headers,
                        msg.payload,
                        now,
                        &mut out,
                    );
                }
            });
            loop {
                let Some(request) = runtime.forwarded.borrow_mut().pop_front() else {
                    break;
                };
                if host.has_pending() {
                    if let Err(e) = host.commit(&js.catalog, &mut out) {
                        fail_store(shard.id, &e);
                    }
                }
                if let Err(e) = host.handle_api(
                    &request.subject,
                    &request.reply,
                    &request.body,
                    &cx,
                    &mut out,
                ) {
                    fail_store(shard.id, &e);
                }
                resubscribe = true;
            }
            if host.has_pending() {
                if let Err(e) = host.commit_holding_acks(&js.catalog, &mut out, &mut held) {
                    fail_store(shard.id, &e);
                }
            }
        }
        // The fdatasync of the pass's batches runs on the sync thread while this
        // shard keeps serving its clients (whose publishes gather for the next
        // batch); the acks go out once it returned, and nothing reads the host
        // before then.
        if !held.syncs.is_empty() {
            let (tickets, files): (Vec<(String, SyncTicket)>, Vec<std::fs::File>) = held
                .syncs
                .drain(..)
                .map(|(name, ticket, file)| ((name, ticket), file))
                .unzip();
            if let Err(e) = runtime.syncer.sync(files).await {
                let e = StoreError::Io {
                    op: "sync",
                    file: "a stream segment".into(),
                    source: e,
                };
                fail_store(shard.id, &e);
            }
            runtime.host.borrow_mut().finish_syncs(&tickets);
            out.append(&mut held.replies);
        }
        {
            let mut host = runtime.host.borrow_mut();
            // Push consumers deliver only while someone listens on their subject.
            let router = shard.router.borrow();
            push_waiting = false;
            for (stream, name, deliver) in host.push_subjects() {
                let active = router.has_interest(&deliver);
                push_waiting |= !active;
                let key = (stream, name);
                if push_active.get(&key) != Some(&active) {
                    host.set_push_active(&key.0, &key.1, active, now);
                    push_active.insert(key, active);
                }
            }
            drop(router);
            match host.poll_consumers(now, &js.catalog, &mut out) {
                Ok(more) => again = more,
                Err(e) => fail_store(shard.id, &e),
            }
            deadline = host.next_deadline();
            if now >= next_sync {
                next_sync = now + sync_interval_ns;
                if let Err(e) = host.sync_interval_streams() {
                    fail_store(shard.id, &e);
                }
            }
            if now >= next_expire {
                next_expire = now + EXPIRE_TICK_MS as i64 * 1_000_000;
                if let Err(e) = host.expire(now, &js.catalog) {
                    fail_store(shard.id, &e);
                }
            }
        }
        if resubscribe {
            runtime.sync_subscriptions(&shard, false).await;
        }
        send(&shard, &mut outgoing, &mut out).await;
    }
}

/// Routes every outbound message like a publish from a client of this shard.
async fn send(shard: &Rc<Shard>, outgoing: &mut Outgoing, out: &mut Vec<Outbound>) {
    let peers = &shard.shared.peers;
    for message in out.drain(..) {
        let msg = Message {
            subject: &message.subject,
            reply: (!message.reply.is_empty()).then_some(message.reply.as_slice()),
            headers: (!message.headers.is_empty()).then_some(message.headers.as_slice()),
            payload: &message.payload,
        };
        let full = {
            let mut targets = shard.route_targets.borrow_mut();
            let outcome =
                shard
                    .router
                    .borrow_mut()
                    .route_as(&message.route_to, &msg, None, &mut targets);
            let route_as =
                (message.route_to != message.subject).then_some(message.route_to.as_slice());
            outcome.remote_shards > 0
                && outgoing.push_targets_as(
                    &mut targets,
                    route_as,
                    &msg,
                    shard.shared.shard_count,
                    &shard.batch_pool,
                    shard.id,
                    false,
                )
        };
        if full && outgoing.try_flush(peers) {
            outgoing.flush_blocked(peers).await;
        }
    }
    if outgoing.try_flush(peers) {
        outgoing.flush_blocked(peers).await;
    }
    shard.broadcast_interest();
}
