//! The durable store engine: stream logs of CRC-32C-framed records in preallocated
//! segment files, group-committed (by default one write and one fdatasync per batch
//! before any ack; `durability` names the unsynced modes), recovered at open (a torn
//! tail is truncated, a valid record after a bad one is corruption and reported). See
//! docs/store-format.md for the bytes on disk.
//!
//! Layers, deeper = lower: `log` (a directory of segments, its durable purge `floor`
//! and its durable `deletes` in the middle) → `segment` (one file, recovery, sparse
//! index) → `record` (the framing) → `file` (the storage trait, real and simulated).
//! Nothing here touches a socket, a thread or the clock, and nothing knows about NATS
//! or JetStream.
//!
//! Beside them: `streams` (where each stream's log lives in a store directory and
//! which names are allowed), and the read-only operator commands over a store,
//! `verify` (`perch store verify`) and `dump` (`perch store dump`).

pub mod deletes;
pub mod dump;
pub mod durability;
pub mod error;
pub mod file;
pub mod floor;
pub mod log;
pub mod record;
pub mod segment;
pub mod streams;
pub mod verify;

#[cfg(test)]
pub(crate) mod crash_tests;

pub use deletes::RunSet;
pub use durability::Durability;
pub use error::{BadRecord, Corruption, StoreError};
pub use file::{Directory, OsDirectory, SimDirectory, StorageFile};
pub use log::{Cursor, Log, LogConfig, NewRecord, SyncTicket};
