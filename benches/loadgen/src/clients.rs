//! Scenarios driven by official NATS clients instead of the raw generator:
//! nats.go (Debian's golang-github-nats-io-go-nats-dev) and the C client
//! libnats (Debian's libnats-dev). Their programs live in `benches/clients/`;
//! the loadgen builds them once per run (`go build`, `gcc`) and runs one per
//! scenario run against the server under test.
//!
//! A client program reports on stdout, one event per line:
//!
//! ```text
//! ready connect_ns=N
//! window-start
//! window-end delivered=N published=N elapsed_ns=N
//! done delivered=N published=N
//! ```
//!
//! The loadgen reads the server's (and the client's) CPU time from /proc when
//! `window-start` and `window-end` arrive, so the CPU window is the client's
//! measured window. A missing tool or library, a failed build, an exit
//! status other than 0, a line out of order or a run past its deadline fails
//! loudly; nothing is skipped.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::scenarios::{CpuUse, CpuWindow, Measurement, Params};
use crate::server::{proc_cpu_time, RunningServer};

/// The client programs' sources, next to this crate.
const CLIENTS_SRC_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../clients");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    NatsGo,
    Libnats,
}

/// The traffic a client program generates (its `-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// 1 publisher → 1 subscriber, duration-bound, windowed.
    PubSub,
    /// Many device connections each publishing a few messages → 1 subscriber.
    FanIn,
}

impl Shape {
    fn mode(self) -> &'static str {
        match self {
            Shape::PubSub => "pub-sub",
            Shape::FanIn => "fan-in",
        }
    }
}

impl Client {
    pub fn label(self) -> &'static str {
        match self {
            Client::NatsGo => "nats.go",
            Client::Libnats => "libnats (C)",
        }
    }

    fn program_name(self) -> &'static str {
        match self {
            Client::NatsGo => "perch-client-nats-go",
            Client::Libnats => "perch-client-libnats",
        }
    }
}

/// How the client programs are built, and where to.
#[derive(Clone, Debug)]
pub struct Toolchain {
    /// The `go` command (Go ≥ 1.19).
    pub go: PathBuf,
    /// GOPATH holding github.com/nats-io/nats.go and its dependencies.
    pub gopath: PathBuf,
    /// The C compiler.
    pub cc: PathBuf,
    /// Where the programs (and Go's build cache) go.
    pub out_dir: PathBuf,
}

/// The built client programs; `None` for one this run does not use.
#[derive(Clone, Debug, Default)]
pub struct ClientPrograms {
    pub nats_go: Option<PathBuf>,
    pub libnats: Option<PathBuf>,
}

impl ClientPrograms {
    fn get(&self, client: Client) -> Result<&Path> {
        let program = match client {
            Client::NatsGo => &self.nats_go,
            Client::Libnats => &self.libnats,
        };
        program
            .as_deref()
            .with_context(|| format!("the {} client program was not built", client.label()))
    }

    pub fn set(&mut self, client: Client, program: PathBuf) {
        match client {
            Client::NatsGo => self.nats_go = Some(program),
            Client::Libnats => self.libnats = Some(program),
        }
    }
}

