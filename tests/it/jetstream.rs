//! JetStream through the official Rust client's `async_nats::jetstream` API:
//! streams, publishes with PubAcks, message get/delete/purge, pull and push
//! consumers, ack policies and redelivery, deliver policies, limits, and
//! persistence across restarts.
//!
//! Every test is a function taking the broker kind ([`Js`]) and is instantiated
//! by `js_tests!` once per broker: `jetstream::reference::<name>` runs against
//! Debian's `nats-server -js` (which proves the test), `jetstream::perch::<name>`
//! against perch `--store-dir`.
//!
//! Rules kept here: every wait is bounded (`WAIT`) but generous, and no test
//! asserts that something happened *quickly*; where a test needs something
//! *not* to happen (no redelivery after an ack) it waits several times the
//! relevant period and then looks. Acks whose effect is checked right after
//! are sent with `double_ack` (the server confirms them), so nothing races.

use std::future::{Future, IntoFuture};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, DiscardPolicy, StorageType};
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures::StreamExt;

use crate::support::{Js, JsBroker};

/// Bound on any single wait in these tests (never an expected duration).
pub const WAIT: Duration = Duration::from_secs(20);

js_tests!(
    stream_create_info_update_delete,
    stream_names_and_list,
    publish_acks_many_in_flight,
    publish_without_stream_is_no_responders,
    msg_id_dedupe,
    expected_headers,
    get_raw_messages,
    purge_all_subject_and_up_to_sequence,
    delete_message,
    pull_durable_fetch_batch_messages,
    pull_ephemeral,
    ack_wait_redelivery,
    max_deliver,
    nak_term_and_in_progress,
    ack_policy_none,
    ack_policy_all_vs_explicit,
    deliver_policies,
    push_consumer,
    limit_max_msgs,
    limit_max_bytes,
    limit_max_age,
    limit_max_msgs_per_subject,
    limit_discard_new,
    restart_keeps_streams_messages_and_consumers,
);

// ------------------------------------------------------------------ helpers

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Prints the broker's log if the test panics while it is alive.
struct LogOnPanic<'a>(&'a JsBroker);

impl Drop for LogOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {:?} broker log (tail):\n{}",
                self.0.kind,
                self.0.log_tail()
            );
        }
    }
}

/// Runs one phase of a test (between broker restarts) on a fresh runtime.
pub fn block_on<F: Future>(broker: &JsBroker, body: F) -> F::Output {
    let _log = LogOnPanic(broker);
    runtime().block_on(body)
}

/// Awaits `fut`, failing the test after [`WAIT`].
pub async fn within<F: IntoFuture>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

/// A client and its JetStream context, API requests bounded by 10 s.
pub async fn connect(broker: &JsBroker) -> (async_nats::Client, jetstream::Context) {
    let client = within("connect", async_nats::connect(broker.url()))
        .await
        .expect("connect");
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .build(client.clone());
    (client, js)
}

fn stream_config(name: &str, subjects: &[&str]) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        storage: StorageType::File,
        ..Default::default()
    }
}

async fn create_stream(js: &jetstream::Context, config: stream::Config) -> stream::Stream {
    within("create stream", js.create_stream(config))
        .await
        .expect("create stream")
}

/// Publishes and awaits the PubAck, returning the stream sequence.
pub async fn publish(js: &jetstream::Context, subject: &str, payload: &str) -> u64 {
    let ack = within(
        "publish",
        js.publish(subject.to_string(), Bytes::from(payload.to_string())),
    )
    .await
    .expect("publish sent");
    let ack = within("pub ack", ack).await.expect("pub ack");
    assert!(!ack.duplicate, "fresh publish acked as duplicate");
    ack.sequence
}

async fn stream_state(js: &jetstream::Context, name: &str) -> stream::State {
    let stream = within("get stream", js.get_stream(name))
        .await
        .expect("get stream");
    stream.cached_info().state.clone()
}

async fn consumer_info(consumer: &PullConsumer) -> consumer::Info {
    within("consumer info", consumer.get_info())
        .await
        .expect("consumer info")
}

fn pull_config(durable: Option<&str>) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: durable.map(str::to_string),
        ..Default::default()
    }
}

async fn create_pull(stream: &stream::Stream, config: consumer::pull::Config) -> PullConsumer {
    within("create consumer", stream.create_consumer(config))
        .await
        .expect("create pull consumer")
}

/// Fetches (no_wait) up to `max` messages: whatever is available now.
pub async fn fetch(consumer: &PullConsumer, max: usize) -> Vec<jetstream::Message> {
    let mut batch = within(
        "fetch request",
        consumer.fetch().max_messages(max).messages(),
    )
    .await
    .expect("fetch");
    let mut out = Vec::new();
    while let Some(msg) = within("fetch next", batch.next()).await {
        out.push(msg.expect("fetched message"));
    }
    out
}

/// Waits (pull request with an expiry) for exactly `n` messages.
async fn pull_n(consumer: &PullConsumer, n: usize) -> Vec<jetstream::Message> {
    let mut batch = within(
        "batch request",
        consumer
            .batch()
            .max_messages(n)
            .expires(Duration::from_secs(15))
            .messages(),
    )
    .await
    .expect("batch");
    let mut out = Vec::new();
    while let Some(msg) = within("batch next", batch.next()).await {
        out.push(msg.expect("batch message"));
    }
    assert_eq!(
        out.len(),
        n,
        "pull request for {n} messages ended with {}: {:?}",
        out.len(),
        summary(&out)
    );
    out
}

/// Pulls with an expiry of `wait` and returns what came (maybe nothing).
async fn pull_for(consumer: &PullConsumer, max: usize, wait: Duration) -> Vec<jetstream::Message> {
    let mut batch = within(
        "batch request",
        consumer.batch().max_messages(max).expires(wait).messages(),
    )
    .await
    .expect("batch");
    let mut out = Vec::new();
    while let Some(msg) = within("batch next", batch.next()).await {
        out.push(msg.expect("batch message"));
    }
    out
}

/// (stream sequence, delivery count, payload) of each message.
fn summary(msgs: &[jetstream::Message]) -> Vec<(u64, i64, String)> {
    msgs.iter()
        .map(|m| {
            let info = m.info().expect("JetStream reply subject");
            (
                info.stream_sequence,
                info.delivered,
                String::from_utf8_lossy(&m.payload).into_owned(),
            )
        })
        .collect()
}

fn stream_seqs(msgs: &[jetstream::Message]) -> Vec<u64> {
    summary(msgs).into_iter().map(|(s, _, _)| s).collect()
}

/// Acks and waits for the server's confirmation.
pub async fn ack_sync(msg: &jetstream::Message) {
    within("double ack", msg.double_ack())
        .await
        .expect("double ack");
}

/// The JetStream API error carried by an error (its kind or its source chain).
fn api_error(err: &(dyn std::error::Error + 'static)) -> Option<jetstream::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(api) = e.downcast_ref::<jetstream::Error>() {
            return Some(api.clone());
        }
        cur = e.source();
    }
    None
}

