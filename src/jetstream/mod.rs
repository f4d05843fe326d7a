//! JetStream: the API on top of the store: the wire types (`api`), a stream over
//! its log (`stream`, sans IO: publish checks, group commit, limits), a consumer over
//! a stream (`consumer`, sans IO: delivery, acks, pull requests, durable state), and
//! one shard's streams behind the `$JS.API` subjects (`service`, sans IO; the runtime
//! feeds it messages and sends what it returns), and the time they all run on
//! (`clock`: never backwards, forward jumps of the wall clock reported).

pub mod api;
pub mod clock;
pub mod consumer;
pub mod service;
pub mod stream;
