//! Fuzzes the device credential path: envelopes (random, or a genuine one
//! edited) into a gateway with device keys. The invariants are checked in
//! `perch::lite::fuzzing::device_credential_path`, which a seeded property
//! test also runs on stable Rust (`cargo test --lib lite::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| perch::lite::fuzzing::device_credential_path(data));
