//! JetStream's clock on machines whose wall clock cannot be trusted: a gateway
//! without an RTC boots in 1970 and jumps forward when NTP syncs (or back, when
//! NTP corrects a clock that ran fast). Sans IO: the caller reads the wall and
//! monotonic clocks and passes both in.
//!
//! The time it gives (`now_ns`, wall-clock nanoseconds, what messages are
//! stamped with and timers are set against):
//! - never goes backwards, and advances at least as fast as the monotonic
//!   clock: a backward jump of the wall clock is ignored (time goes on from
//!   where it was), so stored messages are never mis-ordered in time;
//! - starts no earlier than a floor (the newest timestamp in the store), so a
//!   boot in 1970 does not stamp new messages decades before the old ones;
//! - follows the wall clock forward; a step forward of more than
//!   [`JUMP_TOLERANCE_NS`] beyond what the monotonic clock elapsed is reported
//!   as a jump, so the caller can move what was measured against the old,
//!   wrong time by the same amount: messages stamped since the clock was last
//!   trusted (they must not mass-expire under max_age), and armed timers
//!   (ack_wait, pull expiries, heartbeats must keep their monotonic length).

/// Forward steps of the wall clock up to this beyond the monotonic clock are
/// drift (followed silently); beyond it they are jumps.
pub const JUMP_TOLERANCE_NS: i64 = 1_000_000_000;

/// A wall clock before this (2024-01-01 UTC) cannot be right: it is unset.
pub const PLAUSIBLE_AFTER_NS: i64 = 1_704_067_200 * 1_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsClock {
    now_ns: i64,
    mono_ns: i64,
}

/// One reading: the time, and how far it jumped forward since the last one
/// beyond the monotonic clock (0: no jump).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    pub now_ns: i64,
    pub jumped_ns: i64,
    /// The time is the wall clock's and the wall clock looks set: what is
    /// stamped now needs no correction by a later jump.
    pub trusted: bool,
}

impl JsClock {
    /// Starts at the wall clock, or at `floor_ns` if the wall clock is behind it.
    pub fn new(wall_ns: i64, mono_ns: i64, floor_ns: i64) -> JsClock {
        JsClock {
            now_ns: wall_ns.max(floor_ns),
            mono_ns,
        }
    }

    pub fn read(&mut self, wall_ns: i64, mono_ns: i64) -> Reading {
        let elapsed = mono_ns.saturating_sub(self.mono_ns).max(0);
        self.mono_ns = self.mono_ns.max(mono_ns);
        let expected = self.now_ns.saturating_add(elapsed);
        let jumped_ns = if wall_ns > expected.saturating_add(JUMP_TOLERANCE_NS) {
            wall_ns - expected
        } else {
            0
        };
        self.now_ns = expected.max(wall_ns);
        Reading {
            now_ns: self.now_ns,
            jumped_ns,
            trusted: wall_ns >= PLAUSIBLE_AFTER_NS && wall_ns == self.now_ns,
        }
    }

    pub fn now_ns(&self) -> i64 {
        self.now_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;
    const YEAR_2026: i64 = 1_796_000_000 * S;

    #[test]
    fn a_boot_in_1970_goes_on_from_the_store_then_follows_ntp() {
        // The store's newest message is from before the power cut.
        let before = YEAR_2026;
        let mut clock = JsClock::new(5 * S, 0, before);
        assert_eq!(clock.now_ns(), before);
        let r = clock.read(7 * S, 2 * S);
        assert_eq!(
            r,
            Reading {
                now_ns: before + 2 * S,
                jumped_ns: 0,
                trusted: false
            }
        );
        // NTP syncs: the wall clock says an hour after `before` + 3 s.
        let synced = before + 3600 * S;
        let r = clock.read(synced, 3 * S);
        assert_eq!(r.now_ns, synced);
        assert_eq!(r.jumped_ns, synced - (before + 3 * S));
        assert!(r.trusted);
        assert_eq!(clock.read(synced + S, 4 * S).jumped_ns, 0);
    }

    #[test]
    fn backward_jumps_never_move_time_back() {
        let mut clock = JsClock::new(YEAR_2026, 0, 0);
        let r = clock.read(YEAR_2026 - 300 * S, S);
        assert_eq!(
            r,
            Reading {
                now_ns: YEAR_2026 + S,
                jumped_ns: 0,
                trusted: false
            }
        );
        // Time keeps going at the monotonic rate until the wall clock catches up.
        assert_eq!(
            clock.read(YEAR_2026 - 299 * S, 2 * S).now_ns,
            YEAR_2026 + 2 * S
        );
    }

    #[test]
    fn drift_is_followed_without_a_jump() {
        let mut clock = JsClock::new(YEAR_2026, 0, 0);
        let r = clock.read(YEAR_2026 + S + S / 2, S);
        assert_eq!(
            r,
            Reading {
                now_ns: YEAR_2026 + S + S / 2,
                jumped_ns: 0,
                trusted: true
            }
        );
        // A monotonic clock that seems to go back (never does) changes nothing.
        let r = clock.read(YEAR_2026 + S + S / 2, 0);
        assert_eq!(r.now_ns, YEAR_2026 + S + S / 2);
    }
}
