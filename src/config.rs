//! The broker's configuration: one TOML file, every key also a command-line flag,
//! flags winning over the file. Limits carry their unit in the name and are
//! checked together here, once, before any shard starts.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use crate::runtime::io::IoMode;
use crate::store::Durability;

/// nats-server's defaults, kept so that clients tuned for it behave the same.
pub const PAYLOAD_BYTES_MAX_DEFAULT: usize = 1 << 20;
pub const PENDING_BYTES_MAX_DEFAULT: usize = 64 << 20;
pub const CONTROL_LINE_BYTES_MAX_DEFAULT: usize = 4096;
pub const CONNECTIONS_MAX_DEFAULT: usize = 64 * 1024;
pub const PING_INTERVAL_MS_DEFAULT: u64 = 120_000;
pub const PINGS_OUTSTANDING_MAX_DEFAULT: u32 = 2;
/// A client must send CONNECT within this long after the INFO (nats-server's
/// auth timeout), so half-open sockets cannot pile up.
pub const CONNECT_TIMEOUT_MS_DEFAULT: u64 = 2_000;
/// Busy-polling longer than this after activity only burns CPU.
pub const SPIN_US_MAX: u64 = 10_000;
/// `interval` durability: how often unsynced writes are made durable.
pub const STORE_SYNC_INTERVAL_MS_DEFAULT: u64 = 1_000;
/// Smaller segments would mean a file (and a directory sync) every few messages.
pub const STORE_SEGMENT_BYTES_MIN: u64 = 64 * 1024;
/// Shards are addressed by bit in 64-bit interest masks.
pub const SHARDS_MAX: usize = 64;

const _: () = assert!(PAYLOAD_BYTES_MAX_DEFAULT <= PENDING_BYTES_MAX_DEFAULT);

/// How shard 0 hands accepted sockets to shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// The shard with the fewest connections (the default).
    LeastLoaded,
    /// Connection i goes to shard i mod N: deterministic, for tests.
    RoundRobin,
}

/// Whether established connections move between shards
/// (`runtime/moves.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AffinityMode {
    /// A publisher whose stream of messages (over 100 000 a second, in
    /// batches) all goes to subscribers on one other shard moves there (the
    /// default: it halves the broker's CPU per message, BENCHMARKS.md).
    #[default]
    Flows,
    /// As `flows`, and request-reply partners move onto one shard too. Not
    /// the default: on the 2-vCPU VM it was measured on, partners on one
    /// shard made round trips slower, not faster (BENCHMARKS.md).
    Auto,
    /// Connections stay where they were placed.
    Off,
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event (the default).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    /// None: one shard per CPU this process may run on.
    pub shards: Option<usize>,
    pub io: IoMode,
    pub placement: Placement,
    /// Connection affinity: `flows` (the default) moves a high-rate publisher
    /// to its subscribers' shard, `auto` also request-reply partners, `off`
    /// keeps placement as it was.
    pub affinity: AffinityMode,
    pub server_name: Option<String>,
    pub max_payload: usize,
    pub max_pending: usize,
    pub max_control_line: usize,
    pub max_connections: usize,
    /// New connections a second from one IP address (bursts up to this
    /// many); 0: no limit. Over it, a connection is closed before INFO.
    pub connection_rate_per_ip: u32,
    /// 0 means unlimited, as in nats-server.
    pub max_subscriptions: usize,
    pub connect_timeout_ms: u64,
    pub ping_interval_ms: u64,
    pub ping_max_outstanding: u32,
    pub log_level: Option<String>,
    pub log_format: LogFormat,
    /// epoll backend: busy-poll this long after activity before sleeping (0 = never).
    pub spin_us: u64,
    /// Where streams are stored; None: JetStream is off (API requests get the
    /// 503 no-responders status, as from nats-server without `-js`).
    pub store_dir: Option<std::path::PathBuf>,
    /// Size of each stream segment file, preallocated when it is created.
    pub store_segment_bytes: u64,
    /// When a stream's writes reach the disk before they are acknowledged:
    /// `always` (fdatasync before every ack, group-committed), `interval`
    /// (acked at once, synced every `store_sync_interval_ms`), `none` (synced
    /// only at segment rolls, deletions and a clean shutdown).
    pub store_durability: Durability,
    pub store_sync_interval_ms: u64,
    /// Per-stream exceptions to `store_durability`, by stream name.
    pub store_stream_durability: std::collections::BTreeMap<String, Durability>,
    /// The compact device protocol (docs/device-protocol.md); off unless an
    /// address is given.
    pub device: DeviceConfig,
    /// `[authorization]`: a token or users with permissions; empty: no auth.
    pub authorization: crate::auth::AuthorizationConfig,
    /// Monitoring over HTTP (nats-server's `/varz`, `/connz`, … and
    /// Prometheus `/metrics`); None: off, as in nats-server.
    pub http: Option<SocketAddr>,
    /// `[tls]`: TLS on the NATS listener (on when `cert` is set).
    pub tls: crate::tls::TlsConfig,
}

