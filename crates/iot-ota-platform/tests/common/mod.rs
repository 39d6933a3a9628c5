//! Shared helpers: a platform on loopback, scripted devices over a wire recorder.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use iot_ota_core::protocol::{encode_inform, encode_progress, encode_upgrade_reply, Progress};
use iot_ota_core::{ReplyCode, Status, Topics};
use iot_ota_platform::api::{BatchView, CreateBatch};
use iot_ota_platform::{ApiClient, BrokerChoice, Platform, PlatformConfig};
use iot_ota_testkit::{WireMessage, WireRecorder};

pub const PK: &str = "pk1";

pub async fn platform(dir: &Path, broker: BrokerChoice, http: SocketAddr) -> Platform {
    let mut config = PlatformConfig::new(dir);
    config.http_addr = http;
    config.broker = broker;
    // These tests play every device on one recorder connection (a
    // superuser's view of `/sys/#`): the open broker. Credentials and
    // topic rules have their own tests (tests/auth.rs, broker::tests).
    config.mqtt_anonymous = true;
    Platform::start(config).await.expect("platform starts")
}

/// A platform on the embedded broker as it ships: only registered devices
/// get in ([`Platform::register_devices`]).
pub async fn secure_platform(dir: &Path) -> Platform {
    let mut config = PlatformConfig::new(dir);
    config.http_addr = any_port();
    config.broker = embedded();
    Platform::start(config).await.expect("platform starts")
}

pub fn embedded() -> BrokerChoice {
    BrokerChoice::Embedded(([127, 0, 0, 1], 0).into())
}

pub fn any_port() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

pub fn api(p: &Platform) -> ApiClient {
    p.client().unwrap()
}

/// A recorder that plays scripted devices of product `PK`.
pub async fn wire(url: &str) -> WireRecorder {
    let url = url.to_owned();
    let w = tokio::task::spawn_blocking(move || WireRecorder::connect(&url, "/sys/#"))
        .await
        .unwrap();
    assert!(w.wait_ready_async(Duration::from_secs(10)).await);
    w
}

pub fn topics(dev: &str) -> Topics {
    Topics::new(PK, dev)
}

pub async fn inform(w: &WireRecorder, dev: &str, version: &str) {
    w.publish_async(&topics(dev).inform, encode_inform("1", version), true)
        .await
        .unwrap();
}

pub async fn reply(w: &WireRecorder, dev: &str, msg_id: &str, code: ReplyCode, message: &str) {
    w.publish_async(
        &topics(dev).upgrade_reply,
        encode_upgrade_reply(msg_id, code, message),
        true,
    )
    .await
    .unwrap();
}

pub async fn progress(w: &WireRecorder, dev: &str, status: Status, pct: u32, desc: &str) {
    let p = Progress {
        status,
        progress: pct,
        desc: desc.into(),
        firmware_version: "2.0.0".into(),
    };
    w.publish_async(&topics(dev).progress, encode_progress("2", &p), true)
        .await
        .unwrap();
}

/// Waits for the `n`th upgrade command to `dev` (1-based).
pub async fn command(w: &WireRecorder, dev: &str, n: usize, timeout: Duration) -> WireMessage {
    let topic = topics(dev).upgrade;
    let got = w.wait_count_async(|m| m.topic == topic, n, timeout).await;
    assert!(
        got.len() >= n,
        "expected {n} commands to {dev}, got {}: {}",
        got.len(),
        w.summary()
    );
    got[n - 1].clone()
}

/// Waits until the platform lists `n` devices of `PK` (SDK devices inform on
/// connecting).
pub async fn listed(api: &ApiClient, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    // Informed (a registered device is listed before it informs).
    let informed = |d: &Vec<iot_ota_platform::api::DeviceView>| {
        d.iter().filter(|d| !d.version.is_empty()).count()
    };
    while informed(&api.list_devices(Some(PK)).await.unwrap()) < n {
        assert!(Instant::now() < deadline, "devices never informed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Makes devices known at `version` and waits until the platform lists them.
pub async fn known(w: &WireRecorder, api: &ApiClient, devs: &[&str], version: &str) {
    for d in devs {
        inform(w, d, version).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = api.list_devices(Some(PK)).await.unwrap();
        if devs
            .iter()
            .all(|d| list.iter().any(|x| x.device == *d && x.version == version))
        {
            return;
        }
        assert!(Instant::now() < deadline, "devices not known: {list:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn wait_batch(
    api: &ApiClient,
    id: i64,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&BatchView) -> bool,
) -> BatchView {
    let deadline = Instant::now() + timeout;
    loop {
        let b = api.show_batch(id).await.unwrap();
        if pred(&b) {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {b:#?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn record<'a>(b: &'a BatchView, dev: &str) -> &'a iot_ota_platform::api::RecordView {
    b.records
        .iter()
        .find(|r| r.device == dev)
        .unwrap_or_else(|| panic!("no record for {dev}"))
}

pub fn quick_batch(devices: Option<Vec<&str>>) -> CreateBatch {
    CreateBatch {
        product: PK.into(),
        firmware_version: "2.0.0".into(),
        devices: devices.map(|d| d.into_iter().map(String::from).collect()),
        ack_timeout_secs: Some(1.0),
        timeout_secs: Some(30.0),
        validity_secs: Some(120.0),
        ..CreateBatch::default()
    }
}
