//! End to end with the real device SDK: the same upgrade through the embedded
//! broker, through Mosquitto, and through Mosquitto over TLS.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use iot_ota_device::{Config, OtaClient, Status};
use iot_ota_platform::{BrokerChoice, PlatformConfig};
use iot_ota_testkit::{random_bytes, Mosquitto, TempDir, TestCa};

/// An SDK device that installs every accepted command and informs the new version.
async fn device(config: Config, dir: &Path) -> tokio::task::JoinHandle<()> {
    let (client, mut upgrades) = OtaClient::connect(config).await.expect("device connects");
    let dir = dir.to_owned();
    tokio::spawn(async move {
        while let Some(cmd) = upgrades.next().await {
            let path = dir.join(format!("fw-{}.bin", cmd.firmware.version));
            if client.download(&cmd).download_to(&path).await.is_err() {
                continue;
            }
            client.report_progress(Status::Upgrading, 50, "").unwrap();
            client.report_progress(Status::Success, 100, "").unwrap();
            client.report_version(&cmd.firmware.version).unwrap();
        }
    })
}

async fn upgrade(
    platform_config: PlatformConfig,
    device_config: impl Fn(&str, &str) -> Config,
    dir: &TempDir,
) {
    let p = iot_ota_platform::Platform::start(platform_config)
        .await
        .expect("platform starts");
    let broker = p.broker_url().to_owned();
    let api = api(&p);
    let image = random_bytes(1_500_000, 42);
    let fw = api
        .add_firmware(PK, "2.0.0", "fw.bin", &image)
        .await
        .unwrap();
    assert!(fw.url.starts_with(p.public_url()), "{}", fw.url);
    let mut tasks = Vec::new();
    // Registered: the embedded broker admits them with their secrets (an
    // external broker here lets anyone in, and ignores them).
    let names = ["sdk-a".to_owned(), "sdk-b".to_owned()];
    let creds = p.register_devices(PK, &names).unwrap();
    for (name, cred) in names.iter().zip(creds) {
        let out = dir.join(name);
        std::fs::create_dir_all(&out).unwrap();
        let config = device_config(&broker, name)
            .username(cred.username)
            .password(cred.secret);
        tasks.push(device(config, &out).await);
    }
    // Both informed 1.0.0 on connecting.
    listed(&api, 2).await;
    let mut req = quick_batch(None);
    req.sign_method = Some("sha256".into());
    let id = api.create_batch(&req).await.unwrap().batch.id;
    let b = wait_batch(&api, id, "completed", Duration::from_secs(30), |b| {
        b.state != "in_progress"
    })
    .await;
    assert_eq!(b.state, "completed");
    for name in ["sdk-a", "sdk-b"] {
        let r = record(&b, name);
        assert_eq!(
            (r.state.as_str(), r.version.as_deref(), r.attempts),
            ("success", Some("2.0.0"), 1),
            "{r:?}"
        );
        let written = std::fs::read(dir.join(name).join("fw-2.0.0.bin")).unwrap();
        assert!(written == image, "{name}: the installed image differs");
    }
    for t in tasks {
        t.abort();
    }
    p.shutdown().await;
}

