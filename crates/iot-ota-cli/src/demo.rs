//! `iot-ota demo`: a whole batch upgrade on this machine.
//!
//! In this one process, on loopback: the platform with its embedded broker
//! and a temporary directory, N simulated devices on the device SDK (version
//! 1.0.0), a firmware 2.0.0 of random bytes, a batch, live progress bars, and
//! a final table of every record. The demo signs: a fresh Ed25519 key signs
//! the firmware's manifest, and every device pins its public half, so each
//! one checks the signature and the manifest's SHA-256 before installing.
//!
//! `--with-faults` adds two devices:
//! - `device-corrupt` downloads its first attempt from a server that flips
//!   one byte of the image (the simulated device is handed that URL instead of
//!   the command's): the SDK reports VERIFY_FAILED, the platform schedules the
//!   batch's one retry 2 s later, and the second attempt (the real URL)
//!   succeeds. Its record ends in success, "retried after verify failed".
//! - `device-offline` informs its version and disconnects: both pushes go
//!   unanswered (3 s ack timeout in the demo, 10 s on the console), so its
//!   record fails with "push failed".
//!
//! `--with-reboot` runs the devices as device agents instead (`iot-ota
//! device run`, one process each, on slot directories with the simulated
//! bootloader), through the whole cycle: download, install, "reboot" (the
//! agent exits after the install and the demo starts it again, as systemd
//! would), health check, commit. One more device, `device-unhealthy`, gets
//! an image whose health check fails: it rolls back to 1.0.0, and its record
//! fails with `rolled back: ...` (after the batch's one retry does the
//! same). Each agent's log is in `DIR/devices/NAME/agent.log` (`--keep`).
//!
//! `--delta` makes it a delta update: the firmware is a filesystem-like
//! image, 2.0.0 a "monthly" change of 1.0.0 (a few edits, an insertion, a
//! removal), every device holds the 1.0.0 image it runs, and the platform's
//! chunk index lets each fetch only the chunks it lacks. The demo prints
//! the bytes the firmware server sent against what the full images would
//! have been.
//!
//! The exit status is 0 only when every record succeeded, so the demo with
//! faults or with the reboot exits 1 by design.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use iot_ota_device::{Config, OtaClient, Status};
use iot_ota_platform::api::{BatchView, CreateBatch};
use iot_ota_platform::{ApiClient, BrokerChoice, Platform, PlatformConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::table::{overall_percent, reason_text, records_table, totals_line};

const PRODUCT: &str = "demo-product";
const FROM: &str = "1.0.0";
const TO: &str = "2.0.0";

/// `iot-ota demo` options.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Number of simulated devices.
    #[arg(long, default_value_t = 5)]
    pub devices: usize,
    /// Add a device that gets a corrupted download (verify failed, then a retry)
    /// and one that is offline (push failed).
    #[arg(long)]
    pub with_faults: bool,
    /// Run the devices as agent processes on slot directories through
    /// install, reboot (the agent restarted), health check and commit, plus
    /// one whose new image fails its health check and rolls back.
    #[arg(long)]
    pub with_reboot: bool,
    /// Firmware size in MiB.
    #[arg(long, default_value_t = 4)]
    pub size_mib: u64,
    /// A delta update: each device runs 1.0.0 and fetches only the chunks
    /// of 2.0.0 it lacks; the demo shows the bytes saved.
    #[arg(long, conflicts_with = "with_reboot")]
    pub delta: bool,
    /// Keep the temporary directory (database, firmware, downloads) and print its path.
    #[arg(long)]
    pub keep: bool,
    /// Give up (and terminate the batch) after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Normal,
    Corrupt,
    Offline,
    /// A device agent process on slot directories; `false`: its new image
    /// fails the health check.
    Agent(bool),
}

/// Where a device connects, and its MQTT credential (from its registration).
struct Login {
    broker: String,
    username: String,
    secret: String,
}

/// The health check of `device-unhealthy`'s new image.
const SICK: &str = "echo 'the new image does not bring its application up' >&2; exit 1";

