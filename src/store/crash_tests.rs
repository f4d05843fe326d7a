//! Whole-log tests on the simulated disk: the log's behaviour (rolling, reads,
//! purges, deletions, unsynced appends, failing closed) and the crash test, which
//! cuts power at thousands of points and checks that every durable record comes back,
//! in order, with its exact bytes, unless an acknowledged deletion removed it; that
//! every acknowledged deletion stays; that nothing else comes back but intact records
//! that were sent; and that `verify` reads exactly what recovery will.
//!
//! A failing crash run prints its seed; `PERCH_STORE_SEED=<seed> cargo test crash`
//! replays just that one. `PERCH_STORE_SEEDS=<n>` runs more seeds.

// Runs of sequences are ranges: a list of one run is what these tests mean.
#![allow(clippy::single_range_in_vec_init)]

use std::collections::BTreeSet;
use std::ops::Range;

use super::error::StoreError;
use super::file::{Directory, SimDirectory, SimRng};
use super::log::{Log, LogConfig, NewRecord};
use super::record::Record;
use super::verify::{verify_log, ReadOnlyLog};

/// One record as the test sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    timestamp_ns: i64,
    subject: Vec<u8>,
    headers: Vec<u8>,
    payload: Vec<u8>,
}

impl Sent {
    fn as_new(&self) -> NewRecord<'_> {
        NewRecord {
            timestamp_ns: self.timestamp_ns,
            subject: &self.subject,
            headers: &self.headers,
            payload: &self.payload,
        }
    }

    /// A placeholder for a sequence that a floor past the end skipped.
    fn skipped() -> Self {
        Self {
            timestamp_ns: 0,
            subject: Vec::new(),
            headers: Vec::new(),
            payload: Vec::new(),
        }
    }

    fn matches(&self, record: &Record<'_>) -> bool {
        record.timestamp_ns == self.timestamp_ns
            && record.subject == self.subject
            && record.headers == self.headers
            && record.payload == self.payload
    }
}

fn sent(rng: &mut SimRng, payload_bytes_max: u64) -> Sent {
    let payload_len = rng.below(payload_bytes_max + 1) as usize;
    let subject = format!("dev.{}.telemetry", rng.below(1000)).into_bytes();
    let headers = if rng.chance(1, 4) {
        format!("NATS/1.0\r\nNats-Msg-Id: {}\r\n\r\n", rng.next_u64()).into_bytes()
    } else {
        Vec::new()
    };
    Sent {
        timestamp_ns: rng.next_u64() as i64,
        subject,
        headers,
        payload: (0..payload_len).map(|_| rng.next_u64() as u8).collect(),
    }
}

fn small_config(rng: &mut SimRng) -> LogConfig {
    LogConfig {
        segment_bytes_max: 256 + rng.below(2048),
        index_interval_records: 1 + rng.below(8) as u32,
    }
}

/// Every record of the log, in order, with its sequence.
fn read_all<D: Directory>(log: &Log<D>) -> Result<Vec<(u64, Sent)>, StoreError> {
    let mut out = Vec::new();
    let mut cursor = log.cursor(0);
    let mut buf = Vec::new();
    while let Some(record) = log.next(&mut cursor, &mut buf)? {
        out.push((
            record.seq,
            Sent {
                timestamp_ns: record.timestamp_ns,
                subject: record.subject.to_vec(),
                headers: record.headers.to_vec(),
                payload: record.payload.to_vec(),
            },
        ));
    }
    Ok(out)
}

