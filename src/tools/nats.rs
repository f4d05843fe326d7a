//! `perch pub|sub|req|bench`: NATS client commands for the operator of a
//! gateway, so checking a broker needs no other tool. They speak the plain
//! NATS client protocol over TCP (blocking, one connection each; `bench` one
//! per thread) and work against any NATS server, not only perch.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::store::dump::EscapedText;

/// A payload longer than this from the server is refused (it would have to
/// be allocated whole).
const PAYLOAD_BYTES_MAX: usize = 64 << 20;
/// Longest control line read from the server.
const LINE_BYTES_MAX: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NatsToolError {
    #[error("cannot reach {server}: {source}")]
    Connect { server: String, source: io::Error },
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the server said: {0}")]
    Server(String),
    #[error("bad server URL {0:?} (nats://HOST:PORT or HOST:PORT)")]
    Url(String),
    #[error("no responders for {0}")]
    NoResponders(String),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("a header must be NAME:VALUE, got {0:?}")]
    Header(String),
    #[error("{got} of {wanted} messages within {timeout:?}")]
    TooFew {
        got: u64,
        wanted: u64,
        timeout: Duration,
    },
}

/// A message read from the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub subject: String,
    pub reply: Option<String>,
    /// The header block as sent (`NATS/1.0 …\r\n…\r\n\r\n`), if any.
    pub headers: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

