//! Hybrid logical clock: wall time that never runs backwards and orders causally related
//! events even when device clocks disagree.

use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

const COUNTER_BITS: u32 = 16;
const COUNTER_MAX: u64 = (1 << COUNTER_BITS) - 1;

/// A hybrid logical clock timestamp: 48 bits of Unix milliseconds, then a 16-bit counter
/// that orders events within one millisecond. Ties between devices are broken by the
/// device id, by whoever compares (see `merge`).
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Hlc(u64);

impl Hlc {
    /// Builds a timestamp from its parts; the counter is clamped to 16 bits.
    pub fn new(wall_ms: u64, counter: u64) -> Hlc {
        Hlc((wall_ms << COUNTER_BITS) | counter.min(COUNTER_MAX))
    }

    /// The packed representation, as stored in the log.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// Reads the packed representation back.
    pub fn from_u64(raw: u64) -> Hlc {
        Hlc(raw)
    }

    /// Milliseconds since the Unix epoch.
    pub fn wall_ms(self) -> u64 {
        self.0 >> COUNTER_BITS
    }

    /// The logical counter within `wall_ms`.
    pub fn counter(self) -> u64 {
        self.0 & COUNTER_MAX
    }

    /// The smallest timestamp strictly after `self`.
    fn tick(self) -> Hlc {
        if self.counter() == COUNTER_MAX {
            Hlc::new(self.wall_ms() + 1, 0)
        } else {
            Hlc(self.0 + 1)
        }
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:05}", self.wall_ms(), self.counter())
    }
}

/// Where a clock reads the wall time, in milliseconds since the Unix epoch: the system
/// clock, or a simulated one (tests, the simulator), so that time is an input.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The clock of one device. Cheap to share behind an `Arc`.
pub struct HlcClock {
    last: Mutex<Hlc>,
    wall: RwLock<WallClock>,
}

impl fmt::Debug for HlcClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HlcClock")
            .field("last", &self.last())
            .finish_non_exhaustive()
    }
}

impl Default for HlcClock {
    fn default() -> Self {
        HlcClock::new(Hlc::default())
    }
}

impl HlcClock {
    /// A clock that will never hand out a timestamp at or below `floor` (the last one
    /// this device persisted, so a restart with a wall clock set back stays monotonic).
    pub fn new(floor: Hlc) -> HlcClock {
        HlcClock {
            last: Mutex::new(floor),
            wall: RwLock::new(Arc::new(wall_clock_ms)),
        }
    }

    /// Reads the wall time from `wall` from now on (a simulated clock, say).
    pub fn set_wall_clock(&self, wall: WallClock) {
        *self
            .wall
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = wall;
    }

    /// The wall time this clock reads, in milliseconds.
    pub fn wall_ms(&self) -> u64 {
        let wall = self
            .wall
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        wall()
    }

    /// A fresh timestamp, strictly greater than every one this clock has handed out or observed.
    pub fn now(&self) -> Hlc {
        self.advance(Hlc::new(self.wall_ms(), 0))
    }

    /// The latest timestamp a leader with this clock accepts from a pushed change now.
    pub(crate) fn drift_limit(&self) -> Hlc {
        Hlc::new(self.wall_ms().saturating_add(DRIFT_MAX_MS), 0)
    }

    /// Takes a timestamp seen from another device into account, so that anything this
    /// device does afterwards orders after it.
    pub fn observe(&self, remote: Hlc) {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if remote > *last {
            *last = remote;
        }
    }

    /// The latest timestamp handed out or observed: persisted as the floor of the clock's
    /// next start.
    pub(crate) fn last(&self) -> Hlc {
        *self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn advance(&self, candidate: Hlc) -> Hlc {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let next = if candidate > *last {
            candidate
        } else {
            last.tick()
        };
        *last = next;
        next
    }
}

/// How far ahead of the leader's wall clock a pushed timestamp may be (clocks of devices
/// drift; beyond this a device's clock is wrong, not early).
pub(crate) const DRIFT_MAX_MS: u64 = 5 * 60 * 1_000;

fn wall_clock_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_runs_backwards() {
        let far_future = Hlc::new(wall_clock_ms() + 60_000, 7);
        let clock = HlcClock::new(far_future);
        let a = clock.now();
        let b = clock.now();
        assert!(a > far_future);
        assert!(b > a);
        assert_eq!(a.wall_ms(), far_future.wall_ms());
    }

    #[test]
    fn counter_overflow_moves_to_next_millisecond() {
        let t = Hlc::new(10, COUNTER_MAX);
        assert_eq!(t.tick(), Hlc::new(11, 0));
    }

    #[test]
    fn observe_orders_later_events_after_remote() {
        let clock = HlcClock::default();
        let remote = Hlc::new(wall_clock_ms() + 3_600_000, 3);
        clock.observe(remote);
        assert!(clock.now() > remote);
    }
}