/// Device sessions per shard before CONNECTs are refused (NO_RESOURCES).
pub const DEVICE_SESSIONS_PER_SHARD_MAX_DEFAULT: usize = 10_000;

/// The `[device]` table.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceConfig {
    /// UDP address for devices (one frame per datagram); None: off.
    pub udp: Option<SocketAddr>,
    /// TCP address for devices (varint-length-prefixed frames); None: off.
    pub tcp: Option<SocketAddr>,
    /// Serial lines (`[[device.serial]]`), COBS frames with a CRC.
    pub serial: Vec<SerialLineConfig>,
    /// Device sessions per shard.
    pub sessions_max: usize,
    /// Predefined topic ids: `"1" = "sensors.{client}.temp"`.
    pub predefined: std::collections::BTreeMap<String, String>,
    /// Refuse every device that does not seal its frames with a key
    /// (docs/device-protocol.md §9); false: keyed devices must, others may not.
    pub require_key: bool,
    /// Permissions of every device session without its own, `{client}`
    /// replaced by its client id; None: everything allowed.
    pub default_permissions: Option<crate::auth::PermissionsConfig>,
    /// Devices with keys (`[[device.clients]]`).
    pub clients: Vec<DeviceClientConfig>,
}

/// One `[[device.clients]]` entry: a device's key and its permissions.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceClientConfig {
    /// The device's client id (CONNECT's, and the envelope's).
    pub client: String,
    /// The 32-byte key as 64 hex digits; or `key_file`.
    #[serde(default)]
    pub key: Option<String>,
    /// A file holding the 64 hex digits (whitespace around them ignored).
    #[serde(default)]
    pub key_file: Option<std::path::PathBuf>,
    /// This device's permissions instead of `default_permissions`.
    #[serde(default)]
    pub permissions: Option<crate::auth::PermissionsConfig>,
}

impl std::fmt::Debug for DeviceClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceClientConfig")
            .field("client", &self.client)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("key_file", &self.key_file)
            .field("permissions", &self.permissions)
            .finish()
    }
}

/// One `[[device.serial]]` entry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SerialLineConfig {
    pub path: std::path::PathBuf,
    #[serde(default = "default_baud")]
    pub baud: u32,
}

fn default_baud() -> u32 {
    115_200
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            udp: None,
            tcp: None,
            serial: Vec::new(),
            sessions_max: DEVICE_SESSIONS_PER_SHARD_MAX_DEFAULT,
            predefined: std::collections::BTreeMap::new(),
            require_key: false,
            default_permissions: None,
            clients: Vec::new(),
        }
    }
}

impl DeviceConfig {
    /// The predefined table with numeric ids, checked.
    pub fn predefined_table(&self) -> Result<crate::lite::predefined::Predefined, ConfigError> {
        let mut entries = std::collections::BTreeMap::new();
        for (id, template) in &self.predefined {
            let id: u32 = id.parse().map_err(|_| {
                ConfigError::Invalid(format!(
                    "device.predefined: {id:?} is not a topic id (1..=4294967295)"
                ))
            })?;
            entries.insert(id, template.clone());
        }
        crate::lite::predefined::Predefined::new(&entries)
            .map_err(|e| ConfigError::Invalid(format!("device.predefined: {e}")))
    }

