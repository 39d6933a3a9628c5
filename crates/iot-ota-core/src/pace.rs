//! A download's rules of time, without a clock: the overall deadline, the
//! minimum rate over each window, and the bounded, backed-off resumes of a
//! broken transfer.
//!
//! The driver (the device SDK's HTTP source) tells [`Pace`] what happened
//! and when (`now` is always an argument), and sleeps until
//! [`Pace::next_deadline`] at the latest; every rule is therefore tested
//! here in milliseconds of simulated time.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use iot_ota_core::{Backoff, Pace, PaceRules};
//!
//! let rules = PaceRules { retries: 3, min_rate: 1024, rate_window: Duration::from_secs(60),
//!                         deadline_base: Duration::from_secs(300) };
//! let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(32)).without_jitter();
//! let t0 = Instant::now();
//! let mut pace = Pace::new(rules, Some(10 * 1024), backoff);
//! pace.check_deadline(t0)?;                  // the deadline is set: 300 s + 10 s
//! assert_eq!(pace.next_deadline(), Some(t0 + Duration::from_secs(310)));
//! pace.opened(t0);
//! pace.received(4096, t0 + Duration::from_secs(1))?;
//! // The connection broke: resume after the backoff's pause.
//! let broken = iot_ota_core::FetchError::Transport {
//!     message: "reset".into(), retryable: true, http_status: None };
//! let resume_at = pace.interrupted(broken, t0 + Duration::from_secs(2))?;
//! assert_eq!(resume_at, t0 + Duration::from_millis(2500));
//! # Ok::<(), iot_ota_core::FetchError>(())
//! ```

use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::error::FetchError;

/// The settings of [`Pace`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaceRules {
    /// How many times a broken transfer resumes.
    pub retries: u32,
    /// The slowest transfer accepted, in bytes per second (0: no minimum
    /// rate and no overall deadline).
    pub min_rate: u64,
    /// The window over which `min_rate` is measured.
    pub rate_window: Duration,
    /// The fixed part of the overall deadline, `deadline_base + size /
    /// min_rate`.
    pub deadline_base: Duration,
}

/// One download's time rules; see the module docs.
#[derive(Debug, Clone)]
pub struct Pace {
    rules: PaceRules,
    size: Option<u64>,
    retries_left: u32,
    backoff: Backoff,
    /// The overall deadline, set by the first check.
    deadline: Option<Instant>,
    /// The current rate window: when it began, and the bytes since.
    window: Option<(Instant, u64)>,
    /// No request before this (the pause before a resume).
    pause_until: Option<Instant>,
}

impl Pace {
    /// The rules of a download of `size` bytes (when known), pausing before
    /// each resume as `backoff` says.
    pub fn new(rules: PaceRules, size: Option<u64>, backoff: Backoff) -> Pace {
        Pace {
            retries_left: rules.retries,
            rules,
            size,
            backoff,
            deadline: None,
            window: None,
            pause_until: None,
        }
    }

    /// Checks the overall deadline at `now`; the first call sets it.
    pub fn check_deadline(&mut self, now: Instant) -> Result<(), FetchError> {
        let min_rate = self.rules.min_rate;
        if min_rate == 0 {
            return Ok(());
        }
        let size = self.size.unwrap_or(0);
        let bound = self.rules.deadline_base.as_secs() + size / min_rate;
        let deadline = *self
            .deadline
            .get_or_insert(now + Duration::from_secs(bound));
        if now > deadline {
            return Err(too_slow(format!(
                "not done within {bound} s, the deadline for {size} bytes at {min_rate} B/s"
            )));
        }
        Ok(())
    }

    /// A response began at `now`: a new rate window.
    pub fn opened(&mut self, now: Instant) {
        self.window = Some((now, 0));
    }

    /// `n` body bytes arrived at `now`: checks the minimum rate over the
    /// window once it is `rate_window` long, then starts the next one.
    pub fn received(&mut self, n: u64, now: Instant) -> Result<(), FetchError> {
        let (min_rate, span) = (self.rules.min_rate, self.rules.rate_window);
        let Some((start, bytes)) = self.window.as_mut() else {
            return Ok(());
        };
        *bytes += n;
        let elapsed = now.saturating_duration_since(*start);
        if min_rate == 0 || elapsed < span {
            return Ok(());
        }
        let rate = u64::try_from(u128::from(*bytes) * 1000 / elapsed.as_millis().max(1))
            .unwrap_or(u64::MAX);
        if rate < min_rate {
            return Err(too_slow(format!(
                "the server sent {bytes} bytes in {} s ({rate} B/s), below the minimum of {min_rate} B/s",
                elapsed.as_secs()
            )));
        }
        self.window = Some((now, 0));
        Ok(())
    }

    /// The transfer broke at `now` with `error`: the error back when it is
    /// not retryable or no resume is left; else when to resume (also kept
    /// for [`Pace::resume_at`]).
    pub fn interrupted(&mut self, error: FetchError, now: Instant) -> Result<Instant, FetchError> {
        if !error.is_retryable() || self.retries_left == 0 {
            return Err(error);
        }
        self.retries_left -= 1;
        let at = now + self.backoff.next_delay();
        self.pause_until = Some(at);
        Ok(at)
    }

