//! The part file: where `download_to` writes before the image is verified,
//! and what makes a resume after a crash safe.
//!
//! `PATH.part` holds the bytes received so far; `PATH.part.meta` names the
//! firmware they belong to (sign method, digest, size), written before the
//! first byte. A later download of the same firmware to the same path keeps
//! the bytes, whatever URL brings the rest: the digest names the content.

use std::io;
use std::path::{Path, PathBuf};

use iot_ota_core::Firmware;

use super::pipeline::DIRECT_ALIGN;
use crate::fsutil::with_suffix;

/// `PATH.part`.
pub(super) fn part_path(path: &Path) -> PathBuf {
    with_suffix(path, ".part")
}

/// `PATH.part.meta`.
pub(super) fn meta_path(path: &Path) -> PathBuf {
    with_suffix(path, ".part.meta")
}

/// The meta file of a part file.
pub(super) fn meta_for_part(part: &Path) -> PathBuf {
    with_suffix(part, ".meta")
}

/// What a part file holds: the firmware's digest names its content.
pub(super) fn resume_key(fw: &Firmware) -> String {
    let size = fw.size.map_or_else(|| "?".to_owned(), |s| s.to_string());
    format!("{} {} {size}\n", fw.sign_method.wire_name(), fw.sign)
}

/// How many bytes of an earlier download of `fw` can be kept: the part
/// file's length, rounded down to the direct-I/O alignment (so later blocks
/// stay aligned), when its meta file names the same firmware; else 0.
pub(super) fn resumable_len(part: &Path, meta: &Path, fw: &Firmware) -> u64 {
    let same = std::fs::read(meta).is_ok_and(|m| m == resume_key(fw).as_bytes());
    let len = match std::fs::metadata(part) {
        Ok(m) if same && m.is_file() => m.len(),
        _ => return 0,
    };
    let len = len - len % DIRECT_ALIGN as u64;
    match fw.size {
        Some(size) if len >= size => 0, // complete yet unverified: start over
        _ => len,
    }
}

/// Opens the part file: kept up to `resume_from` bytes, or new, with its
/// meta file written before any byte.
pub(super) fn open_part(
    part: &Path,
    meta: &Path,
    fw: &Firmware,
    resume_from: u64,
) -> io::Result<std::fs::File> {
    if resume_from > 0 {
        let file = std::fs::OpenOptions::new().write(true).open(part)?;
        file.set_len(resume_from)?;
        return Ok(file);
    }
    let file = std::fs::File::create(part)?;
    std::fs::write(meta, resume_key(fw))?;
    Ok(file)
}

/// Removes a part file and its meta file (either may be missing).
pub(super) fn remove_part(part: &Path) {
    let _ = std::fs::remove_file(part);
    let _ = std::fs::remove_file(meta_for_part(part));
}

#[cfg(test)]
mod tests {
    use super::*;
    use iot_ota_core::SignMethod;

    fn fw(size: Option<u64>) -> Firmware {
        Firmware {
            version: "2.0".into(),
            url: "http://h/f".into(),
            size,
            sign: "9e107d9d372bb6826bd81d3542a419d6".into(),
            sign_method: SignMethod::Md5,
            policy: None,
            signed: None,
            delta: None,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("iot-ota-part-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn names_and_key() {
        let p = Path::new("/data/fw-2.bin");
        assert_eq!(part_path(p), Path::new("/data/fw-2.bin.part"));
        assert_eq!(meta_path(p), Path::new("/data/fw-2.bin.part.meta"));
        assert_eq!(meta_for_part(&part_path(p)), meta_path(p));
        assert_eq!(
            resume_key(&fw(Some(10))),
            "Md5 9e107d9d372bb6826bd81d3542a419d6 10\n"
        );
        assert_eq!(
            resume_key(&fw(None)),
            "Md5 9e107d9d372bb6826bd81d3542a419d6 ?\n"
        );
    }

    #[test]
    fn resumes_only_the_same_firmware_and_aligned() {
        let d = dir("resume");
        let (part, meta) = (d.join("f.part"), d.join("f.part.meta"));
        let firmware = fw(Some(100_000));
        drop(open_part(&part, &meta, &firmware, 0).unwrap());
        std::fs::write(&part, vec![1u8; 10_000]).unwrap();
        // Rounded down to 4096.
        assert_eq!(resumable_len(&part, &meta, &firmware), 8192);
        // Another firmware's part file is not resumed.
        let mut other = firmware.clone();
        other.sign = "0".repeat(32);
        assert_eq!(resumable_len(&part, &meta, &other), 0);
        // Complete yet unverified: start over.
        std::fs::write(&part, vec![1u8; 102_400]).unwrap();
        assert_eq!(resumable_len(&part, &meta, &firmware), 0);
        // Reopened for a resume: cut to the kept length.
        std::fs::write(&part, vec![1u8; 10_000]).unwrap();
        drop(open_part(&part, &meta, &firmware, 8192).unwrap());
        assert_eq!(std::fs::metadata(&part).unwrap().len(), 8192);
        // No meta file: nothing to resume.
        std::fs::remove_file(&meta).unwrap();
        assert_eq!(resumable_len(&part, &meta, &firmware), 0);
        remove_part(&part);
        assert!(!part.exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}
