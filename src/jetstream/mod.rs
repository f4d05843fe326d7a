//! JetStream: the API on top of the store. Only the wire types exist so far.

pub mod api;
