//! `perch device pub|sub`: an operator's device, and the working example of
//! the Rust firmware client (`perch-device`) on a host. One session over UDP,
//! TCP or a serial line; the client does the protocol (registration, QoS 1
//! retries, keepalive), this file only drives it and prints.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use perch_device::host::{run_until, Clock, TcpTransport, Transport, UdpTransport};
use perch_device::wire::Qos;
use perch_device::{Client, Config, DeviceKey, Event, Target};
use perch_wire::serial;

/// Subscriptions and topic ids the CLI's client keeps.
const SUBS: usize = 8;
/// QoS 1 publishes in flight at once (the broker's window is 16).
const INFLIGHT: usize = 8;
/// Largest frame the CLI builds or stores.
const BUF: usize = perch_wire::FRAME_BYTES_MAX;

type DeviceClient = Client<SUBS, INFLIGHT, BUF, HostStorage>;

/// The CLI's storage: QoS 1 records in memory (a run keeps nothing across
/// runs), and with a key the protection epoch in a file (`<key_file>.epoch`),
/// so two runs never seal with the same epoch (docs/device-protocol.md §9).
struct HostStorage {
    records: [Option<std::vec::Vec<u8>>; INFLIGHT],
    epoch_file: Option<std::path::PathBuf>,
}

impl perch_device::Storage for HostStorage {
    fn store(&mut self, slot: usize, record: &[u8]) -> Result<(), perch_device::StorageError> {
        *self
            .records
            .get_mut(slot)
            .ok_or(perch_device::StorageError)? = Some(record.to_vec());
        Ok(())
    }

    fn remove(&mut self, slot: usize) -> Result<(), perch_device::StorageError> {
        if let Some(record) = self.records.get_mut(slot) {
            *record = None;
        }
        Ok(())
    }

    fn load(
        &mut self,
        slot: usize,
        buf: &mut [u8],
    ) -> Result<Option<usize>, perch_device::StorageError> {
        let Some(Some(record)) = self.records.get(slot) else {
            return Ok(None);
        };
        buf.get_mut(..record.len())
            .ok_or(perch_device::StorageError)?
            .copy_from_slice(record);
        Ok(Some(record.len()))
    }

    fn store_msg_id_counter(&mut self, _next: u32) -> Result<(), perch_device::StorageError> {
        Ok(())
    }

    fn load_msg_id_counter(&mut self) -> Result<Option<u32>, perch_device::StorageError> {
        Ok(None)
    }

    fn store_epoch(&mut self, next: u32) -> Result<(), perch_device::StorageError> {
        let path = self.epoch_file.as_ref().ok_or(perch_device::StorageError)?;
        let tmp = path.with_extension("epoch.tmp");
        std::fs::write(&tmp, next.to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|_| perch_device::StorageError)
    }

    fn load_epoch(&mut self) -> Result<Option<u32>, perch_device::StorageError> {
        let Some(path) = &self.epoch_file else {
            return Ok(None);
        };
        match std::fs::read_to_string(path) {
            Ok(text) => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| perch_device::StorageError),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(_) => Err(perch_device::StorageError),
        }
    }
}

/// Where the broker is.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Udp(String),
    Tcp(String),
    Serial(std::path::PathBuf, u32),
}

/// Why a command failed (the exit code is non-zero for each).
#[derive(Debug, thiserror::Error)]
pub enum DeviceToolError {
    #[error("cannot reach the broker: {0}")]
    Transport(#[from] io::Error),
    #[error("the client refused: {0:?}")]
    Client(perch_device::ClientError),
    #[error("no CONNACK within {0:?}")]
    NotConnected(Duration),
    #[error("{acked} of {wanted} QoS 1 publishes acknowledged within {timeout:?}")]
    NotAcked {
        acked: u32,
        wanted: u32,
        timeout: Duration,
    },
    #[error("the broker refused: {0}")]
    Refused(String),
    #[error("{got} of {wanted} messages within {timeout:?}")]
    TooFew {
        got: u64,
        wanted: u64,
        timeout: Duration,
    },
    #[error("key file {0}: {1}")]
    KeyFile(String, String),
}

/// Who the tool connects as: a client id, and its key if it seals (with
/// the file that keeps its epoch).
#[derive(Clone, Debug)]
pub struct Identity {
    pub client_id: String,
    pub key: Option<DeviceKey>,
    pub epoch_file: Option<std::path::PathBuf>,
}

/// A key file: 64 hex digits (the broker's `key_file` format).
pub fn read_key_file(path: &Path) -> Result<DeviceKey, DeviceToolError> {
    let bad = |why: String| DeviceToolError::KeyFile(path.display().to_string(), why);
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let hex = text.trim().as_bytes();
    if hex.len() != 64 {
        return Err(bad("not 64 hex digits".into()));
    }
    let mut key = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let digits = std::str::from_utf8(pair).map_err(|_| bad("not hex".into()))?;
        key[i] = u8::from_str_radix(digits, 16).map_err(|_| bad("not hex".into()))?;
    }
    Ok(DeviceKey(key))
}

