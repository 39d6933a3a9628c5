//! Whole upgrades through the example device binary, against a real
//! Mosquitto and a real HTTP(S) server; the wire recorder plays the platform.

mod common;

use std::time::Duration;

use common::*;
use iot_ota_core::digest::SignMethod;
use iot_ota_testkit::{random_bytes, FileServer, Route, TestCa};
use serde_json::json;

/// Checks the wire of a successful upgrade to `version` of `dev`.
fn assert_success_wire(rig: &Rig, dev: &str, msg_id: &str, version: &str) {
    // The process has exited; its last messages may still be on their way
    // through the broker to the recorder.
    rig.expect_inform(dev, version);
    let replies = rig.all(dev, "upgrade_reply");
    assert_eq!(
        replies,
        vec![json!({"msgId": msg_id, "code": 200, "message": "success"})]
    );
    iot_ota_testkit::assert_success_statuses(&rig.statuses(dev));
    for p in rig.all(dev, "progress") {
        assert_eq!(p["data"]["firmwareVersion"], version);
    }
    let informs = rig.informs(dev);
    assert_eq!(informs, vec!["1.0.0".to_owned(), version.to_owned()]);
}

#[test]
fn upgrade_md5_over_http() {
    let rig = rig();
    let body = random_bytes(3 * 1024 * 1024 + 17, 1);
    let url = rig.files.add("/fw-2.bin", Route::file(body.clone()));
    let child = rig.example("d1", &["--once"]);
    rig.expect_inform("d1", "1.0.0");
    rig.push("d1", command("m1", "2.0.0", &url, &body, SignMethod::Md5));
    let (code, log) = wait_exit(child, WAIT);
    assert_eq!(code, 0, "{log}");
    assert_success_wire(&rig, "d1", "m1", "2.0.0");
    assert_eq!(std::fs::read(rig.out_file("d1", "2.0.0")).unwrap(), body);
    assert!(!rig
        .dir
        .path()
        .join("d1")
        .join("firmware-2.0.0.bin.part")
        .exists());
    assert!(log.contains("upgraded to 2.0.0"), "{log}");
}

#[test]
fn upgrade_sha256_over_https() {
    let rig = rig();
    let ca = TestCa::new();
    let ca_file = ca.write_ca(rig.dir.path());
    let tls_files = FileServer::start_tls(&ca);
    let body = random_bytes(1024 * 1024, 2);
    let url = tls_files.add("/fw.bin", Route::file(body.clone()));
    assert!(url.starts_with("https://"));
    let child = rig.example("d2", &["--once", "--ca-file", ca_file.to_str().unwrap()]);
    rig.expect_inform("d2", "1.0.0");
    rig.push("d2", command("s1", "2.1", &url, &body, SignMethod::Sha256));
    let (code, log) = wait_exit(child, WAIT);
    assert_eq!(code, 0, "{log}");
    assert_success_wire(&rig, "d2", "s1", "2.1");
    assert_eq!(std::fs::read(rig.out_file("d2", "2.1")).unwrap(), body);
}

#[test]
fn md5_over_https_and_sha256_over_http() {
    let rig = rig();
    let ca = TestCa::new();
    let ca_file = ca.write_ca(rig.dir.path());
    let tls_files = FileServer::start_tls(&ca);
    let body = random_bytes(200_000, 3);
    let https = tls_files.add("/a.bin", Route::file(body.clone()));
    let http = rig.files.add("/b.bin", Route::chunked(body.clone()));
    let child = rig.example("d3", &["--ca-file", ca_file.to_str().unwrap()]);
    rig.expect_inform("d3", "1.0.0");
    rig.push("d3", command("1", "2.0", &https, &body, SignMethod::Md5));
    rig.expect_inform("d3", "2.0");
    rig.push("d3", command("2", "3.0", &http, &body, SignMethod::Sha256));
    rig.expect_inform("d3", "3.0");
    stop(child);
    assert_eq!(std::fs::read(rig.out_file("d3", "2.0")).unwrap(), body);
    assert_eq!(std::fs::read(rig.out_file("d3", "3.0")).unwrap(), body);
    let replies: Vec<_> = rig
        .all("d3", "upgrade_reply")
        .iter()
        .map(|r| r["code"].clone())
        .collect();
    assert_eq!(replies, vec![json!(200), json!(200)]);
}

