//! The purge floor: one small file per log, `purge-floor`, holding the sequence below
//! which every record is deleted, and below which no sequence is ever assigned again.
//! It makes a purge survive a restart, and lets a purge past the end move the next
//! sequence (nats-server's compact). See docs/store-format.md for its bytes.
//!
//! Owns: encoding, decoding (CRC-checked) and replacing the file atomically — write a
//! temporary file, sync it, rename it over `purge-floor`, sync the directory — so a
//! crash leaves either the old floor or the new one, never a torn one.
//!
//! Deliberately does not: decide when the floor moves or what it hides (the log does),
//! or record deletions that are not a prefix of the log.

use super::error::{Corruption, StoreError};
use super::file::{Directory, StorageFile};

/// The floor's file name; a log without it has floor 1 (nothing purged).
pub const FLOOR_FILE_NAME: &str = "purge-floor";
/// Where a new floor is written before it is renamed over the old one. One left over
/// by a crash was never renamed, so it is not the floor: the log removes it at open.
pub const FLOOR_TEMP_FILE_NAME: &str = "purge-floor.tmp";
/// crc32c u32, version u32, floor u64.
pub const FLOOR_BYTES: usize = 16;
const FLOOR_VERSION: u32 = 1;
/// The CRC covers everything after itself.
const CRC_START: usize = 4;

/// The floor of a log that was never purged durably.
pub const FLOOR_NONE: u64 = 1;

/// The file's bytes for floor `seq`.
pub fn encode_floor(seq: u64) -> [u8; FLOOR_BYTES] {
    assert!(seq >= FLOOR_NONE, "sequences start at 1");
    let mut bytes = [0u8; FLOOR_BYTES];
    bytes[4..8].copy_from_slice(&FLOOR_VERSION.to_le_bytes());
    bytes[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[CRC_START..]);
    bytes[0..4].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// The floor in a file's bytes, or why they are not one.
pub fn decode_floor(bytes: &[u8]) -> Result<u64, Corruption> {
    let bad = |reason| Corruption::BadPurgeFloor { reason };
    if bytes.len() != FLOOR_BYTES {
        return Err(bad("wrong length"));
    }
    let field = |at: usize| -> [u8; 4] { [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]] };
    let stored = u32::from_le_bytes(field(0));
    if stored != crc32c::crc32c(&bytes[CRC_START..]) {
        return Err(bad("crc mismatch"));
    }
    if u32::from_le_bytes(field(4)) != FLOOR_VERSION {
        return Err(bad("unknown version"));
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[8..16]);
    let seq = u64::from_le_bytes(seq);
    if seq < FLOOR_NONE {
        return Err(bad("sequence 0"));
    }
    Ok(seq)
}

/// Reads the floor of the log in `dir`, whose file names are `names`; [`FLOOR_NONE`]
/// when there is no floor file. Changes nothing on disk.
pub fn read_floor<D: Directory>(dir: &D, names: &[String]) -> Result<u64, StoreError> {
    if !names.iter().any(|name| name == FLOOR_FILE_NAME) {
        return Ok(FLOOR_NONE);
    }
    let file = dir
        .open(FLOOR_FILE_NAME)
        .map_err(StoreError::io("open", FLOOR_FILE_NAME))?;
    let len = file
        .len()
        .map_err(StoreError::io("read the length of", FLOOR_FILE_NAME))?;
    let corrupt = |corruption| StoreError::Corrupt {
        file: FLOOR_FILE_NAME.to_string(),
        corruption,
    };
    if len != FLOOR_BYTES as u64 {
        return Err(corrupt(Corruption::BadPurgeFloor {
            reason: "wrong length",
        }));
    }
    let mut bytes = [0u8; FLOOR_BYTES];
    file.read_exact_at(&mut bytes, 0)
        .map_err(StoreError::io("read", FLOOR_FILE_NAME))?;
    decode_floor(&bytes).map_err(corrupt)
}

/// Makes `seq` the floor durably: when this returns `Ok`, a crash keeps it. On `Err`
/// a crash leaves the old floor or the new one, whole.
pub fn write_floor<D: Directory>(dir: &D, seq: u64) -> Result<(), StoreError> {
    let bytes = encode_floor(seq);
    let names = dir.list().map_err(StoreError::io("list", "directory"))?;
    if names.iter().any(|name| name == FLOOR_TEMP_FILE_NAME) {
        dir.remove(FLOOR_TEMP_FILE_NAME)
            .map_err(StoreError::io("remove", FLOOR_TEMP_FILE_NAME))?;
    }
    let file = dir
        .create(FLOOR_TEMP_FILE_NAME)
        .map_err(StoreError::io("create", FLOOR_TEMP_FILE_NAME))?;
    file.write_all_at(&bytes, 0)
        .map_err(StoreError::io("write", FLOOR_TEMP_FILE_NAME))?;
    // The bytes are durable before the name points at them, so a crash after the
    // rename can never show a torn floor.
    file.sync_data()
        .map_err(StoreError::io("sync", FLOOR_TEMP_FILE_NAME))?;
    dir.rename(FLOOR_TEMP_FILE_NAME, FLOOR_FILE_NAME)
        .map_err(StoreError::io("rename", FLOOR_TEMP_FILE_NAME))?;
    dir.sync()
        .map_err(StoreError::io("sync directory for", FLOOR_FILE_NAME))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SimDirectory;

    #[test]
    fn spec_example_decodes() {
        // docs/store-format.md, "Purge floor": floor 5.
        let spec = [0x27, 0x9e, 0x30, 0x72, 1, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(encode_floor(5), spec);
        assert_eq!(decode_floor(&spec), Ok(5));
    }

    #[test]
    fn damage_is_corruption() {
        let good = encode_floor(42);
        for at in 0..FLOOR_BYTES {
            let mut bytes = good;
            bytes[at] ^= 0x10;
            assert!(decode_floor(&bytes).is_err(), "flip at {at}");
        }
        assert!(decode_floor(&good[..15]).is_err());
    }

    #[test]
    fn write_then_read_and_crash_keeps_old_or_new() {
        let dir = SimDirectory::new();
        let names = dir.list().unwrap();
        assert_eq!(read_floor(&dir, &names).unwrap(), FLOOR_NONE);
        write_floor(&dir, 7).unwrap();
        let names = dir.list().unwrap();
        assert_eq!(read_floor(&dir, &names).unwrap(), 7);
        // A write cut short at any operation leaves 7 or 9 after a crash.
        let mut seen = std::collections::BTreeSet::new();
        for cut in 0..8 {
            dir.power_loss_after(cut);
            let result = write_floor(&dir, 9);
            dir.crash(cut);
            let names = dir.list().unwrap();
            let floor = read_floor(&dir, &names).unwrap();
            // create, write, sync, rename, then the directory sync that decides.
            assert_eq!(floor, if cut >= 5 { 9 } else { 7 }, "cut {cut}");
            assert_eq!(result.is_ok(), cut >= 5, "cut {cut}");
            seen.insert(floor);
            if floor == 9 {
                write_floor(&dir, 7).unwrap();
            }
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), [7, 9]);
    }
}
