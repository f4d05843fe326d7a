//! Authentication and per-subject permissions for NATS clients, with
//! nats-server's semantics (../shared/reference/security-facts.md): a token, or
//! users with plain or bcrypt passwords; per user, publish and subscribe allow
//! and deny lists with wildcards (deny wins), queue entries `"subject queue"`,
//! and a wildcard subscription that overlaps a deny entry accepted but filtered
//! at delivery.
//!
//! The config types come from the TOML `[authorization]` table; [`Auth`] is
//! the checked, compiled form every shard shares. Passwords never leave this
//! module: `Debug` redacts them and errors name the user, not the secret.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use crate::nats::connect::ConnectOptions;
use crate::nats::subject::{is_valid_queue, is_valid_subject, subject_matches};

#[doc(hidden)]
pub mod fuzz;
pub mod nkey;

/// `[authorization]`: a token, or users (not both, as in nats-server).
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthorizationConfig {
    pub token: Option<String>,
    pub users: Vec<UserConfig>,
}

impl fmt::Debug for AuthorizationConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizationConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("users", &self.users)
            .finish()
    }
}

/// One user: `user` + `password`, or `nkey` alone (as in nats-server).
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct UserConfig {
    pub user: String,
    /// Plain text, or a bcrypt hash (`$2a$`, `$2b$`, `$2x$`, `$2y$`). May
    /// be left out only for users selected by certificate (`tls.map`).
    pub password: String,
    /// A user's public nkey (`U…`): the client proves it holds the seed by
    /// signing the nonce of its INFO.
    pub nkey: Option<String>,
    pub permissions: Option<PermissionsConfig>,
}

impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserConfig")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("nkey", &self.nkey)
            .field("permissions", &self.permissions)
            .finish()
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PermissionsConfig {
    pub publish: Option<RulesConfig>,
    pub subscribe: Option<RulesConfig>,
    /// May publish to the reply subject of each message it receives:
    /// `true` (one response within 2 minutes) or `{ max, expires_ms }`
    /// (0 or absent: those defaults; negative: unlimited).
    pub allow_responses: Option<AllowResponsesConfig>,
}

/// `allow_responses = true` or `{ max = 5, expires_ms = 60000 }`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum AllowResponsesConfig {
    Enabled(bool),
    Limits {
        #[serde(default)]
        max: i64,
        #[serde(default)]
        expires_ms: i64,
    },
}

/// nats-server's defaults for `allow_responses`: one response, within 2 minutes.
const RESPONSES_MAX_DEFAULT: u32 = 1;
const RESPONSES_EXPIRES_MS_DEFAULT: u64 = 120_000;

/// A list alone is an allow list; a table gives allow and deny.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum RulesConfig {
    Allow(Vec<String>),
    Table {
        #[serde(default)]
        allow: Option<Vec<String>>,
        #[serde(default)]
        deny: Vec<String>,
    },
}

/// Why an `[authorization]` table is refused (names the user, never a secret).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthConfigError {
    #[error("authorization: a token and users cannot both be set (as in nats-server)")]
    TokenAndUsers,
    #[error("authorization: the token is empty")]
    EmptyToken,
    #[error("authorization: user {0:?} appears twice")]
    DuplicateUser(String),
    #[error("authorization: a user with an empty name")]
    EmptyUser,
    #[error("authorization: user {0:?} has an empty password")]
    EmptyPassword(String),
    #[error("authorization: nkey {0:?} is not a user's public nkey (U…, 56 characters)")]
    BadNkey(String),
    #[error("authorization: nkey {0:?} appears twice")]
    DuplicateNkey(String),
    #[error("authorization: nkey {0:?}: an nkey user has no user name or password")]
    NkeyWithPassword(String),
    #[error("authorization: user {0:?}: the password looks like bcrypt but is not a valid hash")]
    BadBcrypt(String),
    #[error(
        "authorization: user {user:?}: {kind} permission {entry:?} is not a valid subject{queue}"
    )]
    BadEntry {
        user: String,
        kind: &'static str,
        entry: String,
        queue: &'static str,
    },
}

/// CONNECT's credentials were refused (which of them is not said, to the
/// client or in the error).
#[derive(Debug, PartialEq, Eq)]
pub struct AuthFailed;

