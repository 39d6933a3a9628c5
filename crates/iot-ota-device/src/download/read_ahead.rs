//! Read-ahead: the download runs on a thread of its own (with a small
//! runtime for the socket), which receives each block and hashes it, and
//! the caller copies hashed bytes out of the blocks at its own pace.
//!
//! Why: the C API's `iot_ota_fetch_yield` is called with a buffer of a few
//! KB, often with a 1 s timeout, and the application writes each chunk
//! itself. Driving a runtime and a socket read per call, and hashing on the
//! caller's thread, made it half as fast as the Rust pipeline. Here a call
//! that finds bytes waiting is a `memcpy`: no lock, no runtime, no syscall;
//! the hashing overlaps the application's writing; and a slow server never
//! makes a call restart anything, since the request lives on that thread.
//!
//! Why one thread for receiving and hashing, where `download_to` has two:
//! receiving costs a fifth of hashing, and on a two-core device the
//! caller's own writing takes the other core; a second thread bought no
//! speed there (with SHA-256 it lost some: each hand-over between threads
//! costs more than the hashing of a block), and cost memory and code.
//!
//! What a hand-over costs is what limits the speed, so there are few of
//! them: blocks of 48 KiB (the C API's), and the caller is woken only when it waits, and
//! then first by an `unpark` on its own thread (a futex), not through the
//! MQTT runtime; only a caller that has waited a while (a slow server) is
//! woken through the runtime, which keeps its connection serviced.
//!
//! The bytes handed out are always hashed already, and the last block is
//! held back until the whole image is verified: the call that returns the
//! last bytes has verified them.
//!
//! Progress is the caller's: the fetch thread reports only failures, and
//! DOWNLOADING (throttled) and DOWNLOADED are reported by the call that
//! hands the bytes over, counting the bytes handed over. An application
//! that reports its own percent after each chunk (as the vendor guide's
//! loop does) then agrees with the SDK's reports, where reports of the
//! bytes fetched ran ahead of it (the platform saw `0, 100, 4, 8, ...`).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use iot_ota_core::{
    percent_of, Fetch, FetchError, FetchState, Firmware, Progress, ProgressMeter, Status, Verified,
};
use tokio::sync::Notify;

use super::pipeline::{self, read_blocks, Block, Blocks, Fill, Hasher, Msg, Sink};
use super::source::Source;
use crate::session::Session;

/// A partly filled block goes to the hasher at the latest this long after
/// its first byte: a slow download still shows up in small steps.
const HANDOVER: Duration = Duration::from_millis(50);

/// Blocks in flight: one being filled and hashed, one being copied out, one
/// ready in between.
const READ_AHEAD_BLOCKS: usize = 3;

/// What [`ReadAhead::poll_read`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadAheadPoll {
    /// This many bytes were copied (more than 0).
    Data(usize),
    /// Nothing hashed is waiting yet: wait for the wake-up, then poll again.
    Pending,
    /// Every byte has been handed out, and the image is verified.
    Complete(Verified),
    /// The download failed (already reported, unless abandoned).
    Failed(FetchError),
}

/// Blocks hashed and waiting for the caller, and how the download ended.
#[derive(Default)]
struct Ready {
    blocks: VecDeque<(Block, usize)>,
    end: Option<Result<Verified, FetchError>>,
    /// How the caller waits, if it does.
    waits: Waits,
}

/// How the caller waits for the next block.
#[derive(Default)]
enum Waits {
    /// It does not: it finds what is ready on its next call.
    #[default]
    No,
    /// Parked in [`ReadAhead::wait`]: unpark it.
    Parked(Thread),
    /// Waiting for the `wake` given at the start.
    Woken,
}

impl Ready {
    /// Wakes a waiting caller: unparks it, or returns true if `wake` must
    /// be called (after the lock is let go).
    fn wake_caller(&mut self) -> bool {
        match std::mem::take(&mut self.waits) {
            Waits::No => false,
            Waits::Parked(t) => {
                t.unpark();
                false
            }
            Waits::Woken => true,
        }
    }
}

/// Blocks emptied by the caller, and whether the thread waits for one.
struct Free {
    blocks: Vec<Block>,
    /// The thread waits on `freed`: only then does a give-back notify it
    /// (a notify is a futex call even when nobody waits, once per block).
    waiting: bool,
}

