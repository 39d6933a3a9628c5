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

use serde_json::{json, Map, Value};
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

/// The envelope fields common to every message, read leniently.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// `msgId` as a string (numbers are converted), if present.
    pub msg_id: Option<String>,
    /// `data`, if present and an object.
    pub data: Option<Map<String, Value>>,
    /// `code`, if present and an integer.
    pub code: Option<i64>,
    /// `message`, if present and a string.
    pub message: Option<String>,
}

/// Reads a key under either spelling (`key` or the guide's `"key "`).
fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).or_else(|| obj.get(&format!("{key} ")))
}

/// Parses the JSON envelope of any message.
pub fn parse_envelope(payload: &[u8]) -> Result<Envelope, Rejection> {
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| Rejection::bad(format!("payload is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(Rejection::bad("payload is not a JSON object"));
    };
    let msg_id = match field(&obj, "msgId") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err(Rejection::bad("msgId must be a string or a number")),
    };
    let data = match field(&obj, "data") {
        Some(Value::Object(d)) => Some(d.clone()),
        _ => None,
    };
    let code = field(&obj, "code").and_then(Value::as_i64);
    let message = field(&obj, "message")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok(Envelope {
        msg_id,
        data,
        code,
        message,
    })
}

fn req_str<'a>(data: &'a Map<String, Value>, key: &str) -> Result<&'a str, Rejection> {
    match field(data, key) {
        None | Some(Value::Null) => Err(Rejection::bad(format!("missing field {key}"))),
        Some(Value::String(s)) => Ok(s.trim()),
        Some(_) => Err(Rejection::bad(format!("field {key} must be a string"))),
    }
}

/// Longest product key or device name, in bytes.
pub const MAX_IDENTITY_LEN: usize = 128;

/// [`validate_identity`] without the message: for callers that only answer
/// yes or no (the C API's `iot_ota_init`).
pub fn is_valid_identity(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_IDENTITY_LEN
        && !value
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#') || c.is_whitespace() || c.is_control())
        && value != "."
        && value != ".."
}

/// The MQTT client id a device uses unless told otherwise:
/// `{product_key}.{device_name}` (the Rust SDK's default; the platform's
/// console finds a device's connection on the embedded broker by it).
pub fn default_client_id(product_key: &str, device_name: &str) -> String {
    format!("{product_key}.{device_name}")
}

/// Checks a product key or device name (`what` names which, for the
/// message): 1-128 bytes, none of MQTT's topic separators and wildcards
/// (`/`, `+`, `#`), no white space or control characters, and not `.` or
/// `..` (the platform names directories after products). This is the one
/// rule: the device SDK, the C API, the agent and the platform all call it,
/// so a device is never refused by the platform it was configured for.
pub fn validate_identity(what: &str, value: &str) -> Result<(), String> {
    if is_valid_identity(value) {
        return Ok(());
    }
    if value.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if value.len() > MAX_IDENTITY_LEN {
        return Err(format!(
            "{what} is {} bytes long; at most {MAX_IDENTITY_LEN} are allowed",
            value.len()
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|&c| matches!(c, '/' | '+' | '#') || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{what} {value:?} has the character {c:?}; '/', '+', '#', spaces and control characters are not allowed"
        ));
    }
    if value == "." || value == ".." {
        return Err(format!("{what} must not be {value:?}"));
    }
    Ok(())
}

/// Checks a firmware version string: 1-100 characters of letters, digits,
/// `_`, `-` and `.` (the console's rule for firmware versions), and not `.`
/// or `..`. Devices put the version in file names and install commands, so
/// nothing else may get through.
pub fn validate_version(version: &str) -> Result<(), Rejection> {
    if version.is_empty() {
        return Err(Rejection::bad("firmwareVersion is empty"));
    }
    if version.len() > MAX_VERSION_LEN {
        return Err(Rejection::bad(format!(
            "firmwareVersion is longer than {MAX_VERSION_LEN} characters"
        )));
    }
    if !version
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        || version == "."
        || version == ".."
    {
        return Err(Rejection::bad(format!(
            "firmwareVersion {version:?} may only contain letters, digits, '_', '-' and '.'"
        )));
    }
    Ok(())
}

