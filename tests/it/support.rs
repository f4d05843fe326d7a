//! Boots real brokers for the integration tests: perch (the binary cargo built for
//! this test run) and Debian's nats-server as the reference. Each server gets a free
//! loopback port, is waited for until it accepts, and is killed on drop.
//!
//! The I/O backend perch runs on comes from `PERCH_IO` (uring, epoll or auto), so the
//! same suite runs once per backend (tests/run.sh does both).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to start accepting before the test fails.
const STARTUP_MS_MAX: u64 = 10_000;

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
        let child = Command::new(env!("CARGO_BIN_EXE_perch"))
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("PERCH_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn perch");
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
                if BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO ")
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

/// A port that was free a moment ago (bind to :0, read it, release it).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind :0");
    listener.local_addr().expect("local addr").port()
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
