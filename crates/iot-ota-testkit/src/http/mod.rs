//! An HTTP/1.1 and HTTPS firmware server with Range support and faults.

mod request;
mod respond;

use std::collections::HashMap;
use std::net::{Ipv4Addr, TcpListener as StdTcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;

use crate::signal::Watched;
use crate::TestCa;

/// What the server does for one path.
///
/// Bodies are shared (`Arc`), so a route is cheap to clone and a large
/// image is never copied per request. Only [`Route::File`], [`Route::Path`]
/// and [`Route::Slow`] honour `Range`; the faults always answer the whole
/// body from byte 0 (or what is left of it).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Route {
    /// Serves these bytes: 200, or 206/416 for a `Range` request.
    File(Arc<Vec<u8>>),
    /// Serves a file from disk in 256 KiB reads through one reused buffer:
    /// for benchmark images too large to hold in memory.
    Path(PathBuf),
    /// Declares the full `Content-Length`, sends the first `send` bytes,
    /// then closes the connection.
    Truncated {
        /// The whole body, whose length is declared.
        body: Arc<Vec<u8>>,
        /// How many bytes are actually sent.
        send: usize,
    },
    /// Declares `body.len()` as `Content-Length`, then sends the body and
    /// `extra` bytes after it before closing.
    Oversized {
        /// The declared body.
        body: Arc<Vec<u8>>,
        /// Bytes sent beyond the declared length.
        extra: Vec<u8>,
    },
    /// Declares `declared` as `Content-Length`, sends the real body, closes.
    WrongLength {
        /// The bytes sent.
        body: Arc<Vec<u8>>,
        /// The `Content-Length` declared.
        declared: u64,
    },
    /// Answers this status with a short text body (e.g. 404, 500, 503).
    Status(u16),
    /// Answers 302 with this `Location`.
    Redirect(String),
    /// Sends the body with `Transfer-Encoding: chunked`, in uneven chunk
    /// sizes (1 byte up to 64 KiB), and no `Content-Length`.
    Chunked(Arc<Vec<u8>>),
    /// Declares the full length, sends the first `after` bytes, then keeps
    /// the connection open and silent until the server is dropped.
    Stall {
        /// The whole body, whose length is declared.
        body: Arc<Vec<u8>>,
        /// How many bytes are sent before the stall.
        after: usize,
    },
    /// Like [`Route::File`] (Range included), paced to `bytes_per_sec`.
    Slow {
        /// The body.
        body: Arc<Vec<u8>>,
        /// The pace; 0 counts as 1.
        bytes_per_sec: u64,
    },
    /// Ignores `Range`: always 200 with the whole body, and no
    /// `Accept-Ranges` header.
    NoRange(Arc<Vec<u8>>),
    /// Like [`Route::File`] (Range included), but the response head comes
    /// only after `delay`: a slow origin, a cold CDN edge.
    Delayed {
        /// The body.
        body: Arc<Vec<u8>>,
        /// How long the request waits before anything is sent.
        delay: std::time::Duration,
    },
}

impl Route {
    /// [`Route::File`] from owned bytes.
    pub fn file(body: impl Into<Vec<u8>>) -> Route {
        Route::File(Arc::new(body.into()))
    }

    /// [`Route::Path`].
    pub fn path(path: impl Into<PathBuf>) -> Route {
        Route::Path(path.into())
    }

    /// [`Route::Truncated`]: declares `body`'s length, sends `send` bytes.
    pub fn truncated(body: impl Into<Vec<u8>>, send: usize) -> Route {
        Route::Truncated {
            body: Arc::new(body.into()),
            send,
        }
    }

    /// [`Route::Oversized`]: sends `extra` bytes past the declared length.
    pub fn oversized(body: impl Into<Vec<u8>>, extra: impl Into<Vec<u8>>) -> Route {
        Route::Oversized {
            body: Arc::new(body.into()),
            extra: extra.into(),
        }
    }

    /// [`Route::WrongLength`]: declares `declared` bytes, sends `body`.
    pub fn wrong_length(body: impl Into<Vec<u8>>, declared: u64) -> Route {
        Route::WrongLength {
            body: Arc::new(body.into()),
            declared,
        }
    }

    /// [`Route::Chunked`].
    pub fn chunked(body: impl Into<Vec<u8>>) -> Route {
        Route::Chunked(Arc::new(body.into()))
    }

    /// [`Route::Stall`]: sends `after` bytes, then stalls.
    pub fn stall(body: impl Into<Vec<u8>>, after: usize) -> Route {
        Route::Stall {
            body: Arc::new(body.into()),
            after,
        }
    }

    /// [`Route::Slow`]: serves at `bytes_per_sec`.
    pub fn slow(body: impl Into<Vec<u8>>, bytes_per_sec: u64) -> Route {
        Route::Slow {
            body: Arc::new(body.into()),
            bytes_per_sec,
        }
    }

    /// [`Route::Delayed`]: answers after `delay`.
    pub fn delayed(body: impl Into<Vec<u8>>, delay: std::time::Duration) -> Route {
        Route::Delayed {
            body: Arc::new(body.into()),
            delay,
        }
    }

