//! The OTA engine: commands in, replies, reports and events out.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::fetch::Throttle;
use crate::manifest::TrustStore;
use crate::protocol::{
    self, Firmware, GetReply, Limits, Progress, Rejection, ReplyCode, Status, Topics,
    UpgradeCommand,
};

/// Engine settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The device's topics.
    pub topics: Topics,
    /// Validation limits for commands and get replies.
    pub limits: Limits,
    /// Progress throttling for downloads ([`crate::Fetch`]).
    pub throttle: Throttle,
    /// How long a firmware get waits for its reply.
    pub get_timeout: Duration,
    /// Refuse (412) a command whose version is lower than the current one.
    pub refuse_downgrade: bool,
    /// The device's product key (a signed manifest must name it).
    pub product_key: String,
    /// Pinned keys and revoked key ids: with a key pinned, only signed
    /// firmware is accepted (PROTOCOL.md, "Signed manifests").
    pub trust: TrustStore,
    /// Hold the 200 reply of an accepted command until
    /// [`Ota::acknowledge`]: a device that journals the command first
    /// replies only once a power cut can no longer lose it.
    pub ack_after_journal: bool,
}

impl Config {
    /// Defaults for device `device_name` of product `product_key`: `/sys` topics,
    /// 4 GiB size limit, 5-point/1-second throttle, 10 s get timeout, downgrades allowed.
    pub fn new(product_key: &str, device_name: &str) -> Config {
        Config {
            topics: Topics::new(product_key, device_name),
            limits: Limits::default(),
            throttle: Throttle::default(),
            get_timeout: Duration::from_secs(10),
            refuse_downgrade: false,
            product_key: product_key.to_owned(),
            trust: TrustStore::default(),
            ack_after_journal: false,
        }
    }
}

/// An action for the driver, from [`Ota::poll_output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Subscribe to this topic with QoS 1.
    Subscribe {
        /// Topic filter.
        topic: String,
    },
    /// Publish this payload with QoS 1.
    Publish {
        /// Topic.
        topic: String,
        /// JSON payload.
        payload: Vec<u8>,
    },
    /// Tell the application.
    Event(Event),
}

/// Something the application should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An upgrade command was accepted (and acknowledged with 200): download it.
    Upgrade(UpgradeCommand),
    /// A command was rejected; the reply (and a failure report) are already queued.
    Rejected {
        /// The command's msgId, when it could be read.
        msg_id: Option<String>,
        /// Why.
        rejection: Rejection,
    },
    /// The reply to a [`Ota::request_firmware_info`].
    FirmwareInfo(GetReply),
    /// A firmware get had no reply in time.
    GetTimedOut {
        /// The request's msgId.
        msg_id: String,
        /// The version asked for.
        version: String,
    },
}

#[derive(Debug, Clone)]
struct PendingGet {
    msg_id: String,
    version: String,
    deadline: Instant,
}

/// The sans-IO OTA engine of one device. See the crate docs for the drive contract.
#[derive(Debug)]
pub struct Ota {
    config: Config,
    version: String,
    next_id: u64,
    outputs: VecDeque<Output>,
    /// The firmware of the upgrade in progress, from acceptance to a terminal report.
    job: Option<Firmware>,
    gets: Vec<PendingGet>,
    /// Between [`Ota::handle_connected`] and [`Ota::handle_disconnected`].
    online: bool,
    /// The outcome of the start decision, sent before the first inform.
    start_report: Option<Progress>,
    /// The security counter of the running firmware (signed manifests).
    security_counter: u64,
    /// Bytes free where downloads go, when the driver measures it.
    free_space: Option<u64>,
    /// The accepted command whose 200 waits for [`Ota::acknowledge`].
    pending_ack: Option<String>,
    /// The last report of the current job. The platform never sees an
    /// upgrade's status or percent go back, however many reporters there
    /// are (the SDK's own and the application's): see
    /// [`Ota::publish_progress`].
    last_report: Option<Progress>,
}

impl Ota {
    /// An engine for a device currently running `version`.
    pub fn new(config: Config, version: &str) -> Result<Ota, Error> {
        protocol::validate_version(version).map_err(|r| Error::InvalidParam(r.message))?;
        let mut ota = Ota::unversioned(config);
        ota.version = version.to_owned();
        Ok(ota)
    }

    /// An engine whose version is not known yet: the C API's `iot_ota_init`,
    /// where the application reports the version afterwards. Until then
    /// [`Ota::version`] is empty and downgrades cannot be judged.
    pub fn unversioned(config: Config) -> Ota {
        Ota {
            config,
            version: String::new(),
            next_id: 0,
            outputs: VecDeque::new(),
            job: None,
            gets: Vec::new(),
            online: false,
            start_report: None,
            security_counter: 0,
            free_space: None,
            pending_ack: None,
            last_report: None,
        }
    }

