//! Authentication and permissions end to end: the official Rust client
//! (async-nats) with nkeys, user/password and token against perch; config
//! reloads that change users and permissions under live clients; and hostile
//! load before authentication (connections that never CONNECT, payloads
//! declared before CONNECT, a per-IP connection flood). The byte-exact
//! behaviour is in the differential cases (tests/differential/auth_*.case).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use futures::StreamExt;
use perch::auth::nkey;
use ring::signature::KeyPair;

use crate::support::{Raw, Server};

const WAIT: Duration = Duration::from_secs(5);

/// A fresh user nkey: (public `U…`, seed `SU…`).
fn user_nkey() -> (String, String) {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed).expect("random");
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).expect("seed");
    let public: [u8; 32] = pair.public_key().as_ref().try_into().expect("32 bytes");
    (
        nkey::encode::user_public_key(&public),
        nkey::encode::user_seed(&seed),
    )
}

async fn connect(
    server: &Server,
    options: async_nats::ConnectOptions,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    tokio::time::timeout(WAIT, options.max_reconnects(0).connect(server.url()))
        .await
        .expect("connect within 5 s")
}

/// Server errors a client received, via its event callback.
fn with_errors(
    options: async_nats::ConnectOptions,
) -> (
    async_nats::ConnectOptions,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let options = options.event_callback(move |event| {
        let tx = tx.clone();
        async move {
            if let async_nats::Event::ServerError(e) = event {
                let _ = tx.send(e.to_string());
            }
        }
    });
    (options, rx)
}

/// A round trip through the server (async-nats's `flush` only empties the
/// client's buffer): a message to its own inbox comes back after every earlier
/// op was processed, and by the SUB barrier applied on every shard.
async fn sync(client: &async_nats::Client) {
    let inbox = client.new_inbox();
    let mut probe = client.subscribe(inbox.clone()).await.expect("subscribe");
    client.publish(inbox, "".into()).await.expect("publish");
    client.flush().await.expect("flush");
    next(&mut probe).await;
}

async fn next(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("a message within 5 s")
        .expect("subscription open")
}

#[tokio::test]
async fn async_nats_authenticates_with_nkey_password_and_token() {
    let (public, seed) = user_nkey();
    let (_, stranger_seed) = user_nkey();
    let hash = bcrypt::hash("hunter2", 4).expect("bcrypt");
    let server = Server::perch_with_config(
        &format!(
            r#"[authorization]
users = [
  {{ nkey = "{public}", permissions = {{ publish = ["sensors.>"], subscribe = ["_INBOX.>"] }} }},
  {{ user = "ops", password = "{hash}" }},
]
"#
        ),
        &[],
    );
    let ops = connect(
        &server,
        async_nats::ConnectOptions::with_user_and_password("ops".into(), "hunter2".into()),
    )
    .await
    .expect("ops connects with its bcrypt-checked password");
    let mut readings = ops.subscribe("sensors.>").await.expect("subscribe");
    sync(&ops).await;

    let (options, mut errors) = with_errors(async_nats::ConnectOptions::with_nkey(seed));
    let device = connect(&server, options)
        .await
        .expect("the nkey user connects by signing the nonce");
    device
        .publish("sensors.t1", "21.5".into())
        .await
        .expect("publish");
    device
        .publish("cmd.reboot", "no".into())
        .await
        .expect("publish");
    device.flush().await.expect("flush");
    let m = next(&mut readings).await;
    assert_eq!(
        (m.subject.as_str(), &m.payload[..]),
        ("sensors.t1", &b"21.5"[..])
    );
    let e = tokio::time::timeout(WAIT, errors.recv())
        .await
        .expect("a permissions error within 5 s")
        .expect("error channel open");
    assert!(
        e.contains("Permissions Violation for Publish to \"cmd.reboot\""),
        "{e}"
    );

    for refused in [
        async_nats::ConnectOptions::with_nkey(stranger_seed),
        async_nats::ConnectOptions::with_user_and_password("ops".into(), "wrong".into()),
        async_nats::ConnectOptions::with_token("ops".into()),
        async_nats::ConnectOptions::new(),
    ] {
        assert!(
            connect(&server, refused).await.is_err(),
            "bad credentials must be refused"
        );
    }

    let token = Server::perch_with_config("[authorization]\ntoken = \"s3cr3t\"\n", &[]);
    connect(
        &token,
        async_nats::ConnectOptions::with_token("s3cr3t".into()),
    )
    .await
    .expect("the token connects");
    assert!(connect(
        &token,
        async_nats::ConnectOptions::with_token("s3cr3T".into())
    )
    .await
    .is_err());
}

