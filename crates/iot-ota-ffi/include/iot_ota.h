/*
 * iot_ota.h - device-side OTA (firmware upgrade) API of libiot_ota.
 *
 * The eight functions of the vendor guide (device-ota-guide), with exactly its
 * signatures, plus the extras a C program needs: the upgrade's details, the
 * digest check, the sizes, the state, the text of an error. See
 * docs/c-api.md for the mapping and the flow.
 *
 * The OTA declarations are available when DEVICE_OTA is defined (iot_config.h
 * defines it by default). The error codes and iot_ota_strerror() are always
 * declared: iot_mqtt.h returns them too.
 *
 * Threading: see iot_mqtt.h. An OTA instance is used from the thread that
 * uses its MQTT instance; nothing happens between calls.
 *
 * Ownership: iot_ota_init() returns an instance the caller owns and frees with
 * iot_ota_destroy(), before destroying its MQTT instance. Strings passed in
 * are copied; the caller keeps them. Buffers passed in are only written
 * during the call. Strings returned by iot_ota_strerror() are static.
 * NULL, destroyed or foreign handles are detected and rejected with
 * IOT_OTA_ERR_INVALID_PARAM (NULL from iot_ota_init(), -1 from
 * iot_ota_get_firmware_info()), never dereferenced; so are NULL pointers,
 * zero lengths and strings that are not UTF-8.
 */
#ifndef IOT_OTA_H
#define IOT_OTA_H

#include <stdint.h>

#include "iot_config.h"
#include "iot_mqtt.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Error codes returned by the API (the Alibaba IOT_OTA_Err_t values, then
 * our additions below -7). */
typedef enum {
    IOT_OTA_ERR_NONE = 0,
    IOT_OTA_ERR_GENERAL = -1,       /* other failure (also: an internal panic) */
    IOT_OTA_ERR_INVALID_PARAM = -2, /* bad handle, NULL pointer, zero length,
                                       non-UTF-8 string, value out of range */
    IOT_OTA_ERR_INVALID_STATE = -3, /* not possible now; from fetch_yield: the
                                       download is over and complete */
    IOT_OTA_ERR_STR_TOO_LONG = -4,  /* string longer than allowed / than the buffer */
    IOT_OTA_ERR_FETCH_FAILED = -5,  /* the download failed (reported) */
    IOT_OTA_ERR_NOMEM = -6,         /* out of memory or resources */
    IOT_OTA_ERR_MQTT_FAILED = -7,   /* MQTT connection failed, down, or destroyed */
    IOT_OTA_ERR_TIMEOUT = -8,       /* nothing within the time allowed */
    IOT_OTA_ERR_VERIFY_FAILED = -9  /* the image's digest is not the sign (reported) */
} iot_ota_err_t;

/* The text of an iot_ota_err_t value ("unknown error" for others).
 * Static; never NULL; never free it. */
const char *iot_ota_strerror(int err);

#ifdef DEVICE_OTA

/* Status reported by iot_ota_report_progress() (progress.status on the wire). */
typedef enum {
    IOT_OTA_STATUS_DOWNLOADING = 1,     /* progress: percent downloaded */
    IOT_OTA_STATUS_DOWNLOADED = 2,      /* downloaded and verified; 100 */
    IOT_OTA_STATUS_UPGRADING = 3,       /* progress: percent installed */
    IOT_OTA_STATUS_SUCCESS = 4,         /* installed; report the new version next; 100 */
    IOT_OTA_STATUS_UPGRADE_FAILED = -1, /* failed for another reason */
    IOT_OTA_STATUS_DOWNLOAD_FAILED = -2,
    IOT_OTA_STATUS_VERIFY_FAILED = -3,  /* digest check failed; 100 */
    IOT_OTA_STATUS_FLASH_FAILED = -4    /* writing the image failed */
} iot_ota_status_t;

/* Download states, from iot_ota_fetch_state(). */
typedef enum {
    IOT_OTA_FETCH_STATE_UNINIT = 0,   /* the MQTT instance has not connected yet */
    IOT_OTA_FETCH_STATE_INIT = 1,     /* ready; no upgrade yet */
    IOT_OTA_FETCH_STATE_FETCHING = 2, /* an accepted upgrade is downloading */
    IOT_OTA_FETCH_STATE_FETCHED = 3   /* the download has ended (complete or failed) */
} iot_ota_fetch_state_t;

