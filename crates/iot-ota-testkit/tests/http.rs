//! The file server, seen by raw clients: exactly the bytes on the wire.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iot_ota_testkit::{random_bytes, write_random_file, FileServer, Route, TempDir, TestCa};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

/// A response as received: status, headers (lower-cased names), the raw
/// body bytes up to EOF.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn parse(raw: &[u8]) -> Response {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("complete head");
        let head = std::str::from_utf8(&raw[..end]).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        Response {
            status,
            headers,
            body: raw[end + 4..].to_vec(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> usize {
        self.header("content-length").unwrap().parse().unwrap()
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, request: String) -> Response {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("server closes after the response")
        .unwrap();
    Response::parse(&raw)
}

fn request(method: &str, path: &str, extra: &[(&str, &str)]) -> String {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    for (k, v) in extra {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r + "\r\n"
}

async fn get(server: &FileServer, path: &str, extra: &[(&str, &str)]) -> Response {
    let tcp = TcpStream::connect(("127.0.0.1", server.port()))
        .await
        .unwrap();
    exchange(tcp, request("GET", path, extra)).await
}

#[tokio::test]
async fn full_get_head_and_404() {
    let server = FileServer::start();
    let body = random_bytes(100_000, 1);
    let url = server.add("/fw.bin", Route::file(body.clone()));
    assert_eq!(url, format!("http://127.0.0.1:{}/fw.bin", server.port()));
    assert_eq!(server.url("fw.bin"), url);

    let r = get(&server, "/fw.bin?token=1", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_length(), body.len());
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.header("connection"), Some("close"));
    let etag = r.header("etag").unwrap().to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"'));
    assert_eq!(r.body, body);

    let tcp = TcpStream::connect(("127.0.0.1", server.port()))
        .await
        .unwrap();
    let head = exchange(tcp, request("HEAD", "/fw.bin", &[])).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.content_length(), body.len());
    assert!(head.body.is_empty());

    let missing = get(&server, "/nope", &[]).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body, b"404 Not Found\n");

    let log = server.requests();
    assert_eq!(log.len(), 3);
    assert_eq!(
        (log[0].method.as_str(), log[0].path.as_str()),
        ("GET", "/fw.bin")
    );
    assert_eq!(log[1].method, "HEAD");
    assert_eq!(log[0].header("host"), Some("localhost"));
    server.clear_requests();
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn range_requests() {
    let server = FileServer::start();
    let body = random_bytes(10_000, 2);
    server.add("/fw.bin", Route::file(body.clone()));

    let open = get(&server, "/fw.bin", &[("Range", "bytes=4000-")]).await;
    assert_eq!(open.status, 206);
    assert_eq!(open.header("content-range"), Some("bytes 4000-9999/10000"));
    assert_eq!(open.content_length(), 6000);
    assert_eq!(open.body, body[4000..]);

    let closed = get(&server, "/fw.bin", &[("Range", "bytes=10-19")]).await;
    assert_eq!(closed.status, 206);
    assert_eq!(closed.header("content-range"), Some("bytes 10-19/10000"));
    assert_eq!(closed.body, body[10..20]);

    let unsatisfiable = get(&server, "/fw.bin", &[("Range", "bytes=10000-")]).await;
    assert_eq!(unsatisfiable.status, 416);
    assert_eq!(unsatisfiable.header("content-range"), Some("bytes */10000"));
    assert!(unsatisfiable.body.is_empty());

    // A resource that changed since the first part: If-Range forces 200.
    let etag = open.header("etag").unwrap();
    let same = get(
        &server,
        "/fw.bin",
        &[("Range", "bytes=5-"), ("If-Range", etag)],
    )
    .await;
    assert_eq!(same.status, 206);
    let stale = get(
        &server,
        "/fw.bin",
        &[("Range", "bytes=5-"), ("If-Range", "\"old\"")],
    )
    .await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.body, body);

    let ranges: Vec<_> = server.requests().into_iter().map(|r| r.range).collect();
    assert_eq!(ranges[0].as_deref(), Some("bytes=4000-"));
    assert!(server
        .wait_for_request_async(|r| r.range.as_deref() == Some("bytes=10-19"), WAIT)
        .await
        .is_some());
}

