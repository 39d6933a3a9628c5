//! The HTTP side of a download: opens the URL, and resumes a broken
//! transfer from where it stopped (Range), a bounded number of times.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use iot_ota_core::{Backoff, FetchError};
use tokio::time::Instant;

use super::DownloadOptions;
use crate::http::{Body, HttpError};

/// What the source produced.
pub(super) enum Chunk {
    /// A (re)opened response carries the body from `offset`, `remaining` bytes if known.
    Opened { offset: u64, remaining: Option<u64> },
    /// `n` bytes were read into the buffer.
    Data(usize),
    /// The body is complete.
    End,
}

type Opening = Pin<Box<dyn Future<Output = Result<Body, HttpError>> + Send>>;

/// The retrying HTTP source of one download.
///
/// Every await in [`Source::next`] is cancel-safe, and more: a cancelled
/// call loses no progress. A request still waiting for its response head
/// is kept, and the next call goes on waiting for the same response; a
/// pause before a resume keeps its deadline. So a caller that bounds each
/// call by a short timeout (the C API's `iot_ota_fetch_yield`, whose
/// `timeout_s` is often 1 s) never restarts a slow request: only the
/// download's own timeouts ([`crate::http::HttpOptions`]) end it.
pub(super) struct Source {
    url: String,
    options: DownloadOptions,
    body: Option<Body>,
    /// A request sent, its response not there yet.
    opening: Option<Opening>,
    /// No request before this (the pause before a resume).
    pause_until: Option<Instant>,
    retries_left: u32,
    backoff: Backoff,
    /// The image's size, when known: the overall deadline scales with it.
    size: Option<u64>,
    /// The overall deadline, from the first call.
    deadline: Option<Instant>,
    /// The current rate window: when it began, and the bytes since.
    window: Option<(Instant, u64)>,
}

impl Source {
    pub(super) fn new(url: String, size: Option<u64>, options: DownloadOptions) -> Source {
        Source {
            retries_left: options.retries,
            backoff: crate::link::seeded_backoff(
                &url,
                Duration::from_millis(500),
                Duration::from_secs(32),
            ),
            url,
            options,
            body: None,
            opening: None,
            pause_until: None,
            size,
            deadline: None,
            window: None,
        }
    }

    /// The URL downloaded.
    pub(super) fn url(&self) -> &str {
        &self.url
    }

    /// The next chunk. `received` is how many body bytes were taken so far,
    /// where a resumed request starts.
    pub(super) async fn next(
        &mut self,
        received: u64,
        buf: &mut [u8],
    ) -> Result<Chunk, FetchError> {
        self.check_deadline()?;
        let chunk = self.next_chunk(received, buf).await?;
        match chunk {
            Chunk::Opened { .. } => self.window = Some((Instant::now(), 0)),
            Chunk::Data(n) => self.check_rate(n as u64)?,
            Chunk::End => {}
        }
        Ok(chunk)
    }

    /// The overall deadline: `deadline_base + size / min_rate`, from the
    /// first call.
    fn check_deadline(&mut self) -> Result<(), FetchError> {
        let min_rate = self.options.min_rate;
        if min_rate == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let size = self.size.unwrap_or(0);
        let bound = self.options.deadline_base.as_secs() + size / min_rate;
        let deadline = *self
            .deadline
            .get_or_insert(now + Duration::from_secs(bound));
        if now > deadline {
            return Err(too_slow(format!(
                "not done within {bound} s, the deadline for {size} bytes at {min_rate} B/s"
            )));
        }
        Ok(())
    }

    /// The minimum rate, over each window since the response began.
    fn check_rate(&mut self, n: u64) -> Result<(), FetchError> {
        let (min_rate, span) = (self.options.min_rate, self.options.rate_window);
        let Some((start, bytes)) = self.window.as_mut() else {
            return Ok(());
        };
        *bytes += n;
        let elapsed = start.elapsed();
        if min_rate == 0 || elapsed < span {
            return Ok(());
        }
        let rate = u64::try_from(u128::from(*bytes) * 1000 / elapsed.as_millis().max(1))
            .unwrap_or(u64::MAX);
        if rate < min_rate {
            return Err(too_slow(format!(
                "the server sent {bytes} bytes in {} s ({rate} B/s), below the minimum of {min_rate} B/s",
                elapsed.as_secs()
            )));
        }
        self.window = Some((Instant::now(), 0));
        Ok(())
    }

    async fn next_chunk(&mut self, received: u64, buf: &mut [u8]) -> Result<Chunk, FetchError> {
        loop {
            if let Some(until) = self.pause_until {
                tokio::time::sleep_until(until).await;
                self.pause_until = None;
            }
            let Some(body) = self.body.as_mut() else {
                let opening = self.opening.get_or_insert_with(|| {
                    let url = self.url.clone();
                    let http = self.options.http.clone();
                    Box::pin(async move { Body::open(&url, received, &http).await })
                });
                let opened = opening.as_mut().await;
                self.opening = None;
                match opened {
                    Ok(body) => {
                        let chunk = Chunk::Opened {
                            offset: body.offset(),
                            remaining: body.remaining(),
                        };
                        self.body = Some(body);
                        return Ok(chunk);
                    }
                    Err(e) => {
                        self.retry_or_fail(e.into())?;
                        continue;
                    }
                }
            };
            match body.read(buf).await {
                Ok(0) => return Ok(Chunk::End),
                Ok(n) => return Ok(Chunk::Data(n)),
                Err(e) => {
                    self.body = None;
                    self.retry_or_fail(e.into())?;
                }
            }
        }
    }

    /// After a failure: fail, or schedule the resume.
    fn retry_or_fail(&mut self, error: FetchError) -> Result<(), FetchError> {
        if !error.is_retryable() || self.retries_left == 0 {
            return Err(error);
        }
        self.retries_left -= 1;
        let pause = self.backoff.next_delay();
        log::warn!("download interrupted ({error}); resuming in {pause:.1?}");
        self.pause_until = Some(Instant::now() + pause);
        Ok(())
    }
}

/// A download ended for being too slow: not retryable (the same server
/// would be as slow again).
fn too_slow(message: String) -> FetchError {
    FetchError::Transport {
        message,
        retryable: false,
        http_status: None,
    }
}
