//! `perch store verify` and the read-only view of a log that `perch store dump` reads
//! through: every segment of every stream is scanned exactly as recovery scans it
//! ([`open_segments`]: each record's frame, CRC-32C and sequence number, segments
//! contiguous), and so is its `deletes` file ([`read_deletes`]: each entry's CRC, kind
//! and run, batches whole); the verdict is reported per stream. Deleted records are
//! counted apart and never read.
//!
//! Owns: [`ReadOnlyLog`] (a log's segments opened and checked, never repaired, read in
//! order), the per-stream [`LogReport`] and the whole-store [`StoreReport`] with their
//! operator-facing text, which names every bad file by its full path and offset.
//!
//! Deliberately does not: change anything on disk. A torn tail (an unacknowledged
//! write that a crash cut short, of a segment or of the `deletes` file) is a warning
//! here and left in place; `Log::open` repairs it when the broker next opens the log.
//! Opening goes through [`OsDirectory::open_read_only`], so files are not even opened
//! for writing.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use super::deletes::{read_deletes, DeletesTornTail, RunSet, DELETES_FILE_NAME};
use super::error::{BadRecord, StoreError};
use super::file::{Directory, OsDirectory, StorageFile};
use super::log::{open_segments, OpenedSegments, INDEX_INTERVAL_RECORDS_DEFAULT};
use super::record::Record;
use super::segment::{Segment, TornTail};
use super::streams;

/// The unrepaired torn tail of a log's last segment: bytes after the valid records
/// that are no record, with no valid record after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTailWarning {
    /// The segment's file name.
    pub file: String,
    /// Where the valid records end and the torn bytes start.
    pub offset: u64,
    /// Just after the last non-zero byte.
    pub garbage_end: u64,
    /// Why the bytes at `offset` are not the next record.
    pub bad: BadRecord,
}

/// What verifying one log found; only produced for a log that is not corrupt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogReport {
    /// Segment files, empty ones included.
    pub segments: usize,
    /// Records between `first_seq` and `next_seq` that are not deleted.
    pub records: u64,
    /// Records between `first_seq` and `next_seq` that the `deletes` file deletes.
    pub deleted: u64,
    /// The oldest sequence stored (`next_seq` when there is none).
    pub first_seq: u64,
    /// The sequence the next record would get.
    pub next_seq: u64,
    /// Bytes of valid records (framing included), excluding preallocated space.
    pub record_bytes: u64,
    pub torn_tail: Option<TornTailWarning>,
    /// The unrepaired torn tail of the `deletes` file: a batch of deletions that a
    /// crash cut short, never acknowledged.
    pub deletes_torn_tail: Option<DeletesTornTail>,
}

impl LogReport {
    /// The newest sequence stored (deleted or not), if any is.
    pub fn last_seq(&self) -> Option<u64> {
        (self.next_seq > self.first_seq).then(|| self.next_seq - 1)
    }

    /// Whether recovery will repair something (a warning, not a failure).
    pub fn has_torn_tail(&self) -> bool {
        self.torn_tail.is_some() || self.deletes_torn_tail.is_some()
    }
}

/// A log opened for reading only: its segments scanned and checked like recovery does,
/// a torn tail kept as found. Unlike `Log`, it takes no appends and has no segment at
/// all when the directory holds none.
#[derive(Debug)]
pub struct ReadOnlyLog<F> {
    /// Oldest first, contiguous.
    segments: VecDeque<Segment<F>>,
    torn_tail: Option<TornTail>,
    /// The purge floor: records below it are deleted.
    floor_seq: u64,
    /// The `deletes` file's runs between the first and the next sequence.
    deleted: RunSet,
    deletes_torn_tail: Option<DeletesTornTail>,
}

/// A position in a [`ReadOnlyLog`]; see [`ReadOnlyLog::next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadCursor {
    seq: u64,
    /// The segment `seq` is in (or the number of segments at the end) and its offset.
    segment: usize,
    offset: u64,
}

