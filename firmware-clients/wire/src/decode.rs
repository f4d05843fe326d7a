//! Bytes → [`Frame`]. Every read is bounds-checked through [`Reader`]; no
//! indexing, no arithmetic that can overflow, so no input can panic.

use crate::error::{DecodeError, DecodeErrorKind as Kind};
use crate::{varint, Code, Frame, FrameType, Qos, TopicRef, Will};
use crate::{CLIENT_ID_BYTES_MAX, SUBJECT_BYTES_MAX};

/// Who sent the bytes being decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A device sent them; the broker is decoding.
    Device,
    /// The broker sent them; a device is decoding.
    Broker,
}

/// Decodes one frame sent by a device (what the broker calls).
pub fn decode_from_device(bytes: &[u8]) -> Result<Frame<'_>, DecodeError> {
    decode(bytes, Origin::Device)
}

/// Decodes one frame sent by the broker (what a device calls).
pub fn decode_from_broker(bytes: &[u8]) -> Result<Frame<'_>, DecodeError> {
    decode(bytes, Origin::Broker)
}

/// Decodes exactly one frame: `bytes` is one UDP datagram, one TCP frame
/// without its length prefix, or one deframed serial frame without its CRC.
#[inline]
pub fn decode(bytes: &[u8], origin: Origin) -> Result<Frame<'_>, DecodeError> {
    let Some((&header, body)) = bytes.split_first() else {
        return Err(DecodeError::new(None, Kind::Empty));
    };
    let Some(frame_type) = FrameType::from_u8(header >> 4) else {
        return Err(DecodeError::new(None, Kind::UnknownType));
    };
    let flags = header & 0x0F;
    let fail = |kind| DecodeError::new(Some(frame_type), kind);
    // Exhaustive on purpose: a new type must say which way it travels.
    let allowed = match frame_type {
        FrameType::Connect
        | FrameType::Subscribe
        | FrameType::Unsubscribe
        | FrameType::Ping
        | FrameType::Resume => origin == Origin::Device,
        FrameType::Connack
        | FrameType::Suback
        | FrameType::Unsuback
        | FrameType::Pong
        | FrameType::Error => origin == Origin::Broker,
        FrameType::Publish
        | FrameType::Puback
        | FrameType::Register
        | FrameType::Regack
        | FrameType::Disconnect => true,
    };
    if !allowed {
        return Err(fail(Kind::WrongDirection));
    }
    // The flag bits each type defines; every other bit must be 0.
    let defined_flags: u8 = match (frame_type, origin) {
        (FrameType::Connect, _) => 0b0011,
        (FrameType::Connack, _) => 0b0001,
        (FrameType::Publish, _) => 0b1111,
        (FrameType::Subscribe, _) => 0b0011,
        (FrameType::Disconnect, Origin::Device) => 0b0001,
        _ => 0,
    };
    if flags & !defined_flags != 0 {
        return Err(fail(Kind::ReservedFlags(flags)));
    }
    let mut reader = Reader {
        bytes: body,
        error: Kind::Truncated,
    };
    match decode_body(frame_type, flags, origin, &mut reader) {
        Some(frame) => Ok(frame),
        None => Err(fail(reader.error)),
    }
}