#[test]
fn append_read_roll_and_reopen() {
    let mut rng = SimRng::new(1);
    let dir = SimDirectory::new();
    let config = LogConfig {
        segment_bytes_max: 512,
        index_interval_records: 4,
    };
    let mut log = Log::open(dir.clone(), config).unwrap();
    assert_eq!((log.first_seq(), log.next_seq(), log.last_seq()), (1, 1, 0));
    assert!(log.is_empty());
    let records: Vec<Sent> = (0..100).map(|_| sent(&mut rng, 60)).collect();
    for batch in records.chunks(7) {
        let new: Vec<NewRecord<'_>> = batch.iter().map(Sent::as_new).collect();
        let first = log.next_seq();
        assert_eq!(log.append(&new).unwrap(), first..first + batch.len() as u64);
    }
    assert_eq!(log.append(&[]).unwrap(), 101..101);
    assert!(log.segment_count() > 10, "{} segments", log.segment_count());
    let check_all = |log: &Log<SimDirectory>| {
        let mut buf = Vec::new();
        for (i, want) in records.iter().enumerate() {
            let record = log.read(i as u64 + 1, &mut buf).unwrap().unwrap();
            assert!(want.matches(&record), "seq {}", i + 1);
        }
        assert_eq!(log.read(0, &mut buf).unwrap(), None);
        assert_eq!(log.read(101, &mut buf).unwrap(), None);
        let all = read_all(log).unwrap();
        assert_eq!(all.len(), 100);
        for (i, (seq, got)) in all.iter().enumerate() {
            assert_eq!((*seq, got), (i as u64 + 1, &records[i]));
        }
    };
    check_all(&log);
    let segments = log.segment_count();
    drop(log);
    dir.crash(5); // everything was synced: a crash loses nothing
    let log = Log::open(dir.clone(), config).unwrap();
    assert_eq!(log.segment_count(), segments);
    check_all(&log);
    // A cursor in the middle goes on from there.
    let mut cursor = log.cursor(50);
    let mut buf = Vec::new();
    let record = log.next(&mut cursor, &mut buf).unwrap().unwrap();
    assert_eq!(record.seq, 50);
    assert_eq!(cursor.seq(), 51);
}

#[test]
fn oversize_record_gets_its_own_segment_and_limits_are_checked() {
    let dir = SimDirectory::new();
    let config = LogConfig {
        segment_bytes_max: 256,
        index_interval_records: 1,
    };
    let mut log = Log::open(dir, config).unwrap();
    let big = vec![7; 1000];
    let small = NewRecord {
        timestamp_ns: 0,
        subject: b"a",
        headers: b"",
        payload: b"x",
    };
    let large = NewRecord {
        payload: &big,
        ..small
    };
    assert_eq!(log.append(&[small, large, small]).unwrap(), 1..4);
    assert_eq!(log.segment_count(), 3);
    let mut buf = Vec::new();
    assert_eq!(log.read(2, &mut buf).unwrap().unwrap().payload, &big[..]);
    let subject = vec![b's'; 70_000];
    let too_long = NewRecord {
        subject: &subject,
        ..small
    };
    let error = log.append(&[small, too_long]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "subject of 70000 bytes is longer than 65535 bytes"
    );
    assert_eq!(log.next_seq(), 4, "nothing of a refused batch is written");
    assert!(!log.is_failed());
}

#[test]
fn raised_floor_survives_a_crash_and_moves_the_next_sequence() {
    let mut rng = SimRng::new(3);
    let dir = SimDirectory::new();
    let config = LogConfig {
        segment_bytes_max: 256,
        index_interval_records: 2,
    };
    let mut log = Log::open(dir.clone(), config).unwrap();
    let records: Vec<Sent> = (0..20).map(|_| sent(&mut rng, 40)).collect();
    let new: Vec<NewRecord<'_>> = records.iter().map(Sent::as_new).collect();
    log.append(&new).unwrap();
    // Inside a segment: the records below stay on disk but are gone for good.
    let first_segment = log.segment_count();
    log.raise_floor(2).unwrap();
    assert_eq!(log.segment_count(), first_segment);
    log.raise_floor(1).unwrap();
    assert_eq!(log.first_seq(), 2);
    let mut buf = Vec::new();
    assert!(log.read(1, &mut buf).unwrap().is_none());
    drop(log);
    dir.crash(1);
    let mut log = Log::open(dir.clone(), config).unwrap();
    assert_eq!((log.first_seq(), log.next_seq()), (2, 21));
    assert_eq!(read_all(&log).unwrap()[0].0, 2);
    // Past the end: the log is empty and counts on from the floor.
    log.raise_floor(30).unwrap();
    assert_eq!(
        (log.first_seq(), log.next_seq(), log.segment_count()),
        (30, 30, 1)
    );
    drop(log);
    dir.crash(2);
    let mut log = Log::open(dir.clone(), config).unwrap();
    assert_eq!(
        (log.first_seq(), log.next_seq(), log.segment_count()),
        (30, 30, 1)
    );
    assert_eq!(log.append(&[records[0].as_new()]).unwrap(), 30..31);
    // A floor that is durable but whose segments were not yet changed (a crash
    // between the two) is finished at open: the stale segment is removed.
    log.raise_floor(40).unwrap();
    drop(log);
    dir.create(&crate::store::segment::segment_name(31))
        .unwrap();
    dir.sync().unwrap();
    let log = Log::open(dir.clone(), config).unwrap();
    assert_eq!(
        (log.first_seq(), log.next_seq(), log.segment_count()),
        (40, 40, 1)
    );
    assert!(!dir
        .list()
        .unwrap()
        .contains(&crate::store::segment::segment_name(31)));
    // A damaged floor is corruption, not a reason to bring records back.
    drop(log);
    let mut bytes = dir
        .live_bytes(crate::store::floor::FLOOR_FILE_NAME)
        .unwrap();
    bytes[9] ^= 1;
    dir.replace_durably(crate::store::floor::FLOOR_FILE_NAME, bytes);
    let error = Log::open(dir, config).unwrap_err();
    assert_eq!(
        error.to_string(),
        "corrupt purge-floor: bad purge floor: crc mismatch"
    );
}