/// The compiled `[authorization]`, shared by every shard.
pub struct Auth {
    token: Option<Box<str>>,
    users: Vec<User>,
    /// Some user has an nkey: every INFO carries a nonce to sign.
    nonce_required: bool,
}

struct User {
    /// The user name, or the public nkey of an nkey user.
    name: Box<str>,
    credential: Credential,
    permissions: Option<Arc<Permissions>>,
}

#[derive(PartialEq, Eq)]
enum Credential {
    Plain(Box<str>),
    Bcrypt(Box<str>),
    Nkey([u8; nkey::KEY_BYTES]),
    /// A user only a client certificate selects (`tls.map`): no password matches.
    CertificateOnly,
}

/// Who a client authenticated as, and what it may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// None: no restrictions.
    pub permissions: Option<Arc<Permissions>>,
    /// The index of the user in its `Auth`; None: the token.
    user: Option<usize>,
}

impl Grant {
    /// The user name (or nkey) the client authenticated as; None: the token.
    pub fn user<'a>(&self, auth: &'a Auth) -> Option<&'a str> {
        self.user.and_then(|i| auth.users.get(i)).map(|u| &*u.name)
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field(
                "users",
                &self.users.iter().map(|u| &*u.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// What a client may do; `None` lists mean "everything".
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    publish: Rules,
    subscribe: Rules,
    /// `allow_responses`: None when not given.
    responses: Option<ResponseLimits>,
}

/// How many responses a client may publish to a reply subject it received,
/// and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseLimits {
    /// None: unlimited.
    pub max: Option<u32>,
    /// None: no time limit.
    pub expires_ms: Option<u64>,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Rules {
    /// None: everything is allowed (unless denied).
    allow: Option<Vec<Entry>>,
    deny: Vec<Entry>,
}

/// A permission entry: a subject pattern, and for subscribe entries an
/// optional queue group (`"foo v1"`: only queue v1 on foo).
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    subject: Box<[u8]>,
    queue: Option<Box<[u8]>>,
}

impl Auth {
    /// Checks and compiles the table; None when it asks for nothing (no token,
    /// no users: every client is let in, as nats-server does without auth).
    pub fn new(config: &AuthorizationConfig) -> Result<Option<Auth>, AuthConfigError> {
        Auth::build(config, false)
    }

    /// As [`Auth::new`], for `tls.map`: users may be given without a
    /// password (their certificate selects them; no password logs them in).
    pub fn with_certificate_users(
        config: &AuthorizationConfig,
    ) -> Result<Option<Auth>, AuthConfigError> {
        Auth::build(config, true)
    }

    fn build(
        config: &AuthorizationConfig,
        certificate_users: bool,
    ) -> Result<Option<Auth>, AuthConfigError> {
        if config.token.is_some() && !config.users.is_empty() {
            return Err(AuthConfigError::TokenAndUsers);
        }
        if config.token.as_deref() == Some("") {
            return Err(AuthConfigError::EmptyToken);
        }
        let mut users: Vec<User> = Vec::new();
        for u in &config.users {
            let (name, credential) = if let Some(key) = &u.nkey {
                if !u.user.is_empty() || !u.password.is_empty() {
                    return Err(AuthConfigError::NkeyWithPassword(key.clone()));
                }
                let raw = nkey::decode_user_key(key)
                    .ok_or_else(|| AuthConfigError::BadNkey(key.clone()))?;
                if users
                    .iter()
                    .any(|known| known.credential == Credential::Nkey(raw))
                {
                    return Err(AuthConfigError::DuplicateNkey(key.clone()));
                }
                (key, Credential::Nkey(raw))
            } else {
                if u.user.is_empty() {
                    return Err(AuthConfigError::EmptyUser);
                }
                if users.iter().any(|known| *known.name == *u.user) {
                    return Err(AuthConfigError::DuplicateUser(u.user.clone()));
                }
                if u.password.is_empty() && !certificate_users {
                    return Err(AuthConfigError::EmptyPassword(u.user.clone()));
                }
                let credential = if u.password.is_empty() {
                    Credential::CertificateOnly
                } else if is_bcrypt(&u.password) {
                    // A hash that cannot verify anything would lock the user out
                    // silently: refuse it at load.
                    if bcrypt::verify("", &u.password).is_err() {
                        return Err(AuthConfigError::BadBcrypt(u.user.clone()));
                    }
                    Credential::Bcrypt(u.password.as_str().into())
                } else {
                    Credential::Plain(u.password.as_str().into())
                };
                (&u.user, credential)
            };
            let permissions = u
                .permissions
                .as_ref()
                .map(|p| Permissions::compile(name, p).map(Arc::new))
                .transpose()?;
            users.push(User {
                name: name.as_str().into(),
                credential,
                permissions,
            });
        }
        if config.token.is_none() && users.is_empty() {
            return Ok(None);
        }
        let nonce_required = users
            .iter()
            .any(|u| matches!(u.credential, Credential::Nkey(_)));
        Ok(Some(Auth {
            token: config.token.as_deref().map(Into::into),
            users,
            nonce_required,
        }))
    }

