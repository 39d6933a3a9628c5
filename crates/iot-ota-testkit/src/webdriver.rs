//! A real headless Chromium, driven over W3C WebDriver (Debian's
//! `chromium` and `chromium-driver`): [`ChromeDriver`] runs `chromedriver`
//! on a free loopback port, [`Browser`] is one session in it.
//!
//! The protocol is JSON over HTTP/1.1; the few commands the console's tests
//! need are written here over a plain `TcpStream`, so the tests pull no
//! WebDriver crate (and no second HTTP or TLS stack).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::free_port;

/// Where Debian puts the driver; `$CHROMEDRIVER` overrides.
fn driver_path() -> Option<String> {
    if let Ok(p) = std::env::var("CHROMEDRIVER") {
        return Some(p);
    }
    ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .find(|p| std::path::Path::new(p).exists())
        .map(|p| p.to_string())
}

/// A `chromedriver` process, stopped (by its pid) when dropped.
#[derive(Debug)]
pub struct ChromeDriver {
    child: Child,
    port: u16,
}

impl ChromeDriver {
    /// Starts chromedriver and waits until it is ready. `Err(NotFound)` when
    /// it is not installed (`apt-get install chromium chromium-driver`).
    pub fn start() -> io::Result<ChromeDriver> {
        let path = driver_path().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "chromedriver is not installed (apt-get install chromium chromium-driver)",
            )
        })?;
        let port = free_port();
        let child = Command::new(path)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut driver = ChromeDriver { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, v)) = request(port, "GET", "/status", None) {
                if v["value"]["ready"] == json!(true) {
                    return Ok(driver);
                }
            }
            if Instant::now() > deadline {
                let _ = driver.child.kill();
                return Err(io::Error::other("chromedriver did not become ready"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A new headless browser session (1280×1000, no sandbox: the tests run as root).
    pub fn browser(&self) -> io::Result<Browser> {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000",
                         "--no-first-run", "--no-default-browser-check"]
            }
        }}});
        let v = call(self.port, "POST", "/session", Some(caps))?;
        let id = v["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| io::Error::other(format!("no session id in {v}")))?;
        Ok(Browser {
            port: self.port,
            session: id.to_owned(),
        })
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session; closed when dropped.
#[derive(Debug)]
pub struct Browser {
    port: u16,
    session: String,
}

/// An element, by its WebDriver reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element(String);

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> io::Result<Value> {
        let path = format!("/session/{}{path}", self.session);
        call(self.port, method, &path, body).map(|v| v["value"].clone())
    }

    /// Navigates to `url` and waits for the page to load.
    pub fn goto(&self, url: &str) -> io::Result<()> {
        self.cmd("POST", "/url", Some(json!({ "url": url })))
            .map(|_| ())
    }

    /// The first element matching the CSS selector, if any.
    pub fn find(&self, css: &str) -> Option<Element> {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .ok()?;
        v[ELEMENT_KEY].as_str().map(|s| Element(s.to_owned()))
    }

    /// Every element matching the CSS selector.
    pub fn find_all(&self, css: &str) -> Vec<Element> {
        self.cmd(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e[ELEMENT_KEY].as_str().map(|s| Element(s.to_owned())))
        .collect()
    }

    /// Waits up to `timeout` for an element matching `css`.
    pub fn wait_for(&self, css: &str, timeout: Duration) -> io::Result<Element> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.find(css) {
                return Ok(e);
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no {css:?} within {timeout:?}; page: {}", self.page_text()),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` until `css`'s text satisfies `pred`; returns that text.
    pub fn wait_text(
        &self,
        css: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> io::Result<String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            if let Some(e) = self.find(css) {
                // The element may be replaced between find and read (a live page).
                if let Ok(t) = self.text(&e) {
                    if pred(&t) {
                        return Ok(t);
                    }
                    last = t;
                }
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{css:?} never matched within {timeout:?}; last text {last:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Clicks an element.
    pub fn click(&self, e: &Element) -> io::Result<()> {
        self.cmd("POST", &format!("/element/{}/click", e.0), Some(json!({})))
            .map(|_| ())
    }

    /// Types `text` into an element (for a file input: the file's path).
    pub fn send_keys(&self, e: &Element, text: &str) -> io::Result<()> {
        self.cmd(
            "POST",
            &format!("/element/{}/value", e.0),
            Some(json!({ "text": text })),
        )
        .map(|_| ())
    }

    /// An element's rendered text.
    pub fn text(&self, e: &Element) -> io::Result<String> {
        let v = self.cmd("GET", &format!("/element/{}/text", e.0), None)?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// The whole page's text (for failure messages).
    pub fn page_text(&self) -> String {
        self.find("body")
            .and_then(|b| self.text(&b).ok())
            .unwrap_or_default()
    }

    /// Runs `script` in the page (`return ...` gives a value).
    pub fn execute(&self, script: &str) -> io::Result<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Accepts the open `confirm()` or `alert()` dialog.
    pub fn accept_dialog(&self) -> io::Result<()> {
        self.cmd("POST", "/alert/accept", Some(json!({})))
            .map(|_| ())
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self) -> io::Result<Vec<u8>> {
        let v = self.cmd("GET", "/screenshot", None)?;
        iot_ota_core::manifest::base64_decode(v.as_str().unwrap_or_default())
            .map_err(io::Error::other)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = call(
            self.port,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
    }
}

/// A WebDriver call: the JSON answer, or the error it carries.
fn call(port: u16, method: &str, path: &str, body: Option<Value>) -> io::Result<Value> {
    let (status, v) = request(port, method, path, body)?;
    if status != 200 {
        return Err(io::Error::other(format!(
            "WebDriver {method} {path}: {status}: {}",
            v["value"]["message"].as_str().unwrap_or(&v.to_string())
        )));
    }
    Ok(v)
}

/// One HTTP/1.1 request to chromedriver (Connection: close).
fn request(port: u16, method: &str, path: &str, body: Option<Value>) -> io::Result<(u16, Value)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // chromedriver keeps the connection open whatever we ask: read the head,
    // then exactly Content-Length bytes (or the chunks).
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::other(
                "chromedriver closed before its answer's head",
            ));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {head:?}")))?;
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = lower.contains("transfer-encoding: chunked");
    let mut body = raw[head_end + 4..].to_vec();
    loop {
        let done = match length {
            Some(n) => body.len() >= n,
            None if chunked => body.windows(5).any(|w| w == b"0\r\n\r\n"),
            None => false,
        };
        if done {
            break;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    let body = if chunked { dechunk(&body) } else { body };
    let body = String::from_utf8_lossy(&body).into_owned();
    let v = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).map_err(|e| io::Error::other(format!("{e}: {body}")))?
    };
    Ok((status, v))
}

/// The body of a chunked answer, as bytes (decoded to text only after).
fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = s.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&s[..i]);
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        let rest = &s[i + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        s = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}
