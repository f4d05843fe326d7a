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
//! `SUBS` topic ids, at most `INFLIGHT` (≤ 16, the broker's de-duplication
//! window) queued or unacknowledged publishes, and builds and stores frames
//! of at most `BUF` bytes. Memory is about `(2 × SUBS + INFLIGHT + 1) × BUF`.
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
//! What it does not do: discover the broker, persist QoS 1 state across a
//! reboot (the application may resend), send a will, or check subject
//! syntax (the broker answers INVALID_SUBJECT).
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
#[cfg(feature = "std")]
pub mod host;

pub use client::{
    Client, ClientError, Config, DisconnectReason, Event, Stats, Target, CONNECT_RETRY_MS_DEFAULT,
};
pub use perch_wire as wire;
