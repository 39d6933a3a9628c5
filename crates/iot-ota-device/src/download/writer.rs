//! The image writer: the download's bytes to disk at increasing offsets,
//! with direct I/O where it works.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

use iot_ota_core::{FetchError, Verified};
use tokio::sync::mpsc;

use super::part::remove_part;
use super::pipeline::{worse, Block, Sink, BUFFERS, DIRECT_ALIGN};

/// The part file being written, and where the download resumes in it.
pub(super) struct PartFile {
    pub(super) file: std::fs::File,
    pub(super) path: PathBuf,
    pub(super) resume_from: u64,
}

/// What the hasher hands the writer thread.
enum ToWriter {
    Data(Block, usize),
    /// Everything is written: sync and stop.
    Finish,
}

/// `download_to`'s sink: the image writer on a thread of its own (writing
/// to the page cache costs almost half as much as MD5 again, so it does not
/// run after each hash on the hasher's thread).
pub(super) struct FileSink {
    to_writer: Option<SyncSender<ToWriter>>,
    writer: Option<JoinHandle<Result<(), FetchError>>>,
    part: PathBuf,
}

impl FileSink {
    /// Starts the writer thread on `image`; written blocks go back to `free_tx`.
    pub(super) fn start(
        image: PartFile,
        free_tx: mpsc::Sender<Block>,
    ) -> Result<FileSink, FetchError> {
        let part = image.path.clone();
        let (to_writer, rx) = sync_channel::<ToWriter>(BUFFERS);
        let writer = std::thread::Builder::new()
            .name("ota-write".into())
            .spawn(move || write_stage(image, rx, free_tx))
            .map_err(|e| FetchError::Storage(format!("cannot start the writer thread: {e}")))?;
        Ok(FileSink {
            to_writer: Some(to_writer),
            writer: Some(writer),
            part,
        })
    }

    /// Stops the writer once it has written what it was given; its result.
    fn join(&mut self) -> Result<(), FetchError> {
        drop(self.to_writer.take());
        match self.writer.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(FetchError::Storage("the writer thread panicked".into())),
            None => Err(FetchError::Cancelled),
        }
    }
}

impl Sink for FileSink {
    fn data(&mut self, block: Block, n: usize, _: u64, _: Option<u64>) -> Result<(), FetchError> {
        let sent = self
            .to_writer
            .as_ref()
            .is_some_and(|w| w.send(ToWriter::Data(block, n)).is_ok());
        if sent {
            Ok(())
        } else {
            // The writer stopped: its own error says why.
            Err(self.join().err().unwrap_or(FetchError::Cancelled))
        }
    }

    fn end(&mut self) -> Result<(), FetchError> {
        if let Some(w) = &self.to_writer {
            let _ = w.send(ToWriter::Finish);
        }
        self.join()
    }

    fn verified(&mut self, _: &Verified) {}

    /// Lets the writer finish what it was given, so that a failure is
    /// reported only once the part file holds every byte hashed (a resume
    /// right after it is exact). Keeps the part file for a resume when its
    /// bytes are good (the network failed, or the download was cancelled),
    /// removes it otherwise: a non-retryable error (404, TLS, a server that
    /// ignores Range, a full disk) would fail the same way from the same bytes.
    fn failed(&mut self, error: FetchError) -> FetchError {
        let error = worse(error, self.join().err());
        let resumable = matches!(
            error,
            FetchError::Transport {
                retryable: true,
                ..
            } | FetchError::Cancelled
        );
        if !resumable {
            remove_part(&self.part);
        }
        error
    }
}

/// Writes the hashed buffers in order, returns them to the reader, and syncs
/// the file when told everything is written.
fn write_stage(
    part: PartFile,
    rx: std::sync::mpsc::Receiver<ToWriter>,
    free_tx: mpsc::Sender<Block>,
) -> Result<(), FetchError> {
    let PartFile {
        file,
        path,
        resume_from,
    } = part;
    let part = path.as_path();
    let mut image = ImageWriter::new(file, part, resume_from);
    for msg in rx {
        match msg {
            ToWriter::Data(buf, n) => {
                image
                    .write(buf.bytes(n))
                    .map_err(|e| FetchError::Storage(format!("writing {}: {e}", part.display())))?;
                // The reader may have stopped; then the buffer is just freed.
                let _ = free_tx.blocking_send(buf);
            }
            ToWriter::Finish => {
                return image
                    .file
                    .sync_all()
                    .map_err(|e| FetchError::Storage(format!("syncing {}: {e}", part.display())));
            }
        }
    }
    Err(FetchError::Cancelled)
}

