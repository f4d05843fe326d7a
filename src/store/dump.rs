//! `perch store dump`: one stream's records as text, one line each —
//!
//! ```text
//! seq=1 time=2023-11-14T22:13:20.000000000Z subject=a.b headers_bytes=0 payload_bytes=2 payload="hi"
//! ```
//!
//! Owns: the line format, RFC 3339 timestamps computed from nanoseconds (no date
//! library: the proleptic Gregorian calendar in a dozen lines), and escaping bytes as
//! text. Deliberately does not: write to the store (it reads through
//! [`open_log_read_only`]), print deleted records (below the purge floor or in the
//! `deletes` file: their bytes may still be in a segment, but they are gone), print
//! headers' contents, or read a corrupt log (verify says where the damage is).

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::deletes::DeletesTornTail;
use super::record::Record;
use super::streams::{self, StreamNameError};
use super::verify::{open_log_read_only, LogError, TornTailWarning};

/// Why a dump did not complete.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The operator named no valid stream.
    #[error(transparent)]
    StreamName(#[from] StreamNameError),
    /// The store has no directory for the stream.
    #[error("no stream {stream:?} in {root}: {dir} is not a directory", root = .root.display(), dir = .dir.display())]
    NoSuchStream {
        stream: String,
        root: PathBuf,
        dir: PathBuf,
    },
    /// The stream's log is corrupt or unreadable (the disk's fault).
    #[error(transparent)]
    Log(#[from] LogError),
    /// Writing the output failed (a closed pipe is [`io::ErrorKind::BrokenPipe`]).
    #[error("writing the dump: {0}")]
    Output(#[source] io::Error),
}

/// What a completed dump printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpSummary {
    /// The stream's directory.
    pub dir: PathBuf,
    pub records: u64,
    /// The log's torn tail, if it has one (the records before it were dumped).
    pub torn_tail: Option<TornTailWarning>,
    /// The `deletes` file's torn tail, if it has one (its whole batches were applied).
    pub deletes_torn_tail: Option<DeletesTornTail>,
}

/// Writes the records of stream `stream` in the store at `root` to `out`, one line
/// each, from sequence `from` (or the oldest record after it) and at most `limit` of
/// them.
pub fn dump_stream(
    root: &Path,
    stream: &str,
    from: u64,
    limit: Option<u64>,
    out: &mut impl Write,
) -> Result<DumpSummary, DumpError> {
    let dir = streams::stream_dir(root, stream)?;
    if !dir.is_dir() {
        return Err(DumpError::NoSuchStream {
            stream: stream.to_string(),
            root: root.to_path_buf(),
            dir,
        });
    }
    let log = open_log_read_only(&dir)?;
    let log_error = |error| LogError {
        dir: dir.clone(),
        error,
    };
    let mut cursor = log.cursor(from).map_err(log_error)?;
    let mut buf = Vec::new();
    let mut records = 0;
    while limit.is_none_or(|limit| records < limit) {
        let Some(record) = log.next(&mut cursor, &mut buf).map_err(log_error)? else {
            break;
        };
        writeln!(out, "{}", RecordLine(&record)).map_err(DumpError::Output)?;
        records += 1;
    }
    out.flush().map_err(DumpError::Output)?;
    let report = log.report();
    Ok(DumpSummary {
        dir: dir.clone(),
        records,
        torn_tail: report.torn_tail,
        deletes_torn_tail: report.deletes_torn_tail,
    })
}

/// A record as one dump line.
pub struct RecordLine<'a>(pub &'a Record<'a>);

impl fmt::Display for RecordLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let record = self.0;
        write!(
            f,
            "seq={} time={} subject={} headers_bytes={} payload_bytes={} payload=\"{}\"",
            record.seq,
            Rfc3339Utc(record.timestamp_ns),
            EscapedText(record.subject),
            record.headers.len(),
            record.payload.len(),
            EscapedText(record.payload)
        )
    }
}

/// Bytes as text on one line: valid UTF-8 as itself except `"`, `\` and control
/// characters, which are escaped (`\"`, `\\`, `\n`, `\r`, `\t`, `\u{7f}`); bytes that
/// are not UTF-8 as `\xNN`.
pub struct EscapedText<'a>(pub &'a [u8]);

impl fmt::Display for EscapedText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                match c {
                    '"' => f.write_str("\\\"")?,
                    '\\' => f.write_str("\\\\")?,
                    '\n' => f.write_str("\\n")?,
                    '\r' => f.write_str("\\r")?,
                    '\t' => f.write_str("\\t")?,
                    c if c.is_control() => write!(f, "\\u{{{:x}}}", c as u32)?,
                    c => f.write_char(c)?,
                }
            }
            for byte in chunk.invalid() {
                write!(f, "\\x{byte:02x}")?;
            }
        }
        Ok(())
    }
}

/// Nanoseconds since the Unix epoch as RFC 3339 in UTC with nanoseconds, e.g.
/// `2023-11-14T22:13:20.000000000Z`. Every i64 is a date between 1677 and 2262.
pub struct Rfc3339Utc(pub i64);

