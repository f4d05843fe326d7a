//! The shell around one shard's device gateway ([`crate::lite::gateway`]): its
//! sockets and lines, the internal session through which device
//! subscriptions are served, and the timers.
//!
//! - UDP: one socket per shard, all bound to the device port with
//!   SO_REUSEPORT, so the kernel keeps a source address on one shard; a
//!   datagram for another shard's session is forwarded there and answered
//!   from that shard's socket (same address and port).
//! - TCP: one SO_REUSEPORT listener per shard; a connection's session lives
//!   on the shard that accepted it. Frames carry a varint length.
//! - Serial lines (`[[device.serial]]`): each served by one shard; COBS frames
//!   with a CRC-16, resynchronised at every 0x00 (perch-wire's deframer).
//!
//! Device publishes are routed like a client's publish from this shard;
//! messages for subscribed devices arrive as frames on the internal session
//! (one subscription per device filter, sid = the gateway's id for it). The
//! device sockets go through tokio's reactor on both backends (tokio-uring
//! runs one), which keeps this shell backend-free.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use perch_wire::{serial, tcp, Code, Frame};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;

use super::mailbox::{Control, Outgoing};
use super::shard::Shard;
use crate::lite::gateway::{encode, Action, Gateway, GatewayLimits, Peer, QOS_HEADER};
use crate::lite::predefined::Predefined;
use crate::nats::session::{Message, Session, SessionLimits, Subscription};
use crate::store::file::{replace_atomically, Directory, OsDirectory, StorageFile};

/// The internal session drains every pass; a bound still exists.
const INTERNAL_PENDING_BYTES_MAX: usize = 64 << 20;
/// Largest datagram read (frames are bounded far below).
const DATAGRAM_BYTES_MAX: usize = 2048;
/// How often silent sessions are looked for at most.
const EXPIRY_TICK_MS: u64 = 1_000;
/// The internal subscription that receives the stream's PubAcks for device
/// QoS 1 publishes (device subscriptions get sids from 1).
const STORE_ACK_SID: u64 = 0;
/// QoS 1 publishes waiting for their stream's fsync, per shard; beyond this
/// the oldest is forgotten (its device retries, the stream de-duplicates).
const STORE_ACKS_PENDING_MAX: usize = 4096;
/// Prefix of the reply subjects of those publishes: `_PERCH.DACK.<shard>.<n>`.
const STORE_ACK_PREFIX: &str = "_PERCH.DACK.";
/// Bytes queued to one stream device before it counts as stuck and is closed.
const STREAM_PENDING_BYTES_MAX: usize = 64 * 1024;
/// One read of a stream device.
const STREAM_READ_BYTES: usize = 4096;

/// Under the store directory: the kept device sessions.
const SESSIONS_DIR: &str = "devices";
const SESSION_FILE_SUFFIX: &str = ".ses";
/// The headers of a device's QoS 1 publish (and will) on the NATS side.
const QOS1_HEADERS: &str = "NATS/1.0\r\nPerch-Qos: 1\r\n\r\n";

/// A stored session's file: the client id in hex (any bytes make a safe name).
fn session_file_name(client_id: &[u8]) -> String {
    let mut name = String::with_capacity(client_id.len() * 2 + SESSION_FILE_SUFFIX.len());
    for b in client_id {
        name.push_str(&format!("{b:02x}"));
    }
    name.push_str(SESSION_FILE_SUFFIX);
    name
}

fn read_whole(dir: &OsDirectory, name: &str) -> std::io::Result<Vec<u8>> {
    let file = dir.open(name)?;
    let mut bytes = vec![0u8; file.len()? as usize];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

/// What one shard serves to devices.
pub(crate) struct DeviceSockets {
    pub udp: Option<std::net::UdpSocket>,
    pub tcp: Option<std::net::TcpListener>,
    /// Serial lines this shard serves: (path, baud rate).
    pub serial: Vec<(std::path::PathBuf, u32)>,
    pub predefined: std::sync::Arc<Predefined>,
    pub credentials: std::sync::Arc<crate::lite::credentials::Credentials>,
}

/// How a stream transport delimits frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// A varint length before each frame.
    Tcp,
    /// COBS over frame + CRC-16, each ended by 0x00.
    Serial,
}

