//! Connection affinity: an established client connection moves to the shard
//! it has most of its round trips with, so that a requester and its responder
//! end up on one shard and a round trip costs no cross-shard wake-up.
//!
//! ## When (see [`Affinity`])
//! A reader counts, per read pass, whether the client published something in
//! reply to a message that another shard's client sent it (a round trip with
//! that shard) or that a client of this shard sent it (a local one). A window
//! of 100 ms *qualifies* for shard k when it had at least
//! [`ROUND_TRIPS_MIN`] round trips with k and 3× more than local ones; two
//! qualifying windows in a row start a move, when the admission checks pass
//! ([`admit`]): one move at a time in the process, at most one per
//! connection per minute, and the target no more than `max(2, n/16)`
//! connections above an even share. One-way traffic (fan-in, fan-out,
//! pub-sub) has no round trips and never moves; JetStream's and the device
//! gateway's deliveries do not count.
//!
//! ## How (connection C, old shard S, new shard T, move id M)
//! 1. C's reader stops at the end of a pass, fences what C published (so
//!    nothing C publishes from T can overtake it) and stops C's writer after
//!    its write in flight. The socket stays open.
//! 2. **Cut, on S:** a *shell* session with C's id and subscriptions takes
//!    their place in S's router (S's interest does not change), and S marks
//!    the router `Leaving{C, M}`. The real session (its Rc graph: the session
//!    and its subscriptions, nothing else) and a duplicate of the socket go to
//!    T in `Control::MoveIn`.
//! 3. **T** adopts the socket, subscribes C's subscriptions (its gains go
//!    out), marks its router `Arriving{C, M}`, holds C's output (what was
//!    queued on S is written at once), *switches* (everything T routes from
//!    now on is stamped M) and sends `MoveSwitch{M}` to every other shard on
//!    the interest channel, behind its gains.
//! 4. **Every other shard P**, applying `MoveSwitch` after T's gains,
//!    switches, and tells S and T how many data batches it had opened for
//!    each (`MoveWatermark`).
//! 5. A message for C routed *before* its origin's switch (stamp < M) reaches
//!    S (which still advertises C's subjects) and is recorded by the shell;
//!    T skips its copy, if it got one. One routed *after* (stamp ≥ M) reaches
//!    T (whose gains its origin applied first) and is delivered; S skips it.
//!    Exactly one copy of each message counts, and each publisher's messages
//!    are a prefix through S followed by a suffix direct to T.
//! 6. **S ends** once it has switched and has handled every batch each shard
//!    opened for it before switching (its watermarks): the shell's records
//!    go to T (`MoveEnd`), the shell's subscriptions leave S's router (S's
//!    losses go out) and the mark is cleared.
//! 7. **T**, on `MoveEnd`, delivers the records through C's own
//!    subscriptions *ahead of* everything held, releases the hold and starts
//!    C's reader (with the bytes of a frame that was half read on S). It
//!    clears its mark once it has handled every batch opened for it before
//!    each shard's switch. The move is over when both halves are.
//!
//! Not moved: TLS connections, queue-group members and subscriptions with a
//! max (`UNSUB sid max`), connections with a SUB barrier pending or not yet
//! established. `--affinity off` turns moves off; the hidden
//! `--debug-move-every N` forces a move every N read passes (tests).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use tokio::sync::Notify;

use super::mailbox::{Control, InterestMessage};
use super::shard::Shard;
use crate::nats::session::{CloseReason, Session};
use crate::router::MoveMark;

/// Round trips with one shard in a window (100 ms) before it can qualify:
/// 160 a second. Slower request-reply gains too little to be worth a move.
pub(crate) const ROUND_TRIPS_MIN: u32 = 16;
/// A qualifying window has this many times more round trips with the other
/// shard than local ones.
const DOMINANCE: u32 = 3;
/// Qualifying windows in a row before a move.
const STREAK_MIN: u8 = 2;
/// Length of a window.
const WINDOW_MS: u64 = 100;
/// A connection moves at most once per this.
const CONNECTION_MOVE_GAP_MS: u64 = 60_000;
/// Moves start at most this often in the whole process.
const PROCESS_MOVE_GAP_MS: u64 = 10;