/// The one transport a command runs over.
enum AnyTransport {
    Udp(UdpTransport),
    Tcp(TcpTransport),
    Serial(SerialTransport),
}

impl Transport for AnyTransport {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self {
            AnyTransport::Udp(t) => t.send(frame),
            AnyTransport::Tcp(t) => t.send(frame),
            AnyTransport::Serial(t) => t.send(frame),
        }
    }

    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        match self {
            AnyTransport::Udp(t) => t.recv(buf, timeout),
            AnyTransport::Tcp(t) => t.recv(buf, timeout),
            AnyTransport::Serial(t) => t.recv(buf, timeout),
        }
    }
}

fn transport(endpoint: &Endpoint) -> Result<AnyTransport, DeviceToolError> {
    Ok(match endpoint {
        Endpoint::Udp(addr) => AnyTransport::Udp(UdpTransport::connect(addr.as_str())?),
        Endpoint::Tcp(addr) => AnyTransport::Tcp(TcpTransport::connect(addr.as_str())?),
        Endpoint::Serial(path, baud) => AnyTransport::Serial(SerialTransport::open(path, *baud)?),
    })
}

fn connect(
    identity: &Identity,
    transport: &mut AnyTransport,
    clock: &Clock,
    timeout: Duration,
) -> Result<DeviceClient, DeviceToolError> {
    let mut config = Config::new(identity.client_id.as_bytes()).map_err(DeviceToolError::Client)?;
    config.key = identity.key.clone();
    let storage = HostStorage {
        records: Default::default(),
        epoch_file: identity.epoch_file.clone(),
    };
    let mut client =
        DeviceClient::with_storage(config, storage).map_err(DeviceToolError::Client)?;
    client.connect(clock.now_ms());
    let mut refused = None;
    let connected = run_until(
        &mut client,
        transport,
        clock,
        timeout,
        |event| match event {
            Event::Connected { .. } => true,
            Event::Disconnected { reason } => {
                refused = Some(format!("{reason:?}"));
                true
            }
            _ => false,
        },
    )?;
    match (connected, refused) {
        (_, Some(reason)) => Err(DeviceToolError::Refused(reason)),
        (true, None) => Ok(client),
        (false, None) => Err(DeviceToolError::NotConnected(timeout)),
    }
}

/// `perch device pub`: one session, the subject registered once, `count`
/// publishes of `payload`; with QoS 1 every one must be acknowledged.
pub fn publish(
    endpoint: &Endpoint,
    identity: &Identity,
    subject: &str,
    payload: &[u8],
    count: u32,
    qos: u8,
    timeout: Duration,
) -> Result<(), DeviceToolError> {
    let clock = Clock::new();
    let mut transport = transport(endpoint)?;
    let mut client = connect(identity, &mut transport, &clock, timeout)?;
    let qos = if qos == 1 {
        Qos::AtLeastOnce
    } else {
        Qos::AtMostOnce
    };
    let mut queued = 0u32;
    let mut acked = 0u32;
    let mut failure: Option<String> = None;
    while queued < count || (qos == Qos::AtLeastOnce && acked < count) {
        // Queue as many as the client takes (INFLIGHT bounds QoS 1), then
        // drive it until one is acknowledged or it has room again.
        while queued < count {
            match client.publish(
                Target::Subject(subject.as_bytes()),
                payload,
                qos,
                clock.now_ms(),
            ) {
                Ok(_) => queued += 1,
                Err(perch_device::ClientError::InflightFull) => break,
                Err(e) => return Err(DeviceToolError::Client(e)),
            }
        }
        let waiting_for = acked;
        let progressed = run_until(
            &mut client,
            &mut transport,
            &clock,
            timeout,
            |event| match event {
                Event::PublishAcked { .. } => {
                    acked += 1;
                    true
                }
                Event::PublishFailed { code, .. } => {
                    failure = Some(format!("PUBACK {code}"));
                    true
                }
                Event::Error { code, .. } => {
                    failure = Some(format!("ERROR {code}"));
                    true
                }
                // QoS 0: nothing is acknowledged; wait until the frames are out.
                _ => qos == Qos::AtMostOnce,
            },
        )?;
        if let Some(reason) = failure.take() {
            return Err(DeviceToolError::Refused(reason));
        }
        if qos == Qos::AtMostOnce {
            // Everything queued has been handed to the transport.
            if queued >= count {
                break;
            }
            continue;
        }
        if !progressed && acked == waiting_for {
            return Err(DeviceToolError::NotAcked {
                acked,
                wanted: count,
                timeout,
            });
        }
    }
    // Let the last QoS 0 frames leave, then say goodbye.
    let _ = run_until(
        &mut client,
        &mut transport,
        &clock,
        Duration::from_millis(50),
        |_| false,
    );
    goodbye(&mut client, &mut transport, &clock);
    Ok(())
}

