//! The HTTP API's bearer token: made at the first start into the data
//! directory (`api-token`, 0600), required by every request that changes
//! something (`Authorization: Bearer TOKEN`).

use std::path::Path;

/// The file name of the token in the data directory.
pub const TOKEN_FILE: &str = "api-token";

/// The token in `data_dir`, made there if missing. True when it was made
/// now (the caller shows it once).
pub fn load_or_create(data_dir: &Path) -> Result<(String, bool), String> {
    load_or_create_named(data_dir, TOKEN_FILE)
}

/// A secret of 32 random bytes (hex) in the file `name` of `data_dir`,
/// made there (0600) if missing; true when made now.
pub fn load_or_create_named(data_dir: &Path, name: &str) -> Result<(String, bool), String> {
    let path = data_dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok((t.trim().to_owned(), false)),
        Ok(_) => return Err(format!("{} is empty", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    let token = random_secret().map_err(|e| format!("{}: {e}", path.display()))?;
    crate::signing::write_private(&path, format!("{token}\n").as_bytes())?;
    Ok((token, true))
}

/// 32 random bytes, hex: the API token, the platform's MQTT secret, each
/// device's secret.
pub fn random_secret() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| "no randomness".to_string())?;
    Ok(iot_ota_core::digest::to_hex(&bytes))
}

/// Compares without leaking where the first difference is.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_then_kept() {
        let dir = std::env::temp_dir().join(format!("iot-ota-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (t, made) = load_or_create(&dir).unwrap();
        assert!(made && t.len() == 64);
        assert_eq!(load_or_create(&dir).unwrap(), (t.clone(), false));
        assert!(same(t.as_bytes(), t.as_bytes()));
        assert!(!same(t.as_bytes(), b"x"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