/// One connection's round-trip counts (only connections that have round
/// trips have one: kept by the shard, keyed by client id).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Affinity {
    window: u64,
    local: u32,
    /// The majority candidate among other shards (Misra–Gries with one
    /// counter) and its count, a lower bound of its true count.
    candidate: u8,
    remote: u32,
    streak_shard: u8,
    streak: u8,
    /// When the connection last moved (shard clock, ms); 0: never.
    pub last_move_ms: u64,
    /// What it publishes, and where to.
    pub flow: Flow,
}

/// Messages a publisher sent to one other shard alone in a window (100 ms)
/// before the window can qualify: 100 000 a second. Below that rate the
/// cross-shard hop costs little; above it, it is most of the broker's CPU
/// per message (BENCHMARKS.md, "Connection moves for flows").
pub(crate) const FLOW_MSGS_MIN: u32 = 10_000;
/// A read pass that published at least this many messages starts a
/// connection's flow counts. A request (one message a pass) or a device's
/// burst (a hundred) never does, so request-reply partners, which are faster
/// on separate shards on the machines measured, stay apart.
pub(crate) const FLOW_PASS_MIN: u32 = 256;

/// One read pass of a publisher, for [`Flow::note`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FlowPass {
    /// Everything it published went to this other shard alone.
    Only(u8),
    /// Some was delivered here, or it went to several shards.
    Spread,
}

/// A publisher's flow counts: a window qualifies for shard k when at least
/// [`FLOW_MSGS_MIN`] of its messages went to k alone and 3× more than
/// everywhere else; two qualifying windows in a row ask for a move to k
/// (the publisher joins its subscribers: one shard then parses, routes and
/// writes each message, with no copy into a batch, no second match and no
/// wake-up of another shard).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Flow {
    window: u64,
    to: u8,
    to_msgs: u32,
    other: u32,
    streak_shard: u8,
    streak: u8,
}

impl Flow {
    /// Counts one read pass that published `published` messages at
    /// `now_ms`; returns the shard to move to when the previous window
    /// closed a streak.
    pub(crate) fn note(&mut self, pass: FlowPass, published: u32, now_ms: u64) -> Option<u8> {
        let window = now_ms / WINDOW_MS;
        let mut wanted = None;
        if window != self.window {
            wanted = self.close_window(window);
        }
        match pass {
            FlowPass::Only(shard) if shard == self.to || self.to_msgs == 0 => {
                self.to = shard;
                self.to_msgs = self.to_msgs.saturating_add(published);
            }
            _ => self.other = self.other.saturating_add(published),
        }
        wanted
    }

    fn close_window(&mut self, window: u64) -> Option<u8> {
        if self.window + 1 != window {
            self.streak = 0;
        }
        let qualifies =
            self.to_msgs >= FLOW_MSGS_MIN && self.to_msgs >= DOMINANCE.saturating_mul(self.other);
        if !qualifies {
            self.streak = 0;
        } else if self.streak > 0 && self.streak_shard == self.to {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.streak_shard = self.to;
            self.streak = 1;
        }
        self.window = window;
        self.to_msgs = 0;
        self.other = 0;
        (self.streak >= STREAK_MIN).then_some(self.streak_shard)
    }

    /// A move was tried (or made): the streak starts again.
    pub(crate) fn restart(&mut self) {
        self.streak = 0;
    }
}

/// A round trip, for [`Affinity::note`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RoundTrip {
    Local,
    With(u8),
}

impl Affinity {
    /// Counts one round trip at `now_ms`; returns the shard to move to when
    /// the previous window closed a streak.
    pub(crate) fn note(&mut self, round_trip: RoundTrip, now_ms: u64) -> Option<u8> {
        let window = now_ms / WINDOW_MS;
        let mut wanted = None;
        if window != self.window {
            wanted = self.close_window(window);
        }
        match round_trip {
            RoundTrip::Local => self.local = self.local.saturating_add(1),
            RoundTrip::With(shard) if shard == self.candidate && self.remote > 0 => {
                self.remote = self.remote.saturating_add(1)
            }
            RoundTrip::With(shard) if self.remote == 0 => {
                self.candidate = shard;
                self.remote = 1;
            }
            RoundTrip::With(_) => self.remote -= 1,
        }
        wanted
    }

