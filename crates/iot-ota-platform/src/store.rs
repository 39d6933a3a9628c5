//! SQLite storage: firmware, devices, batches and records.
//!
//! WAL journal, `synchronous=FULL`: a committed transaction survives a crash
//! of the process and of the machine. The schema version lives in
//! `PRAGMA user_version`; [`Store::open`] upgrades an older file step by step
//! and refuses a newer one.

use std::path::Path;

use iot_ota_core::{Policy, SignMethod};
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::api::{DeviceView, FirmwareInfo};
use crate::batch::{
    Batch, BatchConfig, BatchState, FailReason, Millis, Record, RecordState, Rollout, RolloutState,
};

/// A device row to write with a group of messages ([`Store::save_group`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceWrite {
    /// Product key.
    pub product: String,
    /// Device identifier.
    pub device: String,
    /// The informed version; `None`: only seen (any other message).
    pub version: Option<String>,
}

impl DeviceWrite {
    /// A version inform.
    pub fn informed(product: &str, device: &str, version: String) -> Self {
        DeviceWrite {
            product: product.into(),
            device: device.into(),
            version: Some(version),
        }
    }

    /// Any other message: the device was seen.
    pub fn seen(product: &str, device: &str) -> Self {
        DeviceWrite {
            product: product.into(),
            device: device.into(),
            version: None,
        }
    }
}

/// The schema version this code writes.
pub const SCHEMA_VERSION: i64 = 5;

/// Version 5: a firmware's chunk index (delta updates): its SHA-256 and
/// size; the file is the image's path with `.idx` appended.
const SCHEMA_V5: &str = "
ALTER TABLE firmware ADD COLUMN index_sha256 TEXT;
ALTER TABLE firmware ADD COLUMN index_size INTEGER;
";

/// Version 4: each registered device's MQTT credential (the SHA-256 of its
/// secret; the secret itself is shown once and never kept) and when it was
/// revoked.
const SCHEMA_V4: &str = "
CREATE TABLE credentials (
    product        TEXT NOT NULL,
    device         TEXT NOT NULL,
    secret_sha256  TEXT NOT NULL,
    created_ms     INTEGER NOT NULL,
    revoked_ms     INTEGER,
    PRIMARY KEY (product, device)
);
";

/// Version 2: a firmware's security counter and its signed manifest (the
/// command's `manifest` and `signatures` fields, as JSON).
/// Version 3: when each record's command was acknowledged (push → ack
/// latency), and rollouts: each record's group, the batch's rules (JSON)
/// and where it is (group, pause reason, next push, error base).
const SCHEMA_V3: &str = "
ALTER TABLE records ADD COLUMN acked_ms INTEGER;
ALTER TABLE records ADD COLUMN grp INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN rollout TEXT;
ALTER TABLE batches ADD COLUMN rollout_group INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN paused TEXT;
ALTER TABLE batches ADD COLUMN next_push_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN error_base INTEGER NOT NULL DEFAULT 0;
";

const SCHEMA_V2: &str = "
ALTER TABLE firmware ADD COLUMN counter INTEGER;
ALTER TABLE firmware ADD COLUMN signed TEXT;
";

