//! What shards send each other. Messages travel in *batches* over one bounded
//! channel per destination shard (batching measured ~15× faster than a send per
//! message here); control traffic (new sockets, interest changes, shutdown) has
//! its own unbounded channel so it can never be stuck behind data, and is bounded
//! in practice by connections and subscriptions, which have limits of their own.
//!
//! A full data mailbox stops the *publisher's* reads (its reader awaits the send),
//! never a shard's loop.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::nats::session::Message;
use crate::router::{InterestChange, QueueRef, RemoteTarget};

/// Batches a shard's data mailbox holds before publishers wait: with
/// BATCH_BYTES_MAX that bounds what one shard can have queued for another to
/// ~8 MiB of small messages (a batch exceeds BATCH_BYTES_MAX by at most one
/// message, so max_payload-sized messages can take it to 32 × (256 KiB + 1 MiB)).
pub(crate) const MAILBOX_BATCHES_MAX: usize = 32;
/// Envelopes a reader gathers for one shard before it sends the batch mid-pass.
pub(crate) const BATCH_ENVELOPES_MAX: usize = 1024;
/// Message bytes a reader gathers for one shard before it sends the batch mid-pass
/// (a single larger message still travels whole, in a batch of its own).
pub(crate) const BATCH_BYTES_MAX: usize = 256 * 1024;

/// Messages for one destination shard. Every message's subject, reply, headers
/// and payload are copied back to back into `data`, so a batch costs no
/// allocation per message. Batches are recycled: the destination hands each one
/// back to its origin shard ([`Peers::give_back`]), which reuses it. Per-message
/// allocations, and above all freeing on one shard what another allocated
/// (glibc serialises that on its arena locks), measured as the largest costs of
/// cross-shard delivery.
#[derive(Default)]
pub(crate) struct Batch {
    /// The shard that filled it and gets it back.
    pub origin: usize,
    data: Vec<u8>,
    pub envelopes: Vec<Envelope>,
    /// A fence: signalled once the destination has handled every batch the
    /// origin sent before it (the data channel is FIFO per sender).
    pub fence: Option<mpsc::UnboundedSender<()>>,
    /// The origin's count of data batches opened for this destination, this
    /// one included (0: not counted, as fences and passed-on batches). A
    /// connection move waits until the destination has handled every batch
    /// opened before a point (see `runtime/moves.rs`).
    pub seq: u64,
    /// Filled by a client's reader: a reply that arrives in it counts towards
    /// the receiving connection's round trips with the origin (connection
    /// affinity); JetStream's and the device gateway's batches do not.
    pub counts_for_affinity: bool,
}

/// Batches a shard keeps for reuse, and the largest data buffer worth keeping
/// (an idle shard holds at most 8 × 512 KiB).
const POOL_BATCHES_MAX: usize = 8;
const POOL_BATCH_BYTES_MAX: usize = 2 * BATCH_BYTES_MAX;

/// Emptied batches on their way back to the shard that allocated them. The
/// origin takes them itself whenever its pool runs dry ([`BatchPool::take`]),
/// so the batches a shard has allocated are bounded by what is in flight (the
/// data mailboxes are bounded), never by how often its control loop gets to
/// run: with each batch travelling home as a control message, a publisher
/// whose reader kept its shard busy left 1.3 GB of emptied batches queued
/// there in a 3 s stream.
#[derive(Default)]
pub(crate) struct Returned {
    batches: std::sync::Mutex<Vec<Batch>>,
    /// A [`Control::Recycled`] is on its way to the origin (one at a time).
    woken: std::sync::atomic::AtomicBool,
}