    /// The users whose password the config holds in plain text (the runtime
    /// warns of each once).
    pub fn plain_text_users(&self) -> impl Iterator<Item = &str> {
        self.users
            .iter()
            .filter(|u| matches!(u.credential, Credential::Plain(_)))
            .map(|u| &*u.name)
    }

    /// Whether each client's INFO must carry a nonce (some user has an nkey).
    pub fn nonce_required(&self) -> bool {
        self.nonce_required
    }

    /// Checks CONNECT's credentials: Ok with who the client is and what it
    /// may do, or Err (the reference answers `Authorization Violation` and
    /// closes, whatever was wrong). `nonce` is the one this client's INFO
    /// carried, which an nkey user must have signed.
    pub fn authenticate(
        &self,
        options: &ConnectOptions,
        nonce: Option<&[u8]>,
    ) -> Result<Grant, AuthFailed> {
        if let Some(token) = &self.token {
            let given = options.auth_token.as_deref().unwrap_or("");
            return if constant_time_eq(given.as_bytes(), token.as_bytes()) {
                Ok(Grant {
                    permissions: None,
                    user: None,
                })
            } else {
                Err(AuthFailed)
            };
        }
        // nats-server: a CONNECT with an nkey is checked as an nkey user only.
        let found = if let Some(key) = options.nkey.as_deref().filter(|_| self.nonce_required) {
            let raw = nkey::decode_user_key(key).ok_or(AuthFailed)?;
            let (nonce, sig) = nonce.zip(options.sig.as_deref()).ok_or(AuthFailed)?;
            let found = self
                .users
                .iter()
                .position(|u| u.credential == Credential::Nkey(raw))
                .ok_or(AuthFailed)?;
            if !nkey::verify(&raw, nonce, sig) {
                return Err(AuthFailed);
            }
            found
        } else {
            let name = options.user.as_deref().ok_or(AuthFailed)?;
            let pass = options.pass.as_deref().unwrap_or("");
            let found = self
                .users
                .iter()
                .position(|u| &*u.name == name && !matches!(u.credential, Credential::Nkey(_)))
                .ok_or(AuthFailed)?;
            let ok = match &self.users[found].credential {
                Credential::Plain(p) => constant_time_eq(pass.as_bytes(), p.as_bytes()),
                Credential::Bcrypt(hash) => bcrypt::verify(pass, hash).unwrap_or(false),
                Credential::Nkey(_) | Credential::CertificateOnly => false,
            };
            if !ok {
                return Err(AuthFailed);
            }
            found
        };
        Ok(Grant {
            permissions: self.users[found].permissions.clone(),
            user: Some(found),
        })
    }

    /// `tls.map` (nats-server's `verify_and_map`): the first of the client
    /// certificate's identities (in the reference's order, see
    /// `tls/identity.rs`) that names a user selects it; CONNECT's `user` is
    /// not looked at. As in nats-server, CONNECT's `pass` must still match
    /// that user's password, which for a certificate-only user means none.
    /// Err when no identity names a user.
    pub fn authenticate_by_identity(
        &self,
        identities: &[String],
        pass: &str,
    ) -> Result<Grant, AuthFailed> {
        let found = identities
            .iter()
            .find_map(|identity| {
                self.users.iter().position(|u| {
                    *u.name == **identity && !matches!(u.credential, Credential::Nkey(_))
                })
            })
            .ok_or(AuthFailed)?;
        let ok = match &self.users[found].credential {
            Credential::Plain(p) => constant_time_eq(pass.as_bytes(), p.as_bytes()),
            Credential::Bcrypt(hash) => bcrypt::verify(pass, hash).unwrap_or(false),
            Credential::CertificateOnly => pass.is_empty(),
            Credential::Nkey(_) => false,
        };
        if ok {
            Ok(Grant {
                permissions: self.users[found].permissions.clone(),
                user: Some(found),
            })
        } else {
            Err(AuthFailed)
        }
    }

