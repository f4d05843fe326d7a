//! A stream's log: a directory of segments holding records with consecutive sequence
//! numbers. Appends are group commits — a batch is encoded into one buffer, written
//! with one write and made durable with one `fdatasync` before any of its sequence
//! numbers are returned ([`Log::append`]), so a returned sequence is on disk. For the
//! unsynced durability modes ([`super::Durability`]) [`Log::append_unsynced`] returns
//! after the write, and [`Log::sync`] makes everything written durable.
//!
//! Owns: opening and recovering every segment (and checking they are contiguous),
//! assigning sequence numbers, rolling segments at a size limit (a sealed segment is
//! always synced), reads by sequence and in order, purging whole segments from the
//! front, the durable purge floor (`floor`): every record below it is deleted and no
//! sequence below it is assigned again, so a purge survives a restart and a purge past
//! the end moves the next sequence; and durable deletions anywhere above it
//! (`deletes`): [`Log::delete`] syncs runs of deleted sequences to the `deletes` file
//! before it returns, reads never return a deleted record again, and the file is
//! compacted once the floor or the first segment passes its runs. Fails closed: after
//! any write or sync error the log acknowledges nothing more, ever; recovery is a
//! restart.
//!
//! Deliberately does not: know about streams' limits, subjects, consumers or time
//! (timestamps are the caller's), batch requests from several callers (the owner of
//! the log collects a batch), keep a sync timer, touch threads or sockets, or remove a
//! segment from the middle (a segment whose records are all deleted stays until the
//! front passes it).

use std::collections::VecDeque;
use std::ops::Range;

use super::deletes::{self, RunSet, DELETES_TEMP_FILE_NAME};
use super::error::{Corruption, StoreError};
use super::file::{Directory, StorageFile};
use super::floor::{self, FLOOR_TEMP_FILE_NAME};
use super::record::{self, EncodeError, Record, RECORD_BYTES_MAX};
use super::segment::{parse_segment_name, Segment, TornTail};

/// Segments roll when the next record would take them over this size.
pub const SEGMENT_BYTES_MAX_DEFAULT: u64 = 64 << 20;
/// The smallest segment size a config may ask for (tests use tiny segments to roll
/// often).
pub const SEGMENT_BYTES_MIN: u64 = 256;
/// Every this many records a segment's sparse index keeps an offset: a read by
/// sequence hops over at most this many records minus one.
pub const INDEX_INTERVAL_RECORDS_DEFAULT: u32 = 64;
/// A batch is written in pieces of at most this size (all synced together), so the
/// encoding buffer stays small whatever the batch.
pub const WRITE_BYTES_MAX: usize = 1 << 20;
/// The `deletes` file is rewritten (compacted) once it holds more than this many
/// entries and more than twice as many as the runs still above the first sequence.
pub const DELETES_COMPACT_ENTRIES_MIN: u64 = 256;

const _: () = assert!(SEGMENT_BYTES_MIN <= SEGMENT_BYTES_MAX_DEFAULT);
const _: () = assert!(WRITE_BYTES_MAX <= RECORD_BYTES_MAX);

/// How a log lays out its segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// Roll size, also the preallocated size of a new segment.
    pub segment_bytes_max: u64,
    pub index_interval_records: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes_max: SEGMENT_BYTES_MAX_DEFAULT,
            index_interval_records: INDEX_INTERVAL_RECORDS_DEFAULT,
        }
    }
}

/// A message to append; the log assigns its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewRecord<'a> {
    pub timestamp_ns: i64,
    pub subject: &'a [u8],
    pub headers: &'a [u8],
    pub payload: &'a [u8],
}

/// What an out-of-line sync covers (see [`Log::sync_ticket`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncTicket {
    segment_first_seq: u64,
    upto: u64,
}

/// A position for reading the log in order; see [`Log::next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    seq: u64,
    /// The first sequence of the segment `offset` is in, and the offset of `seq`.
    position: Option<(u64, u64)>,
    /// Bytes read ahead from that segment: (its first sequence, the window's
    /// offset, the bytes). A scan reads the segment in large chunks instead of a
    /// read per record.
    window: (u64, u64, Vec<u8>),
}

/// How much a cursor reads ahead at once.
const CURSOR_WINDOW_BYTES: usize = 256 * 1024;

