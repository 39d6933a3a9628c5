//! Parsing: a payload into a typed message, lenient where real platforms
//! differ and strict where safety needs it; and the checks of identities,
//! versions and URLs both sides share.

use serde_json::{Map, Value};

use super::*;
use crate::digest::SignMethod;

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
    url_policy(&parts, limits, "firmware URL", "url")?;

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

    let delta = match field(data, "delta") {
        None | Some(Value::Null) => None,
        Some(Value::Object(d)) => match parse_delta(d, limits) {
            Ok(d) => Some(Box::new(d)),
            // An index this device may not use (an http:// one where https
            // is required, another host, too large): the image alone is
            // fine, it downloads whole.
            Err(r) if r.code == ReplyCode::Refused => None,
            Err(r) => return Err(r),
        },
        Some(_) => return Err(Rejection::bad("field delta must be an object")),
    };

    Ok(Firmware {
        version: version.to_owned(),
        url: url.to_owned(),
        size,
        sign: sign.to_ascii_lowercase(),
        sign_method,
        policy,
        signed,
        delta,
    })
}

/// The device's rules for a URL it downloads from (412): https when it
/// requires it, and an allowed host; `what` and `field` name it in the
/// message.
fn url_policy(
    parts: &UrlParts<'_>,
    limits: &Limits,
    what: &str,
    field: &str,
) -> Result<(), Rejection> {
    if limits.require_https && !parts.https {
        return Err(Rejection::refused(format!(
            "http:// {what} refused: this device requires https"
        )));
    }
    if !limits.allowed_hosts.is_empty()
        && !limits
            .allowed_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(parts.host))
    {
        return Err(Rejection::refused(format!(
            "{field} host {} is not in the allowed hosts",
            parts.host
        )));
    }
    Ok(())
}

/// Reads a command's `delta`: the chunk index's URL (held to the same
/// rules as the image's), SHA-256 and size.
pub fn parse_delta(d: &Map<String, Value>, limits: &Limits) -> Result<DeltaRef, Rejection> {
    let url = d
        .get("index")
        .and_then(Value::as_str)
        .ok_or_else(|| Rejection::bad("delta.index must be a URL string"))?;
    if url.len() > MAX_URL_LEN {
        return Err(Rejection::bad(format!(
            "delta.index is longer than {MAX_URL_LEN} characters"
        )));
    }
    let parts = parse_url(url).map_err(|e| Rejection::bad(format!("delta.index: {e}")))?;
    url_policy(&parts, limits, "delta.index", "delta.index")?;
    let sha256 = d
        .get("indexSha256")
        .and_then(Value::as_str)
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| Rejection::bad("delta.indexSha256 must be 64 hex digits"))?;
    let size = d
        .get("indexSize")
        .and_then(Value::as_u64)
        .filter(|n| *n >= 1)
        .ok_or_else(|| Rejection::bad("delta.indexSize must be a positive integer"))?;
    if size > MAX_INDEX_SIZE {
        return Err(Rejection::refused(format!(
            "delta.indexSize {size} is over the device limit of {MAX_INDEX_SIZE} bytes"
        )));
    }
    Ok(DeltaRef {
        index_url: url.to_owned(),
        index_sha256: sha256.to_ascii_lowercase(),
        index_size: size,
    })
}

/// The largest chunk index a device fetches: 36 bytes a chunk, so 64 MiB
/// of index is 1.8 million chunks (over 100 GiB of image at 64 KiB).
pub const MAX_INDEX_SIZE: u64 = 64 << 20;

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
