//! MD5 (RFC 1321) for the SDK's image digests.
//!
//! MD5 is the one serial cost of an MD5-signed download: every byte goes
//! through it, one block after another, on one core. RustCrypto's `md-5`
//! (even with its assembly) ran at about 500 MB/s on the machines we
//! measured, below `md5sum` (570) and OpenSSL (610); this one runs at
//! 575-620 MB/s there (`cargo run --release -p iot-ota-md5 --example speed`),
//! which the download itself gains on both APIs. It is no security
//! primitive here: an MD5 digest checks that an image arrived intact, and a
//! signed manifest (SHA-256) is what proves where it came from.
//!
//! The speed comes from the round function G. Written as a sum,
//! `(b & d) + (c & !d)`, rather than `(b & d) | (c & !d)`, its second half
//! depends only on values of the round before, so it runs while `b` (the
//! previous round's result, the critical path) is still being computed.
//!
//! ```
//! let mut h = iot_ota_md5::Md5::new();
//! h.update(b"message ");
//! h.update(b"digest");
//! assert_eq!(h.finalize(), iot_ota_md5::digest(b"message digest"));
//! ```

/// A streaming MD5 state.
#[derive(Clone, Debug)]
pub struct Md5 {
    state: [u32; 4],
    /// Bytes fed so far.
    len: u64,
    /// A partial block waiting for the rest.
    pending: [u8; 64],
    pending_len: usize,
}

impl Default for Md5 {
    fn default() -> Self {
        Md5::new()
    }
}

impl Md5 {
    /// A fresh state.
    pub fn new() -> Md5 {
        Md5 {
            state: [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476],
            len: 0,
            pending: [0; 64],
            pending_len: 0,
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.len = self.len.wrapping_add(bytes.len() as u64);
        if self.pending_len > 0 {
            let take = (64 - self.pending_len).min(bytes.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&bytes[..take]);
            self.pending_len += take;
            bytes = &bytes[take..];
            if self.pending_len < 64 {
                return;
            }
            let block = self.pending;
            compress(&mut self.state, &block);
            self.pending_len = 0;
        }
        let whole = bytes.len() - bytes.len() % 64;
        compress(&mut self.state, &bytes[..whole]);
        let rest = &bytes[whole..];
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// The digest of everything fed.
    pub fn finalize(mut self) -> [u8; 16] {
        let bits = self.len.wrapping_mul(8);
        let mut tail = [0u8; 128];
        tail[..self.pending_len].copy_from_slice(&self.pending[..self.pending_len]);
        tail[self.pending_len] = 0x80;
        let end = if self.pending_len < 56 { 64 } else { 128 };
        tail[end - 8..end].copy_from_slice(&bits.to_le_bytes());
        compress(&mut self.state, &tail[..end]);
        let mut out = [0u8; 16];
        for (o, w) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&w.to_le_bytes());
        }
        out
    }
}

/// The digest of `bytes`.
pub fn digest(bytes: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(bytes);
    h.finalize()
}

/// Shift amounts per round (RFC 1321, 3.4).
const S: [u32; 64] = [
    7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, //
    5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20, //
    4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, //
    6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
];

/// floor(abs(sin(i + 1)) * 2^32) (RFC 1321, 3.4).
const K: [u32; 64] = [
    0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
    0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
    0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
    0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
    0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
    0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
    0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
    0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391,
];

/// One round: `a = b + ((a + f + m + k) <<< s)`.
#[inline(always)]
fn step(a: u32, b: u32, f: u32, m: u32, k: u32, s: u32) -> u32 {
    a.wrapping_add(f)
        .wrapping_add(m)
        .wrapping_add(k)
        .rotate_left(s)
        .wrapping_add(b)
}