/// A shard's recycled batches, and the numbering of the batches it opens.
#[derive(Default)]
pub(crate) struct BatchPool {
    free: std::cell::RefCell<Vec<Batch>>,
    /// Where other shards put this shard's batches back.
    returned: Arc<Returned>,
    /// The other of the two vectors `returned` is swapped with (so neither
    /// side allocates one per reclaim).
    spare: std::cell::RefCell<Vec<Batch>>,
    /// Per destination: data batches opened for it so far ([`Batch::seq`]).
    opened_to: std::cell::RefCell<Vec<u64>>,
    /// The newest connection move whose switch this shard has applied: the
    /// stamp of every message it routes from then on (see `runtime/moves.rs`).
    pub switched: std::cell::Cell<u32>,
}

impl BatchPool {
    /// The pool of the shard whose batches come back to `returned`.
    pub(crate) fn new(returned: Arc<Returned>) -> BatchPool {
        BatchPool {
            returned,
            ..BatchPool::default()
        }
    }

    pub(crate) fn take(&self, origin: usize) -> Batch {
        if self.free.borrow().is_empty() {
            self.reclaim();
        }
        let mut batch = self.free.borrow_mut().pop().unwrap_or_default();
        batch.origin = origin;
        batch.seq = 0;
        batch.counts_for_affinity = false;
        batch
    }

    /// A batch for data to `destination`, numbered.
    fn open(&self, origin: usize, destination: usize) -> Batch {
        let mut batch = self.take(origin);
        batch.seq = {
            let mut opened = self.opened_to.borrow_mut();
            if opened.len() <= destination {
                opened.resize(destination + 1, 0);
            }
            opened[destination] += 1;
            opened[destination]
        };
        batch
    }

    /// Data batches opened for `destination` so far.
    pub(crate) fn opened_to(&self, destination: usize) -> u64 {
        self.opened_to
            .borrow()
            .get(destination)
            .copied()
            .unwrap_or(0)
    }

    /// Takes in the batches other shards have given back (freeing what the
    /// pool does not keep, here on the shard that allocated it).
    pub(crate) fn reclaim(&self) {
        let mut taken = std::mem::take(&mut *self.spare.borrow_mut());
        {
            let mut returned = self
                .returned
                .batches
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::swap(&mut taken, &mut *returned);
        }
        for batch in taken.drain(..) {
            self.give(batch);
        }
        *self.spare.borrow_mut() = taken;
    }

    /// Called for a [`Control::Recycled`]: later batches given back wake
    /// this shard again.
    pub(crate) fn reclaim_woken(&self) {
        self.returned
            .woken
            .store(false, std::sync::atomic::Ordering::Release);
        self.reclaim();
    }

    /// Keeps an emptied batch for reuse (or frees it, on this its origin shard).
    pub(crate) fn give(&self, mut batch: Batch) {
        batch.data.clear();
        batch.envelopes.clear();
        let mut free = self.free.borrow_mut();
        if free.len() < POOL_BATCHES_MAX && batch.data.capacity() <= POOL_BATCH_BYTES_MAX {
            free.push(batch);
        }
    }
}

/// One message's place in its batch's `data`, and where it goes on the shard.
pub(crate) struct Envelope {
    start: u32,
    /// ABSENT: matched against its own subject; otherwise the length of the
    /// subject to match, stored before the message's subject.
    route_len: u32,
    subject_len: u32,
    /// ABSENT: no reply subject.
    reply_len: u32,
    /// ABSENT: no headers (PUB); otherwise the header block's length (HPUB).
    headers_len: u32,
    payload_len: u32,
    /// [`BatchPool::switched`] of the origin when the message was routed.
    pub stamp: u32,
    pub plain: bool,
    pub queues: Vec<QueueRef>,
}

/// Marks an absent reply subject or header block.
const ABSENT: u32 = u32::MAX;

impl Batch {
    pub(crate) fn is_empty(&self) -> bool {
        self.envelopes.is_empty()
    }

    fn is_full(&self) -> bool {
        self.envelopes.len() >= BATCH_ENVELOPES_MAX || self.data.len() >= BATCH_BYTES_MAX
    }

