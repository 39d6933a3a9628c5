//! The HTTP side: the JSON API under `/api` and the firmware files under `/fw`.

use std::io::SeekFrom;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use iot_ota_core::digest::to_hex;
use iot_ota_md5::Md5;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use crate::api::{check_firmware, size_limit_text, ApiError, CreateBatch};
use crate::service::{PlatformError, Shared, Upload};

impl IntoResponse for PlatformError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(ApiError {
                error: self.message,
            }),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<Json<T>, PlatformError>;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/health", get(health))
        .route("/api/stats", get(stats))
        .route("/api/login", post(login))
        .route(
            "/api/firmware",
            // The upload streams its body and enforces the size limit itself.
            get(list_firmware)
                .post(add_firmware)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/api/firmware/:product/:version", delete(delete_firmware))
        .route("/api/devices", get(list_devices).post(register_devices))
        .route("/api/devices/:product/:device", delete(revoke_device))
        .route("/api/batches", get(list_batches).post(create_batch))
        .route("/api/batches/:id", get(show_batch))
        .route("/api/batches/:id/terminate", post(terminate_batch))
        .route("/api/batches/:id/pause", post(pause_batch))
        .route("/api/batches/:id/events", get(batch_events))
        .route("/", get(console_page))
        .route("/console.js", get(console_js))
        .route("/console.css", get(console_css))
        .route("/api/batches/:id/resume", post(resume_batch))
        .route("/fw/:product/:version/:name", get(serve_firmware))
        .fallback(no_route)
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(shared)
}

/// Every request that changes something (not GET or HEAD) under `/api`
/// carries the API token: `Authorization: Bearer TOKEN`. Reading, and the
/// firmware downloads devices make, stay open.
async fn require_token(
    State(s): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = request.method();
    let reading = method == axum::http::Method::GET || method == axum::http::Method::HEAD;
    if reading || !request.uri().path().starts_with("/api/") {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if !t.is_empty() && crate::token::same(t.as_bytes(), s.api_token.as_bytes()) => {
            next.run(request).await
        }
        _ => {
            let mut r = PlatformError::new(
                401,
                "this request needs the API token: Authorization: Bearer TOKEN \
                 (the platform printed it at its first start; it is in DATA_DIR/api-token)",
            )
            .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

/// Any path the API does not have: a JSON 404, as every other error.
async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> PlatformError {
    PlatformError::new(404, format!("no such endpoint: {method} {}", uri.path()))
}

/// Every error answer is the API's `{"error": ...}`: the framework's own
/// (a 405 for a wrong method, a 400 for a bad query, a 413 for a body over
/// the limit) come as plain text or empty, and are rewritten here with
/// their status kept.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.as_u16() < 400 || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let error = match text.trim() {
        "" => status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase(),
        t => t.to_owned(),
    };
    // The status and the other headers (a 405's Allow) stay as they were.
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let json = serde_json::to_vec(&ApiError { error }).unwrap_or_default();
    Response::from_parts(parts, Body::from(json))
}

async fn health(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "ok": true,
        "mqtt_connected": s.mqtt_up.load(Ordering::SeqCst),
        "public_url": s.public_url,
    }))
}

/// `POST /api/login`: 200 when the request carries the right token (the
/// token check in front of every POST answers 401 otherwise); the console
/// checks a token with it.
async fn login() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "ok": true }))
}

async fn stats(State(s): State<Arc<Shared>>) -> Json<crate::api::StatsView> {
    Json(s.stats())
}

#[derive(Deserialize)]
struct ProductQuery {
    product: Option<String>,
}

async fn list_firmware(
    State(s): State<Arc<Shared>>,
    Query(q): Query<ProductQuery>,
) -> ApiResult<Vec<crate::api::FirmwareInfo>> {
    Ok(Json(s.list_firmware(q.product.as_deref())?))
}

#[derive(Deserialize)]
struct AddFirmware {
    product: String,
    version: String,
    name: Option<String>,
    counter: Option<u64>,
}

