//! The web console in a real headless Chromium over WebDriver: log in,
//! upload a firmware, start a batch on SDK devices and watch its records go
//! to success live (server-sent events, no reload), terminate a batch, list
//! the devices. It writes a screenshot of the batch page to
//! `target/console-batch.png` (docs/console-batch.png is one such).
//!
//! Needs Debian's `chromium` and `chromium-driver` (scripts/test installs
//! them); without them the test is skipped, unless `IOT_OTA_REQUIRE_CHROMIUM`
//! is set (CI), where it fails.

mod common;

use std::time::Duration;

use common::*;
use iot_ota_device::{Config, OtaClient, Status};
use iot_ota_testkit::{Browser, ChromeDriver, TempDir};

/// An SDK device that takes every command, "installs" it slowly enough to
/// be watched (progress 50%, then 100%) and informs the new version; or,
/// `stuck`, acknowledges and then never reports.
async fn device(p: &iot_ota_platform::Platform, name: &str, dir: &std::path::Path, stuck: bool) {
    // Registered: the embedded broker admits only known devices.
    let cred = p
        .register_devices(PK, &[name.to_owned()])
        .unwrap()
        .remove(0);
    let config = Config::new(p.broker_url(), PK, name, "1.0.0")
        .unwrap()
        .username(cred.username)
        .password(cred.secret);
    let (client, mut upgrades) = OtaClient::connect(config).await.expect("device connects");
    let dir = dir.to_owned();
    tokio::spawn(async move {
        while let Some(cmd) = upgrades.next().await {
            if stuck {
                continue;
            }
            let path = dir.join(format!(
                "{}-{}.bin",
                client.config().device_name(),
                cmd.firmware.version
            ));
            if client.download(&cmd).download_to(&path).await.is_err() {
                continue;
            }
            client.report_progress(Status::Upgrading, 50, "").unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            client.report_progress(Status::Success, 100, "").unwrap();
            client.report_version(&cmd.firmware.version).unwrap();
        }
    });
}

/// Logs in on the console's login page with `token`.
fn log_in(b: &Browser, base: &str, token: &str, wait: Duration) -> std::io::Result<()> {
    b.goto(&format!("{base}/#/login"))?;
    let input = b.wait_for("#token", wait)?;
    b.send_keys(&input, token)?;
    b.click(&b.wait_for("#login-form button", wait)?)
}

