//! The JetStream scenarios: acked publishes into a file-backed stream
//! (`js-publish`) and replay of a pre-filled stream through a pull consumer
//! (`js-replay`).
//!
//! Both servers get byte-identical API requests, sent raw like every other
//! frame the loadgen writes. Nothing is taken on trust: every publish must get
//! exactly one PubAck naming stream BENCH, the acked stream sequences of a run
//! must be exactly 1..=N, the stream's own info must agree, and a replay must
//! deliver 1..=N in order. An error ack, a status reply, a missing or duplicate
//! ack or an ack that does not come within [`ACK_STALL_TIMEOUT`] fails the run
//! with the reason, so no rate is ever reported for messages the server did
//! not store or serve. What happens on disk (fsync or not) is each server's
//! default and is not checked here.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use memchr::memmem;
use serde_json::Value;

use crate::machine::fdatasync_latency_us;
use crate::proto::{
    is_hmsg, msg_subject, reply_subject, status_line, Conn, FrameKind, JS_CONNECT_JSON,
    SMALL_READ_BUFFER_BYTES, STREAM_READ_BUFFER_BYTES,
};
use crate::scenarios::{
    join_thread, sleep_unless_failed, CpuUse, CpuWindow, Measurement, Params, PUB_BATCH_BYTES,
};
use crate::server::RunningServer;

const STREAM_NAME: &str = "BENCH";
/// The one stream-create request both servers get, byte for byte.
const STREAM_CREATE_BODY: &str = r#"{"name":"BENCH","subjects":["bench.>"],"storage":"file"}"#;
/// Every publish goes here; the stream captures `bench.>`.
const PUBLISH_SUBJECT: &str = "bench.p";
const CONSUMER_NAME: &str = "replay";
/// A durable pull consumer from the first message, without acks: replay
/// measures reading the store, not ack bookkeeping.
const CONSUMER_CREATE_BODY: &str = r#"{"stream_name":"BENCH","config":{"name":"replay","durable_name":"replay","deliver_policy":"all","ack_policy":"none"}}"#;

/// How long an API request may wait for its reply.
const API_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// A publisher with unacked publishes, or a replay with pull requests out,
/// fails when nothing arrives for this long.
const ACK_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// `expires` of each pull request; longer than the stall timeout so a
/// stalled server is reported as a stall, not as a `408`.
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// Pull requests kept outstanding: while one batch is read the server already
/// holds the next request, so no batch waits for a round trip.
const PULLS_IN_FLIGHT: usize = 2;
/// Pre-fill must reach this rate or it runs into its deadline (on top of
/// `--timeout-ms`); the stall timeout catches a server that stops sooner.
const PREFILL_MSGS_PER_S_MIN: u64 = 10_000;
/// fdatasyncs timed before each run's measurement ([`disk_fdatasync_p50_us`]).
const RUN_FDATASYNC_PROBE_COUNT: usize = 100;

const API_INBOX_PREFIX: &str = "_INBOX.lgapi.";
const PULL_INBOX_PREFIX: &str = "_INBOX.lgpull.";

/// `<prefix><publisher>.` — each publish's reply subject is this plus its
/// index on the connection, so every PubAck names the publish it is for.
fn ack_inbox_prefix(publisher: usize) -> String {
    format!("_INBOX.lgjs.{publisher}.")
}

/// A decimal u64 with no sign or spaces.
fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |value, digit| value * 10 + u64::from(digit - b'0')),
    )
}

/// The bytes after `"key":` (spaces skipped) in a flat JSON object.
fn json_value_after<'a>(json: &'a [u8], quoted_key: &[u8]) -> Option<&'a [u8]> {
    let after_key = &json[memmem::find(json, quoted_key)? + quoted_key.len()..];
    let after_colon = after_key.trim_ascii_start().strip_prefix(b":")?;
    Some(after_colon.trim_ascii_start())
}

