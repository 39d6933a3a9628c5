//! The connection side of the file server: accept, read one request head,
//! answer it according to its [`Route`], close.

use std::io::{self, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::request::{head_end, parse_head, resolve_range, RangeSpec, RequestHead};
use super::{Entry, RequestLog, Route, Shared};

/// Disk reads for [`Route::Path`]: large enough that loopback throughput is
/// bound by the socket, not by per-read overhead.
const DISK_CHUNK: usize = 256 * 1024;
/// Longest request head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// A client that connects and says nothing is dropped after this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The chunk sizes of [`Route::Chunked`], cycled: uneven on purpose, so
/// that a client's chunk parser meets 1-byte chunks and chunk boundaries
/// that straddle its own reads.
const CHUNK_SIZES: [usize; 8] = [1, 13, 256, 7, 4096, 100, 65536, 3];

pub(super) async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            // E.g. out of file descriptors: back off instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Small writes (chunk headers, paced bytes) must leave at once.
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(tcp, &shared).await,
                Some(acceptor) => {
                    if let Ok(Ok(stream)) =
                        tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(tcp)).await
                    {
                        serve_connection(stream, &shared).await;
                    }
                }
            }
        });
    }
}

/// How a response ends.
enum Ending {
    /// Close the connection (after a TLS close_notify).
    Close,
    /// Keep the connection open and silent until the runtime shuts down.
    Stall,
}

async fn serve_connection<S>(mut stream: S, shared: &Shared)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => head,
        Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
            let _ = send_status(&mut stream, 400, false).await;
            let _ = stream.shutdown().await;
            return;
        }
        _ => return,
    };
    shared.log.update(|log| {
        log.push(RequestLog {
            method: head.method.clone(),
            path: head.path.clone(),
            range: head.header("Range").map(str::to_string),
            headers: head.headers.clone(),
        })
    });
    let ending = match shared.route(&head.path) {
        Some(entry) => respond(&mut stream, &head, entry).await,
        None => send_status(&mut stream, 404, head.method == "HEAD")
            .await
            .map(|()| Ending::Close),
    };
    match ending {
        Ok(Ending::Close) => {
            let _ = stream.shutdown().await;
        }
        Ok(Ending::Stall) => std::future::pending::<()>().await,
        // The client went away, or the file could not be read: nothing
        // useful can be said on a half-sent response.
        Err(_) => {}
    }
}

async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<RequestHead> {
    let mut buf = Vec::with_capacity(1024);
    let mut piece = [0u8; 2048];
    loop {
        if let Some(end) = head_end(&buf) {
            return parse_head(&buf[..end])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
        }
        let n = stream.read(&mut piece).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&piece[..n]);
    }
}

async fn respond<S>(stream: &mut S, head: &RequestHead, entry: Entry) -> io::Result<Ending>
where
    S: AsyncWrite + Unpin,
{
    let head_only = head.method == "HEAD";
    let etag = entry.etag.as_deref();
    match &entry.route {
        Route::File(body) => {
            let source = Source::Memory { body, pace: None };
            send_ranged(stream, head, body.len() as u64, etag, source).await?
        }
        Route::Delayed { body, delay } => {
            tokio::time::sleep(*delay).await;
            let source = Source::Memory { body, pace: None };
            send_ranged(stream, head, body.len() as u64, etag, source).await?
        }
        Route::Slow {
            body,
            bytes_per_sec,
        } => {
            let source = Source::Memory {
                body,
                pace: Some(*bytes_per_sec),
            };
            send_ranged(stream, head, body.len() as u64, etag, source).await?
        }
        Route::Path(path) => {
            let meta = tokio::fs::metadata(path).await?;
            let etag = disk_etag(&meta);
            let source = Source::Disk(path);
            send_ranged(stream, head, meta.len(), Some(&etag), source).await?
        }
        Route::NoRange(body) => {
            send_body(stream, 200, body.len() as u64, &[], body, head_only).await?;
        }
        Route::Truncated { body, send } => {
            let sent = &body[..(*send).min(body.len())];
            send_body(stream, 200, body.len() as u64, &[], sent, head_only).await?;
        }
        Route::Oversized { body, extra } => {
            send_body(stream, 200, body.len() as u64, &[], body, head_only).await?;
            if !head_only {
                stream.write_all(extra).await?;
            }
        }
        Route::WrongLength { body, declared } => {
            send_body(stream, 200, *declared, &[], body, head_only).await?;
        }
        Route::Stall { body, after } => {
            let sent = &body[..(*after).min(body.len())];
            send_body(stream, 200, body.len() as u64, &[], sent, head_only).await?;
            stream.flush().await?;
            return Ok(if head_only {
                Ending::Close
            } else {
                Ending::Stall
            });
        }
        Route::Status(code) => send_status(stream, *code, head_only).await?,
        Route::Redirect(location) => {
            let headers = [("Location", location.clone())];
            send_body(stream, 302, 0, &headers, &[], head_only).await?;
        }
        Route::Chunked(body) => send_chunked(stream, body, head_only).await?,
    }
    stream.flush().await?;
    Ok(Ending::Close)
}

