//! Monitoring over HTTP (`--http`): perch's `/varz`, `/connz`, `/subsz`,
//! `/healthz` and `/jsz` against nats-server's own endpoints for the same
//! traffic (same field names and JSON types where both have a field, same
//! counts), `/connz` paging and sorting, `/metrics` through `promtool check
//! metrics`, and a real Prometheus scraping perch.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{free_port, Raw, Server, TempDir};

/// How long a counter may take to show up: shards publish their counters
/// every housekeeping tick (100 ms).
const SETTLE_MS_MAX: u64 = 3_000;

/// One HTTP/1.0 `GET` (so no chunked encoding: the body ends where the
/// connection does): (status, content type, body). A tiny client on purpose:
/// the test must not share an HTTP stack with the server.
/// `perch_connection_moves_total` from the broker's /metrics.
pub(crate) fn connection_moves(port: u16) -> u64 {
    let (status, _, body) = http_get(port, "/metrics");
    assert_eq!(status, 200, "/metrics: {body}");
    body.lines()
        .find_map(|l| l.strip_prefix("perch_connection_moves_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no perch_connection_moves_total in:\n{body}"))
}

pub(crate) fn http_get(port: u16, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to monitoring port");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )
    .expect("send request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read response");
    let response = String::from_utf8(response).expect("UTF-8 response");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers end");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

fn get_json(port: u16, path: &str) -> Value {
    let (status, content_type, body) = http_get(port, path);
    assert_eq!(status, 200, "GET {path}: {body}");
    assert!(
        content_type.starts_with("application/json"),
        "GET {path}: content type {content_type}"
    );
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// perch with monitoring on a free port: (server, http port).
fn perch_with_http(extra: &[&str]) -> (Server, u16) {
    let http = free_port();
    let addr = format!("127.0.0.1:{http}");
    let mut args = vec!["--http", addr.as_str()];
    args.extend_from_slice(extra);
    (Server::perch(&args), http)
}

fn nats_server_with_http(extra_config: &str) -> (Server, u16) {
    let http = free_port();
    let server = Server::nats_server(&format!("http: {http}\n{extra_config}"));
    (server, http)
}

/// The JSON kind of a value, with integers told from fractions: a Go
/// integer field cannot decode `2.5`, so perch must send an integer wherever
/// nats-server does, except in fields that are floats in nats-server (which
/// Go writes without a fraction when it is zero).
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// nats-server's float64 fields among those perch serves.
const FLOAT_FIELDS: [&str; 4] = ["auth_timeout", "cpu", "cache_hit_rate", "avg_fanout"];

/// Every field of `perch` that `reference` also has must have the same JSON
/// kind, recursively (arrays compare their first elements). Returns how many
/// fields were compared, so a caller can tell the check did something.
fn assert_same_types(path: &str, perch: &Value, reference: &Value) -> usize {
    let (perch_kind, reference_kind) = (kind(perch), kind(reference));
    let field = path.rsplit('.').next().unwrap_or(path);
    let numbers_agree = FLOAT_FIELDS.contains(&field)
        && matches!(perch_kind, "float" | "integer")
        && matches!(reference_kind, "float" | "integer");
    assert!(
        perch_kind == reference_kind || numbers_agree,
        "{path}: perch sends {perch_kind} ({perch}), nats-server {reference_kind} ({reference})"
    );
    let mut compared = 1;
    match (perch, reference) {
        (Value::Object(p), Value::Object(r)) => {
            for (key, value) in p {
                if let Some(other) = r.get(key) {
                    compared += assert_same_types(&format!("{path}.{key}"), value, other);
                }
            }
        }
        (Value::Array(p), Value::Array(r)) => {
            if let (Some(a), Some(b)) = (p.first(), r.first()) {
                compared += assert_same_types(&format!("{path}[0]"), a, b);
            }
        }
        _ => {}
    }
    compared
}

fn u64_at(value: &Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not an unsigned integer in {value}"))
}

/// The same traffic for each server: three named clients with 1, 2 and 3
/// subscriptions (one in a queue group), the first publishing five 3-byte
/// messages to `s0`, which all three receive (the queue subscription is on
/// `s2`, which gets nothing).
fn drive_traffic(server: &Server) -> Vec<Raw> {
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut raw = Raw::connect(server);
        let connect = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"name\":\"client-{i}\",\
             \"lang\":\"raw\",\"version\":\"0.{i}\"}}\r\n"
        );
        raw.send(connect.as_bytes());
        for j in 0..=i {
            let sub = if j == 2 {
                format!("SUB s{j} workers {j}\r\n")
            } else {
                format!("SUB s{j} {j}\r\n")
            };
            raw.send(sub.as_bytes());
        }
        raw.send(b"PING\r\n");
        assert_eq!(raw.read_line(), "PONG");
        clients.push(raw);
    }
    clients[0].send(&b"PUB s0 3\r\nabc\r\n".repeat(5));
    // The publisher's PONG means every subscriber was handed the messages;
    // each subscriber's own PONG then comes after them.
    for (i, client) in clients.iter_mut().enumerate() {
        client.send(b"PING\r\n");
        let mut messages = 0;
        loop {
            match client.read_line() {
                line if line == "PONG" => break,
                line if line.starts_with("MSG s0 0 3") => messages += 1,
                line => assert_eq!(line, "abc", "client-{i}"),
            }
        }
        assert_eq!(messages, 5, "client-{i} got every message");
    }
    clients
}

