//! Durable deletions in the middle of a log: one append-only file per log, `deletes`,
//! of CRC-framed runs of deleted sequence numbers, written in batches that each end
//! with a marked entry. The purge floor says "everything below"; this file says
//! "these, too". See docs/store-format.md for its bytes.
//!
//! Owns: [`RunSet`] (a set of sequences as disjoint runs), encoding and decoding
//! entries, the recovery scan (a batch without its last entry at the end of the file
//! is a torn tail; a valid entry after a bad one is corruption), appending a batch
//! (one write, one `fdatasync`) and replacing the whole file atomically when the log
//! compacts it (temporary file, sync, rename, directory sync).
//!
//! Deliberately does not: decide which sequences are deleted, when to compact, or
//! what a run past the end of the log means (the log drops those at open).

use std::collections::BTreeMap;
use std::ops::Range;

use super::error::{Corruption, StoreError};
use super::file::{Directory, StorageFile};

/// The file's name; a log without it has no deletions in the middle.
pub const DELETES_FILE_NAME: &str = "deletes";
/// Where a compacted file is written before it is renamed over `deletes`. One left
/// over by a crash was never renamed: the log removes it at open.
pub const DELETES_TEMP_FILE_NAME: &str = "deletes.tmp";
/// crc32c u32, kind u16, flags u16, first_seq u64, last_seq u64.
pub const ENTRY_BYTES: usize = 24;
/// The only kind of entry: a run of deleted sequences.
const KIND_RUN: u16 = 1;
/// Set on the last entry of a batch: a batch counts only once this entry is there.
const FLAG_BATCH_END: u16 = 1;
/// The CRC covers everything after itself.
const CRC_START: usize = 4;
/// The scan reads this many entries at a time.
const SCAN_ENTRIES: usize = 43_690;

/// A set of sequence numbers kept as disjoint, non-adjacent half-open runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSet {
    /// start → end (exclusive).
    runs: BTreeMap<u64, u64>,
    /// Sequences in the set.
    len: u64,
}

impl RunSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many sequences the set holds.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many runs the set holds.
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.run_containing(seq).is_some()
    }

    /// The run that holds `seq`, if any.
    pub fn run_containing(&self, seq: u64) -> Option<Range<u64>> {
        let (&start, &end) = self.runs.range(..=seq).next_back()?;
        (seq < end).then_some(start..end)
    }

    /// The runs, lowest first.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Range<u64>> + '_ {
        self.runs.iter().map(|(&start, &end)| start..end)
    }

    /// Adds every sequence of `run`; returns how many were not in the set yet.
    pub fn insert(&mut self, run: Range<u64>) -> u64 {
        if run.is_empty() {
            return 0;
        }
        let before = self.len;
        let (mut start, mut end) = (run.start, run.end);
        // A run starting before `start` that reaches it (or ends right at it).
        if let Some((&s, &e)) = self.runs.range(..start).next_back() {
            if e >= start {
                self.runs.remove(&s);
                self.len -= e - s;
                start = s;
                end = end.max(e);
            }
        }
        // Runs starting inside the new one or right after it.
        while let Some((&s, &e)) = self.runs.range(start..=end).next() {
            self.runs.remove(&s);
            self.len -= e - s;
            end = end.max(e);
        }
        self.runs.insert(start, end);
        self.len += end - start;
        self.len - before
    }

    /// Removes every sequence below `seq`.
    pub fn remove_below(&mut self, seq: u64) {
        while let Some((&start, &end)) = self.runs.first_key_value() {
            if start >= seq {
                break;
            }
            self.runs.remove(&start);
            self.len -= end - start;
            if end > seq {
                self.runs.insert(seq, end);
                self.len += end - seq;
                break;
            }
        }
    }

    /// Removes every sequence at or above `seq`; returns whether there were any.
    pub fn remove_from(&mut self, seq: u64) -> bool {
        let mut removed = false;
        while let Some((&start, &end)) = self.runs.last_key_value() {
            if end <= seq {
                break;
            }
            removed = true;
            self.runs.remove(&start);
            self.len -= end - start;
            if start < seq {
                self.runs.insert(start, seq);
                self.len += seq - start;
                break;
            }
        }
        removed
    }

    /// The parts of `run` that are not in the set, lowest first.
    pub fn gaps(&self, run: Range<u64>) -> Vec<Range<u64>> {
        let mut gaps = Vec::new();
        let mut at = run.start;
        if let Some(found) = self.run_containing(at) {
            at = found.end;
        }
        if at >= run.end {
            return gaps;
        }
        for (&start, &end) in self.runs.range(at..run.end) {
            if start > at {
                gaps.push(at..start);
            }
            at = end;
        }
        if at < run.end {
            gaps.push(at..run.end);
        }
        gaps
    }

    /// How many sequences of `range` the set holds.
    pub fn count_in(&self, range: Range<u64>) -> u64 {
        let gaps: u64 = self
            .gaps(range.clone())
            .iter()
            .map(|g| g.end - g.start)
            .sum();
        range.end.saturating_sub(range.start) - gaps
    }

    pub fn clear(&mut self) {
        self.runs.clear();
        self.len = 0;
    }
}