/// Output queued for one stream connection, drained by its writer.
struct StreamOut {
    framing: Framing,
    bytes: RefCell<Vec<u8>>,
    ready: Notify,
    closed: Cell<bool>,
}

/// One shard's device side.
pub(crate) struct DeviceRuntime {
    gateway: RefCell<Gateway>,
    session: Rc<Session>,
    subscriptions: RefCell<HashMap<u64, Rc<Subscription>>>,
    udp: Option<tokio::net::UdpSocket>,
    started: Instant,
    outgoing: RefCell<Outgoing>,
    /// QoS 1 publishes captured by a stream, by reply number: acked to the
    /// device only when the stream's PubAck (after its fsync) arrives.
    store_acks: RefCell<BTreeMap<u64, (Peer, u32)>>,
    next_store_ack: Cell<u64>,
    /// TCP connections and serial lines served here, by stream id.
    streams: RefCell<HashMap<u64, Rc<StreamOut>>>,
    next_stream: Cell<u64>,
    /// `<store_dir>/devices`, with a store: one file per kept session.
    sessions_dir: Option<OsDirectory>,
}

/// A datagram another shard received for a session this shard owns.
pub(crate) struct ForwardedDatagram {
    pub from: SocketAddr,
    pub bytes: Vec<u8>,
}

/// Binds one SO_REUSEPORT UDP socket per shard on `addr` (before the shards
/// start, so a bad address fails the start).
pub(crate) fn bind_udp(
    addr: SocketAddr,
    shards: usize,
) -> std::io::Result<Vec<std::net::UdpSocket>> {
    (0..shards)
        .map(|_| {
            let fd = reuseport_socket(addr, libc::SOCK_DGRAM)?;
            // SAFETY: a bound UDP socket we own.
            Ok(unsafe { std::net::UdpSocket::from_raw_fd(fd.into_raw_fd()) })
        })
        .collect()
}

