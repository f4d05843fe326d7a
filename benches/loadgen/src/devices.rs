//! The device scenarios: a fleet of simulated microcontrollers.
//!
//! - `device-fan-in`: N devices each publish M QoS 0 readings to their own
//!   subject, counted by one NATS subscriber on `sensors.>`. Against perch the
//!   devices speak the compact device protocol (docs/device-protocol.md) over
//!   UDP, one socket per device; against nats-server, which has no device
//!   protocol, the same fleet speaks NATS over TCP, one connection per device.
//! - `device-idle` (perch only): N sessions that CONNECT and REGISTER one
//!   subject, then half of them SUBSCRIBE and go to sleep; server RSS per
//!   session.
//!
//! Frames are built and read with `perch-wire`, the crate firmware links, so
//! the bytes are the ones a real device sends. UDP may drop: every request of
//! the setup is retransmitted until its answer arrives, and the publishing is
//! paced by a window (see [`Window`]) so that the server's socket buffer is
//! not simply overrun; what is lost anyway is counted, and a run that
//! delivers less than 99 % fails.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use perch_wire::{decode_from_broker, Code, Frame, Qos, TopicRef};
use serde_json::{json, Value};

use crate::proto::{is_read_timeout, pub_batch, Conn, FrameKind, STREAM_READ_BUFFER_BYTES};
use crate::scenarios::{connect_many, join_thread, CpuWindow, Measurement, Params};
use crate::server::RunningServer;

/// Keepalive every simulated device announces in CONNECT (the broker closes
/// a session silent for 1.5 × this, far beyond any run).
const KEEPALIVE_S: u32 = 300;
/// Sleep duration of device-idle's sleeping sessions.
const SLEEP_S: u32 = 600;
/// How long one blocking receive on a device socket waits before the caller
/// re-checks its retransmit time and deadline.
const RECV_POLL: Duration = Duration::from_millis(50);
/// A request without its answer after this long is sent again.
const RETRANSMIT_AFTER: Duration = Duration::from_millis(250);
/// A sender whose window has been full this long with nothing arriving at
/// the subscriber writes off what is outstanding as lost.
const WINDOW_STALL: Duration = Duration::from_millis(100);
/// How long a sender blocked by the window sleeps before looking again.
const WINDOW_WAIT: Duration = Duration::from_micros(50);
/// After the last send: stop waiting for stragglers once nothing has
/// arrived for this long.
const DRAIN_QUIET: Duration = Duration::from_millis(500);
/// A device-fan-in run that delivers less than this fraction of what was
/// sent fails.
const DELIVERED_FRACTION_MIN: f64 = 0.99;
/// The request ids the devices use.
const REGISTER_REQ_ID: u32 = 1;
const SUBSCRIBE_REQ_ID: u32 = 2;

/// The client id of device `index`.
fn client_id(index: usize) -> String {
    format!("d{index}")
}

/// The subject device `index` publishes to.
fn device_subject(index: usize) -> String {
    format!("sensors.d{index}.t")
}

/// The bytes of one frame, encoded with perch-wire.
pub fn encode(frame: &Frame<'_>) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; frame.encoded_len()];
    let written = frame
        .encode(&mut buf)
        .map_err(|error| anyhow!("encoding {}: {error}", frame.frame_type().name()))?;
    buf.truncate(written);
    Ok(buf)
}

/// One simulated device with a session at perch: its own UDP socket,
/// connected to the broker's device port.
struct UdpDevice {
    index: usize,
    socket: UdpSocket,
    /// The topic id its REGACK bound to [`device_subject`].
    topic: u32,
    /// Requests sent again because no answer came in time.
    retransmits: u64,
}

