//! Keeping unacknowledged QoS 1 publishes across a reboot.
//!
//! The firmware implements [`Storage`] over whatever survives a reset
//! (flash, FRAM, EEPROM, battery-backed RAM) and builds the client with
//! [`Client::with_storage`](crate::Client::with_storage). The client then
//! writes every QoS 1 publish to a slot before it is queued, removes it when
//! the broker answers PUBACK (or the publish fails), and keeps a msg id
//! counter there; a client built from the same storage after a reboot sends
//! what was left with the same msg ids.
//!
//! A slot's record is opaque to the storage and at most `BUF` bytes:
//!
//! ```text
//! kind u8 · msg_id varint · target · payload (every remaining byte)
//! kind 1: target = subject str (varint length, bytes)   Target::Subject
//! kind 2: target = topic varint                          Target::Predefined
//! kind 3: target = topic varint                          Target::Registered
//! ```
//!
//! With storage, a QoS 1 `publish` stages its record in `BUF` bytes of
//! stack, and so does `with_storage` while it reads the slots back. A QoS 1
//! publish to a subject must fit its record in `BUF` too: kind, a msg id of
//! up to 5 bytes, the subject with its length, and the payload; one that
//! does not is refused with `TooLarge`.

/// A storage operation failed (a flash write, erase or read error). The
/// firmware keeps the details if it wants them; the client only needs to know
/// that the record is not where it asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StorageError;

impl core::fmt::Display for StorageError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("storage failed")
    }
}

impl core::error::Error for StorageError {}

/// Where unacknowledged QoS 1 publishes wait out a reboot. Slots are
/// numbered `0..INFLIGHT`; each holds at most one record of at most `BUF`
/// bytes. Every call either does what it says or returns an error (a write
/// interrupted by a power cut must leave the old record, the new one, or
/// none, e.g. with a CRC, never a mix).
///
/// Flash wear: one `store` and one `remove` per QoS 1 publish, and one
/// `store_msg_id_counter` per [`MSG_ID_LEASE`] msg ids.
pub trait Storage {
    /// Whether the client uses the storage at all. Only [`NoStorage`] sets it
    /// to `false`, so a client without storage carries none of its code.
    const PERSISTENT: bool = true;

    /// Keeps `record` in `slot`, replacing what was there.
    fn store(&mut self, slot: usize, record: &[u8]) -> Result<(), StorageError>;

    /// Empties `slot` (an empty slot stays empty).
    fn remove(&mut self, slot: usize) -> Result<(), StorageError>;

    /// Copies the record in `slot` into `buf` and returns its length, or
    /// `None` for an empty slot. A record longer than `buf` is an error.
    fn load(&mut self, slot: usize, buf: &mut [u8]) -> Result<Option<usize>, StorageError>;

    /// Keeps the msg id the client will start from after a reboot.
    fn store_msg_id_counter(&mut self, next: u32) -> Result<(), StorageError>;

    /// The value last given to `store_msg_id_counter`, `None` if never.
    fn load_msg_id_counter(&mut self) -> Result<Option<u32>, StorageError>;

    /// Keeps the protection epoch the client will start from after a
    /// reboot (a client with a key: docs/device-protocol.md §9). One write
    /// per [`crate::EPOCH_LEASE`] connects. The default fails, so a keyed
    /// client over a storage that cannot keep it does not connect rather
    /// than risk reusing a nonce.
    fn store_epoch(&mut self, next: u32) -> Result<(), StorageError> {
        let _ = next;
        Err(StorageError)
    }

    /// The value last given to `store_epoch`, `None` if never.
    fn load_epoch(&mut self) -> Result<Option<u32>, StorageError> {
        Ok(None)
    }
}

/// How many msg ids the client hands out per `store_msg_id_counter`: it
/// stores the id this many ahead, and after a reboot starts there, so a new
/// publish never reuses an id the broker may still hold in its
/// de-duplication window (which would be acknowledged and dropped).
pub const MSG_ID_LEASE: u32 = perch_wire::DEDUP_WINDOW_MSG_IDS as u32;

/// The default: nothing is kept, and the client has no storage code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoStorage;

impl Storage for NoStorage {
    const PERSISTENT: bool = false;

    fn store(&mut self, _: usize, _: &[u8]) -> Result<(), StorageError> {
        Ok(())
    }

    fn remove(&mut self, _: usize) -> Result<(), StorageError> {
        Ok(())
    }

    fn load(&mut self, _: usize, _: &mut [u8]) -> Result<Option<usize>, StorageError> {
        Ok(None)
    }

    fn store_msg_id_counter(&mut self, _: u32) -> Result<(), StorageError> {
        Ok(())
    }

    fn load_msg_id_counter(&mut self) -> Result<Option<u32>, StorageError> {
        Ok(None)
    }
}

/// A storage borrowed for the client's life (e.g. a flash driver the
/// firmware also uses for other things).
impl<T: Storage + ?Sized> Storage for &mut T {
    const PERSISTENT: bool = T::PERSISTENT;

    fn store(&mut self, slot: usize, record: &[u8]) -> Result<(), StorageError> {
        (**self).store(slot, record)
    }

    fn remove(&mut self, slot: usize) -> Result<(), StorageError> {
        (**self).remove(slot)
    }

