//! `iot-ota fleet`: N simulated devices in one process, through one batch.
//!
//! Every device is a few tokio tasks on the device SDK's real code paths:
//! its own MQTT connection and identity ([`OtaClient`]: the same engine,
//! link, reports and acknowledgements as a real device), the same download
//! ([`iot_ota_device::Download::fetch_yield`]: HTTP, digest, length checks,
//! progress reports). Only the install is simulated: the verified bytes are
//! not written anywhere, and the device "reboots" into the new version at
//! once (it reports SUCCESS and informs the target version).
//!
//! Memory per device is what a fleet needs, not what one 600 MB/s download
//! needs: `fetch_yield` into one 16 KiB buffer (no pipeline threads, no
//! 256 KiB blocks), and at most `--max-downloads` downloads at a time, as
//! devices sharing one machine's network would. What the fleet measures is
//! printed at the end (`--json`: the same as JSON):
//!
//! - the time from the batch's start to its last success;
//! - push → ack latency (the platform's push to the device's 200 reply, as
//!   the platform timed them) at p50, p95 and p99; push → first progress;
//! - report messages per second the platform handled, its peak RSS and CPU,
//!   and the longest queue in the embedded broker;
//! - this process's peak RSS, per device;
//! - failures by reason.
//!
//! Without `--api`, the platform (and its embedded broker, or `--broker`)
//! runs in this process: each device then costs two descriptors (both ends
//! of its MQTT connection). With `--api`, the fleet joins a platform run
//! elsewhere (`iot-ota platform`), and `--first-index` splits one fleet
//! across processes or machines against one broker: each process runs its
//! own devices; one creates the batch once the platform knows
//! `--fleet-size` devices, the others `--join` it.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use iot_ota_device::{Config, Error as DeviceError, OtaClient, Status};
use iot_ota_platform::api::{BatchView, CreateBatch, RecordView, StatsView};
use iot_ota_platform::{ApiClient, BrokerChoice, Platform, PlatformConfig};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::demo::random_bytes;

const FROM: &str = "1.0.0";
/// `fetch_yield`'s buffer per downloading device.
const CHUNK: usize = 16 * 1024;

/// `iot-ota fleet` options.
#[derive(Args, Debug, Clone)]
pub struct FleetArgs {
    /// Simulated devices in this process.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// The first device's index: devices are dev-K ... dev-(K+N-1), so
    /// processes started with different indexes share one fleet.
    #[arg(long, default_value_t = 0)]
    pub first_index: usize,
    /// Use the platform whose API is here (`iot-ota platform`), instead of
    /// starting one in this process; needs --broker.
    #[arg(long, requires = "broker")]
    pub api: Option<String>,
    /// That platform's API token (to create the batch and upload firmware).
    #[arg(long, env = "IOT_OTA_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The broker the devices connect to (and, without --api, the one the
    /// platform started here uses instead of its embedded broker).
    #[arg(long)]
    pub broker: Option<String>,
    /// Product key of the fleet.
    #[arg(long, visible_alias = "product-key", default_value = "fleet")]
    pub product: String,
    /// The version to upgrade to (uploaded as random bytes of --size-mib
    /// when the platform does not have it yet).
    #[arg(long, default_value = "2.0.0")]
    pub version: String,
    /// Size of the uploaded firmware, MiB.
    #[arg(long, default_value_t = 1)]
    pub size_mib: u64,
    /// Create the batch once the platform knows this many devices of the
    /// product at 1.0.0 (devices of other processes too), over all of them
    /// (default: this process's devices, by name).
    #[arg(long, conflicts_with = "join")]
    pub fleet_size: Option<usize>,
    /// Do not create a batch: follow the newest running batch of the product
    /// (made by another fleet process with --fleet-size).
    #[arg(long)]
    pub join: bool,
    /// New MQTT connections per second, at most (a fleet booting at once).
    #[arg(long, default_value_t = 2000)]
    pub connect_rate: u32,
    /// Downloads at a time in this process, at most.
    #[arg(long, default_value_t = 200)]
    pub max_downloads: usize,
    /// This percentage of the devices fail their (simulated) install with
    /// UPGRADE_FAILED: to watch an error threshold stop a rollout.
    #[arg(long, default_value_t = 0)]
    pub fail_percent: u32,
    /// When the batch pauses itself (its error threshold), terminate it and
    /// end, instead of waiting for a `batch resume`.
    #[arg(long)]
    pub stop_when_paused: bool,
    /// Retries of the batch after a failure (0-5).
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
    /// Give up after this many seconds (the batch is then terminated).
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// A delta update: every device runs the same filesystem-like 1.0.0
    /// image, the upgrade is a "monthly" change of it (uploaded when the
    /// platform does not have it), and each device fetches only the chunks
    /// it lacks (written to a temporary file, then removed). The summary
    /// says the bytes served with and without deltas.
    #[arg(long)]
    pub delta: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub rollout: crate::commands::RolloutArgs,
}

