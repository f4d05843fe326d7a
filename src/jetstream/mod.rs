//! JetStream: the API on top of the store: the wire types (`api`), a stream over
//! its log (`stream`, sans IO: publish checks, group commit, limits), a consumer over
//! a stream (`consumer`, sans IO: delivery, acks, pull requests, durable state), and
//! one shard's streams behind the `$JS.API` subjects (`service`, sans IO; the runtime
//! feeds it messages and sends what it returns).

pub mod api;
pub mod consumer;
pub mod service;
pub mod stream;