impl Cursor {
    /// The sequence the next read returns (or a later one, if it was purged).
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// A stream's log over a [`Directory`].
#[derive(Debug)]
pub struct Log<D: Directory> {
    dir: D,
    config: LogConfig,
    /// Oldest first; never empty. The last one takes appends.
    segments: VecDeque<Segment<D::File>>,
    /// The batch encoding buffer, reused.
    scratch: Vec<u8>,
    failed: bool,
    /// The durable purge floor: records below it are deleted. Never above
    /// [`Log::next_seq`] (raising it past the end starts a segment there).
    floor_seq: u64,
    /// Durably deleted sequences at or above [`Log::first_seq`] (runs below it are
    /// pruned), all below [`Log::next_seq`]: the `deletes` file, applied.
    deleted: RunSet,
    /// The `deletes` file, if there is one.
    deletes_file: Option<D::File>,
    /// Where the `deletes` file's whole batches end: the next batch goes there.
    deletes_end: u64,
    /// Entries in the `deletes` file, stale ones included.
    deletes_entries: u64,
}

impl<D: Directory> Log<D> {
    /// Opens the log in `dir`, recovering every segment and finishing a purge that a
    /// crash interrupted after its floor was durable, or creates an empty one whose
    /// first sequence is 1. Then applies the `deletes` file: a torn batch at its end
    /// is cut off, and runs at or past the log's end (deletions of records that a
    /// crash lost, in an unsynced durability mode) are dropped durably before any
    /// sequence can be assigned again.
    pub fn open(dir: D, config: LogConfig) -> Result<Self, StoreError> {
        Self::open_visiting(dir, config, &mut |_| {})
    }

    /// [`Log::open`] showing `visit` every record recovery reads and keeps, in order
    /// (none below the purge floor; deleted ones included: the `deletes` file is
    /// applied after, see [`Log::is_deleted`]). A stream rebuilds its state from them
    /// instead of reading the log a second time.
    pub fn open_visiting(
        dir: D,
        config: LogConfig,
        visit: &mut dyn FnMut(&Record<'_>),
    ) -> Result<Self, StoreError> {
        assert!(config.segment_bytes_max >= SEGMENT_BYTES_MIN);
        let OpenedSegments {
            mut segments,
            torn_tail,
            floor_seq,
            leftovers,
        } = open_segments_visiting(&dir, config.index_interval_records, visit)?;
        if let Some(tail) = torn_tail {
            segments
                .back_mut()
                .expect("a tail belongs to a segment")
                .repair(&tail)?;
        }
        let mut log = Self {
            dir,
            config,
            segments,
            scratch: Vec::new(),
            failed: false,
            floor_seq,
            deleted: RunSet::new(),
            deletes_file: None,
            deletes_end: 0,
            deletes_entries: 0,
        };
        for name in &leftovers {
            log.dir
                .remove(name)
                .map_err(StoreError::io("remove leftover", name))?;
        }
        if !leftovers.is_empty() {
            log.dir
                .sync()
                .map_err(StoreError::io("sync directory after removing", "leftovers"))?;
        }
        match log.segments.back() {
            None => log.start_segment(floor_seq)?,
            Some(active) if active.next_seq() < floor_seq => log.jump_to(floor_seq)?,
            Some(_) => {}
        }
        assert!(log.floor_seq <= log.next_seq());
        log.open_deletes()?;
        Ok(log)
    }

    /// Reads and repairs the `deletes` file, keeps the runs between the first and the
    /// next sequence, and rewrites the file if it holds runs past the end or is due for
    /// compaction.
    fn open_deletes(&mut self) -> Result<(), StoreError> {
        let names = self
            .dir
            .list()
            .map_err(StoreError::io("list", "directory"))?;
        let opened = deletes::read_deletes(&self.dir, &names)?;
        if let (Some(file), Some(tail)) = (&opened.file, &opened.torn_tail) {
            deletes::repair(file, tail)?;
        }
        self.deleted = opened.runs;
        self.deletes_file = opened.file;
        self.deletes_end = opened.end;
        self.deletes_entries = opened.entries;
        self.deleted.remove_below(self.first_seq());
        // A sequence at or past the end was never acknowledged as stored, or was lost
        // with what an unsynced mode had not synced: it will be assigned again, to a
        // message that no deletion ever meant.
        let past_end = self.deleted.remove_from(self.next_seq());
        if past_end || self.deletes_compaction_due() {
            self.rewrite_deletes()?;
        }
        Ok(())
    }

    /// The oldest sequence still stored; equals [`Log::next_seq`] when empty. It may
    /// be a deleted one ([`Log::is_deleted`]).
    /// The directory the log's files are in (the stream keeps small files of
    /// its own beside them).
    pub fn dir(&self) -> &D {
        &self.dir
    }

    pub fn first_seq(&self) -> u64 {
        let front = self.segments.front().expect("never empty").first_seq();
        front.max(self.floor_seq)
    }

    /// The sequence the next appended record gets.
    pub fn next_seq(&self) -> u64 {
        self.active().next_seq()
    }

    /// The newest sequence ever stored (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.first_seq() == self.next_seq()
    }

