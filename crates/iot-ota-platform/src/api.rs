//! The HTTP JSON API's types, and the console's rules for firmware and batches.
//!
//! The same types serialize on the platform and deserialize in the `iot-ota`
//! command line, so the two cannot drift. The rules are pure functions: every
//! one returns a message a person can act on (see `docs/platform-api.md`).

use serde::{Deserialize, Serialize};

use iot_ota_core::{Policy, SignMethod};

use crate::batch::{Batch, BatchConfig, Millis, Record};

/// Largest firmware file accepted unless configured otherwise: 100 MiB,
/// exactly 104,857,600 bytes (the console's "100 MB", read as binary
/// megabytes, so nothing the console takes is refused here).
pub const DEFAULT_MAX_FIRMWARE_SIZE: u64 = 100 * 1024 * 1024;

/// A size limit for people: `"104857600 bytes (100 MiB)"`, the exact byte
/// count first.
pub fn size_limit_text(max_size: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if max_size >= MIB && max_size.is_multiple_of(MIB) {
        format!("{max_size} bytes ({} MiB)", max_size / MIB)
    } else {
        format!("{max_size} bytes")
    }
}

/// A registered firmware file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareInfo {
    /// Product key.
    pub product: String,
    /// Version, unique within the product.
    pub version: String,
    /// File name.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// MD5, lowercase hex.
    pub md5: String,
    /// SHA-256, lowercase hex.
    pub sha256: String,
    /// Registration time.
    pub created_ms: Millis,
    /// Where devices download it (the `url` of commands).
    pub url: String,
    /// The manifest's security counter, when signed.
    #[serde(default)]
    pub counter: Option<u64>,
    /// The ids of the keys that signed its manifest (empty: unsigned).
    #[serde(default)]
    pub key_ids: Vec<String>,
    /// The SHA-256 of its chunk index (delta updates), served at `url`
    /// with `.idx` appended; none for a firmware stored before indexes.
    #[serde(default)]
    pub index_sha256: Option<String>,
}

/// A device known from its informs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    /// Product key.
    pub product: String,
    /// Device identifier.
    pub device: String,
    /// Last informed version.
    pub version: String,
    /// First inform.
    pub first_seen_ms: Millis,
    /// Last message of any kind.
    pub last_seen_ms: Millis,
    /// Its MQTT credential: `active`, `revoked`, or absent when it was
    /// never registered (seen on an open or external broker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// Connected to the embedded broker now (its MQTT session, pings
    /// included); absent with an external broker, where `last_seen_ms` tells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    /// The running batch with an unfinished record of this device, and the
    /// record's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<DeviceRecord>,
}

/// A device's current record, in [`DeviceView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Batch id.
    pub batch: i64,
    /// Record state.
    pub state: String,
    /// Overall percent, as the record shows it.
    pub progress: u32,
}

/// `POST /api/batches`: a batch upgrade.
///
/// The console-style fields keep the console's ranges; the `*_secs` fields
/// override them with any positive number of seconds, for tests and demos.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CreateBatch {
    /// Product key.
    pub product: String,
    /// Target version (a registered firmware of the product).
    pub firmware_version: String,
    /// The chosen devices; absent: every eligible device of the product.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
    /// `standard` (default) or `silent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// `md5` (default) or `sha256`: the digest put in the commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign_method: Option<String>,
    /// Validity period, 1-7 days (default 7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validity_days: Option<u32>,
    /// Upgrade timeout from the first progress report, 1-1440 minutes (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_minutes: Option<u32>,
    /// Retries after a failure, 0-5 (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Interval before a retry, 1-4320 minutes (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_interval_minutes: Option<u32>,
    /// Override of the validity period, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validity_secs: Option<f64>,
    /// Override of the upgrade timeout, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<f64>,
    /// Override of the retry interval, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_interval_secs: Option<f64>,
    /// How long a push waits for the device's reply, seconds (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_timeout_secs: Option<f64>,
    /// Rollout groups, in order: counts (`"100"`) or percentages of the
    /// batch's devices (`"10%"`); the rest form one last group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
    /// Percentage of a group in success that starts the next (1-100, default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_threshold: Option<u32>,
    /// Failures in a group that pause the batch: a count (`"5"`) or a
    /// percentage of the group (`"10%"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_threshold: Option<String>,
    /// Pushes per minute at most (jittered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_rate: Option<u32>,
}

