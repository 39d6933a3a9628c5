//! Two slot directories and a simulated bootloader.
//!
//! ```text
//! DIR/a/firmware.bin, DIR/a/version    slot a (the factory slot)
//! DIR/b/firmware.bin, DIR/b/version    slot b
//! DIR/bootloader                       primary, trying, tries, limit
//! DIR/booted                           "b 2.0.0": what this boot runs
//! ```
//!
//! The bootloader is U-Boot's bootcount scheme (`upgrade_available`,
//! `bootcount`, `bootlimit`): an install sets "try slot b"; each boot of a
//! slot on trial counts one try; past the limit the bootloader boots the
//! primary slot again; a commit makes the tried slot primary. A boot here is
//! [`SlotDirs::boot`], which the agent calls once per process start: the
//! agent exiting and being started again (by systemd, by the demo, after a
//! crash) is the reboot. Every state change is an atomic replace, so a
//! power cut leaves the old state or the new one.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::fsutil;

use super::Installer;

/// The simulated bootloader's persisted state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootState {
    /// The slot booted when nothing is on trial (`a` or `b`).
    pub primary: &'static str,
    /// The slot on trial, if any.
    pub trying: Option<&'static str>,
    /// Boots of the slot on trial so far.
    pub tries: u32,
    /// Boots allowed to a slot on trial before falling back.
    pub limit: u32,
}

fn slot_name(s: &str) -> Option<&'static str> {
    match s {
        "a" => Some("a"),
        "b" => Some("b"),
        _ => None,
    }
}

fn other(slot: &str) -> &'static str {
    if slot == "a" {
        "b"
    } else {
        "a"
    }
}

impl BootState {
    fn encode(&self) -> String {
        format!(
            "primary {}\ntrying {}\ntries {}\nlimit {}\n",
            self.primary,
            self.trying.unwrap_or("-"),
            self.tries,
            self.limit
        )
    }

    fn decode(text: &str) -> Result<BootState, String> {
        let mut state = BootState {
            primary: "a",
            trying: None,
            tries: 0,
            limit: 0,
        };
        let mut seen = 0;
        for line in text.lines() {
            let (key, value) = line
                .split_once(' ')
                .ok_or_else(|| format!("bad line {line:?}"))?;
            let bad = || format!("bad {key} {value:?}");
            match key {
                "primary" => state.primary = slot_name(value).ok_or_else(bad)?,
                "trying" if value == "-" => state.trying = None,
                "trying" => state.trying = Some(slot_name(value).ok_or_else(bad)?),
                "tries" => state.tries = value.parse().map_err(|_| bad())?,
                "limit" => state.limit = value.parse().map_err(|_| bad())?,
                _ => return Err(format!("unknown key {key:?}")),
            }
            seen += 1;
        }
        if seen != 4 || !text.ends_with('\n') {
            return Err("torn or incomplete".into());
        }
        Ok(state)
    }

    /// One boot: the slot to run, and the state after it.
    fn boot(&self) -> (&'static str, BootState) {
        let mut next = self.clone();
        match self.trying {
            Some(slot) if self.tries < self.limit => {
                next.tries += 1;
                (slot, next)
            }
            Some(_) => {
                // Past the limit: the bootloader gives up on the trial.
                next.trying = None;
                next.tries = 0;
                (self.primary, next)
            }
            None => (self.primary, next),
        }
    }
}

/// Two slot directories under one directory, with a simulated bootloader.
#[derive(Debug)]
pub struct SlotDirs {
    dir: PathBuf,
    booted: &'static str,
    state: BootState,
}

