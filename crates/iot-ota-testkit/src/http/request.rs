//! Pure parsing of a request head and of a `Range` header: no IO, so it is
//! unit-tested on byte strings.

/// A parsed request line and headers.
#[derive(Debug)]
pub(crate) struct RequestHead {
    pub(crate) method: String,
    /// The path without query string or fragment.
    pub(crate) path: String,
    pub(crate) headers: Vec<(String, String)>,
}

impl RequestHead {
    /// The first header named `name`, compared case-insensitively.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The end of the head (the index just past `\r\n\r\n`), if it is complete.
pub(crate) fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parses a complete head (up to and including the blank line).
pub(crate) fn parse_head(head: &[u8]) -> Result<RequestHead, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().ok_or("empty request")?;
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() => (m, t, v),
        _ => return Err("malformed request line"),
    };
    if !version.starts_with("HTTP/1.") {
        return Err("not HTTP/1.x");
    }
    let path = target.split(['?', '#']).next().unwrap_or_default();
    let mut headers = Vec::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or("malformed header")?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    Ok(RequestHead {
        method: method.to_string(),
        path: path.to_string(),
        headers,
    })
}

/// What to send of a resource of `total` bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RangeSpec {
    /// The whole resource, 200.
    Full,
    /// Bytes `start..=end`, 206.
    Partial { start: u64, end: u64 },
    /// 416, with `Content-Range: bytes */total`.
    Unsatisfiable,
}

/// Resolves a `Range` header against a resource of `total` bytes.
///
/// One range is supported: `bytes=N-`, `bytes=N-M` and `bytes=-SUFFIX`. As
/// RFC 9110 allows, anything else (several ranges, other units, garbage)
/// is ignored and the whole resource is sent.
pub(crate) fn resolve_range(header: Option<&str>, total: u64) -> RangeSpec {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeSpec::Full;
    };
    if spec.contains(',') {
        return RangeSpec::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeSpec::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let number = |s: &str| s.parse::<u64>().ok();
    match (first.is_empty(), last.is_empty()) {
        // bytes=-S: the last S bytes.
        (true, false) => match number(last) {
            Some(0) => RangeSpec::Unsatisfiable,
            Some(_) if total == 0 => RangeSpec::Unsatisfiable,
            Some(suffix) => RangeSpec::Partial {
                start: total - suffix.min(total),
                end: total - 1,
            },
            None => RangeSpec::Full,
        },
        // bytes=N-
        (false, true) => match number(first) {
            Some(start) if start >= total => RangeSpec::Unsatisfiable,
            Some(start) => RangeSpec::Partial {
                start,
                end: total - 1,
            },
            None => RangeSpec::Full,
        },
        // bytes=N-M
        (false, false) => match (number(first), number(last)) {
            (Some(start), Some(end)) if start <= end => {
                if start >= total {
                    RangeSpec::Unsatisfiable
                } else {
                    RangeSpec::Partial {
                        start,
                        end: end.min(total - 1),
                    }
                }
            }
            _ => RangeSpec::Full,
        },
        (true, true) => RangeSpec::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeSpec::*;

    #[test]
    fn parses_head() {
        let raw = b"GET /a/fw.bin?x=1 HTTP/1.1\r\nHost: h\r\nrange:  bytes=5-\r\n\r\n";
        assert_eq!(head_end(raw), Some(raw.len()));
        let head = parse_head(raw).unwrap();
        assert_eq!(head.method, "GET");
        assert_eq!(head.path, "/a/fw.bin");
        assert_eq!(head.header("Range"), Some("bytes=5-"));
        assert_eq!(head.header("host"), Some("h"));
        assert_eq!(head.header("accept"), None);
    }

    #[test]
    fn rejects_bad_heads() {
        assert!(parse_head(b"GET\r\n\r\n").is_err());
        assert!(parse_head(b"GET / SPDY/3\r\n\r\n").is_err());
        assert!(parse_head(b"GET / HTTP/1.1\r\nnocolon\r\n\r\n").is_err());
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn resolves_ranges() {
        let r = |h: &str| resolve_range(Some(h), 100);
        assert_eq!(resolve_range(None, 100), Full);
        assert_eq!(r("bytes=10-"), Partial { start: 10, end: 99 });
        assert_eq!(r("bytes=10-19"), Partial { start: 10, end: 19 });
        assert_eq!(r("bytes=90-500"), Partial { start: 90, end: 99 });
        assert_eq!(r("bytes=-30"), Partial { start: 70, end: 99 });
        assert_eq!(r("bytes=-500"), Partial { start: 0, end: 99 });
        assert_eq!(r("bytes=99-"), Partial { start: 99, end: 99 });
        assert_eq!(r("bytes=100-"), Unsatisfiable);
        assert_eq!(r("bytes=100-200"), Unsatisfiable);
        assert_eq!(r("bytes=-0"), Unsatisfiable);
        assert_eq!(r("bytes=20-10"), Full);
        assert_eq!(r("bytes=0-1,5-6"), Full);
        assert_eq!(r("items=0-1"), Full);
        assert_eq!(r("bytes=x-"), Full);
        assert_eq!(resolve_range(Some("bytes=0-"), 0), Unsatisfiable);
    }
}
