//! The API's device and batch operations.

use std::collections::BTreeMap;

use super::{Inner, PlatformError, Shared};
use crate::api::{
    batch_config, check_product, check_version, BatchView, CreateBatch, CreatedBatch, DeviceView,
    Excluded,
};
use crate::api::{DeviceCredential, RegisterDevices, RegisteredDevices, MAX_REGISTER};
use crate::batch::{select_devices, Batch, DeviceInfo, Millis};
use crate::credentials;

impl Shared {
    /// Registers devices (or gives registered ones new secrets): the
    /// secrets are made here, returned once, and kept as their SHA-256.
    /// With an open or external broker the credentials are still kept (for
    /// a later start with the embedded one, or Mosquitto's password file).
    pub(crate) fn register_devices(
        &self,
        req: &RegisterDevices,
    ) -> Result<RegisteredDevices, PlatformError> {
        let bad = |m: String| PlatformError::new(400, m);
        check_product(&req.product).map_err(bad)?;
        if req.devices.is_empty() || req.devices.len() > MAX_REGISTER {
            return Err(bad(format!(
                "devices: 1 to {MAX_REGISTER} names, got {}",
                req.devices.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(req.devices.len());
        let mut rows = Vec::with_capacity(req.devices.len());
        for device in &req.devices {
            iot_ota_core::protocol::validate_identity("device", device).map_err(bad)?;
            if !seen.insert(device.as_str()) {
                return Err(bad(format!("device {device} is listed twice")));
            }
            let secret = credentials::make_secret().map_err(|e| PlatformError::new(500, e))?;
            rows.push((device.clone(), credentials::secret_hash(&secret)));
            out.push(DeviceCredential {
                device: device.clone(),
                username: credentials::username(&req.product, device),
                secret,
            });
        }
        self.lock()
            .store
            .register_devices(&req.product, &rows, super::now_ms())?;
        if let Some(c) = &self.credentials {
            for (device, hash) in rows {
                c.set(&req.product, &device, hash);
            }
        }
        self.changed();
        Ok(RegisteredDevices {
            product: req.product.clone(),
            devices: out,
        })
    }

    /// Revokes a device's credential and closes its connection to the
    /// embedded broker; 404 when it has none active.
    pub(crate) fn revoke_device(&self, product: &str, device: &str) -> Result<(), PlatformError> {
        let revoked = self
            .lock()
            .store
            .revoke_device(product, device, super::now_ms())?;
        if !revoked {
            return Err(PlatformError::new(
                404,
                format!("device {product}/{device} has no active credential"),
            ));
        }
        if let Some(c) = &self.credentials {
            c.remove(product, device);
            if let Some(b) = &self.broker_stats {
                b.disconnect(&c.identity(product, device));
            }
        }
        self.changed();
        Ok(())
    }

    pub(crate) fn list_devices(
        &self,
        product: Option<&str>,
    ) -> Result<Vec<DeviceView>, PlatformError> {
        let inner = self.lock();
        let mut devices = inner.store.list_devices(product)?;
        let mut current = std::collections::HashMap::new();
        for b in inner.running.values() {
            for r in b.records.values().filter(|r| !r.state.is_final()) {
                current.insert(
                    (b.product.as_str(), r.device.as_str()),
                    crate::api::DeviceRecord {
                        batch: b.id,
                        state: r.state.as_str().into(),
                        progress: r.progress,
                    },
                );
            }
        }
        for d in &mut devices {
            d.record = current.remove(&(d.product.as_str(), d.device.as_str()));
            d.online = self.broker_stats.as_ref().and_then(|h| {
                h.is_connected(&iot_ota_core::protocol::default_client_id(
                    &d.product, &d.device,
                ))
            });
        }
        Ok(devices)
    }

    pub(crate) fn create_batch(
        &self,
        req: &CreateBatch,
        now: Millis,
    ) -> Result<CreatedBatch, PlatformError> {
        let bad = |m: String| PlatformError::new(400, m);
        check_product(&req.product).map_err(bad)?;
        check_version("firmware_version", &req.firmware_version).map_err(bad)?;
        let config = batch_config(req).map_err(bad)?;
        let rollout = crate::api::rollout(req).map_err(bad)?;
        let mut inner = self.lock();
        if inner
            .store
            .firmware(&req.product, &req.firmware_version)?
            .is_none()
        {
            return Err(PlatformError::new(
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
            // Known: informed a version; a registered device never seen, or
            // a revoked one, is not (it cannot take a command).
            .filter(|d| !d.version.is_empty() && d.credential.as_deref() != Some("revoked"))
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
            return Err(PlatformError::new(
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
                    .with_rollout(rollout)
                })?;
        let view = BatchView::of(&batch, true);
        inner.running.insert(batch.id, batch);
        drop(inner);
        self.wake.notify_one();
        self.changed();
        Ok(CreatedBatch {
            batch: view,
            excluded,
        })
    }

    pub(crate) fn list_batches(&self) -> Result<Vec<BatchView>, PlatformError> {
        let inner = self.lock();
        let mut out = Vec::new();
        for id in inner.store.batch_ids(false)? {
            if let Some(b) = inner.store.load_batch(id)? {
                out.push(BatchView::of(&b, false));
            }
        }
        Ok(out)
    }

    pub(crate) fn show_batch(&self, id: i64) -> Result<BatchView, PlatformError> {
        let inner = self.lock();
        if let Some(b) = inner.running.get(&id) {
            return Ok(BatchView::of(b, true));
        }
        match inner.store.load_batch(id)? {
            Some(b) => Ok(BatchView::of(&b, true)),
            None => Err(PlatformError::new(404, format!("no batch {id}"))),
        }
    }

    pub(crate) fn terminate_batch(&self, id: i64, now: Millis) -> Result<BatchView, PlatformError> {
        let mut inner = self.lock();
        let Inner { store, running, .. } = &mut *inner;
        let Some(b) = running.get_mut(&id) else {
            return Err(not_running(store, id));
        };
        let unsaved = b.unsaved();
        b.terminate(now);
        if let Err(e) = store.save(b) {
            // Not terminated after all: the batch runs on as it was.
            super::undo(store, b, unsaved)?;
            return Err(e.into());
        }
        let view = BatchView::of(b, true);
        running.remove(&id);
        drop(inner);
        self.changed();
        Ok(view)
    }

    /// Pauses (`pause`) or resumes a running batch.
    pub(crate) fn pause_batch(
        &self,
        id: i64,
        pause: bool,
        now: Millis,
    ) -> Result<BatchView, PlatformError> {
        let mut inner = self.lock();
        let Inner { store, running, .. } = &mut *inner;
        let Some(b) = running.get_mut(&id) else {
            return Err(not_running(store, id));
        };
        let unsaved = b.unsaved();
        let changed = if pause {
            b.pause("paused by hand")
        } else {
            b.resume(now)
        };
        if !changed {
            let state = if b.is_paused() {
                "paused"
            } else {
                "not paused"
            };
            return Err(PlatformError::new(409, format!("batch {id} is {state}")));
        }
        if let Err(e) = store.save(b) {
            super::undo(store, b, unsaved)?;
            return Err(e.into());
        }
        let view = BatchView::of(b, true);
        if !b.is_running() {
            running.remove(&id);
        }
        drop(inner);
        self.wake.notify_one();
        self.changed();
        Ok(view)
    }
}

/// Why batch `id` cannot be changed: it has ended (409) or never was (404).
fn not_running(store: &crate::store::Store, id: i64) -> PlatformError {
    match store.load_batch(id) {
        Ok(Some(b)) => PlatformError::new(409, format!("batch {id} is already {}", b.state)),
        Ok(None) => PlatformError::new(404, format!("no batch {id}")),
        Err(e) => e.into(),
    }
}