impl SlotDirs {
    /// Boots the simulated device in `dir`: the bootloader picks the slot
    /// (counting a try of a slot on trial, falling back past
    /// `boot_limit`), and records it. Call it once per start. On the very
    /// first boot, slot `a` is the factory image, running `factory_version`.
    pub fn boot(
        dir: impl Into<PathBuf>,
        factory_version: &str,
        boot_limit: u32,
    ) -> Result<SlotDirs, String> {
        let dir = dir.into();
        let at = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
        std::fs::create_dir_all(dir.join("a")).map_err(|e| at(&dir, e))?;
        let file = dir.join("bootloader");
        let state = match std::fs::read_to_string(&file) {
            Ok(text) => BootState::decode(&text)
                .map_err(|e| format!("the bootloader state {}: {e}", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let version = dir.join("a/version");
                if !version.exists() {
                    fsutil::write_atomic(&version, format!("{factory_version}\n").as_bytes())
                        .map_err(|e| at(&version, e))?;
                }
                BootState {
                    primary: "a",
                    trying: None,
                    tries: 0,
                    limit: boot_limit,
                }
            }
            Err(e) => return Err(at(&file, e)),
        };
        let (booted, mut state) = state.boot();
        state.limit = boot_limit;
        let mut slots = SlotDirs { dir, booted, state };
        slots.save()?;
        let version = slots.running_version()?;
        let booted_file = slots.dir.join("booted");
        fsutil::write_atomic(&booted_file, format!("{booted} {version}\n").as_bytes())
            .map_err(|e| at(&booted_file, e))?;
        log::info!("slots: booted slot {booted} ({version})");
        Ok(slots)
    }

    /// The slot this boot runs (`a` or `b`).
    pub fn booted(&self) -> &'static str {
        self.booted
    }

    /// The bootloader's state after this boot.
    pub fn state(&self) -> &BootState {
        &self.state
    }

    fn save(&mut self) -> Result<(), String> {
        let file = self.dir.join("bootloader");
        fsutil::write_atomic(&file, self.state.encode().as_bytes())
            .map_err(|e| format!("writing the bootloader state {}: {e}", file.display()))
    }

    fn copy_image(image: &Path, dest: &Path, progress: &mut dyn FnMut(u32)) -> std::io::Result<()> {
        let mut from = std::fs::File::open(image)?;
        let total = from.metadata()?.len().max(1);
        let tmp = fsutil::with_suffix(dest, ".tmp");
        let mut to = std::fs::File::create(&tmp)?;
        let mut buf = vec![0u8; 256 * 1024];
        let (mut done, mut shown) = (0u64, 0u32);
        loop {
            let n = from.read(&mut buf)?;
            if n == 0 {
                break;
            }
            to.write_all(&buf[..n])?;
            done += n as u64;
            let pct = (10 + done * 80 / total) as u32;
            if pct >= shown + 10 {
                shown = pct;
                progress(pct);
            }
        }
        to.sync_all()?;
        fsutil::rename_durable(&tmp, dest)
    }
}

impl Installer for SlotDirs {
    /// The booted slot's image, once one was installed there (the factory
    /// slot has none until its first upgrade).
    fn running_image(&self) -> Option<PathBuf> {
        let image = self.dir.join(self.booted).join("firmware.bin");
        image.is_file().then_some(image)
    }

    fn name(&self) -> &str {
        "slots"
    }

    fn running_version(&mut self) -> Result<String, String> {
        let file = self.dir.join(self.booted).join("version");
        std::fs::read_to_string(&file)
            .map(|v| v.trim().to_owned())
            .map_err(|e| format!("the running slot's version {}: {e}", file.display()))
    }

    fn install(
        &mut self,
        image: &Path,
        version: &str,
        progress: &mut dyn FnMut(u32),
    ) -> Result<(), String> {
        let target = other(self.booted);
        let slot = self.dir.join(target);
        std::fs::create_dir_all(&slot).map_err(|e| format!("{}: {e}", slot.display()))?;
        progress(0);
        // The slot's old version goes first: a cut mid-copy leaves a slot
        // that names no version, never a version over a torn image.
        let version_file = slot.join("version");
        match std::fs::remove_file(&version_file) {
            Ok(()) => fsutil::sync_dir(&version_file).map_err(|e| e.to_string())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", version_file.display())),
        }
        let dest = slot.join("firmware.bin");
        Self::copy_image(image, &dest, progress)
            .map_err(|e| format!("writing {}: {e}", dest.display()))?;
        fsutil::write_atomic(&version_file, format!("{version}\n").as_bytes())
            .map_err(|e| format!("writing {}: {e}", version_file.display()))?;
        self.state.trying = Some(target);
        self.state.tries = 0;
        self.save()?;
        progress(100);
        log::info!("slots: {version} installed in slot {target}, to be tried at the next boot");
        Ok(())
    }

