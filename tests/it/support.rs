//! Boots real brokers for the integration tests: perch (the binary cargo built for
//! this test run) and Debian's nats-server as the reference. Each server gets a free
//! loopback port, is waited for until it accepts, and is killed on drop.
//!
//! The I/O backend perch runs on comes from `PERCH_IO` (uring, epoll or auto), so the
//! same suite runs once per backend (tests/run.sh does both).
//!
//! `PERCH_BIN` runs another perch binary than the one cargo built (a
//! cross-compiled one), and `PERCH_RUNNER` puts a command in front of it, e.g.
//! `qemu-aarch64-static -L /usr/aarch64-linux-gnu` to run an aarch64 build
//! under emulation (tests/run.sh's `cross` steps).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to start accepting before the test fails.
const STARTUP_MS_MAX: u64 = 10_000;

/// A command that runs perch: `PERCH_BIN` (default: the binary cargo built for
/// this test run) behind `PERCH_RUNNER` (default: none), split on whitespace.
/// With a qemu-user runner the child is the emulated process itself, so its pid
/// takes signals (SIGTERM, SIGKILL) as perch would.
pub fn perch_command() -> Command {
    let binary = std::env::var_os("PERCH_BIN")
        .filter(|b| !b.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_perch")));
    let runner = std::env::var("PERCH_RUNNER").unwrap_or_default();
    let mut runner = runner.split_whitespace();
    match runner.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(runner).arg(binary);
            command
        }
        None => Command::new(binary),
    }
}

pub struct Server {
    child: Child,
    pub port: u16,
    pub name: &'static str,
    _config_dir: Option<TempDir>,
}

impl Server {
    /// Starts perch with round-robin placement (so consecutive connections land on
    /// different shards), 2 shards unless `extra` says `--shards`, plus `extra`.
    pub fn perch(extra: &[&str]) -> Server {
        Server::perch_with_log(extra, None)
    }

    /// [`Server::perch`] with a TOML config file holding `toml`.
    pub fn perch_with_config(toml: &str, extra: &[&str]) -> Server {
        let dir = TempDir::new("perch-config");
        let path = dir.path.join("perch.toml");
        std::fs::write(&path, toml).expect("write perch config");
        let path = path.to_string_lossy().into_owned();
        let mut args = vec!["--config", path.as_str()];
        args.extend_from_slice(extra);
        let mut server = Server::perch(&args);
        server._config_dir = Some(dir);
        server
    }

    /// [`Server::perch_with_config`] for a server that sends no plain-text
    /// INFO (`[tls] handshake_first`): ready once it accepts connections.
    pub fn perch_with_config_silent(toml: &str, extra: &[&str]) -> Server {
        let dir = TempDir::new("perch-config");
        let path = dir.path.join("perch.toml");
        std::fs::write(&path, toml).expect("write perch config");
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let io = std::env::var("PERCH_IO").unwrap_or_else(|_| "auto".into());
        let mut command = perch_command();
        command
            .args(["serve", "--listen", &listen, "--io", &io, "--shards", "2"])
            .args(["--placement", "round-robin", "--config"])
            .arg(&path)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("PERCH_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null());
        let mut child = command.spawn().expect("spawn perch");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("perch exited during startup: {status}");
            }
            if started.elapsed() >= Duration::from_millis(STARTUP_MS_MAX) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("perch did not accept on port {port} within {STARTUP_MS_MAX} ms");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Server {
            child,
            port,
            name: "perch",
            _config_dir: Some(dir),
        }
    }

