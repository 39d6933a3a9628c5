//! The platform side of a device test: a real Mosquitto, a firmware server,
//! a wire recorder playing the platform, and a temporary directory.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{FileServer, Mosquitto, RecorderOptions, TempDir, TestCa, WireMessage, WireRecorder};

/// How long a rig waits for a device's message.
pub const RIG_WAIT: Duration = Duration::from_secs(15);

/// Mosquitto, a firmware server, a recorder of `/sys/#` and a temp dir, for
/// devices of product `pk`. Everything stops when it is dropped.
pub struct Rig {
    /// The broker.
    pub broker: Mosquitto,
    /// The firmware server.
    pub files: FileServer,
    /// The recorder, playing the platform: it sees every device message and
    /// publishes commands.
    pub wire: WireRecorder,
    /// A directory for the devices' files.
    pub dir: TempDir,
    /// The product key of the devices.
    pub pk: String,
}

impl Rig {
    /// A plain rig; `dir_prefix` names its temp dir.
    pub fn new(pk: &str, dir_prefix: &str) -> Rig {
        let broker = Mosquitto::start();
        let wire = WireRecorder::connect(&broker.url(), "/sys/#");
        Rig {
            files: FileServer::start(),
            wire,
            broker,
            dir: TempDir::new(dir_prefix),
            pk: pk.to_owned(),
        }
    }

    /// The broker and the file server over TLS, with certificates of `ca`.
    pub fn tls(ca: &TestCa, pk: &str, dir_prefix: &str) -> Rig {
        let broker = Mosquitto::start_tls(ca);
        let wire =
            WireRecorder::connect_with(&broker.url(), &["/sys/#"], RecorderOptions::trusting(ca))
                .expect("wire recorder over TLS");
        Rig {
            files: FileServer::start_tls(ca),
            wire,
            broker,
            dir: TempDir::new(dir_prefix),
            pk: pk.to_owned(),
        }
    }

    /// The OTA topic `kind` (`upgrade`, `progress`, `inform`, ...) of `dev`.
    pub fn topic(&self, dev: &str, kind: &str) -> String {
        format!("/sys/{}/{dev}/ota/firmware/{kind}", self.pk)
    }

    /// Publishes a command to `dev` as the platform would.
    pub fn push(&self, dev: &str, payload: impl Into<Vec<u8>>) {
        self.wire
            .publish(&self.topic(dev, "upgrade"), payload, true)
            .expect("publish command");
    }

    /// Pushes until the device acknowledges: a command sent before it has
    /// (re)subscribed is lost (clean session).
    pub fn push_until_acked(&self, dev: &str, payload: impl Fn() -> String) {
        let reply_topic = self.topic(dev, "upgrade_reply");
        let deadline = Instant::now() + RIG_WAIT;
        loop {
            assert!(Instant::now() < deadline, "wire:\n{}", self.wire.summary());
            self.push(dev, payload());
            if self
                .wire
                .wait_for(|m| m.topic == reply_topic, Duration::from_secs(1))
                .is_some()
            {
                return;
            }
        }
    }

    /// Waits for a message from `dev` on `kind` matching `pred`.
    pub fn expect(
        &self,
        dev: &str,
        kind: &str,
        pred: impl Fn(&WireMessage) -> bool,
    ) -> WireMessage {
        let topic = self.topic(dev, kind);
        self.wire
            .wait_for(|m| m.topic == topic && pred(m), RIG_WAIT)
            .unwrap_or_else(|| {
                panic!(
                    "no {kind} message from {dev}; wire:\n{}",
                    self.wire.summary()
                )
            })
    }

    /// Waits for a JSON message from `dev` on `kind` whose
    /// `data.firmwareVersion` is `version`.
    pub fn expect_version(&self, dev: &str, kind: &str, version: &str) -> Value {
        self.expect(dev, kind, |m| {
            m.json_str("data.firmwareVersion").as_deref() == Some(version)
        })
        .json
        .expect("a JSON message")
    }

    /// Waits for the device's inform of `version`.
    pub fn expect_inform(&self, dev: &str, version: &str) {
        self.expect_version(dev, "inform", version);
    }

    /// Every JSON message from `dev` on `kind`, in order.
    pub fn all(&self, dev: &str, kind: &str) -> Vec<Value> {
        self.wire.json_on(&self.topic(dev, kind))
    }

    /// `(status, progress)` of every progress report from `dev`.
    pub fn statuses(&self, dev: &str) -> Vec<(i64, i64)> {
        self.wire.progress_on(&self.topic(dev, "progress"))
    }

    /// Every version `dev` informed, in order.
    pub fn informs(&self, dev: &str) -> Vec<String> {
        self.wire.versions_on(&self.topic(dev, "inform"))
    }

    /// Waits until `dev` has sent a progress report matching `pred(status, progress)`.
    pub fn wait_status(&self, dev: &str, pred: impl Fn(i64, i64) -> bool) {
        self.expect(dev, "progress", |m| {
            pred(
                m.json_i64("data.status").unwrap_or(0),
                m.json_i64("data.progress").unwrap_or(-1),
            )
        });
    }
}

/// Asserts the progress reports of one successful upgrade: DOWNLOADING from
/// 0, rising, to 100, then DOWNLOADED 100, UPGRADING 100 and SUCCESS 100.
pub fn assert_success_statuses(statuses: &[(i64, i64)]) {
    assert_eq!(statuses.first(), Some(&(1, 0)), "{statuses:?}");
    let tail: Vec<_> = statuses.iter().rev().take(4).rev().cloned().collect();
    assert_eq!(
        tail,
        vec![(1, 100), (2, 100), (3, 100), (4, 100)],
        "{statuses:?}"
    );
    let downloading: Vec<i64> = statuses.iter().filter(|s| s.0 == 1).map(|s| s.1).collect();
    assert!(
        downloading.windows(2).all(|w| w[0] < w[1]),
        "not rising: {downloading:?}"
    );
}

/// Asserts that within each status the percent never goes down (what the
/// platform must see whoever reports: the SDK, the application, or both).
pub fn assert_progress_never_goes_back(statuses: &[(i64, i64)]) {
    let mut last = std::collections::HashMap::new();
    for &(status, pct) in statuses {
        let before = last.insert(status, pct).unwrap_or(0);
        assert!(
            pct >= before,
            "status {status} went back from {before} to {pct}: {statuses:?}"
        );
    }
}
