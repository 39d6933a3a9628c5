//! The upgrade across reboots: the journal in a state directory, an
//! [`Installer`], and the start-up decision of PROTOCOL.md's "Install,
//! reboot, confirm".
//!
//! ```text
//!  command ─► begin ─► Downloading ─► downloaded ─► install ─► Installed ─► reboot
//!                          │ crash: Next::Resume       │ crash: Next::Install
//!  next start ─► at_start: runs the target, healthy ──► commit, SUCCESS 100, inform target
//!                          runs the target, unhealthy ─► roll back, reboot ─► at_start ─┐
//!                          runs the old one / too many boots ─► UPGRADE_FAILED        ◄─┘
//!                                                              "rolled back: ...", inform old
//! ```
//!
//! [`Lifecycle::at_start`] is the call an application makes at every start,
//! before it connects: it reads the journal, runs the health check when the
//! device runs an unconfirmed image (with the application's closure, or the
//! installer's own check), commits or rolls back, and returns what to
//! report first ([`Start::report`], given to [`crate::Config::report_at_start`])
//! and what is left to do ([`Next`]).
//!
//! ```no_run
//! use iot_ota_device::install::SlotDirs;
//! use iot_ota_device::lifecycle::{Lifecycle, Next};
//! use iot_ota_device::{Config, OtaClient};
//!
//! # async fn boot() -> Result<(), iot_ota_device::Error> {
//! let slots = SlotDirs::boot("/data/slots", "1.0.0", 3).map_err(iot_ota_device::Error::Install)?;
//! let mut life = Lifecycle::open("/data/ota-state", slots)?;
//! let start = life.at_start(None)?;
//! if let Next::Rebooting | Next::RollingBack = start.next {
//!     return Ok(()); // a reboot was asked for: into the new image, or back
//! }
//! let mut config = Config::new("mqtt://127.0.0.1:1883", "pk", "dev1", &start.running)?;
//! if let Some(report) = start.report {
//!     config = config.report_at_start(report); // SUCCESS, or "rolled back: ..."
//! }
//! let (client, _upgrades) = OtaClient::connect(config).await?;
//! # let _ = client; Ok(()) }
//! ```
//!
//! Persist before act, except where acting twice is harmless and reporting
//! twice is not worse than never: a commit (mark good) and a rollback are
//! done first and journaled after, so a power cut between the two repeats
//! them at the next start instead of losing them.

use std::path::{Path, PathBuf};

use iot_ota_core::journal::{decide_at_start, Health, Journal, JournalError, JournalStore};
use iot_ota_core::journal::{Phase, StartAction};
use iot_ota_core::{Firmware, Progress, Status};

use crate::error::Error;
use crate::fsutil;
use crate::install::Installer;
use crate::journal::FileJournal;
use crate::session::Session;

/// What [`Lifecycle::at_start`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// The version the device runs: the one to inform.
    pub running: String,
    /// The report to send before the first inform: SUCCESS (4) 100 of an
    /// upgrade just committed, or its UPGRADE_FAILED (-1) `rolled back: ...`.
    pub report: Option<Progress>,
    /// What is left to do.
    pub next: Next,
    /// A journal that could not be read: set aside, and said here (log it).
    pub set_aside: Option<String>,
}

/// What is left to do after [`Lifecycle::at_start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing: wait for commands.
    Idle,
    /// A download was cut off: download this firmware again (the part file
    /// resumes it), then install it.
    Resume(Firmware),
    /// The image was downloaded and verified, the install was cut off:
    /// install it again (download it again if the image is gone).
    Install(Firmware),
    /// A reboot into the installed image was asked for: stop; the next
    /// start goes on.
    Rebooting,
    /// The new image is unhealthy: the installer rolled back and a reboot
    /// into the old image was asked for: stop; the next start reports it.
    RollingBack,
}

/// How an install ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// Installed; a reboot was asked for: stop, the next start confirms it.
    Rebooting,
    /// The installer needs no reboot: the image runs, was checked, and the
    /// upgrade is settled; report this (SUCCESS, or the rollback), then
    /// inform [`Start::running`].
    Settled(Box<Start>),
}