#[test]
fn purge_removes_whole_segments() {
    let mut rng = SimRng::new(2);
    let dir = SimDirectory::new();
    let config = LogConfig {
        segment_bytes_max: 256,
        index_interval_records: 2,
    };
    let mut log = Log::open(dir.clone(), config).unwrap();
    let records: Vec<Sent> = (0..40).map(|_| sent(&mut rng, 40)).collect();
    for batch in records.chunks(3) {
        let new: Vec<NewRecord<'_>> = batch.iter().map(Sent::as_new).collect();
        log.append(&new).unwrap();
    }
    let segments = log.segment_count();
    let removed = log.purge_below(20).unwrap();
    assert!(removed > 0);
    assert_eq!(log.segment_count(), segments - removed);
    assert!(log.first_seq() <= 20 && log.first_seq() > 1);
    let first = log.first_seq();
    assert_eq!(read_all(&log).unwrap()[0].0, first);
    // Purging everything leaves an empty log that still counts on.
    log.purge_below(u64::MAX).unwrap();
    assert!(log.is_empty());
    assert_eq!((log.first_seq(), log.next_seq()), (41, 41));
    drop(log);
    dir.crash(9);
    let mut log = Log::open(dir, config).unwrap();
    assert_eq!((log.first_seq(), log.next_seq()), (41, 41));
    assert_eq!(log.append(&[records[0].as_new()]).unwrap(), 41..42);
}

#[test]
fn fsync_failure_fails_closed() {
    let dir = SimDirectory::new();
    // Small segments: the simulated disk holds whole preallocated files in memory.
    let config = LogConfig {
        segment_bytes_max: 4096,
        index_interval_records: 4,
    };
    let mut log = Log::open(dir.clone(), config).unwrap();
    let record = NewRecord {
        timestamp_ns: 1,
        subject: b"a",
        headers: b"",
        payload: b"acked",
    };
    log.append(&[record]).unwrap();
    dir.fail_next_sync();
    assert!(matches!(log.append(&[record]), Err(StoreError::Io { .. })));
    assert!(log.is_failed());
    // The next sync would work, but the log never retries: it stays failed.
    assert!(matches!(log.append(&[record]), Err(StoreError::Failed)));
    assert!(matches!(log.purge_below(2), Err(StoreError::Failed)));
    drop(log);
    dir.crash(3);
    let log = Log::open(dir, config).unwrap();
    let all = read_all(&log).unwrap();
    assert_eq!(all[0].1.payload, b"acked");
    assert!(
        all.len() <= 2,
        "the failed batch may or may not have persisted"
    );
}

#[test]
fn damage_in_an_older_segment_is_reported() {
    let dir = SimDirectory::new();
    let config = LogConfig {
        segment_bytes_max: 256,
        index_interval_records: 1,
    };
    let mut log = Log::open(dir.clone(), config).unwrap();
    let record = NewRecord {
        timestamp_ns: 1,
        subject: b"a",
        headers: b"",
        payload: &[5; 90],
    };
    for _ in 0..6 {
        log.append(&[record]).unwrap();
    }
    drop(log);
    let names = dir.list().unwrap();
    assert_eq!(names.len(), 3);
    // The last record of the first segment, damaged: it has a successor, so it is
    // no torn write.
    let good = dir.live_bytes(&names[0]).unwrap();
    let mut bytes = good.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    dir.replace_durably(&names[0], bytes);
    let error = Log::open(dir.clone(), config).unwrap_err();
    assert_eq!(error.to_string(), "corrupt 00000000000000000001.seg: bad record at offset 121 (bad record crc: stored 0x5bf9d03a, computed 0xa9925339) of a segment that has a successor");
    // A missing middle segment is a gap.
    dir.replace_durably(&names[0], good);
    dir.remove(&names[1]).unwrap();
    let error = Log::open(dir, config).unwrap_err();
    assert!(
        error.to_string().contains("starts at sequence 5"),
        "{error}"
    );
}

