//! One firmware download, without the IO: byte counting, digest feeding,
//! length checks, verification and progress throttling.
//!
//! The driver owns the socket and the file; it hands every received slice to
//! [`Fetch::handle_data`] and, when the server says the body is over, calls
//! [`Fetch::handle_end`]. Each call may return a [`Progress`] report for the
//! driver to publish (through [`crate::Ota::publish_progress`]).

use std::time::{Duration, Instant};

use crate::digest::Hasher;
use crate::error::FetchError;
use crate::protocol::{Firmware, Progress, Status};

/// Download state, as the guide's `iot_ota_is_fetching` / `iot_ota_fetch_finish` see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum FetchState {
    /// The download module is not initialised.
    Uninit = 0,
    /// Initialised, no download running.
    Init = 1,
    /// Downloading.
    Fetching = 2,
    /// The download has ended (complete or failed).
    Fetched = 3,
}

/// When automatic progress reports are sent while downloading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    /// Report when the percent grew by at least this many points...
    pub step: u32,
    /// ...and at least this much time passed since the last report.
    pub interval: Duration,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            step: 5,
            interval: Duration::from_secs(1),
        }
    }
}

/// When a download's next DOWNLOADING report is due: the [`Throttle`] and
/// the last report sent. [`Fetch`] keeps one for the bytes it receives; a
/// driver that hands bytes to an application later than it receives them
/// (the C API's read-ahead) keeps its own, for the bytes handed over, so
/// the platform's percent is the application's.
#[derive(Debug, Clone)]
pub struct ProgressMeter {
    throttle: Throttle,
    last: Option<(u32, Instant)>,
}

impl ProgressMeter {
    /// A meter with nothing reported yet.
    pub fn new(throttle: Throttle) -> ProgressMeter {
        ProgressMeter {
            throttle,
            last: None,
        }
    }

    /// DOWNLOADING 0 was reported at `now` (the first report of a download).
    pub fn begin(&mut self, now: Instant) {
        self.last = Some((0, now));
    }

    /// Whether a report of `pct` is due at `now`: the first one; 100 once;
    /// otherwise at least `step` points and `interval` after the last. A
    /// due report counts as sent.
    pub fn due(&mut self, pct: u32, now: Instant) -> bool {
        let due = match self.last {
            None => true,
            Some((last_pct, last_at)) => {
                (pct == 100 && last_pct < 100)
                    || (pct >= last_pct + self.throttle.step
                        && now.saturating_duration_since(last_at) >= self.throttle.interval)
            }
        };
        if due {
            self.last = Some((pct, now));
        }
        due
    }
}

/// `done` of `total` bytes as a percent, in 64-bit arithmetic (0 when the
/// size is unknown or 0; never above 100).
pub fn percent_of(done: u64, total: Option<u64>) -> u32 {
    match total {
        Some(0) | None => 0,
        Some(t) => (done.min(t) * 100 / t) as u32,
    }
}

/// The outcome of a finished download, once verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Bytes received.
    pub size: u64,
    /// The digest that matched, lowercase hex.
    pub digest: String,
}

/// Tracks one download. See the module docs for the drive contract.
#[derive(Debug, Clone)]
pub struct Fetch {
    firmware: Firmware,
    hasher: Hasher,
    /// A signed manifest's SHA-256 and, when the command's method is not
    /// SHA-256 already, a second hasher for it.
    manifest_sha256: Option<(String, Option<Hasher>)>,
    received: u64,
    /// Total size when known: the command's `size`, else the server's.
    total: Option<u64>,
    meter: ProgressMeter,
    state: FetchState,
    outcome: Option<Result<Verified, FetchError>>,
    /// A delta update's count: (bytes to fetch, fetched so far). Progress
    /// is then the fetched part of what is to fetch.
    delta: Option<(u64, u64)>,
    /// The `desc` of DOWNLOADING reports: the delta planner's decision.
    desc: String,
}