    fn perch_with_log(extra: &[&str], log: Option<&Path>) -> Server {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let io = std::env::var("PERCH_IO").unwrap_or_else(|_| "auto".into());
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            listen,
            "--io".into(),
            io,
            "--placement".into(),
            "round-robin".into(),
        ];
        if !extra.contains(&"--shards") {
            args.extend(["--shards".into(), "2".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut command = perch_command();
        command
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("PERCH_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null());
        if let Some(log) = log {
            command.stdout(append_log(log)).stderr(append_log(log));
        }
        let child = command.spawn().expect("spawn perch");
        Server::wait_ready(child, port, "perch", None)
    }

    /// Starts Debian's nats-server with `config` (nats-server config syntax, may be
    /// empty) on a free loopback port. Fails the test if nats-server is missing:
    /// tests/run.sh installs it.
    pub fn nats_server(config: &str) -> Server {
        let port = free_port();
        let dir = TempDir::new("nats-server");
        let conf = dir.path.join("nats.conf");
        std::fs::write(&conf, config).expect("write nats-server config");
        let child = Command::new(nats_server_path())
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-c"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is not installed: run `bash tests/run.sh`, which installs it");
        Server::wait_ready(child, port, "nats-server", Some(dir))
    }

    fn wait_ready(mut child: Child, port: u16, name: &'static str, dir: Option<TempDir>) -> Server {
        let started = Instant::now();
        loop {
            // A server is ready once it sends its INFO line.
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) {
                stream
                    .set_read_timeout(Some(Duration::from_millis(500)))
                    .ok();
                let mut line = String::new();
                // Our child must still be running: an INFO from a port another
                // process holds is not our server's.
                if BufReader::new(stream).read_line(&mut line).is_ok()
                    && line.starts_with("INFO ")
                    && matches!(child.try_wait(), Ok(None))
                {
                    return Server {
                        child,
                        port,
                        name,
                        _config_dir: dir,
                    };
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{name} exited during startup: {status}");
            }
            if started.elapsed() >= Duration::from_millis(STARTUP_MS_MAX) {
                // Not yet a Server, so no Drop kills it: without this the process
                // outlives the test (seen: 166 stray brokers after one bad run).
                let _ = child.kill();
                let _ = child.wait();
                panic!("{name} did not accept on port {port} within {STARTUP_MS_MAX} ms");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Sends SIGTERM and waits for the exit status (graceful shutdown tests).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait for server");
        std::mem::forget(self._config_dir.take());
        status
    }

    /// Sends SIGTERM and waits for the exit status, keeping the Server (so its
    /// temp dir is still removed on drop).
    pub fn sigterm_and_wait(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own, not yet reaped, child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().expect("wait for server")
    }

    /// The server process's id (for signals sent by the tests).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The config file of a [`Server::perch_with_config`] server.
    pub fn config_path(&self) -> PathBuf {
        self._config_dir
            .as_ref()
            .expect("a server started with a config file")
            .path
            .join("perch.toml")
    }

    /// Rewrites the config file and sends SIGHUP (the reload is asynchronous:
    /// callers wait for its effect).
    pub fn reload_with(&self, toml: &str) {
        std::fs::write(self.config_path(), toml).expect("rewrite perch config");
        // SAFETY: kill(2) on our own, not yet reaped, child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
    }

    /// SIGKILLs the server and reaps it: no shutdown code runs, only what the
    /// kernel already has survives (a crash, not a power cut).
    pub fn kill9(mut self) {
        // SAFETY: kill(2) on our own, not yet reaped, child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let status = self.child.wait().expect("wait for killed server");
        assert!(
            !status.success(),
            "{} exited successfully instead of being killed",
            self.name
        );
    }

    /// nats-server with JetStream on (`-js`), its store in `store_dir`, plus the
    /// nats-server config text `extra_config` (may be empty). stdout and stderr
    /// go to `log` (appended), so a failing test can show them.
    pub fn jetstream_reference(store_dir: &Path, extra_config: &str, log: &Path) -> Server {
        let port = free_port();
        let dir = TempDir::new("nats-server-js");
        let conf = dir.path.join("nats.conf");
        std::fs::write(&conf, extra_config).expect("write nats-server config");
        let child = Command::new(nats_server_path())
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store_dir)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(append_log(log))
            .stderr(append_log(log))
            .spawn()
            .expect("nats-server is not installed: run `bash tests/run.sh`, which installs it");
        Server::wait_ready(child, port, "nats-server -js", Some(dir))
    }

    /// perch with JetStream on: `--store-dir store_dir`, plus what
    /// [`Server::perch`] always passes (2 shards, round-robin placement, the
    /// backend from `PERCH_IO`). Its stderr goes to `log` (appended).
    pub fn perch_js(store_dir: &Path, log: &Path) -> Server {
        let store = store_dir.to_str().expect("utf-8 store dir");
        Server::perch_with_log(&["--store-dir", store], Some(log))
    }

    /// The server's resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn append_log(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()))
}

/// The broker a JetStream test runs against: every JetStream test is written
/// once, taking this, and instantiated per broker (see `js_tests!` in
/// jetstream.rs and the switch in main.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Js {
    /// Debian's nats-server with `-js`: the reference the tests are proven on.
    Reference,
    /// perch with `--store-dir`.
    Perch,
}

/// A JetStream broker with its own store directory, which outlives the broker
/// process: stop or kill it and start it again on the same store. Each start
/// picks a fresh port (so reconnect through [`JsBroker::url`]); the store and
/// the logs of every start live in one temp dir removed on drop.
pub struct JsBroker {
    pub kind: Js,
    root: TempDir,
    server: Option<Server>,
    starts: u32,
    /// nats-server config text for the reference (ignored for perch).
    reference_config: String,
}

impl JsBroker {
    pub fn start(kind: Js) -> JsBroker {
        JsBroker::start_with(kind, "")
    }

    /// Starts with extra nats-server config text for the reference (e.g. a
    /// `jetstream { ... }` block); perch ignores it.
    pub fn start_with(kind: Js, reference_config: &str) -> JsBroker {
        let root = TempDir::new(match kind {
            Js::Reference => "js-ref",
            Js::Perch => "js-perch",
        });
        std::fs::create_dir_all(root.path.join("store")).expect("create store dir");
        let mut broker = JsBroker {
            kind,
            root,
            server: None,
            starts: 0,
            reference_config: reference_config.to_string(),
        };
        broker.boot();
        broker
    }

    fn boot(&mut self) {
        assert!(self.server.is_none(), "broker already running");
        self.starts += 1;
        let log = self.log_path();
        let store = self.store_dir();
        self.server = Some(match self.kind {
            Js::Reference => Server::jetstream_reference(&store, &self.reference_config, &log),
            Js::Perch => Server::perch_js(&store, &log),
        });
    }

    /// The store directory every start of this broker uses.
    pub fn store_dir(&self) -> PathBuf {
        self.root.path.join("store")
    }

    fn log_path(&self) -> PathBuf {
        self.root.path.join(format!("server-{}.log", self.starts))
    }

    /// The log of the current (or last) start, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let cut = text.len().saturating_sub(4000);
        let cut = (cut..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[cut..].to_string()
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("broker is not running")
    }

    pub fn url(&self) -> String {
        self.server().url()
    }

    /// Graceful stop (SIGTERM), requiring exit status 0.
    pub fn stop(&mut self) {
        let mut server = self.server.take().expect("broker is not running");
        let name = server.name;
        let status = server.sigterm_and_wait();
        // nats-server 2.9.10 exits 1 after a clean SIGTERM shutdown, or 0 when the
        // signal lands early in its shutdown (seen under CI load); perch must exit 0.
        let clean = match self.kind {
            Js::Reference => matches!(status.code(), Some(0 | 1)),
            Js::Perch => status.success(),
        };
        assert!(
            clean,
            "{name} exited with {status} on SIGTERM; log:\n{}",
            self.log_tail()
        );
    }

    /// SIGKILL: the process dies wherever it is.
    pub fn kill9(&mut self) {
        self.server.take().expect("broker is not running").kill9();
    }

    /// Starts again on the same store directory (after `stop` or `kill9`).
    pub fn start_again(&mut self) {
        self.boot();
    }

    /// `stop` then `start_again`.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub fn nats_server_path() -> PathBuf {
    std::env::var_os("NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

/// A port that was free a moment ago and that no other test of this process got.
/// (Binding :0 and releasing it can hand two parallel tests the same port; the
/// second server then fails to bind and the test talks to the first one.) Ports
/// come from a per-process counter starting at a pid-derived base, skipping any
/// that cannot be bound.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Below Linux's ephemeral range (32768–60999 by default): a port handed
    // out here must not be taken by some client socket's outgoing connection
    // before the server binds it (seen: nats-server failing to restart on one).
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = (std::process::id() % 120) * 100;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (base + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A raw protocol connection for byte-level tests.
pub struct Raw {
    pub stream: TcpStream,
}

impl Raw {
    /// Connects and consumes the INFO line.
    pub fn connect(server: &Server) -> Raw {
        let stream = TcpStream::connect(server.addr()).expect("connect");
        stream.set_nodelay(true).ok();
        let mut raw = Raw { stream };
        let info = raw.read_line();
        assert!(info.starts_with("INFO {"), "expected INFO, got {info:?}");
        raw
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Reads one CRLF-terminated line (without the CRLF), failing after 5 s.
    /// Server PINGs (the first comes 2 s after connect) are answered and skipped,
    /// so long tests see only what they wait for.
    pub fn read_line(&mut self) -> String {
        loop {
            let line = self.read_line_exact();
            if line != "PING" {
                return line;
            }
            self.send(b"PONG\r\n");
        }
    }

    /// Reads one line as it comes, server PINGs included.
    pub fn read_line_exact(&mut self) -> String {
        self.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .ok();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            match self.stream.read(&mut byte) {
                Ok(1) => line.push(byte[0]),
                Ok(_) => panic!(
                    "connection closed after {:?}",
                    String::from_utf8_lossy(&line)
                ),
                Err(e) => panic!(
                    "read failed after {:?}: {e}",
                    String::from_utf8_lossy(&line)
                ),
            }
        }
        line.truncate(line.len() - 2);
        String::from_utf8_lossy(&line).into_owned()
    }

    /// Reads until the peer closes (or `timeout`), returning everything received and
    /// whether the connection was closed by the server.
    pub fn read_until_closed(&mut self, timeout: Duration) -> (Vec<u8>, bool) {
        let deadline = Instant::now() + timeout;
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (all, false);
            }
            self.stream.set_read_timeout(Some(left)).ok();
            match self.stream.read(&mut buf) {
                Ok(0) => return (all, true),
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (all, true),
                Err(_) => return (all, false),
            }
        }
    }
}

/// Runs `perch serve` with `toml` as its config file (written into `dir`),
/// asserts it refuses to start, and returns what it said on stderr.
pub fn perch_refuses_config(dir: &Path, toml: &str) -> String {
    let path = dir.join("refused.toml");
    std::fs::write(&path, toml).expect("write config");
    let out = perch_command()
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .output()
        .expect("run perch");
    assert!(!out.status.success(), "perch started with {toml}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A temporary directory removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "perch-test-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
