//! Only registered devices use the embedded broker, each its own topics:
//! tried as an outsider, and as one device against another.

mod common;

use std::time::Duration;

use common::*;
use iot_ota_core::protocol::encode_inform;
use iot_ota_core::Topics;
use iot_ota_testkit::TempDir;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};

fn mqtt(
    p: &iot_ota_platform::Platform,
    id: &str,
    login: Option<(&str, &str)>,
) -> (AsyncClient, EventLoop) {
    let url = iot_ota_core::BrokerUrl::parse(p.broker_url()).unwrap();
    let mut opts = MqttOptions::new(id, url.host, url.port);
    opts.set_keep_alive(Duration::from_secs(5));
    if let Some((u, pw)) = login {
        opts.set_credentials(u, pw);
    }
    AsyncClient::new(opts, 64)
}

/// Polls until CONNACK (Ok) or a refusal (Err).
async fn connect(el: &mut EventLoop) -> Result<(), ConnectionError> {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await? {
                return Ok(());
            }
        }
    })
    .await
    .expect("the broker answers")
}

fn refused(r: Result<(), ConnectionError>) -> bool {
    matches!(
        r,
        Err(ConnectionError::ConnectionRefused(
            rumqttc::ConnectReturnCode::NotAuthorized
        ))
    )
}

/// Keeps polling in the background (acks, pings); returns the packets seen.
fn pump(mut el: EventLoop) -> tokio::sync::mpsc::UnboundedReceiver<Result<Packet, String>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(p)) => {
                    if tx.send(Ok(p)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_and_other_devices_cannot_read_or_forge() {
    let dir = TempDir::new("auth");
    let p = secure_platform(&dir.join("platform")).await;
    let api = api(&p);
    // Registered through the API (as `iot-ota device add` does).
    let reg = api
        .register_devices(PK, &["dev1".into(), "dev2".into()])
        .await
        .unwrap();
    let (s1, s2) = (reg.devices[0].secret.clone(), reg.devices[1].secret.clone());
    assert_eq!(reg.devices[0].username, format!("{PK}/dev1"));

    // No credentials, wrong ones, another's name: CONNACK 5.
    let (_c, mut el) = mqtt(&p, "x1", None);
    assert!(refused(connect(&mut el).await));
    let (_c, mut el) = mqtt(&p, "x2", Some((&format!("{PK}/dev1"), "wrong")));
    assert!(refused(connect(&mut el).await));
    let (_c, mut el) = mqtt(&p, "x3", Some((&format!("{PK}/dev1"), &s2)));
    assert!(refused(connect(&mut el).await));

    let mut seen1 = one_device_cannot_read_or_forge_for_another(&p, &s1, &s2, true).await;
    let stats = api.stats().await.unwrap().broker.unwrap();
    assert!(stats.refused_publishes >= 1, "{stats:?}");
    assert!(stats.refused_subscribes >= 2, "{stats:?}");
    assert!(stats.refused_connects >= 3, "{stats:?}");

    // Revoked: its connection is closed and it cannot come back.
    api.revoke_device(PK, "dev1").await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match seen1.recv().await {
                Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the revoked device's connection was closed");
    let (_c, mut el) = mqtt(&p, "d1", Some((&format!("{PK}/dev1"), &s1)));
    assert!(refused(connect(&mut el).await), "revoked");
    let devices = api.list_devices(Some(PK)).await.unwrap();
    let dev1 = devices.iter().find(|d| d.device == "dev1").unwrap();
    assert_eq!(dev1.credential.as_deref(), Some("revoked"));
    assert_eq!(api.revoke_device(PK, "dev1").await.unwrap_err().status, 404);
    p.shutdown().await;
}

/// dev1 (secret `s1`) informs and gets its command; dev2 (`s2`) can read
/// neither dev1's commands nor everything, and its forged inform of the
/// target for dev1 changes no record. Returns what dev1's connection sees.
async fn one_device_cannot_read_or_forge_for_another(
    p: &iot_ota_platform::Platform,
    s1: &str,
    s2: &str,
    refuses_subscribe: bool,
) -> tokio::sync::mpsc::UnboundedReceiver<Result<Packet, String>> {
    let api = api(p);
    // dev1 informs 1.0.0 and waits for commands.
    let t1 = Topics::new(PK, "dev1");
    let (d1, mut el1) = mqtt(p, "d1", Some((&format!("{PK}/dev1"), s1)));
    connect(&mut el1).await.unwrap();
    d1.subscribe(&t1.upgrade, QoS::AtLeastOnce).await.unwrap();
    d1.publish(
        &t1.inform,
        QoS::AtLeastOnce,
        false,
        encode_inform("1", "1.0.0"),
    )
    .await
    .unwrap();
    let mut seen1 = pump(el1);
    listed(&api, 1).await;

    // dev2 tries to read dev1's commands: refused (0x80).
    let (d2, mut el2) = mqtt(p, "d2", Some((&format!("{PK}/dev2"), s2)));
    connect(&mut el2).await.unwrap();
    d2.subscribe(&t1.upgrade, QoS::AtLeastOnce).await.unwrap();
    d2.subscribe("/sys/#", QoS::AtLeastOnce).await.unwrap();
    let mut seen2 = pump(el2);
    let mut codes = Vec::new();
    while codes.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), seen2.recv()).await {
            Ok(Some(Ok(Packet::SubAck(a)))) => codes.extend(a.return_codes),
            Ok(Some(Ok(_))) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }
    // The embedded broker refuses them (0x80); Mosquitto 2.0 grants them
    // and delivers nothing through them: either way dev2 reads nothing
    // (checked below).
    if refuses_subscribe {
        assert!(
            codes
                .iter()
                .all(|c| *c == rumqttc::SubscribeReasonCode::Failure),
            "{codes:?}"
        );
    }

    // A batch upgrades dev1; dev2 forges dev1's inform of the target.
    let _fw = api
        .add_firmware(
            PK,
            "2.0.0",
            "fw.bin",
            &iot_ota_testkit::random_bytes(1000, 1),
        )
        .await
        .unwrap();
    let id = api
        .create_batch(&quick_batch(Some(vec!["dev1"])))
        .await
        .unwrap()
        .batch
        .id;
    // dev1 gets its command; dev2 does not.
    let command = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(Ok(Packet::Publish(p))) = seen1.recv().await {
                return p;
            }
        }
    })
    .await
    .expect("dev1's command");
    assert_eq!(command.topic, t1.upgrade);
    d2.publish(
        &t1.inform,
        QoS::AtLeastOnce,
        false,
        encode_inform("9", "2.0.0"),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(m) = seen2.try_recv() {
        assert!(
            !matches!(m, Ok(Packet::Publish(_))),
            "dev2 read something: {m:?}"
        );
    }
    let b = api.show_batch(id).await.unwrap();
    let r = b.records.iter().find(|r| r.device == "dev1").unwrap();
    assert_ne!(r.state, "success", "a forged inform made a success: {r:?}");
    let devices = api.list_devices(Some(PK)).await.unwrap();
    let dev1 = devices.iter().find(|d| d.device == "dev1").unwrap();
    assert_eq!(dev1.version, "1.0.0", "the forged inform changed nothing");
    seen1
}