/// (code, err_code) of an error's JetStream API error, from its source chain
/// or its Display (kinds like `JetStream(err)` embed it there).
fn codes(err: &(dyn std::error::Error + 'static)) -> (usize, u64) {
    if let Some(api) = api_error(err) {
        return (api.code(), api.error_code().0);
    }
    panic!("no JetStream API error in {err:?} ({err})");
}

fn payload_of(msg: &jetstream::Message) -> String {
    String::from_utf8_lossy(&msg.payload).into_owned()
}

// -------------------------------------------------------------------- streams

fn stream_create_info_update_delete(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;

        let mut config = stream_config("ORDERS", &["orders.>"]);
        config.max_messages = 1000;
        let created = create_stream(&js, config.clone()).await;
        let info = created.cached_info();
        assert_eq!(info.config.name, "ORDERS");
        assert_eq!(info.config.subjects, vec!["orders.>".to_string()]);
        assert_eq!(info.config.max_messages, 1000);
        assert_eq!(info.config.storage, StorageType::File);
        assert_eq!(info.config.discard, DiscardPolicy::Old);
        assert_eq!(info.state.messages, 0);
        assert_eq!(info.state.last_sequence, 0);
        // The server fills in defaults it was not given.
        assert_eq!(info.config.max_bytes, -1);
        assert_eq!(info.config.duplicate_window, Duration::from_secs(120));

        // Creating again with the identical config succeeds; a different one is refused.
        within("create again", js.create_stream(config.clone()))
            .await
            .expect("re-create with the same config");
        let mut other = config.clone();
        other.subjects = vec!["other.>".into()];
        let err = within("create different", js.create_stream(other))
            .await
            .expect_err("create with a different config must fail");
        match err.kind() {
            jetstream::context::CreateStreamErrorKind::JetStream(e) => {
                assert_eq!(e.error_code().0, 10058, "stream name already in use: {e}");
                assert_eq!(e.code(), 400);
            }
            other => panic!("unexpected error kind {other:?}"),
        }
        // Subjects overlapping another stream's are refused.
        let err = within(
            "create overlapping",
            js.create_stream(stream_config("OVERLAP", &["orders.new"])),
        )
        .await
        .expect_err("overlapping subjects must fail");
        match err.kind() {
            jetstream::context::CreateStreamErrorKind::JetStream(e) => {
                assert_eq!(e.error_code().0, 10065, "subjects overlap: {e}")
            }
            other => panic!("unexpected error kind {other:?}"),
        }

        publish(&js, "orders.1", "one").await;
        publish(&js, "orders.2", "two").await;
        let mut stream = within("get stream", js.get_stream("ORDERS"))
            .await
            .expect("get stream");
        let info = within("info", stream.info()).await.expect("stream info");
        assert_eq!(info.state.messages, 2);
        assert_eq!(info.state.first_sequence, 1);
        assert_eq!(info.state.last_sequence, 2);
        assert!(info.state.bytes > 6, "bytes {}", info.state.bytes);
        assert_eq!(info.state.consumer_count, 0);

        // Update: new limit and an extra subject; the messages stay.
        let mut updated = config.clone();
        updated.max_messages = 5;
        updated.subjects.push("returns.>".into());
        let info = within("update", js.update_stream(updated))
            .await
            .expect("update stream");
        assert_eq!(info.config.max_messages, 5);
        assert_eq!(
            info.config.subjects,
            vec!["orders.>".to_string(), "returns.>".to_string()]
        );
        assert_eq!(info.state.messages, 2);
        assert_eq!(publish(&js, "returns.1", "back").await, 3);

        // Updating a stream that does not exist fails with "stream not found".
        let err = within(
            "update missing",
            js.update_stream(stream_config("NOPE", &["nope"])),
        )
        .await
        .expect_err("update of a missing stream must fail");
        // async-nats maps err_code 10059 to its NotFound kind.
        assert_eq!(
            err.kind(),
            jetstream::context::CreateStreamErrorKind::NotFound,
            "{err}"
        );

        // Delete, then it is gone.
        assert!(
            within("delete", js.delete_stream("ORDERS"))
                .await
                .expect("delete stream")
                .success
        );
        let err = within("get deleted", js.get_stream("ORDERS"))
            .await
            .expect_err("deleted stream must not be found");
        match err.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(e) => {
                assert_eq!((e.code(), e.error_code().0), (404, 10059), "{e}")
            }
            other => panic!("unexpected error kind {other:?}"),
        }
        let Err(err) = within("delete again", js.delete_stream("ORDERS")).await else {
            panic!("deleting twice must fail");
        };
        assert!(err.to_string().contains("10059"), "{err}");
        // Its subjects no longer have a stream behind them.
        let err = within("publish", js.publish("orders.3", "x".into()))
            .await
            .expect("publish sent")
            .await
            .expect_err("publish to a deleted stream's subject");
        assert_eq!(err.kind(), PublishErrorKind::StreamNotFound);
    });
}

fn stream_names_and_list(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let names: Vec<String> = within("names", js.stream_names().collect::<Vec<_>>())
            .await
            .into_iter()
            .map(|n| n.expect("stream name"))
            .collect();
        assert!(names.is_empty(), "fresh server has streams {names:?}");

        for (name, subject) in [("ALPHA", "a.>"), ("BETA", "b.>"), ("GAMMA", "g")] {
            create_stream(&js, stream_config(name, &[subject])).await;
        }
        publish(&js, "b.x", "1").await;
        let mut names: Vec<String> = within("names", js.stream_names().collect::<Vec<_>>())
            .await
            .into_iter()
            .map(|n| n.expect("stream name"))
            .collect();
        names.sort();
        assert_eq!(names, ["ALPHA", "BETA", "GAMMA"]);

        let mut infos: Vec<stream::Info> = within("list", js.streams().collect::<Vec<_>>())
            .await
            .into_iter()
            .map(|i| i.expect("stream info"))
            .collect();
        infos.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        let summary: Vec<(String, Vec<String>, u64)> = infos
            .iter()
            .map(|i| {
                (
                    i.config.name.clone(),
                    i.config.subjects.clone(),
                    i.state.messages,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("ALPHA".to_string(), vec!["a.>".to_string()], 0),
                ("BETA".to_string(), vec!["b.>".to_string()], 1),
                ("GAMMA".to_string(), vec!["g".to_string()], 0),
            ]
        );

        // Which stream holds a subject.
        let name = within("by subject", js.stream_by_subject("b.y"))
            .await
            .expect("stream by subject");
        assert_eq!(name, "BETA");

        within("delete", js.delete_stream("BETA"))
            .await
            .expect("delete");
        let mut names: Vec<String> = within("names", js.stream_names().collect::<Vec<_>>())
            .await
            .into_iter()
            .map(|n| n.expect("stream name"))
            .collect();
        names.sort();
        assert_eq!(names, ["ALPHA", "GAMMA"]);
    });
}

// -------------------------------------------------------------------- publish

fn publish_acks_many_in_flight(kind: Js) {
    const IN_FLIGHT: usize = 1000;
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        create_stream(&js, stream_config("EVENTS", &["ev.*"])).await;

        let first = within("publish", js.publish("ev.a", "first".into()))
            .await
            .expect("send");
        let ack = within("ack", first).await.expect("ack");
        assert_eq!(ack.stream, "EVENTS");
        assert_eq!(ack.sequence, 1);
        assert!(!ack.duplicate);

        // Many publishes in flight before the first ack is awaited, over two subjects.
        let mut pending = Vec::with_capacity(IN_FLIGHT);
        for i in 0..IN_FLIGHT {
            let subject = if i % 2 == 0 { "ev.even" } else { "ev.odd" };
            let fut = within("publish", js.publish(subject, format!("m{i}").into()))
                .await
                .expect("send");
            pending.push(fut);
        }
        let mut seqs = Vec::with_capacity(IN_FLIGHT);
        for fut in pending {
            let ack = within("ack", fut).await.expect("ack");
            assert_eq!(ack.stream, "EVENTS");
            seqs.push(ack.sequence);
        }
        // One publisher's messages are stored in the order sent.
        let expected: Vec<u64> = (2..=IN_FLIGHT as u64 + 1).collect();
        assert_eq!(seqs, expected, "acked sequences are not 2..=N in order");

        let state = stream_state(&js, "EVENTS").await;
        assert_eq!(state.messages, IN_FLIGHT as u64 + 1);
        assert_eq!(state.last_sequence, IN_FLIGHT as u64 + 1);
        let stream = js.get_stream("EVENTS").await.expect("get stream");
        for i in [0usize, 1, 499, IN_FLIGHT - 1] {
            let msg = within("get", stream.get_raw_message(i as u64 + 2))
                .await
                .expect("get message");
            assert_eq!(msg.payload, format!("m{i}"));
            let subject = if i % 2 == 0 { "ev.even" } else { "ev.odd" };
            assert_eq!(msg.subject.as_str(), subject);
        }
    });
}