#[tokio::test]
async fn path_route_streams_from_disk() {
    let dir = TempDir::new("http-path");
    let path = dir.join("big.bin");
    let len = 3 * 256 * 1024 + 17; // several disk chunks and a partial one
    write_random_file(&path, len as u64, 3).unwrap();
    let body = random_bytes(len, 3);
    let server = FileServer::start();
    server.add("/big.bin", Route::path(&path));

    let full = get(&server, "/big.bin", &[]).await;
    assert_eq!(full.status, 200);
    assert!(full.header("etag").is_some());
    assert_eq!(full.body, body);
    let part = get(&server, "/big.bin", &[("Range", "bytes=300000-")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body, body[300_000..]);
}

#[tokio::test]
async fn faults_as_seen_on_the_wire() {
    let server = FileServer::start();
    let body = random_bytes(5000, 4);

    server.add("/truncated", Route::truncated(body.clone(), 1234));
    let r = get(&server, "/truncated", &[]).await;
    assert_eq!((r.status, r.content_length()), (200, 5000));
    assert_eq!(r.body, body[..1234]);

    server.add(
        "/oversized",
        Route::oversized(body.clone(), b"EXTRA".to_vec()),
    );
    let r = get(&server, "/oversized", &[]).await;
    assert_eq!(r.content_length(), 5000);
    assert_eq!(r.body.len(), 5005);
    assert_eq!(&r.body[5000..], b"EXTRA");

    server.add("/short", Route::wrong_length(body.clone(), 9999));
    let r = get(&server, "/short", &[]).await;
    assert_eq!((r.content_length(), r.body.len()), (9999, 5000));
    server.add("/long", Route::wrong_length(body.clone(), 10));
    assert_eq!(get(&server, "/long", &[]).await.body.len(), 5000);

    server.add("/error", Route::Status(500));
    let r = get(&server, "/error", &[]).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.body, b"500 Internal Server Error\n");

    server.add("/moved", Route::Redirect("/fw.bin".into()));
    let r = get(&server, "/moved", &[]).await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("/fw.bin"));

    server.add("/norange", Route::no_range(body.clone()));
    let r = get(&server, "/norange", &[("Range", "bytes=100-")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("accept-ranges"), None);
    assert_eq!(r.body, body);
}

#[tokio::test]
async fn chunked_in_uneven_chunks() {
    let server = FileServer::start();
    let body = random_bytes(80_000, 5);
    server.add("/chunked", Route::chunked(body.clone()));
    let r = get(&server, "/chunked", &[]).await;
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.header("content-length"), None);

    let (decoded, sizes) = dechunk(&r.body);
    assert_eq!(decoded, body);
    assert!(sizes.contains(&1) && sizes.contains(&65536), "{sizes:?}");
}

/// Decodes a chunked body; returns it and the chunk sizes seen.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, Vec<usize>) {
    let (mut out, mut sizes) = (Vec::new(), Vec::new());
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap(), 16).unwrap();
        raw = &raw[eol + 2..];
        if size == 0 {
            assert_eq!(raw, b"\r\n");
            return (out, sizes);
        }
        sizes.push(size);
        out.extend_from_slice(&raw[..size]);
        assert_eq!(&raw[size..size + 2], b"\r\n");
        raw = &raw[size + 2..];
    }
}

#[tokio::test]
async fn stall_holds_the_connection_until_the_server_drops() {
    let server = FileServer::start();
    server.add("/stall", Route::stall(random_bytes(10_000, 6), 700));
    let mut tcp = TcpStream::connect(("127.0.0.1", server.port()))
        .await
        .unwrap();
    tcp.write_all(request("GET", "/stall", &[]).as_bytes())
        .await
        .unwrap();

    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let stalled = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            let n = tcp.read(&mut buf).await.unwrap();
            assert_ne!(n, 0, "stalled connection closed");
            raw.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(stalled.is_err());
    let r = Response::parse(&raw);
    assert_eq!((r.content_length(), r.body.len()), (10_000, 700));

    // Dropping the server (on a blocking thread: it joins its own) closes it.
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .unwrap();
    let end = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(end, Ok(0) | Err(_)));
}

