//! Waiting for a child process a test started, with a deadline.

use std::io::Read;
use std::process::Child;
use std::time::{Duration, Instant};

/// How a child process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildExit {
    /// Its exit code (-1 when a signal ended it).
    pub code: i32,
    /// What it wrote on stdout, if that was piped.
    pub stdout: String,
    /// What it wrote on stderr, if that was piped.
    pub stderr: String,
}

/// Waits for `child` (which the test started) to exit. Its piped stdout and
/// stderr are drained on threads meanwhile, so a chatty child never blocks
/// on a full pipe. Past `timeout` the child is killed, by its handle, and
/// the call panics with what it wrote.
pub fn wait_child(mut child: Child, timeout: Duration) -> ChildExit {
    let start = Instant::now();
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait on our child") {
            break Some(status);
        }
        if start.elapsed() > timeout {
            child.kill().ok();
            child.wait().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(s) => ChildExit {
            code: s.code().unwrap_or(-1),
            stdout,
            stderr,
        },
        None => panic!("no exit within {timeout:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"),
    }
}