fn publish_without_stream_is_no_responders(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (client, js) = connect(&broker).await;
        let err = within("publish", js.publish("no.stream.here", "x".into()))
            .await
            .expect("send")
            .await
            .expect_err("a publish no stream takes must fail");
        assert_eq!(err.kind(), PublishErrorKind::StreamNotFound, "{err}");
        // A plain (non-JetStream) request to an API subject of a missing stream
        // gets a JSON error, not silence.
        let reply = within(
            "info request",
            client.request("$JS.API.STREAM.INFO.MISSING", "".into()),
        )
        .await
        .expect("stream info request");
        let body: serde_json::Value = serde_json::from_slice(&reply.payload).expect("json");
        assert_eq!(body["error"]["err_code"], 10059, "{body}");
        assert_eq!(body["error"]["code"], 404, "{body}");
        assert_eq!(
            body["type"],
            "io.nats.jetstream.api.v1.stream_info_response"
        );
    });
}

fn msg_id_dedupe(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        create_stream(&js, stream_config("DEDUPE", &["dd"])).await;
        let send = |id: &'static str, body: &'static str| {
            let js = js.clone();
            async move {
                let publish = PublishMessage::build().payload(body.into()).message_id(id);
                let fut = within("publish", js.send_publish("dd", publish))
                    .await
                    .expect("send");
                within("ack", fut).await.expect("ack")
            }
        };
        let a = send("id-a", "first").await;
        assert_eq!((a.sequence, a.duplicate), (1, false));
        let again = send("id-a", "second body, same id").await;
        assert_eq!(
            (again.sequence, again.duplicate),
            (1, true),
            "a repeated Nats-Msg-Id must be acked as a duplicate of seq 1"
        );
        let b = send("id-b", "third").await;
        assert_eq!((b.sequence, b.duplicate), (2, false));
        let plain = publish(&js, "dd", "no id").await;
        assert_eq!(plain, 3);
        let again = send("id-b", "fourth").await;
        assert_eq!((again.sequence, again.duplicate), (2, true));

        let state = stream_state(&js, "DEDUPE").await;
        assert_eq!(state.messages, 3);
        let stream = js.get_stream("DEDUPE").await.expect("stream");
        let msg = stream.get_raw_message(1).await.expect("get 1");
        assert_eq!(
            msg.payload, "first",
            "the duplicate must not replace the original"
        );
        assert_eq!(
            msg.headers
                .get("Nats-Msg-Id")
                .map(|v| v.as_str().to_string()),
            Some("id-a".to_string())
        );
    });
}

fn expected_headers(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        create_stream(&js, stream_config("EXP", &["exp.*"])).await;
        assert_eq!(publish(&js, "exp.a", "1").await, 1);
        assert_eq!(publish(&js, "exp.b", "2").await, 2);

        let try_send = |subject: &'static str, publish: PublishMessage| {
            let js = js.clone();
            async move {
                let fut = within("publish", js.send_publish(subject, publish))
                    .await
                    .expect("send");
                within("ack", fut).await
            }
        };
        let build = |body: &'static str| PublishMessage::build().payload(body.into());

        // Nats-Expected-Last-Sequence.
        let err = try_send("exp.a", build("x").expected_last_sequence(1))
            .await
            .expect_err("wrong expected last sequence");
        assert_eq!(err.kind(), PublishErrorKind::WrongLastSequence, "{err}");
        assert_eq!(codes(&err), (400, 10071), "{err}");
        let ok = try_send("exp.a", build("3").expected_last_sequence(2))
            .await
            .expect("right expected last sequence");
        assert_eq!(ok.sequence, 3);

        // Nats-Expected-Last-Subject-Sequence: exp.b was last written at 2.
        let err = try_send("exp.b", build("x").expected_last_subject_sequence(1))
            .await
            .expect_err("wrong expected last subject sequence");
        assert_eq!(codes(&err), (400, 10071), "{err}");
        let ok = try_send("exp.b", build("4").expected_last_subject_sequence(2))
            .await
            .expect("right expected last subject sequence");
        assert_eq!(ok.sequence, 4);

        // Nats-Expected-Last-Msg-Id.
        let ok = try_send("exp.a", build("5").message_id("m5"))
            .await
            .expect("publish with id");
        assert_eq!(ok.sequence, 5);
        let err = try_send("exp.a", build("x").expected_last_message_id("m4"))
            .await
            .expect_err("wrong expected last msg id");
        assert_eq!(err.kind(), PublishErrorKind::WrongLastMessageId, "{err}");
        assert_eq!(codes(&err), (400, 10070), "{err}");
        let ok = try_send("exp.a", build("6").expected_last_message_id("m5"))
            .await
            .expect("right expected last msg id");
        assert_eq!(ok.sequence, 6);

        // Nats-Expected-Stream.
        let err = try_send("exp.a", build("x").expected_stream("OTHER"))
            .await
            .expect_err("wrong expected stream");
        assert_eq!(err.kind(), PublishErrorKind::Other, "{err}");
        assert_eq!(codes(&err), (400, 10060), "{err}");
        let ok = try_send("exp.a", build("7").expected_stream("EXP"))
            .await
            .expect("right expected stream");
        assert_eq!(ok.sequence, 7);

        // Nothing refused was stored.
        let state = stream_state(&js, "EXP").await;
        assert_eq!((state.messages, state.last_sequence), (7, 7));
        let stream = js.get_stream("EXP").await.expect("stream");
        for seq in 1..=7u64 {
            let msg = stream.get_raw_message(seq).await.expect("get");
            assert_eq!(msg.payload, seq.to_string(), "seq {seq}");
        }
    });
}

// ---------------------------------------------------------- get, purge, delete

fn get_raw_messages(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let stream = create_stream(&js, stream_config("GET", &["get.>"])).await;
        publish(&js, "get.a", "a1").await;
        publish(&js, "get.b", "b1").await;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("X-Test", "yes");
        headers.append("X-Multi", "1");
        headers.append("X-Multi", "2");
        let ack = within(
            "publish",
            js.publish_with_headers("get.a", headers, "a2".into()),
        )
        .await
        .expect("send");
        assert_eq!(within("ack", ack).await.expect("ack").sequence, 3);
        publish(&js, "get.c.deep", "").await;

        let m = within("get 1", stream.get_raw_message(1))
            .await
            .expect("get 1");
        assert_eq!(
            (m.sequence, m.subject.as_str(), &m.payload[..]),
            (1, "get.a", &b"a1"[..])
        );
        let m = within("get 3", stream.get_raw_message(3))
            .await
            .expect("get 3");
        assert_eq!((m.sequence, &m.payload[..]), (3, &b"a2"[..]));
        assert_eq!(
            m.headers.get("X-Test").map(|v| v.as_str().to_string()),
            Some("yes".into())
        );
        // async-nats 0.51 keeps only the last value of a repeated header in
        // STREAM.MSG.GET replies (it parses them with insert); the stored message
        // has both, as a consumer delivery shows below.
        assert_eq!(
            m.headers
                .get_last("X-Multi")
                .map(|v| v.as_str().to_string()),
            Some("2".into())
        );
        let m = within("get 4", stream.get_raw_message(4))
            .await
            .expect("get 4");
        assert_eq!((m.subject.as_str(), m.payload.len()), ("get.c.deep", 0));
        // Stored time is real (after 2020) and not in the future.
        let now = async_nats::datetime::now();
        assert!(m.time <= now, "message time {} after now {now}", m.time);
        assert!(m.time.unix_timestamp() > 1_577_836_800, "time {}", m.time);

        let last = within("last a", stream.get_last_raw_message_by_subject("get.a"))
            .await
            .expect("last by subject");
        assert_eq!((last.sequence, &last.payload[..]), (3, &b"a2"[..]));
        let last = within(
            "last wildcard",
            stream.get_last_raw_message_by_subject("get.*"),
        )
        .await
        .expect("last by wildcard subject");
        assert_eq!(
            last.sequence, 3,
            "last of get.* (get.c.deep does not match)"
        );
        let next = within(
            "next b",
            stream.get_first_raw_message_by_subject("get.b", 1),
        )
        .await
        .expect("first get.b from 1");
        assert_eq!(next.sequence, 2);

        // Delivered by a consumer, the stored headers come back whole.
        let consumer = create_pull(
            &stream,
            consumer::pull::Config {
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: 3 },
                ..Default::default()
            },
        )
        .await;
        let got = pull_n(&consumer, 1).await;
        let headers = got[0].headers.as_ref().expect("headers delivered");
        let multi: Vec<String> = headers
            .get_all("X-Multi")
            .map(|v| v.as_str().to_string())
            .collect();
        assert_eq!(multi, ["1", "2"]);
        assert_eq!(
            headers.get("X-Test").map(|v| v.as_str().to_string()),
            Some("yes".into())
        );

        let err = within("get missing", stream.get_raw_message(99))
            .await
            .expect_err("no message 99");
        assert_eq!(
            err.kind(),
            stream::LastRawMessageErrorKind::NoMessageFound,
            "{err}"
        );
        let err = within(
            "last missing",
            stream.get_last_raw_message_by_subject("get.zzz"),
        )
        .await
        .expect_err("nothing on get.zzz");
        assert_eq!(
            err.kind(),
            stream::LastRawMessageErrorKind::NoMessageFound,
            "{err}"
        );
    });
}