impl Fetch {
    /// A new download of `firmware`, with fresh counters and digest.
    pub fn new(firmware: Firmware, throttle: Throttle) -> Fetch {
        let manifest_sha256 = firmware.signed.as_ref().map(|s| {
            let second = (firmware.sign_method != crate::digest::SignMethod::Sha256)
                .then(|| Hasher::new(crate::digest::SignMethod::Sha256));
            (s.manifest.sha256.clone(), second)
        });
        Fetch {
            hasher: Hasher::new(firmware.sign_method),
            manifest_sha256,
            total: firmware.size,
            firmware,
            received: 0,
            meter: ProgressMeter::new(throttle),
            state: FetchState::Fetching,
            outcome: None,
            delta: None,
            desc: String::new(),
        }
    }

    /// The download is a delta: `to_fetch` bytes come from the server (of
    /// which a cut attempt fetched `fetched` already: a resume), the rest
    /// is copied ([`Fetch::handle_copied`]); progress counts the fetched
    /// bytes only, and DOWNLOADING reports say `desc` (the plan).
    pub fn plan_delta(&mut self, to_fetch: u64, fetched: u64, desc: impl Into<String>) {
        self.delta = Some((to_fetch, fetched.min(to_fetch)));
        self.desc = desc.into();
    }

    /// The delta is given up for the full download (`desc` says why): the
    /// count and digest start again from byte 0; the progress meter stays,
    /// so the platform never sees the percent go back.
    pub fn restart_full(&mut self, desc: impl Into<String>) {
        self.hasher = Hasher::new(self.firmware.sign_method);
        if let Some((_, Some(second))) = &mut self.manifest_sha256 {
            *second = Hasher::new(crate::digest::SignMethod::Sha256);
        }
        self.received = 0;
        self.total = self.firmware.size;
        self.delta = None;
        self.desc = desc.into();
    }

    /// Bytes of the new image copied from the old one (a delta's): hashed
    /// and counted like received bytes, but not as fetched.
    pub fn handle_copied(&mut self, bytes: &[u8]) -> Result<(), FetchError> {
        self.take(bytes)
    }

    /// Counts and hashes bytes of the image, fetched or copied.
    fn take(&mut self, bytes: &[u8]) -> Result<(), FetchError> {
        self.ensure_fetching()?;
        let after = self.received + bytes.len() as u64;
        if let Some(total) = self.total {
            if after > total {
                return Err(self.fail(FetchError::TooLong {
                    expected: total,
                    received: after,
                }));
            }
        }
        self.hasher.update(bytes);
        if let Some((_, Some(second))) = &mut self.manifest_sha256 {
            second.update(bytes);
        }
        self.received = after;
        Ok(())
    }

    /// The `desc` the DOWNLOADING reports carry (empty but for a delta).
    pub fn desc(&self) -> &str {
        &self.desc
    }

    /// The firmware being downloaded.
    pub fn firmware(&self) -> &Firmware {
        &self.firmware
    }

    /// `Fetching` until the download ends, then `Fetched` (whatever the outcome).
    pub fn state(&self) -> FetchState {
        self.state
    }

    /// Bytes received and hashed so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The firmware's total size, when known.
    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// Percent received, computed in 64-bit arithmetic (0 when the size is
    /// unknown); for a delta, the percent fetched of what is to fetch.
    pub fn percent(&self) -> u32 {
        match self.delta {
            Some((0, _)) => percent_of(self.received, self.total),
            Some((to_fetch, fetched)) => percent_of(fetched, Some(to_fetch)),
            None => percent_of(self.received, self.total),
        }
    }

    /// The outcome once the download has ended.
    pub fn outcome(&self) -> Option<&Result<Verified, FetchError>> {
        self.outcome.as_ref()
    }

    /// The digest of the bytes received so far, lowercase hex.
    pub fn digest_hex(&self) -> String {
        self.hasher.hex()
    }

    fn report(&self, status: Status, progress: u32, desc: String) -> Progress {
        Progress {
            status,
            progress,
            desc,
            firmware_version: self.firmware.version.clone(),
        }
    }

    /// The first report of a download: DOWNLOADING at 0%, sent at once.
    pub fn begin(&mut self, now: Instant) -> Progress {
        self.meter.begin(now);
        self.report(Status::Downloading, 0, self.desc.clone())
    }

