//! Small helpers: free ports and deterministic test data.

use std::io::{self, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is found by binding port 0 and reading what the kernel chose;
/// the listener is closed before returning, so another process could take
/// it in between. Tests that can bind port 0 themselves should.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// `n` pseudo-random bytes, the same for the same `seed` on every machine.
///
/// A xorshift64* generator: fast, deterministic, and with no dependency.
/// Not for cryptography; meant for firmware images whose digests must not
/// collide by accident.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; n];
    XorShift::new(seed).fill(&mut out);
    out
}

/// Writes `len` bytes to `path`: the same bytes as `random_bytes(len, seed)`,
/// generated in 1 MiB pieces so that a large benchmark file never sits in
/// memory whole.
pub fn write_random_file(path: impl AsRef<Path>, len: u64, seed: u64) -> io::Result<()> {
    // A multiple of 8, so that the pieces join into the same stream of words
    // as one `random_bytes` call.
    const PIECE: usize = 1 << 20;
    let mut file = io::BufWriter::new(std::fs::File::create(path)?);
    let mut rng = XorShift::new(seed);
    let mut buf = vec![0u8; PIECE];
    let mut left = len;
    while left > 0 {
        let n = left.min(PIECE as u64) as usize;
        rng.fill(&mut buf[..n]);
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    file.flush()
}

/// xorshift64* (Vigna): one 64-bit word per step.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // A zero state would stay zero forever; mix the seed so that small
        // seeds (0, 1, 2) still give unrelated streams.
        let state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        XorShift(if state == 0 { 1 } else { state })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Fills `out` word by word; a trailing partial word takes the low bytes.
    fn fill(&mut self, out: &mut [u8]) {
        let mut words = out.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = words.into_remainder();
        if !rest.is_empty() {
            let bytes = self.next().to_le_bytes();
            rest.copy_from_slice(&bytes[..rest.len()]);
        }
    }
}

/// An upgrade command's JSON (PROTOCOL.md message 1), policy `standard`, for
/// an image of `size` bytes whose digest is `sign` by `sign_method` (the
/// wire name: `Md5`, `SHA256`).
pub fn upgrade_command(
    id: &str,
    version: &str,
    url: &str,
    size: usize,
    sign: &str,
    sign_method: &str,
) -> String {
    serde_json::json!({
        "msgId": id,
        "version": "1.0",
        "data": {
            "policy": "standard",
            "size": size,
            "firmwareVersion": version,
            "url": url,
            "sign": sign,
            "signMethod": sign_method,
        }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_are_deterministic_and_seeded() {
        assert_eq!(random_bytes(1000, 1), random_bytes(1000, 1));
        assert_ne!(random_bytes(1000, 1), random_bytes(1000, 2));
        assert_ne!(random_bytes(64, 0), vec![0u8; 64]);
        assert_eq!(random_bytes(13, 5)[..], random_bytes(100, 5)[..13]);
    }

    #[test]
    fn random_file_matches_random_bytes() {
        let dir = crate::TempDir::new("rand");
        let path = dir.join("r.bin");
        let len = (1 << 20) + 12_345;
        write_random_file(&path, len as u64, 9).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), random_bytes(len, 9));
    }

    #[test]
    fn free_port_is_bindable() {
        let port = free_port();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
    }
}