#define IOT_OTA_VERSION_MAX 100
#define IOT_OTA_URL_MAX 2048
#define IOT_OTA_SIGN_MAX 64
#define IOT_OTA_DESC_MAX 256

/* The details of an upgrade, copied out by iot_ota_get_firmware().
 * Every string is NUL-terminated. */
typedef struct iot_ota_firmware {
    char version[IOT_OTA_VERSION_MAX + 1]; /* target firmware version */
    char url[IOT_OTA_URL_MAX + 1];         /* http:// or https:// URL */
    char sign[IOT_OTA_SIGN_MAX + 1];       /* expected digest, lowercase hex */
    char sign_method[16];                  /* "Md5" or "Sha256" */
    char policy[16];                       /* "standard", "silent", or "" (get reply) */
    uint64_t size;                         /* bytes; 0 when unknown */
} iot_ota_firmware_t;

/* ---- the guide's eight functions ---- */

/* 1. The OTA instance of device `device_name` of product `product_key` on the
 * MQTT instance `mqtt_client` (an iot_mqtt_t *). Subscribes to the device's
 * upgrade and get_reply topics (now if connected, else on connection, and
 * after every reconnect). Returns NULL when an argument is NULL, not UTF-8 or
 * not a valid identity (empty, '/', '+', '#', spaces), when mqtt_client is
 * not a live MQTT instance, or when that device already has an instance on it. */
void *iot_ota_init(const char *product_key, const char *device_name, void *mqtt_client);

/* 2. Frees the instance. A download in progress is cancelled and reported
 * DOWNLOAD_FAILED (sent by the next iot_mqtt_yield() or iot_mqtt_destroy()).
 * Returns 0, or (harmlessly) IOT_OTA_ERR_INVALID_PARAM for NULL or a stale handle. */
int iot_ota_destroy(void *handle);

/* 3. Reports a status and percent (0-100) for the current upgrade. SUCCESS or
 * a negative status ends the upgrade (a download still running is stopped
 * without a second report) and lets the next command in. Returns 0, or
 * IOT_OTA_ERR_INVALID_PARAM (bad handle, status not an iot_ota_status_t,
 * progress > 100), IOT_OTA_ERR_MQTT_FAILED (MQTT instance destroyed).
 * DOWNLOADING reports, DOWNLOADED and the download's failure reports are
 * sent by the library itself during iot_ota_fetch_yield(); its DOWNLOADING
 * percent counts the bytes handed to the application, so the two agree.
 * Within one status the platform never sees the percent go down: a lower
 * percent than the last report of that status is not sent. */
int iot_ota_report_progress(void *handle, iot_ota_status_t status, uint32_t progress);

/* 4. Reports the running firmware version: at every start and after every
 * upgrade (the platform judges success by it). Returns 0, or
 * IOT_OTA_ERR_INVALID_PARAM (bad handle; NULL, empty, non-UTF-8 or malformed
 * version), IOT_OTA_ERR_STR_TOO_LONG (over 100 bytes), IOT_OTA_ERR_MQTT_FAILED. */
int iot_ota_report_firmware_version(void *handle, const char *version);

/* 5. 1 while downloading (state fetching), 0 otherwise;
 * IOT_OTA_ERR_INVALID_PARAM for a bad handle. An accepted upgrade command (or
 * a firmware get reply, see 8) moves the state to fetching. */
int iot_ota_is_fetching(void *handle);

/* 6. 1 once the download has ended (state fetched, complete or failed:
 * iot_ota_check_firmware() tells which), 0 otherwise;
 * IOT_OTA_ERR_INVALID_PARAM for a bad handle. */
int iot_ota_fetch_finish(void *handle);