    /// A response arrived that carries the body from byte `offset`, with
    /// `remaining` bytes when the server declared a length.
    ///
    /// Checks it against what was received and the expected size, so a server
    /// that disagrees with the command fails before any byte is written.
    #[must_use = "a report not published is a report lost"]
    pub fn handle_response(
        &mut self,
        offset: u64,
        remaining: Option<u64>,
    ) -> Result<(), FetchError> {
        self.ensure_fetching()?;
        if offset != self.received {
            return Err(self.fail(FetchError::OffsetMismatch {
                expected: self.received,
                offset,
            }));
        }
        if let Some(rem) = remaining {
            let declared = offset.saturating_add(rem);
            match self.total {
                Some(total) if total != declared => {
                    return Err(self.fail(FetchError::LengthMismatch {
                        expected: total,
                        declared,
                    }))
                }
                Some(_) => {}
                None => self.total = Some(declared),
            }
        }
        Ok(())
    }

    /// Counts and hashes received bytes. Returns a DOWNLOADING report when the
    /// throttle allows one, and always at 100%.
    #[must_use = "a report not published is a report lost"]
    pub fn handle_data(
        &mut self,
        bytes: &[u8],
        now: Instant,
    ) -> Result<Option<Progress>, FetchError> {
        self.take(bytes)?;
        if let Some(d) = &mut self.delta {
            d.1 += bytes.len() as u64;
        }
        let pct = self.percent();
        if !bytes.is_empty() && self.meter.due(pct, now) {
            return Ok(Some(self.report(
                Status::Downloading,
                pct,
                self.desc.clone(),
            )));
        }
        Ok(None)
    }

    /// The server ended the body: checks the length and the digest.
    ///
    /// Returns the DOWNLOADED report on success. On failure the error's
    /// [`FetchError::status`] is the status to report (see [`Fetch::failure_report`]).
    #[must_use = "a report not published is a report lost"]
    pub fn handle_end(&mut self) -> Result<Progress, FetchError> {
        self.ensure_fetching()?;
        if let Some(total) = self.total {
            if self.received < total {
                return Err(self.fail(FetchError::Truncated {
                    expected: total,
                    received: self.received,
                }));
            }
        }
        let actual = self.hasher.hex();
        if actual != self.firmware.sign {
            return Err(self.fail(FetchError::DigestMismatch {
                method: self.firmware.sign_method,
                expected: self.firmware.sign.clone(),
                actual,
            }));
        }
        // Signed: the manifest's SHA-256 must match too (VERIFY_FAILED).
        if let Some((expected, second)) = &self.manifest_sha256 {
            let sha256 = second.as_ref().map_or_else(|| actual.clone(), Hasher::hex);
            if sha256 != *expected {
                let expected = expected.clone();
                return Err(self.fail(FetchError::DigestMismatch {
                    method: crate::digest::SignMethod::Sha256,
                    expected,
                    actual: sha256,
                }));
            }
        }
        self.state = FetchState::Fetched;
        self.outcome = Some(Ok(Verified {
            size: self.received,
            digest: actual,
        }));
        Ok(self.report(Status::Downloaded, 100, String::new()))
    }

    /// Ends the download with an error from outside the core (a socket error, a
    /// write error, a cancel). Returns the error for convenience.
    pub fn fail(&mut self, error: FetchError) -> FetchError {
        if self.outcome.is_none() {
            self.state = FetchState::Fetched;
            self.outcome = Some(Err(error.clone()));
        }
        error
    }

    /// The failure report for `error`: its status, the last percent (100 for a
    /// digest mismatch), and the error's text as `desc`.
    #[must_use = "a report not published is a report lost"]
    pub fn failure_report(&self, error: &FetchError) -> Progress {
        let progress = match error.status() {
            Status::VerifyFailed => 100,
            _ => self.percent(),
        };
        self.report(error.status(), progress, error.to_string())
    }