/// Runs a build command; a missing tool or a failed build is an error with
/// the tool's own output and what to install.
fn run_build(mut command: Command, what: &str, install_hint: &str) -> Result<()> {
    let shown = format!("{command:?}");
    let output = match command.output() {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            bail!("building {what}: `{shown}`: the compiler was not found ({install_hint})")
        }
        Err(error) => return Err(error).with_context(|| format!("building {what}: `{shown}`")),
    };
    if !output.status.success() {
        bail!(
            "building {what} failed ({}): `{shown}`\n{}{}\n({install_hint})",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    Ok(())
}

/// Builds `client`'s program into the toolchain's output directory and
/// returns its path.
pub fn build(client: Client, toolchain: &Toolchain) -> Result<PathBuf> {
    std::fs::create_dir_all(&toolchain.out_dir)
        .with_context(|| format!("creating {}", toolchain.out_dir.display()))?;
    // Absolute: go runs in the package's directory and wants GOCACHE absolute.
    let out_dir = toolchain
        .out_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", toolchain.out_dir.display()))?;
    let program = out_dir.join(client.program_name());
    let src = Path::new(CLIENTS_SRC_DIR)
        .canonicalize()
        .with_context(|| format!("the client sources are not at {CLIENTS_SRC_DIR}"))?;
    match client {
        Client::NatsGo => {
            let package = toolchain.gopath.join("src/github.com/nats-io/nats.go");
            if !package.join("nats.go").is_file() {
                bail!(
                    "building the nats.go client: {} is missing (install Debian's \
                     golang-github-nats-io-go-nats-dev, or pass --gopath)",
                    package.display()
                );
            }
            let mut command = Command::new(&toolchain.go);
            // GOPATH mode does not build a package named by an absolute
            // path: build "." in its directory.
            command
                .current_dir(src.join("nats-go"))
                .args(["build", "-o"])
                .arg(&program)
                .arg(".")
                // Debian's packaged sources, GOPATH mode, no network.
                .env("GO111MODULE", "off")
                .env("GOPATH", toolchain.gopath.canonicalize()?)
                .env("GOPROXY", "off")
                .env("GOFLAGS", "")
                .env("GOTOOLCHAIN", "local")
                .env("GOCACHE", out_dir.join("go-build-cache"));
            run_build(
                command,
                "the nats.go client",
                "needs Go >= 1.19 (`--go`) and golang-github-nats-io-go-nats-dev in `--gopath`",
            )?;
        }
        Client::Libnats => {
            let mut command = Command::new(&toolchain.cc);
            command
                .args(["-O2", "-Wall", "-Wextra", "-o"])
                .arg(&program)
                .arg(src.join("libnats/perch_client.c"))
                .args(["-lnats", "-lpthread"]);
            run_build(
                command,
                "the libnats client",
                "needs a C compiler (`--cc`) and Debian's libnats-dev: <nats/nats.h>, -lnats",
            )?;
        }
    }
    Ok(program)
}

/// What `<program> -mode version` prints after "version ".
pub fn version(program: &Path) -> Result<String> {
    let output = Command::new(program)
        .args(["-mode", "version"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} -mode version", program.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    match text
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("version "))
    {
        Some(version) if output.status.success() => Ok(version.trim().to_string()),
        _ => bail!(
            "{} -mode version failed ({}): {}{}",
            program.display(),
            output.status,
            text,
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// One event line from a client program.
#[derive(Clone, Debug, PartialEq)]
enum Event {
    Ready {
        connect_ns: u64,
    },
    WindowStart,
    WindowEnd {
        delivered: u64,
        published: u64,
        elapsed_ns: u64,
    },
    Done {
        delivered: u64,
        published: u64,
    },
}

fn parse_event(line: &str) -> Result<Event> {
    let mut tokens = line.split_whitespace();
    let kind = tokens.next().unwrap_or("");
    let fields: Vec<(&str, &str)> = tokens
        .map(|token| {
            token
                .split_once('=')
                .with_context(|| format!("field {token:?} is not key=value"))
        })
        .collect::<Result<_>>()?;
    let field = |key: &str| -> Result<u64> {
        let (_, value) = fields
            .iter()
            .find(|(name, _)| *name == key)
            .with_context(|| format!("no {key}= field"))?;
        value
            .parse()
            .with_context(|| format!("{key}={value} is not a count"))
    };
    Ok(match kind {
        "ready" => Event::Ready {
            connect_ns: field("connect_ns")?,
        },
        "window-start" => Event::WindowStart,
        "window-end" => Event::WindowEnd {
            delivered: field("delivered")?,
            published: field("published")?,
            elapsed_ns: field("elapsed_ns")?,
        },
        "done" => Event::Done {
            delivered: field("delivered")?,
            published: field("published")?,
        },
        _ => bail!("unknown event"),
    })
}

/// The client process; killed (by its pid, it is our child) if still running
/// when dropped.
struct ClientProcess(Child);

impl Drop for ClientProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The last lines of a client's stderr, for error messages.
fn tail(text: &str, line_count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(line_count)..].join(" | ")
}

/// Runs `client`'s program in `shape` against `server` and turns its events
/// into the scenario's metrics.
pub fn run(
    server: &RunningServer,
    params: &Params,
    client: Client,
    shape: Shape,
) -> Result<Measurement> {
    let program = params.clients.get(client)?;
    let mut command = Command::new(program);
    command
        .arg("-mode")
        .arg(shape.mode())
        .arg("-url")
        .arg(format!("nats://{}", server.addr))
        .arg("-payload")
        .arg(params.payload_bytes.to_string())
        .arg("-warmup-ms")
        .arg(params.warmup.as_millis().to_string())
        .arg("-duration-ms")
        .arg(params.duration.as_millis().max(1).to_string())
        .arg("-window")
        .arg(params.window_msgs.max(1).to_string())
        .arg("-devices")
        .arg(params.fan_in_devices.max(1).to_string())
        .arg("-msgs-per-device")
        .arg(params.fan_in_msgs_per_device.max(1).to_string())
        .arg("-connect-threads")
        .arg(params.connect_threads.max(1).to_string())
        .arg("-timeout-ms")
        .arg(params.timeout.as_millis().max(1).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!("{command:?}");
    let mut process = ClientProcess(
        command
            .spawn()
            .with_context(|| format!("starting the {} client: `{shown}`", client.label()))?,
    );
    let client_pid = process.0.id().to_string();
    let stdout = process.0.stdout.take().context("client stdout")?;
    let mut stderr = process.0.stderr.take().context("client stderr")?;
    let (line_sender, lines) = mpsc::channel();
    let stdout_reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let end = line.is_err();
            if line_sender.send(line).is_err() || end {
                break;
            }
        }
    });
    let stderr_reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    // The client bounds itself at warm-up + duration + 4 × timeout; this is
    // the backstop for a client that hangs anyway.
    let deadline = Instant::now()
        + params.warmup
        + params.duration
        + 5 * params.timeout
        + Duration::from_secs(5);
    let run = match follow_events(&lines, deadline, server, &client_pid) {
        Ok(run) => run,
        Err(error) => {
            // Kill it first: its pipes then close and the readers end.
            drop(process);
            let stderr_text = stderr_reader.join().unwrap_or_default();
            let _ = stdout_reader.join();
            if stderr_text.trim().is_empty() {
                return Err(error.context(format!("the {} client failed", client.label())));
            }
            bail!(
                "the {} client failed: {} ({error:#})",
                client.label(),
                tail(&stderr_text, 5)
            );
        }
    };
    let status = loop {
        if let Some(status) = process.0.try_wait().context("polling the client")? {
            break status;
        }
        if Instant::now() >= deadline {
            bail!(
                "the {} client did not exit after its last line",
                client.label()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stderr_text = stderr_reader.join().unwrap_or_default();
    let _ = stdout_reader.join();
    if !status.success() {
        bail!(
            "the {} client exited with {status} after reporting: {}",
            client.label(),
            tail(&stderr_text, 5)
        );
    }
    let mut measurement = vec![
        (
            "delivered_msgs_per_s",
            run.delivered_in_window as f64 / (run.elapsed_ns.max(1) as f64 / 1e9),
        ),
        (
            "server_cpu_s_per_m_delivered",
            run.cpu.server_s_per_million(run.delivered_in_window)?,
        ),
    ];
    if shape == Shape::FanIn {
        measurement.push(("connect_s", run.connect_ns as f64 / 1e9));
    }
    measurement.push(("server_cpu_cores", run.cpu.server_cores()));
    measurement.push((
        "client_cpu_cores",
        run.client_cpu.as_secs_f64() / run.cpu.wall.as_secs_f64().max(1e-9),
    ));
    Ok(measurement)
}

/// What a client run reported, with the CPU used over its window.
struct ClientRun {
    connect_ns: u64,
    delivered_in_window: u64,
    elapsed_ns: u64,
    cpu: CpuUse,
    client_cpu: Duration,
}

/// Reads the client's lines in order — ready, window-start, window-end,
/// done — sampling CPU time at window-start and window-end, until its
/// stdout closes.
fn follow_events(
    lines: &mpsc::Receiver<std::io::Result<String>>,
    deadline: Instant,
    server: &RunningServer,
    client_pid: &str,
) -> Result<ClientRun> {
    let mut connect_ns = None;
    let mut window: Option<(CpuWindow, Duration)> = None;
    let mut measured: Option<(u64, u64, CpuUse, Duration)> = None;
    let mut done = false;
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(wait) {
            Ok(line) => line.context("reading the client's stdout")?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("the client was still running at the scenario deadline")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let event = parse_event(&line)
            .with_context(|| format!("unexpected line from the client: {line:?}"))?;
        match event {
            Event::Ready { connect_ns: ns } if connect_ns.is_none() => connect_ns = Some(ns),
            Event::WindowStart if connect_ns.is_some() && window.is_none() => {
                let cpu = CpuWindow::start(server)?;
                window = Some((cpu, proc_cpu_time(client_pid)?));
            }
            Event::WindowEnd {
                delivered,
                published: _,
                elapsed_ns,
            } if measured.is_none() => {
                let client_end = proc_cpu_time(client_pid)?;
                let (cpu, client_start) =
                    window.take().context("window-end before window-start")?;
                let cpu = cpu.finish(server)?;
                measured = Some((
                    delivered,
                    elapsed_ns,
                    cpu,
                    client_end.saturating_sub(client_start),
                ));
            }
            Event::Done {
                delivered,
                published,
            } if measured.is_some() && !done => {
                if delivered != published {
                    bail!("the client reported {delivered} delivered of {published} published");
                }
                done = true;
            }
            _ => bail!("line out of order from the client: {line:?}"),
        }
    }
    let (delivered_in_window, elapsed_ns, cpu, client_cpu) = match (measured, done) {
        (Some(measured), true) => measured,
        _ => bail!("the client's output ended before its `done` line"),
    };
    Ok(ClientRun {
        connect_ns: connect_ns.unwrap_or(0),
        delivered_in_window,
        elapsed_ns,
        cpu,
        client_cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::{parse_event, Event};

    #[test]
    fn parses_client_events() {
        assert_eq!(
            parse_event("ready connect_ns=12").unwrap(),
            Event::Ready { connect_ns: 12 }
        );
        assert_eq!(parse_event("window-start").unwrap(), Event::WindowStart);
        assert_eq!(
            parse_event("window-end delivered=5 published=6 elapsed_ns=7").unwrap(),
            Event::WindowEnd {
                delivered: 5,
                published: 6,
                elapsed_ns: 7
            }
        );
        assert_eq!(
            parse_event("done published=3 delivered=3").unwrap(),
            Event::Done {
                delivered: 3,
                published: 3
            }
        );
        assert!(parse_event("window-end delivered=5").is_err());
        assert!(parse_event("done delivered=x published=1").is_err());
        assert!(parse_event("hello").is_err());
    }
}
