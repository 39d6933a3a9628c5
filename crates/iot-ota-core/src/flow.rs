//! The upgrade flow, once, without IO: command → journal → 200 → download →
//! install → reboot → confirm → commit or roll back, with the security
//! counter and the resume of a cut download or install.
//!
//! [`Flow`] decides; a driver acts. It is driven like [`crate::Ota`]:
//! `handle_*` methods take what happened (a command to accept, the answer
//! to the last action), the mutators [`Flow::resume`] and [`Flow::install`]
//! take the application's word, and **after every call the driver drains
//! [`Flow::poll_action`]**, carrying each [`Action`] out in order. An action
//! that needs an answer (its docs say which `handle_*` gives it) stops the
//! flow: `poll_action` returns `None` until that answer comes. Every
//! sequence ends in one [`Action::Done`].
//!
//! Persist before act: every step that changes what a device must remember
//! comes out as [`Action::Persist`] first, and the flow goes on only once the
//! driver says the journal is written ([`Flow::handle_saved`]). The one
//! exception is where acting twice is harmless: a commit (mark good) and a
//! rollback in place are done first and journaled after, so that a power cut
//! between the two repeats them at the next start instead of losing them.
//!
//! ```text
//!  handle_command ─► Persist(Downloading) ─► Acknowledge (the 200) ─► Fetch
//!                        │ not written: Report UPGRADE_FAILED, Done(Failed)
//!  handle_fetched ok ─► Persist(Downloaded) ─► (waits for install())
//!                 err ─► Persist(Failed) ─► Done(Failed)   (the download reported it)
//!  install() ─► Persist(Installing) ─► Install ─► Persist(Installed)
//!                                        │ err: Persist(Failed), Report FLASH_FAILED
//!       reboot needed ─► Reboot ─► Done(Rebooting)        (the next start goes on)
//!       in place      ─► settle ──────────────────┐
//!  start(journal) ─► settle: ReadRunning ─► decide_at_start ─► Commit / RollBack /
//!                    CheckHealth / Reboot ... ─► Done(Settled(Start))
//! ```
//!
//! A whole upgrade with a reboot, from memory:
//!
//! ```
//! use iot_ota_core::flow::{Action, Done, Flow, Next};
//! use iot_ota_core::journal::Health;
//! use iot_ota_core::{Firmware, SignMethod};
//!
//! let fw = Firmware {
//!     version: "2.0".into(),
//!     url: "http://fw/2.0.bin".into(),
//!     size: Some(3),
//!     sign: "9e107d9d372bb6826bd81d3542a419d6".into(),
//!     sign_method: SignMethod::Md5,
//!     policy: None,
//!     signed: None,
//!     delta: None,
//! };
//! let mut disk = None; // the journal as a driver would persist it
//! let mut flow = Flow::new(None, 0);
//! flow.handle_command("1.0", &fw, "m1");
//! let mut seen = Vec::new();
//! let mut drive = |flow: &mut Flow, disk: &mut Option<_>, seen: &mut Vec<String>| {
//!     while let Some(action) = flow.poll_action() {
//!         seen.push(action.name().to_owned());
//!         match action {
//!             Action::Persist(j) => { *disk = Some(j); flow.handle_saved(Ok(())) }
//!             Action::Fetch(_) => flow.handle_fetched(Ok(())), // downloaded, verified
//!             Action::Install { .. } => flow.handle_installed(Ok(true)), // needs a reboot
//!             Action::Reboot => flow.handle_done(Ok(())),
//!             Action::ReadRunning => flow.handle_running(Ok("2.0".into())),
//!             Action::CheckHealth { .. } => flow.handle_health(Health::Good),
//!             Action::Commit => flow.handle_done(Ok(())),
//!             Action::SaveCounter(_) => flow.handle_saved(Ok(())),
//!             _ => {}
//!         }
//!     }
//! };
//! drive(&mut flow, &mut disk, &mut seen);
//! assert_eq!(seen, ["persist", "acknowledge", "fetch", "persist"]);
//! flow.install(); // the application says when
//! drive(&mut flow, &mut disk, &mut seen);
//! assert!(seen.ends_with(&["persist".into(), "install".into(), "persist".into(),
//!                          "reboot".into(), "done".into()]));
//!
//! // The next start, on the new image: health check, commit, SUCCESS.
//! let mut flow = Flow::new(disk.clone(), 0);
//! flow.start();
//! seen.clear();
//! let mut start = None;
//! while let Some(action) = flow.poll_action() {
//!     match action {
//!         Action::Done(Done::Settled(s)) => start = Some(s),
//!         Action::Persist(j) => { disk = Some(j); flow.handle_saved(Ok(())) }
//!         Action::ReadRunning => flow.handle_running(Ok("2.0".into())),
//!         Action::CheckHealth { .. } => flow.handle_health(Health::Good),
//!         Action::Commit => flow.handle_done(Ok(())),
//!         Action::SaveCounter(_) => flow.handle_saved(Ok(())),
//!         _ => {}
//!     }
//! }
//! let start = start.unwrap();
//! assert_eq!((start.running.as_str(), start.next), ("2.0", Next::Idle));
//! assert_eq!(start.report.unwrap().progress, 100); // SUCCESS 100
//! ```

use std::collections::VecDeque;

use crate::journal::{decide_at_start, Health, Journal, Phase, StartAction};
use crate::protocol::{Firmware, Progress, Status};

/// Decisions in one settle at most: decide, check health, decide again,
/// (roll back in place, decide on the old version).
const MAX_ROUNDS: u8 = 4;