/// Shared by the device tasks.
struct Ctx {
    broker: String,
    product: String,
    downloads: Semaphore,
    connected: AtomicUsize,
    connect_retries: AtomicUsize,
    fail_percent: u32,
    /// With --delta: the 1.0.0 image every device runs, and where each
    /// writes its new image.
    delta: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Set when the run is over: every device disconnects.
    stop: tokio::sync::watch::Receiver<bool>,
}

/// A percentile of sorted values (nearest rank).
fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// p50, p95, p99 and max of some latencies, ms.
#[derive(Debug, Default, Serialize)]
struct Spread {
    p50: Option<i64>,
    p95: Option<i64>,
    p99: Option<i64>,
    max: Option<i64>,
}

impl Spread {
    fn of(mut v: Vec<i64>) -> Spread {
        v.sort_unstable();
        Spread {
            p50: percentile(&v, 50.0),
            p95: percentile(&v, 95.0),
            p99: percentile(&v, 99.0),
            max: v.last().copied(),
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<i64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
        write!(
            f,
            "p50 {}, p95 {}, p99 {}, max {}",
            ms(self.p50),
            ms(self.p95),
            ms(self.p99),
            ms(self.max)
        )
    }
}

/// What `iot-ota fleet` prints.
#[derive(Debug, Default, Serialize)]
struct Summary {
    devices: usize,
    batch: i64,
    batch_state: String,
    /// Why the batch paused itself, if it did.
    paused: Option<String>,
    /// Records per rollout group: (total, success, failed).
    groups: Vec<(usize, usize, usize)>,
    success: usize,
    failed: usize,
    unfinished: usize,
    /// Failures by reason.
    failures: BTreeMap<String, usize>,
    /// From the first connection attempt to every device connected, ms.
    connect_ms: u64,
    /// Connection attempts that had to be repeated.
    connect_retries: usize,
    /// From the batch's creation to the last success (when all succeeded), ms.
    all_success_ms: Option<i64>,
    /// From the batch's creation to its end (or to the give-up), ms.
    batch_ms: i64,
    push_to_ack_ms: Spread,
    push_to_first_progress_ms: Spread,
    /// From the batch's creation to the first progress report of any device, ms.
    first_progress_ms: Option<i64>,
    /// Device messages the platform handled per second over the batch.
    platform_messages_per_sec: f64,
    /// Time the platform spent handling them per second of batch (1000 = one core busy).
    platform_busy_ms_per_sec: f64,
    platform_peak_rss_kib: u64,
    /// The platform's CPU over the batch, in cores (1.0 = one core busy).
    platform_cpu_cores: f64,
    /// The most device messages waiting in the platform at once.
    platform_peak_queue: u64,
    /// The longest queue in the embedded broker (messages); absent with another broker.
    broker_peak_queue: Option<u64>,
    /// Messages the embedded broker dropped at a full queue.
    broker_dropped: Option<u64>,
    /// Firmware bytes the platform's server sent over the batch, and in
    /// how many requests.
    served_bytes: u64,
    served_requests: u64,
    /// What the full image would have cost each device that succeeded.
    full_image_bytes: u64,
    /// This process's peak RSS.
    fleet_peak_rss_kib: u64,
    /// The same per device (with the platform in this process, that is included).
    fleet_rss_per_device_kib: f64,
    platform_in_process: bool,
}

/// Runs the fleet.
pub async fn run(args: FleetArgs) -> Result<ExitCode, String> {
    if args.devices == 0 {
        return Err("--devices must be at least 1".into());
    }
    if args.fail_percent > 100 {
        return Err("--fail-percent is a percentage: 0 to 100".into());
    }
    check_open_files(&args)?;
    let dir = std::env::temp_dir().join(format!("iot-ota-fleet-{}", std::process::id()));
    let mut _platform = None;
    let (api, broker) = match &args.api {
        Some(url) => {
            let mut api = ApiClient::new(url).map_err(|e| e.to_string())?;
            if let Some(t) = &args.token {
                api = api.with_token(t);
            }
            let broker = args.broker.clone().ok_or("--api needs --broker")?;
            (api, broker)
        }
        None => {
            let mut config = PlatformConfig::new(dir.join("platform"));
            config.http_addr = ([127, 0, 0, 1], 0).into();
            config.broker = match &args.broker {
                Some(url) => BrokerChoice::External(url.clone()),
                None => BrokerChoice::Embedded(([127, 0, 0, 1], 0).into()),
            };
            let platform = Platform::start(config).await?;
            let api = platform.client()?;
            let broker = platform.broker_url().to_owned();
            eprintln!(
                "fleet: platform in this process: API {}, broker {}",
                platform.api_url(),
                broker
            );
            _platform = Some(platform);
            (api, broker)
        }
    };
    let result = run_with(&args, &api, &broker, _platform.is_some()).await;
    if let Some(p) = _platform.take() {
        p.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_with(
    args: &FleetArgs,
    api: &ApiClient,
    broker: &str,
    in_process: bool,
) -> Result<ExitCode, String> {
    let creates = !args.join;
    if creates {
        ensure_firmware(args, api).await?;
    }
    let names: Vec<String> = (args.first_index..args.first_index + args.devices)
        .map(|i| format!("dev-{i:05}"))
        .collect();
    // Registered, as a real fleet is (each process its own devices): the
    // embedded broker admits only known devices, each to its own topics.
    let started = Instant::now();
    let mut secrets = Vec::with_capacity(names.len());
    for chunk in names.chunks(iot_ota_platform::api::MAX_REGISTER) {
        let reg = api
            .register_devices(&args.product, chunk)
            .await
            .map_err(|e| format!("registering the fleet's devices: {e}"))?;
        secrets.extend(reg.devices.into_iter().map(|d| (d.username, d.secret)));
    }
    eprintln!(
        "fleet: {} devices registered in {:.1} s",
        names.len(),
        started.elapsed().as_secs_f64()
    );
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    // --delta: the 1.0.0 image every device runs, once, on disk.
    let delta = if args.delta {
        let work = std::env::temp_dir().join(format!("iot-ota-fleet-{}-delta", std::process::id()));
        std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        let base = work.join(format!("{FROM}.img"));
        let size = (args.size_mib.max(1) * 1024 * 1024) as usize;
        std::fs::write(&base, crate::demo::fs_like_image(size))
            .map_err(|e| format!("{}: {e}", base.display()))?;
        Some((base, work))
    } else {
        None
    };
    let ctx = Arc::new(Ctx {
        delta: delta.clone(),
        stop: stop_rx,
        broker: broker.to_owned(),
        product: args.product.clone(),
        downloads: Semaphore::new(args.max_downloads.max(1)),
        connected: AtomicUsize::new(0),
        connect_retries: AtomicUsize::new(0),
        fail_percent: args.fail_percent,
    });

    // Boot the fleet, at most --connect-rate connections per second.
    let boot = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let gap = Duration::from_secs_f64(1.0 / f64::from(args.connect_rate.max(1)));
    for (i, (name, login)) in names.iter().zip(secrets).enumerate() {
        let due = boot + gap.mul_f64(i as f64);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        tasks.spawn(device(
            ctx.clone(),
            name.clone(),
            args.first_index + i,
            login,
        ));
    }
    let deadline = boot + Duration::from_secs(args.timeout_secs);
    let mut last_line = Instant::now();
    while ctx.connected.load(Ordering::Relaxed) < args.devices {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {} devices connected to {broker} within {} s",
                ctx.connected.load(Ordering::Relaxed),
                args.devices,
                args.timeout_secs
            ));
        }
        if last_line.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "fleet: {} of {} devices connected",
                ctx.connected.load(Ordering::Relaxed),
                args.devices
            );
            last_line = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_ms = boot.elapsed().as_millis() as u64;
    eprintln!(
        "fleet: {} devices connected in {:.1} s",
        args.devices,
        connect_ms as f64 / 1000.0
    );

