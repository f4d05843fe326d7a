//! One segment file: records with consecutive sequence numbers, appended at a logical
//! end inside a preallocated (zero-filled) file, and an in-memory sparse index of
//! every Nth record's offset, rebuilt by scanning at open.
//!
//! Owns: creating and naming segments, recovery of one segment (torn tail versus
//! corruption, see docs/store-format.md), appending whole encoded records, making them
//! readable (with or without syncing them first) and syncing them, and reading a
//! record back by sequence or offset with its CRC checked.
//!
//! Deliberately does not: decide when to roll (the log does), encode records (the log
//! encodes a batch into one buffer), retry failed I/O, or remember anything on disk
//! besides the records themselves.

use std::cell::{Cell, RefCell};
use std::ops::Range;

use super::error::{BadRecord, Corruption, StoreError};
use super::file::{Directory, StorageFile};
use super::record::{self, Record, HEADER_BYTES, RECORD_BYTES_MAX};

/// Recovery reads a segment in windows of this many bytes (or one whole record,
/// when that is larger), so opening never holds a whole segment in memory.
const SCAN_WINDOW_BYTES: usize = 1 << 20;
const SEGMENT_SUFFIX: &str = ".seg";
const SEGMENT_NAME_DIGITS: usize = 20;

/// The file name of the segment whose first record is `first_seq`.
pub fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

/// The first sequence of a segment file name, or `None` if the name is not a segment's.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// An open segment.
#[derive(Debug)]
pub struct Segment<F> {
    file: F,
    name: String,
    first_seq: u64,
    /// The sequence the next record appended here gets.
    next_seq: u64,
    /// The logical end: every byte before it is valid records, readable (written,
    /// and synced unless [`Segment::publish`] made them readable unsynced).
    end: u64,
    /// Where durable bytes end: every byte before it is synced. At most `end`.
    durable_end: u64,
    /// Where writes end (`end` when nothing is pending).
    written_end: u64,
    /// Lengths of the records written but not yet readable, in order.
    pending_lens: Vec<u32>,
    /// `index[i]` is the offset of record `first_seq + i * index_interval_records`.
    index: Vec<u64>,
    index_interval_records: u32,
    /// `(seq, offset)` of the record after the last one read: consumers read in
    /// order, and this spares each read the walk from the nearest index entry.
    next_read: Cell<(u64, u64)>,
    /// Bytes read ahead for in-order reads (a consumer replaying): the offset they
    /// start at, and the bytes (never past `end` when read, so never stale: the
    /// records before `end` do not change).
    read_window: RefCell<(u64, Vec<u8>)>,
}

/// What recovery found at the end of a segment's valid data, if not just zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornTail {
    /// Where the valid data ends and the torn bytes start.
    pub offset: u64,
    /// Why the bytes there are not the next record.
    pub bad: BadRecord,
    /// Just after the last non-zero byte.
    pub garbage_end: u64,
}

/// Reads a file through one reusable window.
/// In-order reads by sequence fetch this much ahead at once.
const IN_ORDER_WINDOW_BYTES: usize = 64 * 1024;
/// A read by sequence fetches this much at once (most device messages fit).
const READ_AHEAD_BYTES: usize = 512;

/// How far ahead recovery looks for the end of a run of zeros in one step.
const ZERO_PROBE_BYTES: usize = 4096;

struct ScanWindow {
    buf: Vec<u8>,
    start: u64,
    file_len: u64,
}

impl ScanWindow {
    /// Up to `want` bytes from `offset`; fewer only at the end of the file.
    fn get<F: StorageFile>(
        &mut self,
        file: &F,
        name: &str,
        offset: u64,
        want: usize,
    ) -> Result<&[u8], StoreError> {
        assert!(offset <= self.file_len);
        let want_end = (offset + want as u64).min(self.file_len);
        let window_end = self.start + self.buf.len() as u64;
        if offset < self.start || want_end > window_end {
            let read_len = (self.file_len - offset).min(want.max(SCAN_WINDOW_BYTES) as u64);
            self.buf.resize(read_len as usize, 0);
            file.read_exact_at(&mut self.buf, offset)
                .map_err(StoreError::io("read", name))?;
            self.start = offset;
        }
        let from = (offset - self.start) as usize;
        Ok(&self.buf[from..(want_end - self.start) as usize])
    }
}

