//! [`Frame`] → bytes, and one encoder per frame a device sends. Each first
//! checks the frame against the same rules the decoder enforces, so it either
//! writes a whole frame that decodes back to itself or returns an error (and
//! wrote nothing useful).

use crate::{varint, Code, EncodeError, Frame, FrameType, Qos, TopicRef, Will};
use crate::{CLIENT_ID_BYTES_MAX, SUBJECT_BYTES_MAX};

impl Frame<'_> {
    /// The bytes [`Frame::encode`] writes (for a frame it accepts).
    pub fn encoded_len(&self) -> usize {
        let str_len = |bytes: &[u8]| varint_len_usize(bytes.len()) + bytes.len();
        1 + match *self {
            Frame::Connect {
                keepalive_s,
                client_id,
                will,
                ..
            } => {
                1 + varint::encoded_len(keepalive_s)
                    + str_len(client_id)
                    + will.map_or(0, |will| 1 + str_len(will.subject) + will.payload.len())
            }
            Frame::Connack { .. } => 1 + 4,
            Frame::Publish {
                qos,
                topic,
                msg_id,
                payload,
            } => varint::encoded_len(topic.id()) + msg_id_len(qos, msg_id) + payload.len(),
            Frame::PublishAnonymous {
                client_id,
                topic,
                payload,
            } => str_len(client_id) + varint::encoded_len(topic) + payload.len(),
            Frame::Deliver {
                qos,
                topic,
                reply_handle,
                msg_id,
                payload,
            } => {
                varint::encoded_len(topic.id())
                    + reply_handle.map_or(0, varint::encoded_len)
                    + msg_id_len(qos, msg_id)
                    + payload.len()
            }
            Frame::Puback { msg_id, .. } => varint::encoded_len(msg_id) + 1,
            Frame::Register { id, subject } => varint::encoded_len(id) + subject.len(),
            Frame::Regack { req_id, topic, .. } => {
                varint::encoded_len(req_id) + varint::encoded_len(topic) + 1
            }
            Frame::Subscribe { req_id, filter, .. } | Frame::Unsubscribe { req_id, filter } => {
                varint::encoded_len(req_id) + filter.len()
            }
            Frame::Suback { req_id, .. } | Frame::Unsuback { req_id, .. } => {
                varint::encoded_len(req_id) + 1
            }
            Frame::Ping | Frame::Pong => 0,
            Frame::Disconnect { sleep_s } => sleep_s.map_or(0, varint::encoded_len),
            Frame::Resume { .. } => 4,
            Frame::Error { ref_id, .. } => 1 + 1 + varint::encoded_len(ref_id),
        }
    }

    /// Writes the frame at the start of `out` and returns its length.
    ///
    /// The frames a device sends go through the per-frame functions of this
    /// module ([`connect`], [`publish`], ...), so a device that calls those
    /// directly links no encoder for the broker's frames.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        match *self {
            Frame::Connect {
                version,
                clean_session,
                keepalive_s,
                client_id,
                will,
            } => connect(out, version, clean_session, keepalive_s, client_id, will),
            Frame::Publish {
                qos,
                topic,
                msg_id,
                payload,
            } => publish(out, qos, topic, msg_id, payload),
            Frame::PublishAnonymous {
                client_id,
                topic,
                payload,
            } => publish_anonymous(out, client_id, topic, payload),
            Frame::Puback { msg_id, code } => puback(out, msg_id, code),
            Frame::Register { id, subject } => register(out, id, subject),
            Frame::Regack {
                req_id,
                topic,
                code,
            } => regack(out, req_id, topic, code),
            Frame::Subscribe {
                req_id,
                max_qos,
                filter,
            } => subscribe(out, req_id, max_qos, filter),
            Frame::Unsubscribe { req_id, filter } => unsubscribe(out, req_id, filter),
            Frame::Ping => ping(out),
            Frame::Disconnect { sleep_s } => disconnect(out, sleep_s),
            Frame::Resume { session_token } => resume(out, session_token),
            Frame::Connack {
                session_present,
                code,
                session_token,
            } => {
                check_code(code)?;
                let mut w = Writer::new(out, FrameType::Connack, u8::from(session_present));
                w.u8(code.as_u8());
                w.bytes(&session_token.to_le_bytes());
                w.finish()
            }
            Frame::Deliver {
                qos,
                topic,
                reply_handle,
                msg_id,
                payload,
            } => {
                let predefined = match topic {
                    TopicRef::Registered(_) => 0,
                    TopicRef::Predefined(_) => 0b0100,
                    TopicRef::Reply(_) => {
                        return Err(EncodeError::InvalidField("Reply topic in a Deliver"))
                    }
                };
                check_qos0_without_id(qos, msg_id)?;
                let reply = if reply_handle.is_some() { 0b1000 } else { 0 };
                let flags = qos.as_u8() | predefined | reply;
                let mut w = Writer::new(out, FrameType::Publish, flags);
                w.varint(topic.id());
                if let Some(handle) = reply_handle {
                    w.varint(handle);
                }
                w.msg_id(qos, msg_id);
                w.bytes(payload);
                w.finish()
            }
            Frame::Suback { req_id, code } => id_and_code(out, FrameType::Suback, req_id, code),
            Frame::Unsuback { req_id, code } => id_and_code(out, FrameType::Unsuback, req_id, code),
            Frame::Pong => Writer::new(out, FrameType::Pong, 0).finish(),
            Frame::Error {
                code,
                ref_type,
                ref_id,
            } => {
                check_code(code)?;
                let mut w = Writer::new(out, FrameType::Error, 0);
                w.u8(code.as_u8());
                w.u8(ref_type.map_or(0, |ref_type| ref_type as u8));
                w.varint(ref_id);
                w.finish()
            }
        }
    }
}

