//! The stream's crash test on the simulated disk: random interleavings of commits,
//! `delete_msg`, purges by subject, purges of everything below a sequence (sometimes
//! past the end) and, in the unsynced modes, syncs; the power is cut at a random
//! operation, the disk crashes, the stream reopens. After each reopen:
//!
//! - the store verifies (no corruption; torn tails are only warnings), and opening it
//!   must succeed;
//! - every acknowledged message is live, with its exact bytes, unless a deletion that
//!   returned `Ok` removed it — or, in `interval`/`none` mode, it came after the last
//!   point that synced (then only a suffix of the log is missing);
//! - every deletion that returned `Ok` stays deleted: not live, not readable by
//!   sequence, never returned by the log's reads;
//! - a deletion that returned `Err` (the power cut) is applied wholly or not at all;
//! - nothing is live that was not sent with that sequence, and the log's in-order read
//!   returns exactly the live messages (nothing deleted is delivered).
//!
//! A failing run prints its seed; `PERCH_STORE_SEED=<seed> cargo test stream::crash`
//! replays just that one, `PERCH_STORE_SEEDS=<n>` runs more.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::store::file::SimRng;
use crate::store::verify::verify_log;
use crate::store::SimDirectory;

const T0_NS: i64 = 1_700_000_000_000_000_000;
const SUBJECTS: u64 = 4;

/// What the test sent with one sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    subject: Vec<u8>,
    payload: Vec<u8>,
}

/// What the test knows for sure about the stream.
#[derive(Debug, Default)]
struct Model {
    /// The message last sent with each sequence, acknowledged or not.
    sent: BTreeMap<u64, Sent>,
    /// Acknowledged and not removed by an acknowledged deletion.
    acked: BTreeSet<u64>,
    /// Every acknowledged message below this survives a crash.
    durable_next: u64,
    /// Removed by a deletion that returned `Ok`.
    deleted: BTreeSet<u64>,
    /// The live messages a deletion that returned `Err` meant to remove.
    interrupted: Option<BTreeSet<u64>>,
}

fn options(durability: Durability, rng: &mut SimRng) -> StreamOptions {
    StreamOptions {
        log: LogConfig {
            segment_bytes_max: 256 + rng.below(1024),
            index_interval_records: 1 + rng.below(4) as u32,
        },
        durability,
    }
}

fn live(stream: &Stream<SimDirectory>) -> BTreeSet<u64> {
    stream.index.live.keys().collect()
}