impl<F: StorageFile> Segment<F> {
    /// Creates the segment for `first_seq`, preallocated to `preallocate_bytes` and
    /// synced. The caller syncs the directory before writing records to it.
    pub fn create<D: Directory<File = F>>(
        dir: &D,
        first_seq: u64,
        preallocate_bytes: u64,
        index_interval_records: u32,
    ) -> Result<Self, StoreError> {
        assert!(index_interval_records > 0);
        let name = segment_name(first_seq);
        let file = dir.create(&name).map_err(StoreError::io("create", &name))?;
        file.set_len(preallocate_bytes)
            .map_err(StoreError::io("preallocate", &name))?;
        file.sync_data().map_err(StoreError::io("sync", &name))?;
        Ok(Self::empty(file, name, first_seq, index_interval_records))
    }

    /// A segment handle positioned before its first record.
    fn empty(file: F, name: String, first_seq: u64, index_interval_records: u32) -> Self {
        Self {
            file,
            name,
            first_seq,
            next_seq: first_seq,
            end: 0,
            durable_end: 0,
            written_end: 0,
            pending_lens: Vec::new(),
            index: Vec::new(),
            index_interval_records,
            next_read: Cell::new((0, 0)),
            read_window: RefCell::new((0, Vec::new())),
        }
    }

    /// Opens and scans the segment `name` (whose first record is `first_seq`):
    /// checks every record and rebuilds the index. Returns the torn tail found after
    /// the valid data, if any, for the caller to judge and [`Segment::repair`]; a valid
    /// record after a bad one is [`Corruption`]. Changes nothing on disk.
    pub fn open<D: Directory<File = F>>(
        dir: &D,
        name: &str,
        first_seq: u64,
        index_interval_records: u32,
    ) -> Result<(Self, Option<TornTail>), StoreError> {
        Self::open_visiting(dir, name, first_seq, index_interval_records, &mut |_| {})
    }

