//! `iot-ota device run`: the device agent for real deployments, on the SDK.
//!
//! Identity, broker and TLS come from a TOML file (`--config`) and flags
//! (flags win). Each accepted command is downloaded and verified by the SDK
//! into `work_dir`, installed by one of three back-ends
//! ([`iot_ota_device::install`]), and confirmed after the reboot, as
//! PROTOCOL.md's "Install, reboot, confirm" wants:
//!
//! ```text
//!  command ─► DOWNLOADING ─► DOWNLOADED ─► UPGRADING (install) ─► exit ("reboot")
//!  next start ─► runs the target, health check passes ─► commit, SUCCESS 100, inform
//!             └► health check fails / bootloader fell back / too many boots
//!                 ─► UPGRADE_FAILED "rolled back: ...", inform the old version
//! ```
//!
//! The upgrade journal, the security counter and the part files live in
//! `state_dir` (default: `work_dir`); a start after a crash goes on from the
//! journal: a cut download resumes, a cut install runs again.
//!
//! - `install.dir`: two slot directories `DIR/a`, `DIR/b` and a simulated
//!   bootloader (`DIR/bootloader`: a slot on trial and a boot counter, as
//!   U-Boot's bootcount). Each start of the agent is a boot; exiting after
//!   the install is the reboot, so a supervisor (systemd, the demo) must
//!   start it again. The running version is the booted slot's; `version`
//!   (or `version_file`) is the factory image's, in slot `a`.
//! - `install.command`: a shell command with `{file}` and `{version}`
//!   placeholders (`swupdate -i {file}`), run with `sh -c`. Each placeholder
//!   is replaced by its value in POSIX single quotes (a `'` inside becomes
//!   `'\''`), so it is always one word and never shell syntax: write
//!   `{file}`, not `"{file}"`. The values are also in the environment as
//!   `OTA_FILE` and `OTA_VERSION`. Exit status 0 is success; anything else
//!   reports FLASH_FAILED with the status and the end of stderr in `desc`.
//!   `install.reboot` (default `systemctl reboot`; `""`: the install takes
//!   effect at once, no reboot), `install.commit` and `install.rollback`
//!   are commands too. The running version is `version` or `version_file`,
//!   which the new image must provide when there is a reboot.
//! - `install.rauc = true`: RAUC (`rauc install`, `rauc status`,
//!   `mark-good`, `mark-bad`); the running version is the booted slot's
//!   bundle version.
//!
//! `trust_keys` (PEM `PUBLIC KEY` files; `--trust-key`) pins keys: from then
//! on only firmware whose manifest a pinned, not revoked (`revoked_keys`,
//! `--revoke-key`) key signed is accepted, and never one whose security
//! counter is below the running firmware's (kept in the state directory and
//! raised at each commit). PROTOCOL.md, "Signed manifests".
//!
//! `install.health` is the health check of a new image, a command (exit 0:
//! healthy; killed and unhealthy after `install.health_timeout`, default
//! 60 s), for every back-end; without it, starting is healthy.
//! `install.boot_limit` (default 3) is how many boots an unconfirmed image
//! gets. `version_file`, when set, is rewritten atomically at every commit;
//! without it the agent keeps the running version in
//! `STATE_DIR/running-version` (read at start before `version`, which is then
//! the factory version). `work_dir` is required.
//!
//! The version of a command names files (`firmware-VERSION.bin`, the slot's
//! `version`) and reaches the install command, so the agent refuses, with
//! UPGRADE_FAILED and no download, any version that is not 1-100 letters,
//! digits, `_`, `-` or `.`, or that is `.` or `..` (the SDK already rejects
//! them; the agent does not rely on it).
//!
//! `silent` commands are downloaded at once but installed only inside
//! `silent.window` (`"HH:MM-HH:MM"`, UTC, may wrap midnight) or when the
//! trigger file appears (`silent.trigger_file`, default `WORK_DIR/install-now`;
//! the agent removes it when it starts installing). The platform's upgrade
//! timeout runs meanwhile: give silent batches a timeout that covers the wait.
//!
//! With `--once` the agent exits after the first upgrade step that ends its
//! work for this boot: 0 when it installed and asks for the reboot, or
//! committed; 1 when the upgrade failed or rolled back.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use iot_ota_core::journal::{Health, DEFAULT_MAX_BOOTS};
use iot_ota_device::install::{CommandHooks, Installer, Rauc, SlotDirs};
use iot_ota_device::lifecycle::{Installed, Lifecycle, Next, Resumed, Start};
use iot_ota_device::{Config, Firmware, OtaClient, Policy, Status, UpgradeCommand};
use serde::Deserialize;