/// A device left out of a new batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Excluded {
    /// Device identifier.
    pub device: String,
    /// Why.
    pub reason: String,
}

/// `POST /api/devices`: register devices of one product (or give a
/// registered one a new secret). The answer holds each secret, once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterDevices {
    /// Product key.
    pub product: String,
    /// Device names (1 to 100,000).
    pub devices: Vec<String>,
}

/// One device's MQTT credential, in [`RegisteredDevices`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCredential {
    /// Device name.
    pub device: String,
    /// The MQTT user name: `{product}/{device}`.
    pub username: String,
    /// The MQTT password: shown here once, kept only as its SHA-256.
    pub secret: String,
}

/// Answer to `POST /api/devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredDevices {
    /// Product key.
    pub product: String,
    /// Each device's credential, in the request's order.
    pub devices: Vec<DeviceCredential>,
}

/// Most devices one `POST /api/devices` registers.
pub const MAX_REGISTER: usize = 100_000;

/// Answer to `POST /api/batches`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreatedBatch {
    /// The new batch.
    pub batch: BatchView,
    /// Devices in scope that are not eligible, and why.
    pub excluded: Vec<Excluded>,
}

/// Record counts of a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TotalsView {
    /// Records.
    pub total: usize,
    /// Succeeded.
    pub success: usize,
    /// Failed.
    pub failed: usize,
    /// Not finished yet.
    pub unfinished: usize,
}

/// One device's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordView {
    /// Device identifier.
    pub device: String,
    /// `to_push`, `pushed`, `pending`, `upgrading`, `awaiting_retry`, `success`, `failed`.
    pub state: String,
    /// Last reported status code of this attempt.
    pub status: Option<i32>,
    /// Last reported percent of this attempt.
    pub progress: u32,
    /// Pushes so far.
    pub attempts: u32,
    /// Failure reason (final when failed; the one retried when awaiting retry).
    pub reason: Option<String>,
    /// Details of the last failure.
    pub desc: String,
    /// The last failure of any attempt, kept after a successful retry.
    pub last_failure: Option<String>,
    /// Last version the device informed during the batch.
    pub version: Option<String>,
    /// When the last command was pushed (the current attempt's push).
    pub pushed_ms: Option<Millis>,
    /// When the device acknowledged the last push (its 200 reply).
    #[serde(default)]
    pub acked_ms: Option<Millis>,
    /// Its rollout group (1-based).
    #[serde(default)]
    pub group: u32,
    /// First progress of the current attempt.
    pub started_ms: Option<Millis>,
    /// Success or failure time.
    pub finished_ms: Option<Millis>,
}

/// A batch with its records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchView {
    /// Id.
    pub id: i64,
    /// Product key.
    pub product: String,
    /// Target version.
    pub firmware_version: String,
    /// `in_progress`, `completed` or `terminated`.
    pub state: String,
    /// `standard` or `silent`.
    pub policy: String,
    /// `Md5` or `Sha256`.
    pub sign_method: String,
    /// Creation time.
    pub created_ms: Millis,
    /// End of the validity period.
    pub expires_ms: Millis,
    /// Completion or termination time.
    pub finished_ms: Option<Millis>,
    /// Why the batch is paused, while it is (`state` stays `in_progress`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
    /// The rollout group being pushed (1-based).
    #[serde(default)]
    pub group: u32,
    /// The rollout's groups and their counts (one group without rules).
    #[serde(default)]
    pub groups: Vec<GroupView>,
    /// The rollout rules, as given (empty without).
    #[serde(default)]
    pub rollout: RolloutView,
    /// Upgrade timeout, ms.
    pub timeout_ms: Millis,
    /// Retries.
    pub retries: u32,
    /// Retry interval, ms.
    pub retry_interval_ms: Millis,
    /// Ack timeout, ms.
    pub ack_timeout_ms: Millis,
    /// Record counts.
    pub totals: TotalsView,
    /// Records, by device identifier (empty in lists).
    pub records: Vec<RecordView>,
}

impl RecordView {
    /// The view of a record.
    pub fn of(r: &Record) -> Self {
        RecordView {
            device: r.device.clone(),
            state: r.state.as_str().into(),
            status: r.status,
            progress: r.progress,
            attempts: r.attempts,
            reason: r.reason.map(|x| x.as_str().into()),
            desc: r.desc.clone(),
            last_failure: r.last_failure.map(|x| x.as_str().into()),
            version: r.version.clone(),
            pushed_ms: r.pushed_ms,
            acked_ms: r.acked_ms,
            group: r.group + 1,
            started_ms: r.started_ms,
            finished_ms: r.finished_ms,
        }
    }
}

