//! One client connection on a shard: one task joining a reader that parses and
//! acts and a writer that drains the session's queued output, one write in
//! flight at a time, coalescing everything queued meanwhile into the next write.
//!
//! The reader keeps exactly one read pending and never races it against a timer
//! (an io_uring read that loses a race still eats bytes). Timeouts and slow
//! consumers end a connection by closing the session; the writer or housekeeping
//! then shuts the socket down, which completes the pending read.

use std::net::SocketAddr;
use std::rc::Rc;

use super::io::{self, Socket};
use super::mailbox::Outgoing;
use super::shard::Shard;
use super::tls::TlsSocket;
use crate::config::AffinityMode;
use crate::nats::encode;
use crate::nats::parser::{parse_op, Parsed};
use crate::nats::session::{CloseReason, Effect, Message, Session, State};
use crate::tls::TlsSettings;

/// Read buffer of an idle connection: small, because idle devices are the norm
/// (an io_uring read owns its buffer while it waits, so every idle connection
/// holds one). Typical device messages fit; anything larger grows it.
const READ_BUFFER_BYTES_MIN: usize = 128;
/// A read that fills the idle-sized buffer means a burst is arriving: the
/// buffer jumps to this size, then doubles while reads keep filling it.
const READ_BUFFER_BYTES_BURST_FIRST: usize = 2 * 1024;
/// A read buffer grows by doubling while reads fill it, up to this (or to the
/// size of a declared frame that is actually arriving).
const READ_BUFFER_BYTES_BURST: usize = 64 * 1024;
/// Write buffers larger than this are released after use rather than kept.
const WRITE_BUFFER_BYTES_KEEP: usize = 64 * 1024;

/// A new plain client: its session with INFO queued, registered (slot
/// returned). Done before its task starts, so the task carries neither the
/// peer's address nor the client id (every idle connection's task would).
pub(crate) fn open(
    shard: &Shard,
    fd: std::os::fd::RawFd,
    client_id: u64,
    peer: Option<SocketAddr>,
    reject: bool,
) -> (Rc<Session>, usize) {
    let (session, nonce) = new_session(shard, client_id);
    // With TLS on, a client over the limit is refused here, in plain text
    // before any handshake (its INFO still says tls_required), as nats-server does.
    let tls = if reject { shard.shared.tls() } else { None };
    session.queue_bytes(&shard.info_line(client_id, peer, tls.as_deref(), nonce.text()));
    drop(tls);
    tracing::debug!(client_id, ?peer, "client connected");
    // Nothing of the peer is kept for the closing log line: it is asked of the
    // kernel then (an address would sit in every connection's task).
    let slot = shard.register(&session, fd);
    if reject {
        tracing::warn!(client_id, "maximum connections exceeded");
        session.fail_and_close(
            Some("maximum connections exceeded"),
            CloseReason::MaxConnections,
        );
    } else {
        nonce.refuse_if_missing(&session);
    }
    (session, slot)
}

/// A plain client's connection, opened by [`open`], until it closes or moves.
///
/// An `async` block rather than an `async fn`: an async fn's future keeps its
/// arguments twice (as arguments and as the locals they are moved into),
/// 40 bytes of every connection's task, which is allocated in 128-byte steps.
#[allow(clippy::manual_async_fn)] // deliberately not an async fn: see above
pub(crate) fn serve<S: Socket>(
    shard: Rc<Shard>,
    socket: S,
    session: Rc<Session>,
    slot: usize,
) -> impl std::future::Future<Output = ()> {
    async move {
        let end = run(&shard, &socket, &session).await;
        let peer = super::shard::peer_ip(socket.raw_fd());
        after_run(shard, socket, session, slot, peer, end);
    }
}

/// A connection that moved here from another shard (`runtime/moves.rs`):
/// its writer writes at once; its reader starts at `start`, with the bytes
/// of a frame the old shard had half read.
pub(crate) async fn serve_moved<S: Socket>(
    shard: Rc<Shard>,
    socket: S,
    session: Rc<Session>,
    slot: usize,
    start: Rc<tokio::sync::Notify>,
    read_buffer: Vec<u8>,
    frame_bytes_needed: usize,
) {
    // Reader and writer both wait for the end of the move (a few hundred µs):
    // a task type of its own, so plain connections' tasks do not carry it.
    start.notified().await;
    shard
        .moves
        .resume(session.id, read_buffer, frame_bytes_needed);
    let end = run(&shard, &socket, &session).await;
    let peer = super::shard::peer_ip(socket.raw_fd());
    after_run(shard, socket, session, slot, peer, end);
}