    /// The device keys and permissions, checked and compiled (key files read).
    pub fn credentials(&self) -> Result<crate::lite::credentials::Credentials, ConfigError> {
        crate::lite::credentials::Credentials::new(self)
            .map_err(|e| ConfigError::Invalid(format!("device: {e}")))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 4222)),
            shards: None,
            io: IoMode::Auto,
            placement: Placement::LeastLoaded,
            affinity: AffinityMode::Flows,
            server_name: None,
            max_payload: PAYLOAD_BYTES_MAX_DEFAULT,
            max_pending: PENDING_BYTES_MAX_DEFAULT,
            max_control_line: CONTROL_LINE_BYTES_MAX_DEFAULT,
            max_connections: CONNECTIONS_MAX_DEFAULT,
            connection_rate_per_ip: 0,
            max_subscriptions: 0,
            connect_timeout_ms: CONNECT_TIMEOUT_MS_DEFAULT,
            ping_interval_ms: PING_INTERVAL_MS_DEFAULT,
            ping_max_outstanding: PINGS_OUTSTANDING_MAX_DEFAULT,
            log_level: None,
            log_format: LogFormat::Text,
            spin_us: 0,
            store_dir: None,
            store_segment_bytes: crate::store::log::SEGMENT_BYTES_MAX_DEFAULT,
            store_durability: Durability::Always,
            store_sync_interval_ms: STORE_SYNC_INTERVAL_MS_DEFAULT,
            store_stream_durability: std::collections::BTreeMap::new(),
            device: DeviceConfig::default(),
            authorization: crate::auth::AuthorizationConfig::default(),
            http: None,
            tls: crate::tls::TlsConfig::default(),
        }
    }
}

