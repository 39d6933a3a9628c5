//! A small streaming HTTP/1.1 GET client for firmware downloads.
//!
//! Why not a general HTTP client: the C API's `fetch_yield(buf, len, timeout)`
//! wants socket reads to land straight in the caller's buffer, the download
//! needs exact body-length checks and `Range` resume, and the device binary
//! must stay small. This client does one thing: `GET` with
//! `Connection: close`, redirects followed, one body streamed out.
//!
//! ```no_run
//! # async fn demo() -> Result<(), iot_ota_device::http::HttpError> {
//! use iot_ota_device::http::{Body, HttpOptions};
//! let mut body = Body::open("https://example.com/fw.bin", 0, &HttpOptions::default()).await?;
//! let mut buf = vec![0u8; 64 * 1024];
//! loop {
//!     let n = body.read(&mut buf).await?;
//!     if n == 0 {
//!         break; // the whole body, checked against its declared length
//!     }
//!     // write buf[..n] to flash, feed the digest
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod conn;
mod records;
mod wire;

#[doc(hidden)]
pub use wire::fuzz_entry;

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use tokio::time::{timeout, Instant};

use crate::tls::TlsError;
use conn::{exchange, Conn};
use wire::{plan_body, resolve_location, Chunk, Framing, Head, Span, MAX_CHUNK_LINE};

fn is_https(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

/// How long to wait for bytes beyond a declared length before calling the
/// body complete. A server that closes promptly costs nothing; one that
/// keeps the connection open costs this once per download.
const OVERRUN_GRACE: Duration = Duration::from_millis(50);

/// Settings of a download.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Bound on name resolution, TCP connect, TLS handshake, sending the
    /// request and receiving the response head, together, per redirect hop.
    pub connect_timeout: Duration,
    /// Bound on every single read of the socket. Over TLS a read ends
    /// with a whole record, so a server must send one (up to 16 KiB)
    /// within it, as it had to with rustls's own reader.
    pub idle_timeout: Duration,
    /// Redirects followed before [`HttpError::TooManyRedirects`].
    pub max_redirects: u8,
    /// TLS configuration for `https` URLs; `None` uses the system roots
    /// ([`crate::tls::TlsOptions::default`]), built once per process on first use.
    ///
    /// rustls runs the handshake with this configuration (its provider,
    /// roots, client certificate, versions and suites); the server's
    /// records are then opened by this client with the negotiated suite's
    /// decrypter from that provider (ring, aws-lc-rs, a FIPS build), or by
    /// rustls's own reader when a suite of the provider cannot hand its keys
    /// over. `enable_secret_extraction` need not be set: a configuration
    /// without it is copied with it on, per connection.
    pub tls: Option<Arc<ClientConfig>>,
    /// The `User-Agent` header's value.
    pub user_agent: String,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            max_redirects: 5,
            tls: None,
            user_agent: concat!("iot-ota-device/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

/// Why a download failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum HttpError {
    /// The URL (given, or from a redirect) is not an `http`/`https` URL this
    /// client can fetch.
    BadUrl(String),
    /// Name resolution failed, or no address of the host accepted a TCP
    /// connection.
    Connect {
        /// The host of the URL.
        host: String,
        /// The port of the URL.
        port: u16,
        /// The last error seen.
        source: io::Error,
    },
    /// A step took longer than its bound: `connect_timeout` for everything
    /// up to the response head, `idle_timeout` for any one socket read.
    Timeout {
        /// The step: `connect`, `TLS handshake`, `request`, `response head`
        /// or `read`.
        during: &'static str,
    },
    /// The connection failed: reset, closed before the response head, or
    /// another socket error.
    Io(io::Error),
    /// TLS failed: an untrusted or invalid certificate, a handshake the
    /// server refused, a corrupt record.
    Tls(rustls::Error),
    /// No TLS configuration could be built for an `https` URL.
    TlsConfig(TlsError),
    /// The server's response is not valid HTTP/1.1, or uses something this
    /// client does not support (a content or transfer coding).
    BadResponse(String),
    /// The server answered with a status other than 200, 206 or a redirect.
    Status {
        /// The status code.
        code: u16,
        /// The reason phrase, as sent.
        reason: String,
    },
    /// More redirects than `max_redirects`.
    TooManyRedirects {
        /// The limit that was reached.
        limit: u8,
        /// The URL of the last redirect response.
        url: String,
    },
    /// An `https` URL redirected to an `http` one: refused, always (the
    /// image would then travel, and could be replaced, in the clear).
    InsecureRedirect {
        /// The `https` URL that redirected.
        from: String,
        /// Where it pointed.
        to: String,
    },
    /// A download resumed with `Range` got a full `200` body: the server
    /// ignores ranges. Resuming again is pointless: restart from offset 0.
    RangeIgnored,
    /// A `206` response whose `Content-Range` is missing, malformed or starts
    /// elsewhere than the requested offset.
    RangeMismatch {
        /// The offset asked for.
        requested: u64,
        /// The `Content-Range` header, if there was one.
        content_range: Option<String>,
    },
    /// The connection ended before the body was complete.
    Truncated {
        /// Bytes of this response's body that were due, when known.
        expected: Option<u64>,
        /// Bytes of this response's body received.
        received: u64,
    },
    /// The server sent more body bytes than it declared.
    TooLong {
        /// Bytes of this response's body that were declared.
        expected: u64,
    },
}

impl HttpError {
    /// Whether trying again (resuming from the bytes already kept) may
    /// succeed: true for connection failures, resets, timeouts, truncation,
    /// and the statuses that mean "later" (5xx, 408, 429); false for the
    /// rest, which another attempt would meet again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Timeout { .. } | Self::Io(_) | Self::Truncated { .. } => {
                true
            }
            Self::Status { code, .. } => *code >= 500 || *code == 408 || *code == 429,
            _ => false,
        }
    }

    /// Classifies a socket error: rustls reports TLS failures as
    /// `io::Error`s that wrap a `rustls::Error`.
    fn from_io(e: io::Error) -> Self {
        let tls = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .cloned();
        match tls {
            Some(t) => Self::Tls(t),
            None => Self::Io(e),
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadUrl(why) => write!(f, "bad url: {why}"),
            Self::Connect { host, port, source } => {
                write!(f, "cannot connect to {host} port {port}: {source}")
            }
            Self::Timeout { during } => write!(f, "timed out: {during}"),
            Self::Io(e) => write!(f, "connection failed: {e}"),
            Self::Tls(e) => write!(f, "TLS failed: {e}"),
            Self::TlsConfig(e) => write!(f, "TLS configuration: {e}"),
            Self::BadResponse(why) => write!(f, "bad HTTP response: {why}"),
            Self::Status { code, reason } => write!(f, "HTTP status {code} {reason}"),
            Self::TooManyRedirects { limit, url } => {
                write!(f, "more than {limit} redirects, the last from {url}")
            }
            Self::InsecureRedirect { from, to } => {
                write!(f, "refused the redirect from {from} to plain {to}")
            }
            Self::RangeIgnored => f.write_str("the server ignored the Range request (sent 200)"),
            Self::RangeMismatch {
                requested,
                content_range,
            } => write!(
                f,
                "206 response does not start at the requested offset {requested}: Content-Range {}",
                content_range.as_deref().unwrap_or("missing")
            ),
            Self::Truncated {
                expected: Some(expected),
                received,
            } => write!(f, "body truncated: received {received} of {expected} bytes"),
            Self::Truncated {
                expected: None,
                received,
            } => write!(f, "body truncated after {received} bytes"),
            Self::TooLong { expected } => {
                write!(f, "body longer than the declared {expected} bytes")
            }
        }
    }
}