/// Writes the image at increasing offsets: with `O_DIRECT` where the file
/// system allows it and the block is aligned, through the page cache
/// otherwise (the tail, a block cut short by a resume, tmpfs).
///
/// Why: on a two-core device the download is CPU-bound (receive, hash,
/// write), and the copy into the page cache costs about a third as much as
/// MD5 itself; direct I/O lets the disk DMA from our buffer instead, and
/// leaves little for the final fsync to flush.
pub(super) struct ImageWriter {
    file: std::fs::File,
    direct: Option<std::fs::File>,
    offset: u64,
}

impl ImageWriter {
    /// A writer that goes on at `offset` in `file` (opened at `part`).
    pub(super) fn new(file: std::fs::File, part: &Path, offset: u64) -> ImageWriter {
        ImageWriter {
            file,
            direct: open_direct(part),
            offset,
        }
    }

    /// Writes `bytes` at the current offset.
    pub(super) fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let aligned = self.offset % DIRECT_ALIGN as u64 == 0
            && bytes.len() % DIRECT_ALIGN == 0
            && (bytes.as_ptr() as usize) % DIRECT_ALIGN == 0;
        if let (Some(direct), true) = (&self.direct, aligned) {
            match direct.write_all_at(bytes, self.offset) {
                Ok(()) => {
                    self.offset += bytes.len() as u64;
                    return Ok(());
                }
                // Some file systems accept O_DIRECT at open and refuse the
                // write: fall back for good; nothing was written.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => self.direct = None,
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(bytes, self.offset)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// True while blocks go to disk with direct I/O.
    #[cfg(test)]
    fn is_direct(&self) -> bool {
        self.direct.is_some()
    }
}

#[cfg(target_os = "linux")]
fn open_direct(part: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(part)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_part: &Path) -> Option<std::fs::File> {
    None
}

#[cfg(test)]
mod tests {
    use super::super::pipeline::Block;
    use super::*;

    /// Aligned blocks, an unaligned tail and a misaligned buffer all land
    /// where they belong, whether or not this file system takes O_DIRECT
    /// (tmpfs refuses it at open; ext4 takes it).
    #[test]
    fn aligned_and_unaligned_writes_land_in_order() {
        let dir = std::env::temp_dir().join(format!("iot-ota-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img.part");
        let file = std::fs::File::create(&path).unwrap();
        let mut w = ImageWriter::new(file, &path, 0);
        let mut block = Block::new(2 * DIRECT_ALIGN);
        block.space().fill(7);
        w.write(block.bytes(DIRECT_ALIGN)).unwrap(); // aligned: direct if possible
        w.write(&[1, 2, 3]).unwrap(); // unaligned length: page cache
        let misaligned = vec![9u8; DIRECT_ALIGN + 1];
        w.write(&misaligned[1..]).unwrap(); // aligned length, odd address
        w.file.sync_all().unwrap();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len(), 2 * DIRECT_ALIGN + 3);
        assert!(got[..DIRECT_ALIGN].iter().all(|&b| b == 7));
        assert_eq!(&got[DIRECT_ALIGN..DIRECT_ALIGN + 3], &[1, 2, 3]);
        assert!(got[DIRECT_ALIGN + 3..].iter().all(|&b| b == 9));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A file system that accepts O_DIRECT at open and refuses the write
    /// with EINVAL makes the writer fall back for good, losing nothing. The
    /// refusing "direct" handle is simulated with a kernel file whose writes
    /// fail with EINVAL on anything but a number (`/proc/self/oom_score_adj`).
    #[cfg(target_os = "linux")]
    #[test]
    fn einval_on_direct_falls_back_to_the_page_cache() {
        let dir = std::env::temp_dir().join(format!("iot-ota-writer2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img.part");
        let file = std::fs::File::create(&path).unwrap();
        let mut w = ImageWriter::new(file, &path, 0);
        let refusing = std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/self/oom_score_adj")
            .unwrap();
        w.direct = Some(refusing);
        let mut block = Block::new(DIRECT_ALIGN);
        block.space().fill(b'x');
        w.write(block.bytes(DIRECT_ALIGN)).unwrap();
        assert!(!w.is_direct(), "fell back for good");
        w.write(block.bytes(DIRECT_ALIGN)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![b'x'; 2 * DIRECT_ALIGN]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Any other error of a direct write is the caller's to report.
    #[test]
    fn other_direct_errors_are_reported() {
        let dir = std::env::temp_dir().join(format!("iot-ota-writer3-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img.part");
        let file = std::fs::File::create(&path).unwrap();
        let mut w = ImageWriter::new(file, &path, 0);
        // Read-only: writes fail with EBADF.
        w.direct = Some(std::fs::File::open(&path).unwrap());
        let mut block = Block::new(DIRECT_ALIGN);
        block.space().fill(1);
        assert!(w.write(block.bytes(DIRECT_ALIGN)).is_err());
        assert!(w.is_direct());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