/// A device agent run as systemd would run it: started again whenever it
/// exits (after an install, that is the reboot), until the demo ends.
async fn supervised_agent(
    broker: String,
    name: String,
    login: Login,
    healthy: bool,
    dir: PathBuf,
    trusted_pem: PathBuf,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
) {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            let _ = ready.send(Err(format!("{name}: the iot-ota binary: {e}")));
            return;
        }
    };
    let home = dir.join(&name);
    if let Err(e) = std::fs::create_dir_all(&home) {
        let _ = ready.send(Err(format!("{}: {e}", home.display())));
        return;
    }
    let mut ready = Some(ready);
    for boot in 1u32.. {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(home.join("agent.log"));
        let log = match log {
            Ok(l) => l,
            Err(e) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(format!("{name}: agent.log: {e}")));
                }
                return;
            }
        };
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args([
            "device",
            "run",
            "--broker",
            &broker,
            "--product-key",
            PRODUCT,
        ])
        .args(["--device-name", &name, "--version", FROM])
        .args(["--username", &login.username])
        // Not on the command line, where `ps` shows it.
        .env("IOT_OTA_DEVICE_PASSWORD", &login.secret)
        .arg("--work-dir")
        .arg(home.join("work"))
        .arg("--install-dir")
        .arg(home.join("slots"))
        .arg("--trust-key")
        .arg(&trusted_pem)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
        if !healthy {
            cmd.args(["--health-command", SICK]);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(format!("{name}: starting the agent: {e}")));
                }
                return;
            }
        };
        if let Some(r) = ready.take() {
            let _ = r.send(Ok(()));
        }
        let status = child.wait().await;
        log::info!("{name}: boot {boot} ended: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deterministic-enough filler: splitmix64 seeded by the clock.
pub(crate) fn random_bytes(len: usize) -> Vec<u8> {
    seeded_bytes(len, iot_ota_platform::now_ms() as u64)
}

/// `len` bytes of splitmix64 from `seed`: the same for the same seed (the
/// fleet's processes agree on the images of a delta run).
pub(crate) fn seeded_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A filesystem-like image of `len` bytes: data, and runs of zeros (free
/// blocks).
pub(crate) fn fs_like_image(len: usize) -> Vec<u8> {
    let mut out = seeded_bytes(len, 1);
    for (i, b) in out.iter_mut().enumerate() {
        if (i / 65536) % 5 == 0 {
            *b = 0;
        }
    }
    out
}

/// A "monthly" change of `old`: some bytes edited in three places, 20 KB
/// inserted, 30 KB removed.
pub(crate) fn monthly_change(old: &[u8]) -> Vec<u8> {
    let mut new = old.to_vec();
    let n = new.len();
    for at in [n / 9, n / 3, n * 2 / 3] {
        new[at..at + 4096].fill(0x5a);
    }
    new.splice(n / 2..n / 2, seeded_bytes(20_000, 2));
    new.drain(n * 4 / 5..n * 4 / 5 + 30_000);
    new
}

/// A one-route HTTP server that serves `bytes` to any GET: the "bad mirror".
async fn corrupt_server(bytes: Arc<Vec<u8>>) -> std::io::Result<(String, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let bytes = bytes.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let header = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    bytes.len()
                );
                if sock.write_all(header.as_bytes()).await.is_ok() {
                    let _ = sock.write_all(&bytes).await;
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok((format!("http://{addr}/mirror/firmware-{TO}.bin"), task))
}

/// Where a simulated device's images come from, beside the command.
#[derive(Clone)]
struct Images {
    /// The bad mirror of `device-corrupt`'s first attempt.
    corrupt_url: Option<String>,
    /// The 1.0.0 image it runs (`--delta`).
    base: Option<Arc<Vec<u8>>>,
}

/// One simulated device on the SDK: downloads, "installs" in five steps, informs the new version.
async fn simulated_device(
    name: String,
    login: Login,
    kind: Kind,
    dir: PathBuf,
    images: Images,
    trusted: iot_ota_core::manifest::PublicKey,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
) {
    let config = match Config::new(&login.broker, PRODUCT, &name, FROM) {
        Ok(c) => c
            .progress_throttle(5, Duration::from_millis(100))
            .trust_key(trusted)
            .username(login.username)
            .password(login.secret),
        Err(e) => {
            let _ = ready.send(Err(format!("{name}: {e}")));
            return;
        }
    };
    let (client, mut upgrades) = match OtaClient::connect(config).await {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(format!("{name}: {e}")));
            return;
        }
    };
    if kind == Kind::Offline {
        // Known to the platform (it informed 1.0.0 on connecting), then gone.
        client.disconnect().await;
        let _ = ready.send(Ok(()));
        return;
    }
    // The image it runs, for a delta update.
    let Images { corrupt_url, base } = images;
    let base_path = dir.join(format!("{name}-{FROM}.bin"));
    if let Some(bytes) = &base {
        if let Err(e) = std::fs::write(&base_path, bytes.as_slice()) {
            let _ = ready.send(Err(format!("{}: {e}", base_path.display())));
            return;
        }
    }
    let _ = ready.send(Ok(()));
    let mut attempt = 0;
    while let Some(cmd) = upgrades.next().await {
        attempt += 1;
        let mut cmd_used = cmd.clone();
        if kind == Kind::Corrupt && attempt == 1 {
            if let Some(url) = &corrupt_url {
                cmd_used.firmware.url = url.clone();
            }
        }
        let path = dir.join(format!("{name}-{}.bin", cmd.firmware.version));
        let mut download = client.download(&cmd_used);
        if base.is_some() {
            download = download.delta_from(&base_path);
        }
        if download.download_to(&path).await.is_err() {
            // The SDK reported DOWNLOAD_FAILED or VERIFY_FAILED; wait for a retry.
            continue;
        }
        for pct in [20, 40, 60, 80, 100] {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let _ = client.report_progress(Status::Upgrading, pct, "");
        }
        let _ = client.report_progress(Status::Success, 100, "");
        let _ = client.report_version(&cmd.firmware.version);
        let _ = std::fs::remove_file(&path);
    }
}

