//! Encoding: a typed message into its JSON payload, one function per
//! message of PROTOCOL.md.

use serde_json::{json, Map, Value};

use super::*;

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
    if let Some(d) = &fw.delta {
        data.insert("delta".into(), delta_json(d));
    }
    data
}

/// A command's `delta` object (PROTOCOL.md, "Delta updates").
pub fn delta_json(d: &crate::protocol::DeltaRef) -> Value {
    json!({"index": d.index_url, "indexSha256": d.index_sha256, "indexSize": d.index_size})
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