/// Why 24 bytes are not a valid entry.
pub type BadEntry = &'static str;

/// Appends the entry for `run` (non-empty, starting at 1 or later) to `out`.
pub fn encode_entry(out: &mut Vec<u8>, run: &Range<u64>, batch_end: bool) {
    assert!(run.start >= 1 && run.start < run.end, "a run of sequences");
    let start = out.len();
    out.extend_from_slice(&[0; 4]); // the crc, filled in below
    out.extend_from_slice(&KIND_RUN.to_le_bytes());
    let flags = if batch_end { FLAG_BATCH_END } else { 0 };
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&run.start.to_le_bytes());
    out.extend_from_slice(&(run.end - 1).to_le_bytes());
    let crc = crc32c::crc32c(&out[start + CRC_START..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(decode_entry(&out[start..]), Ok((run.clone(), batch_end)));
}

/// The run in the entry at the start of `bytes` and whether it ends its batch.
pub fn decode_entry(bytes: &[u8]) -> Result<(Range<u64>, bool), BadEntry> {
    let Some(bytes) = bytes.get(..ENTRY_BYTES) else {
        return Err("partial entry");
    };
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let u64_at = |at: usize| {
        let mut field = [0u8; 8];
        field.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(field)
    };
    let stored = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if stored != crc32c::crc32c(&bytes[CRC_START..]) {
        return Err("crc mismatch");
    }
    if u16_at(4) != KIND_RUN {
        return Err("unknown kind");
    }
    let flags = u16_at(6);
    if flags & !FLAG_BATCH_END != 0 {
        return Err("unknown flags");
    }
    let (first, last) = (u64_at(8), u64_at(16));
    if first == 0 || last < first || last == u64::MAX {
        return Err("bad run");
    }
    Ok((first..last + 1, flags & FLAG_BATCH_END != 0))
}

/// The end of a `deletes` file that is no whole batch: a batch that a crash cut
/// short (never acknowledged), or bytes that are no entry, with no valid entry after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeletesTornTail {
    /// Where the last whole batch ends: the file is cut back to here.
    pub offset: u64,
    /// The file's length.
    pub file_len: u64,
    /// Why the bytes at `offset` are no batch.
    pub reason: BadEntry,
}

/// A `deletes` file as the recovery scan found it.
#[derive(Debug)]
pub struct OpenedDeletes<F> {
    /// The file, if there is one.
    pub file: Option<F>,
    /// The union of every whole batch's runs.
    pub runs: RunSet,
    /// Entries of whole batches.
    pub entries: u64,
    /// Where the last whole batch ends.
    pub end: u64,
    /// The bytes after `end`, if any, unrepaired.
    pub torn_tail: Option<DeletesTornTail>,
}

