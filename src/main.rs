//! The `perch` command line: parses flags and the config file, sets up logging,
//! and hands a validated [`Config`] to the runtime; `perch store` runs the read-only
//! operator commands of `perch::store::{verify, dump}` and maps their verdicts to
//! exit codes. Nothing here touches the message path.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use perch::config::{Config, LogFormat, Placement};
use perch::runtime::io::IoMode;

#[derive(Parser)]
#[command(
    name = "perch",
    version,
    about = "A thread-per-core message broker for edge gateways (NATS protocol)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve(Box<ServeArgs>),
    /// Inspect a store directory, read-only (best with the broker stopped).
    #[command(subcommand)]
    Store(StoreCommand),
    /// Act as a device speaking the compact device protocol (the Rust
    /// firmware client on a host): publish or subscribe.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Check this machine against the configuration `serve` would run with
    /// (takes the same flags): io_uring, limits, CPUs, the store's filesystem,
    /// space and fsync latency, the clock, ports. Each finding says the fix.
    /// Exit code 0 all ok, 1 warnings, 2 errors.
    Doctor(Box<ServeArgs>),
    /// Publish PAYLOAD to SUBJECT (a NATS client; works against any NATS server).
    Pub {
        #[command(flatten)]
        server: NatsServerArg,
        /// Publish this many times.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// A header, NAME:VALUE (repeatable), e.g. `-H 'Perch-Qos: 1'`.
        #[arg(long = "header", short = 'H', value_name = "NAME:VALUE")]
        headers: Vec<String>,
        /// Reply subject to send with the message.
        #[arg(long)]
        reply: Option<String>,
        subject: String,
        #[arg(default_value = "")]
        payload: String,
    },
    /// Subscribe to SUBJECT (wildcards allowed) and print each message as
    /// one line, `SUBJECT PAYLOAD` (escaped onto one line).
    Sub {
        #[command(flatten)]
        server: NatsServerArg,
        /// Exit after this many messages (0: run until killed).
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Join this queue group.
        #[arg(long)]
        queue: Option<String>,
        /// Print the header block too: `SUBJECT [HEADERS] PAYLOAD`.
        #[arg(long)]
        headers: bool,
        subject: String,
    },
    /// Send a request and print the reply's payload; exit 1 on no responders
    /// or no reply in time.
    Req {
        #[command(flatten)]
        server: NatsServerArg,
        /// How long to wait for the reply, in ms.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// A header, NAME:VALUE (repeatable).
        #[arg(long = "header", short = 'H', value_name = "NAME:VALUE")]
        headers: Vec<String>,
        subject: String,
        #[arg(default_value = "")]
        payload: String,
    },
    /// Measure publish and delivery rates on SUBJECT: subscribers first, then
    /// publishers sharing --msgs messages of --size bytes.
    Bench {
        #[command(flatten)]
        server: NatsServerArg,
        #[arg(long, default_value_t = 100_000)]
        msgs: u64,
        /// Payload bytes per message.
        #[arg(long, default_value_t = 16)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        pubs: usize,
        #[arg(long, default_value_t = 1)]
        subs: usize,
        /// How long subscribers wait for all messages, in ms.
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u64,
        #[arg(default_value = "perch.bench")]
        subject: String,
    },
}

/// Which NATS server the client commands talk to.
#[derive(Args, Clone, Debug)]
struct NatsServerArg {
    /// nats://HOST:PORT or HOST:PORT.
    #[arg(
        long,
        short = 's',
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    server: String,
}

