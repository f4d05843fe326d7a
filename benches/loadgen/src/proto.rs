//! NATS client-protocol wire helpers for the load generator: the connection
//! handshake, preformatted `PUB` batches, and a tiny frame reader that counts
//! `MSG` frames without allocating per message.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::Range;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// CONNECT options every loadgen connection sends: no `+OK` per op, no
/// pedantic subject checks — what a real client library sends.
pub const CONNECT_JSON: &str = r#"{"verbose":false,"pedantic":false,"lang":"rust","version":"0.1.0","protocol":1,"name":"perch-loadgen"}"#;

/// CONNECT options of the JetStream scenarios' connections: as
/// [`CONNECT_JSON`] plus headers and no_responders, as JetStream clients send,
/// so a request nobody serves gets a `503` status at once instead of silence,
/// and pull requests can end with `404`/`408` status messages.
pub const JS_CONNECT_JSON: &str = r#"{"verbose":false,"pedantic":false,"lang":"rust","version":"0.1.0","protocol":1,"name":"perch-loadgen","headers":true,"no_responders":true}"#;

/// How long one blocking read waits before the caller re-checks its stop flag
/// and deadline.
pub const READ_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A write that makes no progress for this long fails the scenario.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Read buffer for a connection that receives a message stream.
pub const STREAM_READ_BUFFER_BYTES: usize = 256 * 1024;

/// Read buffer for a device or idle connection (grows on demand).
pub const SMALL_READ_BUFFER_BYTES: usize = 1024;

/// Same limit as nats-server's default max_control_line.
const MAX_CONTROL_LINE_BYTES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// `MSG` or `HMSG`.
    Msg,
    Ping,
    Pong,
    Ok,
    Info,
    Err,
}

/// One parsed frame. The ranges index the reader's buffer and stay valid
/// until the next [`FrameReader::fill`].
#[derive(Clone, Debug)]
pub struct Frame {
    pub kind: FrameKind,
    /// Control line without its CRLF.
    pub line: Range<usize>,
    /// Payload (headers included for HMSG); empty for other frames.
    pub payload: Range<usize>,
}

/// Buffers bytes from a socket and splits them into frames.
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameReader {
    pub fn with_capacity(capacity_bytes: usize) -> Self {
        Self {
            buf: vec![0; capacity_bytes.max(64)],
            start: 0,
            end: 0,
        }
    }

    pub fn bytes(&self, range: Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    /// Reads once from `src` into the free space, compacting or growing the
    /// buffer first when it is full. `Ok(0)` means end of stream.
    pub fn fill(&mut self, src: &mut impl Read) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let grown_len = self.buf.len() * 2;
                self.buf.resize(grown_len, 0);
            }
        }
        let read_bytes = src.read(&mut self.buf[self.end..])?;
        self.end += read_bytes;
        Ok(read_bytes)
    }

    /// The next complete frame, or `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        let available = &self.buf[self.start..self.end];
        let Some(newline_at) = memchr::memchr(b'\n', available) else {
            if available.len() > MAX_CONTROL_LINE_BYTES {
                bail!(
                    "server sent more than {MAX_CONTROL_LINE_BYTES} bytes without a line end: {:?}",
                    String::from_utf8_lossy(&available[..64])
                );
            }
            return Ok(None);
        };
        let line_len = if newline_at > 0 && available[newline_at - 1] == b'\r' {
            newline_at - 1
        } else {
            newline_at
        };
        let line = &available[..line_len];
        let kind = classify(line)?;
        let line_range = self.start..self.start + line_len;
        let after_line = self.start + newline_at + 1;
        if kind != FrameKind::Msg {
            self.start = after_line;
            return Ok(Some(Frame {
                kind,
                line: line_range,
                payload: after_line..after_line,
            }));
        }
        let payload_bytes = parse_last_token(line).with_context(|| {
            format!(
                "MSG line without a valid size: {:?}",
                String::from_utf8_lossy(line)
            )
        })?;
        if self.end - after_line < payload_bytes + 2 {
            return Ok(None);
        }
        self.start = after_line + payload_bytes + 2;
        Ok(Some(Frame {
            kind,
            line: line_range,
            payload: after_line..after_line + payload_bytes,
        }))
    }
}

