//! The batch and record state machine: pure, no IO, no clock.
//!
//! Every input takes `now` (milliseconds since the epoch); every output is a
//! value: [`Action`]s to carry out and [`Batch::next_wakeup`] for when to call
//! [`Batch::poll`] again. The IO shell (`service`) persists the changed
//! records ([`Batch::take_dirty`]) *before* it carries out the actions, so a
//! crash between the two loses nothing: a record marked pushed whose command
//! never left simply fails its ack timeout and is retried.
//!
//! ```text
//!   to_push --poll--> pushed --reply 200--> pending --progress--> upgrading --inform target--> success
//!                        |                     |                      |
//!                        | no reply in          | validity ended       | failure status / timeout
//!                        | ack timeout          | (no progress)        |
//!                        v                      v                      v
//!                     failure -------------------------------------> failure
//!   failure: retries left and the retry lands before the validity end -> awaiting_retry --poll--> pushed
//!            otherwise                                                -> failed (reason)
//!   terminate: every unfinished record -> failed (batch terminated)
//! ```
//!
//! An inform of the target version finishes any unfinished record with
//! success: the platform judges success by the version alone.
//!
//! # Drive contract
//!
//! Feed every device message to the batch (`handle_reply`, `handle_progress`,
//! `handle_inform`), call [`Batch::poll`] at [`Batch::next_wakeup`] (or
//! sooner: polling early is harmless), and after every call write
//! [`Batch::take_dirty`]'s rows, then carry out the returned actions.
//!
//! ```
//! use iot_ota_core::{Policy, SignMethod};
//! use iot_ota_platform::batch::{Action, Batch, BatchConfig, FailReason, RecordState};
//!
//! let config = BatchConfig {
//!     policy: Policy::Standard,
//!     sign_method: SignMethod::Md5,
//!     validity_ms: 60_000,
//!     timeout_ms: 10_000,
//!     retries: 1,
//!     retry_interval_ms: 2_000,
//!     ack_timeout_ms: 10_000,
//! };
//! let t0 = 1_700_000_000_000;
//! let mut batch = Batch::new(1, "pk", "2.0.0", config, ["dev".to_string()], t0);
//! // The shell's loop: poll when due, persist, then act.
//! let actions = batch.poll(t0);
//! let (changed, _batch_row) = batch.take_dirty(); // write these rows, then publish:
//! assert_eq!(changed, ["dev"]);
//! let Action::Push { msg_id, .. } = &actions[0];
//! assert_eq!(msg_id, "b1a1");
//! // No reply within the ack timeout: push failed, a retry 2 s later.
//! assert_eq!(batch.next_wakeup(), Some(t0 + 10_000));
//! batch.poll(t0 + 10_000);
//! let rec = &batch.records["dev"];
//! assert_eq!((rec.state, rec.reason), (RecordState::AwaitingRetry, Some(FailReason::PushFailed)));
//! assert_eq!(batch.poll(t0 + 12_000).len(), 1, "the retry's push");
//! batch.handle_reply("dev", "b1a2", 200, "success", t0 + 12_100);
//! batch.handle_inform("dev", "2.0.0", t0 + 15_000);
//! assert_eq!(batch.records["dev"].state, RecordState::Success);
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use iot_ota_core::protocol::Progress;
use iot_ota_core::{Policy, SignMethod, Status};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// The state of one device's record in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordState {
    /// Not pushed yet.
    ToPush,
    /// Command published, no reply yet.
    Pushed,
    /// The device accepted the command (reply 200), no progress yet.
    Pending,
    /// The device reported progress; the upgrade timeout runs.
    Upgrading,
    /// Failed, a retry is scheduled.
    AwaitingRetry,
    /// The device reported the target version.
    Success,
    /// Failed for good (see the reason).
    Failed,
}

impl RecordState {
    /// Every state.
    pub const ALL: [RecordState; 7] = [
        RecordState::ToPush,
        RecordState::Pushed,
        RecordState::Pending,
        RecordState::Upgrading,
        RecordState::AwaitingRetry,
        RecordState::Success,
        RecordState::Failed,
    ];

    /// Success or failed.
    pub fn is_final(self) -> bool {
        matches!(self, RecordState::Success | RecordState::Failed)
    }

    /// The snake_case name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordState::ToPush => "to_push",
            RecordState::Pushed => "pushed",
            RecordState::Pending => "pending",
            RecordState::Upgrading => "upgrading",
            RecordState::AwaitingRetry => "awaiting_retry",
            RecordState::Success => "success",
            RecordState::Failed => "failed",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<RecordState> {
        RecordState::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for RecordState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a record failed (the console's reasons, plus `rejected` and `upgrade_failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailReason {
    /// No reply to the command within the ack timeout (10 s on the console).
    PushFailed,
    /// The device replied with a code other than 200 (400, 409, 412).
    Rejected,
    /// The device reported DOWNLOAD_FAILED (-2).
    DownloadFailed,
    /// The device reported VERIFY_FAILED (-3).
    VerifyFailed,
    /// The device reported FLASH_FAILED (-4).
    FlashFailed,
    /// The device reported UPGRADE_FAILED (-1).
    UpgradeFailed,
    /// The device booted the new image and rolled back (UPGRADE_FAILED
    /// with a `desc` beginning `rolled back:`, PROTOCOL.md "Install,
    /// reboot, confirm").
    RolledBack,
    /// No inform of the target version within the timeout after the first progress,
    /// or no progress at all before the validity period ended.
    UpgradeTimeout,
    /// The batch was terminated by hand, or expired before the record was pushed.
    BatchTerminated,
}

impl FailReason {
    /// Every reason.
    pub const ALL: [FailReason; 9] = [
        FailReason::PushFailed,
        FailReason::Rejected,
        FailReason::DownloadFailed,
        FailReason::VerifyFailed,
        FailReason::FlashFailed,
        FailReason::UpgradeFailed,
        FailReason::RolledBack,
        FailReason::UpgradeTimeout,
        FailReason::BatchTerminated,
    ];

    /// The snake_case name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::PushFailed => "push_failed",
            FailReason::Rejected => "rejected",
            FailReason::DownloadFailed => "download_failed",
            FailReason::VerifyFailed => "verify_failed",
            FailReason::FlashFailed => "flash_failed",
            FailReason::UpgradeFailed => "upgrade_failed",
            FailReason::RolledBack => "rolled_back",
            FailReason::UpgradeTimeout => "upgrade_timeout",
            FailReason::BatchTerminated => "batch_terminated",
        }
    }

    /// The reason named `s`.
    pub fn parse(s: &str) -> Option<FailReason> {
        FailReason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The reason a failure status maps to.
    pub fn from_status(status: Status) -> Option<FailReason> {
        match status {
            Status::DownloadFailed => Some(FailReason::DownloadFailed),
            Status::VerifyFailed => Some(FailReason::VerifyFailed),
            Status::FlashFailed => Some(FailReason::FlashFailed),
            Status::UpgradeFailed => Some(FailReason::UpgradeFailed),
            _ => None,
        }
    }
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str().replace('_', " "))
    }
}

/// The state of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BatchState {
    /// Some record is unfinished.
    InProgress,
    /// Every record succeeded or failed, within the validity period.
    Completed,
    /// Stopped by hand, or the validity period ended with records unfinished.
    Terminated,
}

impl BatchState {
    /// The snake_case name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            BatchState::InProgress => "in_progress",
            BatchState::Completed => "completed",
            BatchState::Terminated => "terminated",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<BatchState> {
        [
            BatchState::InProgress,
            BatchState::Completed,
            BatchState::Terminated,
        ]
        .into_iter()
        .find(|b| b.as_str() == s)
    }
}