impl<F: StorageFile> ReadOnlyLog<F> {
    /// Scans every segment in `dir`. Corruption is an error naming the file and offset;
    /// a torn tail is not, see [`ReadOnlyLog::report`]. Writes nothing, even if `dir`
    /// would allow it.
    pub fn open<D: Directory<File = F>>(dir: &D) -> Result<Self, StoreError> {
        // Leftovers of an interrupted purge are below the floor: not the log's, and
        // the broker removes them at open.
        let OpenedSegments {
            segments,
            torn_tail,
            floor_seq,
            leftovers: _,
        } = open_segments(dir, INDEX_INTERVAL_RECORDS_DEFAULT)?;
        if torn_tail.is_some() {
            assert!(!segments.is_empty(), "a tail belongs to a segment");
        }
        let names = dir.list().map_err(StoreError::io("list", "directory"))?;
        let deletes = read_deletes(dir, &names)?;
        let mut log = Self {
            segments,
            torn_tail,
            floor_seq,
            deleted: deletes.runs,
            deletes_torn_tail: deletes.torn_tail,
        };
        // Runs below the first sequence are stale; runs at or past the end delete
        // records a crash lost, and the broker drops them at open.
        let (first_seq, next_seq) = log.bounds();
        log.deleted.remove_below(first_seq);
        log.deleted.remove_from(next_seq);
        Ok(log)
    }

    /// The first and the next sequence, as the broker will see them.
    fn bounds(&self) -> (u64, u64) {
        // A floor past the end (a purge a crash interrupted) is where the broker
        // will start its next segment.
        let next_seq = self
            .segments
            .back()
            .map_or(1, |s| s.next_seq())
            .max(self.floor_seq);
        let first_seq = self
            .segments
            .front()
            .map_or(next_seq, |s| s.first_seq())
            .max(self.floor_seq);
        (first_seq, next_seq)
    }

    /// Whether the `deletes` file deletes `seq`.
    pub fn is_deleted(&self, seq: u64) -> bool {
        self.deleted.contains(seq)
    }

    /// The log's shape and its torn tails, if any.
    pub fn report(&self) -> LogReport {
        let (first_seq, next_seq) = self.bounds();
        let torn_tail = self.torn_tail.map(|tail| TornTailWarning {
            file: self
                .segments
                .back()
                .expect("a tail belongs to a segment")
                .name()
                .to_string(),
            offset: tail.offset,
            garbage_end: tail.garbage_end,
            bad: tail.bad,
        });
        let deleted = self.deleted.count_in(first_seq..next_seq);
        LogReport {
            segments: self.segments.len(),
            records: next_seq - first_seq - deleted,
            deleted,
            first_seq,
            next_seq,
            record_bytes: self.segments.iter().map(|s| s.end()).sum(),
            torn_tail,
            deletes_torn_tail: self.deletes_torn_tail,
        }
    }

    /// A cursor at `seq`, or at the oldest record if `seq` is below it.
    pub fn cursor(&self, seq: u64) -> Result<ReadCursor, StoreError> {
        // Records below the purge floor are deleted, and so are the `deletes` file's.
        let mut seq = seq.max(self.floor_seq);
        if let Some(run) = self.deleted.run_containing(seq) {
            seq = run.end;
        }
        let found = self
            .segments
            .iter()
            .enumerate()
            .find(|(_, s)| s.range().contains(&seq) || s.first_seq() > seq);
        Ok(match found {
            Some((index, segment)) if segment.first_seq() > seq => ReadCursor {
                seq: segment.first_seq(),
                segment: index,
                offset: 0,
            },
            Some((index, segment)) => ReadCursor {
                seq,
                segment: index,
                offset: segment.locate(seq)?,
            },
            None => ReadCursor {
                seq,
                segment: self.segments.len(),
                offset: 0,
            },
        })
    }

