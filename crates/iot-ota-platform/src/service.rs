//! The IO shell around the engine: SQLite, MQTT, the ticker.
//!
//! One mutex guards the store and the running batches. Every handler locks,
//! feeds the engine, writes the changed rows in one transaction, unlocks, and
//! only then publishes what the engine asked for: a state change is always
//! committed before it is acted on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use iot_ota_core::protocol::{
    encode_get_not_found, encode_get_reply, encode_upgrade, parse_progress, parse_upgrade_reply,
    parse_version_message, TopicKind,
};
use iot_ota_core::{Firmware, Topics};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS, SubscribeFilter};
use tokio::sync::Notify;

use crate::api::{
    batch_config, check_firmware, check_product, check_version, BatchView, CreateBatch,
    CreatedBatch, DeviceView, Excluded, FirmwareInfo,
};
use crate::engine::{select_devices, Action, Batch, DeviceInfo, Millis};
use crate::store::{FirmwareRow, Store, StoreError};

/// How soon the ticker tries again after a batch could not be saved.
const SAVE_RETRY_MS: Millis = 500;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// An error of an API operation, with the HTTP status it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    /// HTTP status code: 400, 404, 409, 413 or 500.
    pub status: u16,
    /// For a person.
    pub message: String,
}

impl OpError {
    pub(crate) fn new(status: u16, message: impl Into<String>) -> Self {
        OpError {
            status,
            message: message.into(),
        }
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        OpError::new(500, e.to_string())
    }
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    running: BTreeMap<i64, Batch>,
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
}

/// State shared by the HTTP handlers, the MQTT loop and the ticker.
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    pub(crate) mqtt: AsyncClient,
    pub(crate) prefix: String,
    pub(crate) public_url: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) max_size: u64,
    pub(crate) wake: Notify,
    pub(crate) mqtt_up: AtomicBool,
    pub(crate) stopping: AtomicBool,
}