impl fmt::Display for BatchState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rules of one batch, all durations resolved to milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchConfig {
    /// Installation policy put in the commands.
    pub policy: Policy,
    /// Digest put in the commands.
    pub sign_method: SignMethod,
    /// Validity period from creation: nothing is pushed after it.
    pub validity_ms: Millis,
    /// Upgrade timeout, counted from the record's first progress report.
    pub timeout_ms: Millis,
    /// Retries after a failure (0-5).
    pub retries: u32,
    /// Wait between a failure and the retry's push.
    pub retry_interval_ms: Millis,
    /// How long a pushed command waits for its reply (10 s on the console).
    pub ack_timeout_ms: Millis,
}

/// A size in a rollout: a count of devices, or a percentage of the batch's
/// (or, for an error threshold, of the group's) records, rounded up.
/// Written as `"25"` or `"10%"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Share {
    /// This many.
    Count(u32),
    /// This percentage (1-100).
    Percent(u32),
}

impl Share {
    /// Parses `"25"` (a count) or `"10%"`.
    pub fn parse(s: &str) -> Result<Share, String> {
        let t = s.trim();
        let (num, pct) = match t.strip_suffix('%') {
            Some(n) => (n.trim(), true),
            None => (t, false),
        };
        let n: u32 = num
            .parse()
            .map_err(|_| format!("{s:?} is neither a count (25) nor a percentage (10%)"))?;
        match (pct, n) {
            (_, 0) => Err(format!("{s:?}: must be at least 1")),
            (true, n) if n > 100 => Err(format!("{s:?}: a percentage is at most 100%")),
            (true, n) => Ok(Share::Percent(n)),
            (false, n) => Ok(Share::Count(n)),
        }
    }

    /// How many of `of` this is (at least 1 when `of` is not 0).
    pub fn of(self, of: usize) -> usize {
        match self {
            Share::Count(n) => (n as usize).min(of),
            Share::Percent(p) => (of * p as usize).div_ceil(100).min(of),
        }
    }
}

impl TryFrom<String> for Share {
    type Error = String;
    fn try_from(s: String) -> Result<Share, String> {
        Share::parse(&s)
    }
}

impl From<Share> for String {
    fn from(s: Share) -> String {
        s.to_string()
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Share::Count(n) => write!(f, "{n}"),
            Share::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// How a batch rolls out (hawkBit's rollout groups, AWS IoT Jobs' rates
/// and abort rules); the default pushes every record at once, as the
/// console does.
///
/// - `groups`: cascading cohorts, in the batch's device order: group 1 is
///   pushed first; the next group starts once the current one has
///   `success_threshold` percent of its records in success. Devices left
///   after the listed sizes form one last group.
/// - `error_threshold`: failed records in the current group (a count, or a
///   percentage of the group) that pause the batch by themselves, with the
///   reason; records already running go on, nothing new is pushed until
///   [`Batch::resume`]. A group that ends below its success threshold
///   pauses the batch too.
/// - `push_rate`: pushes per minute at most, each spaced by the interval
///   times a jitter between 0.5 and 1.5 (seeded by the device), so that a
///   fleet does not download in lockstep.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rollout {
    /// Group sizes, in order.
    pub groups: Vec<Share>,
    /// Success percentage of a group that starts the next (default 100).
    pub success_threshold: Option<u32>,
    /// Failures that pause the batch.
    pub error_threshold: Option<Share>,
    /// Pushes per minute at most.
    pub push_rate: Option<u32>,
}

impl Rollout {
    /// The success threshold in percent.
    pub fn success_pct(&self) -> u32 {
        self.success_threshold.unwrap_or(100).clamp(1, 100)
    }
}

/// Where a rollout is ([`Batch::progress`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolloutState {
    /// Index of the group being pushed (0-based).
    pub group: u32,
    /// Why the batch is paused, while it is.
    pub paused: Option<String>,
    /// When the next push may go (push rate).
    pub next_push_ms: Millis,
    /// Failures of the current group already seen at the last resume (the
    /// error threshold counts new ones).
    pub error_base: u32,
}

/// Counts of one rollout group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupCounts {
    /// Records in the group.
    pub total: usize,
    /// In success.
    pub success: usize,
    /// Failed.
    pub failed: usize,
}

/// One device's record in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Device identifier (`device_name`).
    pub device: String,
    /// Current state.
    pub state: RecordState,
    /// Last status reported in this attempt (wire code), if any.
    pub status: Option<i32>,
    /// Last percent reported in this attempt.
    pub progress: u32,
    /// Commands pushed so far (1 + retries used).
    pub attempts: u32,
    /// `msgId` of the last command pushed.
    pub msg_id: Option<String>,
    /// Failure reason: final when failed, the one being retried when awaiting retry.
    pub reason: Option<FailReason>,
    /// Details of the last failure (the device's `desc`, the reply message, ...).
    pub desc: String,
    /// The most recent failure of any attempt, kept after a retry succeeds.
    pub last_failure: Option<FailReason>,
    /// Last version the device informed since the batch began.
    pub version: Option<String>,
    /// When the last command was pushed.
    pub pushed_ms: Option<Millis>,
    /// When the device acknowledged the last command (its 200 reply).
    pub acked_ms: Option<Millis>,
    /// First progress report of the current attempt (the timeout clock's start).
    pub started_ms: Option<Millis>,
    /// The pending timer: ack deadline, upgrade deadline or retry time.
    pub deadline_ms: Option<Millis>,
    /// When the record succeeded or failed.
    pub finished_ms: Option<Millis>,
    /// Its rollout group (0-based).
    pub group: u32,
}

impl Record {
    /// A fresh record, to push.
    pub fn new(device: impl Into<String>) -> Self {
        Record {
            device: device.into(),
            state: RecordState::ToPush,
            status: None,
            progress: 0,
            attempts: 0,
            msg_id: None,
            reason: None,
            desc: String::new(),
            last_failure: None,
            version: None,
            pushed_ms: None,
            acked_ms: None,
            started_ms: None,
            deadline_ms: None,
            finished_ms: None,
            group: 0,
        }
    }
}

/// What the shell must do after a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Publish the batch's upgrade command to `device` with `msg_id`.
    Push {
        /// Batch id.
        batch: i64,
        /// Device identifier.
        device: String,
        /// The command's `msgId`, echoed by the reply.
        msg_id: String,
    },
}

/// Counts of records by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Every record.
    pub total: usize,
    /// Records in success.
    pub success: usize,
    /// Records in failed.
    pub failed: usize,
    /// Records not finished.
    pub unfinished: usize,
}

/// A batch upgrade and its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Database id.
    pub id: i64,
    /// Product key of every device in the batch.
    pub product: String,
    /// Target firmware version.
    pub firmware_version: String,
    /// Rules.
    pub config: BatchConfig,
    /// Current state.
    pub state: BatchState,
    /// Creation time; the validity period starts here.
    pub created_ms: Millis,
    /// When the batch completed or was terminated.
    pub finished_ms: Option<Millis>,
    /// Records by device identifier.
    pub records: BTreeMap<String, Record>,
    /// True once the validity period ended with some record unfinished and cut short.
    pub validity_cut: bool,
    /// The rollout rules.
    pub rollout: Rollout,
    /// Where the rollout is.
    pub progress: RolloutState,
    groups: Vec<GroupCounts>,
    dirty: BTreeSet<String>,
    batch_dirty: bool,
}

impl Batch {
    /// A new batch with every device to push.
    pub fn new(
        id: i64,
        product: impl Into<String>,
        firmware_version: impl Into<String>,
        config: BatchConfig,
        devices: impl IntoIterator<Item = String>,
        now: Millis,
    ) -> Self {
        let records: BTreeMap<String, Record> = devices
            .into_iter()
            .map(|d| (d.clone(), Record::new(d)))
            .collect();
        let dirty = records.keys().cloned().collect();
        Batch {
            id,
            product: product.into(),
            firmware_version: firmware_version.into(),
            config,
            state: BatchState::InProgress,
            created_ms: now,
            finished_ms: None,
            records,
            validity_cut: false,
            rollout: Rollout::default(),
            progress: RolloutState {
                next_push_ms: now,
                ..RolloutState::default()
            },
            groups: Vec::new(),
            dirty,
            batch_dirty: true,
        }
        .counted()
    }

