//! The store's only seam to the file system: a [`Directory`] of named files and the
//! [`StorageFile`] operations the log needs, in two implementations — [`OsDirectory`]
//! on `std::fs` (positional I/O, `fdatasync`), and [`SimDirectory`], a simulated disk
//! for tests that remembers what was synced and can lose power.
//!
//! Deliberately does not: buffer, cache, retry, or know what the bytes mean. Every
//! error is returned as it came; deciding that an fsync error is fatal is the log's job.
//!
//! The simulated disk keeps, per file, a *live* image (what reads see) and a *durable*
//! image (what survives a crash); `sync_data` moves one file's live image to durable,
//! `sync` on the directory makes creates, renames and removes durable. [`SimDirectory::crash`]
//! keeps only durable state, except that it may persist a random prefix of the
//! unsynced writes in order, tearing the last one it keeps (a random prefix of its
//! bytes). Everything is deterministic from the seed.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// One open file. Offsets and lengths are bytes from the start of the file.
// `len` mirrors `std::fs::Metadata::len`; an `is_empty` would have no user.
#[allow(clippy::len_without_is_empty)]
pub trait StorageFile {
    /// Fills `buf` from `offset`; a read past the end is an `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the file if needed. Not durable until
    /// [`StorageFile::sync_data`] returns `Ok`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every earlier write and length change of this file durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// The file's current length.
    fn len(&self) -> io::Result<u64>;
    /// Grows (zero-filled) or shrinks the file. Not durable until `sync_data`.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// A handle another thread can `fdatasync` this file through, so a caller can
    /// keep working while the disk syncs; `None` when the file has no such handle
    /// (the simulated disk), in which case the caller syncs in place.
    fn sync_handle(&self) -> io::Result<Option<fs::File>> {
        Ok(None)
    }
}

/// A directory holding one log's files, addressed by plain names (no separators).
pub trait Directory {
    type File: StorageFile;
    /// Creates a new, empty file; fails if `name` exists. The name is not durable until
    /// [`Directory::sync`].
    fn create(&self, name: &str) -> io::Result<Self::File>;
    /// Opens an existing file for reading and writing.
    fn open(&self, name: &str) -> io::Result<Self::File>;
    /// The names of all files, sorted.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Renames `from` to `to`, replacing `to`. Not durable until [`Directory::sync`].
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes a file. Not durable until [`Directory::sync`].
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes every earlier create, rename and remove durable (fsync of the directory).
    fn sync(&self) -> io::Result<()>;
}

/// Replaces file `name` in `dir` atomically: the bytes go to `<name>.tmp` (a
/// leftover of an earlier crash is removed first), which is synced and renamed
/// over `name`, and the directory is synced. After a crash `name` holds either the
/// old bytes or the new ones, whole.
pub fn replace_atomically<D: Directory>(
    dir: &D,
    name: &str,
    bytes: &[u8],
) -> Result<(), super::StoreError> {
    use super::StoreError;
    let temp = format!("{name}.tmp");
    // Not by listing first: the device sessions' directory holds a file per
    // kept session.
    match dir.remove(&temp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(StoreError::io("remove", &temp)(e));
        }
        _ => {}
    }
    let file = dir.create(&temp).map_err(StoreError::io("create", &temp))?;
    file.write_all_at(bytes, 0)
        .map_err(StoreError::io("write", &temp))?;
    file.sync_data().map_err(StoreError::io("sync", &temp))?;
    dir.rename(&temp, name)
        .map_err(StoreError::io("rename", &temp))?;
    dir.sync()
        .map_err(StoreError::io("sync directory for", name))
}

/// The whole of file `name` in `dir`; `None` when there is no such file.
pub fn read_if_present<D: Directory>(
    dir: &D,
    name: &str,
) -> Result<Option<Vec<u8>>, super::StoreError> {
    use super::StoreError;
    let names = dir
        .list()
        .map_err(StoreError::io("list the directory of", name))?;
    if !names.iter().any(|n| n == name) {
        return Ok(None);
    }
    let file = dir.open(name).map_err(StoreError::io("open", name))?;
    let len = file
        .len()
        .map_err(StoreError::io("read the length of", name))?;
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, 0)
        .map_err(StoreError::io("read", name))?;
    Ok(Some(bytes))
}

