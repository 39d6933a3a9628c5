//! One firmware download: pull it chunk by chunk with [`Download::fetch_yield`]
//! (what the C API's `iot_ota_fetch_yield` needs), or let
//! [`Download::download_to`] write it to a file, verified, atomically.
//!
//! Both ways feed the same [`Fetch`] from the same [`Source`], so counting,
//! digests, length checks, resume and reports behave the same.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iot_ota_core::{Fetch, FetchError, FetchState, Firmware, Verified};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::http::{Body, HttpOptions};
use crate::session::Session;

/// How downloads connect and resume.
#[derive(Debug, Clone, Default)]
pub struct DownloadOptions {
    /// HTTP(S) settings.
    pub http: HttpOptions,
    /// How many times a broken transfer resumes with a Range request.
    pub retries: u32,
}

/// What the source produced.
enum Chunk {
    /// A (re)opened response carries the body from `offset`, `remaining` bytes if known.
    Opened { offset: u64, remaining: Option<u64> },
    /// `n` bytes were read into the buffer.
    Data(usize),
    /// The body is complete.
    End,
}

/// The HTTP side of a download: opens the URL, and resumes a broken transfer
/// from where it stopped (Range), a bounded number of times.
struct Source {
    url: String,
    options: DownloadOptions,
    body: Option<Body>,
    retries_left: u32,
}

impl Source {
    fn new(url: String, options: DownloadOptions) -> Source {
        Source {
            url,
            retries_left: options.retries,
            options,
            body: None,
        }
    }

    /// The next chunk. `received` is how many body bytes were taken so far,
    /// where a resumed request starts.
    ///
    /// Cancel-safe between awaits: a cancelled open is simply redone; a
    /// cancelled read loses nothing (the body's reads are cancel-safe).
    async fn next(&mut self, received: u64, buf: &mut [u8]) -> Result<Chunk, FetchError> {
        loop {
            let Some(body) = self.body.as_mut() else {
                match Body::open(&self.url, received, &self.options.http).await {
                    Ok(body) => {
                        let chunk = Chunk::Opened {
                            offset: body.offset(),
                            remaining: body.remaining(),
                        };
                        self.body = Some(body);
                        return Ok(chunk);
                    }
                    Err(e) => {
                        self.retry_or_fail(e.into()).await?;
                        continue;
                    }
                }
            };
            match body.read(buf).await {
                Ok(0) => return Ok(Chunk::End),
                Ok(n) => return Ok(Chunk::Data(n)),
                Err(e) => {
                    self.body = None;
                    self.retry_or_fail(e.into()).await?;
                }
            }
        }
    }

    async fn retry_or_fail(&mut self, error: FetchError) -> Result<(), FetchError> {
        if !error.is_retryable() || self.retries_left == 0 {
            return Err(error);
        }
        let attempt = self.options.retries - self.retries_left;
        self.retries_left -= 1;
        let pause = Duration::from_millis(500) * 2u32.pow(attempt.min(6));
        log::warn!("download interrupted ({error}); resuming in {pause:?}");
        tokio::time::sleep(pause).await;
        Ok(())
    }
}

/// One firmware download, reporting its progress through the session.
///
/// Reports are automatic: DOWNLOADING at 0% when the first call starts it,
/// then as the throttle allows and at 100%; DOWNLOADED once the size and
/// digest check out, or DOWNLOAD_FAILED / VERIFY_FAILED with the reason.
/// Dropping an unfinished download reports it failed ("download cancelled"),
/// so the device is not left busy.
pub struct Download {
    session: Arc<Session>,
    fetch: Fetch,
    source: Source,
    started: bool,
    /// Set while `download_to`'s worker owns the real fetch state: it reports
    /// the outcome, including a cancel, so `Drop` must not report again.
    handed_off: bool,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("fetch", &self.fetch)
            .field("url", &self.source.url)
            .finish_non_exhaustive()
    }
}

