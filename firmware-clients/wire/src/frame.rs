//! The frame types as Rust values. Layout lives in `decode.rs` and
//! `encode.rs`; this file only says what each frame means.

use crate::Code;

/// The high nibble of a frame's header byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// 0x1, device → broker: open or take over a session.
    Connect = 0x1,
    /// 0x2, broker → device: the answer to CONNECT.
    Connack = 0x2,
    /// 0x3, both ways: a message.
    Publish = 0x3,
    /// 0x4, both ways: acknowledges a QoS 1 PUBLISH.
    Puback = 0x4,
    /// 0x5, both ways: binds a subject to a topic id.
    Register = 0x5,
    /// 0x6, both ways: the answer to REGISTER.
    Regack = 0x6,
    /// 0x7, device → broker.
    Subscribe = 0x7,
    /// 0x8, broker → device.
    Suback = 0x8,
    /// 0x9, device → broker.
    Unsubscribe = 0x9,
    /// 0xA, broker → device.
    Unsuback = 0xA,
    /// 0xB, device → broker: keepalive, and wakes a sleeping session.
    Ping = 0xB,
    /// 0xC, broker → device.
    Pong = 0xC,
    /// 0xD, both ways: ends a session, or puts it to sleep.
    Disconnect = 0xD,
    /// 0xE, device → broker: the same session from a new source address.
    Resume = 0xE,
    /// 0xF, broker → device: a frame was refused.
    Error = 0xF,
}

impl FrameType {
    /// The type for a header's high nibble; `None` for 0 and values over 15.
    pub const fn from_u8(value: u8) -> Option<FrameType> {
        Some(match value {
            0x1 => FrameType::Connect,
            0x2 => FrameType::Connack,
            0x3 => FrameType::Publish,
            0x4 => FrameType::Puback,
            0x5 => FrameType::Register,
            0x6 => FrameType::Regack,
            0x7 => FrameType::Subscribe,
            0x8 => FrameType::Suback,
            0x9 => FrameType::Unsubscribe,
            0xA => FrameType::Unsuback,
            0xB => FrameType::Ping,
            0xC => FrameType::Pong,
            0xD => FrameType::Disconnect,
            0xE => FrameType::Resume,
            0xF => FrameType::Error,
            _ => return None,
        })
    }

    /// The upper-case name the specification uses.
    pub const fn name(self) -> &'static str {
        match self {
            FrameType::Connect => "CONNECT",
            FrameType::Connack => "CONNACK",
            FrameType::Publish => "PUBLISH",
            FrameType::Puback => "PUBACK",
            FrameType::Register => "REGISTER",
            FrameType::Regack => "REGACK",
            FrameType::Subscribe => "SUBSCRIBE",
            FrameType::Suback => "SUBACK",
            FrameType::Unsubscribe => "UNSUBSCRIBE",
            FrameType::Unsuback => "UNSUBACK",
            FrameType::Ping => "PING",
            FrameType::Pong => "PONG",
            FrameType::Disconnect => "DISCONNECT",
            FrameType::Resume => "RESUME",
            FrameType::Error => "ERROR",
        }
    }
}

/// Delivery guarantee of a session PUBLISH. (The connectionless QoS 3 is its
/// own frame, [`Frame::PublishAnonymous`].)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Qos {
    /// 0: fire and forget; no msg id on the wire.
    AtMostOnce = 0,
    /// 1: retried with the same msg id until PUBACK; the receiver de-duplicates.
    AtLeastOnce = 1,
}

impl Qos {
    /// The wire value (0 or 1).
    pub const fn as_u8(self) -> u8 {
        self as u8
    }
}

/// What the `topic` varint of a PUBLISH names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TopicRef {
    /// An id registered in this session (by either side's REGISTER).
    Registered(u32),
    /// An id from the broker's predefined table (flag b2).
    Predefined(u32),
    /// A reply handle the broker gave with a delivered request (flag b3,
    /// device → broker only).
    Reply(u32),
}

impl TopicRef {
    /// The number carried on the wire.
    pub const fn id(self) -> u32 {
        match self {
            TopicRef::Registered(id) | TopicRef::Predefined(id) | TopicRef::Reply(id) => id,
        }
    }
}

/// The last-will message of a CONNECT, published by the broker when the
/// session ends without a DISCONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Will<'a> {
    /// The will's QoS (0 or 1).
    pub qos: Qos,
    /// A NATS subject, at most [`crate::SUBJECT_BYTES_MAX`] bytes.
    pub subject: &'a [u8],
    /// Every byte after the subject.
    pub payload: &'a [u8],
}