/// `iot-ota device run` options; each overrides the config file's value.
#[derive(Args, Debug, Default)]
pub struct AgentArgs {
    /// TOML configuration file (see docs/platform-api.md, "Device agent").
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Broker URL: mqtt://HOST:PORT or mqtts://HOST:PORT.
    #[arg(long)]
    pub broker: Option<String>,
    /// Product key.
    #[arg(long, visible_alias = "product")]
    pub product_key: Option<String>,
    /// Device name (identifier).
    #[arg(long)]
    pub device_name: Option<String>,
    /// Running firmware version.
    #[arg(long, visible_alias = "firmware-version")]
    pub version: Option<String>,
    /// File holding the running version (read at start, rewritten after an upgrade).
    #[arg(long)]
    pub version_file: Option<PathBuf>,
    /// MQTT username.
    #[arg(long)]
    pub username: Option<String>,
    /// MQTT password.
    #[arg(long, env = "IOT_OTA_DEVICE_PASSWORD")]
    pub password: Option<String>,
    /// CA certificates (PEM) for mqtts:// and https://.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Where downloads go.
    #[arg(long, visible_alias = "output-dir")]
    pub work_dir: Option<PathBuf>,
    /// Install into two slots under this directory.
    #[arg(long)]
    pub install_dir: Option<PathBuf>,
    /// Install by running this shell command ({file}, {version} are replaced).
    #[arg(long)]
    pub install_command: Option<String>,
    /// Install with RAUC (`rauc install`, `rauc status`, mark-good / mark-bad).
    #[arg(long)]
    pub install_rauc: bool,
    /// Reboot command after an install (default `systemctl reboot`; "" for none).
    #[arg(long)]
    pub reboot_command: Option<String>,
    /// Health check of a new image: a shell command, exit 0 when healthy.
    #[arg(long)]
    pub health_command: Option<String>,
    /// Seconds the health check may take before it counts as failed (default 60).
    #[arg(long)]
    pub health_timeout: Option<f64>,
    /// Boots an unconfirmed image gets before it is rolled back (default 3).
    #[arg(long)]
    pub boot_limit: Option<u32>,
    /// Where the upgrade journal, the security counter and part files live
    /// (default: the work directory).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Topic prefix.
    #[arg(long)]
    pub topic_prefix: Option<String>,
    /// Pin this public key (PEM): only firmware whose manifest it signed is
    /// installed (repeatable; with the config file's `trust_keys`).
    #[arg(long = "trust-key")]
    pub trust_keys: Vec<PathBuf>,
    /// A revoked key id (hex SHA-256 of the key's SubjectPublicKeyInfo; repeatable).
    #[arg(long = "revoke-key")]
    pub revoked_keys: Vec<String>,
    /// Refuse http:// firmware URLs (412): only https:// downloads.
    #[arg(long)]
    pub require_https: bool,
    /// Exit after the first upgrade attempt: 0 on success, 1 on failure.
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    broker: Option<String>,
    product_key: Option<String>,
    device_name: Option<String>,
    version: Option<String>,
    version_file: Option<PathBuf>,
    username: Option<String>,
    password: Option<String>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    topic_prefix: Option<String>,
    work_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    trust_keys: Vec<PathBuf>,
    #[serde(default)]
    revoked_keys: Vec<String>,
    #[serde(default)]
    require_https: bool,
    #[serde(default)]
    install: InstallConfig,
    #[serde(default)]
    silent: SilentConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstallConfig {
    dir: Option<PathBuf>,
    command: Option<String>,
    #[serde(default)]
    rauc: bool,
    reboot: Option<String>,
    health: Option<String>,
    health_timeout: Option<f64>,
    commit: Option<String>,
    rollback: Option<String>,
    boot_limit: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SilentConfig {
    window: Option<String>,
    trigger_file: Option<PathBuf>,
}

/// How the verified image is installed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Backend {
    Slots(PathBuf),
    Command {
        install: String,
        commit: Option<String>,
        rollback: Option<String>,
    },
    Rauc,
}

/// Where the agent remembers the running version when no `version_file`
/// is configured (in the state directory).
const RUNNING_VERSION_FILE: &str = "running-version";

/// The agent's resolved settings.
#[derive(Debug)]
struct Agent {
    config: Config,
    version_file: Option<PathBuf>,
    work_dir: PathBuf,
    state_dir: PathBuf,
    backend: Backend,
    reboot: Option<String>,
    health: Option<String>,
    health_timeout: Duration,
    boot_limit: u32,
    window: Option<(u32, u32)>,
    trigger: PathBuf,
    once: bool,
}

/// Parses `HH:MM-HH:MM` into minutes of the day.
fn parse_window(s: &str) -> Result<(u32, u32), String> {
    let minutes = |t: &str| -> Result<u32, String> {
        let (h, m) = t
            .trim()
            .split_once(':')
            .ok_or_else(|| format!("bad time {t:?} in window {s:?}: use HH:MM"))?;
        let (h, m): (u32, u32) = (
            h.parse().map_err(|_| format!("bad hour in {s:?}"))?,
            m.parse().map_err(|_| format!("bad minute in {s:?}"))?,
        );
        if h > 23 || m > 59 {
            return Err(format!("time out of range in {s:?}"));
        }
        Ok(h * 60 + m)
    };
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("window {s:?} must be HH:MM-HH:MM"))?;
    Ok((minutes(a)?, minutes(b)?))
}

