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
use iot_ota_device::http::HttpOptions;
use iot_ota_device::install::Application;
use iot_ota_device::lifecycle::{Installed, Lifecycle, Next, Resumed, Start};
use iot_ota_device::{Download, DownloadOptions, ReadAhead, ReadAheadPoll, Session};

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

/// The error code of a failed download.
fn fetch_error_code(e: &FetchError) -> c_int {
    match e {
        FetchError::DigestMismatch { .. } => IOT_OTA_ERR_VERIFY_FAILED,
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

/// `int iot_ota_is_fetching(void *handle)`: 1 while an accepted upgrade is
/// downloading (state fetching), else 0; `IOT_OTA_ERR_INVALID_PARAM` for a bad handle.
///
/// # Safety
/// Any pointer value is accepted; only live handles are used.
#[no_mangle]
pub unsafe extern "C" fn iot_ota_is_fetching(handle: *mut c_void) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || match OTAS.get(handle) {
        Some(h) => c_int::from(h.fetch_state() == FetchState::Fetching),
        None => IOT_OTA_ERR_INVALID_PARAM,
    })
}

/// `int iot_ota_fetch_finish(void *handle)`: 1 once the download has ended
/// (state fetched: complete, or failed), else 0; `IOT_OTA_ERR_INVALID_PARAM`
/// for a bad handle. `iot_ota_check_firmware` tells which way it ended.
///
/// # Safety
/// Any pointer value is accepted; only live handles are used.
#[no_mangle]
pub unsafe extern "C" fn iot_ota_fetch_finish(handle: *mut c_void) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || match OTAS.get(handle) {
        Some(h) => c_int::from(h.fetch_state() == FetchState::Fetched),
        None => IOT_OTA_ERR_INVALID_PARAM,
    })
}

/// `int iot_ota_fetch_yield(void *handle, char *buf, uint32_t buf_len, uint32_t timeout_s)`:
/// downloads the next bytes of the firmware into `buf`, waiting at most
/// `timeout_s` seconds, while the MQTT connection is kept serviced.
///
/// Returns the bytes copied (> 0); 0 when nothing arrived within `timeout_s`
/// (the download goes on: call again); a negative value once the download
/// has ended: `IOT_OTA_ERR_INVALID_STATE` when it is over and complete (or no
/// upgrade has arrived), `IOT_OTA_ERR_VERIFY_FAILED` after a digest mismatch,
/// `IOT_OTA_ERR_FETCH_FAILED` after any other failure (the failure status is
/// already reported); `IOT_OTA_ERR_INVALID_PARAM` for a bad handle, a NULL
/// `buf` or a zero `buf_len`. The call that returns the last bytes has
/// already verified size and digest.
///
/// # Safety
/// `buf` is NULL or valid for writes of `buf_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn iot_ota_fetch_yield(
    handle: *mut c_void,
    buf: *mut c_char,
    buf_len: u32,
    timeout_s: u32,
) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        let h = match live(handle) {
            Ok(h) => h,
            Err(e) => return e,
        };
        if buf.is_null() || buf_len == 0 {
            return IOT_OTA_ERR_INVALID_PARAM;
        }
        // The count is returned as an int: never copy more than fits.
        let len = (buf_len as usize).min(c_int::MAX as usize);
        // SAFETY: non-NULL and writable for buf_len >= len bytes, by the caller's contract.
        let buf = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) };
        let timeout = Duration::from_secs(u64::from(timeout_s));
        let mut st = h.state();
        let result = h.fetch(&mut st, buf, timeout);
        drop(st);
        // Callbacks of what arrived meanwhile, with no lock held.
        h.mqtt.deliver();
        result
    })
}