    fn close_window(&mut self, window: u64) -> Option<u8> {
        if self.window + 1 != window {
            // Idle in between: a streak needs consecutive windows.
            self.streak = 0;
        }
        let qualifies =
            self.remote >= ROUND_TRIPS_MIN && self.remote >= DOMINANCE.saturating_mul(self.local);
        if !qualifies {
            self.streak = 0;
        } else if self.streak > 0 && self.streak_shard == self.candidate {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.streak_shard = self.candidate;
            self.streak = 1;
        }
        self.window = window;
        self.local = 0;
        self.remote = 0;
        (self.streak >= STREAK_MIN).then_some(self.streak_shard)
    }

    /// A move was tried (or made): the streak starts again.
    pub(crate) fn restart(&mut self) {
        self.streak = 0;
    }
}

/// Whether connection `client_id` may move from `shard` to `to` now; if so
/// the process-wide move lock is taken and a connection slot reserved on
/// `to`, and the move's id is returned. `forced`: the debug knob (only the
/// lock applies).
pub(crate) fn admit(shard: &Shard, to: usize, last_move_ms: u64, forced: bool) -> Option<u32> {
    let shared = &shard.shared;
    let now_ms = shared.clock_ms();
    if to == shard.id || to >= shared.shard_count {
        return None;
    }
    if !forced {
        if last_move_ms != 0 && now_ms.saturating_sub(last_move_ms) < CONNECTION_MOVE_GAP_MS {
            return None;
        }
        let total = shared.connections_total.load(Ordering::Relaxed);
        let even = total.div_ceil(shared.shard_count);
        let there = shared.connections_per_shard[to].load(Ordering::Relaxed);
        if there + 1 > even + (total / 16).max(2) {
            return None;
        }
        if now_ms.saturating_sub(shared.last_move_started_ms.load(Ordering::Relaxed))
            < PROCESS_MOVE_GAP_MS
        {
            return None;
        }
    }
    let id = shared.next_move_id.fetch_add(1, Ordering::Relaxed);
    if shared
        .move_in_progress
        .compare_exchange(0, id, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return None;
    }
    shared.move_halves_left.store(2, Ordering::Release);
    shared.last_move_started_ms.store(now_ms, Ordering::Relaxed);
    shared.connections_per_shard[to].fetch_add(1, Ordering::Relaxed);
    Some(id)
}

/// Gives the lock back for a move that never started (the connection closed
/// before its cut).
pub(crate) fn abandon(shard: &Shard, id: u32, to: usize) {
    let shared = &shard.shared;
    shared.connections_per_shard[to].fetch_sub(1, Ordering::Relaxed);
    let _ = shared
        .move_in_progress
        .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Relaxed);
}

/// A session on its way to another shard. Rc is not Send; this one may be
/// sent because [`SessionGraph::new`] checked that nothing but the graph
/// itself (the session and its subscriptions, which point at each other)
/// holds a reference to any of its parts, so no count is ever touched on
/// the old thread again.
pub(crate) struct SessionGraph(Rc<Session>);

// SAFETY: see the type's documentation; checked at construction.
unsafe impl Send for SessionGraph {}

impl SessionGraph {
    /// Wraps `session` when `session` (this one handle plus one per
    /// subscription's back reference) and each subscription (the table's
    /// one) are referenced by nothing else.
    pub(crate) fn new(session: Rc<Session>) -> Result<SessionGraph, Rc<Session>> {
        let subs = session.subscriptions();
        // Each clone in `subs` adds one to its subscription's count.
        let subs_alone = subs
            .iter()
            .all(|s| Rc::strong_count(s) == 2 && Rc::weak_count(s) == 0);
        let session_alone =
            Rc::strong_count(&session) == 1 + subs.len() && Rc::weak_count(&session) == 0;
        drop(subs);
        if subs_alone && session_alone {
            Ok(SessionGraph(session))
        } else {
            Err(session)
        }
    }

    pub(crate) fn into_inner(self) -> Rc<Session> {
        self.0
    }
}

/// What crosses from S to T.
pub(crate) struct MovedConnection {
    pub id: u32,
    pub from: usize,
    pub stream: std::net::TcpStream,
    pub session: SessionGraph,
    /// The incomplete frame the reader had (bytes after the last whole op).
    pub read_buffer: Vec<u8>,
    pub frame_bytes_needed: usize,
    pub opened_ms: u64,
    pub affinity: Affinity,
}

/// Per origin: which of its numbered batches this shard has handled.
#[derive(Default)]
pub(crate) struct Processed {
    /// Every batch numbered below this is handled.
    next: u64,
    /// Handled out of order, above `next`.
    ahead: BTreeSet<u64>,
}