/// What the download's thread and the caller share.
struct Queue {
    ready: Mutex<Ready>,
    /// Blocks the caller has emptied, for the thread to fill again.
    free: Mutex<Free>,
    freed: Condvar,
    /// Set by the drop: stop at the next chance.
    cancelled: AtomicBool,
    /// Wakes the thread out of a socket wait when cancelled.
    cancel: Notify,
    wake: Arc<dyn Fn() + Send + Sync>,
    /// The application reported the upgrade's end itself: report nothing.
    quiet: AtomicBool,
    /// `Ready::end` is set: the API's calls of a download loop look here
    /// first, without the lock the fetch thread takes for every block.
    ended: AtomicBool,
    /// The image's size as the hasher knows it ([`UNKNOWN`] if not), so
    /// that asking for it never waits for the fetch's lock, which the hasher
    /// holds while it hashes a block.
    total: AtomicU64,
}

/// [`Queue::total`] when the size is not known.
const UNKNOWN: u64 = u64::MAX;

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Ready> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn free(&self) -> MutexGuard<'_, Free> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A block back from the caller.
    fn give_back(&self, block: Block) {
        let mut free = self.free();
        free.blocks.push(block);
        if free.waiting {
            self.freed.notify_one();
        }
    }
}

/// The thread's side of the pipeline: free blocks from the caller; each
/// filled block hashed at once, then queued for the caller.
struct Ahead<'a> {
    queue: &'a Queue,
    hasher: Hasher<'a, QueueSink>,
    outcome: Option<Result<Verified, FetchError>>,
}