/// What a settle (the start-up decision, or an install without a reboot)
/// found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// The version the device runs: the one to inform.
    pub running: String,
    /// The report to send before the inform: SUCCESS (4) 100 of an upgrade
    /// just committed, or its UPGRADE_FAILED (-1) `rolled back: ...`.
    pub report: Option<Progress>,
    /// What is left to do.
    pub next: Next,
}

/// What is left to do after a settle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing: wait for commands.
    Idle,
    /// A download was cut off: download this firmware again (the part file
    /// resumes it), then install it: [`Flow::resume`].
    Resume(Firmware),
    /// The image was downloaded and verified, the install was cut off:
    /// install it again (download it again if the image is gone):
    /// [`Flow::resume`].
    Install(Firmware),
    /// A reboot into the installed image was asked for: stop; the next
    /// start goes on.
    Rebooting,
    /// The new image is unhealthy: the installer rolled back and a reboot
    /// into the old image was asked for: stop; the next start reports it.
    RollingBack,
}

/// How a sequence of actions ended: the last action of every sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// The start-up decision, or an install that needed no reboot, settled.
    /// After an install, report [`Start::report`] and inform
    /// [`Start::running`].
    Settled(Start),
    /// Installed, and the reboot into it was asked for: stop; the next
    /// start confirms it.
    Rebooting,
    /// The upgrade failed before any reboot (why). Its report is out
    /// already: the download's own, or an [`Action::Report`] before this.
    Failed(String),
    /// A journal or installer call the flow cannot go on without failed
    /// (why): the driver returns it as an error. During an upgrade, an
    /// [`Action::Report`] of UPGRADE_FAILED came before it.
    Stuck(String),
}

/// Something the driver must do, from [`Flow::poll_action`], in order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "carry every action out, in order"]
pub enum Action {
    /// Write this journal atomically, then answer [`Flow::handle_saved`].
    Persist(Journal),
    /// Write the committed security counter (beside the journal, never
    /// lowered by a journal set aside), then answer [`Flow::handle_saved`].
    SaveCounter(u64),
    /// Send the held 200 of this command (`Ota::acknowledge`).
    Acknowledge(String),
    /// Tell the MQTT engine the security counter of the running firmware
    /// (`Ota::set_security_counter`), so that it refuses older manifests.
    ShareCounter(u64),
    /// Publish this report (`Ota::publish_progress`).
    Report(Progress),
    /// Download and verify this firmware (a part file resumes it), then
    /// answer [`Flow::handle_fetched`].
    Fetch(Firmware),
    /// Install the downloaded image of `version`, then answer
    /// [`Flow::handle_installed`].
    Install {
        /// The version being installed.
        version: String,
    },
    /// Ask for a reboot, then answer [`Flow::handle_done`].
    Reboot,
    /// Ask the installer which version runs, then answer
    /// [`Flow::handle_running`].
    ReadRunning,
    /// Check the health of the running, unconfirmed image, then answer
    /// [`Flow::handle_health`].
    CheckHealth {
        /// The version that runs.
        version: String,
    },
    /// Mark the running image good, then answer [`Flow::handle_done`].
    Commit,
    /// Switch back to the old image (with `reboot`, a reboot follows when
    /// the installer needs one; without, it is a disarm or a rollback in
    /// place whose failure is only logged), then answer
    /// [`Flow::handle_rolled_back`].
    RollBack {
        /// The device still runs the bad image.
        reboot: bool,
    },
    /// The sequence ended.
    Done(Done),
}

impl Action {
    /// The action's name, for logs and tests: `persist`, `fetch`, ...
    pub fn name(&self) -> &'static str {
        match self {
            Action::Persist(_) => "persist",
            Action::SaveCounter(_) => "save-counter",
            Action::Acknowledge(_) => "acknowledge",
            Action::ShareCounter(_) => "share-counter",
            Action::Report(_) => "report",
            Action::Fetch(_) => "fetch",
            Action::Install { .. } => "install",
            Action::Reboot => "reboot",
            Action::ReadRunning => "read-running",
            Action::CheckHealth { .. } => "check-health",
            Action::Commit => "commit",
            Action::RollBack { .. } => "roll-back",
            Action::Done(_) => "done",
        }
    }
}

/// What the flow waits for.
#[derive(Debug)]
enum Wait {
    /// No action is out: the flow takes a command, a resume or a start.
    Nothing,
    /// The journal of [`Flow::pending`] is being written; then this.
    Saved(Then),
    /// The running version, for a settle's decision.
    Running { verdict: Health, round: u8 },
    /// The health verdict on `running`.
    Health { round: u8 },
    /// The commit (mark good) of `next`.
    Committing {
        running: String,
        next: Journal,
        counter: u64,
    },
    /// A switch back while on the bad image.
    RollingBack { running: String, round: u8 },
    /// A rollback in place (its failure is only logged), then `next`.
    RolledBackInPlace {
        running: String,
        next: Journal,
        desc: String,
    },
    /// The disarm of a new slot whose reboot failed.
    Disarming { why: String },
    /// A reboot; then this start (at start) or `Done::Rebooting`.
    Rebooting {
        start: Option<Start>,
        version: String,
    },
    /// The download.
    Fetching,
    /// Downloaded and journaled: waiting for [`Flow::install`].
    ReadyToInstall,
    /// The install.
    Installing { version: String },
}

/// What follows a journal written.
#[derive(Debug)]
enum Then {
    /// End with this.
    Finish(Done),
    /// Emit this action and wait for its answer.
    Act(Action, Box<Wait>),
    /// The commit is journaled: write the counter, then end with this start.
    Counter { counter: u64, start: Start },
    /// A command is journaled: acknowledge it and fetch.
    Accepted { msg_id: String, firmware: Firmware },
    /// The download is journaled: wait for the install.
    Downloaded,
    /// Installed in place: settle now.
    Settle,
    /// A failure is journaled (or not: it is reported either way).
    Failed {
        report: Option<Progress>,
        why: String,
    },
}

