//! The differential test: plays scripted raw-protocol sessions
//! (`tests/differential/*.case`) against perch and against nats-server, and requires
//! the two transcripts to be equal byte for byte, except for the INFO line, whose
//! per-server values (ids, version, host, port) are masked.
//!
//! It owns the case-file format, the session runner and the transcript diff. It does
//! not know what any reply *should* be: nats-server is the oracle. The format and
//! how to add a case are described in docs/differential.md.
//!
//! Environment knobs:
//! - `DIFF_CASE=<substring>` runs only the cases whose name contains it.
//! - `DIFF_SELF_CHECK=1` compares nats-server with a second nats-server, to prove a
//!   case (and the harness) is deterministic before perch is blamed.
//! - `DIFF_PRINT=1` prints every reference transcript (to review what a case checks).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::support::Server;

/// Cases run concurrently; most of their time is spent waiting for quiet sockets.
const CASE_THREADS_MAX: usize = 6;
/// A step's replies are complete once no connection has received a byte for this
/// long. A mismatch is retried with the next, longer value before it counts, so a
/// loaded machine produces slow runs, not false failures.
const QUIET_MS_PER_ATTEMPT: [u64; 3] = [60, 200, 500];
/// How long a step waits for the reply it is sure to get (the INFO after a connect,
/// the PONG after a trailing PING) before it falls back to the quiet rule.
const AWAITED_REPLY_MS_MAX: u64 = 3_000;
/// Longer received lines are shown cut (with their full length) in reports.
const LINE_CHARS_SHOWN_MAX: usize = 300;
/// Sanity bound on one step's `sleep`.
const SLEEP_MS_MAX: u64 = 10_000;

/// INFO fields whose values must be equal on both servers.
const INFO_COMPARED_KEYS: [&str; 5] = [
    "proto",
    "headers",
    "max_payload",
    "auth_required",
    "tls_required",
];
/// INFO fields both servers must send, whose values differ per server or connection.
const INFO_MASKED_KEYS: [&str; 7] = [
    "server_id",
    "server_name",
    "version",
    "host",
    "port",
    "client_id",
    "client_ip",
];

#[test]
fn differential_against_nats_server() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/differential");
    let filter = std::env::var("DIFF_CASE").unwrap_or_default();
    let self_check = std::env::var_os("DIFF_SELF_CHECK").is_some_and(|v| v != "0");
    let print = std::env::var_os("DIFF_PRINT").is_some_and(|v| v != "0");

    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("read_dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "case"))
        .collect();
    paths.sort();
    let cases: Vec<Case> = paths
        .iter()
        .map(|p| Case::load(p))
        .filter(|c| c.name.contains(&filter))
        .collect();
    assert!(
        !cases.is_empty(),
        "no case in {} matches DIFF_CASE={filter:?}",
        dir.display()
    );

    let candidate = if self_check {
        Target::NatsServer
    } else {
        Target::Perch
    };
    // A server that cannot start at all fails the test once, here, rather than once
    // per case after a startup timeout each.
    drop(Server::nats_server(""));
    if candidate == Target::Perch {
        drop(Server::perch(&[]));
    }

    let next = AtomicUsize::new(0);
    let outcomes: Mutex<Vec<(String, Outcome)>> = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..CASE_THREADS_MAX.min(cases.len()) {
            scope.spawn(|| {
                while let Some(case) = cases.get(next.fetch_add(1, Ordering::Relaxed)) {
                    // A panic (a server that does not start, a broken case file) fails this
                    // case only; the others still run and are reported.
                    let outcome =
                        std::panic::catch_unwind(AssertUnwindSafe(|| check_case(case, candidate)))
                            .unwrap_or_else(|panic| Outcome::Crashed(panic_message(&*panic)));
                    if print {
                        if let Outcome::Passed { reference, .. }
                        | Outcome::Failed { reference, .. } = &outcome
                        {
                            eprintln!("=== {} — {}\n{}", case.name, case.about, render(reference));
                        }
                    }
                    outcomes
                        .lock()
                        .expect("outcomes lock")
                        .push((case.name.clone(), outcome));
                }
            });
        }
    });

    let mut outcomes = outcomes.into_inner().expect("outcomes lock");
    outcomes.sort_by(|a, b| a.0.cmp(&b.0));
    let mut failed = Vec::new();
    for (name, outcome) in &outcomes {
        match outcome {
            Outcome::Passed {
                attempts,
                first_diff: Some(diff),
                ..
            } => {
                eprintln!("note: {name} passed only on attempt {attempts} (timing-sensitive?)");
                eprintln!("  attempt 1 differed:\n{diff}");
            }
            Outcome::Passed { .. } => {}
            Outcome::Failed { report, .. } => {
                eprintln!("{report}");
                failed.push(name.as_str());
            }
            Outcome::Crashed(message) => {
                eprintln!("--- differential case {name} CRASHED: {message}");
                failed.push(name.as_str());
            }
        }
    }
    let against = if self_check {
        "nats-server (self-check)"
    } else {
        "perch"
    };
    eprintln!(
        "differential: {} cases against {against}, {} failed, {:.1} s",
        outcomes.len(),
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failed.is_empty(),
        "differential cases failed: {}",
        failed.join(", ")
    );
}

