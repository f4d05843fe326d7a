//! A randomized model test of cross-shard interest: the promise every NATS
//! client relies on, checked against nats-server's contract rather than against
//! cases someone thought of.
//!
//! Many connections, placed round-robin on 2 and 4 shards, each run a random
//! script of SUB / UNSUB (with and without max) / queue SUB / PUB / HPUB / PING,
//! written in bursts (many ops in one write) and one op at a time, concurrently
//! and with random pauses and flushes. Every frame each connection receives is
//! recorded with its position in the stream. The oracle:
//!
//! - a message is delivered at most once per subscription, only to subscriptions
//!   whose subject matches, with the subject, reply, headers and payload as
//!   published, and in per-publisher order;
//! - a message sent after the subscriber got the PONG for a PING sent after its
//!   SUB is delivered exactly once to that subscription, unless the subscriber
//!   sent an UNSUB before the publisher's own PONG for that message came back;
//! - per queue group (by name, across connections and shards) a message goes to
//!   at most one member, and to exactly one when a member that never leaves was
//!   subscribed (PONG received) before the message was sent;
//! - nothing reaches a subscription after the PONG that followed its UNSUB, and
//!   a subscription with `UNSUB sid max` gets at most `max` messages (at least
//!   as many as were guaranteed to it, up to `max`).
//!
//! Times are taken conservatively: a send time is read before the write starts,
//! an arrival time after the read returns. The scripts come from the seed; the
//! interleaving is whatever the machine makes of them, so a failure prints its
//! seed and `PERCH_MODEL_SEED=<seed>` replays the same scripts (running them a
//! few times usually reproduces the interleaving). `PERCH_MODEL_SEEDS=n` sets how
//! many seeds a run covers (default 4 per shard count).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::Server;

/// Subjects messages are published to.
const SUBJECTS: [&str; 7] = ["m.a.1", "m.a.2", "m.b.1", "m.b.2", "m.c.1", "d.7.cmd", "x"];
/// Patterns subscriptions use: literals, `*`, `>`, and subjects nobody publishes to.
const PATTERNS: [&str; 11] = [
    "m.a.1", "m.b.2", "d.7.cmd", "x", "m.*.1", "m.a.*", "m.>", "m.*.*", "d.*.cmd", ">", "m.z.9",
];
const QUEUES: [&str; 2] = ["q1", "q2"];
/// How long a connection waits for an expected PONG before the test fails.
const PONG_WAIT_MS_MAX: u64 = 10_000;

/// splitmix64: small, seedable, good enough to pick ops.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

#[derive(Clone, Debug)]
enum Op {
    Sub {
        sid: u32,
        pattern: &'static str,
        queue: Option<&'static str>,
    },
    Unsub {
        sid: u32,
        max: Option<u32>,
    },
    Pub {
        seq: u32,
        subject: &'static str,
        reply: bool,
        headers: bool,
    },
    Ping,
}

/// One write: its ops, then optionally a pause or a wait for every PONG owed.
struct Step {
    ops: Vec<Op>,
    wait_for_pongs: bool,
    pause_us: u64,
}

/// Which ops a script may use.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Profile {
    /// Everything.
    Mixed,
    /// No queue SUBs and no `UNSUB sid max`: the connection stays movable
    /// (connection moves, `runtime/moves.rs`, skip queue members and
    /// subscriptions with a max).
    Movable,
}

