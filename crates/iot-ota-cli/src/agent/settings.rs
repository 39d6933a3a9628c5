//! The agent's settings: its flags, its TOML file (flags win), and what they
//! resolve to.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use iot_ota_core::journal::DEFAULT_MAX_BOOTS;
use iot_ota_device::Config;
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
    /// The image the device runs (a file, or a block device such as
    /// /dev/mmcblk0p2): an upgrade whose command names a chunk index then
    /// fetches only the chunks this image lacks (a delta update). With
    /// --install-dir the booted slot's image is the default.
    #[arg(long)]
    pub delta_base: Option<PathBuf>,
    /// Exit after the first upgrade attempt: 0 on success, 1 on failure.
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
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
    delta_base: Option<PathBuf>,
    #[serde(default)]
    install: InstallConfig,
    #[serde(default)]
    silent: SilentConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InstallConfig {
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
pub(super) struct SilentConfig {
    window: Option<String>,
    trigger_file: Option<PathBuf>,
}

/// How the verified image is installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Backend {
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
pub(super) const RUNNING_VERSION_FILE: &str = "running-version";

/// The agent's resolved settings.
#[derive(Debug)]
pub(super) struct Agent {
    pub(super) config: Config,
    pub(super) version_file: Option<PathBuf>,
    pub(super) work_dir: PathBuf,
    pub(super) state_dir: PathBuf,
    pub(super) backend: Backend,
    pub(super) reboot: Option<String>,
    pub(super) health: Option<String>,
    pub(super) health_timeout: Duration,
    pub(super) boot_limit: u32,
    pub(super) window: Option<(u32, u32)>,
    pub(super) trigger: PathBuf,
    pub(super) delta_base: Option<PathBuf>,
    pub(super) once: bool,
}

/// Parses `HH:MM-HH:MM` into minutes of the day.
pub(super) fn parse_window(s: &str) -> Result<(u32, u32), String> {
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
pub(super) fn in_window((start, end): (u32, u32), now: u32) -> bool {
    if start <= end {
        (start..end).contains(&now)
    } else {
        now >= start || now < end
    }
}

pub(super) fn utc_minute_of_day() -> u32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    ((secs % 86_400) / 60) as u32
}

pub(super) fn resolve(args: AgentArgs) -> Result<Agent, String> {
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
        delta_base: args.delta_base.or(file.delta_base),
        once: args.once,
    })
}

/// Checks a command's version before it names a file or reaches a shell,
/// with the core's rule ([`iot_ota_core::protocol::validate_version`]): 1-100
/// letters, digits, `_`, `-` and `.`, and not `.` or `..`.
pub(super) fn check_version(version: &str) -> Result<(), String> {
    iot_ota_core::protocol::validate_version(version)
        .map_err(|r| format!("refused firmware version: {}", r.message))
}

/// Where the download of `version` goes, inside `work_dir`.
pub(super) fn image_path(work_dir: &Path, version: &str) -> Result<PathBuf, String> {
    check_version(version)?;
    Ok(work_dir.join(format!("firmware-{version}.bin")))
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