impl Then {
    fn act(action: Action, wait: Wait) -> Then {
        Then::Act(action, Box::new(wait))
    }
}

/// One device's upgrade flow. See the module docs for the drive contract.
#[derive(Debug)]
pub struct Flow {
    /// The journal as last written (what survives a power cut).
    journal: Option<Journal>,
    /// The journal of the `Persist` that is out, until it is written.
    pending: Option<Journal>,
    /// The counter file's value.
    counter_file: u64,
    wait: Wait,
    actions: VecDeque<Action>,
    /// The target of the upgrade in progress, between a command (or a
    /// resume) and its end: a stuck step is reported against it.
    job: Option<String>,
}

impl Flow {
    /// The flow of a device whose journal (as read at start; `None` when
    /// there is none or it was set aside) and counter file (0 when absent;
    /// `u64::MAX` when unreadable, so that no signed firmware passes) are
    /// these.
    pub fn new(journal: Option<Journal>, counter_file: u64) -> Flow {
        Flow {
            journal,
            pending: None,
            counter_file,
            wait: Wait::Nothing,
            actions: VecDeque::new(),
            job: None,
        }
    }

    /// The journal as last written.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    /// The security counter of the committed firmware: the highest of the
    /// journal's and the counter file's, so that a journal set aside never
    /// lowers it.
    pub fn security_counter(&self) -> u64 {
        self.journal.as_ref().map_or(self.counter_file, |j| {
            j.security_counter.max(self.counter_file)
        })
    }

    /// True while an action is out or the flow waits for [`Flow::install`]:
    /// a new command or start is refused until the sequence is done.
    pub fn is_busy(&self) -> bool {
        !matches!(self.wait, Wait::Nothing)
    }

    /// True while the flow waits for the download it asked for
    /// ([`Action::Fetch`], answered by [`Flow::handle_fetched`]).
    pub fn is_fetching(&self) -> bool {
        matches!(self.wait, Wait::Fetching)
    }

    /// True when the download is journaled and the flow waits for
    /// [`Flow::install`].
    pub fn is_ready_to_install(&self) -> bool {
        matches!(self.wait, Wait::ReadyToInstall)
    }

    /// The next action, or `None` when the flow waits for an answer (or
    /// has nothing to do).
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    // ---- events from outside -------------------------------------------

    /// The start-up decision, made once at every start before the first
    /// inform: ends in [`Done::Settled`] (or [`Done::Stuck`]).
    pub fn start(&mut self) {
        if self.refuse_when_busy("start") {
            return;
        }
        self.job = None;
        self.read_running(Health::Unknown, 0);
    }

    /// An accepted command `msg_id` (or a firmware get's reply) to upgrade
    /// from `from_version` to `firmware`: journaled as downloading, then
    /// acknowledged, then fetched.
    pub fn handle_command(&mut self, from_version: &str, firmware: &Firmware, msg_id: &str) {
        if self.refuse_when_busy("a command") {
            return;
        }
        let mut j = Journal::for_firmware(from_version, firmware, msg_id);
        j.security_counter = self.security_counter();
        j.pending_counter = firmware.signed.as_ref().map(|s| s.manifest.counter);
        self.job = Some(firmware.version.clone());
        self.persist(
            j,
            Then::Accepted {
                msg_id: msg_id.to_owned(),
                firmware: firmware.clone(),
            },
        );
    }

    /// The answer to [`Action::Persist`] and [`Action::SaveCounter`].
    pub fn handle_saved(&mut self, result: Result<(), String>) {
        let Wait::Saved(then) = std::mem::replace(&mut self.wait, Wait::Nothing) else {
            return self.unexpected("handle_saved");
        };
        let written = self.pending.take();
        if let Err(e) = result {
            return self.save_failed(then, &e);
        }
        if written.is_some() {
            self.journal = written;
        }
        match then {
            Then::Finish(done) => self.finish(done),
            Then::Act(action, wait) => {
                self.actions.push_back(action);
                self.wait = *wait;
            }
            Then::Counter { counter, start } => {
                self.actions.push_back(Action::SaveCounter(counter));
                self.counter_file = counter;
                self.wait = Wait::Saved(Then::Finish(Done::Settled(start)));
            }
            Then::Accepted { msg_id, firmware } => {
                self.actions.push_back(Action::Acknowledge(msg_id));
                self.actions.push_back(Action::Fetch(firmware));
                self.wait = Wait::Fetching;
            }
            Then::Downloaded => self.wait = Wait::ReadyToInstall,
            Then::Settle => self.read_running(Health::Unknown, 0),
            Then::Failed { report, why } => self.fail_now(report, why),
        }
    }

    /// The answer to [`Action::Fetch`]: `Err` is why the download failed
    /// (it reported DOWNLOAD_FAILED or VERIFY_FAILED itself).
    pub fn handle_fetched(&mut self, result: Result<(), String>) {
        if !matches!(self.wait, Wait::Fetching) {
            return self.unexpected("handle_fetched");
        }
        self.wait = Wait::Nothing;
        match result {
            Ok(()) => self.set_phase(Phase::Downloaded, None, Then::Downloaded),
            Err(why) => self.set_phase(
                Phase::Failed,
                Some(why.clone()),
                Then::Failed { report: None, why },
            ),
        }
    }