fn classify(line: &[u8]) -> Result<FrameKind> {
    // The hot path: the server writes ops in upper case.
    if line.len() >= 4 && &line[..4] == b"MSG " {
        return Ok(FrameKind::Msg);
    }
    let op_len = line
        .iter()
        .position(|byte| *byte == b' ' || *byte == b'\t')
        .unwrap_or(line.len());
    let op = &line[..op_len];
    let kind = if op.eq_ignore_ascii_case(b"MSG") || op.eq_ignore_ascii_case(b"HMSG") {
        FrameKind::Msg
    } else if op.eq_ignore_ascii_case(b"PING") {
        FrameKind::Ping
    } else if op.eq_ignore_ascii_case(b"PONG") {
        FrameKind::Pong
    } else if op.eq_ignore_ascii_case(b"+OK") {
        FrameKind::Ok
    } else if op.eq_ignore_ascii_case(b"INFO") {
        FrameKind::Info
    } else if op.eq_ignore_ascii_case(b"-ERR") {
        FrameKind::Err
    } else {
        bail!(
            "unexpected frame from server: {:?}",
            String::from_utf8_lossy(line)
        );
    };
    Ok(kind)
}

fn is_field_separator(byte: &u8) -> bool {
    *byte == b' ' || *byte == b'\t'
}

/// The last whitespace-separated token of a control line as a number: the
/// payload size of MSG and the total size of HMSG.
fn parse_last_token(line: &[u8]) -> Option<usize> {
    let token_end = line.iter().rposition(|byte| !is_field_separator(byte))? + 1;
    let token_start = line[..token_end]
        .iter()
        .rposition(is_field_separator)
        .map_or(0, |at| at + 1);
    let token = &line[token_start..token_end];
    if token.is_empty() || token.len() > 12 {
        return None;
    }
    let mut value = 0usize;
    for byte in token {
        if !byte.is_ascii_digit() {
            return None;
        }
        value = value * 10 + usize::from(byte - b'0');
    }
    Some(value)
}

/// The reply subject of a `MSG subj sid [reply] size` or
/// `HMSG subj sid [reply] hdr_size total_size` line, if it has one.
pub fn reply_subject(line: &[u8]) -> Option<&[u8]> {
    let mut tokens: [&[u8]; 6] = [&[]; 6];
    let mut token_count = 0;
    for token in line
        .split(is_field_separator)
        .filter(|token| !token.is_empty())
    {
        if token_count == tokens.len() {
            return None;
        }
        tokens[token_count] = token;
        token_count += 1;
    }
    let is_hmsg = tokens[0].eq_ignore_ascii_case(b"HMSG");
    let with_reply_count = if is_hmsg { 6 } else { 5 };
    (token_count == with_reply_count).then_some(tokens[3])
}

/// The subject (second token) of a `MSG`/`HMSG` line.
pub fn msg_subject(line: &[u8]) -> Option<&[u8]> {
    line.split(is_field_separator)
        .filter(|token| !token.is_empty())
        .nth(1)
}

/// Whether a `MSG`-kind frame is an `HMSG` (its payload starts with headers).
pub fn is_hmsg(line: &[u8]) -> bool {
    line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"HMSG ")
}

/// The status line of an HMSG payload (`NATS/1.0 503`, `NATS/1.0 408
/// Request Timeout`), without its CRLF; `None` when the header block has no
/// status code.
pub fn status_line(payload: &[u8]) -> Option<&[u8]> {
    let line_end = memchr::memmem::find(payload, b"\r\n").unwrap_or(payload.len());
    let line = &payload[..line_end];
    let status = line.strip_prefix(b"NATS/1.0")?;
    status.iter().any(u8::is_ascii_digit).then_some(line)
}

/// `count` copies of `PUB <subject> <payload_bytes>\r\n<payload>\r\n`.
pub fn pub_batch(subject: &str, payload_bytes: usize, count: usize) -> Vec<u8> {
    let header = format!("PUB {subject} {payload_bytes}\r\n");
    let mut batch = Vec::with_capacity(count * (header.len() + payload_bytes + 2));
    for _ in 0..count {
        batch.extend_from_slice(header.as_bytes());
        batch.resize(batch.len() + payload_bytes, b'x');
        batch.extend_from_slice(b"\r\n");
    }
    batch
}

