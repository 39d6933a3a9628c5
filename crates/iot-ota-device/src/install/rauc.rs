//! RAUC, the real one, through its command line.
//!
//! - install: `rauc install FILE` (a RAUC bundle, verified by RAUC against
//!   its keyring; RAUC writes the inactive slot group and makes it primary);
//! - running version: `rauc status --detailed --output-format=json`, the bundle
//!   version of the booted slot (`slots[].<name>.slot_status.bundle.version`
//!   of the slot whose `state` is `booted`); a slot RAUC never installed
//!   runs the factory version;
//! - commit: `rauc status mark-good booted`;
//! - rollback: `rauc status mark-bad booted` when the new slot runs (the
//!   bootloader then boots the other one), `rauc status mark-active booted`
//!   when the bootloader already fell back (so the bad slot is not tried
//!   again);
//! - reboot and health check: commands, as in [`super::CommandHooks`]
//!   (`systemctl reboot` by default).
//!
//! Global options (`--conf`, `--mount`, `--override-boot-slot`, ...) go
//! before every sub-command ([`Rauc::global_args`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use iot_ota_core::journal::Health;
use serde_json::Value;

use super::hooks::{health_command, reboot_command, DEFAULT_HEALTH_TIMEOUT, DEFAULT_REBOOT};
use super::Installer;

/// The RAUC back-end.
#[derive(Debug, Clone)]
pub struct Rauc {
    program: PathBuf,
    global: Vec<String>,
    factory_version: String,
    reboot: Option<String>,
    health: Option<String>,
}

/// What `rauc status` says of the booted slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaucBooted {
    /// The slot's name (`rootfs.1`).
    pub slot: String,
    /// The version of the bundle installed in it, if RAUC installed it.
    pub version: Option<String>,
}

impl Rauc {
    /// RAUC as `rauc` on the `PATH`; a slot RAUC never wrote runs
    /// `factory_version`.
    pub fn new(factory_version: impl Into<String>) -> Rauc {
        Rauc {
            program: PathBuf::from("rauc"),
            global: Vec::new(),
            factory_version: factory_version.into(),
            reboot: Some(DEFAULT_REBOOT.to_owned()),
            health: None,
        }
    }

    /// The `rauc` program to run.
    pub fn program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    /// Options put before every sub-command (`--conf=FILE`, ...).
    pub fn global_args(mut self, args: Vec<String>) -> Self {
        self.global = args;
        self
    }

    /// The reboot command (`None`: the caller restarts the device itself).
    pub fn with_reboot(mut self, command: Option<String>) -> Self {
        self.reboot = command.filter(|c| !c.trim().is_empty());
        self
    }

    /// The health-check command (exit 0: healthy); none: healthy.
    pub fn with_health(mut self, command: Option<String>) -> Self {
        self.health = command;
        self
    }

    fn rauc(&self, args: &[&str]) -> Result<String, String> {
        let line = format!(
            "{} {} {}",
            self.program.display(),
            self.global.join(" "),
            args.join(" ")
        );
        log::info!("rauc: running {line}");
        let out = Command::new(&self.program)
            .args(&self.global)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.program.display()))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.trim().lines().last().unwrap_or("").to_owned();
        Err(format!(
            "`rauc {}` failed ({}): {last}",
            args.join(" "),
            out.status
        ))
    }

    /// The booted slot and its bundle version, from `rauc status`.
    pub fn booted(&self) -> Result<RaucBooted, String> {
        let text = self.rauc(&["status", "--detailed", "--output-format=json"])?;
        parse_booted(&text)
    }
}

/// Finds the booted slot in `rauc status --output-format=json`.
pub(crate) fn parse_booted(text: &str) -> Result<RaucBooted, String> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| format!("rauc status is not JSON: {e}"))?;
    let slots = v["slots"]
        .as_array()
        .ok_or("rauc status has no slots list")?;
    for entry in slots {
        let Some((name, slot)) = entry.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        if slot["state"].as_str() == Some("booted") {
            return Ok(RaucBooted {
                slot: name.clone(),
                version: slot["slot_status"]["bundle"]["version"]
                    .as_str()
                    .map(str::to_owned),
            });
        }
    }
    Err("rauc status shows no booted slot".into())
}

impl Installer for Rauc {
    fn name(&self) -> &str {
        "rauc"
    }

    fn running_version(&mut self) -> Result<String, String> {
        let booted = self.booted()?;
        Ok(booted
            .version
            .unwrap_or_else(|| self.factory_version.clone()))
    }

    fn install(
        &mut self,
        image: &Path,
        _version: &str,
        progress: &mut dyn FnMut(u32),
    ) -> Result<(), String> {
        progress(0);
        let file = image.to_string_lossy();
        self.rauc(&["install", &file])?;
        progress(100);
        Ok(())
    }

    fn reboot(&mut self) -> Result<(), String> {
        reboot_command(self.reboot.as_deref(), "")
    }

    fn health_check(&mut self) -> Health {
        self.health.as_deref().map_or(Health::Good, |cmd| {
            health_command(cmd, "", DEFAULT_HEALTH_TIMEOUT)
        })
    }

    fn commit(&mut self) -> Result<(), String> {
        self.rauc(&["status", "mark-good", "booted"]).map(drop)
    }

    fn roll_back(&mut self, new_image_running: bool) -> Result<(), String> {
        if new_image_running {
            // The new slot runs and is bad: the bootloader must leave it.
            self.rauc(&["status", "mark-bad", "booted"]).map(drop)
        } else {
            // Already back on the old slot: keep it, and never try the bad one.
            self.rauc(&["status", "mark-active", "booted"]).map(drop)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_booted_slot_and_its_bundle_version() {
        let status = r#"{"compatible":"iot-ota-test","variant":"","booted":"B",
            "boot_primary":"rootfs.1","slots":[
            {"rootfs.0":{"class":"rootfs","state":"inactive","bootname":"A",
              "slot_status":{"bundle":{"compatible":"iot-ota-test","version":"1.0"}}}},
            {"rootfs.1":{"class":"rootfs","state":"booted","bootname":"B",
              "slot_status":{"bundle":{"compatible":"iot-ota-test","version":"2.0"}}}}]}"#;
        assert_eq!(
            parse_booted(status),
            Ok(RaucBooted {
                slot: "rootfs.1".into(),
                version: Some("2.0".into())
            })
        );
        let factory = r#"{"slots":[{"rootfs.0":{"state":"booted","slot_status":{}}}]}"#;
        assert_eq!(parse_booted(factory).unwrap().version, None);
        assert!(parse_booted(r#"{"slots":[]}"#).is_err());
        assert!(parse_booted("not json").is_err());
    }
}