async fn add_firmware(
    State(s): State<Arc<Shared>>,
    Query(q): Query<AddFirmware>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<crate::api::FirmwareInfo>), PlatformError> {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let too_big = || {
        PlatformError::new(
            413,
            format!(
                "the firmware file is above the limit of {}",
                size_limit_text(s.max_size)
            ),
        )
    };
    let name = q
        .name
        .unwrap_or_else(|| format!("firmware-{}.bin", q.version));
    // Check the names before touching the disk; the size is checked on the body.
    check_firmware(&q.product, &q.version, &name, 1, u64::MAX)
        .map_err(|m| PlatformError::new(400, m))?;
    // An announced length over the limit (or not a number) is answered at
    // once, before a byte of the body is read.
    if let Some(len) = headers.get(header::CONTENT_LENGTH) {
        let len: u64 = len
            .to_str()
            .ok()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| PlatformError::new(400, "Content-Length is not a number"))?;
        if len > s.max_size {
            return Err(too_big());
        }
    }
    let tmp_dir = s.data_dir.join("tmp");
    tokio::fs::create_dir_all(&tmp_dir)
        .await
        .map_err(|e| PlatformError::new(500, e.to_string()))?;
    // Unique per upload: two uploads in the same millisecond once shared a
    // name, and one moved the other's file away (HTTP 500).
    static UPLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = UPLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = tmp_dir.join(format!("upload-{}-{n}", std::process::id()));
    // Streamed to disk and hashed as it arrives: memory stays flat whatever
    // the size, and an oversize body is cut off at the limit.
    let streamed = async {
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| PlatformError::new(500, e.to_string()))?;
        let (mut md5, mut sha256, mut size) = (Md5::new(), Sha256::new(), 0u64);
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| PlatformError::new(400, format!("reading the upload: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            size += data.len() as u64;
            if size > s.max_size {
                return Err(too_big());
            }
            md5.update(&data);
            sha256.update(&data);
            file.write_all(&data)
                .await
                .map_err(|e| PlatformError::new(500, format!("storing the upload: {e}")))?;
        }
        file.sync_all()
            .await
            .map_err(|e| PlatformError::new(500, format!("storing the upload: {e}")))?;
        Ok((size, to_hex(&md5.finalize()), to_hex(&sha256.finalize())))
    };
    // Removes the temporary file unless it was handed over, also when the
    // client goes away mid-upload (the handler's future is then dropped).
    struct TmpGuard(Option<std::path::PathBuf>);
    impl Drop for TmpGuard {
        fn drop(&mut self) {
            if let Some(p) = self.0.take() {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let mut guard = TmpGuard(Some(tmp.clone()));
    let (size, md5, sha256) = streamed.await?;
    guard.0 = None;
    let shared = s.clone();
    let info = tokio::task::spawn_blocking(move || {
        let r = shared.add_firmware(
            Upload {
                product: q.product,
                version: q.version,
                name,
                tmp: tmp.clone(),
                size,
                md5,
                sha256,
                counter: q.counter,
            },
            crate::service::now_ms(),
        );
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    })
    .await
    .map_err(|e| PlatformError::new(500, e.to_string()))??;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn delete_firmware(
    State(s): State<Arc<Shared>>,
    Path((product, version)): Path<(String, String)>,
) -> Result<StatusCode, PlatformError> {
    s.delete_firmware(&product, &version)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_devices(
    State(s): State<Arc<Shared>>,
    Query(q): Query<ProductQuery>,
) -> ApiResult<Vec<crate::api::DeviceView>> {
    Ok(Json(s.list_devices(q.product.as_deref())?))
}

async fn register_devices(
    State(s): State<Arc<Shared>>,
    body: Bytes,
) -> Result<(StatusCode, Json<crate::api::RegisteredDevices>), PlatformError> {
    let req: crate::api::RegisterDevices = serde_json::from_slice(&body).map_err(|e| {
        PlatformError::new(
            400,
            format!("bad device registration (want {{\"product\":..,\"devices\":[..]}}): {e}"),
        )
    })?;
    Ok((StatusCode::CREATED, Json(s.register_devices(&req)?)))
}

async fn revoke_device(
    State(s): State<Arc<Shared>>,
    Path((product, device)): Path<(String, String)>,
) -> Result<StatusCode, PlatformError> {
    s.revoke_device(&product, &device)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn create_batch(
    State(s): State<Arc<Shared>>,
    body: Bytes,
) -> Result<(StatusCode, Json<crate::api::CreatedBatch>), PlatformError> {
    let req: CreateBatch = serde_json::from_slice(&body)
        .map_err(|e| PlatformError::new(400, format!("bad batch request: {e}")))?;
    Ok((
        StatusCode::CREATED,
        Json(s.create_batch(&req, crate::service::now_ms())?),
    ))
}

async fn list_batches(State(s): State<Arc<Shared>>) -> ApiResult<Vec<crate::api::BatchView>> {
    Ok(Json(s.list_batches()?))
}

fn batch_id(id: &str) -> Result<i64, PlatformError> {
    id.parse()
        .map_err(|_| PlatformError::new(400, format!("batch id must be a number, got {id:?}")))
}

async fn show_batch(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> ApiResult<crate::api::BatchView> {
    Ok(Json(s.show_batch(batch_id(&id)?)?))
}

async fn terminate_batch(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> ApiResult<crate::api::BatchView> {
    Ok(Json(s.terminate_batch(
        batch_id(&id)?,
        crate::service::now_ms(),
    )?))
}

/// The web console: one page, its script and its style, in the binary.
const CONSOLE_HTML: &str = include_str!("../console/index.html");
const CONSOLE_JS: &str = include_str!("../console/console.js");
const CONSOLE_CSS: &str = include_str!("../console/console.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn console_page() -> Response {
    asset("text/html; charset=utf-8", CONSOLE_HTML)
}

async fn console_js() -> Response {
    asset("text/javascript; charset=utf-8", CONSOLE_JS)
}

async fn console_css() -> Response {
    asset("text/css; charset=utf-8", CONSOLE_CSS)
}

/// `GET /api/batches/{id}/events`: server-sent events, one `batch` event
/// (the batch with its records, as `GET /api/batches/{id}`) at once and
/// after every change, at most every 300 ms, until the batch has ended and
/// that was sent; a comment every 15 s keeps proxies from closing it.
async fn batch_events(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Response, PlatformError> {
    let id = batch_id(&id)?;
    let first = s.show_batch(id)?;
    let (mut tx, rx) = tokio::io::duplex(64 * 1024);
    let mut changes = s.changes.subscribe();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let mut view = first;
        loop {
            let frame = match serde_json::to_string(&view) {
                Ok(json) => format!("event: batch\ndata: {json}\n\n"),
                Err(_) => return,
            };
            if tx.write_all(frame.as_bytes()).await.is_err() {
                return; // the page went away
            }
            if view.state != "in_progress" {
                return;
            }
            loop {
                tokio::select! {
                    c = changes.changed() => {
                        if c.is_err() {
                            return;
                        }
                        break;
                    }
                    _ = tokio::time::sleep(std::time::Duration::from_secs(15)) => {
                        if tx.write_all(b": keep-alive\n\n").await.is_err() {
                            return;
                        }
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            view = match s.show_batch(id) {
                Ok(v) => v,
                Err(_) => return,
            };
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(ReaderStream::new(rx)),
    )
        .into_response())
}

async fn pause_batch(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> ApiResult<crate::api::BatchView> {
    Ok(Json(s.pause_batch(
        batch_id(&id)?,
        true,
        crate::service::now_ms(),
    )?))
}

async fn resume_batch(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> ApiResult<crate::api::BatchView> {
    Ok(Json(s.pause_batch(
        batch_id(&id)?,
        false,
        crate::service::now_ms(),
    )?))
}

/// A `Range` header's single byte range resolved against `total`:
/// `Ok(None)` for no usable range (serve it all), `Err(())` for unsatisfiable.
pub(crate) fn parse_range(value: &str, total: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Multipart ranges are not supported: serve the whole file (allowed by RFC 9110).
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        (total.saturating_sub(n), total.saturating_sub(1))
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end: u64 = if b.is_empty() {
            total.saturating_sub(1)
        } else {
            b.parse::<u64>()
                .map_err(|_| ())?
                .min(total.saturating_sub(1))
        };
        (start, end)
    };
    if total == 0 || start >= total || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

async fn serve_firmware(
    State(s): State<Arc<Shared>>,
    Path((product, version, name)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, PlatformError> {
    let row = s.firmware_file(&product, &version, &name)?;
    let total = row.size;
    let etag = format!("\"{}\"", &row.sha256[..row.sha256.len().min(32)]);
    let hv = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static(""));
    let header_str = |h: header::HeaderName| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if let Some(inm) = header_str(header::IF_NONE_MATCH) {
        if inm.split(',').any(|t| t.trim() == etag || t.trim() == "*") {
            let mut r = StatusCode::NOT_MODIFIED.into_response();
            r.headers_mut().insert(header::ETAG, hv(&etag));
            return Ok(r);
        }
    }
    let if_range_ok = header_str(header::IF_RANGE).is_none_or(|v| v.trim() == etag);
    let range = match header_str(header::RANGE) {
        Some(v) if if_range_ok => match parse_range(&v, total) {
            Ok(r) => r,
            Err(()) => {
                let mut r = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
                r.headers_mut()
                    .insert(header::CONTENT_RANGE, hv(&format!("bytes */{total}")));
                return Ok(r);
            }
        },
        _ => None,
    };
    let (start, len, status) = match range {
        Some((a, b)) => (a, b - a + 1, StatusCode::PARTIAL_CONTENT),
        None => (0, total, StatusCode::OK),
    };
    let mut file = tokio::fs::File::open(&row.path)
        .await
        .map_err(|e| PlatformError::new(500, format!("opening {}: {e}", row.path)))?;
    file.seek(SeekFrom::Start(start))
        .await
        .map_err(|e| PlatformError::new(500, e.to_string()))?;
    s.served_bytes.fetch_add(len, Ordering::Relaxed);
    s.served_requests.fetch_add(1, Ordering::Relaxed);
    let body = Body::from_stream(ReaderStream::with_capacity(file.take(len), 64 * 1024));
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, hv(&etag));
    h.insert(header::CONTENT_LENGTH, hv(&len.to_string()));
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            hv(&format!("bytes {start}-{}/{total}", start + len - 1)),
        );
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=50-1000", 100), Ok(Some((50, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Err(()));
        assert_eq!(parse_range("bytes=9-3", 100), Err(()));
        assert_eq!(parse_range("bytes=-0", 100), Err(()));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
    }
}
