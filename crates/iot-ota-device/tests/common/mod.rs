//! Shared rig for the device SDK's integration tests: a real Mosquitto, a real
//! HTTP(S) file server, a wire recorder acting as the platform, a temp dir.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use iot_ota_core::digest::{digest_hex, SignMethod};

pub const PK: &str = "pk1";
pub const WAIT: Duration = Duration::from_secs(15);

pub use iot_ota_testkit::Rig;

/// A rig for this crate's tests.
pub fn rig() -> Rig {
    Rig::new(PK, "ota-sdk-test")
}

/// The example device on a [`Rig`].
pub trait ExampleRig {
    /// Starts the example device binary.
    fn example(&self, dev: &str, extra: &[&str]) -> Child;
    /// Where the example puts firmware `version` of `dev`.
    fn out_file(&self, dev: &str, version: &str) -> PathBuf;
}

impl ExampleRig for Rig {
    fn example(&self, dev: &str, extra: &[&str]) -> Child {
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

    fn out_file(&self, dev: &str, version: &str) -> PathBuf {
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