    /// Whether an earlier write or sync error stopped the log.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// Whether `seq` was deleted durably by [`Log::delete`] (and is above the floor).
    pub fn is_deleted(&self, seq: u64) -> bool {
        self.deleted.contains(seq)
    }

    /// The durably deleted sequences between [`Log::first_seq`] and [`Log::next_seq`].
    pub fn deleted(&self) -> &RunSet {
        &self.deleted
    }

    /// Bytes appended by [`Log::append_unsynced`] that are not durable yet; 0 when
    /// [`Log::sync`] has nothing to do.
    pub fn unsynced_bytes(&self) -> u64 {
        self.active().unsynced_bytes()
    }

    /// How many segment files the log has.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    fn active(&self) -> &Segment<D::File> {
        self.segments.back().expect("never empty")
    }

    /// Appends `batch` durably and returns the sequences it got. On `Err` nothing of
    /// the batch is acknowledged (some of it may still be on disk and come back after
    /// a restart, intact); after an I/O error the log is failed for good.
    pub fn append(&mut self, batch: &[NewRecord<'_>]) -> Result<Range<u64>, StoreError> {
        self.append_with(batch, true)
    }

    /// Appends `batch` without syncing it and returns the sequences it got: they are
    /// readable at once, but a crash before the next [`Log::sync`] (or a roll, a
    /// floor jump, [`Log::close`]) may lose them — never records synced before them.
    /// A segment roll on the way syncs the segment it seals. Errors as
    /// [`Log::append`].
    pub fn append_unsynced(&mut self, batch: &[NewRecord<'_>]) -> Result<Range<u64>, StoreError> {
        self.append_with(batch, false)
    }

    /// Makes every record appended so far durable (one `fdatasync`, none when nothing
    /// is pending). An error fails the log for good: what was not synced may be lost,
    /// and the log acknowledges nothing more.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.failed {
            return Err(StoreError::Failed);
        }
        let result = self.sync_active();
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    /// What a sync started now must cover: the active segment (every sealed one is
    /// synced when it is sealed) up to what has been written. `None` when
    /// everything is durable. For syncing on another thread: obtain the file's
    /// [`StorageFile::sync_handle`] through [`Log::sync_handle`], `fdatasync` it,
    /// then [`Log::finish_sync`].
    pub fn sync_ticket(&self) -> Option<SyncTicket> {
        let active = self.segments.back().expect("never empty");
        (active.unsynced_bytes() > 0).then(|| SyncTicket {
            segment_first_seq: active.first_seq(),
            upto: active.written_end(),
        })
    }

    /// A handle to the active segment's file that another thread can sync.
    pub fn sync_handle(&self) -> Result<Option<std::fs::File>, StoreError> {
        let active = self.segments.back().expect("never empty");
        active
            .file()
            .sync_handle()
            .map_err(StoreError::io("duplicate the handle of", active.name()))
    }

    /// The sync `ticket` describes returned `Ok`: those bytes are durable.
    pub fn finish_sync(&mut self, ticket: SyncTicket) {
        if let Some(segment) = self
            .segments
            .iter_mut()
            .find(|s| s.first_seq() == ticket.segment_first_seq)
        {
            segment.mark_synced(ticket.upto);
        }
    }

    /// A sync done elsewhere failed: like a failed [`Log::sync`], the log
    /// acknowledges nothing more.
    pub fn fail(&mut self) {
        self.failed = true;
    }

    /// Syncs what is pending and closes the log: the clean shutdown of the unsynced
    /// modes.
    pub fn close(mut self) -> Result<(), StoreError> {
        self.sync()
    }

    fn append_with(
        &mut self,
        batch: &[NewRecord<'_>],
        sync: bool,
    ) -> Result<Range<u64>, StoreError> {
        if self.failed {
            return Err(StoreError::Failed);
        }
        // Check every limit first, so that a refused record leaves nothing half done.
        for new in batch {
            check_limits(new)?;
        }
        let first = self.next_seq();
        let result = self.append_checked(batch, sync);
        if let Err(StoreError::Io { .. }) = &result {
            self.failed = true;
        }
        result?;
        Ok(first..self.next_seq())
    }

    fn append_checked(&mut self, batch: &[NewRecord<'_>], sync: bool) -> Result<(), StoreError> {
        self.scratch.clear();
        for (seq, new) in (self.next_seq()..).zip(batch) {
            let len = record::encoded_len(new.subject, new.headers, new.payload);
            let active = self.active();
            let written = active.written_end() + self.scratch.len() as u64;
            let fits = written + len as u64 <= self.config.segment_bytes_max;
            if !fits && written > 0 {
                self.write_scratch()?;
                self.roll(seq)?;
            } else if self.scratch.len() + len > WRITE_BYTES_MAX {
                self.write_scratch()?;
            }
            let record = Record {
                seq,
                timestamp_ns: new.timestamp_ns,
                subject: new.subject,
                headers: new.headers,
                payload: new.payload,
            };
            record::encode(&mut self.scratch, &record).expect("limits checked before");
        }
        self.write_scratch()?;
        if sync {
            self.sync_active()
        } else {
            self.segments.back_mut().expect("never empty").publish();
            Ok(())
        }
    }

    fn write_scratch(&mut self) -> Result<(), StoreError> {
        if !self.scratch.is_empty() {
            let active = self.segments.back_mut().expect("never empty");
            active.write(&self.scratch)?;
            self.scratch.clear();
        }
        Ok(())
    }

    fn sync_active(&mut self) -> Result<(), StoreError> {
        let active = self.segments.back_mut().expect("never empty");
        if active.unsynced_bytes() > 0 {
            active.sync()?;
        }
        Ok(())
    }

    /// Syncs and seals the active segment and starts a new one at `first_seq`: every
    /// record of a segment is durable before its successor exists (recovery relies on
    /// it), in every durability mode.
    fn roll(&mut self, first_seq: u64) -> Result<(), StoreError> {
        self.sync_active()?;
        let active = self.segments.back_mut().expect("never empty");
        assert_eq!(active.next_seq(), first_seq);
        active.seal()?;
        self.start_segment(first_seq)
    }

    /// Creates a segment and makes its name durable before anything is written to it.
    fn start_segment(&mut self, first_seq: u64) -> Result<(), StoreError> {
        let segment = Segment::create(
            &self.dir,
            first_seq,
            self.config.segment_bytes_max,
            self.config.index_interval_records,
        )?;
        self.dir
            .sync()
            .map_err(StoreError::io("sync directory for", segment.name()))?;
        self.segments.push_back(segment);
        Ok(())
    }

    /// Deletes every segment all of whose records are below `seq` (`seq` past the end
    /// counts as the end), rolling first if that includes the active one. Records of a
    /// segment that straddles `seq` stay; [`Log::first_seq`] says where the log starts.
    /// Returns how many segments were removed. An I/O error fails the log.
    pub fn purge_below(&mut self, seq: u64) -> Result<usize, StoreError> {
        if self.failed {
            return Err(StoreError::Failed);
        }
        let result = self.purge_below_unchecked(seq).and_then(|removed| {
            self.compact_deletes_if_due()?;
            Ok(removed)
        });
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn purge_below_unchecked(&mut self, seq: u64) -> Result<usize, StoreError> {
        let seq = seq.min(self.next_seq());
        if seq == self.next_seq() && !self.active().is_empty() {
            self.roll(seq)?;
        }
        let mut removed = 0;
        // Oldest first, so a crash part-way leaves a contiguous log.
        while self.segments.len() > 1 && self.segments[0].next_seq() <= seq {
            let segment = self.segments.pop_front().expect("checked length");
            segment.remove(&self.dir)?;
            removed += 1;
        }
        if removed > 0 {
            self.dir
                .sync()
                .map_err(StoreError::io("sync directory after purge", "directory"))?;
        }
        Ok(removed)
    }

    /// Makes `seq` the purge floor durably, if it is above [`Log::first_seq`]: every
    /// record below it is deleted for good (whole segments below it are removed), and
    /// when `seq` is past the end the next sequence becomes `seq`. When this returns
    /// `Ok` a crash keeps the purge; a crash before leaves it whole or not at all. An
    /// I/O error fails the log.
    pub fn raise_floor(&mut self, seq: u64) -> Result<(), StoreError> {
        if self.failed {
            return Err(StoreError::Failed);
        }
        if seq <= self.first_seq() {
            return Ok(());
        }
        let result = self
            .raise_floor_unchecked(seq)
            .and_then(|()| self.compact_deletes_if_due());
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    /// Deletes the records with the sequences in `runs` (in any order, overlapping or
    /// not) durably: one batch of entries appended to the `deletes` file with one
    /// write and one `fdatasync`. Sequences that are not stored (below
    /// [`Log::first_seq`], at or past [`Log::next_seq`]) or already deleted are
    /// ignored; returns how many were deleted now. When this returns `Ok` a crash
    /// keeps every one of them deleted; before, a crash keeps all or none of them. The
    /// records' bytes stay in their segment until it is removed, but no read returns
    /// them again. Appends that are not synced yet stay so (a crash that loses a
    /// deleted record also drops its deletion, at open). An I/O error fails the log.
    pub fn delete(&mut self, runs: &[Range<u64>]) -> Result<u64, StoreError> {
        if self.failed {
            return Err(StoreError::Failed);
        }
        let stored = self.first_seq()..self.next_seq();
        let mut new = RunSet::new();
        for run in runs {
            let clipped = run.start.max(stored.start)..run.end.min(stored.end);
            for gap in self.deleted.gaps(clipped) {
                new.insert(gap);
            }
        }
        if new.is_empty() {
            return Ok(0);
        }
        let result = self.write_deletes(&new).and_then(|()| {
            for run in new.iter() {
                self.deleted.insert(run);
            }
            self.compact_deletes_if_due()
        });
        if result.is_err() {
            self.failed = true;
        }
        result?;
        Ok(new.len())
    }

    /// Appends `runs` to the `deletes` file as one batch, synced.
    fn write_deletes(&mut self, runs: &RunSet) -> Result<(), StoreError> {
        self.scratch.clear();
        deletes::encode_batch(&mut self.scratch, runs.iter());
        deletes::append_batch(
            &self.dir,
            &mut self.deletes_file,
            self.deletes_end,
            &self.scratch,
        )?;
        self.deletes_end += self.scratch.len() as u64;
        self.deletes_entries += runs.run_count() as u64;
        self.scratch.clear();
        Ok(())
    }

    /// Forgets the runs below the first sequence and rewrites the `deletes` file when
    /// most of its entries are stale or merged (or all of them are stale).
    fn compact_deletes_if_due(&mut self) -> Result<(), StoreError> {
        self.deleted.remove_below(self.first_seq());
        if self.deletes_compaction_due() {
            self.rewrite_deletes()?;
        }
        Ok(())
    }

    fn deletes_compaction_due(&self) -> bool {
        let runs = self.deleted.run_count() as u64;
        let nothing_left = runs == 0 && self.deletes_file.is_some();
        nothing_left || self.deletes_entries > DELETES_COMPACT_ENTRIES_MIN.max(2 * runs)
    }

    /// Replaces the `deletes` file with the runs still above the first sequence.
    fn rewrite_deletes(&mut self) -> Result<(), StoreError> {
        let (file, len) = deletes::rewrite(&self.dir, self.deletes_file.take(), &self.deleted)?;
        self.deletes_file = file;
        self.deletes_end = len;
        self.deletes_entries = self.deleted.run_count() as u64;
        Ok(())
    }

    fn raise_floor_unchecked(&mut self, seq: u64) -> Result<(), StoreError> {
        // The floor is durable before any segment changes: a crash after this point
        // finishes the purge at open (a segment below the floor is skipped there), a
        // crash before it changed nothing.
        floor::write_floor(&self.dir, seq)?;
        if self.next_seq() < seq {
            self.jump_to(seq)?;
        }
        self.floor_seq = seq;
        self.purge_below_unchecked(seq).map(drop)
    }

    /// Seals the active segment, which ends below the durable floor `floor_seq`, starts
    /// an empty one at the floor and removes every segment before it.
    fn jump_to(&mut self, floor_seq: u64) -> Result<(), StoreError> {
        self.sync_active()?;
        let active = self.segments.back_mut().expect("never empty");
        assert!(active.next_seq() < floor_seq && active.unsynced_bytes() == 0);
        active.seal()?;
        self.start_segment(floor_seq)?;
        self.purge_below_unchecked(floor_seq)?;
        assert_eq!(
            self.segments.len(),
            1,
            "everything before the floor is gone"
        );
        Ok(())
    }

    /// The segment holding `seq`, if any.
    fn segment_index(&self, seq: u64) -> Option<usize> {
        if !(self.first_seq()..self.next_seq()).contains(&seq) {
            return None;
        }
        let after = self.segments.partition_point(|s| s.first_seq() <= seq);
        let index = after.checked_sub(1).expect("seq is at or after the first");
        assert!(self.segments[index].range().contains(&seq));
        Some(index)
    }

    /// Reads record `seq` into `buf`; `None` if it is not in the log or deleted.
    pub fn read<'b>(
        &self,
        seq: u64,
        buf: &'b mut Vec<u8>,
    ) -> Result<Option<Record<'b>>, StoreError> {
        if self.deleted.contains(seq) {
            return Ok(None);
        }
        let Some(index) = self.segment_index(seq) else {
            return Ok(None);
        };
        let segment = &self.segments[index];
        let offset = segment.locate(seq)?;
        Ok(Some(segment.read_at(offset, seq, buf)?.0))
    }

    /// A cursor at `seq`: [`Log::next`] reads from there on.
    pub fn cursor(&self, seq: u64) -> Cursor {
        Cursor {
            seq,
            position: None,
            window: (0, 0, Vec::new()),
        }
    }

    /// Reads the record at `cursor` into `buf` and moves the cursor past it; `None` at
    /// the end of the log. A cursor below the first sequence skips what was purged,
    /// and deleted records are skipped.
    pub fn next<'b>(
        &self,
        cursor: &mut Cursor,
        buf: &'b mut Vec<u8>,
    ) -> Result<Option<Record<'b>>, StoreError> {
        if cursor.seq < self.first_seq() {
            *cursor = self.cursor(self.first_seq());
        }
        if let Some(run) = self.deleted.run_containing(cursor.seq) {
            *cursor = self.cursor(run.end);
        }
        let next = self.next_with_deleted(cursor, buf)?;
        Ok(next.map(|(record, deleted)| {
            assert!(!deleted, "runs are merged, so a run's end is not deleted");
            record
        }))
    }

    /// Like [`Log::next`], but returns deleted records too, flagged `true`: for the
    /// owner rebuilding its state at open (the last sequence, its timestamp, dedupe
    /// ids). A deleted record's contents must never be delivered.
    pub fn next_with_deleted<'b>(
        &self,
        cursor: &mut Cursor,
        buf: &'b mut Vec<u8>,
    ) -> Result<Option<(Record<'b>, bool)>, StoreError> {
        if cursor.seq < self.first_seq() {
            *cursor = self.cursor(self.first_seq());
        }
        let Some(index) = self.segment_index(cursor.seq) else {
            return Ok(None);
        };
        let segment = &self.segments[index];
        let offset = match cursor.position {
            Some((first_seq, offset)) if first_seq == segment.first_seq() => offset,
            _ => segment.locate(cursor.seq)?,
        };
        let (window_segment, window_at, window) = &mut cursor.window;
        let in_window = *window_segment == segment.first_seq()
            && offset >= *window_at
            && offset + 4 <= *window_at + window.len() as u64;
        let frame = in_window
            .then(|| {
                let from = (offset - *window_at) as usize;
                let len = record::frame_len(&window[from..]).ok()?;
                window.get(from..from + len)
            })
            .flatten();
        let (record, len) = match frame {
            // The window holds the whole frame: checked like any read.
            Some(frame) if offset + frame.len() as u64 <= segment.end() => {
                buf.clear();
                buf.extend_from_slice(frame);
                segment.check_read(offset, cursor.seq, buf)?
            }
            _ => {
                let ahead = (segment.end() - offset).min(CURSOR_WINDOW_BYTES as u64) as usize;
                segment.read_bytes(offset, ahead, window)?;
                *window_segment = segment.first_seq();
                *window_at = offset;
                segment.read_at(offset, cursor.seq, buf)?
            }
        };
        let next_offset = offset + len as u64;
        cursor.seq += 1;
        cursor.position =
            (next_offset < segment.end()).then_some((segment.first_seq(), next_offset));
        let deleted = self.deleted.contains(record.seq);
        Ok(Some((record, deleted)))
    }
}

