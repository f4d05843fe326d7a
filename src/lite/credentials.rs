//! Device identities: the `[device]` keys and permissions, checked and
//! compiled once at start and shared by every shard (docs/device-protocol.md
//! §9). It answers two questions and nothing else: which key seals a client
//! id's frames, and what a client id may publish and subscribe to (through
//! the NATS side's [`Permissions`], so both protocols have one model).
//!
//! It also holds, per keyed device, the little state protection needs for
//! as long as the broker runs: the replay window of the device's frames and
//! the salt and counter of the broker's. That state is behind one small lock
//! per device, taken only after a frame's tag verified (so forged traffic
//! never touches it) and never across an await; a device's frames may reach
//! any shard (UDP owner, a TCP connection elsewhere), and one window per
//! device is what makes a frame replayed over another transport fail.
//!
//! What it does not do: decide what a verified frame means (the gateway).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use perch_wire::protect::{
    self, BrokerEnvelope, DeviceEnvelope, ProtectError, Replay, ReplayWindow, KEY_BYTES, SALT_BYTES,
};

use crate::auth::{Permissions, PermissionsConfig};
use crate::config::DeviceConfig;

/// The compiled `[device]` credentials.
#[derive(Default)]
pub struct Credentials {
    clients: HashMap<Box<[u8]>, Client>,
    default_permissions: Option<PermissionsConfig>,
    require_key: bool,
}

struct Client {
    key: [u8; KEY_BYTES],
    /// Compiled for this client id; None: the defaults apply.
    permissions: Option<Arc<Permissions>>,
    state: Mutex<KeyState>,
}

/// What protection remembers of one keyed device.
#[derive(Default)]
struct KeyState {
    /// The device's frames seen (epoch, counters).
    window: ReplayWindow,
    /// The epoch of the CONNECT that made the device's session: the broker's
    /// frames are bound to it.
    session_epoch: Option<u32>,
    /// The broker's salt for this device and the last counter used under it
    /// (0: no salt drawn yet).
    salt: [u8; SALT_BYTES],
    counter: u32,
}

/// A datagram that did not verify, by what failed (counted, never answered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unverified {
    /// The clear part does not parse.
    Malformed,
    /// No key for the envelope's client id.
    UnknownClient,
    /// The tag does not verify.
    Forged,
    /// Verified, but seen before (or from an older epoch).
    Replayed,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("clients", &self.clients.len())
            .field("require_key", &self.require_key)
            .finish()
    }
}

/// Why the `[device]` credentials were refused (names the client, never a key).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("client {0:?} appears twice in [[device.clients]]")]
    Duplicate(String),
    #[error("client {0:?}: a client id of 1 to 64 bytes that is one subject token")]
    BadClientId(String),
    #[error("client {0:?}: give exactly one of key and key_file")]
    KeyAndKeyFile(String),
    #[error("client {0:?}: the key must be 64 hex digits (32 bytes)")]
    BadKey(String),
    #[error("client {client:?}: key_file: {error}")]
    KeyFile { client: String, error: String },
    #[error("{0}")]
    Permissions(#[from] crate::auth::AuthConfigError),
}

impl Credentials {
    /// Checks and compiles the table, reading key files.
    pub fn new(config: &DeviceConfig) -> Result<Credentials, CredentialsError> {
        Credentials::build(config, true)
    }

    /// Checks the table without reading key files (config validation, which
    /// runs where the files may not be readable yet).
    pub fn check(config: &DeviceConfig) -> Result<(), CredentialsError> {
        Credentials::build(config, false).map(|_| ())
    }

    fn build(config: &DeviceConfig, read_files: bool) -> Result<Credentials, CredentialsError> {
        if let Some(defaults) = &config.default_permissions {
            // The templates must compile for any one-token client id.
            Permissions::compile_for_client("device.default_permissions", defaults, "x")?;
        }
        let mut clients = HashMap::new();
        for c in &config.clients {
            let id = c.client.as_bytes();
            if id.is_empty() || id.len() > perch_wire::CLIENT_ID_BYTES_MAX || !is_token(id) {
                return Err(CredentialsError::BadClientId(c.client.clone()));
            }
            let hex = match (&c.key, &c.key_file) {
                (Some(key), None) => key.clone(),
                (None, Some(path)) if read_files => {
                    std::fs::read_to_string(path).map_err(|e| CredentialsError::KeyFile {
                        client: c.client.clone(),
                        error: e.to_string(),
                    })?
                }
                (None, Some(_)) => "00".repeat(KEY_BYTES),
                _ => return Err(CredentialsError::KeyAndKeyFile(c.client.clone())),
            };
            let key =
                parse_key(hex.trim()).ok_or_else(|| CredentialsError::BadKey(c.client.clone()))?;
            let permissions = c
                .permissions
                .as_ref()
                .map(|p| {
                    let name = format!("device client {}", c.client);
                    Permissions::compile_for_client(&name, p, &c.client).map(Arc::new)
                })
                .transpose()?;
            let client = Client {
                key,
                permissions,
                state: Mutex::default(),
            };
            if clients.insert(id.into(), client).is_some() {
                return Err(CredentialsError::Duplicate(c.client.clone()));
            }
        }
        Ok(Credentials {
            clients,
            default_permissions: config.default_permissions.clone(),
            require_key: config.require_key,
        })
    }

