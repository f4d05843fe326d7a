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
        frame_type,
    };
    let frame = match frame_type {
        FrameType::Connect => {
            let version = reader.u8()?;
            let keepalive_s = reader.varint()?;
            let client_id = reader.str("client id", CLIENT_ID_BYTES_MAX)?;
            let will = if flags & 0b10 != 0 {
                let qos = match reader.u8()? {
                    0 => Qos::AtMostOnce,
                    1 => Qos::AtLeastOnce,
                    _ => return Err(fail(Kind::InvalidField("will QoS"))),
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
        FrameType::Connack => Frame::Connack {
            session_present: flags & 1 != 0,
            code: reader.code()?,
            session_token: reader.u32le()?,
        },
        FrameType::Publish => decode_publish(flags, &mut reader, origin)?,
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
        FrameType::Subscribe => {
            let max_qos = match flags & 0b11 {
                0 => Qos::AtMostOnce,
                1 => Qos::AtLeastOnce,
                _ => return Err(fail(Kind::ReservedFlags(flags))),
            };
            Frame::Subscribe {
                req_id: reader.varint()?,
                max_qos,
                filter: reader.rest_limited("filter", SUBJECT_BYTES_MAX)?,
            }
        }
        FrameType::Suback => Frame::Suback {
            req_id: reader.varint()?,
            code: reader.code()?,
        },
        FrameType::Unsubscribe => Frame::Unsubscribe {
            req_id: reader.varint()?,
            filter: reader.rest_limited("filter", SUBJECT_BYTES_MAX)?,
        },
        FrameType::Unsuback => Frame::Unsuback {
            req_id: reader.varint()?,
            code: reader.code()?,
        },
        FrameType::Ping => Frame::Ping,
        FrameType::Pong => Frame::Pong,
        FrameType::Disconnect => Frame::Disconnect {
            sleep_s: if flags & 1 != 0 {
                Some(reader.varint()?)
            } else {
                None
            },
        },
        FrameType::Resume => Frame::Resume {
            session_token: reader.u32le()?,
        },
        FrameType::Error => {
            let code = reader.code()?;
            let ref_type = match reader.u8()? {
                0 => None,
                value => match FrameType::from_u8(value) {
                    Some(ref_type) => Some(ref_type),
                    None => return Err(fail(Kind::InvalidField("ref_type"))),
                },
            };
            Frame::Error {
                code,
                ref_type,
                ref_id: reader.varint()?,
            }
        }
    };
    reader.finish()?;
    Ok(frame)
}

/// PUBLISH flags: b0-1 QoS (0, 1, 3), b2 predefined, b3 reply.
fn decode_publish<'a>(
    flags: u8,
    reader: &mut Reader<'a>,
    origin: Origin,
) -> Result<Frame<'a>, DecodeError> {
    let fail = || DecodeError::new(Some(FrameType::Publish), Kind::ReservedFlags(flags));
    let predefined = flags & 0b0100 != 0;
    let reply = flags & 0b1000 != 0;
    let qos = match (flags & 0b11, origin) {
        (0, _) => Qos::AtMostOnce,
        (1, _) => Qos::AtLeastOnce,
        (3, Origin::Device) => {
            // Connectionless: predefined topics only, and no reply handle.
            if !predefined || reply {
                return Err(fail());
            }
            let client_id = reader.str("client id", CLIENT_ID_BYTES_MAX)?;
            let topic = reader.varint()?;
            return Ok(Frame::PublishAnonymous {
                client_id,
                topic,
                payload: reader.rest(),
            });
        }
        _ => return Err(fail()),
    };
    match origin {
        Origin::Device => {
            let id = reader.varint()?;
            let topic = match (predefined, reply) {
                (false, false) => TopicRef::Registered(id),
                (true, false) => TopicRef::Predefined(id),
                (false, true) => TopicRef::Reply(id),
                (true, true) => return Err(fail()),
            };
            let msg_id = if qos == Qos::AtLeastOnce {
                reader.varint()?
            } else {
                0
            };
            Ok(Frame::Publish {
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
            Ok(Frame::Deliver {
                qos,
                topic,
                reply_handle,
                msg_id,
                payload: reader.rest(),
            })
        }
    }
}

/// A cursor over a frame's body. Each read either returns a field or an
/// error that names the frame type.
struct Reader<'a> {
    bytes: &'a [u8],
    frame_type: FrameType,
}

impl<'a> Reader<'a> {
    fn fail(&self, kind: Kind) -> DecodeError {
        DecodeError::new(Some(self.frame_type), kind)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        let Some((&byte, rest)) = self.bytes.split_first() else {
            return Err(self.fail(Kind::Truncated));
        };
        self.bytes = rest;
        Ok(byte)
    }

    fn code(&mut self) -> Result<Code, DecodeError> {
        self.u8().map(Code::from_u8)
    }

    fn u32le(&mut self) -> Result<u32, DecodeError> {
        let Some((bytes, rest)) = self.bytes.split_first_chunk::<4>() else {
            return Err(self.fail(Kind::Truncated));
        };
        self.bytes = rest;
        Ok(u32::from_le_bytes(*bytes))
    }

    fn varint(&mut self) -> Result<u32, DecodeError> {
        let (value, len) = varint::decode(self.bytes)
            .map_err(|error| DecodeError::varint(Some(self.frame_type), error))?;
        self.bytes = self.bytes.get(len..).unwrap_or_default();
        Ok(value)
    }

    /// `str`: a varint length, then that many bytes.
    fn str(&mut self, field: &'static str, bytes_max: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.varint()? as usize;
        if len > bytes_max {
            return Err(self.fail(Kind::TooLong(field)));
        }
        let Some(value) = self.bytes.get(..len) else {
            return Err(self.fail(Kind::Truncated));
        };
        self.bytes = self.bytes.get(len..).unwrap_or_default();
        Ok(value)
    }

    fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.bytes)
    }

    fn rest_limited(
        &mut self,
        field: &'static str,
        bytes_max: usize,
    ) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() > bytes_max {
            return Err(self.fail(Kind::TooLong(field)));
        }
        Ok(self.rest())
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(self.fail(Kind::TrailingBytes))
        }
    }
}