fn purge_all_subject_and_up_to_sequence(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let stream = create_stream(&js, stream_config("PURGE", &["p.*"])).await;
        // 1..=10: odd sequences on p.a, even on p.b.
        for i in 1..=10u64 {
            let subject = if i % 2 == 1 { "p.a" } else { "p.b" };
            assert_eq!(publish(&js, subject, &i.to_string()).await, i);
        }

        let purged = within("purge subject", stream.purge().filter("p.a"))
            .await
            .expect("purge p.a");
        assert!(purged.success);
        assert_eq!(purged.purged, 5);
        let state = stream_state(&js, "PURGE").await;
        assert_eq!(state.messages, 5);
        assert_eq!((state.first_sequence, state.last_sequence), (2, 10));
        let err = stream.get_raw_message(3).await.expect_err("3 was purged");
        assert_eq!(err.kind(), stream::LastRawMessageErrorKind::NoMessageFound);
        assert_eq!(
            stream.get_raw_message(4).await.expect("4 kept").payload,
            "4"
        );

        // Up to (not including) sequence 7: removes 2, 4, 6.
        let purged = within("purge seq", stream.purge().sequence(7))
            .await
            .expect("purge up to 7");
        assert_eq!(purged.purged, 3);
        let state = stream_state(&js, "PURGE").await;
        assert_eq!((state.messages, state.last_sequence), (2, 10));
        // nats-server 2.9.10 reports the purge point (7) as first_seq although 7
        // was already gone; 8 would be the first message. The exact value is pinned
        // by the differential scripts; here either is accepted.
        assert!(
            (7..=8).contains(&state.first_sequence),
            "first_seq {}",
            state.first_sequence
        );
        assert_eq!(
            stream.get_raw_message(8).await.expect("8 kept").payload,
            "8"
        );
        assert!(stream.get_raw_message(6).await.is_err(), "6 was purged");

        let purged = within("purge all", stream.purge())
            .await
            .expect("purge all");
        assert_eq!(purged.purged, 2);
        let state = stream_state(&js, "PURGE").await;
        assert_eq!(state.messages, 0);
        assert_eq!(state.bytes, 0);
        assert_eq!(state.last_sequence, 10, "purge keeps the last sequence");
        assert_eq!(state.first_sequence, 11);

        // Sequences continue after a purge.
        assert_eq!(publish(&js, "p.a", "after").await, 11);
        let state = stream_state(&js, "PURGE").await;
        assert_eq!((state.messages, state.first_sequence), (1, 11));
    });
}

fn delete_message(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let stream = create_stream(&js, stream_config("DEL", &["del"])).await;
        for i in 1..=5u64 {
            publish(&js, "del", &format!("m{i}")).await;
        }
        assert!(within("delete 3", stream.delete_message(3))
            .await
            .expect("delete 3"));
        let err = stream.get_raw_message(3).await.expect_err("3 was deleted");
        assert_eq!(err.kind(), stream::LastRawMessageErrorKind::NoMessageFound);
        let state = stream_state(&js, "DEL").await;
        assert_eq!(state.messages, 4);
        assert_eq!((state.first_sequence, state.last_sequence), (1, 5));
        assert_eq!(state.deleted_count, Some(1));

        // Deleting it again, or a sequence never written, is an error.
        let err = within("delete 3 again", stream.delete_message(3))
            .await
            .expect_err("3 is already gone");
        match err.kind() {
            stream::DeleteMessageErrorKind::JetStream(e) => {
                assert_eq!((e.code(), e.error_code().0), (400, 10043), "{e}")
            }
            other => panic!("unexpected {other:?}"),
        }
        within("delete 99", stream.delete_message(99))
            .await
            .expect_err("99 never existed");

        // Deleting the first message moves first_sequence.
        assert!(stream.delete_message(1).await.expect("delete 1"));
        let state = stream_state(&js, "DEL").await;
        assert_eq!((state.messages, state.first_sequence), (3, 2));

        // A consumer skips deleted messages.
        let consumer = create_pull(&stream, pull_config(None)).await;
        let got = fetch(&consumer, 10).await;
        assert_eq!(stream_seqs(&got), [2, 4, 5]);
    });
}

// ------------------------------------------------------------- pull consumers

fn pull_durable_fetch_batch_messages(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let stream = create_stream(&js, stream_config("PULL", &["pull.>"])).await;
        for i in 1..=10u64 {
            publish(&js, &format!("pull.{}", i % 3), &format!("m{i}")).await;
        }
        let consumer = create_pull(&stream, pull_config(Some("worker"))).await;
        let info = consumer_info(&consumer).await;
        assert_eq!(info.name, "worker");
        assert_eq!(info.stream_name, "PULL");
        assert_eq!(info.config.ack_policy, AckPolicy::Explicit);
        assert_eq!(
            info.config.ack_wait,
            Duration::from_secs(30),
            "server default"
        );
        assert_eq!(info.num_pending, 10);
        assert_eq!(info.num_ack_pending, 0);

        // fetch: what is there now, up to max.
        let got = fetch(&consumer, 4).await;
        assert_eq!(
            summary(&got),
            (1..=4u64)
                .map(|i| (i, 1, format!("m{i}")))
                .collect::<Vec<_>>()
        );
        let meta = got[0].info().expect("info");
        assert_eq!((meta.stream, meta.consumer), ("PULL", "worker"));
        assert_eq!(meta.consumer_sequence, 1);
        assert_eq!(meta.pending, 9, "pending after the first delivery");
        assert_eq!(got[3].info().unwrap().pending, 6);

        // Consumer info after delivery, before acks.
        let info = consumer_info(&consumer).await;
        assert_eq!(info.delivered.stream_sequence, 4);
        assert_eq!(info.delivered.consumer_sequence, 4);
        assert_eq!(info.ack_floor.stream_sequence, 0);
        assert_eq!(info.num_ack_pending, 4);
        assert_eq!(info.num_pending, 6);

        ack_sync(&got[0]).await;
        ack_sync(&got[1]).await;
        ack_sync(&got[3]).await; // out of order: the floor stays at 2
        let info = consumer_info(&consumer).await;
        assert_eq!(info.ack_floor.stream_sequence, 2);
        assert_eq!(info.ack_floor.consumer_sequence, 2);
        assert_eq!(info.num_ack_pending, 1);
        ack_sync(&got[2]).await;
        let info = consumer_info(&consumer).await;
        assert_eq!(info.ack_floor.stream_sequence, 4);
        assert_eq!(info.num_ack_pending, 0);

        // batch: waits for the messages (they are there).
        let got = pull_n(&consumer, 3).await;
        assert_eq!(stream_seqs(&got), [5, 6, 7]);
        for m in &got {
            ack_sync(m).await;
        }

        // messages(): a continuous stream; it also gets messages published later.
        let mut messages = within("messages", consumer.messages())
            .await
            .expect("messages stream");
        for expected in 8..=10u64 {
            let m = within("next", messages.next())
                .await
                .expect("stream ended")
                .expect("message");
            assert_eq!(m.info().unwrap().stream_sequence, expected);
            ack_sync(&m).await;
        }
        assert_eq!(publish(&js, "pull.late", "late").await, 11);
        let m = within("late message", messages.next())
            .await
            .expect("stream ended")
            .expect("message");
        assert_eq!(
            (m.subject.as_str(), payload_of(&m)),
            ("pull.late", "late".into())
        );
        ack_sync(&m).await;
        drop(messages);

        let info = consumer_info(&consumer).await;
        assert_eq!(info.delivered.stream_sequence, 11);
        assert_eq!(info.ack_floor.stream_sequence, 11);
        assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));
        assert_eq!(info.num_redelivered, 0);

        // Nothing left: fetch returns empty.
        assert!(fetch(&consumer, 5).await.is_empty());

        // Look the consumer up by name, list it, delete it.
        let again: PullConsumer = within("get consumer", stream.get_consumer("worker"))
            .await
            .expect("get consumer");
        assert_eq!(again.cached_info().ack_floor.stream_sequence, 11);
        let names: Vec<String> = within(
            "consumer names",
            stream.consumer_names().collect::<Vec<_>>(),
        )
        .await
        .into_iter()
        .map(|n| n.expect("name"))
        .collect();
        assert_eq!(names, ["worker"]);
        let infos: Vec<consumer::Info> =
            within("consumers", stream.consumers().collect::<Vec<_>>())
                .await
                .into_iter()
                .map(|n| n.expect("info"))
                .collect();
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].name, "worker");
        assert_eq!(stream_state(&js, "PULL").await.consumer_count, 1);
        assert!(
            within("delete consumer", stream.delete_consumer("worker"))
                .await
                .expect("delete consumer")
                .success
        );
        let err = within("info deleted", stream.consumer_info("worker"))
            .await
            .expect_err("deleted consumer");
        assert_eq!(
            err.kind(),
            async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound
        );
        assert_eq!(stream_state(&js, "PULL").await.consumer_count, 0);
    });
}