impl Msg {
    /// The status code of a header-only status message (503: no responders).
    pub fn status(&self) -> Option<u16> {
        let headers = self.headers.as_deref()?;
        let line = headers.split(|&b| b == b'\r').next()?;
        let line = std::str::from_utf8(line).ok()?;
        line.strip_prefix("NATS/1.0 ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

/// "nats://host:port", "host:port" or "host" (port 4222).
pub fn server_address(url: &str) -> Result<String, NatsToolError> {
    let rest = url.strip_prefix("nats://").unwrap_or(url);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return Err(NatsToolError::Url(url.to_string()));
    }
    let has_port = match rest.rsplit_once(':') {
        Some((host, port)) => {
            !host.ends_with(':') && port.parse::<u16>().is_ok() && !host.is_empty()
        }
        None => false,
    };
    Ok(if has_port {
        rest.to_string()
    } else {
        format!("{rest}:4222")
    })
}

/// One client connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    next_sid: u64,
    line: Vec<u8>,
}

impl Conn {
    /// Connects, reads INFO, sends CONNECT and waits for the PONG of a PING
    /// (so a refused CONNECT shows here).
    pub fn connect(url: &str, name: &str) -> Result<Conn, NatsToolError> {
        let server = server_address(url)?;
        let stream = TcpStream::connect(&server).map_err(|source| NatsToolError::Connect {
            server: server.clone(),
            source,
        })?;
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            reader: BufReader::new(stream.try_clone()?),
            writer: BufWriter::with_capacity(64 * 1024, stream),
            next_sid: 1,
            line: Vec::new(),
        };
        conn.read_line()?;
        if !conn.line.starts_with(b"INFO ") {
            return Err(NatsToolError::Server(format!(
                "expected INFO, got {}",
                EscapedText(&conn.line)
            )));
        }
        let connect = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true,\
             \"name\":\"{name}\",\"lang\":\"rust\",\"version\":\"{}\",\"protocol\":1}}\r\n",
            env!("CARGO_PKG_VERSION")
        );
        conn.writer.write_all(connect.as_bytes())?;
        conn.flush()?;
        Ok(conn)
    }

    /// Reads one CRLF-ended line into `self.line` (without the CRLF).
    fn read_line(&mut self) -> Result<(), NatsToolError> {
        self.line.clear();
        let n = (&mut self.reader)
            .take(LINE_BYTES_MAX as u64)
            .read_until(b'\n', &mut self.line)?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        if !self.line.ends_with(b"\n") {
            return Err(NatsToolError::Server("control line too long".into()));
        }
        self.line.pop();
        if self.line.ends_with(b"\r") {
            self.line.pop();
        }
        Ok(())
    }

    pub fn publish(
        &mut self,
        subject: &str,
        reply: Option<&str>,
        headers: &[(String, String)],
        payload: &[u8],
    ) -> io::Result<()> {
        let reply = reply.map_or(String::new(), |r| format!(" {r}"));
        if headers.is_empty() {
            write!(self.writer, "PUB {subject}{reply} {}\r\n", payload.len())?;
        } else {
            let mut block = b"NATS/1.0\r\n".to_vec();
            for (name, value) in headers {
                block.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
            }
            block.extend_from_slice(b"\r\n");
            write!(
                self.writer,
                "HPUB {subject}{reply} {} {}\r\n",
                block.len(),
                block.len() + payload.len()
            )?;
            self.writer.write_all(&block)?;
        }
        self.writer.write_all(payload)?;
        self.writer.write_all(b"\r\n")
    }

    /// Subscribes; returns the sid.
    pub fn subscribe(&mut self, subject: &str, queue: Option<&str>) -> io::Result<u64> {
        let sid = self.next_sid;
        self.next_sid += 1;
        let queue = queue.map_or(String::new(), |q| format!(" {q}"));
        write!(self.writer, "SUB {subject}{queue} {sid}\r\n")?;
        Ok(sid)
    }

    /// PING and wait for its PONG: the server has processed everything sent
    /// before (and, for SUBs, routes to them). Messages arriving meanwhile
    /// are dropped; flush before subscribing traffic starts.
    pub fn flush(&mut self) -> Result<(), NatsToolError> {
        self.writer.write_all(b"PING\r\n")?;
        self.writer.flush()?;
        self.reader.get_ref().set_read_timeout(None)?;
        loop {
            match self.next()? {
                Event::Pong => return Ok(()),
                Event::Msg(_) => {}
            }
        }
    }

    /// The next message, or None when `deadline` passes first.
    pub fn next_message(&mut self, deadline: Instant) -> Result<Option<Msg>, NatsToolError> {
        self.writer.flush()?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // Only a read that may block needs the timeout (one syscall per
            // buffer refill, not per message); flush() clears it.
            if self.reader.buffer().is_empty() {
                self.reader.get_ref().set_read_timeout(Some(left))?;
            }
            match self.next() {
                Ok(Event::Msg(msg)) => return Ok(Some(msg)),
                Ok(Event::Pong) => {}
                Err(NatsToolError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn next(&mut self) -> Result<Event, NatsToolError> {
        loop {
            self.read_line()?;
            let line = std::mem::take(&mut self.line);
            let result = self.handle_line(&line);
            self.line = line;
            if let Some(event) = result? {
                return Ok(event);
            }
        }
    }

    fn handle_line(&mut self, line: &[u8]) -> Result<Option<Event>, NatsToolError> {
        let text = String::from_utf8_lossy(line);
        let mut fields = text.split_ascii_whitespace();
        let op = fields.next().unwrap_or("").to_ascii_uppercase();
        let rest: Vec<&str> = fields.collect();
        match op.as_str() {
            "PING" => {
                self.writer.write_all(b"PONG\r\n")?;
                self.writer.flush()?;
                Ok(None)
            }
            "PONG" => Ok(Some(Event::Pong)),
            "+OK" | "INFO" => Ok(None),
            "-ERR" => Err(NatsToolError::Server(
                text.trim_start_matches("-ERR ").into(),
            )),
            "MSG" | "HMSG" => {
                let with_headers = op == "HMSG";
                let bad = || NatsToolError::Server(format!("malformed {op} line: {text}"));
                let (subject, reply, header_len, total) = match (with_headers, rest.as_slice()) {
                    (false, [s, _sid, n]) => (*s, None, 0, *n),
                    (false, [s, _sid, r, n]) => (*s, Some(*r), 0, *n),
                    (true, [s, _sid, h, n]) => (*s, None, h.parse().map_err(|_| bad())?, *n),
                    (true, [s, _sid, r, h, n]) => (*s, Some(*r), h.parse().map_err(|_| bad())?, *n),
                    _ => return Err(bad()),
                };
                let total: usize = total.parse().map_err(|_| bad())?;
                if total > PAYLOAD_BYTES_MAX || header_len > total {
                    return Err(bad());
                }
                let mut body = vec![0u8; total + 2];
                self.reader.read_exact(&mut body)?;
                body.truncate(total);
                let payload = body.split_off(header_len);
                Ok(Some(Event::Msg(Msg {
                    subject: subject.to_string(),
                    reply: reply.map(str::to_string),
                    headers: with_headers.then_some(body),
                    payload,
                })))
            }
            _ => Err(NatsToolError::Server(format!("unexpected {text}"))),
        }
    }
}

enum Event {
    Pong,
    Msg(Msg),
}

/// `NAME:VALUE` (spaces around VALUE trimmed).
pub fn parse_header(text: &str) -> Result<(String, String), NatsToolError> {
    let (name, value) = text
        .split_once(':')
        .filter(|(n, _)| !n.trim().is_empty())
        .ok_or_else(|| NatsToolError::Header(text.to_string()))?;
    Ok((name.trim().to_string(), value.trim().to_string()))
}

/// `perch pub`: publishes `payload` `count` times, then flushes.
pub fn publish(
    server: &str,
    subject: &str,
    payload: &[u8],
    headers: &[(String, String)],
    reply: Option<&str>,
    count: u64,
) -> Result<(), NatsToolError> {
    let mut conn = Conn::connect(server, "perch-pub")?;
    for _ in 0..count {
        conn.publish(subject, reply, headers, payload)?;
    }
    conn.flush()?;
    Ok(())
}

/// One line per message: `SUBJECT PAYLOAD`, the payload escaped onto one
/// line; with `headers`, the header block (escaped) between them.
pub fn format_message(msg: &Msg, headers: bool) -> String {
    match (&msg.headers, headers) {
        (Some(h), true) => format!(
            "{} [{}] {}",
            msg.subject,
            EscapedText(h.trim_ascii_end()),
            EscapedText(&msg.payload)
        ),
        _ => format!("{} {}", msg.subject, EscapedText(&msg.payload)),
    }
}

/// `perch sub`: prints each message, returns after `count` (0: never).
pub fn subscribe(
    server: &str,
    subject: &str,
    queue: Option<&str>,
    count: u64,
    headers: bool,
    out: &mut impl Write,
) -> Result<(), NatsToolError> {
    let mut conn = Conn::connect(server, "perch-sub")?;
    conn.subscribe(subject, queue)?;
    conn.flush()?;
    eprintln!("perch sub: subscribed to {subject}");
    let mut got = 0u64;
    while count == 0 || got < count {
        let far = Instant::now() + Duration::from_secs(3600);
        if let Some(msg) = conn.next_message(far)? {
            got += 1;
            writeln!(out, "{}", format_message(&msg, headers))?;
            out.flush()?;
        }
    }
    Ok(())
}

/// `perch req`: one request, the reply's payload (or an error).
pub fn request(
    server: &str,
    subject: &str,
    payload: &[u8],
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<Msg, NatsToolError> {
    let mut conn = Conn::connect(server, "perch-req")?;
    let inbox = format!("_INBOX.perch.{}.{}", std::process::id(), nonce());
    conn.subscribe(&inbox, None)?;
    conn.publish(subject, Some(&inbox), headers, payload)?;
    let deadline = Instant::now() + timeout;
    match conn.next_message(deadline)? {
        Some(msg) if msg.status() == Some(503) => Err(NatsToolError::NoResponders(subject.into())),
        Some(msg) => Ok(msg),
        None => Err(NatsToolError::Timeout(timeout)),
    }
}

fn nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32)
}

/// What `perch bench` measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub msgs: u64,
    pub size: usize,
    pub publishers: usize,
    pub pub_elapsed: Duration,
    /// Per subscriber: messages received and the time from the first publish
    /// to its last message.
    pub subs: Vec<(u64, Duration)>,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
        let mib = |n: u64, d: Duration| rate(n, d) * self.size as f64 / (1 << 20) as f64;
        writeln!(
            f,
            "pub: {} msgs of {} B from {} publisher(s) in {:.3} s: {:.0} msgs/s, {:.1} MiB/s",
            self.msgs,
            self.size,
            self.publishers,
            self.pub_elapsed.as_secs_f64(),
            rate(self.msgs, self.pub_elapsed),
            mib(self.msgs, self.pub_elapsed)
        )?;
        for (i, (got, elapsed)) in self.subs.iter().enumerate() {
            writeln!(
                f,
                "sub {}: {} of {} msgs in {:.3} s: {:.0} msgs/s, {:.1} MiB/s",
                i + 1,
                got,
                self.msgs,
                elapsed.as_secs_f64(),
                rate(*got, *elapsed),
                mib(*got, *elapsed)
            )?;
        }
        Ok(())
    }
}