/// Runs one failing upgrade and returns the device's reports and stderr.
fn failing_upgrade(dev: &str, route: Route, body: &[u8]) -> (Rig, Vec<(i64, i64)>, String) {
    let rig = rig();
    let url = rig.files.add("/bad.bin", route);
    let child = rig.example(dev, &["--once"]);
    rig.expect_inform(dev, "1.0.0");
    rig.push(dev, command("f1", "2.0.0", &url, body, SignMethod::Md5));
    let (code, log) = wait_exit(child, WAIT);
    assert_eq!(code, 1, "{log}");
    // The process has exited; its failure report may still be on its way
    // through the broker to the recorder.
    rig.wait_status(dev, |s, _| s < 0);
    assert!(
        !rig.out_file(dev, "2.0.0").exists(),
        "unverified bytes reached the final path"
    );
    assert!(!rig
        .dir
        .path()
        .join(dev)
        .join("firmware-2.0.0.bin.part")
        .exists());
    assert_eq!(
        rig.all(dev, "inform").len(),
        1,
        "no new version may be informed"
    );
    let statuses = rig.statuses(dev);
    (rig, statuses, log)
}

#[test]
fn wrong_digest_is_verify_failed() {
    let body = random_bytes(100_000, 4);
    let mut served = body.clone();
    served[5000] ^= 1;
    let (rig, statuses, _) = failing_upgrade("v1", Route::file(served), &body);
    assert_eq!(statuses.last(), Some(&(-3, 100)), "{statuses:?}");
    let desc = rig.all("v1", "progress").last().unwrap()["data"]["desc"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(desc.contains("MD5 mismatch"), "{desc}");
}

#[test]
fn truncated_body_is_download_failed() {
    let body = random_bytes(100_000, 5);
    let (_, statuses, log) = failing_upgrade("t1", Route::truncated(body.clone(), 40_000), &body);
    let last = statuses.last().unwrap();
    assert_eq!(last.0, -2, "{statuses:?}\n{log}");
}

#[test]
fn oversized_body_is_download_failed() {
    let body = random_bytes(100_000, 6);
    let (rig, statuses, _) =
        failing_upgrade("o1", Route::oversized(body.clone(), vec![0u8; 1000]), &body);
    assert_eq!(statuses.last().unwrap().0, -2, "{statuses:?}");
    let desc = rig.all("o1", "progress").last().unwrap()["data"]["desc"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(desc.contains("longer"), "{desc}");
}

#[test]
fn content_length_unlike_size_is_download_failed() {
    let body = random_bytes(100_000, 7);
    let (rig, statuses, _) =
        failing_upgrade("w1", Route::wrong_length(body.clone(), 150_000), &body);
    assert_eq!(statuses, vec![(1, 0), (-2, 0)]);
    let desc = rig.all("w1", "progress").last().unwrap()["data"]["desc"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(desc.contains("150000"), "{desc}");
}

#[test]
fn missing_file_is_download_failed() {
    let body = random_bytes(1000, 8);
    let (rig, statuses, _) = failing_upgrade("n1", Route::Status(404), &body);
    assert_eq!(statuses, vec![(1, 0), (-2, 0)]);
    let desc = rig.all("n1", "progress").last().unwrap()["data"]["desc"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(desc.contains("404"), "{desc}");
}

#[test]
fn failure_then_next_command_succeeds() {
    let rig = rig();
    let body = random_bytes(50_000, 9);
    let bad = rig.files.add("/bad.bin", Route::Status(500));
    let good = rig.files.add("/good.bin", Route::file(body.clone()));
    let child = rig.example("r1", &[]);
    rig.expect_inform("r1", "1.0.0");
    rig.push("r1", command("1", "2.0.0", &bad, &body, SignMethod::Md5));
    rig.expect("r1", "progress", |m| m.json_i64("data.status") == Some(-2));
    rig.push("r1", command("2", "2.0.0", &good, &body, SignMethod::Md5));
    rig.expect_inform("r1", "2.0.0");
    stop(child);
    let codes: Vec<_> = rig
        .all("r1", "upgrade_reply")
        .iter()
        .map(|r| r["code"].clone())
        .collect();
    assert_eq!(codes, vec![json!(200), json!(200)]);
    // The second download started from fresh counters: 0% first again.
    let statuses = rig.statuses("r1");
    let second: Vec<_> = statuses
        .iter()
        .skip_while(|s| s.0 != -2)
        .skip(1)
        .cloned()
        .collect();
    assert_eq!(second.first(), Some(&(1, 0)), "{statuses:?}");
    assert_eq!(second.last(), Some(&(4, 100)), "{statuses:?}");
}

#[test]
fn duplicate_command_while_downloading_gets_409() {
    let rig = rig();
    let body = random_bytes(300_000, 10);
    let url = rig
        .files
        .add("/slow.bin", Route::slow(body.clone(), 200_000));
    let child = rig.example("b1", &["--once"]);
    rig.expect_inform("b1", "1.0.0");
    let cmd = command("100", "2.0.0", &url, &body, SignMethod::Md5);
    rig.push("b1", cmd.clone());
    rig.expect("b1", "progress", |m| m.json_i64("data.status") == Some(1));
    rig.push("b1", cmd.replace("\"100\"", "\"101\""));
    let busy = rig.expect("b1", "upgrade_reply", |m| {
        m.json_str("msgId").as_deref() == Some("101")
    });
    assert_eq!(busy.json_i64("code"), Some(409));
    assert_eq!(
        busy.json_str("message").as_deref(),
        Some("busy: upgrading to 2.0.0")
    );
    let (code, log) = wait_exit(child, WAIT);
    assert_eq!(code, 0, "{log}");
    rig.expect_inform("b1", "2.0.0");
    assert_eq!(std::fs::read(rig.out_file("b1", "2.0.0")).unwrap(), body);
    // No failure report for the duplicate: the running upgrade is untouched.
    assert!(
        rig.statuses("b1").iter().all(|s| s.0 > 0),
        "{:?}",
        rig.statuses("b1")
    );
}

#[test]
fn get_version_success_upgrades() {
    let rig = rig();
    let body = random_bytes(70_000, 11);
    let url = rig.files.add("/fw3.bin", Route::file(body.clone()));
    let child = rig.example("g1", &["--once", "--get-version", "3.0.0"]);
    let get = rig.expect("g1", "get", |_| true);
    assert_eq!(
        get.json_str("data.firmwareVersion").as_deref(),
        Some("3.0.0")
    );
    let msg_id = get.json_str("msgId").unwrap();
    let reply = json!({"msgId": msg_id, "version": "1.0", "data": {
        "firmwareVersion": "3.0.0", "url": url,
        "sign": iot_ota_core::digest::digest_hex(SignMethod::Md5, &body), "signMethod": "MD5"}});
    rig.wire
        .publish(&rig.topic("g1", "get_reply"), reply.to_string(), true)
        .unwrap();
    let (code, log) = wait_exit(child, WAIT);
    assert_eq!(code, 0, "{log}");
    assert_eq!(std::fs::read(rig.out_file("g1", "3.0.0")).unwrap(), body);
    rig.expect_inform("g1", "3.0.0");
    // No command, so no reply; the size came from the server.
    assert!(rig.all("g1", "upgrade_reply").is_empty());
    let statuses = rig.statuses("g1");
    assert_eq!(statuses.last(), Some(&(4, 100)), "{statuses:?}");
}

#[test]
fn get_version_404_exits_2() {
    let rig = rig();
    let child = rig.example("g2", &["--once", "--get-version", "9.9"]);
    let get = rig.expect("g2", "get", |_| true);
    let msg_id = get.json_str("msgId").unwrap();
    let reply = iot_ota_core::protocol::encode_get_not_found(&msg_id, "9.9");
    rig.wire
        .publish(&rig.topic("g2", "get_reply"), reply, true)
        .unwrap();
    let (code, log) = wait_exit(child, WAIT);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("FirmwareVersion 9.9 not existed"), "{log}");
}

#[test]
fn bad_flags_are_refused() {
    let out = std::process::Command::new(example_path())
        .args(["--broker", "mqtt://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--product-key is required"), "{err}");
    let out = std::process::Command::new(example_path())
        .args([
            "--broker",
            "http://x",
            "--product-key",
            "p",
            "--device-name",
            "d",
        ])
        .args(["--firmware-version", "1", "--output-dir", "/tmp"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported scheme"));
    let _ = Duration::ZERO;
}

/// A device without a system certificate store (many embedded images) still
/// upgrades over plain HTTP; only an https:// download would need roots.
#[test]
fn no_system_roots_is_fine_for_plain_http() {
    let rig = rig();
    let body = random_bytes(100_000, 13);
    let url = rig.files.add("/fw.bin", Route::file(body.clone()));
    let mut cmd = std::process::Command::new(example_path());
    cmd.args([
        "--broker",
        &rig.broker.url(),
        "--product-key",
        PK,
        "--device-name",
        "nr",
    ])
    .args(["--firmware-version", "1.0.0", "--output-dir"])
    .arg(rig.dir.path().join("nr"))
    .arg("--once")
    // The SDK reads these instead of the system store (tls.rs).
    .env("SSL_CERT_FILE", rig.dir.path().join("none.pem"))
    .env("SSL_CERT_DIR", rig.dir.path().join("none"))
    .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    rig.expect_inform("nr", "1.0.0");
    rig.push("nr", command("1", "2.0.0", &url, &body, SignMethod::Md5));
    let (code, log) = wait_exit(child, WAIT);
    assert_eq!(code, 0, "{log}");
    assert_eq!(std::fs::read(rig.out_file("nr", "2.0.0")).unwrap(), body);
}

/// With a pinned key (`--trust-key`), the example installs only firmware
/// whose manifest that key signed: an unsigned command gets 412, a manifest
/// whose SHA-256 is not the image's fails with VERIFY_FAILED, a signed one
/// upgrades, and one whose counter is below the committed one is refused,
/// also after a restart (the counter is kept in the state directory).
#[test]
fn only_signed_firmware_with_a_pinned_key() {
    let rig = rig();
    let key = iot_ota_testkit::TestKey::new();
    let pem = rig.dir.path().join("trusted.pub.pem");
    key.write_public(&pem);
    let trust = ["--trust-key", pem.to_str().unwrap()];
    let body = random_bytes(100_000, 21);
    let url = rig.files.add("/signed.bin", Route::file(body.clone()));
    let reply = |id: &str| {
        let m = rig.expect("sig", "upgrade_reply", |m| {
            m.json_str("msgId").as_deref() == Some(id)
        });
        (
            m.json_i64("code").unwrap(),
            m.json_str("message").unwrap_or_default(),
        )
    };
    let child = rig.example("sig", &trust);
    rig.expect_inform("sig", "1.0.0");
    rig.push("sig", command("u1", "2.0.0", &url, &body, SignMethod::Md5));
    let (code, message) = reply("u1");
    assert_eq!(code, 412);
    assert!(message.contains("unsigned firmware"), "{message}");

    let plain = command("l1", "2.0.0", &url, &body, SignMethod::Md5);
    rig.push("sig", key.sign_command_as(&plain, PK, &"00".repeat(32), 5));
    assert_eq!(reply("l1").0, 200);
    rig.wait_status("sig", |s, _| s == -3);
    let failed = rig.all("sig", "progress");
    let desc = failed.last().unwrap()["data"]["desc"].as_str().unwrap();
    assert!(desc.contains("SHA-256"), "{desc}");

    let good = command("g1", "2.0.0", &url, &body, SignMethod::Md5);
    rig.push("sig", key.sign_command(&good, PK, &body, 5));
    assert_eq!(reply("g1").0, 200);
    rig.expect_inform("sig", "2.0.0");
    let old = command("d1", "3.0.0", &url, &body, SignMethod::Md5);
    rig.push("sig", key.sign_command(&old, PK, &body, 4));
    let (code, message) = reply("d1");
    assert_eq!(code, 412);
    assert!(message.contains("counter 4 < 5"), "{message}");
    stop(child);

    rig.wire.clear();
    let child = rig.example("sig", &trust);
    rig.expect_inform("sig", "1.0.0");
    rig.push("sig", key.sign_command(&old, PK, &body, 4));
    let (code, message) = reply("d1");
    assert_eq!(code, 412, "the counter survived the restart");
    assert!(message.contains("counter 4 < 5"), "{message}");
    stop(child);

    // The key revoked: its signatures count no more.
    rig.wire.clear();
    let id = key.public().key_id().to_owned();
    let child = rig.example("sig", &[trust[0], trust[1], "--revoke-key", &id]);
    rig.expect_inform("sig", "1.0.0");
    let new = command("r1", "3.0.0", &url, &body, SignMethod::Md5);
    rig.push("sig", key.sign_command(&new, PK, &body, 9));
    let (code, message) = reply("r1");
    assert_eq!(code, 412);
    assert!(message.contains(&id), "{message}");
    stop(child);
}

// ---- the acceptance table shared with the agent and the C example ----

fn rust_example() -> iot_ota_testkit::acceptance::Frontend {
    iot_ota_testkit::acceptance::Frontend::new(example_path())
}

/// The shared table (on main: the C API and the Rust example replied 200
/// before they journaled; the C example's full disk left `.part.meta` and
/// an empty desc).
mod table {
    iot_ota_testkit::acceptance_table!(super::rust_example(), super::rig(), "r");
}

/// A delta update from the running version's file (the example's
/// `running_image`).
#[test]
fn example_does_a_delta_update_from_the_running_file() {
    iot_ota_testkit::acceptance::delta_update(&rust_example(), &rig(), "rdelta", None);
}

/// A delta cut by a kill -9 goes on after the restart.
#[test]
fn example_resumes_a_delta_after_kill_9() {
    iot_ota_testkit::acceptance::delta_resume_after_kill(&rust_example(), &rig(), "rdkill", None);
}