/// After the reader and writer stopped: the connection closes, or moves.
fn after_run<S: Socket>(
    shard: Rc<Shard>,
    socket: S,
    session: Rc<Session>,
    slot: usize,
    peer: Option<std::net::IpAddr>,
    end: ReadEnd,
) {
    if let ReadEnd::Move(departing) = end {
        let Departing {
            id,
            to,
            buf,
            frame_bytes_needed,
        } = *departing;
        if !session.is_closing() {
            match io::duplicate(socket.raw_fd()) {
                Ok(stream) => {
                    // Unregistered before the socket closes, so housekeeping
                    // never shuts down a descriptor number that was reused.
                    let opened_ms = shard.unregister_moved(slot);
                    drop(socket);
                    let departure = super::moves::Departure {
                        id,
                        to,
                        read_buffer: buf,
                        frame_bytes_needed,
                        opened_ms,
                    };
                    super::moves::cut(&shard, session, stream, departure);
                    return;
                }
                Err(e) => {
                    tracing::warn!(client_id = session.id, "cannot move a connection: {e}");
                    session.close(CloseReason::ServerShutdown);
                }
            }
        }
        super::moves::abandon(&shard, id, to);
    }
    // Unregister (in `finish`) after the socket is closed, so housekeeping
    // never shuts down a descriptor number that was reused.
    drop(socket);
    finish(&shard, &session, slot, peer);
}

/// [`serve`] for a client of the TLS listener: a task type of its own, so
/// that rustls' state (~2 KiB) is never part of a plain connection's task
/// (measured: idle plain connections 2.0 -> 4.3 KiB when it was).
pub(crate) async fn serve_tls<S: Socket>(
    shard: Rc<Shard>,
    socket: S,
    client_id: u64,
    peer: Option<SocketAddr>,
    tls: std::sync::Arc<TlsSettings>,
) {
    let (session, nonce) = new_session(&shard, client_id);
    let info = shard.info_line(client_id, peer, Some(&tls), nonce.text());
    nonce.refuse_if_missing(&session);
    tracing::debug!(client_id, ?peer, "TLS client connected");
    let peer = peer.map(|p| p.ip());
    let slot = shard.register(&session, socket.raw_fd());
    // Drops the socket before returning.
    tls_session(&shard, socket, &session, slot, info, &tls).await;
    finish(&shard, &session, slot, peer);
}

/// A new client's session, required to authenticate when `[authorization]`
/// is on, and the nonce its INFO must carry (nkey users sign it).
fn new_session(shard: &Shard, client_id: u64) -> (Rc<Session>, Nonce) {
    let session = Session::new(client_id, shard.session_limits());
    let mut nonce = Nonce::NotNeeded;
    if let Some(auth) = shard.auth() {
        if auth.nonce_required() {
            nonce = match crate::auth::nkey::new_nonce() {
                Some(n) => Nonce::Sent(n),
                None => Nonce::Missing,
            };
        }
        let sent = match nonce {
            Nonce::Sent(n) => Some(n),
            _ => None,
        };
        session.require_auth(auth, sent);
    }
    (session, nonce)
}

/// The nonce of a client's INFO.
enum Nonce {
    NotNeeded,
    Sent([u8; crate::auth::nkey::NONCE_CHARS]),
    /// Needed, but the system's random source failed.
    Missing,
}

impl Nonce {
    fn text(&self) -> Option<&[u8]> {
        match self {
            Nonce::Sent(n) => Some(&n[..]),
            _ => None,
        }
    }

    /// Without a nonce no nkey user could authenticate, and a predictable
    /// one would be worse than none: the client is refused.
    fn refuse_if_missing(&self, session: &Session) {
        if matches!(self, Nonce::Missing) {
            tracing::error!(
                client_id = session.id,
                "no random nonce (the system's random source failed): refused"
            );
            session.fail_and_close(Some("Authorization Violation"), CloseReason::ProtocolError);
        }
    }
}

