//! The real Mosquitto, driven through the wire recorder.

use std::io;
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use iot_ota_testkit::{Mosquitto, MosquittoOptions, RecorderOptions, TestCa, WireRecorder};

const WAIT: Duration = Duration::from_secs(5);

/// Publishes a JSON message and checks that the recorder sees it.
fn round_trip(wire: &WireRecorder, topic: &str, version: &str) {
    let payload =
        format!(r#"{{"msgId":"1","version":"1.0","data":{{"firmwareVersion":"{version}"}}}}"#);
    wire.publish(topic, payload, true).expect("publish");
    let got = wire
        .wait_for(
            |m| m.json_str("data.firmwareVersion").as_deref() == Some(version),
            WAIT,
        )
        .unwrap_or_else(|| panic!("not received; got:\n{}", wire.summary()));
    assert_eq!(got.topic, topic);
    assert_eq!(got.qos, 1);
}

#[test]
fn broker_starts_and_recorder_records() {
    let broker = Mosquitto::start();
    assert_eq!(broker.url(), format!("mqtt://127.0.0.1:{}", broker.port()));
    let wire = WireRecorder::connect(&broker.url(), "/sys/#");
    assert!(wire.is_connected());

    round_trip(&wire, "/sys/pk/dev/ota/firmware/inform", "2.0.1");
    wire.publish("/sys/pk/dev/raw", "not json", false).unwrap();
    let raw = wire
        .wait_for_topic("/sys/pk/dev/raw", WAIT)
        .expect("QoS 0 message");
    assert_eq!(raw.json, None);
    assert_eq!(raw.payload_str(), Some("not json"));
    // Outside the filter: not recorded.
    wire.publish("/other/topic", "x", true).unwrap();
    wire.publish("/sys/pk/dev/last", "{}", true).unwrap();
    assert!(wire.wait_for_topic("/sys/pk/dev/last", WAIT).is_some());
    assert!(wire.messages().iter().all(|m| m.topic.starts_with("/sys/")));

    let all = wire.wait_count(|m| m.topic.starts_with("/sys/pk/dev/"), 3, WAIT);
    assert_eq!(all.len(), 3);
    assert_eq!(
        wire.wait_count(|_| true, 4, Duration::from_millis(50))
            .len(),
        3
    );
    wire.clear();
    assert!(wire.messages().is_empty());
}

#[test]
fn extra_subscription_is_acknowledged() {
    let broker = Mosquitto::start();
    let wire = WireRecorder::connect(&broker.url(), "/sys/#");
    wire.subscribe("/ext/+").unwrap();
    wire.publish("/ext/a", "{}", true).unwrap();
    assert!(wire.wait_for_topic("/ext/a", WAIT).is_some());
}

#[test]
fn restart_keeps_the_port_and_the_recorder_comes_back() {
    let mut broker = Mosquitto::start();
    let port = broker.port();
    let first_pid = broker.pid();
    let wire = WireRecorder::connect(&broker.url(), "/sys/#");

    broker.stop();
    assert!(!broker.is_running());
    assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err());

    broker.restart();
    assert!(broker.is_running());
    assert_eq!(broker.port(), port);
    assert_ne!(broker.pid(), first_pid);
    assert!(wire.wait_ready(WAIT), "recorder did not resubscribe");
    round_trip(&wire, "/sys/pk/dev/ota/firmware/progress", "3.0.0");
    assert!(!broker.log().is_empty());
}

#[tokio::test]
async fn async_waits_do_not_block_the_runtime() {
    let broker = Mosquitto::start();
    let wire = WireRecorder::connect(&broker.url(), "/sys/#");
    let waiting = wire.wait_for_async(|m| m.topic == "/sys/a", WAIT);
    let publishing = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        wire.publish_async("/sys/a", r#"{"n":1}"#, true)
            .await
            .unwrap();
    };
    let (got, ()) = tokio::join!(waiting, publishing);
    assert_eq!(got.unwrap().json_i64("n"), Some(1));
    let two = wire.wait_count_async(|m| m.topic == "/sys/a", 2, Duration::from_millis(50));
    assert_eq!(two.await.len(), 1);
    assert!(wire.wait_ready_async(WAIT).await);
}

#[test]
fn tls_broker() {
    let ca = TestCa::new();
    let broker = Mosquitto::start_tls(&ca);
    assert_eq!(broker.url(), format!("mqtts://localhost:{}", broker.port()));
    let wire =
        WireRecorder::connect_with(&broker.url(), &["/sys/#"], RecorderOptions::trusting(&ca))
            .expect("TLS connect");
    round_trip(&wire, "/sys/pk/dev/ota/firmware/inform", "1.2.3");

    // An mqtts URL without a TLS config is a usage error, not a hang.
    let err = WireRecorder::connect_with(&broker.url(), &["#"], RecorderOptions::default());
    assert_eq!(
        err.err().map(|e| e.kind()),
        Some(io::ErrorKind::InvalidInput)
    );
}

#[test]
fn mutual_tls_broker() {
    let ca = TestCa::new();
    let broker = MosquittoOptions::new()
        .tls(&ca)
        .require_client_cert()
        .start()
        .unwrap();
    let client = ca.client_cert("dev1");
    let options = RecorderOptions {
        tls: Some(ca.client_config_with_cert(&client)),
        ..RecorderOptions::default()
    };
    let wire = WireRecorder::connect_with(&broker.url(), &["/sys/#"], options).unwrap();
    round_trip(&wire, "/sys/pk/dev1/ota/firmware/inform", "1.0.0");

    let no_cert = RecorderOptions {
        connect_timeout: Some(Duration::from_millis(500)),
        ..RecorderOptions::trusting(&ca)
    };
    assert!(WireRecorder::connect_with(&broker.url(), &["#"], no_cert).is_err());
}

#[test]
fn password_auth() {
    let broker = match Mosquitto::start_with_auth("device", "s3cret") {
        Ok(broker) => broker,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            eprintln!("skipped: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let good = RecorderOptions::default().credentials("device", "s3cret");
    let wire = WireRecorder::connect_with(&broker.url(), &["/sys/#"], good).unwrap();
    round_trip(&wire, "/sys/pk/dev/ota/firmware/inform", "4.0.0");

    for bad in [
        RecorderOptions::default(),
        RecorderOptions::default().credentials("device", "wrong"),
    ] {
        let bad = RecorderOptions {
            connect_timeout: Some(Duration::from_millis(500)),
            ..bad
        };
        let err = WireRecorder::connect_with(&broker.url(), &["#"], bad)
            .err()
            .expect("refused");
        eprintln!("refused as expected: {err}");
        assert!(err.to_string().contains("refused"), "{err}");
    }
}