#[tokio::test]
async fn slow_is_paced_and_ranged() {
    let server = FileServer::start();
    let body = random_bytes(3000, 7);
    server.add("/slow", Route::slow(body.clone(), 10_000));
    let started = Instant::now();
    let r = get(&server, "/slow", &[("Range", "bytes=1000-")]).await;
    let took = started.elapsed();
    assert_eq!(r.status, 206);
    assert_eq!(r.body, body[1000..]);
    // 2000 bytes at 10 kB/s: about 200 ms.
    assert!(took >= Duration::from_millis(150), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test]
async fn routes_change_while_running() {
    let server = FileServer::start();
    let body = random_bytes(2000, 8);
    server.add("/fw.bin", Route::truncated(body.clone(), 500));
    assert_eq!(get(&server, "/fw.bin", &[]).await.body.len(), 500);
    server.set("/fw.bin", Route::file(body.clone()));
    let r = get(&server, "/fw.bin", &[("Range", "bytes=500-")]).await;
    assert_eq!(r.body, body[500..]);
    assert!(server.remove("/fw.bin"));
    assert_eq!(get(&server, "/fw.bin", &[]).await.status, 404);
    assert!(!server.remove("/fw.bin"));
}

#[test]
fn works_from_sync_code() {
    let server = FileServer::start();
    server.add("/a", Route::file(b"hello".to_vec()));
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", server.port())).unwrap();
    tcp.write_all(request("GET", "/a", &[]).as_bytes()).unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).unwrap();
    assert_eq!(Response::parse(&raw).body, b"hello");
    let seen = server.wait_for_request(|r| r.path == "/a", WAIT).unwrap();
    assert_eq!(seen.range, None);
    assert!(server
        .wait_for_request(|r| r.path == "/b", Duration::from_millis(20))
        .is_none());
}

#[tokio::test]
async fn bad_request_gets_400() {
    let server = FileServer::start();
    let tcp = TcpStream::connect(("127.0.0.1", server.port()))
        .await
        .unwrap();
    let r = exchange(tcp, "NONSENSE\r\n\r\n".to_string()).await;
    assert_eq!(r.status, 400);
}

async fn tls_get(
    server: &FileServer,
    config: Arc<rustls::ClientConfig>,
    path: &str,
) -> std::io::Result<Response> {
    let connector = tokio_rustls::TlsConnector::from(config);
    let tcp = TcpStream::connect(("127.0.0.1", server.port())).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(request("GET", path, &[]).as_bytes()).await?;
    let mut raw = Vec::new();
    tls.read_to_end(&mut raw).await?;
    Ok(Response::parse(&raw))
}

#[tokio::test]
async fn https_get_trusting_the_test_ca() {
    let ca = TestCa::new();
    let server = FileServer::start_tls(&ca);
    let body = random_bytes(300_000, 9);
    let url = server.add("/fw.bin", Route::file(body.clone()));
    assert_eq!(url, format!("https://localhost:{}/fw.bin", server.port()));
    let r = tls_get(&server, ca.client_config(), "/fw.bin")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, body);

    // Another CA's client does not trust this server.
    let stranger = TestCa::new();
    assert!(tls_get(&server, stranger.client_config(), "/fw.bin")
        .await
        .is_err());
}

#[tokio::test]
async fn https_with_client_certificates() {
    let ca = TestCa::new();
    let server = FileServer::start_with_tls_config(ca.server_config_mtls());
    server.add("/fw.bin", Route::file(b"secret image".to_vec()));
    let client = ca.client_cert("dev1");
    assert!(client.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let r = tls_get(&server, ca.client_config_with_cert(&client), "/fw.bin")
        .await
        .unwrap();
    assert_eq!(r.body, b"secret image");
    assert!(tls_get(&server, ca.client_config(), "/fw.bin")
        .await
        .is_err());
}