impl Shared {
    pub(crate) fn new(
        store: Store,
        mqtt: AsyncClient,
        prefix: String,
        public_url: String,
        data_dir: PathBuf,
        max_size: u64,
    ) -> Result<Shared, StoreError> {
        let mut running = BTreeMap::new();
        for id in store.batch_ids(true)? {
            if let Some(b) = store.load_batch(id)? {
                running.insert(id, b);
            }
        }
        Ok(Shared {
            inner: Mutex::new(Inner { store, running }),
            mqtt,
            prefix,
            public_url,
            data_dir,
            max_size,
            wake: Notify::new(),
            mqtt_up: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        })
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
                eprintln!("platform: publish to {topic} failed: {e}");
            }
        }
    }

    fn topics(&self, product: &str, device: &str) -> Topics {
        Topics::with_prefix(&self.prefix, product, device)
    }

    // ---- MQTT input

    /// Handles one message from a device; returns what to publish in answer.
    pub(crate) fn on_message(&self, topic: &str, payload: &[u8]) -> Vec<Outgoing> {
        let Some((product, device, kind)) = Topics::parse(&self.prefix, topic) else {
            return Vec::new();
        };
        let now = now_ms();
        let mut inner = self.lock();
        let result = match kind {
            TopicKind::Inform => self.on_inform(&mut inner, product, device, payload, now),
            TopicKind::Progress => self.on_progress(&mut inner, product, device, payload, now),
            TopicKind::UpgradeReply => self.on_reply(&mut inner, product, device, payload, now),
            TopicKind::Get => self.on_get(&inner, product, device, payload, now),
            TopicKind::Upgrade | TopicKind::GetReply => Ok(Vec::new()),
        };
        match result {
            Ok(out) => out,
            Err(e) => {
                eprintln!("platform: {topic}: {e}");
                Vec::new()
            }
        }
    }

    fn on_inform(
        &self,
        inner: &mut Inner,
        product: &str,
        device: &str,
        payload: &[u8],
        now: Millis,
    ) -> Result<Vec<Outgoing>, String> {
        let (_, version) = parse_version_message(payload).map_err(|r| r.message)?;
        // The device row is bookkeeping: failing to write it must not drop
        // the message for the batches.
        if let Err(e) = inner.store.device_informed(product, device, &version, now) {
            eprintln!("platform: {product}/{device}: {e}");
        }
        self.for_batches(inner, product, |b| b.handle_inform(device, &version, now))?;
        Ok(Vec::new())
    }

    fn on_progress(
        &self,
        inner: &mut Inner,
        product: &str,
        device: &str,
        payload: &[u8],
        now: Millis,
    ) -> Result<Vec<Outgoing>, String> {
        let (_, p) = parse_progress(payload).map_err(|r| r.message)?;
        // The device row is bookkeeping: failing to write it must not drop
        // the message for the batches.
        if let Err(e) = inner.store.device_seen(product, device, now) {
            eprintln!("platform: {product}/{device}: {e}");
        }
        self.for_batches(inner, product, |b| b.handle_progress(device, &p, now))?;
        Ok(Vec::new())
    }

    fn on_reply(
        &self,
        inner: &mut Inner,
        product: &str,
        device: &str,
        payload: &[u8],
        now: Millis,
    ) -> Result<Vec<Outgoing>, String> {
        let r = parse_upgrade_reply(payload).map_err(|r| r.message)?;
        // The device row is bookkeeping: failing to write it must not drop
        // the message for the batches.
        if let Err(e) = inner.store.device_seen(product, device, now) {
            eprintln!("platform: {product}/{device}: {e}");
        }
        self.for_batches(inner, product, |b| {
            b.handle_reply(device, &r.msg_id, r.code, &r.message, now)
        })?;
        Ok(Vec::new())
    }

    fn on_get(
        &self,
        inner: &Inner,
        product: &str,
        device: &str,
        payload: &[u8],
        now: Millis,
    ) -> Result<Vec<Outgoing>, String> {
        let (msg_id, version) = parse_version_message(payload).map_err(|r| r.message)?;
        let store = &inner.store;
        store
            .device_seen(product, device, now)
            .map_err(|e| e.to_string())?;
        let topic = self.topics(product, device).get_reply;
        let payload = match store
            .firmware(product, &version)
            .map_err(|e| e.to_string())?
        {
            Some(fw) => encode_get_reply(
                &msg_id,
                &Firmware {
                    version: fw.version.clone(),
                    url: fw.info(&self.public_url).url,
                    size: Some(fw.size),
                    sign: fw.md5.clone(),
                    sign_method: iot_ota_core::SignMethod::Md5,
                    policy: None,
                },
            ),
            None => encode_get_not_found(&msg_id, &version),
        };
        Ok(vec![(topic, payload)])
    }

    /// Feeds every running batch of `product`, saves what changed, retires finished batches.
    ///
    /// A batch whose save fails keeps the change in memory with its rows still
    /// marked changed ([`Store::save`]), and stays running: the ticker's next
    /// save writes them (within a second), and anything acted on later is
    /// decided by a tick whose save commits these rows first.
    fn for_batches(
        &self,
        inner: &mut Inner,
        product: &str,
        mut f: impl FnMut(&mut Batch) -> bool,
    ) -> Result<(), String> {
        let Inner { store, running } = inner;
        let mut done = Vec::new();
        let mut errors = Vec::new();
        for b in running.values_mut().filter(|b| b.product == product) {
            if f(b) {
                if let Err(e) = store.save(b) {
                    errors.push(format!("saving batch {}: {e}", b.id));
                    continue;
                }
                if !b.is_running() {
                    done.push(b.id);
                }
            }
        }
        for id in done {
            running.remove(&id);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    // ---- timers

    /// Polls every running batch at `now`; returns the commands to publish and
    /// when to poll next.
    pub(crate) fn tick(&self, now: Millis) -> (Vec<Outgoing>, Option<Millis>) {
        let mut inner = self.lock();
        let Inner { store, running } = &mut *inner;
        let mut out = Vec::new();
        let mut done = Vec::new();
        let mut next: Option<Millis> = None;
        for b in running.values_mut() {
            // A poll that is due may decide pushes: keep the batch as it was, so
            // that a failed save can undo the poll and the next tick decides again.
            let before = b.next_wakeup().is_some_and(|w| w <= now).then(|| b.clone());
            let actions = b.poll(now);
            if let Err(e) = store.save(b) {
                // Not committed: do not act on it. Undo the poll (a poll that was
                // not due decided nothing, and `save` kept its rows marked
                // changed), and try again shortly.
                eprintln!("platform: saving batch {}: {e}", b.id);
                if let Some(before) = before {
                    *b = before;
                }
                let retry = now.saturating_add(SAVE_RETRY_MS);
                next = Some(next.map_or(retry, |n| n.min(retry)));
                continue;
            }
            for Action::Push { device, msg_id, .. } in actions {
                match self.command(store, b, &device, &msg_id) {
                    Ok(cmd) => out.push(cmd),
                    Err(e) => eprintln!("platform: batch {}: {e}", b.id),
                }
            }
            if !b.is_running() {
                done.push(b.id);
            }
            if let Some(w) = b.next_wakeup() {
                next = Some(next.map_or(w, |n| n.min(w)));
            }
        }
        for id in done {
            running.remove(&id);
        }
        (out, next)
    }

    fn command(
        &self,
        store: &Store,
        b: &Batch,
        device: &str,
        msg_id: &str,
    ) -> Result<Outgoing, String> {
        let fw = store
            .firmware(&b.product, &b.firmware_version)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("firmware {} {} is gone", b.product, b.firmware_version))?;
        let sign = match b.config.sign_method {
            iot_ota_core::SignMethod::Md5 => fw.md5.clone(),
            iot_ota_core::SignMethod::Sha256 => fw.sha256.clone(),
        };
        let firmware = Firmware {
            version: fw.version.clone(),
            url: fw.info(&self.public_url).url,
            size: Some(fw.size),
            sign,
            sign_method: b.config.sign_method,
            policy: Some(b.config.policy),
        };
        Ok((
            self.topics(&b.product, device).upgrade,
            encode_upgrade(msg_id, &firmware),
        ))
    }

    // ---- API operations

    pub(crate) fn list_firmware(
        &self,
        product: Option<&str>,
    ) -> Result<Vec<FirmwareInfo>, OpError> {
        let inner = self.lock();
        Ok(inner
            .store
            .list_firmware(product)?
            .iter()
            .map(|f| f.info(&self.public_url))
            .collect())
    }

    /// Registers an uploaded file (already written at `tmp`, hashed and sized).
    pub(crate) fn add_firmware(&self, up: Upload) -> Result<FirmwareInfo, OpError> {
        let Upload {
            product,
            version,
            name,
            tmp,
            size,
            md5,
            sha256,
        } = up;
        let (product, version, name) = (product.as_str(), version.as_str(), name.as_str());
        check_firmware(product, version, name, size, self.max_size)
            .map_err(|m| OpError::new(400, m))?;
        let dir = self.data_dir.join("firmware").join(product).join(version);
        let path = dir.join(name);
        let inner = self.lock();
        if inner.store.firmware(product, version)?.is_some() {
            return Err(OpError::new(
                409,
                format!("product {product} already has a firmware version {version}"),
            ));
        }
        std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| OpError::new(500, format!("storing {}: {e}", path.display())))?;
        let row = FirmwareRow {
            product: product.into(),
            version: version.into(),
            name: name.into(),
            size,
            md5,
            sha256,
            path: path.to_string_lossy().into_owned(),
            created_ms: now_ms(),
        };
        if !inner.store.insert_firmware(&row)? {
            return Err(OpError::new(409, "duplicate version"));
        }
        Ok(row.info(&self.public_url))
    }

    pub(crate) fn delete_firmware(&self, product: &str, version: &str) -> Result<(), OpError> {
        let inner = self.lock();
        let Some(row) = inner.store.firmware(product, version)? else {
            return Err(OpError::new(
                404,
                format!("no firmware {version} for product {product}"),
            ));
        };
        if let Some(batch) = inner.store.firmware_in_use(product, version)? {
            return Err(OpError::new(
                409,
                format!("firmware {product} {version} is used by running batch {batch}; terminate it first"),
            ));
        }
        inner.store.delete_firmware(product, version)?;
        let _ = std::fs::remove_file(&row.path);
        if let Some(dir) = Path::new(&row.path).parent() {
            let _ = std::fs::remove_dir(dir);
        }
        Ok(())
    }

    pub(crate) fn firmware_file(
        &self,
        product: &str,
        version: &str,
        name: &str,
    ) -> Result<FirmwareRow, OpError> {
        let inner = self.lock();
        match inner.store.firmware(product, version)? {
            Some(row) if row.name == name => Ok(row),
            _ => Err(OpError::new(404, "no such firmware file")),
        }
    }

    pub(crate) fn list_devices(&self, product: Option<&str>) -> Result<Vec<DeviceView>, OpError> {
        Ok(self.lock().store.list_devices(product)?)
    }

    pub(crate) fn create_batch(&self, req: &CreateBatch) -> Result<CreatedBatch, OpError> {
        let bad = |m: String| OpError::new(400, m);
        check_product(&req.product).map_err(bad)?;
        check_version("firmware_version", &req.firmware_version).map_err(bad)?;
        let config = batch_config(req).map_err(bad)?;
        let now = now_ms();
        let mut inner = self.lock();
        if inner
            .store
            .firmware(&req.product, &req.firmware_version)?
            .is_none()
        {
            return Err(OpError::new(
                404,
                format!(
                    "product {} has no firmware version {}; add it first",
                    req.product, req.firmware_version
                ),
            ));
        }
        let known: Vec<DeviceInfo> = inner
            .store
            .list_devices(Some(&req.product))?
            .into_iter()
            .map(|d| DeviceInfo {
                device: d.device,
                version: d.version,
            })
            .collect();
        let mut busy = BTreeMap::new();
        for b in inner.running.values().filter(|b| b.product == req.product) {
            for r in b.records.values().filter(|r| !r.state.is_final()) {
                busy.insert(r.device.clone(), b.id);
            }
        }
        let (eligible, excluded) =
            select_devices(&req.firmware_version, req.devices.as_deref(), &known, &busy);
        let excluded: Vec<Excluded> = excluded
            .into_iter()
            .map(|(device, why)| Excluded {
                device,
                reason: why.to_string(),
            })
            .collect();
        if eligible.is_empty() {
            let why: Vec<String> = excluded
                .iter()
                .map(|e| format!("{}: {}", e.device, e.reason))
                .collect();
            return Err(OpError::new(
                409,
                if why.is_empty() {
                    format!(
                        "no eligible device: product {} has no known device",
                        req.product
                    )
                } else {
                    format!("no eligible device ({})", why.join("; "))
                },
            ));
        }
        let batch =
            inner
                .store
                .create_batch(&req.product, &req.firmware_version, &config, now, |id| {
                    Batch::new(
                        id,
                        req.product.clone(),
                        req.firmware_version.clone(),
                        config.clone(),
                        eligible,
                        now,
                    )
                })?;
        let view = BatchView::of(&batch, true);
        inner.running.insert(batch.id, batch);
        drop(inner);
        self.wake.notify_one();
        Ok(CreatedBatch {
            batch: view,
            excluded,
        })
    }

    pub(crate) fn list_batches(&self) -> Result<Vec<BatchView>, OpError> {
        let inner = self.lock();
        let mut out = Vec::new();
        for id in inner.store.batch_ids(false)? {
            if let Some(b) = inner.store.load_batch(id)? {
                out.push(BatchView::of(&b, false));
            }
        }
        Ok(out)
    }

    pub(crate) fn show_batch(&self, id: i64) -> Result<BatchView, OpError> {
        let inner = self.lock();
        if let Some(b) = inner.running.get(&id) {
            return Ok(BatchView::of(b, true));
        }
        match inner.store.load_batch(id)? {
            Some(b) => Ok(BatchView::of(&b, true)),
            None => Err(OpError::new(404, format!("no batch {id}"))),
        }
    }

    pub(crate) fn terminate_batch(&self, id: i64) -> Result<BatchView, OpError> {
        let mut inner = self.lock();
        let Inner { store, running } = &mut *inner;
        let Some(b) = running.get_mut(&id) else {
            return match store.load_batch(id)? {
                Some(b) => Err(OpError::new(
                    409,
                    format!("batch {id} is already {}", b.state),
                )),
                None => Err(OpError::new(404, format!("no batch {id}"))),
            };
        };
        let before = b.clone();
        b.terminate(now_ms());
        if let Err(e) = store.save(b) {
            // Not terminated after all: the batch runs on as it was.
            *b = before;
            return Err(e.into());
        }
        let view = BatchView::of(b, true);
        running.remove(&id);
        Ok(view)
    }
}