/// After the socket closed: the client's interest removed everywhere, the
/// close logged, the connection unregistered.
fn finish(shard: &Shard, session: &Session, slot: usize, peer: Option<std::net::IpAddr>) {
    let client_id = session.id;
    shard.moves.affinity.borrow_mut().remove(&client_id);
    // No barrier: nothing waits on it.
    {
        let subs = session.take_subscriptions();
        shard.router.borrow_mut().unsubscribe_dead(&subs);
    }
    shard.broadcast_interest();
    match session.close_reason() {
        Some(CloseReason::SlowConsumer) => {
            shard.note_slow_consumer();
            tracing::warn!(
                client_id,
                ?peer,
                "slow consumer: closed after exceeding max_pending"
            )
        }
        Some(
            reason @ (CloseReason::ProtocolError
            | CloseReason::StaleConnection
            | CloseReason::ConnectTimeout
            | CloseReason::TlsHandshake),
        ) => {
            tracing::info!(client_id, ?peer, ?reason, "client closed")
        }
        reason => tracing::debug!(client_id, ?peer, ?reason, "client closed"),
    }
    shard.unregister(slot);
}

/// A TLS client: INFO in plain text (unless `handshake_first`), the
/// handshake under the shard's timeout, then the session over [`TlsSocket`].
/// Drops the socket before returning.
async fn tls_session<S: Socket>(
    shard: &Rc<Shard>,
    socket: S,
    session: &Rc<Session>,
    slot: usize,
    info: Vec<u8>,
    tls: &TlsSettings,
) {
    let conn = match super::tls::server_connection(&tls.server_config) {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(client_id = session.id, "cannot start TLS: {e}");
            session.close(CloseReason::TlsHandshake);
            return;
        }
    };
    let socket = TlsSocket::new(socket, conn);
    shard.handshake_started(slot, tls.timeout_ms);
    if !tls.handshake_first {
        // nats-server's order: INFO (with tls_required) in plain text, then
        // the client starts the handshake.
        let (result, _) = socket.inner().write_all(info.clone()).await;
        if result.is_err() {
            session.close(CloseReason::ClientClosed);
            return;
        }
    }
    let handshake = Box::pin(socket.handshake()).await;
    shard.handshake_ended(slot);
    if let Err(e) = handshake {
        // As nats-server: nothing more is sent (rustls' alert aside) and the
        // connection closes; the reason is only logged.
        tracing::info!(client_id = session.id, "{e}");
        session.close(CloseReason::TlsHandshake);
        return;
    }
    if tls.map {
        let identities = socket
            .peer_certificate()
            .map(|der: Vec<u8>| crate::tls::identity::certificate_identities(&der))
            .unwrap_or_default();
        session.set_tls_identities(identities);
    }
    if tls.handshake_first {
        session.queue_bytes(&info);
    }
    drop(info);
    // TLS connections never move (rustls' state stays with the socket).
    run(shard, &socket, session).await;
}

/// Why a reader stopped.
enum ReadEnd {
    Closed,
    /// The connection moves (`runtime/moves.rs`).
    Move(Box<Departing>),
}

/// A move admitted for this connection: move `id` to shard `to`; `buf`
/// holds the bytes of an incomplete frame. Boxed, so that it adds nothing to
/// every connection's task.
struct Departing {
    id: u32,
    to: usize,
    buf: Vec<u8>,
    frame_bytes_needed: usize,
}

/// The session over an established byte stream: reader and writer until the
/// connection ends or moves.
async fn run<S: Socket>(shard: &Rc<Shard>, socket: &S, session: &Rc<Session>) -> ReadEnd {
    // Reader and writer run concurrently inside this one task (one allocation per
    // connection instead of two). `join` polls both and never drops either, so no
    // in-flight io_uring operation is abandoned.
    let reader = async {
        // Refused before it began (over max_connections, no nonce): nothing
        // of the client's is read, only the -ERR written.
        let end = if session.is_closing() {
            ReadEnd::Closed
        } else {
            read_loop(shard, socket, session).await
        };
        if matches!(end, ReadEnd::Closed) {
            session.close(CloseReason::ClientClosed);
        }
        end
    };
    tokio::join!(reader, write_loop(socket, session)).0
}

async fn write_loop<S: Socket>(socket: &S, session: &Session) {
    let mut spare = Vec::new();
    loop {
        session.output_ready().await;
        if session.is_detaching() {
            // Moving: the socket stays open for the new shard.
            return;
        }
        if let State::Closing { flush } = session.state() {
            if !flush || !session.has_output() {
                break;
            }
        }
        let buf = session.take_output(spare);
        // Boxed: the write future (~300 B on io_uring) would otherwise be part of
        // every connection's task, idle ones included; one small allocation per
        // write (not per message) is the cheaper side.
        let (result, mut buf) = Box::pin(socket.write_all(buf)).await;
        session.written();
        if result.is_err() {
            session.close(CloseReason::ClientClosed);
            break;
        }
        buf.clear();
        // Keep the buffer while output keeps coming; an idle client keeps none.
        if buf.capacity() > WRITE_BUFFER_BYTES_KEEP || !session.has_output() {
            buf = Vec::new();
        }
        spare = buf;
    }
    io::shutdown(socket.raw_fd());
}

