//! The wire protocol: topics, messages, status and reply codes.
//!
//! Everything here is pure data: parse a payload into a typed message, or
//! encode a typed message into a payload. Both directions live here so the
//! device SDK and the local platform share one definition of every message
//! (see `docs/protocol-in-code.md` and `docs/PROTOCOL.md`).
//!
//! Parsing is lenient where real platforms differ (`msgId` as a string or a
//! number, the guide's `"msgId "` and `"data "` spellings, sign method case)
//! and strict where safety needs it (sizes, digests, URL schemes, versions).

use std::fmt;

use crate::digest::SignMethod;

/// Default topic prefix of every OTA topic.
pub const DEFAULT_PREFIX: &str = "/sys";

/// Protocol version written in every envelope.
pub const PROTOCOL_VERSION: &str = "1.0";

/// Longest firmware version accepted (the console's rule: 1-100 characters).
pub const MAX_VERSION_LEN: usize = 100;

/// Longest URL accepted in a command.
pub const MAX_URL_LEN: usize = 2048;

/// The six OTA topics of one device.
///
/// Built from a prefix so a deployment whose platform names topics
/// differently can adapt without a code change: `{prefix}/{pk}/{id}/ota/firmware/...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Platform -> device: upgrade command (subscribed, QoS 1).
    pub upgrade: String,
    /// Device -> platform: acknowledgement of an upgrade command.
    pub upgrade_reply: String,
    /// Device -> platform: firmware version report.
    pub inform: String,
    /// Device -> platform: progress and status report.
    pub progress: String,
    /// Device -> platform: firmware information request.
    pub get: String,
    /// Platform -> device: firmware information reply (subscribed, QoS 1).
    pub get_reply: String,
}

impl Topics {
    /// The topics of device `device_name` of product `product_key` under the default prefix `/sys`.
    pub fn new(product_key: &str, device_name: &str) -> Self {
        Self::with_prefix(DEFAULT_PREFIX, product_key, device_name)
    }

    /// The topics under a custom prefix (no trailing slash needed).
    pub fn with_prefix(prefix: &str, product_key: &str, device_name: &str) -> Self {
        let base = format!(
            "{}/{}/{}/ota/firmware",
            prefix.trim_end_matches('/'),
            product_key,
            device_name
        );
        Topics {
            upgrade: format!("{base}/upgrade"),
            upgrade_reply: format!("{base}/upgrade_reply"),
            inform: format!("{base}/inform"),
            progress: format!("{base}/progress"),
            get: format!("{base}/get"),
            get_reply: format!("{base}/get_reply"),
        }
    }

    /// Splits an OTA topic under `prefix` into `(product_key, device_name, kind)`.
    ///
    /// Used by the platform, which subscribes to every device's topics with wildcards.
    pub fn parse<'a>(prefix: &str, topic: &'a str) -> Option<(&'a str, &'a str, TopicKind)> {
        let rest = topic.strip_prefix(prefix.trim_end_matches('/'))?;
        let rest = rest.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let pk = parts.next().filter(|s| !s.is_empty())?;
        let id = parts.next().filter(|s| !s.is_empty())?;
        if parts.next()? != "ota" || parts.next()? != "firmware" {
            return None;
        }
        let kind = match parts.next()? {
            "upgrade" => TopicKind::Upgrade,
            "upgrade_reply" => TopicKind::UpgradeReply,
            "inform" => TopicKind::Inform,
            "progress" => TopicKind::Progress,
            "get" => TopicKind::Get,
            "get_reply" => TopicKind::GetReply,
            _ => return None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some((pk, id, kind))
    }
}

/// Which of the six OTA topics a topic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// `.../upgrade`
    Upgrade,
    /// `.../upgrade_reply`
    UpgradeReply,
    /// `.../inform`
    Inform,
    /// `.../progress`
    Progress,
    /// `.../get`
    Get,
    /// `.../get_reply`
    GetReply,
}

/// Upgrade status reported in `progress.status` (`iot_ota_status_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Status {
    /// Downloading; progress is the percent downloaded.
    Downloading = 1,
    /// Downloaded and verified; progress 100.
    Downloaded = 2,
    /// Writing or installing the image; progress is the percent installed.
    Upgrading = 3,
    /// Installed; the new version follows in an inform. Progress 100.
    Success = 4,
    /// Failed for another reason (`desc` says why).
    UpgradeFailed = -1,
    /// The download failed.
    DownloadFailed = -2,
    /// The digest or signature check failed.
    VerifyFailed = -3,
    /// Writing the image failed.
    FlashFailed = -4,
}

impl Status {
    /// Every status, in declaration order.
    pub const ALL: [Status; 8] = [
        Status::Downloading,
        Status::Downloaded,
        Status::Upgrading,
        Status::Success,
        Status::UpgradeFailed,
        Status::DownloadFailed,
        Status::VerifyFailed,
        Status::FlashFailed,
    ];

    /// The wire value.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The status of a wire value, if it names one.
    pub fn from_code(code: i64) -> Option<Status> {
        Status::ALL
            .into_iter()
            .find(|s| i64::from(s.code()) == code)
    }

    /// True for the failure statuses (negative values).
    pub fn is_failure(self) -> bool {
        self.code() < 0
    }

    /// True when the upgrade is over: success or any failure.
    pub fn is_terminal(self) -> bool {
        self == Status::Success || self.is_failure()
    }