fn pull_ephemeral(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let stream = create_stream(&js, stream_config("EPH", &["eph.*"])).await;
        for i in 1..=6u64 {
            let subject = if i <= 3 { "eph.x" } else { "eph.y" };
            publish(&js, subject, &format!("m{i}")).await;
        }
        let consumer = create_pull(
            &stream,
            consumer::pull::Config {
                filter_subject: "eph.y".into(),
                ..Default::default()
            },
        )
        .await;
        let info = consumer.cached_info().clone();
        assert!(
            !info.name.is_empty(),
            "the server names ephemeral consumers"
        );
        assert_eq!(info.config.durable_name, None);
        assert_eq!(info.num_pending, 3, "only eph.y matches the filter");
        let got = fetch(&consumer, 10).await;
        assert_eq!(stream_seqs(&got), [4, 5, 6]);
        for m in &got {
            assert_eq!(m.subject.as_str(), "eph.y");
            ack_sync(m).await;
        }
        let info = consumer_info(&consumer).await;
        assert_eq!(info.ack_floor.stream_sequence, 6);
        assert_eq!(info.num_pending, 0);

        // A second ephemeral gets a different name and its own position.
        let second = create_pull(&stream, pull_config(None)).await;
        assert_ne!(second.cached_info().name, info.name);
        assert_eq!(second.cached_info().num_pending, 6);
        let got = fetch(&second, 2).await;
        assert_eq!(stream_seqs(&got), [1, 2]);
    });
}

fn ack_wait_redelivery(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let stream = create_stream(&js, stream_config("REDLV", &["r"])).await;
        publish(&js, "r", "once").await;
        publish(&js, "r", "twice").await;
        let consumer = create_pull(
            &stream,
            consumer::pull::Config {
                durable_name: Some("slow".into()),
                ack_wait: Duration::from_millis(300),
                ..Default::default()
            },
        )
        .await;
        let first = fetch(&consumer, 2).await;
        assert_eq!(
            summary(&first),
            [(1, 1, "once".to_string()), (2, 1, "twice".to_string())]
        );
        ack_sync(&first[1]).await; // only the second is acked

        // The unacked one comes back after ack_wait, marked as a redelivery.
        let again = pull_n(&consumer, 1).await;
        assert_eq!(summary(&again), [(1, 2, "once".to_string())]);
        let meta = again[0].info().unwrap();
        assert_eq!(
            meta.consumer_sequence, 3,
            "a redelivery takes a new consumer sequence"
        );
        ack_sync(&again[0]).await;

        let info = consumer_info(&consumer).await;
        assert_eq!(info.num_ack_pending, 0);
        assert_eq!(info.ack_floor.stream_sequence, 2);

        // Acked messages never come back: several ack_waits later, nothing.
        let nothing = pull_for(&consumer, 5, Duration::from_millis(1500)).await;
        assert!(
            nothing.is_empty(),
            "redelivered after ack: {:?}",
            summary(&nothing)
        );
    });
}

fn max_deliver(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let stream = create_stream(&js, stream_config("MAXD", &["md"])).await;
        publish(&js, "md", "poison").await;
        let consumer = create_pull(
            &stream,
            consumer::pull::Config {
                durable_name: Some("md".into()),
                ack_wait: Duration::from_millis(300),
                max_deliver: 3,
                ..Default::default()
            },
        )
        .await;
        for delivery in 1..=3i64 {
            let got = pull_n(&consumer, 1).await;
            assert_eq!(summary(&got), [(1, delivery, "poison".to_string())]);
        }
        // Never a fourth time.
        let nothing = pull_for(&consumer, 1, Duration::from_millis(1500)).await;
        assert!(
            nothing.is_empty(),
            "delivered past max_deliver: {:?}",
            summary(&nothing)
        );
        let info = consumer_info(&consumer).await;
        assert_eq!(info.delivered.stream_sequence, 1);
        assert_eq!(info.num_pending, 0);

        // New messages still flow.
        publish(&js, "md", "fine").await;
        let got = pull_n(&consumer, 1).await;
        assert_eq!(summary(&got), [(2, 1, "fine".to_string())]);
    });
}

fn nak_term_and_in_progress(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let stream = create_stream(&js, stream_config("NAK", &["nak"])).await;
        for body in ["retry-me", "drop-me", "slow-one"] {
            publish(&js, "nak", body).await;
        }
        let consumer = create_pull(
            &stream,
            consumer::pull::Config {
                durable_name: Some("n".into()),
                ack_wait: Duration::from_secs(1),
                ..Default::default()
            },
        )
        .await;
        let got = fetch(&consumer, 3).await;
        assert_eq!(stream_seqs(&got), [1, 2, 3]);

        // +WPI on 3 every 100 ms for 2.5 s (2.5 ack_waits): no redelivery meanwhile.
        // -NAK on 1: redelivered at once. +TERM on 2: never again.
        within("nak", got[0].ack_with(AckKind::Nak(None)))
            .await
            .expect("nak");
        within("term", got[1].double_ack_with(AckKind::Term))
            .await
            .expect("term");
        let keep_alive = {
            let slow = got[2].clone();
            async move {
                let until = Instant::now() + Duration::from_millis(2500);
                while Instant::now() < until {
                    slow.ack_with(AckKind::Progress).await.expect("progress");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                slow
            }
        };
        let during = async {
            // Everything delivered while the keep-alive runs, each acked at once
            // (so the nak'd message, redelivered, is not redelivered again).
            let mut batch = within(
                "batch request",
                consumer
                    .batch()
                    .max_messages(10)
                    .expires(Duration::from_millis(2200))
                    .messages(),
            )
            .await
            .expect("batch");
            let mut seen = Vec::new();
            while let Some(m) = within("batch next", batch.next()).await {
                let m = m.expect("message");
                ack_sync(&m).await;
                seen.extend(summary(&[m]));
            }
            seen
        };
        let (slow, during) = tokio::join!(keep_alive, during);
        assert_eq!(
            during,
            [(1, 2, "retry-me".to_string())],
            "only the nak'd message may be redelivered (term'd and in-progress ones not)"
        );
        ack_sync(&slow).await;

        let info = consumer_info(&consumer).await;
        assert_eq!(info.num_ack_pending, 0);
        assert_eq!(info.ack_floor.stream_sequence, 3);
        let nothing = pull_for(&consumer, 10, Duration::from_millis(2500)).await;
        assert!(
            nothing.is_empty(),
            "unexpected deliveries {:?}",
            summary(&nothing)
        );

        // A nak with a delay: it comes back (when is not checked).
        publish(&js, "nak", "delayed").await;
        let got = pull_n(&consumer, 1).await;
        within(
            "nak delay",
            got[0].ack_with(AckKind::Nak(Some(Duration::from_millis(300)))),
        )
        .await
        .expect("nak with delay");
        let again = pull_n(&consumer, 1).await;
        assert_eq!(summary(&again), [(4, 2, "delayed".to_string())]);
        ack_sync(&again[0]).await;
    });
}