    /// When the pending resume may start, if one is pending.
    pub fn resume_at(&self) -> Option<Instant> {
        self.pause_until
    }

    /// The resume has started: no pause is pending any more.
    pub fn resumed(&mut self) {
        self.pause_until = None;
    }

    /// The earliest moment something is due: the pending resume, or the
    /// overall deadline (the download fails if it is not done by then).
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.pause_until, self.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// A download ended for being too slow: not retryable (the same server
/// would be as slow again).
fn too_slow(message: String) -> FetchError {
    FetchError::Transport {
        message,
        retryable: false,
        http_status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn rules() -> PaceRules {
        PaceRules {
            retries: 2,
            min_rate: 1000,
            rate_window: ms(1000),
            deadline_base: Duration::from_secs(2),
        }
    }

    fn pace(size: Option<u64>) -> Pace {
        Pace::new(
            rules(),
            size,
            Backoff::new(ms(100), ms(400)).without_jitter(),
        )
    }

    fn broken() -> FetchError {
        FetchError::Transport {
            message: "connection reset".into(),
            retryable: true,
            http_status: None,
        }
    }

    #[test]
    fn the_deadline_scales_with_the_size_and_is_set_once() {
        let t0 = Instant::now();
        let mut p = pace(Some(3000));
        p.check_deadline(t0 + ms(5)).unwrap();
        // 2 s + 3000 B / 1000 B/s, from the first check.
        assert_eq!(p.next_deadline(), Some(t0 + ms(5005)));
        p.check_deadline(t0 + ms(5005)).unwrap();
        let e = p.check_deadline(t0 + ms(5006)).unwrap_err();
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("not done within 5 s"), "{e}");
    }

    #[test]
    fn the_minimum_rate_is_judged_per_window() {
        let t0 = Instant::now();
        let mut p = pace(None);
        p.received(10, t0).unwrap(); // before a response: nothing measured
        p.opened(t0);
        p.received(600, t0 + ms(400)).unwrap();
        p.received(500, t0 + ms(1000)).unwrap(); // 1100 B in 1 s: enough; next window
        p.received(999, t0 + ms(1999)).unwrap(); // the window is not over yet
        let e = p.received(0, t0 + ms(2000)).unwrap_err();
        assert!(e.to_string().contains("999 bytes in 1 s (999 B/s)"), "{e}");
        assert!(!e.is_retryable());
    }

    #[test]
    fn a_new_response_starts_a_new_window() {
        let t0 = Instant::now();
        let mut p = pace(None);
        p.opened(t0);
        p.received(100, t0 + ms(900)).unwrap();
        // Broken and resumed: the pause does not count against the rate.
        p.opened(t0 + ms(5000));
        p.received(1000, t0 + ms(6000)).unwrap();
    }

    #[test]
    fn resumes_back_off_and_are_bounded() {
        let t0 = Instant::now();
        let mut p = pace(None);
        assert_eq!(p.interrupted(broken(), t0).unwrap(), t0 + ms(100));
        assert_eq!(p.resume_at(), Some(t0 + ms(100)));
        assert_eq!(p.next_deadline(), Some(t0 + ms(100)));
        p.resumed();
        assert_eq!(p.resume_at(), None);
        assert_eq!(p.interrupted(broken(), t0 + ms(150)).unwrap(), t0 + ms(350));
        let e = p.interrupted(broken(), t0 + ms(400)).unwrap_err();
        assert_eq!(e, broken(), "the third break ends it");
    }

    #[test]
    fn a_final_error_is_not_retried() {
        let mut p = pace(None);
        let gone = FetchError::Transport {
            message: "HTTP 404".into(),
            retryable: false,
            http_status: Some(404),
        };
        assert_eq!(p.interrupted(gone.clone(), Instant::now()), Err(gone));
    }

    #[test]
    fn the_pending_resume_or_the_deadline_comes_first() {
        let t0 = Instant::now();
        let mut p = pace(Some(0));
        p.check_deadline(t0).unwrap();
        assert_eq!(p.next_deadline(), Some(t0 + ms(2000)));
        p.interrupted(broken(), t0 + ms(10)).unwrap();
        assert_eq!(p.next_deadline(), Some(t0 + ms(110)));
    }

    #[test]
    fn min_rate_zero_turns_both_bounds_off() {
        let t0 = Instant::now();
        let mut p = Pace::new(
            PaceRules {
                min_rate: 0,
                ..rules()
            },
            Some(1 << 30),
            Backoff::new(ms(100), ms(400)).without_jitter(),
        );
        p.check_deadline(t0).unwrap();
        p.check_deadline(t0 + Duration::from_secs(86_400)).unwrap();
        p.opened(t0);
        p.received(1, t0 + Duration::from_secs(3600)).unwrap();
        assert_eq!(p.next_deadline(), None);
    }
}