async fn read_loop<S: Socket>(shard: &Rc<Shard>, socket: &S, session: &Rc<Session>) -> ReadEnd {
    // A connection that moved here resumes with the frame it had half read.
    // Bytes the frame at the head of `buf` needs before parsing is worth retrying.
    let (mut buf, mut frame_bytes_needed) = shard
        .moves
        .take_resume(session.id)
        .unwrap_or_else(|| (Vec::with_capacity(READ_BUFFER_BYTES_MIN), 0));
    let mut outgoing = Outgoing::new();
    // A SUB in this pass changed interest that other shards have not confirmed.
    let mut interest_unconfirmed = false;
    let peers = &shard.shared.peers;
    loop {
        if buf.len() == buf.capacity() {
            grow(&mut buf, frame_bytes_needed);
        }
        let spare_bytes = buf.capacity() - buf.len();
        let (result, filled) = socket.read(buf).await;
        buf = filled;
        let read_bytes = match result {
            Ok(0) | Err(_) => return ReadEnd::Closed,
            Ok(n) => n,
        };
        shard.mark_active();
        if session.is_closing() {
            return ReadEnd::Closed;
        }
        // Route with every interest change that has reached this shard.
        shard.apply_arrived_interest();
        if buf.len() < frame_bytes_needed {
            continue;
        }
        // Parsing and routing are synchronous; the reader only awaits for the rare
        // waits `process` reports, each boxed so that its state is not part of
        // every connection's task (idle connections must stay small).
        let mut consumed = 0;
        let step = loop {
            let step = process(
                shard,
                session,
                &buf,
                &mut consumed,
                &mut frame_bytes_needed,
                &mut outgoing,
                &mut interest_unconfirmed,
            );
            match step {
                Step::FlushFull => {
                    if outgoing.try_flush(peers) {
                        Box::pin(outgoing.flush_blocked(peers)).await;
                    }
                }
                Step::PingBarrier => {
                    Box::pin(outgoing.fence(peers)).await;
                    session.pong();
                }
                Step::NeedInput | Step::Stop => break step,
            }
        };
        if outgoing.try_flush(peers) {
            Box::pin(outgoing.flush_blocked(peers)).await;
        }
        if step == Step::Stop {
            return ReadEnd::Closed;
        }
        if std::mem::take(&mut interest_unconfirmed) {
            // The SUB barrier, once per pass however many SUBs it had: their
            // interest went out as each was parsed; once every shard has applied
            // it, the output held since the first of them (+OK, PONG) may go.
            // The reader reads on meanwhile.
            shard.release_when_interest_applied(session);
        }
        buf.drain(..consumed);
        if read_bytes == spare_bytes && buf.capacity() < READ_BUFFER_BYTES_BURST {
            // The read filled all the room there was: more is waiting. Jump to a
            // burst-sized buffer at once (then double), so a device's burst is read
            // in one or two passes, each one cross-shard batch, not in five.
            let target = (buf.capacity() * 2).max(READ_BUFFER_BYTES_BURST_FIRST);
            buf.reserve_exact(target - buf.len());
        } else if buf.is_empty() && buf.capacity() > READ_BUFFER_BYTES_MIN {
            // The read did not fill the buffer (the socket is drained) and every
            // byte was used: the burst is over. Back to the idle size at once, so
            // thousands of devices that each sent one burst keep no burst buffers.
            buf = Vec::with_capacity(READ_BUFFER_BYTES_MIN);
            outgoing.shrink(&shard.batch_pool);
        }
        if S::MOVABLE {
            if let Some((id, to)) = consider_move(shard, session, &mut outgoing) {
                let departing = Box::new(Departing {
                    id,
                    to,
                    buf: std::mem::take(&mut buf),
                    frame_bytes_needed,
                });
                // Everything this client published reaches its subscribers
                // before anything it publishes from the new shard.
                if outgoing.needs_fence() {
                    Box::pin(outgoing.fence(peers)).await;
                }
                outgoing.shrink(&shard.batch_pool);
                if session.is_closing() {
                    super::moves::abandon(shard, departing.id, departing.to);
                    return ReadEnd::Closed;
                }
                session.detach();
                return ReadEnd::Move(departing);
            }
        }
    }
}

