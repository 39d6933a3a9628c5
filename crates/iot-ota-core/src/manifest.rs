//! Signed manifests: authenticity beyond the digest (PROTOCOL.md, "Signed
//! manifests").
//!
//! A command (or get reply) may carry `manifest` (standard base64 of the
//! manifest's bytes) and `signatures` (`keyId`, `alg`, `sig`). A device that
//! pins public keys ([`TrustStore`]) accepts only commands whose manifest a
//! pinned, not revoked key signed, and whose manifest matches the command and
//! does not go below the device's security counter ([`TrustStore::check`]);
//! the download is then checked against the manifest's SHA-256 as well
//! ([`crate::Fetch`]). A device with no pinned key ignores the fields.
//!
//! The signature is over the manifest bytes exactly as sent: nothing is
//! re-serialised. Ed25519 and ECDSA P-256 with SHA-256 (ASN.1 DER) are
//! verified with ring.
//!
//! ```
//! use iot_ota_core::manifest::{base64_decode, base64_encode};
//! assert_eq!(base64_encode(b"manifest"), "bWFuaWZlc3Q=");
//! assert_eq!(base64_decode("bWFuaWZlc3Q=").unwrap(), b"manifest");
//! assert!(base64_decode("bWFuaWZlc3Q").is_err(), "padding is required");
//! ```

use serde_json::{Map, Value};

use crate::digest::{digest_hex, SignMethod};
use crate::protocol::Rejection;

/// A signature algorithm of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigAlg {
    /// `ed25519` (required of every implementation).
    Ed25519,
    /// `ecdsa-p256-sha256`: ECDSA over P-256 with SHA-256, ASN.1 DER signature.
    EcdsaP256Sha256,
}

impl SigAlg {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SigAlg::Ed25519 => "ed25519",
            SigAlg::EcdsaP256Sha256 => "ecdsa-p256-sha256",
        }
    }

    /// The algorithm named `s` on the wire.
    pub fn parse(s: &str) -> Option<SigAlg> {
        match s {
            "ed25519" => Some(SigAlg::Ed25519),
            "ecdsa-p256-sha256" => Some(SigAlg::EcdsaP256Sha256),
            _ => None,
        }
    }
}

/// The signed facts about one firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The product key it is for.
    pub product: String,
    /// Its version.
    pub firmware_version: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
    /// Its security counter: a device refuses a lower one than it runs.
    pub counter: u64,
    /// The SHA-256 of its chunk index (delta updates), lowercase hex: a
    /// device that pins keys uses an index only if it has this digest.
    pub index_sha256: Option<String>,
}

impl Manifest {
    /// The manifest's bytes, as a platform signs them:
    /// `{"product":..,"firmwareVersion":..,"size":..,"sha256":..,"counter":..}`,
    /// and `"indexSha256":..` last when the image has a chunk index.
    pub fn encode(&self) -> Vec<u8> {
        let s = |v: &str| Value::String(v.to_owned()).to_string();
        let index = match &self.index_sha256 {
            Some(i) => format!(r#","indexSha256":{}"#, s(i)),
            None => String::new(),
        };
        format!(
            r#"{{"product":{},"firmwareVersion":{},"size":{},"sha256":{},"counter":{}{index}}}"#,
            s(&self.product),
            s(&self.firmware_version),
            self.size,
            s(&self.sha256),
            self.counter
        )
        .into_bytes()
    }

    /// Reads manifest bytes: a UTF-8 JSON object with the five fields.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("manifest is not JSON: {e}"))?;
        let obj = v.as_object().ok_or("manifest is not a JSON object")?;
        let text = |k: &str| {
            obj.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("manifest has no {k} string"))
        };
        let number = |k: &str| {
            obj.get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("manifest has no {k} integer"))
        };
        let sha256 = text("sha256")?;
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("manifest sha256 is not 64 hex digits".into());
        }
        let index_sha256 = match obj.get("indexSha256") {
            None | Some(Value::Null) => None,
            Some(Value::String(h)) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Some(h.to_ascii_lowercase())
            }
            Some(_) => return Err("manifest indexSha256 is not 64 hex digits".into()),
        };
        Ok(Manifest {
            product: text("product")?,
            firmware_version: text("firmwareVersion")?,
            size: number("size")?,
            sha256: sha256.to_ascii_lowercase(),
            counter: number("counter")?,
            index_sha256,
        })
    }
}

