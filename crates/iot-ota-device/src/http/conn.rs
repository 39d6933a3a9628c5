//! The IO half of the HTTP client: the socket (TCP or TLS), the bounded
//! reads, the buffered connection that framing lines come from. Body data
//! goes straight from the socket into the caller's buffer.

use std::future::Future;
use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use iot_ota_core::protocol::parse_url;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};

use super::records::{self, TlsStream};
use super::wire::{parse_head, request_head, Head, Span, MAX_HEAD};
use super::{HttpError, HttpOptions};
use crate::tls::{client_config, TlsOptions};

/// First size of the head buffer, which later holds chunked framing too.
const INITIAL_BUF: usize = 8 * 1024;

/// One connection: connect, send the request, read the response head.
pub(super) async fn exchange(
    url: &str,
    span: Span,
    opts: &HttpOptions,
    deadline: Instant,
) -> Result<(Conn, Head), HttpError> {
    let parts = parse_url(url).map_err(HttpError::BadUrl)?;
    let tcp = before(deadline, "connect", tcp_connect(parts.host, parts.port)).await?;
    // The request is one write; no reason to let Nagle hold any of it.
    let _ = tcp.set_nodelay(true);
    let request = request_head(&parts, span, &opts.user_agent);
    let stream = if parts.https {
        let config = tls_config(opts)?;
        let name = ServerName::try_from(parts.host.to_owned())
            .map_err(|e| HttpError::BadUrl(format!("{}: {e}", parts.host)))?;
        if records::hands_over(&config) {
            // rustls encrypts the request, and reads up to the answer's
            // first record, before it hands the keys over.
            let handshake = records::connect(tcp, config, name, request.as_bytes());
            Stream::Tls(Box::new(
                before(deadline, "TLS handshake or response head", handshake).await?,
            ))
        } else {
            // A provider whose suites keep their keys: rustls reads.
            let handshake = async {
                let mut tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(tls_error)?;
                tls.write_all(request.as_bytes()).await.map_err(tls_error)?;
                tls.flush().await.map_err(tls_error)?;
                Ok::<_, HttpError>(tls)
            };
            Stream::Rustls(Box::new(
                before(deadline, "TLS handshake", handshake).await?,
            ))
        }
    } else {
        let mut tcp = tcp;
        let sent = async {
            tcp.write_all(request.as_bytes())
                .await
                .map_err(HttpError::Io)
        };
        before(deadline, "request", sent).await?;
        Stream::Plain(tcp)
    };
    let mut conn = Conn::new(stream, opts.idle_timeout);
    let head = before(deadline, "response head", read_head(&mut conn)).await?;
    Ok((conn, head))
}

pub(super) async fn tcp_connect(host: &str, port: u16) -> Result<TcpStream, HttpError> {
    let fail = |source| HttpError::Connect {
        host: host.to_owned(),
        port,
        source,
    };
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await.map_err(fail)? {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(fail(last.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, "the host has no address")
    })))
}

/// The TLS configuration of a download: the options' own, or the system
/// roots'. Secret extraction is on: [`records`] opens the records itself.
pub(super) fn tls_config(opts: &HttpOptions) -> Result<Arc<ClientConfig>, HttpError> {
    // Loading the system roots parses every file in the system store: do it
    // once per process, and not at all for plain-HTTP devices.
    static DEFAULT: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    if let Some(config) = &opts.tls {
        return Ok(with_secret_extraction(config.clone()));
    }
    if let Some(config) = DEFAULT.get() {
        return Ok(config.clone());
    }
    let config = client_config(&TlsOptions::default()).map_err(HttpError::TlsConfig)?;
    Ok(DEFAULT
        .get_or_init(|| with_secret_extraction(config))
        .clone())
}

/// `config`, or (if it does not let rustls hand its keys over) a copy that does.
fn with_secret_extraction(config: Arc<ClientConfig>) -> Arc<ClientConfig> {
    if config.enable_secret_extraction {
        return config;
    }
    let mut own = (*config).clone();
    own.enable_secret_extraction = true;
    Arc::new(own)
}

/// Reads response heads until a final one (1xx heads are skipped).
pub(super) async fn read_head(conn: &mut Conn) -> Result<Head, HttpError> {
    loop {
        if conn.buffered() > 0 {
            if let Some((head, len)) = parse_head(conn.unread())? {
                conn.consume(len);
                if (100..200).contains(&head.code) && head.code != 101 {
                    continue;
                }
                return Ok(head);
            }
        }
        if conn.fill(MAX_HEAD, "response head").await? == 0 {
            return Err(HttpError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the response head was complete",
            )));
        }
    }
}