impl BatchView {
    /// The view of a batch, with or without its records.
    pub fn of(b: &Batch, with_records: bool) -> Self {
        let t = b.totals();
        BatchView {
            id: b.id,
            product: b.product.clone(),
            firmware_version: b.firmware_version.clone(),
            state: b.state.as_str().into(),
            policy: b.config.policy.as_str().into(),
            sign_method: b.config.sign_method.wire_name().into(),
            created_ms: b.created_ms,
            expires_ms: b.expires_ms(),
            finished_ms: b.finished_ms,
            paused: b.progress.paused.clone(),
            group: b.progress.group + 1,
            groups: b
                .group_counts()
                .iter()
                .map(|g| GroupView {
                    total: g.total,
                    success: g.success,
                    failed: g.failed,
                })
                .collect(),
            rollout: RolloutView {
                groups: b.rollout.groups.iter().map(|g| g.to_string()).collect(),
                success_threshold: b.rollout.success_pct(),
                error_threshold: b.rollout.error_threshold.map(|t| t.to_string()),
                push_rate: b.rollout.push_rate,
            },
            timeout_ms: b.config.timeout_ms,
            retries: b.config.retries,
            retry_interval_ms: b.config.retry_interval_ms,
            ack_timeout_ms: b.config.ack_timeout_ms,
            totals: TotalsView {
                total: t.total,
                success: t.success,
                failed: t.failed,
                unfinished: t.unfinished,
            },
            records: if with_records {
                b.records.values().map(RecordView::of).collect()
            } else {
                Vec::new()
            },
        }
    }
}

/// Error body of every failed API call: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong, for a person.
    pub error: String,
}

/// Checks a firmware file name: 1-100 letters, digits, `_`, `-`, `.`, not
/// `.` or `..` (it names a file in the data directory). Product keys and
/// versions have the core's rules ([`check_product`], [`check_version`]),
/// the ones the devices apply.
pub fn check_name(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.chars().count() > 100 {
        return Err(format!(
            "{what} must be 1-100 characters, got {}",
            value.chars().count()
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!(
            "{what} {value:?} has the character {c:?}; only letters, digits, '_', '-' and '.' are allowed"
        ));
    }
    if value == "." || value == ".." {
        return Err(format!("{what} must not be {value:?}"));
    }
    Ok(())
}

/// Checks a product key with the devices' rule
/// ([`iot_ota_core::protocol::validate_identity`]).
pub fn check_product(product: &str) -> Result<(), String> {
    iot_ota_core::protocol::validate_identity("product", product)
}

/// Checks a firmware version with the devices' rule
/// ([`iot_ota_core::protocol::validate_version`]).
pub fn check_version(what: &str, version: &str) -> Result<(), String> {
    iot_ota_core::protocol::validate_version(version).map_err(|r| {
        format!(
            "{what}: {}",
            r.message.trim_start_matches("firmwareVersion ")
        )
    })
}

/// Checks a firmware's product, version, file name and size.
pub fn check_firmware(
    product: &str,
    version: &str,
    name: &str,
    size: u64,
    max_size: u64,
) -> Result<(), String> {
    check_product(product)?;
    check_version("version", version)?;
    check_name("file name", name)?;
    if size == 0 {
        return Err("the firmware file is empty".into());
    }
    if size > max_size {
        return Err(format!(
            "the firmware file is {size} bytes, above the limit of {}",
            size_limit_text(max_size)
        ));
    }
    Ok(())
}

fn secs_override(field: &str, v: Option<f64>) -> Result<Option<Millis>, String> {
    match v {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Some((s * 1000.0).round() as Millis)),
        Some(s) => Err(format!(
            "{field} must be a positive number of seconds, got {s}"
        )),
    }
}

fn ranged(field: &str, v: Option<u32>, lo: u32, hi: u32, default: u32) -> Result<u32, String> {
    let v = v.unwrap_or(default);
    if v < lo || v > hi {
        return Err(format!("{field} must be {lo}-{hi}, got {v}"));
    }
    Ok(v)
}

