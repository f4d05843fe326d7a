//! The store's error type: what went wrong and whose fault it is (the OS, the disk's
//! contents, an earlier failure, or the caller's input). Broken invariants of our own
//! are assertions, never one of these.

use std::io;

use super::record::{EncodeError, RecordError};

/// An error of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The operating system failed an operation on a file: the disk's or the OS's fault.
    #[error("{op} {file}: {source}")]
    Io {
        op: &'static str,
        file: String,
        #[source]
        source: io::Error,
    },
    /// A file holds bytes this store cannot have written and synced. Nothing was
    /// truncated or dropped; an operator must look.
    #[error("corrupt {file}: {corruption}")]
    Corrupt {
        file: String,
        corruption: Corruption,
    },
    /// An earlier write or sync failed, so the log acknowledges nothing more (fail
    /// closed, never a retry that pretends): restart and recover.
    #[error("the log failed earlier and acknowledges nothing more; restart to recover")]
    Failed,
    /// The caller's record is over a limit.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

impl StoreError {
    pub(crate) fn io<'a>(op: &'static str, file: &'a str) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| StoreError::Io {
            op,
            file: file.to_string(),
            source,
        }
    }
}

/// Why a record at some offset is not the one expected there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadRecord {
    /// Its bytes are not a valid record.
    #[error(transparent)]
    Invalid(#[from] RecordError),
    /// A valid record, but not the next sequence number.
    #[error("sequence {found} where {expected} was expected")]
    WrongSeq { expected: u64, found: u64 },
}

/// What is corrupt about a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// A valid record lies after a bad one, so the bad one is damage, not a torn tail.
    #[error("bad record at offset {bad_offset} ({bad}) followed by valid record {valid_seq} at offset {valid_offset}")]
    ValidRecordAfterBad {
        bad_offset: u64,
        bad: BadRecord,
        valid_offset: u64,
        valid_seq: u64,
    },
    /// A record that recovery accepted does not read back valid.
    #[error("record at offset {offset} reads back bad: {bad}")]
    BadRecordOnRead { offset: u64, bad: BadRecord },
    /// A segment that has a successor ends in bad bytes; its records were all synced
    /// before the successor was created, so this is no torn write.
    #[error("bad record at offset {offset} ({bad}) of a segment that has a successor")]
    DamagedSealedSegment { offset: u64, bad: BadRecord },
    /// A segment does not start where the one before it ended.
    #[error("segment starts at sequence {found}, the previous one ends before {expected}")]
    SequenceGap { expected: u64, found: u64 },
    /// The purge floor file is not one this store wrote: it is only ever renamed into
    /// place after its bytes were synced, so it cannot be torn.
    #[error("bad purge floor: {reason}")]
    BadPurgeFloor { reason: &'static str },
    /// An entry of the `deletes` file is bad but a valid entry follows it: entries are
    /// only appended in whole batches at the end, so this is damage, not a torn write.
    #[error("bad deletes entry at offset {bad_offset} ({reason}) followed by a valid entry at offset {valid_offset}")]
    BadDeletes {
        bad_offset: u64,
        reason: &'static str,
        valid_offset: u64,
    },
}
