//! The sans-IO half of the HTTP client: the request head, the response
//! head, and the framing rules (length, chunked, Content-Range, Location),
//! over byte slices. No socket here: everything is tested with bytes.

use iot_ota_core::protocol::UrlParts;

use super::HttpError;

/// Largest response head accepted.
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line (with its extensions) accepted.
pub(super) const MAX_CHUNK_LINE: usize = 8 * 1024;
/// Most trailer bytes accepted after the last chunk.
pub(super) const MAX_TRAILERS: usize = 64 * 1024;
/// Response headers parsed per head.
pub(super) const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// Exactly `expected` bytes.
    Length,
    /// Chunked transfer coding, at this step.
    Chunked(Chunk),
    /// Until the server closes the connection.
    Eof,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    /// Next: a chunk-size line.
    Size,
    /// Inside a chunk, with this many data bytes left.
    Data(u64),
    /// Next: the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk, with this many trailer bytes seen.
    Trailers(usize),
    /// The final empty line was read.
    Done,
}

impl Framing {
    /// The chunked framing after one framing line (a size line, the CRLF
    /// after a chunk's data, a trailer line). Only valid when the framing is
    /// waiting for a line (`Size`, `DataEnd`, `Trailers`).
    pub(super) fn after_line(self, line: &[u8]) -> Result<Framing, HttpError> {
        let next = match self {
            Framing::Chunked(Chunk::Size) => match parse_chunk_size(line)? {
                0 => Chunk::Trailers(0),
                size => Chunk::Data(size),
            },
            Framing::Chunked(Chunk::DataEnd) if line.is_empty() => Chunk::Size,
            Framing::Chunked(Chunk::DataEnd) => {
                return Err(HttpError::BadResponse(
                    "chunk data longer than its size".into(),
                ))
            }
            Framing::Chunked(Chunk::Trailers(_)) if line.is_empty() => Chunk::Done,
            Framing::Chunked(Chunk::Trailers(seen)) => {
                let seen = seen + line.len() + 2;
                if seen > MAX_TRAILERS {
                    return Err(HttpError::BadResponse(format!(
                        "trailers longer than {MAX_TRAILERS} bytes"
                    )));
                }
                Chunk::Trailers(seen)
            }
            other => unreachable!("no framing line to read in {other:?}"),
        };
        Ok(Framing::Chunked(next))
    }

    /// The chunked framing after `n` data bytes of a chunk with `left` bytes.
    pub(super) fn after_data(left: u64, n: u64) -> Framing {
        Framing::Chunked(if left == n {
            Chunk::DataEnd
        } else {
            Chunk::Data(left - n)
        })
    }
}

/// How a response's body is to be read: where it starts in the image, the
/// image's size when known, how many bytes this body must carry, and its
/// framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BodyPlan {
    pub(super) offset: u64,
    pub(super) total_size: Option<u64>,
    pub(super) expected: Option<u64>,
    pub(super) framing: Framing,
}

/// What a request asks for: the body from byte `start`, to byte `end`
/// (inclusive) or to the end of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Span {
    pub(super) start: u64,
    pub(super) end: Option<u64>,
}

impl From<u64> for Span {
    fn from(start: u64) -> Span {
        Span { start, end: None }
    }
}

