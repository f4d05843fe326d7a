//! JetStream: the API on top of the store: the wire types (`api`) and a stream over
//! its log (`stream`, sans IO: publish checks, group commit, limits). Not yet served.

pub mod api;
pub mod stream;
