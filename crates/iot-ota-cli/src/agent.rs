//! `iot-ota device run`: the device agent for real deployments, on the SDK.
//!
//! Identity, broker and TLS come from a TOML file (`--config`) and flags
//! (flags win). The running version comes from `version`, or from
//! `version_file` (rewritten atomically after every successful upgrade).
//!
//! Each accepted command is downloaded and verified by the SDK into
//! `work_dir`, then installed in one of two ways:
//!
//! - `install.dir`: two slots, `DIR/a` and `DIR/b`. The image is written to
//!   the inactive slot (`firmware.bin` and `version`, fsynced), then
//!   `DIR/active` (`"b 2.0.0\n"`) is replaced atomically (write, fsync,
//!   rename, fsync the directory): a power cut leaves either the old or the
//!   new slot active, never a half-written one. A bootloader or the next start
//!   reads `DIR/active`.
//! - `install.command`: a shell command with `{file}` and `{version}`
//!   placeholders (`rauc install {file}`, `swupdate -i {file}`), run with
//!   `sh -c`. Each placeholder is replaced by its value in POSIX single quotes
//!   (a `'` inside becomes `'\''`), so it is always one word and never shell
//!   syntax: write `{file}`, not `"{file}"`. The same values are in the
//!   environment as `OTA_FILE` and `OTA_VERSION`. Exit status 0 is success;
//!   anything else reports FLASH_FAILED with the status and the end of stderr
//!   in `desc`.
//!
//! The version of a command names files (`firmware-VERSION.bin`, the slot's
//! `version`) and reaches the install command, so the agent refuses, with
//! UPGRADE_FAILED and no download, any version that is not 1-100 letters,
//! digits, `_`, `-` or `.`, or that is `.` or `..` (the SDK already rejects
//! them; the agent does not rely on it).
//!
//! It reports UPGRADING, then SUCCESS or FLASH_FAILED, and informs the new
//! version on success.
//!
//! `silent` commands are downloaded at once but installed only inside
//! `silent.window` (`"HH:MM-HH:MM"`, UTC, may wrap midnight) or when the
//! trigger file appears (`silent.trigger_file`, default `WORK_DIR/install-now`;
//! the agent removes it when it starts installing). The platform's upgrade
//! timeout runs meanwhile: give silent batches a timeout that covers the wait.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use iot_ota_device::{Config, OtaClient, Policy, Status, UpgradeCommand};
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
    #[arg(long)]
    pub product_key: Option<String>,
    /// Device name (identifier).
    #[arg(long)]
    pub device_name: Option<String>,
    /// Running firmware version.
    #[arg(long)]
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
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Install into two slots under this directory.
    #[arg(long)]
    pub install_dir: Option<PathBuf>,
    /// Install by running this shell command ({file}, {version} are replaced).
    #[arg(long)]
    pub install_command: Option<String>,
    /// Topic prefix.
    #[arg(long)]
    pub topic_prefix: Option<String>,
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SilentConfig {
    window: Option<String>,
    trigger_file: Option<PathBuf>,
}

/// How the verified image is installed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Installer {
    Slots(PathBuf),
    Command(String),
}