impl OtaHandle {
    /// `iot_ota_fetch_yield`'s work: bytes already hashed are copied out at
    /// once; otherwise it waits, keeping the MQTT connection serviced, until
    /// some arrive or `timeout` passes. The request itself lives on the
    /// read-ahead's reader: a timeout here leaves it running.
    fn fetch(&self, st: &mut OtaState, buf: &mut [u8], timeout: Duration) -> c_int {
        let deadline = Instant::now() + timeout;
        if let Some(Job::Waiting(_)) = st.download {
            let Some(Job::Waiting(download)) = st.download.take() else {
                unreachable!("matched above")
            };
            let shared = self.mqtt.shared_weak();
            let wake = Arc::new(move || {
                if let Some(shared) = shared.upgrade() {
                    shared.wake();
                }
            });
            match download.read_ahead(READ_AHEAD_BLOCK, wake) {
                Ok(r) => st.download = Some(Job::Running(r)),
                Err(e) => {
                    log::error!("fetch: {e}");
                    return IOT_OTA_ERR_GENERAL;
                }
            }
        }
        let Some(Job::Running(ahead)) = st.download.as_mut() else {
            return IOT_OTA_ERR_INVALID_STATE;
        };
        loop {
            match ahead.poll_read(buf) {
                ReadAheadPoll::Data(n) => {
                    if st.serviced.map_or(true, |t| t.elapsed() >= SERVICE_EVERY) {
                        self.mqtt.block_on(tokio::task::yield_now());
                        st.serviced = Some(Instant::now());
                    }
                    return c_int::try_from(n).unwrap_or(c_int::MAX);
                }
                ReadAheadPoll::Complete(_) => return IOT_OTA_ERR_INVALID_STATE,
                ReadAheadPoll::Failed(e) => return fetch_error_code(&e),
                ReadAheadPoll::Pending => {
                    // The next block of a fast download is a moment away.
                    let left = deadline.saturating_duration_since(Instant::now());
                    if ahead.wait(left.min(QUICK_WAIT)) {
                        continue;
                    }
                    let shared = self.mqtt.shared.clone();
                    let expired = self.mqtt.block_on(async move {
                        let deadline = tokio::time::Instant::from_std(deadline);
                        tokio::time::timeout_at(deadline, shared.notified())
                            .await
                            .is_err()
                    });
                    st.serviced = Some(Instant::now());
                    if expired {
                        // One more look: bytes may have come with the deadline.
                        return match ahead.poll_read(buf) {
                            ReadAheadPoll::Data(n) => c_int::try_from(n).unwrap_or(c_int::MAX),
                            ReadAheadPoll::Complete(_) => IOT_OTA_ERR_INVALID_STATE,
                            ReadAheadPoll::Failed(e) => fetch_error_code(&e),
                            ReadAheadPoll::Pending => 0,
                        };
                    }
                }
            }
        }
    }
}

/// `int iot_ota_fetch_to_file(void *handle, const char *path)`: downloads
/// the whole image of the current upgrade to `path`, verified, for a
/// program that only wants the file: the library's own pipeline
/// (receiving, hashing and writing overlap on its threads, over its own
/// buffers), as fast as the Rust API's `download_to`, where
/// `iot_ota_fetch_yield` copies every chunk into the caller's buffer.
///
/// Blocks until the download has ended, keeping the MQTT connection
/// serviced and reporting progress as `iot_ota_fetch_yield` does; the
/// callbacks of what arrived meanwhile run before it returns. The bytes go
/// to `path.part`, which becomes `path` (synced, renamed) only once size and
/// digest check out; a download cut by a crash or the network resumes from
/// `path.part` at the next call for the same firmware (its `path.part.meta`
/// names it); bad data or a write error (a full disk: FLASH_FAILED with the
/// reason) removes both. Afterwards the instance is as after the last
/// `iot_ota_fetch_yield` (state fetched, `iot_ota_check_firmware`,
/// `iot_ota_install_done`); `iot_ota_get_digest` and `iot_ota_fetched_size`
/// give the verified digest and size (empty and 0 after a failure).
///
/// Returns 0 when `path` holds the verified image; `IOT_OTA_ERR_VERIFY_FAILED`
/// after a digest mismatch, `IOT_OTA_ERR_FETCH_FAILED` after any other
/// failure (both already reported); `IOT_OTA_ERR_INVALID_STATE` with no
/// upgrade, or once its fetch has started; `IOT_OTA_ERR_INVALID_PARAM` for
/// a bad handle or path.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string (copied).
#[no_mangle]
pub unsafe extern "C" fn iot_ota_fetch_to_file(handle: *mut c_void, path: *const c_char) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        let h = match live(handle) {
            Ok(h) => h,
            Err(e) => return e,
        };
        // SAFETY: the caller's contract.
        let path = match unsafe { c_str(path) } {
            Ok(p) if !p.is_empty() => std::path::PathBuf::from(p),
            _ => return IOT_OTA_ERR_INVALID_PARAM,
        };
        let mut st = h.state();
        let download = match st.download.take() {
            Some(Job::Waiting(d)) => d,
            other => {
                st.download = other;
                return IOT_OTA_ERR_INVALID_STATE;
            }
        };
        let firmware = download.firmware().clone();
        let outcome = {
            let _context = h.mqtt.rt.enter();
            h.mqtt.block_on(download.download_to(&path))
        }
        .map_err(|e| match e {
            iot_ota_device::Error::Fetch(f) => f,
            other => FetchError::Storage(other.to_string()),
        });
        let code = match &outcome {
            Ok(_) => IOT_OTA_ERR_NONE,
            Err(e) => fetch_error_code(e),
        };
        st.download = Some(Job::Written(Written { firmware, outcome }));
        drop(st);
        h.mqtt.deliver();
        code
    })
}