/// Scheme, host and port of an `http` or `https` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlParts<'a> {
    /// True for `https`.
    pub https: bool,
    /// Host name or address (IPv6 without brackets).
    pub host: &'a str,
    /// Port, explicit or the scheme's default.
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: &'a str,
}

/// Splits an `http://` or `https://` URL; anything else is an error message.
pub fn parse_url(url: &str) -> Result<UrlParts<'_>, String> {
    let (https, rest) = if let Some(r) = strip_prefix_ci(url, "https://") {
        (true, r)
    } else if let Some(r) = strip_prefix_ci(url, "http://") {
        (false, r)
    } else {
        let scheme = url.split_once("://").map_or("none", |(s, _)| s);
        return Err(format!(
            "url scheme must be http or https, not {scheme}: {url}"
        ));
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = path.split('#').next().unwrap_or("/");
    let path = if path.is_empty() { "/" } else { path };
    if authority.contains('@') {
        return Err(format!("url must not carry credentials: {url}"));
    }
    let default_port = if https { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("url has an unclosed IPv6 bracket: {url}"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p, url)?,
            None if after.is_empty() => default_port,
            None => return Err(format!("url has junk after the IPv6 host: {url}")),
        };
        (h, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, parse_port(p, url)?),
            None => (authority, default_port),
        }
    };
    if host.is_empty() {
        return Err(format!("url has no host: {url}"));
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("url host contains whitespace: {url}"));
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("url path contains whitespace: {url}"));
    }
    Ok(UrlParts {
        https,
        host,
        port,
        path,
    })
}

fn parse_port(p: &str, url: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("url has an invalid port {p:?}: {url}")),
        Ok(n) => Ok(n),
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len()
        && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

/// Reads and validates the firmware fields of an upgrade command or get reply.
///
/// `size_required` is true for pushed upgrade commands, false for get replies
/// (where the guide's format has no size).
pub fn parse_firmware(
    data: &Map<String, Value>,
    size_required: bool,
    limits: &Limits,
) -> Result<Firmware, Rejection> {
    let version = req_str(data, "firmwareVersion")?;
    validate_version(version)?;

    let url = req_str(data, "url")?;
    if url.len() > MAX_URL_LEN {
        return Err(Rejection::bad(format!(
            "url is longer than {MAX_URL_LEN} characters"
        )));
    }
    let parts = parse_url(url).map_err(Rejection::bad)?;
    if limits.require_https && !parts.https {
        return Err(Rejection::refused(
            "http:// firmware URL refused: this device requires https",
        ));
    }
    if !limits.allowed_hosts.is_empty()
        && !limits
            .allowed_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(parts.host))
    {
        return Err(Rejection::refused(format!(
            "url host {} is not in the allowed hosts",
            parts.host
        )));
    }

    let size = match field(data, "size") {
        None | Some(Value::Null) if !size_required => None,
        None | Some(Value::Null) => return Err(Rejection::bad("missing field size")),
        Some(Value::Number(n)) => {
            let size = if let Some(u) = n.as_u64() {
                u
            } else if n.as_i64().is_some() {
                return Err(Rejection::bad("size must not be negative"));
            } else {
                return Err(Rejection::bad("size must be an integer"));
            };
            if size == 0 {
                return Err(Rejection::bad("size must not be zero"));
            }
            if size > limits.max_size {
                return Err(Rejection::refused(format!(
                    "size {size} is over the device limit of {} bytes",
                    limits.max_size
                )));
            }
            Some(size)
        }
        Some(_) => return Err(Rejection::bad("size must be an integer")),
    };

    let method_name = req_str(data, "signMethod")?;
    let sign_method = SignMethod::parse(method_name).ok_or_else(|| {
        Rejection::refused(format!("signMethod {method_name:?} is not supported"))
    })?;

    let sign = req_str(data, "sign")?;
    if sign.len() != sign_method.hex_len() || !sign.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Rejection::bad(format!(
            "sign must be a {}-character hex {} digest",
            sign_method.hex_len(),
            sign_method.name()
        )));
    }

    let policy = match field(data, "policy") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) => match p.trim().to_ascii_lowercase().as_str() {
            "standard" | "" => Some(Policy::Standard),
            "silent" => Some(Policy::Silent),
            other => {
                return Err(Rejection::bad(format!(
                    "policy must be standard or silent, not {other:?}"
                )))
            }
        },
        Some(_) => return Err(Rejection::bad("field policy must be a string")),
    };

    let signed = if limits.signed_manifests {
        crate::manifest::Signed::from_data(data)?.map(Box::new)
    } else {
        None
    };

    Ok(Firmware {
        version: version.to_owned(),
        url: url.to_owned(),
        size,
        sign: sign.to_ascii_lowercase(),
        sign_method,
        policy,
        signed,
    })
}