impl UdpDevice {
    fn open(index: usize, broker: SocketAddr) -> Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0").context("binding a device socket")?;
        socket
            .connect(broker)
            .with_context(|| format!("connecting a device socket to {broker}"))?;
        socket
            .set_read_timeout(Some(RECV_POLL))
            .context("setting the read timeout")?;
        Ok(Self {
            index,
            socket,
            topic: 0,
            retransmits: 0,
        })
    }

    /// Sends `request` and waits for the answer `answer` accepts (`Some`),
    /// sending the request again every [`RETRANSMIT_AFTER`] until `deadline`.
    /// Frames it returns `None` for (late copies of earlier answers) are
    /// skipped; an ERROR frame fails.
    fn exchange<T>(
        &mut self,
        request: &[u8],
        what: &str,
        deadline: Instant,
        answer: impl Fn(&Frame<'_>) -> Result<Option<T>>,
    ) -> Result<T> {
        let mut buf = [0u8; 2048];
        loop {
            self.socket
                .send(request)
                .with_context(|| format!("device {} sending {what}", self.index))?;
            let resend_at = Instant::now() + RETRANSMIT_AFTER;
            loop {
                match self.socket.recv(&mut buf) {
                    Ok(received_bytes) => {
                        let datagram = &buf[..received_bytes];
                        let frame = decode_from_broker(datagram).map_err(|error| {
                            anyhow!(
                                "device {}: undecodable answer to {what} ({error}): {datagram:02x?}",
                                self.index
                            )
                        })?;
                        if let Frame::Error {
                            code,
                            ref_type,
                            ref_id,
                        } = frame
                        {
                            bail!(
                                "device {}: the broker refused {what}: ERROR {code:?} (frame {:?}, id {ref_id})",
                                self.index,
                                ref_type.map(|frame_type| frame_type.name())
                            );
                        }
                        if let Some(value) = answer(&frame)
                            .with_context(|| format!("device {}: {what}", self.index))?
                        {
                            return Ok(value);
                        }
                    }
                    Err(error) if is_read_timeout(&error) => {}
                    Err(error) => {
                        return Err(error).with_context(|| {
                            format!("device {} waiting for the answer to {what}", self.index)
                        })
                    }
                }
                let now = Instant::now();
                if now >= deadline {
                    bail!(
                        "device {}: no answer to {what} by the deadline ({} retransmissions)",
                        self.index,
                        self.retransmits
                    );
                }
                if now >= resend_at {
                    break;
                }
            }
            self.retransmits += 1;
        }
    }

    /// CONNECT (clean session, keepalive [`KEEPALIVE_S`], client id `d<i>`)
    /// → CONNACK OK.
    fn connect(&mut self, deadline: Instant) -> Result<()> {
        let id = client_id(self.index);
        let request = encode(&Frame::Connect {
            version: perch_wire::PROTOCOL_VERSION,
            clean_session: true,
            keepalive_s: KEEPALIVE_S,
            client_id: id.as_bytes(),
            will: None,
        })?;
        self.exchange(&request, "CONNECT", deadline, |frame| match frame {
            Frame::Connack { code: Code::Ok, .. } => Ok(Some(())),
            Frame::Connack { code, .. } => bail!("CONNACK {code:?}"),
            _ => Ok(None),
        })
    }

    /// REGISTER [`device_subject`] → REGACK OK with the topic id.
    fn register(&mut self, deadline: Instant) -> Result<()> {
        let subject = device_subject(self.index);
        let request = encode(&Frame::Register {
            id: REGISTER_REQ_ID,
            subject: subject.as_bytes(),
        })?;
        self.topic = self.exchange(&request, "REGISTER", deadline, |frame| match *frame {
            Frame::Regack {
                req_id: REGISTER_REQ_ID,
                topic,
                code: Code::Ok,
            } => Ok(Some(topic)),
            Frame::Regack {
                req_id: REGISTER_REQ_ID,
                code,
                ..
            } => bail!("REGACK {code:?}"),
            _ => Ok(None),
        })?;
        Ok(())
    }

    /// SUBSCRIBE `cmd.d<i>` at QoS 0 → SUBACK OK.
    fn subscribe_commands(&mut self, deadline: Instant) -> Result<()> {
        let filter = format!("cmd.{}", client_id(self.index));
        let request = encode(&Frame::Subscribe {
            req_id: SUBSCRIBE_REQ_ID,
            max_qos: Qos::AtMostOnce,
            filter: filter.as_bytes(),
        })?;
        self.exchange(&request, "SUBSCRIBE", deadline, |frame| match *frame {
            Frame::Suback {
                req_id: SUBSCRIBE_REQ_ID,
                code: Code::Ok,
            } => Ok(Some(())),
            Frame::Suback {
                req_id: SUBSCRIBE_REQ_ID,
                code,
            } => bail!("SUBACK {code:?}"),
            _ => Ok(None),
        })
    }

    /// DISCONNECT with a sleep of [`SLEEP_S`] → the broker's DISCONNECT.
    fn sleep(&mut self, deadline: Instant) -> Result<()> {
        let request = encode(&Frame::Disconnect {
            sleep_s: Some(SLEEP_S),
        })?;
        self.exchange(&request, "DISCONNECT (sleep)", deadline, |frame| {
            Ok(matches!(frame, Frame::Disconnect { .. }).then_some(()))
        })
    }

    /// PING → PONG: the session is still there (a sleeper wakes, gets its
    /// buffered messages, none here, and the PONG).
    fn ping(&mut self, deadline: Instant) -> Result<()> {
        let request = encode(&Frame::Ping)?;
        self.exchange(&request, "PING", deadline, |frame| {
            Ok(matches!(frame, Frame::Pong).then_some(()))
        })
    }

    /// The QoS 0 PUBLISH of `payload` to its registered topic.
    fn publish_datagram(&self, payload: &[u8]) -> Result<Vec<u8>> {
        let datagram = encode(&Frame::Publish {
            qos: Qos::AtMostOnce,
            topic: TopicRef::Registered(self.topic),
            msg_id: 0,
            payload,
        })?;
        if datagram.len() > perch_wire::FRAME_BYTES_MAX {
            bail!(
                "a {}-byte PUBLISH is over the device protocol's {}-byte UDP frame limit (--payload-bytes)",
                datagram.len(),
                perch_wire::FRAME_BYTES_MAX
            );
        }
        Ok(datagram)
    }
}

