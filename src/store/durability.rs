//! When a stream's appends reach the disk: [`Durability`], a per-stream setting (the
//! TOML values `"always"`, `"interval"` and `"none"`).
//!
//! Owns: the names and what each mode promises. The log offers both paths
//! (`Log::append` syncs before it returns, `Log::append_unsynced` does not, `Log::sync`
//! syncs what is pending); the stream picks one per commit, and the runtime calls
//! `sync` on a timer in `interval` mode. Deliberately does not: keep a timer.
//!
//! In every mode: deletions (purges, per-message deletes) sync the pending appends
//! first and are themselves synced before they are acknowledged; a segment roll syncs
//! the segment it seals (recovery relies on every sealed segment being whole); a
//! failed `fdatasync` fails the log for good. On a disk that persists each file's
//! writes in order, a crash in any mode loses only what was not synced and leaves no
//! corruption: a torn write is cut off at open.

use std::fmt;
use std::str::FromStr;

/// When appends are synced to disk.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// One write and one `fdatasync` per batch before any of it is acknowledged: an
    /// acknowledged message survives a power cut. The default.
    #[default]
    Always,
    /// Appends are written and acknowledged at once and synced when the owner calls
    /// `sync` (every N ms): a power cut loses at most what was appended since the last
    /// sync that returned `Ok`.
    Interval,
    /// Appends are never synced on their own, only at segment rolls, before a deletion
    /// and at a clean close: a power cut may lose everything since then, but the log
    /// still recovers cleanly.
    None,
}

impl Durability {
    /// The config value: `always`, `interval` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Always => "always",
            Durability::Interval => "interval",
            Durability::None => "none",
        }
    }

    /// Whether an append is synced before it is acknowledged.
    pub fn syncs_every_append(self) -> bool {
        self == Durability::Always
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A durability name that is none of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown durability {0:?}: expected \"always\", \"interval\" or \"none\"")]
pub struct UnknownDurability(pub String);

impl FromStr for Durability {
    type Err = UnknownDurability;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        [Durability::Always, Durability::Interval, Durability::None]
            .into_iter()
            .find(|mode| mode.as_str() == text)
            .ok_or_else(|| UnknownDurability(text.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, serde::Serialize, PartialEq)]
    struct Section {
        #[serde(default)]
        durability: Durability,
    }

    #[test]
    fn toml_values() {
        for (text, want) in [
            ("always", Durability::Always),
            ("interval", Durability::Interval),
            ("none", Durability::None),
        ] {
            let section: Section = toml::from_str(&format!("durability = \"{text}\"")).unwrap();
            assert_eq!(section.durability, want);
            let written = toml::to_string(&section).unwrap();
            assert_eq!(written.trim(), format!("durability = \"{text}\""));
            assert_eq!(text.parse::<Durability>(), Ok(want));
            assert_eq!(want.to_string(), text);
        }
        let section: Section = toml::from_str("").unwrap();
        assert_eq!(section.durability, Durability::Always);
        assert!(toml::from_str::<Section>("durability = \"Always\"").is_err());
        assert!(toml::from_str::<Section>("durability = \"fsync\"").is_err());
        assert_eq!(
            "sometimes".parse::<Durability>().unwrap_err().to_string(),
            "unknown durability \"sometimes\": expected \"always\", \"interval\" or \"none\""
        );
    }
}