    /// Appends a message for `target`, which the destination matches against
    /// `route_subject` (see [`crate::router::Router::route_as`]) when given, else
    /// against its own subject.
    pub(crate) fn push_as(
        &mut self,
        route_subject: Option<&[u8]>,
        msg: &Message<'_>,
        target: &mut RemoteTarget,
        stamp: u32,
    ) {
        let start = self.data.len();
        let reply = msg.reply.unwrap_or_default();
        let headers = msg.headers.unwrap_or_default();
        self.data
            .extend_from_slice(route_subject.unwrap_or_default());
        self.data.extend_from_slice(msg.subject);
        self.data.extend_from_slice(reply);
        self.data.extend_from_slice(headers);
        self.data.extend_from_slice(msg.payload);
        // Lengths fit in u32: subjects are bounded by the control line and payloads
        // by max_payload, and a batch stops growing at BATCH_BYTES_MAX plus one
        // message, all far below 4 GiB.
        assert!(self.data.len() < ABSENT as usize, "batch data within u32");
        self.envelopes.push(Envelope {
            start: start as u32,
            route_len: route_subject.map_or(ABSENT, |r| r.len() as u32),
            subject_len: msg.subject.len() as u32,
            reply_len: msg.reply.map_or(ABSENT, |r| r.len() as u32),
            headers_len: msg.headers.map_or(ABSENT, |h| h.len() as u32),
            payload_len: msg.payload.len() as u32,
            stamp,
            plain: target.plain,
            queues: std::mem::take(&mut target.queues),
        });
    }

    /// The messages with the subject to match them against and their routing,
    /// borrowed from the batch.
    pub(crate) fn messages(&self) -> impl Iterator<Item = (&[u8], Message<'_>, &Envelope)> {
        self.envelopes.iter().map(|e| {
            let (route_subject, msg) = e.message(&self.data);
            (route_subject, msg, e)
        })
    }
}

impl Envelope {
    fn message<'a>(&self, data: &'a [u8]) -> (&'a [u8], Message<'a>) {
        let mut at = self.start as usize;
        let mut take = |len: u32| {
            let slice = &data[at..at + len as usize];
            at += len as usize;
            slice
        };
        let route_subject = (self.route_len != ABSENT).then(|| take(self.route_len));
        let subject = take(self.subject_len);
        let reply = (self.reply_len != ABSENT).then(|| take(self.reply_len));
        let headers = (self.headers_len != ABSENT).then(|| take(self.headers_len));
        let payload = take(self.payload_len);
        let msg = Message {
            subject,
            reply,
            headers,
            payload,
        };
        (route_subject.unwrap_or(subject), msg)
    }
}