/// `perch bench`: `subs` subscribers on `subject` (each its own connection,
/// subscribed before anything is published), then `pubs` publishers sharing
/// `msgs` messages of `size` bytes. Fails if a subscriber misses messages
/// within `timeout`.
pub fn bench(
    server: &str,
    subject: &str,
    msgs: u64,
    size: usize,
    pubs: usize,
    subs: usize,
    timeout: Duration,
) -> Result<BenchReport, NatsToolError> {
    let pubs = pubs.max(1);
    let start_ns = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let mut subscribers = Vec::new();
    for _ in 0..subs {
        let mut conn = Conn::connect(server, "perch-bench-sub")?;
        conn.subscribe(subject, None)?;
        conn.flush()?;
        let start_ns = Arc::clone(&start_ns);
        subscribers.push(std::thread::spawn(move || -> (u64, Duration) {
            let deadline = Instant::now() + timeout;
            let mut got = 0;
            let mut last = epoch;
            while got < msgs {
                match conn.next_message(deadline) {
                    Ok(Some(_)) => {
                        got += 1;
                        last = Instant::now();
                    }
                    _ => break,
                }
            }
            let started = Duration::from_nanos(start_ns.load(Ordering::Acquire));
            (got, last.duration_since(epoch).saturating_sub(started))
        }));
    }
    let mut publishers = Vec::new();
    let payload = vec![b'x'; size];
    let started = epoch.elapsed();
    start_ns.store(started.as_nanos() as u64, Ordering::Release);
    for i in 0..pubs {
        let share = msgs / pubs as u64 + u64::from((i as u64) < msgs % pubs as u64);
        let mut conn = Conn::connect(server, "perch-bench-pub")?;
        let payload = payload.clone();
        let subject = subject.to_string();
        publishers.push(std::thread::spawn(move || -> Result<(), NatsToolError> {
            for _ in 0..share {
                conn.publish(&subject, None, &[], &payload)?;
            }
            conn.flush()
        }));
    }
    for p in publishers {
        p.join()
            .map_err(|_| NatsToolError::Server("a publisher thread panicked".into()))??;
    }
    let pub_elapsed = epoch.elapsed().saturating_sub(started);
    let mut report = BenchReport {
        msgs,
        size,
        publishers: pubs,
        pub_elapsed,
        subs: Vec::new(),
    };
    for s in subscribers {
        let result = s
            .join()
            .map_err(|_| NatsToolError::Server("a subscriber thread panicked".into()))?;
        report.subs.push(result);
    }
    if let Some(&(got, _)) = report.subs.iter().find(|(got, _)| *got < msgs) {
        return Err(NatsToolError::TooFew {
            got,
            wanted: msgs,
            timeout,
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        assert_eq!(
            server_address("nats://10.0.0.2:4333").unwrap(),
            "10.0.0.2:4333"
        );
        assert_eq!(server_address("localhost").unwrap(), "localhost:4222");
        assert_eq!(server_address("nats://u:p@gw:4222").unwrap(), "gw:4222");
        assert_eq!(server_address("[::1]:4222").unwrap(), "[::1]:4222");
        assert!(server_address("nats://").is_err());
        assert!(server_address("http://x/y").is_err());
    }

    #[test]
    fn headers_parse_and_status_lines_are_read() {
        assert_eq!(
            parse_header("Perch-Qos: 1").unwrap(),
            ("Perch-Qos".to_string(), "1".to_string())
        );
        assert!(parse_header("novalue").is_err());
        assert!(parse_header(":x").is_err());
        let msg = Msg {
            subject: "_INBOX.x".into(),
            reply: None,
            headers: Some(b"NATS/1.0 503\r\n\r\n".to_vec()),
            payload: Vec::new(),
        };
        assert_eq!(msg.status(), Some(503));
        assert_eq!(
            format_message(
                &Msg {
                    headers: Some(b"NATS/1.0\r\nA: b\r\n\r\n".to_vec()),
                    payload: b"two\nlines".to_vec(),
                    ..msg
                },
                true
            ),
            "_INBOX.x [NATS/1.0\\r\\nA: b] two\\nlines"
        );
    }
}
