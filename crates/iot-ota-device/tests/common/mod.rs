//! Shared rig for the device SDK's integration tests: a real Mosquitto, a real
//! HTTP(S) file server, a wire recorder acting as the platform, a temp dir.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use iot_ota_core::digest::{digest_hex, SignMethod};
use iot_ota_testkit::{FileServer, Mosquitto, TempDir, WireMessage, WireRecorder};
use serde_json::Value;

pub const PK: &str = "pk1";
pub const WAIT: Duration = Duration::from_secs(15);

pub struct Rig {
    pub broker: Mosquitto,
    pub files: FileServer,
    pub wire: WireRecorder,
    pub dir: TempDir,
}

impl Rig {
    pub fn new() -> Rig {
        let broker = Mosquitto::start();
        let wire = WireRecorder::connect(&broker.url(), "/sys/#");
        Rig {
            files: FileServer::start(),
            wire,
            broker,
            dir: TempDir::new("ota-sdk-test"),
        }
    }

    pub fn topic(&self, dev: &str, kind: &str) -> String {
        format!("/sys/{PK}/{dev}/ota/firmware/{kind}")
    }

    /// Publishes a command as the platform would.
    pub fn push(&self, dev: &str, payload: impl Into<Vec<u8>>) {
        self.wire
            .publish(&self.topic(dev, "upgrade"), payload, true)
            .expect("publish command");
    }

    /// Waits for a message from `dev` on `kind` matching `pred`.
    pub fn expect(
        &self,
        dev: &str,
        kind: &str,
        pred: impl Fn(&WireMessage) -> bool,
    ) -> WireMessage {
        let topic = self.topic(dev, kind);
        self.wire
            .wait_for(|m| m.topic == topic && pred(m), WAIT)
            .unwrap_or_else(|| {
                panic!(
                    "no {kind} message from {dev}; wire:\n{}",
                    self.wire.summary()
                )
            })
    }

    /// Every JSON message from `dev` on `kind`, in order.
    pub fn all(&self, dev: &str, kind: &str) -> Vec<Value> {
        self.wire.json_on(&self.topic(dev, kind))
    }

    /// `(status, progress)` of every progress report from `dev`.
    pub fn statuses(&self, dev: &str) -> Vec<(i64, i64)> {
        self.wire.progress_on(&self.topic(dev, "progress"))
    }

    /// Waits for the device's inform of `version`.
    pub fn expect_inform(&self, dev: &str, version: &str) {
        self.expect(dev, "inform", |m| {
            m.json_str("data.firmwareVersion").as_deref() == Some(version)
        });
    }

    /// Starts the example device binary.
    pub fn example(&self, dev: &str, extra: &[&str]) -> Child {
        let mut cmd = Command::new(example_path());
        cmd.args([
            "--broker",
            &self.broker.url(),
            "--product-key",
            PK,
            "--device-name",
            dev,
        ])
        .args(["--firmware-version", "1.0.0", "--output-dir"])
        .arg(self.dir.path().join(dev))
        .args(extra)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
        cmd.spawn().expect("start ota_example")
    }

    pub fn out_file(&self, dev: &str, version: &str) -> PathBuf {
        self.dir
            .path()
            .join(dev)
            .join(format!("firmware-{version}.bin"))
    }
}

/// The example binary, built by `cargo test` next to the test binaries.
pub fn example_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples").join("ota_example");
    assert!(
        path.exists(),
        "{} is missing: run via cargo test",
        path.display()
    );
    path
}

/// An upgrade command's JSON.
pub fn command(id: &str, version: &str, url: &str, body: &[u8], method: SignMethod) -> String {
    let wire = if method == SignMethod::Md5 {
        "Md5"
    } else {
        "SHA256"
    };
    iot_ota_testkit::upgrade_command(
        id,
        version,
        url,
        body.len(),
        &digest_hex(method, body),
        wire,
    )
}

/// Waits for a child to exit, with a deadline; returns its code and stderr.
pub fn wait_exit(child: Child, timeout: Duration) -> (i32, String) {
    let exit = iot_ota_testkit::wait_child(child, timeout);
    (exit.code, exit.stderr)
}

/// Kills a child we started (by its handle) and returns its stderr.
pub fn stop(mut child: Child) -> String {
    child.kill().ok();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}
