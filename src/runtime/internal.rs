//! Internal sessions: the broker's own parts (JetStream, the device gateway)
//! subscribe like clients through a NATS [`Session`] of their own, so routing,
//! interest and the SUB barrier treat them like any client. This holds what
//! they share: running an op on such a session and reading its delivered
//! frames back.

use std::rc::Rc;

use super::shard::Shard;
use crate::nats::parser::{parse_op, ParseLimits, Parsed};
use crate::nats::session::{Effect, Session, Subscription};

/// Runs one protocol op (a line without CRLF) on an internal session, as a
/// client's reader would, applying SUB/UNSUB to the shard's router. Returns the
/// subscription a SUB made. The caller broadcasts interest (and waits for the
/// barrier when it must).
pub(crate) fn op(session: &Rc<Session>, shard: &Shard, line: &[u8]) -> Option<Rc<Subscription>> {
    let mut frame = line.to_vec();
    frame.extend_from_slice(b"\r\n");
    let limits = ParseLimits {
        control_line_bytes_max: frame.len() + 1,
        payload_bytes_max: 0,
    };
    let Ok(Parsed::Op(op, _)) = parse_op(&frame, &limits) else {
        panic!("internal op {:?} parses", String::from_utf8_lossy(line));
    };
    match session.handle_op(op) {
        Effect::Subscribe(sub) => {
            shard.router.borrow_mut().subscribe(Rc::clone(&sub));
            Some(sub)
        }
        Effect::Unsubscribe(sub) => {
            shard.router.borrow_mut().unsubscribe(&sub);
            None
        }
        Effect::None => None,
        other => panic!("internal op gave {other:?}"),
    }
}

/// A message delivered to the internal session, borrowed from its output.
pub(crate) struct Delivered<'a> {
    pub subject: &'a [u8],
    pub sid: &'a [u8],
    pub reply: &'a [u8],
    pub headers: &'a [u8],
    pub payload: &'a [u8],
}

/// Parses one `MSG`/`HMSG` frame as `nats::encode` wrote it.
pub(crate) fn next_frame(buf: &[u8]) -> Option<(Delivered<'_>, usize)> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[..line_end]).ok()?;
    let mut fields = line.split(' ');
    let kind = fields.next()?;
    let rest: Vec<&str> = fields.collect();
    let (subject, reply, header_len, total_len) = match (kind, rest.as_slice()) {
        ("MSG", [subject, _sid, len]) => (*subject, "", 0, len.parse().ok()?),
        ("MSG", [subject, _sid, reply, len]) => (*subject, *reply, 0, len.parse().ok()?),
        ("HMSG", [subject, _sid, hlen, len]) => {
            (*subject, "", hlen.parse().ok()?, len.parse().ok()?)
        }
        ("HMSG", [subject, _sid, reply, hlen, len]) => {
            (*subject, *reply, hlen.parse().ok()?, len.parse().ok()?)
        }
        _ => return None,
    };
    let start = line_end + 2;
    let end = start + total_len;
    if buf.len() < end + 2 || header_len > total_len {
        return None;
    }
    // The fields' offsets in the line: kind, subject, sid, then the reply if any.
    let subject_at = kind.len() + 1;
    let reply_at = subject_at + subject.len() + 1 + rest[1].len() + 1;
    let reply_bytes = &buf[reply_at..reply_at + reply.len()];
    Some((
        Delivered {
            subject: &buf[subject_at..subject_at + subject.len()],
            sid: &buf
                [subject_at + subject.len() + 1..subject_at + subject.len() + 1 + rest[1].len()],
            reply: reply_bytes,
            headers: &buf[start..start + header_len],
            payload: &buf[start + header_len..end],
        },
        end + 2,
    ))
}

/// Calls `f` with every frame an internal session was sent (`frames`, from
/// `take_output`); an unreadable frame (a bug of ours) is logged and ends the
/// pass.
pub(crate) fn for_each_frame(shard: usize, frames: &[u8], mut f: impl FnMut(Delivered<'_>)) {
    let mut at = 0;
    while at < frames.len() {
        let Some((msg, used)) = next_frame(&frames[at..]) else {
            tracing::error!(shard, "internal frame unreadable; dropped the rest");
            break;
        };
        at += used;
        f(msg);
    }
}