/// Control traffic between shards.
pub(crate) enum Control {
    /// Take over a socket that shard 0 accepted.
    Adopt {
        stream: std::net::TcpStream,
        client_id: u64,
        /// Over max_connections: send INFO and the error, then close.
        reject: bool,
    },
    /// Batches this shard sent are back, emptied, in its [`Returned`]. Sent
    /// by [`Peers::give_back`] at once, for the first batch given back since
    /// the last one was handled: in a request-reply this wakes the
    /// requester's shard while the responder is still working, so the vCPU
    /// wake-up (tens of µs on a VM) overlaps the reply instead of following
    /// it. Returning batches four at a time measured 44 → 75 µs
    /// request-reply p50 (BENCHMARKS.md).
    Recycled,
    /// Queue-group messages another shard could not deliver (every member it
    /// was picked for had left): deliver them here, like a data batch. Rare,
    /// hence on the unbounded control channel, where passing them on can
    /// never wait on a full mailbox (two shards passing on to each other).
    PassOn(Batch),
    /// A device datagram for a session this shard owns (received by another
    /// shard's socket: see `runtime/device.rs`).
    DeviceDatagram(super::device::ForwardedDatagram),
    /// A JetStream API request for a stream this shard owns.
    JsApi(super::jetstream::Forwarded),
    /// A config reload: apply these limits to new and live connections, then
    /// report the shard's id on `applied`.
    Reload {
        limits: crate::config::Limits,
        /// A changed `[authorization]` (inner None: authentication turned
        /// off); None when it did not change.
        #[allow(clippy::option_option)]
        auth: Option<Option<std::sync::Arc<crate::auth::Auth>>>,
        applied: mpsc::UnboundedSender<usize>,
    },
    /// Monitoring asks what only the shard knows (its connections, its
    /// device sessions); the shard answers on the request's oneshot at once,
    /// from its own loop. The asker times out on a busy shard, never the
    /// reverse (see `runtime/http.rs`).
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    Monitor(super::shard::MonitorRequest),
    /// Stop accepting, flush and close every client, then stop.
    Shutdown,
    /// A connection moving here (`runtime/moves.rs`, step 2).
    MoveIn(Box<super::moves::MovedConnection>),
    /// Shard `shard` switched to move `id` after opening `opened` data
    /// batches for this shard (step 4).
    MoveWatermark { id: u32, shard: usize, opened: u64 },
    /// What the shell recorded, for the moved connection; `overflow`: the
    /// shell passed max_pending (step 6).
    MoveEnd {
        id: u32,
        forwarded: Vec<u8>,
        overflow: bool,
    },
    /// The new shard could not take the connection.
    MoveAbort { id: u32 },
}

/// Interest traffic between shards, on a channel of its own so that any task
/// of the receiving shard (a reader about to route, not only the shard's
/// interest loop) can apply whatever has arrived: interest that reached a shard
/// is applied before that shard routes its next read pass.
pub(crate) enum InterestMessage {
    /// Apply another shard's interest change.
    Change(Arc<InterestChange>),
    /// The sender applied interest changes from this shard (sent once per
    /// drained pass): the SUB barrier's holds may now be met.
    Applied,
    /// Signal `applied`: every interest message the sender sent before this one
    /// has been applied (each channel is FIFO per sender).
    Fence { applied: mpsc::UnboundedSender<()> },
    /// Connection move `id` from shard `from` to `to` (the sender): switch
    /// (behind `to`'s gains, sent before this; `runtime/moves.rs`, step 4).
    MoveSwitch { id: u32, from: usize, to: usize },
}

/// The sending halves of every shard's mailboxes, shared by all shards.
pub(crate) struct Peers {
    pub data: Vec<mpsc::Sender<Batch>>,
    pub control: Vec<mpsc::UnboundedSender<Control>>,
    pub interest: Vec<mpsc::UnboundedSender<InterestMessage>>,
    /// Per shard: its batches given back by the others.
    pub returned: Vec<Arc<Returned>>,
}

impl Peers {
    /// Hands a delivered batch back to the shard that allocated it, waking
    /// that shard unless a wake is already on its way.
    pub(crate) fn give_back(&self, batch: Batch) {
        let origin = batch.origin;
        let returned = &self.returned[origin];
        returned
            .batches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(batch);
        if !returned
            .woken
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            let _ = self.control[origin].send(Control::Recycled);
        }
    }
}

/// The receiving halves for one shard.
pub(crate) struct Inbox {
    pub data: mpsc::Receiver<Batch>,
    pub control: mpsc::UnboundedReceiver<Control>,
    pub interest: mpsc::UnboundedReceiver<InterestMessage>,
}

/// Creates the mailboxes for `shards` shards.
pub(crate) fn mailboxes(shards: usize) -> (Peers, Vec<Inbox>) {
    let mut peers = Peers {
        data: Vec::new(),
        control: Vec::new(),
        interest: Vec::new(),
        returned: Vec::new(),
    };
    let mut inboxes = Vec::new();
    for _ in 0..shards {
        let (data_tx, data_rx) = mpsc::channel(MAILBOX_BATCHES_MAX);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (interest_tx, interest_rx) = mpsc::unbounded_channel();
        peers.data.push(data_tx);
        peers.control.push(control_tx);
        peers.interest.push(interest_tx);
        peers.returned.push(Arc::default());
        inboxes.push(Inbox {
            data: data_rx,
            control: control_rx,
            interest: interest_rx,
        });
    }
    (peers, inboxes)
}