    /// Reads the record at `cursor` into `buf`, checking its CRC again, and moves the
    /// cursor past it; `None` at the end of the log. Deleted records are skipped.
    pub fn next<'b>(
        &self,
        cursor: &mut ReadCursor,
        buf: &'b mut Vec<u8>,
    ) -> Result<Option<Record<'b>>, StoreError> {
        loop {
            if self.deleted.contains(cursor.seq) {
                *cursor = self.cursor(cursor.seq)?;
            }
            let Some(segment) = self.segments.get(cursor.segment) else {
                return Ok(None);
            };
            if cursor.seq < segment.next_seq() {
                let (record, len) = segment.read_at(cursor.offset, cursor.seq, buf)?;
                cursor.seq += 1;
                cursor.offset += len as u64;
                return Ok(Some(record));
            }
            // Segments are contiguous: the next one starts at `cursor.seq`.
            cursor.segment += 1;
            cursor.offset = 0;
        }
    }
}

/// Verifies the log in `dir`; `Err` is corruption (or an I/O error) naming the file.
pub fn verify_log<D: Directory>(dir: &D) -> Result<LogReport, StoreError> {
    Ok(ReadOnlyLog::open(dir)?.report())
}

/// A store error with the directory it happened in, so that its text names files by
/// their full paths.
#[derive(Debug)]
pub struct LogError {
    pub dir: PathBuf,
    pub error: StoreError,
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = |file: &str| {
            // The log names the directory itself "directory" (a listing or a sync).
            if file == "directory" {
                self.dir.clone()
            } else {
                self.dir.join(file)
            }
        };
        match &self.error {
            StoreError::Corrupt { file, corruption } => {
                write!(f, "corrupt {}: {corruption}", path(file).display())
            }
            StoreError::Io { op, file, source } => {
                write!(f, "{op} {}: {source}", path(file).display())
            }
            other => write!(f, "{}: {other}", self.dir.display()),
        }
    }
}

impl std::error::Error for LogError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Opens the log in the existing directory `dir` read-only (see the module docs).
pub fn open_log_read_only(
    dir: &Path,
) -> Result<ReadOnlyLog<<OsDirectory as Directory>::File>, LogError> {
    let log_error = |error| LogError {
        dir: dir.to_path_buf(),
        error,
    };
    let os_dir = OsDirectory::open_read_only(dir)
        .map_err(StoreError::io("open", "directory"))
        .map_err(log_error)?;
    ReadOnlyLog::open(&os_dir).map_err(log_error)
}

/// One stream's verdict.
#[derive(Debug)]
pub struct StreamVerdict {
    pub name: String,
    pub dir: PathBuf,
    pub result: Result<LogReport, LogError>,
}

/// What verifying a whole store found, stream by stream.
#[derive(Debug)]
pub struct StoreReport {
    pub root: PathBuf,
    pub streams: Vec<StreamVerdict>,
}

impl StoreReport {
    /// Streams whose logs are corrupt or could not be read.
    pub fn failed(&self) -> usize {
        self.streams.iter().filter(|s| s.result.is_err()).count()
    }

    /// Streams with a torn tail (a warning, not a failure).
    pub fn warned(&self) -> usize {
        let torn = |s: &StreamVerdict| matches!(&s.result, Ok(r) if r.has_torn_tail());
        self.streams.iter().filter(|s| torn(s)).count()
    }

    /// True when every record of every stream checked out.
    pub fn is_clean(&self) -> bool {
        self.failed() == 0
    }
}

/// Verifies every stream of the store at `root` (see [`streams::list_streams`]); one
/// stream's corruption does not stop the others from being checked. `Err` only when
/// the streams cannot be listed (`root` is no store).
pub fn verify_store(root: &Path) -> io::Result<StoreReport> {
    let names = streams::list_streams(root)?;
    let streams = names
        .into_iter()
        .map(|name| {
            let dir = streams::stream_dir(root, &name).expect("listed names are valid");
            let result = open_log_read_only(&dir).map(|log| log.report());
            StreamVerdict { name, dir, result }
        })
        .collect();
    Ok(StoreReport {
        root: root.to_path_buf(),
        streams,
    })
}

