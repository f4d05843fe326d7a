//! Starting and stopping the servers under test (perch and nats-server) on a
//! fresh loopback port, and reading their memory and CPU use from /proc.

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::proto::{Conn, SMALL_READ_BUFFER_BYTES};

/// How long a server may take to accept its first connection.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to exit after SIGTERM before it is killed.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// How to run one server under test.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    /// Name in tables and JSON: "perch" or "nats-server".
    pub label: &'static str,
    pub program: PathBuf,
    pub flavor: Flavor,
}

#[derive(Clone, Debug)]
pub enum Flavor {
    Perch {
        shards: usize,
        extra_args: Vec<String>,
    },
    NatsServer {
        extra_args: Vec<String>,
    },
}

impl ServerSpec {
    /// The command line; with `store_dir`, JetStream on with that store and
    /// each server's default durability (perch: `--store-dir DIR`, fsync
    /// before every ack; nats-server: `-js -sd DIR`, sync every 2 minutes);
    /// with `device_udp_port`, perch also serves the device protocol there
    /// (`--device-udp 127.0.0.1:PORT`; nats-server has no equivalent).
    fn args(
        &self,
        port: u16,
        store_dir: Option<&Path>,
        device_udp_port: Option<u16>,
    ) -> Vec<String> {
        match &self.flavor {
            Flavor::Perch { shards, extra_args } => {
                let mut args = vec![
                    "serve".to_string(),
                    "--listen".to_string(),
                    format!("127.0.0.1:{port}"),
                    "--shards".to_string(),
                    shards.to_string(),
                ];
                if let Some(store_dir) = store_dir {
                    args.push("--store-dir".to_string());
                    args.push(store_dir.display().to_string());
                }
                if let Some(device_udp_port) = device_udp_port {
                    args.push("--device-udp".to_string());
                    args.push(format!("127.0.0.1:{device_udp_port}"));
                }
                args.extend(extra_args.iter().cloned());
                args
            }
            Flavor::NatsServer { extra_args } => {
                let mut args = vec![
                    "-a".to_string(),
                    "127.0.0.1".to_string(),
                    "-p".to_string(),
                    port.to_string(),
                ];
                if let Some(store_dir) = store_dir {
                    args.push("-js".to_string());
                    args.push("-sd".to_string());
                    args.push(store_dir.display().to_string());
                }
                args.extend(extra_args.iter().cloned());
                args
            }
        }
    }

    /// The same server with a config file: `--config` for perch, `-c` for
    /// nats-server (the TLS scenarios' certificate).
    pub fn with_config(&self, perch_config: &Path, nats_config: &Path) -> ServerSpec {
        let mut spec = self.clone();
        match &mut spec.flavor {
            Flavor::Perch { extra_args, .. } => {
                extra_args.extend(["--config".to_string(), perch_config.display().to_string()])
            }
            Flavor::NatsServer { extra_args } => {
                extra_args.extend(["-c".to_string(), nats_config.display().to_string()])
            }
        }
        spec
    }

    /// Starts the server with stdout and stderr in `log_path` (and, with
    /// `store_dir`, JetStream storing there; with `device_udp`, perch serving
    /// devices on a fresh UDP port) and waits until it sends INFO on a fresh
    /// connection.
    pub fn start(
        &self,
        log_path: &Path,
        store_dir: Option<&Path>,
        device_udp: bool,
    ) -> Result<RunningServer> {
        let port = free_loopback_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let device_udp_port = match self.flavor {
            Flavor::Perch { .. } if device_udp => Some(free_loopback_udp_port()?),
            _ => None,
        };
        let log = File::create(log_path)
            .with_context(|| format!("creating server log {}", log_path.display()))?;
        let log_for_stderr = log.try_clone().context("duplicating the log handle")?;
        let args = self.args(port, store_dir, device_udp_port);
        let child = Command::new(&self.program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} as `{} {}`",
                    self.label,
                    self.program.display(),
                    args.join(" ")
                )
            })?;
        let mut server = RunningServer {
            label: self.label,
            child,
            addr,
            log_path: log_path.to_path_buf(),
            store_dir: store_dir.map(Path::to_path_buf),
            device_udp: device_udp_port.map(|port| SocketAddr::from(([127, 0, 0, 1], port))),
        };
        server.wait_until_ready()?;
        Ok(server)
    }
}

fn free_loopback_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener
        .local_addr()
        .context("reading the bound port")?
        .port())
}

fn free_loopback_udp_port() -> Result<u16> {
    let socket = UdpSocket::bind("127.0.0.1:0").context("finding a free UDP port")?;
    Ok(socket
        .local_addr()
        .context("reading the bound UDP port")?
        .port())
}

