//! Where streams live in a store directory: `DIR/streams/<stream-name>/` is one
//! stream's log (see docs/store-format.md, "Store directory"), and which names may
//! become directory names.
//!
//! Owns: validating stream names, mapping a name to its directory, and listing the
//! streams a store holds. Deliberately does not: open logs, create directories, or
//! know anything about a stream beyond its name.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The subdirectory of a store directory that holds one directory per stream.
pub const STREAMS_DIR_NAME: &str = "streams";
/// The longest stream name: the most a file name may have on Linux file systems.
pub const STREAM_NAME_BYTES_MAX: usize = 255;

/// Why a stream name cannot be used: the caller's input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamNameError {
    /// The name is empty.
    #[error("stream name is empty")]
    Empty,
    /// The name is longer than a file name may be.
    #[error("stream name of {bytes} bytes is longer than {STREAM_NAME_BYTES_MAX} bytes")]
    TooLong { bytes: usize },
    /// The name holds a character that is a subject token separator or wildcard
    /// (`.`, `*`, `>`), a path separator (`/`, `\`), whitespace or a control character.
    #[error("stream name {name:?} contains {found:?}")]
    ForbiddenChar { name: String, found: char },
}

/// Checks a stream name: non-empty, at most [`STREAM_NAME_BYTES_MAX`] bytes, and none
/// of `.`, `*`, `>` (JetStream forbids them: stream names appear as subject tokens),
/// `/` or `\` (nats-server refuses path separators too, and `/` would leave the
/// streams directory), whitespace or control characters (NUL cannot be in a path).
pub fn validate_stream_name(name: &str) -> Result<(), StreamNameError> {
    if name.is_empty() {
        return Err(StreamNameError::Empty);
    }
    if name.len() > STREAM_NAME_BYTES_MAX {
        return Err(StreamNameError::TooLong { bytes: name.len() });
    }
    let forbidden = |c: char| matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace();
    if let Some(found) = name.chars().find(|&c| forbidden(c) || c.is_control()) {
        return Err(StreamNameError::ForbiddenChar {
            name: name.to_string(),
            found,
        });
    }
    Ok(())
}

/// The directory of stream `name` in the store at `root`: `root/streams/name`.
pub fn stream_dir(root: &Path, name: &str) -> Result<PathBuf, StreamNameError> {
    validate_stream_name(name)?;
    Ok(root.join(STREAMS_DIR_NAME).join(name))
}

/// The names of the streams in the store at `root`, sorted: the subdirectories of
/// `root/streams` whose names are valid stream names. Anything else there is not a
/// stream's and is skipped. A missing `root/streams` is a `NotFound` error: `root`
/// is then no store.
pub fn list_streams(root: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(root.join(STREAMS_DIR_NAME))? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        // A name that is not UTF-8 cannot be a stream's.
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if validate_stream_name(&name).is_ok() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, want: &str) {
        let got = match validate_stream_name(name) {
            Ok(()) => "ok".to_string(),
            Err(error) => error.to_string(),
        };
        assert_eq!(got, want, "{name:?}");
    }

    #[test]
    fn names() {
        check("ORDERS", "ok");
        check("dev-42_telemetry", "ok");
        check("ünïcode", "ok");
        check(&"a".repeat(255), "ok");
        check("", "stream name is empty");
        check(
            &"a".repeat(256),
            "stream name of 256 bytes is longer than 255 bytes",
        );
        check("a.b", r#"stream name "a.b" contains '.'"#);
        check("..", r#"stream name ".." contains '.'"#);
        check("a*", r#"stream name "a*" contains '*'"#);
        check("a>", r#"stream name "a>" contains '>'"#);
        check("a/b", r#"stream name "a/b" contains '/'"#);
        check(r"a\b", r#"stream name "a\\b" contains '\\'"#);
        check("a b", r#"stream name "a b" contains ' '"#);
        check("a\tb", r#"stream name "a\tb" contains '\t'"#);
        check("a\u{a0}b", r#"stream name "a\u{a0}b" contains '\u{a0}'"#);
        check("a\0b", r#"stream name "a\0b" contains '\0'"#);
    }

    #[test]
    fn dirs_and_listing() {
        let root = std::env::temp_dir().join(format!("perch-store-streams-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        assert_eq!(
            list_streams(&root).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            stream_dir(&root, "ORDERS").unwrap(),
            root.join("streams/ORDERS")
        );
        assert!(stream_dir(&root, "../etc").is_err());
        for name in ["B", "A", "not.a.stream"] {
            fs::create_dir_all(root.join("streams").join(name)).unwrap();
        }
        fs::write(root.join("streams/FILE"), b"").unwrap();
        assert_eq!(list_streams(&root).unwrap(), ["A", "B"]);
        fs::remove_dir_all(&root).unwrap();
    }
}
