//! The HTTP side of a download: opens the URL, and resumes a broken
//! transfer from where it stopped (Range), a bounded number of times.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use iot_ota_core::{FetchError, Pace, PaceRules};
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
    /// The deadline, the minimum rate and the resumes: the core's rules,
    /// told the time (tokio's clock, so that tests can pause it).
    pace: Pace,
}

/// Now, on tokio's clock (paused in tests), as the core takes it.
pub(super) fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// The minimum rate, overall deadline and resumes of a transfer of `size`
/// bytes from `url` under `options`.
pub(super) fn pace(options: &DownloadOptions, url: &str, size: Option<u64>) -> Pace {
    let rules = PaceRules {
        retries: options.retries,
        min_rate: options.min_rate,
        rate_window: options.rate_window,
        deadline_base: options.deadline_base,
    };
    let backoff =
        crate::link::seeded_backoff(url, Duration::from_millis(500), Duration::from_secs(32));
    Pace::new(rules, size, backoff)
}

impl Source {
    pub(super) fn new(url: String, size: Option<u64>, options: DownloadOptions) -> Source {
        Source {
            pace: pace(&options, &url, size),
            url,
            options,
            body: None,
            opening: None,
        }
    }

    /// Its options.
    pub(super) fn options(&self) -> &DownloadOptions {
        &self.options
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
        self.pace.check_deadline(now())?;
        let chunk = self.next_chunk(received, buf).await?;
        match chunk {
            Chunk::Opened { .. } => self.pace.opened(now()),
            Chunk::Data(n) => self.pace.received(n as u64, now())?,
            Chunk::End => {}
        }
        Ok(chunk)
    }

    async fn next_chunk(&mut self, received: u64, buf: &mut [u8]) -> Result<Chunk, FetchError> {
        loop {
            if let Some(until) = self.pace.resume_at() {
                tokio::time::sleep_until(Instant::from_std(until)).await;
                self.pace.resumed();
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
        let message = error.to_string();
        let at = self.pace.interrupted(error, now())?;
        let pause = at.saturating_duration_since(now());
        log::warn!("download interrupted ({message}); resuming in {pause:.1?}");
        Ok(())
    }
}
