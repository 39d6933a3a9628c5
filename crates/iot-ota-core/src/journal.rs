//! The upgrade journal: what an upgrade in progress has done, persisted so
//! that a reboot or a power cut never loses it, and the decision a device
//! makes at every start from it (PROTOCOL.md, "Install, reboot, confirm").
//!
//! ```text
//!   Downloading ──► Downloaded ──► Installing ──► Installed ──reboot──► Booted
//!       │ cut: resume    │ cut: install again   │ (awaiting    │ (awaiting
//!       ▼                ▼                      ▼  reboot)     ▼  confirmation)
//!                                                           health good ──► Committed
//!                                  bootloader fell back, health bad,
//!                                  or more boots than allowed ───────────► RolledBack
//! ```
//!
//! Sans-IO: [`Journal::encode`] and [`Journal::decode`] turn a journal into
//! bytes and back (a JSON line and its SHA-256, with a schema version), and
//! [`decide_at_start`] is a pure function of the journal, the version the
//! device runs and its health verdict. Where the bytes live is a
//! [`JournalStore`]: [`MemoryJournal`] here for tests, a file store with
//! atomic replace in the device SDK.
//!
//! ```
//! use iot_ota_core::journal::{decide_at_start, Health, Journal, Phase, StartAction};
//!
//! let mut j = Journal::new("1.0", "2.0", "42");
//! j.phase = Phase::Installed; // written just before the reboot
//! // The device came back on 2.0; the health check has not run yet.
//! let (action, next) = decide_at_start(Some(&j), "2.0", &Health::Unknown);
//! assert_eq!(action, StartAction::CheckHealth);
//! let next = next.unwrap(); // persist this before acting
//! assert_eq!((next.phase, next.boot_attempts), (Phase::Booted, 1));
//! // It passed: commit.
//! let (action, done) = decide_at_start(Some(&next), "2.0", &Health::Good);
//! assert!(matches!(action, StartAction::Commit { .. }));
//! assert_eq!(done.unwrap().phase, Phase::Committed);
//! ```

use serde_json::{json, Value};

use crate::digest::{digest_hex, SignMethod};
use crate::protocol::{Firmware, Policy};

/// The journal format's version; a journal of another one is not trusted.
pub const JOURNAL_SCHEMA: u64 = 1;

/// Boots of a new image allowed without a commit, by default.
pub const DEFAULT_MAX_BOOTS: u32 = 3;

/// How far an upgrade has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The image is being downloaded (a part file may hold some of it).
    Downloading,
    /// The image is downloaded and verified, not installed yet.
    Downloaded,
    /// The image is being written to the inactive slot.
    Installing,
    /// Installed; the device is about to reboot into it.
    Installed,
    /// The device has booted the new image, which is not confirmed yet.
    Booted,
    /// The new image is confirmed (marked good): the upgrade is done.
    Committed,
    /// The device is back on the old image; the upgrade failed.
    RolledBack,
    /// The upgrade failed before any reboot.
    Failed,
}

impl Phase {
    /// The name written in the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Downloading => "downloading",
            Phase::Downloaded => "downloaded",
            Phase::Installing => "installing",
            Phase::Installed => "installed",
            Phase::Booted => "booted",
            Phase::Committed => "committed",
            Phase::RolledBack => "rolled_back",
            Phase::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<Phase> {
        Some(match s {
            "downloading" => Phase::Downloading,
            "downloaded" => Phase::Downloaded,
            "installing" => Phase::Installing,
            "installed" => Phase::Installed,
            "booted" => Phase::Booted,
            "committed" => Phase::Committed,
            "rolled_back" => Phase::RolledBack,
            "failed" => Phase::Failed,
            _ => return None,
        })
    }

    /// True once the upgrade is over, one way or the other.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Committed | Phase::RolledBack | Phase::Failed)
    }
}

