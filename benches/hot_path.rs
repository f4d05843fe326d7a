//! Criterion micro-benchmarks of the per-message hot path, each piece alone:
//! parsing a PUB, matching a subject in the trie, routing to local subscribers
//! (which encodes the MSG into their outbound buffers), and packing a message
//! for another shard. Run: `cargo bench --bench hot_path`.

use std::rc::Rc;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use perch::nats::parser::{parse_op, ParseLimits, Parsed};
use perch::nats::session::{Message, Session, SessionLimits, Subscription};
use perch::router::trie::SubjectTrie;
use perch::router::Router;

const LIMITS: ParseLimits = ParseLimits {
    control_line_bytes_max: 4096,
    payload_bytes_max: 1 << 20,
};

fn parse(c: &mut Criterion) {
    // 1000 tiny PUBs back to back, as one read delivers them.
    let mut input = Vec::new();
    for i in 0..1000 {
        input.extend_from_slice(format!("PUB sensors.{i}.t 16\r\n0123456789abcdef\r\n").as_bytes());
    }
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("pub_16b_x1000", |b| {
        b.iter(|| {
            let mut pos = 0;
            while pos < input.len() {
                match parse_op(black_box(&input[pos..]), &LIMITS) {
                    Ok(Parsed::Op(op, used)) => {
                        black_box(op);
                        pos += used;
                    }
                    _ => unreachable!("complete input"),
                }
            }
        })
    });
    group.finish();
}

fn trie(c: &mut Criterion) {
    let mut trie: SubjectTrie<u32> = SubjectTrie::new();
    for i in 0..10_000 {
        *trie.entry(format!("sensors.{i}.t").as_bytes()) = i;
    }
    *trie.entry(b"sensors.>") = 1;
    c.bench_function("trie/match_10k_devices", |b| {
        b.iter(|| {
            let mut n = 0;
            trie.for_each_match(black_box(b"sensors.1234.t"), |v| n += *v);
            n
        })
    });
}

fn route(c: &mut Criterion) {
    let limits = SessionLimits {
        pending_bytes_max: usize::MAX,
        subscriptions_max: 0,
    };
    let mut router = Router::new(0, 2);
    let session = Session::new(1, limits);
    router.subscribe(Rc::new(Subscription::new(
        Rc::clone(&session),
        b"1",
        b"sensors.>",
        None,
    )));
    let msg = Message {
        subject: b"sensors.42.t",
        reply: None,
        headers: None,
        payload: b"0123456789abcdef",
    };
    let mut remote = Vec::new();
    c.bench_function("route/one_local_subscriber_16b", |b| {
        b.iter(|| {
            router.route(black_box(&msg), None, &mut remote);
            // Keep the subscriber's buffer from growing without bound.
            if session.pending_bytes() > 1 << 20 {
                drop(session.take_output(Vec::new()));
                session.written();
            }
        })
    });
}

criterion_group!(benches, parse, trie, route);
criterion_main!(benches);
