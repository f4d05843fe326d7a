//! A sans-IO client for the perch device protocol (`docs/device-protocol.md`).
//!
//! [`Client`] is a plain value: bytes and time go in through `handle_*`,
//! frames and events come out through `poll_*`. It owns no socket, no clock
//! and no heap, so the same code runs on a Cortex-M over a modem, in a unit
//! test on a virtual clock, and (feature `std`) over `std::net`.
//!
//! ```text
//! client.connect(now_ms);
//! loop {
//!     while let Some(len) = client.poll_transmit(&mut buf) { send(&buf[..len]) }
//!     while let Some(event) = client.poll_event() { /* Connected, Message, ... */ }
//!     wait for a datagram or until client.poll_timeout();
//!     client.handle_input(&datagram, now_ms) / client.handle_timeout(now_ms);
//! }
//! ```
//!
//! Every table has a bound fixed at compile time:
//! `Client<SUBS, INFLIGHT, BUF>` keeps at most `SUBS` subscriptions and
//! `SUBS` topic ids, at most `INFLIGHT` (≤ 16) queued or unacknowledged
//! publishes, and builds and stores frames of at most `BUF` bytes. A QoS 1
//! publish also waits ([`ClientError::InflightFull`]) while its msg id would
//! be 8 or more past the oldest unacknowledged one: the broker de-duplicates
//! over the last 16 ids it accepted, and with that span every id it may
//! accept while one can still be retried lies within 7 of it, so the retry
//! always meets it in the window (so at most 8 QoS 1 are in flight). Memory is about `(2 × SUBS + INFLIGHT + 1) × BUF`.
//! Topic ids are kept for the session and never evicted: a device that
//! publishes to more than `SUBS` subjects gets `TopicTableFull` (use
//! predefined ids for the long tail).
//!
//! Time is an argument of every input; outputs (`poll_transmit`'s retry
//! deadlines) are computed at the latest time an input carried.
//!
//! Retries: every request is retransmitted with the same ids after
//! `retry_interval_ms`, doubling up to 32×, at most `retries_max` times;
//! then the connection counts as lost and the client reconnects (CONNECT
//! without clean_session) after a backoff from `reconnect_backoff_min_ms`
//! doubling to `reconnect_backoff_max_ms`, and resends what was pending.
//! An ERROR UNKNOWN_SESSION (the broker lost track of the address) is
//! answered with RESUME.
//!
//! # QoS 1 across a reboot
//!
//! A PUBACK means the broker has the message (fsynced, when a stream captures
//! the subject). To keep that promise across a reset of the device itself,
//! implement [`Storage`] over flash (or FRAM, or battery-backed RAM) and build
//! the client with [`Client::with_storage`] instead of [`Client::new`]:
//!
//! ```
//! use perch_device::wire::Qos;
//! use perch_device::{Client, Config, Storage, StorageError, Target};
//!
//! /// Stands in for a flash driver: 4 slots (INFLIGHT) of up to 128 bytes (BUF).
//! #[derive(Default)]
//! struct Flash { slots: [Option<([u8; 128], usize)>; 4], counter: Option<u32> }
//!
//! impl Storage for Flash {
//!     fn store(&mut self, slot: usize, record: &[u8]) -> Result<(), StorageError> {
//!         let mut bytes = [0u8; 128];
//!         bytes.get_mut(..record.len()).ok_or(StorageError)?.copy_from_slice(record);
//!         self.slots[slot] = Some((bytes, record.len()));
//!         Ok(())
//!     }
//!     fn remove(&mut self, slot: usize) -> Result<(), StorageError> {
//!         self.slots[slot] = None;
//!         Ok(())
//!     }
//!     fn load(&mut self, slot: usize, buf: &mut [u8]) -> Result<Option<usize>, StorageError> {
//!         let Some((bytes, len)) = &self.slots[slot] else { return Ok(None) };
//!         buf.get_mut(..*len).ok_or(StorageError)?.copy_from_slice(&bytes[..*len]);
//!         Ok(Some(*len))
//!     }
//!     fn store_msg_id_counter(&mut self, next: u32) -> Result<(), StorageError> {
//!         self.counter = Some(next);
//!         Ok(())
//!     }
//!     fn load_msg_id_counter(&mut self) -> Result<Option<u32>, StorageError> {
//!         Ok(self.counter)
//!     }
//! }
//!
//! let config = Config::new(b"node1").unwrap();
//! let mut client: Client<4, 4, 128, Flash> = Client::with_storage(config, Flash::default()).unwrap();
//! client.connect(0);
//! let msg_id = client.publish(Target::Predefined(1), b"21.5", Qos::AtLeastOnce, 0).unwrap();
//!
//! // Power cut before the PUBACK: the next boot builds its client from the flash,
//! // and the publish is sent again with the same msg id once connected.
//! let flash = client.into_storage();
//! let client: Client<4, 4, 128, Flash> =
//!     Client::with_storage(Config::new(b"node1").unwrap(), flash).unwrap();
//! # let _ = (client, msg_id);
//! ```
//!
//! * `publish` with QoS 1 stores the message in slot `s < INFLIGHT` before
//!   it queues it; if the store fails it returns [`ClientError::Storage`]
//!   and queues nothing (a QoS 0 publish never touches the storage).
//! * The record is removed when the publish ends (PUBACK of any code, or a
//!   refused REGISTER). A failed remove is counted in
//!   [`Stats::storage_errors`] and retried by `handle_timeout`.
//! * `with_storage` takes back every record: they are queued in their slots
//!   with their msg ids and sent once a session is up, byte for byte as
//!   before (a subject is registered again). They count toward the msg id
//!   span like any unacknowledged publish, so new QoS 1 publishes may wait
//!   until they are acknowledged. The broker de-duplicates a
//!   retransmission by msg id within its 16-id window, and a stream by
//!   `Nats-Msg-Id: dev.<client>.<msg_id>`, so a message that was routed but
//!   not yet acknowledged before the reset is not routed twice. For the same
//!   reason a client that took anything back connects without
//!   `clean_session`, keeping the broker's window.
//! * The next msg id is kept too, [`storage::MSG_ID_LEASE`] ids ahead (one
//!   counter write per 16 publishes), so new ids after a reset are never ones
//!   the broker's window still holds.
//!
//! The default storage is [`NoStorage`]: nothing is kept and none of this
//! code is linked. The record layout is in the [`storage`] module.
//!
//! What it does not do: discover the broker, keep subscriptions or
//! registrations across a reboot (they are redone: `session_present` tells),
//! send a will, or check subject syntax (the broker answers
//! INVALID_SUBJECT).
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
#[cfg(feature = "std")]
pub mod host;
pub mod storage;

pub use client::{
    Client, ClientError, Config, DeviceKey, DisconnectReason, Event, Stats, Target,
    CONNECT_RETRY_MS_DEFAULT, EPOCH_LEASE,
};
pub use perch_wire as wire;
pub use storage::{NoStorage, Storage, StorageError};