/// The persisted record of one upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    /// How far it has got.
    pub phase: Phase,
    /// The version the device ran before the upgrade.
    pub from_version: String,
    /// The version being installed.
    pub target_version: String,
    /// The command's msgId, for the reports.
    pub msg_id: String,
    /// The image's digest and method, when known (what a resume checks).
    pub sign: Option<(SignMethod, String)>,
    /// Where the image comes from, so that a download cut off by a reboot
    /// can resume without a new command.
    pub url: Option<String>,
    /// The image's size in bytes, when the command gave one.
    pub size: Option<u64>,
    /// The command's policy: a silent upgrade resumed after a crash still
    /// waits for its window.
    pub policy: Option<Policy>,
    /// The command's signed manifest: a resumed upgrade is checked again.
    pub signed: Option<Box<crate::manifest::Signed>>,
    /// The command's chunk index (a delta update), so that a resumed
    /// download goes on as a delta.
    pub delta: Option<Box<crate::protocol::DeltaRef>>,
    /// Boots of the new image so far without a commit.
    pub boot_attempts: u32,
    /// Boots allowed before the device gives up on the new image.
    pub max_boot_attempts: u32,
    /// The security counter of the running, committed image (signed
    /// manifests): raised only at commit.
    pub security_counter: u64,
    /// The target's manifest counter, to become the security counter at commit.
    pub pending_counter: Option<u64>,
    /// Why it failed or rolled back.
    pub reason: Option<String>,
}

impl Journal {
    /// A new upgrade from `from_version` to `target_version`, downloading.
    pub fn new(from_version: &str, target_version: &str, msg_id: &str) -> Journal {
        Journal {
            phase: Phase::Downloading,
            from_version: from_version.to_owned(),
            target_version: target_version.to_owned(),
            msg_id: msg_id.to_owned(),
            sign: None,
            url: None,
            size: None,
            policy: None,
            signed: None,
            delta: None,
            boot_attempts: 0,
            max_boot_attempts: DEFAULT_MAX_BOOTS,
            security_counter: 0,
            pending_counter: None,
            reason: None,
        }
    }

    /// A new upgrade to `firmware`, downloading; the security counter is
    /// carried over from the device's previous journal by the caller.
    pub fn for_firmware(from_version: &str, firmware: &Firmware, msg_id: &str) -> Journal {
        let mut j = Journal::new(from_version, &firmware.version, msg_id);
        j.sign = Some((firmware.sign_method, firmware.sign.clone()));
        j.url = Some(firmware.url.clone());
        j.size = firmware.size;
        j.policy = firmware.policy;
        j.signed = firmware.signed.clone();
        j.delta = firmware.delta.clone();
        j
    }

    /// The firmware this journal downloads, when it knows enough of it (a
    /// URL and a digest) to resume without the command.
    pub fn firmware(&self) -> Option<Firmware> {
        let (sign_method, sign) = self.sign.clone()?;
        Some(Firmware {
            version: self.target_version.clone(),
            url: self.url.clone()?,
            size: self.size,
            sign,
            sign_method,
            policy: self.policy,
            signed: self.signed.clone(),
            delta: self.delta.clone(),
        })
    }

    /// The journal as bytes: one JSON line, then its SHA-256 on a line of its
    /// own, so that a torn or altered file is recognised as such.
    pub fn encode(&self) -> Vec<u8> {
        let mut line = json!({
            "schema": JOURNAL_SCHEMA,
            "phase": self.phase.as_str(),
            "from": self.from_version,
            "target": self.target_version,
            "msgId": self.msg_id,
            "signMethod": self.sign.as_ref().map(|(m, _)| m.wire_name()),
            "sign": self.sign.as_ref().map(|(_, s)| s.as_str()),
            "url": self.url,
            "size": self.size,
            "policy": self.policy.map(Policy::as_str),
            "bootAttempts": self.boot_attempts,
            "maxBootAttempts": self.max_boot_attempts,
            "securityCounter": self.security_counter,
            "pendingCounter": self.pending_counter,
            "reason": self.reason,
        });
        if let (Some(signed), Some(obj)) = (&self.signed, line.as_object_mut()) {
            obj.extend(signed.to_fields());
        }
        if let (Some(d), Some(obj)) = (&self.delta, line.as_object_mut()) {
            obj.insert("delta".into(), crate::protocol::delta_json(d));
        }
        let line = line.to_string();
        let sum = digest_hex(SignMethod::Sha256, line.as_bytes());
        format!("{line}\nsha256 {sum}\n").into_bytes()
    }

