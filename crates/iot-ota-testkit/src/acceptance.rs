//! One acceptance table for every front end of the upgrade flow: the
//! device agent (`iot-ota device run`), the Rust `ota_example` and the C
//! `ota_example`. Each crate's tests run the same cases against its own
//! program ([`Frontend`]), so the three cannot drift apart unseen:
//!
//! | case | what the platform (and the disk) must see |
//! |---|---|
//! | [`journal_before_ack`] | the 200 only once the journal names the command; a kill -9 at the 200, or at once after the push, loses nothing |
//! | [`resume_after_kill`] | a kill -9 mid-download, a restart: the same upgrade goes on from the part file (one Range request) |
//! | [`progress_goes_forward`] | within each status the percent never goes back, ending DOWNLOADED, UPGRADING, SUCCESS |
//! | [`full_disk`] | FLASH_FAILED with the reason in `desc`, and no file of the upgrade left behind |
//! | [`delta_update`] | with the running version's image at hand and a command naming a chunk index, only the changed chunks are fetched (Range), the image verified, the desc says the plan |
//! | [`delta_resume_after_kill`] | a kill -9 mid-delta, a restart: the delta goes on after the chunks written (Range requests only, none of them from the start) |
//!
//! The programs take the Rust example's flags (`--broker`, `--product-key`,
//! `--device-name`, `--firmware-version 1.0.0`, `--output-dir DIR`,
//! `--once`); the state directory is DIR, where the journal, the part file
//! (`firmware-V.bin.part`) and its `.meta` live.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iot_ota_core::digest::{digest_hex, SignMethod};

use crate::{
    assert_progress_never_goes_back, random_bytes, upgrade_command, wait_child, ChildExit, Rig,
    Route,
};

/// How long a case waits for a program to finish.
const WAIT: Duration = Duration::from_secs(30);

/// A front end of the upgrade flow, as the acceptance table runs it.
#[derive(Debug, Clone)]
pub struct Frontend {
    /// The program.
    pub program: PathBuf,
    /// Arguments before the common flags (the agent's `device run`).
    pub leading: Vec<String>,
    /// Arguments after them (the agent's install command).
    pub trailing: Vec<String>,
}

impl Frontend {
    /// A program that takes the common flags only.
    pub fn new(program: impl Into<PathBuf>) -> Frontend {
        Frontend {
            program: program.into(),
            leading: Vec::new(),
            trailing: Vec::new(),
        }
    }

    /// Starts the program for device `dev` of the rig, once (`--once`).
    pub fn start(&self, rig: &Rig, dev: &str) -> Child {
        self.start_with(rig, dev, &[])
    }

    /// [`Frontend::start`] with `extra` arguments at the end.
    pub fn start_with(&self, rig: &Rig, dev: &str, extra: &[String]) -> Child {
        Command::new(&self.program)
            .args(&self.leading)
            .args(["--broker", &rig.broker.url(), "--product-key", &rig.pk])
            .args(["--device-name", dev, "--firmware-version", "1.0.0"])
            .arg("--output-dir")
            .arg(dir(rig, dev))
            .arg("--once")
            .args(&self.trailing)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.program.display()))
    }
}

/// The output and state directory of `dev`.
fn dir(rig: &Rig, dev: &str) -> PathBuf {
    rig.dir.path().join(dev)
}

fn command(id: &str, version: &str, url: &str, body: &[u8]) -> String {
    let sign = digest_hex(SignMethod::Md5, body);
    upgrade_command(id, version, url, body.len(), &sign, "Md5")
}

fn finish(child: Child) -> ChildExit {
    wait_child(child, WAIT)
}

fn assert_exit(exit: &ChildExit, code: i32) {
    assert_eq!(
        exit.code, code,
        "exit code {}\nstdout:\n{}\nstderr:\n{}",
        exit.code, exit.stdout, exit.stderr
    );
}

