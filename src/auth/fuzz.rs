//! The CONNECT-with-auth path as a fuzz harness: bytes from a client that
//! must authenticate, parsed and handled as a connection's reader does, with
//! the invariants that must hold whatever the bytes are. Shared by the
//! cargo-fuzz target (`fuzz/fuzz_targets/connect_auth.rs`, for long runs)
//! and the property test in `tests/it/auth_fuzz.rs` (every CI run).

use std::sync::{Arc, OnceLock};

use ring::signature::KeyPair;

use super::{nkey, Auth, AuthorizationConfig};
use crate::nats::parser::{parse_op, ClientOp, ParseLimits, Parsed};
use crate::nats::session::{Effect, Session, SessionLimits};

/// The password of the user `alice` (never to be echoed back).
pub const ALICE_PASSWORD: &str = "pw-0123456789";
/// The token-free users table the harness authenticates against: `alice`
/// (plain password; may publish `a.>` and subscribe `a.>`) and an nkey user
/// (may publish and subscribe `n.>`).
const ALICE_PREFIX: &[u8] = b"a.";
const NKEY_PREFIX: &[u8] = b"n.";

/// The nonce every harness session's INFO carries (fixed: the harness is
/// deterministic).
pub const NONCE: &[u8; nkey::NONCE_CHARS] = b"abcdefghijklmno";

fn nkey_pair() -> &'static ring::signature::Ed25519KeyPair {
    static PAIR: OnceLock<ring::signature::Ed25519KeyPair> = OnceLock::new();
    PAIR.get_or_init(|| {
        ring::signature::Ed25519KeyPair::from_seed_unchecked(&[42; 32]).expect("a fixed seed")
    })
}

/// The nkey user's public key (`U…`).
pub fn nkey_public() -> String {
    let key: [u8; 32] = nkey_pair()
        .public_key()
        .as_ref()
        .try_into()
        .expect("32 bytes");
    nkey::encode::user_public_key(&key)
}

/// The nkey user's valid signature of [`NONCE`] (so generators can reach the
/// granted path).
pub fn nkey_signature() -> String {
    nkey::encode::base64url(nkey_pair().sign(NONCE).as_ref())
}

fn auth() -> Arc<Auth> {
    static AUTH: OnceLock<Arc<Auth>> = OnceLock::new();
    Arc::clone(AUTH.get_or_init(|| {
        let text = format!(
            r#"users = [
  {{ user = "alice", password = "{ALICE_PASSWORD}", permissions = {{ publish = ["a.>"], subscribe = ["a.>"] }} }},
  {{ nkey = "{}", permissions = {{ publish = ["n.>"], subscribe = ["n.>"] }} }},
]"#,
            nkey_public()
        );
        let config: AuthorizationConfig = toml::from_str(&text).expect("harness TOML");
        Arc::new(Auth::new(&config).expect("valid").expect("auth on"))
    }))
}

/// Runs `input` through a session that must authenticate. Panics if an
/// invariant breaks:
/// - before a CONNECT that authenticates, no op has an effect but closing,
///   and any op that is not CONNECT closes;
/// - a publish or subscription that comes out is allowed to the user that
///   authenticated (alice: `a.>`, the nkey user: `n.>`);
/// - the password never appears in what the client is sent.
pub fn connect_with_auth(input: &[u8]) {
    let session = Session::new(
        1,
        SessionLimits {
            pending_bytes_max: 1 << 20,
            subscriptions_max: 0,
        },
    );
    session.require_auth(auth(), Some(*NONCE));
    let limits = ParseLimits {
        control_line_bytes_max: 512,
        payload_bytes_max: 256,
    };
    let mut pos = 0;
    while pos < input.len() && !session.is_closing() {
        let was_unauthenticated = session.awaiting_auth();
        let Ok(Parsed::Op(op, used)) = parse_op(&input[pos..], &limits) else {
            break;
        };
        pos += used;
        let is_connect = matches!(op, ClientOp::Connect { .. });
        let effect = session.handle_op(op);
        if was_unauthenticated {
            if is_connect {
                assert!(
                    matches!(effect, Effect::None | Effect::Close),
                    "CONNECT had an effect: {effect:?}"
                );
                if session.awaiting_auth() {
                    assert!(session.is_closing(), "a refused CONNECT must close");
                }
            } else {
                assert!(matches!(effect, Effect::Close), "{effect:?} before auth");
                assert!(session.is_closing());
            }
        }
        let allowed = |subject: &[u8]| match session.authorized_user().as_deref() {
            Some("alice") => subject.starts_with(ALICE_PREFIX),
            Some(user) if user == nkey_public() => subject.starts_with(NKEY_PREFIX),
            other => panic!("effect for an unauthenticated or unknown user {other:?}"),
        };
        match &effect {
            Effect::Publish(msg) => assert!(allowed(msg.subject), "published {:?}", msg.subject),
            Effect::Subscribe(sub) => {
                // A wildcard subscription is checked for coverage: a.* and
                // a.> are both covered by a.>.
                assert!(allowed(sub.subject()), "subscribed {:?}", sub.subject())
            }
            _ => {}
        }
    }
    let out = session.take_output(Vec::new());
    let out_text = String::from_utf8_lossy(&out);
    assert!(
        !out_text.contains(ALICE_PASSWORD),
        "the password was echoed: {out_text}"
    );
    // Break the session <-> subscription cycle.
    drop(session.take_subscriptions());
}