fn platform_config(dir: &TempDir, broker: BrokerChoice) -> PlatformConfig {
    let mut c = PlatformConfig::new(dir.join("platform"));
    c.http_addr = any_port();
    c.broker = broker;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_upgrade_through_the_embedded_broker() {
    let dir = TempDir::new("sdk-embedded");
    upgrade(
        platform_config(&dir, embedded()),
        |broker, name| Config::new(broker, PK, name, "1.0.0").unwrap(),
        &dir,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_upgrade_through_mosquitto() {
    let m = Mosquitto::start();
    let dir = TempDir::new("sdk-mosquitto");
    let url = m.url();
    upgrade(
        platform_config(&dir, BrokerChoice::External(url)),
        |broker, name| Config::new(broker, PK, name, "1.0.0").unwrap(),
        &dir,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_upgrade_through_mosquitto_over_tls() {
    let ca = TestCa::new();
    let m = Mosquitto::start_tls(&ca);
    let dir = TempDir::new("sdk-tls");
    let ca_file = ca.write_ca(dir.path());
    let url = m.url();
    assert!(url.starts_with("mqtts://"));
    let mut config = platform_config(&dir, BrokerChoice::External(url));
    config.ca_file = Some(ca_file.clone());
    upgrade(
        config,
        |broker, name| {
            Config::new(broker, PK, name, "1.0.0")
                .unwrap()
                .ca_file(ca_file.clone())
        },
        &dir,
    )
    .await;
}

/// A platform that also serves HTTPS, with a certificate of `ca` for
/// localhost: its config, the CA file and the HTTPS port.
fn https_platform(ca: &TestCa, dir: &TempDir) -> (PlatformConfig, std::path::PathBuf, u16) {
    let ca_file = ca.write_ca(dir.path());
    let (cert, key) = ca.write_server_cert(dir.path());
    let port = iot_ota_testkit::free_port();
    let mut config = platform_config(dir, embedded());
    config.https_addr = Some(([127, 0, 0, 1], port).into());
    config.tls_cert = Some(cert);
    config.tls_key = Some(key);
    (config, ca_file, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_upgrade_with_firmware_over_https() {
    let ca = TestCa::new();
    let dir = TempDir::new("sdk-https");
    let (mut config, ca_file, port) = https_platform(&ca, &dir);
    // The certificate names localhost.
    config.public_url = Some(format!("https://localhost:{port}"));
    upgrade(
        config,
        |broker, name| {
            Config::new(broker, PK, name, "1.0.0")
                .unwrap()
                .ca_file(ca_file.clone())
        },
        &dir,
    )
    .await;
}

/// The API client over the platform's own `--https` (a private CA): reads,
/// and with the token, writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_client_speaks_https() {
    let ca = TestCa::new();
    let dir = TempDir::new("sdk-api-https");
    let (config, ca_file, port) = https_platform(&ca, &dir);
    let p = iot_ota_platform::Platform::start(config).await.unwrap();
    let url = format!("https://localhost:{port}");
    let api = iot_ota_platform::ApiClient::new(&url)
        .unwrap()
        .with_ca_file(&ca_file)
        .unwrap()
        .with_token(p.api_token());
    assert_eq!(api.health().await.unwrap()["ok"], true);
    let fw = api
        .add_firmware(
            PK,
            "2.0.0",
            "fw.bin",
            &iot_ota_testkit::random_bytes(5000, 3),
        )
        .await
        .unwrap();
    assert_eq!(fw.size, 5000);
    assert_eq!(api.list_firmware(None).await.unwrap().len(), 1);
    // Without the CA, the platform's certificate is not trusted.
    let stranger = iot_ota_platform::ApiClient::new(&url).unwrap();
    let e = stranger.health().await.unwrap_err();
    assert!(e.message.contains("TLS"), "{e}");
    p.shutdown().await;
}

/// Each upload gets its chunk index: served beside the image, named by the
/// firmware's `index_sha256`, and it covers the image chunk by chunk. The
/// platform's firmware server answers the Range requests a delta makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_gets_a_chunk_index_served_beside_it() {
    use iot_ota_core::delta::{sha256, Index};
    use iot_ota_device::http::{Body, HttpOptions};
    let dir = TempDir::new("index");
    let p = secure_platform(&dir.join("platform")).await;
    let api = api(&p);
    let image = random_bytes(1_500_000, 3);
    let fw = api
        .add_firmware(PK, "2.0.0", "fw.bin", &image)
        .await
        .unwrap();
    let expected = fw.index_sha256.clone().expect("an index");
    let read_all = |url: String, range: Option<(u64, u64)>| async move {
        let opts = HttpOptions::default();
        let mut body = match range {
            Some((a, b)) => Body::open_range(&url, a, b, &opts).await.unwrap(),
            None => Body::open(&url, 0, &opts).await.unwrap(),
        };
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = body.read(&mut buf).await.unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    };
    let bytes = read_all(format!("{}.idx", fw.url), None).await;
    assert_eq!(
        iot_ota_core::digest::digest_hex(iot_ota_core::SignMethod::Sha256, &bytes),
        expected
    );
    let index = Index::parse(&bytes).unwrap();
    assert_eq!(index.size, image.len() as u64);
    // A chunk from the middle, by Range, is the one the index names.
    let c = index.chunks[index.chunks.len() / 2];
    let got = read_all(fw.url.clone(), Some((c.offset, c.end() - 1))).await;
    assert_eq!(sha256(&got), c.sha256);
    assert!(got == image[c.offset as usize..c.end() as usize]);
    let stats = api.stats().await.unwrap();
    assert_eq!(stats.firmware_requests, 2);
    assert_eq!(
        stats.firmware_bytes_served,
        bytes.len() as u64 + u64::from(c.len)
    );
}