/// Drives the MQTT connection: re-subscribes on every ConnAck, feeds messages in.
pub(crate) async fn mqtt_loop(shared: Arc<Shared>, mut eventloop: EventLoop) {
    let filters: Vec<SubscribeFilter> = ["upgrade_reply", "inform", "progress", "get"]
        .iter()
        .map(|k| {
            SubscribeFilter::new(
                format!(
                    "{}/+/+/ota/firmware/{k}",
                    shared.prefix.trim_end_matches('/')
                ),
                QoS::AtLeastOnce,
            )
        })
        .collect();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // Clean session: the broker forgot our subscriptions.
                if let Err(e) = shared.mqtt.try_subscribe_many(filters.clone()) {
                    eprintln!("platform: subscribe: {e}");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                shared.mqtt_up.store(true, Ordering::SeqCst);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let out = shared.on_message(&p.topic, &p.payload);
                for (topic, payload) in out {
                    // try_publish: awaiting here could block the loop that drains the queue.
                    if let Err(e) = shared
                        .mqtt
                        .try_publish(topic, QoS::AtLeastOnce, false, payload)
                    {
                        eprintln!("platform: reply: {e}");
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                if shared.mqtt_up.swap(false, Ordering::SeqCst)
                    && !shared.stopping.load(Ordering::SeqCst)
                {
                    eprintln!("platform: MQTT connection lost: {e}; reconnecting");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

/// Runs the batches' timers: wakes at the earliest deadline (at most every second)
/// or when a batch is created.
pub(crate) async fn ticker(shared: Arc<Shared>) {
    loop {
        let now = now_ms();
        let (out, next) = shared.tick(now);
        shared.publish(out).await;
        let wait = next
            .map(|n| (n - now_ms()).clamp(0, 1000))
            .unwrap_or(1000)
            .max(5) as u64;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            _ = shared.wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::RecordState;
    use iot_ota_core::protocol::{encode_upgrade_reply, ReplyCode};
    use rumqttc::MqttOptions;
    use rusqlite::Connection;

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

    fn stored(shared: &Shared, id: i64) -> crate::engine::Record {
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
            })
            .unwrap();
        store.device_informed("pk", "d1", "1.0", t0).unwrap();
        let (mqtt, _eventloop) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), 10);
        let shared = Shared::new(
            store,
            mqtt,
            "/sys".into(),
            "http://127.0.0.1:1".into(),
            dir.clone(),
            1 << 20,
        )
        .unwrap();
        let req = CreateBatch {
            product: "pk".into(),
            firmware_version: "2.0".into(),
            ack_timeout_secs: Some(60.0),
            ..Default::default()
        };
        let id = shared.create_batch(&req).unwrap().batch.id;

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
            .on_message("/sys/pk/d1/ota/firmware/upgrade_reply", &reply)
            .is_empty());
        assert_eq!(shared.show_batch(id).unwrap().records[0].state, "pending");
        assert_eq!(stored(&shared, id).state, RecordState::Pushed);
        assert!(shared.tick(now + 700).0.is_empty());
        lock.unlock();
        assert!(shared.tick(now + 1_300).0.is_empty());
        assert_eq!(stored(&shared, id).state, RecordState::Pending);

        // Terminating fails as a whole when its commit fails.
        let lock = Locker::lock(&db);
        let e = shared.terminate_batch(id).unwrap_err();
        assert_eq!(e.status, 500, "{e}");
        let view = shared.show_batch(id).unwrap();
        assert_eq!(
            (view.state.as_str(), view.records[0].state.as_str()),
            ("in_progress", "pending")
        );
        lock.unlock();
        let view = shared.terminate_batch(id).unwrap();
        assert_eq!(view.state, "terminated");
        let b = shared.lock().store.load_batch(id).unwrap().unwrap();
        assert_eq!(b.records["d1"].state, RecordState::Failed);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