/// `int iot_ota_get_firmware_info(void *handle, const char *product_key,
/// const char *identifier, const char *version)`: asks the platform for
/// firmware `version` of this device's product. The reply arrives on
/// `MQTT_SUB_TYPE_OTA_FIRMWARE_GET_INF_REPLY` (seen by its callback, during a
/// yield); when it offers the firmware and no upgrade is running, the
/// download starts as if a command had brought it (`iot_ota_is_fetching`
/// becomes 1). A 404 reply starts nothing; no reply within 10 s neither.
///
/// Returns the request's id (> 0, the guide's "packageid", the `msgId` of
/// the get and of its reply), or exactly -1 (`IOT_OTA_ERR_GENERAL`) on every
/// failure, as the guide says: a bad handle, NULL or non-UTF-8 strings, a
/// `product_key` / `identifier` that is not this instance's device, an empty
/// or malformed version or one above 100 bytes, the MQTT instance gone. The
/// library keeps no last error; the reason goes to the `log` facade (warn).
///
/// # Safety
/// The strings are NULL or NUL-terminated (copied).
#[no_mangle]
pub unsafe extern "C" fn iot_ota_get_firmware_info(
    handle: *mut c_void,
    product_key: *const c_char,
    identifier: *const c_char,
    version: *const c_char,
) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        let result = (|| {
            let h = live(handle)?;
            // SAFETY: the caller's contract on the three strings.
            let (pk, id) = unsafe { (c_str(product_key)?, c_str(identifier)?) };
            // SAFETY: as above.
            let version = unsafe { version_arg(version) }?;
            if pk != h.product_key || id != h.device_name {
                return Err(IOT_OTA_ERR_INVALID_PARAM);
            }
            let msg_id = h
                .session
                .with(|ota| ota.request_firmware_info(version, Instant::now()))
                .map_err(|_| IOT_OTA_ERR_INVALID_PARAM)?;
            // The engine numbers its messages 1, 2, ...
            msg_id
                .parse::<u64>()
                .map(|n| c_int::try_from(n).unwrap_or(c_int::MAX))
                .map_err(|_| IOT_OTA_ERR_GENERAL)
        })();
        // The guide: the packageid on success, -1 on failure.
        result.unwrap_or_else(|e| {
            log::warn!(
                "iot_ota_get_firmware_info: {}",
                error_text(e).to_string_lossy()
            );
            IOT_OTA_ERR_GENERAL
        })
    })
}

// ---- extras ----

