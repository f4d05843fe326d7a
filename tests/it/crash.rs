//! kill -9 in the middle of acked publishing: every publish the broker acked
//! must be there after a restart on the same store directory, with the same
//! sequence and payload, in order.
//!
//! Several publishers (one connection each) publish with many PubAcks in flight
//! and record every acked (sequence, subject, payload). Once a randomly chosen
//! number of acks has come back the broker is SIGKILLed, restarted on its store,
//! and the whole stream is read back and checked. Then the next cycle publishes
//! on top, and the check covers every cycle so far.
//!
//! A SIGKILL loses only what the process held in its own memory: the kernel
//! keeps every write(2) already made. So this checks that an ack is only sent
//! for data handed to the kernel (power cuts are the simulated-disk test's job
//! in src/store). That also holds for nats-server 2.9.10 (it writes a stream
//! message before acking it, and syncs only every 2 minutes), so its variant
//! here proves the test; nats-server 2.9.10 has no `sync_interval` option, so
//! the reference runs with its defaults.
//!
//! `CRASH_SEED=<n>` replays one run's kill points (the seed is printed).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::consumer::{self, AckPolicy};
use async_nats::jetstream::stream::{self, StorageType};
use futures::StreamExt;

use crate::jetstream::{block_on, within, WAIT};
use crate::support::{Js, JsBroker};

js_tests!(kill9_mid_stream_keeps_every_acked_message);

const STREAM: &str = "CRASH";
const PUBLISHERS: usize = 4;
/// PubAcks awaited per publisher at most at once.
const IN_FLIGHT: usize = 64;
const CYCLES: u32 = 3;
/// The kill comes after this many acks (in this cycle) plus a random share of
/// `KILL_AFTER_ACKS_SPREAD`, so it lands at a different point each time.
const KILL_AFTER_ACKS_MIN: u64 = 300;
const KILL_AFTER_ACKS_SPREAD: u64 = 2_000;

/// One acked publish.
#[derive(Clone, Debug)]
struct Acked {
    seq: u64,
    subject: String,
    payload: String,
    /// (cycle, publisher, index): the publisher's order.
    origin: (u32, usize, u64),
}

/// xorshift64*: enough randomness for kill points, replayable from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn seed() -> u64 {
    if let Ok(seed) = std::env::var("CRASH_SEED") {
        return seed.parse().expect("CRASH_SEED is a u64");
    }
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish() | 1
}

fn kill9_mid_stream_keeps_every_acked_message(kind: Js) {
    let seed = seed();
    eprintln!("crash test seed: CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let mut broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = crate::jetstream::connect(&broker).await;
        within(
            "create stream",
            js.create_stream(stream::Config {
                name: STREAM.into(),
                subjects: vec!["crash.>".into()],
                storage: StorageType::File,
                ..Default::default()
            }),
        )
        .await
        .expect("create stream");
    });

    let mut all_acked: Vec<Acked> = Vec::new();
    let mut last_seq_seen = 0u64;
    for cycle in 1..=CYCLES {
        let kill_after = KILL_AFTER_ACKS_MIN + rng.next() % KILL_AFTER_ACKS_SPREAD;
        let pid = broker.server().pid();
        let acked = block_on(
            &broker,
            publish_until_killed(&broker, cycle, kill_after, pid),
        );
        // Reap it (it is already dead) and start again on the same store.
        broker.kill9();
        let first_new = acked.iter().map(|a| a.seq).min();
        if let Some(first_new) = first_new {
            assert!(
                first_new > last_seq_seen,
                "cycle {cycle}: acked seq {first_new} reuses a sequence at or below {last_seq_seen}, \
                 the last one after the previous restart"
            );
        }
        eprintln!(
            "cycle {cycle}: killed after {} acks (target {kill_after})",
            acked.len()
        );
        assert!(
            acked.len() as u64 >= kill_after,
            "cycle {cycle}: killed before the target number of acks"
        );
        all_acked.extend(acked);

        broker.start_again();
        let probe = block_on(&broker, verify(&broker, cycle, &all_acked));
        last_seq_seen = probe.seq;
        all_acked.push(probe);
    }
}

