//! Decoding and checking the JSON argument of a client's `CONNECT`.
//!
//! Owns: [`ConnectOptions`] with nats-server 2.9.10's defaults and its JSON quirks (Go's
//! `encoding/json`: keys match case-insensitively, the last duplicate wins, `null`
//! leaves a field at its default, unknown keys are ignored, a known key of the wrong
//! type fails, invalid UTF-8 inside strings is replaced rather than rejected), and the
//! two semantic checks nats-server makes after authentication ([`ConnectOptions::check`]).
//!
//! Deliberately does not: authenticate (user/pass/token/nkey/jwt are only carried), know
//! about TLS, or decide connection state. Ordering matters: nats-server checks
//! credentials *between* decoding and [`ConnectOptions::check`], so a session with auth
//! calls [`decode_connect`], authenticates, then `check`; [`parse_connect`] does both
//! steps for sessions without auth.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

/// Highest client protocol nats-server 2.9.10 accepts (1 = "info": async INFO updates).
pub const CLIENT_PROTOCOL_MAX: i64 = 1;

/// What a client asked for in CONNECT. Omitted or `null` fields keep nats-server's
/// defaults: verbose, pedantic and echo are **true** (verified on 2.9.10: `CONNECT {}`
/// gets `+OK` after every op and `-ERR 'Invalid Publish Subject'` for `PUB foo.* 0`;
/// a connection that never sent CONNECT behaves the same).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Send `+OK` after each accepted op.
    pub verbose: bool,
    /// Check publish subjects (`-ERR 'Invalid Publish Subject'`, message still delivered).
    pub pedantic: bool,
    /// The client wants TLS (ignored by nats-server on a plain connection).
    pub tls_required: bool,
    /// Deliver this connection's own publishes to its own subscriptions.
    pub echo: bool,
    /// The client understands HPUB/HMSG.
    pub headers: bool,
    /// The client wants a 503 status message when a request reaches no subscriber.
    pub no_responders: bool,
    /// Client protocol level; only 0 and 1 are accepted (see [`ConnectOptions::check`]).
    pub protocol: i64,
    /// Connection name shown in monitoring.
    pub name: Option<String>,
    /// Client library language.
    pub lang: Option<String>,
    /// Client library version.
    pub version: Option<String>,
    /// Username credential.
    pub user: Option<String>,
    /// Password credential.
    pub pass: Option<String>,
    /// Token credential.
    pub auth_token: Option<String>,
    /// User JWT (decentralised auth).
    pub jwt: Option<String>,
    /// Public NKey.
    pub nkey: Option<String>,
    /// Signature of the server's nonce.
    pub sig: Option<String>,
    /// Account to bind to (only with account-aware auth).
    pub account: Option<String>,
    /// Ask to create the account (only with account-aware auth).
    pub new_account: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            verbose: true,
            pedantic: true,
            tls_required: false,
            echo: true,
            headers: false,
            no_responders: false,
            protocol: 0,
            name: None,
            lang: None,
            version: None,
            user: None,
            pass: None,
            auth_token: None,
            jwt: None,
            nkey: None,
            sig: None,
            account: None,
            new_account: false,
        }
    }
}

/// Why a CONNECT was refused. Every variant ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The argument is not a JSON object (or `null`) of the expected field types.
    #[error("CONNECT argument is not valid JSON of the expected shape")]
    InvalidJson,
    /// `protocol` is outside 0..=1.
    #[error("unsupported client protocol")]
    InvalidProtocol,
    /// `no_responders` without `headers` (the 503 status travels in a header).
    #[error("no_responders requires headers")]
    NoRespondersRequiresHeaders,
}

impl ConnectError {
    /// The exact text nats-server sends in `-ERR '<text>'`, or None if it closes silently.
    pub fn err_text(&self) -> Option<&'static str> {
        match self {
            Self::InvalidJson => None,
            Self::InvalidProtocol => Some("invalid client protocol"),
            Self::NoRespondersRequiresHeaders => Some("no responders requires headers support"),
        }
    }

    /// Whether the reference closes the connection after this error (always).
    pub fn closes_connection(&self) -> bool {
        true
    }
}

impl ConnectOptions {
    /// nats-server's post-authentication checks, in its order.
    pub fn check(&self) -> Result<(), ConnectError> {
        if !(0..=CLIENT_PROTOCOL_MAX).contains(&self.protocol) {
            return Err(ConnectError::InvalidProtocol);
        }
        if self.no_responders && !self.headers {
            return Err(ConnectError::NoRespondersRequiresHeaders);
        }
        Ok(())
    }
}