impl fmt::Display for LogReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: u64| if n == 1 { "" } else { "s" };
        write!(
            f,
            "{} segment{}, {} record{}",
            self.segments,
            plural(self.segments as u64),
            self.records,
            plural(self.records)
        )?;
        match self.last_seq() {
            Some(last) => write!(f, ", seq {}..={last}", self.first_seq)?,
            None => write!(f, ", next seq {}", self.next_seq)?,
        }
        if self.deleted > 0 {
            write!(f, " ({} deleted)", self.deleted)?;
        }
        write!(f, ", {} bytes", self.record_bytes)
    }
}

impl fmt::Display for StreamVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.result {
            Ok(report) => {
                write!(f, "stream {}: ok: {report}", self.name)?;
                if let Some(tail) = &report.torn_tail {
                    write!(
                        f,
                        "\n  warning: torn tail at offset {} of {} ({}), non-zero bytes up to \
                         offset {}: a write cut short by a crash, never acknowledged; the \
                         broker zeroes it when it opens the stream",
                        tail.offset,
                        self.dir.join(&tail.file).display(),
                        tail.bad,
                        tail.garbage_end
                    )?;
                }
                if let Some(tail) = &report.deletes_torn_tail {
                    write!(
                        f,
                        "\n  warning: torn tail at offset {} of {} ({}), {} bytes long: a batch \
                         of deletions cut short by a crash, never acknowledged; the broker cuts \
                         it off when it opens the stream",
                        tail.offset,
                        self.dir.join(DELETES_FILE_NAME).display(),
                        tail.reason,
                        tail.file_len - tail.offset
                    )?;
                }
                Ok(())
            }
            Err(error) => write!(f, "stream {}: FAILED: {error}", self.name),
        }
    }
}

impl fmt::Display for StoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for stream in &self.streams {
            writeln!(f, "{stream}")?;
        }
        let count = self.streams.len();
        write!(
            f,
            "{count} stream{} in {}: {} ok, {} failed, {} with warnings",
            if count == 1 { "" } else { "s" },
            self.root.display(),
            count - self.failed(),
            self.failed(),
            self.warned()
        )
    }
}