    /// A config reload: whether a client that `old` admitted with `grant` is
    /// still admitted by `self`, and with which permissions. The client's
    /// secret is not kept, so this asks whether the same credential is still
    /// configured: the same token; a user of the same name with the same
    /// password (or hash); the same nkey. A changed password or a removed user
    /// fails (the client is closed and reconnects with what it has).
    pub fn recheck(&self, old: &Auth, grant: &Grant) -> Result<Grant, AuthFailed> {
        match grant.user {
            None => match (&self.token, &old.token) {
                (Some(new), Some(was)) if constant_time_eq(new.as_bytes(), was.as_bytes()) => {
                    Ok(Grant {
                        permissions: None,
                        user: None,
                    })
                }
                _ => Err(AuthFailed),
            },
            Some(i) => {
                let was = old.users.get(i).ok_or(AuthFailed)?;
                let found = self
                    .users
                    .iter()
                    .position(|u| u.name == was.name && u.credential == was.credential)
                    .ok_or(AuthFailed)?;
                Ok(Grant {
                    permissions: self.users[found].permissions.clone(),
                    user: Some(found),
                })
            }
        }
    }
}

fn is_bcrypt(password: &str) -> bool {
    ["$2a$", "$2b$", "$2x$", "$2y$"]
        .iter()
        .any(|p| password.starts_with(p))
}