/// A log directory's segments as [`open_segments`] found them.
#[derive(Debug)]
pub struct OpenedSegments<F> {
    /// Oldest first, contiguous.
    pub segments: VecDeque<Segment<F>>,
    /// The last segment's torn tail, not repaired.
    pub torn_tail: Option<TornTail>,
    /// The durable purge floor ([`floor::FLOOR_NONE`] when none was written).
    pub floor_seq: u64,
    /// Files a crash left behind that are not part of the log: segments wholly below
    /// the floor (an interrupted purge) and unrenamed floor and `deletes` temp files.
    pub leftovers: Vec<String>,
}

/// Reads the purge floor, then opens and scans every segment in `dir` that is not
/// wholly below it (its successor starts at or below the floor), oldest first,
/// checking each one's records and that the segments are contiguous. Returns them
/// with the torn tail of the last one, if any, unrepaired: changes nothing on disk,
/// so `perch store verify` judges a log exactly as [`Log::open`] would without
/// touching it. A torn tail anywhere but in the last segment is corruption (its
/// records were synced before the next segment was created). The `deletes` file is
/// read apart, by [`deletes::read_deletes`].
pub fn open_segments<D: Directory>(
    dir: &D,
    index_interval_records: u32,
) -> Result<OpenedSegments<D::File>, StoreError> {
    open_segments_visiting(dir, index_interval_records, &mut |_| {})
}

