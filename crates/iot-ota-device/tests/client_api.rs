//! The async API against a real Mosquitto and HTTP server: rejections on the
//! wire, fetch_yield, resume, get, and a broker restart.

mod common;

use std::time::Duration;

use common::*;
use iot_ota_core::digest::{digest_hex, SignMethod};
use iot_ota_device::{Config, Error, FetchState, OtaClient, Status, Upgrades};
use iot_ota_testkit::{random_bytes, Route};
use serde_json::json;

async fn connect(rig: &Rig, dev: &str) -> (OtaClient, Upgrades) {
    let config = Config::new(&rig.broker.url(), PK, dev, "1.0.0")
        .unwrap()
        .idle_timeout(Duration::from_millis(500))
        .get_timeout(Duration::from_secs(1));
    let pair = OtaClient::connect(config).await.expect("connect");
    rig.wire
        .wait_for_async(|m| m.topic == rig.topic(dev, "inform"), WAIT)
        .await
        .expect("inform at connect");
    pair
}

fn good_data() -> serde_json::Value {
    json!({"policy": "standard", "size": 10, "firmwareVersion": "2.0",
           "url": "http://127.0.0.1:1/f", "sign": "9e107d9d372bb6826bd81d3542a419d6", "signMethod": "Md5"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_is_replied_and_reported() {
    let rig = rig();
    let (_client, _upgrades) = connect(&rig, "x1").await;
    let mut data_cases: Vec<(serde_json::Value, u16, &str)> = Vec::new();
    for field in ["size", "firmwareVersion", "url", "sign", "signMethod"] {
        let mut d = good_data();
        d.as_object_mut().unwrap().remove(field);
        data_cases.push((
            d,
            400,
            Box::leak(format!("missing field {field}").into_boxed_str()),
        ));
    }
    let with = |k: &str, v: serde_json::Value| {
        let mut d = good_data();
        d[k] = v;
        d
    };
    data_cases.extend([
        (with("size", json!(-1)), 400, "size must not be negative"),
        (with("size", json!(0)), 400, "size must not be zero"),
        (with("size", json!("10")), 400, "size must be an integer"),
        (
            with("firmwareVersion", json!("")),
            400,
            "firmwareVersion is empty",
        ),
        (
            with("url", json!("ftp://127.0.0.1/f")),
            400,
            "url scheme must be http or https, not ftp",
        ),
        (
            with("sign", json!("abc")),
            400,
            "sign must be a 32-character hex MD5 digest",
        ),
        (
            with("signMethod", json!("crc32")),
            412,
            "signMethod \"crc32\" is not supported",
        ),
        (
            with("policy", json!("whenever")),
            400,
            "policy must be standard or silent",
        ),
    ]);
    for (i, (data, code, message)) in data_cases.iter().enumerate() {
        rig.wire.clear();
        let id = format!("r{i}");
        rig.push(
            "x1",
            json!({"msgId": id, "version": "1.0", "data": data}).to_string(),
        );
        let reply = rig.expect("x1", "upgrade_reply", |_| true);
        assert_eq!(reply.json_str("msgId").as_deref(), Some(id.as_str()));
        assert_eq!(reply.json_i64("code"), Some(i64::from(*code)), "{data}");
        let got = reply.json_str("message").unwrap();
        assert!(got.starts_with(message), "{data}: {got}");
        let report = rig.expect("x1", "progress", |_| true);
        assert_eq!(report.json_i64("data.status"), Some(-1));
        assert_eq!(report.json_str("data.desc"), Some(got));
    }
    // Malformed JSON: no msgId to echo, still a 400 and a report.
    rig.wire.clear();
    rig.push("x1", "{not json");
    let reply = rig.expect("x1", "upgrade_reply", |_| true);
    assert_eq!(reply.json_i64("code"), Some(400));
    assert_eq!(reply.json_str("msgId").as_deref(), Some(""));
    assert!(reply
        .json_str("message")
        .unwrap()
        .contains("not valid JSON"));
    rig.expect("x1", "progress", |m| m.json_i64("data.status") == Some(-1));
}

/// Device policy refusals with their 412: a `size` the download directory
/// cannot hold (measured before each command), and an http:// URL on a
/// device that requires https.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_what_cannot_fit_and_plain_http_when_https_is_required() {
    let rig = rig();
    let config = Config::new(&rig.broker.url(), PK, "x2", "1.0.0")
        .unwrap()
        .max_firmware_size(u64::MAX)
        .download_dir(rig.dir.path())
        .require_https(true);
    let (_client, _upgrades) = OtaClient::connect(config).await.expect("connect");
    rig.wire
        .wait_for_async(|m| m.topic == rig.topic("x2", "inform"), WAIT)
        .await
        .expect("inform");
    let cases = [
        (
            "h1",
            json!("https://127.0.0.1:1/f"),
            json!(1u64 << 60),
            "does not fit",
        ),
        (
            "h2",
            json!("http://127.0.0.1:1/f"),
            json!(10),
            "requires https",
        ),
    ];
    for (id, url, size, message) in cases {
        let mut data = good_data();
        data["url"] = url;
        data["size"] = size;
        rig.push(
            "x2",
            json!({"msgId": id, "version": "1.0", "data": data}).to_string(),
        );
        let reply = rig
            .wire
            .wait_for_async(
                |m| {
                    m.topic == rig.topic("x2", "upgrade_reply")
                        && m.json_str("msgId").as_deref() == Some(id)
                },
                WAIT,
            )
            .await
            .expect("a reply");
        assert_eq!(reply.json_i64("code"), Some(412));
        let got = reply.json_str("message").unwrap();
        assert!(got.contains(message), "{got}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_msg_id_and_spaced_keys() {
    let rig = rig();
    let (_client, mut upgrades) = connect(&rig, "x2").await;
    let payload = json!({"msgId ": 123, "version": "1.0", "data ": good_data()}).to_string();
    rig.push("x2", payload);
    let cmd = tokio::time::timeout(WAIT, upgrades.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cmd.msg_id, "123");
    assert_eq!(cmd.firmware.version, "2.0");
    let reply = rig.expect("x2", "upgrade_reply", |_| true);
    assert_eq!(
        reply.json,
        Some(json!({"msgId": "123", "code": 200, "message": "success"}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_yield_states_timeouts_and_end() {
    let rig = rig();
    let body = random_bytes(60_000, 21);
    let url = rig.files.add("/s.bin", Route::stall(body.clone(), 20_000));
    let (client, mut upgrades) = connect(&rig, "y1").await;
    rig.push("y1", command("1", "2.0", &url, &body, SignMethod::Md5));
    let cmd = upgrades.next().await.unwrap();
    let mut dl = client.download(&cmd);
    assert_eq!(dl.state(), FetchState::Fetching);
    let mut buf = vec![0u8; 5000];
    let mut got = Vec::new();
    // Read until the stall: then a short timeout yields Timeout, not an error.
    loop {
        match dl.fetch_yield(&mut buf, Duration::from_millis(200)).await {
            Ok(n) => {
                assert!(n > 0 && n <= 5000);
                got.extend_from_slice(&buf[..n]);
            }
            Err(Error::Timeout) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(got.len(), 20_000);
    assert_eq!(dl.fetched_size(), 20_000);
    assert_eq!(dl.file_size(), Some(60_000));
    assert!(dl.is_fetching());
    // Unstall: the idle timeout (500 ms) breaks the transfer and it resumes with Range.
    rig.files.set("/s.bin", Route::file(body.clone()));
    loop {
        match dl.fetch_yield(&mut buf, Duration::from_secs(1)).await {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(Error::Timeout) => {}
            Err(e) => panic!("{e}"),
        }
        if dl.is_finished() {
            assert_eq!(
                dl.fetch_yield(&mut buf, Duration::from_secs(1))
                    .await
                    .unwrap(),
                0
            );
            break;
        }
    }
    assert_eq!(got, body);
    assert_eq!(dl.state(), FetchState::Fetched);
    assert_eq!(dl.digest_hex(), digest_hex(SignMethod::Md5, &body));
    let ranges = rig.files.ranges();
    assert_eq!(ranges, vec!["bytes=20000-".to_owned()]);
    rig.expect("y1", "progress", |m| m.json_i64("data.status") == Some(2));
    // After the end every call returns 0.
    assert!(matches!(
        dl.fetch_yield(&mut [], Duration::from_secs(1)).await,
        Ok(0)
    ));
}

/// A response head slower than each call's timeout: the calls time out, the
/// one request goes on, and the download completes with a single GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_yield_keeps_a_slow_request_across_calls() {
    let rig = rig();
    let body = random_bytes(50_000, 23);
    let url = rig.files.add(
        "/late.bin",
        Route::delayed(body.clone(), Duration::from_millis(1_500)),
    );
    // The default idle timeout (30 s): the head's wait is bounded by it.
    let config = Config::new(&rig.broker.url(), PK, "y3", "1.0.0").unwrap();
    let (client, mut upgrades) = OtaClient::connect(config).await.expect("connect");
    rig.wire
        .wait_for_async(|m| m.topic == rig.topic("y3", "inform"), WAIT)
        .await
        .expect("inform at connect");
    rig.push("y3", command("1", "2.0", &url, &body, SignMethod::Md5));
    let cmd = upgrades.next().await.unwrap();
    let mut dl = client.download(&cmd);
    let mut buf = vec![0u8; 5000];
    let (mut got, mut timeouts) = (Vec::new(), 0);
    let deadline = std::time::Instant::now() + WAIT;
    while !dl.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "no end after {timeouts} timeouts: is the request restarted by each timeout?"
        );
        match dl.fetch_yield(&mut buf, Duration::from_millis(200)).await {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(Error::Timeout) => timeouts += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(got, body);
    assert!(timeouts >= 3, "{timeouts} timeouts");
    let gets = rig
        .files
        .requests()
        .into_iter()
        .filter(|r| r.path == "/late.bin")
        .count();
    assert_eq!(gets, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_to_resumes_after_a_stall() {
    let rig = rig();
    let body = random_bytes(400_000, 22);
    let url = rig.files.add("/r.bin", Route::stall(body.clone(), 150_000));
    let (client, mut upgrades) = connect(&rig, "y2").await;
    rig.push("y2", command("1", "2.0", &url, &body, SignMethod::Sha256));
    let cmd = upgrades.next().await.unwrap();
    let files = &rig.files;
    // Swap the route once the first request is in, so the resume gets the rest.
    let swap = async {
        while files.requests().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        files.set("/r.bin", Route::file(body.clone()));
    };
    let path = rig.dir.path().join("fw.bin");
    let (res, ()) = tokio::join!(client.download(&cmd).download_to(&path), swap);
    let verified = res.expect("download");
    assert_eq!(verified.size, 400_000);
    assert_eq!(std::fs::read(&path).unwrap(), body);
    let last = rig.files.requests().last().unwrap().range.clone().unwrap();
    assert!(last.starts_with("bytes=") && last != "bytes=0-", "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_firmware_info_success_404_and_timeout() {
    let rig = rig();
    let (client, _upgrades) = connect(&rig, "q1").await;
    let reply_topic = rig.topic("q1", "get_reply");
    let wire = &rig.wire;
    let platform = async {
        for answer in ["found", "missing"] {
            let get = wire
                .wait_for_async(|m| m.topic.ends_with("/get"), WAIT)
                .await
                .expect("get request");
            let id = get.json_str("msgId").unwrap();
            let version = get.json_str("data.firmwareVersion").unwrap();
            let payload = if answer == "found" {
                json!({"msgId": id, "version": "1.0", "data": {"firmwareVersion": version,
                    "url": "http://127.0.0.1:9/f", "sign": "a".repeat(64), "signMethod": "Sha256"}})
                .to_string()
                .into_bytes()
            } else {
                iot_ota_core::protocol::encode_get_not_found(&id, &version)
            };
            wire.clear();
            wire.publish_async(&reply_topic, payload, true)
                .await
                .unwrap();
        }
    };
    let asks = async {
        let found = client.get_firmware_info("2.0").await.unwrap();
        let missing = client.get_firmware_info("9.0").await.unwrap_err();
        (found, missing)
    };
    let ((found, missing), ()) = tokio::join!(asks, platform);
    assert_eq!(found.version, "2.0");
    assert_eq!(found.sign_method, SignMethod::Sha256);
    assert_eq!(found.size, None);
    match missing {
        Error::NotFound { code, message } => {
            assert_eq!(code, 404);
            assert_eq!(message, "FirmwareVersion 9.0 not existed");
        }
        e => panic!("{e}"),
    }
    // Nobody answers: a timeout after the get timeout (1 s here).
    let started = std::time::Instant::now();
    assert!(matches!(
        client.get_firmware_info("3.0").await,
        Err(Error::Timeout)
    ));
    assert!(started.elapsed() >= Duration::from_millis(900));
    // A bad version never reaches the wire.
    assert!(matches!(
        client.get_firmware_info("").await,
        Err(Error::Core(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_come_back_after_a_broker_restart() {
    let mut rig = rig();
    let (client, mut upgrades) = connect(&rig, "z1").await;
    rig.broker.restart();
    assert!(rig.wire.wait_ready_async(WAIT).await, "recorder back");
    rig.wire.clear();
    // The client reconnects and, with a clean session, re-subscribes and re-informs.
    rig.expect_inform("z1", "1.0.0");
    rig.push(
        "z1",
        json!({"msgId": "after", "version": "1.0", "data": good_data()}).to_string(),
    );
    let cmd = tokio::time::timeout(WAIT, upgrades.next())
        .await
        .expect("command after restart")
        .unwrap();
    assert_eq!(cmd.msg_id, "after");
    rig.expect("z1", "upgrade_reply", |m| m.json_i64("code") == Some(200));
    client
        .report_progress(Status::UpgradeFailed, 0, "test over")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_reported() {
    let port = iot_ota_testkit::free_port();
    let config = Config::new(&format!("mqtt://127.0.0.1:{port}"), PK, "c1", "1.0")
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    let err = OtaClient::connect(config).await.unwrap_err();
    assert!(matches!(err, Error::Mqtt(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_upgrade_does_not_leave_the_device_busy() {
    let rig = rig();
    let (client, mut upgrades) = connect(&rig, "a1").await;
    rig.push(
        "a1",
        json!({"msgId": "1", "version": "1.0", "data": good_data()}).to_string(),
    );
    let cmd = upgrades.next().await.unwrap();
    drop(client.download(&cmd));
    let report = rig.expect("a1", "progress", |m| m.json_i64("data.status") == Some(-1));
    assert_eq!(
        report.json_str("data.desc").as_deref(),
        Some("upgrade abandoned before its download started")
    );
    assert_eq!(
        report.json_str("data.firmwareVersion").as_deref(),
        Some("2.0")
    );
    rig.push(
        "a1",
        json!({"msgId": "2", "version": "1.0", "data": good_data()}).to_string(),
    );
    let reply = rig.expect("a1", "upgrade_reply", |m| {
        m.json_str("msgId").as_deref() == Some("2")
    });
    assert_eq!(reply.json_i64("code"), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_download_to_resumes_next_time() {
    let rig = rig();
    let body = random_bytes(1_000_000, 23);
    let url = rig.files.add("/c.bin", Route::stall(body.clone(), 600_000));
    let (client, mut upgrades) = connect(&rig, "a2").await;
    rig.push("a2", command("1", "2.0", &url, &body, SignMethod::Md5));
    let cmd = upgrades.next().await.unwrap();
    let path = rig.dir.path().join("c.bin");
    let part = rig.dir.path().join("c.bin.part");
    let meta = rig.dir.path().join("c.bin.part.meta");
    let cancelled = tokio::time::timeout(
        Duration::from_millis(300),
        client.download(&cmd).download_to(&path),
    )
    .await;
    assert!(
        cancelled.is_err(),
        "the stalled download cannot finish in time"
    );
    let report = rig.expect("a2", "progress", |m| m.json_i64("data.status") == Some(-2));
    assert_eq!(
        report.json_str("data.desc").as_deref(),
        Some("download cancelled")
    );
    assert!(
        !path.exists(),
        "unverified bytes never reach the final path"
    );
    // The good bytes stay, named by the firmware's digest, for a resume:
    // the blocks written (two whole 256 KiB buffers; the third, still
    // filling when the download was cancelled, never reached the disk).
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 524_288);
    assert!(std::fs::read_to_string(&meta)
        .unwrap()
        .contains(&digest_hex(SignMethod::Md5, &body)));

    // The platform retries: the download resumes from the last aligned block.
    rig.files.set("/c.bin", Route::file(body.clone()));
    rig.files.clear_requests();
    rig.push("a2", command("2", "2.0", &url, &body, SignMethod::Md5));
    let cmd = upgrades.next().await.unwrap();
    let verified = client
        .download(&cmd)
        .download_to(&path)
        .await
        .expect("resumed download");
    assert_eq!(verified.size, 1_000_000);
    assert_eq!(std::fs::read(&path).unwrap(), body);
    assert!(!part.exists() && !meta.exists());
    let ranges: Vec<_> = rig.files.requests().into_iter().map(|r| r.range).collect();
    assert_eq!(ranges, vec![Some("bytes=524288-".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_file_of_other_firmware_or_bad_data_is_not_resumed() {
    let rig = rig();
    let body = random_bytes(50_000, 24);
    let url = rig.files.add("/d.bin", Route::file(body.clone()));
    let (client, mut upgrades) = connect(&rig, "a3").await;
    let path = rig.dir.path().join("d.bin");
    // A part file left by another firmware: ignored, overwritten.
    std::fs::write(rig.dir.path().join("d.bin.part"), vec![0u8; 40_960]).unwrap();
    std::fs::write(
        rig.dir.path().join("d.bin.part.meta"),
        "Md5 00000000000000000000000000000000 50000\n",
    )
    .unwrap();
    rig.push("a3", command("1", "2.0", &url, &body, SignMethod::Md5));
    let cmd = upgrades.next().await.unwrap();
    client
        .download(&cmd)
        .download_to(&path)
        .await
        .expect("fresh download");
    assert_eq!(std::fs::read(&path).unwrap(), body);
    assert_eq!(rig.files.requests()[0].range, None);
    client.report_progress(Status::Success, 100, "").unwrap();

    // Garbage in a part file of the right firmware fails verification once,
    // and is removed, so the next attempt starts clean.
    let key = format!("Md5 {} 50000\n", digest_hex(SignMethod::Md5, &body));
    std::fs::write(rig.dir.path().join("e.bin.part"), vec![0u8; 8192]).unwrap();
    std::fs::write(rig.dir.path().join("e.bin.part.meta"), &key).unwrap();
    let e_path = rig.dir.path().join("e.bin");
    rig.push("a3", command("2", "2.0", &url, &body, SignMethod::Md5));
    let cmd = upgrades.next().await.unwrap();
    let err = client
        .download(&cmd)
        .download_to(&e_path)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(Status::VerifyFailed), "{err}");
    assert!(!rig.dir.path().join("e.bin.part").exists());
    assert!(!rig.dir.path().join("e.bin.part.meta").exists());
    rig.push("a3", command("3", "2.0", &url, &body, SignMethod::Md5));
    let cmd = upgrades.next().await.unwrap();
    client
        .download(&cmd)
        .download_to(&e_path)
        .await
        .expect("clean retry");
    assert_eq!(std::fs::read(&e_path).unwrap(), body);
}

/// mqtts:// with a client certificate (mutual TLS), the CA from a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_broker() {
    use iot_ota_testkit::{MosquittoOptions, RecorderOptions, TempDir, TestCa, WireRecorder};
    let ca = TestCa::new();
    let dir = TempDir::new("mtls");
    let broker = MosquittoOptions::new()
        .tls(&ca)
        .require_client_cert()
        .start()
        .unwrap();
    let watcher = ca.client_cert("watcher");
    let wire = WireRecorder::connect_with(
        &broker.url(),
        &["/sys/#"],
        RecorderOptions {
            tls: Some(ca.client_config_with_cert(&watcher)),
            ..RecorderOptions::default()
        },
    )
    .unwrap();
    let ca_file = ca.write_ca(dir.path());
    let (cert, key) = ca.client_cert("m1").write(dir.path()).unwrap();
    assert!(broker.url().starts_with("mqtts://"));

    // Without a client certificate the broker refuses the device.
    let bare = Config::new(&broker.url(), PK, "m1", "1.0.0")
        .unwrap()
        .ca_file(&ca_file)
        .connect_timeout(Duration::from_secs(3));
    assert!(matches!(
        OtaClient::connect(bare).await,
        Err(Error::Mqtt(_))
    ));

    let config = Config::new(&broker.url(), PK, "m1", "1.0.0")
        .unwrap()
        .ca_file(&ca_file)
        .client_cert(&cert, &key);
    let (_client, _upgrades) = OtaClient::connect(config).await.expect("mTLS connect");
    let inform = wire
        .wait_for_async(|m| m.topic.ends_with("/m1/ota/firmware/inform"), WAIT)
        .await
        .expect("inform over mTLS");
    assert_eq!(
        inform.json_str("data.firmwareVersion").as_deref(),
        Some("1.0.0")
    );
}

/// Username and password; a wrong password is a clear connect error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_credentials() {
    use iot_ota_testkit::MosquittoOptions;
    let broker = MosquittoOptions::new()
        .auth("dev", "s3cret")
        .start()
        .unwrap();
    let wrong = Config::new(&broker.url(), PK, "p1", "1.0.0")
        .unwrap()
        .username("dev")
        .password("nope")
        .connect_timeout(Duration::from_secs(3));
    let err = OtaClient::connect(wrong).await.unwrap_err();
    assert!(matches!(err, Error::Mqtt(_)), "{err}");
    let right = Config::new(&broker.url(), PK, "p1", "1.0.0")
        .unwrap()
        .username("dev")
        .password("s3cret");
    OtaClient::connect(right)
        .await
        .expect("connect with credentials");
}

/// Every retry opens a new response; the buffer that carried only that news
/// goes back to the pool. (Each one used to be dropped: after four, the
/// pipeline had no buffer left and hung.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_do_not_drain_the_buffer_pool() {
    let rig = rig();
    let body = random_bytes(300_000, 25);
    let url = rig.files.add("/s.bin", Route::stall(body.clone(), 0));
    let (client, mut upgrades) = connect(&rig, "p1").await;
    rig.push("p1", command("1", "2.0", &url, &body, SignMethod::Md5));
    let cmd = upgrades.next().await.unwrap();
    let files = &rig.files;
    let heal = async {
        while files.requests().len() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        files.set("/s.bin", Route::file(body.clone()));
    };
    let path = rig.dir.path().join("p.bin");
    let download = tokio::time::timeout(WAIT, client.download(&cmd).download_to(&path));
    let (res, ()) = tokio::join!(download, heal);
    res.expect("the download hung")
        .expect("the fourth attempt succeeds");
    assert_eq!(std::fs::read(&path).unwrap(), body);
    assert_eq!(rig.files.requests().len(), 4);
}

/// A server that trickles the body (here 300 B/s, under a 2 KB/s minimum)
/// never trips the idle timeout; the minimum rate ends the download with
/// DOWNLOAD_FAILED and the reason, instead of keeping the device busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_server_ends_the_download_at_the_minimum_rate() {
    let rig = rig();
    let body = random_bytes(60_000, 24);
    let url = rig
        .files
        .add("/trickle.bin", Route::slow(body.clone(), 300));
    let config = Config::new(&rig.broker.url(), PK, "y4", "1.0.0")
        .unwrap()
        .min_download_rate(2_000, Duration::from_secs(2));
    let (client, mut upgrades) = OtaClient::connect(config).await.expect("connect");
    rig.wire
        .wait_for_async(|m| m.topic == rig.topic("y4", "inform"), WAIT)
        .await
        .expect("inform at connect");
    rig.push("y4", command("1", "2.0", &url, &body, SignMethod::Md5));
    let cmd = upgrades.next().await.unwrap();
    let dir = iot_ota_testkit::TempDir::new("trickle");
    let started = std::time::Instant::now();
    let err = client
        .download(&cmd)
        .download_to(dir.path().join("fw.bin"))
        .await
        .unwrap_err();
    assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());
    assert_eq!(err.status(), Some(Status::DownloadFailed), "{err}");
    assert!(err.to_string().contains("below the minimum"), "{err}");
    let report = rig.expect("y4", "progress", |m| m.json_i64("data.status") == Some(-2));
    assert!(report
        .json_str("data.desc")
        .unwrap()
        .contains("below the minimum of 2000 B/s"));
    // Not resumable: the part file is gone, the next command starts afresh.
    assert!(!dir.path().join("fw.bin.part").exists());
}

/// A full disk (the part file is a link to /dev/full: every write fails
/// with ENOSPC) ends the download with FLASH_FAILED and the reason, never
/// "download cancelled"; the part file is removed and the next attempt
/// works. Many runs, since the writer's error used to race the reader's.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_flash_failed_and_leaves_no_part_file() {
    let rig = rig();
    let body = random_bytes(3 << 20, 25);
    let url = rig.files.add("/full.bin", Route::file(body.clone()));
    let (client, mut upgrades) = connect(&rig, "y5").await;
    let dir = iot_ota_testkit::TempDir::new("fulldisk");
    let path = dir.path().join("fw.bin");
    for i in 0..10 {
        std::os::unix::fs::symlink("/dev/full", dir.path().join("fw.bin.part")).unwrap();
        rig.push(
            "y5",
            command(&format!("f{i}"), "2.0", &url, &body, SignMethod::Md5),
        );
        let cmd = upgrades.next().await.unwrap();
        let err = client.download(&cmd).download_to(&path).await.unwrap_err();
        assert_eq!(err.status(), Some(Status::FlashFailed), "run {i}: {err}");
        assert!(
            !dir.path().join("fw.bin.part").exists()
                && std::fs::symlink_metadata(dir.path().join("fw.bin.part")).is_err(),
            "run {i}: the part file was left behind"
        );
    }
    rig.push("y5", command("ok", "2.0", &url, &body, SignMethod::Md5));
    let cmd = upgrades.next().await.unwrap();
    client.download(&cmd).download_to(&path).await.unwrap();
    assert!(std::fs::read(&path).unwrap() == body);
}

/// A hostile server that answers with a response head that never ends, or
/// with too many headers: the download fails with DOWNLOAD_FAILED and the
/// reason, after at most 64 KiB of head (memory stays flat).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_or_too_many_response_headers_fail_the_download() {
    use std::io::{Read, Write};
    let rig = rig();
    let (client, mut upgrades) = connect(&rig, "hh").await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        for kind in ["endless", "many"] {
            let Ok((mut sock, _)) = listener.accept() else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf);
            let _ = sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n");
            if kind == "endless" {
                // One header line that never ends, until the client gives
                // up (a write error).
                let _ = sock.write_all(b"X-Junk: ");
                let chunk = "a".repeat(1000);
                for _ in 0..10_000 {
                    if sock.write_all(chunk.as_bytes()).is_err() {
                        break;
                    }
                }
            } else {
                for i in 0..100 {
                    let _ = sock.write_all(format!("X-H{i}: v\r\n").as_bytes());
                }
                let _ = sock.write_all(b"\r\n0123456789");
            }
        }
    });
    for (i, expected) in ["longer than 65536 bytes", "too many headers"]
        .iter()
        .enumerate()
    {
        rig.wire.clear();
        let url = format!("http://127.0.0.1:{port}/fw-{i}.bin");
        rig.push(
            "hh",
            command(
                &format!("h{i}"),
                "2.0",
                &url,
                b"0123456789",
                SignMethod::Md5,
            ),
        );
        let cmd = tokio::time::timeout(WAIT, upgrades.next())
            .await
            .unwrap()
            .unwrap();
        let path = rig.dir.path().join(format!("hh-{i}.bin"));
        let err = client.download(&cmd).download_to(&path).await.unwrap_err();
        assert_eq!(err.status(), Some(Status::DownloadFailed), "{err}");
        assert!(err.to_string().contains(expected), "{err}");
    }
    server.join().unwrap();
}

/// A 404 stays matchable: the HTTP status is in the download's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_file_is_a_matchable_404() {
    let rig = rig();
    let (client, mut upgrades) = connect(&rig, "nf").await;
    let url = rig.files.add("/gone.bin", Route::Status(404));
    rig.push(
        "nf",
        command("1", "2.0", &url, b"0123456789", SignMethod::Md5),
    );
    let cmd = tokio::time::timeout(WAIT, upgrades.next())
        .await
        .unwrap()
        .unwrap();
    let err = client
        .download(&cmd)
        .download_to(rig.dir.path().join("nf.bin"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Fetch(iot_ota_core::FetchError::Transport {
                http_status: Some(404),
                ..
            })
        ),
        "{err:?}"
    );
}