const SCHEMA_V1: &str = "
CREATE TABLE firmware (
    product    TEXT NOT NULL,
    version    TEXT NOT NULL,
    name       TEXT NOT NULL,
    size       INTEGER NOT NULL,
    md5        TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    path       TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (product, version)
);
CREATE TABLE devices (
    product       TEXT NOT NULL,
    device        TEXT NOT NULL,
    version       TEXT NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    PRIMARY KEY (product, device)
);
CREATE TABLE batches (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    product           TEXT NOT NULL,
    firmware_version  TEXT NOT NULL,
    policy            TEXT NOT NULL,
    sign_method       TEXT NOT NULL,
    validity_ms       INTEGER NOT NULL,
    timeout_ms        INTEGER NOT NULL,
    retries           INTEGER NOT NULL,
    retry_interval_ms INTEGER NOT NULL,
    ack_timeout_ms    INTEGER NOT NULL,
    state             TEXT NOT NULL,
    created_ms        INTEGER NOT NULL,
    finished_ms       INTEGER,
    validity_cut      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE records (
    batch_id     INTEGER NOT NULL REFERENCES batches(id),
    device       TEXT NOT NULL,
    state        TEXT NOT NULL,
    status       INTEGER,
    progress     INTEGER NOT NULL,
    attempts     INTEGER NOT NULL,
    msg_id       TEXT,
    reason       TEXT,
    desc         TEXT NOT NULL,
    last_failure TEXT,
    version      TEXT,
    pushed_ms    INTEGER,
    started_ms   INTEGER,
    deadline_ms  INTEGER,
    finished_ms  INTEGER,
    PRIMARY KEY (batch_id, device)
);
CREATE INDEX records_device ON records(device);
";

/// A storage error: the SQLite message, or a corrupt value.
#[derive(Debug)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "storage: {}", self.0)
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// A registered firmware as stored (the URL is the service's business).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareRow {
    /// Product key.
    pub product: String,
    /// Version.
    pub version: String,
    /// File name.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// MD5 hex.
    pub md5: String,
    /// SHA-256 hex.
    pub sha256: String,
    /// Path of the file on disk.
    pub path: String,
    /// Registration time.
    pub created_ms: Millis,
    /// The manifest's security counter, when signed.
    pub counter: Option<u64>,
    /// The signed manifest: the command's `manifest` and `signatures`
    /// fields as a JSON object, when the platform signs.
    pub signed: Option<String>,
    /// The chunk index's SHA-256 and size, when it has one (delta
    /// updates; the file is [`FirmwareRow::index_path`]).
    pub index: Option<(String, u64)>,
}

impl FirmwareRow {
    /// Where its chunk index is kept: the image's path with `.idx`.
    pub fn index_path(&self) -> String {
        format!("{}.idx", self.path)
    }

    /// The `delta` of its commands, with the index's URL under `base`.
    pub fn delta(&self, base: &str) -> Option<Box<iot_ota_core::DeltaRef>> {
        let (sha256, size) = self.index.clone()?;
        Some(Box::new(iot_ota_core::DeltaRef {
            index_url: format!(
                "{}.idx",
                firmware_url(base, &self.product, &self.version, &self.name)
            ),
            index_sha256: sha256,
            index_size: size,
        }))
    }

    /// The signed manifest, read back.
    pub fn signed_manifest(&self) -> Option<Box<iot_ota_core::manifest::Signed>> {
        let text = self.signed.as_deref()?;
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        iot_ota_core::manifest::Signed::from_data(v.as_object()?)
            .ok()
            .flatten()
            .map(Box::new)
    }

    /// The API view, with its download URL under `base`.
    pub fn info(&self, base: &str) -> FirmwareInfo {
        FirmwareInfo {
            product: self.product.clone(),
            version: self.version.clone(),
            name: self.name.clone(),
            size: self.size,
            md5: self.md5.clone(),
            sha256: self.sha256.clone(),
            created_ms: self.created_ms,
            url: firmware_url(base, &self.product, &self.version, &self.name),
            index_sha256: self.index.as_ref().map(|i| i.0.clone()),
            counter: self.counter,
            key_ids: self
                .signed_manifest()
                .map(|s| s.signatures.iter().map(|s| s.key_id.clone()).collect())
                .unwrap_or_default(),
        }
    }
}

/// The download URL of a firmware file under `base` (`http://host:port`).
pub fn firmware_url(base: &str, product: &str, version: &str, name: &str) -> String {
    format!(
        "{}/fw/{product}/{version}/{name}",
        base.trim_end_matches('/')
    )
}

