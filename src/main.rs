//! The `perch` command line: parses flags and the config file, sets up logging,
//! and hands a validated [`Config`] to the runtime; `perch store` runs the read-only
//! operator commands of `perch::store::{verify, dump}` and maps their verdicts to
//! exit codes. Nothing here touches the message path.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use perch::config::{Config, Placement};
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
    use perch::tools::device::{publish, subscribe, Endpoint};
    let endpoint = |common: &DeviceCommon| match (
        &common.endpoint.tcp,
        &common.endpoint.serial,
        &common.endpoint.udp,
    ) {
        (Some(tcp), _, _) => Endpoint::Tcp(tcp.clone()),
        (_, Some(path), _) => Endpoint::Serial(path.clone(), common.baud),
        (_, _, udp) => Endpoint::Udp(udp.clone().unwrap_or_else(|| "127.0.0.1:4225".into())),
    };
    let client_id = |common: &DeviceCommon| {
        common
            .client_id
            .clone()
            .unwrap_or_else(|| format!("perch-cli-{}", std::process::id()))
    };
    let result = match command {
        DeviceCommand::Pub {
            common,
            qos,
            count,
            subject,
            payload,
        } => publish(
            &endpoint(&common),
            &client_id(&common),
            &subject,
            payload.as_bytes(),
            count,
            qos,
            std::time::Duration::from_millis(common.timeout_ms),
        ),
        DeviceCommand::Sub {
            common,
            qos,
            count,
            subject,
        } => subscribe(
            &endpoint(&common),
            &client_id(&common),
            &subject,
            qos == 1,
            count,
            std::time::Duration::from_millis(common.timeout_ms),
            &mut std::io::stdout().lock(),
        ),
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
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<Config> {
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
            max_payload,
            max_pending,
            max_control_line,
            max_connections,
            max_subscriptions,
            connect_timeout_ms,
            ping_interval_ms,
            ping_max_outstanding,
            spin_us,
            store_segment_bytes,
            store_durability,
            store_sync_interval_ms
        );
        if self.shards.is_some() {
            config.shards = self.shards;
        }
        if self.server_name.is_some() {
            config.server_name = self.server_name;
        }
        if self.store_dir.is_some() {
            config.store_dir = self.store_dir;
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
            config.log_level = self.log_level;
        }
        config.validate()?;
        Ok(config)
    }
}

fn init_logging(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| level.and_then(|l| EnvFilter::try_new(l).ok()))
        .unwrap_or_else(|| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = match args.into_config() {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("perch: {e:#}");
                    return ExitCode::from(2);
                }
            };
            init_logging(config.log_level.as_deref());
            match perch::runtime::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("perch stopped: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Store(command) => run_store_command(command),
        Command::Device(command) => run_device_command(command),
    }
}