/// `int iot_ota_fetch_state(void *handle)`: the download state as an
/// `iot_ota_fetch_state_t` (uninit 0, init 1, fetching 2, fetched 3), or
/// `IOT_OTA_ERR_INVALID_PARAM` for a bad handle.
///
/// # Safety
/// Any pointer value is accepted; only live handles are used.
#[no_mangle]
pub unsafe extern "C" fn iot_ota_fetch_state(handle: *mut c_void) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || match OTAS.get(handle) {
        Some(h) => h.fetch_state() as c_int,
        None => IOT_OTA_ERR_INVALID_PARAM,
    })
}

/// `int64_t iot_ota_fetch_resume(void *handle, const char *part_path)`: the
/// application keeps the image in `part_path` as it fetches it; after a
/// crash some of it may be there already. Call this after an upgrade has
/// arrived and before the first `iot_ota_fetch_yield`. Returns how many
/// bytes of the file to keep (truncate it there and append what the fetch
/// returns): the file's length rounded down to 4 KiB when its meta file
/// (`part_path` + `.meta`, written by this call) names the same firmware,
/// else 0. The kept bytes are hashed again (on the library's download
/// thread) and the rest is asked for with a Range request;
/// `iot_ota_fetched_size` counts them. The meta file is removed once the
/// image is verified, or has failed in a way no resume would mend.
///
/// Returns the bytes to keep (>= 0); `IOT_OTA_ERR_INVALID_STATE` with no
/// upgrade or once its fetch has started; `IOT_OTA_ERR_INVALID_PARAM` for a
/// bad handle or path; `IOT_OTA_ERR_GENERAL` when the meta file cannot be
/// written.
///
/// # Safety
/// `part_path` is NULL or a NUL-terminated string (copied).
#[no_mangle]
pub unsafe extern "C" fn iot_ota_fetch_resume(
    handle: *mut c_void,
    part_path: *const c_char,
) -> i64 {
    guard(i64::from(IOT_OTA_ERR_GENERAL), || {
        let r = (|| {
            let h = live(handle)?;
            // SAFETY: the caller's contract.
            let path = unsafe { c_str(part_path) }?;
            if path.is_empty() {
                return Err(IOT_OTA_ERR_INVALID_PARAM);
            }
            let mut st = h.state();
            let Some(Job::Waiting(download)) = st.download.as_mut() else {
                return Err(IOT_OTA_ERR_INVALID_STATE);
            };
            download.resume_part(path).map_err(|e| {
                log::error!("iot_ota_fetch_resume: {e}");
                IOT_OTA_ERR_GENERAL
            })
        })();
        match r {
            Ok(kept) => i64::try_from(kept).unwrap_or(i64::MAX),
            Err(e) => i64::from(e),
        }
    })
}

/// `int iot_ota_get_firmware(void *handle, iot_ota_firmware_t *info)`: copies
/// the details of the current (or last) upgrade into `*info`: version, URL,
/// size, sign, sign method and policy. Returns 0;
/// `IOT_OTA_ERR_INVALID_STATE` when no upgrade has arrived;
/// `IOT_OTA_ERR_INVALID_PARAM` for a bad handle or a NULL `info`.
///
/// # Safety
/// `info` is NULL or valid for writing one `iot_ota_firmware_t`.
#[no_mangle]
pub unsafe extern "C" fn iot_ota_get_firmware(
    handle: *mut c_void,
    info: *mut IotOtaFirmware,
) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        code((|| {
            let h = OTAS.get(handle).ok_or(IOT_OTA_ERR_INVALID_PARAM)?;
            if info.is_null() {
                return Err(IOT_OTA_ERR_INVALID_PARAM);
            }
            let st = h.state();
            let fw = st
                .download
                .as_ref()
                .ok_or(IOT_OTA_ERR_INVALID_STATE)?
                .firmware();
            let mut out = IotOtaFirmware {
                version: [0; IOT_OTA_VERSION_MAX + 1],
                url: [0; IOT_OTA_URL_MAX + 1],
                sign: [0; IOT_OTA_SIGN_MAX + 1],
                sign_method: [0; 16],
                policy: [0; 16],
                size: fw.size.unwrap_or(0),
            };
            copy_str(&mut out.version, &fw.version)?;
            copy_str(&mut out.url, &fw.url)?;
            copy_str(&mut out.sign, &fw.sign)?;
            copy_str(&mut out.sign_method, fw.sign_method.wire_name())?;
            copy_str(&mut out.policy, fw.policy.map_or("", |p| p.as_str()))?;
            // SAFETY: non-NULL and writable, by the caller's contract.
            unsafe { info.write(out) };
            Ok(IOT_OTA_ERR_NONE)
        })())
    })
}