    /// The answer to [`Action::Install`]: `Ok(true)` when a reboot into the
    /// new image must follow, `Ok(false)` when it runs already (installed
    /// in place), `Err` why the install failed.
    pub fn handle_installed(&mut self, result: Result<bool, String>) {
        let Wait::Installing { version } = std::mem::replace(&mut self.wait, Wait::Nothing) else {
            return self.unexpected("handle_installed");
        };
        match result {
            Ok(true) => self.set_phase(
                Phase::Installed,
                None,
                Then::act(
                    Action::Reboot,
                    Wait::Rebooting {
                        start: None,
                        version,
                    },
                ),
            ),
            Ok(false) => self.set_phase(Phase::Installed, None, Then::Settle),
            Err(why) => {
                let report = Progress::new(Status::FlashFailed, 100, &why, &version);
                self.set_phase(
                    Phase::Failed,
                    Some(why.clone()),
                    Then::Failed {
                        report: Some(report),
                        why,
                    },
                )
            }
        }
    }

    /// The answer to [`Action::Reboot`] and [`Action::Commit`].
    pub fn handle_done(&mut self, result: Result<(), String>) {
        match std::mem::replace(&mut self.wait, Wait::Nothing) {
            Wait::Rebooting { start, version } => match (result, start) {
                (Ok(()), Some(start)) => self.finish(Done::Settled(start)),
                (Ok(()), None) => self.finish(Done::Rebooting),
                (Err(e), Some(_)) => self.stuck(e),
                (Err(e), None) => {
                    // No reboot: disarm the new slot, so that a later,
                    // unrelated reboot does not boot it as if this upgrade
                    // went on.
                    self.actions.push_back(Action::RollBack { reboot: false });
                    self.wait = Wait::Disarming {
                        why: format!("the reboot into {version} failed: {e}"),
                    };
                }
            },
            Wait::Committing {
                running,
                next,
                counter,
            } => {
                if let Err(e) = result {
                    return self.stuck(e);
                }
                let target = next.target_version.clone();
                // The journal first: a cut before it repeats the commit (and
                // a failed re-check rolls back with the counter still where
                // it was); the counter file only ever follows it.
                let start = Start {
                    running,
                    report: Some(Progress::new(Status::Success, 100, "", &target)),
                    next: Next::Idle,
                };
                self.persist(next, Then::Counter { counter, start });
            }
            other => {
                self.wait = other;
                self.unexpected("handle_done")
            }
        }
    }

    /// The answer to [`Action::ReadRunning`].
    pub fn handle_running(&mut self, result: Result<String, String>) {
        let Wait::Running { verdict, round } = std::mem::replace(&mut self.wait, Wait::Nothing)
        else {
            return self.unexpected("handle_running");
        };
        match result {
            Ok(running) => self.decide(running, verdict, round),
            Err(e) => self.stuck(e),
        }
    }

    /// The answer to [`Action::CheckHealth`].
    pub fn handle_health(&mut self, verdict: Health) {
        let Wait::Health { round } = std::mem::replace(&mut self.wait, Wait::Nothing) else {
            return self.unexpected("handle_health");
        };
        self.read_running(verdict, round + 1);
    }

    /// The answer to [`Action::RollBack`]: `Ok(true)` when the installer
    /// needs a reboot to run the old image.
    pub fn handle_rolled_back(&mut self, result: Result<bool, String>) {
        match std::mem::replace(&mut self.wait, Wait::Nothing) {
            Wait::RollingBack { running, round } => match result {
                Ok(true) => {
                    let start = Start {
                        running: running.clone(),
                        report: None,
                        next: Next::RollingBack,
                    };
                    self.actions.push_back(Action::Reboot);
                    self.wait = Wait::Rebooting {
                        start: Some(start),
                        version: running,
                    };
                }
                // Rolled back in place: decide again on what runs now.
                Ok(false) => self.read_running(Health::Unknown, round + 1),
                Err(e) => self.stuck(e),
            },
            Wait::RolledBackInPlace {
                running,
                next,
                desc,
            } => {
                let target = next.target_version.clone();
                let start = Start {
                    running,
                    report: Some(Progress::new(Status::UpgradeFailed, 0, &desc, &target)),
                    next: Next::Idle,
                };
                self.persist(next, Then::Finish(Done::Settled(start)));
            }
            Wait::Disarming { why } => {
                self.set_phase(
                    Phase::Failed,
                    Some(why.clone()),
                    Then::Failed {
                        report: Some(Progress::new(
                            Status::FlashFailed,
                            100,
                            &why,
                            self.job.as_deref().unwrap_or_default(),
                        )),
                        why,
                    },
                );
            }
            other => {
                self.wait = other;
                self.unexpected("handle_rolled_back")
            }
        }
    }

    // ---- the application's commands -----------------------------------

    /// Go on with the upgrade a settle left as [`Next::Resume`] or
    /// [`Next::Install`]: fetch it again (the part file resumes it), or,
    /// when the journal says it is downloaded and `image_present`, wait for
    /// [`Flow::install`] at once. A journal that cannot say where the image
    /// is fails the upgrade (reported).
    pub fn resume(&mut self, image_present: bool) {
        if self.refuse_when_busy("a resume") {
            return;
        }
        let Some(j) = self.journal.clone() else {
            return self.finish(Done::Failed("no upgrade to go on with".into()));
        };
        if !matches!(
            j.phase,
            Phase::Downloading | Phase::Downloaded | Phase::Installing
        ) {
            return self.finish(Done::Failed(format!(
                "the upgrade to {} is {}: nothing to go on with",
                j.target_version,
                j.phase.as_str()
            )));
        }
        self.job = Some(j.target_version.clone());
        let Some(firmware) = j.firmware() else {
            let why = "the journal does not say where the image is".to_owned();
            let report = Progress::new(Status::UpgradeFailed, 0, &why, &j.target_version);
            return self.set_phase(
                Phase::Failed,
                Some(why.clone()),
                Then::Failed {
                    report: Some(report),
                    why,
                },
            );
        };
        match (j.phase, image_present) {
            (Phase::Downloading, _) => {
                self.actions.push_back(Action::Fetch(firmware));
                self.wait = Wait::Fetching;
            }
            (_, true) => self.wait = Wait::ReadyToInstall,
            // Downloaded once, but the image is gone: download it again.
            (_, false) => self.set_phase(
                Phase::Downloading,
                None,
                Then::act(Action::Fetch(firmware), Wait::Fetching),
            ),
        }
    }

