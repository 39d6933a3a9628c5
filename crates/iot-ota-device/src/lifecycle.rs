//! The upgrade across reboots, driven: the device-side driver of the core's
//! one upgrade flow ([`iot_ota_core::flow::Flow`]), with the journal in a
//! state directory, an [`Installer`], and the MQTT [`Session`]. The agent,
//! the Rust example and the C API all run their upgrades through it; each
//! keeps only what is its own (where the image goes, a silent window, a C
//! program's own flash).
//!
//! ```text
//!  command ─► accept: journal, then 200 ─► download_to / fetched ─► install ─► Rebooting
//!                          │ crash: Next::Resume            │ crash: Next::Install
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
//! and what is left to do ([`Next`]). Once connected, [`Lifecycle::attach`]
//! gives it the session; then an upgrade is [`Lifecycle::accept`] (journal,
//! then the held 200), [`Lifecycle::download_to`] (or, for a caller that
//! downloads itself, [`Lifecycle::fetched`]), and [`Lifecycle::install`],
//! which reboots, or settles and reports SUCCESS (or the rollback) and the
//! running version itself.
//!
//! ```no_run
//! use iot_ota_device::install::SlotDirs;
//! use iot_ota_device::lifecycle::{Installed, Lifecycle, Next};
//! use iot_ota_device::{Config, OtaClient};
//!
//! # async fn boot() -> Result<(), iot_ota_device::Error> {
//! let slots = SlotDirs::boot("/data/slots", "1.0.0", 3).map_err(iot_ota_device::Error::Install)?;
//! let mut life = Lifecycle::open("/data/ota-state", slots)?;
//! let start = life.at_start(None)?;
//! if let Next::Rebooting | Next::RollingBack = start.next {
//!     return Ok(()); // a reboot was asked for: into the new image, or back
//! }
//! let mut config = Config::new("mqtt://127.0.0.1:1883", "pk", "dev1", &start.running)?
//!     .security_counter(life.security_counter())
//!     .ack_after_journal(true); // the 200 waits for `accept`'s journal
//! if let Some(report) = start.report {
//!     config = config.report_at_start(report); // SUCCESS, or "rolled back: ..."
//! }
//! let (client, mut upgrades) = OtaClient::connect(config).await?;
//! life.attach(client.session().clone());
//! while let Some(command) = upgrades.next().await {
//!     if life.accept(&command.firmware, &command.msg_id).is_err() {
//!         continue; // not journaled: reported UPGRADE_FAILED, no 200
//!     }
//!     let image = std::path::Path::new("/data/ota-state/image.bin");
//!     if life.download_to(client.download(&command), image).await.is_err() {
//!         continue; // reported DOWNLOAD_FAILED or VERIFY_FAILED, journaled
//!     }
//!     if let Ok(Installed::Rebooting) = life.install(image, None, &mut |_| {}) {
//!         return Ok(()); // the next start confirms it
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! The driver carries out the flow's actions in order: it writes the
//! journal before it acts (the flow's rule), and turns a journal or
//! installer failure the flow cannot go on without into this crate's
//! [`Error`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use iot_ota_core::flow::{Action, Done, Flow};
use iot_ota_core::journal::{Health, Journal, JournalError, JournalStore};
use iot_ota_core::{Firmware, Progress, Status, Verified};

pub use iot_ota_core::flow::{Next, Start};

use crate::download::Download;
use crate::error::Error;
use crate::fsutil;
use crate::install::Installer;
use crate::journal_file::FileJournal;
use crate::session::Session;

/// How an install ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// Installed; a reboot was asked for: stop, the next start confirms it.
    Rebooting,
    /// The installer needs no reboot: the image runs, was checked, and the
    /// upgrade is settled. Its report (SUCCESS, or the rollback) and the
    /// inform of [`Start::running`] are sent already when a session is
    /// attached.
    Settled(Box<Start>),
}

/// What [`Lifecycle::resume`] left to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resumed {
    /// Download this firmware again (the part file resumes it):
    /// [`crate::OtaClient::resume_download`], then
    /// [`Lifecycle::download_to`].
    Fetch(Firmware),
    /// The verified image is there: [`Lifecycle::install`] it.
    Install(Firmware),
}