fn ack_policy_none(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let stream = create_stream(&js, stream_config("NOACK", &["na"])).await;
        for i in 1..=5 {
            publish(&js, "na", &i.to_string()).await;
        }
        let consumer = create_pull(
            &stream,
            consumer::pull::Config {
                durable_name: Some("fire".into()),
                ack_policy: AckPolicy::None,
                ack_wait: Duration::from_millis(300),
                ..Default::default()
            },
        )
        .await;
        let got = fetch(&consumer, 3).await;
        assert_eq!(stream_seqs(&got), [1, 2, 3]);
        let info = consumer_info(&consumer).await;
        assert_eq!(info.num_ack_pending, 0, "ack none: nothing awaits an ack");
        assert_eq!(
            info.ack_floor.stream_sequence, 3,
            "delivered counts as acked"
        );
        assert_eq!(info.num_pending, 2);
        // No redelivery, ever: the next pull (well after ack_wait) gets 4 and 5.
        tokio::time::sleep(Duration::from_millis(900)).await;
        let got = fetch(&consumer, 10).await;
        assert_eq!(
            summary(&got).iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(),
            [(4, 1), (5, 1)]
        );
    });
}

fn ack_policy_all_vs_explicit(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let stream = create_stream(&js, stream_config("ACKS", &["acks"])).await;
        for i in 1..=5 {
            publish(&js, "acks", &i.to_string()).await;
        }
        let make = |name: &str, policy: AckPolicy| consumer::pull::Config {
            durable_name: Some(name.into()),
            ack_policy: policy,
            ack_wait: Duration::from_millis(500),
            ..Default::default()
        };
        let all = create_pull(&stream, make("all", AckPolicy::All)).await;
        let explicit = create_pull(&stream, make("explicit", AckPolicy::Explicit)).await;

        let got_all = fetch(&all, 5).await;
        let got_explicit = fetch(&explicit, 5).await;
        assert_eq!(stream_seqs(&got_all), [1, 2, 3, 4, 5]);
        assert_eq!(stream_seqs(&got_explicit), [1, 2, 3, 4, 5]);
        // Ack only the third message on each.
        ack_sync(&got_all[2]).await;
        ack_sync(&got_explicit[2]).await;

        let info = consumer_info(&all).await;
        assert_eq!(
            info.ack_floor.stream_sequence, 3,
            "ack all: acking 3 acks 1..=3"
        );
        assert_eq!(info.num_ack_pending, 2);
        let info = consumer_info(&explicit).await;
        assert_eq!(
            info.ack_floor.stream_sequence, 0,
            "explicit: 1 and 2 still pending"
        );
        assert_eq!(info.num_ack_pending, 4);

        // After ack_wait, the unacked ones are redelivered.
        let again_all = pull_n(&all, 2).await;
        assert_eq!(
            summary(&again_all)
                .iter()
                .map(|s| (s.0, s.1))
                .collect::<Vec<_>>(),
            [(4, 2), (5, 2)]
        );
        let again_explicit = pull_n(&explicit, 4).await;
        assert_eq!(
            summary(&again_explicit)
                .iter()
                .map(|s| (s.0, s.1))
                .collect::<Vec<_>>(),
            [(1, 2), (2, 2), (4, 2), (5, 2)]
        );
        // Ack all: acking the last acks everything.
        ack_sync(&again_all[1]).await;
        let info = consumer_info(&all).await;
        assert_eq!(
            (info.ack_floor.stream_sequence, info.num_ack_pending),
            (5, 0)
        );
        for m in &again_explicit {
            ack_sync(m).await;
        }
        let info = consumer_info(&explicit).await;
        assert_eq!(
            (info.ack_floor.stream_sequence, info.num_ack_pending),
            (5, 0)
        );
    });
}

fn deliver_policies(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let stream = create_stream(&js, stream_config("POL", &["pol.*"])).await;
        publish(&js, "pol.a", "1").await;
        publish(&js, "pol.b", "2").await;
        // A gap so that by_start_time of message 3 cannot include message 2.
        tokio::time::sleep(Duration::from_millis(50)).await;
        publish(&js, "pol.a", "3").await;
        publish(&js, "pol.b", "4").await;
        publish(&js, "pol.c", "5").await;
        let time3 = stream.get_raw_message(3).await.expect("get 3").time;

        let seqs_for = |policy: DeliverPolicy, filter: &'static str| {
            let stream = stream.clone();
            async move {
                let consumer = create_pull(
                    &stream,
                    consumer::pull::Config {
                        deliver_policy: policy,
                        filter_subject: filter.into(),
                        ..Default::default()
                    },
                )
                .await;
                assert_eq!(consumer.cached_info().config.deliver_policy, policy);
                (consumer.clone(), stream_seqs(&fetch(&consumer, 100).await))
            }
        };
        assert_eq!(seqs_for(DeliverPolicy::All, "").await.1, [1, 2, 3, 4, 5]);
        assert_eq!(seqs_for(DeliverPolicy::All, "pol.b").await.1, [2, 4]);
        assert_eq!(seqs_for(DeliverPolicy::Last, "").await.1, [5]);
        assert_eq!(seqs_for(DeliverPolicy::Last, "pol.a").await.1, [3]);
        assert_eq!(
            seqs_for(DeliverPolicy::ByStartSequence { start_sequence: 3 }, "")
                .await
                .1,
            [3, 4, 5]
        );
        assert_eq!(
            seqs_for(
                DeliverPolicy::ByStartSequence { start_sequence: 3 },
                "pol.b"
            )
            .await
            .1,
            [4]
        );
        assert_eq!(
            seqs_for(DeliverPolicy::ByStartTime { start_time: time3 }, "")
                .await
                .1,
            [3, 4, 5]
        );
        assert_eq!(
            seqs_for(DeliverPolicy::LastPerSubject, "pol.*").await.1,
            [3, 4, 5]
        );
        // nats-server 2.9 requires a filter with last_per_subject (2.10 does not).
        let err = within(
            "last per subject without filter",
            stream.create_consumer(consumer::pull::Config {
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            }),
        )
        .await
        .expect_err("last_per_subject without a filter");
        match err.kind() {
            stream::ConsumerErrorKind::JetStream(e) => {
                assert_eq!((e.code(), e.error_code().0), (400, 10094), "{e}")
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            seqs_for(DeliverPolicy::LastPerSubject, "pol.a").await.1,
            [3]
        );

        // New: nothing of what is there, then what comes after it was created.
        let (new, seqs) = seqs_for(DeliverPolicy::New, "").await;
        assert!(seqs.is_empty(), "deliver new got old messages {seqs:?}");
        publish(&js, "pol.a", "6").await;
        assert_eq!(stream_seqs(&pull_n(&new, 1).await), [6]);

        // A start sequence past the end: nats-server 2.9.10 starts such a consumer
        // at the next message to come (last + 1 = 7), not at 8.
        let (future, seqs) =
            seqs_for(DeliverPolicy::ByStartSequence { start_sequence: 8 }, "").await;
        assert!(seqs.is_empty());
        publish(&js, "pol.b", "7").await;
        publish(&js, "pol.c", "8").await;
        assert_eq!(stream_seqs(&pull_n(&future, 2).await), [7, 8]);
    });
}