    /// Keys are configured: the gateway opens envelopes and never answers an
    /// unverified datagram with more bytes than it had.
    pub fn enabled(&self) -> bool {
        !self.clients.is_empty() || self.require_key
    }

    /// The key of `client_id`, if it has one.
    pub fn key(&self, client_id: &[u8]) -> Option<&[u8; KEY_BYTES]> {
        self.clients.get(client_id).map(|c| &c.key)
    }

    /// Verifies a device envelope and opens it into `scratch`: the
    /// envelope's clear part and the plain frame. The replay window is not
    /// consulted (see [`Credentials::accept`]): a shard that does not own the
    /// device's session verifies before it forwards, the owner accepts.
    pub fn open<'b, 'o>(
        &self,
        bytes: &'b [u8],
        scratch: &'o mut [u8],
    ) -> Result<(DeviceEnvelope<'b>, &'o [u8]), Unverified> {
        let (envelope, _) = protect::peek_from_device(bytes).map_err(|_| Unverified::Malformed)?;
        let client = self
            .clients
            .get(envelope.client_id)
            .ok_or(Unverified::UnknownClient)?;
        protect::open_from_device(&client.key, bytes, scratch).map_err(|e| match e {
            ProtectError::Forged => Unverified::Forged,
            _ => Unverified::Malformed,
        })
    }

    /// Records a verified frame's (epoch, counter) in its device's window;
    /// refused if seen before. A CONNECT's epoch becomes the session's.
    pub fn accept(&self, envelope: &DeviceEnvelope<'_>, connect: bool) -> Result<(), Unverified> {
        let client = self
            .clients
            .get(envelope.client_id)
            .ok_or(Unverified::UnknownClient)?;
        let mut state = client.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .window
            .accept(envelope.epoch, envelope.counter)
            .map_err(|_: Replay| Unverified::Replayed)?;
        if connect {
            state.session_epoch = Some(envelope.epoch);
        }
        Ok(())
    }

    /// The epoch of the CONNECT that made `client_id`'s session, if any.
    pub fn session_epoch(&self, client_id: &[u8]) -> Option<u32> {
        let client = self.clients.get(client_id)?;
        let state = client.state.lock().unwrap_or_else(|p| p.into_inner());
        state.session_epoch
    }

    /// `frame` sealed for keyed device `client_id` (None: it has no key, or
    /// no CONNECT was ever verified, so there is no epoch to bind to).
    pub fn seal(&self, client_id: &[u8], frame: &[u8]) -> Option<Vec<u8>> {
        let client = self.clients.get(client_id)?;
        let mut state = client.state.lock().unwrap_or_else(|p| p.into_inner());
        let epoch = state.session_epoch?;
        if state.counter == 0 || state.counter == u32::MAX {
            state.salt = fresh_salt(client_id);
            state.counter = 0;
        }
        state.counter += 1;
        let envelope = BrokerEnvelope {
            salt: state.salt,
            counter: state.counter,
        };
        drop(state);
        let mut out = vec![0u8; protect::broker_sealed_len(envelope.counter, frame.len())];
        let n = protect::seal_from_broker(&client.key, epoch, &envelope, frame, &mut out).ok()?;
        out.truncate(n);
        Some(out)
    }

    /// Whether `client_id` may connect with plain (unsealed) frames.
    pub fn allows_plain(&self, client_id: &[u8]) -> bool {
        !self.require_key && !self.clients.contains_key(client_id)
    }