/// The fields after the header. `None` when a read failed; the reader then
/// holds what was wrong (one place builds the error, so a failed read costs
/// a branch, not a copy of the error at every `?`). Inlined into each
/// `decode_from_*`, so each keeps only the frames of its direction.
#[inline(always)]
fn decode_body<'a>(
    frame_type: FrameType,
    flags: u8,
    origin: Origin,
    reader: &mut Reader<'a>,
) -> Option<Frame<'a>> {
    // The guards repeat `decode`'s direction check where the optimiser sees
    // them, so `decode_from_broker` carries no device-frame code and back.
    let from_device = origin == Origin::Device;
    let frame = match frame_type {
        FrameType::Connect if from_device => {
            let version = reader.u8()?;
            let keepalive_s = reader.varint()?;
            let client_id = reader.str("client id", CLIENT_ID_BYTES_MAX)?;
            let will = if flags & 0b10 != 0 {
                let qos = match reader.u8()? {
                    0 => Qos::AtMostOnce,
                    1 => Qos::AtLeastOnce,
                    _ => return reader.fail(Kind::InvalidField("will QoS")),
                };
                let subject = reader.str("will subject", SUBJECT_BYTES_MAX)?;
                Some(Will {
                    qos,
                    subject,
                    payload: reader.rest(),
                })
            } else {
                None
            };
            Frame::Connect {
                version,
                clean_session: flags & 1 != 0,
                keepalive_s,
                client_id,
                will,
            }
        }
        FrameType::Connack if !from_device => Frame::Connack {
            session_present: flags & 1 != 0,
            code: reader.code()?,
            session_token: reader.u32le()?,
        },
        FrameType::Publish => decode_publish(flags, reader, origin)?,
        FrameType::Puback => Frame::Puback {
            msg_id: reader.varint()?,
            code: reader.code()?,
        },
        FrameType::Register => Frame::Register {
            id: reader.varint()?,
            subject: reader.rest_limited("subject", SUBJECT_BYTES_MAX)?,
        },
        FrameType::Regack => Frame::Regack {
            req_id: reader.varint()?,
            topic: reader.varint()?,
            code: reader.code()?,
        },
        FrameType::Subscribe if from_device => {
            let max_qos = match flags & 0b11 {
                0 => Qos::AtMostOnce,
                1 => Qos::AtLeastOnce,
                _ => return reader.fail(Kind::ReservedFlags(flags)),
            };
            Frame::Subscribe {
                req_id: reader.varint()?,
                max_qos,
                filter: reader.rest_limited("filter", SUBJECT_BYTES_MAX)?,
            }
        }
        FrameType::Suback if !from_device => Frame::Suback {
            req_id: reader.varint()?,
            code: reader.code()?,
        },
        FrameType::Unsubscribe if from_device => Frame::Unsubscribe {
            req_id: reader.varint()?,
            filter: reader.rest_limited("filter", SUBJECT_BYTES_MAX)?,
        },
        FrameType::Unsuback if !from_device => Frame::Unsuback {
            req_id: reader.varint()?,
            code: reader.code()?,
        },
        FrameType::Ping if from_device => Frame::Ping,
        FrameType::Pong if !from_device => Frame::Pong,
        FrameType::Disconnect => Frame::Disconnect {
            sleep_s: if flags & 1 != 0 {
                Some(reader.varint()?)
            } else {
                None
            },
        },
        FrameType::Resume if from_device => Frame::Resume {
            session_token: reader.u32le()?,
        },
        FrameType::Error if !from_device => {
            let code = reader.code()?;
            let ref_type = match reader.u8()? {
                0 => None,
                value => match FrameType::from_u8(value) {
                    Some(ref_type) => Some(ref_type),
                    None => return reader.fail(Kind::InvalidField("ref_type")),
                },
            };
            Frame::Error {
                code,
                ref_type,
                ref_id: reader.varint()?,
            }
        }
        // Refused by `decode` before the body is read.
        FrameType::Connect
        | FrameType::Subscribe
        | FrameType::Unsubscribe
        | FrameType::Ping
        | FrameType::Resume
        | FrameType::Connack
        | FrameType::Suback
        | FrameType::Unsuback
        | FrameType::Pong
        | FrameType::Error => return reader.fail(Kind::WrongDirection),
    };
    reader.finish()?;
    Some(frame)
}