// ---- one encoder per frame a device sends ----
//
// Each checks the same rules as `Frame::encode` (which calls it) and writes
// the same bytes; each returns the frame's length, or `BufferTooSmall` with
// the length it needs (after writing what fitted, nothing useful). They are
// `#[inline]` so that a client calling one with constant arguments (no will,
// errors only tested with `.ok()`) keeps just the code it uses; the byte
// writing itself stays out of line in `Writer::put` and `Writer::varint`.

/// CONNECT (`version` is [`crate::PROTOCOL_VERSION`] for this crate's
/// protocol).
#[inline]
pub fn connect(
    out: &mut [u8],
    version: u8,
    clean_session: bool,
    keepalive_s: u32,
    client_id: &[u8],
    will: Option<Will<'_>>,
) -> Result<usize, EncodeError> {
    check_limit(client_id, CLIENT_ID_BYTES_MAX, "client id")?;
    if let Some(will) = will {
        check_limit(will.subject, SUBJECT_BYTES_MAX, "will subject")?;
    }
    let flags = u8::from(clean_session) | (u8::from(will.is_some()) << 1);
    let mut w = Writer::new(out, FrameType::Connect, flags);
    w.u8(version);
    w.varint(keepalive_s);
    w.str(client_id);
    if let Some(will) = will {
        w.u8(will.qos.as_u8());
        w.str(will.subject);
        w.bytes(will.payload);
    }
    w.finish()
}

/// PUBLISH device → broker (session QoS 0 or 1); `msg_id` must be 0 for
/// QoS 0.
#[inline]
pub fn publish(
    out: &mut [u8],
    qos: Qos,
    topic: TopicRef,
    msg_id: u32,
    payload: &[u8],
) -> Result<usize, EncodeError> {
    check_qos0_without_id(qos, msg_id)?;
    let kind = match topic {
        TopicRef::Registered(_) => 0,
        TopicRef::Predefined(_) => 0b0100,
        TopicRef::Reply(_) => 0b1000,
    };
    let mut w = Writer::new(out, FrameType::Publish, qos.as_u8() | kind);
    w.varint(topic.id());
    w.msg_id(qos, msg_id);
    w.bytes(payload);
    w.finish()
}