/// True when minute-of-day `now` is inside the window (which may wrap midnight).
fn in_window((start, end): (u32, u32), now: u32) -> bool {
    if start <= end {
        (start..end).contains(&now)
    } else {
        now >= start || now < end
    }
}

fn utc_minute_of_day() -> u32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    ((secs % 86_400) / 60) as u32
}

fn resolve(args: AgentArgs) -> Result<Agent, String> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let need = |v: Option<String>, what: &str| {
        v.ok_or_else(|| format!("{what} is required (flag or config file)"))
    };
    let broker = need(args.broker.or(file.broker), "--broker")?;
    let pk = need(args.product_key.or(file.product_key), "--product-key")?;
    let dn = need(args.device_name.or(file.device_name), "--device-name")?;
    let work_dir = args.work_dir.or(file.work_dir).ok_or(
        "--work-dir is required: where downloads (and, without --state-dir, the upgrade journal) go",
    )?;
    let state_dir = args
        .state_dir
        .clone()
        .or(file.state_dir.clone())
        .unwrap_or_else(|| work_dir.clone());
    let install = file.install;
    let backend = match (
        args.install_dir.or(install.dir),
        args.install_command.or(install.command),
        args.install_rauc || install.rauc,
    ) {
        (Some(d), None, false) => Backend::Slots(d),
        (None, Some(c), false) => Backend::Command {
            install: c,
            commit: install.commit,
            rollback: install.rollback,
        },
        (None, None, true) => Backend::Rauc,
        (None, None, false) => {
            return Err(
                "an installer is required: --install-dir, --install-command or --install-rauc"
                    .into(),
            )
        }
        _ => return Err("choose one of install dir, install command and install rauc".into()),
    };
    let reboot = args.reboot_command.or(install.reboot.clone());
    // An install in place (commands with `reboot = ""`): nothing else knows
    // what runs after it, so without a version file the agent keeps it in
    // the state directory. With a reboot, the new image says its version
    // (`version` / `version_file`); slots and RAUC know it themselves.
    let in_place = matches!(backend, Backend::Command { .. })
        && reboot.as_deref().is_some_and(|r| r.trim().is_empty());
    let (version_file, remembered) = match args.version_file.or(file.version_file) {
        Some(f) => (Some(f), false),
        None if in_place => (Some(state_dir.join(RUNNING_VERSION_FILE)), true),
        None => (None, false),
    };
    let read_file = |f: &Path| {
        std::fs::read_to_string(f)
            .map(|v| v.trim().to_owned())
            .map_err(|e| format!("reading the version from {}: {e}", f.display()))
    };
    let version = match (args.version.or(file.version), &version_file) {
        (_, Some(f)) if remembered && f.exists() => read_file(f)?,
        (Some(v), _) => v,
        (None, Some(f)) if !remembered => read_file(f)?,
        _ => return Err("--version or --version-file is required".into()),
    };
    let health_timeout = match args.health_timeout.or(install.health_timeout) {
        None => iot_ota_device::install::DEFAULT_HEALTH_TIMEOUT,
        Some(s) if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s),
        Some(s) => {
            return Err(format!(
                "health timeout {s} must be a positive number of seconds"
            ))
        }
    };
    let window = file
        .silent
        .window
        .as_deref()
        .map(parse_window)
        .transpose()?;
    let trigger = file
        .silent
        .trigger_file
        .unwrap_or_else(|| work_dir.join("install-now"));
    let mut config = Config::new(&broker, &pk, &dn, &version).map_err(|e| e.to_string())?;
    if let Some(u) = args.username.or(file.username) {
        config = config.username(u);
    }
    if let Some(p) = args.password.or(file.password) {
        config = config.password(p);
    }
    if let Some(ca) = args.ca_file.or(file.ca_file) {
        config = config.ca_file(ca);
    }
    match (file.client_cert, file.client_key) {
        (Some(c), Some(k)) => config = config.client_cert(c, k),
        (None, None) => {}
        _ => return Err("client_cert and client_key go together".into()),
    }
    if let Some(p) = args.topic_prefix.or(file.topic_prefix) {
        config = config.topic_prefix(p);
    }
    for key in file.trust_keys.iter().chain(&args.trust_keys) {
        config = config.trust_key_file(key).map_err(|e| e.to_string())?;
    }
    for id in file.revoked_keys.iter().chain(&args.revoked_keys) {
        config = config.revoke_key(id.clone());
    }
    config = config
        .require_https(args.require_https || file.require_https)
        .download_dir(work_dir.clone())
        // The reply waits for the journal (the agent's upgrade() acks).
        .ack_after_journal(true);
    Ok(Agent {
        config,
        version_file,
        work_dir,
        state_dir,
        backend,
        reboot,
        health: args.health_command.or(install.health),
        health_timeout,
        boot_limit: args
            .boot_limit
            .or(install.boot_limit)
            .unwrap_or(DEFAULT_MAX_BOOTS),
        window,
        trigger,
        once: args.once,
    })
}