/// The sequences a full read returns.
fn seqs<D: Directory>(log: &Log<D>) -> Vec<u64> {
    read_all(log).unwrap().iter().map(|(seq, _)| *seq).collect()
}

#[test]
fn deletions_survive_a_crash_and_reads_skip_them() {
    let mut rng = SimRng::new(4);
    let dir = SimDirectory::new();
    let config = LogConfig {
        segment_bytes_max: 256,
        index_interval_records: 2,
    };
    let mut log = Log::open(dir.clone(), config).unwrap();
    let records: Vec<Sent> = (0..20).map(|_| sent(&mut rng, 40)).collect();
    let new: Vec<NewRecord<'_>> = records.iter().map(Sent::as_new).collect();
    log.append(&new).unwrap();
    // Overlapping, unsorted, partly outside the log: only stored sequences count.
    assert_eq!(log.delete(&[8..10, 3..5, 4..6, 19..25, 0..1]).unwrap(), 7);
    assert_eq!(log.delete(&[3..6]).unwrap(), 0, "already deleted");
    assert_eq!(log.delete(&[]).unwrap(), 0);
    let want: Vec<u64> = [1, 2, 6, 7].into_iter().chain(10..19).collect();
    assert_eq!(seqs(&log), want);
    let mut buf = Vec::new();
    assert_eq!(log.read(4, &mut buf).unwrap(), None);
    assert!(records[5].matches(&log.read(6, &mut buf).unwrap().unwrap()));
    // A cursor on a deleted sequence goes on after it.
    let mut cursor = log.cursor(8);
    assert_eq!(log.next(&mut cursor, &mut buf).unwrap().unwrap().seq, 10);
    let mut cursor = log.cursor(19);
    assert_eq!(log.next(&mut cursor, &mut buf).unwrap(), None);
    // The deleted ones are still there for whoever rebuilds state, flagged.
    let mut cursor = log.cursor(3);
    let (record, deleted) = log
        .next_with_deleted(&mut cursor, &mut buf)
        .unwrap()
        .unwrap();
    assert_eq!((record.seq, deleted), (3, true));
    assert_eq!((log.first_seq(), log.next_seq()), (1, 21));
    drop(log);
    dir.crash(1);
    let mut log = Log::open(dir.clone(), config).unwrap();
    assert_eq!(seqs(&log), want);
    assert_eq!(
        log.deleted().iter().collect::<Vec<_>>(),
        [3..6, 8..10, 19..21]
    );
    // New records after the deleted last ones are not deleted.
    assert_eq!(log.append(&[records[0].as_new()]).unwrap(), 21..22);
    assert_eq!(*seqs(&log).last().unwrap(), 21);
    // Once the floor passes every run, the file goes.
    log.raise_floor(10).unwrap();
    assert_eq!(log.deleted().iter().collect::<Vec<_>>(), [19..21]);
    assert!(dir.list().unwrap().contains(&"deletes".to_string()));
    log.raise_floor(21).unwrap();
    assert!(log.deleted().is_empty());
    assert!(!dir.list().unwrap().contains(&"deletes".to_string()));
    drop(log);
    dir.crash(2);
    let log = Log::open(dir, config).unwrap();
    assert_eq!(seqs(&log), [21]);
}

#[test]
fn deletes_file_is_compacted() {
    let dir = SimDirectory::new();
    let config = LogConfig {
        segment_bytes_max: 1 << 16,
        index_interval_records: 8,
    };
    let mut log = Log::open(dir.clone(), config).unwrap();
    let record = NewRecord {
        timestamp_ns: 1,
        subject: b"a",
        headers: b"",
        payload: b"x",
    };
    log.append(&vec![record; 1000]).unwrap();
    // Every other sequence, one at a time, then the ones between: one run in the end.
    for seq in (1..1000).step_by(2) {
        assert_eq!(log.delete(&[seq..seq + 1]).unwrap(), 1);
    }
    let entries = |dir: &SimDirectory| dir.live_bytes("deletes").unwrap().len() / 24;
    assert_eq!(log.deleted().run_count(), 500);
    assert_eq!(entries(&dir), 500, "no compaction while most runs are live");
    for seq in (2..1000).step_by(2) {
        log.delete(&[seq..seq + 1]).unwrap();
    }
    assert_eq!(log.deleted().iter().collect::<Vec<_>>(), [1..1000]);
    assert!(entries(&dir) <= 257, "{} entries", entries(&dir));
    drop(log);
    dir.crash(3);
    let log = Log::open(dir.clone(), config).unwrap();
    assert_eq!(seqs(&log), [1000]);
    assert_eq!(log.deleted().iter().collect::<Vec<_>>(), [1..1000]);
}