/// PUBLISH flags: b0-1 QoS (0, 1, 3), b2 predefined, b3 reply.
#[inline(always)]
fn decode_publish<'a>(flags: u8, reader: &mut Reader<'a>, origin: Origin) -> Option<Frame<'a>> {
    let predefined = flags & 0b0100 != 0;
    let reply = flags & 0b1000 != 0;
    let qos = match (flags & 0b11, origin) {
        (0, _) => Qos::AtMostOnce,
        (1, _) => Qos::AtLeastOnce,
        (3, Origin::Device) => {
            // Connectionless: predefined topics only, and no reply handle.
            if !predefined || reply {
                return reader.fail(Kind::ReservedFlags(flags));
            }
            let client_id = reader.str("client id", CLIENT_ID_BYTES_MAX)?;
            let topic = reader.varint()?;
            return Some(Frame::PublishAnonymous {
                client_id,
                topic,
                payload: reader.rest(),
            });
        }
        _ => return reader.fail(Kind::ReservedFlags(flags)),
    };
    match origin {
        Origin::Device => {
            let id = reader.varint()?;
            let topic = match (predefined, reply) {
                (false, false) => TopicRef::Registered(id),
                (true, false) => TopicRef::Predefined(id),
                (false, true) => TopicRef::Reply(id),
                (true, true) => return reader.fail(Kind::ReservedFlags(flags)),
            };
            let msg_id = if qos == Qos::AtLeastOnce {
                reader.varint()?
            } else {
                0
            };
            Some(Frame::Publish {
                qos,
                topic,
                msg_id,
                payload: reader.rest(),
            })
        }
        Origin::Broker => {
            let id = reader.varint()?;
            let topic = if predefined {
                TopicRef::Predefined(id)
            } else {
                TopicRef::Registered(id)
            };
            let reply_handle = if reply { Some(reader.varint()?) } else { None };
            let msg_id = if qos == Qos::AtLeastOnce {
                reader.varint()?
            } else {
                0
            };
            Some(Frame::Deliver {
                qos,
                topic,
                reply_handle,
                msg_id,
                payload: reader.rest(),
            })
        }
    }
}

/// A cursor over a frame's body. A read returns `None` when it fails and
/// leaves the reason in `error` (`Truncated` unless it says otherwise).
struct Reader<'a> {
    bytes: &'a [u8],
    error: Kind,
}

impl<'a> Reader<'a> {
    fn fail<T>(&mut self, kind: Kind) -> Option<T> {
        self.error = kind;
        None
    }

    fn u8(&mut self) -> Option<u8> {
        let (&byte, rest) = self.bytes.split_first()?;
        self.bytes = rest;
        Some(byte)
    }

    fn code(&mut self) -> Option<Code> {
        self.u8().map(Code::from_u8)
    }

    fn u32le(&mut self) -> Option<u32> {
        let (bytes, rest) = self.bytes.split_first_chunk::<4>()?;
        self.bytes = rest;
        Some(u32::from_le_bytes(*bytes))
    }

    fn varint(&mut self) -> Option<u32> {
        match varint::decode(self.bytes) {
            Ok((value, len)) => {
                self.bytes = self.bytes.get(len..).unwrap_or_default();
                Some(value)
            }
            Err(error) => self.fail(DecodeError::varint(None, error).kind),
        }
    }

    /// `str`: a varint length, then that many bytes.
    fn str(&mut self, field: &'static str, bytes_max: usize) -> Option<&'a [u8]> {
        let len = self.varint()? as usize;
        if len > bytes_max {
            return self.fail(Kind::TooLong(field));
        }
        let value = self.bytes.get(..len)?;
        self.bytes = self.bytes.get(len..).unwrap_or_default();
        Some(value)
    }

    fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.bytes)
    }

    fn rest_limited(&mut self, field: &'static str, bytes_max: usize) -> Option<&'a [u8]> {
        if self.bytes.len() > bytes_max {
            return self.fail(Kind::TooLong(field));
        }
        Some(self.rest())
    }

    fn finish(&mut self) -> Option<()> {
        if self.bytes.is_empty() {
            Some(())
        } else {
            self.fail(Kind::TrailingBytes)
        }
    }
}