/* 7. Downloads the next bytes into buf (at most buf_len), waiting at most
 * timeout_s seconds, keeping the MQTT connection serviced meanwhile.
 * Returns the bytes copied (> 0); 0 when nothing arrived within timeout_s
 * (call again); a negative value once the download has ended:
 *   IOT_OTA_ERR_INVALID_STATE  over and complete, size and digest verified
 *                              (also: no upgrade has arrived);
 *   IOT_OTA_ERR_VERIFY_FAILED  the digest did not match (VERIFY_FAILED reported);
 *   IOT_OTA_ERR_FETCH_FAILED   any other failure (DOWNLOAD_FAILED reported);
 * and IOT_OTA_ERR_INVALID_PARAM for a bad handle, NULL buf or zero buf_len.
 * The call returning the last bytes has already verified them: the state
 * is fetched right after it. A new accepted command starts a new download
 * with fresh counters and digest.
 * timeout_s bounds this call only: a request still waiting for the server
 * carries on into the next call, and only the download's own timeouts
 * (connect and response head 10 s, 30 s without a byte, 3 resumes) end it
 * with IOT_OTA_ERR_FETCH_FAILED. The first call starts the download on a
 * thread of the library's (receive, then hash), which reads ahead into three
 * 48 KiB buffers: a call that finds bytes already hashed returns at once. */
int iot_ota_fetch_yield(void *handle, char *buf, uint32_t buf_len, uint32_t timeout_s);

/* 8. Asks the platform for firmware `version` of this device's product. The
 * reply comes on MQTT_SUB_TYPE_OTA_FIRMWARE_GET_INF_REPLY (its callback sees
 * it during a yield). When it offers the firmware and no upgrade is running,
 * the download starts as if a command had brought it; a 404 reply (or none
 * within 10 s) starts nothing. Returns the request's id (> 0, the guide's
 * "packageid": the msgId of the request and its reply), or exactly -1
 * (IOT_OTA_ERR_GENERAL), as the guide says, on every failure: bad handle,
 * NULL or non-UTF-8 string, product_key/identifier not this instance's
 * device, version empty, malformed or over 100 bytes, MQTT instance
 * destroyed. The library keeps no last error to tell these apart. */
int iot_ota_get_firmware_info(void *handle, const char *product_key, const char *identifier, const char *version);

/* ---- extras ---- */

/* iot_ota_report_progress() with a reason: desc (NULL or "" for none; UTF-8,
 * at most IOT_OTA_DESC_MAX bytes) goes to the platform as the report's desc,
 * e.g. why FLASH_FAILED: "writing fw.part: No space left on device".
 * Returns as iot_ota_report_progress(); also IOT_OTA_ERR_INVALID_PARAM for a
 * desc that is not UTF-8, IOT_OTA_ERR_STR_TOO_LONG above IOT_OTA_DESC_MAX. */
int iot_ota_report_status(void *handle, iot_ota_status_t status, uint32_t progress, const char *desc);

/* For a program that only wants the file: downloads the current upgrade's
 * whole image to path, verified, on the library's own pipeline and buffers
 * (as fast as the Rust API's download_to; iot_ota_fetch_yield copies every
 * chunk into yours). Call it instead of iot_ota_fetch_yield(). Blocks until
 * the download ends, with the MQTT connection serviced and progress reported;
 * callbacks run before it returns. Bytes go to path.part, renamed to path
 * (synced) once size and digest check out; a cut download resumes from
 * path.part at the next call for the same firmware; bad data or a write
 * error (full disk: FLASH_FAILED with the reason) removes it. Returns 0;
 * IOT_OTA_ERR_VERIFY_FAILED, IOT_OTA_ERR_FETCH_FAILED (already reported);
 * IOT_OTA_ERR_INVALID_STATE with no upgrade or once its fetch has started;
 * IOT_OTA_ERR_INVALID_PARAM for a bad handle or path. */
int iot_ota_fetch_to_file(void *handle, const char *path);

/* Delta updates: base_path is the image the device runs (a file, or a block
 * device such as /dev/mmcblk0p2). From then on, iot_ota_fetch_to_file() of
 * an upgrade whose command names a chunk index fetches only the chunks
 * base_path lacks (HTTP Range) and copies the rest from it; every chunk is
 * checked against the index and the whole image exactly as a full download
 * (a bad chunk or index: IOT_OTA_ERR_VERIFY_FAILED, reported). When a delta
 * would not save enough, the server ignores Range, or base_path changes
 * while it is read, the full download runs instead; the DOWNLOADING
 * reports' desc says which. NULL stops using a base. iot_ota_fetch_yield()
 * always downloads whole. Returns 0; IOT_OTA_ERR_INVALID_PARAM for a bad
 * handle or a non-UTF-8 or empty path. */
