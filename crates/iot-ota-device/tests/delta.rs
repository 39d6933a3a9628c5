//! Delta updates through the one download driver, against a real Mosquitto
//! and the testkit's HTTP server: only the changed chunks are fetched, a
//! cut delta resumes, bad chunks and indexes are refused, a server that
//! ignores Range and a base that changes end in the full download.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use iot_ota_core::digest::{digest_hex, SignMethod};
use iot_ota_device::{Config, Error, FetchError, OtaClient, Upgrades};
use iot_ota_testkit::acceptance::{chunk_index as index_of, fs_image as image, ranged};
use iot_ota_testkit::{assert_progress_never_goes_back, random_bytes, Route, TestKey};

/// A "monthly" change: a few edits, an insertion, a removal.
fn changed(old: &[u8]) -> Vec<u8> {
    let mut new = old.to_vec();
    new[300_000..310_000].fill(7);
    new.splice(900_000..900_000, random_bytes(20_000, 77));
    new.drain(1_500_000..1_530_000);
    new
}

/// An upgrade command for `new` at `url`, whose index is `index` at `index_url`.
fn delta_command(id: &str, url: &str, new: &[u8], index_url: &str, index: &[u8]) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&command(id, "2.0", url, new, SignMethod::Md5)).unwrap();
    v["data"]["delta"] = serde_json::json!({
        "index": index_url,
        "indexSha256": digest_hex(SignMethod::Sha256, index),
        "indexSize": index.len(),
    });
    v.to_string()
}

async fn connect(rig: &Rig, dev: &str, key: Option<&TestKey>) -> (OtaClient, Upgrades) {
    let mut config = Config::new(&rig.broker.url(), PK, dev, "1.0.0").unwrap();
    if let Some(k) = key {
        config = config.trust_key(k.public().clone());
    }
    let pair = OtaClient::connect(config).await.expect("connect");
    rig.wire
        .wait_for_async(|m| m.topic == rig.topic(dev, "inform"), WAIT)
        .await
        .expect("inform at connect");
    pair
}

/// The `desc` of every DOWNLOADING report of `dev`.
fn downloading_descs(rig: &Rig, dev: &str) -> Vec<String> {
    rig.all(dev, "progress")
        .iter()
        .filter(|m| m["data"]["status"] == 1)
        .map(|m| m["data"]["desc"].as_str().unwrap_or_default().to_owned())
        .collect()
}

struct Setup {
    old: Vec<u8>,
    new: Vec<u8>,
    index: Vec<u8>,
}