/// Parses an upgrade command (message 1).
///
/// On error, the returned `msgId` (when it could be read) is the one to echo in the reply.
pub fn parse_upgrade(
    payload: &[u8],
    limits: &Limits,
) -> Result<UpgradeCommand, (Option<String>, Rejection)> {
    let env = parse_envelope(payload).map_err(|r| (None, r))?;
    let msg_id = env.msg_id.clone();
    let fail = |r: Rejection| (msg_id.clone(), r);
    let id = env
        .msg_id
        .clone()
        .ok_or_else(|| fail(Rejection::bad("missing field msgId")))?;
    let data = env
        .data
        .as_ref()
        .ok_or_else(|| fail(Rejection::bad("missing field data")))?;
    let firmware = parse_firmware(data, true, limits).map_err(fail)?;
    Ok(UpgradeCommand {
        msg_id: id,
        firmware,
    })
}

/// A get reply (message 6): the firmware, or the platform's not-found answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetReply {
    /// The request's `msgId`, echoed.
    pub msg_id: String,
    /// The firmware, or the error code and message (404 when not found).
    pub result: Result<Firmware, GetError>,
}

/// A get reply without firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetError {
    /// The reply's `code` (404 for "not existed"), or 400 when the reply was malformed.
    pub code: i64,
    /// The reply's `message`.
    pub message: String,
}

/// Parses a get reply (message 6). Returns `None` when it has no `msgId` to match.
pub fn parse_get_reply(payload: &[u8], limits: &Limits) -> Option<GetReply> {
    let env = match parse_envelope(payload) {
        Ok(env) => env,
        Err(_) => return None,
    };
    let msg_id = env.msg_id?;
    let result = match (&env.data, env.code) {
        (_, Some(code)) if code != 200 => Err(GetError {
            code,
            message: env.message.unwrap_or_default(),
        }),
        (Some(data), _) => parse_firmware(data, false, limits).map_err(|r| GetError {
            code: i64::from(r.code.code()),
            message: r.message,
        }),
        (None, _) => Err(GetError {
            code: 400,
            message: "get reply has neither data nor an error code".into(),
        }),
    };
    Some(GetReply { msg_id, result })
}

fn envelope(msg_id: &str, data: Value) -> Vec<u8> {
    json!({"msgId": msg_id, "version": PROTOCOL_VERSION, "data": data})
        .to_string()
        .into_bytes()
}

/// Encodes an upgrade reply (message 2).
pub fn encode_upgrade_reply(msg_id: &str, code: ReplyCode, message: &str) -> Vec<u8> {
    json!({"msgId": msg_id, "code": code.code(), "message": message})
        .to_string()
        .into_bytes()
}