/// The same rules on Mosquitto, set up as docs/platform-api.md shows: its
/// own password file (the devices' secrets from `iot-ota device add`, the
/// platform's user) and one ACL pattern for every device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_with_its_password_file_and_acl_pattern_does_the_same() {
    use iot_ota_platform::credentials::{make_secret, PLATFORM_USER};
    let (s1, s2, plat) = (
        make_secret().unwrap(),
        make_secret().unwrap(),
        make_secret().unwrap(),
    );
    let broker = match iot_ota_testkit::MosquittoOptions::new()
        .auth(PLATFORM_USER, &plat)
        .auth(&format!("{PK}/dev1"), &s1)
        .auth(&format!("{PK}/dev2"), &s2)
        .acl(&format!(
            "user {PLATFORM_USER}\ntopic readwrite /sys/#\n\npattern readwrite /sys/%u/#\n"
        ))
        .start()
    {
        Ok(b) => b,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let dir = TempDir::new("auth-mosquitto");
    let mut config = iot_ota_platform::PlatformConfig::new(dir.join("platform"));
    config.http_addr = any_port();
    config.broker = iot_ota_platform::BrokerChoice::External(broker.url());
    config.mqtt_username = Some(PLATFORM_USER.into());
    config.mqtt_password = Some(plat.clone());
    let p = iot_ota_platform::Platform::start(config).await.unwrap();
    // A wrong secret is refused by Mosquitto too (its code for it is 5).
    let (_c, mut el) = mqtt(&p, "x", Some((&format!("{PK}/dev1"), &s2)));
    assert!(connect(&mut el).await.is_err());
    let _seen = one_device_cannot_read_or_forge_for_another(&p, &s1, &s2, false).await;
    p.shutdown().await;
}
