//! perch-loadgen: runs each benchmark scenario against perch and nats-server
//! alternately (a fresh server per run), prints a table per scenario with
//! each server's median and the ratio perch/nats-server, and writes every
//! measurement as JSON lines. Traffic comes from its own raw-protocol
//! generator or, in the real-client scenarios, from nats.go and libnats
//! programs it builds (clients.rs). The method is written up in BENCHMARKS.md.

mod clients;
mod devices;
mod jetstream;
mod machine;
mod proto;
mod report;
mod scenarios;
mod selfcheck;
mod server;
mod tls;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::json;

use crate::clients::{ClientPrograms, Toolchain};
use crate::machine::{program_version, Machine, StoreDisk};
use crate::report::{RunRecord, NATS_SERVER, PERCH};
use crate::scenarios::{Params, Scenario};
use crate::server::{Flavor, ServerSpec};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Only {
    Perch,
    Nats,
}

/// Compare perch with nats-server over the raw NATS client protocol and with
/// real NATS clients (nats.go, libnats).
#[derive(Parser, Debug)]
#[command(name = "perch-loadgen", version)]
struct Cli {
    /// perch binary; started as `serve --listen 127.0.0.1:PORT --shards N`.
    #[arg(long, default_value = "target/release/perch")]
    perch: PathBuf,
    /// Extra arguments for `perch serve`, split on whitespace.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    perch_args: String,
    /// perch's --shards [default: CPUs this process may use].
    #[arg(long)]
    shards: Option<usize>,
    /// nats-server binary; started as `-a 127.0.0.1 -p PORT`.
    #[arg(long, default_value = "nats-server")]
    nats_server: PathBuf,
    /// Extra arguments for nats-server, split on whitespace.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    nats_args: String,
    /// Run only one of the two servers.
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// Run only this scenario (repeatable) [default: all but the JetStream
    /// ones, js-publish and js-replay, and the device ones, device-fan-in and
    /// device-idle, which run only when named].
    #[arg(long, value_enum)]
    scenario: Vec<Scenario>,
    /// Rounds; each round runs every selected server once per scenario.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Measured time of the duration-bound scenarios (pub-only, pub-sub,
    /// fan-out, req-rep, the real clients' pub-sub, js-publish).
    #[arg(long, default_value_t = 3000)]
    duration_ms: u64,
    /// Unmeasured traffic before each duration-bound measurement.
    #[arg(long, default_value_t = 300)]
    warmup_ms: u64,
    /// Bound on every setup, drain and count-bound phase.
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    #[arg(long, default_value_t = 16)]
    payload_bytes: usize,
    /// pub-sub/fan-out (raw and real clients): most messages the publisher
    /// may be ahead of the slowest subscriber.
    #[arg(long, default_value_t = 100_000)]
    window_msgs: u64,
    #[arg(long, default_value_t = 4)]
    fan_out_subscribers: usize,
    /// fan-in (raw and real clients): device connections.
    #[arg(long, default_value_t = 8000)]
    fan_in_devices: usize,
    /// fan-in (raw and real clients): messages each device publishes.
    #[arg(long, default_value_t = 100)]
    fan_in_msgs_per_device: usize,
    #[arg(long, default_value_t = 5000)]
    idle_conns: usize,
    /// idle-conn: wait before each RSS reading.
    #[arg(long, default_value_t = 1000)]
    settle_ms: u64,
    /// Threads that open the fan-in and idle-conn connections (in the real
    /// clients' fan-in: goroutines / threads; libnats also publishes from them),
    /// and that set up and drive the device scenarios' devices.
    #[arg(long, default_value_t = 4)]
    connect_threads: usize,
    /// device-fan-in, device-idle: simulated devices, each with its own UDP
    /// socket (perch) or TCP connection (nats-server, device-fan-in).
    #[arg(long, default_value_t = 10_000)]
    device_count: usize,
    /// device-fan-in: QoS 0 messages each device publishes.
    #[arg(long, default_value_t = 10)]
    device_msgs: usize,
    /// device-fan-in: most messages sent but not yet at the subscriber, over
    /// the whole fleet (keeps perch's UDP receive buffer, ~256 small
    /// datagrams per socket, from simply overflowing; same on TCP).
    #[arg(long, default_value_t = 256)]
    device_window_msgs: u64,
    /// js-publish/js-replay: publisher connections, one thread each.
    #[arg(long, default_value_t = 4)]
    js_publishers: usize,
    /// js-publish/js-replay: most publishes each publisher may have unacked
    /// (nats.go's async-publish default is 4000).
    #[arg(long, default_value_t = 4000)]
    js_window_msgs: u64,
    /// js-replay: messages pre-filled, then replayed.
    #[arg(long, default_value_t = 1_000_000)]
    js_replay_msgs: u64,
    /// js-replay: messages asked for by one pull request.
    #[arg(long, default_value_t = 1000)]
    js_fetch_batch: u64,
    /// js-*: each run's fresh store directory is made under
    /// <DIR>/perch-loadgen-<pid>-stores/ and removed after the run
    /// [default: the temp dir]. Its disk is what perch's fsyncs wait for.
    #[arg(long)]
    store_root: Option<PathBuf>,
    /// js-*: keep each run's store directory.
    #[arg(long)]
    keep_stores: bool,
    /// Real-client scenarios: the Go command that builds the nats.go client.
    #[arg(long, default_value = "go")]
    go: PathBuf,
    /// Real-client scenarios: GOPATH with github.com/nats-io/nats.go (Debian's
    /// golang-github-nats-io-go-nats-dev), built in GOPATH mode, offline.
    #[arg(long, default_value = "/usr/share/gocode")]
    gopath: PathBuf,
    /// Real-client scenarios: the C compiler that builds the libnats client
    /// (needs <nats/nats.h> and -lnats: Debian's libnats-dev).
    #[arg(long, default_value = "gcc")]
    cc: PathBuf,
    /// Real-client scenarios: where the client programs are built
    /// [default: $CARGO_TARGET_DIR/loadgen-clients, else target/loadgen-clients].
    #[arg(long)]
    clients_dir: Option<PathBuf>,
    /// Also write every run and summary as JSON lines to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where server logs go [default: /tmp/perch-loadgen-<pid>].
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Measure the loadgen's own ceilings without a server, then exit.
    #[arg(long)]
    self_check: bool,
    /// Testing aid: run nats-server in perch's slot too (ratios should be ~1).
    #[arg(long, hide = true)]
    perch_is_nats: bool,
}