#[tokio::test]
async fn allow_responses_lets_a_responder_answer_requests_only() {
    let server = Server::perch_with_config(
        r#"[authorization]
users = [
  { user = "svc", password = "s", permissions = { subscribe = ["svc.>"], allow_responses = true } },
  { user = "cli", password = "c" },
]
"#,
        &[],
    );
    let (options, mut errors) = with_errors(async_nats::ConnectOptions::with_user_and_password(
        "svc".into(),
        "s".into(),
    ));
    let svc = connect(&server, options).await.expect("svc");
    let mut requests = svc.subscribe("svc.time").await.expect("subscribe");
    svc.flush().await.expect("flush");
    let responder = tokio::spawn({
        let svc = svc.clone();
        async move {
            for _ in 0..3 {
                let request = next(&mut requests).await;
                let reply = request.reply.expect("a reply subject");
                svc.publish(reply.clone(), "first".into())
                    .await
                    .expect("publish");
                // A second response to the same request is refused.
                svc.publish(reply, "second".into()).await.expect("publish");
            }
            svc.publish("elsewhere", "no".into())
                .await
                .expect("publish");
            svc.flush().await.expect("flush");
        }
    });
    let cli = connect(
        &server,
        async_nats::ConnectOptions::with_user_and_password("cli".into(), "c".into()),
    )
    .await
    .expect("cli");
    // svc may not publish to an inbox of its own to sync on (responses
    // only): the first request is retried until svc's SUB has reached the
    // server, the next two must be answered at once.
    let deadline = Instant::now() + WAIT;
    let first = loop {
        match cli.request("svc.time", "now?".into()).await {
            Err(e)
                if e.kind() == async_nats::RequestErrorKind::NoResponders
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answer => break answer.expect("the first request answered"),
        }
    };
    assert_eq!(&first.payload[..], b"first");
    for _ in 0..2 {
        let answer = tokio::time::timeout(WAIT, cli.request("svc.time", "now?".into()))
            .await
            .expect("an answer within 5 s")
            .expect("request answered");
        assert_eq!(&answer.payload[..], b"first");
    }
    responder.await.expect("responder");
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let e = tokio::time::timeout(WAIT, errors.recv())
            .await
            .expect("4 permission errors within 5 s")
            .expect("open");
        seen.push(e);
    }
    assert!(
        seen.iter()
            .take(3)
            .all(|e| e.contains("Publish to \"_INBOX.")),
        "{seen:?}"
    );
    assert!(seen[3].contains("Publish to \"elsewhere\""), "{seen:?}");
}

/// Reads what a raw connection gets until `want` appears (or 5 s pass).
fn read_for(raw: &mut TcpStream, want: &str) -> String {
    let deadline = Instant::now() + WAIT;
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !String::from_utf8_lossy(&all).contains(want) {
        raw.set_read_timeout(Some(Duration::from_millis(100))).ok();
        match raw.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&all).into_owned()
}

fn raw_client(server: &Server, connect: &str) -> TcpStream {
    let mut raw = TcpStream::connect(server.addr()).expect("connect");
    raw.write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
        .expect("write");
    let got = read_for(&mut raw, "PONG\r\n");
    assert!(got.contains("PONG\r\n"), "{got}");
    raw
}

