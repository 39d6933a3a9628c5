//! A delta update ([`iot_ota_core::delta`]): the new image written from
//! the chunks of an image the device already has (its base) and the byte
//! ranges it fetches, in the new image's order, into the same part file a
//! full download writes, and verified the same way.
//!
//! 1. The chunk index is fetched, and its SHA-256 checked against the
//!    signed manifest's `indexSha256` (a device that pins keys) or the
//!    command's: a mismatch is VERIFY_FAILED.
//! 2. The base is cut into chunks with the index's parameters, and the
//!    planner says what to copy and what to fetch (or that the full image
//!    is cheaper: then the full download runs, and says why).
//! 3. A part file left by a cut download of the same image is kept up to
//!    its last whole chunk that still matches the index, and the plan goes
//!    on from there.
//! 4. Every chunk, copied or fetched, is checked against the index before
//!    it is written: a fetched chunk that differs is VERIFY_FAILED; a base
//!    chunk that no longer matches (the base changed since it was cut)
//!    ends the delta, and the full download goes on from the bytes written.
//! 5. The whole image's digest (and a signed manifest's SHA-256) is checked
//!    at the end, as for any download.
//!
//! A server that ignores Range (answers 200), or answers another range
//! than asked, ends the delta the same way: the full download takes over.
//! The delta keeps the full download's bounds: the minimum rate and the
//! overall deadline ([`super::DownloadOptions`]), its resumes of a broken
//! transfer, and the idle timeout of every read. Copying from the base
//! yields to the runtime after each chunk, so the MQTT link (the C API's
//! runs on the same thread) keeps its keep-alive.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use iot_ota_core::delta::{chunk, plan, sha256, Decision, Index, Step};
use iot_ota_core::{digest, FetchError, Pace, SignMethod, Verified};

use super::part::{meta_path, open_part, part_path, resumable_len};
use super::source::{now, pace};
use super::Download;
use crate::error::Error;
use crate::fsutil::rename_durable;
use crate::http::{Body, HttpError, HttpOptions};

/// How a delta ended, when it did not fail.
pub(super) enum DeltaEnd {
    /// The image is at its path, verified.
    Done(Verified),
    /// The full download must run instead (or finish what the delta
    /// started: the part file holds only good bytes); why, as said in the
    /// reports.
    Full(String),
}

/// How one step ended, when it did not go through.
enum Stop {
    /// The full download goes on from what is written.
    Full(String),
    /// The full download starts over from byte 0 (the server cannot
    /// resume it either: it ignores Range).
    FullFromStart(String),
    Fail(FetchError),
}

impl From<FetchError> for Stop {
    fn from(e: FetchError) -> Stop {
        Stop::Fail(e)
    }
}

