//! One client connection on a shard: a reader task that parses and acts, and a
//! writer task that drains the session's queued output, one write in flight at a
//! time, coalescing everything queued meanwhile into the next write.
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
use crate::nats::encode;
use crate::nats::parser::{parse_op, Parsed};
use crate::nats::session::{CloseReason, Effect, Message, Session, State};

/// Read buffer of an idle connection: small, because idle devices are the norm.
const READ_BUFFER_BYTES_MIN: usize = 512;
/// A read buffer grows by doubling while reads fill it, up to this (or to the
/// size of a declared frame that is actually arriving).
const READ_BUFFER_BYTES_BURST: usize = 64 * 1024;
/// Write buffers larger than this are released after use rather than kept.
const WRITE_BUFFER_BYTES_KEEP: usize = 64 * 1024;

pub(crate) async fn serve<S: Socket>(
    shard: Rc<Shard>,
    socket: S,
    client_id: u64,
    peer: Option<SocketAddr>,
    reject: bool,
) {
    let socket = Rc::new(socket);
    let session = Session::new(client_id, shard.session_limits);
    session.queue_bytes(&shard.info_line(client_id, peer));
    shard.register(&session, socket.raw_fd());
    if reject {
        tracing::warn!(client_id, "maximum connections exceeded");
        session.fail_and_close(
            Some("maximum connections exceeded"),
            CloseReason::MaxConnections,
        );
    }
    let writer = tokio::task::spawn_local(write_loop(Rc::clone(&socket), Rc::clone(&session)));
    if !reject {
        read_loop(&shard, &*socket, &session).await;
    }
    session.close(CloseReason::ClientClosed);
    let _ = writer.await;

    // Remove the client's interest everywhere. No barrier: nothing waits on it.
    {
        let subs = session.take_subscriptions();
        let mut router = shard.router.borrow_mut();
        for sub in &subs {
            router.unsubscribe(sub);
        }
    }
    shard.broadcast_interest();
    match session.close_reason() {
        Some(CloseReason::SlowConsumer) => {
            tracing::warn!(
                client_id,
                ?peer,
                "slow consumer: closed after exceeding max_pending"
            )
        }
        Some(
            reason @ (CloseReason::ProtocolError
            | CloseReason::StaleConnection
            | CloseReason::ConnectTimeout),
        ) => {
            tracing::info!(client_id, ?peer, ?reason, "client closed")
        }
        reason => tracing::debug!(client_id, ?peer, ?reason, "client closed"),
    }
    // Unregister before the socket drops, so housekeeping never sees a reused fd.
    shard.unregister(session.id);
    drop(socket);
}

async fn write_loop<S: Socket>(socket: Rc<S>, session: Rc<Session>) {
    let mut spare = Vec::new();
    loop {
        session.output_ready().await;
        if let State::Closing { flush } = session.state() {
            if !flush || !session.has_output() {
                break;
            }
        }
        let buf = session.take_output(spare);
        let (result, mut buf) = socket.write_all(buf).await;
        session.written();
        if result.is_err() {
            session.close(CloseReason::ClientClosed);
            break;
        }
        buf.clear();
        if buf.capacity() > WRITE_BUFFER_BYTES_KEEP {
            buf = Vec::new();
        }
        spare = buf;
    }
    io::shutdown(socket.raw_fd());
}

async fn read_loop<S: Socket>(shard: &Rc<Shard>, socket: &S, session: &Rc<Session>) {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_BUFFER_BYTES_MIN);
    // Bytes the frame at the head of `buf` needs before parsing is worth retrying.
    let mut frame_bytes_needed = 0usize;
    let mut outgoing = Outgoing::new();
    loop {
        if buf.len() == buf.capacity() {
            grow(&mut buf, frame_bytes_needed);
        }
        let (result, filled) = socket.read(buf).await;
        buf = filled;
        let read_bytes = match result {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if session.is_closing() {
            return;
        }
        if buf.len() < frame_bytes_needed {
            continue;
        }
        let (consumed, keep_reading) =
            process(shard, session, &buf, &mut frame_bytes_needed, &mut outgoing).await;
        outgoing.flush(&shard.shared.peers).await;
        if !keep_reading {
            return;
        }
        buf.drain(..consumed);
        // Light traffic shrinks the buffer back (halving while reads use little of
        // it), so a device that once sent a burst does not keep a burst-sized buffer.
        if buf.is_empty()
            && buf.capacity() > READ_BUFFER_BYTES_MIN
            && read_bytes < buf.capacity() / 4
        {
            buf = Vec::with_capacity((buf.capacity() / 2).max(READ_BUFFER_BYTES_MIN));
            outgoing.shrink();
        }
    }
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

/// Parses and carries out every complete op in `buf`. Returns the bytes consumed
/// and whether to keep reading.
async fn process(
    shard: &Rc<Shard>,
    session: &Rc<Session>,
    buf: &[u8],
    frame_bytes_needed: &mut usize,
    outgoing: &mut Outgoing,
) -> (usize, bool) {
    let mut pos = 0;
    loop {
        match parse_op(&buf[pos..], &shard.parse_limits) {
            Ok(Parsed::Op(op, used)) => {
                let effect = session.handle_op(op);
                let keep_reading = execute(shard, session, effect, outgoing).await;
                pos += used;
                if !keep_reading {
                    return (pos, false);
                }
            }
            Ok(Parsed::Incomplete { frame_bytes }) => {
                *frame_bytes_needed = frame_bytes.unwrap_or(0);
                return (pos, true);
            }
            Err(e) => {
                session.fail_and_close(e.err_text(), CloseReason::ProtocolError);
                return (pos, false);
            }
        }
    }
}

async fn execute(
    shard: &Rc<Shard>,
    session: &Rc<Session>,
    effect: Effect<'_>,
    outgoing: &mut Outgoing,
) -> bool {
    match effect {
        Effect::None => true,
        Effect::Close => false,
        Effect::Publish(msg) => {
            publish(shard, session, &msg, outgoing).await;
            true
        }
        Effect::Subscribe(sub) => {
            shard.router.borrow_mut().subscribe(sub);
            // Anything this client published before the SUB goes out first.
            outgoing.flush(&shard.shared.peers).await;
            shard.broadcast_interest_and_wait().await;
            session.ok();
            true
        }
        Effect::Unsubscribe(sub) => {
            shard.router.borrow_mut().unsubscribe(&sub);
            shard.broadcast_interest();
            true
        }
    }
}

async fn publish(
    shard: &Rc<Shard>,
    session: &Rc<Session>,
    msg: &Message<'_>,
    outgoing: &mut Outgoing,
) {
    let outcome = shard
        .router
        .borrow_mut()
        .route(msg, Some(session), &mut outgoing.targets);
    if outcome.remote_shards > 0 && outgoing.push_targets(msg, shard.shared.shard_count) {
        outgoing.flush(&shard.shared.peers).await;
    }
    if outcome.delivered_local == 0 && outcome.remote_shards == 0 {
        no_responders(session, msg);
    }
    // Auto-unsubscribes during delivery may have changed interest.
    shard.broadcast_interest();
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
        encode::no_responders(&mut bytes, reply, &sub.sid);
        session.queue_bytes(&bytes);
    }
}
