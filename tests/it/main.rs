//! The one integration-test binary (one link instead of many): boots real brokers
//! and drives them with real clients.

mod client;
mod differential;
mod limits;
mod shards;
mod store_cli;
mod store_faults;
mod support;