/// The stream sequence of a PubAck for stream BENCH
/// (`{"stream":"BENCH", "seq":N}`, spacing as either server writes it),
/// without allocating. Anything else — an `error` object, `"duplicate":true`,
/// another stream, no or a zero `seq` — is `Err` with the payload as text.
fn parse_pub_ack(payload: &[u8]) -> Result<u64, String> {
    let rejected = || String::from_utf8_lossy(payload).into_owned();
    if memmem::find(payload, b"\"error\"").is_some()
        || json_value_after(payload, b"\"duplicate\"")
            .is_some_and(|value| value.starts_with(b"true"))
    {
        return Err(rejected());
    }
    let stream = json_value_after(payload, b"\"stream\"").ok_or_else(rejected)?;
    if !stream.starts_with(b"\"BENCH\"") {
        return Err(rejected());
    }
    let seq = json_value_after(payload, b"\"seq\"").ok_or_else(rejected)?;
    let digits_len = seq
        .iter()
        .position(|byte| !byte.is_ascii_digit())
        .unwrap_or(seq.len());
    match parse_u64(&seq[..digits_len]) {
        Some(seq) if seq > 0 => Ok(seq),
        _ => Err(rejected()),
    }
}

/// The stream sequence in a delivery's ack subject:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`
/// (9 tokens, nats-server 2.9 and perch), or the 11/12-token form of newer
/// servers with `<domain>.<account hash>` after `$JS.ACK`.
fn ack_subject_stream_seq(ack_subject: &[u8]) -> Option<u64> {
    let mut tokens: [&[u8]; 12] = [&[]; 12];
    let mut token_count = 0;
    for token in ack_subject.split(|byte| *byte == b'.') {
        if token_count == tokens.len() {
            return None;
        }
        tokens[token_count] = token;
        token_count += 1;
    }
    if tokens[0] != b"$JS" || tokens[1] != b"ACK" {
        return None;
    }
    let stream_seq_index = match token_count {
        9 => 5,
        11 | 12 => 7,
        _ => return None,
    };
    parse_u64(tokens[stream_seq_index])
}

/// Why an HMSG came instead of a JSON reply, as text.
fn describe_status(payload: &[u8]) -> String {
    status_line(payload).map_or_else(
        || "a header-only reply without a status".to_string(),
        |status| String::from_utf8_lossy(status).into_owned(),
    )
}

fn is_no_responders(payload: &[u8]) -> bool {
    status_line(payload).is_some_and(|status| status.starts_with(b"NATS/1.0 503"))
}

/// One connection for JetStream API requests, one request at a time.
struct ApiClient {
    conn: Conn,
    next_request_id: u64,
}

impl ApiClient {
    fn open(server: &RunningServer, deadline: Instant) -> Result<Self> {
        let mut conn =
            Conn::open(server.addr, SMALL_READ_BUFFER_BYTES, deadline).context("API connection")?;
        conn.handshake_with(
            JS_CONNECT_JSON,
            format!("SUB {API_INBOX_PREFIX}* 1\r\n").as_bytes(),
            deadline,
        )
        .context("API connection")?;
        Ok(Self {
            conn,
            next_request_id: 0,
        })
    }

    /// Sends `body` to `subject` and returns the JSON reply. No responders
    /// (503), an `error` in the reply or no reply within
    /// [`API_REPLY_TIMEOUT`] fails.
    fn request(&mut self, subject: &str, body: &str) -> Result<Value> {
        let inbox = format!("{API_INBOX_PREFIX}{}", self.next_request_id);
        self.next_request_id += 1;
        let mut out = format!("PUB {subject} {inbox} {}\r\n", body.len()).into_bytes();
        out.extend_from_slice(body.as_bytes());
        out.extend_from_slice(b"\r\n");
        self.conn
            .stream
            .write_all(&out)
            .with_context(|| format!("sending {subject}"))?;
        let deadline = Instant::now() + API_REPLY_TIMEOUT;
        loop {
            let frame = self
                .conn
                .wait_for(FrameKind::Msg, deadline)
                .with_context(|| {
                    format!(
                        "no reply to {subject} within {API_REPLY_TIMEOUT:?} \
                         (is JetStream on? perch: --store-dir, nats-server: -js)"
                    )
                })?;
            let line = self.conn.reader.bytes(frame.line.clone());
            if msg_subject(line) != Some(inbox.as_bytes()) {
                continue; // a late reply to an earlier request
            }
            let payload = self.conn.reader.bytes(frame.payload);
            if is_hmsg(line) {
                if is_no_responders(payload) {
                    bail!(
                        "{subject}: no responders (503): the server does not serve the \
                         JetStream API (perch: --store-dir, nats-server: -js)"
                    );
                }
                bail!(
                    "{subject}: got {} instead of a reply",
                    describe_status(payload)
                );
            }
            let reply: Value = serde_json::from_slice(payload).with_context(|| {
                format!(
                    "{subject}: reply is not JSON: {:?}",
                    String::from_utf8_lossy(payload)
                )
            })?;
            if let Some(error) = reply.get("error") {
                bail!("{subject} failed: {error}");
            }
            return Ok(reply);
        }
    }

