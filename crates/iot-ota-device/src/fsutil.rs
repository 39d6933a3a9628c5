//! Durable file replacement: the one way the SDK (and the agent) replace a
//! file that must survive a power cut whole, old or new, never torn.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Writes `contents` to `path` atomically: a temporary file next to it,
/// fsynced, renamed over `path`, and the directory fsynced so the rename
/// itself is durable. A crash at any point leaves the old file or the new
/// one. The temporary file is removed if the write fails.
///
/// ```
/// let dir = std::env::temp_dir().join(format!("fsutil-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let file = dir.join("version");
/// iot_ota_device::fsutil::write_atomic(&file, b"2.0.1\n")?;
/// assert_eq!(std::fs::read(&file)?, b"2.0.1\n");
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    rename_durable(&tmp, path)
}

/// Renames `from` over `to` and fsyncs the directory of `to`, so the rename
/// survives a power cut. (`from`'s data must already be synced.)
pub fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    sync_dir(to)
}

/// Makes a rename durable: fsync the directory that holds `path`.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

fn temp_path(path: &Path) -> PathBuf {
    with_suffix(path, ".tmp")
}

/// Bytes an unprivileged process may still write on the filesystem that
/// holds `path` (statvfs: `f_bavail * f_frsize`).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
// The fields are u64 on 64-bit Linux, narrower on some 32-bit targets.
#[allow(clippy::useless_conversion)]
pub fn free_space(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` is valid for writing
    // one statvfs; it is read only after statvfs reported success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

/// Free space is not measured on this platform: never refuses.
#[cfg(not(target_os = "linux"))]
pub fn free_space(_path: &Path) -> io::Result<u64> {
    Ok(u64::MAX)
}

/// `path` with `suffix` appended to its last component (`fw.bin` ->
/// `fw.bin.part`).
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_and_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("iot-ota-fsutil-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("state");
        write_atomic(&file, b"one").unwrap();
        write_atomic(&file, b"two").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"two");
        assert!(!temp_path(&file).exists());
        // A write that cannot happen leaves the old file as it was.
        let missing = dir.join("no/such/dir/state");
        assert!(write_atomic(&missing, b"x").is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"two");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
