//! `iot_ota.h`: the guide's eight functions and the extras.
//!
//! An OTA instance is one device's engine (`iot_ota_core::Ota`, in an
//! `iot_ota_device::Session` publishing through the MQTT instance) and the
//! download of its current upgrade (`iot_ota_device::Download`). Engine
//! events (an accepted command, a firmware reply) are queued by the MQTT
//! task and applied at the start of the next call on the instance, so the
//! instance's state only changes inside the application's own calls.

use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iot_ota_core::protocol::MAX_VERSION_LEN;
use iot_ota_core::{Config, Event, FetchError, FetchState, Firmware, Ota, Status, Verified};
use iot_ota_device::ffi_support::{Application, ReadAhead, ReadAheadPoll};
use iot_ota_device::http::HttpOptions;
use iot_ota_device::lifecycle::{Installed, Lifecycle, Next, Resumed, Start};
use iot_ota_device::{Download, DownloadOptions, Session};

mod boot;
mod fetch;

pub use boot::*;
pub use fetch::*;

use crate::mqtt::{Mqtt, MQTTS};
use crate::registry::Registry;
use crate::{
    c_str, error_text, guard, lock, IOT_OTA_ERR_FETCH_FAILED, IOT_OTA_ERR_GENERAL,
    IOT_OTA_ERR_INVALID_PARAM, IOT_OTA_ERR_INVALID_STATE, IOT_OTA_ERR_MQTT_FAILED,
    IOT_OTA_ERR_NONE, IOT_OTA_ERR_STR_TOO_LONG, IOT_OTA_ERR_VERIFY_FAILED,
};

/// Longest version, in bytes (the console's 1-100 characters).
pub const IOT_OTA_VERSION_MAX: usize = MAX_VERSION_LEN;
/// Longest URL, in bytes.
pub const IOT_OTA_URL_MAX: usize = iot_ota_core::protocol::MAX_URL_LEN;
/// Longest digest, in hex digits (SHA-256).
pub const IOT_OTA_SIGN_MAX: usize = 64;

/// `iot_ota_fetch_state_t`: the MQTT instance has not connected yet (the
/// upgrade topic is not subscribed).
pub const IOT_OTA_FETCH_STATE_UNINIT: c_int = FetchState::Uninit as c_int;
/// `iot_ota_fetch_state_t`: ready, no upgrade arrived yet.
pub const IOT_OTA_FETCH_STATE_INIT: c_int = FetchState::Init as c_int;
/// `iot_ota_fetch_state_t`: an upgrade was accepted and is downloading.
pub const IOT_OTA_FETCH_STATE_FETCHING: c_int = FetchState::Fetching as c_int;
/// `iot_ota_fetch_state_t`: the download has ended (complete or failed).
pub const IOT_OTA_FETCH_STATE_FETCHED: c_int = FetchState::Fetched as c_int;

/// `iot_ota_firmware_t`: the details of the current upgrade, copied into the
/// caller's struct by `iot_ota_get_firmware`. Every string is NUL-terminated.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IotOtaFirmware {
    /// Target firmware version.
    pub version: [c_char; IOT_OTA_VERSION_MAX + 1],
    /// `http://` or `https://` URL of the image.
    pub url: [c_char; IOT_OTA_URL_MAX + 1],
    /// Expected digest, lowercase hex.
    pub sign: [c_char; IOT_OTA_SIGN_MAX + 1],
    /// `Md5` or `Sha256`.
    pub sign_method: [c_char; 16],
    /// `standard`, `silent`, or empty when the device asked (get reply).
    pub policy: [c_char; 16],
    /// Size in bytes; 0 when unknown (a get reply without one).
    pub size: u64,
}

/// An OTA instance (the guide's `void *handle`).
pub struct OtaHandle {
    mqtt: Arc<Mqtt>,
    session: Arc<Session>,
    product_key: String,
    device_name: String,
    /// Engine events, queued by the MQTT task; applied by [`OtaHandle::sync`].
    events: Arc<Mutex<VecDeque<Event>>>,
    state: Mutex<OtaState>,
}