#[cfg(test)]
// Runs of sequences are ranges: a list of one run is what these tests mean.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::store::file::SimDirectory;
    use crate::store::log::{Log, LogConfig, NewRecord};
    use crate::store::segment::segment_name;

    const CONFIG: LogConfig = LogConfig {
        segment_bytes_max: 256,
        index_interval_records: 2,
    };

    /// Appends `count` records (seq 7 has payload "message 07") in batches of 3.
    fn fill<D: Directory>(log: &mut Log<D>, count: u64) {
        let payloads: Vec<String> = (1..=count).map(|n| format!("message {n:02}")).collect();
        for chunk in payloads.chunks(3) {
            let batch: Vec<NewRecord<'_>> = chunk
                .iter()
                .map(|p| NewRecord {
                    timestamp_ns: 1_700_000_000_000_000_000,
                    subject: b"dev.1.telemetry",
                    headers: b"",
                    payload: p.as_bytes(),
                })
                .collect();
            log.append(&batch).unwrap();
        }
    }

    /// A simulated log of `count` records in 256-byte segments (each record is 55
    /// bytes, so 4 to a segment).
    fn sim_log(count: u64) -> SimDirectory {
        let dir = SimDirectory::new();
        let mut log = Log::open(dir.clone(), CONFIG).unwrap();
        fill(&mut log, count);
        dir
    }

    /// Every file's bytes, to show verify changed nothing.
    fn snapshot(dir: &SimDirectory) -> Vec<(String, Vec<u8>)> {
        let names = dir.list().unwrap();
        names
            .into_iter()
            .map(|n| {
                let bytes = dir.live_bytes(&n).unwrap();
                (n, bytes)
            })
            .collect()
    }

    /// Damages the file `name` of a 10-record log, verifies, checks nothing changed
    /// and renders the verdict.
    fn verify_after(name: &str, damage: impl FnOnce(&mut Vec<u8>)) -> String {
        let dir = sim_log(10);
        let mut bytes = dir.live_bytes(name).unwrap();
        damage(&mut bytes);
        dir.replace_durably(name, bytes);
        let before = snapshot(&dir);
        let got = match verify_log(&dir) {
            Ok(report) => {
                let tail = report.torn_tail.as_ref().map(|t| {
                    format!(
                        "; torn tail {} at {}..{}: {}",
                        t.file, t.offset, t.garbage_end, t.bad
                    )
                });
                format!("{report}{}", tail.unwrap_or_default())
            }
            Err(error) => error.to_string(),
        };
        assert_eq!(snapshot(&dir), before, "verify changed nothing");
        got
    }

    fn check(name: &str, damage: impl FnOnce(&mut Vec<u8>), want: &str) {
        assert_eq!(verify_after(name, damage), want);
    }

    #[test]
    fn verdicts_on_the_simulated_disk() {
        let first = segment_name(1);
        let last = segment_name(9);
        check(
            &first,
            |_| {},
            "3 segments, 10 records, seq 1..=10, 550 bytes",
        );
        // Garbage after the last record of the last segment: a torn write.
        check(
            &last,
            |b| b[120] = 7,
            "3 segments, 10 records, seq 1..=10, 550 bytes; torn tail \
             00000000000000000009.seg at 110..121: bad record length 0",
        );
        // The last record itself damaged looks the same: it is dropped by recovery.
        check(
            &last,
            |b| b[100] ^= 1,
            "3 segments, 9 records, seq 1..=9, 495 bytes; torn tail \
             00000000000000000009.seg at 55..110: bad record crc: stored 0xeeef2d56, \
             computed 0x25b956f3",
        );
        // A bit flip before a valid record is corruption, named by file and offset.
        check(
            &last,
            |b| b[40] ^= 1,
            "corrupt 00000000000000000009.seg: bad record at offset 0 (bad record crc: \
             stored 0x54e76709, computed 0x33699a08) followed by valid record 10 at offset 55",
        );
        // The last record of a sealed segment is no torn write.
        check(
            &first,
            |b| b[200] ^= 1,
            "corrupt 00000000000000000001.seg: bad record at offset 165 (bad record crc: \
             stored 0xee939005, computed 0xd9d067b8) of a segment that has a successor",
        );
    }

    #[test]
    fn empty_and_missing_segments() {
        let dir = SimDirectory::new();
        let report = verify_log(&dir).unwrap();
        assert_eq!(
            report.to_string(),
            "0 segments, 0 records, next seq 1, 0 bytes"
        );
        let dir = sim_log(0);
        assert_eq!(
            verify_log(&dir).unwrap().to_string(),
            "1 segment, 0 records, next seq 1, 0 bytes"
        );
        // Purged to the end: one empty segment named by the next sequence.
        let dir = SimDirectory::new();
        let mut log = Log::open(dir.clone(), CONFIG).unwrap();
        fill(&mut log, 6);
        log.purge_below(7).unwrap();
        assert_eq!(
            verify_log(&dir).unwrap().to_string(),
            "1 segment, 0 records, next seq 7, 0 bytes"
        );
        // A segment missing from the middle.
        let dir = sim_log(10);
        dir.remove(&segment_name(5)).unwrap();
        assert_eq!(
            verify_log(&dir).unwrap_err().to_string(),
            "corrupt 00000000000000000009.seg: segment starts at sequence 9, the previous \
             one ends before 5"
        );
    }

    #[test]
    fn cursor_reads_every_record_from_anywhere() {
        let dir = sim_log(10);
        let log = ReadOnlyLog::open(&dir).unwrap();
        let mut buf = Vec::new();
        for from in 0..=12 {
            let mut cursor = log.cursor(from).unwrap();
            let mut seqs = Vec::new();
            while let Some(record) = log.next(&mut cursor, &mut buf).unwrap() {
                assert_eq!(
                    record.payload,
                    format!("message {:02}", record.seq).as_bytes()
                );
                seqs.push(record.seq);
            }
            let want: Vec<u64> = (from.max(1)..=10).collect();
            assert_eq!(seqs, want, "from {from}");
        }
        // After a purge the cursor starts at the oldest record left.
        let dir = SimDirectory::new();
        let mut log = Log::open(dir.clone(), CONFIG).unwrap();
        fill(&mut log, 10);
        log.purge_below(6).unwrap();
        let log = ReadOnlyLog::open(&dir).unwrap();
        let mut cursor = log.cursor(1).unwrap();
        let record = log.next(&mut cursor, &mut buf).unwrap().unwrap();
        assert_eq!(record.seq, 5);
        // A durable purge floor hides the records below it, as the broker does.
        let mut log = Log::open(dir.clone(), CONFIG).unwrap();
        log.raise_floor(7).unwrap();
        let read_only = ReadOnlyLog::open(&dir).unwrap();
        let mut cursor = read_only.cursor(1).unwrap();
        let record = read_only.next(&mut cursor, &mut buf).unwrap().unwrap();
        assert_eq!(record.seq, 7);
        let report = read_only.report();
        assert_eq!(
            (report.first_seq, report.next_seq, report.records),
            (7, 11, 4)
        );
        log.raise_floor(15).unwrap();
        let report = ReadOnlyLog::open(&dir).unwrap().report();
        assert_eq!(
            (report.first_seq, report.next_seq, report.records),
            (15, 15, 0)
        );
    }

    #[test]
    fn deletes_are_verified_counted_and_never_read() {
        let dir = sim_log(10);
        let mut log = Log::open(dir.clone(), CONFIG).unwrap();
        log.delete(&[3..5, 10..11]).unwrap();
        log.delete(&[7..8]).unwrap();
        drop(log);
        let read_only = ReadOnlyLog::open(&dir).unwrap();
        let mut buf = Vec::new();
        for (from, want) in [
            (0, vec![1, 2, 5, 6, 8, 9]),
            (3, vec![5, 6, 8, 9]),
            (10, vec![]),
        ] {
            let mut cursor = read_only.cursor(from).unwrap();
            let mut seqs = Vec::new();
            while let Some(record) = read_only.next(&mut cursor, &mut buf).unwrap() {
                seqs.push(record.seq);
            }
            assert_eq!(seqs, want, "from {from}");
        }
        assert!(read_only.is_deleted(4) && !read_only.is_deleted(5));
        let report = verify_log(&dir).unwrap();
        assert_eq!(
            report.to_string(),
            "3 segments, 6 records, seq 1..=10 (4 deleted), 550 bytes"
        );
        let before = snapshot(&dir);
        // A batch cut short: a warning, and the file stays as it was.
        let good = dir.live_bytes("deletes").unwrap();
        let mut torn = good.clone();
        torn.truncate(good.len() - 5);
        dir.replace_durably("deletes", torn);
        let report = verify_log(&dir).unwrap();
        assert_eq!(report.deleted, 3, "the torn batch deleted 7");
        let tail = report.deletes_torn_tail.unwrap();
        assert_eq!(
            (tail.offset, tail.file_len, tail.reason),
            (48, 67, "partial entry")
        );
        assert!(report.has_torn_tail());
        // Damage before a valid entry: corruption, named with its offsets.
        let mut damaged = good;
        damaged[2] ^= 0x40;
        dir.replace_durably("deletes", damaged);
        assert_eq!(
            verify_log(&dir).unwrap_err().to_string(),
            "corrupt deletes: bad deletes entry at offset 0 (crc mismatch) followed by a \
             valid entry at offset 24"
        );
        let after: Vec<String> = snapshot(&dir).into_iter().map(|(name, _)| name).collect();
        let names: Vec<String> = before.into_iter().map(|(name, _)| name).collect();
        assert_eq!(after, names, "verify added or removed nothing");
    }

    /// A store at a fresh temporary path, removed on drop.
    struct TempStore(PathBuf);

    impl TempStore {
        fn new(tag: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("perch-store-verify-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            Self(path)
        }

        fn stream(&self, name: &str, count: u64) -> PathBuf {
            let dir = streams::stream_dir(&self.0, name).unwrap();
            let mut log = Log::open(OsDirectory::open(&dir).unwrap(), CONFIG).unwrap();
            fill(&mut log, count);
            dir
        }

        /// Every file under the store with its bytes.
        fn snapshot(&self) -> Vec<(PathBuf, Vec<u8>)> {
            let mut files = Vec::new();
            let mut dirs = vec![self.0.clone()];
            while let Some(dir) = dirs.pop() {
                for entry in std::fs::read_dir(&dir).unwrap() {
                    let path = entry.unwrap().path();
                    if path.is_dir() {
                        dirs.push(path);
                    } else {
                        let bytes = std::fs::read(&path).unwrap();
                        files.push((path, bytes));
                    }
                }
            }
            files.sort();
            files
        }
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn flip(path: &Path, at: usize, mask: u8) {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[at] ^= mask;
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn verdicts_on_a_real_directory() {
        let store = TempStore::new("real");
        assert!(verify_store(&store.0).is_err(), "no store yet");
        let orders = store.stream("ORDERS", 10);
        store.stream("EMPTY", 0);
        let root = store.0.display().to_string();

        let report = verify_store(&store.0).unwrap();
        assert!(report.is_clean());
        assert_eq!(
            report.to_string(),
            format!(
                "stream EMPTY: ok: 1 segment, 0 records, next seq 1, 0 bytes\n\
                 stream ORDERS: ok: 3 segments, 10 records, seq 1..=10, 550 bytes\n\
                 2 streams in {root}: 2 ok, 0 failed, 0 with warnings"
            )
        );

        // A torn tail: a warning, and the file is left as it was.
        let last = orders.join(segment_name(9));
        flip(&last, 130, 0x5a);
        let before = store.snapshot();
        let report = verify_store(&store.0).unwrap();
        assert!(report.is_clean());
        assert_eq!(report.warned(), 1);
        assert_eq!(
            report.streams[1].to_string(),
            format!(
                "stream ORDERS: ok: 3 segments, 10 records, seq 1..=10, 550 bytes\n  \
                 warning: torn tail at offset 110 of {} (bad record length 0), non-zero \
                 bytes up to offset 131: a write cut short by a crash, never acknowledged; \
                 the broker zeroes it when it opens the stream",
                last.display()
            )
        );
        assert_eq!(store.snapshot(), before, "verify changed nothing");

        // A bit flip in a sealed segment: the stream fails, named by path and offset;
        // the other stream is still checked.
        let first = orders.join(segment_name(1));
        flip(&first, 60, 0x01);
        let report = verify_store(&store.0).unwrap();
        assert!(!report.is_clean());
        assert_eq!(
            report.to_string(),
            format!(
                "stream EMPTY: ok: 1 segment, 0 records, next seq 1, 0 bytes\n\
                 stream ORDERS: FAILED: corrupt {}: bad record at offset 55 (bad record \
                 crc: stored 0x6fee13d4, computed 0x6fee12d4) followed by valid record 3 \
                 at offset 110\n\
                 2 streams in {root}: 1 ok, 1 failed, 0 with warnings",
                first.display()
            )
        );
        assert_eq!(
            store.snapshot().len(),
            before.len(),
            "no file added or removed"
        );

        // Deletions: counted apart, and a torn batch is a warning.
        let events = store.stream("EVENTS", 6);
        let mut log = Log::open(OsDirectory::open(&events).unwrap(), CONFIG).unwrap();
        log.delete(&[2..4]).unwrap();
        log.delete(&[5..6]).unwrap();
        drop(log);
        let deletes = events.join("deletes");
        let mut bytes = std::fs::read(&deletes).unwrap();
        bytes.truncate(bytes.len() - 1);
        std::fs::write(&deletes, bytes).unwrap();
        let report = verify_store(&store.0).unwrap();
        assert_eq!(
            report.streams[1].to_string(),
            format!(
                "stream EVENTS: ok: 2 segments, 4 records, seq 1..=6 (2 deleted), 330 bytes\n  \
                 warning: torn tail at offset 24 of {} (partial entry), 23 bytes long: a \
                 batch of deletions cut short by a crash, never acknowledged; the broker \
                 cuts it off when it opens the stream",
                deletes.display()
            )
        );
        assert_eq!(report.warned(), 1);
    }
}