/// A server process started by the loadgen; stopped on drop.
pub struct RunningServer {
    pub label: &'static str,
    child: Child,
    pub addr: SocketAddr,
    pub log_path: PathBuf,
    /// Where its JetStream store is, when it has one.
    pub store_dir: Option<PathBuf>,
    /// perch's device-protocol UDP address, when started with one.
    pub device_udp: Option<SocketAddr>,
}

impl RunningServer {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_until_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().context("polling the server")? {
                bail!(
                    "{} exited ({status}) before accepting connections; its log:\n{}",
                    self.label,
                    self.log_tail(20)
                );
            }
            let attempt_deadline = Instant::now() + Duration::from_millis(500);
            match Conn::open(self.addr, SMALL_READ_BUFFER_BYTES, attempt_deadline) {
                Ok(_) => return Ok(()),
                Err(error) if Instant::now() >= deadline => {
                    return Err(error).with_context(|| {
                        format!(
                            "{} did not send INFO on {} within {STARTUP_TIMEOUT:?}; its log:\n{}",
                            self.label,
                            self.addr,
                            self.log_tail(20)
                        )
                    })
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Current resident set size in KiB (VmRSS).
    pub fn rss_kib(&self) -> Result<u64> {
        proc_status_kib(self.pid(), "VmRSS")
    }

    /// Peak resident set size since the process started, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> Result<u64> {
        proc_status_kib(self.pid(), "VmHWM")
    }

    /// CPU time (user + system, all threads) used so far.
    pub fn cpu_time(&self) -> Result<Duration> {
        proc_cpu_time(&self.pid().to_string())
    }

    /// The server's log without terminal colour codes ("" if unreadable).
    fn log_text(&self) -> String {
        let mut raw = Vec::new();
        if let Ok(mut file) = File::open(&self.log_path) {
            let _ = file.read_to_end(&mut raw);
        }
        strip_ansi(&String::from_utf8_lossy(&raw))
    }

    /// What explains a failed start: panic and error lines (each with the
    /// line after it) if there are any, else the last `line_count` lines.
    pub fn log_tail(&self, line_count: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let mut key_lines = Vec::new();
        for (index, line) in lines.iter().enumerate() {
            let lower = line.to_ascii_lowercase();
            if lower.contains("panicked") || lower.contains("error") || line.contains("[FTL]") {
                key_lines.extend(lines[index..].iter().take(2));
            }
            if key_lines.len() >= line_count {
                break;
            }
        }
        if key_lines.is_empty() {
            key_lines = lines[lines.len().saturating_sub(line_count)..].to_vec();
        }
        key_lines.join("\n")
    }

    /// Log lines that mention a slow consumer, if any (both servers log one
    /// when they close a client that does not keep up).
    pub fn slow_consumer_lines(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|line| line.to_ascii_lowercase().contains("slow consumer"))
            .take(5)
            .map(str::to_string)
            .collect()
    }

    /// SIGTERM, then SIGKILL if it does not exit in time.
    pub fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        if self
            .child
            .try_wait()
            .context("polling the server")?
            .is_some()
        {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: plain kill(2) on the pid of our own, not yet reaped, child.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        while Instant::now() < deadline {
            if self
                .child
                .try_wait()
                .context("polling the server")?
                .is_some()
            {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.child.kill().context("killing the server")?;
        self.child.wait().context("reaping the server")?;
        bail!(
            "{} did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM and was killed",
            self.label
        )
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for escaped in chars.by_ref() {
                if escaped.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            let kib = rest.trim().trim_end_matches("kB").trim();
            return kib
                .parse()
                .with_context(|| format!("parsing {field} in {path}: {line:?}"));
        }
    }
    bail!("{path} has no {field} line")
}

/// user + system CPU time of `/proc/<who>/stat` (`who` = a pid or "self").
pub fn proc_cpu_time(who: &str) -> Result<Duration> {
    let path = format!("/proc/{who}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the parenthesised command name start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("unexpected {path}: {stat:?}"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .with_context(|| format!("{path} has too few fields"))?
            .parse::<u64>()
            .with_context(|| format!("parsing field {} of {path}", index + 3))
    };
    let total_ticks = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks_per_s = u64::try_from(ticks_per_s)
        .ok()
        .filter(|t| *t > 0)
        .unwrap_or(100);
    Ok(Duration::from_micros(total_ticks * 1_000_000 / ticks_per_s))
}

/// Raises this process's soft open-file limit to the hard limit (servers
/// started from here inherit it). Returns the new soft limit.
pub fn raise_open_file_limit() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        limit.rlim_cur = if limit.rlim_max == libc::RLIM_INFINITY {
            // Linux refuses an unlimited soft limit above fs.nr_open.
            std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .unwrap_or(1 << 20)
        } else {
            limit.rlim_max
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::strip_ansi;

    #[test]
    fn strips_colour_codes() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m ok"),
            "2026  INFO ok"
        );
    }
}