int iot_ota_set_delta_base(void *handle, const char *base_path);

/* The download state (an iot_ota_fetch_state_t), or IOT_OTA_ERR_INVALID_PARAM. */
int iot_ota_fetch_state(void *handle);

/* Resume after a crash: the application keeps the image in part_path as it
 * fetches it. Call after an upgrade has arrived, before the first
 * iot_ota_fetch_yield(). Returns how many bytes of the file to keep
 * (truncate it there, append what the fetch returns): its length rounded
 * down to 4 KiB when part_path.meta (written by this call) names the same
 * firmware, else 0. The kept bytes are hashed again on the library's
 * download thread and the rest is fetched with a Range request;
 * iot_ota_fetched_size() counts them. The .meta file is removed once the
 * image is verified or has failed for good. IOT_OTA_ERR_INVALID_STATE with
 * no upgrade or once the fetch has started; IOT_OTA_ERR_INVALID_PARAM for
 * a bad handle or path; IOT_OTA_ERR_GENERAL if the .meta cannot be written. */
int64_t iot_ota_fetch_resume(void *handle, const char *part_path);

/* Copies the current (or last) upgrade's details into *info. Returns 0;
 * IOT_OTA_ERR_INVALID_STATE when no upgrade has arrived;
 * IOT_OTA_ERR_INVALID_PARAM for a bad handle or NULL info. */
int iot_ota_get_firmware(void *handle, iot_ota_firmware_t *info);

/* The digest check after the fetch: 0 when complete with the expected size
 * and digest; IOT_OTA_ERR_VERIFY_FAILED on a digest mismatch;
 * IOT_OTA_ERR_FETCH_FAILED when the download failed otherwise;
 * IOT_OTA_ERR_INVALID_STATE before the end or with no upgrade;
 * IOT_OTA_ERR_INVALID_PARAM for a bad handle. */
int iot_ota_check_firmware(void *handle);

/* Writes the digest (lowercase hex, the command's method) of the bytes
 * received so far into buf, NUL-terminated. Returns its length (32 or 64);
 * IOT_OTA_ERR_STR_TOO_LONG when buf_len cannot hold it and the NUL;
 * IOT_OTA_ERR_INVALID_STATE with no upgrade; IOT_OTA_ERR_INVALID_PARAM for a
 * bad handle or NULL buf. */
int iot_ota_get_digest(void *handle, char *buf, uint32_t buf_len);

/* Bytes of the current download received so far (0 with no upgrade), or
 * IOT_OTA_ERR_INVALID_PARAM. Starts again from 0 with each new upgrade. */
int64_t iot_ota_fetched_size(void *handle);

/* The firmware's total size in bytes (the command's size, else the server's
 * once known; 0 when unknown or with no upgrade), or IOT_OTA_ERR_INVALID_PARAM. */
int64_t iot_ota_file_size(void *handle);

/* ---- extras: install, reboot, confirm (docs/c-api.md, PROTOCOL.md) ----
 *
 * An upgrade counts as done only once the device runs the new image and it
 * is healthy. With a state directory, the library keeps an upgrade journal
 * there (atomic, checksummed): each accepted upgrade, its download, the
 * install, the reboot. At every start:
 *
 *   iot_ota_set_state_dir(ota, "/data/ota");
 *   switch (iot_ota_boot_confirm(ota, running_version, my_checks_pass)) {
 *   case IOT_OTA_BOOT_REBOOT:    reboot();                      break;
 *   case IOT_OTA_BOOT_ROLL_BACK: switch_to_old_slot(); reboot(); break;
 *   default: break;  (committed, rolled back: reported; resumed: fetching)
 *   }
 *   iot_ota_report_firmware_version(ota, running_version);
 *
 * and after installing a verified image: iot_ota_install_done(ota, 1) and
 * reboot (or iot_ota_install_done(ota, 0) when it runs at once). */