/// Reads and checks the `deletes` file of the log in `dir`, whose file names are
/// `names`: every entry's CRC, kind and run, and that batches are whole. Returns the
/// torn tail unrepaired; a valid entry after a bad one is [`Corruption::BadDeletes`].
/// Changes nothing on disk.
pub fn read_deletes<D: Directory>(
    dir: &D,
    names: &[String],
) -> Result<OpenedDeletes<D::File>, StoreError> {
    let mut opened = OpenedDeletes {
        file: None,
        runs: RunSet::new(),
        entries: 0,
        end: 0,
        torn_tail: None,
    };
    if !names.iter().any(|name| name == DELETES_FILE_NAME) {
        return Ok(opened);
    }
    let name = DELETES_FILE_NAME;
    let file = dir.open(name).map_err(StoreError::io("open", name))?;
    let file_len = file.len().map_err(StoreError::io("stat", name))?;
    let mut buf = Vec::new();
    let read = |offset: u64, buf: &mut Vec<u8>| -> Result<(), StoreError> {
        let want = (file_len - offset).min((SCAN_ENTRIES * ENTRY_BYTES) as u64);
        buf.resize(want as usize, 0);
        file.read_exact_at(buf, offset)
            .map_err(StoreError::io("read", name))
    };
    // Runs of the batch being read: they count once its last entry is read.
    let mut batch: Vec<Range<u64>> = Vec::new();
    let mut offset = 0u64;
    let mut bad = None;
    'scan: while offset < file_len {
        read(offset, &mut buf)?;
        for entry in buf.chunks(ENTRY_BYTES) {
            match decode_entry(entry) {
                Ok((run, batch_end)) => {
                    batch.push(run);
                    offset += ENTRY_BYTES as u64;
                    if batch_end {
                        opened.entries += batch.len() as u64;
                        for run in batch.drain(..) {
                            opened.runs.insert(run);
                        }
                        opened.end = offset;
                    }
                }
                Err(reason) => {
                    bad = Some((offset, reason));
                    break 'scan;
                }
            }
        }
    }
    if let Some((bad_offset, reason)) = bad {
        // Entries are only ever written whole at the end of whole batches, so an
        // entry that follows a bad one lies on an entry boundary.
        let mut at = bad_offset + ENTRY_BYTES as u64;
        while at + ENTRY_BYTES as u64 <= file_len {
            read(at, &mut buf)?;
            for entry in buf.chunks_exact(ENTRY_BYTES) {
                if decode_entry(entry).is_ok() {
                    return Err(StoreError::Corrupt {
                        file: name.to_string(),
                        corruption: Corruption::BadDeletes {
                            bad_offset,
                            reason,
                            valid_offset: at,
                        },
                    });
                }
                at += ENTRY_BYTES as u64;
            }
        }
        opened.torn_tail = Some(DeletesTornTail {
            offset: opened.end,
            file_len,
            reason,
        });
    } else if opened.end < file_len {
        opened.torn_tail = Some(DeletesTornTail {
            offset: opened.end,
            file_len,
            reason: "batch without its last entry",
        });
    }
    opened.file = Some(file);
    Ok(opened)
}

/// Cuts a torn tail that [`read_deletes`] found off `file`, synced.
pub fn repair<F: StorageFile>(file: &F, tail: &DeletesTornTail) -> Result<(), StoreError> {
    let name = DELETES_FILE_NAME;
    file.set_len(tail.offset)
        .map_err(StoreError::io("truncate torn tail of", name))?;
    file.sync_data().map_err(StoreError::io("sync", name))
}

/// The entries for `runs` as one batch (the last entry marked), appended to `out`.
pub fn encode_batch(out: &mut Vec<u8>, runs: impl ExactSizeIterator<Item = Range<u64>>) {
    let count = runs.len();
    for (i, run) in runs.enumerate() {
        encode_entry(out, &run, i + 1 == count);
    }
}

/// Appends `bytes` (one whole batch) at `offset` of the `deletes` file — creating it,
/// and making its name durable, when `file` is `None` — and syncs it. When this
/// returns `Ok` the batch survives a crash; before, a crash leaves at most a torn
/// batch, which recovery cuts off.
pub fn append_batch<D: Directory>(
    dir: &D,
    file: &mut Option<D::File>,
    offset: u64,
    bytes: &[u8],
) -> Result<(), StoreError> {
    let name = DELETES_FILE_NAME;
    let created = file.is_none();
    if created {
        assert_eq!(offset, 0, "a new file starts empty");
        *file = Some(dir.create(name).map_err(StoreError::io("create", name))?);
    }
    let handle = file.as_ref().expect("created above");
    handle
        .write_all_at(bytes, offset)
        .map_err(StoreError::io("write", name))?;
    handle.sync_data().map_err(StoreError::io("sync", name))?;
    if created {
        dir.sync()
            .map_err(StoreError::io("sync directory for", name))?;
    }
    Ok(())
}

