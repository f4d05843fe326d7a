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
mod moves;
mod ratelimit;
mod shard;
mod systemd;
mod tls;

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use io::Selected;
use mailbox::Control;

pub use device::serial_raw_mode;
pub use shard::StallHook;
use shard::{Shard, Shared};

/// What the process around the broker provides: how to reload its config, and
/// test hooks.
pub struct Service {
    /// Reads the config again (SIGHUP): the file with the command line's
    /// flags over it, validated (log level included). Err: keep the old one.
    pub reload: Box<dyn FnMut() -> anyhow::Result<Config>>,
    /// Puts a reloaded config's log level in force (after `reload` accepted it).
    pub set_log_level: Box<dyn FnMut(&Config)>,
    /// Test-only: stall a shard (`--debug-stall-shard`).
    pub stall: Option<StallHook>,
    /// Test-only: force connection moves (`--debug-move-every`).
    pub debug_move_every: u32,
}

/// How long a reload waits for every shard to apply new limits before it
/// reports READY anyway (a shard that slow is the watchdog's business).
const RELOAD_APPLY_MS_MAX: u64 = 5_000;
/// The watchdog's heartbeat freshness never goes below this many housekeeping
/// ticks, so a short WatchdogSec does not flap on scheduling noise.
const HEARTBEAT_TICKS_MIN: u64 = 3;

