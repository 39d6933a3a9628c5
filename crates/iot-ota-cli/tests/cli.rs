//! The `iot-ota` binary: the demo, the API subcommands and the device agent.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use iot_ota_platform::api::{BatchView, CreatedBatch, FirmwareInfo};
use iot_ota_platform::{ApiClient, BrokerChoice, Platform, PlatformConfig};
use iot_ota_testkit::{random_bytes, TempDir, WireRecorder};

const BIN: &str = env!("CARGO_BIN_EXE_iot-ota");

async fn run(args: &[&str]) -> Output {
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(BIN)
            .args(args)
            .env_remove("IOT_OTA_API")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("iot-ota finished in time")
    .expect("iot-ota runs");
    out
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The platform as it ships: only registered devices use its broker
/// (`agent_serving` registers each agent).
async fn platform(dir: &Path) -> Platform {
    let mut c = PlatformConfig::new(dir);
    c.http_addr = ([127, 0, 0, 1], 0).into();
    c.broker = BrokerChoice::Embedded(([127, 0, 0, 1], 0).into());
    Platform::start(c).await.unwrap()
}

/// An open broker (`--mqtt-anonymous`), for tests whose wire recorder
/// plays or watches every device on one connection.
async fn open_platform(dir: &Path) -> Platform {
    let mut c = PlatformConfig::new(dir);
    c.http_addr = ([127, 0, 0, 1], 0).into();
    c.broker = BrokerChoice::Embedded(([127, 0, 0, 1], 0).into());
    c.mqtt_anonymous = true;
    Platform::start(c).await.unwrap()
}

async fn wait_batch(api: &ApiClient, id: i64, pred: impl Fn(&BatchView) -> bool) -> BatchView {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let b = api.show_batch(id).await.unwrap();
        if pred(&b) {
            return b;
        }
        assert!(Instant::now() < deadline, "batch never got there: {b:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_device(api: &ApiClient, product: &str, device: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !api
        .list_devices(Some(product))
        .await
        .unwrap()
        .iter()
        .any(|d| d.device == device && !d.version.is_empty())
    {
        assert!(Instant::now() < deadline, "{device} never informed");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// Waits for a message from `device` after `since_ms` (a restarted agent
/// has connected and informed).
async fn wait_seen_after(api: &ApiClient, device: &str, since_ms: i64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen = api.list_devices(None).await.unwrap();
        if seen
            .iter()
            .any(|d| d.device == device && d.last_seen_ms > since_ms)
        {
            return;
        }
        assert!(Instant::now() < deadline, "{device} never came back");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_exits_0() {
    let o = run(&["demo"]).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("device-")).collect();
    assert_eq!(rows.len(), 5, "{out}");
    for r in rows {
        assert!(r.contains(" success ") && r.contains("2.0.0"), "{r}");
    }
    assert!(
        out.contains("completed: 5 records, 5 success, 0 failed, 0 unfinished"),
        "{out}"
    );
    assert!(out.contains("signed by key"), "the demo signs: {out}");
}

/// `demo --delta`: every device fetches only the changed chunks of 2.0.0
/// (signed, its manifest naming the chunk index), and the demo says how
/// much the firmware server sent against the full images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_delta_fetches_a_small_part_of_the_images() {
    let o = run(&["demo", "--delta", "--devices", "3"]).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("completed: 3 records, 3 success"), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("firmware server: "))
        .unwrap_or_else(|| panic!("no firmware server line: {out}"));
    let pct: u64 = line
        .rsplit_once('(')
        .and_then(|(_, p)| p.split('%').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no percent in {line}"));
    assert!(pct <= 25, "{line}");
    assert!(line.contains("the full images: 12.0 MiB"), "{line}");
}

/// The line of the final table that starts with `name`.
fn row_of(out: &str, name: &str) -> String {
    out.lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no row for {name}:\n{out}"))
        .to_owned()
}

/// `demo --with-reboot`: agents on slot directories, restarted as the
/// reboot; the healthy ones commit, the unhealthy one rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_with_reboot_commits_after_the_reboot_and_rolls_back_the_unhealthy_one() {
    let o = run(&["demo", "--with-reboot", "--devices", "2", "--size-mib", "1"]).await;
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    let row = |d: &str| row_of(&out, d);
    for d in ["device-01", "device-02"] {
        let r = row(d);
        assert!(r.contains("success") && r.contains("2.0.0"), "{out}");
    }
    let sick = row("device-unhealthy");
    assert!(
        sick.contains("failed")
            && sick.contains("1.0.0")
            && sick.contains("rolled back: 2.0.0 -> 1.0.0: health check failed"),
        "{out}"
    );
    assert!(out.contains("2 success, 1 failed"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_with_faults_shows_the_failed_records() {
    let o = run(&["demo", "--with-faults", "--devices", "2", "--size-mib", "1"]).await;
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "stdout:\n{out}\nstderr:\n{err}");
    let row = |name: &str| row_of(&out, name);
    let corrupt = row("device-corrupt");
    assert!(corrupt.contains(" success "), "{corrupt}");
    assert!(corrupt.contains("retried after verify failed"), "{corrupt}");
    let offline = row("device-offline");
    assert!(offline.contains(" failed "), "{offline}");
    assert!(
        offline.contains("push failed: no reply within 3 s"),
        "{offline}"
    );
    assert!(
        offline.contains("1.0.0"),
        "still on the old version: {offline}"
    );
    for d in ["device-01", "device-02"] {
        assert!(row(d).contains(" success "), "{out}");
    }
    assert!(
        out.contains("4 records, 3 success, 1 failed, 0 unfinished (push failed: 1)"),
        "{out}"
    );
    // The live log (plain lines when stderr is not a terminal) shows the retry.
    assert!(err.contains("retry after verify failed"), "{err}");
    assert!(err.contains("retry after push failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_subcommands() {
    let dir = TempDir::new("cli-api");
    let p = open_platform(&dir.join("platform")).await;
    let api_url = p.api_url();
    let a = ["--api", api_url.as_str(), "--token", p.api_token()];
    let api = p.client().unwrap();
    let image = dir.join("fw.bin");
    std::fs::write(&image, random_bytes(10_000, 1)).unwrap();
    let img = image.to_str().unwrap();

    let o = run(&api_args(
        &a,
        &[
            "firmware",
            "add",
            "--product",
            "pk",
            "--version",
            "2.0",
            img,
            "--json",
        ],
    ))
    .await;
    assert!(o.status.success(), "{:?}", text(&o));
    let fw: FirmwareInfo = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((fw.name.as_str(), fw.size), ("fw.bin", 10_000));

    let o = run(&api_args(
        &a,
        &[
            "firmware",
            "add",
            "--product",
            "pk",
            "--version",
            "2 0",
            img,
        ],
    ))
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("HTTP 400"), "{:?}", text(&o));

    let o = run(&api_args(&a, &["firmware", "list"])).await;
    let (out, _) = text(&o);
    assert!(out.starts_with("PRODUCT"), "{out}");
    assert!(out.contains(&fw.md5[..12]), "{out}");

    // A device makes itself known.
    let broker = p.broker_url().to_owned();
    let w = tokio::task::spawn_blocking(move || WireRecorder::connect(&broker, "/sys/#"))
        .await
        .unwrap();
    assert!(w.wait_ready_async(Duration::from_secs(10)).await);
    w.publish_async(
        "/sys/pk/d1/ota/firmware/inform",
        iot_ota_core::protocol::encode_inform("1", "1.0"),
        true,
    )
    .await
    .unwrap();
    wait_device(&api, "pk", "d1").await;
    let o = run(&api_args(&a, &["device", "list"])).await;
    let (out, _) = text(&o);
    assert!(
        out.lines()
            .any(|l| l.starts_with("pk") && l.contains("d1") && l.contains("1.0")),
        "{out}"
    );

    // Credentials: made once, listed, revoked.
    let o = run(&api_args(
        &a,
        &[
            "device",
            "add",
            "--product",
            "pk",
            "--device",
            "d2,d3",
            "--json",
        ],
    ))
    .await;
    assert!(o.status.success(), "{:?}", text(&o));
    let reg: iot_ota_platform::api::RegisteredDevices = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(reg.devices.len(), 2);
    assert_eq!(reg.devices[0].username, "pk/d2");
    assert_eq!(reg.devices[0].secret.len(), 64);
    let revoke = ["device", "revoke", "--product", "pk", "--device", "d3"];
    let o = run(&api_args(&a, &revoke)).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let o = run(&api_args(&a, &["device", "list"])).await;
    let (out, _) = text(&o);
    assert!(
        out.lines()
            .any(|l| l.contains("d2") && l.contains("active")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains("d3") && l.contains("revoked")),
        "{out}"
    );
    let o = run(&api_args(&a, &revoke)).await;
    assert_eq!(o.status.code(), Some(1), "revoked twice: {:?}", text(&o));
    assert!(
        text(&o).1.contains("no active credential"),
        "{:?}",
        text(&o)
    );

    let o = run(&api_args(
        &a,
        &[
            "batch",
            "create",
            "--product",
            "pk",
            "--version",
            "2.0",
            "--devices",
            "d1,ghost",
            "--ack-timeout-secs",
            "30",
            "--json",
        ],
    ))
    .await;
    assert!(o.status.success(), "{:?}", text(&o));
    let created: CreatedBatch = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(created.excluded[0].device, "ghost");
    let id = created.batch.id.to_string();

    let o = run(&api_args(&a, &["batch", "show", &id])).await;
    let (out, _) = text(&o);
    assert!(out.contains("in progress: 1 record,"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("d1") && l.contains("pushed") && l.contains("[....")),
        "{out}"
    );

    let o = run(&api_args(&a, &["batch", "list"])).await;
    assert!(
        text(&o).0.lines().nth(2).unwrap().contains("in_progress"),
        "{:?}",
        text(&o)
    );

    let o = run(&api_args(
        &a,
        &["firmware", "delete", "--product", "pk", "--version", "2.0"],
    ))
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("running batch"), "{:?}", text(&o));

    let o = run(&api_args(&a, &["batch", "terminate", &id])).await;
    let (out, _) = text(&o);
    assert!(out.contains("terminated"), "{out}");
    assert!(
        out.contains("batch terminated: terminated by hand"),
        "{out}"
    );

    let o = run(&api_args(
        &a,
        &["firmware", "delete", "--product", "pk", "--version", "2.0"],
    ))
    .await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(api.list_firmware(None).await.unwrap().is_empty());

    let o = run(&["--version"]).await;
    assert!(text(&o).0.starts_with("iot-ota "));
    // With --json an error is JSON too, on stdout.
    let o = run(&["firmware", "list", "--api", "http://127.0.0.1:1", "--json"]).await;
    assert_eq!(o.status.code(), Some(1));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(e["error"].as_str().unwrap().contains("connecting"), "{e}");
    // --api and --json belong to the API subcommands only.
    assert_eq!(run(&["demo", "--json"]).await.status.code(), Some(2));
    let o = run(&["firmware", "list", "--api", "http://127.0.0.1:1"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains("connecting to 127.0.0.1:1"),
        "{:?}",
        text(&o)
    );
    p.shutdown().await;
}

/// `args` with the API options `a` after the first word (the subcommand that
/// takes them: `firmware`, `batch`, `device`).
fn api_args<'a>(a: &[&'a str], args: &[&'a str]) -> Vec<&'a str> {
    let (first, rest) = args.split_first().expect("a subcommand");
    let mut v = vec![*first];
    if *first == "device" {
        // `device list --api ...`: the options belong to `list`.
        v.push(rest[0]);
        v.extend_from_slice(a);
        v.extend_from_slice(&rest[1..]);
    } else {
        v.extend_from_slice(a);
        v.extend_from_slice(rest);
    }
    v
}

/// A batch of product `pk` to `version`: a 10 s ack timeout, an upgrade
/// timeout of `timeout_secs`, no retries.
fn batch_of(version: &str, timeout_secs: f64) -> iot_ota_platform::api::CreateBatch {
    iot_ota_platform::api::CreateBatch {
        product: "pk".into(),
        firmware_version: version.into(),
        ack_timeout_secs: Some(10.0),
        timeout_secs: Some(timeout_secs),
        ..Default::default()
    }
}

/// Starts `iot-ota device run --once` with `extra` arguments, for device `name`.
fn agent(p: &Platform, dir: &TempDir, name: &str, extra: &[&str]) -> tokio::process::Child {
    agent_in(p, dir, name, &dir.join(format!("{name}-work")), extra)
}

/// [`agent`] with this work directory, run from `dir`.
fn agent_in(
    p: &Platform,
    dir: &TempDir,
    name: &str,
    work: &Path,
    extra: &[&str],
) -> tokio::process::Child {
    agent_cmd(p, dir, name, work, extra).spawn().unwrap()
}

/// The command [`agent_in`] spawns (with `--once`).
fn agent_cmd(
    p: &Platform,
    dir: &TempDir,
    name: &str,
    work: &Path,
    extra: &[&str],
) -> tokio::process::Command {
    let mut cmd = agent_serving(p, dir, name, work, extra);
    cmd.arg("--once");
    cmd
}

/// The agent of `name`, serving until it is stopped or "reboots".
fn agent_serving(
    p: &Platform,
    dir: &TempDir,
    name: &str,
    work: &Path,
    extra: &[&str],
) -> tokio::process::Command {
    let version_file = dir.join(format!("{name}.version"));
    std::fs::write(&version_file, "1.0.0\n").unwrap();
    // Registered (again, at every start of it: a new secret each time).
    let login = p
        .register_devices("pk", &[name.to_owned()])
        .unwrap()
        .remove(0);
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args([
        "device",
        "run",
        "--broker",
        p.broker_url(),
        "--product-key",
        "pk",
        "--device-name",
        name,
        "--version-file",
        version_file.to_str().unwrap(),
        "--work-dir",
        work.to_str().unwrap(),
        "--username",
        &login.username,
    ])
    .env("IOT_OTA_DEVICE_PASSWORD", &login.secret)
    .args(extra)
    .current_dir(dir.path())
    .kill_on_drop(true)
    .stderr(std::process::Stdio::piped());
    cmd
}

async fn finish(mut child: tokio::process::Child) -> (Option<i32>, String) {
    use tokio::io::AsyncReadExt;
    let mut stderr = child.stderr.take().unwrap();
    let log = tokio::spawn(async move {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text).await;
        String::from_utf8_lossy(&text).into_owned()
    });
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    if status.is_err() {
        let _ = child.kill().await;
    }
    let log = log.await.unwrap();
    let status = status.unwrap_or_else(|_| panic!("the agent did not exit in 30 s:\n{log}"));
    (status.unwrap().code(), log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_agent_installs_into_slots_and_runs_commands() {
    let dir = TempDir::new("cli-agent");
    let p = platform(&dir.join("platform")).await;
    let api = p.client().unwrap();
    let image = random_bytes(200_000, 2);
    api.add_firmware("pk", "2.0.0", "fw.bin", &image)
        .await
        .unwrap();
    let slots = dir.join("slots");
    let good = agent(
        &p,
        &dir,
        "slotted",
        &["--install-dir", slots.to_str().unwrap()],
    );
    let bad = agent(
        &p,
        &dir,
        "scripted",
        &[
            "--install-command",
            "echo installing {version} from {file}; echo disk full >&2; exit 3",
        ],
    );
    wait_device(&api, "pk", "slotted").await;
    wait_device(&api, "pk", "scripted").await;
    let req = batch_of("2.0.0", 20.0);
    let id = api.create_batch(&req).await.unwrap().batch.id;
    let (code, log) = finish(good).await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("rebooting into it"), "{log}");
    assert!(std::fs::read(slots.join("b/firmware.bin")).unwrap() == image);
    // Its last report before the reboot, UPGRADING 100, has reached the
    // platform: the record waits for the reboot.
    let b = wait_batch(&api, id, |b| {
        b.records
            .iter()
            .any(|r| r.device == "slotted" && r.status == Some(3) && r.progress == 100)
    })
    .await;
    let slotted = b.records.iter().find(|r| r.device == "slotted").unwrap();
    assert_eq!(slotted.state, "upgrading", "no success before the reboot");
    // The "reboot": the agent starts again, on the new slot, and commits.
    let again = agent(
        &p,
        &dir,
        "slotted",
        &["--install-dir", slots.to_str().unwrap()],
    );
    let (code, log) = finish(again).await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("2.0.0 committed"), "{log}");
    assert_eq!(
        std::fs::read_to_string(slots.join("booted")).unwrap(),
        "b 2.0.0\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("slotted.version")).unwrap(),
        "2.0.0\n"
    );
    let (code, log) = finish(bad).await;
    assert_eq!(code, Some(1), "{log}");
    let b = wait_batch(&api, id, |b| b.state == "completed").await;
    let rec = |d: &str| b.records.iter().find(|r| r.device == d).unwrap().clone();
    assert_eq!(rec("slotted").state, "success");
    let s = rec("scripted");
    assert_eq!(
        (s.state.as_str(), s.reason.as_deref()),
        ("failed", Some("flash_failed"))
    );
    assert!(
        s.desc.contains("status 3") && s.desc.contains("disk full"),
        "{}",
        s.desc
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("scripted.version")).unwrap(),
        "1.0.0\n",
        "a failed install keeps the version"
    );
    p.shutdown().await;
}

/// The install command gets `{file}` and `{version}` as single shell words (and
/// in `OTA_FILE`, `OTA_VERSION`), even when the path holds quotes, spaces and `$(...)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_agent_quotes_the_install_command() {
    let dir = TempDir::new("cli-quote");
    let p = platform(&dir.join("platform")).await;
    let api = p.client().unwrap();
    let image = random_bytes(30_000, 4);
    api.add_firmware("pk", "2.0.0", "fw.bin", &image)
        .await
        .unwrap();
    let work = dir.join("it's a work dir; $(touch pwned) `touch pwned`");
    let copy = dir.join("installed.bin");
    let seen = dir.join("seen");
    let command = format!(
        "cp {{file}} '{}' && printf '%s|%s|%s\\n' {{version}} \"$OTA_VERSION\" \"$OTA_FILE\" > '{}'",
        copy.display(),
        seen.display()
    );
    let child = agent_in(
        &p,
        &dir,
        "quoted",
        &work,
        &["--install-command", &command, "--reboot-command", ""],
    );
    wait_device(&api, "pk", "quoted").await;
    let req = batch_of("2.0.0", 20.0);
    let id = api.create_batch(&req).await.unwrap().batch.id;
    let (code, log) = finish(child).await;
    assert_eq!(code, Some(0), "{log}");
    assert!(std::fs::read(&copy).unwrap() == image);
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap(),
        format!(
            "2.0.0|2.0.0|{}\n",
            work.join("firmware-2.0.0.bin").display()
        )
    );
    assert!(!dir.join("pwned").exists(), "the path ran as shell syntax");
    let b = wait_batch(&api, id, |b| b.state == "completed").await;
    assert_eq!(b.records[0].state, "success");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_agent_defers_silent_upgrades_to_the_trigger() {
    let dir = TempDir::new("cli-silent");
    let p = platform(&dir.join("platform")).await;
    let api = p.client().unwrap();
    api.add_firmware("pk", "2.0.0", "fw.bin", &random_bytes(50_000, 3))
        .await
        .unwrap();
    let slots = dir.join("slots");
    let child = agent(
        &p,
        &dir,
        "quiet",
        &["--install-dir", slots.to_str().unwrap()],
    );
    wait_device(&api, "pk", "quiet").await;
    let req = iot_ota_platform::api::CreateBatch {
        policy: Some("silent".into()),
        ..batch_of("2.0.0", 30.0)
    };
    let id = api.create_batch(&req).await.unwrap().batch.id;
    // Downloaded and verified (status 2), then it waits.
    wait_batch(&api, id, |b| b.records[0].status == Some(2)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let b = api.show_batch(id).await.unwrap();
    assert_eq!(b.records[0].state, "upgrading");
    assert!(
        !slots.join("b").exists(),
        "nothing installed before the trigger"
    );
    std::fs::write(dir.join("quiet-work").join("install-now"), "").unwrap();
    let (code, log) = finish(child).await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("silent"), "{log}");
    let again = agent(
        &p,
        &dir,
        "quiet",
        &["--install-dir", slots.to_str().unwrap()],
    );
    let (code, log) = finish(again).await;
    assert_eq!(code, Some(0), "{log}");
    let b = wait_batch(&api, id, |b| b.state == "completed").await;
    assert_eq!(b.records[0].state, "success");
    assert!(!dir.join("quiet-work").join("install-now").exists());
    p.shutdown().await;
}

/// Runs the agent of `name` again and again (each start a boot) until it
/// exits with something other than a reboot, at most `boots` times; returns
/// the last exit code and every log.
async fn boots(
    p: &Platform,
    dir: &TempDir,
    name: &str,
    extra: &[&str],
    boots: usize,
) -> (Option<i32>, String) {
    let mut all = String::new();
    for _ in 0..boots {
        let (code, log) = finish(agent(p, dir, name, extra)).await;
        all.push_str(&log);
        let rebooted = log.contains("rebooting");
        if code != Some(0) || !rebooted {
            return (code, all);
        }
    }
    (None, all)
}

/// An image whose health check fails is rolled back with a reboot; one that
/// crashes the device before it is confirmed is rolled back by the
/// bootloader. Both records fail with `rolled back`, and the devices inform
/// the version they run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_agent_rolls_back_a_bad_image() {
    let dir = TempDir::new("cli-rollback");
    let p = platform(&dir.join("platform")).await;
    let api = p.client().unwrap();
    api.add_firmware("pk", "2.0.0", "fw.bin", &random_bytes(40_000, 5))
        .await
        .unwrap();
    let sick_slots = dir.join("sick-slots");
    let sick = [
        "--install-dir",
        sick_slots.to_str().unwrap(),
        "--health-command",
        "echo no network >&2; exit 1",
    ];
    // The health check kills the agent itself (a crash while confirming);
    // the bootloader gives the new slot one try.
    let crash_slots = dir.join("crash-slots");
    let crash = [
        "--install-dir",
        crash_slots.to_str().unwrap(),
        "--health-command",
        "kill -9 $PPID",
        "--boot-limit",
        "1",
    ];
    let first = [
        agent(&p, &dir, "sick", &sick),
        agent(&p, &dir, "crash", &crash),
    ];
    wait_device(&api, "pk", "sick").await;
    wait_device(&api, "pk", "crash").await;
    let req = batch_of("2.0.0", 60.0);
    let id = api.create_batch(&req).await.unwrap().batch.id;
    for child in first {
        let (code, log) = finish(child).await;
        assert_eq!(code, Some(0), "{log}");
        assert!(log.contains("rebooting into it"), "{log}");
    }
    let (code, log) = boots(&p, &dir, "sick", &sick, 3).await;
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("rolling back"), "{log}");
    // The crashing one: killed on its first boot of 2.0.0, then back on 1.0.0.
    let (code, log) = finish(agent(&p, &dir, "crash", &crash)).await;
    assert_eq!(code, None, "killed by its health check: {log}");
    let (code, log) = finish(agent(&p, &dir, "crash", &crash)).await;
    assert_eq!(code, Some(1), "{log}");
    let b = wait_batch(&api, id, |b| b.state == "completed").await;
    for (device, why) in [
        ("sick", "health check failed"),
        ("crash", "bootloader fell back to 1.0.0"),
    ] {
        let r = b.records.iter().find(|r| r.device == device).unwrap();
        assert_eq!(
            (r.state.as_str(), r.reason.as_deref()),
            ("failed", Some("rolled_back")),
            "{device}"
        );
        assert!(
            r.desc.starts_with("rolled back: 2.0.0 -> 1.0.0") && r.desc.contains(why),
            "{device}: {}",
            r.desc
        );
    }
    for device in ["sick", "crash"] {
        let d = api.list_devices(Some("pk")).await.unwrap();
        let d = d.iter().find(|d| d.device == device).unwrap();
        assert_eq!(d.version, "1.0.0", "{device}");
    }
    for slots in [&sick_slots, &crash_slots] {
        assert_eq!(
            std::fs::read_to_string(slots.join("booted")).unwrap(),
            "a 1.0.0\n"
        );
    }
    p.shutdown().await;
}