#[derive(Default)]
struct OtaState {
    /// The download of the current (or last) upgrade.
    download: Option<Job>,
    /// When `iot_ota_fetch_yield` last let the MQTT task run.
    serviced: Option<Instant>,
    /// When the engine's timeouts (firmware gets) were last looked at.
    timeouts_checked: Option<Instant>,
    /// The upgrade journal, once `iot_ota_set_state_dir` has named its
    /// directory.
    life: Option<Lifecycle<Application>>,
    /// The image the device runs, for delta updates (`iot_ota_set_delta_base`).
    delta_base: Option<std::path::PathBuf>,
}

/// The download of an upgrade, before and after the first `iot_ota_fetch_yield`.
// One per OTA handle, moved once: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Job {
    /// Accepted; the first fetch starts it.
    Waiting(Download),
    /// Reading ahead on its own threads.
    Running(ReadAhead),
    /// Written to a file by `iot_ota_fetch_to_file`, and ended.
    Written(Written),
}

/// What `iot_ota_fetch_to_file` leaves of its download.
struct Written {
    firmware: Firmware,
    outcome: Result<Verified, FetchError>,
}

impl Job {
    fn firmware(&self) -> &Firmware {
        match self {
            Job::Waiting(d) => d.firmware(),
            Job::Running(r) => r.firmware(),
            Job::Written(w) => &w.firmware,
        }
    }

    fn state(&self) -> FetchState {
        match self {
            Job::Waiting(d) => d.state(),
            Job::Running(r) => r.state(),
            Job::Written(_) => FetchState::Fetched,
        }
    }

    fn outcome(&self) -> Option<Result<Verified, FetchError>> {
        match self {
            Job::Waiting(d) => d.outcome().cloned(),
            Job::Running(r) => r.outcome(),
            Job::Written(w) => Some(w.outcome.clone()),
        }
    }

    fn is_finished(&self) -> bool {
        self.state() == FetchState::Fetched
    }

    fn digest_hex(&self) -> String {
        match self {
            Job::Waiting(d) => d.digest_hex(),
            Job::Running(r) => r.digest_hex(),
            // The verified digest (none is kept of a failed one).
            Job::Written(w) => w
                .outcome
                .as_ref()
                .map_or(String::new(), |v| v.digest.clone()),
        }
    }

    /// Bytes handed to the application so far.
    fn fetched_size(&self) -> u64 {
        match self {
            Job::Waiting(d) => d.fetched_size(),
            Job::Running(r) => r.delivered(),
            Job::Written(w) => w.outcome.as_ref().map_or(0, |v| v.size),
        }
    }

    fn file_size(&self) -> Option<u64> {
        match self {
            Job::Waiting(d) => d.file_size(),
            Job::Running(r) => r.file_size(),
            Job::Written(w) => w.firmware.size.or(w.outcome.as_ref().ok().map(|v| v.size)),
        }
    }

    /// Ends it without a report (the application reported the end itself).
    fn abandon(self) {
        match self {
            Job::Waiting(d) => d.abandon(),
            Job::Running(r) => r.abandon(),
            Job::Written(_) => {}
        }
    }
}

/// The read-ahead's blocks (three in flight). Each block is a hand-over
/// between threads, and hand-overs (wake-ups) cost more than bytes: over
/// loopback on two cores, 3 x 64 KiB ran about a tenth faster than 4 x 32
/// KiB, and 3 x 48, 4 x 48 and 3 x 64 KiB within the noise of each other.
/// 3 x 48 KiB is 144 KiB, 16 KiB more than 4 x 32: the C example's peak RSS
/// stays flat and under 3.2 MiB.
const READ_AHEAD_BLOCK: usize = 48 * 1024;

/// While bytes are waiting, `iot_ota_fetch_yield` returns without entering
/// the runtime; at least this often it lets the MQTT task run anyway
/// (reports, keep-alives, incoming commands).
const SERVICE_EVERY: Duration = Duration::from_millis(20);

/// How often the API's calls expire the engine's timeouts.
const TIMEOUT_CHECK: Duration = Duration::from_millis(100);

/// How long `iot_ota_fetch_yield` waits for the next block on its own
/// thread before it waits with the MQTT connection serviced.
const QUICK_WAIT: Duration = Duration::from_millis(2);