    /// [`Segment::open`] showing every valid record recovery accepts to `visit`, in
    /// order (the records before a torn tail; on a corruption error, what it saw
    /// means nothing).
    pub fn open_visiting<D: Directory<File = F>>(
        dir: &D,
        name: &str,
        first_seq: u64,
        index_interval_records: u32,
        visit: &mut dyn FnMut(&Record<'_>),
    ) -> Result<(Self, Option<TornTail>), StoreError> {
        assert!(index_interval_records > 0);
        assert_eq!(parse_segment_name(name), Some(first_seq));
        let file = dir.open(name).map_err(StoreError::io("open", name))?;
        let mut segment = Self::empty(file, name.to_string(), first_seq, index_interval_records);
        let tail = segment.recover(visit)?;
        Ok((segment, tail))
    }

    /// Overwrites a torn tail that [`Segment::open`] found with zeros, synced, so its
    /// bytes can never mix with later appends.
    pub fn repair(&mut self, tail: &TornTail) -> Result<(), StoreError> {
        assert_eq!(tail.offset, self.end);
        assert!(tail.garbage_end > tail.offset);
        let zeros = vec![0; (tail.garbage_end - tail.offset) as usize];
        self.file
            .write_all_at(&zeros, tail.offset)
            .map_err(StoreError::io("zero torn tail of", &self.name))?;
        self.file
            .sync_data()
            .map_err(StoreError::io("sync", &self.name))
    }

    /// Scans from offset 0, accepting records while they are valid and in sequence;
    /// then classifies what follows.
    fn recover(
        &mut self,
        visit: &mut dyn FnMut(&Record<'_>),
    ) -> Result<Option<TornTail>, StoreError> {
        let file_len = self
            .file
            .len()
            .map_err(StoreError::io("stat", &self.name))?;
        let mut window = ScanWindow {
            buf: Vec::new(),
            start: 0,
            file_len,
        };
        let mut offset = 0u64;
        let bad = loop {
            if offset == file_len {
                break None;
            }
            let header = window.get(&self.file, &self.name, offset, HEADER_BYTES)?;
            let len = match record::frame_len(header) {
                Ok(len) => len,
                Err(error) => break Some(BadRecord::Invalid(error)),
            };
            let bytes = window.get(&self.file, &self.name, offset, len)?;
            match record::decode(bytes) {
                Ok((record, _)) if record.seq == self.next_seq => visit(&record),
                Ok((record, _)) => {
                    break Some(BadRecord::WrongSeq {
                        expected: self.next_seq,
                        found: record.seq,
                    })
                }
                Err(error) => break Some(BadRecord::Invalid(error)),
            }
            self.push_record(offset);
            offset += len as u64;
        };
        self.end = offset;
        self.durable_end = offset;
        self.written_end = offset;
        let Some(bad) = bad else {
            return Ok(None);
        };
        // Whatever lies between the valid data and the end of the file must hold no
        // valid record that could continue the sequence: each record takes at least
        // HEADER_BYTES, so the k-th one after the bad spot is at least k * HEADER_BYTES
        // past it. That bound keeps random garbage from costing a CRC per byte.
        let mut garbage_end = offset;
        let mut at = offset;
        while at < file_len {
            // A record starts with its length (at least HEADER_BYTES), so none starts
            // where four zero bytes do: skip zero runs (the preallocated tail) a probe
            // at a time instead of a header at a time.
            let probe = window.get(&self.file, &self.name, at, ZERO_PROBE_BYTES)?;
            match probe.iter().position(|&b| b != 0) {
                None => {
                    at += probe.len().saturating_sub(3).max(1) as u64;
                    continue;
                }
                Some(first) if first > 3 => {
                    at += (first - 3) as u64;
                    continue;
                }
                Some(_) => {}
            }
            let header = window.get(&self.file, &self.name, at, HEADER_BYTES)?;
            if header[0] != 0 {
                garbage_end = at + 1;
            }
            if let Some(seq) = self.plausible_seq(header, at - offset, file_len - at) {
                let len = record::frame_len(header).expect("checked as plausible");
                let bytes = window.get(&self.file, &self.name, at, len)?;
                if let Ok((record, _)) = record::decode(bytes) {
                    assert_eq!(record.seq, seq);
                    return Err(StoreError::Corrupt {
                        file: self.name.clone(),
                        corruption: Corruption::ValidRecordAfterBad {
                            bad_offset: offset,
                            bad,
                            valid_offset: at,
                            valid_seq: seq,
                        },
                    });
                }
            }
            at += 1;
        }
        if garbage_end == offset {
            return Ok(None); // only preallocated zeros
        }
        Ok(Some(TornTail {
            offset,
            bad,
            garbage_end,
        }))
    }

    /// The sequence of the header at `distance` bytes past the bad spot, if a record
    /// continuing this segment could start there and fit in `remaining` bytes.
    fn plausible_seq(&self, header: &[u8], distance: u64, remaining: u64) -> Option<u64> {
        let len = record::frame_len(header).ok()?;
        if header.len() < HEADER_BYTES || len as u64 > remaining {
            return None;
        }
        let seq = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let records_between_max = distance / HEADER_BYTES as u64;
        let plausible = seq >= self.next_seq && seq - self.next_seq <= records_between_max;
        plausible.then_some(seq)
    }

    fn push_record(&mut self, offset: u64) {
        let ordinal = self.next_seq - self.first_seq;
        if ordinal.is_multiple_of(u64::from(self.index_interval_records)) {
            self.index.push(offset);
        }
        self.next_seq += 1;
        debug_assert_eq!(
            self.index.len() as u64,
            ordinal / u64::from(self.index_interval_records) + 1
        );
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// One past the last record's sequence (`first_seq` when empty).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The logical end in bytes: readable records only.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Where everything written so far ends, readable or not.
    pub fn written_end(&self) -> u64 {
        self.written_end
    }

    /// Bytes of records written but not yet synced (readable or not).
    pub fn unsynced_bytes(&self) -> u64 {
        self.written_end - self.durable_end
    }

    pub fn is_empty(&self) -> bool {
        self.next_seq == self.first_seq
    }

    /// Writes `records` (whole encoded records continuing this segment's sequence)
    /// after everything written so far. Not readable until [`Segment::sync`] or
    /// [`Segment::publish`], not durable until [`Segment::sync`].
    pub fn write(&mut self, records: &[u8]) -> Result<(), StoreError> {
        let mut seq = self.next_seq + self.pending_lens.len() as u64;
        let mut at = 0;
        while at < records.len() {
            // Checking the CRC before the bytes reach the disk: a mismatch is our bug.
            let (record, len) = record::decode(&records[at..]).expect("encoded records are valid");
            assert_eq!(record.seq, seq, "records continue the segment");
            self.pending_lens.push(len as u32);
            seq += 1;
            at += len;
        }
        self.file
            .write_all_at(records, self.written_end)
            .map_err(StoreError::io("write", &self.name))?;
        self.written_end += records.len() as u64;
        Ok(())
    }

    /// Makes everything written durable (`fdatasync`), then readable.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.file
            .sync_data()
            .map_err(StoreError::io("sync", &self.name))?;
        self.publish();
        self.durable_end = self.end;
        Ok(())
    }

    /// The file, for [`StorageFile::sync_handle`].
    pub fn file(&self) -> &F {
        &self.file
    }

    /// Records that an `fdatasync` of this file, started after everything up to
    /// `upto` was written and published, has returned `Ok`.
    pub fn mark_synced(&mut self, upto: u64) {
        assert!(upto <= self.end, "only published bytes were synced");
        self.durable_end = self.durable_end.max(upto);
    }

    /// Makes everything written readable without syncing it: a crash may still lose
    /// it (or tear it, which recovery truncates). For the unsynced durability modes.
    pub fn publish(&mut self) {
        let lens = std::mem::take(&mut self.pending_lens);
        for &len in &lens {
            self.push_record(self.end);
            self.end += u64::from(len);
        }
        assert_eq!(self.end, self.written_end);
        self.pending_lens = lens;
        self.pending_lens.clear();
    }

    /// Cuts the preallocated space off a segment that takes no more records.
    pub fn seal(&mut self) -> Result<(), StoreError> {
        assert_eq!(self.unsynced_bytes(), 0);
        self.file
            .set_len(self.end)
            .map_err(StoreError::io("seal", &self.name))?;
        self.file
            .sync_data()
            .map_err(StoreError::io("sync", &self.name))
    }

    /// The offset of record `seq`, which must be in this segment: from the nearest
    /// index entry at or before it, hop over the records in between by their lengths.
    pub fn locate(&self, seq: u64) -> Result<u64, StoreError> {
        assert!((self.first_seq..self.next_seq).contains(&seq));
        let (hint_seq, hint_offset) = self.next_read.get();
        if hint_seq == seq && hint_offset < self.end {
            return Ok(hint_offset);
        }
        let ordinal = seq - self.first_seq;
        let slot = ordinal / u64::from(self.index_interval_records);
        let mut offset = self.index[slot as usize];
        let mut len_bytes = [0u8; 4];
        for hop_seq in self.first_seq + slot * u64::from(self.index_interval_records)..seq {
            self.read_exact(&mut len_bytes, offset)?;
            let len = record::frame_len(&len_bytes)
                .map_err(|error| self.corrupt(offset, error.into()))?;
            offset += len as u64;
            if offset >= self.end {
                let bad = BadRecord::WrongSeq {
                    expected: seq,
                    found: hop_seq,
                };
                return Err(self.corrupt(offset, bad));
            }
        }
        Ok(offset)
    }

    /// Reads record `seq` at `offset` into `buf` and checks it; returns it with its
    /// length.
    pub fn read_at<'b>(
        &self,
        offset: u64,
        seq: u64,
        buf: &'b mut Vec<u8>,
    ) -> Result<(Record<'b>, usize), StoreError> {
        assert!(offset < self.end);
        let in_order = self.next_read.get().0 == seq;
        if self.copy_from_window(offset, buf) {
            return self.check_read(offset, seq, buf);
        }
        if in_order {
            // The previous read was the record before: read ahead a window.
            let mut window = self.read_window.borrow_mut();
            let len = (self.end - offset).min(IN_ORDER_WINDOW_BYTES as u64) as usize;
            window.0 = offset;
            window.1.clear();
            window.1.resize(len, 0);
            self.read_exact(&mut window.1, offset)?;
            drop(window);
            if self.copy_from_window(offset, buf) {
                return self.check_read(offset, seq, buf);
            }
        }
        // One read for a small record: its length and its bytes together.
        let first = (self.end - offset).min(READ_AHEAD_BYTES as u64) as usize;
        buf.clear();
        buf.resize(first, 0);
        self.read_exact(buf, offset)?;
        let len = record::frame_len(buf).map_err(|error| self.corrupt(offset, error.into()))?;
        if offset + len as u64 > self.end {
            let bad = record::RecordError::Truncated {
                needed: len,
                available: (self.end - offset) as usize,
            };
            return Err(self.corrupt(offset, bad.into()));
        }
        assert!(len <= RECORD_BYTES_MAX);
        if len > first {
            buf.resize(len, 0);
            self.read_exact(&mut buf[first..], offset + first as u64)?;
        }
        buf.truncate(len);
        self.check_read(offset, seq, buf)
    }

    /// Copies the frame at `offset` into `buf` if the read-ahead window holds all
    /// of it.
    fn copy_from_window(&self, offset: u64, buf: &mut Vec<u8>) -> bool {
        let window = self.read_window.borrow();
        let (at, bytes) = (&window.0, &window.1);
        if offset < *at || offset + 4 > at + bytes.len() as u64 {
            return false;
        }
        let from = (offset - at) as usize;
        let Ok(len) = record::frame_len(&bytes[from..]) else {
            return false;
        };
        let Some(frame) = bytes.get(from..from + len) else {
            return false;
        };
        buf.clear();
        buf.extend_from_slice(frame);
        true
    }

    /// Checks that `buf`, read from `offset`, is exactly record `seq` (CRC, frame,
    /// sequence) and returns it with its length.
    pub fn check_read<'b>(
        &self,
        offset: u64,
        seq: u64,
        buf: &'b [u8],
    ) -> Result<(Record<'b>, usize), StoreError> {
        match record::decode(buf) {
            Ok((record, len)) if record.seq == seq => {
                self.next_read.set((seq + 1, offset + len as u64));
                Ok((record, len))
            }
            Ok((record, _)) => Err(self.corrupt(
                offset,
                BadRecord::WrongSeq {
                    expected: seq,
                    found: record.seq,
                },
            )),
            Err(error) => Err(self.corrupt(offset, error.into())),
        }
    }

