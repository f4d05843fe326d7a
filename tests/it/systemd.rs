//! perch under systemd, played by the test: `NOTIFY_SOCKET` is the test's own
//! datagram socket and `WATCHDOG_USEC` is set, as systemd does for a
//! Type=notify unit with WatchdogSec=. Checks READY after the store is
//! recovered (with STATUS meanwhile), watchdog pings at half the interval and
//! none once a shard stalls, RELOADING/READY around a SIGHUP reload (limits
//! applied to live connections; fixed keys and broken files refused whole),
//! STOPPING at SIGTERM, the log formats, and the unit file itself
//! (`systemd-analyze verify` and `security --offline=true`).

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{free_port, Raw, TempDir};

/// How long perch may take to report READY=1 (debug build, loaded CI).
const READY_MS_MAX: u64 = 20_000;

/// The test's end of `NOTIFY_SOCKET`: a thread receives every notification
/// with the time it arrived.
struct Manager {
    path: PathBuf,
    received: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Manager {
    fn new(dir: &Path) -> Manager {
        std::fs::create_dir_all(dir).expect("create the notify socket's dir");
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            // Ends when the test process does; a recv error means the socket went.
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock()
                    .expect("notify log")
                    .push((Instant::now(), text));
            }
        });
        Manager { path, received }
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.received.lock().expect("notify log").clone()
    }

    /// Waits for the first notification after the first `skip` ones that has
    /// a line `line`; returns its index and time.
    fn wait_for_line(&self, skip: usize, line: &str, timeout: Duration) -> (usize, Instant) {
        let deadline = Instant::now() + timeout;
        loop {
            let all = self.all();
            if let Some((i, (at, _))) = all
                .iter()
                .enumerate()
                .skip(skip)
                .find(|(_, (_, text))| text.lines().any(|l| l == line))
            {
                return (i, *at);
            }
            assert!(
                Instant::now() < deadline,
                "no {line:?} within {timeout:?}; got {:?}",
                all.iter().map(|(_, t)| t).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Notifications with the line `line` that arrived in `[from, to)`.
    fn count_between(&self, line: &str, from: Instant, to: Instant) -> usize {
        self.all()
            .iter()
            .filter(|(at, text)| *at >= from && *at < to && text.lines().any(|l| l == line))
            .count()
    }
}

/// A perch process with its stderr in a file; killed on drop.
struct Perch {
    child: Child,
    log: PathBuf,
}

impl Perch {
    /// `perch serve ARGS` with `NOTIFY_SOCKET` (and `env`) set, stderr to `log`.
    fn start(manager: &Manager, args: &[String], env: &[(&str, &str)], log: &Path) -> Perch {
        let io = std::env::var("PERCH_IO").unwrap_or_else(|_| "auto".into());
        let mut command = Command::new(env!("CARGO_BIN_EXE_perch"));
        command
            .arg("serve")
            .args(["--io", &io])
            .args(args)
            .env("NOTIFY_SOCKET", &manager.path)
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("JOURNAL_STREAM")
            .env_remove("INVOCATION_ID")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("create the log"));
        for (key, value) in env {
            command.env(key, value);
        }
        Perch {
            child: command.spawn().expect("spawn perch"),
            log: log.to_path_buf(),
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle`.
    fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait for perch")
    }
}

impl Drop for Perch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A NATS connection on `port`; returns it and its INFO line.
fn connect(port: u16) -> (Raw, String) {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_nodelay(true).ok();
    let mut raw = Raw { stream };
    let info = raw.read_line();
    assert!(info.starts_with("INFO {"), "expected INFO, got {info:?}");
    raw.send(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n");
    assert_eq!(raw.read_line(), "PONG");
    (raw, info)
}

/// `max_payload` as an INFO line states it.
fn info_max_payload(info: &str) -> u64 {
    let json: serde_json::Value =
        serde_json::from_str(info.trim_start_matches("INFO ")).expect("INFO is JSON");
    json["max_payload"].as_u64().expect("max_payload in INFO")
}

/// A request over the raw protocol: the reply's payload.
fn request(raw: &mut Raw, subject: &str, body: &str) -> String {
    raw.send(
        format!(
            "SUB _INBOX.t 99\r\nPUB {subject} _INBOX.t {}\r\n{body}\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let head = raw.read_line();
    assert!(head.starts_with("MSG _INBOX.t 99 "), "{head}");
    let payload = raw.read_line();
    raw.send(b"UNSUB 99\r\n");
    payload
}

/// A store with stream BIG holding `messages` messages, written by a perch
/// that is then stopped.
fn store_with_a_big_stream(dir: &Path, messages: usize) -> PathBuf {
    let store = dir.join("store");
    std::fs::create_dir_all(&store).expect("store dir");
    let port = free_port();
    let manager = Manager::new(&dir.join("fill"));
    let mut perch = Perch::start(
        &manager,
        &args(&[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--shards",
            "2",
            "--store-dir",
            store.to_str().expect("utf-8"),
        ]),
        &[],
        &dir.join("fill.log"),
    );
    manager.wait_for_line(0, "READY=1", Duration::from_millis(READY_MS_MAX));
    let (mut raw, _) = connect(port);
    let created = request(
        &mut raw,
        "$JS.API.STREAM.CREATE.BIG",
        r#"{"name":"BIG","subjects":["big.>"]}"#,
    );
    assert!(created.contains("stream_create_response"), "{created}");
    let payload = "x".repeat(100);
    let mut batch = Vec::new();
    for i in 0..messages {
        batch.extend_from_slice(format!("PUB big.{} 100\r\n{payload}\r\n", i % 16).as_bytes());
    }
    raw.send(&batch);
    let deadline = Instant::now() + Duration::from_secs(60);
    let expected = format!("\"messages\":{messages},");
    loop {
        let info = request(&mut raw, "$JS.API.STREAM.INFO.BIG", "");
        if info.contains(&expected) {
            break;
        }
        assert!(Instant::now() < deadline, "stream never filled: {info}");
        std::thread::sleep(Duration::from_millis(100));
    }
    perch.signal(libc::SIGTERM);
    assert!(perch.wait().success(), "{}", perch.log_text());
    store
}

/// READY=1 comes only once the store is recovered (STATUS tells which stream
/// meanwhile), the listener serves at once after it, the recovered stream is
/// whole; SIGTERM says STOPPING=1 and exits 0.
#[test]
fn ready_after_recovery_with_status_and_stopping_at_sigterm() {
    let dir = TempDir::new("systemd-ready");
    let messages = 40_000;
    let store = store_with_a_big_stream(&dir.path, messages);
    let manager = Manager::new(&dir.path);
    let port = free_port();
    let mut perch = Perch::start(
        &manager,
        &args(&[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--shards",
            "2",
            "--store-dir",
            store.to_str().expect("utf-8"),
        ]),
        &[],
        &dir.path.join("perch.log"),
    );
    let (ready_index, _) = manager.wait_for_line(0, "READY=1", Duration::from_millis(READY_MS_MAX));
    // The listener accepts and serves as soon as READY=1 is out.
    let (mut raw, _) = connect(port);
    let all = manager.all();
    let before: Vec<&String> = all[..ready_index].iter().map(|(_, t)| t).collect();
    assert!(
        before
            .iter()
            .any(|t| t.contains("STATUS=recovering stream BIG (1 of 1 on shard ")),
        "no recovery STATUS before READY=1: {before:?}"
    );
    // Progress within the stream, not just its name: the first report after
    // RECOVERY_PROGRESS_RECORDS (16384) records always goes out.
    assert!(
        before
            .iter()
            .any(|t| t.contains("(1 of 1 on shard ") && t.contains("): 16384 messages read")),
        "no recovery progress before READY=1: {before:?}"
    );
    assert!(
        before.iter().all(|t| !t.contains("READY=1")),
        "READY=1 sent twice: {before:?}"
    );
    assert!(
        all[ready_index]
            .1
            .contains("STATUS=serving NATS on 127.0.0.1:"),
        "{:?}",
        all[ready_index].1
    );
    // Recovered before READY: the stream is complete on the first request.
    let info = request(&mut raw, "$JS.API.STREAM.INFO.BIG", "");
    assert!(
        info.contains(&format!("\"messages\":{messages},")),
        "{info}"
    );

    let count = manager.all().len();
    perch.signal(libc::SIGTERM);
    manager.wait_for_line(count, "STOPPING=1", Duration::from_secs(5));
    assert!(perch.wait().success(), "{}", perch.log_text());
}

/// WATCHDOG=1 every half of WATCHDOG_USEC while every shard ticks; none once a
/// shard's thread is blocked (the hidden --debug-stall-shard hook), and the log
/// says why.
#[test]
fn watchdog_pings_at_half_the_interval_and_stop_when_a_shard_stalls() {
    let dir = TempDir::new("systemd-watchdog");
    let manager = Manager::new(&dir.path);
    let port = free_port();
    // WatchdogSec=2s: pings every second, and a shard counts as alive for a
    // second after its tick, which leaves a loaded CI machine plenty of slack.
    let stall_after_ms = 6_000;
    let perch = Perch::start(
        &manager,
        &args(&[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--shards",
            "2",
            "--debug-stall-shard",
            "1",
            "--debug-stall-after-ms",
            &stall_after_ms.to_string(),
        ]),
        &[("WATCHDOG_USEC", "2000000")],
        &dir.path.join("perch.log"),
    );
    let started = Instant::now();
    let (_, ready_at) = manager.wait_for_line(0, "READY=1", Duration::from_millis(READY_MS_MAX));
    // The stall is timed from the shard's start, which comes after
    // `started`: everything before started + stall_after_ms is healthy.
    let healthy_from = ready_at;
    let healthy_to = started + Duration::from_millis(stall_after_ms - 500);
    assert!(
        healthy_to > healthy_from + Duration::from_millis(3_000),
        "start-up took too long to leave a healthy window"
    );
    std::thread::sleep(healthy_to.saturating_duration_since(Instant::now()));
    let healthy = manager.count_between("WATCHDOG=1", healthy_from, healthy_to);
    let window_ms = (healthy_to - healthy_from).as_millis() as usize;
    // One ping per second: about window/1000 (+1 for the one at READY).
    let expected = window_ms / 1_000;
    assert!(
        healthy >= 2 && healthy + 3 >= expected && healthy <= expected + 3,
        "{healthy} pings in {window_ms} ms, expected about {expected}"
    );

    // The shard logs just before it blocks; its last tick stays fresh for a
    // second more, then no ping may come (two would be due in the window).
    perch.wait_for_log("--debug-stall-shard: blocking this shard");
    let silent_from = Instant::now() + Duration::from_millis(1_500);
    std::thread::sleep(Duration::from_millis(4_000));
    let stalled = manager.count_between("WATCHDOG=1", silent_from, Instant::now());
    assert_eq!(stalled, 0, "watchdog pinged while shard 1 was stuck");
    perch.wait_for_log("withholding the watchdog ping");
    assert!(
        perch.log_text().contains("shard(s) [1] have not run"),
        "{}",
        perch.log_text()
    );
}

/// perch on `port` with its config in `conf` (written first) and `extra` flags.
fn start_with_config(
    dir: &Path,
    manager: &Manager,
    conf_text: &str,
    extra: &[&str],
) -> (Perch, PathBuf) {
    let conf = dir.join("perch.toml");
    std::fs::write(&conf, conf_text).expect("write config");
    let mut list = vec!["--config", conf.to_str().expect("utf-8"), "--shards", "2"];
    list.extend_from_slice(extra);
    let perch = Perch::start(manager, &args(&list), &[], &dir.join("perch.log"));
    manager.wait_for_line(0, "READY=1", Duration::from_millis(READY_MS_MAX));
    (perch, conf)
}

/// Sends SIGHUP and waits for RELOADING=1 (with MONOTONIC_USEC) then READY=1;
/// returns the READY notification's text.
fn reload(perch: &Perch, manager: &Manager) -> String {
    let count = manager.all().len();
    perch.signal(libc::SIGHUP);
    let (reloading, _) = manager.wait_for_line(count, "RELOADING=1", Duration::from_secs(10));
    let all = manager.all();
    let usec = all[reloading]
        .1
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse::<u64>().ok());
    // CLOCK_MONOTONIC in µs: the test's own monotonic clock is the same one.
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let now_usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    let usec = usec.unwrap_or_else(|| panic!("no MONOTONIC_USEC with RELOADING=1: {all:?}"));
    assert!(
        usec <= now_usec && now_usec - usec < 10_000_000,
        "MONOTONIC_USEC={usec} is not CLOCK_MONOTONIC (now {now_usec})"
    );
    let (ready, _) = manager.wait_for_line(reloading, "READY=1", Duration::from_secs(10));
    manager.all()[ready].1.clone()
}

/// A lowered max_payload reaches a new connection's INFO and is enforced on a
/// connection opened before the reload, which (like its subscriber) stays up.
#[test]
fn sighup_changes_limits_on_live_connections_without_dropping_them() {
    let dir = TempDir::new("systemd-reload");
    let manager = Manager::new(&dir.path);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (perch, conf) = start_with_config(
        &dir.path,
        &manager,
        "max_payload = 1000\n",
        &["--listen", &listen],
    );
    let (mut subscriber, info) = connect(port);
    assert_eq!(info_max_payload(&info), 1000);
    subscriber.send(b"SUB t 1\r\nPING\r\n");
    assert_eq!(subscriber.read_line(), "PONG");
    let (mut publisher, _) = connect(port);
    let big = "b".repeat(200);
    // Allowed before the reload.
    publisher.send(format!("PUB t 200\r\n{big}\r\nPING\r\n").as_bytes());
    assert_eq!(publisher.read_line(), "PONG");
    assert_eq!(subscriber.read_line(), "MSG t 1 200");
    assert_eq!(subscriber.read_line(), big);

    std::fs::write(&conf, "max_payload = 100\nlog_level = \"debug\"\n").expect("rewrite");
    let ready = reload(&perch, &manager);
    assert!(ready.contains("config reloaded"), "{ready}");
    perch.wait_for_log("config reloaded: max_payload 1000 -> 100, log_level info -> debug");

    let (_, info) = connect(port);
    assert_eq!(
        info_max_payload(&info),
        100,
        "new connections get the new limit"
    );
    // Both old connections are still up; the small message still flows.
    publisher.send(b"PUB t 5\r\nsmall\r\nPING\r\n");
    assert_eq!(publisher.read_line(), "PONG");
    assert_eq!(subscriber.read_line(), "MSG t 1 5");
    assert_eq!(subscriber.read_line(), "small");
    // The old connection now gets the new limit.
    publisher.send(format!("PUB t 200\r\n{big}\r\n").as_bytes());
    assert_eq!(publisher.read_line(), "-ERR 'Maximum Payload Violation'");
    subscriber.send(b"PING\r\n");
    assert_eq!(subscriber.read_line(), "PONG");
}

/// A lower max_connections keeps every open client and refuses the next one;
/// a shorter ping interval reaches a connection whose next PING was a minute
/// away.
#[test]
fn reload_lowers_max_connections_and_ping_interval_for_open_clients() {
    let dir = TempDir::new("systemd-reload-conns");
    let manager = Manager::new(&dir.path);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (perch, conf) = start_with_config(
        &dir.path,
        &manager,
        "max_connections = 10\nping_interval_ms = 60000\n",
        &["--listen", &listen],
    );
    let (mut a, _) = connect(port);
    let (mut b, _) = connect(port);
    // The first PING comes within 2 s (nats-server's RTT probe); the next one
    // would be 60 s later.
    assert_eq!(a.read_line_exact(), "PING");
    a.send(b"PONG\r\n");

    // b does not answer PINGs until the end: enough of them may be outstanding.
    std::fs::write(
        &conf,
        "max_connections = 2\nping_interval_ms = 300\nping_max_outstanding = 100\n",
    )
    .expect("rewrite");
    assert!(reload(&perch, &manager).contains("config reloaded"));
    let pinged = Instant::now();
    assert_eq!(a.read_line_exact(), "PING");
    assert!(
        pinged.elapsed() < Duration::from_secs(3),
        "the new ping interval did not reach an open connection"
    );
    a.send(b"PONG\r\n");

    let mut extra = Raw {
        stream: TcpStream::connect(("127.0.0.1", port)).expect("connect"),
    };
    assert!(extra.read_line_exact().starts_with("INFO {"));
    let (bytes, closed) = extra.read_until_closed(Duration::from_secs(5));
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        "-ERR 'maximum connections exceeded'\r\n"
    );
    assert!(closed);
    for raw in [&mut a, &mut b] {
        raw.send(b"PING\r\n");
        assert_eq!(raw.read_line(), "PONG", "an open client was dropped");
    }
}

/// A reload that would move the listener is refused whole, naming the key:
/// the limit changed in the same file is not applied either, and the old port
/// keeps serving.
#[test]
fn reload_refuses_a_listen_change_and_changes_nothing() {
    let dir = TempDir::new("systemd-refuse");
    let manager = Manager::new(&dir.path);
    let port = free_port();
    let other = free_port();
    let (perch, conf) = start_with_config(
        &dir.path,
        &manager,
        &format!("listen = \"127.0.0.1:{port}\"\nmax_payload = 1000\n"),
        &[],
    );
    let (mut held, _) = connect(port);
    std::fs::write(
        &conf,
        format!("listen = \"127.0.0.1:{other}\"\nmax_payload = 100\n"),
    )
    .expect("rewrite");
    let ready = reload(&perch, &manager);
    assert!(
        ready.contains("last reload refused: listen need a restart"),
        "{ready}"
    );
    perch.wait_for_log("reload refused: listen cannot change while perch runs");
    let (_, info) = connect(port);
    assert_eq!(
        info_max_payload(&info),
        1000,
        "nothing of a refused reload applies"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", other)).is_err(),
        "perch listens on the refused address"
    );
    held.send(b"PING\r\n");
    assert_eq!(held.read_line(), "PONG");
}

/// A file that does not parse is logged and the running config stays; the
/// next good file reloads as usual.
#[test]
fn reload_of_a_broken_file_keeps_the_running_config() {
    let dir = TempDir::new("systemd-broken");
    let manager = Manager::new(&dir.path);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (perch, conf) = start_with_config(
        &dir.path,
        &manager,
        "max_payload = 1000\n",
        &["--listen", &listen],
    );
    std::fs::write(&conf, "max_payload = [\n").expect("rewrite");
    let ready = reload(&perch, &manager);
    assert!(ready.contains("last reload failed"), "{ready}");
    perch.wait_for_log("reload failed, keeping the running config: invalid config file");
    assert_eq!(info_max_payload(&connect(port).1), 1000);
    // Valid TOML, invalid config (max_payload above max_pending): refused too.
    std::fs::write(&conf, "max_payload = 1000\nmax_pending = 10\n").expect("rewrite");
    assert!(reload(&perch, &manager).contains("last reload failed"));
    assert_eq!(info_max_payload(&connect(port).1), 1000);

    std::fs::write(&conf, "max_payload = 500\n").expect("rewrite");
    assert!(reload(&perch, &manager).contains("config reloaded"));
    assert_eq!(info_max_payload(&connect(port).1), 500);
}

/// The first log lines of a perch started with `extra` flags and `env`.
fn startup_log(tag: &str, extra: &[&str], env: &[(&str, &str)]) -> String {
    let dir = TempDir::new(tag);
    let manager = Manager::new(&dir.path);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut list = vec!["--listen", listen.as_str(), "--shards", "1"];
    list.extend_from_slice(extra);
    let perch = Perch::start(&manager, &args(&list), env, &dir.path.join("perch.log"));
    manager.wait_for_line(0, "READY=1", Duration::from_millis(READY_MS_MAX));
    perch.wait_for_log("listening on");
    perch.log_text()
}

/// stderr is a file here, not a terminal: no colour codes. Under systemd
/// (INVOCATION_ID set) text lines carry no timestamp; JSON lines parse.
#[test]
fn log_lines_have_no_colour_off_a_terminal_and_json_parses() {
    let text = startup_log("log-text", &[], &[]);
    assert!(!text.contains("\x1b["), "colour codes in {text:?}");
    let first = text.lines().next().expect("a log line");
    assert!(
        first.starts_with(|c: char| c.is_ascii_digit()),
        "a plain run's lines start with a timestamp: {first:?}"
    );

    let journal = startup_log("log-journal", &[], &[("INVOCATION_ID", "0123abcd")]);
    assert!(!journal.contains("\x1b["), "{journal:?}");
    let first = journal.lines().next().expect("a log line");
    assert!(
        first.trim_start().starts_with("INFO "),
        "under systemd a line starts with its level: {first:?}"
    );

    let json = startup_log("log-json", &["--log-format", "json"], &[]);
    assert!(!json.contains("\x1b["), "{json:?}");
    let mut lines = 0;
    for line in json.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        assert!(value["level"].is_string(), "{line}");
        assert!(value["fields"]["message"].is_string(), "{line}");
        lines += 1;
    }
    assert!(lines >= 1, "no JSON lines: {json:?}");
    assert!(json.contains("listening on"), "{json}");
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `systemd-analyze verify` accepts the unit (with its ExecStart pointed at the
/// binary under test, since verify checks that it exists) alone and with the
/// serial drop-in, and `security --offline=true` rates it at most 1.5.
#[test]
fn unit_file_verifies_and_exposure_is_at_most_1_5() {
    let unit = repo_root().join("systemd/perch.service");
    let text = std::fs::read_to_string(&unit).expect("read systemd/perch.service");
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=/usr/bin/perch serve --config /etc/perch/perch.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "StateDirectory=perch",
        "ConfigurationDirectory=perch",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in the unit");
    }
    let dir = TempDir::new("unit");
    let copy = dir.path.join("perch.service");
    let mut file = std::fs::File::create(&copy).expect("copy the unit");
    file.write_all(
        text.replace("/usr/bin/perch", env!("CARGO_BIN_EXE_perch"))
            .as_bytes(),
    )
    .expect("write the copy");
    drop(file);
    let verify = |what: &str| {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("systemd-analyze is not installed: run `bash tests/run.sh`");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "verify ({what}) failed: {stderr}");
        assert!(
            !stderr.contains("perch.service"),
            "verify ({what}) complained: {stderr}"
        );
    };
    verify("unit");
    let dropins = dir.path.join("perch.service.d");
    std::fs::create_dir(&dropins).expect("drop-in dir");
    std::fs::copy(
        repo_root().join("systemd/perch-serial.conf"),
        dropins.join("serial.conf"),
    )
    .expect("copy the drop-in");
    verify("unit + serial drop-in");

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze is not installed: run `bash tests/run.sh`");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = stdout
        .lines()
        .find_map(|l| l.split("Overall exposure level for perch.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {stdout}"));
    assert!(exposure <= 1.5, "exposure {exposure} > 1.5:\n{stdout}");
}