    /// Reads bytes made by [`Journal::encode`]. Anything else, a torn write,
    /// a flipped bit, an unknown schema, is a [`JournalError`]: never a
    /// journal that could lead to a false report.
    pub fn decode(bytes: &[u8]) -> Result<Journal, JournalError> {
        let corrupt = |why: &str| JournalError::Corrupt(why.to_owned());
        let text = std::str::from_utf8(bytes).map_err(|_| corrupt("not UTF-8"))?;
        if !text.ends_with('\n') {
            return Err(corrupt("torn: no final newline"));
        }
        let mut lines = text.lines();
        let line = lines.next().ok_or_else(|| corrupt("empty"))?;
        let sum = lines
            .next()
            .and_then(|l| l.strip_prefix("sha256 "))
            .ok_or_else(|| corrupt("no checksum line"))?;
        if lines.next().is_some() {
            return Err(corrupt("bytes after the checksum"));
        }
        if digest_hex(SignMethod::Sha256, line.as_bytes()) != sum {
            return Err(corrupt("checksum mismatch"));
        }
        let v: Value = serde_json::from_str(line).map_err(|_| corrupt("not JSON"))?;
        match v["schema"].as_u64() {
            Some(JOURNAL_SCHEMA) => {}
            Some(n) => return Err(JournalError::UnknownSchema(n)),
            None => return Err(corrupt("no schema")),
        }
        let text_of = |k: &str| {
            v[k].as_str()
                .map(str::to_owned)
                .ok_or_else(|| corrupt(&format!("no {k}")))
        };
        let count = |k: &str| {
            v[k].as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| corrupt(&format!("no {k}")))
        };
        let sign = match (v["signMethod"].as_str(), v["sign"].as_str()) {
            (Some(m), Some(s)) => Some((
                SignMethod::parse(m).ok_or_else(|| corrupt("bad signMethod"))?,
                s.to_owned(),
            )),
            _ => None,
        };
        Ok(Journal {
            phase: Phase::parse(v["phase"].as_str().unwrap_or_default())
                .ok_or_else(|| corrupt("bad phase"))?,
            from_version: text_of("from")?,
            target_version: text_of("target")?,
            msg_id: text_of("msgId")?,
            sign,
            url: v["url"].as_str().map(str::to_owned),
            size: v["size"].as_u64(),
            policy: match v["policy"].as_str() {
                None => None,
                Some("standard") => Some(Policy::Standard),
                Some("silent") => Some(Policy::Silent),
                Some(_) => return Err(corrupt("bad policy")),
            },
            signed: match v.as_object() {
                Some(obj) => crate::manifest::Signed::from_data(obj)
                    .map_err(|r| corrupt(&format!("manifest: {}", r.message)))?
                    .map(Box::new),
                None => None,
            },
            delta: match v["delta"].as_object() {
                Some(d) => Some(Box::new(
                    crate::protocol::parse_delta(d, &crate::protocol::Limits::default())
                        .map_err(|r| corrupt(&format!("delta: {}", r.message)))?,
                )),
                None => None,
            },
            boot_attempts: count("bootAttempts")?,
            max_boot_attempts: count("maxBootAttempts")?,
            security_counter: v["securityCounter"]
                .as_u64()
                .ok_or_else(|| corrupt("no securityCounter"))?,
            pending_counter: v["pendingCounter"].as_u64(),
            reason: v["reason"].as_str().map(str::to_owned),
        })
    }

    /// The `desc` of the rollback report: begins with `rolled back:` and
    /// names both versions (PROTOCOL.md).
    pub fn rollback_desc(&self, running: &str, why: &str) -> String {
        format!("rolled back: {} -> {running}: {why}", self.target_version)
    }
}

/// Why a journal could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JournalError {
    /// The bytes are not a whole, intact journal (the text says how).
    Corrupt(String),
    /// A journal of a schema this build does not know.
    UnknownSchema(u64),
    /// The store failed (the text says how).
    Store(String),
}

impl std::fmt::Display for JournalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JournalError::Corrupt(why) => write!(f, "the upgrade journal is unreadable: {why}"),
            JournalError::UnknownSchema(n) => {
                write!(
                    f,
                    "the upgrade journal has schema {n}, not {JOURNAL_SCHEMA}"
                )
            }
            JournalError::Store(why) => write!(f, "the upgrade journal's store failed: {why}"),
        }
    }
}

impl std::error::Error for JournalError {}

