//! The NATS client protocol, sans I/O: the parser turns bytes into ops, the
//! encoder turns messages into bytes, and a [`session::Session`] holds one
//! client's protocol state and its outbound queue. Nothing here touches a socket
//! or reads the clock; the runtime drives it.

pub mod connect;
pub mod encode;
pub mod parser;
pub mod session;
pub mod subject;