    // ---- getters ----

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The device's topics.
    pub fn topics(&self) -> &Topics {
        &self.config.topics
    }

    /// The firmware version last reported (empty for an [`Ota::unversioned`]
    /// engine before its first report).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The firmware of the upgrade in progress, if any (accepted and not yet
    /// ended by a SUCCESS or failure report).
    pub fn job(&self) -> Option<&Firmware> {
        self.job.as_ref()
    }

    /// The security counter of the running firmware: a signed manifest with
    /// a lower one is refused (412, `counter A < B`). The device keeps it
    /// (the upgrade journal raises it at commit) and sets it at start.
    pub fn set_security_counter(&mut self, counter: u64) {
        self.security_counter = counter;
    }

    /// Bytes free on the filesystem downloads go to, as the driver last
    /// measured it (`None`: not measured). A command whose `size` does not
    /// fit is refused with 412 before anything is downloaded.
    pub fn set_free_space(&mut self, bytes: Option<u64>) {
        self.free_space = bytes;
    }

    /// The security counter set by [`Ota::set_security_counter`].
    pub fn security_counter(&self) -> u64 {
        self.security_counter
    }

    /// Replaces the pinned keys and revoked ids (the C API pins keys after
    /// `iot_ota_init`).
    pub fn set_trust(&mut self, trust: TrustStore) {
        self.config.trust = trust;
    }

    /// Holds (true) or sends at once (false) the 200 reply of an accepted
    /// command ([`Config::ack_after_journal`]). The C API turns it on once
    /// `iot_ota_set_state_dir` gives it a journal.
    pub fn set_ack_after_journal(&mut self, hold: bool) {
        self.config.ack_after_journal = hold;
    }

    // ---- handle_*: events from outside ----

    /// The MQTT session is (re)established. The device connects with a clean
    /// session, so the subscriptions are made again; and the platform may
    /// have missed the version while the device was away (or this is the
    /// start), so the running version is informed again, once a version is
    /// known. This is the one place of that rule: every driver (the async
    /// client, the C API) only calls this on CONNACK.
    pub fn handle_connected(&mut self) {
        self.online = true;
        for topic in [&self.config.topics.upgrade, &self.config.topics.get_reply] {
            self.outputs.push_back(Output::Subscribe {
                topic: topic.clone(),
            });
        }
        if let Some(report) = self.start_report.take() {
            self.queue_progress(&report);
        }
        if !self.version.is_empty() {
            self.publish_inform();
        }
    }

    /// The MQTT connection was lost (or closed). Nothing is published now;
    /// the next [`Ota::handle_connected`] subscribes and informs again.
    pub fn handle_disconnected(&mut self) {
        self.online = false;
    }

    /// True between [`Ota::handle_connected`] and [`Ota::handle_disconnected`].
    pub fn is_online(&self) -> bool {
        self.online
    }

    /// A message arrived. Returns false when the topic is not one of ours.
    pub fn handle_publish(&mut self, topic: &str, payload: &[u8], now: Instant) -> bool {
        if topic == self.config.topics.upgrade {
            self.handle_upgrade(payload);
            true
        } else if topic == self.config.topics.get_reply {
            self.handle_get_reply(payload, now);
            true
        } else {
            false
        }
    }

    /// Time has passed: expires firmware gets whose reply did not come.
    pub fn handle_timeout(&mut self, now: Instant) {
        // The C API calls this on every call: nothing due costs nothing.
        if self.gets.iter().all(|g| g.deadline > now) {
            return;
        }
        let (expired, pending): (Vec<_>, Vec<_>) =
            self.gets.drain(..).partition(|g| g.deadline <= now);
        self.gets = pending;
        for g in expired {
            self.outputs.push_back(Output::Event(Event::GetTimedOut {
                msg_id: g.msg_id,
                version: g.version,
            }));
        }
    }

    fn handle_upgrade(&mut self, payload: &[u8]) {
        let cmd = match protocol::parse_upgrade(payload, &self.limits()) {
            Ok(cmd) => cmd,
            // While busy, a bad command gets its reply but no failure report:
            // the platform would take the report as the running upgrade's.
            Err((msg_id, rejection)) if self.job.is_some() => {
                return self.reject_quietly(msg_id, rejection)
            }
            Err((msg_id, rejection)) => return self.reject(msg_id, None, rejection),
        };
        if let Some(job) = &self.job {
            // Busy: the running upgrade goes on, untouched.
            let rejection = Rejection {
                code: ReplyCode::Busy,
                message: format!("busy: upgrading to {}", job.version),
            };
            return self.reject_quietly(Some(cmd.msg_id), rejection);
        }
        if let Err(rejection) = self.check_policy(&cmd.firmware) {
            let version = cmd.firmware.version.clone();
            return self.reject(Some(cmd.msg_id), Some(version), rejection);
        }
        if self.config.ack_after_journal {
            self.pending_ack = Some(cmd.msg_id.clone());
        } else {
            self.publish_reply(&cmd.msg_id, ReplyCode::Accepted, "success");
        }
        self.start_job(cmd.firmware.clone());
        self.outputs.push_back(Output::Event(Event::Upgrade(cmd)));
    }