/// The files of the upgrade to `version` left in `dev`'s directory.
fn leftovers(rig: &Rig, dev: &str, version: &str) -> Vec<String> {
    let prefix = format!("firmware-{version}.bin.");
    std::fs::read_dir(dir(rig, dev))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// The 200 goes out only once the command is journaled: when the platform
/// sees it, the journal already names the upgrade, and a kill -9 right then
/// loses nothing (the restart goes on with it, without a new command). A
/// kill at once after the push, before or after the journal, leaves either
/// no 200 (the platform pushes again) or a journal: never an acked command
/// forgotten.
pub fn journal_before_ack(fe: &Frontend, rig: &Rig, dev: &str) {
    let body = random_bytes(300_000, 43);
    let url = rig.files.add(
        &format!("/{dev}-ack.bin"),
        Route::slow(body.clone(), 100_000),
    );
    for (i, at_ack) in [true, false, false].into_iter().enumerate() {
        let dev = format!("{dev}{i}");
        let dev = dev.as_str();
        let journal = dir(rig, dev).join("journal");
        let reply = rig.topic(dev, "upgrade_reply");
        let mut child = fe.start(rig, dev);
        rig.expect_version(dev, "inform", "1.0.0");
        rig.push(dev, command("a1", "2.0.0", &url, &body));
        if at_ack {
            let m = rig
                .wire
                .wait_for(|m| m.topic == reply, WAIT)
                .expect("no reply to the command");
            assert_eq!(m.json_i64("code"), Some(200));
            child.kill().expect("kill -9"); // the child we started, by its handle
            let j = std::fs::read_to_string(&journal).expect("acknowledged, but not journaled");
            assert!(
                j.contains(r#""target":"2.0.0""#) && j.contains(r#""msgId":"a1""#),
                "{j}"
            );
        } else {
            child.kill().expect("kill -9");
        }
        let _ = child.wait();
        let acked = rig.wire.messages().iter().any(|m| m.topic == reply);
        let journaled =
            std::fs::read_to_string(&journal).is_ok_and(|j| j.contains(r#""phase":"downloading""#));
        assert!(!acked || journaled, "acknowledged but not journaled");
        let child = fe.start(rig, dev);
        if !journaled {
            // Nothing was promised: the platform pushes again.
            rig.push_until_acked(dev, || command("a2", "2.0.0", &url, &body));
        }
        let exit = finish(child);
        assert_exit(&exit, 0);
        rig.expect_version(dev, "inform", "2.0.0");
        let statuses = rig.statuses(dev);
        assert_eq!(statuses.last(), Some(&(4, 100)), "{statuses:?}");
    }
}

/// kill -9 once a good part of the image is on disk, then a restart: the
/// upgrade goes on by itself from what the first run wrote (one Range
/// request from a 4 KiB boundary), and ends verified.
pub fn resume_after_kill(fe: &Frontend, rig: &Rig, dev: &str) {
    let body = random_bytes(400_000, 34);
    let url = rig.files.add(
        &format!("/{dev}-kill.bin"),
        Route::slow(body.clone(), 100_000),
    );
    let mut child = fe.start(rig, dev);
    rig.expect_version(dev, "inform", "1.0.0");
    rig.push(dev, command("k1", "2.0.0", &url, &body));
    let part = dir(rig, dev).join("firmware-2.0.0.bin.part");
    let deadline = Instant::now() + WAIT;
    while std::fs::metadata(&part).map_or(0, |m| m.len()) < 150_000 {
        assert!(Instant::now() < deadline, "the download did not get going");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("kill -9");
    let _ = child.wait();
    rig.files.clear_requests();
    let exit = finish(fe.start(rig, dev));
    assert_exit(&exit, 0);
    rig.expect_version(dev, "inform", "2.0.0");
    let ranges = rig.files.ranges();
    assert_eq!(ranges.len(), 1, "{ranges:?}\n{}", exit.stderr);
    let from: u64 = ranges[0]
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .expect("a Range from a byte");
    assert!(from > 0 && from % 4096 == 0, "resumed from {from}");
    assert!(leftovers(rig, dev, "2.0.0").is_empty());
}

/// A whole upgrade: within each status the percent never goes back, and
/// it ends DOWNLOADING 100, DOWNLOADED, UPGRADING, SUCCESS, then the new
/// version's inform.
pub fn progress_goes_forward(fe: &Frontend, rig: &Rig, dev: &str) {
    // Smaller than the C API's read-ahead, and larger.
    for (i, size) in [100_000usize, 1_500_000].into_iter().enumerate() {
        let dev = format!("{dev}{i}");
        let dev = dev.as_str();
        let body = random_bytes(size, 44 + i as u64);
        let url = rig.files.add(
            &format!("/{dev}-fwd.bin"),
            Route::slow(body.clone(), 1_000_000),
        );
        let child = fe.start(rig, dev);
        rig.expect_version(dev, "inform", "1.0.0");
        rig.push(dev, command("p1", "2.0.0", &url, &body));
        let exit = finish(child);
        assert_exit(&exit, 0);
        rig.expect_version(dev, "inform", "2.0.0");
        let statuses = rig.statuses(dev);
        assert_progress_never_goes_back(&statuses);
        assert_forward(&statuses);
    }
}

/// Bytes shaped like a filesystem image: data, and runs of zeros.
pub fn fs_image(len: usize, seed: u64) -> Vec<u8> {
    let mut out = random_bytes(len, seed);
    for (i, b) in out.iter_mut().enumerate() {
        if (i / 65536) % 5 == 0 {
            *b = 0;
        }
    }
    out
}

/// A "monthly" change of `old`: an edit, an insertion, a removal.
pub fn monthly_change(old: &[u8]) -> Vec<u8> {
    let mut new = old.to_vec();
    let n = new.len();
    new[n / 7..n / 7 + 10_000].fill(7);
    new.splice(n / 2..n / 2, random_bytes(20_000, 77));
    new.drain(n * 3 / 4..n * 3 / 4 + 30_000);
    new
}

/// The chunk index of `image`, as the platform makes it.
pub fn chunk_index(image: &[u8]) -> Vec<u8> {
    use iot_ota_core::delta::{chunk, Index, Params};
    let params = Params::default();
    Index::build(params, &chunk(params, &mut &image[..]).expect("chunking")).encode()
}

/// `command` with a `delta` naming `index` at `index_url`.
pub fn with_delta(command: &str, index_url: &str, index: &[u8]) -> String {
    let mut v: serde_json::Value = serde_json::from_str(command).expect("a JSON command");
    v["data"]["delta"] = serde_json::json!({
        "index": index_url,
        "indexSha256": digest_hex(SignMethod::Sha256, index),
        "indexSize": index.len(),
    });
    v.to_string()
}

/// The bytes and number of the Range requests the server got for `path`.
pub fn ranged(rig: &Rig, path: &str) -> (u64, usize) {
    let mut bytes = 0;
    let mut n = 0;
    for r in rig.files.requests().iter().filter(|r| r.path == path) {
        let Some(range) = r.range.as_deref().and_then(|r| r.strip_prefix("bytes=")) else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        if let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) {
            bytes += b - a + 1;
            n += 1;
        }
    }
    (bytes, n)
}

/// A delta update: the running version's image (1.0.0) is in the output
/// directory as `firmware-1.0.0.bin` (the examples' own base; the agent is
/// told with `base_flag`, its `--delta-base`), the command names the new
/// image's chunk index: the program fetches at most a quarter of the image,
/// in ranges only, informs 2.0.0, and its DOWNLOADING reports say the plan.
pub fn delta_update(fe: &Frontend, rig: &Rig, dev: &str, base_flag: Option<&str>) {
    let old = fs_image(2 << 20, 5);
    let new = monthly_change(&old);
    let index = chunk_index(&new);
    std::fs::create_dir_all(dir(rig, dev)).expect("the device's directory");
    let base = dir(rig, dev).join("firmware-1.0.0.bin");
    std::fs::write(&base, &old).expect("the running image");
    let path = format!("/{dev}-delta.bin");
    let url = rig.files.add(&path, Route::file(new.clone()));
    let index_url = rig
        .files
        .add(&format!("{path}.idx"), Route::file(index.clone()));
    let extra: Vec<String> = match base_flag {
        Some(flag) => vec![flag.to_owned(), base.display().to_string()],
        None => Vec::new(),
    };
    let child = fe.start_with(rig, dev, &extra);
    rig.expect_version(dev, "inform", "1.0.0");
    rig.push(
        dev,
        with_delta(&command("d1", "2.0.0", &url, &new), &index_url, &index),
    );
    let exit = finish(child);
    assert_exit(&exit, 0);
    rig.expect_version(dev, "inform", "2.0.0");
    let (bytes, requests) = ranged(rig, &path);
    assert!(
        bytes > 0 && bytes <= new.len() as u64 / 4,
        "{bytes} of {} bytes fetched\n{}",
        new.len(),
        exit.stderr
    );
    assert!((1..=64).contains(&requests), "{requests} requests");
    assert!(
        rig.files
            .requests()
            .iter()
            .all(|r| r.path != path || r.range.is_some()),
        "a whole GET of the image"
    );
    let descs: Vec<String> = rig
        .all(dev, "progress")
        .iter()
        .filter(|m| m["data"]["status"] == 1)
        .filter_map(|m| m["data"]["desc"].as_str().map(str::to_owned))
        .collect();
    assert!(descs.iter().any(|d| d.starts_with("delta: ")), "{descs:?}");
    assert_forward(&rig.statuses(dev));
}

/// A delta cut by a kill -9 goes on after a restart (the journal names the
/// upgrade and its chunk index): the part file's whole chunks are kept,
/// and only Range requests from past them follow.
pub fn delta_resume_after_kill(fe: &Frontend, rig: &Rig, dev: &str, base_flag: Option<&str>) {
    let old = fs_image(2 << 20, 6);
    // Changed at the start: the first step is a long fetch.
    let mut new = old.clone();
    new[..400_000].copy_from_slice(&random_bytes(400_000, 66));
    let index = chunk_index(&new);
    std::fs::create_dir_all(dir(rig, dev)).expect("the device's directory");
    let base = dir(rig, dev).join("firmware-1.0.0.bin");
    std::fs::write(&base, &old).expect("the running image");
    let path = format!("/{dev}-dkill.bin");
    let url = rig.files.add(&path, Route::slow(new.clone(), 100_000));
    let index_url = rig
        .files
        .add(&format!("{path}.idx"), Route::file(index.clone()));
    let extra: Vec<String> = match base_flag {
        Some(flag) => vec![flag.to_owned(), base.display().to_string()],
        None => Vec::new(),
    };
    let mut child = fe.start_with(rig, dev, &extra);
    rig.expect_version(dev, "inform", "1.0.0");
    rig.push(
        dev,
        with_delta(&command("k1", "2.0.0", &url, &new), &index_url, &index),
    );
    let part = dir(rig, dev).join("firmware-2.0.0.bin.part");
    let deadline = Instant::now() + WAIT;
    while std::fs::metadata(&part).map_or(0, |m| m.len()) < 150_000 {
        assert!(Instant::now() < deadline, "the delta did not get going");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("kill -9");
    let _ = child.wait();
    let written = std::fs::metadata(&part).map_or(0, |m| m.len());
    rig.files.clear_requests();
    rig.files.set(&path, Route::file(new.clone()));
    let exit = finish(fe.start_with(rig, dev, &extra));
    assert_exit(&exit, 0);
    rig.expect_version(dev, "inform", "2.0.0");
    let image_requests: Vec<_> = rig
        .files
        .requests()
        .into_iter()
        .filter(|r| r.path == path)
        .collect();
    assert!(!image_requests.is_empty(), "{}", exit.stderr);
    for r in &image_requests {
        let from: u64 = r
            .range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split('-').next()?.parse().ok())
            .unwrap_or_else(|| panic!("not a Range request: {r:?}"));
        // At most the chunk that was being written is asked for again.
        assert!(
            from + 64 * 1024 >= written,
            "from {from}, {written} written"
        );
    }
    assert!(leftovers(rig, dev, "2.0.0").is_empty());
}

/// DOWNLOADING from 0 to 100, DOWNLOADED 100, UPGRADING (any steps) to
/// 100, SUCCESS 100: each status once, in that order.
fn assert_forward(statuses: &[(i64, i64)]) {
    assert_eq!(statuses.first(), Some(&(1, 0)), "{statuses:?}");
    let mut order: Vec<i64> = statuses.iter().map(|s| s.0).collect();
    order.dedup();
    assert_eq!(order, [1, 2, 3, 4], "{statuses:?}");
    for status in 1..=4 {
        let last = statuses.iter().rev().find(|s| s.0 == status);
        assert_eq!(last, Some(&(status, 100)), "{statuses:?}");
    }
}

/// A full disk mid-download (the part file is a link to /dev/full: every
/// write fails with ENOSPC): FLASH_FAILED with the reason in `desc`, exit
/// 1, and no file of the upgrade left behind.
#[cfg(target_os = "linux")]
pub fn full_disk(fe: &Frontend, rig: &Rig, dev: &str) {
    let body = random_bytes(400_000, 42);
    let url = rig
        .files
        .add(&format!("/{dev}-full.bin"), Route::file(body.clone()));
    std::fs::create_dir_all(dir(rig, dev)).expect("the device's directory");
    let part = dir(rig, dev).join("firmware-2.0.0.bin.part");
    std::os::unix::fs::symlink("/dev/full", &part).expect("a link to /dev/full");
    let child = fe.start(rig, dev);
    rig.expect_version(dev, "inform", "1.0.0");
    rig.push(dev, command("d1", "2.0.0", &url, &body));
    let exit = finish(child);
    assert_exit(&exit, 1);
    let report = rig.expect(dev, "progress", |m| m.json_i64("data.status") == Some(-4));
    let desc = report.json_str("data.desc").unwrap_or_default();
    assert!(desc.contains("No space left on device"), "desc {desc:?}");
    let left = leftovers(rig, dev, "2.0.0");
    assert!(left.is_empty(), "left behind: {left:?}\n{}", exit.stderr);
    assert!(!Path::new(&part).exists());
    assert_progress_never_goes_back(&rig.statuses(dev));
}

/// The table as `#[test]` functions, one a case, for the [`Frontend`]
/// `$frontend` on rigs made by `$rig`, with device names starting with
/// `$prefix`. Put it in a module of its own:
///
/// ```ignore
/// mod example_table {
///     iot_ota_testkit::acceptance_table!(super::c_example(), super::rig(), "c");
/// }
/// ```
#[macro_export]
macro_rules! acceptance_table {
    ($frontend:expr, $rig:expr, $prefix:literal) => {
        #[test]
        fn journals_before_it_acknowledges() {
            $crate::acceptance::journal_before_ack(&$frontend, &$rig, concat!($prefix, "ack"));
        }

        #[test]
        fn resumes_after_kill_9() {
            $crate::acceptance::resume_after_kill(&$frontend, &$rig, concat!($prefix, "kill"));
        }

        #[test]
        fn progress_only_goes_forward() {
            $crate::acceptance::progress_goes_forward(&$frontend, &$rig, concat!($prefix, "fwd"));
        }

        #[cfg(target_os = "linux")]
        #[test]
        fn on_a_full_disk_says_why_and_leaves_nothing() {
            $crate::acceptance::full_disk(&$frontend, &$rig, concat!($prefix, "full"));
        }
    };
}