impl Processed {
    fn done(&mut self, seq: u64) {
        if self.next == 0 {
            self.next = 1;
        }
        if seq == self.next {
            self.next += 1;
            while self.ahead.remove(&self.next) {
                self.next += 1;
            }
        } else if seq > self.next {
            self.ahead.insert(seq);
        }
    }

    /// Whether batches 1..=`seq` are all handled.
    fn covers(&self, seq: u64) -> bool {
        seq == 0 || self.next > seq
    }
}

/// This shard's half of the move in progress.
pub(crate) enum Half {
    Leaving {
        id: u32,
        to: usize,
        shell: Rc<Session>,
        switched: bool,
        /// Per shard: batches it opened for this shard before its switch.
        watermarks: Vec<Option<u64>>,
    },
    Arriving {
        id: u32,
        from: usize,
        session: Rc<Session>,
        /// Wakes C's reader once the shell's records are delivered.
        start: Rc<Notify>,
        ended: bool,
        watermarks: Vec<Option<u64>>,
    },
}

/// A shard's move bookkeeping.
#[derive(Default)]
pub(crate) struct Moves {
    pub half: RefCell<Option<Half>>,
    processed: RefCell<Vec<Processed>>,
    /// Round-trip counts of this shard's connections that have any.
    pub affinity: RefCell<std::collections::HashMap<u64, Affinity>>,
    /// Moved connections' half-read frames, until their reader starts.
    resumes: RefCell<std::collections::HashMap<u64, (Vec<u8>, usize)>>,
}

impl Moves {
    /// Keeps what a moved connection's reader starts with.
    pub(crate) fn resume(&self, client_id: u64, buf: Vec<u8>, frame_bytes_needed: usize) {
        self.resumes
            .borrow_mut()
            .insert(client_id, (buf, frame_bytes_needed));
    }

    /// What a reader starts with, if its connection moved here.
    pub(crate) fn take_resume(&self, client_id: u64) -> Option<(Vec<u8>, usize)> {
        let mut resumes = self.resumes.borrow_mut();
        if resumes.is_empty() {
            return None;
        }
        resumes.remove(&client_id)
    }
    /// A data batch from `origin` numbered `seq` was handled.
    pub(crate) fn batch_done(&self, origin: usize, seq: u64) {
        if seq == 0 {
            return;
        }
        let mut processed = self.processed.borrow_mut();
        if processed.len() <= origin {
            processed.resize_with(origin + 1, Processed::default);
        }
        processed[origin].done(seq);
    }

    fn covers(&self, origin: usize, seq: u64) -> bool {
        self.processed
            .borrow()
            .get(origin)
            .map_or(seq == 0, |p| p.covers(seq))
    }

    fn watermarks_met(&self, me: usize, watermarks: &[Option<u64>]) -> bool {
        watermarks
            .iter()
            .enumerate()
            .all(|(shard, w)| shard == me || w.is_some_and(|w| self.covers(shard, w)))
    }
}

/// A connection leaving this shard: the admitted move and the reader's state.
pub(crate) struct Departure {
    pub id: u32,
    pub to: usize,
    pub read_buffer: Vec<u8>,
    pub frame_bytes_needed: usize,
    pub opened_ms: u64,
}