/// [`open_segments`] showing `visit` every valid record at or above the purge floor,
/// in order, as recovery reads and checks it.
pub fn open_segments_visiting<D: Directory>(
    dir: &D,
    index_interval_records: u32,
    visit: &mut dyn FnMut(&Record<'_>),
) -> Result<OpenedSegments<D::File>, StoreError> {
    assert!(index_interval_records > 0);
    let names = dir.list().map_err(StoreError::io("list", "directory"))?;
    let floor_seq = floor::read_floor(dir, &names)?;
    let mut leftovers: Vec<String> = names
        .iter()
        .filter(|name| *name == FLOOR_TEMP_FILE_NAME || *name == DELETES_TEMP_FILE_NAME)
        .cloned()
        .collect();
    let mut named: Vec<(u64, String)> = names
        .into_iter()
        .filter_map(|name| Some((parse_segment_name(&name)?, name)))
        .collect();
    named.sort();
    // A segment whose successor starts at or below the floor holds only records
    // below it: a purge removed it from memory but a crash kept the file.
    let below_floor = named
        .iter()
        .skip(1)
        .take_while(|(first_seq, _)| *first_seq <= floor_seq)
        .count();
    leftovers.extend(named.drain(..below_floor).map(|(_, name)| name));
    let mut segments: VecDeque<Segment<D::File>> = VecDeque::new();
    let mut last_tail: Option<TornTail> = None;
    for (first_seq, name) in named {
        if let Some(tail) = last_tail.take() {
            // Every record of a segment is synced before the next one is created, so
            // damage at the end of a segment that has a successor is no torn write.
            let previous = segments.back().expect("a tail belongs to a segment");
            return Err(StoreError::Corrupt {
                file: previous.name().to_string(),
                corruption: Corruption::DamagedSealedSegment {
                    offset: tail.offset,
                    bad: tail.bad,
                },
            });
        }
        if let Some(previous) = segments.back() {
            if previous.next_seq() != first_seq {
                return Err(StoreError::Corrupt {
                    file: name,
                    corruption: Corruption::SequenceGap {
                        expected: previous.next_seq(),
                        found: first_seq,
                    },
                });
            }
        }
        let mut above_floor = |record: &Record<'_>| {
            if record.seq >= floor_seq {
                visit(record)
            }
        };
        let (segment, tail) = Segment::open_visiting(
            dir,
            &name,
            first_seq,
            index_interval_records,
            &mut above_floor,
        )?;
        last_tail = tail;
        segments.push_back(segment);
    }
    Ok(OpenedSegments {
        segments,
        torn_tail: last_tail,
        floor_seq,
        leftovers,
    })
}

fn check_limits(new: &NewRecord<'_>) -> Result<(), EncodeError> {
    if new.subject.len() > u16::MAX as usize {
        return Err(EncodeError::SubjectTooLong {
            bytes: new.subject.len(),
        });
    }
    let bytes = record::encoded_len(new.subject, new.headers, new.payload);
    if bytes > RECORD_BYTES_MAX {
        return Err(EncodeError::RecordTooLarge { bytes });
    }
    Ok(())
}