    /// [`Route::NoRange`].
    pub fn no_range(body: impl Into<Vec<u8>>) -> Route {
        Route::NoRange(Arc::new(body.into()))
    }
}

/// One request the server received, logged before it is answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLog {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The path, without query string.
    pub path: String,
    /// The `Range` header, if any (e.g. `bytes=1024-`).
    pub range: Option<String>,
    /// Every header, in order, names as sent.
    pub headers: Vec<(String, String)>,
}

impl RequestLog {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A route and the `ETag` computed for it when it was added.
#[derive(Clone)]
pub(crate) struct Entry {
    route: Route,
    etag: Option<String>,
}

/// What the connection tasks share with the [`FileServer`] handle.
pub(crate) struct Shared {
    routes: Mutex<HashMap<String, Entry>>,
    log: Watched<Vec<RequestLog>>,
}

impl Shared {
    fn route(&self, path: &str) -> Option<Entry> {
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .cloned()
    }
}

/// An HTTP/1.1 (or HTTPS) server on 127.0.0.1 and a free port.
///
/// It runs on its own thread with its own tokio runtime, so sync tests (the
/// C API's) and async tests use it alike. Each connection carries one
/// request and closes after the response (`Connection: close`), which
/// keeps faults unambiguous. Routes can be added and replaced while it
/// runs; unknown paths get 404. Dropping it stops the accept loop, closes
/// every connection (stalled ones included) and joins the thread.
pub struct FileServer {
    port: u16,
    tls: bool,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FileServer {
    /// Starts a plain HTTP server.
    pub fn start() -> FileServer {
        Self::spawn(None)
    }

    /// Starts an HTTPS server presenting `ca`'s `localhost` certificate.
    pub fn start_tls(ca: &TestCa) -> FileServer {
        Self::spawn(Some(ca.server_config()))
    }

    /// Starts an HTTPS server with any rustls config, e.g.
    /// [`TestCa::server_config_mtls`] for mutual TLS.
    pub fn start_with_tls_config(config: Arc<ServerConfig>) -> FileServer {
        Self::spawn(Some(config))
    }

    fn spawn(tls: Option<Arc<ServerConfig>>) -> FileServer {
        // Bound here, not on the server thread, so the port is known (and a
        // failure is reported) before `start` returns.
        let listener = StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("set_nonblocking");
        let port = listener.local_addr().expect("local_addr").port();
        let shared = Arc::new(Shared {
            routes: Mutex::new(HashMap::new()),
            log: Watched::new(Vec::new()),
        });
        // One thread is plenty: the work is socket writes, and file reads
        // go to tokio's blocking pool anyway.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let (shutdown, stopped) = oneshot::channel::<()>();
        let is_tls = tls.is_some();
        let acceptor = tls.map(TlsAcceptor::from);
        let task_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("testkit-http-{port}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        _ = respond::accept_loop(listener, acceptor, task_shared) => {}
                        _ = stopped => {}
                    }
                });
                // Drops every connection task, which closes stalled sockets.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("spawn server thread");
        FileServer {
            port,
            tls: is_tls,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` with TLS (the
    /// name the test certificate is issued to).
    pub fn base_url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.port)
        } else {
            format!("http://127.0.0.1:{}", self.port)
        }
    }

    /// The URL of `path` on this server (a leading `/` is optional).
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url(), route_key(path))
    }

    /// Serves `route` at `path`, replacing any previous route there;
    /// returns the URL.
    pub fn add(&self, path: &str, route: Route) -> String {
        self.set(path, route);
        self.url(path)
    }

    /// Replaces the route at `path` while the server runs: requests that
    /// arrive afterwards get the new route (e.g. a fault, then the file, to
    /// test resumption).
    pub fn set(&self, path: &str, route: Route) {
        let entry = Entry {
            etag: respond::memory_etag(&route),
            route,
        };
        self.shared
            .routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(route_key(path), entry);
    }

    /// Removes the route at `path` (it answers 404 again); returns whether
    /// there was one.
    pub fn remove(&self, path: &str) -> bool {
        self.shared
            .routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&route_key(path))
            .is_some()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestLog> {
        self.shared.log.lock().clone()
    }

    /// The `Range` headers of the requests received so far, in arrival
    /// order (requests without one are left out).
    pub fn ranges(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter_map(|r| r.range)
            .collect()
    }

    /// Forgets the requests received so far.
    pub fn clear_requests(&self) {
        self.shared.log.lock().clear();
    }

    /// Blocks until a logged request matches `pred` (one received before
    /// the call counts), or `timeout` passes.
    pub fn wait_for_request(
        &self,
        pred: impl Fn(&RequestLog) -> bool,
        timeout: Duration,
    ) -> Option<RequestLog> {
        self.shared
            .log
            .wait(timeout, |log| log.iter().find(|r| pred(r)).cloned())
    }

    /// [`FileServer::wait_for_request`] for async tests: it does not block
    /// the caller's runtime.
    pub async fn wait_for_request_async(
        &self,
        pred: impl Fn(&RequestLog) -> bool,
        timeout: Duration,
    ) -> Option<RequestLog> {
        self.shared
            .log
            .wait_async(timeout, |log| log.iter().find(|r| pred(r)).cloned())
            .await
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn route_key(path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    }
}
