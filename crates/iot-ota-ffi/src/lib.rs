//! The C API of the IoT OTA device SDK: `libiot_ota.a` / `libiot_ota.so`.
//!
//! A drop-in library for C programs written against the vendor guide's OTA
//! interface (`docs/device-ota-guide.zh.md`): its eight `iot_ota_*`
//! functions with exactly its signatures, the `iot_mqtt_*` instance those
//! functions take their `mqtt_client` from, and a few extras a C program
//! needs (the upgrade's details, the digest check, sizes, error texts). The
//! headers are checked in under `include/`; `docs/c-api.md` maps every
//! function to what it does here.
//!
//! # How it is built
//!
//! The C API is single-threaded and driven by the caller's yield calls, so it
//! spawns no thread of its own for the protocol: each MQTT instance owns a
//! current-thread tokio runtime, and its MQTT event loop runs as a task on
//! it. The task (and so keep-alives, incoming commands and outgoing reports)
//! makes progress exactly while the application is inside a call that drives
//! the runtime: `iot_mqtt_connect`, `iot_mqtt_yield`, `iot_ota_fetch_yield`
//! and `iot_mqtt_destroy`. A long download therefore keeps the MQTT
//! connection alive by itself, and no callback ever runs behind the
//! application's back: callbacks are called from those same calls, after the
//! runtime has stopped, so they may call any function of this API.
//!
//! Everything protocol-related is the one engine of `iot-ota-core`, wired to
//! MQTT by `iot_ota_device::Session` and to HTTP(S) by
//! `iot_ota_device::Download`: the C API, the async Rust API and the example
//! devices behave the same on the wire.
//!
//! # Safety at the boundary (after rustls-ffi)
//!
//! - Every exported function runs inside a panic boundary
//!   ([`std::panic::catch_unwind`]); a panic becomes an error return
//!   (`IOT_OTA_ERR_GENERAL`, or NULL from a constructor) and never unwinds
//!   into C.
//! - Handles are never dereferenced: a handle is the address of an object
//!   kept alive in a registry of live handles, one registry per type. A NULL,
//!   stale (destroyed), foreign or wrong-type handle is simply not found and
//!   the call returns `IOT_OTA_ERR_INVALID_PARAM`. (A handle destroyed and then
//!   reused after the allocator gave its address to a new object of the same
//!   type cannot be told apart; that is the caller's use-after-free.)
//! - Strings are checked for NULL and UTF-8 (`IOT_OTA_ERR_INVALID_PARAM`) and
//!   copied: the library keeps no pointer the caller gave it, except the
//!   callbacks' `user_data`, which it only hands back.
//!
//! This is the only crate of the workspace with `unsafe` code: reading C
//! strings, buffers and structs, writing out-parameters, and calling C
//! callbacks.
#![deny(missing_docs)]

use std::ffi::{c_char, c_int, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

pub mod mqtt;
pub mod ota;
mod registry;

pub use mqtt::*;
pub use ota::*;

// ---- iot_ota_err_t (PROTOCOL.md) ----

/// Success.
pub const IOT_OTA_ERR_NONE: c_int = 0;
/// A failure with no more specific code (also: a panic caught at the boundary).
pub const IOT_OTA_ERR_GENERAL: c_int = -1;
/// A NULL, stale or wrong-type handle; a NULL pointer; a zero length; a
/// string that is not UTF-8 or not a valid value; a value out of range.
pub const IOT_OTA_ERR_INVALID_PARAM: c_int = -2;
/// Not possible now: no upgrade to fetch, the download is over and complete,
/// the digest cannot be checked before the end, the MQTT instance is not connected yet.
pub const IOT_OTA_ERR_INVALID_STATE: c_int = -3;
/// A string is longer than allowed (a version above 100 characters) or than
/// the caller's buffer.
pub const IOT_OTA_ERR_STR_TOO_LONG: c_int = -4;
/// The download failed (transport, HTTP status, wrong length); already reported.
pub const IOT_OTA_ERR_FETCH_FAILED: c_int = -5;
/// Out of memory or resources (the runtime could not be created).
pub const IOT_OTA_ERR_NOMEM: c_int = -6;
/// The MQTT connection failed, is down, or its instance was destroyed.
pub const IOT_OTA_ERR_MQTT_FAILED: c_int = -7;
/// Added (below -7, as PROTOCOL.md allows): nothing happened within the time
/// allowed (`iot_mqtt_connect`).
pub const IOT_OTA_ERR_TIMEOUT: c_int = -8;
/// Added: the downloaded image's digest is not the command's `sign`
/// (VERIFY_FAILED was reported); returned by `iot_ota_fetch_yield` and
/// `iot_ota_check_firmware`.
pub const IOT_OTA_ERR_VERIFY_FAILED: c_int = -9;

/// The text of an error code, as a static NUL-terminated string.
pub(crate) fn error_text(err: c_int) -> &'static CStr {
    match err {
        IOT_OTA_ERR_NONE => c"success",
        IOT_OTA_ERR_GENERAL => c"general error",
        IOT_OTA_ERR_INVALID_PARAM => c"invalid parameter",
        IOT_OTA_ERR_INVALID_STATE => c"invalid state",
        IOT_OTA_ERR_STR_TOO_LONG => c"string too long",
        IOT_OTA_ERR_FETCH_FAILED => c"firmware download failed",
        IOT_OTA_ERR_NOMEM => c"out of memory",
        IOT_OTA_ERR_MQTT_FAILED => c"MQTT connection failed",
        IOT_OTA_ERR_TIMEOUT => c"timed out",
        IOT_OTA_ERR_VERIFY_FAILED => c"firmware digest mismatch",
        _ => c"unknown error",
    }
}