impl Download {
    /// A download of `firmware`, reporting through `session`. Fresh counters
    /// and digest: nothing carries over from an earlier download.
    pub fn new(session: Arc<Session>, firmware: Firmware, options: DownloadOptions) -> Download {
        let throttle = session.core_config().throttle;
        Download {
            source: Source::new(firmware.url.clone(), options),
            fetch: Fetch::new(firmware, throttle),
            session,
            started: false,
            handed_off: false,
        }
    }

    /// The firmware being downloaded.
    pub fn firmware(&self) -> &Firmware {
        self.fetch.firmware()
    }

    /// `Fetching` until the download has ended, then `Fetched`.
    pub fn state(&self) -> FetchState {
        self.fetch.state()
    }

    /// True while downloading.
    pub fn is_fetching(&self) -> bool {
        self.fetch.state() == FetchState::Fetching
    }

    /// True once the download has ended (complete or failed).
    pub fn is_finished(&self) -> bool {
        self.fetch.state() == FetchState::Fetched
    }

    /// Bytes received so far.
    pub fn fetched_size(&self) -> u64 {
        self.fetch.received()
    }

    /// The firmware's size, when known (from the command or the server).
    pub fn file_size(&self) -> Option<u64> {
        self.fetch.total()
    }

    /// The outcome, once ended: the verified size and digest, or why it failed.
    pub fn outcome(&self) -> Option<&Result<Verified, FetchError>> {
        self.fetch.outcome()
    }

    /// The digest of what was received so far, lowercase hex.
    pub fn digest_hex(&self) -> String {
        self.fetch.digest_hex()
    }

    /// Ends the download without reporting anything: for when the application
    /// has itself reported the upgrade's outcome (SUCCESS or a failure
    /// status), so the "download cancelled" report that dropping an
    /// unfinished download sends would be a second, contradicting one.
    /// (The C API uses it when `iot_ota_report_progress` ends an upgrade
    /// whose download is still running.)
    pub fn abandon(mut self) {
        self.fetch.fail(FetchError::Cancelled);
    }

    fn begin(&mut self) {
        if !self.started {
            self.started = true;
            let report = self.fetch.begin(Instant::now());
            self.session.publish_progress(&report);
        }
    }

    /// Ends the download with `error`, reporting it; returns it as an [`Error`].
    fn fail(&mut self, error: FetchError) -> Error {
        let error = self.fetch.fail(error);
        self.session
            .publish_progress(&self.fetch.failure_report(&error));
        Error::Fetch(error)
    }