/// The limits a running broker takes from a reloaded config (SIGHUP): every
/// shard applies them to its live connections, none is dropped for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_payload: usize,
    pub max_pending: usize,
    pub max_control_line: usize,
    pub max_connections: usize,
    pub connection_rate_per_ip: u32,
    pub max_subscriptions: usize,
    pub connect_timeout_ms: u64,
    pub ping_interval_ms: u64,
    pub ping_max_outstanding: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema. `detail` says where and
    /// why, without quoting the file (see [`describe_parse_error`]).
    #[error("invalid config file {path}: {detail}")]
    Parse { path: String, detail: String },
    /// A value is out of range or contradicts another.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            detail: describe_parse_error(&text, &source),
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks the limits against each other. Called once after flags are merged.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        if let Some(shards) = self.shards {
            if shards == 0 || shards > SHARDS_MAX {
                return invalid(format!("shards must be 1..={SHARDS_MAX}, got {shards}"));
            }
        }
        if self.max_payload == 0 {
            return invalid("max_payload must be positive".into());
        }
        if self.max_payload > self.max_pending {
            return invalid(format!(
                "max_payload ({}) may not exceed max_pending ({})",
                self.max_payload, self.max_pending
            ));
        }
        self.auth()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.max_control_line < 32 {
            return invalid("max_control_line must be at least 32 bytes".into());
        }
        if self.max_connections == 0 {
            return invalid("max_connections must be positive".into());
        }
        if self.ping_interval_ms == 0 || self.ping_max_outstanding == 0 {
            return invalid("ping_interval_ms and ping_max_outstanding must be positive".into());
        }
        if self.spin_us > SPIN_US_MAX {
            return invalid(format!("spin_us must be at most {SPIN_US_MAX}"));
        }
        if self.store_segment_bytes < STORE_SEGMENT_BYTES_MIN {
            return invalid(format!(
                "store_segment_bytes must be at least {STORE_SEGMENT_BYTES_MIN}"
            ));
        }
        if self.store_sync_interval_ms == 0 {
            return invalid("store_sync_interval_ms must be positive".into());
        }
        if self.connect_timeout_ms == 0 {
            return invalid("connect_timeout_ms must be positive".into());
        }
        if self.device.sessions_max == 0 {
            return invalid("device.sessions_max must be at least 1".into());
        }
        self.device.predefined_table()?;
        // Reads the files too: a missing file or a key that does not match
        // its certificate stops the start (or the reload) here.
        crate::tls::TlsSettings::load(&self.tls)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.tls.map && self.authorization.users.is_empty() {
            return invalid(
                "tls.map selects users of [[authorization.users]] by certificate, but none is configured"
                    .into(),
            );
        }
        crate::lite::credentials::Credentials::check(&self.device)
            .map_err(|e| ConfigError::Invalid(format!("device: {e}")))?;
        Ok(())
    }

    /// The limits a reload may change on a running broker.
    /// `[authorization]` compiled (with `tls.map`, users may have no
    /// password: their certificate selects them); None: no authentication.
    pub fn auth(&self) -> Result<Option<crate::auth::Auth>, crate::auth::AuthConfigError> {
        if self.tls.map {
            crate::auth::Auth::with_certificate_users(&self.authorization)
        } else {
            crate::auth::Auth::new(&self.authorization)
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_payload: self.max_payload,
            max_pending: self.max_pending,
            max_control_line: self.max_control_line,
            max_connections: self.max_connections,
            connection_rate_per_ip: self.connection_rate_per_ip,
            max_subscriptions: self.max_subscriptions,
            connect_timeout_ms: self.connect_timeout_ms,
            ping_interval_ms: self.ping_interval_ms,
            ping_max_outstanding: self.ping_max_outstanding,
        }
    }

    /// The keys of `new` that differ from `self` but cannot change while the
    /// broker runs (sockets are bound, shards started, the store open): a reload
    /// that would change any of them is refused whole.
    ///
    /// Every field is named here, so a new key must be sorted into "reloadable"
    /// or "fixed" before this compiles.
    pub fn fixed_keys_changed(&self, new: &Config) -> Vec<&'static str> {
        let Config {
            listen,
            shards,
            io,
            placement,
            affinity,
            server_name,
            max_payload: _,
            max_pending: _,
            max_control_line: _,
            max_connections: _,
            connection_rate_per_ip: _,
            max_subscriptions: _,
            connect_timeout_ms: _,
            ping_interval_ms: _,
            ping_max_outstanding: _,
            log_level: _,
            log_format,
            spin_us,
            store_dir,
            store_segment_bytes,
            store_durability,
            store_sync_interval_ms,
            store_stream_durability,
            device,
            // Reloadable: every shard checks its live sessions against the
            // new users and permissions (Session::reauthorize).
            authorization: _,
            // Bound before the shards start.
            http,
            // Files, verify, handshake_first and timeout_ms reload (new
            // handshakes use them); turning TLS on or off and `map` (which
            // decides how users authenticate) need a restart.
            tls,
        } = new;
        let mut changed = Vec::new();
        let mut check = |key: &'static str, same: bool| {
            if !same {
                changed.push(key);
            }
        };
        check("listen", *listen == self.listen);
        check("shards", *shards == self.shards);
        check("io", *io == self.io);
        check("placement", *placement == self.placement);
        check("affinity", *affinity == self.affinity);
        check("server_name", *server_name == self.server_name);
        check("log_format", *log_format == self.log_format);
        check("spin_us", *spin_us == self.spin_us);
        check("store_dir", *store_dir == self.store_dir);
        check(
            "store_segment_bytes",
            *store_segment_bytes == self.store_segment_bytes,
        );
        check(
            "store_durability",
            *store_durability == self.store_durability,
        );
        check(
            "store_sync_interval_ms",
            *store_sync_interval_ms == self.store_sync_interval_ms,
        );
        check(
            "store_stream_durability",
            *store_stream_durability == self.store_stream_durability,
        );
        check("http", *http == self.http);
        check("tls", tls.enabled() == self.tls.enabled());
        check("tls.map", tls.map == self.tls.map);
        check("device.udp", device.udp == self.device.udp);
        check("device.tcp", device.tcp == self.device.tcp);
        check("device.serial", device.serial == self.device.serial);
        check(
            "device.sessions_max",
            device.sessions_max == self.device.sessions_max,
        );
        check(
            "device.predefined",
            device.predefined == self.device.predefined,
        );
        // Keys and permissions are compiled once at start (as authorization).
        check(
            "device.require_key",
            device.require_key == self.device.require_key,
        );
        check(
            "device.default_permissions",
            device.default_permissions == self.device.default_permissions,
        );
        check("device.clients", device.clients == self.device.clients);
        changed
    }

    /// The shard count to run: the configured one, or the CPUs we may run on.
    pub fn shard_count(&self) -> usize {
        self.shards
            .unwrap_or_else(|| crate::runtime::affinity::allowed_cpus().len().max(1))
            .min(SHARDS_MAX)
    }
}

