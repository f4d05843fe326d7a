//! The shell around the sans-IO core: threads, pinning, runtimes, sockets,
//! mailboxes and timers. Only this module knows about tokio, io_uring or epoll.

pub mod affinity;
mod connection;
mod device;
#[cfg(feature = "http")]
mod http;
mod internal;
pub mod io;
mod jetstream;
mod mailbox;
mod shard;

use std::rc::Rc;
use std::sync::Arc;

use anyhow::Context;

use crate::config::Config;
use io::Selected;
use mailbox::Control;

pub use device::serial_raw_mode;
use shard::{Shard, Shared};

/// Runs the broker until SIGINT or SIGTERM (then drains clients and returns Ok),
/// or until a shard fails (returns the error).
pub fn run(config: Config) -> anyhow::Result<()> {
    let (backend, why) = io::select(config.io).map_err(anyhow::Error::msg)?;
    let shard_count = config.shard_count();
    let cpus = affinity::allowed_cpus();
    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let local = listener.local_addr()?;
    tracing::info!(
        io = ?backend,
        shards = shard_count,
        "perch {} listening on {local} ({why})",
        env!("CARGO_PKG_VERSION")
    );

    if config.spin_us > 0 && backend == Selected::Uring {
        tracing::warn!(
            "spin_us is ignored on io_uring (tokio-uring submits only when a shard sleeps)"
        );
    }

    // Signals first, so one arriving during startup is not fatal by default.
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut terminate, mut interrupt) = signals.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        anyhow::Ok((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;

    let mut devices = device_sockets(&config, shard_count)?;
    // Bound now, so a bad or taken monitoring address fails the start.
    let http_listener = match config.http {
        #[cfg(not(feature = "http"))]
        Some(_) => {
            anyhow::bail!("--http: this perch was built without monitoring (cargo feature `http`)")
        }
        #[cfg(feature = "http")]
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen for monitoring on {addr}"))?;
            tracing::info!("monitoring on http://{}", listener.local_addr()?);
            Some(listener)
        }
        None => None,
    };

    let (peers, inboxes) = mailbox::mailboxes(shard_count);
    let shared = Arc::new(Shared::new(config, shard_count, peers));
    #[cfg(feature = "http")]
    if let Some(listener) = http_listener {
        http::spawn(listener, Arc::clone(&shared)).context("cannot start monitoring")?;
    }
    #[cfg(not(feature = "http"))]
    let _: Option<std::net::TcpListener> = http_listener;
    let (exited_tx, mut exited_rx) =
        tokio::sync::mpsc::unbounded_channel::<(usize, Result<(), String>)>();
    let mut listener = Some(listener);
    let mut threads = Vec::new();
    for (id, inbox) in inboxes.into_iter().enumerate() {
        let shared = Arc::clone(&shared);
        let listener = if id == 0 { listener.take() } else { None };
        let devices = devices[id].take();
        let cpu = cpus.get(id % cpus.len().max(1)).copied();
        let exited = exited_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("perch-shard-{id}"))
            .spawn(move || {
                // Pin first, then build the runtime inside the pinned thread.
                if let Some(cpu) = cpu {
                    if let Err(e) = affinity::pin_current_thread(cpu) {
                        tracing::warn!(shard = id, cpu, "cannot pin shard: {e}");
                    }
                }
                let result = run_shard_thread(backend, id, shared, inbox, listener, devices);
                let _ = exited.send((id, result.map_err(|e| format!("{e:#}"))));
            })?;
        threads.push(thread);
    }
    drop(exited_tx);

    let outcome = signals.block_on(async {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!("SIGTERM: draining clients"); Ok(()) }
            _ = interrupt.recv() => { tracing::info!("SIGINT: draining clients"); Ok(()) }
            exited = exited_rx.recv() => match exited {
                Some((id, Err(e))) => Err(anyhow::anyhow!("shard {id} failed: {e}")),
                Some((id, Ok(()))) => Err(anyhow::anyhow!("shard {id} stopped unexpectedly")),
                None => Err(anyhow::anyhow!("all shards stopped")),
            },
        }
    });
    for control in &shared.peers.control {
        let _ = control.send(Control::Shutdown);
    }
    for thread in threads {
        if thread.join().is_err() {
            return Err(anyhow::anyhow!("a shard thread panicked"));
        }
    }
    tracing::info!("stopped");
    outcome
}

fn run_shard_thread(
    backend: Selected,
    id: usize,
    shared: Arc<Shared>,
    inbox: mailbox::Inbox,
    listener: Option<std::net::TcpListener>,
    devices: Option<device::DeviceSockets>,
) -> std::io::Result<()> {
    let shard = Rc::new(Shard::new(id, shared));
    match backend {
        #[cfg(feature = "uring")]
        Selected::Uring => io::uring::run(shard::run_shard::<io::uring::Uring>(
            shard, inbox, listener, devices,
        )),
        #[cfg(not(feature = "uring"))]
        Selected::Uring => Err(std::io::Error::other("built without io_uring support")),
        Selected::Epoll => io::epoll::run(shard::run_shard::<io::epoll::Epoll>(
            shard, inbox, listener, devices,
        )),
    }
}

/// Each shard's device sockets and lines (None when devices are off), bound
/// before any shard starts so a bad address or line fails the start.
fn device_sockets(
    config: &Config,
    shards: usize,
) -> anyhow::Result<Vec<Option<device::DeviceSockets>>> {
    let device = &config.device;
    if device.udp.is_none() && device.tcp.is_none() && device.serial.is_empty() {
        return Ok((0..shards).map(|_| None).collect());
    }
    let predefined = Arc::new(device.predefined_table()?);
    let mut udp: Vec<Option<std::net::UdpSocket>> = match device.udp {
        Some(addr) => {
            let sockets = device::bind_udp(addr, shards)
                .with_context(|| format!("cannot bind the device UDP port {addr}"))?;
            tracing::info!("devices: UDP on {addr}");
            sockets.into_iter().map(Some).collect()
        }
        None => (0..shards).map(|_| None).collect(),
    };
    let mut tcp: Vec<Option<std::net::TcpListener>> = match device.tcp {
        Some(addr) => {
            let listeners = device::bind_tcp(addr, shards)
                .with_context(|| format!("cannot listen for devices on TCP {addr}"))?;
            tracing::info!("devices: TCP on {addr}");
            listeners.into_iter().map(Some).collect()
        }
        None => (0..shards).map(|_| None).collect(),
    };
    Ok((0..shards)
        .map(|id| {
            Some(device::DeviceSockets {
                udp: udp[id].take(),
                tcp: tcp[id].take(),
                // Serial lines round-robin over the shards.
                serial: device
                    .serial
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % shards == id)
                    .map(|(_, line)| (line.path.clone(), line.baud))
                    .collect(),
                predefined: Arc::clone(&predefined),
            })
        })
        .collect())
}
