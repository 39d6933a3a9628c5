//! The IO shell around the engine: SQLite, MQTT, the ticker.
//!
//! One mutex guards the store and the running batches. Every handler locks,
//! feeds the engine, writes the changed rows in one transaction, unlocks, and
//! only then publishes what the engine asked for: a state change is always
//! committed before it is acted on.
//!
//! - `mqtt`: the devices' messages in, commands out, the timers;
//! - `ops`: the API's device and batch operations;
//! - `firmware`: firmware records and their files.
//!
//! The clock is read at the edges (the MQTT loop, the ticker, the HTTP
//! handlers) and passed in as `now`, as the engine takes it.

mod firmware;
mod mqtt;
mod ops;

pub(crate) use mqtt::{handle_messages, mqtt_loop, ticker};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use iot_ota_core::Topics;
use rumqttc::{AsyncClient, QoS};
use tokio::sync::Notify;

use crate::batch::{Batch, Millis};
use crate::store::{Store, StoreError};

/// How soon the ticker tries again after a batch could not be saved.
const SAVE_RETRY_MS: Millis = 500;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// The platform's error: what went wrong, with the HTTP status it maps to.
/// Every API answer that is not a success is one, sent as `{"error": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformError {
    /// HTTP status code: 400, 404, 409, 413 or 500.
    pub status: u16,
    /// For a person.
    pub message: String,
}

impl PlatformError {
    pub(crate) fn new(status: u16, message: impl Into<String>) -> Self {
        PlatformError {
            status,
            message: message.into(),
        }
    }
}

impl From<StoreError> for PlatformError {
    fn from(e: StoreError) -> Self {
        PlatformError::new(500, e.to_string())
    }
}

impl std::fmt::Display for PlatformError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    running: BTreeMap<i64, Batch>,
    /// Device rows of a group whose commit failed, written with the next group.
    unsaved_devices: Vec<crate::store::DeviceWrite>,
}

/// An MQTT message to publish with QoS 1.
pub(crate) type Outgoing = (String, Vec<u8>);

/// An uploaded firmware file, written at `tmp`, hashed and sized.
pub(crate) struct Upload {
    pub(crate) product: String,
    pub(crate) version: String,
    pub(crate) name: String,
    pub(crate) tmp: PathBuf,
    pub(crate) size: u64,
    pub(crate) md5: String,
    pub(crate) sha256: String,
    /// The manifest's security counter (signed platforms; default 0).
    pub(crate) counter: Option<u64>,
}

/// What the service is started with (besides its store and MQTT client).
pub(crate) struct Settings {
    pub(crate) prefix: String,
    pub(crate) public_url: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) max_size: u64,
    pub(crate) signing_key: Option<crate::signing::SigningKey>,
    pub(crate) api_token: String,
    pub(crate) broker_stats: Option<crate::broker::BrokerStatsHandle>,
    /// The embedded broker's credentials (`None`: open, or an external broker).
    pub(crate) credentials: Option<std::sync::Arc<crate::credentials::Credentials>>,
}

/// State shared by the HTTP handlers, the MQTT loop and the ticker.
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    pub(crate) mqtt: AsyncClient,
    pub(crate) prefix: String,
    pub(crate) public_url: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) max_size: u64,
    /// Signs each firmware's manifest at upload, when set.
    pub(crate) signing_key: Option<crate::signing::SigningKey>,
    /// What `Authorization: Bearer` must carry on every mutating request.
    pub(crate) api_token: String,
    pub(crate) wake: Notify,
    pub(crate) mqtt_up: AtomicBool,
    pub(crate) stopping: AtomicBool,
    /// Device messages handled, and the microseconds spent on them.
    pub(crate) messages: AtomicU64,
    pub(crate) busy_us: AtomicU64,
    /// Firmware (and chunk index) bytes answered, and the requests.
    pub(crate) served_bytes: AtomicU64,
    pub(crate) served_requests: AtomicU64,
    /// Bumped by every change of a batch or a device (what the console's
    /// live pages wait for).
    pub(crate) changes: tokio::sync::watch::Sender<u64>,
    /// Device messages received and not handled yet, now and at most.
    pub(crate) queued: AtomicU64,
    pub(crate) peak_queued: AtomicU64,
    pub(crate) broker_stats: Option<crate::broker::BrokerStatsHandle>,
    /// The embedded broker's credentials (`None`: open, or an external broker).
    pub(crate) credentials: Option<std::sync::Arc<crate::credentials::Credentials>>,
}