    /// Reads up to `len` bytes from `offset` (not past the logical end) into `buf`.
    pub fn read_bytes(&self, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<(), StoreError> {
        let len = (self.end.saturating_sub(offset)).min(len as u64) as usize;
        buf.clear();
        buf.resize(len, 0);
        self.read_exact(buf, offset)
    }

    /// The sequence numbers this segment holds.
    pub fn range(&self) -> Range<u64> {
        self.first_seq..self.next_seq
    }

    fn read_exact(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(StoreError::io("read", &self.name))
    }

    fn corrupt(&self, offset: u64, bad: BadRecord) -> StoreError {
        StoreError::Corrupt {
            file: self.name.clone(),
            corruption: Corruption::BadRecordOnRead { offset, bad },
        }
    }

    /// Removes this segment's file; the caller syncs the directory.
    pub fn remove<D: Directory<File = F>>(self, dir: &D) -> Result<(), StoreError> {
        dir.remove(&self.name)
            .map_err(StoreError::io("remove", &self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::file::SimDirectory;
    use crate::store::record::encode;

    const INTERVAL: u32 = 3;
    const PREALLOCATE_BYTES: u64 = 1024;

    /// A segment at sequence 10 holding `count` records with payloads of varied
    /// lengths, synced; returns the directory and each record's end offset.
    fn segment_with(count: u64) -> (SimDirectory, Vec<u64>) {
        let dir = SimDirectory::new();
        let mut segment = Segment::create(&dir, 10, PREALLOCATE_BYTES, INTERVAL).unwrap();
        let mut ends = Vec::new();
        let mut bytes = Vec::new();
        for seq in 10..10 + count {
            let payload = vec![seq as u8; (seq as usize * 7) % 23];
            let record = Record {
                seq,
                timestamp_ns: seq as i64,
                subject: b"s.x",
                headers: b"",
                payload: &payload,
            };
            encode(&mut bytes, &record).unwrap();
            ends.push(bytes.len() as u64);
        }
        segment.write(&bytes).unwrap();
        segment.sync().unwrap();
        dir.sync().unwrap();
        (dir, ends)
    }

    /// Opens segment 10 after `damage` and renders what recovery says.
    fn recover_after(damage: impl FnOnce(&mut Vec<u8>)) -> String {
        let (dir, _) = segment_with(5);
        let name = segment_name(10);
        let mut bytes = dir.live_bytes(&name).unwrap();
        damage(&mut bytes);
        dir.replace_durably(&name, bytes);
        match Segment::open(&dir, &name, 10, INTERVAL) {
            Ok((segment, tail)) => {
                let mut buf = Vec::new();
                for seq in segment.range() {
                    let offset = segment.locate(seq).unwrap();
                    let (record, _) = segment.read_at(offset, seq, &mut buf).unwrap();
                    assert_eq!(record.timestamp_ns, seq as i64);
                }
                let tail = tail.map(|t| format!(" tail@{}..{}", t.offset, t.garbage_end));
                format!(
                    "{:?} end={}{}",
                    segment.range(),
                    segment.end(),
                    tail.unwrap_or_default()
                )
            }
            Err(error) => format!("{error}"),
        }
    }

    fn check(damage: impl FnOnce(&mut Vec<u8>), want: &str) {
        assert_eq!(recover_after(damage), want);
    }

    #[test]
    fn names() {
        assert_eq!(segment_name(1), "00000000000000000001.seg");
        assert_eq!(parse_segment_name("00000000000000004097.seg"), Some(4097));
        for bad in [
            "0001.seg",
            "00000000000000000001.tmp",
            "0000000000000000000x.seg",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
    }

    #[test]
    fn recovery_cases() {
        // Records end at 34, 75, 123, 178, 217.
        check(|_| {}, "10..15 end=217");
        check(|b| b.truncate(217), "10..15 end=217");
        check(|b| b.truncate(178), "10..14 end=178");
        check(|b| b.truncate(0), "10..10 end=0");
        check(|b| b[216] ^= 1, "10..14 end=178 tail@178..217");
        check(|b| b[500] = 9, "10..15 end=217 tail@217..501");
        check(|b| b[60] ^= 4, "corrupt 00000000000000000010.seg: bad record at offset 34 (bad record crc: stored 0xbe58a3fa, computed 0x258f210f) followed by valid record 12 at offset 75");
        check(|b| b[34..75].fill(0), "corrupt 00000000000000000010.seg: bad record at offset 34 (bad record length 0) followed by valid record 12 at offset 75");
        // A record whose sequence is wrong though its CRC holds.
        check(
            |b| {
                b[42] = 99;
                let crc = crc32c::crc32c(&b[42..75]);
                b[38..42].copy_from_slice(&crc.to_le_bytes());
            },
            "corrupt 00000000000000000010.seg: bad record at offset 34 (sequence 99 where 11 was expected) followed by valid record 12 at offset 75",
        );
    }

    #[test]
    fn every_bit_flip_before_the_last_record_is_corruption() {
        let (_, ends) = segment_with(5);
        let last_start = ends[ends.len() - 2];
        for bit in 0..last_start * 8 {
            let got = recover_after(|b| b[bit as usize / 8] ^= 1 << (bit % 8));
            assert!(got.starts_with("corrupt"), "bit {bit}: {got}");
        }
        for bit in last_start * 8..ends[4] * 8 {
            let got = recover_after(|b| b[bit as usize / 8] ^= 1 << (bit % 8));
            let want = format!("10..14 end={last_start} tail@{last_start}..");
            assert!(got.starts_with(&want), "bit {bit}: {got}");
        }
    }

    #[test]
    fn every_truncation_is_a_torn_tail() {
        let (_, ends) = segment_with(5);
        for cut in 0..=ends[4] + 8 {
            let kept = ends.iter().filter(|&&end| end <= cut).count() as u64;
            let end = ends.iter().copied().rfind(|&end| end <= cut).unwrap_or(0);
            let mut want = format!("10..{} end={end}", 10 + kept);
            if cut != end && cut < ends[4] {
                want = format!("{want} tail@{end}..");
            }
            // The file cut short, or a torn write over preallocated space: a prefix
            // of the bytes, then zeros.
            let got = recover_after(|b| b.truncate(cut as usize));
            assert!(got.starts_with(&want), "cut {cut}: {got}");
            let got = recover_after(|b| b[cut as usize..].fill(0));
            assert!(got.starts_with(&want), "zeroed from {cut}: {got}");
        }
    }

    #[test]
    fn repair_zeroes_the_tail() {
        let (dir, _) = segment_with(2);
        let name = segment_name(10);
        let mut bytes = dir.live_bytes(&name).unwrap();
        bytes[90] = 1;
        bytes[95] = 2;
        dir.replace_durably(&name, bytes);
        let (mut segment, tail) = Segment::open(&dir, &name, 10, INTERVAL).unwrap();
        let tail = tail.unwrap();
        assert_eq!((tail.offset, tail.garbage_end), (75, 96));
        segment.repair(&tail).unwrap();
        let bytes = dir.live_bytes(&name).unwrap();
        assert!(bytes[75..].iter().all(|&b| b == 0));
        let (_, tail) = Segment::open(&dir, &name, 10, INTERVAL).unwrap();
        assert_eq!(tail, None);
    }
}