/// One device's upgrades across reboots.
#[derive(Debug)]
pub struct Lifecycle<I: Installer> {
    dir: PathBuf,
    store: FileJournal,
    installer: I,
    journal: Option<Journal>,
}

const COUNTER_FILE: &str = "security-counter";

impl<I: Installer> Lifecycle<I> {
    /// The lifecycle of the device whose state lives in `state_dir` (the
    /// journal, the security counter), installing with `installer`.
    pub fn open(state_dir: impl Into<PathBuf>, installer: I) -> Result<Lifecycle<I>, Error> {
        let dir = state_dir.into();
        std::fs::create_dir_all(&dir).map_err(Error::Io)?;
        Ok(Lifecycle {
            store: FileJournal::in_dir(&dir),
            dir,
            installer,
            journal: None,
        })
    }

    /// The installer.
    pub fn installer(&mut self) -> &mut I {
        &mut self.installer
    }

    /// The journal as last read or written.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    /// The security counter of the committed firmware (signed manifests):
    /// the highest of the journal's and the counter file's, so that a
    /// journal set aside never lowers it.
    ///
    /// A counter file that is there but unreadable fails closed: the
    /// counter is then `u64::MAX`, so no signed firmware passes until a
    /// person looks (it is written atomically: damage means a bad disk or
    /// tampering).
    pub fn security_counter(&self) -> u64 {
        let path = self.dir.join(COUNTER_FILE);
        let file = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse().unwrap_or_else(|_| {
                log::error!(
                    "{} is unreadable: refusing every signed firmware",
                    path.display()
                );
                u64::MAX
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => {
                log::error!("{}: {e}: refusing every signed firmware", path.display());
                u64::MAX
            }
        };
        self.journal
            .as_ref()
            .map_or(file, |j| j.security_counter.max(file))
    }

    fn save(&mut self, journal: Journal) -> Result<(), Error> {
        self.store.save(&journal).map_err(Error::Journal)?;
        self.journal = Some(journal);
        Ok(())
    }

    /// Reads the journal; an unreadable one is set aside (and said).
    fn load(&mut self) -> Result<Option<String>, Error> {
        match self.store.load() {
            Ok(j) => {
                self.journal = j;
                Ok(None)
            }
            Err(e @ JournalError::Store(_)) => Err(Error::Journal(e)),
            Err(e) => {
                log::error!("{e}; set aside, starting without it");
                self.store.set_aside().map_err(Error::Journal)?;
                self.journal = None;
                Ok(Some(e.to_string()))
            }
        }
    }

    /// The start-up decision, made once at every start before the first
    /// inform. `health` checks the running image when it is an unconfirmed
    /// new one (given the version); `None` uses the installer's check.
    pub fn at_start(
        &mut self,
        health: Option<&mut dyn FnMut(&str) -> Health>,
    ) -> Result<Start, Error> {
        let set_aside = self.load()?;
        let mut start = self.settle(health)?;
        start.set_aside = set_aside;
        Ok(start)
    }

    /// Decides from the journal and the running version, and acts.
    fn settle(
        &mut self,
        mut health: Option<&mut dyn FnMut(&str) -> Health>,
    ) -> Result<Start, Error> {
        let mut verdict = Health::Unknown;
        // At most: decide, check health, decide again, (roll back in place,
        // decide on the old version).
        for _ in 0..4 {
            let running = self.installer.running_version().map_err(Error::Install)?;
            let (action, next) = decide_at_start(self.journal.as_ref(), &running, &verdict);
            let start = |report, next| Start {
                running: running.clone(),
                report,
                next,
                set_aside: None,
            };
            match action {
                StartAction::Idle => return Ok(start(None, Next::Idle)),
                StartAction::ResumeDownload | StartAction::Install => {
                    let j = self.journal.clone().expect("decided from a journal");
                    let Some(firmware) = j.firmware() else {
                        let why = "the journal does not say where the image is".to_owned();
                        let report = self.fail(&j, &why)?;
                        return Ok(start(Some(report), Next::Idle));
                    };
                    return Ok(start(
                        None,
                        if action == StartAction::Install {
                            Next::Install(firmware)
                        } else {
                            Next::Resume(firmware)
                        },
                    ));
                }
                StartAction::Reboot => {
                    self.save(next.expect("a reboot counts a boot"))?;
                    self.installer.reboot().map_err(Error::Install)?;
                    return Ok(start(None, Next::Rebooting));
                }
                StartAction::CheckHealth => {
                    self.save(next.expect("a check marks the boot"))?;
                    verdict = match health.as_mut() {
                        Some(f) => f(&running),
                        None => self.installer.health_check(),
                    };
                    log::info!("health check of {running}: {verdict:?}");
                }
                StartAction::Commit { counter } => {
                    let next = next.expect("a commit changes the journal");
                    self.installer.commit().map_err(Error::Install)?;
                    let target = next.target_version.clone();
                    // The journal first: a cut before it repeats the commit
                    // (and a failed re-check rolls back with the counter
                    // still where it was); the file only ever follows it.
                    self.save(next)?;
                    let file = self.dir.join(COUNTER_FILE);
                    fsutil::write_atomic(&file, format!("{counter}\n").as_bytes())
                        .map_err(Error::Io)?;
                    log::info!("{target} committed");
                    let report = Progress {
                        status: Status::Success,
                        progress: 100,
                        desc: String::new(),
                        firmware_version: target,
                    };
                    return Ok(start(Some(report), Next::Idle));
                }
                StartAction::RollBack { desc, reboot } => {
                    let next = next.expect("a rollback changes the journal");
                    if reboot {
                        // Still on the bad image: keep the reason, leave it.
                        self.save(next)?;
                        self.installer.roll_back(true).map_err(Error::Install)?;
                        if self.installer.needs_reboot() {
                            self.installer.reboot().map_err(Error::Install)?;
                            return Ok(start(None, Next::RollingBack));
                        }
                        // Rolled back in place: decide again on what runs now.
                        verdict = Health::Unknown;
                        continue;
                    }
                    if let Err(e) = self.installer.roll_back(false) {
                        log::error!("rolling back: {e}");
                    }
                    let target = next.target_version.clone();
                    self.save(next)?;
                    log::info!("{desc}");
                    let report = Progress {
                        status: Status::UpgradeFailed,
                        progress: 0,
                        desc,
                        firmware_version: target,
                    };
                    return Ok(start(Some(report), Next::Idle));
                }
            }
        }
        Err(Error::Install(
            "the start-up decision did not settle".to_owned(),
        ))
    }

    /// Journals the upgrade `j` failed and returns its UPGRADE_FAILED report.
    fn fail(&mut self, j: &Journal, why: &str) -> Result<Progress, Error> {
        self.set_phase(Phase::Failed, Some(why))?;
        Ok(Progress {
            status: Status::UpgradeFailed,
            progress: 0,
            desc: why.to_owned(),
            firmware_version: j.target_version.clone(),
        })
    }

    /// A new upgrade to `firmware` (command `msg_id`) from `from_version`:
    /// journaled as downloading before the first byte.
    /// `pending_counter` is the signed manifest's counter, if any.
    pub fn begin(
        &mut self,
        from_version: &str,
        firmware: &Firmware,
        msg_id: &str,
        pending_counter: Option<u64>,
    ) -> Result<(), Error> {
        let mut j = Journal::for_firmware(from_version, firmware, msg_id);
        j.security_counter = self.security_counter();
        j.pending_counter = pending_counter;
        self.save(j)
    }

    fn set_phase(&mut self, phase: Phase, reason: Option<&str>) -> Result<(), Error> {
        let mut j = self
            .journal
            .clone()
            .ok_or_else(|| Error::Install("no upgrade in progress".into()))?;
        j.phase = phase;
        j.reason = reason.map(str::to_owned);
        self.save(j)
    }

    /// A command the engine accepted (command `msg_id`, or a get reply's
    /// firmware): journaled as downloading, and only then acknowledged
    /// (the 200 the engine holds under [`crate::Config::ack_after_journal`]),
    /// so that a power cut between the two leaves the platform without an
    /// ack (it pushes again), never a device that acked a command it
    /// forgot. The one place of that rule: the agent, the Rust example and
    /// the C API all accept through it.
    ///
    /// When the journal cannot be written the upgrade is reported
    /// UPGRADE_FAILED with the reason (a device that cannot remember an
    /// upgrade must not begin one), and `Err` holds that reason.
    pub fn accept(
        &mut self,
        session: &Session,
        firmware: &Firmware,
        msg_id: &str,
    ) -> Result<(), String> {
        let pending = firmware.signed.as_ref().map(|s| s.manifest.counter);
        match self.begin(&session.version(), firmware, msg_id, pending) {
            Ok(()) => {
                session.with(|ota| ota.acknowledge(msg_id));
                Ok(())
            }
            Err(e) => {
                let desc = format!("cannot journal the upgrade to {}: {e}", firmware.version);
                log::error!("{desc}");
                session.publish_progress(&Progress {
                    status: Status::UpgradeFailed,
                    progress: 0,
                    desc: desc.clone(),
                    firmware_version: firmware.version.clone(),
                });
                Err(desc)
            }
        }
    }

    /// Tells the engine of `session` the security counter of the running
    /// firmware (raised by a commit), so that it refuses older manifests.
    pub fn share_counter(&self, session: &Session) {
        let counter = self.security_counter();
        session.with(|ota| ota.set_security_counter(counter));
    }

    /// After an upgrade settled without a reboot ([`Installed::Settled`]):
    /// the counter to the engine, then the start's report (SUCCESS, or the
    /// rollback) as this upgrade's last report. The caller informs
    /// [`Start::running`] next.
    pub fn report_settled(&self, session: &Session, start: &Start) {
        self.share_counter(session);
        if let Some(report) = &start.report {
            session.publish_progress(report);
        }
    }

    /// The image is downloaded and verified.
    pub fn downloaded(&mut self) -> Result<(), Error> {
        self.set_phase(Phase::Downloaded, None)
    }

    /// The upgrade failed before any reboot (the failure is reported by
    /// whoever failed: the download, or the install).
    pub fn failed(&mut self, why: &str) -> Result<(), Error> {
        self.set_phase(Phase::Failed, Some(why))
    }

    /// Installs the verified `image`. With an installer that needs a
    /// reboot, asks for it ([`Installed::Rebooting`]); otherwise checks and
    /// settles the upgrade at once ([`Installed::Settled`]). `Err` is the
    /// install's failure (journaled as failed): report it as FLASH_FAILED.
    pub fn install(
        &mut self,
        image: &Path,
        health: Option<&mut dyn FnMut(&str) -> Health>,
        progress: &mut dyn FnMut(u32),
    ) -> Result<Installed, Error> {
        let version = match &self.journal {
            Some(j) if matches!(j.phase, Phase::Downloaded | Phase::Installing) => {
                j.target_version.clone()
            }
            _ => return Err(Error::Install("nothing downloaded to install".into())),
        };
        self.set_phase(Phase::Installing, None)?;
        if let Err(e) = self.installer.install(image, &version, progress) {
            self.failed(&e)?;
            return Err(Error::Install(e));
        }
        self.set_phase(Phase::Installed, None)?;
        if self.installer.needs_reboot() {
            if let Err(e) = self.installer.reboot() {
                // No reboot: disarm the new slot, so that a later, unrelated
                // reboot does not boot it as if this upgrade went on.
                if let Err(r) = self.installer.roll_back(false) {
                    log::error!("disarming the new slot after a failed reboot: {r}");
                }
                let why = format!("the reboot into {version} failed: {e}");
                self.failed(&why)?;
                return Err(Error::Install(why));
            }
            return Ok(Installed::Rebooting);
        }
        self.settle(health).map(|s| Installed::Settled(Box::new(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iot_ota_core::SignMethod;

    /// An installer in memory: two slots and a bootloader that boots the
    /// tried slot at the next "reboot" ([`Fake::reboot_now`]).
    #[derive(Debug, Default)]
    struct Fake {
        slots: [String; 2],
        booted: usize,
        trying: bool,
        health: Option<String>,
        calls: Vec<String>,
        reboot: bool,
    }

    impl Fake {
        fn new() -> Fake {
            Fake {
                slots: ["1.0".into(), String::new()],
                reboot: true,
                ..Fake::default()
            }
        }
        fn reboot_now(&mut self) {
            if self.trying {
                self.booted = 1 - self.booted;
                self.trying = false;
            }
        }
    }

    impl Installer for Fake {
        fn name(&self) -> &str {
            "fake"
        }
        fn running_version(&mut self) -> Result<String, String> {
            Ok(self.slots[self.booted].clone())
        }
        fn install(&mut self, _: &Path, v: &str, p: &mut dyn FnMut(u32)) -> Result<(), String> {
            self.calls.push(format!("install {v}"));
            p(100);
            self.slots[1 - self.booted] = v.to_owned();
            self.trying = true;
            if !self.reboot {
                self.reboot_now();
            }
            Ok(())
        }
        fn needs_reboot(&self) -> bool {
            self.reboot
        }
        fn reboot(&mut self) -> Result<(), String> {
            self.calls.push("reboot".into());
            Ok(())
        }
        fn health_check(&mut self) -> Health {
            self.health.clone().map_or(Health::Good, Health::Bad)
        }
        fn commit(&mut self) -> Result<(), String> {
            self.calls.push("commit".into());
            Ok(())
        }
        fn roll_back(&mut self, _: bool) -> Result<(), String> {
            self.calls.push("rollback".into());
            // Back to the other slot (at the next reboot, or now in place).
            self.trying = true;
            if !self.reboot {
                self.reboot_now();
            }
            Ok(())
        }
    }

    fn firmware(version: &str) -> Firmware {
        Firmware {
            version: version.into(),
            url: "http://fw/x".into(),
            size: Some(3),
            sign: "9e107d9d372bb6826bd81d3542a419d6".into(),
            sign_method: SignMethod::Md5,
            policy: None,
            signed: None,
        }
    }

    fn state(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("iot-ota-life-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn upgrade(life: &mut Lifecycle<Fake>, version: &str, counter: Option<u64>) -> Installed {
        assert_eq!(life.at_start(None).unwrap().next, Next::Idle);
        life.begin("1.0", &firmware(version), "m7", counter)
            .unwrap();
        life.downloaded().unwrap();
        life.install(Path::new("/img"), None, &mut |_| {}).unwrap()
    }

    #[test]
    fn install_reboot_confirm_commit() {
        let d = state("commit");
        let mut life = Lifecycle::open(&d, Fake::new()).unwrap();
        assert_eq!(upgrade(&mut life, "2.0", Some(7)), Installed::Rebooting);
        assert_eq!(life.journal().unwrap().phase, Phase::Installed);
        assert_eq!(life.security_counter(), 0, "not raised before the commit");
        life.installer().reboot_now();
        let start = life.at_start(None).unwrap();
        assert_eq!(start.running, "2.0");
        let report = start.report.unwrap();
        assert_eq!((report.status, report.progress), (Status::Success, 100));
        assert_eq!(report.firmware_version, "2.0");
        assert_eq!(life.journal().unwrap().phase, Phase::Committed);
        assert_eq!(life.security_counter(), 7);
        assert_eq!(life.installer().calls, ["install 2.0", "reboot", "commit"]);
        // The next start has nothing to report.
        let again = life.at_start(None).unwrap();
        assert_eq!((again.report, again.next), (None, Next::Idle));
        // A set-aside journal never lowers the counter.
        std::fs::write(d.join("journal"), "torn").unwrap();
        let start = life.at_start(None).unwrap();
        assert!(start.set_aside.unwrap().contains("unreadable"));
        assert_eq!(life.security_counter(), 7);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_unhealthy_image_is_rolled_back_with_a_reboot() {
        let d = state("health");
        let mut life = Lifecycle::open(&d, Fake::new()).unwrap();
        upgrade(&mut life, "2.0", Some(7));
        life.installer().reboot_now();
        life.installer().health = Some("no network".into());
        let start = life.at_start(None).unwrap();
        assert_eq!((start.report, start.next), (None, Next::RollingBack));
        life.installer().reboot_now();
        let start = life.at_start(None).unwrap();
        assert_eq!(start.running, "1.0");
        let report = start.report.unwrap();
        assert_eq!(report.status, Status::UpgradeFailed);
        assert!(
            report
                .desc
                .starts_with("rolled back: 2.0 -> 1.0: health check failed: no network"),
            "{}",
            report.desc
        );
        assert_eq!(life.journal().unwrap().phase, Phase::RolledBack);
        assert_eq!(life.security_counter(), 0, "a rollback never raises it");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_applications_health_verdict_wins() {
        let d = state("closure");
        let mut life = Lifecycle::open(&d, Fake::new()).unwrap();
        upgrade(&mut life, "2.0", None);
        life.installer().reboot_now();
        let mut seen = Vec::new();
        let mut check = |v: &str| {
            seen.push(v.to_owned());
            Health::Bad("the app's own check".into())
        };
        let start = life.at_start(Some(&mut check)).unwrap();
        assert_eq!(start.next, Next::RollingBack);
        assert_eq!(seen, ["2.0"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn without_a_reboot_the_install_settles_at_once() {
        let d = state("inplace");
        let mut fake = Fake::new();
        fake.reboot = false;
        let mut life = Lifecycle::open(&d, fake).unwrap();
        let Installed::Settled(start) = upgrade(&mut life, "2.0", None) else {
            panic!("settles")
        };
        assert_eq!(start.running, "2.0");
        assert_eq!(start.report.unwrap().status, Status::Success);
        // A bad one is rolled back in place and reported against both versions.
        life.installer().health = Some("crashes".into());
        life.begin("2.0", &firmware("3.0"), "m8", None).unwrap();
        life.downloaded().unwrap();
        let Installed::Settled(start) = life.install(Path::new("/img"), None, &mut |_| {}).unwrap()
        else {
            panic!("settles")
        };
        assert_eq!(start.running, "2.0");
        let report = start.report.unwrap();
        assert!(
            report.desc.starts_with("rolled back: 3.0 -> 2.0"),
            "{}",
            report.desc
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    /// The real command back-end, in place: an unhealthy new version is
    /// rolled back at once, and what it reports and records is the old one.
    #[test]
    fn commands_in_place_roll_back_to_the_version_that_ran() {
        use crate::install::CommandHooks;
        let d = state("hooks");
        std::fs::create_dir_all(&d).unwrap();
        let version_file = d.join("running-version");
        let hooks = CommandHooks::new("true", "1.0")
            .with_reboot(None)
            .with_health(Some("exit 1".into()))
            .with_version_file(Some(version_file.clone()));
        let mut life = Lifecycle::open(&d, hooks).unwrap();
        life.begin("1.0", &firmware("2.0"), "m", Some(4)).unwrap();
        life.downloaded().unwrap();
        let Installed::Settled(start) = life.install(Path::new("/img"), None, &mut |_| {}).unwrap()
        else {
            panic!("settles in place")
        };
        assert_eq!(start.running, "1.0");
        let report = start.report.unwrap();
        assert_eq!(report.status, Status::UpgradeFailed);
        assert!(
            report.desc.starts_with("rolled back: 2.0 -> 1.0"),
            "{}",
            report.desc
        );
        assert_eq!(std::fs::read_to_string(&version_file).unwrap(), "1.0\n");
        assert_eq!(life.security_counter(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_cut_download_or_install_goes_on_from_the_journal() {
        let d = state("cut");
        let mut life = Lifecycle::open(&d, Fake::new()).unwrap();
        life.begin("1.0", &firmware("2.0"), "m1", None).unwrap();
        let mut life = Lifecycle::open(&d, Fake::new()).unwrap();
        assert_eq!(
            life.at_start(None).unwrap().next,
            Next::Resume(firmware("2.0"))
        );
        life.downloaded().unwrap();
        let mut life = Lifecycle::open(&d, Fake::new()).unwrap();
        assert_eq!(
            life.at_start(None).unwrap().next,
            Next::Install(firmware("2.0"))
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