impl Cli {
    fn params(&self) -> Params {
        Params {
            duration: Duration::from_millis(self.duration_ms),
            warmup: Duration::from_millis(self.warmup_ms),
            timeout: Duration::from_millis(self.timeout_ms),
            payload_bytes: self.payload_bytes,
            window_msgs: self.window_msgs,
            fan_out_subscribers: self.fan_out_subscribers,
            fan_in_devices: self.fan_in_devices,
            fan_in_msgs_per_device: self.fan_in_msgs_per_device,
            idle_conns: self.idle_conns,
            settle: Duration::from_millis(self.settle_ms),
            connect_threads: self.connect_threads,
            js_publishers: self.js_publishers,
            js_window_msgs: self.js_window_msgs,
            js_replay_msgs: self.js_replay_msgs,
            js_fetch_batch: self.js_fetch_batch,
            device_count: self.device_count,
            device_msgs: self.device_msgs,
            device_window_msgs: self.device_window_msgs,
            clients: ClientPrograms::default(),
            tls: None,
        }
    }

    fn toolchain(&self) -> Toolchain {
        let out_dir = self.clients_dir.clone().unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| PathBuf::from("target"), PathBuf::from)
                .join("loadgen-clients")
        });
        Toolchain {
            go: self.go.clone(),
            gopath: self.gopath.clone(),
            cc: self.cc.clone(),
            out_dir,
        }
    }

    fn servers(&self, machine: &Machine) -> Vec<ServerSpec> {
        let split =
            |args: &str| -> Vec<String> { args.split_whitespace().map(String::from).collect() };
        let nats = ServerSpec {
            label: NATS_SERVER,
            program: self.nats_server.clone(),
            flavor: Flavor::NatsServer {
                extra_args: split(&self.nats_args),
            },
        };
        let perch = if self.perch_is_nats {
            ServerSpec {
                label: PERCH,
                ..nats.clone()
            }
        } else {
            ServerSpec {
                label: PERCH,
                program: self.perch.clone(),
                flavor: Flavor::Perch {
                    shards: self.shards.unwrap_or(machine.nproc),
                    extra_args: split(&self.perch_args),
                },
            }
        };
        match self.only {
            Some(Only::Perch) => vec![perch],
            Some(Only::Nats) => vec![nats],
            None => vec![perch, nats],
        }
    }

    fn scenarios(&self) -> Vec<Scenario> {
        if self.scenario.is_empty() {
            return Scenario::DEFAULT.to_vec();
        }
        <Scenario as ValueEnum>::value_variants()
            .iter()
            .copied()
            .filter(|scenario| self.scenario.contains(scenario))
            .collect()
    }
}