/// Step 2 on S: the cut. `session` is the moving connection's, unregistered
/// from this shard; its subscriptions are still in the router.
pub(crate) fn cut(
    shard: &Rc<Shard>,
    session: Rc<Session>,
    stream: std::net::TcpStream,
    departure: Departure,
) {
    let Departure {
        id,
        to,
        read_buffer,
        frame_bytes_needed,
        opened_ms,
    } = departure;
    let (shell, shell_subs) = Session::shell_of(&session);
    let subs = session.subscriptions();
    {
        let mut router = shard.router.borrow_mut();
        // Shell first, so no subject's local count passes through zero:
        // S's interest does not change.
        for sub in shell_subs {
            router.subscribe(sub);
        }
        for sub in &subs {
            router.unsubscribe(sub);
        }
        router.mark = Some(MoveMark::Leaving {
            session: session.id,
            id,
        });
    }
    drop(subs);
    let affinity = shard
        .moves
        .affinity
        .borrow_mut()
        .remove(&session.id)
        .unwrap_or_default();
    let graph = match SessionGraph::new(session) {
        Ok(graph) => graph,
        Err(session) => {
            // A reference the move does not know about: a bug, but not one
            // to crash on. The client is closed instead.
            tracing::error!(
                client_id = session.id,
                "connection move: the session is still referenced; closing it"
            );
            session.close(CloseReason::ServerShutdown);
            drop(session);
            drop(stream);
            end_leaving_now(shard, id, shell, to, true);
            return;
        }
    };
    *shard.moves.half.borrow_mut() = Some(Half::Leaving {
        id,
        to,
        shell,
        switched: false,
        watermarks: vec![None; shard.shared.shard_count],
    });
    let moved = MovedConnection {
        id,
        from: shard.id,
        stream,
        session: graph,
        read_buffer,
        frame_bytes_needed,
        opened_ms,
        affinity: Affinity {
            last_move_ms: shard.shared.clock_ms().max(1),
            ..affinity
        },
    };
    if shard.shared.peers.control[to]
        .send(Control::MoveIn(Box::new(moved)))
        .is_err()
    {
        // Shutting down: nothing more to do.
        tracing::debug!("connection move during shutdown");
    }
}

/// Tears the shell down (the move failed or ended).
fn end_leaving_now(shard: &Shard, id: u32, shell: Rc<Session>, to: usize, failed: bool) {
    let subs = shell.take_subscriptions();
    {
        let mut router = shard.router.borrow_mut();
        router.unsubscribe_dead(&subs);
        router.mark = None;
    }
    shard.broadcast_interest();
    if failed {
        let shared = &shard.shared;
        shared.connections_per_shard[to].fetch_sub(1, Ordering::Relaxed);
        shared.connections_total.fetch_sub(1, Ordering::Relaxed);
        let _ =
            shared
                .move_in_progress
                .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Relaxed);
    } else {
        half_done(shard);
    }
}

/// Step 3 on T, once the socket is adopted. Returns what starts C's reader.
pub(crate) fn arrive(
    shard: &Shard,
    id: u32,
    from: usize,
    affinity: Affinity,
    session: &Rc<Session>,
) -> Rc<Notify> {
    {
        let mut router = shard.router.borrow_mut();
        for sub in session.subscriptions() {
            router.subscribe(sub);
        }
        router.mark = Some(MoveMark::Arriving {
            session: session.id,
            id,
        });
        router.switched = id;
    }
    shard.batch_pool.switched.set(id);
    session.hold_output();
    session.attached();
    shard
        .moves
        .affinity
        .borrow_mut()
        .insert(session.id, affinity);
    // Gains first, then the switch behind them on every interest channel.
    shard.broadcast_interest();
    for (p, interest) in shard.shared.peers.interest.iter().enumerate() {
        if p != shard.id {
            let _ = interest.send(InterestMessage::MoveSwitch {
                id,
                from,
                to: shard.id,
            });
        }
    }
    let _ = shard.shared.peers.control[from].send(Control::MoveWatermark {
        id,
        shard: shard.id,
        opened: shard.batch_pool.opened_to(from),
    });
    let start = Rc::new(Notify::new());
    *shard.moves.half.borrow_mut() = Some(Half::Arriving {
        id,
        from,
        session: Rc::clone(session),
        start: Rc::clone(&start),
        ended: false,
        watermarks: vec![None; shard.shared.shard_count],
    });
    start
}

/// T could not adopt the socket: the client is gone, and S tears its shell down.
pub(crate) fn refuse(shard: &Shard, id: u32, from: usize, session: Rc<Session>) {
    drop(session.take_subscriptions());
    let _ = shard.shared.peers.control[from].send(Control::MoveAbort { id });
}

/// Step 4 on every shard but T (S included).
pub(crate) fn switch(shard: &Shard, id: u32, from: usize, to: usize) {
    shard.batch_pool.switched.set(id);
    shard.router.borrow_mut().switched = id;
    let control = &shard.shared.peers.control;
    if shard.id != from {
        let _ = control[from].send(Control::MoveWatermark {
            id,
            shard: shard.id,
            opened: shard.batch_pool.opened_to(from),
        });
    }
    let _ = control[to].send(Control::MoveWatermark {
        id,
        shard: shard.id,
        opened: shard.batch_pool.opened_to(to),
    });
    if shard.id == from {
        if let Some(Half::Leaving {
            id: leaving,
            switched,
            ..
        }) = &mut *shard.moves.half.borrow_mut()
        {
            if *leaving == id {
                *switched = true;
            }
        }
        progress(shard);
    }
}

