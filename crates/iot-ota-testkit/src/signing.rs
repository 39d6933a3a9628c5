//! A throwaway manifest signing key, for tests of signed firmware.

use std::path::Path;

use iot_ota_core::digest::{digest_hex, SignMethod};
use iot_ota_core::manifest::{Manifest, PublicKey, SigAlg, Signed, Signer};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

/// An Ed25519 key that signs manifests the way the platform does.
pub struct TestKey {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl Default for TestKey {
    fn default() -> Self {
        TestKey::new()
    }
}

impl TestKey {
    /// A fresh key.
    pub fn new() -> TestKey {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("an Ed25519 key");
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).expect("its own PKCS#8");
        let raw: &[u8; 32] = pair.public_key().as_ref().try_into().expect("32 bytes");
        TestKey {
            public: PublicKey::ed25519(raw),
            pair,
        }
    }

    /// The public half.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Writes the public half as a PEM `PUBLIC KEY` file (what devices pin).
    pub fn write_public(&self, path: &Path) {
        std::fs::write(path, self.public.to_pem()).expect("write the public key");
    }

    /// Adds `manifest` and `signatures` to an upgrade command's JSON: a
    /// manifest for `product`, the command's version and size, the SHA-256
    /// of `body`, and `counter`.
    pub fn sign_command(&self, command: &str, product: &str, body: &[u8], counter: u64) -> String {
        self.sign_command_as(
            command,
            product,
            &digest_hex(SignMethod::Sha256, body),
            counter,
        )
    }

    /// [`TestKey::sign_command`] whose manifest also names a chunk index
    /// (`indexSha256`, delta updates).
    pub fn sign_command_indexed(
        &self,
        command: &str,
        product: &str,
        body: &[u8],
        index_sha256: &str,
    ) -> String {
        self.signed_command(
            command,
            product,
            &digest_hex(SignMethod::Sha256, body),
            0,
            Some(index_sha256),
        )
    }

    /// [`TestKey::sign_command`] with any `sha256` (a manifest that lies).
    pub fn sign_command_as(
        &self,
        command: &str,
        product: &str,
        sha256: &str,
        counter: u64,
    ) -> String {
        self.signed_command(command, product, sha256, counter, None)
    }

    fn signed_command(
        &self,
        command: &str,
        product: &str,
        sha256: &str,
        counter: u64,
        index_sha256: Option<&str>,
    ) -> String {
        let mut v: serde_json::Value = serde_json::from_str(command).expect("a JSON command");
        let data = &v["data"];
        let manifest = Manifest {
            product: product.to_owned(),
            firmware_version: data["firmwareVersion"].as_str().unwrap_or("").to_owned(),
            size: data["size"].as_u64().unwrap_or(0),
            sha256: sha256.to_owned(),
            counter,
            index_sha256: index_sha256.map(str::to_owned),
        };
        let signed = Signed::sign(manifest, &[self]).expect("signing");
        for (k, f) in signed.to_fields() {
            v["data"][k] = f;
        }
        v.to_string()
    }
}

impl Signer for TestKey {
    fn key_id(&self) -> String {
        self.public.key_id().to_owned()
    }

    fn alg(&self) -> SigAlg {
        SigAlg::Ed25519
    }

    fn sign(&self, bytes: &[u8]) -> Result<Vec<u8>, String> {
        Ok(self.pair.sign(bytes).as_ref().to_vec())
    }
}