/// Runs `open(index)` for every index below `count` on `threads` threads
/// (thread t takes t, t + threads, …), stopping all at the first error.
fn spread<T: Send>(
    count: usize,
    threads: usize,
    open: &(dyn Fn(usize) -> Result<T> + Sync),
) -> Result<Vec<Vec<T>>> {
    let threads = threads.clamp(1, count.max(1));
    let failed = AtomicBool::new(false);
    thread::scope(|scope| {
        let failed = &failed;
        let handles: Vec<_> = (0..threads)
            .map(|first| {
                scope.spawn(move || -> Result<Vec<T>> {
                    let mut opened = Vec::with_capacity(count / threads + 1);
                    for index in (first..count).step_by(threads) {
                        if failed.load(Ordering::Relaxed) {
                            break;
                        }
                        match open(index) {
                            Ok(item) => opened.push(item),
                            Err(error) => {
                                failed.store(true, Ordering::Relaxed);
                                return Err(error);
                            }
                        }
                    }
                    Ok(opened)
                })
            })
            .collect();
        collect_threads(handles, "device setup")
    })
}

/// Runs `each` on every item, one thread per group, stopping all at the
/// first error.
fn for_each_parallel<T: Send>(
    groups: &mut [Vec<T>],
    each: &(dyn Fn(&mut T) -> Result<()> + Sync),
) -> Result<()> {
    let failed = AtomicBool::new(false);
    thread::scope(|scope| {
        let failed = &failed;
        let handles: Vec<_> = groups
            .iter_mut()
            .map(|group| {
                scope.spawn(move || -> Result<()> {
                    for item in group.iter_mut() {
                        if failed.load(Ordering::Relaxed) {
                            break;
                        }
                        if let Err(error) = each(item) {
                            failed.store(true, Ordering::Relaxed);
                            return Err(error);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        collect_threads(handles, "device").map(drop)
    })
}

/// Joins every thread; the first error wins.
fn collect_threads<T>(
    handles: Vec<thread::ScopedJoinHandle<'_, Result<T>>>,
    what: &str,
) -> Result<Vec<T>> {
    let mut results = Vec::with_capacity(handles.len());
    let mut first_error = None;
    for handle in handles {
        match join_thread(handle, what) {
            Ok(result) => results.push(result),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(results),
    }
}

/// How one fleet device reaches its server.
enum Link {
    /// perch: the device protocol, one datagram per message.
    Udp(UdpSocket),
    /// nats-server: NATS over TCP, one `PUB` per write.
    Tcp(Conn),
}

struct FleetDevice {
    index: usize,
    link: Link,
    /// One message, ready to send: a PUBLISH datagram or a `PUB` frame.
    message: Vec<u8>,
}

impl FleetDevice {
    fn send(&mut self) -> Result<()> {
        match &mut self.link {
            Link::Udp(socket) => {
                let sent = socket
                    .send(&self.message)
                    .with_context(|| format!("device {} PUBLISH", self.index))?;
                if sent != self.message.len() {
                    bail!(
                        "device {}: {sent} of {} bytes sent",
                        self.index,
                        self.message.len()
                    );
                }
            }
            Link::Tcp(conn) => conn
                .stream
                .write_all(&self.message)
                .with_context(|| format!("device {} PUB", self.index))?,
        }
        Ok(())
    }
}

/// Flow control shared by the sending threads: a message may be sent only
/// while fewer than `limit` sent messages have not yet arrived at the
/// subscriber. So the fleet goes as fast as the server delivers, while the
/// server's UDP receive buffer (212 992 B by default here, about 256 small
/// datagrams per socket) is not overrun just because the senders are
/// faster; on TCP the same window keeps both sides' fleets identical.
///
/// If the window stays full with nothing arriving for [`WINDOW_STALL`], what
/// is outstanding was dropped: it is written off (counted) and sending goes
/// on; the loss check at the end of the run still counts it as lost.
struct Window {
    limit: u64,
    /// Send tickets taken.
    tickets: AtomicU64,
    /// Messages whose send returned.
    sent: AtomicU64,
    /// Messages counted by the subscriber.
    received: AtomicU64,
    /// Messages presumed lost by a stall.
    written_off: AtomicU64,
    /// Stalls that wrote something off.
    stalls: AtomicU64,
}

impl Window {
    fn new(limit: u64) -> Self {
        Self {
            limit: limit.max(1),
            tickets: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            written_off: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
        }
    }

    fn has_room(&self, ticket: u64, received: u64) -> bool {
        ticket < received + self.written_off.load(Ordering::Relaxed) + self.limit
    }

    /// Writes off what is outstanding (sent, not received); true if that
    /// was more than had been written off already.
    fn write_off_outstanding(&self, received: u64) -> bool {
        let outstanding = self.sent.load(Ordering::Relaxed).saturating_sub(received);
        let before = self.written_off.fetch_max(outstanding, Ordering::Relaxed);
        if outstanding > before {
            self.stalls.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Takes the next ticket and waits until the window has room for it.
    fn acquire(&self, failed: &AtomicBool, deadline: Instant) -> Result<()> {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let mut received = self.received.load(Ordering::Relaxed);
        if self.has_room(ticket, received) {
            return Ok(());
        }
        let mut last_progress = Instant::now();
        loop {
            if failed.load(Ordering::Relaxed) {
                bail!("stopped: another thread failed");
            }
            thread::sleep(WINDOW_WAIT);
            let now_received = self.received.load(Ordering::Relaxed);
            if self.has_room(ticket, now_received) {
                return Ok(());
            }
            let now = Instant::now();
            if now_received != received {
                received = now_received;
                last_progress = now;
            } else if now - last_progress >= WINDOW_STALL {
                self.write_off_outstanding(now_received);
                last_progress = now;
            }
            if now >= deadline {
                bail!(
                    "message {ticket} still held by the window at the scenario deadline \
                     ({now_received} received)"
                );
            }
        }
    }

    fn sent_one(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts MSG frames into `received` until `target` or `stop`; returns the
/// count and when the last message arrived.
fn count_deliveries(
    mut conn: Conn,
    received: &AtomicU64,
    stop: &AtomicBool,
    target: u64,
    deadline: Instant,
) -> Result<(u64, Instant)> {
    let mut count = 0u64;
    let mut last_at = Instant::now();
    loop {
        let before = count;
        while let Some(frame) = conn.reader.next_frame()? {
            match frame.kind {
                FrameKind::Msg => count += 1,
                FrameKind::Ping => conn
                    .stream
                    .write_all(b"PONG\r\n")
                    .context("answering PING")?,
                FrameKind::Err => bail!(
                    "server sent {} after {count} messages",
                    String::from_utf8_lossy(conn.reader.bytes(frame.line))
                ),
                FrameKind::Pong | FrameKind::Ok | FrameKind::Info => {}
            }
        }
        if count != before {
            last_at = Instant::now();
            received.store(count, Ordering::Relaxed);
        }
        if count >= target || stop.load(Ordering::Relaxed) {
            return Ok((count, last_at));
        }
        if Instant::now() >= deadline {
            bail!("subscriber had received {count} messages when the scenario deadline passed");
        }
        conn.fill().with_context(|| {
            format!("subscriber connection failed after {count} messages (slow consumer?)")
        })?;
    }
}

/// The kernel's count of UDP datagrams dropped because a socket's receive
/// buffer was full (`RcvbufErrors` in /proc/net/snmp; for the whole network
/// namespace, so other UDP traffic on the machine counts too).
fn udp_rcvbuf_errors() -> Result<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").context("reading /proc/net/snmp")?;
    let mut udp_lines = snmp.lines().filter(|line| line.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp_lines.next(), udp_lines.next()) else {
        bail!("/proc/net/snmp has no Udp lines");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .context("/proc/net/snmp has no Udp RcvbufErrors")?
        .1
        .parse()
        .context("parsing Udp RcvbufErrors")
}

/// perch: UDP devices, each CONNECT → CONNACK, REGISTER → REGACK, its
/// PUBLISH datagram ready. Returns the devices per thread and the setup's
/// retransmissions.
fn udp_fleet(
    broker: SocketAddr,
    params: &Params,
    deadline: Instant,
) -> Result<(Vec<Vec<FleetDevice>>, u64)> {
    let payload = vec![b'x'; params.payload_bytes];
    let retransmits = AtomicU64::new(0);
    let groups = spread(params.device_count, params.connect_threads, &|index| {
        let mut device = UdpDevice::open(index, broker)?;
        let setup = device
            .connect(deadline)
            .and_then(|()| device.register(deadline));
        retransmits.fetch_add(device.retransmits, Ordering::Relaxed);
        setup?;
        let message = device.publish_datagram(&payload)?;
        Ok(FleetDevice {
            index,
            link: Link::Udp(device.socket),
            message,
        })
    })?;
    Ok((groups, retransmits.into_inner()))
}

/// nats-server: TCP devices, each CONNECT + PING/PONG, its `PUB` ready.
fn tcp_fleet(
    server: SocketAddr,
    params: &Params,
    deadline: Instant,
) -> Result<Vec<Vec<FleetDevice>>> {
    let groups = connect_many(
        server,
        params.device_count,
        params.connect_threads,
        deadline,
        &|_| Vec::new(),
    )?;
    Ok(groups
        .into_iter()
        .map(|group| {
            group
                .into_iter()
                .map(|(index, conn)| FleetDevice {
                    index,
                    link: Link::Tcp(conn),
                    message: pub_batch(&device_subject(index), params.payload_bytes, 1),
                })
                .collect()
        })
        .collect())
}

/// `device-fan-in`: the fleet's QoS 0 readings into one NATS subscriber.
pub(crate) fn device_fan_in(server: &RunningServer, params: &Params) -> Result<Measurement> {
    let devices = params.device_count;
    let expected = (devices * params.device_msgs) as u64;
    if expected == 0 {
        bail!("device-fan-in needs --device-count and --device-msgs of at least 1");
    }
    let setup_deadline = Instant::now() + params.timeout;
    let mut subscriber =
        Conn::open(server.addr, STREAM_READ_BUFFER_BYTES, setup_deadline).context("subscriber")?;
    subscriber
        .handshake(b"SUB sensors.> 1\r\n", setup_deadline)
        .context("subscriber")?;

    let setup_started = Instant::now();
    let (groups, setup_retransmits) = match server.device_udp {
        Some(broker) => {
            let (groups, retransmits) =
                udp_fleet(broker, params, setup_deadline).context("setting up the UDP devices")?;
            (groups, Some(retransmits))
        }
        None => (
            tcp_fleet(server.addr, params, setup_deadline).context("connecting the TCP devices")?,
            None,
        ),
    };
    let setup_s = setup_started.elapsed().as_secs_f64();

    let window = Window::new(params.device_window_msgs);
    let stop = AtomicBool::new(false);
    let failed = AtomicBool::new(false);
    let barrier = Barrier::new(groups.len() + 1);
    let msgs_per_device = params.device_msgs;
    let run_deadline = Instant::now() + params.timeout;
    let udp_drops_before = server.device_udp.map(|_| udp_rcvbuf_errors()).transpose()?;

    thread::scope(|scope| -> Result<Measurement> {
        let (window, stop, failed, barrier) = (&window, &stop, &failed, &barrier);
        let subscriber_handle = scope.spawn(move || {
            let result =
                count_deliveries(subscriber, &window.received, stop, expected, run_deadline)
                    .context("subscriber");
            if result.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            result
        });
        let sender_handles: Vec<_> = groups
            .into_iter()
            .map(|mut group| {
                scope.spawn(move || -> Result<Vec<FleetDevice>> {
                    barrier.wait();
                    // Round-robin over this thread's devices: reading k of
                    // every device, then reading k + 1, as a fleet reports.
                    let result = (|| {
                        for _ in 0..msgs_per_device {
                            for device in group.iter_mut() {
                                window.acquire(failed, run_deadline)?;
                                device.send()?;
                                window.sent_one();
                            }
                        }
                        Ok(())
                    })();
                    if let Err(error) = result {
                        failed.store(true, Ordering::Relaxed);
                        return Err(error);
                    }
                    // Keep the sockets open until the subscriber is done.
                    Ok(group)
                })
            })
            .collect();
        barrier.wait();
        let cpu = CpuWindow::start(server)?;
        let started = Instant::now();
        let senders = collect_threads(sender_handles, "device");
        // Drain: wait for the rest, or until nothing has arrived for a while.
        if senders.is_ok() {
            let mut last_count = window.received.load(Ordering::Relaxed);
            let mut last_progress = Instant::now();
            loop {
                let count = window.received.load(Ordering::Relaxed);
                let now = Instant::now();
                if count >= expected || failed.load(Ordering::Relaxed) || now >= run_deadline {
                    break;
                }
                if count != last_count {
                    (last_count, last_progress) = (count, now);
                } else if now - last_progress >= DRAIN_QUIET {
                    break;
                }
                thread::sleep(Duration::from_millis(1));
            }
        }
        let cpu = cpu.finish(server);
        stop.store(true, Ordering::Relaxed);
        let subscriber_result = join_thread(subscriber_handle, "subscriber");
        let open_devices = senders?;
        let (delivered, last_at) = subscriber_result?;
        let cpu = cpu?;
        drop(open_devices);
        let udp_drops = match udp_drops_before {
            Some(before) => Some(udp_rcvbuf_errors()?.saturating_sub(before)),
            None => None,
        };
        if delivered > expected {
            bail!("subscriber received {delivered} messages, more than the {expected} sent");
        }
        let delivered_fraction = delivered as f64 / expected as f64;
        if delivered_fraction < DELIVERED_FRACTION_MIN {
            bail!(
                "only {delivered} of {expected} messages ({:.2} %) reached the subscriber, \
                 below {:.0} %; kernel UDP receive-buffer drops meanwhile: {}, window stalls: {}",
                delivered_fraction * 100.0,
                DELIVERED_FRACTION_MIN * 100.0,
                udp_drops.map_or_else(|| "n/a (TCP)".to_string(), |drops| drops.to_string()),
                window.stalls.load(Ordering::Relaxed)
            );
        }
        // The rate's window ends with the last message; so do the cores
        // (after it the server idles while the loadgen waits for stragglers).
        let elapsed_s = (last_at - started).as_secs_f64().max(1e-9);
        let mut measurement = vec![
            ("delivered_msgs_per_s", delivered as f64 / elapsed_s),
            (
                "server_cpu_s_per_m_delivered",
                cpu.server_s_per_million(delivered)?,
            ),
            ("delivered_pct", delivered_fraction * 100.0),
            ("setup_s", setup_s),
            (
                "window_stalls",
                window.stalls.load(Ordering::Relaxed) as f64,
            ),
            ("server_cpu_cores", cpu.server.as_secs_f64() / elapsed_s),
            ("loadgen_cpu_cores", cpu.loadgen.as_secs_f64() / elapsed_s),
        ];
        if let Some(drops) = udp_drops {
            measurement.push(("udp_rcvbuf_drops", drops as f64));
        }
        if let Some(retransmits) = setup_retransmits {
            measurement.push(("setup_retransmits", retransmits as f64));
        }
        Ok(measurement)
    })
}

/// `device-idle` (perch only): RSS per idle and per sleeping session.
pub(crate) fn device_idle(server: &RunningServer, params: &Params) -> Result<Measurement> {
    let broker = server.device_udp.context(
        "device-idle needs perch's device UDP port (nats-server has no device sessions)",
    )?;
    let sessions = params.device_count;
    let sleepers = sessions / 2;
    if sleepers < 2 {
        bail!("device-idle needs --device-count of at least 4");
    }
    thread::sleep(params.settle);
    let rss_before_kib = server.rss_kib()?;

    // Idle sessions: CONNECT + REGISTER each.
    let setup_deadline = Instant::now() + params.timeout;
    let retransmits = AtomicU64::new(0);
    let cpu = CpuWindow::start(server)?;
    let mut groups = spread(sessions, params.connect_threads, &|index| {
        let mut device = UdpDevice::open(index, broker)?;
        let setup = device
            .connect(setup_deadline)
            .and_then(|()| device.register(setup_deadline));
        retransmits.fetch_add(device.retransmits, Ordering::Relaxed);
        device.retransmits = 0;
        setup.map(|()| device)
    })
    .context("setting up the idle sessions")?;
    let cpu = cpu.finish(server)?;
    thread::sleep(params.settle);
    let rss_idle_kib = server.rss_kib()?;

    // A quarter: DISCONNECT with a sleep (the session alone); then another
    // quarter: SUBSCRIBE cmd.d<i>, then DISCONNECT with a sleep.
    let quarter = sleepers / 2;
    let mut sleep_stage = |range: std::ops::Range<usize>, subscribe: bool| -> Result<u64> {
        let deadline = Instant::now() + params.timeout;
        for_each_parallel(&mut groups, &|device| {
            if !range.contains(&device.index) {
                return Ok(());
            }
            let result = if subscribe {
                device.subscribe_commands(deadline)
            } else {
                Ok(())
            }
            .and_then(|()| device.sleep(deadline));
            retransmits.fetch_add(device.retransmits, Ordering::Relaxed);
            device.retransmits = 0;
            result
        })
        .context("putting sessions to sleep")?;
        thread::sleep(params.settle);
        server.rss_kib()
    };
    let rss_asleep_kib = sleep_stage(0..quarter, false)?;
    let rss_sleeping_kib = sleep_stage(quarter..sleepers, true)?;

    // Every session must still be there: PING → PONG on each.
    let check_deadline = Instant::now() + params.timeout;
    for_each_parallel(&mut groups, &|device| device.ping(check_deadline))
        .context("sessions after settling")?;
    drop(groups);

    let per_idle_b = (rss_idle_kib as f64 - rss_before_kib as f64) * 1024.0 / sessions as f64;
    let asleep_extra_b = (rss_asleep_kib as f64 - rss_idle_kib as f64) * 1024.0 / quarter as f64;
    let sleep_extra_b =
        (rss_sleeping_kib as f64 - rss_asleep_kib as f64) * 1024.0 / (sleepers - quarter) as f64;
    Ok(vec![
        ("rss_per_idle_session_b", per_idle_b),
        ("rss_per_asleep_session_b", per_idle_b + asleep_extra_b),
        ("rss_per_sleeping_session_b", per_idle_b + sleep_extra_b),
        ("rss_sleep_extra_b", sleep_extra_b),
        ("rss_before_kib", rss_before_kib as f64),
        ("rss_idle_kib", rss_idle_kib as f64),
        ("rss_sleeping_kib", rss_sleeping_kib as f64),
        (
            "server_cpu_us_per_session",
            cpu.server.as_secs_f64() * 1e6 / sessions as f64,
        ),
        (
            "setup_retransmits",
            retransmits.load(Ordering::Relaxed) as f64,
        ),
    ])
}

/// One row of the bytes-on-the-wire table.
pub struct WireBytes {
    pub protocol: &'static str,
    /// Protocol bytes (no IP/UDP/TCP headers).
    pub bytes: usize,
    /// The figure is a lower bound ("≥").
    pub at_least: bool,
    /// Computed from the packet layout rather than stated by the spec.
    pub derived: bool,
    pub source: &'static str,
}

/// The payload of the comparison: a 4-byte reading.
const WIRE_PAYLOAD: &[u8] = b"21.5";
/// A registered topic id below 128 (one varint byte).
const WIRE_TOPIC: u32 = 5;

/// The perch device protocol's QoS 0 PUBLISH of [`WIRE_PAYLOAD`] to
/// registered topic [`WIRE_TOPIC`], as perch-wire encodes it.
pub fn perch_qos0_publish() -> Result<Vec<u8>> {
    encode(&Frame::Publish {
        qos: Qos::AtMostOnce,
        topic: TopicRef::Registered(WIRE_TOPIC),
        msg_id: 0,
        payload: WIRE_PAYLOAD,
    })
}

/// Bytes on the wire for a QoS 0 (best-effort) publish of a 4-byte payload.
/// perch's row is the frame perch-wire actually encodes; the other rows are
/// from /work/shared/reference/device-anchors.md ("Bytes on the wire for a
/// 4-byte payload"), protocol bytes only, which cites each specification:
/// - MQTT-SN 1.2 PUBLISH: Length 1 + MsgType 1 + Flags 1 + TopicId 2 +
///   MsgId 2 (sent as 0 at QoS 0) + data = 7 + 4 = 11 (§5.4.12).
/// - MQTT 3.1.1 PUBLISH, 10-byte topic: fixed header 2 + topic length 2 +
///   topic 10 + payload 4 = 18 (no packet id at QoS 0; §2.2, §3.3).
/// - CoAP NON POST with Uri-Path "t": header 4 + option 2 + payload marker 1
///   + payload 4 = 11 (derived; RFC 7252 §3).
/// - zenoh 1.x put on a declared key-expr id over UDP: ≥ 10 (derived from
///   the zenoh 1.0 frame format; ≥ 12 on TCP).
pub fn wire_bytes() -> Result<Vec<WireBytes>> {
    Ok(vec![
        WireBytes {
            protocol: "perch device protocol, registered topic id < 128",
            bytes: perch_qos0_publish()?.len(),
            at_least: false,
            derived: false,
            source: "encoded by perch-wire (docs/device-protocol.md §2)",
        },
        WireBytes {
            protocol: "MQTT-SN 1.2 PUBLISH QoS 0 (registered, predefined or short topic)",
            bytes: 11,
            at_least: false,
            derived: false,
            source: "MQTT-SN v1.2 §5.4.12",
        },
        WireBytes {
            protocol: "MQTT 3.1.1 PUBLISH QoS 0, 10-byte topic",
            bytes: 18,
            at_least: false,
            derived: false,
            source: "MQTT 3.1.1 §2.2, §3.3",
        },
        WireBytes {
            protocol: "CoAP NON POST, Uri-Path \"t\"",
            bytes: 11,
            at_least: false,
            derived: true,
            source: "RFC 7252 §3",
        },
        WireBytes {
            protocol: "zenoh 1.x put on a declared key-expr id, UDP",
            bytes: 10,
            at_least: true,
            derived: true,
            source: "zenoh wire spec 1.0",
        },
    ])
}

/// The bytes-on-the-wire table (markdown) and its JSON line.
pub fn wire_bytes_table() -> Result<(String, Value)> {
    let rows = wire_bytes()?;
    let perch_frame = perch_qos0_publish()?;
    let perch_bytes = perch_frame.len() as f64;
    let hex: Vec<String> = perch_frame
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let mut table = format!(
        "### Bytes on the wire — QoS 0 publish of a 4-byte payload (protocol bytes, no IP/UDP/TCP headers)\n\n\
         perch's frame as perch-wire encodes it: `{}`\n\n\
         | protocol | bytes | × perch | source |\n|---|--:|--:|---|\n",
        hex.join(" ")
    );
    for row in &rows {
        let bound = if row.at_least { "≥ " } else { "" };
        let derived = if row.derived { " (derived)" } else { "" };
        table.push_str(&format!(
            "| {} | {bound}{}{derived} | {bound}{:.2}× | {} |\n",
            row.protocol,
            row.bytes,
            row.bytes as f64 / perch_bytes,
            row.source
        ));
    }
    table.push_str(
        "\nOther protocols' figures: /work/shared/reference/device-anchors.md (from the cited specifications).\n",
    );
    let json_line = json!({
        "type": "wire_bytes",
        "payload_bytes": WIRE_PAYLOAD.len(),
        "perch_frame_hex": hex.join(""),
        "rows": rows.iter().map(|row| json!({
            "protocol": row.protocol,
            "bytes": row.bytes,
            "at_least": row.at_least,
            "derived": row.derived,
            "source": row.source,
        })).collect::<Vec<_>>(),
    });
    Ok((table, json_line))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use perch_wire::{decode_from_device, Frame};

    use super::*;

    #[test]
    fn the_perch_publish_is_the_six_bytes_of_the_spec() {
        let frame = perch_qos0_publish().unwrap();
        // docs/device-protocol.md §7: "PUBLISH QoS 0, topic 5, 4-byte payload".
        assert_eq!(frame, [0x30, 0x05, 0x32, 0x31, 0x2e, 0x35]);
        assert!(matches!(
            decode_from_device(&frame).unwrap(),
            Frame::Publish {
                topic: TopicRef::Registered(5),
                ..
            }
        ));
    }

    #[test]
    fn wire_bytes_rows_match_their_layouts() {
        let rows = wire_bytes().unwrap();
        let bytes = |prefix: &str| {
            rows.iter()
                .find(|row| row.protocol.starts_with(prefix))
                .unwrap()
                .bytes
        };
        assert_eq!(bytes("perch"), 6);
        // Length, MsgType, Flags, TopicId (2), MsgId (2), data.
        assert_eq!(bytes("MQTT-SN 1.2"), 1 + 1 + 1 + 2 + 2 + 4);
        // Fixed header (2), topic length (2), topic, payload.
        assert_eq!(bytes("MQTT 3.1.1"), 2 + 2 + 10 + 4);
        // Header (4), Uri-Path option (1 + 1), payload marker, payload.
        assert_eq!(bytes("CoAP"), 4 + 2 + 1 + 4);
        assert_eq!(bytes("zenoh"), 10);
        let (table, json_line) = wire_bytes_table().unwrap();
        assert!(table.contains("`30 05 32 31 2e 35`"), "{table}");
        assert!(table.contains("| 6 | 1.00× |"), "{table}");
        assert!(table.contains("| 18 | 3.00× |"), "{table}");
        assert!(table.contains("| ≥ 10 (derived) | ≥ 1.67× |"), "{table}");
        assert_eq!(json_line["rows"][0]["bytes"], 6);
    }

    #[test]
    fn device_frames_are_the_documented_bytes() {
        // docs/device-protocol.md §7: "DISCONNECT, sleep for 600 s".
        assert_eq!(
            encode(&Frame::Disconnect {
                sleep_s: Some(SLEEP_S)
            })
            .unwrap(),
            [0xd1, 0xd8, 0x04]
        );
        let connect = encode(&Frame::Connect {
            version: perch_wire::PROTOCOL_VERSION,
            clean_session: true,
            keepalive_s: KEEPALIVE_S,
            client_id: client_id(7).as_bytes(),
            will: None,
        })
        .unwrap();
        // clean session, version 1, keepalive 300 = ac 02, "d7".
        assert_eq!(connect, [0x11, 0x01, 0xac, 0x02, 0x02, b'd', b'7']);
        assert_eq!(device_subject(7), "sensors.d7.t");
    }

    #[test]
    fn the_window_holds_senders_to_its_limit() {
        let window = Window::new(3);
        let failed = AtomicBool::new(false);
        let deadline = Instant::now() + Duration::from_secs(5);
        for _ in 0..3 {
            window.acquire(&failed, deadline).unwrap();
            window.sent_one();
        }
        // Ticket 3 needs one delivery; a failed run stops the wait.
        failed.store(true, Ordering::Relaxed);
        assert!(window.acquire(&failed, deadline).is_err());
        failed.store(false, Ordering::Relaxed);
        // (The failed attempt used ticket 3; ticket 4 needs two deliveries.)
        window.received.store(2, Ordering::Relaxed);
        window.acquire(&failed, deadline).unwrap();
    }

    #[test]
    fn a_stalled_window_writes_off_what_is_outstanding() {
        let window = Window::new(2);
        let failed = AtomicBool::new(false);
        let deadline = Instant::now() + Duration::from_secs(5);
        for _ in 0..2 {
            window.acquire(&failed, deadline).unwrap();
            window.sent_one();
        }
        // Nothing ever arrives: after WINDOW_STALL the two sent are written
        // off and ticket 2 may go.
        let started = Instant::now();
        window.acquire(&failed, deadline).unwrap();
        assert!(started.elapsed() >= WINDOW_STALL);
        assert_eq!(window.written_off.load(Ordering::Relaxed), 2);
        assert_eq!(window.stalls.load(Ordering::Relaxed), 1);
        // A write-off never shrinks.
        assert!(!window.write_off_outstanding(2));
        assert_eq!(window.written_off.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn reads_udp_receive_buffer_errors() {
        // Present on every Linux this loadgen runs on.
        assert!(udp_rcvbuf_errors().is_ok());
    }
}