/// A reader's outgoing batches, one per destination shard, flushed at the end of
/// each read pass (or when one fills up).
pub(crate) struct Outgoing {
    batches: Vec<Batch>,
    /// Bit k: a batch went to shard k since the last fence.
    sent_to: u64,
    /// Bit k: a message was queued for shard k since the reader last took
    /// this (once per read pass, for connection affinity); the reader sets
    /// its own shard's bit for a message delivered locally.
    pub pass_mask: u64,
    /// Messages the client published this pass that reached someone (taken
    /// with `pass_mask`: a publisher's flow, `runtime/moves.rs`).
    pub pass_published: u32,
}

impl Outgoing {
    pub(crate) fn new() -> Outgoing {
        Outgoing {
            batches: Vec::new(),
            sent_to: 0,
            pass_mask: 0,
            pass_published: 0,
        }
    }

    /// Queues a client's message for every shard in `targets` (the router's
    /// answer); returns true when some batch is full and should be flushed
    /// before reading on.
    pub(crate) fn push_targets(
        &mut self,
        targets: &mut [RemoteTarget],
        msg: &Message<'_>,
        shard_count: usize,
        pool: &BatchPool,
        origin: usize,
    ) -> bool {
        self.push_targets_as(targets, None, msg, shard_count, pool, origin, true)
    }

    /// [`Outgoing::push_targets`] for a message routed with `Router::route_as`;
    /// `counts_for_affinity`: a client's (JetStream's and the device
    /// gateway's messages never make a connection move).
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push_targets_as(
        &mut self,
        targets: &mut [RemoteTarget],
        route_subject: Option<&[u8]>,
        msg: &Message<'_>,
        shard_count: usize,
        pool: &BatchPool,
        origin: usize,
        counts_for_affinity: bool,
    ) -> bool {
        if self.batches.len() < shard_count {
            self.batches.resize_with(shard_count, Batch::default);
        }
        let mut full = false;
        let stamp = pool.switched.get();
        for target in targets {
            let batch = &mut self.batches[target.shard];
            if batch.envelopes.capacity() == 0 || batch.seq == 0 {
                *batch = pool.open(origin, target.shard);
                batch.counts_for_affinity = counts_for_affinity;
            }
            batch.push_as(route_subject, msg, target, stamp);
            self.pass_mask |= 1 << target.shard;
            full |= batch.is_full();
        }
        full
    }