/// One signature of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The lowercase hex SHA-256 of the signing key's DER SubjectPublicKeyInfo.
    pub key_id: String,
    /// The algorithm.
    pub alg: SigAlg,
    /// The signature bytes.
    pub sig: Vec<u8>,
}

/// A manifest as a command carries it: its bytes, exactly as sent, what
/// they say, and their signatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The manifest bytes (what the signatures are over).
    pub bytes: Vec<u8>,
    /// The bytes, read.
    pub manifest: Manifest,
    /// The signatures.
    pub signatures: Vec<Signature>,
}

impl Signed {
    /// `manifest` signed by each of `keys`.
    pub fn sign(manifest: Manifest, keys: &[&dyn Signer]) -> Result<Signed, String> {
        let bytes = manifest.encode();
        let signatures = keys
            .iter()
            .map(|k| {
                Ok(Signature {
                    key_id: k.key_id(),
                    alg: k.alg(),
                    sig: k.sign(&bytes)?,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Signed {
            bytes,
            manifest,
            signatures,
        })
    }

    /// Reads the optional `manifest` and `signatures` of a command's (or
    /// get reply's) `data`. `Ok(None)` when neither is there; a malformed
    /// one is a 400.
    pub fn from_data(data: &Map<String, Value>) -> Result<Option<Signed>, Rejection> {
        let bad = |m: String| Rejection::bad(m);
        let (manifest, signatures) = match (data.get("manifest"), data.get("signatures")) {
            (None | Some(Value::Null), None | Some(Value::Null)) => return Ok(None),
            (Some(Value::String(m)), Some(Value::Array(s))) => (m, s),
            (Some(Value::String(_)), _) => {
                return Err(bad("signatures must be an array with the manifest".into()))
            }
            (_, Some(Value::Array(_))) => {
                return Err(bad(
                    "manifest must be a base64 string with the signatures".into()
                ))
            }
            _ => return Err(bad("manifest and signatures are malformed".into())),
        };
        if manifest.len() > 16 * 1024 {
            return Err(bad("manifest is longer than 16 KiB".into()));
        }
        let bytes = base64_decode(manifest).map_err(|e| bad(format!("manifest: {e}")))?;
        let parsed = Manifest::parse(&bytes).map_err(bad)?;
        if signatures.len() > 16 {
            return Err(bad("more than 16 signatures".into()));
        }
        let mut sigs = Vec::with_capacity(signatures.len());
        for s in signatures {
            let field = |k: &str| {
                s.get(k)
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("a signature has no {k} string")))
            };
            let key_id = field("keyId")?.to_ascii_lowercase();
            if key_id.len() != 64 || !key_id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad("a signature's keyId is not 64 hex digits".into()));
            }
            let alg_name = field("alg")?;
            let alg = SigAlg::parse(alg_name)
                .ok_or_else(|| bad(format!("signature alg {alg_name:?} is not supported")))?;
            let sig =
                base64_decode(field("sig")?).map_err(|e| bad(format!("a signature's sig: {e}")))?;
            sigs.push(Signature { key_id, alg, sig });
        }
        Ok(Some(Signed {
            bytes,
            manifest: parsed,
            signatures: sigs,
        }))
    }

    /// The `manifest` and `signatures` fields, for a command's `data`.
    pub fn to_fields(&self) -> [(String, Value); 2] {
        let sigs = self
            .signatures
            .iter()
            .map(|s| {
                serde_json::json!({
                    "keyId": s.key_id,
                    "alg": s.alg.as_str(),
                    "sig": base64_encode(&s.sig),
                })
            })
            .collect();
        [
            ("manifest".into(), Value::String(base64_encode(&self.bytes))),
            ("signatures".into(), Value::Array(sigs)),
        ]
    }
}