/// Runs the 64 rounds over each whole 64-byte block of `blocks`.
fn compress(state: &mut [u32; 4], blocks: &[u8]) {
    // The constants stay memory operands: folded into the instructions as
    // immediates, the compiler orders the additions worse (about 15% slower
    // here).
    let k: &[u32; 64] = std::hint::black_box(&K);
    for block in blocks.chunks_exact(64) {
        let mut m = [0u32; 16];
        for (w, bytes) in m.iter_mut().zip(block.chunks_exact(4)) {
            *w = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        let [mut a, mut b, mut c, mut d] = *state;
        macro_rules! f {
            ($a:ident, $b:ident, $c:ident, $d:ident, $i:expr) => {
                $a = step($a, $b, $d ^ ($b & ($c ^ $d)), m[$i], k[$i], S[$i]);
            };
        }
        macro_rules! g {
            ($a:ident, $b:ident, $c:ident, $d:ident, $i:expr, $g:expr) => {
                // (b & d) | (c & !d), as a sum: the c, d half is ready before b.
                $a = $a
                    .wrapping_add(m[$g])
                    .wrapping_add(k[$i])
                    .wrapping_add($c & !$d)
                    .wrapping_add($b & $d)
                    .rotate_left(S[$i])
                    .wrapping_add($b);
            };
        }
        macro_rules! h {
            ($a:ident, $b:ident, $c:ident, $d:ident, $i:expr, $g:expr) => {
                $a = step($a, $b, $b ^ $c ^ $d, m[$g], k[$i], S[$i]);
            };
        }
        macro_rules! i {
            ($a:ident, $b:ident, $c:ident, $d:ident, $i:expr, $g:expr) => {
                $a = step($a, $b, $c ^ ($b | !$d), m[$g], k[$i], S[$i]);
            };
        }
        f!(a, b, c, d, 0);
        f!(d, a, b, c, 1);
        f!(c, d, a, b, 2);
        f!(b, c, d, a, 3);
        f!(a, b, c, d, 4);
        f!(d, a, b, c, 5);
        f!(c, d, a, b, 6);
        f!(b, c, d, a, 7);
        f!(a, b, c, d, 8);
        f!(d, a, b, c, 9);
        f!(c, d, a, b, 10);
        f!(b, c, d, a, 11);
        f!(a, b, c, d, 12);
        f!(d, a, b, c, 13);
        f!(c, d, a, b, 14);
        f!(b, c, d, a, 15);
        g!(a, b, c, d, 16, 1);
        g!(d, a, b, c, 17, 6);
        g!(c, d, a, b, 18, 11);
        g!(b, c, d, a, 19, 0);
        g!(a, b, c, d, 20, 5);
        g!(d, a, b, c, 21, 10);
        g!(c, d, a, b, 22, 15);
        g!(b, c, d, a, 23, 4);
        g!(a, b, c, d, 24, 9);
        g!(d, a, b, c, 25, 14);
        g!(c, d, a, b, 26, 3);
        g!(b, c, d, a, 27, 8);
        g!(a, b, c, d, 28, 13);
        g!(d, a, b, c, 29, 2);
        g!(c, d, a, b, 30, 7);
        g!(b, c, d, a, 31, 12);
        h!(a, b, c, d, 32, 5);
        h!(d, a, b, c, 33, 8);
        h!(c, d, a, b, 34, 11);
        h!(b, c, d, a, 35, 14);
        h!(a, b, c, d, 36, 1);
        h!(d, a, b, c, 37, 4);
        h!(c, d, a, b, 38, 7);
        h!(b, c, d, a, 39, 10);
        h!(a, b, c, d, 40, 13);
        h!(d, a, b, c, 41, 0);
        h!(c, d, a, b, 42, 3);
        h!(b, c, d, a, 43, 6);
        h!(a, b, c, d, 44, 9);
        h!(d, a, b, c, 45, 12);
        h!(c, d, a, b, 46, 15);
        h!(b, c, d, a, 47, 2);
        i!(a, b, c, d, 48, 0);
        i!(d, a, b, c, 49, 7);
        i!(c, d, a, b, 50, 14);
        i!(b, c, d, a, 51, 5);
        i!(a, b, c, d, 52, 12);
        i!(d, a, b, c, 53, 3);
        i!(c, d, a, b, 54, 10);
        i!(b, c, d, a, 55, 1);
        i!(a, b, c, d, 56, 8);
        i!(d, a, b, c, 57, 15);
        i!(c, d, a, b, 58, 6);
        i!(b, c, d, a, 59, 13);
        i!(a, b, c, d, 60, 4);
        i!(d, a, b, c, 61, 11);
        i!(c, d, a, b, 62, 2);
        i!(b, c, d, a, 63, 9);
        state[0] = state[0].wrapping_add(a);
        state[1] = state[1].wrapping_add(b);
        state[2] = state[2].wrapping_add(c);
        state[3] = state[3].wrapping_add(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use md5::Digest as _;
    use proptest::prelude::*;

    #[test]
    fn rfc_1321_test_suite() {
        let cases: [(&str, &str); 7] = [
            ("", "d41d8cd98f00b204e9800998ecf8427e"),
            ("a", "0cc175b9c0f1b6a831c399e269772661"),
            ("abc", "900150983cd24fb0d6963f7d28e17f72"),
            ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
            (
                "abcdefghijklmnopqrstuvwxyz",
                "c3fcd3d76192e4007dfb496cca67e13b",
            ),
            (
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
                "d174ab98d277d9f5a5611c2c9f419d9f",
            ),
            (
                "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
        ];
        for (input, want) in cases {
            let hex: String = digest(input.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(hex, want, "MD5({input:?})");
        }
    }

    #[test]
    fn every_padding_length_matches_the_reference() {
        // Lengths around each block boundary, where the padding spills.
        let data: Vec<u8> = (0..300u32).map(|i| (i * 131 % 251) as u8).collect();
        for n in 0..data.len() {
            let want: [u8; 16] = md5::Md5::digest(&data[..n]).into();
            assert_eq!(digest(&data[..n]), want, "length {n}");
        }
    }

    proptest! {
        #[test]
        fn any_split_into_updates_matches_the_reference(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            cuts in proptest::collection::vec(0usize..2000, 0..8),
        ) {
            let mut h = Md5::new();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort_unstable();
            let mut from = 0;
            for cut in cuts {
                h.update(&data[from..cut]);
                from = cut;
            }
            h.update(&data[from..]);
            let want: [u8; 16] = md5::Md5::digest(&data).into();
            prop_assert_eq!(h.finalize(), want);
        }
    }
}