/// The body rules of a 200 or 206 answer to a request for `span`.
pub(super) fn plan_body(head: &Head, span: impl Into<Span>) -> Result<BodyPlan, HttpError> {
    let span = span.into();
    let requested = span.start;
    if let Some(coding) = &head.content_encoding {
        return Err(HttpError::BadResponse(format!(
            "unsupported Content-Encoding {coding} (identity was asked for)"
        )));
    }
    let (offset, total_size, expected) = match head.code {
        200 if requested > 0 || span.end.is_some() => return Err(HttpError::RangeIgnored),
        // RFC 9112 6.3: with chunked, Content-Length is ignored.
        200 if head.chunked => (0, None, None),
        200 => (0, head.content_length, head.content_length),
        _ => {
            let mismatch = || HttpError::RangeMismatch {
                requested,
                content_range: head.content_range.clone(),
            };
            let (start, end, total) = head
                .content_range
                .as_deref()
                .and_then(parse_content_range)
                .filter(|&(start, _, _)| start == requested)
                .ok_or_else(mismatch)?;
            // A bounded request: the answer ends where asked (or at the
            // file's last byte, when asked past it).
            if let Some(want) = span.end {
                let last = total.map_or(want, |t| want.min(t.saturating_sub(1)));
                if end != last {
                    return Err(mismatch());
                }
            }
            let len = end - start + 1;
            match head.content_length {
                Some(cl) if !head.chunked && cl != len => {
                    return Err(HttpError::BadResponse(format!(
                        "Content-Length {cl} disagrees with Content-Range {}",
                        head.content_range.as_deref().unwrap_or_default()
                    )))
                }
                _ => (start, total, Some(len)),
            }
        }
    };
    let framing = if head.chunked {
        Framing::Chunked(Chunk::Size)
    } else if expected.is_some() {
        Framing::Length
    } else {
        Framing::Eof
    };
    Ok(BodyPlan {
        offset,
        total_size,
        expected,
        framing,
    })
}

pub(super) fn request_head(url: &UrlParts<'_>, span: impl Into<Span>, user_agent: &str) -> String {
    let span = span.into();
    use std::fmt::Write;
    // A CR or LF in the configured agent would inject headers.
    let agent: String = user_agent.chars().filter(|c| !c.is_control()).collect();
    let mut req = String::with_capacity(160 + url.path.len() + url.host.len() + agent.len());
    let _ = write!(
        req,
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: {agent}\r\n\
         Accept-Encoding: identity\r\nConnection: close\r\n",
        url.path,
        host_header(url)
    );
    match span {
        Span {
            start,
            end: Some(end),
        } => {
            let _ = write!(req, "Range: bytes={start}-{end}\r\n");
        }
        Span { start, end: None } if start > 0 => {
            let _ = write!(req, "Range: bytes={start}-\r\n");
        }
        _ => {}
    }
    req.push_str("\r\n");
    req
}

pub(super) fn host_header(url: &UrlParts<'_>) -> String {
    let host = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.to_owned()
    };
    let default_port = if url.https { 443 } else { 80 };
    if url.port == default_port {
        host
    } else {
        format!("{host}:{}", url.port)
    }
}

/// The target of a redirect: `location` resolved against `base` (RFC 3986
/// section 5.2, without dot-segment removal, which servers do).
pub(super) fn resolve_location(base: &str, location: &str) -> String {
    let location = location.trim();
    if has_scheme(location) {
        return location.to_owned();
    }
    // `base` passed parse_url: it has a scheme and an authority.
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    if let Some(rest) = location.strip_prefix("//") {
        return format!("{}{rest}", &base[..scheme_end]);
    }
    let after_scheme = &base[scheme_end..];
    let authority_len = after_scheme
        .find(['/', '?', '#'])
        .unwrap_or(after_scheme.len());
    let origin = &base[..scheme_end + authority_len];
    if location.starts_with('/') {
        return format!("{origin}{location}");
    }
    let path = after_scheme[authority_len..]
        .split(['?', '#'])
        .next()
        .unwrap_or_default();
    if location.starts_with('?') || location.is_empty() {
        let path = if path.is_empty() { "/" } else { path };
        return format!("{origin}{path}{location}");
    }
    let dir = path.rfind('/').map_or("/", |i| &path[..=i]);
    format!("{origin}{dir}{location}")
}