impl Shared {
    pub(crate) fn new(
        store: Store,
        mqtt: AsyncClient,
        settings: Settings,
    ) -> Result<Shared, StoreError> {
        let Settings {
            prefix,
            public_url,
            data_dir,
            max_size,
            signing_key,
            api_token,
            broker_stats,
            credentials,
        } = settings;
        let mut running = BTreeMap::new();
        for id in store.batch_ids(true)? {
            if let Some(b) = store.load_batch(id)? {
                running.insert(id, b);
            }
        }
        Ok(Shared {
            inner: Mutex::new(Inner {
                store,
                running,
                unsaved_devices: Vec::new(),
            }),
            mqtt,
            prefix,
            public_url,
            data_dir,
            max_size,
            signing_key,
            api_token,
            wake: Notify::new(),
            mqtt_up: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            messages: AtomicU64::new(0),
            busy_us: AtomicU64::new(0),
            served_bytes: AtomicU64::new(0),
            served_requests: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            peak_queued: AtomicU64::new(0),
            changes: tokio::sync::watch::Sender::new(0),
            broker_stats,
            credentials,
        })
    }

    /// What `GET /api/stats` shows.
    pub(crate) fn stats(&self) -> crate::api::StatsView {
        let (rss_kib, peak_rss_kib, cpu_ms) = process_usage();
        crate::api::StatsView {
            mqtt_messages: self.messages.load(Ordering::Relaxed),
            mqtt_busy_ms: self.busy_us.load(Ordering::Relaxed) / 1000,
            queued: self.queued.load(Ordering::Relaxed),
            peak_queued: self.peak_queued.load(Ordering::Relaxed),
            rss_kib,
            peak_rss_kib,
            cpu_ms,
            firmware_bytes_served: self.served_bytes.load(Ordering::Relaxed),
            firmware_requests: self.served_requests.load(Ordering::Relaxed),
            broker: self.broker_stats.as_ref().and_then(|h| h.get()),
        }
    }

    /// Tells the live pages something changed.
    pub(crate) fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data: every change is
        // committed in one transaction, so the poison flag can be ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) async fn publish(&self, out: Vec<Outgoing>) {
        for (topic, payload) in out {
            if let Err(e) = self
                .mqtt
                .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                .await
            {
                log::warn!("publish to {topic} failed: {e}");
            }
        }
    }

    fn topics(&self, product: &str, device: &str) -> Topics {
        Topics::with_prefix(&self.prefix, product, device)
    }
}

/// This process's resident memory now and at its peak (KiB), and its CPU
/// time (ms), from `/proc/self`; zeros where that is not readable.
pub fn process_usage() -> (u64, u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15, in USER_HZ (100 on Linux) ticks;
    // the command name (field 2) may hold spaces, so count after its ')'.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    (field("VmRSS:"), field("VmHWM:"), ticks * 10)
}

