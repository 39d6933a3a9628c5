//! Install, reboot, confirm (PROTOCOL.md): the state directory, the start-up
//! decision, the end of the program's own install, and the pinned keys.
//! Every step goes through the SDK's one flow (`iot_ota_device::lifecycle`).

use super::*;

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
