//! Read-ahead: the download runs on threads of its own (a reader with a
//! small runtime, a hasher), and the caller copies hashed bytes out of the
//! pipeline's blocks at its own pace.
//!
//! Why: the C API's `iot_ota_fetch_yield` is called with a buffer of a few
//! KB, often with a 1 s timeout, and the application writes each chunk
//! itself. Driving a runtime and a socket read per call, and hashing on the
//! caller's thread, made it half as fast as the Rust pipeline. Here a call
//! that finds bytes waiting is a `memcpy`: no lock, no runtime, no syscall;
//! the hashing overlaps the application's writing; and a slow server never
//! makes a call restart anything, since the request lives on the reader.
//!
//! The bytes handed out are always hashed already, and the last block is
//! held back until the whole image is verified: the call that returns the
//! last bytes has verified them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use iot_ota_core::{Fetch, FetchError, FetchState, Firmware, Verified};
use tokio::sync::{mpsc, oneshot};

use super::pipeline::{self, hash_stage, pool, read_blocks, Block, Fill, Sink, BUFFERS};
use super::source::Source;
use crate::session::Session;

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
}

/// What the hasher and the caller share.
struct Queue {
    ready: Mutex<Ready>,
    wake: Arc<dyn Fn() + Send + Sync>,
    /// The application reported the upgrade's end itself: report nothing.
    quiet: AtomicBool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ready> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
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
        {
            let mut ready = self.queue.lock();
            if let Some(b) = block {
                ready.blocks.push_back(b);
            }
            if end.is_some() {
                ready.end = end;
            }
        }
        (self.queue.wake)();
    }
}

impl Sink for QueueSink {
    fn data(&mut self, block: Block, n: usize, more: bool) -> Result<(), FetchError> {
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
        self.push(None, Some(Err(error.clone())));
        error
    }

    fn reports_failure(&self) -> bool {
        !self.queue.quiet.load(Ordering::SeqCst)
    }
}

/// A download reading ahead on its own threads; see the module docs.
///
/// Dropping it before the end cancels the download, which is reported
/// failed ("download cancelled") unless [`ReadAhead::abandon`] said not to.
/// Both threads are joined before the drop returns.
pub struct ReadAhead {
    firmware: Firmware,
    fetch: Arc<Mutex<Fetch>>,
    queue: Arc<Queue>,
    /// The block being copied out: the block, its length, how far copied.
    current: Option<(Block, usize, usize)>,
    free_tx: mpsc::Sender<Block>,
    delivered: u64,
    /// How it ended, once the caller has seen the end.
    outcome: Option<Result<Verified, FetchError>>,
    cancel: Option<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
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
    /// Starts the reader and the hasher. The fetch has begun (DOWNLOADING 0
    /// is reported).
    pub(super) fn start(
        session: Arc<Session>,
        fetch: Fetch,
        mut source: Source,
        block_size: usize,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<ReadAhead> {
        let firmware = fetch.firmware().clone();
        let fetch = Arc::new(Mutex::new(fetch));
        let queue = Arc::new(Queue {
            ready: Mutex::new(Ready::default()),
            wake,
            quiet: AtomicBool::new(false),
        });
        let (full_tx, full_rx) = mpsc::channel(BUFFERS);
        let (free_tx, mut free_rx) = pool(block_size.max(pipeline::DIRECT_ALIGN));
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();

        let hasher = {
            let fetch = fetch.clone();
            let mut sink = QueueSink {
                queue: queue.clone(),
                held: None,
            };
            std::thread::Builder::new()
                .name("ota-hash".into())
                .spawn(move || {
                    let _ = hash_stage(&fetch, &session, full_rx, &mut sink);
                })?
        };
        let reader = std::thread::Builder::new()
            .name("ota-fetch".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match rt {
                    Ok(rt) => rt.block_on(async {
                        tokio::select! {
                            _ = read_blocks(&mut source, 0, Fill::Eager, full_tx, &mut free_rx) => {}
                            _ = cancel_rx => {}
                        }
                    }),
                    Err(e) => {
                        let e = FetchError::Transport {
                            message: format!("cannot start the download's runtime: {e}"),
                            retryable: false,
                        };
                        let _ = full_tx.blocking_send(pipeline::Msg::Failed(e));
                    }
                }
                // The source (its socket) and the runtime go here, on this thread.
            });
        let reader = match reader {
            Ok(r) => r,
            Err(e) => {
                // The hasher sees the channel close and reports a cancel.
                let _ = hasher.join();
                return Err(e);
            }
        };
        Ok(ReadAhead {
            firmware,
            fetch,
            queue,
            current: None,
            free_tx,
            delivered: 0,
            outcome: None,
            cancel: Some(cancel_tx),
            threads: vec![reader, hasher],
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
                self.outcome = Some(Err(e.clone()));
                return ReadAheadPoll::Failed(e);
            }
            match ready.blocks.pop_front() {
                Some((block, len)) => self.current = Some((block, len, 0)),
                None => {
                    return match ready.end.clone() {
                        Some(end) => {
                            drop(ready);
                            self.outcome = Some(end);
                            self.poll_read(buf)
                        }
                        None => ReadAheadPoll::Pending,
                    };
                }
            }
        }
        let Some((block, len, pos)) = self.current.as_mut() else {
            return ReadAheadPoll::Pending;
        };
        let n = buf.len().min(*len - *pos);
        buf[..n].copy_from_slice(&block.bytes(*len)[*pos..*pos + n]);
        *pos += n;
        self.delivered += n as u64;
        if *pos == *len {
            if let Some((block, _, _)) = self.current.take() {
                // Never full: the pool has room for every block.
                let _ = self.free_tx.try_send(block);
            }
        }
        ReadAheadPoll::Data(n)
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
        let ready = self.queue.lock();
        match &ready.end {
            Some(Err(e)) => Some(Err(e.clone())),
            // Verified, and the caller has taken every byte.
            Some(Ok(v)) if self.current.is_none() && ready.blocks.is_empty() => Some(Ok(v.clone())),
            _ => None,
        }
    }

    /// Bytes handed out to the caller so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The firmware's size, when known (from the command or the server).
    pub fn file_size(&self) -> Option<u64> {
        pipeline::lock(&self.fetch).total()
    }

    /// The digest of what was received so far, lowercase hex.
    pub fn digest_hex(&self) -> String {
        pipeline::lock(&self.fetch).digest_hex()
    }

    /// Ends the download without reporting anything (the application has
    /// reported the upgrade's outcome itself).
    pub fn abandon(self) {
        self.queue.quiet.store(true, Ordering::SeqCst);
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        if let Some(cancel) = self.cancel.take() {
            let _ = cancel.send(());
        }
        // The reader stops at once; the hasher then sees its channel close
        // (reporting the cancel, unless the download had ended or was
        // abandoned). Nothing of ours outlives the drop.
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