/// One seed: a few rounds of random operations, each ended by a power cut.
fn crash_run(seed: u64) -> u64 {
    let mut rng = SimRng::new(seed);
    let durability = match rng.below(4) {
        0 => Durability::Interval,
        1 => Durability::None,
        _ => Durability::Always,
    };
    let options = options(durability, &mut rng);
    let config: StreamConfig =
        serde_json::from_str(r#"{"name":"C","subjects":["c.*"]}"#).expect("config parses");
    let config = config.with_server_defaults();
    let dir = SimDirectory::new();
    let mut model = Model {
        durable_next: 1,
        ..Model::default()
    };
    let rounds = 1 + rng.below(3);
    for _ in 0..rounds {
        let mut stream = reopen(seed, &dir, &config, options, &mut model);
        dir.power_loss_after(rng.below(60));
        for step in 0..rng.below(40) {
            let op = rng.below(100);
            let ok = if op < 50 {
                commit(seed, &mut stream, &mut model, &mut rng, step)
            } else if op < 65 {
                delete_msg(seed, &mut stream, &mut model, &mut rng)
            } else if op < 80 {
                let subject = match rng.below(SUBJECTS + 1) {
                    SUBJECTS => b"c.*".to_vec(),
                    n => format!("c.{n}").into_bytes(),
                };
                purge(seed, &mut stream, &mut model, &mut rng, Some(&subject))
            } else if op < 90 {
                purge(seed, &mut stream, &mut model, &mut rng, None)
            } else if durability == Durability::Interval {
                let ok = stream.sync().is_ok();
                if ok {
                    model.durable_next = stream.log().next_seq();
                }
                ok
            } else {
                commit(seed, &mut stream, &mut model, &mut rng, step)
            };
            if !ok {
                break;
            }
        }
        drop(stream);
        dir.crash(rng.next_u64());
    }
    reopen(seed, &dir, &config, options, &mut model);
    rounds
}

/// Commits a batch; false once the store failed.
fn commit(
    seed: u64,
    stream: &mut Stream<SimDirectory>,
    model: &mut Model,
    rng: &mut SimRng,
    step: u64,
) -> bool {
    let first = stream.log().next_seq();
    let batch: Vec<PlannedMessage> = (0..1 + rng.below(4))
        .map(|i| PlannedMessage {
            subject: format!("c.{}", rng.below(SUBJECTS)).into_bytes(),
            headers: Vec::new(),
            payload: format!("{seed}/{step}/{i}/{}", rng.next_u64()).into_bytes(),
            timestamp_ns: T0_NS,
        })
        .collect();
    for (seq, message) in (first..).zip(&batch) {
        let sent = Sent {
            subject: message.subject.clone(),
            payload: message.payload.clone(),
        };
        model.sent.insert(seq, sent);
    }
    match stream.commit(&batch) {
        Ok(replies) => {
            for (reply, seq) in replies.iter().zip(first..) {
                assert_eq!(reply.as_ref().map(|ack| ack.seq), Ok(seq), "seed {seed}");
                assert_eq!(stream.get(seq).unwrap().payload, model.sent[&seq].payload);
                model.acked.insert(seq);
            }
            if stream.durability().syncs_every_append() {
                model.durable_next = stream.log().next_seq();
            }
            true
        }
        Err(_) => false,
    }
}

/// After a deletion returned `Ok`: it is durable, and so is everything before it.
fn deleted(stream: &Stream<SimDirectory>, model: &mut Model, doomed: &BTreeSet<u64>) {
    for seq in doomed {
        model.acked.remove(seq);
        model.deleted.insert(*seq);
    }
    assert_eq!(
        stream.unsynced_bytes(),
        0,
        "a deletion syncs what came before"
    );
    model.durable_next = stream.log().next_seq();
}

fn delete_msg(
    seed: u64,
    stream: &mut Stream<SimDirectory>,
    model: &mut Model,
    rng: &mut SimRng,
) -> bool {
    let last = stream.state().last_seq;
    let first = stream.first_seq();
    // Mostly live ones, sometimes one that is gone or never was.
    let seq = match live(stream).into_iter().nth(rng.below(8) as usize) {
        Some(seq) if rng.chance(3, 4) => seq,
        _ => first.saturating_sub(1) + rng.below(last + 3 - first.saturating_sub(1)),
    };
    let was_live = stream.is_live(seq);
    match stream.delete_msg(seq, rng.chance(1, 2)) {
        Ok(found) => {
            assert_eq!(found, was_live, "seed {seed}: delete {seq}");
            if found {
                deleted(stream, model, &BTreeSet::from([seq]));
                assert!(stream.get(seq).is_err(), "seed {seed}");
            }
            true
        }
        Err(_) => {
            if was_live {
                model.interrupted = Some(BTreeSet::from([seq]));
            }
            false
        }
    }
}

fn purge(
    seed: u64,
    stream: &mut Stream<SimDirectory>,
    model: &mut Model,
    rng: &mut SimRng,
    subject: Option<&[u8]>,
) -> bool {
    let last = stream.state().last_seq;
    let up_to = match rng.below(3) {
        0 => None,
        _ => Some(stream.first_seq() + rng.below(last + 4 - stream.first_seq())),
    };
    let doomed: BTreeSet<u64> = stream
        .index
        .live
        .range(..up_to.unwrap_or(u64::MAX))
        .filter(|(_, meta)| subject.is_none_or(|s| subject_matches(s, &meta.subject)))
        .map(|(seq, _)| seq)
        .collect();
    match stream.purge(subject, up_to) {
        Ok(count) => {
            assert_eq!(count, doomed.len() as u64, "seed {seed}");
            deleted(stream, model, &doomed);
            true
        }
        Err(_) => {
            model.interrupted = Some(doomed);
            false
        }
    }
}

/// Verifies the store, reopens the stream and checks it against the model, then
/// makes the model what survived.
fn reopen(
    seed: u64,
    dir: &SimDirectory,
    config: &StreamConfig,
    options: StreamOptions,
    model: &mut Model,
) -> Stream<SimDirectory> {
    if let Err(error) = verify_log(dir) {
        panic!("seed {seed}: verify after the crash: {error}");
    }
    let stream = match Stream::open_with_options(dir.clone(), config.clone(), options, T0_NS) {
        Ok(stream) => stream,
        Err(error) => panic!("seed {seed}: reopen: {error}"),
    };
    let live = live(&stream);
    let next = stream.log().next_seq();
    assert!(
        next >= model.durable_next,
        "seed {seed}: durable up to {}, recovered up to {next}",
        model.durable_next
    );
    // A deletion cut short is applied wholly or not at all.
    let interrupted = model.interrupted.take().unwrap_or_default();
    let stored: BTreeSet<u64> = interrupted.iter().copied().filter(|&s| s < next).collect();
    let applied = stored.iter().filter(|seq| !live.contains(seq)).count();
    assert!(
        applied == 0 || applied == stored.len(),
        "seed {seed}: deletion of {interrupted:?} half applied: live {live:?}"
    );
    if applied > 0 {
        model.deleted.extend(&stored);
    }
    for &seq in &model.acked {
        if seq < next {
            let lost = !live.contains(&seq) && !stored.contains(&seq);
            assert!(!lost, "seed {seed}: acked {seq} lost (live {live:?})");
        } else {
            assert!(seq >= model.durable_next, "seed {seed}: durable {seq} lost");
        }
    }
    for &seq in &model.deleted {
        assert!(seq < model.durable_next.max(next), "seed {seed}");
        assert!(!live.contains(&seq), "seed {seed}: deleted {seq} is back");
        assert!(stream.get(seq).is_err(), "seed {seed}");
        assert_eq!(
            stream.log().read(seq, &mut Vec::new()).unwrap(),
            None,
            "seed {seed}"
        );
    }
    for &seq in &live {
        let message = stream.get(seq).unwrap();
        let sent = &model.sent[&seq];
        let got = (message.subject.as_slice(), message.payload.as_slice());
        assert_eq!(
            got,
            (&sent.subject[..], &sent.payload[..]),
            "seed {seed}: {seq}"
        );
    }
    // The log's in-order read delivers exactly the live messages.
    let mut cursor = stream.log().cursor(0);
    let mut buf = Vec::new();
    let mut read = BTreeSet::new();
    while let Some(record) = stream.log().next(&mut cursor, &mut buf).unwrap() {
        read.insert(record.seq);
    }
    assert_eq!(read, live, "seed {seed}: what the log delivers");
    let state = stream.state();
    assert_eq!(state.messages, live.len() as u64, "seed {seed}");
    // What did not survive is forgotten: those sequences are assigned again.
    model.acked = live;
    model.deleted.retain(|&seq| seq < next);
    model.sent.retain(|&seq, _| seq < next);
    model.durable_next = next;
    stream
}

#[test]
fn power_cuts_with_deletes_and_purges() {
    let mut crashes = 0;
    for seed in crate::store::crash_tests::crash_seeds() {
        crashes += crash_run(seed);
    }
    eprintln!("stream crash test: {crashes} crash points");
}
