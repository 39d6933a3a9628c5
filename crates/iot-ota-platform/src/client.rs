//! A client for the platform's HTTP JSON API, over `http://` or `https://`
//! (hyper's HTTP/1.1 client, rustls with ring; one request per connection):
//! what the `iot-ota` subcommands, the demo and the tests use.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::api::{
    ApiError, BatchView, CreateBatch, CreatedBatch, DeviceView, FirmwareInfo, RegisterDevices,
    RegisteredDevices,
};

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
    /// TLS for an `https://` API.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl ApiClient {
    /// A client for `http://HOST:PORT` or `https://HOST:PORT` (a trailing
    /// path is ignored). HTTPS trusts the system's roots; see
    /// [`ApiClient::with_ca_file`] for a private CA.
    pub fn new(base_url: &str) -> Result<ApiClient, ClientError> {
        let (https, rest) = if let Some(r) = base_url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = base_url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(transport(format!(
                "the API URL must start with http:// or https://, got {base_url:?}"
            )));
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let default_port = if https { 443 } else { 80 };
        let bad_port = || transport(format!("bad port in {base_url:?}"));
        let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
            // [IPv6] or [IPv6]:port
            let (host, after) = rest.split_once(']').ok_or_else(bad_port)?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad_port())?,
                None if after.is_empty() => default_port,
                None => return Err(bad_port()),
            };
            (host.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| bad_port())?),
                None => (authority.to_owned(), default_port),
            }
        };
        if host.is_empty() {
            return Err(transport(format!("no host in {base_url:?}")));
        }
        let tls = if https {
            Some(Arc::new(crate::tls_config(None).map_err(transport)?))
        } else {
            None
        };
        Ok(ApiClient {
            host,
            port,
            timeout: Duration::from_secs(120),
            token: None,
            tls,
        })
    }

    /// Trusts the CA certificates (PEM) in `path` for an `https://` API
    /// (a platform with its own certificate), besides the system's roots.
    pub fn with_ca_file(mut self, path: &Path) -> Result<ApiClient, ClientError> {
        if self.tls.is_some() {
            let config = crate::tls_config(Some(&path.to_path_buf())).map_err(transport)?;
            self.tls = Some(Arc::new(config));
        }
        Ok(self)
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
            let stream = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| {
                    transport(format!("connecting to {}:{}: {e}", self.host, self.port))
                })?;
            let host = if self.host.contains(':') {
                format!("[{}]:{}", self.host, self.port)
            } else {
                format!("{}:{}", self.host, self.port)
            };
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(path_and_query)
                .header("Host", host)
                .header("Accept", "application/json");
            if let Some(ct) = content_type {
                req = req.header("Content-Type", ct);
            }
            for (n, v) in extra_headers {
                req = req.header(*n, *v);
            }
            if let Some(t) = &self.token {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
            let req = req
                .body(Full::new(Bytes::copy_from_slice(body)))
                .map_err(transport)?;
            match &self.tls {
                None => send(stream, req).await,
                Some(config) => {
                    let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                        .map_err(|e| transport(format!("{}: {e}", self.host)))?;
                    let tls = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name, stream)
                        .await
                        .map_err(|e| transport(format!("TLS with {}: {e}", self.host)))?;
                    send(tls, req).await
                }
            }
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

    /// `GET /api/stats`.
    pub async fn stats(&self) -> Result<crate::api::StatsView, ClientError> {
        self.json("GET", "/api/stats", None, b"").await
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
        no_content(self.request("DELETE", &path, None, b"", &[]).await?)
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

    /// `POST /api/devices`: registers `devices` of `product` (or gives
    /// them new secrets); the answer holds each secret, once.
    pub async fn register_devices(
        &self,
        product: &str,
        devices: &[String],
    ) -> Result<RegisteredDevices, ClientError> {
        let req = RegisterDevices {
            product: product.to_owned(),
            devices: devices.to_vec(),
        };
        self.json(
            "POST",
            "/api/devices",
            Some("application/json"),
            &Self::send_json(&req)?,
        )
        .await
    }

    /// `DELETE /api/devices/{product}/{device}`: revokes its credential
    /// (the embedded broker closes its connection).
    pub async fn revoke_device(&self, product: &str, device: &str) -> Result<(), ClientError> {
        let path = format!("/api/devices/{}/{}", encode(product), encode(device));
        no_content(self.request("DELETE", &path, None, b"", &[]).await?)
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

    /// `POST /api/batches/{id}/pause`.
    pub async fn pause_batch(&self, id: i64) -> Result<BatchView, ClientError> {
        self.json("POST", &format!("/api/batches/{id}/pause"), None, b"")
            .await
    }

    /// `POST /api/batches/{id}/resume`.
    pub async fn resume_batch(&self, id: i64) -> Result<BatchView, ClientError> {
        self.json("POST", &format!("/api/batches/{id}/resume"), None, b"")
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

/// One request over `io`, the whole answer read.
/// A 204 as `Ok`; any other answer as the API's error.
fn no_content(r: RawResponse) -> Result<(), ClientError> {
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

async fn send<IO>(io: IO, req: hyper::Request<Full<Bytes>>) -> Result<RawResponse, ClientError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(transport)?;
    let driver = tokio::spawn(conn);
    let res = sender.send_request(req).await.map_err(transport)?;
    let status = res.status().as_u16();
    let headers = res
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| transport(format!("reading the answer: {e}")))?
        .to_bytes()
        .to_vec();
    driver.abort();
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_base_urls() {
        assert_eq!(encode("a b/ç"), "a%20b%2F%C3%A7");
        assert!(ApiClient::new("ftp://x").is_err());
        let c = ApiClient::new("http://127.0.0.1:8080/api").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.tls.is_some()),
            ("127.0.0.1", 8080, false)
        );
        let c = ApiClient::new("https://[::1]").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.tls.is_some()),
            ("::1", 443, true)
        );
    }
}