/// Checks a command's version before it names a file or reaches a shell,
/// with the core's rule ([`iot_ota_core::protocol::validate_version`]): 1-100
/// letters, digits, `_`, `-` and `.`, and not `.` or `..`.
fn check_version(version: &str) -> Result<(), String> {
    iot_ota_core::protocol::validate_version(version)
        .map_err(|r| format!("refused firmware version: {}", r.message))
}

/// Where the download of `version` goes, inside `work_dir`.
fn image_path(work_dir: &Path, version: &str) -> Result<PathBuf, String> {
    check_version(version)?;
    Ok(work_dir.join(format!("firmware-{version}.bin")))
}

impl Agent {
    async fn wait_for_silent_slot(&self, version: &str) {
        let when = match self.window {
            Some((a, b)) => format!(
                "in the window {:02}:{:02}-{:02}:{:02} UTC or ",
                a / 60,
                a % 60,
                b / 60,
                b % 60
            ),
            None => String::new(),
        };
        eprintln!(
            "iot-ota device: {version} is silent; installing {when}when {} appears",
            self.trigger.display()
        );
        loop {
            if self.trigger.exists() {
                let _ = std::fs::remove_file(&self.trigger);
                return;
            }
            if let Some(w) = self.window {
                if in_window(w, utc_minute_of_day()) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The install back-end, booted: the slots' simulated bootloader runs
    /// here, once per start.
    fn installer(&self) -> Result<Box<dyn Installer>, String> {
        let reboot = self.reboot.clone();
        let version = self.config.firmware_version().to_owned();
        Ok(match &self.backend {
            Backend::Slots(dir) => Box::new(SlotDirs::boot(dir, &version, self.boot_limit)?),
            Backend::Command {
                install,
                commit,
                rollback,
            } => {
                let mut hooks = CommandHooks::new(install.clone(), version)
                    .with_commit(commit.clone())
                    .with_rollback(rollback.clone())
                    // In place, the file follows the running version at once.
                    .with_version_file(self.version_file.clone());
                if let Some(r) = reboot {
                    hooks = hooks.with_reboot(Some(r));
                }
                Box::new(hooks)
            }
            Backend::Rauc => {
                let mut rauc = Rauc::new(version);
                if let Some(r) = reboot {
                    rauc = rauc.with_reboot(Some(r));
                }
                Box::new(rauc)
            }
        })
    }

    /// The health check of a new image: the configured command, if any.
    fn health_check(&self) -> Option<impl FnMut(&str) -> Health + '_> {
        let cmd = self.health.as_ref()?;
        let timeout = self.health_timeout;
        Some(move |version: &str| iot_ota_device::install::health_command(cmd, version, timeout))
    }

    fn commit_version_file(&self, version: &str) {
        if let Some(f) = &self.version_file {
            if let Err(e) =
                iot_ota_device::fsutil::write_atomic(f, format!("{version}\n").as_bytes())
            {
                eprintln!("iot-ota device: writing {}: {e}", f.display());
            }
        }
    }

    /// Tells the outcome of a settled upgrade (what the start report says).
    fn settled(&self, start: &Start) -> Option<bool> {
        let report = start.report.as_ref()?;
        if report.status == Status::Success {
            self.commit_version_file(&start.running);
            eprintln!("iot-ota device: {} committed", start.running);
            Some(true)
        } else {
            eprintln!("iot-ota device: {}", report.desc);
            Some(false)
        }
    }

    /// One upgrade, through the SDK's one flow ([`Lifecycle`]): a
    /// command's, or (`command` `None`) the one an earlier boot began and
    /// the journal goes on with. `None`: the install asks for a reboot;
    /// `Some(ok)`: it ended here. Every failure is reported by the flow or
    /// the download; this only says it on stderr.
    async fn upgrade(
        &self,
        life: &mut Lifecycle<Box<dyn Installer>>,
        client: &OtaClient,
        firmware: &Firmware,
        command: Option<&UpgradeCommand>,
    ) -> Option<bool> {
        let version = firmware.version.clone();
        let image = match image_path(&self.work_dir, &version) {
            Ok(p) => p,
            Err(desc) => {
                eprintln!("iot-ota device: {desc}");
                let _ = client.report_progress(Status::UpgradeFailed, 0, &desc);
                return Some(false);
            }
        };
        let download = match command {
            // Journaled, then acknowledged: a power cut can never lose a
            // command the platform was told was accepted.
            Some(cmd) => life
                .accept(&cmd.firmware, &cmd.msg_id)
                .map(|()| Some(client.download(cmd))),
            None => life.resume(image.exists()).map(|r| match r {
                Resumed::Fetch(fw) => Some(client.resume_download(&fw)),
                Resumed::Install(_) => None,
            }),
        };
        let download = match download {
            Ok(d) => d,
            Err(desc) => {
                eprintln!("iot-ota device: {desc}");
                return Some(false);
            }
        };
        if let Some(download) = download {
            if let Err(e) = life.download_to(download, &image).await {
                eprintln!("iot-ota device: download of {version} failed: {e}");
                return Some(false);
            }
            eprintln!("iot-ota device: {version} downloaded and verified");
        }
        if firmware.policy == Some(Policy::Silent) {
            self.wait_for_silent_slot(&version).await;
        }
        let mut health = self.health_check();
        let result = tokio::task::block_in_place(|| {
            let health = health.as_mut().map(|h| h as &mut dyn FnMut(&str) -> Health);
            // The installer's percents go out as UPGRADING reports.
            life.install(&image, health, &mut |_| {})
        });
        let _ = std::fs::remove_file(&image);
        match result {
            Ok(Installed::Rebooting) => {
                eprintln!("iot-ota device: {version} installed; rebooting into it");
                None
            }
            // Reported (SUCCESS or the rollback) and informed by the flow.
            Ok(Installed::Settled(start)) => self.settled(&start),
            Err(e) => {
                let desc = match e {
                    iot_ota_device::Error::Install(d) => d,
                    e => e.to_string(),
                };
                eprintln!("iot-ota device: install of {version} failed: {desc}");
                Some(false)
            }
        }
    }
}

/// Connects, waiting for the broker with a backoff while it is down (a
/// device must come up whether or not the broker is there).
async fn connect(config: Config) -> Result<(OtaClient, iot_ota_device::Upgrades), String> {
    let mut backoff = config.link().backoff();
    loop {
        match OtaClient::connect(config.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) if e.is_retryable() => {
                let wait = backoff.next_delay();
                eprintln!(
                    "iot-ota device: waiting for the broker {}: {e}; next try in {:.1} s",
                    config.link().broker_addr(),
                    wait.as_secs_f64()
                );
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs the agent: the start-up decision, then upgrades until the
/// connection closes (or after one attempt with `--once`).
pub async fn run(args: AgentArgs) -> Result<ExitCode, String> {
    let agent = resolve(args)?;
    for dir in [&agent.work_dir, &agent.state_dir] {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut life =
        Lifecycle::open(&agent.state_dir, agent.installer()?).map_err(|e| e.to_string())?;
    let mut health = agent.health_check();
    let start = tokio::task::block_in_place(|| {
        let health = health.as_mut().map(|h| h as &mut dyn FnMut(&str) -> Health);
        life.at_start(health)
    })
    .map_err(|e| format!("at start: {e}"))?;
    if let Some(why) = life.set_aside() {
        eprintln!("iot-ota device: {why}; it was set aside");
    }
    match start.next {
        Next::Rebooting => {
            eprintln!("iot-ota device: rebooting into the new image again");
            return Ok(ExitCode::SUCCESS);
        }
        Next::RollingBack => {
            eprintln!("iot-ota device: rebooting (rolling back)");
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let mut config = agent
        .config
        .clone()
        .with_firmware_version(&start.running)
        .map_err(|e| e.to_string())?
        .security_counter(life.security_counter());
    if let Some(report) = start.report.clone() {
        config = config.report_at_start(report);
    }
    let (client, mut upgrades) = connect(config.clone()).await?;
    life.attach(client.session().clone());
    eprintln!(
        "iot-ota device: {}/{} running {}, waiting for upgrades",
        config.product_key(),
        config.device_name(),
        start.running
    );
    let mut outcome = agent.settled(&start);
    let resume = match &start.next {
        Next::Resume(fw) | Next::Install(fw) => Some(fw.clone()),
        _ => None,
    };
    if let Some(fw) = resume {
        eprintln!(
            "iot-ota device: going on with the upgrade to {}",
            fw.version
        );
        outcome = agent.upgrade(&mut life, &client, &fw, None).await;
        if outcome.is_none() {
            client.disconnect().await;
            return Ok(ExitCode::SUCCESS);
        }
    }
    if agent.once {
        if let Some(ok) = outcome {
            client.disconnect().await;
            return Ok(exit(ok));
        }
    }
    while let Some(cmd) = upgrades.next().await {
        eprintln!(
            "iot-ota device: upgrade to {} accepted",
            cmd.firmware.version
        );
        let outcome = agent
            .upgrade(&mut life, &client, &cmd.firmware, Some(&cmd))
            .await;
        match outcome {
            // The install asks for the reboot: this boot's work is done.
            None => {
                client.disconnect().await;
                return Ok(ExitCode::SUCCESS);
            }
            Some(ok) if agent.once => {
                client.disconnect().await;
                return Ok(exit(ok));
            }
            Some(_) => {}
        }
    }
    Err("the connection closed".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        assert_eq!(parse_window("02:00-04:30"), Ok((120, 270)));
        assert!(parse_window("2-4").is_err());
        assert!(parse_window("24:00-01:00").is_err());
        assert!(in_window((120, 270), 200));
        assert!(!in_window((120, 270), 270));
        assert!(in_window((23 * 60, 60), 10), "wraps midnight");
        assert!(!in_window((23 * 60, 60), 120));
    }

    #[test]
    fn versions_cannot_escape_the_work_dir() {
        let work = Path::new("/var/lib/iot-ota");
        for ok in ["2.0.1", "v1_2-rc.3", "a", "..."] {
            let p = image_path(work, ok).unwrap();
            assert_eq!(p.parent(), Some(work), "{ok}");
        }
        assert!(check_version(&"9".repeat(100)).is_ok());
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "x/../../y",
            "/etc/passwd",
            "1;touch$IFS/tmp/x",
            "it's",
            "1 2",
            "1\n2",
            "\u{e9}",
            &"9".repeat(101),
        ] {
            let e = image_path(work, bad).unwrap_err();
            assert!(e.contains("refused firmware version"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn resolves_file_and_flags() {
        let dir = std::env::temp_dir().join(format!("iot-ota-agent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("agent.toml");
        std::fs::write(
            &cfg,
            "broker = \"mqtt://127.0.0.1:1883\"\nproduct_key = \"pk\"\ndevice_name = \"d1\"\nversion = \"1.0\"\n[install]\ncommand = \"true {file}\"\nreboot = \"\"\n[silent]\nwindow = \"01:00-02:00\"\n",
        )
        .unwrap();
        let work = dir.join("work");
        let a = resolve(AgentArgs {
            config: Some(cfg.clone()),
            device_name: Some("d2".into()),
            work_dir: Some(work.clone()),
            ..AgentArgs::default()
        })
        .unwrap();
        assert_eq!(a.config.device_name(), "d2", "flags win");
        assert_eq!(
            a.backend,
            Backend::Command {
                install: "true {file}".into(),
                commit: None,
                rollback: None
            }
        );
        assert_eq!(a.state_dir, a.work_dir, "state in the work dir by default");
        assert_eq!(a.window, Some((60, 120)));
        // Installed in place, no version file: the running version is
        // remembered in the state directory and wins over the factory
        // version at the next start.
        assert_eq!(a.version_file, Some(work.join(RUNNING_VERSION_FILE)));
        assert_eq!(a.config.firmware_version(), "1.0");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::write(work.join(RUNNING_VERSION_FILE), "2.5\n").unwrap();
        let again = resolve(AgentArgs {
            config: Some(cfg.clone()),
            work_dir: Some(work.clone()),
            ..AgentArgs::default()
        })
        .unwrap();
        assert_eq!(again.config.firmware_version(), "2.5");
        // Without a work dir: an error that says what it is for.
        let e = resolve(AgentArgs {
            config: Some(cfg.clone()),
            ..AgentArgs::default()
        })
        .unwrap_err();
        assert!(e.contains("--work-dir is required"), "{e}");
        std::fs::write(&cfg, "brokr = \"x\"\n").unwrap();
        let e = resolve(AgentArgs {
            config: Some(cfg),
            ..AgentArgs::default()
        })
        .unwrap_err();
        assert!(e.contains("brokr"), "{e}");
        let e = resolve(AgentArgs {
            broker: Some("mqtt://h:1".into()),
            product_key: Some("pk".into()),
            device_name: Some("d".into()),
            version: Some("1".into()),
            work_dir: Some(work),
            ..AgentArgs::default()
        })
        .unwrap_err();
        assert!(e.contains("installer"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