fn script_of(rng: &mut Rng, steps: usize, profile: Profile) -> Vec<Step> {
    let movable = profile == Profile::Movable;
    let mut live: Vec<u32> = Vec::new();
    let mut next_sid = 1;
    let mut next_seq = 1;
    let mut out = Vec::new();
    for _ in 0..steps {
        let burst = rng.chance(50);
        let ops_wanted = if burst { 1 + rng.below(16) } else { 1 };
        let mut ops = Vec::new();
        while ops.len() < ops_wanted {
            match rng.below(100) {
                0..=29 => {
                    let sid = next_sid;
                    next_sid += 1;
                    let queue = (!movable && rng.chance(30)).then(|| rng.pick(&QUEUES));
                    ops.push(Op::Sub {
                        sid,
                        pattern: rng.pick(&PATTERNS),
                        queue,
                    });
                    if !movable && rng.chance(15) {
                        // Auto-unsubscribe: not a candidate for a later UNSUB.
                        let max = 1 + rng.below(3) as u32;
                        ops.push(Op::Unsub {
                            sid,
                            max: Some(max),
                        });
                    } else {
                        live.push(sid);
                    }
                }
                30..=39 if !live.is_empty() => {
                    let sid = live.swap_remove(rng.below(live.len()));
                    ops.push(Op::Unsub { sid, max: None });
                }
                40..=84 => {
                    let seq = next_seq;
                    next_seq += 1;
                    ops.push(Op::Pub {
                        seq,
                        subject: rng.pick(&SUBJECTS),
                        reply: rng.chance(30),
                        headers: rng.chance(30),
                    });
                }
                _ => ops.push(Op::Ping),
            }
        }
        if rng.chance(40) {
            ops.push(Op::Ping);
        }
        out.push(Step {
            ops,
            wait_for_pongs: rng.chance(30),
            pause_us: if rng.chance(50) {
                rng.below(800) as u64
            } else {
                0
            },
        });
    }
    out
}

fn encode(conn: usize, op: &Op, out: &mut Vec<u8>) {
    match op {
        Op::Sub {
            sid,
            pattern,
            queue: Some(q),
        } => out.extend_from_slice(format!("SUB {pattern} {q} {sid}\r\n").as_bytes()),
        Op::Sub {
            sid,
            pattern,
            queue: None,
        } => out.extend_from_slice(format!("SUB {pattern} {sid}\r\n").as_bytes()),
        Op::Unsub { sid, max: Some(m) } => {
            out.extend_from_slice(format!("UNSUB {sid} {m}\r\n").as_bytes())
        }
        Op::Unsub { sid, max: None } => {
            out.extend_from_slice(format!("UNSUB {sid}\r\n").as_bytes())
        }
        Op::Pub {
            seq,
            subject,
            reply,
            headers,
        } => {
            let payload = format!("{conn}.{seq}");
            let reply = if *reply {
                format!(" r.{conn}.{seq}")
            } else {
                String::new()
            };
            if *headers {
                let hdr = format!("NATS/1.0\r\nK: {conn}.{seq}\r\n\r\n");
                let total = hdr.len() + payload.len();
                out.extend_from_slice(
                    format!(
                        "HPUB {subject}{reply} {} {total}\r\n{hdr}{payload}\r\n",
                        hdr.len()
                    )
                    .as_bytes(),
                );
            } else {
                out.extend_from_slice(
                    format!("PUB {subject}{reply} {}\r\n{payload}\r\n", payload.len()).as_bytes(),
                );
            }
        }
        Op::Ping => out.extend_from_slice(b"PING\r\n"),
    }
}

/// A frame a connection received, in stream order.
#[derive(Debug)]
enum Received {
    Msg {
        subject: String,
        sid: u32,
        reply: Option<String>,
        headers: Option<Vec<u8>>,
        payload: String,
    },
    Pong {
        at: Instant,
    },
    Other(String),
}

/// What a connection's reader saw, shared with its driver.
#[derive(Default)]
struct Inbox {
    frames: Mutex<Vec<Received>>,
    pongs: Mutex<usize>,
    pong_arrived: Condvar,
}

impl Inbox {
    fn wait_pongs(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_millis(PONG_WAIT_MS_MAX);
        let mut pongs = self.pongs.lock().expect("pongs lock");
        while *pongs < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no PONG {n} within {PONG_WAIT_MS_MAX} ms");
            pongs = self
                .pong_arrived
                .wait_timeout(pongs, left)
                .expect("pongs lock")
                .0;
        }
    }
}

