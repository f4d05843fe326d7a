//! The device credential path as one function of bytes, for the fuzz target
//! (`fuzz/fuzz_targets/device_credentials.rs`, cargo fuzz on nightly) and a
//! seeded property test that runs on stable in CI (`lite::fuzzing::tests`).
//!
//! Invariants checked, for any input: the gateway never panics; a datagram
//! that does not verify (random bytes, or a genuine envelope with bytes
//! changed, cut or appended) creates no session, moves no state, routes
//! nothing, and is answered with at most its own length; a genuine one still
//! works after all of that.

use std::net::SocketAddr;
use std::sync::Arc;

use perch_wire::protect::{self, DeviceEnvelope};
use perch_wire::Frame;

use super::credentials::Credentials;
use super::gateway::{encode, Action, Gateway, GatewayLimits, Peer};
use super::predefined::Predefined;

const KEY: [u8; 32] = [0x42; 32];

fn gateway() -> Gateway {
    let config: crate::config::DeviceConfig = toml::from_str(&format!(
        "require_key = true\n[[clients]]\nclient = \"f\"\nkey = \"{}\"\n",
        "42".repeat(32)
    ))
    .expect("fuzz config parses");
    let mut g = Gateway::new(
        0,
        1,
        GatewayLimits::default(),
        Arc::new(Predefined::default()),
    );
    g.set_credentials(Arc::new(
        Credentials::new(&config).expect("fuzz config is valid"),
    ));
    g
}

fn genuine(counter: u32, frame: &Frame<'_>) -> Vec<u8> {
    let plain = encode(frame);
    let envelope = DeviceEnvelope {
        client_id: b"f",
        epoch: 1,
        counter,
    };
    let mut out = vec![0u8; protect::device_sealed_len(1, counter, plain.len())];
    let n = protect::seal_from_device(&KEY, &envelope, &plain, &mut out).expect("fits");
    out.truncate(n);
    out
}

/// Runs one fuzz input through the credential path (see the module docs).
pub fn device_credential_path(data: &[u8]) {
    let mut g = gateway();
    let from = Peer::Udp(SocketAddr::from(([192, 0, 2, 1], 9)));
    let connect = genuine(
        1,
        &Frame::Connect {
            version: perch_wire::PROTOCOL_VERSION,
            clean_session: true,
            keepalive_s: 0,
            client_id: b"f",
            will: None,
        },
    );
    // The input as it is, and as edits of a genuine envelope: byte 0 picks
    // the edit, the rest are its operands.
    let mut inputs = vec![data.to_vec()];
    if let Some((&op, rest)) = data.split_first() {
        let mut edited = connect.clone();
        match op % 4 {
            0 => {
                for (i, &x) in rest.iter().enumerate() {
                    let at = i % edited.len();
                    edited[at] ^= x;
                }
            }
            1 => edited.truncate(usize::from(rest.first().copied().unwrap_or(0)) % connect.len()),
            2 => edited.extend_from_slice(rest),
            _ => {
                edited.truncate(1 + rest.len().min(8));
                edited.extend_from_slice(rest);
            }
        }
        inputs.push(edited);
    }
    for bytes in &inputs {
        if *bytes == connect {
            continue;
        }
        let mut out = Vec::new();
        g.handle_datagram(from, bytes, false, 1, &mut out);
        for action in &out {
            match action {
                Action::Send { frame, .. } => assert!(
                    frame.len() <= bytes.len(),
                    "a {}-byte answer to a {}-byte unverified datagram",
                    frame.len(),
                    bytes.len()
                ),
                other => panic!("an unverified datagram caused {other:?}"),
            }
        }
        assert_eq!(
            g.session_count(),
            0,
            "an unverified datagram made a session"
        );
    }
    // The genuine CONNECT still works: nothing above moved its window.
    let mut out = Vec::new();
    g.handle_datagram(from, &connect, false, 2, &mut out);
    assert_eq!(g.session_count(), 1, "the genuine CONNECT was refused");
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]
        /// The fuzz target's invariants on stable Rust (no cargo-fuzz in CI).
        #[test]
        fn device_credential_path_holds(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            super::device_credential_path(&data);
        }
    }
}