/// Resolves a batch request's rules: console ranges, defaults and the `*_secs` overrides.
pub fn batch_config(req: &CreateBatch) -> Result<BatchConfig, String> {
    let policy = match req
        .policy
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("standard") => Policy::Standard,
        Some("silent") => Policy::Silent,
        Some(other) => return Err(format!("policy must be standard or silent, not {other:?}")),
    };
    let sign_method = match req.sign_method.as_deref() {
        None => SignMethod::Md5,
        Some(m) => SignMethod::parse(m)
            .ok_or_else(|| format!("sign_method must be md5 or sha256, not {m:?}"))?,
    };
    const MIN: Millis = 60_000;
    const DAY: Millis = 86_400_000;
    let validity = ranged("validity_days", req.validity_days, 1, 7, 7)? as Millis * DAY;
    let timeout = ranged("timeout_minutes", req.timeout_minutes, 1, 1440, 60)? as Millis * MIN;
    let retries = ranged("retries", req.retries, 0, 5, 0)?;
    let interval = ranged(
        "retry_interval_minutes",
        req.retry_interval_minutes,
        1,
        4320,
        10,
    )? as Millis
        * MIN;
    Ok(BatchConfig {
        policy,
        sign_method,
        validity_ms: secs_override("validity_secs", req.validity_secs)?.unwrap_or(validity),
        timeout_ms: secs_override("timeout_secs", req.timeout_secs)?.unwrap_or(timeout),
        retries,
        retry_interval_ms: secs_override("retry_interval_secs", req.retry_interval_secs)?
            .unwrap_or(interval),
        ack_timeout_ms: secs_override("ack_timeout_secs", req.ack_timeout_secs)?.unwrap_or(10_000),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("file name", "fw-2.0.1-rc_1.bin").is_ok());
        assert!(check_name("file name", &"9".repeat(100)).is_ok());
        assert!(check_name("file name", &"9".repeat(101))
            .unwrap_err()
            .contains("1-100"));
        assert!(check_name("file name", "").unwrap_err().contains("1-100"));
        assert!(check_name("file name", "fw 2.bin")
            .unwrap_err()
            .contains("' '"));
        assert!(check_name("file name", "a/b").is_err());
        assert!(check_name("file name", "版本").is_err());
        assert!(check_name("file name", "..").is_err());
    }

    #[test]
    fn products_and_versions_have_the_devices_rules() {
        // Whatever a device accepts as its product key, the platform takes.
        for pk in ["pk", "a1B2:c3", "d@v"] {
            assert!(iot_ota_core::protocol::validate_identity("p", pk).is_ok());
            assert_eq!(check_product(pk), Ok(()), "{pk:?}");
        }
        for bad in ["", "a/b", "a b", ".."] {
            assert!(check_product(bad).is_err(), "{bad:?}");
        }
        assert!(check_version("version", "2.0.1-rc_1").is_ok());
        assert!(check_version("version", &"9".repeat(100)).is_ok());
        let e = check_version("version", "2.0 beta").unwrap_err();
        assert!(e.starts_with("version: "), "{e}");
        assert!(check_version("version", &"9".repeat(101)).is_err());
        assert!(check_version("version", "").is_err());
    }

    #[test]
    fn firmware_rules() {
        assert!(check_firmware("pk", "2.0", "fw.bin", 10, 100).is_ok());
        assert!(check_firmware("pk", "2.0", "fw.bin", 0, 100)
            .unwrap_err()
            .contains("empty"));
        assert!(check_firmware("pk", "2.0", "fw.bin", 101, 100)
            .unwrap_err()
            .contains("limit"));
        assert_eq!(DEFAULT_MAX_FIRMWARE_SIZE, 104_857_600);
        let max = DEFAULT_MAX_FIRMWARE_SIZE;
        assert!(check_firmware("pk", "2.0", "fw.bin", max, max).is_ok());
        assert_eq!(
            check_firmware("pk", "2.0", "fw.bin", max + 1, max).unwrap_err(),
            "the firmware file is 104857601 bytes, above the limit of 104857600 bytes (100 MiB)"
        );
        assert_eq!(size_limit_text(10_000), "10000 bytes");
        assert!(check_firmware("p/k", "2.0", "fw.bin", 1, 100).is_err());
    }

    #[test]
    fn batch_rules_and_overrides() {
        let mut req = CreateBatch {
            product: "pk".into(),
            firmware_version: "2".into(),
            ..CreateBatch::default()
        };
        let c = batch_config(&req).unwrap();
        assert_eq!(c.validity_ms, 7 * 86_400_000);
        assert_eq!(c.timeout_ms, 3_600_000);
        assert_eq!((c.retries, c.retry_interval_ms), (0, 600_000));
        assert_eq!(c.ack_timeout_ms, 10_000);
        assert_eq!(
            (c.policy, c.sign_method),
            (Policy::Standard, SignMethod::Md5)
        );
        req.validity_days = Some(8);
        assert!(batch_config(&req).unwrap_err().contains("validity_days"));
        req.validity_days = Some(1);
        req.retries = Some(6);
        assert!(batch_config(&req)
            .unwrap_err()
            .contains("retries must be 0-5"));
        req.retries = Some(5);
        req.retry_interval_minutes = Some(0);
        assert!(batch_config(&req).is_err());
        req.retry_interval_minutes = Some(4320);
        req.timeout_minutes = Some(1441);
        assert!(batch_config(&req).is_err());
        req.timeout_minutes = None;
        req.policy = Some("silent".into());
        req.sign_method = Some("SHA256".into());
        req.timeout_secs = Some(2.5);
        req.retry_interval_secs = Some(1.0);
        req.validity_secs = Some(30.0);
        req.ack_timeout_secs = Some(0.5);
        let c = batch_config(&req).unwrap();
        assert_eq!(
            (
                c.timeout_ms,
                c.retry_interval_ms,
                c.validity_ms,
                c.ack_timeout_ms
            ),
            (2_500, 1_000, 30_000, 500)
        );
        assert_eq!(
            (c.policy, c.sign_method),
            (Policy::Silent, SignMethod::Sha256)
        );
        req.ack_timeout_secs = Some(-1.0);
        assert!(batch_config(&req).unwrap_err().contains("ack_timeout_secs"));
        req.ack_timeout_secs = None;
        req.policy = Some("now".into());
        assert!(batch_config(&req).unwrap_err().contains("policy"));
    }
}