    /// Install the downloaded image now (after the download, once the
    /// application is ready: a silent upgrade's window, a C program's own
    /// flash). Ignored unless [`Flow::is_ready_to_install`].
    pub fn install(&mut self) {
        if !matches!(self.wait, Wait::ReadyToInstall) {
            return self.unexpected("install");
        }
        self.wait = Wait::Nothing;
        let version = self
            .journal
            .as_ref()
            .map(|j| j.target_version.clone())
            .unwrap_or_default();
        self.set_phase(
            Phase::Installing,
            None,
            Then::act(
                Action::Install {
                    version: version.clone(),
                },
                Wait::Installing { version },
            ),
        );
    }

    /// Gives up on the upgrade in progress, waiting for its download or
    /// its install (the application ended it: a full disk, its own
    /// failure, already reported by it): journaled as failed with `why`.
    pub fn abandon(&mut self, why: &str) {
        if !matches!(self.wait, Wait::Fetching | Wait::ReadyToInstall) {
            return self.unexpected("abandon");
        }
        self.wait = Wait::Nothing;
        self.set_phase(
            Phase::Failed,
            Some(why.to_owned()),
            Then::Failed {
                report: None,
                why: why.to_owned(),
            },
        );
    }

    // ---- the steps -------------------------------------------------------

    fn refuse_when_busy(&mut self, what: &str) -> bool {
        if self.is_busy() {
            self.actions.push_back(Action::Done(Done::Failed(format!(
                "{what} while the flow is busy"
            ))));
            return true;
        }
        false
    }

    /// An answer nobody asked for: a driver bug. Ignored (the flow waits on
    /// for the answer it asked for); loud in debug builds.
    fn unexpected(&self, call: &str) {
        debug_assert!(false, "{call} while the flow waits for {:?}", self.wait);
    }

    fn persist(&mut self, journal: Journal, then: Then) {
        self.actions.push_back(Action::Persist(journal.clone()));
        self.pending = Some(journal);
        self.wait = Wait::Saved(then);
    }

    fn set_phase(&mut self, phase: Phase, reason: Option<String>, then: Then) {
        let Some(mut j) = self.journal.clone() else {
            return self.stuck("no upgrade in progress".into());
        };
        j.phase = phase;
        j.reason = reason;
        self.persist(j, then);
    }

    fn finish(&mut self, done: Done) {
        if let Done::Settled(_) = done {
            self.actions
                .push_back(Action::ShareCounter(self.security_counter()));
        }
        if !matches!(done, Done::Stuck(_)) {
            self.job = None;
        }
        self.wait = Wait::Nothing;
        self.actions.push_back(Action::Done(done));
    }

    fn fail_now(&mut self, report: Option<Progress>, why: String) {
        if let Some(report) = report {
            self.actions.push_back(Action::Report(report));
        }
        self.finish(Done::Failed(why));
    }

    fn stuck(&mut self, why: String) {
        if let Some(version) = self.job.take() {
            self.actions.push_back(Action::Report(Progress::new(
                Status::UpgradeFailed,
                0,
                &why,
                &version,
            )));
        }
        self.finish(Done::Stuck(why));
    }

    fn save_failed(&mut self, then: Then, e: &str) {
        match then {
            // A device that cannot remember an upgrade must not begin one.
            Then::Accepted { firmware, .. } => {
                let why = format!("cannot journal the upgrade to {}: {e}", firmware.version);
                let report = Progress::new(Status::UpgradeFailed, 0, &why, &firmware.version);
                self.fail_now(Some(report), why);
            }
            // Reported either way: the record must hear of the failure.
            Then::Failed { report, why } => self.fail_now(report, why),
            _ => {
                let why = match &self.job {
                    Some(v) => format!("cannot journal the upgrade to {v}: {e}"),
                    None => format!("cannot write the journal: {e}"),
                };
                self.stuck(why)
            }
        }
    }

    fn read_running(&mut self, verdict: Health, round: u8) {
        if round >= MAX_ROUNDS {
            return self.stuck("the start-up decision did not settle".into());
        }
        self.actions.push_back(Action::ReadRunning);
        self.wait = Wait::Running { verdict, round };
    }