/// Where the bytes of a Range-capable route come from.
enum Source<'a> {
    Memory { body: &'a [u8], pace: Option<u64> },
    Disk(&'a Path),
}

/// 200 with the whole resource, 206 with the requested range, or 416.
async fn send_ranged<S>(
    stream: &mut S,
    head: &RequestHead,
    total: u64,
    etag: Option<&str>,
    source: Source<'_>,
) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    // If-Range with another validator means "the resource changed since
    // the first part: send all of it".
    let stale = matches!((head.header("If-Range"), etag), (Some(v), Some(e)) if v != e);
    let range = if stale { None } else { head.header("Range") };
    let mut headers = vec![("Accept-Ranges", "bytes".to_string())];
    if let Some(etag) = etag {
        headers.push(("ETag", etag.to_string()));
    }
    let (status, start, len) = match resolve_range(range, total) {
        RangeSpec::Full => (200, 0, total),
        RangeSpec::Partial { start, end } => {
            headers.push(("Content-Range", format!("bytes {start}-{end}/{total}")));
            (206, start, end - start + 1)
        }
        RangeSpec::Unsatisfiable => {
            headers.push(("Content-Range", format!("bytes */{total}")));
            stream
                .write_all(response_head(416, 0, &headers).as_bytes())
                .await?;
            return Ok(());
        }
    };
    stream
        .write_all(response_head(status, len, &headers).as_bytes())
        .await?;
    if head.method == "HEAD" {
        return Ok(());
    }
    let (start, end) = (start as usize, (start + len) as usize);
    match source {
        Source::Memory { body, pace: None } => stream.write_all(&body[start..end]).await,
        Source::Memory {
            body,
            pace: Some(rate),
        } => write_paced(stream, &body[start..end], rate).await,
        Source::Disk(path) => write_file(stream, path, start as u64, len).await,
    }
}

/// Streams `len` bytes of `path` from `start` through one reused buffer.
async fn write_file<S>(stream: &mut S, path: &Path, start: u64, len: u64) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(SeekFrom::Start(start)).await?;
    let mut buf = vec![0u8; DISK_CHUNK];
    let mut left = len;
    while left > 0 {
        let want = left.min(DISK_CHUNK as u64) as usize;
        let n = file.read(&mut buf[..want]).await?;
        if n == 0 {
            // The file shrank under us: end short, as a real server would.
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        stream.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

/// Writes `bytes` at `rate` bytes per second, in pieces of about 50 ms,
/// against a fixed schedule so that sleep overshoot does not accumulate.
async fn write_paced<S>(stream: &mut S, bytes: &[u8], rate: u64) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let rate = rate.max(1);
    let piece = (rate / 20).clamp(1, 64 * 1024) as usize;
    let begin = Instant::now();
    let mut sent = 0u64;
    stream.flush().await?;
    for chunk in bytes.chunks(piece) {
        stream.write_all(chunk).await?;
        stream.flush().await?;
        sent += chunk.len() as u64;
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        tokio::time::sleep_until(begin + due).await;
    }
    Ok(())
}

async fn send_chunked<S>(stream: &mut S, body: &[u8], head_only: bool) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    const HEAD: &str = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                        Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    stream.write_all(HEAD.as_bytes()).await?;
    if head_only {
        return Ok(());
    }
    let mut rest = body;
    for size in CHUNK_SIZES.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at((*size).min(rest.len()));
        stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await?;
        stream.write_all(chunk).await?;
        stream.write_all(b"\r\n").await?;
        rest = tail;
    }
    stream.write_all(b"0\r\n\r\n").await
}