    /// Nothing to do: the agent's exit is the reboot, and its next start
    /// ([`SlotDirs::boot`]) the bootloader's choice.
    fn reboot(&mut self) -> Result<(), String> {
        Ok(())
    }

    fn commit(&mut self) -> Result<(), String> {
        self.state.primary = self.booted;
        self.state.trying = None;
        self.state.tries = 0;
        self.save()
    }

    fn roll_back(&mut self, _new_image_running: bool) -> Result<(), String> {
        self.state.trying = None;
        self.state.tries = 0;
        self.save()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("iot-ota-slots-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn install(slots: &mut SlotDirs, version: &str, at: &Path) {
        let image = at.join(format!("{version}.img"));
        std::fs::write(&image, version.repeat(1000)).unwrap();
        let mut seen = Vec::new();
        slots
            .install(&image, version, &mut |p| seen.push(p))
            .unwrap();
        assert_eq!((seen.first(), seen.last()), (Some(&0), Some(&100)));
    }

    #[test]
    fn the_state_file_round_trips_and_a_torn_one_is_an_error() {
        let s = BootState {
            primary: "b",
            trying: Some("a"),
            tries: 2,
            limit: 3,
        };
        let text = s.encode();
        assert_eq!(BootState::decode(&text), Ok(s));
        for n in 0..text.len() {
            assert!(BootState::decode(&text[..n]).is_err(), "torn at {n}");
        }
        assert!(BootState::decode("primary c\ntrying -\ntries 0\nlimit 1\n").is_err());
    }

    #[test]
    fn a_committed_slot_stays_and_an_uncommitted_one_falls_back() {
        let d = dir("cycle");
        let mut s = SlotDirs::boot(&d, "1.0", 2).unwrap();
        assert_eq!(
            (s.booted(), s.running_version().unwrap().as_str()),
            ("a", "1.0")
        );
        install(&mut s, "2.0", &d);
        // Reboot: the new slot on trial.
        let mut s = SlotDirs::boot(&d, "1.0", 2).unwrap();
        assert_eq!(
            (s.booted(), s.running_version().unwrap().as_str()),
            ("b", "2.0")
        );
        s.commit().unwrap();
        for _ in 0..3 {
            let s = SlotDirs::boot(&d, "1.0", 2).unwrap();
            assert_eq!(s.booted(), "b", "committed: kept");
        }
        // 3.0 into slot a, never committed: two tries, then back to b.
        let mut s = SlotDirs::boot(&d, "1.0", 2).unwrap();
        install(&mut s, "3.0", &d);
        let booted: Vec<_> = (0..4)
            .map(|_| SlotDirs::boot(&d, "1.0", 2).unwrap().booted())
            .collect();
        assert_eq!(booted, ["a", "a", "b", "b"]);
        assert_eq!(
            std::fs::read_to_string(d.join("booted")).unwrap(),
            "b 2.0\n"
        );
        // A rollback from the slot on trial: the next boot is the old one.
        let mut s = SlotDirs::boot(&d, "1.0", 2).unwrap();
        install(&mut s, "4.0", &d);
        let mut s = SlotDirs::boot(&d, "1.0", 2).unwrap();
        assert_eq!(s.running_version().unwrap(), "4.0");
        s.roll_back(true).unwrap();
        let mut s = SlotDirs::boot(&d, "1.0", 2).unwrap();
        assert_eq!(s.running_version().unwrap(), "2.0");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_damaged_bootloader_state_is_refused() {
        let d = dir("damaged");
        SlotDirs::boot(&d, "1.0", 2).unwrap();
        std::fs::write(d.join("bootloader"), "primary a\ntry").unwrap();
        let e = SlotDirs::boot(&d, "1.0", 2).unwrap_err();
        assert!(e.contains("bootloader state"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
