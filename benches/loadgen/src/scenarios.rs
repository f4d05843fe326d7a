//! The benchmark scenarios. Each opens its own raw NATS connections to a
//! running server, measures, and returns named metrics. Every loop is bounded
//! by a count and a deadline; any connection error fails the scenario.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::clients::{self, Client, ClientPrograms, Shape};
use crate::devices::{device_fan_in, device_idle};
use crate::jetstream::{js_publish, js_replay};
use crate::proto::{
    frames_per_batch, pub_batch, reply_subject, Conn, FrameKind, SMALL_READ_BUFFER_BYTES,
    STREAM_READ_BUFFER_BYTES,
};
use crate::server::{proc_cpu_time, RunningServer};

/// Bytes of PUB frames a publisher hands to one write.
pub(crate) const PUB_BATCH_BYTES: usize = 64 * 1024;
/// req-rep-queue: requesters and the queue group's responders.
const QUEUE_REQUESTERS: usize = 8;
const QUEUE_RESPONDERS: usize = 2;
/// How long a request may wait for its reply before the scenario fails.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a throttled publisher sleeps before re-checking its window.
const WINDOW_WAIT: Duration = Duration::from_micros(50);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    PubOnly,
    PubSub,
    FanOut,
    FanIn,
    ReqRep,
    /// 8 requesters, each sequential, through 2 responders in a queue group.
    ReqRepQueue,
    IdleConn,
    /// pub-sub's shape, traffic from nats.go.
    NatsGoPubSub,
    /// fan-in's shape, traffic from nats.go.
    NatsGoFanIn,
    /// pub-sub's shape, traffic from the C client.
    LibnatsPubSub,
    /// fan-in's shape, traffic from the C client.
    LibnatsFanIn,
    JsPublish,
    JsReplay,
    /// Device fleet → one NATS subscriber: perch with UDP devices speaking
    /// the device protocol, nats-server with the same fleet on NATS/TCP.
    DeviceFanIn,
    /// Idle and sleeping device sessions (perch only).
    DeviceIdle,
    /// Full TLS 1.3 handshakes (+ CONNECT, PING/PONG) per second.
    TlsHandshake,
    /// pub-sub's shape over TLS.
    TlsPubSub,
    /// idle-conn's shape over TLS.
    TlsIdleConn,
}