impl std::fmt::Debug for OtaHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtaHandle")
            .field("product_key", &self.product_key)
            .field("device_name", &self.device_name)
            .finish_non_exhaustive()
    }
}

static OTAS: Registry<OtaHandle> = Registry::new();

impl OtaHandle {
    /// Applies the queued engine events: an accepted command, or a firmware
    /// reply to our get, starts a new download (fresh counters and digest).
    fn sync(&self, st: &mut OtaState) {
        // Expire firmware gets whose reply did not come (their timeout is
        // 10 s: looking every 100 ms is plenty, and keeps the calls of a
        // download loop, a few per chunk, off the engine's lock).
        if st
            .timeouts_checked
            .map_or(true, |t| t.elapsed() >= TIMEOUT_CHECK)
        {
            self.session.handle_timeout();
            st.timeouts_checked = Some(Instant::now());
        }
        let events = {
            let mut queued = lock(&self.events);
            if queued.is_empty() {
                return;
            }
            std::mem::take(&mut *queued)
        };
        for event in events {
            match event {
                Event::Upgrade(cmd) => {
                    // Journaled first: the 200 (held by the engine once a
                    // state directory is set) goes out only when a power
                    // cut can no longer lose the command.
                    if self.journal_begin(st, &cmd.firmware, &cmd.msg_id) {
                        self.start(st, cmd.firmware)
                    }
                }
                Event::FirmwareInfo(reply) => match reply.result {
                    Ok(fw) => match self.session.with(|ota| ota.accept_firmware(&fw)) {
                        Ok(()) => {
                            if self.journal_begin(st, &fw, &reply.msg_id) {
                                self.start(st, fw)
                            }
                        }
                        Err(e) => log::warn!("firmware {} not started: {e}", fw.version),
                    },
                    Err(e) => log::info!("firmware get {}: {} {}", reply.msg_id, e.code, e.message),
                },
                Event::Rejected { msg_id, rejection } => {
                    log::warn!("upgrade command {msg_id:?} rejected: {rejection}")
                }
                Event::GetTimedOut { msg_id, version } => {
                    log::warn!("firmware get {msg_id} for {version}: no reply")
                }
            }
        }
    }

    /// Journals a new upgrade, with a state directory, before its 200 goes
    /// out ([`Lifecycle::accept`]). False when the journal cannot be
    /// written: the upgrade is then reported failed and not started.
    fn journal_begin(&self, st: &mut OtaState, firmware: &Firmware, msg_id: &str) -> bool {
        match st.life.as_mut() {
            Some(life) => life.accept(firmware, msg_id).is_ok(),
            None => true,
        }
    }

    /// Tells the flow of a failed download, once (it journals it).
    fn journal_failure(st: &mut OtaState) {
        let (Some(job), Some(life)) = (&st.download, st.life.as_mut()) else {
            return;
        };
        let Some(Err(e)) = job.outcome() else {
            return;
        };
        let this_one = life
            .journal()
            .is_some_and(|j| j.target_version == job.firmware().version);
        if this_one && life.flow().is_fetching() {
            if let Err(e) = life.fetched(Err(e.to_string())) {
                log::error!("journaling the failed download: {e}");
            }
        }
    }

    fn start(&self, st: &mut OtaState, firmware: Firmware) {
        let options = DownloadOptions {
            http: HttpOptions {
                tls: self.mqtt.https.clone(),
                ..HttpOptions::default()
            },
            ..DownloadOptions::default()
        };
        let _context = self.mqtt.rt.enter();
        // The engine accepts an upgrade only once the previous one has ended
        // by a terminal report, so the download replaced here has ended too
        // (or never started): dropping it reports nothing.
        st.download = Some(Job::Waiting(Download::new(
            self.session.clone(),
            firmware,
            options,
        )));
    }

    fn state(&self) -> std::sync::MutexGuard<'_, OtaState> {
        let mut st = lock(&self.state);
        self.sync(&mut st);
        Self::journal_failure(&mut st);
        st
    }

    fn fetch_state(&self) -> FetchState {
        let st = self.state();
        match &st.download {
            Some(d) => d.state(),
            None if self.mqtt.has_connected() => FetchState::Init,
            None => FetchState::Uninit,
        }
    }
}