impl Download {
    /// Tries `path` as a delta from `base` (see the module docs). A failure
    /// is reported and returned; a [`DeltaEnd::Full`] is for the caller to
    /// go on with the full download.
    pub(super) async fn delta_to(&mut self, base: &Path, path: &Path) -> Result<DeltaEnd, Error> {
        let fw = self.fetch.firmware().clone();
        let Some(dref) = fw.delta.clone() else {
            return Ok(DeltaEnd::Full("no chunk index for this firmware".into()));
        };
        // Whom the index's digest comes from: the signature, when there is one.
        let (trusted, from) = match &fw.signed {
            Some(s) => match &s.manifest.index_sha256 {
                Some(h) => (h.clone(), "the signed manifest"),
                None => {
                    return Ok(DeltaEnd::Full(
                        "the signed manifest names no chunk index".into(),
                    ))
                }
            },
            None => (dref.index_sha256.clone(), "the command"),
        };
        // DOWNLOADING 0 at once: reading the index and the base takes a while.
        self.begin();
        let options = self.source.options().clone();
        let http = options.http.clone();
        // The bounds of the whole delta: the index and every range.
        let mut pace = pace(
            &options,
            &fw.url,
            Some(fw.size.unwrap_or(0) + dref.index_size),
        );
        let bytes = match fetch_index(&dref.index_url, dref.index_size, &http, &mut pace).await {
            Ok(b) => b,
            Err(IndexError::Unreachable(e)) => {
                return Ok(DeltaEnd::Full(format!(
                    "the chunk index could not be fetched ({e}): full download"
                )))
            }
            Err(IndexError::Size(e)) => {
                return Err(self.fail(FetchError::DeltaMismatch(format!("the chunk index: {e}"))))
            }
            Err(IndexError::TooSlow(e)) => return Err(self.fail(e)),
        };
        let got = digest::digest_hex(SignMethod::Sha256, &bytes);
        if got != trusted {
            return Err(self.fail(FetchError::DeltaMismatch(format!(
                "the chunk index's SHA-256 is {got}, {from} says {trusted}"
            ))));
        }
        let index = Index::parse(&bytes)
            .map_err(|e| self.fail(FetchError::DeltaMismatch(format!("the chunk index: {e}"))))?;
        if fw.size.is_some_and(|s| s != index.size) {
            return Err(self.fail(FetchError::DeltaMismatch(format!(
                "the chunk index is of {} bytes, the firmware of {}",
                index.size,
                fw.size.unwrap_or_default()
            ))));
        }
        let have = {
            let base = base.to_path_buf();
            let params = index.params;
            // What a new image can reuse lies in about as many bytes of the
            // base: a block device is not read to its end.
            let limit = index.size.saturating_mul(2).saturating_add(1 << 20);
            let cut = tokio::task::spawn_blocking(move || -> Result<_, String> {
                let file = std::fs::File::open(&base)
                    .map_err(|e| format!("cannot read the base {}: {e}", base.display()))?;
                let reader = std::io::BufReader::with_capacity(1 << 20, file);
                chunk(params, &mut reader.take(limit))
            });
            match cut.await {
                Ok(Ok(have)) => have,
                Ok(Err(e)) => return Ok(DeltaEnd::Full(e)),
                Err(e) => return Ok(DeltaEnd::Full(format!("chunking the base: {e}"))),
            }
        };
        let plan = match plan(&index, &have, &options.delta) {
            Decision::Delta(p) => p,
            Decision::Full(why) => return Ok(DeltaEnd::Full(why)),
        };
        drop(have);
        log::info!(
            "{}: {} from {}",
            fw.version,
            plan.describe(),
            base.display()
        );

        // The part file: what a cut download of this image left, kept up to
        // its last chunk that still matches.
        let part = part_path(path);
        let meta = meta_path(path);
        let keep = resumable_len(&part, &meta, &fw);
        let mut file = match open_part(&part, &meta, &fw, keep) {
            Ok(f) => f,
            Err(e) => {
                let msg = format!("cannot create {}: {e}", part.display());
                return Err(self.fail(FetchError::Storage(msg)));
            }
        };
        let first = match self.keep_written(&mut file, &part, &index, keep).await {
            Ok(n) => n,
            Err(e) => return Err(self.fail(e)),
        };
        // A resume: what the cut attempt fetched counts as fetched.
        let fetched_before: u64 = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Fetch { chunks, .. } => Some(chunks.start..chunks.end.min(first)),
                Step::Copy { .. } => None,
            })
            .flatten()
            .map(|i| u64::from(index.chunks[i].len))
            .sum();
        self.fetch
            .plan_delta(plan.fetch_bytes, fetched_before, plan.describe());
        if first > 0 {
            log::info!(
                "resuming the delta of {} at chunk {first} of {}",
                fw.version,
                index.chunks.len()
            );
        }

        let mut base_file = match std::fs::File::open(base) {
            Ok(f) => f,
            Err(e) => return Ok(DeltaEnd::Full(format!("cannot read the base: {e}"))),
        };
        for step in plan.from_chunk(first, &index) {
            let done = match step {
                Step::Copy { chunk, from } => {
                    let done = self.copy_chunk(&mut base_file, &mut file, &index, chunk, from);
                    // The rest of the runtime (the MQTT link) gets its turn.
                    tokio::task::yield_now().await;
                    done
                }
                Step::Fetch { chunks, .. } => {
                    self.fetch_chunks(&mut file, &index, chunks, &fw.url, &http, &mut pace)
                        .await
                }
            };
            match done {
                Ok(()) => {}
                Err(Stop::Full(why)) => {
                    let _ = file.sync_data();
                    return Ok(DeltaEnd::Full(why));
                }
                Err(Stop::FullFromStart(why)) => {
                    drop(file);
                    super::part::remove_part(&part);
                    return Ok(DeltaEnd::Full(why));
                }
                Err(Stop::Fail(e)) => {
                    if !matches!(e, FetchError::Transport { .. }) {
                        // Bad bytes are not kept for a resume.
                        super::part::remove_part(&part);
                    }
                    return Err(self.fail(e));
                }
            }
        }
        if let Err(e) = file.sync_all() {
            let msg = format!("syncing {}: {e}", part.display());
            super::part::remove_part(&part);
            return Err(self.fail(FetchError::Storage(msg)));
        }
        drop(file);
        if let Err(e) = self.finish() {
            super::part::remove_part(&part);
            return Err(e);
        }
        let _ = std::fs::remove_file(&meta);
        if let Err(e) = rename_durable(&part, path) {
            let _ = std::fs::remove_file(&part);
            let msg = format!("cannot move the image to {}: {e}", path.display());
            return Err(self.fail(FetchError::Storage(msg)));
        }
        let verified = match self.fetch.outcome() {
            Some(Ok(v)) => v.clone(),
            _ => unreachable!("finish verified it"),
        };
        Ok(DeltaEnd::Done(verified))
    }

    /// Hashes the whole chunks of the first `keep` bytes of the part file
    /// that still match the index, cuts the file after them, and returns
    /// the first chunk to write.
    async fn keep_written(
        &mut self,
        file: &mut std::fs::File,
        part: &Path,
        index: &Index,
        keep: u64,
    ) -> Result<usize, FetchError> {
        let storage = |e: std::io::Error| FetchError::Storage(format!("{}: {e}", part.display()));
        let mut reader = std::fs::File::open(part).map_err(storage)?;
        let mut buf = Vec::new();
        let mut done = 0;
        for c in &index.chunks {
            if c.end() > keep {
                break;
            }
            buf.resize(c.len as usize, 0);
            reader.read_exact(&mut buf).map_err(storage)?;
            if sha256(&buf) != c.sha256 {
                break;
            }
            self.fetch.handle_copied(&buf)?;
            done += 1;
            tokio::task::yield_now().await;
        }
        let at = index.chunks.get(done).map_or(index.size, |c| c.offset);
        file.set_len(at).map_err(storage)?;
        file.seek(SeekFrom::Start(at)).map_err(storage)?;
        Ok(done)
    }

    /// Copies chunk `i` of the new image from the base at `from`.
    fn copy_chunk(
        &mut self,
        base: &mut std::fs::File,
        out: &mut std::fs::File,
        index: &Index,
        i: usize,
        from: u64,
    ) -> Result<(), Stop> {
        let c = &index.chunks[i];
        let mut buf = vec![0u8; c.len as usize];
        let read = base
            .seek(SeekFrom::Start(from))
            .and_then(|_| base.read_exact(&mut buf));
        if read.is_err() || sha256(&buf) != c.sha256 {
            return Err(Stop::Full(format!(
                "the base changed while it was read (its bytes at {from}): full download"
            )));
        }
        self.fetch.handle_copied(&buf)?;
        out.write_all(&buf)
            .map_err(|e| FetchError::Storage(format!("writing the image: {e}")))?;
        Ok(())
    }

    /// Fetches `chunks` of the new image with one Range request (more, if
    /// the connection breaks: each goes on at the first chunk not written,
    /// after the pause and within the resumes `pace` allows).
    async fn fetch_chunks(
        &mut self,
        out: &mut std::fs::File,
        index: &Index,
        chunks: std::ops::Range<usize>,
        url: &str,
        http: &HttpOptions,
        pace: &mut Pace,
    ) -> Result<(), Stop> {
        let mut i = chunks.start;
        let mut buf = Vec::new();
        let end = index.chunks[chunks.end - 1].end() - 1;
        while i < chunks.end {
            if let Some(at) = pace.resume_at() {
                tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                pace.resumed();
            }
            pace.check_deadline(now())?;
            let broke = match Body::open_range(url, index.chunks[i].offset, end, http).await {
                Err(HttpError::RangeIgnored) => {
                    return Err(Stop::FullFromStart(
                        "the server ignores Range requests: full download".into(),
                    ))
                }
                Err(e @ HttpError::RangeMismatch { .. })
                | Err(e @ HttpError::Status { code: 416, .. }) => {
                    return Err(Stop::Full(format!(
                        "the server does not answer the ranges asked for ({e}): full download"
                    )))
                }
                Err(e) => FetchError::from(e),
                Ok(mut body) => {
                    pace.opened(now());
                    let read = self
                        .read_chunks(&mut body, out, index, &mut i, chunks.end, &mut buf, pace)
                        .await;
                    match read {
                        Ok(()) => continue,
                        Err(Stop::Fail(e @ FetchError::Transport { .. })) if e.is_retryable() => e,
                        Err(other) => return Err(other),
                    }
                }
            };
            let message = broke.to_string();
            let at = pace.interrupted(broke, now())?;
            log::warn!(
                "delta range interrupted ({message}); again from chunk {i} in {:.1?}",
                at.saturating_duration_since(now())
            );
        }
        Ok(())
    }

    /// Reads chunks `*i..end` from `body`, checks and writes each.
    #[allow(clippy::too_many_arguments)] // one range's whole state
    async fn read_chunks(
        &mut self,
        body: &mut Body,
        out: &mut std::fs::File,
        index: &Index,
        i: &mut usize,
        end: usize,
        buf: &mut Vec<u8>,
        pace: &mut Pace,
    ) -> Result<(), Stop> {
        while *i < end {
            let c = index.chunks[*i];
            buf.resize(c.len as usize, 0);
            let mut have = 0;
            while have < buf.len() {
                match body.read(&mut buf[have..]).await {
                    Ok(0) => {
                        return Err(Stop::Fail(FetchError::Transport {
                            message: format!("a range ended {have} bytes into chunk {}", *i),
                            retryable: true,
                            http_status: None,
                        }))
                    }
                    Ok(n) => {
                        have += n;
                        pace.received(n as u64, now())?;
                        pace.check_deadline(now())?;
                    }
                    Err(e) => return Err(Stop::Fail(e.into())),
                }
            }
            if sha256(buf) != c.sha256 {
                return Err(Stop::Fail(FetchError::DeltaMismatch(format!(
                    "chunk {} (bytes {}-{}) from the server is not the one the index names",
                    *i,
                    c.offset,
                    c.end() - 1
                ))));
            }
            if let Some(report) = self.fetch.handle_data(buf, std::time::Instant::now())? {
                self.session.publish_progress(&report);
            }
            out.write_all(buf)
                .map_err(|e| FetchError::Storage(format!("writing the image: {e}")))?;
            *i += 1;
        }
        Ok(())
    }
}