    /// With these rollout rules: assigns the records to their groups, in
    /// device order. For a new batch, before its first poll.
    pub fn with_rollout(mut self, rollout: Rollout) -> Self {
        let total = self.records.len();
        let mut sizes: Vec<usize> = Vec::new();
        let mut left = total;
        for share in &rollout.groups {
            if left == 0 {
                break;
            }
            let n = share.of(total).clamp(1, left);
            sizes.push(n);
            left -= n;
        }
        if left > 0 {
            sizes.push(left);
        }
        let mut group = 0u32;
        let mut in_group = 0usize;
        for r in self.records.values_mut() {
            if in_group == sizes[group as usize] {
                group += 1;
                in_group = 0;
            }
            r.group = group;
            in_group += 1;
        }
        self.rollout = rollout;
        self.dirty = self.records.keys().cloned().collect();
        self.batch_dirty = true;
        self.counted()
    }

    fn counted(mut self) -> Self {
        self.recount();
        self
    }

    /// Counts the groups' records from scratch.
    fn recount(&mut self) {
        let n = self
            .records
            .values()
            .map(|r| r.group + 1)
            .max()
            .unwrap_or(1);
        self.groups = vec![GroupCounts::default(); n as usize];
        for r in self.records.values() {
            let g = &mut self.groups[r.group as usize];
            g.total += 1;
            match r.state {
                RecordState::Success => g.success += 1,
                RecordState::Failed => g.failed += 1,
                _ => {}
            }
        }
    }

    /// Counts per rollout group (one group without rollout rules).
    pub fn group_counts(&self) -> &[GroupCounts] {
        &self.groups
    }

    /// True while the rollout is paused.
    pub fn is_paused(&self) -> bool {
        self.progress.paused.is_some()
    }

    /// Pauses the batch: nothing new is pushed (retries included) until
    /// [`Batch::resume`]; records already pushed go on. False when it is not
    /// running or already paused.
    pub fn pause(&mut self, reason: impl Into<String>) -> bool {
        if !self.is_running() || self.is_paused() {
            return false;
        }
        self.progress.paused = Some(reason.into());
        self.batch_dirty = true;
        true
    }

    /// Resumes a paused batch. The error threshold then counts failures from
    /// here; a group that had ended below its success threshold is passed,
    /// and the next one starts.
    pub fn resume(&mut self, now: Millis) -> bool {
        if !self.is_running() || !self.is_paused() {
            return false;
        }
        self.progress.paused = None;
        let g = self.progress.group as usize;
        if let Some(c) = self.groups.get(g).copied() {
            self.progress.error_base = c.failed as u32;
            if c.success + c.failed == c.total && g + 1 < self.groups.len() {
                self.progress.group += 1;
                self.progress.error_base = 0;
            }
        }
        self.progress.next_push_ms = self.progress.next_push_ms.max(now);
        self.batch_dirty = true;
        self.check_done(now);
        true
    }

    /// Advances the rollout after a change: the next group when the current
    /// one reached its success threshold, a pause when it crossed its error
    /// threshold or ended below the success threshold.
    fn step_rollout(&mut self) {
        if !self.is_running() || self.is_paused() {
            return;
        }
        loop {
            let g = self.progress.group as usize;
            let Some(c) = self.groups.get(g).copied() else {
                return;
            };
            if let Some(limit) = self.rollout.error_threshold {
                let new_failures = c.failed.saturating_sub(self.progress.error_base as usize);
                let limit = limit.of(c.total).max(1);
                if new_failures >= limit {
                    self.progress.paused = Some(format!(
                        "group {} of {}: {new_failures} failed, at the error threshold ({})",
                        g + 1,
                        self.groups.len(),
                        self.rollout
                            .error_threshold
                            .map_or(String::new(), |t| t.to_string())
                    ));
                    self.batch_dirty = true;
                    return;
                }
            }
            if g + 1 >= self.groups.len() {
                return;
            }
            let pct = self.rollout.success_pct() as usize;
            if c.success * 100 >= pct * c.total {
                self.progress.group += 1;
                self.progress.error_base = 0;
                self.batch_dirty = true;
                continue;
            }
            if c.success + c.failed == c.total {
                self.progress.paused = Some(format!(
                    "group {} of {} ended with {} of {} in success, below the {pct}% success threshold",
                    g + 1,
                    self.groups.len(),
                    c.success,
                    c.total
                ));
                self.batch_dirty = true;
            }
            return;
        }
    }

    /// The gap after a push to `device` under the push rate (jittered 0.5x-1.5x).
    fn push_gap(&self, device: &str) -> Millis {
        let Some(rate) = self.rollout.push_rate.filter(|r| *r > 0) else {
            return 0;
        };
        let interval = 60_000.0 / f64::from(rate);
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in device.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        let jitter = 0.5 + (h % 1000) as f64 / 1000.0;
        (interval * jitter).round() as Millis
    }

    /// Uses the push rate's next slot for a push to `device` now.
    fn take_push_slot(&mut self, device: &str, now: Millis) {
        let gap = self.push_gap(device);
        if gap > 0 {
            // Slot after slot, so late ticks catch up with the rate; but
            // never more than a second's worth behind: a long-late poll (a
            // pause, a restart) does not burst.
            let next = self.progress.next_push_ms.max(now - 1_000);
            self.progress.next_push_ms = next + gap;
            self.batch_dirty = true;
        }
    }

    /// Whether `device`'s record may be pushed now (group started, not paused, rate).
    fn may_push(&self, rec: &Record, now: Millis) -> bool {
        !self.is_paused()
            && rec.group <= self.progress.group
            && (self.rollout.push_rate.is_none() || now >= self.progress.next_push_ms)
    }

