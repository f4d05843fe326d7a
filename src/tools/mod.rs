//! Operator tools that run beside the broker, not in it: `perch device`,
//! `perch doctor`, and the NATS client commands `perch pub|sub|req|bench`.

pub mod device;
pub mod doctor;
pub mod nats;