/// Replaces the `deletes` file with one holding `runs` as one batch, atomically: a
/// crash leaves the old file or the new one, whole. No runs removes the file. Returns
/// the new file (`None` when removed) and its length.
pub fn rewrite<D: Directory>(
    dir: &D,
    file: Option<D::File>,
    runs: &RunSet,
) -> Result<(Option<D::File>, u64), StoreError> {
    let names = dir.list().map_err(StoreError::io("list", "directory"))?;
    let temp = DELETES_TEMP_FILE_NAME;
    if names.iter().any(|name| name == temp) {
        dir.remove(temp).map_err(StoreError::io("remove", temp))?;
    }
    if runs.is_empty() {
        drop(file);
        if names.iter().any(|name| name == DELETES_FILE_NAME) {
            dir.remove(DELETES_FILE_NAME)
                .map_err(StoreError::io("remove", DELETES_FILE_NAME))?;
            dir.sync().map_err(StoreError::io(
                "sync directory after removing",
                DELETES_FILE_NAME,
            ))?;
        }
        return Ok((None, 0));
    }
    let mut bytes = Vec::with_capacity(runs.run_count() * ENTRY_BYTES);
    encode_batch(&mut bytes, runs.iter());
    let new = dir.create(temp).map_err(StoreError::io("create", temp))?;
    new.write_all_at(&bytes, 0)
        .map_err(StoreError::io("write", temp))?;
    // The bytes are durable before the name points at them.
    new.sync_data().map_err(StoreError::io("sync", temp))?;
    drop(file);
    dir.rename(temp, DELETES_FILE_NAME)
        .map_err(StoreError::io("rename", temp))?;
    dir.sync()
        .map_err(StoreError::io("sync directory for", DELETES_FILE_NAME))?;
    Ok((Some(new), bytes.len() as u64))
}