#[test]
fn deletions_past_the_end_are_dropped_at_open() {
    let dir = SimDirectory::new();
    let config = LogConfig {
        segment_bytes_max: 4096,
        index_interval_records: 2,
    };
    let mut log = Log::open(dir.clone(), config).unwrap();
    let record = NewRecord {
        timestamp_ns: 1,
        subject: b"a",
        headers: b"",
        payload: b"0123456789",
    };
    log.append(&vec![record; 10]).unwrap();
    log.delete(&[4..5, 8..10]).unwrap();
    drop(log);
    // As if the records from 7 on had been appended unsynced and lost in a crash
    // while their deletion was synced: cut the segment after record 6.
    let name = crate::store::segment::segment_name(1);
    let mut bytes = dir.live_bytes(&name).unwrap();
    let record_len = 30 + 1 + 10;
    bytes[6 * record_len..].fill(0);
    dir.replace_durably(&name, bytes);
    let mut log = Log::open(dir.clone(), config).unwrap();
    assert_eq!(log.next_seq(), 7);
    assert_eq!(log.deleted().iter().collect::<Vec<_>>(), [4..5]);
    // Sequences 7 to 10 are assigned again, to records nobody deleted.
    assert_eq!(log.append(&vec![record; 4]).unwrap(), 7..11);
    assert_eq!(seqs(&log), [1, 2, 3, 5, 6, 7, 8, 9, 10]);
    drop(log);
    dir.crash(4);
    let log = Log::open(dir, config).unwrap();
    assert_eq!(seqs(&log), [1, 2, 3, 5, 6, 7, 8, 9, 10]);
}

#[test]
fn unsynced_appends_are_readable_and_sync_when_asked() {
    let dir = SimDirectory::new();
    let config = LogConfig {
        segment_bytes_max: 256,
        index_interval_records: 2,
    };
    let mut log = Log::open(dir.clone(), config).unwrap();
    let record = |payload: &'static [u8]| NewRecord {
        timestamp_ns: 1,
        subject: b"a",
        headers: b"",
        payload,
    };
    assert_eq!(log.append_unsynced(&[record(b"one")]).unwrap(), 1..2);
    assert!(log.unsynced_bytes() > 0);
    let mut buf = Vec::new();
    assert_eq!(log.read(1, &mut buf).unwrap().unwrap().payload, b"one");
    log.sync().unwrap();
    assert_eq!(log.unsynced_bytes(), 0);
    log.sync().unwrap();
    // Unsynced appends across a roll: the sealed segment is synced, the rest not.
    let big = [7u8; 100];
    let batch: Vec<NewRecord<'_>> = (0..5)
        .map(|_| NewRecord {
            payload: &big,
            ..record(b"")
        })
        .collect();
    assert_eq!(log.append_unsynced(&batch).unwrap(), 2..7);
    assert!(log.segment_count() > 1);
    assert!(log.unsynced_bytes() > 0);
    assert_eq!(seqs(&log), (1..7).collect::<Vec<_>>());
    drop(log);
    dir.crash(5);
    let log = Log::open(dir.clone(), config).unwrap();
    let got = seqs(&log);
    assert!(got.len() >= 2 && got == (1..=got.len() as u64).collect::<Vec<_>>());
    // A failed sync fails the log closed, as a failed append does.
    let mut log = log;
    log.append_unsynced(&[record(b"lost?")]).unwrap();
    dir.fail_next_sync();
    assert!(matches!(log.sync(), Err(StoreError::Io { .. })));
    assert!(log.is_failed());
    assert!(matches!(log.sync(), Err(StoreError::Failed)));
    assert!(matches!(
        log.append_unsynced(&[record(b"x")]),
        Err(StoreError::Failed)
    ));
    assert!(matches!(log.delete(&[1..2]), Err(StoreError::Failed)));
    // A clean close syncs.
    drop(log);
    dir.crash(6);
    let mut log = Log::open(dir.clone(), config).unwrap();
    let next = log.next_seq();
    log.append_unsynced(&[record(b"kept")]).unwrap();
    log.close().unwrap();
    dir.crash(7);
    let log = Log::open(dir, config).unwrap();
    assert_eq!(log.next_seq(), next + 1);
    assert_eq!(log.read(next, &mut buf).unwrap().unwrap().payload, b"kept");
}