/// The platform's database.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating or upgrading) the database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Reports are committed at once but not each fsynced (a process
        // crash loses none of them; a power cut may lose the last ones, as
        // it may lose the broker's unacknowledged messages anyway). What
        // precedes an action (a push, a new batch) is written with
        // `synchronous = FULL` ([`Store::save_durable`]), and that fsync
        // makes everything written before it durable too.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut store = Store { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<()> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError(format!(
                "the database has schema version {version}, newer than this program's {SCHEMA_VERSION}"
            )));
        }
        if version < 1 {
            let tx = self.conn.transaction()?;
            tx.execute_batch(SCHEMA_V1)?;
            tx.pragma_update(None, "user_version", 1)?;
            tx.commit()?;
        }
        if version < 2 {
            let tx = self.conn.transaction()?;
            tx.execute_batch(SCHEMA_V2)?;
            tx.pragma_update(None, "user_version", 2)?;
            tx.commit()?;
        }
        if version < 3 {
            let tx = self.conn.transaction()?;
            tx.execute_batch(SCHEMA_V3)?;
            tx.pragma_update(None, "user_version", 3)?;
            tx.commit()?;
        }
        if version < 4 {
            let tx = self.conn.transaction()?;
            tx.execute_batch(SCHEMA_V4)?;
            tx.pragma_update(None, "user_version", 4)?;
            tx.commit()?;
        }
        if version < 5 {
            let tx = self.conn.transaction()?;
            tx.execute_batch(SCHEMA_V5)?;
            tx.pragma_update(None, "user_version", 5)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// The schema version of the open file.
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    // ---- firmware

    /// Registers a firmware; false when the product already has that version.
    pub fn insert_firmware(&self, f: &FirmwareRow) -> Result<bool> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO firmware (product, version, name, size, md5, sha256, path, created_ms, counter, signed, index_sha256, index_size)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![f.product, f.version, f.name, f.size as i64, f.md5, f.sha256, f.path, f.created_ms, f.counter.map(|c| c as i64), f.signed, f.index.as_ref().map(|i| i.0.clone()), f.index.as_ref().map(|i| i.1 as i64)],
        )?;
        Ok(n == 1)
    }

    fn firmware_row(r: &Row<'_>) -> rusqlite::Result<FirmwareRow> {
        Ok(FirmwareRow {
            product: r.get(0)?,
            version: r.get(1)?,
            name: r.get(2)?,
            size: r.get::<_, i64>(3)? as u64,
            md5: r.get(4)?,
            sha256: r.get(5)?,
            path: r.get(6)?,
            created_ms: r.get(7)?,
            counter: r.get::<_, Option<i64>>(8)?.map(|c| c as u64),
            signed: r.get(9)?,
            index: match (
                r.get::<_, Option<String>>(10)?,
                r.get::<_, Option<i64>>(11)?,
            ) {
                (Some(sha256), Some(size)) => Some((sha256, size as u64)),
                _ => None,
            },
        })
    }

    /// One firmware.
    pub fn firmware(&self, product: &str, version: &str) -> Result<Option<FirmwareRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT product, version, name, size, md5, sha256, path, created_ms, counter, signed, index_sha256, index_size FROM firmware
                 WHERE product = ?1 AND version = ?2",
                params![product, version],
                Self::firmware_row,
            )
            .optional()?)
    }

    /// Every firmware, of one product or all.
    pub fn list_firmware(&self, product: Option<&str>) -> Result<Vec<FirmwareRow>> {
        let mut st = self.conn.prepare(
            "SELECT product, version, name, size, md5, sha256, path, created_ms, counter, signed, index_sha256, index_size FROM firmware
             WHERE ?1 IS NULL OR product = ?1 ORDER BY product, created_ms, version",
        )?;
        let rows = st.query_map(params![product], Self::firmware_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes a firmware row; false when there was none.
    pub fn delete_firmware(&self, product: &str, version: &str) -> Result<bool> {
        let n = self.conn.execute(
            "DELETE FROM firmware WHERE product = ?1 AND version = ?2",
            params![product, version],
        )?;
        Ok(n == 1)
    }

    // ---- devices

    /// Writes a group of device messages' changes in one transaction: the
    /// device rows and every batch's changed rows. When it fails nothing is
    /// written and the batches' rows stay marked changed.
    pub fn save_group(
        &mut self,
        batches: &mut [&mut Batch],
        devices: &[DeviceWrite],
        now: Millis,
    ) -> Result<()> {
        let taken: Vec<(Vec<String>, bool)> = batches.iter_mut().map(|b| b.take_dirty()).collect();
        let result = (|| -> Result<()> {
            let tx = self.conn.transaction()?;
            for d in devices {
                match &d.version {
                    Some(v) => {
                        tx.execute(
                            "INSERT INTO devices (product, device, version, first_seen_ms, last_seen_ms)
                             VALUES (?1, ?2, ?3, ?4, ?4)
                             ON CONFLICT (product, device) DO UPDATE SET version = ?3, last_seen_ms = ?4",
                            params![d.product, d.device, v, now],
                        )?;
                    }
                    None => {
                        tx.execute(
                            "UPDATE devices SET last_seen_ms = ?3 WHERE product = ?1 AND device = ?2",
                            params![d.product, d.device, now],
                        )?;
                    }
                }
            }
            for (b, (rows, row)) in batches.iter().zip(&taken) {
                if *row {
                    write_batch_row(&tx, b)?;
                }
                for d in rows {
                    write_record(&tx, b.id, &b.records[d])?;
                }
            }
            tx.commit()?;
            Ok(())
        })();
        if result.is_err() {
            for (b, (rows, row)) in batches.iter_mut().zip(taken) {
                b.mark_dirty(rows, row);
            }
        }
        result
    }

    /// Records a version inform.
    pub fn device_informed(
        &self,
        product: &str,
        device: &str,
        version: &str,
        now: Millis,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO devices (product, device, version, first_seen_ms, last_seen_ms)
             VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT (product, device) DO UPDATE SET version = ?3, last_seen_ms = ?4",
            params![product, device, version, now],
        )?;
        Ok(())
    }

    /// Notes any message from a known device.
    pub fn device_seen(&self, product: &str, device: &str, now: Millis) -> Result<()> {
        self.conn.execute(
            "UPDATE devices SET last_seen_ms = ?3 WHERE product = ?1 AND device = ?2",
            params![product, device, now],
        )?;
        Ok(())
    }

    /// Known devices, of one product or all.
    pub fn list_devices(&self, product: Option<&str>) -> Result<Vec<DeviceView>> {
        // Registered devices (seen or not yet), then devices seen without
        // a credential (an open broker, an external one).
        let mut st = self.conn.prepare(
            "SELECT c.product, c.device, COALESCE(d.version, ''), COALESCE(d.first_seen_ms, 0),
                    COALESCE(d.last_seen_ms, 0),
                    CASE WHEN c.revoked_ms IS NULL THEN 'active' ELSE 'revoked' END
               FROM credentials c LEFT JOIN devices d
                 ON d.product = c.product AND d.device = c.device
              WHERE ?1 IS NULL OR c.product = ?1
             UNION ALL
             SELECT d.product, d.device, d.version, d.first_seen_ms, d.last_seen_ms, NULL
               FROM devices d
              WHERE (?1 IS NULL OR d.product = ?1)
                AND NOT EXISTS (SELECT 1 FROM credentials c
                                 WHERE c.product = d.product AND c.device = d.device)
             ORDER BY 1, 2",
        )?;
        let rows = st.query_map(params![product], |r| {
            Ok(DeviceView {
                product: r.get(0)?,
                device: r.get(1)?,
                version: r.get(2)?,
                first_seen_ms: r.get(3)?,
                last_seen_ms: r.get(4)?,
                credential: r.get(5)?,
                online: None,
                record: None,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ---- credentials

    /// Registers `devices` of `product` with their secrets' SHA-256 (hex),
    /// in one transaction; a device registered before gets the new secret
    /// (its old one stops working) and is active again.
    pub fn register_devices(
        &mut self,
        product: &str,
        devices: &[(String, String)],
        now: Millis,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare(
                "INSERT INTO credentials (product, device, secret_sha256, created_ms, revoked_ms)
                 VALUES (?1, ?2, ?3, ?4, NULL)
                 ON CONFLICT (product, device) DO UPDATE
                    SET secret_sha256 = excluded.secret_sha256,
                        created_ms = excluded.created_ms, revoked_ms = NULL",
            )?;
            for (device, hash) in devices {
                st.execute(params![product, device, hash, now])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Revokes a device's credential; false when it had none active.
    pub fn revoke_device(&mut self, product: &str, device: &str, now: Millis) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE credentials SET revoked_ms = ?3
              WHERE product = ?1 AND device = ?2 AND revoked_ms IS NULL",
            params![product, device, now],
        )?;
        Ok(n > 0)
    }

    /// Every active credential: (product, device, secret SHA-256 hex).
    pub fn active_credentials(&self) -> Result<Vec<(String, String, String)>> {
        let mut st = self.conn.prepare(
            "SELECT product, device, secret_sha256 FROM credentials WHERE revoked_ms IS NULL",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ---- batches

    /// Creates a batch: `make` receives the new id and builds the batch, which
    /// is written with all its records in the same transaction.
    pub fn create_batch(
        &mut self,
        product: &str,
        firmware_version: &str,
        config: &BatchConfig,
        now: Millis,
        make: impl FnOnce(i64) -> Batch,
    ) -> Result<Batch> {
        self.durably(|s| {
            let tx = s.conn.transaction()?;
            tx.execute(
                "INSERT INTO batches (product, firmware_version, policy, sign_method, validity_ms, timeout_ms,
                                      retries, retry_interval_ms, ack_timeout_ms, state, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'in_progress', ?10)",
                params![
                    product,
                    firmware_version,
                    config.policy.as_str(),
                    config.sign_method.wire_name(),
                    config.validity_ms,
                    config.timeout_ms,
                    config.retries,
                    config.retry_interval_ms,
                    config.ack_timeout_ms,
                    now
                ],
            )?;
            let id = tx.last_insert_rowid();
            let mut batch = make(id);
            let (devices, _) = batch.take_dirty();
            write_batch_row(&tx, &batch)?;
            for d in devices {
                write_record(&tx, id, &batch.records[&d])?;
            }
            tx.commit()?;
            Ok(batch)
        })
    }

    /// Runs `write` with `synchronous = FULL`: its commit is fsynced, and
    /// with it every commit before.
    fn durably<T>(&mut self, write: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        let result = write(self);
        // The write's own result counts: it is committed (or not) whatever
        // becomes of the setting after it.
        if let Err(e) = self.conn.pragma_update(None, "synchronous", "NORMAL") {
            log::warn!("database: cannot set synchronous = NORMAL again: {e}");
        }
        result
    }

    /// Writes the batch's changed rows (see [`Batch::take_dirty`]) in one
    /// transaction. When that fails nothing is written and the rows stay
    /// marked changed, so the next save writes them.
    pub fn save(&mut self, batch: &mut Batch) -> Result<()> {
        let (devices, row) = batch.take_dirty();
        if devices.is_empty() && !row {
            return Ok(());
        }
        let result = self.write_rows(batch, &devices, row);
        if result.is_err() {
            batch.mark_dirty(devices, row);
        }
        result
    }

    /// [`Store::save`], fsynced before it returns (with every commit before
    /// it): for rows the caller is about to act on (pushes).
    pub fn save_durable(&mut self, batch: &mut Batch) -> Result<()> {
        self.durably(|s| s.save(batch))
    }

    fn write_rows(&mut self, batch: &Batch, devices: &[String], row: bool) -> Result<()> {
        let tx = self.conn.transaction()?;
        if row {
            write_batch_row(&tx, batch)?;
        }
        for d in devices {
            write_record(&tx, batch.id, &batch.records[d])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// How long a write waits for another connection's lock before it fails
    /// (5 s by default); tests shorten it to make a locked database fail fast.
    #[cfg(test)]
    pub(crate) fn set_busy_timeout(&self, timeout: std::time::Duration) -> Result<()> {
        Ok(self.conn.busy_timeout(timeout)?)
    }

    /// Ids of batches, newest first, optionally only running ones.
    pub fn batch_ids(&self, running_only: bool) -> Result<Vec<i64>> {
        let mut st = self.conn.prepare(
            "SELECT id FROM batches WHERE ?1 = 0 OR state = 'in_progress' ORDER BY id DESC",
        )?;
        let rows = st.query_map(params![running_only as i64], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Loads one batch with its records.
    pub fn load_batch(&self, id: i64) -> Result<Option<Batch>> {
        let head = self
            .conn
            .query_row(
                "SELECT product, firmware_version, policy, sign_method, validity_ms, timeout_ms, retries,
                        retry_interval_ms, ack_timeout_ms, state, created_ms, finished_ms, validity_cut,
                        rollout, rollout_group, paused, next_push_ms, error_base
                 FROM batches WHERE id = ?1",
                params![id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        [r.get::<_, i64>(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?],
                        r.get::<_, String>(9)?,
                        r.get::<_, i64>(10)?,
                        r.get::<_, Option<i64>>(11)?,
                        r.get::<_, bool>(12)?,
                        (
                            r.get::<_, Option<String>>(13)?,
                            RolloutState {
                                group: r.get(14)?,
                                paused: r.get(15)?,
                                next_push_ms: r.get(16)?,
                                error_base: r.get(17)?,
                            },
                        ),
                    ))
                },
            )
            .optional()?;
        let Some((product, version, policy, sign, nums, state, created, finished, cut, roll)) =
            head
        else {
            return Ok(None);
        };
        let bad = |what: &str, v: &str| StoreError(format!("batch {id}: bad {what} {v:?}"));
        let config = BatchConfig {
            policy: match policy.as_str() {
                "standard" => Policy::Standard,
                "silent" => Policy::Silent,
                _ => return Err(bad("policy", &policy)),
            },
            sign_method: SignMethod::parse(&sign).ok_or_else(|| bad("sign method", &sign))?,
            validity_ms: nums[0],
            timeout_ms: nums[1],
            retries: nums[2] as u32,
            retry_interval_ms: nums[3],
            ack_timeout_ms: nums[4],
        };
        let state = BatchState::parse(&state).ok_or_else(|| bad("state", &state))?;
        let mut st = self.conn.prepare(
            "SELECT device, state, status, progress, attempts, msg_id, reason, desc, last_failure, version,
                    pushed_ms, started_ms, deadline_ms, finished_ms, acked_ms, grp
             FROM records WHERE batch_id = ?1 ORDER BY device",
        )?;
        let raw = st
            .query_map(params![id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<i32>>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, u32>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, Option<String>>(8)?,
                    r.get::<_, Option<String>>(9)?,
                    [
                        r.get::<_, Option<i64>>(10)?,
                        r.get(11)?,
                        r.get(12)?,
                        r.get(13)?,
                        r.get(14)?,
                        r.get(15)?,
                    ],
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let reason = |v: Option<String>| -> Result<Option<FailReason>> {
            v.map(|s| FailReason::parse(&s).ok_or_else(|| bad("reason", &s)))
                .transpose()
        };
        let mut records = Vec::with_capacity(raw.len());
        for (device, rstate, status, progress, attempts, msg_id, why, desc, last, version, t) in raw
        {
            records.push(Record {
                state: RecordState::parse(&rstate).ok_or_else(|| bad("record state", &rstate))?,
                device,
                status,
                progress,
                attempts,
                msg_id,
                reason: reason(why)?,
                desc,
                last_failure: reason(last)?,
                version,
                pushed_ms: t[0],
                acked_ms: t[4],
                group: t[5].unwrap_or(0) as u32,
                started_ms: t[1],
                deadline_ms: t[2],
                finished_ms: t[3],
            });
        }
        let (rollout, progress) = roll;
        let rollout = rollout_from_json(id, rollout)?;
        Ok(Some(
            Batch::restore(
                id, product, version, config, state, created, finished, cut, records,
            )
            .restore_rollout(rollout, progress),
        ))
    }

    /// True when a running batch targets this firmware.
    pub fn firmware_in_use(&self, product: &str, version: &str) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id FROM batches WHERE product = ?1 AND firmware_version = ?2
                 AND state = 'in_progress' LIMIT 1",
                params![product, version],
                |r| r.get(0),
            )
            .optional()?)
    }
}

fn write_batch_row(tx: &rusqlite::Transaction<'_>, b: &Batch) -> Result<()> {
    let p = &b.progress;
    tx.execute(
        "UPDATE batches SET state = ?2, finished_ms = ?3, validity_cut = ?4, rollout = ?5,
                            rollout_group = ?6, paused = ?7, next_push_ms = ?8, error_base = ?9
         WHERE id = ?1",
        params![
            b.id,
            b.state.as_str(),
            b.finished_ms,
            b.validity_cut,
            rollout_json(&b.rollout),
            p.group,
            p.paused,
            p.next_push_ms,
            p.error_base
        ],
    )?;
    Ok(())
}

/// A batch's rollout rules as stored: JSON (`None` for none).
fn rollout_json(r: &Rollout) -> Option<String> {
    (*r != Rollout::default()).then(|| serde_json::to_string(r).unwrap_or_default())
}

fn rollout_from_json(id: i64, text: Option<String>) -> Result<Rollout> {
    match text {
        None => Ok(Rollout::default()),
        Some(t) => serde_json::from_str(&t)
            .map_err(|e| StoreError(format!("batch {id}: bad rollout {t:?}: {e}"))),
    }
}

fn write_record(tx: &rusqlite::Transaction<'_>, batch: i64, r: &Record) -> Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO records (batch_id, device, state, status, progress, attempts, msg_id, reason,
                                         desc, last_failure, version, pushed_ms, started_ms, deadline_ms,
                                         finished_ms, acked_ms, grp)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        params![
            batch,
            r.device,
            r.state.as_str(),
            r.status,
            r.progress,
            r.attempts,
            r.msg_id,
            r.reason.map(FailReason::as_str),
            r.desc,
            r.last_failure.map(FailReason::as_str),
            r.version,
            r.pushed_ms,
            r.started_ms,
            r.deadline_ms,
            r.finished_ms,
            r.acked_ms,
            r.group
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iot_ota_core::protocol::Progress;
    use iot_ota_core::Status;

    /// A temporary directory, removed when dropped.
    struct TempDb(std::path::PathBuf);

    impl Drop for TempDb {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A database path in a fresh temporary directory (kept while the guard lives).
    fn temp_db(tag: &str) -> (TempDb, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "iot-ota-store-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("platform.db");
        (TempDb(dir), db)
    }

    fn cfg() -> BatchConfig {
        BatchConfig {
            policy: Policy::Silent,
            sign_method: SignMethod::Sha256,
            validity_ms: 60_000,
            timeout_ms: 5_000,
            retries: 2,
            retry_interval_ms: 1_000,
            ack_timeout_ms: 2_000,
        }
    }

    #[test]
    fn batches_survive_reopen() {
        let (_dir, path) = temp_db("reopen");
        let mut store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        let mut b = store
            .create_batch("pk", "2.0", &cfg(), 100, |id| {
                Batch::new(id, "pk", "2.0", cfg(), ["a".into(), "b".into()], 100)
            })
            .unwrap();
        b.poll(100);
        b.handle_reply("a", "b1a1", 200, "", 150);
        b.handle_progress(
            "a",
            &Progress {
                status: Status::VerifyFailed,
                progress: 100,
                desc: "md5 mismatch".into(),
                firmware_version: "2.0".into(),
            },
            160,
        );
        store.save(&mut b).unwrap();
        assert_eq!(store.firmware_in_use("pk", "2.0").unwrap(), Some(b.id));
        drop(store);
        let store = Store::open(&path).unwrap();
        let loaded = store.load_batch(b.id).unwrap().unwrap();
        assert_eq!(loaded, b);
        assert_eq!(store.batch_ids(true).unwrap(), vec![b.id]);
        assert!(store.load_batch(99).unwrap().is_none());
    }

    #[test]
    fn firmware_and_devices() {
        let (_dir, path) = temp_db("fw");
        let store = Store::open(&path).unwrap();
        let row = FirmwareRow {
            product: "pk".into(),
            version: "2.0".into(),
            name: "fw.bin".into(),
            size: 3,
            md5: "m".into(),
            sha256: "s".into(),
            path: "/x".into(),
            created_ms: 1,
            counter: Some(3),
            signed: Some(r#"{"manifest":"e30=","signatures":[]}"#.into()),
            index: None,
        };
        assert!(store.insert_firmware(&row).unwrap());
        assert!(!store.insert_firmware(&row).unwrap(), "duplicate version");
        assert_eq!(store.firmware("pk", "2.0").unwrap(), Some(row.clone()));
        assert_eq!(store.list_firmware(Some("other")).unwrap(), vec![]);
        assert_eq!(row.info("http://h:1/").url, "http://h:1/fw/pk/2.0/fw.bin");
        assert!(store.delete_firmware("pk", "2.0").unwrap());
        assert!(!store.delete_firmware("pk", "2.0").unwrap());
        store.device_informed("pk", "d1", "1.0", 5).unwrap();
        store.device_informed("pk", "d1", "1.1", 9).unwrap();
        store.device_seen("pk", "d1", 12).unwrap();
        let d = store.list_devices(None).unwrap();
        assert_eq!(
            (d[0].version.as_str(), d[0].first_seen_ms, d[0].last_seen_ms),
            ("1.1", 5, 12)
        );
    }

    #[test]
    fn upgrades_a_version_1_file_keeping_its_firmware() {
        let (_dir, path) = temp_db("v1");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(SCHEMA_V1).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute(
                "INSERT INTO firmware VALUES ('pk', '1.0', 'f', 3, 'm', 's', '/x', 1)",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        let row = store.firmware("pk", "1.0").unwrap().unwrap();
        assert_eq!((row.counter, row.signed), (None, None));
    }

    #[test]
    fn refuses_a_newer_schema() {
        let (_dir, path) = temp_db("newer");
        {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "user_version", 7).unwrap();
        }
        let err = Store::open(&path).err().unwrap();
        assert!(err.0.contains("newer"), "{err}");
    }
}
