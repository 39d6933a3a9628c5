//! Firmware digests: the sign methods and a streaming hasher.

use iot_ota_md5::Md5;
use sha2::{Digest as _, Sha256};
use std::fmt;

/// Digest algorithm named by a command's `signMethod`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignMethod {
    /// MD5 (`Md5`, `MD5`, `md5`).
    Md5,
    /// SHA-256 (`Sha256`, `SHA256`, `sha-256`, `SHA-256`).
    Sha256,
}

impl SignMethod {
    /// Reads a sign method name, case-insensitively; `None` when unsupported.
    pub fn parse(name: &str) -> Option<SignMethod> {
        match name.trim().to_ascii_lowercase().as_str() {
            "md5" => Some(SignMethod::Md5),
            "sha256" | "sha-256" => Some(SignMethod::Sha256),
            _ => None,
        }
    }

    /// Length of the hex digest: 32 for MD5, 64 for SHA-256.
    pub fn hex_len(self) -> usize {
        match self {
            SignMethod::Md5 => 32,
            SignMethod::Sha256 => 64,
        }
    }

    /// Human name: `MD5` or `SHA-256`.
    pub fn name(self) -> &'static str {
        match self {
            SignMethod::Md5 => "MD5",
            SignMethod::Sha256 => "SHA-256",
        }
    }

    /// The spelling used in messages we send: `Md5` (the guide's) or `Sha256`.
    pub fn wire_name(self) -> &'static str {
        match self {
            SignMethod::Md5 => "Md5",
            SignMethod::Sha256 => "Sha256",
        }
    }
}

impl fmt::Display for SignMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A streaming hasher for one sign method.
#[derive(Clone)]
pub enum Hasher {
    /// MD5 state.
    Md5(Md5),
    /// SHA-256 state.
    Sha256(Sha256),
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hasher({})", self.method())
    }
}

impl Hasher {
    /// A fresh hasher for `method`.
    pub fn new(method: SignMethod) -> Self {
        match method {
            SignMethod::Md5 => Hasher::Md5(Md5::new()),
            SignMethod::Sha256 => Hasher::Sha256(Sha256::new()),
        }
    }

    /// The method this hasher computes.
    pub fn method(&self) -> SignMethod {
        match self {
            Hasher::Md5(_) => SignMethod::Md5,
            Hasher::Sha256(_) => SignMethod::Sha256,
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
        }
    }

    /// The lowercase hex digest of everything fed so far (the state is left as is).
    pub fn hex(&self) -> String {
        match self {
            Hasher::Md5(h) => to_hex(&h.clone().finalize()),
            Hasher::Sha256(h) => to_hex(&h.clone().finalize()),
        }
    }
}

/// Lowercase hex of bytes.
pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

/// The hex digest of a whole byte slice.
pub fn digest_hex(method: SignMethod, bytes: &[u8]) -> String {
    let mut h = Hasher::new(method);
    h.update(bytes);
    h.hex()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        let fox = b"The quick brown fox jumps over the lazy dog";
        assert_eq!(
            digest_hex(SignMethod::Md5, fox),
            "9e107d9d372bb6826bd81d3542a419d6"
        );
        assert_eq!(
            digest_hex(SignMethod::Sha256, fox),
            "d7a8fbb307d7809469ca9abcb0082e4f8d5651e46d3cdb762d02d0bf37c9e592"
        );
        let mut h = Hasher::new(SignMethod::Md5);
        h.update(b"The quick brown ");
        h.update(b"fox jumps over the lazy dog");
        assert_eq!(h.hex(), "9e107d9d372bb6826bd81d3542a419d6");
    }

    #[test]
    fn method_names() {
        for n in ["Md5", "MD5", "md5", " md5 "] {
            assert_eq!(SignMethod::parse(n), Some(SignMethod::Md5));
        }
        for n in ["Sha256", "SHA256", "sha-256", "SHA-256"] {
            assert_eq!(SignMethod::parse(n), Some(SignMethod::Sha256));
        }
        assert_eq!(SignMethod::parse("sha1"), None);
    }
}
