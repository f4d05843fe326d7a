//! The one-byte result codes shared by every ack and ERROR.

/// A result code (`code u8` on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    /// 0: accepted.
    Ok,
    /// 1: the topic id is neither registered in this session nor predefined.
    UnknownTopic,
    /// 2: the client may not publish or subscribe there.
    NotPermitted,
    /// 3: a frame, payload, client id or subject is over its limit.
    TooLarge,
    /// 4: a bounded queue or the sleep buffer is full; retry later.
    BufferFull,
    /// 5: RESUME (or a frame from an unknown address) names no live session.
    UnknownSession,
    /// 6: the frame could not be decoded.
    Malformed,
    /// 7: CONNECT carried a protocol version the broker does not speak.
    UnsupportedVersion,
    /// 8: the subject or filter is not a valid NATS subject.
    InvalidSubject,
    /// 9: a per-session table (topics, subscriptions, in-flight) is full.
    NoResources,
    /// 10: a stream captured the message but the store could not persist it.
    StoreFailed,
    /// 11 and above: reserved; kept so that a newer peer's code survives.
    /// Holds only values ≥ 11 ([`Code::from_u8`] never builds a smaller one).
    Other(u8),
}

impl Code {
    /// The code for a wire byte.
    pub const fn from_u8(value: u8) -> Code {
        match value {
            0 => Code::Ok,
            1 => Code::UnknownTopic,
            2 => Code::NotPermitted,
            3 => Code::TooLarge,
            4 => Code::BufferFull,
            5 => Code::UnknownSession,
            6 => Code::Malformed,
            7 => Code::UnsupportedVersion,
            8 => Code::InvalidSubject,
            9 => Code::NoResources,
            10 => Code::StoreFailed,
            other => Code::Other(other),
        }
    }

    /// The wire byte.
    pub const fn as_u8(self) -> u8 {
        match self {
            Code::Ok => 0,
            Code::UnknownTopic => 1,
            Code::NotPermitted => 2,
            Code::TooLarge => 3,
            Code::BufferFull => 4,
            Code::UnknownSession => 5,
            Code::Malformed => 6,
            Code::UnsupportedVersion => 7,
            Code::InvalidSubject => 8,
            Code::NoResources => 9,
            Code::StoreFailed => 10,
            Code::Other(value) => value,
        }
    }

    /// The upper-case name the specification uses ("RESERVED" for `Other`).
    pub const fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::UnknownTopic => "UNKNOWN_TOPIC",
            Code::NotPermitted => "NOT_PERMITTED",
            Code::TooLarge => "TOO_LARGE",
            Code::BufferFull => "BUFFER_FULL",
            Code::UnknownSession => "UNKNOWN_SESSION",
            Code::Malformed => "MALFORMED",
            Code::UnsupportedVersion => "UNSUPPORTED_VERSION",
            Code::InvalidSubject => "INVALID_SUBJECT",
            Code::NoResources => "NO_RESOURCES",
            Code::StoreFailed => "STORE_FAILED",
            Code::Other(_) => "RESERVED",
        }
    }

    /// `Other` holding a value that has a name would not survive a round trip.
    pub(crate) const fn is_canonical(self) -> bool {
        !matches!(self, Code::Other(value) if value <= 10)
    }
}

impl core::fmt::Display for Code {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Code::Other(value) => write!(f, "RESERVED({value})"),
            named => f.write_str(named.name()),
        }
    }
}