// ------------------------------------------------------------- push consumers

fn push_consumer(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (client, js) = connect(&broker).await;
        let stream = create_stream(&js, stream_config("PUSH", &["push.*"])).await;
        for i in 1..=5u64 {
            publish(&js, "push.a", &format!("m{i}")).await;
        }
        publish(&js, "push.b", "other").await;

        let deliver = client.new_inbox();
        let consumer: consumer::PushConsumer = within(
            "create push",
            stream.create_consumer(consumer::push::Config {
                durable_name: Some("pusher".into()),
                deliver_subject: deliver.clone(),
                filter_subject: "push.a".into(),
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            }),
        )
        .await
        .expect("create push consumer");
        let info = consumer.cached_info();
        assert_eq!(
            info.config.deliver_subject.as_deref(),
            Some(deliver.as_str())
        );
        assert_eq!(info.num_pending, 5);

        let mut messages = within("push messages", consumer.messages())
            .await
            .expect("subscribe");
        let mut got = Vec::new();
        for _ in 0..5 {
            let m = within("push next", messages.next())
                .await
                .expect("push stream ended")
                .expect("push message");
            got.push(m);
        }
        assert_eq!(
            summary(&got),
            (1..=5u64)
                .map(|i| (i, 1, format!("m{i}")))
                .collect::<Vec<_>>()
        );
        for m in &got[..3] {
            ack_sync(m).await;
        }
        let info = within("push info", stream.consumer_info("pusher"))
            .await
            .expect("info");
        assert_eq!(info.delivered.consumer_sequence, 5);
        // nats-server counts the filtered-out seq 6 as passed over (6); 5 is as right.
        assert!(
            (5..=6).contains(&info.delivered.stream_sequence),
            "delivered stream seq {}",
            info.delivered.stream_sequence
        );
        assert_eq!(info.ack_floor.stream_sequence, 3);
        assert_eq!(info.num_ack_pending, 2);
        assert!(info.push_bound, "a subscriber is on the deliver subject");

        // New messages are pushed as they arrive.
        publish(&js, "push.a", "m7").await;
        let m = within("push next", messages.next())
            .await
            .expect("push stream ended")
            .expect("push message");
        assert_eq!(
            summary(std::slice::from_ref(&m)),
            [(7, 1, "m7".to_string())]
        );
        ack_sync(&m).await;

        // An ephemeral push consumer with ack none.
        let deliver = client.new_inbox();
        let eph: consumer::PushConsumer = within(
            "create eph push",
            stream.create_consumer(consumer::push::Config {
                deliver_subject: deliver,
                ack_policy: AckPolicy::None,
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: 5 },
                ..Default::default()
            }),
        )
        .await
        .expect("create ephemeral push consumer");
        let mut messages = within("eph messages", eph.messages())
            .await
            .expect("subscribe");
        let mut seqs = Vec::new();
        for _ in 0..3 {
            let m = within("eph next", messages.next())
                .await
                .expect("ended")
                .expect("message");
            seqs.push(m.info().unwrap().stream_sequence);
        }
        assert_eq!(seqs, [5, 6, 7]);
    });
}

// --------------------------------------------------------------------- limits

fn limit_max_msgs(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let mut config = stream_config("LIM", &["lim"]);
        config.max_messages = 5;
        let stream = create_stream(&js, config).await;
        for i in 1..=8u64 {
            assert_eq!(publish(&js, "lim", &i.to_string()).await, i);
        }
        let state = stream_state(&js, "LIM").await;
        assert_eq!(state.messages, 5);
        assert_eq!((state.first_sequence, state.last_sequence), (4, 8));
        assert!(stream.get_raw_message(3).await.is_err(), "3 was discarded");
        assert_eq!(stream.get_raw_message(4).await.expect("4").payload, "4");
    });
}

fn limit_max_bytes(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let mut config = stream_config("BYTES", &["bytes"]);
        config.max_bytes = 2000;
        let stream = create_stream(&js, config).await;
        let body = "x".repeat(200);
        for i in 1..=30u64 {
            assert_eq!(publish(&js, "bytes", &format!("{i:03}{body}")).await, i);
        }
        let state = stream_state(&js, "BYTES").await;
        assert!(state.bytes <= 2000, "bytes {} over max_bytes", state.bytes);
        // 30 messages of 203+ bytes cannot all fit; at least one always stays.
        assert!(
            (1..10).contains(&state.messages),
            "messages {}",
            state.messages
        );
        assert_eq!(state.last_sequence, 30);
        // Discard old: what is kept is the newest, contiguous.
        assert_eq!(state.first_sequence, 30 - state.messages + 1);
        let first = stream
            .get_raw_message(state.first_sequence)
            .await
            .expect("first kept");
        assert!(first
            .payload
            .starts_with(format!("{:03}", state.first_sequence).as_bytes()));
    });
}

fn limit_max_age(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let mut config = stream_config("AGE", &["age"]);
        config.max_age = Duration::from_secs(1);
        let info = create_stream(&js, config).await.cached_info().clone();
        assert_eq!(info.config.max_age, Duration::from_secs(1));
        assert_eq!(
            info.config.duplicate_window,
            Duration::from_secs(1),
            "the duplicate window defaults to max_age when that is shorter"
        );
        for i in 1..=3 {
            publish(&js, "age", &i.to_string()).await;
        }
        assert_eq!(stream_state(&js, "AGE").await.messages, 3);
        // They expire: wait (bounded, generously) until the stream is empty.
        let started = Instant::now();
        loop {
            let state = stream_state(&js, "AGE").await;
            if state.messages == 0 {
                assert_eq!(state.first_sequence, 4);
                assert_eq!(state.last_sequence, 3);
                break;
            }
            assert!(
                started.elapsed() < WAIT,
                "messages never expired: {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The stream keeps working after expiry.
        assert_eq!(publish(&js, "age", "fresh").await, 4);
    });
}

fn limit_max_msgs_per_subject(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let mut config = stream_config("PERSUBJ", &["ps.*"]);
        config.max_messages_per_subject = 2;
        let stream = create_stream(&js, config).await;
        publish(&js, "ps.a", "a1").await; // 1
        publish(&js, "ps.a", "a2").await; // 2
        publish(&js, "ps.b", "b1").await; // 3
        publish(&js, "ps.a", "a3").await; // 4: evicts 1
        publish(&js, "ps.a", "a4").await; // 5: evicts 2
        publish(&js, "ps.b", "b2").await; // 6
        let state = stream_state(&js, "PERSUBJ").await;
        assert_eq!(state.messages, 4);
        assert_eq!((state.first_sequence, state.last_sequence), (3, 6));
        for gone in [1, 2] {
            assert!(stream.get_raw_message(gone).await.is_err(), "{gone} kept");
        }
        let consumer = create_pull(&stream, pull_config(None)).await;
        assert_eq!(
            summary(&fetch(&consumer, 10).await)
                .into_iter()
                .map(|s| (s.0, s.2))
                .collect::<Vec<_>>(),
            [
                (3, "b1".to_string()),
                (4, "a3".to_string()),
                (5, "a4".to_string()),
                (6, "b2".to_string())
            ]
        );
    });
}