/// The error code of a failed download: VERIFY_FAILED exactly when its
/// report is (a digest, or a delta's chunk or index), else FETCH_FAILED.
fn fetch_error_code(e: &FetchError) -> c_int {
    match e.status() {
        Status::VerifyFailed => IOT_OTA_ERR_VERIFY_FAILED,
        _ => IOT_OTA_ERR_FETCH_FAILED,
    }
}

/// Checks a product key or device name: the core's one rule.
fn valid_identity(s: &str) -> bool {
    iot_ota_core::protocol::is_valid_identity(s)
}

/// Reads a version argument: NULL, non-UTF-8 or empty is invalid; above 100 bytes too long.
///
/// # Safety
/// As [`c_str`].
unsafe fn version_arg<'a>(ptr: *const c_char) -> Result<&'a str, c_int> {
    // SAFETY: forwarded contract.
    let v = unsafe { c_str(ptr) }?;
    if v.len() > IOT_OTA_VERSION_MAX {
        return Err(IOT_OTA_ERR_STR_TOO_LONG);
    }
    if v.is_empty() {
        return Err(IOT_OTA_ERR_INVALID_PARAM);
    }
    Ok(v)
}

/// Looks up a live OTA handle whose MQTT instance is still there.
fn live(handle: *mut c_void) -> Result<Arc<OtaHandle>, c_int> {
    let h = OTAS.get(handle).ok_or(IOT_OTA_ERR_INVALID_PARAM)?;
    if h.mqtt.is_closed() {
        return Err(IOT_OTA_ERR_MQTT_FAILED);
    }
    Ok(h)
}

fn code(r: Result<c_int, c_int>) -> c_int {
    r.unwrap_or_else(|e| e)
}

/// Copies `s` into a fixed C array, NUL-terminated.
fn copy_str(dst: &mut [c_char], s: &str) -> Result<(), c_int> {
    if s.len() >= dst.len() {
        return Err(IOT_OTA_ERR_STR_TOO_LONG);
    }
    for (d, b) in dst.iter_mut().zip(s.bytes()) {
        *d = b as c_char;
    }
    dst[s.len()] = 0;
    Ok(())
}

// ---- the guide's eight functions ----

/// `void *iot_ota_init(const char *product_key, const char *device_name, void *mqtt_client)`:
/// the OTA instance of device `device_name` of product `product_key` on the
/// MQTT instance `mqtt_client`. Subscribes to the device's upgrade and get
/// reply topics (now if connected, else on connection, and after every
/// reconnect). The firmware version is reported separately.
///
/// NULL when an argument is NULL, not UTF-8 or not a valid identity (empty,
/// or with `/`, `+`, `#` or spaces), when `mqtt_client` is not a live MQTT
/// instance, or when that device already has an instance on it.
///
/// # Safety
/// `product_key` and `device_name` are NULL or NUL-terminated strings (copied).
#[no_mangle]
pub unsafe extern "C" fn iot_ota_init(
    product_key: *const c_char,
    device_name: *const c_char,
    mqtt_client: *mut c_void,
) -> *mut c_void {
    guard(std::ptr::null_mut(), || {
        // SAFETY: the caller's contract on both strings.
        let (Ok(pk), Ok(dn)) = (unsafe { c_str(product_key) }, unsafe { c_str(device_name) })
        else {
            return std::ptr::null_mut();
        };
        if !valid_identity(pk) || !valid_identity(dn) {
            return std::ptr::null_mut();
        }
        let Some(mqtt) = MQTTS.get(mqtt_client) else {
            return std::ptr::null_mut();
        };
        if mqtt.is_closed()
            || OTAS
                .any(|h| Arc::ptr_eq(&h.mqtt, &mqtt) && h.product_key == pk && h.device_name == dn)
        {
            return std::ptr::null_mut();
        }
        let events: Arc<Mutex<VecDeque<Event>>> = Arc::default();
        let sink_events = events.clone();
        let shared = mqtt.shared_weak();
        let sink = Box::new(move |event: Event| {
            lock(&sink_events).push_back(event);
            if let Some(shared) = shared.upgrade() {
                shared.ota_event();
            }
        });
        let ota = Ota::unversioned(Config::new(pk, dn));
        let session = Session::new(ota, mqtt.client().clone(), sink);
        if mqtt.attach(session.clone()) {
            session.handle_connected();
        }
        OTAS.insert(Arc::new(OtaHandle {
            mqtt,
            session,
            product_key: pk.to_owned(),
            device_name: dn.to_owned(),
            events,
            state: Mutex::new(OtaState::default()),
        }))
    })
}

