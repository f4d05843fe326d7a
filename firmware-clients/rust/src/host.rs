//! Host helpers (feature `std`): transports over `std::net` and a blocking
//! driver loop, for the broker's CLI and integration tests. Firmware brings
//! its own transport and loop; nothing in the client depends on this module.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use crate::{Client, Event, Storage};

/// One frame out, one frame in.
pub trait Transport {
    /// Sends one frame.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Waits up to `timeout` for one frame; `Ok(None)` on timeout.
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>>;
}

/// UDP: one frame per datagram, to and from one broker address.
pub struct UdpTransport {
    socket: UdpSocket,
}

impl UdpTransport {
    /// Binds an ephemeral local port and connects it to `broker`.
    pub fn connect(broker: impl ToSocketAddrs) -> io::Result<UdpTransport> {
        let broker: SocketAddr = broker
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no broker address"))?;
        let local: SocketAddr = if broker.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .expect("a literal address");
        let socket = UdpSocket::bind(local)?;
        socket.connect(broker)?;
        Ok(UdpTransport { socket })
    }

    /// The local address (what the broker sees as the session's source).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

impl Transport for UdpTransport {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.socket.send(frame).map(drop)
    }

    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        match self.socket.recv(buf) {
            Ok(len) => Ok(Some(len)),
            Err(error) if is_timeout(&error) => Ok(None),
            Err(error) => Err(error),
        }
    }
}

/// TCP: frames with a varint length prefix.
pub struct TcpTransport {
    stream: TcpStream,
    /// Received bytes not yet split into frames; at most one frame plus a
    /// read's worth.
    pending: Vec<u8>,
}

impl TcpTransport {
    /// Connects to `broker`.
    pub fn connect(broker: impl ToSocketAddrs) -> io::Result<TcpTransport> {
        let stream = TcpStream::connect(broker)?;
        stream.set_nodelay(true)?;
        Ok(TcpTransport {
            stream,
            pending: Vec::new(),
        })
    }
}

impl Transport for TcpTransport {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let mut prefix = [0u8; perch_wire::tcp::PREFIX_BYTES_MAX];
        let len = perch_wire::tcp::encode_prefix(frame.len(), &mut prefix)
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error.to_string()))?;
        self.stream.write_all(&prefix[..len])?;
        self.stream.write_all(frame)
    }

    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let deadline = Instant::now() + timeout;
        loop {
            match perch_wire::tcp::split_frame(&self.pending) {
                Some(Ok((frame, consumed))) => {
                    let len = frame.len();
                    if len > buf.len() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "frame larger than buffer",
                        ));
                    }
                    buf[..len].copy_from_slice(frame);
                    self.pending.drain(..consumed);
                    return Ok(Some(len));
                }
                Some(Err(error)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        error.to_string(),
                    ))
                }
                None => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            let mut chunk = [0u8; 2048];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(len) => self.pending.extend_from_slice(&chunk[..len]),
                Err(error) if is_timeout(&error) => return Ok(None),
                Err(error) => return Err(error),
            }
        }
    }
}

fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Milliseconds since the clock was made: the `now_ms` the client takes.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    /// A clock starting at 0 now.
    pub fn new() -> Clock {
        Clock {
            start: Instant::now(),
        }
    }

    /// Milliseconds since `new`.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Drives `client` over `transport` until `on_event` returns `true` (then
/// `Ok(true)`) or `timeout` passes (`Ok(false)`). Sends whatever the client
/// has, waits for input or the client's next timer, and hands every event to
/// `on_event`.
pub fn run_until<
    T: Transport,
    const SUBS: usize,
    const INFLIGHT: usize,
    const BUF: usize,
    S: Storage,
>(
    client: &mut Client<SUBS, INFLIGHT, BUF, S>,
    transport: &mut T,
    clock: &Clock,
    timeout: Duration,
    mut on_event: impl FnMut(Event<'_>) -> bool,
) -> io::Result<bool> {
    let deadline_ms = clock
        .now_ms()
        .saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
    // Room for a sealed frame: the frame and its envelope.
    let mut buf = vec![
        0u8;
        BUF.max(perch_wire::FRAME_BYTES_MAX)
            + perch_wire::protect::DEVICE_OVERHEAD_BYTES_MAX
    ];
    loop {
        while let Some(len) = client.poll_transmit(&mut buf) {
            transport.send(&buf[..len])?;
        }
        while let Some(event) = client.poll_event() {
            if on_event(event) {
                return Ok(true);
            }
        }
        // Events may have queued frames (acks): send them before waiting.
        if let Some(len) = client.poll_transmit(&mut buf) {
            transport.send(&buf[..len])?;
            continue;
        }
        let now = clock.now_ms();
        if now >= deadline_ms {
            return Ok(false);
        }
        let wake_ms = client
            .poll_timeout()
            .unwrap_or(deadline_ms)
            .min(deadline_ms);
        let wait = Duration::from_millis(wake_ms.saturating_sub(now).max(1));
        if let Some(len) = transport.recv(&mut buf, wait)? {
            // A malformed frame is counted in the client's stats and dropped.
            let _ = client.handle_input(&buf[..len], clock.now_ms());
        }
        client.handle_timeout(clock.now_ms());
    }
}