    /// Sends every non-empty batch whose mailbox has room. Returns true when some
    /// mailbox was full: those batches stay here for [`Outgoing::flush_blocked`].
    /// A closed mailbox (shard stopping) drops its batch.
    pub(crate) fn try_flush(&mut self, peers: &Peers) -> bool {
        let mut blocked = false;
        for (shard, batch) in self.batches.iter_mut().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let full = std::mem::take(batch);
            self.sent_to |= 1 << shard;
            match peers.data[shard].try_send(full) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(full)) => {
                    *batch = full;
                    blocked = true;
                }
            }
        }
        blocked
    }

    /// Waits (stopping this reader only: TCP backpressure on its client) until
    /// every pending batch is in its mailbox.
    pub(crate) async fn flush_blocked(&mut self, peers: &Peers) {
        for (shard, batch) in self.batches.iter_mut().enumerate() {
            if batch.is_empty() {
                continue;
            }
            self.sent_to |= 1 << shard;
            let _ = peers.data[shard].send(std::mem::take(batch)).await;
        }
    }

    /// Whether messages went to other shards since the last fence (or are still
    /// waiting to go).
    pub(crate) fn needs_fence(&self) -> bool {
        self.sent_to != 0 || self.batches.iter().any(|b| !b.is_empty())
    }

    /// Sends everything pending, then waits until every shard that got batches
    /// from this reader has delivered them to its subscribers.
    pub(crate) async fn fence(&mut self, peers: &Peers) {
        if self.try_flush(peers) {
            self.flush_blocked(peers).await;
        }
        let (applied_tx, mut applied_rx) = mpsc::unbounded_channel();
        let mut fences = 0;
        let mut shards = std::mem::take(&mut self.sent_to);
        while shards != 0 {
            let shard = shards.trailing_zeros() as usize;
            shards &= shards - 1;
            let fence = Batch {
                fence: Some(applied_tx.clone()),
                ..Batch::default()
            };
            if peers.data[shard].send(fence).await.is_ok() {
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

    /// Hands unused batch buffers back to the pool, so idle connections hold none.
    pub(crate) fn shrink(&mut self, pool: &BatchPool) {
        for batch in self.batches.drain(..) {
            if batch.is_empty() && batch.envelopes.capacity() > 0 {
                pool.give(batch);
            }
        }
        self.batches = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batches handed back to their origin are reused by it even while its
    /// control loop never runs (a reader keeping the shard busy), and however
    /// many come back, one wake-up is queued for it.
    #[test]
    fn batches_given_back_are_reused_without_the_control_loop() {
        let (peers, mut inboxes) = mailboxes(2);
        let pool = BatchPool::new(Arc::clone(&peers.returned[0]));
        let msg = Message {
            subject: b"s",
            reply: None,
            headers: None,
            payload: b"x",
        };
        let mut buffers = std::collections::HashSet::new();
        for _ in 0..1000 {
            let mut batch = pool.open(0, 1);
            batch.push_as(None, &msg, &mut RemoteTarget::default(), 0);
            buffers.insert(batch.envelopes.as_ptr() as usize);
            // Shard 1 delivers it and hands it back.
            peers.give_back(batch);
        }
        assert_eq!(buffers.len(), 1, "every batch after the first was reused");
        let woken = |inbox: &mut Inbox| {
            let mut n = 0;
            while let Ok(message) = inbox.control.try_recv() {
                assert!(matches!(message, Control::Recycled));
                n += 1;
            }
            n
        };
        assert_eq!(woken(&mut inboxes[0]), 1);
        pool.reclaim_woken();
        peers.give_back(pool.take(0));
        assert_eq!(
            woken(&mut inboxes[0]),
            1,
            "a wake-up once the last was handled"
        );
        assert_eq!(woken(&mut inboxes[1]), 0);
    }

    #[test]
    fn batch_round_trips_every_message_shape() {
        let cases = [
            (b"a".as_slice(), None, None, b"".as_slice()),
            (b"foo.bar", Some(b"_INBOX.1".as_slice()), None, b"hello"),
            (
                b"foo",
                None,
                Some(b"NATS/1.0\r\nA: b\r\n\r\n".as_slice()),
                b"x",
            ),
            (
                b"foo",
                Some(b"r".as_slice()),
                Some(b"NATS/1.0\r\n\r\n".as_slice()),
                b"",
            ),
            (b"foo", Some(b"".as_slice()), None, b"p"),
        ];
        let mut batch = Batch::default();
        for (subject, reply, headers, payload) in cases {
            let msg = Message {
                subject,
                reply,
                headers,
                payload,
            };
            batch.push_as(None, &msg, &mut RemoteTarget::default(), 0);
        }
        assert_eq!(batch.envelopes.len(), cases.len());
        for ((route, back, _), (subject, reply, headers, payload)) in batch.messages().zip(cases) {
            assert_eq!(route, subject);
            assert_eq!(back.subject, subject);
            assert_eq!(back.reply, reply);
            assert_eq!(back.headers, headers);
            assert_eq!(back.payload, payload);
        }
    }
}