fn setup(rig: &Rig, base: &Path, route: impl Fn(Vec<u8>) -> Route) -> (Setup, String, String) {
    let old = image(2 << 20, 1);
    let new = changed(&old);
    let index = index_of(&new);
    std::fs::write(base, &old).unwrap();
    let url = rig.files.add("/fw.bin", route(new.clone()));
    let index_url = rig.files.add("/fw.bin.idx", Route::file(index.clone()));
    (Setup { old, new, index }, url, index_url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_fetches_only_the_changed_chunks_and_is_verified() {
    let rig = rig();
    let base = rig.dir.path().join("running.img");
    let (s, url, index_url) = setup(&rig, &base, Route::file);
    let (client, mut upgrades) = connect(&rig, "d1", None).await;
    rig.push("d1", delta_command("1", &url, &s.new, &index_url, &s.index));
    let cmd = upgrades.next().await.unwrap();
    let out = rig.dir.path().join("new.img");
    let verified = client
        .download(&cmd)
        .delta_from(&base)
        .download_to(&out)
        .await
        .expect("the delta");
    assert_eq!(verified.size, s.new.len() as u64);
    assert!(std::fs::read(&out).unwrap() == s.new, "byte-identical");
    let (bytes, requests) = ranged(&rig, "/fw.bin");
    assert!(
        bytes < s.new.len() as u64 / 4,
        "{bytes} of {} fetched",
        s.new.len()
    );
    assert!((1..=64).contains(&requests), "{requests} requests");
    // No full GET of the image.
    assert!(rig
        .files
        .requests()
        .iter()
        .all(|r| r.path != "/fw.bin" || r.range.is_some()));
    rig.wait_status("d1", |st, _| st == 2);
    let descs = downloading_descs(&rig, "d1");
    assert!(
        descs
            .iter()
            .any(|d| d.starts_with("delta: ") && d.contains("request")),
        "{descs:?}"
    );
    assert_progress_never_goes_back(&rig.statuses("d1"));
    drop(s.old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_delta_resumes_with_the_chunks_not_written() {
    let rig = rig();
    let base = rig.dir.path().join("running.img");
    // Slow enough that the first try is cut in the middle of its ranges.
    let (s, url, index_url) = setup(&rig, &base, |b| Route::slow(b, 150_000));
    let (client, mut upgrades) = connect(&rig, "d2", None).await;
    rig.push("d2", delta_command("1", &url, &s.new, &index_url, &s.index));
    let cmd = upgrades.next().await.unwrap();
    let out = rig.dir.path().join("new.img");
    let cut = tokio::time::timeout(
        Duration::from_millis(700),
        client.download(&cmd).delta_from(&base).download_to(&out),
    )
    .await;
    assert!(cut.is_err(), "the first try is cut");
    let part_len = std::fs::metadata(rig.dir.path().join("new.img.part"))
        .unwrap()
        .len();
    assert!(part_len > 0, "something was written");
    let (first_bytes, _) = ranged(&rig, "/fw.bin");
    rig.files.clear_requests();
    rig.files.set("/fw.bin", Route::file(s.new.clone()));
    client
        .download(&cmd)
        .delta_from(&base)
        .download_to(&out)
        .await
        .expect("the resumed delta");
    assert!(std::fs::read(&out).unwrap() == s.new);
    // The resume asked only for what was not written: its ranges start past
    // the part file's whole chunks.
    let starts: Vec<u64> = rig
        .files
        .requests()
        .iter()
        .filter(|r| r.path == "/fw.bin")
        .filter_map(|r| {
            r.range
                .as_deref()?
                .strip_prefix("bytes=")?
                .split('-')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(!starts.is_empty());
    // (At most one chunk, 64 KiB, before the part file's end is asked for
    // again: the partly written one.)
    assert!(
        starts.iter().all(|&a| a + 64 * 1024 >= part_len),
        "{starts:?} / part {part_len}"
    );
    let (second_bytes, _) = ranged(&rig, "/fw.bin");
    assert!(second_bytes < first_bytes + s.new.len() as u64 / 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_chunk_or_index_is_verify_failed() {
    let rig = rig();
    let base = rig.dir.path().join("running.img");
    let (s, _, index_url) = setup(&rig, &base, Route::file);
    // The server's image differs from the one the index and command name,
    // in a chunk the device must fetch.
    let mut forged = s.new.clone();
    forged[305_000] ^= 1;
    let url = rig.files.add("/forged.bin", Route::file(forged));
    let (client, mut upgrades) = connect(&rig, "d3", None).await;
    rig.push("d3", delta_command("1", &url, &s.new, &index_url, &s.index));
    let cmd = upgrades.next().await.unwrap();
    let out = rig.dir.path().join("new.img");
    let e = client
        .download(&cmd)
        .delta_from(&base)
        .download_to(&out)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Fetch(FetchError::DeltaMismatch(m)) if m.contains("chunk")),
        "{e}"
    );
    rig.wait_status("d3", |st, _| st == -3);
    assert!(!out.exists() && !rig.dir.path().join("new.img.part").exists());

    // An index that is not the one the command names.
    let mut bad_index = s.index.clone();
    let last = bad_index.len() - 1;
    bad_index[last] ^= 1;
    let bad_url = rig.files.add("/bad.idx", Route::file(bad_index));
    let good = rig.files.url("/fw.bin");
    let mut v: serde_json::Value =
        serde_json::from_str(&delta_command("2", &good, &s.new, &bad_url, &s.index)).unwrap();
    v["data"]["firmwareVersion"] = "2.1".into();
    rig.push("d3", v.to_string());
    let cmd = upgrades.next().await.unwrap();
    let e = client
        .download(&cmd)
        .delta_from(&base)
        .download_to(&out)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Fetch(FetchError::DeltaMismatch(m)) if m.contains("SHA-256")),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_that_is_not_the_signed_manifests_is_refused() {
    let rig = rig();
    let key = TestKey::new();
    let base = rig.dir.path().join("running.img");
    let (s, url, _) = setup(&rig, &base, Route::file);
    // Someone who can publish swaps the index, and the command's digest
    // of it; the signed manifest still names the platform's.
    let other = index_of(&image(2 << 20, 9));
    let other_url = rig.files.add("/other.idx", Route::file(other.clone()));
    let command = delta_command("1", &url, &s.new, &other_url, &other);
    let signed = key.sign_command_indexed(
        &command,
        PK,
        &s.new,
        &digest_hex(SignMethod::Sha256, &s.index),
    );
    let (client, mut upgrades) = connect(&rig, "d4", Some(&key)).await;
    rig.push("d4", signed);
    let cmd = upgrades.next().await.unwrap();
    let e = client
        .download(&cmd)
        .delta_from(&base)
        .download_to(rig.dir.path().join("new.img"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Fetch(FetchError::DeltaMismatch(m)) if m.contains("signed manifest")),
        "{e}"
    );
    rig.wait_status("d4", |st, _| st == -3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_ignores_range_still_gives_the_image() {
    let rig = rig();
    let base = rig.dir.path().join("running.img");
    let (s, url, index_url) = setup(&rig, &base, Route::no_range);
    let (client, mut upgrades) = connect(&rig, "d5", None).await;
    rig.push("d5", delta_command("1", &url, &s.new, &index_url, &s.index));
    let cmd = upgrades.next().await.unwrap();
    let out = rig.dir.path().join("new.img");
    client
        .download(&cmd)
        .delta_from(&base)
        .download_to(&out)
        .await
        .expect("the full download");
    assert!(std::fs::read(&out).unwrap() == s.new);
    rig.wait_status("d5", |st, _| st == 2);
    let descs = downloading_descs(&rig, "d5");
    assert!(
        descs.iter().any(|d| d.contains("ignores Range")),
        "{descs:?}"
    );
    assert_progress_never_goes_back(&rig.statuses("d5"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_that_changes_while_it_is_read_is_detected() {
    let rig = rig();
    let base = rig.dir.path().join("running.img");
    // The first range is slow: the base changes meanwhile, before the
    // chunks after it are copied from it.
    let (s, url, index_url) = setup(&rig, &base, |b| Route::slow(b, 400_000));
    let (client, mut upgrades) = connect(&rig, "d6", None).await;
    rig.push("d6", delta_command("1", &url, &s.new, &index_url, &s.index));
    let cmd = upgrades.next().await.unwrap();
    let out = rig.dir.path().join("new.img");
    let files = &rig.files;
    let scribble = async {
        while !files.requests().iter().any(|r| r.path == "/fw.bin") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut changed = s.old.clone();
        changed[1_000_000..].fill(0x55);
        std::fs::write(&base, changed).unwrap();
    };
    let (done, ()) = tokio::join!(
        client.download(&cmd).delta_from(&base).download_to(&out),
        scribble
    );
    done.expect("the full download took over");
    assert!(std::fs::read(&out).unwrap() == s.new);
    let descs = downloading_descs(&rig, "d6");
    assert!(
        descs.iter().any(|d| d.contains("base changed")),
        "{descs:?}"
    );
}

/// A server that answers a bounded Range with the rest of the file from its
/// start (`bytes=A-B` → `A-(size-1)`): the delta hands over to the full
/// download, which resumes from the bytes written (open-ended ranges are
/// what this server does answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_answers_other_ranges_still_gives_the_image() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rig = rig();
    let base = rig.dir.path().join("running.img");
    let (s, _, index_url) = setup(&rig, &base, Route::file);
    let image = std::sync::Arc::new(s.new.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = image.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let image = served.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let start: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("range: bytes="))
                    .and_then(|r| r.split('-').next()?.trim().parse().ok())
                    .unwrap_or(0);
                let total = image.len();
                let answer = if head.contains("range:") {
                    format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n\
                         Content-Range: bytes {start}-{}/{total}\r\nConnection: close\r\n\r\n",
                        total - start,
                        total - 1
                    )
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n"
                    )
                };
                if sock.write_all(answer.as_bytes()).await.is_ok() {
                    let _ = sock.write_all(&image[start..]).await;
                }
            });
        }
    });
    let url = format!("http://{addr}/fw.bin");
    let (client, mut upgrades) = connect(&rig, "d7", None).await;
    rig.push("d7", delta_command("1", &url, &s.new, &index_url, &s.index));
    let cmd = upgrades.next().await.unwrap();
    let out = rig.dir.path().join("new.img");
    client
        .download(&cmd)
        .delta_from(&base)
        .download_to(&out)
        .await
        .expect("the full download took over");
    assert!(std::fs::read(&out).unwrap() == s.new);
    let descs = downloading_descs(&rig, "d7");
    assert!(
        descs
            .iter()
            .any(|d| d.contains("does not answer the ranges")),
        "{descs:?}"
    );
}