/// The agent's resolved settings.
#[derive(Debug)]
struct Agent {
    config: Config,
    version_file: Option<PathBuf>,
    work_dir: PathBuf,
    installer: Installer,
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
    let version_file = args.version_file.or(file.version_file);
    let version = match (args.version.or(file.version), &version_file) {
        (Some(v), _) => v,
        (None, Some(f)) => std::fs::read_to_string(f)
            .map_err(|e| format!("reading the version from {}: {e}", f.display()))?
            .trim()
            .to_owned(),
        (None, None) => return Err("--version or --version-file is required".into()),
    };
    let work_dir = args
        .work_dir
        .or(file.work_dir)
        .unwrap_or_else(|| PathBuf::from("iot-ota-work"));
    let installer = match (
        args.install_dir.or(file.install.dir),
        args.install_command.or(file.install.command),
    ) {
        (Some(_), Some(_)) => return Err("choose one of install dir and install command".into()),
        (Some(d), None) => Installer::Slots(d),
        (None, Some(c)) => Installer::Command(c),
        (None, None) => {
            return Err("an installer is required: --install-dir or --install-command".into())
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
    Ok(Agent {
        config,
        version_file,
        work_dir,
        installer,
        window,
        trigger,
        once: args.once,
    })
}

/// Installs into the inactive slot and switches `active`; reports UPGRADING steps.
fn install_slots(
    client: &OtaClient,
    dir: &Path,
    image: &Path,
    version: &str,
) -> Result<String, String> {
    let active = std::fs::read_to_string(dir.join("active")).unwrap_or_default();
    let target = if active.starts_with('a') { "b" } else { "a" };
    let slot = dir.join(target);
    std::fs::create_dir_all(&slot).map_err(|e| format!("{}: {e}", slot.display()))?;
    let _ = client.report_progress(Status::Upgrading, 10, "");
    let dest = slot.join("firmware.bin");
    std::fs::copy(image, &dest).map_err(|e| format!("writing {}: {e}", dest.display()))?;
    std::fs::File::open(&dest)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("syncing {}: {e}", dest.display()))?;
    let _ = client.report_progress(Status::Upgrading, 80, "");
    iot_ota_device::fsutil::write_atomic(&slot.join("version"), format!("{version}\n").as_bytes())
        .map_err(|e| format!("writing the slot version: {e}"))?;
    iot_ota_device::fsutil::write_atomic(
        &dir.join("active"),
        format!("{target} {version}\n").as_bytes(),
    )
    .map_err(|e| format!("switching the active slot: {e}"))?;
    let _ = client.report_progress(Status::Upgrading, 100, "");
    Ok(format!("slot {target}"))
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

/// `s` as one POSIX shell word: in single quotes, each `'` written `'\''`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The install command for `sh -c`: `{file}` and `{version}` replaced, in one
/// pass, by their shell-quoted values; the values are also in the environment
/// as `OTA_FILE` and `OTA_VERSION`.
fn shell_command(template: &str, image: &Path, version: &str) -> (String, tokio::process::Command) {
    let file = image.to_string_lossy();
    let mut cmd = String::with_capacity(template.len() + file.len() + version.len());
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        cmd.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("{file}") {
            cmd.push_str(&shell_quote(&file));
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{version}") {
            cmd.push_str(&shell_quote(version));
            rest = after;
        } else {
            cmd.push('{');
            rest = &tail[1..];
        }
    }
    cmd.push_str(rest);
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(&cmd)
        .env("OTA_FILE", image)
        .env("OTA_VERSION", version)
        .stdin(std::process::Stdio::null());
    (cmd, command)
}

/// Runs the install command; `Err` carries the FLASH_FAILED description.
async fn install_command(
    client: &OtaClient,
    template: &str,
    image: &Path,
    version: &str,
) -> Result<String, String> {
    let (cmd, mut command) = shell_command(template, image, version);
    let _ = client.report_progress(Status::Upgrading, 0, "");
    let out = command
        .output()
        .await
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        let _ = client.report_progress(Status::Upgrading, 100, "");
        return Ok(format!("command {cmd:?}"));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr
        .trim()
        .chars()
        .rev()
        .take(200)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let code = out
        .status
        .code()
        .map_or_else(|| "a signal".to_string(), |c| c.to_string());
    Err(format!("install command exited with status {code}: {tail}"))
}

impl Agent {
    async fn wait_for_silent_slot(&self, version: &str) {
        eprintln!(
            "iot-ota device: {version} is silent; installing in the window {:?} or when {} appears",
            self.window,
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

    /// One upgrade: download, (wait), install, report. True on success.
    async fn upgrade(&self, client: &OtaClient, cmd: &UpgradeCommand) -> bool {
        let version = cmd.firmware.version.clone();
        let image = match image_path(&self.work_dir, &version) {
            Ok(p) => p,
            Err(desc) => {
                eprintln!("iot-ota device: {desc}");
                let _ = client.report_progress(Status::UpgradeFailed, 0, &desc);
                return false;
            }
        };
        if let Err(e) = client.download(cmd).download_to(&image).await {
            eprintln!("iot-ota device: download of {version} failed: {e}");
            return false;
        }
        eprintln!("iot-ota device: {version} downloaded and verified");
        if cmd.firmware.policy == Some(Policy::Silent) {
            self.wait_for_silent_slot(&version).await;
        }
        let result = match &self.installer {
            Installer::Slots(dir) => install_slots(client, dir, &image, &version),
            Installer::Command(t) => install_command(client, t, &image, &version).await,
        };
        let _ = std::fs::remove_file(&image);
        match result {
            Ok(how) => {
                if let Some(f) = &self.version_file {
                    if let Err(e) =
                        iot_ota_device::fsutil::write_atomic(f, format!("{version}\n").as_bytes())
                    {
                        eprintln!("iot-ota device: writing {}: {e}", f.display());
                    }
                }
                let _ = client.report_progress(Status::Success, 100, "");
                let _ = client.report_version(&version);
                eprintln!("iot-ota device: installed {version} ({how})");
                true
            }
            Err(desc) => {
                eprintln!("iot-ota device: install of {version} failed: {desc}");
                let _ = client.report_progress(Status::FlashFailed, 100, &desc);
                false
            }
        }
    }
}

/// Runs the agent until the connection closes (or after one attempt with `--once`).
pub async fn run(args: AgentArgs) -> Result<ExitCode, String> {
    let agent = resolve(args)?;
    std::fs::create_dir_all(&agent.work_dir)
        .map_err(|e| format!("{}: {e}", agent.work_dir.display()))?;
    let (client, mut upgrades) = OtaClient::connect(agent.config.clone())
        .await
        .map_err(|e| e.to_string())?;
    eprintln!(
        "iot-ota device: {}/{} running {}, waiting for upgrades",
        agent.config.product_key(),
        agent.config.device_name(),
        agent.config.firmware_version()
    );
    while let Some(cmd) = upgrades.next().await {
        eprintln!(
            "iot-ota device: upgrade to {} accepted",
            cmd.firmware.version
        );
        let ok = agent.upgrade(&client, &cmd).await;
        if agent.once {
            client.disconnect().await;
            return Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
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
    fn shell_quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        let (cmd, _) = shell_command("x {file} {version} {other} {", Path::new("/f"), "1.0");
        assert_eq!(cmd, "x '/f' '1.0' {other} {");
        // One pass: a `{version}` inside the file name is not replaced.
        let (cmd, _) = shell_command("{file}", Path::new("/w/{version}"), "9");
        assert_eq!(cmd, "'/w/{version}'");
    }

    /// Hostile values reach the command as plain words and in the environment,
    /// and run nothing of their own.
    #[tokio::test]
    async fn install_command_values_are_not_shell_syntax() {
        let dir = std::env::temp_dir().join(format!("iot-ota-agent-sh-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let template = format!(
            "printf '%s\\n' {{version}} {{file}} \"$OTA_VERSION\" \"$OTA_FILE\" > {}",
            shell_quote(&out.to_string_lossy())
        );
        let pwned = |n: u32| format!("pwned{n}");
        let versions = [
            format!("1;touch$IFS{}", pwned(1)),
            format!("1' ; touch {} ; echo '", pwned(2)),
            format!("$(touch {})`touch {}`", pwned(3), pwned(4)),
            format!("1\n touch {} \\' \"", pwned(5)),
        ];
        for (i, version) in versions.iter().enumerate() {
            let image = dir.join(format!("it's a file; $(touch {}) {i}.bin", pwned(6)));
            let (_, mut command) = shell_command(&template, &image, version);
            let status = command.current_dir(&dir).status().await.unwrap();
            assert!(status.success(), "{version:?}");
            let file = image.to_string_lossy();
            let expected = format!("{version}\n{file}\n{version}\n{file}\n");
            assert_eq!(std::fs::read_to_string(&out).unwrap(), expected);
        }
        let made: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("pwned"))
            .collect();
        assert!(made.is_empty(), "the shell ran injected commands: {made:?}");
        let _ = std::fs::remove_dir_all(&dir);
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
            "broker = \"mqtt://127.0.0.1:1883\"\nproduct_key = \"pk\"\ndevice_name = \"d1\"\nversion = \"1.0\"\n[install]\ncommand = \"true {file}\"\n[silent]\nwindow = \"01:00-02:00\"\n",
        )
        .unwrap();
        let a = resolve(AgentArgs {
            config: Some(cfg.clone()),
            device_name: Some("d2".into()),
            ..AgentArgs::default()
        })
        .unwrap();
        assert_eq!(a.config.device_name(), "d2", "flags win");
        assert_eq!(a.installer, Installer::Command("true {file}".into()));
        assert_eq!(a.window, Some((60, 120)));
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
            ..AgentArgs::default()
        })
        .unwrap_err();
        assert!(e.contains("installer"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
