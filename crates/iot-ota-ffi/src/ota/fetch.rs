//! The download: the guide's `iot_ota_fetch_yield`, `iot_ota_get_firmware_info`
//! and the state and size getters, and the extras `iot_ota_fetch_to_file`,
//! `iot_ota_fetch_resume`, `iot_ota_get_firmware` and the digest.

use super::*;

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
        let download = match &st.delta_base {
            Some(base) => download.delta_from(base),
            None => download,
        };
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

/// `int iot_ota_set_delta_base(void *handle, const char *base_path)`: the
/// image the device runs, the base of delta updates for
/// `iot_ota_fetch_to_file` (NULL: none). Returns 0;
/// `IOT_OTA_ERR_INVALID_PARAM` for a bad handle, or a path that is empty
/// or not UTF-8.
///
/// # Safety
/// `base_path` is NULL or a NUL-terminated string (copied).
#[no_mangle]
pub unsafe extern "C" fn iot_ota_set_delta_base(
    handle: *mut c_void,
    base_path: *const c_char,
) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        let h = match live(handle) {
            Ok(h) => h,
            Err(e) => return e,
        };
        let base = if base_path.is_null() {
            None
        } else {
            // SAFETY: the caller's contract.
            match unsafe { c_str(base_path) } {
                Ok(p) if !p.is_empty() => Some(std::path::PathBuf::from(p)),
                _ => return IOT_OTA_ERR_INVALID_PARAM,
            }
        };
        h.state().delta_base = base;
        IOT_OTA_ERR_NONE
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