    fn create_stream(&mut self) -> Result<()> {
        let subject = format!("$JS.API.STREAM.CREATE.{STREAM_NAME}");
        let reply = self.request(&subject, STREAM_CREATE_BODY)?;
        if reply["config"]["name"] != STREAM_NAME {
            bail!("{subject}: unexpected reply {reply}");
        }
        Ok(())
    }

    /// The stream's own count must match the acks: `expected` messages,
    /// sequences 1..=expected.
    fn check_stream_holds(&mut self, expected: u64) -> Result<()> {
        let reply = self.request(&format!("$JS.API.STREAM.INFO.{STREAM_NAME}"), "")?;
        let state = &reply["state"];
        let field = |name: &str| state[name].as_u64();
        let (messages, first_seq, last_seq) =
            (field("messages"), field("first_seq"), field("last_seq"));
        if messages != Some(expected)
            || last_seq != Some(expected)
            || (expected > 0 && first_seq != Some(1))
        {
            bail!(
                "after {expected} acked publishes the stream reports messages {messages:?}, \
                 first_seq {first_seq:?}, last_seq {last_seq:?}"
            );
        }
        Ok(())
    }

    fn create_consumer(&mut self) -> Result<()> {
        let subject = format!("$JS.API.CONSUMER.CREATE.{STREAM_NAME}.{CONSUMER_NAME}");
        let reply = self.request(&subject, CONSUMER_CREATE_BODY)?;
        if reply["name"] != CONSUMER_NAME {
            bail!("{subject}: unexpected reply {reply}");
        }
        Ok(())
    }
}

/// p50 of append 64 B + fdatasync, in µs, beside the server's store (in its
/// parent, not inside it), just before the measurement. The disk is shared
/// and its latency drifts; a server that syncs before acking feels that
/// directly, so each run records what the disk was doing.
fn disk_fdatasync_p50_us(server: &RunningServer) -> Result<f64> {
    let dir = server
        .store_dir
        .as_deref()
        .and_then(|store_dir| store_dir.parent())
        .context("the server has no store directory")?;
    Ok(fdatasync_latency_us(dir, RUN_FDATASYNC_PROBE_COUNT)?.0)
}

/// Publisher connections, each subscribed to its own ack inbox.
fn open_publishers(
    server: &RunningServer,
    params: &Params,
    deadline: Instant,
) -> Result<Vec<Conn>> {
    (0..params.js_publishers.max(1))
        .map(|publisher| {
            let mut conn = Conn::open(server.addr, STREAM_READ_BUFFER_BYTES, deadline)
                .with_context(|| format!("publisher {publisher}"))?;
            conn.handshake_with(
                JS_CONNECT_JSON,
                format!("SUB {}* 1\r\n", ack_inbox_prefix(publisher)).as_bytes(),
                deadline,
            )
            .with_context(|| format!("publisher {publisher}"))?;
            Ok(conn)
        })
        .collect()
}

/// Shared state of the publisher threads.
struct PublishControl<'a> {
    /// `Some(n)`: publish exactly n; `None`: until `stop`.
    count: Option<u64>,
    window_msgs: u64,
    payload: &'a [u8],
    /// This publisher's acks so far, for the measuring thread.
    acked: &'a AtomicU64,
    stop: &'a AtomicBool,
    /// Set when any thread failed: the others give up.
    failed: &'a AtomicBool,
    deadline: Instant,
}