/// The connectionless PUBLISH (QoS 3) to a predefined topic.
#[inline]
pub fn publish_anonymous(
    out: &mut [u8],
    client_id: &[u8],
    topic: u32,
    payload: &[u8],
) -> Result<usize, EncodeError> {
    check_limit(client_id, CLIENT_ID_BYTES_MAX, "client id")?;
    let mut w = Writer::new(out, FrameType::Publish, 0b0111);
    w.str(client_id);
    w.varint(topic);
    w.bytes(payload);
    w.finish()
}

/// PUBACK (either direction).
#[inline]
pub fn puback(out: &mut [u8], msg_id: u32, code: Code) -> Result<usize, EncodeError> {
    id_and_code(out, FrameType::Puback, msg_id, code)
}

/// REGISTER (either direction): `id` is the request id from a device, the
/// topic from the broker.
#[inline]
pub fn register(out: &mut [u8], id: u32, subject: &[u8]) -> Result<usize, EncodeError> {
    check_limit(subject, SUBJECT_BYTES_MAX, "subject")?;
    id_and_rest(out, FrameType::Register, 0, id, subject)
}

/// REGACK (either direction).
#[inline]
pub fn regack(out: &mut [u8], req_id: u32, topic: u32, code: Code) -> Result<usize, EncodeError> {
    check_code(code)?;
    let mut w = Writer::new(out, FrameType::Regack, 0);
    w.varint(req_id);
    w.varint(topic);
    w.u8(code.as_u8());
    w.finish()
}

/// SUBSCRIBE.
#[inline]
pub fn subscribe(
    out: &mut [u8],
    req_id: u32,
    max_qos: Qos,
    filter: &[u8],
) -> Result<usize, EncodeError> {
    check_limit(filter, SUBJECT_BYTES_MAX, "filter")?;
    id_and_rest(out, FrameType::Subscribe, max_qos.as_u8(), req_id, filter)
}

/// UNSUBSCRIBE.
#[inline]
pub fn unsubscribe(out: &mut [u8], req_id: u32, filter: &[u8]) -> Result<usize, EncodeError> {
    check_limit(filter, SUBJECT_BYTES_MAX, "filter")?;
    id_and_rest(out, FrameType::Unsubscribe, 0, req_id, filter)
}

/// PING.
#[inline]
pub fn ping(out: &mut [u8]) -> Result<usize, EncodeError> {
    Writer::new(out, FrameType::Ping, 0).finish()
}

/// DISCONNECT (either direction); `sleep_s` only from a device.
#[inline]
pub fn disconnect(out: &mut [u8], sleep_s: Option<u32>) -> Result<usize, EncodeError> {
    let mut w = Writer::new(out, FrameType::Disconnect, u8::from(sleep_s.is_some()));
    if let Some(sleep_s) = sleep_s {
        w.varint(sleep_s);
    }
    w.finish()
}

/// RESUME.
#[inline]
pub fn resume(out: &mut [u8], session_token: u32) -> Result<usize, EncodeError> {
    let mut w = Writer::new(out, FrameType::Resume, 0);
    w.bytes(&session_token.to_le_bytes());
    w.finish()
}

/// `varint` then a code: PUBACK, SUBACK, UNSUBACK.
#[inline]
fn id_and_code(
    out: &mut [u8],
    frame_type: FrameType,
    id: u32,
    code: Code,
) -> Result<usize, EncodeError> {
    check_code(code)?;
    let mut w = Writer::new(out, frame_type, 0);
    w.varint(id);
    w.u8(code.as_u8());
    w.finish()
}

