//! Operator tools that run beside the broker, not in it.

pub mod device;
pub mod doctor;