/// Publishes with a reply inbox per message, at most `window_msgs` unacked,
/// until the count is reached or `stop`, then waits for every remaining ack.
/// Returns the stream sequence acked for each publish, in publish order, or
/// `None` when it gave up because another thread failed.
fn publish_acked(
    mut conn: Conn,
    publisher: usize,
    control: &PublishControl<'_>,
) -> Result<Option<Vec<u64>>> {
    let reply_prefix = ack_inbox_prefix(publisher);
    let window_msgs = control.window_msgs.max(1);
    let mut out = Vec::with_capacity(PUB_BATCH_BYTES + 256);
    // stream_seqs[i] is the sequence acked for publish i, 0 until its ack.
    let mut stream_seqs: Vec<u64> = Vec::new();
    let mut acked_count = 0u64;
    let mut last_progress = Instant::now();
    loop {
        if control.failed.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let published = stream_seqs.len() as u64;
        let may_publish = match control.count {
            Some(count) => published < count,
            None => !control.stop.load(Ordering::Relaxed),
        };
        if may_publish {
            let limit = control.count.unwrap_or(u64::MAX);
            let mut next = published;
            while next - acked_count < window_msgs && next < limit && out.len() < PUB_BATCH_BYTES {
                write!(
                    out,
                    "PUB {PUBLISH_SUBJECT} {reply_prefix}{next} {}\r\n",
                    control.payload.len()
                )
                .context("formatting a publish")?;
                out.extend_from_slice(control.payload);
                out.extend_from_slice(b"\r\n");
                next += 1;
            }
            if !out.is_empty() {
                if published == acked_count {
                    // Nothing was outstanding: the ack clock starts now.
                    last_progress = Instant::now();
                }
                stream_seqs.resize(next as usize, 0);
                conn.stream
                    .write_all(&out)
                    .with_context(|| format!("publish write failed after {acked_count} PubAcks"))?;
                out.clear();
            }
        } else if acked_count == published {
            return Ok(Some(stream_seqs));
        }
        if Instant::now() >= control.deadline {
            bail!(
                "still running at the scenario deadline: {acked_count} of {} publishes acked",
                stream_seqs.len()
            );
        }

        conn.fill()
            .with_context(|| format!("connection failed after {acked_count} PubAcks"))?;
        let acked_before = acked_count;
        while let Some(frame) = conn.reader.next_frame()? {
            match frame.kind {
                FrameKind::Msg => {
                    let line = conn.reader.bytes(frame.line.clone());
                    let payload = conn.reader.bytes(frame.payload);
                    if is_hmsg(line) {
                        let hint = if is_no_responders(payload) {
                            " (nothing stored it: no stream captures bench.p, or JetStream is off)"
                        } else {
                            ""
                        };
                        bail!(
                            "a publish got {} instead of a PubAck{hint}",
                            describe_status(payload)
                        );
                    }
                    let index = msg_subject(line)
                        .and_then(|subject| subject.strip_prefix(reply_prefix.as_bytes()))
                        .and_then(parse_u64)
                        .with_context(|| {
                            format!("unexpected message {:?}", String::from_utf8_lossy(line))
                        })?;
                    let slot = usize::try_from(index)
                        .ok()
                        .and_then(|index| stream_seqs.get_mut(index))
                        .with_context(|| format!("PubAck for publish {index}, never sent"))?;
                    match parse_pub_ack(payload) {
                        Ok(seq) if *slot == 0 => {
                            *slot = seq;
                            acked_count += 1;
                        }
                        Ok(seq) => bail!(
                            "second PubAck for publish {index} (stream seqs {} and {seq})",
                            *slot
                        ),
                        Err(reply) => {
                            bail!("publish {index} was not stored, the server replied {reply}")
                        }
                    }
                }
                FrameKind::Ping => conn
                    .stream
                    .write_all(b"PONG\r\n")
                    .context("answering PING")?,
                FrameKind::Err => bail!(
                    "server sent {} after {acked_count} PubAcks",
                    String::from_utf8_lossy(conn.reader.bytes(frame.line))
                ),
                FrameKind::Pong | FrameKind::Ok | FrameKind::Info => {}
            }
        }
        if acked_count > acked_before {
            last_progress = Instant::now();
            control.acked.store(acked_count, Ordering::Relaxed);
        } else if (stream_seqs.len() as u64) > acked_count
            && last_progress.elapsed() >= ACK_STALL_TIMEOUT
        {
            bail!(
                "no PubAck for {ACK_STALL_TIMEOUT:?} with {} publishes waiting \
                 ({acked_count} of {} acked)",
                stream_seqs.len() as u64 - acked_count,
                stream_seqs.len()
            );
        }
    }
}

/// The acked sequences of all publishers together must be exactly 1..=N.
fn check_dense(mut stream_seqs: Vec<u64>) -> Result<u64> {
    stream_seqs.sort_unstable();
    let total = stream_seqs.len() as u64;
    for (position, seq) in (1u64..).zip(&stream_seqs) {
        if *seq != position {
            bail!(
                "the {total} PubAcks' stream sequences are not 1..={total}: \
                 the {position}th smallest is {seq}"
            );
        }
    }
    Ok(total)
}