/// Creates a batch from the batch form: firmware `version` for `devices`
/// (comma-separated).
fn create_batch(
    b: &Browser,
    base: &str,
    version: &str,
    devices: &str,
    wait: Duration,
) -> std::io::Result<()> {
    b.goto(&format!("{base}/#/batches"))?;
    b.wait_for("#batch-form", wait)?;
    b.execute(&format!(
        "const s = document.querySelector('#batch-form select[name=firmware]');\
         s.value = [...s.options].find(o => o.text.endsWith(' {version}')).value;"
    ))?;
    b.send_keys(
        &b.wait_for("#batch-form input[name=devices]", wait)?,
        devices,
    )?;
    b.click(&b.wait_for("#batch-form button[type=submit]", wait)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_uploads_runs_a_batch_live_and_terminates_one() {
    let driver = match ChromeDriver::start() {
        Ok(d) => d,
        Err(e) if std::env::var_os("IOT_OTA_REQUIRE_CHROMIUM").is_none() => {
            eprintln!("skipped: {e}");
            return;
        }
        Err(e) => panic!("{e} (IOT_OTA_REQUIRE_CHROMIUM is set)"),
    };
    let dir = TempDir::new("console");
    let p = secure_platform(&dir.join("platform")).await;
    let base = p.api_url();
    let token = p.api_token().to_owned();
    for name in ["dev-a", "dev-b", "dev-c"] {
        device(&p, name, dir.path(), false).await;
    }
    device(&p, "dev-stuck", dir.path(), true).await;
    let api = api(&p);
    listed(&api, 4).await;
    let image = dir.join("firmware-2.0.0.bin");
    let bytes = iot_ota_testkit::random_bytes(300_000, 7);
    std::fs::write(&image, &bytes).unwrap();
    let md5 = iot_ota_core::digest::digest_hex(iot_ota_core::SignMethod::Md5, &bytes);
    // A firmware for the batch to terminate later, added over the API.
    api.add_firmware(PK, "3.0.0", "fw3.bin", b"three")
        .await
        .unwrap();

    let image_path = image.to_string_lossy().into_owned();
    let wait = Duration::from_secs(30);
    // WebDriver calls block: run the browser on a thread of its own.
    let shot =
        tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let b = driver.browser()?;
            // Without a token, nothing can be changed.
            b.goto(&format!("{base}/#/firmware"))?;
            b.wait_text("main", wait, |t| {
                t.contains("Log in with the platform's API token")
            })?;
            // A wrong token is refused, the right one accepted.
            log_in(&b, &base, "not-the-token", wait)?;
            b.wait_text("#error", wait, |t| t.contains("API token"))?;
            b.goto(&format!("{base}/#/devices"))?;
            b.wait_for("#devices", wait)?;
            log_in(&b, &base, &token, wait)?;
            b.wait_for("#batch-form", wait)?;

            // Upload: size, MD5, SHA-256, signed or not.
            b.goto(&format!("{base}/#/firmware"))?;
            b.send_keys(&b.wait_for("#upload-form input[name=product]", wait)?, PK)?;
            b.send_keys(
                &b.wait_for("#upload-form input[name=version]", wait)?,
                "2.0.0",
            )?;
            b.send_keys(
                &b.wait_for("#upload-form input[type=file]", wait)?,
                &image_path,
            )?;
            b.click(&b.wait_for("#upload-form button", wait)?)?;
            let added = b.wait_text("#upload-result", wait, |t| t.contains("Added"))?;
            assert!(added.contains("300,000 bytes"), "{added}");
            assert!(added.contains(&md5), "{added}");
            assert!(added.contains("not signed"), "{added}");
            let row =
                b.wait_text("tr[data-version='2.0.0']", wait, |t| t.contains(&md5))
                    .map_err(|e| {
                        std::io::Error::other(format!("{e}; page: {}; js: {:?}", b.page_text(),
                b.execute("return document.querySelector(\"tr[data-version='2.0.0']\").innerText")))
                    })?;
            assert!(row.contains("firmware-2.0.0.bin"), "{row}");

            // A batch of the three devices that install.
            create_batch(&b, &base, "2.0.0", "dev-a,dev-b,dev-c", wait)?;
            // Live: the page shows the batch running, then every record in
            // success, without a reload (the devices take 1.5 s to install).
            let running = b.wait_text("#counts", wait, |t| {
                t.contains("success: 0") || t.contains("upgrading")
            })?;
            assert!(!running.contains("success: 3"), "{running}");
            b.execute("window.__same_page = true;")?;
            b.wait_text("#batch-state", wait, |t| t == "completed")?;
            let counts = b.wait_text("#counts", wait, |t| t.contains("success: 3"))?;
            assert!(counts.contains("failed: 0"), "{counts}");
            assert_eq!(
                b.execute("return window.__same_page === true;")?,
                serde_json::json!(true),
                "no reload"
            );
            assert_eq!(b.find_all("#records tr.success").len(), 3);
            assert!(b.find("#chart polyline").is_some(), "the chart of states");
            let png = b.screenshot()?;
            // The failed-only filter hides them all.
            b.click(&b.wait_for("#failed-only", wait)?)?;
            b.wait_text("#records", wait, |t| !t.contains("dev-a"))?;

            // A batch on the device that never reports: terminated from its page.
            create_batch(&b, &base, "3.0.0", "dev-stuck", wait)?;
            b.wait_text("#counts", wait, |t| t.contains("pending: 1"))?;
            b.click(&b.wait_for("button.terminate", wait)?)?;
            b.accept_dialog()?;
            b.wait_text("#batch-state", wait, |t| t == "terminated")?;
            b.wait_text("#records", wait, |t| t.contains("batch_terminated"))?;

            // The batch list, and the devices with their versions and presence.
            b.goto(&format!("{base}/#/batches"))?;
            b.wait_text("#batches", wait, |t| {
                t.contains("terminated") && t.contains("completed")
            })?;
            b.goto(&format!("{base}/#/devices"))?;
            let a = b.wait_text("#devices tr[data-device='dev-a']", wait, |t| {
                t.contains("2.0.0")
            })?;
            assert!(a.contains("online"), "{a}");
            Ok(png)
        })
        .await
        .unwrap()
        .unwrap();
    assert!(shot.starts_with(b"\x89PNG"), "a PNG screenshot");
    let target =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/console-batch.png");
    std::fs::write(&target, &shot).unwrap();
}