/// Polls perch's `/varz` until the traffic's counters are published.
fn settled_varz(http: u16, in_msgs: u64, out_msgs: u64, subscriptions: u64) -> Value {
    let deadline = Instant::now() + Duration::from_millis(SETTLE_MS_MAX);
    loop {
        let varz = get_json(http, "/varz");
        let counts = (
            u64_at(&varz, "in_msgs"),
            u64_at(&varz, "out_msgs"),
            u64_at(&varz, "subscriptions"),
        );
        if counts == (in_msgs, out_msgs, subscriptions) {
            return varz;
        }
        assert!(
            Instant::now() < deadline,
            "perch /varz counters {counts:?}, want {:?}: {varz}",
            (in_msgs, out_msgs, subscriptions)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Each client's row of `/connz?subs=1`, by name: (in_msgs, out_msgs,
/// in_bytes, out_bytes, subscriptions, lang, version, sorted subjects).
fn connz_rows(connz: &Value) -> Vec<(String, Vec<Value>)> {
    let mut rows: Vec<(String, Vec<Value>)> = connz["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .map(|c| {
            let mut subjects: Vec<String> = c["subscriptions_list"]
                .as_array()
                .map(|l| l.iter().map(|s| s.to_string()).collect())
                .unwrap_or_default();
            subjects.sort();
            let fields = [
                "in_msgs",
                "out_msgs",
                "in_bytes",
                "out_bytes",
                "subscriptions",
                "lang",
                "version",
            ]
            .iter()
            .map(|k| c[*k].clone())
            .chain([Value::from(subjects)])
            .collect();
            (c["name"].as_str().unwrap_or("").to_owned(), fields)
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

/// `/subsz?subs=1`'s client subscriptions (nats-server also lists its
/// internal `$SYS` ones): (subject, qgroup, sid, msgs), sorted.
fn client_subs(subsz: &Value) -> Vec<(String, String, String, u64)> {
    let mut subs: Vec<_> = subsz["subscriptions_list"]
        .as_array()
        .expect("subscriptions_list")
        .iter()
        .filter(|s| s["account"] == "$G" && !s["subject"].as_str().unwrap_or("$").starts_with('$'))
        .map(|s| {
            (
                s["subject"].as_str().unwrap_or("").to_owned(),
                s["qgroup"].as_str().unwrap_or("").to_owned(),
                s["sid"].as_str().unwrap_or("").to_owned(),
                s["msgs"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    subs.sort();
    subs
}

#[test]
fn endpoints_match_nats_server_for_the_same_traffic() {
    let (reference, reference_http) = nats_server_with_http("");
    // nats-server counts its own system-account subscriptions too.
    let baseline_subs = u64_at(&get_json(reference_http, "/varz"), "subscriptions");
    let (perch, perch_http) = perch_with_http(&[]);
    let _reference_clients = drive_traffic(&reference);
    let _perch_clients = drive_traffic(&perch);
    let (in_msgs, out_msgs, subscriptions) = (5, 15, 6);

    let perch_varz = settled_varz(perch_http, in_msgs, out_msgs, subscriptions);
    let reference_varz = get_json(reference_http, "/varz");
    assert!(assert_same_types("varz", &perch_varz, &reference_varz) > 40);
    for key in [
        "connections",
        "total_connections",
        "in_msgs",
        "out_msgs",
        "in_bytes",
        "out_bytes",
        "slow_consumers",
        "max_payload",
        "max_pending",
        "max_control_line",
        "max_connections",
        "ping_interval",
        "ping_max",
        "routes",
    ] {
        assert_eq!(perch_varz[key], reference_varz[key], "/varz {key}");
    }
    assert_eq!(
        u64_at(&perch_varz, "subscriptions"),
        u64_at(&reference_varz, "subscriptions") - baseline_subs
    );
    assert_eq!(u64_at(&perch_varz, "http_port"), u64::from(perch_http));

    let perch_connz = get_json(perch_http, "/connz?subs=1");
    let reference_connz = get_json(reference_http, "/connz?subs=1");
    assert!(assert_same_types("connz", &perch_connz, &reference_connz) > 20);
    for key in ["num_connections", "total", "offset", "limit"] {
        assert_eq!(perch_connz[key], reference_connz[key], "/connz {key}");
    }
    assert_eq!(connz_rows(&perch_connz), connz_rows(&reference_connz));
    assert_eq!(connz_rows(&perch_connz).len(), 3);

    let perch_detail = get_json(perch_http, "/connz?subs=detail");
    let reference_detail = get_json(reference_http, "/connz?subs=detail");
    assert!(assert_same_types("connz-detail", &perch_detail, &reference_detail) > 20);

    let perch_subsz = get_json(perch_http, "/subsz");
    let reference_subsz = get_json(reference_http, "/subsz");
    assert!(assert_same_types("subsz", &perch_subsz, &reference_subsz) >= 8);
    assert_eq!(u64_at(&perch_subsz, "num_subscriptions"), subscriptions);
    assert_eq!(
        u64_at(&reference_subsz, "num_subscriptions") - baseline_subs,
        subscriptions
    );
    let perch_list = get_json(perch_http, "/subsz?subs=1");
    let reference_list = get_json(reference_http, "/subsz?subs=1");
    assert!(assert_same_types("subsz-list", &perch_list, &reference_list) > 10);
    assert_eq!(client_subs(&perch_list), client_subs(&reference_list));
    assert_eq!(client_subs(&perch_list).len(), 6);
    assert_eq!(
        client_subs(&get_json(perch_http, "/subsz?subs=1&test=s0")),
        client_subs(&get_json(reference_http, "/subsz?subs=1&test=s0"))
    );

    for path in [
        "/healthz",
        "/healthz?js-enabled-only=true",
        "/healthz?js-server-only=true",
    ] {
        let perch_health = get_json(perch_http, path);
        assert_eq!(perch_health, get_json(reference_http, path), "{path}");
        assert_eq!(perch_health, serde_json::json!({"status": "ok"}));
    }

    // No routes, gateways or leaf nodes: the same answers but for id and time.
    for path in ["/routez", "/gatewayz", "/leafz"] {
        let mut perch_answer = get_json(perch_http, path);
        let mut reference_answer = get_json(reference_http, path);
        assert!(assert_same_types(path, &perch_answer, &reference_answer) >= 4);
        for answer in [&mut perch_answer, &mut reference_answer] {
            let object = answer.as_object_mut().expect("object");
            object.remove("server_id");
            object.remove("now");
        }
        assert_eq!(perch_answer, reference_answer, "{path}");
    }

    let perch_jsz = get_json(perch_http, "/jsz");
    let reference_jsz = get_json(reference_http, "/jsz");
    assert!(assert_same_types("jsz", &perch_jsz, &reference_jsz) > 15);
    for key in ["disabled", "streams", "consumers", "messages", "bytes"] {
        assert_eq!(perch_jsz[key], reference_jsz[key], "/jsz {key}");
    }
    assert_eq!(perch_jsz["disabled"], true);
    assert_eq!(perch_varz["jetstream"], serde_json::json!({}));
    assert_eq!(reference_varz["jetstream"], serde_json::json!({}));
}

/// With streams on both sides: `/jsz` and `/varz`'s `jetstream` have the same
/// shape, and the stream, consumer and message counts agree.
#[test]
fn jsz_matches_nats_server_with_a_stream() {
    let reference_store = TempDir::new("monitoring-js-ref");
    let perch_store = TempDir::new("monitoring-js-perch");
    let reference_http = free_port();
    let log = reference_store.path.join("nats-server.log");
    let reference_dir = reference_store.path.join("store");
    let reference =
        Server::jetstream_reference(&reference_dir, &format!("http: {reference_http}\n"), &log);
    let store = perch_store.path.to_str().expect("UTF-8 path");
    let (perch, perch_http) = perch_with_http(&["--store-dir", store]);
    for server in [&reference, &perch] {
        let mut raw = Raw::connect(server);
        raw.send(b"CONNECT {\"verbose\":false}\r\nSUB _INBOX.m 1\r\n");
        let create = br#"{"name":"SENSORS","subjects":["sensors.>"]}"#;
        raw.send(
            format!(
                "PUB $JS.API.STREAM.CREATE.SENSORS _INBOX.m {}\r\n",
                create.len()
            )
            .as_bytes(),
        );
        raw.send(create);
        raw.send(b"\r\n");
        assert!(raw.read_line().starts_with("MSG _INBOX.m 1 "));
        let reply = raw.read_line();
        assert!(
            reply.contains("stream_create_response") && !reply.contains("error"),
            "{reply}"
        );
        for i in 0..3 {
            raw.send(format!("PUB sensors.t{i} _INBOX.m 2\r\n2{i}\r\n").as_bytes());
            assert!(raw.read_line().starts_with("MSG _INBOX.m 1 "));
            let ack = raw.read_line();
            assert!(ack.contains("\"seq\":"), "{ack}");
        }
    }
    let perch_jsz = get_json(perch_http, "/jsz");
    let reference_jsz = get_json(reference_http, "/jsz");
    assert!(assert_same_types("jsz", &perch_jsz, &reference_jsz) > 15);
    for key in ["streams", "consumers", "messages", "accounts"] {
        assert_eq!(perch_jsz[key], reference_jsz[key], "/jsz {key}");
    }
    assert_eq!(u64_at(&perch_jsz, "messages"), 3);
    assert!(perch_jsz.get("disabled").is_none(), "{perch_jsz}");
    assert!(u64_at(&perch_jsz, "bytes") > 0);
    assert!(u64_at(&perch_jsz["api"], "total") >= 1);
    assert_eq!(perch_jsz["config"]["store_dir"], store);
    let perch_varz = get_json(perch_http, "/varz");
    let reference_varz = get_json(reference_http, "/varz");
    assert!(
        assert_same_types(
            "varz.jetstream",
            &perch_varz["jetstream"],
            &reference_varz["jetstream"]
        ) > 10
    );
    let perch_health = get_json(perch_http, "/healthz?js-enabled-only=true");
    assert_eq!(
        perch_health,
        get_json(reference_http, "/healthz?js-enabled-only=true")
    );
}

#[test]
fn connz_sorts_pages_and_refuses_bad_queries_like_nats_server() {
    let (reference, reference_http) = nats_server_with_http("");
    let (perch, perch_http) = perch_with_http(&[]);
    let _reference_clients = drive_traffic(&reference);
    let _perch_clients = drive_traffic(&perch);
    settled_varz(perch_http, 5, 15, 6);
    let names = |port: u16, path: &str| -> Vec<String> {
        get_json(port, path)["connections"]
            .as_array()
            .expect("connections")
            .iter()
            .map(|c| c["name"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    let cases: [(&str, &[&str]); 7] = [
        ("/connz", &["client-0", "client-1", "client-2"]),
        ("/connz?sort=subs", &["client-2", "client-1", "client-0"]),
        ("/connz?sort=msgs_from&limit=1", &["client-0"]),
        ("/connz?sort=start&offset=1", &["client-1", "client-2"]),
        ("/connz?sort=uptime", &["client-2", "client-1", "client-0"]),
        ("/connz?limit=1&offset=2", &["client-2"]),
        ("/connz?offset=3", &[]),
    ];
    for (path, want) in cases {
        assert_eq!(names(reference_http, path), want, "nats-server {path}");
        assert_eq!(names(perch_http, path), want, "perch {path}");
    }
    let paged = get_json(perch_http, "/connz?limit=1&offset=1");
    assert_eq!(
        (u64_at(&paged, "num_connections"), u64_at(&paged, "total")),
        (1, 3)
    );
    assert_eq!((u64_at(&paged, "limit"), u64_at(&paged, "offset")), (1, 1));

    for path in [
        "/connz?sort=bogus",
        "/connz?limit=abc",
        "/connz?offset=1x",
        "/connz?subs=maybe",
        "/connz?sort=stop",
        "/subsz?limit=x",
        "/subsz?subs=1&test=a.*",
        "/healthz?js-enabled-only=abc",
    ] {
        let (perch_status, _, perch_body) = http_get(perch_http, path);
        let (reference_status, _, reference_body) = http_get(reference_http, path);
        assert_eq!(perch_status, 400, "perch {path}: {perch_body}");
        assert_eq!(
            reference_status, 400,
            "nats-server {path}: {reference_body}"
        );
        assert_eq!(perch_body.trim(), reference_body.trim(), "{path}");
    }
    let (status, _, body) = http_get(perch_http, "/connz?sort=idle");
    assert_eq!(status, 400);
    assert!(body.contains("not supported by perch"), "{body}");
    assert_eq!(http_get(perch_http, "/nope").0, 404);
}

/// The value of the sample `name` (with exactly `labels`, e.g.
/// `{stream="S"}`, or "" for none) in an exposition.
fn sample(exposition: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{labels} ");
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
}

fn promtool_check(exposition: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is not installed: run `bash tests/run.sh`, which installs it");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("promtool");
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "promtool check metrics: {}{}\n{exposition}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn metrics_pass_promtool_and_count_the_traffic() {
    let store = TempDir::new("monitoring-metrics");
    let store_dir = store.path.to_str().expect("UTF-8 path");
    let device_port = free_port();
    let device_addr = format!("127.0.0.1:{device_port}");
    let (perch, http) = perch_with_http(&["--store-dir", store_dir, "--device-udp", &device_addr]);
    let _clients = drive_traffic(&perch);
    let mut raw = Raw::connect(&perch);
    raw.send(b"CONNECT {\"verbose\":false}\r\nSUB _INBOX.m 1\r\n");
    let create = br#"{"name":"S","subjects":["s.>"]}"#;
    raw.send(format!("PUB $JS.API.STREAM.CREATE.S _INBOX.m {}\r\n", create.len()).as_bytes());
    raw.send(create);
    raw.send(b"\r\n");
    assert!(raw.read_line().starts_with("MSG _INBOX.m 1 "));
    raw.read_line();
    for i in 0..4 {
        raw.send(format!("PUB s.{i} _INBOX.m 5\r\nhello\r\n").as_bytes());
        assert!(raw.read_line().starts_with("MSG _INBOX.m 1 "));
        assert!(raw.read_line().contains("\"seq\":"));
    }
    // Published counters settle within a housekeeping tick or two.
    settled_varz(http, 5 + 4 + 1, 15 + 4 + 1, 6 + 1);

    let (status, content_type, exposition) = http_get(http, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    promtool_check(&exposition);
    assert_eq!(sample(&exposition, "perch_connections", ""), Some(4.0));
    assert_eq!(sample(&exposition, "perch_subscriptions", ""), Some(7.0));
    let total = |name: &str| -> f64 {
        (0..2)
            .map(|s| sample(&exposition, name, &format!("{{shard=\"{s}\"}}")).expect(name))
            .sum()
    };
    assert_eq!(total("perch_in_messages_total"), 10.0);
    assert_eq!(
        total("perch_in_bytes_total"),
        15.0 + 20.0 + create.len() as f64
    );
    assert_eq!(total("perch_slow_consumers_total"), 0.0);
    assert_eq!(
        sample(&exposition, "perch_stream_messages", "{stream=\"S\"}"),
        Some(4.0)
    );
    assert!(sample(&exposition, "perch_stream_bytes", "{stream=\"S\"}").is_some_and(|b| b > 20.0));
    // Four acknowledged publishes in `always` durability: at least one fdatasync each.
    assert!(
        sample(&exposition, "perch_store_fsync_duration_seconds_count", "")
            .is_some_and(|n| n >= 4.0),
        "{exposition}"
    );
    assert_eq!(
        sample(
            &exposition,
            "perch_store_fsync_duration_seconds_bucket",
            "{le=\"+Inf\"}"
        ),
        sample(&exposition, "perch_store_fsync_duration_seconds_count", "")
    );
    assert_eq!(total("perch_shard_responding"), 2.0);
    assert_eq!(total("perch_device_sessions"), 0.0);
}

/// A real Prometheus (Debian's) scrapes perch's `/metrics` every second; its
/// query API must report the target up and perch's numbers.
#[test]
fn prometheus_scrapes_perch() {
    let (perch, http) = perch_with_http(&[]);
    let _clients: Vec<Raw> = (0..2)
        .map(|_| {
            let mut raw = Raw::connect(&perch);
            raw.send(b"CONNECT {\"verbose\":false}\r\nPING\r\n");
            assert_eq!(raw.read_line(), "PONG");
            raw
        })
        .collect();
    let dir = TempDir::new("prometheus");
    let config = dir.path.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: perch\n    static_configs:\n      \
             - targets: ['127.0.0.1:{http}']\n"
        ),
    )
    .expect("write prometheus config");
    let web = free_port();
    let log = std::fs::File::create(dir.path.join("prometheus.log")).expect("log file");
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("prometheus is not installed: run `bash tests/run.sh`, which installs it");
    struct KillOnDrop<'a>(&'a mut std::process::Child);
    impl Drop for KillOnDrop<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let guard = KillOnDrop(&mut prometheus);

    // `up{job="perch"}` and `perch_connections`, URL-encoded.
    let queries = [
        ("up%7Bjob%3D%22perch%22%7D", "1"),
        ("perch_connections%7Bjob%3D%22perch%22%7D", "2"),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    for (query, want) in queries {
        loop {
            let path = format!("/api/v1/query?query={query}");
            let answer = TcpStream::connect(("127.0.0.1", web))
                .ok()
                .map(|_| http_get(web, &path));
            if let Some((200, _, body)) = answer {
                let value: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let result = &value["data"]["result"];
                if result[0]["value"][1] == want {
                    assert_eq!(result.as_array().map(Vec::len), Some(1), "{body}");
                    break;
                }
                last = body;
            }
            if Instant::now() >= deadline {
                let log =
                    std::fs::read_to_string(dir.path.join("prometheus.log")).unwrap_or_default();
                panic!("prometheus never reported {query} = {want}; last answer {last}\n{log}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    drop(guard);
}

/// HTTP clients that connect and never send a request (more of them than the
/// server serves at once) hold only the monitoring thread's slots: NATS
/// traffic through every shard goes on, and monitoring answers again once
/// they leave.
#[test]
fn stalled_http_clients_do_not_hold_up_messages() {
    let (perch, http) = perch_with_http(&[]);
    let stalled: Vec<TcpStream> = (0..80)
        .map(|_| TcpStream::connect(("127.0.0.1", http)).expect("connect to monitoring"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // Round-robin placement: the subscriber and the publisher are on
    // different shards, so the message crosses a mailbox.
    let mut subscriber = Raw::connect(&perch);
    subscriber.send(b"CONNECT {\"verbose\":false}\r\nSUB probe 1\r\nPING\r\n");
    assert_eq!(subscriber.read_line(), "PONG");
    let mut publisher = Raw::connect(&perch);
    let started = Instant::now();
    publisher.send(b"CONNECT {\"verbose\":false}\r\nPUB probe 2\r\nok\r\nPING\r\n");
    assert_eq!(publisher.read_line(), "PONG");
    assert_eq!(subscriber.read_line(), "MSG probe 1 2");
    assert_eq!(subscriber.read_line(), "ok");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a message took {:?} with stalled monitoring clients",
        started.elapsed()
    );
    drop(stalled);
    assert_eq!(
        get_json(http, "/healthz"),
        serde_json::json!({"status": "ok"})
    );
}

/// A monitoring address that cannot be bound fails the start with a clear
/// message, rather than running unwatched.
#[test]
fn a_taken_http_port_fails_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let output = Command::new(env!("CARGO_BIN_EXE_perch"))
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--http", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .output()
        .expect("run perch");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen for monitoring on 127.0.0.1:{port}")),
        "{stderr}"
    );
}

/// A shard that stops (the hidden `--debug-stall-shard` hook blocks its
/// thread) turns `/healthz` into 503 and `perch_shard_responding` for it into
/// 0, while the HTTP thread keeps answering.
#[test]
fn a_stuck_shard_shows_in_healthz_and_metrics() {
    let (_server, http) = perch_with_http(&[
        "--shards",
        "2",
        "--debug-stall-shard",
        "1",
        "--debug-stall-after-ms",
        "1500",
    ]);
    let (status, _, body) = http_get(http, "/healthz");
    assert_eq!(status, 200, "healthy before the stall: {body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, body) = http_get(http, "/healthz");
        if status == 503 {
            assert!(body.contains("unavailable"), "{body}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {status} long after the stall: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, _, metrics) = http_get(http, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        sample(&metrics, "perch_shard_responding", "{shard=\"1\"}"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "perch_shard_responding", "{shard=\"0\"}"),
        Some(1.0),
        "{metrics}"
    );
}