struct Live {
    multi: MultiProgress,
    bars: Vec<(String, ProgressBar)>,
    plain: bool,
    last: Vec<(String, String)>,
}

impl Live {
    fn new(batch: &BatchView) -> Live {
        let plain = !std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(if plain {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        });
        let style =
            ProgressStyle::with_template("{prefix:<16} [{bar:30.cyan/blue}] {pos:>3}% {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("##.");
        let bars = batch
            .records
            .iter()
            .map(|r| {
                let bar = multi.add(ProgressBar::new(100));
                bar.set_style(style.clone());
                bar.set_prefix(r.device.clone());
                bar.set_message(r.state.clone());
                (r.device.clone(), bar)
            })
            .collect();
        Live {
            multi,
            bars,
            plain,
            last: Vec::new(),
        }
    }

    fn update(&mut self, b: &BatchView, started: Instant) {
        for r in &b.records {
            let status = r
                .status
                .and_then(|s| Status::from_code(s.into()))
                .map(|s| s.name().to_lowercase())
                .unwrap_or_default();
            let mut msg = r.state.replace('_', " ");
            if r.state == "upgrading" && !status.is_empty() {
                msg = format!("{msg} ({status})");
            }
            let why = reason_text(r);
            if !why.is_empty() {
                msg = format!("{msg} - {why}");
            }
            if let Some((_, bar)) = self.bars.iter().find(|(d, _)| *d == r.device) {
                bar.set_position(overall_percent(r) as u64);
                bar.set_message(msg.clone());
                if r.state == "success" || r.state == "failed" {
                    bar.finish();
                }
            }
            if self.plain {
                let key = format!("{} {}", r.state, status);
                match self.last.iter_mut().find(|(d, _)| *d == r.device) {
                    Some((_, k)) if *k == key => {}
                    Some((_, k)) => {
                        *k = key;
                        eprintln!(
                            "[{:>6.2}s] {:<16} {msg}",
                            started.elapsed().as_secs_f64(),
                            r.device
                        );
                    }
                    None => {
                        self.last.push((r.device.clone(), key));
                        eprintln!(
                            "[{:>6.2}s] {:<16} {msg}",
                            started.elapsed().as_secs_f64(),
                            r.device
                        );
                    }
                }
            }
        }
    }

    fn finish(self) {
        for (_, bar) in &self.bars {
            bar.finish();
        }
        let _ = self.multi.clear();
    }
}

fn temp_dir() -> PathBuf {
    std::env::temp_dir().join(format!(
        "iot-ota-demo-{}-{}",
        std::process::id(),
        iot_ota_platform::now_ms()
    ))
}

/// Runs the demo; exit 0 only when every record succeeded.
pub async fn run(args: DemoArgs) -> Result<ExitCode, String> {
    let dir = temp_dir();
    let result = run_in(&args, &dir).await;
    if args.keep {
        println!("kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn run_in(args: &DemoArgs, dir: &Path) -> Result<ExitCode, String> {
    if args.devices == 0 && !args.with_faults && !args.with_reboot {
        return Err("--devices must be at least 1".into());
    }
    let started = Instant::now();
    let downloads = dir.join("devices");
    std::fs::create_dir_all(&downloads).map_err(|e| format!("{}: {e}", downloads.display()))?;
    // The demo signs: a fresh key, its public half pinned by every device.
    let keys = dir.join("keys");
    let key = iot_ota_platform::signing::generate_files(&keys)?;
    let trusted = key.public().clone();
    let trusted_pem = keys.join("signing-key.pub.pem");
    let mut config = PlatformConfig::new(dir.join("platform"));
    config.signing_key = Some(keys.join("signing-key.pem"));
    config.http_addr = ([127, 0, 0, 1], 0).into();
    config.broker = BrokerChoice::Embedded(([127, 0, 0, 1], 0).into());
    let platform = Platform::start(config).await?;
    println!(
        "platform: API {}  broker {}  data {}",
        platform.api_url(),
        platform.broker_url(),
        dir.display()
    );
    let api = platform.client()?;

    let size = (args.size_mib.max(1) * 1024 * 1024) as usize;
    // With --delta: 2.0.0 is a monthly change of the 1.0.0 each device runs.
    let (base, image) = if args.delta {
        let old = fs_like_image(size);
        let new = monthly_change(&old);
        (Some(Arc::new(old)), new)
    } else {
        (None, random_bytes(size))
    };
    let fw = api
        .add_firmware(PRODUCT, TO, &format!("firmware-{TO}.bin"), &image)
        .await
        .map_err(|e| e.to_string())?;
    if args.delta {
        println!(
            "delta: every device runs {FROM}; {TO} changes a few places of it; \
             the platform's chunk index lets each fetch only what it lacks"
        );
    }
    println!(
        "firmware: {PRODUCT} {TO}, {} bytes, md5 {}, signed by key {} (pinned by every device)",
        fw.size,
        fw.md5,
        fw.key_ids.first().map_or("?", |k| &k[..16])
    );

    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let corrupt_url = if args.with_faults {
        let mut bad = image.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        let (url, task) = corrupt_server(Arc::new(bad))
            .await
            .map_err(|e| e.to_string())?;
        tasks.push(task);
        Some(url)
    } else {
        None
    };

    let normal = if args.with_reboot {
        Kind::Agent(true)
    } else {
        Kind::Normal
    };
    let mut fleet: Vec<(String, Kind)> = (1..=args.devices)
        .map(|i| (format!("device-{i:02}"), normal))
        .collect();
    if args.with_faults {
        fleet.push(("device-corrupt".into(), Kind::Corrupt));
        fleet.push(("device-offline".into(), Kind::Offline));
    }
    if args.with_reboot {
        fleet.push(("device-unhealthy".into(), Kind::Agent(false)));
    }
    // Registered, as a real fleet is: the embedded broker admits only
    // known devices, each to its own topics.
    let names: Vec<String> = fleet.iter().map(|(n, _)| n.clone()).collect();
    let registered = api
        .register_devices(PRODUCT, &names)
        .await
        .map_err(|e| format!("registering the devices: {e}"))?;
    println!(
        "devices: {} registered, each with its own MQTT secret",
        registered.devices.len()
    );
    let mut logins = registered.devices.into_iter().map(|d| Login {
        broker: platform.broker_url().to_owned(),
        username: d.username,
        secret: d.secret,
    });
    let mut readies = Vec::new();
    for (name, kind) in &fleet {
        let login = logins.next().expect("one credential per device");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let broker = platform.broker_url().to_owned();
        tasks.push(match *kind {
            Kind::Agent(healthy) => tokio::spawn(supervised_agent(
                broker,
                name.clone(),
                login,
                healthy,
                downloads.clone(),
                trusted_pem.clone(),
                tx,
            )),
            _ => tokio::spawn(simulated_device(
                name.clone(),
                login,
                *kind,
                downloads.clone(),
                Images {
                    corrupt_url: corrupt_url.clone(),
                    base: base.clone(),
                },
                trusted.clone(),
                tx,
            )),
        });
        readies.push(rx);
    }
    let served_before = api.stats().await.map_err(|e| e.to_string())?;
    let outcome = drive(args, &api, &fleet, readies, started).await;
    if outcome.is_ok() {
        let served = api.stats().await.map_err(|e| e.to_string())?;
        let bytes = served.firmware_bytes_served - served_before.firmware_bytes_served;
        let requests = served.firmware_requests - served_before.firmware_requests;
        let whole =
            image.len() as u64 * fleet.iter().filter(|(_, k)| *k != Kind::Offline).count() as u64;
        println!(
            "firmware server: {} sent in {requests} requests; the full images: {}{}",
            crate::table::bytes(bytes),
            crate::table::bytes(whole),
            match (bytes * 100).checked_div(whole) {
                Some(pct) => format!(" ({pct}% of it)"),
                None => String::new(),
            }
        );
    }
    for t in tasks {
        t.abort();
    }
    platform.shutdown().await;
    outcome
}

async fn drive(
    args: &DemoArgs,
    api: &ApiClient,
    fleet: &[(String, Kind)],
    readies: Vec<tokio::sync::oneshot::Receiver<Result<(), String>>>,
    started: Instant,
) -> Result<ExitCode, String> {
    for rx in readies {
        rx.await
            .map_err(|_| "a simulated device stopped".to_string())??;
    }
    // Every device must be known (its inform processed) before the batch.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let known = api
            .list_devices(Some(PRODUCT))
            .await
            .map_err(|e| e.to_string())?;
        if fleet
            .iter()
            .all(|(n, _)| known.iter().any(|d| d.device == *n && d.version == FROM))
        {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {} devices reported their version",
                known.len(),
                fleet.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut notes = Vec::new();
    if args.with_faults {
        notes.push("device-corrupt gets a corrupted first download, device-offline is offline");
    }
    if args.with_reboot {
        notes.push(
            "agents on slot directories, restarted after each install; \
             device-unhealthy's new image fails its health check",
        );
    }
    println!(
        "devices: {} on {FROM}{}",
        crate::table::count(fleet.len() as u64, "device"),
        if notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", notes.join("; "))
        }
    );

    let req = CreateBatch {
        product: PRODUCT.into(),
        firmware_version: TO.into(),
        retries: Some(1),
        retry_interval_secs: Some(2.0),
        ack_timeout_secs: Some(3.0),
        timeout_secs: Some(60.0),
        validity_secs: Some(600.0),
        ..CreateBatch::default()
    };
    let created = api.create_batch(&req).await.map_err(|e| e.to_string())?;
    let id = created.batch.id;
    println!(
        "batch {id}: {}, retries 1 after 2 s, ack timeout 3 s, upgrade timeout 60 s",
        crate::table::count(created.batch.totals.total as u64, "device")
    );
    let mut live = Live::new(&created.batch);
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut batch;
    loop {
        batch = api.show_batch(id).await.map_err(|e| e.to_string())?;
        live.update(&batch, started);
        if batch.state != "in_progress" {
            break;
        }
        if Instant::now() > deadline {
            eprintln!(
                "demo: no end after {} s; terminating the batch",
                args.timeout_secs
            );
            batch = api.terminate_batch(id).await.map_err(|e| e.to_string())?;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    live.finish();
    // Records carry the versions informed during the batch; fill in the rest.
    let devices = api
        .list_devices(Some(PRODUCT))
        .await
        .map_err(|e| e.to_string())?;
    for r in batch.records.iter_mut().filter(|r| r.version.is_none()) {
        r.version = devices
            .iter()
            .find(|d| d.device == r.device)
            .map(|d| d.version.clone());
    }
    println!();
    print!("{}", records_table(&batch, false));
    println!("{}", totals_line(&batch));
    println!("total time {:.1} s", started.elapsed().as_secs_f64());
    let all_ok = batch.totals.success == batch.totals.total;
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