    /// A batch as loaded from storage: nothing dirty.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        id: i64,
        product: String,
        firmware_version: String,
        config: BatchConfig,
        state: BatchState,
        created_ms: Millis,
        finished_ms: Option<Millis>,
        validity_cut: bool,
        records: Vec<Record>,
    ) -> Self {
        Batch {
            id,
            product,
            firmware_version,
            config,
            state,
            created_ms,
            finished_ms,
            records: records.into_iter().map(|r| (r.device.clone(), r)).collect(),
            validity_cut,
            rollout: Rollout::default(),
            progress: RolloutState::default(),
            groups: Vec::new(),
            dirty: BTreeSet::new(),
            batch_dirty: false,
        }
        .counted()
    }

    /// A restored batch's rollout rules and where it was.
    pub fn restore_rollout(mut self, rollout: Rollout, progress: RolloutState) -> Self {
        self.rollout = rollout;
        self.progress = progress;
        self
    }

    /// End of the validity period.
    pub fn expires_ms(&self) -> Millis {
        self.created_ms.saturating_add(self.config.validity_ms)
    }

    /// True while the batch runs.
    pub fn is_running(&self) -> bool {
        self.state == BatchState::InProgress
    }

    /// Counts of records by outcome.
    pub fn totals(&self) -> Totals {
        let mut t = Totals {
            total: self.records.len(),
            ..Totals::default()
        };
        for r in self.records.values() {
            match r.state {
                RecordState::Success => t.success += 1,
                RecordState::Failed => t.failed += 1,
                _ => t.unfinished += 1,
            }
        }
        t
    }

    /// The records changed since the last call, and whether the batch row changed.
    pub fn take_dirty(&mut self) -> (Vec<String>, bool) {
        let devices = std::mem::take(&mut self.dirty).into_iter().collect();
        (devices, std::mem::replace(&mut self.batch_dirty, false))
    }

    /// Marks rows changed again, after a write of [`Batch::take_dirty`]'s rows
    /// failed, so the next write includes them.
    pub fn mark_dirty(&mut self, devices: impl IntoIterator<Item = String>, batch_row: bool) {
        self.dirty.extend(devices);
        self.batch_dirty |= batch_row;
    }

    /// The rows changed and not saved yet: what a reload from storage must
    /// carry over ([`Batch::carry_over`]). Cheap: usually nothing.
    pub fn unsaved(&self) -> Unsaved {
        Unsaved {
            records: self.dirty.iter().map(|d| self.records[d].clone()).collect(),
            head: self.batch_dirty.then(|| {
                (
                    self.state,
                    self.finished_ms,
                    self.validity_cut,
                    self.progress.clone(),
                )
            }),
        }
    }

    /// Puts [`Batch::unsaved`]'s rows back (marked changed) into a batch
    /// reloaded from storage.
    pub fn carry_over(&mut self, unsaved: Unsaved) {
        for r in unsaved.records {
            self.dirty.insert(r.device.clone());
            self.records.insert(r.device.clone(), r);
        }
        if let Some((state, finished, cut, progress)) = unsaved.head {
            self.state = state;
            self.finished_ms = finished;
            self.validity_cut = cut;
            self.progress = progress;
            self.batch_dirty = true;
        }
        self.recount();
    }

    /// When [`Batch::poll`] next has something to do, if ever.
    pub fn next_wakeup(&self) -> Option<Millis> {
        if !self.is_running() {
            return None;
        }
        let mut next: Option<Millis> = None;
        let mut min = |t: Millis| next = Some(next.map_or(t, |n| n.min(t)));
        let push_at = self.progress.next_push_ms.max(self.created_ms);
        for r in self.records.values() {
            match r.state {
                RecordState::ToPush if self.may_push(r, Millis::MAX) => min(push_at),
                RecordState::ToPush => min(self.expires_ms()),
                RecordState::Pushed | RecordState::Upgrading => {
                    if let Some(d) = r.deadline_ms {
                        min(d)
                    }
                }
                RecordState::AwaitingRetry => {
                    if let (Some(d), false) = (r.deadline_ms, self.is_paused()) {
                        min(match self.rollout.push_rate {
                            Some(_) => d.max(push_at),
                            None => d,
                        })
                    }
                    min(self.expires_ms())
                }
                RecordState::Pending => min(self.expires_ms()),
                RecordState::Success | RecordState::Failed => {}
            }
        }
        next
    }

    /// Runs the timers due at `now`: pushes, ack timeouts, upgrade timeouts,
    /// retries and the validity period. Returns the pushes to publish.
    pub fn poll(&mut self, now: Millis) -> Vec<Action> {
        let mut actions = Vec::new();
        if !self.is_running() {
            return actions;
        }
        let expired = now >= self.expires_ms();
        let devices: Vec<String> = self.records.keys().cloned().collect();
        for device in devices {
            let rec = &self.records[&device];
            let due = rec.deadline_ms.is_some_and(|d| now >= d);
            match rec.state {
                RecordState::ToPush if expired => {
                    self.cut();
                    self.finish_failed(
                        &device,
                        FailReason::BatchTerminated,
                        "the validity period ended before the push".into(),
                        now,
                    )
                }
                RecordState::ToPush if self.may_push(rec, now) => {
                    self.take_push_slot(&device, now);
                    actions.push(self.push(&device, now))
                }
                RecordState::Pushed if due => {
                    let secs = self.config.ack_timeout_ms as f64 / 1000.0;
                    self.fail(
                        &device,
                        FailReason::PushFailed,
                        format!("no reply within {secs} s"),
                        now,
                    )
                }
                RecordState::Pending if expired => {
                    self.cut();
                    self.finish_failed(
                        &device,
                        FailReason::UpgradeTimeout,
                        "no progress report before the validity period ended".into(),
                        now,
                    )
                }
                RecordState::Upgrading if due => {
                    let secs = self.config.timeout_ms as f64 / 1000.0;
                    self.fail(
                        &device,
                        FailReason::UpgradeTimeout,
                        format!(
                            "target version not reported within {secs} s of the first progress"
                        ),
                        now,
                    )
                }
                RecordState::AwaitingRetry if expired => {
                    let reason = rec.reason.unwrap_or(FailReason::BatchTerminated);
                    let desc = format!("{}; no retry after the validity period", rec.desc);
                    self.cut();
                    self.finish_failed(&device, reason, desc, now)
                }
                // Retries take push slots too: retries due during a pause
                // or a restart do not all go at once.
                RecordState::AwaitingRetry if due && self.may_push(rec, now) => {
                    self.take_push_slot(&device, now);
                    actions.push(self.push(&device, now))
                }
                _ => {}
            }
        }
        self.check_done(now);
        actions
    }

    /// The device's reply to a command.
    pub fn handle_reply(
        &mut self,
        device: &str,
        msg_id: &str,
        code: i64,
        message: &str,
        now: Millis,
    ) -> bool {
        if !self.is_running() {
            return false;
        }
        let Some(rec) = self.records.get(device) else {
            return false;
        };
        if rec.msg_id.as_deref() != Some(msg_id) {
            return false;
        }
        // A late 200 after the ack timeout: the device is upgrading after all.
        let late_ack =
            rec.state == RecordState::AwaitingRetry && rec.reason == Some(FailReason::PushFailed);
        if rec.state != RecordState::Pushed && !late_ack {
            return false;
        }
        if code == 200 {
            let rec = self.rec_mut(device);
            rec.acked_ms = Some(now);
            rec.state = RecordState::Pending;
            rec.reason = None;
            rec.deadline_ms = None;
        } else {
            let desc = format!("device replied {code}: {message}");
            if code == 409 {
                self.fail(device, FailReason::Rejected, desc, now);
            } else {
                // Malformed command or device policy: a retry would be refused again.
                self.finish_failed(device, FailReason::Rejected, desc, now);
            }
        }
        self.check_done(now);
        true
    }

    /// A progress report from the device. Only reports for this batch's target
    /// version count: one with another or an empty `firmwareVersion` (a device
    /// that rejects a malformed command while busy reports that failure with
    /// no version) says nothing about this upgrade.
    pub fn handle_progress(&mut self, device: &str, p: &Progress, now: Millis) -> bool {
        if !self.is_running() {
            return false;
        }
        let Some(rec) = self.records.get(device) else {
            return false;
        };
        if p.firmware_version != self.firmware_version {
            return false;
        }
        let accepts = match rec.state {
            RecordState::Pushed | RecordState::Pending | RecordState::Upgrading => true,
            RecordState::AwaitingRetry => rec.reason == Some(FailReason::PushFailed),
            _ => false,
        };
        if !accepts {
            return false;
        }
        let timeout = self.config.timeout_ms;
        let rec = self.rec_mut(device);
        if rec.state != RecordState::Upgrading {
            rec.state = RecordState::Upgrading;
            rec.reason = None;
            rec.started_ms = Some(now);
            rec.deadline_ms = Some(now.saturating_add(timeout));
        }
        rec.status = Some(p.status.code());
        rec.progress = p.progress.min(100);
        if let Some(mut reason) = FailReason::from_status(p.status) {
            if reason == FailReason::UpgradeFailed && p.desc.starts_with("rolled back:") {
                reason = FailReason::RolledBack;
            }
            let desc = if p.desc.is_empty() {
                p.status.name().to_owned()
            } else {
                p.desc.clone()
            };
            self.fail(device, reason, desc, now);
        }
        self.check_done(now);
        true
    }

    /// A version inform from the device: success when it is the target.
    pub fn handle_inform(&mut self, device: &str, version: &str, now: Millis) -> bool {
        if !self.is_running() {
            return false;
        }
        let Some(rec) = self.records.get(device) else {
            return false;
        };
        if rec.state.is_final() {
            return false;
        }
        let target = version == self.firmware_version;
        let rec = self.rec_mut(device);
        rec.version = Some(version.to_owned());
        if target {
            rec.state = RecordState::Success;
            rec.progress = 100;
            rec.reason = None;
            rec.deadline_ms = None;
            rec.finished_ms = Some(now);
            let g = rec.group as usize;
            self.groups[g].success += 1;
        }
        self.check_done(now);
        true
    }

    /// Stops the batch: every unfinished record fails with `batch terminated`.
    pub fn terminate(&mut self, now: Millis) -> bool {
        if !self.is_running() {
            return false;
        }
        let open: Vec<String> = self
            .records
            .values()
            .filter(|r| !r.state.is_final())
            .map(|r| r.device.clone())
            .collect();
        for device in open {
            self.finish_failed(
                &device,
                FailReason::BatchTerminated,
                "terminated by hand".into(),
                now,
            );
        }
        self.state = BatchState::Terminated;
        self.finished_ms = Some(now);
        self.batch_dirty = true;
        true
    }

    fn cut(&mut self) {
        if !self.validity_cut {
            self.validity_cut = true;
            self.batch_dirty = true;
        }
    }

    fn rec_mut(&mut self, device: &str) -> &mut Record {
        self.dirty.insert(device.to_owned());
        self.records
            .get_mut(device)
            .expect("callers check the record exists")
    }

    fn push(&mut self, device: &str, now: Millis) -> Action {
        let batch = self.id;
        let ack = self.config.ack_timeout_ms;
        let rec = self.rec_mut(device);
        rec.attempts += 1;
        let msg_id = format!("b{batch}a{}", rec.attempts);
        rec.state = RecordState::Pushed;
        rec.msg_id = Some(msg_id.clone());
        rec.status = None;
        rec.progress = 0;
        rec.started_ms = None;
        rec.acked_ms = None;
        rec.pushed_ms = Some(now);
        rec.deadline_ms = Some(now.saturating_add(ack));
        Action::Push {
            batch,
            device: device.to_owned(),
            msg_id,
        }
    }

    /// A failure: retry when retries remain and the retry lands within the validity period.
    fn fail(&mut self, device: &str, reason: FailReason, desc: String, now: Millis) {
        let retry_at = now.saturating_add(self.config.retry_interval_ms);
        let retries_used = self.records[device].attempts.saturating_sub(1);
        if retries_used < self.config.retries && retry_at < self.expires_ms() {
            let rec = self.rec_mut(device);
            rec.state = RecordState::AwaitingRetry;
            rec.reason = Some(reason);
            rec.last_failure = Some(reason);
            rec.desc = desc;
            rec.deadline_ms = Some(retry_at);
        } else {
            self.finish_failed(device, reason, desc, now);
        }
    }

    fn finish_failed(&mut self, device: &str, reason: FailReason, desc: String, now: Millis) {
        let rec = self.rec_mut(device);
        let g = rec.group as usize;
        rec.state = RecordState::Failed;
        rec.reason = Some(reason);
        rec.last_failure = Some(reason);
        rec.desc = desc;
        rec.deadline_ms = None;
        rec.finished_ms = Some(now);
        self.groups[g].failed += 1;
    }

    fn check_done(&mut self, now: Millis) {
        self.step_rollout();
        if !self.is_running() || self.records.values().any(|r| !r.state.is_final()) {
            return;
        }
        // Records cut by the validity period make the batch terminated, not completed.
        self.state = if self.validity_cut {
            BatchState::Terminated
        } else {
            BatchState::Completed
        };
        self.finished_ms = Some(now);
        self.batch_dirty = true;
    }
}

