//! The CONNECT-with-auth path under generated input, every CI run: the
//! invariants of `perch::auth::fuzz::connect_with_auth` (nothing happens
//! before authentication, effects stay within the user's permissions, the
//! password is never echoed) over structured CONNECTs (right and wrong
//! credentials, nkey signatures, odd JSON) followed by random ops, and over
//! raw bytes. `fuzz/fuzz_targets/connect_auth.rs` runs the same harness under
//! libFuzzer for long runs (nightly, cargo-fuzz).

use perch::auth::fuzz::{connect_with_auth, nkey_public, nkey_signature, ALICE_PASSWORD};
use proptest::prelude::*;

fn credential() -> impl Strategy<Value = String> {
    let nkey = nkey_public();
    let sig = nkey_signature();
    prop_oneof![
        Just(format!(r#""user":"alice","pass":"{ALICE_PASSWORD}""#)),
        Just(r#""user":"alice","pass":"wrong""#.to_string()),
        Just(format!(r#""user":"alice","pass":"{ALICE_PASSWORD}x""#)),
        Just(format!(r#""user":"Alice","pass":"{ALICE_PASSWORD}""#)),
        Just(format!(r#""nkey":"{nkey}","sig":"{sig}""#)),
        Just(format!(r#""nkey":"{nkey}","sig":"{}""#, &sig[1..])),
        Just(format!(r#""nkey":"{nkey}""#)),
        Just(format!(
            r#""nkey":"{nkey}","sig":"{sig}","user":"alice","pass":"wrong""#
        )),
        Just(format!(r#""user":"{nkey}","pass":"""#)),
        Just(r#""auth_token":"pw""#.to_string()),
        Just(r#""user":null,"pass":null"#.to_string()),
        Just(r#""user":1,"pass":[]"#.to_string()),
        "[ -~]{0,40}",
    ]
}

fn op() -> impl Strategy<Value = String> {
    let subject = prop_oneof![
        Just("a.x".to_string()),
        Just("a.>".to_string()),
        Just("a.*".to_string()),
        Just("n.y".to_string()),
        Just("n.*".to_string()),
        Just(">".to_string()),
        Just("b".to_string()),
        "[a-n.*>]{1,8}",
    ];
    (0..6u8, subject, "[a-z]{0,6}").prop_map(|(kind, subject, word)| match kind {
        0 => format!("PUB {subject} {}\r\n{word}\r\n", word.len()),
        1 => format!("SUB {subject} 1\r\n"),
        2 => format!("SUB {subject} q 2\r\n"),
        3 => format!(
            "HPUB {subject} 12 {}\r\nNATS/1.0\r\n\r\n{word}\r\n",
            12 + word.len()
        ),
        4 => "PING\r\n".to_string(),
        _ => format!("UNSUB 1 {}\r\n", word.len()),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn structured_connects_then_ops(
        before in prop::collection::vec(op(), 0..2),
        verbose in any::<bool>(),
        credential in credential(),
        after in prop::collection::vec(op(), 0..8),
    ) {
        let mut input = before.concat();
        input.push_str(&format!("CONNECT {{\"verbose\":{verbose},{credential}}}\r\n"));
        input.push_str(&after.concat());
        connect_with_auth(input.as_bytes());
    }

    #[test]
    fn raw_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        connect_with_auth(&bytes);
        let mut prefixed = format!("CONNECT {{\"user\":\"alice\",\"pass\":\"{ALICE_PASSWORD}\"}}\r\n").into_bytes();
        prefixed.extend_from_slice(&bytes);
        connect_with_auth(&prefixed);
    }
}
