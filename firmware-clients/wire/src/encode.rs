//! [`Frame`] → bytes. `encode` first checks the frame against the same rules
//! the decoder enforces and computes its exact length, so it either writes a
//! whole frame that decodes back to itself or writes nothing useful.

use crate::{varint, EncodeError, Frame, Qos, TopicRef};
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
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        self.validate()?;
        let len = self.encoded_len();
        let Some(out) = out.get_mut(..len) else {
            return Err(EncodeError::BufferTooSmall { needed: len });
        };
        let mut writer = Writer { out, at: 0 };
        writer.u8(((self.frame_type() as u8) << 4) | self.flags());
        match *self {
            Frame::Connect {
                version,
                keepalive_s,
                client_id,
                will,
                ..
            } => {
                writer.u8(version);
                writer.varint(keepalive_s);
                writer.str(client_id);
                if let Some(will) = will {
                    writer.u8(will.qos.as_u8());
                    writer.str(will.subject);
                    writer.bytes(will.payload);
                }
            }
            Frame::Connack {
                code,
                session_token,
                ..
            } => {
                writer.u8(code.as_u8());
                writer.bytes(&session_token.to_le_bytes());
            }
            Frame::Publish {
                qos,
                topic,
                msg_id,
                payload,
            } => {
                writer.varint(topic.id());
                if qos == Qos::AtLeastOnce {
                    writer.varint(msg_id);
                }
                writer.bytes(payload);
            }
            Frame::PublishAnonymous {
                client_id,
                topic,
                payload,
            } => {
                writer.str(client_id);
                writer.varint(topic);
                writer.bytes(payload);
            }
            Frame::Deliver {
                qos,
                topic,
                reply_handle,
                msg_id,
                payload,
            } => {
                writer.varint(topic.id());
                if let Some(handle) = reply_handle {
                    writer.varint(handle);
                }
                if qos == Qos::AtLeastOnce {
                    writer.varint(msg_id);
                }
                writer.bytes(payload);
            }
            Frame::Puback { msg_id, code } => {
                writer.varint(msg_id);
                writer.u8(code.as_u8());
            }
            Frame::Register { id, subject } => {
                writer.varint(id);
                writer.bytes(subject);
            }
            Frame::Regack {
                req_id,
                topic,
                code,
            } => {
                writer.varint(req_id);
                writer.varint(topic);
                writer.u8(code.as_u8());
            }
            Frame::Subscribe { req_id, filter, .. } | Frame::Unsubscribe { req_id, filter } => {
                writer.varint(req_id);
                writer.bytes(filter);
            }
            Frame::Suback { req_id, code } | Frame::Unsuback { req_id, code } => {
                writer.varint(req_id);
                writer.u8(code.as_u8());
            }
            Frame::Ping | Frame::Pong => {}
            Frame::Disconnect { sleep_s } => {
                if let Some(sleep_s) = sleep_s {
                    writer.varint(sleep_s);
                }
            }
            Frame::Resume { session_token } => writer.bytes(&session_token.to_le_bytes()),
            Frame::Error {
                code,
                ref_type,
                ref_id,
            } => {
                writer.u8(code.as_u8());
                writer.u8(ref_type.map_or(0, |ref_type| ref_type as u8));
                writer.varint(ref_id);
            }
        }
        assert_eq!(
            writer.at, len,
            "encoded_len disagrees with encode for {self:?}"
        );
        Ok(len)
    }

    /// The header's low nibble.
    fn flags(&self) -> u8 {
        match *self {
            Frame::Connect {
                clean_session,
                will,
                ..
            } => u8::from(clean_session) | (u8::from(will.is_some()) << 1),
            Frame::Connack {
                session_present, ..
            } => u8::from(session_present),
            Frame::Publish { qos, topic, .. } => {
                qos.as_u8()
                    | match topic {
                        TopicRef::Registered(_) => 0,
                        TopicRef::Predefined(_) => 0b0100,
                        TopicRef::Reply(_) => 0b1000,
                    }
            }
            Frame::PublishAnonymous { .. } => 0b0111,
            Frame::Deliver {
                qos,
                topic,
                reply_handle,
                ..
            } => {
                qos.as_u8()
                    | if matches!(topic, TopicRef::Predefined(_)) {
                        0b0100
                    } else {
                        0
                    }
                    | if reply_handle.is_some() { 0b1000 } else { 0 }
            }
            Frame::Subscribe { max_qos, .. } => max_qos.as_u8(),
            Frame::Disconnect { sleep_s } => u8::from(sleep_s.is_some()),
            _ => 0,
        }
    }

    /// The rules the decoder enforces that a Rust value could break.
    fn validate(&self) -> Result<(), EncodeError> {
        let limit = |bytes: &[u8], bytes_max: usize, field| {
            if bytes.len() > bytes_max {
                Err(EncodeError::TooLong(field))
            } else {
                Ok(())
            }
        };
        let code_ok = |code: crate::Code| {
            if code.is_canonical() {
                Ok(())
            } else {
                Err(EncodeError::InvalidField("code: Other holds a named value"))
            }
        };
        let qos0_without_id = |qos, msg_id| {
            if qos == Qos::AtMostOnce && msg_id != 0 {
                Err(EncodeError::InvalidField("msg_id on a QoS 0 publish"))
            } else {
                Ok(())
            }
        };
        match *self {
            Frame::Connect {
                client_id, will, ..
            } => {
                limit(client_id, CLIENT_ID_BYTES_MAX, "client id")?;
                if let Some(will) = will {
                    limit(will.subject, SUBJECT_BYTES_MAX, "will subject")?;
                }
                Ok(())
            }
            Frame::Connack { code, .. }
            | Frame::Puback { code, .. }
            | Frame::Regack { code, .. }
            | Frame::Suback { code, .. }
            | Frame::Unsuback { code, .. }
            | Frame::Error { code, .. } => code_ok(code),
            Frame::Publish { qos, msg_id, .. } => qos0_without_id(qos, msg_id),
            Frame::Deliver {
                qos, topic, msg_id, ..
            } => {
                if matches!(topic, TopicRef::Reply(_)) {
                    return Err(EncodeError::InvalidField("Reply topic in a Deliver"));
                }
                qos0_without_id(qos, msg_id)
            }
            Frame::PublishAnonymous { client_id, .. } => {
                limit(client_id, CLIENT_ID_BYTES_MAX, "client id")
            }
            Frame::Register { subject, .. } => limit(subject, SUBJECT_BYTES_MAX, "subject"),
            Frame::Subscribe { filter, .. } | Frame::Unsubscribe { filter, .. } => {
                limit(filter, SUBJECT_BYTES_MAX, "filter")
            }
            Frame::Ping | Frame::Pong | Frame::Disconnect { .. } | Frame::Resume { .. } => Ok(()),
        }
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

/// Writes into a slice already cut to the frame's exact length: running past
/// it would mean `encoded_len` is wrong, our bug, so slicing may panic.
struct Writer<'o> {
    out: &'o mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn u8(&mut self, byte: u8) {
        self.out[self.at] = byte;
        self.at += 1;
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.out[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }

    fn varint(&mut self, value: u32) {
        let len = varint::encode(value, &mut self.out[self.at..])
            .expect("encoded_len reserved room for every varint");
        self.at += len;
    }

    fn str(&mut self, bytes: &[u8]) {
        let len = u32::try_from(bytes.len()).expect("validated: str fields are at most 255 bytes");
        self.varint(len);
        self.bytes(bytes);
    }
}