/// A batch's changed rows not saved yet ([`Batch::unsaved`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsaved {
    records: Vec<Record>,
    head: Option<(BatchState, Option<Millis>, bool, RolloutState)>,
}

/// A known device, as eligibility sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device identifier.
    pub device: String,
    /// Last informed version.
    pub version: String,
}

/// Why a device was left out of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exclusion {
    /// The device never informed a version (never activated).
    NeverSeen,
    /// The device already runs the target version.
    AlreadyOnVersion,
    /// The device has an unfinished record in this other running batch.
    InRunningBatch(i64),
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclusion::NeverSeen => f.write_str("never seen (no version inform yet)"),
            Exclusion::AlreadyOnVersion => f.write_str("already on the target version"),
            Exclusion::InRunningBatch(b) => write!(f, "in running batch {b}"),
        }
    }
}

/// Applies the console's eligibility rules.
///
/// `scope` is `None` for every known device of the product, or the chosen
/// list; `known` the product's devices; `busy` maps a device to the running
/// batch that holds an unfinished record of it. Returns the eligible devices
/// (sorted, no duplicates) and the excluded ones with why.
pub fn select_devices(
    target_version: &str,
    scope: Option<&[String]>,
    known: &[DeviceInfo],
    busy: &BTreeMap<String, i64>,
) -> (Vec<String>, Vec<(String, Exclusion)>) {
    let by_id: BTreeMap<&str, &DeviceInfo> = known.iter().map(|d| (d.device.as_str(), d)).collect();
    let wanted: BTreeSet<String> = match scope {
        Some(list) => list.iter().cloned().collect(),
        None => known.iter().map(|d| d.device.clone()).collect(),
    };
    let mut eligible = Vec::new();
    let mut excluded = Vec::new();
    for device in wanted {
        let why = match by_id.get(device.as_str()) {
            None => Some(Exclusion::NeverSeen),
            Some(d) if d.version == target_version => Some(Exclusion::AlreadyOnVersion),
            Some(_) => busy.get(&device).map(|b| Exclusion::InRunningBatch(*b)),
        };
        match why {
            Some(why) => excluded.push((device, why)),
            None => eligible.push(device),
        }
    }
    (eligible, excluded)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_000_000;

    fn config() -> BatchConfig {
        BatchConfig {
            policy: Policy::Standard,
            sign_method: SignMethod::Md5,
            validity_ms: 100_000,
            timeout_ms: 20_000,
            retries: 0,
            retry_interval_ms: 5_000,
            ack_timeout_ms: 10_000,
        }
    }

    fn batch(cfg: BatchConfig, devices: &[&str]) -> Batch {
        Batch::new(
            7,
            "pk",
            "2.0.0",
            cfg,
            devices.iter().map(|d| d.to_string()),
            T0,
        )
    }

    fn progress(status: Status, pct: u32) -> Progress {
        Progress {
            status,
            progress: pct,
            desc: String::new(),
            firmware_version: "2.0.0".into(),
        }
    }

    fn state(b: &Batch, d: &str) -> RecordState {
        b.records[d].state
    }

    fn pushed(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|Action::Push { device, .. }| device.clone())
            .collect()
    }

    /// Acks and succeeds `device` (reply 200, inform of the target).
    fn succeed(b: &mut Batch, device: &str, now: Millis) {
        let msg = b.records[device].msg_id.clone().unwrap();
        b.handle_reply(device, &msg, 200, "ok", now);
        b.handle_inform(device, "2.0.0", now);
    }

    fn fail(b: &mut Batch, device: &str, now: Millis) {
        let msg = b.records[device].msg_id.clone().unwrap();
        b.handle_reply(device, &msg, 200, "ok", now);
        b.handle_progress(device, &progress(Status::UpgradeFailed, 0), now);
    }

    const TEN: [&str; 10] = ["d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7", "d8", "d9"];

    #[test]
    fn shares_parse_and_round_up() {
        assert_eq!(Share::parse("25"), Ok(Share::Count(25)));
        assert_eq!(Share::parse(" 10% "), Ok(Share::Percent(10)));
        for bad in ["0", "0%", "101%", "x", "-1", "5.5%"] {
            assert!(Share::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Share::Percent(10).of(15), 2);
        assert_eq!(Share::Percent(100).of(15), 15);
        assert_eq!(Share::Count(40).of(15), 15);
        assert_eq!(Share::Percent(1).of(10_000), 100);
    }

    #[test]
    fn groups_cascade_when_the_current_one_reaches_its_success_threshold() {
        let rollout = Rollout {
            groups: vec![Share::Count(2), Share::Percent(30)],
            success_threshold: Some(50),
            ..Rollout::default()
        };
        let mut b = batch(config(), &TEN).with_rollout(rollout);
        let sizes: Vec<usize> = b.group_counts().iter().map(|g| g.total).collect();
        assert_eq!(sizes, [2, 3, 5], "2, 30% of 10, the rest");
        assert_eq!(pushed(&b.poll(T0)), ["d0", "d1"], "group 1 only");
        assert!(b.poll(T0 + 1).is_empty());
        succeed(&mut b, "d0", T0 + 10);
        assert_eq!(b.progress.group, 1, "1 of 2 is 50%: the next group starts");
        assert_eq!(pushed(&b.poll(T0 + 20)), ["d2", "d3", "d4"]);
        succeed(&mut b, "d2", T0 + 30);
        assert_eq!(b.progress.group, 1, "1 of 3 is below 50%");
        succeed(&mut b, "d3", T0 + 40);
        assert_eq!(pushed(&b.poll(T0 + 50)).len(), 5, "the last group");
    }

    #[test]
    fn the_error_threshold_pauses_and_resume_counts_failures_anew() {
        let rollout = Rollout {
            groups: vec![Share::Count(5)],
            error_threshold: Some(Share::Count(2)),
            success_threshold: Some(60),
            ..Rollout::default()
        };
        let mut b = batch(config(), &TEN).with_rollout(rollout);
        assert_eq!(b.poll(T0).len(), 5);
        fail(&mut b, "d0", T0 + 10);
        assert!(!b.is_paused());
        fail(&mut b, "d1", T0 + 20);
        let why = b.progress.paused.clone().expect("paused by itself");
        assert!(
            why.contains("2 failed, at the error threshold (2)"),
            "{why}"
        );
        // Running records go on; nothing new is pushed while paused.
        succeed(&mut b, "d2", T0 + 30);
        succeed(&mut b, "d3", T0 + 40);
        succeed(&mut b, "d4", T0 + 50);
        assert_eq!(b.progress.group, 0, "no cascade while paused");
        assert!(b.poll(T0 + 60).is_empty());
        assert!(b.next_wakeup().is_some_and(|w| w >= b.expires_ms()));
        assert!(!b.pause("again"), "already paused");
        assert!(b.resume(T0 + 70));
        assert_eq!(
            b.progress.group, 1,
            "group 1 ended at 60%: the next one starts"
        );
        assert_eq!(pushed(&b.poll(T0 + 80)).len(), 5);
        fail(&mut b, "d5", T0 + 90);
        assert!(!b.is_paused(), "group 2 counts its own failures");
    }

    #[test]
    fn a_group_that_ends_below_its_success_threshold_pauses_the_batch() {
        let rollout = Rollout {
            groups: vec![Share::Count(2)],
            success_threshold: Some(100),
            ..Rollout::default()
        };
        let mut b = batch(config(), &TEN[..4]).with_rollout(rollout);
        b.poll(T0);
        succeed(&mut b, "d0", T0 + 1);
        fail(&mut b, "d1", T0 + 2);
        let why = b.progress.paused.clone().expect("paused");
        assert!(why.contains("1 of 2 in success, below the 100%"), "{why}");
        assert!(b.resume(T0 + 3));
        assert_eq!(pushed(&b.poll(T0 + 4)), ["d2", "d3"]);
    }

    #[test]
    fn the_push_rate_spaces_pushes_with_jitter_and_does_not_burst_after_a_late_poll() {
        let rollout = Rollout {
            push_rate: Some(600), // one per 100 ms on average
            ..Rollout::default()
        };
        let mut b = batch(config(), &TEN).with_rollout(rollout);
        let mut times = Vec::new();
        let mut t = T0;
        loop {
            for _ in b.poll(t) {
                times.push(t);
            }
            if times.len() == 10 {
                break;
            }
            t = b.next_wakeup().unwrap().max(t + 1);
            assert!(t < T0 + 5_000, "stuck at {t} after {times:?}");
        }
        let gaps: Vec<Millis> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|g| (50..=150).contains(g)), "{gaps:?}");
        assert!(gaps.iter().any(|g| *g != gaps[0]), "jittered: {gaps:?}");
        // A late tick catches up with the rate, but a poll long late (a
        // pause, a restart) pushes at most a second's worth at once.
        let hundred: Vec<String> = (0..100).map(|i| format!("d{i:03}")).collect();
        let names: Vec<&str> = hundred.iter().map(String::as_str).collect();
        let mut cfg = config();
        cfg.validity_ms = 1_000_000;
        let mut b = batch(cfg, &names).with_rollout(Rollout {
            push_rate: Some(600),
            ..Rollout::default()
        });
        assert_eq!(b.poll(T0).len(), 1);
        let late = b.poll(T0 + 300).len();
        assert!((1..=5).contains(&late), "caught up 300 ms of slots: {late}");
        let long_late = b.poll(T0 + 60_000).len();
        assert!(
            (5..=20).contains(&long_late),
            "a second's worth at 10/s, not the 60 s missed: {long_late}"
        );
    }

    #[test]
    fn happy_path_through_every_state() {
        let mut b = batch(config(), &["d1"]);
        assert_eq!(state(&b, "d1"), RecordState::ToPush);
        assert_eq!(b.next_wakeup(), Some(T0));
        let actions = b.poll(T0);
        assert_eq!(
            actions,
            vec![Action::Push {
                batch: 7,
                device: "d1".into(),
                msg_id: "b7a1".into()
            }]
        );
        assert_eq!(state(&b, "d1"), RecordState::Pushed);
        assert_eq!(b.next_wakeup(), Some(T0 + 10_000));
        assert!(b.poll(T0 + 1).is_empty(), "pushed only once");
        // A reply with another msgId is not ours.
        assert!(!b.handle_reply("d1", "b7a9", 200, "success", T0 + 100));
        assert!(b.handle_reply("d1", "b7a1", 200, "success", T0 + 100));
        assert_eq!(state(&b, "d1"), RecordState::Pending);
        assert_eq!(b.next_wakeup(), Some(b.expires_ms()));
        assert!(b.handle_progress("d1", &progress(Status::Downloading, 10), T0 + 200));
        let r = &b.records["d1"];
        assert_eq!(
            (r.state, r.started_ms, r.deadline_ms, r.progress),
            (
                RecordState::Upgrading,
                Some(T0 + 200),
                Some(T0 + 20_200),
                10
            )
        );
        // Later progress does not restart the clock.
        assert!(b.handle_progress("d1", &progress(Status::Upgrading, 50), T0 + 5_000));
        assert_eq!(b.records["d1"].deadline_ms, Some(T0 + 20_200));
        assert!(b.handle_progress("d1", &progress(Status::Success, 100), T0 + 6_000));
        assert_eq!(
            state(&b, "d1"),
            RecordState::Upgrading,
            "SUCCESS waits for the inform"
        );
        // An inform of another version is not success.
        assert!(b.handle_inform("d1", "1.0.0", T0 + 6_500));
        assert_eq!(state(&b, "d1"), RecordState::Upgrading);
        assert!(b.handle_inform("d1", "2.0.0", T0 + 7_000));
        let r = &b.records["d1"];
        assert_eq!(r.state, RecordState::Success);
        assert_eq!(r.finished_ms, Some(T0 + 7_000));
        assert_eq!(b.state, BatchState::Completed);
        assert_eq!(b.next_wakeup(), None);
        assert_eq!(
            b.totals(),
            Totals {
                total: 1,
                success: 1,
                failed: 0,
                unfinished: 0
            }
        );
    }

    #[test]
    fn push_failed_without_ack() {
        let mut b = batch(config(), &["d1"]);
        b.poll(T0);
        assert!(b.poll(T0 + 9_999).is_empty());
        assert_eq!(state(&b, "d1"), RecordState::Pushed);
        b.poll(T0 + 10_000);
        let r = &b.records["d1"];
        assert_eq!(r.state, RecordState::Failed);
        assert_eq!(r.reason, Some(FailReason::PushFailed));
        assert!(r.desc.contains("10 s"), "{}", r.desc);
        assert_eq!(b.state, BatchState::Completed);
    }

    #[test]
    fn failure_statuses_map_to_reasons() {
        for (status, reason) in [
            (Status::DownloadFailed, FailReason::DownloadFailed),
            (Status::VerifyFailed, FailReason::VerifyFailed),
            (Status::FlashFailed, FailReason::FlashFailed),
            (Status::UpgradeFailed, FailReason::UpgradeFailed),
        ] {
            let mut b = batch(config(), &["d1"]);
            b.poll(T0);
            b.handle_reply("d1", "b7a1", 200, "", T0 + 1);
            let mut p = progress(status, 100);
            p.desc = "boom".into();
            assert!(b.handle_progress("d1", &p, T0 + 2));
            let r = &b.records["d1"];
            assert_eq!(r.state, RecordState::Failed, "{status}");
            assert_eq!(r.reason, Some(reason));
            assert_eq!(r.desc, "boom");
            assert_eq!(r.status, Some(status.code()));
        }
    }

    #[test]
    fn a_reboot_keeps_the_record_upgrading_and_a_rollback_fails_it_and_retries() {
        let mut cfg = config();
        cfg.retries = 1;
        cfg.retry_interval_ms = 1_000;
        let mut b = batch(cfg, &["d1"]);
        b.poll(T0);
        b.handle_reply("d1", "b7a1", 200, "", T0 + 1);
        b.handle_progress("d1", &progress(Status::Upgrading, 100), T0 + 2);
        // The device is away for its reboot: no event, the record waits.
        assert!(b.poll(T0 + 5_000).is_empty());
        assert_eq!(state(&b, "d1"), RecordState::Upgrading);
        // It comes back on the old version and says why.
        let mut p = progress(Status::UpgradeFailed, 0);
        p.desc = "rolled back: 2.0.0 -> 1.0.0: health check failed: no network".into();
        assert!(b.handle_progress("d1", &p, T0 + 6_000));
        b.handle_inform("d1", "1.0.0", T0 + 6_001);
        let r = &b.records["d1"];
        assert_eq!(
            (r.state, r.reason, r.desc.as_str()),
            (
                RecordState::AwaitingRetry,
                Some(FailReason::RolledBack),
                p.desc.as_str()
            )
        );
        assert_eq!(
            FailReason::parse("rolled_back"),
            Some(FailReason::RolledBack)
        );
        // The retry is pushed like any other.
        assert_eq!(b.poll(T0 + 7_001).len(), 1);
        assert_eq!(state(&b, "d1"), RecordState::Pushed);
    }

    #[test]
    fn upgrade_timeout_counts_from_first_progress() {
        let mut b = batch(config(), &["d1"]);
        b.poll(T0);
        b.handle_reply("d1", "b7a1", 200, "", T0 + 1);
        // Pending for long: no clock yet.
        b.poll(T0 + 50_000);
        assert_eq!(state(&b, "d1"), RecordState::Pending);
        b.handle_progress("d1", &progress(Status::Downloading, 1), T0 + 50_000);
        b.poll(T0 + 69_999);
        assert_eq!(state(&b, "d1"), RecordState::Upgrading);
        b.poll(T0 + 70_000);
        let r = &b.records["d1"];
        assert_eq!(
            (r.state, r.reason),
            (RecordState::Failed, Some(FailReason::UpgradeTimeout))
        );
    }

    #[test]
    fn retries_wait_their_interval_and_are_bounded() {
        let mut cfg = config();
        cfg.retries = 2;
        let mut b = batch(cfg, &["d1"]);
        b.poll(T0);
        b.handle_reply("d1", "b7a1", 200, "", T0 + 1);
        b.handle_progress("d1", &progress(Status::VerifyFailed, 100), T0 + 2);
        let r = &b.records["d1"];
        assert_eq!(r.state, RecordState::AwaitingRetry);
        assert_eq!(r.reason, Some(FailReason::VerifyFailed));
        assert_eq!(r.deadline_ms, Some(T0 + 5_002));
        assert_eq!(b.next_wakeup(), Some(T0 + 5_002));
        assert!(b.poll(T0 + 5_001).is_empty());
        // A stray progress of the failed attempt does not revive it.
        assert!(!b.handle_progress("d1", &progress(Status::Downloading, 3), T0 + 5_001));
        let a = b.poll(T0 + 5_002);
        assert_eq!(a.len(), 1);
        let r = &b.records["d1"];
        assert_eq!(
            (r.state, r.attempts, r.msg_id.as_deref()),
            (RecordState::Pushed, 2, Some("b7a2"))
        );
        // Second failure: push failed; one retry left.
        b.poll(T0 + 15_002);
        assert_eq!(state(&b, "d1"), RecordState::AwaitingRetry);
        b.poll(T0 + 20_002);
        assert_eq!(b.records["d1"].attempts, 3);
        b.handle_reply("d1", "b7a3", 200, "", T0 + 20_003);
        b.handle_progress("d1", &progress(Status::DownloadFailed, 40), T0 + 20_004);
        let r = &b.records["d1"];
        assert_eq!(
            (r.state, r.reason),
            (RecordState::Failed, Some(FailReason::DownloadFailed))
        );
        assert_eq!(b.state, BatchState::Completed);
    }

    #[test]
    fn retry_then_success_keeps_the_last_failure() {
        let mut cfg = config();
        cfg.retries = 1;
        let mut b = batch(cfg, &["d1"]);
        b.poll(T0);
        b.handle_reply("d1", "b7a1", 200, "", T0 + 1);
        b.handle_progress("d1", &progress(Status::VerifyFailed, 100), T0 + 2);
        b.poll(T0 + 5_002);
        b.handle_reply("d1", "b7a2", 200, "", T0 + 5_003);
        b.handle_progress("d1", &progress(Status::Downloading, 5), T0 + 5_004);
        b.handle_inform("d1", "2.0.0", T0 + 6_000);
        let r = &b.records["d1"];
        assert_eq!(r.state, RecordState::Success);
        assert_eq!(r.reason, None);
        assert_eq!(r.last_failure, Some(FailReason::VerifyFailed));
        assert_eq!(r.attempts, 2);
    }

    #[test]
    fn late_ack_after_push_failed_resumes() {
        let mut cfg = config();
        cfg.retries = 1;
        let mut b = batch(cfg, &["d1"]);
        b.poll(T0);
        b.poll(T0 + 10_000);
        assert_eq!(state(&b, "d1"), RecordState::AwaitingRetry);
        assert!(b.handle_reply("d1", "b7a1", 200, "", T0 + 10_500));
        assert_eq!(state(&b, "d1"), RecordState::Pending);
    }

    #[test]
    fn rejection_codes() {
        let mut cfg = config();
        cfg.retries = 1;
        let mut b = batch(cfg.clone(), &["d1", "d2"]);
        b.poll(T0);
        b.handle_reply("d1", "b7a1", 412, "downgrade refused", T0 + 1);
        let r = &b.records["d1"];
        assert_eq!(
            (r.state, r.reason),
            (RecordState::Failed, Some(FailReason::Rejected))
        );
        assert!(r.desc.contains("412"));
        b.handle_reply("d2", "b7a1", 409, "busy", T0 + 1);
        assert_eq!(state(&b, "d2"), RecordState::AwaitingRetry);
    }

    #[test]
    fn no_retry_beyond_validity() {
        let mut cfg = config();
        cfg.retries = 5;
        cfg.validity_ms = 12_000;
        let mut b = batch(cfg, &["d1"]);
        b.poll(T0);
        // Push failed at +10 s; a retry at +15 s would be past the validity end (+12 s).
        b.poll(T0 + 10_000);
        let r = &b.records["d1"];
        assert_eq!(
            (r.state, r.reason),
            (RecordState::Failed, Some(FailReason::PushFailed))
        );
    }

    #[test]
    fn validity_expiry() {
        let mut cfg = config();
        cfg.validity_ms = 30_000;
        cfg.retries = 1;
        cfg.retry_interval_ms = 1_000;
        let mut b = batch(cfg, &["wait", "pend", "up", "late"]);
        b.poll(T0);
        // "late" was never pushed in time: simulate a batch loaded after its end.
        b.records.get_mut("late").unwrap().state = RecordState::ToPush;
        b.handle_reply("pend", "b7a1", 200, "", T0 + 1);
        b.handle_reply("up", "b7a1", 200, "", T0 + 1);
        b.handle_progress("up", &progress(Status::Downloading, 1), T0 + 25_000);
        b.handle_reply("wait", "b7a1", 409, "busy", T0 + 28_000);
        assert_eq!(state(&b, "wait"), RecordState::AwaitingRetry);
        assert!(
            b.poll(T0 + 30_000).is_empty(),
            "nothing pushed past the end"
        );
        assert_eq!(state(&b, "late"), RecordState::Failed);
        assert_eq!(b.records["late"].reason, Some(FailReason::BatchTerminated));
        assert_eq!(b.records["wait"].reason, Some(FailReason::Rejected));
        assert_eq!(state(&b, "wait"), RecordState::Failed);
        assert_eq!(b.records["pend"].reason, Some(FailReason::UpgradeTimeout));
        // An upgrade already running may still finish after the end.
        assert_eq!(state(&b, "up"), RecordState::Upgrading);
        assert_eq!(b.state, BatchState::InProgress);
        b.handle_inform("up", "2.0.0", T0 + 31_000);
        assert_eq!(state(&b, "up"), RecordState::Success);
        assert_eq!(
            b.state,
            BatchState::Terminated,
            "expired with devices unfinished"
        );
    }

    #[test]
    fn terminate_fails_the_unfinished() {
        let mut b = batch(config(), &["d1", "d2"]);
        b.poll(T0);
        b.handle_reply("d1", "b7a1", 200, "", T0 + 1);
        b.handle_progress("d1", &progress(Status::Downloading, 1), T0 + 2);
        b.handle_inform("d1", "2.0.0", T0 + 3);
        assert!(b.terminate(T0 + 4));
        assert_eq!(b.state, BatchState::Terminated);
        assert_eq!(state(&b, "d1"), RecordState::Success);
        let r = &b.records["d2"];
        assert_eq!(
            (r.state, r.reason),
            (RecordState::Failed, Some(FailReason::BatchTerminated))
        );
        assert!(!b.terminate(T0 + 5));
        assert!(b.poll(T0 + 100_000).is_empty());
        assert!(!b.handle_inform("d2", "2.0.0", T0 + 6));
    }

    #[test]
    fn inform_of_target_succeeds_from_any_unfinished_state() {
        let mut b = batch(config(), &["d1", "d2"]);
        assert!(b.handle_inform("d1", "2.0.0", T0));
        assert_eq!(state(&b, "d1"), RecordState::Success);
        b.poll(T0);
        assert!(b.handle_inform("d2", "2.0.0", T0 + 1));
        assert_eq!(b.state, BatchState::Completed);
        // Devices outside the batch are ignored.
        assert!(!b.handle_inform("zz", "2.0.0", T0 + 2));
    }

    #[test]
    fn progress_for_another_version_is_ignored() {
        let mut b = batch(config(), &["d1"]);
        b.poll(T0);
        let mut p = progress(Status::Downloading, 10);
        p.firmware_version = "3.0.0".into();
        assert!(!b.handle_progress("d1", &p, T0 + 1));
        assert_eq!(state(&b, "d1"), RecordState::Pushed);
        // Progress without an ack seen implies the ack.
        assert!(b.handle_progress("d1", &progress(Status::Downloading, 10), T0 + 1));
        assert_eq!(state(&b, "d1"), RecordState::Upgrading);
    }

    /// A busy device rejects a malformed command and reports the failure with
    /// an empty version: the running record must not fail.
    #[test]
    fn progress_without_a_version_is_ignored() {
        let mut b = batch(config(), &["d1"]);
        b.poll(T0);
        assert!(b.handle_reply("d1", "b7a1", 200, "", T0 + 1));
        assert!(b.handle_progress("d1", &progress(Status::Downloading, 40), T0 + 2));
        b.take_dirty();
        for status in [
            Status::UpgradeFailed,
            Status::DownloadFailed,
            Status::Downloading,
        ] {
            let mut p = progress(status, 0);
            p.firmware_version = String::new();
            p.desc = "missing field firmwareVersion".into();
            assert!(!b.handle_progress("d1", &p, T0 + 3), "{status:?}");
        }
        let rec = &b.records["d1"];
        assert_eq!(
            (rec.state, rec.status, rec.progress, rec.reason),
            (RecordState::Upgrading, Some(1), 40, None)
        );
        assert_eq!(b.take_dirty(), (vec![], false), "nothing changed");
        // Its own failure still counts.
        assert!(b.handle_progress("d1", &progress(Status::VerifyFailed, 100), T0 + 4));
        assert_eq!(b.records["d1"].last_failure, Some(FailReason::VerifyFailed));
    }

    #[test]
    fn dirty_tracking() {
        let mut b = batch(config(), &["d1", "d2"]);
        let (d, batch_row) = b.take_dirty();
        assert_eq!((d.len(), batch_row), (2, true));
        assert_eq!(b.take_dirty(), (vec![], false));
        b.poll(T0);
        b.take_dirty();
        b.handle_reply("d2", "b7a1", 200, "", T0 + 1);
        assert_eq!(b.take_dirty(), (vec!["d2".to_string()], false));
        b.mark_dirty(["d1".to_string()], true);
        b.handle_reply("d1", "b7a1", 200, "", T0 + 2);
        assert_eq!(b.take_dirty(), (vec!["d1".to_string()], true));
    }

    #[test]
    fn eligibility() {
        let known = vec![
            DeviceInfo {
                device: "a".into(),
                version: "1.0.0".into(),
            },
            DeviceInfo {
                device: "b".into(),
                version: "2.0.0".into(),
            },
            DeviceInfo {
                device: "c".into(),
                version: "1.0.0".into(),
            },
        ];
        let busy = BTreeMap::from([("c".to_string(), 3)]);
        let (ok, ex) = select_devices("2.0.0", None, &known, &busy);
        assert_eq!(ok, vec!["a".to_string()]);
        assert_eq!(
            ex,
            vec![
                ("b".to_string(), Exclusion::AlreadyOnVersion),
                ("c".to_string(), Exclusion::InRunningBatch(3))
            ]
        );
        let list = vec!["a".to_string(), "ghost".to_string(), "a".to_string()];
        let (ok, ex) = select_devices("2.0.0", Some(&list), &known, &busy);
        assert_eq!(ok, vec!["a".to_string()]);
        assert_eq!(ex, vec![("ghost".to_string(), Exclusion::NeverSeen)]);
        assert!(Exclusion::InRunningBatch(3).to_string().contains('3'));
    }

    #[test]
    fn names_round_trip() {
        for s in RecordState::ALL {
            assert_eq!(RecordState::parse(s.as_str()), Some(s));
        }
        for r in FailReason::ALL {
            assert_eq!(FailReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(FailReason::PushFailed.to_string(), "push failed");
        assert_eq!(
            BatchState::parse("terminated"),
            Some(BatchState::Terminated)
        );
    }
}