#[test]
fn failed_deletion_fails_closed_and_applies_whole_or_not_at_all() {
    let config = LogConfig {
        segment_bytes_max: 4096,
        index_interval_records: 4,
    };
    let mut applied = BTreeSet::new();
    for cut in 0..6 {
        let dir = SimDirectory::new();
        let mut log = Log::open(dir.clone(), config).unwrap();
        let record = NewRecord {
            timestamp_ns: 1,
            subject: b"a",
            headers: b"",
            payload: b"x",
        };
        log.append(&vec![record; 10]).unwrap();
        log.delete(&[2..3]).unwrap();
        dir.power_loss_after(cut);
        let result = log.delete(&[4..5, 6..8]);
        if result.is_err() {
            assert!(log.is_failed());
            assert!(matches!(log.append(&[record]), Err(StoreError::Failed)));
        }
        drop(log);
        dir.crash(cut);
        let log = Log::open(dir, config).unwrap();
        let deleted: Vec<Range<u64>> = log.deleted().iter().collect();
        if result.is_ok() || deleted != [2..3] {
            assert_eq!(deleted, [2..3, 4..5, 6..8], "cut {cut}");
        }
        applied.insert(deleted.len());
    }
    assert_eq!(applied.into_iter().collect::<Vec<_>>(), [1, 3]);
}

/// What one crash-test run did, for its assertions.
struct CrashRun {
    /// `sent[i]` is the record last sent with sequence `i + 1`.
    sent: Vec<Sent>,
    /// Every sequence below this is durable: acknowledged by a synced append, or
    /// appended unsynced and synced since.
    durable_next_seq: u64,
    /// The log's first sequence after the last acknowledged purge.
    purged_below: u64,
    /// A floor raise that the power cut interrupted, with the log's first sequence
    /// before it: after the crash it is wholly applied or not at all.
    interrupted_floor: Option<(u64, u64)>,
    /// A purge of whole segments that the power cut interrupted: the segments below
    /// it may be gone.
    interrupted_purge_below: Option<u64>,
    /// Sequences whose deletion was acknowledged, at or above the first sequence.
    deleted: BTreeSet<u64>,
    /// The sequences of a deletion that the power cut interrupted: after the crash
    /// all of them are deleted or none.
    interrupted_delete: Option<BTreeSet<u64>>,
    crashes: u64,
}