/// `const char *iot_ota_strerror(int err)`: the text of an `iot_ota_err_t`
/// (any other value gives "unknown error"). Never NULL; static, never freed.
#[no_mangle]
pub extern "C" fn iot_ota_strerror(err: c_int) -> *const c_char {
    guard(c"unknown error".as_ptr(), || error_text(err).as_ptr())
}

/// Runs `f` inside the panic boundary: a panic becomes `on_panic`.
pub(crate) fn guard<R>(on_panic: R, f: impl FnOnce() -> R) -> R {
    // The state behind every handle stays usable after a panic: locks are
    // taken with poison recovery, and every engine call is a few field
    // updates. So asserting unwind safety is sound here.
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(on_panic)
}

/// Reads a required C string: NULL or non-UTF-8 is `IOT_OTA_ERR_INVALID_PARAM`.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string that stays valid and
/// unchanged for `'a`.
pub(crate) unsafe fn c_str<'a>(ptr: *const c_char) -> Result<&'a str, c_int> {
    if ptr.is_null() {
        return Err(IOT_OTA_ERR_INVALID_PARAM);
    }
    // SAFETY: non-NULL, and NUL-terminated and valid for 'a by the caller's contract.
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str().map_err(|_| IOT_OTA_ERR_INVALID_PARAM)
}

/// Reads an optional C string: NULL is `None`; non-UTF-8 is `IOT_OTA_ERR_INVALID_PARAM`.
///
/// # Safety
/// As [`c_str`].
pub(crate) unsafe fn opt_c_str<'a>(ptr: *const c_char) -> Result<Option<&'a str>, c_int> {
    if ptr.is_null() {
        Ok(None)
    } else {
        // SAFETY: forwarded contract.
        unsafe { c_str(ptr) }.map(Some)
    }
}

/// Locks a mutex, recovering from poisoning (see [`guard`]).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_own_text() {
        let codes = [
            IOT_OTA_ERR_NONE,
            IOT_OTA_ERR_GENERAL,
            IOT_OTA_ERR_INVALID_PARAM,
            IOT_OTA_ERR_INVALID_STATE,
            IOT_OTA_ERR_STR_TOO_LONG,
            IOT_OTA_ERR_FETCH_FAILED,
            IOT_OTA_ERR_NOMEM,
            IOT_OTA_ERR_MQTT_FAILED,
            IOT_OTA_ERR_TIMEOUT,
            IOT_OTA_ERR_VERIFY_FAILED,
        ];
        let texts: std::collections::HashSet<_> = codes.iter().map(|&c| error_text(c)).collect();
        assert_eq!(texts.len(), codes.len());
        assert_eq!(error_text(-100), c"unknown error");
        assert_eq!(error_text(1), c"unknown error");
    }

    #[test]
    fn guard_turns_panics_into_values() {
        assert_eq!(guard(-1, || 5), 5);
        assert_eq!(guard(-1, || -> i32 { panic!("boom") }), -1);
    }

    #[test]
    fn c_strings() {
        // SAFETY: literals are NUL-terminated and static.
        unsafe {
            assert_eq!(c_str(std::ptr::null()), Err(IOT_OTA_ERR_INVALID_PARAM));
            assert_eq!(c_str(c"abc".as_ptr()), Ok("abc"));
            assert_eq!(c_str(c"\xff\xfe".as_ptr()), Err(IOT_OTA_ERR_INVALID_PARAM));
            assert_eq!(opt_c_str(std::ptr::null()), Ok(None));
        }
    }
}
