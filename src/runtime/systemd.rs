//! systemd's service notification protocol (sd_notify(3)), through the
//! `sd-notify` crate: READY, STATUS, EXTEND_TIMEOUT_USEC, WATCHDOG, RELOADING
//! (with MONOTONIC_USEC) and STOPPING. Every call is a no-op when
//! `NOTIFY_SOCKET` is unset, so perch run by hand or under another supervisor
//! behaves the same.
//!
//! The watchdog rule lives here too, as a pure function of the shards'
//! heartbeats ([`stale_shards`]): a ping certifies that every shard's loop ran
//! recently, so one stuck shard stops the pings and systemd restarts the broker.
//!
//! Deliberately does not: decide when the broker is ready (runtime/mod.rs does)
//! or keep a socket open (a notification is rare; the crate connects per call).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

/// How long each recovery progress report lets start-up run on: systemd's
/// start timeout is pushed back by this much from every report, so a big store
/// may take as long as it needs while it keeps moving, and a stuck one fails.
pub(crate) const RECOVERY_EXTEND_USEC: u32 = 30_000_000;

/// Set after the first failed send, so a broken socket is logged once.
static SEND_FAILED: AtomicBool = AtomicBool::new(false);

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        if !SEND_FAILED.swap(true, Ordering::Relaxed) {
            tracing::warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
        }
    }
}

/// Start-up is complete: every listener is bound and the store is recovered.
pub(crate) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// What the broker is doing, for `systemctl status`.
pub(crate) fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// A start-up progress report that also pushes the start timeout back.
pub(crate) fn starting(status: &str) {
    send(&[
        NotifyState::Status(status),
        NotifyState::ExtendTimeoutUsec(RECOVERY_EXTEND_USEC),
    ]);
}

/// A reload begins; [`ready`] ends it. systemd 253+ (Type=notify-reload) needs
/// the CLOCK_MONOTONIC timestamp with it to match the reload to its request.
pub(crate) fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading the config"),
        ]),
        // The clock cannot fail on Linux; if it did, a bare RELOADING=1 is
        // still right for systemd before 253.
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Shutdown has begun (clients are being drained).
pub(crate) fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("draining clients"),
    ]);
}

/// Every shard is alive: reset the watchdog timer.
pub(crate) fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// The watchdog timeout systemd set for this process (`WATCHDOG_USEC`, when
/// `WATCHDOG_PID` is unset or ours), if any.
pub(crate) fn watchdog_timeout() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|t| !t.is_zero())
}

/// The shards whose last heartbeat (ms on a shared monotonic clock) is older
/// than `fresh_ms` at `now_ms`. A heartbeat from the future (cannot happen on a
/// monotonic clock read in order) counts as fresh.
pub(crate) fn stale_shards(heartbeats_ms: &[u64], now_ms: u64, fresh_ms: u64) -> Vec<usize> {
    heartbeats_ms
        .iter()
        .enumerate()
        .filter(|(_, &beat)| now_ms.saturating_sub(beat) > fresh_ms)
        .map(|(shard, _)| shard)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::stale_shards;

    #[test]
    fn a_shard_is_stale_only_past_the_freshness_bound() {
        let check = |beats: &[u64], now: u64, fresh: u64, expected: &[usize]| {
            assert_eq!(
                stale_shards(beats, now, fresh),
                expected,
                "{beats:?} at {now}"
            );
        };
        check(&[1000, 1000], 1500, 500, &[]);
        check(&[1000, 999], 1500, 500, &[1]);
        check(&[0, 1400, 200], 1500, 500, &[0, 2]);
        check(&[2000], 1500, 500, &[]);
        check(&[], 1500, 500, &[]);
    }
}