    /// What `client_id` may do: its own permissions, else the defaults with
    /// `{client}` filled in, else None (everything). A client id that is not
    /// one subject token gets nothing under templates that need it.
    pub fn permissions(&self, client_id: &[u8]) -> Option<Arc<Permissions>> {
        if let Some(own) = self
            .clients
            .get(client_id)
            .and_then(|c| c.permissions.clone())
        {
            return Some(own);
        }
        let defaults = self.default_permissions.as_ref()?;
        let compiled = std::str::from_utf8(client_id)
            .ok()
            .filter(|id| is_token(id.as_bytes()))
            .and_then(|id| Permissions::compile_for_client("device", defaults, id).ok())
            .unwrap_or_else(Permissions::deny_all);
        Some(Arc::new(compiled))
    }
}

/// 7 bytes that no earlier salt of this process had and that a restarted
/// broker draws anew: std's per-process random SipHash keys over the client
/// id and a process-wide count of draws.
fn fresh_salt(client_id: &[u8]) -> [u8; SALT_BYTES] {
    use std::hash::{BuildHasher, Hasher};
    static DRAWS: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write(client_id);
    hasher.write_u64(DRAWS.fetch_add(1, Ordering::Relaxed));
    let bits = hasher.finish().to_le_bytes();
    let mut salt = [0u8; SALT_BYTES];
    salt.copy_from_slice(&bits[..SALT_BYTES]);
    salt
}

/// One subject token: no dot, wildcard, space or control byte.
fn is_token(id: &[u8]) -> bool {
    !id.is_empty()
        && id
            .iter()
            .all(|&b| b > b' ' && b != b'.' && b != b'*' && b != b'>' && b != 0x7f)
}

fn parse_key(hex: &str) -> Option<[u8; KEY_BYTES]> {
    let hex = hex.as_bytes();
    if hex.len() != 2 * KEY_BYTES {
        return None;
    }
    let digit = |b: u8| (b as char).to_digit(16);
    let mut key = [0u8; KEY_BYTES];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        key[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> DeviceConfig {
        toml::from_str(text).expect("parses")
    }

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn fleet_templates_fill_in_the_client_id() {
        let creds = Credentials::new(&config(&format!(
            r#"
            default_permissions = {{ publish = {{ allow = ["t.{{client}}.>"] }}, subscribe = ["cmd.{{client}}"] }}
            [[clients]]
            client = "a"
            key = "{KEY}"
            [[clients]]
            client = "b"
            key = "{KEY}"
            permissions = {{ publish = ["own.{{client}}"] }}
            "#
        )))
        .expect("valid");
        let a = creds.permissions(b"a").expect("defaults");
        assert!(a.can_publish(b"t.a.temp") && !a.can_publish(b"t.b.temp"));
        assert!(a.can_subscribe(b"cmd.a", None) && !a.can_subscribe(b"cmd.>", None));
        let b = creds.permissions(b"b").expect("own");
        assert!(b.can_publish(b"own.b") && !b.can_publish(b"t.b.x"));
        // A claimed id that would widen the template gets nothing.
        for id in [&b"*"[..], b">", b"a.b", b"", b"a b"] {
            let p = creds.permissions(id).expect("defaults");
            assert!(
                !p.can_publish(b"t.x.y") && !p.can_subscribe(b"cmd.x", None),
                "{id:?}"
            );
        }
        assert_eq!(creds.key(b"a"), parse_key(KEY).as_ref());
        assert!(creds.key(b"c").is_none() && creds.allows_plain(b"c") && !creds.allows_plain(b"a"));
        assert!(creds.enabled());
        assert!(!Credentials::default().enabled());
    }

    #[test]
    fn bad_tables_are_refused() {
        let bad = |text: &str| Credentials::new(&config(text)).expect_err(text);
        bad(r#"[[clients]]
            client = "a""#);
        bad(r#"[[clients]]
            client = "a"
            key = "00""#);
        bad(&format!("[[clients]]\nclient = \"a.b\"\nkey = \"{KEY}\""));
        bad(&format!("[[clients]]\nclient = \"a\"\nkey = \"{KEY}\"\n[[clients]]\nclient = \"a\"\nkey = \"{KEY}\""));
        bad(r#"default_permissions = { publish = ["a b c"] }"#);
        let e = bad(&format!(
            "[[clients]]\nclient = \"a\"\nkey = \"{}zz\"",
            &KEY[..62]
        ));
        assert!(
            !e.to_string().contains(&KEY[..10]),
            "errors never show keys: {e}"
        );
        assert!(!format!(
            "{:?}",
            config(&format!("[[clients]]\nclient = \"a\"\nkey = \"{KEY}\""))
        )
        .contains(&KEY[..10]));
    }
}