/// A real directory on `std::fs`.
#[derive(Debug, Clone)]
pub struct OsDirectory {
    path: PathBuf,
    /// Files are opened for reading only and every create, rename, remove and
    /// directory sync is refused: the operator commands inspect a store this way, so
    /// that looking can never change it.
    read_only: bool,
}

impl OsDirectory {
    /// Uses `path`, creating it (and its parents) if missing.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        fs::create_dir_all(path.as_ref())?;
        Ok(Self {
            path: path.as_ref().to_path_buf(),
            read_only: false,
        })
    }

    /// Uses the existing directory `path` read-only: files open without write access
    /// (so a write or length change fails in the kernel), and creating, renaming,
    /// removing and syncing are refused with `PermissionDenied`.
    pub fn open_read_only(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        if !fs::metadata(path)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", path.display()),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            read_only: true,
        })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is opened read-only", self.path.display()),
            ));
        }
        Ok(())
    }

    fn join(&self, name: &str) -> PathBuf {
        assert!(
            !name.is_empty() && !name.contains('/'),
            "file names are plain: {name:?}"
        );
        self.path.join(name)
    }
}

/// A file of an [`OsDirectory`].
#[derive(Debug)]
pub struct OsFile {
    file: fs::File,
}

impl StorageFile for OsFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.file, buf, offset)
    }

    fn sync_handle(&self) -> io::Result<Option<fs::File>> {
        // A duplicate descriptor of the same open file: its fdatasync covers every
        // write made through this one before the call.
        self.file.try_clone().map(Some)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(&self.file, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

impl Directory for OsDirectory {
    type File = OsFile;

    fn create(&self, name: &str) -> io::Result<OsFile> {
        self.check_writable()?;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.join(name))?;
        Ok(OsFile { file })
    }

    fn open(&self, name: &str) -> io::Result<OsFile> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(!self.read_only)
            .open(self.join(name))?;
        Ok(OsFile { file })
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.path)? {
            // A name that is not UTF-8 cannot be one of ours; skip it.
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.check_writable()?;
        fs::rename(self.join(from), self.join(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.check_writable()?;
        fs::remove_file(self.join(name))
    }

    fn sync(&self) -> io::Result<()> {
        self.check_writable()?;
        fs::File::open(&self.path)?.sync_all()
    }
}

/// A change to a simulated file not yet made durable.
#[derive(Debug, Clone)]
enum PendingChange {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct SimInode {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Changes since the last `sync_data`, oldest first: `durable` plus all of these
    /// is `live`.
    pending: Vec<PendingChange>,
}

fn apply(image: &mut Vec<u8>, change: &PendingChange) {
    match change {
        PendingChange::Write { offset, bytes } => {
            let offset = usize::try_from(*offset).expect("simulated files fit in memory");
            if image.len() < offset + bytes.len() {
                image.resize(offset + bytes.len(), 0);
            }
            image[offset..offset + bytes.len()].copy_from_slice(bytes);
        }
        PendingChange::SetLen(len) => {
            image.resize(
                usize::try_from(*len).expect("simulated files fit in memory"),
                0,
            );
        }
    }
}

#[derive(Debug, Default)]
struct SimState {
    inodes: Vec<Rc<RefCell<SimInode>>>,
    /// Names as reads see them: name → index in `inodes`.
    live_names: BTreeMap<String, usize>,
    /// Names as they survive a crash.
    durable_names: BTreeMap<String, usize>,
    /// Bumped by every crash; handles from before it refuse to work.
    generation: u64,
    /// Mutating operations left before the power fails (`None`: never).
    operations_until_power_loss: Option<u64>,
    powered_off: bool,
    fail_next_sync: bool,
}

impl SimState {
    /// Accounts one mutating operation against the power-loss countdown.
    fn mutate(&mut self) -> io::Result<()> {
        if let Some(left) = self.operations_until_power_loss.as_mut() {
            if *left == 0 {
                self.powered_off = true;
            } else {
                *left -= 1;
            }
        }
        self.check_power()
    }

    fn check_power(&self) -> io::Result<()> {
        if self.powered_off {
            return Err(io::Error::other("simulated power loss"));
        }
        Ok(())
    }
}

/// A simulated directory and disk (see the module docs). Clones share the disk.
#[derive(Debug, Clone, Default)]
pub struct SimDirectory {
    state: Rc<RefCell<SimState>>,
}

/// A file of a [`SimDirectory`].
#[derive(Debug)]
pub struct SimFile {
    state: Rc<RefCell<SimState>>,
    inode: Rc<RefCell<SimInode>>,
    generation: u64,
}

/// A small deterministic generator (splitmix64) so the disk needs no dependency.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..bound`; `bound` must be positive.
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0);
        self.next_u64() % bound
    }

    /// True with probability `numerator / denominator`.
    pub fn chance(&mut self, numerator: u64, denominator: u64) -> bool {
        self.below(denominator) < numerator
    }
}