impl Scenario {
    /// What runs without `--scenario`: the core-protocol scenarios, raw and
    /// with real clients. The JetStream ones are opt-in (`--scenario
    /// js-publish --scenario js-replay`): with their pre-fill they would
    /// more than double a default run.
    pub const DEFAULT: [Scenario; 11] = [
        Scenario::PubOnly,
        Scenario::PubSub,
        Scenario::FanOut,
        Scenario::FanIn,
        Scenario::ReqRep,
        Scenario::ReqRepQueue,
        Scenario::IdleConn,
        Scenario::NatsGoPubSub,
        Scenario::NatsGoFanIn,
        Scenario::LibnatsPubSub,
        Scenario::LibnatsFanIn,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::PubOnly => "pub-only",
            Scenario::PubSub => "pub-sub",
            Scenario::FanOut => "fan-out",
            Scenario::FanIn => "fan-in",
            Scenario::ReqRep => "req-rep",
            Scenario::ReqRepQueue => "req-rep-queue",
            Scenario::IdleConn => "idle-conn",
            Scenario::NatsGoPubSub => "nats-go-pub-sub",
            Scenario::NatsGoFanIn => "nats-go-fan-in",
            Scenario::LibnatsPubSub => "libnats-pub-sub",
            Scenario::LibnatsFanIn => "libnats-fan-in",
            Scenario::JsPublish => "js-publish",
            Scenario::JsReplay => "js-replay",
            Scenario::DeviceFanIn => "device-fan-in",
            Scenario::DeviceIdle => "device-idle",
            Scenario::TlsHandshake => "tls-handshake",
            Scenario::TlsPubSub => "tls-pub-sub",
            Scenario::TlsIdleConn => "tls-idle-conn",
        }
    }

    /// Whether perch runs with the device protocol on a UDP port
    /// (`--device-udp`); nats-server has nothing of the kind.
    pub fn needs_device_udp(self) -> bool {
        matches!(self, Scenario::DeviceFanIn | Scenario::DeviceIdle)
    }

    /// Whether both servers run with the run's certificate (`[tls]` /
    /// `tls {}`; see tls.rs).
    pub fn needs_tls(self) -> bool {
        matches!(
            self,
            Scenario::TlsHandshake | Scenario::TlsPubSub | Scenario::TlsIdleConn
        )
    }

    /// Whether only perch runs it (nats-server has no equivalent; its column
    /// shows n/a).
    pub fn perch_only(self) -> bool {
        matches!(self, Scenario::DeviceIdle)
    }

    /// The table's column headings for the two servers.
    pub fn column_labels(self) -> (&'static str, &'static str) {
        match self {
            Scenario::DeviceFanIn => ("perch + UDP devices", "nats-server + TCP devices"),
            _ => ("perch", "nats-server"),
        }
    }

    /// Whether the server runs with JetStream on and a fresh store directory.
    pub fn needs_store(self) -> bool {
        matches!(self, Scenario::JsPublish | Scenario::JsReplay)
    }

    /// The real client that generates this scenario's traffic, and its
    /// shape; `None` for the raw generator's scenarios.
    pub fn client(self) -> Option<(Client, Shape)> {
        match self {
            Scenario::NatsGoPubSub => Some((Client::NatsGo, Shape::PubSub)),
            Scenario::NatsGoFanIn => Some((Client::NatsGo, Shape::FanIn)),
            Scenario::LibnatsPubSub => Some((Client::Libnats, Shape::PubSub)),
            Scenario::LibnatsFanIn => Some((Client::Libnats, Shape::FanIn)),
            _ => None,
        }
    }

    pub fn description(self, params: &Params) -> String {
        let payload_bytes = params.payload_bytes;
        match self {
            Scenario::PubOnly => format!(
                "1 publisher, {payload_bytes} B to bench.p, no subscribers: msgs/s the server absorbs"
            ),
            Scenario::PubSub => format!(
                "1 publisher -> 1 subscriber, {payload_bytes} B: delivered msgs/s"
            ),
            Scenario::FanOut => format!(
                "1 publisher -> {} subscribers, {payload_bytes} B: total delivered msgs/s",
                params.fan_out_subscribers
            ),
            Scenario::FanIn => format!(
                "{} device connections x {} msgs of {payload_bytes} B -> 1 subscriber on sensors.>",
                params.fan_in_devices, params.fan_in_msgs_per_device
            ),
            Scenario::ReqRep => format!(
                "sequential request/reply round trips through one responder, {payload_bytes} B"
            ),
            Scenario::ReqRepQueue => format!(
                "{QUEUE_REQUESTERS} requesters, each sequential, through {QUEUE_RESPONDERS} responders in a queue group, {payload_bytes} B"
            ),
            Scenario::IdleConn => format!(
                "{} idle connections, each with one SUB: server RSS per connection",
                params.idle_conns
            ),
            Scenario::NatsGoPubSub | Scenario::LibnatsPubSub => format!(
                "{} client: 1 publisher -> 1 subscriber, {payload_bytes} B: delivered msgs/s and server CPU per message",
                self.client().map_or("", |(client, _)| client.label())
            ),
            Scenario::NatsGoFanIn | Scenario::LibnatsFanIn => format!(
                "{} client: {} device connections x {} msgs of {payload_bytes} B -> 1 subscriber on sensors.>",
                self.client().map_or("", |(client, _)| client.label()),
                params.fan_in_devices,
                params.fan_in_msgs_per_device
            ),
            Scenario::JsPublish => format!(
                "{} publishers, {payload_bytes} B to stream BENCH (file), up to {} unacked each: PubAcks/s",
                params.js_publishers, params.js_window_msgs
            ),
            Scenario::JsReplay => format!(
                "{} msgs of {payload_bytes} B in stream BENCH, replayed by one pull consumer in batches of {}: msgs/s",
                params.js_replay_msgs, params.js_fetch_batch
            ),
            Scenario::DeviceFanIn => format!(
                "{} devices x {} QoS 0 msgs of {payload_bytes} B to sensors.d<i>.t -> 1 NATS subscriber on sensors.>, \
                 at most {} in flight; perch: UDP devices speaking the device protocol, \
                 nats-server: the same fleet speaking NATS over TCP",
                params.device_count, params.device_msgs, params.device_window_msgs
            ),
            Scenario::DeviceIdle => format!(
                "{} device sessions (CONNECT + REGISTER), {} of them then SUBSCRIBE + DISCONNECT sleep: \
                 server RSS per session (perch only)",
                params.device_count,
                params.device_count / 2
            ),
            Scenario::TlsHandshake => format!(
                "{} clients in a loop: connect, full TLS 1.3 handshake (ECDSA P-256, no resumption), \
                 CONNECT + PING/PONG, close: handshakes/s",
                params.connect_threads
            ),
            Scenario::TlsPubSub => format!(
                "over TLS 1.3: 1 publisher -> 1 subscriber, {payload_bytes} B: delivered msgs/s and server CPU per message"
            ),
            Scenario::TlsIdleConn => format!(
                "{} idle TLS connections, each with one SUB: server RSS per connection",
                params.idle_conns
            ),
        }
    }

    pub fn metrics(self) -> &'static [MetricDef] {
        match self {
            Scenario::PubOnly => &PUB_ONLY_METRICS,
            Scenario::PubSub => &PUB_SUB_METRICS,
            Scenario::FanOut => &FAN_OUT_METRICS,
            Scenario::FanIn => &FAN_IN_METRICS,
            Scenario::ReqRep | Scenario::ReqRepQueue => &REQ_REP_METRICS,
            Scenario::IdleConn => &IDLE_CONN_METRICS,
            Scenario::NatsGoPubSub | Scenario::LibnatsPubSub => &CLIENT_PUB_SUB_METRICS,
            Scenario::NatsGoFanIn | Scenario::LibnatsFanIn => &CLIENT_FAN_IN_METRICS,
            Scenario::JsPublish => &JS_PUBLISH_METRICS,
            Scenario::JsReplay => &JS_REPLAY_METRICS,
            Scenario::DeviceFanIn => &DEVICE_FAN_IN_METRICS,
            Scenario::DeviceIdle => &DEVICE_IDLE_METRICS,
            Scenario::TlsHandshake => &TLS_HANDSHAKE_METRICS,
            Scenario::TlsPubSub => &TLS_PUB_SUB_METRICS,
            Scenario::TlsIdleConn => &TLS_IDLE_CONN_METRICS,
        }
    }

    /// Runs the scenario against a server started fresh for it. Every
    /// scenario also reports the server's peak RSS (VmHWM after the run:
    /// the peak over start-up, setup and measurement).
    pub fn run(self, server: &RunningServer, params: &Params) -> Result<Measurement> {
        let mut measurement = match self {
            Scenario::PubOnly => pub_only(server, params),
            Scenario::PubSub => fan_out(server, params, 1),
            Scenario::FanOut => fan_out(server, params, params.fan_out_subscribers),
            Scenario::FanIn => fan_in(server, params),
            Scenario::ReqRep => req_rep(server, params, 1, 1),
            Scenario::ReqRepQueue => req_rep(server, params, QUEUE_REQUESTERS, QUEUE_RESPONDERS),
            Scenario::IdleConn => idle_conn(server, params),
            Scenario::NatsGoPubSub
            | Scenario::NatsGoFanIn
            | Scenario::LibnatsPubSub
            | Scenario::LibnatsFanIn => {
                let (client, shape) = self.client().context("a real-client scenario")?;
                clients::run(server, params, client, shape)
            }
            Scenario::JsPublish => js_publish(server, params),
            Scenario::JsReplay => js_replay(server, params),
            Scenario::DeviceFanIn => device_fan_in(server, params),
            Scenario::DeviceIdle => device_idle(server, params),
            Scenario::TlsHandshake | Scenario::TlsPubSub | Scenario::TlsIdleConn => {
                let files = params
                    .tls
                    .as_ref()
                    .context("TLS scenario without the run's certificate")?;
                match self {
                    Scenario::TlsHandshake => crate::tls::handshake_rate(server, params, files),
                    Scenario::TlsPubSub => crate::tls::pub_sub(server, params, files),
                    _ => crate::tls::idle_conn(server, params, files),
                }
            }
        }?;
        measurement.push((PEAK_RSS_KEY, server.peak_rss_kib()? as f64));
        Ok(measurement)
    }
}

/// Knobs shared by all scenarios (see `--help` for each).
#[derive(Clone, Debug)]
pub struct Params {
    pub duration: Duration,
    pub warmup: Duration,
    pub timeout: Duration,
    pub payload_bytes: usize,
    pub window_msgs: u64,
    pub fan_out_subscribers: usize,
    pub fan_in_devices: usize,
    pub fan_in_msgs_per_device: usize,
    pub idle_conns: usize,
    pub settle: Duration,
    pub connect_threads: usize,
    pub js_publishers: usize,
    pub js_window_msgs: u64,
    pub js_replay_msgs: u64,
    pub js_fetch_batch: u64,
    pub device_count: usize,
    pub device_msgs: usize,
    pub device_window_msgs: u64,
    /// The real-client programs built for this run.
    pub clients: ClientPrograms,
    /// The TLS scenarios' certificate and server configs, when any runs.
    pub tls: Option<crate::tls::TlsFiles>,
}

/// Metric key → value in the metric's base unit (see [`MetricDef`]).
pub type Measurement = Vec<(&'static str, f64)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
    /// Context only (e.g. CPU used), no better direction.
    Neither,
}