/// Reads and parses everything the server sends; answers server PINGs.
fn read_frames(mut stream: TcpStream, writer: Arc<Mutex<TcpStream>>, inbox: Arc<Inbox>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let at = Instant::now();
        buf.extend_from_slice(&chunk[..n]);
        let mut used = 0;
        while let Some((frame, len)) = parse_frame(&buf[used..], at) {
            used += len;
            match frame {
                Received::Other(line) if line == "PING" => {
                    let _ = writer.lock().expect("writer").write_all(b"PONG\r\n");
                }
                Received::Pong { .. } => {
                    inbox.frames.lock().expect("frames").push(frame);
                    *inbox.pongs.lock().expect("pongs") += 1;
                    inbox.pong_arrived.notify_all();
                }
                frame => inbox.frames.lock().expect("frames").push(frame),
            }
        }
        buf.drain(..used);
    }
}

fn parse_frame(buf: &[u8], at: Instant) -> Option<(Received, usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = String::from_utf8_lossy(&buf[..end]).into_owned();
    let words: Vec<&str> = line.split(' ').collect();
    let body_at = end + 2;
    let take_body = |total: usize| -> Option<(&[u8], usize)> {
        (buf.len() >= body_at + total + 2)
            .then(|| (&buf[body_at..body_at + total], body_at + total + 2))
    };
    match words[0] {
        "MSG" => {
            let (subject, sid, reply, size) = match words.len() {
                4 => (words[1], words[2], None, words[3]),
                5 => (words[1], words[2], Some(words[3]), words[4]),
                _ => return Some((Received::Other(line), body_at)),
            };
            let (body, len) = take_body(size.parse().ok()?)?;
            Some((
                Received::Msg {
                    subject: subject.into(),
                    sid: sid.parse().unwrap_or(0),
                    reply: reply.map(str::to_string),
                    headers: None,
                    payload: String::from_utf8_lossy(body).into_owned(),
                },
                len,
            ))
        }
        "HMSG" => {
            let (subject, sid, reply, hdr, total) = match words.len() {
                5 => (words[1], words[2], None, words[3], words[4]),
                6 => (words[1], words[2], Some(words[3]), words[4], words[5]),
                _ => return Some((Received::Other(line), body_at)),
            };
            let hdr: usize = hdr.parse().ok()?;
            let (body, len) = take_body(total.parse().ok()?)?;
            let hdr = hdr.min(body.len());
            Some((
                Received::Msg {
                    subject: subject.into(),
                    sid: sid.parse().unwrap_or(0),
                    reply: reply.map(str::to_string),
                    headers: Some(body[..hdr].to_vec()),
                    payload: String::from_utf8_lossy(&body[hdr..]).into_owned(),
                },
                len,
            ))
        }
        "PONG" => Some((Received::Pong { at }, body_at)),
        _ => Some((Received::Other(line), body_at)),
    }
}

/// What a driver did, for the oracle: each op with its send time and the index
/// of the first PING sent after it (whose PONG confirms it).
struct Sent {
    op: Op,
    at: Instant,
    ping_after: usize,
}

struct Conn {
    writer: Arc<Mutex<TcpStream>>,
    inbox: Arc<Inbox>,
    reader: thread::JoinHandle<()>,
    pings_sent: usize,
}