impl SimDirectory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Power fails after `operations` more mutating operations (writes, syncs, length
    /// changes, creates, renames, removes) have succeeded: from then on every operation
    /// errors until [`SimDirectory::crash`].
    pub fn power_loss_after(&self, operations: u64) {
        self.state.borrow_mut().operations_until_power_loss = Some(operations);
    }

    /// The next `sync_data` or directory `sync` fails (and power stays on).
    pub fn fail_next_sync(&self) {
        self.state.borrow_mut().fail_next_sync = true;
    }

    /// Loses power and restarts: every file falls back to its durable image, except
    /// that, per file, a random number of its unsynced changes persist in order and the
    /// last persisted write may be torn (a random prefix of its bytes); names fall back
    /// to the last directory sync. Handles from before the crash stop working.
    pub fn crash(&self, seed: u64) {
        let mut rng = SimRng::new(seed);
        let mut state = self.state.borrow_mut();
        let mut inodes = Vec::new();
        let mut names = BTreeMap::new();
        for (name, &index) in &state.durable_names {
            let old = state.inodes[index].borrow();
            let mut image = old.durable.clone();
            let keep = rng.below(old.pending.len() as u64 + 1) as usize;
            for (i, change) in old.pending.iter().take(keep).enumerate() {
                match change {
                    PendingChange::Write { offset, bytes } if i + 1 == keep => {
                        let torn = rng.below(bytes.len() as u64 + 1) as usize;
                        let prefix = PendingChange::Write {
                            offset: *offset,
                            bytes: bytes[..torn].to_vec(),
                        };
                        apply(&mut image, &prefix);
                    }
                    change => apply(&mut image, change),
                }
            }
            names.insert(name.clone(), inodes.len());
            inodes.push(Rc::new(RefCell::new(SimInode {
                live: image.clone(),
                durable: image,
                pending: Vec::new(),
            })));
        }
        state.inodes = inodes;
        state.live_names = names.clone();
        state.durable_names = names;
        state.generation += 1;
        state.operations_until_power_loss = None;
        state.powered_off = false;
        state.fail_next_sync = false;
    }

    /// A file's live bytes, for tests that inspect or damage files.
    pub fn live_bytes(&self, name: &str) -> Option<Vec<u8>> {
        let state = self.state.borrow();
        let index = *state.live_names.get(name)?;
        let bytes = state.inodes[index].borrow().live.clone();
        Some(bytes)
    }

    /// Replaces a file's bytes, live and durable alike (damage that a crash keeps).
    pub fn replace_durably(&self, name: &str, bytes: Vec<u8>) {
        let state = self.state.borrow();
        let index = *state.live_names.get(name).expect("file exists");
        let mut inode = state.inodes[index].borrow_mut();
        inode.live = bytes.clone();
        inode.durable = bytes;
        inode.pending.clear();
    }

    fn file(&self, index: usize) -> SimFile {
        let state = self.state.borrow();
        SimFile {
            state: Rc::clone(&self.state),
            inode: Rc::clone(&state.inodes[index]),
            generation: state.generation,
        }
    }
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no file {name:?}"))
}