/// Undoes a change whose save failed (a tick's poll, a terminate, a
/// pause): back to what is committed, plus what was changed and not saved
/// before it (`unsaved`).
pub(crate) fn undo(
    store: &Store,
    b: &mut Batch,
    unsaved: crate::batch::Unsaved,
) -> Result<(), StoreError> {
    if let Some(mut committed) = store.load_batch(b.id)? {
        committed.carry_over(unsaved);
        *b = committed;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::CreateBatch;
    use crate::batch::RecordState;
    use crate::store::FirmwareRow;
    use iot_ota_core::protocol::{encode_upgrade_reply, ReplyCode};
    use rumqttc::MqttOptions;
    use rusqlite::Connection;
    use std::path::Path;
    use std::time::Duration;

    /// Holds the database's write lock from another connection, as a second
    /// process or a stuck writer would: the platform's writes then really fail
    /// (SQLITE_BUSY after the busy timeout).
    struct Locker(Connection);

    impl Locker {
        fn lock(db: &Path) -> Locker {
            let c = Connection::open(db).unwrap();
            c.execute_batch("BEGIN IMMEDIATE").unwrap();
            Locker(c)
        }

        fn unlock(self) {
            self.0.execute_batch("COMMIT").unwrap();
        }
    }

    fn stored(shared: &Shared, id: i64) -> crate::batch::Record {
        let b = shared.lock().store.load_batch(id).unwrap().unwrap();
        b.records["d1"].clone()
    }

    #[test]
    fn a_failed_commit_is_retried_by_the_next_tick() {
        let dir = std::env::temp_dir().join(format!(
            "iot-ota-service-commit-{}-{}",
            std::process::id(),
            now_ms()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("platform.db");
        let store = Store::open(&db).unwrap();
        store.set_busy_timeout(Duration::from_millis(50)).unwrap();
        let t0 = now_ms();
        store
            .insert_firmware(&FirmwareRow {
                product: "pk".into(),
                version: "2.0".into(),
                name: "fw.bin".into(),
                size: 3,
                md5: "0".repeat(32),
                sha256: "0".repeat(64),
                path: dir.join("fw.bin").to_string_lossy().into_owned(),
                created_ms: t0,
                counter: None,
                signed: None,
                index: None,
            })
            .unwrap();
        store.device_informed("pk", "d1", "1.0", t0).unwrap();
        let (mqtt, _eventloop) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), 10);
        let shared = Shared::new(
            store,
            mqtt,
            Settings {
                prefix: "/sys".into(),
                public_url: "http://127.0.0.1:1".into(),
                data_dir: dir.clone(),
                max_size: 1 << 20,
                signing_key: None,
                api_token: "t".into(),
                broker_stats: None,
                credentials: None,
            },
        )
        .unwrap();
        let req = CreateBatch {
            product: "pk".into(),
            firmware_version: "2.0".into(),
            ack_timeout_secs: Some(60.0),
            ..Default::default()
        };
        let id = shared.create_batch(&req, now_ms()).unwrap().batch.id;

        // The push's commit fails: nothing is published, nothing changes.
        let lock = Locker::lock(&db);
        let now = now_ms();
        let (out, next) = shared.tick(now);
        assert!(out.is_empty(), "pushed before the push was committed");
        assert!(next.is_some_and(|n| n <= now + SAVE_RETRY_MS), "{next:?}");
        assert_eq!(shared.show_batch(id).unwrap().records[0].state, "to_push");
        assert_eq!(stored(&shared, id).state, RecordState::ToPush);
        let (out, _) = shared.tick(now + 10);
        assert!(out.is_empty(), "still locked");
        lock.unlock();
        // The next tick really pushes, after committing.
        let (out, _) = shared.tick(now + 600);
        assert_eq!(out.len(), 1, "the retried push");
        assert_eq!(out[0].0, "/sys/pk/d1/ota/firmware/upgrade");
        let rec = stored(&shared, id);
        assert_eq!((rec.state, rec.attempts), (RecordState::Pushed, 1));
        let msg_id = rec.msg_id.unwrap();

        // A device message whose commit fails is written by the next tick.
        let lock = Locker::lock(&db);
        let reply = encode_upgrade_reply(&msg_id, ReplyCode::Accepted, "success");
        assert!(shared
            .on_message("/sys/pk/d1/ota/firmware/upgrade_reply", &reply, now_ms())
            .is_empty());
        assert_eq!(shared.show_batch(id).unwrap().records[0].state, "pending");
        assert_eq!(stored(&shared, id).state, RecordState::Pushed);
        assert!(shared.tick(now + 700).0.is_empty());
        lock.unlock();
        assert!(shared.tick(now + 1_300).0.is_empty());
        assert_eq!(stored(&shared, id).state, RecordState::Pending);

        // A device row whose commit fails goes with the next group: the
        // version informed is not lost behind a later "seen".
        let lock = Locker::lock(&db);
        let inform = iot_ota_core::protocol::encode_inform("9", "1.5.0");
        shared.on_message("/sys/pk/d1/ota/firmware/inform", &inform, now_ms());
        shared.on_message("/sys/pk/d1/ota/firmware/upgrade_reply", &reply, now_ms());
        lock.unlock();
        shared.on_message("/sys/pk/d1/ota/firmware/upgrade_reply", &reply, now_ms());
        let d = shared.list_devices(Some("pk")).unwrap();
        assert_eq!(d[0].version, "1.5.0", "{d:?}");

        // Terminating fails as a whole when its commit fails.
        let lock = Locker::lock(&db);
        let e = shared.terminate_batch(id, now_ms()).unwrap_err();
        assert_eq!(e.status, 500, "{e}");
        let view = shared.show_batch(id).unwrap();
        assert_eq!(
            (view.state.as_str(), view.records[0].state.as_str()),
            ("in_progress", "pending")
        );
        lock.unlock();
        let view = shared.terminate_batch(id, now_ms()).unwrap();
        assert_eq!(view.state, "terminated");
        let b = shared.lock().store.load_batch(id).unwrap().unwrap();
        assert_eq!(b.records["d1"].state, RecordState::Failed);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