/// A goal from DESIGN/BENCHMARKS: on the ratio perch/nats-server, or on
/// perch's absolute value.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    RatioAtLeast(f64),
    RatioAtMost(f64),
    PerchAtMost(f64),
}

#[derive(Clone, Copy, Debug)]
pub struct MetricDef {
    /// JSON key; the suffix names the base unit.
    pub key: &'static str,
    /// Table label, with the display unit.
    pub label: &'static str,
    /// Base value / divisor = displayed value.
    pub display_divisor: f64,
    pub decimals: usize,
    pub better: Better,
    pub goal: Option<Goal>,
}

const fn metric(
    key: &'static str,
    label: &'static str,
    display_divisor: f64,
    decimals: usize,
    better: Better,
    goal: Option<Goal>,
) -> MetricDef {
    MetricDef {
        key,
        label,
        display_divisor,
        decimals,
        better,
        goal,
    }
}

/// Key of the peak-RSS metric every scenario reports ([`Scenario::run`]).
const PEAK_RSS_KEY: &str = "server_peak_rss_kib";
const SERVER_PEAK_RSS: MetricDef = metric(
    PEAK_RSS_KEY,
    "server peak RSS (MiB)",
    1024.0,
    1,
    Better::Lower,
    None,
);
/// Fan-in's goal (issue 7): at most a quarter of nats-server's peak RSS.
const FAN_IN_PEAK_RSS: MetricDef = MetricDef {
    goal: Some(Goal::RatioAtMost(0.25)),
    ..SERVER_PEAK_RSS
};
/// Server CPU seconds (user + system) over the measured window per million
/// messages delivered to subscribers in it.
const SERVER_CPU_PER_M_DELIVERED: MetricDef = metric(
    "server_cpu_s_per_m_delivered",
    "server CPU per M delivered (s)",
    1.0,
    3,
    Better::Lower,
    None,
);
/// Goal (issue 7) for 1 → 1 and fan-in: at most half of nats-server's CPU
/// per delivered message.
const SERVER_CPU_PER_M_DELIVERED_GOAL: MetricDef = MetricDef {
    goal: Some(Goal::RatioAtMost(0.5)),
    ..SERVER_CPU_PER_M_DELIVERED
};
/// As [`SERVER_CPU_PER_M_DELIVERED`], per million messages published, where
/// nothing is delivered (pub-only) or the publish is the unit (js-publish).
const SERVER_CPU_PER_M_PUBLISHED: MetricDef = metric(
    "server_cpu_s_per_m_published",
    "server CPU per M published (s)",
    1.0,
    3,
    Better::Lower,
    None,
);
const SERVER_CPU: MetricDef = metric(
    "server_cpu_cores",
    "server CPU (cores)",
    1.0,
    2,
    Better::Neither,
    None,
);
const LOADGEN_CPU: MetricDef = metric(
    "loadgen_cpu_cores",
    "loadgen CPU (cores)",
    1.0,
    2,
    Better::Neither,
    None,
);

static PUB_ONLY_METRICS: [MetricDef; 5] = [
    metric(
        "published_msgs_per_s",
        "absorbed (M msg/s)",
        1e6,
        3,
        Better::Higher,
        None,
    ),
    SERVER_CPU_PER_M_PUBLISHED,
    SERVER_PEAK_RSS,
    SERVER_CPU,
    LOADGEN_CPU,
];
static PUB_SUB_METRICS: [MetricDef; 5] = [
    metric(
        "delivered_msgs_per_s",
        "delivered (M msg/s)",
        1e6,
        3,
        Better::Higher,
        Some(Goal::RatioAtLeast(1.3)),
    ),
    SERVER_CPU_PER_M_DELIVERED_GOAL,
    SERVER_PEAK_RSS,
    SERVER_CPU,
    LOADGEN_CPU,
];
static FAN_OUT_METRICS: [MetricDef; 5] = [
    metric(
        "delivered_msgs_per_s",
        "delivered, all subs (M msg/s)",
        1e6,
        3,
        Better::Higher,
        None,
    ),
    SERVER_CPU_PER_M_DELIVERED,
    SERVER_PEAK_RSS,
    SERVER_CPU,
    LOADGEN_CPU,
];
const CONNECT_DEVICES: MetricDef = metric(
    "connect_s",
    "connect all devices (s)",
    1.0,
    2,
    Better::Lower,
    None,
);
static FAN_IN_METRICS: [MetricDef; 6] = [
    metric(
        "delivered_msgs_per_s",
        "delivered (M msg/s)",
        1e6,
        3,
        Better::Higher,
        Some(Goal::RatioAtLeast(1.5)),
    ),
    SERVER_CPU_PER_M_DELIVERED_GOAL,
    FAN_IN_PEAK_RSS,
    CONNECT_DEVICES,
    SERVER_CPU,
    LOADGEN_CPU,
];
/// CPU of the real client's process (all its threads) over the window: near
/// the machine's cores means the client, not the server, sets the rate.
const CLIENT_CPU: MetricDef = metric(
    "client_cpu_cores",
    "client CPU (cores)",
    1.0,
    2,
    Better::Neither,
    None,
);
/// Real clients are the bottleneck here, so delivered msgs/s carries no goal;
/// the server's CPU per message does.
const CLIENT_DELIVERED: MetricDef = metric(
    "delivered_msgs_per_s",
    "delivered (M msg/s)",
    1e6,
    3,
    Better::Higher,
    None,
);
static CLIENT_PUB_SUB_METRICS: [MetricDef; 5] = [
    CLIENT_DELIVERED,
    SERVER_CPU_PER_M_DELIVERED_GOAL,
    SERVER_PEAK_RSS,
    SERVER_CPU,
    CLIENT_CPU,
];
static CLIENT_FAN_IN_METRICS: [MetricDef; 6] = [
    CLIENT_DELIVERED,
    SERVER_CPU_PER_M_DELIVERED_GOAL,
    FAN_IN_PEAK_RSS,
    CONNECT_DEVICES,
    SERVER_CPU,
    CLIENT_CPU,
];
static REQ_REP_METRICS: [MetricDef; 6] = [
    metric("p50_us", "round trip p50 (µs)", 1.0, 1, Better::Lower, None),
    metric(
        "p99_us",
        "round trip p99 (µs)",
        1.0,
        1,
        Better::Lower,
        Some(Goal::RatioAtMost(0.5)),
    ),
    metric(
        "round_trips",
        "round trips (count)",
        1.0,
        0,
        Better::Higher,
        None,
    ),
    MetricDef {
        label: "server CPU per M delivered, 2 per round trip (s)",
        ..SERVER_CPU_PER_M_DELIVERED
    },
    SERVER_PEAK_RSS,
    SERVER_CPU,
];
static TLS_HANDSHAKE_METRICS: [MetricDef; 5] = [
    metric(
        "handshakes_per_s",
        "handshakes/s",
        1.0,
        0,
        Better::Higher,
        Some(Goal::RatioAtLeast(1.0)),
    ),
    metric(
        "server_cpu_us_per_handshake",
        "server CPU per handshake (µs)",
        1.0,
        1,
        Better::Lower,
        None,
    ),
    SERVER_PEAK_RSS,
    SERVER_CPU,
    LOADGEN_CPU,
];
static TLS_PUB_SUB_METRICS: [MetricDef; 5] = [
    metric(
        "delivered_per_s",
        "delivered msgs/s",
        1.0,
        0,
        Better::Higher,
        Some(Goal::RatioAtLeast(1.0)),
    ),
    MetricDef {
        goal: Some(Goal::RatioAtMost(1.0)),
        ..SERVER_CPU_PER_M_DELIVERED
    },
    SERVER_PEAK_RSS,
    SERVER_CPU,
    LOADGEN_CPU,
];
static TLS_IDLE_CONN_METRICS: [MetricDef; 5] = [
    metric(
        "rss_per_conn_kib",
        "RSS per TLS connection (KiB)",
        1.0,
        2,
        Better::Lower,
        Some(Goal::RatioAtMost(1.0)),
    ),
    metric(
        "rss_before_kib",
        "server RSS before (MiB)",
        1024.0,
        1,
        Better::Lower,
        None,
    ),
    metric(
        "rss_after_kib",
        "server RSS after (MiB)",
        1024.0,
        1,
        Better::Lower,
        None,
    ),
    metric(
        "server_cpu_us_per_conn",
        "server CPU per connection, handshake+CONNECT+SUB+PING (µs)",
        1.0,
        1,
        Better::Lower,
        None,
    ),
    SERVER_PEAK_RSS,
];
static IDLE_CONN_METRICS: [MetricDef; 5] = [
    metric(
        "rss_per_conn_kib",
        "RSS per connection (KiB)",
        1.0,
        2,
        Better::Lower,
        Some(Goal::PerchAtMost(2.0)),
    ),
    metric(
        "rss_before_kib",
        "server RSS before (MiB)",
        1024.0,
        1,
        Better::Lower,
        None,
    ),
    metric(
        "rss_after_kib",
        "server RSS after (MiB)",
        1024.0,
        1,
        Better::Lower,
        None,
    ),
    metric(
        "server_cpu_us_per_conn",
        "server CPU per connection, CONNECT+SUB+PING (µs)",
        1.0,
        1,
        Better::Lower,
        None,
    ),
    SERVER_PEAK_RSS,
];