impl std::error::Error for HttpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Connect { source, .. } | Self::Io(source) => Some(source),
            Self::Tls(e) => Some(e),
            Self::TlsConfig(e) => Some(e),
            _ => None,
        }
    }
}

/// An open response body.
///
/// [`Body::read`] is cancel-safe: dropping its future (say, under the C
/// API's `fetch_yield` timeout) loses no bytes, and reading may go on.
pub struct Body {
    conn: Conn,
    framing: Framing,
    status: u16,
    offset: u64,
    total_size: Option<u64>,
    /// Bytes this response's body must carry, when known.
    expected: Option<u64>,
    received: u64,
    final_url: String,
    state: BodyState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Open,
    /// Ended, and every end check passed: reads return 0.
    Done,
    /// A read failed: the connection is in an unknown state.
    Failed,
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Body")
            .field("status", &self.status)
            .field("offset", &self.offset)
            .field("total_size", &self.total_size)
            .field("expected", &self.expected)
            .field("received", &self.received)
            .field("framing", &self.framing)
            .field("final_url", &self.final_url)
            .finish_non_exhaustive()
    }
}

impl Body {
    /// GET `url`, from byte `offset` (sends `Range: bytes=offset-` when
    /// offset > 0), following redirects.
    ///
    /// Returns once the response head of a `200` or `206` has arrived. A `200`
    /// to a request with `offset > 0` is [`HttpError::RangeIgnored`]; a `206`
    /// must start at `offset`.
    pub async fn open(url: &str, offset: u64, opts: &HttpOptions) -> Result<Body, HttpError> {
        Body::open_span(url, offset.into(), opts).await
    }

    /// GET bytes `start..=end` of `url` (`Range: bytes=start-end`),
    /// following redirects: what a delta update fetches.
    ///
    /// The answer must be a `206` of exactly that range (ending at the
    /// file's last byte when `end` is past it); a `200` (a server that
    /// ignores Range) is [`HttpError::RangeIgnored`], any other range
    /// [`HttpError::RangeMismatch`].
    pub async fn open_range(
        url: &str,
        start: u64,
        end: u64,
        opts: &HttpOptions,
    ) -> Result<Body, HttpError> {
        if end < start {
            return Err(HttpError::BadUrl(format!(
                "an empty range {start}-{end} of {url}"
            )));
        }
        let span = Span {
            start,
            end: Some(end),
        };
        Body::open_span(url, span, opts).await
    }