/// A watermark from `from_shard` for move `id`.
pub(crate) fn watermark(shard: &Shard, id: u32, from_shard: usize, opened: u64) {
    match &mut *shard.moves.half.borrow_mut() {
        Some(Half::Leaving {
            id: m, watermarks, ..
        })
        | Some(Half::Arriving {
            id: m, watermarks, ..
        }) if *m == id => watermarks[from_shard] = Some(opened),
        _ => return,
    }
    progress(shard);
}

/// `MoveEnd` on T: the shell's records, delivered ahead of what was held.
pub(crate) fn end(shard: &Shard, id: u32, forwarded: Vec<u8>, overflow: bool) {
    let start = match &mut *shard.moves.half.borrow_mut() {
        Some(Half::Arriving {
            id: m,
            session,
            start,
            ended,
            ..
        }) if *m == id => {
            if overflow {
                // The shell passed the client's max_pending: so would the
                // client have.
                session.close(CloseReason::SlowConsumer);
            } else if !session.deliver_forwarded(&forwarded) {
                tracing::error!(client_id = session.id, "connection move: bad records");
                session.close(CloseReason::ServerShutdown);
            }
            session.release_hold();
            *ended = true;
            Rc::clone(start)
        }
        _ => return,
    };
    shard.broadcast_interest();
    start.notify_one();
    progress(shard);
}

/// `MoveAbort` on S: T could not take the connection.
pub(crate) fn abort(shard: &Shard, id: u32) {
    let half = shard.moves.half.borrow_mut().take();
    match half {
        Some(Half::Leaving {
            id: m, to, shell, ..
        }) if m == id => {
            tracing::warn!(shard = shard.id, "connection move refused by shard {to}");
            end_leaving_now(shard, id, shell, to, true);
        }
        other => *shard.moves.half.borrow_mut() = other,
    }
}

/// Ends this shard's half when its conditions are met (steps 6 and 7).
pub(crate) fn progress(shard: &Shard) {
    let moves = &shard.moves;
    let ready = match &*moves.half.borrow() {
        None => return,
        Some(Half::Leaving {
            switched,
            watermarks,
            ..
        }) => *switched && moves.watermarks_met(shard.id, watermarks),
        Some(Half::Arriving {
            ended, watermarks, ..
        }) => *ended && moves.watermarks_met(shard.id, watermarks),
    };
    if !ready {
        return;
    }
    match moves.half.borrow_mut().take() {
        Some(Half::Leaving { id, to, shell, .. }) => {
            let overflow = shell.is_closing();
            let forwarded = shell.take_forwarded();
            let _ = shard.shared.peers.control[to].send(Control::MoveEnd {
                id,
                forwarded,
                overflow,
            });
            end_leaving_now(shard, id, shell, to, false);
        }
        Some(Half::Arriving { id, from, .. }) => {
            shard.router.borrow_mut().mark = None;
            tracing::debug!(shard = shard.id, id, from, "connection move done");
            half_done(shard);
        }
        None => {}
    }
}