/// How many frames of `frame_bytes` fit in `target_bytes` (at least one).
pub fn frames_per_batch(frame_bytes: usize, target_bytes: usize) -> usize {
    (target_bytes / frame_bytes.max(1)).max(1)
}

pub fn is_read_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// One client connection speaking the NATS protocol over blocking TCP.
pub struct Conn {
    pub stream: TcpStream,
    pub reader: FrameReader,
}

impl Conn {
    /// Connects and waits for the server's INFO.
    pub fn open(addr: SocketAddr, read_buffer_bytes: usize, deadline: Instant) -> Result<Self> {
        let connect_timeout = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        let stream = TcpStream::connect_timeout(&addr, connect_timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        stream
            .set_read_timeout(Some(READ_POLL_INTERVAL))
            .context("setting the read timeout")?;
        stream
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .context("setting the write timeout")?;
        let mut conn = Self {
            stream,
            reader: FrameReader::with_capacity(read_buffer_bytes),
        };
        conn.wait_for(FrameKind::Info, deadline)
            .with_context(|| format!("waiting for INFO from {addr}"))?;
        Ok(conn)
    }

    /// Sends `CONNECT`, then `extra` (e.g. SUB lines), then `PING`, in one
    /// write, and waits for the PONG: after it the server has applied all.
    pub fn handshake(&mut self, extra: &[u8], deadline: Instant) -> Result<()> {
        self.handshake_with(CONNECT_JSON, extra, deadline)
    }

    /// [`Conn::handshake`] with other CONNECT options.
    pub fn handshake_with(
        &mut self,
        connect_json: &str,
        extra: &[u8],
        deadline: Instant,
    ) -> Result<()> {
        let mut out = Vec::with_capacity(connect_json.len() + extra.len() + 32);
        out.extend_from_slice(b"CONNECT ");
        out.extend_from_slice(connect_json.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(extra);
        out.extend_from_slice(b"PING\r\n");
        self.stream
            .write_all(&out)
            .context("writing CONNECT/PING")?;
        self.wait_for(FrameKind::Pong, deadline)
            .context("waiting for PONG after CONNECT")?;
        Ok(())
    }

    /// Sends PING and waits for PONG, ignoring messages in between.
    pub fn ping_pong(&mut self, deadline: Instant) -> Result<()> {
        self.stream.write_all(b"PING\r\n").context("writing PING")?;
        self.wait_for(FrameKind::Pong, deadline)
            .context("waiting for PONG")?;
        Ok(())
    }

    /// Reads frames until one of `kind` arrives; answers PINGs, fails on
    /// -ERR, end of stream or the deadline.
    pub fn wait_for(&mut self, kind: FrameKind, deadline: Instant) -> Result<Frame> {
        loop {
            while let Some(frame) = self.reader.next_frame()? {
                if frame.kind == kind {
                    return Ok(frame);
                }
                match frame.kind {
                    FrameKind::Ping => self
                        .stream
                        .write_all(b"PONG\r\n")
                        .context("answering PING")?,
                    FrameKind::Err => bail!(
                        "server sent {}",
                        String::from_utf8_lossy(self.reader.bytes(frame.line))
                    ),
                    _ => {}
                }
            }
            if Instant::now() >= deadline {
                bail!("timed out waiting for {kind:?}");
            }
            self.fill()?;
        }
    }

    /// One read into the frame buffer. Returns false when the read timed out
    /// without data; end of stream is an error.
    pub fn fill(&mut self) -> Result<bool> {
        match self.reader.fill(&mut self.stream) {
            Ok(0) => bail!("server closed the connection"),
            Ok(_) => Ok(true),
            Err(error) if is_read_timeout(&error) => Ok(false),
            Err(error) => Err(error).context("reading from the server"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames_of(input: &[u8], chunk_bytes: usize) -> Vec<(FrameKind, Vec<u8>, Vec<u8>)> {
        let mut reader = FrameReader::with_capacity(64);
        let mut frames = Vec::new();
        for chunk in input.chunks(chunk_bytes) {
            let mut src = chunk;
            while !src.is_empty() {
                reader.fill(&mut src).expect("reading from a slice");
            }
            while let Some(frame) = reader.next_frame().expect("valid input") {
                frames.push((
                    frame.kind,
                    reader.bytes(frame.line.clone()).to_vec(),
                    reader.bytes(frame.payload.clone()).to_vec(),
                ));
            }
        }
        frames
    }

    #[test]
    fn splits_frames_across_any_read_boundary() {
        let input: &[u8] = b"INFO {\"a\":1}\r\nMSG a.b 1 5\r\nhello\r\nPING\r\nHMSG x 2 r 12 14\r\nNATS/1.0\r\n\r\nhi\r\nMSG c 3 _INBOX.1 0\r\n\r\n+OK\r\nPONG\r\n";
        for chunk_bytes in 1..input.len() {
            let frames = frames_of(input, chunk_bytes);
            let kinds: Vec<FrameKind> = frames.iter().map(|frame| frame.0).collect();
            assert_eq!(
                kinds,
                [
                    FrameKind::Info,
                    FrameKind::Msg,
                    FrameKind::Ping,
                    FrameKind::Msg,
                    FrameKind::Msg,
                    FrameKind::Ok,
                    FrameKind::Pong
                ],
                "chunk size {chunk_bytes}"
            );
            assert_eq!(frames[1].2, b"hello");
            assert_eq!(frames[3].2, b"NATS/1.0\r\n\r\nhi");
            assert_eq!(frames[4].2, b"");
        }
    }

    #[test]
    fn grows_for_a_frame_larger_than_the_buffer() {
        let payload = vec![b'p'; 1000];
        let mut input = b"MSG big 1 1000\r\n".to_vec();
        input.extend_from_slice(&payload);
        input.extend_from_slice(b"\r\nPONG\r\n");
        let frames = frames_of(&input, 100);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].2, payload);
        assert_eq!(frames[1].0, FrameKind::Pong);
    }

    #[test]
    fn finds_reply_subjects() {
        assert_eq!(
            reply_subject(b"MSG svc.echo 1 _INBOX.7 16"),
            Some(&b"_INBOX.7"[..])
        );
        assert_eq!(reply_subject(b"MSG svc.echo 1 16"), None);
        assert_eq!(reply_subject(b"HMSG s 1 r 12 14"), Some(&b"r"[..]));
        assert_eq!(reply_subject(b"HMSG s 1 12 14"), None);
    }

    #[test]
    fn finds_subjects_and_statuses() {
        // nats-server writes an empty reply field as a double space.
        assert_eq!(
            msg_subject(b"MSG _INBOX.a.7 1  27"),
            Some(&b"_INBOX.a.7"[..])
        );
        assert_eq!(msg_subject(b"HMSG x 1 16 16"), Some(&b"x"[..]));
        assert!(is_hmsg(b"HMSG x 1 16 16"));
        assert!(!is_hmsg(b"MSG x 1 16"));
        assert_eq!(
            status_line(b"NATS/1.0 503\r\n\r\n"),
            Some(&b"NATS/1.0 503"[..])
        );
        assert_eq!(
            status_line(b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 1\r\n\r\n"),
            Some(&b"NATS/1.0 408 Request Timeout"[..])
        );
        assert_eq!(status_line(b"NATS/1.0\r\nA: b\r\n\r\n"), None);
    }

    #[test]
    fn rejects_unknown_ops_and_bad_sizes() {
        let mut reader = FrameReader::with_capacity(64);
        reader.fill(&mut &b"BOGUS\r\n"[..]).expect("slice read");
        assert!(reader.next_frame().is_err());
        let mut reader = FrameReader::with_capacity(64);
        reader.fill(&mut &b"MSG a 1 x\r\n"[..]).expect("slice read");
        assert!(reader.next_frame().is_err());
    }

    #[test]
    fn builds_pub_batches() {
        assert_eq!(
            pub_batch("a.b", 3, 2),
            b"PUB a.b 3\r\nxxx\r\nPUB a.b 3\r\nxxx\r\n"
        );
    }
}