// ---------------------------------------------------------------------------
// Case files

/// One scripted session, loaded from a `.case` file.
struct Case {
    name: String,
    /// The first comment line: what the case checks.
    about: String,
    knobs: Vec<(Knob, u64)>,
    /// Extra nats-server config lines and perch TOML lines (the same setting
    /// in each server's syntax, e.g. users and permissions).
    nats_conf: Vec<String>,
    perch_toml: Vec<String>,
    steps: Vec<Step>,
    /// Connection names in order of first `conn`.
    conn_names: Vec<String>,
}

enum Step {
    /// `conn a`: open a connection and read what the server sends first.
    Connect { conn: usize },
    /// `a> bytes`: send the (unescaped) bytes on a connection.
    Send { conn: usize, bytes: Vec<u8> },
    /// `close a`: the client closes its connection.
    Close { conn: usize },
    /// `sleep 1500`: wait that long, collecting whatever arrives.
    Sleep { ms: u64 },
    /// `at 1500`: collect until 1500 ms after the case's first `conn`. Timer cases
    /// use it so that their schedule does not drift with the quiet periods.
    At { ms: u64 },
}

/// Server limits a case may set; each maps to a perch flag and a nats-server key.
#[derive(Clone, Copy)]
enum Knob {
    MaxPayload,
    MaxControlLine,
    MaxConnections,
    MaxSubscriptions,
    MaxPending,
    PingIntervalMs,
    PingMaxOutstanding,
}

impl Knob {
    fn parse(name: &str) -> Option<Knob> {
        Some(match name {
            "max_payload" => Knob::MaxPayload,
            "max_control_line" => Knob::MaxControlLine,
            "max_connections" => Knob::MaxConnections,
            "max_subscriptions" => Knob::MaxSubscriptions,
            "max_pending" => Knob::MaxPending,
            "ping_interval_ms" => Knob::PingIntervalMs,
            "ping_max_outstanding" => Knob::PingMaxOutstanding,
            _ => return None,
        })
    }

    fn perch_flag(self) -> &'static str {
        match self {
            Knob::MaxPayload => "--max-payload",
            Knob::MaxControlLine => "--max-control-line",
            Knob::MaxConnections => "--max-connections",
            Knob::MaxSubscriptions => "--max-subscriptions",
            Knob::MaxPending => "--max-pending",
            Knob::PingIntervalMs => "--ping-interval-ms",
            Knob::PingMaxOutstanding => "--ping-max-outstanding",
        }
    }

    fn nats_server_line(self, value: u64) -> String {
        match self {
            Knob::MaxPayload => format!("max_payload: {value}"),
            Knob::MaxControlLine => format!("max_control_line: {value}"),
            Knob::MaxConnections => format!("max_connections: {value}"),
            Knob::MaxSubscriptions => format!("max_subscriptions: {value}"),
            Knob::MaxPending => format!("max_pending: {value}"),
            Knob::PingIntervalMs => format!("ping_interval: \"{value}ms\""),
            Knob::PingMaxOutstanding => format!("ping_max: {value}"),
        }
    }
}

