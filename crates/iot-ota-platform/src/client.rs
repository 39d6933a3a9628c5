//! A small client for the platform's HTTP JSON API (plain HTTP/1.1, one
//! request per connection): what the `iot-ota` subcommands, the demo and the
//! tests use. Kept tiny on purpose: the API is local and never needs TLS,
//! redirects or keep-alive.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::api::{ApiError, BatchView, CreateBatch, CreatedBatch, DeviceView, FirmwareInfo};

/// An API call's failure: the platform's status and message, or a transport error (status 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    /// HTTP status, or 0 when no answer came.
    pub status: u16,
    /// The platform's `error`, or what went wrong on the way.
    pub message: String,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.status == 0 {
            write!(f, "{}", self.message)
        } else {
            write!(f, "HTTP {}: {}", self.status, self.message)
        }
    }
}

impl std::error::Error for ClientError {}

fn transport(e: impl std::fmt::Display) -> ClientError {
    ClientError {
        status: 0,
        message: e.to_string(),
    }
}

/// A raw response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The API client.
#[derive(Debug, Clone)]
pub struct ApiClient {
    host: String,
    port: u16,
    timeout: Duration,
    token: Option<String>,
}

impl ApiClient {
    /// A client for `http://HOST:PORT` (a trailing path is ignored).
    pub fn new(base_url: &str) -> Result<ApiClient, ClientError> {
        let rest = base_url.strip_prefix("http://").ok_or_else(|| {
            transport(format!(
                "the API URL must start with http://, got {base_url:?}"
            ))
        })?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']').to_owned(),
                p.parse()
                    .map_err(|_| transport(format!("bad port in {base_url:?}")))?,
            ),
            _ => (authority.to_owned(), 80),
        };
        if host.is_empty() {
            return Err(transport(format!("no host in {base_url:?}")));
        }
        Ok(ApiClient {
            host,
            port,
            timeout: Duration::from_secs(120),
            token: None,
        })
    }

    /// Sends the platform's API token (`Authorization: Bearer ...`), which
    /// every request that changes something needs.
    pub fn with_token(mut self, token: impl Into<String>) -> ApiClient {
        self.token = Some(token.into());
        self
    }

    /// Sends one request and reads the whole answer.
    pub async fn request(
        &self,
        method: &str,
        path_and_query: &str,
        content_type: Option<&str>,
        body: &[u8],
        extra_headers: &[(&str, &str)],
    ) -> Result<RawResponse, ClientError> {
        let fut = async {
            let mut stream = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| {
                    transport(format!("connecting to {}:{}: {e}", self.host, self.port))
                })?;
            let host = if self.host.contains(':') {
                format!("[{}]:{}", self.host, self.port)
            } else {
                format!("{}:{}", self.host, self.port)
            };
            let mut head = format!(
                "{method} {path_and_query} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nAccept: application/json\r\nContent-Length: {}\r\n",
                body.len()
            );
            if let Some(ct) = content_type {
                head.push_str(&format!("Content-Type: {ct}\r\n"));
            }
            for (n, v) in extra_headers {
                head.push_str(&format!("{n}: {v}\r\n"));
            }
            if let Some(t) = &self.token {
                head.push_str(&format!("Authorization: Bearer {t}\r\n"));
            }
            head.push_str("\r\n");
            stream.write_all(head.as_bytes()).await.map_err(transport)?;
            stream.write_all(body).await.map_err(transport)?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.map_err(transport)?;
            parse_response(&raw, method == "HEAD")
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| transport("the platform did not answer in time"))?
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<T, ClientError> {
        let r = self.request(method, path, content_type, body, &[]).await?;
        if !(200..300).contains(&r.status) {
            let message = serde_json::from_slice::<ApiError>(&r.body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&r.body).into_owned());
            return Err(ClientError {
                status: r.status,
                message,
            });
        }
        serde_json::from_slice(&r.body).map_err(|e| ClientError {
            status: r.status,
            message: format!("unexpected answer: {e}"),
        })
    }

    fn send_json<B: Serialize>(body: &B) -> Result<Vec<u8>, ClientError> {
        serde_json::to_vec(body).map_err(transport)
    }

    /// `GET /api/health`.
    pub async fn health(&self) -> Result<serde_json::Value, ClientError> {
        self.json("GET", "/api/health", None, b"").await
    }

    /// `POST /api/firmware`: registers `bytes` as `product` `version`.
    pub async fn add_firmware(
        &self,
        product: &str,
        version: &str,
        name: &str,
        bytes: &[u8],
    ) -> Result<FirmwareInfo, ClientError> {
        self.add_firmware_signed(product, version, name, bytes, None)
            .await
    }

    /// `POST /api/firmware` with the signed manifest's security `counter`
    /// (a platform with a signing key; `None`: 0).
    pub async fn add_firmware_signed(
        &self,
        product: &str,
        version: &str,
        name: &str,
        bytes: &[u8],
        counter: Option<u64>,
    ) -> Result<FirmwareInfo, ClientError> {
        let mut path = format!(
            "/api/firmware?product={}&version={}&name={}",
            encode(product),
            encode(version),
            encode(name)
        );
        if let Some(c) = counter {
            path.push_str(&format!("&counter={c}"));
        }
        self.json("POST", &path, Some("application/octet-stream"), bytes)
            .await
    }

    /// `GET /api/firmware`.
    pub async fn list_firmware(
        &self,
        product: Option<&str>,
    ) -> Result<Vec<FirmwareInfo>, ClientError> {
        let path = match product {
            Some(p) => format!("/api/firmware?product={}", encode(p)),
            None => "/api/firmware".into(),
        };
        self.json("GET", &path, None, b"").await
    }

    /// `DELETE /api/firmware/{product}/{version}`.
    pub async fn delete_firmware(&self, product: &str, version: &str) -> Result<(), ClientError> {
        let path = format!("/api/firmware/{}/{}", encode(product), encode(version));
        let r = self.request("DELETE", &path, None, b"", &[]).await?;
        if r.status == 204 {
            return Ok(());
        }
        Err(ClientError {
            status: r.status,
            message: serde_json::from_slice::<ApiError>(&r.body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&r.body).into_owned()),
        })
    }

    /// `GET /api/devices`.
    pub async fn list_devices(
        &self,
        product: Option<&str>,
    ) -> Result<Vec<DeviceView>, ClientError> {
        let path = match product {
            Some(p) => format!("/api/devices?product={}", encode(p)),
            None => "/api/devices".into(),
        };
        self.json("GET", &path, None, b"").await
    }

    /// `POST /api/batches`.
    pub async fn create_batch(&self, req: &CreateBatch) -> Result<CreatedBatch, ClientError> {
        self.json(
            "POST",
            "/api/batches",
            Some("application/json"),
            &Self::send_json(req)?,
        )
        .await
    }

    /// `GET /api/batches`.
    pub async fn list_batches(&self) -> Result<Vec<BatchView>, ClientError> {
        self.json("GET", "/api/batches", None, b"").await
    }

    /// `GET /api/batches/{id}`.
    pub async fn show_batch(&self, id: i64) -> Result<BatchView, ClientError> {
        self.json("GET", &format!("/api/batches/{id}"), None, b"")
            .await
    }

    /// `POST /api/batches/{id}/terminate`.
    pub async fn terminate_batch(&self, id: i64) -> Result<BatchView, ClientError> {
        self.json("POST", &format!("/api/batches/{id}/terminate"), None, b"")
            .await
    }
}

/// Percent-encodes a query or path component.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn parse_response(raw: &[u8], head_only: bool) -> Result<RawResponse, ClientError> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| transport("the platform closed the connection without a full answer"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(transport)?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| transport(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if head_only {
        Vec::new()
    } else if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| transport("truncated chunked body"))?;
        let size_str = std::str::from_utf8(&data[..line_end]).map_err(transport)?;
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| transport(format!("bad chunk size {size_str:?}")))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(transport("truncated chunk"));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_answers() {
        let r = parse_response(
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-1/4\r\n\r\nab",
            false,
        )
        .unwrap();
        assert_eq!(r.status, 206);
        assert_eq!(r.header("content-range"), Some("bytes 0-1/4"));
        assert_eq!(r.body, b"ab");
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(r.body, b"abcde");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n", false).is_err());
        assert_eq!(encode("a b/ç"), "a%20b%2F%C3%A7");
        assert!(ApiClient::new("ftp://x").is_err());
        let c = ApiClient::new("http://127.0.0.1:8080/api").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 8080));
    }
}