/// A program given as a path (not a bare name looked up in PATH) must exist.
fn check_program(label: &str, program: &Path) -> Result<()> {
    if program.components().count() > 1 && !program.exists() {
        bail!(
            "{label} binary not found at {} (build it with `cargo build --release`, pass its path, or use --only)",
            program.display()
        );
    }
    Ok(())
}

struct JsonLines(Option<BufWriter<File>>);

impl JsonLines {
    fn write(&mut self, line: &serde_json::Value) -> Result<()> {
        if let Some(out) = &mut self.0 {
            writeln!(out, "{line}").context("writing JSON lines")?;
            out.flush().context("writing JSON lines")?;
        }
        Ok(())
    }
}

/// Starts the server, runs the scenario, stops the server.
fn run_once(
    spec: &ServerSpec,
    scenario: Scenario,
    params: &Params,
    log_path: &Path,
    store_dir: Option<&Path>,
) -> Result<scenarios::Measurement> {
    let spec = match (&params.tls, scenario.needs_tls()) {
        (Some(files), true) => spec.with_config(&files.perch_config, &files.nats_config),
        _ => spec.clone(),
    };
    let server = spec.start(log_path, store_dir, scenario.needs_device_udp())?;
    match scenario.run(&server, params) {
        Ok(measurement) => {
            if let Err(error) = server.stop() {
                eprintln!("warning: {error:#}");
            }
            Ok(measurement)
        }
        Err(error) => {
            let slow_consumer_lines = server.slow_consumer_lines();
            if slow_consumer_lines.is_empty() {
                Err(error)
            } else {
                Err(error.context(format!(
                    "{} logged a slow consumer: {}",
                    server.label,
                    slow_consumer_lines.join(" | ")
                )))
            }
        }
    }
}

/// An empty directory at `path`: whatever a previous run left there is removed.
fn fresh_dir(path: &Path) -> Result<()> {
    if path.exists() {
        std::fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))?;
    }
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