    // The platform must know the devices (their informs) before the batch.
    let known_needed = if args.join {
        0
    } else {
        args.fleet_size.unwrap_or(args.devices)
    };
    let ours: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
    loop {
        let devices = api
            .list_devices(Some(&args.product))
            .await
            .map_err(|e| e.to_string())?;
        let known = devices
            .iter()
            .filter(|d| {
                d.version == FROM && (args.fleet_size.is_some() || ours.contains(d.device.as_str()))
            })
            .count();
        if known >= known_needed {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the platform knows {known} of {known_needed} devices at {FROM} after {} s",
                args.timeout_secs
            ));
        }
        if last_line.elapsed() > Duration::from_secs(2) {
            eprintln!("fleet: the platform knows {known} of {known_needed} devices");
            last_line = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let stats_before = api.stats().await.unwrap_or_default();
    let batch_id = if creates {
        let mut req = CreateBatch {
            product: args.product.clone(),
            firmware_version: args.version.clone(),
            devices: match args.fleet_size {
                Some(_) => None,
                None => Some(names.clone()),
            },
            retries: Some(args.retries),
            retry_interval_secs: Some(2.0),
            ..CreateBatch::default()
        };
        args.rollout.clone().apply(&mut req);
        let created = api.create_batch(&req).await.map_err(|e| e.to_string())?;
        if !created.excluded.is_empty() {
            eprintln!(
                "fleet: {} devices not eligible (first: {} - {})",
                created.excluded.len(),
                created.excluded[0].device,
                created.excluded[0].reason
            );
        }
        eprintln!(
            "fleet: batch {} of {} devices started",
            created.batch.id, created.batch.totals.total
        );
        created.batch.id
    } else {
        wait_for_batch(api, &args.product, &names, deadline).await?
    };

    // Watch it.
    let batch = loop {
        let b = api.show_batch(batch_id).await.map_err(|e| e.to_string())?;
        let mine: Vec<&RecordView> = b
            .records
            .iter()
            .filter(|r| ours.contains(r.device.as_str()))
            .collect();
        let done = mine.iter().filter(|r| is_final(r)).count();
        if b.state != "in_progress" || (args.join && done == mine.len()) {
            break b;
        }
        if Instant::now() > deadline {
            eprintln!(
                "fleet: giving up after {} s: terminating the batch",
                args.timeout_secs
            );
            if creates {
                let _ = api.terminate_batch(batch_id).await;
            }
            break api.show_batch(batch_id).await.map_err(|e| e.to_string())?;
        }
        if last_line.elapsed() > Duration::from_secs(2) {
            let paused = b
                .paused
                .as_ref()
                .map_or(String::new(), |p| format!(" - PAUSED: {p}"));
            eprintln!("fleet: {}{paused}", state_counts(&mine));
            last_line = Instant::now();
        }
        if b.paused.is_some() && args.stop_when_paused {
            eprintln!(
                "fleet: the batch paused itself: {}",
                b.paused.as_deref().unwrap_or("")
            );
            if creates {
                let _ = api.terminate_batch(batch_id).await;
            }
            break api.show_batch(batch_id).await.map_err(|e| e.to_string())?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let stats_after = api.stats().await.unwrap_or_default();
    // Every device disconnects (a download still running reports itself
    // cancelled first); what has not within 10 s is dropped.
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();

    if let Some((_, work)) = &delta {
        let _ = std::fs::remove_dir_all(work);
    }
    let image_size = api
        .list_firmware(Some(&args.product))
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .find(|f| f.version == batch.firmware_version)
        .map_or(0, |f| f.size);
    let summary = summarize(
        args,
        &batch,
        &ours,
        &stats_before,
        &stats_after,
        (connect_ms, ctx.connect_retries.load(Ordering::Relaxed)),
        image_size,
        in_process,
    );
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?
        );
    } else {
        print_summary(&summary);
    }
    Ok(if summary.success == args.devices {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn is_final(r: &RecordView) -> bool {
    r.state == "success" || r.state == "failed"
}

fn state_counts(records: &[&RecordView]) -> String {
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for r in records {
        *by.entry(r.state.as_str()).or_default() += 1;
    }
    by.iter()
        .map(|(s, n)| format!("{s} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The newest running batch of the product that has our devices.
async fn wait_for_batch(
    api: &ApiClient,
    product: &str,
    names: &[String],
    deadline: Instant,
) -> Result<i64, String> {
    loop {
        let batches = api.list_batches().await.map_err(|e| e.to_string())?;
        for b in batches
            .iter()
            .filter(|b| b.product == product && b.state == "in_progress")
        {
            let full = api.show_batch(b.id).await.map_err(|e| e.to_string())?;
            if full.records.iter().any(|r| r.device == names[0]) {
                eprintln!("fleet: following batch {}", b.id);
                return Ok(b.id);
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no running batch of {product} has {}", names[0]));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Uploads the target firmware unless the platform has it.
async fn ensure_firmware(args: &FleetArgs, api: &ApiClient) -> Result<(), String> {
    let have = api
        .list_firmware(Some(&args.product))
        .await
        .map_err(|e| e.to_string())?;
    if let Some(fw) = have.iter().find(|f| f.version == args.version) {
        eprintln!(
            "fleet: the platform has {} {} ({} bytes): using it",
            args.product, args.version, fw.size
        );
        return Ok(());
    }
    let size = (args.size_mib.max(1) * 1024 * 1024) as usize;
    let image = if args.delta {
        crate::demo::monthly_change(&crate::demo::fs_like_image(size))
    } else {
        random_bytes(size)
    };
    let fw = api
        .add_firmware(
            &args.product,
            &args.version,
            &format!("firmware-{}.bin", args.version),
            &image,
        )
        .await
        .map_err(|e| e.to_string())?;
    eprintln!(
        "fleet: uploaded {} {} ({} bytes, md5 {})",
        args.product, args.version, fw.size, fw.md5
    );
    Ok(())
}

/// One simulated device: connects (again and again until it can), takes
/// upgrade commands, downloads and verifies, "installs", informs.
async fn device(ctx: Arc<Ctx>, name: String, index: usize, login: (String, String)) {
    let config = match Config::new(&ctx.broker, &ctx.product, &name, FROM)
        .map(|c| c.username(login.0).password(login.1))
    {
        Ok(c) => c
            .connect_timeout(Duration::from_secs(30))
            .progress_throttle(25, Duration::from_secs(1)),
        Err(e) => {
            log::error!("{name}: {e}");
            return;
        }
    };
    let mut wait = Duration::from_millis(500);
    let (client, mut upgrades) = loop {
        match OtaClient::connect(config.clone()).await {
            Ok(x) => break x,
            Err(e) => {
                ctx.connect_retries.fetch_add(1, Ordering::Relaxed);
                log::info!("{name}: {e}; again in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    };
    ctx.connected.fetch_add(1, Ordering::Relaxed);
    // Spread the failing devices evenly: index * 37 mod 100 walks 0..99.
    let fails = (index * 37 % 100) < ctx.fail_percent as usize;
    let mut stop = ctx.stop.clone();
    loop {
        let cmd = tokio::select! {
            cmd = upgrades.next() => match cmd {
                Some(cmd) => cmd,
                None => break,
            },
            _ = stop.changed() => break,
        };
        let verified = tokio::select! {
            v = download(&ctx, &client, &cmd) => v,
            _ = stop.changed() => break,
        };
        if !verified {
            continue;
        }
        if fails {
            let _ = client.report_progress(
                Status::UpgradeFailed,
                0,
                "simulated install failure (--fail-percent)",
            );
            continue;
        }
        // The simulated install and reboot: the new version runs at once.
        let _ = client.report_progress(Status::Success, 100, "");
        let _ = client.report_version(&cmd.firmware.version);
    }
    client.disconnect().await;
}

/// Downloads and verifies the command's image into one small buffer (the
/// bytes go nowhere: the install is simulated). False when it failed (the
/// SDK has reported DOWNLOAD_FAILED or VERIFY_FAILED).
async fn download(ctx: &Ctx, client: &OtaClient, cmd: &iot_ota_device::UpgradeCommand) -> bool {
    let Ok(_permit) = ctx.downloads.acquire().await else {
        return false;
    };
    if let Some((base, work)) = &ctx.delta {
        let path = work.join(format!("{}.bin", client.config().device_name()));
        let done = client
            .download(cmd)
            .delta_from(base)
            .download_to(&path)
            .await
            .is_ok();
        let _ = std::fs::remove_file(&path);
        return done;
    }
    let mut download = client.download(cmd);
    let mut buf = vec![0u8; CHUNK];
    loop {
        match download
            .fetch_yield(&mut buf, Duration::from_secs(30))
            .await
        {
            Ok(0) => return true,
            Ok(_) => {}
            // The request carries on: only this call's wait ended.
            Err(DeviceError::Timeout) => {}
            Err(_) => return false,
        }
    }
}

/// The fleet's figures from the final batch and the platform's counters.
#[allow(clippy::too_many_arguments)]
fn summarize(
    args: &FleetArgs,
    b: &BatchView,
    ours: &std::collections::HashSet<&str>,
    before: &StatsView,
    after: &StatsView,
    (connect_ms, connect_retries): (u64, usize),
    image_size: u64,
    in_process: bool,
) -> Summary {
    let mine: Vec<&RecordView> = b
        .records
        .iter()
        .filter(|r| ours.contains(r.device.as_str()))
        .collect();
    let mut s = Summary {
        devices: args.devices,
        batch: b.id,
        batch_state: b.state.clone(),
        paused: b.paused.clone(),
        groups: b
            .groups
            .iter()
            .map(|g| (g.total, g.success, g.failed))
            .collect(),
        connect_ms,
        connect_retries,
        platform_in_process: in_process,
        ..Summary::default()
    };
    let mut acks = Vec::new();
    let mut firsts = Vec::new();
    let mut last_success = None::<i64>;
    let mut first_progress = None::<i64>;
    for r in &mine {
        match r.state.as_str() {
            "success" => {
                s.success += 1;
                if let Some(f) = r.finished_ms {
                    last_success = Some(last_success.map_or(f, |l| l.max(f)));
                }
            }
            "failed" => {
                s.failed += 1;
                let why = r.reason.clone().unwrap_or_else(|| "unknown".into());
                *s.failures.entry(why).or_default() += 1;
            }
            _ => s.unfinished += 1,
        }
        if let (Some(p), Some(a)) = (r.pushed_ms, r.acked_ms) {
            acks.push(a - p);
        }
        if let (Some(p), Some(st)) = (r.pushed_ms, r.started_ms) {
            firsts.push(st - p);
            first_progress = Some(first_progress.map_or(st, |f| f.min(st)));
        }
    }
    let end = b.finished_ms.unwrap_or_else(iot_ota_platform::now_ms);
    s.batch_ms = end - b.created_ms;
    if s.success == mine.len() && !mine.is_empty() {
        s.all_success_ms = last_success.map(|l| l - b.created_ms);
    }
    s.first_progress_ms = first_progress.map(|f| f - b.created_ms);
    s.push_to_ack_ms = Spread::of(acks);
    s.push_to_first_progress_ms = Spread::of(firsts);
    let secs = (s.batch_ms as f64 / 1000.0).max(0.001);
    s.platform_messages_per_sec =
        after.mqtt_messages.saturating_sub(before.mqtt_messages) as f64 / secs;
    s.platform_busy_ms_per_sec =
        after.mqtt_busy_ms.saturating_sub(before.mqtt_busy_ms) as f64 / secs;
    s.platform_cpu_cores = after.cpu_ms.saturating_sub(before.cpu_ms) as f64 / 1000.0 / secs;
    s.platform_peak_rss_kib = after.peak_rss_kib;
    s.platform_peak_queue = after.peak_queued;
    s.broker_peak_queue = after.broker.map(|b| b.peak_queue);
    s.broker_dropped = after.broker.map(|b| b.dropped);
    s.served_bytes = after
        .firmware_bytes_served
        .saturating_sub(before.firmware_bytes_served);
    s.served_requests = after
        .firmware_requests
        .saturating_sub(before.firmware_requests);
    s.full_image_bytes = image_size * s.success as u64;
    let (_, peak, _) = iot_ota_platform::process_usage();
    s.fleet_peak_rss_kib = peak;
    s.fleet_rss_per_device_kib = peak as f64 / args.devices as f64;
    s
}

fn print_summary(s: &Summary) {
    let secs = |ms: i64| format!("{:.1} s", ms as f64 / 1000.0);
    println!(
        "fleet: {} devices, batch {} {}: {} success, {} failed, {} unfinished",
        s.devices, s.batch, s.batch_state, s.success, s.failed, s.unfinished
    );
    for (why, n) in &s.failures {
        println!("  failed: {why}: {n}");
    }
    if let Some(p) = &s.paused {
        println!("  paused itself: {p}");
    }
    if s.groups.len() > 1 {
        for (i, (t, ok, bad)) in s.groups.iter().enumerate() {
            println!("  group {}: {t} devices, {ok} success, {bad} failed", i + 1);
        }
    }
    println!(
        "  connected in {} ({} connection attempts repeated)",
        secs(s.connect_ms as i64),
        s.connect_retries
    );
    match s.all_success_ms {
        Some(ms) => println!("  all succeeded {} after the batch started", secs(ms)),
        None => println!("  batch ended {} after it started", secs(s.batch_ms)),
    }
    println!("  push -> ack: {}", s.push_to_ack_ms);
    println!("  push -> first progress: {}", s.push_to_first_progress_ms);
    if let Some(f) = s.first_progress_ms {
        println!("  first progress report {} ms after the batch started", f);
    }
    println!(
        "  platform: {:.0} device messages/s handled ({:.0} ms busy per s, at most {} waiting), CPU {:.2} cores, peak RSS {:.1} MiB",
        s.platform_messages_per_sec,
        s.platform_busy_ms_per_sec,
        s.platform_peak_queue,
        s.platform_cpu_cores,
        s.platform_peak_rss_kib as f64 / 1024.0
    );
    if let (Some(q), Some(d)) = (s.broker_peak_queue, s.broker_dropped) {
        println!("  embedded broker: longest queue {q} messages, {d} dropped");
    }
    println!(
        "  firmware server: {} sent in {} requests; full images for the {} successes: {}{}",
        crate::table::bytes(s.served_bytes),
        s.served_requests,
        s.success,
        crate::table::bytes(s.full_image_bytes),
        match (s.served_bytes * 100).checked_div(s.full_image_bytes) {
            Some(pct) => format!(" ({pct}% of it)"),
            None => String::new(),
        }
    );
    println!(
        "  fleet process: peak RSS {:.1} MiB, {:.1} KiB per device{}",
        s.fleet_peak_rss_kib as f64 / 1024.0,
        s.fleet_rss_per_device_kib,
        if s.platform_in_process {
            " (the platform included)"
        } else {
            ""
        }
    );
}

/// Fails early, with what to do, when the open-file limit cannot hold the fleet.
fn check_open_files(args: &FleetArgs) -> Result<(), String> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let Some(soft) = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok())
    else {
        return Ok(());
    };
    let per_device = if args.api.is_none() && args.broker.is_none() {
        2
    } else {
        1
    };
    let need = args.devices * per_device + args.max_downloads * per_device + 64;
    if need > soft {
        return Err(format!(
            "{} devices need about {need} open files here and the limit is {soft} (ulimit -n): \
             raise it, run the platform apart (iot-ota platform, then iot-ota fleet --api URL \
             --broker URL), or split the fleet across processes with --first-index",
            args.devices
        ));
    }
    Ok(())
}