/// Where a journal lives. Contract: [`JournalStore::save`] replaces the
/// journal atomically (a crash leaves the old one or the new one, whole);
/// [`JournalStore::load`] returns `Ok(None)` when there is none, and an
/// error, never a default, when one is there but unreadable;
/// [`JournalStore::set_aside`] moves an unreadable journal out of the way
/// (kept for a person to look at), so the device can go on.
pub trait JournalStore {
    /// The journal, if one is there.
    fn load(&mut self) -> Result<Option<Journal>, JournalError>;
    /// Replaces the journal, atomically and durably.
    fn save(&mut self, journal: &Journal) -> Result<(), JournalError>;
    /// Moves an unreadable journal aside.
    fn set_aside(&mut self) -> Result<(), JournalError>;
}

/// A journal in memory, for tests: the bytes, encoded as a file would hold them.
#[derive(Debug, Default, Clone)]
pub struct MemoryJournal {
    /// What the store holds.
    pub bytes: Option<Vec<u8>>,
    /// What was set aside.
    pub aside: Vec<Vec<u8>>,
}

impl JournalStore for MemoryJournal {
    fn load(&mut self) -> Result<Option<Journal>, JournalError> {
        self.bytes.as_deref().map(Journal::decode).transpose()
    }

    fn save(&mut self, journal: &Journal) -> Result<(), JournalError> {
        self.bytes = Some(journal.encode());
        Ok(())
    }

    fn set_aside(&mut self) -> Result<(), JournalError> {
        if let Some(b) = self.bytes.take() {
            self.aside.push(b);
        }
        Ok(())
    }
}

/// What the device's health check says about the image it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not checked yet.
    Unknown,
    /// The image works.
    Good,
    /// The image does not work (why).
    Bad(String),
}

/// What to do at start, before the first inform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAction {
    /// No upgrade in progress: inform the running version.
    Idle,
    /// The download was cut off: resume it (the part file is kept).
    ResumeDownload,
    /// The image is downloaded and verified: install it (again).
    Install,
    /// Installed, not booted yet: reboot into the new image.
    Reboot,
    /// The device runs the new image: run the health check, then decide
    /// again with its verdict.
    CheckHealth,
    /// Commit the new image (mark it good), report SUCCESS (4) 100 and
    /// inform the target; the security counter becomes `counter`.
    Commit {
        /// The new security counter.
        counter: u64,
    },
    /// Report UPGRADE_FAILED (-1) with `desc` (it begins with `rolled
    /// back:` and names both versions), then inform the version running
    /// after it. With `reboot`, the device still runs the bad image: switch
    /// back to the old slot and reboot first; the report follows at the
    /// next start.
    RollBack {
        /// The report's `desc`.
        desc: String,
        /// Switch back and reboot before reporting.
        reboot: bool,
    },
}