impl Blocks for Ahead<'_> {
    async fn take(&mut self) -> Option<Block> {
        // Blocking is fine: nothing else runs on this thread's runtime.
        let mut free = self.queue.free();
        loop {
            if self.queue.cancelled.load(Ordering::SeqCst) {
                return None;
            }
            if let Some(block) = free.blocks.pop() {
                free.waiting = false;
                return Some(block);
            }
            free.waiting = true;
            free = self
                .queue
                .freed
                .wait(free)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    async fn put(&mut self, msg: Msg) -> bool {
        if self.outcome.is_none() {
            self.outcome = self.hasher.step(Some(msg));
        }
        self.outcome.is_none()
    }
}

/// The hasher's sink: hashed blocks into the queue; a block that may be
/// the last (the size is unknown, or it ends the image) is held back until
/// the image is verified.
struct QueueSink {
    queue: Arc<Queue>,
    held: Option<(Block, usize)>,
}

impl QueueSink {
    fn push(&mut self, block: Option<(Block, usize)>, end: Option<Result<Verified, FetchError>>) {
        let wake = {
            let mut ready = self.queue.lock();
            if let Some(b) = block {
                ready.blocks.push_back(b);
            }
            if end.is_some() {
                ready.end = end;
                self.queue.ended.store(true, Ordering::Release);
            }
            ready.wake_caller()
        };
        if wake {
            (self.queue.wake)();
        }
    }
}

impl Sink for QueueSink {
    fn data(
        &mut self,
        block: Block,
        n: usize,
        received: u64,
        total: Option<u64>,
    ) -> Result<(), FetchError> {
        self.queue
            .total
            .store(total.unwrap_or(UNKNOWN), Ordering::Relaxed);
        // Certainly not the last block when bytes remain after it.
        let more = total.is_some_and(|t| received < t);
        // Blocks before it were not the last: they go out now.
        if let Some(previous) = self.held.take() {
            self.push(Some(previous), None);
        }
        if more {
            self.push(Some((block, n)), None);
        } else {
            // Perhaps the last: out only once the image is verified.
            self.held = Some((block, n));
        }
        Ok(())
    }

    fn end(&mut self) -> Result<(), FetchError> {
        Ok(())
    }

    fn verified(&mut self, verified: &Verified) {
        let last = self.held.take();
        self.push(last, Some(Ok(verified.clone())));
    }

    fn failed(&mut self, error: FetchError) -> FetchError {
        self.held = None;
        error
    }

    fn failure_reported(&mut self, error: &FetchError) {
        self.push(None, Some(Err(error.clone())));
    }

    fn reports_failure(&self) -> bool {
        !self.queue.quiet.load(Ordering::SeqCst)
    }

    fn reports_progress(&self) -> bool {
        false
    }
}

/// A download reading ahead on its own threads; see the module docs.
///
/// Dropping it before the end cancels the download, which is reported
/// failed ("download cancelled") unless [`ReadAhead::abandon`] said not to.
/// Both threads are joined before the drop returns.
pub struct ReadAhead {
    session: Arc<Session>,
    firmware: Firmware,
    fetch: Arc<Mutex<Fetch>>,
    queue: Arc<Queue>,
    /// The block being copied out: the block, its length, how far copied.
    current: Option<(Block, usize, usize)>,
    delivered: u64,
    /// When the next DOWNLOADING report of the bytes handed out is due.
    meter: ProgressMeter,
    /// The meta file of the caller's part file, removed once the download
    /// has ended for good (verified, or failed in a way no resume mends).
    meta: Option<PathBuf>,
    /// How it ended, once the caller has seen the end.
    outcome: Option<Result<Verified, FetchError>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAhead")
            .field("version", &self.firmware.version)
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

impl ReadAhead {
    /// Starts the download's thread, with [`READ_AHEAD_BLOCKS`] blocks of
    /// `block_size` bytes. The fetch has begun (DOWNLOADING 0 is reported).
    pub(super) fn start(
        session: Arc<Session>,
        fetch: Fetch,
        mut source: Source,
        block_size: usize,
        resume: Option<(PathBuf, u64)>,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<ReadAhead> {
        let (meta, kept) = match &resume {
            Some((part, kept)) => (Some(super::part::meta_for_part(part)), *kept),
            None => (None, 0),
        };
        let firmware = fetch.firmware().clone();
        let total = fetch.total().unwrap_or(UNKNOWN);
        // DOWNLOADING 0 went out as the download began.
        let mut meter = ProgressMeter::new(session.core_config().throttle);
        meter.begin(Instant::now());
        let fetch = Arc::new(Mutex::new(fetch));
        let size = block_size.max(pipeline::DIRECT_ALIGN);
        let queue = Arc::new(Queue {
            ready: Mutex::new(Ready::default()),
            free: Mutex::new(Free {
                blocks: (0..READ_AHEAD_BLOCKS).map(|_| Block::new(size)).collect(),
                waiting: false,
            }),
            freed: Condvar::new(),
            cancelled: AtomicBool::new(false),
            cancel: Notify::new(),
            wake,
            quiet: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            total: AtomicU64::new(total),
        });
        let thread = {
            let (fetch, queue, session) = (fetch.clone(), queue.clone(), session.clone());
            std::thread::Builder::new()
                .name("ota-fetch".into())
                .spawn(move || {
                    // Whatever happens here, a panic included, the caller
                    // learns how it ended and the platform is told.
                    let _ended = EndGuard { queue: &queue };
                    let mut sink = QueueSink {
                        queue: queue.clone(),
                        held: None,
                    };
                    let mut ahead = Ahead {
                        queue: &queue,
                        hasher: Hasher {
                            fetch: &fetch,
                            session: &session,
                            sink: &mut sink,
                        },
                        outcome: None,
                    };
                    let rt = crate::ffi_support::current_thread_runtime();
                    // The bytes kept from an earlier attempt, hashed again
                    // here (off the caller's thread) before the rest is asked for.
                    let rehashed = match &resume {
                        Some((part, kept)) if *kept > 0 => {
                            super::rehash(&fetch, None, part, *kept, size)
                        }
                        _ => Ok(()),
                    };
                    match (rt, rehashed) {
                        (_, Err(e)) => ahead.outcome = ahead.hasher.step(Some(Msg::Failed(e))),
                        (Ok(rt), Ok(())) => crate::ffi_support::block_on_erased(&rt, async {
                            tokio::select! {
                                _ = read_blocks(&mut source, kept, Fill::Within(HANDOVER), &mut ahead) => {}
                                _ = queue.cancel.notified() => {}
                            }
                        }),
                        (Err(e), Ok(())) => {
                            let e = FetchError::Transport {
                                message: format!("cannot start the download's runtime: {e}"),
                                retryable: false,
                                http_status: None,
                            };
                            ahead.outcome = ahead.hasher.step(Some(Msg::Failed(e)));
                        }
                    }
                    if ahead.outcome.is_none() {
                        // Cancelled: reported (unless abandoned) as such.
                        ahead.hasher.step(None);
                    }
                    // The source (its socket) goes here, on this thread.
                    drop(source);
                })?
        };
        Ok(ReadAhead {
            session,
            firmware,
            fetch,
            queue,
            current: None,
            delivered: kept,
            meter,
            meta,
            outcome: None,
            thread: Some(thread),
        })
    }

    /// Copies the next hashed bytes into `buf` (not empty), without waiting.
    pub fn poll_read(&mut self, buf: &mut [u8]) -> ReadAheadPoll {
        if let Some(outcome) = &self.outcome {
            return match outcome {
                Ok(v) => ReadAheadPoll::Complete(v.clone()),
                Err(e) => ReadAheadPoll::Failed(e.clone()),
            };
        }
        if self.current.is_none() {
            let mut ready = self.queue.lock();
            if let Some(Err(e)) = &ready.end {
                // A failure ends the download at once: the bytes still
                // queued are of an image that will never verify.
                let e = e.clone();
                ready.blocks.clear();
                drop(ready);
                self.ended(Err(e.clone()));
                return ReadAheadPoll::Failed(e);
            }
            match ready.blocks.pop_front() {
                Some((block, len)) => self.current = Some((block, len, 0)),
                None => {
                    return match ready.end.clone() {
                        Some(end) => {
                            drop(ready);
                            self.ended(end);
                            self.poll_read(buf)
                        }
                        None => {
                            // Woken by the next block (or the end).
                            if matches!(ready.waits, Waits::No) {
                                ready.waits = Waits::Woken;
                            }
                            ReadAheadPoll::Pending
                        }
                    };
                }
            }
        }
        if self.current.is_some() && self.queue.ended.load(Ordering::Acquire) {
            // Failed while this block was being copied out: the rest of
            // it is of an image that will never verify.
            let failed = matches!(&self.queue.lock().end, Some(Err(_)));
            if failed {
                if let Some((block, _, _)) = self.current.take() {
                    self.queue.give_back(block);
                }
                return self.poll_read(buf);
            }
        }
        let Some((block, len, pos)) = self.current.as_mut() else {
            return ReadAheadPoll::Pending;
        };
        let n = buf.len().min(*len - *pos);
        buf[..n].copy_from_slice(&block.bytes(*len)[*pos..*pos + n]);
        *pos += n;
        let emptied = *pos == *len;
        self.delivered += n as u64;
        let pct = percent_of(self.delivered, self.file_size());
        if self.meter.due(pct, Instant::now()) && !self.queue.quiet.load(Ordering::SeqCst) {
            self.session
                .publish_progress(&self.report(Status::Downloading, pct));
        }
        if emptied {
            if let Some((block, _, _)) = self.current.take() {
                self.queue.give_back(block);
            }
            // The last bytes handed over: the download has ended for the
            // caller, and DOWNLOADED goes out now, after their progress.
            let end = {
                let ready = self.queue.lock();
                match &ready.end {
                    Some(Ok(v)) if ready.blocks.is_empty() => Some(v.clone()),
                    _ => None,
                }
            };
            if let Some(verified) = end {
                self.ended(Ok(verified));
            }
        }
        ReadAheadPoll::Data(n)
    }

    fn report(&self, status: Status, progress: u32) -> Progress {
        Progress {
            status,
            progress,
            desc: String::new(),
            firmware_version: self.firmware.version.clone(),
        }
    }

    /// After [`ReadAheadPoll::Pending`]: parks the calling thread until the
    /// next block (or the end) is ready, for at most `quick`. True when
    /// woken; false when `quick` passed, and from then on the caller is
    /// woken by the `wake` given at the start (so that it can wait on
    /// other things too, as the C API waits on its MQTT connection).
    ///
    /// A fast download's next block is a moment away: waiting for it here
    /// costs a futex, where a wait through a runtime costs an eventfd and a
    /// poll on each side.
    pub fn wait(&mut self, quick: Duration) -> bool {
        let until = Instant::now() + quick;
        loop {
            let mut ready = self.queue.lock();
            if matches!(ready.waits, Waits::No) {
                return true; // woken (or never waited)
            }
            let now = Instant::now();
            if now >= until {
                ready.waits = Waits::Woken;
                return false;
            }
            ready.waits = Waits::Parked(std::thread::current());
            drop(ready);
            std::thread::park_timeout(until - now);
        }
    }

    /// The caller has seen the end: DOWNLOADED is reported for a verified
    /// image; the meta file of a part file goes, unless the part file is
    /// worth resuming later.
    fn ended(&mut self, end: Result<Verified, FetchError>) {
        if end.is_ok() && !self.queue.quiet.load(Ordering::SeqCst) {
            self.session
                .publish_progress(&self.report(Status::Downloaded, 100));
        }
        let resumable = matches!(
            &end,
            Err(FetchError::Transport {
                retryable: true,
                ..
            })
        );
        if let (Some(meta), false) = (&self.meta, resumable) {
            let _ = std::fs::remove_file(meta);
        }
        self.outcome = Some(end);
    }

    /// The firmware being downloaded.
    pub fn firmware(&self) -> &Firmware {
        &self.firmware
    }

    /// `Fetching` until the caller has taken the last byte (or the
    /// download failed), then `Fetched`.
    pub fn state(&self) -> FetchState {
        if self.outcome().is_some() {
            FetchState::Fetched
        } else {
            FetchState::Fetching
        }
    }

    /// How it ended: verified once every byte has been handed out; a
    /// failure as soon as it is known.
    pub fn outcome(&self) -> Option<Result<Verified, FetchError>> {
        if let Some(o) = &self.outcome {
            return Some(o.clone());
        }
        if !self.queue.ended.load(Ordering::Acquire) {
            return None;
        }
        let ready = self.queue.lock();
        match &ready.end {
            Some(Err(e)) => Some(Err(e.clone())),
            // Verified, and the caller has taken every byte.
            Some(Ok(v)) if self.current.is_none() && ready.blocks.is_empty() => Some(Ok(v.clone())),
            _ => None,
        }
    }

    /// Bytes handed out to the caller so far (with those kept from an
    /// earlier attempt, [`super::Download::resume_part`]).
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The firmware's size, when known (from the command or the server).
    /// Never waits.
    pub fn file_size(&self) -> Option<u64> {
        match self.queue.total.load(Ordering::Relaxed) {
            UNKNOWN => None,
            total => Some(total),
        }
    }

    /// The digest of what was received so far, lowercase hex. (It may wait
    /// for the hasher to finish the block it is hashing.)
    pub fn digest_hex(&self) -> String {
        pipeline::lock(&self.fetch).digest_hex()
    }

    /// Ends the download without reporting anything (the application has
    /// reported the upgrade's outcome itself). The upgrade is over, so the
    /// meta file of the caller's part file goes too: nothing will resume
    /// it (the caller removes its part file).
    pub fn abandon(self) {
        self.queue.quiet.store(true, Ordering::SeqCst);
        if let Some(meta) = &self.meta {
            let _ = std::fs::remove_file(meta);
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Stop the thread wherever it waits: for a free block, or on the
        // socket. It reports the cancel (unless the download had ended or
        // was abandoned). Nothing of ours outlives the drop.
        self.queue.cancelled.store(true, Ordering::SeqCst);
        self.queue.cancel.notify_one();
        {
            let _free = self.queue.free();
            self.queue.freed.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Verified (and DOWNLOADED reported) but not all taken: the
        // application never got the image, so the upgrade is cancelled.
        let untaken = {
            let ready = self.queue.lock();
            matches!(ready.end, Some(Ok(_))) && (self.current.is_some() || !ready.blocks.is_empty())
        };
        if untaken && self.outcome.is_none() && !self.queue.quiet.load(Ordering::SeqCst) {
            let report = pipeline::lock(&self.fetch).failure_report(&FetchError::Cancelled);
            self.session.publish_progress(&report);
        }
    }
}

/// Ends the download's thread: if it stopped without an outcome (a panic),
/// the caller sees a failure rather than waiting for bytes forever. (Not
/// reported to the platform: the application, told by the failure, reports
/// the upgrade's end itself.)
struct EndGuard<'a> {
    queue: &'a Queue,
}

impl Drop for EndGuard<'_> {
    fn drop(&mut self) {
        let mut ready = self.queue.lock();
        if ready.end.is_none() {
            ready.end = Some(Err(FetchError::Cancelled));
            self.queue.ended.store(true, Ordering::Release);
            let wake = ready.wake_caller();
            drop(ready);
            if wake {
                (self.queue.wake)();
            }
        }
    }
}