fn run(cli: &Cli) -> Result<bool> {
    let mut params = cli.params();
    if cli.self_check {
        selfcheck::run(params.payload_bytes, params.duration)?;
        return Ok(true);
    }
    if cli.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let open_file_limit = server::raise_open_file_limit()?;
    let machine = Machine::detect();
    let servers = cli.servers(&machine);
    let scenarios = cli.scenarios();
    for spec in &servers {
        check_program(spec.label, &spec.program)?;
    }
    // Every connection or device socket is a file in this process (and each
    // TCP one also in the server, which inherits the raised limit).
    let mut needed_files = params.fan_in_devices.max(params.idle_conns) + 64;
    if scenarios.iter().any(|scenario| scenario.needs_device_udp()) {
        needed_files = needed_files.max(params.device_count + 64);
    }
    let needed_files = needed_files as u64;
    if open_file_limit < needed_files {
        bail!("the open file limit is {open_file_limit}; the connection scenarios need {needed_files}");
    }
    // The real clients' programs, built before any server starts: a missing
    // compiler or library stops the run here, loudly.
    let mut client_versions: Vec<(String, String)> = Vec::new();
    let toolchain = cli.toolchain();
    for &scenario in &scenarios {
        let Some((client, _)) = scenario.client() else {
            continue;
        };
        if client_versions
            .iter()
            .any(|(label, _)| label == client.label())
        {
            continue;
        }
        let program = clients::build(client, &toolchain).with_context(|| {
            format!(
                "scenario {} needs the {} client (leave it out with --scenario)",
                scenario.name(),
                client.label()
            )
        })?;
        client_versions.push((client.label().to_string(), clients::version(&program)?));
        params.clients.set(client, program);
    }
    // The JetStream scenarios' stores, and the disk under them.
    let store_disk = if scenarios.iter().any(|scenario| scenario.needs_store()) {
        let root = cli.store_root.clone().unwrap_or_else(std::env::temp_dir);
        Some(StoreDisk::probe(&root)?)
    } else {
        None
    };
    let stores_dir = store_disk.as_ref().map(|disk| {
        disk.root
            .join(format!("perch-loadgen-{}-stores", std::process::id()))
    });
    let log_dir = cli.log_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("perch-loadgen-{}", std::process::id()))
    });
    std::fs::create_dir_all(&log_dir)
        .with_context(|| format!("creating log dir {}", log_dir.display()))?;
    if scenarios.iter().any(|scenario| scenario.needs_tls()) {
        params.tls = Some(tls::prepare(&log_dir.join("tls"))?);
    }
    let mut json_lines = JsonLines(match &cli.json {
        Some(path) => Some(BufWriter::new(
            File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => None,
    });

    let versions: Vec<(String, String)> = servers
        .iter()
        .map(|spec| (spec.label.to_string(), program_version(&spec.program)))
        .collect();
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    println!("## perch-loadgen results\n");
    println!(
        "machine: {} CPUs, {}, Linux {}, {:.1} GiB RAM",
        machine.nproc,
        machine.cpu_model,
        machine.kernel,
        machine.mem_total_kib as f64 / (1024.0 * 1024.0)
    );
    for (label, version) in &versions {
        println!("{label}: {version}");
    }
    for (label, version) in &client_versions {
        println!("client {label}: {version}");
    }
    if cli.perch_is_nats {
        println!("NOTE: --perch-is-nats: the perch column is nats-server");
    }
    println!(
        "rounds: {}, duration: {} ms, warmup: {} ms, payload: {} B, server logs: {}\n",
        cli.rounds,
        cli.duration_ms,
        cli.warmup_ms,
        cli.payload_bytes,
        log_dir.display()
    );
    if let (Some(disk), Some(stores_dir)) = (&store_disk, &stores_dir) {
        println!(
            "JetStream: {} publishers x {} unacked, replay of {} msgs in pulls of {}; \
             stores under {} ({} on {}, mounted at {}); \
             64 B append + fdatasync there: p50 {:.0} µs, p99 {:.0} µs\n",
            cli.js_publishers,
            cli.js_window_msgs,
            cli.js_replay_msgs,
            cli.js_fetch_batch,
            stores_dir.display(),
            disk.fs_type,
            disk.device,
            disk.mount_point,
            disk.fdatasync_p50_us,
            disk.fdatasync_p99_us
        );
        if disk.fs_type == "tmpfs" || disk.fs_type == "ramfs" {
            eprintln!(
                "WARNING: the store root is on {}: fsync costs nothing there, so the \
                 JetStream numbers say nothing about a disk (use --store-root)",
                disk.fs_type
            );
        }
    }
    json_lines.write(&json!({
        "type": "machine",
        "nproc": machine.nproc,
        "cpu_model": machine.cpu_model,
        "kernel": machine.kernel,
        "mem_total_kib": machine.mem_total_kib,
        "store_disk": store_disk.as_ref().map(|disk| json!({
            "root": disk.root,
            "mount_point": disk.mount_point,
            "device": disk.device,
            "fs_type": disk.fs_type,
            "fdatasync_64b_p50_us": disk.fdatasync_p50_us,
            "fdatasync_64b_p99_us": disk.fdatasync_p99_us,
        })),
        "server_versions": versions.iter().map(|(label, version)| (label.clone(), json!(version))).collect::<serde_json::Map<_, _>>(),
        "client_versions": client_versions.iter().map(|(label, version)| (label.clone(), json!(version))).collect::<serde_json::Map<_, _>>(),
        "perch_is_nats": cli.perch_is_nats,
        "started_unix_s": started_unix_s,
        "args": std::env::args().skip(1).collect::<Vec<_>>(),
    }))?;

    if scenarios.iter().any(|scenario| scenario.needs_device_udp()) {
        let (table, json_line) = devices::wire_bytes_table()?;
        println!("{table}");
        json_lines.write(&json_line)?;
    }

    let mut records = Vec::new();
    let mut all_ok = true;
    for &scenario in &scenarios {
        let description = scenario.description(&params);
        eprintln!("== {}: {description}", scenario.name());
        for round in 1..=cli.rounds {
            // Alternate which server goes first so drift favours neither.
            let mut order: Vec<&ServerSpec> = servers.iter().collect();
            if round % 2 == 0 {
                order.reverse();
            }
            for spec in order {
                if scenario.perch_only() && spec.label != PERCH {
                    continue;
                }
                let log_path = log_dir.join(format!(
                    "{}-{}-round{round}.log",
                    spec.label,
                    scenario.name()
                ));
                let store_dir = match &stores_dir {
                    Some(stores_dir) if scenario.needs_store() => {
                        let store_dir = stores_dir.join(format!(
                            "{}-{}-round{round}",
                            spec.label,
                            scenario.name()
                        ));
                        fresh_dir(&store_dir)?;
                        Some(store_dir)
                    }
                    _ => None,
                };
                let outcome = run_once(spec, scenario, &params, &log_path, store_dir.as_deref())
                    .map_err(|error| format!("{error:#}"));
                // run_once has stopped the server: its store can go.
                if let Some(store_dir) = store_dir.filter(|_| !cli.keep_stores) {
                    if let Err(error) = std::fs::remove_dir_all(&store_dir) {
                        eprintln!("warning: removing {}: {error}", store_dir.display());
                    }
                }
                match &outcome {
                    Ok(measurement) => {
                        let shown: Vec<String> = measurement
                            .iter()
                            .map(|(key, value)| format!("{key}={value:.3}"))
                            .collect();
                        eprintln!("   round {round} {:<11} {}", spec.label, shown.join(" "));
                    }
                    Err(error) => {
                        all_ok = false;
                        eprintln!("   round {round} {:<11} FAILED: {error}", spec.label);
                    }
                }
                let record = RunRecord {
                    scenario,
                    server: spec.label,
                    round,
                    outcome,
                };
                json_lines.write(&record.to_json())?;
                records.push(record);
            }
        }
        let summaries = report::summarize(&records, scenario);
        println!(
            "{}",
            report::scenario_table(scenario, &description, &summaries)
        );
        for summary in &summaries {
            json_lines.write(&summary.to_json(scenario))?;
        }
    }
    println!("Cells: median (min–max) over rounds; ratio = perch median / nats-server median.");
    if let Some(stores_dir) = stores_dir.filter(|_| !cli.keep_stores) {
        let _ = std::fs::remove_dir(stores_dir);
    }
    Ok(all_ok)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("some runs failed (see FAILED above)");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("perch-loadgen: {error:#}");
            ExitCode::FAILURE
        }
    }
}