#[test]
fn a_reload_rechecks_live_clients_and_their_subscriptions() {
    let before = r#"[authorization]
users = [
  { user = "a", password = "pa" },
  { user = "b", password = "pb" },
  { user = "pub", password = "pp" },
]
"#;
    let server = Server::perch_with_config(before, &[]);
    let mut a = raw_client(&server, r#"{"verbose":false,"user":"a","pass":"pa"}"#);
    a.write_all(b"SUB cmd.> 1\r\nSUB secret.> 2\r\nSUB open.* 3\r\nPING\r\n")
        .expect("write");
    assert!(read_for(&mut a, "PONG\r\n").contains("PONG"));
    let mut b = raw_client(&server, r#"{"verbose":false,"user":"b","pass":"pb"}"#);
    let mut publisher = raw_client(&server, r#"{"verbose":false,"user":"pub","pass":"pp"}"#);

    // a loses secret.> and part of open.*; b's password changes; c is new.
    let after = r#"[authorization]
users = [
  { user = "a", password = "pa", permissions = { subscribe = { allow = ["cmd.>", "open.*"], deny = ["open.hidden"] } } },
  { user = "b", password = "changed" },
  { user = "pub", password = "pp" },
  { user = "c", password = "pc" },
]
"#;
    server.reload_with(after);
    let got = read_for(&mut a, "(sid \"2\")'\r\n");
    assert!(
        got.contains(
            "-ERR 'Permissions Violation for Subscription to \"secret.>\" (sid \"2\")'\r\n"
        ),
        "{got:?}"
    );
    let mut b_rest = Vec::new();
    b.set_read_timeout(Some(WAIT)).ok();
    let _ = b.read_to_end(&mut b_rest);
    assert_eq!(
        String::from_utf8_lossy(&b_rest),
        "-ERR 'Authorization Violation'\r\n",
        "b's password changed: closed"
    );
    let _c = raw_client(&server, r#"{"verbose":false,"user":"c","pass":"pc"}"#);

    // After the reload: nothing on the removed subscription, nothing denied
    // through the wildcard one, everything else as before.
    publisher
        .write_all(
            b"PUB secret.x 1\r\ns\r\nPUB open.hidden 1\r\nh\r\nPUB open.ok 1\r\no\r\nPUB cmd.go 1\r\ng\r\nPING\r\n",
        )
        .expect("write");
    assert!(read_for(&mut publisher, "PONG\r\n").contains("PONG"));
    a.write_all(b"PING\r\n").expect("write");
    let got = read_for(&mut a, "PONG\r\n");
    assert_eq!(
        got, "MSG open.ok 3 1\r\no\r\nMSG cmd.go 1 1\r\ng\r\nPONG\r\n",
        "only what a may still receive"
    );
}

#[test]
fn turning_auth_on_by_reload_closes_clients_that_never_authenticated() {
    let server = Server::perch_with_config("", &[]);
    let mut open = raw_client(&server, r#"{"verbose":false}"#);
    server.reload_with("[authorization]\ntoken = \"t\"\n");
    let mut rest = Vec::new();
    open.set_read_timeout(Some(WAIT)).ok();
    let _ = open.read_to_end(&mut rest);
    assert_eq!(
        String::from_utf8_lossy(&rest),
        "-ERR 'Authorization Violation'\r\n"
    );
    let _ok = raw_client(&server, r#"{"verbose":false,"auth_token":"t"}"#);
}

/// Pre-authentication load: clients that never send CONNECT and clients that
/// declare a huge payload before CONNECT cost (almost) nothing, and an
/// authenticated client's messages keep flowing meanwhile.
#[test]
fn unauthenticated_clients_cannot_grow_memory_or_stall_others() {
    const IDLE: usize = 400;
    const DECLARING: usize = 400;
    let server = Server::perch_with_config(
        "connect_timeout_ms = 3000\n[authorization]\ntoken = \"t\"\n",
        &[],
    );
    let mut sub = raw_client(&server, r#"{"verbose":false,"auth_token":"t"}"#);
    sub.write_all(b"SUB echo 1\r\nPING\r\n").expect("write");
    assert!(read_for(&mut sub, "PONG").contains("PONG"));
    let mut publisher = raw_client(&server, r#"{"verbose":false,"auth_token":"t"}"#);
    let rss_before = server.rss_kib();

    let idle: Vec<TcpStream> = (0..IDLE)
        .map(|_| TcpStream::connect(server.addr()).expect("connect"))
        .collect();
    let mut declaring = Vec::new();
    for _ in 0..DECLARING {
        let mut s = TcpStream::connect(server.addr()).expect("connect");
        // 1 MiB declared (max_payload), then the payload dribbles in.
        let _ = s.write_all(b"PUB big 1048576\r\n");
        let _ = s.write_all(&[b'x'; 1000]);
        declaring.push(s);
    }
    // Every declaring client is closed at once with Authorization Violation.
    for s in &mut declaring {
        s.set_read_timeout(Some(WAIT)).ok();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.ends_with("-ERR 'Authorization Violation'\r\n"),
            "{got:?}"
        );
    }
    // Meanwhile messages flow for authenticated clients.
    let start = Instant::now();
    publisher.write_all(b"PUB echo 2\r\nhi\r\n").expect("write");
    let got = read_for(&mut sub, "MSG echo 1 2\r\nhi\r\n");
    assert!(got.contains("MSG echo 1 2\r\nhi\r\n"), "{got:?}");
    let rss_during = server.rss_kib();
    eprintln!(
        "pre-auth load: {IDLE} idle + {DECLARING} declaring 1 MiB: RSS {rss_before} -> {rss_during} KiB, \
         message delivered in {:?}",
        start.elapsed()
    );
    // 1 MiB declared by each of 400 clients would be 400 MiB if buffered;
    // what they may cost is the per-connection state (well under 8 KiB each).
    let per_connection = (rss_during.saturating_sub(rss_before)) * 1024 / (IDLE + DECLARING) as u64;
    assert!(
        per_connection < 8 * 1024,
        "{per_connection} B per unauthenticated connection"
    );
    // The idle ones are closed at connect_timeout_ms (Authentication Timeout).
    let mut first = idle.into_iter().next().expect("one");
    first.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut got = Vec::new();
    let _ = first.read_to_end(&mut got);
    assert!(
        String::from_utf8_lossy(&got).ends_with("-ERR 'Authentication Timeout'\r\n"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
}

#[test]
fn connections_over_the_per_ip_rate_are_closed_before_info() {
    let server = Server::perch(&["--connection-rate-per-ip", "5"]);
    let mut admitted = 0;
    let mut refused = 0;
    // The start-up probe's connection took a token: let the bucket refill.
    std::thread::sleep(Duration::from_millis(1200));
    // Opened back to back: far faster than 5 a second.
    let conns: Vec<TcpStream> = (0..30)
        .map(|_| TcpStream::connect(server.addr()).expect("connect"))
        .collect();
    for mut c in conns {
        c.set_read_timeout(Some(WAIT)).ok();
        let mut buf = [0u8; 5];
        match c.read(&mut buf) {
            Ok(5) if &buf == b"INFO " => admitted += 1,
            Ok(0) => refused += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => refused += 1,
            other => panic!("unexpected: {other:?} {buf:?}"),
        }
    }
    // A burst of 5, plus what refilled while the 30 were accepted.
    assert!((5..=8).contains(&admitted), "{admitted} admitted");
    assert_eq!(admitted + refused, 30);
    // Once the bucket refills, the address may connect again.
    std::thread::sleep(Duration::from_millis(1200));
    Raw::connect(&server);
}

/// Config edge cases that could let clients in unchecked (a class of past
/// CVEs in peer brokers) are refused at start with an error naming the user,
/// never the secret.
#[test]
fn unsafe_authorization_tables_are_refused_at_start() {
    let (public, _) = user_nkey();
    let cases = [
        ("token = \"\"", "the token is empty"),
        (
            "token = \"t\"\nusers = [ { user = \"a\", password = \"p\" } ]",
            "cannot both be set",
        ),
        ("users = [ { user = \"a\" } ]", "empty password"),
        ("users = [ { password = \"hunter2secret\" } ]", "empty name"),
        (
            "users = [ { user = \"a\", password = \"x1\" }, { user = \"a\", password = \"hunter2secret\" } ]",
            "appears twice",
        ),
        (
            &format!("users = [ {{ nkey = \"{public}\", password = \"hunter2secret\" }} ]"),
            "no user name or password",
        ),
        ("users = [ { nkey = \"SUAAAAAA\" } ]", "not a user's public nkey"),
        (
            "users = [ { user = \"a\", password = \"$2a$11$hunter2secretnotahash\" } ]",
            "not a valid hash",
        ),
        (
            "users = [ { user = \"a\", password = \"hunter2secret\", permissions = { publish = [\"a..b\"] } } ]",
            "not a valid subject",
        ),
        (
            "users = [ { user = \"a\", password = \"hunter2secret\", permissions = { publsh = [\"a\"] } } ]",
            "unknown field",
        ),
    ];
    let dir = crate::support::TempDir::new("auth-config");
    for (table, want) in cases.iter() {
        let stderr =
            crate::support::perch_refuses_config(&dir.path, &format!("[authorization]\n{table}\n"));
        assert!(stderr.contains(want), "{table}: {stderr}");
        assert!(
            !stderr.contains("hunter2secret"),
            "{table}: secret in {stderr}"
        );
    }
}

#[test]
fn a_mistyped_secret_is_not_echoed_by_the_config_error() {
    let dir = crate::support::TempDir::new("auth-config-types");
    for table in [
        "token = 123456789",
        "users = [ { user = \"a\", password = 987654321 } ]",
        "users = [ { user = \"a\", password = [\"hunter2secret\"] } ]",
    ] {
        let stderr =
            crate::support::perch_refuses_config(&dir.path, &format!("[authorization]\n{table}\n"));
        assert!(stderr.contains("line 2, column"), "{table}: {stderr}");
        for secret in ["123456789", "987654321", "hunter2secret"] {
            assert!(!stderr.contains(secret), "{table}: secret in {stderr}");
        }
    }
}

#[test]
fn secrets_never_appear_in_monitoring() {
    let http = crate::support::free_port();
    let http_addr = format!("127.0.0.1:{http}");
    let server = Server::perch_with_config(
        r#"[authorization]
users = [ { user = "ops", password = "hunter2secret" } ]
"#,
        &["--http", &http_addr],
    );
    let _ops = raw_client(
        &server,
        r#"{"verbose":false,"user":"ops","pass":"hunter2secret"}"#,
    );
    let mut refused = TcpStream::connect(server.addr()).expect("connect");
    refused
        .write_all(b"CONNECT {\"user\":\"ops\",\"pass\":\"hunter2secretWRONG\"}\r\n")
        .expect("write");
    let _ = read_for(&mut refused, "Violation");
    for path in ["/varz", "/connz?subs=1", "/subsz", "/metrics", "/healthz"] {
        let (status, _, body) = crate::monitoring::http_get(http, path);
        assert_eq!(status, 200, "{path}");
        assert!(!body.contains("hunter2secret"), "{path}: {body}");
    }
    let (_, _, connz) = crate::monitoring::http_get(http, "/connz?auth=true");
    let connz: serde_json::Value = serde_json::from_str(&connz).expect("JSON");
    assert_eq!(connz["connections"][0]["authorized_user"], "ops", "{connz}");
    let (_, _, connz) = crate::monitoring::http_get(http, "/connz");
    assert!(
        !connz.contains("authorized_user"),
        "only with auth=true: {connz}"
    );
    let (_, _, varz) = crate::monitoring::http_get(http, "/varz");
    let varz: serde_json::Value = serde_json::from_str(&varz).expect("JSON");
    assert_eq!(
        varz["auth_required"],
        serde_json::Value::Bool(true),
        "{varz}"
    );
}

/// JetStream's API is plain subjects under `$JS.API.>`: a user who may not
/// publish there cannot create or delete streams, and one who may, can.
#[test]
fn jetstream_api_subjects_are_permissioned() {
    let store = crate::support::TempDir::new("auth-js");
    let store_dir = store.path.to_string_lossy().into_owned();
    let server = Server::perch_with_config(
        r#"[authorization]
users = [
  { user = "dev", password = "d", permissions = { publish = ["sensors.>"] } },
  { user = "admin", password = "a" },
]
"#,
        &["--store-dir", &store_dir],
    );
    let mut dev = raw_client(&server, r#"{"verbose":false,"user":"dev","pass":"d"}"#);
    let create = |name: &str| {
        let body = format!(r#"{{"name":"{name}","subjects":["sensors.{name}"]}}"#);
        format!(
            "SUB _INBOX.r 9\r\nPUB $JS.API.STREAM.CREATE.{name} _INBOX.r {}\r\n{body}\r\nPING\r\n",
            body.len()
        )
    };
    dev.write_all(create("S1").as_bytes()).expect("write");
    let got = read_for(&mut dev, "PONG\r\n");
    assert!(
        got.contains("-ERR 'Permissions Violation for Publish to \"$JS.API.STREAM.CREATE.S1\"'"),
        "{got}"
    );
    assert!(!got.contains("MSG _INBOX.r"), "{got}");
    let mut admin = raw_client(&server, r#"{"verbose":false,"user":"admin","pass":"a"}"#);
    admin
        .write_all(b"SUB _INBOX.n 1\r\nPUB $JS.API.STREAM.NAMES _INBOX.n 0\r\n\r\nPING\r\n")
        .expect("write");
    let names = read_for(&mut admin, "MSG _INBOX.n");
    let names = names + &read_for(&mut admin, "}\r\n");
    assert!(
        names.contains("\"streams\":null") || names.contains("\"total\":0"),
        "S1 was not created: {names}"
    );
    admin.write_all(create("S2").as_bytes()).expect("write");
    let got = read_for(&mut admin, "\"name\":\"S2\"");
    assert!(
        got.contains("MSG _INBOX.r 9") && got.contains("\"name\":\"S2\""),
        "{got}"
    );
}