/// Decodes and checks a CONNECT argument (for sessions without authentication).
pub fn parse_connect(json: &[u8]) -> Result<ConnectOptions, ConnectError> {
    let options = decode_connect(json)?;
    options.check()?;
    Ok(options)
}

/// Decodes a CONNECT argument without the semantic checks (see the module doc for why).
pub fn decode_connect(json: &[u8]) -> Result<ConnectOptions, ConnectError> {
    // Go replaces invalid UTF-8 in strings with U+FFFD instead of failing; serde_json
    // fails, so repair first. Only a misbehaving client pays for the copy.
    let json: Cow<'_, [u8]> = match std::str::from_utf8(json) {
        Ok(_) => Cow::Borrowed(json),
        Err(_) => Cow::Owned(String::from_utf8_lossy(json).into_owned().into_bytes()),
    };
    serde_json::from_slice::<ConnectOptions>(&json).map_err(|_| ConnectError::InvalidJson)
}

impl<'de> Deserialize<'de> for ConnectOptions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // deserialize_any so that `null` (which Go accepts as "all defaults") reaches
        // visit_unit; arrays, numbers and strings are rejected by the visitor.
        deserializer.deserialize_any(ConnectVisitor)
    }
}

struct ConnectVisitor;

impl<'de> Visitor<'de> for ConnectVisitor {
    type Value = ConnectOptions;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a CONNECT JSON object")
    }

    fn visit_unit<E: de::Error>(self) -> Result<ConnectOptions, E> {
        Ok(ConnectOptions::default())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ConnectOptions, A::Error> {
        let mut o = ConnectOptions::default();
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Verbose => set(&mut o.verbose, map.next_value()?),
                Field::Pedantic => set(&mut o.pedantic, map.next_value()?),
                Field::TlsRequired => set(&mut o.tls_required, map.next_value()?),
                Field::Echo => set(&mut o.echo, map.next_value()?),
                Field::Headers => set(&mut o.headers, map.next_value()?),
                Field::NoResponders => set(&mut o.no_responders, map.next_value()?),
                Field::Protocol => set(&mut o.protocol, map.next_value()?),
                Field::NewAccount => set(&mut o.new_account, map.next_value()?),
                Field::Name => set_string(&mut o.name, map.next_value()?),
                Field::Lang => set_string(&mut o.lang, map.next_value()?),
                Field::Version => set_string(&mut o.version, map.next_value()?),
                Field::User => set_string(&mut o.user, map.next_value()?),
                Field::Pass => set_string(&mut o.pass, map.next_value()?),
                Field::AuthToken => set_string(&mut o.auth_token, map.next_value()?),
                Field::Jwt => set_string(&mut o.jwt, map.next_value()?),
                Field::Nkey => set_string(&mut o.nkey, map.next_value()?),
                Field::Sig => set_string(&mut o.sig, map.next_value()?),
                Field::Account => set_string(&mut o.account, map.next_value()?),
                Field::Unknown => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(o)
    }
}

/// Go leaves a field untouched for JSON `null`.
fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

fn set_string(slot: &mut Option<String>, value: Option<String>) {
    if value.is_some() {
        *slot = value;
    }
}

/// CONNECT keys, matched ASCII-case-insensitively like Go's encoding/json.
enum Field {
    Verbose,
    Pedantic,
    TlsRequired,
    Echo,
    Headers,
    NoResponders,
    Protocol,
    NewAccount,
    Name,
    Lang,
    Version,
    User,
    Pass,
    AuthToken,
    Jwt,
    Nkey,
    Sig,
    Account,
    Unknown,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(FieldVisitor)
    }
}

struct FieldVisitor;