/// Runs one thread per publisher connection (each publishing `counts[i]`, or
/// until told to stop when `counts` is None), runs `during` on this thread
/// meanwhile (js-publish measures there), then stops them, collects every
/// outstanding ack and checks the sequences. Returns `during`'s value and the
/// number of acked publishes.
fn publish_checked<T>(
    conns: Vec<Conn>,
    params: &Params,
    counts: Option<&[u64]>,
    deadline: Instant,
    during: impl FnOnce(&[AtomicU64], &AtomicBool) -> Result<T>,
) -> Result<(T, u64)> {
    let acked: Vec<AtomicU64> = conns.iter().map(|_| AtomicU64::new(0)).collect();
    let stop = AtomicBool::new(false);
    let failed = AtomicBool::new(false);
    let payload = vec![b'x'; params.payload_bytes];
    thread::scope(|scope| -> Result<(T, u64)> {
        let (acked, stop, failed, payload) = (&acked, &stop, &failed, &payload);
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(publisher, conn)| {
                let control = PublishControl {
                    count: counts.map(|counts| counts[publisher]),
                    window_msgs: params.js_window_msgs,
                    payload,
                    acked: &acked[publisher],
                    stop,
                    failed,
                    deadline,
                };
                scope.spawn(move || {
                    let result = publish_acked(conn, publisher, &control)
                        .with_context(|| format!("publisher {publisher}"));
                    if result.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    result
                })
            })
            .collect();
        let during_result = during(acked, failed);
        if during_result.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        stop.store(true, Ordering::Relaxed);
        let mut stream_seqs = Vec::new();
        let mut first_error = None;
        for handle in handles {
            match join_thread(handle, "publisher") {
                Ok(Some(mut publisher_seqs)) => stream_seqs.append(&mut publisher_seqs),
                Ok(None) => {} // gave up because another thread failed
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        let value = during_result?;
        let total = check_dense(stream_seqs)?;
        Ok((value, total))
    })
}

pub fn js_publish(server: &RunningServer, params: &Params) -> Result<Measurement> {
    let setup_deadline = Instant::now() + params.timeout;
    let mut api = ApiClient::open(server, setup_deadline)?;
    api.create_stream()?;
    let publishers = open_publishers(server, params, setup_deadline)?;
    let disk_fdatasync_p50_us = disk_fdatasync_p50_us(server)?;
    let run_deadline = Instant::now() + params.warmup + params.duration + params.timeout;
    let (measured, total) = publish_checked(
        publishers,
        params,
        None,
        run_deadline,
        |acked, failed| -> Result<Option<(f64, CpuUse, u64)>> {
            let acked_total = || -> u64 {
                acked
                    .iter()
                    .map(|count| count.load(Ordering::Relaxed))
                    .sum()
            };
            if !sleep_unless_failed(Instant::now() + params.warmup, failed) {
                return Ok(None);
            }
            let cpu = CpuWindow::start(server)?;
            let (count_start, window_start) = (acked_total(), Instant::now());
            if !sleep_unless_failed(window_start + params.duration, failed) {
                return Ok(None);
            }
            let (count_end, window_end) = (acked_total(), Instant::now());
            let cpu = cpu.finish(server)?;
            let acked = count_end - count_start;
            let rate = acked as f64 / (window_end - window_start).as_secs_f64();
            Ok(Some((rate, cpu, acked)))
        },
    )?;
    api.check_stream_holds(total)?;
    let (rate, cpu, acked) = measured.context("the measurement window did not complete")?;
    Ok(vec![
        ("acked_msgs_per_s", rate),
        (
            "server_cpu_s_per_m_published",
            cpu.server_s_per_million(acked)?,
        ),
        ("server_cpu_cores", cpu.server_cores()),
        ("loadgen_cpu_cores", cpu.loadgen_cores()),
        ("disk_fdatasync_p50_us", disk_fdatasync_p50_us),
    ])
}

/// Reads `total` messages from the consumer with pull requests of `batch`,
/// [`PULLS_IN_FLIGHT`] outstanding; every message must be the next stream
/// sequence with a `payload_bytes` payload.
fn replay(
    conn: &mut Conn,
    total: u64,
    batch: u64,
    payload_bytes: usize,
    deadline: Instant,
) -> Result<()> {
    let batch = batch.max(1);
    let pull_subject = format!("$JS.API.CONSUMER.MSG.NEXT.{STREAM_NAME}.{CONSUMER_NAME}");
    let mut out = Vec::with_capacity(1024);
    let mut requested = 0u64;
    let mut next_pull_id = 0u64;
    // The message count at which each outstanding request is complete.
    let mut pulls_end_at: VecDeque<u64> = VecDeque::with_capacity(PULLS_IN_FLIGHT);
    let mut request_more = |out: &mut Vec<u8>, pulls_end_at: &mut VecDeque<u64>| -> Result<()> {
        while pulls_end_at.len() < PULLS_IN_FLIGHT && requested < total {
            let pull_msgs = batch.min(total - requested);
            let body = format!(
                r#"{{"batch":{pull_msgs},"expires":{}}}"#,
                PULL_EXPIRES.as_nanos()
            );
            write!(
                out,
                "PUB {pull_subject} {PULL_INBOX_PREFIX}{next_pull_id} {}\r\n{body}\r\n",
                body.len()
            )
            .context("formatting a pull request")?;
            next_pull_id += 1;
            requested += pull_msgs;
            pulls_end_at.push_back(requested);
        }
        Ok(())
    };
    request_more(&mut out, &mut pulls_end_at)?;
    let mut received = 0u64;
    let mut last_progress = Instant::now();
    loop {
        if !out.is_empty() {
            conn.stream
                .write_all(&out)
                .context("writing pull requests")?;
            out.clear();
        }
        if received == total {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("replay still running at the scenario deadline: {received} of {total} messages");
        }
        conn.fill()
            .with_context(|| format!("connection failed after {received} of {total} messages"))?;
        let received_before = received;
        while let Some(frame) = conn.reader.next_frame()? {
            match frame.kind {
                FrameKind::Msg => {
                    let line = conn.reader.bytes(frame.line.clone());
                    let payload = conn.reader.bytes(frame.payload);
                    if is_hmsg(line) {
                        bail!(
                            "a pull request ended with {} after {received} of {total} messages",
                            describe_status(payload)
                        );
                    }
                    let stream_seq = reply_subject(line)
                        .and_then(ack_subject_stream_seq)
                        .with_context(|| {
                            format!(
                                "delivery without a $JS.ACK reply subject: {:?}",
                                String::from_utf8_lossy(line)
                            )
                        })?;
                    if stream_seq != received + 1 {
                        bail!(
                            "replay out of order: message {} is stream sequence {stream_seq}",
                            received + 1
                        );
                    }
                    if payload.len() != payload_bytes {
                        bail!(
                            "stream sequence {stream_seq} came back with {} payload bytes, not {payload_bytes}",
                            payload.len()
                        );
                    }
                    received += 1;
                    while pulls_end_at.front() == Some(&received) {
                        pulls_end_at.pop_front();
                        request_more(&mut out, &mut pulls_end_at)?;
                    }
                }
                FrameKind::Ping => out.extend_from_slice(b"PONG\r\n"),
                FrameKind::Err => bail!(
                    "server sent {} after {received} of {total} messages",
                    String::from_utf8_lossy(conn.reader.bytes(frame.line))
                ),
                FrameKind::Pong | FrameKind::Ok | FrameKind::Info => {}
            }
        }
        if received > received_before {
            last_progress = Instant::now();
        } else if last_progress.elapsed() >= ACK_STALL_TIMEOUT {
            bail!(
                "no message for {ACK_STALL_TIMEOUT:?} with pull requests outstanding \
                 ({received} of {total} received)"
            );
        }
    }
}

pub fn js_replay(server: &RunningServer, params: &Params) -> Result<Measurement> {
    let total = params.js_replay_msgs;
    if total == 0 {
        bail!("--js-replay-msgs must be at least 1");
    }
    let setup_deadline = Instant::now() + params.timeout;
    let mut api = ApiClient::open(server, setup_deadline)?;
    api.create_stream()?;

    // Pre-fill through the same checked, acked path as js-publish.
    let disk_fdatasync_p50_us = disk_fdatasync_p50_us(server)?;
    let publishers = open_publishers(server, params, setup_deadline)?;
    let publisher_count = publishers.len() as u64;
    let counts: Vec<u64> = (0..publisher_count)
        .map(|publisher| total / publisher_count + u64::from(publisher < total % publisher_count))
        .collect();
    let prefill_deadline = Instant::now()
        + params.timeout
        + Duration::from_secs(total.div_ceil(PREFILL_MSGS_PER_S_MIN));
    let prefill_started = Instant::now();
    let ((), acked) = publish_checked(
        publishers,
        params,
        Some(&counts),
        prefill_deadline,
        |_, _| Ok(()),
    )
    .context("pre-filling the stream")?;
    let prefill_s = prefill_started.elapsed().as_secs_f64();
    api.check_stream_holds(acked)?;
    api.create_consumer()?;

    let replay_setup_deadline = Instant::now() + params.timeout;
    let mut reader = Conn::open(server.addr, STREAM_READ_BUFFER_BYTES, replay_setup_deadline)
        .context("replay connection")?;
    reader
        .handshake_with(
            JS_CONNECT_JSON,
            format!("SUB {PULL_INBOX_PREFIX}* 1\r\n").as_bytes(),
            replay_setup_deadline,
        )
        .context("replay connection")?;
    let cpu = CpuWindow::start(server)?;
    let started = Instant::now();
    replay(
        &mut reader,
        total,
        params.js_fetch_batch,
        params.payload_bytes,
        started + params.timeout,
    )
    .context("replay")?;
    let replay_s = started.elapsed().as_secs_f64();
    let cpu = cpu.finish(server)?;
    Ok(vec![
        ("replayed_msgs_per_s", total as f64 / replay_s),
        (
            "server_cpu_s_per_m_delivered",
            cpu.server_s_per_million(total)?,
        ),
        ("prefill_acked_msgs_per_s", total as f64 / prefill_s),
        ("server_cpu_cores", cpu.server_cores()),
        ("loadgen_cpu_cores", cpu.loadgen_cores()),
        ("disk_fdatasync_p50_us", disk_fdatasync_p50_us),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pub_acks_as_both_servers_write_them() {
        // nats-server 2.9.10 writes a space after the comma.
        assert_eq!(parse_pub_ack(br#"{"stream":"BENCH", "seq":1}"#), Ok(1));
        assert_eq!(
            parse_pub_ack(br#"{"stream":"BENCH","seq":1234567}"#),
            Ok(1234567)
        );
        assert_eq!(
            parse_pub_ack(br#"{"stream": "BENCH", "seq": 42, "duplicate": false}"#),
            Ok(42)
        );
        for rejected in [
            &br#"{"stream":"BENCH","seq":7,"duplicate":true}"#[..],
            br#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
            br#"{"stream":"OTHER","seq":7}"#,
            br#"{"stream":"BENCHX","seq":7}"#,
            br#"{"stream":"BENCH","seq":0}"#,
            br#"{"stream":"BENCH"}"#,
            br#"{"stream":"BENCH","seq":-1}"#,
            b"",
        ] {
            assert!(
                parse_pub_ack(rejected).is_err(),
                "{:?}",
                String::from_utf8_lossy(rejected)
            );
        }
    }

    #[test]
    fn finds_the_stream_sequence_in_ack_subjects() {
        assert_eq!(
            ack_subject_stream_seq(b"$JS.ACK.BENCH.replay.1.5.5.1795313871623731958.2"),
            Some(5)
        );
        assert_eq!(
            ack_subject_stream_seq(b"$JS.ACK.dom.acchash.BENCH.replay.1.9.9.17953.0.tok"),
            Some(9)
        );
        assert_eq!(ack_subject_stream_seq(b"_INBOX.a.b"), None);
        assert_eq!(
            ack_subject_stream_seq(b"$JS.ACK.BENCH.replay.1.x.5.1.2"),
            None
        );
    }

    #[test]
    fn dense_sequences_only() {
        assert_eq!(check_dense(vec![3, 1, 2]).ok(), Some(3));
        assert_eq!(check_dense(Vec::new()).ok(), Some(0));
        assert!(check_dense(vec![1, 1, 2]).is_err());
        assert!(check_dense(vec![1, 3]).is_err());
        assert!(check_dense(vec![2, 3]).is_err());
    }

    #[test]
    fn parses_plain_decimals_only() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(
            parse_u64(b"18446744073709551"),
            Some(18_446_744_073_709_551)
        );
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"+1"), None);
        assert_eq!(parse_u64(b"12345678901234567890"), None);
    }
}