#[cfg(test)]
// Runs of sequences are ranges: a list of one run is what these tests mean.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::store::SimDirectory;

    #[test]
    fn run_set() {
        let mut set = RunSet::new();
        assert_eq!(set.insert(5..8), 3);
        assert_eq!(set.insert(10..12), 2);
        assert_eq!(set.insert(8..10), 2, "joins both neighbours");
        assert_eq!(set.iter().collect::<Vec<_>>(), [5..12]);
        assert_eq!(set.insert(6..7), 0);
        assert_eq!(set.insert(20..21), 1);
        assert_eq!(set.insert(1..30), 29 - 8);
        assert_eq!(set.iter().collect::<Vec<_>>(), [1..30]);
        let mut set = RunSet::new();
        for run in [3..4, 7..9, 12..20] {
            set.insert(run);
        }
        assert_eq!(set.len(), 11);
        assert!(set.contains(3) && set.contains(8) && !set.contains(9) && !set.contains(2));
        assert_eq!(set.run_containing(15), Some(12..20));
        assert_eq!(set.gaps(0..30), [0..3, 4..7, 9..12, 20..30]);
        assert_eq!(set.gaps(8..13), [9..12]);
        assert_eq!(set.gaps(13..19), []);
        let (start, end) = (9, 5);
        assert_eq!(set.gaps(start..end), []);
        assert_eq!(set.count_in(4..15), 5);
        assert_eq!(set.count_in(5..5), 0);
        set.remove_below(8);
        assert_eq!(set.iter().collect::<Vec<_>>(), [8..9, 12..20]);
        assert!(set.remove_from(15));
        assert!(!set.remove_from(15));
        assert_eq!(set.iter().collect::<Vec<_>>(), [8..9, 12..15]);
        assert_eq!(set.len(), 4);
        set.remove_below(100);
        assert!(set.is_empty() && set.run_count() == 0);
    }

    #[test]
    fn entries_round_trip_and_every_bit_flip_is_caught() {
        let mut bytes = Vec::new();
        encode_entry(&mut bytes, &(7..10), true);
        assert_eq!(bytes.len(), ENTRY_BYTES);
        assert_eq!(decode_entry(&bytes), Ok((7..10, true)));
        for bit in 0..ENTRY_BYTES * 8 {
            let mut bad = bytes.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_entry(&bad).is_err(), "bit {bit}");
        }
        assert_eq!(decode_entry(&[0; ENTRY_BYTES]), Err("crc mismatch"));
        assert_eq!(decode_entry(&bytes[..23]), Err("partial entry"));
    }

    #[test]
    fn spec_example_decodes() {
        let spec = crate::store::record::tests::spec_example("Example deletes batch");
        let mut bytes = Vec::new();
        encode_batch(&mut bytes, [3..5, 9..10].into_iter());
        assert_eq!(bytes, spec);
        assert_eq!(decode_entry(&spec), Ok((3..5, false)));
        assert_eq!(decode_entry(&spec[24..]), Ok((9..10, true)));
    }

    /// A `deletes` file of the given batches, synced.
    fn file_with(batches: &[&[Range<u64>]]) -> SimDirectory {
        let dir = SimDirectory::new();
        let mut file = None;
        let mut end = 0;
        for batch in batches {
            let mut bytes = Vec::new();
            encode_batch(&mut bytes, batch.iter().cloned());
            append_batch(&dir, &mut file, end, &bytes).unwrap();
            end += bytes.len() as u64;
        }
        dir
    }

    fn scan(dir: &SimDirectory) -> String {
        let names = dir.list().unwrap();
        match read_deletes(dir, &names) {
            Ok(opened) => {
                let runs: Vec<_> = opened.runs.iter().collect();
                let tail = opened
                    .torn_tail
                    .map(|t| format!(" tail@{}..{} ({})", t.offset, t.file_len, t.reason));
                format!(
                    "{runs:?} entries={} end={}{}",
                    opened.entries,
                    opened.end,
                    tail.unwrap_or_default()
                )
            }
            Err(error) => error.to_string(),
        }
    }

    fn damaged(damage: impl FnOnce(&mut Vec<u8>)) -> String {
        let dir = file_with(&[&[3..5], &[8..9, 10..12], &[20..21]]);
        let mut bytes = dir.live_bytes(DELETES_FILE_NAME).unwrap();
        damage(&mut bytes);
        dir.replace_durably(DELETES_FILE_NAME, bytes);
        scan(&dir)
    }

    #[test]
    fn recovery_cases() {
        assert_eq!(scan(&SimDirectory::new()), "[] entries=0 end=0");
        let all = "[3..5, 8..9, 10..12, 20..21] entries=4 end=96";
        assert_eq!(damaged(|_| {}), all);
        // Cut anywhere inside the last batch: the batch is gone, nothing else.
        for cut in 73..96 {
            let want =
                format!("[3..5, 8..9, 10..12] entries=3 end=72 tail@72..{cut} (partial entry)");
            assert_eq!(damaged(|b| b.truncate(cut)), want, "cut {cut}");
        }
        assert_eq!(
            damaged(|b| b.truncate(72)),
            "[3..5, 8..9, 10..12] entries=3 end=72"
        );
        // A two-entry batch cut between its entries: no batch end, so not applied.
        assert_eq!(
            damaged(|b| b.truncate(48)),
            "[3..5] entries=1 end=24 tail@24..48 (batch without its last entry)"
        );
        // Zeros after the data (a file grown but not written) are a torn tail.
        assert_eq!(
            damaged(|b| b.resize(130, 0)),
            format!("{all} tail@96..130 (crc mismatch)"),
        );
        // A flip in the last entry looks torn; anywhere before it is corruption.
        assert_eq!(
            damaged(|b| b[80] ^= 1),
            "[3..5, 8..9, 10..12] entries=3 end=72 tail@72..96 (crc mismatch)"
        );
        assert_eq!(
            damaged(|b| b[30] ^= 1),
            "corrupt deletes: bad deletes entry at offset 24 (crc mismatch) followed by a \
             valid entry at offset 48"
        );
    }

    #[test]
    fn rewrite_replaces_or_removes_the_file() {
        let dir = file_with(&[&[3..5], &[8..9]]);
        let mut runs = RunSet::new();
        runs.insert(8..9);
        runs.insert(30..40);
        let names = dir.list().unwrap();
        let opened = read_deletes(&dir, &names).unwrap();
        let (file, len) = rewrite(&dir, opened.file, &runs).unwrap();
        assert!(file.is_some());
        assert_eq!(len, 48);
        dir.crash(1);
        assert_eq!(scan(&dir), "[8..9, 30..40] entries=2 end=48");
        let (file, len) = rewrite(&dir, None, &RunSet::new()).unwrap();
        assert!(file.is_none() && len == 0);
        dir.crash(2);
        assert_eq!(dir.list().unwrap(), Vec::<String>::new());
        // A power cut at any step leaves the old runs or the new ones.
        for cut in 0..8 {
            let dir = file_with(&[&[3..5]]);
            dir.power_loss_after(cut);
            let names = dir.list().unwrap();
            let opened = read_deletes(&dir, &names).unwrap();
            let result = rewrite(&dir, opened.file, &runs);
            dir.crash(cut);
            let got = scan(&dir);
            let old = "[3..5] entries=1 end=24";
            let new = "[8..9, 30..40] entries=2 end=48";
            assert!(got == old || got == new, "cut {cut}: {got}");
            if result.is_ok() {
                assert_eq!(got, new, "cut {cut}");
            }
        }
    }
}
