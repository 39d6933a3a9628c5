//! The download pipeline: a reader fills buffers from the socket, a hasher
//! feeds them to the core's [`Fetch`] (counting, digest, progress) and hands
//! them to a [`Sink`]: the image writer of `download_to`, or the queue the
//! C API's `iot_ota_fetch_yield` copies from. Receiving, hashing and what
//! the sink does overlap, on separate threads.
//!
//! ```text
//!   reader (async) ──Msg──► hasher (thread) ──► Sink: file writer thread | read-ahead queue
//!        ▲                                         │
//!        └──────────────── free blocks ◄───────────┘
//! ```
//!
//! A fixed pool of blocks circulates, so memory stays flat whatever the
//! server sends.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use iot_ota_core::{Fetch, FetchError, Verified};
use tokio::sync::mpsc;

use super::source::{Chunk, Source};
use crate::session::Session;

/// Alignment of direct I/O: memory, file offset and length.
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// Blocks in flight between the reader, the hasher and the sink.
pub(super) const BUFFERS: usize = 4;

/// A pipeline buffer whose start is aligned for direct I/O.
pub(crate) struct Block {
    raw: Vec<u8>,
    start: usize,
    size: usize,
}

impl Block {
    /// A block of `size` bytes.
    pub(crate) fn new(size: usize) -> Block {
        let raw = vec![0u8; size + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        Block { raw, start, size }
    }

    /// The whole buffer, to fill.
    pub(crate) fn space(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.size]
    }

    /// The first `n` bytes.
    pub(crate) fn bytes(&self, n: usize) -> &[u8] {
        &self.raw[self.start..self.start + n]
    }
}

/// What the reader hands the hasher.
pub(super) enum Msg {
    Opened { offset: u64, remaining: Option<u64> },
    Data(Block, usize),
    End,
    Failed(FetchError),
}

/// The pool: `BUFFERS` blocks of `size` bytes, and the channel they come
/// back on.
pub(super) fn pool(size: usize) -> (mpsc::Sender<Block>, mpsc::Receiver<Block>) {
    let (free_tx, free_rx) = mpsc::channel::<Block>(BUFFERS);
    for _ in 0..BUFFERS {
        free_tx
            .try_send(Block::new(size))
            .expect("room for every buffer");
    }
    (free_tx, free_rx)
}

/// How the reader fills a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fill {
    /// Hand a block over only when it is full (or the body ended): every
    /// block but the last stays aligned for direct I/O.
    Full,
    /// Hand a block over when it is full, or when this long has passed
    /// since its first byte: a slow server's bytes reach the caller (and
    /// the progress reports) as they come, while a fast one still fills
    /// whole blocks. (Handing over whatever the socket holds at each moment
    /// would cut a fast transfer into small blocks and starve the hasher.)
    Within(std::time::Duration),
}

/// Where the reader takes free blocks from and hands messages to.
pub(super) trait Blocks {
    /// A free block; `None` when the pipeline stops.
    async fn take(&mut self) -> Option<Block>;
    /// Hands a message on; false when the pipeline stops.
    async fn put(&mut self, msg: Msg) -> bool;
}

/// `download_to`'s reader side: channels to the hasher thread.
pub(super) struct Channels {
    pub(super) full_tx: mpsc::Sender<Msg>,
    pub(super) free_rx: mpsc::Receiver<Block>,
}

impl Blocks for Channels {
    async fn take(&mut self) -> Option<Block> {
        self.free_rx.recv().await
    }

    async fn put(&mut self, msg: Msg) -> bool {
        self.full_tx.send(msg).await.is_ok()
    }
}

/// The reader: fills free blocks from `source`, starting at body byte
/// `sent`, and hands them over, until the body ends, fails, or the other
/// side of `blocks` stops.
pub(super) async fn read_blocks(
    source: &mut Source,
    mut sent: u64,
    fill: Fill,
    blocks: &mut impl Blocks,
) {
    // A buffer that carried no data (the chunk was news of a response)
    // is used again rather than dropped: the pool must not shrink.
    let mut spare: Option<Block> = None;
    loop {
        let mut buf = match spare.take() {
            Some(b) => b,
            None => match blocks.take().await {
                Some(b) => b,
                None => return,
            },
        };
        let size = buf.size;
        let mut filled = 0;
        let mut msg = None;
        let mut due = None;
        while filled < size {
            let next = source.next(sent + filled as u64, &mut buf.space()[filled..]);
            let chunk = match (fill, due) {
                // `next` loses nothing if dropped at the deadline.
                (Fill::Within(_), Some(due)) => match tokio::time::timeout_at(due, next).await {
                    Ok(chunk) => chunk,
                    Err(_) => break,
                },
                _ => next.await,
            };
            match chunk {
                Ok(Chunk::Data(n)) => {
                    if let (Fill::Within(wait), None) = (fill, due) {
                        due = Some(tokio::time::Instant::now() + wait);
                    }
                    filled += n;
                }
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
            if !blocks.put(Msg::Data(buf, filled)).await {
                return; // the hasher stopped: it has the error
            }
        } else {
            spare = Some(buf);
        }
        if let Some(m) = msg {
            if !blocks.put(m).await {
                return;
            }
        }
        if stop {
            return;
        }
    }
}

/// Where hashed blocks go.
pub(super) trait Sink {
    /// Takes a hashed block; the sink returns it to the pool when done.
    /// `received` counts the body bytes hashed so far, this block's
    /// included; `total` is the image's size when known.
    fn data(
        &mut self,
        block: Block,
        n: usize,
        received: u64,
        total: Option<u64>,
    ) -> Result<(), FetchError>;
    /// Every byte is in: make it durable. Called before the final check.
    fn end(&mut self) -> Result<(), FetchError>;
    /// Size and digest checked out.
    fn verified(&mut self, verified: &Verified);
    /// The download failed with `error`: stop, let what was handed over
    /// finish, and return the error to report. The sink's own error wins
    /// when it has one (a full disk explains a stalled pipeline best).
    fn failed(&mut self, error: FetchError) -> FetchError;
    /// Whether a failure is reported to the platform (false once the
    /// application has reported the upgrade's end itself).
    fn reports_failure(&self) -> bool {
        true
    }
    /// Whether the hasher reports DOWNLOADING and DOWNLOADED as it hashes.
    /// False for a sink whose consumer takes the bytes later (the
    /// read-ahead): the consumer reports the bytes it hands over, so the
    /// platform's percent is the application's.
    fn reports_progress(&self) -> bool {
        true
    }
    /// The failure is reported (or was not to be): the sink may now let
    /// the application see it, after the platform's report, never before.
    fn failure_reported(&mut self, _error: &FetchError) {}
}

/// Locks the shared fetch (a panic elsewhere leaves it consistent).
pub(super) fn lock(fetch: &Mutex<Fetch>) -> std::sync::MutexGuard<'_, Fetch> {
    fetch.lock().unwrap_or_else(|p| p.into_inner())
}