impl Conn {
    fn open(server: &Server) -> Conn {
        let mut stream = TcpStream::connect(server.addr()).expect("connect");
        stream.set_nodelay(true).ok();
        // The INFO line, byte by byte, so nothing after it is consumed here.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            stream.read_exact(&mut byte).expect("INFO");
            line.push(byte[0]);
        }
        assert!(line.starts_with(b"INFO "), "expected INFO");
        let writer = Arc::new(Mutex::new(stream.try_clone().expect("clone")));
        let inbox = Arc::new(Inbox::default());
        let reader = {
            let (writer, inbox) = (Arc::clone(&writer), Arc::clone(&inbox));
            thread::spawn(move || read_frames(stream, writer, inbox))
        };
        let mut conn = Conn {
            writer,
            inbox,
            reader,
            pings_sent: 0,
        };
        conn.write(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true}\r\nPING\r\n");
        conn.pings_sent = 1;
        conn.inbox.wait_pongs(1);
        conn
    }

    fn write(&self, bytes: &[u8]) {
        self.writer
            .lock()
            .expect("writer")
            .write_all(bytes)
            .expect("write");
    }

    /// Runs a script; returns what was sent, when.
    fn run(&mut self, index: usize, steps: &[Step]) -> Vec<Sent> {
        let mut sent = Vec::new();
        let mut bytes = Vec::new();
        for step in steps {
            bytes.clear();
            let at = Instant::now();
            for op in &step.ops {
                encode(index, op, &mut bytes);
                // The next PING this connection sends confirms the op.
                sent.push(Sent {
                    op: op.clone(),
                    at,
                    ping_after: self.pings_sent,
                });
                if matches!(op, Op::Ping) {
                    self.pings_sent += 1;
                }
            }
            self.write(&bytes);
            if step.wait_for_pongs {
                self.inbox.wait_pongs(self.pings_sent);
            }
            if step.pause_us > 0 {
                thread::sleep(Duration::from_micros(step.pause_us));
            }
        }
        sent
    }

    fn ping_and_wait(&mut self) {
        self.write(b"PING\r\n");
        self.pings_sent += 1;
        self.inbox.wait_pongs(self.pings_sent);
    }
}

fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// One subscription's life, as the oracle sees it.
struct SubLife<'a> {
    conn: usize,
    sid: u32,
    pattern: &'static str,
    queue: Option<&'static str>,
    max: Option<u32>,
    /// Stream position of the PONG that confirmed `UNSUB sid max`.
    max_confirmed_pos: Option<usize>,
    /// Arrival of the PONG that confirmed the SUB (None: never confirmed).
    confirmed_at: Option<Instant>,
    /// The UNSUB: its send time and the stream position of its confirming PONG.
    unsub_at: Option<Instant>,
    unsub_confirmed_pos: Option<usize>,
    deliveries: Vec<(usize, &'a Received)>,
}

/// Whether a run forces connection moves, and with which scripts.
enum Moves {
    None,
    /// `--debug-move-every every`, every connection on `profile` scripts.
    Forced {
        every: u32,
        profile: Profile,
    },
}

