//! One retry policy for the whole tree: exponential, capped, jittered.
//!
//! The MQTT link's reconnects, a download's resumes and the platform's
//! retries all wait with a [`Backoff`]. Jitter matters for a fleet: after a
//! broker restart, ten thousand devices that all wait exactly 0.5 s, 1 s,
//! 2 s ... reconnect in lock-step and knock it over again. Each wait is
//! drawn uniformly from the upper half of the current step ("equal
//! jitter"), so a wait is never shorter than half the step and the herd
//! spreads out.
//!
//! Sans-IO like the rest of the core: it reads no clock and no entropy. The
//! caller seeds it (a device's identity, the process id, the time: anything
//! that differs between devices) and sleeps for what [`Backoff::next_delay`]
//! returns.

use std::time::Duration;

/// An exponential backoff with a cap and jitter.
///
/// ```
/// use std::time::Duration;
/// use iot_ota_core::Backoff;
///
/// let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30)).seeded(7);
/// let first = b.next_delay();
/// assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(500));
/// for _ in 0..20 {
///     assert!(b.next_delay() <= Duration::from_secs(30));
/// }
/// b.reset(); // after a success
/// assert!(b.next_delay() <= Duration::from_millis(500));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// The current step (before jitter).
    step: Duration,
    /// Attempts since the last reset.
    attempts: u32,
    jitter: bool,
    /// xorshift64 state; never zero.
    rng: u64,
}

impl Backoff {
    /// Waits starting at `initial`, doubling up to `max`, jittered.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            step: initial,
            attempts: 0,
            jitter: true,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// Seeds the jitter, so that devices do not all draw the same waits.
    pub fn seeded(mut self, seed: u64) -> Backoff {
        // splitmix64 of the seed: nearby seeds give unrelated sequences.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        self.rng = if z == 0 { 1 } else { z };
        self
    }

    /// Without jitter: exactly `initial`, `2 × initial`, ... up to `max`
    /// (for tests, and for a single process where no herd can form).
    pub fn without_jitter(mut self) -> Backoff {
        self.jitter = false;
        self
    }

    /// The wait before the next attempt; the step then doubles, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        self.attempts = self.attempts.saturating_add(1);
        if !self.jitter {
            return step;
        }
        // Equal jitter: half the step, plus up to another half.
        let half = step / 2;
        let nanos = u64::try_from((step - half).as_nanos()).unwrap_or(u64::MAX);
        let extra = if nanos == 0 {
            0
        } else {
            self.next_random() % (nanos + 1)
        };
        half + Duration::from_nanos(extra)
    }

    /// Attempts since the last reset (how many waits were handed out).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Back to the initial step, after a success.
    pub fn reset(&mut self) {
        self.step = self.initial;
        self.attempts = 0;
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_to_the_cap_without_jitter() {
        let mut b = Backoff::new(500 * MS, 4000 * MS).without_jitter();
        let waits: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        assert_eq!(
            waits,
            [
                500 * MS,
                1000 * MS,
                2000 * MS,
                4000 * MS,
                4000 * MS,
                4000 * MS
            ]
        );
        assert_eq!(b.attempts(), 6);
        b.reset();
        assert_eq!(b.next_delay(), 500 * MS);
        assert_eq!(b.attempts(), 1);
    }

    #[test]
    fn jitter_stays_in_the_upper_half_and_varies() {
        let mut b = Backoff::new(1000 * MS, 1000 * MS).seeded(42);
        let waits: Vec<_> = (0..100).map(|_| b.next_delay()).collect();
        assert!(waits.iter().all(|w| *w >= 500 * MS && *w <= 1000 * MS));
        let distinct: std::collections::BTreeSet<_> = waits.iter().collect();
        assert!(distinct.len() > 90, "{} distinct waits", distinct.len());
    }

    #[test]
    fn seeds_spread_devices() {
        let first = |seed| Backoff::new(1000 * MS, 1000 * MS).seeded(seed).next_delay();
        let draws: std::collections::BTreeSet<_> = (0..50u64).map(first).collect();
        assert!(draws.len() > 45);
    }

    #[test]
    fn zero_initial_is_no_wait() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO).seeded(1);
        assert_eq!(b.next_delay(), Duration::ZERO);
    }
}