/// What signs manifests (the platform's key).
pub trait Signer {
    /// The key's id (hex SHA-256 of its public key's SubjectPublicKeyInfo).
    fn key_id(&self) -> String;
    /// The algorithm.
    fn alg(&self) -> SigAlg;
    /// Signs `bytes`.
    fn sign(&self, bytes: &[u8]) -> Result<Vec<u8>, String>;
}

/// DER SubjectPublicKeyInfo prefixes: Ed25519 (RFC 8410) and P-256
/// (RFC 5480, uncompressed point).
const ED25519_SPKI: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
const P256_SPKI: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A pinned public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    key_id: String,
    alg: SigAlg,
    der: Vec<u8>,
}

impl PublicKey {
    /// A key from its DER SubjectPublicKeyInfo (Ed25519 or P-256).
    pub fn from_der(der: &[u8]) -> Result<PublicKey, String> {
        let alg = if der.len() == ED25519_SPKI.len() + 32 && der.starts_with(&ED25519_SPKI) {
            SigAlg::Ed25519
        } else if der.len() == P256_SPKI.len() + 65
            && der.starts_with(&P256_SPKI)
            && der[P256_SPKI.len()] == 0x04
        {
            SigAlg::EcdsaP256Sha256
        } else {
            return Err("not an Ed25519 or P-256 SubjectPublicKeyInfo (PEM \"PUBLIC KEY\")".into());
        };
        Ok(PublicKey {
            key_id: digest_hex(SignMethod::Sha256, der),
            alg,
            der: der.to_vec(),
        })
    }

    /// A key from a PEM `PUBLIC KEY` block.
    pub fn from_pem(pem: &str) -> Result<PublicKey, String> {
        let der = pem_decode(pem, "PUBLIC KEY")?;
        PublicKey::from_der(&der)
    }

    /// An Ed25519 key from its 32 raw bytes.
    pub fn ed25519(raw: &[u8; 32]) -> PublicKey {
        let mut der = ED25519_SPKI.to_vec();
        der.extend_from_slice(raw);
        PublicKey::from_der(&der).expect("a well-formed Ed25519 SPKI")
    }

    /// A P-256 key from its 65-byte uncompressed point.
    pub fn p256(point: &[u8]) -> Result<PublicKey, String> {
        let mut der = P256_SPKI.to_vec();
        der.extend_from_slice(point);
        PublicKey::from_der(&der)
    }

    /// The key id: the lowercase hex SHA-256 of the DER SubjectPublicKeyInfo.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The algorithm.
    pub fn alg(&self) -> SigAlg {
        self.alg
    }

    /// The PEM `PUBLIC KEY` block.
    pub fn to_pem(&self) -> String {
        pem_encode(&self.der, "PUBLIC KEY")
    }

    /// Whether `sig` is this key's signature of `message` with `alg`.
    pub fn verify(&self, alg: SigAlg, message: &[u8], sig: &[u8]) -> bool {
        use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ED25519};
        if alg != self.alg {
            return false;
        }
        match alg {
            SigAlg::Ed25519 => UnparsedPublicKey::new(&ED25519, &self.der[ED25519_SPKI.len()..])
                .verify(message, sig)
                .is_ok(),
            SigAlg::EcdsaP256Sha256 => {
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &self.der[P256_SPKI.len()..])
                    .verify(message, sig)
                    .is_ok()
            }
        }
    }
}

/// The keys a device pins, and the key ids it has revoked. With no key,
/// commands are not checked (the seed's behaviour).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustStore {
    /// The pinned keys.
    pub keys: Vec<PublicKey>,
    /// Revoked key ids (lowercase hex), refused even when pinned.
    pub revoked: Vec<String>,
}