impl Visitor<'_> for FieldVisitor {
    type Value = Field;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a CONNECT field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Field, E> {
        const FIELDS: [(&str, Field); 18] = [
            ("verbose", Field::Verbose),
            ("pedantic", Field::Pedantic),
            ("tls_required", Field::TlsRequired),
            ("echo", Field::Echo),
            ("headers", Field::Headers),
            ("no_responders", Field::NoResponders),
            ("protocol", Field::Protocol),
            ("new_account", Field::NewAccount),
            ("name", Field::Name),
            ("lang", Field::Lang),
            ("version", Field::Version),
            ("user", Field::User),
            ("pass", Field::Pass),
            ("auth_token", Field::AuthToken),
            ("jwt", Field::Jwt),
            ("nkey", Field::Nkey),
            ("sig", Field::Sig),
            ("account", Field::Account),
        ];
        for (name, field) in FIELDS {
            if key.eq_ignore_ascii_case(name) {
                return Ok(field);
            }
        }
        Ok(Field::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One case: CONNECT argument, and either the error or a change applied to defaults.
    #[track_caller]
    fn check(json: &str, want: Result<fn(&mut ConnectOptions), ConnectError>) {
        check_bytes(json.as_bytes(), want);
    }

    #[track_caller]
    fn check_bytes(json: &[u8], want: Result<fn(&mut ConnectOptions), ConnectError>) {
        let want = want.map(|edit| {
            let mut o = ConnectOptions::default();
            edit(&mut o);
            o
        });
        assert_eq!(
            parse_connect(json),
            want,
            "{}",
            String::from_utf8_lossy(json)
        );
    }

    #[test]
    fn cases_probed_on_nats_server_2_9_10() {
        check("{}", Ok(|_| {}));
        check("null", Ok(|_| {}));
        check("  {\"verbose\":false}  \r", Ok(|o| o.verbose = false));
        check(
            "{\"verbose\":false,\"pedantic\":false}",
            Ok(|o| (o.verbose, o.pedantic) = (false, false)),
        );
        check(
            "{\"VERBOSE\":false,\"Pedantic\":false}",
            Ok(|o| (o.verbose, o.pedantic) = (false, false)),
        );
        check("{\"verbose\":null}", Ok(|_| {}));
        check(
            "{\"verbose\":true,\"verbose\":false}",
            Ok(|o| o.verbose = false),
        );
        check(
            "{\"zzz\":[1,{\"a\":null}],\"echo\":false}",
            Ok(|o| o.echo = false),
        );
        check("{\"protocol\":1}", Ok(|o| o.protocol = 1));
        check("{\"tls_required\":true}", Ok(|o| o.tls_required = true));
        check(
            "{\"headers\":true,\"no_responders\":true}",
            Ok(|o| (o.headers, o.no_responders) = (true, true)),
        );
        check(
            "{\"name\":\"n\",\"lang\":\"go\",\"version\":\"1.2\",\"user\":\"u\",\"pass\":\"p\"}",
            Ok(|o| {
                o.name = Some("n".into());
                o.lang = Some("go".into());
                o.version = Some("1.2".into());
                o.user = Some("u".into());
                o.pass = Some("p".into());
            }),
        );
        check_bytes(
            b"{\"name\":\"\xff\"}",
            Ok(|o| o.name = Some("\u{fffd}".into())),
        );
        check("", Err(ConnectError::InvalidJson));
        check("{bad", Err(ConnectError::InvalidJson));
        check("[]", Err(ConnectError::InvalidJson));
        check("{\"verbose\":false} x", Err(ConnectError::InvalidJson));
        check("{\"verbose\":\"x\"}", Err(ConnectError::InvalidJson));
        check("{\"verbose\":0}", Err(ConnectError::InvalidJson));
        check("{\"protocol\":1.0}", Err(ConnectError::InvalidJson));
        check("{\"protocol\":\"1\"}", Err(ConnectError::InvalidJson));
        check(
            "{\"protocol\":99999999999999999999}",
            Err(ConnectError::InvalidJson),
        );
        check("{\"name\":5}", Err(ConnectError::InvalidJson));
        check("{\"protocol\":2}", Err(ConnectError::InvalidProtocol));
        check("{\"protocol\":-1}", Err(ConnectError::InvalidProtocol));
        check(
            "{\"protocol\":2,\"no_responders\":true}",
            Err(ConnectError::InvalidProtocol),
        );
        check(
            "{\"no_responders\":true}",
            Err(ConnectError::NoRespondersRequiresHeaders),
        );
    }

    #[test]
    fn error_texts() {
        assert_eq!(ConnectError::InvalidJson.err_text(), None);
        assert_eq!(
            ConnectError::InvalidProtocol.err_text(),
            Some("invalid client protocol")
        );
        assert!(ConnectError::NoRespondersRequiresHeaders.closes_connection());
    }
}