impl Case {
    fn load(path: &Path) -> Case {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let name = path
            .file_stem()
            .expect("case file name")
            .to_string_lossy()
            .into_owned();
        let mut case = Case {
            name,
            about: String::new(),
            knobs: Vec::new(),
            nats_conf: Vec::new(),
            perch_toml: Vec::new(),
            steps: Vec::new(),
            conn_names: Vec::new(),
        };
        for (index, raw_line) in text.lines().enumerate() {
            let at = format!("{}:{}", path.display(), index + 1);
            let line = raw_line.trim_end();
            if line.trim_start().is_empty() {
                continue;
            }
            if let Some(comment) = line.trim_start().strip_prefix('#') {
                if case.about.is_empty() {
                    case.about = comment.trim().to_string();
                }
                continue;
            }
            if let Some(conf) = line.strip_prefix("nats_conf:") {
                case.nats_conf.push(conf.trim().to_string());
                continue;
            }
            if let Some(toml) = line.strip_prefix("perch_toml:") {
                case.perch_toml.push(toml.trim().to_string());
                continue;
            }
            if let Some(knobs) = line.strip_prefix("config:") {
                for setting in knobs.split(',') {
                    let (key, value) = setting
                        .split_once('=')
                        .unwrap_or_else(|| panic!("{at}: expected `key = value`"));
                    let knob = Knob::parse(key.trim())
                        .unwrap_or_else(|| panic!("{at}: unknown knob {key:?}"));
                    let value = value
                        .trim()
                        .parse()
                        .unwrap_or_else(|e| panic!("{at}: knob value: {e}"));
                    case.knobs.push((knob, value));
                }
            } else if let Some(conn) = line.strip_prefix("conn ") {
                let conn = conn.trim();
                assert!(
                    !case.conn_names.iter().any(|c| c == conn),
                    "{at}: connection {conn} opened twice"
                );
                case.conn_names.push(conn.to_string());
                case.steps.push(Step::Connect {
                    conn: case.conn_names.len() - 1,
                });
            } else if let Some(conn) = line.strip_prefix("close ") {
                let conn = case.conn_index(conn.trim(), &at);
                case.steps.push(Step::Close { conn });
            } else if let Some((directive, ms)) = line
                .split_once(' ')
                .filter(|(directive, _)| ["sleep", "at"].contains(directive))
            {
                let ms = ms
                    .trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("{at}: {directive}: {e}"));
                assert!(
                    ms <= SLEEP_MS_MAX,
                    "{at}: {directive} beyond {SLEEP_MS_MAX} ms"
                );
                case.steps.push(match directive {
                    "sleep" => Step::Sleep { ms },
                    _ => Step::At { ms },
                });
            } else if let Some((conn, data)) = line.split_once("> ") {
                let conn = case.conn_index(conn, &at);
                let bytes = unescape(data).unwrap_or_else(|e| panic!("{at}: {e}"));
                case.steps.push(Step::Send { conn, bytes });
            } else {
                panic!("{at}: cannot parse {line:?} (expected conn, close, sleep, at, config: or `name> bytes`)");
            }
        }
        assert!(
            !case.about.is_empty(),
            "{}: start with a `# what this checks` line",
            path.display()
        );
        case
    }

    /// Whether the case is about server timers (its steps are scheduled in time).
    fn is_timed(&self) -> bool {
        self.steps
            .iter()
            .any(|step| matches!(step, Step::Sleep { .. } | Step::At { .. }))
    }

    fn conn_index(&self, name: &str, at: &str) -> usize {
        self.conn_names
            .iter()
            .position(|c| c == name)
            .unwrap_or_else(|| panic!("{at}: connection {name:?} used before `conn {name}`"))
    }

    fn step_label(&self, step: &Step) -> String {
        match step {
            Step::Connect { conn } => format!("conn {}", self.conn_names[*conn]),
            Step::Send { conn, bytes } => format!("{}> {}", self.conn_names[*conn], escape(bytes)),
            Step::Close { conn } => format!("close {}", self.conn_names[*conn]),
            Step::Sleep { ms } => format!("sleep {ms}"),
            Step::At { ms } => format!("at {ms}"),
        }
    }
}