/// Runs the broker until SIGINT or SIGTERM (then drains clients and returns Ok),
/// or until a shard fails (returns the error).
///
/// Under systemd (Type=notify) it reports READY=1 once every shard has started
/// (listeners bound, store recovered), pings the watchdog while every shard
/// keeps ticking, reloads the config on SIGHUP (RELOADING=1 … READY=1) and
/// says STOPPING=1 when it drains.
pub fn run(config: Config, mut service: Service) -> anyhow::Result<()> {
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

    if !local.ip().is_loopback() && config.auth().ok().flatten().is_none() {
        // nats-server's default too; an operator should know it is the case.
        tracing::warn!(
            "no [authorization]: any client that reaches {local} may publish and subscribe \
             to everything (configure a token, users or nkeys; README, \"Authentication and \
             permissions\")"
        );
    }
    if config.spin_us > 0 && backend == Selected::Uring {
        tracing::warn!(
            "spin_us is ignored on io_uring (tokio-uring submits only when a shard sleeps)"
        );
    }

    // Signals first, so one arriving during startup is not fatal by default.
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut terminate, mut interrupt, mut hangup) = signals.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        anyhow::Ok((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
        ))
    })?;
    systemd::status(&format!("starting {shard_count} shards"));

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
    let mut running = config.clone();
    let tls = crate::tls::TlsSettings::load(&config.tls)?;
    if let Some(tls) = &tls {
        tracing::info!(
            verify = tls.verify,
            map = tls.map,
            handshake_first = tls.handshake_first,
            "TLS required for client connections"
        );
    }
    let mut shared = Shared::new(config, shard_count, peers, service.stall, tls);
    shared.debug_move_every = service.debug_move_every;
    let shared = Arc::new(shared);
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

    let serving = format!(
        "serving NATS on {local} ({} shards, {})",
        shard_count,
        match backend {
            Selected::Uring => "io_uring",
            Selected::Epoll => "epoll",
        }
    );
    let watchdog = systemd::watchdog_timeout();
    // Ping at half the timeout (sd_watchdog_enabled(3)); a shard counts as
    // alive if it ticked within that half, so one missed ping is the most a
    // healthy shard can cost, and a stuck one stops the next ping.
    let ping_every = watchdog.map(|timeout| timeout / 2);
    let fresh_ms = ping_every.map_or(0, |every| {
        (every.as_millis() as u64).max(HEARTBEAT_TICKS_MIN * shard::HOUSEKEEPING_TICK_MS)
    });
    let outcome = signals.block_on(async {
        let mut ready = false;
        let mut ping = tokio::time::interval(ping_every.unwrap_or(Duration::from_secs(3600)));
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stale_reported: Vec<usize> = Vec::new();
        loop {
            tokio::select! {
                _ = terminate.recv() => {
                    tracing::info!("SIGTERM: draining clients");
                    systemd::stopping();
                    return Ok(());
                }
                _ = interrupt.recv() => {
                    tracing::info!("SIGINT: draining clients");
                    systemd::stopping();
                    return Ok(());
                }
                exited = exited_rx.recv() => return match exited {
                    Some((id, Err(e))) => Err(anyhow::anyhow!("shard {id} failed: {e}")),
                    Some((id, Ok(()))) => Err(anyhow::anyhow!("shard {id} stopped unexpectedly")),
                    None => Err(anyhow::anyhow!("all shards stopped")),
                },
                () = shared.serving_changed.notified(), if !ready => {
                    if shared.shards_serving.load(Ordering::Acquire) == shard_count {
                        ready = true;
                        tracing::debug!("every shard started: ready");
                        systemd::ready(&serving);
                    }
                }
                // A SIGHUP during start-up waits (tokio keeps it) until READY.
                _ = hangup.recv(), if ready => {
                    systemd::reloading();
                    let status = reload(&shared, &mut running, &mut service).await;
                    systemd::ready(&format!("{serving}; {status}"));
                }
                _ = ping.tick(), if ready && ping_every.is_some() => {
                    let beats: Vec<u64> = shared
                        .heartbeat_ms
                        .iter()
                        .map(|beat| beat.load(Ordering::Acquire))
                        .collect();
                    let stale = systemd::stale_shards(&beats, shared.clock_ms(), fresh_ms);
                    if stale.is_empty() {
                        systemd::watchdog();
                    } else if stale != stale_reported {
                        tracing::error!(
                            "shard(s) {stale:?} have not run for over {fresh_ms} ms: \
                             withholding the watchdog ping"
                        );
                    }
                    stale_reported = stale;
                }
            }
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

/// One SIGHUP: reads the config again and, if it is valid and changes nothing
/// that is fixed while running, puts its limits and log level in force on
/// every shard (live connections included). All or nothing: on any error the
/// running config stays whole. Returns a line for systemd's STATUS.
async fn reload(shared: &Shared, running: &mut Config, service: &mut Service) -> String {
    let new = match (service.reload)() {
        Ok(new) => new,
        Err(e) => {
            tracing::error!("reload failed, keeping the running config: {e}");
            return "last reload failed (see the log)".into();
        }
    };
    let fixed = running.fixed_keys_changed(&new);
    if !fixed.is_empty() {
        for key in &fixed {
            tracing::error!(
                key,
                "reload refused: {key} cannot change while perch runs (restart to \
                 change it); keeping the running config"
            );
        }
        return format!("last reload refused: {} need a restart", fixed.join(", "));
    }
    // Files are read again (a rotated certificate); any error refuses the
    // whole reload, before anything else changed.
    let tls = match crate::tls::TlsSettings::load(&new.tls) {
        Ok(tls) => tls,
        Err(e) => {
            tracing::error!("reload refused: {e}; keeping the running config");
            return "last reload refused: tls (see the log)".into();
        }
    };
    // A changed [authorization] is compiled once here (validate() accepted
    // it) and every shard checks its live connections against it.
    let auth = (new.authorization != running.authorization).then(|| {
        let auth = new.auth().ok().flatten().map(std::sync::Arc::new);
        for user in auth.iter().flat_map(|a| a.plain_text_users()) {
            tracing::warn!(
                user,
                "authorization: plain-text password in the config; a bcrypt hash is safer"
            );
        }
        auth
    });
    if let Some(auth) = &auth {
        shared
            .auth_required
            .store(auth.is_some(), Ordering::Relaxed);
    }
    (service.set_log_level)(&new);
    if let Some(tls) = &tls {
        tracing::info!(
            verify = tls.verify,
            handshake_first = tls.handshake_first,
            timeout_ms = tls.timeout_ms,
            "tls: certificate files read again; new handshakes use them"
        );
    }
    if let Ok(mut slot) = shared.tls.write() {
        *slot = tls.map(Arc::new);
    }
    let limits = new.limits();
    shared
        .connections_max
        .store(limits.max_connections, Ordering::Relaxed);
    let (applied_tx, mut applied_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut asked = 0;
    for control in &shared.peers.control {
        let reload = Control::Reload {
            limits,
            auth: auth.clone(),
            applied: applied_tx.clone(),
        };
        if control.send(reload).is_ok() {
            asked += 1;
        }
    }
    drop(applied_tx);
    let all_applied = tokio::time::timeout(Duration::from_millis(RELOAD_APPLY_MS_MAX), async {
        for _ in 0..asked {
            if applied_rx.recv().await.is_none() {
                break;
            }
        }
    })
    .await;
    if all_applied.is_err() {
        tracing::warn!(
            "reload: not every shard applied the new limits within {RELOAD_APPLY_MS_MAX} ms"
        );
    }
    let old = running.limits();
    let mut changes = describe_changes(
        &old,
        &limits,
        running.log_level.as_deref(),
        new.log_level.as_deref(),
    );
    if auth.is_some() {
        changes = if changes == "nothing changed" {
            "authorization".into()
        } else {
            format!("{changes}, authorization")
        };
    }
    tracing::info!("config reloaded: {changes}");
    *running = new;
    "config reloaded".into()
}

/// "max_payload 1048576 -> 2048, log_level info -> debug", or "nothing changed".
fn describe_changes(
    old: &crate::config::Limits,
    new: &crate::config::Limits,
    old_level: Option<&str>,
    new_level: Option<&str>,
) -> String {
    let mut changes = Vec::new();
    macro_rules! compare {
        ($($field:ident),*) => {$(
            if old.$field != new.$field {
                changes.push(format!("{} {} -> {}", stringify!($field), old.$field, new.$field));
            }
        )*};
    }
    compare!(
        max_payload,
        max_pending,
        max_control_line,
        max_connections,
        connection_rate_per_ip,
        max_subscriptions,
        connect_timeout_ms,
        ping_interval_ms,
        ping_max_outstanding
    );
    if old_level != new_level {
        changes.push(format!(
            "log_level {} -> {}",
            old_level.unwrap_or("info"),
            new_level.unwrap_or("info")
        ));
    }
    if changes.is_empty() {
        "nothing changed".into()
    } else {
        changes.join(", ")
    }
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
    // One table for every shard: a keyed device's replay window is one,
    // whichever shard or transport its frames reach.
    let credentials = Arc::new(device.credentials()?);
    if credentials.enabled() {
        tracing::info!(
            require_key = device.require_key,
            "devices: {} keyed (docs/device-protocol.md section 9)",
            device.clients.len()
        );
    }
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
                credentials: Arc::clone(&credentials),
            })
        })
        .collect())
}
