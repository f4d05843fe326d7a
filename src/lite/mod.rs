//! The compact device protocol's broker side (docs/device-protocol.md), sans
//! I/O: device sessions and the per-shard gateway that turns frames into
//! routing actions. The wire types come from the `perch-wire` crate the
//! firmware clients use too, so the two sides cannot disagree.
//! *Nothing in lite/ touches a socket or reads the clock.*

pub mod credentials;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod predefined;
pub mod session;
