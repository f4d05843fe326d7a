//! JetStream: the API on top of the store: the wire types (`api`), a stream over
//! its log (`stream`, sans IO: publish checks, group commit, limits), and one
//! shard's streams behind the `$JS.API` subjects (`service`, sans IO; the runtime
//! feeds it messages and sends what it returns).

pub mod api;
pub mod service;
pub mod stream;
