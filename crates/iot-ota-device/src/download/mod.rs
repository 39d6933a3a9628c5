//! One firmware download: pull it chunk by chunk with [`Download::fetch_yield`],
//! let [`Download::download_to`] write it to a file, verified, atomically,
//! or let [`Download::read_ahead`] fetch and hash it on threads of its own
//! while the caller copies it out (what the C API's `iot_ota_fetch_yield`
//! needs).
//!
//! All three feed the same [`Fetch`] from the same retrying [`Source`], so
//! counting, digests, length checks, resume and reports behave the same.
//!
//! - `source`: the HTTP side, resuming with Range;
//! - `pipeline`: reader → hasher → sink, over a fixed pool of blocks;
//! - `writer`: the image writer (O_DIRECT) and `download_to`'s sink;
//! - `part`: the part file and its meta file (what makes a resume safe);
//! - `read_ahead`: the read-ahead sink and its consumer.

mod delta;
mod part;
mod pipeline;
mod read_ahead;
mod source;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iot_ota_core::{Fetch, FetchError, FetchState, Firmware, Verified};

use crate::error::Error;
use crate::fsutil::rename_durable;
use crate::http::HttpOptions;
use crate::session::Session;
use part::{meta_path, open_part, part_path, resumable_len};
use pipeline::{hash_stage, pool, read_blocks, Channels, Fill, Sink, BUFFERS};
pub use read_ahead::{ReadAhead, ReadAheadPoll};
use source::{Chunk, Source};
use writer::{FileSink, PartFile};

/// How downloads connect, resume, and give up on a server too slow to
/// ever finish.
///
/// Two bounds end a download that a hostile or broken server would
/// otherwise keep alive forever (one byte every few seconds never trips the
/// idle timeout): a **minimum rate**, checked over each `rate_window`
/// (default: at least 1 KiB/s over every 60 s), and an **overall deadline**
/// that scales with the size, `deadline_base + size / min_rate` (default
/// 5 min + the time at 1 KiB/s). Both end in DOWNLOAD_FAILED with the
/// reason. `min_rate` 0 turns both off.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// HTTP(S) settings.
    pub http: HttpOptions,
    /// How many times a broken transfer resumes with a Range request.
    pub retries: u32,
    /// The slowest transfer accepted, in bytes per second (0: no limit).
    pub min_rate: u64,
    /// The window over which `min_rate` is measured.
    pub rate_window: Duration,
    /// The fixed part of the overall deadline.
    pub deadline_base: Duration,
    /// How a delta update plans ([`Download::delta_from`]): at most so many
    /// Range requests, gaps fetched under a size, and the most of the image
    /// it may fetch before the full download is cheaper.
    pub delta: iot_ota_core::delta::PlanOptions,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        DownloadOptions {
            http: HttpOptions::default(),
            retries: 3,
            min_rate: 1024,
            rate_window: Duration::from_secs(60),
            deadline_base: Duration::from_secs(300),
            delta: iot_ota_core::delta::PlanOptions::default(),
        }
    }
}

/// `download_to`'s blocks: large enough that handing one over is cheap next
/// to filling it, small enough that the whole pipeline stays under 1 MiB.
const FILE_BLOCK: usize = 256 * 1024;

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
    /// The caller's part file and the bytes of it to keep ([`Download::resume_part`]).
    resume: Option<(PathBuf, u64)>,
    /// The image the device has, for a delta update ([`Download::delta_from`]).
    delta_base: Option<PathBuf>,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("fetch", &self.fetch)
            .field("url", &self.source.url())
            .finish_non_exhaustive()
    }
}

impl Download {
    /// A download of `firmware`, reporting through `session`. Fresh counters
    /// and digest: nothing carries over from an earlier download.
    pub fn new(session: Arc<Session>, firmware: Firmware, options: DownloadOptions) -> Download {
        let throttle = session.core_config().throttle;
        Download {
            source: Source::new(firmware.url.clone(), firmware.size, options),
            fetch: Fetch::new(firmware, throttle),
            session,
            started: false,
            handed_off: false,
            resume: None,
            delta_base: None,
        }
    }