impl Directory for SimDirectory {
    type File = SimFile;

    fn create(&self, name: &str) -> io::Result<SimFile> {
        let index = {
            let mut state = self.state.borrow_mut();
            state.mutate()?;
            if state.live_names.contains_key(name) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("file {name:?} exists"),
                ));
            }
            state.inodes.push(Rc::default());
            let index = state.inodes.len() - 1;
            state.live_names.insert(name.to_string(), index);
            index
        };
        Ok(self.file(index))
    }

    fn open(&self, name: &str) -> io::Result<SimFile> {
        let index = {
            let state = self.state.borrow();
            state.check_power()?;
            *state.live_names.get(name).ok_or_else(|| not_found(name))?
        };
        Ok(self.file(index))
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let state = self.state.borrow();
        state.check_power()?;
        Ok(state.live_names.keys().cloned().collect())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut state = self.state.borrow_mut();
        state.mutate()?;
        let index = state
            .live_names
            .remove(from)
            .ok_or_else(|| not_found(from))?;
        state.live_names.insert(to.to_string(), index);
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut state = self.state.borrow_mut();
        // Removing nothing changes nothing: not an operation a power cut can
        // land in (replace_atomically removes a stale temp file this way).
        state.check_power()?;
        if !state.live_names.contains_key(name) {
            return Err(not_found(name));
        }
        state.mutate()?;
        state
            .live_names
            .remove(name)
            .ok_or_else(|| not_found(name))?;
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut state = self.state.borrow_mut();
        state.mutate()?;
        if std::mem::take(&mut state.fail_next_sync) {
            return Err(io::Error::other("simulated fsync failure"));
        }
        state.durable_names = state.live_names.clone();
        Ok(())
    }
}

impl SimFile {
    fn check(&self) -> io::Result<()> {
        let state = self.state.borrow();
        state.check_power()?;
        if state.generation != self.generation {
            return Err(io::Error::other("handle from before a simulated crash"));
        }
        Ok(())
    }

    fn change(&self, change: PendingChange) -> io::Result<()> {
        self.check()?;
        self.state.borrow_mut().mutate()?;
        let mut inode = self.inode.borrow_mut();
        apply(&mut inode.live, &change);
        inode.pending.push(change);
        Ok(())
    }
}

