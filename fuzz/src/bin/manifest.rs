//! Signed manifests: the command's `manifest` and `signatures` fields, the
//! manifest bytes, and a pinned key's PEM.
use iot_ota_core::manifest::{Manifest, PublicKey, Signed};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = Manifest::parse(data);
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = PublicKey::from_pem(text);
        }
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(data) {
            let _ = Signed::from_data(&map);
        }
    });
}