/// The power-cut soak: each run upgrades one agent on slot directories
/// (healthy, or with a failing health check) and kills it with SIGKILL at
/// random moments, 1 to 3 times, across the download, the install, the
/// reboot and the confirmation, restarting it each time (and after each
/// reboot) as systemd would. Every run must end committed (running 2.0.0)
/// or rolled back (running 1.0.0), with a readable journal, and with no
/// SUCCESS report or inform of a version the device does not run.
///
/// Short form here (4 runs); the long form:
/// `IOT_OTA_SOAK_RUNS=100 cargo test -p iot-ota-cli --test cli power_cut -- --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_soak_always_ends_committed_or_rolled_back() {
    use iot_ota_core::journal::{Journal, Phase};
    let runs: usize = std::env::var("IOT_OTA_SOAK_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let dir = TempDir::new("cli-soak");
    let p = open_platform(&dir.join("platform")).await;
    let api = p.client().unwrap();
    let wire = WireRecorder::connect(p.broker_url(), "/sys/#");
    assert!(wire.wait_ready(Duration::from_secs(10)));
    api.add_firmware("pk", "2.0.0", "fw.bin", &random_bytes(3 << 20, 9))
        .await
        .unwrap();
    let mut seed = now_ms() as u64 | 1;
    eprintln!("soak seed {seed}");
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let (mut committed, mut rolled_back, mut kills) = (0, 0, 0);
    let started = Instant::now();
    for run in 0..runs {
        let name = format!("soak-{run}");
        let healthy = run % 3 != 2;
        let slots = dir.join(format!("{name}-slots"));
        let mut extra = vec!["--install-dir".to_owned(), slots.display().to_string()];
        if !healthy {
            extra.extend(["--health-command".to_owned(), "exit 1".to_owned()]);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let spawn = || {
            let work = dir.join(format!("{name}-work"));
            let mut cmd = agent_serving(&p, &dir, &name, &work, &extra);
            cmd.stderr(std::process::Stdio::null());
            cmd.spawn().unwrap()
        };
        let mut child = spawn();
        wait_device(&api, "pk", &name).await;
        let req = iot_ota_platform::api::CreateBatch {
            product: "pk".into(),
            firmware_version: "2.0.0".into(),
            devices: Some(vec![name.clone()]),
            retries: Some(3),
            retry_interval_secs: Some(1.0),
            ack_timeout_secs: Some(3.0),
            timeout_secs: Some(20.0),
            validity_secs: Some(40.0),
            ..Default::default()
        };
        let id = api.create_batch(&req).await.unwrap().batch.id;
        let cuts = 1 + rand(3);
        let mut next_cut = Instant::now() + Duration::from_millis(rand(700));
        let mut cut = 0;
        let deadline = Instant::now() + Duration::from_secs(90);
        let record = loop {
            assert!(Instant::now() < deadline, "run {run} did not end");
            if cut < cuts && Instant::now() >= next_cut {
                let _ = child.start_kill(); // SIGKILL
                let _ = child.wait().await;
                cut += 1;
                kills += 1;
                next_cut = Instant::now() + Duration::from_millis(rand(700));
            }
            if child.try_wait().unwrap().is_some() {
                child = spawn(); // the reboot, or the power back on
            }
            let b = api.show_batch(id).await.unwrap();
            if b.state != "in_progress" && cut >= cuts {
                break b.records[0].clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Let a last start settle what the journal says, then stop.
        tokio::time::sleep(Duration::from_millis(300)).await;
        if child.try_wait().unwrap().is_some() {
            child = spawn();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let _ = child.start_kill();
        let _ = child.wait().await;

        let work = dir.join(format!("{name}-work"));
        let aside: Vec<_> = std::fs::read_dir(&work)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("unreadable"))
            .collect();
        assert!(aside.is_empty(), "run {run}: a journal was set aside");
        let journal = Journal::decode(&std::fs::read(work.join("journal")).unwrap())
            .unwrap_or_else(|e| panic!("run {run}: {e}"));
        let booted = std::fs::read_to_string(slots.join("booted")).unwrap();
        let topic = |kind: &str| format!("/sys/pk/{name}/ota/firmware/{kind}");
        let informs = wire.versions_on(&topic("inform"));
        let successes = wire
            .progress_on(&topic("progress"))
            .iter()
            .filter(|(status, _)| *status == 4)
            .count();
        let info = format!(
            "run {run} (healthy {healthy}, {cuts} cuts): {journal:?}, booted {booted:?}, informs {informs:?}, record {record:?}"
        );
        match journal.phase {
            Phase::Committed => {
                assert!(healthy, "{info}");
                assert_eq!(booted, "b 2.0.0\n", "{info}");
                assert_eq!(record.state, "success", "{info}");
                assert!(successes >= 1, "{info}");
                committed += 1;
            }
            Phase::RolledBack => {
                assert!(!healthy, "{info}");
                assert_eq!(booted, "a 1.0.0\n", "{info}");
                assert!(!informs.iter().any(|v| v == "2.0.0"), "{info}");
                assert_eq!(successes, 0, "{info}");
                assert_eq!(record.reason.as_deref(), Some("rolled_back"), "{info}");
                rolled_back += 1;
            }
            _ => panic!("neither committed nor rolled back: {info}"),
        }
    }
    eprintln!(
        "soak: {runs} runs, {kills} kills: {committed} committed, {rolled_back} rolled back, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    p.shutdown().await;
}

/// A RAUC system in a directory (tests/rauc/setup.sh: two file-backed
/// slots, RAUC's `custom` bootloader backend as a script keeping its state
/// in a file, a test CA, bundles 2.0.0 and 3.0.0), with its own D-Bus and
/// `rauc service`. A "reboot" restarts the service on the slot the script's
/// bootloader picks.
struct RaucSystem {
    dir: PathBuf,
    bus: String,
    dbus: std::process::Child,
    service: Option<std::process::Child>,
}

impl RaucSystem {
    /// Builds it, or says why it cannot run here (`None`): a missing tool
    /// or not root. With IOT_OTA_REQUIRE_RAUC set (scripts/test as root),
    /// that is a failure.
    fn new(dir: &Path) -> Option<RaucSystem> {
        let missing: Vec<_> = ["rauc", "mksquashfs", "dbus-daemon", "openssl"]
            .into_iter()
            .filter(|t| {
                !std::process::Command::new("sh")
                    .args(["-c", &format!("command -v {t}")])
                    .stdout(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .collect();
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout == b"0\n");
        if !missing.is_empty() || !root {
            let why = format!("the RAUC test needs root and {missing:?}");
            assert!(std::env::var_os("IOT_OTA_REQUIRE_RAUC").is_none(), "{why}");
            eprintln!("SKIPPED: {why} (scripts/test installs them)");
            return None;
        }
        let setup = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rauc/setup.sh");
        let out = std::process::Command::new("sh")
            .arg(&setup)
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bus = format!("unix:path={}", dir.join("bus.sock").display());
        let dbus = std::process::Command::new("dbus-daemon")
            .args(["--session", "--nofork", &format!("--address={bus}")])
            .spawn()
            .unwrap();
        let mut system = RaucSystem {
            dir: dir.to_owned(),
            bus,
            dbus,
            service: None,
        };
        system.boot();
        Some(system)
    }

    fn rauc(&self) -> std::process::Command {
        let mut c = std::process::Command::new("rauc");
        c.env("DBUS_SESSION_BUS_ADDRESS", &self.bus)
            .env("DBUS_STARTER_BUS_TYPE", "session");
        c
    }

    /// Power-cycles: the bootloader picks a slot, RAUC's service starts on it.
    fn boot(&mut self) -> String {
        if let Some(mut s) = self.service.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let out = std::process::Command::new(self.dir.join("bootloader.sh"))
            .arg("boot")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let slot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("service.log"))
            .unwrap();
        let conf = format!("--conf={}", self.dir.join("system.conf").display());
        let service = self
            .rauc()
            .args([
                conf.as_str(),
                "service",
                &format!("--override-boot-slot={slot}"),
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.service = Some(service);
        for _ in 0..200 {
            let up = self.rauc().arg("status").output().unwrap().status.success();
            if up {
                return slot;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "rauc service did not come up: {}",
            std::fs::read_to_string(self.dir.join("service.log")).unwrap_or_default()
        );
    }

    /// `rauc status` of slot `name`: (boot_status, bundle version).
    fn slot(&self, name: &str) -> (String, Option<String>) {
        let out = self
            .rauc()
            .args(["status", "--detailed", "--output-format=json"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let slot = v["slots"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|e| e.get(name))
            .unwrap()
            .clone();
        (
            slot["boot_status"].as_str().unwrap_or("").to_owned(),
            slot["slot_status"]["bundle"]["version"]
                .as_str()
                .map(str::to_owned),
        )
    }
}

impl Drop for RaucSystem {
    fn drop(&mut self) {
        if let Some(mut s) = self.service.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = self.dbus.kill();
        let _ = self.dbus.wait();
        // A service killed mid-install leaves the bundle mounted.
        let _ = std::process::Command::new("umount")
            .arg(self.dir.join("mnt/bundle"))
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The agent on the real RAUC: a bundle installed with `rauc install`,
/// confirmed with `mark-good` after the reboot; the next one fails its
/// health check, is marked bad, and the bootloader's fallback is kept
/// (`mark-active`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_agent_installs_with_rauc() {
    let dir = TempDir::new("cli-rauc");
    let Some(mut rauc) = RaucSystem::new(&dir.join("rauc")) else {
        return;
    };
    let p = platform(&dir.join("platform")).await;
    let api = p.client().unwrap();
    for v in ["2.0.0", "3.0.0"] {
        let bundle = std::fs::read(rauc.dir.join(format!("bundle-{v}.raucb"))).unwrap();
        api.add_firmware("pk", v, "update.raucb", &bundle)
            .await
            .unwrap();
    }
    let run = |rauc: &RaucSystem, extra: &[&str]| {
        let mut args = vec!["--install-rauc", "--reboot-command", "true"];
        args.extend_from_slice(extra);
        let mut cmd = agent_cmd(&p, &dir, "rauc", &dir.join("rauc-work"), &args);
        cmd.env("DBUS_SESSION_BUS_ADDRESS", &rauc.bus)
            .env("DBUS_STARTER_BUS_TYPE", "session")
            .env("RUST_LOG", "info");
        cmd.spawn().unwrap()
    };
    let batch = |v: &str| batch_of(v, 60.0);
    // 2.0.0: installed into slot B, booted, confirmed.
    let child = run(&rauc, &[]);
    wait_device(&api, "pk", "rauc").await;
    let id = api.create_batch(&batch("2.0.0")).await.unwrap().batch.id;
    let (code, log) = finish(child).await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("rebooting into it"), "{log}");
    assert_eq!(rauc.slot("rootfs.1").1.as_deref(), Some("2.0.0"));
    assert_eq!(rauc.boot(), "B");
    let (code, log) = finish(run(&rauc, &[])).await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("2.0.0 committed"), "{log}");
    assert_eq!(rauc.slot("rootfs.1").0, "good");
    let b = wait_batch(&api, id, |b| b.state == "completed").await;
    assert_eq!(b.records[0].state, "success");

    // 3.0.0: into slot A; its health check fails: marked bad, back to B.
    let since = now_ms();
    let child = run(&rauc, &[]);
    wait_seen_after(&api, "rauc", since).await;
    let id = api.create_batch(&batch("3.0.0")).await.unwrap().batch.id;
    let (code, log) = finish(child).await;
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(rauc.boot(), "A");
    let sick = ["--health-command", "echo no app >&2; exit 1"];
    let (code, log) = finish(run(&rauc, &sick)).await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("rolling back"), "{log}");
    assert_eq!(rauc.slot("rootfs.0").0, "bad");
    assert_eq!(rauc.boot(), "B", "the bootloader skips the bad slot");
    let (code, log) = finish(run(&rauc, &sick)).await;
    assert_eq!(code, Some(1), "{log}");
    let b = wait_batch(&api, id, |b| b.state == "completed").await;
    let r = &b.records[0];
    assert_eq!(
        (r.state.as_str(), r.reason.as_deref()),
        ("failed", Some("rolled_back"))
    );
    assert!(
        r.desc.starts_with("rolled back: 3.0.0 -> 2.0.0"),
        "{}",
        r.desc
    );
    let state = std::fs::read_to_string(rauc.dir.join("bootloader.state")).unwrap();
    assert!(
        state.lines().rfind(|l| l.starts_with("primary=")) == Some("primary=B"),
        "{state}"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_subcommand_serves_until_stopped() {
    let dir = TempDir::new("cli-platform");
    let http = format!("127.0.0.1:{}", iot_ota_testkit::free_port());
    let mqtt = format!("127.0.0.1:{}", iot_ota_testkit::free_port());
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "platform",
            "--data-dir",
            dir.join("data").to_str().unwrap(),
            "--http",
            &http,
            "--mqtt-listen",
            &mqtt,
            // The recorder below plays a device without registering it.
            "--mqtt-anonymous",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let api = ApiClient::new(&format!("http://{http}")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let health = loop {
        if let Ok(h) = api.health().await {
            break h;
        }
        assert!(Instant::now() < deadline, "the platform never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(health["mqtt_connected"], true);
    // The embedded broker takes devices on the chosen port.
    let w = tokio::task::spawn_blocking(move || {
        WireRecorder::connect(&format!("mqtt://{mqtt}"), "/sys/#")
    })
    .await
    .unwrap();
    assert!(w.wait_ready_async(Duration::from_secs(10)).await);
    w.publish_async(
        "/sys/pk/agent/ota/firmware/inform",
        iot_ota_core::protocol::encode_inform("1", "3.1"),
        true,
    )
    .await
    .unwrap();
    wait_device(&api, "pk", "agent").await;
    let o = run(&[
        "device",
        "list",
        "--api",
        &format!("http://{http}"),
        "--json",
    ])
    .await;
    let list: Vec<iot_ota_platform::api::DeviceView> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (list[0].device.as_str(), list[0].version.as_str()),
        ("agent", "3.1")
    );
    child.kill().await.unwrap();
    let out = child.wait_with_output().await.unwrap();
    let banner = String::from_utf8_lossy(&out.stdout);
    assert!(banner.contains(&format!("API http://{http}")), "{banner}");
    // The token, made at this first start, is shown once and kept.
    let token = std::fs::read_to_string(dir.join("data").join("api-token")).unwrap();
    assert!(
        banner.contains(&format!("API token {}", token.trim())),
        "{banner}"
    );
    assert!(dir.join("data").join("platform.db").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn fleet_upgrades_every_device_and_reports_its_figures() {
    let o = run(&["fleet", "--devices", "40", "--push-rate", "6000", "--json"]).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let s: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(s["success"], 40, "{out}");
    assert_eq!(s["failed"], 0, "{out}");
    assert!(
        s["all_success_ms"].as_i64().is_some_and(|ms| ms > 0),
        "{out}"
    );
    // 40 pushes at 6000/min (10 ms apart, jittered): they took at least 200 ms.
    assert!(s["batch_ms"].as_i64().unwrap() >= 200, "{out}");
    assert!(s["push_to_ack_ms"]["p99"].as_i64().is_some(), "{out}");
    assert!(
        s["platform_messages_per_sec"].as_f64().unwrap() > 0.0,
        "{out}"
    );
    assert!(s["fleet_peak_rss_kib"].as_u64().unwrap() > 0, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_rollout_pauses_itself_at_its_error_threshold() {
    // Half the devices fail their install; groups of 10; two failures in a
    // group pause the batch, which the fleet then terminates.
    let o = run(&[
        "fleet",
        "--devices",
        "40",
        "--fail-percent",
        "50",
        "--groups",
        "10,10",
        "--error-threshold",
        "2",
        "--stop-when-paused",
        "--json",
    ])
    .await;
    let (out, err) = text(&o);
    assert!(
        !o.status.success(),
        "not every device succeeded: {out}\n{err}"
    );
    let s: serde_json::Value = serde_json::from_str(&out).expect(&out);
    let why = s["paused"].as_str().expect(&out);
    assert!(why.contains("group 1 of 3"), "{why}");
    assert!(why.contains("at the error threshold (2)"), "{why}");
    let groups = s["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 3, "{out}");
    // Groups 2 and 3 were never pushed: their records ended "batch terminated".
    assert_eq!(groups[1][1], 0, "no success outside group 1: {out}");
    assert!(
        s["failures"]["batch_terminated"].as_u64().unwrap() >= 20,
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fleet_runs_through_an_external_mosquitto() {
    let broker = iot_ota_testkit::Mosquitto::start();
    let url = broker.url();
    let o = run(&["fleet", "--devices", "30", "--broker", &url, "--json"]).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let s: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(s["success"], 30, "{out}");
    assert!(
        s["broker_peak_queue"].is_null(),
        "no embedded broker: {out}"
    );
}

// ---- the acceptance table shared with the Rust and C examples ----

/// The agent, installing in place (no reboot): the install is the commit.
fn agent_frontend() -> iot_ota_testkit::acceptance::Frontend {
    let mut fe = iot_ota_testkit::acceptance::Frontend::new(BIN);
    fe.leading = vec!["device".into(), "run".into()];
    fe.trailing = ["--install-command", "true {file}", "--reboot-command", ""]
        .map(String::from)
        .to_vec();
    fe
}

fn table_rig() -> iot_ota_testkit::Rig {
    iot_ota_testkit::Rig::new("pk", "agent-table")
}

/// The shared table (on main: the C API and the Rust example replied 200
/// before they journaled; the C example's full disk left `.part.meta` and
/// an empty desc).
mod agent_table {
    iot_ota_testkit::acceptance_table!(super::agent_frontend(), super::table_rig(), "a");
}

/// `--delta-base`: a delta update from the running image.
#[test]
fn the_agent_does_a_delta_update_from_its_delta_base() {
    iot_ota_testkit::acceptance::delta_update(
        &agent_frontend(),
        &table_rig(),
        "adelta",
        Some("--delta-base"),
    );
}

/// `VmHWM` (peak resident) and `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// 2,000 outsiders each half-send a 1 MiB CONNECT (1 GiB wanted): the
/// platform process stays within the broker's 64 MiB bound plus a margin,
/// the oldest offenders are closed and counted, and a registered device
/// is still served.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_half_sent_packets_stay_within_the_memory_bound() {
    use tokio::io::AsyncWriteExt;
    let dir = TempDir::new("cli-membound");
    let http = format!("127.0.0.1:{}", iot_ota_testkit::free_port());
    let mqtt = format!("127.0.0.1:{}", iot_ota_testkit::free_port());
    let mut child = tokio::process::Command::new(BIN)
        .args(["platform", "--data-dir", dir.join("data").to_str().unwrap()])
        .args(["--http", &http, "--mqtt-listen", &mqtt])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let token_file = dir.join("data").join("api-token");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(token_file.exists()
        && ApiClient::new(&format!("http://{http}"))
            .unwrap()
            .health()
            .await
            .is_ok())
    {
        assert!(Instant::now() < deadline, "the platform never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = std::fs::read_to_string(&token_file).unwrap();
    let api = ApiClient::new(&format!("http://{http}"))
        .unwrap()
        .with_token(token.trim());
    let (_, before) = rss_kib(pid);

    // A CONNECT announcing 1 MiB, of which 512 KiB are sent.
    let mut half = vec![0x10u8, 0x80, 0x80, 0x40]; // remaining length 1 MiB
    half.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60]);
    half.resize(512 * 1024, b'x');
    let half = std::sync::Arc::new(half);
    let mut hogs = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..2000 {
        let Ok(mut s) = tokio::net::TcpStream::connect(&mqtt).await else {
            continue;
        };
        let half = half.clone();
        tasks.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(20), s.write_all(&half)).await;
            s
        });
        while tasks.len() >= 64 {
            if let Some(Ok(s)) = tasks.join_next().await {
                hogs.push(s);
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        if let Ok(s) = r {
            hogs.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (peak, now) = rss_kib(pid);
    let stats = api.stats().await.unwrap().broker.unwrap();
    eprintln!(
        "RSS before {before} KiB, peak {peak} KiB, now {now} KiB; {} evicted, {} bytes pending",
        stats.evicted, stats.pending_bytes
    );
    // The bound (64 MiB) plus a margin for reads in flight and the
    // allocator's slack.
    assert!(
        peak < before + 64 * 1024 + 64 * 1024,
        "peak RSS {peak} KiB, {before} KiB before"
    );
    assert!(stats.evicted > 1000, "{stats:?}");
    assert!(
        stats.pending_bytes <= 64 * 1024 * 1024 + 2 * 1024 * 1024,
        "{stats:?}"
    );

    // A registered device is served meanwhile (the hogs are still open).
    let reg = api
        .register_devices("pk", &["served".into()])
        .await
        .unwrap();
    let config = iot_ota_device::Config::new(&format!("mqtt://{mqtt}"), "pk", "served", "1.0.0")
        .unwrap()
        .username(reg.devices[0].username.clone())
        .password(reg.devices[0].secret.clone());
    let (client, _upgrades) = iot_ota_device::OtaClient::connect(config).await.unwrap();
    wait_device(&api, "pk", "served").await;
    client.disconnect().await;
    drop(hogs);
    child.kill().await.unwrap();
}

/// A delta cut by a kill -9 goes on after the restart.
#[test]
fn the_agent_resumes_a_delta_after_kill_9() {
    iot_ota_testkit::acceptance::delta_resume_after_kill(
        &agent_frontend(),
        &table_rig(),
        "adkill",
        Some("--delta-base"),
    );
}