/// Decides what a device does at start, from its journal, the version it
/// runs and its health verdict. Returns the action and, when it changes,
/// the journal to save **before** acting (persist before act: a power cut
/// during the action then repeats a decision, never loses one).
///
/// It never tells a device to report SUCCESS for an image it does not run,
/// nor to inform a version it does not run.
#[must_use = "persist the journal, then act"]
pub fn decide_at_start(
    journal: Option<&Journal>,
    running: &str,
    health: &Health,
) -> (StartAction, Option<Journal>) {
    let Some(j) = journal else {
        return (StartAction::Idle, None);
    };
    let mut next = j.clone();
    let roll_back = |mut next: Journal, why: String, reboot: bool| {
        let desc = next.rollback_desc(running, &why);
        if !reboot {
            next.phase = Phase::RolledBack;
        }
        next.reason = Some(why);
        (StartAction::RollBack { desc, reboot }, Some(next))
    };
    let on_target = running == j.target_version;
    let on_old = running == j.from_version;
    match j.phase {
        Phase::Committed | Phase::RolledBack | Phase::Failed => (StartAction::Idle, None),
        Phase::Downloading if on_old => (StartAction::ResumeDownload, None),
        Phase::Downloaded | Phase::Installing if on_old => (StartAction::Install, None),
        // Installing on the target: the install armed the new slot and a
        // power cut came before the journal said Installed. The device runs
        // it now: check it like any other unconfirmed boot.
        Phase::Installing | Phase::Installed | Phase::Booted if on_target => {
            next.phase = Phase::Booted;
            // Every start counts a boot (a health check that hangs or
            // crashes the device must not get endless tries); the second
            // decision of one start, with the verdict, does not.
            if matches!(j.phase, Phase::Installing | Phase::Installed) || *health == Health::Unknown
            {
                next.boot_attempts = j.boot_attempts + 1;
            }
            if next.boot_attempts > j.max_boot_attempts {
                let why = format!(
                    "not confirmed after {} boots of {}",
                    j.max_boot_attempts, j.target_version
                );
                return roll_back(next, why, true);
            }
            match health {
                Health::Unknown => (StartAction::CheckHealth, Some(next)),
                Health::Good => {
                    let counter = j
                        .pending_counter
                        .map_or(j.security_counter, |c| c.max(j.security_counter));
                    next.phase = Phase::Committed;
                    next.security_counter = counter;
                    next.pending_counter = None;
                    (StartAction::Commit { counter }, Some(next))
                }
                Health::Bad(why) => roll_back(next, format!("health check failed: {why}"), true),
            }
        }
        Phase::Installed if on_old => {
            // The reboot did not bring the new image up (yet): try again,
            // as many times as allowed.
            next.boot_attempts = j.boot_attempts + 1;
            if next.boot_attempts > j.max_boot_attempts {
                let why = format!(
                    "{} did not boot after {} attempts",
                    j.target_version, j.max_boot_attempts
                );
                return roll_back(next, why, false);
            }
            (StartAction::Reboot, Some(next))
        }
        Phase::Booted if on_old => {
            // Back on the old image: by the rollback asked for at the last
            // start (its reason is kept), or by the bootloader's own fallback.
            let why = j
                .reason
                .clone()
                .unwrap_or_else(|| format!("the bootloader fell back to {running}"));
            roll_back(next, why, false)
        }
        // The device runs neither version the journal knows (or an early
        // phase on another version): the upgrade cannot go on. Report it
        // against what runs, and stop.
        _ => {
            let why = format!(
                "running {running}, not {} or {}",
                j.from_version, j.target_version
            );
            let desc = j.rollback_desc(running, &why);
            next.phase = Phase::Failed;
            next.reason = Some(why);
            (
                StartAction::RollBack {
                    desc,
                    reboot: false,
                },
                Some(next),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(phase: Phase) -> Journal {
        let mut j = Journal::new("1.0", "2.0", "m1");
        j.phase = phase;
        j.sign = Some((SignMethod::Md5, "9e107d9d372bb6826bd81d3542a419d6".into()));
        j.url = Some("https://fw.example/2.0.bin".into());
        j.size = Some(1234);
        j.policy = Some(Policy::Silent);
        j.security_counter = 3;
        j.pending_counter = Some(5);
        j
    }

    #[test]
    fn encodes_and_decodes_every_phase() {
        for phase in [
            Phase::Downloading,
            Phase::Downloaded,
            Phase::Installing,
            Phase::Installed,
            Phase::Booted,
            Phase::Committed,
            Phase::RolledBack,
            Phase::Failed,
        ] {
            let mut j = journal(phase);
            j.reason = Some("why \"quoted\"\nnewline".into());
            assert_eq!(Journal::decode(&j.encode()).unwrap(), j);
        }
        let bare = Journal::new("1.0", "2.0", "");
        assert_eq!(Journal::decode(&bare.encode()).unwrap(), bare);
    }

    #[test]
    fn a_damaged_journal_is_an_error_never_a_default() {
        let bytes = journal(Phase::Booted).encode();
        // Torn at every length, and every single byte flipped.
        for n in 0..bytes.len() {
            assert!(Journal::decode(&bytes[..n]).is_err(), "torn at {n}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x20;
            assert!(Journal::decode(&b).is_err(), "flipped byte {i}");
        }
        // A valid checksum over another schema.
        let line = r#"{"schema":2}"#;
        let other = format!(
            "{line}\nsha256 {}\n",
            digest_hex(SignMethod::Sha256, line.as_bytes())
        );
        assert_eq!(
            Journal::decode(other.as_bytes()),
            Err(JournalError::UnknownSchema(2))
        );
    }

    #[test]
    fn the_memory_store_keeps_sets_aside_and_reports() {
        let mut s = MemoryJournal::default();
        assert_eq!(s.load(), Ok(None));
        let j = journal(Phase::Installed);
        s.save(&j).unwrap();
        assert_eq!(s.load(), Ok(Some(j)));
        s.bytes.as_mut().unwrap()[3] ^= 1;
        assert!(matches!(s.load(), Err(JournalError::Corrupt(_))));
        s.set_aside().unwrap();
        assert_eq!(s.load(), Ok(None));
        assert_eq!(s.aside.len(), 1);
    }

    #[test]
    fn no_journal_or_a_final_one_is_idle() {
        assert_eq!(
            decide_at_start(None, "1.0", &Health::Unknown),
            (StartAction::Idle, None)
        );
        for phase in [Phase::Committed, Phase::RolledBack, Phase::Failed] {
            let j = journal(phase);
            assert_eq!(
                decide_at_start(Some(&j), "2.0", &Health::Good),
                (StartAction::Idle, None)
            );
        }
    }

    #[test]
    fn cut_off_before_the_reboot_goes_on() {
        let j = journal(Phase::Downloading);
        assert_eq!(
            decide_at_start(Some(&j), "1.0", &Health::Unknown).0,
            StartAction::ResumeDownload
        );
        for phase in [Phase::Downloaded, Phase::Installing] {
            let j = journal(phase);
            assert_eq!(
                decide_at_start(Some(&j), "1.0", &Health::Unknown).0,
                StartAction::Install
            );
        }
    }

    #[test]
    fn booted_on_the_target_checks_health_then_commits() {
        let j = journal(Phase::Installed);
        let (action, next) = decide_at_start(Some(&j), "2.0", &Health::Unknown);
        assert_eq!(action, StartAction::CheckHealth);
        let booted = next.unwrap();
        assert_eq!((booted.phase, booted.boot_attempts), (Phase::Booted, 1));
        // Deciding again with the verdict does not count another boot.
        let (action, done) = decide_at_start(Some(&booted), "2.0", &Health::Good);
        assert_eq!(action, StartAction::Commit { counter: 5 });
        let done = done.unwrap();
        assert_eq!(done.phase, Phase::Committed);
        assert_eq!((done.security_counter, done.pending_counter), (5, None));
        assert_eq!(done.boot_attempts, 1);
    }

    #[test]
    fn every_start_on_an_unconfirmed_target_counts_a_boot() {
        // A health check that crashes the device: each start is another boot
        // of the unconfirmed image, until the limit.
        let mut j = journal(Phase::Installed);
        for attempt in 1..=DEFAULT_MAX_BOOTS {
            let (action, next) = decide_at_start(Some(&j), "2.0", &Health::Unknown);
            assert_eq!(action, StartAction::CheckHealth, "boot {attempt}");
            j = next.unwrap();
            assert_eq!(j.boot_attempts, attempt);
        }
        let (action, _) = decide_at_start(Some(&j), "2.0", &Health::Unknown);
        assert!(
            matches!(&action, StartAction::RollBack { reboot: true, desc } if desc.contains("not confirmed after 3 boots")),
            "{action:?}"
        );
    }

    #[test]
    fn a_cut_after_the_slot_was_armed_is_an_unconfirmed_boot() {
        // The install armed the new slot; the journal still said Installing.
        let j = journal(Phase::Installing);
        let (action, next) = decide_at_start(Some(&j), "2.0", &Health::Unknown);
        assert_eq!(action, StartAction::CheckHealth);
        let next = next.unwrap();
        assert_eq!((next.phase, next.boot_attempts), (Phase::Booted, 1));
        // On the old version it is still "install again".
        assert_eq!(
            decide_at_start(Some(&j), "1.0", &Health::Unknown).0,
            StartAction::Install
        );
    }

    #[test]
    fn a_journal_knows_its_firmware_to_resume() {
        let j = journal(Phase::Downloading);
        let fw = j.firmware().unwrap();
        assert_eq!(
            (fw.version.as_str(), fw.url.as_str(), fw.size, fw.policy),
            (
                "2.0",
                "https://fw.example/2.0.bin",
                Some(1234),
                Some(Policy::Silent)
            )
        );
        assert_eq!(Journal::for_firmware("1.0", &fw, "m1").firmware(), Some(fw));
        assert_eq!(Journal::new("1.0", "2.0", "m").firmware(), None);
    }

    #[test]
    fn the_counter_never_goes_down_at_commit() {
        let mut j = journal(Phase::Booted);
        j.boot_attempts = 1;
        j.security_counter = 9;
        j.pending_counter = Some(5);
        assert_eq!(
            decide_at_start(Some(&j), "2.0", &Health::Good).0,
            StartAction::Commit { counter: 9 }
        );
        j.pending_counter = None;
        assert_eq!(
            decide_at_start(Some(&j), "2.0", &Health::Good).0,
            StartAction::Commit { counter: 9 }
        );
    }

    #[test]
    fn a_failed_health_check_rolls_back_with_a_reboot() {
        let mut j = journal(Phase::Booted);
        j.boot_attempts = 1;
        let (action, next) = decide_at_start(Some(&j), "2.0", &Health::Bad("no network".into()));
        let StartAction::RollBack { desc, reboot } = action else {
            panic!("{action:?}")
        };
        assert!(reboot);
        assert!(desc.starts_with("rolled back: 2.0 -> 2.0"), "{desc}");
        assert!(desc.contains("no network"));
        // Not rolled back yet: that is known after the reboot into 1.0.
        let next = next.unwrap();
        assert_eq!(next.phase, Phase::Booted);
        assert_eq!(next.security_counter, 3, "never raised by a failure");
        let (action, done) = decide_at_start(Some(&next), "1.0", &Health::Good);
        let StartAction::RollBack { desc, reboot } = action else {
            panic!("{action:?}")
        };
        assert!(!reboot);
        assert!(desc.starts_with("rolled back: 2.0 -> 1.0"), "{desc}");
        assert!(desc.contains("health check failed: no network"), "{desc}");
        assert_eq!(done.unwrap().phase, Phase::RolledBack);
    }

    #[test]
    fn the_bootloader_falling_back_is_a_rollback() {
        let mut j = journal(Phase::Booted);
        j.boot_attempts = 2;
        let (action, done) = decide_at_start(Some(&j), "1.0", &Health::Unknown);
        let StartAction::RollBack { desc, reboot } = action else {
            panic!("{action:?}")
        };
        assert!(!reboot);
        assert!(desc.contains("bootloader fell back to 1.0"), "{desc}");
        let done = done.unwrap();
        assert_eq!((done.phase, done.security_counter), (Phase::RolledBack, 3));
    }

    #[test]
    fn boots_without_a_commit_are_limited() {
        let mut j = journal(Phase::Installed);
        j.boot_attempts = DEFAULT_MAX_BOOTS;
        // Once more on the target, unconfirmed: over the limit.
        let (action, _) = decide_at_start(Some(&j), "2.0", &Health::Unknown);
        assert!(
            matches!(action, StartAction::RollBack { reboot: true, .. }),
            "{action:?}"
        );
        // The new image never came up: reboot until the limit, then give up.
        let mut j = journal(Phase::Installed);
        for attempt in 1..=DEFAULT_MAX_BOOTS {
            let (action, next) = decide_at_start(Some(&j), "1.0", &Health::Unknown);
            assert_eq!(action, StartAction::Reboot, "attempt {attempt}");
            j = next.unwrap();
            assert_eq!(j.boot_attempts, attempt);
        }
        let (action, done) = decide_at_start(Some(&j), "1.0", &Health::Unknown);
        let StartAction::RollBack { desc, reboot } = action else {
            panic!("{action:?}")
        };
        assert!(
            !reboot && desc.contains("did not boot after 3 attempts"),
            "{desc}"
        );
        assert_eq!(done.unwrap().phase, Phase::RolledBack);
    }

    #[test]
    fn an_unknown_running_version_fails_without_claiming_either() {
        for phase in [Phase::Downloading, Phase::Installed, Phase::Booted] {
            let j = journal(phase);
            let (action, next) = decide_at_start(Some(&j), "9.9", &Health::Good);
            let StartAction::RollBack { desc, reboot } = action else {
                panic!("{action:?}")
            };
            assert!(!reboot);
            assert!(desc.contains("running 9.9"), "{desc}");
            assert_eq!(next.unwrap().phase, Phase::Failed);
        }
    }
}
