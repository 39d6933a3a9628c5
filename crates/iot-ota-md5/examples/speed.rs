//! Throughput of this MD5 against RustCrypto's `md-5`, over 256 MiB in
//! 64 KiB updates, three times each:
//!
//!     cargo run --release -p iot-ota-md5 --example speed
use md5::Digest as _;

fn main() {
    let buf: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
    let rounds = 4096; // 256 MiB
    let mb = (buf.len() * rounds) as f64 / 1e6;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let mut h = iot_ota_md5::Md5::new();
        for _ in 0..rounds {
            h.update(&buf);
        }
        let ours = h.finalize();
        let a = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let mut r = md5::Md5::new();
        for _ in 0..rounds {
            r.update(&buf);
        }
        let reference: [u8; 16] = r.finalize().into();
        let b = t.elapsed().as_secs_f64();
        assert_eq!(ours, reference);
        println!(
            "iot-ota-md5 {:.0} MB/s, md-5 {:.0} MB/s ({:.2}x)",
            mb / a,
            mb / b,
            b / a
        );
    }
}
