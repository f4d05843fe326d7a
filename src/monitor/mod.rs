//! Monitoring, sans IO: nats-server's monitoring JSON (`endpoints`), the
//! query strings that shape it (`query`), the Prometheus text format
//! (`prometheus`) and the lock-free latency histogram the store's sync path
//! feeds (`histogram`). The HTTP server that serves them, and the gathering
//! of data from the shards, live in `runtime/http.rs`.
//!
//! *Nothing in monitor/ touches a socket, a shard or the clock.*

pub mod endpoints;
pub mod histogram;
pub mod prometheus;
pub mod query;