/// The hasher: feeds what the reader hands over to `fetch`, reports
/// progress, passes the blocks to `sink`, and at the end verifies (after
/// the sink has made the bytes durable) and reports the outcome.
///
/// Hashing is the one serial cost of a download (MD5 runs at about 500 MB/s
/// on one core here). `download_to` gives it a thread of its own, fed by
/// channels ([`hash_stage`]); the read-ahead calls [`Hasher::step`] on its
/// reader's thread, after each block.
pub(super) struct Hasher<'a, S: Sink> {
    pub(super) fetch: &'a Mutex<Fetch>,
    pub(super) session: &'a Session,
    pub(super) sink: &'a mut S,
}

impl<S: Sink> Hasher<'_, S> {
    /// Takes one message of the reader: `None` while the download goes on,
    /// its outcome once it has ended (reported, and told to the sink).
    pub(super) fn step(&mut self, msg: Option<Msg>) -> Option<Result<Verified, FetchError>> {
        match self.consume(msg) {
            Ok(None) => None,
            Ok(Some(verified)) => Some(Ok(verified)),
            Err(e) => Some(Err(self.failed(e))),
        }
    }

    fn consume(&mut self, msg: Option<Msg>) -> Result<Option<Verified>, FetchError> {
        match msg {
            Some(Msg::Opened { offset, remaining }) => {
                lock(self.fetch).handle_response(offset, remaining)?;
                Ok(None)
            }
            Some(Msg::Data(buf, n)) => {
                let (report, received, total) = {
                    let mut f = lock(self.fetch);
                    let report = f.handle_data(buf.bytes(n), Instant::now())?;
                    (report, f.received(), f.total())
                };
                if let Some(report) = report.filter(|_| self.sink.reports_progress()) {
                    self.session.publish_progress(&report);
                }
                self.sink.data(buf, n, received, total)?;
                Ok(None)
            }
            Some(Msg::End) => {
                self.sink.end()?;
                let mut f = lock(self.fetch);
                let report = f.handle_end()?;
                if self.sink.reports_progress() {
                    self.session.publish_progress(&report);
                }
                // handle_end succeeded, so the outcome is the verified one.
                let verified = match f.outcome() {
                    Some(Ok(v)) => v.clone(),
                    _ => return Err(FetchError::Finished),
                };
                drop(f);
                self.sink.verified(&verified);
                Ok(Some(verified))
            }
            Some(Msg::Failed(e)) => Err(e),
            None => Err(FetchError::Cancelled),
        }
    }

    fn failed(&mut self, e: FetchError) -> FetchError {
        let e = self.sink.failed(e);
        let mut f = lock(self.fetch);
        f.fail(e.clone());
        if self.sink.reports_failure() {
            self.session.publish_progress(&f.failure_report(&e));
        }
        drop(f);
        self.sink.failure_reported(&e);
        e
    }
}

/// The hasher on a thread of its own, fed by the reader's channel.
pub(super) fn hash_stage(
    fetch: &Arc<Mutex<Fetch>>,
    session: &Session,
    mut full_rx: mpsc::Receiver<Msg>,
    sink: &mut impl Sink,
) -> Result<Verified, FetchError> {
    let mut hasher = Hasher {
        fetch,
        session,
        sink,
    };
    loop {
        if let Some(outcome) = hasher.step(full_rx.blocking_recv()) {
            return outcome;
        }
    }
}

/// Prefers a sink's own error to the pipeline's, unless the sink only saw
/// the pipeline stop.
pub(super) fn worse(pipeline: FetchError, sink: Option<FetchError>) -> FetchError {
    match sink {
        Some(FetchError::Cancelled) | None => pipeline,
        Some(own) => own,
    }
}