/// Context for the JetStream scenarios: the disk under the store, probed
/// just before each run's measurement.
const DISK_FDATASYNC: MetricDef = metric(
    "disk_fdatasync_p50_us",
    "disk: 64 B append + fdatasync p50 (µs)",
    1.0,
    0,
    Better::Neither,
    None,
);

static JS_PUBLISH_METRICS: [MetricDef; 6] = [
    metric(
        "acked_msgs_per_s",
        "acked publishes (K msg/s)",
        1e3,
        1,
        Better::Higher,
        Some(Goal::RatioAtLeast(2.0)),
    ),
    MetricDef {
        label: "server CPU per M acked publishes (s)",
        ..SERVER_CPU_PER_M_PUBLISHED
    },
    SERVER_PEAK_RSS,
    SERVER_CPU,
    LOADGEN_CPU,
    DISK_FDATASYNC,
];
static JS_REPLAY_METRICS: [MetricDef; 7] = [
    metric(
        "replayed_msgs_per_s",
        "replayed (M msg/s)",
        1e6,
        3,
        Better::Higher,
        None,
    ),
    MetricDef {
        label: "server CPU per M replayed (s)",
        ..SERVER_CPU_PER_M_DELIVERED
    },
    SERVER_PEAK_RSS,
    metric(
        "prefill_acked_msgs_per_s",
        "pre-fill, acked (K msg/s)",
        1e3,
        1,
        Better::Higher,
        None,
    ),
    SERVER_CPU,
    LOADGEN_CPU,
    DISK_FDATASYNC,
];

static DEVICE_FAN_IN_METRICS: [MetricDef; 10] = [
    metric(
        "delivered_msgs_per_s",
        "delivered (M msg/s)",
        1e6,
        3,
        Better::Higher,
        Some(Goal::RatioAtLeast(2.0)),
    ),
    SERVER_CPU_PER_M_DELIVERED_GOAL,
    metric(
        "delivered_pct",
        "delivered / sent (%)",
        1.0,
        2,
        Better::Higher,
        None,
    ),
    SERVER_PEAK_RSS,
    metric(
        "setup_s",
        "set up all devices: CONNECT (+ REGISTER on UDP) (s)",
        1.0,
        2,
        Better::Lower,
        None,
    ),
    metric(
        "setup_retransmits",
        "setup requests retransmitted (UDP)",
        1.0,
        0,
        Better::Lower,
        None,
    ),
    metric(
        "udp_rcvbuf_drops",
        "kernel UDP receive-buffer drops (count)",
        1.0,
        0,
        Better::Lower,
        None,
    ),
    metric(
        "window_stalls",
        "window stalls (outstanding written off)",
        1.0,
        0,
        Better::Lower,
        None,
    ),
    SERVER_CPU,
    LOADGEN_CPU,
];
/// Goal: at most 256 B of server RSS per device session.
const DEVICE_SESSION_RSS_GOAL: Goal = Goal::PerchAtMost(256.0);
static DEVICE_IDLE_METRICS: [MetricDef; 10] = [
    metric(
        "rss_per_idle_session_b",
        "RSS per idle session, CONNECT + REGISTER (B)",
        1.0,
        0,
        Better::Lower,
        Some(DEVICE_SESSION_RSS_GOAL),
    ),
    metric(
        "rss_per_asleep_session_b",
        "RSS per sleeping session, + DISCONNECT sleep (B)",
        1.0,
        0,
        Better::Lower,
        Some(DEVICE_SESSION_RSS_GOAL),
    ),
    metric(
        "rss_per_sleeping_session_b",
        "RSS per sleeping session with a subscription, + SUBSCRIBE + DISCONNECT sleep (B)",
        1.0,
        0,
        Better::Lower,
        Some(DEVICE_SESSION_RSS_GOAL),
    ),
    metric(
        "rss_sleep_extra_b",
        "of which SUBSCRIBE + sleep, per subscribed sleeper (B)",
        1.0,
        0,
        Better::Lower,
        None,
    ),
    metric(
        "rss_before_kib",
        "server RSS before (MiB)",
        1024.0,
        1,
        Better::Lower,
        None,
    ),
    metric(
        "rss_idle_kib",
        "server RSS, all sessions idle (MiB)",
        1024.0,
        1,
        Better::Lower,
        None,
    ),
    metric(
        "rss_sleeping_kib",
        "server RSS, half asleep, half of those subscribed (MiB)",
        1024.0,
        1,
        Better::Lower,
        None,
    ),
    metric(
        "server_cpu_us_per_session",
        "server CPU per session, CONNECT + REGISTER (µs)",
        1.0,
        1,
        Better::Lower,
        None,
    ),
    metric(
        "setup_retransmits",
        "requests retransmitted",
        1.0,
        0,
        Better::Lower,
        None,
    ),
    SERVER_PEAK_RSS,
];