/// A status with a short text body, e.g. `404 Not Found\n`.
async fn send_status<S>(stream: &mut S, status: u16, head_only: bool) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let body = format!("{status} {}\n", reason(status));
    let headers = [("Content-Type", "text/plain".to_string())];
    send_body(
        stream,
        status,
        body.len() as u64,
        &headers,
        body.as_bytes(),
        head_only,
    )
    .await
}

/// A head declaring `declared` bytes, then `body` (whatever its length).
async fn send_body<S>(
    stream: &mut S,
    status: u16,
    declared: u64,
    headers: &[(&str, String)],
    body: &[u8],
    head_only: bool,
) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    stream
        .write_all(response_head(status, declared, headers).as_bytes())
        .await?;
    if !head_only {
        stream.write_all(body).await?;
    }
    Ok(())
}

fn response_head(status: u16, content_length: u64, headers: &[(&str, String)]) -> String {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Length: {content_length}\r\nConnection: close\r\n",
        reason(status)
    );
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("Content-Type"))
    {
        head.push_str("Content-Type: application/octet-stream\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// The ETag of an in-memory Range-capable route, computed once when the
/// route is added.
///
/// "Cheap" on purpose: the length and a hash of at most 64 evenly spaced
/// 4 KiB windows, so adding a 100 MB image to a debug-built test costs
/// microseconds, while two different images practically never share one.
pub(super) fn memory_etag(route: &Route) -> Option<String> {
    let body = match route {
        Route::File(body) | Route::Slow { body, .. } | Route::Delayed { body, .. } => body,
        _ => return None,
    };
    const WINDOW: usize = 4096;
    const WINDOWS: usize = 64;
    let mut hash = Fnv::new();
    if body.len() <= WINDOW * WINDOWS {
        hash.write(body);
    } else {
        let stride = (body.len() - WINDOW) / (WINDOWS - 1);
        for i in 0..WINDOWS {
            let at = i * stride;
            hash.write(&body[at..at + WINDOW]);
        }
    }
    Some(format!("\"{:x}-{:016x}\"", body.len(), hash.0))
}

/// The ETag of a file on disk: its length and modification time.
fn disk_etag(meta: &std::fs::Metadata) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("\"{:x}-{mtime:x}\"", meta.len())
}

/// FNV-1a, 64-bit.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_depends_on_content_and_length() {
        let a = memory_etag(&Route::file(vec![1u8; 1 << 20])).unwrap();
        let b = memory_etag(&Route::file(vec![2u8; 1 << 20])).unwrap();
        let c = memory_etag(&Route::file(vec![1u8; (1 << 20) + 1])).unwrap();
        assert!(a.starts_with('"') && a.ends_with('"'));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(memory_etag(&Route::Status(404)), None);
    }

    #[test]
    fn head_declares_length_and_close() {
        let head = response_head(206, 10, &[("Content-Range", "bytes 0-9/20".into())]);
        assert!(head.starts_with("HTTP/1.1 206 Partial Content\r\n"));
        assert!(head.contains("Content-Length: 10\r\n"));
        assert!(head.contains("Connection: close\r\n"));
        assert!(head.ends_with("Content-Range: bytes 0-9/20\r\n\r\n"));
    }
}