/// Runs one seeded scenario; returns the contract violations found and the
/// moves the broker made (0 without forced moves).
fn run_model_with(
    shards: usize,
    seed: u64,
    conns: usize,
    steps: usize,
    moves: &Moves,
) -> (Vec<String>, u64) {
    let shards_arg = shards.to_string();
    let http_port = crate::support::free_port().to_string();
    let http = format!("127.0.0.1:{http_port}");
    let (every, profile) = match moves {
        Moves::None => (None, Profile::Mixed),
        Moves::Forced { every, profile } => (Some(every.to_string()), *profile),
    };
    let mut args = vec!["--shards", &shards_arg];
    if let Some(every) = &every {
        args.extend(["--debug-move-every", every, "--http", &http]);
    }
    let server = Server::perch(&args);
    let mut rng = Rng(seed);
    let scripts: Vec<Vec<Step>> = (0..conns)
        .map(|_| script_of(&mut rng, steps, profile))
        .collect();
    let mut connections: Vec<Conn> = (0..conns).map(|_| Conn::open(&server)).collect();

    // Every connection runs its script at once.
    let sent: Vec<Vec<Sent>> = thread::scope(|scope| {
        let handles: Vec<_> = connections
            .iter_mut()
            .zip(&scripts)
            .enumerate()
            .map(|(i, (conn, script))| {
                scope.spawn(move || {
                    let sent = conn.run(i, script);
                    conn.ping_and_wait();
                    sent
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("driver"))
            .collect()
    });
    // Every publisher has its last PONG: everything is queued at its
    // subscribers. One more PING each, so it is all in the streams too.
    for conn in &mut connections {
        conn.ping_and_wait();
    }
    let mut received: Vec<Vec<Received>> = Vec::new();
    for conn in connections {
        let _ = conn
            .writer
            .lock()
            .expect("writer")
            .shutdown(std::net::Shutdown::Both);
        conn.reader.join().expect("reader");
        let inbox = Arc::try_unwrap(conn.inbox).unwrap_or_else(|_| panic!("inbox still shared"));
        received.push(inbox.frames.into_inner().expect("frames"));
    }
    let moved = if every.is_some() {
        crate::monitoring::connection_moves(http_port.parse().expect("port"))
    } else {
        0
    };
    (check(&sent, &received), moved)
}

/// The oracle (see the module docs).
fn check(sent: &[Vec<Sent>], received: &[Vec<Received>]) -> Vec<String> {
    let mut violations = Vec::new();
    // PONG arrival times and stream positions per connection (index 0 is the
    // handshake's).
    let pongs: Vec<Vec<(usize, Instant)>> = received
        .iter()
        .map(|frames| {
            frames
                .iter()
                .enumerate()
                .filter_map(|(pos, f)| match f {
                    Received::Pong { at } => Some((pos, *at)),
                    _ => None,
                })
                .collect()
        })
        .collect();
    for (conn, frames) in received.iter().enumerate() {
        for frame in frames {
            if let Received::Other(line) = frame {
                violations.push(format!("conn {conn} got unexpected {line:?}"));
            }
        }
    }

    // Subscriptions.
    let mut subs: Vec<SubLife> = Vec::new();
    let mut by_sid: HashMap<(usize, u32), usize> = HashMap::new();
    for (conn, ops) in sent.iter().enumerate() {
        for s in ops {
            match &s.op {
                Op::Sub {
                    sid,
                    pattern,
                    queue,
                } => {
                    by_sid.insert((conn, *sid), subs.len());
                    subs.push(SubLife {
                        conn,
                        sid: *sid,
                        pattern,
                        queue: *queue,
                        max: None,
                        max_confirmed_pos: None,
                        confirmed_at: pongs[conn].get(s.ping_after).map(|p| p.1),
                        unsub_at: None,
                        unsub_confirmed_pos: None,
                        deliveries: Vec::new(),
                    });
                }
                Op::Unsub { sid, max } => {
                    let life = &mut subs[by_sid[&(conn, *sid)]];
                    match max {
                        Some(m) => {
                            life.max = Some(*m);
                            life.max_confirmed_pos = pongs[conn].get(s.ping_after).map(|p| p.0);
                        }
                        None => {
                            life.unsub_at = Some(s.at);
                            life.unsub_confirmed_pos = pongs[conn].get(s.ping_after).map(|p| p.0);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    for (conn, frames) in received.iter().enumerate() {
        for (pos, frame) in frames.iter().enumerate() {
            if let Received::Msg { sid, .. } = frame {
                match by_sid.get(&(conn, *sid)) {
                    Some(&i) => subs[i].deliveries.push((pos, frame)),
                    None => violations.push(format!("conn {conn} got a MSG for unknown sid {sid}")),
                }
            }
        }
    }

    // Messages, by id "conn.seq".
    struct Published {
        conn: usize,
        seq: u32,
        subject: &'static str,
        reply: bool,
        headers: bool,
        at: Instant,
        /// Arrival of the publisher's PONG for its next PING.
        fenced_at: Option<Instant>,
    }
    let mut published: HashMap<String, Published> = HashMap::new();
    for (conn, ops) in sent.iter().enumerate() {
        for s in ops {
            if let Op::Pub {
                seq,
                subject,
                reply,
                headers,
            } = &s.op
            {
                published.insert(
                    format!("{conn}.{seq}"),
                    Published {
                        conn,
                        seq: *seq,
                        subject,
                        reply: *reply,
                        headers: *headers,
                        at: s.at,
                        fenced_at: pongs[conn].get(s.ping_after).map(|p| p.1),
                    },
                );
            }
        }
    }

    let groups_with_leavers: std::collections::HashSet<&str> = subs
        .iter()
        .filter(|l| l.unsub_at.is_some() || l.max.is_some())
        .filter_map(|l| l.queue)
        .collect();
    // Per subscription: matching, content, duplicates, order, UNSUB, max.
    // deliveries_of[msg id] = subscriptions that got it.
    let mut deliveries_of: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, life) in subs.iter().enumerate() {
        let name = format!(
            "conn {} sid {} ({} {:?})",
            life.conn, life.sid, life.pattern, life.queue
        );
        let mut last_seq: HashMap<usize, u32> = HashMap::new();
        for &(pos, frame) in &life.deliveries {
            let Received::Msg {
                subject,
                reply,
                headers,
                payload,
                ..
            } = frame
            else {
                continue;
            };
            let Some(m) = published.get(payload.as_str()) else {
                violations.push(format!("{name}: payload {payload:?} was never published"));
                continue;
            };
            if subject != m.subject || !subject_matches(life.pattern, subject) {
                violations.push(format!(
                    "{name}: got {payload} on {subject} (published to {})",
                    m.subject
                ));
            }
            let want_reply = m.reply.then(|| format!("r.{}.{}", m.conn, m.seq));
            if *reply != want_reply {
                violations.push(format!(
                    "{name}: {payload} reply {reply:?}, sent {want_reply:?}"
                ));
            }
            let want_headers = m
                .headers
                .then(|| format!("NATS/1.0\r\nK: {payload}\r\n\r\n").into_bytes());
            if *headers != want_headers {
                violations.push(format!("{name}: {payload} headers differ"));
            }
            if let Some(&before) = last_seq.get(&m.conn) {
                // A queue message whose picked member left while the pick
                // travelled is redirected to another member, and may arrive
                // after later ones (README: cross-shard guarantees): order is
                // checked for every queue group no member ever left.
                let redirected = life.queue.is_some_and(|q| groups_with_leavers.contains(q));
                if m.seq <= before && !redirected {
                    violations.push(format!(
                        "{name}: from conn {} seq {} after seq {before} (order or duplicate)",
                        m.conn, m.seq
                    ));
                }
            }
            last_seq.insert(m.conn, m.seq);
            if life.unsub_confirmed_pos.is_some_and(|p| pos > p) {
                violations.push(format!("{name}: {payload} arrived after its UNSUB's PONG"));
            }
            deliveries_of.entry(payload.as_str()).or_default().push(i);
        }
        if let Some(max) = life.max {
            // Messages may arrive between the SUB and the server reading the
            // `UNSUB sid max` after it (any number: they count toward max); once
            // its PONG is back, at most what max leaves.
            let before = life
                .deliveries
                .iter()
                .filter(|(pos, _)| life.max_confirmed_pos.is_none_or(|p| *pos < p))
                .count();
            let after = life.deliveries.len() - before;
            if after > (max as usize).saturating_sub(before) {
                let got: Vec<_> = life
                    .deliveries
                    .iter()
                    .map(|(pos, f)| match f {
                        Received::Msg { payload, .. } => format!("{payload}@{pos}"),
                        _ => String::new(),
                    })
                    .collect();
                violations.push(format!("{name}: deliveries {got:?}, max {max}"));
            }
        }
    }

    // Per message: every guaranteed plain subscription got it; each queue group
    // got it at most once, exactly once when it had a stable member.
    let mut guaranteed_count = vec![0usize; subs.len()];
    for (id, m) in &published {
        let got = deliveries_of.get(id.as_str()).cloned().unwrap_or_default();
        let mut groups: HashMap<&str, (usize, bool)> = HashMap::new();
        for (i, life) in subs.iter().enumerate() {
            if !subject_matches(life.pattern, m.subject) {
                continue;
            }
            let subscribed_before = life.confirmed_at.is_some_and(|c| c < m.at);
            let left_after_fence = match (life.unsub_at, m.fenced_at) {
                (None, _) => true,
                (Some(u), Some(f)) => u > f,
                (Some(_), None) => false,
            };
            let guaranteed = subscribed_before && left_after_fence;
            let count = got.iter().filter(|&&g| g == i).count();
            match life.queue {
                None => {
                    if guaranteed {
                        guaranteed_count[i] += 1;
                        if life.max.is_none() && count != 1 {
                            violations.push(format!(
                                "message {id} on {} (sent {:?} after conn {}'s SUB {} {} was confirmed) delivered {count} times",
                                m.subject,
                                m.at.duration_since(life.confirmed_at.expect("confirmed")),
                                life.conn,
                                life.pattern,
                                life.sid
                            ));
                        }
                    }
                }
                Some(q) => {
                    let group = groups.entry(q).or_default();
                    group.0 += count;
                    group.1 |= guaranteed && life.unsub_at.is_none() && life.max.is_none();
                }
            }
        }
        for (q, (count, stable)) in groups {
            if count > 1 || (stable && count != 1) {
                violations.push(format!(
                    "message {id} on {}: queue group {q} got it {count} times (a stable member: {stable})",
                    m.subject
                ));
            }
        }
    }
    for (i, life) in subs.iter().enumerate() {
        if let (Some(max), None) = (life.max, life.queue) {
            let floor = guaranteed_count[i].min(max as usize);
            if life.deliveries.len() < floor {
                violations.push(format!(
                    "conn {} sid {} (max {max}): {} deliveries, {} guaranteed",
                    life.conn,
                    life.sid,
                    life.deliveries.len(),
                    guaranteed_count[i]
                ));
            }
        }
    }
    if std::env::var("PERCH_MODEL_TRACE").is_ok() && !violations.is_empty() {
        for (conn, ops) in sent.iter().enumerate() {
            for s in ops {
                eprintln!(
                    "conn {conn} sent {:?} (confirmed by PING {})",
                    s.op, s.ping_after
                );
            }
        }
        for (conn, frames) in received.iter().enumerate() {
            for (pos, f) in frames.iter().enumerate() {
                eprintln!("conn {conn} got @{pos} {f:?}");
            }
        }
    }
    violations
}

fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("PERCH_MODEL_SEED") {
        return vec![seed.parse().expect("PERCH_MODEL_SEED is a number")];
    }
    let n: u64 = std::env::var("PERCH_MODEL_SEEDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(4);
    // A different base each run explores new scripts; the seed is printed.
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1)
        % 1_000_000
        * 1000;
    (0..n).map(|k| base + k).collect()
}

fn run_seeds(shards: usize, conns: usize) {
    run_seeds_with(shards, conns, &Moves::None);
}

fn run_seeds_with(shards: usize, conns: usize, moves: &Moves) {
    for seed in seeds() {
        let started = Instant::now();
        let (violations, moved) = run_model_with(shards, seed, conns, 40, moves);
        eprintln!(
            "interest model: shards {shards}, seed {seed}: {} violations, {moved} moves in {:?}",
            violations.len(),
            started.elapsed()
        );
        if let Moves::Forced { profile, .. } = moves {
            // Not vacuous: connections really moved, many times (fewer with
            // mixed scripts, whose queue SUBs and maxes pin connections).
            let wanted = match profile {
                Profile::Movable => conns as u64,
                Profile::Mixed => conns as u64 / 4,
            };
            assert!(
                moved >= wanted,
                "PERCH_MODEL_SEED={seed}: only {moved} moves for {conns} connections"
            );
        }
        if !violations.is_empty() {
            let shown: Vec<_> = violations.iter().take(25).collect();
            panic!(
                "shards {shards}, PERCH_MODEL_SEED={seed}: {} contract violations, first:\n  {}",
                violations.len(),
                shown
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("\n  ")
            );
        }
    }
}

#[test]
fn cross_shard_interest_model_2_shards() {
    run_seeds(2, 8);
}

#[test]
fn cross_shard_interest_model_4_shards() {
    run_seeds(4, 12);
}

// The same contract while connections keep moving between shards
// (`--debug-move-every`): a move must be invisible to every client.

#[test]
fn cross_shard_interest_model_with_moves_2_shards() {
    let profile = Profile::Movable;
    run_seeds_with(2, 8, &Moves::Forced { every: 3, profile });
}

#[test]
fn cross_shard_interest_model_with_moves_4_shards() {
    let profile = Profile::Movable;
    run_seeds_with(4, 12, &Moves::Forced { every: 3, profile });
}

#[test]
fn cross_shard_interest_model_with_moves_mixed_scripts() {
    let profile = Profile::Mixed;
    run_seeds_with(2, 8, &Moves::Forced { every: 2, profile });
}