/// Compares without stopping at the first difference (length aside).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Permissions {
    fn compile(user: &str, config: &PermissionsConfig) -> Result<Permissions, AuthConfigError> {
        let rules = |kind: &'static str,
                     rules: &Option<RulesConfig>,
                     queues: bool|
         -> Result<Rules, AuthConfigError> {
            let (allow, deny) = match rules {
                None => (None, Vec::new()),
                Some(RulesConfig::Allow(allow)) => (Some(allow.clone()), Vec::new()),
                Some(RulesConfig::Table { allow, deny }) => (allow.clone(), deny.clone()),
            };
            let entry = |text: &String| -> Result<Entry, AuthConfigError> {
                let bad = |queue: &'static str| AuthConfigError::BadEntry {
                    user: user.to_string(),
                    kind,
                    entry: text.clone(),
                    queue,
                };
                let mut parts = text.split_ascii_whitespace();
                let subject = parts.next().ok_or_else(|| bad(""))?;
                let queue = parts.next();
                if parts.next().is_some() || (!queues && queue.is_some()) {
                    return Err(bad(" (one subject, and for subscribe an optional queue)"));
                }
                if !is_valid_subject(subject.as_bytes()) {
                    return Err(bad(""));
                }
                if queue.is_some_and(|q| !is_valid_queue(q.as_bytes())) {
                    return Err(bad(" and queue"));
                }
                Ok(Entry {
                    subject: subject.as_bytes().into(),
                    queue: queue.map(|q| q.as_bytes().into()),
                })
            };
            Ok(Rules {
                allow: allow
                    .as_ref()
                    .map(|list| list.iter().map(entry).collect())
                    .transpose()?,
                deny: deny.iter().map(entry).collect::<Result<_, _>>()?,
            })
        };
        let responses = match &config.allow_responses {
            None | Some(AllowResponsesConfig::Enabled(false)) => None,
            Some(AllowResponsesConfig::Enabled(true)) => Some(ResponseLimits {
                max: Some(RESPONSES_MAX_DEFAULT),
                expires_ms: Some(RESPONSES_EXPIRES_MS_DEFAULT),
            }),
            Some(AllowResponsesConfig::Limits { max, expires_ms }) => Some(ResponseLimits {
                max: match *max {
                    0 => Some(RESPONSES_MAX_DEFAULT),
                    m if m < 0 => None,
                    m => Some(u32::try_from(m).unwrap_or(u32::MAX)),
                },
                expires_ms: match *expires_ms {
                    0 => Some(RESPONSES_EXPIRES_MS_DEFAULT),
                    e if e < 0 => None,
                    e => Some(e.unsigned_abs()),
                },
            }),
        };
        let mut publish = rules("publish", &config.publish, false)?;
        if responses.is_some() && config.publish.is_none() {
            // nats-server: allow_responses without publish rules turns the
            // blanket publish permission off (responses only).
            publish.allow = Some(Vec::new());
        }
        Ok(Permissions {
            publish,
            subscribe: rules("subscribe", &config.subscribe, true)?,
            responses,
        })
    }

    /// `allow_responses`, if given.
    pub fn responses(&self) -> Option<ResponseLimits> {
        self.responses
    }

    /// Compiles `config` for one client with every `{client}` in its
    /// entries replaced by `client` (the device protocol's fleet rules,
    /// mosquitto's `pattern` lines). `name` is what errors call the owner.
    /// The caller makes sure `client` is one subject token: a client id
    /// with a dot or a wildcard would widen the rule.
    pub fn compile_for_client(
        name: &str,
        config: &PermissionsConfig,
        client: &str,
    ) -> Result<Permissions, AuthConfigError> {
        let fill = |list: &[String]| -> Vec<String> {
            list.iter().map(|e| e.replace("{client}", client)).collect()
        };
        let rules = |rules: &Option<RulesConfig>| -> Option<RulesConfig> {
            rules.as_ref().map(|r| match r {
                RulesConfig::Allow(allow) => RulesConfig::Allow(fill(allow)),
                RulesConfig::Table { allow, deny } => RulesConfig::Table {
                    allow: allow.as_deref().map(fill),
                    deny: fill(deny),
                },
            })
        };
        let filled = PermissionsConfig {
            publish: rules(&config.publish),
            subscribe: rules(&config.subscribe),
            allow_responses: config.allow_responses.clone(),
        };
        Permissions::compile(name, &filled)
    }

    /// Nothing allowed: publish and subscribe allow lists that are empty.
    pub fn deny_all() -> Permissions {
        let none = || Rules {
            allow: Some(Vec::new()),
            deny: Vec::new(),
        };
        Permissions {
            publish: none(),
            subscribe: none(),
            responses: None,
        }
    }

    /// A publish to `subject` (a literal) is allowed.
    pub fn can_publish(&self, subject: &[u8]) -> bool {
        let rules = &self.publish;
        let allowed = rules
            .allow
            .as_ref()
            .is_none_or(|allow| allow.iter().any(|e| subject_matches(&e.subject, subject)));
        allowed
            && !rules
                .deny
                .iter()
                .any(|e| subject_matches(&e.subject, subject))
    }

    /// A subscription to `subject` (wildcards allowed), in `queue` if any, is
    /// allowed: an allow entry covers all of it, and no deny entry does. (A
    /// deny entry that covers only part of a wildcard subscription filters
    /// its deliveries instead: [`Permissions::filters_deliveries`].)
    pub fn can_subscribe(&self, subject: &[u8], queue: Option<&[u8]>) -> bool {
        let rules = &self.subscribe;
        let allowed = rules.allow.as_ref().is_none_or(|allow| {
            allow
                .iter()
                .any(|e| covers(&e.subject, subject) && queue_allowed(e, queue))
        });
        allowed
            && !rules
                .deny
                .iter()
                .any(|e| covers(&e.subject, subject) && queue_denied(e, queue))
    }

    /// Whether deliveries on a subscription to `subject` must be checked
    /// against the deny list: a wildcard subject that some deny entry overlaps.
    pub fn filters_deliveries(&self, subject: &[u8]) -> bool {
        has_wildcard(subject)
            && self
                .subscribe
                .deny
                .iter()
                .any(|e| e.queue.is_none() && overlap(&e.subject, subject))
    }

    /// A delivery on `subject` (a literal) is denied to this client.
    pub fn delivery_denied(&self, subject: &[u8]) -> bool {
        self.subscribe
            .deny
            .iter()
            .any(|e| e.queue.is_none() && subject_matches(&e.subject, subject))
    }
}

/// An allow entry admits `queue`: a plain entry admits plain and any queue;
/// a queue entry only that queue.
fn queue_allowed(entry: &Entry, queue: Option<&[u8]>) -> bool {
    match &entry.queue {
        None => true,
        Some(q) => queue == Some(&**q),
    }
}

/// A deny entry refuses `queue`: a plain entry refuses plain and any queue; a
/// queue entry only that queue.
fn queue_denied(entry: &Entry, queue: Option<&[u8]>) -> bool {
    queue_allowed(entry, queue)
}