/// At the end of a read pass: counts a round trip (a publish in reply to
/// what the client was given) or a publisher's flow (what it published and
/// to which shards), and decides whether the connection moves
/// (`runtime/moves.rs`). Returns the admitted move.
fn consider_move(
    shard: &Shard,
    session: &Rc<Session>,
    outgoing: &mut Outgoing,
) -> Option<(u32, usize)> {
    use super::moves::{FlowPass, RoundTrip, FLOW_PASS_MIN};
    let origin = session.take_origin();
    let mask = std::mem::take(&mut outgoing.pass_mask);
    let published = std::mem::take(&mut outgoing.pass_published);
    let debug_every = shard.shared.debug_move_every;
    let (to, forced) = if debug_every > 0 {
        let passes = shard.debug_passes.get() + 1;
        shard.debug_passes.set(passes);
        if !passes.is_multiple_of(u64::from(debug_every)) {
            return None;
        }
        ((shard.id + 1) % shard.shared.shard_count, true)
    } else {
        let mode = shard.config().affinity;
        if mode == AffinityMode::Off || (published == 0 && origin == crate::router::ORIGIN_NONE) {
            return None;
        }
        let now_ms = crate::nats::session::coarse_now_ms();
        let mut counts = shard.moves.affinity.borrow_mut();
        let mut wanted = None;
        if mode == AffinityMode::Auto
            && origin != crate::router::ORIGIN_NONE
            && mask & (1 << origin) != 0
        {
            let round_trip = if usize::from(origin) == shard.id {
                RoundTrip::Local
            } else {
                RoundTrip::With(origin)
            };
            let affinity = counts.entry(session.id).or_default();
            wanted = affinity.note(round_trip, now_ms);
            if wanted.is_some() {
                affinity.restart();
            }
        }
        if wanted.is_none() && published > 0 {
            let pass = if mask.count_ones() == 1 && mask & (1 << shard.id) == 0 {
                FlowPass::Only(mask.trailing_zeros() as u8)
            } else {
                FlowPass::Spread
            };
            // Only a pass of a batched stream starts a connection's counts:
            // a device's burst or a request never does.
            let affinity = if published >= FLOW_PASS_MIN {
                Some(counts.entry(session.id).or_default())
            } else {
                counts.get_mut(&session.id)
            };
            if let Some(affinity) = affinity {
                wanted = affinity.flow.note(pass, published, now_ms);
                if wanted.is_some() {
                    affinity.flow.restart();
                }
            }
        }
        (usize::from(wanted?), false)
    };
    if !movable_now(session) {
        return None;
    }
    let last_move_ms = shard
        .moves
        .affinity
        .borrow()
        .get(&session.id)
        .map_or(0, |a| a.last_move_ms);
    super::moves::admit(shard, to, last_move_ms, forced).map(|id| (id, to))
}

/// Whether the connection can move now: established, no SUB barrier
/// pending, no queue-group member and no subscription with a max, and its
/// session referenced only by this connection (its task and the shard's
/// table) and its subscriptions.
fn movable_now(session: &Rc<Session>) -> bool {
    if session.state() != State::Established || session.holds() > 0 {
        return false;
    }
    let subs = session.subscriptions();
    let plain = subs
        .iter()
        .all(|s| s.queue().is_none() && s.max_msgs() == 0);
    plain && Rc::strong_count(session) == 2 + subs.len()
}

/// Makes room in a full buffer: doubling (bursts), up to READ_BUFFER_BYTES_BURST
/// or, for a large frame that is arriving, up to its size. The buffer only ever
/// grows when received bytes fill it, so memory follows what arrived, never a
/// size a client merely declared.
fn grow(buf: &mut Vec<u8>, frame_bytes_needed: usize) {
    let limit = READ_BUFFER_BYTES_BURST.max(frame_bytes_needed);
    let target = (buf.capacity() * 2).max(READ_BUFFER_BYTES_MIN).min(limit);
    // A full buffer at the limit can only be the head frame still arriving.
    let target = target.max(buf.len() + READ_BUFFER_BYTES_MIN);
    buf.reserve_exact(target - buf.len());
}

/// Where `process` stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Everything complete in the buffer is done; read more.
    NeedInput,
    /// The connection is closing; stop reading.
    Stop,
    /// A batch to another shard is full: send it before parsing on.
    FlushFull,
    /// A PING after publishing to other shards: answer once they delivered it all.
    PingBarrier,
}