/// One rollout group's counts in a [`BatchView`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    /// Records.
    pub total: usize,
    /// In success.
    pub success: usize,
    /// Failed.
    pub failed: usize,
}

/// A batch's rollout rules in a [`BatchView`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutView {
    /// Group sizes as given.
    pub groups: Vec<String>,
    /// Success percentage that starts the next group.
    pub success_threshold: u32,
    /// Failures that pause the batch.
    pub error_threshold: Option<String>,
    /// Pushes per minute at most.
    pub push_rate: Option<u32>,
}

/// The rollout rules of a request, checked.
pub(crate) fn rollout(req: &CreateBatch) -> Result<crate::batch::Rollout, String> {
    use crate::batch::Share;
    let groups = req
        .groups
        .iter()
        .flatten()
        .map(|g| Share::parse(g).map_err(|e| format!("groups: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(t) = req.success_threshold {
        if !(1..=100).contains(&t) {
            return Err(format!(
                "success_threshold must be 1-100 (percent), not {t}"
            ));
        }
    }
    let error_threshold = req
        .error_threshold
        .as_deref()
        .map(|t| Share::parse(t).map_err(|e| format!("error_threshold: {e}")))
        .transpose()?;
    if req.push_rate == Some(0) {
        return Err("push_rate must be at least 1 (pushes per minute)".into());
    }
    Ok(crate::batch::Rollout {
        groups,
        success_threshold: req.success_threshold,
        error_threshold,
        push_rate: req.push_rate,
    })
}

/// `GET /api/stats`: how hard the platform works, for fleet runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsView {
    /// Device messages handled since the start.
    pub mqtt_messages: u64,
    /// Time spent handling them (engine and database), in milliseconds.
    pub mqtt_busy_ms: u64,
    /// Device messages received and not handled yet.
    pub queued: u64,
    /// The most there have been at once since the start.
    pub peak_queued: u64,
    /// The process's resident memory now, KiB.
    pub rss_kib: u64,
    /// The process's peak resident memory, KiB.
    pub peak_rss_kib: u64,
    /// CPU time of the process (user + system), in milliseconds.
    pub cpu_ms: u64,
    /// Bytes of firmware images and chunk indexes answered (whole files
    /// and Range requests alike), since the start.
    #[serde(default)]
    pub firmware_bytes_served: u64,
    /// Firmware and chunk index requests answered with data.
    #[serde(default)]
    pub firmware_requests: u64,
    /// The embedded broker's counters (absent with an external broker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<crate::broker::BrokerStats>,
}
