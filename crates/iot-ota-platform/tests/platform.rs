//! The platform over real MQTT (the embedded broker and Mosquitto) and HTTP,
//! with scripted devices: every record state, every failure reason.

mod common;

use std::time::{Duration, Instant};

use common::*;
use iot_ota_core::digest::{digest_hex, SignMethod};
use iot_ota_core::protocol::{encode_get, parse_get_reply, parse_upgrade, Limits};
use iot_ota_core::{Policy, ReplyCode, Status};
use iot_ota_platform::api::CreateBatch;
use iot_ota_platform::BrokerChoice;
use iot_ota_testkit::{random_bytes, Mosquitto, TempDir};

const SECS: Duration = Duration::from_secs(10);

/// The whole flow with a scripted device; the same code on either broker.
async fn scripted_upgrade(broker: BrokerChoice, tag: &str) {
    let dir = TempDir::new(tag);
    let p = platform(dir.path(), broker, any_port()).await;
    let api = api(&p);
    let w = wire(p.broker_url()).await;
    known(&w, &api, &["dev1"], "1.0.0").await;
    let image = random_bytes(300_000, 1);
    let fw = api
        .add_firmware(PK, "2.0.0", "fw.bin", &image)
        .await
        .unwrap();
    assert_eq!(fw.md5, digest_hex(SignMethod::Md5, &image));
    assert_eq!(fw.sha256, digest_hex(SignMethod::Sha256, &image));

    let created = api.create_batch(&quick_batch(None)).await.unwrap();
    assert!(created.excluded.is_empty());
    let id = created.batch.id;
    let cmd = command(&w, "dev1", 1, SECS).await;
    let parsed = parse_upgrade(&cmd.payload, &Limits::default()).expect("a valid command");
    assert_eq!(parsed.msg_id, format!("b{id}a1"));
    assert_eq!(parsed.firmware.version, "2.0.0");
    assert_eq!(parsed.firmware.size, Some(300_000));
    assert_eq!(parsed.firmware.sign, fw.md5);
    assert_eq!(parsed.firmware.sign_method, SignMethod::Md5);
    assert_eq!(parsed.firmware.policy, Some(Policy::Standard));
    assert_eq!(parsed.firmware.url, fw.url);
    // The URL serves the image.
    let path = parsed.firmware.url.splitn(4, '/').nth(3).unwrap();
    let got = api
        .request("GET", &format!("/{path}"), None, b"", &[])
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.body, image);
    let b = api.show_batch(id).await.unwrap();
    assert_eq!(record(&b, "dev1").state, "pushed");

    reply(&w, "dev1", &parsed.msg_id, ReplyCode::Accepted, "success").await;
    wait_batch(&api, id, "pending", SECS, |b| {
        record(b, "dev1").state == "pending"
    })
    .await;
    progress(&w, "dev1", Status::Downloading, 40, "").await;
    let b = wait_batch(&api, id, "upgrading", SECS, |b| {
        record(b, "dev1").state == "upgrading"
    })
    .await;
    assert_eq!(record(&b, "dev1").progress, 40);
    progress(&w, "dev1", Status::Success, 100, "").await;
    inform(&w, "dev1", "2.0.0").await;
    let b = wait_batch(&api, id, "completed", SECS, |b| b.state == "completed").await;
    let r = record(&b, "dev1");
    assert_eq!(
        (r.state.as_str(), r.version.as_deref()),
        ("success", Some("2.0.0"))
    );
    assert_eq!(b.totals.success, 1);
    let devices = api.list_devices(Some(PK)).await.unwrap();
    assert_eq!(devices[0].version, "2.0.0");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_upgrade_through_the_embedded_broker() {
    scripted_upgrade(embedded(), "plat-embedded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_upgrade_through_mosquitto() {
    let m = Mosquitto::start();
    scripted_upgrade(BrokerChoice::External(m.url()), "plat-mosquitto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_reason() {
    let dir = TempDir::new("plat-failures");
    let p = platform(dir.path(), embedded(), any_port()).await;
    let api = api(&p);
    let w = wire(p.broker_url()).await;
    let devs = [
        "off", "verify", "download", "flash", "other", "slow", "refuse",
    ];
    known(&w, &api, &devs, "1.0.0").await;
    api.add_firmware(PK, "2.0.0", "fw.bin", &random_bytes(1000, 2))
        .await
        .unwrap();
    let mut req = quick_batch(None);
    req.timeout_secs = Some(1.0);
    let id = api.create_batch(&req).await.unwrap().batch.id;
    let msg = format!("b{id}a1");
    for d in &devs[1..] {
        command(&w, d, 1, SECS).await;
    }
    for d in ["verify", "download", "flash", "other", "slow"] {
        reply(&w, d, &msg, ReplyCode::Accepted, "").await;
    }
    reply(
        &w,
        "refuse",
        &msg,
        ReplyCode::Refused,
        "downgrade not allowed",
    )
    .await;
    progress(&w, "verify", Status::VerifyFailed, 100, "md5 mismatch").await;
    progress(
        &w,
        "download",
        Status::DownloadFailed,
        30,
        "connection reset",
    )
    .await;
    progress(&w, "flash", Status::FlashFailed, 50, "write error").await;
    progress(&w, "other", Status::UpgradeFailed, 10, "").await;
    let t0 = Instant::now();
    progress(&w, "slow", Status::Downloading, 5, "").await;
    let b = wait_batch(&api, id, "every record failed", SECS, |b| {
        b.state == "completed"
    })
    .await;
    let reasons: Vec<(String, String)> = b
        .records
        .iter()
        .map(|r| (r.device.clone(), r.reason.clone().unwrap_or_default()))
        .collect();
    let expect = [
        ("download", "download_failed"),
        ("flash", "flash_failed"),
        ("off", "push_failed"),
        ("other", "upgrade_failed"),
        ("refuse", "rejected"),
        ("slow", "upgrade_timeout"),
        ("verify", "verify_failed"),
    ];
    for (d, reason) in expect {
        let r = record(&b, d);
        assert_eq!(
            (r.state.as_str(), r.reason.as_deref()),
            ("failed", Some(reason)),
            "{d}"
        );
    }
    assert_eq!(reasons.len(), 7);
    assert_eq!(record(&b, "verify").desc, "md5 mismatch");
    assert!(record(&b, "refuse").desc.contains("412"));
    assert!(record(&b, "off").desc.contains("no reply within 1 s"));
    let slow = record(&b, "slow");
    let took = slow.finished_ms.unwrap() - slow.started_ms.unwrap();
    assert!((1000..4000).contains(&took), "timeout after {took} ms");
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert_eq!(b.totals.failed, 7);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_wait_their_interval() {
    let dir = TempDir::new("plat-retry");
    let p = platform(dir.path(), embedded(), any_port()).await;
    let api = api(&p);
    let w = wire(p.broker_url()).await;
    known(&w, &api, &["d1", "off"], "1.0.0").await;
    api.add_firmware(PK, "2.0.0", "fw.bin", &random_bytes(1000, 3))
        .await
        .unwrap();
    let mut req = quick_batch(None);
    req.retries = Some(1);
    req.retry_interval_secs = Some(1.0);
    req.sign_method = Some("sha256".into());
    let id = api.create_batch(&req).await.unwrap().batch.id;
    let first = command(&w, "d1", 1, SECS).await;
    let cmd = parse_upgrade(&first.payload, &Limits::default()).unwrap();
    assert_eq!(cmd.firmware.sign_method, SignMethod::Sha256);
    assert_eq!(cmd.firmware.sign.len(), 64);
    reply(&w, "d1", &cmd.msg_id, ReplyCode::Accepted, "").await;
    progress(&w, "d1", Status::VerifyFailed, 100, "sha256 mismatch").await;
    let failed_at = Instant::now();
    let b = wait_batch(&api, id, "awaiting retry", SECS, |b| {
        record(b, "d1").state == "awaiting_retry"
    })
    .await;
    assert_eq!(record(&b, "d1").reason.as_deref(), Some("verify_failed"));
    let second = command(&w, "d1", 2, SECS).await;
    let waited = failed_at.elapsed();
    assert!(
        waited >= Duration::from_millis(850),
        "retried after {waited:?}"
    );
    let cmd2 = parse_upgrade(&second.payload, &Limits::default()).unwrap();
    assert_eq!(cmd2.msg_id, format!("b{id}a2"));
    reply(&w, "d1", &cmd2.msg_id, ReplyCode::Accepted, "").await;
    progress(&w, "d1", Status::Downloading, 1, "").await;
    inform(&w, "d1", "2.0.0").await;
    // The offline device: pushed twice, never answered.
    let b = wait_batch(&api, id, "completed", SECS, |b| b.state == "completed").await;
    let r = record(&b, "d1");
    assert_eq!(
        (r.state.as_str(), r.attempts, r.last_failure.as_deref()),
        ("success", 2, Some("verify_failed"))
    );
    let off = record(&b, "off");
    assert_eq!(
        (off.state.as_str(), off.attempts, off.reason.as_deref()),
        ("failed", 2, Some("push_failed"))
    );
    assert_eq!(
        w.messages()
            .iter()
            .filter(|m| m.topic == topics("off").upgrade)
            .count(),
        2
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validity_expiry_and_terminate() {
    let dir = TempDir::new("plat-validity");
    let p = platform(dir.path(), embedded(), any_port()).await;
    let api = api(&p);
    let w = wire(p.broker_url()).await;
    known(&w, &api, &["idle", "busy", "t1", "t2"], "1.0.0").await;
    api.add_firmware(PK, "2.0.0", "fw.bin", &random_bytes(1000, 4))
        .await
        .unwrap();
    // Validity 3 s: "idle" acks but never reports progress; it is cut at the end.
    let mut req = quick_batch(Some(vec!["idle", "busy"]));
    req.validity_secs = Some(3.0);
    req.ack_timeout_secs = Some(5.0);
    let id = api.create_batch(&req).await.unwrap().batch.id;
    let msg = format!("b{id}a1");
    command(&w, "idle", 1, SECS).await;
    command(&w, "busy", 1, SECS).await;
    reply(&w, "idle", &msg, ReplyCode::Accepted, "").await;
    reply(&w, "busy", &msg, ReplyCode::Accepted, "").await;
    progress(&w, "busy", Status::Downloading, 10, "").await;
    let b = wait_batch(&api, id, "the cut", SECS, |b| {
        record(b, "idle").state == "failed"
    })
    .await;
    assert!(b.created_ms + 3000 <= record(&b, "idle").finished_ms.unwrap());
    assert_eq!(
        record(&b, "idle").reason.as_deref(),
        Some("upgrade_timeout")
    );
    // An upgrade already under way may still finish after the end.
    assert_eq!(record(&b, "busy").state, "upgrading");
    inform(&w, "busy", "2.0.0").await;
    let b = wait_batch(&api, id, "terminated", SECS, |b| b.state != "in_progress").await;
    assert_eq!(b.state, "terminated", "expired with a device unfinished");
    assert_eq!(record(&b, "busy").state, "success");

    // Terminate by hand.
    let id2 = api
        .create_batch(&quick_batch(Some(vec!["t1", "t2"])))
        .await
        .unwrap()
        .batch
        .id;
    command(&w, "t1", 1, SECS).await;
    reply(&w, "t1", &format!("b{id2}a1"), ReplyCode::Accepted, "").await;
    wait_batch(&api, id2, "pending", SECS, |b| {
        record(b, "t1").state == "pending"
    })
    .await;
    let b = api.terminate_batch(id2).await.unwrap();
    assert_eq!(b.state, "terminated");
    for d in ["t1", "t2"] {
        assert_eq!(record(&b, d).reason.as_deref(), Some("batch_terminated"));
    }
    let again = api.terminate_batch(id2).await.unwrap_err();
    assert_eq!(again.status, 409);
    assert_eq!(api.terminate_batch(999).await.unwrap_err().status, 404);
    // A late inform does not revive a terminated record.
    inform(&w, "t1", "2.0.0").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = api.show_batch(id2).await.unwrap();
    assert_eq!(record(&b, "t1").state, "failed");
    let list = api.list_batches().await.unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].id, id2, "newest first");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eligibility_rules() {
    let dir = TempDir::new("plat-elig");
    let p = platform(dir.path(), embedded(), any_port()).await;
    let api = api(&p);
    let w = wire(p.broker_url()).await;
    known(&w, &api, &["old", "new"], "1.0.0").await;
    known(&w, &api, &["new"], "2.0.0").await;
    api.add_firmware(PK, "2.0.0", "fw.bin", &random_bytes(1000, 5))
        .await
        .unwrap();
    let created = api
        .create_batch(&quick_batch(Some(vec!["old", "new", "ghost"])))
        .await
        .unwrap();
    assert_eq!(created.batch.totals.total, 1);
    assert_eq!(created.batch.records[0].device, "old");
    let ex: Vec<(&str, &str)> = created
        .excluded
        .iter()
        .map(|e| (e.device.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(
        ex,
        vec![
            ("ghost", "never seen (no version inform yet)"),
            ("new", "already on the target version")
        ]
    );
    // "old" is now in a running batch: nothing is eligible.
    let err = api.create_batch(&quick_batch(None)).await.unwrap_err();
    assert_eq!(err.status, 409);
    assert!(
        err.message
            .contains(&format!("old: in running batch {}", created.batch.id)),
        "{}",
        err.message
    );
    let mut bad = quick_batch(None);
    bad.firmware_version = "9.9".into();
    assert_eq!(api.create_batch(&bad).await.unwrap_err().status, 404);
    let mut bad = quick_batch(None);
    bad.retries = Some(9);
    let e = api.create_batch(&bad).await.unwrap_err();
    assert_eq!(
        (e.status, e.message.as_str()),
        (400, "retries must be 0-5, got 9")
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_answers_firmware_or_404() {
    let dir = TempDir::new("plat-get");
    let p = platform(dir.path(), embedded(), any_port()).await;
    let api = api(&p);
    let w = wire(p.broker_url()).await;
    let fw = api
        .add_firmware(PK, "2.0.0", "fw.bin", &random_bytes(5000, 6))
        .await
        .unwrap();
    let t = topics("d1");
    w.publish_async(&t.get, encode_get("41", "2.0.0"), true)
        .await
        .unwrap();
    w.publish_async(&t.get, encode_get("42", "3.0.0"), true)
        .await
        .unwrap();
    let replies = w
        .wait_count_async(|m| m.topic == t.get_reply, 2, SECS)
        .await;
    assert_eq!(replies.len(), 2, "{}", w.summary());
    let mut ok = None;
    let mut missing = None;
    for m in &replies {
        let r = parse_get_reply(&m.payload, &Limits::default()).unwrap();
        match r.msg_id.as_str() {
            "41" => ok = Some(r.result.unwrap()),
            "42" => missing = Some(r.result.unwrap_err()),
            other => panic!("unexpected msgId {other}"),
        }
    }
    let ok = ok.unwrap();
    assert_eq!(
        (ok.url, ok.sign, ok.sign_method),
        (fw.url, fw.md5, SignMethod::Md5)
    );
    let missing = missing.unwrap();
    assert_eq!(missing.code, 404);
    assert_eq!(missing.message, "FirmwareVersion 3.0.0 not existed");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_rules() {
    let dir = TempDir::new("plat-fw");
    let mut config = iot_ota_platform::PlatformConfig::new(dir.path());
    config.http_addr = any_port();
    config.broker = embedded();
    config.max_firmware_size = 10_000;
    // A recorder plays the devices (see common::platform).
    config.mqtt_anonymous = true;
    let p = iot_ota_platform::Platform::start(config).await.unwrap();
    let api = api(&p);
    let bytes = random_bytes(2000, 7);
    let cases: Vec<(&str, String, &str, usize, u16, &str)> = vec![
        (
            "pk",
            "2.0 beta".into(),
            "f.bin",
            10,
            400,
            "only contain letters",
        ),
        ("pk", "9".repeat(101), "f.bin", 10, 400, "longer than 100"),
        ("pk", "".into(), "f.bin", 10, 400, "is empty"),
        ("p/k", "2.0".into(), "f.bin", 10, 400, "'/'"),
        ("pk", "2.0".into(), "../x", 10, 400, "'/'"),
        ("pk", "2.0".into(), "f.bin", 0, 400, "empty"),
        (
            "pk",
            "2.0".into(),
            "f.bin",
            10_001,
            413,
            "above the limit of 10000 bytes",
        ),
        // Well over: cut off by the body limit, with the same message.
        (
            "pk",
            "2.0".into(),
            "f.bin",
            50_000,
            413,
            "above the limit of 10000 bytes",
        ),
    ];
    for (pk, version, name, size, status, needle) in cases {
        let body = random_bytes(size, 8);
        let e = api
            .add_firmware(pk, &version, name, &body)
            .await
            .unwrap_err();
        assert_eq!(e.status, status, "{version:?} {name}: {e}");
        assert!(e.message.contains(needle), "{version:?}: {}", e.message);
    }
    let ok = api
        .add_firmware("pk", &"v".repeat(100), "f.bin", &bytes)
        .await
        .unwrap();
    assert_eq!(ok.size, 2000);
    api.add_firmware("pk", "2.0", "f.bin", &bytes)
        .await
        .unwrap();
    let dup = api
        .add_firmware("pk", "2.0", "g.bin", &bytes)
        .await
        .unwrap_err();
    assert_eq!(dup.status, 409);
    // The same version in another product is fine.
    api.add_firmware("pk2", "2.0", "f.bin", &bytes)
        .await
        .unwrap();
    assert_eq!(api.list_firmware(Some("pk")).await.unwrap().len(), 2);
    assert_eq!(api.list_firmware(None).await.unwrap().len(), 3);

    // Delete while a running batch uses it: refused.
    let w = wire(p.broker_url()).await;
    w.publish_async(
        "/sys/pk/d1/ota/firmware/inform",
        iot_ota_core::protocol::encode_inform("1", "1.0"),
        true,
    )
    .await
    .unwrap();
    let deadline = Instant::now() + SECS;
    while api.list_devices(Some("pk")).await.unwrap().is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let batch = api
        .create_batch(&CreateBatch {
            product: "pk".into(),
            firmware_version: "2.0".into(),
            ack_timeout_secs: Some(30.0),
            ..CreateBatch::default()
        })
        .await
        .unwrap();
    let e = api.delete_firmware("pk", "2.0").await.unwrap_err();
    assert_eq!(e.status, 409);
    assert!(e.message.contains("running batch"), "{}", e.message);
    api.terminate_batch(batch.batch.id).await.unwrap();
    api.delete_firmware("pk", "2.0").await.unwrap();
    assert_eq!(
        api.delete_firmware("pk", "2.0").await.unwrap_err().status,
        404
    );
    let gone = api
        .request("GET", "/fw/pk/2.0/f.bin", None, b"", &[])
        .await
        .unwrap();
    assert_eq!(gone.status, 404);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_server_range_and_etag() {
    let dir = TempDir::new("plat-range");
    let p = platform(dir.path(), embedded(), any_port()).await;
    let api = api(&p);
    let image = random_bytes(100_000, 9);
    let fw = api
        .add_firmware("pk", "1.2.3", "img.bin", &image)
        .await
        .unwrap();
    let path = "/fw/pk/1.2.3/img.bin";
    assert_eq!(fw.url, format!("{}{path}", p.public_url()));
    let full = api.request("GET", path, None, b"", &[]).await.unwrap();
    assert_eq!(full.status, 200);
    assert_eq!(full.header("content-length"), Some("100000"));
    assert_eq!(full.header("accept-ranges"), Some("bytes"));
    let etag = full.header("etag").unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", &fw.sha256[..32]));
    let part = api
        .request("GET", path, None, b"", &[("Range", "bytes=1000-1999")])
        .await
        .unwrap();
    assert_eq!(part.status, 206);
    assert_eq!(part.header("content-range"), Some("bytes 1000-1999/100000"));
    assert_eq!(part.header("content-length"), Some("1000"));
    assert_eq!(part.body, &image[1000..2000]);
    let tail = api
        .request("GET", path, None, b"", &[("Range", "bytes=-10")])
        .await
        .unwrap();
    assert_eq!(tail.body, &image[99_990..]);
    let open = api
        .request("GET", path, None, b"", &[("Range", "bytes=99000-")])
        .await
        .unwrap();
    assert_eq!((open.status, open.body.len()), (206, 1000));
    let bad = api
        .request("GET", path, None, b"", &[("Range", "bytes=200000-")])
        .await
        .unwrap();
    assert_eq!(bad.status, 416);
    assert_eq!(bad.header("content-range"), Some("bytes */100000"));
    let same = api
        .request("GET", path, None, b"", &[("If-None-Match", etag.as_str())])
        .await
        .unwrap();
    assert_eq!(same.status, 304);
    // If-Range with a stale tag: the whole file.
    let stale = api
        .request(
            "GET",
            path,
            None,
            b"",
            &[("Range", "bytes=0-9"), ("If-Range", "\"old\"")],
        )
        .await
        .unwrap();
    assert_eq!((stale.status, stale.body.len()), (200, 100_000));
    let head = api.request("HEAD", path, None, b"", &[]).await.unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("100000"));
    let wrong = api
        .request("GET", "/fw/pk/1.2.3/other.bin", None, b"", &[])
        .await
        .unwrap();
    assert_eq!(wrong.status, 404);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_batch_loses_no_record() {
    let m = Mosquitto::start();
    let dir = TempDir::new("plat-restart");
    let http = ([127, 0, 0, 1], iot_ota_testkit::free_port()).into();
    let broker = BrokerChoice::External(m.url());
    let p = platform(dir.path(), broker.clone(), http).await;
    let api1 = api(&p);
    let w = wire(&m.url()).await;
    known(&w, &api1, &["done", "mid", "silent"], "1.0.0").await;
    api1.add_firmware(PK, "2.0.0", "fw.bin", &random_bytes(4000, 10))
        .await
        .unwrap();
    let mut req = quick_batch(None);
    req.ack_timeout_secs = Some(6.0);
    let id = api1.create_batch(&req).await.unwrap().batch.id;
    let msg = format!("b{id}a1");
    for d in ["done", "mid", "silent"] {
        command(&w, d, 1, SECS).await;
    }
    reply(&w, "done", &msg, ReplyCode::Accepted, "").await;
    reply(&w, "mid", &msg, ReplyCode::Accepted, "").await;
    progress(&w, "mid", Status::Downloading, 60, "").await;
    inform(&w, "done", "2.0.0").await;
    let before = wait_batch(&api1, id, "mid upgrading", SECS, |b| {
        record(b, "mid").progress == 60 && record(b, "done").state == "success"
    })
    .await;
    assert_eq!(record(&before, "silent").state, "pushed");
    p.shutdown().await;

    // While the platform is down the device finishes; the platform missed it.
    let p2 = platform(dir.path(), broker, http).await;
    let api2 = api(&p2);
    let after = api2.show_batch(id).await.unwrap();
    assert_eq!(after, before, "every record as it was");
    // The device re-informs (it does so at every start): success.
    inform(&w, "mid", "2.0.0").await;
    let b = wait_batch(&api2, id, "completed", SECS, |b| b.state == "completed").await;
    assert_eq!(record(&b, "mid").state, "success");
    assert_eq!(record(&b, "done").state, "success");
    // The unanswered push timed out across the restart.
    let s = record(&b, "silent");
    assert_eq!(
        (s.state.as_str(), s.reason.as_deref()),
        ("failed", Some("push_failed"))
    );
    p2.shutdown().await;
}

/// 50 uploads of distinct versions at once: every one is stored, none gets
/// a 500, and no version directory is left without its record. (Uploads in
/// the same millisecond used to share a temporary file name.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_are_all_stored() {
    let dir = TempDir::new("plat-concurrent");
    let mut config = iot_ota_platform::PlatformConfig::new(dir.path());
    config.http_addr = any_port();
    config.broker = embedded();
    let p = iot_ota_platform::Platform::start(config).await.unwrap();
    let api = api(&p);
    let mut uploads = Vec::new();
    for i in 0..50u64 {
        let api = api.clone();
        uploads.push(tokio::spawn(async move {
            let body = random_bytes(3000, 100 + i);
            api.add_firmware("pk", &format!("3.{i}"), "fw.bin", &body)
                .await
        }));
    }
    for (i, u) in uploads.into_iter().enumerate() {
        let r = u.await.unwrap();
        assert!(r.is_ok(), "upload {i}: {:?}", r.err());
    }
    let listed = api.list_firmware(Some("pk")).await.unwrap();
    assert_eq!(listed.len(), 50);
    let versions = std::fs::read_dir(dir.path().join("firmware").join("pk"))
        .unwrap()
        .count();
    assert_eq!(versions, 50, "a version directory without its record");
    p.shutdown().await;
}

/// One raw HTTP/1.1 request to the API: the status, the headers and the
/// body as the server sent them.
fn raw_request(addr: &str, request: &[u8]) -> (u16, String, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    // A server that does not answer fails the test instead of hanging it.
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("no whole answer: {e}"));
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let json =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}\n{head}"));
    (status, head.to_owned(), json)
}

/// Every error of the API is a JSON `{"error": ...}` with the right status,
/// the framework's own included: an unknown path, a wrong method, a missing
/// query field, and an upload announcing an impossible Content-Length
/// (answered at once with 413, before any body: uploads are streamed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json() {
    let dir = TempDir::new("plat-errors");
    let mut config = iot_ota_platform::PlatformConfig::new(dir.path());
    config.http_addr = any_port();
    config.broker = embedded();
    let p = iot_ota_platform::Platform::start(config).await.unwrap();
    let addr = p
        .api_url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let token = p.api_token().to_owned();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"GET /api/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), 404, "no such endpoint"),
        (format!("PUT /api/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes(), 405, ""),
        (format!("POST /api/firmware HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes(), 400, "product"),
        (format!("POST /api/firmware?product=pk&version=2.0&name=f.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000000000000000\r\nConnection: close\r\n\r\n").into_bytes(), 413, "above the limit"),
        // No token, or a wrong one, on a request that changes something: 401.
        (b"POST /api/batches HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_vec(), 401, "API token"),
        (b"DELETE /api/firmware/pk/2.0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\nConnection: close\r\n\r\n".to_vec(), 401, "API token"),
    ];
    for (request, status, needle) in cases {
        let addr = addr.clone();
        let (got, head, json) = tokio::task::spawn_blocking(move || raw_request(&addr, &request))
            .await
            .unwrap();
        assert_eq!(got, status, "{head}\n{json}");
        let error = json["error"].as_str().unwrap_or_else(|| panic!("{json}"));
        assert!(
            !error.is_empty() && error.contains(needle),
            "{status}: {error}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{head}"
        );
        if status == 405 {
            assert!(head.to_ascii_lowercase().contains("allow:"), "{head}");
        }
    }
    p.shutdown().await;
}

/// A device that finishes while the platform is down (on an external
/// broker): its SUCCESS and inform are queued by the broker for the
/// platform's persistent session and counted when it is back, with no
/// re-push and no re-inform. (With a clean session they were lost: the
/// record ended by timeout, or by a needless second download.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_sent_while_the_platform_is_down_are_not_lost() {
    let m = Mosquitto::start();
    let dir = TempDir::new("plat-down");
    let http = ([127, 0, 0, 1], iot_ota_testkit::free_port()).into();
    let broker = BrokerChoice::External(m.url());
    let p = platform(dir.path(), broker.clone(), http).await;
    let api1 = api(&p);
    let w = wire(&m.url()).await;
    known(&w, &api1, &["late"], "1.0.0").await;
    api1.add_firmware(PK, "2.0.0", "fw.bin", &random_bytes(4000, 11))
        .await
        .unwrap();
    let id = api1
        .create_batch(&quick_batch(None))
        .await
        .unwrap()
        .batch
        .id;
    let msg = format!("b{id}a1");
    command(&w, "late", 1, SECS).await;
    reply(&w, "late", &msg, ReplyCode::Accepted, "").await;
    progress(&w, "late", Status::Downloading, 50, "").await;
    wait_batch(&api1, id, "upgrading", SECS, |b| {
        record(b, "late").progress == 50
    })
    .await;
    p.shutdown().await;

    // The device finishes while nobody listens.
    progress(&w, "late", Status::Upgrading, 100, "").await;
    progress(&w, "late", Status::Success, 100, "").await;
    inform(&w, "late", "2.0.0").await;

    let p2 = platform(dir.path(), broker, http).await;
    let api2 = api(&p2);
    let b = wait_batch(&api2, id, "completed", SECS, |b| b.state == "completed").await;
    let r = record(&b, "late");
    assert_eq!((r.state.as_str(), r.attempts), ("success", 1), "{r:?}");
    p2.shutdown().await;
}

/// One platform per data directory: a second one is refused and says why;
/// once the first has stopped, the directory is free again. A data
/// directory that cannot be one is named as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_takes_one_platform() {
    let dir = TempDir::new("plat-lock");
    let config = || {
        let mut c = iot_ota_platform::PlatformConfig::new(dir.path());
        c.http_addr = any_port();
        c.broker = embedded();
        c
    };
    let first = iot_ota_platform::Platform::start(config()).await.unwrap();
    let e = iot_ota_platform::Platform::start(config())
        .await
        .err()
        .unwrap();
    assert!(
        e.contains("another platform is running on the data directory"),
        "{e}"
    );
    first.shutdown().await;
    let again = iot_ota_platform::Platform::start(config()).await.unwrap();
    again.shutdown().await;
    let file = dir.join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let mut bad = iot_ota_platform::PlatformConfig::new(&file);
    bad.http_addr = any_port();
    bad.broker = embedded();
    let e = iot_ota_platform::Platform::start(bad).await.err().unwrap();
    assert!(e.contains("as the data directory"), "{e}");
}
