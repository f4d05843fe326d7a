//! Interest and routing within one shard: a subject trie of local subscriptions,
//! a replicated map of which shards have interest in which patterns, and the
//! decision where each message goes. No I/O, no clock, no cross-thread state.

pub mod index;
pub mod trie;

pub use index::{InterestChange, MoveMark, QueueRef, RemoteTarget, Router, Via, ORIGIN_NONE};