/// One half of the move in progress is over; the second releases the lock.
fn half_done(shard: &Shard) {
    let shared = &shard.shared;
    if shared.move_halves_left.fetch_sub(1, Ordering::AcqRel) == 1 {
        shared.moves_total.fetch_add(1, Ordering::Relaxed);
        shared.move_in_progress.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window_of(a: &mut Affinity, window: u64, remote: u32, shard: u8, local: u32) -> Option<u8> {
        let mut wanted = None;
        for _ in 0..remote {
            wanted = wanted.or(a.note(RoundTrip::With(shard), window * WINDOW_MS));
        }
        for _ in 0..local {
            wanted = wanted.or(a.note(RoundTrip::Local, window * WINDOW_MS));
        }
        wanted
    }

    #[test]
    fn two_dominated_windows_in_a_row_ask_for_a_move() {
        let mut a = Affinity::default();
        assert_eq!(window_of(&mut a, 10, 40, 1, 2), None);
        assert_eq!(window_of(&mut a, 11, 40, 1, 2), None);
        // Closing window 11 (the second in a row) asks.
        assert_eq!(a.note(RoundTrip::Local, 12 * WINDOW_MS), Some(1));
    }

    #[test]
    fn balanced_sparse_or_interrupted_traffic_never_asks() {
        // Half local, half remote: the queue-group shape.
        let mut a = Affinity::default();
        for w in 0..20 {
            assert_eq!(window_of(&mut a, w, 40, 1, 40), None);
        }
        // Below 16 round trips a window.
        let mut a = Affinity::default();
        for w in 0..20 {
            assert_eq!(window_of(&mut a, w, 15, 1, 0), None);
        }
        // Qualifying windows with an idle one between.
        let mut a = Affinity::default();
        for w in [0, 2, 4, 6, 8] {
            assert_eq!(window_of(&mut a, w, 40, 1, 0), None);
        }
        // Alternating shards: no majority holds two windows.
        let mut a = Affinity::default();
        for w in 0..20 {
            assert_eq!(window_of(&mut a, w, 40, (w % 2) as u8 + 1, 0), None);
        }
    }

    #[test]
    fn the_majority_candidate_survives_minority_noise() {
        let mut a = Affinity::default();
        let mut wanted = None;
        for w in 0..3 {
            for i in 0..60 {
                let shard = if i % 4 == 3 { 2 } else { 1 };
                wanted = wanted.or(a.note(RoundTrip::With(shard), w * WINDOW_MS));
            }
        }
        assert_eq!(wanted, Some(1));
    }

    /// `passes` passes of `per_pass` messages in `window`, each `pass`.
    fn flow_window(
        f: &mut Flow,
        window: u64,
        passes: u32,
        per_pass: u32,
        pass: FlowPass,
    ) -> Option<u8> {
        let mut wanted = None;
        for _ in 0..passes {
            wanted = wanted.or(f.note(pass, per_pass, window * WINDOW_MS));
        }
        wanted
    }

    #[test]
    fn a_stream_to_one_shard_for_two_windows_asks_for_a_move() {
        let mut f = Flow::default();
        assert_eq!(flow_window(&mut f, 5, 40, 500, FlowPass::Only(1)), None);
        assert_eq!(flow_window(&mut f, 6, 40, 500, FlowPass::Only(1)), None);
        assert_eq!(f.note(FlowPass::Only(1), 500, 7 * WINDOW_MS), Some(1));
        // Minority traffic elsewhere does not stop it.
        let mut f = Flow::default();
        for w in 0..2 {
            flow_window(&mut f, w, 30, 500, FlowPass::Only(2));
            flow_window(&mut f, w, 5, 500, FlowPass::Spread);
        }
        assert_eq!(f.note(FlowPass::Spread, 1, 2 * WINDOW_MS), Some(2));
    }

    #[test]
    fn slow_spread_alternating_or_interrupted_streams_never_ask() {
        // 9 999 messages a window: under the rate.
        let mut f = Flow::default();
        for w in 0..20 {
            assert_eq!(flow_window(&mut f, w, 9, 1111, FlowPass::Only(1)), None);
        }
        // Half of it delivered here or to several shards (fan-out).
        let mut f = Flow::default();
        for w in 0..20 {
            assert_eq!(flow_window(&mut f, w, 20, 500, FlowPass::Only(1)), None);
            assert_eq!(flow_window(&mut f, w, 20, 500, FlowPass::Spread), None);
        }
        // A different shard each window.
        let mut f = Flow::default();
        for w in 0..20 {
            assert_eq!(
                flow_window(&mut f, w, 40, 500, FlowPass::Only((w % 2) as u8 + 1)),
                None
            );
        }
        // Idle windows in between.
        let mut f = Flow::default();
        for w in [0, 2, 4, 6, 8] {
            assert_eq!(flow_window(&mut f, w, 40, 500, FlowPass::Only(1)), None);
        }
    }

    #[test]
    fn processed_prefix_follows_out_of_order_batches() {
        let mut p = Processed::default();
        assert!(p.covers(0));
        assert!(!p.covers(1));
        p.done(2);
        p.done(3);
        assert!(!p.covers(1));
        p.done(1);
        assert!(p.covers(3));
        assert!(!p.covers(4));
        p.done(5);
        assert!(!p.covers(5));
        p.done(4);
        assert!(p.covers(5));
        assert!(p.ahead.is_empty());
    }
}