/// Publishes from `PUBLISHERS` connections until `kill_after` acks came back,
/// SIGKILLs `pid` while publishes are still in flight, and returns every ack
/// received.
async fn publish_until_killed(
    broker: &JsBroker,
    cycle: u32,
    kill_after: u64,
    pid: u32,
) -> Vec<Acked> {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicU64::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for publisher in 0..PUBLISHERS {
        let client = within("connect", async_nats::connect(broker.url()))
            .await
            .expect("connect");
        // Acks that do not come within 5 s (the broker is dead) are not counted.
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .build(client);
        let (acked, count, killed) = (acked.clone(), count.clone(), killed.clone());
        tasks.push(tokio::spawn(async move {
            let subject = format!("crash.{cycle}.{publisher}");
            let mut in_flight = VecDeque::new();
            let mut next_index = 0u64;
            loop {
                if in_flight.len() < IN_FLIGHT && !killed.load(Ordering::Relaxed) {
                    let index = next_index;
                    next_index += 1;
                    let payload = format!(
                        "c{cycle}-p{publisher}-{index}-{}",
                        "x".repeat((index % 7) as usize * 10)
                    );
                    match js.publish(subject.clone(), payload.clone().into()).await {
                        Ok(fut) => in_flight.push_back((index, payload, fut)),
                        Err(_) => break,
                    }
                    continue;
                }
                let Some((index, payload, fut)) = in_flight.pop_front() else {
                    break;
                };
                match fut.await {
                    Ok(ack) => {
                        assert_eq!(ack.stream, STREAM);
                        assert!(!ack.duplicate);
                        acked.lock().unwrap().push(Acked {
                            seq: ack.sequence,
                            subject: subject.clone(),
                            payload,
                            origin: (cycle, publisher, index),
                        });
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    // After the kill: this ack and the ones behind it never come.
                    Err(_) => break,
                }
            }
        }));
    }

    let started = Instant::now();
    while count.load(Ordering::Relaxed) < kill_after {
        for task in &tasks {
            assert!(!task.is_finished(), "a publisher stopped before the kill");
        }
        assert!(
            started.elapsed() < WAIT * 3,
            "only {} acks before the deadline",
            count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // SAFETY: kill(2) on our own child's pid; JsBroker reaps it afterwards.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    killed.store(true, Ordering::Relaxed);
    // Acks the dead broker wrote before it died may still be in the sockets:
    // give them a moment, then stop the publishers (a task stops only at an
    // await, so an ack is either recorded whole or not at all).
    tokio::time::sleep(Duration::from_secs(1)).await;
    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        if let Err(err) = task.await {
            if err.is_panic() {
                std::panic::resume_unwind(err.into_panic());
            }
        }
    }
    Arc::try_unwrap(acked)
        .expect("tasks are done")
        .into_inner()
        .unwrap()
}

/// Reads the whole stream back and checks it against every ack so far, then
/// publishes one more message and returns its ack.
async fn verify(broker: &JsBroker, cycle: u32, acked: &[Acked]) -> Acked {
    let (_client, js) = crate::jetstream::connect(broker).await;
    let stream = within("get stream", js.get_stream(STREAM))
        .await
        .expect("the stream survives the kill");
    let state = stream.cached_info().state.clone();
    let max_acked = acked.iter().map(|a| a.seq).max().unwrap_or(0);
    assert!(
        state.last_sequence >= max_acked,
        "cycle {cycle}: last seq {} < last acked seq {max_acked}",
        state.last_sequence
    );

    // Everything in the stream, in stream order.
    let reader = within(
        "reader",
        stream.create_consumer(consumer::pull::Config {
            ack_policy: AckPolicy::None,
            ..Default::default()
        }),
    )
    .await
    .expect("create reader");
    let mut stored: Vec<(u64, String, String)> = Vec::new();
    let started = Instant::now();
    while (stored.len() as u64) < state.messages {
        assert!(
            started.elapsed() < WAIT * 3,
            "cycle {cycle}: read {} of {} messages",
            stored.len(),
            state.messages
        );
        let mut batch = within(
            "fetch",
            reader
                .batch()
                .max_messages(1000)
                .expires(Duration::from_secs(2))
                .messages(),
        )
        .await
        .expect("fetch");
        while let Some(msg) = within("fetch next", batch.next()).await {
            let msg = msg.expect("message");
            let seq = msg.info().expect("info").stream_sequence;
            stored.push((
                seq,
                msg.subject.to_string(),
                String::from_utf8(msg.payload.to_vec()).expect("payload is what was sent (utf-8)"),
            ));
        }
    }
    assert_eq!(stored.len() as u64, state.messages);

    // In stream order, nothing corrupt, nothing twice.
    let mut seen_payloads = HashSet::new();
    for pair in stored.windows(2) {
        assert!(
            pair[0].0 < pair[1].0,
            "cycle {cycle}: out of order: {pair:?}"
        );
    }
    for (seq, subject, payload) in &stored {
        let mut parts = payload.splitn(4, '-');
        let (c, p) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        assert!(
            c.starts_with('c') && p.starts_with('p'),
            "cycle {cycle}: seq {seq}: a payload nobody sent: {payload:?}"
        );
        let expected_subject = format!("crash.{}.{}", &c[1..], &p[1..]);
        assert_eq!(
            subject, &expected_subject,
            "seq {seq}: subject/payload mismatch"
        );
        assert!(
            seen_payloads.insert(payload.clone()),
            "cycle {cycle}: payload {payload:?} stored twice"
        );
    }

    // Every ack is there, same sequence, same subject and payload.
    let by_seq: HashMap<u64, (&String, &String)> =
        stored.iter().map(|(s, subj, p)| (*s, (subj, p))).collect();
    let mut missing = Vec::new();
    for a in acked {
        match by_seq.get(&a.seq) {
            Some((subject, payload)) => {
                assert_eq!(
                    (subject.as_str(), payload.as_str()),
                    (a.subject.as_str(), a.payload.as_str()),
                    "cycle {cycle}: seq {} holds something else than was acked",
                    a.seq
                )
            }
            None => missing.push(a.clone()),
        }
    }
    assert!(
        missing.is_empty(),
        "cycle {cycle}: {} acked messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );

    // Each publisher's acked messages are in the order it sent them.
    let mut per_publisher: BTreeMap<(u32, usize), Vec<(u64, u64)>> = BTreeMap::new();
    for a in acked {
        per_publisher
            .entry((a.origin.0, a.origin.1))
            .or_default()
            .push((a.origin.2, a.seq));
    }
    for (who, mut list) in per_publisher {
        list.sort();
        for pair in list.windows(2) {
            assert!(
                pair[0].1 < pair[1].1,
                "cycle {cycle}: publisher {who:?} sent {} before {} but they got seqs {} and {}",
                pair[0].0,
                pair[1].0,
                pair[0].1,
                pair[1].1
            );
        }
    }
    eprintln!(
        "cycle {cycle}: {} messages stored, {} acked so far, last seq {}",
        stored.len(),
        acked.len(),
        state.last_sequence
    );

    // The restarted broker takes new publishes after the old ones (this one
    // counts as acked for the next checks, from an extra "publisher").
    let probe = Acked {
        seq: 0,
        subject: format!("crash.{cycle}.{PUBLISHERS}"),
        payload: format!("c{cycle}-p{PUBLISHERS}-0-probe"),
        origin: (cycle, PUBLISHERS, 0),
    };
    let seq = crate::jetstream::publish(&js, &probe.subject, &probe.payload).await;
    assert_eq!(seq, state.last_sequence + 1);
    within(
        "delete reader",
        stream.delete_consumer(reader.cached_info().name.as_str()),
    )
    .await
    .expect("delete reader");
    Acked { seq, ..probe }
}