/// One device's upgrades across reboots: the core's [`Flow`] and what
/// carries its actions out.
#[derive(Debug)]
pub struct Lifecycle<I: Installer> {
    dir: PathBuf,
    store: FileJournal,
    installer: I,
    flow: Flow,
    session: Option<Arc<Session>>,
    /// The journal set aside by the last [`Lifecycle::at_start`].
    set_aside: Option<String>,
    /// The typed error behind the flow's last failed step.
    error: Option<Error>,
    /// Whether a settled install informs the running version.
    inform: bool,
    /// The base of delta updates, when the caller names one (else the
    /// installer's running image).
    delta_base: Option<PathBuf>,
}

const COUNTER_FILE: &str = "security-counter";

/// How a sequence ended, for an error message. (Not `Debug`: that would
/// pull the formatting of every type a `Done` holds into the C library.)
fn ended(done: Option<&Done>) -> &'static str {
    match done {
        None => "waiting for another step",
        Some(Done::Settled(_)) => "settled",
        Some(Done::Rebooting) => "asking for a reboot",
        Some(Done::Failed(_)) => "failed",
        Some(Done::Stuck(_)) => "stuck",
    }
}

/// The counter file's value: 0 when absent; `u64::MAX` when it is there but
/// unreadable (it is written atomically: damage means a bad disk or
/// tampering), so that no signed firmware passes until a person looks.
fn read_counter(dir: &Path) -> u64 {
    let path = dir.join(COUNTER_FILE);
    match std::fs::read_to_string(&path) {
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
    }
}

/// What the front end gives one run of the actions.
struct Tools<'a, 'h, 'p> {
    image: &'a Path,
    health: Option<&'a mut (dyn FnMut(&str) -> Health + 'h)>,
    progress: &'a mut (dyn FnMut(u32) + 'p),
}

impl<I: Installer> Lifecycle<I> {
    /// The lifecycle of the device whose state lives in `state_dir` (the
    /// journal, the security counter), installing with `installer`.
    pub fn open(state_dir: impl Into<PathBuf>, installer: I) -> Result<Lifecycle<I>, Error> {
        let dir = state_dir.into();
        std::fs::create_dir_all(&dir).map_err(Error::Io)?;
        Ok(Lifecycle {
            store: FileJournal::in_dir(&dir),
            flow: Flow::new(None, read_counter(&dir)),
            dir,
            installer,
            session: None,
            set_aside: None,
            error: None,
            inform: true,
            delta_base: None,
        })
    }

    /// The installer.
    pub fn installer(&mut self) -> &mut I {
        &mut self.installer
    }

    /// The journal as last read or written.
    pub fn journal(&self) -> Option<&Journal> {
        self.flow.journal()
    }

    /// The flow (to ask where the upgrade is).
    pub fn flow(&self) -> &Flow {
        &self.flow
    }

    /// The security counter of the committed firmware (signed manifests):
    /// the highest of the journal's and the counter file's, so that a
    /// journal set aside never lowers it; `u64::MAX` (no signed firmware
    /// passes) when the counter file is damaged.
    pub fn security_counter(&self) -> u64 {
        self.flow.security_counter()
    }

    /// Why the last [`Lifecycle::at_start`] set the journal aside (it could
    /// not be read), if it did: log it.
    pub fn set_aside(&self) -> Option<&str> {
        self.set_aside.as_deref()
    }

    /// Gives the lifecycle the session it acknowledges, reports and informs
    /// through (once connected), and tells its engine the security counter.
    pub fn attach(&mut self, session: Arc<Session>) {
        let counter = self.security_counter();
        session.with(|ota| ota.set_security_counter(counter));
        self.session = Some(session);
    }

    /// Whether an install that settles without a reboot informs the version
    /// that runs then (default yes). The C API says no: the vendor guide's
    /// program informs it itself, after `iot_ota_install_done`.
    pub fn set_inform_after_install(&mut self, inform: bool) {
        self.inform = inform;
    }