/// `int iot_ota_check_firmware(void *handle)`: the digest check after the
/// fetch. 0 when the download is complete and its size and digest match the
/// command's; `IOT_OTA_ERR_VERIFY_FAILED` when the digest did not match;
/// `IOT_OTA_ERR_FETCH_FAILED` when the download failed otherwise;
/// `IOT_OTA_ERR_INVALID_STATE` before the end (or with no upgrade);
/// `IOT_OTA_ERR_INVALID_PARAM` for a bad handle.
///
/// # Safety
/// Any pointer value is accepted; only live handles are used.
#[no_mangle]
pub unsafe extern "C" fn iot_ota_check_firmware(handle: *mut c_void) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        let Some(h) = OTAS.get(handle) else {
            return IOT_OTA_ERR_INVALID_PARAM;
        };
        let st = h.state();
        match st.download.as_ref().and_then(|d| d.outcome()) {
            None => IOT_OTA_ERR_INVALID_STATE,
            Some(Ok(_)) => IOT_OTA_ERR_NONE,
            Some(Err(e)) => fetch_error_code(&e),
        }
    })
}

/// `int iot_ota_get_digest(void *handle, char *buf, uint32_t buf_len)`: the
/// digest (lowercase hex, the command's method) of the bytes received so
/// far, NUL-terminated into `buf`. Returns its length (32 or 64);
/// `IOT_OTA_ERR_STR_TOO_LONG` when `buf_len` cannot hold it and the NUL;
/// `IOT_OTA_ERR_INVALID_STATE` with no upgrade; `IOT_OTA_ERR_INVALID_PARAM`
/// for a bad handle or a NULL `buf`.
///
/// # Safety
/// `buf` is NULL or valid for writes of `buf_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn iot_ota_get_digest(
    handle: *mut c_void,
    buf: *mut c_char,
    buf_len: u32,
) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        code((|| {
            let h = OTAS.get(handle).ok_or(IOT_OTA_ERR_INVALID_PARAM)?;
            if buf.is_null() {
                return Err(IOT_OTA_ERR_INVALID_PARAM);
            }
            let st = h.state();
            let hex = st
                .download
                .as_ref()
                .ok_or(IOT_OTA_ERR_INVALID_STATE)?
                .digest_hex();
            // SAFETY: non-NULL and writable for buf_len bytes, by the caller's contract.
            let out = unsafe { std::slice::from_raw_parts_mut(buf, buf_len as usize) };
            copy_str(out, &hex)?;
            Ok(c_int::try_from(hex.len()).unwrap_or(c_int::MAX))
        })())
    })
}

/// `int64_t iot_ota_fetched_size(void *handle)`: bytes of the current
/// download received so far (0 with no upgrade), or `IOT_OTA_ERR_INVALID_PARAM`.
///
/// # Safety
/// Any pointer value is accepted; only live handles are used.
#[no_mangle]
pub unsafe extern "C" fn iot_ota_fetched_size(handle: *mut c_void) -> i64 {
    guard(i64::from(IOT_OTA_ERR_GENERAL), || match OTAS.get(handle) {
        Some(h) => h
            .state()
            .download
            .as_ref()
            .map_or(0, |d| i64::try_from(d.fetched_size()).unwrap_or(i64::MAX)),
        None => i64::from(IOT_OTA_ERR_INVALID_PARAM),
    })
}

