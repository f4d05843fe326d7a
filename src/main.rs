//! The `perch` command line: parses flags and the config file, sets up logging,
//! and hands a validated [`Config`] to the runtime. Nothing here touches the
//! message path.

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
    Serve(ServeArgs),
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
            spin_us
        );
        if self.shards.is_some() {
            config.shards = self.shards;
        }
        if self.server_name.is_some() {
            config.server_name = self.server_name;
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
    }
}
