//! The platform's manifest signing key (PROTOCOL.md, "Signed manifests").
//!
//! A key is a PKCS#8 PEM `PRIVATE KEY` file, Ed25519 (what
//! [`SigningKey::generate`] makes, and what `openssl genpkey -algorithm
//! ed25519` writes) or ECDSA P-256. Devices pin its public half, a PEM
//! `PUBLIC KEY` file; its key id is the SHA-256 of that SubjectPublicKeyInfo.

use std::path::Path;

use iot_ota_core::manifest::{pem_decode, pem_encode, PublicKey, SigAlg, Signer};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

enum Pair {
    Ed25519(Ed25519KeyPair),
    P256(EcdsaKeyPair),
}

/// A manifest signing key.
pub struct SigningKey {
    pair: Pair,
    public: PublicKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.public.key_id())
            .field("alg", &self.public.alg())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new Ed25519 key, and its PKCS#8 PEM to keep.
    pub fn generate() -> Result<(SigningKey, String), String> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| "generating an Ed25519 key failed".to_string())?;
        let pem = pem_encode(doc.as_ref(), "PRIVATE KEY");
        Ok((SigningKey::from_pem(&pem)?, pem))
    }

    /// A key from its PKCS#8 PEM `PRIVATE KEY` text.
    pub fn from_pem(pem: &str) -> Result<SigningKey, String> {
        let der = pem_decode(pem, "PRIVATE KEY")?;
        if let Ok(pair) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der) {
            let raw: &[u8; 32] = pair
                .public_key()
                .as_ref()
                .try_into()
                .map_err(|_| "an Ed25519 public key is 32 bytes".to_string())?;
            let public = PublicKey::ed25519(raw);
            return Ok(SigningKey {
                pair: Pair::Ed25519(pair),
                public,
            });
        }
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &der, &rng)
            .map_err(|_| "not a PKCS#8 Ed25519 or P-256 private key".to_string())?;
        let public = PublicKey::p256(pair.public_key().as_ref())?;
        Ok(SigningKey {
            pair: Pair::P256(pair),
            public,
        })
    }

    /// Reads the key file `path`.
    pub fn load(path: &Path) -> Result<SigningKey, String> {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| format!("signing key {}: {e}", path.display()))?;
        SigningKey::from_pem(&pem).map_err(|e| format!("signing key {}: {e}", path.display()))
    }

    /// The public half, for devices to pin.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }
}

impl Signer for SigningKey {
    fn key_id(&self) -> String {
        self.public.key_id().to_owned()
    }

    fn alg(&self) -> SigAlg {
        self.public.alg()
    }

    fn sign(&self, bytes: &[u8]) -> Result<Vec<u8>, String> {
        match &self.pair {
            Pair::Ed25519(p) => Ok(p.sign(bytes).as_ref().to_vec()),
            Pair::P256(p) => p
                .sign(&SystemRandom::new(), bytes)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| "ECDSA signing failed".to_string()),
        }
    }
}

/// Writes a new key pair: `dir/signing-key.pem` (private, mode 0600) and
/// `dir/signing-key.pub.pem` (public, for the devices). Refuses to
/// overwrite an existing private key.
pub fn generate_files(dir: &Path) -> Result<SigningKey, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let private = dir.join("signing-key.pem");
    if private.exists() {
        return Err(format!(
            "{} exists: not overwriting a key",
            private.display()
        ));
    }
    let (key, pem) = SigningKey::generate()?;
    write_private(&private, pem.as_bytes())?;
    let public = dir.join("signing-key.pub.pem");
    std::fs::write(&public, key.public().to_pem())
        .map_err(|e| format!("{}: {e}", public.display()))?;
    Ok(key)
}

/// Writes a secret file: created new, mode 0600, synced.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use iot_ota_core::manifest::{Manifest, Signed, TrustStore};

    #[test]
    fn a_generated_key_signs_what_its_public_half_verifies() {
        let dir = std::env::temp_dir().join(format!("iot-ota-signing-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let key = generate_files(&dir).unwrap();
        assert!(generate_files(&dir).is_err(), "never overwrites a key");
        let loaded = SigningKey::load(&dir.join("signing-key.pem")).unwrap();
        let public = std::fs::read_to_string(dir.join("signing-key.pub.pem")).unwrap();
        let pinned = PublicKey::from_pem(&public).unwrap();
        assert_eq!(pinned.key_id(), key.key_id());
        let m = Manifest {
            product: "pk".into(),
            firmware_version: "2.0".into(),
            size: 3,
            sha256: "ab".repeat(32),
            counter: 1,
            index_sha256: None,
        };
        let signed = Signed::sign(m, &[&loaded]).unwrap();
        let trust = TrustStore {
            keys: vec![pinned],
            revoked: Vec::new(),
        };
        assert_eq!(trust.check(Some(&signed), "pk", "2.0", Some(3), 1), Ok(()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("signing-key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