/// Encodes a version inform (message 3).
pub fn encode_inform(msg_id: &str, version: &str) -> Vec<u8> {
    envelope(msg_id, json!({"firmwareVersion": version}))
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

/// Encodes a progress report (message 4).
pub fn encode_progress(msg_id: &str, p: &Progress) -> Vec<u8> {
    envelope(
        msg_id,
        json!({
            "status": p.status.code(),
            "progress": p.progress,
            "desc": p.desc,
            "firmwareVersion": p.firmware_version,
        }),
    )
}

/// Encodes a firmware get request (message 5).
pub fn encode_get(msg_id: &str, version: &str) -> Vec<u8> {
    envelope(msg_id, json!({"firmwareVersion": version}))
}

fn firmware_json(fw: &Firmware) -> Map<String, Value> {
    let mut data = Map::new();
    if let Some(p) = fw.policy {
        data.insert("policy".into(), p.as_str().into());
    }
    if let Some(size) = fw.size {
        data.insert("size".into(), size.into());
    }
    data.insert("firmwareVersion".into(), fw.version.clone().into());
    data.insert("url".into(), fw.url.clone().into());
    data.insert("sign".into(), fw.sign.clone().into());
    data.insert("signMethod".into(), fw.sign_method.wire_name().into());
    if let Some(signed) = &fw.signed {
        data.extend(signed.to_fields());
    }
    data
}

/// Encodes an upgrade command (message 1); the platform's side.
pub fn encode_upgrade(msg_id: &str, fw: &Firmware) -> Vec<u8> {
    envelope(msg_id, Value::Object(firmware_json(fw)))
}

/// Encodes a successful get reply (message 6); the platform's side.
pub fn encode_get_reply(msg_id: &str, fw: &Firmware) -> Vec<u8> {
    envelope(msg_id, Value::Object(firmware_json(fw)))
}

/// Encodes a get reply for a version that does not exist (the 404 form).
pub fn encode_get_not_found(msg_id: &str, version: &str) -> Vec<u8> {
    json!({
        "msgId": msg_id,
        "code": 404,
        "message": format!("FirmwareVersion {version} not existed"),
    })
    .to_string()
    .into_bytes()
}

/// An upgrade reply as the platform reads it (message 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeReply {
    /// The command's `msgId`.
    pub msg_id: String,
    /// The numeric code (200, 400, 409, 412).
    pub code: i64,
    /// The reason.
    pub message: String,
}

/// Parses an upgrade reply (platform side).
pub fn parse_upgrade_reply(payload: &[u8]) -> Result<UpgradeReply, Rejection> {
    let env = parse_envelope(payload)?;
    Ok(UpgradeReply {
        msg_id: env
            .msg_id
            .ok_or_else(|| Rejection::bad("missing field msgId"))?,
        code: env
            .code
            .ok_or_else(|| Rejection::bad("missing field code"))?,
        message: env.message.unwrap_or_default(),
    })
}

/// Parses a version inform or a get request (messages 3 and 5): `(msgId, firmwareVersion)`.
pub fn parse_version_message(payload: &[u8]) -> Result<(String, String), Rejection> {
    let env = parse_envelope(payload)?;
    let msg_id = env.msg_id.unwrap_or_default();
    let data = env
        .data
        .as_ref()
        .ok_or_else(|| Rejection::bad("missing field data"))?;
    let version = req_str(data, "firmwareVersion")?;
    validate_version(version)?;
    Ok((msg_id, version.to_owned()))
}