typedef enum {
    IOT_OTA_BOOT_IDLE = 0,        /* nothing pending */
    IOT_OTA_BOOT_COMMITTED = 1,   /* committed: SUCCESS 100 goes out before the inform */
    IOT_OTA_BOOT_ROLLED_BACK = 2, /* UPGRADE_FAILED "rolled back: ..." goes out before the inform */
    IOT_OTA_BOOT_REBOOT = 3,      /* reboot now into the installed image */
    IOT_OTA_BOOT_ROLL_BACK = 4,   /* the new image is unhealthy: switch back to the old slot, reboot */
    IOT_OTA_BOOT_RESUMED = 5      /* a cut download or install: fetching again; install it when done */
} iot_ota_boot_t;

/* Keeps the upgrade journal and the security counter in state_dir (created
 * if missing). Once, before iot_ota_boot_confirm(). Returns 0;
 * IOT_OTA_ERR_INVALID_PARAM (bad handle or path); IOT_OTA_ERR_INVALID_STATE
 * (already set); IOT_OTA_ERR_GENERAL (cannot create it). */
int iot_ota_set_state_dir(void *handle, const char *state_dir);

/* The start-up decision, at every start, before
 * iot_ota_report_firmware_version(). healthy: 1 when the application's own
 * checks pass on this boot, 0 when not (used only when this boot runs a
 * new, unconfirmed image; too many unconfirmed boots roll back too).
 * Returns an iot_ota_boot_t; IOT_OTA_ERR_INVALID_STATE without a state
 * directory; IOT_OTA_ERR_INVALID_PARAM (bad handle or version);
 * IOT_OTA_ERR_STR_TOO_LONG (version over 100 bytes); IOT_OTA_ERR_MQTT_FAILED
 * (MQTT instance destroyed); IOT_OTA_ERR_GENERAL (the journal cannot be
 * written). A cut upgrade that is refused now (a key pinned since) is
 * reported UPGRADE_FAILED and the call returns IOT_OTA_BOOT_IDLE. An unreadable
 * journal is set aside (journal.unreadable-<time>) and never read as a
 * success. */
int iot_ota_boot_confirm(void *handle, const char *running_version, int healthy);

/* The application has installed the verified image of the current upgrade.
 * reboot 1: journaled; returns IOT_OTA_BOOT_REBOOT: reboot into it, the next
 * start's iot_ota_boot_confirm() commits it. reboot 0: the image runs at
 * once: committed, SUCCESS 100 reported, returns IOT_OTA_BOOT_COMMITTED:
 * inform the new version. IOT_OTA_ERR_INVALID_STATE without a state
 * directory or a verified download; IOT_OTA_ERR_INVALID_PARAM (bad handle);
 * IOT_OTA_ERR_MQTT_FAILED (MQTT instance destroyed); IOT_OTA_ERR_GENERAL
 * (the journal cannot be written, or is not this download's). */
int iot_ota_install_done(void *handle, int reboot);

/* ---- extras: signed manifests (PROTOCOL.md) ---- */

/* Pins the public key in the PEM "PUBLIC KEY" file pem_path (Ed25519 or
 * P-256; several may be pinned). From then on only firmware whose signed
 * manifest a pinned, not revoked key verifies is accepted (others: reply 412
 * and UPGRADE_FAILED), never one whose counter is below the device's
 * security counter (kept in the state directory, raised at each commit),
 * and the image must match the manifest's SHA-256 too (VERIFY_FAILED).
 * Call after iot_ota_init. Returns 0; IOT_OTA_ERR_INVALID_PARAM (bad
 * handle, path, or not such a key). */
int iot_ota_trust_key(void *handle, const char *pem_path);

/* Revokes a key id (64 hex digits: the SHA-256 of the key's DER
 * SubjectPublicKeyInfo): its signatures no longer count, even when pinned.
 * Returns 0; IOT_OTA_ERR_INVALID_PARAM (bad handle or id). */
int iot_ota_revoke_key(void *handle, const char *key_id);

#endif /* DEVICE_OTA */

#ifdef __cplusplus
}
#endif

#endif /* IOT_OTA_H */