/// `int iot_ota_destroy(void *handle)`: frees the instance. A download in
/// progress is cancelled and reported DOWNLOAD_FAILED (sent by the next
/// `iot_mqtt_yield` or by `iot_mqtt_destroy`); the device's OTA topics are
/// unsubscribed. Returns 0, or `IOT_OTA_ERR_INVALID_PARAM` (harmless) for
/// NULL or a stale handle.
///
/// # Safety
/// Any pointer value is accepted; only live handles are used.
#[no_mangle]
pub unsafe extern "C" fn iot_ota_destroy(handle: *mut c_void) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        let Some(h) = OTAS.remove(handle) else {
            return IOT_OTA_ERR_INVALID_PARAM;
        };
        let download = lock(&h.state).download.take();
        {
            let _context = h.mqtt.rt.enter();
            drop(download);
        }
        h.mqtt.detach(&h.session);
        if !h.mqtt.is_closed() {
            let topics = h.session.core_config().topics;
            for topic in [topics.upgrade, topics.get_reply] {
                let _ = h.mqtt.client().try_unsubscribe(topic);
            }
        }
        lock(&h.events).clear();
        IOT_OTA_ERR_NONE
    })
}

/// `int iot_ota_report_progress(void *handle, iot_ota_status_t status, uint32_t progress)`:
/// reports a status and percent for the current upgrade. SUCCESS or a
/// negative status ends the upgrade (a download still running is stopped,
/// without a second report); the next command is accepted after it.
/// Within one status the platform never sees the percent go down: a lower
/// percent than the last report of the same status (the SDK's own
/// DOWNLOADING reports count the bytes `iot_ota_fetch_yield` has handed
/// over, so they agree with an application's) is not sent.
///
/// Returns 0; `IOT_OTA_ERR_INVALID_PARAM` for a bad handle, a status that is
/// not an `iot_ota_status_t` or a progress above 100; `IOT_OTA_ERR_MQTT_FAILED`
/// when the MQTT instance is gone.
///
/// # Safety
/// Any pointer value is accepted; only live handles are used.
#[no_mangle]
pub unsafe extern "C" fn iot_ota_report_progress(
    handle: *mut c_void,
    status: c_int,
    progress: u32,
) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        code(report(handle, status, progress, ""))
    })
}

/// `int iot_ota_report_status(void *handle, iot_ota_status_t status, uint32_t progress, const char *desc)`:
/// `iot_ota_report_progress` with a reason: `desc` (NULL or empty for
/// none; at most 256 bytes, UTF-8) goes to the platform in the report's
/// `desc`, as why a FLASH_FAILED or UPGRADE_FAILED happened ("writing
/// /data/fw.part: No space left on device"). Returns as
/// `iot_ota_report_progress`; also `IOT_OTA_ERR_INVALID_PARAM` for a `desc`
/// that is not UTF-8 and `IOT_OTA_ERR_STR_TOO_LONG` above 256 bytes.
///
/// # Safety
/// `desc` is NULL or a NUL-terminated string (copied).
#[no_mangle]
pub unsafe extern "C" fn iot_ota_report_status(
    handle: *mut c_void,
    status: c_int,
    progress: u32,
    desc: *const c_char,
) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        code((|| {
            let desc = if desc.is_null() {
                ""
            } else {
                // SAFETY: non-NULL and NUL-terminated, by the caller's contract.
                unsafe { c_str(desc) }?
            };
            if desc.len() > IOT_OTA_DESC_MAX {
                return Err(IOT_OTA_ERR_STR_TOO_LONG);
            }
            report(handle, status, progress, desc)
        })())
    })
}

/// Longest `desc` of `iot_ota_report_status`, in bytes.
pub const IOT_OTA_DESC_MAX: usize = 256;