/// Parses a progress report (message 4), platform side: `(msgId, progress)`.
pub fn parse_progress(payload: &[u8]) -> Result<(String, Progress), Rejection> {
    let env = parse_envelope(payload)?;
    let msg_id = env.msg_id.unwrap_or_default();
    let data = env
        .data
        .as_ref()
        .ok_or_else(|| Rejection::bad("missing field data"))?;
    let status = field(data, "status")
        .and_then(Value::as_i64)
        .ok_or_else(|| Rejection::bad("missing or non-integer field status"))?;
    let status = Status::from_code(status)
        .ok_or_else(|| Rejection::bad(format!("unknown status {status}")))?;
    let progress = field(data, "progress")
        .and_then(Value::as_u64)
        .filter(|p| *p <= 100)
        .ok_or_else(|| Rejection::bad("progress must be an integer 0-100"))?;
    let desc = field(data, "desc")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let firmware_version = field(data, "firmwareVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    Ok((
        msg_id,
        Progress {
            status,
            progress: progress as u32,
            desc,
            firmware_version,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MD5: &str = "9e107d9d372bb6826bd81d3542a419d6";

    fn cmd(data: &str) -> Vec<u8> {
        format!(r#"{{"msgId":"1","version":"1.0","data":{data}}}"#).into_bytes()
    }

    fn good() -> String {
        format!(
            r#"{{"policy":"standard","size":10,"firmwareVersion":"2.0","url":"http://h/f","sign":"{MD5}","signMethod":"Md5"}}"#
        )
    }

    fn reject(payload: &[u8]) -> Rejection {
        parse_upgrade(payload, &Limits::default()).unwrap_err().1
    }

    #[test]
    fn identities() {
        for good in ["pk1", "a1B2c3", "dev-01_x.y", "d@v:1", "é"] {
            assert_eq!(validate_identity("device name", good), Ok(()), "{good:?}");
        }
        let long = "a".repeat(MAX_IDENTITY_LEN + 1);
        for bad in [
            "", "a/b", "a+b", "a#", "a b", "a\tb", "a\u{0}b", ".", "..", &long,
        ] {
            let e = validate_identity("product key", bad).unwrap_err();
            assert!(e.starts_with("product key"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn topics_from_prefix() {
        let t = Topics::new("pk", "dev");
        assert_eq!(t.upgrade, "/sys/pk/dev/ota/firmware/upgrade");
        assert_eq!(t.get_reply, "/sys/pk/dev/ota/firmware/get_reply");
        let t = Topics::with_prefix("/x/", "pk", "dev");
        assert_eq!(t.inform, "/x/pk/dev/ota/firmware/inform");
        assert_eq!(
            Topics::parse("/sys", "/sys/pk/dev/ota/firmware/progress"),
            Some(("pk", "dev", TopicKind::Progress))
        );
        assert_eq!(
            Topics::parse("/sys", "/sys/pk/dev/ota/other/progress"),
            None
        );
        assert_eq!(
            Topics::parse("/sys", "/sys/pk/dev/ota/firmware/progress/x"),
            None
        );
    }

    #[test]
    fn parses_a_good_command() {
        let c = parse_upgrade(&cmd(&good()), &Limits::default()).unwrap();
        assert_eq!(c.msg_id, "1");
        assert_eq!(c.firmware.size, Some(10));
        assert_eq!(c.firmware.sign_method, SignMethod::Md5);
        assert_eq!(c.firmware.policy, Some(Policy::Standard));
    }

    #[test]
    fn lenient_spellings() {
        let p = format!(
            r#"{{"msgId ":123,"data ":{{"size":10,"firmwareVersion":"2","url":"HTTPS://h:8443/f?x=1","sign":"{}","signMethod":"sha-256"}}}}"#,
            "A".repeat(64)
        );
        let c = parse_upgrade(p.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(c.msg_id, "123");
        assert_eq!(c.firmware.sign_method, SignMethod::Sha256);
        assert_eq!(c.firmware.sign, "a".repeat(64));
        assert_eq!(c.firmware.policy, None);
    }

    #[test]
    fn rejects_each_bad_field() {
        let cases: Vec<(String, u16, &str)> = vec![
            (
                good().replace(r#""size":10,"#, ""),
                400,
                "missing field size",
            ),
            (good().replace("10", "-5"), 400, "negative"),
            (good().replace(":10", ":0"), 400, "zero"),
            (good().replace(":10", ":1.5"), 400, "integer"),
            (good().replace(":10", ":\"10\""), 400, "integer"),
            (good().replace("\"2.0\"", "\"\""), 400, "empty"),
            (
                good().replace("\"2.0\"", "\"a/../../x\""),
                400,
                "may only contain",
            ),
            (
                good().replace("\"2.0\"", "\"1;reboot\""),
                400,
                "may only contain",
            ),
            (good().replace("\"2.0\"", "\"..\""), 400, "may only contain"),
            (
                good().replace("\"2.0\"", "\"2.0 beta\""),
                400,
                "may only contain",
            ),
            (good().replace("http://h/f", "ftp://h/f"), 400, "ftp"),
            (good().replace("http://h/f", "http:///f"), 400, "no host"),
            (good().replace(MD5, "abc"), 400, "32-character"),
            (good().replace(MD5, &"z".repeat(32)), 400, "hex"),
            (good().replace("Md5", "crc32"), 412, "not supported"),
            (good().replace("standard", "later"), 400, "policy"),
            (
                good().replace(r#""url":"http://h/f","#, ""),
                400,
                "missing field url",
            ),
        ];
        for (data, code, needle) in cases {
            let r = reject(&cmd(&data));
            assert_eq!(r.code.code(), code, "{data}: {r}");
            assert!(r.message.contains(needle), "{data}: {r}");
        }
        assert!(reject(b"{nope").message.contains("JSON"));
        assert!(reject(b"[1]").message.contains("object"));
        assert!(reject(br#"{"msgId":"1"}"#).message.contains("data"));
        let no_id = parse_upgrade(
            format!(r#"{{"data":{}}}"#, good()).as_bytes(),
            &Limits::default(),
        );
        assert_eq!(no_id.unwrap_err().1.message, "missing field msgId");
    }

    #[test]
    fn policy_limits_refuse() {
        let limits = Limits {
            max_size: 5,
            ..Limits::default()
        };
        let r = parse_upgrade(&cmd(&good()), &limits).unwrap_err().1;
        assert_eq!(r.code, ReplyCode::Refused);
        let limits = Limits {
            max_size: 100,
            allowed_hosts: vec!["other".into()],
            ..Limits::default()
        };
        let r = parse_upgrade(&cmd(&good()), &limits).unwrap_err().1;
        assert_eq!(r.code, ReplyCode::Refused);
        assert!(r.message.contains("host h"));
        let limits = Limits {
            max_size: 100,
            require_https: true,
            ..Limits::default()
        };
        let r = parse_upgrade(&cmd(&good()), &limits).unwrap_err().1;
        assert_eq!(r.code, ReplyCode::Refused);
        assert!(r.message.contains("requires https"), "{}", r.message);
        let https = good().replace("http://", "https://");
        assert!(parse_upgrade(&cmd(&https), &limits).is_ok());
    }

    #[test]
    fn get_reply_success_and_404() {
        let ok = format!(
            r#"{{"msgId":"9","version":"1.0","data":{{"firmwareVersion":"2","url":"http://h/f","sign":"{MD5}","signMethod":"MD5"}}}}"#
        );
        let r = parse_get_reply(ok.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(r.msg_id, "9");
        let fw = r.result.unwrap();
        assert_eq!(fw.size, None);
        let nf = encode_get_not_found("9", "2.0.1");
        let r = parse_get_reply(&nf, &Limits::default()).unwrap();
        let e = r.result.unwrap_err();
        assert_eq!(e.code, 404);
        assert_eq!(e.message, "FirmwareVersion 2.0.1 not existed");
    }

    #[test]
    fn round_trips() {
        let fw = parse_upgrade(&cmd(&good()), &Limits::default())
            .unwrap()
            .firmware;
        let again = parse_upgrade(&encode_upgrade("5", &fw), &Limits::default()).unwrap();
        assert_eq!(again.firmware, fw);
        let p = Progress {
            status: Status::VerifyFailed,
            progress: 100,
            desc: "md5 mismatch".into(),
            firmware_version: "2.0".into(),
        };
        assert_eq!(
            parse_progress(&encode_progress("8", &p)).unwrap(),
            ("8".into(), p)
        );
        assert_eq!(
            parse_version_message(&encode_inform("7", "2.0")).unwrap(),
            ("7".into(), "2.0".into())
        );
        let r = parse_upgrade_reply(&encode_upgrade_reply("1", ReplyCode::Busy, "busy")).unwrap();
        assert_eq!((r.code, r.message.as_str()), (409, "busy"));
    }

    #[test]
    fn urls() {
        let u = parse_url("http://[::1]:8080/a/b?c").unwrap();
        assert_eq!(
            (u.host, u.port, u.path, u.https),
            ("::1", 8080, "/a/b?c", false)
        );
        let u = parse_url("https://example.com").unwrap();
        assert_eq!((u.host, u.port, u.path), ("example.com", 443, "/"));
        assert!(parse_url("http://h:0/").is_err());
        assert!(parse_url("http://h:99999/").is_err());
        assert!(parse_url("http://u:p@h/").is_err());
        assert!(parse_url("file:///etc/passwd").is_err());
    }

    #[test]
    fn status_codes() {
        for s in Status::ALL {
            assert_eq!(Status::from_code(s.code().into()), Some(s));
        }
        assert!(Status::VerifyFailed.is_failure());
        assert!(Status::Success.is_terminal());
        assert!(!Status::Downloaded.is_terminal());
    }
}