/// `int64_t iot_ota_file_size(void *handle)`: the firmware's total size in
/// bytes (the command's `size`, else the server's length once known; 0 when
/// unknown or with no upgrade), or `IOT_OTA_ERR_INVALID_PARAM`.
///
/// # Safety
/// Any pointer value is accepted; only live handles are used.
#[no_mangle]
pub unsafe extern "C" fn iot_ota_file_size(handle: *mut c_void) -> i64 {
    guard(i64::from(IOT_OTA_ERR_GENERAL), || match OTAS.get(handle) {
        Some(h) => h
            .state()
            .download
            .as_ref()
            .and_then(|d| d.file_size())
            .map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX)),
        None => i64::from(IOT_OTA_ERR_INVALID_PARAM),
    })
}

// ---- install, reboot, confirm (PROTOCOL.md) ----

/// `iot_ota_boot_t`: nothing is pending: inform the running version.
pub const IOT_OTA_BOOT_IDLE: c_int = 0;
/// The upgrade to the running version is committed: SUCCESS (4) 100 goes
/// out before the inform. Mark your slot good if your bootloader needs it.
pub const IOT_OTA_BOOT_COMMITTED: c_int = 1;
/// The upgrade was rolled back: UPGRADE_FAILED (-1) `rolled back: ...` goes
/// out before the inform of the running (old) version.
pub const IOT_OTA_BOOT_ROLLED_BACK: c_int = 2;
/// Reboot now: the installed image has not booted yet.
pub const IOT_OTA_BOOT_REBOOT: c_int = 3;
/// The running new image is unhealthy: switch back to the old slot and
/// reboot; the next start reports the rollback.
pub const IOT_OTA_BOOT_ROLL_BACK: c_int = 4;
/// A download or install was cut off: the upgrade is the current one again
/// (state fetching): fetch it (`iot_ota_fetch_resume` keeps your part
/// file's bytes) and install it.
pub const IOT_OTA_BOOT_RESUMED: c_int = 5;

/// The code of a settled start.
fn boot_code(start: &Start) -> c_int {
    match (&start.next, &start.report) {
        (Next::Rebooting, _) => IOT_OTA_BOOT_REBOOT,
        (Next::RollingBack, _) => IOT_OTA_BOOT_ROLL_BACK,
        (_, Some(r)) if r.status == Status::Success => IOT_OTA_BOOT_COMMITTED,
        (_, Some(_)) => IOT_OTA_BOOT_ROLLED_BACK,
        (Next::Resume(_) | Next::Install(_), None) => IOT_OTA_BOOT_RESUMED,
        (Next::Idle, None) => IOT_OTA_BOOT_IDLE,
    }
}

/// `int iot_ota_set_state_dir(void *handle, const char *state_dir)`: keeps
/// the upgrade journal and the security counter in `state_dir` (created if
/// missing). Call once, before `iot_ota_boot_confirm`. Returns 0;
/// `IOT_OTA_ERR_INVALID_PARAM` for a bad handle or path;
/// `IOT_OTA_ERR_INVALID_STATE` when already set; `IOT_OTA_ERR_GENERAL` when
/// the directory cannot be made.
///
/// # Safety
/// `state_dir` is NULL or a NUL-terminated string (copied).
#[no_mangle]
pub unsafe extern "C" fn iot_ota_set_state_dir(
    handle: *mut c_void,
    state_dir: *const c_char,
) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        code((|| {
            let h = OTAS.get(handle).ok_or(IOT_OTA_ERR_INVALID_PARAM)?;
            // SAFETY: the caller's contract.
            let dir = unsafe { c_str(state_dir) }?;
            if dir.is_empty() {
                return Err(IOT_OTA_ERR_INVALID_PARAM);
            }
            let mut st = h.state();
            if st.life.is_some() {
                return Err(IOT_OTA_ERR_INVALID_STATE);
            }
            let life = Lifecycle::open(dir, Application::default()).map_err(|e| {
                log::error!("iot_ota_set_state_dir: {e}");
                IOT_OTA_ERR_GENERAL
            })?;
            let mut life = life;
            // Counter, acknowledgements and reports through this session.
            life.attach(h.session.clone());
            // The program informs its version itself (the vendor guide).
            life.set_inform_after_install(false);
            // With a journal, an accepted command's 200 waits for it.
            h.session.with(|ota| ota.set_ack_after_journal(true));
            // Downloads go there too (the part files): a command that
            // cannot fit is refused with 412.
            h.session.set_download_dir(Some(dir.into()));
            st.life = Some(life);
            Ok(IOT_OTA_ERR_NONE)
        })())
    })
}