    /// Reads the journal; an unreadable one is set aside (and said).
    fn load(&mut self) -> Result<Option<Journal>, Error> {
        self.set_aside = None;
        match self.store.load() {
            Ok(j) => Ok(j),
            Err(e @ JournalError::Store(_)) => Err(Error::Journal(e)),
            Err(e) => {
                log::error!("{e}; set aside, starting without it");
                self.store.set_aside().map_err(Error::Journal)?;
                self.set_aside = Some(e.to_string());
                Ok(None)
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
        let journal = self.load()?;
        self.flow = Flow::new(journal, read_counter(&self.dir));
        self.flow.start();
        match self.run_with(Path::new(""), health, &mut |_| {})? {
            Some(Done::Settled(start)) => Ok(start),
            other => Err(Error::Install(format!(
                "the start-up decision ended {}",
                ended(other.as_ref())
            ))),
        }
    }

    /// A command the engine accepted (command `msg_id`, or a get reply's
    /// firmware): journaled as downloading, and only then acknowledged
    /// (the 200 the engine holds under [`crate::Config::ack_after_journal`]),
    /// so that a power cut between the two leaves the platform without an
    /// ack (it pushes again), never a device that acked a command it
    /// forgot. Needs [`Lifecycle::attach`] first.
    ///
    /// When the journal cannot be written the upgrade is reported
    /// UPGRADE_FAILED with the reason (a device that cannot remember an
    /// upgrade must not begin one), and `Err` holds that reason.
    pub fn accept(&mut self, firmware: &Firmware, msg_id: &str) -> Result<(), String> {
        let Some(session) = &self.session else {
            return Err("no session attached: accept needs Lifecycle::attach".into());
        };
        let from = session.version();
        self.accept_from(&from, firmware, msg_id)
    }

    /// [`Lifecycle::accept`] of an upgrade from `from_version`.
    fn accept_from(&mut self, from: &str, firmware: &Firmware, msg_id: &str) -> Result<(), String> {
        self.flow.handle_command(from, firmware, msg_id);
        match self.run() {
            Ok(None) if self.flow.is_fetching() => Ok(()),
            Ok(Some(Done::Failed(why))) => Err(why),
            Ok(other) => Err(format!(
                "the upgrade to {} ended {}",
                firmware.version,
                ended(other.as_ref())
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Goes on with the upgrade [`Lifecycle::at_start`] left as
    /// [`Next::Resume`] or [`Next::Install`]: the attached session's engine
    /// takes it as its job again (its reports name its version), then it
    /// is fetched again, or installed from `image_present`'s verified image.
    /// `Err` is why it cannot go on (a key pinned since, a counter raised,
    /// a journal without a source): reported UPGRADE_FAILED and journaled.
    pub fn resume(&mut self, image_present: bool) -> Result<Resumed, String> {
        self.flow.resume(image_present);
        let done = self.run().map_err(|e| e.to_string())?;
        let firmware = match (done, self.flow.journal().and_then(Journal::firmware)) {
            (None, Some(fw)) => fw,
            (Some(Done::Failed(why)), _) => return Err(why),
            (other, _) => return Err(format!("the resume ended {}", ended(other.as_ref()))),
        };
        let session = self.session.clone();
        let taken = session
            .as_ref()
            .map_or(Ok(()), |s| s.with(|ota| ota.accept_firmware(&firmware)));
        if let Err(e) = taken {
            let why = format!("cannot go on with {}: {e}", firmware.version);
            self.flow.abandon(&why);
            let _ = self.run();
            let report = Progress::new(Status::UpgradeFailed, 0, &why, &firmware.version);
            // Before the inform when offline; at once when online.
            if let Some(s) = session {
                let _ = s.with(|ota| ota.report_at_start(report));
            }
            return Err(why);
        }
        Ok(if self.flow.is_fetching() {
            Resumed::Fetch(firmware)
        } else {
            Resumed::Install(firmware)
        })
    }

    /// Downloads and verifies the accepted (or resumed) upgrade's image to
    /// `image` with `download`, and journals the outcome: the download
    /// driver and the flow, joined for an async caller. `Err` is the
    /// download's failure (it reported DOWNLOAD_FAILED or VERIFY_FAILED).
    pub async fn download_to(
        &mut self,
        download: Download,
        image: &Path,
    ) -> Result<Verified, Error> {
        let download = match self.delta_base() {
            Some(base) => download.delta_from(base),
            None => download,
        };
        let result = download.download_to(image).await;
        self.fetched(result.as_ref().map(|_| ()).map_err(ToString::to_string))?;
        result
    }

    /// Makes every download a delta update from `base` (a file or block
    /// device holding the image the device runs) when its command names a
    /// chunk index: see [`Download::delta_from`]. Without it, the
    /// installer's running image is the base ([`Installer::running_image`]),
    /// if it knows one.
    pub fn set_delta_base(&mut self, base: Option<PathBuf>) {
        self.delta_base = base;
    }

    /// The base of the next delta update: the caller's, or the installer's
    /// running image.
    pub fn delta_base(&self) -> Option<PathBuf> {
        self.delta_base
            .clone()
            .or_else(|| self.installer.running_image())
    }

    /// The download the flow asked for ended (for a caller that downloads
    /// by itself, as the C API's `fetch_yield` does): `Ok` when the image
    /// is verified (journaled as downloaded; [`Lifecycle::install`] next),
    /// `Err` why not (journaled as failed; the download reported it). `Err`
    /// of this call: the journal could not be written (the upgrade was
    /// reported UPGRADE_FAILED).
    pub fn fetched(&mut self, result: Result<(), String>) -> Result<(), Error> {
        if !self.flow.is_fetching() {
            return Ok(());
        }
        self.flow.handle_fetched(result);
        match self.run()? {
            Some(Done::Failed(_)) | None => Ok(()),
            Some(other) => Err(Error::Install(format!(
                "the download ended {}",
                ended(Some(&other))
            ))),
        }
    }

    /// The application gave up on the upgrade in progress (its own
    /// failure, reported by it): journaled as failed with `why`, so that the
    /// next start does not resume it.
    pub fn abandon(&mut self, why: &str) -> Result<(), Error> {
        if !(self.flow.is_fetching() || self.flow.is_ready_to_install()) {
            return Ok(());
        }
        self.flow.abandon(why);
        self.run().map(|_| ())
    }

    /// Installs the verified `image`. With an installer that needs a
    /// reboot, asks for it ([`Installed::Rebooting`]); otherwise checks and
    /// settles the upgrade at once ([`Installed::Settled`]), reporting it
    /// and (unless [`Lifecycle::set_inform_after_install`] says not) the
    /// running version. The installer's percents go out as
    /// UPGRADING reports, and to `progress`. `Err` is the install's
    /// failure: journaled and reported FLASH_FAILED already.
    pub fn install(
        &mut self,
        image: &Path,
        health: Option<&mut dyn FnMut(&str) -> Health>,
        progress: &mut dyn FnMut(u32),
    ) -> Result<Installed, Error> {
        if !self.flow.is_ready_to_install() {
            return Err(Error::Install("nothing downloaded to install".into()));
        }
        self.flow.install();
        match self.run_with(image, health, progress)? {
            Some(Done::Rebooting) => Ok(Installed::Rebooting),
            Some(Done::Settled(start)) => {
                if let Some(session) = &self.session {
                    if let Some(report) = &start.report {
                        session.publish_progress(report);
                    }
                    if self.inform {
                        if let Err(e) = session.with(|ota| ota.report_version(&start.running)) {
                            log::error!("informing {}: {e}", start.running);
                        }
                    }
                }
                Ok(Installed::Settled(Box::new(start)))
            }
            Some(Done::Failed(why)) => Err(Error::Install(why)),
            other => Err(Error::Install(format!(
                "the install ended {}",
                ended(other.as_ref())
            ))),
        }
    }

    fn run(&mut self) -> Result<Option<Done>, Error> {
        self.run_with(Path::new(""), None, &mut |_| {})
    }

    fn run_with(
        &mut self,
        image: &Path,
        health: Option<&mut dyn FnMut(&str) -> Health>,
        progress: &mut dyn FnMut(u32),
    ) -> Result<Option<Done>, Error> {
        let mut tools = Tools {
            image,
            health,
            progress,
        };
        self.error = None;
        while let Some(action) = self.flow.poll_action() {
            if let Action::Done(done) = action {
                if let Done::Stuck(why) = done {
                    return Err(self.error.take().unwrap_or(Error::Install(why)));
                }
                return Ok(Some(done));
            }
            self.act(action, &mut tools);
        }
        Ok(None)
    }

    /// Carries one action out, and answers the flow.
    fn act(&mut self, action: Action, tools: &mut Tools<'_, '_, '_>) {
        let failed = |error: &mut Option<Error>, e: Error| {
            let text = e.to_string();
            *error = Some(e);
            text
        };
        match action {
            Action::Persist(j) => {
                let r = self
                    .store
                    .save(&j)
                    .map_err(|e| failed(&mut self.error, Error::Journal(e)));
                self.flow.handle_saved(r);
            }
            Action::SaveCounter(counter) => {
                let file = self.dir.join(COUNTER_FILE);
                let r = fsutil::write_atomic(&file, format!("{counter}\n").as_bytes())
                    .map_err(|e| failed(&mut self.error, Error::Io(e)));
                self.flow.handle_saved(r);
            }
            Action::Acknowledge(msg_id) => {
                if let Some(s) = &self.session {
                    s.with(|ota| ota.acknowledge(&msg_id));
                }
            }
            Action::ShareCounter(counter) => {
                if let Some(s) = &self.session {
                    s.with(|ota| ota.set_security_counter(counter));
                }
            }
            Action::Report(report) => match &self.session {
                Some(s) => s.publish_progress(&report),
                None => log::error!("not reported (no session yet): {report}"),
            },
            // The caller downloads: the flow waits for `fetched`.
            Action::Fetch(fw) => log::info!("downloading {}", fw.version),
            Action::Install { version } => {
                // The installer's percents are UPGRADING reports (and the
                // front end's to show).
                let session = self.session.clone();
                let mut progress = |pct: u32| {
                    if let Some(s) = &session {
                        s.publish_progress(&Progress::new(Status::Upgrading, pct, "", &version));
                    }
                    (tools.progress)(pct);
                };
                let r = self
                    .installer
                    .install(tools.image, &version, &mut progress)
                    .map(|()| self.installer.needs_reboot());
                self.flow.handle_installed(r);
            }
            Action::Reboot => {
                let r = self.installer.reboot();
                self.flow.handle_done(r);
            }
            Action::ReadRunning => {
                let r = self.installer.running_version();
                self.flow.handle_running(r);
            }
            Action::CheckHealth { version } => {
                let verdict = match tools.health.as_mut() {
                    Some(f) => f(&version),
                    None => self.installer.health_check(),
                };
                log::info!("health check of {version}: {verdict:?}");
                self.flow.handle_health(verdict);
            }
            Action::Commit => {
                let r = self.installer.commit();
                if r.is_ok() {
                    log::info!("committed");
                }
                self.flow.handle_done(r);
            }
            Action::RollBack { reboot } => {
                let r = self.installer.roll_back(reboot);
                if let (false, Err(e)) = (reboot, &r) {
                    log::error!("rolling back: {e}");
                }
                let r = r.map(|()| self.installer.needs_reboot());
                self.flow.handle_rolled_back(r);
            }
            // `run_with` ends at it, before it gets here.
            Action::Done(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iot_ota_core::journal::Phase;
    use iot_ota_core::manifest::{Manifest, Signed};
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
            delta: None,
        }
    }

    fn state(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("iot-ota-life-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// The firmware, with a signed manifest's counter when given (the
    /// flow reads only the counter; signatures are the engine's business).
    fn signed(version: &str, counter: Option<u64>) -> Firmware {
        let mut fw = firmware(version);
        fw.signed = counter.map(|counter| {
            let manifest = Manifest {
                product: "pk".into(),
                firmware_version: version.into(),
                size: 3,
                sha256: "0".repeat(64),
                counter,
                index_sha256: None,
            };
            Box::new(Signed {
                bytes: manifest.encode(),
                manifest,
                signatures: Vec::new(),
            })
        });
        fw
    }

    /// Accepted from `from`, downloaded, installed.
    fn begin_and_install(
        life: &mut Lifecycle<impl Installer>,
        from: &str,
        fw: &Firmware,
    ) -> Result<Installed, Error> {
        life.accept_from(from, fw, "m7").unwrap();
        life.fetched(Ok(())).unwrap();
        life.install(Path::new("/img"), None, &mut |_| {})
    }

    fn upgrade(life: &mut Lifecycle<Fake>, version: &str, counter: Option<u64>) -> Installed {
        assert_eq!(life.at_start(None).unwrap().next, Next::Idle);
        begin_and_install(life, "1.0", &signed(version, counter)).unwrap()
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
        assert_eq!(start.running, "2.0");
        assert!(life.set_aside().unwrap().contains("unreadable"));
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
        let Installed::Settled(start) =
            begin_and_install(&mut life, "2.0", &firmware("3.0")).unwrap()
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
        let Installed::Settled(start) =
            begin_and_install(&mut life, "1.0", &signed("2.0", Some(4))).unwrap()
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
        life.accept_from("1.0", &firmware("2.0"), "m1").unwrap();
        let mut life = Lifecycle::open(&d, Fake::new()).unwrap();
        assert_eq!(
            life.at_start(None).unwrap().next,
            Next::Resume(firmware("2.0"))
        );
        assert_eq!(life.resume(false), Ok(Resumed::Fetch(firmware("2.0"))));
        life.fetched(Ok(())).unwrap();
        let mut life = Lifecycle::open(&d, Fake::new()).unwrap();
        assert_eq!(
            life.at_start(None).unwrap().next,
            Next::Install(firmware("2.0"))
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
