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

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    /// None: one shard per CPU this process may run on.
    pub shards: Option<usize>,
    pub io: IoMode,
    pub placement: Placement,
    pub server_name: Option<String>,
    pub max_payload: usize,
    pub max_pending: usize,
    pub max_control_line: usize,
    pub max_connections: usize,
    /// 0 means unlimited, as in nats-server.
    pub max_subscriptions: usize,
    pub connect_timeout_ms: u64,
    pub ping_interval_ms: u64,
    pub ping_max_outstanding: u32,
    pub log_level: Option<String>,
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
    /// Monitoring over HTTP (nats-server's `/varz`, `/connz`, … and
    /// Prometheus `/metrics`); None: off, as in nats-server.
    pub http: Option<SocketAddr>,
}

/// Device sessions per shard before CONNECTs are refused (NO_RESOURCES).
pub const DEVICE_SESSIONS_PER_SHARD_MAX_DEFAULT: usize = 10_000;

/// The `[device]` table.
#[derive(Clone, Debug, Deserialize)]
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 4222)),
            shards: None,
            io: IoMode::Auto,
            placement: Placement::LeastLoaded,
            server_name: None,
            max_payload: PAYLOAD_BYTES_MAX_DEFAULT,
            max_pending: PENDING_BYTES_MAX_DEFAULT,
            max_control_line: CONTROL_LINE_BYTES_MAX_DEFAULT,
            max_connections: CONNECTIONS_MAX_DEFAULT,
            max_subscriptions: 0,
            connect_timeout_ms: CONNECT_TIMEOUT_MS_DEFAULT,
            ping_interval_ms: PING_INTERVAL_MS_DEFAULT,
            ping_max_outstanding: PINGS_OUTSTANDING_MAX_DEFAULT,
            log_level: None,
            spin_us: 0,
            store_dir: None,
            store_segment_bytes: crate::store::log::SEGMENT_BYTES_MAX_DEFAULT,
            store_durability: Durability::Always,
            store_sync_interval_ms: STORE_SYNC_INTERVAL_MS_DEFAULT,
            store_stream_durability: std::collections::BTreeMap::new(),
            device: DeviceConfig::default(),
            http: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
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
            source,
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
        Ok(())
    }

    /// The shard count to run: the configured one, or the CPUs we may run on.
    pub fn shard_count(&self) -> usize {
        self.shards
            .unwrap_or_else(|| crate::runtime::affinity::allowed_cpus().len().max(1))
            .min(SHARDS_MAX)
    }
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