    fn check_policy(&self, fw: &Firmware) -> Result<(), Rejection> {
        if let (Some(size), Some(free)) = (fw.size, self.free_space) {
            if size > free {
                return Err(Rejection::refused(format!(
                    "size {size} does not fit: {free} bytes free where downloads go"
                )));
            }
        }
        self.config.trust.check(
            fw.signed.as_deref(),
            &self.config.product_key,
            &fw.version,
            fw.size,
            self.security_counter,
        )?;
        if self.config.refuse_downgrade
            && !self.version.is_empty()
            && compare_versions(&fw.version, &self.version).is_lt()
        {
            return Err(Rejection::refused(format!(
                "downgrade from {} to {} refused by device policy",
                self.version, fw.version
            )));
        }
        Ok(())
    }

    /// Replies with the rejection and reports UPGRADE_FAILED, so the platform's
    /// record fails with the reason instead of waiting for a timeout.
    fn reject(&mut self, msg_id: Option<String>, version: Option<String>, rejection: Rejection) {
        self.publish_reply(
            msg_id.as_deref().unwrap_or(""),
            rejection.code,
            &rejection.message,
        );
        let report = Progress {
            status: Status::UpgradeFailed,
            progress: 0,
            desc: rejection.message.clone(),
            firmware_version: version.unwrap_or_default(),
        };
        self.queue_progress(&report);
        self.outputs
            .push_back(Output::Event(Event::Rejected { msg_id, rejection }));
    }

    /// Replies with the rejection, without a failure report.
    fn reject_quietly(&mut self, msg_id: Option<String>, rejection: Rejection) {
        self.publish_reply(
            msg_id.as_deref().unwrap_or(""),
            rejection.code,
            &rejection.message,
        );
        self.outputs
            .push_back(Output::Event(Event::Rejected { msg_id, rejection }));
    }

    fn handle_get_reply(&mut self, payload: &[u8], _now: Instant) {
        let Some(reply) = protocol::parse_get_reply(payload, &self.limits()) else {
            return;
        };
        // Only replies to our own pending requests count: a stale or foreign
        // reply must not start a download.
        let Some(i) = self.gets.iter().position(|g| g.msg_id == reply.msg_id) else {
            return;
        };
        self.gets.remove(i);
        self.outputs
            .push_back(Output::Event(Event::FirmwareInfo(reply)));
    }

    // ---- mutators: the application's commands ----

    /// Reports the running firmware version (at every start and after an
    /// upgrade). While offline it is sent on the next connection.
    pub fn report_version(&mut self, version: &str) -> Result<(), Error> {
        protocol::validate_version(version).map_err(|r| Error::InvalidParam(r.message))?;
        self.version = version.to_owned();
        // Offline, the next connection informs it: one inform, and none
        // lost to a request queue that fills while the broker is away.
        if self.online {
            self.publish_inform();
        }
        Ok(())
    }

    fn publish_inform(&mut self) {
        let id = self.next_msg_id();
        let payload = protocol::encode_inform(&id, &self.version);
        self.publish(self.config.topics.inform.clone(), payload);
    }

    /// Reports a status and percent for the upgrade in progress (or, with no
    /// upgrade in progress, for the current version). A SUCCESS or failure
    /// status ends the upgrade: a new command is accepted after it.
    pub fn report_progress(
        &mut self,
        status: Status,
        progress: u32,
        desc: &str,
    ) -> Result<(), Error> {
        let firmware_version = self
            .job
            .as_ref()
            .map_or_else(|| self.version.clone(), |f| f.version.clone());
        self.publish_progress(&Progress {
            status,
            progress,
            desc: desc.to_owned(),
            firmware_version,
        })
    }

    /// Sends the held 200 reply of the accepted command `msg_id`
    /// ([`Config::ack_after_journal`]), once the device has journaled it.
    /// False when no reply of that command waits.
    pub fn acknowledge(&mut self, msg_id: &str) -> bool {
        if self.pending_ack.as_deref() != Some(msg_id) {
            return false;
        }
        self.pending_ack = None;
        self.publish_reply(msg_id, ReplyCode::Accepted, "success");
        true
    }

    /// Reports the outcome of the device's start decision (see
    /// [`crate::journal::decide_at_start`]): SUCCESS (4) 100 of an upgrade
    /// just committed, or the UPGRADE_FAILED (-1) `rolled back: ...` of one
    /// that was not. PROTOCOL.md wants it before the inform of the running
    /// version, so it goes out on the next connection, just before that
    /// inform (at once when online). It ends no upgrade of this engine: the
    /// upgrade it reports was begun by an earlier boot.
    pub fn report_at_start(&mut self, report: Progress) -> Result<(), Error> {
        check_progress(&report)?;
        if self.online {
            self.queue_progress(&report);
        } else {
            self.start_report = Some(report);
        }
        Ok(())
    }