/// Runs one seed: several rounds of random appends (synced, or unsynced with syncs
/// now and then), deletions and purges, each ended by a power cut at a random
/// operation and a crash; checks recovery after each.
fn crash_run(seed: u64) -> u64 {
    let mut rng = SimRng::new(seed);
    let dir = SimDirectory::new();
    let config = small_config(&mut rng);
    let unsynced = rng.chance(1, 3);
    let mut run = CrashRun {
        sent: Vec::new(),
        durable_next_seq: 1,
        purged_below: 1,
        interrupted_floor: None,
        interrupted_purge_below: None,
        deleted: BTreeSet::new(),
        interrupted_delete: None,
        crashes: 0,
    };
    let rounds = 1 + rng.below(3);
    for _ in 0..rounds {
        let mut log = reopen(seed, &dir, config);
        check_recovered(seed, &log, &mut run);
        dir.power_loss_after(rng.below(40));
        for _ in 0..rng.below(30) {
            if log.is_failed() {
                // Appends are refused from now on; what the failed one wrote may or
                // may not survive, so `sent` keeps its records.
                assert!(matches!(log.append(&[]), Err(StoreError::Failed)));
                break;
            }
            let op = rng.below(100);
            if op < 8 {
                let below = log.first_seq() + rng.below(log.next_seq() - log.first_seq() + 1);
                match log.purge_below(below) {
                    Ok(_) => {
                        run.purged_below = log.first_seq();
                        note_synced(&log, &mut run);
                    }
                    Err(_) => run.interrupted_purge_below = Some(below),
                }
                continue;
            }
            if op < 16 {
                // A durable purge, sometimes past the end.
                let floor = log.first_seq() + rng.below(log.next_seq() - log.first_seq() + 4);
                let first_before = log.first_seq();
                match log.raise_floor(floor) {
                    Ok(()) => {
                        assert_eq!(log.first_seq(), floor.max(first_before), "seed {seed}");
                        run.purged_below = log.first_seq();
                        note_synced(&log, &mut run);
                    }
                    Err(_) => run.interrupted_floor = Some((floor, first_before)),
                }
                continue;
            }
            if op < 30 {
                // A few runs of sequences, some deleted already, some not stored.
                let span = log.next_seq() - log.first_seq() + 2;
                let runs: Vec<Range<u64>> = (0..1 + rng.below(3))
                    .map(|_| {
                        let start = (log.first_seq() + rng.below(span)).saturating_sub(1);
                        start..start + 1 + rng.below(3)
                    })
                    .collect();
                let new: BTreeSet<u64> = runs
                    .iter()
                    .flat_map(|run| run.clone())
                    .filter(|&seq| seq >= log.first_seq() && seq < log.next_seq())
                    .filter(|seq| !run.deleted.contains(seq))
                    .collect();
                match log.delete(&runs) {
                    Ok(count) => {
                        assert_eq!(count, new.len() as u64, "seed {seed}");
                        for &seq in &new {
                            assert!(log.is_deleted(seq), "seed {seed}");
                            assert_eq!(log.read(seq, &mut Vec::new()).unwrap(), None);
                        }
                        run.deleted.extend(new);
                        note_synced(&log, &mut run);
                    }
                    Err(_) => run.interrupted_delete = Some(new),
                }
                continue;
            }
            if unsynced && op < 38 {
                if log.sync().is_ok() {
                    note_synced(&log, &mut run);
                }
                continue;
            }
            let batch: Vec<Sent> = (0..1 + rng.below(6))
                .map(|_| {
                    let payload_bytes_max = if rng.chance(1, 10) { 600 } else { 40 };
                    sent(&mut rng, payload_bytes_max)
                })
                .collect();
            let first = log.next_seq();
            // Remember what goes out with each sequence before knowing if it lands;
            // sequences a floor skipped were never sent.
            run.sent.resize(first as usize - 1, Sent::skipped());
            run.sent.extend(batch.iter().cloned());
            let new: Vec<NewRecord<'_>> = batch.iter().map(Sent::as_new).collect();
            let result = if unsynced {
                log.append_unsynced(&new)
            } else {
                log.append(&new)
            };
            match result {
                Ok(seqs) => {
                    assert_eq!(seqs, first..first + batch.len() as u64, "seed {seed}");
                    let mut buf = Vec::new();
                    let last = log.read(seqs.end - 1, &mut buf).unwrap().unwrap();
                    assert!(batch[batch.len() - 1].matches(&last), "seed {seed}");
                    note_synced(&log, &mut run);
                }
                Err(StoreError::Io { .. } | StoreError::Failed) => {
                    assert!(log.is_failed(), "seed {seed}");
                }
                Err(error) => panic!("seed {seed}: append: {error}"),
            }
        }
        drop(log);
        dir.crash(rng.next_u64());
        run.crashes += 1;
    }
    let log = reopen(seed, &dir, config);
    check_recovered(seed, &log, &mut run);
    run.crashes
}

/// After an operation that returned `Ok`: when the log says nothing is unsynced,
/// everything below its next sequence must survive a crash.
fn note_synced(log: &Log<SimDirectory>, run: &mut CrashRun) {
    if log.unsynced_bytes() == 0 {
        run.durable_next_seq = run.durable_next_seq.max(log.next_seq());
    }
}