/// "line 7, column 12: <what is wrong>" for a TOML error in `text`. The
/// offending line is not quoted (toml's own rendering does), and inside
/// `[authorization]` every quoted or backticked value in the message is
/// elided too: a secret (password, token) must not reach a log because it
/// was mistyped.
pub fn describe_parse_error(text: &str, error: &toml::de::Error) -> String {
    let mut message = error.message().trim().to_string();
    let Some(span) = error.span() else {
        return message;
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    let line_text = text.lines().nth(line - 1).unwrap_or("");
    let section = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .unwrap_or("");
    if section.starts_with("[authorization") || line_text.contains("authorization") {
        message = elide_values(&message);
    }
    format!("line {line}, column {column}: {message}")
}

/// Replaces what is between backticks or double quotes with `…`.
fn elide_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut open: Option<char> = None;
    for c in message.chars() {
        match open {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                open = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '`' || c == '"' {
                    open = Some(c);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_reference() {
        let config = Config::default();
        config.validate().expect("defaults valid");
        assert_eq!(config.max_payload, 1048576);
        assert_eq!(config.listen.port(), 4222);
    }

    #[test]
    fn toml_keys_parse_and_unknown_keys_are_rejected() {
        let config = Config::from_toml(
            "listen = \"127.0.0.1:5000\"\nshards = 3\nio = \"epoll\"\nmax_payload = 2048\n",
        )
        .expect("parse");
        assert_eq!(config.shards, Some(3));
        assert_eq!(config.io, IoMode::Epoll);
        assert_eq!(config.max_payload, 2048);
        assert!(Config::from_toml("max_paylod = 1").is_err());
        let config = Config::from_toml("http = \"127.0.0.1:8222\"\n").expect("parse");
        assert_eq!(config.http, Some(SocketAddr::from(([127, 0, 0, 1], 8222))));
        assert_eq!(Config::default().http, None, "monitoring is off by default");
    }

    /// The store keys as README's example writes them.
    #[test]
    fn store_keys_parse() {
        let config = Config::from_toml(
            "store_dir = \"/var/lib/perch\"\nstore_durability = \"always\"\n\
             store_sync_interval_ms = 250\nstore_segment_bytes = 1048576\n\
             [store_stream_durability]\nDEBUG_TRACES = \"none\"\nTELEMETRY = \"interval\"\n",
        )
        .expect("parse");
        config.validate().expect("valid");
        assert_eq!(
            config.store_dir.as_deref(),
            Some(std::path::Path::new("/var/lib/perch"))
        );
        assert_eq!(config.store_durability, Durability::Always);
        assert_eq!(config.store_sync_interval_ms, 250);
        assert_eq!(config.store_segment_bytes, 1 << 20);
        assert_eq!(
            config.store_stream_durability.get("DEBUG_TRACES"),
            Some(&Durability::None)
        );
        assert_eq!(
            config.store_stream_durability.get("TELEMETRY"),
            Some(&Durability::Interval)
        );
        assert!(Config::from_toml("store_durability = \"sometimes\"").is_err());
        let tiny = Config {
            store_segment_bytes: 4096,
            ..Config::default()
        };
        assert!(
            tiny.validate().is_err(),
            "segments below 64 KiB are refused"
        );
    }

    /// The packaged /etc/perch/perch.toml (cross/deb/perch.toml): "#key = value"
    /// lines are defaults, "# key = value" lines examples.
    const PACKAGED_CONFIG: &str = include_str!("../cross/deb/perch.toml");

    /// The file with its "#key = value" / "#[table]" lines uncommented, and with
    /// `examples` also its "# key = value" / "# [table]" lines.
    fn uncommented(examples: bool) -> String {
        let is_setting = |rest: &str| {
            rest.starts_with('[')
                || rest.split_once(" = ").is_some_and(|(key, _)| {
                    !key.is_empty()
                        && key
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '"')
                })
        };
        PACKAGED_CONFIG
            .lines()
            .map(|line| match line.strip_prefix('#') {
                Some(rest) if is_setting(rest) => rest.to_string(),
                Some(rest) if examples && rest.starts_with(' ') && is_setting(&rest[1..]) => {
                    rest[1..].to_string()
                }
                _ => line.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn packaged_config_states_the_true_defaults() {
        let as_shipped = Config::from_toml(PACKAGED_CONFIG).expect("the shipped file parses");
        let defaults = Config::from_toml(&uncommented(false)).expect("its defaults parse");
        defaults.validate().expect("its defaults are valid");
        let expected = format!("{:?}", Config::default());
        assert_eq!(format!("{as_shipped:?}"), expected);
        assert_eq!(
            format!("{defaults:?}"),
            expected,
            "a commented default is wrong"
        );
        // Uncommenting every example too must still give a valid config.
        let examples = Config::from_toml(&uncommented(true)).expect("its examples parse");
        examples.validate().expect("its examples are valid");
        assert_ne!(
            format!("{examples:?}"),
            expected,
            "the examples change nothing"
        );
    }

    /// Every key of the config schema is shown in the packaged file, so an
    /// operator finds each one there (new keys must be added to it).
    #[test]
    fn packaged_config_shows_every_key() {
        let debug = format!("{:#?}", Config::default());
        let mut keys = Vec::new();
        let mut table = "";
        for line in debug.lines() {
            let indent = line.len() - line.trim_start().len();
            let Some((name, _)) = line.trim_start().split_once(':') else {
                continue;
            };
            if indent == 4 {
                table = name;
                keys.push(name.to_string());
            } else if indent == 8 && table == "device" {
                keys.push(name.to_string());
            }
        }
        assert!(keys.len() > 20, "parsed too few keys from {debug}");
        let text = uncommented(true);
        for key in keys {
            let shown = text
                .lines()
                .any(|l| l.starts_with(&format!("{key} = ")) || l == format!("[{key}]"))
                || text.contains(&format!("[device.{key}]"))
                || text.contains(&format!("[[device.{key}]]"));
            assert!(shown, "cross/deb/perch.toml does not show `{key}`");
        }
    }

    /// A reload may change limits and the log level; everything bound or opened
    /// at start is named when it differs.
    #[test]
    fn fixed_keys_are_named_and_limits_are_not() {
        let old = Config::default();
        let limits_only = Config {
            max_payload: 2048,
            max_pending: 4096,
            max_connections: 3,
            ping_interval_ms: 500,
            log_level: Some("debug".into()),
            ..Config::default()
        };
        assert_eq!(old.fixed_keys_changed(&limits_only), Vec::<&str>::new());
        assert_eq!(limits_only.limits().max_payload, 2048);
        let moved = Config {
            listen: "127.0.0.1:1".parse().expect("addr"),
            shards: Some(3),
            store_dir: Some("/tmp/x".into()),
            device: DeviceConfig {
                udp: Some("127.0.0.1:2".parse().expect("addr")),
                ..DeviceConfig::default()
            },
            ..limits_only
        };
        assert_eq!(
            old.fixed_keys_changed(&moved),
            ["listen", "shards", "store_dir", "device.udp"]
        );
        // TLS: new files, verify, handshake_first and the timeout reload;
        // turning TLS on or off, and map, do not.
        let tls = |cert: &str, verify: bool, map: bool| Config {
            tls: crate::tls::TlsConfig {
                cert: (!cert.is_empty()).then(|| cert.into()),
                key: (!cert.is_empty()).then(|| "k.pem".into()),
                verify,
                map,
                timeout_ms: 500,
                ..crate::tls::TlsConfig::default()
            },
            ..Config::default()
        };
        let running = tls("a.pem", false, false);
        assert!(running
            .fixed_keys_changed(&tls("b.pem", true, false))
            .is_empty());
        assert_eq!(running.fixed_keys_changed(&tls("", false, false)), ["tls"]);
        assert_eq!(
            running.fixed_keys_changed(&tls("a.pem", true, true)),
            ["tls.map"]
        );
    }

    #[test]
    fn payload_above_pending_is_rejected() {
        let config = Config {
            max_payload: 10,
            max_pending: 5,
            ..Config::default()
        };
        assert!(config.validate().is_err());
    }
}