    /// Publishes a ready-made report (from [`crate::Fetch`]); same rules as
    /// [`Ota::report_progress`].
    ///
    /// An upgrade only moves forward: DOWNLOADING, DOWNLOADED, UPGRADING,
    /// then SUCCESS or a failure. So during an upgrade a non-terminal
    /// report is not sent (`Ok`, nothing published) when its status is
    /// before the last one's, when it has the last one's status and a lower
    /// percent, or when it repeats the last report exactly. The SDK's
    /// automatic DOWNLOADING reports and an application's own (the vendor
    /// guide reports after every chunk) may then interleave freely, and
    /// the platform sees each percent once, never going back. Once an
    /// upgrade has ended (SUCCESS or a failure), non-terminal reports are
    /// not sent until the next upgrade begins: an application still in its
    /// download loop must not make an ended upgrade look alive again.
    pub fn publish_progress(&mut self, report: &Progress) -> Result<(), Error> {
        check_progress(report)?;
        if !report.status.is_terminal() {
            if let Some(last) = &self.last_report {
                let (before, now) = (last.status as i32, report.status as i32);
                let ended = last.status.is_terminal();
                let back = now < before || (now == before && report.progress < last.progress);
                if ended || back || last == report {
                    return Ok(());
                }
            }
        }
        if self.job.is_some() {
            self.last_report = Some(report.clone());
        }
        self.queue_progress(report);
        if report.status.is_terminal() {
            self.job = None;
            // The report says what the reply would have (the platform
            // takes a report as the ack).
            self.pending_ack = None;
        }
        Ok(())
    }

    /// Asks the platform for firmware `version` of this product. Returns the
    /// request's msgId; the answer comes as [`Event::FirmwareInfo`] or
    /// [`Event::GetTimedOut`].
    pub fn request_firmware_info(&mut self, version: &str, now: Instant) -> Result<String, Error> {
        protocol::validate_version(version).map_err(|r| Error::InvalidParam(r.message))?;
        let id = self.next_msg_id();
        let payload = protocol::encode_get(&id, version);
        self.publish(self.config.topics.get.clone(), payload);
        self.gets.push(PendingGet {
            msg_id: id.clone(),
            version: version.to_owned(),
            deadline: now + self.config.get_timeout,
        });
        Ok(id)
    }

    /// Starts an upgrade to a firmware the device asked for (a get reply), as
    /// if a command had brought it. No reply is sent: there was no command.
    pub fn accept_firmware(&mut self, firmware: &Firmware) -> Result<(), Error> {
        if let Some(job) = &self.job {
            return Err(Error::Busy {
                version: job.version.clone(),
            });
        }
        self.check_policy(firmware).map_err(Error::Rejected)?;
        self.start_job(firmware.clone());
        Ok(())
    }

    /// Abandons the upgrade in progress, reporting UPGRADE_FAILED with `desc`.
    /// Does nothing when no upgrade is in progress.
    pub fn abort(&mut self, desc: &str) {
        if self.job.is_some() {
            // Progress 0 is always in range; publish_progress cannot fail here.
            let _ = self.report_progress(Status::UpgradeFailed, 0, desc);
        }
    }

    // ---- poll_*: what the driver must do ----

    /// The next action for the driver. Drain it after every call to a
    /// `handle_*` method or a mutator.
    #[must_use = "the driver must carry out every output"]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Ota::handle_timeout`] must next be called, if ever.
    #[must_use = "the driver must carry out every output"]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.gets.iter().map(|g| g.deadline).min()
    }

    // ---- helpers ----

    /// The parsing limits: manifests are read only when a key is pinned.
    fn limits(&self) -> protocol::Limits {
        protocol::Limits {
            signed_manifests: self.config.trust.is_enforced(),
            ..self.config.limits.clone()
        }
    }

    /// A new job: fresh report bookkeeping.
    fn start_job(&mut self, firmware: Firmware) {
        self.job = Some(firmware);
        self.last_report = None;
    }

    fn next_msg_id(&mut self) -> String {
        self.next_id += 1;
        self.next_id.to_string()
    }

    fn publish(&mut self, topic: String, payload: Vec<u8>) {
        self.outputs.push_back(Output::Publish { topic, payload });
    }

    fn publish_reply(&mut self, msg_id: &str, code: ReplyCode, message: &str) {
        let payload = protocol::encode_upgrade_reply(msg_id, code, message);
        self.publish(self.config.topics.upgrade_reply.clone(), payload);
    }

    fn queue_progress(&mut self, report: &Progress) {
        let id = self.next_msg_id();
        let payload = protocol::encode_progress(&id, report);
        self.publish(self.config.topics.progress.clone(), payload);
    }
}