/// `int iot_ota_boot_confirm(void *handle, const char *running_version, int healthy)`:
/// the start-up decision, at every start, after `iot_ota_set_state_dir` and
/// before `iot_ota_report_firmware_version`. `healthy` is 1 when the
/// application's own checks pass on this boot, 0 when not (used only when
/// this boot runs a new, unconfirmed image). Returns an `iot_ota_boot_t`;
/// `IOT_OTA_ERR_INVALID_STATE` without a state directory;
/// `IOT_OTA_ERR_INVALID_PARAM` for a bad handle or version;
/// `IOT_OTA_ERR_GENERAL` when the journal cannot be written.
///
/// # Safety
/// `running_version` is NULL or a NUL-terminated string (copied).
#[no_mangle]
pub unsafe extern "C" fn iot_ota_boot_confirm(
    handle: *mut c_void,
    running_version: *const c_char,
    healthy: c_int,
) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        code((|| {
            let h = live(handle)?;
            // SAFETY: the caller's contract.
            let running = unsafe { version_arg(running_version) }?;
            iot_ota_core::protocol::validate_version(running)
                .map_err(|_| IOT_OTA_ERR_INVALID_PARAM)?;
            let mut st = h.state();
            let life = st.life.as_mut().ok_or(IOT_OTA_ERR_INVALID_STATE)?;
            // The application reboots when told to (REBOOT, ROLL_BACK).
            *life.installer() = Application {
                running: running.to_owned(),
                reboot: true,
            };
            let mut verdict = |_: &str| {
                if healthy != 0 {
                    iot_ota_core::journal::Health::Good
                } else {
                    iot_ota_core::journal::Health::Bad(
                        "the application's health check failed".into(),
                    )
                }
            };
            let start = life.at_start(Some(&mut verdict)).map_err(|e| {
                log::error!("iot_ota_boot_confirm: {e}");
                IOT_OTA_ERR_GENERAL
            })?;
            if let Some(report) = &start.report {
                h.session
                    .with(|ota| ota.report_at_start(report.clone()))
                    .map_err(|_| IOT_OTA_ERR_INVALID_PARAM)?;
            }
            let code = boot_code(&start);
            if let Next::Resume(_) | Next::Install(_) = start.next {
                // The program writes the image itself, so it is fetched
                // again (its part file keeps the bytes it has). Refused now
                // (a key pinned since, a counter raised), the upgrade ends
                // here, reported and journaled by the flow.
                match life.resume(false) {
                    Ok(Resumed::Fetch(fw) | Resumed::Install(fw)) => h.start(&mut st, fw),
                    Err(e) => {
                        log::warn!("iot_ota_boot_confirm: {e}");
                        return Ok(IOT_OTA_BOOT_IDLE);
                    }
                }
            }
            Ok(code)
        })())
    })
}

/// `int iot_ota_trust_key(void *handle, const char *pem_path)`: pins the
/// public key in the PEM `PUBLIC KEY` file `pem_path` (Ed25519 or P-256).
/// From then on only firmware whose signed manifest a pinned, not revoked
/// key verifies is accepted (others: reply 412 and UPGRADE_FAILED), and
/// never one whose counter is below the device's security counter (kept
/// with `iot_ota_set_state_dir`). Returns 0; `IOT_OTA_ERR_INVALID_PARAM`
/// for a bad handle or path, or a file that is not such a key.
///
/// # Safety
/// `pem_path` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn iot_ota_trust_key(handle: *mut c_void, pem_path: *const c_char) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        code((|| {
            let h = OTAS.get(handle).ok_or(IOT_OTA_ERR_INVALID_PARAM)?;
            // SAFETY: the caller's contract.
            let path = unsafe { c_str(pem_path) }?;
            let key = std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|pem| iot_ota_core::manifest::PublicKey::from_pem(&pem))
                .map_err(|e| {
                    log::error!("iot_ota_trust_key {path}: {e}");
                    IOT_OTA_ERR_INVALID_PARAM
                })?;
            h.session.with(|ota| {
                let mut trust = ota.config().trust.clone();
                trust.keys.push(key);
                ota.set_trust(trust);
            });
            Ok(IOT_OTA_ERR_NONE)
        })())
    })
}