/// Runs `fut` with a deadline, naming the step that missed it.
pub(super) async fn before<T>(
    deadline: Instant,
    during: &'static str,
    fut: impl Future<Output = Result<T, HttpError>>,
) -> Result<T, HttpError> {
    timeout_at(deadline, fut)
        .await
        .unwrap_or(Err(HttpError::Timeout { during }))
}

/// The socket, plain or TLS. An enum rather than a generic keeps `Body` one
/// type, compiled once.
pub(super) enum Stream {
    Plain(TcpStream),
    /// Records opened here ([`records`]).
    Tls(Box<TlsStream>),
    /// Records opened by rustls (a provider that keeps its keys).
    Rustls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A TLS error from rustls's own stream: the `rustls::Error` inside, when
/// there is one.
fn tls_error(e: io::Error) -> HttpError {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => HttpError::Tls(tls.clone()),
        None => HttpError::Io(e),
    }
}

impl Stream {
    pub(super) async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf).await,
            Self::Tls(s) => s.read(buf).await,
            Self::Rustls(s) => s.read(buf).await,
        }
    }
}

/// A connection with the bytes read past what was consumed: the response
/// head first, then (for chunked bodies) framing lines. Body data is read
/// straight into the caller's buffer once these bytes are used up.
pub(super) struct Conn {
    pub(super) stream: Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    idle: Duration,
    /// The peer closed TLS without close_notify.
    pub(super) unclean_eof: bool,
}

impl Conn {
    pub(super) fn new(stream: Stream, idle: Duration) -> Self {
        Self {
            stream,
            buf: vec![0; INITIAL_BUF],
            start: 0,
            end: 0,
            idle,
            unclean_eof: false,
        }
    }

    pub(super) fn buffered(&self) -> usize {
        self.end - self.start
    }

    pub(super) fn unread(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.start += n;
    }

    /// Buffered bytes first, else one socket read straight into `out`.
    pub(super) async fn read(&mut self, out: &mut [u8]) -> Result<usize, HttpError> {
        if self.buffered() > 0 {
            let n = out.len().min(self.buffered());
            out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
            self.start += n;
            return Ok(n);
        }
        read_socket(&mut self.stream, self.idle, &mut self.unclean_eof, out).await
    }

    /// One socket read appended to the buffer, which may grow up to `max`
    /// unread bytes; more than that is an error about `what`. Ok(0) at EOF.
    pub(super) async fn fill(&mut self, max: usize, what: &str) -> Result<usize, HttpError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < max {
                let len = (self.buf.len() * 2).min(max);
                self.buf.resize(len, 0);
            } else {
                return Err(HttpError::BadResponse(format!(
                    "{what} longer than {} bytes",
                    self.buf.len()
                )));
            }
        }
        let dest = &mut self.buf[self.end..];
        let n = read_socket(&mut self.stream, self.idle, &mut self.unclean_eof, dest).await?;
        self.end += n;
        Ok(n)
    }

    /// The next line without its CRLF (a bare LF also ends it), or `None`
    /// at EOF.
    pub(super) async fn line(
        &mut self,
        max: usize,
        what: &str,
    ) -> Result<Option<&[u8]>, HttpError> {
        loop {
            if let Some(i) = self.unread().iter().position(|&b| b == b'\n') {
                let begin = self.start;
                let mut end = begin + i;
                self.start = end + 1;
                if end > begin && self.buf[end - 1] == b'\r' {
                    end -= 1;
                }
                return Ok(Some(&self.buf[begin..end]));
            }
            if self.fill(max, what).await? == 0 {
                return Ok(None);
            }
        }
    }
}

/// One socket read, bounded by the idle timeout.
pub(super) async fn read_socket(
    stream: &mut Stream,
    idle: Duration,
    unclean_eof: &mut bool,
    dest: &mut [u8],
) -> Result<usize, HttpError> {
    match timeout(idle, stream.read(dest)).await {
        Err(_) => Err(HttpError::Timeout { during: "read" }),
        Ok(Ok(n)) => Ok(n),
        // A TLS peer that closed without close_notify: an end, whose meaning
        // the body's framing decides.
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            *unclean_eof = true;
            Ok(0)
        }
        Ok(Err(e)) => Err(HttpError::from_io(e)),
    }
}