fn limit_discard_new(kind: Js) {
    let broker = JsBroker::start(kind);
    block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let mut config = stream_config("FULL", &["full"]);
        config.max_messages = 3;
        config.discard = DiscardPolicy::New;
        let stream = create_stream(&js, config).await;
        assert_eq!(stream.cached_info().config.discard, DiscardPolicy::New);
        for i in 1..=3 {
            publish(&js, "full", &i.to_string()).await;
        }
        let err = within("publish", js.publish("full", "4".into()))
            .await
            .expect("send")
            .await
            .expect_err("a full discard-new stream refuses");
        assert_eq!(codes(&err), (503, 10077), "{err}");
        assert!(
            err.to_string().contains("maximum messages exceeded"),
            "{err}"
        );
        let state = stream_state(&js, "FULL").await;
        assert_eq!(
            (state.messages, state.first_sequence, state.last_sequence),
            (3, 1, 3)
        );
        // Room again after a delete.
        stream.delete_message(1).await.expect("delete 1");
        assert_eq!(publish(&js, "full", "4").await, 4);

        // max_bytes with discard new refuses too.
        let mut config = stream_config("FULLB", &["fullb"]);
        config.max_bytes = 300;
        config.discard = DiscardPolicy::New;
        create_stream(&js, config).await;
        let mut refused = None;
        for i in 1..=10u64 {
            let result = within("publish", js.publish("fullb", "y".repeat(100).into()))
                .await
                .expect("send")
                .await;
            match result {
                Ok(ack) => assert_eq!(ack.sequence, i),
                Err(err) => {
                    refused = Some((i, err));
                    break;
                }
            }
        }
        let (at, err) = refused.expect("300 bytes cannot take ten 100-byte messages");
        assert!(at >= 2, "refused already at message {at}");
        assert_eq!(codes(&err), (503, 10077), "{err}");
        assert!(err.to_string().contains("maximum bytes exceeded"), "{err}");
        assert_eq!(stream_state(&js, "FULLB").await.messages, at - 1);
    });
}

// ------------------------------------------------------------------- restart

fn restart_keeps_streams_messages_and_consumers(kind: Js) {
    let mut broker = JsBroker::start(kind);
    let (mut before, stored) = block_on(&broker, async {
        let (_client, js) = connect(&broker).await;
        let mut config = stream_config("KEEP", &["keep.*"]);
        config.max_messages_per_subject = 100;
        config.duplicate_window = Duration::from_secs(600);
        let stream = create_stream(&js, config).await;
        create_stream(&js, stream_config("EMPTY", &["empty"])).await;
        let mut stored = Vec::new();
        for i in 1..=50u64 {
            let subject = format!("keep.{}", i % 4);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("id-{i}").as_str());
            headers.insert("X-Index", i.to_string().as_str());
            let ack = within(
                "publish",
                js.publish_with_headers(subject.clone(), headers, format!("body-{i}").into()),
            )
            .await
            .expect("send");
            assert_eq!(within("ack", ack).await.expect("ack").sequence, i);
            stored.push((i, subject, format!("body-{i}")));
        }
        assert!(stream.delete_message(10).await.expect("delete 10"));
        stored.retain(|(seq, _, _)| *seq != 10);

        // A durable pull consumer: 20 delivered, the first 15 acked.
        let consumer = create_pull(
            &stream,
            consumer::pull::Config {
                durable_name: Some("resume".into()),
                ack_wait: Duration::from_secs(1),
                ..Default::default()
            },
        )
        .await;
        let got = fetch(&consumer, 20).await;
        let expected: Vec<u64> = (1..=21).filter(|s| *s != 10).collect();
        assert_eq!(stream_seqs(&got), expected);
        for m in &got[..15] {
            ack_sync(m).await;
        }
        let info = consumer_info(&consumer).await;
        assert_eq!(
            info.ack_floor.stream_sequence, 16,
            "acked 1..=16 (10 is deleted)"
        );
        // A durable push consumer with nothing delivered yet.
        within(
            "create push",
            stream.create_consumer(consumer::push::Config {
                durable_name: Some("pushed".into()),
                deliver_subject: "deliver.pushed".into(),
                filter_subject: "keep.1".into(),
                ..Default::default()
            }),
        )
        .await
        .expect("create push consumer");
        let before = within("info", js.get_stream("KEEP"))
            .await
            .expect("stream")
            .cached_info()
            .clone();
        (before, stored)
    });

    // Twice: a restart must not depend on state only the first run wrote.
    for round in 1..=2u64 {
        broker.restart();
        before = block_on(&broker, async {
            let (client, js) = connect(&broker).await;
            let mut names: Vec<String> = within("names", js.stream_names().collect::<Vec<_>>())
                .await
                .into_iter()
                .map(|n| n.expect("name"))
                .collect();
            names.sort();
            assert_eq!(names, ["EMPTY", "KEEP"], "round {round}");
            let stream = within("get", js.get_stream("KEEP")).await.expect("stream");
            let after = stream.cached_info();
            assert_eq!(after.config, before.config, "config survives the restart");
            assert_eq!(after.state.messages, before.state.messages);
            assert_eq!(after.state.bytes, before.state.bytes);
            assert_eq!(after.state.first_sequence, before.state.first_sequence);
            assert_eq!(after.state.last_sequence, before.state.last_sequence);
            assert_eq!(after.state.consumer_count, 2);
            assert_eq!(
                after.state.first_timestamp, before.state.first_timestamp,
                "stored timestamps survive"
            );
            if round == 1 {
                for (seq, subject, body) in &stored {
                    let m = stream.get_raw_message(*seq).await.expect("stored message");
                    assert_eq!(
                        (m.subject.as_str(), &m.payload[..]),
                        (subject.as_str(), body.as_bytes())
                    );
                    assert_eq!(
                        m.headers.get("X-Index").map(|v| v.as_str().to_string()),
                        Some(seq.to_string())
                    );
                }
                assert!(
                    stream.get_raw_message(10).await.is_err(),
                    "10 stays deleted"
                );
            }

            let consumer: PullConsumer = within("get consumer", stream.get_consumer("resume"))
                .await
                .expect("durable consumer survives");
            let info = consumer.cached_info();
            assert_eq!(info.config.ack_wait, Duration::from_secs(1));
            if round == 1 {
                assert_eq!(info.ack_floor.stream_sequence, 16);
                assert_eq!(info.delivered.stream_sequence, 21);
                assert_eq!(info.num_ack_pending, 5);
                // 17..=21 were delivered but not acked: they come again (as
                // redeliveries, when their ack_wait is up); 22..=50 come new. Pull
                // and ack until every one of them was seen.
                let mut first_delivery = std::collections::BTreeMap::new();
                let started = Instant::now();
                while first_delivery.len() < 34 {
                    assert!(
                        started.elapsed() < WAIT,
                        "after the restart, only got {:?}",
                        first_delivery
                    );
                    for m in pull_for(&consumer, 50, Duration::from_millis(500)).await {
                        let (seq, delivered, _) = summary(std::slice::from_ref(&m))[0].clone();
                        ack_sync(&m).await;
                        first_delivery.entry(seq).or_insert(delivered);
                    }
                }
                let expected: Vec<(u64, i64)> = (17..=50)
                    .map(|seq| (seq, if seq <= 21 { 2 } else { 1 }))
                    .collect();
                assert_eq!(
                    first_delivery.into_iter().collect::<Vec<_>>(),
                    expected,
                    "(stream seq, delivery count) after the restart"
                );
                let info = consumer_info(&consumer).await;
                assert_eq!(
                    (info.ack_floor.stream_sequence, info.num_ack_pending),
                    (50, 0)
                );
            } else {
                assert_eq!(info.ack_floor.stream_sequence, 50, "acks survive");
                assert_eq!(info.num_ack_pending, 0);
                let got = pull_n(&consumer, 1).await;
                assert_eq!(summary(&got)[0].0, 51, "resumes after the last ack");
            }
            let push = within("push info", stream.consumer_info("pushed"))
                .await
                .expect("push consumer survives");
            assert_eq!(
                push.config.deliver_subject.as_deref(),
                Some("deliver.pushed")
            );
            assert_eq!(push.config.filter_subject, "keep.1");

            // Dedupe state survives: a known Msg-Id is still a duplicate.
            let dup = within(
                "dup publish",
                js.send_publish(
                    "keep.1",
                    PublishMessage::build()
                        .payload("again".into())
                        .message_id("id-1"),
                ),
            )
            .await
            .expect("send");
            let dup = within("dup ack", dup).await.expect("ack");
            assert!(dup.duplicate, "round {round}: Msg-Id id-1 forgotten");
            assert_eq!(dup.sequence, 1);

            // And sequences continue.
            let seq = publish(&js, "keep.9", &format!("after restart {round}")).await;
            assert_eq!(seq, 50 + round);
            drop(client);
            // What the next round must find.
            js.get_stream("KEEP")
                .await
                .expect("stream")
                .cached_info()
                .clone()
        });
    }
}