impl StorageFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check()?;
        let inode = self.inode.borrow();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start.checked_add(buf.len()) {
            Some(end) if end <= inode.live.len() => {
                buf.copy_from_slice(&inode.live[start..end]);
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            )),
        }
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.change(PendingChange::Write {
            offset,
            bytes: buf.to_vec(),
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.check()?;
        let mut state = self.state.borrow_mut();
        state.mutate()?;
        if std::mem::take(&mut state.fail_next_sync) {
            return Err(io::Error::other("simulated fsync failure"));
        }
        let mut inode = self.inode.borrow_mut();
        let pending = std::mem::take(&mut inode.pending);
        for change in &pending {
            apply(&mut inode.durable, change);
        }
        debug_assert_eq!(inode.durable, inode.live);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.check()?;
        Ok(self.inode.borrow().live.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.change(PendingChange::SetLen(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_makes_writes_survive_a_crash() {
        let disk = SimDirectory::new();
        let file = disk.create("a").unwrap();
        disk.sync().unwrap();
        file.write_all_at(b"hello", 0).unwrap();
        file.sync_data().unwrap();
        file.write_all_at(b" world", 5).unwrap();
        assert_eq!(disk.live_bytes("a").unwrap(), b"hello world");
        // Whatever the seed, the synced bytes survive, and the unsynced write
        // survives at most as a prefix.
        for seed in 0..64 {
            let disk = disk_with(b"hello", b" world");
            disk.crash(seed);
            let bytes = disk.live_bytes("a").unwrap();
            assert!(bytes.starts_with(b"hello"), "seed {seed}");
            assert!(b"hello world".starts_with(&bytes), "seed {seed}");
        }
        // Old handles are dead after a crash.
        disk.crash(1);
        assert!(file.len().is_err());
    }

    fn disk_with(synced: &[u8], unsynced: &[u8]) -> SimDirectory {
        let disk = SimDirectory::new();
        let file = disk.create("a").unwrap();
        disk.sync().unwrap();
        file.write_all_at(synced, 0).unwrap();
        file.sync_data().unwrap();
        file.write_all_at(unsynced, synced.len() as u64).unwrap();
        disk
    }

    #[test]
    fn crash_seeds_cover_drop_tear_and_keep() {
        let mut outcomes = std::collections::BTreeSet::new();
        for seed in 0..256 {
            let disk = disk_with(b"ab", b"cdef");
            disk.crash(seed);
            outcomes.insert(disk.live_bytes("a").unwrap());
        }
        let want: Vec<&[u8]> = vec![b"ab", b"abc", b"abcd", b"abcde", b"abcdef"];
        assert_eq!(outcomes.into_iter().collect::<Vec<_>>(), want);
    }

    #[test]
    fn names_need_a_directory_sync() {
        let disk = SimDirectory::new();
        disk.create("kept").unwrap();
        disk.sync().unwrap();
        disk.create("lost").unwrap();
        disk.rename("kept", "renamed").unwrap();
        disk.crash(7);
        assert_eq!(disk.list().unwrap(), vec!["kept".to_string()]);
        disk.rename("kept", "renamed").unwrap();
        disk.remove("missing").unwrap_err();
        disk.create("x").unwrap();
        disk.sync().unwrap();
        disk.crash(8);
        assert_eq!(
            disk.list().unwrap(),
            vec!["renamed".to_string(), "x".to_string()]
        );
    }

    #[test]
    fn power_loss_and_fsync_failure() {
        let disk = SimDirectory::new();
        let file = disk.create("a").unwrap();
        disk.power_loss_after(1);
        file.write_all_at(b"x", 0).unwrap();
        assert!(file.sync_data().is_err());
        assert!(file.write_all_at(b"y", 1).is_err());
        disk.crash(3);
        assert!(
            disk.list().unwrap().is_empty(),
            "the create was never synced"
        );

        let file = disk.create("b").unwrap();
        disk.fail_next_sync();
        assert!(file.sync_data().is_err());
        file.sync_data().unwrap();
    }

    #[test]
    fn os_directory_round_trip() {
        let path = std::env::temp_dir().join(format!("perch-store-file-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        let dir = OsDirectory::open(&path).unwrap();
        let file = dir.create("a.seg").unwrap();
        file.set_len(16).unwrap();
        file.write_all_at(b"abc", 4).unwrap();
        file.sync_data().unwrap();
        dir.sync().unwrap();
        let mut buf = [0u8; 5];
        file.read_exact_at(&mut buf, 3).unwrap();
        assert_eq!(&buf, b"\0abc\0");
        assert_eq!(file.len().unwrap(), 16);
        assert!(file.read_exact_at(&mut buf, 14).is_err());
        assert!(dir.create("a.seg").is_err());
        dir.rename("a.seg", "b.seg").unwrap();
        assert_eq!(dir.list().unwrap(), vec!["b.seg".to_string()]);
        let read_only = OsDirectory::open_read_only(&path).unwrap();
        let file = read_only.open("b.seg").unwrap();
        file.read_exact_at(&mut buf, 3).unwrap();
        assert!(file.write_all_at(b"x", 0).is_err());
        assert!(file.set_len(0).is_err());
        assert!(read_only.create("c.seg").is_err());
        assert!(read_only.rename("b.seg", "c.seg").is_err());
        assert!(read_only.remove("b.seg").is_err());
        assert!(read_only.sync().is_err());
        assert_eq!(dir.list().unwrap(), vec!["b.seg".to_string()]);
        assert!(OsDirectory::open_read_only(path.join("missing")).is_err());
        dir.remove("b.seg").unwrap();
        assert!(dir.list().unwrap().is_empty());
        fs::remove_dir_all(&path).unwrap();
    }
}