/// The measured window's CPU time: user + system of the server process (all
/// its threads, from `/proc/<pid>/stat`) and of this process, sampled when
/// the window starts and when it ends.
pub(crate) struct CpuWindow {
    server_start: Duration,
    loadgen_start: Duration,
    wall_start: Instant,
}

/// CPU time used over one window, and the window's wall time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CpuUse {
    pub wall: Duration,
    pub server: Duration,
    pub loadgen: Duration,
}

impl CpuUse {
    /// Server CPU seconds per wall second.
    pub fn server_cores(&self) -> f64 {
        self.server.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    /// Loadgen CPU seconds per wall second.
    pub fn loadgen_cores(&self) -> f64 {
        self.loadgen.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    /// Server CPU seconds per million of the `messages` the window moved;
    /// an error for a window that moved none.
    pub fn server_s_per_million(&self, messages: u64) -> Result<f64> {
        if messages == 0 {
            bail!("no messages in the measured window, so no CPU per message");
        }
        Ok(self.server.as_secs_f64() * 1e6 / messages as f64)
    }
}

impl CpuWindow {
    pub(crate) fn start(server: &RunningServer) -> Result<Self> {
        Ok(Self {
            server_start: server.cpu_time()?,
            loadgen_start: proc_cpu_time("self")?,
            wall_start: Instant::now(),
        })
    }

    pub(crate) fn finish(self, server: &RunningServer) -> Result<CpuUse> {
        let wall = self.wall_start.elapsed();
        let server_cpu = server.cpu_time()?.saturating_sub(self.server_start);
        let loadgen = proc_cpu_time("self")?.saturating_sub(self.loadgen_start);
        Ok(CpuUse {
            wall,
            server: server_cpu,
            loadgen,
        })
    }
}

fn pub_frame_bytes(subject: &str, payload_bytes: usize) -> usize {
    format!("PUB {subject} {payload_bytes}\r\n").len() + payload_bytes + 2
}

/// Writes `batch` back to back for `duration`; returns the batches written.
fn publish_for(conn: &mut Conn, batch: &[u8], duration: Duration) -> Result<u64> {
    let end = Instant::now() + duration;
    let mut batches = 0u64;
    while Instant::now() < end {
        conn.stream
            .write_all(batch)
            .context("publisher write failed")?;
        batches += 1;
    }
    Ok(batches)
}

fn pub_only(server: &RunningServer, params: &Params) -> Result<Measurement> {
    let subject = "bench.p";
    let setup_deadline = Instant::now() + params.timeout;
    let mut publisher = Conn::open(server.addr, SMALL_READ_BUFFER_BYTES, setup_deadline)?;
    publisher.handshake(b"", setup_deadline)?;
    let batch_msgs = frames_per_batch(
        pub_frame_bytes(subject, params.payload_bytes),
        PUB_BATCH_BYTES,
    );
    let batch = pub_batch(subject, params.payload_bytes, batch_msgs);

    // Warm up, then a PING/PONG barrier so the measured window starts with
    // the server's buffers drained.
    publish_for(&mut publisher, &batch, params.warmup)?;
    publisher.ping_pong(Instant::now() + params.timeout)?;

    let cpu = CpuWindow::start(server)?;
    let started = Instant::now();
    let batches = publish_for(&mut publisher, &batch, params.duration)?;
    publisher
        .ping_pong(Instant::now() + params.timeout)
        .context("waiting for the server to process everything published")?;
    let elapsed_s = started.elapsed().as_secs_f64();
    let cpu = cpu.finish(server)?;
    let published = batches * batch_msgs as u64;
    Ok(vec![
        ("published_msgs_per_s", published as f64 / elapsed_s),
        (
            "server_cpu_s_per_m_published",
            cpu.server_s_per_million(published)?,
        ),
        ("server_cpu_cores", cpu.server_cores()),
        ("loadgen_cpu_cores", cpu.loadgen_cores()),
    ])
}

/// Reads and counts MSG frames until `stop` is set or `target` messages have
/// arrived; publishes the running count in `received` after every read.
/// Returns the count and the instant the target was reached (or it stopped).
fn count_messages(
    mut conn: Conn,
    received: &AtomicU64,
    stop: &AtomicBool,
    target: Option<u64>,
    deadline: Instant,
) -> Result<(u64, Instant)> {
    let mut count = 0u64;
    loop {
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
        received.store(count, Ordering::Relaxed);
        if target.is_some_and(|target| count >= target) || stop.load(Ordering::Relaxed) {
            return Ok((count, Instant::now()));
        }
        if Instant::now() >= deadline {
            bail!("subscriber had received {count} messages when the scenario deadline passed");
        }
        conn.fill().with_context(|| {
            format!("subscriber connection failed after {count} messages (slow consumer?)")
        })?;
    }
}

/// Sleeps until `end`, returning early (false) when `failed` is set.
pub(crate) fn sleep_unless_failed(end: Instant, failed: &AtomicBool) -> bool {
    loop {
        if failed.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        thread::sleep((end - now).min(Duration::from_millis(10)));
    }
}

pub(crate) fn join_thread<T>(
    handle: thread::ScopedJoinHandle<'_, Result<T>>,
    what: &str,
) -> Result<T> {
    handle
        .join()
        .map_err(|_| anyhow!("{what} thread panicked"))?
}

/// 1 publisher → `subscriber_count` subscribers on one subject. The publisher
/// keeps at most `window_msgs` messages ahead of the slowest subscriber, so
/// the measurement is the sustained delivery rate, not how much the server
/// buffers; the rate is counted at the subscribers over `duration` after
/// `warmup`, and at the end every subscriber must have received every message.
fn fan_out(
    server: &RunningServer,
    params: &Params,
    subscriber_count: usize,
) -> Result<Measurement> {
    let subject = "bench.p";
    let setup_deadline = Instant::now() + params.timeout;
    let mut subscribers = Vec::with_capacity(subscriber_count);
    for index in 0..subscriber_count {
        let mut conn = Conn::open(server.addr, STREAM_READ_BUFFER_BYTES, setup_deadline)
            .with_context(|| format!("subscriber {index}"))?;
        conn.handshake(format!("SUB {subject} 1\r\n").as_bytes(), setup_deadline)
            .with_context(|| format!("subscriber {index}"))?;
        subscribers.push(conn);
    }
    let mut publisher =
        Conn::open(server.addr, SMALL_READ_BUFFER_BYTES, setup_deadline).context("publisher")?;
    publisher
        .handshake(b"", setup_deadline)
        .context("publisher")?;
    let batch_msgs = frames_per_batch(
        pub_frame_bytes(subject, params.payload_bytes),
        PUB_BATCH_BYTES,
    ) as u64;
    let batch = pub_batch(subject, params.payload_bytes, batch_msgs as usize);
    let window_msgs = params.window_msgs.max(batch_msgs);
    let run_deadline = Instant::now() + params.warmup + params.duration + params.timeout;
    let drain_timeout = params.timeout;

    let counts: Vec<AtomicU64> = (0..subscriber_count).map(|_| AtomicU64::new(0)).collect();
    let stop_publisher = AtomicBool::new(false);
    let stop_subscribers = AtomicBool::new(false);
    let failed = AtomicBool::new(false);

    thread::scope(|scope| -> Result<Measurement> {
        let (counts, stop_publisher, stop_subscribers, failed) =
            (&counts, &stop_publisher, &stop_subscribers, &failed);
        let subscriber_handles: Vec<_> = subscribers
            .into_iter()
            .zip(counts)
            .enumerate()
            .map(|(index, (conn, count))| {
                scope.spawn(move || {
                    let result = count_messages(conn, count, stop_subscribers, None, run_deadline)
                        .with_context(|| format!("subscriber {index}"));
                    if result.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    result
                })
            })
            .collect();
        let publisher_handle = scope.spawn(move || -> Result<u64> {
            let mut published = 0u64;
            let result = (|| {
                while !stop_publisher.load(Ordering::Relaxed) && !failed.load(Ordering::Relaxed) {
                    if Instant::now() >= run_deadline {
                        bail!("publisher still running at the scenario deadline");
                    }
                    let slowest = counts
                        .iter()
                        .map(|count| count.load(Ordering::Relaxed))
                        .min()
                        .unwrap_or(0);
                    if published - slowest >= window_msgs {
                        thread::sleep(WINDOW_WAIT);
                        continue;
                    }
                    publisher
                        .stream
                        .write_all(&batch)
                        .context("publisher write failed")?;
                    published += batch_msgs;
                }
                // PING/PONG before the connection closes: a close with unread
                // bytes (e.g. a server PING) in our receive queue sends a RST,
                // and the server may then discard what it had not yet read.
                if !failed.load(Ordering::Relaxed) {
                    publisher
                        .ping_pong(Instant::now() + drain_timeout)
                        .context("publisher's final PING")?;
                }
                Ok(published)
            })();
            if result.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            result
        });

        let total = || -> u64 {
            counts
                .iter()
                .map(|count| count.load(Ordering::Relaxed))
                .sum()
        };
        let mut measured = None;
        if sleep_unless_failed(Instant::now() + params.warmup, failed) {
            let cpu = CpuWindow::start(server)?;
            let (count_start, window_start) = (total(), Instant::now());
            if sleep_unless_failed(window_start + params.duration, failed) {
                let (count_end, window_end) = (total(), Instant::now());
                let cpu = cpu.finish(server)?;
                let delivered = count_end - count_start;
                let rate = delivered as f64 / (window_end - window_start).as_secs_f64();
                measured = Some((rate, cpu, delivered));
            }
        }
        stop_publisher.store(true, Ordering::Relaxed);
        let publisher_result = join_thread(publisher_handle, "publisher");

        // Drain: every subscriber must get every message published.
        if let Ok(published) = publisher_result {
            let drain_deadline = Instant::now() + params.timeout;
            while !failed.load(Ordering::Relaxed)
                && Instant::now() < drain_deadline
                && counts
                    .iter()
                    .any(|count| count.load(Ordering::Relaxed) < published)
            {
                thread::sleep(Duration::from_millis(1));
            }
        }
        stop_subscribers.store(true, Ordering::Relaxed);
        let mut subscriber_totals = Vec::with_capacity(subscriber_count);
        for handle in subscriber_handles {
            subscriber_totals.push(join_thread(handle, "subscriber")?.0);
        }
        let published = publisher_result?;
        for (index, received) in subscriber_totals.iter().enumerate() {
            if *received != published {
                bail!(
                    "subscriber {index} received {received} of {published} messages \
                     within {:?} after publishing stopped",
                    params.timeout
                );
            }
        }
        let (rate, cpu, delivered) = measured.context("the measurement window did not complete")?;
        Ok(vec![
            ("delivered_msgs_per_s", rate),
            (
                "server_cpu_s_per_m_delivered",
                cpu.server_s_per_million(delivered)?,
            ),
            ("server_cpu_cores", cpu.server_cores()),
            ("loadgen_cpu_cores", cpu.loadgen_cores()),
        ])
    })
}

/// Opens `count` connections from `threads` threads; connection `id` sends
/// `extra(id)` between CONNECT and PING. Returns (id, connection) per thread.
pub(crate) fn connect_many(
    addr: SocketAddr,
    count: usize,
    threads: usize,
    deadline: Instant,
    extra: &(dyn Fn(usize) -> Vec<u8> + Sync),
) -> Result<Vec<Vec<(usize, Conn)>>> {
    let threads = threads.clamp(1, count.max(1));
    let failed = AtomicBool::new(false);
    thread::scope(|scope| {
        let failed = &failed;
        let handles: Vec<_> = (0..threads)
            .map(|first_id| {
                scope.spawn(move || -> Result<Vec<(usize, Conn)>> {
                    let mut conns = Vec::with_capacity(count / threads + 1);
                    for id in (first_id..count).step_by(threads) {
                        if failed.load(Ordering::Relaxed) {
                            break;
                        }
                        let result = Conn::open(addr, SMALL_READ_BUFFER_BYTES, deadline)
                            .and_then(|mut conn| {
                                conn.handshake(&extra(id), deadline)?;
                                Ok(conn)
                            })
                            .with_context(|| {
                                format!("connection {id} (after {} on this thread)", conns.len())
                            });
                        match result {
                            Ok(conn) => conns.push((id, conn)),
                            Err(error) => {
                                failed.store(true, Ordering::Relaxed);
                                return Err(error);
                            }
                        }
                    }
                    Ok(conns)
                })
            })
            .collect();
        let mut groups = Vec::with_capacity(threads);
        let mut first_error = None;
        for handle in handles {
            match join_thread(handle, "connect") {
                Ok(group) => groups.push(group),
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(groups),
        }
    })
}

fn fan_in(server: &RunningServer, params: &Params) -> Result<Measurement> {
    let devices = params.fan_in_devices;
    let msgs_per_device = params.fan_in_msgs_per_device;
    let expected = (devices * msgs_per_device) as u64;
    let setup_deadline = Instant::now() + params.timeout;
    let mut subscriber =
        Conn::open(server.addr, STREAM_READ_BUFFER_BYTES, setup_deadline).context("subscriber")?;
    subscriber
        .handshake(b"SUB sensors.> 1\r\n", setup_deadline)
        .context("subscriber")?;

    let connect_started = Instant::now();
    let groups = connect_many(
        server.addr,
        devices,
        params.connect_threads,
        setup_deadline,
        &|_| Vec::new(),
    )
    .context("connecting devices")?;
    let connect_s = connect_started.elapsed().as_secs_f64();
    // Each device's 100 PUB frames, formatted before the clock starts.
    let groups: Vec<Vec<(usize, Conn, Vec<u8>)>> = groups
        .into_iter()
        .map(|group| {
            group
                .into_iter()
                .map(|(id, conn)| {
                    let batch = pub_batch(
                        &format!("sensors.{id}.t"),
                        params.payload_bytes,
                        msgs_per_device,
                    );
                    (id, conn, batch)
                })
                .collect()
        })
        .collect();

    let received = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(groups.len() + 1);
    let run_deadline = Instant::now() + params.timeout;
    thread::scope(|scope| -> Result<Measurement> {
        let (received, stop, barrier) = (&received, &stop, &barrier);
        let subscriber_handle = scope.spawn(move || {
            count_messages(subscriber, received, stop, Some(expected), run_deadline)
                .context("subscriber")
        });
        let device_handles: Vec<_> = groups
            .into_iter()
            .map(|mut group| {
                scope.spawn(move || -> Result<Vec<(usize, Conn, Vec<u8>)>> {
                    barrier.wait();
                    for (id, conn, batch) in group.iter_mut() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if let Err(error) = conn.stream.write_all(batch) {
                            stop.store(true, Ordering::Relaxed);
                            return Err(error).with_context(|| format!("device {id} publish"));
                        }
                    }
                    // Keep the connections open until the subscriber is done.
                    Ok(group)
                })
            })
            .collect();
        barrier.wait();
        let cpu = CpuWindow::start(server)?;
        let started = Instant::now();
        let mut open_devices = Vec::new();
        let mut device_error = None;
        for handle in device_handles {
            match join_thread(handle, "device") {
                Ok(group) => open_devices.push(group),
                Err(error) => {
                    device_error.get_or_insert(error);
                }
            }
        }
        let subscriber_result = join_thread(subscriber_handle, "subscriber");
        if let Some(error) = device_error {
            return Err(error);
        }
        let (count, finished) = subscriber_result?;
        if count < expected {
            bail!("subscriber received {count} of {expected} messages");
        }
        let cpu = cpu.finish(server)?;
        drop(open_devices);
        Ok(vec![
            (
                "delivered_msgs_per_s",
                expected as f64 / (finished - started).as_secs_f64(),
            ),
            (
                "server_cpu_s_per_m_delivered",
                cpu.server_s_per_million(expected)?,
            ),
            ("connect_s", connect_s),
            ("server_cpu_cores", cpu.server_cores()),
            ("loadgen_cpu_cores", cpu.loadgen_cores()),
        ])
    })
}

/// Answers every request on `svc.echo` with its payload until `stop`.
fn respond(mut conn: Conn, stop: &AtomicBool, deadline: Instant) -> Result<u64> {
    let mut out = Vec::with_capacity(64 * 1024);
    let mut replied = 0u64;
    loop {
        while let Some(frame) = conn.reader.next_frame()? {
            match frame.kind {
                FrameKind::Msg => {
                    let line = conn.reader.bytes(frame.line.clone());
                    let reply = reply_subject(line).with_context(|| {
                        format!(
                            "request without reply subject: {:?}",
                            String::from_utf8_lossy(line)
                        )
                    })?;
                    out.extend_from_slice(b"PUB ");
                    out.extend_from_slice(reply);
                    write!(out, " {}\r\n", frame.payload.len()).context("formatting a reply")?;
                    out.extend_from_slice(conn.reader.bytes(frame.payload));
                    out.extend_from_slice(b"\r\n");
                    replied += 1;
                }
                FrameKind::Ping => out.extend_from_slice(b"PONG\r\n"),
                FrameKind::Err => bail!(
                    "responder got {}",
                    String::from_utf8_lossy(conn.reader.bytes(frame.line))
                ),
                FrameKind::Pong | FrameKind::Ok | FrameKind::Info => {}
            }
        }
        if !out.is_empty() {
            conn.stream
                .write_all(&out)
                .context("responder write failed")?;
            out.clear();
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(replied);
        }
        if Instant::now() >= deadline {
            bail!("responder still running at the scenario deadline");
        }
        conn.fill().context("responder connection failed")?;
    }
}

/// Sequential requests for `duration`; pushes each round trip in ns to
/// `latencies_ns` when given.
fn request_loop(
    conn: &mut Conn,
    inbox: &str,
    payload: &[u8],
    duration: Duration,
    next_request_id: &mut u64,
    mut latencies_ns: Option<&mut Vec<u64>>,
    failed: &AtomicBool,
) -> Result<()> {
    let end = Instant::now() + duration;
    let mut request = Vec::with_capacity(128 + payload.len());
    let mut expected_line = Vec::with_capacity(64);
    while Instant::now() < end {
        if failed.load(Ordering::Relaxed) {
            bail!("the responder failed");
        }
        let request_id = *next_request_id;
        *next_request_id += 1;
        request.clear();
        write!(
            request,
            "PUB svc.echo {inbox}.{request_id} {}\r\n",
            payload.len()
        )
        .context("formatting a request")?;
        request.extend_from_slice(payload);
        request.extend_from_slice(b"\r\n");
        expected_line.clear();
        write!(expected_line, "MSG {inbox}.{request_id} ").context("formatting")?;

        let sent_at = Instant::now();
        conn.stream
            .write_all(&request)
            .context("requester write failed")?;
        let reply = conn
            .wait_for(FrameKind::Msg, sent_at + REPLY_TIMEOUT)
            .with_context(|| format!("waiting for the reply to request {request_id}"))?;
        let round_trip = sent_at.elapsed();
        let line = conn.reader.bytes(reply.line);
        if !line.starts_with(&expected_line) {
            bail!(
                "reply to request {request_id} arrived as {:?}",
                String::from_utf8_lossy(line)
            );
        }
        if let Some(latencies_ns) = latencies_ns.as_deref_mut() {
            latencies_ns.push(u64::try_from(round_trip.as_nanos()).unwrap_or(u64::MAX));
        }
    }
    Ok(())
}

/// Nearest-rank percentile of sorted values, `quantile` in (0, 1].
pub fn percentile(sorted: &[u64], quantile: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Sequential round trips from `requesters` connections (each its own
/// inbox) through `responders` (a queue group when more than one), measured
/// together over one window.
fn req_rep(
    server: &RunningServer,
    params: &Params,
    requesters: usize,
    responders: usize,
) -> Result<Measurement> {
    let setup_deadline = Instant::now() + params.timeout;
    let subscribe: &[u8] = if responders > 1 {
        b"SUB svc.echo workers 1\r\n"
    } else {
        b"SUB svc.echo 1\r\n"
    };
    let mut responder_conns = Vec::new();
    for i in 0..responders {
        let mut conn = Conn::open(server.addr, STREAM_READ_BUFFER_BYTES, setup_deadline)
            .with_context(|| format!("responder {i}"))?;
        conn.handshake(subscribe, setup_deadline)
            .with_context(|| format!("responder {i}"))?;
        responder_conns.push(conn);
    }
    let mut requester_conns = Vec::new();
    for k in 0..requesters {
        let inbox = if requesters == 1 {
            "_INBOX.lg".to_string()
        } else {
            format!("_INBOX.lg{k}")
        };
        let mut conn = Conn::open(server.addr, STREAM_READ_BUFFER_BYTES, setup_deadline)
            .with_context(|| format!("requester {k}"))?;
        conn.handshake(format!("SUB {inbox}.* 1\r\n").as_bytes(), setup_deadline)
            .with_context(|| format!("requester {k}"))?;
        requester_conns.push((inbox, conn));
    }
    let payload = vec![b'x'; params.payload_bytes];
    let run_deadline = Instant::now() + params.warmup + params.duration + params.timeout;
    let stop = AtomicBool::new(false);
    let failed = AtomicBool::new(false);
    // Requesters warm up, then all start measuring together with the CPU window.
    let warmed = std::sync::Barrier::new(requesters + 1);

    thread::scope(|scope| -> Result<Measurement> {
        let (stop, failed, warmed, payload) = (&stop, &failed, &warmed, &payload);
        let responder_handles: Vec<_> = responder_conns
            .into_iter()
            .map(|conn| {
                scope.spawn(move || {
                    let result = respond(conn, stop, run_deadline);
                    if result.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    result
                })
            })
            .collect();
        let requester_handles: Vec<_> = requester_conns
            .into_iter()
            .map(|(inbox, mut conn)| {
                scope.spawn(move || -> Result<Vec<u64>> {
                    let mut next_request_id = 0u64;
                    let warm = request_loop(
                        &mut conn,
                        &inbox,
                        payload,
                        params.warmup,
                        &mut next_request_id,
                        None,
                        failed,
                    );
                    warmed.wait();
                    warm?;
                    let mut latencies_ns = Vec::with_capacity(1 << 14);
                    request_loop(
                        &mut conn,
                        &inbox,
                        payload,
                        params.duration,
                        &mut next_request_id,
                        Some(&mut latencies_ns),
                        failed,
                    )?;
                    Ok(latencies_ns)
                })
            })
            .collect();
        warmed.wait();
        let cpu = CpuWindow::start(server);
        let mut latencies_ns = Vec::new();
        let mut requests_result = Ok(());
        for (k, handle) in requester_handles.into_iter().enumerate() {
            match join_thread(handle, "requester") {
                Ok(mut l) => latencies_ns.append(&mut l),
                Err(e) if requests_result.is_ok() => {
                    requests_result = Err(e.context(format!("requester {k}")))
                }
                Err(_) => {}
            }
        }
        let cpu = cpu.and_then(|cpu| cpu.finish(server));
        stop.store(true, Ordering::Relaxed);
        for handle in responder_handles {
            // The responder's error explains a requester's timeout: report it first.
            join_thread(handle, "responder")?;
        }
        requests_result?;
        let cpu = cpu?;
        latencies_ns.sort_unstable();
        let micros = |quantile| percentile(&latencies_ns, quantile).map(|ns| ns as f64 / 1000.0);
        // Each round trip delivers two messages: the request to the
        // responder and the reply to the requester.
        let delivered = 2 * latencies_ns.len() as u64;
        Ok(vec![
            ("p50_us", micros(0.50).context("no round trips completed")?),
            ("p99_us", micros(0.99).context("no round trips completed")?),
            ("round_trips", latencies_ns.len() as f64),
            (
                "server_cpu_s_per_m_delivered",
                cpu.server_s_per_million(delivered)?,
            ),
            ("server_cpu_cores", cpu.server_cores()),
        ])
    })
}

fn idle_conn(server: &RunningServer, params: &Params) -> Result<Measurement> {
    thread::sleep(params.settle);
    let rss_before_kib = server.rss_kib()?;
    let setup_deadline = Instant::now() + params.timeout;
    // The CPU window: from before the first connect to the last PONG.
    let cpu = CpuWindow::start(server)?;
    let mut groups = connect_many(
        server.addr,
        params.idle_conns,
        params.connect_threads,
        setup_deadline,
        &|id| format!("SUB dev.{id}.cmd 1\r\n").into_bytes(),
    )?;
    let cpu = cpu.finish(server)?;
    thread::sleep(params.settle);
    let rss_after_kib = server.rss_kib()?;
    // Every connection must still be open: one more PING/PONG on each.
    let check_deadline = Instant::now() + params.timeout;
    for (id, conn) in groups.iter_mut().flatten() {
        conn.ping_pong(check_deadline)
            .with_context(|| format!("idle connection {id} after settling"))?;
    }
    drop(groups);
    let conns = params.idle_conns.max(1) as f64;
    let per_conn_kib = (rss_after_kib as f64 - rss_before_kib as f64) / conns;
    Ok(vec![
        ("rss_per_conn_kib", per_conn_kib),
        ("rss_before_kib", rss_before_kib as f64),
        ("rss_after_kib", rss_after_kib as f64),
        (
            "server_cpu_us_per_conn",
            cpu.server.as_secs_f64() * 1e6 / conns,
        ),
    ])
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::ValueEnum;

    use super::{percentile, CpuUse, Scenario, PEAK_RSS_KEY};

    #[test]
    fn every_scenario_reports_peak_rss_and_server_cpu_per_unit() {
        for scenario in Scenario::value_variants() {
            let keys: Vec<&str> = scenario.metrics().iter().map(|metric| metric.key).collect();
            assert_eq!(
                keys.iter().filter(|key| **key == PEAK_RSS_KEY).count(),
                1,
                "{}: {keys:?}",
                scenario.name()
            );
            assert_eq!(
                keys.iter()
                    .filter(|key| key.starts_with("server_cpu_") && key.contains("_per_"))
                    .count(),
                1,
                "{}: {keys:?}",
                scenario.name()
            );
            let mut unique = keys.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), keys.len(), "{}: {keys:?}", scenario.name());
        }
    }

    #[test]
    fn cpu_per_million_messages() {
        let cpu = CpuUse {
            wall: Duration::from_secs(2),
            server: Duration::from_millis(1500),
            loadgen: Duration::from_millis(200),
        };
        assert_eq!(cpu.server_cores(), 0.75);
        assert_eq!(cpu.loadgen_cores(), 0.1);
        assert_eq!(cpu.server_s_per_million(3_000_000).unwrap(), 0.5);
        assert!(cpu.server_s_per_million(0).is_err());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.5), Some(50));
        assert_eq!(percentile(&values, 0.99), Some(99));
        assert_eq!(percentile(&values, 1.0), Some(100));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