    /// The C name, `IOT_OTA_STATUS_*`.
    pub fn name(self) -> &'static str {
        match self {
            Status::Downloading => "DOWNLOADING",
            Status::Downloaded => "DOWNLOADED",
            Status::Upgrading => "UPGRADING",
            Status::Success => "SUCCESS",
            Status::UpgradeFailed => "UPGRADE_FAILED",
            Status::DownloadFailed => "DOWNLOAD_FAILED",
            Status::VerifyFailed => "VERIFY_FAILED",
            Status::FlashFailed => "FLASH_FAILED",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.code())
    }
}

/// Code of an upgrade reply (`upgrade_reply.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyCode {
    /// 200: accepted, the download starts.
    Accepted,
    /// 400: malformed or invalid command; the message names the field.
    BadRequest,
    /// 409: busy with another upgrade.
    Busy,
    /// 412: refused by device policy (downgrade, sign method, size, host).
    Refused,
}

impl ReplyCode {
    /// The numeric code on the wire.
    pub fn code(self) -> u16 {
        match self {
            ReplyCode::Accepted => 200,
            ReplyCode::BadRequest => 400,
            ReplyCode::Busy => 409,
            ReplyCode::Refused => 412,
        }
    }

    /// The reply code of a numeric code, if it names one.
    pub fn from_code(code: i64) -> Option<ReplyCode> {
        match code {
            200 => Some(ReplyCode::Accepted),
            400 => Some(ReplyCode::BadRequest),
            409 => Some(ReplyCode::Busy),
            412 => Some(ReplyCode::Refused),
            _ => None,
        }
    }
}

/// Installation policy of an upgrade command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Install as soon as the download is verified.
    Standard,
    /// The device decides when to install (application or maintenance window).
    Silent,
}

impl Policy {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Standard => "standard",
            Policy::Silent => "silent",
        }
    }
}

/// A firmware offered to the device: by an upgrade command or a get reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firmware {
    /// Target firmware version.
    pub version: String,
    /// `http://` or `https://` URL of the image.
    pub url: String,
    /// Size in bytes; absent when the firmware came from a get reply without one.
    pub size: Option<u64>,
    /// Expected digest, lowercase hex.
    pub sign: String,
    /// Digest algorithm of `sign`.
    pub sign_method: SignMethod,
    /// Installation policy; absent when the device asked (get reply).
    pub policy: Option<Policy>,
    /// The signed manifest, when the platform sent one (PROTOCOL.md,
    /// "Signed manifests"); checked only by a device that pins keys.
    pub signed: Option<Box<crate::manifest::Signed>>,
    /// Where the image's chunk index is, when the platform made one (a
    /// delta update's; PROTOCOL.md, "Delta updates"). Seed devices ignore it.
    pub delta: Option<Box<DeltaRef>>,
}

/// The chunk index of a firmware, as a command names it
/// (`data.delta`): a plain file beside the image ([`crate::delta::Index`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaRef {
    /// Its `http://` or `https://` URL.
    pub index_url: String,
    /// Its SHA-256, lowercase hex. A device that pins keys trusts the
    /// signed manifest's `indexSha256` instead.
    pub index_sha256: String,
    /// Its size in bytes.
    pub index_size: u64,
}

/// A parsed and validated upgrade command (message 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeCommand {
    /// The command's `msgId`, echoed in the reply.
    pub msg_id: String,
    /// What to download.
    pub firmware: Firmware,
}

/// Why a command was rejected: the reply code and a message naming the field or rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Reply code (400, 409 or 412).
    pub code: ReplyCode,
    /// Human-readable reason naming the field or rule.
    pub message: String,
}

impl Rejection {
    /// A 400 rejection.
    pub fn bad(message: impl Into<String>) -> Self {
        Rejection {
            code: ReplyCode::BadRequest,
            message: message.into(),
        }
    }

    /// A 412 rejection.
    pub fn refused(message: impl Into<String>) -> Self {
        Rejection {
            code: ReplyCode::Refused,
            message: message.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code.code(), self.message)
    }
}

/// Validation limits applied to commands and get replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest firmware accepted, bytes (`size` above it: 412).
    pub max_size: u64,
    /// When non-empty, the only URL hosts accepted (others: 412).
    pub allowed_hosts: Vec<String>,
    /// Refuse (412) `http://` firmware URLs: only `https://`.
    pub require_https: bool,
    /// Read `manifest` and `signatures` (a device that pins keys). When
    /// false they are ignored, as the seed ignores unknown fields: a device
    /// with no pinned key keeps the seed's behaviour exactly.
    pub signed_manifests: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_size: 4 * 1024 * 1024 * 1024,
            allowed_hosts: Vec::new(),
            require_https: false,
            signed_manifests: true,
        }
    }
}

/// A progress report (message 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Status code.
    pub status: Status,
    /// Percent, 0-100.
    pub progress: u32,
    /// Why, for failures; may be empty.
    pub desc: String,
    /// The target firmware version.
    pub firmware_version: String,
}

impl Progress {
    /// A report of `status` at `progress` percent for `firmware_version`,
    /// with `desc` (empty for none).
    pub fn new(status: Status, progress: u32, desc: &str, firmware_version: &str) -> Progress {
        Progress {
            status,
            progress,
            desc: desc.to_owned(),
            firmware_version: firmware_version.to_owned(),
        }
    }
}

/// `2.0.1 DOWNLOADING 42%`, and `: desc` when there is one: how a report
/// reads in a log line.
impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}%",
            self.firmware_version,
            self.status.name(),
            self.progress
        )?;
        if !self.desc.is_empty() {
            write!(f, ": {}", self.desc)?;
        }
        Ok(())
    }
}

mod encode;
mod parse;

pub use encode::*;
pub use parse::*;

#[cfg(test)]
mod tests;
