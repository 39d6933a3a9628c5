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

use std::process::ExitCode;
use std::time::Duration;

use iot_ota_core::journal::Health;
use iot_ota_device::install::{CommandHooks, Installer, Rauc, SlotDirs};
use iot_ota_device::lifecycle::{Installed, Lifecycle, Next, Resumed, Start};
use iot_ota_device::{Config, Firmware, OtaClient, Policy, Status, UpgradeCommand};

mod settings;

pub use settings::AgentArgs;
use settings::{image_path, in_window, resolve, utc_minute_of_day, Agent, Backend};

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
    life.set_delta_base(agent.delta_base.clone());
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