    /// Makes [`Download::download_to`] a delta update from `base`, the
    /// image the device runs or has (a file or a block device), when the
    /// command names a chunk index: only the chunks of the new image that
    /// `base` lacks are fetched (HTTP Range), the rest is copied from it,
    /// and the result is verified exactly as a full download. When the
    /// delta would not save enough, the server ignores Range, or `base`
    /// changes while it is read, the full download runs instead; the
    /// DOWNLOADING reports' `desc` says which (`delta: 3.1 MiB of 64.0 MiB
    /// in 7 requests`). A firmware without an index downloads whole.
    pub fn delta_from(mut self, base: impl Into<PathBuf>) -> Download {
        self.delta_base = Some(base.into());
        self
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
        // Nothing resumes an ended upgrade: the part file's meta goes.
        if let Some((part, _)) = self.resume.take() {
            let _ = std::fs::remove_file(part::meta_for_part(&part));
        }
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
            return Err(already_started("download_to"));
        }
        if let (Some(base), true) = (
            self.delta_base.clone(),
            self.fetch.firmware().delta.is_some(),
        ) {
            match self.delta_to(&base, &path).await? {
                delta::DeltaEnd::Done(verified) => return Ok(verified),
                delta::DeltaEnd::Full(why) => {
                    log::info!("{}: {why}", self.fetch.firmware().version);
                    self.fetch.restart_full(why);
                }
            }
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

        let (full_tx, full_rx) = tokio::sync::mpsc::channel(BUFFERS);
        let (free_tx, free_rx) = pool(FILE_BLOCK);
        let fetch = Arc::new(Mutex::new(self.fetch.clone()));
        self.handed_off = true;
        let session = self.session.clone();
        let image = PartFile {
            file,
            path: part.clone(),
            resume_from,
        };
        let worker_fetch = fetch.clone();
        let worker_part = part.clone();
        let worker = std::thread::Builder::new()
            .name("ota-verify".into())
            .spawn(move || {
                let fetch = worker_fetch;
                let mut sink = match FileSink::start(image, free_tx) {
                    Ok(sink) => sink,
                    Err(e) => {
                        // Nothing was written: a failure like any other.
                        let mut f = pipeline::lock(&fetch);
                        f.fail(e.clone());
                        session.publish_progress(&f.failure_report(&e));
                        return Err(e);
                    }
                };
                // A resumed download first hashes what is already on disk;
                // the reader meanwhile fetches the rest, so the two overlap.
                if let Err(e) = rehash(
                    &fetch,
                    Some(&session),
                    &worker_part,
                    resume_from,
                    FILE_BLOCK,
                ) {
                    let e = sink.failed(e);
                    let mut f = pipeline::lock(&fetch);
                    f.fail(e.clone());
                    session.publish_progress(&f.failure_report(&e));
                    return Err(e);
                }
                hash_stage(&fetch, &session, full_rx, &mut sink)
            })
            .map_err(Error::Io)?;

        let mut channels = Channels { full_tx, free_rx };
        read_blocks(&mut self.source, resume_from, Fill::Full, &mut channels).await;
        drop(channels);
        let result = tokio::task::spawn_blocking(move || worker.join())
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))?
            .map_err(|_| Error::Io(std::io::Error::other("the verify-write worker panicked")))?;
        self.fetch = pipeline::lock(&fetch).clone();
        self.handed_off = false;
        match result {
            Ok(verified) => {
                let _ = std::fs::remove_file(&meta);
                if let Err(e) = rename_durable(&part, &path) {
                    let _ = std::fs::remove_file(&part);
                    let msg = format!("cannot move the image to {}: {e}", path.display());
                    return Err(self.fail(FetchError::Storage(msg)));
                }
                Ok(verified)
            }
            // The sink removed or kept the part file, as the error says.
            Err(e) => Err(Error::Fetch(e)),
        }
    }

    /// For [`Download::read_ahead`]: the caller keeps the image in `part`,
    /// and a crash may have left some of it there. Returns how many bytes of
    /// it to keep (the caller truncates the file there and appends what
    /// follows): the file's length, rounded down to 4 KiB, when its meta file
    /// (`part.meta`) names this same firmware, else 0, and the meta file is
    /// written for the next time. The kept bytes are hashed again by the
    /// read-ahead before it asks the server for the rest (`Range`); the meta
    /// file goes once the image is verified, or fails for good.
    /// (It applies to [`Download::read_ahead`] only, which must not have
    /// been called yet.)
    pub fn resume_part(&mut self, part: impl AsRef<Path>) -> Result<u64, Error> {
        let part = part.as_ref();
        let meta = part::meta_for_part(part);
        let fw = self.fetch.firmware();
        let keep = part::resumable_len(part, &meta, fw);
        if keep == 0 {
            std::fs::write(&meta, part::resume_key(fw))?;
        }
        self.resume = Some((part.to_path_buf(), keep));
        Ok(keep)
    }

    /// Starts the download on threads of its own, reading ahead and hashing
    /// while the caller copies the bytes out with [`ReadAhead::poll_read`].
    /// `wake` is called (from those threads) whenever a poll may have news.
    ///
    /// This is what the C API's `iot_ota_fetch_yield` runs on: a call that
    /// finds bytes already hashed returns at once, and the hashing overlaps
    /// the application's own writing.
    pub fn read_ahead(
        mut self,
        block_size: usize,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<ReadAhead, Error> {
        if self.fetch.outcome().is_some() || self.started {
            return Err(already_started("read_ahead"));
        }
        self.begin();
        self.handed_off = true;
        let source = std::mem::replace(
            &mut self.source,
            Source::new(String::new(), None, DownloadOptions::default()),
        );
        ReadAhead::start(
            self.session.clone(),
            self.fetch.clone(),
            source,
            block_size,
            self.resume.take(),
            wake,
        )
        .map_err(|e| {
            // Not started: dropping this download reports the failure.
            self.handed_off = false;
            Error::Io(e)
        })
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

/// The error of a call that needs a download that has not started yet.
fn already_started(call: &str) -> Error {
    Error::Core(iot_ota_core::Error::InvalidState(format!(
        "{call} needs a download that has not started"
    )))
}

/// Feeds the first `len` bytes of the part file to the fetch, as if
/// received, through a buffer of `buf_size` bytes; reports its progress
/// through `session`, if given.
fn rehash(
    fetch: &Mutex<Fetch>,
    session: Option<&Session>,
    part: &Path,
    len: u64,
    buf_size: usize,
) -> Result<(), FetchError> {
    use std::io::Read;
    if len == 0 {
        return Ok(());
    }
    let storage =
        |e: std::io::Error| FetchError::Storage(format!("reading {}: {e}", part.display()));
    let mut file = std::fs::File::open(part).map_err(storage)?.take(len);
    let mut buf = vec![0u8; buf_size];
    loop {
        let n = file.read(&mut buf).map_err(storage)?;
        if n == 0 {
            break;
        }
        let report = pipeline::lock(fetch).handle_data(&buf[..n], Instant::now())?;
        if let (Some(report), Some(session)) = (report, session) {
            session.publish_progress(&report);
        }
    }
    if pipeline::lock(fetch).received() != len {
        return Err(FetchError::Storage(format!(
            "{} shrank while resuming",
            part.display()
        )));
    }
    Ok(())
}