/// Why the chunk index was not read.
enum IndexError {
    /// The server did not give it (the full download may still work).
    Unreachable(String),
    /// It is not the size the command says: not the index it names.
    Size(String),
    /// Below the minimum rate, or past the deadline.
    TooSlow(FetchError),
}

/// The chunk index: exactly `size` bytes (the command's), within `pace`.
async fn fetch_index(
    url: &str,
    size: u64,
    http: &HttpOptions,
    pace: &mut Pace,
) -> Result<Vec<u8>, IndexError> {
    let unreachable = |e: HttpError| IndexError::Unreachable(e.to_string());
    pace.check_deadline(now()).map_err(IndexError::TooSlow)?;
    let mut body = Body::open(url, 0, http).await.map_err(unreachable)?;
    pace.opened(now());
    // Grown as bytes come: the command's size is not trusted with memory.
    let mut bytes = Vec::with_capacity(size.min(1 << 20) as usize);
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = body.read(&mut buf).await.map_err(unreachable)?;
        if n == 0 {
            break;
        }
        pace.received(n as u64, now())
            .map_err(IndexError::TooSlow)?;
        pace.check_deadline(now()).map_err(IndexError::TooSlow)?;
        bytes.extend_from_slice(&buf[..n]);
        if bytes.len() as u64 > size {
            return Err(IndexError::Size(format!(
                "longer than the {size} bytes the command says"
            )));
        }
    }
    if (bytes.len() as u64) < size {
        // Cut short (a body framed by the connection's end): not a forgery.
        return Err(IndexError::Unreachable(format!(
            "{} of its {size} bytes came",
            bytes.len()
        )));
    }
    Ok(bytes)
}