    async fn open_span(url: &str, span: Span, opts: &HttpOptions) -> Result<Body, HttpError> {
        let mut url = url.to_owned();
        let mut redirects = 0u8;
        loop {
            let deadline = Instant::now() + opts.connect_timeout;
            let (conn, head) = exchange(&url, span, opts, deadline).await?;
            match head.code {
                200 | 206 => return Body::new(conn, head, span, url),
                301 | 302 | 303 | 307 | 308 => {
                    if redirects >= opts.max_redirects {
                        return Err(HttpError::TooManyRedirects {
                            limit: opts.max_redirects,
                            url,
                        });
                    }
                    let location = head.location.ok_or_else(|| {
                        HttpError::BadResponse(format!(
                            "redirect {} without a Location header",
                            head.code
                        ))
                    })?;
                    let next = resolve_location(&url, &location);
                    if is_https(&url) && !is_https(&next) {
                        return Err(HttpError::InsecureRedirect {
                            from: url,
                            to: next,
                        });
                    }
                    url = next;
                    redirects += 1;
                }
                code => {
                    return Err(HttpError::Status {
                        code,
                        reason: head.reason,
                    })
                }
            }
        }
    }

    fn new(conn: Conn, head: Head, span: Span, url: String) -> Result<Body, HttpError> {
        let plan = plan_body(&head, span)?;
        Ok(Body {
            conn,
            framing: plan.framing,
            status: head.code,
            offset: plan.offset,
            total_size: plan.total_size,
            expected: plan.expected,
            received: 0,
            final_url: url,
            state: BodyState::Open,
        })
    }

    /// The response status: 200 or 206.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The offset in the whole file of the first byte this body carries: 0
    /// for a 200, the `Content-Range` start for a 206.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes of the body still to come, if the length is known.
    pub fn remaining(&self) -> Option<u64> {
        self.expected.map(|e| e - self.received)
    }

    /// Size of the whole file: the `Content-Range` total of a 206, or the
    /// `Content-Length` of a 200; `None` when the server did not say.
    pub fn total_size(&self) -> Option<u64> {
        self.total_size
    }

    /// The URL the body came from, after redirects.
    pub fn final_url(&self) -> &str {
        &self.final_url
    }