/// Case-file escapes: `\r \n \t \0 \\ \xNN`, and `\{text*N}` for `text` repeated N
/// times (long lines); every other byte stands for itself.
fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'0') => out.push(0),
            Some(b'\\') => out.push(b'\\'),
            Some(b'{') => {
                let body: Vec<u8> = bytes.by_ref().take_while(|&b| b != b'}').collect();
                let body = String::from_utf8(body).map_err(|_| "non-UTF-8 repeat".to_string())?;
                let (text, count) = body
                    .rsplit_once('*')
                    .ok_or(format!("expected \\{{text*N}}, got {body:?}"))?;
                let count: usize = count
                    .parse()
                    .map_err(|_| format!("bad repeat count {count:?}"))?;
                out.extend(unescape(text)?.repeat(count));
            }
            Some(b'x') => {
                let hex: String = [bytes.next(), bytes.next()]
                    .iter()
                    .flatten()
                    .map(|&b| b as char)
                    .collect();
                out.push(u8::from_str_radix(&hex, 16).map_err(|_| format!("bad escape \\x{hex}"))?);
            }
            Some(other) => return Err(format!("unknown escape \\{}", other as char)),
            None => return Err("trailing backslash".into()),
        }
    }
    Ok(out)
}

/// The inverse of `unescape`, for display.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Running a case

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Perch,
    NatsServer,
}

/// What one step produced on one connection.
#[derive(PartialEq, Debug)]
struct Received {
    conn: String,
    /// Received bytes with INFO lines normalised.
    bytes: Vec<u8>,
    /// The server closed the connection during this step.
    closed: bool,
}

#[derive(PartialEq, Debug)]
struct StepRecord {
    label: String,
    received: Vec<Received>,
}

type Transcript = Vec<StepRecord>;

enum Outcome {
    Passed {
        attempts: usize,
        reference: Transcript,
        /// The first mismatch when it took a retry to pass.
        first_diff: Option<String>,
    },
    Failed {
        report: String,
        reference: Transcript,
    },
    /// The case panicked: the message.
    Crashed(String),
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic with a non-string payload".into())
}

fn check_case(case: &Case, candidate: Target) -> Outcome {
    let right = if candidate == Target::Perch {
        "perch"
    } else {
        "nats-server #2"
    };
    let mut first_diff = None;
    let mut last = None;
    for (attempt, quiet_ms) in QUIET_MS_PER_ATTEMPT.iter().enumerate() {
        // Longer quiet periods would shift a timer case's steps against the server's
        // timers and make it fail differently: those retry at the same pace.
        let quiet_ms = if case.is_timed() {
            QUIET_MS_PER_ATTEMPT[0]
        } else {
            *quiet_ms
        };
        let quiet = Duration::from_millis(quiet_ms);
        // Both sessions run at once: cases that sleep for timers take half the time.
        let (reference, observed) = std::thread::scope(|scope| {
            let reference = scope.spawn(|| run_case(case, Target::NatsServer, quiet));
            let observed = run_case(case, candidate, quiet);
            (
                reference.join().expect("reference session panicked"),
                observed,
            )
        });
        if reference == observed {
            return Outcome::Passed {
                attempts: attempt + 1,
                reference,
                first_diff,
            };
        }
        first_diff.get_or_insert_with(|| side_by_side(&reference, &observed, "nats-server", right));
        last = Some((reference, observed));
    }
    let (reference, observed) = last.expect("at least one attempt");
    let report = format!(
        "--- differential case {} FAILED: {}\n{}",
        case.name,
        case.about,
        side_by_side(&reference, &observed, "nats-server", right)
    );
    Outcome::Failed { report, reference }
}

fn start(case: &Case, target: Target) -> Server {
    // support's free_port() releases the port before the server binds it, so two
    // servers starting at once may pick the same one: a second try settles that.
    let launch = || match target {
        Target::Perch => {
            let args: Vec<String> = case
                .knobs
                .iter()
                .flat_map(|(knob, value)| [knob.perch_flag().to_string(), value.to_string()])
                .collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            if case.perch_toml.is_empty() {
                Server::perch(&args)
            } else {
                Server::perch_with_config(&case.perch_toml.join("\n"), &args)
            }
        }
        Target::NatsServer => {
            let config: Vec<String> = case
                .knobs
                .iter()
                .map(|(k, v)| k.nats_server_line(*v))
                .chain(case.nats_conf.iter().cloned())
                .collect();
            Server::nats_server(&config.join("\n"))
        }
    };
    let server = std::panic::catch_unwind(AssertUnwindSafe(launch)).unwrap_or_else(|_| launch());
    // The readiness probe was a connection too; let the server notice it closed
    // before a case counts connections.
    if case
        .knobs
        .iter()
        .any(|(k, _)| matches!(k, Knob::MaxConnections))
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    server
}