fn run_nats_command(command: Command) -> ExitCode {
    use perch::tools::nats::{self, NatsToolError};
    let headers = |list: &[String]| -> Result<Vec<(String, String)>, NatsToolError> {
        list.iter().map(|h| nats::parse_header(h)).collect()
    };
    let result: Result<(), NatsToolError> = match command {
        Command::Pub {
            server,
            count,
            headers: h,
            reply,
            subject,
            payload,
        } => headers(&h).and_then(|h| {
            nats::publish(
                &server.server,
                &subject,
                payload.as_bytes(),
                &h,
                reply.as_deref(),
                count,
            )
        }),
        Command::Sub {
            server,
            count,
            queue,
            headers,
            subject,
        } => nats::subscribe(
            &server.server,
            &subject,
            queue.as_deref(),
            count,
            headers,
            &mut std::io::stdout().lock(),
        ),
        Command::Req {
            server,
            timeout_ms,
            headers: h,
            subject,
            payload,
        } => headers(&h)
            .and_then(|h| {
                nats::request(
                    &server.server,
                    &subject,
                    payload.as_bytes(),
                    &h,
                    std::time::Duration::from_millis(timeout_ms),
                )
            })
            .and_then(|msg| {
                let mut out = std::io::stdout().lock();
                out.write_all(&msg.payload)?;
                out.write_all(b"\n")?;
                Ok(())
            }),
        Command::Bench {
            server,
            msgs,
            size,
            pubs,
            subs,
            timeout_ms,
            subject,
        } => nats::bench(
            &server.server,
            &subject,
            msgs,
            size,
            pubs,
            subs,
            std::time::Duration::from_millis(timeout_ms),
        )
        .map(|report| print!("{report}")),
        _ => unreachable!("only NATS client commands come here"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `perch sub | head`: the reader left; not a failure.
        Err(NatsToolError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("perch: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where the broker's device side is (one of the three).
#[derive(Args, Clone, Debug)]
#[group(required = false, multiple = false)]
struct DeviceEndpoint {
    /// The broker's device UDP address [default: 127.0.0.1:4225].
    #[arg(long, value_name = "HOST:PORT")]
    udp: Option<String>,
    /// The broker's device TCP address.
    #[arg(long, value_name = "HOST:PORT")]
    tcp: Option<String>,
    /// A serial line to the broker (COBS frames).
    #[arg(long, value_name = "PATH")]
    serial: Option<PathBuf>,
}

#[derive(Args, Clone, Debug)]
struct DeviceCommon {
    #[command(flatten)]
    endpoint: DeviceEndpoint,
    /// Baud rate of --serial.
    #[arg(long, default_value_t = 115_200)]
    baud: u32,
    /// The session's client id [default: perch-cli-<pid>].
    #[arg(long)]
    client_id: Option<String>,
    /// Seal every frame with this device key (64 hex digits in a file, as
    /// the broker's `key_file`; docs/device-protocol.md section 9). The next
    /// epoch is kept beside it, in PATH with the extension `.epoch`.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// How long to wait for the broker at each step, in ms.
    #[arg(long, default_value_t = 5_000)]
    timeout_ms: u64,
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// One session: registers SUBJECT once, publishes PAYLOAD --count times,
    /// disconnects. Exits non-zero if a QoS 1 publish was not acknowledged.
    Pub {
        #[command(flatten)]
        common: DeviceCommon,
        /// 0: fire and forget; 1: acknowledged (after the store's fsync when
        /// a stream captures the subject).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
        qos: u8,
        #[arg(long, default_value_t = 1)]
        count: u32,
        subject: String,
        payload: String,
    },
    /// One session, one subscription: prints each message's payload on its own
    /// line; exits after --count messages (0: runs until killed).
    Sub {
        #[command(flatten)]
        common: DeviceCommon,
        /// The subscription's max QoS: 1 gets QoS 1 messages (a device's QoS 1
        /// publish, or a NATS message with `Perch-Qos: 1`) acknowledged and
        /// resent until acknowledged.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
        qos: u8,
        #[arg(long, default_value_t = 0)]
        count: u64,
        subject: String,
    },
}

fn run_device_command(command: DeviceCommand) -> ExitCode {
    use perch::tools::device::{publish, read_key_file, subscribe, Endpoint, Identity};
    let endpoint = |common: &DeviceCommon| match (
        &common.endpoint.tcp,
        &common.endpoint.serial,
        &common.endpoint.udp,
    ) {
        (Some(tcp), _, _) => Endpoint::Tcp(tcp.clone()),
        (_, Some(path), _) => Endpoint::Serial(path.clone(), common.baud),
        (_, _, udp) => Endpoint::Udp(udp.clone().unwrap_or_else(|| "127.0.0.1:4225".into())),
    };
    let client_id =
        |common: &DeviceCommon| -> Result<Identity, perch::tools::device::DeviceToolError> {
            Ok(Identity {
                client_id: common
                    .client_id
                    .clone()
                    .unwrap_or_else(|| format!("perch-cli-{}", std::process::id())),
                key: common.key_file.as_deref().map(read_key_file).transpose()?,
                epoch_file: common.key_file.as_ref().map(|k| k.with_extension("epoch")),
            })
        };
    let result = match command {
        DeviceCommand::Pub {
            common,
            qos,
            count,
            subject,
            payload,
        } => client_id(&common).and_then(|identity| {
            publish(
                &endpoint(&common),
                &identity,
                &subject,
                payload.as_bytes(),
                count,
                qos,
                std::time::Duration::from_millis(common.timeout_ms),
            )
        }),
        DeviceCommand::Sub {
            common,
            qos,
            count,
            subject,
        } => client_id(&common).and_then(|identity| {
            subscribe(
                &endpoint(&common),
                &identity,
                &subject,
                qos == 1,
                count,
                std::time::Duration::from_millis(common.timeout_ms),
                &mut std::io::stdout().lock(),
            )
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("perch device: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Exit codes of `perch store`: 0 the store checked out (warnings allowed), 1 a log
/// is corrupt or unreadable, 2 the command could not run (no such store or stream).
#[derive(Subcommand)]
enum StoreCommand {
    /// Check every record of every stream under DIR; exit 1 on corruption.
    ///
    /// Prints a summary per stream (segments, records, first and last sequence,
    /// bytes); corruption names the segment file and offset. Changes nothing: a torn
    /// tail is reported as a warning and left for the broker to zero at its next start.
    Verify {
        /// The store directory (the broker's --store-dir).
        dir: PathBuf,
    },
    /// Print a stream's records, one line each.
    ///
    /// Each line: seq, time (RFC 3339, UTC), subject, header and payload sizes, and
    /// the payload as escaped text (`\"`, `\\`, `\n`, `\u{..}` for control
    /// characters, `\xNN` for bytes that are not UTF-8).
    Dump {
        /// The store directory (the broker's --store-dir).
        dir: PathBuf,
        /// The stream to print.
        #[arg(long)]
        stream: String,
        /// The first sequence to print (or the oldest record after it).
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Print at most this many records [default: all].
        #[arg(long)]
        limit: Option<u64>,
    },
}

fn run_store_command(command: StoreCommand) -> ExitCode {
    use perch::store::dump::{dump_stream, DumpError};
    use perch::store::verify::verify_store;
    match command {
        StoreCommand::Verify { dir } => {
            let report = match verify_store(&dir) {
                Ok(report) => report,
                Err(e) => {
                    eprintln!(
                        "perch: {} is no store: {}: {e}",
                        dir.display(),
                        dir.join(perch::store::streams::STREAMS_DIR_NAME).display()
                    );
                    return ExitCode::from(2);
                }
            };
            // A closed stdout must not hide the verdict: the exit code still carries it.
            let _ = writeln!(std::io::stdout(), "{report}");
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "perch: store {} failed verification: {} of {} streams corrupt or unreadable",
                    dir.display(),
                    report.failed(),
                    report.streams.len()
                );
                ExitCode::FAILURE
            }
        }
        StoreCommand::Dump {
            dir,
            stream,
            from,
            limit,
        } => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            match dump_stream(&dir, &stream, from, limit, &mut out) {
                Ok(summary) => {
                    if let Some(tail) = summary.torn_tail {
                        eprintln!(
                            "perch: warning: stream {stream} ends in a torn tail at offset {} \
                             of {} ({}); see `perch store verify`",
                            tail.offset,
                            summary.dir.join(&tail.file).display(),
                            tail.bad
                        );
                    }
                    if let Some(tail) = summary.deletes_torn_tail {
                        eprintln!(
                            "perch: warning: stream {stream}'s deletes file ends in an \
                             interrupted deletion at offset {} of {} bytes ({}), never \
                             acknowledged and not applied; see `perch store verify`",
                            tail.offset, tail.file_len, tail.reason
                        );
                    }
                    ExitCode::SUCCESS
                }
                // The reader went away (`| head`): not an error of the dump.
                Err(DumpError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    ExitCode::SUCCESS
                }
                Err(e @ (DumpError::StreamName(_) | DumpError::NoSuchStream { .. })) => {
                    eprintln!("perch: {e}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("perch: stream {stream}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Every flag overrides the same key of the config file.
#[derive(Args)]
struct ServeArgs {
    /// TOML config file; flags given here override its keys.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Address to accept NATS clients on [default: 0.0.0.0:4222].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Shards (pinned threads) [default: the CPUs this process may use].
    #[arg(long)]
    shards: Option<usize>,
    /// I/O backend [default: auto — io_uring if the kernel offers it].
    #[arg(long, value_enum)]
    io: Option<IoMode>,
    /// How accepted connections are spread over shards [default: least-loaded].
    #[arg(long, value_enum)]
    placement: Option<Placement>,
    /// Move connections between shards: `flows` moves a high-rate publisher
    /// to its subscribers' shard, `auto` also request-reply partners, `off`
    /// never [default: flows].
    #[arg(long, value_enum)]
    affinity: Option<perch::config::AffinityMode>,
    /// Largest message payload a client may publish, in bytes [default: 1048576].
    #[arg(long)]
    max_payload: Option<usize>,
    /// Bytes queued to one client before it is closed as a slow consumer [default: 67108864].
    #[arg(long)]
    max_pending: Option<usize>,
    /// Longest protocol control line, in bytes [default: 4096].
    #[arg(long)]
    max_control_line: Option<usize>,
    /// Simultaneous client connections [default: 65536].
    #[arg(long)]
    max_connections: Option<usize>,
    /// New connections a second from one IP address, 0 = no limit [default: 0].
    #[arg(long)]
    connection_rate_per_ip: Option<u32>,
    /// Subscriptions per connection, 0 = unlimited [default: 0].
    #[arg(long)]
    max_subscriptions: Option<usize>,
    /// Time a client has to send CONNECT, in ms [default: 2000].
    #[arg(long)]
    connect_timeout_ms: Option<u64>,
    /// Interval of server PINGs, in ms [default: 120000].
    #[arg(long)]
    ping_interval_ms: Option<u64>,
    /// Unanswered PINGs before a client is closed as stale [default: 2].
    #[arg(long)]
    ping_max_outstanding: Option<u32>,
    /// epoll backend: busy-poll this long after activity before sleeping, in µs;
    /// cuts request-reply latency at the cost of CPU while busy [default: 0].
    #[arg(long)]
    spin_us: Option<u64>,
    /// Directory of the write-ahead store; turns streams (JetStream's API) on
    /// [default: off].
    #[arg(long)]
    store_dir: Option<PathBuf>,
    /// Size of each stream segment file, preallocated [default: 67108864].
    #[arg(long)]
    store_segment_bytes: Option<u64>,
    /// always: fdatasync before every ack (group commit); interval: ack at once,
    /// sync every --store-sync-interval-ms; none: sync only at rolls, deletions and
    /// shutdown [default: always].
    #[arg(long)]
    store_durability: Option<perch::store::Durability>,
    /// interval durability: time between syncs, in ms [default: 1000].
    #[arg(long)]
    store_sync_interval_ms: Option<u64>,
    /// UDP address for devices speaking the compact device protocol, e.g.
    /// 0.0.0.0:4225 [default: off].
    #[arg(long)]
    device_udp: Option<SocketAddr>,
    /// TCP address for devices (length-prefixed frames), e.g. 0.0.0.0:4225
    /// [default: off].
    #[arg(long)]
    device_tcp: Option<SocketAddr>,
    /// Serve monitoring over HTTP on this address (nats-server's /varz, /connz,
    /// /subsz, /jsz, /healthz, and Prometheus /metrics), e.g. 127.0.0.1:8222
    /// [default: off].
    #[arg(long, value_name = "ADDR:PORT")]
    http: Option<SocketAddr>,
    /// Name reported in INFO [default: perch].
    #[arg(long)]
    server_name: Option<String>,
    /// Log filter (error, warn, info, debug, trace or a tracing directive); RUST_LOG wins.
    #[arg(long)]
    log_level: Option<String>,
    /// Log lines as text or as one JSON object each [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Test-only: this shard's thread blocks for good (see --debug-stall-after-ms),
    /// so the systemd watchdog's reaction can be tested.
    #[arg(long, hide = true)]
    debug_stall_shard: Option<usize>,
    /// Test-only: when --debug-stall-shard blocks, in ms after the shard started.
    #[arg(long, hide = true, default_value_t = 0)]
    debug_stall_after_ms: u64,
    /// Test-only: every Nth read pass on a shard moves its connection to the
    /// next shard (when it can move at all); 0: off.
    #[arg(long, hide = true, default_value_t = 0)]
    debug_move_every: u32,
}

impl ServeArgs {
    /// The config file (read again at every call: a reload) with the flags over
    /// it, validated, log level included.
    fn to_config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { config.$field = v; } )* };
        }
        set!(
            listen,
            io,
            placement,
            affinity,
            max_payload,
            max_pending,
            max_control_line,
            max_connections,
            connection_rate_per_ip,
            max_subscriptions,
            connect_timeout_ms,
            ping_interval_ms,
            ping_max_outstanding,
            spin_us,
            store_segment_bytes,
            store_durability,
            store_sync_interval_ms,
            log_format
        );
        if self.shards.is_some() {
            config.shards = self.shards;
        }
        if self.server_name.is_some() {
            config.server_name.clone_from(&self.server_name);
        }
        if self.store_dir.is_some() {
            config.store_dir.clone_from(&self.store_dir);
        }
        if self.device_udp.is_some() {
            config.device.udp = self.device_udp;
        }
        if self.device_tcp.is_some() {
            config.device.tcp = self.device_tcp;
        }
        if self.http.is_some() {
            config.http = self.http;
        }
        if self.log_level.is_some() {
            config.log_level.clone_from(&self.log_level);
        }
        config.validate()?;
        log_filter(config.log_level.as_deref())?;
        Ok(config)
    }
}

type LogHandle = tracing_subscriber::reload::Handle<
    tracing_subscriber::filter::Targets,
    tracing_subscriber::Registry,
>;

/// The filter for `log_level`; a valid `RUST_LOG` wins over it. A default
/// level and `target=level` directives ("info", "perch=debug,warn"), the way
/// RUST_LOG is usually written. EnvFilter's span and field filters are not
/// offered: its regex engine was a tenth of the binary, and binary pages are
/// most of an idle broker's RSS.
fn log_filter(level: Option<&str>) -> anyhow::Result<tracing_subscriber::filter::Targets> {
    use tracing_subscriber::filter::Targets;
    let parse = |text: &str| -> Option<Targets> {
        let text = text.trim();
        (!text.is_empty()).then(|| text.parse().ok()).flatten()
    };
    if let Some(filter) = std::env::var("RUST_LOG").ok().and_then(|v| parse(&v)) {
        return Ok(filter);
    }
    match level {
        Some(level) => level
            .trim()
            .parse::<Targets>()
            .map_err(|e| anyhow::anyhow!("invalid log_level {level:?}: {e}")),
        None => Ok(Targets::new().with_default(tracing::Level::INFO)),
    }
}

/// Whether stderr goes to the journal (systemd sets `JOURNAL_STREAM` for a
/// service whose output it collects, `INVOCATION_ID` for every service):
/// journald stamps each line itself, so ours would be a second timestamp.
fn under_systemd() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some()
}

/// Logging to stderr: colour only on a terminal, no timestamp under systemd
/// (text), or JSON lines. Returns the handle a reload swaps the filter with.
fn init_logging(config: &Config) -> anyhow::Result<LogHandle> {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, reload};
    let (filter, handle) = reload::Layer::new(log_filter(config.log_level.as_deref())?);
    let text = (config.log_format == LogFormat::Text).then(|| {
        let layer = fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
        if under_systemd() {
            layer.without_time().boxed()
        } else {
            layer.boxed()
        }
    });
    let json = (config.log_format == LogFormat::Json).then(|| {
        fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_ansi(false)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .init();
    Ok(handle)
}

/// The config `serve` (and `doctor`) would run with, or None after saying why.
fn config_or_complain(args: &ServeArgs) -> Option<Config> {
    match args.to_config() {
        Ok(config) => Some(config),
        Err(e) => {
            eprintln!("perch: {e:#}");
            None
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let Some(config) = config_or_complain(&args) else {
                return ExitCode::from(2);
            };
            let log = match init_logging(&config) {
                Ok(log) => log,
                Err(e) => {
                    eprintln!("perch: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let stall = args
                .debug_stall_shard
                .map(|shard| perch::runtime::StallHook {
                    shard,
                    after_ms: args.debug_stall_after_ms,
                });
            let debug_move_every = args.debug_move_every;
            let service = perch::runtime::Service {
                reload: Box::new(move || args.to_config()),
                set_log_level: Box::new(move |config: &Config| {
                    if std::env::var_os("RUST_LOG").is_some() {
                        tracing::info!("RUST_LOG is set: it keeps deciding the log level");
                    }
                    // `to_config` checked this filter; a failure here would be ours.
                    match log_filter(config.log_level.as_deref()) {
                        Ok(filter) => {
                            if let Err(e) = log.reload(filter) {
                                tracing::error!("cannot change the log level: {e}");
                            }
                        }
                        Err(e) => tracing::error!("{e:#}"),
                    }
                }),
                stall,
                debug_move_every,
            };
            match perch::runtime::run(config, service) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("perch stopped: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Store(command) => run_store_command(command),
        Command::Device(command) => run_device_command(command),
        command @ (Command::Pub { .. }
        | Command::Sub { .. }
        | Command::Req { .. }
        | Command::Bench { .. }) => run_nats_command(command),
        Command::Doctor(args) => {
            let Some(config) = config_or_complain(&args) else {
                return ExitCode::from(2);
            };
            use perch::tools::doctor;
            let mut out = std::io::stdout().lock();
            let findings = doctor::run(&config, &mut out);
            let count = |level| findings.iter().filter(|f| f.level == level).count();
            let _ = writeln!(
                out,
                "perch doctor: {} ok, {} warnings, {} errors",
                count(doctor::Level::Ok),
                count(doctor::Level::Warn),
                count(doctor::Level::Error)
            );
            ExitCode::from(doctor::exit_code(&findings))
        }
    }
}
