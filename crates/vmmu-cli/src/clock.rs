//! Wall-clock durations as the reports' `u64` nanoseconds.

use std::time::{Duration, Instant};

/// `d` in nanoseconds; past `u64::MAX` (584 years) it saturates.
pub fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Nanoseconds since `t` (saturating, as [`ns`]).
pub fn elapsed_ns(t: Instant) -> u64 {
    ns(t.elapsed())
}