struct Conn {
    stream: Option<TcpStream>,
}

fn run_case(case: &Case, target: Target, quiet: Duration) -> Transcript {
    let server = start(case, target);
    let mut conns: Vec<Conn> = case
        .conn_names
        .iter()
        .map(|_| Conn { stream: None })
        .collect();
    let mut transcript = Vec::new();
    let mut first_connect: Option<Instant> = None;
    // nats-server sends its first PING 2 to 2.4 s (random) after accept, whatever
    // ping_interval says (unless it is shorter), and 2.9 cannot turn that off: a
    // case that runs long on a loaded machine would see it at a random step. Only
    // cases about server PINGs (they set ping_interval_ms) keep them.
    let keep_server_pings = case
        .knobs
        .iter()
        .any(|(knob, _)| matches!(knob, Knob::PingIntervalMs));
    for step in &case.steps {
        let mut awaited: Option<(usize, &[u8])> = None;
        let mut min_wait = Duration::ZERO;
        match step {
            Step::Connect { conn } => {
                first_connect.get_or_insert_with(Instant::now);
                let stream = TcpStream::connect(server.addr())
                    .unwrap_or_else(|e| panic!("{}: connect to {}: {e}", case.name, server.name));
                stream.set_nodelay(true).expect("set_nodelay");
                stream.set_nonblocking(true).expect("set_nonblocking");
                conns[*conn].stream = Some(stream);
                awaited = Some((*conn, b"\r\n"));
            }
            Step::Send { conn, bytes } => {
                if let Some(stream) = conns[*conn].stream.as_mut() {
                    // A write after the server closed may fail; what the server sent
                    // before closing is still collected below.
                    let _ = write_all_nonblocking(stream, bytes);
                }
                if bytes.ends_with(b"PING\r\n") {
                    awaited = Some((*conn, b"PONG\r\n"));
                }
            }
            Step::Close { conn } => {
                if let Some(stream) = conns[*conn].stream.take() {
                    let _ = stream.shutdown(Shutdown::Both);
                }
            }
            Step::Sleep { ms } => min_wait = Duration::from_millis(*ms),
            Step::At { ms } => {
                let origin = first_connect.expect("`at` needs a `conn` before it");
                min_wait =
                    (origin + Duration::from_millis(*ms)).saturating_duration_since(Instant::now());
            }
        }
        let received = collect(&mut conns, awaited, min_wait, quiet);
        let received = received
            .into_iter()
            .map(|(conn, bytes, closed)| {
                let mut bytes = normalise_info(&bytes);
                if !keep_server_pings {
                    bytes = drop_server_pings(&bytes);
                }
                Received {
                    conn: case.conn_names[conn].clone(),
                    bytes,
                    closed,
                }
            })
            .filter(|received| !received.bytes.is_empty() || received.closed)
            .collect();
        transcript.push(StepRecord {
            label: case.step_label(step),
            received,
        });
    }
    transcript
}