/// `int iot_ota_revoke_key(void *handle, const char *key_id)`: revokes a
/// key id (64 hex digits: the SHA-256 of its SubjectPublicKeyInfo); its
/// signatures no longer count, even when pinned. Returns 0;
/// `IOT_OTA_ERR_INVALID_PARAM` for a bad handle or id.
///
/// # Safety
/// `key_id` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn iot_ota_revoke_key(handle: *mut c_void, key_id: *const c_char) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        code((|| {
            let h = OTAS.get(handle).ok_or(IOT_OTA_ERR_INVALID_PARAM)?;
            // SAFETY: the caller's contract.
            let id = unsafe { c_str(key_id) }?;
            if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(IOT_OTA_ERR_INVALID_PARAM);
            }
            h.session.with(|ota| {
                let mut trust = ota.config().trust.clone();
                trust.revoked.push(id.to_ascii_lowercase());
                ota.set_trust(trust);
            });
            Ok(IOT_OTA_ERR_NONE)
        })())
    })
}

/// `int iot_ota_install_done(void *handle, int reboot)`: the application
/// has installed the verified image of the current upgrade. With `reboot`
/// 1, the journal says so and the call returns `IOT_OTA_BOOT_REBOOT`:
/// reboot into it; the next start's `iot_ota_boot_confirm` commits it.
/// With 0, the image runs at once (a file written, an application updated
/// in place): the upgrade is committed, SUCCESS (4) 100 is reported, and
/// the call returns `IOT_OTA_BOOT_COMMITTED`: inform the new version.
/// `IOT_OTA_ERR_INVALID_STATE` without a state directory or a verified
/// download; `IOT_OTA_ERR_INVALID_PARAM` for a bad handle;
/// `IOT_OTA_ERR_GENERAL` when the journal cannot be written.
///
/// # Safety
/// Any pointer value is accepted; only live handles are used.
#[no_mangle]
pub unsafe extern "C" fn iot_ota_install_done(handle: *mut c_void, reboot: c_int) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        code((|| {
            let h = live(handle)?;
            let mut st = h.state();
            let verified = st
                .download
                .as_ref()
                .filter(|d| matches!(d.outcome(), Some(Ok(_))))
                .map(|d| d.firmware().version.clone());
            let life = st.life.as_mut().ok_or(IOT_OTA_ERR_INVALID_STATE)?;
            // The journal must be this download's (not a stale one left by
            // a journal write that failed).
            let Some(version) = verified else {
                return Err(IOT_OTA_ERR_INVALID_STATE);
            };
            if life.journal().map(|j| j.target_version.as_str()) != Some(version.as_str()) {
                log::error!("iot_ota_install_done: the journal is not the upgrade to {version}");
                return Err(IOT_OTA_ERR_GENERAL);
            }
            let general = |e: iot_ota_device::Error| {
                log::error!("iot_ota_install_done: {e}");
                IOT_OTA_ERR_GENERAL
            };
            life.fetched(Ok(())).map_err(general)?;
            life.installer().running = h.session.version();
            life.installer().reboot = reboot != 0;
            let installed = life
                .install(std::path::Path::new(""), None, &mut |_| {})
                .map_err(general)?;
            match installed {
                Installed::Rebooting => Ok(IOT_OTA_BOOT_REBOOT),
                // Reported and informed by the flow.
                Installed::Settled(start) => Ok(boot_code(&start)),
            }
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