    /// Reads body bytes into `buf`, returning how many.
    ///
    /// `Ok(0)` comes only at the real, complete end of the body (or for an
    /// empty `buf`). The read after the declared length is reached checks
    /// that the server sends nothing more ([`HttpError::TooLong`]): read
    /// until `Ok(0)` to have the whole body checked. Every read is
    /// cancel-safe: a read dropped before it returns has taken nothing.
    /// After an error the body is unusable: open it again.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<usize, HttpError> {
        match self.state {
            BodyState::Open if !buf.is_empty() => {}
            BodyState::Failed => {
                return Err(HttpError::Io(io::Error::other(
                    "read after the body already failed",
                )))
            }
            _ => return Ok(0),
        }
        match self.read_inner(buf).await {
            Ok(n) => Ok(n),
            Err(e) => {
                self.state = BodyState::Failed;
                Err(e)
            }
        }
    }

    async fn read_inner(&mut self, buf: &mut [u8]) -> Result<usize, HttpError> {
        let want = match self.remaining() {
            Some(r) => buf.len().min(usize::try_from(r).unwrap_or(usize::MAX)),
            None => buf.len(),
        };
        let n = match self.framing {
            Framing::Length if want == 0 => 0,
            Framing::Length => self.read_length(&mut buf[..want]).await?,
            Framing::Chunked(_) => self.read_chunked(&mut buf[..want]).await?,
            Framing::Eof => self.read_eof(buf).await?,
        };
        self.received += n as u64;
        // The end checks (nothing after a declared length; the chunked
        // framing's end) run on the read after the last byte, never on the
        // read that returns it: that read may be cancelled by its caller's
        // timeout during the checks, and its bytes would be lost.
        if n == 0 {
            self.finish().await?;
        }
        Ok(n)
    }

    async fn read_length(&mut self, buf: &mut [u8]) -> Result<usize, HttpError> {
        let n = self.conn.read(buf).await?;
        if n == 0 {
            return Err(self.truncated());
        }
        Ok(n)
    }

    async fn read_eof(&mut self, buf: &mut [u8]) -> Result<usize, HttpError> {
        let n = self.conn.read(buf).await?;
        // Without close_notify, a TLS EOF may be an attacker's cut.
        if n == 0 && self.conn.unclean_eof {
            return Err(self.truncated());
        }
        Ok(n)
    }

    async fn read_chunked(&mut self, buf: &mut [u8]) -> Result<usize, HttpError> {
        loop {
            match self.framing {
                Framing::Chunked(Chunk::Data(left)) => {
                    // An empty `buf` here means the declared length is
                    // reached while a chunk still has data.
                    if buf.is_empty() {
                        return Err(self.too_long());
                    }
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let n = self.conn.read(&mut buf[..want]).await?;
                    if n == 0 {
                        return Err(self.truncated());
                    }
                    self.framing = Framing::after_data(left, n as u64);
                    return Ok(n);
                }
                Framing::Chunked(Chunk::Done) => return Ok(0),
                _ => self.chunk_framing_line().await?,
            }
        }
    }

    /// Reads and acts on one line of chunked framing (a size line, the CRLF
    /// after data, or a trailer line).
    async fn chunk_framing_line(&mut self) -> Result<(), HttpError> {
        let Some(line) = self.conn.line(MAX_CHUNK_LINE, "chunk line").await? else {
            return Err(self.truncated());
        };
        self.framing = self.framing.after_line(line)?;
        Ok(())
    }

    /// The end checks, once the body's end or declared length is reached.
    async fn finish(&mut self) -> Result<(), HttpError> {
        match self.framing {
            Framing::Length => self.check_no_overrun().await?,
            Framing::Chunked(_) => self.finish_chunked().await?,
            Framing::Eof => {}
        }
        self.state = BodyState::Done;
        Ok(())
    }

    /// Reads the chunked framing after the declared length: it must end
    /// without another data byte, and not before that length.
    async fn finish_chunked(&mut self) -> Result<(), HttpError> {
        loop {
            match self.framing {
                Framing::Chunked(Chunk::Data(_)) => return Err(self.too_long()),
                Framing::Chunked(Chunk::Done) => break,
                _ => self.chunk_framing_line().await?,
            }
        }
        match self.remaining() {
            Some(r) if r > 0 => Err(self.truncated()),
            _ => Ok(()),
        }
    }

    /// After a `Content-Length` body: any further byte means the server
    /// meant something else than it declared.
    async fn check_no_overrun(&mut self) -> Result<(), HttpError> {
        if self.conn.buffered() > 0 {
            return Err(self.too_long());
        }
        let mut probe = [0u8; 1];
        match timeout(OVERRUN_GRACE, self.conn.stream.read(&mut probe)).await {
            Ok(Ok(n)) if n > 0 => Err(self.too_long()),
            // EOF, silence, or an error once every declared byte is in.
            _ => Ok(()),
        }
    }

    fn truncated(&self) -> HttpError {
        HttpError::Truncated {
            expected: self.expected,
            received: self.received,
        }
    }

    fn too_long(&self) -> HttpError {
        HttpError::TooLong {
            expected: self.expected.unwrap_or(self.received),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::tests::TempFile;
    use crate::tls::{client_config, TlsOptions};
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use tokio::io::{AsyncRead, AsyncWrite};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;
    use tokio_rustls::TlsAcceptor;

    /// What a test server does after reading a request.
    enum Step {
        Write(Vec<u8>),
        Pause(Duration),
    }

    fn write(bytes: impl AsRef<[u8]>) -> Step {
        Step::Write(bytes.as_ref().to_vec())
    }

    /// A loopback server answering each connection with the handler's steps,
    /// then closing it. Dropping it stops it.
    struct Server {
        addr: SocketAddr,
        requests: Arc<Mutex<Vec<String>>>,
        task: JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Server {
        async fn start<F>(tls: Option<TlsAcceptor>, handler: F) -> Server
        where
            F: Fn(&str, u16) -> Vec<Step> + Send + Sync + 'static,
        {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let requests = Arc::new(Mutex::new(Vec::new()));
            let log = requests.clone();
            // One connection at a time, inside this task, so that aborting
            // it stops everything the server does.
            let task = tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    match &tls {
                        None => answer(tcp, &handler, &log, addr.port()).await,
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(tcp).await {
                                answer(s, &handler, &log, addr.port()).await;
                            }
                        }
                    }
                }
            });
            Server {
                addr,
                requests,
                task,
            }
        }

        async fn plain<F>(handler: F) -> Server
        where
            F: Fn(&str, u16) -> Vec<Step> + Send + Sync + 'static,
        {
            Self::start(None, handler).await
        }

        /// A server answering every request with the same bytes.
        async fn fixed(response: &'static str) -> Server {
            Self::plain(move |_, _| vec![write(response)]).await
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        fn request(&self, i: usize) -> String {
            self.requests.lock().unwrap()[i].clone()
        }
    }

    async fn answer<S, F>(mut s: S, handler: &F, log: &Mutex<Vec<String>>, port: u16)
    where
        S: AsyncRead + AsyncWrite + Unpin,
        F: Fn(&str, u16) -> Vec<Step>,
    {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
        log.lock().unwrap().push(head);
        for step in handler(&path, port) {
            match step {
                Step::Write(bytes) => {
                    if s.write_all(&bytes).await.is_err() || s.flush().await.is_err() {
                        return;
                    }
                }
                Step::Pause(d) => tokio::time::sleep(d).await,
            }
        }
        let _ = s.shutdown().await;
    }

    async fn read_all(body: &mut Body, buf_size: usize) -> Result<Vec<u8>, HttpError> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; buf_size];
        loop {
            match body.read(&mut buf).await? {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    async fn get(url: &str) -> Result<Vec<u8>, HttpError> {
        let mut body = Body::open(url, 0, &HttpOptions::default()).await?;
        read_all(&mut body, 4096).await
    }

    #[tokio::test]
    async fn content_length_body_and_request_head() {
        let server =
            Server::fixed("HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world").await;
        let mut body = Body::open(&server.url("/fw.bin?v=2"), 0, &HttpOptions::default())
            .await
            .unwrap();
        assert_eq!(
            (
                body.status(),
                body.offset(),
                body.total_size(),
                body.remaining()
            ),
            (200, 0, Some(11), Some(11))
        );
        assert_eq!(read_all(&mut body, 4).await.unwrap(), b"hello world");
        assert_eq!(body.remaining(), Some(0));
        assert_eq!(body.read(&mut [0; 8]).await.unwrap(), 0);
        let req = server.request(0);
        assert!(req.starts_with("GET /fw.bin?v=2 HTTP/1.1\r\n"), "{req}");
        for header in [
            format!("Host: {}\r\n", server.addr),
            "User-Agent: iot-ota-device/".into(),
            "Accept-Encoding: identity\r\n".into(),
            "Connection: close\r\n".into(),
        ] {
            assert!(req.contains(&header), "{header} missing from {req}");
        }
        assert!(!req.contains("Range"), "{req}");
    }

    #[tokio::test]
    async fn empty_content_length_body() {
        let server = Server::fixed("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(get(&server.url("/")).await.unwrap(), b"");
    }

    const CHUNKED: &str = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
        4\r\nWiki\r\n5;name=value\r\npedia\r\nE \r\n in\r\n\r\nchunks.\r\n\
        0\r\nExpires: never\r\nX-Trailer: 1\r\n\r\n";
    const UNCHUNKED: &[u8] = b"Wikipedia in\r\n\r\nchunks.";

    #[tokio::test]
    async fn chunked_body_with_extensions_and_trailers() {
        let server = Server::fixed(CHUNKED).await;
        let mut body = Body::open(&server.url("/"), 0, &HttpOptions::default())
            .await
            .unwrap();
        assert_eq!((body.remaining(), body.total_size()), (None, None));
        assert_eq!(read_all(&mut body, 7).await.unwrap(), UNCHUNKED);
    }

    #[tokio::test]
    async fn chunked_body_split_across_packets_read_with_7_byte_buffer() {
        let server = Server::plain(|_, _| {
            let mut steps = Vec::new();
            for piece in CHUNKED.as_bytes().chunks(5) {
                steps.push(write(piece));
                steps.push(Step::Pause(Duration::from_millis(1)));
            }
            steps
        })
        .await;
        let mut body = Body::open(&server.url("/"), 0, &HttpOptions::default())
            .await
            .unwrap();
        assert_eq!(read_all(&mut body, 7).await.unwrap(), UNCHUNKED);
    }

    #[tokio::test]
    async fn chunked_body_cut_short_is_truncated() {
        let server =
            Server::fixed("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .await;
        let err = get(&server.url("/")).await.unwrap_err();
        assert!(
            matches!(
                err,
                HttpError::Truncated {
                    expected: None,
                    received: 5
                }
            ),
            "{err:?}"
        );
        assert!(err.is_retryable());
    }

    #[tokio::test]
    async fn body_to_eof_has_unknown_length() {
        let server = Server::fixed("HTTP/1.1 200 OK\r\n\r\nuntil the end").await;
        let mut body = Body::open(&server.url("/"), 0, &HttpOptions::default())
            .await
            .unwrap();
        assert_eq!((body.remaining(), body.total_size()), (None, None));
        assert_eq!(read_all(&mut body, 3).await.unwrap(), b"until the end");
    }

    #[tokio::test]
    async fn early_eof_is_truncated() {
        let server = Server::fixed("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello").await;
        let err = get(&server.url("/")).await.unwrap_err();
        assert!(
            matches!(
                err,
                HttpError::Truncated {
                    expected: Some(10),
                    received: 5
                }
            ),
            "{err:?}"
        );
        assert!(err.is_retryable());
    }

    #[tokio::test]
    async fn extra_bytes_in_the_same_packet_are_too_long() {
        let server = Server::fixed("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloX").await;
        let err = get(&server.url("/")).await.unwrap_err();
        assert!(matches!(err, HttpError::TooLong { expected: 5 }), "{err:?}");
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn extra_bytes_arriving_later_are_too_long() {
        let server = Server::plain(|_, _| {
            vec![
                write("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
                Step::Pause(Duration::from_millis(10)),
                write("more"),
            ]
        })
        .await;
        let mut body = Body::open(&server.url("/"), 0, &HttpOptions::default())
            .await
            .unwrap();
        // The read after the declared length runs the check (the read that
        // completes it returns its bytes at once: it must stay cancel-safe).
        assert_eq!(body.read(&mut [0; 64]).await.unwrap(), 5);
        assert_eq!(body.remaining(), Some(0));
        let err = body.read(&mut [0; 64]).await.unwrap_err();
        assert!(matches!(err, HttpError::TooLong { expected: 5 }), "{err:?}");
        assert!(body.read(&mut [0; 64]).await.is_err());
    }

    #[tokio::test]
    async fn statuses_other_than_200_and_206_are_errors() {
        let server = Server::plain(|path, _| match path {
            "/missing" => vec![write(
                "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found",
            )],
            _ => vec![write("HTTP/1.1 500 Internal Server Error\r\n\r\n")],
        })
        .await;
        let err = get(&server.url("/missing")).await.unwrap_err();
        assert!(
            matches!(&err, HttpError::Status { code: 404, reason } if reason == "Not Found"),
            "{err:?}"
        );
        assert!(!err.is_retryable());
        let err = get(&server.url("/broken")).await.unwrap_err();
        assert!(
            matches!(err, HttpError::Status { code: 500, .. }),
            "{err:?}"
        );
        assert!(err.is_retryable());
    }

    #[tokio::test]
    async fn relative_and_absolute_redirects_are_followed() {
        let server = Server::plain(|path, port| {
            let redirect = |code: u16, to: String| {
                vec![write(format!(
                    "HTTP/1.1 {code} Moved\r\nLocation: {to}\r\nContent-Length: 0\r\n\r\n"
                ))]
            };
            match path {
                "/a/start" => redirect(301, "next".into()),
                "/a/next" => redirect(302, "/b".into()),
                "/b" => redirect(307, format!("http://127.0.0.1:{port}/c")),
                "/c" => redirect(308, format!("//127.0.0.1:{port}/d/file")),
                "/d/file" => vec![write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")],
                _ => vec![write("HTTP/1.1 404 Not Found\r\n\r\n")],
            }
        })
        .await;
        let mut body = Body::open(&server.url("/a/start"), 0, &HttpOptions::default())
            .await
            .unwrap();
        assert_eq!(body.final_url(), server.url("/d/file"));
        assert_eq!(read_all(&mut body, 64).await.unwrap(), b"ok");
    }

    #[tokio::test]
    async fn redirect_limit() {
        // /hopN redirects to /hop(N-1); /hop0 is the file.
        let server = Server::plain(|path, _| {
            let n: u32 = path.trim_start_matches("/hop").parse().unwrap();
            if n == 0 {
                return vec![write("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")];
            }
            vec![write(format!(
                "HTTP/1.1 302 Found\r\nLocation: /hop{}\r\n\r\n",
                n - 1
            ))]
        })
        .await;
        assert_eq!(get(&server.url("/hop5")).await.unwrap(), b"x");
        let err = get(&server.url("/hop6")).await.unwrap_err();
        assert!(
            matches!(&err, HttpError::TooManyRedirects { limit: 5, url } if url.ends_with("/hop1")),
            "{err:?}"
        );
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn range_resume_gets_206() {
        let server = Server::fixed(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 5-9/10\r\n\
             Content-Length: 5\r\n\r\n56789",
        )
        .await;
        let mut body = Body::open(&server.url("/"), 5, &HttpOptions::default())
            .await
            .unwrap();
        assert!(server.request(0).contains("Range: bytes=5-\r\n"));
        assert_eq!(
            (
                body.status(),
                body.offset(),
                body.total_size(),
                body.remaining()
            ),
            (206, 5, Some(10), Some(5))
        );
        assert_eq!(read_all(&mut body, 64).await.unwrap(), b"56789");
    }

    #[tokio::test]
    async fn range_206_without_content_length_uses_content_range() {
        let server =
            Server::fixed("HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 5-9/*\r\n\r\n567")
                .await;
        let mut body = Body::open(&server.url("/"), 5, &HttpOptions::default())
            .await
            .unwrap();
        assert_eq!((body.total_size(), body.remaining()), (None, Some(5)));
        let err = read_all(&mut body, 64).await.unwrap_err();
        assert!(
            matches!(
                err,
                HttpError::Truncated {
                    expected: Some(5),
                    received: 3
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn range_206_starting_elsewhere_is_a_mismatch() {
        let server = Server::fixed(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/10\r\n\
             Content-Length: 10\r\n\r\n0123456789",
        )
        .await;
        let err = Body::open(&server.url("/"), 5, &HttpOptions::default())
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                HttpError::RangeMismatch { requested: 5, content_range: Some(r) } if r == "bytes 0-9/10"
            ),
            "{err:?}"
        );
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn range_answered_with_200_is_range_ignored() {
        let server = Server::fixed("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789").await;
        let err = Body::open(&server.url("/"), 5, &HttpOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::RangeIgnored), "{err:?}");
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn stalled_body_hits_idle_timeout() {
        let server = Server::plain(|_, _| {
            vec![
                write("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"),
                Step::Pause(Duration::from_secs(10)),
            ]
        })
        .await;
        let opts = HttpOptions {
            idle_timeout: Duration::from_millis(200),
            ..HttpOptions::default()
        };
        let mut body = Body::open(&server.url("/"), 0, &opts).await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(body.read(&mut buf).await.unwrap(), 3);
        let err = body.read(&mut buf).await.unwrap_err();
        assert!(
            matches!(err, HttpError::Timeout { during: "read" }),
            "{err:?}"
        );
        assert!(err.is_retryable());
    }

    /// Every read is cancel-safe, the last one too: a read cut off by its
    /// caller's timeout while it checks that nothing follows the declared
    /// length (a 50 ms wait on an open connection) used to lose the bytes it
    /// had already copied, and the body then ended short.
    #[tokio::test]
    async fn a_read_cancelled_during_the_end_check_loses_nothing() {
        let server = Server::plain(|_, _| {
            vec![
                write("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
                Step::Pause(Duration::from_secs(2)),
            ]
        })
        .await;
        let mut body = Body::open(&server.url("/"), 0, &HttpOptions::default())
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..200 {
            match tokio::time::timeout(Duration::from_millis(10), body.read(&mut buf)).await {
                Err(_) => continue, // cancelled: nothing may be lost
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => panic!("{e}"),
            }
        }
        assert_eq!(got, b"hello");
        assert_eq!(body.remaining(), Some(0));
        assert_eq!(body.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn stalled_head_hits_connect_timeout() {
        let server = Server::plain(|_, _| vec![Step::Pause(Duration::from_secs(10))]).await;
        let opts = HttpOptions {
            connect_timeout: Duration::from_millis(200),
            ..HttpOptions::default()
        };
        let err = Body::open(&server.url("/"), 0, &opts).await.unwrap_err();
        assert!(
            matches!(
                err,
                HttpError::Timeout {
                    during: "response head"
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn refused_connection_is_retryable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = get(&format!("http://{addr}/")).await.unwrap_err();
        assert!(matches!(err, HttpError::Connect { .. }), "{err:?}");
        assert!(err.is_retryable());
    }

    #[tokio::test]
    async fn bad_url_is_not_retryable() {
        let err = get("ftp://example.com/fw.bin").await.unwrap_err();
        assert!(matches!(err, HttpError::BadUrl(_)), "{err:?}");
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn malformed_and_unsupported_responses() {
        for response in [
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 1\r\n\r\nx",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "NOT HTTP\r\n\r\n",
        ] {
            let server = Server::fixed(response).await;
            let err = get(&server.url("/")).await.unwrap_err();
            assert!(
                matches!(err, HttpError::BadResponse(_)),
                "{response:?}: {err:?}"
            );
        }
    }

    #[tokio::test]
    async fn informational_heads_are_skipped() {
        let server = Server::fixed(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        )
        .await;
        assert_eq!(get(&server.url("/")).await.unwrap(), b"ok");
    }

    /// A CA, and a TLS acceptor whose certificate it signed for
    /// `localhost` and `127.0.0.1`.
    fn pki() -> (String, TlsAcceptor) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "iot-ota test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        (ca.pem(), TlsAcceptor::from(Arc::new(config)))
    }

    fn https_options(ca_pem: &str) -> (TempFile, HttpOptions) {
        let ca_file = TempFile::new(ca_pem);
        let tls = client_config(&TlsOptions {
            ca_file: Some(ca_file.0.clone()),
            ..TlsOptions::default()
        })
        .unwrap();
        let opts = HttpOptions {
            tls: Some(tls),
            ..HttpOptions::default()
        };
        (ca_file, opts)
    }

    #[tokio::test]
    async fn https_with_a_trusted_ca() {
        let (ca_pem, acceptor) = pki();
        let server = Server::start(Some(acceptor), |_, _| {
            vec![write(
                "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nsecure bytes",
            )]
        })
        .await;
        let (_ca_file, opts) = https_options(&ca_pem);
        let port = server.addr.port();
        for host in ["127.0.0.1", "localhost"] {
            let url = format!("https://{host}:{port}/fw.bin");
            let mut body = Body::open(&url, 0, &opts).await.unwrap();
            assert_eq!(read_all(&mut body, 5).await.unwrap(), b"secure bytes");
        }
    }

    /// A crypto provider of ring's TLS 1.3 AES-128-GCM suite whose
    /// decrypters count the records they open, and which can refuse to
    /// hand its keys over.
    mod counting {
        use std::sync::atomic::{AtomicUsize, Ordering};

        use rustls::crypto::cipher::{
            AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv, MessageDecrypter,
            MessageEncrypter, Tls13AeadAlgorithm, UnsupportedOperationError,
        };
        use rustls::{ConnectionTrafficSecrets, SupportedCipherSuite, Tls13CipherSuite};

        pub struct Counting {
            inner: &'static dyn Tls13AeadAlgorithm,
            pub opened: &'static AtomicUsize,
            hand_over: bool,
        }

        struct CountingDecrypter(Box<dyn MessageDecrypter>, &'static AtomicUsize);

        impl MessageDecrypter for CountingDecrypter {
            fn decrypt<'a>(
                &mut self,
                msg: InboundOpaqueMessage<'a>,
                seq: u64,
            ) -> Result<InboundPlainMessage<'a>, rustls::Error> {
                self.1.fetch_add(1, Ordering::Relaxed);
                self.0.decrypt(msg, seq)
            }
        }

        impl Tls13AeadAlgorithm for Counting {
            fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
                self.inner.encrypter(key, iv)
            }
            fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
                Box::new(CountingDecrypter(
                    self.inner.decrypter(key, iv),
                    self.opened,
                ))
            }
            fn key_len(&self) -> usize {
                self.inner.key_len()
            }
            fn extract_keys(
                &self,
                key: AeadKey,
                iv: Iv,
            ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
                if self.hand_over {
                    self.inner.extract_keys(key, iv)
                } else {
                    Err(UnsupportedOperationError)
                }
            }
        }

        /// The provider, and its count of records opened.
        pub fn provider(hand_over: bool) -> (rustls::crypto::CryptoProvider, &'static AtomicUsize) {
            let SupportedCipherSuite::Tls13(base) =
                rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
            else {
                unreachable!("a TLS 1.3 suite")
            };
            let opened: &'static AtomicUsize = Box::leak(Box::new(AtomicUsize::new(0)));
            let aead: &'static Counting = Box::leak(Box::new(Counting {
                inner: base.aead_alg,
                opened,
                hand_over,
            }));
            let suite: &'static Tls13CipherSuite = Box::leak(Box::new(Tls13CipherSuite {
                common: rustls::CipherSuiteCommon {
                    suite: base.common.suite,
                    hash_provider: base.common.hash_provider,
                    confidentiality_limit: base.common.confidentiality_limit,
                },
                hkdf_provider: base.hkdf_provider,
                aead_alg: aead,
                quic: base.quic,
            }));
            let provider = rustls::crypto::CryptoProvider {
                cipher_suites: vec![SupportedCipherSuite::Tls13(suite)],
                ..rustls::crypto::ring::default_provider()
            };
            (provider, opened)
        }
    }

    /// A client configuration over `provider` and TLS `version`, trusting
    /// `ca_pem`.
    fn config_with(
        provider: rustls::crypto::CryptoProvider,
        version: &'static rustls::SupportedProtocolVersion,
        ca_pem: &str,
    ) -> Arc<ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        Arc::new(
            ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// An HTTPS server (with a fresh CA, returned) that answers every GET
    /// with `body`.
    async fn https_serving(body: &[u8]) -> (String, Server) {
        let (ca_pem, acceptor) = pki();
        let served = body.to_vec();
        let server = Server::start(Some(acceptor), move |_, _| {
            let mut head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                served.len()
            )
            .into_bytes();
            head.extend_from_slice(&served);
            vec![write(head)]
        })
        .await;
        (ca_pem, server)
    }

    /// The caller's provider opens the records (on main, ring did whatever
    /// the provider: its decrypters saw only the handshake's few); one that
    /// keeps its keys gets rustls's own reader, and the download works.
    #[tokio::test]
    async fn the_callers_crypto_provider_opens_the_records() {
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        for hand_over in [true, false] {
            let (ca_pem, server) = https_serving(&body).await;
            let (provider, opened) = counting::provider(hand_over);
            let config = config_with(provider, &rustls::version::TLS13, &ca_pem);
            assert_eq!(records::hands_over(&config), hand_over);
            let opts = HttpOptions {
                tls: Some(config),
                ..HttpOptions::default()
            };
            let url = format!("https://localhost:{}/fw.bin", server.addr.port());
            let mut got = Body::open(&url, 0, &opts).await.unwrap();
            assert_eq!(read_all(&mut got, 64 * 1024).await.unwrap(), body);
            // 300 kB is at least 19 records of 16 KiB, each opened by the
            // provider's decrypter (by ours, or by rustls's reader).
            let n = opened.load(std::sync::atomic::Ordering::Relaxed);
            assert!(
                n >= 19,
                "the provider opened {n} records (hand over: {hand_over})"
            );
        }
    }

    /// An aws-lc-rs configuration downloads over TLS 1.2 and 1.3 (its TLS
    /// 1.2 GCM plaintext stays after the explicit nonce, where ring moves
    /// it to the front: the layer asks where it is). On main the TLS 1.3
    /// download decrypted with ring whatever the provider said.
    #[tokio::test]
    async fn an_aws_lc_rs_configuration_downloads_over_tls_1_2_and_1_3() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let (ca_pem, server) = https_serving(&body).await;
            let provider = rustls::crypto::aws_lc_rs::default_provider();
            let config = config_with(provider, version, &ca_pem);
            assert!(
                records::hands_over(&config),
                "aws-lc-rs hands its keys over"
            );
            let opts = HttpOptions {
                tls: Some(config),
                ..HttpOptions::default()
            };
            let url = format!("https://localhost:{}/fw.bin", server.addr.port());
            let mut got = Body::open(&url, 0, &opts).await.unwrap();
            assert_eq!(
                read_all(&mut got, 64 * 1024).await.unwrap(),
                body,
                "{version:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_https_redirect_to_plain_http_is_refused() {
        let (ca_pem, acceptor) = pki();
        let plain = Server::fixed("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi").await;
        let target = plain.url("/fw.bin");
        let tls = Server::start(Some(acceptor), move |_, _| {
            vec![write(format!(
                "HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n"
            ))]
        })
        .await;
        let (_ca, opts) = https_options(&ca_pem);
        let url = format!("https://localhost:{}/fw.bin", tls.addr.port());
        let err = Body::open(&url, 0, &opts).await.unwrap_err();
        assert!(matches!(err, HttpError::InsecureRedirect { .. }), "{err:?}");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("refused the redirect"), "{err}");
        assert!(plain.requests.lock().unwrap().is_empty(), "followed anyway");
    }

    #[tokio::test]
    async fn https_with_an_untrusted_certificate_fails() {
        let (_, acceptor) = pki();
        let (other_ca_pem, _) = pki();
        let server = Server::start(Some(acceptor), |_, _| {
            vec![write("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")]
        })
        .await;
        let (_ca_file, opts) = https_options(&other_ca_pem);
        let url = format!("https://127.0.0.1:{}/", server.addr.port());
        let err = Body::open(&url, 0, &opts).await.unwrap_err();
        assert!(
            matches!(err, HttpError::Tls(rustls::Error::InvalidCertificate(_))),
            "{err:?}"
        );
        assert!(!err.is_retryable());
    }
}