pub(super) fn has_scheme(s: &str) -> bool {
    match s.split_once(':') {
        Some((scheme, _)) => {
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        None => false,
    }
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`) → (START, END, TOTAL).
pub(super) fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let (unit, rest) = value.trim().split_once(' ')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let (range, total) = rest.trim().split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    let valid = end >= start && total.map_or(true, |t| end < t);
    valid.then_some((start, end, total))
}

/// The hex size of a chunk-size line, extensions ignored.
pub(super) fn parse_chunk_size(line: &[u8]) -> Result<u64, HttpError> {
    let bad = || {
        HttpError::BadResponse(format!(
            "bad chunk size line {:?}",
            String::from_utf8_lossy(line)
        ))
    };
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = digits.trim_ascii();
    if digits.is_empty() || digits.len() > 16 {
        return Err(bad());
    }
    digits.iter().try_fold(0u64, |size, &d| {
        let v = char::from(d).to_digit(16).ok_or_else(bad)?;
        Ok(size << 4 | u64::from(v))
    })
}

/// What the body handling needs from a response head.
#[derive(Debug)]
pub(super) struct Head {
    pub(super) code: u16,
    pub(super) reason: String,
    pub(super) location: Option<String>,
    pub(super) content_length: Option<u64>,
    pub(super) content_range: Option<String>,
    /// A content coding other than identity, if the server used one.
    pub(super) content_encoding: Option<String>,
    pub(super) chunked: bool,
}

/// Parses a complete head at the start of `bytes`, returning it and its
/// length; `None` while it is incomplete.
pub(super) fn parse_head(bytes: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(HttpError::BadResponse(format!(
                "malformed response head: {e}"
            )))
        }
    };
    let mut head = Head {
        code: response.code.unwrap_or_default(),
        reason: response.reason.unwrap_or_default().to_owned(),
        location: None,
        content_length: None,
        content_range: None,
        content_encoding: None,
        chunked: false,
    };
    for header in response.headers.iter() {
        let name = header.name;
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if !(is("content-length")
            || is("transfer-encoding")
            || is("content-encoding")
            || is("location")
            || is("content-range"))
        {
            continue;
        }
        let value = std::str::from_utf8(header.value)
            .map_err(|_| HttpError::BadResponse(format!("{name} header is not UTF-8")))?
            .trim();
        if is("content-length") {
            head.content_length = Some(merge_content_length(head.content_length, value)?);
        } else if is("transfer-encoding") {
            head.chunked |= transfer_is_chunked(value)?;
        } else if is("content-encoding") {
            if value
                .split(',')
                .any(|c| !c.trim().is_empty() && !c.trim().eq_ignore_ascii_case("identity"))
            {
                head.content_encoding = Some(value.to_owned());
            }
        } else if is("location") {
            head.location = Some(value.to_owned());
        } else {
            head.content_range = Some(value.to_owned());
        }
    }
    Ok(Some((head, len)))
}

/// Content-Length, possibly repeated or a list (RFC 9110 8.6): every value
/// must agree.
pub(super) fn merge_content_length(previous: Option<u64>, value: &str) -> Result<u64, HttpError> {
    let mut merged = previous;
    for part in value.split(',') {
        let part = part.trim();
        let n = part
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse::<u64>().ok())
            .flatten()
            .ok_or_else(|| HttpError::BadResponse(format!("bad Content-Length {value:?}")))?;
        if merged.is_some_and(|m| m != n) {
            return Err(HttpError::BadResponse(format!(
                "conflicting Content-Length values {value:?}"
            )));
        }
        merged = Some(n);
    }
    merged.ok_or_else(|| HttpError::BadResponse("empty Content-Length".into()))
}

/// Whether a Transfer-Encoding value ends in chunked; codings other than
/// chunked and identity cannot be decoded here.
pub(super) fn transfer_is_chunked(value: &str) -> Result<bool, HttpError> {
    let mut chunked = false;
    for coding in value.split(',').map(str::trim) {
        if coding.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if !(coding.is_empty() || coding.eq_ignore_ascii_case("identity")) {
            return Err(HttpError::BadResponse(format!(
                "unsupported Transfer-Encoding {value:?}"
            )));
        }
    }
    Ok(chunked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iot_ota_core::protocol::parse_url;

    #[test]
    fn locations_resolve_against_the_current_url() {
        let base = "https://h.example:8443/dir/fw.bin?x=1";
        for (location, expected) in [
            ("http://other/a", "http://other/a"),
            ("HTTPS://other/a", "HTTPS://other/a"),
            ("//cdn.example/b", "https://cdn.example/b"),
            ("/c", "https://h.example:8443/c"),
            ("d.bin", "https://h.example:8443/dir/d.bin"),
            ("?y=2", "https://h.example:8443/dir/fw.bin?y=2"),
        ] {
            assert_eq!(resolve_location(base, location), expected, "{location}");
        }
        assert_eq!(resolve_location("http://h", "e"), "http://h/e");
    }

    #[test]
    fn host_header_brackets_ipv6_and_omits_default_ports() {
        let header = |url: &str| host_header(&parse_url(url).unwrap());
        assert_eq!(header("https://h/x"), "h");
        assert_eq!(header("http://h:80/x"), "h");
        assert_eq!(header("http://h:8080/x"), "h:8080");
        assert_eq!(header("https://[::1]/x"), "[::1]");
        assert_eq!(header("https://[::1]:8443/x"), "[::1]:8443");
    }

    #[test]
    fn content_range_and_chunk_size_parsing() {
        assert_eq!(parse_content_range("bytes 5-9/10"), Some((5, 9, Some(10))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        for bad in [
            "bytes 9-5/10",
            "bytes 5-10/10",
            "items 0-1/2",
            "bytes */10",
            "",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
        assert_eq!(parse_chunk_size(b"1aF").unwrap(), 0x1af);
        assert_eq!(parse_chunk_size(b"10 ; ext=\"v\"").unwrap(), 16);
        for bad in [&b""[..], b"g", b"; ext", b"11111111111111111"] {
            assert!(parse_chunk_size(bad).is_err(), "{bad:?}");
        }
    }

    fn head(bytes: &str) -> Head {
        parse_head(bytes.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn heads_parse_complete_partial_and_malformed() {
        let raw = "HTTP/1.1 206 Partial\r\nContent-Length: 5\r\nContent-Range: bytes 5-9/10\r\nX: y\r\n\r\nbody";
        let (h, len) = parse_head(raw.as_bytes()).unwrap().unwrap();
        assert_eq!(len, raw.len() - 4);
        assert_eq!((h.code, h.reason.as_str()), (206, "Partial"));
        assert_eq!(h.content_length, Some(5));
        assert_eq!(h.content_range.as_deref(), Some("bytes 5-9/10"));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")
            .unwrap()
            .is_none());
        assert!(parse_head(b"SMTP ready\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\nTransfer-Encoding: identity, chunked\r\n\r\n").chunked);
        // Codings other than chunked cannot be decoded here.
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").is_err()
        );
        let coded = head("HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n");
        assert_eq!(coded.content_encoding.as_deref(), Some("gzip"));
        assert_eq!(
            head("HTTP/1.1 302 Found\r\nLocation:  /next \r\n\r\n")
                .location
                .as_deref(),
            Some("/next")
        );
    }

    #[test]
    fn content_length_values_must_agree() {
        assert_eq!(merge_content_length(None, "10").unwrap(), 10);
        assert_eq!(merge_content_length(Some(10), "10, 10").unwrap(), 10);
        for bad in ["", "-1", "1e3", "10, 11", " +5"] {
            assert!(merge_content_length(None, bad).is_err(), "{bad:?}");
        }
        assert!(merge_content_length(Some(9), "10").is_err());
    }

    #[test]
    fn body_plans_follow_the_length_range_and_chunked_rules() {
        let plan = |raw: &str, from| plan_body(&head(raw), from);
        let p = plan("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", 0).unwrap();
        assert_eq!(
            (p.offset, p.total_size, p.expected),
            (0, Some(10), Some(10))
        );
        assert_eq!(p.framing, Framing::Length);
        let p = plan("HTTP/1.1 200 OK\r\n\r\n", 0).unwrap();
        assert_eq!(p.framing, Framing::Eof);
        // Chunked: Content-Length is ignored.
        let p = plan(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            0,
        )
        .unwrap();
        assert_eq!(
            (p.expected, p.framing),
            (None, Framing::Chunked(Chunk::Size))
        );
        let p = plan("HTTP/1.1 206 P\r\nContent-Range: bytes 4-9/10\r\n\r\n", 4).unwrap();
        assert_eq!((p.offset, p.total_size, p.expected), (4, Some(10), Some(6)));
        assert!(matches!(
            plan("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", 4),
            Err(HttpError::RangeIgnored)
        ));
        assert!(matches!(
            plan("HTTP/1.1 206 P\r\nContent-Range: bytes 0-9/10\r\n\r\n", 4),
            Err(HttpError::RangeMismatch { requested: 4, .. })
        ));
        assert!(plan(
            "HTTP/1.1 206 P\r\nContent-Length: 3\r\nContent-Range: bytes 4-9/10\r\n\r\n",
            4
        )
        .is_err());
        assert!(plan("HTTP/1.1 200 OK\r\nContent-Encoding: br\r\n\r\n", 0).is_err());
    }

    #[test]
    fn chunked_framing_steps() {
        let size = Framing::Chunked(Chunk::Size);
        assert_eq!(
            size.after_line(b"1a").unwrap(),
            Framing::Chunked(Chunk::Data(26))
        );
        assert_eq!(
            size.after_line(b"0").unwrap(),
            Framing::Chunked(Chunk::Trailers(0))
        );
        assert_eq!(
            Framing::after_data(26, 20),
            Framing::Chunked(Chunk::Data(6))
        );
        assert_eq!(Framing::after_data(6, 6), Framing::Chunked(Chunk::DataEnd));
        let end = Framing::Chunked(Chunk::DataEnd);
        assert_eq!(end.after_line(b"").unwrap(), size);
        assert!(end.after_line(b"x").is_err());
        let trailers = Framing::Chunked(Chunk::Trailers(0));
        assert_eq!(
            trailers.after_line(b"X-Sum: 1").unwrap(),
            Framing::Chunked(Chunk::Trailers(10))
        );
        assert_eq!(
            trailers.after_line(b"").unwrap(),
            Framing::Chunked(Chunk::Done)
        );
        assert!(Framing::Chunked(Chunk::Trailers(MAX_TRAILERS))
            .after_line(b"x")
            .is_err());
    }

    #[test]
    fn request_heads_carry_range_and_no_injected_lines() {
        let url = parse_url("http://h:8080/fw.bin?v=2").unwrap();
        let req = request_head(&url, 0, "agent");
        assert!(req.starts_with("GET /fw.bin?v=2 HTTP/1.1\r\nHost: h:8080\r\n"));
        assert!(!req.contains("Range"));
        assert!(req.ends_with("\r\n\r\n"));
        let req = request_head(&url, 100, "evil\r\nX-Injected: 1");
        assert!(req.contains("Range: bytes=100-\r\n"));
        assert!(!req.contains("\r\nX-Injected"));
    }
}

/// Entry points for the fuzz targets (`fuzz/`): the parsers over outside
/// bytes, driven the way the connection drives them. Not an API.
#[doc(hidden)]
pub mod fuzz_entry {
    use super::*;

    /// A response head, and the body plan made from it.
    pub fn response_head(bytes: &[u8]) {
        if let Ok(Some((head, len))) = parse_head(bytes) {
            assert!(len <= bytes.len());
            let requested = bytes.first().map_or(0, |b| u64::from(*b) * 4096);
            let _ = plan_body(&head, requested);
        }
    }

    /// A chunked body, decoded as the connection decodes it: lines and
    /// data, until the final empty line, an error, or the end of the bytes.
    pub fn chunked(mut bytes: &[u8]) {
        let mut framing = Framing::Chunked(Chunk::Size);
        loop {
            match framing {
                Framing::Chunked(Chunk::Data(left)) => {
                    let n = (bytes.len() as u64).min(left);
                    if n == 0 {
                        return;
                    }
                    bytes = &bytes[n as usize..];
                    framing = Framing::after_data(left, n);
                }
                Framing::Chunked(Chunk::Done) => return,
                Framing::Chunked(_) => {
                    let Some(end) = bytes.windows(2).position(|w| w == b"\r\n") else {
                        return;
                    };
                    match framing.after_line(&bytes[..end]) {
                        Ok(next) => framing = next,
                        Err(_) => return,
                    }
                    bytes = &bytes[end + 2..];
                }
                _ => return,
            }
        }
    }

    /// A `Content-Range` value: a parsed range is always in order.
    pub fn content_range(bytes: &[u8]) {
        if let Ok(text) = std::str::from_utf8(bytes) {
            if let Some((first, last, total)) = parse_content_range(text) {
                assert!(first <= last);
                if let Some(t) = total {
                    assert!(last < t);
                }
            }
        }
    }
}