/// Parses and carries out complete ops in `buf` from `*pos` on, advancing `*pos`,
/// until the input runs out, the connection closes, or an op needs the reader
/// to wait (the caller waits, then calls again). Sets `interest_unconfirmed`
/// after a SUB: the caller owes the SUB barrier at the end of the pass.
fn process(
    shard: &Shard,
    session: &Rc<Session>,
    buf: &[u8],
    pos: &mut usize,
    frame_bytes_needed: &mut usize,
    outgoing: &mut Outgoing,
    interest_unconfirmed: &mut bool,
) -> Step {
    loop {
        if session.awaiting_auth()
            && buf
                .get(*pos)
                .is_some_and(|b| !b.eq_ignore_ascii_case(&b'C'))
        {
            // Before CONNECT authenticated the client, an op that cannot be
            // CONNECT is refused at its first byte, as nats-server does: an
            // unauthenticated client never gets a payload (or a declared
            // length) buffered, parsed or routed.
            session.fail_and_close(Some("Authorization Violation"), CloseReason::ProtocolError);
            return Step::Stop;
        }
        match parse_op(&buf[*pos..], &shard.parse_limits()) {
            Ok(Parsed::Op(op, used)) => {
                *pos += used;
                let step = match session.handle_op(op) {
                    Effect::None => None,
                    Effect::Ping if outgoing.needs_fence() => Some(Step::PingBarrier),
                    Effect::Ping => {
                        session.pong();
                        None
                    }
                    Effect::Close => Some(Step::Stop),
                    Effect::Publish(msg) => publish(shard, session, &msg, outgoing),
                    Effect::Subscribe(sub) => {
                        // Parsing goes on (a burst of SUBs costs one barrier, not
                        // one each); what this client is sent from here on waits
                        // until every shard routes to the new subscription.
                        shard.router.borrow_mut().subscribe(sub);
                        shard.note_subscribe();
                        shard.broadcast_interest();
                        if !std::mem::replace(interest_unconfirmed, true) {
                            // One hold per pass, released by the barrier.
                            session.hold_output();
                        }
                        session.ok();
                        None
                    }
                    Effect::Unsubscribe(sub) => {
                        shard.router.borrow_mut().unsubscribe(&sub);
                        shard.broadcast_interest();
                        None
                    }
                };
                if let Some(step) = step {
                    return step;
                }
            }
            Ok(Parsed::Incomplete { frame_bytes }) => {
                *frame_bytes_needed = frame_bytes.unwrap_or(0);
                return Step::NeedInput;
            }
            Err(e) => {
                session.fail_and_close(e.err_text(), CloseReason::ProtocolError);
                return Step::Stop;
            }
        }
    }
}

/// Routes one published message; asks for a flush when a batch filled up.
fn publish(
    shard: &Shard,
    session: &Rc<Session>,
    msg: &Message<'_>,
    outgoing: &mut Outgoing,
) -> Option<Step> {
    let mut targets = shard.route_targets.borrow_mut();
    let outcome = shard
        .router
        .borrow_mut()
        .route(msg, Some(session), &mut targets);
    let full = outcome.remote_shards > 0
        && outgoing.push_targets(
            &mut targets,
            msg,
            shard.shared.shard_count,
            &shard.batch_pool,
            shard.id,
        );
    drop(targets);
    if outcome.delivered_local > 0 {
        outgoing.pass_mask |= 1 << shard.id;
    }
    if outcome.delivered_local > 0 || outcome.remote_shards > 0 {
        outgoing.pass_published = outgoing.pass_published.saturating_add(1);
    }
    if outcome.delivered_local == 0 && outcome.remote_shards == 0 {
        no_responders(session, msg);
    }
    // Auto-unsubscribes during delivery may have changed interest.
    shard.broadcast_interest();
    full.then_some(Step::FlushFull)
}

/// A request nobody received gets the 503 status on the requester's inbox, when
/// the requester asked for it in CONNECT (headers + no_responders).
fn no_responders(session: &Rc<Session>, msg: &Message<'_>) {
    let flags = session.flags();
    let Some(reply) = msg.reply else { return };
    if !(flags.headers && flags.no_responders) || reply.is_empty() {
        return;
    }
    if let Some(sub) = session.subscription_matching(reply) {
        let mut bytes = Vec::with_capacity(64 + reply.len());
        encode::no_responders(&mut bytes, reply, sub.sid());
        session.queue_bytes(&bytes);
    }
}