impl fmt::Display for Rfc3339Utc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NANOS_PER_SECOND: i64 = 1_000_000_000;
        const SECONDS_PER_DAY: i64 = 86_400;
        let seconds = self.0.div_euclid(NANOS_PER_SECOND);
        let nanos = self.0.rem_euclid(NANOS_PER_SECOND);
        let days = seconds.div_euclid(SECONDS_PER_DAY);
        let second_of_day = seconds.rem_euclid(SECONDS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
            second_of_day / 3600,
            second_of_day % 3600 / 60,
            second_of_day % 60
        )
    }
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`): count in 400-year eras of 146 097 days starting on March 1st,
/// so that the leap day is the last day of a year.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days from 0000-03-01
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097); // [0, 146096]
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153; // [0, 11], 0 = March
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        let check = |ns: i64, want: &str| assert_eq!(Rfc3339Utc(ns).to_string(), want, "{ns}");
        check(0, "1970-01-01T00:00:00.000000000Z");
        check(1, "1970-01-01T00:00:00.000000001Z");
        check(-1, "1969-12-31T23:59:59.999999999Z");
        check(1_700_000_000_000_000_000, "2023-11-14T22:13:20.000000000Z");
        check(
            951_782_400 * 1_000_000_000,
            "2000-02-29T00:00:00.000000000Z",
        );
        check(
            951_868_799 * 1_000_000_000,
            "2000-02-29T23:59:59.000000000Z",
        );
        check(
            4_107_542_400 * 1_000_000_000,
            "2100-03-01T00:00:00.000000000Z",
        );
        check(1_709_251_199_123_456_789, "2024-02-29T23:59:59.123456789Z");
        check(
            -2_203_977_600 * 1_000_000_000,
            "1900-02-28T00:00:00.000000000Z",
        );
        check(
            -2_203_891_200 * 1_000_000_000,
            "1900-03-01T00:00:00.000000000Z",
        );
        check(i64::MIN, "1677-09-21T00:12:43.145224192Z");
        check(i64::MAX, "2262-04-11T23:47:16.854775807Z");
    }

    /// Every day from 1677 to 2262 follows the day before it.
    #[test]
    fn days_are_consecutive() {
        let month_days = |year: i64, month: u32| match month {
            2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let mut previous = civil_from_days(-106_752);
        assert_eq!(previous, (1677, 9, 21));
        for days in -106_751..=106_751 {
            let (year, month, day) = previous;
            let want = if day < month_days(year, month) {
                (year, month, day + 1)
            } else if month < 12 {
                (year, month + 1, 1)
            } else {
                (year + 1, 1, 1)
            };
            let got = civil_from_days(days);
            assert_eq!(got, want, "day {days}");
            previous = got;
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
    }

    #[test]
    fn deleted_records_are_not_dumped() {
        use crate::store::log::{Log, LogConfig, NewRecord};
        use crate::store::OsDirectory;
        let root = std::env::temp_dir().join(format!("perch-store-dump-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = streams::stream_dir(&root, "S").unwrap();
        let config = LogConfig {
            segment_bytes_max: 256,
            index_interval_records: 2,
        };
        let mut log = Log::open(OsDirectory::open(&dir).unwrap(), config).unwrap();
        let payloads: Vec<String> = (1..=8).map(|n| format!("m{n}")).collect();
        let batch: Vec<NewRecord<'_>> = payloads
            .iter()
            .map(|payload| NewRecord {
                timestamp_ns: 0,
                subject: b"s",
                headers: b"",
                payload: payload.as_bytes(),
            })
            .collect();
        log.append(&batch).unwrap();
        log.delete(&[2..4, 6..7, 8..9]).unwrap();
        drop(log);
        let dump = |from: u64, limit: Option<u64>| {
            let mut out = Vec::new();
            let summary = dump_stream(&root, "S", from, limit, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            let seqs: Vec<String> = text
                .lines()
                .map(|line| line.split(' ').next().unwrap().to_string())
                .collect();
            assert_eq!(summary.records, seqs.len() as u64);
            assert_eq!(summary.deletes_torn_tail, None);
            seqs.join(" ")
        };
        assert_eq!(dump(1, None), "seq=1 seq=4 seq=5 seq=7");
        assert_eq!(dump(2, Some(2)), "seq=4 seq=5");
        assert_eq!(dump(6, None), "seq=7");
        assert_eq!(dump(8, None), "");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn lines() {
        let check = |record: Record<'_>, want: &str| {
            assert_eq!(RecordLine(&record).to_string(), want);
        };
        check(
            Record {
                seq: 1,
                timestamp_ns: 1_700_000_000_000_000_000,
                subject: b"a.b",
                headers: b"",
                payload: b"hi",
            },
            r#"seq=1 time=2023-11-14T22:13:20.000000000Z subject=a.b headers_bytes=0 payload_bytes=2 payload="hi""#,
        );
        check(
            Record {
                seq: 258,
                timestamp_ns: -1,
                subject: b"x",
                headers: b"NATS/1.0\r\n\r\n",
                payload: b"{\"t\":\"21\xc2\xb0C\"}\n\\\t\r\x00\x7f\xff\xc2",
            },
            r#"seq=258 time=1969-12-31T23:59:59.999999999Z subject=x headers_bytes=12 payload_bytes=21 payload="{\"t\":\"21°C\"}\n\\\t\r\u{0}\u{7f}\xff\xc2""#,
        );
    }
}
