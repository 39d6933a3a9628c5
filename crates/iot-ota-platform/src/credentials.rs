//! Who may use the embedded broker: the platform's own client and the
//! registered devices, each with a secret.
//!
//! A device connects with the user name `{product}/{device}` and its secret
//! as the password. The secret is 32 random bytes in hex, made at
//! registration and shown once; the platform keeps only its SHA-256 (in
//! the database, and in memory for the broker: one lookup and one hash per
//! CONNECT). A slow password hash (PBKDF2, Argon2) protects guessable
//! passwords; these are random 256-bit secrets, for which one SHA-256 is
//! as strong and costs a fleet's reconnect storm nothing. Revoking removes
//! the hash here (and the broker closes the device's connection).
//!
//! The same user names work with Mosquitto: its password file
//! (`mosquitto_passwd`) and the ACL line `pattern readwrite /sys/%u/#`
//! (docs/platform-api.md).

use std::collections::HashMap;
use std::sync::RwLock;

use crate::broker::{Authenticator, Identity, Refusal};

/// The platform's own MQTT user name.
pub const PLATFORM_USER: &str = "iot-ota-platform";

/// The file in the data directory holding the platform's own MQTT secret.
pub const PLATFORM_SECRET_FILE: &str = "mqtt-secret";

/// The MQTT user name of a device: `{product}/{device}` (neither may hold
/// a `/`, so the name says both unambiguously).
pub fn username(product: &str, device: &str) -> String {
    format!("{product}/{device}")
}

/// A new secret: 32 random bytes, hex.
pub fn make_secret() -> Result<String, String> {
    crate::token::random_secret().map_err(|e| format!("a device secret: {e}"))
}

/// The SHA-256 of a secret, hex: what is kept.
pub fn secret_hash(secret: &str) -> String {
    iot_ota_core::digest::digest_hex(iot_ota_core::SignMethod::Sha256, secret.as_bytes())
}

/// The credentials the embedded broker checks.
#[derive(Debug)]
pub struct Credentials {
    prefix: String,
    platform: String,
    devices: RwLock<HashMap<(String, String), String>>,
}

impl Credentials {
    /// The platform's secret (its SHA-256 is kept) and the devices' active
    /// credentials (product, device, secret SHA-256), for topics under
    /// `prefix`.
    pub fn new(
        prefix: &str,
        platform_secret: &str,
        active: impl IntoIterator<Item = (String, String, String)>,
    ) -> Credentials {
        Credentials {
            prefix: prefix.to_owned(),
            platform: secret_hash(platform_secret),
            devices: RwLock::new(active.into_iter().map(|(p, d, h)| ((p, d), h)).collect()),
        }
    }

    fn devices(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<(String, String), String>> {
        self.devices.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets (or replaces) a device's secret hash.
    pub fn set(&self, product: &str, device: &str, hash: String) {
        self.devices()
            .insert((product.to_owned(), device.to_owned()), hash);
    }

    /// Forgets a device's credential; its next CONNECT is refused.
    pub fn remove(&self, product: &str, device: &str) {
        self.devices()
            .remove(&(product.to_owned(), device.to_owned()));
    }

    /// The broker identity of a device.
    pub fn identity(&self, product: &str, device: &str) -> Identity {
        Identity::device(&self.prefix, product, device)
    }
}

impl Authenticator for Credentials {
    fn authenticate(
        &self,
        _client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Identity, Refusal> {
        let refuse = |why: &str| Err(Refusal::NotAuthorized(why.to_owned()));
        let (Some(user), Some(password)) = (username, password) else {
            return refuse("no user name and password");
        };
        let Ok(password) = std::str::from_utf8(password) else {
            return refuse("a password that is not text");
        };
        let hash = secret_hash(password);
        if user == PLATFORM_USER {
            return if crate::token::same(hash.as_bytes(), self.platform.as_bytes()) {
                Ok(Identity::Platform)
            } else {
                refuse("wrong platform secret")
            };
        }
        let Some((product, device)) = user.split_once('/') else {
            return refuse("a user name that is not PRODUCT/DEVICE");
        };
        let key = (product.to_owned(), device.to_owned());
        let known = self
            .devices
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .is_some_and(|h| crate::token::same(h.as_bytes(), hash.as_bytes()));
        if known {
            Ok(self.identity(product, device))
        } else {
            refuse("unknown device, wrong secret, or revoked")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_the_platform_log_in_with_their_secrets() {
        let s1 = make_secret().unwrap();
        assert_eq!(s1.len(), 64);
        let c = Credentials::new(
            "/sys",
            "plat",
            [("pk".into(), "dev1".into(), secret_hash(&s1))],
        );
        let auth = |u: Option<&str>, p: Option<&str>| c.authenticate("id", u, p.map(str::as_bytes));
        assert_eq!(
            auth(Some("pk/dev1"), Some(&s1)),
            Ok(Identity::device("/sys", "pk", "dev1"))
        );
        assert_eq!(
            auth(Some(PLATFORM_USER), Some("plat")),
            Ok(Identity::Platform)
        );
        for (u, p) in [
            (None, None),
            (Some("pk/dev1"), None),
            (Some("pk/dev1"), Some("wrong")),
            (Some("pk/dev2"), Some(s1.as_str())),
            (Some("dev1"), Some(s1.as_str())),
            (Some(PLATFORM_USER), Some(s1.as_str())),
        ] {
            assert!(auth(u, p).is_err(), "{u:?} {p:?}");
        }
        c.remove("pk", "dev1");
        assert!(auth(Some("pk/dev1"), Some(&s1)).is_err(), "revoked");
        c.set("pk", "dev1", secret_hash("new"));
        assert!(auth(Some("pk/dev1"), Some("new")).is_ok(), "re-registered");
    }
}
