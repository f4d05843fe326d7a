//! The two error types: bytes a peer sent that are not a frame
//! ([`DecodeError`], the peer's fault) and a frame this side asked to encode
//! that cannot be ([`EncodeError`], the caller's fault or a short buffer).

use crate::{varint::VarintError, Code, FrameType};

/// Bytes that are not a valid frame. Always the sender's fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodeError {
    /// The frame's type, when its header byte named one.
    pub frame_type: Option<FrameType>,
    /// What was wrong.
    pub kind: DecodeErrorKind,
}

/// What was wrong with the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecodeErrorKind {
    /// Zero bytes: no header.
    Empty,
    /// The header's high nibble is 0, which names no frame type.
    UnknownType,
    /// A flag bit that this type (or this direction) does not define is set,
    /// or a defined flag field holds an undefined value (PUBLISH QoS 2).
    ReservedFlags(u8),
    /// The frame type only travels the other way (e.g. a CONNECT from a
    /// broker, a PING to a device).
    WrongDirection,
    /// The frame ended inside a field.
    Truncated,
    /// Bytes remain after the last field of a frame that has no `rest` field.
    TrailingBytes,
    /// A varint of six bytes or more.
    VarintTooLong,
    /// A varint over `u32::MAX`.
    VarintOverflow,
    /// A varint padded with a trailing zero group.
    VarintNonMinimal,
    /// A field holds a value the format does not allow (a will QoS of 2, an
    /// ERROR `ref_type` over 15).
    InvalidField(&'static str),
    /// A client id or subject over its limit.
    TooLong(&'static str),
    /// A TCP length prefix over [`crate::TCP_FRAME_BYTES_MAX`].
    FrameTooLong,
}

impl DecodeError {
    pub(crate) const fn new(frame_type: Option<FrameType>, kind: DecodeErrorKind) -> DecodeError {
        DecodeError { frame_type, kind }
    }

    pub(crate) const fn varint(frame_type: Option<FrameType>, error: VarintError) -> DecodeError {
        let kind = match error {
            VarintError::Truncated => DecodeErrorKind::Truncated,
            VarintError::TooLong => DecodeErrorKind::VarintTooLong,
            VarintError::Overflow => DecodeErrorKind::VarintOverflow,
            VarintError::NonMinimal => DecodeErrorKind::VarintNonMinimal,
        };
        DecodeError { frame_type, kind }
    }

    /// The code a broker answers with (in an ERROR frame or the matching ack).
    pub const fn code(&self) -> Code {
        match self.kind {
            DecodeErrorKind::TooLong(_) | DecodeErrorKind::FrameTooLong => Code::TooLarge,
            _ => Code::Malformed,
        }
    }
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.frame_type {
            Some(frame_type) => write!(f, "peer sent a malformed {} frame: ", frame_type.name())?,
            None => f.write_str("peer sent a malformed frame: ")?,
        }
        match self.kind {
            DecodeErrorKind::Empty => f.write_str("no header byte"),
            DecodeErrorKind::UnknownType => f.write_str("frame type 0 is not defined"),
            DecodeErrorKind::ReservedFlags(flags) => write!(f, "undefined flags {flags:#06b}"),
            DecodeErrorKind::WrongDirection => f.write_str("this type travels the other way"),
            DecodeErrorKind::Truncated => f.write_str("the frame ends inside a field"),
            DecodeErrorKind::TrailingBytes => f.write_str("bytes after the last field"),
            DecodeErrorKind::VarintTooLong => f.write_str("a varint longer than 5 bytes"),
            DecodeErrorKind::VarintOverflow => f.write_str("a varint over u32::MAX"),
            DecodeErrorKind::VarintNonMinimal => f.write_str("a varint with padding"),
            DecodeErrorKind::InvalidField(field) => write!(f, "invalid {field}"),
            DecodeErrorKind::TooLong(field) => write!(f, "{field} over its limit"),
            DecodeErrorKind::FrameTooLong => f.write_str("length prefix over 65535"),
        }
    }
}

impl core::error::Error for DecodeError {}

/// A frame that cannot be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EncodeError {
    /// The output buffer is shorter than `needed` bytes; nothing useful was
    /// written.
    BufferTooSmall {
        /// The bytes the encoding takes.
        needed: usize,
    },
    /// A field holds a value the wire cannot carry (a QoS 0 publish with a
    /// msg id, a Reply topic in a Deliver, `Code::Other(3)`).
    InvalidField(&'static str),
    /// A client id or subject over its limit.
    TooLong(&'static str),
    /// A frame over the transport's limit (TCP: 65535 bytes).
    FrameTooLong,
}

impl core::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            EncodeError::BufferTooSmall { needed } => {
                write!(f, "output buffer too small: {needed} bytes needed")
            }
            EncodeError::InvalidField(field) => write!(f, "cannot encode this {field}"),
            EncodeError::TooLong(field) => write!(f, "{field} over its limit"),
            EncodeError::FrameTooLong => f.write_str("frame over the transport's limit"),
        }
    }
}

impl core::error::Error for EncodeError {}