    /// Verifies the complete body and reports the outcome.
    fn finish(&mut self) -> Result<(), Error> {
        match self.fetch.handle_end() {
            Ok(report) => {
                self.session.publish_progress(&report);
                Ok(())
            }
            Err(FetchError::Finished) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Reads the next bytes of the firmware into `buf`, waiting at most `timeout`.
    ///
    /// Returns the number of bytes copied (> 0); `Ok(0)` once the download is
    /// complete and verified (and on every call after); [`Error::Timeout`] when
    /// nothing arrived in time (the download goes on: call again); any other
    /// error when it failed (already reported; every later call returns it).
    /// The call that returns the last bytes also verifies them, so
    /// [`Download::is_finished`] is true right after it.
    pub async fn fetch_yield(&mut self, buf: &mut [u8], timeout: Duration) -> Result<usize, Error> {
        if let Some(outcome) = self.fetch.outcome() {
            return match outcome {
                Ok(_) => Ok(0),
                Err(e) => Err(Error::Fetch(e.clone())),
            };
        }
        if buf.is_empty() {
            return Err(Error::Core(iot_ota_core::Error::InvalidParam(
                "the buffer is empty".into(),
            )));
        }
        self.begin();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let received = self.fetch.received();
            let next = tokio::time::timeout_at(deadline, self.source.next(received, buf)).await;
            match next {
                Err(_) => return Err(Error::Timeout),
                Ok(Err(e)) => return Err(self.fail(e)),
                Ok(Ok(Chunk::Opened { offset, remaining })) => {
                    if let Err(e) = self.fetch.handle_response(offset, remaining) {
                        return Err(self.fail(e));
                    }
                }
                Ok(Ok(Chunk::Data(n))) => {
                    match self.fetch.handle_data(&buf[..n], Instant::now()) {
                        Ok(Some(report)) => self.session.publish_progress(&report),
                        Ok(None) => {}
                        Err(e) => return Err(self.fail(e)),
                    }
                    if self.fetch.total() == Some(self.fetch.received()) {
                        // The last byte: confirm the server has no more, then verify,
                        // so the state is `fetched` when the caller gets these bytes.
                        self.confirm_end().await?;
                    }
                    return Ok(n);
                }
                Ok(Ok(Chunk::End)) => {
                    self.finish()?;
                    return Ok(0);
                }
            }
        }
    }

    /// After the declared last byte: the body must end there. The caller's
    /// buffer holds its bytes, so the extra read goes to a scratch buffer.
    async fn confirm_end(&mut self) -> Result<(), Error> {
        let mut scratch = [0u8; 512];
        let received = self.fetch.received();
        match self.source.next(received, &mut scratch).await {
            Ok(Chunk::End) => self.finish(),
            Ok(Chunk::Data(n)) => {
                let e = self
                    .fetch
                    .handle_data(&scratch[..n], Instant::now())
                    .err()
                    .unwrap_or(FetchError::TooLong {
                        expected: received,
                        received: received + n as u64,
                    });
                Err(self.fail(e))
            }
            Ok(Chunk::Opened { .. }) => {
                // A resume after the last byte: nothing can follow. Verify.
                self.finish()
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Downloads the whole firmware to `path`, verified and atomically: the
    /// bytes go to `path.part`, which becomes `path` (fsynced, renamed) only
    /// once size and digest check out; `path` is never touched before.
    ///
    /// A download broken by the network, a cancel or a crash resumes: the
    /// part file is kept with `path.part.meta`, which names the firmware (sign
    /// method, digest, size). The next `download_to` of the same firmware to
    /// the same path hashes the bytes already there and asks the server only
    /// for the rest (`Range`). Bad data (a digest or length mismatch, a
    /// write error) removes both files.
    ///
    /// Receiving overlaps hashing and writing: this task reads the socket into buffers;
    /// a worker thread hashes them and a third writes them, with four 256 KiB
    /// buffers in flight (1 MiB in all). Blocks go to disk with direct I/O
    /// where possible (see `ImageWriter`).
    pub async fn download_to(mut self, path: impl AsRef<Path>) -> Result<Verified, Error> {
        let path = path.as_ref().to_path_buf();
        if self.fetch.outcome().is_some() || self.started {
            return Err(Error::Core(iot_ota_core::Error::InvalidState(
                "download_to needs a download that has not started".into(),
            )));
        }
        let part = part_path(&path);
        let meta = meta_path(&path);
        let resume_from = resumable_len(&part, &meta, self.fetch.firmware());
        let file = match open_part(&part, &meta, self.fetch.firmware(), resume_from) {
            Ok(f) => f,
            Err(e) => {
                self.begin();
                let msg = format!("cannot create {}: {e}", part.display());
                return Err(self.fail(FetchError::Storage(msg)));
            }
        };
        if resume_from > 0 {
            log::info!("resuming {} from byte {resume_from}", part.display());
        }
        self.begin();

        let (full_tx, full_rx) = mpsc::channel::<Msg>(BUFFERS);
        let (free_tx, mut free_rx) = mpsc::channel::<Block>(BUFFERS);
        for _ in 0..BUFFERS {
            free_tx
                .try_send(Block::new())
                .expect("room for every buffer");
        }
        let fetch = self.fetch.clone();
        self.handed_off = true;
        let session = self.session.clone();
        let worker_part = part.clone();
        let worker = std::thread::Builder::new()
            .name("ota-verify".into())
            .spawn(move || {
                let image = PartFile {
                    file,
                    path: worker_part,
                    resume_from,
                };
                verify_worker(fetch, session, image, full_rx, free_tx)
            })
            .map_err(Error::Io)?;

        // Reader: fill buffers from the socket and hand them over.
        let mut sent: u64 = resume_from;
        // A buffer that carried no data (the chunk was news of a response)
        // is used again rather than dropped: the pool must not shrink.
        let mut spare: Option<Block> = None;
        loop {
            let mut buf = match spare.take() {
                Some(b) => b,
                None => match free_rx.recv().await {
                    Some(b) => b,
                    None => break,
                },
            };
            let mut filled = 0;
            let mut msg = None;
            while filled < BUF_SIZE {
                match self
                    .source
                    .next(sent + filled as u64, &mut buf.space()[filled..])
                    .await
                {
                    Ok(Chunk::Data(n)) => filled += n,
                    Ok(Chunk::Opened { offset, remaining }) => {
                        // Sent after the bytes already in this buffer.
                        msg = Some(Msg::Opened { offset, remaining });
                        break;
                    }
                    Ok(Chunk::End) => {
                        msg = Some(Msg::End);
                        break;
                    }
                    Err(e) => {
                        msg = Some(Msg::Failed(e));
                        break;
                    }
                }
            }
            let stop = matches!(msg, Some(Msg::End) | Some(Msg::Failed(_)));
            if filled > 0 {
                sent += filled as u64;
                if full_tx.send(Msg::Data(buf, filled)).await.is_err() {
                    break; // the worker stopped: it has the error
                }
            } else {
                spare = Some(buf);
            }
            if let Some(m) = msg {
                if full_tx.send(m).await.is_err() {
                    break;
                }
            }
            if stop {
                break;
            }
        }
        drop(full_tx);
        let (fetch, result) = tokio::task::spawn_blocking(move || worker.join())
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))?
            .map_err(|_| Error::Io(std::io::Error::other("the verify-write worker panicked")))?;
        self.fetch = fetch;
        self.handed_off = false;
        match result {
            Ok(verified) => {
                let _ = std::fs::remove_file(&meta);
                if let Err(e) = std::fs::rename(&part, &path).and_then(|_| sync_dir(&path)) {
                    let _ = std::fs::remove_file(&part);
                    let msg = format!("cannot move the image to {}: {e}", path.display());
                    return Err(self.fail(FetchError::Storage(msg)));
                }
                Ok(verified)
            }
            // The worker removed or kept the part file, as the error says.
            Err(e) => Err(Error::Fetch(e)),
        }
    }
}

impl Drop for Download {
    /// An unfinished download must not leave the device busy: a started one
    /// is reported failed ("download cancelled"); an accepted upgrade whose
    /// download never started is reported UPGRADE_FAILED.
    fn drop(&mut self) {
        if self.handed_off || self.fetch.outcome().is_some() {
            return;
        }
        if self.started {
            self.fail(FetchError::Cancelled);
        } else {
            let firmware = self.fetch.firmware();
            self.session.with(|ota| {
                if ota.job() == Some(firmware) {
                    ota.abort("upgrade abandoned before its download started");
                }
            });
        }
    }
}

/// Buffers in flight between the reader, the hasher and the writer.
const BUFFERS: usize = 4;
/// Size of each buffer: large enough that handing one over is cheap next to
/// filling it, small enough that the whole pipeline stays under 1 MiB.
const BUF_SIZE: usize = 256 * 1024;

/// What the reader hands the worker.
enum Msg {
    Opened { offset: u64, remaining: Option<u64> },
    Data(Block, usize),
    End,
    Failed(FetchError),
}

/// What the hasher hands the writer.
enum ToWriter {
    Data(Block, usize),
    /// Everything is written: sync and stop.
    Finish,
}

/// Hashes what the reader hands over and passes it on to the writer thread,
/// reports progress, and at the end verifies (after the writer has synced).
/// Returns the fetch (for the caller's state) and the outcome.
///
/// Hashing is the one serial cost of a download (MD5 runs at about 500 MB/s
/// on one core here); writing to the page cache costs almost half as much
/// again, so it runs on its own thread rather than after each hash.
fn verify_worker(
    mut fetch: Fetch,
    session: Arc<Session>,
    image: PartFile,
    mut full_rx: mpsc::Receiver<Msg>,
    free_tx: mpsc::Sender<Block>,
) -> (Fetch, Result<Verified, FetchError>) {
    let part = image.path.clone();
    // A resumed download first hashes what is already on disk; the reader
    // meanwhile fetches the rest, so the two overlap.
    if let Err(e) = rehash(&mut fetch, &session, &part, image.resume_from) {
        return finish_failed(fetch, &session, &part, e);
    }
    let (to_writer, writer_rx) = std::sync::mpsc::sync_channel::<ToWriter>(BUFFERS);
    let writer = std::thread::Builder::new()
        .name("ota-write".into())
        .spawn(move || write_stage(image, writer_rx, free_tx));
    let result = match writer {
        Err(e) => Err(FetchError::Storage(format!(
            "cannot start the writer thread: {e}"
        ))),
        Ok(writer) => {
            let mut writer = Some(writer);
            // The writer's own error explains a closed channel best.
            let mut writer_result = |to_writer: Option<std::sync::mpsc::SyncSender<ToWriter>>| {
                drop(to_writer);
                match writer.take().map(|w| w.join()) {
                    Some(Ok(r)) => r,
                    Some(Err(_)) => Err(FetchError::Storage("the writer thread panicked".into())),
                    None => Err(FetchError::Cancelled),
                }
            };
            let mut to_writer = Some(to_writer);
            let result = (|| -> Result<Verified, FetchError> {
                loop {
                    match full_rx.blocking_recv() {
                        Some(Msg::Opened { offset, remaining }) => {
                            fetch.handle_response(offset, remaining)?
                        }
                        Some(Msg::Data(buf, n)) => {
                            if let Some(report) = fetch.handle_data(buf.bytes(n), Instant::now())? {
                                session.publish_progress(&report);
                            }
                            let sent = to_writer
                                .as_ref()
                                .map(|w| w.send(ToWriter::Data(buf, n)).is_ok());
                            if sent != Some(true) {
                                return Err(writer_result(to_writer.take())
                                    .err()
                                    .unwrap_or(FetchError::Cancelled));
                            }
                        }
                        Some(Msg::End) => {
                            if let Some(w) = &to_writer {
                                let _ = w.send(ToWriter::Finish);
                            }
                            writer_result(to_writer.take())?;
                            let report = fetch.handle_end()?;
                            session.publish_progress(&report);
                            // handle_end succeeded, so the outcome is the verified one.
                            return fetch
                                .outcome()
                                .cloned()
                                .unwrap_or(Err(FetchError::Finished));
                        }
                        Some(Msg::Failed(e)) => return Err(e),
                        None => return Err(FetchError::Cancelled),
                    }
                }
            })();
            // Stop the writer on every path, and let it finish what it was
            // given: a failure is reported only once the part file holds
            // every byte hashed, so a resume right after it is exact.
            if result.is_err() {
                let _ = writer_result(to_writer.take());
            }
            drop(to_writer);
            result
        }
    };
    match result {
        Ok(v) => (fetch, Ok(v)),
        Err(e) => finish_failed(fetch, &session, &part, e),
    }
}

/// Ends a failed download: reports it, and keeps the part file for a resume
/// when the bytes in it are good (the network failed, or the download was
/// cancelled, also by dropping `download_to`'s future), removes it otherwise.
fn finish_failed(
    mut fetch: Fetch,
    session: &Session,
    part: &Path,
    error: FetchError,
) -> (Fetch, Result<Verified, FetchError>) {
    // A non-retryable transport error (404, TLS, a server that ignores Range)
    // would fail the same way again from the same bytes: start over then.
    let resumable = matches!(
        error,
        FetchError::Transport {
            retryable: true,
            ..
        } | FetchError::Cancelled
    );
    if !resumable {
        let _ = std::fs::remove_file(part);
        let _ = std::fs::remove_file(meta_for_part(part));
    }
    fetch.fail(error.clone());
    session.publish_progress(&fetch.failure_report(&error));
    (fetch, Err(error))
}

/// Feeds the first `len` bytes of the part file to the fetch, as if received.
fn rehash(fetch: &mut Fetch, session: &Session, part: &Path, len: u64) -> Result<(), FetchError> {
    use std::io::Read;
    if len == 0 {
        return Ok(());
    }
    let storage =
        |e: std::io::Error| FetchError::Storage(format!("reading {}: {e}", part.display()));
    let mut file = std::fs::File::open(part).map_err(storage)?.take(len);
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = file.read(&mut buf).map_err(storage)?;
        if n == 0 {
            break;
        }
        if let Some(report) = fetch.handle_data(&buf[..n], Instant::now())? {
            session.publish_progress(&report);
        }
    }
    if fetch.received() != len {
        return Err(FetchError::Storage(format!(
            "{} shrank while resuming",
            part.display()
        )));
    }
    Ok(())
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

/// Alignment of direct I/O: memory, file offset and length.
const DIRECT_ALIGN: usize = 4096;

/// A pipeline buffer of `BUF_SIZE` bytes whose start is aligned for direct I/O.
struct Block {
    raw: Vec<u8>,
    start: usize,
}

impl Block {
    fn new() -> Block {
        let raw = vec![0u8; BUF_SIZE + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        Block { raw, start }
    }

    /// The whole buffer, to fill.
    fn space(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + BUF_SIZE]
    }

    /// The first `n` bytes.
    fn bytes(&self, n: usize) -> &[u8] {
        &self.raw[self.start..self.start + n]
    }
}

/// Writes the image at increasing offsets: with `O_DIRECT` where the file
/// system allows it and the block is aligned, through the page cache
/// otherwise (the tail, a block cut short by a resume, tmpfs).
///
/// Why: on a two-core device the download is CPU-bound (receive, hash,
/// write), and the copy into the page cache costs about a third as much as
/// MD5 itself; direct I/O lets the disk DMA from our buffer instead, and
/// leaves little for the final fsync to flush.
struct ImageWriter {
    file: std::fs::File,
    direct: Option<std::fs::File>,
    offset: u64,
}

impl ImageWriter {
    fn new(file: std::fs::File, part: &Path, offset: u64) -> ImageWriter {
        ImageWriter {
            file,
            direct: open_direct(part),
            offset,
        }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
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

/// The part file being written, and where the download resumes in it.
struct PartFile {
    file: std::fs::File,
    path: PathBuf,
    resume_from: u64,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn part_path(path: &Path) -> PathBuf {
    with_suffix(path, ".part")
}

fn meta_path(path: &Path) -> PathBuf {
    with_suffix(path, ".part.meta")
}

fn meta_for_part(part: &Path) -> PathBuf {
    with_suffix(part, ".meta")
}

/// What a part file holds: the firmware's digest names its content, so a
/// resume is safe whatever URL brings the rest.
fn resume_key(fw: &Firmware) -> String {
    let size = fw.size.map_or_else(|| "?".to_owned(), |s| s.to_string());
    format!("{} {} {size}\n", fw.sign_method.wire_name(), fw.sign)
}

/// How many bytes of an earlier download of `fw` can be kept: the part
/// file's length, rounded down to the direct-I/O alignment (so later blocks
/// stay aligned), when its meta file names the same firmware; else 0.
fn resumable_len(part: &Path, meta: &Path, fw: &Firmware) -> u64 {
    let same = std::fs::read_to_string(meta).is_ok_and(|m| m == resume_key(fw));
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
fn open_part(
    part: &Path,
    meta: &Path,
    fw: &Firmware,
    resume_from: u64,
) -> std::io::Result<std::fs::File> {
    if resume_from > 0 {
        let file = std::fs::OpenOptions::new().write(true).open(part)?;
        file.set_len(resume_from)?;
        return Ok(file);
    }
    let file = std::fs::File::create(part)?;
    std::fs::write(meta, resume_key(fw))?;
    Ok(file)
}

/// Makes a rename durable: fsync the directory that holds `path`.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}