/// DISCONNECT, and a moment for the broker's answer.
fn goodbye(client: &mut DeviceClient, transport: &mut AnyTransport, clock: &Clock) {
    client.disconnect(clock.now_ms());
    let _ = run_until(
        client,
        transport,
        clock,
        Duration::from_millis(200),
        |event| matches!(event, Event::Disconnected { .. }),
    );
}

/// `perch device sub`: one session, one subscription; prints each message's
/// payload on its own line and returns after `count` (0: never).
pub fn subscribe(
    endpoint: &Endpoint,
    identity: &Identity,
    filter: &str,
    qos1: bool,
    count: u64,
    timeout: Duration,
    out: &mut impl Write,
) -> Result<(), DeviceToolError> {
    let clock = Clock::new();
    let mut transport = transport(endpoint)?;
    let mut client = connect(identity, &mut transport, &clock, timeout)?;
    client
        .subscribe(
            filter.as_bytes(),
            if qos1 {
                Qos::AtLeastOnce
            } else {
                Qos::AtMostOnce
            },
            clock.now_ms(),
        )
        .map_err(DeviceToolError::Client)?;
    let mut subscribed = None;
    run_until(
        &mut client,
        &mut transport,
        &clock,
        timeout,
        |event| match event {
            Event::Subscribed { code, .. } => {
                subscribed = Some(code);
                true
            }
            _ => false,
        },
    )?;
    match subscribed {
        Some(perch_wire::Code::Ok) => {}
        Some(code) => return Err(DeviceToolError::Refused(format!("SUBACK {code}"))),
        None => return Err(DeviceToolError::NotConnected(timeout)),
    }
    // Ready: scripts wait for this line before publishing.
    eprintln!("perch device: subscribed to {filter}");
    let mut got = 0u64;
    let mut write_error = None;
    let forever = Duration::from_secs(u64::from(u32::MAX));
    let wait = if count == 0 { forever } else { timeout };
    run_until(&mut client, &mut transport, &clock, wait, |event| {
        if let Event::Message { payload, .. } = event {
            got += 1;
            let mut line = payload.to_vec();
            line.push(b'\n');
            if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
                write_error = Some(e);
                return true;
            }
            return count != 0 && got >= count;
        }
        false
    })?;
    if let Some(e) = write_error {
        return Err(DeviceToolError::Transport(e));
    }
    if count != 0 && got < count {
        return Err(DeviceToolError::TooFew {
            got,
            wanted: count,
            timeout,
        });
    }
    goodbye(&mut client, &mut transport, &clock);
    Ok(())
}

/// A serial line as a frame transport: COBS + CRC-16 frames, raw mode.
struct SerialTransport {
    fd: OwnedFd,
    deframer: Box<serial::Deframer<{ serial::DEFRAMER_BYTES_FOR_FRAME_MAX }>>,
    /// Bytes read past the last frame handed out.
    pending: Vec<u8>,
}

impl SerialTransport {
    fn open(path: &Path, baud: u32) -> io::Result<SerialTransport> {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        // SAFETY: open(2) with a valid C string.
        let fd = unsafe {
            libc::open(
                c_path.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        crate::runtime::serial_raw_mode(fd.as_raw_fd(), baud)?;
        Ok(SerialTransport {
            fd,
            deframer: Box::new(serial::Deframer::new()),
            pending: Vec::new(),
        })
    }
}

impl Transport for SerialTransport {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let mut line = vec![0u8; serial::encoded_len_max(frame.len())];
        let n = serial::encode_bytes(frame, &mut line)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut rest = &line[..n];
        while !rest.is_empty() {
            // SAFETY: write(2) from a valid buffer on our descriptor.
            let wrote =
                unsafe { libc::write(self.fd.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
            if wrote < 0 {
                return Err(io::Error::last_os_error());
            }
            rest = &rest[wrote as usize..];
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if !self.pending.is_empty() {
                let pending = std::mem::take(&mut self.pending);
                if let Some((frame, rest)) = self.deframer.feed(&pending) {
                    let n = frame.len().min(buf.len());
                    buf[..n].copy_from_slice(&frame[..n]);
                    self.pending = rest.to_vec();
                    return Ok(Some(n));
                }
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut poll = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: poll(2) on one valid pollfd.
            let ready = unsafe { libc::poll(&mut poll, 1, ms.max(1)) };
            if ready < 0 {
                return Err(io::Error::last_os_error());
            }
            if ready == 0 {
                continue;
            }
            let mut chunk = [0u8; 512];
            // SAFETY: read(2) into a valid buffer.
            let n =
                unsafe { libc::read(self.fd.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "serial line closed",
                ));
            }
            self.pending.extend_from_slice(&chunk[..n as usize]);
        }
    }
}