/// The two report calls' work.
fn report(handle: *mut c_void, status: c_int, progress: u32, desc: &str) -> Result<c_int, c_int> {
    let h = live(handle)?;
    let status = Status::from_code(i64::from(status)).ok_or(IOT_OTA_ERR_INVALID_PARAM)?;
    if progress > 100 {
        return Err(IOT_OTA_ERR_INVALID_PARAM);
    }
    let mut st = h.state();
    if status.is_terminal() && st.download.as_ref().is_some_and(|d| !d.is_finished()) {
        if let Some(d) = st.download.take() {
            let _context = h.mqtt.rt.enter();
            d.abandon();
        }
    }
    // The application ended the upgrade (its own failure: a full disk, a
    // flash that failed): the journal says so, and the next start does not
    // resume it.
    if status.is_terminal() && status != Status::Success {
        if let Some(life) = st.life.as_mut() {
            let why = if desc.is_empty() { status.name() } else { desc };
            if let Err(e) = life.abandon(why) {
                log::error!("journaling the application's failure: {e}");
            }
        }
    }
    drop(st);
    h.session
        .with(|ota| ota.report_progress(status, progress, desc))
        .map_err(|_| IOT_OTA_ERR_INVALID_PARAM)?;
    Ok(IOT_OTA_ERR_NONE)
}

/// `int iot_ota_report_firmware_version(void *handle, const char *version)`:
/// reports the running firmware version (at every start, and after an upgrade).
///
/// Returns 0; `IOT_OTA_ERR_INVALID_PARAM` for a bad handle or a NULL, empty,
/// non-UTF-8 or malformed version; `IOT_OTA_ERR_STR_TOO_LONG` above 100
/// bytes; `IOT_OTA_ERR_MQTT_FAILED` when the MQTT instance is gone.
///
/// # Safety
/// `version` is NULL or a NUL-terminated string (copied).
#[no_mangle]
pub unsafe extern "C" fn iot_ota_report_firmware_version(
    handle: *mut c_void,
    version: *const c_char,
) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        code((|| {
            let h = live(handle)?;
            // SAFETY: the caller's contract.
            let version = unsafe { version_arg(version) }?;
            h.session
                .with(|ota| ota.report_version(version))
                .map_err(|_| IOT_OTA_ERR_INVALID_PARAM)?;
            Ok(IOT_OTA_ERR_NONE)
        })())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities() {
        assert!(valid_identity("pk1"));
        for bad in ["", "a/b", "a+b", "a#", "a b", "a\tb"] {
            assert!(!valid_identity(bad), "{bad:?}");
        }
    }

    /// VERIFY_FAILED exactly when the report is: a digest, a delta's bad
    /// chunk or index (header: "a bad chunk or index: VERIFY_FAILED").
    #[test]
    fn verify_failures_are_verify_failed() {
        let digest = FetchError::DigestMismatch {
            method: iot_ota_core::SignMethod::Md5,
            expected: "a".into(),
            actual: "b".into(),
        };
        let delta = FetchError::DeltaMismatch("chunk 3 is not the index's".into());
        assert_eq!(fetch_error_code(&digest), IOT_OTA_ERR_VERIFY_FAILED);
        assert_eq!(fetch_error_code(&delta), IOT_OTA_ERR_VERIFY_FAILED);
        assert_eq!(
            fetch_error_code(&FetchError::Storage("full".into())),
            IOT_OTA_ERR_FETCH_FAILED
        );
    }

    #[test]
    fn copies_strings_with_their_nul() {
        let mut dst = [1 as c_char; 4];
        assert_eq!(copy_str(&mut dst, "abc"), Ok(()));
        assert_eq!(dst, [97, 98, 99, 0]);
        assert_eq!(copy_str(&mut dst, "abcd"), Err(IOT_OTA_ERR_STR_TOO_LONG));
    }

    #[test]
    fn fetch_errors_map_to_codes() {
        let digest = FetchError::DigestMismatch {
            method: iot_ota_core::SignMethod::Md5,
            expected: "a".into(),
            actual: "b".into(),
        };
        assert_eq!(fetch_error_code(&digest), IOT_OTA_ERR_VERIFY_FAILED);
        let short = FetchError::Truncated {
            expected: 2,
            received: 1,
        };
        assert_eq!(fetch_error_code(&short), IOT_OTA_ERR_FETCH_FAILED);
    }
}
