//! perch: a thread-per-core message broker for edge gateways that speaks the NATS
//! client protocol. See ARCHITECTURE.md for the map; `main.rs` is the CLI.

pub mod auth;
pub mod config;
pub mod jetstream;
pub mod lite;
pub mod monitor;
pub mod nats;
pub mod router;
pub mod runtime;
pub mod store;
pub mod tls;
pub mod tools;
