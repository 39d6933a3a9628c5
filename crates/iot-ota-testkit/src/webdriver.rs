//! A real headless Chromium for the web console's tests (Debian's
//! `chromium` and `chromium-driver`): [`ChromeDriver`] runs `chromedriver`
//! on a free loopback port and stops it when dropped. The tests drive it
//! with the `fantoccini` WebDriver client; [`ChromeDriver::capabilities`]
//! are the headless browser's.

use std::io;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

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
    /// Starts chromedriver and waits until it accepts connections.
    /// `Err(NotFound)` when it is not installed (`apt-get install chromium
    /// chromium-driver`).
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
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = driver.child.try_wait() {
                return Err(io::Error::other(format!(
                    "chromedriver exited before it listened: {status}"
                )));
            }
            if Instant::now() > deadline {
                let _ = driver.child.kill();
                return Err(io::Error::other("chromedriver did not listen within 20 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(driver)
    }

    /// The WebDriver endpoint, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The capabilities of a headless Chromium, 1280×1000, without the
    /// sandbox (the tests run as root).
    pub fn capabilities() -> Map<String, Value> {
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000",
                         "--no-first-run", "--no-default-browser-check"]
            }
        });
        match caps {
            Value::Object(m) => m,
            _ => unreachable!("a JSON object literal"),
        }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