fn write_all_nonblocking(stream: &mut TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(AWAITED_REPLY_MS_MAX);
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads from every open connection until none has received anything for `quiet`
/// (and `min_wait` has passed, and the awaited reply has arrived or its time is up).
/// Returns per connection what arrived and whether the server closed it.
fn collect(
    conns: &mut [Conn],
    awaited: Option<(usize, &[u8])>,
    min_wait: Duration,
    quiet: Duration,
) -> Vec<(usize, Vec<u8>, bool)> {
    let started = Instant::now();
    let mut last_activity = started;
    let mut received: Vec<(usize, Vec<u8>, bool)> =
        (0..conns.len()).map(|i| (i, Vec::new(), false)).collect();
    let mut buf = [0u8; 16 * 1024];
    loop {
        for (index, conn) in conns.iter_mut().enumerate() {
            let Some(stream) = conn.stream.as_mut() else {
                continue;
            };
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => {
                        received[index].2 = true;
                        break;
                    }
                    Ok(n) => {
                        received[index].1.extend_from_slice(&buf[..n]);
                        last_activity = Instant::now();
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    // ECONNRESET and friends: the server is gone for this connection.
                    Err(_) => {
                        received[index].2 = true;
                        break;
                    }
                }
            }
            if received[index].2 {
                conn.stream = None;
                last_activity = Instant::now();
            }
        }
        let now = Instant::now();
        let awaited_done = match awaited {
            None => true,
            Some((index, needle)) => {
                let (_, bytes, closed) = &received[index];
                *closed
                    || conns[index].stream.is_none()
                    || bytes.windows(needle.len()).any(|w| w == needle)
                    || now - started >= Duration::from_millis(AWAITED_REPLY_MS_MAX)
            }
        };
        if awaited_done && now - last_activity >= quiet && now - started >= min_wait {
            return received;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Replaces each INFO line (at the start of a line) by the fields both servers must
/// agree on: compared keys with their values, masked keys as `*`.
fn normalise_info(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    let mut at_line_start = true;
    while !rest.is_empty() {
        if at_line_start && rest.starts_with(b"INFO ") {
            if let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
                out.extend_from_slice(&normalised_info_line(&rest[4..end]));
                out.extend_from_slice(b"\r\n");
                rest = &rest[end + 2..];
                continue;
            }
        }
        at_line_start = rest[0] == b'\n';
        out.push(rest[0]);
        rest = &rest[1..];
    }
    out
}

/// Removes `PING\r\n` lines, stepping over MSG/HMSG payloads (a payload may hold
/// the same bytes). A payload cut at the end of a step is not followed into the
/// next one; that only matters for PINGs inside such a payload, dropped on both
/// sides alike.
fn drop_server_pings(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        let line_len = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(rest.len(), |i| i + 2);
        let (line, after) = rest.split_at(line_len);
        if line == b"PING\r\n" {
            rest = after;
            continue;
        }
        let payload_len = if line.starts_with(b"MSG ") || line.starts_with(b"HMSG ") {
            // The last argument is the total size; the payload ends with CRLF.
            std::str::from_utf8(line)
                .ok()
                .and_then(|l| l.split_ascii_whitespace().last())
                .and_then(|size| size.parse::<usize>().ok())
                .map_or(0, |size| (size + 2).min(after.len()))
        } else {
            0
        };
        out.extend_from_slice(line);
        out.extend_from_slice(&after[..payload_len]);
        rest = &after[payload_len..];
    }
    out
}

/// `args` is what follows `INFO` up to the CRLF. The blanks around the JSON are kept
/// as they are: nats-server ends the line with `} \r\n`.
fn normalised_info_line(args: &[u8]) -> Vec<u8> {
    let is_blank = |b: &u8| *b == b' ' || *b == b'\t';
    let lead = args.iter().take_while(|b| is_blank(b)).count();
    let trail = args[lead..]
        .iter()
        .rev()
        .take_while(|b| is_blank(b))
        .count();
    let json = &args[lead..args.len() - trail];
    let mut line = b"INFO".to_vec();
    line.extend_from_slice(&args[..lead]);
    line.extend_from_slice(normalised_info_json(json).as_bytes());
    line.extend_from_slice(&args[args.len() - trail..]);
    line
}

fn normalised_info_json(json: &[u8]) -> String {
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice::<serde_json::Value>(json)
    else {
        return format!("<not a JSON object> {}", String::from_utf8_lossy(json));
    };
    let mut parts = Vec::new();
    for key in INFO_COMPARED_KEYS {
        if let Some(value) = fields.get(key) {
            parts.push(format!("{key}:{value}"));
        }
    }
    for key in INFO_MASKED_KEYS {
        if fields.contains_key(key) {
            parts.push(format!("{key}:*"));
        }
    }
    // A nonce differs per connection; its presence and length are compared.
    if let Some(nonce) = fields.get("nonce") {
        let chars = nonce.as_str().map_or(0, str::len);
        parts.push(format!("nonce:<{chars} chars>"));
    }
    format!("{{{}}}", parts.join(","))
}

// ---------------------------------------------------------------------------
// Display

/// One transcript as text: the step, then what each connection received.
fn render(transcript: &Transcript) -> String {
    let mut out = String::new();
    for step in transcript {
        out.push_str(&format!("  {}\n", truncate(&step.label, 100)));
        for line in received_lines(step) {
            out.push_str(&format!("      {line}\n"));
        }
    }
    out
}

/// The lines displayed for one step's received bytes: one per protocol line.
fn received_lines(step: &StepRecord) -> Vec<String> {
    let mut lines = Vec::new();
    for received in &step.received {
        let text = escape(&received.bytes);
        for piece in text.split_inclusive("\\n") {
            lines.push(format!(
                "{} < {}",
                received.conn,
                truncate(piece, LINE_CHARS_SHOWN_MAX)
            ));
        }
        if received.closed {
            lines.push(format!("{} <closed by server>", received.conn));
        }
    }
    lines
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let kept: String = text.chars().take(width).collect();
    format!("{kept}…(+{})", text.chars().count() - width)
}

/// Renders two transcripts step by step, side by side; `!` marks steps that differ.
fn side_by_side(
    left: &Transcript,
    right: &Transcript,
    left_name: &str,
    right_name: &str,
) -> String {
    const COLUMN: usize = 58;
    let mut out = format!("    {:<COLUMN$} | {right_name}\n", left_name);
    for index in 0..left.len().max(right.len()) {
        let (l, r) = (left.get(index), right.get(index));
        let differs = l != r;
        let label = l.or(r).map(|s| s.label.as_str()).unwrap_or_default();
        out.push_str(&format!(
            "{} {}\n",
            if differs { "!" } else { " " },
            truncate(label, 110)
        ));
        let wrap = |lines: Vec<String>| -> Vec<String> {
            lines
                .into_iter()
                .flat_map(|line| {
                    let chars: Vec<char> = line.chars().collect();
                    chars
                        .chunks(COLUMN)
                        .map(|c| c.iter().collect::<String>())
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let lines = |step: Option<&StepRecord>| {
            let lines = step.map(received_lines).unwrap_or_default();
            if differs && lines.is_empty() {
                vec!["(nothing)".to_string()]
            } else {
                wrap(lines)
            }
        };
        let (l_lines, r_lines) = (lines(l), lines(r));
        for row in 0..l_lines.len().max(r_lines.len()) {
            let a = l_lines.get(row).map(String::as_str).unwrap_or("");
            let b = r_lines.get(row).map(String::as_str).unwrap_or("");
            let mark = if differs && a != b { "!" } else { " " };
            out.push_str(&format!("{mark}   {a:<COLUMN$} | {b}\n"));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The harness's own checks (no servers).

#[test]
fn differential_case_escapes_round_trip() {
    let bytes = unescape(r"PUB a\t2\r\n\0\xff\\\{ab*3}").expect("valid escapes");
    assert_eq!(bytes, b"PUB a\t2\r\n\0\xff\\ababab");
    assert_eq!(
        unescape(&escape(&bytes)).expect("escape output is valid"),
        bytes
    );
    assert!(unescape(r"\q").is_err());
    assert!(unescape(r"\{ab}").is_err());
}

#[test]
fn differential_info_is_masked_but_keeps_compared_values() {
    let line = br#"INFO {"server_id":"X","version":"2.9.10","proto":1,"headers":true,"max_payload":16,"port":1,"go":"go1"} "#;
    let mut bytes = line.to_vec();
    bytes.extend_from_slice(b"\r\nPONG\r\n");
    assert_eq!(
        String::from_utf8(normalise_info(&bytes)).expect("ASCII"),
        "INFO {proto:1,headers:true,max_payload:16,server_id:*,version:*,port:*} \r\nPONG\r\n"
    );
    // Only lines that start with INFO are touched.
    assert_eq!(
        normalise_info(b"MSG a 1 5\r\nINFO \r\n"),
        b"MSG a 1 5\r\nINFO <not a JSON object> \r\n"
    );
}

#[test]
fn differential_server_pings_are_dropped_outside_payloads() {
    let bytes =
        b"PING\r\nMSG a 1 6\r\nPING\r\n\r\nPING\r\nHMSG a 1 12 12\r\nNATS/1.0\r\n\r\n\r\nPONG\r\n";
    assert_eq!(
        drop_server_pings(bytes),
        b"MSG a 1 6\r\nPING\r\n\r\nHMSG a 1 12 12\r\nNATS/1.0\r\n\r\n\r\nPONG\r\n"
    );
}