/// One SO_REUSEPORT TCP listener per shard on `addr`: the kernel spreads
/// device connections over the shards.
pub(crate) fn bind_tcp(
    addr: SocketAddr,
    shards: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    (0..shards)
        .map(|_| {
            let fd = reuseport_socket(addr, libc::SOCK_STREAM)?;
            // SAFETY: listen(2) on a bound socket we own.
            if unsafe { libc::listen(fd.as_raw_fd(), 1024) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a listening socket we own.
            Ok(unsafe { std::net::TcpListener::from_raw_fd(fd.into_raw_fd()) })
        })
        .collect()
}

fn reuseport_socket(addr: SocketAddr, kind: libc::c_int) -> std::io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the fd is owned by the OwnedFd below.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    for option in [libc::SO_REUSEPORT, libc::SO_REUSEADDR] {
        // SAFETY: setsockopt with a valid int option value.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let (storage, len) = sockaddr(addr);
    // SAFETY: storage holds a valid sockaddr of `len` bytes.
    let rc = unsafe {
        libc::bind(
            fd,
            &storage as *const libc::sockaddr_storage as *const libc::sockaddr,
            len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(socket)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            (
                storage,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (
                storage,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

impl DeviceRuntime {
    fn start(
        shard: &Rc<Shard>,
        udp: Option<std::net::UdpSocket>,
        predefined: std::sync::Arc<Predefined>,
        credentials: std::sync::Arc<crate::lite::credentials::Credentials>,
    ) -> std::io::Result<Rc<DeviceRuntime>> {
        let udp = udp.map(tokio::net::UdpSocket::from_std).transpose()?;
        let session = Session::new(
            u64::MAX - 64 - shard.id as u64,
            SessionLimits {
                pending_bytes_max: INTERNAL_PENDING_BYTES_MAX,
                subscriptions_max: 0,
            },
        );
        let mut gateway = Gateway::new(
            shard.id,
            shard.shared.shard_count,
            GatewayLimits {
                sessions_max: shard.config().device.sessions_max,
                foreign_addrs_max: shard.config().device.sessions_max * shard.shared.shard_count,
                ..GatewayLimits::default()
            },
            predefined,
        );
        gateway.set_credentials(credentials);
        let runtime = Rc::new(DeviceRuntime {
            gateway: RefCell::new(gateway),
            session,
            subscriptions: RefCell::new(HashMap::new()),
            udp,
            started: Instant::now(),
            outgoing: RefCell::new(Outgoing::new()),
            store_acks: RefCell::new(BTreeMap::new()),
            next_store_ack: Cell::new(1),
            streams: RefCell::new(HashMap::new()),
            next_stream: Cell::new(1),
            sessions_dir: None,
        });
        super::internal::op(
            &runtime.session,
            shard,
            br#"CONNECT {"verbose":false,"pedantic":false,"headers":true,"echo":true}"#,
        );
        if shard.shared.js.is_some() {
            let line = format!("SUB {STORE_ACK_PREFIX}{}.* {STORE_ACK_SID}", shard.id);
            super::internal::op(&runtime.session, shard, line.as_bytes());
            shard.broadcast_interest();
        }
        let runtime = match &shard.config().store_dir {
            Some(store) => {
                let dir = OsDirectory::open(store.join(SESSIONS_DIR))?;
                let mut runtime = Rc::into_inner(runtime).expect("not shared yet");
                runtime.sessions_dir = Some(dir);
                runtime.gateway.get_mut().enable_persistence();
                let runtime = Rc::new(runtime);
                runtime.restore_sessions(shard)?;
                runtime
            }
            None => runtime,
        };
        Ok(runtime)
    }

    /// Brings back the sessions this shard owns from `<store>/devices`.
    fn restore_sessions(self: &Rc<Self>, shard: &Rc<Shard>) -> std::io::Result<()> {
        let Some(dir) = &self.sessions_dir else {
            return Ok(());
        };
        let mut actions = Vec::new();
        let mut restored = 0usize;
        for name in dir.list()? {
            if !name.ends_with(SESSION_FILE_SUFFIX) {
                continue;
            }
            let bytes = match read_whole(dir, &name) {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::warn!(
                        shard = shard.id,
                        "devices: stored session {name} unreadable: {e}"
                    );
                    continue;
                }
            };
            let now = self.now_ms();
            match self.gateway.borrow_mut().restore(&bytes, now, &mut actions) {
                Ok(Some(_)) => restored += 1,
                Ok(None) => {}
                // Written whole or not at all (temp file + rename), so this is
                // damage from outside: say so, keep the file for inspection.
                Err(e) => tracing::warn!(
                    shard = shard.id,
                    "devices: stored session {name} not restored: {e}"
                ),
            }
        }
        if restored > 0 {
            tracing::info!(
                shard = shard.id,
                "devices: restored {restored} stored sessions"
            );
        }
        self.carry_out(shard, actions);
        Ok(())
    }

    /// Writes (or removes) the stored sessions the gateway says changed. A
    /// failed write is retried with the next change; the session in memory is
    /// untouched by it.
    fn persist(&self) {
        let Some(dir) = &self.sessions_dir else {
            return;
        };
        let changes = self.gateway.borrow_mut().take_changes();
        for (client_id, bytes) in changes {
            let name = session_file_name(&client_id);
            let result = match &bytes {
                Some(bytes) => replace_atomically(dir, &name, bytes).map_err(|e| e.to_string()),
                None => match dir.remove(&name) {
                    Ok(()) => dir.sync().map_err(|e| e.to_string()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e.to_string()),
                },
            };
            if let Err(e) = result {
                tracing::warn!("devices: storing session {name}: {e}");
                self.gateway.borrow_mut().retry_change(client_id);
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// `(sessions, counters)` for monitoring.
    pub(crate) fn report(&self) -> (usize, crate::lite::gateway::Stats) {
        let gateway = self.gateway.borrow();
        (gateway.session_count(), gateway.stats)
    }

    /// A datagram forwarded by another shard.
    pub(crate) fn handle_forwarded(
        self: &Rc<Self>,
        shard: &Rc<Shard>,
        datagram: ForwardedDatagram,
    ) {
        self.handle(shard, Peer::Udp(datagram.from), &datagram.bytes, true);
    }

    /// One frame (or datagram) from a device.
    fn handle(self: &Rc<Self>, shard: &Rc<Shard>, from: Peer, bytes: &[u8], forwarded: bool) {
        shard.mark_active();
        shard.apply_arrived_interest();
        let mut actions = Vec::new();
        self.gateway.borrow_mut().handle_datagram(
            from,
            bytes,
            forwarded,
            self.now_ms(),
            &mut actions,
        );
        self.carry_out(shard, actions);
    }

    /// Does what the gateway asked, in order.
    fn carry_out(self: &Rc<Self>, shard: &Rc<Shard>, actions: Vec<Action>) {
        for action in actions {
            match action {
                // Already sealed by the gateway where the device has a key.
                Action::Send { to, frame } => self.send(to, &frame),
                Action::Publish {
                    subject,
                    reply,
                    payload,
                    ack,
                    qos1,
                } => match ack {
                    Some((to, msg_id)) if captured_by_stream(shard, &subject) => {
                        self.publish_to_store(shard, &subject, &payload, to, msg_id)
                    }
                    Some((to, msg_id)) => {
                        let headers = qos1.then_some(QOS1_HEADERS.as_bytes());
                        self.publish(shard, &subject, reply.as_deref(), headers, &payload);
                        self.send_frame(
                            to,
                            encode(&Frame::Puback {
                                msg_id,
                                code: Code::Ok,
                            }),
                        );
                    }
                    None => {
                        let headers = qos1.then_some(QOS1_HEADERS.as_bytes());
                        self.publish(shard, &subject, reply.as_deref(), headers, &payload)
                    }
                },
                Action::AckAgain { to, msg_id } => {
                    let waiting = self
                        .store_acks
                        .borrow()
                        .values()
                        .any(|&(peer, id)| peer == to && id == msg_id);
                    // Still waiting for the store: its ack comes with the fsync.
                    if !waiting {
                        self.send_frame(
                            to,
                            encode(&Frame::Puback {
                                msg_id,
                                code: Code::Ok,
                            }),
                        );
                    }
                }
                Action::Subscribe {
                    sid,
                    filter,
                    suback,
                } => {
                    let mut line = b"SUB ".to_vec();
                    line.extend_from_slice(&filter);
                    line.extend_from_slice(format!(" {sid}").as_bytes());
                    if let Some(sub) = super::internal::op(&self.session, shard, &line) {
                        self.subscriptions.borrow_mut().insert(sid, sub);
                    }
                    // SUBACK once every shard routes to it (the SUB barrier).
                    let Some((to, req_id)) = suback else {
                        continue;
                    };
                    let (shard, runtime) = (Rc::clone(shard), Rc::clone(self));
                    tokio::task::spawn_local(async move {
                        shard.broadcast_interest_and_wait().await;
                        runtime.send_frame(
                            to,
                            encode(&Frame::Suback {
                                req_id,
                                code: Code::Ok,
                            }),
                        );
                    });
                }
                Action::Unsubscribe { sid } => {
                    if self.subscriptions.borrow_mut().remove(&sid).is_some() {
                        super::internal::op(
                            &self.session,
                            shard,
                            format!("UNSUB {sid}").as_bytes(),
                        );
                        shard.broadcast_interest();
                    }
                }
                Action::Forward {
                    shard: owner,
                    from,
                    datagram,
                } => {
                    let _ = shard.shared.peers.control[owner].send(Control::DeviceDatagram(
                        ForwardedDatagram {
                            from,
                            bytes: datagram,
                        },
                    ));
                }
            }
        }
        self.flush(shard);
        self.persist();
    }

    /// A frame of the shell's own (an ack the gateway left to it): sealed
    /// first when the session at `to` is a keyed device's.
    fn send_frame(&self, to: Peer, frame: Vec<u8>) {
        let frame = self.gateway.borrow().outbound(to, frame);
        self.send(to, &frame);
    }

    fn send(&self, to: Peer, frame: &[u8]) {
        match to {
            Peer::Udp(addr) => {
                let Some(udp) = &self.udp else { return };
                // UDP: a full socket buffer drops the datagram, like the network would.
                if let Err(e) = udp.try_send_to(frame, addr) {
                    tracing::debug!(%addr, "device datagram not sent: {e}");
                }
            }
            Peer::Stream(id) => {
                let Some(stream) = self.streams.borrow().get(&id).cloned() else {
                    return;
                };
                let mut bytes = stream.bytes.borrow_mut();
                let at = bytes.len();
                let room = match stream.framing {
                    Framing::Tcp => tcp::PREFIX_BYTES_MAX + frame.len(),
                    Framing::Serial => serial::encoded_len_max(frame.len()),
                };
                bytes.resize(at + room, 0);
                let written = match stream.framing {
                    Framing::Tcp => tcp::encode_prefix(frame.len(), &mut bytes[at..]).map(|n| {
                        bytes[at + n..at + n + frame.len()].copy_from_slice(frame);
                        n + frame.len()
                    }),
                    Framing::Serial => serial::encode_bytes(frame, &mut bytes[at..]),
                };
                match written {
                    Ok(n) => bytes.truncate(at + n),
                    Err(_) => bytes.truncate(at),
                }
                if bytes.len() > STREAM_PENDING_BYTES_MAX {
                    // A device that does not read is closed, not waited for.
                    stream.closed.set(true);
                }
                stream.ready.notify_one();
            }
        }
    }

    /// A QoS 1 publish into a stream: it carries a reply subject of ours and a
    /// `Nats-Msg-Id` (so the stream drops a retransmit even after a broker
    /// restart), and the device's PUBACK waits for the stream's PubAck, which
    /// the stream sends only once the message is fsynced.
    fn publish_to_store(
        &self,
        shard: &Rc<Shard>,
        subject: &[u8],
        payload: &[u8],
        to: Peer,
        msg_id: u32,
    ) {
        let n = self.next_store_ack.get();
        self.next_store_ack.set(n + 1);
        {
            let mut acks = self.store_acks.borrow_mut();
            if acks.len() >= STORE_ACKS_PENDING_MAX {
                acks.pop_first();
            }
            acks.insert(n, (to, msg_id));
        }
        let reply = format!("{STORE_ACK_PREFIX}{}.{n}", shard.id);
        let client = self.gateway.borrow().client_id_at(to).unwrap_or_default();
        let headers = format!(
            "NATS/1.0\r\nNats-Msg-Id: dev.{}.{msg_id}\r\n{QOS_HEADER}: 1\r\n\r\n",
            String::from_utf8_lossy(&client)
        );
        self.publish(
            shard,
            subject,
            Some(reply.as_bytes()),
            Some(headers.as_bytes()),
            payload,
        );
    }

    /// A stream answered a device's QoS 1 publish: PUBACK it (sealed by
    /// `gateway`, which the caller holds borrowed).
    fn store_acked(&self, gateway: &Gateway, reply_subject: &[u8], pub_ack: &[u8]) {
        let n = reply_subject
            .rsplit(|&b| b == b'.')
            .next()
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<u64>().ok());
        let Some((to, msg_id)) = n.and_then(|n| self.store_acks.borrow_mut().remove(&n)) else {
            return;
        };
        let failed = pub_ack.windows(8).any(|w| w == b"\"error\"");
        let code = if failed { Code::StoreFailed } else { Code::Ok };
        let frame = gateway.outbound(to, encode(&Frame::Puback { msg_id, code }));
        self.send(to, &frame);
    }

    /// Routes a device's message like a publish from a client of this shard.
    fn publish(
        &self,
        shard: &Rc<Shard>,
        subject: &[u8],
        reply: Option<&[u8]>,
        headers: Option<&[u8]>,
        payload: &[u8],
    ) {
        let msg = Message {
            subject,
            reply,
            headers,
            payload,
        };
        let mut outgoing = self.outgoing.borrow_mut();
        let mut targets = shard.route_targets.borrow_mut();
        let outcome = shard.router.borrow_mut().route(&msg, None, &mut targets);
        if outcome.remote_shards > 0 {
            outgoing.push_targets_as(
                &mut targets,
                None,
                &msg,
                shard.shared.shard_count,
                &shard.batch_pool,
                shard.id,
                false,
            );
        }
    }

    /// Sends the pass's cross-shard batches; a full mailbox waits in a task of
    /// its own, never in the socket loop.
    fn flush(self: &Rc<Self>, shard: &Rc<Shard>) {
        shard.broadcast_interest();
        let blocked = self.outgoing.borrow_mut().try_flush(&shard.shared.peers);
        if blocked {
            let mut pending = std::mem::replace(&mut *self.outgoing.borrow_mut(), Outgoing::new());
            let shard = Rc::clone(shard);
            tokio::task::spawn_local(async move {
                pending.flush_blocked(&shard.shared.peers).await;
            });
        }
    }

    /// Registers a stream connection; returns its peer and output queue.
    fn open_stream(&self, framing: Framing) -> (Peer, Rc<StreamOut>) {
        let id = self.next_stream.get();
        self.next_stream.set(id + 1);
        let out = Rc::new(StreamOut {
            framing,
            bytes: RefCell::new(Vec::new()),
            ready: Notify::new(),
            closed: Cell::new(false),
        });
        self.streams.borrow_mut().insert(id, Rc::clone(&out));
        (Peer::Stream(id), out)
    }

    fn close_stream(self: &Rc<Self>, shard: &Rc<Shard>, peer: Peer) {
        if let Peer::Stream(id) = peer {
            if let Some(out) = self.streams.borrow_mut().remove(&id) {
                out.closed.set(true);
                out.ready.notify_one();
            }
        }
        let mut actions = Vec::new();
        self.gateway.borrow_mut().stream_closed(peer, &mut actions);
        self.carry_out(shard, actions);
    }
}

/// Starts a shard's device side: the gateway, and a task per socket or line.
pub(crate) fn start(
    shard: &Rc<Shard>,
    sockets: DeviceSockets,
) -> std::io::Result<Rc<DeviceRuntime>> {
    let runtime =
        DeviceRuntime::start(shard, sockets.udp, sockets.predefined, sockets.credentials)?;
    if runtime.udp.is_some() {
        tokio::task::spawn_local(udp_loop(Rc::clone(shard), Rc::clone(&runtime)));
    }
    if let Some(listener) = sockets.tcp {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tokio::task::spawn_local(tcp_accept_loop(
            Rc::clone(shard),
            Rc::clone(&runtime),
            listener,
        ));
    }
    for (path, baud) in sockets.serial {
        let line = open_serial(&path, baud)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        tracing::info!(
            shard = shard.id,
            "devices: serial line {} at {baud} baud",
            path.display()
        );
        let (reader, writer) = tokio::io::split(line);
        let (peer, out) = runtime.open_stream(Framing::Serial);
        tokio::task::spawn_local(stream_reader(
            Rc::clone(shard),
            Rc::clone(&runtime),
            peer,
            Framing::Serial,
            reader,
        ));
        tokio::task::spawn_local(stream_writer(out, writer));
    }
    tokio::task::spawn_local(deliveries(Rc::clone(shard), Rc::clone(&runtime)));
    tokio::task::spawn_local(expiry(Rc::clone(shard), Rc::clone(&runtime)));
    Ok(runtime)
}

async fn udp_loop(shard: Rc<Shard>, runtime: Rc<DeviceRuntime>) {
    let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
    loop {
        let Some(udp) = &runtime.udp else { return };
        let (n, from) = match udp.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                tracing::debug!(shard = shard.id, "device socket: {e}");
                continue;
            }
        };
        runtime.handle(&shard, Peer::Udp(from), &buf[..n], false);
    }
}

async fn tcp_accept_loop(
    shard: Rc<Shard>,
    runtime: Rc<DeviceRuntime>,
    listener: tokio::net::TcpListener,
) {
    loop {
        let (stream, peer_addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(shard = shard.id, "device accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tracing::debug!(shard = shard.id, %peer_addr, "device connected over TCP");
        let (reader, writer) = stream.into_split();
        let (peer, out) = runtime.open_stream(Framing::Tcp);
        tokio::task::spawn_local(stream_reader(
            Rc::clone(&shard),
            Rc::clone(&runtime),
            peer,
            Framing::Tcp,
            reader,
        ));
        tokio::task::spawn_local(stream_writer(out, writer));
    }
}

/// Reads frames from a stream device until it closes or breaks the framing.
async fn stream_reader(
    shard: Rc<Shard>,
    runtime: Rc<DeviceRuntime>,
    peer: Peer,
    framing: Framing,
    mut reader: impl AsyncRead + Unpin,
) {
    let mut chunk = vec![0u8; STREAM_READ_BYTES];
    // TCP: bytes of an incomplete frame (bounded by the largest frame).
    let mut pending: Vec<u8> = Vec::new();
    let mut deframer =
        Box::new(serial::Deframer::<{ serial::DEFRAMER_BYTES_FOR_FRAME_MAX }>::new());
    'reading: loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match framing {
            Framing::Tcp => {
                pending.extend_from_slice(&chunk[..n]);
                let mut used = 0;
                loop {
                    match tcp::split_frame(&pending[used..]) {
                        None => break,
                        Some(Ok((frame, consumed))) => {
                            let frame = frame.to_vec();
                            used += consumed;
                            runtime.handle(&shard, peer, &frame, true);
                        }
                        Some(Err(e)) => {
                            // A broken length prefix cannot be resynchronised.
                            tracing::debug!(shard = shard.id, "device TCP framing: {e}; closing");
                            break 'reading;
                        }
                    }
                }
                pending.drain(..used);
            }
            Framing::Serial => {
                let mut input = &chunk[..n];
                while let Some((frame, rest)) = deframer.feed(input) {
                    let frame = frame.to_vec();
                    input = rest;
                    runtime.handle(&shard, peer, &frame, true);
                }
            }
        }
        let closed = match peer {
            Peer::Stream(id) => runtime
                .streams
                .borrow()
                .get(&id)
                .is_none_or(|o| o.closed.get()),
            Peer::Udp(_) => false,
        };
        if closed {
            break;
        }
    }
    if framing == Framing::Serial {
        let stats = deframer.stats();
        tracing::info!(
            shard = shard.id,
            frames = stats.frames,
            corrupt = stats.corrupt_dropped,
            "serial line closed"
        );
    }
    runtime.close_stream(&shard, peer);
}

/// Writes what the gateway queued for a stream device, coalesced.
async fn stream_writer(out: Rc<StreamOut>, mut writer: impl AsyncWrite + Unpin) {
    loop {
        let bytes = std::mem::take(&mut *out.bytes.borrow_mut());
        if bytes.is_empty() {
            if out.closed.get() {
                break;
            }
            out.ready.notified().await;
            continue;
        }
        if writer.write_all(&bytes).await.is_err() {
            out.closed.set(true);
            break;
        }
    }
    let _ = writer.shutdown().await;
}

async fn deliveries(shard: Rc<Shard>, runtime: Rc<DeviceRuntime>) {
    loop {
        runtime.session.output_ready().await;
        let frames = runtime.session.take_output(Vec::new());
        runtime.session.written();
        let mut actions = Vec::new();
        let now = runtime.now_ms();
        {
            let mut gateway = runtime.gateway.borrow_mut();
            super::internal::for_each_frame(shard.id, &frames, |msg| {
                let Some(sid) = std::str::from_utf8(msg.sid)
                    .ok()
                    .and_then(|s| s.parse().ok())
                else {
                    return;
                };
                if sid == STORE_ACK_SID {
                    runtime.store_acked(&gateway, msg.subject, msg.payload);
                    return;
                }
                let reply = (!msg.reply.is_empty()).then_some(msg.reply);
                gateway.deliver(
                    sid,
                    msg.subject,
                    reply,
                    msg.headers,
                    msg.payload,
                    now,
                    &mut actions,
                );
            });
        }
        runtime.carry_out(&shard, actions);
    }
}

async fn expiry(shard: Rc<Shard>, runtime: Rc<DeviceRuntime>) {
    loop {
        let now = runtime.now_ms();
        let next = runtime.gateway.borrow().next_expiry_ms();
        let wait_ms = next.map_or(EXPIRY_TICK_MS, |at| {
            at.saturating_sub(now).clamp(1, EXPIRY_TICK_MS)
        });
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        let mut actions = Vec::new();
        runtime
            .gateway
            .borrow_mut()
            .expire(runtime.now_ms(), &mut actions);
        if !actions.is_empty() {
            runtime.carry_out(&shard, actions);
        }
    }
}

/// Whether a stream captures `subject` (then a QoS 1 ack waits for its fsync).
/// QoS 1 device publishes only: the catalog's lock is not on the NATS path.
fn captured_by_stream(shard: &Shard, subject: &[u8]) -> bool {
    let Some(js) = &shard.shared.js else {
        return false;
    };
    let Ok(catalog) = js.catalog.lock() else {
        return false;
    };
    catalog.streams.values().any(|stream| {
        let config = &stream.config;
        if config.subjects.is_empty() {
            config.name.as_bytes() == subject
        } else {
            config
                .subjects
                .iter()
                .any(|pattern| crate::nats::subject::subject_matches(pattern.as_bytes(), subject))
        }
    })
}

/// A serial line, raw mode at `baud`, non-blocking, in tokio's reactor.
struct SerialLine {
    fd: AsyncFd<OwnedFd>,
}

fn open_serial(path: &std::path::Path, baud: u32) -> std::io::Result<SerialLine> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: open(2) with a valid C string.
    let fd = unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just opened and own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    serial_raw_mode(fd, baud)?;
    // SAFETY: `owned` is an open descriptor the AsyncFd owns from here on, so
    // it stays open and the same for the AsyncFd's whole life.
    let fd = unsafe { AsyncFd::register(owned) }.map_err(std::io::Error::from)?;
    Ok(SerialLine { fd })
}

/// Puts a tty in raw mode at `baud` (8N1, no flow control, no echo, no line
/// editing): what the device protocol's serial framing expects.
pub fn serial_raw_mode(fd: std::os::fd::RawFd, baud: u32) -> std::io::Result<()> {
    let speed = baud_constant(baud).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("unsupported baud rate {baud}"),
        )
    })?;
    // SAFETY: termios calls on an open tty with a zeroed struct tcgetattr fills.
    unsafe {
        let mut tio: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut tio) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut tio);
        tio.c_cflag |= libc::CLOCAL | libc::CREAD;
        libc::cfsetispeed(&mut tio, speed);
        libc::cfsetospeed(&mut tio, speed);
        if libc::tcsetattr(fd, libc::TCSANOW, &tio) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn baud_constant(baud: u32) -> Option<libc::speed_t> {
    Some(match baud {
        1200 => libc::B1200,
        2400 => libc::B2400,
        4800 => libc::B4800,
        9600 => libc::B9600,
        19200 => libc::B19200,
        38400 => libc::B38400,
        57600 => libc::B57600,
        115200 => libc::B115200,
        230400 => libc::B230400,
        460800 => libc::B460800,
        921600 => libc::B921600,
        _ => return None,
    })
}

impl AsyncRead for SerialLine {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            // SAFETY: read(2) into a valid, initialised buffer of that length.
            let result = guard.try_io(|fd| {
                let n = unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // EIO: the other end of a pty hung up; end of stream.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for SerialLine {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            // SAFETY: write(2) from a valid buffer.
            let result = guard.try_io(|fd| {
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