fn has_wildcard(subject: &[u8]) -> bool {
    subject
        .split(|&b| b == b'.')
        .any(|t| t == b"*" || t == b">")
}

/// Some subject matches both patterns.
fn overlap(a: &[u8], b: &[u8]) -> bool {
    let mut a = a.split(|&x| x == b'.');
    let mut b = b.split(|&x| x == b'.');
    loop {
        match (a.next(), b.next()) {
            (Some(b">"), Some(_)) | (Some(_), Some(b">")) => return true,
            (Some(x), Some(y)) if x == b"*" || y == b"*" || x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Every subject `pattern` matches is matched by `cover`: token by token, `>`
/// in `cover` takes the rest, `*` in `cover` takes any one token but `>`, a
/// literal only itself (nats-server's sublist match of a wildcard subject).
pub fn covers(cover: &[u8], pattern: &[u8]) -> bool {
    let mut c = cover.split(|&b| b == b'.');
    let mut p = pattern.split(|&b| b == b'.');
    loop {
        match (c.next(), p.next()) {
            (Some(b">"), Some(_)) => return true,
            (Some(b"*"), Some(t)) if t != b">" => {}
            (Some(ct), Some(pt)) if ct == pt && ct != b"*" && ct != b">" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Auth {
        /// Without a nonce, as the user/password and token tests need.
        fn authenticate_plain(
            &self,
            options: &ConnectOptions,
        ) -> Result<Option<Arc<Permissions>>, AuthFailed> {
            self.authenticate(options, None).map(|g| g.permissions)
        }
    }

    fn perms(toml_text: &str) -> Permissions {
        let config: PermissionsConfig = toml::from_str(toml_text).expect("permissions TOML");
        Permissions::compile("u", &config).expect("compiles")
    }

    #[test]
    fn coverage_is_nats_servers_sublist_match() {
        assert!(covers(b"foo.>", b"foo.*"));
        assert!(covers(b"foo.>", b"foo.bar.>"));
        assert!(covers(b"foo.*", b"foo.*"));
        assert!(covers(b"foo.*", b"foo.bar"));
        assert!(!covers(b"foo.*", b"foo.>"));
        assert!(!covers(b"foo.bar", b"foo.*"));
        assert!(!covers(b"foo.>", b"foo"));
        assert!(covers(b">", b"a.b.c"));
        assert!(!covers(b"a.b", b"a.b.c"));
    }

    #[test]
    fn publish_allow_and_deny() {
        let p = perms(r#"publish = { allow = ["sensors.>"], deny = ["sensors.admin.>"] }"#);
        assert!(p.can_publish(b"sensors.a.t"));
        assert!(!p.can_publish(b"sensors.admin.reset"));
        assert!(!p.can_publish(b"cmd.x"));
        assert!(
            p.can_subscribe(b"anything.>", None),
            "no subscribe rules: all"
        );
        let only_list = perms(r#"publish = ["a", "b.*"]"#);
        assert!(only_list.can_publish(b"b.c") && !only_list.can_publish(b"c"));
    }

    #[test]
    fn subscribe_rules_queues_and_filters() {
        let p = perms(
            r#"subscribe = { allow = ["cmd.>", "_INBOX.>", "work v1"], deny = ["cmd.secret"] }"#,
        );
        assert!(p.can_subscribe(b"cmd.a", None));
        assert!(p.can_subscribe(b"cmd.*", None), "covered by cmd.>");
        assert!(!p.can_subscribe(b"cmd.secret", None));
        assert!(!p.can_subscribe(b"other", None));
        assert!(!p.can_subscribe(b"work", None), "work only in queue v1");
        assert!(p.can_subscribe(b"work", Some(b"v1")));
        assert!(!p.can_subscribe(b"work", Some(b"v2")));
        assert!(
            p.can_subscribe(b"cmd.a", Some(b"any")),
            "plain entries admit queues"
        );
        assert!(p.filters_deliveries(b"cmd.*"));
        assert!(!p.filters_deliveries(b"cmd.a"));
        assert!(!p.filters_deliveries(b"_INBOX.>"));
        assert!(p.delivery_denied(b"cmd.secret") && !p.delivery_denied(b"cmd.a"));
    }

    fn options(user: Option<&str>, pass: Option<&str>, token: Option<&str>) -> ConnectOptions {
        let json = serde_json::json!({ "user": user, "pass": pass, "auth_token": token });
        let json = serde_json::to_vec(&json).expect("json");
        crate::nats::connect::parse_connect(&json).expect("parses")
    }

    #[test]
    fn credentials() {
        let hash = bcrypt::hash("s3cret", 4).expect("hash");
        let config = AuthorizationConfig {
            token: None,
            users: vec![
                UserConfig {
                    user: "plain".into(),
                    password: "pw".into(),
                    permissions: None,
                    ..UserConfig::default()
                },
                UserConfig {
                    user: "hashed".into(),
                    password: hash,
                    permissions: Some(PermissionsConfig {
                        publish: Some(RulesConfig::Allow(vec!["x".into()])),
                        subscribe: None,
                        allow_responses: None,
                    }),
                    ..UserConfig::default()
                },
            ],
        };
        let auth = Auth::new(&config).expect("valid").expect("some");
        assert_eq!(
            auth.authenticate_plain(&options(Some("plain"), Some("pw"), None)),
            Ok(None)
        );
        assert!(auth
            .authenticate_plain(&options(Some("plain"), Some("pW"), None))
            .is_err());
        assert!(auth
            .authenticate_plain(&options(Some("nobody"), Some("pw"), None))
            .is_err());
        assert!(auth.authenticate_plain(&options(None, None, None)).is_err());
        let perms = auth
            .authenticate_plain(&options(Some("hashed"), Some("s3cret"), None))
            .expect("bcrypt verifies")
            .expect("with permissions");
        assert!(perms.can_publish(b"x") && !perms.can_publish(b"y"));
        assert!(auth
            .authenticate_plain(&options(Some("hashed"), Some("nope"), None))
            .is_err());
        let debug = format!("{config:?} {auth:?}");
        assert!(!debug.contains("pw\"") && !debug.contains("$2"), "{debug}");

        let token = Auth::new(&AuthorizationConfig {
            token: Some("t0k".into()),
            users: Vec::new(),
        })
        .expect("valid")
        .expect("some");
        assert_eq!(
            token.authenticate_plain(&options(None, None, Some("t0k"))),
            Ok(None)
        );
        assert!(token
            .authenticate_plain(&options(None, None, Some("t0K")))
            .is_err());
        assert!(token
            .authenticate_plain(&options(Some("a"), Some("t0k"), None))
            .is_err());
    }

    #[test]
    fn nkey_users_sign_the_nonce() {
        use ring::signature::KeyPair;
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[3; 32]).expect("seed");
        let public: [u8; 32] = pair.public_key().as_ref().try_into().expect("32");
        let key = nkey::encode::user_public_key(&public);
        let config: AuthorizationConfig = toml::from_str(&format!(
            r#"users = [ {{ nkey = "{key}", permissions = {{ publish = ["x"] }} }}, {{ user = "alice", password = "pw" }} ]"#
        ))
        .expect("TOML");
        let auth = Auth::new(&config).expect("valid").expect("some");
        assert!(auth.nonce_required());
        let nonce = nkey::new_nonce().expect("random");
        let sig = nkey::encode::base64url(pair.sign(&nonce).as_ref());
        let connect = |json: serde_json::Value| {
            crate::nats::connect::parse_connect(&serde_json::to_vec(&json).expect("json"))
                .expect("parses")
        };
        let grant = auth
            .authenticate(
                &connect(serde_json::json!({"nkey": key, "sig": sig})),
                Some(&nonce),
            )
            .expect("signed nonce");
        assert_eq!(grant.user(&auth), Some(key.as_str()));
        assert!(grant.permissions.expect("permissions").can_publish(b"x"));
        let other = nkey::new_nonce().expect("random");
        for (json, nonce) in [
            (serde_json::json!({"nkey": key, "sig": sig}), &other[..]),
            (serde_json::json!({"nkey": key}), &nonce[..]),
            (serde_json::json!({"nkey": "UBAD", "sig": sig}), &nonce[..]),
            // The nkey user cannot log in by name with any password.
            (serde_json::json!({"user": key, "pass": ""}), &nonce[..]),
        ] {
            assert!(
                auth.authenticate(&connect(json.clone()), Some(nonce))
                    .is_err(),
                "{json}"
            );
        }
        assert!(auth
            .authenticate(
                &connect(serde_json::json!({"user": "alice", "pass": "pw"})),
                Some(&nonce)
            )
            .is_ok());
        // An nkey user with a password, or a key that is not a user's, is refused at load.
        for bad in [
            format!(r#"users = [ {{ nkey = "{key}", password = "x" }} ]"#),
            r#"users = [ { nkey = "UXXXX" } ]"#.to_string(),
            format!(r#"users = [ {{ nkey = "{key}" }}, {{ nkey = "{key}" }} ]"#),
        ] {
            let config: AuthorizationConfig = toml::from_str(&bad).expect("TOML");
            assert!(Auth::new(&config).is_err(), "{bad}");
        }
    }

    #[test]
    fn allow_responses_forms_and_defaults() {
        let p = perms("subscribe = [\"svc\"]\nallow_responses = true");
        assert_eq!(
            p.responses(),
            Some(ResponseLimits {
                max: Some(1),
                expires_ms: Some(120_000)
            })
        );
        assert!(!p.can_publish(b"anything"), "blanket publish is off");
        let p = perms("publish = [\"a\"]\nallow_responses = { max = -1, expires_ms = -1 }");
        assert_eq!(
            p.responses(),
            Some(ResponseLimits {
                max: None,
                expires_ms: None
            })
        );
        assert!(p.can_publish(b"a"), "the publish list still applies");
        let p = perms("allow_responses = { max = 5 }");
        assert_eq!(p.responses().and_then(|r| r.expires_ms), Some(120_000));
        assert_eq!(perms("allow_responses = false").responses(), None);
    }

    #[test]
    fn recheck_keeps_the_same_credential_only() {
        let load = |text: &str| {
            let config: AuthorizationConfig = toml::from_str(text).expect("TOML");
            Auth::new(&config).expect("valid").expect("some")
        };
        let old =
            load(r#"users = [ { user = "a", password = "pa" }, { user = "b", password = "pb" } ]"#);
        let connect = |user: &str, pass: &str| options(Some(user), Some(pass), None);
        let a = old.authenticate(&connect("a", "pa"), None).expect("a");
        let b = old.authenticate(&connect("b", "pb"), None).expect("b");
        // Users reordered, b's password changed, a given permissions.
        let new = load(
            r#"users = [ { user = "b", password = "changed" }, { user = "a", password = "pa", permissions = { publish = ["x"] } } ]"#,
        );
        let a2 = new.recheck(&old, &a).expect("same password");
        assert_eq!(a2.user(&new), Some("a"));
        assert!(a2.permissions.is_some());
        assert!(new.recheck(&old, &b).is_err());
        let tokens = load(r#"token = "t1""#);
        let t = tokens
            .authenticate(&options(None, None, Some("t1")), None)
            .expect("token");
        assert!(load(r#"token = "t1""#).recheck(&tokens, &t).is_ok());
        assert!(load(r#"token = "t2""#).recheck(&tokens, &t).is_err());
        assert!(new.recheck(&tokens, &t).is_err(), "token gone");
    }

    #[test]
    fn bad_tables_are_refused() {
        let user = |name: &str, password: &str| UserConfig {
            user: name.into(),
            password: password.into(),
            permissions: None,
            ..UserConfig::default()
        };
        let both = AuthorizationConfig {
            token: Some("t".into()),
            users: vec![user("a", "b")],
        };
        assert_eq!(Auth::new(&both).err(), Some(AuthConfigError::TokenAndUsers));
        let twice = AuthorizationConfig {
            token: None,
            users: vec![user("a", "b"), user("a", "c")],
        };
        assert!(matches!(
            Auth::new(&twice),
            Err(AuthConfigError::DuplicateUser(_))
        ));
        let broken = AuthorizationConfig {
            token: None,
            users: vec![user("a", "$2a$11$notahash")],
        };
        assert!(matches!(
            Auth::new(&broken),
            Err(AuthConfigError::BadBcrypt(_))
        ));
        assert!(Auth::new(&AuthorizationConfig::default())
            .expect("ok")
            .is_none());
        let bad_entry: PermissionsConfig = toml::from_str(r#"publish = ["a b"]"#).expect("parses");
        assert!(
            Permissions::compile("u", &bad_entry).is_err(),
            "queues only for subscribe"
        );
    }
}
