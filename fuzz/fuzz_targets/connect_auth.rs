//! Fuzzes the CONNECT-with-auth path: bytes from a client that must
//! authenticate (users with a password and with an nkey), through the parser
//! and the session as a connection's reader drives them. The invariants are
//! `perch::auth::fuzz::connect_with_auth`'s (the same harness runs as a
//! property test in every CI run: tests/it/auth_fuzz.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    perch::auth::fuzz::connect_with_auth(data);
});
