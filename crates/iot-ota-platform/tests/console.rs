//! The web console in a real headless Chromium over WebDriver (the
//! `fantoccini` client): log in,
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
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use iot_ota_device::{Config, OtaClient, Status};
use iot_ota_testkit::{ChromeDriver, TempDir};
use tokio::time::Instant;

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

/// A WebDriver failure, with what was being waited for.
type Res<T> = Result<T, String>;

fn cmd<T>(r: Result<T, fantoccini::error::CmdError>, what: &str) -> Res<T> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Waits up to `wait` for an element matching `css`.
async fn wait_for(b: &Client, css: &str, wait: Duration) -> Res<Element> {
    let found = b
        .wait()
        .at_most(wait)
        .every(Duration::from_millis(50))
        .for_element(Locator::Css(css))
        .await;
    match found {
        Ok(e) => Ok(e),
        Err(e) => Err(format!(
            "no {css:?} within {wait:?} ({e}); page: {}",
            page_text(b).await
        )),
    }
}

/// Waits up to `wait` until `css`'s text satisfies `pred`; returns that text.
async fn wait_text(
    b: &Client,
    css: &str,
    wait: Duration,
    pred: impl Fn(&str) -> bool,
) -> Res<String> {
    let deadline = Instant::now() + wait;
    let mut last = String::new();
    loop {
        // The element may be replaced between find and read (a live page).
        if let Ok(e) = b.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if pred(&t) {
                    return Ok(t);
                }
                last = t;
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{css:?} never matched within {wait:?}; last text {last:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The whole page's text (for failure messages).
async fn page_text(b: &Client) -> String {
    match b.find(Locator::Css("body")).await {
        Ok(body) => body.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn click(b: &Client, css: &str, wait: Duration) -> Res<()> {
    cmd(wait_for(b, css, wait).await?.click().await, css)
}

async fn type_into(b: &Client, css: &str, text: &str, wait: Duration) -> Res<()> {
    cmd(wait_for(b, css, wait).await?.send_keys(text).await, css)
}

/// Logs in on the console's login page with `token`.
async fn log_in(b: &Client, base: &str, token: &str, wait: Duration) -> Res<()> {
    cmd(b.goto(&format!("{base}/#/login")).await, "login page")?;
    type_into(b, "#token", token, wait).await?;
    click(b, "#login-form button", wait).await
}

/// Creates a batch from the batch form: firmware `version` for `devices`
/// (comma-separated).
async fn create_batch(
    b: &Client,
    base: &str,
    version: &str,
    devices: &str,
    wait: Duration,
) -> Res<()> {
    cmd(b.goto(&format!("{base}/#/batches")).await, "batches page")?;
    wait_for(b, "#batch-form", wait).await?;
    cmd(
        b.execute(
            &format!(
                "const s = document.querySelector('#batch-form select[name=firmware]');\
                 s.value = [...s.options].find(o => o.text.endsWith(' {version}')).value;"
            ),
            vec![],
        )
        .await,
        "choose the firmware",
    )?;
    type_into(b, "#batch-form input[name=devices]", devices, wait).await?;
    click(b, "#batch-form button[type=submit]", wait).await
}

/// The console's walk-through; returns the batch page's screenshot.
async fn walk_through(
    b: &Client,
    base: &str,
    token: &str,
    image_path: &str,
    md5: &str,
) -> Res<Vec<u8>> {
    let wait = Duration::from_secs(30);
    // Without a token, nothing can be changed.
    cmd(b.goto(&format!("{base}/#/firmware")).await, "firmware page")?;
    wait_text(b, "main", wait, |t| {
        t.contains("Log in with the platform's API token")
    })
    .await?;
    // A wrong token is refused, the right one accepted.
    log_in(b, base, "not-the-token", wait).await?;
    wait_text(b, "#error", wait, |t| t.contains("API token")).await?;
    cmd(b.goto(&format!("{base}/#/devices")).await, "devices page")?;
    wait_for(b, "#devices", wait).await?;
    log_in(b, base, token, wait).await?;
    wait_for(b, "#batch-form", wait).await?;

    // Upload: size, MD5, SHA-256, signed or not.
    cmd(b.goto(&format!("{base}/#/firmware")).await, "firmware page")?;
    type_into(b, "#upload-form input[name=product]", PK, wait).await?;
    type_into(b, "#upload-form input[name=version]", "2.0.0", wait).await?;
    type_into(b, "#upload-form input[type=file]", image_path, wait).await?;
    click(b, "#upload-form button", wait).await?;
    let added = wait_text(b, "#upload-result", wait, |t| t.contains("Added")).await?;
    assert!(added.contains("300,000 bytes"), "{added}");
    assert!(added.contains(md5), "{added}");
    assert!(added.contains("not signed"), "{added}");
    let row = wait_text(b, "tr[data-version='2.0.0']", wait, |t| t.contains(md5)).await;
    let row = match row {
        Ok(row) => row,
        Err(e) => return Err(format!("{e}; page: {}", page_text(b).await)),
    };
    assert!(row.contains("firmware-2.0.0.bin"), "{row}");

    // A batch of the three devices that install.
    create_batch(b, base, "2.0.0", "dev-a,dev-b,dev-c", wait).await?;
    // Live: the page shows the batch running, then every record in
    // success, without a reload (the devices take 1.5 s to install).
    let running = wait_text(b, "#counts", wait, |t| {
        t.contains("success: 0") || t.contains("upgrading")
    })
    .await?;
    assert!(!running.contains("success: 3"), "{running}");
    cmd(
        b.execute("window.__same_page = true;", vec![]).await,
        "mark the page",
    )?;
    wait_text(b, "#batch-state", wait, |t| t == "completed").await?;
    let counts = wait_text(b, "#counts", wait, |t| t.contains("success: 3")).await?;
    assert!(counts.contains("failed: 0"), "{counts}");
    let same = cmd(
        b.execute("return window.__same_page === true;", vec![])
            .await,
        "read the mark",
    )?;
    assert_eq!(same, serde_json::json!(true), "no reload");
    let rows = cmd(
        b.find_all(Locator::Css("#records tr.success")).await,
        "records",
    )?;
    assert_eq!(rows.len(), 3);
    assert!(
        b.find(Locator::Css("#chart polyline")).await.is_ok(),
        "the chart of states"
    );
    let png = cmd(b.screenshot().await, "screenshot")?;
    // The failed-only filter hides them all.
    click(b, "#failed-only", wait).await?;
    wait_text(b, "#records", wait, |t| !t.contains("dev-a")).await?;

    // A batch on the device that never reports: terminated from its page.
    create_batch(b, base, "3.0.0", "dev-stuck", wait).await?;
    wait_text(b, "#counts", wait, |t| t.contains("pending: 1")).await?;
    click(b, "button.terminate", wait).await?;
    cmd(b.accept_alert().await, "accept the confirm()")?;
    wait_text(b, "#batch-state", wait, |t| t == "terminated").await?;
    wait_text(b, "#records", wait, |t| t.contains("batch_terminated")).await?;

    // The batch list, and the devices with their versions and presence.
    cmd(b.goto(&format!("{base}/#/batches")).await, "batches page")?;
    wait_text(b, "#batches", wait, |t| {
        t.contains("terminated") && t.contains("completed")
    })
    .await?;
    cmd(b.goto(&format!("{base}/#/devices")).await, "devices page")?;
    let a = wait_text(b, "#devices tr[data-device='dev-a']", wait, |t| {
        t.contains("2.0.0")
    })
    .await?;
    assert!(a.contains("online"), "{a}");
    Ok(png)
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
    let browser = ClientBuilder::new(HttpConnector::new())
        .capabilities(ChromeDriver::capabilities())
        .connect(&driver.url())
        .await
        .expect("a headless Chromium session");
    let shot = walk_through(&browser, &base, &token, &image_path, &md5).await;
    // The session ends whatever happened, then the driver stops (drop).
    let _ = browser.close().await;
    drop(driver);
    let shot = shot.unwrap();
    assert!(shot.starts_with(b"\x89PNG"), "a PNG screenshot");
    let target =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/console-batch.png");
    std::fs::write(&target, &shot).unwrap();
}