/// `varint` then every remaining byte: REGISTER, SUBSCRIBE, UNSUBSCRIBE.
#[inline]
fn id_and_rest(
    out: &mut [u8],
    frame_type: FrameType,
    flags: u8,
    id: u32,
    rest: &[u8],
) -> Result<usize, EncodeError> {
    let mut w = Writer::new(out, frame_type, flags);
    w.varint(id);
    w.bytes(rest);
    w.finish()
}

#[inline]
fn check_limit(bytes: &[u8], bytes_max: usize, field: &'static str) -> Result<(), EncodeError> {
    if bytes.len() > bytes_max {
        Err(EncodeError::TooLong(field))
    } else {
        Ok(())
    }
}

#[inline]
fn check_code(code: Code) -> Result<(), EncodeError> {
    if code.is_canonical() {
        Ok(())
    } else {
        Err(EncodeError::InvalidField("code: Other holds a named value"))
    }
}

#[inline]
fn check_qos0_without_id(qos: Qos, msg_id: u32) -> Result<(), EncodeError> {
    if qos == Qos::AtMostOnce && msg_id != 0 {
        Err(EncodeError::InvalidField("msg_id on a QoS 0 publish"))
    } else {
        Ok(())
    }
}

fn msg_id_len(qos: Qos, msg_id: u32) -> usize {
    match qos {
        Qos::AtMostOnce => 0,
        Qos::AtLeastOnce => varint::encoded_len(msg_id),
    }
}

/// A `str` length; only called on fields validated to ≤ 255 bytes, so the
/// conversion cannot saturate for an encodable frame.
fn varint_len_usize(len: usize) -> usize {
    varint::encoded_len(u32::try_from(len).unwrap_or(u32::MAX))
}

/// Writes at `at` while it fits and counts on past the end, so a short
/// buffer costs no panic path: `finish` reports the length it needed. Every
/// byte goes through `put`, out of line: a frame is a handful of calls,
/// which keeps each per-frame encoder a few dozen bytes of code.
struct Writer<'o> {
    out: &'o mut [u8],
    at: usize,
}

impl<'o> Writer<'o> {
    fn new(out: &'o mut [u8], frame_type: FrameType, flags: u8) -> Writer<'o> {
        if let Some(header) = out.first_mut() {
            *header = ((frame_type as u8) << 4) | flags;
        }
        Writer { out, at: 1 }
    }

    #[inline(never)]
    fn put(&mut self, bytes: &[u8]) {
        if let Some(room) = self.out.get_mut(self.at..) {
            if let Some(slots) = room.get_mut(..bytes.len()) {
                slots.copy_from_slice(bytes);
            }
        }
        self.at += bytes.len();
    }

    fn u8(&mut self, byte: u8) {
        if let Some(slot) = self.out.get_mut(self.at) {
            *slot = byte;
        }
        self.at += 1;
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.put(bytes);
    }

    #[inline(never)]
    fn varint(&mut self, value: u32) {
        let mut buf = [0u8; varint::BYTES_MAX];
        let mut rest = value;
        let mut len = 0;
        for slot in &mut buf {
            len += 1;
            *slot = (rest & 0x7F) as u8;
            rest >>= 7;
            if rest == 0 {
                break;
            }
            *slot |= 0x80;
        }
        self.put(buf.get(..len).unwrap_or_default());
    }

    /// QoS 1 only.
    fn msg_id(&mut self, qos: Qos, msg_id: u32) {
        if qos == Qos::AtLeastOnce {
            self.varint(msg_id);
        }
    }

    /// A length (validated ≤ 255 by the caller) and the bytes.
    fn str(&mut self, bytes: &[u8]) {
        self.varint(bytes.len() as u32);
        self.bytes(bytes);
    }

    fn finish(self) -> Result<usize, EncodeError> {
        if self.at <= self.out.len() {
            Ok(self.at)
        } else {
            Err(EncodeError::BufferTooSmall { needed: self.at })
        }
    }
}