    fn ensure_fetching(&self) -> Result<(), FetchError> {
        match self.state {
            FetchState::Fetching => Ok(()),
            _ => Err(FetchError::Finished),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::{digest_hex, SignMethod};

    #[test]
    fn a_signed_image_must_match_the_manifests_sha256_too() {
        use crate::manifest::{test_keys::Ed, Manifest, Signed};
        let body = b"firmware bytes";
        for method in [SignMethod::Md5, SignMethod::Sha256] {
            for (sha256, ok) in [
                (digest_hex(SignMethod::Sha256, body), true),
                ("00".repeat(32), false),
            ] {
                let mut firmware = fw(body, Some(body.len() as u64), method);
                let m = Manifest {
                    product: "pk".into(),
                    firmware_version: "2.0".into(),
                    size: body.len() as u64,
                    sha256,
                    counter: 1,
                    index_sha256: None,
                };
                firmware.signed = Some(Box::new(Signed::sign(m, &[&Ed::new()]).unwrap()));
                let mut f = Fetch::new(firmware, Throttle::default());
                f.handle_data(body, Instant::now()).unwrap();
                match f.handle_end() {
                    Ok(p) => assert!(ok, "{method:?}: {p:?}"),
                    Err(e) => {
                        assert!(!ok, "{method:?}: {e}");
                        assert_eq!(e.status(), Status::VerifyFailed);
                        assert!(e.to_string().contains("SHA-256"), "{e}");
                    }
                }
            }
        }
    }

    fn fw(body: &[u8], size: Option<u64>, method: SignMethod) -> Firmware {
        Firmware {
            version: "2.0".into(),
            url: "http://h/f".into(),
            size,
            sign: digest_hex(method, body),
            sign_method: method,
            policy: None,
            signed: None,
            delta: None,
        }
    }

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn whole_download_verifies() {
        let body: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        for method in [SignMethod::Md5, SignMethod::Sha256] {
            let mut f = Fetch::new(fw(&body, Some(1000), method), Throttle::default());
            let now = t0();
            assert_eq!(f.begin(now).progress, 0);
            f.handle_response(0, Some(1000)).unwrap();
            for chunk in body.chunks(7) {
                f.handle_data(chunk, now).unwrap();
            }
            let done = f.handle_end().unwrap();
            assert_eq!((done.status, done.progress), (Status::Downloaded, 100));
            assert_eq!(f.state(), FetchState::Fetched);
            assert_eq!(f.outcome().unwrap().as_ref().unwrap().size, 1000);
        }
    }

    #[test]
    fn throttles_by_points_and_time() {
        let body = vec![7u8; 100];
        let mut f = Fetch::new(fw(&body, Some(100), SignMethod::Md5), Throttle::default());
        let start = t0();
        f.begin(start);
        // 4 points: not enough points.
        assert_eq!(
            f.handle_data(&body[..4], start + Duration::from_secs(5))
                .unwrap(),
            None
        );
        // 10 points but no time passed since the last report.
        let r = f
            .handle_data(&body[4..10], start + Duration::from_secs(5))
            .unwrap();
        assert_eq!(r.unwrap().progress, 10);
        assert_eq!(
            f.handle_data(&body[10..30], start + Duration::from_millis(5500))
                .unwrap(),
            None
        );
        let r = f
            .handle_data(&body[30..31], start + Duration::from_secs(7))
            .unwrap();
        assert_eq!(r.unwrap().progress, 31);
        // 100% is always reported.
        let r = f
            .handle_data(&body[31..], start + Duration::from_millis(7001))
            .unwrap();
        assert_eq!(r.unwrap().progress, 100);
    }

    #[test]
    fn percent_is_64_bit() {
        let size = 5_000_000_000u64;
        let mut f = Fetch::new(fw(b"", Some(size), SignMethod::Md5), Throttle::default());
        f.received = 4_000_000_000;
        assert_eq!(f.percent(), 80);
    }

    #[test]
    fn too_long_and_truncated() {
        let body = vec![1u8; 10];
        let mut f = Fetch::new(fw(&body, Some(10), SignMethod::Md5), Throttle::default());
        let e = f.handle_data(&[0; 11], t0()).unwrap_err();
        assert!(matches!(
            e,
            FetchError::TooLong {
                expected: 10,
                received: 11
            }
        ));
        assert_eq!(e.status(), Status::DownloadFailed);
        assert_eq!(f.state(), FetchState::Fetched);
        assert!(matches!(
            f.handle_data(&[0], t0()),
            Err(FetchError::Finished)
        ));

        let mut f = Fetch::new(fw(&body, Some(10), SignMethod::Md5), Throttle::default());
        f.handle_data(&body[..6], t0()).unwrap();
        let e = f.handle_end().unwrap_err();
        assert!(matches!(
            e,
            FetchError::Truncated {
                expected: 10,
                received: 6
            }
        ));
        assert_eq!(f.failure_report(&e).progress, 60);
    }

    #[test]
    fn digest_mismatch_is_verify_failed() {
        let body = vec![1u8; 10];
        let mut f = Fetch::new(fw(&body, Some(10), SignMethod::Md5), Throttle::default());
        f.handle_data(&[2u8; 10], t0()).unwrap();
        let e = f.handle_end().unwrap_err();
        assert_eq!(e.status(), Status::VerifyFailed);
        let r = f.failure_report(&e);
        assert_eq!((r.status, r.progress), (Status::VerifyFailed, 100));
        assert!(r.desc.contains("MD5"), "{}", r.desc);
    }

    #[test]
    fn server_length_checks() {
        let body = vec![1u8; 10];
        let mut f = Fetch::new(fw(&body, Some(10), SignMethod::Md5), Throttle::default());
        let e = f.handle_response(0, Some(12)).unwrap_err();
        assert!(matches!(
            e,
            FetchError::LengthMismatch {
                expected: 10,
                declared: 12
            }
        ));

        // Unknown size: the server's length becomes the total.
        let mut f = Fetch::new(fw(&body, None, SignMethod::Md5), Throttle::default());
        f.handle_response(0, Some(10)).unwrap();
        assert_eq!(f.total(), Some(10));
        f.handle_data(&body[..5], t0()).unwrap();
        assert_eq!(f.percent(), 50);
        // A resumed response must start where we are.
        assert!(matches!(
            f.clone().handle_response(4, Some(6)),
            Err(FetchError::OffsetMismatch {
                expected: 5,
                offset: 4
            })
        ));
        f.handle_response(5, Some(5)).unwrap();
        f.handle_data(&body[5..], t0()).unwrap();
        f.handle_end().unwrap();
    }

    #[test]
    fn unknown_size_reads_to_end() {
        let body = vec![3u8; 10];
        let mut f = Fetch::new(fw(&body, None, SignMethod::Sha256), Throttle::default());
        f.handle_response(0, None).unwrap();
        f.handle_data(&body, t0()).unwrap();
        assert_eq!(f.percent(), 0);
        assert_eq!(f.handle_end().unwrap().status, Status::Downloaded);
    }

    /// A delta: copied bytes are hashed, not counted as fetched; the
    /// percent is the fetched part of what is to fetch; reports carry the
    /// plan; a restart for the full download never reports a lower percent.
    #[test]
    fn a_delta_counts_what_it_fetches_and_a_restart_never_goes_back() {
        let body = vec![7u8; 1000];
        let fw = fw(&body, Some(1000), SignMethod::Md5);
        let t0 = Instant::now();
        let mut f = Fetch::new(fw, Throttle::default());
        f.plan_delta(200, 0, "delta: 0.0 MiB of 0.0 MiB in 1 request");
        assert_eq!(f.begin(t0).desc, "delta: 0.0 MiB of 0.0 MiB in 1 request");
        f.handle_copied(&body[..800]).unwrap();
        assert_eq!((f.received(), f.percent()), (800, 0));
        let later = t0 + Duration::from_secs(5);
        let report = f.handle_data(&body[800..900], later).unwrap().unwrap();
        assert_eq!((report.progress, report.desc.as_str()), (50, f.desc()));
        // Given up for the full download: the count restarts, the meter
        // does not report below 50 again.
        f.restart_full("the server ignores Range requests: full download");
        assert_eq!((f.received(), f.percent()), (0, 0));
        let much_later = later + Duration::from_secs(5);
        assert!(f.handle_data(&body[..300], much_later).unwrap().is_none());
        let r = f.handle_data(&body[300..600], much_later + Duration::from_secs(5));
        assert_eq!(r.unwrap().map(|r| r.progress), Some(60));
        f.handle_data(&body[600..], much_later + Duration::from_secs(10))
            .unwrap();
        assert!(f.handle_end().is_ok(), "the whole image verifies");
    }
}