impl TrustStore {
    /// True when at least one key is pinned: every command must then be signed.
    pub fn is_enforced(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The rules of PROTOCOL.md's table, in order. `Err` is the 412 to
    /// reply, its message naming the rule.
    pub fn check(
        &self,
        signed: Option<&Signed>,
        product: &str,
        version: &str,
        size: Option<u64>,
        counter: u64,
    ) -> Result<(), Rejection> {
        if !self.is_enforced() {
            return Ok(());
        }
        let refuse = |m: String| Err(Rejection::refused(m));
        let Some(signed) = signed else {
            return refuse("unsigned firmware: no manifest and signatures".into());
        };
        let verified = signed.signatures.iter().any(|s| {
            !self
                .revoked
                .iter()
                .any(|r| r.eq_ignore_ascii_case(&s.key_id))
                && self
                    .keys
                    .iter()
                    .filter(|k| k.key_id == s.key_id)
                    .any(|k| k.verify(s.alg, &signed.bytes, &s.sig))
        });
        if !verified {
            let tried: Vec<&str> = signed
                .signatures
                .iter()
                .map(|s| s.key_id.as_str())
                .collect();
            return refuse(format!(
                "no signature verifies with a pinned, not revoked key (keyIds tried: {})",
                if tried.is_empty() {
                    "none".to_owned()
                } else {
                    tried.join(", ")
                }
            ));
        }
        let m = &signed.manifest;
        if m.product != product {
            return refuse(format!(
                "manifest product {:?} is not this device's product {product:?}",
                m.product
            ));
        }
        if m.firmware_version != version {
            return refuse(format!(
                "manifest version {} is not the command's version {version}",
                m.firmware_version
            ));
        }
        if let Some(size) = size {
            if m.size != size {
                return refuse(format!(
                    "manifest size {} is not the command's size {size}",
                    m.size
                ));
            }
        }
        if m.counter < counter {
            return refuse(format!(
                "counter {} < {counter}: the manifest's security counter is below the device's (a downgrade)",
                m.counter
            ));
        }
        Ok(())
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard, padded base64 (no whitespace, no other alphabet).
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    if bytes.len() % 4 != 0 {
        return Err("base64 length is not a multiple of 4".into());
    }
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let quads = bytes.len() / 4;
    for (q, quad) in bytes.chunks(4).enumerate() {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && q + 1 != quads) {
            return Err("base64 padding in the wrong place".into());
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = (n << 6) | value(c).ok_or("not base64")?;
        }
        n <<= 6 * pad as u32;
        let got = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        // Non-canonical encodings (stray bits under the padding) are refused.
        if (pad == 1 && got[2] != 0) || (pad == 2 && (got[1] != 0 || got[2] != 0)) {
            return Err("non-canonical base64".into());
        }
        out.extend_from_slice(&got[..3 - pad]);
    }
    Ok(out)
}

/// The DER inside a PEM block labelled `label`.
pub fn pem_decode(pem: &str, label: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin).ok_or_else(|| format!("no {begin} line"))? + begin.len();
    let stop = pem[start..]
        .find(&end)
        .ok_or_else(|| format!("no {end} line"))?
        + start;
    let body: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64_decode(&body)
}