    fn load(&mut self, slot: usize, buf: &mut [u8]) -> Result<Option<usize>, StorageError> {
        (**self).load(slot, buf)
    }

    fn store_msg_id_counter(&mut self, next: u32) -> Result<(), StorageError> {
        (**self).store_msg_id_counter(next)
    }

    fn load_msg_id_counter(&mut self) -> Result<Option<u32>, StorageError> {
        (**self).load_msg_id_counter()
    }
}

pub(crate) const KIND_SUBJECT: u8 = 1;
pub(crate) const KIND_PREDEFINED: u8 = 2;
pub(crate) const KIND_REGISTERED: u8 = 3;

/// A record's target, borrowing from the record.
#[derive(Clone, Copy)]
pub(crate) enum RecordTarget<'a> {
    Subject(&'a [u8]),
    Predefined(u32),
    Registered(u32),
}

/// The bytes a record takes.
pub(crate) fn record_len(target: &RecordTarget<'_>, msg_id: u32, payload: &[u8]) -> usize {
    use perch_wire::varint::encoded_len;
    1 + encoded_len(msg_id)
        + match *target {
            RecordTarget::Subject(subject) => {
                encoded_len(u32::try_from(subject.len()).unwrap_or(u32::MAX)) + subject.len()
            }
            RecordTarget::Predefined(id) | RecordTarget::Registered(id) => encoded_len(id),
        }
        + payload.len()
}

/// Writes a record into `out`; `None` if it does not fit.
pub(crate) fn encode_record(
    target: &RecordTarget<'_>,
    msg_id: u32,
    payload: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    use perch_wire::varint;
    // A subject is a `str`: its length where the others have their id.
    let (kind, value, subject) = match *target {
        RecordTarget::Subject(subject) => {
            (KIND_SUBJECT, u32::try_from(subject.len()).ok()?, subject)
        }
        RecordTarget::Predefined(id) => (KIND_PREDEFINED, id, &[][..]),
        RecordTarget::Registered(id) => (KIND_REGISTERED, id, &[][..]),
    };
    *out.first_mut()? = kind;
    let mut at = 1;
    for value in [msg_id, value] {
        at += varint::encode(value, out.get_mut(at..)?)?;
    }
    for part in [subject, payload] {
        out.get_mut(at..at + part.len())?.copy_from_slice(part);
        at += part.len();
    }
    Some(at)
}

/// Reads a record: msg id, target, payload. `None` for anything malformed
/// (a msg id of 0 included: QoS 1 ids start at 1).
pub(crate) fn decode_record(record: &[u8]) -> Option<(u32, RecordTarget<'_>, &[u8])> {
    use perch_wire::varint;
    let (&kind, rest) = record.split_first()?;
    let (msg_id, len) = varint::decode(rest).ok()?;
    let rest = rest.get(len..)?;
    let (value, len) = varint::decode(rest).ok()?;
    let rest = rest.get(len..)?;
    let (target, payload) = match kind {
        KIND_SUBJECT => {
            let subject = rest.get(..value as usize)?;
            let payload = rest.get(value as usize..)?;
            if subject.is_empty() || subject.len() > perch_wire::SUBJECT_BYTES_MAX {
                return None;
            }
            (RecordTarget::Subject(subject), payload)
        }
        KIND_PREDEFINED => (RecordTarget::Predefined(value), rest),
        KIND_REGISTERED => (RecordTarget::Registered(value), rest),
        _ => return None,
    };
    (msg_id != 0).then_some((msg_id, target, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let mut buf = [0u8; 64];
        let cases = [
            (RecordTarget::Subject(b"sensors.t"), 1, &b"21.5"[..]),
            (RecordTarget::Predefined(7), 300, &b""[..]),
            (RecordTarget::Registered(u32::MAX), u32::MAX, &b"x"[..]),
        ];
        for (target, msg_id, payload) in cases {
            let len = encode_record(&target, msg_id, payload, &mut buf).unwrap();
            assert_eq!(len, record_len(&target, msg_id, payload));
            let (id, back, rest) = decode_record(&buf[..len]).unwrap();
            assert_eq!((id, rest), (msg_id, payload));
            match (target, back) {
                (RecordTarget::Subject(a), RecordTarget::Subject(b)) => assert_eq!(a, b),
                (RecordTarget::Predefined(a), RecordTarget::Predefined(b))
                | (RecordTarget::Registered(a), RecordTarget::Registered(b)) => assert_eq!(a, b),
                _ => panic!("kind changed"),
            }
            assert!(encode_record(&target, msg_id, payload, &mut buf[..len - 1]).is_none());
        }
        let len = encode_record(&RecordTarget::Subject(b"t"), 5, b"ab", &mut buf).unwrap();
        assert_eq!(&buf[..len], b"\x01\x05\x01tab");
        for garbage in [
            &b""[..],
            b"\x01",
            b"\x01\x05",
            b"\x01\x05\x09t",
            b"\x01\x05\x00ab",
            b"\x02\x00\x01",
            b"\x04\x05\x01",
            b"\x02\x80",
        ] {
            assert!(decode_record(garbage).is_none(), "{garbage:02x?}");
        }
    }
}