/// A report's percent is 0-100.
fn check_progress(report: &Progress) -> Result<(), Error> {
    if report.progress > 100 {
        return Err(Error::InvalidParam(format!(
            "progress {} is above 100",
            report.progress
        )));
    }
    Ok(())
}

/// Compares two versions part by part: runs of digits numerically, other runs
/// as text (`1.10` > `1.9`, `2.0.1` > `2.0`, `1.0-rc1` < `1.0-rc2`).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn parts(s: &str) -> impl Iterator<Item = &str> {
        s.split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|p| !p.is_empty())
    }
    let mut pa = parts(a);
    let mut pb = parts(b);
    loop {
        match (pa.next(), pb.next()) {
            (None, None) => return Ordering::Equal,
            (Some(_), None) => return Ordering::Greater,
            (None, Some(_)) => return Ordering::Less,
            (Some(x), Some(y)) => {
                let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(nx), Ok(ny)) => nx.cmp(&ny),
                    _ => x.cmp(y),
                };
                if ord.is_ne() {
                    return ord;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::SignMethod;
    use serde_json::Value;

    const MD5: &str = "9e107d9d372bb6826bd81d3542a419d6";

    fn ota() -> Ota {
        Ota::new(Config::new("pk", "dev"), "1.0").unwrap()
    }

    fn command(id: &str, version: &str) -> Vec<u8> {
        format!(
            r#"{{"msgId":"{id}","version":"1.0","data":{{"policy":"standard","size":10,"firmwareVersion":"{version}","url":"http://h/f","sign":"{MD5}","signMethod":"Md5"}}}}"#
        )
        .into_bytes()
    }

    fn drain(ota: &mut Ota) -> Vec<Output> {
        std::iter::from_fn(|| ota.poll_output()).collect()
    }

    /// The publishes among `out`, as (topic suffix, JSON).
    fn published(out: &[Output]) -> Vec<(String, Value)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Publish { topic, payload } => Some((
                    topic.rsplit('/').next().unwrap().to_owned(),
                    serde_json::from_slice(payload).unwrap(),
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn subscribes_and_informs_on_every_connect() {
        let mut o = ota();
        for _ in 0..2 {
            o.handle_connected();
            let out = drain(&mut o);
            assert_eq!(
                out[..2],
                [
                    Output::Subscribe {
                        topic: "/sys/pk/dev/ota/firmware/upgrade".into()
                    },
                    Output::Subscribe {
                        topic: "/sys/pk/dev/ota/firmware/get_reply".into()
                    },
                ]
            );
            let p = published(&out);
            assert_eq!(p.len(), 1);
            assert_eq!(p[0].0, "inform");
            assert_eq!(p[0].1["data"]["firmwareVersion"], "1.0");
            o.handle_disconnected();
            assert!(!o.is_online());
        }
    }

    #[test]
    fn an_unversioned_engine_informs_once_reported() {
        let mut o = Ota::unversioned(Config::new("pk", "dev"));
        o.handle_connected();
        assert!(published(&drain(&mut o)).is_empty());
        o.report_version("3.1").unwrap();
        assert_eq!(published(&drain(&mut o)).len(), 1);
        o.handle_disconnected();
        o.handle_connected();
        let p = published(&drain(&mut o));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].1["data"]["firmwareVersion"], "3.1");
    }

    #[test]
    fn an_inform_while_offline_goes_out_once_on_connect() {
        // The C API's usual order: iot_ota_report_firmware_version before the
        // connection is up. The inform goes out on connect, once.
        let mut o = Ota::unversioned(Config::new("pk", "dev"));
        o.report_version("3.1").unwrap();
        assert!(published(&drain(&mut o)).is_empty());
        o.handle_connected();
        let p = published(&drain(&mut o));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].1["data"]["firmwareVersion"], "3.1");
        // Reported again while away: sent by the reconnect, once.
        o.handle_disconnected();
        o.report_version("3.2").unwrap();
        assert!(published(&drain(&mut o)).is_empty());
        o.handle_connected();
        let p = published(&drain(&mut o));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].1["data"]["firmwareVersion"], "3.2");
    }

    #[test]
    fn the_start_report_goes_out_once_before_the_first_inform() {
        let mut o = Ota::new(Config::new("pk", "dev"), "2.0").unwrap();
        let report = Progress {
            status: Status::Success,
            progress: 100,
            desc: String::new(),
            firmware_version: "2.0".into(),
        };
        let report_clone = report.clone();
        o.report_at_start(report.clone()).unwrap();
        assert!(drain(&mut o).is_empty(), "nothing while offline");
        o.handle_connected();
        let p = published(&drain(&mut o));
        let kinds: Vec<_> = p.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(kinds, ["progress", "inform"]);
        assert_eq!(p[0].1["data"]["status"], 4);
        assert_eq!(p[0].1["data"]["firmwareVersion"], "2.0");
        assert!(o.job().is_none(), "it reports an earlier boot's upgrade");
        // Not again on a reconnect: the inform alone.
        o.handle_disconnected();
        o.handle_connected();
        let p = published(&drain(&mut o));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, "inform");
        // Online, it goes out at once.
        o.report_at_start(report).unwrap();
        assert_eq!(published(&drain(&mut o))[0].0, "progress");
        let bad = Progress {
            progress: 101,
            ..report_clone
        };
        assert!(o.report_at_start(bad).is_err());
    }

    #[test]
    fn with_a_pinned_key_only_signed_firmware_is_accepted() {
        use crate::manifest::{test_keys::Ed, Manifest, Signed, TrustStore};
        let key = Ed::new();
        let mut config = Config::new("pk", "dev");
        config.trust = TrustStore {
            keys: vec![key.public()],
            revoked: Vec::new(),
        };
        let mut o = Ota::new(config, "1.0").unwrap();
        o.set_security_counter(5);
        let topic = "/sys/pk/dev/ota/firmware/upgrade";
        let now = Instant::now();
        // The seed's unsigned command: 412, and the failure report.
        assert!(o.handle_publish(topic, &command("1", "2.0"), now));
        let p = published(&drain(&mut o));
        assert_eq!(p[0].1["code"], 412);
        let msg = p[0].1["message"].as_str().unwrap();
        assert!(msg.contains("unsigned firmware"), "{msg}");
        assert_eq!(p[1].1["data"]["status"], -1);
        // Signed, with the command's facts: accepted.
        let signed = |counter| {
            let m = Manifest {
                product: "pk".into(),
                firmware_version: "2.0".into(),
                size: 10,
                sha256: "cd".repeat(32),
                counter,
                index_sha256: None,
            };
            let s = Signed::sign(m, &[&key]).unwrap();
            let mut v: Value = serde_json::from_slice(&command("2", "2.0")).unwrap();
            for (k, f) in s.to_fields() {
                v["data"][k] = f;
            }
            v.to_string().into_bytes()
        };
        assert!(o.handle_publish(topic, &signed(4), now));
        let p = published(&drain(&mut o));
        let msg = p[0].1["message"].as_str().unwrap();
        assert!(msg.contains("counter 4 < 5"), "{msg}");
        assert!(o.handle_publish(topic, &signed(5), now));
        let out = drain(&mut o);
        assert_eq!(published(&out)[0].1["code"], 200);
        assert!(matches!(&out[1], Output::Event(Event::Upgrade(c)) if c.firmware.signed.is_some()));
    }

    #[test]
    fn progress_never_goes_back_with_two_reporters() {
        let mut o = ota();
        let topic = "/sys/pk/dev/ota/firmware/upgrade";
        assert!(o.handle_publish(topic, &command("1", "2.0"), Instant::now()));
        drain(&mut o);
        // The SDK's automatic reports and the application's own, as the
        // vendor guide's loop sends them, interleaved out of order.
        let sent = [
            (Status::Downloading, 0),
            (Status::Downloading, 40),
            (Status::Downloading, 38),
            (Status::Downloading, 40),
            (Status::Downloading, 100),
            (Status::Downloading, 4),
            (Status::Downloaded, 100),
            (Status::Downloading, 100),
            (Status::Upgrading, 50),
            (Status::Downloaded, 100),
            (Status::Upgrading, 10),
            (Status::Upgrading, 100),
            (Status::Success, 100),
        ];
        for (status, pct) in sent {
            o.report_progress(status, pct, "").unwrap();
        }
        let seen: Vec<(i64, i64)> = published(&drain(&mut o))
            .iter()
            .map(|(_, v)| {
                let d = &v["data"];
                (
                    d["status"].as_i64().unwrap(),
                    d["progress"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (1, 0),
                (1, 40),
                (1, 100),
                (2, 100),
                (3, 50),
                (3, 100),
                (4, 100)
            ]
        );
        // Ended: the application's late reports are not sent.
        o.report_progress(Status::Downloading, 70, "").unwrap();
        assert!(published(&drain(&mut o)).is_empty());
        // A new job starts afresh: its DOWNLOADING 0 goes out.
        assert!(o.handle_publish(topic, &command("2", "3.0"), Instant::now()));
        drain(&mut o);
        o.report_progress(Status::Downloading, 0, "").unwrap();
        assert_eq!(published(&drain(&mut o))[0].1["data"]["progress"], 0);
    }

    #[test]
    fn the_reply_can_wait_for_the_journal() {
        let mut config = Config::new("pk", "dev");
        config.ack_after_journal = true;
        let mut o = Ota::new(config, "1.0").unwrap();
        let topic = "/sys/pk/dev/ota/firmware/upgrade";
        assert!(o.handle_publish(topic, &command("5", "2.0"), Instant::now()));
        let out = drain(&mut o);
        assert!(published(&out).is_empty(), "no reply before the journal");
        assert!(matches!(&out[0], Output::Event(Event::Upgrade(_))));
        assert!(!o.acknowledge("4"), "another command's");
        assert!(o.acknowledge("5"));
        let p = published(&drain(&mut o));
        assert_eq!(
            (p[0].0.as_str(), p[0].1["code"].as_i64()),
            ("upgrade_reply", Some(200))
        );
        assert_eq!(p[0].1["msgId"], "5");
        assert!(!o.acknowledge("5"), "once");
    }

    #[test]
    fn without_a_pinned_key_manifest_fields_are_ignored() {
        let mut o = ota();
        let mut v: Value = serde_json::from_slice(&command("1", "2.0")).unwrap();
        v["data"]["manifest"] = Value::String("not base64 %%".into());
        v["data"]["signatures"] = Value::String("nor this".into());
        let topic = "/sys/pk/dev/ota/firmware/upgrade";
        assert!(o.handle_publish(topic, v.to_string().as_bytes(), Instant::now()));
        let out = drain(&mut o);
        assert_eq!(published(&out)[0].1["code"], 200, "the seed's behaviour");
        assert!(matches!(&out[1], Output::Event(Event::Upgrade(c)) if c.firmware.signed.is_none()));
    }

    #[test]
    fn a_command_that_cannot_fit_is_refused_before_the_download() {
        let mut o = ota();
        o.set_free_space(Some(9));
        let topic = "/sys/pk/dev/ota/firmware/upgrade";
        assert!(o.handle_publish(topic, &command("1", "2.0"), Instant::now()));
        let p = published(&drain(&mut o));
        assert_eq!(p[0].1["code"], 412);
        let msg = p[0].1["message"].as_str().unwrap();
        assert!(msg.contains("does not fit: 9 bytes free"), "{msg}");
        o.set_free_space(Some(10));
        assert!(o.handle_publish(topic, &command("2", "2.0"), Instant::now()));
        assert_eq!(published(&drain(&mut o))[0].1["code"], 200);
    }

    #[test]
    fn accepts_then_busy_then_accepts_after_terminal() {
        let mut o = ota();
        let now = Instant::now();
        assert!(o.handle_publish(
            "/sys/pk/dev/ota/firmware/upgrade",
            &command("1", "2.0"),
            now
        ));
        let out = drain(&mut o);
        let p = published(&out);
        assert_eq!(p[0].0, "upgrade_reply");
        assert_eq!(p[0].1["code"], 200);
        assert_eq!(p[0].1["msgId"], "1");
        assert!(matches!(&out[1], Output::Event(Event::Upgrade(c)) if c.firmware.version == "2.0"));
        assert_eq!(o.job().unwrap().version, "2.0");

        // Duplicate while busy: 409 and nothing else.
        o.handle_publish(
            "/sys/pk/dev/ota/firmware/upgrade",
            &command("2", "2.0"),
            now,
        );
        let out = drain(&mut o);
        let p = published(&out);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].1["code"], 409);
        assert_eq!(p[0].1["msgId"], "2");
        assert!(matches!(&out[1], Output::Event(Event::Rejected { .. })));
        assert_eq!(o.job().unwrap().version, "2.0");

        // A malformed command while busy: 400, and no failure report that
        // the platform would pin on the running upgrade.
        o.handle_publish("/sys/pk/dev/ota/firmware/upgrade", br#"{"msgId":"x"}"#, now);
        let p = published(&drain(&mut o));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            (p[0].0.as_str(), p[0].1["code"].as_i64()),
            ("upgrade_reply", Some(400))
        );
        assert_eq!(o.job().unwrap().version, "2.0");

        // Non-terminal reports keep the job; a terminal one ends it.
        o.report_progress(Status::Upgrading, 50, "").unwrap();
        assert!(o.job().is_some());
        o.report_progress(Status::Success, 100, "").unwrap();
        assert!(o.job().is_none());
        let p = published(&drain(&mut o));
        assert_eq!(p[1].1["data"]["status"], 4);
        assert_eq!(p[1].1["data"]["firmwareVersion"], "2.0");

        o.handle_publish(
            "/sys/pk/dev/ota/firmware/upgrade",
            &command("3", "3.0"),
            now,
        );
        assert_eq!(published(&drain(&mut o))[0].1["code"], 200);
    }

    #[test]
    fn rejection_replies_and_reports_failure() {
        let mut o = ota();
        o.handle_publish(
            "/sys/pk/dev/ota/firmware/upgrade",
            br#"{"msgId":7,"data":{}}"#,
            Instant::now(),
        );
        let out = drain(&mut o);
        let p = published(&out);
        assert_eq!(p[0].0, "upgrade_reply");
        assert_eq!(p[0].1["msgId"], "7");
        assert_eq!(p[0].1["code"], 400);
        assert_eq!(p[0].1["message"], "missing field firmwareVersion");
        assert_eq!(p[1].0, "progress");
        assert_eq!(p[1].1["data"]["status"], -1);
        assert_eq!(p[1].1["data"]["desc"], "missing field firmwareVersion");
        assert!(o.job().is_none());
    }

    #[test]
    fn downgrade_policy() {
        let mut cfg = Config::new("pk", "dev");
        cfg.refuse_downgrade = true;
        let mut o = Ota::new(cfg, "1.10").unwrap();
        o.handle_publish(
            "/sys/pk/dev/ota/firmware/upgrade",
            &command("1", "1.9"),
            Instant::now(),
        );
        let p = published(&drain(&mut o));
        assert_eq!(p[0].1["code"], 412);
        assert_eq!(p[1].1["data"]["firmwareVersion"], "1.9");
        o.handle_publish(
            "/sys/pk/dev/ota/firmware/upgrade",
            &command("2", "1.11"),
            Instant::now(),
        );
        assert_eq!(published(&drain(&mut o))[0].1["code"], 200);
    }

    #[test]
    fn get_matches_msg_id_and_times_out() {
        let mut o = ota();
        let t = Instant::now();
        let id = o.request_firmware_info("2.0", t).unwrap();
        let p = published(&drain(&mut o));
        assert_eq!(p[0].0, "get");
        assert_eq!(p[0].1["data"]["firmwareVersion"], "2.0");
        assert_eq!(o.poll_timeout(), Some(t + Duration::from_secs(10)));

        // A reply to someone else's request is ignored.
        let foreign = protocol::encode_get_not_found("999", "2.0");
        o.handle_publish("/sys/pk/dev/ota/firmware/get_reply", &foreign, t);
        assert!(drain(&mut o).is_empty());

        let reply = protocol::encode_get_not_found(&id, "2.0");
        o.handle_publish("/sys/pk/dev/ota/firmware/get_reply", &reply, t);
        let out = drain(&mut o);
        let Output::Event(Event::FirmwareInfo(r)) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(r.result.as_ref().unwrap_err().code, 404);
        assert_eq!(o.poll_timeout(), None);

        let id2 = o.request_firmware_info("3.0", t).unwrap();
        drain(&mut o);
        o.handle_timeout(t + Duration::from_secs(9));
        assert!(drain(&mut o).is_empty());
        o.handle_timeout(t + Duration::from_secs(10));
        assert_eq!(
            drain(&mut o),
            vec![Output::Event(Event::GetTimedOut {
                msg_id: id2,
                version: "3.0".into()
            })]
        );
    }

    #[test]
    fn accept_firmware_from_get() {
        let mut o = ota();
        let fw = Firmware {
            version: "2.0".into(),
            url: "http://h/f".into(),
            size: None,
            sign: MD5.into(),
            sign_method: SignMethod::Md5,
            policy: None,
            signed: None,
            delta: None,
        };
        o.accept_firmware(&fw).unwrap();
        assert!(matches!(o.accept_firmware(&fw), Err(Error::Busy { .. })));
        o.abort("cancelled");
        let p = published(&drain(&mut o));
        assert_eq!(p[0].1["data"]["status"], -1);
        assert!(o.job().is_none());
    }

    #[test]
    fn bad_mutator_params() {
        let mut o = ota();
        assert!(matches!(
            o.report_progress(Status::Downloading, 101, ""),
            Err(Error::InvalidParam(_))
        ));
        assert!(matches!(o.report_version(""), Err(Error::InvalidParam(_))));
        assert!(matches!(
            o.request_firmware_info(" x", Instant::now()),
            Err(Error::InvalidParam(_))
        ));
        assert!(Ota::new(Config::new("pk", "dev"), "").is_err());
        o.report_version("1.1").unwrap();
        // Offline: the connection informs the version last reported.
        o.handle_connected();
        let p = published(&drain(&mut o));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, "inform");
        assert_eq!(p[0].1["data"]["firmwareVersion"], "1.1");
        assert_eq!(p[0].1["msgId"], "1");
    }

    #[test]
    fn ignores_foreign_topics() {
        let mut o = ota();
        assert!(!o.handle_publish(
            "/sys/pk/other/ota/firmware/upgrade",
            &command("1", "2"),
            Instant::now()
        ));
        assert!(drain(&mut o).is_empty());
    }

    #[test]
    fn version_order() {
        assert!(compare_versions("1.10", "1.9").is_gt());
        assert!(compare_versions("2.0.1", "2.0").is_gt());
        assert!(compare_versions("1.0-rc1", "1.0-rc2").is_lt());
        assert!(compare_versions("1.0", "1.0").is_eq());
    }
}