/// `der` as a PEM block labelled `label`, 64 characters a line.
pub fn pem_encode(der: &[u8], label: &str) -> String {
    let b64 = base64_encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Keys for the core's tests.
#[cfg(test)]
pub(crate) mod test_keys {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

    pub(crate) struct Ed(Ed25519KeyPair);
    impl Signer for Ed {
        fn key_id(&self) -> String {
            self.public().key_id
        }
        fn alg(&self) -> SigAlg {
            SigAlg::Ed25519
        }
        fn sign(&self, bytes: &[u8]) -> Result<Vec<u8>, String> {
            Ok(self.0.sign(bytes).as_ref().to_vec())
        }
    }
    impl Ed {
        pub(crate) fn new() -> Ed {
            let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
            Ed(Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap())
        }
        pub(crate) fn public(&self) -> PublicKey {
            PublicKey::ed25519(self.0.public_key().as_ref().try_into().unwrap())
        }
    }

    pub(crate) struct P256(EcdsaKeyPair);
    impl Signer for P256 {
        fn key_id(&self) -> String {
            self.public().key_id
        }
        fn alg(&self) -> SigAlg {
            SigAlg::EcdsaP256Sha256
        }
        fn sign(&self, bytes: &[u8]) -> Result<Vec<u8>, String> {
            let sig = self
                .0
                .sign(&SystemRandom::new(), bytes)
                .map_err(|e| e.to_string())?;
            Ok(sig.as_ref().to_vec())
        }
    }
    impl P256 {
        pub(crate) fn new() -> P256 {
            let rng = SystemRandom::new();
            let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
            P256(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, doc.as_ref(), &rng)
                    .unwrap(),
            )
        }
        pub(crate) fn public(&self) -> PublicKey {
            PublicKey::p256(self.0.public_key().as_ref()).unwrap()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_keys::{Ed, P256};
    use super::*;

    fn manifest(counter: u64) -> Manifest {
        Manifest {
            product: "pk".into(),
            firmware_version: "2.0.1".into(),
            size: 432_945,
            sha256: "ab".repeat(32),
            counter,
            index_sha256: None,
        }
    }

    fn trust(keys: &[PublicKey]) -> TrustStore {
        TrustStore {
            keys: keys.to_vec(),
            revoked: Vec::new(),
        }
    }

    fn code_and_message(r: Result<(), Rejection>) -> (u16, String) {
        let e = r.unwrap_err();
        (e.code.code(), e.message)
    }

    #[test]
    fn base64_round_trips_and_refuses_the_malformed() {
        for n in 0..40u8 {
            let bytes: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(base64_decode(&base64_encode(&bytes)).unwrap(), bytes);
        }
        for bad in ["A", "AB=C", "A===", "ab$=", "QQ=\n", "QR==", "QQ==QQ=="] {
            assert!(base64_decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_manifest_reads_back_what_it_encodes() {
        let m = manifest(3);
        let bytes = m.encode();
        assert!(std::str::from_utf8(&bytes)
            .unwrap()
            .starts_with(r#"{"product":"pk","firmwareVersion":"2.0.1","size":432945,"#));
        assert_eq!(Manifest::parse(&bytes).unwrap(), m);
        assert!(Manifest::parse(br#"{"product":"pk"}"#).is_err());
        assert!(Manifest::parse(b"[1]").is_err());
    }

    #[test]
    fn keys_read_from_pem_and_have_the_spki_hash_as_id() {
        let ed = Ed::new().public();
        let back = PublicKey::from_pem(&ed.to_pem()).unwrap();
        assert_eq!(back, ed);
        assert_eq!(ed.key_id(), digest_hex(SignMethod::Sha256, &ed.der));
        let p = P256::new().public();
        assert_eq!(
            PublicKey::from_pem(&p.to_pem()).unwrap().alg(),
            SigAlg::EcdsaP256Sha256
        );
        assert!(PublicKey::from_pem(
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
        )
        .is_err());
        assert!(PublicKey::from_pem("nothing").is_err());
    }

    /// Every rule of the table, with both algorithms.
    #[test]
    fn every_rule_of_the_table() {
        let (ed, p256) = (Ed::new(), P256::new());
        for signer in [&ed as &dyn Signer, &p256 as &dyn Signer] {
            let key = PublicKey::from_pem(
                &if signer.alg() == SigAlg::Ed25519 {
                    ed.public()
                } else {
                    p256.public()
                }
                .to_pem(),
            )
            .unwrap();
            let t = trust(std::slice::from_ref(&key));
            let signed = Signed::sign(manifest(3), &[signer]).unwrap();
            let ok = |s: &Signed, size, counter| t.check(Some(s), "pk", "2.0.1", size, counter);
            assert_eq!(ok(&signed, Some(432_945), 3), Ok(()));
            assert_eq!(ok(&signed, None, 0), Ok(()), "a get reply has no size");
            // 1. unsigned
            let (code, msg) = code_and_message(t.check(None, "pk", "2.0.1", None, 0));
            assert_eq!(code, 412);
            assert!(msg.contains("unsigned firmware"), "{msg}");
            // 2. no pinned key verifies: another key, a revoked key, a bad signature.
            let other = trust(&[Ed::new().public()]);
            let (_, msg) = code_and_message(other.check(Some(&signed), "pk", "2.0.1", None, 0));
            assert!(msg.contains(&signed.signatures[0].key_id), "{msg}");
            let mut revoked = t.clone();
            revoked.revoked.push(key.key_id().to_uppercase());
            assert!(revoked
                .check(Some(&signed), "pk", "2.0.1", None, 0)
                .is_err());
            let mut tampered = signed.clone();
            tampered.bytes[5] ^= 1;
            assert!(
                ok(&tampered, None, 0).is_err(),
                "the signature covers the bytes"
            );
            let mut wrong_alg = signed.clone();
            wrong_alg.signatures[0].alg = match signer.alg() {
                SigAlg::Ed25519 => SigAlg::EcdsaP256Sha256,
                SigAlg::EcdsaP256Sha256 => SigAlg::Ed25519,
            };
            assert!(ok(&wrong_alg, None, 0).is_err());
            // 3. product, 4. version, 5. size, 6. counter
            let (_, msg) = code_and_message(t.check(Some(&signed), "other", "2.0.1", None, 0));
            assert!(msg.contains("product"), "{msg}");
            let (_, msg) = code_and_message(t.check(Some(&signed), "pk", "2.0.2", None, 0));
            assert!(msg.contains("version"), "{msg}");
            let (_, msg) = code_and_message(ok(&signed, Some(1), 0));
            assert!(msg.contains("size"), "{msg}");
            let (_, msg) = code_and_message(ok(&signed, None, 4));
            assert!(msg.contains("counter 3 < 4"), "{msg}");
        }
        // No pinned key: nothing is checked (the seed's behaviour).
        assert_eq!(
            TrustStore::default().check(None, "pk", "x", None, 9),
            Ok(())
        );
    }

    #[test]
    fn several_keys_and_signatures_rotate() {
        let (old, new) = (Ed::new(), Ed::new());
        let signed = Signed::sign(manifest(1), &[&old, &new]).unwrap();
        // A device that pins only the new key, or only the old one, accepts it.
        for k in [old.public(), new.public()] {
            assert_eq!(
                trust(&[k]).check(Some(&signed), "pk", "2.0.1", None, 0),
                Ok(())
            );
        }
        // The old one revoked: the new signature still verifies.
        let mut t = trust(&[old.public(), new.public()]);
        t.revoked.push(old.public().key_id().to_owned());
        assert_eq!(t.check(Some(&signed), "pk", "2.0.1", None, 0), Ok(()));
    }

    #[test]
    fn the_command_fields_round_trip() {
        let signed = Signed::sign(manifest(7), &[&Ed::new()]).unwrap();
        let data: Map<String, Value> = signed.to_fields().into_iter().collect();
        assert_eq!(Signed::from_data(&data).unwrap(), Some(signed));
        assert_eq!(Signed::from_data(&Map::new()).unwrap(), None);
        let mut bad = data.clone();
        bad.insert("manifest".into(), Value::String("%%%".into()));
        assert!(Signed::from_data(&bad).is_err());
        let mut no_sigs = data.clone();
        no_sigs.remove("signatures");
        assert!(Signed::from_data(&no_sigs).is_err());
        let mut bad_alg = data;
        bad_alg["signatures"][0]["alg"] = Value::String("rsa".into());
        assert!(Signed::from_data(&bad_alg).is_err());
    }
}