/// One frame of the device protocol, borrowing from the bytes it was decoded
/// from (or that the caller will encode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Frame<'a> {
    /// Device → broker: open a session.
    Connect {
        /// The protocol version; the broker refuses anything but
        /// [`crate::PROTOCOL_VERSION`] (the wire layer does not).
        version: u8,
        /// Discard any previous session of this client id (flag b0).
        clean_session: bool,
        /// The broker closes a session silent for 1.5 × this; 0 = never.
        keepalive_s: u32,
        /// At most [`crate::CLIENT_ID_BYTES_MAX`] bytes.
        client_id: &'a [u8],
        /// Present when flag b1 is set.
        will: Option<Will<'a>>,
    },
    /// Broker → device: the answer to CONNECT (or to RESUME).
    Connack {
        /// The broker kept this client's previous session (flag b0).
        session_present: bool,
        /// OK, or why the session was refused.
        code: Code,
        /// The token a later RESUME presents; 0 when refused.
        session_token: u32,
    },
    /// Device → broker: a message on a registered or predefined topic, or a
    /// reply to a request.
    Publish {
        /// QoS 0 or 1.
        qos: Qos,
        /// Registered (no flag), Predefined (b2) or Reply (b3).
        topic: TopicRef,
        /// The retry/de-duplication id for QoS 1; must be 0 for QoS 0, where
        /// it is not on the wire.
        msg_id: u32,
        /// Every remaining byte.
        payload: &'a [u8],
    },
    /// Device → broker: a QoS 3 publish that needs no session, to a
    /// predefined topic whose `{client}` template uses `client_id`.
    PublishAnonymous {
        /// At most [`crate::CLIENT_ID_BYTES_MAX`] bytes.
        client_id: &'a [u8],
        /// A predefined topic id (flag b2 is always set on the wire).
        topic: u32,
        /// Every remaining byte.
        payload: &'a [u8],
    },
    /// Broker → device: a message for one of the device's subscriptions.
    Deliver {
        /// QoS 0 or 1 (the lower of the subscription's max and the message's).
        qos: Qos,
        /// Registered or Predefined; never Reply.
        topic: TopicRef,
        /// Present (flag b3) when the message is a request: the device answers
        /// with `Publish { topic: TopicRef::Reply(handle), .. }`.
        reply_handle: Option<u32>,
        /// The id the device acknowledges for QoS 1; must be 0 for QoS 0.
        msg_id: u32,
        /// Every remaining byte.
        payload: &'a [u8],
    },
    /// Both ways: acknowledges a QoS 1 PUBLISH (or refuses it, code ≠ OK).
    Puback {
        /// The acknowledged PUBLISH's msg id.
        msg_id: u32,
        /// OK, or why the message was not accepted.
        code: Code,
    },
    /// Both ways: bind `subject` to a topic id. From a device, `id` is a
    /// request id and the broker's REGACK carries the topic; from the broker,
    /// `id` is the topic itself and the device answers REGACK with
    /// `req_id = topic = id`.
    Register {
        /// Request id (device → broker) or topic id (broker → device).
        id: u32,
        /// The subject, every remaining byte, at most
        /// [`crate::SUBJECT_BYTES_MAX`].
        subject: &'a [u8],
    },
    /// Both ways: the answer to REGISTER.
    Regack {
        /// The REGISTER's id.
        req_id: u32,
        /// The topic id now bound (0 when refused).
        topic: u32,
        /// OK, or why not.
        code: Code,
    },
    /// Device → broker: subscribe to a NATS filter (`*` and `>` wildcards).
    Subscribe {
        /// Matches the SUBACK.
        req_id: u32,
        /// The highest QoS the broker may deliver with (flags b0-1).
        max_qos: Qos,
        /// Every remaining byte, at most [`crate::SUBJECT_BYTES_MAX`].
        filter: &'a [u8],
    },
    /// Broker → device: the answer to SUBSCRIBE.
    Suback {
        /// The SUBSCRIBE's request id.
        req_id: u32,
        /// OK, or why not.
        code: Code,
    },
    /// Device → broker: drop a subscription made with the same filter bytes.
    Unsubscribe {
        /// Matches the UNSUBACK.
        req_id: u32,
        /// Every remaining byte, at most [`crate::SUBJECT_BYTES_MAX`].
        filter: &'a [u8],
    },
    /// Broker → device: the answer to UNSUBSCRIBE.
    Unsuback {
        /// The UNSUBSCRIBE's request id.
        req_id: u32,
        /// OK, or why not.
        code: Code,
    },
    /// Device → broker: keepalive; wakes a sleeping session.
    Ping,
    /// Broker → device: the answer to PING, after any buffered messages.
    Pong,
    /// Both ways: end the session, or (device → broker, flag b0) put it to
    /// sleep for `sleep_s` seconds.
    Disconnect {
        /// Present when the device goes to sleep.
        sleep_s: Option<u32>,
    },
    /// Device → broker: continue the session `session_token` from this
    /// (new) source address.
    Resume {
        /// The token from the session's CONNACK.
        session_token: u32,
    },
    /// Broker → device: a frame was refused and there is no specific ack
    /// that could say so.
    Error {
        /// Why.
        code: Code,
        /// The refused frame's type; `None` (0 on the wire) when its header
        /// could not be read.
        ref_type: Option<FrameType>,
        /// The refused frame's msg id, request id or topic; 0 if none.
        ref_id: u32,
    },
}

impl Frame<'_> {
    /// The wire type (the header's high nibble).
    pub const fn frame_type(&self) -> FrameType {
        match self {
            Frame::Connect { .. } => FrameType::Connect,
            Frame::Connack { .. } => FrameType::Connack,
            Frame::Publish { .. } | Frame::PublishAnonymous { .. } | Frame::Deliver { .. } => {
                FrameType::Publish
            }
            Frame::Puback { .. } => FrameType::Puback,
            Frame::Register { .. } => FrameType::Register,
            Frame::Regack { .. } => FrameType::Regack,
            Frame::Subscribe { .. } => FrameType::Subscribe,
            Frame::Suback { .. } => FrameType::Suback,
            Frame::Unsubscribe { .. } => FrameType::Unsubscribe,
            Frame::Unsuback { .. } => FrameType::Unsuback,
            Frame::Ping => FrameType::Ping,
            Frame::Pong => FrameType::Pong,
            Frame::Disconnect { .. } => FrameType::Disconnect,
            Frame::Resume { .. } => FrameType::Resume,
            Frame::Error { .. } => FrameType::Error,
        }
    }
}