    /// One decision of a settle, on what runs and the verdict so far.
    fn decide(&mut self, running: String, verdict: Health, round: u8) {
        let (action, next) = decide_at_start(self.journal.as_ref(), &running, &verdict);
        let start = |report, next| Start {
            running: running.clone(),
            report,
            next,
        };
        match action {
            StartAction::Idle => self.finish(Done::Settled(start(None, Next::Idle))),
            StartAction::ResumeDownload | StartAction::Install => {
                let j = self.journal.clone().expect("decided from a journal");
                let Some(firmware) = j.firmware() else {
                    let why = "the journal does not say where the image is".to_owned();
                    let report = Progress::new(Status::UpgradeFailed, 0, &why, &j.target_version);
                    return self.set_phase(
                        Phase::Failed,
                        Some(why.clone()),
                        Then::Finish(Done::Settled(start(Some(report), Next::Idle))),
                    );
                };
                let next = if action == StartAction::Install {
                    Next::Install(firmware)
                } else {
                    Next::Resume(firmware)
                };
                self.finish(Done::Settled(start(None, next)));
            }
            StartAction::Reboot => {
                let version = running.clone();
                let start = start(None, Next::Rebooting);
                self.persist(
                    next.expect("a reboot counts a boot"),
                    Then::act(
                        Action::Reboot,
                        Wait::Rebooting {
                            start: Some(start),
                            version,
                        },
                    ),
                );
            }
            StartAction::CheckHealth => {
                let version = running.clone();
                self.persist(
                    next.expect("a check marks the boot"),
                    Then::act(Action::CheckHealth { version }, Wait::Health { round }),
                );
            }
            StartAction::Commit { counter } => {
                self.actions.push_back(Action::Commit);
                self.wait = Wait::Committing {
                    running,
                    next: next.expect("a commit changes the journal"),
                    counter,
                };
            }
            StartAction::RollBack { reboot: true, .. } => {
                // Still on the bad image: keep the reason, leave it.
                self.persist(
                    next.expect("a rollback changes the journal"),
                    Then::act(
                        Action::RollBack { reboot: true },
                        Wait::RollingBack { running, round },
                    ),
                );
            }
            StartAction::RollBack {
                desc,
                reboot: false,
            } => {
                self.actions.push_back(Action::RollBack { reboot: false });
                self.wait = Wait::RolledBackInPlace {
                    running,
                    next: next.expect("a rollback changes the journal"),
                    desc,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::SignMethod;

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

    /// A device in memory: two slots, a bootloader that boots the tried slot
    /// at the next reboot, a journal "on disk", and scripted failures.
    #[derive(Debug)]
    struct Sim {
        slots: [String; 2],
        booted: usize,
        trying: bool,
        in_place: bool,
        disk: Option<Journal>,
        counter: u64,
        health: Health,
        fail_save: Option<usize>,
        saves: usize,
        fail_install: Option<String>,
        fail_reboot: bool,
        fail_fetch: Option<String>,
        log: Vec<String>,
        reports: Vec<Progress>,
        done: Vec<Done>,
    }

    impl Sim {
        fn new() -> Sim {
            Sim {
                slots: ["1.0".into(), String::new()],
                booted: 0,
                trying: false,
                in_place: false,
                disk: None,
                counter: 0,
                health: Health::Good,
                fail_save: None,
                saves: 0,
                fail_install: None,
                fail_reboot: false,
                fail_fetch: None,
                log: Vec::new(),
                reports: Vec::new(),
                done: Vec::new(),
            }
        }

        fn running(&self) -> String {
            self.slots[self.booted].clone()
        }

        fn power_cycle(&mut self) -> Flow {
            if self.trying {
                self.booted = 1 - self.booted;
                self.trying = false;
            }
            Flow::new(self.disk.clone(), self.counter)
        }

        /// Carries every action out; returns their names.
        fn drive(&mut self, flow: &mut Flow) -> Vec<&'static str> {
            let mut names = Vec::new();
            while let Some(action) = flow.poll_action() {
                names.push(action.name());
                match action {
                    Action::Persist(j) => {
                        self.saves += 1;
                        if self.fail_save == Some(self.saves) {
                            flow.handle_saved(Err("disk full".into()));
                        } else {
                            self.disk = Some(j);
                            flow.handle_saved(Ok(()));
                        }
                    }
                    Action::SaveCounter(c) => {
                        self.counter = c;
                        flow.handle_saved(Ok(()));
                    }
                    Action::Acknowledge(id) => self.log.push(format!("ack {id}")),
                    Action::ShareCounter(c) => self.log.push(format!("counter {c}")),
                    Action::Report(p) => self.reports.push(p),
                    Action::Fetch(fw) => {
                        self.log.push(format!("fetch {}", fw.version));
                        flow.handle_fetched(self.fail_fetch.clone().map_or(Ok(()), Err));
                    }
                    Action::Install { version } => {
                        if let Some(e) = self.fail_install.clone() {
                            flow.handle_installed(Err(e));
                            continue;
                        }
                        self.slots[1 - self.booted] = version;
                        self.trying = true;
                        if self.in_place {
                            self.booted = 1 - self.booted;
                            self.trying = false;
                        }
                        flow.handle_installed(Ok(!self.in_place));
                    }
                    Action::Reboot => flow.handle_done(if self.fail_reboot {
                        Err("no bootloader".into())
                    } else {
                        Ok(())
                    }),
                    Action::ReadRunning => flow.handle_running(Ok(self.running())),
                    Action::CheckHealth { .. } => flow.handle_health(self.health.clone()),
                    Action::Commit => flow.handle_done(Ok(())),
                    Action::RollBack { .. } => {
                        self.trying = true;
                        if self.in_place {
                            self.booted = 1 - self.booted;
                            self.trying = false;
                        }
                        flow.handle_rolled_back(Ok(!self.in_place));
                    }
                    Action::Done(d) => self.done.push(d),
                }
            }
            names
        }

        /// Writes the journals the flow asks for and nothing else: the
        /// fetch it asks for is never answered (a power cut during it).
        fn persist_only(&mut self, flow: &mut Flow) {
            while let Some(a) = flow.poll_action() {
                if let Action::Persist(j) = a {
                    self.disk = Some(j);
                    flow.handle_saved(Ok(()));
                }
            }
        }

        fn last_start(&self) -> Start {
            match self.done.last() {
                Some(Done::Settled(s)) => s.clone(),
                other => panic!("not settled: {other:?}"),
            }
        }
    }

    #[test]
    fn journal_before_ack_before_fetch() {
        let mut sim = Sim::new();
        let mut flow = Flow::new(None, 0);
        flow.handle_command("1.0", &firmware("2.0"), "m1");
        let names = sim.drive(&mut flow);
        assert_eq!(names, ["persist", "acknowledge", "fetch", "persist"]);
        assert!(flow.is_ready_to_install());
        assert_eq!(sim.disk.as_ref().unwrap().phase, Phase::Downloaded);
        assert_eq!(sim.log, ["ack m1", "fetch 2.0"]);
        // A second command while busy is refused, the first goes on.
        flow.handle_command("1.0", &firmware("3.0"), "m2");
        assert!(matches!(
            flow.poll_action(),
            Some(Action::Done(Done::Failed(_)))
        ));
        assert!(flow.is_ready_to_install());
    }

    #[test]
    fn a_journal_that_cannot_be_written_is_never_acknowledged() {
        let mut sim = Sim::new();
        sim.fail_save = Some(1);
        let mut flow = Flow::new(None, 0);
        flow.handle_command("1.0", &firmware("2.0"), "m1");
        assert_eq!(sim.drive(&mut flow), ["persist", "report", "done"]);
        assert!(sim.log.is_empty(), "no ack, no fetch: {:?}", sim.log);
        let r = &sim.reports[0];
        assert_eq!(
            (r.status, r.firmware_version.as_str()),
            (Status::UpgradeFailed, "2.0")
        );
        assert!(
            r.desc
                .contains("cannot journal the upgrade to 2.0: disk full"),
            "{}",
            r.desc
        );
        assert!(!flow.is_busy());
        assert!(flow.journal().is_none());
    }

    #[test]
    fn install_reboot_confirm_commit_raises_the_counter() {
        let mut sim = Sim::new();
        let mut flow = Flow::new(None, 5);
        let mut fw = firmware("2.0");
        fw.signed = None;
        flow.handle_command("1.0", &fw, "m1");
        sim.drive(&mut flow);
        let mut j = sim.disk.clone().unwrap();
        assert_eq!(j.security_counter, 5, "carried over from the counter file");
        j.pending_counter = Some(9);
        sim.disk = Some(j.clone());
        let mut flow = Flow::new(Some(j), 5);
        flow.resume(true);
        flow.install();
        assert_eq!(
            sim.drive(&mut flow),
            ["persist", "install", "persist", "reboot", "done"]
        );
        assert_eq!(sim.done.last(), Some(&Done::Rebooting));
        assert_eq!(sim.disk.as_ref().unwrap().phase, Phase::Installed);
        let mut flow = sim.power_cycle();
        flow.start();
        sim.drive(&mut flow);
        let start = sim.last_start();
        assert_eq!(start.running, "2.0");
        assert_eq!(start.report.unwrap().status, Status::Success);
        assert_eq!((sim.counter, flow.security_counter()), (9, 9));
        assert_eq!(sim.disk.as_ref().unwrap().phase, Phase::Committed);
        assert_eq!(sim.log.last().unwrap(), "counter 9");
        // The next start has nothing to report.
        let mut flow = sim.power_cycle();
        flow.start();
        sim.drive(&mut flow);
        assert_eq!(sim.last_start().report, None);
    }

    #[test]
    fn an_unhealthy_image_rolls_back_with_a_reboot_and_reports_at_the_next_start() {
        let mut sim = Sim::new();
        let mut flow = Flow::new(None, 0);
        flow.handle_command("1.0", &firmware("2.0"), "m1");
        sim.drive(&mut flow);
        flow.install();
        sim.drive(&mut flow);
        sim.health = Health::Bad("no network".into());
        let mut flow = sim.power_cycle();
        flow.start();
        let names = sim.drive(&mut flow);
        assert_eq!(
            names,
            [
                "read-running",
                "persist",
                "check-health",
                "read-running",
                "persist",
                "roll-back",
                "reboot",
                "share-counter",
                "done"
            ]
        );
        assert_eq!(sim.last_start().next, Next::RollingBack);
        let mut flow = sim.power_cycle();
        flow.start();
        sim.drive(&mut flow);
        let start = sim.last_start();
        assert_eq!(start.running, "1.0");
        let r = start.report.unwrap();
        assert_eq!(r.status, Status::UpgradeFailed);
        assert!(
            r.desc
                .starts_with("rolled back: 2.0 -> 1.0: health check failed: no network"),
            "{}",
            r.desc
        );
        assert_eq!(sim.disk.as_ref().unwrap().phase, Phase::RolledBack);
        assert_eq!(sim.counter, 0);
    }

    #[test]
    fn in_place_installs_settle_at_once_and_roll_back_in_place() {
        let mut sim = Sim::new();
        sim.in_place = true;
        let mut flow = Flow::new(None, 0);
        flow.handle_command("1.0", &firmware("2.0"), "m1");
        sim.drive(&mut flow);
        flow.install();
        sim.drive(&mut flow);
        let start = sim.last_start();
        assert_eq!(start.running, "2.0");
        assert_eq!(start.report.unwrap().status, Status::Success);
        sim.health = Health::Bad("crashes".into());
        flow.handle_command("2.0", &firmware("3.0"), "m2");
        sim.drive(&mut flow);
        flow.install();
        sim.drive(&mut flow);
        let start = sim.last_start();
        assert_eq!(start.running, "2.0");
        let r = start.report.unwrap();
        assert!(r.desc.starts_with("rolled back: 3.0 -> 2.0"), "{}", r.desc);
    }

    #[test]
    fn a_failed_install_or_reboot_is_journaled_and_reported() {
        let mut sim = Sim::new();
        sim.fail_install = Some("flash worn out".into());
        let mut flow = Flow::new(None, 0);
        flow.handle_command("1.0", &firmware("2.0"), "m1");
        sim.drive(&mut flow);
        flow.install();
        sim.drive(&mut flow);
        let r = sim.reports.last().unwrap();
        assert_eq!((r.status, r.progress), (Status::FlashFailed, 100));
        assert_eq!(r.desc, "flash worn out");
        assert_eq!(sim.disk.as_ref().unwrap().phase, Phase::Failed);
        assert_eq!(
            sim.done.last(),
            Some(&Done::Failed("flash worn out".into()))
        );

        sim.fail_install = None;
        sim.fail_reboot = true;
        flow.handle_command("1.0", &firmware("2.0"), "m2");
        sim.drive(&mut flow);
        flow.install();
        let names = sim.drive(&mut flow);
        assert!(names.ends_with(&["reboot", "roll-back", "persist", "report", "done"]));
        let r = sim.reports.last().unwrap();
        assert!(
            r.desc.contains("the reboot into 2.0 failed: no bootloader"),
            "{}",
            r.desc
        );
        assert_eq!(sim.disk.as_ref().unwrap().phase, Phase::Failed);
    }

    #[test]
    fn a_failed_download_is_journaled_and_not_reported_twice() {
        let mut sim = Sim::new();
        sim.fail_fetch = Some("digest mismatch".into());
        let mut flow = Flow::new(None, 0);
        flow.handle_command("1.0", &firmware("2.0"), "m1");
        assert_eq!(
            sim.drive(&mut flow),
            ["persist", "acknowledge", "fetch", "persist", "done"]
        );
        assert!(sim.reports.is_empty());
        assert_eq!(
            sim.disk.as_ref().unwrap().reason.as_deref(),
            Some("digest mismatch")
        );
    }

    #[test]
    fn a_cut_download_or_install_goes_on_from_the_journal() {
        let mut sim = Sim::new();
        let mut flow = Flow::new(None, 0);
        flow.handle_command("1.0", &firmware("2.0"), "m1");
        // Power cut during the fetch: the action is out, never answered.
        sim.persist_only(&mut flow);
        let mut flow = sim.power_cycle();
        flow.start();
        sim.drive(&mut flow);
        assert_eq!(sim.last_start().next, Next::Resume(firmware("2.0")));
        flow.resume(false);
        assert_eq!(sim.drive(&mut flow), ["fetch", "persist"]);
        // Cut before the install: again from the journal; the image is gone.
        let mut flow = sim.power_cycle();
        flow.start();
        sim.drive(&mut flow);
        assert_eq!(sim.last_start().next, Next::Install(firmware("2.0")));
        flow.resume(false);
        assert_eq!(sim.drive(&mut flow), ["persist", "fetch", "persist"]);
        // With the image there, straight to the install.
        let mut flow = sim.power_cycle();
        flow.start();
        sim.drive(&mut flow);
        flow.resume(true);
        assert!(flow.is_ready_to_install());
    }

    #[test]
    fn a_journal_without_a_source_fails_the_resume_with_a_report() {
        let mut sim = Sim::new();
        sim.disk = Some(Journal::new("1.0", "2.0", "m1"));
        let mut flow = sim.power_cycle();
        flow.start();
        sim.drive(&mut flow);
        let start = sim.last_start();
        let r = start.report.unwrap();
        assert!(
            r.desc.contains("does not say where the image is"),
            "{}",
            r.desc
        );
        assert_eq!(sim.disk.as_ref().unwrap().phase, Phase::Failed);
    }

    #[test]
    fn a_journal_that_cannot_be_written_at_start_is_stuck_not_silent() {
        let mut sim = Sim::new();
        let mut flow = Flow::new(None, 0);
        flow.handle_command("1.0", &firmware("2.0"), "m1");
        sim.drive(&mut flow);
        flow.install();
        sim.drive(&mut flow);
        sim.fail_save = Some(sim.saves + 1);
        let mut flow = sim.power_cycle();
        flow.start();
        sim.drive(&mut flow);
        assert!(matches!(sim.done.last(), Some(Done::Stuck(e)) if e.contains("disk full")));
        assert!(!flow.is_busy());
    }

    #[test]
    fn too_many_boots_roll_back() {
        let mut sim = Sim::new();
        let mut j = Journal::for_firmware("1.0", &firmware("2.0"), "m1");
        j.phase = Phase::Installed;
        sim.disk = Some(j);
        // The new image never comes up: every start reboots it, then gives up.
        for _ in 0..crate::journal::DEFAULT_MAX_BOOTS {
            let mut flow = sim.power_cycle();
            flow.start();
            sim.drive(&mut flow);
            assert_eq!(sim.last_start().next, Next::Rebooting);
        }
        let mut flow = sim.power_cycle();
        flow.start();
        sim.drive(&mut flow);
        let r = sim.last_start().report.unwrap();
        assert!(
            r.desc.contains("did not boot after 3 attempts"),
            "{}",
            r.desc
        );
    }

    #[test]
    fn abandon_journals_the_applications_failure() {
        let mut sim = Sim::new();
        let mut flow = Flow::new(None, 0);
        flow.handle_command("1.0", &firmware("2.0"), "m1");
        sim.persist_only(&mut flow);
        flow.abandon("No space left on device");
        assert_eq!(sim.drive(&mut flow), ["persist", "done"]);
        let j = sim.disk.as_ref().unwrap();
        assert_eq!(j.phase, Phase::Failed);
        assert_eq!(j.reason.as_deref(), Some("No space left on device"));
    }
}