/// Verifies the crashed log read-only (it must not be corrupt; torn tails are
/// warnings), opens it, and checks that verify saw what the log recovered.
fn reopen(seed: u64, dir: &SimDirectory, config: LogConfig) -> Log<SimDirectory> {
    let report = match verify_log(dir) {
        Ok(report) => report,
        Err(error) => panic!("seed {seed}: verify after the crash: {error}"),
    };
    let read_only = ReadOnlyLog::open(dir).expect("verified");
    let mut cursor = read_only.cursor(0).unwrap();
    let mut buf = Vec::new();
    let mut verified = Vec::new();
    while let Some(record) = read_only.next(&mut cursor, &mut buf).unwrap() {
        verified.push(record.seq);
    }
    let log = match Log::open(dir.clone(), config) {
        Ok(log) => log,
        Err(error) => panic!("seed {seed}: reopen failed: {error}"),
    };
    let recovered: Vec<u64> = read_all(&log)
        .unwrap()
        .iter()
        .map(|(seq, _)| *seq)
        .collect();
    assert_eq!(
        verified, recovered,
        "seed {seed}: verify reads what the log recovers"
    );
    let got = (report.first_seq, report.next_seq, report.deleted);
    let want = (log.first_seq(), log.next_seq(), log.deleted().len());
    assert_eq!(got, want, "seed {seed}: verify's report");
    let report = verify_log(dir).unwrap();
    assert!(
        !report.has_torn_tail(),
        "seed {seed}: open repaired every torn tail"
    );
    log
}

/// Checks a freshly recovered log against what was sent, acknowledged and deleted,
/// then forgets sequences that did not survive (they will be reused).
fn check_recovered(seed: u64, log: &Log<SimDirectory>, run: &mut CrashRun) {
    let all = match read_all(log) {
        Ok(all) => all,
        Err(error) => panic!("seed {seed}: reading back: {error}"),
    };
    if let Some((floor, first_before)) = run.interrupted_floor.take() {
        let first = log.first_seq();
        assert!(
            first >= floor || first == first_before,
            "seed {seed}: floor {floor} half applied: first {first}, was {first_before}"
        );
        run.purged_below = run.purged_below.max(first);
    }
    let (first, next) = (log.first_seq(), log.next_seq());
    assert!(
        next >= run.durable_next_seq,
        "seed {seed}: durable up to {} but the log ends before {next}",
        run.durable_next_seq
    );
    let purged_maybe = run.interrupted_purge_below.take().unwrap_or(0);
    assert!(
        first <= run.durable_next_seq.max(run.purged_below).max(purged_maybe),
        "seed {seed}: first {first} lost durable records"
    );
    assert!(
        first >= run.purged_below.min(next),
        "seed {seed}: purge undone"
    );
    // Deletions of sequences that are gone no longer mean anything.
    let stored = |seq: &u64| (first..next).contains(seq);
    run.deleted.retain(stored);
    for &seq in &run.deleted {
        assert!(log.is_deleted(seq), "seed {seed}: deletion of {seq} undone");
    }
    if let Some(mut interrupted) = run.interrupted_delete.take() {
        interrupted.retain(stored);
        let applied = interrupted
            .iter()
            .filter(|&&seq| log.is_deleted(seq))
            .count();
        assert!(
            applied == 0 || applied == interrupted.len(),
            "seed {seed}: deletion half applied: {applied} of {interrupted:?}"
        );
        run.deleted.extend(interrupted);
    }
    let deleted: BTreeSet<u64> = log.deleted().iter().flatten().collect();
    let extra: Vec<&u64> = deleted.difference(&run.deleted).collect();
    assert!(
        extra.is_empty(),
        "seed {seed}: deleted without a deletion: {extra:?}"
    );
    let want: Vec<u64> = (first..next).filter(|seq| !deleted.contains(seq)).collect();
    let got: Vec<u64> = all.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(got, want, "seed {seed}: sequences");
    for (seq, record) in &all {
        let sent = &run.sent[*seq as usize - 1];
        assert_eq!(
            record, sent,
            "seed {seed}: record {seq} differs from what was sent"
        );
    }
    run.deleted = deleted;
    run.sent.truncate(next as usize - 1);
    run.durable_next_seq = next;
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|value| {
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number"))
    })
}

/// The seeds a crash test runs: `PERCH_STORE_SEED=n` replays one,
/// `PERCH_STORE_SEEDS=n` runs the first n, 2000 by default.
pub(crate) fn crash_seeds() -> Vec<u64> {
    match env_u64("PERCH_STORE_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("PERCH_STORE_SEEDS").unwrap_or(2000)).collect(),
    }
}

#[test]
fn crash_at_thousands_of_points() {
    let seeds = crash_seeds();
    let mut crashes = 0;
    for seed in seeds {
        crashes += crash_run(seed);
    }
    eprintln!("crash test: {crashes} crash points");
    assert!(
        crashes >= 2000
            || env_u64("PERCH_STORE_SEED").is_some()
            || env_u64("PERCH_STORE_SEEDS").is_some()
    );
}
